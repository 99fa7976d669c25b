"""Versioned corpora -> token streams the trainers consume exactly once.

For each version ``k`` raypath prepares, once, under ``RUN_DIR/data/``:

* ``vK/new.parquet``: the version's own text, tokenized and packed into blocks of
  ``seq_len + 1`` tokens (EOS between documents). Tokenization runs on Ray Data
  with an actor pool, each actor loading the fast tokenizer once.
* ``vK/stream.parquet``: the order the main path trains version k in: a seeded
  permutation of the new blocks mixed with a ``replay_ratio`` share of blocks
  sampled (seeded) from older versions. Column ``idx`` is the row's position.
* ``vK/val.parquet``: the first ``val_blocks`` blocks of the version's val split,
  a fixed evaluation budget so old- and new-domain losses are comparable.
* ``manifest.json``: per version its files with sha256, counts and paths.
  Re-running checks earlier versions' files did not change.

Exact resume: trainers read a stream through ``streaming_split``, which hands
blocks to ranks dynamically, so the rows consumed after ``n`` steps are not a
prefix of the stream. Each checkpoint therefore records the *set* of consumed
``idx`` values as intervals (:class:`Consumed`), and a restart filters them out
before splitting. The union of rows trained is then exactly the stream, with no
duplicates, whatever the number of workers before and after.
"""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypath.storage import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
STREAM_ROW_GROUP = 256


class DataError(ValueError):
    """Bad corpus input; the message names the file or version."""


# ---------------------------------------------------------------- discovery

@dataclass(frozen=True)
class VersionSource:
    """Where one version's text lives."""

    name: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def _files(d: Path) -> tuple[str, ...]:
    if not d.is_dir():
        return ()
    return tuple(str(p) for p in sorted(d.iterdir()) if p.name.endswith(SUFFIXES))


def discover_versions(corpus_dir: str | Path, names: list[str] | None = None) -> list[VersionSource]:
    """One :class:`VersionSource` per version sub-directory (``train/`` + ``val/``)."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise DataError(f"data.corpus: {root} is not a directory")
    available = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    chosen = names or available
    out = []
    for name in chosen:
        if name not in available:
            raise DataError(f"data.versions: {name!r} has no {root / name / 'train'} directory "
                            f"(found: {', '.join(available) or 'none'})")
        src = VersionSource(name, _files(root / name / "train"), _files(root / name / "val"))
        if not src.train_files:
            raise DataError(f"{root / name / 'train'}: no {'/'.join(SUFFIXES)} files")
        if not src.val_files:
            raise DataError(f"{root / name / 'val'}: no {'/'.join(SUFFIXES)} files (validation split required)")
        out.append(src)
    if not out:
        raise DataError(f"data.corpus: {root} has no version sub-directories with a train/ folder")
    return out


# ---------------------------------------------------------------- validation

POLICIES = ("error", "skip")


def _check_jsonl(path: str, text_column: str, max_doc_chars: int) -> tuple[str | None, int]:
    """First problem of a jsonl(.gz) file as text (None if fine), and its document count."""
    opener = gzip.open if path.endswith(".gz") else open
    docs = 0
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})", docs
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}: not valid JSON ({e.msg})", docs
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                return f"line {lineno}: no {text_column!r} string field", docs
            if max_doc_chars and len(row[text_column]) > max_doc_chars:
                return (f"line {lineno}: document of {len(row[text_column])} characters exceeds "
                        f"data.max_doc_chars={max_doc_chars}"), docs
            docs += 1
    return (None, docs) if docs else ("empty: no documents", 0)


def _check_parquet(path: str, text_column: str, max_doc_chars: int) -> tuple[str | None, int]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        return f"not a readable parquet file ({e})", 0
    if text_column not in pf.schema_arrow.names:
        return f"no {text_column!r} column (columns: {', '.join(pf.schema_arrow.names)})", 0
    if not pa.types.is_string(pf.schema_arrow.field(text_column).type) and \
            not pa.types.is_large_string(pf.schema_arrow.field(text_column).type):
        return f"column {text_column!r} is {pf.schema_arrow.field(text_column).type}, expected string", 0
    if pf.metadata.num_rows == 0:
        return "empty: no rows", 0
    if max_doc_chars:
        offset = 0
        for i in range(pf.num_row_groups):
            lengths = pc.utf8_length(pf.read_row_group(i, columns=[text_column]).column(0)).to_numpy(
                zero_copy_only=False)
            over = np.nonzero(lengths > max_doc_chars)[0]
            if len(over):
                return (f"row {offset + over[0]}: document of {int(lengths[over[0]])} characters exceeds "
                        f"data.max_doc_chars={max_doc_chars}"), pf.metadata.num_rows
            offset += len(lengths)
    return None, pf.metadata.num_rows


def validate_files(files: tuple[str, ...], text_column: str, policy: str = "error",
                   max_doc_chars: int = 0) -> tuple[tuple[str, ...], list[dict]]:
    """Check every file before Ray Data touches it; a bad one raises or is skipped.

    Catches what would otherwise surface as an opaque worker traceback (or a
    silent drop): missing/empty files, unreadable parquet, a missing text
    column, non-UTF-8 bytes, malformed JSON lines. Over-long documents are
    errors under ``policy="error"``; under ``"skip"`` they are dropped and
    counted one by one during tokenization, so they are not a file-level skip.
    """
    if policy not in POLICIES:
        raise DataError(f"data.on_bad_input: {policy!r} is not one of {', '.join(POLICIES)}")
    keep, skipped = [], []
    limit = max_doc_chars if policy == "error" else 0
    for f in files:
        if not Path(f).is_file():
            problem = "file not found"
        elif Path(f).stat().st_size == 0:
            problem = "empty file (0 bytes)"
        else:
            check = _check_parquet if f.endswith(".parquet") else _check_jsonl
            problem, _ = check(f, text_column, limit)
        if problem is None:
            keep.append(f)
        elif policy == "error":
            raise DataError(f"{f}: {problem} (set data.on_bad_input: skip to skip bad files)")
        else:
            log.warning("skipping %s: %s", f, problem)
            skipped.append({"path": f, "reason": problem})
    return tuple(keep), skipped


# ---------------------------------------------------------------- tokenize + pack (Ray Data)

class Tokenize:
    """Ray Data callable class: a batch of documents -> their token ids.

    Loaded once per actor: building a fast tokenizer per batch costs more than
    tokenizing the batch. Packing happens downstream in :func:`pack`, so blocks
    cross batch boundaries and nothing but the version's very last tail is dropped.
    """

    def __init__(self, tokenizer_dir: str, text_column: str, max_doc_chars: int = 0):
        from raypath.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.column = text_column
        self.max_doc_chars = max_doc_chars

    def _status(self, text) -> str:
        if not isinstance(text, str) or not text:
            return "empty"
        if self.max_doc_chars and len(text) > self.max_doc_chars:
            return "too_long"
        return "ok"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        texts = batch[self.column].tolist()
        status = [self._status(t) for t in texts]
        kept = [t for t, st in zip(texts, status) if st == "ok"]
        ids = iter(self.tok(kept, add_special_tokens=False)["input_ids"] if kept else [])
        docs = [next(ids) if st == "ok" else [] for st in status]
        # An explicit Arrow table: numpy object arrays make Ray Data infer arrow
        # for some batches and pandas for others, which it then rejects.
        # One status per input row: skipped documents are counted, never silently lost.
        return pa.table({"ids": pa.array(docs, type=pa.list_(pa.int32())), "status": pa.array(status)})


def _read_text(files: tuple[str, ...], text_column: str):
    import ray.data

    parquet = [f for f in files if f.endswith(".parquet")]
    jsonl = [f for f in files if not f.endswith(".parquet")]
    parts = []
    if parquet:
        # select_columns is pushed down into the read (Ray's projection pushdown)
        parts.append(ray.data.read_parquet(parquet).select_columns([text_column]))
    if jsonl:
        # PyArrow's reader (the default) takes newline-delimited JSON and yields Arrow
        # blocks like read_parquet; lines=True would yield pandas blocks, and a
        # union of both kinds breaks the map stage.
        parts.append(ray.data.read_json(jsonl).select_columns([text_column]))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


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


def tokenize_files(files: tuple[str, ...], tokenizer_dir: str, seq_len: int, text_column: str,
                   actors: int, eos: int, max_doc_chars: int = 0) -> tuple[np.ndarray, dict]:
    """Tokenize files on Ray Data, pack in file order; blocks are ``[n, seq_len + 1]``.

    ``stats["skipped_docs"]`` counts documents dropped by reason (empty, too_long).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same files -> same blocks, every run
    ds = _read_text(files, text_column).map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(tokenizer_dir=tokenizer_dir, text_column=text_column,
                                   max_doc_chars=max_doc_chars),
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    skipped: Counter = Counter()

    def docs():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            skipped.update(st for st in batch["status"].tolist() if st != "ok")
            yield from batch["ids"]

    blocks, stats = pack(docs(), seq_len + 1, eos)
    return blocks, {**stats, "skipped_docs": dict(skipped)}


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
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(stream_path, filesystem=filesystem).select_columns(["idx", "tokens"])
    if limit is not None:
        ds = ds.filter(expr=f"idx < {int(limit)}")
    if consumed:
        ds = ds.map_batches(_drop_consumed, fn_kwargs={"intervals": consumed}, batch_format="numpy")
    return ds


# ---------------------------------------------------------------- per-version preparation

def _write_blocks(path: Path, tokens: np.ndarray, src: np.ndarray | None = None,
                  idx: np.ndarray | None = None) -> None:
    block = tokens.shape[1]
    cols: dict[str, Any] = {"idx": np.arange(len(tokens), dtype=np.int64) if idx is None else idx}
    if src is not None:
        cols["src"] = src.astype(np.int16)
    cols["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel(), pa.int32()), block)
    # A unique temp name: concurrent sweep trials may write the same file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(pa.table(cols), tmp, row_group_size=STREAM_ROW_GROUP)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_blocks(path: str | Path) -> np.ndarray:
    """All blocks of a parquet file written by :func:`_write_blocks`, as ``[n, block]`` int32."""
    return _blocks(pq.read_table(path, columns=["tokens"]))


def _blocks(table: pa.Table) -> np.ndarray:
    col = table.column("tokens").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1).astype(np.int32)


def _file_records(files: tuple[str, ...]) -> list[dict]:
    return [{"path": f, "bytes": Path(f).stat().st_size, "sha256": sha256_file(f)} for f in files]


def _replay_sample(older: list[np.ndarray], n_new: int, ratio: float, rng: np.random.Generator):
    """``ratio`` of the final stream drawn uniformly from older versions' blocks."""
    pool = sum(len(o) for o in older)
    n = min(int(round(ratio / (1.0 - ratio) * n_new)), pool) if pool else 0
    return _sample_blocks(older, n, rng)


def _sample_blocks(pools: list[np.ndarray], n: int, rng: np.random.Generator):
    """``n`` distinct blocks drawn uniformly from the union of ``pools``, and each one's pool."""
    if n == 0:
        return np.zeros((0, 0), np.int32), np.zeros(0, np.int64)
    offsets = np.cumsum([0] + [len(o) for o in pools])
    pick = np.sort(rng.choice(offsets[-1], size=n, replace=False))
    ver = np.searchsorted(offsets, pick, side="right") - 1
    rows = np.stack([pools[v][p - offsets[v]] for v, p in zip(ver, pick)])
    return rows, ver


def replay_variant(version: dict, older_new_paths: list[str], consumed: list, limit: int, ratio: float,
                   seed: int, out_path: str | Path) -> dict:
    """``version``'s stream with the rows still to train re-mixed to ``ratio`` replay.

    What a branch with its own replay ratio trains (a sweep can search the ratio). The
    branch keeps its length and row ids -- the rows ``idx < limit`` not ``consumed`` at
    its fork -- so the fork checkpoint's data position applies unchanged. Rows of the
    version's own data are swapped for seeded samples of older versions' blocks until
    ``ratio`` of those rows are replay; below the stream's own ratio, replay rows are
    swapped for the version's own blocks instead (possibly rows the main path trained
    before the fork). Written once (atomically); returns the path and the mix.
    """
    out = Path(out_path)
    k = int(version["index"])
    if not out.exists():
        if ratio > 0 and not older_new_paths:
            raise DataError(f"replay ratio {ratio}: version {version['name']} has no older version to replay")
        table = pq.read_table(version["stream_path"])
        idx, src = table.column("idx").to_numpy(), table.column("src").to_numpy().astype(np.int64)
        tokens = _blocks(table)
        todo = np.flatnonzero((idx < limit) & ~Consumed.from_list(consumed).mask(idx))
        is_replay = src[todo] != k
        want, have = int(round(ratio * len(todo))), int(is_replay.sum())
        rng = np.random.default_rng([seed, k, int(round(ratio * 1e6)), len(todo)])
        if want > have:  # own rows -> older versions' blocks
            swap = np.sort(rng.choice(todo[~is_replay], size=want - have, replace=False))
            rows, ver = _sample_blocks([read_blocks(p) for p in older_new_paths], len(swap), rng)
        else:  # replay rows -> the version's own blocks
            swap = np.sort(rng.choice(todo[is_replay], size=have - want, replace=False))
            rows, ver = _sample_blocks([read_blocks(version["new_path"])], len(swap), rng)
            ver = np.full(len(swap), k, np.int64)
        if len(swap):
            tokens[swap], src[swap] = rows, ver
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_blocks(out, tokens, src, idx)
    table = pq.read_table(out, columns=["idx", "src"])
    idx, src = table.column("idx").to_numpy(), table.column("src").to_numpy()
    todo = (idx < limit) & ~Consumed.from_list(consumed).mask(idx)
    replay = int((src[todo] != k).sum())
    return {"stream_path": str(out), "rows": int(todo.sum()), "replay_rows": replay,
            "replay_ratio": replay / max(int(todo.sum()), 1)}


@dataclass
class PrepareSpec:
    """What :func:`prepare_versions` needs from the run config."""

    data_dir: str
    tokenizer_dir: str
    seq_len: int
    text_column: str
    val_blocks: int
    replay_ratio: float
    seed: int
    actors: int
    min_blocks: int  # a version must fill at least one global batch
    on_bad_input: str = "error"  # "error" or "skip" (counted and logged)
    max_doc_chars: int = 0  # 0 = no limit


def _check_unchanged(rec: dict, src: VersionSource) -> None:
    for kind, files in (("train_files", src.train_files), ("val_files", src.val_files)):
        recorded = {r["path"]: r for r in rec[kind]}
        if set(recorded) != set(files):
            added = sorted(set(files) - set(recorded))
            gone = sorted(set(recorded) - set(files))
            raise DataError(f"version {src.name}: its {kind.split('_')[0]} files changed after it was "
                            f"trained (added: {added or 'none'}; missing: {gone or 'none'})")
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"{f}: file of version {src.name} is missing (it was trained on; restore it)")
            if sha256_file(f) != recorded[f]["sha256"]:
                raise DataError(f"{f}: content changed after version {src.name} was trained "
                                f"(sha256 differs from the manifest); add new data as a new version")


def prepare_versions(sources: list[VersionSource], spec: PrepareSpec) -> list[dict]:
    """Prepare every version not yet in the manifest; return all version records."""
    from raypath.tokenizer import load_tokenizer

    data_dir = Path(spec.data_dir)
    manifest_path = data_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"versions": []}
    for key in ("seq_len", "tokenizer_dir"):
        if manifest.get(key) not in (None, getattr(spec, key)):
            raise DataError(f"{manifest_path}: prepared with {key}={manifest[key]!r}, config asks "
                            f"{getattr(spec, key)!r}; use a new run_dir")
    manifest.update(seq_len=spec.seq_len, tokenizer_dir=spec.tokenizer_dir)
    records: list[dict] = manifest["versions"]
    for i, rec in enumerate(records[: len(sources)]):
        if sources[i].name != rec["name"]:
            raise DataError(f"{manifest_path}: version {i + 1} was {rec['name']!r}; versions can only be "
                            f"appended (config gives {[s.name for s in sources]})")
        _check_unchanged(rec, sources[i])
    eos = load_tokenizer(spec.tokenizer_dir).eos_token_id
    older = [read_blocks(r["new_path"]) for r in records]
    for i in range(len(records), len(sources)):
        rec = _prepare_one(i, sources[i], spec, older, eos)
        older.append(read_blocks(rec["new_path"]))
        records.append(rec)
        write_json(manifest_path, manifest)  # each version lands as soon as it is ready
        log.info("prepared %s: %d blocks (+%d replay), %d val blocks", rec["name"],
                 rec["new_blocks"], rec["replay_blocks"], rec["val_blocks"])
    return records[: len(sources)]


def _tokenize_split(src: VersionSource, split: str, spec: PrepareSpec, eos: int) -> tuple[np.ndarray, dict]:
    files = src.train_files if split == "train" else src.val_files
    keep, skipped_files = validate_files(files, spec.text_column, spec.on_bad_input, spec.max_doc_chars)
    if not keep:
        raise DataError(f"version {src.name}: no usable {split} files left "
                        f"({len(skipped_files)} skipped: {[s['reason'] for s in skipped_files]})")
    limit = spec.max_doc_chars if spec.on_bad_input == "skip" else 0
    blocks, stats = tokenize_files(keep, spec.tokenizer_dir, spec.seq_len, spec.text_column, spec.actors, eos, limit)
    if stats["skipped_docs"]:
        log.warning("version %s %s: skipped documents %s", src.name, split, stats["skipped_docs"])
    return blocks, {**stats, "skipped_files": skipped_files}


def _prepare_one(i: int, src: VersionSource, spec: PrepareSpec, older: list[np.ndarray], eos: int) -> dict:
    vdir = Path(spec.data_dir) / src.name
    vdir.mkdir(parents=True, exist_ok=True)
    new, stats = _tokenize_split(src, "train", spec, eos)
    if len(new) < spec.min_blocks:
        raise DataError(f"version {src.name}: {len(new)} blocks of {spec.seq_len + 1} tokens, fewer than one "
                        f"global batch ({spec.min_blocks}); add data or lower train.global_batch_size")
    val, vstats = _tokenize_split(src, "val", spec, eos)
    if len(val) == 0:
        raise DataError(f"version {src.name}: validation files hold less than one block of "
                        f"{spec.seq_len + 1} tokens: {list(src.val_files)}")
    if len(val) < spec.val_blocks:
        log.warning("version %s: only %d val blocks (data.val_blocks=%d)", src.name, len(val), spec.val_blocks)
    val = val[: spec.val_blocks]

    rng = np.random.default_rng([spec.seed, i])
    replay, replay_src = _replay_sample(older, len(new), spec.replay_ratio, rng)
    tokens = np.concatenate([new, replay]) if len(replay) else new
    src_col = np.concatenate([np.full(len(new), i, np.int64), replay_src])
    order = rng.permutation(len(tokens))
    paths = {k: vdir / f"{k}.parquet" for k in ("new", "stream", "val")}
    _write_blocks(paths["new"], new)
    _write_blocks(paths["stream"], tokens[order], src_col[order])
    _write_blocks(paths["val"], val)
    return {
        "name": src.name,
        "index": i,
        "train_files": _file_records(src.train_files),
        "val_files": _file_records(src.val_files),
        "docs": stats["docs"],
        "skipped_docs": stats["skipped_docs"],
        "skipped_files": stats["skipped_files"] + vstats["skipped_files"],
        "new_blocks": len(new),
        "new_tokens": int(new.size),
        "dropped_tokens": stats["dropped_tokens"],
        "replay_blocks": len(replay),
        "replay_from": {str(v): int(c) for v, c in zip(*np.unique(replay_src, return_counts=True))},
        "stream_rows": len(tokens),
        "val_blocks": len(val),
        "new_path": str(paths["new"]),
        "stream_path": str(paths["stream"]),
        "val_path": str(paths["val"]),
    }


def union_stream(records: list[dict], upto: int, out_path: str | Path, seed: int) -> dict:
    """All new blocks of versions ``0..upto`` in one seeded order: what PTFS trains on.

    Written once (idempotent) for the paradigm comparison; returns the stream's
    path and row count like a version record does.
    """
    out = Path(out_path)
    if not out.exists():
        blocks = [read_blocks(r["new_path"]) for r in records[: upto + 1]]
        src = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(blocks)])
        tokens = np.concatenate(blocks)
        order = np.random.default_rng([seed, 1_000 + upto]).permutation(len(tokens))
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_blocks(out, tokens[order], src[order])
    rows = pq.ParquetFile(out).metadata.num_rows
    return {"stream_path": str(out), "stream_rows": rows}
