"""What ``data.dedup`` costs a version's preparation, and whether it finds what was planted.

Builds a 2-version jsonl corpus of ~2 KB documents of stdlib text (:func:`build_corpus`),
then plants duplicates in v2: ``--earlier`` of its documents are verbatim copies of v1 train
documents, ``--within`` copies of v2's own earlier ones, ``--near`` near-copies of v1's (the
header line changed). Runs ``raypath.run.prepare`` with each ``data.dedup`` of ``--modes`` in
turn (``--repeats`` rounds), each in a fresh driver process with its own local Ray cluster
(``benchmarks/prepare_scale.py``'s driver), and reports: wall time and its ratio to the first
mode's (per round, median), the stages (the dedup stage's own time from its log line), the
driver's peak RSS, per planted kind the documents dropped (v2's drop files, by key), the dropped
documents nobody planted, and the index's bytes on disk. A mode ``minhash@T`` sets
``data.minhash_threshold`` to T (``minhash@0``: a shared band alone drops)::

    python benchmarks/dedup_cost.py --mb 40 --out runs/dedup_cost
    python benchmarks/dedup_cost.py --mb 40 --repeats 1 --modes none,minhash@0,minhash

Writes ``OUT/results.json`` and, with a ``minhash`` mode, ``OUT/unplanted.png``: the Jaccard
similarity of each dropped document nobody planted to its closest earlier one, per mode.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_scale import ROOT, run_prepare, tokenizer  # noqa: E402


def _pieces(text: str, chars: int = 2000) -> list[str]:
    """A source file cut at blank lines into documents of about ``chars`` characters (a web
    corpus's documents are a few KB; a whole stdlib module is ~13 KB)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= chars:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def build_corpus(out: Path, mb: float, shares: dict[str, float], file_mb: float = 8.0) -> dict[str, set]:
    """``mb`` MB of train text per version; returns the planted documents' keys by kind (v2's
    file number << 40 | the line's byte offset, as :mod:`raypath.dedup` names documents).

    A document is a numbered header and thirds of three random stdlib pieces, so two documents
    share at most a third (word-shingle Jaccard similarity ~0.2 or less). In v2, by ``shares``:
    ``earlier`` copies a v1 document, ``within`` one of v2's own, ``near`` a v1 document with
    its header line changed (the body equal: Jaccard ~0.97)."""
    from raypath.corpus import build_embedded_corpus

    src = build_embedded_corpus(out.parent / "embedded")
    files = [json.loads(line)["text"] for v in ("v1", "v2")
             for line in (src / v / "train" / "part-000.jsonl").read_text().splitlines()]
    pool = [p for text in files for p in _pieces(text)]
    rng = random.Random(0)
    planted: dict[str, set] = {k: set() for k in shares}
    v1: list[str] = []
    for v in ("v1", "v2"):
        d = out / v / "train"
        d.mkdir(parents=True, exist_ok=True)
        own: list[str] = []
        written, part, f = 0, 0, open(d / "part-0000.jsonl", "w")
        while written < mb * 1e6:
            r, kind = rng.random(), None
            for k, share in shares.items():
                r -= share
                if v == "v2" and r < 0:
                    kind = k
                    break
            if kind == "earlier":
                text = rng.choice(v1)
            elif kind == "within" and own:
                text = rng.choice(own)
            elif kind == "near":
                text = f"# {v} document {len(own)}\n" + rng.choice(v1).split("\n", 1)[1]
            else:
                kind = None
                thirds = [(p := rng.choice(pool))[len(p) * i // 3: len(p) * (i + 1) // 3] for i in range(3)]
                text = f"# {v} document {len(own)}\n" + "".join(thirds)
                own.append(text)
            if kind:
                planted[kind].add(part << 40 | f.tell())
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            if f.tell() > file_mb * 1e6:
                f.close()
                part += 1
                f = open(d / f"part-{part:04d}.jsonl", "w")
        f.close()
        v1 = own if v == "v1" else v1
        (out / v / "val").mkdir(parents=True, exist_ok=True)
        (out / v / "val" / "part-0000.jsonl").write_text((src / v / "val" / "part-000.jsonl").read_text())
    return planted


def _found(run_dir: Path, planted: dict[str, set]) -> dict:
    """What the run's data manifest and v2's drop files say: its dedup record, per planted kind
    the documents dropped, the dropped documents nobody planted, and the index's bytes."""
    import pyarrow.parquet as pq

    data = run_dir / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    drops = sorted((data / "v2" / "dedup" / "drop").glob("*.parquet"))
    dropped = {k for p in drops for k in pq.read_table(p).column("key").to_pylist()}
    every = set().union(*planted.values())
    return {"dedup": [v.get("dedup", {}) for v in manifest["versions"]],
            "dropped": {kind: len(keys & dropped) for kind, keys in planted.items()},
            "dropped_unplanted": len(dropped - every),
            "index_bytes": sum(p.stat().st_size for p in data.glob("v*/dedup/index/*.parquet"))}


def _docs(corpus: Path) -> dict[tuple[str, int], str]:
    """Every train document by (version, key), in order."""
    out = {}
    for v in ("v1", "v2"):
        for part, path in enumerate(sorted((corpus / v / "train").glob("*.jsonl"))):
            offset = 0
            with open(path, "rb") as f:
                for line in f:
                    out[v, part << 40 | offset] = json.loads(line)["text"]
                    offset += len(line)
    return out


def _shingles(text: str, k: int = 5) -> set:
    words = text.lower().split()
    return {tuple(words[i: i + k]) for i in range(max(len(words) - k + 1, 1))}


def near_partners(corpus: Path, run_dir: Path, planted: dict[str, set]) -> list[float]:
    """For each document a MinHash run dropped that nobody planted: the word-shingle Jaccard
    similarity to the most similar document before it that shares a band with it (what made it
    a near-duplicate)."""
    import pyarrow.parquet as pq

    from raypath.dedup import Rule

    docs, rule, every = _docs(corpus), Rule("minhash"), set().union(*planted.values())
    bands: dict[bytes, list] = {}
    for doc_id, text in docs.items():  # versions, then keys: the order dedup keeps the first in
        d = rule.hashes(text)[0]
        for i in range(0, len(d), 16):
            bands.setdefault(d[i: i + 16], []).append(doc_id)
    partners: dict[tuple, set] = {}
    for ids in bands.values():
        for k, doc_id in enumerate(ids):
            partners.setdefault(doc_id, set()).update(ids[:k])
    out = []
    for v in ("v1", "v2"):
        for p in sorted((run_dir / "data" / v / "dedup" / "drop").glob("*.parquet")):
            for key in pq.read_table(p).column("key").to_pylist():
                if v == "v2" and key in every or not partners.get((v, key)):
                    continue
                mine = _shingles(docs[v, key])
                out.append(max(len(mine & (other := _shingles(docs[o]))) / len(mine | other)
                               for o in partners[v, key]))
    return sorted(out)


def plot(results: dict, path: Path) -> None:
    """Per ``minhash`` mode, a histogram of its unplanted drops' similarity to their closest earlier document."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypath.storage import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, runs in results["runs"].items():
        if sims := runs[-1].get("unplanted_similarity"):
            ax.hist(sims, bins=[i / 40 for i in range(41)], alpha=0.6, label=f"{mode}: {len(sims)} documents")
    ax.set(xlabel="word 5-gram Jaccard similarity to the closest earlier document sharing a band",
           ylabel="documents", title="dropped documents nobody planted")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dedup_cost")
    ap.add_argument("--mb", type=float, default=40.0, help="MB of train text per version")
    ap.add_argument("--earlier", type=float, default=0.2, help="share of v2's documents copied from v1")
    ap.add_argument("--within", type=float, default=0.1, help="share of v2's documents repeating v2's own")
    ap.add_argument("--near", type=float, default=0.1, help="share of v2's documents near-copies of v1's")
    ap.add_argument("--modes", default="none,exact,minhash", help="data.dedup settings, run in turn")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the modes; the median round's ratio counts")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose raypath is measured")
    args = ap.parse_args()
    out, code, modes = Path(args.out).resolve(), Path(args.code).resolve(), args.modes.split(",")
    out.mkdir(parents=True, exist_ok=True)
    planted = build_corpus(out / "corpus", args.mb, {"earlier": args.earlier, "within": args.within,
                                                     "near": args.near})
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        tokenizer(tok, out / "corpus")
    results = {"mb_per_version": args.mb, "planted": {k: len(v) for k, v in planted.items()},
               "runs": {m: [] for m in modes}}
    for rep in range(args.repeats):
        for mode in modes:
            run = out / "runs" / f"{mode}-r{rep}"
            shutil.rmtree(run, ignore_errors=True)  # a prepared run directory would prepare nothing
            dedup, _, threshold = mode.partition("@")
            r = run_prepare(out / "corpus", run, code, args.actors, tok,
                            (f"data.dedup={dedup}", *([f"data.minhash_threshold={threshold}"] if threshold else [])))
            r.update(_found(run, planted))
            if dedup == "minhash" and rep == args.repeats - 1:
                r["unplanted_similarity"] = near_partners(out / "corpus", run, planted)
                sims = r["unplanted_similarity"]
                print(f"  the {len(sims)} unplanted drops' Jaccard to their closest earlier document: min "
                      f"{sims[0]:.2f}, median {statistics.median(sims):.2f}" if sims else "  no unplanted drops")
            results["runs"][mode].append(r)
            print(f"{mode}: {r['wall_s']:.1f} s, stages {r['stages_s']}, driver peak RSS "
                  f"{r['driver_peak_rss_mb']:.0f} MB, {r['tokens'] / 1e6:.1f}M tokens; dropped of the planted "
                  f"{r['dropped']}, unplanted {r['dropped_unplanted']}", flush=True)
    for mode in modes[1:]:
        ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(results["runs"][modes[0]], results["runs"][mode])]
        results[f"wall_ratios_{mode}"] = ratios
        print(f"{mode}/{modes[0]} wall: median {statistics.median(ratios):.2f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if any(r.get("unplanted_similarity") for runs in results["runs"].values() for r in runs):
        plot(results, out / "unplanted.png")
        print(f"plot: {out / 'unplanted.png'}")
    print(f"planted {results['planted']}")


if __name__ == "__main__":
    main()
