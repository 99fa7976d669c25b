"""The scaling law on a real lineage: curves, per-split fits, branch predictions, sweep guidance.

:mod:`raypath.law` holds the math (areas, laws, fitting). This module connects it to what a
run records -- ``lineage.json`` and the ``curves/*.jsonl`` of every segment -- and to the
branch search:

* :func:`curves_from_lineage` -- one :class:`~raypath.law.Curve` per path that observed a
  validation split: the main path (all ``main-*`` segments, one LR history) and every
  finished branch (lineage branches, plus finished sweep trials).
* :func:`fit_run` -- one law per validation split relevant to releasing a version (the
  version's own split and every older one), saved to ``RUN_DIR/law/fit-<version>.json``.
* :func:`predict_branch` / :func:`rank_candidates` -- predicted final val losses and the
  weighted objective of candidate branches, before any of them is trained.
* :class:`LawGuide`, :class:`LawStopper`, :class:`LawRefitCallback` -- the pieces
  :mod:`raypath.sweep` plugs into Ray Tune (:func:`raypath.sweep.law_guidance`).

Step convention
---------------
A curve record at ``step = s`` is written after ``s`` optimizer steps, which used the LRs
``schedule(0) ... schedule(s-1)``. The law indexes losses by the last LR they saw, so a
record at ``s`` is observed at index ``s - 1`` of the LR history (``Curve.steps``), and the
final loss of a branch ending at ``end_step`` is the prediction at index ``end_step - 1``.
Warmup steps count as the maximal LR (:func:`raypath.law.effective_lr`, 2408.11029).

What ``cpt_start`` means per split
----------------------------------
The CPT law (2505.07796) splits the LR history at one data switch: "pt" before it, "cpt"
after it, with a distribution-shift term ``B*(1-(1+E*S1cpt)^-beta)`` that grows with the
forward area trained since the switch. For each validation split we put the switch where
that split's relation to the training data last changed:

* the **new** split (version ``K`` being released) -- ``cpt_start`` = first step of ``K``'s
  main segment: from there on the model trains *on* that split's domain, so its loss falls
  faster than the power law alone predicts -> ``B < 0``. (Its val set is only evaluated
  from that step on, so every observation is in the cpt phase.)
* an **old** split ``j < K`` -- ``cpt_start`` = the end step of ``j``'s main segment, the
  first step trained on *other* data (the shift away from ``j``): forgetting makes its loss
  rise relative to the power law -> ``B > 0``. Observations made while ``j`` was still being
  trained (its own segment, its own branches) are the pt phase and pin ``L0, A, alpha, C1``;
  later main-path points and branches of later versions (the decays a release of ``K`` adds
  happen in ``j``'s cpt phase) pin ``B, E, beta`` and ``C2``.

With replay (``data.replay_ratio > 0``) the shift away from ``j`` is weaker, so ``B`` shrinks,
but the phase boundary is the same. A split with no observation after its ``cpt_start``
(the first version, or an old split that was never trained past) has no CPT phase to fit:
``law="auto"`` fits the annealing law (2408.11029) there instead.

Every later version shifts the training data again, so an old split ``j`` sees one switch
per version after it: the ends of ``j``'s, ``j+1``'s, ... ``K-1``'s main segments
(:func:`boundaries`). The first is ``cpt_start``; the others are ``Curve.shifts``, and the
multi-shift law (:func:`raypath.law.multi_shift_law`) gives each its own shift term.
:func:`fit_run` fits it next to the single-shift law wherever a split has more than one
switch and keeps the one that predicts held-out branches better
(:func:`raypath.law.select_law`); on a two-version lineage every split has one switch and
the fit is the single-shift one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from raypath import law as lawmod
from raypath.law import Curve, FitResult, fit_law
from raypath.mainpath import fork_step as _fork_step
from raypath.schedules import SHAPES, Decay, MainPath, decay_fraction, decay_progress

log = logging.getLogger(__name__)

LAW_DIR = "law"
#: Default old/new weights of the objective (same convention as ``sweep.weights``).
DEFAULT_WEIGHTS = {"old": 0.5, "new": 0.5}
#: Powers tried by :func:`default_grid` for the one-parameter shapes.
DEFAULT_POWERS = {"polynomial": (1.5, 2.0, 3.0), "exponential": (2.0, 4.0, 6.0)}
POWER_SHAPES = ("polynomial", "exponential")
#: A trial this close to its end (share of its branch) is never stopped: stopping would save
#: almost no compute and lose its final result (the law benchmark stopped trials 1 step early).
FINISH_SHARE = 0.05


# --------------------------------------------------------------------------- lineage access

def _versions(lineage: Mapping) -> list[str]:
    names = [v["name"] for v in lineage.get("versions", [])]
    return names or [m["version"] for m in sorted(lineage.get("main_path", []), key=lambda m: m["start_step"])]


def _mains(lineage: Mapping) -> dict[str, dict]:
    return {m["version"]: m for m in lineage.get("main_path", [])}


def _main(lineage: Mapping, version: str) -> dict:
    m = _mains(lineage).get(version)
    if m is None:
        raise ValueError(f"version {version!r}: no main-path segment in the lineage "
                         f"(trained: {', '.join(_mains(lineage)) or 'none'})")
    return m


def resolve_version(lineage: Mapping, version: str | int | None) -> str:
    """A version name from a name (``v2``), a 1-based number (``2``) or None (the latest trained)."""
    mains = _mains(lineage)
    if version is None:
        trained = [v for v in _versions(lineage) if v in mains]
        if not trained:
            raise ValueError("the lineage has no trained main-path version yet")
        return trained[-1]
    names = _versions(lineage)
    if str(version) in names:
        return str(version)
    try:
        i = int(str(version))
    except ValueError:
        i = 0
    if 1 <= i <= len(names):
        return names[i - 1]
    raise ValueError(f"version {version!r}: not a version of this run ({', '.join(names) or 'none'})")


def main_schedule(lineage: Mapping) -> MainPath:
    """The main path's schedule, from the lineage's main-path entries (config as fallback)."""
    mains = sorted(lineage.get("main_path", []), key=lambda m: m["start_step"])
    if mains and "max_lr" in mains[0]:
        return MainPath(float(mains[0]["max_lr"]), int(mains[0].get("warmup_steps", 0)))
    t = (lineage.get("config") or {}).get("train", {})
    return MainPath(float(t["max_lr"]), int(t.get("warmup_steps", 0)))


def cpt_start(lineage: Mapping, split: str, version: str) -> int:
    """First step of the split's cpt phase when releasing ``version`` (see the module doc)."""
    m = _main(lineage, split)
    return int(m["start_step"] if split == version else m["end_step"])


def boundaries(lineage: Mapping, split: str, version: str) -> list[int]:
    """Every data switch the split sees when releasing ``version``, in order: ``cpt_start``,
    then for an old split the end of each later version's main segment before ``version``
    (the first step trained on the next version's data; see the module doc)."""
    if split == version:
        return [cpt_start(lineage, split, version)]
    names, mains = _versions(lineage), _mains(lineage)
    later = names[names.index(split): names.index(version)]
    return [int(mains[v]["end_step"]) for v in later if v in mains]


def _phases(lineage: Mapping, split: str, version: str) -> dict:
    """``cpt_start`` and ``shifts`` of the split's curves (keyword arguments of
    :class:`~raypath.law.Curve` and :meth:`~raypath.law.FitResult.predict`)."""
    first, *later = boundaries(lineage, split, version)
    return {"cpt_start": first, "shifts": tuple(later)}


def splits_for(lineage: Mapping, version: str) -> list[str]:
    """Validation splits relevant to releasing ``version``: older versions, then its own."""
    names = _versions(lineage)
    return names[: names.index(version) + 1]


def split_weights(lineage: Mapping, version: str, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-split objective weights: ``{old, new}`` -> w_old spread over older splits, w_new on
    ``version`` (normalised to sum to 1, as :func:`raypath.sweep.objective_weights`); a
    per-split mapping (``{"v1": .5, "v2": .5}``) passes through."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    splits = splits_for(lineage, version)
    if set(weights) - {"old", "new"}:
        unknown = sorted(set(weights) - set(splits))
        if unknown:
            raise ValueError(f"objective weights name splits {unknown} that are not splits of {version}")
        return {k: float(v) for k, v in weights.items()}
    old = splits[:-1]
    if not old:
        return {version: 1.0}
    total = weights.get("old", 0.0) + weights.get("new", 0.0)
    if total <= 0:
        raise ValueError(f"objective weights must not all be 0: {weights}")
    out = {s: weights.get("old", 0.0) / total / len(old) for s in old}
    out[version] = weights.get("new", 0.0) / total
    return out


# --------------------------------------------------------------------------- LR histories

def main_lrs(main: MainPath, n: int) -> np.ndarray:
    """Effective LR of the main path for steps ``0..n-1`` (warmup counted at max LR)."""
    return np.full(n, float(main.max_lr))


def branch_lrs(main: MainPath, fork: int, steps: int, decay: Decay, n: int | None = None) -> np.ndarray:
    """Effective LR history of :class:`~raypath.schedules.Branch` for steps ``0..n-1``
    (``n`` = fork + steps by default), vectorised; warmup steps count as max LR."""
    n = fork + steps if n is None else n
    idx = np.arange(n)
    start_lr = main(fork)
    end_lr = decay.min_lr_ratio * main.max_lr
    lrs = np.where(idx < fork, float(main.max_lr), end_lr)  # before the fork: the main path
    inside = (idx >= fork) & (idx < fork + steps)
    frac = decay_fraction(decay_progress(idx[inside] - fork, steps), decay.shape, decay.power)
    lrs[inside] = end_lr + (start_lr - end_lr) * frac
    # A fork inside the warmup decays from a ramp value; only the steps before it count as peak.
    warm = idx < min(main.warmup_steps, fork)
    return np.where(warm, float(main.max_lr), lrs)


# --------------------------------------------------------------------------- curves

def _read_records(path: str | os.PathLike) -> list[dict]:
    from raypath.report import read_curve

    df = read_curve(path)
    return [] if df.empty else df.to_dict("records")


def _find_curve(run_dir: Path | None, name: str, recorded: str | None) -> Path:
    """The run directory's copy first (a moved run keeps stale absolute paths)."""
    candidates = []
    if run_dir is not None:
        candidates.append(run_dir / "curves" / f"{name}.jsonl")
        if recorded:
            rec = Path(recorded)
            # sweep trial curves live under RUN_DIR/sweeps/<version>/<sweep>/curves/
            parts = rec.parts
            if "sweeps" in parts:
                candidates.append(run_dir.joinpath(*parts[parts.index("sweeps"):]))
    if recorded:
        candidates.append(Path(recorded))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0] if candidates else Path(f"{name}.jsonl")


def _observed(records: Iterable[dict], key: str, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = [], []
    for r in records:
        v = r.get(key)
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            continue
        if upto is not None and r["step"] > upto:
            continue
        steps.append(int(r["step"]) - 1)  # record at step s saw LRs 0..s-1 (module doc)
        losses.append(float(v))
    return np.array(steps, dtype=np.int64), np.array(losses)


def trial_branch(name: str, version: str, config: Mapping, curve: str | None = None) -> dict:
    """A sweep trial as a lineage-style branch entry (what :func:`curves_from_lineage` reads).

    ``config`` is the trial's Tune config (``fork_step``, ``branch_steps``, ``shape``,
    ``min_lr_ratio``, optional ``power``)."""
    power = config.get("power")
    return {"name": name, "version": version, "fork_step": int(config["fork_step"]),
            "steps": int(config["branch_steps"]),
            "decay": {"shape": config["shape"], "min_lr_ratio": float(config.get("min_lr_ratio", 0.0)),
                      "power": float(power) if power else 2.0},
            "curve": curve, "status": "done"}


def _sweep_branches(lineage: Mapping) -> list[dict]:
    out = []
    for sw in lineage.get("sweeps", []):
        for t in sw.get("trials", []):
            if t.get("status") != "done" or not t.get("config") or not t.get("curve"):
                continue
            try:
                out.append(trial_branch(t["name"], sw["version"], t["config"], t["curve"]))
            except (KeyError, TypeError, ValueError):
                continue
    return out


def lineage_branches(lineage: Mapping, *, include_sweeps: bool = True) -> list[dict]:
    """Finished branches: the lineage's, then sweep trials not already among them (by name).

    Without ``include_sweeps`` no sweep trial is included, not even one a sweep released
    (a lineage branch with a ``sweep``): only the configured release branches."""
    out = [b for b in lineage.get("branches", []) if b.get("status", "done") == "done"
           and (include_sweeps or not b.get("sweep"))]
    names = {b["name"] for b in out}
    if include_sweeps:
        out += [b for b in _sweep_branches(lineage) if b["name"] not in names]
    return out


def _run_dir(lineage: Mapping, run_dir) -> Path | None:
    if run_dir is not None:
        return Path(run_dir)
    rd = (lineage.get("config") or {}).get("run_dir")
    return Path(rd) if rd else None


def curves_from_lineage(lineage: Mapping, split: str, upto_version: str | None = None, *,
                        run_dir: str | os.PathLike | None = None, branches: Iterable[str] | None = None,
                        extra_branches: Sequence[Mapping] = (), include_main: bool = True,
                        include_sweeps: bool = True, release_version: str | None = None) -> list[Curve]:
    """Observed curves of validation split ``split`` (the ``val/<split>`` records).

    upto_version: only segments of versions up to this one (what was known when it was
        released); None = every trained version.
    run_dir: where curves are looked up first (default: the lineage's ``config.run_dir``).
    branches: names of the branches to include; None = all finished ones.
    extra_branches: more lineage-style branch entries (e.g. :func:`trial_branch` of sweep
        trials finished since the lineage was read).
    release_version: the version whose release the fit is for: decides ``cpt_start``
        (default ``upto_version``, else the latest trained version).
    """
    rd = _run_dir(lineage, run_dir)
    versions = _versions(lineage)
    mains = _mains(lineage)
    upto = resolve_version(lineage, upto_version)
    allowed = set(versions[: versions.index(upto) + 1])
    release = release_version or upto
    if split not in mains:
        raise ValueError(f"split {split!r}: no main-path segment of that version")
    phases = _phases(lineage, split, release)
    key = f"val/{split}"
    sched = main_schedule(lineage)
    curves: list[Curve] = []
    if include_main:
        records = []
        for v in versions:
            if v in allowed and v in mains:
                m = mains[v]
                records += [r for r in _read_records(_find_curve(rd, m["segment"], m.get("curve")))
                            if r["step"] <= m["end_step"]]
        steps, losses = _observed(records, key)
        if len(steps):
            order = np.argsort(steps, kind="stable")
            steps, losses = steps[order], losses[order]
            steps, first = np.unique(steps, return_index=True)
            losses = losses[first]
            curves.append(Curve(main_lrs(sched, int(steps.max()) + 1), steps, losses, name="main", **phases))
    wanted = None if branches is None else set(branches)
    pool = lineage_branches(lineage, include_sweeps=include_sweeps) + [dict(b) for b in extra_branches]
    seen = set()
    for b in pool:
        if b["name"] in seen or b.get("version") not in allowed:
            continue
        if wanted is not None and b["name"] not in wanted:
            continue
        seen.add(b["name"])
        end = int(b["fork_step"]) + int(b["steps"])
        records = _read_records(_find_curve(rd, b["name"], b.get("curve")))
        steps, losses = _observed((r for r in records if r["step"] > int(b["fork_step"])), key, upto=end)
        if not len(steps):
            continue
        d = b.get("decay") or {}
        decay = Decay(d.get("shape", "1-sqrt"), float(d.get("min_lr_ratio", 0.0)), float(d.get("power", 2.0)))
        lrs = branch_lrs(sched, int(b["fork_step"]), int(b["steps"]), decay, n=end)
        curves.append(Curve(lrs, steps, losses, name=b["name"], **phases))
    if wanted is not None and (missing := wanted - seen - {"main"}):
        log.debug("split %s: requested branches without observations: %s", split, sorted(missing))
    return curves


# --------------------------------------------------------------------------- fitting

def _choose_law(law: str, curves: Sequence[Curve]) -> str:
    if law != "auto":
        return law
    has_cpt = any(c.cpt_start > 0 and np.any(c.steps >= c.cpt_start) for c in curves)
    return "CPTLaw" if has_cpt else "AnnealingLaw"


SHIFTS = ("auto", "single", "multi")


def _shift_candidates(chosen: str, curves: Sequence[Curve], shifts: str, n_points: int) -> list:
    """The laws :func:`fit_run` chooses from for one split: the single-shift CPT law, and the
    multi-shift one with a term per data switch that some observation comes after (a switch
    nothing was observed after would be a flat parameter)."""
    if chosen != "CPTLaw" or shifts == "single":
        return [chosen]
    last = max((int(c.steps.max()) for c in curves if len(c.steps)), default=-1)
    n_switches = 1 + sum(b <= last for b in curves[0].shifts)
    multi = lawmod.multi_shift_law(n_switches)
    if n_switches == 1 or n_points < len(multi.param_names) + 1:
        return [chosen]
    return [multi] if shifts == "multi" else [chosen, multi]


def _load_lineage(run_dir_or_lineage) -> tuple[dict, Path | None]:
    if isinstance(run_dir_or_lineage, Mapping):
        return dict(run_dir_or_lineage), None
    from raypath.lineage import Lineage

    return Lineage.load(run_dir_or_lineage).data, Path(run_dir_or_lineage)


def fit_run(run_dir_or_lineage, version: str | int | None = None, *, law: str = "auto",
            run_dir: str | os.PathLike | None = None, branches: Iterable[str] | None = None,
            extra_branches: Sequence[Mapping] = (), include_sweeps: bool = True,
            shift_sign: bool = True, lam: float | str = "auto", shifts: str = "auto",
            save: bool = True) -> dict[str, FitResult]:
    """Fit one law per validation split relevant to releasing ``version``.

    Splits are every version up to ``version`` (its own = the new-domain split, the
    earlier ones = old-domain splits); each is fitted across the main path and every
    finished branch that observed it, up to ``version`` (see :func:`curves_from_lineage`
    for ``branches`` / ``extra_branches``). ``law`` is ``CPTLaw``, ``AnnealingLaw`` or
    ``auto`` (CPT where the split has observations in its cpt phase).

    A split with fewer observations than the law has parameters is fitted with the
    annealing law, or skipped (with a warning) below 4 points. ``shift_sign`` bounds the
    CPT shift term's sign as 2505.07796 finds it (``B >= 0`` on old splits, ``B <= 0`` on
    the new one): with every new-split observation inside the cpt phase, the free fit
    cannot tell the shift term from the power law and takes either sign. ``lam`` is the
    momentum decay of S2, one value for every split; ``auto`` picks it from
    :data:`raypath.law.LAMBDA_GRID` by leave-one-branch-out prediction of final losses over
    all splits (:func:`raypath.law.select_lambda`; 0.999 until some split has two
    branches; it is chosen on the single-shift problems, so it is the same with or without
    the multi-shift law).

    ``shifts`` decides how a CPT fit treats an old split's later data switches
    (:func:`boundaries`): ``single`` -- one shift term, at ``cpt_start`` (2505.07796 as
    published); ``multi`` -- one term per switch (:func:`raypath.law.multi_shift_law`);
    ``auto`` -- whichever predicts held-out branches better (:func:`raypath.law.select_law`;
    the single-shift law unless the multi-shift one is strictly better). A split with one
    switch is always fitted with the single-shift law. Saves
    ``RUN_DIR/law/fit-<version>.json`` atomically when ``save`` and a run directory is known.
    """
    if shifts not in SHIFTS:
        raise ValueError(f"shifts must be one of {', '.join(SHIFTS)}, got {shifts!r}")
    lineage, rd = _load_lineage(run_dir_or_lineage)
    rd = Path(run_dir) if run_dir is not None else rd
    version = resolve_version(lineage, version)
    fits: dict[str, FitResult] = {}
    record: dict[str, Any] = {"version": version, "law": law, "shift_sign": shift_sign, "lam": lam,
                              "shifts": shifts, "splits": {}}
    problems = {}
    for split in splits_for(lineage, version):
        curves = curves_from_lineage(lineage, split, version, run_dir=rd if rd else None, branches=branches,
                                     extra_branches=extra_branches, include_sweeps=include_sweeps)
        n = int(sum(len(c.steps) for c in curves))
        chosen = _choose_law(law, curves)
        if n < len(lawmod.LAWS[chosen].param_names) + 1 and chosen != "AnnealingLaw":
            log.warning("split %s: %d points are too few for %s; fitting AnnealingLaw", split, n, chosen)
            chosen = "AnnealingLaw"
        if n < 4:
            log.warning("split %s: %d observed points, too few to fit; skipped", split, n)
            record["splits"][split] = {"skipped": f"{n} observed points", "n_points": n}
            continue
        sign = {"B": -1 if split == version else 1} if shift_sign else None
        problems[split] = (chosen, curves, sign)
    if lam == "auto":
        lam_value, scores = lawmod.select_lambda(list(problems.values()))
        record["lam_scores"] = {str(k): v for k, v in scores.items()}
    else:
        lam_value = float(lam)
    for split, (chosen, curves, sign) in problems.items():
        candidates = _shift_candidates(chosen, curves, shifts, int(sum(len(c.steps) for c in curves)))
        held_out: dict[str, float] = {}
        if len(candidates) > 1:
            chosen, held_out = lawmod.select_law(candidates, curves, sign=sign, lam=lam_value)
        else:
            chosen = candidates[0]
        fit = fit_law(chosen, curves, sign=sign, lam=lam_value)
        fit.held_out = held_out
        if not (math.isfinite(fit.r2) and fit.r2 > 0.5):
            log.warning("split %s: poor %s fit (R^2 %.3f): predictions are unreliable", split, chosen, fit.r2)
        fits[split] = fit
        record["splits"][split] = {
            **fit.to_dict(), "cpt_start": cpt_start(lineage, split, version),
            "boundaries": boundaries(lineage, split, version),
            "curves": [{"name": c.name, "n_points": int(len(c.steps)),
                        "first_step": int(c.steps.min()) + 1, "last_step": int(c.steps.max()) + 1}
                       for c in curves],
        }
    if save:
        target = rd or _run_dir(lineage, None)
        if target is not None:
            from raypath.storage import write_json

            write_json(Path(target) / LAW_DIR / f"fit-{version}.json", record)
    return fits


def load_fits(run_dir: str | os.PathLike, version: str) -> dict[str, FitResult]:
    """The fits :func:`fit_run` saved for ``version``."""
    from raypath.storage import read_json

    rec = read_json(Path(run_dir) / LAW_DIR / f"fit-{version}.json")
    fields = {f.name for f in dataclasses.fields(FitResult)}
    return {s: FitResult.from_dict({k: v for k, v in d.items() if k in fields})
            for s, d in rec["splits"].items() if "skipped" not in d}


# --------------------------------------------------------------------------- prediction

def _branch_plan(lineage: Mapping, version: str, fraction: float | None, fork_step: int | None) -> tuple[int, int, int]:
    m = _main(lineage, version)
    start, end = int(m["start_step"]), int(m["end_step"])
    if fork_step is None:
        if fraction is None:
            raise ValueError("give a fraction or a fork_step")
        fork_step = _fork_step(start, end, float(fraction))
    fork_step = int(fork_step)
    if not start <= fork_step < end:
        raise ValueError(f"fork step {fork_step} is outside {version}'s main segment [{start}, {end})")
    return fork_step, end - fork_step, end


def predict_curve(fits: Mapping[str, FitResult], lineage: Mapping, version: str, decay: Decay, fork_step: int,
                  steps: Sequence[int], *, branch_steps: int | None = None) -> dict[str, np.ndarray]:
    """Predicted ``val/<split>`` at curve-record ``steps`` of a branch of ``version`` forked at
    ``fork_step`` (steps before the fork: the main path). ``branch_steps`` defaults to the
    rest of the version's segment."""
    end = int(_main(lineage, version)["end_step"])
    branch_steps = end - fork_step if branch_steps is None else branch_steps
    steps = np.asarray(steps, dtype=np.int64)
    n = max(int(steps.max()), fork_step + branch_steps)
    lrs = branch_lrs(main_schedule(lineage), fork_step, branch_steps, decay, n=n)
    idx = np.maximum(steps - 1, 0)
    return {s: f.predict(lrs, idx, **_phases(lineage, s, version)) for s, f in fits.items()}


def predict_branch(fits: Mapping[str, FitResult], lineage: Mapping, version: str, shape: str = "1-sqrt",
                   fraction: float | None = 0.2, min_lr_ratio: float = 0.0, power: float = 2.0, *,
                   weights: Mapping[str, float] | None = None, fork_step: int | None = None) -> dict:
    """Predicted final val loss per split and the weighted objective of one branch.

    The branch forks before the last ``fraction`` of ``version``'s main segment (the
    arithmetic of :func:`raypath.mainpath.fork_step`; ``fork_step`` overrides it) and decays
    to the segment's end with ``shape`` / ``min_lr_ratio`` / ``power``. ``weights`` is
    ``{old, new}`` or per split (:func:`split_weights`); the objective needs a fit of
    every weighted split. ``main`` holds the never-annealed main path's prediction at the
    same end step, for reference.
    """
    version = resolve_version(lineage, version)
    decay = Decay(shape, float(min_lr_ratio), float(power))
    fork, steps, end = _branch_plan(lineage, version, fraction, fork_step)
    pred = {s: float(v[0]) for s, v in predict_curve(fits, lineage, version, decay, fork, [end]).items()}
    sched = main_schedule(lineage)
    main_pred = {s: float(f.predict(main_lrs(sched, end), [end - 1], **_phases(lineage, s, version))[0])
                 for s, f in fits.items()}
    w = split_weights(lineage, version, weights)
    missing = [s for s in w if s not in pred]
    objective = float("nan") if missing else float(sum(wt * pred[s] for s, wt in w.items()))
    m = _main(lineage, version)
    return {"version": version, "shape": shape, "power": float(power), "min_lr_ratio": float(min_lr_ratio),
            "fraction": None if fraction is None else float(fraction),
            "fraction_actual": steps / (m["end_step"] - m["start_step"]), "fork_step": fork,
            "branch_steps": steps, "end_step": end, "predicted": pred, "objective": objective,
            "weights": w, "main": main_pred}


def default_grid(fraction: tuple[float, float] = (0.05, 0.5), n_fractions: int = 10,
                 shapes: Sequence[str] = SHAPES, power: tuple[float, float] | None = None,
                 min_lr_ratio: Sequence[float] = (0.0, 0.1)) -> list[dict]:
    """Dense candidate grid: ``n_fractions`` fractions evenly over ``fraction``, every shape
    (polynomial / exponential at 3 powers: :data:`DEFAULT_POWERS`, or evenly over ``power``),
    every ``min_lr_ratio``. Deterministic order."""
    fracs = np.linspace(fraction[0], fraction[1], n_fractions) if n_fractions > 1 else [fraction[0]]
    grid = []
    for f in fracs:
        for shape in shapes:
            if shape in POWER_SHAPES:
                powers = DEFAULT_POWERS[shape] if power is None else tuple(np.linspace(power[0], power[1], 3))
            else:
                powers = (2.0,)
            for p in powers:
                for m in min_lr_ratio:
                    grid.append({"fraction": round(float(f), 6), "shape": shape, "power": float(p),
                                 "min_lr_ratio": float(m)})
    return grid


def _fork_of(f) -> int:
    return int(f["step"] if isinstance(f, Mapping) else f)


def rank_candidates(fits: Mapping[str, FitResult], lineage: Mapping, version: str,
                    grid: Sequence[Mapping] | None = None, weights: Mapping[str, float] | None = None, *,
                    forks: Sequence | None = None) -> list[dict]:
    """Candidates of ``grid`` (default :func:`default_grid`) with predictions, best
    predicted objective first (ties: shorter branch, then grid order) -- deterministic.

    forks: fork points that exist (steps, or ``{"step": ...}`` dicts as
        :func:`raypath.sweep.fork_points` returns): each fraction snaps to the nearest one
        (ties: the shorter branch) and duplicates after snapping are dropped.
    """
    version = resolve_version(lineage, version)
    grid = default_grid() if grid is None else grid
    m = _main(lineage, version)
    start, end = int(m["start_step"]), int(m["end_step"])
    fork_steps = sorted({_fork_of(f) for f in forks}) if forks else None
    out, seen = [], set()
    for i, cand in enumerate(grid):
        fork = _fork_step(start, end, float(cand["fraction"]))
        if fork_steps:
            fork = min(fork_steps, key=lambda s: (abs(s - fork), -s))
        shape = cand["shape"]
        power = float(cand.get("power", 2.0)) if shape in POWER_SHAPES else 2.0
        key = (fork, shape, power, float(cand.get("min_lr_ratio", 0.0)))
        if key in seen:
            continue
        seen.add(key)
        p = predict_branch(fits, lineage, version, shape, float(cand["fraction"]), key[3], power,
                           weights=weights, fork_step=fork)
        out.append({**p, "grid_index": i})
    out.sort(key=lambda c: (c["objective"] if math.isfinite(c["objective"]) else math.inf,
                            c["branch_steps"], c["grid_index"]))
    return out


def spread_picks(ranked: Sequence[Mapping], n: int, observed: Sequence[Mapping] = ()) -> list[Mapping]:
    """``n`` candidates of ``ranked`` (best first) spread over end LR and decay shape.

    Why not simply the top ``n``: the guide's first fit has seen only the release branches
    (one shape, decaying to LR 0), and the top of its ranking shares that blind spot. In the
    law benchmark the top 4 were all steep decays to LR 0 and finished 0.8-1.5% behind gentle
    decays to 13-28% of the peak LR. So each pick is the best-predicted candidate among those
    whose ``min_lr_ratio``, then whose shape, has been picked or ``observed`` least so far;
    the law still chooses the length and shape within each group.

    observed: decays (``shape``, ``min_lr_ratio``) of this version's finished branches: the
        release branch and earlier sweeps' trials. They count as picks already made, so the
        first trial explores where the law extrapolates furthest instead of re-measuring the
        region the lineage has measured (each counts at the ``min_lr_ratio`` of ``ranked``
        nearest to its own). Without them the first pick is the law's favourite.
    """
    ends = sorted({float(c["min_lr_ratio"]) for c in ranked})
    seen = [(min(ends, key=lambda e: (abs(e - float(o.get("min_lr_ratio", 0.0))), e)), o.get("shape"))
            for o in observed] if ends else []
    rest, picks = list(ranked), []
    while rest and len(picks) < n:
        made = seen + [(float(p["min_lr_ratio"]), p["shape"]) for p in picks]

        def used(c: Mapping) -> tuple[int, int]:
            return (sum(m == float(c["min_lr_ratio"]) for m, _ in made), sum(sh == c["shape"] for _, sh in made))
        i = min(range(len(rest)), key=lambda j: (*used(rest[j]), j))
        picks.append(rest.pop(i))
    return picks


def optuna_point(candidate: Mapping, replay_ratio: float | None = None) -> dict:
    """A ranked candidate as an OptunaSearch ``points_to_evaluate`` entry (the sweep's
    parameter names: fraction, shape, power only for polynomial/exponential, min_lr_ratio,
    replay_ratio). The fraction is the snapped one, so the trial forks where predicted."""
    point = {"fraction": float(candidate["fraction_actual"]), "shape": candidate["shape"]}
    if candidate["shape"] in POWER_SHAPES:
        point["power"] = float(candidate["power"])
    point["min_lr_ratio"] = float(candidate["min_lr_ratio"])
    if replay_ratio is not None:
        point["replay_ratio"] = float(replay_ratio)
    return point


# --------------------------------------------------------------------------- sweep guidance

class LawGuide:
    """The law's view of one branch search; what :mod:`raypath.sweep` plugs into Tune.

    :func:`raypath.sweep.law_guidance` wires it into a sweep (``sweep.guide: law``)::

        guide = lawfit.LawGuide(run_dir, version, weights=plan.weights, forks=space.forks)
        # 1. the best predicted candidates first: Optuna enqueues them before TPE samples
        points = guide.points_to_evaluate(n, fraction=sc.fraction, shapes=sc.shapes, ...)
        searcher = OptunaSearch(space=space, ..., points_to_evaluate=points)
        # 2. stop trials that cannot win, 3. refit after every finished trial
        stopper = lawfit.LawStopper(guide, margin=sc.stop_margin, record_path=...)
        refit = lawfit.LawRefitCallback(guide, stopper=stopper, name=plan.segment_name,
                                        curve_path=plan.curve_path)
        tune.RunConfig(..., stop=stopper, callbacks=[refit])

    Both run in the Tune driver, so they share the guide: every refit changes the
    forecasts the stopper makes next. A stopped trial ends without its final
    checkpoint, so the sweep should record it as ``stopped`` (not ``incomplete``) and
    Optuna is told its last, partial ``score``.

    The stopper reads ``step``, ``objective`` (the sweep's per-eval weighted val loss),
    ``fork_step`` and ``branch_steps`` from each result and the decay from
    ``result["config"]`` (or a config registered with :meth:`LawStopper.register`).
    Predictions use the same per-split weights as the trials' ``objective``.

    If the lineage has too few points for a split (e.g. a version with no branch yet: its
    new split has no annealing observation), the guide still ranks (degenerate
    parameters are reported in ``fits``), and the stopper uses the law only as a relative
    forecast of the remaining improvement.
    """

    def __init__(self, run_dir: str | os.PathLike, version: str | int, *,
                 weights: Mapping[str, float] | None = None, forks: Sequence | None = None,
                 law: str = "auto", include_sweeps: bool = True, save: bool = True):
        from raypath.lineage import Lineage

        self.run_dir = Path(run_dir)
        self.lineage = Lineage.load(self.run_dir).data
        self.version = resolve_version(self.lineage, version)
        self.weights = split_weights(self.lineage, self.version, weights)
        self.forks = list(forks) if forks else None
        self.law = law
        self.include_sweeps = include_sweeps
        self.save = save
        self.trials: list[dict] = []  # lineage-style entries of finished sweep trials
        self.fits: dict[str, FitResult] = {}
        self.refit()

    # ---- fitting
    def refit(self) -> dict[str, FitResult]:
        """Refit every split on the lineage's curves plus the finished trials added so far."""
        self.fits = fit_run(self.lineage, self.version, law=self.law, run_dir=self.run_dir,
                            extra_branches=self.trials, include_sweeps=self.include_sweeps, save=self.save)
        return self.fits

    def add_trial(self, name: str, config: Mapping, curve_path: str | os.PathLike, *, refit: bool = True) -> None:
        """Add a finished trial's curve (its Tune config and the JSONL its segment wrote)."""
        if any(t["name"] == name for t in self.trials) or not Path(curve_path).is_file():
            return
        self.trials.append(trial_branch(name, self.version, config, str(curve_path)))
        if refit:
            self.refit()

    # ---- ranking
    def rank(self, grid: Sequence[Mapping] | None = None) -> list[dict]:
        return rank_candidates(self.fits, self.lineage, self.version, grid, self.weights, forks=self.forks)

    def points_to_evaluate(self, n: int = 4, *, fraction: tuple[float, float] = (0.05, 0.5),
                           shapes: Sequence[str] = SHAPES, power: tuple[float, float] | None = None,
                           min_lr_ratio: tuple[float, float] = (0.0, 0.1), replay_ratio: float | None = None,
                           n_fractions: int = 10) -> list[dict]:
        """``n`` of the best predicted candidates inside the sweep's ranges, spread over end LR
        and shape around the branches already observed (:func:`spread_picks`), as Optuna points.

        The grid spans the sweep's ranges (min_lr_ratio at both ends); with ``forks`` each
        fraction snaps to an existing fork point first."""
        mins = sorted({float(min_lr_ratio[0]), float(min_lr_ratio[1])})
        grid = default_grid(fraction, n_fractions, shapes, power, mins)
        ranked = self.rank(grid)
        lo, hi = fraction
        inside = [c for c in ranked if lo - 1e-9 <= c["fraction_actual"] <= hi + 1e-9] or ranked
        return [optuna_point(c, replay_ratio) for c in spread_picks(inside, n, self.observed_decays())]

    def observed_decays(self) -> list[dict]:
        """Decays of the finished branches of this version the law is fitted on."""
        pool = lineage_branches(self.lineage, include_sweeps=self.include_sweeps) + self.trials
        return [b.get("decay") or {} for b in pool if b.get("version") == self.version]

    # ---- per-trial forecasts
    def predict_objective(self, config: Mapping, steps: Sequence[int], fork_step: int | None = None,
                          branch_steps: int | None = None) -> np.ndarray:
        """Predicted objective at curve-record ``steps`` of the trial with ``config``."""
        fork = int(fork_step if fork_step is not None else config["fork_step"])
        bsteps = branch_steps if branch_steps is not None else config.get("branch_steps")
        power = config.get("power")
        decay = Decay(config["shape"], float(config.get("min_lr_ratio", 0.0)), float(power) if power else 2.0)
        per = predict_curve(self.fits, self.lineage, self.version, decay, fork, steps,
                            branch_steps=None if bsteps is None else int(bsteps))
        return sum(w * per[s] for s, w in self.weights.items() if s in per)


class LawStopper:
    """Tune stopper: stop a branch trial whose observed curve shows it cannot win.

    At each result carrying ``objective`` at ``step`` ``t`` past ``min_progress`` of the
    branch (and before its last :data:`FINISH_SHARE`), the trial's final objective is
    forecast as the observed value plus the law's predicted remaining change,
    ``obs(t) + pred(end) - pred(t)`` (the law corrects the
    trial's own level, so a curve that departs from its prediction is judged by where it
    actually is). The trial is stopped when that forecast is worse than the best finished
    trial's objective by more than ``margin`` (relative). The best is ``best_so_far_fn()``
    when given, else the best final objective this stopper has seen (a result at the
    trial's last step) or was told (:meth:`record_final`).

    Tune accepts it as ``RunConfig(stop=stopper)`` (a callable ``(trial_id, result) ->
    bool``). ``decisions`` keeps the last forecast per trial for the sweep's record; with
    ``record_path`` the decisions that stopped a trial are also written there (JSON,
    atomically, as they are made), so they survive the driver.
    """

    def __init__(self, guide: LawGuide, *, margin: float = 0.01, min_progress: float = 0.25,
                 metric: str = "objective", best_so_far_fn: Callable[[], float | None] | None = None,
                 record_path: str | None = None):
        self.guide = guide
        self.record_path = record_path
        self.margin = float(margin)
        self.min_progress = float(min_progress)
        self.metric = metric
        self.best_so_far_fn = best_so_far_fn
        self.configs: dict[str, dict] = {}
        self.finals: dict[str, float] = {}
        self.decisions: dict[str, dict] = {}

    def register(self, trial_id: str, config: Mapping) -> None:
        self.configs[trial_id] = dict(config)

    def record_final(self, trial_id: str, objective: float) -> None:
        self.finals[trial_id] = float(objective)

    def best(self) -> float | None:
        if self.best_so_far_fn is not None:
            return self.best_so_far_fn()
        return min(self.finals.values()) if self.finals else None

    def forecast(self, config: Mapping, step: int, observed: float, fork_step: int | None = None,
                 branch_steps: int | None = None) -> float:
        fork = int(fork_step if fork_step is not None else config["fork_step"])
        bsteps = int(branch_steps if branch_steps is not None else config["branch_steps"])
        now, end = self.guide.predict_objective(config, [step, fork + bsteps], fork, bsteps)
        return float(observed + (end - now))

    def __call__(self, trial_id: str, result: Mapping) -> bool:
        value = result.get(self.metric)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        config = {**self.configs.get(trial_id, {}), **dict(result.get("config") or {})}
        fork = result.get("fork_step", config.get("fork_step"))
        bsteps = result.get("branch_steps", config.get("branch_steps"))
        step = result.get("step")
        if fork is None or bsteps is None or step is None or "shape" not in config:
            return False
        fork, bsteps, step = int(fork), int(bsteps), int(step)
        if step >= fork + bsteps:
            self.record_final(trial_id, float(value))
            return False
        progress = (step - fork) / max(bsteps, 1)
        if progress < self.min_progress or progress > 1.0 - FINISH_SHARE:
            return False  # too early to judge, or so close to the end that stopping saves nothing
        best = self.best()
        if best is None:
            return False
        forecast = self.forecast(config, step, float(value), fork, bsteps)
        stop = forecast > best * (1.0 + self.margin)
        self.decisions[trial_id] = {"step": step, "observed": float(value), "forecast": forecast,
                                    "best": float(best), "stop": bool(stop)}
        if stop:
            log.info("law stopper: trial %s at step %d forecasts %.4f > best %.4f (+%.1f%%): stopped",
                     trial_id, step, forecast, best, 100 * self.margin)
            if self.record_path:
                from raypath.storage import write_json

                write_json(self.record_path, {t: d for t, d in self.decisions.items() if d["stop"]})
        return bool(stop)


def LawRefitCallback(guide: LawGuide, *, curve_path: Callable[[str], str],
                     name: Callable[[str], str] | None = None, stopper: LawStopper | None = None):
    """A Tune ``Callback`` that refits ``guide`` after every finished trial.

    curve_path: trial id -> the JSONL its branch segment wrote (the sweep's
        ``RUN_DIR/sweeps/vK/<name>/curves/<segment>.jsonl``).
    name: trial id -> segment name (default ``trial-<id>``), used to dedupe curves.
    stopper: also told the trial's final objective (trials that reached their last step),
        so it knows the best finished trial without ``best_so_far_fn``.
    """
    from ray.tune import Callback

    class _Refit(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            # The stopper needs each trial's decay; registering it here does not rely on
            # every result carrying the trial's config.
            if stopper is not None:
                stopper.register(trial.trial_id, trial.config)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            config = dict(trial.config or {})
            done = ("fork_step" in config and "branch_steps" in config
                    and int(last.get("step", -1)) >= int(config["fork_step"]) + int(config["branch_steps"]))
            if not done:
                return  # stopped or failed: a partial decay would mislead the fit
            if stopper is not None and isinstance(last.get(stopper.metric), (int, float)):
                stopper.record_final(trial.trial_id, float(last[stopper.metric]))
            try:
                guide.add_trial(name(trial.trial_id) if name else f"trial-{trial.trial_id}", config,
                                curve_path(trial.trial_id))
            except Exception as e:  # a failed refit must not kill the sweep
                log.warning("law refit after trial %s failed: %s", trial.trial_id, e)

    return _Refit()


# --------------------------------------------------------------------------- plotting

def plot_prediction(run_dir: str | os.PathLike, lineage: Mapping, fits: Mapping[str, FitResult], version: str,
                    prediction: Mapping, out_png: str | os.PathLike) -> Path:
    """Per split: observed main-path and branch val curves of ``version``, and the law's
    predicted curve for the branch in ``prediction`` (plus the fitted main path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypath.storage import save_figure

    splits = list(fits)
    fig, axes = plt.subplots(len(splits), 1, figsize=(9.0, 3.2 * len(splits)), squeeze=False)
    m = _main(lineage, version)
    sched = main_schedule(lineage)
    decay = Decay(prediction["shape"], prediction["min_lr_ratio"], prediction["power"])
    fork, end = prediction["fork_step"], prediction["end_step"]
    for ax, split in zip(axes[:, 0], splits):
        phases = _phases(lineage, split, version)
        curves = curves_from_lineage(lineage, split, version, run_dir=run_dir)
        for c in curves:
            if c.name == "main":
                ax.plot(c.steps + 1, c.losses, "o-", color="black", ms=3, lw=0.8, label="main path (observed)")
            else:
                ax.plot(c.steps + 1, c.losses, "o-", ms=3, lw=1.2, label=f"{c.name} (observed)")
        grid = np.arange(max(int(m["start_step"]), 1), end + 1)
        main_pred = fits[split].predict(main_lrs(sched, end), grid - 1, **phases)
        ax.plot(grid, main_pred, "--", color="0.5", lw=1.0, label="main path (law)")
        bgrid = np.arange(fork, end + 1)
        pred = fits[split].predict(branch_lrs(sched, fork, end - fork, decay, n=end), np.maximum(bgrid - 1, 0),
                                   **phases)
        ax.plot(bgrid, pred, "-", color="crimson", lw=2.0,
                label=f"predicted {decay.shape} f={prediction['fraction_actual']:.2f} (law)")
        ax.plot([end], [prediction["predicted"][split]], "*", color="crimson", ms=12)
        ax.set_title(f"val/{split}: {fits[split].law} R^2 {fits[split].r2:.3f}, MAPE {fits[split].mape:.2f}%",
                     fontsize=10)
        ax.set_xlim(int(m["start_step"]) - 0.05 * (end - int(m["start_step"])), end + 2)
        ax.set_ylabel("val loss")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7.5, loc="upper right")
    axes[-1, 0].set_xlabel("global step")
    fig.suptitle(f"{lineage.get('name', 'run')} {version}: predicted branch vs observed curves")
    fig.tight_layout()
    out = Path(out_png)
    save_figure(fig, out)
    plt.close(fig)
    return out


def format_fits(fits_record: Mapping[str, FitResult], lineage: Mapping, version: str,
                curves: Mapping[str, Sequence[Curve]] | None = None) -> str:
    """``raypath law fit`` output: per split, its data switches, points, R^2, MAPE,
    parameters, degenerate ones, and the held-out errors the law was chosen by."""
    lines = [f"law fits for releasing {version} (per validation split)"]
    for split in splits_for(lineage, version):
        fit = fits_record.get(split)
        role = "new" if split == version else "old"
        if fit is None:
            lines.append(f"  {split} ({role}): not fitted (too few observed points)")
            continue
        params = ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items())
        switches = ", ".join(map(str, boundaries(lineage, split, version)))
        lines.append(f"  {split} ({role}, data switches at steps {switches}): {fit.law}, "
                     f"n={fit.n_points}, R^2={fit.r2:.4f}, MAPE={fit.mape:.3f}%, lambda={fit.lam:g}")
        if fit.held_out:
            lines.append("      chosen by held-out error: "
                         + ", ".join(f"{k} {v:.3g}" for k, v in fit.held_out.items()))
        lines.append(f"      params: {params}")
        lines.append(f"      degenerate: {', '.join(fit.degenerate) if fit.degenerate else 'none'}")
    return "\n".join(lines)
