"""raypath.lawfit and raypath.lawguide on the session's tiny lineage: curves, per-split fits,
predictions, guidance.

The tiny run is shared, so every test works on a private copy of its lineage record and
curves (``law_run``), which is all the law reads (no checkpoints, no Ray). The stopper is
tested on synthetic forecasts, without Tune.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from raypath import lawfit, lawguide
from raypath.law import LAMBDA_GRID, effective_lr, multi_shift_law
from raypath.schedules import Branch, Decay, MainPath, decay_from, lr_curve


@pytest.fixture(scope="module")
def law_run(tiny_run, tmp_path_factory):
    """(run_dir, lineage) of a copy of the tiny run's lineage.json + curves/."""
    cfg, _ = tiny_run
    src = Path(cfg.run_dir)
    dst = tmp_path_factory.mktemp("law") / "run"
    dst.mkdir()
    shutil.copy(src / "lineage.json", dst / "lineage.json")
    shutil.copytree(src / "curves", dst / "curves")
    return dst, json.loads((dst / "lineage.json").read_text())


@pytest.fixture(scope="module")
def fits(law_run):
    run_dir, lineage = law_run
    return lawfit.fit_run(run_dir, "v3")


def law_class_name(form: dict) -> str:
    """The name of the two-switch multi-shift law in ``form`` (a :data:`lawfit.MULTI_FORMS` entry)."""
    return multi_shift_law(2, **form).__name__


def _records(run_dir: Path, name: str, key: str) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "curves" / f"{name}.jsonl").read_text().splitlines() if line]
    return sorted({r["step"] for r in rows if key in r})


def test_curves_have_the_schedules_lr_history(law_run):
    run_dir, lineage = law_run
    mains = {m["version"]: m for m in lineage["main_path"]}
    m0 = lineage["main_path"][0]
    main = MainPath(m0["max_lr"], m0["warmup_steps"])
    for split in ("v1", "v2", "v3"):
        curves = {c.name: c for c in lawfit.curves_from_lineage(lineage, split, run_dir=run_dir)}
        assert "main" in curves
        # cpt phase: the new split from its own segment's start, old splits from leaving their data
        expected_start = mains[split]["start_step"] if split == "v3" else mains[split]["end_step"]
        assert all(c.cpt_start == expected_start for c in curves.values())
        c = curves["main"]
        want = effective_lr(lr_curve(main, len(c.lrs)), m0["warmup_steps"], m0["max_lr"])
        np.testing.assert_allclose(c.lrs.full(), want, rtol=0, atol=1e-15)
        observed = [s for v in ("v1", "v2", "v3") for s in _records(run_dir, f"main-{v}", f"val/{split}")]
        assert list(c.steps + 1) == sorted(set(observed))  # record at step s saw LRs 0..s-1
        branches = [b for b in lineage["branches"] if f"val/{split}" in b["metrics"]]
        assert branches
        for b in branches:
            c = curves[b["name"]]
            d = b["decay"]
            sched = Branch(main, b["fork_step"], b["steps"], Decay(d["shape"], d["min_lr_ratio"], d["power"]))
            end = b["fork_step"] + b["steps"]
            want = effective_lr(lr_curve(sched, end), m0["warmup_steps"], m0["max_lr"])
            np.testing.assert_allclose(c.lrs.full(), want, rtol=0, atol=1e-15)
            assert c.steps.max() == end - 1 and c.steps.min() >= b["fork_step"]
            assert np.isclose(c.losses[-1], b["metrics"][f"val/{split}"])


def test_branch_lrs_match_schedules_for_every_shape():
    main = MainPath(3e-3, 7)
    for shape in ("cosine", "linear", "1-sqrt", "exponential", "polynomial"):
        for fork, floor in ((3, 0.1), (40, 0.1), (1, 0.5)):  # inside and after the warmup; below the floor
            decay = Decay(shape, floor, 3.0)
            history = lawfit.branch_history(main, fork, 25, decay, n=80)
            assert (history.flat, len(history.tail)) == (fork, 80 - fork)  # one float a step from the fork on
            want = effective_lr(lr_curve(Branch(main, fork, 25, decay), 80), min(7, fork), 3e-3)
            np.testing.assert_allclose(history.full(), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("law", ["AnnealingLaw", "CPTLaw", "multi_shift_law"])
def test_a_branch_history_held_from_its_fork_gives_the_areas_of_the_whole_array(law):
    """A curve's features from an LRHistory (flat prefix not laid out) are those of the full
    array, bit for bit, at steps inside the prefix, at its last step, and through the decay."""
    from raypath.law import Curve, law_class, multi_shift_law

    main = MainPath(3e-3, 7)
    cls = multi_shift_law(3, anneal=True, entry=True) if law == "multi_shift_law" else law_class(law)
    for fork, n in ((40, 70), (40, 30), (1, 20)):  # a branch; observed only before its fork; forked at once
        history = lawfit.branch_history(main, fork, 25, Decay("cosine", 0.1, 2.0), n=n)
        steps = np.unique(np.clip([0, 3, fork - 2, fork - 1, fork, fork + 1, n - 1], 0, n - 1))
        kw = {"cpt_start": 10, "shifts": (35, 45), "entry": 4} if law != "AnnealingLaw" else {}
        compact, whole = (Curve(lrs, steps, np.ones(len(steps)), **kw) for lrs in (history, history.full()))
        for lam in (0.9, 0.999):
            np.testing.assert_array_equal(cls.features(compact, lam), cls.features(whole, lam))


def test_upto_version_limits_curves(law_run):
    run_dir, lineage = law_run
    curves = lawfit.curves_from_lineage(lineage, "v1", "v2", run_dir=run_dir)
    v2_end = next(m["end_step"] for m in lineage["main_path"] if m["version"] == "v2")
    assert all(c.steps.max() < v2_end for c in curves)
    assert not any(c.name == "branch-v3" for c in curves)


def test_fit_run_writes_json(law_run, fits):
    run_dir, _ = law_run
    assert set(fits) == {"v1", "v2", "v3"}
    rec = json.loads((run_dir / "law" / "fit-v3.json").read_text())
    assert rec["version"] == "v3"
    for split, fit in fits.items():
        assert math.isfinite(fit.r2) and fit.n_points >= 4
        saved = rec["splits"][split]
        assert saved["r2"] == pytest.approx(fit.r2) and saved["params"] == fit.params
        assert isinstance(saved["degenerate"], list) and saved["curves"]
        assert saved["cpt_start"] >= 0
    assert lawfit.load_fits(run_dir, "v3")["v2"].params == fits["v2"].params
    # one lambda for every split, chosen by leave-one-branch-out, with the scores it was chosen on
    assert rec["lam"] == "auto"
    scores = rec["lam_scores"]
    assert set(scores) == {str(x) for x in LAMBDA_GRID}
    best = min(scores, key=lambda k: (scores[k], -float(k)))
    for split, fit in fits.items():
        assert str(fit.lam) == best and rec["splits"][split]["lam"] == fit.lam
    # shift-term signs as 2505.07796 finds them: forgetting on old data, gain on new data
    # (a split with fewer points than the CPT law has parameters falls back to the annealing
    # law; v1 sees two data switches, so it may take the multi-shift law; v2 one switch and
    # its entry, so it may take an entry form)
    entered = {multi_shift_law(1, entry=True, **kw).__name__ for kw in lawfit.MULTI_FORMS}
    for split, fit in fits.items():
        laws = {"CPTLaw", *({"v1": {law_class_name(kw) for kw in lawfit.MULTI_FORMS}, "v2": entered}.get(split, ()))}
        assert fit.law in (laws if fit.n_points > 8 else {"AnnealingLaw"})
        assert rec["splits"][split]["boundaries"] == lawfit.boundaries(law_run[1], split, "v3")
        assert rec["splits"][split]["entry"] == (lawfit.main_entry(law_run[1], "v2").start_step if split == "v2" else 0)
        for amp in ("B", "B2"):
            if amp in fit.params:
                assert fit.params[amp] <= 0 if split == "v3" else fit.params[amp] >= 0
        assert fit.params.get("B0", 0.0) <= 0  # the split's own data entering lowers its loss


def test_predict_branch(law_run, fits):
    _, lineage = law_run
    p = lawfit.predict_branch(fits, lineage, "v3", "cosine", 0.5, 0.0)
    m = next(m for m in lineage["main_path"] if m["version"] == "v3")
    assert p["end_step"] == m["end_step"] and p["fork_step"] + p["branch_steps"] == m["end_step"]
    assert set(p["predicted"]) == {"v1", "v2", "v3"}
    assert all(math.isfinite(v) and v > 0 for v in p["predicted"].values())
    assert p["weights"] == {"v1": 0.25, "v2": 0.25, "v3": 0.5}
    assert p["objective"] == pytest.approx(sum(p["weights"][s] * p["predicted"][s] for s in p["weights"]))
    # On the data it anneals on, a long full decay ends below the never-annealed main path (the
    # fit found an annealing gain there), and a higher floor gains less. On older splits the
    # sign is the data's (annealing on prose may raise the loss on code, a drift term), but a
    # shallower decay moves every split less, the same way.
    high = lawfit.predict_branch(fits, lineage, "v3", "cosine", 0.5, 0.5)
    assert fits["v3"].params.get("C2", fits["v3"].params.get("C", 0.0)) > 0
    assert p["predicted"]["v3"] < high["predicted"]["v3"] < p["main"]["v3"]
    for s in p["predicted"]:
        full, shallow = p["predicted"][s] - p["main"][s], high["predicted"][s] - p["main"][s]
        assert full * shallow >= 0 and abs(shallow) <= abs(full), s


def test_rank_candidates_sorted_and_deterministic(law_run, fits):
    _, lineage = law_run
    grid = lawguide.default_grid(n_fractions=4)
    assert {g["shape"] for g in grid} == {"cosine", "linear", "1-sqrt", "exponential", "polynomial"}
    ranked = lawguide.rank_candidates(fits, lineage, "v3", grid)
    objectives = [c["objective"] for c in ranked]
    assert objectives == sorted(objectives) and all(math.isfinite(o) for o in objectives)
    assert ranked == lawguide.rank_candidates(fits, lineage, "v3", grid)
    m = next(m for m in lineage["main_path"] if m["version"] == "v3")
    forks = [m["fork_step"], m["start_step"] + 5]
    snapped = lawguide.rank_candidates(fits, lineage, "v3", grid, forks=forks)
    assert {c["fork_step"] for c in snapped} <= set(forks)
    point = lawguide.optuna_point(snapped[0], replay_ratio=0.0)
    assert set(point) >= {"fraction", "shape", "min_lr_ratio", "replay_ratio"}
    # a polynomial decay of power 1 is the linear one: one candidate, ranked as linear
    powers = lawguide.default_grid(n_fractions=2, shapes=("linear", "polynomial"), power=(1.0, 3.0))
    ranked = lawguide.rank_candidates(fits, lineage, "v3", powers, forks=forks)
    keys = [(c["fork_step"], c["shape"], c["power"], c["min_lr_ratio"]) for c in ranked]
    assert len(keys) == len(set(keys)) and not any(c["shape"] == "polynomial" and c["power"] == 1.0 for c in ranked)
    assert sum(c["shape"] == "linear" for c in ranked) == len({(c["fork_step"], c["min_lr_ratio"]) for c in ranked})
    # 1- and 2-step branches go from the fork's LR to the floor whatever their shape: one
    # candidate per (fork, floor); a 5-step branch has one per shape and power
    end = m["end_step"]
    one_fraction = lawguide.default_grid(n_fractions=1)
    per_fork = {k: len(lawguide.rank_candidates(fits, lineage, "v3", one_fraction, forks=[end - k]))
                for k in (1, 2, 5)}
    assert per_fork == {1: 2, 2: 2, 5: 2 * 9}, per_fork


def test_cli_law_fit_and_predict(law_run, fits, capsys, tmp_path):
    from raypath.cli import main

    run_dir, _ = law_run
    # the default (lambda and shift forms chosen) is the ``fits`` fixture's fit_run; one
    # lambda and the single-shift law keep CI time down
    assert main(["law", "fit", str(run_dir), "--lambda", "0.99", "--shifts", "single"]) == 0
    out = capsys.readouterr().out
    assert "MultiShiftCPTLaw" not in out
    for split in ("v1", "v2", "v3"):
        assert f"  {split} (" in out
    assert "R^2=" in out and "MAPE=" in out and "degenerate:" in out
    assert out.count("lambda=0.99, Huber delta=") == 3  # every split
    assert json.loads((run_dir / "law" / "fit-v3.json").read_text())["lam"] == 0.99
    assert "v1 (old, data switches at steps " in out
    png = tmp_path / "pred.png"
    assert main(["law", "predict", str(run_dir), "--version", "v3", "--shape", "polynomial", "--fraction", "0.3",
                 "--min-lr-ratio", "0.1", "--power", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "val/v1" in out and "val/v3" in out and "objective" in out
    assert "(main path at the same step, also predicted: " in out  # a law prediction, not a measurement
    assert png.stat().st_size > 10_000
    assert main(["law", "predict", str(run_dir), "--version", "v9"]) == 2
    # without decay options: the run's configured release branch
    lineage_path = run_dir / "lineage.json"
    recorded = lineage_path.read_text()
    try:
        data = json.loads(recorded)
        data["config"]["branch"] = {"shape": "cosine", "fraction": 0.3, "min_lr_ratio": 0.1, "power": 2.0}
        lineage_path.write_text(json.dumps(data))
        assert main(["law", "predict", str(run_dir), "--version", "v3"]) == 0
        assert "v3: branch cosine (power 2, min_lr_ratio 0.1)" in capsys.readouterr().out
    finally:
        lineage_path.write_text(recorded)
    with pytest.raises(SystemExit):
        main(["law", "fit", str(run_dir), "--lambda", "1.5"])
    with pytest.raises(SystemExit):
        main(["law", "fit", str(run_dir), "--huber-delta", "0"])
    assert "--lambda: expected 'auto' or a number in (0, 1), got '1.5'" in capsys.readouterr().err


def test_law_predict_refuses_a_plot_path_it_cannot_write_before_fitting(tmp_path, capsys):
    """``--plot`` naming a directory (or a path under a file) is bad input: exit 2 with one line
    naming the flag, before the fit (which saves law/fit-<version>.json) is made."""
    from law_lineage import write_lineage

    from raypath.cli import main

    run_dir, _ = write_lineage(tmp_path, 2)
    (tmp_path / "a-file").write_text("")
    for plot, says in ((tmp_path, "is a directory; expected a file path such as"),
                       (tmp_path / "a-file" / "pred.png", "is a file, not a directory")):
        assert main(["law", "predict", str(run_dir), "--version", "v2", "--plot", str(plot)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"raypath: error: law predict: --plot {plot}: "), err
        assert says in err and "Traceback" not in err
        assert not (run_dir / "law").exists()


def test_law_commands_name_a_listed_version_not_trained_yet(tmp_path, capsys):
    """A run interrupted before v2's main segment lists v2 but has not trained it: ``--version v2``
    is refused naming the version and what is trained, not as a "split" with no segment."""
    from law_lineage import write_lineage

    from raypath.cli import main

    run_dir, lineage = write_lineage(tmp_path, 2)
    lineage["main_path"] = [m for m in lineage["main_path"] if m["version"] == "v1"]
    lineage["branches"] = [b for b in lineage["branches"] if b["version"] == "v1"]
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    for command in ("fit", "predict"):
        assert main(["law", command, str(run_dir), "--version", "v2"]) == 2
        assert capsys.readouterr().err == (f"raypath: error: law {command}: version 'v2': no main-path segment "
                                           "in the lineage (trained: v1)\n")
    assert not (run_dir / "law").exists()


def test_law_predict_predicts_from_the_fit_law_fit_saved_while_it_holds(tmp_path, capsys):
    """``law predict`` with ``law fit``'s options on the same curves re-reads its
    ``law/fit-<version>.json`` (the numbers ``law fit`` printed; no refit), and fits again, saving,
    when the options differ or a curve changed since."""
    from law_lineage import write_lineage

    from raypath.cli import main

    run_dir, _ = write_lineage(tmp_path, 2)
    fit = ["--lambda", "0.99", "--shifts", "single"]
    assert main(["law", "fit", str(run_dir), *fit]) == 0
    saved = run_dir / "law" / "fit-v2.json"
    rec = json.loads(saved.read_text())
    assert rec["huber_delta"] is None and rec["lam"] == 0.99
    rec["splits"]["v2"]["params"]["L0"] += 1.0  # marks the saved fit: a prediction from it is 1 higher
    saved.write_text(json.dumps(rec))
    capsys.readouterr()

    def predicted(*extra: str) -> float:
        assert main(["law", "predict", str(run_dir), "--version", "v2", *extra]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("  val/v2: predicted "))
        return float(line.split()[2])

    reused = predicted(*fit)
    assert json.loads(saved.read_text()) == rec  # read, not rewritten
    refit = predicted("--lambda", "0.99", "--shifts", "single", "--huber-delta", "0.001")  # other options
    assert reused - refit == pytest.approx(1.0, abs=0.05)
    assert json.loads(saved.read_text())["huber_delta"] == 0.001
    rec = json.loads(saved.read_text())
    rec["splits"]["v2"]["params"]["L0"] += 1.0
    saved.write_text(json.dumps(rec))
    curve = run_dir / "curves" / "branch-v2.jsonl"
    rows = curve.read_text().splitlines()
    curve.write_text("\n".join(rows[:-2]) + "\n")  # a curve that changed since the fit: fit again
    assert predicted("--lambda", "0.99", "--shifts", "single", "--huber-delta", "0.001") < refit + 0.5


class _LinearGuide:
    """Predicts an objective falling linearly by 0.1 over the branch."""

    def predict_objective(self, config, steps, fork_step, branch_steps):
        return np.array([4.0 - 0.1 * (s - fork_step) / branch_steps for s in steps])

    def refit_if_stale(self, later=False):
        pass


def test_stopper_stops_hopeless_and_keeps_promising():
    stopper = lawguide.LawStopper(_LinearGuide(), margin=0.005, min_progress=0.25)
    cfg = {"shape": "cosine", "min_lr_ratio": 0.0, "fork_step": 100, "branch_steps": 40}
    res = lambda step, obj: {"step": step, "objective": obj, "fork_step": 100, "branch_steps": 40,  # noqa: E731
                             "config": cfg}
    assert not stopper("early", res(120, 9.0))  # no finished trial yet: nothing to beat
    assert not stopper("done", res(140, 3.90))  # a finished trial sets the bar
    assert stopper.best() == pytest.approx(3.90)
    assert not stopper("hopeless", res(105, 4.5))  # too early in its decay to judge
    assert stopper("hopeless", res(120, 4.20))  # forecast 4.15 > 3.90 * 1.005
    assert stopper.decisions["hopeless"]["forecast"] == pytest.approx(4.15)
    assert not stopper("promising", res(120, 3.93))  # forecast 3.88 beats it
    assert not stopper("last-steps", res(139, 4.20))  # hopeless, but one step from its end: let it finish
    assert stopper("last-steps", res(137, 4.20))
    assert not stopper("no-objective", {"step": 120, "fork_step": 100, "branch_steps": 40, "config": cfg})
    told = lawguide.LawStopper(_LinearGuide(), best_so_far_fn=lambda: 4.5)
    assert not told("t", res(120, 4.20))


def test_stopper_records_its_stops_and_learns_configs_at_trial_start(tmp_path):
    """What the sweep wires up: Tune's results carry no config, so the refit callback
    registers each trial's config when it starts; stops land in a JSON file."""
    record = tmp_path / "stopped.json"
    stopper = lawguide.LawStopper(_LinearGuide(), margin=0.005, min_progress=0.25, record_path=str(record))
    callback = lawguide.LawRefitCallback(_LinearGuide(), curve_path=str, stopper=stopper)
    cfg = {"shape": "cosine", "min_lr_ratio": 0.0, "fork_step": 100, "branch_steps": 40}

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.config = trial_id, cfg

    for tid in ("done", "hopeless"):
        callback.on_trial_start(0, [], Trial(tid))
    res = lambda step, obj: {"step": step, "objective": obj, "fork_step": 100, "branch_steps": 40}  # noqa: E731
    assert not stopper("done", res(140, 3.90))
    assert not record.exists()
    assert stopper("hopeless", res(120, 4.20))
    saved = json.loads(record.read_text())
    assert list(saved) == ["hopeless"] and saved["hopeless"]["forecast"] == pytest.approx(4.15)


def test_guide_points_keep_to_the_sweeps_shapes(law_run):
    # polynomial of power 1 is the linear decay; a sweep without "linear" must still be offered
    # a polynomial point, or Optuna refuses it (suggest_categorical: 'linear' not in choices)
    run_dir, lineage = law_run
    m = next(m for m in lineage["main_path"] if m["version"] == "v3")
    guide = lawguide.LawGuide(run_dir, "v3", weights={"old": 0.5, "new": 0.5}, forks=[m["fork_step"]], save=False)
    points = guide.points_to_evaluate(6, fraction=(0.05, 0.5), shapes=["polynomial"], power=(1.0, 4.0),
                                      min_lr_ratio=(0.0, 0.1), replay_ratio=0.0)
    assert {p["shape"] for p in points} == {"polynomial"} and 1.0 in {p["power"] for p in points}
    assert all(1.0 <= p["power"] <= 4.0 for p in points)


def test_guide_points_refit_and_stopper(law_run, tmp_path):
    run_dir, lineage = law_run
    m = next(m for m in lineage["main_path"] if m["version"] == "v3")
    guide = lawguide.LawGuide(run_dir, "v3", weights={"old": 0.5, "new": 0.5}, forks=[m["fork_step"]], save=False)
    points = guide.points_to_evaluate(3, fraction=(0.05, 0.5), min_lr_ratio=(0.0, 0.1), replay_ratio=0.0)
    assert len(points) == 3 and all(p["replay_ratio"] == 0.0 for p in points)
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 3
    # a finished "trial": the release branch's curve under a trial's name
    b = next(b for b in lineage["branches"] if b["version"] == "v3")
    # the release branch counts as measured: the first trial goes to the other end of the LR range
    assert b["decay"] in guide.observed_decays()
    measured = min((0.0, 0.1), key=lambda e: abs(e - b["decay"]["min_lr_ratio"]))
    assert points[0]["min_lr_ratio"] != measured
    curve = tmp_path / "branch-v3-t1.jsonl"
    shutil.copy(run_dir / "curves" / f"{b['name']}.jsonl", curve)
    config = {"shape": b["decay"]["shape"], "min_lr_ratio": b["decay"]["min_lr_ratio"], "power": None,
              "fork_step": b["fork_step"], "branch_steps": b["steps"]}
    n_before = guide.fits["v3"].n_points
    stopper = lawguide.LawStopper(guide)
    callback = lawguide.LawRefitCallback(guide, curve_path=lambda tid: str(curve), name=lambda tid: f"t-{tid}",
                                         stopper=stopper)

    class Trial:
        trial_id = "t1"
        last_result = {"step": b["fork_step"] + b["steps"], "objective": 4.0}

    Trial.config = config
    guide.add_trial("t-0", config, curve, refit=False)
    callback.on_trial_complete(0, [], Trial())
    assert guide.wait(120) and guide.fits["v3"].n_points > n_before and stopper.best() == 4.0
    # two trials since the first choice (at none): the laws were chosen again
    assert guide.selected_at == 2 and any(f.held_out for f in guide.fits.values())
    forecast = stopper.forecast(config, b["fork_step"] + b["steps"] // 2, 4.2)
    assert math.isfinite(forecast) and forecast <= 4.2 + 1e-3
    # the trial's predicted curve is computed once per fit, then looked up: the same values as
    # predicting those steps alone, and a pickled guide (a restored sweep) keeps working
    mid, end = b["fork_step"] + b["steps"] // 3, b["fork_step"] + b["steps"]
    assert len(guide._forecasts) == 1
    direct = guide._objective(decay_from(config), b["fork_step"], np.array([mid, end]), b["steps"])
    assert np.array_equal(guide.predict_objective(config, [mid, end]), direct) and len(guide._forecasts) == 1
    assert np.array_equal(pickle.loads(pickle.dumps(guide)).predict_objective(config, [mid, end]), direct)
    # a third trial refits the chosen forms with the chosen lambda, without choosing again
    chosen = {split: (f.law, f.lam, f.n_points) for split, f in guide.fits.items()}
    Trial.trial_id = "t2"
    callback.on_trial_complete(0, [], Trial())
    callback.on_experiment_end([])  # waits for the refit
    assert guide.selected_at == 2 and not any(f.held_out for f in guide.fits.values())
    for split, (name, lam, n) in chosen.items():
        assert (guide.fits[split].law, guide.fits[split].lam) == (name, lam) and guide.fits[split].n_points > n
        assert guide.fits[split].n_starts == 1  # polished from the split's last fit, not the grid


def test_spread_picks_cover_both_lr_ends_and_several_shapes():
    # The ranking a first fit on decay-to-zero release branches gives: steep decays to 0 on top.
    ranked = [{"shape": s, "min_lr_ratio": m, "fraction": f}
              for m in (0.0, 0.3) for s in ("polynomial", "exponential", "cosine") for f in (0.2, 0.3)]
    picks = lawguide.spread_picks(ranked, 4)
    assert picks[0] is ranked[0]  # the law's favourite comes first
    assert [p["min_lr_ratio"] for p in picks] == [0.0, 0.3, 0.0, 0.3]
    assert len({p["shape"] for p in picks}) == 3
    # within a group the law's order decides: the best 0.3 candidate of a new shape
    assert picks[1] is next(c for c in ranked if c["min_lr_ratio"] == 0.3 and c["shape"] != "polynomial")
    assert lawguide.spread_picks(ranked, 2) == picks[:2] and len(lawguide.spread_picks(ranked[:2], 5)) == 2
    # A release branch already measured a polynomial decay to (nearly) 0: the first trial keeps its
    # shape and explores the other end of the LR range, the next ones try shapes neither has tried.
    seen = lawguide.spread_picks(ranked, 3, observed=[{"shape": "polynomial", "min_lr_ratio": 0.02}])
    assert seen[0] is next(c for c in ranked if c["min_lr_ratio"] == 0.3 and c["shape"] == "polynomial")
    assert seen[1] is next(c for c in ranked if c["min_lr_ratio"] == 0.0 and c["shape"] != "polynomial")
    assert seen[2] is next(c for c in ranked if c["min_lr_ratio"] == 0.3
                           and c["shape"] not in ("polynomial", seen[1]["shape"]))
    # an observed shape the ranking does not offer (outside the sweep's shapes) binds nothing
    other = lawguide.spread_picks(ranked, 1, observed=[{"shape": "linear", "min_lr_ratio": 0.0}])
    assert other[0] is next(c for c in ranked if c["min_lr_ratio"] == 0.3)


def test_lineage_branches_without_sweeps_drop_released_sweep_winners():
    decay = {"shape": "cosine", "min_lr_ratio": 0.1, "power": 2.0}
    trial = {"trial_id": "t1", "name": "branch-v2-t1", "status": "done", "curve": "t1.jsonl",
             "config": {"fork_step": 40, "branch_steps": 10, **decay}}
    lineage = {
        "branches": [{"name": "branch-v2", "version": "v2", "status": "done", "sweep": None},
                     # a sweep's winner, released in the configured branch's place
                     {"name": "branch-v2-t0", "version": "v2", "status": "done", "sweep": "sweeps/v2/s"}],
        "sweeps": [{"name": "s", "version": "v2", "trials": [trial]}],
    }
    names = lambda **kw: [b.name for b in lawfit.lineage_branches(lineage, **kw)]  # noqa: E731
    assert names() == ["branch-v2", "branch-v2-t0", "branch-v2-t1"]
    assert names(include_sweeps=False) == ["branch-v2"]


# ------------------------------------------------------------------- the sweep's score, resumes, unfitted splits

def _synthetic_run(root: Path, *, branches: tuple[str, ...] = ("branch-v2",), v2_evals: bool = True) -> Path:
    """A 2-version synthetic lineage (``law_lineage``) with only ``branches`` (by default v2's
    release branch: a law fitted in a second; every branch's curve is kept in ``curves/``);
    without ``v2_evals`` v2's split is evaluated only at the version's end, as with
    ``train.eval_every: 0``: too few points to fit a law on."""
    from law_lineage import write_lineage

    run_dir, lineage = write_lineage(root, 2)
    lineage["branches"] = [b for b in lineage["branches"] if b["name"] in branches]
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    for curve in [] if v2_evals else (run_dir / "curves").glob("*.jsonl"):
        rows = [json.loads(line) for line in curve.read_text().splitlines() if line]
        for r in rows:
            if r["step"] % 200:
                r.pop("val/v2", None)
        curve.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_law_predict_without_a_law_for_a_weighted_split_is_refused(tmp_path, capsys):
    """v2 is evaluated only at its end (train.eval_every: 0): no law for its split, so the
    objective would be NaN. ``law predict`` says which split and why, exit 2, instead of printing
    ``objective: nan`` and succeeding; weighing only v1, it predicts."""
    from raypath.cli import main

    run_dir = _synthetic_run(tmp_path, v2_evals=False)
    fit = ["--version", "v2", "--lambda", "0.99", "--shifts", "single"]
    assert main(["law", "predict", str(run_dir), *fit]) == 2
    out, err = capsys.readouterr()
    assert "objective" not in out and err.count("\n") == 1
    assert err.startswith("raypath: error: law predict: the objective weighs split(s) the law cannot be fitted "
                          "on (v2 has 2 observed points; a fit needs 4"), err
    assert main(["law", "predict", str(run_dir), *fit, "--w-new", "0", "--w-old", "1"]) == 0
    out = capsys.readouterr().out
    assert "objective (v1 1, v2 0): " in out and "nan" not in out


def test_law_fit_without_a_fittable_split_is_one_error_line(tmp_path, capsys):
    """Every split evaluated only at the versions' ends: the table says why per split, then one
    error line, exit 2, and no `fit:` file offered."""
    from raypath.cli import main

    run_dir = _synthetic_run(tmp_path, v2_evals=False)
    for curve in (run_dir / "curves").glob("*.jsonl"):
        rows = [json.loads(line) for line in curve.read_text().splitlines() if line]
        rows = [{k: v for k, v in r.items() if not (k == "val/v1" and r["step"] % 200)} for r in rows]
        curve.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["law", "fit", str(run_dir), "--version", "v2", "--lambda", "0.99", "--shifts", "single"]) == 2
    out, err = capsys.readouterr()
    assert "not fitted" in out and "fit: " not in out and err.count("\n") == 1
    assert err.startswith("raypath: error: law fit: no split of v2 has the 4 observed points a fit needs"), err


class _PenalisedGuide(_LinearGuide):
    """The sweep's compute penalty 0.1 on a 1000-step version."""

    @staticmethod
    def penalty(branch_steps):
        return 0.1 * branch_steps / 1000


def test_stopper_compares_scores_with_the_compute_penalty():
    """Optuna and the release pick by score = objective + penalty: a short trial that would win on
    score runs on though its objective forecast is worse, a long one that cannot is stopped."""
    stopper = lawguide.LawStopper(_PenalisedGuide(), margin=0.01, min_progress=0.25)
    cfg = {"shape": "cosine", "min_lr_ratio": 0.0}
    res = lambda step, obj, fork, steps: {"step": step, "objective": obj, "fork_step": fork,  # noqa: E731
                                          "branch_steps": steps, "config": cfg}
    assert not stopper("long", res(1000, 3.90, 600, 400))  # finished: score 3.90 + 0.04
    assert stopper.best() == pytest.approx(3.94)
    # forecast objective 3.95 > 3.90 * 1.01, but score 3.955 beats 3.94 * 1.01
    assert not stopper("short", res(965, 4.02, 950, 50))
    assert stopper.decisions["short"]["forecast"] == pytest.approx(3.95)
    assert stopper.decisions["short"]["forecast_score"] == pytest.approx(3.955)
    # forecast objective 3.935 < 3.90 * 1.01, but score 3.985 > 3.94 * 1.01
    assert stopper("longer", res(650, 4.005, 500, 500))


def test_guide_ranks_candidates_by_score(tmp_path):
    run_dir = _synthetic_run(tmp_path)
    forks = list(range(220, 400, 20))
    plain = lawguide.LawGuide(run_dir, "v2", forks=forks, save=False)
    penalised = lawguide.LawGuide(run_dir, "v2", forks=forks, save=False, penalty=lambda steps: steps / 200)
    grid = lawguide.default_grid(n_fractions=5, shapes=("cosine",), min_lr_ratio=(0.0,))
    by_objective, by_score = plain.rank(grid), penalised.rank(grid)
    assert [c["score"] for c in by_objective] == [c["objective"] for c in by_objective]
    assert all(c["score"] == pytest.approx(c["objective"] + c["branch_steps"] / 200) for c in by_score)
    assert [c["score"] for c in by_score] == sorted(c["score"] for c in by_score)
    # the law favours long decays (0.06 per 20 steps); a penalty of 0.1 per 20 steps favours short ones
    steps = sorted(c["branch_steps"] for c in by_score)
    assert [c["branch_steps"] for c in by_objective] == steps[::-1] and [c["branch_steps"] for c in by_score] == steps


def test_guide_ranks_decays_of_a_version_without_a_branch_by_the_gain_of_earlier_ones(tmp_path, caplog):
    """v2's release branch has not finished (the sweep is what releases it): no curve decays after
    the switch, C2 sits at its bound, and a ranking with it credits no decay (the shortest branch
    with the highest floor first). The guide takes v1's decay gain (C1) for it, and ranks as the fit
    with v2's branch does; with no branch at all it refuses to rank."""
    grid = lawguide.default_grid((0.05, 0.5), 4, ["cosine", "1-sqrt"], None, [0.0, 0.1])
    seen = lawguide.LawGuide(_synthetic_run(tmp_path / "a"), "v2", save=False)
    before = lawguide.LawGuide(_synthetic_run(tmp_path / "b", branches=("branch-v1",)), "v2", save=False)
    assert "C2" in before.fits["v1"].degenerate and "C1" not in before.fits["v1"].degenerate
    blind = lawguide.rank_candidates(before.fits, before.lineage, "v2", grid, before.weights)
    with caplog.at_level(logging.INFO, logger="raypath.lawguide"):
        before.check_ranking()
        ranked = before.rank(grid)
    assert "v1: no decay of v2's phase seen yet; its gain C2 taken as C1's" in caplog.text
    key = lambda c: (c["shape"], round(c["fraction_actual"], 3), c["min_lr_ratio"])  # noqa: E731
    assert [key(c) for c in ranked[:3]] == [key(c) for c in seen.rank(grid)[:3]]
    assert key(ranked[0]) == ("1-sqrt", 0.5, 0.0) and key(blind[0])[1] == 0.05  # what the prior spares the sweep
    nothing = lawguide.LawGuide(_synthetic_run(tmp_path / "c", branches=()), "v2", save=False)
    nothing.check_objective()  # the objective itself is predicted
    with pytest.raises(lawguide.UnidentifiedDecay, match=r"no decay to learn its gain from \(v1, v2: C1, C2 not "):
        nothing.points_to_evaluate(2)


def test_guide_without_a_law_for_a_weighted_split_neither_ranks_nor_stops(tmp_path):
    """v2 is evaluated only at its end (train.eval_every: 0): the fit skips its split, so the law
    cannot predict the objective. The guide says which split and why instead of ranking NaNs
    (shortest branch first), and the stopper stops nothing on a forecast of v1 alone."""
    guide = lawguide.LawGuide(_synthetic_run(tmp_path, v2_evals=False), "v2", save=False)
    assert set(guide.fits) == {"v1"} and guide.unfitted() == {"v2": 2}
    with pytest.raises(ValueError, match=r"v2 has 2 observed points; a fit needs 4"):
        guide.check_objective()
    with pytest.raises(ValueError, match="cannot predict the objective"):
        guide.points_to_evaluate(2)
    config = {"shape": "cosine", "min_lr_ratio": 0.0, "fork_step": 300, "branch_steps": 100}
    assert np.isnan(guide.predict_objective(config, [350, 400])).all()
    stopper = lawguide.LawStopper(guide, record_path=tmp_path / "stopped.json")
    stopper.record_final("done", 2.0)
    assert not stopper("hopeless", {"step": 350, "objective": 9.0, "config": config})
    assert stopper.decisions == {} and not (tmp_path / "stopped.json").exists()


def test_the_refit_callback_returns_at_once_and_trials_finished_meanwhile_are_fitted_together(tmp_path, monkeypatch):
    """Tune's loop calls the callback: a refit (seconds to a minute on a long lineage) runs in a
    background thread, the stopper forecasting with the fits before it until it lands; the trials
    that finish during a refit are fitted together by one more, and the experiment's end waits
    for it. A guide pickled meanwhile (Tune pickles it) leaves its thread and locks out."""
    import threading

    run_dir = _synthetic_run(tmp_path, branches=())
    guide = lawguide.LawGuide(run_dir, "v2", save=False)
    stopper = lawguide.LawStopper(guide, margin=0.01)
    config = {"shape": "1-sqrt", "min_lr_ratio": 0.0, "power": 2.0, "fork_step": 360, "branch_steps": 40}
    curves = {}
    for tid in ("a", "b", "c"):
        curves[tid] = tmp_path / f"trial-{tid}.jsonl"
        shutil.copy(run_dir / "curves" / "branch-v2.jsonl", curves[tid])
    callback = lawguide.LawRefitCallback(guide, curve_path=lambda tid: str(curves[tid]), stopper=stopper)
    release, entered, fitted = threading.Event(), threading.Event(), []
    fit_run = lawguide.fit_run

    def held_fit(*args, **kwargs):  # the real fit, once the test lets it run
        entered.set()
        assert release.wait(60)
        fitted.append(sorted(b.name for b in kwargs["extra_branches"]))
        return fit_run(*args, **kwargs)

    monkeypatch.setattr(lawguide, "fit_run", held_fit)

    class Trial:
        def __init__(self, tid):
            self.trial_id, self.config = tid, config
            self.last_result = {"step": 400, "objective": 3.0}

    before = guide.fits
    forecast = stopper.forecast(config, 380, 3.1)
    callback.on_trial_complete(0, [], Trial("a"))
    assert entered.wait(60) and guide.fits is before  # returned while the refit is held
    assert stopper.forecast(config, 380, 3.1) == forecast  # with the fits it had
    callback.on_trial_complete(0, [], Trial("b"))  # finished during the refit
    callback.on_trial_complete(0, [], Trial("c"))
    restored = pickle.loads(pickle.dumps(guide))  # as Tune pickles it: no thread, no lock
    assert restored.fits.keys() == guide.fits.keys() and restored.wait(0)
    assert not guide.wait(0.2)
    release.set()
    callback.on_experiment_end([])
    assert fitted == [["trial-a"], ["trial-a", "trial-b", "trial-c"]]  # one refit more for b and c
    assert guide.fits is not before and guide.fits["v2"].n_points > before["v2"].n_points
    assert guide._refitter is None and not guide._forecasts


def test_a_refit_from_the_last_fit_predicts_as_the_grid_does_for_a_fraction_of_the_evaluations(tmp_path,
                                                                                                monkeypatch):
    """A sweep's refit between re-selections adds a trial's curve to the same forms and lambda: it
    polishes from the last fit's parameters instead of screening the whole grid of starts."""
    from law_lineage import write_lineage

    from raypath import law as lawmod

    run_dir, lineage = write_lineage(tmp_path, 3)
    b = next(b for b in lineage["branches"] if b["name"] == "branch-v3")
    config = {"shape": b["decay"]["shape"], "min_lr_ratio": b["decay"]["min_lr_ratio"],
              "fork_step": b["fork_step"], "branch_steps": b["steps"]}
    curve = tmp_path / "trial.jsonl"
    shutil.copy(run_dir / "curves" / "branch-v3.jsonl", curve)
    first = lawfit.fit_run(run_dir, "v3", lam=0.99, shifts="single", save=False)
    trial = [lawfit.trial_branch("trial", "v3", config, str(curve))]
    keep = {"lam": 0.99, "forms": {s: f.law for s, f in first.items()}, "extra_branches": trial, "save": False}
    evaluations, minimize = [], lawmod.minimize

    def counted(*args, **kwargs):
        res = minimize(*args, **kwargs)
        evaluations.append(res.nfev)
        return res

    monkeypatch.setattr(lawmod, "minimize", counted)
    grid = lawfit.fit_run(run_dir, "v3", **keep)
    from_grid = sum(evaluations)
    evaluations.clear()
    warm = lawfit.fit_run(run_dir, "v3", **keep, starts={s: f.params for s, f in first.items()})
    assert sum(evaluations) * 5 < from_grid and len(evaluations) == len(first)  # one start a split
    decay, fork, steps = decay_from(config), b["fork_step"], np.array([b["fork_step"] + b["steps"]])
    for split in first:
        assert warm[split].n_points == grid[split].n_points > first[split].n_points
        assert warm[split].huber <= grid[split].huber * 1.01
    want = lawfit.predict_curve(grid, run_dir, "v3", decay, fork, steps, branch_steps=b["steps"])
    got = lawfit.predict_curve(warm, run_dir, "v3", decay, fork, steps, branch_steps=b["steps"])
    assert all(np.allclose(got[s], want[s], rtol=1e-3) for s in want), (got, want)


def test_a_restored_stopper_keeps_earlier_stops_and_learns_the_finished_trials(tmp_path):
    """Ray writes tuner.pkl once, when the Tuner is built: Tuner.restore brings the guide, stopper
    and refit callback back as constructed. The callback hands them the trials that finished
    before; the stopper keeps the stops recorded before it in its file."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.experiment import Trial

    run_dir = _synthetic_run(tmp_path, branches=())  # one branch per split with the trial's: no lambda to choose
    guide = lawguide.LawGuide(run_dir, "v2", save=False)
    record = tmp_path / "stopped.json"
    stopper = lawguide.LawStopper(guide, margin=0.01, record_path=record)
    curve = tmp_path / "trial-done.jsonl"
    shutil.copy(run_dir / "curves" / "branch-v2.jsonl", curve)
    callback = lawguide.LawRefitCallback(guide, curve_path=lambda tid: str(curve), stopper=stopper)
    at_start = cloudpickle.dumps((stopper, callback))  # what tuner.pkl holds

    config = {"shape": "1-sqrt", "min_lr_ratio": 0.0, "power": 2.0, "fork_step": 360, "branch_steps": 40}
    final = json.loads(curve.read_text().splitlines()[-1])
    objective = 0.5 * final["val/v1"] + 0.5 * final["val/v2"]

    def trial(trial_id: str, status: str, step: int) -> Trial:
        t = Trial("branch", config=config, trial_id=trial_id, stub=True)
        t.set_status(status)
        t.update_last_result({"step": step, "objective": objective})
        return t

    hopeless = lambda step: {"step": step, "objective": objective + 1.0, "config": config}  # noqa: E731
    callback.on_trial_complete(0, [], trial("done", Trial.TERMINATED, 400))
    assert stopper("early", hopeless(380))
    assert list(json.loads(record.read_text())) == ["early"]

    stopper, callback = cloudpickle.loads(at_start)  # the driver died; the sweep is run again
    assert stopper.best() is None and not stopper.guide.trials
    trials = [trial("done", Trial.TERMINATED, 400), trial("early", Trial.TERMINATED, 380),
              trial("late", Trial.RUNNING, 372)]
    callback.on_step_begin(0, trials)
    assert stopper.best() == pytest.approx(objective)
    assert [t.name for t in stopper.guide.trials] == ["trial-done"]  # not the stopped one's partial decay
    points = stopper.guide.fits["v2"].n_points
    assert stopper("late", hopeless(380))  # the first forecast refits on the finished trial
    assert stopper.guide.fits["v2"].n_points > points
    assert list(json.loads(record.read_text())) == ["early", "late"]


def test_cli_law_predict_scores_with_the_runs_objective_weights(tmp_path, capsys):
    """Unset, ``--w-old``/``--w-new`` are the run's ``sweep.weights``, as its releases are scored:
    the objective printed is the one a sweep or a release decision would compare."""
    from raypath.cli import main

    run_dir = _synthetic_run(tmp_path)
    lineage = json.loads((run_dir / "lineage.json").read_text())
    lineage["config"]["sweep"] = {"weights": {"old": 0.0, "new": 1.0}}
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    fit = ["--version", "v2", "--lambda", "0.99", "--shifts", "single"]
    assert main(["law", "predict", str(run_dir), *fit]) == 0
    assert "objective (v1 0, v2 1):" in capsys.readouterr().out
    assert main(["law", "predict", str(run_dir), *fit, "--w-old", "1"]) == 0  # a flag overrides its own weight
    assert "objective (v1 0.5, v2 0.5):" in capsys.readouterr().out
    del lineage["config"]["sweep"]  # a run that recorded none: the config's default
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    assert main(["law", "predict", str(run_dir), *fit]) == 0
    assert "objective (v1 0.5, v2 0.5):" in capsys.readouterr().out


# ------------------------------------------------------------------- a long lineage's curve reads

def test_a_fit_reads_each_curve_once_for_all_its_splits(tmp_path, monkeypatch):
    """A lineage of n versions has n splits to fit, every curve recording each split it saw: the
    fit (and the prediction plot) read a curve once, not once per split, whatever the cache of
    parsed curves holds (here none, as past its size on a run of many sweeps' trials)."""
    from law_lineage import write_lineage

    from raypath.report import plot_prediction

    run_dir, _ = write_lineage(tmp_path, 4)
    curves = sorted(str(p) for p in (run_dir / "curves").glob("*.jsonl"))
    parsed, parse = [], lawfit._eval_records.__wrapped__

    def uncached(path, mtime_ns, size):
        parsed.append(path)
        return parse(path, mtime_ns, size)

    monkeypatch.setattr(lawfit, "_eval_records", uncached)
    fits = lawfit.fit_run(run_dir, "v4", lam=0.99, shifts="single", save=False)
    assert sorted(fits) == ["v1", "v2", "v3", "v4"]
    assert sorted(parsed) == curves  # 12 curves; 4 splits read them 48 times before
    parsed.clear()
    p = lawfit.predict_branch(fits, run_dir, "v4")
    plot_prediction(run_dir, run_dir, fits, "v4", p, tmp_path / "prediction.png")
    assert sorted(parsed) == curves


def test_a_law_fit_logs_its_progress(tmp_path, monkeypatch, caplog):
    """A cold fit of a long lineage reads thousands of sweep trials' curves and fits one law per
    version: minutes, so it says how far it got (every 30 s; here at every step)."""
    import re

    from law_lineage import write_lineage

    from raypath import console

    run_dir, _ = write_lineage(tmp_path, 3)
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="raypath")
    lawfit.fit_run(run_dir, "v3", lam=0.99, shifts="single", save=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"reading the branches' curves up to v3: \d+ of \d+ branches \(\d+%\), .*, ETA ", ln)
               for ln in lines), lines
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("fitting the law")] == [
        "fitting the law of v3: 1 of 3 splits", "fitting the law of v3: 2 of 3 splits"], lines


def _warns(x: int) -> int:
    logging.getLogger("raypath.law").warning("fit %s warned", x)
    return x * x


def test_a_large_fit_spreads_its_splits_and_lambda_folds_over_processes_with_the_same_results(
        tmp_path, monkeypatch, caplog):
    """A cold fit costs versions^2 x trials (minutes on a long lineage); its independent fits (each
    lambda's folds, then each split) run in a process per core, to the same parameters bit for
    bit, and what the workers log reaches this process's console."""
    from law_lineage import write_lineage

    from raypath import law

    run_dir, _ = write_lineage(tmp_path, 2)
    caplog.set_level(logging.WARNING, logger="raypath")
    here = lawfit.fit_run(run_dir, "v2", lam="auto", shifts="single", save=False)
    warned_here = sorted(r.getMessage() for r in caplog.records)
    caplog.clear()
    law._Worker.close_idle()
    workers, start = [], law._Worker.__init__

    def counted(self):
        workers.append(self)
        start(self)

    monkeypatch.setattr(law._Worker, "__init__", counted)
    monkeypatch.setattr(law, "PARALLEL_POINTS", 0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    apart = lawfit.fit_run(run_dir, "v2", lam="auto", shifts="single", save=False)
    assert len(workers) == 2  # started for the lambda folds, used again for the splits
    assert {s: f.to_dict() for s, f in apart.items()} == {s: f.to_dict() for s, f in here.items()}
    assert sorted(r.getMessage() for r in caplog.records) == warned_here  # the workers' warnings, relayed
    caplog.clear()
    assert law.in_processes(_warns, [(2,), (3,)], points=1) == [4, 9]
    assert sorted(r.getMessage() for r in caplog.records) == ["fit 2 warned", "fit 3 warned"]
    with pytest.raises(TypeError, match="can't multiply sequence"):  # a worker's error is raised here
        law.in_processes(_warns, [(2,), ("x",)], points=1)
    assert len(workers) == 2 and all(w.proc.poll() is None for w in workers)  # the same two, still waiting
    law._Worker.close_idle()
    assert all(w.proc.returncode == 0 for w in workers)

    # Idle for longer than twice WORKER_REUSE_S, a worker exits by itself; the next fit starts others.
    monkeypatch.setattr(law, "WORKER_REUSE_S", 0.5)
    assert law.in_processes(_warns, [(2,), (3,)], points=1) == [4, 9]
    idle = workers[2:]
    assert len(idle) == 2 and all(w.proc.wait(timeout=30) == 0 for w in idle)  # no one closed them
    assert law.in_processes(_warns, [(2,), (3,)], points=1) == [4, 9] and len(workers) == 6
    law._Worker.close_idle()


def test_a_guides_refit_parses_only_the_curves_it_has_not_read(tmp_path, monkeypatch):
    """A sweep's guide refits after every finished trial on every curve of the run, which are
    finished: past the process-wide cache of parsed curves (a run of many sweeps' trials; here
    no cache at all) a refit parses only the new trial's curve, and the parsed curves stay out
    of the pickled guide (Tune's tuner.pkl)."""
    from law_lineage import write_lineage

    run_dir, lineage = write_lineage(tmp_path, 2)
    parsed, parse = [], lawfit._parse_records

    def counted(path):
        parsed.append(Path(path).name)
        return parse(path)

    monkeypatch.setattr(lawfit, "_parse_records", counted)
    monkeypatch.setattr(lawfit, "_eval_records", lambda path, mtime_ns, size: counted(path))  # no shared cache
    guide = lawguide.LawGuide(run_dir, "v2", save=False)
    assert sorted(parsed) == sorted(p.name for p in (run_dir / "curves").glob("*.jsonl"))  # 6: each once
    b = next(b for b in lineage["branches"] if b["name"] == "branch-v2")
    config = {"shape": b["decay"]["shape"], "min_lr_ratio": b["decay"]["min_lr_ratio"],
              "fork_step": b["fork_step"], "branch_steps": b["steps"]}
    before = {s: f.n_points for s, f in guide.fits.items()}
    for i in (1, 2):
        curve = tmp_path / f"branch-v2-t{i}.jsonl"
        shutil.copy(run_dir / "curves" / "branch-v2.jsonl", curve)
        parsed.clear()
        guide.add_trial(f"branch-v2-t{i}", config, curve)
        assert parsed == [curve.name]  # every curve of the run again before
    assert all(guide.fits[s].n_points > n for s, n in before.items())
    assert len(guide._records) == 8 and "_records" not in guide.__getstate__()
    restored = pickle.loads(pickle.dumps(guide))
    parsed.clear()
    restored.refit()
    assert len(parsed) == 8 and restored.fits["v2"].n_points == guide.fits["v2"].n_points


def test_a_branchs_curves_share_its_lr_history_across_splits(tmp_path):
    """A branch of version k observes k splits: an LR history per split's Curve made a fit's
    curves grow with versions² x trials x steps. The splits share the branch's one history."""
    from law_lineage import write_lineage

    run_dir, _ = write_lineage(tmp_path, 3)
    curves = lawfit.split_curves(run_dir, ["v1", "v2", "v3"], "v3")
    per_branch = {}
    for cs in curves.values():
        for c in cs:
            per_branch.setdefault(c.name, []).append(c.lrs)
    assert len(per_branch["branch-v3"]) == 3 and len(per_branch["branch-v2-alt"]) == 2
    branches = {name: histories for name, histories in per_branch.items() if name != "main"}
    assert all(h is histories[0] for histories in branches.values() for h in histories)
    assert not any(histories[0].tail.flags.writeable for histories in branches.values())
    # held from the fork on: a branch's history costs its steps, not the steps before its fork
    from raypath.lineage import Lineage

    fork = {b.name: b.fork_step for b in Lineage.load(run_dir).branches()}
    assert all(h[0].flat == fork[name] and len(h[0].tail) == len(h[0]) - fork[name] for name, h in branches.items())
    alone = lawfit.curves_from_lineage(run_dir, "v1", "v3")  # one split: the same observations
    assert [(c.name, len(c.steps)) for c in curves["v1"]] == [(c.name, len(c.steps)) for c in alone]


def test_a_curves_evaluation_records_are_the_steps_the_report_reads(tmp_path):
    """The law reads a curve's evaluations without a data frame, as the reports read it: a step a
    resumed segment logged again is its later record, restart markers and a torn last line are
    skipped, and only finite losses are kept."""
    import json

    from raypath.lawfit import _parse_records
    from raypath.report import read_curve

    lines = [{"step": 10, "val/v1": 3.0, "loss": 2.0}, {"event": "start", "step": 0},
             {"step": 20, "loss": 1.9}, {"step": 20, "val/v1": 2.9, "val/v2": float("nan")},
             {"step": 30, "val/v1": None, "val/v2": 4.0}, {"step": 10, "val/v1": 2.95, "loss": 2.1}]
    path = tmp_path / "branch-v2.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 40, "val/v1": 2.')
    got = _parse_records(str(path))
    assert got == [{"step": 10, "val/v1": 2.95}, {"step": 20, "val/v1": 2.9}, {"step": 30, "val/v2": 4.0}]
    frame = read_curve(path).set_index("step")
    assert all(frame.loc[r["step"], k] == v for r in got for k, v in r.items() if k != "step")
    assert _parse_records(str(tmp_path / "not-yet.jsonl")) == []


def test_the_prediction_plot_gives_a_branch_one_colour_in_every_panel(tmp_path, monkeypatch):
    """Each split's panel shows the branches trained since its data entered: a later split sees
    fewer, and branch-vK must keep the colour it has in the older splits' panels."""
    from law_lineage import write_lineage

    from raypath import report

    run_dir, _ = write_lineage(tmp_path, 4)
    fits = lawfit.fit_run(run_dir, "v4", lam=0.99, shifts="single", save=False)
    p = lawfit.predict_branch(fits, run_dir, "v4")
    figures, save = [], report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, out: (figures.append(fig), save(fig, out))[1])
    report.plot_prediction(run_dir, run_dir, fits, "v4", p, tmp_path / "prediction.png")
    colours: dict[str, set] = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            if line.get_label().endswith("(observed)") and not line.get_label().startswith("main"):
                colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert len(colours) >= 2
    assert {k: len(v) for k, v in colours.items()} == {k: 1 for k in colours}
