"""How well does the fitted scaling law predict branches it has not seen, and does it guide a sweep?

On the embedded default corpus (a quickstart-like config, shrunk by the options below):

1. run the lineage (main path + one release branch per version; resumable);
2. run extra branches of the last version: the :data:`POOL` of (shape, fraction, power,
   min_lr_ratio) -- fractions snap to the main path's checkpoints (``train.checkpoint_every``);
3. fit the law per validation split (:func:`raypath.lawfit.fit_run`) on the main path plus
   2 branches of the last version (the release branch and the first pool branch), predict
   the final val losses of the other pool branches and print the MAPE per split
   (target <= 1%), next to a naive baseline (the mean final loss of the 2 fitted branches);
4. guided vs unguided: the pool branches are the trials of an unguided sweep of the same
   total budget. The guided order starts from a fit on the main path + release branch,
   runs the candidate with the best predicted objective, refits on its curve, re-ranks the
   rest, and so on; the unguided order is random (expectation over orders). Reported: trials
   each needs to reach within 0.5% of the best objective of the pool (target: guided at
   most half of unguided).

Prints a JSON summary (also written to ``RUN_DIR/law/benchmark.json``) and the command.

    python benchmarks/law_accuracy.py --run-dir runs/law_bench
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: (shape, fraction, power, min_lr_ratio) of the extra branches of the last version.
#: The first one is fitted together with the release branch; the rest are held out.
POOL = [
    ("cosine", 0.10, 2.0, 0.1),
    ("linear", 0.30, 2.0, 0.0),
    ("1-sqrt", 0.40, 2.0, 0.0),
    ("exponential", 0.10, 4.0, 0.0),
    ("polynomial", 0.30, 2.0, 0.1),
    ("cosine", 0.20, 2.0, 0.0),
    ("1-sqrt", 0.30, 2.0, 0.0),
    ("linear", 0.05, 2.0, 0.0),
]
WEIGHTS = {"old": 0.5, "new": 0.5}
WITHIN = 0.005  # "within 0.5% of the best"


def _overrides(args) -> list[str]:
    versions = "[" + ",".join(args.versions.split(",")) + "]"
    return [f"run_dir={args.run_dir}", "name=law-bench", f"data.versions={versions}",
            f"data.max_docs_per_version={args.docs}", f"train.eval_every={args.eval_every}",
            f"train.checkpoint_every={args.checkpoint_every}", "branch.parallel=true", *args.set]


def branch_name(version: str, shape: str, fraction: float, power: float, min_lr: float) -> str:
    return f"bench-{version}-{shape}-f{fraction:g}-p{power:g}-m{min_lr:g}"


def _checkpoint_steps(storage: Path, start: int, end: int) -> list[int]:
    steps = []
    for d in storage.glob("step_*"):
        try:
            s = int(d.name.split("_", 1)[1])
        except ValueError:
            continue
        if start < s < end and (d / "manifest.json").is_file():
            steps.append(s)
    return sorted(steps)


def run_pool(cfg, lineage, log, parallel: int = 2) -> None:
    """Train the extra branches of the last version (skips those already in the lineage)."""
    from raypath.branches import BranchRunner, branch_segment
    from raypath.mainpath import fork_step
    from raypath.run import prepare
    from raypath.schedules import Decay

    ctx = prepare(cfg)
    k = len(ctx.versions) - 1
    version = ctx.versions[k]["name"]
    main = lineage.main(version)
    forks = _checkpoint_steps(Path(ctx.storage(main["segment"])), main["start_step"], main["end_step"])
    runner = BranchRunner(parallel=True)
    todo = []
    for shape, fraction, power, min_lr in POOL:
        name = branch_name(version, shape, fraction, power, min_lr)
        if lineage.branch(name):
            continue
        want = fork_step(main["start_step"], main["end_step"], fraction)
        fork = min(forks, key=lambda s: (abs(s - want), -s))
        log.info("branch %s: fork %d (wanted %d)", name, fork, want)
        todo.append(branch_segment(ctx, k, main, Decay(shape, min_lr, power), fork, name=name))
    # In waves: every Train worker holds a CPU, and Ray Data's read tasks need one too, so
    # too many branches at once deadlock a small cluster.
    for i in range(0, len(todo), parallel):
        for seg in todo[i:i + parallel]:
            runner.submit(seg)
        for entry in runner.finished(wait=True):
            lineage.record_branch({**entry, "benchmark": True})


def _objective(metrics: dict, weights: dict[str, float]) -> float:
    return float(sum(w * metrics[f"val/{s}"] for s, w in weights.items()))


def evaluate(run_dir: Path, lineage: dict) -> dict:
    from raypath import lawfit

    version = lineage["main_path"][-1]["version"]
    weights = lawfit.split_weights(lineage, version, WEIGHTS)
    release = next(b for b in lineage["branches"] if b["name"] == f"branch-{version}")
    pool = [b for b in lineage["branches"] if b.get("benchmark") and b["version"] == version]
    pool.sort(key=lambda b: [p[:4] for p in POOL].index(_spec(b)) if _spec(b) in [p[:4] for p in POOL] else 99)
    fit_names = [release["name"], pool[0]["name"]]
    held = pool[1:]

    # ---- (c) accuracy on held-out branches
    t0 = time.perf_counter()
    fits = lawfit.fit_run(lineage, version, run_dir=run_dir, branches=fit_names, save=False)
    fit_s = time.perf_counter() - t0
    splits = list(fits)
    rows, errors, naive_err = [], {s: [] for s in splits}, {s: [] for s in splits}
    fitted = [b for b in lineage["branches"] if b["name"] in fit_names]
    for b in held:
        pred = lawfit.predict_branch(fits, lineage, version, b["decay"]["shape"], fork_step=b["fork_step"],
                                     min_lr_ratio=b["decay"]["min_lr_ratio"], power=b["decay"]["power"],
                                     weights=weights)
        row = {"branch": b["name"], "fork_step": b["fork_step"], "steps": b["steps"]}
        for s in splits:
            actual = b["metrics"][f"val/{s}"]
            naive = float(np.mean([f["metrics"][f"val/{s}"] for f in fitted]))
            errors[s].append(abs(pred["predicted"][s] - actual) / actual * 100)
            naive_err[s].append(abs(naive - actual) / actual * 100)
            row[s] = {"actual": actual, "predicted": pred["predicted"][s]}
        row["objective"] = {"actual": _objective(b["metrics"], weights), "predicted": pred["objective"]}
        rows.append(row)
    accuracy = {
        "fit_on": ["main path", *fit_names],
        "held_out": len(held),
        "fit_seconds": round(fit_s, 2),
        "fits": {s: {"law": f.law, "r2": f.r2, "mape_fit": f.mape, "n_points": f.n_points,
                     "degenerate": f.degenerate} for s, f in fits.items()},
        "mape_final_loss": {s: float(np.mean(e)) for s, e in errors.items()},
        "max_ape_final_loss": {s: float(np.max(e)) for s, e in errors.items()},
        "naive_mape_final_loss": {s: float(np.mean(e)) for s, e in naive_err.items()},
        "objective_mape": float(np.mean([abs(r["objective"]["predicted"] - r["objective"]["actual"])
                                         / r["objective"]["actual"] * 100 for r in rows])),
        "rank_spearman": _spearman([r["objective"]["predicted"] for r in rows],
                                   [r["objective"]["actual"] for r in rows]),
        "branches": rows,
    }

    # ---- (d) guided vs unguided over the pool (release branch known to both)
    actual = {b["name"]: _objective(b["metrics"], weights) for b in pool}
    best = min(actual.values())
    good = {n for n, v in actual.items() if v <= best * (1 + WITHIN)}
    known = [release["name"]]
    order, remaining = [], list(pool)
    while remaining:
        fits_g = lawfit.fit_run(lineage, version, run_dir=run_dir, branches=known, save=False)
        scored = sorted(remaining, key=lambda b: (lawfit.predict_branch(
            fits_g, lineage, version, b["decay"]["shape"], fork_step=b["fork_step"],
            min_lr_ratio=b["decay"]["min_lr_ratio"], power=b["decay"]["power"], weights=weights)["objective"],
            b["name"]))
        pick = scored[0]
        order.append(pick["name"])
        remaining.remove(pick)
        known.append(pick["name"])
        if pick["name"] in good:
            break
    guided = len(order)
    n, g = len(pool), len(good)
    rng = np.random.default_rng(0)
    firsts = [next(i + 1 for i, j in enumerate(rng.permutation(n)) if pool[j]["name"] in good)
              for _ in range(2000)]
    guide = {
        "pool": n, "within": WITHIN, "best_objective": best, "good": sorted(good),
        "actual_objectives": actual,
        "guided_trials": guided, "guided_order": order,
        "unguided_expected_trials": (n + 1) / (g + 1),
        "unguided_median_trials": float(np.median(firsts)),
        "ratio_guided_to_unguided": guided / ((n + 1) / (g + 1)),
    }
    return {"version": version, "weights": weights, "accuracy": accuracy, "guided_vs_unguided": guide}


def _spec(b: dict) -> tuple:
    name = b["name"]
    for p in POOL:
        if branch_name(b["version"], *p) == name:
            return p[:4]
    return ()


def _spearman(a, b) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--run-dir", default="runs/law_bench")
    p.add_argument("--versions", default="v1,v2", help="comma-separated versions of the embedded corpus")
    p.add_argument("--docs", type=int, default=80, help="data.max_docs_per_version")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=10, help="fork points of the pool branches")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--parallel", type=int, default=2, help="pool branches trained at once")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log = logging.getLogger("law_accuracy")

    from raypath.config import load_config
    from raypath.lineage import Lineage

    cfg = load_config(args.config, _overrides(args))
    run_dir = Path(cfg.run_dir).resolve()
    t0 = time.perf_counter()
    if not args.eval_only:
        from raypath.cluster import init_ray
        from raypath.run import run

        init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
        lineage = run(cfg)
        log.info("lineage done in %.0f s", time.perf_counter() - t0)
        run_pool(cfg, lineage, log, args.parallel)
        log.info("pool done in %.0f s", time.perf_counter() - t0)
    lineage = Lineage.load(run_dir).data
    summary = evaluate(run_dir, lineage)
    summary["command"] = "python " + " ".join(shlex.quote(a) for a in [
        "benchmarks/law_accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    summary["train_seconds"] = round(time.perf_counter() - t0, 1) if not args.eval_only else None
    summary["size"] = {"versions": args.versions, "docs": args.docs, "eval_every": args.eval_every,
                       "checkpoint_every": args.checkpoint_every,
                       "steps": {m["version"]: m["end_step"] - m["start_step"] for m in lineage["main_path"]}}
    from raypath.storage import write_json

    write_json(run_dir / "law" / "benchmark.json", summary)
    acc, gd = summary["accuracy"], summary["guided_vs_unguided"]
    print(json.dumps(summary, indent=2, default=float))
    print("\nheld-out final-loss MAPE per split: "
          + ", ".join(f"{s} {v:.3f}% (naive {acc['naive_mape_final_loss'][s]:.3f}%)"
                      for s, v in acc["mape_final_loss"].items()))
    print(f"guided trials to within {WITHIN:.1%} of best: {gd['guided_trials']} vs unguided expected "
          f"{gd['unguided_expected_trials']:.2f} (pool {gd['pool']})")
    print(f"command: {summary['command']}")
    return 0 if all(math.isfinite(v) for v in acc["mape_final_loss"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
