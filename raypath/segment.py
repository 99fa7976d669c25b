"""A *segment* of a path, as the driver plans it and Ray Train runs it.

A segment is a stretch of optimizer steps ``[start_step, end_step)`` over one
version's stream with one LR schedule. The main path of version k is a segment
with the constant :class:`~raypath.schedules.MainPath`; a branch is a segment
that starts from a main-path checkpoint with a decaying
:class:`~raypath.schedules.Branch`. Same loop (:mod:`raypath.loop`, run on each
worker), same data code, same checkpoints.

This module is what runs off the workers: the driver builds the :class:`Segment` and
checks it against its checkpoints, and Ray Train's controller unpickles the segment, the
worker entry point and the dataset factory. None of that needs the model code: kept apart
from :mod:`raypath.loop`, the controller of every segment (main path, branch, sweep trial)
starts without importing transformers (and the parts of torch it pulls in), about 3 s of
its start-up, spent before it even requests the workers (``benchmarks/segment_start.py``).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raypath import checkpoint as ckpt
from raypath.config import ModelConfig, TrainConfig
from raypath.data import stream_dataset
from raypath.mirror import LOCAL, RunDir
from raypath.schedules import Schedule
from raypath.storage import RunFileError
from raypath.tracking import TrackingSpec

log = logging.getLogger("raypath.progress")


@dataclass
class Segment:
    """Everything one Ray Train run needs; built by the driver, pickled to workers.

    name: run name, e.g. ``main-v2`` or ``branch-v2``; also the Ray Train run name.
    kind: ``main`` or ``branch``.
    version: version name whose stream this segment trains on.
    stream_path: that version's ``stream.parquet``.
    start_step, end_step: global optimizer steps this segment covers.
    schedule: LR as a pure function of the global step.
    init_checkpoint: checkpoint to start from when the segment has none of its own.
    save_steps: steps after which to checkpoint (fork points, the boundary, periodic).
    val_paths: version name -> ``val.parquet`` evaluated during training.
    test_paths: version name -> held-out test split, evaluated once, at the last step
        (``test/<name>``): nothing that steers training or selection sees it.
    storage: this segment's Ray Train run directory (where its checkpoints land).
    curves_path: JSONL of reported metrics (rank 0 appends).
    export_dir: where a branch exports its released model (None for the main path).
    tokenizer_dir: tokenizer saved next to an exported model.
    model_card: lineage facts written into an exported model's ``model_card.json``.
    skip_export: called on rank 0 with the final metrics before the export: why not to export
        (a sweep would delete the model at once: :func:`raypath.sweep.beaten`), or None.
    stream_limit: rows ``idx < stream_limit`` of the stream make up the version's
        whole global batches; the rest is never trained, by any path.
    objective_weights: val split name -> weight; when set, every eval also
        reports ``objective = sum(weight * val loss)`` (what a sweep minimises).
    rd: the run directory the paths above lie in; for a remote one they are its local
        mirror's, fetched and published through it (:class:`raypath.mirror.RunDir`).
    tracking: where rank 0 also logs the metrics (:mod:`raypath.tracking`); None = curves only.
    """

    name: str
    kind: str
    version: str
    stream_path: str
    start_step: int
    end_step: int
    schedule: Schedule
    model: ModelConfig
    train: TrainConfig
    vocab_size: int
    eos_id: int
    pad_id: int | None
    seq_len: int
    storage: str
    curves_path: str
    init_checkpoint: str | None = None
    save_steps: tuple[int, ...] = ()
    val_paths: dict[str, str] = field(default_factory=dict)
    test_paths: dict[str, str] = field(default_factory=dict)
    export_dir: str | None = None
    tokenizer_dir: str | None = None
    stream_limit: int | None = None
    model_card: dict[str, Any] = field(default_factory=dict)
    objective_weights: dict[str, float] = field(default_factory=dict)
    rd: RunDir = LOCAL
    tracking: TrackingSpec | None = None
    skip_export: Callable[[dict], str | None] | None = None


@dataclass(frozen=True)
class FinalCheckpoint:
    """A finished segment's final checkpoint (verified) and what it recorded.

    path: the checkpoint directory (``step_<end_step>`` in the segment's storage).
    metrics: its last report (the final evaluation: ``val/*``, ``test/*``, ``loss``, ...).
    tokens_start, tokens_end: tokens the path had trained before the segment and at its end.
    """

    path: str
    metrics: dict[str, Any]
    tokens_start: int
    tokens_end: int

    @property
    def tokens_trained(self) -> int:
        return self.tokens_end - self.tokens_start

    def split(self, name: str) -> dict[str, float]:
        """The final losses on one kind of split: ``val`` or ``test`` (``name/<version>`` keys)."""
        return {k: v for k, v in self.metrics.items() if k.startswith(f"{name}/")}


def final_checkpoint(seg: Segment) -> FinalCheckpoint:
    """The final checkpoint of a finished ``seg`` (raises :class:`~raypath.checkpoint.CheckpointError`
    when it is missing or incomplete); the tokens before it come from ``seg.init_checkpoint`` (0 without).

    Only ``state.json``, what this reads, is hashed: every file must be there, and whoever loads the
    weights or the optimizer state (a fork, a resume, an export) hashes them first. A sweep's end
    reads every trial's final checkpoint, so hashing them all there cost trials x (weights + AdamW
    state): 12 bytes a parameter, ~6 s a trial of a 1B model at 2 GB/s."""
    final = Path(seg.storage) / ckpt.step_dir_name(seg.end_step)
    ckpt.verify(final, seg.rd, names=("state.json",))
    state = ckpt.load_state(final, seg.rd)
    start = ckpt.load_state(seg.init_checkpoint, seg.rd)["tokens"] if seg.init_checkpoint else 0
    return FinalCheckpoint(str(final), state["metrics"], start, state["tokens"])


@dataclass(frozen=True)
class Plan:
    """The part of a :class:`Segment` that :func:`check_plan` reads: what its checkpoints must continue.
    Built from the lineage record alone, it checks a resumed segment before Ray starts."""

    name: str
    storage: str
    schedule: Schedule
    save_steps: tuple[int, ...]
    rd: RunDir = LOCAL


def check_plan(seg: Segment | Plan, fork_note: str = "branch.fraction changed?") -> None:
    """On the driver, before a segment (re)starts: its newest checkpoint must continue this plan.

    A checkpoint records the schedule it was trained under: resuming a branch after its
    ``branch.shape`` was edited would record a decay that never ran. And the steps the plan
    saves (the fork point) that the checkpoint has passed must be there: a fork moved behind
    it (``branch.fraction`` raised) would never be written. Checkpoints saved before the schedule
    was recorded are only checked for the steps.
    fork_note: what moved a fork point, as far as the caller knows.
    """
    from raypath.config import ConfigError

    state, newest = _newest_state(seg)
    if state is None:
        return
    where = seg.rd.name(newest)
    again = f"re-run with the earlier settings, or delete {seg.rd.name(seg.storage)} to train {seg.name} again"
    if state.get("schedule", repr(seg.schedule)) != repr(seg.schedule):
        raise ConfigError(f"{seg.name}: {where} was trained under {state['schedule']}; the config now gives "
                          f"{seg.schedule!r}: {again}")
    for step in seg.save_steps:
        if step <= state["step"] and not _complete(seg, step):
            raise ConfigError(f"{seg.name}: {where} is past step {step}, which this plan checkpoints (a fork "
                              f"point: {fork_note}) but was never saved: {again}")


def _newest_state(seg: Segment | Plan) -> tuple[dict | None, Path | None]:
    """``state.json`` of the segment's newest complete checkpoint whose state reads back, and it.

    Only ``state.json`` is hashed (of a local full checkpoint; the workers hash the rest), and
    of a remote one nothing is downloaded but it: one torn or corrupted there is skipped, as
    :func:`raypath.checkpoint.latest_valid` skips it when the workers resume, instead of
    refusing the run over a checkpoint it never reads."""
    for d in reversed(ckpt.step_dirs(seg.storage, seg.rd)):
        if not _complete(seg, ckpt.step_of(d)):
            continue
        try:
            ckpt.verify(d, seg.rd, names=("state.json",))
            return ckpt.load_state(d, seg.rd), d
        except (ckpt.CheckpointError, RunFileError, ValueError, FileNotFoundError) as e:  # unread remotely
            ckpt.log.warning("skipping checkpoint: %s", e)
    return None, None


def _complete(seg: Segment | Plan, step: int) -> bool:
    try:
        ckpt.verify(Path(seg.storage) / ckpt.step_dir_name(step), seg.rd, deep=False)
        return True
    except (ckpt.CheckpointError, FileNotFoundError):
        return False


def resume_point(seg: Segment, hashed: bool = True) -> tuple[str | None, dict]:
    """The checkpoint this segment continues from and its state (step, data position).

    Chosen by the workers *and* by the dataset factory on the controller, so both agree on
    which rows were already trained after any restart.

    hashed=False: the controller's, which reads the data position only: the newest complete
        checkpoint whose ``state.json`` reads back (:func:`_newest_state`): no weights hashed,
        nothing downloaded but ``state.json`` (a full checkpoint is 12 bytes a parameter).
    hashed=True: the workers', readied on the caller's node and hashed
        (:func:`raypath.checkpoint.latest_valid`: in a remote run a full checkpoint is
        downloaded, of a sharded one only its metadata; the loading ranks hash its shards).
        The training loop calls it on each node's first worker, whose result the node's others
        take (:func:`raypath.shards.on_each_node`). Where the controller's choice fails that (a
        corrupted file is quarantined), the attempt fails: the restart that follows chooses
        again on both sides, without it.
    """
    state, own = _newest_state(seg)  # the controller's choice
    if hashed:
        chosen = own
        own = ckpt.latest_valid(seg.storage, seg.rd)
        if own != chosen:
            raise ckpt.CheckpointError(
                f"{seg.rd.name(chosen)}, the newest complete checkpoint of {seg.name}, failed this worker's checks "
                "(logged above) after the dataset took its data position: restarting the workers, which then "
                "choose alike")
        state = ckpt.load_state(own) if own is not None else None
    start = own
    if own is None and seg.init_checkpoint:
        start = ckpt.fetch(seg.init_checkpoint, seg.rd) if hashed else Path(seg.init_checkpoint)
        if not hashed:
            ckpt.verify(start, seg.rd, deep=False)
        state = ckpt.load_state(start, seg.rd)
        if state.get("version") != seg.version:
            state = {**state, "consumed": []}  # a new version's stream starts untouched
    if start is None:
        return None, {"step": seg.start_step, "tokens": 0, "consumed": []}
    if hashed:
        _check_trainable(seg, start, state)
    return str(start), state


def _check_trainable(seg: Segment, d: Path, state: dict) -> None:
    """Refuse a weights-only checkpoint ``d`` where steps are left to train from it."""
    if int(state["step"]) < seg.end_step and not ckpt.has_optimizer(d):
        raise ckpt.CheckpointError(
            f"{seg.rd.name(d)}: a weights-only checkpoint (a finished branch's final one) holds no optimizer "
            f"state; {seg.name} cannot train on from its step {state['step']} to {seg.end_step}")


def resume_note(seg: Segment, start_dir: str | None, state: dict) -> str | None:
    """The console line of a segment that continues from a checkpoint of its own (a re-run after
    Ctrl-C or a killed driver, or a worker-group restart): which one, and how much of the segment
    it had trained. None when it starts fresh or from another segment's checkpoint."""
    if not start_dir or state.get("segment") != seg.name:
        return None
    done, steps = int(state["step"]) - seg.start_step, seg.end_step - seg.start_step
    return (f"[{seg.name}] resuming from {seg.rd.name(start_dir)}: step {state['step']}, "
            f"{done} of its {steps} steps already trained")


def train_dataset(seg: Segment):
    """Zero-arg dataset factory: rebuilt on every worker-group (re)start."""
    path, filesystem = seg.rd.source(seg.stream_path)  # read tasks run on any node
    return stream_dataset(path, resume_point(seg, hashed=False)[1].get("consumed"), seg.stream_limit, filesystem)



def ordered_ingest():
    """Ray Train's ingest of a segment's stream, in stream order.

    Ray Train takes the ingest options (``preserve_order`` among them) from the DataContext
    of the process that *creates* the trainer, not from the one that builds the dataset
    (:func:`~raypath.data.stream_dataset` sets it there). A branch's trainer is created in a
    Ray task, whose DataContext is fresh: without this its rows arrive in whatever order
    the read tasks finish, and the same branch trains to different losses on each run.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def fit_segment(seg: Segment, callbacks: list | None = None):
    """Run one segment as a Ray Train job; re-running the same segment resumes it.

    callbacks: Ray Train callbacks, e.g. a sweep trial's (:class:`raypath.sweep._TuneRelay`),
        through which its reports become the trial's results.
    In a remote run directory Ray Train writes the checkpoints to the remote
    storage, and the driver's mirror gets the curve rank 0 wrote on its node.
    """
    check_plan(seg)
    ckpt.drop_stale_ray_snapshot(seg.storage, seg.rd)
    result = _fit_keeping_ctrl_c(trainer(seg, callbacks))
    seg.rd.fetch(seg.curves_path, missing_ok=True)
    return result


def trainer(seg: Segment, callbacks: list | None = None):
    """The Ray Train ``TorchTrainer`` of ``seg``: what its controller unpickles comes from this
    module (the worker entry, the segment, the dataset factory), not from :mod:`raypath.loop`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = seg.train
    storage_path, storage_fs = seg.rd.source(Path(seg.storage).parent)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    elastic = 0 < t.min_workers < t.num_workers
    workers = (t.min_workers, t.num_workers) if elastic else t.num_workers
    return TorchTrainer(
        _on_worker,
        train_loop_config={"segment": seg},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s),
        # Rebuilt on every worker-group (re)start, so a restart skips the rows
        # its checkpoint already trained.
        datasets={"train": functools.partial(train_dataset, seg)},
        dataset_config=ordered_ingest(),
        run_config=RunConfig(name=seg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             callbacks=[_failure_notice(seg.name, t.max_failures), *(callbacks or [])],
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )


def _failure_notice(name: str, max_failures: int):
    """A Ray Train callback on the controller: a line as soon as it finds a worker failed.

    Ray Train says nothing on the console between a worker's failure and the restarted group's
    first step (the new workers' start-up, the checkpoint's restore: tens of seconds, minutes on
    a big model), and its own notices stay in Ray's logs (:mod:`raypath.console`)."""
    from ray.train.v2.api.callback import UserCallback

    class FailureNotice(UserCallback):
        def __init__(self):
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            rank = min(worker_exceptions)
            error = worker_exceptions[rank]
            what = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
            if 0 <= max_failures < self.failures:
                then = f"train.max_failures={max_failures} reached: the segment fails"
            else:
                limit = "no limit" if max_failures < 0 else f"train.max_failures={max_failures}"
                then = (f"restarting the workers from the newest checkpoint (failure {self.failures}, "
                        f"{limit})")
            log.warning("[%s] worker rank %s failed (%s); %s", name, ranks, what, then)

    return FailureNotice()


def _fit_keeping_ctrl_c(trainer):
    """``trainer.fit()``, with Ctrl-C left to raypath: a KeyboardInterrupt here, as anywhere.

    On the main thread Ray Train replaces the SIGINT handler for good with one that aborts the
    run and calls ``sys.exit(0)`` (the process then ended with code 1 and no word). On another
    thread it registers none, as inside Tune, so fit runs on one. Its daemon thread dies with
    the process; Ray ends the run's actors, which this driver owns, when it exits."""
    done: dict[str, Any] = {}

    def fit() -> None:
        try:
            done["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 -- re-raised on the caller's thread
            done["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a bounded wait: the main thread takes the KeyboardInterrupt
    if "error" in done:
        raise done["error"]
    return done["result"]


def _on_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: :func:`raypath.loop.train_segment`, imported on the
    worker (pickled by reference from here, the controller does not import the loop)."""
    from raypath.loop import train_segment

    train_segment(config)
