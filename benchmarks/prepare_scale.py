"""Version preparation at growing corpus size: driver memory, wall time, tokens/s.

Builds a 2-version jsonl corpus at 1x, 4x and 8x a base size (documents of the
embedded stdlib corpus, re-sampled and numbered so no two documents repeat), then
runs ``raypath.run.prepare`` on it -- validation, tokenizer training, tokenize +
pack, replay, shuffle, write -- once per size, each in a fresh driver process with
its own local Ray cluster, and reads that driver's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). A second run at one size with
``data.tokenize_actors`` 1 and 2 gives the actor scaling (pairs run back to back,
repeated; the median pair's ratio is reported). The driver logs each stage's time
(validation, tokenize + pack, each version's replay + shuffle + write): printed
under each run.

    python benchmarks/prepare_scale.py --out runs/prepare_scale
    # the same against another checkout (e.g. an older commit in a git worktree):
    python benchmarks/prepare_scale.py --out runs/prepare_scale_old --code /path/to/checkout

Writes ``OUT/results.json`` and ``OUT/prepare_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import json, logging, resource, sys, time
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
for name in ("raypath.data", "raypath.dedup"):  # the stage times
    logging.getLogger(name).setLevel(logging.INFO)
from raypath.cluster import init_ray
from raypath.config import load_config
from raypath.run import prepare
cfg = load_config(sys.argv[1], sys.argv[2:])
init_ray()
t0 = time.perf_counter()
ctx = prepare(cfg)
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({
    "wall_s": wall,
    "tokens": sum(v["new_tokens"] for v in ctx.versions),
    "stream_rows": sum(v["stream_rows"] for v in ctx.versions),
    "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def build_corpus(out: Path, mb_per_version: float, seed: int = 0, file_mb: float = 8.0) -> Path:
    """``mb_per_version`` MB of jsonl text per version (v1: stdlib code a-l, v2: m-z), in
    files of about ``file_mb`` MB, plus a small val split (built once per size)."""
    from raypath.corpus import build_embedded_corpus

    if (out / "v2" / "val" / "part-0000.jsonl").is_file():
        return out
    src = build_embedded_corpus(out.parent / "embedded")
    for v in ("v1", "v2"):
        docs = [json.loads(line)["text"] for line in (src / v / "train" / "part-000.jsonl").read_text().splitlines()]
        rng = random.Random(f"{seed}:{v}")
        (out / v / "train").mkdir(parents=True, exist_ok=True)
        written, part, n = 0, 0, 0
        f = open(out / v / "train" / f"part-{part:04d}.jsonl", "w")
        while written < mb_per_version * 1e6:
            text = f"# copy {n}\n" + rng.choice(docs)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
            if f.tell() > file_mb * 1e6:
                f.close()
                part += 1
                f = open(out / v / "train" / f"part-{part:04d}.jsonl", "w")
        f.close()
        (out / v / "val").mkdir(parents=True, exist_ok=True)
        (out / v / "val" / "part-0000.jsonl").write_text(
            (src / v / "val" / "part-000.jsonl").read_text())
    return out


def tokenizer(out: Path, corpus: Path) -> Path:
    """One tokenizer for every run (trained once on the 1x corpus's v1): the runs measure
    version preparation, not tokenizer training."""
    from raypath.tokenizer import iter_texts, train_tokenizer

    train_tokenizer(iter_texts([corpus / "v1" / "train"]), 4096, out)
    return out


# The driver's log line of each stage (raypath.data), and its name in the results.
STAGE_WORDS = {"validate": "validated and fingerprinted", "dedup": "deduplicated ", "tokenize": "tokenized and packed",
               "versions": "prepared "}


def run_prepare(corpus: Path, run_dir: Path, code: Path, actors: int, tok: Path, extra: tuple[str, ...] = ()) -> dict:
    overrides = [f"run_dir={run_dir}", f"data.corpus={corpus}", "data.versions=[v1, v2]", f"data.tokenizer={tok}",
                 "data.replay_ratio=0.25", f"data.tokenize_actors={actors}", "data.seq_len=128",
                 "data.vocab_size=4096", "train.global_batch_size=16", "train.micro_batch_size=16", *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / "configs" / "quickstart.yaml"), *overrides],
                          env=env, capture_output=True, text=True, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    out["stages_s"] = dict.fromkeys(STAGE_WORDS, 0.0)
    for ln in proc.stderr.splitlines():
        if ln.startswith(("raypath.data: ", "raypath.dedup: ")):
            print("  " + ln.split(": ", 1)[1], flush=True)
            stage = next((k for k, word in STAGE_WORDS.items() if word in ln), None)
            if stage and (m := re.search(r" in ([0-9.]+) s", ln)):
                out["stages_s"][stage] += float(m.group(1))
    out["process_s"] = time.perf_counter() - t0
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypath.storage import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = results["sizes"]
    tokens = [s["tokens"] / 1e6 for s in sizes]
    a.plot(tokens, [s["driver_peak_rss_mb"] for s in sizes], "o-")
    a.set(xlabel="corpus tokens (M)", ylabel="driver peak RSS (MB)", title="driver memory")
    a.set_ylim(bottom=0)
    b.plot(tokens, [s["tokens_per_s"] / 1e3 for s in sizes], "o-")
    b.set(xlabel="corpus tokens (M)", ylabel="prepare tokens/s (k)", title="throughput")
    b.set_ylim(bottom=0)
    fig.suptitle(f"version preparation (raypath {results.get('commit') or 'checkout'})")
    save_figure(fig, path)


def _commit(code: Path) -> str | None:
    """The measured checkout's commit, for the plot and the JSON (the path says nothing elsewhere)."""
    r = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/prepare_scale")
    ap.add_argument("--base-mb", type=float, default=10.0, help="MB of text per version at 1x")
    ap.add_argument("--scales", default="1,4,8")
    ap.add_argument("--actors", type=int, default=2, help="tokenize actors of the scale runs")
    ap.add_argument("--scaling-at", type=float, default=4, help="scale of the 1-vs-2-actor runs (0 = skip)")
    ap.add_argument("--scaling-repeats", type=int, default=3, help="1-then-2-actor pairs; the median pair counts")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose raypath is measured")
    args = ap.parse_args()
    out, code = Path(args.out).resolve(), Path(args.code).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {"code": str(code), "commit": _commit(code), "base_mb_per_version": args.base_mb,
               "sizes": [], "actors": {}}
    scales = [float(s) for s in args.scales.split(",")]
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        tokenizer(tok, build_corpus(out / "corpora" / f"x{scales[0]:g}", args.base_mb * scales[0]))
    for scale in scales:
        corpus = build_corpus(out / "corpora" / f"x{scale:g}", args.base_mb * scale)
        r = run_prepare(corpus, out / "runs" / f"x{scale:g}-a{args.actors}", code, args.actors, tok)
        results["sizes"].append({"scale": scale, "actors": args.actors, **r})
        print(f"x{scale:g}: {r['tokens'] / 1e6:.1f}M tokens, {r['wall_s']:.1f} s, "
              f"{r['tokens_per_s'] / 1e3:.0f}k tok/s, driver peak RSS {r['driver_peak_rss_mb']:.0f} MB", flush=True)
    if args.scaling_at:
        # 1 and 2 actors back to back, repeated: a pair shares the machine's load of the moment.
        corpus = build_corpus(out / "corpora" / f"x{args.scaling_at:g}", args.base_mb * args.scaling_at)
        results["actors"] = {"1": [], "2": []}
        for rep in range(args.scaling_repeats):
            for actors in (1, 2):
                run = out / "runs" / f"x{args.scaling_at:g}-scaling-a{actors}-r{rep}"
                r = run_prepare(corpus, run, code, actors, tok)
                results["actors"][str(actors)].append(r)
                print(f"{actors} actor(s) at x{args.scaling_at:g}: {r['tokens_per_s'] / 1e3:.0f}k tok/s "
                      f"({r['wall_s']:.1f} s)", flush=True)
        pairs = list(zip(*results["actors"].values()))
        results["actor_speedups"] = [two["tokens_per_s"] / one["tokens_per_s"] for one, two in pairs]
        results["actor_speedup"] = statistics.median(results["actor_speedups"])
        # The stage the actors run: the rest (validation, replay + shuffle + write) already
        # runs as Ray tasks on every core, whatever data.tokenize_actors says.
        results["tokenize_stage_speedups"] = [one["stages_s"]["tokenize"] / two["stages_s"]["tokenize"]
                                              for one, two in pairs]
        results["tokenize_stage_speedup"] = statistics.median(results["tokenize_stage_speedups"])
    first, last = results["sizes"][0], results["sizes"][-1]
    results["rss_growth_mb"] = last["driver_peak_rss_mb"] - first["driver_peak_rss_mb"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "prepare_scale.png")
    print(f"driver peak RSS growth {first['scale']:g}x -> {last['scale']:g}x: {results['rss_growth_mb']:+.0f} MB "
          f"(target <= 64 MB); 2-actor speedup {results.get('actor_speedup', float('nan')):.2f} (target >= 1.5), "
          f"of the tokenize stage {results.get('tokenize_stage_speedup', float('nan')):.2f}")


if __name__ == "__main__":
    main()
