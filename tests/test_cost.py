"""Tests of raypath.cost against hand-computed token counts (literals, not formulas)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypath.cost import format_costs, format_measured, lineage_costs, paradigm_costs, stream_tokens

REL = 1e-12


def _col(rows, key):
    return [r[key] for r in rows]


def test_three_versions_no_replay():
    rows = paradigm_costs([100, 200, 300], 0.25)
    assert _col(rows, "version") == [1, 2, 3]
    assert _col(rows, "new_tokens") == [100, 200, 300]
    # PTFS re-trains on everything seen so far
    assert _col(rows, "ptfs_tokens") == pytest.approx([100, 300, 600], rel=REL)
    assert _col(rows, "ptfs_cumulative") == pytest.approx([100, 400, 1000], rel=REL)
    # CPT trains each version's data once
    assert _col(rows, "cpt_tokens") == pytest.approx([100, 200, 300], rel=REL)
    assert _col(rows, "cpt_cumulative") == pytest.approx([100, 300, 600], rel=REL)
    # path switching: main path + a branch over the last 25%
    assert _col(rows, "path_switching_tokens") == pytest.approx([125, 250, 375], rel=REL)
    assert _col(rows, "path_switching_cumulative") == pytest.approx([125, 375, 750], rel=REL)
    # ratios are cumulative / cumulative PTFS
    assert _col(rows, "cpt_ratio") == pytest.approx([1.0, 0.75, 0.6], rel=REL)  # 100/100, 300/400, 600/1000
    assert _col(rows, "path_switching_ratio") == pytest.approx([1.25, 0.9375, 0.75], rel=REL)  # 125/100, 375/400
    assert rows[-1]["cpt_ratio"] == pytest.approx(600 / 1000, rel=REL)
    assert rows[-1]["path_switching_ratio"] == pytest.approx(750 / 1000, rel=REL)


def test_row_keys():
    row = paradigm_costs([1.0], 0.5)[0]
    assert set(row) == {
        "version", "new_tokens",
        "ptfs_tokens", "cpt_tokens", "path_switching_tokens",
        "ptfs_cumulative", "cpt_cumulative", "path_switching_cumulative",
        "cpt_ratio", "path_switching_ratio",
    }
    assert row["path_switching_tokens"] == pytest.approx(1.5, rel=REL)


def test_three_versions_with_replay():
    rows = paradigm_costs([100, 200, 300], 0.25, replay_ratio=0.2)
    # streams: version 1 has nothing to replay; later ones D / (1 - 0.2)
    assert stream_tokens([100, 200, 300], 0.2) == pytest.approx([100, 250, 375], rel=REL)
    assert _col(rows, "cpt_tokens") == pytest.approx([100, 250, 375], rel=REL)
    assert _col(rows, "cpt_cumulative") == pytest.approx([100, 350, 725], rel=REL)
    # PTFS does not replay: it trains each version's new data once
    assert _col(rows, "ptfs_tokens") == pytest.approx([100, 300, 600], rel=REL)
    assert _col(rows, "ptfs_cumulative") == pytest.approx([100, 400, 1000], rel=REL)
    assert _col(rows, "path_switching_tokens") == pytest.approx([125, 312.5, 468.75], rel=REL)
    assert _col(rows, "path_switching_cumulative") == pytest.approx([125, 437.5, 906.25], rel=REL)
    assert _col(rows, "cpt_ratio") == pytest.approx([1.0, 0.875, 0.725], rel=REL)
    assert _col(rows, "path_switching_ratio") == pytest.approx([1.25, 1.09375, 0.90625], rel=REL)
    assert _col(rows, "new_tokens") == [100, 200, 300]


def test_stream_tokens():
    assert stream_tokens([100, 200, 300]) == [100, 200, 300]
    assert stream_tokens([100, 200, 300], 0.5) == pytest.approx([100, 400, 600], rel=REL)
    assert stream_tokens([80], 0.9) == [80]
    assert stream_tokens([], 0.2) == []


def test_equal_versions():
    rows = paradigm_costs([1, 1, 1, 1], 0.2)
    assert _col(rows, "ptfs_cumulative") == pytest.approx([1, 3, 6, 10], rel=REL)
    assert _col(rows, "path_switching_cumulative") == pytest.approx([1.2, 2.4, 3.6, 4.8], rel=REL)
    assert _col(rows, "cpt_cumulative") == pytest.approx([1, 2, 3, 4], rel=REL)
    assert rows[-1]["path_switching_ratio"] == pytest.approx(0.48, rel=REL)  # 4.8 / 10
    assert rows[-1]["cpt_ratio"] == pytest.approx(0.4, rel=REL)  # 4 / 10
    assert _col(rows, "path_switching_ratio") == pytest.approx([1.2, 0.8, 0.6, 0.48], rel=REL)


def test_empty_lineage_plan():
    assert paradigm_costs([], 0.2) == []


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="branch_fraction"):
        paradigm_costs([100, 200], fraction)


@pytest.mark.parametrize("replay", [1.0, 1.2, -0.1])
def test_bad_replay(replay):
    with pytest.raises(ValueError, match="replay_ratio"):
        paradigm_costs([100, 200], 0.2, replay)


# ---------------------------------------------------------------- measured lineage


def _lineage() -> dict:
    return {
        "versions": [
            {"name": "v1", "new_tokens": 100},
            {"name": "v2", "new_tokens": 200},
            {"name": "v3", "new_tokens": 300},
        ],
        "main_path": [
            {"version": "v1", "tokens_start": 0, "tokens_end": 100},
            {"version": "v2", "tokens_start": 100, "tokens_end": 350},
            {"version": "v3", "tokens_start": 350, "tokens_end": 725},
        ],
        "branches": [
            {"name": "v1-a", "version": "v1", "status": "done", "tokens_trained": 20},
            {"name": "v2-a", "version": "v2", "status": "failed", "tokens_trained": 999},
            {"name": "v2-b", "version": "v2", "status": "done", "tokens_trained": 50},
            {"name": "v3-a", "version": "v3", "status": "running", "tokens_trained": 30},
        ],
    }


def test_lineage_costs_by_hand():
    rows = lineage_costs(_lineage())
    assert _col(rows, "version") == ["v1", "v2", "v3"]
    assert _col(rows, "main_tokens") == [100, 250, 375]
    assert _col(rows, "branch_tokens") == [20, 50, 0]  # failed and unfinished branches do not count
    assert _col(rows, "ptfs_cumulative") == pytest.approx([100, 400, 1000], rel=REL)
    assert _col(rows, "path_switching_cumulative") == pytest.approx([120, 420, 795], rel=REL)
    # 120/100, 420/400, 795/1000
    assert _col(rows, "path_switching_ratio") == pytest.approx([1.2, 1.05, 0.795], rel=REL)


def test_lineage_costs_in_progress_run():
    lin = _lineage()
    lin["main_path"] = lin["main_path"][:2]  # v3 not trained yet
    rows = lineage_costs(lin)
    assert _col(rows, "version") == ["v1", "v2"]
    assert rows[-1]["path_switching_ratio"] == pytest.approx(1.05, rel=REL)
    lin["branches"] = []
    assert _col(lineage_costs(lin), "path_switching_cumulative") == pytest.approx([100, 350], rel=REL)
    assert lineage_costs({"versions": lin["versions"], "main_path": []}) == []


# ---------------------------------------------------------------- formatting


def test_format_costs_one_line_per_version_plus_header():
    rows = paradigm_costs([100, 200, 300], 0.25)
    text = format_costs(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    header = lines[0]
    for col in ("version", "PTFS cum", "CPT cum", "PS cum", "CPT/PTFS", "PS/PTFS"):
        assert col in header
    # each version line: index, new, cumulative PTFS / CPT / PS, then the two ratios
    assert lines[1].split() == ["1", "100", "100", "100", "125", "1.000", "1.250"]
    assert lines[2].split() == ["2", "200", "400", "300", "375", "0.750", "0.938"]
    assert lines[3].split() == ["3", "300", "1000", "600", "750", "0.600", "0.750"]
    # columns line up under the header
    assert {len(line) for line in lines} == {len(header)}


def test_format_costs_many_versions():
    rows = paradigm_costs([1e9] * 12, 0.1)
    lines = format_costs(rows).splitlines()
    assert len(lines) == 13
    assert lines[-1].split()[0] == "12"
    assert lines[-1].split()[2] == "7.8e+10"  # 78 * 1e9 cumulative PTFS
    assert format_costs([]).splitlines() == [format_costs(rows).splitlines()[0]]


def test_lineage_costs_count_the_search_when_a_sweep_released():
    lin = _lineage()
    lin["branches"][2]["name"] = "branch-v2"
    lin["branches"].append({"name": "v2-t1", "version": "v2", "status": "done", "tokens_trained": 30, "sweep": "s"})
    lin["sweeps"] = [{"version": "v2", "name": "s", "trials": [
        {"trial_id": "t1", "status": "done", "branch_tokens": 30},
        {"trial_id": "t2", "status": "stopped", "branch_tokens": 12},  # up to where it stopped
        {"trial_id": "t3", "status": "error", "branch_tokens": None}]}]
    lin["releases"] = [{"version": "v2", "branch": "v2-t1", "branch_tokens": 30}]
    rows = lineage_costs(lin)
    assert _col(rows, "branch_tokens") == [20, 30, 0]  # release only: the released trial
    assert _col(rows, "search_branch_tokens") == [20, 50 + 30 + 12, 0]  # configured + every trial, once
    assert _col(rows, "path_switching_cumulative") == pytest.approx([120, 400, 775], rel=REL)
    assert _col(rows, "with_search_cumulative") == pytest.approx([120, 462, 837], rel=REL)
    assert rows[1]["with_search_ratio"] == pytest.approx(462 / 400, rel=REL)
    # as `raypath cost RUN_DIR` prints it: v3 still carries v2's search (cumulative ratios)
    v1, v2, v3 = format_measured(rows).splitlines()
    assert "with search" not in v1
    assert v2.endswith("; with search: branches 92 -> 1.155")
    assert v3.endswith(f"(release only); with search: -> {837 / 1000:.3f}")


def test_ptfs_counts_tokens_as_training_counts_them():
    """A block stores seq_len + 1 tokens and trains seq_len; PTFS trains whole global batches.
    Counting stored tokens made path switching look cheaper here than `raypath compare` measures."""
    lin = {"config": {"data": {"seq_len": 16}, "train": {"global_batch_size": 4}},
           "versions": [{"name": "v1", "new_tokens": 10 * 17, "new_blocks": 10},
                        {"name": "v2", "new_tokens": 9 * 17, "new_blocks": 9}],
           "main_path": [{"version": "v1", "tokens_start": 0, "tokens_end": 8 * 16},
                         {"version": "v2", "tokens_start": 8 * 16, "tokens_end": 16 * 16}],
           "branches": [{"name": "b1", "version": "v1", "status": "done", "tokens_trained": 2 * 16}]}
    rows = lineage_costs(lin)
    assert _col(rows, "ptfs_cumulative") == [8 * 16, 8 * 16 + 16 * 16]  # 10 -> 8 blocks, 19 -> 16 blocks
    assert rows[0]["path_switching_ratio"] == pytest.approx(10 / 8, rel=REL)  # main 8 + branch 2 blocks


def test_the_measured_cost_of_a_run_reads_no_sweeps_trials(tmp_path, monkeypatch):
    """The search tokens of a sweep are in the lineage's summary of it: `raypath cost` reads no
    sweep's results.json (each trial there holds a loss per version so far), and counts what the
    trials say; a summary without them has its trials read."""
    from law_lineage import write_run

    from raypath import lineage as lineage_mod
    from raypath.lineage import Lineage

    run_dir = write_run(tmp_path, 3, trials=4)
    read, sweep_trials = [], lineage_mod.sweep_trials

    def counted(sweep_dir):
        read.append(Path(sweep_dir).parent.name)
        return sweep_trials(sweep_dir)

    monkeypatch.setattr(lineage_mod, "sweep_trials", counted)
    rows = lineage_costs(Lineage.load(run_dir))
    trials = {s.version: sum(t.branch_tokens for t in s.trials) for s in Lineage.load(run_dir).sweeps()}
    read.clear()
    assert lineage_costs(Lineage.load(run_dir)) == rows and read == []
    configured = {v: sum(b.tokens_trained for b in Lineage.load(run_dir).branches(v)) for v in trials}
    assert _col(rows, "search_branch_tokens") == [configured[v] + trials[v] for v in ("v1", "v2", "v3")]
    lin = Lineage.load(run_dir)
    for s in lin.data["sweeps"]:
        del s["search_tokens"]
    assert lineage_costs(lin) == rows and read == ["v1", "v2", "v3"]


def test_the_planned_table_of_a_run_counts_tokens_as_training_does():
    """A block stores seq_len + 1 tokens (inputs and targets overlap) and trains seq_len: the
    planned table prices the versions in the measured table's units."""
    from raypath.cost import planned_tokens

    lin = {"config": {"data": {"seq_len": 32}},
           "versions": [{"name": "v1", "new_tokens": 330, "new_blocks": 10},
                        {"name": "v2", "new_tokens": 660, "new_blocks": 20}]}
    assert planned_tokens(lin) == [320.0, 640.0]
    del lin["config"]["data"]["seq_len"]  # a record without it: the stored tokens
    assert planned_tokens(lin) == [330.0, 660.0]
