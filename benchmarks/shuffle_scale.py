"""A version's stream shuffle (``raypath.data.write_stream``) as input files x shards grow:
temporary objects, storage requests, wall time.

The shuffle is a map-reduce through the run directory's filesystem: each map task reads one
tokenized part file and hands its rows to the shards, each reduce task sorts one shard. What
the map side writes, and how the reduce side finds its rows, sets how many objects and
requests a version costs -- the dominant cost of preparing a large version in a bucket.

This writes ``--files`` synthetic tokenized part files (``raypath.data``'s ``new/`` schema:
``row``, ``src``, ``tokens`` of ``--block`` int32) and shuffles them into ``--shards`` shards
on a local Ray cluster, once to a local directory and once to a bucket on a moto S3 server on
loopback, whose request log gives every request by method and by prefix (the temporary
``stream.tmp/`` objects vs the rest). A digest of the stream (``idx``, ``src``, ``tokens`` in
order) shows two checkouts write the same one.

    python benchmarks/shuffle_scale.py --files 64 --shards 64
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/shuffle_scale.py --files 64 --shards 64

Writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import AWS_ENV, requests_in, start  # noqa: E402

BUCKET = "shuffle-bench"


def _inputs(fs, root: str, files: int, rows: int, block: int, vocab: int = 32000) -> list[str]:
    """``files`` part files of ``rows`` random blocks each, rows numbered as the tokenizer does."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    paths = []
    for c in range(files):
        tokens = rng.integers(0, vocab, size=rows * block, dtype=np.int32)
        table = pa.table({"row": (np.int64(c) << np.int64(32)) + np.arange(rows, dtype=np.int64),
                          "src": np.full(rows, 0, np.int16),
                          "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), block)})
        paths.append(f"{root}/new/part-{c:06d}.parquet")
        fs.create_dir(f"{root}/new", recursive=True)
        pq.write_table(table, paths[-1], filesystem=fs, row_group_size=256)
    return paths


def _digest(fs, out_dir: str) -> str:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for i in sorted(fs.get_file_info(pafs.FileSelector(out_dir)), key=lambda i: i.path):
        t = pq.read_table(i.path, filesystem=fs)
        for col in ("idx", "src"):
            h.update(t[col].to_numpy().tobytes())
        h.update(t["tokens"].combine_chunks().values.to_numpy().tobytes())
    return h.hexdigest()


def _requests(lines: list[str]) -> dict:
    """Requests in moto's log lines by method, and objects created, split into the shuffle's
    temporary objects (``stream.tmp/``) and the rest."""
    out: dict[str, collections.Counter] = {"tmp": collections.Counter(), "other": collections.Counter()}
    created: dict[str, set] = {"tmp": set(), "other": set()}
    for method, path, query in requests_in(lines):
        where = "tmp" if "stream.tmp" in path or "stream.tmp" in query else "other"
        out[where][method] += 1
        key = path.split("/", 1)[1] if "/" in path else ""
        if method in ("PUT", "POST") and key and not key.endswith("/"):
            created[where].add(key)
    return {k: {**v, "total": sum(v.values()), "objects": len(created[k])} for k, v in out.items()}


def _shuffle(fs, root: str, files: list[str], shards: int, repeats: int = 1, read_bytes: int | None = None) -> dict:
    """The shuffle ``repeats`` times into the same directory (each run clears its temporary
    directory and rewrites every shard): the median wall time."""
    from raypath.data import Pool, StreamSpec, write_stream

    pool = Pool(0, tuple(files), tuple(0 for _ in files))
    walls, kw = [], {} if read_bytes is None else {"read_bytes": read_bytes}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = write_stream([pool], StreamSpec(key=1234, buckets=shards, own=(0,)), f"{root}/stream", fs, **kw)
        walls.append(time.perf_counter() - t0)
    return {"wall_s": round(statistics.median(walls), 2), "walls_s": [round(w, 2) for w in walls], "rows": out["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=64, help="tokenized part files (map tasks)")
    ap.add_argument("--rows", type=int, default=1024, help="blocks per part file")
    ap.add_argument("--block", type=int, default=129, help="tokens per block (seq_len + 1)")
    ap.add_argument("--shards", type=int, default=64, help="stream shards (reduce tasks)")
    ap.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    ap.add_argument("--repeats", type=int, default=3, help="local shuffles (median wall); S3 runs once")
    ap.add_argument("--read-bytes", type=float, default=None,
                    help="bytes a reduce task reads ahead (raypath.data.GATHER_READ_BYTES), as a multiple of a "
                         "shard's: e.g. 4 reads windows of 4 shards, as 512 MiB does of real 128 MiB shards")
    ap.add_argument("--out", default="runs/shuffle_scale")
    args = ap.parse_args()

    import pyarrow.fs as pafs
    import ray

    import raypath
    from raypath.cluster import init_ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a shard's pieces take ~its rows' int32 tokens (lz4 barely shrinks random ids)
    shard_bytes = args.files * args.rows * args.block * 4 / args.shards
    read_bytes = None if args.read_bytes is None else int(args.read_bytes * shard_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="shuffle-bench-"))
    os.environ.update(AWS_ENV)  # before Ray starts: its workers inherit it
    init_ray()
    results = {"command": " ".join(sys.argv), "raypath": str(Path(raypath.__file__).parent),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", **vars(args)}
    moto = None
    try:
        if "local" in args.targets:
            fs, root = pafs.LocalFileSystem(), str(workdir / "local")
            files = _inputs(fs, root, args.files, args.rows, args.block)
            _shuffle(fs, str(workdir / "warm-up"), files[:2], 2)  # Ray Data's first-use costs
            results["local"] = _shuffle(fs, root, files, args.shards, args.repeats, read_bytes)
            results["local"]["digest"] = _digest(fs, f"{root}/stream")
            print("local", json.dumps(results["local"]), flush=True)
        if "s3" in args.targets:
            log = workdir / "moto.log"
            endpoint, moto = start(log)
            fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            files = _inputs(fs, BUCKET, args.files, args.rows, args.block)
            fs.get_file_info(f"{BUCKET}/MARK-start")  # moto logs lazily: markers, read once it exits
            results["s3"] = _shuffle(fs, BUCKET, files, args.shards, read_bytes=read_bytes)
            fs.get_file_info(f"{BUCKET}/MARK-end")
            results["s3"]["digest"] = _digest(fs, f"{BUCKET}/stream")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        ray.shutdown()
    if "s3" in results:
        text = log.read_text()
        results["s3"]["requests"] = _requests(text.split("MARK-start", 1)[1].split("MARK-end", 1)[0].splitlines())
        print("s3", json.dumps(results["s3"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
