"""Where a versioned corpus lives and how its text is read: any pyarrow filesystem, four formats.

A corpus is a directory -- a local path or a URI such as ``s3://bucket/corpus`` --
with one sub-directory per version, each holding ``train/`` and ``val/`` files (and
optionally ``test/``, a held-out split no selection reads):

* ``.jsonl`` and ``.jsonl.gz``: one JSON object per line with a text field;
* ``.parquet``: a string column;
* ``.arrow``: Arrow IPC files as Hugging Face ``datasets`` writes them with
  ``save_to_disk`` (its ``dataset_info.json``/``state.json`` are ignored).

Everything here runs where it is called: the driver only lists directories;
:func:`inspect_file` (validation + fingerprint) and :func:`iter_docs` (text of
one :class:`Chunk`) run inside Ray tasks and Ray Data actors, one file or chunk
each, so no single process reads a whole version. A file is cut into chunks of
about :data:`CHUNK_BYTES` (byte ranges of a jsonl file, row groups of a parquet
file; a gzip or Arrow stream file is one chunk) so that one huge file still
spreads over many actors.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from raypath.mirror import RunDir

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")
#: Target size of one tokenize task's input. Bounds an actor's memory (its chunk's
#: tokens are packed in memory) and sets the parallelism of a version made of few big files.
CHUNK_BYTES = 64 << 20
_READ = 1 << 20


class DataError(ValueError):
    """Bad corpus input; the message names the file or version."""


# ---------------------------------------------------------------- filesystems

#: URI schemes pyarrow has a filesystem for (``file://`` is a local path).
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(path: str) -> bool:
    return "://" in str(path) and urlparse(str(path)).scheme not in ("", "file")


#: An S3 client gives up after this many attempts, and waits at most this long to connect
#: and between bytes: an unreachable endpoint or rejected credentials end in one error in
#: seconds, not in minutes of retries.
S3_ATTEMPTS, S3_CONNECT_TIMEOUT_S, S3_REQUEST_TIMEOUT_S = 3, 5.0, 60.0
#: Google Cloud Storage's client retries an operation for 15 minutes by default: bounded likewise.
GCS_RETRY_S = 15.0


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem with bounded retries and timeouts (see :data:`S3_ATTEMPTS`)."""
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
                             connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S)


def uri_filesystem(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a URI; S3 and GCS ones get bounded retries, ``endpoint``
    overrides AWS."""
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        path = uri[len("s3://"):].rstrip("/")
        if endpoint:
            return s3_filesystem(endpoint), path
        fs, path = pafs.FileSystem.from_uri(uri)  # resolves the bucket's region
        return s3_filesystem(region=fs.region), path
    if scheme in ("gs", "gcs"):
        path = pafs.FileSystem.from_uri(uri)[1]
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=GCS_RETRY_S)), path
    return pafs.FileSystem.from_uri(uri)


@functools.cache
def _uri_filesystem(scheme_netloc: str, endpoint: str | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of the URI's root on it). Cached per process: building an S3
    filesystem resolves credentials (slow). The root is the filesystem's own reading of
    ``scheme://netloc/``: ``/`` for HDFS, the container for Azure, the bucket for S3."""
    return uri_filesystem(f"{scheme_netloc}/", endpoint)


# Dropped at exit before pyarrow finalizes S3 (its handler, registered when pyarrow.fs was
# imported, runs after this one): an S3 client still alive then can abort the process
# ("terminate called without an active exception", apache/arrow#41087).
atexit.register(_uri_filesystem.cache_clear)


def filesystem_for(path: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI; ``endpoint`` overrides an S3 endpoint."""
    if not is_uri(path):
        local = urlparse(path).path if str(path).startswith("file://") else str(path)
        return pafs.LocalFileSystem(), str(Path(local).resolve())
    # Split by hand: a listed file's name is joined onto its directory's URI, and urlparse
    # would read a "#" or "?" in it as a fragment or query, not as part of the name.
    scheme, _, rest = str(path).partition("://")
    netloc, _, key = rest.partition("/")
    fs, root = _uri_filesystem(f"{scheme}://{netloc}", endpoint)
    root = root if root.endswith("/") or not root else f"{root}/"
    return fs, (f"{root}{key}".rstrip("/") or root)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _listing(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    try:
        return sorted(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), key=lambda i: i.path)
    except OSError as e:  # unreachable endpoint, bad credentials, no bucket
        raise DataError(f"data.corpus: cannot list {path}: {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (pyarrow's S3 errors run to many). A first line
    that only heads its cause (Ray Train's ``Training failed due to controller error:``, then the
    error that ended the run, e.g. a store gone unreachable) comes with the cause's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


# ---------------------------------------------------------------- discovery

@dataclass(frozen=True)
class VersionSource:
    """Where one version's text lives: file paths (local) or URIs (remote), sorted."""

    name: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    test_files: tuple[str, ...] = ()  # the optional test/ folder; empty = carved from val
    #: (size, mtime_ns) of each file as discovery listed it: what checks an earlier version's
    #: files against their records without a request per file (:func:`same_file`).
    listed: Mapping[str, tuple[int, int | None]] = field(default_factory=dict, compare=False, repr=False)


#: What ``datasets``' ``save_to_disk`` writes beside its ``.arrow`` files: metadata, not text.
DATASETS_METADATA = ("dataset_info.json", "state.json")


def _files(fs: pafs.FileSystem, d: str, shown: str) -> dict[str, tuple[int, int | None]]:
    """The data files of a split directory, with their listed (size, mtime_ns). Anything else
    there that is not hidden (``.DS_Store``, ``_SUCCESS``) or ``datasets``' metadata is refused by
    name: a ``.txt``, ``.jsonl.zst`` or ``.JSONL`` file or a sub-directory of shards would
    otherwise go untrained without a word."""
    out, listing = {}, _listing(fs, d)
    for i in listing:
        name, where = i.base_name, _join(shown, i.base_name)
        if i.type == pafs.FileType.File and name.endswith(SUFFIXES):
            out[where] = (i.size, i.mtime_ns)
        elif name.startswith((".", "_")) or name in DATASETS_METADATA:
            continue
        elif i.type == pafs.FileType.Directory:
            raise DataError(f"{where}: a sub-directory in a split directory is not read (its files would go "
                            f"untrained); move its files up into {shown}/ or out of the corpus")
        elif i.type == pafs.FileType.File:
            raise DataError(f"{where}: unsupported file type (expected one of {', '.join(SUFFIXES)}, "
                            f"lower case); convert it or move it out of the corpus")
        else:
            raise DataError(f"{where}: not a regular file (expected one of {', '.join(SUFFIXES)})")
    if isinstance(fs, pafs.LocalFileSystem) and os.path.isdir(d):  # pyarrow's listing leaves a broken link out
        for name in sorted(set(os.listdir(d)) - {i.base_name for i in listing}):
            link = os.path.join(d, name)
            if os.path.islink(link) and not name.startswith((".", "_")):
                raise DataError(f"{_join(shown, name)}: a broken symbolic link (to {os.readlink(link)}, which does not "
                                f"exist): its file would go untrained; restore it or remove the link")
    return out


def version_order(name: str) -> tuple:
    """Sort key of version names: numbers in them compare as numbers (``v2`` before ``v10``),
    the rest as text (``2024-05`` before ``2024-11``)."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def discover_versions(corpus: str | Path, names: list[str] | None = None,
                      endpoint: str | None = None) -> list[VersionSource]:
    """One :class:`VersionSource` per version sub-directory (``train/`` + ``val/``, optionally
    ``test/``) of ``corpus``."""
    corpus = str(corpus)
    try:  # an S3 bucket's region is looked up here, a missing bucket found, an unknown scheme refused
        fs, root = filesystem_for(corpus, endpoint)
        kind = fs.get_file_info(root).type
    except (OSError, ValueError) as e:
        raise DataError(f"data.corpus: cannot reach {corpus}: {first_line(e)}") from None
    shown = corpus.rstrip("/") if is_uri(corpus) else root
    if kind != pafs.FileType.Directory:
        raise DataError(f"data.corpus: {shown} is not a directory")
    dirs = sorted((i.base_name for i in _listing(fs, root) if i.type == pafs.FileType.Directory), key=version_order)
    available = [d for d in dirs if fs.get_file_info(_join(_join(root, d), "train")).type == pafs.FileType.Directory]
    if not names:  # every sub-directory is a version: a new one in the wrong layout must not go untrained
        for d in dirs:
            if d not in available and not d.startswith((".", "_")):
                raise DataError(f"{_join(shown, d)}: a version needs {d}/train/ and {d}/val/ (found no train/); "
                                f"fix its layout, move it out of the corpus, or list the versions in data.versions")
    out = []
    for name in names or available:
        if name not in available:
            raise DataError(f"data.versions: {name!r} has no {_join(_join(shown, name), 'train')} directory "
                            f"(found: {', '.join(available) or 'none'})")
        vroot, vshown = _join(root, name), _join(shown, name)
        has_test = fs.get_file_info(_join(vroot, "test")).type == pafs.FileType.Directory
        splits = [_files(fs, _join(vroot, split), _join(vshown, split))
                  for split in ("train", "val", *(("test",) if has_test else ()))]
        src = VersionSource(name, *(tuple(files) for files in splits),
                            listed={path: stat for files in splits for path, stat in files.items()})
        for split, files in (("train", src.train_files), ("val", src.val_files),
                             *((("test", src.test_files),) if has_test else ())):
            if not files:
                extra = " (validation split required)" if split == "val" else ""
                raise DataError(f"{_join(vshown, split)}: no {'/'.join(SUFFIXES)} files{extra}")
        out.append(src)
    if not out:
        raise DataError(f"data.corpus: {shown} has no version sub-directories with a train/ folder")
    return out


# ---------------------------------------------------------------- chunks and documents

@dataclass(frozen=True)
class Chunk:
    """One tokenize task's share of a file.

    path: the file (local path or URI). fmt: ``jsonl``, ``jsonl.gz``, ``parquet`` or ``arrow``.
    start, stop: byte range (jsonl: lines *starting* in it) or row-group range
        (parquet); ``0, -1`` = the whole file.
    bytes: its input's size (parquet: uncompressed; gzip: compressed), to group small chunks.
    """

    path: str
    fmt: str
    start: int = 0
    stop: int = -1
    bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def file_format(path: str) -> str:
    for fmt in ("jsonl.gz", "jsonl", "parquet", "arrow"):
        if path.endswith("." + fmt):
            return fmt
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")


def _lines(f, start: int = 0, stop: int = -1) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines that start in ``[start, stop)`` of a binary stream.

    A line that starts before ``start`` belongs to the previous range, so ranges that
    tile a file yield every line exactly once.
    """
    pos, skip = 0, start > 0  # the partial line up to (and including) the first newline is not ours
    if skip:
        f.seek(start - 1)
        pos = start - 1
    buf, i, eof = b"", 0, False
    while True:
        nl = buf.find(b"\n", i)
        if nl < 0:  # scan by index; copy only when new blocks are read (linear in the file)
            if eof:
                break
            buf, eof = _through_newline(f, buf[i:])
            i = 0
            continue
        line, i = buf[i: nl + 1], nl + 1
        if skip:
            skip = False
        elif stop >= 0 and pos >= stop:
            return
        else:
            yield pos, line
        pos += len(line)
    if i < len(buf) and not skip and (stop < 0 or pos < stop):
        yield pos, buf[i:]


def _through_newline(f, rest: bytes) -> tuple[bytes, bool]:
    """(``rest`` + the blocks of ``f`` up to the first that holds a newline, at end of file or not).
    Joined once: a line of many blocks (a huge document, a JSON array saved as one line) appended
    to block by block was copied whole at every block, quadratic in its length."""
    pieces = [rest]
    while block := f.read(_READ):
        pieces.append(block)
        if b"\n" in block:
            return b"".join(pieces), False
    return b"".join(pieces), True


def _open(path: str, endpoint: str | None, compressed: bool = False):
    fs, p = filesystem_for(path, endpoint)
    return fs.open_input_stream(p, compression="gzip") if compressed else fs.open_input_file(p)


def _json_text(line: bytes, column: str) -> tuple[str | None, str | None]:
    """(text, problem) of one jsonl line; problem names what is wrong."""
    try:
        decoded = line.decode("utf-8-sig")  # a BOM (Windows editors) may open the file
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    try:
        row = json.loads(decoded)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    except RecursionError:
        return None, "not valid JSON here (nested deeper than Python's parser allows)"
    if isinstance(row, dict) and column in row and row[column] is None:
        return None, None  # a null is no document, as in a parquet or Arrow column
    if not isinstance(row, dict) or not isinstance(row.get(column), str):
        return None, f"no {column!r} string field"
    problem = unicode_problem(row[column])
    return (None, problem) if problem else (row[column], None)


def unicode_problem(text: str) -> str | None:
    """What makes ``text`` unencodable as UTF-8 (None if nothing).

    Valid UTF-8 bytes can still decode to a lone surrogate: JSON's ``"\\ud800"`` escape,
    ast's ``"\\udc80"``. Such a str breaks every tokenizer call on its batch, naming no file.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text is not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at character {e.start})"
    return None


def _arrow_batches(f) -> Iterator[pa.RecordBatch]:
    try:
        reader = pa.ipc.open_stream(f)  # what datasets' save_to_disk writes
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _column_texts(batches: Iterator[pa.RecordBatch], column: str) -> Iterator[tuple[int, str | None]]:
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(column)).to_pylist():
            yield row, value
            row += 1


def iter_docs(chunk: Chunk, column: str,
              endpoint: str | None = None) -> Iterator[tuple[str, str | None, str | None, int]]:
    """(where, text, problem, position) for every document of ``chunk``, in file order.

    ``where`` is ``line N`` or ``row N``; ``problem`` is None for a good document; ``position``
    names the document within its file whatever chunk reads it: a jsonl line's byte offset (of
    the decompressed stream for gzip), a parquet/Arrow row.
    """
    if chunk.fmt in ("jsonl", "jsonl.gz"):
        with _open(chunk.path, endpoint, compressed=chunk.fmt == "jsonl.gz") as f:
            lineno = 1 if chunk.start == 0 else None  # a later byte range does not know its line numbers
            for offset, line in _lines(f, chunk.start, chunk.stop):
                if line.strip():
                    text, problem = _json_text(line, column)
                    yield (f"line {lineno}" if lineno else f"byte {offset}"), text, problem, offset
                if lineno:
                    lineno += 1
        return
    with _open(chunk.path, endpoint) as f:
        if chunk.fmt == "parquet":
            pf = pq.ParquetFile(f)
            groups = range(chunk.start, pf.num_row_groups if chunk.stop < 0 else chunk.stop)
            first = sum(pf.metadata.row_group(i).num_rows for i in range(chunk.start))
            rows = _column_texts(pf.iter_batches(row_groups=list(groups), columns=[column]), column)
        else:
            first, rows = 0, _column_texts(_arrow_batches(f), column)
        for row, value in rows:  # a null is no document; anything but a string is a problem
            bad = value is not None and not isinstance(value, str)
            problem = f"{column!r} is not a string" if bad else None
            yield f"row {first + row}", None if bad else value, problem, first + row


def doc_status(text: str | None, problem: str | None, max_doc_chars: int = 0) -> str:
    """What preparing does with a document :func:`iter_docs` read: ``ok`` (tokenized), else the
    reason it is skipped: ``invalid``, ``empty`` or ``too_long`` (``max_doc_chars``, 0 = no limit)."""
    if problem:
        return "invalid"
    if not isinstance(text, str) or not text:
        return "empty"
    if max_doc_chars and len(text) > max_doc_chars:
        return "too_long"
    return "ok"


# ---------------------------------------------------------------- validation + fingerprint

POLICIES = ("error", "skip")


def _schema_problem(schema: pa.Schema, column: str) -> str | None:
    if column not in schema.names:
        return f"no {column!r} column (columns: {', '.join(schema.names)})"
    kind = schema.field(column).type
    if not _is_text_type(kind):
        return f"column {column!r} is {kind}, expected string"
    return None


def _is_text_type(kind: pa.DataType) -> bool:
    # Dictionary-encoded strings (a pandas category column) read back as str all the same.
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _chunks(path: str, fmt: str, size: int, endpoint: str | None, chunk_bytes: int) -> list[Chunk]:
    if fmt == "jsonl":
        return [Chunk(path, fmt, s, min(s + chunk_bytes, size), min(chunk_bytes, size - s))
                for s in range(0, size, chunk_bytes)]
    if fmt == "parquet":
        with _open(path, endpoint) as f:
            meta = pq.ParquetFile(f).metadata
        out, start, acc = [], 0, 0
        for i in range(meta.num_row_groups):
            acc += meta.row_group(i).total_byte_size
            if acc >= chunk_bytes or i == meta.num_row_groups - 1:
                out.append(Chunk(path, fmt, start, i + 1, acc))
                start, acc = i + 1, 0
        return out
    return [Chunk(path, fmt, bytes=size)]


def _structure_problem(path: str, fmt: str, column: str, endpoint: str | None) -> str | None:
    """A parquet/Arrow file's schema problem (None if fine): checked before reading any row."""
    if fmt not in ("parquet", "arrow"):
        return None
    try:
        with _open(path, endpoint) as f:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                schema, rows = pf.schema_arrow, pf.metadata.num_rows
            else:
                batches = _arrow_batches(f)
                first = next(batches, None)
                schema = first.schema if first is not None else None
                # A writer may flush an empty batch first; iter_docs reads on past it, so look on too.
                rows = first is not None and (first.num_rows or any(b.num_rows for b in batches))
    except (pa.ArrowInvalid, OSError) as e:
        return f"not a readable {fmt} file ({first_line(e)})"
    if schema is None:
        return "empty: no rows"
    return _schema_problem(schema, column) or (None if rows else "empty: no rows")


def fingerprint(path: str, endpoint: str | None = None) -> dict:
    """What says a file did not change: sha256 (+ size, mtime) locally; size + mtime on object stores.

    Hashing a remote object would download it; object stores replace, never edit, an
    object, so a new size or mtime is the signal there.
    """
    fs, p = filesystem_for(path, endpoint)
    info = fs.get_file_info(p)
    rec = {"path": path, "bytes": info.size, "mtime_ns": info.mtime_ns}
    if not is_uri(path):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
        rec["sha256"] = h.hexdigest()
    return rec


def same_file(rec: dict, size: int | None, mtime_ns: int | None) -> bool:
    """Whether a file of this size and mtime is the one ``rec`` recorded, without reading it
    (git's stat check). An object store's listing may give LastModified in milliseconds where
    the HEAD that recorded it gave whole seconds: a remote file's mtimes compare to the second."""
    recorded = rec.get("mtime_ns")
    if size != rec.get("bytes") or mtime_ns is None or recorded is None:
        return False
    return mtime_ns == recorded or (is_uri(rec["path"]) and mtime_ns // 10**9 == recorded // 10**9)


def unchanged(rec: dict, endpoint: str | None = None) -> str | None:
    """None when the file behind a manifest record is unchanged, else what changed.

    Local files whose size and mtime match are not re-hashed (git's stat check):
    re-running a lineage must not read its whole corpus again.
    """
    fs, p = filesystem_for(rec["path"], endpoint)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        return "missing"
    if info.size != rec.get("bytes"):
        return "content changed (size differs from the manifest)"
    if same_file(rec, info.size, info.mtime_ns):
        return None
    if "sha256" not in rec:
        return "content changed (mtime differs from the manifest)"
    return None if fingerprint(rec["path"], endpoint)["sha256"] == rec["sha256"] else \
        "content changed (sha256 differs from the manifest)"


def inspect_file(path: str, column: str, max_doc_chars: int = 0, endpoint: str | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Validate one file and fingerprint it; runs as a Ray task.

    Returns ``{"path", "problem", "docs", "bad_docs", "first_bad", "chunks", "fingerprint"}``:
    ``problem`` is what makes the file unusable (None if it is usable), ``bad_docs`` counts the
    bad documents of a usable one and ``first_bad`` names the first, by line or row. Catches
    what would otherwise surface as an opaque worker traceback or a silent drop:
    missing/empty files, unreadable parquet/Arrow, a missing or non-string text
    column, non-UTF-8 bytes, malformed JSON, over-long documents (``max_doc_chars``,
    0 = no limit) and a truncated gzip stream.
    """
    out = {"path": path, "problem": None, "docs": 0, "chunks": [], "fingerprint": None}
    try:
        fs, p = filesystem_for(path, endpoint)
        info = fs.get_file_info(p)
    except OSError as e:
        return {**out, "problem": f"cannot reach ({first_line(e)})"}
    if info.type != pafs.FileType.File:
        return {**out, "problem": "file not found"}
    if info.size == 0:
        return {**out, "problem": "empty file (0 bytes)"}
    fmt = file_format(path)
    problem = _structure_problem(path, fmt, column, endpoint)
    if problem:
        return {**out, "problem": problem}
    docs, bad = 0, []
    try:
        for where, text, problem, _ in iter_docs(Chunk(path, fmt), column, endpoint):
            if problem is None and max_doc_chars and len(text or "") > max_doc_chars:
                problem = f"document of {len(text)} characters exceeds data.max_doc_chars={max_doc_chars}"
            if problem:  # a bad document, not a bad file: ``skip`` drops it alone (:func:`apply_policy`)
                bad.append(f"{where}: {problem}")
                continue
            docs += text is not None
    except (EOFError, OSError, pa.ArrowInvalid) as e:
        return {**out, "problem": f"unreadable after {docs} documents ({first_line(e)})"}
    except UnicodeDecodeError as e:  # a parquet/Arrow writer that did not validate its strings
        return {**out, "problem": f"unreadable after {docs} documents (text is not valid UTF-8: {e.reason})"}
    if not docs:
        return {**out, "problem": bad[0] if bad else "empty: no documents"}
    return {**out, "docs": docs, "bad_docs": len(bad), "first_bad": bad[0] if bad else None,
            "chunks": [c.to_dict() for c in _chunks(path, fmt, info.size, endpoint, chunk_bytes)],
            "fingerprint": fingerprint(path, endpoint)}


def inspect_files(files: list[str], column: str, max_doc_chars: int = 0, endpoint: str | None = None,
                  chunk_bytes: int = CHUNK_BYTES, rd: RunDir | None = None) -> list[dict]:
    """:func:`inspect_file` of every file, in parallel Ray tasks (in-process without Ray).

    rd: the run directory, when files may lie in it (the embedded corpus): a task on a node
        that lacks them pulls them from a remote run directory first.
    """
    import ray

    args = (column, max_doc_chars, endpoint, chunk_bytes)
    if not ray.is_initialized() or len(files) <= 1:
        return [_inspect_here(f, rd, *args) for f in files]
    from raypath.console import Progress

    task = ray.remote(num_cpus=1)(_inspect_here)
    return Progress(log, "validating and fingerprinting", len(files), "files").get(
        [task.remote(f, rd, *args) for f in files])


def _inspect_here(path: str, rd: RunDir | None, *args) -> dict:
    if rd is not None:
        rd.fetch(path, missing_ok=True)  # a missing file is reported by inspect_file, by name
    return inspect_file(path, *args)


def apply_policy(reports: list[dict], policy: str) -> tuple[list[dict], list[dict]]:
    """(usable reports, skipped files) under ``data.on_bad_input``: ``error`` raises on the first bad
    file or document; ``skip`` skips unusable files whole and keeps the others, whose bad documents
    are dropped one by one when tokenized (counted as ``invalid`` in the manifest)."""
    if policy not in POLICIES:
        raise DataError(f"data.on_bad_input: {policy!r} is not one of {', '.join(POLICIES)}")
    keep, skipped = [], []
    for r in reports:
        if r["problem"] is None and not r.get("bad_docs"):
            keep.append(r)
        elif policy == "error":
            raise DataError(f"{r['path']}: {r['problem'] or r['first_bad']} (set data.on_bad_input: skip to "
                            f"skip bad documents and unusable files)")
        elif r["problem"] is None:
            log.warning("%s: skipping %d bad document(s) of %d (the first: %s)", r["path"], r["bad_docs"],
                        r["docs"] + r["bad_docs"], r["first_bad"])
            keep.append(r)
        else:
            skipped.append({"path": r["path"], "reason": r["problem"]})
    return keep, skipped


def iter_texts(files: list[str], column: str, endpoint: str | None = None,
               max_chars: int | None = None) -> Iterator[str]:
    """Documents of ``files`` in order (for tokenizer training), at most ``max_chars`` characters.

    Meant for validated files: a bad document raises :class:`DataError` naming it.
    """
    remaining = max_chars
    for path in files:
        for where, text, problem, _ in iter_docs(Chunk(path, file_format(path)), column, endpoint):
            if problem:
                raise DataError(f"{path}: {where}: {problem}")
            if not text:
                continue
            if remaining is not None:
                if remaining <= 0:
                    return
                text = text[:remaining]
                remaining -= len(text)
            yield text
