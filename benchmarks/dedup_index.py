"""What a version's dedup decide pass opens of the earlier versions' indexes, as a lineage grows;
and what its tokenize tasks read of the dropped keys.

Each version's decide pass (``raypath.dedup.decide_range``, one Ray task per range of hash
buckets) reads its buckets' rows of every earlier version's ``dedup/index/`` parts. This builds
``--versions`` versions of ``--docs`` documents' exact hashes each (``--repeat`` of them copies
of earlier versions' documents), and decides each version in turn, range by range, in this
process (a task's reads are the same in a Ray worker), with ``raypath.dedup.RANGE_ROWS`` set to
``--range-rows`` so that versions span many ranges as they do at scale (4M rows a range: a
version of 100M documents has 25). Every file open goes through a counting filesystem. Reports
per version: its ranges, the earlier index parts, the files the decide pass opened, its seconds;
and the dropped documents (each version must drop exactly its planted copies). Prints one line a
version on stderr, the results as JSON on stdout.

With ``--groups G`` a version's documents lie in G train chunk groups (tokenize tasks), hashed
into ``--hash-files`` files (hash tasks, each a run of groups; default one a group), and
after each decide pass come the reads of the tokenize side: each group reads the dropped keys
of its own key range (``raypath.dedup.dropped_keys``), from the drop files after they were
collected by key range (``raypath.dedup.collect_drops``, where the checkout has it): files
opened and bytes read, each side, and the keys found (each version's planted copies).

    python benchmarks/dedup_index.py --versions 20
    python benchmarks/dedup_index.py --versions 2 --docs 2000000 --groups 400
    PYTHONPATH=/path/to/checkout python benchmarks/dedup_index.py --versions 20   # another raypath
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs


class _Counted:
    """A file read through Python, adding the bytes it returns to its handler's count."""

    def __init__(self, f, handler):
        self.f, self.handler, self.closed = f, handler, False

    def read(self, n=-1):
        data = self.f.read(n)
        self.handler.read += len(data)
        return data

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def size(self):
        return self.f.size()

    def close(self):
        self.closed = True
        self.f.close()


class CountingHandler(pafs.FileSystemHandler):
    """The local filesystem, counting the files opened for reading and the bytes read of them."""

    def __init__(self):
        self.fs, self.opened, self.read = pafs.LocalFileSystem(), 0, 0

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def open_input_file(self, path):
        self.opened += 1
        return pa.PythonFile(_Counted(self.fs.open_input_file(path), self), mode="r")

    def open_input_stream(self, path):
        self.opened += 1
        return self.fs.open_input_stream(path)

    # The rest of FileSystemHandler's methods: the local filesystem's.
    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def _digests(rng: np.random.Generator, n: int, earlier: np.ndarray, repeat: float) -> tuple[np.ndarray, int]:
    """``n`` 16-byte hashes as (n, 2) uint64, ``repeat`` of them drawn from ``earlier``'s rows."""
    h = rng.integers(0, 1 << 63, (n, 2), dtype=np.uint64) << np.uint64(1)
    copies = int(repeat * n) if len(earlier) else 0
    if copies:
        h[:copies] = earlier[rng.choice(len(earlier), copies, replace=False)]
    return h, copies


def _keys(n: int, groups: int) -> list[int]:
    """Document i's key: in train file (and chunk group) i % groups, at position i // groups."""
    i = np.arange(n, dtype=np.int64)
    return ((i % groups) << np.int64(40) | i // groups).tolist()


def decide_version(k: int, h: np.ndarray, earlier_rows: int, root: Path, fs: pafs.FileSystem,
                   counter: CountingHandler, groups: int = 1, hash_files: int | None = None) -> dict:
    from raypath import dedup
    from raypath.data import write_table

    out = root / f"v{k}" / "dedup"
    hash_files = hash_files or groups
    # A hash file per run of chunk groups, as the hash tasks write them (through the checkout's writer).
    keys, hashes = np.asarray(_keys(len(h), groups)), []
    for g in range(hash_files):
        hashes.append(str(out / "hashes" / f"part-{g:06d}.parquet"))
        rows = np.flatnonzero(np.arange(len(h)) % groups * hash_files // groups == g)
        if hasattr(dedup, "write_hashes"):
            dedup.write_hashes(h[rows].astype("<u8").tobytes(), keys[rows].tolist(), fs, hashes[-1])
        else:
            write_table(dedup._hash_rows(h[rows].astype("<u8").tobytes(), keys[rows].tolist()), fs, hashes[-1],
                        row_group_size=dedup.ROW_GROUP)
    earlier = [f for j in range(1, k) for f in dedup.index_files(fs, str(root / f"v{j}"))]
    # The ranges dedup_version cuts: the rows it decides over, RANGE_ROWS a range.
    n = min(1 << (64 - dedup.BUCKET_SHIFT), max(1, math.ceil((earlier_rows + len(h)) / dedup.RANGE_ROWS)))
    edges = [round(i * (1 << (64 - dedup.BUCKET_SHIFT)) / n) for i in range(n + 1)]
    opened, read, t0, counts = counter.opened, counter.read, time.perf_counter(), {"dropped": 0, "index_rows": 0}
    for r in range(n):
        item = pa.Table.from_pylist([{"range": r, "lo": edges[r], "hi": edges[r + 1]}])
        row = dedup.decide_range(item, hashes, earlier, str(out), fs).to_pylist()[0]
        counts["dropped"] += row["earlier"] + row["within"] + row["held_out"]
        counts["index_rows"] += row["index_rows"]
    row = {"version": k, "ranges": n, "hash_files": hash_files, "earlier_index_parts": len(earlier),
           "opened": counter.opened - opened,
           "read_mb": round((counter.read - read) / 1e6, 2), "seconds": round(time.perf_counter() - t0, 2), **counts}
    return {**row, **_tokenize_reads(out, groups, counts["dropped"], fs, counter)} if groups > 1 else row


def _tokenize_reads(out: Path, groups: int, dropped: int, fs: pafs.FileSystem, counter: CountingHandler) -> dict:
    """What the tokenize side reads of a decided version's dropped keys, each of ``groups`` chunk
    groups its own key range; with the checkout's collect pass first, where it has one."""
    from raypath import dedup

    start, t0 = (counter.opened, counter.read), time.perf_counter()
    if hasattr(dedup, "collect_drops"):
        train = [{"path": f"f{g}", "fmt": "jsonl", "start": 0, "stop": -1, "bytes": 1, "file": g}
                 for g in range(groups)]
        ranges = sorted(str(p) for p in (out / "ranges").glob("*.parquet"))
        runs = [pa.Table.from_pylist([r]) for r in dedup.collect_runs(train, 1, dropped)]
        drops = [f for r in runs if (f := dedup.collect_drops(r, ranges, str(out), fs).to_pylist()[0]["file"])]
    else:
        drops = sorted(str(p) for p in (out / "drop").glob("*.parquet"))
    collected, t1 = (counter.opened, counter.read), time.perf_counter()
    found = sum(len(dedup.dropped_keys(fs, drops, g << 40, (g + 1) << 40)) for g in range(groups))
    if found != dropped:
        raise SystemExit(f"{out}: the tokenize side found {found} dropped keys, the decide pass {dropped}")
    return {"drop_files": len(drops), "collect_opened": collected[0] - start[0],
            "collect_read_mb": round((collected[1] - start[1]) / 1e6, 2), "collect_s": round(t1 - t0, 2),
            "tokenize_opened": counter.opened - collected[0],
            "tokenize_read_mb": round((counter.read - collected[1]) / 1e6, 2),
            "tokenize_s": round(time.perf_counter() - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--docs", type=int, default=200_000, help="documents a version")
    ap.add_argument("--repeat", type=float, default=0.1, help="share of a version copying earlier documents")
    ap.add_argument("--range-rows", type=int, default=100_000, help="raypath.dedup.RANGE_ROWS")
    ap.add_argument("--groups", type=int, default=1,
                    help="train chunk groups a version (tokenize tasks); > 1: measure what they read of the drops")
    ap.add_argument("--hash-files", type=int, default=None,
                    help="hash files a version (hash tasks, each a run of chunk groups; default: one a group)")
    ap.add_argument("--out", default=None, help="where to write results.json (default: print only)")
    args = ap.parse_args()

    import raypath
    from raypath import dedup

    dedup.RANGE_ROWS = args.range_rows
    counter = CountingHandler()
    fs, rng, rows = pafs.PyFileSystem(counter), np.random.default_rng(0), []
    every = np.zeros((0, 2), np.uint64)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, args.versions + 1):
            h, copies = _digests(rng, args.docs, every, args.repeat)
            row = decide_version(k, h, len(every), Path(tmp), fs, counter, args.groups, args.hash_files)
            if row["dropped"] != copies:
                raise SystemExit(f"v{k}: dropped {row['dropped']} documents, {copies} planted")
            every = np.concatenate([every, h[copies:]])
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(f"files opened by the decide passes of {args.versions} versions: {sum(r['opened'] for r in rows)}; the "
          f"last version's: {rows[-1]['opened']} in {rows[-1]['seconds']} s", file=sys.stderr)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
               "raypath": str(Path(raypath.__file__).parent), "args": vars(args), "versions": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
