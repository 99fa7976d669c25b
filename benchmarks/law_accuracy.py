"""How well does the fitted scaling law predict branches it has not seen, and does it guide a sweep?

On the embedded default corpus, or (``--corpus system``) on a corpus whose versions are
different kinds of system text (licences, manual pages, C headers, shell scripts:
``benchmarks/system_corpus.py``), with a quickstart-like config shrunk by the options below:

1. run the lineage (main path + one release branch per version; resumable);
2. real branch searches of the last version, each with the same number of trials
   (``raypath.sweep.run_sweep``): a **guided** one (``sweep.guide=law``: the law, fitted on
   the main path and the release branches only, picks the first trials, stops trials that
   cannot win, refits after each) and one **unguided** one (``sweep.guide=none``: TPE)
   per seed of ``--unguided-seeds``;
3. guided vs unguided, per unguided seed: the best final objective B of that sweep; the
   trials (in Optuna's order) the guided sweep and that sweep needed to reach a final
   objective within 0.5% of B; then the means over seeds and the target "guided at most
   half" against the budget and the unguided counts (``acceptance``), and the branch
   tokens each spent;
4. accuracy: fit the law per validation split on the main path, the last version's release
   branch and one unguided trial, predict the final val losses of the other unguided
   trials (random/TPE configurations: a fair held-out set); every trial takes its turn as
   the fitted one. Prints the MAPE per split (target <= 1%), next to a naive baseline (the
   mean final loss of the two fitted branches), for lambda=auto and the paper's 0.999;
   ``--fit-releases all`` fits on every version's release branch instead of the last one's;
5. with ``--shifts single,auto`` (the default from three versions on), the same for the
   single-shift CPT law and the multi-shift one (``raypath.lawfit.fit_run(shifts=...)``,
   the multi-shift fit reusing the lambda the single-shift one chose), plus each law's fit
   of the whole lineage (main path + release branches, and + every sweep trial as
   ``raypath law fit`` sees it): R^2 and MAPE per split, side by side.

Prints a JSON summary (also written to ``RUN_DIR/law/benchmark.json``) and the command, and
plots the best objective so far per trial and per branch token (``RUN_DIR/law/benchmark.png``).

``--lr-scan LRS`` does none of that: it trains the lineage at each peak LR and reports which
trains best, and how the law fits each (:func:`lr_scan`); the benchmark runs at that LR.

    python benchmarks/law_accuracy.py --run-dir runs/law_bench
    python benchmarks/law_accuracy.py --run-dir runs/law_bench4 --corpus system --versions v1,v2,v3,v4
    python benchmarks/law_accuracy.py --run-dir runs/law_lrscan --corpus system --versions v1,v2,v3,v4 \
        --lr-scan 7.5e-4,1.05e-3,1.5e-3,2.1e-3,3e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for annotations only: raypath is imported inside the functions, as everywhere here
    from raypath.lineage import Branch, Lineage

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"old": 0.5, "new": 0.5}
WITHIN = 0.005  # "within 0.5% of the best": the acceptance measure
TOLERANCES = (0.001, 0.002, 0.005, 0.01)  # also reported: 0.5% is loose in a flat landscape


def _overrides(args) -> list[str]:
    versions = "[" + ",".join(args.versions.split(",")) + "]"
    corpus = [] if args.corpus == "embedded" else [f"data.corpus={system_corpus(args)}"]
    return [f"run_dir={args.run_dir}", "name=law-bench", f"data.versions={versions}", *corpus,
            f"data.max_docs_per_version={args.docs}", f"train.eval_every={args.eval_every}",
            f"train.checkpoint_every={args.checkpoint_every}", "branch.parallel=true",
            "sweep.max_concurrent=2", *args.set]


def system_corpus(args) -> Path:
    """The system-text corpus beside the run directory, built once (a trained version's files
    must not change, so a resumed benchmark reuses it as it is)."""
    spec = importlib.util.spec_from_file_location("system_corpus", ROOT / "benchmarks" / "system_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = Path(f"{args.run_dir.rstrip('/')}-corpus").resolve()
    if not (out / "corpus.json").is_file():
        mod.build_system_corpus(out, max_docs=args.docs, max_chars=args.corpus_chars,
                                val_fraction=args.val_fraction)
    return out


def run_sweeps(cfg, samples: int, guided_name: str, seeds: list[int], log) -> dict[str, dict]:
    """One unguided sweep per seed, then the guided sweep (all resumable: a finished sweep
    is read back, not rerun; the accuracy fits need the unguided ones only).

    The guided sweep fits the law on the main path and the release branches only
    (``sweep.guide_sweeps=false``), so it never sees another sweep's trials whichever ran
    first. One unguided sweep is a single draw of TPE's random start: in a flat landscape
    its first trial alone may land near its best, so the count is averaged over seeds."""
    from raypath.sweep import run_sweep

    version = cfg.data.versions[-1]
    out = {}
    names = sweep_names(guided_name, seeds, cfg.sweep.seed)
    for key, (name, seed) in sorted(names.items(), key=lambda kv: kv[0] == "guided"):
        guide = "law" if key == "guided" else "none"
        sc = dataclasses.replace(cfg.sweep, name=name, guide=guide, num_samples=samples, seed=seed,
                                 guide_sweeps=guide == "none")  # an unguided sweep keeps the default
        t0 = time.perf_counter()
        out[key] = run_sweep(dataclasses.replace(cfg, sweep=sc), version)
        log.info("%s sweep: %d trials in %.0f s", name, len(out[key]["trials"]), time.perf_counter() - t0)
    return out


def sweep_names(guided_name: str, seeds: list[int], guided_seed: int | None = None) -> dict[str, tuple]:
    """Result key -> (sweep name, TPE seed): ``guided``, then ``unguided-s<seed>`` per seed.
    The seed-0 sweep keeps the name ``unguided`` of the earlier runs."""
    names = {"guided": (guided_name, guided_seed)}
    names.update({f"unguided-s{s}": ("unguided" if s == 0 else f"unguided-s{s}", s) for s in seeds})
    return names


def unguided(sweeps: dict[str, dict]) -> dict[str, dict]:
    return {k: v for k, v in sweeps.items() if k != "guided"}


def release_branch(lineage) -> tuple[str, Branch, dict]:
    """The last version, its configured release branch and the objective's split weights
    (``lineage``: anything :meth:`raypath.lineage.Lineage.of` reads)."""
    from raypath import lawfit
    from raypath.lineage import Lineage

    lineage = Lineage.of(lineage)
    version = lineage.main_path()[-1].version
    release = lineage.branch(f"branch-{version}")
    if release is None:
        raise ValueError(f"{version} has no release branch branch-{version}: run the lineage first")
    return version, release, lawfit.split_weights(lineage, version, WEIGHTS)


def _order(trial: dict) -> int:
    return trial["order"]  # the order Optuna proposed it (raypath.sweep.proposal_order)


def trials_to_reach(record: dict, target: float) -> int | None:
    """1-based count of proposed trials until one finished with objective <= target."""
    for i, t in enumerate(sorted(record["trials"], key=_order), 1):
        if t["status"] == "done" and t["objective"] is not None and t["objective"] <= target:
            return i
    return None


def _best(record: dict) -> float:
    return min(t["objective"] for t in record["trials"] if t["status"] == "done")


def _rows(record: dict) -> list[dict]:
    return [{"trial": _order(t), "trial_id": t["trial_id"], "status": t["status"],
             "shape": t["config"].get("shape"), "power": t["config"].get("power"),
             "fraction": t["config"].get("fraction_actual"), "min_lr_ratio": t["config"].get("min_lr_ratio"),
             "objective": t.get("objective"), "objective_at_stop": t.get("objective_at_stop"),
             "branch_tokens": t.get("branch_tokens")}
            for t in sorted(record["trials"], key=_order)]


def _counts(guided: dict, unguided: dict, within: float) -> dict:
    """Trials each needed to reach within ``within`` of this unguided sweep's best."""
    target = _best(unguided) * (1 + within)
    return {"guided": trials_to_reach(guided, target), "unguided": trials_to_reach(unguided, target)}


def guided_vs_unguided(sweeps: dict[str, dict]) -> dict:
    """Per unguided seed s: the trials the guided sweep and unguided sweep s needed to come
    within 0.5% of sweep s's best (a guided sweep that never gets there counts as its
    number of trials + 1); then the means over seeds and their ratio; the same at the other
    ``TOLERANCES``; and the target read every way (``acceptance``)."""
    guided, seeds = sweeps["guided"], unguided(sweeps)
    miss = len(guided["trials"]) + 1
    within = {w: {k: _counts(guided, u, w) for k, u in seeds.items()} for w in TOLERANCES}

    def means(per_seed: dict) -> dict:
        g = float(np.mean([c["guided"] or miss for c in per_seed.values()]))
        u = float(np.mean([c["unguided"] for c in per_seed.values()]))
        return {"guided": g, "unguided": u, "ratio": g / u}

    m = means(within[WITHIN])
    return {
        "within": WITHIN,
        "acceptance": acceptance(seeds, m),
        "unguided_best_objective": {k: _best(u) for k, u in seeds.items()},
        "guided_best_objective": min((t["objective"] for t in guided["trials"] if t["status"] == "done"),
                                     default=None),
        "trials_to_target": within[WITHIN],
        # the target: the guided sweep's first trial alone within 0.5% of each unguided best
        "guided_first_trial_within": {k: c["guided"] == 1 for k, c in within[WITHIN].items()},
        "mean_guided": m["guided"], "mean_unguided": m["unguided"], "ratio_guided_to_unguided": m["ratio"],
        "trials_to_within": {f"{w:.1%}": per for w, per in within.items()},
        "mean_trials_to_within": {f"{w:.1%}": means(per) for w, per in within.items()},
        "guided_points": guided.get("guide", {}).get("points"),
        "guided_stopped": guided.get("stopped", []),
        "search_tokens": {name: sw["search_tokens"] for name, sw in sweeps.items()},
        "trials": {name: _rows(sw) for name, sw in sweeps.items()},
    }


def acceptance(seeds: dict[str, dict], means: dict) -> dict:
    """The acceptance target, "the guided sweep needs at most half", against each thing "half"
    can be of: the sweeps' trial budget; the trials each unguided sweep needed to find the
    best it reports; the trials it needed to come within 0.5% of that best itself (the
    strictest, and in a flat landscape the one no search can halve: see the README).
    ``means``: the mean trials to within 0.5%, guided and unguided."""
    budget = min(len(u["trials"]) for u in seeds.values())
    to_best = {k: trials_to_reach(u, _best(u)) for k, u in seeds.items()}
    mean_guided = means["guided"]
    readings = {"of the trial budget": budget,
                "of the trials unguided needed to find its best": float(np.mean(list(to_best.values()))),
                f"of the trials unguided needed to come within {WITHIN:.1%} of its best": means["unguided"]}
    return {"mean_guided_trials_within": mean_guided, "budget": budget, "unguided_trials_to_best": to_best,
            "readings": {name: {"of": whole, "half": whole / 2, "ratio": mean_guided / whole,
                                "met": mean_guided <= whole / 2} for name, whole in readings.items()}}


def release_objective(lineage: Lineage) -> float:
    """The configured release branch's objective: its final val losses, weighed like a trial's."""
    _, release, weights = release_branch(lineage)
    return float(sum(w * release.metrics[f"val/{s}"] for s, w in weights.items()))


def plot_search(sweeps: dict[str, dict], out_png: Path, release: float | None = None) -> Path:
    """Best objective so far against trials (left) and branch tokens spent (right), the
    guided sweep over every unguided seed, with the 0.5% band above the unguided bests
    and the release branch every search starts from (``release``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from raypath.report import si
    from raypath.storage import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.8), sharey=True)
    seeds = list(unguided(sweeps))
    colors = dict(zip(seeds, plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(seeds)))))  # no red: guided's
    for key, record in sweeps.items():
        trials = sorted(record["trials"], key=_order)
        obj = [t["objective"] if t["status"] == "done" and t["objective"] is not None else np.inf for t in trials]
        best = np.minimum.accumulate(obj)
        tokens = np.cumsum([t.get("branch_tokens") or 0 for t in trials])
        style = ({"color": "crimson", "lw": 2.4, "zorder": 4} if key == "guided"
                 else {"color": colors[key], "lw": 1.2, "alpha": 0.75})
        for ax, x in zip(axes, (np.arange(1, len(trials) + 1), tokens)):
            ax.step(x, np.where(np.isfinite(best), best, np.nan), where="post", marker="o", ms=4, label=key, **style)
    bests = [_best(sweeps[k]) for k in seeds]
    for ax in axes:
        ax.axhspan(min(bests), max(bests) * (1 + WITHIN), color="0.85", zorder=0,
                   label=f"within {WITHIN:.1%} of the unguided bests")
        if release is not None:
            ax.axhline(release, color="black", ls="--", lw=1, label="release branch (configured decay)")
        ax.grid(True, alpha=0.3)
    axes[0].set_xlabel("trials, in the order Optuna proposed them")
    axes[1].set_xlabel("branch tokens spent by the search")
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda v, _p: si(v) if v else "0"))
    axes[0].set_ylabel("best final objective so far")
    axes[1].legend(fontsize=8, frameon=False, loc="upper right")
    fig.suptitle("law-guided vs unguided branch search")
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return out_png


def _held_out(run_dir: Path, lineage: Lineage, version: str, weights: dict, fit_on: list[str], fitted: dict,
              held: list[dict], lam, shifts: str) -> dict:
    """Fit on the main path, the branches ``fit_on`` and ``fitted``; predict every trial of ``held``."""
    from raypath import lawfit

    fits = lawfit.fit_run(lineage, version, run_dir=run_dir, branches=[*fit_on, fitted["name"]],
                          lam=lam, shifts=shifts, save=False)
    fitted_metrics = [b.metrics for b in lineage.branches(done=False) if b.name in fit_on] + [fitted["metrics"]]
    naive = {s: float(np.mean([m[f"val/{s}"] for m in fitted_metrics if f"val/{s}" in m])) for s in fits}
    rows = []
    for t in held:
        c = t["config"]
        pred = lawfit.predict_branch(fits, lineage, version, c["shape"], fork_step=c["fork_step"],
                                     min_lr_ratio=c["min_lr_ratio"], power=c.get("power") or 2.0, weights=weights)
        row = {"trial": _order(t), "shape": c["shape"], "fork_step": c["fork_step"], "steps": c["branch_steps"],
               "min_lr_ratio": c["min_lr_ratio"],
               # the trial's own objective: the loop weighs its val losses with the same split weights
               "objective": {"actual": t["objective"], "predicted": pred["objective"]}}
        for s in fits:
            actual = t["metrics"][f"val/{s}"]
            row[s] = {"actual": actual, "predicted": pred["predicted"][s],
                      "ape": abs(pred["predicted"][s] - actual) / actual * 100,
                      "naive_ape": abs(naive[s] - actual) / actual * 100}
        rows.append(row)
    return {"fitted_trial": _order(fitted), "splits": list(fits), "lam": {s: f.lam for s, f in fits.items()},
            "law": {s: f.law for s, f in fits.items()}, "r2": {s: f.r2 for s, f in fits.items()},
            "degenerate": {s: f.degenerate for s, f in fits.items()},
            "held_out": {s: f.held_out for s, f in fits.items()},
            "held_out_errors": {s: f.held_out_errors for s, f in fits.items()},
            "held_out_bic": {s: f.held_out_bic for s, f in fits.items()},
            "spearman": _spearman([r["objective"]["predicted"] for r in rows],
                                  [r["objective"]["actual"] for r in rows]),
            "branches": rows}


def _summary(rots: list[dict], seconds: float) -> dict:
    rows = [r for rot in rots for r in rot["branches"]]
    splits = rots[0]["splits"] if rots else []
    return {
        "fit_seconds": round(seconds, 1),
        "mape_final_loss": {s: float(np.mean([r[s]["ape"] for r in rows])) for s in splits},
        "max_ape_final_loss": {s: float(np.max([r[s]["ape"] for r in rows])) for s in splits},
        "mean_bias_pct": {s: float(np.mean([(r[s]["predicted"] - r[s]["actual"]) / r[s]["actual"] * 100
                                            for r in rows])) for s in splits},
        "naive_mape_final_loss": {s: float(np.mean([r[s]["naive_ape"] for r in rows])) for s in splits},
        "fit_r2_mean": {s: float(np.mean([rot["r2"][s] for rot in rots])) for s in splits},
        "objective_mape": float(np.mean([abs(r["objective"]["predicted"] - r["objective"]["actual"])
                                         / r["objective"]["actual"] * 100 for r in rows])),
        "rank_spearman_mean": float(np.nanmean([rot["spearman"] for rot in rots])),
        "rotations": rots,
    }


def fit_releases(lineage, which: str) -> list[str]:
    """The configured release branches the accuracy fits use: the last version's (``last``)
    or every version's (``all``: what a sweep's guide fits on)."""
    from raypath.lineage import Lineage

    lineage = Lineage.of(lineage)
    _, release, _ = release_branch(lineage)
    if which == "last":
        return [release.name]
    names = {f"branch-{m.version}" for m in lineage.main_path()}
    return [b.name for b in lineage.branches(done=False) if b.name in names]


def accuracy(run_dir: Path, lineage: Lineage, sweeps: list[dict], *, lams=("auto", 0.999), shifts=("auto",),
             releases: str = "last", rotations: int | None = None) -> dict:
    """Held-out accuracy, averaged over which unguided trial is the second fitted branch.

    Each finished unguided trial (the first ``rotations`` of them in proposal order, all by
    default) takes its turn as the fitted one (with the main path and the release
    branches ``releases``); the law then predicts the final val losses of all the others.
    One fixed choice would make the number depend on whether that trial happened to be
    short or long (a law fitted on short decays extrapolates to long ones). Reported for
    the default momentum decay (``auto``: chosen per split by leave-one-branch-out) and
    for the paper's fixed 0.999, and per ``shifts`` mode of :func:`raypath.lawfit.fit_run`
    (a later mode reuses the lambda the first one chose in the same rotation: lambda is
    chosen on the single-shift problems, so it would come out the same).
    """
    version, _, weights = release_branch(lineage)
    fit_on = fit_releases(lineage, releases)
    trials = [t for sw in sweeps for t in sorted(sw["trials"], key=_order) if t["status"] == "done"]
    fitted = trials[:rotations] if rotations else trials
    out = {"fit_on": f"main path + release branches {fit_on} + each unguided trial in turn",
           "rotations": len(fitted), "held_out_per_rotation": len(trials) - 1}
    for lam in lams:
        rots = {mode: [] for mode in shifts}
        seconds = dict.fromkeys(shifts, 0.0)
        for k in fitted:
            held = [t for t in trials if t is not k]
            chosen = lam
            for mode in shifts:
                t0 = time.perf_counter()
                rot = _held_out(run_dir, lineage, version, weights, fit_on, k, held, chosen, mode)
                seconds[mode] += time.perf_counter() - t0
                rots[mode].append(rot)
                chosen = next(iter(rot["lam"].values()))
        for mode in shifts:
            key = f"lam={lam}" if len(shifts) == 1 else f"lam={lam},shifts={mode}"
            out[key] = _summary(rots[mode], seconds[mode])
    return out


def lineage_fits(run_dir: Path, lineage: Lineage, shifts=("single", "auto"), pools=("releases", "all")) -> dict:
    """Each law's fit of the whole lineage for releasing its last version, per split: on the
    main path and the release branches (pool ``releases``: what a sweep's guide fits on), and
    with every sweep trial too (``all``: what ``raypath law fit RUN_DIR`` fits on). A later
    mode reuses the lambda the first one chose (as :func:`accuracy` does)."""
    from raypath import lawfit

    version, _, _ = release_branch(lineage)
    out = {}
    for pool in pools:
        include_sweeps = pool == "all"
        lam = "auto"
        for mode in shifts:
            t0 = time.perf_counter()
            fits = lawfit.fit_run(lineage, version, run_dir=run_dir, include_sweeps=include_sweeps, shifts=mode,
                                  lam=lam, save=False)
            lam = next(iter(fits.values())).lam  # chosen on the single-shift problems: the same for every mode
            out[f"{pool},shifts={mode}"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "splits": {s: {"law": f.law, "r2": f.r2, "mape": f.mape, "n_points": f.n_points, "lam": f.lam,
                               "held_out": f.held_out, "degenerate": f.degenerate, "outliers": f.outliers,
                               "outlier_share": f.outlier_share, "r2_ceiling": f.r2_ceiling,
                               "boundaries": lawfit.boundaries(lineage, s, version)} for s, f in fits.items()}}
    return out


def scan_row(run_dir: Path, lineage: Lineage, lr: float) -> dict:
    """One peak LR of ``--lr-scan``, read from its finished lineage: the release objective,
    each split's release-branch final loss, the main path's robust noise per split
    (:func:`raypath.law.noise_scale`: the jitter between evaluations) and the law's fit of
    the main path and the release branches (``shifts=auto``) with its R^2 and noise ceiling."""
    from raypath import law, lawfit

    version, release, _ = release_branch(lineage)
    fits = lineage_fits(run_dir, lineage, shifts=("auto",), pools=("releases",))["releases,shifts=auto"]
    noise = {s: law.noise_scale(lawfit.curves_from_lineage(lineage, s, run_dir=run_dir, branches=[]))
             for s in lawfit.splits_for(lineage, version)}
    return {"lr": lr, "run_dir": str(run_dir), "release_objective": release_objective(lineage),
            "release_losses": {s: release.metrics[f"val/{s}"] for s in noise}, "main_noise": noise,
            "fit_seconds": fits["seconds"],
            "fits": {s: {k: f[k] for k in ("law", "r2", "r2_ceiling", "mape", "n_points")}
                     for s, f in fits["splits"].items()}}


def lr_scan(args, lrs: list[float], log) -> dict:
    """``--lr-scan``: the lineage (no sweeps) trained at each peak LR, in ``RUN_DIR/lr=LR`` on
    one corpus, and read by :func:`scan_row`. Why: the law benchmark describes the training it
    is given; above the model's best LR the main path's losses jump between evaluations, the
    releases end higher and R^2 measures the jitter, so the benchmark's LR is the scan's best.
    Costs one lineage per LR (its training grows with the corpus) plus one fit each."""
    from raypath.cluster import init_ray
    from raypath.config import load_config
    from raypath.lineage import Lineage
    from raypath.run import run

    root = Path(args.run_dir).resolve()
    rows = []
    for lr in lrs:
        cfg = load_config(args.config, [*_overrides(args), f"run_dir={root / f'lr={lr:g}'}", f"train.max_lr={lr!r}"])
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
        t0 = time.perf_counter()
        run(cfg)
        log.info("lr %g: lineage done in %.0f s", lr, time.perf_counter() - t0)
        row = scan_row(Path(cfg.run_dir), Lineage.load(cfg.run_dir), lr)
        rows.append({**row, "train_seconds": round(time.perf_counter() - t0 - row["fit_seconds"], 1)})
    best = min(rows, key=lambda r: r["release_objective"])["lr"]
    return {"lrs": rows, "best_lr": best}


def print_lr_scan(scan: dict) -> None:
    """One line per LR: release objective, then per split the main path's noise and R^2 / ceiling."""
    for r in scan["lrs"]:
        mark = "  <- best" if r["lr"] == scan["best_lr"] else ""
        print(f"lr {r['lr']:g}: release objective {r['release_objective']:.4f}; " + ", ".join(
            f"{s} noise {100 * r['main_noise'][s]:.2f}% R^2 {f['r2']:.4f} (ceiling {f['r2_ceiling']:.4f}, {f['law']})"
            for s, f in r["fits"].items()) + mark)


def plot_lr_scan(scan: dict, out_png: Path) -> Path:
    """Release objective against the peak LR (left); per split, the law's R^2 and its noise
    ceiling against the peak LR (right), with the 0.98 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypath.storage import save_figure

    rows = sorted(scan["lrs"], key=lambda r: r["lr"])
    lrs = [r["lr"] for r in rows]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    ax0.plot(lrs, [r["release_objective"] for r in rows], "o-", color="black")
    ax0.set_ylabel("release objective (weighted final val loss)")
    splits = list(rows[0]["fits"])
    colors = dict(zip(splits, plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(splits)))))
    for s in splits:
        ax1.plot(lrs, [r["fits"][s]["r2"] for r in rows], "o-", color=colors[s], label=f"{s} R^2")
        ax1.plot(lrs, [r["fits"][s]["r2_ceiling"] for r in rows], "--", color=colors[s], lw=1,
                 label=f"{s} noise ceiling")
    ax1.axhline(0.98, color="crimson", lw=1, label="target 0.98")
    ax1.set_ylabel("R^2 of the lineage fit (main path + releases)")
    ax1.legend(fontsize=7, frameon=False, ncol=2)
    for ax in (ax0, ax1):
        ax.set_xscale("log")
        ax.set_xlabel("peak LR (train.max_lr)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("the law benchmark's lineage at each peak LR")
    fig.tight_layout()
    save_figure(fig, out_png)
    plt.close(fig)
    return out_png


def _spearman(a, b) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--run-dir", default="runs/law_bench")
    p.add_argument("--versions", default="v1,v2", help="comma-separated versions of the corpus")
    p.add_argument("--corpus", choices=["embedded", "system"], default="embedded",
                   help="the embedded default corpus, or system text (benchmarks/system_corpus.py), "
                        "built in RUN_DIR-corpus")
    p.add_argument("--corpus-chars", type=int, default=400_000, help="system corpus: most characters per version")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="system corpus: share of each version's documents held out for val and test "
                        "(enough for data.val_blocks + data.test_blocks blocks)")
    p.add_argument("--docs", type=int, default=150, help="most documents per version")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=10, help="the main path's fork points")
    p.add_argument("--samples", type=int, default=8, help="trials of each sweep")
    p.add_argument("--unguided-seeds", default="0,1,2",
                   help="comma-separated TPE seeds: one unguided sweep each (the guided one uses sweep.seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--eval-only", action="store_true",
                   help="skip training and the sweeps: evaluate the existing run (steps 3-5) from its lineage and "
                        "finished sweeps; a sweep that is missing is left out (no unguided sweep: no accuracy "
                        "fits; no guided one: no comparison), the lineage fits always run")
    p.add_argument("--lams", default="auto,0.999", help="momentum decays of the accuracy fits")
    p.add_argument("--shifts", default=None,
                   help="comma-separated fit_run shift modes compared (default: auto; single,auto from 3 versions)")
    p.add_argument("--fit-releases", choices=["last", "all"], default="last",
                   help="release branches the accuracy fits use: the last version's, or every version's")
    p.add_argument("--rotations", type=int, default=None, help="most unguided trials taking a turn as the fitted one")
    p.add_argument("--guided-name", default="guided",
                   help="sweep name of the guided search (a new name runs a new guided search on the same "
                        "lineage; it fits the law on the main path and the release branches only)")
    p.add_argument("--lr-scan", default=None, metavar="LRS",
                   help="comma-separated peak LRs: train the lineage (no sweeps) at each in RUN_DIR/lr=LR, "
                        "report release objective, main-path noise and the law's R^2 per LR "
                        "(RUN_DIR/law/lr_scan.json and .png), and nothing else")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log = logging.getLogger("law_accuracy")

    from raypath.config import load_config
    from raypath.lineage import Lineage
    from raypath.storage import write_json

    command = "python " + " ".join(shlex.quote(a) for a in [
        "benchmarks/law_accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    if args.lr_scan:
        scan = {**lr_scan(args, [float(x) for x in args.lr_scan.split(",")], log), "command": command}
        out = Path(args.run_dir).resolve() / "law"
        write_json(out / "lr_scan.json", scan)
        print_lr_scan(scan)
        print(f"plot: {plot_lr_scan(scan, out / 'lr_scan.png')}\ncommand: {command}")
        return 0
    cfg = load_config(args.config, _overrides(args))
    seeds = [int(x) for x in args.unguided_seeds.split(",")]
    run_dir = Path(cfg.run_dir).resolve()
    t0 = time.perf_counter()
    if args.eval_only:
        sweeps = read_sweeps(run_dir, cfg.data.versions[-1], sweep_names(args.guided_name, seeds), log)
    else:
        from raypath.cluster import init_ray
        from raypath.run import run

        init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
        run(cfg)
        log.info("lineage done in %.0f s", time.perf_counter() - t0)
        sweeps = run_sweeps(cfg, args.samples, args.guided_name, seeds, log)
    lineage = Lineage.load(run_dir)
    mains = lineage.main_path()
    shifts = tuple((args.shifts or ("single,auto" if len(mains) >= 3 else "auto")).split(","))
    lams = tuple(x if x == "auto" else float(x) for x in args.lams.split(","))
    compared = "guided" in sweeps and bool(unguided(sweeps))
    summary = {"version": mains[-1].version,
               "guided_vs_unguided": guided_vs_unguided(sweeps) if compared else None,
               "accuracy": accuracy(run_dir, lineage, list(unguided(sweeps).values()), lams=lams, shifts=shifts,
                                    releases=args.fit_releases, rotations=args.rotations) if unguided(sweeps) else {}}
    if len(shifts) > 1:
        summary["lineage_fits"] = lineage_fits(run_dir, lineage, shifts)
    summary["command"] = command
    summary["train_seconds"] = round(time.perf_counter() - t0, 1) if not args.eval_only else None
    summary["size"] = {"versions": args.versions, "corpus": args.corpus, "docs": args.docs,
                       "corpus_chars": args.corpus_chars if args.corpus == "system" else None,
                       "val_fraction": args.val_fraction if args.corpus == "system" else None,
                       "eval_every": args.eval_every,
                       "checkpoint_every": args.checkpoint_every, "samples": args.samples, "unguided_seeds": seeds,
                       "steps": {m.version: m.end_step - m.start_step for m in mains}}
    summary["release_objective"] = release_objective(lineage)
    write_json(run_dir / "law" / "benchmark.json", summary)
    plot = plot_search(sweeps, run_dir / "law" / "benchmark.png", summary["release_objective"]) if compared else None
    acc, gd = summary["accuracy"], summary["guided_vs_unguided"]
    print(json.dumps(summary, indent=2, default=float))
    for key, a in ((k, v) for k, v in acc.items() if k.startswith("lam=")):
        print(f"\nheld-out final-loss MAPE per split, {key}: "
              + ", ".join(f"{s} {v:.3f}% (max {a['max_ape_final_loss'][s]:.2f}%, naive "
                          f"{a['naive_mape_final_loss'][s]:.3f}%)" for s, v in a["mape_final_loss"].items())
              + f"; objective {a['objective_mape']:.3f}%, Spearman {a['rank_spearman_mean']:.2f}")
    for key, fits in summary.get("lineage_fits", {}).items():
        # ceiling: the R^2 the curves' noise leaves a law that followed their true mean exactly;
        # outliers: points beyond 3 noise sd and their share of the squared error R^2 counts
        print(f"lineage fit ({key}): " + ", ".join(
            f"{s} {f['law']} R^2 {f['r2']:.4f} (ceiling {f.get('r2_ceiling', float('nan')):.4f}) "
            f"MAPE {f['mape']:.2f}% outliers {len(f.get('outliers', []))} "
            f"({100 * f.get('outlier_share', 0.0):.0f}%)" for s, f in fits["splits"].items()))
    if gd is not None:
        print_comparison(gd)
    print(f"plot: {plot}\ncommand: {summary['command']}")
    return 0 if all(math.isfinite(v) for k, a in acc.items() if k.startswith("lam=")
                    for v in a["mape_final_loss"].values()) else 1


def read_sweeps(run_dir: Path, version: str, names: dict[str, tuple], log) -> dict[str, dict]:
    """The finished sweeps ``names`` (result key -> (sweep name, seed)) of ``version`` as
    :func:`run_sweeps` returns them; a sweep that was never run is left out (with a warning):
    the accuracy fits need the unguided ones only, the comparison both kinds."""
    from raypath.storage import read_json
    from raypath.sweep import proposal_order

    sweeps = {}
    for key, (name, _) in names.items():
        path = run_dir / "sweeps" / version / name / "results.json"
        if not path.is_file():
            log.warning("no finished sweep %s of %s (%s): left out", name, version, path)
            continue
        record = read_json(path)
        if any("order" not in t for t in record["trials"]):  # results written before trials recorded it
            order = proposal_order(run_dir / record["path"], record["trials"])  # the path is the run dir's
            for t in record["trials"]:
                t.setdefault("order", order.get(t["trial_id"]))
        sweeps[key] = record
    return sweeps


def print_comparison(gd: dict) -> None:
    """The guided-vs-unguided lines of the report."""
    print("guided first trial within 0.5% of each unguided best: " + ", ".join(
        f"{k} {'yes' if v else 'no'}" for k, v in gd["guided_first_trial_within"].items()))
    for key, c in gd["trials_to_target"].items():
        print(f"trials to within {WITHIN:.1%} of {key}'s best ({gd['unguided_best_objective'][key]:.4f}): "
              f"guided {c['guided']}, {key} {c['unguided']}")
    print(f"mean trials to within {WITHIN:.1%}: guided {gd['mean_guided']:.2f}, unguided {gd['mean_unguided']:.2f} "
          f"(ratio {gd['ratio_guided_to_unguided']:.2f}); branch tokens {gd['search_tokens']}")
    acc_t = gd["acceptance"]
    for name, r in acc_t["readings"].items():
        print(f"target 'guided at most half' {name}: guided {acc_t['mean_guided_trials_within']:.2f} trials, "
              f"half = {r['half']:.2f} (ratio {r['ratio']:.2f}): {'met' if r['met'] else 'NOT met'}")
    for w, per in gd["trials_to_within"].items():
        m = gd["mean_trials_to_within"][w]
        print(f"within {w} (guided/unguided per seed): "
              + ", ".join(f"{k} {c['guided']}/{c['unguided']}" for k, c in per.items())
              + f"; mean {m['guided']:.2f}/{m['unguided']:.2f} = {m['ratio']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
