"""A node's memory while its DDP workers resume one full checkpoint.

Every DDP worker loads the whole full checkpoint (``model.pt``, ``optim.pt``: 12 bytes a
parameter with AdamW's moments) before it moves the tensors to its device. This saves
``--params`` fp32 parameters' worth of weights and moments (random tensors in ``--layers``
pieces, as ``checkpoint_hash.py``), then starts ``--ranks`` processes at once, as a node's
workers (a gloo group), each choosing and loading it as a worker does (``latest_valid`` on the
node's first worker, the others waiting for its choice: ``shards.on_each_node``, where this
raypath has it; else on every worker; then ``load(..., fetched=True)``) and reading every tensor
once (what ``load_state_dict`` and ``.to(device)`` do). Each reports the growth of its anonymous
memory (``Anonymous`` in ``/proc/self/smaps_rollup``: memory of its own, not pages of a file),
the load's wall time and its CPU seconds (the choice's hashing most of them). The node's total
is the sum of the ranks' growth plus the file's pages in the page cache, which the ranks share
(there once, whether read or mapped).

    python benchmarks/resume_memory.py --params 125e6 --ranks 2
    PYTHONPATH=/path/to/checkout python benchmarks/resume_memory.py --params 125e6 --ranks 2   # another raypath
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_hash import state_parser, synthetic_state  # noqa: E402  (the same weights and AdamW state)


def _anonymous() -> int:
    """This process's anonymous memory in bytes (Linux)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/smaps_rollup has no Anonymous line")


def _rank(rank: int, ranks: int, port: int, root: str, start, results, end) -> None:
    import torch.distributed as dist

    from raypath import checkpoint, shards

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    before = _anonymous()
    results.put("ready")
    start.wait()  # every rank loads at once, as a node's workers after a restart
    t0, c0 = time.perf_counter(), time.process_time()
    if hasattr(shards, "on_each_node"):
        chosen = shards.on_each_node(lambda: checkpoint.latest_valid(root), (0, rank))
    else:
        chosen = checkpoint.latest_valid(root)
    once = "fetched" in inspect.signature(checkpoint.load).parameters
    restored = checkpoint.load(chosen, **({"fetched": True} if once else {}))
    tensors = [*restored["model"].values(),
               *(v for s in restored["optim"]["state"].values() for v in s.values())]
    total = sum(float(t.sum()) for t in tensors)  # every byte read once, as a copy to a device reads it
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    results.put({"anonymous_growth": _anonymous() - before, "seconds": seconds, "cpu_seconds": cpu, "sum": total})
    end.wait()  # the tensors held until every rank has measured
    dist.barrier()  # gloo's threads done with the last collective before the group goes
    dist.destroy_process_group()


def main() -> None:
    ap = state_parser(__doc__, repeats=2)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()

    import raypath
    from raypath import checkpoint

    model, optim = synthetic_state(args.params, args.layers)
    root = Path(tempfile.mkdtemp(prefix="resume-memory-"))
    ctx = mp.get_context("spawn")
    runs = []
    try:
        d = checkpoint.save(root / checkpoint.step_dir_name(1), model, optim, {"step": 1, "tokens": 1})
        del model, optim
        size = sum(p.stat().st_size for p in d.iterdir())
        for _ in range(args.repeats):
            start, results, end = ctx.Event(), ctx.Queue(), ctx.Event()
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, str(root), start, results, end))
                     for r in range(args.ranks)]
            for p in procs:
                p.start()
            for _ in procs:  # every rank imported and measured its baseline
                assert results.get(timeout=600) == "ready"
            start.set()
            ranks = [results.get(timeout=600) for _ in procs]
            end.set()
            for p in procs:
                p.join()
            runs.append(ranks)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    growth = [sum(r["anonymous_growth"] for r in ranks) for ranks in runs]
    print(json.dumps({
        "command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "checkpoint_bytes": size, "ranks": args.ranks,
        "anonymous_growth_per_rank_mb": round(statistics.median(growth) / args.ranks / 1e6, 1),
        "anonymous_growth_node_mb": round(statistics.median(growth) / 1e6, 1),
        "node_total_mb": round((statistics.median(growth) + size) / 1e6, 1),
        "load_s": round(statistics.median(max(r["seconds"] for r in ranks) for ranks in runs), 3),
        "node_cpu_s": round(statistics.median(sum(r["cpu_seconds"] for r in ranks) for ranks in runs), 3),
        "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
