"""A dedup hash task's memory and time at its largest input (``raypath.dedup.HASH_GROUP_BYTES``).

A hash task (``raypath.dedup.hash_group``) reads a run of chunk groups, up to
``HASH_GROUP_BYTES`` of text, and holds every document's hash rows (``minhash``: one per band)
until it writes them sorted. This builds ``--mb`` MB of ~2 KB stdlib documents
(``benchmarks/dedup_cost.py``'s corpus, v1), then hashes all of it as one task, each rule in a
fresh process: its peak resident memory over the process's just before the task (the task's
own; a peak of the imports above it reads as 0), its seconds, its hash file (rows, MB, and the
bucket index at its end, of which a decide task reads its run's slice) (Linux)::

    python benchmarks/dedup_hash_memory.py --mb 512
    python benchmarks/dedup_hash_memory.py --mb 512 --modes exact,minhash@0,minhash

``minhash@T`` hashes with ``data.minhash_threshold`` T (``minhash@0``: rows without sketches).

Prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _hash(files: list[str], mode: str, out: str) -> dict:
    """One hash task over ``files`` in this process."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from raypath import dedup
    from raypath.mirror import LOCAL

    parts = [{"path": f, "fmt": "jsonl", "start": 0, "stop": -1, "file": i} for i, f in enumerate(files)]
    kind, _, threshold = mode.partition("@")  # minhash@0: no sketches (data.minhash_threshold 0)
    spec = dedup.DedupSpec("text", None, 0, LOCAL, dedup.Rule(kind, threshold=float(threshold or 0.7)))
    before, t0 = _rss_kb("VmRSS"), time.perf_counter()
    row = dedup.hash_group(pa.Table.from_pylist([{"parts": parts, "out": out}]), spec, pafs.LocalFileSystem())
    seconds, peak, size = time.perf_counter() - t0, _rss_kb("VmHWM"), Path(out).stat().st_size
    index = 8 * (dedup.BUCKETS + 1)  # a decide task reads its run's slice of it
    return {"mode": mode, "docs": row.to_pylist()[0]["train"], "hash_rows": (size - index) // spec.rule.row.itemsize,
            "index_kb": round(index / 1e3, 1), "file_mb": round(size / 1e6, 1), "seconds": round(seconds, 1),
            "rss_before_mb": round(before / 1024, 1),
            "task_peak_mb": round((peak - before) / 1024, 1), "process_peak_mb": round(peak / 1024, 1)}


def _rss_kb(field: str) -> int:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in KiB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=512.0, help="MB of text the task hashes")
    ap.add_argument("--modes", default="exact,minhash")
    ap.add_argument("--child", nargs=3, metavar=("CORPUS", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        corpus, mode, out = args.child
        print(json.dumps(_hash(sorted(str(p) for p in Path(corpus).glob("*.jsonl")), mode, out)))
        return

    from dedup_cost import build_corpus

    import raypath
    from raypath import dedup

    with tempfile.TemporaryDirectory() as tmp:
        build_corpus(Path(tmp) / "corpus", args.mb, {})
        text = Path(tmp) / "corpus" / "v1" / "train"
        mb = sum(p.stat().st_size for p in text.glob("*.jsonl")) / 1e6
        runs = []
        for mode in args.modes.split(","):
            res = subprocess.run([sys.executable, __file__, "--child", str(text), mode, f"{tmp}/{mode}.buckets"],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(runs[-1], file=sys.stderr, flush=True)
    print(json.dumps({"command": " ".join(sys.argv), "machine": platform.platform(), "text_mb": round(mb, 1),
                      "hash_group_bytes": dedup.HASH_GROUP_BYTES, "raypath": str(Path(raypath.__file__).parent),
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
