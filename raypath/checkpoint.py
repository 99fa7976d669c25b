"""Training checkpoints: complete-or-absent, verified on load, ``weights_only``.

A checkpoint directory holds ``model.pt``, ``optim.pt``, ``state.json`` (step,
tokens, data position, schedule name) and ``rng.pt``, and last of all
``manifest.json`` with each file's sha256. A directory without a manifest, or
whose files do not match it, is torn: :func:`load` refuses it and
:func:`latest_valid` skips it, so a crash mid-write can only cost the newest
checkpoint, never corrupt a run.

In a remote run directory (:mod:`raypath.mirror`) Ray Train uploads the
checkpoints; the functions taking a ``mirror`` list and read them there, and a
node downloads a checkpoint into its mirror before it loads it, verifying the
checksums after the download.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from raypath.mirror import Mirror, fetch, mirrored
from raypath.storage import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FILES = ("model.pt", "optim.pt", "rng.pt", "state.json")
MANIFEST = "manifest.json"


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


def verify(directory: str | Path, mirror: Mirror | None = None) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint is complete and intact.

    For a remote checkpoint (``mirror``) this checks that the manifest and every
    file were uploaded, without downloading them: their checksums are verified
    on the node that downloads the checkpoint to load it.
    """
    d = Path(directory)
    if mirrored(mirror, d):
        _verify_uploaded(d, mirror)
        return
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (checkpoint incomplete or torn)")
    try:
        expected = read_json(d / MANIFEST)
    except ValueError:  # a torn or hand-edited manifest is a torn checkpoint
        raise CheckpointError(f"{d}: {MANIFEST} is not valid JSON (checkpoint incomplete or torn)") from None
    if not isinstance(expected, dict):
        raise CheckpointError(f"{d}: {MANIFEST} is not a mapping of file checksums")
    for name in FILES:
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: {name} missing")
        if sha256_file(d / name) != expected.get(name):
            raise CheckpointError(f"{d}: {name} does not match its checksum (corrupted)")


def _verify_uploaded(d: Path, mirror: Mirror) -> None:
    where = f"{mirror.remote}/{mirror.relative(d)}"
    present = set(mirror.children(d))
    if MANIFEST not in present:
        raise CheckpointError(f"{where}: no {MANIFEST} (checkpoint incomplete or torn)")
    for name in FILES:
        if name not in present:
            raise CheckpointError(f"{where}: {name} missing")


def _read_json(path: Path, mirror: Mirror | None) -> dict:
    if not mirrored(mirror, path):
        return read_json(path)
    raw = mirror.read_bytes(path)
    if raw is None:
        raise FileNotFoundError(f"{mirror.remote}/{mirror.relative(path)}: not found")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mirror.remote}/{mirror.relative(path)}: not valid JSON ({e})") from None


def load_state(directory: str | Path, mirror: Mirror | None = None) -> dict:
    """``state.json`` of a checkpoint (read remotely when it is in a remote run directory)."""
    return _read_json(Path(directory) / "state.json", mirror)


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Verified checkpoint contents; tensors only (``weights_only=True``)."""
    d = Path(directory)
    verify(d)
    return {
        "model": torch.load(d / "model.pt", map_location=map_location, weights_only=True),
        "optim": torch.load(d / "optim.pt", map_location=map_location, weights_only=True),
        "rng": torch.load(d / "rng.pt", map_location="cpu", weights_only=True),
        "state": load_state(d),
    }


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(run_storage: Path, mirror: Mirror | None) -> list[Path]:
    if mirrored(mirror, run_storage):
        return [run_storage / n for n in mirror.children(run_storage) if n.startswith("step_")]
    return list(run_storage.glob("step_*")) if run_storage.is_dir() else []


def latest_valid(run_storage: str | Path, mirror: Mirror | None = None) -> Path | None:
    """Newest verified ``step_*`` checkpoint under a Ray Train run directory.

    Remote (``mirror``): checkpoints are listed remotely, and the newest one is
    downloaded into the mirror and verified there; a download that fails the
    check is deleted, so it is fetched again rather than trusted next time.
    """
    for d in sorted(_step_dirs(Path(run_storage), mirror), reverse=True):
        try:
            local = fetch(mirror, d)
            verify(local)
            return local
        except (CheckpointError, FileNotFoundError) as e:
            log.warning("skipping checkpoint: %s", e)
            if mirrored(mirror, d):
                shutil.rmtree(d, ignore_errors=True)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def drop_stale_ray_snapshot(run_storage: str | Path, mirror: Mirror | None = None) -> bool:
    """Remove Ray Train's checkpoint snapshot if it names a missing or torn checkpoint.

    Ray refuses to start a run whose snapshot references a checkpoint that no
    longer verifies. raypath resumes from :func:`latest_valid` (its own scan,
    which skips torn checkpoints), not from Ray's manager, so dropping the stale
    snapshot loses nothing and lets the run continue from the newest good one.
    """
    snap = Path(run_storage) / RAY_SNAPSHOT
    try:
        names = [r["checkpoint_dir_name"] for r in _read_json(snap, mirror).get("checkpoint_results", [])]
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError):
        names = None  # unreadable snapshot: Ray would fail on it too
    bad = None if names is not None else "unreadable"
    for name in names or []:
        try:
            verify(Path(run_storage) / name, mirror)
        except CheckpointError as e:
            bad = str(e)
            break
    if bad is None:
        return False
    log.warning("dropping Ray's checkpoint snapshot %s (%s); resuming from the latest valid checkpoint", snap, bad)
    if mirrored(mirror, snap):
        mirror.delete(snap)
    else:
        snap.unlink()
    return True
