"""Training checkpoints: complete-or-absent, verified on load, ``weights_only``.

Two layouts, told apart by the manifest:

* **full** (``train.parallel: ddp``): ``model.pt``, ``optim.pt`` (the whole
  state, written by rank 0), ``state.json`` (step, tokens, data position,
  schedule name), ``rng.pt`` (every rank's random generators), and last of all
  ``manifest.json`` with each file's sha256.
* **sharded** (``train.parallel: fsdp``): ``shards/`` is a
  ``torch.distributed.checkpoint`` (DCP) directory where every rank wrote its
  own shards (nothing gathers the full state), those of the model in one file
  (``__<rank>_0.distcp``) and of the optimizer in another (``__<rank>_1.distcp``:
  an export downloads and hashes the model's only), plus ``state.json`` and
  ``rng.pt``. Once every rank has written and hashed its files, rank 0 writes
  ``manifest.json`` (``format: sharded``, each file's size and sha256) last.
  DCP reshards on load, so a sharded checkpoint resumes at any world size,
  under FSDP or DDP.

Either layout may be **weights-only**: no optimizer state (no ``optim.pt``, no
``__<rank>_1.distcp``; a sharded manifest says ``"optimizer": false``). A finished
branch's final checkpoint is one: nothing trains on from it (its record, export and
release read the weights), and AdamW's two moments are twice the model. It loads
only where no step is left to train (:func:`has_optimizer`).

A directory without a manifest, or whose files do not match it, is torn:
:func:`load` refuses it and :func:`latest_valid` skips it, so a crash mid-write
can only cost the newest checkpoint, never corrupt a run. Full checkpoints are
hashed whole by :func:`latest_valid`, once a node: the training loop chooses on each
node's first worker, the node's others waiting for it (:func:`raypath.shards.on_each_node`),
then all load what it checked (mapped: :func:`read_tensors`). A sharded one is checked there for
presence and sizes, and hashed at load, each rank hashing a share of the files
(:func:`hash_share`, :func:`verify_files`); a corrupted one is quarantined (its
manifest renamed), so the restart that follows skips it.

In a remote run directory (:class:`raypath.mirror.RunDir`) checkpoints are
uploaded as they are written; the functions taking the run directory ``rd`` list
and read them there, and :func:`fetch` readies one on the node that loads it. A
full checkpoint is downloaded whole (every rank loads all of it) and hashed after
the download, by the node's first worker. Of a sharded one a node downloads only the manifest and rank 0's
small files (:data:`SHARDED_META`), then its ranks' hash shares: at the world size
of the save, the shards they wrote themselves, which hold what they read. Anything
else a rank reads (a replicated optimizer step, another rank's slice after a
resize) is read from the bucket by byte range (:class:`raypath.shards.ShardReader`),
so a node's download grows with its ranks' shards, not with the model. The driver and
the Train controller, which need only ``state.json`` (either layout), read it in place
(:func:`raypath.segment.resume_point`). Without ``rd`` the files are plain local ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from raypath.console import Progress
from raypath.mirror import LOCAL, RunDir
from raypath.storage import in_threads, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FILES = ("model.pt", "optim.pt", "rng.pt", "state.json")
OPTIM = "optim.pt"
#: A weights-only full checkpoint's files (:func:`save` without optimizer state).
WEIGHTS_FILES = tuple(f for f in FILES if f != OPTIM)
#: What reading a full checkpoint's model weights needs of it (an export): no optimizer state.
MODEL_FILES = ("model.pt", "state.json")
MANIFEST = "manifest.json"
#: DCP directory of a sharded checkpoint, and the manifest's ``format`` value for one.
SHARDS = "shards"
SHARDED = "sharded"
#: Rank 0's small files of a sharded checkpoint: every node that opens one pulls them.
SHARDED_META = ("state.json", "rng.pt", f"{SHARDS}/.metadata")
#: DCP's file names: ``__<rank>_<n>.distcp`` (``FileSystemWriter``).
_RANK_FILE = re.compile(rf"{SHARDS}/__(\d+)_\d+\.distcp")


class CheckpointError(RuntimeError):
    pass


class ChecksumError(CheckpointError):
    """A file does not match its manifest's sha256: the checkpoint is complete, and corrupted."""


def _save_tensor_file(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU's and, once CUDA is in use, the current device's."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _rng_file(ranks: list[dict] | None) -> dict:
    # "torch" stays rank 0's CPU state: what checkpoints held before they kept every rank's.
    ranks = ranks or [rng_state()]
    return {"torch": ranks[0]["torch"], "ranks": ranks}


def restore_rng(rng: dict, rank: int) -> bool:
    """Set this rank's generators from a checkpoint's ``rng.pt`` (dropout masks continue as if
    uninterrupted). False where it holds none for ``rank``: a world grown since the save, or a
    checkpoint that kept rank 0's CPU state only; the rank keeps its seeded generators."""
    ranks = rng.get("ranks")
    own = ranks[rank] if ranks is not None and rank < len(ranks) else rng if ranks is None and rank == 0 else None
    if own is None:
        return False
    torch.set_rng_state(own["torch"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])
    return True


def save(directory: str | Path, model_state: dict, optim_state: dict | None, state: dict,
         rngs: list[dict] | None = None) -> Path:
    """Write a checkpoint into ``directory`` (created); the manifest goes last.

    optim_state: None writes a weights-only checkpoint.
    rngs: every rank's :func:`rng_state`, in rank order (default: this process's only).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _save_tensor_file(model_state, d / "model.pt")
    if optim_state is not None:
        _save_tensor_file(optim_state, d / OPTIM)
    _save_tensor_file(_rng_file(rngs), d / "rng.pt")
    write_json(d / "state.json", state)
    files = FILES if optim_state is not None else WEIGHTS_FILES
    write_json(d / MANIFEST, dict(zip(files, in_threads(lambda f: sha256_file(d / f), list(files)))))
    return d


def _full_files(manifest: dict) -> tuple[str, ...]:
    """The files a full checkpoint's manifest requires: all, or a weights-only one's."""
    return FILES if OPTIM in manifest else WEIGHTS_FILES


def has_optimizer(directory: str | Path) -> bool:
    """Whether a (local, fetched) checkpoint holds optimizer state: training can continue from it."""
    manifest = _local_manifest(Path(directory))
    if manifest.get("format") == SHARDED:
        return manifest.get("optimizer", True) is not False
    return OPTIM in manifest


def verify(directory: str | Path, rd: RunDir = LOCAL, deep: bool | None = None,
           names: tuple[str, ...] = FILES) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint is complete and intact.

    For a checkpoint in a remote run directory ``rd`` this checks that the manifest and every
    file (with its size, for a sharded one) were uploaded, without downloading them: their
    checksums are verified on the node that downloads them to load them.
    deep: hash every file; False: presence (and sizes, where the manifest has them)
        only; None (default): hash a full checkpoint, but not a sharded one, whose
        size grows with the model: the ranks that load it hash it (:func:`hash_share`).
    names: the files of a full checkpoint to hash (all must be present): :data:`MODEL_FILES`
        where only the model's weights are read.
    """
    d = Path(directory)
    if rd.remote(d):
        _verify_uploaded(d, rd)
        return
    expected = _local_manifest(d)
    if expected.get("format") == SHARDED:
        files = _sharded_files(str(d), expected)
        _check_sizes(str(d), files, {rel: (d / rel).stat().st_size for rel in files if (d / rel).is_file()})
        if deep:
            progress = _hashing(str(d), sum(m["size"] for m in files.values()))
            in_threads(lambda rel: _check_hash(d, rel, files[rel]["sha256"], progress=progress), list(files))
        return
    required = _full_files(expected)
    for name in required:
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: {name} missing")
    if deep is not False:  # the weights and the optimizer state at once: each hash holds a core
        hashed = [n for n in required if n in names]
        progress = _hashing(str(d), sum((d / n).stat().st_size for n in hashed))
        in_threads(lambda name: _check_hash(d, name, expected.get(name), progress=progress), hashed)


def _local_manifest(d: Path) -> dict:
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (checkpoint incomplete or torn)")
    try:
        expected = read_json(d / MANIFEST)
    except ValueError:  # a torn or hand-edited manifest is a torn checkpoint
        raise CheckpointError(f"{d}: {MANIFEST} is not valid JSON (checkpoint incomplete or torn)") from None
    return _mapping(str(d), expected)


def _mapping(where: str, manifest: Any) -> dict:
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: {MANIFEST} is not a mapping of file checksums")
    return manifest


def _hashing(where: str, size: int) -> Progress:
    """Hashing a checkpoint reads all of it (minutes for billions of parameters, before a resume or
    an export can start): a progress line every :data:`raypath.console.PROGRESS_EVERY_S` while it lasts."""
    return Progress(log, f"verifying the checksums of {where}", size, "B")


def _check_hash(d: Path, rel: str, expected: str | None, where: str | None = None,
                progress: Progress | None = None) -> None:
    if sha256_file(d / rel, progress=progress) != expected:
        raise ChecksumError(f"{where or d}: {rel} does not match its checksum (corrupted)")


def _sharded_files(where: str, manifest: dict) -> dict[str, dict]:
    """A sharded manifest's ``files``: ``{relative path: {"size": int, "sha256": str}}``."""
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
        for m in files.values())
    if not ok:  # hand-edited or written by something else: as good as torn
        raise CheckpointError(f"{where}: {MANIFEST} of a sharded checkpoint needs \"files\": "
                              "{path: {\"size\": bytes, \"sha256\": hex}} (checkpoint incomplete or torn)")
    return files


def _check_sizes(where: str, files: dict[str, dict], present: dict[str, int]) -> None:
    """Every file of a sharded manifest is ``present`` (relative path -> bytes) with its size."""
    for rel, meta in files.items():
        if rel not in present:
            raise CheckpointError(f"{where}: {rel} missing")
        if present[rel] != meta["size"]:
            raise CheckpointError(f"{where}: {rel} has {present[rel]} bytes, the manifest says {meta['size']} (torn)")


def is_sharded(directory: str | Path) -> bool:
    """Whether a (local, verified) checkpoint has the sharded layout."""
    return read_json(Path(directory) / MANIFEST).get("format") == SHARDED


def sharded_files(directory: str | Path) -> dict[str, dict]:
    """The files of a (local, fetched) sharded checkpoint's manifest: ``{path: {"size", "sha256"}}``."""
    d = Path(directory)
    return _sharded_files(str(d), _local_manifest(d))


def hash_share(files: dict[str, dict], rank: int, world: int) -> dict[str, dict]:
    """The files of a sharded checkpoint that rank ``rank`` of ``world`` hashes on load.

    Each file is hashed by exactly one rank. A rank that wrote shards hashes its own:
    at the world size of the save those are what it reads, so in a remote run
    directory the one download serves both. The rest (rank 0's small files, the
    shards of ranks beyond ``world`` after a shrink) are dealt out in turn.
    """
    def writer(rel: str) -> int | None:
        m = _RANK_FILE.fullmatch(rel)
        return int(m[1]) if m and int(m[1]) < world else None

    rest = [rel for rel in sorted(files) if writer(rel) is None]
    mine = {rel for rel in files if writer(rel) == rank} | set(rest[rank::world])
    return {rel: files[rel] for rel in sorted(mine)}


def verify_files(directory: str | Path, files: dict[str, dict], rd: RunDir = LOCAL) -> str | None:
    """Hash ``files`` (part of a sharded checkpoint's manifest) as this node will read them.

    In a remote run directory each is downloaded first unless this node holds it
    with the manifest's size, and a local copy that fails its hash is downloaded
    once more (it, not the bucket's, may be the bad one). Returns the error, or
    None; callers agree on the outcome collectively (:func:`quarantine` the
    checkpoint when any rank found one).
    """
    d = Path(directory)
    progress = _hashing(rd.name(d), sum(m["size"] for m in files.values()))

    def check(rel: str) -> str | None:
        for last in (False, True) if rd.remote(d) else (True,):
            try:
                f = rd.fetch(d / rel)
                _check_sizes(rd.name(d), {rel: files[rel]}, {rel: f.stat().st_size} if f.is_file() else {})
                _check_hash(d, rel, files[rel]["sha256"], rd.name(d), progress)
                return None
            except (CheckpointError, FileNotFoundError) as e:
                if last:
                    return str(e)
                (d / rel).unlink(missing_ok=True)
        return None

    return next((e for e in in_threads(check, list(files)) if e), None)


def quarantine(directory: str | Path, reason: str, rd: RunDir = LOCAL) -> None:
    """Make :func:`latest_valid` skip a corrupted checkpoint: its manifest is renamed, nothing deleted."""
    d = Path(directory)
    log.error("quarantining checkpoint %s: %s", d, reason)
    # Every rank (and the controller) may find the same checkpoint bad at once: the first one renames
    # or deletes the manifest, and the others find it gone.
    with contextlib.suppress(FileNotFoundError):
        (d / MANIFEST).replace(d / f"{MANIFEST}.corrupt")
    with contextlib.suppress(FileNotFoundError):
        rd.remove(d / MANIFEST)  # the remote copy (a remote run directory's)


def shard_files(shards_dir: str | Path, rank: int) -> list[Path]:
    """The DCP files rank ``rank`` wrote (``FileSystemWriter`` names them ``__<rank>_<n>.distcp``)."""
    return sorted(Path(shards_dir).glob(f"__{rank}_*.distcp"))


def file_entries(directory: str | Path, paths: list[Path]) -> dict[str, dict]:
    """Manifest entries (size, sha256) of ``paths`` inside a checkpoint directory."""
    d = Path(directory)
    hashes = in_threads(sha256_file, list(paths))
    return {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": h} for p, h in zip(paths, hashes)}


def write_sharded_meta(directory: str | Path, state: dict, rngs: list[dict] | None = None) -> list[Path]:
    """Rank 0's small files of a sharded checkpoint (state, every rank's RNG as for :func:`save`);
    returns them and DCP's metadata."""
    d = Path(directory)
    _save_tensor_file(_rng_file(rngs), d / "rng.pt")
    write_json(d / "state.json", state)
    return [d / SHARDS / ".metadata", d / "rng.pt", d / "state.json"]


def write_sharded_manifest(directory: str | Path, entries: dict[str, dict], optimizer: bool = True) -> None:
    """The last write of a sharded checkpoint: only now does it count. ``optimizer``: False for a
    weights-only one."""
    extra = {} if optimizer else {"optimizer": False}
    write_json(Path(directory) / MANIFEST, {"format": SHARDED, "files": dict(sorted(entries.items())), **extra})


def _verify_uploaded(d: Path, rd: RunDir) -> dict:
    """Check a remote checkpoint where it is (no download); returns its manifest.

    Full: the files are there (hashed after the download). Sharded: every file the
    manifest lists is there with its size (one listing): the loading ranks hash them.
    """
    where = rd.name(d)
    try:
        manifest = _mapping(where, rd.read_json(d / MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {MANIFEST} (checkpoint incomplete or torn)") from None
    except ValueError:
        raise CheckpointError(f"{where}: {MANIFEST} is not valid JSON (checkpoint incomplete or torn)") from None
    if manifest.get("format") == SHARDED:
        _check_sizes(where, _sharded_files(where, manifest), rd.file_sizes(d))
        return manifest
    present = set(rd.children(d))
    for name in _full_files(manifest):
        if name not in present:
            raise CheckpointError(f"{where}: {name} missing")
    return manifest


def fetch(directory: str | Path, rd: RunDir = LOCAL, deep: bool | None = None, model_only: bool = False) -> Path:
    """Ready a checkpoint for loading on this node: checked, and downloaded as far as needed.

    Raises :class:`CheckpointError` (or FileNotFoundError) when it is torn or corrupted.
    Local: :func:`verify` (``deep`` as there). Remote full: downloaded whole and hashed;
    a local copy that fails is dropped and downloaded once more. Remote sharded:
    checked in the bucket (presence, sizes), then only the manifest and
    :data:`SHARDED_META` downloaded; the loading ranks fetch and hash the shards
    (:func:`raypath.shards.load_into`).

    model_only: for a reader of the model's weights only (an export): of a full checkpoint
    only :data:`MODEL_FILES` are downloaded and hashed, never the optimizer state (twice
    the model's size).
    """
    d = Path(directory)
    names = MODEL_FILES if model_only else FILES
    if not rd.remote(d):
        verify(d, deep=deep, names=names)
        return d
    if _verify_uploaded(d, rd).get("format") == SHARDED:
        for rel in (MANIFEST, *SHARDED_META):
            rd.fetch(d / rel)
        return d
    for last in (False, True):
        try:
            if model_only:
                for rel in (MANIFEST, *names):
                    rd.fetch(d / rel)
                _verify_names(d, names)
            else:
                verify(rd.fetch(d))
            return d
        except (CheckpointError, FileNotFoundError):
            shutil.rmtree(d, ignore_errors=True)  # the local copy, not the remote checkpoint
            if last:
                raise
    raise AssertionError("unreachable")


def _verify_names(d: Path, names: tuple[str, ...]) -> None:
    """The files ``names`` of a local full checkpoint match its manifest (the others may be absent)."""
    expected = _local_manifest(d)
    progress = _hashing(str(d), sum((d / n).stat().st_size for n in names))
    for name in names:
        _check_hash(d, name, expected.get(name), progress=progress)


def load_state(directory: str | Path, rd: RunDir = LOCAL) -> dict:
    """``state.json`` of a checkpoint (read remotely when it is in a remote run directory)."""
    return rd.read_json(Path(directory) / "state.json")


def read_tensors(path: str | Path, map_location: str | torch.device = "cpu", progress: Progress | None = None) -> Any:
    """One tensor file of a checkpoint; tensors and plain containers only (``weights_only=True``),
    so a checkpoint can never run code when it is loaded. ``progress``: the bytes read added to it
    (read through a counting stream instead of mapped).

    The file is mapped (``mmap=True``, copy-on-write), not read into private memory: a node's
    ranks loading one full checkpoint (every DDP worker loads all of it) share its pages in the
    page cache instead of each holding a copy, 12 bytes a parameter with the optimizer state.
    """
    try:
        if progress is None:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        with open(path, "rb", buffering=0) as f:
            return torch.load(_Counted(f, progress), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message names neither the file nor the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, which "
                              f"raypath never loads (weights_only=True): {first}") from None


class _Counted(io.RawIOBase):
    """An unbuffered file whose reads are added to a progress line as torch.load makes them
    (buffered, the refills after its seeks would count the file about twice)."""

    def __init__(self, f: io.RawIOBase, progress: Progress):
        self.f, self.progress = f, progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        n = self.f.readinto(b)
        self.progress.add(n or 0)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def load(directory: str | Path, map_location: str | torch.device = "cpu", rd: RunDir = LOCAL,
         fetched: bool = False) -> dict:
    """Verified contents of a full checkpoint (:func:`fetch` first); tensors only (:func:`read_tensors`).

    A sharded checkpoint is loaded collectively by the workers instead
    (:mod:`raypath.loop`); here it yields only its RNG state and state.
    fetched: this process has just fetched ``directory`` (:func:`latest_valid` chose it so), which
        hashed it: not again (a full checkpoint is 12 bytes a parameter, and every worker loads it).
    """
    d = Path(directory) if fetched else fetch(directory, rd)
    if is_sharded(d):
        return {"sharded": d, "rng": read_tensors(d / "rng.pt"), "state": load_state(d)}
    return {
        "model": read_tensors(d / "model.pt", map_location),
        "optim": read_tensors(d / OPTIM, map_location) if has_optimizer(d) else None,
        "rng": read_tensors(d / "rng.pt"),
        "state": load_state(d),
    }


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(run_storage: str | Path, rd: RunDir = LOCAL) -> list[Path]:
    """The ``step_<N>`` checkpoint directories of a segment's storage, oldest first (listed remotely
    for a remote run). Anything else named ``step_*`` there (a copy set aside as ``step_N.bak``) is
    no checkpoint of the segment: resuming, pruning and forking all pass it over."""
    names = [n for n in rd.children(run_storage) if n.startswith("step_") and n[len("step_"):].isdigit()]
    return sorted((Path(run_storage) / n for n in names), key=step_of)


def latest_valid(run_storage: str | Path, rd: RunDir = LOCAL) -> Path | None:
    """Newest verified ``step_*`` checkpoint under a Ray Train run directory.

    Remote (``rd``): checkpoints are listed and checked remotely, and the newest
    good one readied on this node by :func:`fetch` (a sharded one: its metadata only).
    One whose files fail their hash is quarantined, as a load does: it looks complete
    otherwise, and :func:`prune` would keep it as the newest and delete what the run resumes from.
    """
    for d in reversed(step_dirs(run_storage, rd)):
        try:
            return fetch(d, rd)
        except ChecksumError as e:
            quarantine(d, str(e), rd)
        except (CheckpointError, FileNotFoundError) as e:
            log.warning("skipping checkpoint: %s", e)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def drop_stale_ray_snapshot(run_storage: str | Path, rd: RunDir = LOCAL) -> bool:
    """Remove Ray Train's checkpoint snapshot if it names a missing or torn checkpoint.

    Ray refuses to start a run whose snapshot references a checkpoint that no
    longer exists. raypath resumes from :func:`latest_valid` (its own scan,
    which skips torn checkpoints), not from Ray's manager, so dropping the stale
    snapshot loses nothing and lets the run continue from the newest good one.
    Each named checkpoint is checked complete (its files there), not hashed: the snapshot
    names every checkpoint the segment kept, and whatever loads one hashes it.
    """
    snap = Path(run_storage) / RAY_SNAPSHOT
    try:
        names = [r["checkpoint_dir_name"] for r in rd.read_json(snap).get("checkpoint_results", [])]
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError):
        names = None  # unreadable snapshot: Ray would fail on it too
    bad = None if names is not None else "unreadable"
    for name in names or []:
        try:
            verify(Path(run_storage) / name, rd, deep=False)
        except CheckpointError as e:
            bad = str(e)
            break
    if bad is None:
        return False
    log.warning("dropping Ray's checkpoint snapshot %s (%s); resuming from the latest valid checkpoint", snap, bad)
    rd.remove(snap)
    return True


def step_of(directory: str | Path) -> int:
    return int(Path(directory).name.removeprefix("step_"))


def _complete(directory: Path, rd: RunDir) -> bool:
    try:
        verify(directory, rd, deep=False)
        return True
    except CheckpointError:
        return False


def prune(run_storage: str | Path, keep: int, protected: set[int], rd: RunDir = LOCAL,
          why: str | None = None) -> list[Path]:
    """Delete periodic checkpoints beyond the newest ``keep``; steps in ``protected`` are never deleted.

    ``protected``: fork points and version boundaries (what branches and later
    versions start from). Only complete checkpoints count towards ``keep``: a torn
    one (a crash mid-save) never displaces a good one, and is deleted once a newer
    checkpoint is complete. Called between saves, so no save is in flight. Returns
    the directories deleted; ``why`` is what the log says (default: the setting).
    """
    dirs = step_dirs(run_storage, rd)
    complete = [d for d in dirs if _complete(d, rd)]
    newest = step_of(complete[-1]) if complete else -1
    periodic = [d for d in complete if step_of(d) not in protected]
    torn = [d for d in dirs if d not in complete and step_of(d) not in protected and step_of(d) < newest]
    doomed = (periodic[:-keep] if keep > 0 else []) + torn
    for d in doomed:
        log.info("pruning checkpoint %s (%s)", d, why or f"train.keep_checkpoints={keep}")
        rd.remove(d)
    return doomed
