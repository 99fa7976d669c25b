"""Learning-rate schedules as pure functions of the global step.

Every schedule here is a frozen dataclass that is callable: ``lr = schedule(step)``.
Steps are *global* optimizer steps counted from the very first step of the lineage,
so a branch forked at step 900 asks for ``schedule(900)``, ``schedule(901)``, ...
That keeps the scaling law (which integrates the whole LR history) and the
training loop on one definition of the LR.

Path switching uses two of them:

* :class:`MainPath` -- linear warmup once, then the constant maximal LR forever.
* :class:`Branch` -- the main path up to ``fork_step``, then a decay of ``steps``
  steps from the main-path LR at the fork down to ``min_lr_ratio * max_lr`` (or, forked
  inside the warmup below that floor, held at the fork's LR: a branch never rises).

The baselines of the paradigm comparison:

* :class:`Window` -- (re-)warmup + decay over a window, cosine by default (the
  paper's baselines) or any branch shape (the shape-matched comparison). PTFS is one
  window from step 0 over all data; CPT is one window per version, starting where
  the previous version ended.
* :class:`Piecewise` -- concatenation of windows (a CPT lineage history).

Every decay trains its first step at the LR it decays from and its *last* step at
the floor: an n-step decay runs at progress ``0/(n-1) ... (n-1)/(n-1)``, and a
1-step decay trains its one step at the floor. A released model has therefore
seen the full anneal, whatever the shape and length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

#: Decay shapes a branch can use. ``polynomial`` and ``exponential`` read ``power``.
SHAPES = ("cosine", "linear", "1-sqrt", "exponential", "polynomial")
#: Shapes whose ``power`` matters (a sweep searches it only for these; the others ignore it).
POWER_SHAPES = ("exponential", "polynomial")


class Schedule(Protocol):
    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class Decay:
    """How a branch anneals.

    shape: one of :data:`SHAPES`.
    min_lr_ratio: final LR as a fraction of the peak (max) LR, in [0, 1).
    power: curvature knob of the one-parameter shapes. ``polynomial``:
        ``(1 - progress) ** power``. ``exponential``: number of e-foldings over
        the branch, renormalised so the decay still ends exactly at the min LR
        (MiniCPM-style fast early drop for large ``power``).
    """

    shape: str = "1-sqrt"
    min_lr_ratio: float = 0.0
    power: float = 2.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"decay shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")


def decay_from(config: Mapping) -> Decay:
    """The decay a mapping describes: a sweep trial's config, a branch's recorded ``decay`` or
    the ``branch`` section of a recorded config. ``shape`` is required; ``min_lr_ratio``
    defaults to 0 and ``power`` to 2 (the config of a trial whose shape is not in
    :data:`POWER_SHAPES` has no power, or None)."""
    power = config.get("power")
    return Decay(config["shape"], float(config.get("min_lr_ratio", 0.0)), float(power) if power else 2.0)


def decay_fraction(progress, shape: str, power: float = 2.0):
    """Fraction of the decay still left at ``progress`` in [0, 1]: 1 at the start, 0 at the end.

    Elementwise on numpy arrays too: the scaling law evaluates whole LR histories.
    """
    p = np.clip(progress, 0.0, 1.0)
    if shape == "cosine":
        return 0.5 * (1.0 + np.cos(np.pi * p))
    if shape == "linear":
        return 1.0 - p
    if shape == "1-sqrt":
        return 1.0 - np.sqrt(p)
    if shape == "polynomial":
        return (1.0 - p) ** power
    if shape == "exponential":
        # exp(-k p) rescaled to hit exactly 0 at p = 1, so every shape ends at min LR. In expm1:
        # 1 - exp(-k) is 0 in floating point for k below ~1e-16 (NaN LRs), and coarse up to ~1e-8;
        # np on both sides: math's may differ by an ulp, and the floor turn negative.
        floor = np.expm1(-power)
        return (np.expm1(-power * p) - floor) / -floor
    raise ValueError(f"decay shape {shape!r} is not one of {', '.join(SHAPES)}")


def decay_progress(offset, steps: int):
    """Progress through an n-step decay at step ``offset`` (0-based, elementwise): 0 at the
    first step, 1 at the last, so the last trained step is at the floor. A 1-step decay is
    all floor: the model it releases is annealed too."""
    if steps <= 1:
        return np.ones_like(offset, dtype=np.float64) if isinstance(offset, np.ndarray) else 1.0
    return offset / (steps - 1)


def _decay(step: int, start: int, steps: int, lr_from: float, lr_to: float, decay: Decay) -> float:
    # float(): a numpy scalar would land in the optimizer's param_groups and make the
    # checkpoint unloadable with torch.load(weights_only=True).
    progress = decay_progress(step - start, steps)
    return float(lr_to + (lr_from - lr_to) * decay_fraction(progress, decay.shape, decay.power))


@dataclass(frozen=True)
class MainPath:
    """Warmup once, then constant: the never-annealed main path.

    max_lr: the constant LR after warmup.
    warmup_steps: linear warmup length; step ``s < warmup_steps`` trains at
        ``max_lr * (s + 1) / warmup_steps`` so the first step is not wasted at LR 0.
    """

    max_lr: float
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        return self.max_lr


def main_schedule(train) -> MainPath:
    """The main path a train config describes: a :class:`~raypath.config.TrainConfig`, or a
    mapping with its ``max_lr`` and ``warmup_steps`` (a lineage's recorded ``config.train``
    or main-path entry)."""
    if isinstance(train, Mapping):
        return MainPath(float(train["max_lr"]), int(train.get("warmup_steps", 0)))
    return MainPath(float(train.max_lr), int(train.warmup_steps))


@dataclass(frozen=True)
class Branch:
    """A release branch: the main path until ``fork_step``, then a full decay.

    main: the main path this branch forks from.
    fork_step: global step of the main-path checkpoint the branch starts from.
    steps: branch length in optimizer steps.
    decay: shape and floor of the decay.
    """

    main: MainPath
    fork_step: int
    steps: int
    decay: Decay = Decay()

    @property
    def start_lr(self) -> float:
        return self.main(self.fork_step)

    @property
    def end_lr(self) -> float:
        """The floor, ``min_lr_ratio * max_lr``; a fork inside the warmup whose LR is still
        below it holds that LR instead of climbing to a floor above where it started."""
        return min(self.decay.min_lr_ratio * self.main.max_lr, self.start_lr)

    def __call__(self, step: int) -> float:
        if step < self.fork_step:
            return self.main(step)
        if step >= self.fork_step + self.steps:
            return self.end_lr
        return _decay(step, self.fork_step, self.steps, self.start_lr, self.end_lr, self.decay)


@dataclass(frozen=True)
class Window:
    """(Re-)warmup then a decay over the window [start_step, start_step + steps).

    PTFS of version k is ``Window(max_lr, warmup, steps=all data so far)``; CPT of
    version k is ``Window(max_lr, rewarm, start_step=end of k-1, steps=new data,
    warmup_from=min LR of k-1)``.

    max_lr: peak LR.
    warmup_steps: (re-)warmup length inside the window; a window of no more steps than
        that warms up over all but its last step, which still trains at the floor.
    steps: window length, warmup included; its last step trains at the floor.
    start_step: global step where the window begins.
    min_lr_ratio: LR at the end of the window as a fraction of ``max_lr``.
    warmup_from: LR at the first warmup step's origin (0 from scratch; the
        previous floor for a CPT re-warm).
    shape, power: the decay after warmup (see :class:`Decay`); cosine is the
        paper's baseline, a branch's shape makes a shape-matched baseline.
    """

    max_lr: float
    warmup_steps: int
    steps: int
    start_step: int = 0
    min_lr_ratio: float = 0.0
    warmup_from: float = 0.0
    shape: str = "cosine"
    power: float = 2.0

    def __post_init__(self) -> None:
        Decay(self.shape, self.min_lr_ratio, self.power)  # same checks, same messages

    def __call__(self, step: int) -> float:
        s = step - self.start_step
        end_lr = self.min_lr_ratio * self.max_lr
        if s >= self.steps:
            return end_lr
        # A short version (a CPT window of few new steps) must still release an annealed model.
        warmup = min(self.warmup_steps, self.steps - 1)
        if s < warmup:
            return self.warmup_from + (self.max_lr - self.warmup_from) * (s + 1) / warmup
        return _decay(s, warmup, self.steps - warmup, self.max_lr, end_lr,
                      Decay(self.shape, self.min_lr_ratio, self.power))


#: A cosine window: :class:`Window`'s default shape.
Cosine = Window


@dataclass(frozen=True)
class Piecewise:
    """Concatenation of schedules: ``parts[i]`` owns steps [bounds[i], bounds[i+1])."""

    parts: tuple[Schedule, ...]
    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.parts) or list(self.bounds) != sorted(self.bounds):
            raise ValueError("Piecewise needs one ascending start bound per part")

    def __call__(self, step: int) -> float:
        i = max(int(np.searchsorted(self.bounds, step, side="right")) - 1, 0)
        return self.parts[i](step)


def lr_curve(schedule: Schedule, steps: int | Sequence[int]) -> np.ndarray:
    """The LR at each step: ``range(steps)`` if an int, else the given steps."""
    idx = range(steps) if isinstance(steps, int) else steps
    return np.array([schedule(int(s)) for s in idx], dtype=np.float64)
