"""A run directory is movable: its records store paths relative to it (lineage formats 2 and later).

A finished tiny run is copied, then moved elsewhere (so no path of the copy's first place
exists any more), and read and extended where it lands, with no path rewriting.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

from raypath.cli import main
from raypath.lineage import FORMAT, Lineage
from raypath.storage import absolute_paths, read_json, relative_paths


def _cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0, argv
    return buf.getvalue()


def _stale(run_dir: Path, old: Path) -> list[str]:
    """raypath's records (lineage, data manifest, release, sweep and law records, model cards)
    that name ``old``, the place the run was written. Not counted: Ray's own files under ``ray/``,
    the curves' event logs, and the run's config, kept as the user gave it."""
    out = []
    for p in run_dir.rglob("*.json"):
        if p.relative_to(run_dir).parts[0] not in ("ray", "curves", "tb"):
            record = json.loads(p.read_text())
            if isinstance(record, dict):
                record.pop("config", None)
            if str(old) in json.dumps(record):
                out.append(str(p.relative_to(run_dir)))
    return out


def test_paths_are_stored_relative_and_read_back_absolute(tmp_path):
    root = tmp_path / "run"
    rec = {"val_path": f"{root}/data/v1/val", "run_dir": str(root), "corpus": "/elsewhere/v1.jsonl",
           "release": "r1", "config": {"run_dir": str(root)}, "nested": [{"curve": f"{root}/curves/a.jsonl"}]}
    stored = relative_paths(rec, root)
    assert stored == {"val_path": "./data/v1/val", "run_dir": ".", "corpus": "/elsewhere/v1.jsonl",
                      "release": "r1", "config": {"run_dir": str(root)}, "nested": [{"curve": "./curves/a.jsonl"}]}
    moved = tmp_path / "moved"
    back = absolute_paths(stored, moved)
    assert back["val_path"] == f"{moved.resolve()}/data/v1/val" and back["run_dir"] == str(moved.resolve())
    assert back["config"] == {"run_dir": str(root)}  # the user's config is kept as given
    assert absolute_paths(stored, root) == rec


def test_a_format_1_lineage_is_migrated_where_it_now_lies(tmp_path):
    """A format-1 record (absolute paths of the place it was written) read after a move."""
    old, new = "/gone/runs/q", tmp_path / "q"
    new.mkdir()
    (new / "lineage.json").write_text(json.dumps({
        "format": 1, "name": "q", "config": {}, "versions": [{"name": "v1", "val_path": f"{old}/data/v1/val"}],
        "main_path": [{"version": "v1", "curve": f"{old}/curves/main-v1.jsonl",
                       "checkpoints": {"end": f"{old}/ray/main-v1/step_00000004"}}],
        "branches": [], "releases": []}))
    lin = Lineage.load(new)
    root = new.resolve()
    assert lin.main("v1").checkpoints["end"] == f"{root}/ray/main-v1/step_00000004"
    assert lin.versions()[0].val_path == f"{root}/data/v1/val"
    lin.save()
    on_disk = json.loads((new / "lineage.json").read_text())
    assert on_disk["format"] == FORMAT == 3
    assert on_disk["main_path"][0]["curve"] == "./curves/main-v1.jsonl"


def test_a_format_1_sweep_is_read_where_its_run_directory_now_lies(tmp_path):
    """A sweep that ran before records were movable wrote absolute paths into its own records
    too: its trials, read from ``results.json``, are those of the moved run, not of its first place."""
    from raypath.analysis import sweep_info
    from raypath.lineage import sweep_trials

    old, new = "/gone/runs/q", tmp_path / "q"
    sweep = f"{old}/sweeps/v1/s"
    trial = {"trial_id": "t1", "name": "branch-v1-t1", "status": "done", "score": 2.5,
             "curve": f"{sweep}/curves/branch-v1-t1.jsonl", "export": f"{sweep}/exports/branch-v1-t1",
             "branch": {"name": "branch-v1-t1", "checkpoint": f"{sweep}/branches/branch-v1-t1/step_00000004"}}
    head = {"name": "s", "version": "v1", "path": sweep, "run_dir": old, "main_curve": f"{old}/curves/main-v1.jsonl"}
    (new / "sweeps" / "v1" / "s").mkdir(parents=True)
    (new / "sweeps" / "v1" / "s" / "sweep.json").write_text(json.dumps(head))
    (new / "sweeps" / "v1" / "s" / "results.json").write_text(json.dumps({**head, "best": "t1", "trials": [trial]}))
    (new / "lineage.json").write_text(json.dumps({
        "format": 1, "name": "q", "config": {}, "versions": [{"name": "v1", "val_path": f"{old}/data/v1/val"}],
        "main_path": [{"version": "v1", "curve": f"{old}/curves/main-v1.jsonl"}], "branches": [], "releases": [],
        "sweeps": [{**head, "best": "t1", "trials": [trial]}]}))
    root, at = new.resolve(), new.resolve() / "sweeps" / "v1" / "s"
    lin = Lineage.load(new)
    t = lin.sweep("v1", "s").trials[0]
    assert (t.curve, t.export) == (f"{at}/curves/branch-v1-t1.jsonl", f"{at}/exports/branch-v1-t1")
    assert sweep_trials(at)[0]["branch"]["checkpoint"] == f"{at}/branches/branch-v1-t1/step_00000004"
    info = sweep_info(at)
    assert (info["path"], info["run_dir"], info["main_curve"]) == (str(at), str(root), f"{root}/curves/main-v1.jsonl")
    lin.save()
    assert old not in (new / "lineage.json").read_text()


def test_a_moved_run_directory_is_read_and_extended_where_it_lands(tiny_run, tmp_path):
    cfg, lin = tiny_run
    src = Path(cfg.run_dir)
    first = tmp_path / "first"
    shutil.copytree(src, first, symlinks=True)
    assert _stale(first, src) == []
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)  # nothing is left at the copy's first place
    root = moved.resolve()

    record = Lineage.load(moved).data
    assert record["versions"] == json.loads(json.dumps(lin["versions"]).replace(str(src), str(root)))
    assert all(Path(r["path"], "model.safetensors").is_file() for r in record["releases"])
    assert "v3: r1 branch-v3 (configured)" in _cli(["status", str(moved)])
    assert "path switching / PTFS" in _cli(["cost", str(moved)])
    fit = _cli(["law", "fit", str(moved), "--lambda", "0.99"])
    assert "val/v3" in fit or "v3" in fit
    assert (moved / "law" / "fit-v3.json").is_file()
    from raypath.report import write_report

    paths = write_report(moved)
    assert Path(paths["plot"]).is_file() and Path(paths["plot"]).resolve().is_relative_to(root)

    # Resume where it lands, extended by one version: only the new version trains.
    from raypath.run import run

    curves = {p.name: p.read_bytes() for p in (moved / "curves").iterdir()}
    out = run(tiny_config(moved, "data.versions=[v1,v2,v3,v4]")).data
    assert [m["version"] for m in out["main_path"]] == ["v1", "v2", "v3", "v4"]
    assert {n: (moved / "curves" / n).read_bytes() for n in curves} == curves  # v1-v3 untouched
    v4 = out["main_path"][-1]
    assert v4["start_step"] == lin["main_path"][-1]["end_step"] and Path(v4["checkpoints"]["end"]).is_dir()
    assert Path(v4["checkpoints"]["end"]).resolve().is_relative_to(root)
    assert [r["version"] for r in out["releases"]] == ["v1", "v2", "v3", "v4"]
    on_disk = read_json(moved / "lineage.json")
    assert on_disk["format"] == FORMAT and on_disk["main_path"][-1]["curve"] == "./curves/main-v4.jsonl"
    assert _stale(moved, src) == []


@pytest.mark.parametrize("newer", [4])
def test_a_newer_lineage_format_is_refused_by_name(tmp_path, newer):
    (tmp_path / "lineage.json").write_text(json.dumps({"format": newer}))
    with pytest.raises(ValueError, match=f"lineage format {newer}, this raypath reads formats 1, 2, 3 "
                                         r"\(written by a newer raypath"):
        Lineage.load(tmp_path)
