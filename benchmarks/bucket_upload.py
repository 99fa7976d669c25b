"""What a model's weights cost on their way into and out of a run directory in a bucket: the
upload of a directory (a downloaded base model, a branch's export, a local release), its copy
inside the store (a release of a bucket run's export) and its download (a node loading a release
or a checkpoint).

All grow with the model. This writes a ``save_pretrained``-shaped directory of ``--files`` weight
files of random bytes (``--mb`` each), starts a moto S3 server on loopback, and times
``RunDir.publish`` of the directory (a fresh prefix each repeat), ``RunDir.copy_in_store`` of it
and its download into another node's mirror (``Mirror.pull``), median of ``--repeats``. moto
serves the bucket from one Python process here, so the numbers are the client's and that
server's, not a real store's bandwidth.

    python benchmarks/bucket_upload.py --files 8 --mb 64
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/bucket_upload.py --files 8 --mb 64
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import start  # noqa: E402


def _model(d: Path, files: int, mb: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    index = {"weight_map": {f"t{i}": n for i, n in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in names:
        (d / name).write_bytes(os.urandom(mb << 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=8, help="weight files")
    ap.add_argument("--mb", type=int, default=64, help="MiB per weight file")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import pyarrow.fs as pafs

    import raypath
    from raypath.mirror import Mirror, RunDir, run_location

    root = Path(tempfile.mkdtemp(prefix="bucket-upload-"))
    endpoint, moto = start(root / "moto.log")
    try:
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
        here, mirror = run_location("s3://bench/run", str(root / "mirror"), endpoint)
        rd = RunDir(here, mirror)
        _model(here / "exports" / "model", args.files, args.mb)
        total = sum(p.stat().st_size for p in (here / "exports" / "model").iterdir())
        up, copy, down = [], [], []
        for i in range(args.repeats):
            src = here / "exports" / f"model-{i}"
            shutil.copytree(here / "exports" / "model", src)  # new files: nothing of them was uploaded yet
            t0 = time.perf_counter()
            rd.publish(src)
            up.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert rd.copy_in_store(src, here / "releases" / f"r{i}")
            copy.append(time.perf_counter() - t0)
            node = Mirror(mirror.remote, str(root / f"node-{i}"), endpoint)  # a node that loads the release
            t0 = time.perf_counter()
            node.pull(Path(node.local, "releases", f"r{i}"))
            down.append(time.perf_counter() - t0)
    finally:
        moto.kill()
        shutil.rmtree(root, ignore_errors=True)
    results = {"command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "bytes": total, "files": args.files + 2,
               "upload_s": round(statistics.median(up), 3), "copy_in_store_s": round(statistics.median(copy), 3),
               "download_s": round(statistics.median(down), 3)}
    for k in ("upload_s", "copy_in_store_s", "download_s"):
        results[k.removesuffix("_s") + "_mb_per_s"] = round(total / 1e6 / results[k], 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
