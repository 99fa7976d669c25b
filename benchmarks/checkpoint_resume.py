"""Resuming a sharded checkpoint from a bucket: what each node downloads, and how long it takes.

Starts a moto S3 server on loopback (or uses ``--endpoint``, with credentials from the
environment) and spawns ``--world`` ranks (gloo, CPU) that build ``--config``'s model under
FSDP2 as training does (``benchmarks/checkpoint_save.py``'s build), take one AdamW step and
save a sharded checkpoint into the bucket, each rank through a mirror of its own (a node of
its own). Then fresh nodes resume it with ``--resume-world`` ranks, two ways, interleaved
``--repeats`` times, each repeat in fresh mirrors:

* **whole**: every node pulls the checkpoint directory whole, then loads it from its disk:
  how raypath resumed before (and what the driver did to read ``state.json``);
* **ranged**: ``checkpoint.latest_valid`` + ``checkpoint.load`` + ``shards.load_into`` with the
  run directory: a node downloads the metadata and its ranks' hash shares (their own shards
  at the save's world size) and reads any other slice by byte range.

``--resume-parallel ddp`` resumes into full replicas (DDP, every rank reads every tensor),
``--ranks-per-node`` ranks sharing a node's mirror, three ways: **whole** as above; **per-rank**,
the ranged load as it was for DDP too (each rank's hash share by global rank, the rest by
range, per rank); **per-node**, the ranged load told the node (``load_into(node=...)``): a
node's ranks split downloading the whole checkpoint once, nothing is read by range.

It also exports the checkpoint as ``raypath export`` does (``shards.load_model_weights`` into a
plain model, on a fresh machine) and reports what that downloaded: bytes, and object GET requests
counted in the moto server's log (none with ``--endpoint``). ``--repeats 0`` measures only that.

Reports the checkpoint's bytes; per node and for the driver, the bytes on its disk afterwards
and their ratio to the checkpoint, and per node the bytes its ranks read by range (network,
not disk); and the resume's wall time (barrier to barrier, median; model build excluded).
On loopback the time says little about a real bucket (moto copies a whole object for every
ranged read); the bytes are what scales: a node's download grows with its ranks' shards.

    python benchmarks/checkpoint_resume.py --config configs/llama-125m.yaml --world 2 --repeats 2
    python benchmarks/checkpoint_resume.py --world 2 --resume-world 3   # after a resize
    python benchmarks/checkpoint_resume.py --world 2 --resume-world 4 --ranks-per-node 2 --resume-parallel ddp
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_save import _build  # noqa: E402  (the training loop's FSDP build, shared)
from moto_s3 import free_port, start  # noqa: E402

STEP = 1
BUCKET = "resume-bench"


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def _run_dir(args, node: str):
    from raypath.mirror import Mirror, RunDir

    mirror = Mirror(f"s3://{BUCKET}/run", str(Path(args.workdir, node)), args.endpoint)
    return RunDir(Path(mirror.local), mirror)


def _worker(rank: int, world: int, args, mode: str, tag: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, args.threads))
    from raypath import checkpoint as ckpt
    from raypath.mirror import LOCAL
    from raypath.shards import ShardedSaver, load_into

    args.init = "none" if mode != "save" and args.resume_parallel == "ddp" else "meta"
    model, optim, _, _ = _build(args, torch.device("cpu"))
    per_node = 1 if mode == "save" else args.ranks_per_node
    rd = _run_dir(args, f"{tag}-node{rank // per_node}")
    storage = rd / "ray" / "main-v1"
    d = storage / ckpt.step_dir_name(STEP)
    dist.barrier()
    t0, ranged = time.perf_counter(), 0
    if mode == "save":
        ShardedSaver(rank, False, torch.device("cpu"), rd).save(d, model, optim, {"step": STEP, "consumed": []})
    elif mode == "whole":  # one pull per node, by its first rank
        local = rd.fetch(d) if rank % per_node == 0 else d
        dist.barrier()
        ckpt.load(local)
        load_into(local, model, optim, rank, world, LOCAL)
    else:
        found = ckpt.latest_valid(storage, rd)
        ckpt.load(found, rd=rd)
        node = (rank % per_node, per_node) if mode == "per-node" else None
        ranged = load_into(found, model, optim, rank, world, rd, node)
    dist.barrier()
    # A node's disk is counted once, by its first rank.
    row = {"seconds": time.perf_counter() - t0, "ranged": ranged,
           "bytes": _bytes(Path(rd.path)) if rank % per_node == 0 else 0}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.workdir, f"{tag}.json").write_text(json.dumps(rows))
    # gloo's threads free the gather's buffers before this process shuts down (tests/conftest.py leave_group)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(args, world: int, mode: str, tag: str) -> list[dict]:
    args.port = free_port()
    mp.spawn(_worker, args=(world, args, mode, tag), nprocs=world, join=True)
    return json.loads(Path(args.workdir, f"{tag}.json").read_text())


def _driver(args, mode: str, tag: str) -> int:
    """What the driver (the Train controller's dataset factory) downloads to read the resume step."""
    from raypath import checkpoint as ckpt

    rd = _run_dir(args, f"{tag}-driver")
    storage = rd / "ray" / "main-v1"
    if mode == "whole":
        rd.fetch(storage / ckpt.step_dir_name(STEP))
    else:
        ckpt.load_state(ckpt.latest_valid(storage, rd))
    return _bytes(Path(rd.path))


def _requests(args) -> dict[str, int] | None:
    """Requests the moto server has logged so far: object GETs, and all (None for another endpoint)."""
    log = Path(args.workdir, "moto.log")
    if args.own_moto is False or not log.is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if f" /{BUCKET}" in line]
    return {"gets": sum(f"GET /{BUCKET}/" in line for line in lines), "requests": len(lines)}


def _export(args) -> dict:
    """What ``raypath export`` of the checkpoint downloads on a machine that never saw it."""
    from raypath import checkpoint as ckpt
    from raypath.config import load_config
    from raypath.model import build_model
    from raypath.shards import load_model_weights

    cfg = load_config(args.config)
    model = build_model(cfg.model, cfg.data.vocab_size, 0, None, weights=False)
    rd = _run_dir(args, "export")
    before = _requests(args)
    load_model_weights(rd / "ray" / "main-v1" / ckpt.step_dir_name(STEP), model, rd)
    after = _requests(args)
    return {"bytes": _bytes(Path(rd.path)), "model_bytes": sum(t.numel() * t.element_size()
                                                               for t in model.state_dict().values()),
            **({k: after[k] - before[k] for k in after} if before is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/llama-125m.yaml", help="its model: and data.vocab_size are used")
    ap.add_argument("--world", type=int, default=2, help="ranks (nodes) that save")
    ap.add_argument("--resume-world", type=int, default=None, help="ranks that resume (default --world)")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="resuming ranks that share a node's mirror")
    ap.add_argument("--resume-parallel", choices=["fsdp", "ddp"], default="fsdp",
                    help="the resumed model: FSDP shards, or full replicas (DDP)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of a local moto server")
    ap.add_argument("--workdir", default=None, help="where the mirrors go (default: a temp dir)")
    args = ap.parse_args()
    args.device = "cpu"
    resume_world = args.resume_world or args.world
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="resume-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = str(workdir)
    moto = None
    args.own_moto = args.endpoint is None
    if args.endpoint is None:
        args.endpoint, moto = start(workdir / "moto.log")
    try:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=args.endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        _spawn(args, args.world, "save", "save")
        checkpoint_bytes = sum(r["bytes"] for r in json.loads((workdir / "save.json").read_text()))
        for p in workdir.glob("save-node*"):  # what the savers wrote: a resuming node starts empty
            shutil.rmtree(p, ignore_errors=True)
        export = _export(args)
        export["bytes_over_checkpoint"] = round(export["bytes"] / checkpoint_bytes, 4)
        modes = ("whole", "per-rank", "per-node") if args.resume_parallel == "ddp" else ("whole", "ranged")
        rows: dict[str, list] = {mode: [] for mode in modes}
        drivers: dict[str, int] = {}
        for i in range(args.repeats):
            for mode in rows:
                tag = f"{mode}{i}"
                rows[mode].append(_spawn(args, resume_world, mode, tag))
                drivers[mode] = _driver(args, mode, tag)
                for p in workdir.glob(f"{tag}-*"):
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        if moto is not None:
            moto.kill()
    med = statistics.median
    summary = {mode: {"seconds": med(max(r["seconds"] for r in run) for run in runs),
                      "node_bytes": [r["bytes"] for r in runs[0]],
                      "node_bytes_over_checkpoint": [round(r["bytes"] / checkpoint_bytes, 4) for r in runs[0]],
                      "node_ranged_bytes_over_checkpoint": [round(r["ranged"] / checkpoint_bytes, 4) for r in runs[0]],
                      "driver_bytes": drivers[mode],
                      "driver_bytes_over_checkpoint": round(drivers[mode] / checkpoint_bytes, 6)}
               for mode, runs in rows.items() if runs}
    cluster = {mode: sum(r["bytes"] + r["ranged"] for r in runs[0]) + drivers[mode] for mode, runs in rows.items()
               if runs}
    if not cluster:  # --repeats 0: the export only
        modes = ()
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("workdir", "port", "endpoint", "init", "device", "own_moto") and v is not None),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "world": args.world, "resume_world": resume_world,
        "checkpoint_bytes": checkpoint_bytes, "export": export, **summary,
        # Everything that crossed the network: downloads (on disk) and ranged reads (in memory).
        **{f"cluster_bytes_ratio_{mode}_over_whole": cluster[mode] / cluster["whole"] for mode in modes[1:]},
        **{f"time_ratio_{mode}_over_whole": summary[mode]["seconds"] / summary["whole"]["seconds"]
           for mode in modes[1:]},
    }
    print(json.dumps(report, indent=2))
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {workdir / 'report.json'}")


if __name__ == "__main__":
    main()
