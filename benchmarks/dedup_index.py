"""What a version's dedup decide pass opens and reads of its hash files and the earlier versions'
indexes, as a lineage grows; and what its collect and tokenize tasks read of the dropped keys.

Each version's decide pass (``raypath.dedup.decide_ranges``, one Ray task per run of ranges of
hash buckets) reads each range's rows of every hash file and the earlier index parts of its
buckets (the latest snapshot's and those of the versions after it). This builds ``--versions``
versions of ``--docs`` documents' exact hashes each (``--repeat`` of them copies of earlier
versions' documents), and decides each version in turn, task by task, in this process (a task's
reads are the same in a Ray worker), with ``raypath.dedup.RANGE_ROWS`` set to ``--range-rows``
so that versions span many ranges as they do at scale (4M rows a range: a version of 100M
documents has 25) and runs of ranges as a cluster of ``--cpus`` CPUs takes them. Every file
open goes through a counting filesystem; with ``--s3`` the files are in a bucket on a moto S3
server instead, and each pass's requests by method come from its log. Reports per version: its
ranges and decide tasks, the earlier index parts, the files the decide pass opened and the MB it
read (or its requests), its seconds, whether it wrote a snapshot and the index stored so far;
and the dropped documents (each version must drop exactly its planted copies). Prints one line a
version on stderr, the results as JSON on stdout.

With ``--groups G`` a version's documents lie in G train chunk groups (tokenize tasks), hashed
into ``--hash-files`` files (hash tasks, each a run of groups; default one a group), and
after each decide pass come the collect pass (``raypath.dedup.collect_drops``: the dropped keys
regrouped by key range) and the reads of the tokenize side: each group reads the dropped keys
of its own key range (``raypath.dedup.dropped_keys``): files opened and bytes read, each side,
and the keys found (each version's planted copies). It runs older raypaths' API back to commit
5ba6b1f (``PYTHONPATH`` on a worktree of one); before that, the script as it was at that commit.

    python benchmarks/dedup_index.py --versions 20
    python benchmarks/dedup_index.py --versions 2 --docs 2000000 --groups 40 --range-rows 25000 --repeat 0.3 --s3
    PYTHONPATH=/path/to/worktree python benchmarks/dedup_index.py --versions 20
"""

from __future__ import annotations

import argparse
import collections
import datetime
import inspect
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

sys.path.insert(0, str(Path(__file__).resolve().parent))


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


class Meter:
    """What each phase reads: on the local disk (through :class:`CountingHandler`) files opened
    and MB read, counted as it goes; in a bucket (``bucket`` on a moto server) the requests by
    method, from moto's log between marker requests, once the server has exited."""

    def __init__(self, fs: pafs.FileSystem, counter: CountingHandler | None, bucket: str | None = None):
        self.fs, self.counter, self.bucket, self.labels = fs, counter, bucket, []
        self.last = (0, 0, time.perf_counter())

    def mark(self, label: str | None) -> dict:
        """End the phase under way (its counts, or {} in a bucket: :meth:`requests`), start ``label``'s."""
        now = (self.counter.opened, self.counter.read) if self.counter else (0, 0)
        (opened, read, t0), self.last = self.last, (*now, time.perf_counter())
        got = {"opened": now[0] - opened, "read_mb": round((now[1] - read) / 1e6, 2)} if self.counter else {}
        if self.bucket:
            self.fs.get_file_info(f"{self.bucket}/MARK-{label}")  # moto logs each request, markers too
            self.labels.append(label)
        return {**got, "seconds": round(self.last[2] - t0, 2)}

    def requests(self, log: str) -> dict[str, dict]:
        """Each phase's requests by method (and their total), from moto's log text."""
        from moto_s3 import requests_in

        out, label = {}, None
        for method, path, query in requests_in(log.splitlines()):
            if method == "HEAD" and "/MARK-" in f"/{path}":
                label = path.rsplit("MARK-", 1)[1]
                out.setdefault(label, collections.Counter())
            elif label and "MARK-" not in query:  # not the listing a missing marker's info makes
                out[label][method] += 1
        return {k: {**v, "total": sum(v.values())} for k, v in out.items()}


def _write_hashes(dedup, h: np.ndarray, keys: np.ndarray, out: str, g: int, fs: pafs.FileSystem) -> str:
    path = dedup.hash_file(out, g) if hasattr(dedup, "hash_file") else f"{out}/hashes/part-{g:06d}.parquet"
    dedup.write_hashes(h.astype("<u8").tobytes(), keys.tolist(), fs, path)
    return path


def _decide(dedup, n: int, hashes: list[str], earlier: list[str], starts: list[int], out: str,
            fs: pafs.FileSystem, cpus: int, snapshot: bool, earlier_rows: int) -> tuple[int, list[dict]]:
    """The version's decide tasks, one after another: (tasks, a row of counts per range)."""
    edges = [round(i * (1 << (64 - dedup.BUCKET_SHIFT)) / n) for i in range(n + 1)]
    if not hasattr(dedup, "decide_ranges"):  # a raypath before decide tasks took runs of ranges: a task a range
        return n, [dedup.decide_range(pa.Table.from_pylist([{"range": r, "lo": edges[r], "hi": edges[r + 1]}]),
                                      hashes, earlier, out, fs).to_pylist()[0] for r in range(n)]
    from raypath import bucketed

    runs, kw = bucketed.runs(list(range(n)), cpus), {"snapshot": snapshot} if snapshot else {}
    if "earlier_rows" in inspect.signature(dedup.decide_ranges).parameters:  # windows count the index's rows
        kw["earlier_rows"] = earlier_rows
    return len(runs), [row for run in runs for row in dedup.decide_ranges(
        pa.Table.from_pylist([run]), edges, hashes, earlier, starts, out, fs, **kw).to_pylist()]


def _earlier(dedup, fs: pafs.FileSystem, versions: list[tuple[str, dict]]) -> tuple[list[str], bool]:
    """The earlier index parts a version's decide pass reads, and whether it writes a snapshot."""
    if hasattr(dedup, "earlier_index"):
        dedup.remove_old_snapshots(fs, versions)
        return dedup.earlier_index(fs, versions)
    return [f for d, _ in versions for f in dedup.index_files(fs, d)], False  # a raypath before snapshots


def _stored_mb(fs: pafs.FileSystem, root: str) -> float:
    """MB of every version's index parts and snapshots (dedup/index/, dedup/snapshot/) under ``root``."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return round(sum(i.size for i in infos if i.type == pafs.FileType.File and
                     ("/dedup/index/" in i.path or "/dedup/snapshot/" in i.path)) / 1e6, 2)


def decide_version(k: int, h: np.ndarray, earlier_rows: int, root: str, fs: pafs.FileSystem, meter: Meter,
                   versions: list[tuple[str, dict]], groups: int = 1, hash_files: int | None = None,
                   cpus: int = 8) -> dict:
    """Version k's decide pass (and with ``groups`` its collect and tokenize reads) after
    ``versions`` (each its directory and dedup record), to which it adds its own."""
    from raypath import dedup

    out, hash_files = f"{root}/v{k}/dedup", hash_files or groups
    # A hash file per run of chunk groups, as the hash tasks write them.
    keys = np.asarray(_keys(len(h), groups))
    hashes = [_write_hashes(dedup, h[rows], keys[rows], out, g, fs) for g in range(hash_files)
              if len(rows := np.flatnonzero(np.arange(len(h)) % groups * hash_files // groups == g))]
    earlier, snapshot = _earlier(dedup, fs, versions)
    # The ranges dedup_version cuts: the rows it decides over, RANGE_ROWS a range.
    n = min(1 << (64 - dedup.BUCKET_SHIFT), max(1, math.ceil((earlier_rows + len(h)) / dedup.RANGE_ROWS)))
    train = [{"path": f"f{g}", "fmt": "jsonl", "start": 0, "stop": -1, "bytes": 1, "file": g} for g in range(groups)]
    starts = dedup.group_starts(train, 1) if hasattr(dedup, "group_starts") else []
    meter.mark(f"v{k}-decide")
    tasks, rows = _decide(dedup, n, hashes, earlier, starts, out, fs, cpus, snapshot, earlier_rows)
    counts = {"dropped": sum(r["earlier"] + r["within"] + r["held_out"] for r in rows),
              "index_rows": sum(r["index_rows"] for r in rows)}
    row = {"version": k, "ranges": n, "decide_tasks": tasks, "hash_files": hash_files,
           "earlier_index_parts": len(earlier), **meter.mark(f"v{k}-collect" if groups > 1 else None), **counts,
           "snapshot": snapshot}
    versions.append((f"{root}/v{k}", {"snapshot": snapshot}))
    row["index_stored_mb"] = _stored_mb(fs, root)
    return {**row, **_tokenize_reads(k, out, train, starts, counts["dropped"], fs, meter)} if groups > 1 else row


def _tokenize_reads(k: int, out: str, train: list[dict], starts: list[int], dropped: int, fs: pafs.FileSystem,
                    meter: Meter) -> dict:
    """What the collect pass reads of a decided version's range files, and the tokenize side of the
    drop parts it wrote: each chunk group (file g) its own key range."""
    from raypath import dedup

    infos = fs.get_file_info(pafs.FileSelector(f"{out}/ranges", allow_not_found=True))
    ranges = sorted(i.path for i in infos if i.base_name.startswith("part-"))
    if starts:
        runs = dedup.collect_runs(starts, dropped)
        kw = {"starts": starts}
    else:  # a raypath before the range files were bucketed by chunk group
        runs, kw = dedup.collect_runs(train, 1, dropped), {}
    drops = [f for r in runs if (f := dedup.collect_drops(pa.Table.from_pylist([r]), ranges, out_dir=out, fs=fs,
                                                          **kw).to_pylist()[0]["file"])] if ranges else []
    collect = meter.mark(f"v{k}-tokenize")
    found = sum(len(dedup.dropped_keys(fs, drops, g << 40, (g + 1) << 40)) for g in range(len(train)))
    if found != dropped:
        raise SystemExit(f"{out}: the tokenize side found {found} dropped keys, the decide pass {dropped}")
    names = {"opened": "opened", "read_mb": "read_mb", "seconds": "s"}
    return {"drop_files": len(drops), **{f"collect_{names[m]}": v for m, v in collect.items()},
            **{f"tokenize_{names[m]}": v for m, v in meter.mark(None).items()}}


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
    ap.add_argument("--cpus", type=int, default=8,
                    help="the cluster's CPUs: a decide task takes a run of ranges that leaves each two tasks")
    ap.add_argument("--s3", action="store_true", help="in a bucket on a moto S3 server: requests by method")
    ap.add_argument("--out", default=None, help="where to write results.json (default: print only)")
    args = ap.parse_args()

    import raypath
    from raypath import dedup

    dedup.RANGE_ROWS = args.range_rows
    rng, rows, every, versions = np.random.default_rng(0), [], np.zeros((0, 2), np.uint64), []
    with tempfile.TemporaryDirectory() as tmp:
        moto = None
        if args.s3:
            from moto_s3 import start

            endpoint, moto = start(Path(tmp) / "moto.log")
            fs, root = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True), "dedup-bench"
            fs.create_dir(root)
            meter = Meter(fs, None, root)
        else:
            counter = CountingHandler()
            fs, root = pafs.PyFileSystem(counter), tmp
            meter = Meter(fs, counter)
        try:
            for k in range(1, args.versions + 1):
                h, copies = _digests(rng, args.docs, every, args.repeat)
                row = decide_version(k, h, len(every), root, fs, meter, versions, args.groups, args.hash_files,
                                     args.cpus)
                if row["dropped"] != copies:
                    raise SystemExit(f"v{k}: dropped {row['dropped']} documents, {copies} planted")
                every = np.concatenate([every, h[copies:]])
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=30)
        if args.s3:
            requests = meter.requests((Path(tmp) / "moto.log").read_text())
            for row in rows:
                for phase in ("decide", "collect", "tokenize"):
                    if f"v{row['version']}-{phase}" in requests:
                        row[f"{phase}_requests"] = requests[f"v{row['version']}-{phase}"]
                print(row, file=sys.stderr, flush=True)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
               "raypath": str(Path(raypath.__file__).parent), "args": vars(args), "versions": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
