"""The lineage's typed records and the one API that reads and writes them."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from raypath.lineage import Branch, Lineage, MainEntry, Release, Sweep, SweepTrial, Version
from raypath.storage import RunFileError, write_json

ROOT = Path(__file__).resolve().parents[1]


def _main(version: str, start: int, end: int, **kw) -> dict:
    return {"version": version, "segment": f"main-{version}", "start_step": start, "end_step": end,
            "fork_step": end - 2, "tokens_start": start * 10, "tokens_end": end * 10,
            "checkpoints": {"fork": f"/r/ray/main-{version}/a", "end": f"/r/ray/main-{version}/b"},
            "metrics": {f"val/{version}": 4.0}, "status": "done", **kw}


def _document() -> dict:
    return {
        "format": 2, "name": "demo", "config": {"branch": {"min_lr_ratio": 0.1}},
        "versions": [{"name": "v1", "index": 0, "new_tokens": 100, "train_files": ["a"]},
                     {"name": "v2", "index": 1, "new_tokens": 200, "train_files": ["b"]}],
        # out of order on purpose: readers get step order
        "main_path": [_main("v2", 8, 16), _main("v1", 0, 8, future_field={"kept": True})],
        "branches": [{"name": "branch-v1", "version": "v1", "fork_step": 6, "steps": 2, "metrics": {"val/v1": 3.9},
                      "status": "done", "release": "/r/exports/branch-v1"},
                     {"name": "branch-v2", "version": "v2", "fork_step": 14, "steps": 2, "status": "failed"}],
        "releases": [{"id": "r1", "version": "v1", "version_index": 0, "branch": "branch-v1", "objective": 3.9,
                      "candidates": 1, "release": "r1", "pinned": False}],
        "release_history": {},
        "sweeps": [{"name": "s", "version": "v2", "path": "/r/sweeps/v2/s", "best": "t1",
                    "trials": [{"trial_id": "t1", "name": "branch-v2-t1", "status": "done", "score": 3.5,
                                "order": 0}]}],
        "compare": {"ptfs": [{"version": "v1", "tokens_trained": 80, "val": {}}]},
    }


def test_records_round_trip_with_the_keys_they_do_not_declare():
    doc = _document()
    for cls, key in ((Version, "versions"), (MainEntry, "main_path"), (Branch, "branches"),
                     (Release, "releases"), (Sweep, "sweeps")):
        for d in doc[key]:
            assert cls.from_dict(d).to_dict() == d, cls.__name__  # nothing added, nothing lost
    v1 = MainEntry.from_dict(doc["main_path"][1])
    assert v1.extra == {"future_field": {"kept": True}} and v1.tokens == 80
    assert Branch.from_dict(doc["branches"][0]).extra == {"release": "/r/exports/branch-v1"}
    assert isinstance(Sweep.from_dict(doc["sweeps"][0]).trials[0], SweepTrial)
    with pytest.raises(TypeError):
        MainEntry.from_dict({"start_step": 0})  # a main-path entry names its version


def test_typed_readers_of_a_document():
    lin = Lineage.of(_document())
    assert lin.version_names() == ["v1", "v2"] and lin.versions()[1].new_tokens == 200
    assert [m.version for m in lin.main_path()] == ["v1", "v2"]  # step order
    assert lin.main("v2").checkpoints["end"] == "/r/ray/main-v2/b" and lin.main("v3") is None
    assert [b.name for b in lin.branches()] == ["branch-v1"]  # finished ones only
    assert [b.name for b in lin.branches("v2", done=False)] == ["branch-v2"]
    assert lin.branch("branch-v2").status == "failed"
    assert lin.release("v1").objective == 3.9 and lin.release("v2") is None
    assert lin.sweep("v2", "s").trials[0].score == 3.5 and lin.sweeps("v1") == []
    # a comparison recorded before shape-matched baselines reads as the paper's cosine decay
    assert lin.baselines("ptfs")[0]["decay"] == {"shape": "cosine", "min_lr_ratio": 0.1, "power": 2.0}
    assert Lineage.of(lin) is lin
    with pytest.raises(RunFileError, match="in memory"):
        lin.save()


def test_a_changed_config_is_kept_with_the_versions_trained_before_it(tmp_path):
    config = {"name": "demo", "run_dir": "a", "train": {"precision": "fp32", "betas": (0.9, 0.95)}}
    Lineage.open(tmp_path, "demo", config).record_main(MainEntry(version="v1", segment="main-v1", end_step=8))
    # the same config (betas read back as a list), the run directory copied elsewhere: nothing to note
    Lineage.open(tmp_path, "demo", {**config, "run_dir": "b"}).save()
    bf16 = {**config, "train": {"precision": "bf16", "betas": (0.9, 0.95)}}
    Lineage.open(tmp_path, "demo", bf16).save()
    Lineage.open(tmp_path, "demo", config)  # refused: never saved
    changes = Lineage.load(tmp_path).data["config_changes"]
    assert [(c["trained"], c["changed"]) for c in changes] == [(["v1"], {"train.precision": ["fp32", "bf16"]})]
    assert Lineage.load(tmp_path).config["train"]["precision"] == "bf16"


def test_writers_save_typed_records(tmp_path):
    lin = Lineage.open(tmp_path, "demo", {"name": "demo"})
    lin.set_versions([{"name": "v1", "index": 0}, Version(name="v2", index=1)])
    lin.record_main(MainEntry(version="v1", segment="main-v1", end_step=8, tokens_end=80,
                              checkpoints={"end": str(tmp_path / "ray" / "main-v1" / "step_8")}))
    lin.record_branch(Branch(name="branch-v1", version="v1", fork_step=6, steps=2, status="running"))
    lin.record_branch(Branch(name="branch-v1", version="v1", fork_step=6, steps=2, metrics={"val/v1": 3.0}))
    sweep_dir = _results(tmp_path / "sweeps" / "v1" / "s", [{"trial_id": "t1", "status": "done"}])
    lin.record_sweep({"name": "s", "version": "v1", "path": str(sweep_dir), "trials": [{"trial_id": "t1"}]})
    lin.record_baseline("cpt", {"version": "v1", "decay": {"shape": "cosine"}, "tokens_trained": 1})
    lin.record_baseline("cpt", {"version": "v1", "decay": {"shape": "cosine"}, "tokens_trained": 2})
    lin.record_replay_run("0.25", str(tmp_path / "compare" / "replay-0.25"))

    back = Lineage.load(tmp_path)
    assert back.version_names() == ["v1", "v2"]
    main = back.main("v1")
    assert main.tokens == 80 and main.finished is not None
    assert main.checkpoints["end"] == str(tmp_path / "ray" / "main-v1" / "step_8")  # absolute in memory
    assert back.data["main_path"][0]["checkpoints"]["end"] == str(tmp_path / "ray/main-v1/step_8")
    assert "./ray/main-v1/step_8" in (tmp_path / "lineage.json").read_text()  # relative on disk
    assert [(b.name, b.metrics) for b in back.branches()] == [("branch-v1", {"val/v1": 3.0})]  # replaced
    assert back.sweep("v1", "s").trials[0].status == "done" and "finished" in back.sweep("v1", "s").extra
    assert [e["tokens_trained"] for e in back.baselines("cpt")] == [2]
    assert back.replay_runs() == {"0.25": str(tmp_path / "compare" / "replay-0.25")}


def test_writers_in_a_batch_save_once_and_keep_their_records_if_it_fails(tmp_path, monkeypatch):
    """A run's start records its facts and versions in one save (in a bucket each save is ~1 s of
    the store's lease); what was recorded before an error inside the batch is still saved."""
    from raypath import lineage as lineage_mod

    lin = Lineage.open(tmp_path, "demo", {"name": "demo"})
    lin.set_fact("tokenizer", {"path": "tok"})
    writes, write = [], lineage_mod.write_json
    monkeypatch.setattr(lineage_mod, "write_json", lambda path, *a, **k: writes.append(path) or write(path, *a, **k))
    with lin.batched():
        lin.set_fact("tokenizer", {"path": "tok", "vocab_size": 64})
        with lin.batched():  # nested: still the outer batch's one save
            lin.set_fact("storage", {"run_dir": "s3://b/run"})
        lin.set_versions([{"name": "v1", "index": 0}])
        assert writes == [] and "storage" not in Lineage.load(tmp_path).data
    assert len(writes) == 1
    back = Lineage.load(tmp_path)
    assert back.fact("tokenizer")["vocab_size"] == 64 and back.fact("storage") and back.version_names() == ["v1"]
    with pytest.raises(RuntimeError, match="preparation failed"), lin.batched():
        lin.set_fact("model", {"base": {"path": "m"}})
        raise RuntimeError("preparation failed")
    assert len(writes) == 2 and Lineage.load(tmp_path).fact("model") == {"base": {"path": "m"}}


def _results(sweep_dir: Path, trials: list[dict]) -> Path:
    """A finished sweep's ``results.json`` (the record the sweep writes before the lineage's)."""
    write_json(sweep_dir / "results.json", {"name": sweep_dir.name, "trials": trials}, root=sweep_dir.parents[2])
    return sweep_dir


def test_the_lineage_keeps_a_sweep_summary_and_reads_its_trials_from_the_sweep(tmp_path, caplog):
    lin = Lineage.open(tmp_path, "demo", {})
    many = [{"trial_id": f"t{i}", "name": f"b-t{i}", "status": "done", "metrics": {f"val/v{k}": 3.0 for k in range(50)},
             "curve": str(tmp_path / "sweeps/v1/s/curves" / f"t{i}.jsonl")} for i in range(200)]
    sweep_dir = _results(tmp_path / "sweeps" / "v1" / "s", many)
    lin.record_sweep({"name": "s", "version": "v1", "path": str(sweep_dir), "best": "t3", "trials": many})
    on_disk = json.loads((tmp_path / "lineage.json").read_text())
    assert on_disk["format"] == 3 and "trials" not in on_disk["sweeps"][0]
    assert on_disk["sweeps"][0]["n_trials"] == 200 and on_disk["sweeps"][0]["path"] == "./sweeps/v1/s"
    assert (tmp_path / "lineage.json").stat().st_size < 2_000  # 200 trials x 50 losses stay in the sweep
    back = Lineage.load(tmp_path)
    trials = back.sweep("v1", "s").trials
    assert [t.trial_id for t in trials] == [f"t{i}" for i in range(200)] and trials[7].metrics["val/v49"] == 3.0
    assert trials[7].curve == str(tmp_path / "sweeps/v1/s/curves/t7.jsonl")  # absolute where it lies now
    assert back.sweep("v1", "s").trials is trials  # read once
    _results(sweep_dir, many[:2])  # the sweep re-ran (resumed): its record changed
    assert len(back.sweep("v1", "s").trials) == 2
    # a removed sweep directory: the summary stays, the trials are gone, and the log says where
    shutil.rmtree(sweep_dir)
    with caplog.at_level(logging.WARNING, "raypath.lineage"):
        assert back.sweep("v1", "s").trials == [] and back.sweep("v1", "s").best == "t3"
    assert f"{sweep_dir / 'results.json'}: missing" in caplog.text
    # a results.json that is not a sweep's record is named
    (sweep_dir).mkdir(parents=True)
    (sweep_dir / "results.json").write_text('{"trials": {"t1": {}}}')
    with pytest.raises(RunFileError, match=r"results\.json: 'trials' must be a list"):
        back.sweeps("v1")


def test_a_format_2_lineage_drops_the_inline_trials_its_sweeps_keep(tmp_path):
    doc = _document()
    sweep_dir = _results(tmp_path / "sweeps" / "v2" / "s", [{"trial_id": "t1", "name": "b-t1", "score": 2.5}])
    doc["sweeps"][0]["path"] = "./sweeps/v2/s"
    gone = {**doc["sweeps"][0], "name": "gone", "path": "./sweeps/v2/gone"}  # its directory was removed
    doc["sweeps"].append(gone)
    (tmp_path / "lineage.json").write_text(json.dumps(doc))
    lin = Lineage.load(tmp_path)
    assert lin.sweep("v2", "s").trials[0].score == 2.5  # the sweep's own record
    assert lin.sweep("v2", "gone").trials[0].score == 3.5  # inline: the only copy left
    lin.save()
    sweeps = json.loads((tmp_path / "lineage.json").read_text())["sweeps"]
    assert [("trials" in s, s.get("n_trials")) for s in sweeps] == [(False, 1), (True, None)]
    assert Lineage.load(tmp_path).sweep("v2", "s").path == str(sweep_dir)


#: How a module would read the lineage's JSON by hand (what the typed API replaces).
HAND_READ = re.compile(r'\b(lineage|lin|data|h)(\.data)?(\[|\.get\()"(versions|main_path|branches|releases|'
                       r'release_history|sweeps|compare)"|lineage\.data\[')


def test_only_the_lineage_module_reads_the_lineage_document():
    offenders = []
    for path in [*ROOT.glob("raypath/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("jobs/*.py")]:
        if path.name == "lineage.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if HAND_READ.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "read these through raypath.lineage.Lineage:\n" + "\n".join(offenders)


def test_a_lookup_of_one_version_reads_one_record(monkeypatch):
    """``raypath run`` plans each version by looking up its main segment, release and branch;
    reading every version's record per lookup made a plan of n versions read n^2 of them."""
    from raypath import lineage as lineage_mod

    parse, read = lineage_mod.Record.__dict__["from_dict"].__func__, []

    def counted(cls, d):
        read.append(cls.__name__)
        return parse(cls, d)

    lin = Lineage.of(_document())
    monkeypatch.setattr(lineage_mod.Record, "from_dict", classmethod(counted))
    assert lin.main("v2").end_step == 16 and lin.release("v1").objective == 3.9
    assert lin.branch("branch-v2").status == "failed" and [b.name for b in lin.branches("v1")] == ["branch-v1"]
    assert read == ["MainEntry", "Release", "Branch", "Branch"]


def test_a_pickled_lineage_leaves_out_the_sweep_trials_it_read(tmp_path):
    """A sweep's law guide holds the lineage and Tune pickles the guide (tuner.pkl) after its
    first fit read every sweep's trials: the pickle kept them all (a loss per version per trial)."""
    import pickle

    from law_lineage import write_run

    lin = Lineage.load(write_run(tmp_path, 3, trials=4))
    assert sum(len(s.trials) for s in lin.sweeps()) == 12
    state = pickle.dumps(lin)
    assert b"test/v1" not in state  # only the trials' metrics hold test losses
    again = pickle.loads(state)
    assert [t.trial_id for t in again.sweeps("v2")[0].trials] == ["t0000", "t0001", "t0002", "t0003"]


def test_a_rerun_says_once_which_versions_it_skips_as_done():
    """A re-run of a trained lineage went silently past its finished versions; one whose
    release is still missing (its branch to run or decide) is not done."""
    from raypath.run import finished_note

    lin = Lineage.of({"main_path": [{"version": "v1"}, {"version": "v2"}, {"version": "v3"}],
                      "releases": [{"id": "r1", "version": "v1"}, {"id": "r1", "version": "v2"}]})
    assert finished_note(lin, ["v1", "v2", "v3", "v4"]) == \
        "v1, v2 already trained and released (lineage.json): skipped"
    assert finished_note(Lineage.of({"main_path": [{"version": "v1"}]}), ["v1"]) is None


def test_an_unknown_version_names_the_flag_it_came_from():
    from raypath.config import ConfigError
    from raypath.lineage import resolve_version

    assert resolve_version(["v1", "v2"], "2") == 1 and resolve_version(["v1", "v2"], "v1") == 0
    with pytest.raises(ConfigError, match=r"^--version v9: not a version of this run \(versions: v1, v2\)$"):
        resolve_version(["v1", "v2"], "v9")


_WRITER = """
import sys, time
from raypath.lineage import Lineage
run, me, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
lin = Lineage.load(run)  # read once, as a run or a sweep reads it at its start
while time.time() < start:
    time.sleep(0.005)
for i in range(n):
    lin.record_branch({"name": f"{me}-{i}", "version": "v1", "status": "done"})
    if i == n // 2:
        lin.set_fact(me, {"i": i})
"""


def test_writers_in_several_processes_keep_each_others_entries(tmp_path):
    """`raypath run` and sweeps beside it each hold the lineage they read at their start: a save of
    one process's copy dropped what the others had saved since. Each save merges now: four
    processes recording at once keep every entry and fact, and a reader of its own older copy sees
    them after :meth:`Lineage.refresh`."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    lin = Lineage.open(run, "demo", {"a": 1})
    lin.record_main(_main("v1", 0, 10))
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(run), f"w{k}", "15", str(start)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for k in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    names = {b.name for b in Lineage.load(run).branches()}
    assert names == {f"w{k}-{i}" for k in range(4) for i in range(15)}
    assert not lin.branches()  # its copy, read before them
    lin.record_main(_main("v2", 10, 20))  # this process's own edit, merged into theirs
    saved = Lineage.load(run)
    assert [m.version for m in saved.main_path()] == ["v1", "v2"] and len(saved.branches()) == 60
    assert all(saved.fact(f"w{k}") == {"i": 7} for k in range(4)) and saved.config == {"a": 1}
    assert len(lin.refresh().branches()) == 60
