"""The scaling law as the branch search's guide: which candidates first, which trials to stop.

:mod:`raypath.lawfit` fits the law on a lineage and predicts any branch; this module turns
those predictions into the decisions of a Ray Tune sweep (:func:`raypath.sweep.law_guidance`
wires it in when ``sweep.guide: law``):

* :func:`default_grid` / :func:`rank_candidates` -- a dense grid of (fraction, shape, power,
  min LR) candidates, ranked by predicted score (:func:`score`: the objective plus the sweep's
  compute penalty), fractions snapped to existing fork points.
* :func:`spread_picks` / :func:`optuna_point` -- the first trials: the best-predicted
  candidates spread over end LR and shape, as OptunaSearch ``points_to_evaluate``.
* :class:`LawGuide` -- the law's view of one search (fits, ranking, per-trial forecasts),
  refitted as trials finish.
* :class:`LawStopper` -- a Tune stopper that ends trials whose forecast cannot beat the best
  finished trial.
* :func:`LawRefitCallback` -- a Tune callback that refits the guide after every finished trial,
  in a background thread (:meth:`LawGuide.refit_later`): a refit's time grows with versions² x
  trials, and Tune's loop, which starts the next trial and stops hopeless ones, must not wait on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from raypath.law import FitResult, anneal_params
from raypath.lawfit import (
    CurveRecords,
    LineageLike,
    branch_history,
    check_fitted,
    fit_run,
    lineage_branches,
    lineage_schedule,
    main_entry,
    predict_branch,
    predict_curve,
    split_weights,
    trial_branch,
    unfitted_splits,
    version_name,
    weighted_objective,
)
from raypath.lineage import Branch, Lineage
from raypath.mainpath import fork_step as _fork_step
from raypath.schedules import POWER_SHAPES, SHAPES, Decay, decay_from

log = logging.getLogger(__name__)

#: Powers tried by :func:`default_grid` for the one-parameter shapes.
DEFAULT_POWERS = {"polynomial": (1.5, 2.0, 3.0), "exponential": (2.0, 4.0, 6.0)}
#: What a pickled guide leaves out: the parsed curves (a restored guide reads them again) and the
#: background refit's thread and locks.
_TRANSIENT = ("_records", "_lock", "_fitting", "_refitter", "_again")
#: A trial this close to its end (share of its branch) is never stopped: stopping would save
#: almost no compute and lose its final result (the law benchmark stopped trials 1 step early).
FINISH_SHARE = 0.05
#: Trials whose predicted objective curve a :class:`LawGuide` keeps between refits (the sweep's live ones).
FORECASTS_KEPT = 64

#: A branch's compute penalty from its length in steps (the sweep's ``compute_penalty *
#: branch_tokens / version_tokens``); None: no penalty.
Penalty = Callable[[int], float] | None


def score(objective: float, branch_steps: int, penalty: Penalty = None) -> float:
    """What a sweep minimises: the objective plus the branch's compute penalty. Optuna is told it
    and the release picks by it, so the ranking and the stopper compare it too: by the objective
    alone, a short branch that wins on score would rank low and be stopped."""
    return float(objective) + (float(penalty(int(branch_steps))) if penalty is not None else 0.0)


# --------------------------------------------------------------------------- candidates

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


def rank_candidates(fits: Mapping[str, FitResult], lineage: LineageLike, version: str,
                    grid: Sequence[Mapping] | None = None, weights: Mapping[str, float] | None = None, *,
                    forks: Sequence | None = None, penalty: Penalty = None) -> list[dict]:
    """Candidates of ``grid`` (default :func:`default_grid`) with predictions, best
    predicted ``score`` (:func:`score` with ``penalty``) first (ties: shorter branch, then grid
    order) -- deterministic. Without a fit of every weighted split the objective is NaN and
    ranks last (:meth:`LawGuide.check_objective` refuses to rank then).

    forks: fork points that exist (steps, or ``{"step": ...}`` dicts as
        :func:`raypath.sweep.fork_points` returns): each fraction snaps to the nearest one
        (ties: the shorter branch).

    Candidates that train at the same LRs are one branch (the first in grid order is kept):
    after snapping, and for every branch of 1 or 2 steps, whatever its shape.
    """
    lineage = Lineage.of(lineage)
    version = version_name(lineage, version)
    grid = default_grid() if grid is None else grid
    m = main_entry(lineage, version)
    start, end = int(m.start_step), int(m.end_step)
    fork_steps = sorted({_fork_of(f) for f in forks}) if forks else None
    sched = lineage_schedule(lineage)
    out, seen = [], set()
    for i, cand in enumerate(grid):
        fork = _fork_step(start, end, float(cand["fraction"]))
        if fork_steps:
            fork = min(fork_steps, key=lambda s: (abs(s - fork), -s))
        shape = cand["shape"]
        power = float(cand.get("power", 2.0)) if shape in POWER_SHAPES else 2.0
        if shape == "polynomial" and power == 1.0:
            shape, power = "linear", 2.0  # (1 - progress)**1: the linear decay, named as such
        decay = Decay(shape, float(cand.get("min_lr_ratio", 0.0)), power)
        # Candidates are the same branch when they train at the same LRs: a 1- or 2-step
        # branch is the same for every shape (start and floor only), and a sweep that tried
        # each would spend trials on one branch.
        key = (fork, branch_history(sched, fork, end - fork, decay).tail.round(12).tobytes())
        if key in seen:
            continue
        seen.add(key)
        p = predict_branch(fits, lineage, version, shape, float(cand["fraction"]), decay.min_lr_ratio, power,
                           weights=weights, fork_step=fork)
        # The grid's own shape and power too: the sweep's search space may hold no "linear".
        out.append({**p, "score": score(p["objective"], p["branch_steps"], penalty), "grid_index": i,
                    "grid_shape": cand["shape"], "grid_power": float(cand.get("power", 2.0))})
    out.sort(key=lambda c: (c["score"] if math.isfinite(c["score"]) else math.inf, c["branch_steps"], c["grid_index"]))
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
        trials explore end LRs and shapes the lineage has not measured (each counts at the
        ``min_lr_ratio`` of ``ranked`` nearest to its own) -- except the first trial's shape:
        it keeps a shape that was observed, and moves along the end LR only. Without
        ``observed`` the first pick is the law's favourite.

    Why the first trial keeps the measured shape: the law turns a decay's shape into a loss
    through the momentum decay ``lambda`` of the annealing area, and release branches that
    all decay one way cannot pin ``lambda`` down. On the law benchmark at half the peak LR
    (docs/benchmarks.md) the held-out scores of 0.95 ... 0.999 on the release branches lay
    within 6% of each other, and the best-predicted of 16 measured trials changed from a
    cosine to an exponential decay across them; the law's favourite shapes (steep early
    drops) measured 0.4-0.6% behind cosine decays. The first trial is the one a short search
    keeps, so it extrapolates along one axis; the later ones spread over shapes.
    """
    ends = sorted({float(c["min_lr_ratio"]) for c in ranked})
    seen = [(min(ends, key=lambda e: (abs(e - float(o.get("min_lr_ratio", 0.0))), e)), o.get("shape"))
            for o in observed] if ends else []
    rest, picks = list(ranked), []
    while rest and len(picks) < n:
        made = seen + [(float(p["min_lr_ratio"]), p["shape"]) for p in picks]
        pool = range(len(rest))
        if not picks and seen:
            pool = [j for j in pool if any(rest[j]["shape"] == sh for _, sh in seen)] or pool

        def used(c: Mapping) -> tuple[int, int]:
            return (sum(m == float(c["min_lr_ratio"]) for m, _ in made), sum(sh == c["shape"] for _, sh in made))
        i = min(pool, key=lambda j: (*used(rest[j]), j))
        picks.append(rest.pop(i))
    return picks


def optuna_point(candidate: Mapping, replay_ratio: float | None = None) -> dict:
    """A ranked candidate as an OptunaSearch ``points_to_evaluate`` entry (the sweep's
    parameter names: fraction, shape, power only for polynomial/exponential, min_lr_ratio,
    replay_ratio). The fraction is the snapped one, so the trial forks where predicted; shape
    and power are the grid's (a polynomial of power 1 stays one, as the search space has it)."""
    shape = candidate.get("grid_shape", candidate["shape"])
    point = {"fraction": float(candidate["fraction_actual"]), "shape": shape}
    if shape in POWER_SHAPES:
        point["power"] = float(candidate.get("grid_power", candidate["power"]))
    point["min_lr_ratio"] = float(candidate["min_lr_ratio"])
    if replay_ratio is not None:
        point["replay_ratio"] = float(replay_ratio)
    return point


# --------------------------------------------------------------------------- sweep guidance

def decay_prior(fit: FitResult) -> tuple[FitResult, str | None]:
    """``fit`` for ranking decays of the latest phase, and the coefficient its decay gain comes from.

    Before a branch of the latest version has finished, no curve the fit saw decays in its
    phase: that phase's annealing coefficient (``C2`` of a CPT law) sits at its bound, changes
    no observed loss, and a ranking with it credits no decay at all (shortest branch, highest
    floor first). Until one is seen, the phase is taken to gain from a decay what the nearest
    earlier phase that the data identified does (``C2 = C1``): on the law's synthetic lineage
    this ranks as the fit with the version's branch does (tests/test_lawfit.py). None when no
    phase's gain is identified (a version without a branch on a one-version lineage)."""
    names = anneal_params(fit.law)
    source = next((k for k in names if k not in fit.degenerate), None)
    if source in (None, names[0]):
        return fit, source
    return dataclasses.replace(fit, params={**fit.params, names[0]: fit.params[source]}), source


class UnidentifiedDecay(ValueError):
    """The law predicts the objective but has not seen the decays it would rank (:meth:`LawGuide.check_ranking`)."""


class LawGuide:
    """The law's view of one branch search; what :mod:`raypath.sweep` plugs into Tune.

    :func:`raypath.sweep.law_guidance` wires it into a sweep (``sweep.guide: law``)::

        guide = lawguide.LawGuide(run_dir, version, weights=plan.weights, forks=space.forks)
        # 1. the best predicted candidates first: Optuna enqueues them before TPE samples
        points = guide.points_to_evaluate(n, fraction=sc.fraction, shapes=sc.shapes, ...)
        searcher = OptunaSearch(space=space, ..., points_to_evaluate=points)
        # 2. stop trials that cannot win, 3. refit after every finished trial
        stopper = lawguide.LawStopper(guide, margin=sc.stop_margin, record_path=...)
        refit = lawguide.LawRefitCallback(guide, stopper=stopper, name=plan.segment_name,
                                          curve_path=plan.curve_path)
        tune.RunConfig(..., stop=stopper, callbacks=[refit])

    Both run in the Tune driver, so they share the guide: every refit changes the
    forecasts the stopper makes next. The callback refits in a background thread
    (:meth:`refit_later`): until a refit lands the stopper forecasts with the fits before it,
    and the trials that finish meanwhile are fitted together by the next one. A stopped trial ends without its final
    checkpoint, so the sweep should record it as ``stopped`` (not ``incomplete``) and
    Optuna is told its last, partial ``score``.

    The stopper reads ``step``, ``objective`` (the sweep's per-eval weighted val loss),
    ``fork_step`` and ``branch_steps`` from each result and the decay from
    ``result["config"]`` (or a config registered with :meth:`LawStopper.register`).
    Predictions use the same per-split weights as the trials' ``objective``.

    If the lineage has too few points for a split (e.g. a version with no branch yet: its
    new split has no annealing observation), the guide does not rank (:meth:`check_ranking`;
    degenerate parameters are reported in ``fits``), and the stopper uses the law only as a
    relative forecast of the remaining improvement. A weighted split with too few points to fit at all
    leaves the objective unpredictable: :meth:`check_objective` says which, and the forecasts
    are NaN.

    run_dir may be any ``os.PathLike``, resolved at each use: the sweep passes one that follows
    the sweep directory, since ``Tuner.restore`` brings the guide back as it was pickled when
    the sweep started (maybe elsewhere). penalty: a branch's compute penalty from its length in
    steps (:func:`score`), what the ranking adds to each candidate's objective.
    """

    def __init__(self, run_dir: str | os.PathLike, version: str | int, *,
                 weights: Mapping[str, float] | None = None, forks: Sequence | None = None,
                 law: str = "auto", include_sweeps: bool = True, save: bool = True, penalty: Penalty = None):
        self._run_dir = run_dir
        self.lineage = Lineage.load(self.run_dir)
        self.version = version_name(self.lineage, version)
        self.weights = split_weights(self.lineage, self.version, weights)
        self.forks = list(forks) if forks else None
        self.law = law
        self.include_sweeps = include_sweeps
        self.save = save
        self.penalty = penalty
        self.trials: list[Branch] = []  # finished sweep trials of this search, as branches
        self.fits: dict[str, FitResult] = {}
        self._forecasts: dict[tuple, np.ndarray] = {}  # (fork, branch steps, decay) -> objective per step
        self.selected_at: int | None = None  # how many trials the last choice of laws saw
        self._stale = False  # trials were added without a refit (a resumed sweep's)
        self._transient()
        self.refit()

    def _transient(self) -> None:
        self._records = CurveRecords()  # the run's curves as parsed so far: a refit parses only new ones
        self._lock = threading.Lock()  # the fits and the forecasts made with them change together
        self._fitting = threading.RLock()  # one fit at a time: fits share the parsed curves
        self._refitter: threading.Thread | None = None  # the background refit (refit_later)
        self._again = False  # trials finished during the background refit: fit once more

    def __getstate__(self) -> dict:
        # Tune pickles the guide (tuner.pkl) with its stopper and callback: the parsed curves of the
        # whole run would bloat it, and a restored guide reads them again anyway.
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._transient()
        # a guide pickled by a sweep before the forecast cache, the penalty, the resume
        self.__dict__.setdefault("_forecasts", {})
        self.__dict__.setdefault("penalty", None)
        self.__dict__.setdefault("_stale", False)
        if "run_dir" in self.__dict__:
            self._run_dir = self.__dict__.pop("run_dir")

    @property
    def run_dir(self) -> Path:
        return Path(os.fspath(self._run_dir))

    # ---- fitting
    def refit(self) -> dict[str, FitResult]:
        """Refit every split on the lineage's curves plus the finished trials added so far.

        The choice of each split's law form and of lambda (:func:`fit_run`'s held-out
        cross-validations, most of a refit's time) is made again only once the trials have
        doubled since it was last made (after trial 1, 2, 4, 8, ...); in between, each
        split's chosen form is refitted with the chosen lambda, one fit per split, started
        from the split's last fit (``fit_run(starts=...)``: a few more curves move the optimum
        a little). A sweep of n trials thus pays for about log2(n) choices instead of n, each a
        fit from the law's whole grid of starts.

        Waits for a background refit (:meth:`refit_later`) in progress, then fits in this thread.
        """
        with self._fitting:
            trials = list(self.trials)  # the callback may add more while this fits
            n = len(trials)
            select = self.selected_at is None or n >= max(1, 2 * self.selected_at) or not self.fits
            keep = {} if select else {"lam": next(iter(self.fits.values())).lam,
                                      "forms": {split: f.law for split, f in self.fits.items()},
                                      "starts": {split: f.params for split, f in self.fits.items()}}
            t0 = time.perf_counter()
            fits = fit_run(self.lineage, self.version, law=self.law, run_dir=self.run_dir, extra_branches=trials,
                           include_sweeps=self.include_sweeps, save=self.save, records=self._records, **keep)
            with self._lock:
                self.fits, self._forecasts = fits, {}  # the forecasts were predicted with the fits replaced
                if select:
                    self.selected_at = n
            log.info("law %s after %d trial(s) in %.1f s: %s", "chosen and fitted" if select else "refitted", n,
                     time.perf_counter() - t0, ", ".join(f"{s} {f.law}" for s, f in fits.items()))
            return fits

    def refit_later(self) -> None:
        """Refit in a background thread and return at once; the fits and forecasts change when it
        is done. Called again while it fits, the thread fits once more when it is done, on every
        trial added by then (the trials that finished meanwhile cost one refit, not one each).

        A refit's time grows with versions² x trials (seconds to a minute for a long lineage: the
        splits' fits run in worker processes past :data:`raypath.law.PARALLEL_POINTS` points, a
        smaller one in this thread); Tune's loop, which calls the sweep's callback, would start no
        trial and stop none until it returned. A failed refit is logged; the fits before it stay.
        """
        with self._lock:
            self._stale = False
            if self._refitter is not None:
                self._again = True
                return
            self._refitter = threading.Thread(target=self._refit_loop, name="raypath-law-refit", daemon=True)
            self._refitter.start()

    def _refit_loop(self) -> None:
        while True:
            try:
                self.refit()
            except Exception as e:  # the fits before it still forecast; a sweep must not die of its guide
                log.warning("law refit after %d trial(s) failed: %s", len(self.trials), e)
            with self._lock:
                if not self._again:
                    self._refitter = None
                    return
                self._again = False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background refit (:meth:`refit_later`), if any; False if it is still fitting
        after ``timeout`` seconds."""
        thread = self._refitter
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def add_trial(self, name: str, config: Mapping, curve_path: str | os.PathLike, *, refit: bool = True) -> bool:
        """Add a finished trial's curve (its Tune config and the JSONL its segment wrote); refit now
        unless ``refit`` is False. False when there is nothing to add (known already, or no curve)."""
        if any(t.name == name for t in self.trials) or not Path(curve_path).is_file():
            return False
        self.trials.append(trial_branch(name, self.version, config, str(curve_path)))
        if refit:
            self.refit()
        return True

    def resume(self, trials: Sequence[tuple[str, Mapping, str | os.PathLike]]) -> None:
        """Add the finished trials ``(name, config, curve path)`` of a resumed sweep, which the guide
        restored from ``tuner.pkl`` (pickled as the sweep started) lacks. The law is refitted on
        them when a forecast is next asked for, so a sweep resumed with nothing left to run pays
        for no refit."""
        n = len(self.trials)
        for name, config, curve in trials:
            self.add_trial(name, config, curve, refit=False)
        self._stale = self._stale or len(self.trials) > n

    def refit_if_stale(self, later: bool = False) -> None:
        """Refit if trials were added without a refit (:meth:`resume`): now, or with ``later`` in the
        background (:meth:`refit_later`)."""
        if not self._stale:
            return
        if later:
            self.refit_later()
            return
        self._stale = False
        try:
            self.refit()
        except Exception as e:  # the fits before the resume still forecast; a stopper must not kill the sweep
            log.warning("law refit on the resumed sweep's %d trial(s) failed: %s", len(self.trials), e)

    def _curve_options(self) -> dict:
        """The curves the guide fits on, as :func:`~raypath.lawfit.curves_from_lineage`'s options."""
        return {"run_dir": self.run_dir, "extra_branches": self.trials, "include_sweeps": self.include_sweeps,
                "records": self._records}

    def unfitted(self) -> dict[str, int]:
        """Weighted splits without a law (too few observed points), with their points."""
        with self._fitting:
            return unfitted_splits(self.fits, self.lineage, self.version, self.weights, **self._curve_options())

    def check_objective(self) -> None:
        """Raise ValueError, naming the splits and why, unless every weighted split has a law: without
        one the objective is NaN for every candidate, and a ranking of NaNs is no guidance."""
        with self._fitting:
            check_fitted(self.fits, self.lineage, self.version, self.weights, **self._curve_options())

    def check_ranking(self) -> None:
        """:meth:`check_objective`, then raise :class:`UnidentifiedDecay`, naming the splits, when
        no weighted split's fit has identified a decay's gain in any phase (:func:`decay_prior`:
        a one-version lineage without a finished branch, say). Such a law credits no decay, so
        its ranking would put the shortest branches with the highest floor first."""
        self.check_objective()
        weighted = [s for s in self.fits if self.weights.get(s, 0) > 0]
        if weighted and all(decay_prior(self.fits[s])[1] is None for s in weighted):
            raise UnidentifiedDecay(
                f"the law has seen no decay to learn its gain from ({', '.join(weighted)}: "
                f"{', '.join(sorted({k for s in weighted for k in anneal_params(self.fits[s].law)}))} "
                f"not identified), so it cannot rank decays")

    def ranking_fits(self) -> dict[str, FitResult]:
        """The fits the ranking predicts with: each split's :func:`decay_prior`."""
        out = {}
        for split, fit in self.fits.items():
            out[split], source = decay_prior(fit)
            last = anneal_params(fit.law)[0]
            if source not in (None, last):
                log.info("law on %s: no decay of %s's phase seen yet; its gain %s taken as %s's (%.4g)",
                         split, self.version, last, source, fit.params[source])
        return out

    # ---- ranking
    def rank(self, grid: Sequence[Mapping] | None = None) -> list[dict]:
        self.refit_if_stale()
        return rank_candidates(self.ranking_fits(), self.lineage, self.version, grid, self.weights,
                               forks=self.forks, penalty=self.penalty)

    def points_to_evaluate(self, n: int = 4, *, fraction: tuple[float, float] = (0.05, 0.5),
                           shapes: Sequence[str] = SHAPES, power: tuple[float, float] | None = None,
                           min_lr_ratio: tuple[float, float] = (0.0, 0.1), replay_ratio: float | None = None,
                           n_fractions: int = 10) -> list[dict]:
        """``n`` of the best predicted candidates inside the sweep's ranges, spread over end LR
        and shape around the branches already observed (:func:`spread_picks`), as Optuna points.

        The grid spans the sweep's ranges (min_lr_ratio at both ends); with ``forks`` each
        fraction snaps to an existing fork point first. Raises ValueError when the objective
        cannot be predicted or decays cannot be ranked (:meth:`check_ranking`)."""
        self.check_ranking()
        mins = sorted({float(min_lr_ratio[0]), float(min_lr_ratio[1])})
        grid = default_grid(fraction, n_fractions, shapes, power, mins)
        ranked = self.rank(grid)
        lo, hi = fraction
        inside = [c for c in ranked if lo - 1e-9 <= c["fraction_actual"] <= hi + 1e-9] or ranked
        points = [optuna_point(c, replay_ratio) for c in spread_picks(inside, n, self.observed_decays())]
        for p in points:  # with no fork inside the range a trial snaps outside it anyway; Optuna's value must not
            p["fraction"] = min(max(p["fraction"], lo), hi)
        return points

    def observed_decays(self) -> list[dict]:
        """Decays of the finished branches of this version the law is fitted on."""
        pool = lineage_branches(self.lineage, include_sweeps=self.include_sweeps) + self.trials
        return [b.decay or {} for b in pool if b.version == self.version]

    # ---- per-trial forecasts
    def predict_objective(self, config: Mapping, steps: Sequence[int], fork_step: int | None = None,
                          branch_steps: int | None = None) -> np.ndarray:
        """Predicted objective at curve-record ``steps`` of the trial with ``config`` (NaN where
        a weighted split has no law)."""
        self.refit_if_stale()
        fork = int(fork_step if fork_step is not None else config["fork_step"])
        bsteps = branch_steps if branch_steps is not None else config.get("branch_steps")
        bsteps = None if bsteps is None else int(bsteps)
        decay = decay_from(config)
        steps = np.asarray(steps, dtype=np.int64)
        with self._lock:  # a background refit swaps both
            fits, forecasts = self.fits, self._forecasts
        if bsteps is None:
            return self._objective(decay, fork, steps, bsteps, fits)
        # The stopper asks at every evaluation of every trial; one prediction costs as much as
        # the whole curve (the law's areas are cumulative sums over the LR history), so a trial's
        # curve is predicted once per fit and looked up (memory: 8 bytes per step per trial).
        key = (fork, bsteps, decay)
        curve = forecasts.get(key)
        if curve is None:
            curve = forecasts[key] = self._objective(decay, fork, np.arange(fork + bsteps + 1), bsteps, fits)
            while len(forecasts) > FORECASTS_KEPT:
                forecasts.pop(next(iter(forecasts)))
        if steps.size and 0 <= steps.min() and steps.max() < len(curve):
            return curve[steps]
        return self._objective(decay, fork, steps, bsteps, fits)

    def _objective(self, decay: Decay, fork: int, steps: np.ndarray, bsteps: int | None,
                   fits: Mapping[str, FitResult] | None = None) -> np.ndarray:
        fits = self.fits if fits is None else fits
        per = predict_curve(fits, self.lineage, self.version, decay, fork, steps, branch_steps=bsteps)
        return np.broadcast_to(weighted_objective(per, self.weights), steps.shape).astype(float)


class LawStopper:
    """Tune stopper: stop a branch trial whose observed curve shows it cannot win.

    At each result carrying ``objective`` at ``step`` ``t`` past ``min_progress`` of the
    branch (and before its last :data:`FINISH_SHARE`), the trial's final objective is
    forecast as the observed value plus the law's predicted remaining change,
    ``obs(t) + pred(end) - pred(t)`` (the law corrects the
    trial's own level, so a curve that departs from its prediction is judged by where it
    actually is). The trial is stopped when that forecast's score (:func:`score` with the
    guide's ``penalty``: what Optuna and the release compare) is worse than the best finished
    trial's score by more than ``margin`` (relative). The best is ``best_so_far_fn()`` (a
    score) when given, else the best final score this stopper has seen (a result at the
    trial's last step) or was told (:meth:`record_final`). A NaN forecast (a weighted split
    without a law) stops nothing.

    Tune accepts it as ``RunConfig(stop=stopper)`` (a callable ``(trial_id, result) ->
    bool``). ``decisions`` keeps the last forecast per trial for the sweep's record; with
    ``record_path`` (any ``os.PathLike``, resolved at each write) the decisions that stopped
    a trial are also written there (JSON, atomically, as they are made, merged into what the
    file holds), so they survive the driver and a resume.
    """

    def __init__(self, guide: LawGuide, *, margin: float = 0.01, min_progress: float = 0.25,
                 metric: str = "objective", best_so_far_fn: Callable[[], float | None] | None = None,
                 record_path: str | os.PathLike | None = None):
        self.guide = guide
        self.record_path = record_path
        self.margin = float(margin)
        self.min_progress = float(min_progress)
        self.metric = metric
        self.best_so_far_fn = best_so_far_fn
        self.configs: dict[str, dict] = {}
        self.finals: dict[str, float] = {}  # trial id -> final score
        self.decisions: dict[str, dict] = {}

    @property
    def penalty(self) -> Penalty:
        return getattr(self.guide, "penalty", None)

    def register(self, trial_id: str, config: Mapping) -> None:
        self.configs[trial_id] = dict(config)

    def record_final(self, trial_id: str, objective: float, branch_steps: int = 0) -> None:
        """A finished trial's final objective; it is kept as its score."""
        self.finals[trial_id] = score(objective, branch_steps, self.penalty)

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
            self.record_final(trial_id, float(value), bsteps)
            return False
        progress = (step - fork) / max(bsteps, 1)
        if progress < self.min_progress or progress > 1.0 - FINISH_SHARE:
            return False  # too early to judge, or so close to the end that stopping saves nothing
        best = self.best()
        if best is None:
            return False
        forecast = self.forecast(config, step, float(value), fork, bsteps)
        if not math.isfinite(forecast):
            return False  # the law cannot predict the objective (a weighted split unfitted)
        return self._decide(trial_id, step, float(value), forecast, score(forecast, bsteps, self.penalty), best)

    def _decide(self, trial_id: str, step: int, observed: float, forecast: float, forecast_score: float,
                best: float) -> bool:
        stop = forecast_score > best * (1.0 + self.margin)
        self.decisions[trial_id] = {"step": step, "observed": observed, "forecast": forecast,
                                    "forecast_score": forecast_score, "best": float(best), "stop": bool(stop)}
        if stop:
            log.info("law stopper: trial %s at step %d forecasts score %.4f > best %.4f (+%.1f%%): stopped",
                     trial_id, step, forecast_score, best, 100 * self.margin)
            if self.record_path:
                self._save()
        return bool(stop)

    def _save(self) -> None:
        """Write the stops, merged into the file's: a resumed sweep's stopper is the one pickled
        when the sweep started (``tuner.pkl``), so it does not know the stops made before; a trial
        dropped from this record would have no final checkpoint and no stop, and never settle."""
        from raypath.storage import read_json, write_json

        path = Path(os.fspath(self.record_path))
        earlier = read_json(path) if path.is_file() else {}
        write_json(path, {**earlier, **{t: d for t, d in self.decisions.items() if d["stop"]}})


def _reached_end(trial) -> bool:
    """The Tune trial's last result is at its branch's last step (a stopped or failed one's is not)."""
    last, config = trial.last_result or {}, dict(trial.config or {})
    return ("fork_step" in config and "branch_steps" in config
            and int(last.get("step", -1)) >= int(config["fork_step"]) + int(config["branch_steps"]))


def LawRefitCallback(guide: LawGuide, *, curve_path: Callable[[str], str],
                     name: Callable[[str], str] | None = None, stopper: LawStopper | None = None):
    """A Tune ``Callback`` that refits ``guide`` after every finished trial, in the background
    (:meth:`LawGuide.refit_later`); at the experiment's end it waits for the last refit, whose
    fits are saved (``RUN_DIR/law/fit-<version>.json``).

    curve_path: trial id -> the JSONL its branch segment wrote (the sweep's
        ``RUN_DIR/sweeps/vK/<name>/curves/<segment>.jsonl``).
    name: trial id -> segment name (default ``trial-<id>``), used to dedupe curves.
    stopper: also told the trial's final objective (trials that reached their last step),
        so it knows the best finished trial without ``best_so_far_fn``.

    On a resumed sweep it first hands the trials that finished before to the guide and the
    stopper (:meth:`LawGuide.resume`), refitted in the background on them: ``Tuner.restore``
    brings all three back as the sweep built them, since Ray 2.60 writes ``tuner.pkl`` only when
    the Tuner is built.
    """
    from ray.tune import Callback
    from ray.tune.experiment import Trial

    def trial_name(trial_id: str) -> str:
        return name(trial_id) if name else f"trial-{trial_id}"

    def tell_final(trial) -> None:
        config = dict(trial.config or {})
        last = trial.last_result or {}
        if stopper is not None and isinstance(last.get(stopper.metric), (int, float)):
            stopper.record_final(trial.trial_id, float(last[stopper.metric]), int(config["branch_steps"]))

    class _Refit(Callback):
        def __init__(self):
            super().__init__()
            self.caught_up = False

        def on_step_begin(self, iteration, trials, **info):
            if self.caught_up:
                return
            self.caught_up = True
            done = [t for t in trials if t.status == Trial.TERMINATED and _reached_end(t)]
            for t in done:
                tell_final(t)
            if done:
                guide.resume([(trial_name(t.trial_id), dict(t.config), curve_path(t.trial_id)) for t in done])

        def on_trial_start(self, iteration, trials, trial, **info):
            # The stopper needs each trial's decay; registering it here does not rely on
            # every result carrying the trial's config.
            if stopper is not None:
                stopper.register(trial.trial_id, trial.config)
            guide.refit_if_stale(later=True)  # a resumed sweep's trials, before the stopper forecasts with them

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not _reached_end(trial):
                return  # stopped or failed: a partial decay would mislead the fit
            tell_final(trial)
            try:
                if guide.add_trial(trial_name(trial.trial_id), dict(trial.config or {}), curve_path(trial.trial_id),
                                   refit=False):
                    guide.refit_later()
            except Exception as e:  # a trial's unreadable config or curve must not kill the sweep
                log.warning("law refit after trial %s failed: %s", trial.trial_id, e)

        def on_experiment_end(self, trials, **info):
            guide.wait()  # the last refit's fits are saved; the run's next step may read them

    return _Refit()
