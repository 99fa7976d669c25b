"""Atomic writes: every file raypath owns is complete or absent.

A crash (or a killed worker) mid-write must never leave a half-written lineage,
manifest or checkpoint that a later run would trust. We write to a temporary
sibling and ``os.replace`` it into place, which POSIX makes atomic on one
filesystem. The exception is a JSONL log that is appended to (a curve): a crash can
cut its last line short, so appends start on a line of their own (:func:`end_line`) and
readers skip what is not a record (:func:`read_jsonl`).

A process killed outright (SIGKILL, a lost node) cannot remove its temporary sibling: the
sibling's name says which host and process wrote it, and the next write of the same file
removes those of dead processes (:func:`_remove_stale`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

log = logging.getLogger(__name__)


#: A temporary sibling of another host (or of a name without one) is taken for dead this long
#: after its last change: its process cannot be asked.
STALE_S = 24 * 3600


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def _remove_stale(path: Path) -> None:
    """Remove the temporary siblings of ``path`` (``.NAME.HOST-PID.XXXX.tmp``, file or directory)
    whose process is gone: of this host, a pid that no longer runs; else older than :data:`STALE_S`."""
    # One listing of the directory per write: about 1 ms in a directory of 2,000 entries.
    host, now, prefix = socket.gethostname(), time.time(), f".{path.name}."
    with os.scandir(path.parent) as entries:
        temps = [Path(e.path) for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    for p in temps:
        writer = p.name[len(prefix):-len(".tmp")].rsplit(".", 1)[0]  # HOST-PID (older names: random)
        who, _, pid = writer.rpartition("-")
        try:
            dead = _gone(int(pid)) if who == host and pid.isdigit() else now - p.lstat().st_mtime > STALE_S
            if dead:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:  # removed by another process meanwhile
            pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's
        return False
    return False


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; run files are read by workers that may run as other users.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power loss (the file's own fsync does not)."""
    with contextlib.suppress(OSError):  # e.g. filesystems that cannot open directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def new_figure(figsize: tuple[float, float]):
    """A matplotlib figure outside pyplot: drawing a report file then needs no display and leaves
    the caller's backend and open figures alone (a notebook's inline plots keep showing)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, tight: bool = True) -> Path:
    """Write a matplotlib figure as a PNG atomically; returns the path.

    tight: crop to the drawn content (legends outside the axes included); false keeps the
        figure's own size, for reports whose PNGs should all be the same size."""
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, root: str | os.PathLike | None = None) -> None:
    """Write ``obj`` as JSON atomically; with ``root``, paths inside it are stored relative
    (:func:`relative_paths`), so the directory can be moved or mirrored elsewhere."""
    if root is not None:
        obj = relative_paths(obj, root)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# ---------------------------------------------------------------- movable run directories
#
# Records (lineage, data manifest, sweep and release records) name files of their run
# directory. On disk such a path is stored relative to the run directory, as "./<posix
# path>" ("." for the directory itself): the "./" tells it apart from any other string, so
# no reader needs to know which fields are paths. In memory they are absolute again, under
# wherever the run directory is now. Paths outside it (a corpus elsewhere) stay absolute.
# The user's own config (``config`` subtrees) is stored as given.

RELATIVE = "./"
#: Keys whose subtree is stored verbatim: the run's config is the user's input.
VERBATIM = ("config",)


def _under(value: str, root: str) -> str | None:
    if value == root:
        return "."
    if value.startswith(root + "/"):
        return RELATIVE + value[len(root) + 1:]
    return None


def _map_strings(obj: Any, fn) -> Any:
    """``obj`` with ``fn`` applied to every string in it, except under :data:`VERBATIM` keys."""
    if isinstance(obj, dict):
        return {k: (v if k in VERBATIM else _map_strings(v, fn)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def relative_paths(obj: Any, root: str | os.PathLike) -> Any:
    """A copy of ``obj`` with every absolute path under ``root`` written as ``./relative``."""
    root = str(Path(root).resolve()).rstrip("/")
    return _map_strings(obj, lambda s: (_under(s, root) or s) if s.startswith("/") else s)


def absolute_paths(obj: Any, root: str | os.PathLike) -> Any:
    """The inverse of :func:`relative_paths`: ``./relative`` strings become paths under ``root``."""
    root = str(Path(root).resolve()).rstrip("/")

    def conv(s: str) -> str:
        if s == ".":
            return root
        return f"{root}/{s[len(RELATIVE):]}" if s.startswith(RELATIVE) else s

    return _map_strings(obj, conv)


def rebase_paths(obj: Any, old_root: str | os.PathLike, new_root: str | os.PathLike) -> Any:
    """Absolute paths under ``old_root`` (where a run directory was) moved under ``new_root``."""
    return absolute_paths(relative_paths(obj, old_root), new_root) if str(old_root) != str(new_root) else obj


class RunFileError(ValueError):
    """A file of a run directory (lineage, manifest, state) is unreadable, truncated or of a
    format this raypath does not know; the message names the file."""


#: The lock file of a run directory's writer (:func:`writer_lock`): at the top for ``raypath run``
#: (the whole directory's), ``.locks/sweeps-vK-NAME.writer.lock`` for a sweep (its directory's).
WRITER_LOCK = ".writer.lock"
#: Lock files of short critical sections that writers of one run directory take in turn
#: (:func:`file_lock`): the lineage's saves, one version's release decisions. Never uploaded.
LOCKS_DIR = ".locks"
#: How long :func:`file_lock` waits for another process's critical section (a release copying a
#: model's files holds its version's) before it gives up, naming the lock.
LOCK_WAIT_S = 1800.0
#: A writer refreshes its lock this often; a lock of another host not refreshed for
#: :data:`WRITER_STALE_S` is a dead writer's (a stopped job, a deleted pod): its pid cannot be asked.
WRITER_REFRESH_S = 20.0
WRITER_STALE_S = 120.0


class RunDirBusyError(RunFileError):
    """Another process writes the run directory: two writers would each save their own copy of
    the lineage over the other's (the last one wins) and train the same checkpoints."""


def _live(record: dict | None, age: float) -> dict | None:
    """The writer a lock ``record`` names, unless it is gone: of this host when its pid is, of
    another when the lock was not refreshed for :data:`WRITER_STALE_S` (``age``, seconds)."""
    if record is None:
        return None
    here = record.get("host") == socket.gethostname()
    return None if (_gone(int(record.get("pid", 0))) if here else age > WRITER_STALE_S) else record


#: A lock record that does not read back: being written this instant, so a live writer's.
_UNREAD = {"host": "?", "pid": 0, "what": "?", "argv": "?", "since": "?"}


def _lock_holder(lock: Path) -> dict | None:
    """The live writer that holds ``lock``; None if the lock is absent or its writer is gone."""
    try:
        record, age = json.loads(lock.read_text()), time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return _UNREAD
    return _live(record, age)


def _store_holder(mirror, lock: Path) -> dict | None:
    """:func:`_lock_holder` of the lock in a remote run directory's store (``mirror``: its
    :class:`raypath.mirror.Mirror`): a driver on another machine holds its lock there."""
    import pyarrow.fs as pafs

    info = mirror.info(lock)
    if info.type != pafs.FileType.File:
        return None
    try:
        record = json.loads(mirror.read_bytes(lock) or b"null")
    except ValueError:
        return _UNREAD
    except OSError:  # deleted (its writer ended) or rewritten while read: as it is now
        return _store_holder(mirror, lock) if mirror.info(lock).type != pafs.FileType.File else _UNREAD
    return _live(record, time.time() - info.mtime_ns / 1e9)


def _put_in_store(mirror, lock: Path, data: bytes) -> None:
    with mirror.filesystem().open_output_stream(mirror.remote_path(lock)) as f:
        f.write(data)


def _refreshed_at(mirror, lock: Path) -> float | None:
    """When ``lock`` was last written or refreshed (in the store, for a run in a bucket)."""
    import pyarrow.fs as pafs

    if mirror is not None:
        info = mirror.info(lock)
        if info.type == pafs.FileType.File:
            return info.mtime_ns / 1e9
    try:
        return lock.stat().st_mtime
    except FileNotFoundError:
        return None


def _wait_for_life(mirror, lock: Path, holder: dict, what: str) -> dict | None:
    """The writer of another host that ``lock`` names, if it is alive: one refreshed it lately, or
    refreshes it while this waits; None once its lock goes stale (:data:`WRITER_STALE_S`). A live
    writer refreshes its lock every :data:`WRITER_REFRESH_S`, so one silent longer is probably dead
    (a job retried on a fresh cluster after its head pod died): waiting out the rest of the stale
    time takes it over, where refusing would fail the retry."""
    seen = _refreshed_at(mirror, lock)
    if seen is None or time.time() - seen < 1.5 * WRITER_REFRESH_S:
        return holder
    log.warning("%s: the %s of pid %s on %s has not refreshed this lock for %.0f s; %s waits until it "
                "does (then it is refused) or it is %g s old (then it takes it over)", lock, holder.get("what"),
                holder.get("pid"), holder.get("host"), time.time() - seen, what, WRITER_STALE_S)
    while True:
        time.sleep(min(2.0, WRITER_REFRESH_S / 4))
        holder = (mirror is not None and _store_holder(mirror, lock)) or _lock_holder(lock)
        if not holder or _refreshed_at(mirror, lock) != seen:
            return holder


def _take(lock: Path, me: dict) -> dict | None:
    """Create ``lock`` for ``me`` (O_EXCL: of two writers starting at once, one gets it), or take
    over a dead writer's; returns the live holder instead when there is one."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _lock_holder(lock)
        if not holder:
            atomic_write_bytes(lock, json.dumps(me).encode())
        return holder
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    return None


@contextlib.contextmanager
def writer_lock(rd, what: str, part: str = "") -> Iterator[None]:
    """Hold ``RUN_DIR/.writer.lock`` while ``what`` (``run``, ``sweep v2``) writes the run directory
    ``rd`` (a :class:`raypath.mirror.RunDir`, or a local path), or with ``part`` (a sweep's directory,
    relative to it) ``RUN_DIR/.locks/<part>.writer.lock`` while it writes that part. A second
    writer of the same lock fails at once with :class:`RunDirBusyError`; a nested one of this
    process (a comparison's runs) goes on. Writers of different parts share the lineage, whose saves
    merge (:class:`raypath.lineage.Lineage`). The lock names its host and pid and is refreshed by a
    thread, so a killed writer's lock is taken over: of this host as soon as its pid is gone, of
    another after :data:`WRITER_STALE_S` (one that has gone unrefreshed for a while is waited out,
    :func:`_wait_for_life`).

    A run directory in a bucket holds the lock in its store as well as in the local mirror, so a
    driver on another machine sees it. A store has no create-if-absent here: two drivers starting
    in the same second could both take it; any later one is refused."""
    import sys

    path, mirror = Path(getattr(rd, "path", rd)), getattr(rd, "mirror", None)
    lock = path / LOCKS_DIR / f"{part.replace('/', '-')}{WRITER_LOCK}" if part else path / WRITER_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "argv": " ".join(sys.argv)[:300],
          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    holder = (mirror is not None and _store_holder(mirror, lock)) or _lock_holder(lock)
    if holder and (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
        yield  # this process holds it already
        return
    if holder and holder.get("host") not in (me["host"], "?"):
        holder = _wait_for_life(mirror, lock, holder, what)
    holder = holder or _take(lock, me)
    if holder:
        where = f"{getattr(mirror, 'remote', path)}" + (f" ({part})" if part else "")
        raise RunDirBusyError(
            f"run_dir: {where} is being written by a {holder.get('what')} "
            f"({holder.get('argv')}: pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); "
            f"wait for it to end, or stop it, and run again (a writer that died leaves {lock.name}, taken over "
            f"after {WRITER_STALE_S:g} s)")
    stop = threading.Event()

    def publish() -> None:
        with contextlib.suppress(OSError):
            if mirror is not None:  # a store cannot touch an object: it is written again
                _put_in_store(mirror, lock, json.dumps(me).encode())
            os.utime(lock)

    def refresh() -> None:
        while not stop.wait(WRITER_REFRESH_S):
            publish()

    refresh_thread = threading.Thread(target=refresh, name="raypath-writer-lock", daemon=True)
    try:
        publish()  # in the store before anything is written there
        refresh_thread.start()
        yield
    finally:
        stop.set()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
                if mirror is not None and (_store_holder(mirror, lock) or {}).get("pid") == me["pid"]:
                    mirror.filesystem().delete_file(mirror.remote_path(lock))


_HELD: dict[str, list] = {}  # lock path -> [threading.RLock, held: (open file, store lease) or None, depth]
_HELD_GUARD = threading.Lock()
#: A lock object in a store (:class:`_StoreLease`) not refreshed for this long is a dead holder's.
LEASE_S = 60.0
#: How long a taker waits after writing its lock object before reading it back: of takers writing
#: at once the last write wins, and each reads which one it was. A taker whose write landed more
#: than half of it after it saw no holder tries again (:class:`_StoreLease`).
LEASE_SETTLE_S = 1.0


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, wait_s: float = LOCK_WAIT_S, store=None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made if absent) while the block runs: a short
    critical section that every process sharing the run directory takes in turn, on this host or
    over a shared filesystem (``flock``, which Linux's NFS client maps to NFS locks). Re-entrant in
    a process (its threads take turns). Waits up to ``wait_s`` seconds for another holder, then
    raises :class:`RunDirBusyError` naming ``what`` and the lock; a killed holder's lock is freed by
    its kernel (or NFS lease) with it, so none is ever stale.

    store: the :class:`raypath.mirror.Mirror` of a run directory in a bucket (``path`` lies in its
    mirror): the lock is also held in the store, for processes on other machines
    (:class:`_StoreLease`)."""
    key = str(Path(path).absolute())
    with _HELD_GUARD:
        held = _HELD.setdefault(key, [threading.RLock(), None, 0])
    deadline = time.monotonic() + wait_s
    if not held[0].acquire(timeout=wait_s):
        raise RunDirBusyError(f"{path}: {what} waited {wait_s:g} s for another thread holding this lock")
    try:
        if held[2] == 0:
            f = _flock(Path(path), what, wait_s, deadline)
            try:
                lease = _StoreLease(store, Path(path), what, wait_s, deadline) if store is not None else None
            except BaseException:
                f.close()
                raise
            held[1] = (f, lease)
        held[2] += 1
        try:
            yield
        finally:
            held[2] -= 1
            if held[2] == 0:
                f, lease = held[1]
                held[1] = None
                if lease is not None:
                    lease.release()
                f.close()  # releases the flock
    finally:
        held[0].release()


def _flock(path: Path, what: str, wait_s: float, deadline: float):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise RunDirBusyError(f"{path}: {what} waited {wait_s:g} s for another process holding this "
                                      f"lock (a release copying its files?); run again") from None
            time.sleep(0.05)


class _StoreLease:
    """The lock ``path`` (of a mirror) held in its store: an object naming its holder (host, pid,
    a nonce), refreshed by a thread every :data:`LEASE_S` / 4, taken over once :data:`LEASE_S` old
    (a killed holder's). A store has no create-if-absent here, so a taker takes turns by timing
    (Fischer's mutual exclusion): it reads that no one holds the lock, writes its record, waits
    :data:`LEASE_SETTLE_S` and reads it back: of takers writing at once the last one wins, and the
    others wait again. That holds while every write lands within half the wait of its taker's
    read, which each taker checks: one whose write was slower (a stalled machine) does not enter,
    and its record, which may have replaced a holder's, counts as a holder's until that holder's
    refresh would have shown (:data:`LEASE_S` / 3). A hold costs the wait and ~19 requests
    (``benchmarks/lineage_writers.py``)."""

    def __init__(self, mirror, path: Path, what: str, wait_s: float, deadline: float):
        import uuid

        self.mirror, self.path, self.stop = mirror, path, threading.Event()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what}
        slow: dict[str, float] = {}  # nonces of this taker's writes that landed too late -> when
        while True:
            t0 = time.monotonic()
            holder = self._holder()
            nonce = (holder or {}).get("nonce")
            if holder is None or (nonce in slow and t0 - slow[nonce] > LEASE_S / 3):
                self.me["nonce"] = uuid.uuid4().hex
                _put_in_store(mirror, path, json.dumps(self.me).encode())
                if time.monotonic() - t0 > LEASE_SETTLE_S / 2:
                    slow[self.me["nonce"]] = time.monotonic()
                else:
                    time.sleep(LEASE_SETTLE_S)
                    if (self._holder() or {}).get("nonce") == self.me["nonce"]:
                        break
            if time.monotonic() > deadline:
                raise RunDirBusyError(f"{mirror.remote_path(path)}: {what} waited {wait_s:g} s for "
                                      f"{(holder or {}).get('what')} (pid {(holder or {}).get('pid')} on "
                                      f"{(holder or {}).get('host')}) holding this lock; run again")
            time.sleep(0.1 + 0.2 * (os.getpid() % 7) / 7)  # takers of different processes drift apart
        self.thread = threading.Thread(target=self._refresh, name="raypath-store-lease", daemon=True)
        self.thread.start()

    def _holder(self) -> dict | None:
        """The live holder named in the store; None when there is none or its lease ran out."""
        import pyarrow.fs as pafs

        info = self.mirror.info(self.path)
        if info.type != pafs.FileType.File or time.time() - info.mtime_ns / 1e9 > LEASE_S:
            return None
        try:
            return json.loads(self.mirror.read_bytes(self.path) or b"null")
        except (OSError, ValueError):  # being rewritten or deleted this instant: read it again
            return _UNREAD

    def _refresh(self) -> None:
        while not self.stop.wait(LEASE_S / 4):
            with contextlib.suppress(OSError):
                _put_in_store(self.mirror, self.path, json.dumps(self.me).encode())

    def release(self) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(OSError, ValueError):
            if (self._holder() or {}).get("nonce") == self.me["nonce"]:
                self.mirror.filesystem().delete_file(self.mirror.remote_path(self.path))


def read_json(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Any:
    """Read a JSON file; with ``root``, its ``./relative`` paths become absolute under ``root``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{p}: not valid JSON ({e}); restore it from a backup or use a new run_dir") from None
    return obj if root is None else absolute_paths(obj, root)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    path.parent.mkdir(parents=True, exist_ok=True)
    if old.is_dir() and not path.exists():  # a crash between the two renames below
        os.replace(old, path)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; releases are read by others
        if path.exists():
            # Rename the old one aside first: os.replace cannot replace a non-empty dir.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if old.is_dir() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def temp_dir_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory next to ``path``, removed after the block: on ``path``'s filesystem
    (a model's weights may not fit the system's temp), named as :func:`atomic_dir` names its
    own, so that one a crash leaves behind is removed as stale by the next write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, progress=None) -> str:
    """The file's sha256; ``progress``: a :class:`raypath.console.Progress` in bytes, added to as it reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress.add(len(block))
    return h.hexdigest()


def in_threads(fn, items: list, workers: int | None = None) -> list:
    """``[fn(x) for x in items]``, up to ``workers`` at a time. The default, up to 8 or the cores,
    is for hashing and copying whole files, where hashlib and file I/O release the GIL, so each
    file gets a core; requests to a store, which mostly wait, take more (:data:`STREAMS`)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers or min(8, os.cpu_count() or 1), len(items))) as pool:
        return list(pool.map(fn, items))


#: Requests to a store in flight at once from one process (uploads, downloads, copies): each
#: waits on the network far longer than it computes.
STREAMS = 16


def end_line(path: str | os.PathLike) -> None:
    """Before appending to a JSONL log: end a last line a crash cut short, so that the next
    record starts a line of its own instead of joining the torn one."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of an appended JSONL log. A line that is not a JSON object is skipped: the
    last one may be being written right now; one before it was cut short by a crash (logged,
    by file and line)."""
    lines = Path(path).read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        elif i < len(lines) - 1:
            log.warning("%s, line %d: not a JSON record (cut short by a crash?); skipped", path, i + 1)
    return out


def last_jsonl(path: str | os.PathLike, block: int = 1 << 16) -> dict | None:
    """The last record of an appended JSONL log, read backwards from its end: a log that grows
    with the run (a trial's ``result.json``) is not parsed whole for its final line. Torn or
    non-object lines are passed over, as :func:`read_jsonl` skips them. None when it has none."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        partial = b""
        while pos > 0:
            size = min(block, pos)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + partial).split(b"\n")
            partial = lines.pop(0) if pos > 0 else b""  # may continue in the block before
            for line in reversed(lines):
                try:
                    record = json.loads(line) if line.strip() else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if isinstance(record, dict):
                    return record
    return None
