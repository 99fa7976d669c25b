"""Experiment tracking against the real parts: TensorBoard event files read back with
TensorBoard's own reader, and a real MLflow server (sqlite backend) on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_config

from raypath.storage import read_json

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

CURVE_METRICS = ("loss", "lr", "tokens_per_s", "data_wait_share")


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _curve(path: str) -> list[dict]:
    """The curve's records, the last one per step: a segment restarted by Ray Train (a worker
    lost) re-logs the steps after its checkpoint, and TensorBoard keeps the later event too."""
    records = [r for r in map(json.loads, Path(path).read_text().splitlines()) if "event" not in r]
    return list({r["step"]: r for r in records}.values())


def test_tensorboard_event_files_hold_every_logged_metric(tiny_run):
    """The default backend: one event directory per segment, the curve's numbers at its steps."""
    cfg, lineage = tiny_run
    tb = Path(cfg.run_dir) / "tb"
    segments = [m["segment"] for m in lineage["main_path"]] + [b["name"] for b in lineage["branches"]]
    assert set(segments) <= {p.name for p in tb.iterdir()}
    for entry in lineage["main_path"] + lineage["branches"]:
        name = entry.get("segment") or entry["name"]
        scalars = _scalars(tb / name)
        for record in _curve(entry["curve"]):
            for key, value in record.items():
                if key in CURVE_METRICS or key.startswith("val/"):
                    assert scalars[key][record["step"]] == pytest.approx(value, rel=1e-6), (name, key)
        assert f"val/{entry['version']}" in scalars, name


def test_tensorboard_release_text_names_the_release(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, lineage = tiny_run
    for release in lineage["releases"]:
        acc = EventAccumulator(str(Path(cfg.run_dir) / "tb" / release["branch"]), size_guidance={"tensors": 0})
        acc.Reload()
        tag = f"release/{release['version']}/text_summary"
        assert tag in acc.Tags()["tensors"]
        text = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        assert release["path"] in text


def test_sweep_trials_log_to_tensorboard(tiny_sweep):
    run_dir = Path(tiny_sweep["cfg"].run_dir)
    for trial in tiny_sweep["record"]["trials"]:
        if trial.get("status") == "error":
            continue
        scalars = _scalars(run_dir / "tb" / trial["name"])
        assert "objective" in scalars and "loss" in scalars, trial["name"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback: sqlite backend, proxied artifact store."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    # No background job runner: the tests only log and read runs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # ~15 s on an idle 2-CPU machine
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: its workers shut down slowly
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def mlflow_lineage(ray_cluster, mlflow_server, tmp_path_factory):
    """A 1-version tiny lineage tracked in MLflow, then the same command again (resumed, nothing new)."""
    from raypath.run import run

    cfg = tiny_config(tmp_path_factory.mktemp("mlflow-run") / "run", "data.versions=[v1]",
                      "tracking.backend=mlflow", f"tracking.mlflow_uri={mlflow_server}",
                      "tracking.experiment=tiny-tracking")
    lineage = run(cfg).data
    again = run(cfg).data
    return cfg, lineage, again


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny-tracking")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_mlflow_layout_follows_the_lineage(mlflow_server, mlflow_lineage):
    cfg, lineage, _ = mlflow_lineage
    client, runs = _runs(mlflow_server)
    parents = [r for r in runs if r.data.tags.get("raypath.kind") == "lineage"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # every version released (twice: the re-run set it running)
    assert parent.data.tags["raypath.run_dir"] == str(Path(cfg.run_dir).resolve())
    assert parent.data.params["train.max_lr"] == str(cfg.train.max_lr)
    children = {r.data.tags["raypath.segment"]: r for r in runs if r is not parent}
    assert sorted(children) == ["branch-v1", "main-v1"]
    for name, child in children.items():
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["raypath.version"] == name.split("-")[1]
        assert tags["raypath.kind"] == name.split("-")[0]
        assert child.info.status == "FINISHED"
        assert child.data.params["model.hidden_size"] == str(cfg.model.hidden_size)
    for branch in lineage["branches"]:
        assert children[branch["name"]].data.tags["raypath.fork_step"] == str(branch["fork_step"])


def test_mlflow_metrics_match_the_curves(mlflow_server, mlflow_lineage):
    _, lineage, _ = mlflow_lineage
    client, runs = _runs(mlflow_server)
    by_name = {r.data.tags.get("raypath.segment"): r for r in runs}
    for entry in lineage["main_path"] + lineage["branches"]:
        name = entry.get("segment") or entry["name"]
        run_id = by_name[name].info.run_id
        curve = _curve(entry["curve"])
        for key in (*CURVE_METRICS, f"val/{entry['version']}"):
            history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            expected = {r["step"]: r[key] for r in curve if key in r}
            assert expected and history.keys() == expected.keys(), (name, key)
            for step, value in expected.items():
                assert history[step] == pytest.approx(value, rel=1e-6)


def test_mlflow_releases_record_path_tag_and_artifact(mlflow_server, mlflow_lineage):
    _, lineage, _ = mlflow_lineage
    client, runs = _runs(mlflow_server)
    parent = next(r for r in runs if r.data.tags.get("raypath.kind") == "lineage")
    by_name = {r.data.tags.get("raypath.segment"): r for r in runs}
    assert len(lineage["releases"]) == 1
    for release in lineage["releases"]:
        run = by_name[release["branch"]]
        assert run.data.tags["raypath.release"] == release["path"]
        assert parent.data.tags[f"raypath.release.{release['version']}"] == release["path"]
        local = client.download_artifacts(run.info.run_id, f"release-{release['version']}.json")
        link = read_json(local)
        assert link["path"] == release["path"] and Path(link["path"]).is_dir()
        assert link["uri"] == Path(release["path"]).resolve().as_uri()


def test_mlflow_rerun_continues_the_same_runs(mlflow_server, mlflow_lineage):
    _, lineage, again = mlflow_lineage
    _, runs = _runs(mlflow_server)
    assert len(runs) == 1 + len(lineage["main_path"]) + len(lineage["branches"])


def test_missing_backend_package_is_a_named_error(monkeypatch, tmp_path):
    import importlib.util

    from raypath import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = tiny_config(tmp_path / "run", "tracking.backend=mlflow")
    with pytest.raises(tracking.TrackingError, match=r"tracking.backend: mlflow needs .*raypath\[mlflow\]"):
        tracking.open_lineage(cfg, tmp_path / "run")


def test_unknown_backend_is_rejected(tmp_path):
    from raypath.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.backend: must be one of tensorboard, mlflow, none"):
        tiny_config(tmp_path / "run", "tracking.backend=wandb")


def test_a_resumed_segment_replaces_what_the_failed_attempt_logged_in_tensorboard(tmp_path):
    """Resumed from its step-60 checkpoint, a segment trains 61..80 again: TensorBoard's readers
    must show the surviving attempt's step 80 only, as the curve does (its last record)."""
    import types

    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    from raypath import tracking
    from raypath.mirror import LOCAL

    spec = tracking.TrackingSpec("tensorboard", str(tmp_path), {})
    seg = types.SimpleNamespace(name="main-v1", version="v1", kind="main", start_step=0, end_step=100,
                                schedule=None, rd=LOCAL)
    first = tracking.Tracker.start(spec, seg)
    for step, loss in ((20, 5.0), (40, 4.5), (60, 4.2), (80, 4.0)):
        first.log({"loss": loss}, step)
    first.writer.close()  # the worker dies after step 80; the checkpoint is step 60's
    time.sleep(1.1)  # event file names carry the second
    second = tracking.Tracker.start(spec, seg, 60)
    for step, loss in ((80, 3.9), (100, 3.8)):
        second.log({"loss": loss}, step)
    second.close()
    expected = {20: 5.0, 40: 4.5, 60: 4.2, 80: 3.9, 100: 3.8}
    assert _scalars(tmp_path / "tb" / "main-v1")["loss"] == pytest.approx(expected)
    acc = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tb" / "main-v1"))  # what the UI reads
    acc.Reload()
    points = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}
    assert len(acc.Tensors("loss")) == len(expected) and points == pytest.approx(expected)


def test_mlflow_by_default_logs_to_a_sqlite_file_in_the_run_directory(tmp_path, monkeypatch):
    from raypath import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    cfg = tiny_config(tmp_path / "run", "tracking.backend=mlflow")
    spec = tracking.open_lineage(cfg, tmp_path / "run")
    assert spec.mlflow_uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    assert (tmp_path / "run" / "mlflow.db").is_file() and spec.parent_run_id
    # artifacts (the release links) beside it, not in ./mlruns of whichever directory the job ran in
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(spec.mlflow_uri)
    client.log_text(spec.parent_run_id, "{}", "release-v1.json")
    assert client.get_experiment_by_name(cfg.name).artifact_location == (tmp_path / "run" / "mlartifacts").as_uri()
    assert list((tmp_path / "run" / "mlartifacts").rglob("release-v1.json")) and not (tmp_path / "mlruns").exists()


def test_the_lineage_run_status_is_raypath_runs_and_a_sweep_leaves_it_as_it_was(tmp_path, monkeypatch):
    """``raypath run`` owns the MLflow parent run's status; a sweep of a lineage whose run failed
    (or is running elsewhere) does not mark it finished; nor does a run that fails while
    preparing (before its training block) leave it RUNNING."""
    from mlflow.tracking import MlflowClient

    from raypath import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path / "run", "tracking.backend=mlflow")

    def status(spec) -> str:
        return MlflowClient(spec.mlflow_uri).get_run(spec.parent_run_id).info.status

    with pytest.raises(RuntimeError), tracking.lineage_run(tracking.open_lineage(cfg, tmp_path / "run")):
        raise RuntimeError("a segment failed")
    spec = tracking.open_lineage(cfg, tmp_path / "run")  # a sweep (or a re-run) opens the same parent
    assert not spec.created_parent and status(spec) == "FAILED"  # opening it changes nothing
    with tracking.lineage_run(spec, owner=False):
        assert status(spec) == "FAILED"
    assert status(spec) == "FAILED"  # the sweep finished; the lineage did not
    with tracking.lineage_run(spec):
        assert status(spec) == "RUNNING"
    assert status(spec) == "FINISHED"

    other = tiny_config(tmp_path / "other", "tracking.backend=mlflow", f"tracking.mlflow_uri={spec.mlflow_uri}")
    first = tracking.open_lineage(other, tmp_path / "other")  # a sweep that created the parent run owns it
    assert first.created_parent
    with tracking.lineage_run(first, owner=False):
        pass
    assert status(first) == "FINISHED"
