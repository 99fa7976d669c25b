"""Deduplication of documents across a lineage's versions (``data.dedup: exact | minhash``).

A version drops, before tokenizing, each train document whose text (its exact characters; with
``minhash``, a near-duplicate of it: :class:`Rule`) is

* one an earlier version trained (``earlier``): a snapshot that repeats older ones would
  train them again, and replay already brings old data back at the rate chosen for it;
* one of this or an earlier version's val/test documents (``held_out``): trained, it would
  leak into the held-out losses every release, law fit and comparison reports;
* repeated within the version (``within``): the first one in file order is kept.

Val and test documents are never dropped: they are fixed evaluation budgets. Those an earlier
version trained are counted (``held_out_trained``) and warned about: the version's held-out
losses read better than its novelty warrants.

A map-reduce through the filesystem in Ray tasks; the driver holds counts only:

1. hash, per run of consecutive chunks (:func:`hash_groups`): a 128-bit BLAKE2b of every
   document that tokenizing would keep (``minhash``: one per band of its signature, a row
   each, with a threshold each carrying the signature's 2-bit sketch), :data:`HASH_ROW` rows
   ``(h1, h2, key)`` sorted by hash in
   ``dedup/hashes/part-GGGGGG.buckets``, a bucketed file (:mod:`raypath.bucketed`; a bucket
   is the top 16 bits of ``h1``). ``key`` names a train document: its file's number in
   the version << :data:`POS_BITS` | its position in the file (a jsonl line's byte offset, a
   parquet/Arrow row); a held-out document's key is negative (:func:`held_out_key`).
2. decide, per range of buckets (a task per run of up to 16 consecutive ranges): that range's
   rows of every hash file and of the earlier versions' index (:func:`earlier_index`), sorted
   together by hash, then key: a train document is dropped when one of its rows is not the
   first among its hash's rows (``minhash`` with a threshold: and the two rows' sketches say
   their documents are near, :meth:`Rule.near`). Writes ``dedup/index/part-LLLLL-HHHHH.parquet`` (its buckets
   [L, H): a later version's decide task reads the parts of its own buckets only; the hashes
   the version adds, the rows that came first: kept train documents', held-out ones' flagged
   ``held_out``, and with ``minhash`` a dropped document's other bands, so that a
   near-duplicate of it is dropped too; every :data:`SNAPSHOT_EVERY` versions also the whole
   index in ``dedup/snapshot/``, which later versions read instead of the parts before it) and
   ``dedup/ranges/part-RRRRR.buckets`` (the dropped keys of the task's ranges from R on, up to
   :data:`RANGE_ROWS` a file, each with its :data:`CAUSES` index: that of the first row of its
   hash, the lowest of its rows'; bucketed by train chunk group, :func:`group_starts`).
3. collect, per run of consecutive train chunk groups (about :data:`RANGE_ROWS` dropped keys a
   run): its groups' bytes of every ``ranges/`` file, each key once under its lowest cause, in
   ``dedup/drop/part-<lo>-<hi>.parquet`` (hex keys; the candidates a ``minhash`` threshold kept,
   :data:`KEPT`, are counted and left out): every decide range holds drops of every
   chunk group, so without this each tokenize task would read one file per range.
4. tokenize (:class:`raypath.data.TokenizePack`): each group reads the dropped keys of its
   files from the drop part of its key range (:func:`dropped_keys`, row groups pruned by key)
   and skips those documents, counting them per cause; the version's record checks that it
   skipped exactly the documents decided here (:func:`record_drops`).

Costs that grow with the data: one more read of each new version's train and held-out text
(``minhash``: plus its signature, ~1 ms per 1,000 words); the index, ~25 bytes per distinct
document (``minhash``: per band, ~260 bytes a document at 14 bands, ~360 with the threshold's
28-byte sketch in every row; stored about twice, with the latest snapshot), read once more by
every later version's decide pass (each window of ranges the parts overlapping its buckets of
the latest snapshot and of at most :data:`SNAPSHOT_EVERY` versions after it: about 1.5 files
each, however long the lineage); a decide task's memory, about 50 bytes per row of its range
(~130 with sketches; ranges are sized to :data:`RANGE_ROWS`) beside a window of ranges read
ahead (:data:`DECIDE_READ_BYTES`); requests: per (hash file, run of decide ranges) an open and
an index read, then a ranged read of exactly its bytes per (hash file, window of ranges) and
one dataset read of the earlier parts per window; an open, an index read and a ranged read per
(``ranges/`` file, collect run); one read per chunk group (of the drop part of its key range).
"""

from __future__ import annotations

import array
import contextlib
import functools
import hashlib
import logging
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from raypath import bucketed
from raypath.mirror import RunDir
from raypath.sources import Chunk, DataError, doc_status, iter_docs

log = logging.getLogger(__name__)

#: Bits of a train key that hold the document's position in its file (files up to 1 TiB).
POS_BITS = 40
#: Files per version a key can number (the key is a positive int64; a held-out key negative, half that).
MAX_FILES = 1 << (63 - POS_BITS)
MAX_HELD_OUT_FILES = MAX_FILES >> 1
# An earlier version's index row (of a train or a held-out document): sorts before this version's
# rows of its hash, held-out ones (negative keys) before train ones.
_EARLIER_HELD_OUT, _EARLIER = -(1 << 63), -(1 << 63) + 1
# Above every train key (the largest int64): the end of the last collect run's key range.
_NO_KEY = (1 << 63) - 1
#: Why a train document is dropped, by the first row of one of its hashes, in the order a
#: document dropped for several is counted under.
CAUSES = ("held_out", "earlier", "within")
#: A drop row's cause for a train document that shared a band with an earlier one and was kept by
#: the similarity check (``minhash`` with a threshold): counted (``near_kept``), never dropped.
KEPT = len(CAUSES)
BUCKET_SHIFT = 48
#: Buckets of hash space (the top bits of ``h1``): a decide range is a run of them.
BUCKETS = 1 << (64 - BUCKET_SHIFT)
#: Rows a decide task holds at most (earlier index + this version's hashes of the range it decides).
RANGE_ROWS = 4_000_000
ROW_GROUP = 65_536
#: A version writes a snapshot of the whole index (``dedup/snapshot/``, parts by bucket range,
#: as the versions' own) once this many versions' own parts lie after the last snapshot: a
#: decide range reads the snapshot's parts and those versions', about 1.5 x (1 + at most this)
#: files however long the lineage, for the lineage's index stored about twice.
SNAPSHOT_EVERY = 8
#: Most bytes a decide task reads ahead for a window of consecutive ranges, held beside the range
#: it decides (~50 bytes a row, up to :data:`RANGE_ROWS`): the hash files' rows and the earlier
#: index's, a read per (hash file, window) and one of the index parts per window rather than
#: per range.
DECIDE_READ_BYTES = 256 << 20
#: Rows of a drop part's row group: each tokenize task reads its chunk group's keys of one, the
#: row groups they overlap.
SLICE_ROW_GROUP = 8_192
#: A hash file's row (:func:`write_hashes`): a document's (``minhash``: a band's) 128-bit hash, its key.
HASH_ROW = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("key", "<i8")])
#: A decide range's dropped key with its :data:`CAUSES` index (``ranges/``, bucketed by chunk group).
DROP_ROW = np.dtype([("key", "<i8"), ("cause", "i1")])
#: Most input a hash task reads (:func:`hash_groups`). Its memory grows with its hash rows: at this
#: size, of ~2 KB documents, 341 MB with ``minhash`` (3.2M rows with their sketches, 29-31 s on a
#: core; 249 MB and 25 s without a threshold), 21 MB with ``exact`` (``benchmarks/dedup_hash_memory.py``).
HASH_GROUP_BYTES = 512 << 20


@dataclass(frozen=True)
class Rule:
    """Which train documents count as duplicates (``data.dedup`` and its MinHash settings).

    exact: the same text, character for character: one 128-bit hash per document.
    minhash: near-duplicates, by MinHash LSH: a document's ``bands`` x ``rows`` MinHash values
        over its word ``shingle``-grams (lowercased, split on whitespace), one 128-bit hash per
        band; two documents whose word-shingle Jaccard similarity is s share a band with
        probability 1 - (1 - s^rows)^bands (14 x 8: 0.4% at s = 0.5, 50% at 0.72, 94% at 0.8,
        100% at 0.9). A document sharing a band with one before it is a candidate; with a
        ``threshold``, it is dropped only when their similarity estimated from the signatures'
        other bands (:func:`similarity`) is at least that (a shared band alone is no proof:
        across millions of pairs, the S-curve's tail catches documents that share a paragraph);
        with 0, on the shared band alone.
    """

    mode: str = "none"
    bands: int = 14
    rows: int = 8
    shingle: int = 5
    threshold: float = 0.7

    def __str__(self) -> str:  # what the data manifest records, and compares on a re-run
        if self.mode != "minhash":
            return self.mode
        checked = f", threshold={self.threshold:g}" if self.threshold else ""
        return f"minhash(bands={self.bands}, rows={self.rows}, shingle={self.shingle}{checked})"

    @property
    def per_doc(self) -> int:
        """Hash rows per document."""
        return self.bands if self.mode == "minhash" else 1

    @property
    def sketch_bytes(self) -> int:
        """Bytes of a document's signature sketch each of its hash rows carries (0: none kept)."""
        return -(-self.bands * self.rows // 4) if self.mode == "minhash" and self.threshold else 0

    @property
    def row(self) -> np.dtype:
        """A hash file's row under this rule (:data:`HASH_ROW`, and the sketch when it has one)."""
        return hash_row(self.sketch_bytes)

    def hashes(self, text: str) -> tuple[bytes, bytes]:
        """The document's 16-byte hashes, :attr:`per_doc` of them, and its :attr:`sketch_bytes` sketch."""
        if self.mode != "minhash":
            return hashlib.blake2b(text.encode(), digest_size=16).digest(), b""
        sig = minhash(text, self.bands * self.rows, self.shingle).astype("<u4")
        bands = sig.reshape(self.bands, self.rows)
        digests = b"".join(hashlib.blake2b(band.tobytes(), digest_size=16, salt=i.to_bytes(16, "little")).digest()
                           for i, band in enumerate(bands))
        return digests, sketch(sig) if self.sketch_bytes else b""

    def near(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether the documents of rows that share a band, their sketches ``a`` and ``b``
        (``[rows, sketch_bytes]`` uint8), are near-duplicates: all of them without a threshold."""
        if not self.sketch_bytes:
            return np.ones(len(a), dtype=bool)
        return similarity(a, b, self.bands * self.rows, self.rows) >= self.threshold


def hash_row(sketch_bytes: int) -> np.dtype:
    """A hash file's row: :data:`HASH_ROW`, then a MinHash sketch of ``sketch_bytes`` (if any)."""
    return np.dtype(HASH_ROW.descr + [("sketch", "u1", (sketch_bytes,))]) if sketch_bytes else HASH_ROW


def sketch(sig: np.ndarray) -> bytes:
    """The low 2 bits of each MinHash value of a signature, four to a byte (14 x 8: 28 bytes).
    Two documents' values agree with probability s (their Jaccard similarity), and their 2-bit
    sketches s + (1 - s) / 4: :func:`similarity` inverts that."""
    v = np.pad((sig & 3).astype(np.uint8), (0, -len(sig) % 4))
    return (v[0::4] << 6 | v[1::4] << 4 | v[2::4] << 2 | v[3::4]).tobytes()


# 2-bit fields equal to 0 in a byte: how many values of two sketches agree, from their XOR.
_AGREE = np.array([sum((x >> s) & 3 == 0 for s in (0, 2, 4, 6)) for x in range(256)], dtype=np.int64)


def similarity(a: np.ndarray, b: np.ndarray, n: int, rows: int) -> np.ndarray:
    """Estimated Jaccard similarity of documents whose ``n``-value signatures' sketches are ``a``
    and ``b`` (``[pairs, bytes]`` uint8), given that each pair shares a band: that band's ``rows``
    values agree for certain and are left out, the other ``n - rows`` are a sample (std about
    0.06 at s = 0.5 for 14 x 8)."""
    agree = _AGREE[a ^ b].sum(axis=1) - (-n % 4)  # the padding's fields agree
    p = (agree - rows) / max(n - rows, 1)
    return (4 * p - 1) / 3


def held_out_key(file: int, pos: int) -> int:
    """The key of a val/test document: the ``file``-th held-out file of the version, at ``pos``."""
    return -1 - ((file << POS_BITS) | pos)


def _is_held_out(key: np.ndarray) -> np.ndarray:
    return (key < 0) & (key > _EARLIER)


def rule_of(data) -> Rule:
    """The rule a :class:`raypath.config.DataConfig` asks for."""
    return Rule(data.dedup, data.minhash_bands, data.minhash_rows, data.minhash_shingle, data.minhash_threshold)


@functools.lru_cache(maxsize=4)
def _permutations(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Fixed seeds: every process, version and run computes the same signatures.
    rng = np.random.default_rng(0x5EED)
    a = rng.integers(1, 1 << 63, n, dtype=np.uint64) | np.uint64(1)
    return a[:, None], rng.integers(0, 1 << 63, n, dtype=np.uint64)[:, None]


#: Shingles per step of :func:`minhash`: bounds its memory on a long document (n x 8 bytes each).
_SHINGLE_STEP = 8192


def minhash(text: str, n: int, k: int) -> np.ndarray:
    """``n`` MinHash values (uint64 < 2**32) of ``text``'s lowercased word ``k``-grams: per
    permutation, the least multiply-shift hash of the 32-bit shingle hashes."""
    words = np.fromiter((zlib.crc32(w.encode()) for w in text.lower().split()), np.uint64)
    k = min(k, max(len(words), 1))
    m = max(len(words) - k + 1, 1)
    h = np.zeros(m, np.uint64)
    for j in range(min(k, len(words))):  # a k-gram's hash: polynomial over its words' (wraps mod 2**64)
        h = h * np.uint64(1_000_003) + words[j: j + m]
    x = np.unique((h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF)))
    a, b = _permutations(n)
    out = np.full(n, np.uint64(0xFFFFFFFF))
    for s in range(0, len(x), _SHINGLE_STEP):
        out = np.minimum(out, ((a * x[None, s: s + _SHINGLE_STEP] + b) >> np.uint64(32)).min(axis=1))
    return out


@dataclass(frozen=True)
class DedupSpec:
    """What the passes read: the text column, a remote corpus's endpoint, the longest document
    tokenizing keeps (0 = any), the run directory (a node pulls the embedded corpus from it)."""

    text_column: str
    endpoint: str | None
    max_doc_chars: int
    rd: RunDir
    rule: Rule = Rule("exact")


def key_range(parts: list[dict]) -> tuple[int, int]:
    """[lo, hi) of the keys of the documents a chunk group reads (consecutive chunks of
    consecutive train files, each with its file's number ``file``): a jsonl chunk's byte range,
    else its whole file."""
    first, last = parts[0], parts[-1]
    lo = (first["file"] << POS_BITS) + (first["start"] if first["fmt"] == "jsonl" else 0)
    whole = last["fmt"] != "jsonl" or last["stop"] < 0
    hi = (last["file"] << POS_BITS) + ((1 << POS_BITS) if whole else last["stop"])
    return lo, hi


def check_keys(files: list[dict], held_out: list[dict], version: str) -> None:
    """A version's train and val/test files must fit the key: file numbers and positions."""
    for n, most, what in ((len(files), MAX_FILES, "train"), (len(held_out), MAX_HELD_OUT_FILES, "val/test")):
        if n >= most:
            raise DataError(f"version {version}: {n} {what} files; data.dedup numbers at most {most - 1} per "
                            f"version (merge files, or split the version)")
    for f in (*files, *held_out):
        if (f["fingerprint"] or {}).get("bytes", 0) >= 1 << POS_BITS:
            raise DataError(f"{f['path']}: over {1 << POS_BITS} bytes; data.dedup keys documents by "
                            f"byte offset up to that size (cut the file)")


# ---------------------------------------------------------------- 1. hash (a Ray task per hash group)

def hash_groups(chunks: list[dict], chunk_bytes: int, cpus: int) -> list[list[dict]]:
    """Consecutive chunks of a split, a hash task's each: as few as keep two tasks per CPU of the
    cluster busy, of up to :data:`HASH_GROUP_BYTES` (at least a tokenize group, ``chunk_bytes``):
    every decide range reads a slice of every hash file (opens, a footer, a row group at least)."""
    from raypath.data import chunk_groups

    total = sum(int(c.get("bytes") or chunk_bytes) for c in chunks)
    return chunk_groups(chunks, max(chunk_bytes, min(HASH_GROUP_BYTES, total // max(2 * cpus, 1))))


def hash_file(out_dir: str, g: int) -> str:
    return f"{out_dir}/hashes/part-{g:06d}.buckets"


#: Hash rows given their sketch per step of :func:`write_hashes`.
_SKETCH_STEP = 1 << 20


def write_hashes(digests: bytes | bytearray, keys, fs: pafs.FileSystem, path: str,
                 sketches: bytes | bytearray = b"", per_doc: int = 1) -> None:
    """Documents' 16-byte hashes (``digests``, a row per key) to a hash file: :data:`HASH_ROW`
    rows sorted by hash, bucketed by their top bits (:mod:`raypath.bucketed`); with
    ``sketches`` (one per document, ``per_doc`` hash rows each), every row carries its document's."""
    h = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    key = np.frombuffer(keys, dtype=np.int64) if isinstance(keys, array.array) else np.asarray(keys, dtype=np.int64)
    order = np.lexsort((key, h[:, 1], h[:, 0]))
    width = len(sketches) * per_doc // max(len(key), 1)
    rows = np.empty(len(key), hash_row(width))
    rows["h1"], rows["h2"], rows["key"] = h[order, 0], h[order, 1], key[order]
    sk = np.frombuffer(sketches, dtype=np.uint8).reshape(-1, max(width, 1))
    for i in range(0, len(rows) if width else 0, _SKETCH_STEP):  # a step's copy at a time, not all rows'
        rows["sketch"][i:i + _SKETCH_STEP] = sk[order[i:i + _SKETCH_STEP] // per_doc]
    del order
    # Each bucket's first row, from the sorted h1 (no per-row bucket array).
    firsts = np.searchsorted(rows["h1"], np.arange(1, BUCKETS, dtype=np.uint64) << np.uint64(BUCKET_SHIFT))
    bucketed.write_rows(fs, path, rows, np.diff(firsts, prepend=0, append=len(rows)))


def hash_group(batch: pa.Table, spec: DedupSpec, fs: pafs.FileSystem) -> pa.Table:
    """A hash group's documents -> their hash rows, sorted by hash, in the item's ``out`` file;
    returns one row of counts."""
    item = batch.to_pylist()[0]
    # 16 bytes a hash, 8 a key and a sketch per document, no Python object per row: 3.2M minhash
    # rows are 77 MB here (and 6.4 MB of sketches).
    digests, sketches, keys, held_out = bytearray(), bytearray(), array.array("q"), 0
    for p in item["parts"]:
        spec.rd.fetch(p["path"], missing_ok=True)
        for _, text, problem, pos in iter_docs(Chunk(p["path"], p["fmt"], p["start"], p["stop"]), spec.text_column,
                                               spec.endpoint):
            if doc_status(text, problem, spec.max_doc_chars) == "ok":
                d, sk = spec.rule.hashes(text)
                digests += d
                sketches += sk
                key = (p["file"] << POS_BITS | pos) if "held_out" not in p else held_out_key(p["held_out"], pos)
                keys.extend([key] * spec.rule.per_doc)
                held_out += key < 0
    write_hashes(digests, keys, fs, item["out"], sketches, spec.rule.per_doc)
    return pa.table({"train": [len(keys) // spec.rule.per_doc - held_out], "held_out": [held_out]})


# ---------------------------------------------------------------- 2. decide (a Ray task per run of bucket ranges)

def _read(fs: pafs.FileSystem, files: list[str], columns: list[str], lo: int, hi: int) -> pa.Table | None:
    if not files:
        return None
    flt = (pc.field("bucket") >= lo) & (pc.field("bucket") < hi)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns, filter=flt)


def decide(h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (h1, h2, key), earlier versions' keys < held-out ones < train: (whether each row
    comes first among its hash's, the position of that first row, per row)."""
    n = len(h1)
    first = np.ones(n, dtype=bool)
    first[1:] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
    return first, np.maximum.accumulate(np.where(first, np.arange(n), 0)) if n else np.zeros(0, np.int64)


def decide_ranges(batch: pa.Table, edges: list[int], hash_files: list[str], index_files: list[str],
                  starts: list[int], out_dir: str, fs: pafs.FileSystem, snapshot: bool = False,
                  earlier_rows: int = 0, rule: Rule = Rule("exact")) -> pa.Table:
    """A run of consecutive ranges ``first..last`` of buckets (range r: buckets ``edges[r]`` to
    ``edges[r + 1]``), one at a time, read in windows of ranges: each hash file's index entries
    for the run once, then for each window its bytes in one ranged read and the earlier index
    parts' rows of its buckets in one dataset read (a window holds up to
    :data:`DECIDE_READ_BYTES` of both, the index's ~:data:`_INDEX_ROW_BYTES` a row of the
    ``earlier_rows`` spread evenly over the buckets; rows are ``rule``'s). The ranges' dropped keys go to one file per
    run of them holding up to :data:`RANGE_ROWS` (the collect pass reads each such file once per
    collect run: fewer files, fewer reads). ``snapshot``: each range also writes the whole index
    of its buckets (:func:`earlier_index`). Returns one row of counts per range, with that file."""
    item = batch.to_pylist()[0]
    first, last = item["first"], item["last"]
    files = bucketed.BucketedFiles(fs, hash_files, edges[first], edges[last + 1] - 1, BUCKETS)
    index_bytes = np.diff(edges[first:last + 2]) * (earlier_rows * (_INDEX_ROW_BYTES + rule.sketch_bytes) // BUCKETS)
    rows, held, pending = [], 0, []  # pending: the drops not yet written, from range held on
    try:
        for lo, hi in files.windows(DECIDE_READ_BYTES, edges[first:last + 2], index_bytes):
            files.read(lo, hi)  # consecutive ranges' rows of a hash file lie together: one read for them
            old = _EarlierRows(fs, index_files, lo, hi + 1, rule.sketch_bytes)
            for r in range(edges.index(lo), edges.index(hi + 1)):
                row, drops = decide_range(r, edges[r], edges[r + 1], files.rows(edges[r], edges[r + 1] - 1, rule.row),
                                          old.of(edges[r], edges[r + 1]), out_dir, fs, snapshot, rule)
                if pending and sum(map(len, pending)) + len(drops) > RANGE_ROWS:
                    _write_drops(pending, range_file(out_dir, held), starts, fs)
                    pending = []
                if len(drops):
                    held, pending = held if pending else r, [*pending, drops]
                rows.append({**row, "file": range_file(out_dir, held) if len(drops) else ""})
        if pending:
            _write_drops(pending, range_file(out_dir, held), starts, fs)
    finally:
        files.close()
    return pa.Table.from_pylist(rows, schema=_DECIDED)


#: What an earlier index row costs a decide task while its window is held (h1, h2, held_out; and a
#: sketch with a ``minhash`` threshold).
_INDEX_ROW_BYTES = 17


class _EarlierRows:
    """The earlier versions' index rows of buckets [lo, hi), from the parts overlapping them (one
    dataset read), ordered by bucket so that each range of the window takes its slice."""

    def __init__(self, fs: pafs.FileSystem, index_files: list[str], lo: int, hi: int, sketch_bytes: int = 0):
        columns = ["h1", "h2", "held_out", *(["sketch"] if sketch_bytes else [])]
        old = _read(fs, [f for f in index_files if _overlaps(_buckets_of(f), lo, hi)], columns, lo, hi)
        if old is None:
            types = [pa.uint64(), pa.uint64(), pa.bool_(), pa.binary(max(sketch_bytes, 1))]
            old = pa.table({c: pa.array([], t) for c, t in zip(columns, types)})
        h1 = old.column("h1").to_numpy()
        order = np.argsort(h1, kind="stable")
        self.h1, self.h2 = h1[order], old.column("h2").to_numpy()[order]
        self.held_out = old.column("held_out").to_numpy(zero_copy_only=False)[order]
        self.sketch = _sketches(old.column("sketch"), sketch_bytes)[order] if sketch_bytes else \
            np.zeros((len(h1), 0), np.uint8)

    def of(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """(h1, h2, held_out, sketch) of the rows in buckets [lo, hi)."""
        i, j = (np.searchsorted(self.h1, np.uint64(b << BUCKET_SHIFT)) if b < BUCKETS else len(self.h1)
                for b in (lo, hi))
        return self.h1[i:j], self.h2[i:j], self.held_out[i:j], self.sketch[i:j]


def _sketches(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """An index's ``sketch`` column (fixed-size binary) as a ``[rows, width]`` uint8 array."""
    arr = column.combine_chunks()
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8) if len(arr) else np.zeros(0, np.uint8)
    return data[arr.offset * width:(arr.offset + len(arr)) * width].reshape(-1, width)


def _index_table(h1: np.ndarray, h2: np.ndarray, held_out: np.ndarray, sketch: np.ndarray) -> pa.Table:
    """Index rows (a version's own part, or a snapshot's): with their sketches when they have them."""
    cols = {"bucket": (h1 >> np.uint64(BUCKET_SHIFT)).astype(np.uint16), "h1": h1, "h2": h2, "held_out": held_out}
    if sketch.shape[1]:
        cols["sketch"] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(sketch.shape[1]), len(sketch),
                                                               [None, pa.py_buffer(np.ascontiguousarray(sketch))])
    return pa.table(cols)


def _write_drops(pending: list[np.ndarray], path: str, starts: list[int], fs: pafs.FileSystem) -> None:
    """Ranges' dropped keys (:data:`DROP_ROW`, each range's sorted) to a file bucketed by chunk group."""
    rows = np.concatenate(pending)
    rows = rows[np.argsort(rows["key"], kind="stable")]
    bucketed.write_rows(fs, path, rows, np.diff(np.searchsorted(rows["key"], starts[1:]), prepend=0, append=len(rows)))


_DECIDED = pa.schema([("range", pa.int64()), ("index_rows", pa.int64()), *((c, pa.int64()) for c in CAUSES),
                      ("held_out_trained", pa.list_(pa.int64())), ("file", pa.string())])


def decide_range(r: int, lo: int, hi: int, new: np.ndarray, old: tuple[np.ndarray, ...], out_dir: str,
                 fs: pafs.FileSystem, snapshot: bool = False, rule: Rule = Rule("exact")) -> tuple[dict, np.ndarray]:
    """Range ``r``, buckets [lo, hi): this version's hash rows there (``new``, ``rule.row``)
    against the earlier versions' index rows of those buckets (``old``: h1, h2, held_out, sketch)
    -> this version's index part (and with ``snapshot`` the whole index of those buckets: every
    hash's first row) and dropped keys (files written only when they have rows); returns its
    counts and the dropped keys.

    A row that is not its hash's first is a duplicate of the first row's document (``minhash``
    with a threshold: when their sketches say they are near, :meth:`Rule.near`). Only the first
    row is compared, however many the hash holds: a band common to many documents costs a
    comparison each, and near-duplicates share most of their bands, so one compared with a
    dissimilar first row in one band meets its near twin first in another."""
    from raypath.data import write_table

    width = rule.sketch_bytes
    h1 = np.concatenate([old[0], new["h1"]])
    h2 = np.concatenate([old[1], new["h2"]])
    key = np.concatenate([np.where(old[2], _EARLIER_HELD_OUT, _EARLIER).astype(np.int64), new["key"]])
    sk = np.concatenate([old[3], new["sketch"]]) if width else np.zeros((len(key), 0), np.uint8)
    order = np.lexsort((key, h2, h1))
    h1, h2, key, sk = h1[order], h2[order], key[order], sk[order]
    first, head = decide(h1, h2)
    near = np.ones(len(key), dtype=bool)
    later = np.flatnonzero(~first)
    near[later] = rule.near(sk[later], sk[head[later]])
    head = key[head]
    candidate = (key >= 0) & ~first
    dropped = candidate & near
    adds = first & (key > _EARLIER)
    if adds.any():
        write_table(_index_table(h1[adds], h2[adds], _is_held_out(key[adds]), sk[adds]), fs,
                    f"{out_dir}/index/part-{lo:05d}-{hi:05d}.parquet", row_group_size=ROW_GROUP)
    if snapshot and first.any():  # an earlier row is always its hash's first: earlier rows and the adds
        held = (key[first] == _EARLIER_HELD_OUT) | _is_held_out(key[first])
        write_table(_index_table(h1[first], h2[first], held, sk[first]), fs,
                    f"{out_dir}/snapshot/part-{lo:05d}-{hi:05d}.parquet", row_group_size=ROW_GROUP)
    keys, cause = _first_cause(key[dropped], head[dropped])
    kept = key[candidate & ~near]  # a document kept here may be dropped by another of its bands: collect decides
    keys, cause = _lowest_cause(np.concatenate([keys, kept]),
                                np.concatenate([cause, np.full(len(kept), KEPT, np.int8)]))
    drops = np.empty(len(keys), DROP_ROW)
    drops["key"], drops["cause"] = keys, cause
    # Bounded by the version's val/test documents (fixed evaluation budgets), not by its train data.
    trained = np.unique(key[_is_held_out(key) & (head == _EARLIER) & near])
    return {"range": r, "index_rows": int(adds.sum()),
            **{c: int((drops["cause"] == i).sum()) for i, c in enumerate(CAUSES)},
            "held_out_trained": trained.tolist()}, drops


def _buckets_of(index_file: str) -> tuple[int, int]:
    """[lo, hi) of the buckets an index part holds, by its name (an older ``part-RRRRR``: any)."""
    parts = index_file.rsplit("/", 1)[-1].removesuffix(".parquet").split("-")
    return (int(parts[1]), int(parts[2])) if len(parts) == 3 else (0, 1 << (64 - BUCKET_SHIFT))


def _overlaps(span: tuple[int, int], lo: int, hi: int) -> bool:
    return span[0] < hi and lo < span[1]


def _first_cause(key: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dropped rows' keys and their hashes' first keys -> each distinct key and its lowest cause."""
    cause = np.where(_is_held_out(head) | (head == _EARLIER_HELD_OUT), 0, np.where(head == _EARLIER, 1, 2))
    return _lowest_cause(key, cause.astype(np.int8))


def range_file(out_dir: str, r: int) -> str:
    return f"{out_dir}/ranges/part-{r:05d}.buckets"


# ---------------------------------------------------------------- 3. collect (a Ray task per run of chunk groups)

def group_starts(train: list[dict], chunk_bytes: int) -> list[int]:
    """The first keys of the train chunk groups tokenizing reads (:func:`raypath.data.chunk_groups`),
    each once, sorted, from 0: a decide range's drop file is bucketed by them (bucket b: keys from
    ``starts[b]`` to the next start), so that a collect run reads its groups' keys and no others.
    A parquet file's groups all range over its whole file: one bucket for all of them."""
    from raypath.data import chunk_groups

    return sorted({0} | {key_range(g)[0] for g in chunk_groups(train, chunk_bytes)})


def collect_runs(starts: list[int], rows: int) -> list[dict]:
    """The collect tasks: runs of consecutive buckets of ``starts`` (:func:`group_starts`) that
    share ``rows`` dropped keys (the decide ranges' counts) about :data:`RANGE_ROWS` a run."""
    n = min(len(starts), max(1, math.ceil(rows / RANGE_ROWS)))
    cuts = [round(i * len(starts) / n) for i in range(n + 1)]
    return [{"first": a, "last": b - 1} for a, b in zip(cuts, cuts[1:])]


def collect_drops(batch: pa.Table, range_files: list[str], starts: list[int], out_dir: str,
                  fs: pafs.FileSystem) -> pa.Table:
    """The dropped keys of a run of buckets ``first..last`` of ``starts`` (a key range [lo, hi))
    from every decide range's file (one ranged read each): each key once, with the lowest of its
    causes, sorted, in ``drop/part-<lo>-<hi>.parquet`` (hex keys; written only when it has rows):
    a tokenize task reads the one part of its own key range, not a part per decide range.
    Returns one row of counts per cause, and of the candidates the similarity check kept (:data:`KEPT`)."""
    from raypath.data import write_table

    item = batch.to_pylist()[0]
    first, last = item["first"], item["last"]
    lo, hi = starts[first], starts[last + 1] if last + 1 < len(starts) else _NO_KEY
    files = bucketed.BucketedFiles(fs, range_files, first, last, len(starts))
    try:
        rows = files.rows(first, last, DROP_ROW)
    finally:
        files.close()
    keys, cause = _lowest_cause(rows["key"], rows["cause"])
    kept = cause == KEPT
    keys, cause = keys[~kept], cause[~kept]
    path = f"{out_dir}/drop/part-{lo:016x}-{hi:016x}.parquet" if len(keys) else ""
    if path:
        write_table(pa.table({"key": keys, "cause": cause}), fs, path, row_group_size=SLICE_ROW_GROUP)
    return pa.table({"file": [path], **{c: [int((cause == i).sum())] for i, c in enumerate(CAUSES)},
                     "near_kept": [int(kept.sum())]})


# ---------------------------------------------------------------- 4. what tokenizing skips

def dropped_keys(fs: pafs.FileSystem, drop_files: list[str], lo: int, hi: int) -> dict[int, str]:
    """The dropped keys in [lo, hi) (one chunk group's documents), each with its cause, from the
    drop files whose key range (by name; a decide range's ``part-RRRRR``: any) overlaps it, row
    groups pruned by key."""
    files = [f for f in drop_files if _overlaps(_keys_of(f), lo, hi)]
    if not files:
        return {}
    flt = (pc.field("key") >= lo) & (pc.field("key") < hi)
    table = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=["key", "cause"], filter=flt)
    keys, cause = _lowest_cause(table.column("key").to_numpy(), table.column("cause").to_numpy().astype(np.int8))
    return dict(zip(keys.tolist(), (CAUSES[c] for c in cause.tolist())))


def _keys_of(drop_file: str) -> tuple[int, int]:
    parts = drop_file.rsplit("/", 1)[-1].removesuffix(".parquet").split("-")
    return (int(parts[1], 16), int(parts[2], 16)) if len(parts) == 3 else (0, _NO_KEY)


def _lowest_cause(key: np.ndarray, cause: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct key (sorted) with the lowest of its causes."""
    order = np.lexsort((cause, key))
    key, cause = key[order], cause[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return key[first], cause[first]


# ---------------------------------------------------------------- one version

def index_files(fs: pafs.FileSystem, version_dir: str, kind: str = "index") -> list[str]:
    """The index parts a deduplicated version left under ``version_dir``: the hashes it added
    (``index``), or its snapshot of the whole index (``snapshot``)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{version_dir}/dedup/{kind}", allow_not_found=True))
    return sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def earlier_index(fs: pafs.FileSystem, versions: list[tuple[str, dict]]) -> tuple[list[str], bool]:
    """The index parts a new version's decide pass reads, from the earlier versions (each its
    directory and dedup record, in order): the latest snapshot's and those of the versions after
    it; and whether the new version writes a snapshot (:data:`SNAPSHOT_EVERY`)."""
    last = max((k for k, (_, rec) in enumerate(versions) if rec.get("snapshot")), default=-1)
    files = index_files(fs, versions[last][0], "snapshot") if last >= 0 else []
    if not files:  # none yet (or removed by hand): every version's own parts
        last = -1
    files += [f for d, _ in versions[last + 1:] for f in index_files(fs, d)]
    return files, len(versions) - last - 1 >= SNAPSHOT_EVERY


def remove_old_snapshots(fs: pafs.FileSystem, versions: list[tuple[str, dict]]) -> None:
    """Recorded versions' snapshots but the latest: no later version reads them (a recorded
    version is never prepared again), and each is a copy of the whole index."""
    snapshots = [d for d, rec in versions if rec.get("snapshot")]
    for d in snapshots[:-1]:
        _remove(fs, f"{d}/dedup/snapshot")


def dedup_version(name: str, train: list[dict], held_out: list[dict], earlier: list[str], earlier_rows: int,
                  out_dir: str, fs: pafs.FileSystem, spec: DedupSpec, chunk_bytes: int, snapshot: bool = False) -> dict:
    """Decide which of version ``name``'s train documents to drop.

    train: the version's train chunks, each with its file's number (``file``); held_out: its val
    and test chunks, each with its held-out file's number (``held_out``); earlier: earlier
    versions' index files, ``earlier_rows`` rows in all (:func:`earlier_index`); snapshot: also
    write the whole index (recorded as ``"snapshot": true``). Returns ``{"drop_files", "docs",
    "dropped", *CAUSES, "index_rows", "held_out_docs", "held_out_trained"}``: each dropped
    document counted once (a ``minhash`` one's bands are decided in several ranges), under its
    lowest cause, as the tokenizer skips it (:func:`record_drops` checks); with a ``minhash``
    threshold also ``"near_kept"``: the train documents that shared a band with an earlier one
    and were kept by the similarity check of every such band.
    """
    import ray

    from raypath.console import Progress
    from raypath.data import _tasks

    t0 = time.perf_counter()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = hash_groups(train, chunk_bytes, cpus) + hash_groups(held_out, chunk_bytes, cpus)
    hashes = [hash_file(out_dir, g) for g in range(len(groups))]
    progress = Progress(log, f"hashing {name}'s documents", len(groups), "groups")
    counts = {"train": 0, "held_out": 0}
    for row in _tasks([{"parts": g, "out": out} for g, out in zip(groups, hashes)], hash_group, spec=spec,
                      fs=fs).iter_rows():
        counts = {k: counts[k] + row[k] for k in counts}
        progress.add(1)
    rows = earlier_rows + (counts["train"] + counts["held_out"]) * spec.rule.per_doc
    n = min(BUCKETS, max(1, math.ceil(rows / RANGE_ROWS)))
    edges = [round(i * BUCKETS / n) for i in range(n + 1)]
    starts = group_starts(train, chunk_bytes)
    out = {"docs": counts["train"], **dict.fromkeys(CAUSES, 0), "index_rows": 0, "held_out_docs": counts["held_out"]}
    range_files, trained, drop_rows = set(), set(), 0
    progress = Progress(log, f"deduplicating {name} against {len(earlier)} index files", n, "ranges")
    for row in _tasks(bucketed.runs(list(range(n)), cpus), decide_ranges, edges=edges, hash_files=hashes,
                      index_files=earlier, starts=starts, out_dir=out_dir, fs=fs, snapshot=snapshot,
                      earlier_rows=earlier_rows, rule=spec.rule).iter_rows():
        out["index_rows"] += row["index_rows"]
        drop_rows += sum(row[c] for c in CAUSES)
        trained.update(row["held_out_trained"])
        range_files |= {row["file"]} - {""}
        progress.add(1)
    _remove(fs, f"{out_dir}/hashes")
    causes, drop_files = _collect(name, starts, sorted(range_files), drop_rows, out_dir, fs)
    if not spec.rule.sketch_bytes:  # no check, none kept
        causes.pop("near_kept")
    out.update(causes)
    out["held_out_trained"] = len(trained)
    out["dropped"] = sum(out[c] for c in CAUSES)
    log.info("deduplicated %s in %.1f s: %d train documents, %d val/test ones (%s)%s", name, time.perf_counter() - t0,
             out["docs"], out["held_out_docs"], spec.rule,
             f"; wrote a snapshot of the whole index ({earlier_rows + out['index_rows']} rows), which later "
             f"versions read instead of the {len(earlier)} earlier index parts" if snapshot else "")
    if out["held_out_trained"]:
        log.warning("version %s: %d of its %d val/test documents were trained by an earlier version (%s; dedup drops "
                    "train documents, never held-out ones): its held-out losses read better than its novelty "
                    "warrants", name, out["held_out_trained"], out["held_out_docs"],
                    "near-duplicates" if spec.rule.mode == "minhash" else "the same text")
    return {**out, **({"snapshot": True} if snapshot else {}), "drop_files": drop_files}


def _collect(name: str, starts: list[int], range_files: list[str], drop_rows: int, out_dir: str,
             fs: pafs.FileSystem) -> tuple[dict[str, int], list[str]]:
    """Every decide range holds drops of every chunk group: regrouped by key range here, once, so
    that each tokenize task reads one file rather than one per range (tasks x ranges reads).
    Returns the dropped documents per cause (and ``near_kept``) and the drop files."""
    from raypath.console import Progress
    from raypath.data import _tasks

    counts, files = dict.fromkeys((*CAUSES, "near_kept"), 0), []
    if range_files:
        runs = collect_runs(starts, drop_rows)
        progress = Progress(log, f"collecting {name}'s dropped documents", len(runs), "key ranges")
        for row in _tasks(runs, collect_drops, range_files=range_files, starts=starts, out_dir=out_dir,
                          fs=fs).iter_rows():
            counts = {c: counts[c] + row[c] for c in counts}
            files += [row["file"]] if row["file"] else []
            progress.add(1)
    _remove(fs, f"{out_dir}/ranges")
    return counts, sorted(files)


def _remove(fs: pafs.FileSystem, d: str) -> None:
    fs.delete_dir_contents(d, missing_dir_ok=True)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(d)


def record_drops(name: str, record: dict, skipped: dict[str, int], rule: Rule) -> None:
    """The tokenizer skipped ``skipped`` documents per cause: checked against what the version's
    dedup ``record`` decided."""
    counts = {c: skipped.get(c, 0) for c in CAUSES}
    if {c: record[c] for c in CAUSES} != counts:
        raise RuntimeError(f"version {name}: tokenizing skipped duplicate documents {counts}, deduplication "
                           f"decided { {c: record[c] for c in CAUSES} }")
    log.info("version %s: %d of %d train documents dropped (%.1f%%; %s): %d trained in an earlier version, %d "
             "matching held-out ones, %d repeated within it%s", name, record["dropped"], record["docs"],
             100 * record["dropped"] / max(record["docs"], 1), rule, counts["earlier"], counts["held_out"],
             counts["within"], f"; {record['near_kept']} kept that shared a band with an earlier one, below "
             f"the similarity threshold" if "near_kept" in record else "")
