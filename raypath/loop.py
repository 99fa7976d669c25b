"""The one training loop: a *segment* of a path (:mod:`raypath.segment`), on each Ray Train worker.

The main path of every version, every branch and every sweep trial runs this loop;
only the segment's steps, schedule and starting checkpoint differ.

The loop reads top to bottom: restore -> (accumulate micro-batches -> step ->
maybe log / eval / checkpoint) until ``end_step`` -> final eval -> export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from raypath import checkpoint as ckpt
from raypath import shards
from raypath.config import ModelConfig, TrainConfig
from raypath.console import fmt_eta
from raypath.data import Consumed, read_blocks
from raypath.loss import install_loss
from raypath.model import block_loss, build_model, checkpoint_tensors, compile_blocks, materialize
from raypath.perf import device_peak_flops, flops_per_token, mfu, peak_memory_bytes
from raypath.segment import Segment, resume_note, resume_point
from raypath.storage import end_line
from raypath.tracking import Tracker

log = logging.getLogger("raypath.progress")

#: A remote run directory's curve is re-uploaded whole (object stores do not append): at most this
#: often, plus at every evaluation, restart event, checkpoint and segment end. Uploading at
#: every log step would move O(lines^2) bytes over a segment, on rank 0's step path.
CURVE_PUBLISH_S = 30.0


def _dist() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _node() -> tuple[int, int]:
    """This worker's local rank and the number of workers on its node."""
    if not torch.distributed.is_initialized():
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_local_rank(), ctx.get_local_world_size()


def _placement() -> tuple[int, int] | None:
    """This worker's node rank and local rank (None outside a process group)."""
    if not torch.distributed.is_initialized():
        return None
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_node_rank(), ctx.get_local_rank()


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
    groups = [{"params": ps, **settings} for ps, settings in zip((decay, no_decay), _group_settings(t))]
    return torch.optim.AdamW(groups, lr=t.max_lr, fused=device.type == "cuda")


def _group_settings(t: TrainConfig) -> tuple[dict, dict]:
    """AdamW settings of the (decayed, not decayed) parameter groups."""
    return {"weight_decay": t.weight_decay, "betas": tuple(t.betas)}, {"weight_decay": 0.0, "betas": tuple(t.betas)}


def _apply_settings(optim: torch.optim.Optimizer, t: TrainConfig) -> None:
    """The config's AdamW settings over a restored optimizer's: loading an optimizer state
    restores the checkpoint's param_groups, which would silently keep the old
    ``train.weight_decay``/``train.betas`` while the lineage records the new ones."""
    for group, settings in zip(optim.param_groups, _group_settings(t)):
        # (betas come back from a sharded checkpoint as a list)
        changed = {k: (group[k], v) for k, v in settings.items()
                   if (tuple(group[k]) if isinstance(v, tuple) else group[k]) != v}
        if changed:
            log.info("optimizer settings from the config replace the checkpoint's: %s", changed)
        group.update(settings)


@dataclass
class Training:
    """What a worker trains with, built by :func:`build_training`.

    model: the module forward/backward runs through (DDP- or FSDP-wrapped,
        maybe compiled); raw_model: the transformers model underneath (under
        FSDP, sharded in place); optim: AdamW over ``raw_model``'s parameters.
    """

    model: torch.nn.Module
    raw_model: torch.nn.Module
    optim: torch.optim.Optimizer
    device: torch.device
    precision: str = "fp32"
    parallel: str = "ddp"

    def autocast(self):
        """bf16 autocast around forward passes (backward follows it); no-op in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def grad_sync(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on non-final micro-batches."""
        if sync:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if hasattr(self.raw_model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(self.raw_model)
        return contextlib.nullcontext()

    def state_dicts(self, optimizer: bool = True) -> tuple[dict, dict | None]:
        """Full (unsharded) model and optimizer state, optimizer keyed by param index (None
        where ``optimizer`` is False: a weights-only checkpoint).

        The full checkpoint layout (``train.parallel: ddp``). Under FSDP every
        rank must call this (it gathers); rank 0 gets the state, other ranks
        empty dicts: FSDP training saves sharded checkpoints instead
        (:mod:`raypath.shards`), this is the old gather-to-rank-0 path that
        ``benchmarks/checkpoint_save.py`` compares them with.
        """
        if self.parallel != "fsdp":
            return self.raw_model.state_dict(), self.optim.state_dict() if optimizer else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.raw_model, options=opts)
        if not optimizer:
            return model_sd, None
        optim_sd = get_optimizer_state_dict(self.raw_model, self.optim, options=opts)
        return model_sd, (_optim_to_index_keys(optim_sd) if optim_sd else {})

    def load_optim_state(self, optim_sd: dict) -> None:
        if self.parallel != "fsdp":
            self.optim.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {p: n for n, p in self.raw_model.named_parameters()}
        order = [names[p] for g in self.optim.param_groups for p in g["params"]]
        set_optimizer_state_dict(self.raw_model, self.optim, _optim_to_fqn_keys(optim_sd, order),
                                 options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _fsdp_no_sync(module: torch.nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _optim_to_index_keys(sd: dict) -> dict:
    """FQN-keyed optimizer state (torch.distributed.checkpoint) -> torch's index-keyed form."""
    index: dict[str, int] = {}
    groups = []
    for g in sd["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in sd["state"].items()}, "param_groups": groups}


def _optim_to_fqn_keys(sd: dict, order: list[str]) -> dict:
    """torch's index-keyed optimizer state -> FQN-keyed (``order``: FQN of each index)."""
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {order[int(k)]: v for k, v in sd["state"].items()}, "param_groups": groups}


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: shard every decoder block, then the rest (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise RuntimeError(f"train.parallel=fsdp: {type(model).__name__} has no model.layers to shard")
    # Autocast casts inside each op; FSDP keeps fp32 params and reduces fp32 gradients.
    kwargs = {"mp_policy": MixedPrecisionPolicy()}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def build_training(seg: Segment, device: torch.device, restored: dict | None = None,
                   world: int | None = None) -> Training:
    """Model and optimizer for ``seg`` on ``device``, as every worker builds them.

    Order matters: load full weights into the unsharded model, enable activation
    checkpointing, move to the device, wrap (DDP via Ray's ``prepare_model``, or
    FSDP2 ``fully_shard``), compile (per block, in place), *then* build the optimizer over the final
    parameters and load its state (so it lands on the device, sharded under FSDP).
    ``world`` defaults to the Ray Train world size; outside Ray Train pass 1.
    A sharded checkpoint (``restored["sharded"]``) is loaded last, collectively,
    into the final (maybe sharded) model and optimizer: DCP reshards it.
    """
    t = seg.train
    precision = t.precision
    parallel = t.parallel
    if world is None:
        world = _dist()[1]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    sharded = restored.get("sharded") if restored else None
    shard_here = parallel == "fsdp" and torch.distributed.is_initialized()
    if shard_here:  # built on meta, sharded, then filled one tensor at a time: never whole on a rank
        with torch.device("meta"):
            raw = build_model(_model_config(seg), seg.vocab_size, seg.eos_id, seg.pad_id, seg.seq_len,
                              weights=False)
    else:
        raw = build_model(_model_config(seg), seg.vocab_size, seg.eos_id, seg.pad_id, seg.seq_len,
                          weights=not restored)
        if restored and not sharded:
            raw.load_state_dict(restored["model"])
    install_loss(raw, t, device)  # before any wrapper: the loss runs inside the model's forward
    if t.activation_checkpointing:
        if hasattr(raw, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            raw.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            raw.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model: torch.nn.Module = raw
    if shard_here:
        _shard(raw)
        materialize(raw, device, _initial_weights(seg, restored))
    elif world > 1:
        import ray.train.torch

        raw.to(device)
        model = ray.train.torch.prepare_model(raw, move_to_device=device)
    else:
        raw.to(device)
        parallel = "ddp"  # one process, no process group: nothing to shard
    if t.compile:
        compile_blocks(raw)  # in place, per decoder block: the wrappers above stay outside
    training = Training(model, raw, _optimizer(raw, t, device), device, precision, parallel)
    if sharded:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        shards.load_into(sharded, raw, training.optim, rank, world, seg.rd, None if shard_here else _node())
    elif restored and restored["optim"] is not None:  # None: weights-only, nothing left to train
        training.load_optim_state(restored["optim"])
    if restored:
        _apply_settings(training.optim, t)
    return training


def _initial_weights(seg: Segment, restored: dict | None) -> Mapping[str, torch.Tensor] | None:
    """What a sharded build is filled from: a full checkpoint, the base model's files, or a fresh init.

    A sharded checkpoint is loaded afterwards by DCP; its fresh init is overwritten.
    """
    if restored and not restored.get("sharded"):
        return restored["model"]
    if seg.model.path and not restored:
        return checkpoint_tensors(_model_config(seg).path)
    return None


def _model_config(seg: Segment) -> ModelConfig:
    """``seg.model`` with ``path`` (a base model inside a remote run directory) fetched to this node."""
    if not seg.model.path:
        return seg.model
    return dataclasses.replace(seg.model, path=str(seg.rd.fetch(seg.model.path)))


def train_step(tr: Training, micro_batches: Iterable[torch.Tensor], accum: int, lr: float,
               grad_clip: float) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches of ``[micro, seq_len + 1]`` tokens.

    Returns the step's mean loss as a detached device tensor: no host sync here
    (``.item()`` would stall the GPU pipeline every micro-batch).
    """
    for group in tr.optim.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=tr.device)
    for i, blocks in enumerate(micro_batches):
        with tr.grad_sync(i == accum - 1):
            with tr.autocast():
                loss = block_loss(tr.model, blocks.to(tr.device, non_blocking=True)) / accum
            loss.backward()
        step_loss += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(tr.raw_model.parameters(), grad_clip)
    tr.optim.step()
    tr.optim.zero_grad(set_to_none=True)
    return step_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: dict[str, np.ndarray], micro: int,
             device: torch.device, rank: int, world: int,
             autocast: Callable[[], Any] = contextlib.nullcontext, lockstep: bool = False,
             prefix: str = "val") -> dict[str, float]:
    """Token-mean loss per split (``prefix/<name>``); each rank scores a slice, then all-reduce.

    lockstep: every rank runs the same number of forwards (FSDP gathers
    parameters collectively in each one); a rank with fewer blocks re-scores
    its first block with weight 0.
    """
    was_training = model.training
    model.eval()
    out = {}
    for name, blocks in val.items():
        mine = blocks[rank::world]
        total, count = 0.0, 0
        n = len(mine)
        if lockstep:
            n = math.ceil(math.ceil(len(blocks) / world) / micro) * micro
        for i in range(0, n, micro):
            part = mine[i:i + micro]
            weight = 1
            if len(part) == 0:
                part, weight = blocks[:1], 0
            batch = torch.from_numpy(part).long().to(device)
            with autocast():
                loss = block_loss(model, batch)
            total += loss.item() * batch.numel() * weight
            count += batch.numel() * weight
        total, count = _all_reduce_sum([total, count], device)
        out[f"{prefix}/{name}"] = total / max(count, 1)
    model.train(was_training)
    return out


def _time_due(since: float, minutes: float, device: torch.device) -> bool:
    """Collective: whether ``minutes`` have passed since ``since`` on any rank (all ranks agree)."""
    due = time.monotonic() - since >= minutes * 60
    return _all_reduce_sum([float(due)], device)[0] > 0


class _Reporter:
    """Rank 0's progress line and the segment's metrics curve (JSONL)."""

    def __init__(self, seg: Segment, rank: int, world: int, start_step: int,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 device: torch.device | None = None):
        self.seg, self.rank, self.world = seg, rank, world
        self.t_last = time.perf_counter()
        # The ETA's pace counts from the end of the first step: the start-up before it (the data
        # pipeline's, a compile) is no step's, and made a resumed segment's first ETA many times long.
        self.t0, self.first_step = None, start_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.device = device or torch.device("cpu")
        self.window_loss, self.window_steps, self.window_tokens, self.window_wait = 0.0, 0, 0, 0.0
        if rank == 0:  # continue the remote curve, whatever node ran the segment before
            end_line(seg.rd.fetch(seg.curves_path, missing_ok=True))
        self.tracker = Tracker.start(seg.tracking, seg, start_step) if rank == 0 else Tracker()
        self.published = time.monotonic()

    def event(self, name: str, **fields: Any) -> None:
        """A non-metric record (``event`` key) in the curve: restarts become visible."""
        if self.rank == 0:
            self._append({"event": name, **fields, "time": time.time()}, publish=True)

    def _append(self, record: dict, publish: bool = False) -> None:
        Path(self.seg.curves_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.seg.curves_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if publish or time.monotonic() - self.published >= CURVE_PUBLISH_S:
            self.publish()

    def publish(self) -> None:
        """Rank 0: upload the curve to a remote run directory (a no-op for a local one)."""
        if self.rank == 0 and Path(self.seg.curves_path).is_file():
            self.seg.rd.publish(self.seg.curves_path)
            self.tracker.publish()
            self.published = time.monotonic()

    def step(self, loss: float | torch.Tensor, tokens: int, data_wait: float) -> None:
        """``loss``: this rank's step loss; ranks are averaged at flush (one all-reduce per window)."""
        if self.t0 is None:
            self.t0, self.first_step = time.perf_counter(), self.first_step + 1
        self.window_loss = self.window_loss + (loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self.window_steps += 1
        self.window_tokens += tokens
        self.window_wait += data_wait

    def flush(self, step: int, lr: float, total_tokens: int, extra: dict[str, float],
              exclude_s: float = 0.0) -> dict[str, float]:
        """Report the window since the last flush; ``exclude_s``: time spent not training (eval)."""
        now = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "lr": lr, "tokens": total_tokens, "segment": self.seg.name,
                                   "world_size": self.world}
        # Every rank flushes at the same steps: this all-reduce is collective.
        window_loss = _all_reduce_sum([float(self.window_loss)], self.device)[0] / self.world
        now = time.perf_counter()  # after the all-reduce: it waited for the device to finish
        if self.window_steps:
            elapsed = max(now - self.t_last - exclude_s, 1e-9)
            metrics["loss"] = window_loss / self.window_steps
            metrics["tokens_per_s"] = self.window_tokens / elapsed
            metrics["tokens_per_s_per_worker"] = metrics["tokens_per_s"] / self.world
            metrics["data_wait_share"] = self.window_wait / elapsed
            if self.flops_per_token and self.peak_flops:
                metrics["mfu"] = mfu(metrics["tokens_per_s_per_worker"], self.flops_per_token, self.peak_flops)
            metrics["peak_memory_gb"] = peak_memory_bytes(self.device) / 1e9  # GPU allocated, or process RSS
        metrics.update(extra)
        if self.rank == 0:
            done = step - self.first_step
            rate = done / max(now - self.t0, 1e-9) if self.t0 is not None else 0.0
            eta = (self.seg.end_step - step) / rate if rate > 0 else float("inf")
            vals = " ".join(f"{k[4:]}={v:.3f}" for k, v in extra.items() if k.startswith("val/"))
            # A logger, not print: Train V2 tees print() into its logger, doubling lines.
            log.info(f"[{self.seg.name}] step {step}/{self.seg.end_step} "
                     f"loss {metrics.get('loss', float('nan')):.4f} lr {lr:.2e} "
                  f"{metrics.get('tokens_per_s', 0) / 1e3:.1f}k tok/s "
                  f"(data wait {metrics.get('data_wait_share', 0):.0%})"
                  + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                  + f" eta {fmt_eta(eta)} {vals}")
            self.tracker.log(metrics, step)  # first: the curve's upload takes the tracker's files along
            self._append(metrics, publish=bool(extra))
        self.window_loss, self.window_steps, self.window_tokens, self.window_wait = 0.0, 0, 0, 0.0
        self.t_last = now
        return metrics


def _export(tr: Training, seg: Segment, metrics: dict, rank: int, world: int) -> None:
    """Collective: the segment's model as a ``save_pretrained`` directory
    (:func:`raypath.export.save_from_ranks`). Under FSDP each rank writes its share of the
    weights: no rank gathers the whole model. DDP's ranks each hold all of it: one file, rank
    0's, as ``save_pretrained`` writes a model of this size."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from raypath.export import rank_shares, save_from_ranks

    with torch.device("meta"):  # the architecture and its configs, without weights
        plain = build_model(_model_config(seg), seg.vocab_size, seg.eos_id, seg.pad_id, seg.seq_len, weights=False)
    shares = rank_shares(plain, world if tr.parallel == "fsdp" else 1)
    save_from_ranks(Path(seg.export_dir), get_model_state_dict(tr.raw_model), plain, shares, rank, seg.rd,
                    seg.tokenizer_dir, {**seg.model_card, "final_metrics": metrics})


def train_segment(config: dict) -> None:
    """``train_loop_per_worker``: train ``config['segment']`` to its end step.

    The LR is a pure function of the global step (``seg.schedule``); everything else a
    step may do -- log, evaluate, checkpoint, report -- happens in :meth:`_SegmentRun.after_step`.
    """
    seg: Segment = config["segment"]
    with portable_errors():
        _train(seg)


def _train(seg: Segment) -> None:
    run = _SegmentRun.start(seg)
    while run.step < seg.end_step:
        lr = seg.schedule(run.step)
        loss = train_step(run.tr, run.feed.micro_batches(), run.accum, lr, seg.train.grad_clip)
        run.advance(loss)
        run.after_step(lr)
    run.finish()


class WorkerError(RuntimeError):
    """An exception a training worker raised that Ray could not send back as itself.

    Ray Train pickles a worker's exception to the driver. One that holds a lock, a CUDA
    stream or a compiler object (``torch.compile``'s backend failures do) fails to pickle,
    one whose ``__init__`` takes other arguments than its ``args`` fails to unpickle, and
    the driver then reports only that failure. This carries what the driver
    would otherwise lose: the original type, message and the worker's traceback, its
    chained causes included.
    """


@contextlib.contextmanager
def portable_errors():
    """Re-raise a worker exception that does not survive a pickle round trip as a :class:`WorkerError`."""
    try:
        yield
    except Exception as e:
        from ray import cloudpickle

        try:
            cloudpickle.loads(cloudpickle.dumps(e))
        except Exception:  # noqa: BLE001 - whatever makes it unpicklable, send its text instead
            raise WorkerError(f"{type(e).__module__}.{type(e).__qualname__}: {_describe(e)}\n\n"
                              f"worker traceback:\n{''.join(traceback.format_exception(e))}") from None
        raise


def _describe(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
        return f"<{type(e).__name__}: str() failed>"


class _Feed:
    """A worker's micro-batches from its dataset shard, with the time spent waiting for them and
    the stream rows they carried (``idx``), for the checkpoint's data position."""

    def __init__(self, micro: int, accum: int, device: torch.device):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        # Batches stay on the host: "idx" is bookkeeping read with .numpy(), and
        # train_step copies the tokens from pinned memory without blocking the host
        # (Ray's default device="auto" would put both on the GPU).
        self.batches = iter(shard.iter_torch_batches(batch_size=micro, drop_last=True, dtypes=torch.int64,
                                                     device="cpu", pin_memory=device.type == "cuda"))
        self.accum = accum
        self.wait = 0.0  # seconds the last step waited for data
        self.consumed = Consumed()  # rows this rank trained since the last checkpoint

    def micro_batches(self) -> Iterable[torch.Tensor]:
        """One optimizer step's ``accum`` micro-batches of tokens."""
        self.wait = 0.0
        for _ in range(self.accum):
            t_wait = time.perf_counter()
            batch = next(self.batches)
            self.wait += time.perf_counter() - t_wait
            self.consumed.add(batch["idx"].numpy())
            yield batch["tokens"]

    def take_consumed(self) -> Consumed:
        """Collective: every rank's rows since the last call, merged."""
        out, self.consumed = _gather_consumed(self.consumed), Consumed()
        return out


#: Periodic checkpoints a running branch keeps at most (``train.keep_checkpoints`` may keep fewer).
BRANCH_KEEPS = 2


class _Checkpoints:
    """When a segment checkpoints, and the sharded saver when it saves shards.

    Fork points and the boundary are what branches and later versions start from: they
    are always saved and never pruned; ``train.checkpoint_every`` adds periodic steps and
    ``train.checkpoint_every_minutes`` time-based ones.
    """

    def __init__(self, seg: Segment, rank: int, device: torch.device):
        t = seg.train
        self.seg, self.rank, self.device = seg, rank, device
        self.protected = set(seg.save_steps) | {seg.end_step}
        self.steps = set(self.protected)
        if t.checkpoint_every:
            self.steps |= set(range(seg.start_step + t.checkpoint_every, seg.end_step, t.checkpoint_every))
        sharded = t.parallel == "fsdp" or t.async_checkpoint
        self.saver = shards.ShardedSaver(rank, t.async_checkpoint, device, seg.rd) if sharded else None
        self.last_save = time.monotonic()

    def time_due(self) -> bool:
        """Collective: ``train.checkpoint_every_minutes`` passed since the last save (on any rank)."""
        minutes = self.seg.train.checkpoint_every_minutes
        return bool(minutes) and _time_due(self.last_save, minutes, self.device)

    def poll(self) -> None:
        """Collective: finish a completed async save, then prune older checkpoints."""
        if self.saver is not None and self.saver.poll() is not None and self.rank == 0:
            self.prune()

    def _branch_end(self, last: bool) -> bool:
        """The last step of a branch: nothing trains on from its checkpoint."""
        return last and self.seg.kind == "branch"

    def prune(self, last: bool = False) -> None:
        if self._branch_end(last):
            # A finished branch is read only through its final checkpoint (its record, release,
            # export, a sweep's records); the earlier ones existed to resume it. Each holds the
            # optimizer state too: a sweep would otherwise keep trials x periodic saves of it.
            ckpt.prune(self.seg.storage, 1, set(), self.seg.rd, why=f"{self.seg.name} finished")
        elif self.seg.kind == "branch":
            # Nothing forks from a branch: its periodic checkpoints exist to resume it, the newest
            # and, should that one be unreadable, the one before it (a sweep runs many at once).
            keep = min(self.seg.train.keep_checkpoints or BRANCH_KEEPS, BRANCH_KEEPS)
            ckpt.prune(self.seg.storage, keep, self.protected, self.seg.rd,
                       why=f"{self.seg.name} runs: a branch keeps its newest {keep}")
        else:
            ckpt.prune(self.seg.storage, self.seg.train.keep_checkpoints, self.protected, self.seg.rd)

    def save(self, tr: Training, step: int, state: dict, metrics: dict, last: bool) -> None:
        """Collective: checkpoint ``step`` and report ``metrics`` with it to Ray Train."""
        import ray.train

        # Weights-only (a third of the bytes) where nothing trains on: every trial of a sweep keeps it.
        optim = None if self._branch_end(last) else tr.optim
        if self.saver is not None:
            # Straight into the run's storage, not through Ray's upload: the manifest
            # must go last, after every rank's shards.
            self.saver.save(Path(self.seg.storage) / ckpt.step_dir_name(step), tr.raw_model, optim, state)
            if last:  # the boundary must be complete before the segment returns
                self.saver.wait()
            ray.train.report(metrics)
        else:
            model_sd, optim_sd = tr.state_dicts(optimizer=optim is not None)
            rngs = shards.gather(ckpt.rng_state())
            with tempfile.TemporaryDirectory() as tmp:
                if self.rank == 0:
                    ckpt.save(tmp, model_sd, optim_sd, state, rngs)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ckpt.step_dir_name(step))
            del model_sd, optim_sd
        if self.rank == 0 and (self.saver is None or self.saver.pending is None):
            self.prune(last)
        self.last_save = time.monotonic()

    def wait(self) -> None:
        """Collective: the last async save is written."""
        if self.saver is not None:
            self.saver.wait()


@dataclass
class _SegmentRun:
    """One worker's run of a segment: the state :func:`train_segment` advances step by step."""

    seg: Segment
    rank: int
    world: int
    device: torch.device
    tr: Training
    accum: int  # micro-batches per step: the global batch is fixed across world sizes
    step: int
    tokens: int
    consumed: Consumed  # stream rows trained by the path up to the last checkpoint
    metrics: dict  # the last report
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    checkpoints: _Checkpoints
    feed: _Feed
    reporter: _Reporter

    @classmethod
    def start(cls, seg: Segment) -> _SegmentRun:
        """Restore (or start) the segment on this worker: model, optimizer, RNG, data position."""
        import ray.train.torch

        t = seg.train
        rank, world = _dist()
        device = ray.train.torch.get_device()
        # One worker a node readies and hashes the checkpoint (downloaded, in a bucket); the
        # node's others load what it checked (mapped, shared in the page cache).
        start_dir, state = shards.on_each_node(lambda: resume_point(seg), _placement())
        restored = ckpt.load(start_dir, rd=seg.rd, fetched=True) if start_dir else None  # hashed by the choice
        # One seed for the init on every rank: FSDP materialises each rank's shards itself, so a
        # per-rank seed would make a model that is neither DDP's nor the same at another world size.
        torch.manual_seed(t.seed)
        tr = build_training(seg, device, restored, world)
        torch.manual_seed(t.seed + rank)
        if restored:
            ckpt.restore_rng(restored["rng"], rank)
        del restored
        step = int(state["step"])
        val = {name: read_blocks(seg.rd.fetch(p)) for name, p in seg.val_paths.items()}
        test = {name: read_blocks(seg.rd.fetch(p)) for name, p in seg.test_paths.items()}
        checkpoints = _Checkpoints(seg, rank, device)
        accum = t.global_batch_size // (t.micro_batch_size * world)
        feed = _Feed(t.micro_batch_size, accum, device)
        reporter = _Reporter(seg, rank, world, step, flops_per_token=flops_per_token(tr.raw_model.config, seg.seq_len),
                             peak_flops=device_peak_flops(device, t.peak_flops), device=device)
        reporter.event("start", step=step, world_size=world, checkpoint=start_dir)
        note = resume_note(seg, start_dir, state)
        if note and rank == 0:
            log.info(note)
        tr.model.train()
        return cls(seg, rank, world, device, tr, accum, step, int(state.get("tokens", 0)),
                   Consumed.from_list(state.get("consumed", [])), state.get("metrics", {}), val, test,
                   checkpoints, feed, reporter)

    def advance(self, loss: torch.Tensor) -> None:
        """Count the step just taken."""
        step_tokens = self.seg.train.global_batch_size * self.seg.seq_len
        self.step += 1
        self.tokens += step_tokens
        self.reporter.step(loss, step_tokens, self.feed.wait)

    def after_step(self, lr: float) -> None:
        """Log, evaluate, checkpoint and report, as far as this step is due for each.

        Every branch below is taken by all ranks alike (they are collectives).
        """
        t = self.seg.train
        last = self.step == self.seg.end_step
        do_eval = last or bool(t.eval_every and self.step % t.eval_every == 0)
        do_save = self.step in self.checkpoints.steps
        if not (do_eval or do_save or self.step % t.log_every == 0):
            return
        self.checkpoints.poll()
        do_save = do_save or self.checkpoints.time_due()
        t_eval = time.perf_counter()
        extra = self.evaluate(last) if do_eval else {}
        self.metrics = self.reporter.flush(self.step, lr, self.tokens, extra,
                                           exclude_s=time.perf_counter() - t_eval)
        if do_save:
            self.save(lr, last)
        elif do_eval:
            # Ray's result queue holds one report and its controller drains it every
            # 2 s: reporting every log step would stall training. Evals are rarer.
            import ray.train

            ray.train.report(self.metrics)
        else:
            return
        self.reporter.t_last = time.perf_counter()  # tokens/s measures training, not reporting or saving

    def evaluate(self, last: bool) -> dict[str, float]:
        """Validation losses (test ones too at the last step) and the weighted ``objective``."""
        fsdp = self.tr.parallel == "fsdp"
        args = (self.seg.train.micro_batch_size, self.device, self.rank, self.world, self.tr.autocast)
        # FSDP gathers parameters in every forward (lockstep); DDP's wrapper broadcasts buffers in
        # the first forward after training, which a rank without blocks would skip: a hang.
        model = self.tr.model if fsdp else self.tr.raw_model
        extra = evaluate(model, self.val, *args, lockstep=fsdp)
        if last and self.test:
            extra |= evaluate(model, self.test, *args, lockstep=fsdp, prefix="test")
        if extra and self.seg.objective_weights:
            extra["objective"] = sum(w * extra[f"val/{name}"] for name, w in self.seg.objective_weights.items())
        return extra

    def save(self, lr: float, last: bool) -> None:
        """Collective: checkpoint this step with the path's data position."""
        self.consumed.merge(self.feed.take_consumed())
        state = {"step": self.step, "tokens": self.tokens, "segment": self.seg.name, "version": self.seg.version,
                 "consumed": self.consumed.intervals, "lr": lr, "metrics": self.metrics,
                 "schedule": repr(self.seg.schedule)}
        self.reporter.publish()  # the curve up to the checkpoint, before it
        self.checkpoints.save(self.tr, self.step, state, self.metrics, last)

    def finish(self) -> None:
        """Wait for the last save, close tracking, export the model of a segment that exports one.

        After the loop, not inside it: a run resumed from its final checkpoint (crash
        between checkpoint and export) still exports.
        """
        self.checkpoints.wait()
        self.reporter.publish()
        self.reporter.tracker.close()
        if not self.seg.export_dir or self._skip_export():
            return
        _export(self.tr, self.seg, self.metrics, self.rank, self.world)

    def _skip_export(self) -> bool:
        """Collective: rank 0 asks ``seg.skip_export`` (one read of a sweep's record), all ranks agree."""
        why = self.seg.skip_export(self.metrics) if self.seg.skip_export and self.rank == 0 else None
        if why:
            log.info(f"[{self.seg.name}] not exporting its model: {why}")
        return _all_reduce_sum([float(bool(why))], self.device)[0] > 0


