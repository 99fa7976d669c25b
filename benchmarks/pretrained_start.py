"""What a run start costs with ``model.path`` set, as the model grows: hashing the weights of a
local directory, downloading a URI (copy + hash), re-verifying the download on the next run.

Each command with ``model.path`` resolves it first (``raypath.pretrained.resolve``): a local
directory's weight files are hashed for the lineage, a URI is downloaded once into the run
directory and verified against its manifest at every later start. This writes a
``save_pretrained``-shaped directory of ``--shards`` weight files of random bytes (``--gb`` in
all) and times the three cases, ``--repeats`` times each (median). The files stay in the page
cache (size them below the RAM), so the numbers are hashing and copying, not the disk.

    python benchmarks/pretrained_start.py --gb 4 --shards 8
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/pretrained_start.py --gb 4 --shards 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _model(d: Path, gb: float, shards: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    per = int(gb * 1e9 / shards)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    # the index names the weight files, as save_pretrained writes it: raypath reads only those
    index = {"weight_map": {f"t{i}": name for i, name in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in names:
        with open(d / name, "wb") as f:
            for off in range(0, per, 64 << 20):
                f.write(os.urandom(min(64 << 20, per - off)))


def _time(fn, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=4.0, help="weights in all")
    ap.add_argument("--shards", type=int, default=8, help="weight files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import raypath
    from raypath.mirror import RunDir
    from raypath.pretrained import resolve

    root = Path(args.workdir or tempfile.mkdtemp(prefix="pretrained-bench-"))
    src = root / "model"
    if not (src / "model.safetensors.index.json").is_file():
        _model(src, args.gb, args.shards)
    # sized from the index this script wrote, so that an older checkout's raypath runs it too
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weights = sum((src / name).stat().st_size for name in set(index["weight_map"].values()))
    if not weights:
        raise SystemExit(f"{src}: no weight files found")

    def download():
        shutil.rmtree(root / "run", ignore_errors=True)
        resolve(f"file://{src}", RunDir(root / "run"))

    results = {"command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "weights_bytes": weights, "shards": args.shards,
               "local_hash_s": _time(lambda: resolve(str(src), RunDir(root / "run-local")), args.repeats),
               "download_s": _time(download, args.repeats),
               "verify_s": _time(lambda: resolve(f"file://{src}", RunDir(root / "run")), args.repeats)}
    for k in ("local_hash_s", "download_s", "verify_s"):
        results[k.replace("_s", "_gb_per_s")] = round(weights / 1e9 / results[k], 2)
        results[k] = round(results[k], 4)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
