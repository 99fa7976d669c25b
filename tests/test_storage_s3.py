"""Run directories on S3, against a real S3 API: ``moto_server`` on loopback.

The server is a real subprocess speaking the S3 protocol over HTTP; raypath talks
to it through pyarrow's S3 filesystem exactly as it would to AWS or MinIO. The
lineage runs are real ``raypath run`` processes, each with its own local Ray
cluster, so "re-run the same command on a fresh machine" is literal: the local
mirror is deleted between runs and everything must come back from the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raypath import checkpoint as ckpt
from raypath import mirror as mirror_module
from raypath.data import Consumed
from raypath.mirror import NOT_MIRRORED, Mirror, RunDir, run_location
from raypath.storage import LOCKS_DIR

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
RAYPATH = Path(sys.executable).with_name("raypath")
from conftest import AWS_ENV, S3  # the moto server fixture lives in conftest
from conftest import bucket as _bucket

# ---------------------------------------------------------------- the mirror itself (no Ray)

def _files(root: str | Path) -> list[Path]:
    """The files under a mirror ``root`` but its local lock files (never pulled nor uploaded)."""
    return [p for p in Path(root).rglob("*") if p.is_file() and LOCKS_DIR not in p.relative_to(root).parts]


def test_mirror_round_trip_through_s3(s3, tmp_path, monkeypatch):
    bucket = _bucket(s3, "mirror")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the standard variable, read on the driver
    here, mirror = run_location(f"s3://{bucket}/run/", str(tmp_path / "a"))
    assert mirror is not None and mirror.endpoint == s3.endpoint and here == (tmp_path / "a").resolve()
    (here / "data" / "v1").mkdir(parents=True)
    (here / "data" / "v1" / "stream.parquet").write_bytes(b"x" * 1000)
    (here / "data" / "v1" / "files.json").write_text("{}")
    (here / "data" / "manifest.json").write_text('{"versions": []}')
    (here / "ray" / "main-v1" / "step_00000004").mkdir(parents=True)
    (here / "ray" / "main-v1" / "step_00000004" / "model.pt").write_bytes(b"w")
    uploads = []
    upload = mirror_module._upload
    monkeypatch.setattr(mirror_module, "_upload", lambda local, fs, dst, progress: (
        uploads.append(dst), upload(local, fs, dst, progress)))
    for name in ("data", "ray"):
        mirror.push(here / name)
    monkeypatch.undo()
    assert s3.files(f"{bucket}/run") == {f"{bucket}/run/data/v1/stream.parquet": 1000,
                                         f"{bucket}/run/data/v1/files.json": 2,
                                         f"{bucket}/run/data/manifest.json": 16,
                                         f"{bucket}/run/ray/main-v1/step_00000004/model.pt": 1}
    # Data first, then the records, deepest first: the manifest names v1/files.json, so a
    # reader of the bucket never sees it before the list it names.
    assert [u.split("/run/", 1)[1] for u in uploads[:3]] == ["data/v1/stream.parquet", "data/v1/files.json",
                                                             "data/manifest.json"]

    # Another machine, another mirror: the driver's start pulls all but checkpoints.
    other = Mirror(mirror.remote, str(tmp_path / "b"), s3.endpoint)
    other.pull_run()
    got = {p.relative_to(other.local).as_posix() for p in _files(Path(other.local))}
    assert got == {"data/manifest.json", "data/v1/files.json"}  # token files are read from the bucket, never pulled
    assert "ray" in NOT_MIRRORED
    # ...and a worker fetches a checkpoint directory whole when it needs it.
    step = Path(other.local, "ray", "main-v1", "step_00000004")
    assert other.pull(step) == step and (step / "model.pt").read_bytes() == b"w"

    # Metadata is rewritten in place, so it is always copied (same size or not).
    (here / "data" / "manifest.json").write_text('{"versions": [1]}')
    mirror.push(here / "data" / "manifest.json")
    other.pull(Path(other.local, "data", "manifest.json"))
    assert Path(other.local, "data", "manifest.json").read_text() == '{"versions": [1]}'

    assert other.pull(Path(other.local, "data", "v1", "stream.parquet")).read_bytes() == b"x" * 1000  # on demand
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/run/data/v2/val.parquet: not found"):
        other.pull(Path(other.local, "data", "v2", "val.parquet"))


class _CountingFS:
    """A pyarrow filesystem that counts the entries its listings return (and passes everything on)."""

    def __init__(self, fs: pafs.FileSystem, listed: list):
        self._fs, self._listed = fs, listed

    def get_file_info(self, what):
        got = self._fs.get_file_info(what)
        if isinstance(what, pafs.FileSelector):
            self._listed.extend(i.path for i in got)
        return got

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_a_start_lists_a_runs_records_not_its_token_files_trials_or_checkpoints(s3, tmp_path, monkeypatch):
    """A start lists of data/ and sweeps/ the directories down to their records: not a version's
    stream parts and dedup index, nor a sweep's trials, checkpoints and exports (S3 returns a
    thousand objects a listing request). A file fetched on demand below them stays in the mirror."""
    from raypath.mirror import RECORDS

    bucket = _bucket(s3, "startlist")
    bulk = [f"data/v1/stream/part-{i:03d}.parquet" for i in range(40)] + \
        [f"data/v1/dedup/index/part-{i:05d}.parquet" for i in range(20)] + ["data/ptfs-v1/stream/stream.json"] + \
        [f"sweeps/v1/s/trial_{i}/params.json" for i in range(10)] + \
        [f"sweeps/v1/s/branches/branch-v1-{i}/step_{j}/model.pt" for i in range(10) for j in range(5)]
    records = ["data/manifest.json", "data/v1/files.json", "sweeps/v1/s/sweep.json", "sweeps/v1/s/results.json",
               "sweeps/v1/s/standing.json", "sweeps/v1/s/curves/t0.jsonl", "sweeps/v1/s/curves/t1.jsonl"]
    for rel in ("lineage.json", *records, *bulk):
        with s3.fs.open_output_stream(f"{bucket}/run/{rel}") as f:
            f.write(b"{}")
    listed = []
    filesystem = Mirror.filesystem
    monkeypatch.setattr(Mirror, "filesystem", lambda self: _CountingFS(filesystem(self), listed))
    monkeypatch.setattr(mirror_module, "SETTLED_S", 0.0)  # the bucket's objects are old enough to trust their stamps
    other = Mirror(f"s3://{bucket}/run", str(tmp_path / "m"), s3.endpoint)
    other.pull_run()
    got = {p.relative_to(other.local).as_posix() for p in _files(other.local) if ".locks" not in p.parts}
    assert got == {"lineage.json", *records}
    below = ("data/v1/stream/", "data/v1/dedup/", "data/ptfs-v1/stream/", "sweeps/v1/s/branches/",
             *(f"sweeps/v1/s/trial_{i}/" for i in range(10)))
    assert not [p for p in listed if any(f"/run/{d}" in p for d in below)]  # directories and records only
    on_demand = Path(other.local, "sweeps/v1/s/branches/branch-v1-0/step_0/model.pt")
    other.pull(on_demand)
    s3.fs.delete_file(f"{bucket}/run/sweeps/v1/s/curves/t1.jsonl")  # removed there: removed here
    other.pull_run()
    assert on_demand.is_file() and not Path(other.local, "sweeps/v1/s/curves/t1.jsonl").exists()
    reader = Mirror(f"s3://{bucket}/run", str(tmp_path / "r"), s3.endpoint)
    reader.pull_run(RECORDS)
    assert {p.relative_to(reader.local).as_posix() for p in _files(reader.local) if ".locks" not in p.parts} == \
        {"lineage.json", "sweeps/v1/s/standing.json"}


def test_a_sweep_uploads_after_each_trial_what_changed_not_the_whole_sweep_directory(s3, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from raypath.sweep import _uploader

    bucket = _bucket(s3, "sweepup")
    here, mirror = run_location(f"s3://{bucket}/run", str(tmp_path / "m"), s3.endpoint)
    rd, sweep_dir = RunDir(here, mirror), here / "sweeps" / "v2" / "sweep"
    callback = _uploader(SimpleNamespace(ctx=SimpleNamespace(rd=rd), sweep_dir=sweep_dir))
    uploads, listed = [], []
    real_upload = mirror_module._upload

    def upload(local, fs, dst, progress):
        uploads.append(dst)
        real_upload(local, fs, dst, progress)

    monkeypatch.setattr(mirror_module, "_upload", upload)
    filesystem = Mirror.filesystem
    monkeypatch.setattr(Mirror, "filesystem", lambda self: _CountingFS(filesystem(self), listed))
    (sweep_dir / "sweep.json").parent.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text("{}")
    per_trial = []
    for i in range(6):
        trial = sweep_dir / f"trial_{i}"
        trial.mkdir()
        (trial / "params.json").write_text('{"fraction": 0.1}')
        (trial / "progress.csv").write_text("step,loss\n1,4.0\n")
        (sweep_dir / "experiment_state.json").write_text(json.dumps({"trials": i + 1}))
        # the trial's own workers wrote its export (here too: one node) and checkpoints to the bucket
        export = sweep_dir / "exports" / f"branch-v2-{i}"
        export.mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "model_card.json"):
            (export / name).write_text("{}")
            with s3.fs.open_output_stream(f"{bucket}/run/sweeps/v2/sweep/exports/branch-v2-{i}/{name}") as f:
                f.write(b"{}")
        for j in range(30):
            with s3.fs.open_output_stream(f"{bucket}/run/sweeps/v2/sweep/branches/branch-v2-{i}/step_{j}") as f:
                f.write(b"w")
        uploads.clear(), listed.clear()
        callback.on_trial_complete(i, [], None)
        per_trial.append(({u.split("/sweep/", 1)[1] for u in uploads}, len(listed)))
    assert per_trial[0][0] == {"sweep.json", "experiment_state.json", "trial_0/params.json", "trial_0/progress.csv"}
    for i, (sent, n_listed) in enumerate(per_trial[1:], 1):
        # this trial's files and the state Tune rewrote; not the earlier trials', nor what workers uploaded
        assert sent == {"experiment_state.json", f"trial_{i}/params.json", f"trial_{i}/progress.csv"}, i
        assert n_listed <= 5, (i, n_listed)  # no listing of the trials' checkpoints
    assert s3.read(f"{bucket}/run/sweeps/v2/sweep/experiment_state.json") == b'{"trials": 6}'

    # A rewrite of the same size is uploaded again.
    (sweep_dir / "trial_0" / "params.json").write_text('{"fraction": 0.2}')
    uploads.clear()
    callback.on_trial_complete(6, [], None)
    assert {u.split("/sweep/", 1)[1] for u in uploads} == {"trial_0/params.json"}
    assert s3.read(f"{bucket}/run/sweeps/v2/sweep/trial_0/params.json") == b'{"fraction": 0.2}'
    # So is a file removed from the bucket, even when it comes back here as it was (a hard link
    # keeps its size, mtime and inode).
    params = sweep_dir / "trial_1" / "params.json"
    os.link(params, tmp_path / "kept")
    rd.remove(params)
    os.link(tmp_path / "kept", params)
    uploads.clear()
    callback.on_trial_complete(7, [], None)
    assert {u.split("/sweep/", 1)[1] for u in uploads} == {"trial_1/params.json"}


def test_a_trial_on_another_node_reads_the_kept_scores_where_the_sweep_uploaded_them(s3, tmp_path):
    """``kept.json`` goes to the bucket as the sweep writes it; a trial's rank 0 reads it there
    (:func:`raypath.sweep.beaten`), with no copy in its node's mirror."""
    from types import SimpleNamespace

    from raypath.config import SweepConfig
    from raypath.mirror import KEPT_JSON
    from raypath.sweep import _write_kept, beaten

    bucket = _bucket(s3, "kept")
    here, mirror = run_location(f"s3://{bucket}/run", str(tmp_path / "m"), s3.endpoint)
    rd, sweep_dir = RunDir(here, mirror), here / "sweeps" / "v2" / "sweep"
    sweep_dir.mkdir(parents=True)
    plan = SimpleNamespace(ctx=SimpleNamespace(rd=rd), sweep_dir=str(sweep_dir))
    _write_kept(plan, SweepConfig(keep_trials=1), [("b", {}, 2.0), ("a", {}, 1.0)])
    assert json.loads(s3.read(f"{bucket}/run/sweeps/v2/sweep/{KEPT_JSON}"))["best"] == [[1.0, "a"]]
    (sweep_dir / KEPT_JSON).unlink()  # another node's mirror
    path = str(sweep_dir / KEPT_JSON)
    assert "behind the 1 best finished trials" in beaten(path, rd, "c", 0.0, {"objective": 1.5})
    assert beaten(path, rd, "c", 0.0, {"objective": 0.5}) is None
    rd.remove(sweep_dir / KEPT_JSON)  # what a new run of the sweep does first
    assert beaten(path, rd, "c", 0.0, {"objective": 1.5}) is None


def test_opening_a_run_directory_in_a_bucket_does_not_list_its_checkpoints(s3, tmp_path, monkeypatch):
    bucket = _bucket(s3, "openlist")
    keys = ["lineage.json", "data/manifest.json", "data/v1/files.json", "data/v1/stream/part-0.parquet",
            "curves/main-v1.jsonl", *(f"ray/main-v1/step_{i:08d}/shards/__{r}_0.distcp" for i in range(5)
                                      for r in range(8)), "releases/v1/current.json", "exports/branch-v1/a.json"]
    for key in keys:
        with s3.fs.open_output_stream(f"{bucket}/run/{key}") as f:
            f.write(b"{}")
    listed = []
    filesystem = Mirror.filesystem
    monkeypatch.setattr(Mirror, "filesystem", lambda self: _CountingFS(filesystem(self), listed))
    rd = RunDir.open(f"s3://{bucket}/run", str(tmp_path / "m"), s3.endpoint)
    got = {p.relative_to(rd.path).as_posix() for p in _files(rd.path)}
    assert got == {"lineage.json", "data/manifest.json", "data/v1/files.json", "curves/main-v1.jsonl"}
    assert not [p for p in listed if p.split("/run/", 1)[-1].startswith(tuple(f"{n}/" for n in NOT_MIRRORED))]


def test_commands_that_read_a_run_in_a_bucket_download_its_records_not_its_data(s3, tmp_path, monkeypatch, capsys):
    from raypath.cli import main
    from raypath.lineage import Lineage

    bucket = _bucket(s3, "readers")
    here = tmp_path / "run"
    Lineage.open(here, "readers", {}).save()
    sweep = "sweeps/v2/s"
    files = {"config.yaml": b"name: readers\n", "curves/main-v1.jsonl": b"{}\n", "law/fit-v1.json": b"{}",
             f"{sweep}/standing.json": b"{}", f"{sweep}/curves/branch-v2-a.jsonl": b"{}\n",
             f"{sweep}/results.json": b"{}" * 500,  # fetched where a sweep's trials are read
             # what no command that only reads the run needs
             "corpus/v1/train/part-000.jsonl": b"x" * 5000, "tokenizer/tokenizer.json": b"{}",
             "base_model/model.safetensors": b"w" * 5000, "tb/main-v1/events.out.tfevents.1": b"e" * 500,
             "data/manifest.json": b"{}", "data/v1/files.json": b"{}", "report/lineage.png": b"p" * 500,
             f"{sweep}/sweep.json": b"{}", f"{sweep}/experiment_state-1.json": b"{}" * 500,
             f"{sweep}/trial_a/result.json": b"{}\n" * 500, f"{sweep}/trial_a/params.json": b"{}"}
    for rel, data in files.items():
        (here / rel).parent.mkdir(parents=True, exist_ok=True)
        (here / rel).write_bytes(data)
    Mirror(f"s3://{bucket}/run", str(here), s3.endpoint).push(here)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)

    def pulled(mirror: Path) -> set[str]:
        return {p.relative_to(mirror).as_posix() for p in _files(mirror)}

    records = {"lineage.json", "config.yaml", f"{sweep}/standing.json"}
    assert main(["status", f"s3://{bucket}/run", "--local-dir", str(tmp_path / "status")]) == 0
    assert "run: readers" in capsys.readouterr().out
    assert pulled(tmp_path / "status") == records

    from raypath.mirror import CURVES, RECORDS

    rd = RunDir.open(f"s3://{bucket}/run", str(tmp_path / "records"), reads=RECORDS)
    assert pulled(rd.path) == records
    rd = RunDir.open(f"s3://{bucket}/run", str(tmp_path / "curves"), reads=CURVES)  # the law's, a report's
    assert pulled(rd.path) == records | {"curves/main-v1.jsonl", "law/fit-v1.json", f"{sweep}/curves/branch-v2-a.jsonl"}
    # The driver's start takes what preparing and training read, but no TensorBoard event or report.
    rd = RunDir.open(f"s3://{bucket}/run", str(tmp_path / "driver"))
    assert not {p for p in pulled(rd.path) if p.startswith(("tb/", "report/"))}
    assert {"corpus/v1/train/part-000.jsonl", "tokenizer/tokenizer.json", "data/v1/files.json"} <= pulled(rd.path)
    # of a sweep its records and curves, not Tune's state and trial directories (a resumed sweep pulls its own)
    assert {p for p in pulled(rd.path) if p.startswith(sweep)} == {
        f"{sweep}/sweep.json", f"{sweep}/results.json", f"{sweep}/standing.json", f"{sweep}/curves/branch-v2-a.jsonl"}
    # `raypath run`'s start: no sweep curve (it reads a sweep's records; they grow with the trials)
    from raypath.config import load_config
    from raypath.run import _open_run_dir

    rd = _open_run_dir(load_config(TINY, [f"run_dir=s3://{bucket}/run", f"cluster.local_dir={tmp_path / 'runner'}"]))
    assert {p for p in pulled(rd.path) if p.startswith(sweep)} == {
        f"{sweep}/sweep.json", f"{sweep}/results.json", f"{sweep}/standing.json"}
    assert "curves/main-v1.jsonl" in pulled(rd.path)


def test_a_mirror_of_a_run_deleted_from_the_bucket_is_refused_not_resumed_or_shown(s3, tmp_path, monkeypatch, capsys):
    from raypath.cli import main
    from raypath.config import ConfigError
    from raypath.lineage import Lineage

    bucket = _bucket(s3, "deleted")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    uri, mirror = f"s3://{bucket}/run", tmp_path / "mirror"
    Lineage.open(RunDir.open(uri, str(mirror), create=True), "deleted", {}).save()  # published
    assert f"{bucket}/run/lineage.json" in s3.files(f"{bucket}/run")
    s3.fs.delete_dir(f"{bucket}/run")  # the user starts over: the run is gone from the store
    s3.fs.create_dir(f"{bucket}/run/corpus")  # (what a new run's start might have put there)

    # A driver would find v1.. done in the mirror's record and publish it back, naming checkpoints
    # the bucket lacks; a reader would show them.
    for create in (True, False):
        with pytest.raises(ConfigError, match=f"run_dir: {uri} has no lineage.json, but its mirror {mirror} has one"):
            RunDir.open(uri, str(mirror), create=create)
    assert main(["status", uri, "--local-dir", str(mirror)]) == 2
    assert f"delete {mirror}" in capsys.readouterr().err
    assert (mirror / "lineage.json").is_file() and not s3.files(f"{bucket}/run")  # nothing removed, nothing sent
    # A mirror elsewhere starts afresh.
    assert not (RunDir.open(uri, str(tmp_path / "other"), create=True).path / "lineage.json").exists()


def test_an_unreadable_record_of_a_run_in_a_bucket_is_named_by_its_uri_not_its_mirror(s3, tmp_path, monkeypatch,
                                                                                       capsys):
    """The file to restore is the bucket's: the mirror's copy is overwritten at every start."""
    from raypath.cli import main

    bucket = _bucket(s3, "torn")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s3.fs.create_dir(f"{bucket}/run")
    with s3.fs.open_output_stream(f"{bucket}/run/lineage.json") as f:
        f.write(b'{"format": 1, "name": "torn", "branches": [')  # cut off mid-upload by another tool
    mirror = tmp_path / "mirror"
    assert main(["status", f"s3://{bucket}/run", "--local-dir", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert f"raypath: error: s3://{bucket}/run/lineage.json: not valid JSON" in err and str(mirror) not in err


def test_the_writer_lock_of_a_run_in_a_bucket_is_seen_from_another_machines_mirror(s3, tmp_path, monkeypatch):
    """Two drivers of one bucket run work in two mirrors: the lock they see is the store's."""
    import json

    from raypath import storage
    from raypath.storage import WRITER_LOCK, RunDirBusyError, writer_lock

    bucket = _bucket(s3, "locked")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    uri, key = f"s3://{bucket}/run", f"{bucket}/run/{WRITER_LOCK}"
    rd = RunDir.open(uri, str(tmp_path / "here"), create=True)
    with writer_lock(rd, "run"):
        held = json.loads(s3.read(key))
        assert (held["what"], held["pid"]) == ("run", os.getpid())
        # the other machine's start pulls the run, not the lock; its writer_lock reads the store's
        assert not (RunDir.open(uri, str(tmp_path / "there"), create=True).path / WRITER_LOCK).exists()
    assert key not in s3.files(f"{bucket}/run") and not (rd.path / WRITER_LOCK).exists()  # released

    with s3.fs.open_output_stream(key) as f:  # a driver on another machine, refreshing its lock
        f.write(json.dumps({"host": "elsewhere", "pid": 7, "what": "sweep v2", "argv": "raypath sweep"}).encode())
    with pytest.raises(RunDirBusyError, match=f"run_dir: {uri} is being written by a sweep v2 .*pid 7 on elsewhere"):
        with writer_lock(RunDir.open(uri, str(tmp_path / "here"), create=True), "run"):
            pass
    monkeypatch.setattr(storage, "WRITER_STALE_S", -1.0)  # not refreshed since: that driver died
    with writer_lock(rd, "run"):
        assert json.loads(s3.read(key))["pid"] == os.getpid()


_MACHINE = """
import sys, time
from raypath.lineage import Lineage
from raypath.mirror import RunDir
uri, local, endpoint, me, n, start = sys.argv[1:7]
lin = Lineage.load(RunDir.open(uri, local, endpoint, create=True))  # a driver's start on its own machine
while time.time() < float(start):
    time.sleep(0.005)
for i in range(int(n)):
    lin.record_branch({"name": f"{me}-{i}", "version": "v1", "status": "done"})
"""


def test_drivers_on_several_machines_saving_one_lineage_in_a_bucket_keep_each_others_entries(s3, tmp_path):
    """Each driver of a run in a bucket works in its own mirror: a lock there does not reach the other
    machines, and an upload of one's copy of lineage.json replaced what the others had uploaded. A save
    holds the lineage's lock in the store too and merges into the bucket's latest copy: three drivers
    recording at once keep every entry."""
    import time

    from raypath.lineage import Lineage

    uri = f"s3://{_bucket(s3, 'machines')}/run"
    first = Lineage.open(RunDir.open(uri, str(tmp_path / "m0"), s3.endpoint, create=True), "demo", {})
    first.record_main({"version": "v1", "start_step": 0, "end_step": 10})
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", _MACHINE, uri, str(tmp_path / f"m{k}"), s3.endpoint, f"w{k}",
                               "5", str(start)], cwd=ROOT, stderr=subprocess.PIPE, text=True) for k in (1, 2, 3)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()[-3000:]
    fresh = Lineage.load(RunDir.open(uri, str(tmp_path / "fresh"), s3.endpoint))
    assert {b.name for b in fresh.branches()} == {f"w{k}-{i}" for k in (1, 2, 3) for i in range(5)}
    assert [m.version for m in fresh.main_path()] == ["v1"]
    assert not s3.files("machines/run/.locks"), "a lock object outlived its holder"


def test_a_run_directory_in_a_bucket_that_does_not_exist_is_refused_before_anything_starts(s3, tmp_path, monkeypatch,
                                                                                          capsys):
    from raypath.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    # A run's start built the corpus, then failed at its first upload: "unexpected OSError", exit 1.
    assert main(["run", str(TINY), "--set", "run_dir=s3://nobucket/run", "--set",
                 f"cluster.local_dir={tmp_path / 'mirror'}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"raypath: error: run_dir: s3://nobucket/run: the store at {s3.endpoint} has no bucket "
                           "'nobucket'")
    assert not (tmp_path / "mirror" / "corpus").exists() and s3.fs.get_file_info("nobucket").type.name == "NotFound"
    assert main(["status", "s3://nobucket/run", "--local-dir", str(tmp_path / "status")]) == 2
    assert "has no bucket 'nobucket'" in capsys.readouterr().err
    _bucket(s3, "empty")  # a bucket without the run: nothing there, as before
    assert main(["status", "s3://empty/run", "--local-dir", str(tmp_path / "status")]) == 2
    assert "s3://empty/run: nothing there" in capsys.readouterr().err


def test_a_reader_of_a_run_in_a_bucket_fetches_a_sweeps_trials_where_it_reads_them(s3, tmp_path, monkeypatch):
    """Status decides each version's standing from the sweeps' standing.json; the trials
    (results.json, a loss per version for each) come down only where they are read."""
    from law_lineage import write_run

    from raypath.lineage import Lineage
    from raypath.mirror import RECORDS
    from raypath.releases import format_standing

    bucket = _bucket(s3, "trials")
    here = write_run(tmp_path / "local", 3, trials=4)
    Mirror(f"s3://{bucket}/run", str(here), s3.endpoint).push(here)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    local = Lineage.load(here)

    rd = RunDir.open(f"s3://{bucket}/run", str(tmp_path / "reader"), reads=RECORDS)
    lineage = Lineage.load(rd)
    results = sorted(p.relative_to(rd.path).as_posix() for p in rd.path.rglob("results.json"))
    assert format_standing(lineage) == format_standing(local)
    assert results == [] and len(list(rd.path.rglob("standing.json"))) == 3
    trials = [t.name for t in lineage.sweeps("v2")[0].trials]
    assert trials == [t.name for t in local.sweeps("v2")[0].trials] and len(trials) == 4
    assert sorted(p.relative_to(rd.path).as_posix() for p in rd.path.rglob("results.json")) == \
        [f"sweeps/v2/{lineage.sweeps('v2')[0].name}/results.json"]


def test_the_analysis_of_a_sweep_in_a_bucket_downloads_what_it_reads_not_tunes_state(s3, tmp_path, monkeypatch):
    from raypath.analysis import local_sweep_dir

    bucket = _bucket(s3, "analysed")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    read = ["sweep.json", "results.json", "stopped.json", "trial_a/params.json", "trial_a/result.json",
            "trial_b/error.txt", "curves/branch-v2-a.jsonl"]
    tune = ["experiment_state-2026-01-01_00-00-00.json", "search_gen_state-2026-01-01_00-00-00.json",
            "searcher-state-2026-01-01_00-00-00.pkl", "tuner.pkl", "optuna.journal", "trial_a/progress.csv",
            "trial_a/events.out.tfevents.1", "branches/branch-v2-a/step_00000004/model.pt"]
    for rel in read + tune:
        with s3.fs.open_output_stream(f"{bucket}/run/sweeps/v2/s/{rel}") as f:
            f.write(b"{}")
    local = local_sweep_dir(f"s3://{bucket}/run/sweeps/v2/s", tmp_path / "m")
    assert sorted(p.relative_to(local).as_posix() for p in _files(local)) == sorted(read)


def test_the_embedded_corpus_crosses_to_a_bucket_once_not_at_every_start(s3, tmp_path, monkeypatch):
    from raypath.config import load_config
    from raypath.run import locate

    bucket = _bucket(s3, "corpus-once")
    moved = []  # (direction, path relative to the run directory) of every corpus file transferred
    upload, download = mirror_module._upload, Mirror._download
    monkeypatch.setattr(mirror_module, "_upload", lambda local, fs, dst, progress: (
        moved.append(("up", dst.split("/run/", 1)[1])), upload(local, fs, dst, progress)))
    monkeypatch.setattr(Mirror, "_download", lambda self, src, dst, *info: (
        moved.append(("down", src.split("/run/", 1)[1])), download(self, src, dst, *info)))

    def start(machine: str, *overrides: str) -> list[tuple[str, str]]:
        cfg = load_config(TINY, [f"run_dir=s3://{bucket}/run", f"cluster.local_dir={tmp_path / machine}",
                                 f"cluster.storage_endpoint={s3.endpoint}", *overrides])
        moved.clear()
        where = locate(cfg)
        where.rd.publish(where.rd.path / "corpus")  # what preparation does next
        return sorted((d, p) for d, p in moved if p.startswith("corpus/v"))  # the parts, not the record

    parts = [f"corpus/v{k}/{split}/part-000.jsonl" for k in range(1, 5) for split in ("train", "val")]
    assert start("a") == [("up", p) for p in parts]
    # A second start on the same machine copies none of them; a first one on another downloads them.
    assert start("a") == []
    assert start("b") == [("down", p) for p in parts]
    # A local part that differs from the record at the same size is rebuilt (the bucket has it right).
    part = tmp_path / "b" / parts[0]
    good = part.read_bytes()
    part.write_bytes(good[::-1])
    assert start("b") == [] and part.read_bytes() == good
    # A rebuild (another seed here) goes up whole, same-size parts included.
    assert start("b", "data.seed=1") == [("up", p) for p in parts]
    assert s3.fs.open_input_stream(f"{bucket}/run/{parts[0]}").read() == part.read_bytes() != good


def test_bucketed_files_in_a_bucket_are_opened_once_a_run_and_read_by_range(s3):
    """The object-store path of the shuffle's map files and dedup's hash files (CI's preparations
    run on a local disk): a handle per file for the run, a ranged read per window, rows exact."""
    import numpy as np

    from raypath.bucketed import BucketedFiles, write_rows

    root = _bucket(s3, "bucketed")
    row = np.dtype([("key", "<i8"), ("value", "<u4")])
    files, want = [], []
    for f in range(3):
        rows = np.zeros(40, row)
        rows["key"], rows["value"] = np.arange(40) + 100 * f, np.arange(40) // 5  # bucket b: rows 5b..5b+4
        files.append(f"{root}/part-{f}.buckets")
        write_rows(s3.fs, files[-1], rows, np.bincount(rows["value"], minlength=10))
        want.append(rows)
    got = BucketedFiles(s3.fs, files, 2, 7, 10)
    try:
        assert got.keep and all(h is not None for h in got.handles)
        windows = got.windows(budget=3 * 5 * row.itemsize * 2)  # two buckets of all three files a window
        assert windows == [(2, 3), (4, 5), (6, 7)]
        for lo, hi in windows:
            got.read(lo, hi)
            for b in range(lo, hi + 1):
                assert got.rows(b, b, row).tolist() == [tuple(r) for w in want for r in w[w["value"] == b]]
    finally:
        got.close()


def test_where_a_run_directory_lives(tmp_path):
    from raypath.config import ConfigError, load_config

    assert run_location(str(tmp_path / "run")) == ((tmp_path / "run").resolve(), None)  # local: no mirror
    assert run_location(f"file://{tmp_path}/run") == ((tmp_path / "run").resolve(), None)
    with pytest.raises(ConfigError, match="tiny.yaml: cluster.storage_endpoint: must be an http"):
        load_config(TINY, ["cluster.storage_endpoint=127.0.0.1:9000"])


def _save_checkpoint(directory: Path, step: int) -> None:
    import torch

    ckpt.save(directory, {"w": torch.full((4,), float(step))}, {"state": {}, "param_groups": []},
              {"step": step, "tokens": step * 10, "consumed": [[0, step]]})


def test_a_finished_branch_in_a_bucket_keeps_its_final_checkpoint_only(s3, tmp_path):
    """What a branch's rank 0 does at its end (``loop._Checkpoints.prune(last=True)``) against a
    bucket: the periodic checkpoints go from the store, the final one stays and reads back."""
    bucket = _bucket(s3, "branch")
    mirror = Mirror(f"s3://{bucket}/run", str(tmp_path / "mirror"), s3.endpoint)
    rd = RunDir(Path(mirror.local), mirror)
    storage = rd / "ray" / "branch-v1"
    staging = tmp_path / "staging"
    for step in (2, 4, 6):
        _save_checkpoint(staging / ckpt.step_dir_name(step), step)
    shutil.copytree(staging, storage)
    mirror.push(storage)
    shutil.rmtree(storage)
    doomed = ckpt.prune(storage, 1, set(), rd, why="branch-v1 finished")
    assert [d.name for d in doomed] == [ckpt.step_dir_name(2), ckpt.step_dir_name(4)]
    prefix = f"{bucket}/run/ray/branch-v1/"
    left = {k.removeprefix(prefix).split("/")[0] for k in s3.files(prefix.rstrip("/"))}
    assert left == {ckpt.step_dir_name(6)}
    assert ckpt.load(ckpt.latest_valid(storage, rd))["state"]["step"] == 6


def test_the_controllers_resume_point_downloads_nothing_and_agrees_with_the_workers(s3, tmp_path, caplog):
    """The Train controller's dataset factory reads the data position of the checkpoint the
    workers resume from: of a full checkpoint in a bucket it reads ``state.json`` where it is,
    downloading nothing (the workers download and hash all of it). Corrupted in the bucket, the
    workers find it so and fail the attempt; after it, both take the one before."""
    from types import SimpleNamespace

    from raypath.segment import resume_point

    bucket = _bucket(s3, "resume")
    remote = f"s3://{bucket}/run"
    staging = tmp_path / "staging"
    for step in (2, 4):
        _save_checkpoint(staging / ckpt.step_dir_name(step), step)
    first = Mirror(remote, str(tmp_path / "saver"), s3.endpoint)
    shutil.copytree(staging, Path(first.local) / "ray" / "main-v1")
    first.push(Path(first.local) / "ray" / "main-v1")

    def seg(node: str) -> SimpleNamespace:
        mirror = Mirror(remote, str(tmp_path / node), s3.endpoint)
        rd = RunDir(Path(mirror.local), mirror)
        return SimpleNamespace(name="main-v1", version="v1", storage=str(rd / "ray" / "main-v1"), end_step=8,
                               rd=rd, init_checkpoint=None)

    controller, worker = seg("controller"), seg("worker")
    chosen, state = resume_point(controller, hashed=False)
    assert chosen == str(Path(controller.storage) / ckpt.step_dir_name(4)) and state["consumed"] == [[0, 4]]
    assert _files(controller.rd.path) == []  # not a byte of the checkpoint on the controller's node
    assert resume_point(worker) == (str(Path(worker.storage) / ckpt.step_dir_name(4)), state)
    assert {p.name for p in _files(Path(worker.storage) / ckpt.step_dir_name(4))} >= {"model.pt", "optim.pt"}

    key = f"{bucket}/run/ray/main-v1/{ckpt.step_dir_name(4)}/optim.pt"
    with s3.fs.open_output_stream(key) as f:
        f.write(b"not the optimizer state")
    again = seg("restarted")
    assert resume_point(again, hashed=False)[0].endswith(ckpt.step_dir_name(4))  # its state reads fine
    with pytest.raises(ckpt.CheckpointError, match=f"{remote}/ray/main-v1/{ckpt.step_dir_name(4)}, the newest "
                                                   "complete checkpoint of main-v1, failed this worker's checks"):
        resume_point(again)
    assert "optim.pt does not match its checksum" in caplog.text
    assert resume_point(again, hashed=False)[0] == resume_point(again)[0] == str(
        Path(again.storage) / ckpt.step_dir_name(2))


def test_remote_checkpoints_verified_after_download(s3, tmp_path, caplog):
    bucket = _bucket(s3, "ckpt")
    mirror = Mirror(f"s3://{bucket}/run", str(tmp_path / "mirror"), s3.endpoint)
    rd = RunDir(Path(mirror.local), mirror)
    storage = rd / "ray" / "main-v1"
    staging = tmp_path / "staging"
    for step in (2, 4):  # what Ray Train uploads from the worker's temporary directory
        _save_checkpoint(staging / ckpt.step_dir_name(step), step)
    shutil.copytree(staging, storage)
    mirror.push(storage)
    shutil.rmtree(storage)

    # step 4 is corrupted in the bucket: downloaded, fails its checksum, skipped, local copy dropped.
    s3.fs.delete_file(f"{bucket}/run/ray/main-v1/step_00000004/model.pt")
    with s3.fs.open_output_stream(f"{bucket}/run/ray/main-v1/step_00000004/model.pt") as f:
        f.write(b"not the weights")
    best = ckpt.latest_valid(storage, rd)
    assert best == storage / "step_00000002"
    assert ckpt.load(best)["state"]["step"] == 2  # downloaded, verified, weights_only load
    assert "model.pt does not match its checksum" in caplog.text
    assert not (storage / "step_00000004").exists()
    assert ckpt.load_state(storage / "step_00000004", rd)["step"] == 4  # state read remotely

    # ... and quarantined: without its manifest it is incomplete (prune drops it), named by its URI.
    assert s3.fs.get_file_info(f"{bucket}/run/ray/main-v1/step_00000004/manifest.json").type == pafs.FileType.NotFound
    with pytest.raises(ckpt.CheckpointError, match=f"s3://{bucket}/run/ray/main-v1/step_00000004: no manifest"):
        ckpt.verify(storage / "step_00000004", rd)

    # Ray's snapshot naming a missing checkpoint is dropped remotely; a good one is kept.
    snap_key = f"{bucket}/run/ray/main-v1/{ckpt.RAY_SNAPSHOT}"
    for names, dropped in ((["step_00000002"], False), (["step_00000002", "step_00000006"], True)):
        with s3.fs.open_output_stream(snap_key) as f:
            f.write(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}).encode())
        assert ckpt.drop_stale_ray_snapshot(storage, rd) is dropped
        assert (s3.fs.get_file_info(snap_key).type == pafs.FileType.NotFound) is dropped


def _nodes(mode: str, world: int, s3, remote: str, mirrors: Path, out: Path, **extra) -> list[dict]:
    """Run ``world`` FSDP ranks, each on its own "node" (mirror), in a real gloo group."""
    import sharded_nodes
    import torch.multiprocessing as mp
    from conftest import _free_port

    spec = {"mode": mode, "remote": remote, "endpoint": s3.endpoint, "mirrors": str(mirrors),
            "port": _free_port(), "out": str(out), **extra}
    mp.spawn(sharded_nodes.node, args=(world, spec), nprocs=world)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_fsdp_ranks_on_separate_nodes_export_their_shares_of_the_model_to_the_bucket(s3, tmp_path):
    """A branch's export under FSDP: each rank writes and uploads its share of the weights, rank 0
    the configs, tokenizer, index and card after them; a reader of the bucket loads the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from raypath.tokenizer import train_tokenizer

    bucket = _bucket(s3, "export")
    remote = f"s3://{bucket}/run"
    train_tokenizer(iter(["def f(x):\n    return x\n"] * 50), 300, tmp_path / "tokenizer")
    ranks = _nodes("export", 2, s3, remote, tmp_path / "nodes", tmp_path, tokenizer=str(tmp_path / "tokenizer"))
    weights = [f"model-0000{r}-of-00002.safetensors" for r in (1, 2)]
    stored = {k.rsplit("/", 1)[1] for k in s3.files(f"{bucket}/run/exports/branch-v1")}
    assert {*weights, "model.safetensors.index.json", "config.json", "model_card.json", "tokenizer.json"} <= stored
    # rank 0's node holds the export it staged (its own weights, the metadata); rank 1's node keeps
    # nothing of it, no stage left behind
    assert {"exports/branch-v1/model_card.json", f"exports/branch-v1/{weights[0]}"} <= set(ranks[0]["files"])
    assert not any(f.startswith("exports/") for f in ranks[1]["files"]), ranks[1]["files"]
    reader = Mirror(remote, str(tmp_path / "reader"), s3.endpoint)
    local = Path(reader.local) / "exports" / "branch-v1"
    reader.pull_files(local)
    loaded = AutoModelForCausalLM.from_pretrained(str(local), local_files_only=True)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items()), "exported weights differ from the model's"


def test_each_node_downloads_only_its_ranks_shards_of_a_remote_sharded_checkpoint(s3, tmp_path):
    import pickle

    bucket = _bucket(s3, "shards")
    remote = f"s3://{bucket}/run"
    step = f"ray/main-v1/{ckpt.step_dir_name(5)}"
    _nodes("save", 2, s3, remote, tmp_path / "saved", tmp_path)
    shard_files = {k.rsplit("/", 1)[1] for k in s3.files(f"{bucket}/run/{step}/shards") if k.endswith(".distcp")}
    # A rank's model items and optimizer items in separate files (an export reads the first only).
    assert shard_files == {"__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"}
    small = {"manifest.json", *ckpt.SHARDED_META}

    # The driver (the Train controller's dataset factory) needs the step and data position only.
    ctrl = Mirror(remote, str(tmp_path / "driver"), s3.endpoint)
    rd = RunDir(Path(ctrl.local), ctrl)
    got = ckpt.latest_valid(rd / "ray" / "main-v1", rd)
    assert got == rd / step and ckpt.load_state(got)["step"] == 5
    assert {p.relative_to(got).as_posix() for p in _files(got)} == small

    # Fresh nodes resume at the same world size: each downloads its own rank's shard and no
    # other, and reads the rest (optimizer steps DCP stored once, in one rank's file) by range.
    stored = pickle.loads((got / "shards" / ".metadata").read_bytes()).storage_data
    steps_in = {s.relative_path for i, s in stored.items() if i.fqn.endswith(".step")}
    assert len(steps_in) == 1  # so one of the two ranks must read them from the other's file
    replicated = sum(s.length for i, s in stored.items() if i.fqn.endswith(".step") or ".param_groups." in i.fqn)
    ranks = _nodes("load", 2, s3, remote, tmp_path / "same", tmp_path)
    for r, res in enumerate(ranks):
        assert res["differ"] == [] and res["step"] == 5, res
        own = {f"shards/__{r}_0.distcp", f"shards/__{r}_1.distcp"}
        assert set(res["files"]) == {f"{step}/{f}" for f in small | own}, res["files"]
    assert 0 < sum(res["ranged"] for res in ranks) <= replicated  # steps and hyperparameters, no shard
    total = sum(s3.files(f"{bucket}/run/{step}").values())

    # DDP nodes (full replicas, one rank each) read every tensor: each downloads the whole
    # checkpoint once, and nothing by range (not a byte range per item of the other's file).
    ranks = _nodes("load-ddp", 2, s3, remote, tmp_path / "ddp", tmp_path)
    for res in ranks:
        assert res["differ"] == [] and res["ranged"] == 0, res
        assert set(res["files"]) == {f"{step}/{f}" for f in small | {f"shards/{n}" for n in shard_files}}

    # Three nodes: the third wrote nothing, so it reads its slices of every tensor by range.
    ranks = _nodes("load", 3, s3, remote, tmp_path / "grown", tmp_path)
    assert [res["differ"] for res in ranks] == [[], [], []]
    assert not [f for f in ranks[2]["files"] if f.endswith(".distcp")] and ranks[2]["ranged"] > 0.2 * total

    # A shard corrupted in the bucket (same size): its rank downloads it twice, both ranks
    # fail, and the checkpoint is quarantined in the bucket for the restart that follows.
    key = f"{bucket}/run/{step}/shards/__1_0.distcp"
    data = bytearray(s3.read(key))
    data[len(data) // 2] ^= 0xFF
    with s3.fs.open_output_stream(key) as f:
        f.write(bytes(data))
    ranks = _nodes("load", 2, s3, remote, tmp_path / "corrupt", tmp_path)
    assert all("__1_0.distcp does not match its checksum" in res.get("error", "") for res in ranks), ranks
    assert f"{bucket}/run/{step}/manifest.json" not in s3.files(f"{bucket}/run/{step}")
    assert ckpt.latest_valid(rd / "ray" / "main-v1", rd) is None


def test_a_new_process_downloads_the_records_that_changed_since_the_last_one_on_this_machine(s3, tmp_path,
                                                                                            monkeypatch):
    """Every command's start pulls the run's records and curves (a long run: hundreds of curves,
    a sweep's trials); a new process on a machine that pulled them before downloads those that
    changed in the bucket or here since, not all of them again."""
    monkeypatch.setattr(mirror_module, "SETTLED_S", 0.0)  # the bucket's objects are old enough to trust their stamps
    bucket = _bucket(s3, "remember")
    here, mirror = run_location(f"s3://{bucket}/run", str(tmp_path / "a"), s3.endpoint)
    records = ["config.yaml", "curves/branch-v1.jsonl", "curves/main-v1.jsonl", "lineage.json",
               "sweeps/v2/s/curves/t1.jsonl", "sweeps/v2/s/results.json"]
    for rel in records:
        (here / rel).parent.mkdir(parents=True, exist_ok=True)
        (here / rel).write_text(f'{{"{rel}": 1}}\n')
    mirror.push(here)
    other, downloaded, download = Mirror(mirror.remote, str(tmp_path / "b"), s3.endpoint), [], Mirror._download
    monkeypatch.setattr(Mirror, "_download", lambda self, src, dst, *info: (
        downloaded.append(src.split("/run/", 1)[1]), download(self, src, dst, *info)))

    def new_process() -> list[str]:
        for name, empty in (("_PULLED", {}), ("_COPIED", {}), ("_STATE_READ", set())):
            monkeypatch.setattr(mirror_module, name, empty)
        downloaded.clear()
        other.pull_run()
        return sorted(downloaded)

    assert new_process() == records
    assert new_process() == []
    with s3.fs.open_output_stream(f"{bucket}/run/curves/main-v1.jsonl") as f:  # the run went on elsewhere
        f.write(b'{"curves/main-v1.jsonl": 1}\n{"step": 2}\n')
    (tmp_path / "b" / "sweeps/v2/s/results.json").write_text("{}")  # a mirror's copy edited by hand
    assert new_process() == ["curves/main-v1.jsonl", "sweeps/v2/s/results.json"]
    assert (tmp_path / "b" / "sweeps/v2/s/results.json").read_text() == '{"sweeps/v2/s/results.json": 1}\n'
    assert new_process() == []
    (tmp_path / "b" / ".locks" / mirror_module.STATE).write_text("{damaged")
    assert new_process() == records
    assert not [f for f in s3.files(f"{bucket}/run") if "/.locks/" in f]
    # what the mirror no longer holds is forgotten at the next save (the memory grows with the mirror)
    RunDir(tmp_path / "b", other).remove(tmp_path / "b" / "sweeps")
    with s3.fs.open_output_stream(f"{bucket}/run/config.yaml") as f:
        f.write(b"name: renamed\n")
    assert new_process() == ["config.yaml"]
    state = json.loads((tmp_path / "b" / ".locks" / mirror_module.STATE).read_text())
    assert sorted(state) == [r for r in records if not r.startswith("sweeps/")]

    # What the bucket lost (deleted from another machine) leaves this mirror at its next pull,
    # but a copy changed here since and the lineage's record (refused by the stale-mirror check).
    mirror.push(here / "sweeps")  # the sweep back in the bucket, and in this mirror
    assert new_process() == ["sweeps/v2/s/curves/t1.jsonl", "sweeps/v2/s/results.json"]
    (tmp_path / "b" / "curves" / "branch-v1.jsonl").write_text("edited here\n")
    RunDir(here, mirror).remove(here / "sweeps")
    RunDir(here, mirror).remove(here / "curves")
    assert new_process() == []
    assert sorted(p.relative_to(tmp_path / "b").as_posix() for p in _files(tmp_path / "b")) == [
        "config.yaml", "curves/branch-v1.jsonl", "lineage.json"]
    assert not (tmp_path / "b" / "sweeps").exists()


def test_weights_to_from_and_inside_a_bucket_log_their_progress_and_land_whole(s3, tmp_path, monkeypatch, caplog):
    """A model's weights go up (a base model, a branch's export), are copied inside the store (a
    release) and come down (a checkpoint or release a node loads) several files at a time, each in
    pieces a progress line counts: a 16 GB model takes minutes, and before, nothing showed until
    it was done."""
    import logging
    import re

    from raypath import console

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(mirror_module, "CHUNK", 1 << 16)
    caplog.set_level(logging.INFO, logger="raypath")
    bucket = _bucket(s3, "progress")
    here, mirror = run_location(f"s3://{bucket}/run", str(tmp_path / "m"), s3.endpoint)
    rd, model = RunDir(here, mirror), here / "exports" / "branch-v2"
    model.mkdir(parents=True)
    for i in range(3):
        (model / f"model-{i + 1}-of-3.safetensors").write_bytes(os.urandom(300_000))
    (model / "model_card.json").write_text("{}")
    rd.publish(model)
    assert rd.copy_in_store(model, here / "releases" / "v2" / "r1")
    other = Mirror(mirror.remote, str(tmp_path / "other"), s3.endpoint)  # a node that loads the release
    got = other.pull(Path(other.local, "releases", "v2", "r1"))
    assert {f.name: f.read_bytes() for f in got.iterdir()} == {f.name: f.read_bytes() for f in model.iterdir()}
    lines = "\n".join(r.getMessage() for r in caplog.records)
    uri = f"s3://{bucket}/run"
    for what in (f"uploading {uri}/exports/branch-v2", f"copying {uri}/exports/branch-v2 to {uri}/releases/v2/r1",
                 f"downloading {uri}/releases/v2/r1"):
        assert re.search(f"^{re.escape(what)}: [\\d.]+ kB of 900 kB \\(\\d+%\\), ", lines, re.M), (what, lines)
    for where in ("exports/branch-v2", "releases/v2/r1"):
        for f in model.iterdir():
            assert s3.fs.open_input_stream(f"{bucket}/run/{where}/{f.name}").read() == f.read_bytes(), (where, f)


def test_a_release_id_reused_after_a_crash_replaces_the_remote_copy_whole(s3, tmp_path, monkeypatch):
    from raypath import releases
    from raypath.lineage import Lineage
    from raypath.storage import write_json

    bucket = _bucket(s3, "orphan")
    mirror = Mirror(f"s3://{bucket}/run", str(tmp_path / "mirror"), s3.endpoint)
    rd = RunDir(Path(mirror.local), mirror)
    lin = Lineage.open(rd, "t", {"sweep": {"weights": {"old": 0.5, "new": 0.5}, "compute_penalty": 0.0}})
    lin.data["versions"] = [{"name": "v1"}, {"name": "v2"}]
    lin.data["main_path"] = [{"version": "v2", "tokens_start": 0, "tokens_end": 1000}]

    def branch(name: str, v2: float) -> None:
        export = rd / "exports" / name
        export.mkdir(parents=True)
        (export / "model.safetensors").write_bytes(os.urandom(256))  # same size, other weights
        write_json(export / "model_card.json", {"branch": name, "version": "v2"})
        rd.publish(export)
        lin.record_branch({"name": name, "version": "v2", "status": "done", "tokens_trained": 200,
                           "tokens_total": 1000, "export": str(export),
                           "metrics": {"val/v1": 3.9, "val/v2": v2, "loss": 3.0}})

    objective = releases.version_objective(lin.data, "v2")
    branch("a", 3.0)
    monkeypatch.setattr(releases.Releaser, "_switch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after r1 was published, before the switch
        releases.Releaser(lin).decide("v2", objective)
    monkeypatch.undo()
    assert lin.release_history("v2") is None  # r1 never recorded
    branch("b", 2.9)
    weights = (rd / "exports" / "b" / "model.safetensors").read_bytes()
    shutil.rmtree(rd / "exports")  # the driver of a later run: exports are in the bucket only
    assert releases.Releaser(lin).decide("v2", objective).release.name == "b"
    key = f"{bucket}/run/releases/v2/r1/model.safetensors"
    assert lin.release("v2").id == "r1"
    assert s3.read(key) == weights  # not a's weights
    card = json.loads(s3.read(f"{bucket}/run/releases/v2/r1/model_card.json"))
    assert card["branch"] == "b" and card["release"]["id"] == "r1"
    # Copied inside the bucket: the weights never came down to this machine.
    assert not list(rd.path.rglob("model.safetensors"))
    # A reader that needs the release pulls it, the weights too, into the mirror's partial copy.
    assert (rd.fetch(rd / "releases" / "v2" / "r1") / "model.safetensors").read_bytes() == weights


# ---------------------------------------------------------------- a whole lineage on S3

def _raypath(s3: S3, argv: list[str], log: Path) -> str:
    """``raypath ARGV`` as its own process with its own local Ray cluster, whose workers get the
    bucket's credentials from the environment as on a real cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never someone else's cluster
    env.update(AWS_ENV, RAY_AUTH_MODE="disabled", AWS_ENDPOINT_URL=s3.endpoint)
    res = subprocess.run([str(RAYPATH), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    log.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"raypath {argv[0]} failed ({res.returncode}), log {log}:\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _raypath_run(s3: S3, run_dir: str, mirror_dir: Path, log: Path) -> str:
    return _raypath(s3, ["run", str(TINY), "--set", f"run_dir={run_dir}", "--set", f"cluster.local_dir={mirror_dir}",
                         "--set", f"cluster.storage_endpoint={s3.endpoint}", "--set", "data.versions=[v1, v2]",
                         "--set", "data.max_docs_per_version=3", "--set", "train.eval_every=0",
                         "--set", "data.dedup=exact"], log)


def _curves(s3: S3, prefix: str) -> dict[str, bytes]:
    return {Path(k).name: s3.read(k) for k in s3.files(f"{prefix}/curves")}


def _starts(curve: bytes) -> list[dict]:
    return [r for r in map(json.loads, curve.decode().splitlines()) if r.get("event") == "start"]


def _key(prefix: str, recorded: str) -> str:
    """Bucket key of a path the lineage recorded (``./`` + relative to the run directory)."""
    assert recorded.startswith("./"), recorded
    return f"{prefix}/{recorded[2:]}"


@pytest.mark.slow
def test_lineage_on_s3_resumes_from_the_bucket(s3, tmp_path):
    bucket = _bucket(s3, "lineage")
    prefix, run_dir, mirror_dir = f"{bucket}/run", f"s3://{bucket}/run", tmp_path / "mirror"

    _raypath_run(s3, run_dir, mirror_dir, tmp_path / "first.log")
    lin = json.loads(s3.read(f"{prefix}/lineage.json"))
    assert [m["version"] for m in lin["main_path"]] == ["v1", "v2"]
    assert [r["version"] for r in lin["releases"]] == ["v1", "v2"]
    assert lin["storage"] == {"run_dir": run_dir}
    files = s3.files(prefix)
    for main in lin["main_path"]:
        for which in ("fork", "end"):
            step = _key(prefix, main["checkpoints"][which])
            assert {f"{step}/{n}" for n in (*ckpt.FILES, ckpt.MANIFEST)} <= set(files)
    for release in lin["releases"]:
        rel = _key(prefix, release["path"])
        assert {f"{rel}/{n}" for n in ("model_card.json", "config.json", "model.safetensors")} <= set(files)
        pointer = json.loads(s3.read(f"{prefix}/releases/{release['version']}/current.json"))
        assert pointer["release"] == release["release"] == Path(release["path"]).name  # the live release
    for key in ("config.yaml", "data/manifest.json", "data/v1/files.json", "data/v2/files.json",
                "tokenizer/tokenizer.json", "report/releases.md", "curves/main-v2.jsonl", "curves/branch-v2.jsonl"):
        assert f"{prefix}/{key}" in files
    assert any(k.startswith(f"{prefix}/data/v2/stream/") and k.endswith(".parquet") for k in files)  # sharded stream
    # deduplicated in the bucket: each version's index written there, its hashes gone
    assert all(any(k.startswith(f"{prefix}/data/{v}/dedup/index/part-") for k in files) for v in ("v1", "v2"))
    assert not any("/dedup/hashes/" in k for k in files)
    manifest = json.loads(s3.read(f"{prefix}/data/manifest.json"))
    assert manifest["dedup"] == "exact" and all(v["dedup"]["docs"] >= 2 for v in manifest["versions"])
    curves = _curves(s3, prefix)

    # A fresh machine: no mirror. The same command finds everything done and trains nothing.
    shutil.rmtree(mirror_dir)
    _raypath_run(s3, run_dir, mirror_dir, tmp_path / "again.log")
    again = json.loads(s3.read(f"{prefix}/lineage.json"))
    for key in ("main_path", "branches", "releases"):
        assert again[key] == lin[key]  # finish times included: nothing was re-recorded
    assert _curves(s3, prefix) == curves  # no segment even started
    assert not (mirror_dir / "ray").exists()  # no checkpoint was needed, none was downloaded

    # The driver died in version 2's main segment after its fork-point checkpoint:
    # the lineage does not have it yet, and the boundary checkpoint was never uploaded.
    main2 = lin["main_path"][1]
    again["main_path"] = again["main_path"][:1]
    with s3.fs.open_output_stream(f"{prefix}/lineage.json") as f:
        f.write(json.dumps(again).encode())
    s3.fs.delete_dir(_key(prefix, main2["checkpoints"]["end"]))
    shutil.rmtree(mirror_dir)
    out = _raypath_run(s3, run_dir, mirror_dir, tmp_path / "resume.log")
    assert "dropping Ray's checkpoint snapshot" in out  # it named the deleted checkpoint

    final = json.loads(s3.read(f"{prefix}/lineage.json"))
    redone = final["main_path"][1]
    for key in ("start_step", "fork_step", "end_step", "tokens_start", "tokens_end", "checkpoints"):
        assert redone[key] == main2[key]
    rd = RunDir(mirror_dir.resolve(), Mirror(run_dir, str(mirror_dir.resolve()), s3.endpoint))
    end = ckpt.load_state(rd / main2["checkpoints"]["end"], rd)  # read in the bucket
    G, L = 8, 32  # configs/tiny.yaml: global batch, seq_len
    steps = main2["end_step"] - main2["start_step"]
    assert end["step"] == main2["end_step"] and end["tokens"] == main2["tokens_end"]
    assert end["tokens"] - main2["tokens_start"] == steps * G * L
    assert Consumed.from_list(end["consumed"]).intervals == [[0, steps * G]]  # every row once

    now = _curves(s3, prefix)
    assert {k: v for k, v in now.items() if k != "main-v2.jsonl"} == \
        {k: v for k, v in curves.items() if k != "main-v2.jsonl"}  # only main-v2 trained again
    assert now["main-v2.jsonl"].startswith(curves["main-v2.jsonl"])  # continued, not restarted
    restart = _starts(now["main-v2.jsonl"])[-1]
    assert len(_starts(now["main-v2.jsonl"])) == len(_starts(curves["main-v2.jsonl"])) + 1
    assert restart["step"] == main2["fork_step"]  # the newest checkpoint left in S3
    assert restart["checkpoint"].endswith(ckpt.step_dir_name(restart["step"]))
    assert main2["start_step"] < restart["step"] < main2["end_step"]


# ---------------------------------------------------------------- commands on a run directory in a bucket

def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    from raypath.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0, argv
    return buf.getvalue()


def test_status_cost_and_law_read_a_run_directory_in_a_bucket(s3, tiny_run, tmp_path, monkeypatch):
    """A finished run uploaded to a bucket, read by commands on a machine that never saw it."""
    cfg, lin = tiny_run
    name = _bucket(s3, "commands")
    run_dir = f"s3://{name}/run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    Mirror(run_dir, str(Path(cfg.run_dir).resolve()), s3.endpoint).push(Path(cfg.run_dir))
    local = ["--local-dir", str(tmp_path / "mirror")]

    assert "v3: r1 branch-v3 (configured)" in _cli(["status", run_dir, *local])
    assert "path switching / PTFS" in _cli(["cost", run_dir, *local])
    fit = _cli(["law", "fit", run_dir, *local, "--lambda", "0.99"])
    assert f"fit: {run_dir}/law/fit-v3.json" in fit
    assert f"{name}/run/law/fit-v3.json" in s3.files(f"{name}/run")  # the fit is published to the bucket
    pulled = {p.relative_to(tmp_path / "mirror").parts[0] for p in _files(tmp_path / "mirror")}
    assert not pulled & set(NOT_MIRRORED)  # no checkpoint, export or release was downloaded

    # release: the pin is published to the bucket; of the releases only the pointer is downloaded
    assert "live release of v3: r1" in _cli(["release", run_dir, *local, "--version", "v3", "--pick", "r1"])
    assert json.loads(s3.read(f"{name}/run/releases/v3/current.json"))["pinned"] is True
    assert json.loads(s3.read(f"{name}/run/lineage.json"))["release_history"]["v3"]["pinned"] is True
    pulled = {p.relative_to(tmp_path / "mirror").as_posix() for p in _files(tmp_path / "mirror")}
    assert {p for p in pulled if p.split("/")[0] in NOT_MIRRORED} == {"releases/v3/current.json"}
    # export: only the exported release comes down, into the mirror; the model lands in --out
    out = tmp_path / "export-v3"
    assert "v3/r1" in _cli(["export", run_dir, "v3", *local, "--out", str(out)])
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    pulled = {p.relative_to(tmp_path / "mirror").as_posix() for p in _files(tmp_path / "mirror")}
    assert any(p.startswith("releases/v3/r1/") for p in pulled)
    assert not any(p.startswith(("ray/", "exports/", "releases/v1", "releases/v2")) for p in pulled)
    # a run directory that is not there is named, not a traceback
    from raypath.cli import main

    assert main(["status", f"s3://{name}/nothing", "--local-dir", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_compare_on_a_run_directory_in_a_bucket(s3, tiny_run, tmp_path, monkeypatch):
    """`raypath compare` on a run uploaded to a bucket: baselines and a replay lineage train with
    their checkpoints in the bucket, and the table lands there too."""
    from conftest import copy_first_versions

    cfg, _ = tiny_run
    name = _bucket(s3, "compare")
    run_dir, mirror_dir = f"s3://{name}/run", tmp_path / "mirror"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    two = copy_first_versions(Path(cfg.run_dir), tmp_path / "two", 2)  # compared on v1, v2
    Mirror(run_dir, str(two.resolve()), s3.endpoint).push(two)
    out = _raypath(s3, ["compare", str(TINY), "--set", f"run_dir={run_dir}", "--set", f"cluster.local_dir={mirror_dir}",
                        "--set", "data.versions=[v1, v2]", "--set", "compare.replay_ratios=[0.25]"],
                   tmp_path / "compare.log")
    assert "PS replay 0.25" in out and "PTFS" in out and "CPT" in out
    files = s3.files(f"{name}/run")
    for key in ("compare/comparison.csv", "compare/comparison.txt", "compare/comparison.png",
                "compare/replay-0.25/lineage.json", "curves/ptfs-v2.jsonl", "curves/cpt-v2.jsonl"):
        assert f"{name}/run/{key}" in files, key
    assert any(k.startswith(f"{name}/run/ray/ptfs-v2/step_") for k in files)  # checkpoints written to the bucket
    assert any(k.startswith(f"{name}/run/compare/replay-0.25/ray/main-v2/step_") for k in files)
    lin = json.loads(s3.read(f"{name}/run/lineage.json"))
    assert lin["compare"]["replay"] == {"0.25": "./compare/replay-0.25"}
    assert {e["version"] for e in lin["compare"]["ptfs"]} == {"v1", "v2"}


_MAIN_PATH_ELSEWHERE = """
import sys, time
from pathlib import Path
from raypath.lineage import Lineage
from raypath.mirror import RunDir
from raypath.storage import writer_lock
uri, local, endpoint, stop = sys.argv[1:5]
rd = RunDir.open(uri, local, endpoint, create=True)
with writer_lock(rd, "run"):
    lin, i = Lineage.load(rd), 0
    print("held", flush=True)
    while not Path(stop).exists():  # the main path's saves, from its own machine
        lin.set_fact(f"run-{i}", {"i": i})
        i += 1
        time.sleep(0.5)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sweep_on_a_run_directory_in_a_bucket_resumes_on_a_fresh_machine(s3, sweep_lineage, tmp_path):
    """`raypath sweep` of a run in a bucket: trials checkpoint to the bucket, the sweep's state,
    journal, records and release land there; on a machine without the mirror the same command
    finds the sweep finished and trains nothing. It runs beside the main path's driver on another
    machine, which holds the run's writer lock and saves the lineage meanwhile: both keep their
    records."""
    from conftest import FAST_TRIALS

    from raypath.config import load_config

    local = Path(load_config(sweep_lineage).run_dir)
    name = _bucket(s3, "sweep")
    run_dir, mirror_dir = f"s3://{name}/run", tmp_path / "mirror"
    Mirror(run_dir, str(local.resolve()), s3.endpoint).push(local)
    earlier = [s["name"] for s in json.loads((local / "lineage.json").read_text()).get("sweeps", [])]  # other tests'
    argv = ["sweep", str(sweep_lineage), "--version", "v2", "--set", f"run_dir={run_dir}",
            "--set", f"cluster.local_dir={mirror_dir}", "--set", "sweep.num_samples=2",
            "--set", "sweep.max_concurrent=1", "--set", "sweep.guide=none", "--set", "sweep.name=remote",
            "--set", "sweep.replay_ratios=[0.5]",  # every trial re-mixes its stream (the run's: 0)
            *[a for s in FAST_TRIALS for a in ("--set", s)]]
    stop = tmp_path / "stop"
    main_path = subprocess.Popen([sys.executable, "-c", _MAIN_PATH_ELSEWHERE, run_dir, str(tmp_path / "there"),
                                  s3.endpoint, str(stop)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert main_path.stdout.readline().strip() == "held"
        first = _raypath(s3, argv, tmp_path / "first.log")
        stop.touch()
        saves = int(main_path.stdout.readline())
    finally:
        stop.touch()
        main_path.wait(timeout=60)
    assert f"sweep: {run_dir}/sweeps/v2/remote\n" in first  # what raypath.analysis takes, not the mirror
    prefix = f"{name}/run/sweeps/v2/remote"
    files = s3.files(prefix)
    for key in ("sweep.json", "results.json", "optuna.journal"):
        assert f"{prefix}/{key}" in files, key
    results = json.loads(s3.read(f"{prefix}/results.json"))
    assert results["complete"] and len(results["trials"]) == 2
    for t in results["trials"]:
        assert f"{prefix}/curves/{t['name']}.jsonl" in files
        assert any(k.startswith(f"{prefix}/branches/{t['name']}/step_") for k in files)  # checkpoints in the bucket
    mixes = [k for k in s3.files(f"{name}/run/data/v2/branch-streams") if "-replay0.5000/" in k]
    assert mixes, "the trials' re-mixed stream is not in the bucket"
    lin = json.loads(s3.read(f"{name}/run/lineage.json"))
    assert [s["name"] for s in lin["sweeps"]] == [*earlier, "remote"] and lin["releases"][-1]["version"] == "v2"
    assert saves > 3 and all(lin[f"run-{i}"] == {"i": i} for i in range(saves))
    curves = {k: s3.read(k) for k in files if "/curves/" in k}

    shutil.rmtree(mirror_dir)  # a fresh machine
    out = _raypath(s3, argv, tmp_path / "again.log")
    assert "resuming sweep" in out
    assert {k: s3.read(k) for k in s3.files(prefix) if "/curves/" in k} == curves  # no trial trained again
    again = json.loads(s3.read(f"{prefix}/results.json"))["trials"]
    assert [(t["trial_id"], t["score"]) for t in again] == [(t["trial_id"], t["score"]) for t in results["trials"]]


def test_rank_0_uploads_its_curve_at_evaluations_checkpoints_and_the_end_not_every_log_step(s3, tmp_path,
                                                                                           monkeypatch):
    """An object store cannot append: each upload copies the whole curve. Rank 0 uploads it at
    most every CURVE_PUBLISH_S, and at once for an evaluation, an event, a checkpoint, the end."""
    from raypath import loop
    from raypath.config import ModelConfig, TrainConfig
    from raypath.schedules import MainPath
    from raypath.segment import Segment

    mirror = Mirror(f"s3://{_bucket(s3, 'curves')}/run", str(tmp_path / "mirror"), s3.endpoint)
    rd = RunDir(Path(mirror.local), mirror)
    seg = Segment(name="main-v1", kind="main", version="v1", stream_path="", start_step=0, end_step=100,
                  schedule=MainPath(1e-3, 0), model=ModelConfig(), train=TrainConfig(), vocab_size=64,
                  eos_id=0, pad_id=None, seq_len=16, storage="", curves_path=str(rd / "curves" / "main-v1.jsonl"),
                  rd=rd)
    reporter = loop._Reporter(seg, 0, 1, 0)

    def remote_lines() -> int:
        raw = mirror.read_bytes(seg.curves_path)
        return 0 if raw is None else raw.count(b"\n")

    def log_step(step: int, **extra: float) -> None:
        reporter.step(3.0, 16, 0.0)
        reporter.flush(step, 1e-3, 16 * step, extra)

    reporter.event("start", step=0)
    assert remote_lines() == 1
    for step in range(1, 6):
        log_step(step)
    assert remote_lines() == 1  # five log steps inside the interval: local only
    log_step(6, **{"val/v1": 2.5})
    assert remote_lines() == 7  # an evaluation goes up at once
    monkeypatch.setattr(loop, "CURVE_PUBLISH_S", 0.0)
    log_step(7)
    assert remote_lines() == 8  # the interval passed
    monkeypatch.setattr(loop, "CURVE_PUBLISH_S", 3600.0)
    log_step(8)
    reporter.publish()  # what a checkpoint and the segment's end do
    assert remote_lines() == 9 and mirror.read_bytes(seg.curves_path) == Path(seg.curves_path).read_bytes()


def test_tensorboard_reaches_the_bucket_with_the_curve_and_releases_name_the_bucket(s3, tmp_path):
    """A bucket run's event files went up only when a segment ended: a driver lost mid-segment
    lost every point before its resume step, and the bucket showed nothing until the end."""
    pytest.importorskip("tensorboard")
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raypath import loop, tracking
    from raypath.config import ModelConfig, TrainConfig
    from raypath.schedules import MainPath
    from raypath.segment import Segment

    uri = f"s3://{_bucket(s3, 'tensorboard')}/run"
    mirror = Mirror(uri, str(tmp_path / "mirror"), s3.endpoint)
    rd = RunDir(Path(mirror.local), mirror)
    spec = tracking.TrackingSpec("tensorboard", str(rd.path), {})
    seg = Segment(name="main-v1", kind="main", version="v1", stream_path="", start_step=0, end_step=100,
                  schedule=MainPath(1e-3, 0), model=ModelConfig(), train=TrainConfig(), vocab_size=64,
                  eos_id=0, pad_id=None, seq_len=16, storage="", curves_path=str(rd / "curves" / "main-v1.jsonl"),
                  rd=rd, tracking=spec)
    reporter = loop._Reporter(seg, 0, 1, 0)
    for step in (1, 2):
        reporter.step(3.0 - step, 16, 0.0)
        reporter.flush(step, 1e-3, 16 * step, {"val/v1": 2.5} if step == 2 else {})  # an evaluation publishes
    fresh = RunDir.open(uri, str(tmp_path / "fresh"), s3.endpoint)  # the driver's machine is gone
    assert not (fresh.path / "tb").exists()  # a start pulls no event files: nothing of raypath reads them
    acc = EventAccumulator(str(fresh.fetch(fresh.path / "tb" / "main-v1")))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == {1: 2.0, 2: 1.0}
    release = types.SimpleNamespace(version="v1", path=str(rd / "releases" / "v1" / "r1"), branch="main-v1", val={})
    tracking.record_release(spec, release, rd)
    again = RunDir.open(uri, str(tmp_path / "again"), s3.endpoint)
    acc = EventAccumulator(str(again.fetch(again.path / "tb" / "main-v1")), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("release/v1/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"{uri}/releases/v1/r1" in text


def test_mlflows_default_sqlite_file_is_refused_for_a_run_directory_in_a_bucket(tmp_path, monkeypatch):
    from raypath import tracking
    from raypath.config import config_from_dict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict({"run_dir": "s3://bucket/run", "tracking": {"backend": "mlflow"}})
    with pytest.raises(tracking.TrackingError, match=r"tracking.mlflow_uri: a run directory in a bucket .*server"):
        tracking.mlflow_uri(cfg, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.mlflow_uri(cfg, tmp_path) == "http://mlflow.internal:5000"


def test_the_analysis_reads_a_sweep_of_a_run_in_a_bucket_by_its_uri(s3, tiny_sweep, tmp_path, monkeypatch):
    """A notebook on a machine that never saw the run: the sweep's URI gives the same frames as
    the run's own copy; its records come down into the run's default mirror, not its checkpoints."""
    import pandas as pd

    from raypath import analysis, report
    from raypath.lineage import Lineage

    run = Path(tiny_sweep["dir"]).parents[2]
    name = _bucket(s3, "analysis")
    run_dir = f"s3://{name}/run"
    Mirror(run_dir, str(run.resolve()), s3.endpoint).push(run)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default mirror lives under ~/.cache/raypath
    uri = f"{run_dir}/sweeps/v2/{tiny_sweep['sweep'].name}"

    trials, curves = analysis.load_sweep(uri)
    here_trials, here_curves = analysis.load_sweep(tiny_sweep["dir"])
    pd.testing.assert_frame_equal(trials, here_trials)
    pd.testing.assert_frame_equal(curves, here_curves)
    live = Lineage.load(run).release("v2")  # what the released flag reads: the run's lineage.json
    assert trials.loc[trials["released"], "trial_id"].tolist() == [t for t in [live and live.trial_id] if t]
    assert analysis.main_objective(uri) == analysis.main_objective(tiny_sweep["dir"])
    mirror = tmp_path / "home" / ".cache" / "raypath" / "s3" / name / "run"
    assert analysis.local_sweep_dir(uri) == mirror / "sweeps" / "v2" / tiny_sweep["sweep"].name
    pulled = {p.relative_to(mirror).parts[:4] for p in _files(mirror)}
    assert not [p for p in pulled if p[0] in ("ray", "data", "releases") or p[3:] in (("branches",), ("exports",))]
    with pytest.raises(FileNotFoundError, match=f"{run_dir}/sweeps/v2/nothing: no sweep.json"):
        analysis.load_sweep(f"{run_dir}/sweeps/v2/nothing")

    # the lineage and its tables, from the run directory's URI
    remote = Lineage.load(run_dir)
    assert remote.run_dir == mirror and remote.release("v2").path == live.path.replace(str(run), str(mirror), 1)
    assert (remote.release("v2").id, remote.release("v2").trial_id) == (live.id, live.trial_id)
    pd.testing.assert_frame_equal(report.releases_table(run_dir), report.releases_table(run))


def test_a_notebook_rereading_a_sweep_in_a_bucket_downloads_what_changed_and_the_curves_it_reads(
        s3, tiny_sweep, tmp_path, monkeypatch):
    """A notebook calls the analysis over and over on a live sweep: each call lists the sweep but
    downloads only the records that changed since, and only the curves it reads."""
    import pandas as pd

    from raypath import analysis, mirror

    run = Path(tiny_sweep["dir"]).parents[2]
    name = _bucket(s3, "reread")
    Mirror(f"s3://{name}/run", str(run.resolve()), s3.endpoint).push(run)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mirror, "SETTLED_S", 0.0)  # the bucket's objects are old enough to trust their stamps
    downloaded, download = [], Mirror._download
    monkeypatch.setattr(Mirror, "_download", lambda self, src, dst, *info: (
        downloaded.append(src.split("/run/", 1)[1]), download(self, src, dst, *info)))
    sweep = f"sweeps/v2/{tiny_sweep['sweep'].name}"
    uri = f"s3://{name}/run/{sweep}"

    def curves_read() -> set[str]:
        return {p.rsplit("-", 1)[1].removesuffix(".jsonl") for p in downloaded if p.startswith(f"{sweep}/curves/")}

    here, _ = analysis.load_sweep(tiny_sweep["dir"], curves=False)
    trials, none = analysis.load_sweep(uri, curves=False)
    pd.testing.assert_frame_equal(trials, here)
    unfinished = curves_read()  # read for how far each got
    assert none.empty and unfinished == set(trials.loc[trials["status"] != "done", "trial_id"])
    assert {f"{sweep}/trial_{t}/result.json" for t in trials["trial_id"]} <= set(downloaded)

    some = trials["trial_id"].iloc[0]
    downloaded.clear()
    assert set(analysis.load_sweep(uri, curves=[some])[1]["trial_id"]) == {some}
    assert set(downloaded) <= {f"{sweep}/curves/{p}" for p in os.listdir(tiny_sweep["dir"] / "curves")}
    downloaded.clear()
    trials, curves = analysis.load_sweep(uri)
    pd.testing.assert_frame_equal(curves, analysis.load_sweep(tiny_sweep["dir"])[1])
    assert curves_read() == set(trials["trial_id"]) - unfinished - {some}
    assert all(p.startswith(f"{sweep}/curves/") for p in downloaded)
    downloaded.clear()
    analysis.load_sweep(uri)
    analysis.main_objective(uri)
    assert downloaded == []

    # a trial's result rewritten in the bucket is downloaded again, and only it
    result = f"{name}/run/{sweep}/trial_{some}/result.json"
    last = json.loads(s3.read(result).splitlines()[-1])
    with s3.fs.open_output_stream(result) as f:
        f.write(s3.read(result) + (json.dumps({**last, "loss": 9.5}) + "\n").encode())
    assert analysis.load_sweep(uri, curves=False)[0].set_index("trial_id").loc[some, "loss"] == 9.5
    assert downloaded == [f"{sweep}/trial_{some}/result.json"]
