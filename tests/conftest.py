"""Shared fixtures: one local Ray cluster and one tiny lineage run per session.

Starting Ray costs seconds and a tiny lineage a minute or two on 2 CPUs, so
tests that only *inspect* a finished run share one; tests that mutate a run
(resume, crash) copy it first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raypath.cluster import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The Train controller polls its workers every 2 s by default: a finished tiny run
    # waits up to 2 s to be noticed and every report up to 2 s to be drained. The suite
    # runs dozens of short runs, where that is most of the wall time (local workers
    # inherit this environment).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    init_ray(num_cpus=8)
    yield
    ray.shutdown()


def tiny_config(run_dir: Path, *overrides: str):
    from raypath.config import load_config

    return load_config(TINY, [f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tmp_path_factory):
    """A finished 3-version tiny lineage: (config, lineage dict)."""
    from raypath.run import run

    cfg = tiny_config(tmp_path_factory.mktemp("tiny") / "run")
    lineage = run(cfg)
    return cfg, lineage.data


def copy_first_versions(src: Path, dst: Path, keep: int) -> Path:
    """A copy of a finished run directory whose lineage holds its first ``keep`` versions only: a
    lineage's versions can only be appended, so work on fewer of them (a comparison of the first
    two) takes a run directory of its own. The data manifest keeps the rest: a prepared version
    the corpus no longer lists is left alone."""
    from raypath.lineage import Lineage

    shutil.copytree(src, dst, symlinks=True)
    lin = Lineage.load(dst)
    names = set(lin.version_names()[:keep])
    lin.data["versions"] = [v for v in lin.data["versions"] if v["name"] in names]
    for key in ("main_path", "branches", "releases"):
        lin.data[key] = [e for e in lin.data.get(key, []) if e.get("version") in names]
    lin.data["release_history"] = {v: h for v, h in lin.data.get("release_history", {}).items() if v in names}
    lin.save()
    return dst


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of the tiny run that a test may modify (records store paths relative to
    the run directory: a plain copy)."""
    cfg, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(cfg.run_dir, dst, symlinks=True)
    return tiny_config(dst)



#: The search of the tiny sweep fixtures: 4 trials, 2 at once, all five shapes, two replay
#: ratios (the stream's own 0 and 0.25), guided by the law (the default).
TINY_SWEEP = {"num_samples": 4, "max_concurrent": 2, "seed": 0, "fraction": [0.1, 0.45],
              "min_lr_ratio": [0.0, 0.1], "weights": {"old": 0.5, "new": 0.5}, "replay_ratios": [0.0, 0.25]}
#: Trials report only their final evaluation in the fast sweep (each Ray report costs ~2 s).
FAST_TRIALS = ["train.checkpoint_every=0", "train.eval_every=0"]


def sweep_snapshot(sweep_dir: Path) -> dict:
    """What a re-run must not touch: trial dirs, curves (size, mtime), branch checkpoints."""
    return {"trials": sorted(p.name for p in sweep_dir.glob("trial_*")),
            "curves": {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sweep_dir.glob("curves/*.jsonl")},
            "checkpoints": sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.glob("branches/*/step_*"))}


@pytest.fixture(scope="session")
def sweep_lineage(ray_cluster, tmp_path_factory):
    """The main path of a 2-version tiny lineage (1 worker), checkpointed and evaluated every
    16 steps so v2 has several fork points and the law has points to fit; v1's release branch
    (the law learns a decay's gain from it), none of v2 (a sweep releases v2).
    Returns the path of its config, which carries a ``sweep:`` section."""
    import yaml

    from raypath.branches import release_branch, summarize
    from raypath.config import load_config
    from raypath.lineage import Lineage
    from raypath.mainpath import run_main_version
    from raypath.run import prepare
    from raypath.segment import fit_segment

    root = tmp_path_factory.mktemp("sweep")
    raw = yaml.safe_load(TINY.read_text())
    raw["run_dir"] = str(root / "run")
    raw["data"]["versions"] = ["v1", "v2"]
    raw["train"].update(num_workers=1, checkpoint_every=16, eval_every=16)
    raw["sweep"] = dict(TINY_SWEEP)
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    ctx = prepare(load_config(config))
    cfg = ctx.cfg
    lineage = Lineage.open(ctx.run_dir, cfg.name, cfg.to_dict())
    lineage.set_versions(ctx.versions)
    prev = None
    for k in range(len(ctx.versions)):
        prev = run_main_version(ctx, k, prev)
        lineage.record_main(prev)
        if k == 0:
            seg = release_branch(ctx, k, prev)
            fit_segment(seg)
            lineage.record_branch(summarize(seg))
    return config


@pytest.fixture(scope="session")
def tiny_sweep(sweep_lineage):
    """A real 4-trial sweep (2 at once) of v2, then the same command again (restored, nothing re-run).

    Returns a dict: ``config`` path, ``cfg``/``sweep`` settings, the sweep ``dir``, the first
    run's ``record``, the second run's ``again`` record and snapshots ``before_again``/``after_again``.
    """
    from raypath.config import load_config
    from raypath.sweep import run_sweep

    cfg = load_config(sweep_lineage, FAST_TRIALS)
    sweep_dir = Path(cfg.run_dir) / "sweeps" / "v2" / cfg.sweep.name
    record = run_sweep(cfg, "v2")
    before = sweep_snapshot(sweep_dir)
    again = run_sweep(cfg, "v2")
    return {"config": sweep_lineage, "cfg": cfg, "sweep": cfg.sweep, "dir": sweep_dir, "record": record,
            "again": again, "before_again": before, "after_again": sweep_snapshot(sweep_dir)}


# ---------------------------------------------------------------- a real S3 API on loopback

#: Dummy credentials: moto accepts any; AWS's SDK needs some (and no EC2 metadata probing).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3:
    endpoint: str
    fs: pafs.S3FileSystem

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(key) as f:
            return f.read()

    def files(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under ``prefix``."""
        infos = self.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_group() -> None:
    """End a spawned rank's gloo group. The barrier comes first: while every rank waits in it with
    the GIL released, gloo's worker threads free the buffers of the collectives before it. A rank
    that exits straight after a collective can otherwise begin interpreter shutdown while a worker
    thread still needs the GIL to free them; that thread is then killed inside a C++ destructor
    and the process aborts ("terminate called without an active exception", SIGABRT)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture
def gloo_group():
    """A one-rank gloo process group on a free loopback port, for code that reads the world."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port, killed at the end; AWS_* set for this module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"moto_server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.MonkeyPatch.context() as mp:
            for key, value in AWS_ENV.items():
                mp.setenv(key, value)
            yield S3(endpoint, pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True))
    finally:
        proc.kill()
        proc.wait(timeout=30)


def bucket(s3: S3, name: str) -> str:
    """A bucket named ``name`` on the moto server."""
    s3.fs.create_dir(name)
    return name
