"""What ``data.dedup: exact`` costs a version's preparation, and whether it finds what was planted.

Builds a 2-version jsonl corpus of stdlib text cut into ~2 KB documents, each numbered so none
repeats by chance,
then plants duplicates in v2: ``--earlier`` of its documents are verbatim copies of v1 train
documents, ``--within`` copies of v2's own earlier ones. Runs ``raypath.run.prepare`` with
``data.dedup`` none, then exact, back to back (``--repeats`` pairs), each in a fresh driver
process with its own local Ray cluster (``benchmarks/prepare_scale.py``'s driver), and reports:
wall time and its ratio (exact / none, per pair, median), the stages (the dedup stage's own
time from its log line), the driver's peak RSS, the duplicates found against those planted, and
the index's bytes on disk::

    python benchmarks/dedup_cost.py --mb 40 --out runs/dedup_cost

Writes ``OUT/results.json``.
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


def build_corpus(out: Path, mb: float, earlier: float, within: float, file_mb: float = 8.0) -> dict:
    """``mb`` MB of train text per version; returns the planted counts."""
    from raypath.corpus import build_embedded_corpus

    src = build_embedded_corpus(out.parent / "embedded")
    files = [json.loads(line)["text"] for v in ("v1", "v2")
             for line in (src / v / "train" / "part-000.jsonl").read_text().splitlines()]
    pool = [p for text in files for p in _pieces(text)]
    rng = random.Random(0)
    planted = {"earlier": 0, "within": 0}
    v1: list[str] = []
    for v in ("v1", "v2"):
        d = out / v / "train"
        d.mkdir(parents=True, exist_ok=True)
        own: list[str] = []
        written, part, f = 0, 0, open(d / "part-0000.jsonl", "w")
        while written < mb * 1e6:
            r = rng.random()
            if v == "v2" and r < earlier:
                text, planted["earlier"] = rng.choice(v1), planted["earlier"] + 1
            elif v == "v2" and r < earlier + within and own:
                text, planted["within"] = rng.choice(own), planted["within"] + 1
            else:
                text = f"# {v} document {len(own)}\n" + rng.choice(pool)
                own.append(text)
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


def _found(run_dir: Path) -> tuple[list[dict], int]:
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    index = sum(p.stat().st_size for p in (run_dir / "data").glob("v*/dedup/index/*.parquet"))
    return [v.get("dedup", {}) for v in manifest["versions"]], index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dedup_cost")
    ap.add_argument("--mb", type=float, default=40.0, help="MB of train text per version")
    ap.add_argument("--earlier", type=float, default=0.2, help="share of v2's documents copied from v1")
    ap.add_argument("--within", type=float, default=0.1, help="share of v2's documents repeating v2's own")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="none-then-exact pairs; the median pair counts")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose raypath is measured")
    args = ap.parse_args()
    out, code = Path(args.out).resolve(), Path(args.code).resolve()
    out.mkdir(parents=True, exist_ok=True)
    planted = build_corpus(out / "corpus", args.mb, args.earlier, args.within)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        tokenizer(tok, out / "corpus")
    results = {"mb_per_version": args.mb, "planted": planted, "runs": {"none": [], "exact": []}}
    for rep in range(args.repeats):
        for mode in ("none", "exact"):
            run = out / "runs" / f"{mode}-r{rep}"
            shutil.rmtree(run, ignore_errors=True)  # a prepared run directory would prepare nothing
            r = run_prepare(out / "corpus", run, code, args.actors, tok, (f"data.dedup={mode}",))
            r["dedup"], r["index_bytes"] = _found(run)
            results["runs"][mode].append(r)
            print(f"{mode}: {r['wall_s']:.1f} s, stages {r['stages_s']}, driver peak RSS "
                  f"{r['driver_peak_rss_mb']:.0f} MB, {r['tokens'] / 1e6:.1f}M tokens", flush=True)
    pairs = list(zip(results["runs"]["none"], results["runs"]["exact"]))
    results["wall_ratios"] = [b["wall_s"] / a["wall_s"] for a, b in pairs]
    results["wall_ratio"] = statistics.median(results["wall_ratios"])
    found = results["runs"]["exact"][-1]["dedup"][1]
    results["found"] = {k: found.get(k) for k in ("earlier", "held_out", "within")}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"planted {planted}, found {results['found']}; exact/none wall {results['wall_ratio']:.2f} "
          f"(pairs {', '.join(f'{x:.2f}' for x in results['wall_ratios'])}); index "
          f"{results['runs']['exact'][-1]['index_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
