"""The law benchmark's guided-vs-unguided arithmetic, on sweep records written by hand.

The sweeps themselves are real runs (``benchmarks/law_accuracy.py``); these tests pin how
their records are counted: trials in proposal order, misses, per-seed means, the plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("law_accuracy", ROOT / "benchmarks" / "law_accuracy.py")
la = importlib.util.module_from_spec(spec)
spec.loader.exec_module(la)


def _record(objectives, tokens=100):
    """A sweep record whose trials were proposed in the listed order (None = stopped)."""
    trials = [{"trial_id": f"t{i}", "order": i, "status": "done" if o is not None else "stopped",
               "objective": o, "branch_tokens": tokens, "config": {"shape": "cosine"}}
              for i, o in enumerate(objectives, 1)]
    trials.reverse()  # results.json is not in proposal order
    return {"trials": trials, "search_tokens": tokens * len(trials)}


def test_trials_to_reach_counts_in_proposal_order_and_skips_stopped():
    rec = _record([4.30, None, 4.21, 4.20])
    assert la.trials_to_reach(rec, 4.215) == 3
    assert la.trials_to_reach(rec, 4.20) == 4
    assert la.trials_to_reach(rec, 4.0) is None


def test_guided_vs_unguided_means_over_seeds_and_counts_a_miss_as_n_plus_1():
    sweeps = {"guided": _record([4.50, 4.21, 4.40]),
              "unguided-s0": _record([4.23, 4.20, 4.25]),    # best 4.20: within 0.5% <= 4.221, 1% <= 4.242
              "unguided-s1": _record([4.100, 4.30, 4.30])}   # best 4.10: guided never within 0.5%
    out = la.guided_vs_unguided(sweeps)
    assert out["trials_to_target"] == {"unguided-s0": {"guided": 2, "unguided": 2},
                                       "unguided-s1": {"guided": None, "unguided": 1}}
    assert out["mean_guided"] == pytest.approx((2 + 4) / 2)  # the miss counts as 3 trials + 1
    assert out["mean_unguided"] == pytest.approx(1.5)
    assert out["ratio_guided_to_unguided"] == pytest.approx(2.0)
    # at 1% s0's first trial (4.23) already counts
    assert out["trials_to_within"]["1.0%"]["unguided-s0"] == {"guided": 2, "unguided": 1}
    assert out["mean_trials_to_within"]["0.5%"]["ratio"] == pytest.approx(out["ratio_guided_to_unguided"])
    assert out["unguided_best_objective"] == {"unguided-s0": 4.20, "unguided-s1": 4.10}


def test_plot_search_writes_a_png(tmp_path):
    sweeps = {"guided": _record([4.3, 4.2]), "unguided-s0": _record([None, 4.25])}
    png = la.plot_search(sweeps, tmp_path / "law" / "benchmark.png", release=4.4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_acceptance_reads_half_of_the_budget_and_of_both_unguided_counts():
    sweeps = {"guided": _record([4.21, 4.50, 4.50, 4.50]),
              "unguided-s0": _record([4.30, 4.22, 4.25, 4.20]),  # best at trial 4; within 0.5% at trial 2
              "unguided-s1": _record([4.21, 4.30, 4.30, 4.30])}  # best at trial 1
    acc = la.guided_vs_unguided(sweeps)["acceptance"]
    assert acc["budget"] == 4 and acc["unguided_trials_to_best"] == {"unguided-s0": 4, "unguided-s1": 1}
    budget, to_best, within = acc["readings"].values()
    assert acc["mean_guided_trials_within"] == 1.0
    assert budget == {"of": 4, "half": 2.0, "ratio": 0.25, "met": True}
    assert to_best["of"] == 2.5 and to_best["met"] is True   # 1 <= 1.25
    assert within["of"] == 1.5 and within["met"] is False    # 1 > 0.75: s1's first draw was already there


def test_guided_first_trial_within_reads_each_unguided_best():
    sweeps = {"guided": _record([4.21, 4.50]),
              "unguided-s0": _record([4.30, 4.20]),   # 4.21 <= 4.20 * 1.005
              "unguided-s1": _record([4.10, 4.30])}   # 4.21 > 4.10 * 1.005
    assert la.guided_vs_unguided(sweeps)["guided_first_trial_within"] == {"unguided-s0": True, "unguided-s1": False}


def test_fit_releases_last_or_every_versions_release_branch():
    lineage = {"main_path": [{"version": "v1", "start_step": 0}, {"version": "v2", "start_step": 10}],
               "branches": [{"name": "branch-v1", "version": "v1"}, {"name": "branch-v2", "version": "v2"},
                            {"name": "branch-v2-extra", "version": "v2"}]}
    assert la.fit_releases(lineage, "last") == ["branch-v2"]
    assert la.fit_releases(lineage, "all") == ["branch-v1", "branch-v2"]


def test_lr_scan_row_reads_a_finished_lineage_and_reports_the_best_lr(tiny_run, tmp_path, capsys):
    from raypath import lawfit
    from raypath.lineage import Lineage

    cfg, _ = tiny_run
    lineage = Lineage.load(cfg.run_dir)
    row = la.scan_row(Path(cfg.run_dir), lineage, 3e-3)
    version, release, weights = la.release_branch(lineage)
    assert set(row["fits"]) == set(row["main_noise"]) == set(lawfit.splits_for(lineage, version)) == set(weights)
    assert row["release_objective"] == pytest.approx(sum(w * row["release_losses"][s] for s, w in weights.items()))
    assert row["release_losses"] == {s: release.metrics[f"val/{s}"] for s in weights}
    # the main path's own jitter: positive and far below the losses' level
    assert all(0.0 < n < 0.2 for n in row["main_noise"].values()), row["main_noise"]
    assert all(f["r2"] <= 1.0 and f["n_points"] >= 4 for f in row["fits"].values()), row["fits"]
    lower = {**row, "lr": 1.5e-3, "release_objective": row["release_objective"] - 0.1}
    scan = {"lrs": [row, lower], "best_lr": 1.5e-3}
    la.print_lr_scan(scan)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lr 0.003: release objective") and "<- best" not in lines[0]
    assert lines[1].startswith("lr 0.0015:") and lines[1].endswith("<- best")
    png = la.plot_lr_scan(scan, tmp_path / "lr_scan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
