"""Peak memory of re-mixing a version's stream for a sweep trial's replay ratio.

``raypath.data.replay_variant`` rewrites the rows a branch still has to train with another
share of replay (a sweep can search the ratio); it runs inside the trial's actor. This writes
a synthetic prepared version -- ``--rows`` stream rows of ``--block`` tokens in ``--parts``
part files, ``--stream-replay`` of them older blocks, and an older version's pool -- then,
for each ``--ratios`` value, runs ``replay_variant`` in a fresh process and reports the growth
of its peak RSS (``VmHWM``, reset after the imports) over the stream's bytes, and its wall
time; with ``--s3`` the run directory is in a bucket on a local moto server (the variant read
from and written to it). A ratio below the stream's own swaps replay rows for own blocks;
above it, own rows for older blocks.

    python benchmarks/replay_memory.py --rows 40000 --parts 8
    python benchmarks/replay_memory.py --rows 8000 --parts 32 --s3
    # the same data through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/replay_memory.py --rows 40000 --parts 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # moto_s3

CHILD = r"""
import json, sys
from pathlib import Path
from raypath.data import replay_variant

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
import pyarrow.parquet as pq, ray  # what the call imports (Ray for an older pool): not its cost
pq.read_table(spec["warm"])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
import time
from raypath.mirror import LOCAL, Mirror, RunDir
rd = RunDir(Path(spec["local"]), Mirror(spec["uri"], spec["local"], spec["endpoint"])) if spec.get("uri") else LOCAL
base = rss("VmRSS")
t0 = time.perf_counter()
mix = replay_variant(spec["version"], spec["older"], spec["consumed"], spec["limit"], spec["ratio"], 0, spec["out"],
                     rd)
seconds = time.perf_counter() - t0
import raypath
print(json.dumps({"growth": rss("VmHWM") - base, "seconds": round(seconds, 3),
                  "mix": {k: mix[k] for k in ("rows", "replay_rows")}, "raypath": str(Path(raypath.__file__).parent)}))
"""


def _data(root: Path, args) -> tuple[dict, list[dict], int]:
    from raypath.data import _part, _write_blocks

    rng = np.random.default_rng(0)
    n_old = args.rows
    chunks = np.linspace(0, n_old, args.parts + 1).astype(int)  # an older version's tokenized chunks
    for c in range(args.parts):
        rows = chunks[c + 1] - chunks[c]
        _write_blocks(Path(_part(str(root / "v1-new"), c)), rng.integers(0, 1000, (rows, args.block), dtype=np.int32),
                      np.zeros(rows, np.int64), np.arange(rows))
    _write_blocks(root / "warm.parquet", np.zeros((64, args.block), np.int32))
    n_replay = int(args.stream_replay * args.rows)
    src = np.r_[np.ones(args.rows - n_replay, np.int64), np.zeros(n_replay, np.int64)][rng.permutation(args.rows)]
    (root / "stream").mkdir(exist_ok=True)  # a --workdir used before
    cuts = np.linspace(0, args.rows, args.parts + 1).astype(int)
    for i in range(args.parts):
        a, b = cuts[i], cuts[i + 1]
        tokens = rng.integers(1000, 2000, (b - a, args.block), dtype=np.int32)
        _write_blocks(Path(_part(str(root / "stream"), i)), tokens, src[a:b], np.arange(a, b))
    version = {"name": "v2", "index": 1, "stream_path": str(root / "stream"), "replay_blocks": n_replay}
    older = [{"name": "v1", "index": 0, "new_path": str(root / "v1-new"), "new_blocks": n_old,
              "new_chunk_rows": np.diff(chunks).tolist()}]
    return version, older, args.rows * args.block * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=40000, help="stream rows (blocks)")
    ap.add_argument("--block", type=int, default=1025, help="tokens per block")
    ap.add_argument("--parts", type=int, default=8, help="stream part files")
    ap.add_argument("--stream-replay", type=float, default=0.25, help="share of the stream that is older blocks")
    ap.add_argument("--fork", type=float, default=0.8, help="share of the stream trained before the branch")
    ap.add_argument("--ratios", default="0.1,0.5")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--s3", action="store_true", help="the run directory in a bucket on a local moto server")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="with --s3: each request answered this much later")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="replay-mem-"))
    root = workdir / "run" / "data"  # a run directory's data, in the bucket's local mirror with --s3
    root.mkdir(parents=True, exist_ok=True)
    version, older, stream_bytes = _data(root, args)
    remote, moto = {}, None
    if args.s3:
        import pyarrow.fs as pafs
        from moto_s3 import start

        from raypath.mirror import Mirror

        endpoint, moto = start(workdir / "moto.log", args.latency_ms)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
        Mirror("s3://bench/run", str(workdir / "run"), endpoint).push(workdir / "run")
        remote = {"uri": "s3://bench/run", "local": str(workdir / "run"), "endpoint": endpoint}
    consumed = [[0, int(args.fork * args.rows)]]
    rows = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        spec = {"version": version, "older": older, "consumed": consumed, "limit": args.rows, "ratio": ratio,
                "out": str(root / f"variant-{ratio}"), "warm": str(root / "warm.parquet"), **remote}
        # Run outside the checkout: `python -c` puts the working directory first on sys.path.
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True, capture_output=True,
                             text=True, cwd=workdir)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["growth_over_stream"] = round(row["growth"] / stream_bytes, 3)
        rows[str(ratio)] = row
    if moto is not None:
        moto.kill()
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("workdir", "s3"))
        + (" --s3" if args.s3 else ""),
        "raypath": sorted({row.pop("raypath") for row in rows.values()}),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "stream_bytes": stream_bytes, "ratios": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
