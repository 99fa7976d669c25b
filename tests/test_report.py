"""Tests of raypath.report on a small synthetic run directory.

The fixture writes a lineage with the same keys a real run records (3 versions,
100 tokens per step) plus its curves, so nothing here needs a finished run on
the machine. Recorded curve paths point at a directory that does not exist, as
they do in a run directory that was copied elsewhere. Expected numbers are
hand-computed literals (the arithmetic is next to each).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from raypath.lineage import Lineage  # noqa: E402
from raypath.report import (  # noqa: E402
    REPORT_DIR,
    format_releases,
    format_status,
    plot_lineage,
    read_curve,
    releases_markdown,
    releases_table,
    si,
    write_report,
)

OLD = "/nonexistent/moved_run"  # where the run was when it recorded its absolute paths
MAX_LR = 0.01
TOK_PER_STEP = 100  # global batch 2 x seq_len 50

# version: (new_tokens, start_step, end_step, fork_step)
#   fork = end - round(0.2 * steps): v1 10 - 2 = 8, v2 22 - round(2.4) = 20, v3 30 - round(1.6) = 28
VERSIONS = {"v1": (1010, 0, 10, 8), "v2": (1210, 10, 22, 20), "v3": (805, 22, 30, 28)}
MAIN_VAL = {"v1": {"val/v1": 4.0},
            "v2": {"val/v1": 3.8, "val/v2": 3.7},
            "v3": {"val/v1": 3.6, "val/v2": 3.5, "val/v3": 3.3}}
RELEASE_VAL = {"v1": {"val/v1": 3.9},
               "v2": {"val/v1": 3.6, "val/v2": 3.5},
               "v3": {"val/v1": 3.55, "val/v2": 3.45, "val/v3": 3.4}}


def _version(name: str, k: int) -> dict:
    new_tokens = VERSIONS[name][0]
    return {"name": name, "index": k, "train_files": [], "val_files": [], "docs": 5 + k,
            "new_blocks": new_tokens // 50, "new_tokens": new_tokens, "dropped_tokens": new_tokens % 50,
            "replay_blocks": 0, "replay_from": {}, "stream_rows": new_tokens // 50, "val_blocks": 4,
            "new_path": f"{OLD}/data/{name}/new.parquet", "stream_path": f"{OLD}/data/{name}/stream.parquet",
            "val_path": f"{OLD}/data/{name}/val.parquet",
            **({"dedup": {"docs": 9, "dropped": 3, "earlier": 2, "held_out": 0, "within": 1, "held_out_docs": 4,
                          "held_out_trained": 1, "near_kept": 2}} if k == 2 else {})}


def _main(name: str) -> dict:
    _, start, end, fork = VERSIONS[name]
    return {"version": name, "segment": f"main-{name}", "start_step": start, "end_step": end,
            "fork_step": fork, "fork_fraction": 0.2, "tokens_start": start * TOK_PER_STEP,
            "tokens_end": end * TOK_PER_STEP, "max_lr": MAX_LR, "warmup_steps": 2,
            "checkpoints": {"fork": f"{OLD}/ray/main-{name}/step_{fork:08d}",
                            "end": f"{OLD}/ray/main-{name}/step_{end:08d}"},
            "curve": f"{OLD}/curves/main-{name}.jsonl",
            "metrics": {"step": end, "lr": MAX_LR, "tokens": end * TOK_PER_STEP, "segment": f"main-{name}",
                        "loss": 3.0, **MAIN_VAL[name]},
            "status": "done", "finished": "2026-01-01T00:00:00+00:00"}


def _branch(name: str) -> dict:
    _, _, end, fork = VERSIONS[name]
    metrics = {"loss": 2.9, **RELEASE_VAL[name]}
    return {"name": f"branch-{name}", "version": name, "fork_step": fork, "end_step": end,
            "steps": end - fork, "decay": {"shape": "1-sqrt", "min_lr_ratio": 0.0, "power": 2.0},
            "forked_from": f"{OLD}/ray/main-{name}/step_{fork:08d}",
            "checkpoint": f"{OLD}/ray/branch-{name}/step_{end:08d}",
            "curve": f"{OLD}/curves/branch-{name}.jsonl", "metrics": metrics,
            "tokens_trained": (end - fork) * TOK_PER_STEP, "tokens_total": end * TOK_PER_STEP,
            "release": f"{OLD}/releases/{name}", "status": "done", "finished": "2026-01-01T00:00:00+00:00"}


def _release(name: str, k: int) -> dict:
    return {"version": name, "version_index": k, "path": f"{OLD}/releases/{name}", "branch": f"branch-{name}",
            "val": {"loss": 2.9, **RELEASE_VAL[name]}, "tokens_total": VERSIONS[name][2] * TOK_PER_STEP,
            "released": "2026-01-01T00:00:00+00:00"}


def make_lineage() -> dict:
    names = list(VERSIONS)
    return {
        "format": 1, "name": "synthetic", "created": "2026-01-01T00:00:00+00:00",
        "config": {"name": "synthetic", "run_dir": OLD,
                   "model": {"path": None, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                             "num_kv_heads": 1, "intermediate_size": 64},
                   "data": {"seq_len": 50, "replay_ratio": 0.0, "val_blocks": 4},
                   "train": {"num_workers": 1, "global_batch_size": 2, "micro_batch_size": 1,
                             "max_lr": MAX_LR, "warmup_steps": 2},
                   "branch": {"fraction": 0.2, "shape": "1-sqrt", "min_lr_ratio": 0.0, "power": 2.0,
                              "parallel": True}},
        "tokenizer": {"path": f"{OLD}/tokenizer", "vocab_size": 256, "eos_id": 0}, "model": {},
        "versions": [_version(n, k) for k, n in enumerate(names)],
        "main_path": [_main(n) for n in names],
        "branches": [_branch(n) for n in names],
        "releases": [_release(n, k) for k, n in enumerate(names)],
        "updated": "2026-01-01T00:00:00+00:00",
    }


def _record(step: int, lr: float, segment: str, loss: float, **val: float) -> dict:
    return {"step": step, "lr": lr, "tokens": step * TOK_PER_STEP, "segment": segment, "loss": loss,
            "tokens_per_s": 1000.0, "data_wait_share": 0.05, **val}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_curves(run: Path) -> None:
    for name, (_, start, end, fork) in VERSIONS.items():
        seg = f"main-{name}"
        main = [_record(s, MAX_LR, seg, 5.0 - 0.08 * s) for s in range(start + 2, end, 2)]
        main.append(_record(end, MAX_LR, seg, 5.0 - 0.08 * end, **MAIN_VAL[name]))
        if name == "v2":
            # crashed after logging steps 14 and 16, resumed from the step-12 checkpoint and
            # re-logged them: the earlier (lost) records come first in the file, the later win
            main[1:1] = [_record(14, MAX_LR, seg, 99.0), _record(16, MAX_LR, seg, 99.0)]
        _write_jsonl(run / "curves" / f"{seg}.jsonl", main)
        seg = f"branch-{name}"
        branch = [_record(fork + 1, MAX_LR / 2, seg, 4.9 - 0.08 * fork),
                  _record(end, 0.0, seg, 4.7 - 0.08 * end, **RELEASE_VAL[name])]
        _write_jsonl(run / "curves" / f"{seg}.jsonl", branch)


def _write_run(run: Path, lineage: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "lineage.json").write_text(json.dumps(lineage, indent=2))
    _write_curves(run)
    return run


@pytest.fixture
def lineage() -> dict:
    return make_lineage()


@pytest.fixture
def run_dir(tmp_path: Path, lineage: dict) -> Path:
    return _write_run(tmp_path / "run", lineage)


def partial_lineage() -> dict:
    """Mid-run: v2's main segment done but its branch not, v3 not started, v1 released."""
    lin = make_lineage()
    lin["main_path"] = lin["main_path"][:2]
    lin["branches"] = lin["branches"][:1]
    lin["releases"] = lin["releases"][:1]
    return lin


# ------------------------------------------------------------------ read_curve

def test_read_curve_keeps_last_record_of_a_step_sorted(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [_record(10, 1.0, "s", 3.0), _record(5, 1.0, "s", 4.0),
                        _record(10, 1.0, "s", 2.5), _record(15, 1.0, "s", 2.0)])
    df = read_curve(path)
    assert df["step"].tolist() == [5, 10, 15]
    assert df["loss"].tolist() == [4.0, 2.5, 2.0]


def test_a_curve_line_cut_short_by_a_crash_is_skipped_and_the_next_append_starts_its_own_line(tmp_path, caplog):
    import json

    from raypath.storage import end_line

    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [_record(5, 1.0, "s", 4.0)])
    with open(path, "a") as f:
        f.write(json.dumps(_record(10, 1.0, "s", 3.0))[:9])  # the crash
    end_line(path)  # the resumed segment, before its first append
    end_line(path)  # (a second start adds nothing)
    with open(path, "a") as f:
        f.write(json.dumps(_record(10, 1.0, "s", 3.5)) + "\n" + '{"step": 15, "lo')  # one being written
    with caplog.at_level("WARNING"):
        df = read_curve(path)
    assert df["step"].tolist() == [5, 10] and df["loss"].tolist() == [4.0, 3.5]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}, line 2: not a JSON record (cut short by a crash?); skipped"]


@pytest.mark.parametrize("block", [7, 64, 1 << 16])  # lines across block boundaries, and one block
def test_the_last_record_of_a_log_is_read_from_its_end(tmp_path, block):
    import json

    from raypath.storage import last_jsonl, read_jsonl

    path = tmp_path / "result.json"
    records = [{"step": s, "loss": 5.0 - s / 10, "note": "x" * (s % 13)} for s in range(1, 40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "lo')  # one being written
    assert last_jsonl(path, block) == records[-1] == read_jsonl(path)[-1]
    path.write_text(json.dumps(records[0]) + "\n\n[1, 2]\n")  # not objects after it
    assert last_jsonl(path, block) == records[0]
    path.write_text("")
    assert last_jsonl(path, block) is None


def test_read_curve_missing_file_is_empty_with_step_column(tmp_path):
    df = read_curve(tmp_path / "nope.jsonl")
    assert df.empty and list(df.columns) == ["step"]



def test_a_sweep_trials_curve_is_found_in_the_run_directory_it_moved_to(tmp_path, lineage):
    """A release branch that was a sweep trial has its curve under ``sweeps/``, not ``curves/``:
    with the absolute paths of where the run was, the plot reads it where the run is now,
    as the law does."""
    from raypath.lineage import Branch, Lineage
    from raypath.report import _branch_curve, _main_curve

    run = _write_run(tmp_path / "run", lineage)
    rel = "sweeps/v2/s/curves/branch-v2-t1.jsonl"
    (run / "curves" / "branch-v2.jsonl").rename(run / "curves" / "t1.jsonl")
    (run / rel).parent.mkdir(parents=True)
    (run / "curves" / "t1.jsonl").rename(run / rel)
    branch = {**lineage["branches"][1], "name": "branch-v2-t1", "curve": f"{OLD}/{rel}"}
    lin = Lineage.of(lineage)
    curve = _branch_curve(run, lin, Branch.from_dict(branch), _main_curve(run, lin))
    assert list(curve["step"]) == [20, 21, 22]  # the fork point on the main path, then the trial's records

def test_read_curve_on_fixture_drops_the_resumed_duplicate(run_dir):
    df = read_curve(run_dir / "curves" / "main-v2.jsonl")
    assert df["step"].is_unique and df["step"].is_monotonic_increasing
    assert 99.0 not in df["loss"].tolist()
    assert df["step"].tolist() == [12, 14, 16, 18, 20, 22]
    assert df.loc[df["step"] == 14, "loss"].item() == pytest.approx(5.0 - 0.08 * 14)


# ------------------------------------------------------------------ releases table

def test_releases_table_numbers(lineage):
    df = releases_table(lineage)
    assert df["version"].tolist() == ["v1", "v2", "v3"]
    assert df["branch"].tolist() == ["branch-v1", "branch-v2", "branch-v3"]
    assert [c for c in df.columns if c.startswith("val/v")] == ["val/v1", "val/v2", "val/v3"]
    # val on every split seen so far, NaN where that release was not evaluated
    assert df["val/v1"].tolist() == [3.9, 3.6, 3.55]
    assert math.isnan(df.loc[0, "val/v2"]) and math.isnan(df.loc[0, "val/v3"]) and math.isnan(df.loc[1, "val/v3"])
    assert df["val/own"].tolist() == [3.9, 3.5, 3.4]
    assert df["main val/own"].tolist() == [4.0, 3.7, 3.3]
    # delta = release - main on the own split
    assert df["delta"].tolist() == pytest.approx([3.9 - 4.0, 3.5 - 3.7, 3.4 - 3.3])
    # tokens on the release's path = main tokens at the boundary (end step * 100)
    assert df["tokens_total"].tolist() == [1000, 2200, 3000]
    # whole run: main (1000, 1200, 800) + branches (2 steps * 100 each)
    assert df["tokens_cumulative"].tolist() == [1200, 1200 + 1400, 2600 + 1000]
    # PTFS trains whole batches of 2 x 50 tokens of blocks 20, 20+24, 20+24+16: 1000, +2200, +3000
    assert df["path_switching_ratio"].tolist() == pytest.approx([1200 / 1000, 2600 / 3200, 3600 / 6200])
    assert df["with_search_ratio"].tolist() == df["path_switching_ratio"].tolist()  # no sweep searched
    assert df["test/own"].isna().all()  # releases recorded before test splits existed


def test_releases_table_shows_the_held_out_test_loss(lineage):
    lin = copy.deepcopy(lineage)
    lin["releases"][1]["test"] = {"test/v1": 3.7, "test/v2": 3.45}
    df = releases_table(lin)
    assert df.loc[1, "test/own"] == 3.45 and math.isnan(df.loc[0, "test/own"])
    assert _row(format_releases(lin), "v2")[-6:-4] == ["-0.200", "3.450"]


def test_releases_table_tolerates_main_path_recorded_out_of_order(lineage):
    shuffled = copy.deepcopy(lineage)
    shuffled["main_path"] = shuffled["main_path"][::-1]  # a re-recorded entry is appended last
    assert releases_table(shuffled)["path_switching_ratio"].tolist() == pytest.approx(
        [1200 / 1000, 2600 / 3200, 3600 / 6200])


def test_releases_table_empty_keeps_columns():
    lin = make_lineage()
    lin["releases"] = []
    df = releases_table(lin)
    assert df.empty
    assert {"version", "branch", "delta", "tokens_total", "tokens_cumulative", "path_switching_ratio"} <= set(df)


# ------------------------------------------------------------------ text

@pytest.mark.parametrize("n,text", [(0, "0"), (999, "999"), (1000, "1.0k"), (52736, "52.7k"),
                                    (1.2e6, "1.2M"), (3.4e9, "3.4G"), (None, "-"), (float("nan"), "-")])
def test_si(n, text):
    assert si(n) == text


def _row(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(first + " "))
    return line.split()


def test_format_releases_rows(lineage):
    text = format_releases(lineage)
    assert text.splitlines()[0].startswith("releases of synthetic")
    #          version branch  val/v1 v2 v3  own  main  delta  tokens run  ratio (1200/1000: PTFS trains 20 blocks x 50)
    #          ... test/own (none recorded), ratio with search (no sweep: the same)
    assert _row(text, "v1") == ["v1", "branch-v1", "3.900", "-", "-", "3.900", "4.000", "-0.100", "-",
                                "1.0k", "1.2k", "1.200", "1.200"]
    assert _row(text, "v2")[-6:] == ["-0.200", "-", "2.2k", "2.6k", "0.812", "0.812"]  # 2600/3200 = 0.8125
    assert _row(text, "v3")[-6:] == ["+0.100", "-", "3.0k", "3.6k", "0.581", "0.581"]  # 3600/6200 = 0.58065
    # header, dashed rule, one line per release; right-aligned numbers end in the same column
    table = text.splitlines()[1:]
    assert len(table) == 2 + 3
    assert table[1].replace(" ", "").strip("-") == ""
    assert len({len(line) for line in table}) == 1


def test_releases_markdown(lineage):
    lines = releases_markdown(lineage).strip().splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| version | branch | val/v1")
    assert lines[3].startswith("| v2 | branch-v2 | 3.600 | 3.500 | - |")


def test_format_status_full(lineage):
    text = format_status(lineage)
    assert text.startswith("run: synthetic")
    for piece in ("hidden 32", "layers 2", "seq_len 50", "global batch 2", "max_lr 0.01",
                  "fraction 0.2", "shape 1-sqrt"):
        assert piece in text
    # versions: name, docs, duplicates dropped (data.dedup: exact), new blocks, new tokens, replay blocks, val blocks
    assert _row(text, "v2") == ["v2", "6", "-", "24", "1.2k", "0", "4"]
    assert _row(text, "v3")[:3] == ["v3", "7", "3"]
    assert "v3: 1 of its 4 val/test documents were trained by an earlier version" in text.split("main path")[0]
    assert "v3: 2 train documents shared a MinHash band with an earlier one and were kept" in text
    assert text.count("shared a MinHash band") == 1
    # main path: version, steps, fork, tokens at end, val on own split, checkpoint, status
    assert _row(text.split("main path")[1], "v2") == ["v2", "10->22", "20", "2.2k", "3.700",
                                                      "main-v2/step_00000022", "done"]
    # branches: name, fork, steps, decay, final val losses, status
    assert _row(text, "branch-v3") == ["branch-v3", "28", "2", "1-sqrt", "min", "0", "pow", "2",
                                       "3.550", "3.450", "3.400", "done"]
    assert "releases of synthetic" in text


def test_format_status_partial_lineage():
    text = format_status(partial_lineage())
    assert "main-v1/step_00000010  done" in text
    assert "main-v2/step_00000022  done, no branch yet" in text
    assert _row(text.split("main path")[1], "v3")[-1] == "pending"
    assert "branch-v1" in text and "branch-v2" not in text
    releases = text.split("releases of synthetic")[1]
    assert "v1" in releases and "v2 " not in releases
    assert len(releases_table(partial_lineage())) == 1


def test_format_status_fresh_lineage():
    """Right after `Lineage.open`: nothing prepared, nothing trained."""
    fresh = {"format": 1, "name": "fresh", "config": {}, "tokenizer": {}, "model": {}, "versions": [],
             "main_path": [], "branches": [], "releases": []}
    text = format_status(fresh)
    assert text.startswith("run: fresh")
    assert "(no releases yet)" in text and "(none prepared yet)" in text
    assert releases_table(fresh).empty


# ------------------------------------------------------------------ files

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    return img.shape[1], img.shape[0]


def test_write_report_files(run_dir):
    paths = write_report(run_dir)
    report = run_dir / "report"
    assert paths == {"plot": str(report / "lineage.png"), "table": str(report / "releases.csv"),
                     "markdown": str(report / "releases.md")}
    png = Path(paths["plot"])
    assert png.stat().st_size > 10_000
    assert png.stat().st_mode & 0o777 == 0o644
    assert _png_size(png) == (1320, 900)  # 11 x 7.5 in at 120 dpi
    df = pd.read_csv(paths["table"])
    assert df["version"].tolist() == ["v1", "v2", "v3"]
    assert df["tokens_cumulative"].tolist() == [1200, 2600, 3600]
    assert df["path_switching_ratio"].tolist() == pytest.approx([1200 / 1000, 2600 / 3200, 3600 / 6200])
    assert math.isnan(df.loc[0, "val/v2"])
    assert Path(paths["markdown"]).read_text().count("\n| v") == 3
    assert sorted(os.listdir(report)) == ["lineage.png", "releases.csv", "releases.md"]  # no temp files left


def test_write_report_of_a_run_directory_in_a_bucket_uploads_it_there(run_dir, s3, tmp_path, monkeypatch):
    """A notebook's ``write_report("s3://...")`` does what ``raypath run`` does for a bucket run."""
    from conftest import bucket

    from raypath.mirror import Mirror, RunDir

    remote = f"s3://{bucket(s3, 'report')}/run"
    Mirror(remote, str(run_dir.resolve()), s3.endpoint).push(run_dir)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default mirror, ~/.cache/raypath/s3/...
    names = {"plot": "lineage.png", "table": "releases.csv", "markdown": "releases.md"}
    for run, mirror in ((remote, tmp_path / "home" / ".cache" / "raypath" / "s3" / "report" / "run"),
                        (RunDir.open(remote, str(tmp_path / "mine")), tmp_path / "mine")):
        s3.fs.delete_dir_contents(f"report/run/{REPORT_DIR}", missing_dir_ok=True)
        paths = write_report(run)
        assert paths == {k: str(mirror.resolve() / REPORT_DIR / n) for k, n in names.items()}
        uploaded = s3.files(f"report/run/{REPORT_DIR}")
        assert uploaded == {f"report/run/{REPORT_DIR}/{n}": Path(paths[k]).stat().st_size for k, n in names.items()}


def test_write_report_partial_run(tmp_path):
    run = _write_run(tmp_path / "run", partial_lineage())
    (run / "curves" / "branch-v2.jsonl").unlink()  # v2's branch has not logged yet
    paths = write_report(run)
    assert _png_size(Path(paths["plot"])) == (1320, 900)
    assert pd.read_csv(paths["table"])["version"].tolist() == ["v1"]


def test_plot_lineage_without_any_curves(tmp_path, lineage):
    out = plot_lineage(tmp_path / "empty_run", lineage, tmp_path / "out" / "p.png")
    assert _png_size(out) == (1320, 900)


def test_drawing_report_files_leaves_the_callers_matplotlib_backend_and_figures_alone(run_dir, lineage, tmp_path):
    """A notebook's inline backend must survive a report: figures it draws after still show."""
    import matplotlib.pyplot as plt

    from raypath.compare import plot_comparison

    table = pd.DataFrame({"version": ["v1", "v1"], "paradigm": ["PTFS", "PS"], "val_own": [4.0, 3.9],
                          "test_own": [4.1, 4.0]})
    matplotlib.use("svg")
    try:
        open_figures = plt.get_fignums()
        write_report(run_dir)
        plot_lineage(run_dir, lineage, tmp_path / "lineage.png")
        plot_comparison(run_dir, Lineage.of(lineage), table, tmp_path / "comparison.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_figures
        assert _png_size(tmp_path / "lineage.png") == (1320, 900)
        assert _png_size(tmp_path / "comparison.png") == (1100, 1320)  # 10 x 12 in at 110 dpi
    finally:
        matplotlib.use("Agg")


def test_status_report_and_cost_read_each_record_a_fixed_number_of_times(tmp_path, monkeypatch):
    """A long run's commands go over its versions; a lookup of one version's main segment,
    branches or release read every version's record, which made status, report and cost
    quadratic in the versions. The records they read now grow with the versions, not faster."""
    from law_lineage import write_run

    from raypath import lineage as lineage_mod
    from raypath.cost import lineage_costs

    parse, reads = lineage_mod.Record.__dict__["from_dict"].__func__, [0]

    def counted(cls, d):
        reads[0] += 1
        return parse(cls, d)

    monkeypatch.setattr(lineage_mod.Record, "from_dict", classmethod(counted))

    def records_read(n: int) -> dict[str, int]:
        run_dir = write_run(tmp_path / str(n), n, trials=2, releases=2)
        out = {}
        for name, command in (("status", lambda: format_status(Lineage.load(run_dir))),
                              ("report", lambda: write_report(run_dir)),
                              ("cost", lambda: lineage_costs(Lineage.load(run_dir)))):
            reads[0] = 0
            command()
            out[name] = reads[0]
        return out

    short, long = records_read(6), records_read(12)
    for name in short:  # (before: status 4.0x, report 4.2x, cost 4.3x)
        assert 0 < long[name] <= 2 * short[name], (name, short[name], long[name])


def test_the_lineage_plot_of_many_versions_colours_branches_by_version_and_names_a_few_boundaries(tmp_path):
    """At 40 versions a legend entry per branch (80) ran off the figure, ten cycling colours
    repeated every ten versions and the boundary names overlapped into a row of "v"s."""
    import warnings

    from law_lineage import write_run

    from raypath.report import LABELLED_BOUNDARIES, LEGEND_BRANCHES, lineage_figure

    run = write_run(tmp_path, 40)
    lineage = Lineage.load(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Tight layout not applied" among them
        fig = lineage_figure(run, lineage)
    ax_loss = fig.axes[0]
    labels = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert len(labels) <= LEGEND_BRANCHES + 3 and "main path (train)" in labels
    names = [t.get_text().strip() for t in ax_loss.texts]
    assert 3 <= len(names) <= LABELLED_BOUNDARIES and names[-1] == "v40"
    lines = ax_loss.get_lines()[1:]  # after the main path: the branches in the lineage's order
    drawn = {b.name: tuple(ln.get_color()) for b, ln in zip(lineage.branches(done=False), lines)}
    assert drawn["branch-v1"] != drawn["branch-v11"]
    assert [ax.get_ylabel() for ax in ax_loss.child_axes] == ["branches: version"]


def test_the_lineage_plot_of_a_few_branches_names_each_in_its_legend(run_dir, lineage):
    from raypath.report import lineage_figure

    fig = lineage_figure(run_dir, lineage)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [b.name for b in Lineage.of(lineage).branches(done=False)] == [x for x in labels if x.startswith("branch")]


@pytest.mark.parametrize("releases", [1, 2])  # the live release: the configured branch, a sweep's best trial
def test_status_and_report_decide_standing_without_reading_the_sweeps_trials(tmp_path, monkeypatch, releases):
    """Each version's standing (how many candidates its live release beats) is decided over every
    sweep trial; a sweep's results.json keeps a val and a test loss per version so far for each
    trial, so reading them all grew with versions x trials. Status and report read each sweep's
    standing.json instead, and the trials where that does not apply (no such file, a changed
    objective), with the same lines."""
    from law_lineage import write_run

    from raypath import lineage as lineage_mod
    from raypath.releases import STANDING_JSON, format_standing

    read, real = [], lineage_mod.sweep_trials
    monkeypatch.setattr(lineage_mod, "sweep_trials", lambda d: read.append(Path(d).parent.name) or real(d))
    run_dir = write_run(tmp_path, 4, trials=5, releases=releases)
    status = format_status(Lineage.load(run_dir))
    standing = format_standing(Lineage.load(run_dir))
    write_report(run_dir)
    assert read == []  # every sweep's results.json, by status and again by report, before
    sweeps = status.split("\nsweeps (")[1].split("\n\n")[0].splitlines()[3:]  # title, header, rule
    assert [ln.split()[:4] for ln in sweeps] == [["s", f"v{k}", "5", "yes"] for k in range(1, 5)]
    assert f"v4: r{releases} " in status and "of 6 other candidates" in status
    held = {f: f.read_text() for f in run_dir.glob(f"sweeps/*/s/{STANDING_JSON}")}
    for f in held:  # a run whose sweeps finished before the file: their trials are read
        f.unlink()
    assert format_status(Lineage.load(run_dir)) == status and sorted(read) == ["v1", "v2", "v3", "v4"]
    for f, text in held.items():
        f.write_text(text)
    # v2's live release was decided under other weights than its sweep's: that sweep's trials are read
    lin = json.loads((run_dir / "lineage.json").read_text())
    live = next(r for r in lin["release_history"]["v2"]["releases"] if r["id"] == f"r{releases}")
    live.update(objective_weights={"v2": 0.9, "v1": 0.1}, compute_penalty=0.5, version_tokens=10**6)
    (run_dir / "lineage.json").write_text(json.dumps(lin))
    read.clear()
    changed = format_standing(Lineage.load(run_dir))
    assert read == ["v2"] and changed != standing
    for f in held:
        f.unlink()
    assert format_standing(Lineage.load(run_dir)) == changed


def test_status_shows_where_an_interrupted_main_segment_resumes(tmp_path):
    """A run stopped in the middle of v3's main segment left checkpoints of it, but status
    called v3 ``pending``, as if nothing of it had trained."""
    import torch

    from raypath import checkpoint as ckpt
    from raypath.storage import write_json

    write_json(tmp_path / "lineage.json", partial_lineage())
    storage = tmp_path / "ray" / "main-v3"
    for step in (25, 27):
        ckpt.save(storage / ckpt.step_dir_name(step), torch.nn.Linear(2, 2).state_dict(), {}, {"step": step})
    (storage / ckpt.step_dir_name(27) / "manifest.json").unlink()  # torn: not where a re-run resumes
    text = format_status(Lineage.load(tmp_path))
    v3 = next(line for line in text.split("main path")[1].splitlines() if line.startswith("v3 "))
    assert v3.endswith("  interrupted at step 25; a re-run resumes"), v3
