"""The console of `raypath run`: raypath's own lines, none of Ray's internal chatter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

#: What Ray prints on its own during a lineage (kept in Ray's log directory instead).
RAY_INTERNALS = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "streaming_executor",
                 "Execution plan", "Checkpoint successfully created", "Reporting training result",
                 "worker start-up", "Started a local Ray instance", "(raylet)")


@pytest.mark.slow  # its own Ray cluster and a 2-version lineage through the CLI: ~5 min on 2 CPUs
def test_cli_run_prints_progress_and_no_ray_internals(tmp_path):
    """The tiny lineage through the CLI, as a user runs it, in its own Ray cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAYPATH_LOG_LEVEL", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raypath.cli", "run", str(TINY), "--set", f"run_dir={tmp_path / 'run'}",
           "--set", "data.versions=[v1, v2]", "--set", "train.num_workers=1", "--set", "cluster.num_cpus=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # raypath's own lines: per-segment progress (from the Train workers), the whole-run
    # line, releases, the final table.
    assert re.search(r"\[main-v1\] step \d+/\d+ loss \d", out), out[-5000:]
    assert re.search(r"\[branch-v2\] step \d+/\d+ loss \d", out), out[-5000:]
    assert re.search(r"run tiny: version 1 of 2 \(main-v1\), 0% of the run's steps done, ETA to end of run", out)
    assert re.search(r"run tiny: version 2 of 2 \(main-v2\), \d+% of the run's steps done, "
                     r"ETA to end of run \d+m\d\ds", out), out[-5000:]
    assert re.search(r"released v1 r1 from branch-v1", out) and re.search(r"released v2 r1 from branch-v2", out), \
        out[-5000:]
    # Every progress line is shown: Ray's de-duplication would fold lines differing in numbers.
    assert "repeated" not in out and "deduplicates logs" not in out
    steps = re.findall(r"\[main-v1\] step (\d+)/(\d+)", out)
    assert len(steps) >= int(steps[-1][1]) // 5, steps  # tiny.yaml logs every 5 steps
    for internal in RAY_INTERNALS:
        assert internal not in out, f"{internal!r} on the console:\n{out[-5000:]}"


@pytest.mark.slow  # its own Ray cluster, a tokenizer and a few steps, twice: ~2 min on 2 CPUs
@pytest.mark.parametrize("to", ["group", "driver"])
def test_ctrl_c_during_training_exits_130_with_what_is_kept_and_the_same_command_resumes(tmp_path, to):
    """A real SIGINT mid-segment, to the process group (a terminal's Ctrl-C) or the driver alone.
    Ray Train's own handler, installed by fit on the main thread, ended the process with code 1
    and no word."""
    import signal

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raypath.cli", "run", str(TINY), "--set", f"run_dir={tmp_path / 'run'}",
           "--set", "data.versions=[v1]", "--set", "train.num_workers=1", "--set", "cluster.num_cpus=4"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"\[main-v1\] step \d+/", line):  # training, on a Train worker
            (os.killpg if to == "group" else os.kill)(proc.pid, signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert out.rstrip().endswith("raypath: interrupted; what finished is kept (checkpoints, releases, the lineage): "
                                 "the same command resumes"), out[-3000:]
    if to == "driver":  # the same command finishes what was started
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0 and "released v1 r1 from branch-v1" in again.stdout + again.stderr


def _recording_stream(monkeypatch) -> list[list[str]]:
    """Stand in for Ray's printers (restored after the test) and record what reaches them."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[list[str]] = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    monkeypatch.setattr(ray_worker, "print_worker_logs",
                        lambda data, file, ignore_prefix: printed.append(data["lines"]))
    monkeypatch.setattr(dispatcher, "handlers", [])
    return printed


def test_quiet_filter_keeps_only_raypath_lines(monkeypatch):
    """The driver-side filter on the worker output Ray streams (what the CLI test relies on)."""
    from ray._private import worker as ray_worker

    from raypath import console

    monkeypatch.delenv(console.LEVEL_ENV, raising=False)
    printed = _recording_stream(monkeypatch)
    console.quiet_ray()
    ours = "12:00:01 INFO raypath.progress: [main-v1] step 5/40 loss 5.9"
    ray_worker.print_to_stdstream({"lines": [ours, "INFO streaming_executor.py:1 -- Execution plan ...",
                                             "(PlacementGroupCleaner) Failed to query"], "pid": 42,
                                   "is_err": True}, ignore_prefix=True)
    ray_worker.print_to_stdstream({"lines": ["worker start-up concurrency"], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    assert printed == [[ours]]


def test_verbose_prints_everything(monkeypatch):
    from ray._private import worker as ray_worker

    from raypath import console

    monkeypatch.setenv(console.LEVEL_ENV, "DEBUG")
    printed = _recording_stream(monkeypatch)
    console.quiet_ray()
    ray_worker.print_to_stdstream({"lines": ["(PlacementGroupCleaner) Failed to query"], "pid": 1, "is_err": True},
                                  ignore_prefix=True)
    assert printed == [["(PlacementGroupCleaner) Failed to query"]]


def test_a_quiet_tune_experiment_prints_no_banner_and_ray_deprecations_are_muted(ray_cluster, capfd, monkeypatch,
                                                                                 tmp_path):
    """Tune's console output printed its experiment banner and a TensorBoard hint pointing into
    Ray's session directory even at ``verbose=0``; a quiet driver shows neither."""
    import warnings

    from ray import tune
    from ray.util.annotations import RayDeprecationWarning

    from raypath import console

    monkeypatch.delenv(console.LEVEL_ENV, raising=False)
    console.quiet_ray()

    def trainable(config):
        tune.report({"score": 1.0})

    capfd.readouterr()
    tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1),
               run_config=tune.RunConfig(name="quiet", storage_path=str(tmp_path), verbose=0)).fit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("x", RayDeprecationWarning, stacklevel=1)  # under quiet_ray's filters
    out = capfd.readouterr()
    assert "Configuration for experiment" not in out.out + out.err
    assert "tensorboard --logdir" not in out.out + out.err
    assert not [w for w in caught if issubclass(w.category, RayDeprecationWarning)]


def test_the_run_eta_counts_only_the_steps_this_process_trained(tmp_path):
    """A re-run that resumes version 2's main segment at step 95 of 100 trained 5 steps, not 100:
    crediting them all made the ETA to the end of the run far too short."""
    import json
    import time

    from raypath.console import RunProgress

    progress = RunProgress("q", [{"stream_rows": 1600}] * 4, 16, 0.2)  # 100 main + 20 branch steps each
    progress.main_done(0)
    progress.branch_done(0)  # finished by the earlier run
    curve = tmp_path / "main-v2.jsonl"
    earlier = [{"event": "start", "step": 100, "time": time.time() - 3600}]
    earlier += [{"step": s, "loss": 3.0} for s in range(110, 196, 10)]
    now = [{"event": "start", "step": 195, "time": time.time()}, {"step": 200, "loss": 2.9}]
    curve.write_text("".join(json.dumps(r) + "\n" for r in earlier + now))
    time.sleep(0.2)
    progress.main_done(1, str(curve))
    assert (progress.done, progress.done_here) == (220, 5)
    assert progress.trained_here(str(tmp_path / "missing.jsonl")) == 0
    assert progress.eta_s() > 1.5  # 260 steps left at <= 25 steps/s (was 0m01s: 100 steps in 0.2 s)


def test_rays_token_auth_notice_is_not_printed_but_its_warning_that_auth_is_off_is(monkeypatch):
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    from raypath import console

    monkeypatch.delenv(console.LEVEL_ENV, raising=False)
    console.quiet_ray()
    console.quiet_ray()  # (once per driver is enough; twice adds nothing)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    auth.logger.addHandler(handler)  # Ray's loggers do not propagate to pytest's
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(handler)
    assert [m[:40] for m in seen] == ["Token authentication is disabled for thi"]


def test_the_run_line_counts_the_steps_a_resumed_segment_trained_before(tmp_path):
    """Resumed at step 60 of main-v1 (100 steps + 20 of branch, 2 versions): 25% done, not 0%."""
    from raypath.console import RunProgress

    progress = RunProgress("q", [{"stream_rows": 1600}] * 2, 16, 0.2)  # 240 steps in all
    progress.resume(60)
    assert "version 1 of 2 (main-v1), 25% of the run's steps done" in progress.line(0, "main-v1")
    progress.main_done(0)  # the segment's steps are counted once, whole
    assert (progress.done, progress.resumed) == (100, 0)
    assert "42% of the run's steps done" in progress.line(0, "branch-v1")


def test_a_segments_eta_leaves_out_the_start_up_before_its_first_step(tmp_path, monkeypatch, caplog):
    """100 s of start-up (the data pipeline, a compile), then a step a second: 95 steps left are
    95 s, not the 2,000 s that counting the start-up as pace gave."""
    import logging

    from raypath import loop
    from raypath.config import ModelConfig, TrainConfig
    from raypath.mirror import RunDir
    from raypath.schedules import MainPath
    from raypath.segment import Segment

    clock = iter([0.0, 100.0, 104.0, 104.0])  # start, the first step's end, the flush (twice)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    seg = Segment(name="main-v1", kind="main", version="v1", stream_path="", start_step=0, end_step=100,
                  schedule=MainPath(1e-3, 0), model=ModelConfig(), train=TrainConfig(), vocab_size=64,
                  eos_id=0, pad_id=None, seq_len=16, storage="", curves_path=str(tmp_path / "main-v1.jsonl"),
                  rd=RunDir(tmp_path))
    reporter = loop._Reporter(seg, 0, 1, 0)  # t = 0
    for _ in range(5):
        reporter.step(3.0, 16, 0.0)  # the first step ends at t = 100, the others a second apart
    with caplog.at_level(logging.INFO, logger="raypath.progress"):
        reporter.flush(5, 1e-3, 80, {})
    assert "eta 1m35s" in caplog.text


def test_a_heartbeat_logs_while_its_step_lasts_and_stops_with_it(monkeypatch, caplog):
    """A step whose progress cannot be counted (``save_pretrained``) says it is still going."""
    import logging
    import time

    from raypath import console

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.02)
    caplog.set_level(logging.INFO, logger="raypath")
    log = logging.getLogger("raypath.test")
    with console.heartbeat(log, "writing /models/v2"):
        time.sleep(0.2)
    beats = [r.getMessage() for r in caplog.records]
    assert len(beats) >= 3 and all(b == "writing /models/v2: 0m00s so far" for b in beats), beats
    time.sleep(0.1)
    assert len(caplog.records) == len(beats)  # none after the step
    caplog.clear()
    with console.heartbeat(log, "writing /models/v2", lambda: "4.2 GB of ~16 GB written"):
        time.sleep(0.1)
    assert caplog.records and all(r.getMessage() == "writing /models/v2: 4.2 GB of ~16 GB written, 0m00s so far"
                                  for r in caplog.records)
