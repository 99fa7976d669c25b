"""The lineage record: versions -> data -> main-path checkpoints -> branches -> releases.

One JSON file per run (``RUN_DIR/lineage.json``), written atomically by the
driver only (workers never touch it), so it is always a consistent picture of
what is finished. A re-run reads it to skip finished work. In a remote run
directory every save is also uploaded (:class:`raypath.mirror.RunDir`).

Format 2 stores the paths of the run directory's files relative to it (``./data/v1/val``,
:func:`raypath.storage.relative_paths`), so a run directory can be copied or moved and
read where it lands; in memory they are absolute under its current place. A format-1
record (absolute paths) is migrated when read, wherever its directory now is.

Format 3 keeps a summary of each sweep (best, released, trial count, search tokens); its
trials are read from the sweep's own ``results.json`` when asked for, so the lineage stays
small however many sweeps the run has (earlier formats kept every trial inline: a save
rewrote them all).

``config`` is the latest run's configuration; ``config_changes`` lists each edit of it between
runs (the changed settings, old and new, and the versions whose main path trained before).

Several processes write one record: ``raypath run`` (main path, branches, releases) and, beside
it, sweeps and ``raypath release --pick``. Each change is a keyed edit (this version's main
entry, that sweep's summary) that a save applies to the file as it is then: under a lock
(:func:`raypath.storage.file_lock`), a record another process saved since this one read it is
read again and this process's unsaved edits are applied to it. So no writer's entries vanish
under another's, and each writer's view catches up at its next save (:meth:`Lineage.refresh`
before a decision that must see the others').
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raypath.mirror import CURVES, LINEAGE, LOCAL, SWEEP_RESULTS, RunDir, is_remote
from raypath.schedules import Decay
from raypath.storage import LOCKS_DIR, RunFileError, file_lock, read_json, rebase_paths, write_json

FORMAT = 3
#: Formats this raypath reads (older ones are migrated in memory, written back as FORMAT).
READS = (1, 2, 3)
#: A sweep directory's record of its trials (written by :mod:`raypath.sweep`).
RESULTS_JSON = SWEEP_RESULTS

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _run_dir(run_dir: RunDir | str | Path) -> RunDir:
    """A run directory handle; a plain path is a local run directory, a URI a remote one
    (its records and curves pulled into its default mirror, as ``raypath law fit URI`` does: what a
    notebook's views of it read)."""
    if isinstance(run_dir, RunDir):
        return run_dir
    return RunDir.open(run_dir, reads=CURVES) if is_remote(str(run_dir)) else RunDir(Path(run_dir))


@dataclass
class Lineage:
    """A run's lineage: read it with the typed accessors, change it with the ``record_*`` and
    ``set_*`` writers (each saves the file).

    path: ``RUN_DIR/lineage.json``; None for a record held only in memory (:meth:`of`).
    data: the JSON document (paths absolute under the run directory's current place).
    rd: the run directory the record belongs to (each save is uploaded to a remote one);
        :data:`raypath.mirror.LOCAL` for a record held in memory.
    """

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)
    rd: RunDir = LOCAL
    # a sweep's trials as last read: results.json path -> ((mtime_ns, size), trials)
    _trials: dict[str, tuple[tuple[int, int], list[SweepTrial]]] = field(default_factory=dict, repr=False)
    # this process's edits not saved yet, and the file as it was when last read or written here
    _edits: list[Callable[[dict], None]] = field(default_factory=list, repr=False)
    _stamp: tuple[int, int, int] | None = field(default=None, repr=False)
    _batching: int = field(default=0, repr=False)  # inside batched(): edits wait for its one save

    def __getstate__(self) -> dict:
        # The trials read are a cache, read again where needed: a sweep's law guide holds its
        # lineage, and Tune pickles the guide (tuner.pkl), which would keep every sweep's trials.
        # A copy in another process only reads: the edits (closures) stay with the writer.
        return {**self.__dict__, "_trials": {}, "_edits": [], "_batching": 0}

    @classmethod
    def open(cls, run_dir: RunDir | str | Path, name: str, config: dict) -> "Lineage":
        """The record of the run in ``run_dir`` (a new one named ``name`` if it has none) with
        ``config`` as its latest configuration, saved with the run's first record: so a refused
        config leaves no trace."""
        rd = _run_dir(run_dir)
        path = rd / LINEAGE
        if path.exists():
            lin = cls._read_from(path, rd)
        else:
            lin = cls(path, _new_record(name), rd)
        edit = _config_edit(config)
        edit(lin.data)
        lin._edits.append(edit)
        return lin

    @classmethod
    def load(cls, run_dir: RunDir | str | Path) -> "Lineage":
        """The record of an existing run (a :class:`~raypath.mirror.RunDir`, a local path or a URI)."""
        rd = _run_dir(run_dir)
        path = rd / LINEAGE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no lineage record (is {rd.uri} a raypath run directory?)")
        return cls._read_from(path, rd)

    @classmethod
    def _read_from(cls, path: Path, rd: RunDir) -> "Lineage":
        stamp = _file_stamp(path)  # before the read: a save in between makes the next one read again
        return cls(path, _read(path), rd, _stamp=stamp)

    @classmethod
    def of(cls, lineage: "Lineage | Mapping | str | Path") -> "Lineage":
        """A lineage from what a caller holds: a :class:`Lineage`, a run directory, or a lineage
        document already read (a notebook's ``json.load``, a test's hand-made record)."""
        if isinstance(lineage, Lineage):
            return lineage
        if isinstance(lineage, Mapping):
            data = copy.deepcopy(dict(lineage))
            _migrate_releases(data)  # as a read from disk does
            return cls(None, data)
        return cls.load(lineage)

    @property
    def run_dir(self) -> Path | None:
        return None if self.path is None else self.path.parent

    def save(self) -> None:
        """Write the record with this process's edits, merged into what other processes saved
        since it was read (see the module doc)."""
        if self.path is None:
            raise RunFileError("this lineage was built in memory (Lineage.of a dict): it has no file to save to")
        with self._locked():
            self._catch_up()
            self.data["updated"] = _now()
            self.data["format"] = FORMAT
            write_json(self.path, self.data, root=self.run_dir)
            self._stamp = _file_stamp(self.path)
            self._edits.clear()
            self.rd.publish(self.path)

    def refresh(self) -> "Lineage":
        """Catch up with what other processes saved since this one read the record (a sweep's
        summary, its release, beside ``raypath run``); returns self."""
        if self.path is not None and self.path.exists():
            with self._locked():
                self._catch_up()
        return self

    def _locked(self):
        return lineage_lock(self.rd)

    def _catch_up(self) -> None:
        """(Holding the lock.) Read the file again if another process saved it since (in a bucket:
        another machine, whose save is fetched first), and apply this process's unsaved edits to it."""
        if self.rd.remote(self.path):
            self.rd.fetch(self.path, missing_ok=True)
        if not self.path.exists() or _file_stamp(self.path) == self._stamp:
            return
        fresh = Lineage._read_from(self.path, self.rd)
        for edit in self._edits:
            edit(fresh.data)
        self.data, self._stamp = fresh.data, fresh._stamp

    def _change(self, edit: Callable[[dict], None]) -> None:
        """Apply ``edit`` (a change of one keyed entry, as a function of the record) and save."""
        edit(self.data)
        self._edits.append(edit)
        if not self._batching:
            self.save()

    @contextlib.contextmanager
    def batched(self):
        """The writers called inside save once, on leaving (also on an error: what was recorded is
        kept). In a bucket a save holds the store's lease, ~1 s and ~24 requests: a run's start
        records its facts and versions in one."""
        self._batching += 1
        try:
            yield self
        finally:
            self._batching -= 1
            if not self._batching and self._edits:
                self.save()

    # ---- run-level facts
    @property
    def name(self) -> str:
        return self.data.get("name", "")

    @property
    def updated(self) -> str | None:
        """When the record was last saved (ISO 8601, UTC); None for one never saved."""
        return self.data.get("updated")

    @property
    def config(self) -> dict[str, Any]:
        """The configuration of the latest ``raypath run`` (``Config.to_dict()``)."""
        return self.data.get("config") or {}

    def set_fact(self, key: str, value: dict) -> None:
        """Record a run-level fact (``tokenizer``, ``model``, ``storage``)."""
        self._change(lambda d: d.__setitem__(key, value))

    def fact(self, key: str) -> dict[str, Any]:
        return self.data.get(key) or {}

    # ---- versions and main path
    def versions(self) -> list[Version]:
        return [Version.from_dict(v) for v in self.data.get("versions", [])]

    def version_names(self) -> list[str]:
        """Prepared versions in order (for a record without them, the trained main path's)."""
        return [v["name"] for v in self.data.get("versions", [])] or [m.version for m in self.main_path()]

    def set_versions(self, records: list[Version | dict]) -> None:
        """Record the prepared versions: the data manifest's records without their per-file lists."""
        versions = [without_file_lists(Version.from_dict(r).to_dict()) for r in records]
        self._change(lambda d: d.__setitem__("versions", versions))

    def main_path(self) -> list[MainEntry]:
        """Finished main-path segments, in step order."""
        return sorted((MainEntry.from_dict(m) for m in self.data.get("main_path", [])), key=lambda m: m.start_step)

    # The lookups of one version's records pick its dicts before reading any as a record: a
    # command goes over the versions, and reading every record per lookup made that quadratic
    # (a plan of 60 versions read 36k records). The scan of the dicts is still linear per lookup.
    def main(self, version: str) -> MainEntry | None:
        return next((MainEntry.from_dict(m) for m in self.data.get("main_path", []) if m.get("version") == version),
                    None)

    def record_main(self, entry: MainEntry | dict) -> None:
        entry = MainEntry.from_dict(entry)
        entry.finished = _now()
        self._change(_keyed("main_path", entry.to_dict(), "version"))

    # ---- branches and releases
    def branches(self, version: str | None = None, *, done: bool = True) -> list[Branch]:
        """Branches in the order they finished; ``version``: only that version's; ``done``: only finished ones."""
        out = [Branch.from_dict(b) for b in self.data.get("branches", [])
               if version is None or b.get("version") == version]
        return [b for b in out if b.done or not done]

    def branch(self, name: str) -> Branch | None:
        return next((Branch.from_dict(b) for b in self.data.get("branches", []) if b.get("name") == name), None)

    def record_branch(self, entry: Branch | dict) -> None:
        entry = Branch.from_dict(entry)
        entry.finished = _now()
        self._change(_keyed("branches", entry.to_dict(), "name"))

    def releases(self) -> list[Release]:
        """Each version's live release, in version order."""
        return sorted((Release.from_dict(r) for r in self.data.get("releases", [])), key=lambda r: r.version_index)

    def release(self, version: str) -> Release | None:
        """The live release of ``version`` (see :mod:`raypath.releases`)."""
        return next((Release.from_dict(r) for r in self.data.get("releases", []) if r.get("version") == version), None)

    def release_history(self, version: str) -> ReleaseHistory | None:
        """Every release of ``version`` and the switches between them; None before its first."""
        h = self.data.get("release_history", {}).get(version)
        return None if h is None else ReleaseHistory.from_dict(h)

    def set_release_history(self, version: str, history: ReleaseHistory) -> None:
        """Record ``version``'s release history and, in ``releases``, its live release."""
        recorded, live = history.to_dict(), history.live.to_dict()

        def edit(d: dict) -> None:
            d.setdefault("release_history", {})[version] = recorded
            _keyed("releases", {**live, "release": live["id"], "pinned": history.pinned}, "version")(d)
            d["releases"].sort(key=lambda r: r["version_index"])

        self._change(edit)

    # ---- branch searches (raypath.sweep)
    def sweeps(self, version: str | None = None) -> list[Sweep]:
        """The sweeps of ``version`` (all without), each with its trials."""
        return [self._with_trials(s) for s in self.data.get("sweeps", [])
                if version is None or s["version"] == version]

    def sweep_summaries(self, version: str | None = None) -> list[Sweep]:
        """The sweeps of ``version`` (all without) as the lineage keeps them: best, released,
        ``search_tokens``, ``n_trials`` (in ``extra``), without reading their trials."""
        return [Sweep.from_dict(s) for s in self.data.get("sweeps", []) if version is None or s["version"] == version]

    def sweep(self, version: str, name: str) -> Sweep | None:
        return next((s for s in self.sweeps(version) if s.name == name), None)

    def with_trials(self, summary: Sweep) -> Sweep:
        """The sweep of ``summary`` (one of :meth:`sweep_summaries`) with its trials."""
        d = next(s for s in self.data.get("sweeps", []) if (s["version"], s["name"]) == (summary.version, summary.name))
        return self._with_trials(d)

    def record_sweep(self, entry: Sweep | dict) -> None:
        """Replace the record of sweep ``(version, name)``: its settings, best and released trial.

        The lineage keeps the summary only (``n_trials``); the trials are the sweep directory's
        ``results.json``, which the sweep writes first. Keeping them here made the lineage grow
        with every sweep's trials, each with a loss per version, and every save rewrote and
        uploaded them all (60 versions of 300 trials: 49 MB, 24 s a save)."""
        d = Sweep.from_dict(entry).to_dict()
        trials = d.pop("trials", None)
        if trials is not None:
            d["n_trials"] = len(trials)
            d["n_pruned"] = sum(bool(t.get("pruned")) for t in trials)  # weights deleted: sweep.keep_trials
        d["finished"] = _now()
        self._change(_keyed("sweeps", d, "version", "name"))

    def _with_trials(self, d: dict) -> Sweep:
        sweep = Sweep.from_dict(d)
        if "trials" not in d and sweep.path:  # format 3: the trials are the sweep's results.json
            sweep.trials = self._sweep_trials(Path(sweep.path) / RESULTS_JSON)
        return sweep

    def _sweep_trials(self, path: Path) -> list[SweepTrial]:
        # Read once per file version: releases and the law ask for every sweep's trials per decision.
        if not path.exists() and self.rd.remote(path):  # a reader's start pulls no sweep's trials
            self.rd.fetch(path, missing_ok=True)
        try:
            st = path.stat()
        except FileNotFoundError:
            log.warning("%s: missing; the lineage's sweep there has no trials to read (was the sweep "
                        "directory removed?)", path)
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._trials.get(str(path))
        if cached is None or cached[0] != stamp:
            cached = stamp, [SweepTrial.from_dict(t) for t in sweep_trials(path.parent)]
            self._trials[str(path)] = cached
        return cached[1]

    # ---- the paradigm comparison (raypath.compare)
    def baselines(self, paradigm: str) -> list[dict]:
        """``raypath compare``'s ``ptfs`` or ``cpt`` releases: one entry per (version, decay), with
        ``setting``, ``segment``, ``checkpoint``, ``curve``, ``tokens_trained``, ``val``, ``test``."""
        floor = (self.config.get("branch") or {}).get("min_lr_ratio", 0.0)
        # recorded before shape matching: always the paper's cosine to the branch floor
        legacy = {"setting": "paper", "decay": dataclasses.asdict(Decay("cosine", floor))}
        return [e if "decay" in e else {**e, **legacy} for e in self.data.get("compare", {}).get(paradigm, [])]

    def record_baseline(self, paradigm: str, entry: dict) -> None:
        """Replace ``paradigm``'s entry of the same (version, decay)."""
        def edit(d: dict) -> None:
            kept = [e for e in Lineage(None, d).baselines(paradigm)
                    if (e["version"], e["decay"]) != (entry["version"], entry["decay"])]
            d.setdefault("compare", {})[paradigm] = kept + [entry]

        self._change(edit)

    def replay_runs(self) -> dict[str, str]:
        """``raypath compare``'s path-switching lineages at other replay ratios: ratio -> run directory."""
        return dict(self.data.get("compare", {}).get("replay", {}))

    def record_replay_run(self, ratio: str, run_dir: str) -> None:
        self._change(lambda d: d.setdefault("compare", {}).setdefault("replay", {}).__setitem__(ratio, run_dir))


def lineage_lock(rd: RunDir):
    """The lock a save of ``rd``'s lineage holds (in a bucket, in the store too)."""
    return file_lock(rd.path / LOCKS_DIR / "lineage.lock", f"saving {rd.name(rd / LINEAGE)}", store=rd.mirror)


def _new_record(name: str) -> dict:
    return {"format": FORMAT, "name": name, "created": _now(), "config": {}, "tokenizer": {}, "model": {},
            "versions": [], "main_path": [], "branches": [], "releases": [], "release_history": {}}


def _config_edit(config: dict) -> Callable[[dict], None]:
    """The edit that makes ``config`` the record's latest configuration, appending to
    ``config_changes`` the settings it changes and the versions whose main path had trained
    before: ``config`` keeps only the latest run's, and what may change between runs (precision,
    parallelism, workers, branch, replay) applies from the next segment on."""
    from raypath.tracking import flatten

    def edit(d: dict) -> None:
        # as JSON holds them (a tuple read back is a list); a run directory copied or moved is no edit
        before, after = (flatten(json.loads(json.dumps({k: v for k, v in c.items() if k != "run_dir"})))
                         for c in (d.get("config") or {}, config))
        changed = {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
                   if before.get(k) != after.get(k)}
        if before and changed:
            trained = [m.version for m in Lineage(None, d).main_path()]
            d.setdefault("config_changes", []).append({"time": _now(), "trained": trained, "changed": changed})
        d["config"] = config  # the latest config that ran; versions keep their own facts

    return edit


def _keyed(section: str, entry: dict, *key: str) -> Callable[[dict], None]:
    """The edit that puts ``entry`` last in the list ``section``, replacing the one of the same ``key``."""
    def edit(d: dict) -> None:
        d[section] = [e for e in d.get(section, []) if [e.get(k) for k in key] != [entry[k] for k in key]] + [entry]
    return edit


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever the file is written again (an atomic write is a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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
    _migrate_sweeps(data)
    return data


def sweep_trials(sweep_dir: str | Path) -> list[dict]:
    """The trials of a finished sweep as its ``results.json`` records them (paths absolute)."""
    path = Path(sweep_dir) / RESULTS_JSON
    trials = read_sweep_record(path).get("trials")
    if not isinstance(trials, list):
        raise RunFileError(f"{path}: 'trials' must be a list of trial records, found {type(trials).__name__}")
    return trials


def read_sweep_record(path: str | Path) -> dict:
    """A sweep directory's record (``sweep.json``, ``results.json``) with its paths absolute
    under the run directory's current place. A sweep that ran before records were movable
    (lineage format 1) wrote the absolute paths of where its run directory was then: they are
    moved here, as :func:`_read` moves a format-1 lineage's, or a copied run directory would
    read (and release) the trials of the run it was copied from."""
    path = Path(path)
    root = sweep_run_dir(path.parent)
    record = read_json(path, root=root)
    if not isinstance(record, dict):
        raise RunFileError(f"{path}: not a sweep record (a JSON object), found {type(record).__name__}")
    was = record.get("path")
    if isinstance(was, str) and was.startswith("/") and len(Path(was).parents) > 2:
        record = rebase_paths(record, Path(was).parents[2], root)
    return record


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


def _migrate_sweeps(data: dict) -> None:
    """Format 1-2 kept each sweep's trials inline: where the sweep's ``results.json`` holds them,
    keep the summary only, so the next save writes a format-3 lineage."""
    for s in data.get("sweeps", []):
        if isinstance(s.get("trials"), list) and s.get("path") and (Path(s["path"]) / RESULTS_JSON).is_file():
            s["n_trials"] = len(s.pop("trials"))


#: Settings that stay as they are once the main path has started: the recorded steps,
#: checkpoints and consumed rows count in them, the prepared versions were built and tokenized with them
#: (``None``: the whole section; how the model computes, ``model.attn_implementation``, may change).
FIXED_SETTINGS = (("model", None),
                  ("data", ("seq_len", "tokenizer", "vocab_size", "tokenizer_max_chars", "max_docs_per_version",
                            "seed", "dedup", "minhash_bands", "minhash_rows", "minhash_shingle",
                            "minhash_threshold")),
                  ("train", ("global_batch_size", "max_lr", "warmup_steps")))
#: What only the tokenizer a run trains itself reads (not one of ``data.tokenizer`` or ``model.path``).
OWN_TOKENIZER_SETTINGS = ("data.vocab_size", "data.tokenizer_max_chars")
#: What builds the embedded corpus (a change rebuilds it under the run directory); of any other
#: corpus, ``data.seed`` seeds only the versions still to prepare.
EMBEDDED_CORPUS_SETTINGS = ("data.max_docs_per_version", "data.seed")
#: What only ``data.dedup: minhash`` reads.
MINHASH_SETTINGS = ("data.minhash_bands", "data.minhash_rows", "data.minhash_shingle", "data.minhash_threshold")
#: What builds a fresh model: a base model's own ``config.json`` gives its architecture (``model.path``).
FRESH_MODEL_SETTINGS = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
                        "model.intermediate_size", "model.max_position_embeddings", "model.tie_word_embeddings",
                        "model.rope_theta")


def check_fixed_settings(now: dict, recorded: dict, what: str = "a lineage keeps its",
                         sections: tuple[str, ...] = ("model", "data", "train")) -> None:
    """Raise a :class:`~raypath.config.ConfigChangedError` naming the first of :data:`FIXED_SETTINGS`
    in ``sections`` where the config ``now`` differs from the lineage's ``recorded`` one (both
    ``Config.to_dict()``). Before the main path has trained, only ``data`` is fixed: the prepared
    versions were tokenized with it."""
    from raypath.config import ConfigChangedError

    basis = "was trained with" if "train" in sections else "prepared its versions with"
    for section, keys in FIXED_SETTINGS:
        if section not in sections:
            continue
        new, old = now.get(section, {}), recorded.get(section, {})
        for key in keys or [k for k in new if k != "attn_implementation"]:
            if key in old and old[key] != new.get(key) and not _unused(f"{section}.{key}", now, recorded):
                raise ConfigChangedError(
                    f"{section}.{key}: {_shown(new.get(key))} differs from the lineage's {_shown(old[key])}, "
                    f"which {now.get('run_dir') or 'its run directory'} {basis}; {what} model, "
                    f"data and main-path schedule: set {section}.{key} back to {_shown(old[key])} to go on "
                    f"with this lineage, or set run_dir to a new directory to start another")


def _shown(value: Any) -> str:
    return "empty" if value is None else repr(value)  # None is an empty field in the YAML


def _unused(name: str, now: dict, recorded: dict) -> bool:
    """Whether the fixed setting ``name`` is one this lineage never read (it may then change)."""
    data = recorded.get("data") or {}
    if name in OWN_TOKENIZER_SETTINGS:  # the tokenizer came with the run
        return bool(data.get("tokenizer") or (recorded.get("model") or {}).get("path"))
    if name in EMBEDDED_CORPUS_SETTINGS:
        return not data.get("corpus") == (now.get("data") or {}).get("corpus") == "embedded"
    if name in MINHASH_SETTINGS:
        return data.get("dedup") != "minhash"
    if name in FRESH_MODEL_SETTINGS:  # ignored beside model.path, which may not change itself
        return bool((recorded.get("model") or {}).get("path"))
    return False


def resolve_version(names: list[str], version: str | int | None) -> int:
    """Index in ``names`` (the run's versions, in order) of ``version``: a name (``v2``), a
    1-based number (``2``), or None for the last one. Raises
    :class:`~raypath.config.ConfigError` (a ``ValueError``) naming the known versions."""
    from raypath.config import ConfigError

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
    # every caller's version comes from a --version flag: the line names it
    raise ConfigError(f"--version {version}: not a version of this run (versions: {', '.join(names) or 'none'})")


# A version's per-file lists (file fingerprints, skipped files, rows per chunk) are written once,
# to RUN_DIR/data/vK/files.json (:mod:`raypath.data`). The data manifest, rewritten as each
# version lands, and the lineage, rewritten on every record, keep their counts only: their size
# grows with versions, not with a corpus's files (1e5 files list 25 MB of fingerprints).
FILE_LISTS = {"train_files": "train", "val_files": "val", "test_files": "test", "skipped_files": "skipped",
              "new_chunk_rows": "chunks"}


def without_file_lists(record: dict[str, Any]) -> dict[str, Any]:
    """A version record without its per-file lists (:data:`FILE_LISTS`), with their counts (``files``)."""
    counts = {name: len(record[k]) for k, name in FILE_LISTS.items() if isinstance(record.get(k), list)}
    out = {k: v for k, v in record.items() if not (k in FILE_LISTS and isinstance(v, list))}
    return {**out, "files": {**record.get("files", {}), **counts}} if counts else out


# --------------------------------------------------------------------------- typed records
#
# The lineage file is JSON; these are its entries as Python values. Each record declares the
# fields raypath reads; keys it does not declare (written by another raypath version, or
# descriptive extras such as a version's document counts) are kept in ``extra`` and written
# back unchanged, so ``Record.from_dict(d).to_dict() == d`` for every record read.
# Records are values: change one by recording it again (``Lineage.record_*``).

@dataclass(kw_only=True)
class Record:
    """Base of the lineage's records.

    extra: the record's keys this class does not declare, kept as they were read.
    """

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # declared fields the source dict lacked: not written back while still at their default
    _absent: frozenset = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "_absent"))

    #: list fields whose items are records themselves: field name -> record class
    NESTED: ClassVar[dict[str, type[Record]]] = {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if isinstance(d, cls):
            return d
        names = cls.fields()
        known = {k: d[k] for k in names if k in d}
        for k, item in cls.NESTED.items():
            if k in known:
                known[k] = [item.from_dict(x) for x in known[k]]
        return cls(**known, extra={k: v for k, v in d.items() if k not in names},
                   _absent=frozenset(k for k in names if k not in d))

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.fields()
               if not (k in self._absent and getattr(self, k) == _default(type(self), k))}
        for k in self.NESTED:
            if k in out:
                out[k] = [x.to_dict() for x in out[k]]
        return {**out, **self.extra}


def _default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(kw_only=True)
class Version(Record):
    """A prepared version of the corpus, as its data manifest records it (:mod:`raypath.data`).

    name: the version's name (``v1``); index: its 0-based place in the lineage.
    new_tokens / new_blocks: the version's own training tokens / packed blocks.
    replay_blocks: blocks of older versions mixed into its stream (``data.replay_ratio``).
    stream_rows: rows of its training stream (new + replay); val_blocks / test_blocks: its
        held-out splits' blocks.
    new_path, stream_path, val_path, test_path: its data under ``RUN_DIR/data/<name>``
        (``test_path`` None when it has no test split).
    files: how many train / val / test / skipped files and tokenized chunks it has; the
        files themselves, with their fingerprints, are listed in ``RUN_DIR/data/<name>/files.json``.
    """

    name: str
    index: int = 0
    new_tokens: int = 0
    new_blocks: int = 0
    replay_blocks: int = 0
    stream_rows: int = 0
    val_blocks: int = 0
    test_blocks: int = 0
    new_path: str | None = None
    stream_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    files: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class MainEntry(Record):
    """A version's finished main-path segment (:mod:`raypath.mainpath`).

    version, segment: the version's name and the segment's (``main-v1``).
    start_step, end_step: global optimizer steps; the segment trains ``[start_step, end_step)``.
    fork_step, fork_fraction: where its release branch forks, as a step and as the configured
        fraction of the segment.
    tokens_start, tokens_end: tokens the main path had trained at the segment's start and end.
    max_lr, warmup_steps: the main path's constant-LR schedule (the law reads it back).
    checkpoints: ``{"fork": path, "end": path}``.
    curve: its training curve (JSONL); metrics: the end checkpoint's metrics.
    """

    version: str
    segment: str = ""
    start_step: int = 0
    end_step: int = 0
    fork_step: int = 0
    fork_fraction: float | None = None
    tokens_start: int = 0
    tokens_end: int = 0
    max_lr: float | None = None
    warmup_steps: int | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    curve: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "done"
    finished: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens the segment trained."""
        return self.tokens_end - self.tokens_start


@dataclass(kw_only=True)
class Branch(Record):
    """A finished LR-decay branch: a version's configured release branch, a sweep trial that
    was released, or a re-mixed replay branch (:mod:`raypath.branches`).

    name: the segment's name (``branch-v1``); version: the version it decays.
    fork_step, end_step, steps: where it forked off the main path, where it ended, and its length.
    decay: the decay's settings (:class:`raypath.schedules.Decay` as a dict).
    forked_from: the main-path checkpoint it started from; checkpoint: its final one.
    curve: its training curve; metrics: final loss and ``val/*``, ``test/*`` losses.
    tokens_trained: the branch's own tokens; tokens_total: main path + branch.
    export: its Hugging Face export; sweep, trial_id: the sweep and trial it came from, if any.
    """

    name: str
    version: str
    fork_step: int = 0
    end_step: int | None = None
    steps: int = 0
    decay: dict[str, Any] = field(default_factory=dict)
    forked_from: str | None = None
    checkpoint: str | None = None
    curve: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_trained: int | None = None
    tokens_total: int | None = None
    export: str | None = None
    sweep: str | None = None
    trial_id: str | None = None
    status: str = "done"
    finished: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass(kw_only=True)
class Release(Record):
    """A version's release ``rN`` (:mod:`raypath.releases`).

    id: ``r1``, ``r2``...; version, version_index: the version it releases.
    path: ``RUN_DIR/releases/<version>/<id>``; branch: the branch whose model it is.
    reason: why it was released (``configured``, ``sweep best``, ``pinned``, ``rollback``...).
    source, sweep, trial_id: where the branch came from.
    objective, test_objective, score: the release objective on val / test, and the score it
        was picked by (objective plus compute penalty); objective_weights, compute_penalty,
        version_tokens: the objective it was decided under (:class:`raypath.releases.Objective`).
    val, test: its per-split losses; branch_tokens, tokens_total: tokens of its branch and
        of main path + branch.
    candidates, beat: how many candidates were scored at the decision, and how many it beat.
    replaced: the release it replaced; released: when; pinned: whether the version is pinned
        to it (only on the version's live release).
    """

    id: str
    version: str
    version_index: int = 0
    path: str | None = None
    branch: str | None = None
    reason: str | None = None
    source: str | None = None
    sweep: str | None = None
    trial_id: str | None = None
    objective: float | None = None
    test_objective: float | None = None
    score: float | None = None
    objective_weights: dict[str, float] = field(default_factory=dict)
    compute_penalty: float = 0.0
    version_tokens: int = 1
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    branch_tokens: int | None = None
    tokens_total: int | None = None
    candidates: int = 0
    beat: int = 0
    replaced: str | None = None
    released: str | None = None
    pinned: bool = False


@dataclass(kw_only=True)
class ReleaseHistory(Record):
    """Every release of one version, and every switch between them (:mod:`raypath.releases`).

    current: the live release's id (None before the first); pinned: a user chose it (a
        decision keeps it until ``--pick best``).
    releases: ``r1``, ``r2``, ... in the order they were made.
    log: one entry per switch or pin: ``time``, ``release``, ``action`` (release, rollback,
        recovered, pin, unpin), ``reason``, ``replaced``.
    """

    current: str | None = None
    pinned: bool = False
    releases: list[Release] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    NESTED: ClassVar[dict[str, type[Record]]] = {"releases": Release}

    def get(self, rid: str | None) -> Release | None:
        return next((r for r in self.releases if r.id == rid), None)

    @property
    def live(self) -> Release | None:
        return self.get(self.current)

    def ids(self) -> list[str]:
        return [r.id for r in self.releases]


@dataclass(kw_only=True)
class SweepTrial(Record):
    """One trial of a sweep, as the lineage keeps it: its Tune config and final numbers.

    config: the trial's Tune config (``fork_step``, ``branch_steps``, ``shape``, ...).
    status: ``done``, ``stopped`` (by the law-guided stopper), ``error`` or ``incomplete``.
    metrics, objective, test_objective, score: its final losses, objective and score.
    branch_tokens: tokens its branch trained; curve, export: its files.
    pruned: its weights (final checkpoint, export) were deleted (``sweep.keep_trials``): not a
        release candidate any more.
    """

    trial_id: str
    name: str | None = None
    status: str = "done"
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    objective: float | None = None
    test_objective: float | None = None
    score: float | None = None
    branch_tokens: int | None = None
    curve: str | None = None
    export: str | None = None
    pruned: bool = False


@dataclass(kw_only=True)
class Sweep(Record):
    """A branch search of a version (:mod:`raypath.sweep`); its full record is the sweep
    directory's ``results.json``.

    name, version, version_index: the sweep and the version it searches; path: its directory.
    trials: its trials (read from ``path/results.json``; inline in records of formats 1-2);
    best: the best trial's id; released: the trial released from it, if any.
    complete: every trial settled; search_tokens: tokens its trials trained.
    """

    name: str
    version: str
    version_index: int = 0
    path: str | None = None
    trials: list[SweepTrial] = field(default_factory=list)
    best: str | None = None
    released: str | None = None
    complete: bool = False
    search_tokens: int = 0
    NESTED: ClassVar[dict[str, type[Record]]] = {"trials": SweepTrial}
