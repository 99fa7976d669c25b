"""Run directories on a remote pyarrow filesystem (``s3://``, ``gs://``, ...), worked on locally.

raypath reads and writes its files under a local directory. When ``run_dir``
is a URI, that directory is a **mirror**: ``cluster.local_dir``, the same
absolute path on every node, filled from the remote on demand and published
back after each write. The remote copy is the truth, so nothing depends on one
node's disk: a fresh machine, or a node that never saw the run, pulls what it
needs. Plain paths and ``file://`` URIs are local runs, with no mirror (an NFS
mount every node sees is a plain path).

Who copies what, when:

* the driver, at start: everything except :data:`NOT_MIRRORED` (checkpoints, exports,
  releases: large, fetched one by one where needed), :data:`WRITE_ONLY` (TensorBoard's
  events, the report), the token files of ``data/`` (written
  to and read from the remote by Ray Data) and all but the records and curves of ``sweeps/``;
  before preparing, the embedded corpus, and the tokenizer once trained (a validation task or a
  tokenizing actor on another node pulls the ones it reads); after preparing: config and the
  data manifest;
  ``lineage.json`` after every save; ``report/`` at the end;
* a command that only reads the run (``raypath status``, ``cost``, ``release``, ``export``,
  ``law``, a notebook's ``Lineage.load(URI)``), at start: ``lineage.json``, ``config.yaml``
  and each sweep's scores of its trials (:data:`RECORDS`), with the curves and the law's fits where
  it draws or fits them (:data:`CURVES`); what else it reads it fetches (a release, a
  checkpoint's model files, the tokenizer);
* Ray Train writes checkpoints straight to the remote
  (``RunConfig(storage_filesystem=...)``), and Ray Data reads a version's
  stream straight from it;
* a Train worker fetches the val splits and the checkpoint it starts from
  (verified before use; of a sharded one only the metadata and its ranks' shares,
  :func:`raypath.checkpoint.fetch`); rank 0 publishes its curve at evaluations,
  checkpoints and otherwise every half minute, and its exported release when written.

A mirror whose ``lineage.json`` the remote lacks (a run deleted from the store) is refused at
start, not resumed from (:func:`_check_not_stale`). A file a pull downloaded that the remote no
longer lists (a sweep deleted from the store) is removed from the mirror by the next pull that
lists its directory, where unchanged here since (:meth:`Mirror._drop_gone`).

Files are complete-or-absent on both sides. A download lands in a temporary
sibling that is renamed into place (for a directory the first rename wins, so
workers sharing a node do not trip over each other); an object store creates
an object only when its upload completes. What counts as changed: small
metadata (:data:`MUTABLE`: JSON, JSONL, YAML) is rewritten in place, so it is
copied unless this process, or an earlier one on this machine (:data:`STATE`), downloaded it
before, untouched since on both sides (the remote object's size and modification time,
:data:`SETTLED_S` old when downloaded);
everything else (parquet, weights, tokenizer files) is written once, so it is copied
when missing or of a different size. So are the embedded corpus's JSONL parts
(:data:`WRITE_ONCE`): data, rewritten only by a rebuild, which
publishes them with ``force``. A file this process uploaded or downloaded and has not
changed here since (same size, mtime and inode) is not copied again: a directory published
over and over (a sweep's, after every trial) costs what changed in it, not all it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from raypath.console import Progress
from raypath.sources import filesystem_for, first_line, is_uri
from raypath.storage import (
    LOCKS_DIR,
    STREAMS,
    WRITER_LOCK,
    atomic_file,
    atomic_write_bytes,
    file_lock,
    in_threads,
    read_json,
)

log = logging.getLogger(__name__)

#: Suffixes of files rewritten in place (always copied); all others are write-once.
MUTABLE = (".json", ".jsonl", ".yaml")
#: Directories whose files are written once whatever their suffix, except their top-level
#: records: the embedded corpus (tens of MB of JSONL, copied at every start if taken as metadata).
WRITE_ONCE = ("corpus",)
#: The run's record, at the top of its directory: what makes a directory a run.
LINEAGE = "lineage.json"
#: Top-level entries the driver does not pull at start (fetched one by one where needed).
NOT_MIRRORED = ("ray", "exports", "releases")
#: Top-level entries written here and uploaded, but read by nothing of raypath's (TensorBoard's
#: event files, one set per segment attempt; the report's plot and tables, rewritten at the end
#: of a run): no start pulls them.
WRITE_ONLY = ("tb", "report")
#: Top-level entries of which the driver pulls only the metadata at start: prepared token
#: files are written to and read from the remote by Ray Data, and fetched only where needed;
#: of sweeps, their records and curves (what the reports and the law read), not their checkpoints.
METADATA_ONLY = ("data", "sweeps")
#: A sweep directory's record of its trials (written by :mod:`raypath.sweep`, read by the lineage).
SWEEP_RESULTS = "results.json"
#: A finished sweep's scores of its trials (:data:`raypath.releases.STANDING_JSON`): what status
#: needs of them, a fraction of :data:`SWEEP_RESULTS` (whose trials keep a loss per version).
SWEEP_STANDING = "standing.json"
#: A sweep's settings, fork points and objective weights (:mod:`raypath.sweep`, written once).
SWEEP_JSON = "sweep.json"
#: Trials the law stopper ended early, with its forecasts (written as it decides).
STOPPED_JSON = "stopped.json"
#: Trials whose weights ``sweep.keep_trials`` deleted, with their records (:mod:`raypath.sweep`).
PRUNED_JSON = "pruned.json"
#: The best ``sweep.keep_trials`` finished trials' scores so far, with the pin: what a trial
#: checks before it exports (:func:`raypath.sweep.beaten`); rewritten by each run of the sweep.
KEPT_JSON = "kept.json"
#: A sweep's own records at the top of its directory, Tune's experiment directory, where Tune
#: must not write them back (:meth:`raypath.study.SweepSearch.save_to_dir`).
SWEEP_OWN = (SWEEP_RESULTS, SWEEP_STANDING, SWEEP_JSON, STOPPED_JSON, PRUNED_JSON, KEPT_JSON)
#: What a driver's start pulls of each sweep (with its ``curves/``, which the law reads): its
#: records, not Tune's state and trial directories, which grow with its trials and reports and
#: which only a resumed sweep reads (``raypath sweep`` pulls its own).
SWEEP_RECORDS = (SWEEP_RESULTS, SWEEP_STANDING, SWEEP_JSON, STOPPED_JSON)
#: What a command that reads a run pulls at start (:meth:`RunDir.open` ``reads``), besides the
#: top-level records (``lineage.json``, ``config.yaml``): each sweep's :data:`SWEEP_STANDING`;
#: its :data:`SWEEP_RESULTS` is fetched where its trials are read (the law, a release decision).
#: Enough for status, cost, release and export (which fetches the tokenizer, and a base model's
#: config, itself). Not the embedded corpus, tokenizer, base model, TensorBoard events, data
#: records, nor a sweep's trial directories, checkpoints or Tune state.
RECORDS = ("sweeps",)
#: ... and what the law and a report read too: the curves (a sweep's included) and the law's fits.
CURVES = (*RECORDS, "curves", "law")
CHUNK = 8 << 20
#: remote path -> the stamp (:func:`_stamp`) of the local file this process last uploaded
#: there or downloaded from there; one entry per file copied, dropped by :meth:`RunDir.remove`.
_COPIED: dict[str, tuple[int, int, int]] = {}
#: remote path -> (size, mtime in ns) of the remote object a local copy in :data:`_COPIED` was
#: downloaded from, where that object was :data:`SETTLED_S` old then: a notebook re-reading a
#: sweep of hundreds of trials downloads the records that changed, not all of them at every call.
_PULLED: dict[str, tuple[int, int]] = {}
#: How old a remote object must be for its (size, modification time) to identify its content:
#: object stores keep whole seconds, so an object rewritten within the second it was read keeps
#: both; the margin also covers the skew between this machine's clock and the store's.
SETTLED_S = 60.0
#: A mirror's memory of :data:`_PULLED` between processes (under ``.locks/``, never uploaded nor
#: pulled): remote path relative to the run directory -> the remote object's (size, mtime) and the
#: local copy's stamp. A command's start then downloads the records that changed since the last
#: command on this machine, not every record and curve of the run again (a stale or lost entry
#: costs a download, nothing else: both sides must still match it).
STATE = "mirror.json"
#: The mirrors (local directories) whose :data:`STATE` this process read.
_STATE_READ: set[str] = set()


def _stamp(local: Path) -> tuple[int, int, int]:
    """What changes whenever a file is rewritten here: in place (size, mtime) or by a rename (inode)."""
    st = local.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def is_remote(run_dir: str | os.PathLike) -> bool:
    """A URI with a scheme other than ``file``: kept remotely, worked on through a mirror."""
    return is_uri(str(run_dir))


def default_local_dir(run_dir: str) -> Path:
    """``~/.cache/raypath/<scheme>/<bucket>/<prefix>``: one mirror per remote run directory."""
    u = urlparse(run_dir)
    return Path("~/.cache/raypath", u.scheme, u.netloc, u.path.strip("/")).expanduser()


def run_location(run_dir: str, local_dir: str | None = None,
                 endpoint: str | None = None) -> tuple[Path, Mirror | None]:
    """Where the driver works on ``run_dir``: (absolute local directory, its mirror or None).

    endpoint: S3 endpoint URL; empty = ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
        of the driver (captured here so that nodes without those variables agree).
    """
    if not is_remote(run_dir):
        path = urlparse(run_dir).path if str(run_dir).startswith("file://") else run_dir
        return Path(path).resolve(), None
    local = Path(local_dir).expanduser() if local_dir else default_local_dir(run_dir)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    mirror = Mirror(remote=run_dir.rstrip("/"), local=str(local.resolve()), endpoint=endpoint or None)
    return Path(mirror.local), mirror


@dataclass(frozen=True)
class Mirror:
    """A remote run directory and its local mirror; pickled to Train workers with the segment.

    remote: the run directory's URI, e.g. ``s3://bucket/runs/quickstart``.
    local: absolute local directory mirroring it, the same path on every node.
    endpoint: S3 endpoint URL (MinIO, moto, ...); None = pyarrow's default
        resolution (AWS). Credentials are never stored here: each node reads its
        own (environment, profile or instance role), like any AWS client.
    """

    remote: str
    local: str
    endpoint: str | None = None

    def filesystem(self) -> pafs.FileSystem:
        return filesystem_for(self.remote, self.endpoint)[0]  # cached per process

    def relative(self, path: str | os.PathLike) -> str | None:
        """``path`` relative to the mirror (posix), or None when it lies outside the run directory."""
        try:
            rel = Path(path).resolve().relative_to(self.local)
        except ValueError:
            return None
        return rel.as_posix()

    def name(self, path: str | os.PathLike) -> str:
        """The URI of a local mirror path: what messages call it."""
        rel = self.relative(path)
        return self.remote if rel == "." else f"{self.remote}/{rel}"

    def remote_path(self, path: str | os.PathLike) -> str:
        """Path on :meth:`filesystem` of a local mirror path."""
        rel = self.relative(path)
        if rel is None:
            raise ValueError(f"{path}: not inside the mirror {self.local} of {self.remote}")
        root = filesystem_for(self.remote, self.endpoint)[1]
        return root if rel == "." else f"{root}/{rel}"

    def missing_bucket(self) -> str | None:
        """The name of the bucket the run directory is in, when the store has no such bucket
        (S3, GCS); None otherwise. A listing under a missing bucket is merely empty."""
        fs, root = filesystem_for(self.remote, self.endpoint)
        if fs.type_name not in ("s3", "gcs"):
            return None
        bucket = root.split("/", 1)[0]
        return bucket if fs.get_file_info(bucket).type == pafs.FileType.NotFound else None

    # ---------------------------------------------------------------- reading

    def info(self, path: str | os.PathLike) -> pafs.FileInfo:
        return self.filesystem().get_file_info(self.remote_path(path))

    def read_bytes(self, path: str | os.PathLike) -> bytes | None:
        """Content of the remote file behind ``path``; None when it does not exist."""
        if self.info(path).type != pafs.FileType.File:
            return None
        with self.filesystem().open_input_stream(self.remote_path(path)) as f:
            return f.read()

    def children(self, path: str | os.PathLike) -> list[str]:
        """Names of the entries of the remote directory behind ``path`` ([] when absent)."""
        sel = pafs.FileSelector(self.remote_path(path), allow_not_found=True)
        return sorted(Path(i.path).name for i in self.filesystem().get_file_info(sel))

    def _tree(self, path: str | os.PathLike) -> dict[str, pafs.FileInfo]:
        """Every remote file under ``path``, keyed by its path relative to ``path``."""
        root = self.remote_path(path)
        infos = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1:]: i for i in infos if i.type == pafs.FileType.File}

    def _run_tree(self, skip: tuple[str, ...], only: tuple[str, ...] | None,
                  curves: bool) -> dict[str, pafs.FileInfo]:
        """The remote files a start may pull, keyed by their path in the run directory: those at
        its top, and under each top-level directory not in ``skip`` (and in ``only``, if given)
        every file, but of :data:`METADATA_ONLY` ones only the records (:func:`_listed_records`).
        A listing returns at most a thousand objects a request (S3): what is not listed (a run's
        checkpoints, a version's token files, a sweep's trials) may hold most of them."""
        root, fs = self.remote_path(self.local), self.filesystem()
        infos, subtrees = [], []
        for top in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if top.type == pafs.FileType.File:
                infos.append(top)
            elif top.type == pafs.FileType.Directory and top.base_name not in skip and (
                    only is None or top.base_name in only):
                if top.base_name in METADATA_ONLY:
                    infos += _listed_records(fs, top, curves)
                else:
                    subtrees.append(top.path)
        for got in in_threads(lambda d: fs.get_file_info(pafs.FileSelector(d, recursive=True)), subtrees, STREAMS):
            infos += got
        return {i.path[len(root) + 1:]: i for i in infos if i.type == pafs.FileType.File}

    # ---------------------------------------------------------------- copying

    def _changed(self, local: Path, remote: pafs.FileInfo) -> bool:
        """Whether ``local`` and the remote file may differ (see the module doc)."""
        if remote.type != pafs.FileType.File or not local.is_file():
            return True
        if self._mutable(local):
            return _PULLED.get(remote.path) != (remote.size, remote.mtime_ns) or \
                _COPIED.get(remote.path) != _stamp(local)
        return local.stat().st_size != remote.size

    def _mutable(self, local: Path) -> bool:
        if not local.name.endswith(MUTABLE):
            return False
        parts = Path(self.relative(local) or local.name).parts
        return not (len(parts) > 2 and parts[0] in WRITE_ONCE)

    def pull(self, path: str | os.PathLike, missing_ok: bool = False) -> Path:
        """Make the local ``path`` (file or directory) a copy of the remote one; returns ``path``.

        A directory not here is pulled whole, atomically (of pullers racing on a node the
        first wins); one already here, maybe in part (a checkpoint's metadata, a release's
        cards), gets the files it lacks or that changed. A file is copied when it changed
        (see module doc).
        """
        path = Path(path)
        info = self.info(path)
        if info.type == pafs.FileType.Directory:
            if path.is_dir():
                self.pull_files(path)
            else:
                self._pull_dir(path)
        elif info.type == pafs.FileType.File:
            if self._changed(path, info):
                self._download(info.path, path, info)
        elif not missing_ok:
            raise FileNotFoundError(f"{self.remote}/{self.relative(path)}: not found (needed at {path})")
        return path

    def _download(self, src: str, dst: Path, remote: pafs.FileInfo | None = None,
                  progress: Progress | None = None) -> None:
        """Copy the remote file ``src`` to ``dst``; ``remote``: its info as listed just before;
        ``progress``: counts its bytes as they come."""
        settled = remote is not None and remote.mtime_ns is not None and \
            time.time_ns() - remote.mtime_ns >= SETTLED_S * 1e9
        with self.filesystem().open_input_stream(src) as f, atomic_file(dst) as out:
            _copy_stream(f, out, progress)
        _COPIED[src] = _stamp(dst)
        if settled:  # rewritten since the listing: a later listing shows another mtime
            _PULLED[src] = (remote.size, remote.mtime_ns)
        else:
            _PULLED.pop(src, None)

    def _pull_dir(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".pull", dir=path.parent))
        try:
            # A checkpoint or a release: grows with the model's bytes, several files at a time.
            tree = self._tree(path)
            progress = Progress(log, f"downloading {self.name(path)}", sum(i.size for i in tree.values()), "B")
            in_threads(lambda rel: self._download(tree[rel].path, tmp / rel, tree[rel], progress), list(tree), STREAMS)
            os.chmod(tmp, 0o755)
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a lost race with another puller on this node
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _state_path(self) -> Path:
        return Path(self.local, LOCKS_DIR, STATE)

    def _state(self) -> dict[str, list]:
        """This process's :data:`STATE` entries of this mirror (its downloads, and what it read)."""
        root = self.remote_path(self.local) + "/"
        return {k[len(root):]: [*_PULLED[k], *_COPIED[k]] for k in _PULLED if k.startswith(root) and k in _COPIED}

    def _read_state(self) -> dict[str, list]:
        """The :data:`STATE` of this mirror as saved ({} when none or damaged: download again); the
        first call of a process takes its entries in."""
        try:
            entries = {rel: e for rel, e in json.loads(self._state_path().read_text()).items() if len(e) == 5}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}
        if self.local not in _STATE_READ:
            _STATE_READ.add(self.local)
            root = self.remote_path(self.local)
            for rel, e in entries.items():
                key = f"{root}/{rel}"
                if key not in _PULLED and key not in _COPIED:
                    _PULLED[key], _COPIED[key] = tuple(e[:2]), tuple(e[2:])
        return entries

    def _write_state(self, before: dict[str, list]) -> None:
        """Save :data:`STATE` where this process changed it: over what another process of this
        machine saved since (its entries stay unless this one's differ), less the entries of
        files gone from the mirror (a sweep deleted), so that it grows with what the mirror holds."""
        mine = self._state()
        changed = {rel: e for rel, e in mine.items() if before.get(rel) != e}
        if changed or any(not Path(self.local, rel).is_file() for rel in before):
            entries = {**self._read_state(), **changed}
            entries = {rel: e for rel, e in entries.items() if Path(self.local, rel).is_file()}
            with contextlib.suppress(OSError):  # a read-only mirror: the next start downloads again
                atomic_write_bytes(self._state_path(), json.dumps(entries).encode())

    def _drop_gone(self, path: str | os.PathLike, listed: Iterable[str], scope: Callable[[str], bool]) -> None:
        """Remove here the files under ``path`` that a pull downloaded and the remote no longer
        lists (``listed``: paths relative to ``path``; ``scope``: whether the listing covered a
        relative path), where unchanged here since: deleted there (a sweep removed from the
        store), a copy here would still be read as the run's. ``lineage.json`` is never removed
        (:func:`_check_not_stale` refuses such a mirror instead)."""
        rel = self.relative(path)
        base, listed, gone = "" if rel == "." else f"{rel}/", set(listed), []
        for key, entry in self._state().items():
            sub = key[len(base):]
            local = Path(self.local, key)
            if key.startswith(base) and key != LINEAGE and sub not in listed and scope(sub) and \
                    local.is_file() and _stamp(local) == tuple(entry[2:]):
                local.unlink()
                _PULLED.pop(self.remote_path(local), None)
                _COPIED.pop(self.remote_path(local), None)
                gone.append(key)
                with contextlib.suppress(OSError):  # the directories it leaves empty, up to the mirror's
                    for parent in list(local.parents)[: len(Path(key).parts) - 1]:
                        parent.rmdir()
        if gone:
            log.info("removed %d files of the mirror %s that %s no longer has (e.g. %s)", len(gone), self.local,
                     self.remote, gone[0])

    @contextlib.contextmanager
    def _remembering(self) -> Iterator[None]:
        """Around a bulk pull: start from what earlier processes downloaded here, save what this one adds."""
        before = self._read_state()
        yield
        self._write_state(before)

    def pull_files(self, path: str | os.PathLike, exclude: tuple[str, ...] = (),
                   only: Callable[[str], bool] | None = None) -> None:
        """Copy every remote file under the directory ``path`` here where it changed, except
        under its sub-directories ``exclude`` and, with ``only``, those whose relative posix
        path it refuses."""
        tree = self._tree(path)
        with self._remembering():
            self._drop_gone(path, tree, lambda rel: rel.split("/", 1)[0] not in exclude)
            self._download_all([(info, Path(path, rel)) for rel, info in tree.items()
                                if rel.split("/", 1)[0] not in exclude and (only is None or only(rel))])

    def _download_all(self, files: list[tuple[pafs.FileInfo, Path]]) -> None:
        """Download each remote file (its listed info) to its local path where they may differ,
        several at a time: a run's records and curves are many small objects, each a request's
        round trip. Grows with the files that changed since this machine last pulled them."""
        todo = [(info, dst) for info, dst in files if self._changed(dst, info)]
        in_threads(lambda f: self._download(f[0].path, f[1], f[0]), todo, STREAMS)

    def pull_run(self, reads: tuple[str, ...] | None = None, sweep_curves: bool = True) -> set[str]:
        """The driver's start: copy the remote run directory here, except :data:`NOT_MIRRORED`
        and :data:`WRITE_ONLY` (not even listed), of ``data/`` its records (the manifest, each
        version's file list) and of each sweep its :data:`SWEEP_RECORDS` and curves (neither
        listed beyond them: :func:`_listed_records`). Grows with the objects under the other
        top-level entries (listed whole), with the versions and sweeps (a listing per directory
        down to their records), and with the sweeps' curves; not with token files, trials or
        checkpoints.

        reads: a reader's start (:data:`RECORDS`, :data:`CURVES`): the top-level files and the
        top-level directories ``reads`` only, the others not even listed; of a sweep only its
        :data:`SWEEP_STANDING`, and its curves where ``reads`` has ``curves``.

        sweep_curves: a driver's start pulls the sweeps' curves (a law-guided sweep fits on them);
        ``raypath run``'s does not (it reads a sweep's records only), so its start does not grow
        with the trials.

        Returns the relative paths of the remote files listed (whether copied or not)."""
        skip = NOT_MIRRORED + WRITE_ONLY + (LOCKS_DIR,)
        curves = "curves" in reads if reads is not None else sweep_curves
        tree = self._run_tree(skip, reads, curves)
        with self._remembering():
            self._drop_gone(self.local, tree, lambda rel: "/" not in rel or (
                rel.split("/", 1)[0] not in skip and (reads is None or rel.split("/", 1)[0] in reads)
                and _record_listed(rel.split("/"), curves)))
            if LINEAGE in tree:  # not over the copy another process of this machine is saving and uploading
                with file_lock(Path(self.local, LOCKS_DIR, "lineage.lock"), f"pulling {self.remote}/{LINEAGE}"):
                    self._download_all([(tree[LINEAGE], Path(self.local, LINEAGE))])
            pulled = []
            for rel, info in tree.items():
                top = rel.split("/", 1)[0]
                if rel in (LINEAGE, WRITER_LOCK):  # the lock: a writer's, kept in the store (storage.writer_lock)
                    continue
                if top in METADATA_ONLY and not rel.endswith(MUTABLE):
                    continue
                parts = rel.split("/")  # of a sweep: sweeps/<version>/<name>/...
                if top == "sweeps" and not _pulled_of_sweep(parts[3:], reads, sweep_curves):
                    continue
                pulled.append((info, Path(self.local, rel)))
            self._download_all(pulled)
        return set(tree)

    def push(self, path: str | os.PathLike, force: bool = False, exclude: tuple[str, ...] = ()) -> None:
        """Upload the local ``path`` (file or directory) where it changed (every file with
        ``force``: rewritten write-once files); metadata last. ``exclude``: names of
        sub-directories or files of ``path`` not to upload (what others upload, or write
        straight to the store).

        Metadata (a manifest, a model card) describes the files next to it, so a
        remote reader never sees it before them.

        Grows with the files under ``path`` that changed since this process last copied them
        (one upload each, one listing per directory of the write-once ones among them), and
        with a local walk of ``path``; not with what the store holds under it.
        """
        path = Path(path)
        if not path.exists():
            return
        if path.is_file():
            files = {"": path}
        else:
            files = {rel: p for p in path.rglob("*")
                     if (rel := p.relative_to(path).as_posix()).split("/", 1)[0] not in exclude and p.is_file()}
        stamps = {}
        for rel, p in list(files.items()):
            try:
                stamps[rel] = _stamp(p)
            except FileNotFoundError:  # a temporary file renamed away since the walk (Tune's)
                del files[rel]
        if not force:
            files = {rel: p for rel, p in files.items() if _COPIED.get(self.remote_path(p)) != stamps[rel]}
        remote = {} if force else self._infos(p for p in files.values() if not self._mutable(p))
        todo = []
        for rel in files:
            local, dst = files[rel], self.remote_path(files[rel])
            if not force and not self._mutable(local) and not self._changed(local, remote[dst]):
                _COPIED[dst] = stamps[rel]
            else:
                todo.append(rel)
        fs = self.filesystem()
        self._make_parents(self.remote_path(files[rel]) for rel in todo)
        progress = Progress(log, f"uploading {self.name(path)}", sum(stamps[rel][0] for rel in todo), "B")

        def upload(rel: str) -> None:
            dst = self.remote_path(files[rel])
            _upload(files[rel], fs, dst, progress)
            _COPIED[dst] = stamps[rel]

        self._in_order(todo, lambda rel: not self._mutable(files[rel]), upload)

    def upload(self, local: Path, path: str | os.PathLike) -> None:
        """Copy the local file ``local`` to ``path``'s place in the store: a file written under
        a temporary name that a rename here (or on another node) will give ``path``."""
        dst = self.remote_path(path)
        self._make_parents([dst])
        _upload(local, self.filesystem(), dst, Progress(log, f"uploading {self.name(path)}", local.stat().st_size, "B"))
        _COPIED[dst] = _stamp(local)  # a rename keeps the stamp: a later push of path skips it

    def _make_parents(self, paths: Iterable[str]) -> None:
        """Create the remote parent directory of each of ``paths`` (object stores need none;
        other filesystems do), one call per directory."""
        fs = self.filesystem()
        for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):
            fs.create_dir(parent, recursive=True)

    @staticmethod
    def _in_order(rels: list[str], data: Callable[[str], bool], copy: Callable[[str], None]) -> None:
        """``copy`` each of ``rels``: the write-once files (``data``) several at a time (a store
        serves each stream at a fraction of the node's bandwidth), then the records one by one in
        :func:`_upload_order`, so a remote reader never sees a record before the files it names."""
        in_threads(copy, sorted(r for r in rels if data(r)), STREAMS)
        for rel in sorted((r for r in rels if not data(r)), key=_upload_order):
            copy(rel)

    def _infos(self, paths) -> dict[str, pafs.FileInfo]:
        """Remote path -> remote file info of each local path (a missing file's says NotFound): one
        request for a directory's only such file, else one listing of the directory."""
        by_parent: dict[str, set[str]] = {}
        for p in paths:
            dst = self.remote_path(p)
            by_parent.setdefault(dst.rsplit("/", 1)[0], set()).add(dst)
        fs, out = self.filesystem(), {}
        for parent, wanted in by_parent.items():
            if len(wanted) == 1:
                out.update((i.path, i) for i in fs.get_file_info(list(wanted)))
                continue
            found = {i.path: i for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))}
            out.update((w, found.get(w) or pafs.FileInfo(w, pafs.FileType.NotFound)) for w in wanted)
        return out


    def copy(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Copy the remote directory behind ``src`` to ``dst``'s inside the store: server-side
        where it can (S3's CopyObject takes objects up to 5 GiB), else streamed through here.
        Grows with the directory's bytes (a release: the model's weights), several files at a time."""
        tree, base = self._tree(src), self.remote_path(dst)
        self._make_parents(f"{base}/{rel}" for rel in tree)
        fs = self.filesystem()
        size = sum(i.size for i in tree.values())
        progress = Progress(log, f"copying {self.name(src)} to {self.name(dst)}", size, "B")

        def copy(rel: str) -> None:
            source, target = tree[rel].path, f"{base}/{rel}"
            try:
                fs.copy_file(source, target)
                progress.add(tree[rel].size)
            except OSError:  # a store without server-side copy, or an object past its limit
                with fs.open_input_stream(source) as f, fs.open_output_stream(target) as out:
                    _copy_stream(f, out, progress)

        self._in_order(list(tree), lambda rel: not rel.endswith(MUTABLE), copy)


def _upload(local: Path, fs: pafs.FileSystem, dst: str, progress: Progress) -> None:
    """Copy the local file to ``dst`` on ``fs`` (an object store's upload completes, and the
    object appears, when the stream closes)."""
    with open(local, "rb") as f, fs.open_output_stream(dst) as out:
        _copy_stream(f, out, progress)


def _copy_stream(f: Any, out: Any, progress: Progress | None = None) -> None:
    """Copy the open stream ``f`` to ``out`` in :data:`CHUNK` pieces, each counted in ``progress``."""
    while block := f.read(CHUNK):
        out.write(block)
        if progress is not None:
            progress.add(len(block))


def _upload_order(rel: str) -> tuple:
    """Data before metadata, and of metadata the deepest first: a record names the files next to
    it or below it (``data/manifest.json`` names ``data/vK/files.json``), never above."""
    return rel.endswith(MUTABLE), -rel.count("/"), rel




# ------------------------------------------------------------ the run-directory handle

@dataclass(frozen=True)
class RunDir:
    """A run directory, local or remote: every module reads and writes run files through it.

    Paths are always local (the directory itself, or a remote one's mirror); the methods
    make a remote run directory's copy agree with them. For a local run directory they are
    plain file operations, so callers never ask which kind they hold. Pickled to Ray
    workers and tasks with what they run (a segment, a preparation spec).

    path: where its files are read and written: the directory itself, or for a remote
        run directory its local mirror (filled from the remote when opened).
    mirror: the remote run directory behind ``path``; None for a local one.
    """

    path: Path
    mirror: Mirror | None = None

    @classmethod
    def open(cls, run_dir: str | os.PathLike, local_dir: str | None = None, endpoint: str | None = None, *,
             create: bool = False, reads: tuple[str, ...] | None = None, sweep_curves: bool = True) -> "RunDir":
        """Open ``run_dir`` (a path or URI): a remote one is pulled into its mirror first
        (:meth:`Mirror.pull_run`; with ``reads``, what a command that only reads the run needs,
        :data:`RECORDS` or :data:`CURVES`). ``create`` makes a missing local directory (and checks
        it is writable); otherwise a run directory that does not exist is refused, by name.
        ``sweep_curves``: as :meth:`Mirror.pull_run`'s."""
        from raypath.config import ConfigError

        path, mirror = run_location(str(run_dir), local_dir, endpoint)
        if mirror is not None:
            try:
                listed = mirror.pull_run(reads, sweep_curves)
                # else a run's start fails at its first upload, after the corpus is built, as unexpected
                bucket = mirror.missing_bucket() if not listed else None
            except (OSError, ValueError) as e:  # unreachable endpoint, rejected credentials, no bucket, bad scheme
                raise ConfigError(f"run_dir: cannot read {run_dir}: {first_line(e)}") from None
            if bucket is not None:
                raise ConfigError(f"run_dir: {run_dir}: the store at {mirror.endpoint or 'its default endpoint'} has "
                                  f"no bucket {bucket!r} (raypath creates no buckets: create it, or correct the URI "
                                  f"or cluster.storage_endpoint)")
            _check_not_stale(mirror, listed)
            _OPENED[mirror.local] = mirror.remote
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=path).close()
            except OSError as e:
                raise ConfigError(f"run_dir: {path} is not a writable directory ({e.strerror or e})") from None
        elif mirror is not None and not path.is_dir():
            raise FileNotFoundError(f"{run_dir}: nothing there (not a raypath run directory)")
        return cls(path, mirror)

    @property
    def uri(self) -> str:
        """What the user calls it: the remote URI, or the local path."""
        return self.mirror.remote if self.mirror is not None else str(self.path)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def remote(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is kept in a remote run directory (else it is a plain local file:
        a local run's, or one outside the run directory)."""
        return self.mirror is not None and self.mirror.relative(path) is not None

    def name(self, path: str | os.PathLike) -> str:
        """``path`` as messages call it: its URI in a remote run directory."""
        return self.mirror.name(path) if self.remote(path) else str(path)

    # ---- reading
    def fetch(self, path: str | os.PathLike, missing_ok: bool = False) -> Path:
        """``path`` (file or directory), pulled first from a remote run directory (:meth:`Mirror.pull`)."""
        return self.mirror.pull(path, missing_ok) if self.remote(path) else Path(path)

    def pull_files(self, path: str | os.PathLike, exclude: tuple[str, ...] = (),
                   only: Callable[[str], bool] | None = None) -> None:
        """Refresh every file under the directory ``path`` from a remote run directory
        (:meth:`Mirror.pull_files`); a no-op for a local one."""
        if self.remote(path):
            self.mirror.pull_files(path, exclude, only)

    def read_json(self, path: str | os.PathLike) -> Any:
        """A JSON file, read where it is kept (remotely, without touching the mirror)."""
        if not self.remote(path):
            return read_json(path)
        raw = self.mirror.read_bytes(path)
        if raw is None:
            raise FileNotFoundError(f"{self.name(path)}: not found")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.name(path)}: not valid JSON ({e})") from None

    def children(self, path: str | os.PathLike) -> list[str]:
        """Names of the entries of the directory ``path`` where it is kept ([] when absent)."""
        if self.remote(path):
            return self.mirror.children(path)
        return sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []

    def file_sizes(self, path: str | os.PathLike) -> dict[str, int]:
        """Every file under the directory ``path`` where it is kept: ``{relative posix path: bytes}``."""
        if self.remote(path):
            return {rel: info.size for rel, info in self.mirror._tree(path).items()}
        root = Path(path)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

    def open_remote(self, path: str | os.PathLike) -> pa.NativeFile:
        """The remote copy of the file ``path``, open for reads at any offset (``read_at``: one
        ranged request each): for reading a slice of a large file without downloading it."""
        return self.mirror.filesystem().open_input_file(self.mirror.remote_path(path))

    def source(self, path: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
        """(path, filesystem) of ``path`` to hand to Ray (Data reads, Train storage): the remote
        one for a remote run directory, else (local path, None)."""
        if self.remote(path):
            return self.mirror.remote_path(path), self.mirror.filesystem()
        return str(path), None

    def target(self, path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) that workers write ``path`` to directly (Ray Data actors writing
        prepared data): the remote one for a remote run directory."""
        p, fs = self.source(path)
        return (fs, p) if fs is not None else (pafs.LocalFileSystem(), str(Path(p).resolve()))

    # ---- writing
    def publish(self, path: str | os.PathLike, force: bool = False, exclude: tuple[str, ...] = ()) -> None:
        """Upload ``path`` (file or directory) to a remote run directory, where it changed (all
        of it with ``force``, :meth:`Mirror.push`), but not its sub-directories or files named
        in ``exclude``; a no-op for a local one."""
        if self.remote(path):
            self.mirror.push(path, force, exclude)

    def upload(self, local: Path, path: str | os.PathLike) -> None:
        """Upload the local file ``local`` as ``path`` of a remote run directory (a no-op for a
        local one): what a worker writes under a temporary name another process renames."""
        if self.remote(path):
            self.mirror.upload(Path(local), path)

    def copy_in_store(self, src: str | os.PathLike, dst: str | os.PathLike) -> bool:
        """Copy the directory ``src`` to ``dst`` inside a remote run directory's store, where
        nothing passes through this machine (:meth:`Mirror.copy`); returns False, doing
        nothing, unless both are kept remotely."""
        if not (self.remote(src) and self.remote(dst)):
            return False
        self.mirror.copy(src, dst)
        return True

    def remove(self, path: str | os.PathLike) -> None:
        """Delete the file or directory ``path`` (missing is fine), and its remote copy."""
        path = Path(path)
        if self.remote(path):
            info = self.mirror.info(path)
            fs, where = self.mirror.filesystem(), self.mirror.remote_path(path)
            for key in [k for k in _COPIED if k == where or k.startswith(f"{where}/")]:
                del _COPIED[key]  # gone from the store: a publish copies it again
                _PULLED.pop(key, None)
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(where)
            elif info.type == pafs.FileType.File:
                fs.delete_file(where)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


#: The mirrors this process opened: local directory -> the run directory's URI.
_OPENED: dict[str, str] = {}


def in_store_terms(message: str) -> str:
    """``message`` with the files of the mirrors this process opened named by their URIs: a
    record to restore or fix is the store's (the next start overwrites the mirror's copy)."""
    for local, remote in _OPENED.items():
        message = message.replace(local + os.sep, remote + "/")
    return message


def _listed_records(fs: pafs.FileSystem, top: pafs.FileInfo, curves: bool) -> list[pafs.FileInfo]:
    """The files of a :data:`METADATA_ONLY` top-level directory that a start may pull, listed
    without what lies below them (:func:`_record_listed`): one listing per directory down to the
    records, several at a time. Grows with the versions and sweeps, not with their token files
    or trials."""
    def shallow(path: str) -> list[pafs.FileInfo]:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def below(level: list[list[pafs.FileInfo]], name: str | None = None) -> list[str]:
        return [i.path for infos in level for i in infos
                if i.type == pafs.FileType.Directory and (name is None or i.base_name == name)]

    levels = [[shallow(top.path)]]  # data/ and data/<v>/; sweeps/, sweeps/<v>/ and sweeps/<v>/<sweep>/
    for _ in range(1 if top.base_name == "data" else 2):
        levels.append(in_threads(shallow, below(levels[-1]), STREAMS))
    files = [i for level in levels for infos in level for i in infos if i.type == pafs.FileType.File]
    if top.base_name == "sweeps" and curves:
        deep = in_threads(lambda d: fs.get_file_info(pafs.FileSelector(d, recursive=True)),
                          below(levels[-1], "curves"), STREAMS)
        files += [i for infos in deep for i in infos]
    return files


def _record_listed(parts: list[str], curves: bool) -> bool:
    """Whether :func:`_listed_records` lists the run directory's file ``parts`` (path parts), were it
    there: of ``data``, those down to ``data/<v>/`` (the manifest and each version's file list,
    not the token files); of ``sweeps``, those down to a sweep's own (its records, not its trials'
    directories nor its checkpoints) and, with ``curves``, its curves; all of the others."""
    if parts[0] == "data":
        return len(parts) <= 3
    if parts[0] == "sweeps":
        return len(parts) <= 4 or (curves and parts[3] == "curves")  # sweeps/<v>/<sweep>/...
    return True


def _pulled_of_sweep(rel: list[str], reads: tuple[str, ...] | None, sweep_curves: bool = True) -> bool:
    """Whether a start pulls the file ``rel`` (path parts) of a sweep directory: a reader's, its
    :data:`SWEEP_STANDING` and, where it reads them, its curves; a driver's, its
    :data:`SWEEP_RECORDS` and, with ``sweep_curves``, its curves."""
    curves = rel[:1] == ["curves"]
    if reads is not None:
        return rel == [SWEEP_STANDING] or (curves and "curves" in reads)
    return (curves and sweep_curves) or (len(rel) == 1 and rel[0] in SWEEP_RECORDS)


def _check_not_stale(mirror: Mirror, listed: set[str]) -> None:
    """Refuse a mirror whose record the remote lacks: the run was deleted from the store (or its
    record never reached it), so the mirror's lineage names checkpoints and releases that are not
    there. A reader would show them and a driver would skip versions as done and publish that
    record back; neither may guess which copy to keep, so the user is told, and nothing is removed."""
    if LINEAGE not in listed and Path(mirror.local, LINEAGE).is_file():
        from raypath.config import ConfigError

        raise ConfigError(f"run_dir: {mirror.remote} has no {LINEAGE}, but its mirror {mirror.local} has one (a run "
                          f"deleted from the store, or a record that never reached it); the store's copy is the run: "
                          f"delete {mirror.local} or mirror it elsewhere (cluster.local_dir, --local-dir)")


#: The local filesystem as a run-directory handle: for files read or written outside any
#: run directory (a checkpoint verified on its own, a test's fixture).
LOCAL = RunDir(Path("/"))
