"""Training checkpoints: complete-or-absent, verified on load, ``weights_only``.

Two layouts, told apart by the manifest:

* **full** (``train.parallel: ddp``): ``model.pt``, ``optim.pt`` (the whole
  state, written by rank 0), ``state.json`` (step, tokens, data position,
  schedule name), ``rng.pt``, and last of all ``manifest.json`` with each file's
  sha256.
* **sharded** (``train.parallel: fsdp``): ``shards/`` is a
  ``torch.distributed.checkpoint`` (DCP) directory where every rank wrote its
  own shards (nothing gathers the full state), plus ``state.json`` and
  ``rng.pt``. Once every rank has written and hashed its files, rank 0 writes
  ``manifest.json`` (``format: sharded``, each file's size and sha256) last.
  DCP reshards on load, so a sharded checkpoint resumes at any world size,
  under FSDP or DDP.

A directory without a manifest, or whose files do not match it, is torn:
:func:`load` refuses it and :func:`latest_valid` skips it, so a crash mid-write
can only cost the newest checkpoint, never corrupt a run. Full checkpoints are
hashed whole by :func:`latest_valid`; a sharded one is checked there for
presence and sizes, and hashed at load, each rank hashing a share of the files
(:func:`verify_share`); a corrupted one is quarantined (its manifest renamed),
so the restart that follows skips it.

In a remote run directory (:class:`raypath.mirror.RunDir`) Ray Train uploads the
checkpoints; the functions taking the run directory ``rd`` list and read them there,
and a node downloads a checkpoint into its mirror before it loads it, verifying the
checksums after the download. Without ``rd`` the files are plain local ones.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from raypath.mirror import LOCAL, RunDir
from raypath.storage import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FILES = ("model.pt", "optim.pt", "rng.pt", "state.json")
MANIFEST = "manifest.json"
#: DCP directory of a sharded checkpoint, and the manifest's ``format`` value for one.
SHARDS = "shards"
SHARDED = "sharded"


class CheckpointError(RuntimeError):
    pass


def _save_tensor_file(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save(directory: str | Path, model_state: dict, optim_state: dict, state: dict) -> Path:
    """Write a checkpoint into ``directory`` (created); the manifest goes last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _save_tensor_file(model_state, d / "model.pt")
    _save_tensor_file(optim_state, d / "optim.pt")
    _save_tensor_file({"torch": torch.get_rng_state()}, d / "rng.pt")
    write_json(d / "state.json", state)
    write_json(d / MANIFEST, {f: sha256_file(d / f) for f in FILES})
    return d


def verify(directory: str | Path, rd: RunDir = LOCAL, deep: bool | None = None) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint is complete and intact.

    For a checkpoint in a remote run directory ``rd`` this checks that the manifest and every
    file were uploaded, without downloading them: their checksums are verified
    on the node that downloads the checkpoint to load it.
    deep: hash every file; False: presence (and sizes, where the manifest has them)
        only; None (default): hash a full checkpoint, but not a sharded one, whose
        size grows with the model: the ranks that load it hash it (:func:`verify_share`).
    """
    d = Path(directory)
    if rd.remote(d):
        _verify_uploaded(d, rd)
        return
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (checkpoint incomplete or torn)")
    try:
        expected = read_json(d / MANIFEST)
    except ValueError:  # a torn or hand-edited manifest is a torn checkpoint
        raise CheckpointError(f"{d}: {MANIFEST} is not valid JSON (checkpoint incomplete or torn)") from None
    if not isinstance(expected, dict):
        raise CheckpointError(f"{d}: {MANIFEST} is not a mapping of file checksums")
    if expected.get("format") == SHARDED:
        _check_files(d, _sharded_files(d, expected), bool(deep))
        return
    for name in FILES:
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: {name} missing")
        if deep is not False and sha256_file(d / name) != expected.get(name):
            raise CheckpointError(f"{d}: {name} does not match its checksum (corrupted)")


def _sharded_files(d: Path, manifest: dict) -> dict[str, dict]:
    """A sharded manifest's ``files``: ``{relative path: {"size": int, "sha256": str}}``."""
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
        for m in files.values())
    if not ok:  # hand-edited or written by something else: as good as torn
        raise CheckpointError(f"{d}: {MANIFEST} of a sharded checkpoint needs \"files\": "
                              "{path: {\"size\": bytes, \"sha256\": hex}} (checkpoint incomplete or torn)")
    return files


def _check_files(d: Path, files: dict[str, dict], deep: bool) -> None:
    for rel, meta in files.items():
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"{d}: {rel} missing")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"{d}: {rel} has {f.stat().st_size} bytes, the manifest says {meta['size']} (torn)")
        if deep and sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{d}: {rel} does not match its checksum (corrupted)")


def is_sharded(directory: str | Path) -> bool:
    """Whether a (local, verified) checkpoint has the sharded layout."""
    return read_json(Path(directory) / MANIFEST).get("format") == SHARDED


def verify_share(directory: str | Path, rank: int, world: int) -> str | None:
    """Hash this rank's share (every ``world``-th file) of a sharded checkpoint.

    Returns the error, or None; callers agree on the outcome collectively
    (:func:`quarantine` the checkpoint when any rank found one).
    """
    d = Path(directory)
    try:
        files = _sharded_files(d, read_json(d / MANIFEST))
        _check_files(d, dict(sorted(files.items())[rank::world]), deep=True)
    except CheckpointError as e:
        return str(e)
    return None


def quarantine(directory: str | Path, reason: str, rd: RunDir = LOCAL) -> None:
    """Make :func:`latest_valid` skip a corrupted checkpoint: its manifest is renamed, nothing deleted."""
    d = Path(directory)
    log.error("quarantining checkpoint %s: %s", d, reason)
    if (d / MANIFEST).is_file():
        (d / MANIFEST).replace(d / f"{MANIFEST}.corrupt")
    rd.remove(d / MANIFEST)  # the remote copy (a remote run directory's)


def shard_files(shards_dir: str | Path, rank: int) -> list[Path]:
    """The DCP files rank ``rank`` wrote (``FileSystemWriter`` names them ``__<rank>_<n>.distcp``)."""
    return sorted(Path(shards_dir).glob(f"__{rank}_*.distcp"))


def file_entries(directory: str | Path, paths: list[Path]) -> dict[str, dict]:
    """Manifest entries (size, sha256) of ``paths`` inside a checkpoint directory."""
    d = Path(directory)
    return {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def write_sharded_meta(directory: str | Path, state: dict) -> list[Path]:
    """Rank 0's small files of a sharded checkpoint (state, RNG); returns them and DCP's metadata."""
    d = Path(directory)
    _save_tensor_file({"torch": torch.get_rng_state()}, d / "rng.pt")
    write_json(d / "state.json", state)
    return [d / SHARDS / ".metadata", d / "rng.pt", d / "state.json"]


def write_sharded_manifest(directory: str | Path, entries: dict[str, dict]) -> None:
    """The last write of a sharded checkpoint: only now does it count."""
    write_json(Path(directory) / MANIFEST, {"format": SHARDED, "files": dict(sorted(entries.items()))})


def _verify_uploaded(d: Path, rd: RunDir) -> None:
    where = rd.name(d)
    present = set(rd.children(d))
    if MANIFEST not in present:
        raise CheckpointError(f"{where}: no {MANIFEST} (checkpoint incomplete or torn)")
    if SHARDS in present:  # the manifest lists the files; checked after the download
        return
    for name in FILES:
        if name not in present:
            raise CheckpointError(f"{where}: {name} missing")


def load_state(directory: str | Path, rd: RunDir = LOCAL) -> dict:
    """``state.json`` of a checkpoint (read remotely when it is in a remote run directory)."""
    return rd.read_json(Path(directory) / "state.json")


def read_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """One tensor file of a checkpoint; tensors and plain containers only (``weights_only=True``),
    so a checkpoint can never run code when it is loaded."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message names neither the file nor the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, which "
                              f"raypath never loads (weights_only=True): {first}") from None


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verified contents of a full checkpoint; tensors only (:func:`read_tensors`).

    A sharded checkpoint is loaded collectively by the workers instead
    (:mod:`raypath.loop`); here it yields only its RNG state and state.
    """
    d = Path(directory)
    verify(d)
    if is_sharded(d):
        return {"sharded": d, "rng": read_tensors(d / "rng.pt"), "state": load_state(d)}
    return {
        "model": read_tensors(d / "model.pt", map_location),
        "optim": read_tensors(d / "optim.pt", map_location),
        "rng": read_tensors(d / "rng.pt"),
        "state": load_state(d),
    }


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(run_storage: str | Path, rd: RunDir = LOCAL) -> list[Path]:
    """The ``step_*`` directories of a segment's storage (listed remotely for a remote run)."""
    return [Path(run_storage) / n for n in rd.children(run_storage) if n.startswith("step_")]


def latest_valid(run_storage: str | Path, rd: RunDir = LOCAL) -> Path | None:
    """Newest verified ``step_*`` checkpoint under a Ray Train run directory.

    Remote (``rd``): checkpoints are listed remotely, and the newest one is
    downloaded into the mirror and verified there. A local copy that fails the
    check is deleted and downloaded whole once more before the checkpoint is
    skipped: on a node other than rank 0's, the mirror's step directory holds only
    the shards this node's ranks wrote, not the manifest, until it is pulled whole.
    """
    for d in sorted(step_dirs(run_storage, rd), reverse=True):
        for retry in (False, True) if rd.remote(d) else (True,):
            try:
                local = rd.fetch(d)
                verify(local)
                return local
            except (CheckpointError, FileNotFoundError) as e:
                if rd.remote(d):  # the local copy, not the remote checkpoint
                    shutil.rmtree(d, ignore_errors=True)
                if retry:
                    log.warning("skipping checkpoint: %s", e)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def drop_stale_ray_snapshot(run_storage: str | Path, rd: RunDir = LOCAL) -> bool:
    """Remove Ray Train's checkpoint snapshot if it names a missing or torn checkpoint.

    Ray refuses to start a run whose snapshot references a checkpoint that no
    longer verifies. raypath resumes from :func:`latest_valid` (its own scan,
    which skips torn checkpoints), not from Ray's manager, so dropping the stale
    snapshot loses nothing and lets the run continue from the newest good one.
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
            verify(Path(run_storage) / name, rd)
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


def prune(run_storage: str | Path, keep: int, protected: set[int], rd: RunDir = LOCAL) -> list[Path]:
    """Delete periodic checkpoints beyond the newest ``keep``; steps in ``protected`` are never deleted.

    ``protected``: fork points and version boundaries (what branches and later
    versions start from). Only complete checkpoints count towards ``keep``: a torn
    one (a crash mid-save) never displaces a good one, and is deleted once a newer
    checkpoint is complete. Called between saves, so no save is in flight. Returns
    the directories deleted.
    """
    dirs = sorted(step_dirs(run_storage, rd), key=step_of)
    complete = [d for d in dirs if _complete(d, rd)]
    newest = step_of(complete[-1]) if complete else -1
    periodic = [d for d in complete if step_of(d) not in protected]
    torn = [d for d in dirs if d not in complete and step_of(d) not in protected and step_of(d) < newest]
    doomed = (periodic[:-keep] if keep > 0 else []) + torn
    for d in doomed:
        log.info("pruning checkpoint %s (train.keep_checkpoints=%d)", d, keep)
        rd.remove(d)
    return doomed
