"""The benchmarks without Ray still run and measure what they say, at toy sizes.

Their numbers come from full-size runs recorded in docs/benchmarks.md; these only keep the
scripts from rotting as the code under them changes (a benchmark that finds no weight files
to hash reports an impossible speed, not an error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout)


def test_checkpoint_hash_times_a_save_a_verify_and_a_final_checkpoints_read():
    got = _bench("checkpoint_hash", "--params", "2e6", "--layers", "2", "--repeats", "1")
    assert got["bytes"] > 3 * 4 * 2e6 and got["save_s"] > 0 and got["verify_s"] > 0, got
    assert 0 < got["final_checkpoint_s"], got
    assert 0 < got["controller_s"] and 0 < got["snapshot_check_s"], got


def test_resume_memory_counts_what_each_rank_holds_of_the_checkpoint_it_loads():
    got = _bench("resume_memory", "--params", "4e6", "--layers", "2", "--ranks", "2", "--repeats", "1")
    assert got["checkpoint_bytes"] > 3 * 4 * 4e6 and len(got["runs"]) == 1 and len(got["runs"][0]) == 2, got
    # mapped: a rank's own memory does not grow with the checkpoint (read, it grew by all of it)
    assert got["anonymous_growth_per_rank_mb"] * 1e6 < got["checkpoint_bytes"] / 4, got
    assert got["node_total_mb"] * 1e6 >= got["checkpoint_bytes"] and got["load_s"] > 0, got
    # the node's first worker hashes the checkpoint, the other waits for its choice
    cpu = sorted(r["cpu_seconds"] for r in got["runs"][0])
    assert 0 < got["node_cpu_s"] and cpu[0] < cpu[1], got


def test_pretrained_start_hashes_and_downloads_every_weight_byte(tmp_path):
    for _ in range(2):  # a work directory used before is reused
        got = _bench("pretrained_start", "--gb", "0.02", "--shards", "2", "--repeats", "1",
                     "--workdir", str(tmp_path))
        assert got["weights_bytes"] == 20_000_000 and got["shards"] == 2
        for k in ("local_hash_s", "download_s", "verify_s"):
            assert got[k] > 0 and 0 < got[k.replace("_s", "_gb_per_s")] < 100, (k, got)


def test_replay_memory_mixes_each_ratio_in_a_work_directory_used_before(tmp_path):
    for _ in range(2):
        got = _bench("replay_memory", "--rows", "400", "--block", "65", "--parts", "2", "--ratios", "0.1,0.5",
                     "--workdir", str(tmp_path))
        assert got["stream_bytes"] == 400 * 65 * 4
        assert [got["ratios"][r]["mix"]["replay_rows"] for r in ("0.1", "0.5")] == [8, 40]


def test_jsonl_lines_reads_one_long_line_and_short_lines_of_the_same_size():
    got = _bench("jsonl_lines", "--mb", "2", "--repeats", "1")
    assert got["bytes"] == 2_000_000 and got["one_line_s"] > 0 and got["short_lines_s"] > 0
    assert got["one_line_over_short_lines"] == round(got["one_line_s"] / got["short_lines_s"], 3)


def test_dedup_index_counts_the_earlier_parts_each_version_opens():
    got = _bench("dedup_index", "--versions", "4", "--docs", "20000", "--range-rows", "10000")["versions"]
    assert [r["dropped"] for r in got] == [0, 2000, 2000, 2000]  # the planted copies, checked by the script too
    assert [r["ranges"] for r in got] == [2, 4, 6, 8] and got[-1]["earlier_index_parts"] == 2 + 4 + 6
    # A range's task opens the earlier parts of its buckets, not all of them.
    assert got[-1]["ranges"] * 2 < got[-1]["opened"] < got[-1]["ranges"] * (2 + got[-1]["earlier_index_parts"])


def test_dedup_index_reads_the_snapshot_not_the_versions_before_it():
    """Version 9 snapshots the index of the 8 before it and its own: version 10 opens its parts and
    v10's, not 9 versions' own parts; every version still drops exactly its planted copies."""
    got = _bench("dedup_index", "--versions", "10", "--docs", "5000", "--range-rows", "2500")["versions"]
    assert [r["snapshot"] for r in got] == [False] * 8 + [True, False]
    v9, v10 = got[8], got[9]
    assert v10["earlier_index_parts"] == v9["ranges"] < v9["earlier_index_parts"] and v10["opened"] < v9["opened"]
    assert v10["index_stored_mb"] < 2.5 * sum(r["index_rows"] for r in got) * 25 / 1e6


def test_dedup_index_counts_what_the_tokenize_side_reads_of_the_drops():
    """Each of 40 chunk groups reads the one collected drop part of its key range (the script
    checks they find every dropped key), not one file per decide range."""
    got = _bench("dedup_index", "--versions", "2", "--docs", "20000", "--range-rows", "2000", "--groups", "40")
    v2 = got["versions"][-1]
    assert v2["dropped"] == 2000 and v2["ranges"] == 20 and v2["drop_files"] == 1
    assert v2["collect_opened"] <= 2 * v2["ranges"] and v2["tokenize_opened"] <= 2 * 40


def test_dedup_hash_memory_hashes_each_rule_in_a_process_of_its_own():
    got = _bench("dedup_hash_memory", "--mb", "1")
    exact, minhash = got["runs"]
    assert exact["mode"] == "exact" and exact["docs"] == exact["hash_rows"] > 100
    assert minhash["docs"] == exact["docs"] and minhash["hash_rows"] == 14 * minhash["docs"]
    assert minhash["process_peak_mb"] >= minhash["rss_before_mb"] > 0


def test_lineage_size_grows_with_the_files_it_records():
    small, large = (_bench("lineage_size", "--files", str(n), "--versions", "2", "--saves", "1") for n in (5, 50))
    assert large["corpus_files"] > small["corpus_files"] and large["manifest_bytes"] > small["manifest_bytes"]


def test_lineage_size_reads_every_recorded_sweeps_trials():
    got = _bench("lineage_size", "--files", "2", "--versions", "3", "--trials", "4", "--saves", "1")
    assert got["sweep_trials"] == got["law_branches"] == 12 and got["candidates"] == 4
    assert got["last_sweep_record_seconds"] > 0


def test_sweep_upload_counts_each_callbacks_requests_and_bytes():
    got = _bench("sweep_upload", "--trials", "3", "--tokenizer-kb", "1", "--curve-kb", "1", "--ckpt-objects", "2")
    first, last = got["per_callback_first_tenth"], got["per_callback_last_tenth"]
    assert first["put"] > 0 and first["bytes"] > 0 and got["total"]["seconds"] > 0
    assert last["put"] <= first["put"]  # a later trial's callback uploads that trial's files, not every earlier one's


def test_sweep_analysis_counts_what_each_notebook_call_downloads():
    got = _bench("sweep_analysis", "--trials", "10", "--curve-lines", "5", "--ckpt-objects", "2", "--settle", "0")
    calls = list(got["calls"].values())
    table, table_again, whole, whole_again, driver, runner = calls
    assert table["files"] >= 2 * 10 and table["get"] >= table["files"]  # every trial's params and result
    assert whole["files"] == 9 and whole["bytes"] > 0  # the 9 finished trials' curves, the main curve read before
    assert table_again["files"] == whole_again["files"] == 0 and whole_again["list"] > 0
    # lineage.json, sweep.json, the main curve and the 10 trials' curves: no trial directory of Tune's
    assert driver["files"] == 13
    assert runner["files"] == 3  # `raypath run`'s: no trial's curve


def test_long_run_times_each_command_and_counts_the_files_it_opens():
    got = _bench("long_run", "--versions", "2", "3", "--trials", "2", "--commands", "status", "cost", "law_fit",
                 "law_refit")
    short, long = got["rows"]
    assert (short["versions"], long["versions"]) == (2, 3) and long["curve_files"] == 3 * (3 + 2)
    assert 0 < short["status"]["files"] < long["status"]["files"]  # one standing.json per sweep
    assert 0 < short["status"]["bytes"] < long["status"]["bytes"]
    assert long["law_refit"]["files"] == long["law_refit"]["opens"] == 1  # the sweep's new trial
    assert long["cost"]["files"] == 1  # lineage.json: the sweeps' summaries hold their tokens
    assert long["law_fit"]["files"] == long["law_fit"]["opens"] > long["curve_files"]  # each curve once


def test_sweep_refit_times_the_loop_while_trials_finished_together_are_refitted():
    got = _bench("sweep_refit", "--versions", "2", "--trials", "2", "--warm", "4", "--together", "3")
    (row,) = got["rows"]
    assert row["trials_fitted"] == 7 and row["points"] > 0, row
    # the three trials' refits: the first, then one for the two that finished during it
    assert row["refits"] == 2 and row["landed_s"] > 0 and row["stopper_calls_during"] > 0, row
    assert row["loop_held_s"] < row["landed_s"], row


def test_lineage_writers_keep_every_entry_locally_and_in_a_bucket():
    got = _bench("lineage_writers", "--writers", "2", "--saves", "2")
    for layout in ("local", "bucket"):
        (row,) = got[layout]
        assert row["kept"] == row["recorded"] == 4 and row["s_per_save"] > 0, (layout, row)
    assert got["bucket"][0]["requests_per_save"] > 0


@pytest.mark.slow
def test_segment_start_times_a_fresh_segment_from_fit_to_its_workers(tmp_path):
    """Starts a Ray cluster of its own: slow."""
    got = _bench("segment_start", "--workers", "1", "--repeats", "1", "--steps", "3")
    (row,) = got["rows"]
    assert row["workers"] == 1 and 0 < row["ready_s"] < row["fit_s"], row


@pytest.mark.slow
def test_earlier_files_check_needs_no_task_for_files_their_listing_shows_unchanged():
    """Starts a Ray cluster of its own: slow."""
    got = _bench("earlier_files_check", "--versions", "2", "--files", "5", "--repeats", "1")
    assert got["files"] == 14 and got["tasks"] == 0 and got["median_seconds"] > 0, got
    assert got["check_peak_mb"] > 0 and got["files_json_mb"] > 0, got


@pytest.mark.slow
def test_sweep_disk_samples_what_a_sweep_holds_with_and_without_keep_trials():
    """Trains a main path and two 3-trial sweeps on a Ray cluster of its own: slow."""
    got = _bench("sweep_disk", "--trials", "3", "--keep", "0", "1", "--hidden", "32", "--layers", "2")
    every, best = got["sweeps"]
    assert [s["done"] for s in got["sweeps"]] == [3, 3] and [s["pruned"] for s in got["sweeps"]] == [0, 2], got
    assert 0 < best["end_bytes"] < every["end_bytes"] <= every["peak_bytes"], got
    assert every["exported"] == 3 and 1 <= best["exported"] <= 3, got  # the first to finish always exports


@pytest.mark.slow
def test_branch_disk_counts_what_each_finished_branch_keeps():
    """Trains a main path and two branches on a Ray cluster of its own: slow."""
    got = _bench("branch_disk", "--branches", "2", "--every", "4", "--hidden", "32", "--layers", "2")
    assert [b["kept"] for b in got["branches"]] == [1, 1] and got["branches"][0]["saves"] > 1, got
    assert 0 < got["branches"][0]["bytes_kept"] < 2 * got["checkpoint_bytes"], got
    # while it ran: its newest 2 periodic checkpoints and the one being written, not its 6
    assert got["branches"][0]["bytes_kept"] <= got["branches"][0]["peak_bytes"] < 4 * got["checkpoint_bytes"], got
