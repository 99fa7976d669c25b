"""Fault tolerance with real processes: SIGKILL a Train worker mid-segment."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

from raypath import checkpoint as ckpt
from raypath.config import TrainConfig
from raypath.data import Consumed
from raypath.lineage import Lineage
from raypath.mirror import RunDir


def _train_worker_pids() -> list[int]:
    """Live ``ray::RayTrainWorker`` processes of *this* session's cluster.

    Ray workers are children of their node's raylet; matching the parent keeps
    us from touching other Ray clusters that may run on the same machine.
    """
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0]
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if cmd.startswith(b"ray::RayTrainWorker") and ppid == raylet:
            pids.append(int(proc.name))
    return pids


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _console_until(capfd, text: str) -> str:
    """What this driver printed, waiting up to 10 s for ``text``: Ray streams the controller's and
    workers' lines to it."""
    console = ""
    for _ in range(50):
        console += capfd.readouterr().err
        if text in console:
            break
        time.sleep(0.2)
    return console


def test_killed_worker_resumes_with_exact_data(tiny_run, tmp_path, capfd):
    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg, lin = tiny_run
    ctx = dataclasses.replace(prepare(cfg), rd=RunDir(tmp_path), tracking=None)  # events under tmp_path too
    seg = main_segment(ctx, 1, Lineage.of(lin).main("v1"))  # version 2, from the tiny run's v1 boundary
    # 16 steps are enough for checkpoints before and after the kill; every checkpoint is
    # a Ray report (seconds each), so the whole version would only make the test slower.
    steps = min(seg.end_step - seg.start_step, 16)
    seg = dataclasses.replace(seg, end_step=seg.start_step + steps, save_steps=(),
                              stream_limit=steps * cfg.train.global_batch_size,
                              train=dataclasses.replace(seg.train, checkpoint_every=3, log_every=1))
    # The default config survives a lost worker: restarts are allowed out of the box.
    assert seg.train.max_failures == TrainConfig().max_failures == 3
    assert TrainConfig().checkpoint_every_minutes == 30
    curve = Path(seg.curves_path)
    kill_after = seg.start_step + 8  # at least two periodic checkpoints exist by then
    killed: dict = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            recs = _records(curve)
            if recs and recs[-1]["step"] >= kill_after:
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.update(pid=pids[0], step=recs[-1]["step"])
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    fit_segment(seg)
    thread.join(timeout=5)
    assert killed, "the worker was never killed"

    final = ckpt.load_state(Path(seg.storage) / ckpt.step_dir_name(seg.end_step))
    rows = (seg.end_step - seg.start_step) * cfg.train.global_batch_size
    assert final["step"] == seg.end_step
    assert Consumed.from_list(final["consumed"]).intervals == [[0, rows]]  # nothing lost, nothing twice

    recs = _records(curve)
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    assert len(starts) == 2, "one start, one restart"
    restart = recs[starts[1]]
    assert restart["step"] <= killed["step"]  # went back to a checkpoint taken before the kill
    assert (restart["step"] - seg.start_step) % 3 == 0  # ...one of the periodic ones
    assert restart["checkpoint"].endswith(ckpt.step_dir_name(restart["step"]))
    # The loss curve continues: the first loss after the restart is within the
    # step-to-step noise of the losses logged before the kill (a restart from
    # the wrong weights or data position would jump far beyond it).
    before = [r for r in recs[:starts[1]] if "loss" in r]
    after = [r for r in recs[starts[1]:] if "loss" in r]
    noise = max(abs(a["loss"] - b["loss"]) for a, b in zip(before[1:], before[:-1]))
    ref = next(r["loss"] for r in reversed(before) if r["step"] <= after[0]["step"])
    assert abs(after[0]["loss"] - ref) <= 1.5 * noise + 0.05, (after[0], ref, noise)

    # The console says so when Ray Train finds the worker gone, before the new group's start-up.
    console = _console_until(capfd, "resuming from")
    notice = console.find(f"[{seg.name}] worker rank ")
    assert notice >= 0 and "restarting the workers from the newest checkpoint (failure 1" in console, console[-3000:]
    assert notice < console.find(f"[{seg.name}] resuming from"), console[-3000:]


def test_a_rotten_newest_checkpoint_restarts_the_workers_and_no_row_is_skipped(tiny_run, tmp_path, capfd):
    """The newest checkpoint is complete, its weights rotted. The controller's dataset reads only its
    state (not hashing 12 bytes a parameter) and starts from its data position; the node's first
    worker hashes what the node's two DDP workers load, quarantines it and fails the attempt on
    both (the other hashes nothing); the restart takes the one before on both sides."""
    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg, lin = tiny_run
    ctx = dataclasses.replace(prepare(cfg), rd=RunDir(tmp_path), tracking=None)
    seg = main_segment(ctx, 1, Lineage.of(lin).main("v1"))
    G, start = cfg.train.global_batch_size, seg.start_step
    first = dataclasses.replace(seg, end_step=start + 4, save_steps=(), stream_limit=4 * G,
                                train=dataclasses.replace(seg.train, checkpoint_every=2, log_every=1, num_workers=2))
    fit_segment(first)
    rot = Path(seg.storage) / ckpt.step_dir_name(start + 4)
    weights = rot / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"rotten!!")
    longer = dataclasses.replace(first, end_step=start + 6, stream_limit=6 * G)
    fit_segment(longer)

    final = ckpt.load_state(Path(seg.storage) / ckpt.step_dir_name(start + 6))
    assert Consumed.from_list(final["consumed"]).intervals == [[0, 6 * G]]  # nothing skipped, nothing twice
    assert [r["step"] for r in _records(Path(seg.curves_path)) if r.get("event") == "start"] == [start, start + 2]
    console = _console_until(capfd, "resuming from")
    assert f"quarantining checkpoint {rot}" in console and "failed this worker's checks" in console, console[-3000:]
    assert "worker rank 0, 1 failed" in console, console[-3000:]  # the node's first worker's failure fails both
    assert console.count(f"skipping checkpoint: {rot}") == 1, console[-3000:]  # the restart chose once, not per worker
    assert "restarting the workers from the newest checkpoint (failure 1" in console, console[-3000:]


class _HoldsALock(RuntimeError):
    """Like torch.compile's backend failures: an exception whose state cannot be pickled."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.lock = threading.RLock()


def _fails_with_a_lock(config: dict) -> None:
    from raypath.loop import portable_errors

    def inner_kernel_compile():
        raise _HoldsALock("triton kernel XYZ failed to compile")

    with portable_errors():
        inner_kernel_compile()


def test_unpicklable_worker_error_reaches_the_driver_with_its_traceback(ray_cluster, tmp_path):
    """Ray Train alone reports only "cannot pickle '_thread.RLock'"; the cause must survive."""
    import sys

    import pytest
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    trainer = TorchTrainer(_fails_with_a_lock, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="unpicklable", storage_path=str(tmp_path)))
    with pytest.raises(Exception) as err:
        trainer.fit()
    text = str(err.value)
    assert "WorkerError" in text and "_HoldsALock: triton kernel XYZ failed to compile" in text
    assert "inner_kernel_compile" in text  # the worker's traceback, not only the message


def test_picklable_worker_errors_pass_unchanged():
    import pytest

    from raypath.config import ConfigError
    from raypath.loop import WorkerError, portable_errors

    with pytest.raises(ConfigError, match="train.lr"), portable_errors():
        raise ConfigError("train.lr: expected a float")
    with pytest.raises(WorkerError, match=r"(?s)_HoldsALock: held.*worker traceback"), portable_errors():
        raise _HoldsALock("held")
    with pytest.raises(WorkerError, match="_TwoArgs: shard 3 of 8"), portable_errors():
        raise _TwoArgs(3, 8)  # pickles, but cannot be rebuilt from its args on the driver


class _TwoArgs(RuntimeError):
    def __init__(self, shard: int, shards: int):
        super().__init__(f"shard {shard} of {shards}")


def test_a_segment_refuses_to_continue_checkpoints_of_another_plan(tmp_path):
    """A branch edited after a crash (shape, or a fork moved behind the checkpoint) must not resume
    as if nothing changed: the lineage would record a schedule that never ran."""
    import pytest

    from raypath.config import ConfigError, ModelConfig
    from raypath.schedules import Branch, Decay, MainPath
    from raypath.segment import Segment, check_plan

    def branch(shape: str, save_steps: tuple[int, ...] = (100,)) -> Segment:
        return Segment(name="branch-v1", kind="branch", version="v1", stream_path="", start_step=80, end_step=100,
                       schedule=Branch(MainPath(1e-3, 5), 80, 20, Decay(shape)), model=ModelConfig(),
                       train=TrainConfig(), vocab_size=64, eos_id=0, pad_id=None, seq_len=16,
                       storage=str(tmp_path / "branch-v1"), curves_path="", save_steps=save_steps)

    cosine = branch("cosine")
    check_plan(cosine)  # nothing saved yet
    ckpt.save(tmp_path / "branch-v1" / ckpt.step_dir_name(90), {}, {}, {"step": 90, "schedule": repr(cosine.schedule)})
    check_plan(cosine)
    with pytest.raises(ConfigError, match=r"branch-v1: .*step_00000090 was trained under Branch\(.*shape='cosine'"):
        check_plan(branch("linear"))
    with pytest.raises(ConfigError, match="past step 85, which this plan checkpoints"):
        check_plan(branch("cosine", save_steps=(85, 100)))


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    """SIGKILL skips every cleanup: an atomic write's temporary sibling (a release's whole model
    copy, a half-written report file) stayed for good. The next write of the same file removes
    those of dead processes, and leaves a live writer's and another host's recent one alone."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    from raypath.storage import STALE_S, atomic_dir, atomic_write_bytes

    release, report = tmp_path / "releases" / "v1" / "r1", tmp_path / "report" / "releases.csv"
    code = (f"import time\nfrom raypath.storage import atomic_dir, atomic_file\n"
            f"with atomic_dir({str(release)!r}) as d:\n"
            f"    (d / 'model.safetensors').write_bytes(b'w' * 1000)\n"
            f"    with atomic_file({str(report)!r}) as f:\n"
            f"        f.write(b'half')\n"
            f"        print('ready', flush=True)\n"
            f"        time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    assert len(list(tmp_path.rglob(".*.tmp"))) == 2  # the model copy and the report's half
    live = report.with_name(f".releases.csv.{socket.gethostname()}-{os.getpid()}.abcd1234.tmp")
    recent, old = (report.with_name(f".releases.csv.elsewhere-{n}.abcd1234.tmp") for n in (1, 2))
    for p in (live, recent, old):
        p.write_bytes(b"")
    os.utime(old, (time.time() - STALE_S - 60,) * 2)
    atomic_write_bytes(report, b"version,branch\n")
    with atomic_dir(release) as d:
        (d / "model.safetensors").write_bytes(b"w" * 1000)
    assert sorted(p.name for p in tmp_path.rglob(".*.tmp")) == sorted([live.name, recent.name])
    assert report.read_bytes() == b"version,branch\n" and (release / "model.safetensors").is_file()


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    """A write of a record replaces it only once the new content is complete: an error (a full
    disk, a Ctrl-C) while writing leaves the previous record for the next run to trust."""
    import pytest

    from raypath.storage import atomic_file, read_json, write_json

    lineage = tmp_path / "lineage.json"
    write_json(lineage, {"versions": ["v1"]})
    for interrupt in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(interrupt)):
            with atomic_file(lineage) as f:
                f.write(b'{"versions": ["v1", "v2"')
                f.flush()
                raise interrupt
        assert read_json(lineage) == {"versions": ["v1"]}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lineage.json"]
