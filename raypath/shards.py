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
them (each its own shards, :func:`raypath.checkpoint.hash_share`), then DCP reads
into the target's own layout (FSDP shards at any world size, or full tensors
under DDP), so resuming across world sizes and between DDP and FSDP is just a
load. In a remote run directory a node downloads only its ranks' shares; the
slices its ranks read from other files come from the bucket (:class:`ShardReader`).
Under DDP every rank reads every tensor, so each node downloads the whole checkpoint
once instead (its ranks split the files), and nothing is read by range.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import pickle
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, FileSystemReader, FileSystemWriter

from raypath import checkpoint as ckpt
from raypath.console import Progress
from raypath.mirror import LOCAL, RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def app_state(model: torch.nn.Module, optim: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer state in the model's own layout (DTensor shards under FSDP), FQN keys;
    the model's only where ``optim`` is None (a weights-only checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optim is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def gather(obj: Any) -> list[Any]:
    """Collective: every rank's ``obj``, in rank order (``[obj]`` outside a process group)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_each_node(fn: Callable[[], T], node: tuple[int, int] | None) -> T:
    """Collective: ``fn()`` on each node's first worker (local rank 0), while the node's other
    workers wait for it; every worker gets its node's result.

    For what every worker of a node would otherwise do alike on the same files: readying a
    checkpoint, which downloads it from a bucket (each worker pulling its own copy, of which
    one is kept) and hashes it (12 bytes a parameter for a full one, every DDP worker loading
    all of it). Where ``fn`` raises on any node, every worker raises (its node's exception, else
    the first node's), so none goes on alone into the next collective.

    node: ``(node rank, local rank)``; None, or outside a process group: ``fn()`` here.
    """
    if node is None or not _distributed():
        return fn()
    node_rank, local_rank = node
    value, own, error = None, None, None
    if local_rank == 0:
        try:
            value = fn()
        except Exception as e:  # raised here after the gather, and on this node's workers and the others'
            own = error = e
            try:
                pickle.dumps(e)
            except Exception:  # an exception holding a lock, say: its type and message travel
                error = RuntimeError(f"{type(e).__name__}: {e}")
    parts = gather((node_rank, local_rank, value, error))
    if own is not None:
        raise own
    leaders = {n: (v, e) for n, lr, v, e in parts if lr == 0}
    if node_rank not in leaders:
        raise RuntimeError(f"node {node_rank} has no worker of local rank 0 in the group")
    value, error = leaders[node_rank]
    error = error or next((e for _, e in leaders.values() if e is not None), None)
    if error is not None:
        raise error
    return value


#: DCP's key prefix of the model's items (``app_state``'s "model" entry, flattened).
MODEL_KEY = "model."


class _ModelApartWriter(FileSystemWriter):
    """DCP's writer, but a rank's model items go to one file (``__<rank>_0.distcp``) and the rest
    (optimizer state) to another (``__<rank>_1.distcp``): a reader of the weights alone (an
    export) downloads and hashes the model's files, not the optimizer's, about twice their size."""

    def write_data(self, plan, planner):
        if not hasattr(self, "_write_data"):  # a torch whose writer changed: one file, as DCP's own
            return super().write_data(plan, planner)
        prefix, files = plan.storage_data.prefix, queue.Queue()
        model = [i for i in plan.items if i.index.fqn.startswith(MODEL_KEY)]
        rest = [i for i in plan.items if not i.index.fqn.startswith(MODEL_KEY)]
        for n, items in enumerate(b for b in (model, rest) if b):
            name = f"{prefix}{n}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)  # the parent's own write loop, given these files


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
        self.optimizer = True  # whether the save in flight holds the optimizer state

    def save(self, directory: str | Path, model: torch.nn.Module, optim: torch.optim.Optimizer | None,
             state: dict) -> None:
        """Start (async) or write (sync) the checkpoint of the current step into ``directory``;
        weights-only where ``optim`` is None."""
        self.wait()
        d = Path(directory)
        rngs = gather(ckpt.rng_state())
        if self.rank == 0:
            # A directory already here is a torn or quarantined earlier attempt at this step
            # (a resumed run never saves its start step again): start clean, in the bucket too,
            # where an upload skips a file of unchanged size and would keep the old one. Before
            # the barrier: no rank writes until it is gone.
            self.rd.remove(d)
            (d / ckpt.SHARDS).mkdir(parents=True)
            ckpt.write_sharded_meta(d, state, rngs)
        if _distributed():
            dist.barrier()
        sd = app_state(model, optim)
        self.optimizer = optim is not None
        if self.finisher is not None:
            written = dcp.async_save(sd, storage_writer=_ModelApartWriter(d / ckpt.SHARDS), process_group=self.group)
            self.pending = (self.finisher.submit(self._own_entries, d, written), d)
            return
        dcp.save(sd, storage_writer=_ModelApartWriter(d / ckpt.SHARDS))
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
        for part in gather(own):  # also the barrier: every rank has written
            entries.update(part)
        if self.rank == 0:
            ckpt.write_sharded_manifest(d, entries, self.optimizer)
            self.rd.publish(d / ckpt.MANIFEST)
            log.info("sharded checkpoint %s complete (%d files)", d, len(entries))


class _MirroredFiles(FileSystem):
    """DCP's local file access, except that a shard file this node does not hold (with the
    manifest's size) is opened in the remote run directory instead of downloaded."""

    def __init__(self, rd: RunDir, sizes: dict[Path, int]):
        self.rd, self.sizes = rd, sizes

    def remote(self, path: Path) -> bool:
        held = path.is_file() and path.stat().st_size == self.sizes.get(path, path.stat().st_size)
        return not held and self.rd.remote(path)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode != "rb" or not self.remote(Path(path)):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.rd.open_remote(path) as stream:
            yield stream


class _Ranges:
    """Ranged reads of remote files, issued ahead in the order they will be asked for: up to
    :attr:`window` bytes in flight on a few threads (a bucket's latency, not its bandwidth,
    bounds one request at a time). A read asked for out of that order is made on the spot."""

    window = 256 << 20

    def __init__(self, rd: RunDir, reads: list[tuple[Path, int, int]]):
        self.rd, self.reads, self.handles, self.lock = rd, collections.deque(reads), {}, threading.Lock()
        self.total = sum(r[2] for r in reads)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="raypath-ranges")
        self.ahead: collections.deque = collections.deque()
        self.bytes_ahead = 0
        self._fill()

    def _read(self, path: Path, offset: int, length: int) -> bytes:
        with self.lock:  # one handle per file: read_at is safe across threads
            if path not in self.handles:
                self.handles[path] = self.rd.open_remote(path)
        return self.handles[path].read_at(length, offset)

    def _fill(self) -> None:
        while self.reads and (not self.ahead or self.bytes_ahead < self.window):
            read = self.reads.popleft()
            self.ahead.append((read, self.pool.submit(self._read, *read)))
            self.bytes_ahead += read[2]

    def get(self, path: Path, offset: int, length: int) -> bytes:
        if self.ahead and self.ahead[0][0] == (path, offset, length):
            fut = self.ahead.popleft()[1]
            self.bytes_ahead -= length
            self._fill()
            return fut.result()
        return self._read(path, offset, length)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        for handle in self.handles.values():
            handle.close()


class ShardReader(FileSystemReader):
    """DCP reader of a checkpoint's ``shards/``: local files where this node holds them, else
    the remote run directory's, one ranged read per stored item (no file downloaded whole).

    A rank reads mostly its own shards (downloaded and hashed before the load), plus items
    of others': the replicated optimizer steps DCP stored once, or the shards its new
    slice overlaps after a resize. Those are what the ranged reads fetch, ahead (:class:`_Ranges`).
    """

    def __init__(self, directory: str | Path, rd: RunDir, files: dict[str, dict], progress: Progress | None = None):
        d = Path(directory)
        super().__init__(d / ckpt.SHARDS)
        self.fs = _MirroredFiles(rd, {d / rel: meta["size"] for rel, meta in files.items()})
        self.ranges: _Ranges | None = None
        self.ranged_bytes = 0
        self.progress = progress  # counts each item's stored bytes as it is read

    def read_data(self, plan, planner):
        # The order FileSystemReader reads in: per file (first appearance), the plan's order.
        per_file: dict[Path, list] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            per_file.setdefault(Path(self.path, info.relative_path), []).append(info)
        if self.progress is not None:
            self.progress.total = sum(i.length for infos in per_file.values() for i in infos)
        reads = [(p, i.offset, i.length) for p, infos in per_file.items() if self.fs.remote(p) for i in infos]
        self.ranges = _Ranges(self.fs.rd, reads)
        self.ranged_bytes += self.ranges.total
        try:
            return super().read_data(plan, planner)
        finally:
            self.ranges.close()

    def _slice_file(self, file, sinfo):
        if self.progress is not None:
            self.progress.add(sinfo.length)
        if isinstance(file, pa.NativeFile):  # remote: the item's bytes in one request
            return io.BytesIO(self.ranges.get(Path(self.path, sinfo.relative_path), sinfo.offset, sinfo.length))
        return super()._slice_file(file, sinfo)


def load_into(directory: str | Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
              rank: int, world: int, rd: RunDir = LOCAL, node: tuple[int, int] | None = None) -> int:
    """Collective: verify a sharded checkpoint (ranks split the hashing) and load it, resharded.
    Of a weights-only one only the model is loaded; ``optim`` keeps its fresh state.

    ``directory`` is readied by :func:`raypath.checkpoint.fetch`. A corrupted checkpoint is
    quarantined and :class:`~raypath.checkpoint.CheckpointError` raised on every rank: the
    worker group restarts from the newest good one. Returns the bytes this rank read from
    the bucket by range (0 in a local run directory).

    node: ``(local rank, local world size)`` when the target holds full replicas (DDP): every
    rank then reads every file, so in a remote run directory each node downloads the whole
    checkpoint once, its local ranks splitting the files, instead of each rank reading the
    files of other nodes' ranks by range (local ranks x the checkpoint per node).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    d = Path(directory)
    files = ckpt.sharded_files(d)
    share = ckpt.hash_share(files, *node) if node and rd.remote(d) else ckpt.hash_share(files, rank, world)
    errors = [e for e in gather(ckpt.verify_files(d, share, rd)) if e]
    if errors:
        if rank == 0:
            ckpt.quarantine(d, errors[0], rd)
        raise ckpt.CheckpointError(errors[0])
    weights_only = not ckpt.has_optimizer(d)
    sd = app_state(model, None if weights_only else optim)
    reader = ShardReader(d, rd, files)
    try:
        dcp.load(sd, storage_reader=reader)
    except CheckpointException as e:  # a BaseException: past Ray Train's pickling of worker errors too
        raise _own_failure(e) from None
    if weights_only:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if reader.ranged_bytes:
        log.info("rank %d: read %.1f MB of %s by range from the bucket", rank, reader.ranged_bytes / 2**20, d.name)
    return reader.ranged_bytes


def model_files(directory: str | Path, files: dict[str, dict], rd: RunDir = LOCAL) -> dict[str, dict]:
    """The entries of a sharded checkpoint's manifest ``files`` that hold model items: the shard
    files reading its model weights needs. DCP's metadata, which says where each item lies, is
    hashed first (it is unpickled). Of a checkpoint written with the optimizer state in the same
    files, that is all of them."""
    d = Path(directory)
    index = f"{ckpt.SHARDS}/.metadata"
    error = ckpt.verify_files(d, {index: files[index]}, rd) if index in files else f"{rd.name(d)}: {index} missing"
    if error:
        raise ckpt.CheckpointError(error)
    stored = FileSystemReader(d / ckpt.SHARDS).read_metadata().storage_data
    needed = {f"{ckpt.SHARDS}/{info.relative_path}" for item, info in stored.items() if item.fqn.startswith(MODEL_KEY)}
    return {rel: entry for rel, entry in files.items() if rel in needed}


def load_model_weights(directory: str | Path, model: torch.nn.Module, rd: RunDir = LOCAL) -> None:
    """In one process: a checkpoint's model weights (either layout) into a plain, unsharded model.

    Only the files holding the model's weights are downloaded (from a remote run directory)
    and hashed: of a full checkpoint ``model.pt``; of a sharded one the shard files with
    model items (:func:`model_files`), never the optimizer state, about twice the model.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    d = ckpt.fetch(directory, rd, model_only=True)  # a full checkpoint hashed here, a sharded one below
    # Minutes for billions of parameters in one process: a line with the bytes read, rate and ETA.
    progress = Progress(log, f"loading the model weights of {d}", 0, "B")
    if not ckpt.is_sharded(d):
        progress.total = (d / "model.pt").stat().st_size
        model.load_state_dict(ckpt.read_tensors(d / "model.pt", progress=progress))
        return
    files = ckpt.sharded_files(d)
    error = ckpt.verify_files(d, model_files(d, files, rd), rd)
    if error:
        raise ckpt.CheckpointError(error)
    sd = {"model": get_model_state_dict(model)}
    reader = ShardReader(d, rd, files, progress)
    try:
        with warnings.catch_warnings():  # torch warns of the single-process load that no_dist asks for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except CheckpointException as e:  # a BaseException: past every caller's `except Exception`
        raise _own_failure(e) from None
    set_model_state_dict(model, sd["model"])


def _own_failure(e: CheckpointException) -> BaseException:
    """What DCP failed on (the first failing rank's; in one process, its only rank): a missing or
    misshapen tensor is a RuntimeError or ValueError, as from ``load_state_dict``; its traceback
    is kept."""
    return next(iter(e.failures.values()))[0]
