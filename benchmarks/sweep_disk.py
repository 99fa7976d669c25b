"""What a sweep keeps on disk while it runs and once it ends, with and without ``sweep.keep_trials``.

Every finished trial of a sweep keeps its final checkpoint (its weights) and its exported model;
a trial the law stopped keeps none once the sweep records it. The disk a sweep holds therefore
grows with its trials. ``sweep.keep_trials: N`` deletes the weights of every finished trial past
the best N as soon as N better ones have finished; a trial that ends behind N finished ones
exports nothing.

This trains the tiny config's v1 main path with a wider model (``--hidden``, ``--layers``),
checkpointed every ``--every`` steps (the sweep's fork points), then runs the same real Ray Tune
sweep of v1 (``--trials`` trials, ``--concurrent`` at once, Optuna's seeded TPE, no law) once per
``--keep`` value, each under its own name, and samples the bytes under the sweep's ``branches/``
and ``exports/`` every 0.2 s: the peak while it ran and what is left at its end; and how many
trials exported a model (their last Tune result's ``exported``).

    python benchmarks/sweep_disk.py --trials 6 --keep 0 2
    # the same through another checkout's raypath (one without keep_trials: --keep 0)
    PYTHONPATH=/path/to/checkout python benchmarks/sweep_disk.py --trials 6 --keep 0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from branch_disk import DiskSampler, _bytes, emit, model_args, trained_v1  # noqa: E402  (the same wider model)


def _sweep(ctx, trials: int, concurrent: int, keep: int) -> dict:
    """The sweep ``keep<N>`` of v1 run to its end, with the disk its trials held."""
    from ray import tune

    from raypath.sweep import run_sweep

    name = f"keep{keep}"
    overrides = {"name": name, "num_samples": trials, "max_concurrent": concurrent, "guide": "none", "seed": 0}
    if keep:  # a checkout without the setting runs --keep 0 only
        overrides["keep_trials"] = keep
    cfg = dataclasses.replace(ctx.cfg, sweep=dataclasses.replace(ctx.cfg.sweep, **overrides))
    sweep_dir = ctx.run_dir / "sweeps" / "v1" / name
    t0 = time.perf_counter()
    with DiskSampler([sweep_dir / "branches", sweep_dir / "exports"]) as disk:
        record = run_sweep(cfg, "v1")
    seconds = round(time.perf_counter() - t0, 1)
    done = [t for t in record["trials"] if t["status"] == "done"]
    # what each trial's last Tune result says (a checkout that always exported has no such field)
    finals = [t.last_result for t in tune.ExperimentAnalysis(str(sweep_dir)).trials if t.last_result.get("final")]
    row = {"keep_trials": keep, "trials": len(record["trials"]), "done": len(done),
           "pruned": sum(bool(t.get("pruned")) for t in done),
           "exported": sum(bool(r.get("exported", True)) for r in finals),
           "peak_bytes": disk.peak, "end_bytes": disk.now(), "released": record.get("released"), "seconds": seconds}
    print(f"{name}: {row['done']} trials done, {row['exported']} exported, {row['pruned']} pruned; peak "
          f"{disk.peak / 1e6:.1f} MB, end {row['end_bytes'] / 1e6:.1f} MB ({seconds} s)", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--keep", type=int, nargs="+", default=[0, 2], help="sweep.keep_trials values, one sweep each")
    ap.add_argument("--every", type=int, default=16, help="train.checkpoint_every of the main path and branches")
    model_args(ap)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ctx, main_v1 = trained_v1(f"{tmp}/run", args, f"train.checkpoint_every={args.every}")
        rows = [_sweep(ctx, args.trials, args.concurrent, keep) for keep in args.keep]
        out = {"trials": args.trials, "concurrent": args.concurrent,
               "checkpoint_bytes": _bytes(Path(main_v1.checkpoints["end"])), "sweeps": rows}
    emit(args, out)


if __name__ == "__main__":
    main()
