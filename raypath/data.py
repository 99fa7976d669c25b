"""Versioned corpora -> token streams the trainers consume exactly once, prepared on Ray Data.

For each version ``k`` raypath prepares, once, under ``RUN_DIR/data/vK/``:

* ``new/part-CCCCCC.parquet``: the version's own text, tokenized and packed into
  blocks of ``seq_len + 1`` tokens (EOS between documents), one file per input
  :class:`~raypath.sources.Chunk`, or per run of small ones (:func:`chunk_groups`). Written by
  Ray Data actors that each load the tokenizer once; a row's id (column ``row``) is
  ``chunk << 32 | block``, ``chunk`` the file's number.
* ``stream/part-BBBBB.parquet``: the order the main path trains version k in: the
  new blocks plus ``replay_ratio`` of the stream sampled from older versions' ``new/``
  files, shuffled. Column ``idx`` is the row's position in the stream.
* ``val/part-00000.parquet``: the first ``val_blocks`` blocks of the val split, a
  fixed evaluation budget so old- and new-domain losses are comparable. Sweeps,
  the law and release decisions read it.
* ``test/part-00000.parquet``: ``test_blocks`` held-out blocks no selection ever
  reads, for the numbers a release reports: the version's ``test/`` files when the
  corpus has them, else the val files' blocks right after the val split's (see
  :func:`held_out_counts`).
* ``dedup/index/`` and ``dedup/drop/``: with ``data.dedup``, the hashes of the documents
  the version trained or holds out, and the keys of the train documents it dropped as
  duplicates, decided before tokenizing (:mod:`raypath.dedup`, which also says its costs).
* ``files.json``: the version's input files with their fingerprints, skipped files and
  rows per tokenized chunk, written once, just before the manifest names it.
* ``RUN_DIR/data/manifest.json``: per version its counts and paths (the per-file lists'
  counts, ``files``), rewritten as each version lands. Re-running checks that earlier
  versions' files did not change.

Where the driver stays flat: it lists files, collects one small stats row per
file and per chunk, and per stream shard a count; every token is read, packed,
sampled, shuffled and written inside Ray tasks and actors. The shuffle is a
range-partitioned sort on a per-row hash (:mod:`raypath.shuffle`), done as a
map-reduce through the filesystem (:func:`write_stream`). Every choice depends on
a row's identity and the seed alone, so the stream is byte-identical whatever the
number of actors. Costs that grow with the data: the token I/O (a version's new
data written once and read once by the shuffle; with replay on, every older
version's new data read once more per version) and the shuffle's temporary copy
of one version's stream on disk -- never driver memory.

Exact resume: trainers read a stream through ``streaming_split``, which hands
blocks to ranks dynamically, so the rows consumed after ``n`` steps are not a
prefix of the stream. Each checkpoint therefore records the *set* of consumed
``idx`` values as intervals (:class:`Consumed`), and a restart filters them out
before splitting. The union of rows trained is then exactly the stream, with no
duplicates, whatever the number of workers before and after.

Run directories prepared before this layout (one ``new.parquet``/``stream.parquet``/
``val.parquet`` per version) still train and resume: readers take a file or a
directory, and an old ``new.parquet`` is rewritten once into ``new/`` when a later
version replays from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypath import bucketed, dedup
from raypath.bucketed import BucketedFiles
from raypath.lineage import FILE_LISTS, recorded_root, without_file_lists
from raypath.mirror import LOCAL, RunDir
from raypath.shuffle import Permutation, bucket_of, hash64, salt
from raypath.sources import (  # noqa: F401
    CHUNK_BYTES,
    POLICIES,
    SUFFIXES,
    Chunk,
    DataError,
    VersionSource,
    apply_policy,
    discover_versions,
    doc_status,
    inspect_files,
    iter_docs,
    same_file,
    unchanged,
)
from raypath.storage import STREAMS, in_threads, read_json, rebase_paths, write_json

log = logging.getLogger(__name__)

STREAM_ROW_GROUP = 256
LAYOUT = 2
#: Target bytes of token data per stream shard (one shuffle group, one file).
SHARD_BYTES = 128 << 20
#: Documents tokenized per call inside a chunk.
TOKENIZE_BATCH = 512
#: Salts that keep the stream, replay and PTFS draws independent of each other.
_STREAM, _REPLAY, _PTFS = 1, 2, 3


# ---------------------------------------------------------------- packing

def pack(docs, block: int, eos: int) -> tuple[np.ndarray, dict[str, int]]:
    """Concatenate documents with EOS after each and cut into ``block``-token rows."""
    pieces, n_docs, n_tokens = [], 0, 0
    for doc in docs:
        if len(doc) == 0:
            continue
        pieces.append(np.asarray(doc, dtype=np.int32))
        pieces.append(np.array([eos], dtype=np.int32))
        n_docs += 1
        n_tokens += len(doc) + 1
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = len(flat) // block
    stats = {"docs": n_docs, "doc_tokens": n_tokens, "blocks": n, "dropped_tokens": len(flat) - n * block}
    return flat[: n * block].reshape(n, block), stats


def _int32(docs: list[list[int]]) -> list[np.ndarray]:
    # A Python int in a list costs ~36 bytes (measured ~41 per token with the lists): a chunk's
    # tokens are kept as int32 arrays from each tokenizer batch on.
    return [np.asarray(d, dtype=np.int32) for d in docs]


def _tokens_array(tokens: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel(), pa.int32()), tokens.shape[1])


def _blocks(table: pa.Table) -> np.ndarray:
    col = table.column("tokens").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1).astype(np.int32)


@contextlib.contextmanager
def _landing(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """Where to write ``path`` so that it appears complete-or-absent: a temp name renamed into
    place locally; the path itself on an object store, which creates an object only when its
    upload (or copy) completes."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_table(table: pa.Table, fs: pafs.FileSystem, path: str, **kw) -> None:
    """Write a parquet file complete-or-absent (:func:`_landing`)."""
    with _landing(fs, path) as target:
        pq.write_table(table, target, filesystem=fs, **kw)


def copy_file(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Copy a file complete-or-absent (:func:`_landing`); in a bucket, server-side."""
    with _landing(fs, dst) as target:
        fs.copy_file(src, target)


def write_marker(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """A small JSON file that marks a directory of parts complete: complete-or-absent like
    :func:`write_table`, so a reader never sees a torn one."""
    if isinstance(fs, pafs.LocalFileSystem):
        write_json(path, obj)
        return
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj).encode())


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """A parquet file, or the sorted ``part-*.parquet`` files of a directory."""
    if fs.get_file_info(path).type == pafs.FileType.File:
        return [path]
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def read_blocks(path: str | Path, filesystem: pafs.FileSystem | None = None) -> np.ndarray:
    """All blocks of a prepared file or directory as ``[n, block]`` int32, in ``idx`` order.

    Holds them all: for val splits (``data.val_blocks``) and tests, not for streams.
    """
    fs = filesystem or pafs.LocalFileSystem()
    files = _parquet_files(fs, str(path))
    if not files:
        raise DataError(f"{path}: no prepared parquet data")
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
    if "idx" in table.column_names:
        table = table.sort_by("idx")
    return _blocks(table)


# ---------------------------------------------------------------- tokenize + pack (Ray Data actors)

class TokenizePack:
    """Ray Data callable class: one group of chunks (:func:`chunk_groups`) in -> its blocks written
    to a parquet file, one stats row out.

    Loaded once per actor (building a fast tokenizer per batch costs more than
    tokenizing it). Packing runs per group, so the tokens lost at pack edges are at
    most one block per group (counted as ``dropped_tokens``). The actor's memory grows with
    one group's tokens, held as int32 (about 4 bytes per token, twice while packing): about
    :data:`raypath.sources.CHUNK_BYTES` of text, but a whole ``.jsonl.gz`` or ``.arrow`` file,
    which is never split (cut such files to ~``CHUNK_BYTES`` of text, or use jsonl/parquet).
    """

    def __init__(self, tokenizer_dir: str, text_column: str, seq_len: int, eos: int, max_doc_chars: int,
                 endpoint: str | None, fs: pafs.FileSystem, rd: RunDir):
        import os

        # Actors are the parallelism; a thread pool per actor would oversubscribe the CPUs.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from raypath.tokenizer import load_tokenizer

        # A node other than the driver's has the run directory's tokenizer and embedded
        # corpus only once pulled from a remote run directory (no-ops for other paths).
        self.tok = load_tokenizer(rd.fetch(tokenizer_dir))
        self.column, self.block, self.eos = text_column, seq_len + 1, eos
        self.max_doc_chars, self.endpoint, self.fs, self.rd = max_doc_chars, endpoint, fs, rd

    def _ids(self, chunk: Chunk, skipped: dict, base: int | None = None,
             dropped: set[int] | frozenset = frozenset()) -> list[np.ndarray]:
        """Token ids of ``chunk``'s documents; ``dropped``: keys (``base | position``) to skip as
        duplicates, with their causes (:mod:`raypath.dedup`), counted in ``skipped`` by cause."""
        from raypath.tokenizer import encode_documents

        ids, batch = [], []
        for _, text, problem, pos in iter_docs(chunk, self.column, self.endpoint):
            status = doc_status(text, problem, self.max_doc_chars)
            if status == "ok" and base is not None and base | pos in dropped:
                status = dropped[base | pos]
            if status != "ok":
                skipped[status] = skipped.get(status, 0) + 1
                continue
            batch.append(text)
            if len(batch) == TOKENIZE_BATCH:
                ids.extend(_int32(encode_documents(self.tok, batch)))
                batch = []
        if batch:
            ids.extend(_int32(encode_documents(self.tok, batch)))
        return ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for c in batch.to_pylist():
            skipped: dict[str, int] = {}
            ids = []
            dropped = dedup.dropped_keys(self.fs, c["drop"], *dedup.key_range(c["parts"])) if c["drop"] else {}
            for p in c["parts"]:
                self.rd.fetch(p["path"], missing_ok=True)
                base = p["file"] << dedup.POS_BITS if p.get("file", -1) >= 0 else None
                ids += self._ids(Chunk(p["path"], p["fmt"], p["start"], p["stop"]), skipped, base, dropped)
            blocks, stats = pack(ids, self.block, self.eos)
            rows = (np.int64(c["chunk"]) << np.int64(32)) + np.arange(len(blocks), dtype=np.int64)
            table = pa.table({"row": rows, "src": np.full(len(blocks), c["src"], np.int16),
                              "tokens": _tokens_array(blocks.reshape(-1, self.block))})
            write_table(table, self.fs, c["out"], row_group_size=STREAM_ROW_GROUP)
            out.append({"job": c["job"], "chunk": c["chunk"], **stats, "skipped_empty": skipped.get("empty", 0),
                        "skipped_too_long": skipped.get("too_long", 0), "skipped_invalid": skipped.get("invalid", 0),
                        **{f"duplicate_{k}": skipped.get(k, 0) for k in dedup.CAUSES}})
        return pa.Table.from_pylist(out)


def chunk_groups(chunks: list[dict], chunk_bytes: int) -> list[list[dict]]:
    """Consecutive chunks of a split, in order, grouped up to ``chunk_bytes`` of input each: a group
    is packed as one. Packed alone, a file shorter than a block (a short document per file, as a
    crawl dump often has) was dropped whole at its pack edge; a chunk of ``chunk_bytes`` stays alone."""
    groups: list[list[dict]] = []
    size = 0
    for c in chunks:
        n = int(c.get("bytes") or chunk_bytes)
        if not groups or size + n > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(c)
        size += n
    return groups


def _part(d: str, i: int) -> str:
    return f"{d.rstrip('/')}/part-{i:06d}.parquet"


@dataclass(frozen=True)
class TokenizeJob:
    """Chunks whose blocks go to ``out_dir/part-CCCCCC.parquet`` as rows of version ``src``, without
    the documents whose keys ``drop`` files list (:func:`raypath.dedup.dropped_keys`)."""

    chunks: list[dict]
    src: int
    out_dir: str
    drop: tuple[str, ...] = ()


def tokenize_chunks(jobs: list[TokenizeJob], fs: pafs.FileSystem, spec: "PrepareSpec", eos: int,
                    max_doc_chars: int = 0, what: str = "tokenizing") -> list[list[dict]]:
    """Tokenize and pack every job's chunks, in groups (:func:`chunk_groups`), in one pass of a Ray
    Data actor pool.

    One pass for all the versions (and splits) being prepared: the pool's actors load the
    tokenizer once, and no version waits for the previous one's stragglers. Returns, per
    job, one stats row per group in order, its ``chunk`` the group's number (the driver's only
    per-chunk state, linear in the number of chunks). ``what`` heads the progress line (input
    bytes done, tokens, ETA) logged as the groups finish.
    """
    import ray.data

    from raypath.console import Progress

    items = [{"parts": group, "job": j, "chunk": i, "src": job.src, "out": _part(job.out_dir, i),
              "drop": list(job.drop)}
             for j, job in enumerate(jobs) for i, group in enumerate(chunk_groups(job.chunks, spec.chunk_bytes))]
    if not items:
        return [[] for _ in jobs]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizePack,
        fn_constructor_kwargs=dict(tokenizer_dir=spec.tokenizer_dir, text_column=spec.text_column,
                                   seq_len=spec.seq_len, eos=eos, max_doc_chars=max_doc_chars,
                                   endpoint=spec.endpoint, fs=fs, rd=spec.rd),
        batch_size=1, batch_format="pyarrow",
        # One chunk in flight per actor: an idle actor takes the next one, so the actors
        # finish within one chunk's time of each other. Ray Data's default queues several
        # per actor up front, and the queue of an actor that started late finishes alone.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(spec.actors, len(items))), max_tasks_in_flight_per_actor=1),
    )
    size = {(it["job"], it["chunk"]): sum(int(p.get("bytes") or spec.chunk_bytes) for p in it["parts"])
            for it in items}
    progress = Progress(log, what, sum(size.values()), "B")
    out: list[list[dict]] = [[] for _ in jobs]
    for row in ds.iter_rows():
        progress.add(size[row["job"], row["chunk"]], tokens=row["doc_tokens"])
        out[row.pop("job")].append(row)
    return [sorted(rows, key=lambda r: r["chunk"]) for rows in out]


def _sum_stats(rows: list[dict]) -> dict:
    keys = ("docs", "doc_tokens", "blocks", "dropped_tokens")
    total = {k: int(sum(r[k] for r in rows)) for k in keys}
    total["duplicates"] = {k: int(sum(r.get(f"duplicate_{k}", 0) for r in rows)) for k in dedup.CAUSES}
    total["skipped_docs"] = {k: n for k in ("empty", "too_long", "invalid")
                             if (n := int(sum(r[f"skipped_{k}"] for r in rows)))}
    return total


# ---------------------------------------------------------------- shuffled streams (Ray Data)

@dataclass(frozen=True)
class Pool:
    """Prepared new data of one version: its ``new/`` part files (paths on the data
    filesystem) and rows per chunk, which locate a row by position without reading."""

    src: int
    files: tuple[str, ...]
    chunk_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        return int(sum(self.chunk_rows))


@dataclass(frozen=True)
class Replay:
    """Exactly ``n`` rows drawn without replacement from the concatenation of ``pools``.

    Row ``q`` of the concatenation is drawn iff ``perm.inverse(q) < n``: a test each
    row answers from its own position, in whatever task reads it.
    """

    n: int
    perm: Permutation
    offsets: dict[int, tuple[int, np.ndarray]]  # src -> (pool start, chunk starts)

    @classmethod
    def of(cls, pools: list[Pool], n: int, key: int) -> "Replay":
        offsets, start = {}, 0
        for p in pools:
            offsets[p.src] = (start, np.concatenate([[0], np.cumsum(p.chunk_rows)]).astype(np.int64))
            start += p.rows
        return cls(n, Permutation(max(start, 1), key), offsets)

    def drawn(self, src: np.ndarray, row: np.ndarray) -> np.ndarray:
        q = np.empty(len(src), np.int64)
        for s in np.unique(src):
            at = src == s
            start, chunks = self.offsets[int(s)]
            q[at] = start + chunks[row[at] >> 32] + (row[at] & 0xFFFFFFFF)
        return self.perm.inverse(q) < self.n


@dataclass(frozen=True)
class StreamSpec:
    """What :func:`write_stream` shuffles: all rows of ``own`` sources plus ``replay``'s draw."""

    key: int
    buckets: int
    own: tuple[int, ...]
    replay: Replay | None = None


def _assign(batch: pa.Table, spec: StreamSpec) -> pa.Table:
    """Keep the stream's rows of a batch and give each its sort key and shard."""
    row, src = batch["row"].to_numpy(), batch["src"].to_numpy()
    keep = np.isin(src, spec.own)
    if spec.replay is not None and not keep.all():
        keep[~keep] = spec.replay.drawn(src[~keep], row[~keep])
    batch = batch.filter(pa.array(keep))
    key = hash64(spec.key, batch["src"].to_numpy(), batch["row"].to_numpy())
    return batch.append_column("key", pa.array(key)).append_column("bucket", pa.array(bucket_of(key, spec.buckets)))


def _map_file(tmp_dir: str, i: int) -> str:
    return f"{tmp_dir}/m{i:06d}.arrows"


def _scatter(batch: pa.Table, spec: StreamSpec, tmp_dir: str, fs: pafs.FileSystem) -> pa.Table:
    """Map side: input part file ``i`` -> its stream rows ordered by shard, one bucketed file
    (:func:`_map_file`, :mod:`raypath.bucketed`; a shard a bucket), each shard's rows an Arrow
    IPC stream, from which a reducer reads its shard's rows by range. Returns rows per
    (map file, source, shard); a file none of whose rows the stream takes, one row of 0."""
    counts = []
    for i, path in zip(batch["map"].to_pylist(), batch["file"].to_pylist()):
        table = _assign(pq.read_table(path, filesystem=fs), spec)
        table = table.take(pc.sort_indices(table, [("bucket", "ascending")]))
        buckets = table["bucket"].to_numpy()
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]]) if len(buckets) else []
        sizes = np.zeros(spec.buckets, np.int64)
        with _landing(fs, _map_file(tmp_dir, i)) as target, fs.open_output_stream(target) as f:
            for lo, hi in zip(starts, [*starts[1:], len(buckets)]):
                part = table.slice(lo, hi - lo)
                body = _ipc_bytes(part.drop_columns(["bucket"]))
                f.write(body)
                sizes[buckets[lo]] = len(body)
                src, n = np.unique(part["src"].to_numpy(), return_counts=True)
                counts += [{"map": i, "src": int(s), "bucket": int(buckets[lo]), "n": int(c)}
                           for s, c in zip(src, n)]
            bucketed.write_index(f, sizes)
        if not len(buckets):  # the driver counts the map files done by these rows
            counts.append({"map": i, "src": 0, "bucket": 0, "n": 0})
    schema = pa.schema([("map", pa.int64()), ("src", pa.int64()), ("bucket", pa.int64()), ("n", pa.int64())])
    return pa.Table.from_pylist(counts, schema=schema)


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    return sink.getvalue()


#: Most bytes of map-file pieces a reduce task reads ahead: consecutive shards' pieces of a map
#: file lie next to each other, so a window of shards costs one ranged read per map file instead
#: of one per (map file, shard), at this much memory held beside the shard being sorted.
GATHER_READ_BYTES = 512 << 20


def _gather(batch: pa.Table, maps: int, offsets: list[int], tmp_dir: str, out_dir: str,
            fs: pafs.FileSystem, read_bytes: int = GATHER_READ_BYTES) -> pa.Table:
    """Reduce side: a run of consecutive shards, each: its rows of every map file -> sorted by
    key, numbered from the shard's offset, one file. Its requests grow with the map files: per
    map file one index read for the run, then a ranged read per window of shards with rows there
    (``read_bytes`` of all map files' pieces a window; on an object store also one open, a HEAD,
    for the run), 16 in flight: each is a round trip."""
    rows, buckets = [], len(offsets) - 1  # offsets: every shard's first idx, then the total
    for first, last in zip(batch["first"].to_pylist(), batch["last"].to_pylist()):
        files = BucketedFiles(fs, [_map_file(tmp_dir, i) for i in range(maps)], first, last, buckets)
        try:
            for lo, hi in files.windows(read_bytes):
                files.read(lo, hi)
                for b in range(lo, hi + 1):
                    if offsets[b + 1] == offsets[b]:
                        continue  # no rows: no file
                    table = pa.concat_tables([pa.ipc.open_stream(p).read_all() for i in range(maps)
                                              if (p := files.piece(i, b)) is not None])
                    # (key, src, row) is unique, so the order never depends on which piece came first.
                    table = table.take(pc.sort_indices(table, [("key", "ascending"), ("src", "ascending"),
                                                               ("row", "ascending")]))
                    idx = np.arange(offsets[b], offsets[b] + len(table), dtype=np.int64)
                    write_table(pa.table({"idx": idx, "src": table["src"], "tokens": table["tokens"]}), fs,
                                f"{out_dir}/part-{b:05d}.parquet", row_group_size=STREAM_ROW_GROUP)
                    rows.append({"bucket": b, "rows": len(table)})
        finally:
            files.close()
    return pa.Table.from_pylist(rows)


def _tasks(items: list[dict], fn, **kwargs):
    """``fn`` over ``items`` as Ray Data tasks, one item per task: the dataset of their results."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow")


def write_stream(pools: list[Pool], spec: StreamSpec, out_dir: str, fs: pafs.FileSystem,
                 what: str = "shuffling the stream", read_bytes: int = GATHER_READ_BYTES) -> dict:
    """Shuffle ``spec``'s rows of ``pools`` into ``out_dir/part-BBBBB.parquet`` (``idx`` order =
    file order); returns rows per source.

    A map-reduce shuffle through the filesystem, in Ray Data tasks: each input part file becomes
    one map file of its rows ordered by shard with a byte index (map), the driver adds up rows
    per shard as the map tasks' counts stream in (its state: one count per shard and per source,
    and which map files are done, for the progress line), and each shard reads its byte range of
    every map file, sorts, numbers and writes its rows (reduce). Memory per task: one input file,
    or one shard (:data:`SHARD_BYTES`) beside ``read_bytes`` of map-file pieces read ahead
    (:data:`GATHER_READ_BYTES`); disk: one extra copy of the stream while it runs, in one
    temporary file per input file; reads: one ranged read per (input file, window of shards with
    rows there) (:class:`raypath.bucketed.BucketedFiles`), the only cost that grows as files x shards (divided by the
    shards a window holds). ``what`` heads the progress lines of both passes.
    """
    import ray

    from raypath.console import Progress

    tmp = f"{out_dir}.tmp"
    fs.delete_dir_contents(tmp, missing_dir_ok=True)
    files = [f for p in pools for f in p.files]
    counts = _tasks([{"map": i, "file": f} for i, f in enumerate(files)], _scatter, spec=spec, tmp_dir=tmp, fs=fs)
    per_bucket = np.zeros(spec.buckets, np.int64)
    per_src = np.zeros(0, np.int64)
    mapped, progress = set(), Progress(log, f"{what} (reading)", len(files), "files")
    for c in counts.iter_batches(batch_format="numpy", batch_size=None):  # a map task's counts at a time
        np.add.at(per_bucket, c["bucket"], c["n"])
        per_src = _add_padded(per_src, np.bincount(c["src"], weights=c["n"]).astype(np.int64))
        done = set(np.unique(c["map"]).tolist()) - mapped  # a file's rows may span two batches
        mapped |= done
        progress.add(len(done), blocks=int(c["n"].sum()))
    offsets = np.concatenate([[0], np.cumsum(per_bucket)]).tolist()
    fs.create_dir(out_dir, recursive=True)
    runs = bucketed.runs(np.flatnonzero(per_bucket).tolist(), int(ray.cluster_resources().get("CPU", 1)))
    progress = Progress(log, f"{what} (writing)", int(np.count_nonzero(per_bucket)), "shards")
    written = []
    for row in _tasks(runs, _gather, maps=len(files), offsets=offsets, tmp_dir=tmp, out_dir=out_dir,
                      fs=fs, read_bytes=read_bytes).iter_rows():
        written.append(row)
        progress.add(1, blocks=row["rows"])
    fs.delete_dir_contents(tmp, missing_dir_ok=True)
    fs.delete_dir(tmp)
    if sum(r["rows"] for r in written) != offsets[-1]:
        raise RuntimeError(f"{out_dir}: wrote {sum(r['rows'] for r in written)} rows, counted {offsets[-1]}")
    return {"rows": int(offsets[-1]), "shards": spec.buckets,
            "from": {src: int(n) for src, n in enumerate(per_src.tolist()) if n}}


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def _buckets(rows: int, block: int, shard_bytes: int = SHARD_BYTES) -> int:
    return max(1, math.ceil(rows * block * 4 / shard_bytes))


def held_out_counts(available: int, val: int, test: int) -> tuple[int, int]:
    """How many of ``available`` val-file blocks become the val and the test split.

    Val takes the first ``val`` blocks, test the next ``test``: val stays what it would be
    without a test split. When the files hold fewer than both, they are shared in
    proportion, val's share rounded up (every selection reads it; it keeps at least one block),
    so neither split silently vanishes.
    """
    if available >= val + test or test == 0:
        return min(val, available), test if available >= val + test else 0
    if available == 0:  # nothing to share: the caller refuses a version without val blocks
        return 0, 0
    n_val = max(1, min(val, math.ceil(available * val / (val + test))))
    return n_val, available - n_val


def _take_blocks(fs: pafs.FileSystem, parts_dir: str, stats: list[dict], lo: int, hi: int, out_dir: str) -> int:
    """Blocks ``[lo, hi)`` of the tokenized parts, in file order, as ``out_dir/part-000000.parquet``.
    Reads only the parts that hold them: bounded by the split budgets, not the val files' size."""
    tables, seen = [], 0
    for s in stats:
        if seen >= hi:
            break
        if s["blocks"] and seen + s["blocks"] > lo:
            t = pq.read_table(_part(parts_dir, s["chunk"]), filesystem=fs, columns=["tokens"])
            tables.append(t.slice(max(lo - seen, 0), hi - max(lo, seen)))
        seen += s["blocks"]
    have = sum(len(t) for t in tables)
    if have:
        tokens = pa.concat_tables(tables)["tokens"].combine_chunks()
        write_table(pa.table({"idx": np.arange(have, dtype=np.int64), "tokens": tokens}), fs, _part(out_dir, 0))
    return have


def _held_out_splits(fs: pafs.FileSystem, root: str, stats: dict[str, list[dict]], spec: "PrepareSpec",
                     name: str) -> tuple[int, int]:
    """Write the version's val and test splits; returns their block counts. The tokenized
    parts are removed."""
    val_blocks = sum(s["blocks"] for s in stats["val"])
    if stats["test"]:  # the corpus's own test/ folder
        n_val = _take_blocks(fs, f"{root}/val-parts", stats["val"], 0, spec.val_blocks, f"{root}/val")
        n_test = _take_blocks(fs, f"{root}/test-parts", stats["test"], 0, spec.test_blocks, f"{root}/test")
        fs.delete_dir(f"{root}/test-parts")
    else:
        n_val, n_test = held_out_counts(val_blocks, spec.val_blocks, spec.test_blocks)
        # The counts written, not the planned ones: the manifest must match what is on disk.
        n_val = _take_blocks(fs, f"{root}/val-parts", stats["val"], 0, n_val, f"{root}/val")
        n_test = _take_blocks(fs, f"{root}/val-parts", stats["val"], n_val, n_val + n_test, f"{root}/test")
    fs.delete_dir(f"{root}/val-parts")
    if spec.test_blocks and n_test < spec.test_blocks:
        log.warning("version %s: %d test blocks (data.test_blocks=%d); %s", name, n_test, spec.test_blocks,
                    "its test/ files are short" if stats["test"] else
                    f"its val files hold {val_blocks} blocks, shared between val and test")
    return n_val, n_test

# ---------------------------------------------------------------- exact-resume bookkeeping

@dataclass
class Consumed:
    """Set of consumed stream rows, kept as sorted, merged half-open intervals."""

    intervals: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_list(cls, intervals: list) -> "Consumed":
        out = cls()
        for lo, hi in intervals:
            out._add_interval(int(lo), int(hi))
        return out

    def add(self, idx: np.ndarray) -> None:
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        if not len(idx):
            return
        # Split sorted indices into runs of consecutive values.
        breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
        for run in np.split(idx, breaks):
            self._add_interval(int(run[0]), int(run[-1]) + 1)

    def merge(self, other: "Consumed") -> None:
        for lo, hi in other.intervals:
            self._add_interval(lo, hi)

    def _add_interval(self, lo: int, hi: int) -> None:
        merged = []
        for a, b in self.intervals:
            if b < lo or a > hi:
                merged.append([a, b])
            else:
                lo, hi = min(a, lo), max(b, hi)
        merged.append([lo, hi])
        self.intervals = sorted(merged)

    def mask(self, idx: np.ndarray) -> np.ndarray:
        """True where ``idx`` was already consumed."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self.intervals:
            return np.zeros(len(idx), dtype=bool)
        lo = np.array([a for a, _ in self.intervals])
        hi = np.array([b for _, b in self.intervals])
        pos = np.searchsorted(lo, idx, side="right") - 1
        return (pos >= 0) & (idx < hi[np.clip(pos, 0, None)])

    def __len__(self) -> int:
        return sum(b - a for a, b in self.intervals)


def _drop_consumed(batch: dict[str, np.ndarray], intervals: list) -> dict[str, np.ndarray]:
    keep = ~Consumed.from_list(intervals).mask(batch["idx"])
    return {k: v[keep] for k, v in batch.items()}


def stream_dataset(stream_path: str, consumed: list | None = None, limit: int | None = None, filesystem=None):
    """The stream of one version as a Ray Dataset, minus the rows already trained.

    limit: train only rows ``idx < limit`` (whole global batches). Cutting the
        tail here, not wherever the splits happen to run dry, makes the set of
        trained rows independent of world size and restarts.
    filesystem: pyarrow filesystem ``stream_path`` lives on (a remote run
        directory); None = local path or URI.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # for readers here; Ray Train's: raypath.segment.ordered_ingest
    # The parquet reader of Ray Data 2.60's DataSourceV2 starts a pool of 32 footer-reader actors
    # (new processes) for every read, whatever the file count: 6-10 s per segment on a small
    # node, before the first batch. The V1 reader gets the same rows from the footers of the
    # stream's shards (our own files, few and large) in tasks or inline.
    ctx.use_datasource_v2 = False
    ds = ray.data.read_parquet(stream_path, filesystem=filesystem).select_columns(["idx", "tokens"])
    if limit is not None:
        ds = ds.filter(expr=f"idx < {int(limit)}")
    if consumed:
        ds = ds.map_batches(_drop_consumed, fn_kwargs={"intervals": consumed}, batch_format="numpy")
    return ds




# ---------------------------------------------------------------- per-version preparation

@dataclass
class PrepareSpec:
    """What :func:`prepare_versions` needs from the run config.

    chunk_bytes, shard_bytes: sizes of a tokenize task's input and of a stream shard (file).
    rd: the run directory ``data_dir`` belongs to; for a remote one, prepared files are
        written straight to the bucket by the actors, only the manifest locally.
    endpoint: S3 endpoint of a remote corpus (None = pyarrow's default resolution).
    """

    data_dir: str
    tokenizer_dir: str
    seq_len: int
    text_column: str
    val_blocks: int
    replay_ratio: float
    seed: int
    actors: int
    min_blocks: int  # a version must fill two global batches: a main step before its fork, and one after
    on_bad_input: str = "error"  # "error" or "skip" (counted and logged)
    max_doc_chars: int = 0  # 0 = no limit
    rd: RunDir = LOCAL
    endpoint: str | None = None
    chunk_bytes: int = CHUNK_BYTES  # input per tokenize task (see raypath.sources)
    shard_bytes: int = SHARD_BYTES  # token bytes per stream shard
    test_blocks: int = 0  # held-out test split per version; 0 = none
    dedup: dedup.Rule = dedup.Rule()  # which train documents to drop as duplicates (raypath.dedup)

    @property
    def doc_limit(self) -> int:
        """The longest document tokenizing keeps: over-long ones are skipped under ``skip`` (under
        ``error`` validation refused them)."""
        return self.max_doc_chars if self.on_bad_input == "skip" else 0


@dataclass
class Plan:
    """What preparing will do, decided before any token is produced: the manifest, and per
    new version its validated files (each with its chunks and fingerprint)."""

    manifest_path: Path
    manifest: dict
    todo: list[dict] = field(default_factory=list)  # {index, source, train, val, test, skipped_files}


def _split_and_name(path: str) -> str:
    """``train/part-000.jsonl``: a file's place inside its version directory."""
    return "/".join(path.rstrip("/").split("/")[-2:])


def _relocated(rec: dict, src: VersionSource, say: bool = True) -> dict:
    """``rec`` with its files' paths where the corpus now has files of the same split and name
    (a corpus moved, ``data.corpus`` changed with it), or ``rec`` itself when any is not there.
    Their contents are then checked against the record where they are."""
    here = {_split_and_name(f): f for f in (*src.train_files, *src.val_files, *src.test_files)}
    lists = [k for k in ("train_files", "val_files", "test_files", "skipped_files") if k in rec]
    moved = {r["path"]: here.get(_split_and_name(r["path"])) for k in lists for r in rec[k]}
    if not all(moved.values()) or all(old == new for old, new in moved.items()):
        return rec
    if say:
        log.info("version %s: its files are now under %s (recorded under %s); checking they are unchanged",
                 src.name, next(iter(moved.values())).rsplit("/", 2)[0], next(iter(moved)).rsplit("/", 2)[0])
    return {**rec, **{k: [{**r, "path": moved[r["path"]]} for r in rec[k]] for k in lists}}


def _recorded_files(rec: dict, src: VersionSource, say: bool = True) -> list[dict]:
    """The manifest records of a prepared version's files, where they were or, a corpus moved,
    where the corpus now has them (said when ``say``); the version's files must be the ones it
    was trained on."""
    rec = _relocated(rec, src, say)
    pending = []
    skipped = {s["path"] for s in rec.get("skipped_files", [])}  # bad files it was trained without
    kinds = [("train_files", src.train_files), ("val_files", src.val_files)]
    if "test_files" in rec:  # a version prepared from its own test/ folder
        kinds.append(("test_files", src.test_files))
    for kind, files in kinds:
        files = tuple(f for f in files if f not in skipped)
        recorded = {r["path"]: r for r in rec[kind]}
        if set(recorded) != set(files):
            added = sorted(set(files) - set(recorded))
            gone = sorted(set(recorded) - set(files))
            raise DataError(f"version {src.name}: its {kind.split('_')[0]} files changed after it was "
                            f"trained (added: {added or 'none'}; missing: {gone or 'none'})")
        pending += [recorded[f] for f in files]
    return pending


def check_prepared(sources: list[VersionSource], data_dir: str | Path, seq_len: int, dedup: str = "none",
                   each: Callable[[list[dict], VersionSource], None] | None = None) -> dict:
    """The data manifest under ``data_dir`` (empty before the first version), refused where the
    corpus no longer gives its versions in their order, each with the files it was prepared from.
    Needs no Ray and reads no file's contents (:func:`plan_versions` checks those, through
    ``each``: called per version with its files' records, where the corpus has them now), so a run
    can refuse a reordered or edited corpus before a cluster starts."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        return {"versions": []}
    manifest = _manifest_head(path)
    if manifest.get("seq_len") not in (None, seq_len):
        raise DataError(f"{path}: prepared with seq_len={manifest['seq_len']!r}, config asks {seq_len!r}; "
                        f"use a new run_dir")
    if manifest["versions"] and manifest.get("dedup", "none") != dedup:
        # A version deduplicates against the index each earlier one left: none left, nothing to
        # check against; left and ignored, the lineage mixes two rules.
        raise DataError(f"{path}: its versions were prepared with data.dedup={manifest.get('dedup', 'none')!r}, "
                        f"the config asks {dedup!r}; set it back (data.dedup and its data.minhash_* settings; "
                        f"a lineage prepared before data.minhash_threshold had none: 0), or use a new run_dir")

    def check(i: int, rec: dict) -> None:
        if i >= len(sources):
            return
        if sources[i].name != rec["name"]:
            raise DataError(f"{path}: version {i + 1} was {rec['name']!r}; versions can only be "
                            f"appended (the corpus gives {[s.name for s in sources]}, in name order with "
                            f"numbers compared as numbers; data.versions lists them in an order of your own)")
        files = _recorded_files(rec, sources[i], say=each is not None)
        if each is not None:
            each(files, sources[i])

    return _read_versions(manifest, path, check)


def _check_unchanged(files: list[dict], src: VersionSource, endpoint: str | None, rd: RunDir) -> None:
    """Earlier versions' files (``files``: their records, :func:`_recorded_files`) must be the ones
    trained on. Discovery listed them (one listing per split directory): a file whose listed size
    and mtime are the recorded ones costs nothing more; the others are checked in parallel Ray
    tasks (a stat, and a hash locally). The cost grows with the files whose stat changed (a corpus
    copied elsewhere: all of them), not with the lineage's files."""
    import ray

    pending = [r for r in files if not same_file(r, *src.listed.get(r["path"], (None, None)))]
    if ray.is_initialized() and len(pending) > 1:
        task = ray.remote(num_cpus=1)(_unchanged_here)
        verdicts = ray.get([task.remote(r, endpoint, rd) for r in pending])
    else:
        verdicts = [_unchanged_here(r, endpoint, rd) for r in pending]
    for r, verdict in zip(pending, verdicts):
        if verdict == "missing":
            raise DataError(f"{r['path']}: file of version {src.name} is missing (it was trained on; restore it)")
        if verdict:
            raise DataError(f"{r['path']}: {verdict} after version {src.name} was trained; "
                            f"add new data as a new version")


def _unchanged_here(rec: dict, endpoint: str | None, rd: RunDir) -> str | None:
    rd.fetch(rec["path"], missing_ok=True)  # a file of the run directory (the embedded corpus) this node lacks
    return unchanged(rec, endpoint)


def plan_versions(sources: list[VersionSource], spec: PrepareSpec) -> Plan:
    """Check the manifest and earlier versions, then validate and fingerprint every file of
    the versions still to prepare (parallel Ray tasks) under ``spec.on_bad_input``."""
    path = Path(spec.data_dir) / "manifest.json"
    manifest = check_prepared(sources, spec.data_dir, spec.seq_len, str(spec.dedup),
                              each=lambda files, src: _check_unchanged(files, src, spec.endpoint, spec.rd))
    if manifest.get("tokenizer_dir") not in (None, spec.tokenizer_dir):
        raise DataError(f"{path}: its versions were tokenized with the tokenizer in {manifest['tokenizer_dir']}, "
                        f"the config gives the one in {spec.tokenizer_dir} (data.tokenizer, else model.path's "
                        f"own, else the run's): set them back, or use a new run_dir")
    records = manifest["versions"]
    new = sources[len(records):]
    files = [f for s in new for f in (*s.train_files, *s.val_files, *s.test_files)]
    limit = spec.max_doc_chars if spec.on_bad_input == "error" else 0
    t0 = time.perf_counter()
    reports = dict(zip(files, inspect_files(files, spec.text_column, limit, spec.endpoint, spec.chunk_bytes,
                                                     spec.rd)))
    if files:
        log.info("validated and fingerprinted %d files in %.1f s", len(files), time.perf_counter() - t0)
    plan = Plan(path, manifest)
    for i, src in enumerate(new, start=len(records)):
        todo = {"index": i, "source": src, "skipped_files": [], "test": []}
        for split, split_files in _splits(src):
            keep, skipped = apply_policy([reports[f] for f in split_files], spec.on_bad_input)
            if not keep:
                raise DataError(f"version {src.name}: no usable {split} files left "
                                f"({len(skipped)} skipped: {[s['reason'] for s in skipped]})")
            todo[split] = keep
            todo["skipped_files"] += skipped
        for s in todo["skipped_files"]:
            log.warning("skipping %s: %s", s["path"], s["reason"])
        plan.todo.append(todo)
    return plan


def _run_root(manifest_path: Path) -> Path:
    # The manifest lives in RUN_DIR/data/; its paths are stored relative to RUN_DIR.
    return manifest_path.resolve().parent.parent


#: A version record's file lists that only the checks at a run's start read (:func:`check_prepared`,
#: :func:`plan_versions`): the corpus files' fingerprints and the skipped files.
FINGERPRINTS = ("train_files", "val_files", "test_files", "skipped_files")


def run_record(rec: dict) -> dict:
    """What a run keeps of a version once its files are checked: the record without its files'
    fingerprints (their counts stay in ``files``), with the chunk layout every stream pass reads.
    The fingerprints grow with the corpus (~250 bytes a file), and a sweep sends its run's
    context, versions included, to every trial."""
    counts = without_file_lists(rec).get("files")
    out = {k: v for k, v in rec.items() if k not in FINGERPRINTS}
    return {**out, "files": counts} if counts else out


def read_manifest(path: Path, each: Callable[[int, dict], None] | None = None) -> dict:
    """The data manifest with absolute paths under the run directory's current place (an older
    manifest's absolute paths of wherever the run directory was are moved there), each version's
    record with its chunk rows (what a stream pass reads) from its ``files.json``, not its files'
    fingerprints: ``each(i, record)`` sees version ``i``'s with them, one version at a time
    (:func:`version_files` reads one version's again)."""
    return _read_versions(_manifest_head(path), path, each)


def _manifest_head(path: Path) -> dict:
    """The data manifest as written: settings, and version records without their file lists."""
    root = _run_root(path)
    manifest = read_json(path, root=root)
    return rebase_paths(manifest, recorded_root(manifest.get("versions", [])) or root, root)


def _read_versions(manifest: dict, path: Path, each: Callable[[int, dict], None] | None) -> dict:
    """:func:`read_manifest`'s pass over the versions' ``files.json``.

    Costs that grow with the data: every ``files.json`` is parsed (~250 bytes a corpus file), but
    one version's fingerprints are held at a time, never a lineage's (a million corpus files
    would be a few GB of Python objects in the driver)."""
    for i, rec in enumerate(manifest.get("versions", [])):
        full = rec
        if "files_path" in rec:
            files = Path(rec["files_path"])
            if not files.is_file():
                raise DataError(f"{files}: version {rec.get('name')}'s file list is missing (the data manifest "
                                f"{path} names it); restore it or use a new run_dir")
            full = {**rec, **read_json(files, root=_run_root(path))}
            rec.update({k: v for k, v in full.items() if k not in FINGERPRINTS})
        # (a manifest that still inlines them keeps them: its next write moves them to files.json)
        if each is not None:
            each(i, full)
    return manifest


def version_files(rec: dict) -> dict:
    """A version record of :func:`read_manifest` with its files' fingerprints (from its ``files.json``)."""
    if "files_path" not in rec or "train_files" in rec:
        return rec
    files = Path(rec["files_path"])  # RUN_DIR/data/vK/files.json, its paths relative to RUN_DIR
    return {**rec, **read_json(files, root=files.parents[2])}


def _write_manifest(path: Path, manifest: dict) -> None:
    """Write the data manifest; a version's per-file lists go, once, to its ``files.json``.

    Costs that grow with the data: ``files.json`` (~250 bytes a file) is written once per
    version; the manifest, rewritten as each version lands, holds only counts and paths.
    """
    root = _run_root(path)
    for rec in manifest["versions"]:
        if "files_path" not in rec:  # prepared now, or read from a manifest that still inlined them
            files = path.parent / rec["name"] / "files.json"
            write_json(files, {k: rec[k] for k in FILE_LISTS if k in rec}, root=root)
            rec["files_path"] = str(files)
        rec["files"] = without_file_lists(rec).get("files", {})
    write_json(path, {**manifest, "versions": [without_file_lists(r) for r in manifest["versions"]]}, root=root)


def _splits(src: VersionSource) -> list[tuple[str, tuple[str, ...]]]:
    """A version's file lists by split; ``test`` only when the corpus has a ``test/`` folder."""
    return [("train", src.train_files), ("val", src.val_files)] + ([("test", src.test_files)] if src.test_files else [])


def prepare_versions(sources: list[VersionSource], spec: PrepareSpec, plan: Plan | None = None) -> list[dict]:
    """Prepare every version not yet in the manifest; return all version records."""
    from raypath.tokenizer import load_tokenizer

    plan = plan or plan_versions(sources, spec)
    manifest = plan.manifest
    manifest.update(seq_len=spec.seq_len, tokenizer_dir=spec.tokenizer_dir, dedup=str(spec.dedup))
    records: list[dict] = manifest["versions"]
    if not plan.todo:
        return records[: len(sources)]
    eos = load_tokenizer(spec.tokenizer_dir).eos_token_id
    _dedup_versions(plan.todo, spec, records)
    t1 = time.perf_counter()
    tokenized = _tokenize_versions(plan.todo, spec, eos)
    t2 = time.perf_counter()
    tokens = sum(r["doc_tokens"] for v in tokenized for rows in v.values() for r in rows)
    log.info("tokenized and packed %d tokens of %d version(s) in %.1f s (%.0f tokens/s, %d actors)",
             tokens, len(plan.todo), t2 - t1, tokens / max(t2 - t1, 1e-9), spec.actors)
    for todo, stats in zip(plan.todo, tokenized):
        t = time.perf_counter()
        rec = _prepare_one(todo, spec, records, stats)
        records.append(rec)
        # each version lands as soon as its stream is written
        _write_manifest(plan.manifest_path, manifest)
        log.info("prepared %s in %.1f s: %d blocks (+%d replay), %d val + %d test blocks, %.3f%% tokens dropped "
                 "at pack edges", rec["name"], time.perf_counter() - t, rec["new_blocks"], rec["replay_blocks"],
                 rec["val_blocks"], rec["test_blocks"], 100 * rec["dropped_share"])
    return records[: len(sources)]


_PARTS = {"train": "new", "val": "val-parts", "test": "test-parts"}  # where each split's tokenized chunks go


def _version_root(t: dict, spec: PrepareSpec) -> str:
    return spec.rd.target(Path(spec.data_dir) / t["source"].name)[1]


def _train_chunks(t: dict) -> list[dict]:
    """A version's train chunks, each with its file's number (``file``: its documents' keys)."""
    return [{**c, "file": f} for f, r in enumerate(t["train"]) for c in r["chunks"]]


def _dedup_versions(todo: list[dict], spec: PrepareSpec, records: list[dict]) -> None:
    """Clear what an interrupted attempt left of the versions to prepare; with ``data.dedup``, decide
    each one's duplicates in version order against the ones before (``records``, then the
    earlier ones of ``todo``): ``t["dedup"]`` gets the counts, ``t["drop"]`` the drop files."""
    fs = spec.rd.target(spec.data_dir)[0]
    for t in todo:
        fs.delete_dir_contents(_version_root(t, spec), missing_dir_ok=True)
        t["drop"] = ()
    if spec.dedup.mode == "none":
        return
    dspec = dedup.DedupSpec(spec.text_column, spec.endpoint, spec.doc_limit, spec.rd, spec.dedup)
    versions = [(spec.rd.target(Path(spec.data_dir) / r["name"])[1], r.get("dedup", {})) for r in records]
    dedup.remove_old_snapshots(fs, versions)
    index_rows = sum(int(rec.get("index_rows", 0)) for _, rec in versions)
    for t in todo:
        dedup.check_keys(t["train"], [*t["val"], *t["test"]], t["source"].name)
        held_out = [{**c, "held_out": f} for f, r in enumerate((*t["val"], *t["test"])) for c in r["chunks"]]
        root = _version_root(t, spec)
        earlier, snapshot = dedup.earlier_index(fs, versions)
        t["dedup"] = dedup.dedup_version(t["source"].name, _train_chunks(t), held_out, earlier, index_rows,
                                         f"{root}/dedup", fs, dspec, spec.chunk_bytes, snapshot)
        versions.append((root, t["dedup"]))
        index_rows += t["dedup"]["index_rows"]
        t["drop"] = tuple(t["dedup"].pop("drop_files"))


def _tokenize_versions(todo: list[dict], spec: PrepareSpec, eos: int) -> list[dict[str, list[dict]]]:
    """Every version's chunks, all splits, tokenized in one pass: per version, chunk stats by split.
    A version's train documents named in its drop files (``t["drop"]``, :func:`_dedup_versions`)
    are skipped."""
    jobs, keys = [], []
    fs = spec.rd.target(spec.data_dir)[0]
    for k, t in enumerate(todo):
        root = _version_root(t, spec)
        for split, out in _PARTS.items():
            if t[split]:
                train = split == "train"
                chunks = _train_chunks(t) if train else [c for r in t[split] for c in r["chunks"]]
                jobs.append(TokenizeJob(chunks, t["index"], f"{root}/{out}", t["drop"] if train else ()))
                keys.append((k, split))
    out: list[dict[str, list[dict]]] = [{"test": []} for _ in todo]
    what = f"tokenizing {', '.join(t['source'].name for t in todo)}"
    for (k, split), stats in zip(keys, tokenize_chunks(jobs, fs, spec, eos, spec.doc_limit, what)):
        out[k][split] = stats
    return out


def _pool(rec: dict, spec: PrepareSpec, upgrade: bool = True) -> Pool:
    """A prepared version's new data as a :class:`Pool`. An old single-file ``new.parquet`` is one
    chunk; ``upgrade`` first rewrites it into ``new/`` with the ``row``/``src`` columns a stream
    pass reads (one Ray task: such runs were small enough for one process)."""
    import ray

    fs, new = spec.rd.target(rec["new_path"])
    if "new_chunk_rows" not in rec and not upgrade:
        return Pool(int(rec["index"]), (new,), (int(rec["new_blocks"]),))
    if "new_chunk_rows" not in rec:
        out = spec.rd.target(Path(rec["new_path"]).with_name("new"))[1]
        ray.get(ray.remote(_upgrade_new).remote(fs, new, _part(out, 0), int(rec["index"])))
        rec.update(new_path=str(Path(rec["new_path"]).with_name("new")), new_chunk_rows=[int(rec["new_blocks"])])
        new = out
    return Pool(int(rec["index"]), tuple(_part(new, c) for c in range(len(rec["new_chunk_rows"]))),
                tuple(int(n) for n in rec["new_chunk_rows"]))


def _upgrade_new(fs: pafs.FileSystem, old: str, out: str, src: int) -> None:
    tokens = pq.read_table(old, filesystem=fs, columns=["tokens"]).column("tokens").combine_chunks()
    write_table(pa.table({"row": np.arange(len(tokens), dtype=np.int64), "src": np.full(len(tokens), src, np.int16),
                          "tokens": tokens}), fs, out, row_group_size=STREAM_ROW_GROUP)


def _prepare_one(todo: dict, spec: PrepareSpec, records: list[dict], split_stats: dict[str, list[dict]]) -> dict:
    """Version ``todo``'s checks, held-out splits and stream, from its tokenized chunks' stats."""
    i, src = todo["index"], todo["source"]
    vdir = Path(spec.data_dir) / src.name
    fs, root = spec.rd.target(vdir)
    train = split_stats["train"]
    stats = _sum_stats(train)
    if stats["blocks"] < spec.min_blocks:
        raise DataError(f"version {src.name}: {stats['blocks']} blocks of {spec.seq_len + 1} tokens, fewer than "
                        f"two global batches ({spec.min_blocks}: a main-path step before the branch's fork, one "
                        "after); add data or lower train.global_batch_size")
    n_val, n_test = _held_out_splits(fs, root, split_stats, spec, src.name)
    if n_val == 0:
        raise DataError(f"version {src.name}: validation files hold less than one block of "
                        f"{spec.seq_len + 1} tokens: {list(src.val_files)}")
    if n_val < spec.val_blocks:
        log.warning("version %s: only %d val blocks (data.val_blocks=%d)", src.name, n_val, spec.val_blocks)
    for kind, rows in split_stats.items():
        if (s := _sum_stats(rows))["skipped_docs"]:
            log.warning("version %s %s: skipped documents %s", src.name, kind, s["skipped_docs"])
    if "dedup" in todo:
        dedup.record_drops(src.name, todo["dedup"], stats["duplicates"], spec.dedup)
    elif any(stats["duplicates"].values()):
        raise RuntimeError(f"version {src.name}: tokenizing skipped duplicates {stats['duplicates']}, none decided")

    own = Pool(i, tuple(_part(f"{root}/new", r["chunk"]) for r in train), tuple(r["blocks"] for r in train))
    older = [_pool(r, spec) for r in records[:i]]
    pool = sum(p.rows for p in older)
    wanted = int(round(spec.replay_ratio / (1.0 - spec.replay_ratio) * own.rows)) if pool else 0
    n_replay = min(wanted, pool)
    if n_replay < wanted:
        log.warning("version %s: data.replay_ratio %g asks for %d replay blocks, the older versions hold %d: "
                    "its stream replays %.1f%%", src.name, spec.replay_ratio, wanted, pool,
                    100 * n_replay / (own.rows + n_replay))
    replay = Replay.of(older, n_replay, salt(spec.seed, _REPLAY, i)) if n_replay else None
    buckets = _buckets(own.rows + n_replay, spec.seq_len + 1, spec.shard_bytes)
    stream_spec = StreamSpec(salt(spec.seed, _STREAM, i), buckets, (i,), replay)
    stream = write_stream([own, *(older if replay else [])], stream_spec, f"{root}/stream", fs,
                          f"shuffling {src.name}'s stream")
    return {
        "name": src.name,
        "index": i,
        "layout": LAYOUT,
        "train_files": [r["fingerprint"] for r in todo["train"]],
        "val_files": [r["fingerprint"] for r in todo["val"]],
        **({"test_files": [r["fingerprint"] for r in todo["test"]]} if todo["test"] else {}),
        "docs": stats["docs"],
        "skipped_docs": stats["skipped_docs"],
        **({"dedup": todo["dedup"]} if "dedup" in todo else {}),
        "skipped_files": todo["skipped_files"],
        "new_blocks": stats["blocks"],
        "new_tokens": stats["blocks"] * (spec.seq_len + 1),
        "dropped_tokens": stats["dropped_tokens"],
        "dropped_share": stats["dropped_tokens"] / max(stats["doc_tokens"], 1),
        "replay_blocks": n_replay,
        "replay_from": {str(v): int(c) for v, c in sorted(stream["from"].items()) if v != i},
        "stream_rows": stream["rows"],
        "stream_shards": stream["shards"],
        "val_blocks": n_val,
        "test_blocks": n_test,
        "test_from": "test" if todo["test"] else "val",
        "new_chunk_rows": list(own.chunk_rows),
        "new_path": str(vdir / "new"),
        "stream_path": str(vdir / "stream"),
        "val_path": str(vdir / "val"),
        **({"test_path": str(vdir / "test")} if n_test else {}),
    }


def union_stream(records: list[dict], upto: int, out_path: str | Path, seed: int, rd: RunDir = LOCAL) -> dict:
    """All new blocks of versions ``0..upto`` in one seeded order: what PTFS trains on.

    Written once (``stream.json`` beside the shards marks it complete) for the paradigm
    comparison; returns the stream's path and row count like a version record does.
    """
    out = Path(out_path)
    fs, root = rd.target(out)
    marker = f"{root}/stream.json"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        spec = PrepareSpec("", "", 0, "", 0, 0.0, seed, 1, 0, rd=rd)
        pools = [_pool(r, spec) for r in records[: upto + 1]]
        block = int(records[0]["new_tokens"] // max(records[0]["new_blocks"], 1))
        fs.delete_dir_contents(root, missing_dir_ok=True)
        stream = write_stream(pools, StreamSpec(salt(seed, _PTFS, upto), _buckets(sum(p.rows for p in pools), block),
                                                tuple(p.src for p in pools)), root, fs,
                              f"shuffling the union of {records[0]['name']}..{records[upto]['name']} (PTFS)")
        write_marker(fs, marker, {"stream_rows": stream["rows"]})
    with fs.open_input_stream(marker) as f:
        rows = json.loads(f.read())["stream_rows"]
    return {"stream_path": str(out), "stream_rows": int(rows)}


# ---------------------------------------------------------------- branch replay variants

def _write_blocks(path: Path, tokens: np.ndarray, src: np.ndarray | None = None,
                  idx: np.ndarray | None = None) -> None:
    """One local parquet file of blocks (a branch's re-mixed stream, test fixtures)."""
    cols: dict[str, Any] = {"idx": np.arange(len(tokens), dtype=np.int64) if idx is None else idx}
    if src is not None:
        cols["src"] = src.astype(np.int16)
    cols["tokens"] = _tokens_array(tokens)
    write_table(pa.table(cols), pafs.LocalFileSystem(), str(Path(path).resolve()), row_group_size=STREAM_ROW_GROUP)


def _read_rows(pools: list[Pool], positions: np.ndarray, fs: pafs.FileSystem) -> tuple[np.ndarray, np.ndarray]:
    """Blocks at ``positions`` of the concatenated pools, and each one's source; reads only
    the row groups that hold them, one at a time."""
    starts = np.cumsum([0] + [p.rows for p in pools])
    taken: list[tuple[np.ndarray, np.ndarray]] = []
    src = np.zeros(len(positions), np.int64)
    for v in np.unique(np.searchsorted(starts, positions, side="right") - 1):
        pool, at = pools[v], np.flatnonzero((positions >= starts[v]) & (positions < starts[v + 1]))
        chunk_starts = np.cumsum([0] + list(pool.chunk_rows))
        within = positions[at] - starts[v]
        chunk = np.searchsorted(chunk_starts, within, side="right") - 1
        for c in np.unique(chunk):
            taken.append((at[chunk == c], _take_rows(pool.files[c], within[chunk == c] - chunk_starts[c], fs)))
        src[at] = pool.src
    tokens = np.empty((len(positions), taken[0][1].shape[1]), np.int32)
    for at, blocks in taken:
        tokens[at] = blocks
    return tokens, src


def _take_rows(path: str, rows: np.ndarray, fs: pafs.FileSystem) -> np.ndarray:
    """Blocks at ``rows`` of one parquet file, in that order; one row group in memory at a time."""
    f = pq.ParquetFile(path, filesystem=fs)
    group_starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
    group = np.searchsorted(group_starts, rows, side="right") - 1
    out = np.empty((len(rows), f.schema_arrow.field("tokens").type.list_size), np.int32)
    for g in np.unique(group):
        at = np.flatnonzero(group == g)
        out[at] = _blocks(f.read_row_group(int(g), columns=["tokens"]).take(pa.array(rows[at] - group_starts[g])))
    return out


#: Stream parts :func:`replay_variant` rewrites at once: each holds a row group and, in a bucket,
#: its upload's buffers (~10 MB a part; 16 at once cost +165 MB), and mostly waits on the store.
REWRITES = 4


def _rewrite_rows(src_path: str, rows: np.ndarray, blocks: np.ndarray, new_src: np.ndarray,
                  sfs: pafs.FileSystem, fs: pafs.FileSystem, dst: str) -> None:
    """Copy a stream part with its ``rows`` replaced by ``blocks`` from ``new_src``; one row
    group in memory at a time, written complete-or-absent."""
    f = pq.ParquetFile(src_path, filesystem=sfs)
    start = 0
    with _landing(fs, dst) as target, pq.ParquetWriter(target, f.schema_arrow, filesystem=fs) as out:
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=["idx", "src", "tokens"])
            at = np.flatnonzero((rows >= start) & (rows < start + table.num_rows))
            if len(at):
                tokens, src = _blocks(table), table.column("src").to_numpy().astype(np.int16)
                tokens[rows[at] - start], src[rows[at] - start] = blocks[at], new_src[at]
                table = pa.table({"idx": table["idx"], "src": src, "tokens": _tokens_array(tokens)},
                                 schema=f.schema_arrow)
            out.write_table(table, row_group_size=STREAM_ROW_GROUP)
            start += table.num_rows


def _swaps(version: dict, ratio: float, wanted: int, slots: int, candidates: int) -> int:
    """How many rows :func:`replay_variant` swaps: ``wanted``, unless fewer rows or blocks exist."""
    n = int(min(wanted, slots, candidates))
    if n < wanted:
        log.warning("version %s: replay ratio %g: %d rows to swap, but only %d unused blocks (no block trains "
                    "twice in a branch); the branch stream stops short of the ratio", version["name"], ratio, wanted, n)
    return n


#: Written last into a branch's re-mixed stream directory: the mix, and that every part is there.
VARIANT_MARKER = "_variant.json"


def replay_variant(version: dict, older: list[dict], consumed: list, limit: int, ratio: float,
                   seed: int, out_path: str | Path, rd: RunDir = LOCAL) -> dict:
    """``version``'s stream with the rows still to train re-mixed to ``ratio`` replay.

    What a branch with its own replay ratio trains (a sweep can search the ratio). The
    branch keeps its length and row ids -- the rows ``idx < limit`` not ``consumed`` at
    its fork -- so the fork checkpoint's data position applies unchanged. Rows of the
    version's own data are swapped for seeded samples of ``older`` versions' blocks that
    the stream does not hold, until ``ratio`` of those rows are replay; below the stream's
    own ratio, replay rows are swapped for the version's own blocks the main path trained
    before the fork. No block is trained twice in a branch: when too few such blocks exist,
    the ratio stops short of ``ratio`` (logged; the returned mix says what it reached).

    ``out_path`` is a directory of parts, one per part of the stream (same rows, same
    order), with :data:`VARIANT_MARKER` written last; written once (trials sharing a fork
    and ratio write the same bytes), straight into the bucket of a remote run directory.
    Returns the path and the mix. Memory grows with the stream's rows, not its tokens:
    its ``idx``/``src`` columns (10 bytes a row), the swapped rows' blocks, and a row group of
    each of :data:`REWRITES` parts rewritten at once; parts without a swapped row are copied as
    they are, several at a time.
    """
    out = Path(out_path)
    fs, root = rd.target(out)
    marker = f"{root}/{VARIANT_MARKER}"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        if ratio > 0 and not older:
            raise DataError(f"replay ratio {ratio}: version {version['name']} has no older version to replay")
        write_marker(fs, marker, _write_variant(version, older, consumed, limit, ratio, seed, rd, fs, root))
    with fs.open_input_stream(marker) as f:
        return {"stream_path": str(out), **json.loads(f.read())}


def _write_variant(version: dict, older: list[dict], consumed: list, limit: int, ratio: float, seed: int,
                   rd: RunDir, fs: pafs.FileSystem, root: str) -> dict:
    k = int(version["index"])
    sfs, stream = rd.target(version["stream_path"])
    parts = _parquet_files(sfs, stream)
    # A part at a time, several at once: in a bucket each read, copy or rewrite is a request
    # that mostly waits (a 40 GB stream is ~320 parts), and pyarrow releases the GIL.
    cols = in_threads(lambda f: pq.read_table(f, filesystem=sfs, columns=["idx", "src"]), parts, STREAMS)
    stream_pool = Pool(k, tuple(parts), tuple(t.num_rows for t in cols))
    starts = np.cumsum([0, *stream_pool.chunk_rows])
    idx = np.concatenate([t.column("idx").to_numpy() for t in cols]).astype(np.int64)
    src = np.concatenate([t.column("src").to_numpy() for t in cols]).astype(np.int64)
    del cols
    order = np.argsort(idx, kind="stable")  # positions below count rows in idx (training) order
    idx, src = idx[order], src[order]
    in_branch = (idx < limit) & ~Consumed.from_list(consumed).mask(idx)
    todo = np.flatnonzero(in_branch)
    is_replay = src[todo] != k
    want, have = int(round(ratio * len(todo))), int(is_replay.sum())
    rng = np.random.default_rng([seed, k, int(round(ratio * 1e6)), len(todo)])
    swap = np.zeros(0, np.int64)
    if want > have:  # more replay: older blocks the stream never drew
        pools = [_pool(r, PrepareSpec("", "", 0, "", 0, 0.0, seed, 1, 0, rd=rd), upgrade=False) for r in older]
        drawn, total = int(version.get("replay_blocks", 0)), sum(p.rows for p in pools)
        n = _swaps(version, ratio, want - have, (~is_replay).sum(), total - drawn)
        swap = np.sort(rng.choice(todo[~is_replay], size=n, replace=False))
        ranks = drawn + rng.choice(total - drawn, size=n, replace=False)
        pick = np.sort(Replay.of(pools, drawn, salt(seed, _REPLAY, k)).perm(ranks)) if drawn else np.sort(ranks)
        blocks, new_src = _read_rows(pools, pick, sfs) if n else (None, None)
    elif want < have:  # less replay: own blocks trained before the fork (or past the branch)
        spare = np.flatnonzero((src == k) & ~in_branch)
        n = _swaps(version, ratio, have - want, is_replay.sum(), len(spare))
        swap = np.sort(rng.choice(todo[is_replay], size=n, replace=False))
        pick = rng.choice(spare, size=n, replace=False)
        blocks, new_src = _read_rows([stream_pool], order[pick], sfs) if n else (None, None)
    if len(swap):
        src[swap] = new_src
    at = order[swap]  # the swapped rows' places in the stream's parts

    swapped = [np.flatnonzero((at >= starts[i]) & (at < starts[i + 1])) for i in range(len(parts))]
    # Parts without a swapped row (before the fork, most of them) are copied as they are, several
    # at a time (in a bucket, server-side: nothing passes through here); the others are
    # rewritten a few at a time, each holding a row group and, in a bucket, its upload's buffers.
    in_threads(lambda i: copy_file(fs, parts[i], _part(root, i)),
               [i for i, here in enumerate(swapped) if not len(here)], STREAMS)
    in_threads(lambda i: _rewrite_rows(parts[i], at[swapped[i]] - starts[i], blocks[swapped[i]],
                                       new_src[swapped[i]], sfs, fs, _part(root, i)),
               [i for i, here in enumerate(swapped) if len(here)], REWRITES)
    replay = int((src[todo] != k).sum())
    return {"rows": len(todo), "replay_rows": replay, "replay_ratio": replay / max(len(todo), 1)}
