"""The multi-shift CPT law: one distribution-shift term per data switch a split sees.

Everything runs on synthetic lineages (``law_lineage``) whose losses follow a known law:
pure numpy fits, no training. The two-version case is pinned to the single-shift numbers
the law gave before the multi-shift law existed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from law_lineage import GAP_P, LAM, NEW_B, OLD_B, write_lineage

from raypath import law, lawfit
from raypath.law import CPTLaw, Curve, fit_law, law_class, multi_shift_law
from raypath.report import format_fits

#: fit_run(lineage of write_lineage(2), "v2", lam=0.99) before the multi-shift law existed.
TWO_VERSION_PARAMS = {
    "v1": {"L0": 1.9972961094670003, "A": 1.2014291670070063, "alpha": 0.4498811181490523,
           "C1": 3.9990371181370343, "C2": 3.0017396704307706, "B": 0.3434119370789084,
           "E": 7.419732396760612, "beta": 0.8841676217187128},
    "v2": {"L0": 0.0, "A": 3.2154050511135313, "alpha": 0.16835437990757365, "C1": 0.0,
           "C2": 2.986879716920726, "B": -0.3512102328366235, "E": 3.2463438529771333,
           "beta": 2.0691336513839014},
}
#: The Huber objective of the same fits.
TWO_VERSION_HUBER = {"v1": 2.32425323163268e-05, "v2": 1.2930085502910399e-05}


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory):
    """(run_dir, lineage, fits) of a synthetic 3-version lineage fitted for releasing v3."""
    run_dir, lineage = write_lineage(tmp_path_factory.mktemp("shifts"), 3)
    return run_dir, lineage, lawfit.fit_run(run_dir, "v3", lam=LAM)


FORMS = ({}, {"anneal": True}, {"drift": True}, {"anneal": True, "drift": True}, {"gap": True},
         {"drift": True, "gap": True}, {"anneal": True, "drift": True, "gap": True}, {"entry": True},
         {"entry": True, "drift": True, "gap": True}, {"entry": True, "anneal": True, "drift": True, "gap": True})


def test_one_switch_is_the_cpt_law_and_names_round_trip():
    assert multi_shift_law(1) is CPTLaw and multi_shift_law(1, anneal=True) is CPTLaw
    three = multi_shift_law(3)
    assert three.param_names == CPTLaw.param_names + ("B2", "B3")
    assert law_class(three.__name__) is three and law_class("CPTLaw") is CPTLaw
    full = multi_shift_law(3, anneal=True, drift=True)
    assert full.__name__ == "MultiShiftCPTLaw[3,anneal,drift]"
    assert full.param_names == CPTLaw.param_names + ("B2", "B3", "C2_2", "C2_3", "D", "D2", "D3")
    assert multi_shift_law(1, drift=True).param_names == CPTLaw.param_names + ("D",)
    gap = multi_shift_law(2, drift=True, gap=True)
    assert gap.__name__ == "MultiShiftCPTLaw[2,drift,gap]" and law_class(gap.__name__) is gap
    assert gap.param_names == CPTLaw.param_names + ("B2", "D", "D2", "G", "G2", "P")
    assert "P" in gap.default_grid and "P" not in gap.linear
    entry = multi_shift_law(1, entry=True, gap=True)
    assert entry.__name__ == "MultiShiftCPTLaw[1,entry,gap]" and law_class(entry.__name__) is entry
    assert entry.param_names == CPTLaw.param_names + ("G", "B0", "P") and "B0" not in entry.amplitudes
    assert multi_shift_law(1, entry=True).bounds(4.0)[-1] == (-2.0, 0.0)  # B0 <= 0: the data entering lowers the loss
    for n in (1, 2, 3):
        for form in FORMS:
            cls = multi_shift_law(n, **form)
            assert law_class(cls.__name__) is cls
    with pytest.raises(ValueError, match="unknown law"):
        law_class("MultiShiftLaw[2]")
    with pytest.raises(ValueError, match="unknown law"):
        law_class("MultiShiftCPTLaw[2,drift,anneal]")


def test_shift_rows_are_the_forward_area_since_each_switch():
    lrs = np.linspace(1.0, 0.5, 30)
    curve = Curve(lrs, np.arange(30), np.ones(30), cpt_start=10, shifts=(20, 25))
    feats = multi_shift_law(4).features(curve, LAM)  # 3 switches observed, the 4th never reached
    s1 = np.cumsum(lrs)
    np.testing.assert_array_equal(feats[:4], law.split_areas(curve, lam=LAM))
    np.testing.assert_allclose(feats[4], np.where(np.arange(30) >= 20, s1 - s1[19], 0.0))
    np.testing.assert_allclose(feats[5], np.where(np.arange(30) >= 25, s1 - s1[24], 0.0))
    assert not feats[6].any()
    with pytest.raises(ValueError, match="must increase"):
        Curve(lrs, [1], [1.0], cpt_start=10, shifts=(10,))
    # the entry row: the forward area since the curve's own data entered, the last row
    entered = Curve(lrs, np.arange(30), np.ones(30), cpt_start=10, shifts=(20, 25), entry=4)
    feats = multi_shift_law(3, entry=True, drift=True).features(entered, LAM)
    np.testing.assert_allclose(feats[-1], np.where(np.arange(30) >= 4, s1 - s1[3], 0.0))
    assert not multi_shift_law(3, entry=True).features(curve, LAM)[-1].any()  # no entry: a zero row
    with pytest.raises(ValueError, match="entry 10 must lie before cpt_start 10"):
        Curve(lrs, [1], [1.0], cpt_start=10, entry=10)


@pytest.mark.parametrize("form", FORMS)
def test_multi_shift_jacobian_matches_finite_differences(form):
    cls = multi_shift_law(3, **form)
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(len(cls.feature_scale(1.0, 1.0)), 40)))
    theta = rng.uniform(0.1, 1.0, len(cls.param_names))
    value, jac = cls.value_and_jac(theta, feats)
    for i in range(len(theta)):
        step = np.zeros_like(theta)
        step[i] = 1e-6
        num = (cls.value_and_jac(theta + step, feats)[0] - cls.value_and_jac(theta - step, feats)[0]) / 2e-6
        np.testing.assert_allclose(jac[:, i], num, rtol=1e-5, atol=1e-8, err_msg=cls.param_names[i])
    np.testing.assert_allclose(cls.from_raw(cls.to_raw(theta, 3.0, 0.5), 3.0, 0.5), theta)
    # no later switch observed, no drift and no gap: the value is the single-shift law's
    single = CPTLaw.value_and_jac(theta[:8], feats[:4])[0]
    theta[len(CPTLaw.param_names):] = 0.0
    if cls.gap:
        theta[-1] = 0.5  # P: an area, not an amplitude
    np.testing.assert_allclose(cls.value_and_jac(theta, np.vstack([feats[:4], 0 * feats[4:]]))[0], single,
                               rtol=0, atol=1e-15)


def _written_out(cls, theta, feats):
    """The annealing and CPT laws' value and Jacobian, one fresh array per term."""
    s1 = np.maximum(feats[0] + feats[1], 1e-12)
    l0, a, alpha = theta[:3]
    xa = s1**-alpha
    power = [np.ones_like(s1), xa, -a * xa * np.log(s1)]
    if cls is law.AnnealingLaw:
        s2 = feats[2] + feats[3]
        return l0 + a * xa - theta[3] * s2, np.stack([*power, -s2], axis=1)
    c1, c2, b, e, beta = theta[3:]
    base = 1.0 + e * feats[1]
    decay = base**-beta
    shift = 1.0 - decay
    jac = np.stack([*power, -feats[2], -feats[3], shift, b * beta * feats[1] * decay / base,
                    b * decay * np.log(base)], axis=1)
    return l0 + a * xa - c1 * feats[2] - c2 * feats[3] + b * shift, jac


@pytest.mark.parametrize("cls", [law.AnnealingLaw, CPTLaw, *(multi_shift_law(3, **form) for form in FORMS)],
                         ids=lambda cls: cls.__name__)
def test_evaluator_writes_one_jacobian_with_the_same_digits(cls):
    # A fit evaluates its law thousands of times on the same features: the evaluator keeps one
    # Jacobian array and works out the fixed columns once, and a fit must not move by a digit.
    rng = np.random.default_rng(1)
    feats = np.abs(rng.normal(size=(len(cls.feature_scale(1.0, 1.0)), 57)))
    evaluate = cls.evaluator(feats)
    jacs = []
    for _ in range(3):
        theta = rng.uniform(0.1, 1.0, len(cls.param_names))
        value, jac = evaluate(theta)
        expected = (_written_out(cls, theta, feats) if cls in (law.AnnealingLaw, CPTLaw)
                    else cls.value_and_jac(theta, feats))
        np.testing.assert_array_equal(value, expected[0])
        np.testing.assert_array_equal(jac, expected[1])
        jacs.append(jac)
    assert all(jac is jacs[0] for jac in jacs)


def test_phase_rows_split_the_annealing_area_at_every_switch():
    lrs = np.concatenate([np.full(40, 1.0), np.linspace(1.0, 0.2, 20), np.full(20, 0.9), np.linspace(0.9, 0.1, 20)])
    curve = Curve(lrs, np.arange(100), np.ones(100), cpt_start=30, shifts=(70,))
    plain = multi_shift_law(2).features(curve, LAM)
    feats = multi_shift_law(2, anneal=True).features(curve, LAM)
    _, s2 = law.areas(lrs, lam=LAM)
    t = np.arange(100)
    np.testing.assert_array_equal(feats[[0, 1, 2, 4]], plain[[0, 1, 2, 4]])
    # phase 1 gathers S2 from step 30 to 69 and then stays frozen; phase 2 from step 70 on
    np.testing.assert_allclose(feats[3], np.where(t < 30, 0.0, s2[np.minimum(t, 69)] - s2[29]))
    np.testing.assert_allclose(feats[5], np.where(t < 70, 0.0, s2 - s2[69]))
    np.testing.assert_allclose(feats[3] + feats[5], plain[3])
    # drift rows are the forward areas since each switch: the law adds D_i times them
    d = multi_shift_law(2, drift=True)
    theta = np.zeros(len(d.param_names))
    theta[d.param_names.index("D2")] = 1.0
    np.testing.assert_allclose(d.value_and_jac(theta, d.features(curve, LAM))[0], plain[4])


def test_two_version_fit_is_the_single_shift_fit_unchanged(tmp_path):
    run_dir, lineage = write_lineage(tmp_path, 2)
    # the published Huber threshold: the pins predate the noise-scaled one (law.huber_delta)
    fits = lawfit.fit_run(run_dir, "v2", lam=LAM, huber_delta=law.HUBER_DELTA)
    for split, want in TWO_VERSION_PARAMS.items():
        assert fits[split].law == "CPTLaw" and fits[split].held_out == {}
        assert lawfit.boundaries(lineage, split, "v2") == [200]
        # the same optimum: its objective to 1e-6 ...
        assert fits[split].huber == pytest.approx(TWO_VERSION_HUBER[split], rel=1e-6), split
        for k, v in want.items():
            # ... and its parameters to 1e-4, not bit for bit: E and beta lie on a flat direction
            # of the fit, where other BLAS code paths or L-BFGS-B paths (fit_law's screening of
            # its starts) stop up to ~3e-5 apart; any change of the law moves them by far more
            assert fits[split].params[k] == pytest.approx(v, rel=1e-4, abs=1e-9), (split, k)


def test_boundaries_are_every_later_version_start(three_versions):
    _, lineage, _ = three_versions
    assert lawfit.boundaries(lineage, "v1", "v3") == [200, 400]
    assert lawfit.boundaries(lineage, "v2", "v3") == [400]
    assert lawfit.boundaries(lineage, "v3", "v3") == [400]
    assert lawfit.boundaries(lineage, "v1", "v2") == [200]
    curves = lawfit.curves_from_lineage(lineage, "v1", "v3")
    assert {(c.cpt_start, c.shifts) for c in curves} == {(200, (400,))}


def test_fit_run_fits_every_shift_where_it_predicts_better(three_versions):
    run_dir, lineage, fits = three_versions
    v1 = fits["v1"]
    # every form was scored; the richer forms predict no better than the truth's form
    assert v1.law == "MultiShiftCPTLaw[2]"
    assert set(v1.held_out) == {"CPTLaw", *(multi_shift_law(2, **f).__name__ for f in lawfit.MULTI_FORMS)}
    assert v1.held_out["MultiShiftCPTLaw[2]"] < v1.held_out["CPTLaw"] / 2
    # the per-branch errors behind each score, and each candidate's information criterion
    assert set(v1.held_out_errors) == set(v1.held_out_bic) == set(v1.held_out)
    for name, errors in v1.held_out_errors.items():
        assert np.mean(errors) == pytest.approx(v1.held_out[name]) and np.isfinite(v1.held_out_bic[name])
    # the amplitudes of both switches come back (truth 0.35 and 0.25)
    assert v1.params["B"] == pytest.approx(OLD_B[0], rel=0.15)
    assert v1.params["B2"] == pytest.approx(OLD_B[1], rel=0.15)
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    single = fit_law(CPTLaw, curves, sign={"B": 1}, lam=LAM, quiet=True)
    assert v1.r2 > single.r2 and v1.mape < single.mape
    # splits with one switch keep the single-shift law
    assert fits["v2"].law == fits["v3"].law == "CPTLaw"
    # v2 entered at step 200: its entry forms were scored and did not predict better
    assert "MultiShiftCPTLaw[1,entry]" in fits["v2"].held_out and not fits["v3"].held_out
    record = json.loads((run_dir / "law" / "fit-v3.json").read_text())
    assert record["splits"]["v1"]["boundaries"] == [200, 400]
    assert record["splits"]["v1"]["held_out"] == v1.held_out
    reloaded = lawfit.load_fits(run_dir, "v3")["v1"]
    assert reloaded.law == v1.law and reloaded.params == v1.params


def test_fit_run_keeps_the_forms_it_is_given(three_versions, tmp_path):
    """``forms`` fits the named law of each split as it is, without choosing (no held-out
    scores), with the same result as fitting that law directly."""
    run_dir = shutil.copytree(three_versions[0], tmp_path / "run")
    lineage = three_versions[1]
    forms = {"v1": "MultiShiftCPTLaw[2,drift]", "v2": "MultiShiftCPTLaw[1,entry]", "v3": "CPTLaw"}
    fits = lawfit.fit_run(run_dir, "v3", lam=LAM, forms=forms)
    assert {split: f.law for split, f in fits.items()} == forms
    assert not any(f.held_out for f in fits.values())
    curves = lawfit.curves_from_lineage(lineage, "v1", "v3", run_dir=run_dir)
    direct = fit_law(forms["v1"], curves, lam=LAM, sign={"B": 1}, quiet=True)
    assert fits["v1"].params == direct.params
    assert json.loads((run_dir / "law" / "fit-v3.json").read_text())["forms"] == forms


def test_prediction_uses_every_switch(three_versions):
    _, lineage, fits = three_versions
    p = lawfit.predict_branch(fits, lineage, "v3", "cosine", 0.3)
    actual = {b["name"]: b for b in lineage["branches"]}["branch-v3-alt"]["metrics"]  # 0.4 cosine to 0.1
    q = lawfit.predict_branch(fits, lineage, "v3", "cosine", 0.4, min_lr_ratio=0.1)
    assert q["predicted"]["v1"] == pytest.approx(actual["val/v1"], rel=0.01)
    assert p["predicted"]["v1"] != q["predicted"]["v1"]


def test_fit_report_lists_each_splits_switches(three_versions):
    _, lineage, fits = three_versions
    text = format_fits(fits, lineage, "v3")
    assert "v1 (old, data switches at steps 200, 400): MultiShiftCPTLaw[2]" in text
    assert "v2 (old, data switches at steps 400; its data entered at step 200): CPTLaw" in text
    assert "cannot tell apart): CPTLaw" in text
    assert f"R^2={fits['v1'].r2:.4f} (noise ceiling {fits['v1'].r2_ceiling:.4f})" in text
    # the first version's own split, trained on from step 0, sees no switch
    assert "  v1 (new, no data switch): CPTLaw" in format_fits({"v1": fits["v3"]}, lineage, "v1")
    jumpy = dataclasses.replace(fits["v1"], outlier_share=0.75, outliers=[
        {"curve": "main", "step": 10 * i, "residual": 0.04 - 0.005 * i} for i in range(1, 8)])
    text = format_fits({**fits, "v1": jumpy}, lineage, "v3")
    assert ("outliers (beyond 3 noise sd): 7 points carry 75% of the squared error: main step 10 +3.5%, "
            "main step 20 +3.0%, main step 30 +2.5%, main step 40 +2.0%, main step 50 +1.5% and 2 more") in text
    assert "optimizer:" not in text
    short = dataclasses.replace(fits["v1"], optimizer_status=1, optimizer="STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT")
    assert "optimizer: stopped at the iteration limit (STOP: TOTAL NO. OF ITERATIONS" in format_fits(
        {**fits, "v1": short}, lineage, "v3")


def test_guard_single_shift_truth_keeps_the_single_shift_law(tmp_path):
    """Later switches that change nothing: every richer form predicts held-out branches at
    best marginally better, so the single-shift law is kept."""
    run_dir, lineage = write_lineage(tmp_path, 3, shifts="single")
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    candidates = lawfit._shift_candidates("CPTLaw", curves, "auto", lawfit._n_points(curves))
    chosen, scores = law.select_law(candidates, curves, sign={"B": 1}, lam=LAM)
    assert chosen is CPTLaw and len(scores) == 1 + len(lawfit.MULTI_FORMS)
    assert min(scores.values()) * law.REFERENCE_FACTOR >= scores["CPTLaw"]


def test_selection_holds_out_the_released_versions_branches(three_versions):
    _, lineage, _ = three_versions
    for split in ("v1", "v2", "v3"):
        curves = lawfit.curves_from_lineage(lineage, split, "v3")
        held = [curves[i].name for i in law._last_phase_curves(curves, ("main",))]
        assert held == ["branch-v3", "branch-v3-alt"], split
    # a fit for releasing v2 holds out v2's branches
    curves = lawfit.curves_from_lineage(lineage, "v1", "v2")
    assert [curves[i].name for i in law._last_phase_curves(curves, ("main",))] == ["branch-v2", "branch-v2-alt"]


def test_select_fit_keeps_the_simpler_law_unless_clearly_beaten(three_versions, monkeypatch):
    """A richer law replaces the first candidate at REFERENCE_FACTOR times its accuracy, or
    when it predicts better by more than the noise of the held-out branches (one standard
    error); among the richer ones, scores within SELECT_MARGIN of the best keep the simplest."""
    run_dir, lineage, _ = three_versions
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    fake = {"CPTLaw": [0.0155, -0.0055], "MultiShiftCPTLaw[2]": [0.0060, 0.0060],
            "MultiShiftCPTLaw[2,drift]": [0.0011, 0.0], "MultiShiftCPTLaw[2,anneal,drift]": [0.001, 0.0]}
    monkeypatch.setattr(law, "_held_out_errors", lambda c, *a, **k: fake[law_class(c).__name__])
    monkeypatch.setattr(law, "fit_law", lambda c, *a, **k: law.FitResult(law_class(c).__name__, {}, 1.0, 0.0, 0.0,
                                                                            1, 1))
    two = [CPTLaw, multi_shift_law(2)]
    # 0.0060 is not half of 0.0105, and the branches disagree by more than the difference
    assert law.select_law(two, curves, lam=LAM)[0] is CPTLaw
    fake["CPTLaw"] = [0.0105, -0.0105]  # consistently worse on both branches: beyond the noise
    assert law.select_law(two, curves, lam=LAM)[0] is multi_shift_law(2)
    forms = [*two, multi_shift_law(2, drift=True), multi_shift_law(2, anneal=True, drift=True)]
    chosen, scores = law.select_law(forms, curves, lam=LAM)
    assert chosen is multi_shift_law(2, drift=True) and scores[chosen.__name__] == pytest.approx(0.00055)
    fake["CPTLaw"] = [0.001, 0.0]  # now no richer law halves the first one's error
    assert law.select_law(forms, curves, lam=LAM)[0] is CPTLaw


def test_select_fit_takes_the_tighter_fit_only_among_equal_predictors(three_versions, monkeypatch):
    """Among the laws that predict as well as the first one, the information criterion
    decides only between those that also predict as well as the best one: a law whose fit is
    a little tighter does not win over one that predicts held-out branches clearly better
    (the pattern of an old split whose entry term tightens the fit over its own segment)."""
    run_dir, lineage, _ = three_versions
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    fake = {"CPTLaw": ([0.0062, 0.0042], 0.977), "MultiShiftCPTLaw[2]": ([0.0061, 0.0046], 0.985),
            "MultiShiftCPTLaw[2,drift]": ([0.0059, 0.0033], 0.982)}
    monkeypatch.setattr(law, "_held_out_errors", lambda c, *a, **k: fake[law_class(c).__name__][0])
    monkeypatch.setattr(law, "fit_law", lambda c, *a, **k: law.FitResult(
        law_class(c).__name__, {}, fake[law_class(c).__name__][1], 0.0, 0.0, 28, 1))
    forms = [CPTLaw, multi_shift_law(2), multi_shift_law(2, drift=True)]
    fit = law.select_fit(forms, curves, lam=LAM)
    assert fit.law == "MultiShiftCPTLaw[2,drift]"
    assert fit.held_out_bic["MultiShiftCPTLaw[2]"] < fit.held_out_bic[fit.law]  # the tighter fit lost
    fake["MultiShiftCPTLaw[2,drift]"] = ([0.0060, 0.0044], 0.982)  # now within the noise of the others
    assert law.select_fit(forms, curves, lam=LAM).law == "MultiShiftCPTLaw[2]"


def test_predicting_as_well_allows_one_standard_error():
    """A law predicts as well as the reference when it is worse on the held-out branches by
    no more than SELECT_MARGIN of the reference's error or one standard error of the paired
    differences: two branches that disagree about which law is better cannot rank them."""
    ref = np.array([0.003, 0.003])
    assert law._predicts_as_well(np.array([0.001, 0.009]), ref)  # +0.002 on average, SE 0.004
    assert not law._predicts_as_well(np.array([0.004, 0.0045]), ref)  # consistently worse: SE 0.00025
    assert law._predicts_as_well(np.array([0.0032, 0.0032]), ref)  # within SELECT_MARGIN
    assert not law._predicts_as_well(np.array([0.0034]), np.array([0.003]))  # one branch: the margin alone


def test_drift_truth_is_recovered_and_chosen(tmp_path):
    """A split whose forgetting recovers after its second switch (the new data is closer to
    it): the drift form is chosen, recovers the drift, and predicts held-out branches better
    than the forms without it."""
    run_dir, lineage = write_lineage(tmp_path, 3, drift=(0.2, -0.4))
    # v1 is the split with two switches; the others keep the single-shift law (CI time)
    fits = lawfit.fit_run(run_dir, "v3", lam=LAM, save=False, forms={"v2": "CPTLaw", "v3": "CPTLaw"})
    v1 = fits["v1"]
    assert v1.law == "MultiShiftCPTLaw[2,drift]"
    assert v1.held_out[v1.law] * law.REFERENCE_FACTOR <= v1.held_out["CPTLaw"]
    assert v1.held_out[v1.law] * (1 + law.SELECT_MARGIN) < v1.held_out["MultiShiftCPTLaw[2]"]
    assert v1.params["D2"] == pytest.approx(-0.4, rel=0.15)
    assert v1.r2 > 0.999 and v1.mape < 0.15
    p = lawfit.predict_branch(fits, lineage, "v3", "cosine", 0.4, min_lr_ratio=0.1)
    actual = {b["name"]: b for b in lineage["branches"]}["branch-v3-alt"]["metrics"]
    assert p["predicted"]["v1"] == pytest.approx(actual["val/v1"], rel=0.003)


def test_stability_gap_truth_is_recovered(tmp_path):
    """An old split whose loss overshoots after each switch and then recovers (the stability
    gap): the gap form recovers each overshoot and where it peaks, and fits the curves to the
    noise, where the forms without it cannot."""
    run_dir, lineage = write_lineage(tmp_path, 3, gap=(0.15, 0.3), noise=1e-4)
    curves = lawfit.curves_from_lineage(lineage, "v1", "v3", run_dir=run_dir)
    fit = fit_law(multi_shift_law(2, gap=True), curves, lam=LAM, sign={"B": 1})
    assert fit.params["G"] == pytest.approx(0.15, rel=0.05) and fit.params["G2"] == pytest.approx(0.3, rel=0.05)
    assert fit.params["P"] == pytest.approx(GAP_P, rel=0.05)
    assert fit.mape < 0.02 and not fit.degenerate
    drift = fit_law(multi_shift_law(2, drift=True), curves, lam=LAM, sign={"B": 1})
    assert drift.mape > 5 * fit.mape


def test_entry_truth_is_recovered_and_chosen(tmp_path):
    """An old split that keeps the shift term it had as the new split: the entry form is
    chosen for it, finds that term next to the later one, and fits and predicts far better
    than the law without it; the first version (entered at step 0) has no entry form."""
    run_dir, lineage = write_lineage(tmp_path, 3, entry=True, noise=1e-4)
    curves = lawfit.curves_from_lineage(lineage, "v2", run_dir=run_dir)
    assert {c.entry for c in curves} == {200}
    candidates = lawfit._shift_candidates("CPTLaw", curves, "auto", lawfit._n_points(curves))
    v2 = law.select_fit(candidates, curves, sign={"B": 1}, lam=LAM, quiet=True)
    # the released version's branches see the entry term saturated: their held-out losses
    # cannot tell the laws apart, the curves over v2's own segment can (the information criterion)
    assert v2.law == "MultiShiftCPTLaw[1,entry]"
    assert v2.held_out[v2.law] <= v2.held_out["CPTLaw"] * (1 + law.SELECT_MARGIN)
    # B0 trades off against the power law over the split's own segment (nothing was observed
    # before it entered), so only its sign and size are pinned; B is the later switch's alone
    assert NEW_B * 1.5 < v2.params["B0"] < NEW_B / 2
    assert v2.params["B"] == pytest.approx(OLD_B[0], rel=0.15)
    single = fit_law(CPTLaw, curves, sign={"B": 1}, lam=LAM, quiet=True)
    assert v2.r2 > 0.9999 and v2.mape < single.mape / 3
    v1 = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    assert not any("entry" in law_class(c).__name__ for c in lawfit._shift_candidates("CPTLaw", v1, "auto", 99))
    alt = next(c for c in curves if c.name == "branch-v3-alt")
    assert v2.predict(alt)[-1] == pytest.approx(alt.losses[-1], rel=0.003)


def test_a_switch_nothing_was_observed_after_is_not_fitted():
    lrs = np.full(300, 1e-3)
    curves = [Curve(lrs, np.arange(0, 250, 5), np.ones(50), cpt_start=100, shifts=(200, 260), name="main")]
    forms = [multi_shift_law(2), multi_shift_law(2, drift=True), multi_shift_law(2, gap=True),
             multi_shift_law(2, drift=True, gap=True), multi_shift_law(2, anneal=True, drift=True)]
    assert lawfit._shift_candidates("CPTLaw", curves, "auto", 50) == ["CPTLaw", *forms]
    assert lawfit._shift_candidates("CPTLaw", curves, "multi", 50) == forms
    assert lawfit._shift_candidates("CPTLaw", curves, "auto", 12) == ["CPTLaw", *forms[:2]]  # 12 parameters
    assert lawfit._shift_candidates("CPTLaw", curves, "single", 50) == ["CPTLaw"]
    # one switch and an entry: the entry forms (anneal adds nothing to one phase)
    entered = [Curve(lrs, np.arange(120, 250, 5), np.ones(26), cpt_start=200, entry=100, name="main")]
    assert lawfit._shift_candidates("CPTLaw", entered, "auto", 50) == [
        "CPTLaw", *(multi_shift_law(1, entry=True, **kw) for kw in ({}, {"drift": True}, {"gap": True},
                                                                   {"drift": True, "gap": True}))]
    assert lawfit._shift_candidates("CPTLaw", curves, "auto", 9) == ["CPTLaw"]  # too few points
    assert lawfit._shift_candidates("AnnealingLaw", curves, "auto", 50) == ["AnnealingLaw"]
    with pytest.raises(ValueError, match="shifts must be"):
        lawfit.fit_run({"versions": []}, shifts="two")
