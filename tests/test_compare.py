"""PTFS vs CPT vs path switching on the tiny corpus: costs and LR paths by definition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypath.cost import paradigm_costs
from raypath.report import read_curve
from raypath.schedules import Cosine

#: PTFS and CPT baselines trained next to the tiny lineage: ~4 min on 2 CPUs.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def comparison(tiny_run, tmp_path_factory):
    """A 2-version comparison reusing the session's tiny lineage (path switching done)."""
    import shutil

    from conftest import tiny_config

    from raypath.compare import run_comparison
    from raypath.lineage import Lineage

    cfg, _ = tiny_run
    dst = tmp_path_factory.mktemp("compare") / "run"
    shutil.copytree(cfg.run_dir, dst, symlinks=True)
    for f in dst.rglob("*.json"):
        f.write_text(f.read_text().replace(str(cfg.run_dir), str(dst)))
    ccfg = tiny_config(dst, "data.versions=[v1, v2]")
    paths = run_comparison(ccfg)
    return ccfg, Lineage.load(dst).data, paths


def test_outputs_and_cost_ratios(comparison):
    cfg, lin, paths = comparison
    df = pd.read_csv(paths["table"])
    assert list(df["version"]) == ["v1", "v2"]
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    blocks = [v["new_blocks"] for v in lin["versions"]]
    # PTFS release k trains every whole global batch of versions 1..k, from scratch.
    ptfs = [(blocks[0] // G) * G * L, (sum(blocks) // G) * G * L]
    assert list(df["ptfs_tokens_cumulative"]) == [ptfs[0], ptfs[0] + ptfs[1]]
    # Against the cost model on the same per-version token counts.
    trained = [(v["stream_rows"] // G) * G * L for v in lin["versions"]]
    model = paradigm_costs(trained, cfg.branch.fraction)
    assert df["cpt_cost_ratio"].iloc[-1] == pytest.approx(model[-1]["cpt_ratio"], rel=0.03)
    assert df["path_switching_cost_ratio"].iloc[-1] == pytest.approx(model[-1]["path_switching_ratio"], rel=0.05)
    assert df["cpt_cost_ratio"].iloc[-1] < df["path_switching_cost_ratio"].iloc[-1] < 1.0
    assert np.isfinite(df[[c for c in df.columns if "val" in c]].to_numpy()).all()
    from pathlib import Path

    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_paradigm_lr_path_matches_its_definition(comparison):
    cfg, lin, _ = comparison
    t, floor = cfg.train, cfg.branch.min_lr_ratio * cfg.train.max_lr
    ptfs = {e["version"]: e for e in lin["compare"]["ptfs"]}
    cpt = {e["version"]: e for e in lin["compare"]["cpt"]}
    for _name, e in ptfs.items():  # from scratch: warmup + cosine over the release's own steps
        curve = read_curve(e["curve"])
        sched = Cosine(t.max_lr, t.warmup_steps, e["end_step"], 0, cfg.branch.min_lr_ratio)
        assert e["start_step"] == 0
        assert np.allclose(curve["lr"], [sched(s - 1) for s in curve["step"]], rtol=1e-9)
    assert cpt["v1"]["segment"] == ptfs["v1"]["segment"]  # CPT's first release is PTFS's
    e = cpt["v2"]  # continues after release 1: re-warm from the floor, then cosine
    assert e["start_step"] == ptfs["v1"]["end_step"]
    sched = Cosine(t.max_lr, t.warmup_steps, e["end_step"] - e["start_step"], e["start_step"],
                   cfg.branch.min_lr_ratio, floor)
    curve = read_curve(e["curve"])
    assert np.allclose(curve["lr"], [sched(s - 1) for s in curve["step"]], rtol=1e-9)
    assert curve["lr"].iloc[-1] == pytest.approx(sched(e["end_step"] - 1))
