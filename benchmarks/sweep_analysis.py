"""What a notebook's analysis of a sweep in a bucket downloads, call after call.

A notebook on a machine that never saw the run reads a sweep by its URI
(``raypath.analysis.load_sweep("s3://.../sweeps/v2/sweep")``) and then re-runs its cells as the
sweep goes on. This writes a sweep directory of ``--trials`` trials to a moto S3 server on
loopback, as a sweep leaves it (``sweep.json``; per trial Tune's ``params.json``,
``result.json`` and ``progress.csv``, its curve of ``--curve-lines`` records, ``--ckpt-objects``
checkpoint objects; a tenth of the trials unfinished), waits until its objects are
``raypath.mirror.SETTLED_S`` old (as a sweep's finished trials are when someone looks), then
times a notebook's calls in one process against a fresh mirror and counts, from moto's request
log, the requests of each (listing pages, HEADs, GETs) and the bytes it downloaded:

1. ``load_sweep(uri, curves=False)``: the trials table only;
2. the same again;
3. ``load_sweep(uri)`` and ``main_objective(uri)``: the curves too, and the main path's;
4. the same again;

and, each into a mirror of its own, what a driver's start on the run pulls of the sweep:
``raypath sweep``'s (``RunDir.open(run_uri, create=True)``: the law-guided sweep fits on the
trials' curves) and ``raypath run``'s (``raypath.run._open_run_dir``: the sweep's records only;
through a checkout older than that, the same call as the sweep's).

    python benchmarks/sweep_analysis.py --trials 300
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/sweep_analysis.py --trials 300
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import start  # noqa: E402
from sweep_upload import _requests  # noqa: E402

FORK, TOKENS_PER_STEP = 800, 4_096


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _sweep_files(trials: int, curve_lines: int) -> dict[str, bytes]:
    """Relative path under the run directory -> content, of a sweep of ``trials`` trials whose
    branches log ``curve_lines`` steps (an unfinished one half of them)."""
    sweep, end = "sweeps/v2/sweep", FORK + curve_lines
    files = {f"{sweep}/sweep.json": json.dumps({
        "name": "sweep", "version": "v2", "version_index": 1, "path": sweep, "run_dir": ".",
        "main_segment": "main-v2", "main_curve": "curves/main-v2.jsonl", "main_start_step": 0,
        "main_end_step": end, "tokens_start": 0, "version_tokens": end * TOKENS_PER_STEP,
        "tokens_per_step": TOKENS_PER_STEP, "segment_prefix": "branch-v2-",
        "objective_weights": {"v1": 0.5, "v2": 0.5}}).encode(),
        "curves/main-v2.jsonl": _jsonl({"step": s, "tokens": s * TOKENS_PER_STEP, "lr": 3e-4, "loss": 3.0,
                                        **({"val/v1": 3.1, "val/v2": 3.0} if s == end else {})}
                                       for s in [*range(0, end, 10), end]),
        "lineage.json": b"{}"}
    for i in range(trials):
        tid, done = f"{i:08x}", i % 10 != 9
        files[f"{sweep}/trial_{tid}/params.json"] = json.dumps({
            "shape": "cosine", "power": 1.0, "min_lr_ratio": 0.1, "replay_ratio": 0.0, "fraction": 0.2,
            "fraction_actual": 0.2, "fork_step": FORK, "branch_steps": end - FORK,
            "branch_tokens": (end - FORK) * TOKENS_PER_STEP}).encode()
        last = end if done else FORK + curve_lines // 2
        files[f"{sweep}/trial_{tid}/result.json"] = _jsonl(
            {"step": s, "loss": 2.9, "val/v1": 3.0, "val/v2": 2.9, "objective": 2.95, "score": 2.95 + i * 1e-6,
             "penalty": 0.0, "training_iteration": n} for n, s in enumerate(range(last, FORK, -20)[::-1]))
        files[f"{sweep}/trial_{tid}/progress.csv"] = b"step,loss\n" + b"1000,2.9\n" * 50
        files[f"{sweep}/curves/branch-v2-{tid}.jsonl"] = _jsonl(
            {"step": s, "tokens": s * TOKENS_PER_STEP, "lr": 1e-4, "loss": 2.9} for s in range(FORK + 1, last + 1))
    return files


def _measure(calls, log: Path) -> dict:
    from raypath.mirror import Mirror

    got, download = [], Mirror._download

    def counting(self, src, dst, *info):
        download(self, src, dst, *info)
        got.append(dst.stat().st_size)

    Mirror._download = counting
    try:
        time.sleep(0.2)  # moto's log lines of what came before land
        first = len(log.read_text().splitlines())
        t0 = time.perf_counter()
        calls()
        seconds = time.perf_counter() - t0
        time.sleep(0.2)
    finally:
        Mirror._download = download
    return {**_requests(log.read_text().splitlines()[first:]), "files": len(got), "bytes": sum(got),
            "seconds": round(seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--curve-lines", type=int, default=200, help="records of a trial's curve")
    ap.add_argument("--ckpt-objects", type=int, default=20, help="a trial's checkpoint objects in the bucket")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds after which an object counts as settled (default raypath.mirror.SETTLED_S, "
                         "waited for; 0 for a quick check)")
    args = ap.parse_args()
    import boto3

    from raypath import analysis, sweep  # noqa: F401 (sweep: imported by a first call, not its cost)
    from raypath import mirror as mirror_module
    from raypath.mirror import RunDir

    settle = getattr(mirror_module, "SETTLED_S", 0.0) if args.settle is None else args.settle
    mirror_module.SETTLED_S = settle
    with tempfile.TemporaryDirectory(prefix="sweep-analysis-") as tmp:
        log = Path(tmp, "moto.log")
        endpoint, moto = start(log)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ["HOME"] = tmp  # the notebook's default mirror: ~/.cache/raypath/s3/bench/run
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint)  # one PUT an object (pyarrow's: three)
            s3.create_bucket(Bucket="bench")
            for rel, data in _sweep_files(args.trials, args.curve_lines).items():
                s3.put_object(Bucket="bench", Key=f"run/{rel}", Body=data)
            for i in range(args.trials):
                for j in range(args.ckpt_objects):  # Ray Train's, straight to the bucket
                    s3.put_object(Bucket="bench", Key=f"run/sweeps/v2/sweep/branches/branch-v2-{i:08x}/o{j}",
                                  Body=b"x" * 64)
            time.sleep(settle + 1)
            uri = "s3://bench/run/sweeps/v2/sweep"

            def whole() -> None:
                trials, curves = analysis.load_sweep(uri)
                assert len(trials) == curves["trial_id"].nunique() == args.trials
                analysis.main_objective(uri)

            def table() -> None:
                assert len(analysis.load_sweep(uri, curves=False)[0]) == args.trials

            def driver_start() -> None:
                RunDir.open("s3://bench/run", str(Path(tmp, "driver")), create=True)

            def run_start() -> None:
                try:
                    RunDir.open("s3://bench/run", str(Path(tmp, "runner")), create=True, sweep_curves=False)
                except TypeError:  # a checkout whose `raypath run` started as a sweep does
                    RunDir.open("s3://bench/run", str(Path(tmp, "runner")), create=True)

            calls = {"trials table (curves=False), first call": _measure(table, log),
                     "trials table (curves=False), again": _measure(table, log),
                     "trials + curves + main_objective": _measure(whole, log),
                     "trials + curves + main_objective, again": _measure(whole, log),
                     "a driver's start on the run (raypath sweep)": _measure(driver_start, log),
                     "a driver's start on the run (raypath run)": _measure(run_start, log)}
        finally:
            moto.kill()
    settled = "" if args.settle is None else f" --settle {args.settle:g}"
    print(json.dumps({
        "command": f"python benchmarks/sweep_analysis.py --trials {args.trials} --curve-lines {args.curve_lines} "
                   f"--ckpt-objects {args.ckpt_objects}{settled}",
        "raypath": os.environ.get("PYTHONPATH") or "this checkout",
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "calls": calls}, indent=2))


if __name__ == "__main__":
    main()
