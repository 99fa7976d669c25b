"""How long a segment takes to start: from the driver's ``fit_segment`` to its workers' first step.

Every main segment, release branch and sweep trial is one Ray Train run, and each starts the same
way: Ray Train's controller actor starts and unpickles the segment (its process imports what that
needs), requests the workers, the workers start (each imports the training loop: torch,
transformers), join a process group, build the model and restore the checkpoint, and the stream's
first blocks arrive. On a small model that start-up is most of a short segment's wall time.

Each round trains a fresh ``--steps``-step main segment of the tiny config's v1 (its own storage
and Ray Train run name, nothing to resume) and reports, as medians over ``--repeats`` rounds:

* ``ready_s``: ``fit_segment`` called -> the workers' ``start`` event (model built, state restored);
* ``fit_s``: the whole call, its steps and final checkpoint included.

    python benchmarks/segment_start.py --workers 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _start_event(curves: Path) -> float:
    for line in curves.read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "start":
            return row["time"]
    raise RuntimeError(f"{curves}: no start event")


def _round(ctx, workers: int, steps: int, tag: str) -> dict:
    from raypath.mainpath import main_segment
    from raypath.segment import fit_segment

    seg = main_segment(ctx, 0, None)
    name = f"start-{tag}"
    seg = dataclasses.replace(seg, name=name, end_step=steps, save_steps=(), stream_limit=None,
                              storage=str(ctx.rd.path / "ray" / name),
                              curves_path=str(ctx.rd.path / "curves" / f"{name}.jsonl"),
                              train=dataclasses.replace(seg.train, num_workers=workers, eval_every=0,
                                                        checkpoint_every=0))
    t0 = time.time()
    fit_segment(seg)
    fit_s = time.time() - t0
    return {"ready_s": _start_event(Path(seg.curves_path)) - t0, "fit_s": fit_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray Train worker counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", help="also write the results here as JSON")
    args = ap.parse_args()

    from raypath.cluster import init_ray
    from raypath.config import load_config
    from raypath.run import prepare

    init_ray(num_cpus=8)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp}/run", "data.versions=[v1]"])
        ctx = prepare(cfg)
        _round(ctx, 1, args.steps, "warm-up")  # Ray's own first-use costs (worker pool, Train's state actor)
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            rounds = [_round(ctx, workers, args.steps, f"{workers}-{r}") for r in range(args.repeats)]
            row = {"workers": workers, "steps": args.steps, "repeats": args.repeats,
                   **{k: round(statistics.median(r[k] for r in rounds), 2) for k in ("ready_s", "fit_s")}}
            rows.append(row)
            print(f"{workers} worker(s): fit -> workers ready {row['ready_s']:.2f} s, whole fit ({args.steps} steps) "
                  f"{row['fit_s']:.2f} s (median of {args.repeats})", file=sys.stderr, flush=True)
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "python": sys.version.split()[0], "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
