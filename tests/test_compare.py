"""PTFS vs CPT vs path switching on the tiny corpus: shape-matched baselines, the paper's cosine
rows, a replay variant, test-split columns, costs and LR paths by definition."""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypath.compare import MATCHED, PAPER, baseline_decays, window
from raypath.config import load_config
from raypath.cost import paradigm_costs
from raypath.report import read_curve
from raypath.schedules import Decay, Window

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["branch.shape=1-sqrt", "branch.min_lr_ratio=0.05"]  # not the tiny run's cosine: a mismatch would show


def test_baselines_share_the_branch_shape_and_floor_unless_the_paper_setting_is_asked():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SHAPE)
    assert baseline_decays(cfg) == {MATCHED: Decay("1-sqrt", 0.05, cfg.branch.power)}
    paper = load_config(ROOT / "configs" / "tiny.yaml", [*SHAPE, "compare.paper_baselines=true"])
    assert baseline_decays(paper) == {MATCHED: cfg.branch.decay(), PAPER: Decay("cosine", 0.05)}
    ctx = types.SimpleNamespace(cfg=cfg)
    t = cfg.train
    w = window(ctx, cfg.branch.decay(), 105)  # 100 decay steps after 5 warmup steps
    assert (w.shape, w.min_lr_ratio, w.power) == ("1-sqrt", 0.05, cfg.branch.power)
    assert w(104) == pytest.approx(0.05 * t.max_lr)  # the last step at the branch's floor
    # 1-sqrt at progress 25/99 left: 1 - sqrt(25/99) of the way from max to the floor
    assert w(30) == pytest.approx(0.05 * t.max_lr + 0.95 * t.max_lr * (1 - np.sqrt(25 / 99)))


#: The baselines, the paper rows and one replay lineage next to the tiny lineage: minutes on 2 CPUs.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def comparison(tiny_run, tmp_path_factory):
    """A 2-version comparison reusing the session's tiny lineage's main path; its branches are
    re-trained with another shape (1-sqrt to 0.05) that the baselines must then match."""
    from conftest import copy_first_versions, tiny_config

    from raypath.compare import run_comparison
    from raypath.lineage import Lineage

    cfg, _ = tiny_run
    dst = copy_first_versions(Path(cfg.run_dir), tmp_path_factory.mktemp("compare") / "run", 2)
    lin = Lineage.load(dst)
    for key in ("branches", "releases"):
        lin.data[key] = []
    lin.data["release_history"] = {}
    lin.save()
    for d in [*dst.glob("ray/branch-*"), dst / "exports", dst / "releases"]:
        shutil.rmtree(d, ignore_errors=True)
    ccfg = tiny_config(dst, "data.versions=[v1, v2]", *SHAPE, "compare.replay_ratios=[0.25]",
                       "compare.paper_baselines=true")
    paths = run_comparison(ccfg)
    return ccfg, Lineage.load(dst).data, paths


@slow
def test_outputs_rows_and_cost_ratios(comparison):
    cfg, lin, paths = comparison
    df = pd.read_csv(paths["table"])
    labels = ["PTFS", "CPT", "PS", "PS replay 0.25", "PTFS cosine (paper)", "CPT cosine (paper)"]
    assert list(df["version"]) == ["v1"] * 6 + ["v2"] * 6
    assert list(df["paradigm"]) == labels * 2
    by = {(r["version"], r["paradigm"]): r for _, r in df.iterrows()}
    assert {by[("v2", p)]["decay"] for p in ("PTFS", "CPT", "PS", "PS replay 0.25")} == {"1-sqrt->0.05"}
    assert by[("v2", "PTFS cosine (paper)")]["decay"] == "cosine->0.05"
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    blocks = [v["new_blocks"] for v in lin["versions"]]
    # PTFS release k trains every whole global batch of versions 1..k, from scratch.
    ptfs = [(blocks[0] // G) * G * L, (sum(blocks) // G) * G * L]
    assert [by[(v, "PTFS")]["tokens_cumulative"] for v in ("v1", "v2")] == [ptfs[0], ptfs[0] + ptfs[1]]
    assert by[("v2", "PTFS cosine (paper)")]["tokens_cumulative"] == ptfs[0] + ptfs[1]
    # Against the cost model on the same per-version token counts.
    trained = [(v["stream_rows"] // G) * G * L for v in lin["versions"]]
    model = paradigm_costs(trained, cfg.branch.fraction)
    assert by[("v2", "CPT")]["cost_ratio"] == pytest.approx(model[-1]["cpt_ratio"], rel=0.03)
    assert by[("v2", "PS")]["cost_ratio"] == pytest.approx(model[-1]["path_switching_ratio"], rel=0.05)
    assert by[("v2", "PS")]["cost_ratio_with_search"] == by[("v2", "PS")]["cost_ratio"]  # no sweep ran
    assert by[("v2", "CPT")]["cost_ratio"] < by[("v2", "PS")]["cost_ratio"] < \
        by[("v2", "PS replay 0.25")]["cost_ratio"]
    # every row has val and held-out test losses; gaps are on test
    assert np.isfinite(df[["val_own", "test_own", "val_mean", "test_mean"]].to_numpy()).all()
    assert (df[df["paradigm"] == "PTFS"]["gap_test_own"] == 0).all()
    cpt, ptfs = by[("v2", "CPT")], by[("v2", "PTFS")]
    assert cpt["gap_test_own"] == pytest.approx(cpt["test_own"] - ptfs["test_own"])
    replay = Path(lin["compare"]["replay"]["0.25"])
    rep = __import__("json").loads((replay / "lineage.json").read_text())
    assert [v["replay_blocks"] > 0 for v in rep["versions"]] == [False, True]
    assert [v["test_blocks"] for v in rep["versions"]] == [v["test_blocks"] for v in lin["versions"]]
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gap test own" in Path(paths["text"]).read_text()


@slow
def test_each_paradigm_lr_path_matches_its_definition_and_ends_at_the_floor(comparison):
    cfg, lin, _ = comparison
    t = cfg.train
    floor = 0.05 * t.max_lr
    matched = dataclasses.asdict(cfg.branch.decay())
    for decay in (cfg.branch.decay(), Decay("cosine", 0.05)):
        want = dataclasses.asdict(decay)
        ptfs = {e["version"]: e for e in lin["compare"]["ptfs"] if e["decay"] == want}
        cpt = {e["version"]: e for e in lin["compare"]["cpt"] if e["decay"] == want}
        assert set(ptfs) == set(cpt) == {"v1", "v2"}
        for e in ptfs.values():  # from scratch: warmup + decay over the release's own steps
            curve = read_curve(e["curve"])
            sched = Window(t.max_lr, t.warmup_steps, e["end_step"], 0, 0.05, 0.0, decay.shape, decay.power)
            assert e["start_step"] == 0
            assert np.allclose(curve["lr"], [sched(s - 1) for s in curve["step"]], rtol=1e-9)
            assert curve["lr"].iloc[-1] == pytest.approx(floor)  # the last trained step is at the floor
        assert cpt["v1"]["segment"] == ptfs["v1"]["segment"]  # CPT's first release is PTFS's
        e = cpt["v2"]  # continues after release 1: re-warm from the floor, then the same decay
        assert e["start_step"] == ptfs["v1"]["end_step"]
        sched = Window(t.max_lr, t.warmup_steps, e["end_step"] - e["start_step"], e["start_step"], 0.05, floor,
                       decay.shape, decay.power)
        curve = read_curve(e["curve"])
        assert np.allclose(curve["lr"], [sched(s - 1) for s in curve["step"]], rtol=1e-9)
        assert curve["lr"].iloc[-1] == pytest.approx(floor)
    for b in lin["branches"]:  # path switching's branches: the same shape and floor
        assert b["decay"] == matched
        assert read_curve(b["curve"])["lr"].iloc[-1] == pytest.approx(floor)


def test_the_comparison_of_a_run_not_compared_yet_is_empty_with_its_columns(tmp_path):
    from test_report import _write_run, make_lineage

    from raypath.compare import comparison_table, format_comparison

    df = comparison_table(_write_run(tmp_path / "run", make_lineage()))
    assert df.empty
    assert list(df.columns) == ["version", "paradigm", "decay", "val_own", "test_own", "val_mean", "test_mean",
                                "tokens_cumulative", "cost_ratio", "cost_ratio_with_search", "gap_test_own",
                                "gap_val_own"]
    assert df[df["paradigm"] == "PS"].empty  # what a notebook filters on works on no rows
    assert format_comparison(df).splitlines()[1].split()[:2] == ["version", "paradigm"]
