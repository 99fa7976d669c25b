"""Experiment tracking: TensorBoard event files or MLflow runs laid out like the lineage.

The driver opens the lineage's tracking once (:func:`open_lineage`); the spec it
returns travels with every :class:`~raypath.segment.Segment` to the workers, where
rank 0 logs through a :class:`Tracker` at every log step and evaluation.

* **TensorBoard** (``tracking.backend: tensorboard``, the default): one event
  directory per segment under ``RUN_DIR/tb/`` (``main-v1``, ``branch-v1``, sweep
  trials ``branch-v2-<trial>``), every curve on the global step axis, so
  ``tensorboard --logdir RUN_DIR/tb`` overlays the main path and its branches.
* **MLflow** (``tracking.backend: mlflow``): one parent run per lineage, one child
  run (tag ``mlflow.parentRunId``) per main-path segment, branch and sweep trial.
  Re-running the lineage finds the same runs again (by tag) and continues them.
  The parent run's status is ``raypath run``'s: ``RUNNING`` while it runs, ``FINISHED``
  when it releases every version, ``FAILED``/``KILLED`` when it stops. A sweep logs its
  trials under it and leaves that status as it found it (unless it created the parent run).
  A release tags its branch's run and the parent with its path and logs a
  ``release-<version>.json`` artifact pointing to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from raypath.lineage import Release

from raypath.config import Config, ConfigError
from raypath.mirror import LOCAL, RunDir

log = logging.getLogger(__name__)

#: pip extra that provides each backend.
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: Tag naming the run directory on a lineage's parent run (how a re-run finds it).
RUN_DIR_TAG = "raypath.run_dir"
SEGMENT_TAG = "raypath.segment"
PARENT_TAG = "mlflow.parentRunId"
# MLflow accepts at most 100 params per request.
_PARAMS_PER_BATCH = 100


class TrackingError(ConfigError):
    """The tracking backend cannot be used (package missing, server unreachable)."""


@dataclass(frozen=True)
class TrackingSpec:
    """What a worker needs to log a segment; built on the driver by :func:`open_lineage`.

    backend: ``tensorboard`` or ``mlflow``.
    run_dir: the (local) run directory; TensorBoard writes under ``run_dir/tb``.
    params: the resolved config, flattened to ``section.field`` strings.
    mlflow_uri, experiment_id, parent_run_id: the lineage's MLflow parent run.
    created_parent: the parent run was created by this driver (nothing was logged under it before).
    """

    backend: str
    run_dir: str
    params: dict[str, str] = field(default_factory=dict)
    mlflow_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    created_parent: bool = False


def require(backend: str) -> None:
    """Raise a named :class:`TrackingError` when ``backend``'s package is not installed."""
    module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[backend]
    if importlib.util.find_spec(module) is None:
        raise TrackingError(f"tracking.backend: {backend} needs the {module!r} package: "
                            f"pip install 'raypath[{EXTRAS[backend]}]' (or set tracking.backend=none)")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"max_lr": 0.003}}`` -> ``{"train.max_lr": "0.003"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def mlflow_uri(cfg: Config, run_dir: Path) -> str:
    # MLflow 3 refuses a plain file store unless MLFLOW_ALLOW_FILE_STORE is set: a local
    # SQLite file is its own default backend.
    uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in cfg.run_dir:
        # The default file would live in one machine's mirror: workers on other nodes would each
        # open their own, and a resume on another machine would start a new lineage run.
        raise TrackingError(f"tracking.mlflow_uri: a run directory in a bucket ({cfg.run_dir}) needs an "
                            "MLflow tracking server (tracking.mlflow_uri or MLFLOW_TRACKING_URI); the default "
                            "SQLite file is one machine's")
    return mlflow_uri_default(run_dir)


def mlflow_uri_default(run_dir: Path) -> str:
    """The lineage's own SQLite file, when no tracking server is named."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def open_lineage(cfg: Config, run_dir: Path) -> TrackingSpec | None:
    """Check the backend, and for MLflow find or create the lineage's parent run (driver side)."""
    backend = cfg.tracking.backend
    if backend == "none":
        return None
    require(backend)
    params = flatten(cfg.to_dict())
    if backend == "tensorboard":
        return TrackingSpec("tensorboard", str(run_dir), params)
    uri = mlflow_uri(cfg, run_dir)
    experiment = cfg.tracking.experiment or cfg.name
    try:
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        # beside the default SQLite file (MLflow's default is ./mlruns of the working directory: a
        # Ray job's is a temporary copy, and a moved run directory would leave its artifacts behind)
        artifacts = (run_dir / "mlartifacts").resolve().as_uri() if uri == mlflow_uri_default(run_dir) else None
        exp_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifacts)
        # A remote run directory is the lineage's identity; the mirror path is per machine.
        where = cfg.run_dir if "://" in cfg.run_dir else str(run_dir.resolve())
        runs = client.search_runs([exp_id], f"tags.`{RUN_DIR_TAG}` = '{_quote(where)}'", max_results=1)
        created = not runs  # else a resumed or extended lineage: its parent run
        if runs:
            parent = runs[0].info.run_id
        else:
            parent = client.create_run(exp_id, run_name=cfg.name,
                                       tags={RUN_DIR_TAG: where, "raypath.kind": "lineage"}).info.run_id
            _log_params(client, parent, params)
    except Exception as e:  # any client error: connection refused, bad URI, permissions
        raise TrackingError(f"tracking.mlflow_uri: cannot use MLflow at {uri!r}: {e}") from e
    log.info("mlflow: experiment %r, lineage run %s at %s", experiment, parent, uri)
    return TrackingSpec("mlflow", str(run_dir), params, uri, exp_id, parent, created_parent=created)


def segment_tags(seg) -> dict[str, str]:
    """version, segment kind and (branches) fork step of a :class:`~raypath.segment.Segment`."""
    tags = {SEGMENT_TAG: seg.name, "raypath.version": seg.version, "raypath.kind": seg.kind}
    if seg.kind == "branch":
        tags["raypath.fork_step"] = str(seg.start_step)
    return tags


def segment_params(seg) -> dict[str, str]:
    """The segment's own settings (steps, LR schedule) next to the resolved config."""
    sched = dataclasses.asdict(seg.schedule) if dataclasses.is_dataclass(seg.schedule) else {}
    return flatten({"segment": {"start_step": seg.start_step, "end_step": seg.end_step, "schedule": sched}})


class Tracker:
    """Rank 0's tracking of one segment; a no-op without a spec."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric entries of ``metrics`` at global ``step``."""

    def publish(self) -> None:
        """Upload what was logged to a remote run directory (with the curve: a segment's
        history must not wait for its end, nor die with the machine)."""

    def close(self) -> None:
        """Flush and mark the segment finished."""

    @staticmethod
    def start(spec: TrackingSpec | None, seg, step: int | None = None) -> "Tracker":
        """The segment's tracker for an attempt that starts after ``step`` (default: the
        segment's start; a resume's checkpoint). A resumed attempt trains the steps after its
        checkpoint again: TensorBoard drops what a failed attempt logged from there on, as the
        curves do; MLflow cannot delete metric points, so its history holds both."""
        if spec is None:
            return Tracker()
        step = seg.start_step if step is None else step
        if spec.backend == "tensorboard":
            return _TensorBoard(spec, seg, step)
        return _MLflow(spec, seg)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard(Tracker):
    def __init__(self, spec: TrackingSpec, seg, step: int):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.seg = seg
        self.dir = Path(spec.run_dir) / "tb" / seg.name
        # Every attempt writes a session start at its first step: readers drop the events an
        # earlier attempt logged from there on (they purge at a second start, not the first).
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=step + 1)
        # Text summaries: TensorBoard's TEXT tab shows them next to the curves.
        self.writer.add_text("tags", _md_table(segment_tags(seg)), global_step=seg.start_step)
        self.writer.add_text("params", _md_table({**spec.params, **segment_params(seg)}),
                             global_step=seg.start_step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def publish(self) -> None:
        self.writer.flush()
        self.seg.rd.publish(self.dir)  # unchanged (earlier attempts') event files are skipped

    def close(self) -> None:
        self.writer.close()
        self.seg.rd.publish(self.dir)


class _MLflow(Tracker):
    def __init__(self, spec: TrackingSpec, seg):
        require("mlflow")
        self.client = _client(spec.mlflow_uri)
        self.run_id = find_or_create_child(self.client, spec, seg.name, segment_tags(seg),
                                           {**spec.params, **segment_params(seg)})
        self.client.update_run(self.run_id, status="RUNNING")  # a resumed segment runs again

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _numeric(metrics).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


@contextlib.contextmanager
def lineage_run(spec: TrackingSpec | None, owner: bool = True) -> Iterator[None]:
    """Around a ``raypath run`` (``owner``): the MLflow parent run is ``RUNNING`` in the block and
    ends ``FINISHED`` when it completes, ``KILLED`` on Ctrl-C, ``FAILED`` otherwise. Around a
    sweep (not ``owner``) the status stays as it was: the lineage's own run may be failed,
    finished or still running elsewhere; only a parent run the sweep created is the sweep's.
    TensorBoard has no run state."""
    owns = spec is not None and spec.backend == "mlflow" and (owner or spec.created_parent)
    if owns:
        _lineage_status(spec, "RUNNING")
    try:
        yield
    except BaseException as e:
        if owns:
            _lineage_status(spec, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if owns:
        _lineage_status(spec, "FINISHED")


def _lineage_status(spec: TrackingSpec, status: str) -> None:
    try:
        client = _client(spec.mlflow_uri)
        if status == "RUNNING":
            client.update_run(spec.parent_run_id, status=status)
        else:
            client.set_terminated(spec.parent_run_id, status)
    except Exception as e:  # the run's outcome stands whatever the tracking server says
        log.warning("mlflow: could not mark lineage run %s %s: %s", spec.parent_run_id, status, e)


def find_or_create_child(client, spec: TrackingSpec, name: str, tags: dict[str, str] | None = None,
                         params: dict[str, str] | None = None) -> str:
    """The lineage's child run named ``name``: the existing one (a resumed segment) or a new one."""
    runs = client.search_runs([spec.experiment_id], f"tags.`{PARENT_TAG}` = '{spec.parent_run_id}' "
                              f"and tags.`{SEGMENT_TAG}` = '{_quote(name)}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run_id = client.create_run(spec.experiment_id, run_name=name,
                               tags={PARENT_TAG: spec.parent_run_id, SEGMENT_TAG: name, **(tags or {})}).info.run_id
    _log_params(client, run_id, params or {})
    return run_id


def record_release(spec: TrackingSpec | None, release: Release, rd: RunDir = LOCAL) -> None:
    """Tag the release's branch run (and the lineage run) with its path (its URI in a remote run
    directory ``rd``: the mirror's path is one machine's); log a link artifact."""
    if spec is None:
        return
    version, path, branch = release.version, rd.name(release.path), release.branch
    if spec.backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(spec.run_dir) / "tb" / branch
        with SummaryWriter(log_dir=str(logdir)) as writer:
            writer.add_text(f"release/{version}", _md_table({"path": path, "branch": branch}))
        rd.publish(logdir)
        return
    client = _client(spec.mlflow_uri)
    run_id = find_or_create_child(client, spec, branch)
    link = {"version": version, "path": path, "uri": Path(path).resolve().as_uri() if "://" not in path else path,
            "branch": branch, "val": release.val}
    client.set_tag(run_id, "raypath.release", path)
    client.set_tag(spec.parent_run_id, f"raypath.release.{version}", path)
    client.log_dict(run_id, link, f"release-{version}.json")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _md_table(rows: dict[str, str]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())
