"""How much of each version's held-out text a lineage has already trained on.

A version's val and test splits measure how well a model knows *that* version's data. When
their lines also occur in the train files of earlier versions, the main path has trained on
them before the version arrives, and its held-out loss reads better than the version's
novelty warrants. This counts, for every version's val (and test) split, the lines of at
least ``--min-chars`` characters (stripped) that occur verbatim as a line of an earlier
version's train text, and, separately, of any other version's::

    python benchmarks/corpus_overlap.py runs/quickstart/corpus --out runs/corpus_overlap.json

Works on any corpus raypath reads (``vK/train``, ``vK/val``, optional ``vK/test``; jsonl,
parquet, Arrow; local or a URI). Memory grows with the corpus: one 8-byte hash per distinct
train line of every version is held at once (~10^8 lines fit in a few GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from raypath.sources import VersionSource, discover_versions, iter_texts


def _line_hashes(files: list[str], column: str, min_chars: int) -> list[int]:
    out = []
    for text in iter_texts(files, column):
        for line in text.splitlines():
            line = line.strip()
            if len(line) >= min_chars:
                out.append(int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "little"))
    return out


def overlap(versions: list[VersionSource], column: str = "text", min_chars: int = 30) -> list[dict]:
    """One row per held-out split: lines, and the share also in earlier / any other version's train text."""
    train = [set(_line_hashes(list(v.train_files), column, min_chars)) for v in versions]
    rows = []
    for k, v in enumerate(versions):
        earlier = set().union(*train[:k])
        others = earlier.union(*train[k + 1:])
        for split, files in (("val", v.val_files), ("test", v.test_files)):
            if not files:
                continue
            lines = _line_hashes(list(files), column, min_chars)
            rows.append({"version": v.name, "split": split, "lines": len(lines),
                         "in_earlier_train": sum(h in earlier for h in lines) / max(len(lines), 1),
                         "in_other_train": sum(h in others for h in lines) / max(len(lines), 1),
                         "in_own_train": sum(h in train[k] for h in lines) / max(len(lines), 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="corpus directory or URI (vK/train, vK/val[, vK/test])")
    p.add_argument("--column", default="text")
    p.add_argument("--min-chars", type=int, default=30, help="shorter lines (braces, blank, 'pass') are not counted")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    rows = overlap(discover_versions(args.corpus), args.column, args.min_chars)
    print(f"{'version':8} {'split':5} {'lines':>7} {'in earlier train':>17} {'in other train':>15} "
          f"{'in own train':>13}")
    for r in rows:
        print(f"{r['version']:8} {r['split']:5} {r['lines']:7d} {r['in_earlier_train']:17.1%} "
              f"{r['in_other_train']:15.1%} {r['in_own_train']:13.1%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"corpus": args.corpus, "min_chars": args.min_chars, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
