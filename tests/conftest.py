"""Shared fixtures: one local Ray cluster and one tiny lineage run per session.

Starting Ray costs seconds and a tiny lineage a minute or two on 2 CPUs, so
tests that only *inspect* a finished run share one; tests that mutate a run
(resume, crash) copy it first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raypath.cluster import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of the tiny run that a test may modify (paths rewritten)."""
    cfg, _ = tiny_run
    src = Path(cfg.run_dir)
    dst = tmp_path / "run"
    shutil.copytree(src, dst, symlinks=True)
    for f in dst.rglob("*.json"):
        f.write_text(f.read_text().replace(str(src), str(dst)))
    return tiny_config(dst)
