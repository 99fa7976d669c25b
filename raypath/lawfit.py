"""The scaling law on a real lineage: curves, per-split fits, branch predictions.

:mod:`raypath.law` holds the math (areas, laws, fitting). This module connects it to what a
run records -- ``lineage.json`` and the ``curves/*.jsonl`` of every segment:

* :func:`curves_from_lineage` -- one :class:`~raypath.law.Curve` per path that observed a
  validation split: the main path (all ``main-*`` segments, one LR history) and every
  finished branch (lineage branches, plus finished sweep trials).
* :func:`fit_run` -- one law per validation split relevant to releasing a version (the
  version's own split and every older one), saved to ``RUN_DIR/law/fit-<version>.json``.
* :func:`predict_branch` / :func:`predict_curve` -- predicted val losses and the weighted
  objective of a candidate branch, before it is trained.

What builds on it lives elsewhere: the sweep guidance (ranking a grid of candidates,
stopping and refitting inside Ray Tune) in :mod:`raypath.lawguide`; the ``raypath law``
plot and text (:func:`raypath.report.plot_prediction`, :func:`raypath.report.format_fits`)
in :mod:`raypath.report`.

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
multi-shift law (:func:`raypath.law.multi_shift_law`) gives each its own shift term, and
optionally its own linear drift (forgetting that grows or recovers with the tokens since
the switch) and an annealing coefficient per phase between switches. An old split ``j > 1``
also saw a switch *to* its data, at the start of its own main segment (:func:`entry_step`,
``Curve.entry``): while it was the new split its law had a shift term there (``B < 0``),
and the multi-shift forms keep that term (``B0``) next to the later ones, so the fall of
its loss over its own segment is not left to the power law alone. :func:`fit_run` fits
these forms next to the single-shift law wherever a split has more than one switch or an
entry and keeps the one that best predicts the final loss of held-out branches of the
released version (:func:`raypath.law.select_fit`); on a two-version lineage every split
has one switch and no entry, and the fit is the single-shift one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from raypath import law as lawmod
from raypath import schedules
from raypath.console import Progress
from raypath.law import Curve, FitResult, LRHistory
from raypath.lineage import Branch, Lineage, MainEntry, resolve_version
from raypath.mainpath import fork_step as _fork_step
from raypath.releases import objective_weights
from raypath.schedules import Decay, MainPath, decay_fraction, decay_from, decay_progress, main_schedule

log = logging.getLogger(__name__)

LAW_DIR = "law"
#: Default old/new weights of the objective (same convention as ``sweep.weights``).
DEFAULT_WEIGHTS = {"old": 0.5, "new": 0.5}
#: Observed points below which :func:`fit_run` skips a split (no law is fitted on it).
MIN_POINTS = 4


# --------------------------------------------------------------------------- lineage access
#
# Public functions take whatever :meth:`Lineage.of` accepts (a Lineage, a run directory, a
# lineage document) and convert it once; inside, the Lineage travels as it is.

#: What the public functions accept as ``lineage``.
LineageLike = Lineage | Mapping | str | os.PathLike


def _mains(lineage: Lineage) -> dict[str, MainEntry]:
    return {m.version: m for m in lineage.main_path()}


def main_entry(lineage: LineageLike, version: str) -> MainEntry:
    """The lineage's main-path entry of ``version`` (a ValueError if it has none)."""
    lineage = Lineage.of(lineage)
    m = lineage.main(version)
    if m is None:
        raise ValueError(f"version {version!r}: no main-path segment in the lineage "
                         f"(trained: {', '.join(_mains(lineage)) or 'none'})")
    return m


def version_name(lineage: LineageLike, version: str | int | None) -> str:
    """A version's name from a name (``v2``), a 1-based number (``2``) or None (the latest
    trained), by :func:`raypath.lineage.resolve_version`."""
    lineage = Lineage.of(lineage)
    names = lineage.version_names()
    if version is None:
        trained = _mains(lineage)
        names = [v for v in names if v in trained]
        if not names:
            raise ValueError("the lineage has no trained main-path version yet")
    return names[resolve_version(names, version)]


def lineage_schedule(lineage: LineageLike) -> MainPath:
    """The main path's schedule, as the lineage's first main-path entry recorded it (its
    recorded ``config.train`` as fallback)."""
    lineage = Lineage.of(lineage)
    mains = lineage.main_path()
    if mains and mains[0].max_lr is not None:
        return main_schedule(mains[0])
    return main_schedule(lineage.config.get("train", {}))


def cpt_start(lineage: LineageLike, split: str, version: str) -> int:
    """First step of the split's cpt phase when releasing ``version`` (see the module doc)."""
    m = main_entry(lineage, split)
    return int(m.start_step if split == version else m.end_step)


def boundaries(lineage: LineageLike, split: str, version: str) -> list[int]:
    """Every data switch the split sees when releasing ``version``, in order: ``cpt_start``,
    then for an old split the end of each later version's main segment before ``version``
    (the first step trained on the next version's data; see the module doc)."""
    lineage = Lineage.of(lineage)
    if split == version:
        return [cpt_start(lineage, split, version)]
    names, mains = lineage.version_names(), _mains(lineage)
    later = names[names.index(split): names.index(version)]
    return [int(mains[v].end_step) for v in later if v in mains]


def entry_step(lineage: LineageLike, split: str, version: str) -> int:
    """Where an old split's own data entered the training data: the first step of its main
    segment, when that is after step 0; 0 for the first version and for the new split
    (whose ``cpt_start`` is that step; see the module doc)."""
    return 0 if split == version else int(main_entry(lineage, split).start_step)


def split_phases(lineage: LineageLike, split: str, version: str) -> dict:
    """``cpt_start``, ``shifts`` and ``entry`` of the split's curves (keyword arguments of
    :class:`~raypath.law.Curve` and :meth:`~raypath.law.FitResult.predict`)."""
    lineage = Lineage.of(lineage)
    first, *later = boundaries(lineage, split, version)
    return {"cpt_start": first, "shifts": tuple(later), "entry": entry_step(lineage, split, version)}


def splits_for(lineage: LineageLike, version: str) -> list[str]:
    """Validation splits relevant to releasing ``version``: older versions, then its own."""
    names = Lineage.of(lineage).version_names()
    return names[: names.index(version) + 1]


def split_weights(lineage: LineageLike, version: str,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-split objective weights: ``{old, new}`` -> w_old spread over older splits, w_new on
    ``version`` (:func:`raypath.releases.objective_weights`, what sweeps and releases score by);
    a per-split mapping (``{"v1": .5, "v2": .5}``) passes through."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    splits = splits_for(lineage, version)
    if set(weights) - {"old", "new"}:
        unknown = sorted(set(weights) - set(splits))
        if unknown:
            raise ValueError(f"objective weights name splits {unknown} that are not splits of {version}")
        return {k: float(v) for k, v in weights.items()}
    if len(splits) > 1 and weights.get("old", 0.0) + weights.get("new", 0.0) <= 0:
        raise ValueError(f"objective weights must not all be 0: {weights}")
    return objective_weights(splits, len(splits) - 1, weights)


# --------------------------------------------------------------------------- LR histories

def main_lrs(main: MainPath, n: int) -> LRHistory:
    """Effective LR of the main path for steps ``0..n-1`` (warmup counted at max LR): flat."""
    return LRHistory(n, float(main.max_lr), np.zeros(0))


def branch_history(main: MainPath, fork: int, steps: int, decay: Decay, n: int | None = None) -> LRHistory:
    """Effective LR history of :class:`~raypath.schedules.Branch` for steps ``0..n-1``
    (``n`` = fork + steps by default): the main path's peak up to the fork (a fork inside the
    warmup too: warmup steps count as max LR), then the decay, vectorised."""
    n = fork + steps if n is None else n
    branch = schedules.Branch(main, fork, steps, decay)
    idx = np.arange(fork, n)
    tail = np.full(len(idx), float(branch.end_lr))
    inside = idx < fork + steps
    frac = decay_fraction(decay_progress(idx[inside] - fork, steps), decay.shape, decay.power)
    tail[inside] = branch.end_lr + (branch.start_lr - branch.end_lr) * frac
    return LRHistory(min(fork, n), float(main.max_lr), tail)


# --------------------------------------------------------------------------- curves

def _read_records(path: str | os.PathLike, held: "CurveRecords | None" = None) -> list[dict]:
    """A curve's evaluation records (``step`` and its ``val/*`` losses; the callers must not
    change them), parsed once per version of the file: by ``held`` when given, else through a
    process-wide cache of the last 4,096 files read. What is kept grows with the evaluations
    (about one record in ``eval_every / log_every``), not with the logged steps."""
    if held is not None:
        return held(path)
    p = Path(path)
    try:
        st = p.stat()
    except OSError:  # not written yet
        return []
    return _eval_records(str(p), st.st_mtime_ns, st.st_size)


def _parse_records(path: str) -> list[dict]:
    """The evaluation records of a curve as :func:`raypath.report.read_curve` reads it (a step
    logged twice by a resumed segment: the later record; restart markers skipped), without the
    data frame: a law fit parses every curve of the run, a few thousand files at 40 versions of
    100-trial sweeps, and a frame per file cost 5x the parse."""
    from raypath.storage import read_jsonl

    if not os.path.isfile(path):
        return []
    last: dict[int, dict] = {}
    for r in read_jsonl(path):
        if "event" not in r and "step" in r:
            last[r["step"]] = r
    out = []
    for step in sorted(last):
        vals = {k: v for k, v in last[step].items() if k.startswith("val/") and _finite(v)}
        if vals:
            out.append({"step": step, **vals})
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@functools.lru_cache(maxsize=4096)
def _eval_records(path: str, mtime_ns: int, size: int) -> list[dict]:
    return _parse_records(path)


class CurveRecords:
    """The parsed evaluation records of every curve file read through it, each kept until its
    file changes (size or mtime), with no bound.

    A sweep's law guide refits after every finished trial on the whole run's curves, which are
    finished and never change; past the process-wide cache's 4,096 files (about 41 versions of
    100-trial sweeps) each refit would parse every curve of the run again. Held by the guide, a
    refit parses only the curves it has not read yet. Not for pickling: the guide leaves it out
    of the state Tune pickles (``tuner.pkl``), where it would grow with every curve of the run."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[tuple[int, int], list[dict]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __call__(self, path: str | os.PathLike) -> list[dict]:
        p = str(path)
        try:
            st = os.stat(p)
        except OSError:  # not written yet
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        held = self._held.get(p)
        if held is None or held[0] != stamp:
            held = self._held[p] = (stamp, _parse_records(p))
        return held[1]


def _find_curve(run_dir: Path | None, name: str, recorded: str | None) -> Path:
    from raypath.report import find_curve

    return find_curve(run_dir, name, recorded)


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


def trial_branch(name: str, version: str, config: Mapping, curve: str | None = None) -> Branch:
    """A sweep trial as a finished branch (what :func:`curves_from_lineage` reads).

    ``config`` is the trial's Tune config (``fork_step``, ``branch_steps``, ``shape``,
    ``min_lr_ratio``, optional ``power``)."""
    return Branch(name=name, version=version, fork_step=int(config["fork_step"]),
                  steps=int(config["branch_steps"]), decay=dataclasses.asdict(decay_from(config)), curve=curve)


def _sweep_branches(lineage: Lineage) -> list[Branch]:
    out = []
    for sw in lineage.sweeps():
        for t in sw.trials:
            if t.status != "done" or not (t.name and t.config and t.curve):
                continue
            try:
                out.append(trial_branch(t.name, sw.version, t.config, t.curve))
            except (KeyError, TypeError, ValueError):  # a config without a fork, a length or a known decay
                continue
    return out


def lineage_branches(lineage: LineageLike, *, include_sweeps: bool = True) -> list[Branch]:
    """Finished branches: the lineage's, then sweep trials not already among them (by name).

    Without ``include_sweeps`` no sweep trial is included, not even one a sweep released
    (a lineage branch with a ``sweep``): only the configured release branches."""
    lineage = Lineage.of(lineage)
    out = [b for b in lineage.branches() if include_sweeps or not b.sweep]
    names = {b.name for b in out}
    if include_sweeps:
        out += [b for b in _sweep_branches(lineage) if b.name not in names]
    return out


def _run_dir(lineage: Lineage, run_dir) -> Path | None:
    """``run_dir`` if given, else the lineage's own directory; a lineage held in memory falls
    back to the ``run_dir`` its config recorded."""
    if run_dir is not None:
        return Path(run_dir)
    if lineage.run_dir is not None:
        return lineage.run_dir
    rd = lineage.config.get("run_dir")
    return Path(rd) if rd else None


def curves_from_lineage(lineage: LineageLike, split: str, upto_version: str | None = None, *,
                        run_dir: str | os.PathLike | None = None, branches: Iterable[str] | None = None,
                        extra_branches: Sequence[Branch | Mapping] = (), include_main: bool = True,
                        include_sweeps: bool = True, release_version: str | None = None,
                        records: CurveRecords | None = None) -> list[Curve]:
    """Observed curves of validation split ``split`` (the ``val/<split>`` records).

    upto_version: only segments of versions up to this one (what was known when it was
        released); None = every trained version.
    run_dir: where curves are looked up first (default: the lineage's directory, else its
        ``config.run_dir``).
    branches: names of the branches to include; None = all finished ones.
    extra_branches: more finished branches, :class:`~raypath.lineage.Branch` records or their
        dicts (e.g. :func:`trial_branch` of sweep trials finished since the lineage was read).
    release_version: the version whose release the fit is for: decides ``cpt_start``
        (default ``upto_version``, else the latest trained version).
    records: a :class:`CurveRecords` to parse the curves through (default: the process-wide
        cache of the last 4,096 files).
    """
    return split_curves(lineage, [split], upto_version, run_dir=run_dir, branches=branches,
                        extra_branches=extra_branches, include_main=include_main, include_sweeps=include_sweeps,
                        release_version=release_version, records=records)[split]


def split_curves(lineage: LineageLike, splits: Sequence[str], upto_version: str | None = None, *,
                 run_dir: str | os.PathLike | None = None, branches: Iterable[str] | None = None,
                 extra_branches: Sequence[Branch | Mapping] = (), include_main: bool = True,
                 include_sweeps: bool = True, release_version: str | None = None,
                 records: CurveRecords | None = None) -> dict[str, list[Curve]]:
    """:func:`curves_from_lineage` of each of ``splits`` (same options), reading each curve
    file once for all of them: a curve records every split it observed, and a lineage of n
    versions has n splits to fit, so reading the curves per split read every file n times
    (past :func:`_eval_records`'s cache, a re-parse each time)."""
    lineage = Lineage.of(lineage)
    rd = _run_dir(lineage, run_dir)
    versions = lineage.version_names()
    mains = _mains(lineage)
    upto = version_name(lineage, upto_version)
    allowed = set(versions[: versions.index(upto) + 1])
    release = release_version or upto
    for split in splits:
        if split not in mains:
            raise ValueError(f"split {split!r}: no main-path segment of that version")
    phases = {split: split_phases(lineage, split, release) for split in splits}
    sched = lineage_schedule(lineage)
    curves: dict[str, list[Curve]] = {split: [] for split in splits}
    if include_main:
        main_records = _main_records([mains[v] for v in versions if v in allowed and v in mains], rd, records)
        for split in splits:
            main = _main_curve(main_records, f"val/{split}", sched, phases[split])
            curves[split] += [main] if main is not None else []
    wanted = None if branches is None else set(branches)
    pool = lineage_branches(lineage, include_sweeps=include_sweeps) + [Branch.from_dict(b) for b in extra_branches]
    seen = set()
    progress = Progress(log, f"reading the branches' curves up to {upto}", len(pool), "branches")
    for b in pool:
        progress.add(1)
        if b.name in seen or b.version not in allowed:
            continue
        if wanted is not None and b.name not in wanted:
            continue
        seen.add(b.name)
        # One branch's records at a time: what is kept across the pool is the splits' Curves.
        # Each split still scans the records (work ~ curves x splits, as the points to fit grow).
        recs = _read_records(_find_curve(rd, b.name, b.curve), records)
        shared: list[np.ndarray] = []  # the branch's LR history: one array for all its splits' Curves
        for split in splits:
            curve = _branch_curve(b, recs, f"val/{split}", sched, phases[split], shared)
            curves[split] += [curve] if curve is not None else []
    if wanted is not None and (missing := wanted - seen - {"main"}):
        log.debug("splits %s: requested branches without observations: %s", ", ".join(splits), sorted(missing))
    return curves


def _main_records(segments: Sequence[MainEntry], rd: Path | None, held: CurveRecords | None = None) -> list[dict]:
    """The evaluation records of the main path's ``segments``, each up to its segment's end."""
    records = []
    for m in segments:
        records += [r for r in _read_records(_find_curve(rd, m.segment, m.curve), held) if r["step"] <= m.end_step]
    return records


def _main_curve(records: Sequence[dict], key: str, sched: MainPath, phases: dict) -> Curve | None:
    """The main path's ``key`` observations among its ``records`` (None without any)."""
    steps, losses = _observed(records, key)
    if not len(steps):
        return None
    order = np.argsort(steps, kind="stable")
    steps, losses = steps[order], losses[order]
    steps, first = np.unique(steps, return_index=True)
    losses = losses[first]
    return Curve(main_lrs(sched, int(steps.max()) + 1), steps, losses, name="main", **phases)


def _branch_curve(b: Branch, records: Sequence[dict], key: str, sched: MainPath, phases: dict,
                  shared: list | None = None) -> Curve | None:
    """A finished branch's ``key`` observations after its fork, among its curve's ``records``
    (None without any). ``shared``: where the branch's LR history is kept for its other splits'
    Curves (empty at first). A branch of version k observes k splits, and an LR history per split
    made a fit's curves grow with versions² x trials x steps (518 MB at 20 versions of 100 trials);
    one per branch, held from its fork on (:class:`~raypath.law.LRHistory`), grows with its steps."""
    fork, steps = int(b.fork_step), int(b.steps)
    obs_steps, losses = _observed((r for r in records if r["step"] > fork), key, upto=fork + steps)
    if not len(obs_steps):
        return None
    shared = [] if shared is None else shared
    if not shared:
        history = branch_history(sched, fork, steps, decay_from({"shape": "1-sqrt", **(b.decay or {})}))
        history.tail.flags.writeable = False  # shared by the splits' Curves
        shared.append(history)
    return Curve(shared[0], obs_steps, losses, name=b.name, **phases)


# --------------------------------------------------------------------------- fitting

def _choose_law(law: str, curves: Sequence[Curve]) -> str:
    if law != "auto":
        return law
    has_cpt = any(c.cpt_start > 0 and np.any(c.steps >= c.cpt_start) for c in curves)
    return "CPTLaw" if has_cpt else "AnnealingLaw"


SHIFTS = ("auto", "single", "multi")


def _shift_candidates(chosen: str, curves: Sequence[Curve], shifts: str, n_points: int) -> list:
    """The laws :func:`fit_run` chooses from for one split, simplest first: the single-shift
    CPT law; the multi-shift one with a term per data switch that some observation comes
    after (a switch nothing was observed after would be a flat parameter) and, for an old
    split that entered after step 0, a term for its entry; the same with a drift per switch,
    a stability gap per switch, both, and a drift per switch with an annealing coefficient
    per phase (:data:`MULTI_FORMS`, :func:`raypath.law.multi_shift_law`). A form with as
    many parameters as points is left out; ``multi`` offers the multi-shift forms only."""
    if chosen != "CPTLaw" or shifts == "single":
        return [chosen]
    last = max((int(c.steps.max()) for c in curves if len(c.steps)), default=-1)
    n_switches = 1 + sum(b <= last for b in curves[0].shifts)
    entry = curves[0].entry > 0
    if n_switches == 1 and not entry:
        return [chosen]
    forms = [lawmod.multi_shift_law(n_switches, entry=entry, **kw) for kw in MULTI_FORMS]
    forms = [f for i, f in enumerate(forms) if f not in forms[:i]]  # one switch: anneal adds nothing
    forms = [f for f in forms if n_points >= len(f.param_names) + 1]
    if not forms:
        return [chosen]
    return forms if shifts == "multi" else [chosen, *forms]


#: The multi-shift forms :func:`fit_run` compares (keyword arguments of
#: :func:`raypath.law.multi_shift_law`), simplest first. A ``gap`` form doubles the fit's
#: starting points; all five make a split's selection about 5x the single-shift fit's time.
MULTI_FORMS = ({}, {"drift": True}, {"gap": True}, {"drift": True, "gap": True},
               {"anneal": True, "drift": True})


def _n_points(curves: Sequence[Curve]) -> int:
    return int(sum(len(c.steps) for c in curves))


def _split_problem(law: str, split: str, version: str, curves: Sequence[Curve], shift_sign: bool) -> tuple | None:
    """``(law, curves, sign bounds)`` to fit ``split`` with; None below 4 observed points.
    A split with too few points for the chosen law falls back to the annealing law."""
    n = _n_points(curves)
    chosen = _choose_law(law, curves)
    if n < len(lawmod.LAWS[chosen].param_names) + 1 and chosen != "AnnealingLaw":
        log.warning("split %s: %d points are too few for %s; fitting AnnealingLaw", split, n, chosen)
        chosen = "AnnealingLaw"
    if n < MIN_POINTS:
        log.warning("split %s: %d observed points, too few to fit; skipped", split, n)
        return None
    sign = {"B": -1 if split == version else 1} if shift_sign else None
    return chosen, curves, sign


def _fit_split(split: str, chosen: str, curves: Sequence[Curve], sign: dict | None, shifts: str,
               lam: float, delta: float | None = None, form: str | None = None,
               start: Mapping[str, float] | None = None) -> FitResult:
    """One split's fit: ``form`` where one is named (but for an annealing-only split), from
    ``start`` (raw parameters) where given, else from the law's grid of starts; else among the
    laws :func:`_shift_candidates` offers the one that predicts held-out branches best
    (:func:`raypath.law.select_fit`)."""
    if form is not None and chosen != "AnnealingLaw":
        return lawmod.fit_law(form, curves, lam=lam, sign=sign, delta=delta, start=start)
    candidates = _shift_candidates(chosen, curves, shifts, _n_points(curves))
    fit = lawmod.select_fit(candidates, curves, sign=sign, lam=lam, delta=delta)
    if not (math.isfinite(fit.r2) and fit.r2 > 0.5):
        log.warning("split %s: poor %s fit (R^2 %.3f): predictions are unreliable", split, fit.law, fit.r2)
    return fit


def _split_record(fit: FitResult, curves: Sequence[Curve], lineage: Lineage, split: str, version: str) -> dict:
    """What ``fit-<version>.json`` keeps of one split's fit."""
    return {
        **fit.to_dict(), "cpt_start": cpt_start(lineage, split, version),
        "boundaries": boundaries(lineage, split, version), "entry": entry_step(lineage, split, version),
        "curves": _curve_summaries(curves),
    }


def _curve_summaries(curves: Sequence[Curve]) -> list[dict]:
    """What a saved fit records of the curves it was fitted on (and :func:`saved_fits` compares)."""
    return [{"name": c.name, "n_points": int(len(c.steps)), "first_step": int(c.steps.min()) + 1,
             "last_step": int(c.steps.max()) + 1} for c in curves]


def fit_run(run_dir_or_lineage: LineageLike, version: str | int | None = None, *, law: str = "auto",
            run_dir: str | os.PathLike | None = None, branches: Iterable[str] | None = None,
            extra_branches: Sequence[Branch | Mapping] = (), include_sweeps: bool = True,
            shift_sign: bool = True, lam: float | str = "auto", shifts: str = "auto",
            forms: Mapping[str, str] | None = None, huber_delta: float | None = None,
            save: bool = True, records: CurveRecords | None = None,
            starts: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, FitResult]:
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
    published); ``multi`` -- one term per switch (:func:`raypath.law.multi_shift_law`) and
    one for an old split's entry, in the form of :data:`MULTI_FORMS` that
    :func:`raypath.law.select_fit` picks; ``auto`` -- the same choice with the single-shift
    law as the first candidate (held-out final losses of the released version's branches:
    a multi-shift form replaces the single-shift law at :data:`raypath.law.REFERENCE_FACTOR`
    times smaller error, or, predicting as well as the single-shift law and the best
    candidate, with a lower information criterion on the observed curves). A split with one
    switch and no entry is always fitted with the single-shift law.

    ``forms`` (split -> law name, e.g. the ``law`` of an earlier fit) skips the choice for
    the splits it names and fits that law as it is: a refit on a few more curves that
    keeps an earlier choice (:class:`raypath.lawguide.LawGuide` between re-selections).
    The choice costs about ``(1 + LAMBDA_FOLDS) * len(candidates)`` fits per split; a
    named form costs one. ``starts`` (split -> the raw ``params`` of an earlier fit of the form
    ``forms`` names) starts that fit there instead of from the law's grid of starts (screened,
    the best 3 polished): a refit on a few more curves lies near the earlier optimum, so it
    polishes from it alone (:func:`raypath.law.fit_law`'s ``start``), a fraction of the
    optimiser's evaluations. ``huber_delta`` fixes the fits' Huber threshold on log residuals
    (e.g. the published 1e-3); None scales it to each split's noise
    (:func:`raypath.law.huber_delta`). Saves ``RUN_DIR/law/fit-<version>.json`` atomically when
    ``save`` and a run directory is known. ``records``: the :class:`CurveRecords` the curves are
    parsed through (a caller that refits on the same curves keeps one).
    """
    if shifts not in SHIFTS:
        raise ValueError(f"shifts must be one of {', '.join(SHIFTS)}, got {shifts!r}")
    lineage = Lineage.of(run_dir_or_lineage)
    rd = _run_dir(lineage, run_dir)
    version = version_name(lineage, version)
    fits: dict[str, FitResult] = {}
    forms = dict(forms or {})
    record: dict[str, Any] = {"version": version, "law": law, "shift_sign": shift_sign, "lam": lam,
                              "shifts": shifts, "huber_delta": huber_delta, "splits": {}}
    if forms:
        record["forms"] = forms
    problems = {}
    # Every split's curves are held until the fits: the fits need them all (lambda is chosen
    # across splits), and they grow with the observed points, not with the files' other columns.
    observed = split_curves(lineage, splits_for(lineage, version), version, run_dir=rd, branches=branches,
                            extra_branches=extra_branches, include_sweeps=include_sweeps, records=records)
    for split, curves in observed.items():
        problem = _split_problem(law, split, version, curves, shift_sign)
        if problem is None:
            n = _n_points(curves)
            record["splits"][split] = {"skipped": f"{n} observed points", "n_points": n}
        else:
            problems[split] = problem
    if lam == "auto":
        lam_value, scores = lawmod.select_lambda(list(problems.values()), delta=huber_delta)
        record["lam_scores"] = {str(k): v for k, v in scores.items()}
    else:
        lam_value = float(lam)
    progress = Progress(log, f"fitting the law of {version}", len(problems), "splits")
    # Cost grows with versions^2 x trials (each split's points); the splits are fitted apart.
    starts = dict(starts or {})
    items = [(split, chosen, curves, sign, shifts, lam_value, huber_delta, forms.get(split),
              starts.get(split) if split in forms else None)
             for split, (chosen, curves, sign) in problems.items()]
    points = sum(_n_points(curves) for _, curves, _ in problems.values())
    for (split, _, curves, *_), fit in zip(items, lawmod.in_processes(_fit_split, items, points, progress)):
        fits[split] = fit
        record["splits"][split] = _split_record(fit, curves, lineage, split, version)
    if save and rd is not None:
        from raypath.storage import write_json

        write_json(rd / LAW_DIR / f"fit-{version}.json", record)
    return fits


def load_fits(run_dir: str | os.PathLike, version: str) -> dict[str, FitResult]:
    """The fits :func:`fit_run` saved for ``version``."""
    from raypath.storage import read_json

    rec = read_json(Path(run_dir) / LAW_DIR / f"fit-{version}.json")
    fields = {f.name for f in dataclasses.fields(FitResult)}
    return {s: FitResult.from_dict({k: v for k, v in d.items() if k in fields})
            for s, d in rec["splits"].items() if "skipped" not in d}


def saved_fits(run_dir: str | os.PathLike, lineage: LineageLike, version: str, *, law: str = "auto",
               lam: float | str = "auto", shifts: str = "auto", huber_delta: float | None = None,
               ) -> dict[str, FitResult] | None:
    """The fits :func:`fit_run` saved for ``version`` when they are what it would fit now: the same
    options (its defaults otherwise) on the same curves of every split (names, points, first and
    last step); None otherwise (no file, other options, a curve added or grown since: a sweep
    trial finished). ``raypath law predict`` predicts from what ``raypath law fit`` printed, and
    a fit takes minutes on a long lineage."""
    from raypath.storage import read_json

    try:
        rec = read_json(Path(run_dir) / LAW_DIR / f"fit-{version}.json")
    except (OSError, ValueError):  # none saved, or torn by hand: fit again
        return None
    want = {"version": version, "law": law, "shift_sign": True, "lam": lam, "shifts": shifts,
            "huber_delta": huber_delta}
    if any(k not in rec or rec[k] != v for k, v in want.items()) or rec.get("forms"):
        return None
    splits = rec.get("splits") or {}
    observed = split_curves(lineage, splits_for(lineage, version), version, run_dir=run_dir)
    for split, curves in observed.items():
        saved = splits.get(split) or {}
        same = (saved.get("n_points") == _n_points(curves) if "skipped" in saved
                else saved.get("curves") == _curve_summaries(curves))
        if not same:
            return None
    return load_fits(run_dir, version)


# --------------------------------------------------------------------------- prediction

def _branch_plan(lineage: Lineage, version: str, fraction: float | None, fork_step: int | None) -> tuple[int, int, int]:
    m = main_entry(lineage, version)
    start, end = int(m.start_step), int(m.end_step)
    if fork_step is None:
        if fraction is None:
            raise ValueError("give a fraction or a fork_step")
        fork_step = _fork_step(start, end, float(fraction))
    fork_step = int(fork_step)
    if not start <= fork_step < end:
        raise ValueError(f"fork step {fork_step} is outside {version}'s main segment [{start}, {end})")
    return fork_step, end - fork_step, end


def predict_curve(fits: Mapping[str, FitResult], lineage: LineageLike, version: str, decay: Decay, fork_step: int,
                  steps: Sequence[int], *, branch_steps: int | None = None) -> dict[str, np.ndarray]:
    """Predicted ``val/<split>`` at curve-record ``steps`` of a branch of ``version`` forked at
    ``fork_step`` (steps before the fork: the main path). ``branch_steps`` defaults to the
    rest of the version's segment."""
    lineage = Lineage.of(lineage)
    end = int(main_entry(lineage, version).end_step)
    branch_steps = end - fork_step if branch_steps is None else branch_steps
    steps = np.asarray(steps, dtype=np.int64)
    n = max(int(steps.max()), fork_step + branch_steps)
    lrs = branch_history(lineage_schedule(lineage), fork_step, branch_steps, decay, n=n)
    idx = np.maximum(steps - 1, 0)
    return {s: f.predict(lrs, idx, **split_phases(lineage, s, version)) for s, f in fits.items()}


def predict_branch(fits: Mapping[str, FitResult], lineage: LineageLike, version: str, shape: str = "1-sqrt",
                   fraction: float | None = 0.2, min_lr_ratio: float = 0.0, power: float = 2.0, *,
                   weights: Mapping[str, float] | None = None, fork_step: int | None = None) -> dict:
    """Predicted final val loss per split and the weighted objective of one branch.

    The branch forks before the last ``fraction`` of ``version``'s main segment (the
    arithmetic of :func:`raypath.mainpath.fork_step`; ``fork_step`` overrides it) and decays
    to the segment's end with ``shape`` / ``min_lr_ratio`` / ``power``. ``weights`` is
    ``{old, new}`` or per split (:func:`split_weights`); the objective needs a fit of
    every split of nonzero weight (NaN otherwise: :func:`unfitted_splits`). ``main`` holds the
    never-annealed main path's prediction at the same end step, for reference.
    """
    lineage = Lineage.of(lineage)
    version = version_name(lineage, version)
    decay = Decay(shape, float(min_lr_ratio), float(power))
    fork, steps, end = _branch_plan(lineage, version, fraction, fork_step)
    pred = {s: float(v[0]) for s, v in predict_curve(fits, lineage, version, decay, fork, [end]).items()}
    sched = lineage_schedule(lineage)
    main_pred = {s: float(f.predict(main_lrs(sched, end), [end - 1], **split_phases(lineage, s, version))[0])
                 for s, f in fits.items()}
    w = split_weights(lineage, version, weights)
    objective = float(weighted_objective(pred, w))
    m = main_entry(lineage, version)
    return {"version": version, "shape": shape, "power": float(power), "min_lr_ratio": float(min_lr_ratio),
            "fraction": None if fraction is None else float(fraction),
            "fraction_actual": steps / (m.end_step - m.start_step), "fork_step": fork,
            "branch_steps": steps, "end_step": end, "predicted": pred, "objective": objective,
            "weights": w, "main": main_pred}


def weighted_objective(per_split: Mapping[str, Any], weights: Mapping[str, float]) -> Any:
    """``sum_s w_s * per_split[s]`` (numbers or arrays); NaN when a split of nonzero weight has
    no prediction, since the sum of the others would look like a (too low) objective."""
    if any(w and s not in per_split for s, w in weights.items()):
        return float("nan")
    return sum(w * per_split[s] for s, w in weights.items() if w)


def unfitted_splits(fits: Mapping[str, FitResult], lineage: LineageLike, version: str,
                    weights: Mapping[str, float] | None = None, **curves: Any) -> dict[str, int]:
    """Splits the objective of ``version`` weighs that ``fits`` has no law for (:func:`fit_run`
    skips a split with fewer than :data:`MIN_POINTS` observed points), with how many points each
    has; ``curves`` are :func:`curves_from_lineage`'s options, as the fit used them."""
    lineage = Lineage.of(lineage)
    version = version_name(lineage, version)
    missing = [s for s, w in split_weights(lineage, version, weights).items() if w and s not in fits]
    if not missing:
        return {}
    return {s: _n_points(c) for s, c in split_curves(lineage, missing, version, **curves).items()}


def check_fitted(fits: Mapping[str, FitResult], lineage: LineageLike, version: str,
                 weights: Mapping[str, float] | None = None, **curves: Any) -> None:
    """Raise ValueError, naming the splits and their points, unless every split the objective
    of ``version`` weighs has a law (:func:`unfitted_splits`, same arguments): without one the
    objective is NaN, which reads as a number in a table and ranks as the worst or the best."""
    missing = unfitted_splits(fits, lineage, version, weights, **curves)
    if missing:
        why = ", ".join(f"{s} has {n} observed point{'s' * (n != 1)}" for s, n in missing.items())
        raise ValueError(f"the objective weighs split(s) the law cannot be fitted on ({why}; a fit needs "
                         f"{MIN_POINTS}: evaluations every train.eval_every steps, in RUN_DIR/curves/), "
                         "so it cannot predict the objective")
