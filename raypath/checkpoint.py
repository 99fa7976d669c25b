"""Training checkpoints: complete-or-absent, verified on load, ``weights_only``.

A checkpoint directory holds ``model.pt``, ``optim.pt``, ``state.json`` (step,
tokens, data position, schedule name) and ``rng.pt``, and last of all
``manifest.json`` with each file's sha256. A directory without a manifest, or
whose files do not match it, is torn: :func:`load` refuses it and
:func:`latest_valid` skips it, so a crash mid-write can only cost the newest
checkpoint, never corrupt a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

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


def verify(directory: str | Path) -> None:
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (checkpoint incomplete or torn)")
    expected = read_json(d / MANIFEST)
    for name in FILES:
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: {name} missing")
        if sha256_file(d / name) != expected.get(name):
            raise CheckpointError(f"{d}: {name} does not match its checksum (corrupted)")


def load_state(directory: str | Path) -> dict:
    return read_json(Path(directory) / "state.json")


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


def latest_valid(run_storage: str | Path) -> Path | None:
    """Newest verified ``step_*`` checkpoint under a Ray Train run directory."""
    root = Path(run_storage)
    if not root.is_dir():
        return None
    for d in sorted(root.glob("step_*"), reverse=True):
        try:
            verify(d)
            return d
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def drop_stale_ray_snapshot(run_storage: str | Path) -> bool:
    """Remove Ray Train's checkpoint snapshot if it names a missing or torn checkpoint.

    Ray refuses to start a run whose snapshot references a checkpoint that no
    longer verifies. raypath resumes from :func:`latest_valid` (its own scan,
    which skips torn checkpoints), not from Ray's manager, so dropping the stale
    snapshot loses nothing and lets the run continue from the newest good one.
    """
    snap = Path(run_storage) / RAY_SNAPSHOT
    if not snap.is_file():
        return False
    try:
        names = [r["checkpoint_dir_name"] for r in read_json(snap).get("checkpoint_results", [])]
    except (ValueError, KeyError, TypeError):
        names = None  # unreadable snapshot: Ray would fail on it too
    bad = None if names is not None else "unreadable"
    for name in names or []:
        try:
            verify(Path(run_storage) / name)
        except CheckpointError as e:
            bad = str(e)
            break
    if bad is None:
        return False
    log.warning("dropping Ray's checkpoint snapshot %s (%s); resuming from the latest valid checkpoint", snap, bad)
    snap.unlink()
    return True
