"""The multi-shift CPT law: one distribution-shift term per data switch a split sees.

Everything runs on synthetic lineages (``law_lineage``) whose losses follow a known law:
pure numpy fits, no training. The two-version case is pinned to the single-shift numbers
the law gave before the multi-shift law existed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from law_lineage import LAM, OLD_B, write_lineage

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


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory):
    """(run_dir, lineage, fits) of a synthetic 3-version lineage fitted for releasing v3."""
    run_dir, lineage = write_lineage(tmp_path_factory.mktemp("shifts"), 3)
    return run_dir, lineage, lawfit.fit_run(run_dir, "v3", lam=LAM)


def test_one_switch_is_the_cpt_law_and_names_round_trip():
    assert multi_shift_law(1) is CPTLaw
    three = multi_shift_law(3)
    assert three.param_names == CPTLaw.param_names + ("B2", "B3")
    assert law_class(three.__name__) is three and law_class("CPTLaw") is CPTLaw
    with pytest.raises(ValueError, match="unknown law"):
        law_class("MultiShiftLaw[2]")


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


def test_multi_shift_jacobian_matches_finite_differences():
    cls = multi_shift_law(3)
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(6, 40)))
    theta = np.array([2.0, 1.2, 0.4, 0.3, 0.2, 0.3, 5.0, 0.8, 0.2, -0.1])
    value, jac = cls.value_and_jac(theta, feats)
    for i in range(len(theta)):
        step = np.zeros_like(theta)
        step[i] = 1e-6
        num = (cls.value_and_jac(theta + step, feats)[0] - cls.value_and_jac(theta - step, feats)[0]) / 2e-6
        np.testing.assert_allclose(jac[:, i], num, rtol=1e-5, atol=1e-8, err_msg=cls.param_names[i])
    # no later switch observed: the value is the single-shift law's
    single = CPTLaw.value_and_jac(theta[:8], feats[:4])[0]
    np.testing.assert_array_equal(cls.value_and_jac(theta, np.vstack([feats[:4], 0 * feats[4:]]))[0], single)


def test_two_version_fit_is_the_single_shift_fit_unchanged(tmp_path):
    run_dir, lineage = write_lineage(tmp_path, 2)
    fits = lawfit.fit_run(run_dir, "v2", lam=LAM)
    for split, want in TWO_VERSION_PARAMS.items():
        assert fits[split].law == "CPTLaw" and fits[split].held_out == {}
        assert lawfit.boundaries(lineage, split, "v2") == [200]
        for k, v in want.items():
            # 1e-5, not bit for bit: E and beta lie on a flat direction of the fit, where CPUs
            # with other BLAS code paths land a few 1e-7 apart; any change of the law is far larger
            assert fits[split].params[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (split, k)


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
    assert v1.law == "MultiShiftCPTLaw[2]"
    assert v1.held_out["MultiShiftCPTLaw[2]"] < v1.held_out["CPTLaw"]
    # the amplitudes of both switches come back (truth 0.35 and 0.25)
    assert v1.params["B"] == pytest.approx(OLD_B[0], rel=0.15)
    assert v1.params["B2"] == pytest.approx(OLD_B[1], rel=0.15)
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    single = fit_law(CPTLaw, curves, sign={"B": 1}, lam=LAM, quiet=True)
    assert v1.r2 > single.r2 and v1.mape < single.mape
    # splits with one switch keep the single-shift law
    assert fits["v2"].law == fits["v3"].law == "CPTLaw"
    record = json.loads((run_dir / "law" / "fit-v3.json").read_text())
    assert record["splits"]["v1"]["boundaries"] == [200, 400]
    assert record["splits"]["v1"]["held_out"] == v1.held_out
    reloaded = lawfit.load_fits(run_dir, "v3")["v1"]
    assert reloaded.law == v1.law and reloaded.params == v1.params


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
    assert "v2 (old, data switches at steps 400): CPTLaw" in text
    assert "chosen by held-out error: CPTLaw" in text


def test_guard_single_shift_truth_is_not_fitted_worse(tmp_path):
    """Later switches that change nothing: the chosen law predicts held-out branches no worse
    than the single-shift law (the comparison that chose it), and fits as well."""
    run_dir, lineage = write_lineage(tmp_path, 3, shifts="single")
    curves = lawfit.curves_from_lineage(lineage, "v1", run_dir=run_dir)
    chosen, scores = law.select_law([CPTLaw, multi_shift_law(2)], curves, sign={"B": 1}, lam=LAM)
    assert set(scores) == {"CPTLaw", "MultiShiftCPTLaw[2]"}
    assert scores[chosen.__name__] == min(scores.values())
    if chosen is not CPTLaw:
        fit = fit_law(chosen, curves, sign={"B": 1}, lam=LAM, quiet=True)
        single = fit_law(CPTLaw, curves, sign={"B": 1}, lam=LAM, quiet=True)
        assert fit.mape <= single.mape * 1.05


def test_a_switch_nothing_was_observed_after_is_not_fitted():
    lrs = np.full(300, 1e-3)
    curves = [Curve(lrs, np.arange(0, 250, 5), np.ones(50), cpt_start=100, shifts=(200, 260), name="main")]
    assert lawfit._shift_candidates("CPTLaw", curves, "auto", 50) == ["CPTLaw", multi_shift_law(2)]
    assert lawfit._shift_candidates("CPTLaw", curves, "multi", 50) == [multi_shift_law(2)]
    assert lawfit._shift_candidates("CPTLaw", curves, "single", 50) == ["CPTLaw"]
    assert lawfit._shift_candidates("CPTLaw", curves, "auto", 9) == ["CPTLaw"]  # too few points
    assert lawfit._shift_candidates("AnnealingLaw", curves, "auto", 50) == ["AnnealingLaw"]
    with pytest.raises(ValueError, match="shifts must be"):
        lawfit.fit_run({"versions": []}, shifts="two")
