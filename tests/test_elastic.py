"""Elastic worker groups with real resizes: a node joins (grow to 2), a node is killed (shrink to 1).

The scenario (``tests/elastic_scenario.py``) runs in its own process on its own
3-node local Ray cluster; this test checks what it left behind: the worker group
really changed size mid-segment, and steps, tokens and rows stayed exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raypath import checkpoint as ckpt
from raypath.data import Consumed

SCENARIO = Path(__file__).with_name("elastic_scenario.py")


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, nobody else's
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    res = subprocess.run([sys.executable, str(SCENARIO), str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    (out / "scenario.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"scenario failed, log {out / 'scenario.log'}:\n{res.stderr[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    assert not result["errors"], result["errors"]
    records = [json.loads(line) for line in Path(result["curve"]).read_text().splitlines()]
    return result, records


@pytest.mark.slow
def test_group_grows_and_shrinks_mid_segment(elastic):
    result, records = elastic
    assert [a["action"] for a in result["actions"]] == ["add_node", "remove_node"]
    starts = [r for r in records if r.get("event") == "start"]
    sizes = [s["world_size"] for s in starts]
    assert sizes[0] == 1, "starts with the one worker that fits"
    grow = sizes.index(2)
    assert 1 in sizes[grow:], f"never shrank back: {sizes}"
    assert starts[grow]["time"] > result["actions"][0]["time"]  # grew because the node joined
    shrink = grow + sizes[grow:].index(1)
    assert starts[shrink]["time"] > result["actions"][1]["time"]  # shrank because it died
    for s in starts[1:]:  # every restart continued from a checkpoint: a periodic one
        assert s["step"] > 0 and s["step"] % result["every"] == 0
        assert s["checkpoint"].endswith(ckpt.step_dir_name(s["step"]))


@pytest.mark.slow
def test_steps_tokens_and_rows_stay_exact(elastic):
    result, records = elastic
    G, L, steps = result["global_batch"], result["seq_len"], result["steps"]
    world = None
    logged = set()
    for r in records:
        if r.get("event") == "start":
            world = r["world_size"]
            continue
        # The global batch is fixed whatever the world size: accumulation adapts.
        assert r["tokens"] == r["step"] * G * L, r
        assert r["world_size"] == world
        logged.add(r["step"])
    assert logged == set(range(1, steps + 1))  # log_every=1: no step skipped
    final = ckpt.load_state(Path(result["storage"]) / ckpt.step_dir_name(steps))
    assert final["step"] == steps and final["tokens"] == steps * G * L
    assert Consumed.from_list(final["consumed"]).intervals == [[0, steps * G]]  # every row once
