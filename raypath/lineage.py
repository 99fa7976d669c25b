"""The lineage record: versions -> data -> main-path checkpoints -> branches -> releases.

One JSON file per run (``RUN_DIR/lineage.json``), written atomically by the
driver only (workers never touch it), so it is always a consistent picture of
what is finished. A re-run reads it to skip finished work. In a remote run
directory every save is also uploaded (:mod:`raypath.mirror`).

Format 2 stores the paths of the run directory's files relative to it (``./data/v1/val``,
:func:`raypath.storage.relative_paths`), so a run directory can be copied or moved and
read where it lands; in memory they are absolute under its current place. A format-1
record (absolute paths) is migrated when read, wherever its directory now is.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypath.mirror import Mirror, publish
from raypath.storage import RunFileError, read_json, rebase_paths, write_json

LINEAGE = "lineage.json"
FORMAT = 2
#: Formats this raypath reads (older ones are migrated in memory, written back as FORMAT).
READS = (1, 2)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Lineage:
    """In-memory lineage; every mutation is followed by :meth:`save`.

    mirror: the remote run directory each save is uploaded to; None for a local run.
    """

    path: Path
    data: dict[str, Any] = field(default_factory=dict)
    mirror: Mirror | None = None

    @classmethod
    def open(cls, run_dir: str | Path, name: str, config: dict, mirror: Mirror | None = None) -> "Lineage":
        path = Path(run_dir) / LINEAGE
        if path.exists():
            lin = cls(path, _read(path), mirror)
            lin.data["config"] = config  # the latest config that ran; versions keep their own facts
            return lin
        return cls(path, {"format": FORMAT, "name": name, "created": _now(), "config": config,
                          "tokenizer": {}, "model": {}, "versions": [], "main_path": [],
                          "branches": [], "releases": [], "release_history": {}}, mirror)

    @classmethod
    def load(cls, run_dir: str | Path, mirror: Mirror | None = None) -> "Lineage":
        """The record of an existing run; ``mirror``: the remote run directory its saves go to."""
        path = Path(run_dir) / LINEAGE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no lineage record (is {run_dir} a raypath run directory?)")
        return cls(path, _read(path), mirror)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def save(self) -> None:
        self.data["updated"] = _now()
        self.data["format"] = FORMAT
        write_json(self.path, self.data, root=self.run_dir)
        publish(self.mirror, self.path)

    # ---- versions and main path
    def set_versions(self, records: list[dict]) -> None:
        self.data["versions"] = records
        self.save()

    def main(self, version: str) -> dict | None:
        return next((m for m in self.data["main_path"] if m["version"] == version), None)

    def record_main(self, entry: dict) -> None:
        self.data["main_path"] = [m for m in self.data["main_path"] if m["version"] != entry["version"]]
        self.data["main_path"].append({**entry, "finished": _now()})
        self.save()

    # ---- branches and releases
    def branch(self, name: str) -> dict | None:
        return next((b for b in self.data["branches"] if b["name"] == name), None)

    def record_branch(self, entry: dict) -> None:
        self.data["branches"] = [b for b in self.data["branches"] if b["name"] != entry["name"]]
        self.data["branches"].append({**entry, "finished": _now()})
        self.save()

    def release(self, version: str) -> dict | None:
        """The live release of ``version`` (see :mod:`raypath.releases`)."""
        return next((r for r in self.data["releases"] if r["version"] == version), None)

    def release_history(self, version: str) -> dict | None:
        """``{current, pinned, releases: [r1, r2, ...], log: [...]}`` of ``version``; None before its first."""
        return self.data.setdefault("release_history", {}).get(version)

    def set_release_history(self, version: str, history: dict) -> None:
        """Record ``version``'s release history and, in ``releases``, its live release."""
        self.data.setdefault("release_history", {})[version] = history
        live = next(r for r in history["releases"] if r["id"] == history["current"])
        self.data["releases"] = [r for r in self.data["releases"] if r["version"] != version]
        self.data["releases"].append({**live, "release": live["id"], "pinned": bool(history.get("pinned"))})
        self.data["releases"].sort(key=lambda r: r["version_index"])
        self.save()

    # ---- branch searches (raypath.sweep)
    def sweep(self, version: str, name: str) -> dict | None:
        return next((s for s in self.data.get("sweeps", []) if (s["version"], s["name"]) == (version, name)), None)

    def record_sweep(self, entry: dict) -> None:
        """Replace the record of sweep ``(version, name)``: settings, trials, best and released trial."""
        key = (entry["version"], entry["name"])
        self.data["sweeps"] = [s for s in self.data.get("sweeps", []) if (s["version"], s["name"]) != key]
        self.data["sweeps"].append({**entry, "finished": _now()})
        self.save()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def _read(path: Path) -> dict:
    """A lineage record with absolute paths under ``path``'s directory, whatever its format."""
    data = read_json(path, root=path.parent)
    found = data.get("format") if isinstance(data, dict) else None
    if found not in READS:
        newer = " (written by a newer raypath: upgrade to read it)" if isinstance(found, int) and found > FORMAT else ""
        raise RunFileError(f"{path}: lineage format {found!r}, this raypath reads formats "
                           f"{', '.join(map(str, READS))}{newer}")
    if found == 1:  # absolute paths of wherever the run directory was written
        data = rebase_paths(data, recorded_root(data.get("versions", []), data.get("main_path", [])) or path.parent,
                            path.parent.resolve())
    _migrate_releases(data)
    return data


def sweep_run_dir(sweep_dir: str | Path) -> Path:
    """The run directory of a sweep directory (``RUN_DIR/sweeps/<version>/<name>``): its
    records' paths are stored relative to it."""
    return Path(sweep_dir).resolve().parents[2]


def recorded_root(versions: list[dict], main_path: list[dict] = ()) -> Path | None:
    """Where a record written with absolute paths had its run directory: a prepared version's
    val split is ``<run_dir>/data/<version>/val``, a main segment's curve ``<run_dir>/curves/<name>.jsonl``."""
    for v in versions:
        if str(v.get("val_path", "")).startswith("/"):
            return Path(v["val_path"]).parents[2]
    for m in main_path:
        if str(m.get("curve", "")).startswith("/"):
            return Path(m["curve"]).parents[1]
    return None


def _migrate_releases(data: dict) -> None:
    """A run directory from before release histories: each version's single release
    (``releases/vK``, files directly in it) becomes its ``r1``. Only the record changes here;
    the directory moves to ``releases/vK/r1`` when the version is next released."""
    history = data.setdefault("release_history", {})
    for r in data.get("releases", []):
        if r["version"] in history:
            continue
        reason = "pinned" if r.get("pinned") else ("sweep best" if r.get("trial_id") else "configured")
        entry = {**r, "id": "r1", "reason": reason}
        entry.pop("release", None)
        history[r["version"]] = {"current": "r1", "pinned": bool(r.get("pinned")), "releases": [entry],
                                 "log": [{"time": r.get("released"), "release": "r1", "action": "release",
                                          "reason": reason, "replaced": None}]}
        r.update(id="r1", release="r1", reason=reason, pinned=bool(r.get("pinned")))


def resolve_version(versions: list[dict], version: str | int | None) -> int:
    """Index in ``versions`` (entries with a ``name``, in order) of ``version``: a name
    (``v2``), a 1-based number (``2``), or None for the last one. Raises
    :class:`~raypath.config.ConfigError` (a ``ValueError``) naming the known versions."""
    from raypath.config import ConfigError

    names = [v["name"] for v in versions]
    if version is None:
        if not names:
            raise ConfigError("the run has no version yet")
        return len(names) - 1
    if str(version) in names:
        return names.index(str(version))
    try:
        i = int(str(version))
    except ValueError:
        i = 0
    if 1 <= i <= len(names):
        return i - 1
    raise ConfigError(f"{version!r} is not a version of this run (versions: {', '.join(names) or 'none'})")
