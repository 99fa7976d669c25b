"""How long a law-guided sweep's Tune loop waits on the law's refits as trials finish.

Builds the synthetic run directory of ``benchmarks/long_run.py`` (``--versions`` versions, a
finished sweep of ``--trials`` trials each, no training), then does what a law-guided sweep of
the last version does in Tune's driver: the guide's first fit (the sweep's start), ``--warm``
finished trials added and the law's form and lambda chosen on them, then ``--together`` trials
finishing in one Tune iteration (as concurrent trials of one branch length do), each handed to
the sweep's refit callback. One thread stands in for Tune's loop, which calls both the callback
and the stopper: it hands over the finished trials, then every 10 ms asks the stopper for a
running trial's forecast (as each reported result does) until the last refit's fits are in place.

Reported: the seconds the callback's calls held the loop, the refits run, the seconds until the
last refit's fits were in place (and each split's Huber loss there, what its fit minimised), the
loop's longest gap between two stopper calls over that time (the first trial's end to the
refit's landing), the stopper calls it made meanwhile and their median (what a loop competing
with a refit in the same process pays).

    python benchmarks/sweep_refit.py --versions 5 10 --trials 100
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/sweep_refit.py --versions 5 10 --trials 100
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_run import over_run_dirs  # noqa: E402  (the same synthetic run directories)


class _Trial:
    """What the callback reads of a Tune trial that reached its branch's last step."""

    def __init__(self, trial_id: str, config: dict, objective: float):
        self.trial_id, self.config = trial_id, config
        self.last_result = {"step": config["fork_step"] + config["branch_steps"], "objective": objective}
        self.status = "TERMINATED"


def measure(run_dir: Path, last: str, warm: int, together: int) -> dict:
    from raypath import lawguide
    from raypath.lineage import Lineage

    rel = Lineage.load(run_dir).branch(f"branch-{last}")
    config = {"fork_step": rel.fork_step, "branch_steps": rel.steps, **rel.decay}
    curves = run_dir / "sweeps" / last / "guided" / "curves"
    curves.mkdir(parents=True, exist_ok=True)
    names = [f"g{i}" for i in range(warm + together)]
    for name in names:
        shutil.copy(rel.curve, curves / f"{name}.jsonl")
    refits, fit_run = [], lawguide.fit_run

    def counted(*args, **kwargs):
        refits.append(1)
        return fit_run(*args, **kwargs)

    lawguide.fit_run = counted
    t0 = time.perf_counter()
    guide = lawguide.LawGuide(run_dir, last, save=False)
    start = time.perf_counter() - t0
    stopper = lawguide.LawStopper(guide, margin=0.01)
    stopper.record_final("best", 0.0)  # a finished trial to beat: every forecast is computed
    callback = lawguide.LawRefitCallback(guide, curve_path=lambda tid: str(curves / f"{tid}.jsonl"),
                                         name=lambda tid: tid, stopper=stopper)
    for name in names[:warm]:
        guide.add_trial(name, config, curves / f"{name}.jsonl", refit=False)
    t0 = time.perf_counter()
    guide.refit()  # chooses the forms and lambda on the warm trials: the refits after keep them
    first_refit = time.perf_counter() - t0
    refits.clear()
    result = {"step": config["fork_step"] + config["branch_steps"] // 2, "objective": 10.0, "config": config,
              "fork_step": config["fork_step"], "branch_steps": config["branch_steps"]}
    stopper("running", result)  # the running trial's forecast, computed once per fit
    landed = getattr(guide, "wait", lambda timeout: True)  # the guide before background refits: at once
    t0 = time.perf_counter()
    for name in names[warm:]:
        callback.on_trial_complete(0, [], _Trial(name, config, 3.0))
    held = time.perf_counter() - t0
    calls = []
    while not landed(0):
        c0 = time.perf_counter()
        stopper("running", result)
        calls.append((c0, time.perf_counter() - c0))
        time.sleep(0.01)
    done = time.perf_counter()
    lawguide.fit_run = fit_run
    starts = [t0 + held] + [c[0] for c in calls] + [done]
    return {"points": sum(f.n_points for f in guide.fits.values()), "trials_fitted": len(guide.trials),
            "huber": {split: f.huber for split, f in guide.fits.items()},  # what each split's fit minimised
            "start_fit_s": round(start, 2), "first_refit_s": round(first_refit, 2),
            "loop_held_s": round(held, 2), "refits": len(refits), "landed_s": round(done - t0, 2),
            "loop_longest_gap_s": round(max([held] + [b - a for a, b in zip(starts, starts[1:])]), 3),
            "stopper_calls_during": len(calls),
            "stopper_median_ms": round(1e3 * statistics.median(c[1] for c in calls), 2) if calls else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--trials", type=int, default=100, help="trials of each earlier version's sweep")
    ap.add_argument("--warm", type=int, default=4, help="trials finished before, the law chosen on them")
    ap.add_argument("--together", type=int, default=3, help="trials finishing in one Tune iteration")
    args = ap.parse_args()
    over_run_dirs(__file__, args, lambda run_dir, n: measure(run_dir, f"v{n}", args.warm, args.together))


if __name__ == "__main__":
    main()
