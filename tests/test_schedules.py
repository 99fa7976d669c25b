"""Numeric unit tests of raypath.schedules.

Expected values are literals computed by hand from the formulas in the module
docstrings (with the formula next to each literal), not by calling the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from raypath.schedules import (
    SHAPES,
    Branch,
    Cosine,
    Decay,
    MainPath,
    Piecewise,
    Window,
    decay_fraction,
    lr_curve,
)

MAX = 1e-3
WARMUP = 100
MAIN = MainPath(MAX, WARMUP)
FORK = 1000  # well after warmup: the main-path LR at the fork is MAX
STEPS = 201  # progress (s - FORK) / (STEPS - 1): 0.5 is step FORK + 100
REL = 1e-12

# (shape, power, min_lr_ratio, fraction of the decay left at progress 0.5)
HALF = [
    ("cosine", 2.0, 0.1, 0.5),  # 0.5 * (1 + cos(pi/2))
    ("linear", 2.0, 0.1, 0.5),  # 1 - 0.5: the midpoint
    ("1-sqrt", 2.0, 0.0, 0.2928932188134524),  # 1 - sqrt(0.5)
    ("exponential", 2.0, 0.0, 0.2689414213699951),  # (e^-1 - e^-2) / (1 - e^-2) = 1 / (1 + e)
    ("exponential", 5.0, 0.05, 0.07585818002124355),  # (e^-2.5 - e^-5) / (1 - e^-5) = 1 / (1 + e^2.5)
    ("polynomial", 2.0, 0.0, 0.25),  # 0.5 ** 2
    ("polynomial", 0.5, 0.0, 0.7071067811865476),  # 0.5 ** 0.5
    ("polynomial", 3.0, 0.1, 0.125),  # 0.5 ** 3
]
HALF_IDS = [f"{s}-p{p}-min{m}" for s, p, m, _ in HALF]


def _branch(shape: str, power: float, min_ratio: float, main: MainPath = MAIN,
            fork: int = FORK, steps: int = STEPS) -> Branch:
    return Branch(main, fork, steps, Decay(shape, min_ratio, power))


def test_half_literals_match_the_docstring_formulas():
    # Guard on the literals themselves, so a typo in HALF cannot mask a module bug.
    k2, k5 = 2.0, 5.0
    assert HALF[2][3] == pytest.approx(1 - math.sqrt(0.5), rel=REL)
    assert HALF[3][3] == pytest.approx((math.exp(-k2 / 2) - math.exp(-k2)) / (1 - math.exp(-k2)), rel=REL)
    assert HALF[4][3] == pytest.approx((math.exp(-k5 / 2) - math.exp(-k5)) / (1 - math.exp(-k5)), rel=REL)
    assert HALF[6][3] == pytest.approx(math.sqrt(0.5), rel=REL)


def test_every_shape_is_covered():
    assert {s for s, *_ in HALF} == set(SHAPES)
    assert len(SHAPES) == 5


# ---------------------------------------------------------------- Branch


@pytest.mark.parametrize("shape,power,min_ratio,half", HALF, ids=HALF_IDS)
def test_branch_starts_at_the_main_path_lr(shape, power, min_ratio, half):
    b = _branch(shape, power, min_ratio)
    assert b(FORK) == MAIN(FORK) == MAX
    # before the fork the branch *is* the main path
    for s in (0, 1, WARMUP - 1, WARMUP, FORK - 1):
        assert b(s) == MAIN(s)


@pytest.mark.parametrize("shape,power,min_ratio,half", HALF, ids=HALF_IDS)
def test_branch_is_non_increasing(shape, power, min_ratio, half):
    b = _branch(shape, power, min_ratio)
    lrs = lr_curve(b, range(FORK, FORK + STEPS + 50))
    assert np.all(np.diff(lrs) <= 0.0), np.diff(lrs).max()
    # and it really decays: strictly below the start from the second step on,
    # above the floor one step before the end, at the floor on the last branch step
    floor = min_ratio * MAX
    assert lrs[1] < lrs[0]
    assert lrs[STEPS - 2] > floor
    assert lrs[STEPS - 1] == floor
    assert lrs.min() == floor


@pytest.mark.parametrize("shape,power,min_ratio,half", HALF, ids=HALF_IDS)
def test_branch_at_half_progress(shape, power, min_ratio, half):
    b = _branch(shape, power, min_ratio)
    floor = min_ratio * MAX
    expected = floor + (MAX - floor) * half
    assert b(FORK + STEPS // 2) == pytest.approx(expected, rel=REL)


def test_branch_half_progress_literal_values():
    # The same points as absolute LRs, fully written out.
    assert _branch("cosine", 2.0, 0.1)(FORK + 100) == pytest.approx(5.5e-4, rel=REL)  # 1e-4 + 9e-4 * 0.5
    assert _branch("linear", 2.0, 0.1)(FORK + 100) == pytest.approx(5.5e-4, rel=REL)  # midpoint of 1e-3, 1e-4
    assert _branch("1-sqrt", 2.0, 0.0)(FORK + 100) == pytest.approx(2.928932188134524e-4, rel=REL)
    assert _branch("polynomial", 2.0, 0.0)(FORK + 100) == pytest.approx(2.5e-4, rel=REL)
    assert _branch("exponential", 2.0, 0.0)(FORK + 100) == pytest.approx(2.689414213699951e-4, rel=REL)


@pytest.mark.parametrize("shape,power,min_ratio,half", HALF, ids=HALF_IDS)
def test_branch_ends_exactly_at_the_floor(shape, power, min_ratio, half):
    b = _branch(shape, power, min_ratio)
    floor = min_ratio * MAX
    assert b(FORK + STEPS - 1) == floor  # the last trained step
    assert b(FORK + STEPS) == floor
    assert b(FORK + STEPS + 1) == floor
    assert b(FORK + 10 * STEPS) == floor


@pytest.mark.parametrize("shape", SHAPES)
def test_a_branch_forked_in_warmup_below_its_floor_holds_the_fork_lr_instead_of_rising(shape):
    b = Branch(MAIN, 4, 30, Decay(shape, 0.1, 2.0))  # MAIN(4) = 5e-5, below the floor 1e-4
    lrs = lr_curve(b, range(4, 4 + 40))
    assert np.all(lrs == MAIN(4))
    assert b.end_lr == MAIN(4) < 0.1 * MAX


def test_branch_floor_is_relative_to_max_lr_not_fork_lr():
    # Forked inside warmup: start LR < max, but the floor is still min_ratio * max_lr.
    b = Branch(MAIN, 9, 40, Decay("linear", 0.1))
    assert b(9) == pytest.approx(1e-4, rel=REL)  # 1e-3 * 10 / 100
    assert b(9 + 39) == pytest.approx(1e-4, rel=REL)  # 0.1 * 1e-3, on the last branch step


def test_the_five_shapes_differ_at_quarter_progress():
    # Fraction left at progress 0.25, by hand:
    expected = {
        "cosine": 0.8535533905932737,  # 0.5 * (1 + cos(pi/4))
        "linear": 0.75,  # 1 - 0.25
        "1-sqrt": 0.5,  # 1 - sqrt(0.25)
        "exponential": 0.5449457660765887,  # (e^-0.5 - e^-2) / (1 - e^-2), k = 2
        "polynomial": 0.5625,  # 0.75 ** 2
    }
    steps = 401  # progress 0.25 at step 100 of 0..400
    got = {}
    for shape in SHAPES:
        b = Branch(MAIN, FORK, steps, Decay(shape, 0.0, 2.0))
        got[shape] = b(FORK + steps // 4) / MAX
        assert got[shape] == pytest.approx(expected[shape], rel=REL), shape
        assert decay_fraction(0.25, shape, 2.0) == pytest.approx(expected[shape], rel=REL), shape
    values = sorted(got.values())
    assert min(np.diff(values)) > 0.01, got  # pairwise distinct: a swapped mapping would be caught


def test_polynomial_and_exponential_read_power():
    # progress 0.5: polynomial 0.5**p, exponential 1 / (1 + e^(k/2))
    assert _branch("polynomial", 1.0, 0.0)(FORK + 100) == pytest.approx(5e-4, rel=REL)
    assert _branch("polynomial", 4.0, 0.0)(FORK + 100) == pytest.approx(6.25e-5, rel=REL)
    assert _branch("exponential", 4.0, 0.0)(FORK + 100) == pytest.approx(1e-3 / (1 + math.exp(2.0)), rel=REL)
    # shapes without a power ignore it
    assert _branch("linear", 7.0, 0.0)(FORK + 100) == pytest.approx(5e-4, rel=REL)
    assert _branch("cosine", 7.0, 0.0)(FORK + 100) == pytest.approx(5e-4, rel=REL)


def test_exponential_decay_of_a_tiny_power_is_the_linear_limit_not_nan():
    # 1 - exp(-k) is 0 in floating point for k ~ 1e-17: the rescaling divided by it (NaN LRs),
    # and below ~1e-8 it quantised the decay into steps
    p = np.linspace(0.0, 1.0, 5)
    for power in (1e-17, 1e-15, 1e-9):
        np.testing.assert_allclose(decay_fraction(p, "exponential", power), 1.0 - p, rtol=1e-6, atol=1e-12)
    lrs = [_branch("exponential", 1e-17, 0.0)(FORK + i) for i in (0, 50, 100, 150, 200)]
    assert all(np.isfinite(lrs)) and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- MainPath


def test_main_path_warmup_is_linear_then_constant():
    m = MainPath(1e-3, 4)
    assert [m(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=REL)  # (s+1)/4 * max
    assert m(3) == 1e-3
    for s in (4, 5, 100, 10**6, 10**9):
        assert m(s) == 1e-3


def test_main_path_warmup_values_long():
    # (s + 1) / 100 * 1e-3
    assert MAIN(0) == pytest.approx(1e-5, rel=REL)
    assert MAIN(49) == pytest.approx(5e-4, rel=REL)
    assert MAIN(98) == pytest.approx(9.9e-4, rel=REL)
    assert MAIN(99) == MAX
    lrs = lr_curve(MAIN, WARMUP)
    assert np.all(np.diff(lrs) > 0)
    assert np.diff(lrs) == pytest.approx(np.full(WARMUP - 1, 1e-5), rel=1e-9)


def test_main_path_without_warmup():
    m = MainPath(2e-3, 0)
    assert m(0) == 2e-3
    assert m(1) == 2e-3
    assert m(12345) == 2e-3
    b = Branch(m, 0, 11, Decay("linear", 0.0))
    assert b(0) == 2e-3
    assert b(5) == pytest.approx(1e-3, rel=REL)
    assert b(10) == 0.0


# ---------------------------------------------------------------- Branch forked in warmup


@pytest.mark.parametrize("shape", SHAPES)
def test_branch_forked_inside_warmup_starts_from_the_warmup_lr(shape):
    fork, steps = 49, 100
    b = Branch(MAIN, fork, steps, Decay(shape, 0.0, 2.0))
    start = 5e-4  # MAIN(49) = 1e-3 * 50 / 100
    assert b(fork) == pytest.approx(start, rel=REL)
    assert b(fork) == MAIN(fork)
    lrs = lr_curve(b, range(fork, fork + steps + 5))
    assert lrs.max() == b(fork)  # never climbs back towards max_lr
    assert np.all(np.diff(lrs) <= 0.0)
    assert b(fork + steps) == 0.0
    assert b(fork + 1) < MAIN(fork + 1)


def test_branch_forked_inside_warmup_half_progress_linear():
    b = Branch(MAIN, 49, 101, Decay("linear", 0.0))
    assert b(99) == pytest.approx(2.5e-4, rel=REL)  # midpoint of 5e-4 and 0
    assert MAIN(99) == MAX


# ---------------------------------------------------------------- Cosine windows

# 101 decay steps each: progress (s - warmup) / 100 after warmup, the last step at the floor
PTFS = Cosine(max_lr=1e-3, warmup_steps=10, steps=111, min_lr_ratio=0.1)
CPT2 = Cosine(max_lr=1e-3, warmup_steps=20, steps=121, start_step=111, min_lr_ratio=0.1, warmup_from=1e-4)


def test_cosine_ptfs_window():
    assert PTFS(0) == pytest.approx(1e-4, rel=REL)  # 1e-3 * 1 / 10
    assert PTFS(4) == pytest.approx(5e-4, rel=REL)  # 1e-3 * 5 / 10
    assert PTFS(9) == pytest.approx(1e-3, rel=REL)  # end of warmup == max
    assert PTFS(10) == pytest.approx(1e-3, rel=REL)  # first decay step, progress 0
    assert PTFS(60) == pytest.approx(5.5e-4, rel=REL)  # progress 50/100: 1e-4 + 9e-4 * 0.5
    assert PTFS(35) == pytest.approx(1e-4 + 9e-4 * 0.8535533905932737, rel=REL)  # progress 0.25
    assert PTFS(110) == 1e-4  # last step of the window == min, exactly
    assert PTFS(111) == 1e-4
    assert PTFS(500) == 1e-4
    assert 1e-4 < PTFS(109) < 1.01e-4  # one decay step above the floor


def test_cosine_ptfs_monotone():
    warm = lr_curve(PTFS, range(0, 10))
    assert np.all(np.diff(warm) > 0)
    decay = lr_curve(PTFS, range(9, 111))
    assert decay[-1] == 1e-4
    assert np.all(np.diff(decay[1:]) < 0)  # strictly decreasing once decay starts
    assert np.all(np.diff(decay) <= 0)


def test_cosine_without_warmup_starts_at_max():
    c = Cosine(max_lr=2e-3, warmup_steps=0, steps=101, min_lr_ratio=0.0)
    assert c(0) == 2e-3
    assert c(50) == pytest.approx(1e-3, rel=REL)
    assert c(100) == 0.0


def test_cosine_cpt_rewarm_window():
    # first step: warmup_from + (max - warmup_from) * 1 / 20 = 1e-4 + 9e-4 / 20
    assert CPT2(111) == pytest.approx(1.45e-4, rel=REL)
    assert CPT2(120) == pytest.approx(1e-4 + 9e-4 * 10 / 20, rel=REL)
    assert CPT2(130) == pytest.approx(1e-3, rel=REL)  # end of re-warm == max
    assert CPT2(131) == pytest.approx(1e-3, rel=REL)
    assert CPT2(181) == pytest.approx(5.5e-4, rel=REL)  # progress 50/100
    assert CPT2(231) == 1e-4  # last step of the window == min
    assert CPT2(232) == 1e-4
    warm = lr_curve(CPT2, range(111, 131))
    assert np.all(np.diff(warm) > 0)
    assert warm.min() > 1e-4  # re-warm starts from the previous floor, not from 0
    decay = lr_curve(CPT2, range(131, 232))
    assert np.all(np.diff(decay) < 0)


def test_piecewise_cpt_lineage_switches_at_the_bound():
    cpt = Piecewise((PTFS, CPT2), (0, 111))
    for s in (0, 5, 9, 10, 60, 110):
        assert cpt(s) == PTFS(s)
    for s in (111, 116, 130, 181, 231, 400):
        assert cpt(s) == CPT2(s)
    assert cpt(110) == pytest.approx(1e-4, rel=REL)  # PTFS's last step, at its floor
    assert cpt(111) == pytest.approx(1.45e-4, rel=REL)  # CPT2's re-warm, not PTFS's floor
    assert PTFS(111) == pytest.approx(1e-4, rel=REL)
    assert cpt(111) > cpt(110)  # the re-warm jumps up at the bound


def test_piecewise_rejects_bad_bounds():
    with pytest.raises(ValueError, match="ascending"):
        Piecewise((PTFS, CPT2), (110, 0))
    with pytest.raises(ValueError, match="bound"):
        Piecewise((PTFS, CPT2), (0,))


# ---------------------------------------------------------------- Decay validation


@pytest.mark.parametrize("shape", ["cosin", "sqrt", "", "Cosine", "constant"])
def test_decay_rejects_unknown_shape(shape):
    with pytest.raises(ValueError, match="shape") as exc:
        Decay(shape)
    assert repr(shape) in str(exc.value)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_decay_rejects_bad_min_lr_ratio(ratio):
    with pytest.raises(ValueError, match="min_lr_ratio"):
        Decay("cosine", ratio)


@pytest.mark.parametrize("power", [0.0, -1.0, -0.5])
def test_decay_rejects_non_positive_power(power):
    with pytest.raises(ValueError, match="power"):
        Decay("polynomial", 0.0, power)


def test_decay_accepts_valid_values():
    d = Decay("exponential", 0.0, 0.01)
    assert (d.shape, d.min_lr_ratio, d.power) == ("exponential", 0.0, 0.01)
    assert Decay("cosine", 0.999).min_lr_ratio == 0.999
    assert Decay() == Decay("1-sqrt", 0.0, 2.0)


# ---------------------------------------------------------------- lr_curve


@pytest.mark.parametrize("schedule", [
    MAIN,
    MainPath(3e-4, 0),
    _branch("cosine", 2.0, 0.1),
    _branch("exponential", 5.0, 0.05),
    Branch(MAIN, 49, 100, Decay("1-sqrt")),
    PTFS,
    CPT2,
    Piecewise((PTFS, CPT2), (0, 110)),
], ids=["main", "main-nowarm", "branch-cos", "branch-exp", "branch-warm", "ptfs", "cpt", "piecewise"])
def test_lr_curve_equals_calling_the_schedule(schedule):
    n = 1300
    curve = lr_curve(schedule, n)
    assert curve.dtype == np.float64
    assert curve.shape == (n,)
    assert curve.tolist() == [schedule(s) for s in range(n)]
    steps = [0, 7, 99, 100, 110, 1000, 1100, 1199, 1200, 5000]
    picked = lr_curve(schedule, steps)
    assert picked.tolist() == [schedule(s) for s in steps]
    assert lr_curve(schedule, np.array(steps)).tolist() == picked.tolist()
    # Plain Python floats: a numpy scalar LR ends up in the optimizer state and
    # breaks torch.load(weights_only=True) on resume.
    assert {type(schedule(s)) for s in steps} == {float}


# ---------------------------------------------------------------- the last step is at the floor


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 37])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_decay_trains_its_last_step_at_the_floor(shape, steps):
    # a 10-step cosine with floor 0.1 used to end one step short, at 0.122 * max
    b = Branch(MAIN, FORK, steps, Decay(shape, 0.1, 3.0))
    assert b(FORK + steps - 1) == pytest.approx(1e-4, rel=REL)  # 0.1 * 1e-3
    if steps > 1:
        assert b(FORK) == MAX  # the first step still trains at the fork's LR
        assert b(FORK + steps - 2) > 1e-4
    w = Window(MAX, 5, 5 + steps, start_step=20, min_lr_ratio=0.1, shape=shape, power=3.0)
    assert w(20 + 5 + steps - 1) == pytest.approx(1e-4, rel=REL)


@pytest.mark.parametrize("steps", [1, 2, 40, 50])
def test_a_window_no_longer_than_its_warmup_still_ends_at_the_floor(steps):
    # a CPT baseline over a version of fewer steps than train.warmup_steps must release annealed
    w = Window(MAX, 50, steps, start_step=100, min_lr_ratio=0.1)
    assert w(100 + steps - 1) == pytest.approx(1e-4, rel=REL)
    assert w(100 + steps) == pytest.approx(1e-4, rel=REL)
    if steps > 2:
        assert 0 < w(100) < w(100 + steps - 2) <= MAX  # warming up until the last step


def test_exponential_decay_never_ends_below_the_floor():
    # math.exp(-k) and np.exp(-k * 1.0) differ by an ulp for some k: the end went to -1.5e-18
    for power in np.linspace(0.01, 20.0, 2000):
        assert Branch(MAIN, FORK, 10, Decay("exponential", 0.0, float(power)))(FORK + 9) == 0.0


def test_one_step_branch_decays():
    b = Branch(MAIN, FORK, 1, Decay("cosine", 0.0))
    assert b(FORK - 1) == MAX
    assert b(FORK) == 0.0  # its one step trains at the floor


def test_window_takes_a_branch_shape():
    # 1-sqrt window, 101 decay steps: progress 0.25 at s = 25 -> 1 - sqrt(0.25) = 0.5 left
    w = Window(max_lr=1e-3, warmup_steps=0, steps=101, min_lr_ratio=0.0, shape="1-sqrt")
    assert w(25) == pytest.approx(5e-4, rel=REL)
    assert Cosine(1e-3, 0, 101)(25) == pytest.approx(1e-3 * 0.8535533905932737, rel=REL)
    with pytest.raises(ValueError, match="shape"):
        Window(1e-3, 0, 10, shape="sqrt")


def test_the_main_paths_fork_lies_inside_its_own_segment():
    from raypath.mainpath import fork_step, main_fork_step

    assert fork_step(10, 13, 0.9) == 10  # a prediction may fork at the start: the previous checkpoint
    assert main_fork_step(10, 13, 0.9) == 11  # the segment checkpoints after its own first step
    assert main_fork_step(10, 12, 0.5) == 11 and main_fork_step(0, 100, 0.2) == 80
