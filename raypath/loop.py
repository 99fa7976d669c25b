"""The one training loop: a *segment* of a path, run on Ray Train.

A segment is a stretch of optimizer steps ``[start_step, end_step)`` over one
version's stream with one LR schedule. The main path of version k is a segment
with the constant :class:`~raypath.schedules.MainPath`; a branch is a segment
that starts from a main-path checkpoint with a decaying
:class:`~raypath.schedules.Branch`. Same loop, same data code, same checkpoints.

The loop reads top to bottom: restore -> (accumulate micro-batches -> step ->
maybe log / eval / checkpoint) until ``end_step`` -> final eval -> export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypath import checkpoint as ckpt
from raypath.config import ModelConfig, TrainConfig
from raypath.data import Consumed, read_blocks, stream_dataset
from raypath.model import block_loss, build_model
from raypath.schedules import Schedule

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
    storage: this segment's Ray Train run directory (where its checkpoints land).
    curves_path: JSONL of reported metrics (rank 0 appends).
    export_dir: where a branch exports its released model (None for the main path).
    tokenizer_dir: tokenizer saved next to an exported model.
    model_card: lineage facts written into an exported model's ``model_card.json``.
    stream_limit: rows ``idx < stream_limit`` of the stream make up the version's
        whole global batches; the rest is never trained, by any path.
    objective_weights: val split name -> weight; when set, every eval also
        reports ``objective = sum(weight * val loss)`` (what a sweep minimises).
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
    export_dir: str | None = None
    tokenizer_dir: str | None = None
    stream_limit: int | None = None
    model_card: dict[str, Any] = field(default_factory=dict)
    objective_weights: dict[str, float] = field(default_factory=dict)


def resume_point(seg: Segment) -> tuple[str | None, dict]:
    """The checkpoint this segment continues from and its state (step, data position).

    Used by the workers *and* by the dataset factory on the controller, so both
    agree on which rows were already trained after any restart.
    """
    own = ckpt.latest_valid(seg.storage)
    if own is not None:
        return str(own), ckpt.load_state(own)
    if seg.init_checkpoint:
        state = ckpt.load_state(seg.init_checkpoint)
        if state.get("version") != seg.version:
            state = {**state, "consumed": []}  # a new version's stream starts untouched
        return seg.init_checkpoint, state
    return None, {"step": seg.start_step, "tokens": 0, "consumed": []}


def train_dataset(seg: Segment):
    """Zero-arg dataset factory: rebuilt on every worker-group (re)start."""
    return stream_dataset(seg.stream_path, resume_point(seg)[1].get("consumed"), seg.stream_limit)


# ---------------------------------------------------------------- worker side

def _dist() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _gather_consumed(local: Consumed) -> Consumed:
    if not torch.distributed.is_initialized():
        return local
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local.intervals)
    out = Consumed()
    for p in parts:
        out.merge(Consumed.from_list(p))
    return out


def _optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norms and biases hurts small models for no gain.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.max_lr, betas=tuple(t.betas), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: dict[str, np.ndarray], micro: int,
             device: torch.device, rank: int, world: int) -> dict[str, float]:
    """Token-mean loss per val split; each rank scores a slice, then all-reduce."""
    was_training = model.training
    model.eval()
    out = {}
    for name, blocks in val.items():
        mine = blocks[rank::world]
        total, count = 0.0, 0
        for i in range(0, len(mine), micro):
            batch = torch.from_numpy(mine[i:i + micro]).long().to(device)
            total += block_loss(model, batch).item() * batch.numel()
            count += batch.numel()
        total, count = _all_reduce_sum([total, count], device)
        out[f"val/{name}"] = total / max(count, 1)
    model.train(was_training)
    return out


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Reporter:
    """Rank 0's progress line and the segment's metrics curve (JSONL)."""

    def __init__(self, seg: Segment, rank: int, world: int, start_step: int):
        self.seg, self.rank, self.world = seg, rank, world
        self.t0 = self.t_last = time.perf_counter()
        self.first_step = start_step
        self.window_loss, self.window_steps, self.window_tokens, self.window_wait = 0.0, 0, 0, 0.0

    def step(self, loss: float, tokens: int, data_wait: float) -> None:
        self.window_loss += loss
        self.window_steps += 1
        self.window_tokens += tokens
        self.window_wait += data_wait

    def flush(self, step: int, lr: float, total_tokens: int, extra: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "lr": lr, "tokens": total_tokens, "segment": self.seg.name,
                                   "world_size": self.world}
        if self.window_steps:
            metrics["loss"] = self.window_loss / self.window_steps
            metrics["tokens_per_s"] = self.window_tokens / max(now - self.t_last, 1e-9)
            metrics["data_wait_share"] = self.window_wait / max(now - self.t_last, 1e-9)
        metrics.update(extra)
        if self.rank == 0:
            done = step - self.first_step
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.seg.end_step - step) / rate if rate > 0 else float("inf")
            vals = " ".join(f"{k[4:]}={v:.3f}" for k, v in extra.items() if k.startswith("val/"))
            # A logger, not print: Train V2 tees print() into its logger, doubling lines.
            log.info(f"[{self.seg.name}] step {step}/{self.seg.end_step} "
                  f"loss {metrics.get('loss', float('nan')):.4f} lr {lr:.2e} "
                  f"{metrics.get('tokens_per_s', 0) / 1e3:.1f}k tok/s "
                  f"(data wait {metrics.get('data_wait_share', 0):.0%}) eta {_fmt_eta(eta)} {vals}")
            Path(self.seg.curves_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.seg.curves_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.window_loss, self.window_steps, self.window_tokens, self.window_wait = 0.0, 0, 0, 0.0
        self.t_last = now
        return metrics


def _export(model: torch.nn.Module, seg: Segment, metrics: dict) -> None:
    from raypath.storage import atomic_dir, write_json
    from raypath.tokenizer import load_tokenizer

    with atomic_dir(seg.export_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(seg.tokenizer_dir).save_pretrained(tmp)
        write_json(tmp / "model_card.json", {**seg.model_card, "final_metrics": metrics})


def train_segment(config: dict) -> None:
    """``train_loop_per_worker``: train ``config['segment']`` to its end step."""
    import ray.train
    import ray.train.torch

    seg: Segment = config["segment"]
    t = seg.train
    rank, world = _dist()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed + rank)
    G = t.global_batch_size
    micro = t.micro_batch_size
    accum = G // (micro * world)  # global batch fixed across world sizes

    start_dir, state = resume_point(seg)
    model = build_model(seg.model, seg.vocab_size, seg.eos_id, seg.pad_id, seg.seq_len)
    optim = _optimizer(model, t, device)
    if start_dir:
        restored = ckpt.load(start_dir)
        model.load_state_dict(restored["model"])
        optim.load_state_dict(restored["optim"])
        torch.set_rng_state(restored["rng"]["torch"])
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    step, tokens = int(state["step"]), int(state.get("tokens", 0))
    consumed = Consumed.from_list(state.get("consumed", []))
    val = {name: read_blocks(p) for name, p in seg.val_paths.items()}
    save_steps = set(seg.save_steps) | {seg.end_step}
    if t.checkpoint_every:
        save_steps |= set(range(seg.start_step + t.checkpoint_every, seg.end_step, t.checkpoint_every))

    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=micro, drop_last=True, dtypes=torch.int64))
    reporter = _Reporter(seg, rank, world, step)
    local_consumed = Consumed()
    metrics: dict = state.get("metrics", {})
    model.train()
    while step < seg.end_step:
        lr = seg.schedule(step)
        for group in optim.param_groups:
            group["lr"] = lr
        step_loss, data_wait = 0.0, 0.0
        for i in range(accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_wait
            local_consumed.add(batch["idx"].numpy())
            sync = i == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = block_loss(model, batch["tokens"].to(device)) / accum
                loss.backward()
            step_loss += loss.item()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        step_tokens = G * seg.seq_len
        tokens += step_tokens
        reporter.step(_all_reduce_sum([step_loss], device)[0] / world, step_tokens, data_wait)

        last = step == seg.end_step
        do_eval = last or (t.eval_every and step % t.eval_every == 0)
        do_save = step in save_steps
        if not (do_eval or do_save or step % t.log_every == 0):
            continue
        extra = evaluate(model, val, micro, device, rank, world) if do_eval else {}
        if extra and seg.objective_weights:
            extra["objective"] = sum(w * extra[f"val/{name}"] for name, w in seg.objective_weights.items())
        metrics = reporter.flush(step, lr, tokens, extra)
        if not do_save:
            # Ray's result queue holds one report and its controller drains it every
            # 2 s: reporting every log step would stall training. Evals are rarer.
            if do_eval:
                ray.train.report(metrics)
            continue
        consumed.merge(_gather_consumed(local_consumed))
        local_consumed = Consumed()
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                ckpt.save(tmp, raw_model.state_dict(), optim.state_dict(), {
                    "step": step, "tokens": tokens, "segment": seg.name, "version": seg.version,
                    "consumed": consumed.intervals, "lr": lr, "metrics": metrics})
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ckpt.step_dir_name(step))
    # After the loop, not inside it: a run resumed from its final checkpoint
    # (crash between checkpoint and export) still exports.
    if seg.export_dir and rank == 0:
        _export(raw_model, seg, metrics)


# ---------------------------------------------------------------- driver side

def fit_segment(seg: Segment, callbacks: list | None = None):
    """Run one segment as a Ray Train job; re-running the same segment resumes it.

    callbacks: Ray Train callbacks, e.g. ``TuneReportCallback()`` when the segment
        runs as a Tune trial, so its reports become the trial's results.
    """
    import functools

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = seg.train
    ckpt.drop_stale_ray_snapshot(seg.storage)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    elastic = 0 < t.min_workers < t.num_workers
    workers = (t.min_workers, t.num_workers) if elastic else t.num_workers
    trainer = TorchTrainer(
        train_segment,
        train_loop_config={"segment": seg},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s),
        # Rebuilt on every worker-group (re)start, so a restart skips the rows
        # its checkpoint already trained.
        datasets={"train": functools.partial(train_dataset, seg)},
        run_config=RunConfig(name=seg.name, storage_path=str(Path(seg.storage).parent), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    return trainer.fit()
