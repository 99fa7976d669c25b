"""Size of ``lineage.json`` and of the data manifest, and what writing them costs, as a corpus's
file count grows.

The lineage is rewritten whole on every record (a main segment, a branch, a sweep trial's
result, a release), the data manifest each time a version lands: whatever they hold per corpus
file is rewritten each time. This builds ``--versions`` data-manifest records shaped as
``raypath.data`` writes them (per version ``--files`` train files with their fingerprint, 2 val
files, ``--chunks`` tokenized chunks per file) in a fresh run directory, lands them one by one
in the data manifest as ``prepare_versions`` does (``data._write_manifest``; a checkout without
it wrote the manifest whole with ``write_json``), records them with ``Lineage.set_versions``,
then saves the lineage ``--saves`` times and loads it once. Reports each file's bytes, the bytes
written to land every version, the median lineage save and the load time.

    python benchmarks/lineage_size.py --files 100000
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/lineage_size.py --files 100000
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _fingerprint(path: str, i: int) -> dict:
    return {"path": path, "bytes": 8_000_000 + i, "mtime_ns": 1_764_000_000_000_000_000 + i,
            "sha256": hashlib.sha256(path.encode()).hexdigest()}


def _record(k: int, files: int, chunks: int, root: str) -> dict:
    """A prepared version's data-manifest record (``raypath.data._prepare_one``'s keys)."""
    name = f"v{k + 1}"
    train = [_fingerprint(f"{root}/corpus/{name}/train/part-{i:06d}.jsonl.gz", i) for i in range(files)]
    val = [_fingerprint(f"{root}/corpus/{name}/val/part-{i:06d}.jsonl.gz", i) for i in range(2)]
    return {"name": name, "index": k, "layout": 2, "train_files": train, "val_files": val, "docs": files * 2000,
            "skipped_docs": {}, "skipped_files": [], "new_blocks": files * chunks * 600,
            "new_tokens": files * chunks * 600 * 1025, "dropped_tokens": 0, "dropped_share": 0.0,
            "replay_blocks": 0, "replay_from": {}, "stream_rows": files * chunks * 600, "stream_shards": 64,
            "val_blocks": 512, "test_blocks": 512, "test_from": "val", "new_chunk_rows": [600] * (files * chunks),
            "new_path": f"{root}/data/{name}/new", "stream_path": f"{root}/data/{name}/stream",
            "val_path": f"{root}/data/{name}/val", "test_path": f"{root}/data/{name}/test"}


def _land(path: Path, manifest: dict) -> int:
    """Write the data manifest as preparing a version does; returns the bytes written."""
    from raypath import data
    from raypath.storage import write_json

    def sizes() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.parent.rglob("*.json")}

    before = sizes()
    if hasattr(data, "_write_manifest"):
        data._write_manifest(path, manifest)
    else:
        write_json(path, manifest, root=path.parent.parent)
    return sum(size for p, (size, mtime) in sizes().items() if before.get(p, (None, None))[1] != mtime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="train files per version")
    ap.add_argument("--versions", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=1, help="tokenized chunks per file")
    ap.add_argument("--saves", type=int, default=10)
    args = ap.parse_args()
    from raypath.lineage import Lineage

    with tempfile.TemporaryDirectory(prefix="lineage-bench-") as tmp:
        records = [_record(k, args.files, args.chunks, tmp) for k in range(args.versions)]
        manifest_path = Path(tmp, "data", "manifest.json")
        landed, t0 = 0, time.perf_counter()
        for k in range(args.versions):  # each version lands as soon as it is prepared
            landed += _land(manifest_path, {"seq_len": 1024, "versions": records[: k + 1]})
        land_seconds = time.perf_counter() - t0
        lin = Lineage.open(Path(tmp), "bench", {})
        lin.set_versions(records)
        seconds = []
        for _ in range(args.saves):
            t0 = time.perf_counter()
            lin.save()
            seconds.append(time.perf_counter() - t0)
        size = (Path(tmp) / "lineage.json").stat().st_size
        manifest_size = manifest_path.stat().st_size
        t0 = time.perf_counter()
        Lineage.load(Path(tmp))
        load = time.perf_counter() - t0
    report = {"command": f"python benchmarks/lineage_size.py --files {args.files} --versions {args.versions} "
                         f"--chunks {args.chunks} --saves {args.saves}",
              "raypath": os.environ.get("PYTHONPATH") or "this checkout",
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "corpus_files": args.versions * (args.files + 2), "manifest_bytes": manifest_size,
              "bytes_written_landing_every_version": landed, "landing_seconds": land_seconds,
              "lineage_bytes": size,
              "save_seconds_median": statistics.median(seconds), "load_seconds": load}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
