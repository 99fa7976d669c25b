"""Branch search: settings, fork snapping, and a real 4-trial Tune + Optuna sweep that is
interrupted, resumed without re-running finished trials, and released into the lineage."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raypath import checkpoint as ckpt
from raypath.cli import main
from raypath.config import ConfigError, SweepConfig, TrainConfig, load_config
from raypath.lineage import Lineage, MainEntry
from raypath.report import read_curve
from raypath.schedules import Branch, Decay, MainPath
from raypath.sweep import (SearchSpace, _settings_record, _start_or_check_record, choose_forks,
                           derive_max_concurrent, fork_points, make_sampler, objective_weights, optuna_study,
                           run_sweep, with_cli)
from raypath.storage import read_json, read_jsonl, write_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------- settings (no Ray)

def test_sweep_section_defaults_and_overrides():
    cfg = load_config(TINY, ["sweep.fraction=[0.1, 0.3]", "sweep.shapes=[cosine, 1-sqrt]",
                             "sweep.weights={old: 1, new: 3}", "sweep.replay_ratios=[0, 0.2]",
                             "train.num_workers=1"])
    sc = cfg.sweep
    assert cfg.train.num_workers == 1 and cfg.name == "tiny"
    assert sc.fraction == (0.1, 0.3) and sc.shapes == ["cosine", "1-sqrt"]
    assert sc.weights == {"old": 1.0, "new": 3.0} and sc.replay_ratios == [0.0, 0.2]
    default = load_config(TINY)
    assert default.sweep == SweepConfig() and default.sweep.guide == "law"
    assert with_cli(default, name="b", pin="01234567").sweep.pin == "01234567"  # a trial id stays a string
    with pytest.raises(ConfigError, match="sweep.name"):
        with_cli(default, name="a/b")
    for empty in ({"name": ""}, {"pin": ""}):  # refused, not read as "not given"
        with pytest.raises(ConfigError, match=f"command line: sweep.{next(iter(empty))}: must"):
            with_cli(default, **empty)


@pytest.mark.parametrize("override,field", [
    ("sweep.shapes=[cosin]", "sweep.shapes"),
    ("sweep.fraction=[0.5, 0.1]", "sweep.fraction"),
    ("sweep.fraction=[0, 0.2]", "sweep.fraction"),
    ("sweep.min_lr_ratio=[0, 1.0]", "sweep.min_lr_ratio"),
    ("sweep.num_samples=0", "sweep.num_samples"),
    ("sweep.weights={old: 1, young: 1}", "sweep.weights"),
    ("sweep.replay_ratios=[1.5]", "sweep.replay_ratios"),
    ("sweep.replay_ratios=[0.1, 0.1]", "sweep.replay_ratios"),
    ("sweep.replay_ratios=[low]", "sweep.replay_ratios[0]"),
    ("sweep.power=2", "sweep.power"),
    ("sweep.shapes=cosine", "sweep.shapes"),
    ("sweep.guide=oracle", "sweep.guide"),
    ("sweep.stop_margin=-0.1", "sweep.stop_margin"),
    ("sweep.keep_trials=-1", "sweep.keep_trials"),
    ("sweep.bogus=1", "sweep.bogus"),
    ("train.bogus=1", "train.bogus"),
])
def test_bad_sweep_settings_fail_before_training(override, field, tmp_path, capsys):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(TINY, [override])
    rc = main(["sweep", str(TINY), "--version", "v2", "--set", f"run_dir={tmp_path / 'r'}", "--set", override])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "tiny.yaml" in err
    assert not (tmp_path / "r").exists()


def test_resume_checks_settings_and_fills_in_ones_added_since(tmp_path):
    """A sweep recorded before a setting existed ran with its default; another value is refused."""
    record = {"version": "v2", "objective_weights": {"v1": 0.5, "v2": 0.5},
              "settings": _settings_record(SweepConfig(guide_sweeps=True))}
    old = dict(record, settings={k: v for k, v in record["settings"].items() if k != "guide_sweeps"})
    write_json(tmp_path / "sweep.json", old)
    assert _start_or_check_record(tmp_path, record)["settings"] == record["settings"]
    assert "guide_sweeps" not in read_json(tmp_path / "sweep.json")["settings"]  # the record is not rewritten
    other = dict(record, settings=_settings_record(SweepConfig(guide_sweeps=False)))
    with pytest.raises(ConfigError, match=r"different settings \(sweep.guide_sweeps: True then, False now\); "):
        _start_or_check_record(tmp_path, other)  # the field that differs, not both whole settings
    assert load_config(TINY, ["sweep.guide_sweeps=false"]).sweep.guide_sweeps is False


def test_objective_weights_mean_over_old_versions():
    versions = [f"v{i}" for i in (1, 2, 3)]
    assert objective_weights(versions, 2, {"old": 1, "new": 3}) == {"v1": 0.125, "v2": 0.125, "v3": 0.75}
    assert objective_weights(versions, 0, {"old": 1, "new": 3}) == {"v1": 1.0}  # first version: own loss only


def test_max_concurrent_follows_resources():
    t = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    assert derive_max_concurrent(t, 8, {"CPU": 8.0}) == 2  # (2 workers + 1 data CPU) per trial
    assert derive_max_concurrent(t, 1, {"CPU": 64.0}) == 1  # never more than the trials
    assert derive_max_concurrent(t, 8, {"CPU": 1.0}) == 1  # at least one
    g = TrainConfig(num_workers=2, use_gpu=True)
    assert derive_max_concurrent(g, 8, {"CPU": 64.0, "GPU": 4.0}) == 2


def _forks(end=100, start=0, steps=(20, 40, 60, 80, 90)):
    return [{"step": s, "fraction": (end - s) / (end - start), "path": ""} for s in steps]


def test_proposals_snap_to_the_nearest_fork_and_record_both():
    import optuna

    space = SearchSpace((0.05, 0.5), ["polynomial", "cosine"], (1.0, 4.0), (0.0, 0.1), [0.0],
                        _forks(), end_step=100, tokens_per_step=10)
    params = {"fraction": 0.27, "shape": "polynomial", "power": 2.5, "min_lr_ratio": 0.05, "replay_ratio": 0.0}
    out = space(optuna.trial.FixedTrial(params))
    assert out == {"fork_step": 80, "fraction_actual": 0.2, "branch_steps": 20, "branch_tokens": 200}
    # power is only searched where the shape reads it
    cos = space(optuna.trial.FixedTrial({**params, "shape": "cosine", "fraction": 0.36}))
    assert cos["fork_step"] == 60


def test_fork_choice_budget_range_and_single_fork_warning(caplog):
    main_entry = MainEntry(version="v2", start_step=0, end_step=100)
    sc = SweepConfig(fraction=(0.05, 0.5), token_budget=300)
    with caplog.at_level(logging.INFO, logger="raypath.sweep"):
        chosen = choose_forks(_forks(), main_entry, sc, tokens_per_step=10, version="v2")
    assert [f["step"] for f in chosen] == [80, 90]  # 60 would cost 400 > 300 tokens
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raypath.sweep"):
        one = choose_forks(_forks(steps=(80,)), main_entry, SweepConfig(), tokens_per_step=10, version="v2")
    assert len(one) == 1
    assert "only one fork point" in caplog.text and "train.checkpoint_every" in caplog.text
    with pytest.raises(ConfigError, match="token_budget"):
        choose_forks(_forks(), main_entry, SweepConfig(token_budget=5), tokens_per_step=10, version="v2")
    with pytest.raises(ConfigError, match="checkpoint_every"):
        choose_forks([], main_entry, SweepConfig(), tokens_per_step=10, version="v2")


def test_fork_choice_keeps_to_sweep_fraction_and_a_budget_is_inclusive(caplog):
    """Forks at fractions 0.8, 0.6, 0.4, 0.2, 0.1: the sweep's fraction range picks among them;
    a range that holds none falls back to all of them, with a warning; a branch that costs
    exactly the token budget is within it. A proposal halfway between two forks takes the
    shorter branch."""
    main_entry = MainEntry(version="v2", start_step=0, end_step=100)
    steps = lambda chosen: [f["step"] for f in chosen]  # noqa: E731
    assert steps(choose_forks(_forks(), main_entry, SweepConfig(fraction=(0.3, 0.65)), 10, "v2")) == [40, 60]
    with caplog.at_level(logging.WARNING, logger="raypath.sweep"):
        assert steps(choose_forks(_forks(), main_entry, SweepConfig(fraction=(0.65, 0.75)), 10, "v2")) == \
            [20, 40, 60, 80, 90]
    assert "no v2 checkpoint within sweep.fraction [0.65, 0.75]; snapping to the nearest of all 5" in caplog.text
    assert steps(choose_forks(_forks(), main_entry, SweepConfig(token_budget=200), 10, "v2")) == [80, 90]
    space = SearchSpace((0.05, 0.9), ["cosine"], (1.0, 4.0), (0.0, 0.1), [0.0], _forks(steps=(50, 75)), 100, 10)
    assert space.snap(0.375)["step"] == 75 and space.snap(0.4)["step"] == 50  # 0.375: exactly between 0.25 and 0.5


def test_fork_points_are_verified_checkpoints_inside_the_version(tmp_path):
    state = {"w": torch.zeros(2)}
    for step in (10, 14, 18, 22):
        ckpt.save(tmp_path / ckpt.step_dir_name(step), state, {}, {"step": step})
    (tmp_path / ckpt.step_dir_name(18) / "manifest.json").unlink()  # torn
    forks = fork_points(MainEntry(version="v1", start_step=10, end_step=22), tmp_path)
    assert [f["step"] for f in forks] == [14]  # not the start, not the boundary, not the torn one
    assert forks[0]["fraction"] == pytest.approx(8 / 12)
    # Complete is enough to be proposed (nothing hashed per sweep); the trial's load hashes it.
    weights = tmp_path / ckpt.step_dir_name(14) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(b ^ 0xFF for b in weights.read_bytes()[-4:]))
    assert [f["step"] for f in fork_points(MainEntry(version="v1", start_step=10, end_step=22), tmp_path)] == [14]
    with pytest.raises(ckpt.ChecksumError, match="model.pt does not match its checksum"):
        ckpt.load(tmp_path / ckpt.step_dir_name(14))


def _synthetic_sweep(tmp_path: Path, *, v2_evals: bool = True, branches=("branch-v2",), **settings):
    """What :func:`raypath.sweep.law_guidance` is given for a sweep of v2 of a synthetic 2-version
    lineage (``law_lineage``: written, not trained; v2's release branch only): (plan, settings,
    search space). Without ``v2_evals`` v2's split is evaluated only at its end, as with
    ``train.eval_every: 0``."""
    import json
    from types import SimpleNamespace

    from law_lineage import SEGMENT, write_lineage

    from raypath.sweep import SweepPlan

    run_dir, lineage = write_lineage(tmp_path, 2)
    lineage["branches"] = [b for b in lineage["branches"] if b["name"] in branches]
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    for curve in [] if v2_evals else (run_dir / "curves").glob("*.jsonl"):
        rows = [json.loads(line) for line in curve.read_text().splitlines() if line]
        curve.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val/v2" or r["step"] % SEGMENT == 0})
                                 + "\n" for r in rows))
    cfg, sc = load_config(TINY, [f"run_dir={run_dir}"]), SweepConfig(**settings)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    ctx = SimpleNamespace(cfg=cfg, run_dir=run_dir, versions=[{"name": "v1"}, {"name": "v2"}])  # a plan reads these
    main_entry = MainEntry(version="v2", start_step=SEGMENT, end_step=2 * SEGMENT)
    plan = SweepPlan(ctx, 1, main_entry, str(run_dir / "sweeps" / "v2" / sc.name),
                     objective_weights(["v1", "v2"], 1, sc.weights), sc.compute_penalty, SEGMENT * tokens_per_step)
    forks = _forks(2 * SEGMENT, SEGMENT, range(SEGMENT + 20, 2 * SEGMENT, 20))
    space = SearchSpace(sc.fraction, list(sc.shapes), sc.power, sc.min_lr_ratio, [0.0],
                        choose_forks(forks, main_entry, sc, tokens_per_step, "v2"), 2 * SEGMENT, tokens_per_step)
    return plan, sc, space


def test_the_law_guides_a_sweep_by_the_score_that_optuna_and_the_release_compare(tmp_path):
    """With a compute penalty the law ranks and stops by objective + penalty, the release's
    score: the first trials are the short branches the penalty favours, not the long decays the
    law predicts the lowest loss for."""
    from raypath import lawguide
    from raypath.releases import Objective
    from raypath.sweep import law_guidance

    plan, sc, space = _synthetic_sweep(tmp_path, compute_penalty=2.0, num_samples=8)
    guidance = law_guidance(plan, sc, space)
    assert len(guidance.points) == 4
    shortest = min(f["fraction"] for f in space.forks)
    assert {p["fraction"] for p in guidance.points} == {shortest}  # without the penalty: the longest
    metrics, steps = {"val/v1": 3.1, "val/v2": 2.9}, 40
    release = Objective(plan.weights, plan.compute_penalty, plan.version_tokens)
    assert lawguide.score(release.value(metrics), steps, guidance.stopper.penalty) == \
        pytest.approx(release.score(metrics, steps * plan.tokens_per_step))
    guidance.stopper.record_final("t", release.value(metrics), steps)
    assert guidance.stopper.best() == pytest.approx(release.score(metrics, steps * plan.tokens_per_step))


def test_law_guidance_runs_plain_tpe_when_a_weighted_split_has_no_law(tmp_path, caplog):
    """v2 evaluated only at its end (train.eval_every: 0): the fit skips its split, so the law
    predicts no objective. The sweep says which split and why and runs plain TPE, rather than
    enqueue a ranking of NaNs (the shortest branches first)."""
    from raypath.sweep import law_guidance

    plan, sc, space = _synthetic_sweep(tmp_path, v2_evals=False)
    with caplog.at_level(logging.WARNING, logger="raypath.sweep"):
        assert law_guidance(plan, sc, space) is None
    assert "running plain TPE" in caplog.text and "v2 has 2 observed points; a fit needs 4" in caplog.text


def test_law_guidance_leaves_the_first_trials_to_optuna_before_any_branch(tmp_path, caplog):
    """No branch has finished: the law predicts the objective but has seen no decay's gain, so it
    proposes no first trials (its ranking would start with the shortest, highest-floor branches);
    the stopper and the refits after each trial still use it."""
    from raypath.sweep import law_guidance

    plan, sc, space = _synthetic_sweep(tmp_path, branches=(), num_samples=8)
    with caplog.at_level(logging.WARNING, logger="raypath.sweep"):
        guidance = law_guidance(plan, sc, space)
    assert guidance.points == [] and guidance.stopper is not None and guidance.callback is not None
    assert "no decay to learn its gain from" in caplog.text and "the first trials are Optuna's own" in caplog.text


def test_the_study_lives_in_an_optuna_journal_that_a_restored_searcher_reopens(tmp_path, caplog):
    """Tune pickles the searcher (tuner.pkl at the start, its state as it goes); the study is in
    ``optuna.journal``. A copied sweep resumes its own journal, and a proposal the journal holds
    beyond the restored state (made before a crash) is failed, its queued point queued again."""
    import pickle
    import shutil

    from raypath import study

    space = SearchSpace((0.05, 0.5), ["cosine", "polynomial"], (1.0, 4.0), (0.0, 0.1), [0.0], _forks(), 100, 10)
    points = [{"fraction": 0.2, "shape": "cosine", "min_lr_ratio": 0.0, "replay_ratio": 0.0},
              {"fraction": 0.4, "shape": "cosine", "min_lr_ratio": 0.0, "replay_ratio": 0.0}]
    first = tmp_path / "first"
    first.mkdir()
    searcher = study.SweepSearch(first, space=space, metric="score", mode="min",
                                 sampler=make_sampler(SweepConfig(), 2), study_name="v2-s", points_to_evaluate=points)
    at_start = pickle.dumps(searcher)  # what Tune keeps in tuner.pkl
    assert searcher.suggest("a")["fork_step"] == 80
    searcher.on_trial_complete("a", {"score": 2.0})
    searcher.save(str(first / "searcher-state-x.pkl"))
    assert searcher.suggest("b")["fork_step"] == 60  # the second point, proposed after the saved state
    assert [t.state.name for t in optuna_study(first).trials] == ["COMPLETE", "RUNNING"]

    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    restored = pickle.loads(at_start)
    with study.resuming(copy), caplog.at_level(logging.WARNING, logger="raypath.study"):
        restored.restore(str(copy / "searcher-state-x.pkl"))
    assert "failed it and queued its point again" in caplog.text
    assert restored.suggest("c")["fork_step"] == 60  # the lost point runs after all
    restored.on_trial_complete("c", {"score": 1.0})
    trials = optuna_study(copy).trials
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 2.0), ("FAIL", None), ("COMPLETE", 1.0)]
    assert trials[2].system_attrs["fixed_params"] == points[1]
    # the original sweep's journal is untouched by the copy's
    assert [t.state.name for t in optuna_study(first).trials] == ["COMPLETE", "RUNNING"]


def test_a_retried_errored_trial_reaches_the_study_as_a_new_completed_trial(tmp_path, caplog):
    """An errored trial is failed in the journal; the re-run retries it under the same Tune id.
    Tune's own ConcurrencyLimiter drops that result (the trial finished for it); raypath's passes
    it on and the study gains a completed trial with the same parameters, after a restore too."""
    import pickle

    from ray.tune.search import ConcurrencyLimiter

    from raypath import study

    space = SearchSpace((0.05, 0.5), ["cosine", "polynomial"], (1.0, 4.0), (0.0, 0.1), [0.0], _forks(), 100, 10)

    def errored_then_retried(limiter_cls, sweep_dir):
        sweep_dir.mkdir()
        limiter = limiter_cls(study.SweepSearch(sweep_dir, space=space, metric="score", mode="min",
                                                sampler=make_sampler(SweepConfig(), 2), study_name="v2-s"), 2)
        config = limiter.suggest("a")
        limiter.on_trial_complete("a", error=True)  # Tune: the trial's last failure
        restored = pickle.loads(pickle.dumps(limiter))  # what the re-run's Tuner.restore reads
        with caplog.at_level(logging.WARNING):
            restored.on_trial_result("a", {"score": 2.5, "training_iteration": 1})  # the retry's progress
            restored.on_trial_complete("a", {"score": 2.0, "training_iteration": 2})
        return config, optuna_study(sweep_dir).trials

    _, plain = errored_then_retried(ConcurrencyLimiter, tmp_path / "plain")
    assert [t.state.name for t in plain] == ["FAIL"]  # Ray's limiter: the retry's result is lost

    caplog.clear()
    config, trials = errored_then_retried(study.RetryingLimiter, tmp_path / "retrying")
    assert [(t.state.name, t.value) for t in trials] == [("FAIL", None), ("COMPLETE", 2.0)]
    assert trials[1].params == trials[0].params and trials[1].params["fraction"] == config["fraction"]
    assert trials[1].user_attrs == {"retry_of": 0, "tune_trial_id": "a"}
    assert "already finished" not in caplog.text  # no warning per reported step of the retry


def test_a_real_tune_retry_of_an_errored_trial_completes_it_in_the_journal(ray_cluster, tmp_path):
    """The same on real Tune: a trial fails past its retries, the experiment is restored with
    errored trials resumed (what running the sweep again does), and the retry's score is in the
    study."""
    from ray import tune

    from raypath import study

    space = SearchSpace((0.05, 0.5), ["cosine"], (1.0, 4.0), (0.0, 0.1), [0.0], _forks(), 100, 10)
    ok = tmp_path / "ok"

    def trainable(config):
        if not ok.exists():
            raise RuntimeError("the node went away")
        tune.report({"score": 3.0 + config["fraction"]})

    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    searcher = study.SweepSearch(sweep_dir, space=space, metric="score", mode="min",
                                 sampler=make_sampler(SweepConfig(), 1), study_name="v2-s")
    first = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=study.RetryingLimiter(searcher, 1),
                                                              metric="score", mode="min", num_samples=1),
                       run_config=tune.RunConfig(name="s", storage_path=str(tmp_path), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1))).fit()
    assert first.errors and [t.state.name for t in optuna_study(sweep_dir).trials] == ["FAIL"]
    ok.touch()
    with study.resuming(sweep_dir):
        again = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True).fit()
    assert not again.errors
    trials = optuna_study(sweep_dir).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].value == pytest.approx(3.0 + again[0].config["fraction"])
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0


def test_optuna_study_of_a_sweep_without_a_journal_says_why(tmp_path):
    from raypath.study import NoJournalError

    (tmp_path / "searcher-state-2026.pkl").write_bytes(b"")  # a sweep written before the journal
    with pytest.raises(NoJournalError, match="predates optuna.journal"):
        optuna_study(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a raypath sweep directory"):
        optuna_study(tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_pareto_front_keeps_only_undominated_rows():
    from raypath.analysis import pareto_front

    df = pd.DataFrame({"t": [1, 2, 3, 4, 4, 5], "loss": [5.0, 4.0, 4.5, 3.0, 3.5, 3.0], "id": list("abcdef")})
    assert pareto_front(df, "t", "loss")["id"].tolist() == ["a", "b", "d"]


def test_the_analysis_of_a_path_that_is_not_a_sweep_says_what_it_is_and_where_the_sweeps_are(tmp_path):
    from raypath import analysis

    run = tmp_path / "run"
    for name in ("v2/a", "v3/b"):
        (run / "sweeps" / name).mkdir(parents=True)
        (run / "sweeps" / name / "sweep.json").write_text("{}")
    for where in (run, run / "sweeps", run / "sweeps" / "v2"):
        with pytest.raises(FileNotFoundError, match="the sweep directories below it: ") as e:
            analysis.load_sweep(where)
        assert str(run / "sweeps" / "v2" / "a") in str(e.value)
    assert str(run / "sweeps" / "v3" / "b") in str(pytest.raises(FileNotFoundError, analysis.sweep_info, run).value)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        analysis.main_curve(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not a sweep directory .expected RUN_DIR/sweeps/<version>/<name>"):
        analysis.load_sweep("s3://bucket/runs/q")


# --------------------------------------------------------------------------- a real sweep

def test_sweep_ran_all_trials_two_at_a_time(tiny_sweep):
    record, sc = tiny_sweep["record"], tiny_sweep["sweep"]
    assert not record["resumed"] and record["complete"] and record["max_concurrent"] == 2
    assert len(record["trials"]) == sc.num_samples == 4
    assert all(t["status"] == "done" for t in record["trials"])
    assert len(tiny_sweep["before_again"]["trials"]) == 4
    assert len(tiny_sweep["before_again"]["curves"]) == 4


def test_rerun_restores_the_sweep_and_runs_nothing(tiny_sweep):
    again, record = tiny_sweep["again"], tiny_sweep["record"]
    assert again["resumed"] and again["complete"]
    assert tiny_sweep["before_again"] == tiny_sweep["after_again"]  # no new trial, curve or checkpoint
    assert [t["trial_id"] for t in again["trials"]] == [t["trial_id"] for t in record["trials"]]
    assert again["released"] == record["released"]


def test_optuna_proposed_the_trials(tiny_sweep):
    import optuna

    sc, record = tiny_sweep["sweep"], tiny_sweep["record"]
    study = optuna_study(tiny_sweep["dir"])
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert len(study.trials) == sc.num_samples
    keys = ("fraction", "shape", "min_lr_ratio")
    proposed = sorted(tuple(t.params[k] for k in keys) for t in study.trials)
    ran = sorted(tuple(t["config"][k] for k in keys) for t in record["trials"])
    assert proposed == ran
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    scores = {tuple(t["config"][k] for k in keys): t["score"] for t in record["trials"]}
    assert all(t.value == pytest.approx(scores[tuple(t.params[k] for k in keys)]) for t in study.trials)


def test_the_law_chose_the_first_trials_and_was_refitted(tiny_sweep):
    """sweep.guide=law: the best predicted candidates are Optuna's first trials, the law is
    refitted on every finished trial's curve."""
    import json

    record, cfg = tiny_sweep["record"], tiny_sweep["cfg"]
    guide = record["guide"]
    assert guide["kind"] == "law" and set(guide["fits"]) == {"v1", "v2"}
    points = guide["points"]
    assert len(points) == 2  # min(4, num_samples // 2)
    first = sorted(optuna_study(tiny_sweep["dir"]).trials, key=lambda t: t.number)[: len(points)]
    assert [{k: t.params[k] for k in p} for t, p in zip(first, points)] == points
    assert all(t.system_attrs.get("fixed_params") for t in first)  # enqueued, not sampled
    fit = json.loads((Path(cfg.run_dir) / "law" / "fit-v2.json").read_text())
    fitted = {c["name"] for split in fit["splits"].values() for c in split.get("curves", [])}
    assert {t["name"] for t in record["trials"]} <= fitted  # the last refit saw every trial


def test_make_sampler_is_seeded():
    import optuna

    sc = SweepConfig(seed=3)
    space = SearchSpace(sc.fraction, sc.shapes, sc.power, sc.min_lr_ratio, [0.0], [{"step": 1, "fraction": 1.0}],
                        2, 1)
    proposals = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(sc, 2))
        trials = [study.ask() for _ in range(3)]
        for t in trials:
            space(t)
        proposals.append([t.params for t in trials])
    assert proposals[0] == proposals[1] and len({str(p) for p in proposals[0]}) == 3


def test_trials_with_another_replay_ratio_train_a_remixed_stream(tiny_sweep):
    """replay_ratio 0.25 (the stream has 0): the branch trains the same rows ids, a quarter
    of them v1 blocks; replay_ratio 0 trains the version's own stream."""
    import pyarrow.parquet as pq

    from raypath.data import Consumed

    record = tiny_sweep["record"]
    ratios = {t["config"]["replay_ratio"] for t in record["trials"]}
    assert ratios <= {0.0, 0.25}
    for t in record["trials"]:
        # a card's paths are relative to the run directory (it travels with the model)
        card = read_json(Path(t["export"]) / "model_card.json", root=tiny_sweep["cfg"].run_dir)
        assert card["replay_ratio"] == t["config"]["replay_ratio"]
        final = ckpt.load_state(t["branch"]["checkpoint"])
        if t["config"]["replay_ratio"] == 0.0:
            assert "replay" not in card
            continue
        mix = card["replay"]
        assert mix["replay_ratio"] == pytest.approx(0.25, abs=0.5 / mix["rows"])
        table = pq.read_table(mix["stream_path"], columns=["idx", "src"])
        fork = ckpt.load_state(t["branch"]["forked_from"])
        trained = Consumed.from_list(final["consumed"]).mask(table["idx"].to_numpy()) & \
            ~Consumed.from_list(fork["consumed"]).mask(table["idx"].to_numpy())
        assert trained.sum() == mix["rows"] == t["branch"]["steps"] * tiny_sweep["cfg"].train.global_batch_size
        assert (table["src"].to_numpy()[trained] == 0).sum() == mix["replay_rows"]


def test_trials_fork_from_snapped_main_path_checkpoints(tiny_sweep):
    cfg, record = tiny_sweep["cfg"], tiny_sweep["record"]
    info = Lineage.load(cfg.run_dir).main("v2")
    forks = {f["step"]: f["fraction"] for f in
             __import__("json").loads((tiny_sweep["dir"] / "sweep.json").read_text())["fork_points"]}
    assert len(forks) >= 3
    for t in record["trials"]:
        c = t["config"]
        assert c["fork_step"] in forks and c["fraction_actual"] == pytest.approx(forks[c["fork_step"]])
        nearest = min(forks.values(), key=lambda f: abs(f - c["fraction"]))
        assert abs(c["fraction_actual"] - c["fraction"]) == pytest.approx(abs(nearest - c["fraction"]))
        assert t["branch"]["forked_from"].endswith(ckpt.step_dir_name(c["fork_step"]))
        assert t["branch"]["end_step"] == info.end_step
        sched = Branch(MainPath(cfg.train.max_lr, cfg.train.warmup_steps), c["fork_step"],
                       info.end_step - c["fork_step"],
                       Decay(c["shape"], c["min_lr_ratio"], c.get("power") or 2.0))
        curve = read_curve(t["curve"])
        assert curve["step"].iloc[0] > c["fork_step"] and curve["step"].iloc[-1] == info.end_step
        assert np.allclose(curve["lr"], [sched(s - 1) for s in curve["step"]], rtol=1e-9)
        assert t["branch_tokens"] == (info.end_step - c["fork_step"]) * cfg.train.global_batch_size * \
            cfg.data.seq_len


def test_objective_is_the_weighted_val_loss(tiny_sweep):
    for t in tiny_sweep["record"]["trials"]:
        m = t["metrics"]
        assert t["objective"] == pytest.approx(0.5 * m["val/v1"] + 0.5 * m["val/v2"])
        assert t["score"] == pytest.approx(t["objective"])  # no compute penalty configured
        last = read_curve(t["curve"]).iloc[-1]
        assert last["objective"] == pytest.approx(t["objective"])


def test_trials_report_test_losses_that_no_choice_reads(tiny_sweep):
    from raypath.releases import Candidate, Objective, decide
    from raypath.sweep import _pick

    record = tiny_sweep["record"]
    done = sorted((t for t in record["trials"] if t["status"] == "done"), key=lambda t: t["score"])
    assert len(done) >= 2
    for t in done:  # every trial measured the held-out test splits once, at its last step
        m = t["metrics"]
        assert {k for k in m if k.startswith("test/")} == {"test/v1", "test/v2"}
        assert t["test_objective"] == pytest.approx(0.5 * m["test/v1"] + 0.5 * m["test/v2"])
        curve = read_curve(t["curve"])
        assert set(curve.loc[curve["test/v1"].notna(), "step"]) == {curve["step"].max()}
    weights = Objective({"v1": 0.5, "v2": 0.5})

    def choices(trials: list[dict]) -> tuple[str, str]:
        cands = [Candidate(t["name"], "v2", "sweep s", t["metrics"], None, t["branch_tokens"], t["trial_id"], "s")
                 for t in trials]
        return _pick(trials, None)[0]["trial_id"], decide(cands, None, weights).release.trial_id

    def swap(trials: list[dict], prefix: str) -> list[dict]:
        """The same trials with their ``prefix/*`` losses in the reverse order of their scores."""
        out = []
        for t, other in zip(trials, reversed(trials)):
            m = {**t["metrics"], **{k: v for k, v in other["metrics"].items() if k.startswith(prefix)}}
            score = weights.value(m) if prefix == "val/" else t["score"]
            out.append({**t, "metrics": m, "score": score})
        return out

    assert choices(done) == (record["best"], record["best"])
    assert choices(swap(done, "test/")) == (record["best"], record["best"])  # any test contents: same choice
    assert choices(swap(done, "val/"))[0] == done[-1]["trial_id"] != record["best"]  # val does decide


def test_cost_with_search_counts_every_trial(tiny_sweep):
    from raypath.cost import lineage_costs

    lineage = Lineage.load(tiny_sweep["cfg"].run_dir)
    lin = lineage.data
    row = next(r for r in lineage_costs(lin) if r["version"] == "v2")
    trials = [t.to_dict() for s in lineage.sweeps("v2") for t in s.trials]
    # the sweep lineage trains no configured branch: its search is the trials alone
    configured = sum(b["tokens_trained"] for b in lin["branches"] if b["version"] == "v2" and not b.get("sweep"))
    assert row["search_branch_tokens"] == configured + sum(t["branch_tokens"] for t in trials) > 0
    release = next(r for r in lin["releases"] if r["version"] == "v2")
    assert row["branch_tokens"] == release["branch_tokens"] < row["search_branch_tokens"]
    assert row["with_search_cumulative"] - row["path_switching_cumulative"] == \
        row["search_branch_tokens"] - row["branch_tokens"]


def test_best_trial_is_the_release_in_the_lineage(tiny_sweep):
    from transformers import AutoModelForCausalLM

    cfg, record = tiny_sweep["cfg"], tiny_sweep["record"]
    best = min(record["trials"], key=lambda t: t["score"])
    assert record["best"] == record["released"] == best["trial_id"] and not record["pinned"]
    lin = Lineage.load(cfg.run_dir).data
    release = next(r for r in lin["releases"] if r["version"] == "v2")
    assert release["trial_id"] == best["trial_id"] and release["branch"] == best["name"]
    assert release["sweep"] == str(tiny_sweep["dir"]) and release["pinned"] is False
    assert release["path"] == str(Path(cfg.run_dir) / "releases" / "v2" / release["release"])
    assert (Path(cfg.run_dir) / "releases" / "v2" / "current").resolve() == Path(release["path"]).resolve()
    assert next(b for b in lin["branches"] if b["name"] == best["name"])["sweep"] == str(tiny_sweep["dir"])
    sweep = next(s for s in lin["sweeps"] if s["version"] == "v2" and s["name"] == tiny_sweep["sweep"].name)
    assert sweep["released"] == best["trial_id"] and sweep["n_trials"] == 4 and "trials" not in sweep
    trials = Lineage.load(cfg.run_dir).sweep("v2", sweep["name"]).trials  # read from the sweep's results.json
    assert [t.trial_id for t in trials] == [t["trial_id"] for t in record["trials"]]
    # the standing status and report read: each finished trial's weighted val loss, as the release scored it
    from raypath.releases import STANDING_JSON, Objective, candidate_scores

    held = __import__("json").loads((Path(tiny_sweep["dir"]) / STANDING_JSON).read_text())
    assert [t[0] for t in held["trials"]] == [t["name"] for t in record["trials"] if t["status"] == "done"]
    live = Lineage.load(cfg.run_dir).release("v2")
    objective = Objective(live.objective_weights, live.compute_penalty, live.version_tokens)
    fresh = Lineage.load(cfg.run_dir)
    scores = candidate_scores(fresh, "v2", objective)
    assert all(scores[t["name"]] == pytest.approx(t["score"]) for t in record["trials"] if t["status"] == "done")
    assert not fresh._trials  # no sweep's results.json was read
    card = __import__("json").loads((Path(release["path"]) / "model_card.json").read_text())
    assert card["trial_id"] == best["trial_id"] and card["final_metrics"]["objective"] == pytest.approx(best["objective"])
    AutoModelForCausalLM.from_pretrained(release["path"], local_files_only=True)


_RUN_BESIDE = """
import sys, time
from pathlib import Path
from raypath.lineage import Lineage
from raypath.storage import writer_lock
run = sys.argv[1]
with writer_lock(run, "run"), writer_lock(run, "sweep v2 other", "sweeps/v2/other"):
    lin, i = Lineage.load(run), 0
    print("held", flush=True)
    while not Path(run, "stop").exists():  # saves of the main path's lineage as the sweep runs
        lin.set_fact(f"run-{i}", {"i": i})
        i += 1
        time.sleep(0.2)
    print(i, flush=True)
"""


def _copy_unswept(src: Path, dst: Path) -> Path:
    """A copy of the swept lineage's run directory without its sweeps and v2's releases."""
    import json
    import shutil

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = {"sweeps", ".locks", ".writer.lock"} if Path(d) == src else set()
        return skip | ({"v2"} if Path(d) == src / "releases" else set())

    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    lin = json.loads((dst / "lineage.json").read_text())
    lin["sweeps"], lin["branches"] = [], [b for b in lin["branches"] if not b.get("sweep")]
    lin["releases"] = [r for r in lin["releases"] if r["version"] != "v2"]
    lin["release_history"].pop("v2", None)
    (dst / "lineage.json").write_text(json.dumps(lin))
    return dst


def test_a_sweep_runs_beside_the_main_path_and_both_keep_their_records(sweep_lineage, tmp_path):
    """A sweep beside a running `raypath run` of its run directory was refused: one writer at a time,
    as their lineage saves overwrote each other's. A sweep locks its own directory now: it trains and
    releases while the run holds the run directory and saves the lineage, and both keep their records;
    a second sweep of the same name is refused naming the first; the sweep prepares nothing of the
    run's (config.yaml, the data manifest, the tokenizer untouched)."""
    import subprocess
    import sys

    from conftest import FAST_TRIALS

    from raypath.storage import RunDirBusyError

    run = _copy_unswept(Path(load_config(sweep_lineage).run_dir), tmp_path / "run")
    owned = {p: p.stat().st_mtime_ns for p in (run / "config.yaml", run / "data/manifest.json",
                                               run / "tokenizer/tokenizer.json")}
    holder = subprocess.Popen([sys.executable, "-c", _RUN_BESIDE, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = load_config(sweep_lineage, [f"run_dir={run}", *FAST_TRIALS, "sweep.name=other"])
        with pytest.raises(RunDirBusyError, match=rf"run_dir: {run} \(sweeps/v2/other\) is being written by a "
                                                  rf"sweep v2 other .*pid {holder.pid}"):
            run_sweep(other, "v2")
        cfg = load_config(sweep_lineage, [f"run_dir={run}", *FAST_TRIALS, "sweep.num_samples=1",
                                          "sweep.name=beside"])
        record = run_sweep(cfg, "v2")
        (run / "stop").touch()
        saves = int(holder.stdout.readline())
    finally:
        (run / "stop").touch()
        holder.wait(timeout=60)
    lin = Lineage.load(run)
    assert record["released"] and lin.sweep_summaries("v2")[0].name == "beside"
    assert lin.release("v2").trial_id == record["released"] and lin.branch("branch-v1") is not None
    assert saves > 5 and all(lin.fact(f"run-{i}") == {"i": i} for i in range(saves))
    assert {p: p.stat().st_mtime_ns for p in owned} == owned


def _span(*curves) -> tuple[float, float]:
    """When segments trained: their first ``start`` event, their curves' last write."""
    starts = [r["time"] for c in curves for r in map(json.loads, Path(c).read_text().splitlines())
              if r.get("event") == "start"]
    return min(starts), max(Path(c).stat().st_mtime for c in curves)


@pytest.mark.slow
def test_raypath_run_trains_the_next_version_while_a_sweep_searches_this_ones_branch(sweep_lineage, tmp_path):
    """The workflow the paradigm is for, with the real commands: `raypath run` prepares and trains v3
    (its main segment and branch) and releases v1..v3 while `raypath sweep` searches v2's branch on the
    same run directory and Ray cluster. Both succeed; the lineage holds the run's segments, branches and
    releases and the sweep's summary, and v2's release history has each release once."""
    import subprocess
    import sys

    import ray

    from conftest import FAST_TRIALS

    run = _copy_unswept(Path(load_config(sweep_lineage).run_dir), tmp_path / "run")
    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        main_path = subprocess.Popen(
            [sys.executable, "-m", "raypath.cli", "run", str(sweep_lineage), "--set", f"run_dir={run}",
             "--set", "data.versions=[v1, v2, v3]", "--set", f"cluster.address={address}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            cfg = load_config(sweep_lineage, [f"run_dir={run}", *FAST_TRIALS, "sweep.num_samples=2",
                                              "sweep.max_concurrent=1", "sweep.name=beside"])
            record = run_sweep(cfg, "v2")
            assert main_path.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            main_path.kill()
    # They trained at once: v3's segments between the sweep's first trial's start and its last
    # curve write (which of the two ends first depends on their speeds, not on raypath).
    run_start, run_end = _span(run / "curves" / "main-v3.jsonl", run / "curves" / "branch-v3.jsonl")
    sweep_start, sweep_end = _span(*(t["curve"] for t in record["trials"]))
    assert run_start < sweep_end and sweep_start < run_end, (run_start, run_end, sweep_start, sweep_end)
    lin = Lineage.load(run)
    assert [m.version for m in lin.main_path()] == ["v1", "v2", "v3"]
    assert {"branch-v1", "branch-v2", "branch-v3"} <= {b.name for b in lin.branches()}
    assert [(s.name, s.extra["n_trials"]) for s in lin.sweep_summaries("v2")] == [("beside", 2)]
    assert all(lin.release(v) is not None for v in ("v1", "v2", "v3"))
    h = lin.release_history("v2")
    assert len({r.id for r in h.releases}) == len(h.releases) and h.current == lin.release("v2").id
    assert record["complete"] and h.get(record["live_release"]) is not None  # its decision stands in the history
    assert "Traceback" not in log.read_text()


def test_load_sweep_one_row_per_trial(tiny_sweep):
    from raypath.analysis import CONFIG_COLUMNS, load_sweep, main_objective

    trials, curves = load_sweep(tiny_sweep["dir"])
    record = tiny_sweep["record"]
    assert len(trials) == 4 and set(CONFIG_COLUMNS) <= set(trials.columns)
    assert (trials["status"] == "done").all()
    assert trials.loc[trials["best"], "trial_id"].item() == record["best"]
    by_id = {t["trial_id"]: t for t in record["trials"]}
    for _, row in trials.iterrows():
        assert row["objective"] == pytest.approx(by_id[row["trial_id"]]["objective"])
        c = curves[curves["trial_id"] == row["trial_id"]]
        assert len(c) >= 3 and c["branch_tokens"].iloc[-1] == row["branch_tokens"]
    assert np.isfinite(main_objective(tiny_sweep["dir"]))
    some = trials["trial_id"].iloc[0]
    few_trials, few = load_sweep(tiny_sweep["dir"], curves=[some])
    assert few_trials.equals(trials) and set(few["trial_id"]) == {some}
    assert few.reset_index(drop=True).equals(curves[curves["trial_id"] == some].reset_index(drop=True))
    assert load_sweep(tiny_sweep["dir"], curves=False)[1].empty



def test_load_sweep_again_parses_only_the_curves_that_changed(tiny_sweep, tmp_path, monkeypatch):
    """A notebook re-runs its cells on a live sweep: a call parses again only the curves written
    since the last one, and returns what a first call would."""
    import json
    import shutil

    from raypath import analysis, report

    run = tmp_path / "run"  # a copy: a curve is appended to
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    sweep_dir = run / Path(tiny_sweep["dir"]).relative_to(tiny_sweep["cfg"].run_dir)
    parsed = []
    monkeypatch.setattr(analysis, "read_curve", lambda p: parsed.append(Path(p).name) or report.read_curve(p))
    first = analysis.load_sweep(sweep_dir)
    assert len(parsed) == 4
    again = analysis.load_sweep(sweep_dir)
    assert len(parsed) == 4 and all(a.equals(b) for a, b in zip(first, again))
    curve = sorted((sweep_dir / "curves").glob("branch-*.jsonl"))[0]
    last = json.loads(curve.read_text().splitlines()[-1])
    with curve.open("a") as f:  # the trial logs a step more
        f.write(json.dumps({**last, "step": last["step"] + 1}) + "\n")
    trials, curves = analysis.load_sweep(sweep_dir)
    assert parsed[4:] == [curve.name] and len(curves) == len(first[1]) + 1
    assert trials.equals(first[0])


def test_load_sweep_names_a_trial_file_that_is_not_json(tmp_path):
    """A trial's ``params.json`` cut short (a copy interrupted, a full disk) is named, as every
    other record of a run directory is, instead of a bare JSONDecodeError."""
    from raypath.analysis import load_sweep
    from raypath.storage import RunFileError

    sweep_dir = tmp_path / "run" / "sweeps" / "v2" / "sweep"
    (sweep_dir / "trial_0001").mkdir(parents=True)
    write_json(sweep_dir / "sweep.json", {"version": "v2", "main_start_step": 0, "main_end_step": 64,
                                          "tokens_start": 0, "tokens_per_step": 128, "segment_prefix": "branch-v2-"})
    (sweep_dir / "trial_0001" / "params.json").write_text('{"shape": "cosine", "fra')
    with pytest.raises(RunFileError, match=r"trial_0001/params\.json: not valid JSON"):
        load_sweep(sweep_dir, curves=False)

def test_load_sweep_shows_an_errored_trial_and_the_forks_plot_starts_before_the_forks(tiny_sweep, tmp_path):
    import json
    import shutil

    import matplotlib

    from raypath import analysis

    matplotlib.use("Agg")
    run = tmp_path / "run"  # a copy: the errored trial must not leak into the session's sweep
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    sweep_dir = run / Path(tiny_sweep["dir"]).relative_to(tiny_sweep["cfg"].run_dir)
    bad, some = sweep_dir / "trial_0badc0de", next(sweep_dir.glob("trial_*"))
    bad.mkdir()
    shutil.copy(some / "params.json", bad / "params.json")
    (bad / "result.json").write_text(json.dumps({"step": 1, "loss": 4.3, "trial_id": "0badc0de"}) + "\n")
    (bad / "error.txt").write_text("ray.exceptions.RayTaskError: worker died\n")  # what Tune writes
    trials, curves = analysis.load_sweep(sweep_dir)
    assert trials.set_index("trial_id").loc["0badc0de", "status"] == "error"  # was "running"
    fig = analysis.plot_forks(trials[trials["status"] == "done"], curves, analysis.main_curve(sweep_dir))
    info = analysis.sweep_info(sweep_dir)
    first_fork = info["tokens_start"] + (int(trials["fork_step"].min()) - info["main_start_step"]) * \
        info["tokens_per_step"]
    assert min(fig.axes[0].lines[0].get_xdata()) < first_fork  # the main path reaches back past the forks


def test_a_sweep_in_progress_shows_its_training_trials_as_running_and_plots_without_warnings(tiny_sweep, tmp_path):
    """Trials of the fixture report only at their end: mid-run, a trial has its curve and no result."""
    import shutil
    import warnings

    import matplotlib

    from raypath import analysis

    matplotlib.use("Agg")
    run = tmp_path / "run"
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    sweep_dir = run / Path(tiny_sweep["dir"]).relative_to(tiny_sweep["cfg"].run_dir)
    (sweep_dir / "results.json").unlink()
    trial_dirs = sorted(sweep_dir.glob("trial_*"))
    for d in trial_dirs:
        (d / "result.json").write_text("")  # no report yet
    waiting = trial_dirs[0].name.removeprefix("trial_")
    (trial_dirs[0] / "result.json").unlink()
    (sweep_dir / "curves" / f"branch-v2-{waiting}.jsonl").unlink()
    trials, curves = analysis.load_sweep(sweep_dir)
    status = trials.set_index("trial_id")["status"]
    assert status[waiting] == "pending" and (status.drop(waiting) == "running").all()  # were all "pending"
    # a running trial's step and loss are its curve's last logged ones (Tune has heard nothing yet)
    running = trials.set_index("trial_id").drop(waiting)
    for tid, row in running.iterrows():
        last = read_jsonl(sweep_dir / "curves" / f"branch-v2-{tid}.jsonl")[-1]
        assert (row["step"], row["loss"]) == (last["step"], pytest.approx(last["loss"])), tid
    assert set(curves["trial_id"]) == set(status.drop(waiting).index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "No artists with labels found to put in legend"
        analysis.plot_loss_vs_length(trials, reference=analysis.main_objective(sweep_dir))
        analysis.plot_pareto(trials)
        analysis.plot_forks(trials, curves, analysis.main_curve(sweep_dir))


def test_the_analysis_shows_the_live_release_not_the_one_the_sweep_made(tiny_sweep, tmp_path, monkeypatch):
    import shutil

    from raypath import analysis
    from raypath.cli import main

    run = tmp_path / "run"  # a copy: the new pick must not leak into the session's sweep
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    sweep_dir = run / Path(tiny_sweep["dir"]).relative_to(tiny_sweep["cfg"].run_dir)
    released = tiny_sweep["record"]["released"]
    assert released and analysis.load_sweep(sweep_dir)[0].set_index("trial_id").loc[released, "released"]
    other = next(t["trial_id"] for t in tiny_sweep["record"]["trials"] if t["trial_id"] != released)
    assert main(["release", str(run), "--version", "v2", "--pick", other]) == 0
    trials, _ = analysis.load_sweep(sweep_dir)
    info = analysis.sweep_info(sweep_dir)
    assert trials.loc[trials["released"], "trial_id"].tolist() == [other] and info["pinned"] is True
    assert info["released"] == other and info["released_at_sweep"] == released
    monkeypatch.chdir(sweep_dir)  # the notebook run from the sweep directory (RAYPATH_SWEEP_DIR=.)
    assert analysis.main_objective(".") == analysis.main_objective(sweep_dir)


def test_pin_releases_another_trial_and_release_rolls_back(tiny_sweep):
    cfg, record = tiny_sweep["cfg"], tiny_sweep["record"]
    other = next(t for t in record["trials"] if t["trial_id"] != record["best"])
    before = Lineage.load(cfg.run_dir).release("v2").id
    pinned = run_sweep(with_cli(cfg, pin=other["trial_id"]), "v2")
    try:
        assert pinned["released"] == other["trial_id"] and pinned["pinned"]
        assert pinned["best"] == record["best"]
        assert len(pinned["trials"]) == 4
        release = Lineage.load(cfg.run_dir).release("v2")
        assert release.trial_id == other["trial_id"] and release.pinned is True
        assert release.id != before and release.reason == "pinned"
        card = __import__("json").loads((Path(release.path) / "model_card.json").read_text())
        assert card["trial_id"] == other["trial_id"]
        # a plain re-run keeps the user's pin
        assert run_sweep(cfg, "v2")["released"] == other["trial_id"]
    finally:
        # roll back to the best trial's release, then hand v2 back to the decision
        assert main(["release", str(cfg.run_dir), "--version", "v2", "--pick", before]) == 0
        assert main(["release", str(cfg.run_dir), "--version", "v2", "--pick", "best"]) == 0
    live = Lineage.load(cfg.run_dir)
    assert live.release("v2").id == before and live.release("v2").trial_id == record["best"]
    assert live.release_history("v2").pinned is False
    # --pick best keeps the rolled-back release live: it is unpinned, and the history says so
    assert [e["action"] for e in live.release_history("v2").log][-3:] == ["release", "rollback", "unpin"]


def test_a_resumed_guided_sweep_keeps_the_stops_made_before_it(tiny_sweep, tmp_path):
    """Ray 2.60 writes tuner.pkl once, when the Tuner is built, so a resumed sweep's law stopper and
    refit callback are the ones built at its start, for a run directory that may have moved since.
    Two trials finished and one was stopped before the driver died; the stopper and law restored as
    built learn the finished ones (the stopper stops the fourth), the first stop stays recorded next
    to the new one in the sweep's own directory, and the sweep counts both as stopped: it settles."""
    import shutil

    import ray.cloudpickle as cloudpickle
    from conftest import FAST_TRIALS
    from ray import tune
    from ray.tune.experiment import Trial

    from raypath import study, sweep
    from raypath.run import prepare

    def planned(run: Path):
        cfg = load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}"])
        plan = sweep._plan(prepare(cfg), Lineage.load(run), "v2", cfg.sweep)
        return plan, cfg.sweep, sweep._search_space(plan, cfg.sweep)

    first, moved = tmp_path / "first" / "run", tmp_path / "moved" / "run"
    shutil.copytree(tiny_sweep["cfg"].run_dir, first, symlinks=True)
    plan, sc, space = planned(first)
    guidance = sweep.law_guidance(plan, sc, space)
    at_start = cloudpickle.dumps((guidance.stopper, guidance.callback))  # what tuner.pkl holds

    trials = sorted(tiny_sweep["record"]["trials"], key=lambda t: t["score"])
    (a, b), (early, late) = trials[:2], trials[2:]

    def hopeless(t: dict) -> tuple[str, dict]:  # a result halfway through the branch, far behind
        c = t["config"]
        return t["trial_id"], {"step": c["fork_step"] + c["branch_steps"] // 2, "objective": 2 * t["objective"],
                               "config": c}

    with study.resuming(plan.sweep_dir):
        for t in (a, b):
            guidance.stopper.record_final(t["trial_id"], t["objective"], t["config"]["branch_steps"])
        assert guidance.stopper(*hopeless(early))
    shutil.move(first.parent, moved.parent)
    plan, sc, space = planned(moved)
    for t in (early, late):  # a stopped trial has no final checkpoint
        shutil.rmtree(Path(plan.sweep_dir) / "branches" / t["name"])

    stopper, callback = cloudpickle.loads(at_start)  # `raypath sweep` again: Tuner.restore
    restored = {t.trial_id: t for t in tune.ExperimentAnalysis(plan.sweep_dir).trials}
    restored[early["trial_id"]].update_last_result(hopeless(early)[1])
    restored[late["trial_id"]].set_status(Trial.RUNNING)
    with study.resuming(plan.sweep_dir):
        callback.on_step_begin(0, list(restored.values()))
        assert stopper.best() == pytest.approx(a["score"])
        assert {t.name for t in stopper.guide.trials} == {a["name"], b["name"]}  # their curves, where they are now
        assert stopper(*hopeless(late))
    stopped = sweep._stopped(plan)
    assert set(stopped) == {early["trial_id"], late["trial_id"]} and not first.exists()

    results = sweep._make_tuner(plan, sc, space, 2, Path(plan.sweep_dir), None, restore=True).get_results()
    records = sweep._trial_records(plan, results, stopped)
    outcome, settled = sweep._outcome(sc, records, stopped)
    assert settled and outcome["complete"]
    assert {t["trial_id"]: t["status"] for t in records} == {a["trial_id"]: "done", b["trial_id"]: "done",
                                                             early["trial_id"]: "stopped", late["trial_id"]: "stopped"}


def test_a_trial_the_law_stopped_leaves_its_curve_and_no_checkpoint(tiny_sweep, tmp_path, caplog):
    """A stopped trial never resumes and is never released: its periodic checkpoints go when the
    sweep records it; its curve stays for the law. A finished trial keeps its final checkpoint."""
    import shutil

    from conftest import FAST_TRIALS

    from raypath import sweep
    from raypath.run import prepare

    run = tmp_path / "run"
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    cfg = load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}"])
    plan = sweep._plan(prepare(cfg), Lineage.load(run), "v2", cfg.sweep)
    stopped, done = sorted(tiny_sweep["record"]["trials"], key=lambda t: t["trial_id"])[:2]
    branches = Path(plan.sweep_dir) / "branches"
    (final,) = ckpt.step_dirs(branches / stopped["name"])  # as if stopped halfway: a periodic one, no final
    final.rename(final.with_name(ckpt.step_dir_name(stopped["config"]["fork_step"] + 1)))
    kept = [p.name for p in ckpt.step_dirs(branches / done["name"])]
    with caplog.at_level(logging.INFO, logger="raypath.sweep"):
        sweep._drop_stopped_checkpoints(plan, [{**stopped, "status": "stopped"}, done])
    assert not ckpt.step_dirs(branches / stopped["name"]) and f"trial {stopped['trial_id']} was stopped" in caplog.text
    assert [p.name for p in ckpt.step_dirs(branches / done["name"])] == kept and len(kept) == 1
    assert Path(plan.curve_path(stopped["trial_id"])).is_file()


def test_a_sweep_keeping_its_best_trials_deletes_the_others_weights_and_keeps_their_records(tiny_sweep, tmp_path,
                                                                                           caplog, capsys):
    """``sweep.keep_trials``: as trials finish (Tune's callback, on the sweep's restored trials, 2
    kept) every finished trial past the best N loses its final checkpoint and export, recorded
    first, and a stopped trial's checkpoints go once its run has ended; a re-run with 1 kept prunes
    one more at its end. The records keep the pruned trials as they were; none of them can be
    released, pinned or trained again."""
    import shutil

    from conftest import FAST_TRIALS
    from ray import tune

    from raypath import sweep
    from raypath.releases import candidates
    from raypath.run import prepare

    run = tmp_path / "run"
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    cfg = load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}", "sweep.keep_trials=2"])
    plan = sweep._plan(prepare(cfg), Lineage.load(run), "v2", cfg.sweep)
    by_score = sorted(tiny_sweep["record"]["trials"], key=lambda t: t["score"])
    (best, second, third), stopped = by_score[:3], by_score[3]
    write_json(Path(plan.sweep_dir) / sweep.STOPPED_JSON, {stopped["trial_id"]: {"stop": True}})
    trials = tune.ExperimentAnalysis(plan.sweep_dir).trials
    for t in trials:
        if t.trial_id == stopped["trial_id"]:  # stopped halfway: its last result is not final
            t.update_last_result({**t.last_result, "final": False})
    branches, exports = Path(plan.sweep_dir) / "branches", Path(plan.sweep_dir) / "exports"
    token = sweep._RUNNING.set((plan, cfg.sweep))
    try:
        with caplog.at_level(logging.INFO, logger="raypath.sweep"):
            sweep._keeper().on_trial_complete(0, trials, next(t for t in trials if t.trial_id == best["trial_id"]))
    finally:
        sweep._RUNNING.reset(token)
    pruned = sweep.pruned_trials(plan)
    assert set(pruned) == {third["trial_id"]} and f"trial {third['trial_id']} is number 3" in caplog.text
    kept = read_json(Path(plan.sweep_dir) / sweep.KEPT_JSON)  # what the trials still running check
    assert kept["keep_trials"] == 2 and kept["pin"] is None
    assert [tuple(b) for b in kept["best"]] == [(t["score"], t["trial_id"]) for t in (best, second)]
    assert not (branches / third["name"]).exists() and not (exports / third["name"]).exists()
    report = pruned[third["trial_id"]]["report"]  # what a restored Tune is told instead of training it again
    assert report["final"] and report["score"] == pytest.approx(third["score"])
    assert report["step"] == third["config"]["fork_step"] + third["config"]["branch_steps"]
    assert not ckpt.step_dirs(branches / stopped["name"]) and f"trial {stopped['trial_id']} was stopped" in caplog.text
    for t in (best, second):
        assert ckpt.step_dirs(branches / t["name"]) and (exports / t["name"] / "model_card.json").is_file()

    # the real sweep again, keeping 1 (restored, nothing to train): its end prunes the second best
    record = run_sweep(load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}", "sweep.keep_trials=1"]),
                       "v2")
    after = {t["trial_id"]: t for t in record["trials"]}
    assert after[stopped["trial_id"]]["status"] == "stopped" and record["complete"]
    assert not (branches / second["name"]).exists() and not (exports / second["name"]).exists()
    for t in (second, third):
        was = {k: t[k] for k in ("status", "score", "objective", "metrics", "branch_tokens")}
        assert {k: after[t["trial_id"]][k] for k in was} == was
        assert after[t["trial_id"]]["curve"] == str(Path(plan.sweep_dir) / "curves" / f"{t['name']}.jsonl")
        assert after[t["trial_id"]]["pruned"] and after[t["trial_id"]]["export"] is None
    assert not after[best["trial_id"]].get("pruned") and record["released"] == best["trial_id"]
    assert (exports / best["name"] / "model_card.json").is_file()
    lineage = Lineage.load(run)
    from raypath.report import format_status

    assert re.search(rf"{cfg.sweep.name}\s+v2\s+4 \(2 pruned\)", format_status(lineage)), format_status(lineage)
    # a trial released before (another test of the session pins one) keeps its model in releases/
    released = {b.name for b in lineage.branches("v2")}
    mine = [c.trial_id for c in candidates(lineage, "v2") if c.sweep and Path(c.sweep) == Path(plan.sweep_dir)]
    assert set(mine) == {t["trial_id"] for t in (best, second, third, stopped) if t is best or t["name"] in released}
    gone = next(t["trial_id"] for t in (second, third) if t["name"] not in released)
    assert main(["release", str(run), "--version", "v2", "--pick", gone]) != 0
    assert "kept no weights" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="sweep.keep_trials"):
        run_sweep(with_cli(cfg, pin=gone), "v2")
    from raypath.analysis import load_sweep

    table = load_sweep(plan.sweep_dir, curves=False)[0]
    assert set(table.loc[table["pruned"], "trial_id"]) == {second["trial_id"], third["trial_id"]}


def test_a_trial_ending_behind_the_kept_ones_exports_nothing_and_the_sweep_end_prunes_it(tiny_sweep, tmp_path,
                                                                                          caplog):
    """A trial resumed at its final checkpoint (the driver stopped before its export) exports its
    model in a real Train run; one that ends behind ``sweep.keep_trials`` finished ones
    (``kept.json``) exports nothing and counts as finished, and a re-run's end prunes it even
    where it would now be kept: it has no model to release. The restored Tune uploads none of
    the records it staged (here another copy's)."""
    import dataclasses
    import shutil

    from conftest import FAST_TRIALS
    from ray import tune

    from raypath import sweep
    from raypath.mirror import SWEEP_OWN
    from raypath.run import prepare
    from raypath.segment import fit_segment

    run = tmp_path / "run"
    shutil.copytree(tiny_sweep["cfg"].run_dir, run, symlinks=True)
    cfg = load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}", "sweep.keep_trials=2"])
    plan = sweep._plan(prepare(cfg), Lineage.load(run), "v2", cfg.sweep)
    best, second, third, fourth = sorted(tiny_sweep["record"]["trials"], key=lambda t: t["score"])[:4]
    seg2, seg3 = (plan.segment(t["trial_id"], t["config"]) for t in (second, third))
    for seg in (seg2, seg3):  # as if each trial's driver stopped between its final checkpoint and its export
        shutil.rmtree(seg.export_dir)
    assert not sweep._finished(seg2) and not sweep._finished(seg3)
    fit_segment(seg2)
    assert (Path(seg2.export_dir) / "model_card.json").is_file()

    finished = [(t["trial_id"], t["config"], t["score"]) for t in (best, second)]
    sweep._write_kept(plan, dataclasses.replace(cfg.sweep, pin=third["trial_id"]), finished)
    final = ckpt.load_state(Path(seg3.storage) / ckpt.step_dir_name(seg3.end_step))["metrics"]
    assert seg3.skip_export(final) is None  # the pinned trial exports, whatever its score
    sweep._write_kept(plan, cfg.sweep, finished)
    assert "behind the 2 best finished trials" in seg3.skip_export(final) and sweep._finished(seg3)
    fit_segment(seg3)
    assert not Path(seg3.export_dir).exists() and ckpt.step_dirs(seg3.storage)

    # Tune stages a restored sweep's records where another copy of it restored in this Ray session
    # left its own: they must not come back into this one
    staging = Path(tune.ExperimentAnalysis(plan.sweep_dir).trials[0].storage.experiment_driver_staging_path)
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / sweep.STOPPED_JSON, {fourth["trial_id"]: {"stop": True}})
    write_json(staging / sweep.PRUNED_JSON, {second["trial_id"]: {}})

    # the sweep again, keeping 3 (restored, nothing to train): the third best has no model, so it goes
    with caplog.at_level(logging.INFO, logger="raypath.sweep"):
        record = run_sweep(load_config(tiny_sweep["config"], [*FAST_TRIALS, f"run_dir={run}", "sweep.keep_trials=3"]),
                           "v2")
    after = {t["trial_id"]: t for t in record["trials"]}
    assert f"trial {third['trial_id']} is number 3" in caplog.text and "it exported no model" in caplog.text
    assert after[third["trial_id"]]["pruned"] and not Path(seg3.storage).exists()
    assert after[fourth["trial_id"]]["pruned"] and not after[second["trial_id"]].get("pruned")
    assert set(sweep.pruned_trials(plan)) == {third["trial_id"], fourth["trial_id"]}
    assert not (Path(plan.sweep_dir) / sweep.STOPPED_JSON).exists() and not any(
        (staging / name).exists() for name in SWEEP_OWN)
    assert record["released"] != third["trial_id"] and not (Path(plan.sweep_dir) / sweep.KEPT_JSON).exists()


def test_a_trial_is_beaten_by_the_kept_scores_ties_going_to_the_lower_id(tmp_path):
    """:func:`raypath.sweep.beaten` on ``kept.json``: behind the N-th best (score, id) only."""
    from raypath.mirror import LOCAL
    from raypath.sweep import beaten

    path = tmp_path / "kept.json"
    assert beaten(str(path), LOCAL, "b", 0.0, {"objective": 9.0}) is None  # no record: a new run's own
    write_json(path, {"keep_trials": 2, "pin": "p", "best": [[1.0, "a"], [2.0, "c"]]})
    cases = {("b", 1.9): None, ("b", 2.0): None, ("d", 2.0): "beaten", ("b", 2.1): "beaten", ("p", 5.0): None}
    for (trial, objective), want in cases.items():
        why = beaten(str(path), LOCAL, trial, 0.5, {"objective": objective - 0.5})  # the score adds the penalty
        assert (why is not None) == (want == "beaten"), (trial, objective, why)
    assert beaten(str(path), LOCAL, "b", 0.0, {"loss": 3.0}) is None  # no objective: nothing to rank
    write_json(path, {"keep_trials": 3, "pin": None, "best": [[1.0, "a"], [2.0, "c"]]})
    assert beaten(str(path), LOCAL, "d", 0.0, {"objective": 9.0}) is None  # fewer finished than kept


@pytest.mark.slow
def test_the_chosen_trial_does_not_change_when_the_test_split_does(sweep_lineage, tmp_path):
    """The same 2-trial sweep twice, the test splits' contents replaced in between: the same
    trials, objectives and best trial; only the reported test losses move."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import FAST_TRIALS

    src = Path(load_config(sweep_lineage).run_dir)
    dst = tmp_path / "run"
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("sweeps"))
    for f in dst.rglob("*.json"):
        f.write_text(f.read_text().replace(str(src), str(dst)))
    base = [*FAST_TRIALS, f"run_dir={dst}", "sweep.num_samples=2", "sweep.max_concurrent=1",
            "sweep.guide_sweeps=false"]

    def sweep(name: str) -> dict:
        return run_sweep(load_config(sweep_lineage, [*base, f"sweep.name={name}"]), "v2")

    first = sweep("before")
    for v in Lineage.load(dst).data["versions"]:  # other tokens, same shape
        part = Path(v["test_path"]) / "part-000000.parquet"
        table = pq.read_table(part)
        tokens = np.asarray(table["tokens"].to_pylist())
        col = table.schema.get_field_index("tokens")
        pq.write_table(table.set_column(col, "tokens", pa.array(list((tokens + 7) % 300),
                                                                table.schema.field(col).type)), part)
    second = sweep("after")

    def trials(record: dict) -> list[dict]:
        return sorted((t for t in record["trials"] if t["status"] == "done"), key=lambda t: sorted(t["config"].items()))

    a, b = trials(first), trials(second)
    assert [t["config"] for t in a] == [t["config"] for t in b] and len(a) == 2
    assert [t["objective"] for t in a] == pytest.approx([t["objective"] for t in b], rel=1e-6)
    best = {r["trial_id"]: r["config"] for r in first["trials"]}[first["best"]]
    assert {r["trial_id"]: r["config"] for r in second["trials"]}[second["best"]] == best
    assert all(abs(x["metrics"]["test/v2"] - y["metrics"]["test/v2"]) > 1e-3 for x, y in zip(a, b))


@pytest.mark.slow
def test_a_pin_of_no_trial_of_the_sweep_is_refused_before_any_trial_trains(sweep_lineage):
    """A pin is read once every trial has finished: one naming no trial of the sweep (a new sweep's
    ids are not known before it runs) had the whole sweep trained, then refused, its results unwritten."""
    from conftest import FAST_TRIALS

    for name in ("pinned-new", "pinned-new"):  # the refusal leaves nothing behind to resume
        cfg = with_cli(load_config(sweep_lineage, [*FAST_TRIALS, "sweep.num_samples=1"]), name, "0123abcd")
        with pytest.raises(ConfigError, match=r"sweep.pin \(--pin\): '0123abcd' is not a trial of sweep "
                                              r"'pinned-new' of v2 \(it has no trials yet\)"):
            run_sweep(cfg, "v2")
        assert not (Path(cfg.run_dir) / "sweeps" / "v2" / name).exists()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep_lineage, tmp_path):
    """``raypath sweep`` gets SIGINT once two trials finished; the same command resumes it."""
    import signal
    import subprocess
    import sys
    import time

    import ray

    from conftest import sweep_snapshot

    name = "interrupted"
    cfg = load_config(sweep_lineage, [f"sweep.name={name}"])
    sc = cfg.sweep
    sweep_dir = Path(cfg.run_dir) / "sweeps" / "v2" / name
    log_path = tmp_path / "interrupted.log"
    cmd = [sys.executable, "-m", "raypath.cli", "sweep", str(sweep_lineage), "--version", "v2", "--name", name,
           "--set", f"cluster.address={ray.get_runtime_context().gcs_address}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(sweep_dir.glob("exports/*/model_card.json"))) >= 2:
                break
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    out = log_path.read_text()
    done = sorted(p.parent.name for p in sweep_dir.glob("exports/*/model_card.json"))
    assert rc == 130 and "raypath: interrupted; what finished is kept" in out, out[-3000:]  # not a finished sweep
    assert 2 <= len(done) < sc.num_samples and "was interrupted" in out, out[-3000:]
    assert Lineage.load(cfg.run_dir).sweep("v2", name).released is None  # nothing released mid-sweep
    before = sweep_snapshot(sweep_dir)

    record = run_sweep(cfg, "v2")
    after = sweep_snapshot(sweep_dir)
    assert record["resumed"] and record["complete"] and len(record["trials"]) == sc.num_samples
    assert set(before["trials"]) <= set(after["trials"]) and len(after["trials"]) == sc.num_samples
    for seg in done:  # finished trials were not run again
        assert after["curves"][f"{seg}.jsonl"] == before["curves"][f"{seg}.jsonl"]
        assert [c for c in after["checkpoints"] if seg in c] == [c for c in before["checkpoints"] if seg in c]
    assert len(optuna_study(sweep_dir).trials) == sc.num_samples
    # the release is decided over both sweeps' trials: the best of them all
    best = min(t["score"] for t in record["trials"] if t.get("score") is not None)
    assert Lineage.load(cfg.run_dir).release("v2").score <= best + 1e-9


def test_ctrl_c_ends_a_sweep_as_interrupted_not_as_finished(ray_cluster, tmp_path):
    """Tune catches the first SIGINT, saves the experiment and returns as after a whole run: the
    sweep then recorded its unfinished trials as a finished sweep and exited 0."""
    import os
    import signal

    from ray import tune

    from raypath.sweep import fit_noting_ctrl_c

    driver = os.getpid()

    def interrupting(config):
        os.kill(driver, signal.SIGINT)  # Ctrl-C on the driver while a trial runs
        import time

        time.sleep(10)
        tune.report({"x": 1})

    def finishing(config):
        tune.report({"x": 1})

    before = signal.getsignal(signal.SIGINT)
    _, interrupted = fit_noting_ctrl_c(tune.Tuner(tune.with_resources(interrupting, {"cpu": 0.01}),
                                                  run_config=tune.RunConfig(storage_path=str(tmp_path), name="a")))
    assert interrupted and signal.getsignal(signal.SIGINT) is before
    results, interrupted = fit_noting_ctrl_c(tune.Tuner(tune.with_resources(finishing, {"cpu": 0.01}),
                                                        run_config=tune.RunConfig(storage_path=str(tmp_path),
                                                                                  name="b")))
    assert not interrupted and not results.errors
    assert signal.getsignal(signal.SIGINT) is before  # Tune's handler taken back


def test_a_trial_interrupted_before_its_first_report_leaves_the_sweep_unfinished(ray_cluster, tmp_path):
    """Ctrl-C just after a trial was started (its Tune actor not up yet) leaves Tune no config of it:
    the trial was recorded as done, the sweep as complete (and the lineage's sweep record with it).
    A trial waiting for resources is in the same state, and deterministically so."""
    import os
    import signal
    import threading
    from types import SimpleNamespace

    from ray import tune

    from raypath import sweep
    from raypath.mirror import LOCAL

    def never_runs(config):
        tune.report({"x": 1})

    ctrl_c = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    try:
        results, interrupted = sweep.fit_noting_ctrl_c(tune.Tuner(
            tune.with_resources(never_runs, {"cpu": 0.01, "raypath_test_absent": 1}), param_space={"fraction": 0.2},
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="v2")))
    finally:
        ctrl_c.cancel()
    assert interrupted and not results[0].config  # what Tune hands back of such a trial
    plan = sweep.SweepPlan(SimpleNamespace(versions=[{"name": "v1"}, {"name": "v2"}], rd=LOCAL), 1, None,
                           str(tmp_path / "v2"), {"v1": 0.5, "v2": 0.5}, 0.0, 1)
    records = sweep._trial_records(plan, results, {})
    assert [t["status"] for t in records] == ["incomplete"]
    outcome, settled = sweep._outcome(SweepConfig(num_samples=1), records, {})
    assert not settled and not outcome["complete"] and outcome["best"] is None


def test_a_trials_reports_reach_tune_in_order_and_it_ends_however_slow_tunes_main_thread(ray_cluster, tmp_path,
                                                                                       caplog):
    """A trial's Train reports reach Tune through its own relay thread, then its final report:
    Tune's main thread only takes results. Ray's Train->Tune hand-over had that thread forward each
    report into a one-slot queue that the trial's final report fills too, and a forward slower than
    the trial (here 1.5 s, as on a loaded machine) left both waiting for ever."""
    import threading
    import time

    from ray import tune

    from raypath.sweep import _report_callback, _TuneRelay

    def trial(config):
        from ray.train._internal import session

        forward = session._TrainSession.report

        def slow_on_tunes_thread(self, *args, **kwargs):  # in this trial's process only
            if threading.current_thread() is threading.main_thread():
                time.sleep(1.5)
            return forward(self, *args, **kwargs)

        session._TrainSession.report = slow_on_tunes_thread
        relay = _TuneRelay()
        callback = _report_callback(relay.queue, {"fork_step": 3}, 0.5)
        callback.after_report(None, [{"step": 0}], None)  # a checkpoint before any evaluation: no score yet
        for step in range(3):  # as the Train controller calls it, one report after another
            callback.after_report(None, [{"objective": float(step), "step": step}], None)
        callback.after_report(None, [{"step": 3}], None)  # a checkpoint-only report keeps the last score
        relay.close()
        tune.report({"objective": 9.0, "final": True,
                     "tune_forwarded": session.get_session()._inter_actor_queue is not None})

    out: dict = {}
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.01}),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="relay", verbose=0))
    runner = threading.Thread(target=lambda: out.update(results=tuner.fit()), daemon=True)
    runner.start()
    runner.join(timeout=300)
    assert not runner.is_alive(), "the trial never ended: Tune's main thread and the trial wait on each other"
    result = out["results"][0]
    assert result.error is None
    rows = result.metrics_dataframe
    assert rows["objective"].tolist()[:3] == [0.0, 1.0, 2.0] and rows["objective"].tolist()[4] == 9.0
    assert rows["score"].tolist()[:4] == [0.5, 1.5, 2.5, 2.5] and (rows["fork_step"][:4] == 3).all()
    assert result.metrics["final"] and not result.metrics["tune_forwarded"]
    # Not passed on as an inf score, which Tune's TensorBoard logger (tensorboardX) warned about.
    assert len(rows) == 5 and not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]


def test_a_trial_that_tune_stops_ends_while_its_branch_still_reports(ray_cluster, tmp_path):
    """Tune stops a trial (the law's stopper, an early-stopping scheduler) at a result: the relay's
    report then ends, and the trial ends with the branch still training and reporting."""
    import threading
    import time

    from ray import tune

    from raypath.sweep import _report_callback, _TuneRelay

    def trial(config):
        relay = _TuneRelay()
        callback = _report_callback(relay.queue, {}, 0.0)
        for step in range(6000):  # a branch of 10 minutes; Tune stops it at its second result
            callback.after_report(None, [{"objective": float(step), "step": step}], None)
            time.sleep(0.1)
        relay.close()

    out: dict = {}
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.01}),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="stop", verbose=0,
                                                 stop={"training_iteration": 2}))
    runner = threading.Thread(target=lambda: out.update(results=tuner.fit()), daemon=True)
    runner.start()
    runner.join(timeout=300)  # well before the branch would end
    assert not runner.is_alive(), "a stopped trial kept its sweep waiting"
    result = out["results"][0]
    assert result.error is None and result.metrics["training_iteration"] == 2
    assert result.metrics_dataframe["objective"].tolist() == [0.0, 1.0]


def test_a_sweep_whose_tune_state_an_older_raypath_pickled_is_refused_by_file(ray_cluster, tmp_path):
    """Tune restores a sweep from ``tuner.pkl``, which pickles raypath's own objects (the law's
    stopper, then ``raypath.lawfit.LawStopper``): a class moved since is named with the file."""
    import types

    from raypath import sweep
    from raypath.storage import RunFileError

    sweep_dir = tmp_path / "run" / "sweeps" / "v2" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "tuner.pkl").write_bytes(b"craypath.lawfit\nLawStopper\n.")  # a pickled reference to it
    plan = types.SimpleNamespace(sweep_dir=str(sweep_dir))
    with pytest.raises(RunFileError, match=r"tuner\.pkl: sweep 's' was started by an older raypath .*LawStopper.*"
                                           r"release candidates of v2: search on in a new sweep \(--name\)"):
        sweep._make_tuner(plan, SweepConfig(), None, 1, sweep_dir, None, restore=True)
