"""Bad input never ends in a traceback: one case per input a user controls.

Every case runs ``raypath`` in-process on a copy of the finished tiny run and
checks the same four things: exit code 2, exactly one ``raypath: error:`` line
naming the file or field, no traceback, and ``lineage.json``, the data manifest
and every checkpoint byte-identical afterwards. Cases that need no Ray (config,
layout, run directory records, remote storage) also check that Ray is never
asked to start.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, _free_port

from raypath import checkpoint as ckpt
from raypath.cli import main
from raypath.data import read_manifest, version_files
from raypath.lineage import Lineage

LONG = "x" * 1_000_001  # one character over data.max_doc_chars' default


# ---------------------------------------------------------------- helpers

def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of what a failed run must not touch: lineage, data manifest, checkpoints, releases."""
    files = [run_dir / "lineage.json", run_dir / "data" / "manifest.json", *(run_dir / "data").glob("*/files.json"),
             *(p for d in ("ray", "releases") for p in (run_dir / d).rglob("*") if p.is_file())]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def raypath(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_error(rc: int, err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("raypath: error:")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def no_ray_start(*args, **kwargs):
    raise AssertionError("Ray was started before this input was checked")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail if the command gets as far as starting Ray."""
    monkeypatch.setattr("raypath.run.init_ray", no_ray_start)


def run_args(cfg, *extra: str) -> list[str]:
    return ["run", str(TINY), "--set", f"run_dir={cfg.run_dir}", "--set", "data.versions=[v1, v2, v3, v4]", *extra]


# ---------------------------------------------------------------- corpus files, every format

def _jsonl(docs) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _arrow(columns: dict, tmp: Path) -> bytes:
    """The Arrow file Hugging Face ``datasets`` writes with ``save_to_disk``."""
    import datasets

    out = tmp / f"ds-{len(list(tmp.iterdir()))}"
    datasets.Dataset.from_dict(columns).save_to_disk(str(out))
    (arrow,) = out.glob("*.arrow")
    return arrow.read_bytes()


GOOD = [{"text": "a good document. " * 20}] * 20
#: name -> (file name, bytes builder(tmp), what the error names, what ``skip`` drops: the file, or one
#: document as ``invalid`` or ``too_long``)
CORPUS = {
    "jsonl-missing-text": ("bad.jsonl", lambda t: _jsonl([*GOOD, {"body": "no text"}]), "line 21: no 'text'", "invalid"),
    "jsonl-non-string-text": ("bad.jsonl", lambda t: _jsonl([{"text": 5}]), "line 1: no 'text' string", "file"),
    "jsonl-malformed-json": ("bad.jsonl", lambda t: _jsonl(GOOD) + b'{"text": "unclosed\n', "line 21: not valid JSON", "invalid"),
    "jsonl-non-utf8": ("bad.jsonl", lambda t: b'{"text": "caf\xe9"}\n', "line 1: not valid UTF-8", "file"),
    "jsonl-empty": ("bad.jsonl", lambda t: b"", "empty file", "file"),
    "jsonl-over-long": ("bad.jsonl", lambda t: _jsonl([*GOOD, {"text": LONG}]), "line 21: document of 1000001", "too_long"),
    "jsonl.gz-missing-text": ("bad.jsonl.gz", lambda t: _gz(_jsonl([{"body": "x"}])), "line 1: no 'text'", "file"),
    "jsonl.gz-non-utf8": ("bad.jsonl.gz", lambda t: _gz(b'{"text": "\xff"}\n'), "not valid UTF-8", "file"),
    "jsonl.gz-truncated": ("bad.jsonl.gz", lambda t: _gz(_jsonl(GOOD * 50))[:400], "unreadable after", "file"),
    "jsonl.gz-empty": ("bad.jsonl.gz", lambda t: _gz(b""), "empty: no documents", "file"),
    "parquet-missing-column": ("bad.parquet", lambda t: _parquet(pa.table({"body": ["x"]})),
                               "no 'text' column (columns: body)", "file"),
    "parquet-non-string": ("bad.parquet", lambda t: _parquet(pa.table({"text": [1, 2]})), "column 'text' is int64", "file"),
    "parquet-truncated": ("bad.parquet", lambda t: _parquet(pa.table({"text": ["a" * 100] * 50}))[:300],
                          "not a readable parquet file", "file"),
    "parquet-empty-file": ("bad.parquet", lambda t: b"", "empty file", "file"),
    "parquet-no-rows": ("bad.parquet", lambda t: _parquet(pa.table({"text": pa.array([], pa.string())})),
                        "empty: no rows", "file"),
    "parquet-over-long": ("bad.parquet", lambda t: _parquet(pa.table({"text": ["short doc " * 30, LONG]})),
                          "row 1: document of 1000001", "too_long"),
    "arrow-missing-column": ("bad.arrow", lambda t: _arrow({"body": ["x"]}, t), "no 'text' column", "file"),
    "arrow-non-string": ("bad.arrow", lambda t: _arrow({"text": [[1], [2]]}, t), "column 'text' is list", "file"),
    "arrow-truncated": ("bad.arrow", lambda t: _arrow({"text": ["a" * 100] * 50}, t)[:200], "bad.arrow: ", "file"),
    "arrow-over-long": ("bad.arrow", lambda t: _arrow({"text": ["short doc " * 30, LONG]}, t),
                        "row 1: document of 1000001", "too_long"),
}


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    tmp = tmp_path_factory.mktemp("bad-files")
    return {case: (name, build(tmp)) for case, (name, build, _, _) in CORPUS.items()}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_corpus_file(case, corpus_files, tiny_run_copy, capsys):
    """A bad file among a new version's files: named with its line/row before anything reads it."""
    run_dir = Path(tiny_run_copy.run_dir)
    name, data = corpus_files[case]
    bad = run_dir / "corpus" / "v4" / "train" / name
    bad.write_bytes(data)
    before = snapshot(run_dir)
    line = assert_one_error(*raypath(capsys, *run_args(tiny_run_copy)), str(bad), CORPUS[case][2])
    assert "data.on_bad_input: skip" in line
    assert snapshot(run_dir) == before
    assert not (run_dir / "data" / "v4").exists()


def test_bad_file_in_the_first_version_stops_before_the_tokenizer(tiny_run, tmp_path, capsys):
    """Version 1's files train the tokenizer: a bad row there is named, not a KeyError from it."""
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(tiny_run[0].run_dir) / "corpus" / "v1", corpus / "v1")
    bad = corpus / "v1" / "train" / "extra.jsonl"
    bad.write_bytes(_jsonl([*GOOD, {"body": "no text"}]))
    run_dir = tmp_path / "run"
    rc, err = raypath(capsys, "run", str(TINY), "--set", f"run_dir={run_dir}", "--set", f"data.corpus={corpus}",
                      "--set", "data.versions=[v1]")
    assert_one_error(rc, err, str(bad), "line 21")
    assert not (run_dir / "tokenizer").exists() and not (run_dir / "lineage.json").exists()


@pytest.mark.slow  # trains and releases v4: ~2 min on 2 CPUs
def test_skip_finishes_with_every_skippable_file_and_counts_them(corpus_files, tiny_run_copy, capsys):
    """``on_bad_input: skip`` with all bad files of the matrix in v4 at once: v4 trains and is
    released, the manifest lists each unusable file and counts each bad document of the others, and the
    same command again resumes (the skipped files are not mistaken for new ones)."""
    run_dir = Path(tiny_run_copy.run_dir)
    train = run_dir / "corpus" / "v4" / "train"
    whole, docs = set(), {}
    for case, (name, data) in corpus_files.items():
        path = train / f"{case}.{name.split('.', 1)[1]}"
        path.write_bytes(data)
        if CORPUS[case][3] == "file":
            whole.add(str(path.resolve()))
        else:
            docs[CORPUS[case][3]] = docs.get(CORPUS[case][3], 0) + 1
    args = run_args(tiny_run_copy, "--set", "data.on_bad_input=skip")
    rc, err = raypath(capsys, *args)
    assert rc == 0, err
    v4 = version_files(read_manifest(run_dir / "data" / "manifest.json")["versions"][3])  # with its file lists
    assert {s["path"] for s in v4["skipped_files"]} == whole
    assert all(s["reason"] for s in v4["skipped_files"])
    assert v4["skipped_docs"] == docs == {"invalid": 2, "too_long": 3}  # the good documents next to them train
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert [r["version"] for r in lineage["releases"]] == ["v1", "v2", "v3", "v4"]

    before = snapshot(run_dir)
    rc, err = raypath(capsys, *args)
    assert rc == 0, err
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "lineage.json"} == \
        {k: v for k, v in before.items() if k != "lineage.json"}


# ---------------------------------------------------------------- corpus layout

def _rename(run_dir: Path, src: str, dst: str) -> None:
    (run_dir / "corpus" / src).rename(run_dir / "corpus" / dst)


def _edit(path: Path, same_size: bool) -> None:
    data = bytearray(path.read_bytes())
    if same_size:
        data[-4] = ord("Z") if data[-4] != ord("Z") else ord("Y")  # last character of the last text
    else:
        data += _jsonl([{"text": "one more document"}])
    path.write_bytes(bytes(data))


def _part(run_dir: Path, version: str, split: str) -> Path:
    return next((run_dir / "corpus" / version / split).glob("*.jsonl"))


#: name -> (change to the run copy, extra --set, what the error names, checked before Ray)
LAYOUT = {
    "version-without-train": (lambda r: _rename(r, "v4/train", "v4/training"), [], "'v4' has no", True),
    "version-without-val": (lambda r: shutil.rmtree(r / "corpus" / "v4" / "val"), [], "v4/val: no", True),
    "trained-version-renamed": (lambda r: _rename(r, "v2", "v2-old"), [], "'v2' has no", True),
    "trained-version-removed": (lambda r: None, ["data.versions=[v1, v3, v4]"], "versions can only be appended", True),
    "trained-versions-reordered": (lambda r: None, ["data.versions=[v2, v1, v3, v4]"], "version 1 was 'v1'", True),
    "trained-file-edited": (lambda r: _edit(_part(r, "v1", "train"), False), [], "size differs", False),
    "trained-file-edited-same-size": (lambda r: _edit(_part(r, "v2", "val"), True), [], "sha256 differs", False),
    "trained-version-file-added": (lambda r: (r / "corpus/v2/train/more.jsonl").write_bytes(_jsonl(GOOD)), [],
                                   "v2: its train files changed", True),
    "trained-file-deleted": (lambda r: _part(r, "v3", "train").unlink(), [], "v3", True),
}


@pytest.mark.parametrize("case", list(LAYOUT))
def test_bad_corpus_layout(case, tiny_run_copy, capsys, monkeypatch):
    change, extra, names, before_ray = LAYOUT[case]
    run_dir = Path(tiny_run_copy.run_dir)
    change(run_dir)
    if before_ray:
        monkeypatch.setattr("raypath.run.init_ray", no_ray_start)
    before = snapshot(run_dir)
    # The corpus as a plain directory: the embedded builder would repair edits to its files.
    args = run_args(tiny_run_copy, "--set", f"data.corpus={run_dir / 'corpus'}",
                    *(a for e in extra for a in ("--set", e)))
    assert_one_error(*raypath(capsys, *args), names)
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- config and command line

def _write_config(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


#: name -> (config path builder(tmp), --set overrides, what the error names)
CONFIG = {
    "unknown-field-set": (lambda t: str(TINY), ["train.max_lrr=1e-3"], "train.max_lrr: unknown field (did you mean 'max_lr'"),
    "unknown-section-in-file": (lambda t: _write_config(t, TINY.read_text() + "trian:\n  max_lr: 1.0\n"), [],
                                "bad.yaml: trian: unknown field (did you mean 'train'"),
    "mistyped-number": (lambda t: str(TINY), ["train.max_lr=fast"], "train.max_lr: expected a number, got 'fast'"),
    "mistyped-integer": (lambda t: str(TINY), ["train.global_batch_size=8.5"], "train.global_batch_size: expected an integer"),
    "mistyped-list": (lambda t: str(TINY), ["data.versions=v1"], "data.versions: expected a list"),
    "scalar-then-section": (lambda t: str(TINY), ["train=1", "train.max_lr=2"], "'train.max_lr': train is 1, not a section"),
    "override-not-yaml": (lambda t: str(TINY), ["data.versions=[v1"], "override 'data.versions=[v1': line 1: not valid YAML"),
    "override-without-value": (lambda t: str(TINY), ["train.max_lr"], "override 'train.max_lr': expected key.sub=value"),
    "missing-config-file": (lambda t: str(t / "nope.yaml"), [], "nope.yaml: config file not found"),
    "config-not-yaml": (lambda t: _write_config(t, "model: {hidden_size: 32\n"), [], "bad.yaml: line 2: not valid YAML"),
    "config-not-a-mapping": (lambda t: _write_config(t, "- a\n- b\n"), [], "bad.yaml: expected a mapping"),
}


@pytest.mark.parametrize("case", list(CONFIG))
def test_bad_config(case, tiny_run_copy, tmp_path, capsys, no_ray):
    config, overrides, names = CONFIG[case]
    run_dir = Path(tiny_run_copy.run_dir)
    before = snapshot(run_dir)
    args = ["run", config(tmp_path), *(a for o in [f"run_dir={run_dir}", *overrides] for a in ("--set", o))]
    assert_one_error(*raypath(capsys, *args), names)
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- run directory

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _json_edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _forge_sha(files: dict) -> None:
    rec = files["train_files"][0]
    rec["sha256"], rec["mtime_ns"] = "0" * 64, 0  # a new mtime makes the check re-hash the file


#: name -> (change to the run copy, what the error names, checked before Ray)
RUN_DIR = {
    "lineage-truncated": (lambda r: _truncate(r / "lineage.json"), "lineage.json: not valid JSON", True),
    "lineage-not-json": (lambda r: (r / "lineage.json").write_bytes(b"\x00\xff binary"), "lineage.json: not valid JSON", True),
    "lineage-newer-format": (lambda r: _json_edit(r / "lineage.json", lambda d: d.update(format=4)),
                             "lineage format 4, this raypath reads formats 1, 2, 3 (written by a newer raypath",
                             True),
    "manifest-truncated": (lambda r: _truncate(r / "data" / "manifest.json"), "manifest.json: not valid JSON", False),
    "manifest-sha256-mismatch": (lambda r: _json_edit(r / "data" / "v1" / "files.json", _forge_sha), "sha256 differs",
                                 False),
    "file-list-truncated": (lambda r: _truncate(r / "data" / "v2" / "files.json"), "v2/files.json: not valid JSON",
                            False),
    "file-list-missing": (lambda r: (r / "data" / "v2" / "files.json").unlink(),
                          "v2/files.json: version v2's file list is missing", False),
    "tokenizer-missing": (lambda r: shutil.rmtree(r / "tokenizer"), "tokenizer directory is missing", False),
}


@pytest.mark.parametrize("case", list(RUN_DIR))
def test_bad_run_directory(case, tiny_run_copy, capsys, monkeypatch):
    change, names, before_ray = RUN_DIR[case]
    run_dir = Path(tiny_run_copy.run_dir)
    change(run_dir)
    if before_ray:
        monkeypatch.setattr("raypath.run.init_ray", no_ray_start)
    before = snapshot(run_dir)
    assert_one_error(*raypath(capsys, *run_args(tiny_run_copy)), names)
    assert snapshot(run_dir) == before


def test_run_directory_not_writable(tmp_path, capsys, no_ray):
    """Tests run as root, which may write anywhere: a run_dir below a regular file is truly unwritable."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = raypath(capsys, "run", str(TINY), "--set", f"run_dir={blocker / 'run'}")
    assert_one_error(rc, err, f"run_dir: {blocker / 'run'} is not a writable directory")
    assert blocker.read_text() == "not a directory"


# ---------------------------------------------------------------- checkpoints

def _drop_from_disk(step: Path) -> None:
    (step / "optim.pt").unlink()  # the manifest still lists it


CHECKPOINT = {
    "model-truncated": lambda step: _truncate(step / "model.pt"),
    "state-missing": lambda step: (step / "state.json").unlink(),
    "manifest-lists-missing-file": _drop_from_disk,
    "manifest-truncated": lambda step: _truncate(step / ckpt.MANIFEST),
}


@pytest.mark.parametrize("case", list(CHECKPOINT))
def test_torn_checkpoint_resumes_from_the_previous_one(case, tiny_run_copy, caplog):
    """The newest checkpoint of a segment is broken: resuming picks the one before it."""
    lineage = Lineage.load(tiny_run_copy.run_dir).data
    points = lineage["main_path"][-1]["checkpoints"]
    end = Path(points["end"])
    previous = sorted(end.parent.glob("step_*"))[-2]
    assert ckpt.latest_valid(end.parent) == end
    CHECKPOINT[case](end)
    assert ckpt.latest_valid(end.parent) == previous
    if case == "model-truncated":  # complete but corrupted: quarantined, so that pruning drops it
        assert f"quarantining checkpoint {end}: {end}: model.pt does not match its checksum" in caplog.text
        assert (end / f"{ckpt.MANIFEST}.corrupt").is_file() and not (end / ckpt.MANIFEST).exists()
    else:
        assert f"skipping checkpoint: {end}" in caplog.text


# ---------------------------------------------------------------- remote storage

@pytest.fixture(scope="module")
def s3_strict(tmp_path_factory):
    """A moto S3 server that checks credentials (no IAM user exists, so every key is wrong);
    yields (endpoint, path of its request log)."""
    import os

    port = _free_port()
    log = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        import socket

        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def aws_keys(monkeypatch):
    from conftest import AWS_ENV

    for key, value in {**AWS_ENV, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}.items():
        monkeypatch.setenv(key, value)


def _requests(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if "HTTP/1.1" in line)


@pytest.mark.parametrize("where", ["run_dir", "corpus"])
@pytest.mark.parametrize("server", ["stopped", "wrong-credentials"])
def test_unreachable_or_refused_storage(where, server, s3_strict, aws_keys, tiny_run_copy, tmp_path, capsys, no_ray):
    """One clear line naming the URI, after a bounded number of requests (no retry storm)."""
    endpoint, log = s3_strict
    if server == "stopped":
        endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    run_dir = Path(tiny_run_copy.run_dir)
    before, requests = snapshot(run_dir), _requests(log)
    args = ["run", str(TINY), "--set", f"cluster.storage_endpoint={endpoint}"]
    if where == "run_dir":
        args += ["--set", "run_dir=s3://bucket/run", "--set", f"cluster.local_dir={tmp_path / 'mirror'}"]
        names = ("run_dir: cannot read s3://bucket/run",)
    else:
        args += ["--set", f"run_dir={run_dir}", "--set", "data.corpus=s3://bucket/corpus"]
        names = ("data.corpus: cannot", "s3://bucket/corpus")
    line = assert_one_error(*raypath(capsys, *args), *names)
    assert ("Could not connect" if server == "stopped" else "ACCESS") in line
    assert snapshot(run_dir) == before
    if server == "wrong-credentials":
        assert 0 < _requests(log) - requests <= 3


# ---------------------------------------------------------------- anything else

def test_unexpected_error_is_one_line_and_a_log_file(monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("something inside broke\nsecond line of the message")

    monkeypatch.setattr("raypath.run.run", broken)
    rc, err = raypath(capsys, "run", str(TINY))
    assert rc == 1 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("raypath: error: unexpected RuntimeError: something inside broke (traceback in ")
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "second line of the message" in log.read_text()
    rc, err = raypath(capsys, "--verbose", "run", str(TINY))
    assert rc == 1 and "Traceback" in err and "raypath: error: unexpected RuntimeError" in err.splitlines()[-1]


def test_an_error_that_heads_its_cause_shows_the_cause_on_its_one_line(monkeypatch, capsys):
    """Ray Train reports a store lost mid-run as a heading line, the cause on the next: the heading
    alone says nothing the user can act on."""
    from ray.train import ControllerError

    def store_gone(cfg):
        raise ControllerError(OSError("When listing objects under key 'run/ray/main-v1/' in bucket 'b': AWS Error "
                                      "NETWORK_CONNECTION, Could not connect to server\nDetails: curl 7"))

    monkeypatch.setattr("raypath.run.run", store_gone)
    rc, err = raypath(capsys, "run", str(TINY))
    (line,) = err.splitlines()
    assert rc == 1 and line.startswith("raypath: error: unexpected ControllerError: Training failed due to controller "
                                       "error: When listing objects under key 'run/ray/main-v1/' in bucket 'b'")
    assert "Could not connect to server (traceback in " in line and "curl 7" not in line


# ---------------------------------------------------------------- the cluster

def test_workers_that_do_not_fit_the_cluster_are_refused_on_a_local_one_and_warned_of_on_another(
        ray_cluster, caplog):
    """Ray Train waits without a word for resources that never come (and Ctrl-C does not end the
    wait): a local cluster is all there is, an existing one may autoscale."""
    import ray

    from raypath.cluster import check_workers_fit
    from raypath.config import ConfigError, load_config

    cpus, gpus = ray.cluster_resources()["CPU"], ray.cluster_resources().get("GPU", 0)
    big = load_config(TINY, ["train.num_workers=2", "train.global_batch_size=16", f"train.cpus_per_worker={cpus}"])
    with pytest.raises(ConfigError, match=rf"train.num_workers: 2 worker\(s\) x {cpus:g} CPUs \(train.cpus_per_worker\) "
                                          rf"need {2 * cpus:g} CPUs and Ray Data's reads 1 more, the cluster has "
                                          rf"{cpus:g} \(a local cluster's"):
        check_workers_fit(big.train, local=True)
    n = int(gpus) + 1
    gpu = load_config(TINY, ["train.use_gpu=true", f"train.num_workers={n}", f"train.global_batch_size={8 * n}"])
    with pytest.raises(ConfigError, match=rf"train.use_gpu: {n} worker\(s\) need a GPU each, the cluster has {gpus:g}"):
        check_workers_fit(gpu.train, local=True)
    with caplog.at_level("WARNING", logger="raypath.cluster"):
        check_workers_fit(big.train, local=False)
    assert "training waits until the cluster has them" in caplog.text
    check_workers_fit(load_config(TINY).train, local=True)  # what fits passes


def test_workers_that_leave_no_cpu_for_the_data_reads_are_refused_and_a_branch_beside_them_waits(
        ray_cluster, caplog):
    """Ray Data reads a segment's stream in tasks of one CPU outside the Train workers' reservation:
    workers holding every CPU (one segment, or the main path and a parallel branch together) never
    get their first batch, and the job hangs without a word (seen with configs/tiny.yaml submitted
    to a `ray start --num-cpus=2` head)."""
    import ray

    from raypath.cluster import branches_fit_beside, check_workers_fit
    from raypath.config import ConfigError, load_config

    cpus = ray.cluster_resources()["CPU"]
    full = load_config(TINY, ["train.num_workers=2", f"train.cpus_per_worker={cpus / 2:g}"])
    with pytest.raises(ConfigError, match=r"Ray Data's reads 1 more"):
        check_workers_fit(full.train, local=True)
    half = load_config(TINY, ["train.num_workers=2", f"train.cpus_per_worker={cpus / 4:g}"])
    check_workers_fit(half.train, local=True)  # one segment leaves half the cluster to the reads
    with caplog.at_level("WARNING", logger="raypath.cluster"):
        assert not branches_fit_beside(half.train)  # main path + branch would hold every CPU
    assert "branch.parallel" in caplog.text and "after its main segment" in caplog.text
    roomy = load_config(TINY, ["train.num_workers=1", f"train.cpus_per_worker={(cpus - 1) / 2:g}"])
    assert branches_fit_beside(roomy.train)  # one CPU left to the reads
    assert branches_fit_beside(full.train)  # a branch that cannot start beside the main path waits for its CPUs
