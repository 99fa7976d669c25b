"""Loss laws of learning-rate schedules: areas, fitting and prediction.

Two laws predict the validation loss at any step from the whole LR history:

* :class:`AnnealingLaw` -- the LR-annealing law of Tissue et al. (arXiv 2408.11029),
  ``L = L0 + A*S1^-alpha - C*S2``.
* :class:`CPTLaw` -- the continual-pre-training law of Wang et al. (arXiv 2505.07796),
  ``L = L0 + A*(S1pt+S1cpt)^-alpha - C1*S2pt - C2*S2cpt + B*(1-(1+E*S1cpt)^-beta)``.
* :func:`multi_shift_law` -- the CPT law across many data switches: a lineage shifts the
  training data at every version boundary, so a split sees one shift per later version;
  each adds ``B_i*(1-(1+E*S1_i)^-beta)`` with ``S1_i`` the forward area since switch ``i``,
  optionally a drift ``D_i*S1_i`` per switch and an annealing coefficient per phase.
  One switch is :class:`CPTLaw` itself.

``S1`` (forward area) is the cumulative sum of the LR and ``S2`` (annealing area) the
cumulative sum of a momentum ``m`` of LR decrements (:func:`areas`). The law integrates the
whole history, so one fitted parameter set ranks *any* candidate branch schedule before it
is trained -- that is what the branch search uses it for.

Fitting (:func:`fit_law`) follows 2408.11029: minimise Huber(delta=1e-3) of
``log L_obs - log L_pred`` with L-BFGS-B from a deterministic grid of starting points.
Two practical additions keep it well conditioned and deterministic:

* areas are rescaled by their largest value before optimising (the raw LR sums differ by
  orders of magnitude between setups) and parameters are mapped back afterwards;
* at every start the parameters that enter linearly (L0, A, C, B) are solved by bounded
  linear least squares, so the grid only spans the non-linear exponents.

The momentum decay ``lambda`` of S2 is the paper's 0.999 by default; :func:`select_lambda`
picks it from :data:`LAMBDA_GRID` by how well fits predict held-out branches, because
0.999 is tuned to runs far longer than the branches of a small lineage. :func:`select_fit`
chooses between the single- and multi-shift laws on held-out branches of the released version.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import logging
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Mapping, Sequence

import numpy as np
from scipy.optimize import lsq_linear, minimize
from scipy.signal import lfilter

log = logging.getLogger(__name__)

#: Momentum decay of the annealing area (2408.11029 uses 0.999).
LAMBDA = 0.999
#: Momentum decays :func:`select_lambda` chooses from. lambda sets how long an LR drop
#: keeps adding to S2 (~1/(1-lambda) steps). 0.999 suits the 1e4+-step runs of 2408.11029;
#: on branches of tens to hundreds of steps S2 then grows almost linearly with the decay
#: length, and a law fitted on short branches over-predicts longer ones.
LAMBDA_GRID = (0.95, 0.98, 0.99, 0.995, 0.999)
#: Most curves :func:`select_lambda` holds out per split (spread evenly over their order):
#: each costs one fit per grid value, and a sweep refits after every trial.
LAMBDA_FOLDS = 4
#: Observed points from which a fit spreads its independent fits (each lambda's cross-validation
#: folds, each split's fit) over worker processes (:func:`in_processes`): below it, starting them
#: (~1 s each, importing scipy) costs more than they save.
PARALLEL_POINTS = 20_000
#: Huber threshold on log-loss residuals (2408.11029), and the floor of the threshold a fit
#: uses (:func:`huber_delta`): smooth curves of large runs are fitted exactly as published.
HUBER_DELTA = 1e-3
#: Huber's tuning constant: a threshold of this many noise standard deviations keeps 95% of
#: least squares' efficiency on Gaussian noise while bounding the pull of outliers.
HUBER_K = 1.345
#: Weight of the L2 pull of B, E, beta towards 0, each measured as a fraction of its
#: bound. The data term is the mean Huber divided by delta**2 (O(1) at a noise-level fit,
#: delta being a multiple of the noise: :func:`huber_delta`), so 1e-3 only decides
#: directions the data leave flat (2505.07796 notes the distribution-shift term is weakly
#: identifiable from few curves).
REG_WEIGHT = 1e-3
#: Among the richer candidate laws, :func:`select_fit` keeps the simplest whose held-out
#: error is within this fraction of the best one's, and without a clear winner it counts a
#: law within this fraction of the first candidate's error as predicting as well. Scores
#: from a few held-out branches differ by a few percent between laws that describe the
#: data equally well (e.g. a drift term fitted to zero).
SELECT_MARGIN = 0.1
#: A richer law replaces the first candidate (the published single-shift law) only if its
#: held-out error is smaller by this factor: the score rests on two to four held-out
#: branches, whose final losses scatter by a percent or more around any smooth law on a
#: small model, so a smaller gain is not evidence. A richer law that describes a real
#: effect the first one misses (forgetting that recovers, say) cuts the error several-fold.
REFERENCE_FACTOR = 2.0
#: Starting points of a stability gap's area ``P`` (normalised: a share of the fit's largest
#: forward area): a few hundredths is an overshoot over tens of steps of a few hundred.
GAP_GRID = (0.02, 0.08)
#: L-BFGS-B options of :func:`fit_law`: every start is screened to SCREEN_OPTIONS and the
#: POLISH_STARTS lowest are polished to POLISH_OPTIONS (near machine precision, so a fit is
#: reproducible to the last digits whatever the start).
SCREEN_OPTIONS = {"maxiter": 3000, "ftol": 1e-8, "gtol": 1e-6}
POLISH_OPTIONS = {"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-12}
POLISH_STARTS = 3
#: A parameter closer than this fraction of its bound scale to a bound counts as "at" it.
BOUND_TOL = 1e-6
#: An optional term (the CPT shift term) whose largest relative size on the data stays
#: below this many residual RMS (log units, floored at 1e-4) is unresolved: its
#: parameters are then fixed by the regulariser and reported as degenerate.
RESOLVE_FACTOR = 2.0
#: A point whose log residual exceeds this many noise standard deviations
#: (:func:`noise_scale`) is listed as an outlier of its fit (:attr:`FitResult.outliers`).
OUTLIER_K = 3.0


def effective_lr(lrs, warmup_steps, peak_lr) -> np.ndarray:
    """LR history with warmup steps replaced by the peak LR.

    2408.11029 counts warmup as the maximal LR in S1/S2: the law has no term for the
    warmup transient, and a literal ramp would make S2 negative. ``warmup_steps`` is either
    a leading warmup length or a boolean mask (a CPT lineage re-warms mid-history);
    ``peak_lr`` is a scalar or a per-step array (a re-warm may reach another peak).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    if isinstance(warmup_steps, (int, np.integer)):
        mask = np.arange(len(lrs)) < int(warmup_steps)
    else:
        mask = np.asarray(warmup_steps, dtype=bool)
        if mask.shape != lrs.shape:
            raise ValueError(f"warmup mask shape {mask.shape} != lrs shape {lrs.shape}")
    return np.where(mask, peak_lr, lrs)


def areas(lrs, *, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """Forward area ``S1_t = sum_{i<=t} lr_i`` and annealing area ``S2_t = sum_{i<=t} m_i``.

    ``m_i = lam*m_{i-1} + (lr_{i-1} - lr_i)``, ``m_0 = 0`` (2408.11029): S2 remembers recent
    LR drops with a ~1/(1-lam)-step memory. The recursion is a first-order IIR filter, so
    ``lfilter`` runs it in C over 1e5+-step histories.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    drops = np.zeros_like(lrs)
    drops[1:] = lrs[:-1] - lrs[1:]
    momentum = lfilter([1.0], [1.0, -lam], drops)
    return np.cumsum(lrs), np.cumsum(momentum)


@dataclass(frozen=True)
class LRHistory:
    """An effective LR history held as ``flat`` steps at ``level``, then ``tail``: a branch
    follows the never-annealed main path (warmup counts as peak) up to its fork, so only its
    decay needs one float a step, and a curve's history costs its branch's length, not its
    fork step. :meth:`full` lays it out as the array it stands for."""

    flat: int
    level: float
    tail: np.ndarray

    def __len__(self) -> int:
        return self.flat + len(self.tail)

    def full(self) -> np.ndarray:
        return np.concatenate([np.full(self.flat, float(self.level)), self.tail])


class _Areas:
    """S1 and S2 (:func:`areas`) of the first ``n`` steps of an LR history (an array or an
    :class:`LRHistory`), read at any steps below ``n``, with the arithmetic of the array laid
    out whole: a flat prefix's S1 is summed step by step (a transient array: what is held stays
    the tail), its S2 is 0 (no drop, so no momentum), and the arrays past it start at its last
    step."""

    def __init__(self, lrs, n: int, lam: float):
        if isinstance(lrs, LRHistory) and lrs.flat > 0:
            self.start = min(lrs.flat, n) - 1
            tail = lrs.tail[: max(0, n - lrs.flat)]
            self.prefix = np.cumsum(np.full(self.start + 1, float(lrs.level)))
            _, self.c2 = areas(np.concatenate([[float(lrs.level)], tail]), lam=lam)
            self.c1 = np.cumsum(np.concatenate([self.prefix[-1:], tail]))
        else:
            self.start, self.prefix = 0, None
            self.c1, self.c2 = areas(lrs.full()[:n] if isinstance(lrs, LRHistory) else lrs[:n], lam=lam)

    def s1(self, t: np.ndarray) -> np.ndarray:
        at = self.c1[np.maximum(t - self.start, 0)]
        return at if self.prefix is None else np.where(t < self.start, self.prefix[np.minimum(t, self.start)], at)

    def s2(self, t: np.ndarray) -> np.ndarray:
        at = self.c2[np.maximum(t - self.start, 0)]
        return at if self.prefix is None else np.where(t < self.start, 0.0, at)


@dataclass
class Curve:
    """One observed loss curve on one validation set.

    lrs: effective LR history from step 0 to at least ``steps.max()`` (see
        :func:`effective_lr`): an array, or an :class:`LRHistory`.
    steps: observed global steps (indices into ``lrs``).
    losses: validation losses at ``steps`` (NaN where only a prediction is wanted).
    cpt_start: first step of the continual-pre-training phase (data switch); 0 means the
        curve has no CPT phase and the whole history counts as pre-training.
    shifts: first steps of later data switches, after ``cpt_start`` and increasing. Only a
        multi-shift law (:func:`multi_shift_law`) reads them: each adds its own shift term;
        the single-shift laws ignore them.
    entry: first step trained on the curve's own data when that came after step 0 and
        before ``cpt_start`` (an old split of a later version: its data entered at its own
        version's start); 0 = none. Only a multi-shift law with ``entry`` reads it.
    """

    lrs: np.ndarray | LRHistory
    steps: np.ndarray
    losses: np.ndarray
    cpt_start: int = 0
    name: str = ""
    shifts: tuple[int, ...] = ()
    entry: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.lrs, LRHistory):
            self.lrs = np.asarray(self.lrs, dtype=np.float64)
        self.steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        self.losses = np.asarray(self.losses, dtype=np.float64).reshape(-1)
        if self.steps.shape != self.losses.shape:
            raise ValueError(f"{len(self.steps)} steps but {len(self.losses)} losses")
        if len(self.steps) and (self.steps.min() < 0 or self.steps.max() >= len(self.lrs)):
            raise ValueError(f"curve {self.name!r}: observed steps outside the LR history")
        self.cpt_start = int(self.cpt_start)
        self.shifts = tuple(int(b) for b in self.shifts)
        if any(b <= a for a, b in zip((self.cpt_start, *self.shifts), self.shifts)):
            raise ValueError(f"curve {self.name!r}: shifts {self.shifts} must increase after cpt_start "
                             f"{self.cpt_start}")
        self.entry = int(self.entry)
        if self.entry < 0 or (self.entry and self.entry >= self.cpt_start):
            raise ValueError(f"curve {self.name!r}: entry {self.entry} must lie before cpt_start {self.cpt_start}")


def split_areas(curve: Curve, *, lam: float = LAMBDA) -> np.ndarray:
    """Rows ``S1pt, S1cpt, S2pt, S2cpt`` at ``curve.steps`` (shape ``(4, n)``).

    "pt" sums run over steps ``< cpt_start`` and stay frozen afterwards; "cpt" sums run from
    ``cpt_start`` on. The momentum is not reset at the boundary (2505.07796), so
    ``S2pt + S2cpt`` is always the plain S2 and the annealing law sees one history.
    """
    a = _Areas(curve.lrs, curve.steps.max(initial=0) + 1, lam)
    t = curve.steps
    if curve.cpt_start <= 0:
        zero = np.zeros(len(t))
        return np.stack([a.s1(t), zero, a.s2(t), zero])
    frozen = np.minimum(t, curve.cpt_start - 1)
    s1pt, s2pt = a.s1(frozen), a.s2(frozen)
    return np.stack([s1pt, a.s1(t) - s1pt, s2pt, a.s2(t) - s2pt])


class _Law:
    """Shared machinery: a law is a value/Jacobian of area features plus bounds.

    Features are the rows of :func:`split_areas`; parameters live either in raw units
    (what users see) or in "normalised" units where S1 rows are divided by ``s1ref`` and S2
    rows by ``s2ref`` (what the optimiser sees).
    """

    param_names: ClassVar[tuple[str, ...]]
    linear: ClassVar[tuple[str, ...]]  # parameters the loss is linear in
    regularized: ClassVar[tuple[str, ...]] = ()
    amplitudes: ClassVar[tuple[str, ...]] = ()  # shift amplitudes: a sign bound on "B" binds them all
    default_grid: ClassVar[dict[str, tuple[float, ...]]]  # non-linear starts (normalised)

    @classmethod
    def value_and_jac(cls, theta: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def evaluator(cls, feats: np.ndarray):
        """``theta -> value_and_jac(theta, feats)`` for features that stay fixed (one fit's):
        a law may work out what does not depend on ``theta`` once, and return the same
        Jacobian array from every call (each call overwrites the last one's)."""
        return lambda theta: cls.value_and_jac(theta, feats)

    @classmethod
    def features(cls, curve: Curve, lam: float) -> np.ndarray:
        """The area rows the law reads at ``curve.steps``."""
        return split_areas(curve, lam=lam)

    @classmethod
    def feature_scale(cls, s1ref: float, s2ref: float) -> np.ndarray:
        """Per feature row, the reference it is divided by in normalised units."""
        return np.array([s1ref, s1ref, s2ref, s2ref])

    @classmethod
    def bounds(cls, loss_max: float) -> list[tuple[float, float]]:
        """Bounds in normalised units; loss-valued parameters scale with the largest loss."""
        raise NotImplementedError

    @classmethod
    def to_raw(cls, theta: np.ndarray, s1ref: float, s2ref: float) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def from_raw(cls, theta: np.ndarray, s1ref: float, s2ref: float) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def optional_terms(cls, theta: np.ndarray, feats: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
        """Terms the data may not resolve, keyed by the parameters only they determine."""
        return {}

    @classmethod
    def predict(cls, params: Mapping[str, float], curve: Curve, *, lam: float = LAMBDA) -> np.ndarray:
        """Predicted losses at ``curve.steps`` for raw-unit ``params``."""
        theta = np.array([params[k] for k in cls.param_names], dtype=np.float64)
        return cls.value_and_jac(theta, cls.features(curve, lam))[0]


def _shift(s1: np.ndarray, b: float, e: float, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``1-(1+E*S1)^-beta`` (the shift term over B) and the term's derivatives in E and beta."""
    base = 1.0 + e * s1
    decay = base**-beta
    return 1.0 - decay, b * beta * s1 * decay / base, b * decay * np.log(base)


class _Evaluation:
    """The value and Jacobian of a power law in ``S1`` plus terms linear in fixed feature
    rows, on one fit's fixed features: the optimiser evaluates them thousands of times, so
    the parts that do not depend on the parameters (the floored ``S1`` and its log, the
    Jacobian's constant columns) are computed once, and the Jacobian is written into one
    array, column by column, with the arithmetic of :func:`_shift` (which the multi-shift
    law's later terms still use). ``consts`` maps Jacobian columns to their fixed values."""

    def __init__(self, s1: np.ndarray, width: int, consts: Mapping[int, np.ndarray]):
        self.s1 = np.maximum(s1, 1e-12)
        self.log_s1 = np.log(self.s1)
        self.jac = np.empty((len(s1), width))
        for i, col in consts.items():
            self.jac[:, i] = col

    def power(self, a: float, alpha: float) -> np.ndarray:
        """``A*S1^-alpha`` (S1 floored away from 0), its derivatives in A and alpha written to
        Jacobian columns 1 and 2."""
        xa = self.s1**-alpha
        self.jac[:, 1] = xa
        np.multiply(-a * xa, self.log_s1, out=self.jac[:, 2])
        return a * xa

    def shift(self, s1: np.ndarray, b: float, e: float, beta: float, cols: tuple[int, int, int]) -> np.ndarray:
        """``1-(1+E*S1)^-beta`` (:func:`_shift`) written to Jacobian column ``cols[0]``, its
        derivatives in E and beta to ``cols[1]`` and ``cols[2]``; returns the term."""
        base = 1.0 + e * s1
        decay = base**-beta
        term, d_e, d_beta = self.jac[:, cols[0]], self.jac[:, cols[1]], self.jac[:, cols[2]]
        np.subtract(1.0, decay, out=term)
        np.divide(b * beta * s1 * decay, base, out=d_e)
        np.multiply(b * decay, np.log(base), out=d_beta)
        return term


class AnnealingLaw(_Law):
    """``L = L0 + A*S1^-alpha - C*S2`` (Tissue et al., arXiv 2408.11029).

    The power law in the forward area models progress at any LR; ``-C*S2`` the extra
    drop an LR decay buys. Ignores ``cpt_start`` (S2 carries over the boundary).
    """

    param_names = ("L0", "A", "alpha", "C")
    linear = ("L0", "A", "C")
    default_grid = {"alpha": (0.1, 0.25, 0.5, 0.8, 1.2)}

    @classmethod
    def value_and_jac(cls, theta, feats):
        return cls.evaluator(feats)(theta)

    @classmethod
    def evaluator(cls, feats):
        s2 = feats[2] + feats[3]
        ev = _Evaluation(feats[0] + feats[1], 4, {0: np.ones(len(s2)), 3: -s2})

        def value_and_jac(theta):
            l0, a, alpha, c = theta
            return l0 + ev.power(a, alpha) - c * s2, ev.jac
        return value_and_jac

    @classmethod
    def bounds(cls, loss_max):
        return [(0.0, loss_max), (0.0, 2 * loss_max), (0.0, 3.0), (0.0, loss_max)]

    @classmethod
    def to_raw(cls, theta, s1ref, s2ref):
        l0, a, alpha, c = theta
        return np.array([l0, a * s1ref**alpha, alpha, c / s2ref])

    @classmethod
    def from_raw(cls, theta, s1ref, s2ref):
        l0, a, alpha, c = theta
        return np.array([l0, a / s1ref**alpha, alpha, c * s2ref])


class CPTLaw(_Law):
    """CPT scaling law (Wang et al., arXiv 2505.07796).

    ``L = L0 + A*(S1pt+S1cpt)^-alpha - C1*S2pt - C2*S2cpt + B*(1-(1+E*S1cpt)^-beta)``.
    The last term is the distribution shift: it saturates at B as the CPT forward area
    grows (B>0 on old-domain validation data, B<0 on new-domain data). With no CPT phase
    (``cpt_start == 0``) S1cpt = S2cpt = 0 and this is the annealing law with C = C1.
    B, E and beta are weakly identifiable, so they are bounded and L2-regularised
    (:data:`REG_WEIGHT`).
    """

    param_names = ("L0", "A", "alpha", "C1", "C2", "B", "E", "beta")
    linear = ("L0", "A", "C1", "C2", "B")
    regularized = ("B", "E", "beta")
    amplitudes = ("B",)
    default_grid = {"alpha": (0.15, 0.4, 0.8), "E": (3.0, 30.0, 300.0), "beta": (0.5, 1.5)}

    @classmethod
    def value_and_jac(cls, theta, feats):
        # CPTLaw's own, also for the multi-shift law, which adds its terms to this value
        return CPTLaw._evaluator(feats, 8, {})[0](theta)

    @classmethod
    def evaluator(cls, feats):
        return CPTLaw._evaluator(feats, 8, {})[0]

    @staticmethod
    def _evaluator(feats, width: int, consts: Mapping[int, np.ndarray]) -> tuple:
        """The law's value and Jacobian in the first 8 columns of a ``width``-column
        Jacobian whose other fixed columns are ``consts``, and the :class:`_Evaluation`."""
        s1pt, s1cpt, s2pt, s2cpt = feats[:4]
        ev = _Evaluation(s1pt + s1cpt, width, {0: np.ones(len(s1pt)), 3: -s2pt, 4: -s2cpt, **consts})

        def value_and_jac(theta):
            l0, a, alpha, c1, c2, b, e, beta = theta[:8]
            pw = ev.power(a, alpha)
            shift = ev.shift(s1cpt, b, e, beta, (5, 6, 7))
            return l0 + pw - c1 * s2pt - c2 * s2cpt + b * shift, ev.jac
        return value_and_jac, ev

    @classmethod
    def optional_terms(cls, theta, feats):
        b, e, beta = theta[5:]
        return {("B", "E", "beta"): b * (1.0 - (1.0 + e * feats[1]) ** -beta)}

    @classmethod
    def bounds(cls, loss_max):
        half = 0.5 * loss_max
        return [(0.0, loss_max), (0.0, 2 * loss_max), (0.0, 3.0), (0.0, loss_max),
                (0.0, loss_max), (-half, half), (0.0, 1e3), (0.0, 3.0)]

    @classmethod
    def to_raw(cls, theta, s1ref, s2ref):
        l0, a, alpha, c1, c2, b, e, beta = theta
        return np.array([l0, a * s1ref**alpha, alpha, c1 / s2ref, c2 / s2ref, b, e / s1ref, beta])

    @classmethod
    def from_raw(cls, theta, s1ref, s2ref):
        l0, a, alpha, c1, c2, b, e, beta = theta
        return np.array([l0, a / s1ref**alpha, alpha, c1 * s2ref, c2 * s2ref, b, e * s1ref, beta])


LAWS: dict[str, type[_Law]] = {"AnnealingLaw": AnnealingLaw, "CPTLaw": CPTLaw}


class _MultiShiftCPTLaw(CPTLaw):
    """The CPT law with one distribution-shift term per data switch (see :func:`multi_shift_law`).

    ``L = L0 + A*S1^-alpha - C1*S2pt - C2*S2cpt + sum_i B_i*(1-(1+E*S1_i)^-beta)`` where
    ``S1_i`` is the forward area since switch ``i`` (switch 1 is ``cpt_start``, its ``B_1``
    is ``B``; later ones are ``Curve.shifts``). E and beta are shared: they say how fast a
    model moves to a new distribution, which depends on training more than on which switch
    it is, and the few points after a late switch cannot pin their own pair.

    Two optional refinements (class flags; :func:`multi_shift_law` names them), both linear
    in their new parameters, so they add no starting points to the fit:

    * ``anneal`` -- one annealing coefficient per phase between switches: ``C2`` for the
      annealing area gathered between switch 1 and 2, ``C2_i`` for the area gathered after
      switch ``i``. Without it one ``C2`` covers every phase after switch 1. How much an LR
      decay lowers an old split's loss depends on how close the data then trained on is to
      the split's, which changes at every switch.
    * ``drift`` -- a term ``D_i*S1_i`` per switch (either sign): after the quick jump that
      the saturating term describes, forgetting that keeps growing (``D_i > 0``) or recovers
      (``D_i < 0``, e.g. when the new data is closer to the split's than the previous) with
      the tokens trained since the switch. It is the first order of a second, slower
      saturating term ``D_i*(1-(1+F*S1_i)^-gamma)``: fitted on a real lineage that term ran
      into its linear range, with ``F`` and ``gamma`` left flat and the fit many times slower.

    A third one is not linear: ``gap`` -- the *stability gap* of continual learning (De Lange
    et al., ICLR 2023): right after a switch, at a high LR, an old split's loss overshoots and
    then partly recovers as the model learns to tell the domains apart. A term
    ``G_i*u*exp(1-u)``, ``u = S1_i/P``, per switch rises from 0, peaks at ``G_i`` when the
    forward area since the switch is ``P`` and fades; ``G_i >= 0`` (bounded like ``B``,
    regularised), one ``P`` shared by every switch (how long the overshoot lasts depends on
    the LR and the optimiser, not on which switch it is). ``P`` adds one axis to the grid of
    starting points. A saturating term alone puts the peak into ``B_i`` and overpredicts the
    loss of a branch forked after the recovery, or fits the recovery with ``D_i`` and
    underpredicts it.

    And one for an old split whose own data entered after step 0: ``entry`` -- the shift
    term it had while it was the new split, ``B0*(1-(1+E*S1_0)^-beta)`` over the forward
    area since its entry (``Curve.entry``), ``B0 <= 0``. Without it the power law alone
    has to follow the fast fall of the split's loss once its data is trained on, which it
    can only do with its exponent at the bound, leaving a systematic residual over the
    whole of the split's own segment. With it, the law of an old split is the law it was
    released with plus one term per later switch.
    """

    n_shifts: ClassVar[int]
    anneal: ClassVar[bool] = False
    drift: ClassVar[bool] = False
    gap: ClassVar[bool] = False
    entry: ClassVar[bool] = False

    @classmethod
    def features(cls, curve, lam):
        """:func:`split_areas` plus one row per later switch (the forward area since it),
        with ``anneal`` the annealing area of each phase (row 3 then holds phase 1's), and
        with ``entry`` the forward area since the curve's entry (zero without one)."""
        base = split_areas(curve, lam=lam)
        n = curve.steps.max(initial=0) + 1
        a = _Areas(curve.lrs, n, lam)
        t = curve.steps
        starts = [curve.cpt_start, *curve.shifts[: cls.n_shifts - 1]]
        starts += [None] * (cls.n_shifts - len(starts))  # switches this history never reaches
        rows = []
        for b in starts[1:]:
            if b is not None and b <= n:
                # the same arithmetic as split_areas' S1cpt: zero before the switch
                rows.append(a.s1(t) - a.s1(np.minimum(t, b - 1)))
            else:
                rows.append(np.zeros(len(t)))
        if cls.anneal:
            # S2 gathered from each switch up to the next one (zero before it, frozen after)
            edges = [b if b is not None and 0 < b <= n else None for b in starts]
            base = base.copy()
            for i, b in enumerate(edges):
                phase = np.zeros(len(t))
                if b is not None:
                    nxt = next((e for e in edges[i + 1:] if e is not None), None)
                    lo = np.minimum(t, b - 1)
                    hi = t if nxt is None else np.maximum(np.minimum(t, nxt - 1), lo)
                    phase = a.s2(hi) - a.s2(lo)
                if i == 0:
                    base[3] = phase
                else:
                    rows.append(phase)
        if cls.entry:
            e = curve.entry
            rows.append(a.s1(t) - a.s1(np.minimum(t, e - 1)) if 0 < e <= n else np.zeros(len(t)))
        return np.vstack([base, *rows])

    @classmethod
    def feature_scale(cls, s1ref, s2ref):
        extra = cls.n_shifts - 1
        return np.concatenate([super().feature_scale(s1ref, s2ref), np.full(extra, s1ref),
                               np.full(extra if cls.anneal else 0, s2ref), np.full(int(cls.entry), s1ref)])

    @classmethod
    def _slices(cls) -> tuple[slice, slice, slice, slice, slice]:
        """Where the extra parameters sit in theta: ``B2..Bn``, ``C2_2..C2_n``, ``D..Dn``,
        ``G..Gn``, ``B0`` (``P``, with ``gap``, is the last parameter)."""
        n = cls.n_shifts
        b = slice(8, 8 + n - 1)
        c = slice(b.stop, b.stop + (n - 1 if cls.anneal else 0))
        d = slice(c.stop, c.stop + (n if cls.drift else 0))
        g = slice(d.stop, d.stop + (n if cls.gap else 0))
        return b, c, d, g, slice(g.stop, g.stop + int(cls.entry))

    @staticmethod
    def _gap(s1: np.ndarray, g: float, p: float) -> tuple[np.ndarray, np.ndarray]:
        """``u*exp(1-u)`` with ``u = S1/P`` (the gap term over G) and the term's derivative in P."""
        u = s1 / p
        e = np.exp(1.0 - u)
        return u * e, -g * (1.0 - u) * e * u / p

    @classmethod
    def _s1_rows(cls, feats) -> list[np.ndarray]:
        """The forward areas since each switch: S1cpt, then the later switches'."""
        return [feats[1], *feats[4: 4 + cls.n_shifts - 1]]

    @classmethod
    def _entry_row(cls, feats) -> list[np.ndarray]:
        """The forward area since the entry, as a one-row list (empty without ``entry``)."""
        return [feats[-1]] if cls.entry else []

    @classmethod
    def evaluator(cls, feats):
        """:meth:`value_and_jac`'s arithmetic, with the fixed columns (annealing areas, drift
        areas) written once."""
        bs, cs, ds, gs, es = cls._slices()
        s1s, entry = cls._s1_rows(feats), cls._entry_row(feats)
        phases = feats[4 + cls.n_shifts - 1:]
        consts = {i: -s2 for i, s2 in zip(range(cs.start, cs.stop), phases)}
        consts.update({i: s1 for i, s1 in zip(range(ds.start, ds.stop), s1s)})
        core, ev = CPTLaw._evaluator(feats, len(cls.param_names), consts)
        jac = ev.jac

        def value_and_jac(theta):
            value = core(theta)[0]
            e, beta = theta[6], theta[7]

            def shift(i, b, s1):
                nonlocal value
                term, d_e, d_beta = _shift(s1, b, e, beta)
                value = value + b * term
                jac[:, 6] += d_e
                jac[:, 7] += d_beta
                jac[:, i] = term

            for i, b, s1 in zip(range(bs.start, bs.stop), theta[bs], s1s[1:]):
                shift(i, b, s1)
            for c, s2 in zip(theta[cs], phases):
                value = value - c * s2
            for d, s1 in zip(theta[ds], s1s):
                value = value + d * s1
            d_p = np.zeros_like(value)
            for i, g, s1 in zip(range(gs.start, gs.stop), theta[gs], s1s):
                term, dp = cls._gap(s1, g, theta[-1])
                value = value + g * term
                d_p += dp
                jac[:, i] = term
            for i, b, s1 in zip(range(es.start, es.stop), theta[es], entry):
                shift(i, b, s1)
            if cls.gap:
                jac[:, -1] = d_p
            return value, jac
        return value_and_jac

    @classmethod
    def value_and_jac(cls, theta, feats):
        value, jac = super().value_and_jac(theta[:8], feats[:4])
        bs, cs, ds, gs, es = cls._slices()
        e, beta = theta[6], theta[7]
        s1s = cls._s1_rows(feats)
        cols = []

        def shift(b, s1):
            nonlocal value
            term, d_e, d_beta = _shift(s1, b, e, beta)
            value = value + b * term
            jac[:, 6] += d_e
            jac[:, 7] += d_beta
            cols.append(term)

        for b, s1 in zip(theta[bs], s1s[1:]):
            shift(b, s1)
        for c, s2 in zip(theta[cs], feats[4 + cls.n_shifts - 1:]):
            value = value - c * s2
            cols.append(-s2)
        for d, s1 in zip(theta[ds], s1s):
            value = value + d * s1
            cols.append(s1)
        d_p = np.zeros_like(value)
        for g, s1 in zip(theta[gs], s1s):
            term, dp = cls._gap(s1, g, theta[-1])
            value = value + g * term
            d_p += dp
            cols.append(term)
        for b, s1 in zip(theta[es], cls._entry_row(feats)):
            shift(b, s1)
        if cls.gap:
            cols.append(d_p)
        return value, np.column_stack([jac, *cols])

    @classmethod
    def optional_terms(cls, theta, feats):
        """Each switch's shift term decides its own amplitude; E and beta are resolved when
        the shift terms together are. Each phase's annealing and each drift term decides
        its own coefficient (a phase with no LR decay observed leaves its C2_i flat)."""
        bs, cs, ds, gs, es = cls._slices()
        e, beta = theta[6], theta[7]
        s1s = cls._s1_rows(feats)
        names = cls.param_names
        amps = [5, *range(bs.start, bs.stop), *range(es.start, es.stop)]
        terms = {(names[i],): theta[i] * _shift(s1, theta[i], e, beta)[0]
                 for i, s1 in zip(amps, s1s + cls._entry_row(feats))}
        out = {**terms, ("E", "beta"): np.sum(list(terms.values()), axis=0)}
        phases = feats[4 + cls.n_shifts - 1:]
        out.update({(names[i],): theta[i] * s2 for i, s2 in zip(range(cs.start, cs.stop), phases)})
        out.update({(names[i],): theta[i] * s1 for i, s1 in zip(range(ds.start, ds.stop), s1s)})
        if cls.gap:
            gaps = {(names[i],): theta[i] * cls._gap(s1, theta[i], theta[-1])[0]
                    for i, s1 in zip(range(gs.start, gs.stop), s1s)}
            out.update({**gaps, ("P",): np.sum(list(gaps.values()), axis=0)})
        return out

    @classmethod
    def bounds(cls, loss_max):
        base = super().bounds(loss_max)
        _, cs, ds, gs, es = cls._slices()
        # amplitudes like B; annealing coefficients like C2; drifts of either sign; gaps
        # (overshoots) of one sign, at most half the largest loss; the entry lowers the
        # loss (the new-domain sign of 2505.07796); P within the run's area
        gap = [(0.0, base[5][1])] * (gs.stop - gs.start)
        entry = [(base[5][0], 0.0)] * (es.stop - es.start)
        return (base + [base[5]] * (cls.n_shifts - 1) + [base[4]] * (cs.stop - cs.start)
                + [(-loss_max, loss_max)] * (ds.stop - ds.start) + gap + entry
                + ([(1e-3, 1.0)] if cls.gap else []))

    @classmethod
    def to_raw(cls, theta, s1ref, s2ref):
        return cls._rescale(theta, super().to_raw(theta[:8], s1ref, s2ref), 1 / s2ref, 1 / s1ref)

    @classmethod
    def from_raw(cls, theta, s1ref, s2ref):
        return cls._rescale(theta, super().from_raw(theta[:8], s1ref, s2ref), s2ref, s1ref)

    @classmethod
    def _rescale(cls, theta, base, c_factor, d_factor):
        """``theta`` with its first 8 parameters replaced by ``base``, C2_i times ``c_factor``,
        D_i times ``d_factor`` and P divided by it (B_i, G_i and B0 are losses: unchanged)."""
        out = np.concatenate([base, theta[8:]]).astype(np.float64)
        _, cs, ds, _, _ = cls._slices()
        out[cs] *= c_factor
        out[ds] *= d_factor
        if cls.gap:
            out[-1] /= d_factor  # an area: in raw units P times s1ref
        return out


def multi_shift_law(n_shifts: int, *, anneal: bool = False, drift: bool = False,
                    gap: bool = False, entry: bool = False) -> type[_Law]:
    """The CPT law with ``n_shifts`` data switches (``cpt_start`` and ``n_shifts - 1`` of
    ``Curve.shifts``), amplitudes ``B, B2, ... B<n>`` and shared ``E, beta``.

    ``anneal`` adds one annealing coefficient per later phase (``C2_2 ... C2_<n>``), ``drift``
    one linear drift per switch (``D, D2, ... D<n>``), ``gap`` one stability-gap amplitude
    per switch (``G, G2, ... G<n>``) and their shared area ``P``, ``entry`` a shift term
    ``B0`` for the curve's own entry (:attr:`Curve.entry`); see :class:`_MultiShiftCPTLaw`.
    One switch with none of drift, gap and entry is :class:`CPTLaw` itself (one switch has
    one phase: ``anneal`` changes nothing there), so a two-version lineage fits exactly as
    before. The class is named ``MultiShiftCPTLaw[n]``, with ``,entry``, ``,anneal``,
    ``,drift`` and/or ``,gap`` before the bracket when set (what :attr:`FitResult.law`
    records and :func:`law_class` reads back).
    """
    if n_shifts < 1:
        raise ValueError(f"a CPT law needs at least one data switch, got {n_shifts}")
    anneal = bool(anneal) and n_shifts > 1
    if n_shifts == 1 and not (drift or gap or entry):
        return CPTLaw
    return _multi_shift_law(int(n_shifts), anneal, bool(drift), bool(gap), bool(entry))


@functools.cache  # one class per form: law_class(name) returns the very class that was fitted
def _multi_shift_law(n_shifts: int, anneal: bool, drift: bool, gap: bool = False,
                     entry: bool = False) -> type[_Law]:
    later = range(2, n_shifts + 1)
    amps = tuple(f"B{i}" for i in later)
    phases = tuple(f"C2_{i}" for i in later) if anneal else ()
    drifts = ("D", *(f"D{i}" for i in later)) if drift else ()
    gaps = ("G", *(f"G{i}" for i in later)) if gap else ()
    b0 = ("B0",) if entry else ()
    flags = "".join(f",{k}" for k, on in (("entry", entry), ("anneal", anneal), ("drift", drift),
                                           ("gap", gap)) if on)
    grid = {**CPTLaw.default_grid, "P": GAP_GRID} if gap else CPTLaw.default_grid
    return type(f"MultiShiftCPTLaw[{n_shifts}{flags}]", (_MultiShiftCPTLaw,), {
        "param_names": CPTLaw.param_names + amps + phases + drifts + gaps + b0 + (("P",) if gap else ()),
        "linear": CPTLaw.linear + amps + phases + drifts + gaps + b0,
        # B0 is not among the amplitudes: its sign is fixed by its bounds, not by fit_law's ``sign``
        "regularized": CPTLaw.regularized + amps + drifts + gaps + b0, "amplitudes": CPTLaw.amplitudes + amps,
        "default_grid": grid, "n_shifts": n_shifts, "anneal": anneal, "drift": drift, "gap": gap,
        "entry": entry, "__doc__": _MultiShiftCPTLaw.__doc__})


def law_class(law: type[_Law] | str) -> type[_Law]:
    """A law from its class or its name (:data:`LAWS`, or ``MultiShiftCPTLaw[n]`` with
    optional ``,entry``, ``,anneal``, ``,drift`` and ``,gap``)."""
    if not isinstance(law, str):
        return law
    if law in LAWS:
        return LAWS[law]
    m = re.fullmatch(r"MultiShiftCPTLaw\[(\d+)(,entry)?(,anneal)?(,drift)?(,gap)?\]", law)
    if m is None:
        raise ValueError(f"unknown law {law!r} (known: {', '.join(LAWS)}, "
                         "MultiShiftCPTLaw[n] with any of ,entry ,anneal ,drift ,gap in that order, "
                         "e.g. MultiShiftCPTLaw[3,drift,gap])")
    return multi_shift_law(int(m.group(1)), entry=bool(m.group(2)), anneal=bool(m.group(3)),
                           drift=bool(m.group(4)), gap=bool(m.group(5)))


def anneal_params(law: type[_Law] | str) -> tuple[str, ...]:
    """The coefficients of a law's annealing terms, one per phase, the last phase's first: what
    credits a decay of the latest version's branches, then of each earlier phase
    (``C``; ``C2, C1``; ``C2_<n>, ..., C2_2, C2, C1`` for a multi-shift law with ``anneal``)."""
    cls = law_class(law)
    if "C2" not in cls.param_names:
        return ("C",)
    later = tuple(f"C2_{i}" for i in range(cls.n_shifts, 1, -1)) if getattr(cls, "anneal", False) else ()
    return (*later, "C2", "C1")


@contextlib.contextmanager
def single_thread_blas():
    """Run the block with every loaded OpenBLAS limited to one thread.

    L-BFGS-B calls BLAS on vectors of a handful of parameters; a multi-threaded OpenBLAS
    then spends its time waking spinning threads, which on a loaded 2-CPU machine makes a
    fit 100x slower (seconds -> minutes). Finds the numpy/scipy OpenBLAS builds among the
    loaded libraries (as threadpoolctl does, without the dependency) and restores their
    thread counts afterwards. A no-op where none is found.
    """
    handles = []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("", "64_"):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    handles.append((put, int(get())))
                    break
    for put, _ in handles:
        put(1)
    try:
        yield
    finally:
        for put, n in handles:
            put(n)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative: quadratic inside ``delta``, linear outside."""
    size = np.abs(r)
    value = np.where(size <= delta, 0.5 * r * r, delta * (size - 0.5 * delta))
    return value, np.clip(r, -delta, delta)  # r inside delta, delta * sign(r) outside


@dataclass
class FitResult:
    """One fitted parameter set for one validation set.

    params are in raw units (LR sums as they are). r2 and mape (mean absolute percentage
    error, in percent) are on the losses; huber is the un-regularised sum of Huber terms
    of log residuals, at threshold delta (:func:`huber_delta`). degenerate names parameters
    the data do not determine: those that ended at a bound, and those of an optional term
    smaller than the residual noise (:data:`RESOLVE_FACTOR`; e.g. B, E, beta when the curves
    show no distribution shift).
    held_out: when the law was chosen among candidates (:func:`select_fit`), each
    candidate's held-out error (mean absolute log error of held-out branches' final losses);
    empty when there was no choice. held_out_errors: the same per held-out branch (in one
    order for every candidate) and held_out_bic: each candidate's information criterion
    (:func:`_bic`), what the choice among equals rests on.
    outliers: the points whose log residual exceeds :data:`OUTLIER_K` noise standard
    deviations, largest first, as ``{"curve", "step", "residual"}`` (``step`` as the curve
    records it, one past the index; ``residual`` relative, observed / predicted - 1), and
    outlier_share their share of the squared error that R^2 counts. Why: on curves with
    jumps a few points set R^2; this tells a jittery curve from a law that misses its shape.
    r2_ceiling: the R^2 a law that followed the curves' true mean exactly would reach, given
    their noise (:func:`r2_ceiling`): what R^2 is to be read against on noisy curves.
    optimizer: how L-BFGS-B ended the kept fit, as scipy's ``OptimizeResult.message``; and
    optimizer_status its ``status``: 0 converged, 1 stopped at the iteration limit (the fit
    may be short of its optimum: logged), 2 the line search could not lower the objective
    further (``ABNORMAL_TERMINATION_IN_LNSRCH``: at the tight polish tolerance this is the
    limit of floating point near the optimum, not a failure).
    """

    law: str
    params: dict[str, float]
    r2: float
    mape: float
    huber: float
    n_points: int
    n_starts: int
    degenerate: list[str] = field(default_factory=list)
    lam: float = LAMBDA
    held_out: dict[str, float] = field(default_factory=dict)
    delta: float = HUBER_DELTA
    held_out_errors: dict[str, list[float]] = field(default_factory=dict)
    held_out_bic: dict[str, float] = field(default_factory=dict)
    outliers: list[dict] = field(default_factory=list)
    outlier_share: float = 0.0
    r2_ceiling: float = float("nan")
    optimizer: str = ""
    optimizer_status: int = 0

    def predict(self, curve_or_lrs, steps=None, *, cpt_start: int = 0, shifts: Sequence[int] = (),
                entry: int = 0) -> np.ndarray:
        """Losses for a :class:`Curve`, an ``(lrs, steps[, cpt_start])`` tuple, or ``lrs``
        plus ``steps`` (all steps when omitted); ``shifts``: later data switches
        (:attr:`Curve.shifts`); ``entry``: :attr:`Curve.entry`."""
        curve = _as_curve(curve_or_lrs, steps, cpt_start, shifts, entry)
        return law_class(self.law).predict(self.params, curve, lam=self.lam)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FitResult":
        d = dict(d)
        d["params"] = {k: float(v) for k, v in d["params"].items()}
        d["degenerate"] = list(d.get("degenerate", []))
        d["held_out"] = {k: float(v) for k, v in d.get("held_out", {}).items()}
        d["held_out_errors"] = {k: [float(x) for x in v] for k, v in d.get("held_out_errors", {}).items()}
        d["held_out_bic"] = {k: float(v) for k, v in d.get("held_out_bic", {}).items()}
        d["outliers"] = [dict(o) for o in d.get("outliers", [])]
        return cls(**d)


def _as_curve(curve_or_lrs, steps, cpt_start: int, shifts: Sequence[int] = (), entry: int = 0) -> Curve:
    if isinstance(curve_or_lrs, Curve):
        return curve_or_lrs
    if isinstance(curve_or_lrs, tuple):
        lrs, steps, *rest = curve_or_lrs
        return _as_curve(lrs, steps, rest[0] if rest else cpt_start, shifts, entry)
    lrs = curve_or_lrs if isinstance(curve_or_lrs, LRHistory) else np.asarray(curve_or_lrs, dtype=np.float64)
    steps = np.arange(len(lrs)) if steps is None else np.asarray(steps)
    return Curve(lrs, steps, np.full(np.shape(steps), np.nan), cpt_start=cpt_start, shifts=tuple(shifts),
                 entry=entry)


def predict_final_loss(fit: FitResult, lrs, cpt_start: int = 0, shifts: Sequence[int] = (),
                       entry: int = 0) -> float:
    """Predicted loss after the last step of an LR history: the branch-ranking score."""
    return float(fit.predict(lrs, [len(lrs) - 1], cpt_start=cpt_start, shifts=shifts, entry=entry)[0])


def noise_scale(curves: Sequence[Curve]) -> float:
    """Robust standard deviation of the observation noise of log losses, model-free: the
    median absolute deviation of every curve's second differences (consecutive observed
    points), which cancel a locally linear trend, scaled to a Gaussian's sigma
    (1.4826 / sqrt(6)). The few differences that straddle a data switch or a re-warm are
    outliers the median ignores. 0 with fewer than three differences."""
    d2 = [np.diff(np.log(c.losses[np.argsort(c.steps)]), 2) for c in curves if len(c.steps) >= 3]
    d2 = np.concatenate(d2) if d2 else np.empty(0)
    if len(d2) < 3 or not np.all(np.isfinite(d2)):
        return 0.0
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / math.sqrt(6.0))


def r2_ceiling(curves: Sequence[Curve]) -> float:
    """The R^2 of the curves' true mean against their observations, given their noise
    (:func:`noise_scale`, relative): ``1 - sum((sigma * loss)^2) / sum((loss - mean)^2)``.

    Why: R^2 divides the squared error by the spread of the losses, so the same noise caps it
    lower on flat curves (an old split forgetting at the peak LR moves by a few percent)
    than on a curve falling from its start. A fit can pass it: on few points its parameters
    also fit some of the noise (and, estimated from those points, the cap is noisy too).
    Heavy-tailed jumps (:attr:`FitResult.outliers`) lower R^2 further than this Gaussian
    estimate accounts for. 1.0 for noise-free curves, NaN for flat ones.
    """
    obs = np.concatenate([c.losses for c in curves]) if curves else np.empty(0)
    obs = obs[np.isfinite(obs)]
    ss_tot = float(np.sum((obs - obs.mean()) ** 2)) if len(obs) else 0.0
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(np.sum((noise_scale(curves) * obs) ** 2)) / ss_tot


def huber_delta(curves: Sequence[Curve]) -> float:
    """The Huber threshold a fit of ``curves`` uses: :data:`HUBER_K` noise standard
    deviations (:func:`noise_scale`), at least :data:`HUBER_DELTA`.

    Why not the published 1e-3 everywhere: it suits curves smooth to 0.1%. Validation losses
    of a small model on a few hundred blocks scatter by 0.5-2% (an old split's loss swings
    as the new data trains), so with 1e-3 every point sits in Huber's linear part and the
    fit is a median regression: it follows the lower envelope of the never-annealed main
    path, reads too little gain into annealing, and ranks a branch of 3 steps level with
    one of 30 (measured: rank correlation -0.4 with 16 measured branches of the law
    benchmark; +0.6 with the noise-scaled threshold)."""
    return max(HUBER_DELTA, HUBER_K * noise_scale(curves))


@dataclass
class _Problem:
    """A fit in normalised units: stacked features, log targets, bounds and scales."""

    law: type[_Law]
    feats: np.ndarray
    losses: np.ndarray
    bounds: list[tuple[float, float]]
    scale: np.ndarray  # optimiser variable z = theta / scale, so |z| <= 1
    s1ref: float
    s2ref: float
    delta: float = HUBER_DELTA  # Huber threshold (huber_delta)
    raw_feats: np.ndarray | None = None  # feats in raw units (what FitResult.predict reads)

    def __post_init__(self) -> None:
        # what every evaluation of the objective shares: the fit's features and targets are fixed
        self._value_and_jac = self.law.evaluator(self.feats)
        self._log_losses = np.log(self.losses)

    def objective(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean Huber of log residuals / delta**2 plus the B/E/beta regulariser, and its
        gradient in z (analytic: finite differences are too coarse inside delta)."""
        theta = z * self.scale
        pred, jac = self._value_and_jac(theta)
        pred = np.maximum(pred, 1e-12)
        h, dh = huber(self._log_losses - np.log(pred), self.delta)
        norm = len(h) * self.delta**2
        grad = -((dh / pred) @ jac) / norm * self.scale
        value = h.sum() / norm
        for i in self._reg_idx:
            value += REG_WEIGHT * z[i] ** 2
            grad[i] += 2 * REG_WEIGHT * z[i]
        return float(value), grad

    @property
    def _reg_idx(self) -> list[int]:
        return [self.law.param_names.index(k) for k in self.law.regularized]

    def initial(self, seed: Mapping[str, float]) -> np.ndarray:
        """Start at ``seed`` for the non-linear parameters; solve the linear ones by bounded
        least squares on the losses (their Jacobian columns are the design matrix)."""
        theta = np.array([seed.get(k, 0.0) for k in self.law.param_names])
        lin = [self.law.param_names.index(k) for k in self.law.linear]
        jac = self.law.value_and_jac(theta, self.feats)[1][:, lin]
        lo, hi = np.array(self.bounds).T
        sol = lsq_linear(jac, self.losses, bounds=(lo[lin], hi[lin]), method="bvls")
        theta[lin] = sol.x
        return np.clip(theta, lo, hi)

    def at_bound(self, theta: np.ndarray) -> list[str]:
        lo, hi = np.array(self.bounds).T
        tol = BOUND_TOL * self.scale
        hit = (theta - lo <= tol) | (hi - theta <= tol)
        return [k for k, h in zip(self.law.param_names, hit) if h]


def _problem(law: type[_Law], curves: Sequence[Curve], lam: float, delta: float) -> _Problem:
    feats = np.concatenate([law.features(c, lam) for c in curves], axis=1)
    losses = np.concatenate([c.losses for c in curves])
    if not losses.size:
        raise ValueError("no observed losses to fit: every curve is empty")
    if not np.all(np.isfinite(losses) & (losses > 0)):
        raise ValueError("observed losses must be finite and positive")
    s1ref = float(np.max(feats[0] + feats[1])) or 1.0
    s2ref = float(np.max(np.abs(feats[2] + feats[3]))) or 1.0
    raw = feats
    feats = feats / law.feature_scale(s1ref, s2ref)[:, None]
    bounds = law.bounds(float(losses.max()))
    scale = np.array([max(abs(lo), abs(hi)) for lo, hi in bounds])
    return _Problem(law, feats, losses, bounds, scale, s1ref, s2ref, delta, raw)


def _seeds(law: type[_Law], prob: _Problem, seed_grid) -> list[dict[str, float]]:
    """Normalised non-linear starting points: the law's default grid, or ``seed_grid``
    (raw units, e.g. ``[{"alpha": 0.5, "E": 2.0, "beta": 1.0}]``) mapped to normalised."""
    if seed_grid is None:
        names = list(law.default_grid)
        return [dict(zip(names, v)) for v in itertools.product(*law.default_grid.values())]
    seeds = []
    for raw in seed_grid:
        full = {k: float(raw.get(k, 1.0)) for k in law.param_names}
        theta = law.from_raw(np.array([full[k] for k in law.param_names]), prob.s1ref, prob.s2ref)
        seeds.append({k: v for k, v in zip(law.param_names, theta) if k in raw})
    return seeds


def fit_law(law_cls: type[_Law] | str, curves: Sequence[Curve], *, seed_grid=None,
            lam: float = LAMBDA, sign: Mapping[str, int] | None = None, delta: float | None = None,
            quiet: bool = False, start: Mapping[str, float] | None = None) -> FitResult:
    """Fit one parameter set of ``law_cls`` across all ``curves`` (one validation set).

    Runs L-BFGS-B from every start of a deterministic grid over the non-linear parameters
    (``seed_grid`` overrides it, raw units) to a loose tolerance (:data:`SCREEN_OPTIONS`),
    then from the :data:`POLISH_STARTS` lowest of those to a tight one, and keeps the
    lowest objective; ties go to the earlier start, so the result is reproducible bit for
    bit. The screening makes a fit several times cheaper than polishing every start (a
    poorly conditioned form such as ``[n,gap]`` runs into ``maxiter`` when polished).

    sign: ``{param: +1 or -1}`` restricts a parameter to one sign, e.g. ``{"B": -1}`` on a
        new-domain split (2505.07796: the shift term lowers new-domain loss); a parameter
        that ends at 0 is then reported degenerate (the data wanted the other sign). ``B``
        stands for every shift amplitude of a multi-shift law (``B2``, ``B3``, ...).
    delta: Huber threshold on log residuals; None = :func:`huber_delta` of ``curves``.
    quiet: do not log degenerate parameters (they are still reported in the result).
    start: every raw parameter of an earlier fit of this law (its ``params``): polished from
        there alone, no grid (a refit on a few more curves: its optimum lies near the earlier
        one; the grid's screening is what most of a fit's evaluations go to).
    """
    law = law_class(law_cls)
    if not curves:
        raise ValueError("fit_law needs at least one curve")
    prob = _problem(law, curves, lam, huber_delta(curves) if delta is None else float(delta))
    for name, sgn in _expand_sign(law, sign).items():
        if name not in law.param_names:
            continue  # e.g. B when the annealing law was chosen
        i = law.param_names.index(name)
        lo, hi = prob.bounds[i]
        prob.bounds[i] = (max(lo, 0.0), hi) if sgn > 0 else (lo, min(hi, 0.0))
    z_bounds = [(lo / s, hi / s) for (lo, hi), s in zip(prob.bounds, prob.scale)]
    seeds = _seeds(law, prob, seed_grid) if start is None else []

    def run(z0, options):
        return minimize(prob.objective, z0, jac=True, method="L-BFGS-B", bounds=z_bounds, options=options)

    with single_thread_blas():
        # Every start to a loose tolerance, then the best POLISH_STARTS of them to the tight
        # one: the tight tolerance costs ~2000 evaluations per start, and most starts only
        # need to show which basin is lowest.
        if start is None:
            starts = [prob.initial(seed) / prob.scale for seed in seeds]
        else:  # the earlier optimum as it was, the linear parameters too (not solved afresh)
            seeds = [start]
            theta = law.from_raw(np.array([float(start[k]) for k in law.param_names]), prob.s1ref, prob.s2ref)
            lo, hi = np.array(prob.bounds).T
            starts = [np.clip(theta, lo, hi) / prob.scale]
        if len(starts) > POLISH_STARTS:
            screened = [run(z0, SCREEN_OPTIONS) for z0 in starts]
            order = sorted(range(len(starts)), key=lambda i: (screened[i].fun, i))[:POLISH_STARTS]
            starts = [screened[i].x for i in sorted(order)]
        best = None
        for z0 in starts:
            res = run(z0, POLISH_OPTIONS)
            if best is None or res.fun < best.fun:
                best = res
    if best.status == 1 and not quiet:
        log.warning("%s fit stopped at the iteration limit (%s): it may be short of its optimum",
                    law.__name__, best.message)
    fit = _summarise(law, prob, curves, best.x * prob.scale, len(seeds), lam, quiet)
    fit.optimizer, fit.optimizer_status = str(best.message), int(best.status)
    return fit


def _expand_sign(law: type[_Law], sign: Mapping[str, int] | None) -> dict[str, int]:
    """``sign`` with ``B`` standing for every shift amplitude of ``law``."""
    out = dict(sign or {})
    if "B" in out:
        out.update({k: out["B"] for k in law.amplitudes if k not in out})
    return out


def _held_out_curves(curves: Sequence[Curve], anchors: Sequence[str]) -> list[int]:
    """Indices of the curves a cross-validation holds out: every observed curve not named in
    ``anchors``, at most :data:`LAMBDA_FOLDS` of them spread evenly over their order."""
    held = [i for i, c in enumerate(curves) if c.name not in anchors and len(c.steps)]
    if len(held) > LAMBDA_FOLDS:
        held = [held[int(k)] for k in np.linspace(0, len(held) - 1, LAMBDA_FOLDS).round()]
    return held


def _last_phase_curves(curves: Sequence[Curve], anchors: Sequence[str]) -> list[int]:
    """Indices of the curves observed only after their split's last data switch (not named
    in ``anchors``): on a lineage, the branches of the version being released -- the
    curves a branch search ranks. At most :data:`LAMBDA_FOLDS`, spread over their order."""
    held = [i for i, c in enumerate(curves)
            if c.name not in anchors and len(c.steps) and c.steps.min() >= max((c.cpt_start, *c.shifts))]
    if len(held) > LAMBDA_FOLDS:
        held = [held[int(k)] for k in np.linspace(0, len(held) - 1, LAMBDA_FOLDS).round()]
    return held


def _held_out_errors(law_cls, curves: Sequence[Curve], sign, lam: float, held: Sequence[int],
                     full: FitResult | None = None, delta: float | None = None) -> list[float]:
    """Log error ``log(predicted / observed)`` of each held-out curve's last observed loss,
    predicted by a fit on the other curves (``full``: the law's fit on all of them, if done).
    Every fold keeps the full fit's Huber threshold: the folds differ by one curve, not by
    how the residuals are weighed."""
    # Warm start: a fold drops one curve, so its optimum lies near the full fit's.
    # One start from there instead of the multi-start grid makes the cross-validation
    # (most of a refit's time, and a sweep refits after every trial) several times cheaper.
    full = full or fit_law(law_cls, curves, lam=lam, sign=sign, delta=delta, quiet=True)
    start = [{k: full.params[k] for k in law_class(full.law).default_grid}]
    errors = []
    for i in held:
        fit = fit_law(law_cls, [c for j, c in enumerate(curves) if j != i], lam=lam, sign=sign,
                      delta=full.delta, quiet=True, seed_grid=start)
        c = curves[i]
        last = int(np.argmax(c.steps))
        errors.append(float(np.log(max(fit.predict(c)[last], 1e-12) / c.losses[last])))
    return errors


def select_fit(candidates: Sequence[type[_Law] | str], curves: Sequence[Curve], *,
               sign: Mapping[str, int] | None = None, lam: float = LAMBDA, anchors: Sequence[str] = ("main",),
               delta: float | None = None, quiet: bool = False) -> FitResult:
    """The fit, on all ``curves``, of the candidate law that best predicts the final loss of
    branches its fit has not seen; its ``held_out`` holds every candidate's score.

    The identifiability guard of the richer laws: more terms always fit the observed
    points at least as well, so in-sample error cannot choose. The measure is the one a
    branch search needs and the law benchmark reports: the final loss of a branch of the
    version being released (a curve observed only after the split's last data switch,
    :func:`_last_phase_curves`), predicted by a fit on everything else. Each such branch is
    held out in turn; the score is the mean absolute log error of the held-out final losses
    (the mean absolute percentage error, to first order). With fewer than two such branches
    every curve not named in ``anchors`` takes a turn instead (as in :func:`select_lambda`).
    ``candidates`` go simplest first. Among the richer ones (all but the first) the
    simplest whose score is within :data:`SELECT_MARGIN` of their best is the contender; it
    is chosen if its score is :data:`REFERENCE_FACTOR` times smaller than the first
    candidate's: a law that predicts clearly better wins on that alone. Without such a
    winner the observed curves decide among the candidates the held-out branches cannot
    tell apart: those that predict as well as the first one and as well as the best-scoring
    one (worse by no more than :data:`SELECT_MARGIN` of its score or one standard error of
    the paired differences, :func:`_predicts_as_well` -- the one-standard-error rule, from
    the best law as well as from the reference), the one with the lowest Bayesian
    information criterion of its fit to all curves (:func:`_bic`). A richer law then has
    to describe the curves better by more than its extra parameters buy on noise -- e.g.
    an old split's entry term, which changes the fit over the split's own segment, not the
    final losses of the released version's branches. Measuring from the best law matters
    when the criteria barely differ: a fit a little tighter on the observed curves must
    not win over a law that predicts the held-out branches clearly better. With fewer
    than two curves to hold out there is nothing to compare: the first candidate is
    fitted and ``held_out`` is empty. Every candidate is fitted with the same Huber
    threshold ``delta`` (None: :func:`huber_delta` of ``curves``).
    """
    delta = huber_delta(curves) if delta is None else float(delta)
    held = _last_phase_curves(curves, anchors)
    if len(held) < 2:
        held = _held_out_curves(curves, anchors)
    if len(held) < 2 or len(candidates) < 2:
        return fit_law(candidates[0], curves, lam=lam, sign=sign, delta=delta, quiet=quiet)
    errors, fits = {}, {}
    for c in candidates:
        name = law_class(c).__name__
        fits[name] = fit_law(c, curves, lam=lam, sign=sign, delta=delta, quiet=True)
        errors[name] = np.abs(_held_out_errors(c, curves, sign, lam, held, fits[name]))
    scores = {name: float(np.mean(e)) for name, e in errors.items()}
    first, *richer = scores
    floor = min(scores[name] for name in richer) * (1.0 + SELECT_MARGIN)
    contender = next(name for name in richer if scores[name] <= floor)  # the simplest such
    if scores[contender] * REFERENCE_FACTOR <= scores[first]:
        best = contender
    else:
        lowest = min(scores, key=scores.get)
        tied = [name for name in scores
                if _predicts_as_well(errors[name], errors[first]) and _predicts_as_well(errors[name], errors[lowest])]
        best = min(tied, key=lambda name: _bic(fits[name]))  # the first of equals: the simplest
    fit = fits[best]
    if fit.degenerate and not quiet:
        log.warning("%s fit: parameters not identified by the data: %s", best, ", ".join(fit.degenerate))
    fit.held_out = scores
    fit.held_out_errors = {name: [float(x) for x in e] for name, e in errors.items()}
    fit.held_out_bic = {name: _bic(f) for name, f in fits.items()}
    return fit


def _predicts_as_well(errors: np.ndarray, reference: np.ndarray) -> bool:
    """Whether held-out ``errors`` (absolute, one per held-out branch) are no worse than the
    ``reference`` law's on the same branches by more than :data:`SELECT_MARGIN` of its mean
    or one standard error of the mean paired difference, whichever is larger (the
    one-standard-error rule of cross-validation, Breiman et al. 1984): two to four held-out
    branches cannot rank laws closer than that."""
    diff = errors - reference
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(np.mean(diff)) <= max(SELECT_MARGIN * float(np.mean(reference)), se)


def _bic(fit: FitResult) -> float:
    """Bayesian information criterion of a fit, up to a constant shared by every fit of
    the same curves: ``n*ln(SSres) + k*ln(n)``, ``SSres`` proportional to ``1 - R^2``."""
    n = max(fit.n_points, 2)
    return n * math.log(max(1.0 - fit.r2, 1e-12)) + len(fit.params) * math.log(n)


def select_law(candidates: Sequence[type[_Law] | str], curves: Sequence[Curve], *,
               sign: Mapping[str, int] | None = None, lam: float = LAMBDA, anchors: Sequence[str] = ("main",),
               delta: float | None = None) -> tuple[type[_Law], dict[str, float]]:
    """The candidate law :func:`select_fit` chooses, and every candidate's held-out score
    (empty when there was nothing to compare)."""
    fit = select_fit(candidates, curves, sign=sign, lam=lam, anchors=anchors, delta=delta, quiet=True)
    return law_class(fit.law), fit.held_out


def in_processes(fn, items: Sequence[tuple], points: int, progress=None) -> list:
    """``[fn(*item) for item in items]``: in up to a worker process per core when the fits hold
    ``points`` observed points in all, at least :data:`PARALLEL_POINTS` (a fit's optimiser is
    Python and numpy on small arrays: threads would share one core); else here. ``fn`` is a
    module-level function. Each finished item counts 1 in ``progress`` (a
    :class:`raypath.console.Progress`); the workers' log records are logged here. The results are
    what the same calls return here, bit for bit (the same arithmetic).

    The workers are plain ``python`` processes fed pickles over a pipe, not ``multiprocessing``'s,
    which import the caller's main module again: a script calling a fit without an ``if __name__
    == "__main__"`` guard would run again in each of them. They stay for the next fit of this
    process (a guided sweep refits after every trial; starting one costs ~0.7 s of imports) while
    used within :data:`WORKER_REUSE_S`, and exit on their own after twice that idle."""
    import os

    workers = min(len(items), os.cpu_count() or 1)
    if workers < 2 or points < PARALLEL_POINTS:
        out = []
        for item in items:
            out.append(fn(*item))
            if progress is not None:
                progress.add(1)
        return out
    out, todo, failed = [None] * len(items), list(enumerate(items))[::-1], []
    lock = threading.Lock()

    def drive() -> None:
        worker = _Worker.take()
        try:
            while not failed:
                with lock:
                    if not todo:
                        return
                    i, item = todo.pop()
                ok, value, records = worker.call(fn, item)
                for name, level, message in records:
                    logging.getLogger(name).log(level, "%s", message)
                if not ok:
                    failed.append(value)
                    return
                out[i] = value
                if progress is not None:
                    progress.add(1)
        finally:
            worker.give_back()

    threads = [threading.Thread(target=drive, name=f"raypath-fit-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return out


#: A worker idle for less than this is reused by the next fit; it exits by itself after twice
#: this idle, so that a worker taken from the pool is never one about to exit.
WORKER_REUSE_S = 60.0


class _Worker:
    """A ``python`` process that runs the calls :func:`in_processes` sends it, one at a time:
    length-prefixed pickles over its stdin and stdout (the worker's own output goes to stderr).
    Idle ones wait in a pool of this process (:meth:`take`, :meth:`give_back`)."""

    _idle: ClassVar[list["_Worker"]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        import os
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # fn's module, importable
        code = f"from raypath.law import _serve; _serve({2 * WORKER_REUSE_S!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.idle_since: float | None = None

    @classmethod
    def take(cls) -> "_Worker":
        """An idle worker used within :data:`WORKER_REUSE_S`, else a new one."""
        with cls._lock:
            while cls._idle:
                worker = cls._idle.pop()
                if worker.proc.poll() is None and time.monotonic() - worker.idle_since < WORKER_REUSE_S:
                    return worker
                worker.close()
        return cls()

    def give_back(self) -> None:
        if self.proc.poll() is not None:
            return
        self.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(self)

    @classmethod
    def close_idle(cls) -> None:
        """End the idle workers (at exit; a test that counts processes)."""
        with cls._lock:
            idle, cls._idle[:] = list(cls._idle), []
        for worker in idle:
            worker.close()

    def call(self, fn, item: tuple) -> tuple:
        """(True, result, log records) or (False, the exception, log records)."""
        import pickle

        _send(self.proc.stdin, pickle.dumps((fn, item)))
        reply = _receive(self.proc.stdout)
        if reply is None:
            return False, RuntimeError(f"a law-fit worker process died (exit code {self.proc.wait()})"), []
        return pickle.loads(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # BrokenPipe: it exited, idle
            self.proc.stdin.close()
        self.proc.wait()


atexit.register(_Worker.close_idle)


def _send(f, data: bytes) -> None:
    f.write(len(data).to_bytes(8, "little") + data)
    f.flush()


def _receive(f) -> bytes | None:
    head = f.read(8)
    return f.read(int.from_bytes(head, "little")) if len(head) == 8 else None


def _serve(idle_s: float) -> None:
    """A worker process's loop (:class:`_Worker`): run each call it is sent, until its input closes
    or none comes for ``idle_s``."""
    import os
    import pickle
    import select
    import sys

    calls, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the fits print goes to stderr, not into the replies
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.name, record.levelno, record.getMessage()))

    logger = logging.getLogger("raypath")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # The parent sends one call and waits for its reply: nothing is ever buffered unread, so
    # select on the pipe sees every call.
    while select.select([calls], [], [], idle_s)[0] and (call := _receive(calls)) is not None:
        records.clear()
        try:
            fn, item = pickle.loads(call)
            reply = (True, fn(*item), list(records))
        except Exception as e:  # noqa: BLE001 - the caller raises it
            reply = (False, e, list(records))
        _send(replies, pickle.dumps(reply))


def select_lambda(problems: Sequence[tuple[type[_Law] | str, Sequence[Curve], Mapping[str, int] | None]], *,
                  grid: Sequence[float] = LAMBDA_GRID, anchors: Sequence[str] = ("main",),
                  delta: float | None = None) -> tuple[float, dict[float, float]]:
    """The momentum decay that best predicts curves the fits have not seen.

    ``problems`` are ``(law, curves, sign)`` fits (one per validation split) that share one
    lambda: it describes how fast training turns an LR drop into lower loss, which does not
    depend on the data a loss is measured on. For every ``lam`` of ``grid``, each curve not
    named in ``anchors`` is held out in turn (per problem at most :data:`LAMBDA_FOLDS` of
    them, spread evenly over their order; a problem needs two), its problem is fitted on the
    other curves and the held-out curve's last observed loss is predicted. The score is the
    mean squared log error over all held-out curves (ranking branches needs final losses).
    Returns the best ``lam`` (ties: the larger, closer to the paper's) and every score;
    with nothing to hold out it returns :data:`LAMBDA` and no scores. ``delta``: the Huber
    threshold of every fit (None: each problem's :func:`huber_delta`).
    """
    folds = []
    for law_cls, curves, sign in problems:
        held = _held_out_curves(curves, anchors)
        if len(held) >= 2:
            folds.append((law_cls, curves, sign, held, huber_delta(curves) if delta is None else float(delta)))
    if not folds:
        return LAMBDA, {}
    points = len(grid) * sum(len(c.steps) for _, curves, *_ in folds for c in curves)
    errors = in_processes(_held_out_errors, [(law_cls, curves, sign, lam, held, None, d)
                                             for lam in grid for law_cls, curves, sign, held, d in folds], points)
    scores = {}
    for k, lam in enumerate(grid):
        scores[float(lam)] = float(np.mean([e**2 for errs in errors[k * len(folds):(k + 1) * len(folds)]
                                            for e in errs]))
    best = min(scores, key=lambda lam: (scores[lam], -lam))
    return best, scores


def _degenerate(law, prob: _Problem, theta: np.ndarray, quiet: bool) -> list[str]:
    """Parameters at a bound, then parameters of optional terms lost in the noise."""
    at_bound = prob.at_bound(theta)
    if at_bound and not quiet:
        log.warning("%s fit: parameters at a bound (not identified by the data): %s",
                    law.__name__, ", ".join(at_bound))
    pred = np.maximum(law.value_and_jac(theta, prob.feats)[0], 1e-12)
    noise = max(float(np.sqrt(np.mean(np.log(prob.losses / pred) ** 2))), 1e-4)
    unresolved = []
    for names, term in law.optional_terms(theta, prob.feats).items():
        size = float(np.max(np.abs(term) / pred, initial=0.0))
        if size < RESOLVE_FACTOR * noise:
            if not quiet:
                log.warning("%s fit: term of %s is %.2g of the loss, below %.1f x residual RMS %.2g:"
                            " not resolved by the data", law.__name__, "/".join(names), size,
                            RESOLVE_FACTOR, noise)
            unresolved += [k for k in names if k not in at_bound]
    return at_bound + unresolved


def _summarise(law, prob: _Problem, curves, theta: np.ndarray, n_starts: int, lam: float,
               quiet: bool) -> FitResult:
    params = dict(zip(law.param_names, map(float, law.to_raw(theta, prob.s1ref, prob.s2ref))))
    # law.predict of every curve, on the features the fit already holds (the law is elementwise)
    pred = law.value_and_jac(np.array([params[k] for k in law.param_names]), prob.raw_feats)[0]
    obs = prob.losses
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    r2 = 1.0 - float(np.sum((obs - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    degenerate = _degenerate(law, prob, theta, quiet)
    outliers, share = _outliers(curves, obs, pred)
    return FitResult(
        law=law.__name__, params=params, r2=r2,
        mape=float(np.mean(np.abs(pred - obs) / obs) * 100.0),
        huber=float(huber(np.log(obs) - np.log(np.maximum(pred, 1e-12)), prob.delta)[0].sum()),
        n_points=len(obs), n_starts=n_starts, degenerate=degenerate, lam=lam, delta=prob.delta,
        outliers=outliers, outlier_share=share, r2_ceiling=r2_ceiling(curves),
    )


def _outliers(curves: Sequence[Curve], obs: np.ndarray, pred: np.ndarray) -> tuple[list[dict], float]:
    """:attr:`FitResult.outliers` and their share of the squared error (``obs``/``pred``
    concatenated in ``curves`` order)."""
    log_res = np.log(obs) - np.log(np.maximum(pred, 1e-12))
    sigma = noise_scale(curves)
    if sigma <= 0:
        return [], 0.0
    names = np.concatenate([np.full(len(c.steps), c.name, dtype=object) for c in curves])
    steps = np.concatenate([c.steps for c in curves])
    idx = np.flatnonzero(np.abs(log_res) > OUTLIER_K * sigma)
    idx = idx[np.argsort(-np.abs(log_res[idx]))]
    sq = (obs - pred) ** 2
    share = float(sq[idx].sum() / sq.sum()) if sq.sum() > 0 else 0.0
    return [{"curve": str(names[i]), "step": int(steps[i]) + 1, "residual": float(obs[i] / pred[i] - 1.0)}
            for i in idx], share
