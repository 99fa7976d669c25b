"""Connecting to Ray: an existing cluster (job submission, KubeRay) or a local one."""

from __future__ import annotations

import json
import logging
import os
import socket

log = logging.getLogger(__name__)


def local_num_cpus() -> int:
    # Logical CPUs above the core count: Train workers reserve theirs for the
    # whole run, and Ray Data's read/tokenize tasks need slots too or they hang
    # at a zero resource budget (seen on 2-core machines).
    return max(8, 2 * (os.cpu_count() or 1))


def check_address(address: str | None = None, timeout_s: float = 10.0) -> None:
    """Raise a ConfigError unless ``address`` (or ``RAY_ADDRESS``) is empty, ``auto``/``local``,
    or a ``host:port`` / ``ray://host:port`` that accepts a connection: ``ray.init`` would
    retry an unreachable one for minutes, printing a line per attempt."""
    from raypath.config import ConfigError

    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    where = "cluster.address" if address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
    if address.startswith(("http://", "https://")):  # what `ray job submit` takes
        raise ConfigError(f"{where}: {address} is a dashboard (job submission) address; raypath connects to "
                          "the cluster itself: host:6379, ray://host:10001 or auto (inside a submitted job)")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where}: {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [::1]:6379 too
    except OSError as e:
        raise ConfigError(f"{where}: cannot reach the Ray cluster at {address} ({e.strerror or e}); start it, "
                          "or leave the address empty for a local cluster") from None


def _job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the submitted job's runtime_env this driver runs in ({} outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local cluster on loopback.
    Returns whether this call started a local cluster (all the resources there will be)."""
    import ray
    import ray.data

    from raypath.console import LEVEL_ENV, level, quiet_ray

    started = False
    if not ray.is_initialized():
        check_address(address)
        # Before ray.init: Ray's own start-up lines and the log printer it sets up
        # in ray.init go through the filter too.
        quiet_ray()
        address = address or os.environ.get("RAY_ADDRESS")
        # Every worker process tags raypath's log lines, so the driver can show
        # them and leave Ray's own output in its log directory.
        runtime_env = {"worker_process_setup_hook": "raypath.console.setup_worker_logging"}
        if address:
            # Merged with the runtime_env of a submitted job (ray job submit). Workers of an
            # existing cluster do not inherit this process's environment: the log level travels
            # here, unless the job's runtime_env sets it (Ray refuses a key set twice).
            if LEVEL_ENV not in _job_env_vars():
                runtime_env["env_vars"] = {LEVEL_ENV: logging.getLevelName(level())}
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        else:
            # Workers of a local cluster inherit the driver's environment: silence
            # Ray Data's tqdm bars in Train/Tune workers too (they garble logs).
            os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
            # address="local": a new cluster even when another one was started on this
            # machine with `ray start` (ray.init() would attach to that one instead).
            ray.init(address="local", num_cpus=num_cpus or local_num_cpus(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", runtime_env=runtime_env)
            started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("ray cluster resources: %s", ray.cluster_resources())
    return started


#: CPUs a segment's Ray Data pipeline needs next to its Train workers: the stream's read and
#: file-info tasks take a whole CPU each outside the workers' placement group, so a cluster whose
#: CPUs the workers reserve to the last one hangs before the first step.
DATA_CPUS = 1.0


def _workers(train) -> int:
    """Train workers a segment starts with: an elastic group starts at its minimum."""
    return train.min_workers if 0 < train.min_workers < train.num_workers else train.num_workers


def check_workers_fit(train, local: bool) -> None:
    """The Train workers of a segment (``train``: :class:`raypath.config.TrainConfig`) and its data
    reads against the cluster's CPUs and GPUs. Ray Train waits for resources that never come
    without a word (and Ctrl-C does not end the wait): on a local cluster, all there is, that is a
    ConfigError; an existing cluster may autoscale, so there it is a warning."""
    import ray

    from raypath.config import ConfigError

    have = ray.cluster_resources()
    workers = _workers(train)
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need = workers * train.cpus_per_worker
    problems = []
    if need + DATA_CPUS > cpus:
        problems.append(f"train.num_workers: {workers} worker(s) x {train.cpus_per_worker:g} CPUs "
                        f"(train.cpus_per_worker) need {need:g} CPUs and Ray Data's reads {DATA_CPUS:g} more, "
                        f"the cluster has {cpus:g}")
    if train.use_gpu and workers > gpus:
        problems.append(f"train.use_gpu: {workers} worker(s) need a GPU each, the cluster has {gpus:g}")
    if problems and local:
        raise ConfigError("; ".join(problems) + " (a local cluster's CPUs: cluster.num_cpus)")
    for p in problems:
        log.warning("%s: training waits until the cluster has them (an autoscaling cluster adds nodes)", p)


def branches_fit_beside(train) -> bool:
    """Whether a branch can train beside the main path (``branch.parallel``). When both segments'
    workers fit the cluster's CPUs, both start, and if they leave less than :data:`DATA_CPUS` their
    data reads never run: both wait forever at their first step. (A branch that does not fit beside
    the main path waits for its CPUs instead, which is safe.)"""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = _workers(train) * train.cpus_per_worker
    if not 2 * need <= cpus < 2 * need + DATA_CPUS:
        return True
    log.warning("branch.parallel: a branch's %g CPUs beside the main path's %g would leave none of the cluster's "
                "%g to Ray Data's reads; each branch trains after its main segment instead", need, need, cpus)
    return False
