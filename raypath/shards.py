"""Sharded checkpoints on the workers, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes only the shards it holds (FSDP) or its share of the
de-duplicated replicas (DDP): no rank ever holds the whole model and optimizer
state, so host memory during a save stays at one rank's share. The protocol
keeps the complete-or-absent guarantee of :mod:`raypath.checkpoint`:

1. rank 0 writes ``state.json`` and ``rng.pt``; all ranks write their shards
   (``dcp.save``, or ``dcp.async_save`` which copies the state to host memory
   and writes it from a background thread while training goes on);
2. each rank hashes (and, for a remote run directory, uploads) its own files as
   soon as they are written: on that background thread too when saving async;
3. once every rank is done, the hashes are gathered to rank 0 (a few hundred
   bytes per rank), which writes the manifest, last. Until then the checkpoint
   does not count.

Loading is collective too: the ranks split the hashing of the files between
them, then DCP reads into the target's own layout (FSDP shards at any world
size, or full tensors under DDP), so resuming across world sizes and between
DDP and FSDP is just a load.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from raypath import checkpoint as ckpt
from raypath.mirror import LOCAL, RunDir

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def app_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state in the model's own layout (DTensor shards under FSDP), FQN keys."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def _gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardedSaver:
    """Writes sharded checkpoints for one worker; at most one asynchronous save in flight.

    asynchronous: ``dcp.async_save`` on a dedicated gloo group (its background
        collectives must not interleave with training's); otherwise ``dcp.save``.
    device: where the training collectives run (for :meth:`poll`'s all-reduce).
    rd: the run directory the checkpoints belong to (each rank uploads its files to a remote one).
    """

    def __init__(self, rank: int, asynchronous: bool, device: torch.device, rd: RunDir = LOCAL):
        self.rank, self.asynchronous, self.device, self.rd = rank, asynchronous, device, rd
        self.group = dist.new_group(backend="gloo") if asynchronous and _distributed() else None
        # Hashing and uploading a rank's files takes as long as writing them: off the
        # training thread too, chained after DCP's own background write.
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="raypath-ckpt") if asynchronous else None
        self.pending: tuple[Future, Path] | None = None

    def save(self, directory: str | Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
             state: dict) -> None:
        """Start (async) or write (sync) the checkpoint of the current step into ``directory``."""
        self.wait()
        d = Path(directory)
        if self.rank == 0:
            # A directory already here is a torn earlier attempt at this step (a
            # resumed run never saves its start step again): start clean.
            shutil.rmtree(d, ignore_errors=True)
            (d / ckpt.SHARDS).mkdir(parents=True)
            ckpt.write_sharded_meta(d, state)
        if _distributed():
            dist.barrier()
        sd = app_state(model, optim)
        if self.finisher is not None:
            written = dcp.async_save(sd, checkpoint_id=str(d / ckpt.SHARDS), process_group=self.group)
            self.pending = (self.finisher.submit(self._own_entries, d, written), d)
            return
        dcp.save(sd, checkpoint_id=str(d / ckpt.SHARDS))
        self._finish(d, self._own_entries(d))

    def poll(self) -> Path | None:
        """Collective: finish the pending save if every rank's write is done; returns its directory."""
        if self.pending is None:
            return None
        done = torch.tensor([float(self.pending[0].done())], device=self.device)
        if _distributed():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Collective: block until the pending save is written, then finish it."""
        if self.pending is None:
            return None
        entries, d = self.pending
        self.pending = None
        self._finish(d, entries.result())
        return d

    def _own_entries(self, d: Path, written: Future | None = None) -> dict[str, dict]:
        """This rank's files of checkpoint ``d``, published, with their manifest entries."""
        if written is not None:
            written.result()
        own = ckpt.shard_files(d / ckpt.SHARDS, self.rank)
        if self.rank == 0:
            own += [d / "rng.pt", d / "state.json", d / ckpt.SHARDS / ".metadata"]
        for f in own:
            self.rd.publish(f)
        return ckpt.file_entries(d, own)

    def _finish(self, d: Path, own: dict[str, dict]) -> None:
        entries: dict[str, dict] = {}
        for part in _gather(own):  # also the barrier: every rank has written
            entries.update(part)
        if self.rank == 0:
            ckpt.write_sharded_manifest(d, entries)
            self.rd.publish(d / ckpt.MANIFEST)
            log.info("sharded checkpoint %s complete (%d files)", d, len(entries))


def load_into(directory: str | Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
              rank: int, world: int, rd: RunDir = LOCAL) -> None:
    """Collective: verify a sharded checkpoint (ranks split the hashing) and load it, resharded.

    A corrupted checkpoint is quarantined and :class:`~raypath.checkpoint.CheckpointError`
    raised on every rank: the worker group restarts from the newest good one.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    d = Path(directory)
    errors = [e for e in _gather(ckpt.verify_share(d, rank, world)) if e]
    if errors:
        if rank == 0:
            ckpt.quarantine(d, errors[0], rd)
        raise ckpt.CheckpointError(errors[0])
    sd = app_state(model, optim)
    dcp.load(sd, checkpoint_id=str(d / ckpt.SHARDS))
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def load_model_weights(directory: str | Path, model: torch.nn.Module) -> None:
    """In one process: a checkpoint's model weights (either layout) into a plain, unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    d = Path(directory)
    ckpt.verify(d, deep=True)
    if not ckpt.is_sharded(d):
        # The model file only: the optimizer state (twice the model's size) is not needed here.
        model.load_state_dict(ckpt.read_tensors(d / "model.pt"))
        return
    sd = {"model": get_model_state_dict(model)}
    dcp.load(sd, checkpoint_id=str(d / ckpt.SHARDS), no_dist=True)
    set_model_state_dict(model, sd["model"])
