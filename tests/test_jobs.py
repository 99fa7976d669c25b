"""A real Ray Jobs round trip: `ray start --head`, submit jobs/run_lineage.py, export.

The head is this module's own: its own ports, its own short ``--temp-dir``
(so its ``ray_current_cluster`` file does not redirect a plain ``ray.init()``
elsewhere in the session to it), dashboard on 127.0.0.1 only, token auth off
(``RAY_AUTH_MODE=disabled``, for the head and this client alike).

Teardown does not use ``ray stop``: that command is not scoped to a cluster, it
kills every Ray process it finds on the machine, which would take down the
in-process cluster that other tests (or another pytest on this machine) run.
Instead ``ray start`` runs in a new session, so everything it spawns (GCS,
raylet, dashboard, workers, the job's driver) inherits its process group; the
teardown signals exactly those processes, by pid, plus any process whose
command line names this head's unique temp dir.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray` and `python`
JOB_TIMEOUT_S = 360
EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", "*.egg-info", "__pycache__", ".ci"]
TINY_OVERRIDES = ["data.versions=[v1]", "train.num_workers=1", "data.max_docs_per_version=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    # Jobs run `python ...` with the head's PATH: make that the venv's python.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _our_processes(pgid: int, temp_dir: str) -> list:
    """Live processes this head started: its process group, or naming its temp dir, and their children.

    Children matter: Ray's workers (and so the job's driver) start their own
    sessions and rename themselves (``ray::IDLE``), so only their ancestry ties
    them to this head.
    """
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            if os.getpgid(proc.pid) == pgid or temp_dir in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        except (psutil.Error, ProcessLookupError):
            continue
    found.pop(os.getpid(), None)
    return _alive(list(found.values()))


def _stop_head(pgid: int, temp_dir: str, grace_s: float = 5.0) -> list:
    """SIGTERM this head's processes, SIGKILL what is left after ``grace_s``; returns survivors."""
    import psutil

    procs = _our_processes(pgid, temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    procs = _alive(procs + _our_processes(pgid, temp_dir))
    for p in procs:
        try:
            p.kill()  # GCS and the autoscaler monitor may ignore SIGTERM for a while
        except psutil.Error:
            pass
    deadline = time.monotonic() + 10
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(procs)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own with the dashboard (Jobs API) on 127.0.0.1."""
    from ray._private.utils import get_dashboard_dependency_error, get_ray_client_dependency_error

    missing = get_dashboard_dependency_error()
    if missing:
        pytest.skip(f"Ray Jobs needs the dashboard, which needs ray[default] ({missing}): "
                    "install ray[default]==2.60.0")
    # Short: Ray puts unix sockets under it (108-byte path limit).
    temp_dir = tempfile.mkdtemp(prefix="rpj", dir="/tmp")
    gcs_port, dash_port, agent_port = _free_port(), _free_port(), _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--dashboard-agent-listen-port={agent_port}",  # default 52365 is shared by every cluster
           "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if get_ray_client_dependency_error() is None:
        cmd.append(f"--ray-client-server-port={_free_port()}")  # default 10001, same reason
    env = _head_env()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pgid = proc.pid  # start_new_session: ray start leads a new process group
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out}")
        yield {"cmd": cmd, "env": env, "dashboard_port": dash_port, "temp_dir": temp_dir, "pgid": pgid,
               "address": f"http://127.0.0.1:{dash_port}", "start_output": out}
    finally:
        leftover = _stop_head(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the test head survived: {[p.pid for p in leftover]}"


@pytest.fixture(scope="module")
def job_client(ray_head):
    from ray.job_submission import JobSubmissionClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        deadline = time.monotonic() + 60
        while True:
            try:
                client = JobSubmissionClient(ray_head["address"])
                break
            except Exception:  # noqa: BLE001 - the dashboard may need a moment after `ray start`
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield client


def _wait_job(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


# Starting a second Ray head and a job costs 2.5-4 minutes on 2 CPUs: kept out of the
# CI run (make test) to hold it near 15 minutes; make test-slow runs it.
@pytest.mark.slow
def test_dashboard_bound_to_loopback_only(ray_head):
    import psutil

    assert "--dashboard-host=127.0.0.1" in ray_head["cmd"]
    port = ray_head["dashboard_port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    listeners = [c.laddr.ip for p in _our_processes(ray_head["pgid"], ray_head["temp_dir"])
                 for c in _safe_connections(p) if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listeners and set(listeners) == {"127.0.0.1"}, listeners


def _safe_connections(proc):
    import psutil

    try:
        return proc.net_connections(kind="inet")
    except psutil.Error:
        return []


@pytest.mark.slow
def test_run_lineage_job_round_trip(ray_head, job_client, tmp_path):
    run_dir = tmp_path / "run"
    overrides = " ".join(f"--set {o}" for o in [f"run_dir={run_dir}", *TINY_OVERRIDES])
    # Prepared first (a CPU cluster's job, say), then trained by the same command without --prepare-only.
    entrypoint = ("python -c 'import raypath, sys; print(\"job python:\", sys.executable, raypath.__name__)'"
                  f" && python jobs/run_lineage.py --config configs/tiny.yaml {overrides} --prepare-only"
                  f" && python jobs/run_lineage.py --config configs/tiny.yaml {overrides}")
    job_id = job_client.submit_job(entrypoint=entrypoint,
                                   runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES})
    status = _wait_job(job_client, job_id, JOB_TIMEOUT_S)
    logs = job_client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; logs:\n{logs[-20000:]}"

    # The job's python is the venv's, and raypath imports there.
    assert "job python:" in logs and "raypath" in logs.split("job python:", 1)[1].splitlines()[0]
    prepared, trained = logs.split("releases of tiny", 1)[0].split("replay blocks", 1)  # the versions table's header
    assert "tokenized and packed" in prepared and "tokenized and packed" not in trained  # prepared once
    assert re.search(r"^v1 +\d+ +- +\d+", trained, re.M) and "main-v1" not in prepared  # nothing trained before it

    from raypath.lineage import Lineage

    lineage = Lineage.load(run_dir).data  # the record's paths resolved (lineage.json holds them run-dir-relative)
    [release] = lineage["releases"]
    assert release["version"] == "v1"
    release_dir = Path(release["path"])
    assert (release_dir / "model.safetensors").is_file()
    assert (run_dir / "report" / "lineage.png").stat().st_size > 0
    assert "releases of tiny" in logs, logs[-5000:]
    table = logs.split("releases of tiny", 1)[1]
    assert "v1" in table and release["branch"] in table

    # Export (no Ray): atomic copy, verified, then refuses to overwrite without --force.
    out = tmp_path / "exported" / "tiny-v1"
    export = [sys.executable, str(ROOT / "jobs" / "export.py"), "--run-dir", str(run_dir), "--version", "v1",
              "--out", str(out)]
    res = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exported v1" in res.stdout
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-v1"], "temp sibling left behind"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 0

    again = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr
    forced = subprocess.run([*export, "--force"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert forced.returncode == 0, forced.stderr

    missing = subprocess.run([*export[:-4], "--version", "v2", "--out", str(tmp_path / "v2")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert missing.returncode == 2 and "v2" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "v2").exists()


@pytest.mark.slow
def test_the_log_level_reaches_the_workers_of_an_existing_cluster(ray_head, job_client):
    # Workers of a cluster the driver connects to do not inherit its environment: --verbose /
    # RAYPATH_LOG_LEVEL changed only the driver's own lines. A job's runtime_env that sets the
    # level itself must not clash with raypath's (Ray refuses an env var set twice).
    code = ("import os, ray; from raypath.cluster import init_ray; init_ray(); "
            "print('worker level:', ray.get(ray.remote(lambda: os.environ.get('RAYPATH_LOG_LEVEL')).remote()))")
    for shell, job_env, want in (("RAYPATH_LOG_LEVEL=DEBUG ", None, "DEBUG"),
                                 ("", {"RAYPATH_LOG_LEVEL": "WARNING"}, "WARNING")):
        job_id = job_client.submit_job(entrypoint=f'{shell}python -c "{code}"',
                                       runtime_env={"env_vars": job_env} if job_env else None)
        status = _wait_job(job_client, job_id, 300)
        logs = job_client.get_job_logs(job_id)
        assert status == "SUCCEEDED" and f"worker level: {want}" in logs, logs[-5000:]


def test_a_damaged_lineage_is_a_user_error_not_a_crash(tmp_path):
    """Exit 1 means "not finished, re-submit" to a job's caller: a damaged run file must not look like it."""
    (tmp_path / "lineage.json").write_text('{"format": 2, "versions": [{"na')
    res = subprocess.run([sys.executable, "jobs/export.py", "--run-dir", str(tmp_path), "--version", "v1",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert "lineage.json" in res.stderr and "Traceback" not in res.stderr


def test_run_lineage_rejects_bad_config():
    """A bad config fails fast with one clear line and exit code 2 (no Ray started)."""
    res = subprocess.run([sys.executable, "jobs/run_lineage.py", "--config", "configs/tiny.yaml",
                          "--set", "branch.shape=bogus"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2
    assert "branch.shape" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "jobs/run_lineage.py", "--config", "configs/nope.yaml"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "not found" in res.stderr


def test_the_export_job_takes_every_option_of_raypath_export():
    """jobs/export.py is ``raypath export`` as a job: a remote run directory's mirror (--local-dir)
    included, so the job can export where the command can."""
    from raypath.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    command = {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--verbose"}
    res = subprocess.run([sys.executable, "jobs/export.py", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    missing = sorted(o for o in command if o not in res.stdout)
    assert not missing, f"jobs/export.py lacks {missing}"


def test_a_second_writer_of_a_run_directory_is_refused_until_the_first_one_is_gone(tmp_path):
    """Two main-path jobs on one run_dir (a re-submitted job while the first still runs) would train
    the same checkpoints and save their own copies of the lineage. The second is refused at once,
    naming the first."""
    import json
    import os

    from raypath.storage import WRITER_LOCK, WRITER_STALE_S, RunDirBusyError, writer_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from raypath.storage import writer_lock\n"
                               f"with writer_lock({str(run_dir)!r}, 'run'):\n    print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "jobs/run_lineage.py", "--config", "configs/tiny.yaml",
                              "--set", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 2, res.stderr
        assert f"run_dir: {run_dir} is being written by a run" in res.stderr and f"pid {holder.pid}" in res.stderr
        assert "Traceback" not in res.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [WRITER_LOCK], "the refused job wrote something"
        # a sweep or a --pick writes beside a run (its own part; the lineage's saves merge): not refused
        # by the lock, only for the lineage this directory lacks
        for cmd in (["release", str(run_dir), "--version", "v1", "--pick", "best"],
                    ["sweep", "configs/tiny.yaml", "--version", "v1", "--set", f"run_dir={run_dir}"]):
            res = subprocess.run([sys.executable, "-m", "raypath.cli", *cmd], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT)
            assert res.returncode == 2 and "no lineage record" in res.stderr, res.stderr
            assert "being written" not in res.stderr
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(run_dir, "sweep v1"):  # a killed writer's lock (same host, pid gone) is taken over
        with writer_lock(run_dir, "run"):  # nested in the same process: goes on
            pass
        assert json.loads((run_dir / WRITER_LOCK).read_text())["what"] == "sweep v1"
    assert not (run_dir / WRITER_LOCK).exists()

    # Of another host: live while refreshed, a dead writer's once it is not.
    (run_dir / WRITER_LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "what": "run", "argv": "x"}))
    with pytest.raises(RunDirBusyError, match="pid 1 on elsewhere"), writer_lock(run_dir, "run"):
        pass
    old = time.time() - WRITER_STALE_S - 1
    os.utime(run_dir / WRITER_LOCK, (old, old))
    with writer_lock(run_dir, "run"):
        pass


def test_a_lock_of_another_host_gone_silent_is_waited_out_not_refused(tmp_path, monkeypatch):
    """A RayJob retried on a fresh cluster after its head pod died found the dead driver's lock (another
    host: its pid cannot be asked) younger than the stale time and failed, spending a retry. A lock
    unrefreshed for longer than a live writer leaves it is waited out and taken over; one refreshed
    while the second writer waits is a live writer's: refused."""
    import json
    import os
    import threading

    from raypath import storage
    from raypath.storage import WRITER_LOCK, RunDirBusyError, writer_lock

    monkeypatch.setattr(storage, "WRITER_REFRESH_S", 1.0)
    monkeypatch.setattr(storage, "WRITER_STALE_S", 4.0)
    lock = tmp_path / WRITER_LOCK

    def dead_writers_lock(silent_s: float) -> None:
        lock.write_text(json.dumps({"host": "head-pod-1", "pid": 9, "what": "run", "argv": "x"}))
        os.utime(lock, (time.time() - silent_s,) * 2)

    dead_writers_lock(2.0)
    t0 = time.monotonic()
    with writer_lock(tmp_path, "run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert 1.5 <= time.monotonic() - t0 < 4.0

    dead_writers_lock(2.0)
    touch = threading.Timer(0.5, lambda: os.utime(lock))  # the writer is alive after all
    touch.start()
    with pytest.raises(RunDirBusyError, match="pid 9 on head-pod-1"), writer_lock(tmp_path, "run"):
        pass
    touch.join()
