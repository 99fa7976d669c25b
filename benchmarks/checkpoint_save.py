"""Checkpoint saves under FSDP: the old gather-to-rank-0 save vs sharded DCP, sync and async.

Spawns ``--world`` processes (gloo on CPU, NCCL on CUDA) that each build the same
Llama from a raypath config exactly as the training loop does under FSDP2 (on the
meta device, sharded by ``raypath.loop._shard``, filled one tensor at a time by
``raypath.model.materialize``; rank 0's peak RSS of that build is reported) and
take one optimizer step, so AdamW's moments exist. Then, in the same processes:

* **old**: ``Training.state_dicts()`` gathers the full model and optimizer state
  to rank 0 (CPU offload), which writes ``model.pt``/``optim.pt`` and hashes them
  (``raypath.checkpoint.save``): what FSDP checkpoints did before;
* **dcp**: ``raypath.shards.ShardedSaver``: every rank writes and hashes its own
  shards, rank 0 writes the manifest last.

For each: save wall time (all ranks, barrier to barrier) and rank 0's peak RSS
during the save (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
starting from the live state: the heap freed by the last step is returned to the OS
first (``malloc_trim``), and the RSS before that is reported too.

**--export**: a segment's end-of-run Hugging Face export under FSDP, instead of the saves:
**gather** collects the full model to rank 0 (``get_model_state_dict``, full state, CPU
offload), which gives it to a meta-device model (``load_state_dict(assign=True)``: one host
copy) and writes it with ``save_pretrained``: what exports did before; **shares** is what
``raypath.loop._export`` runs now, every rank writing its share of the weights
(``raypath.export.rank_shares``/``write_share``). Wall time, and every rank's peak RSS growth.

**async**: training time lost per checkpoint. ``--steps`` training steps run
with no checkpoint, with a sync DCP save after the first step, and with an
async one (the writes and hashes finish while training goes on; the run ends by
waiting for it and writing the manifest). Two measures: the time the training
thread spends in the saver's calls (blocked), and run time - the no-checkpoint
run's (lost; on a machine with no idle core it also holds the CPU the background
writer takes from the step). Repeats interleave the three variants (a shared
machine's load drifts); the summary gives medians.

    python benchmarks/checkpoint_save.py --config configs/llama-125m.yaml --world 2 --repeats 3
    # rank 0's build peak, sharded build vs the whole model on every rank first
    python benchmarks/checkpoint_save.py --build-only --init meta
    python benchmarks/checkpoint_save.py --build-only --init full
    # the HF export at the end of a segment: gather to rank 0 vs each rank its share
    python benchmarks/checkpoint_save.py --export --world 2 --repeats 3
    # one GPU: save time of the same model with one rank
    python benchmarks/checkpoint_save.py --config configs/llama-125m.yaml --world 1 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(args, device):
    from raypath.config import load_config
    from raypath.loop import _shard
    from raypath.model import block_loss, build_model, materialize

    cfg = load_config(args.config)
    torch.manual_seed(0)
    _reset_peak_rss()
    before = _rss_kb("VmRSS")
    if args.init == "meta":  # as the training loop builds under FSDP: never whole on a rank
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.data.vocab_size, 0, None, weights=False)
        _shard(model)
        materialize(model, device)
    else:  # the whole model on every rank: then sharded (the former build), or kept whole (DDP)
        model = build_model(cfg.model, cfg.data.vocab_size, 0, None).to(device)
        if args.init == "full":
            _shard(model)
    build = {"rss_before_mb": before / 1024, "peak_rss_mb": _rss_kb("VmHWM") / 1024}
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    blocks = torch.randint(0, cfg.data.vocab_size, (args.micro, args.seq + 1), device=device)

    def step():
        block_loss(model, blocks).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()
    return model, optim, step, build


def _release_free_heap() -> None:
    """Return the heap the last step freed to the OS, so RSS is the live state.

    glibc keeps freed memory mapped; a save that allocates into it does not raise RSS.
    Trimming first measures what each save needs on top of the live state (the gather's
    full state shows up whole) instead of how much of it the last step happened to free.
    """
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _timed(fn, rank: int, device) -> dict:
    dist.barrier()
    untrimmed = _rss_kb("VmRSS")
    _release_free_heap()
    _reset_peak_rss()
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return {"seconds": time.perf_counter() - t0, "rss_untrimmed_mb": untrimmed / 1024, "rss_before_mb": before / 1024,
            "peak_rss_mb": _rss_kb("VmHWM") / 1024}


def _worker(rank: int, world: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, args.threads))
    from raypath import checkpoint as ckpt
    from raypath.loop import Training
    from raypath.shards import ShardedSaver

    model, optim, step, build = _build(args, device)
    if args.build_only:
        if rank == 0:
            print(json.dumps({"init": args.init, "rank0_build": build}), flush=True)
        dist.barrier()  # gloo's threads free the build's buffers before this process shuts down
        dist.destroy_process_group()
        return
    if args.export:
        _exports(model, rank, world, args, device, out)
        dist.destroy_process_group()
        return
    tr = Training(model, model, optim, device, parallel="fsdp")
    root = Path(args.workdir)
    results: dict = {"old": [], "dcp": [], "lost_sync": [], "lost_async": [], "blocked_sync": [],
                     "blocked_async": [], "run_none": [], "build": build}

    def old_save(d: Path):
        model_sd, optim_sd = tr.state_dicts()
        if rank == 0:
            ckpt.save(d, model_sd, optim_sd, {"step": 1})

    sync_saver = ShardedSaver(rank, False, device)
    async_saver = ShardedSaver(rank, True, device)

    def run(saver, d: Path | None) -> tuple[float, float]:
        """(run seconds, seconds the training thread spent in the saver's calls)."""
        step()  # untimed: refaults the heap a trimmed save measurement gave back
        dist.barrier()
        blocked = 0.0
        t0 = time.perf_counter()
        for i in range(args.steps):
            step()
            if i == 0 and saver is not None:
                tb = time.perf_counter()
                saver.save(d, model, optim, {"step": 1})
                blocked += time.perf_counter() - tb
        if saver is not None:
            tb = time.perf_counter()
            saver.wait()
            blocked += time.perf_counter() - tb
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t0, blocked

    for r in range(args.repeats):
        for name, fn in (("old", old_save), ("dcp", lambda d: sync_saver.save(d, model, optim, {"step": 1}))):
            d = root / f"{name}-{r}"
            results[name].append({**_timed(lambda: fn(d), rank, device),
                                  "bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file())})
            dist.barrier()
            if rank == 0:
                shutil.rmtree(d)
        none, _ = run(None, None)
        sync, blocked_sync = run(sync_saver, root / f"sync-{r}")
        asyn, blocked_async = run(async_saver, root / f"async-{r}")
        results["run_none"].append(none)
        results["lost_sync"].append(sync - none)
        results["lost_async"].append(asyn - none)
        results["blocked_sync"].append(blocked_sync)
        results["blocked_async"].append(blocked_async)
        if rank == 0:
            print(f"repeat {r + 1}/{args.repeats}: save old {results['old'][-1]['seconds']:.1f} s, "
                  f"dcp {results['dcp'][-1]['seconds']:.1f} s; training thread blocked sync {blocked_sync:.2f} s, "
                  f"async {blocked_async:.2f} s; run time lost sync {sync - none:.2f} s, async {asyn - none:.2f} s "
                  f"(run {none:.1f} s)", flush=True)
        dist.barrier()
        if rank == 0:
            for p in root.glob(f"*sync-{r}"):
                shutil.rmtree(p)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _exports(model, rank: int, world: int, args, device, out: str) -> None:
    """``--export``: the two ways of writing the model's weights as a Hugging Face directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from raypath.config import load_config
    from raypath.export import rank_shares, write_share
    from raypath.model import build_model

    cfg = load_config(args.config)
    with torch.device("meta"):
        plain = build_model(cfg.model, cfg.data.vocab_size, 0, None, weights=False)
    root, rows = Path(args.workdir), {"gather": [], "shares": []}

    def gather(d: Path) -> None:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            with torch.device("meta"):
                m = build_model(cfg.model, cfg.data.vocab_size, 0, None, weights=False)
            m.load_state_dict(full, assign=True)
            m.tie_weights()
            m.save_pretrained(d, safe_serialization=True)

    def shares(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        write_share(d, get_model_state_dict(model), rank_shares(plain, world), rank)

    for r in range(args.repeats):
        for name, fn in (("gather", gather), ("shares", shares)):
            d = root / f"export-{name}-{r}"
            got = _timed(lambda: fn(d), rank, device)
            peaks = [None] * world
            dist.all_gather_object(peaks, got["peak_rss_mb"] - got["rss_before_mb"])
            if rank == 0:
                rows[name].append({**got, "growth_mb_per_rank": peaks,
                                   "bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file())})
                print(f"repeat {r + 1}/{args.repeats} {name}: {got['seconds']:.2f} s, RSS growth per rank "
                      f"{', '.join(f'{g:.0f}' for g in peaks)} MB", flush=True)
                shutil.rmtree(d)
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _export_report(res: dict) -> dict:
    med = statistics.median

    def summary(rows: list[dict]) -> dict:
        return {"seconds": med(r["seconds"] for r in rows), "bytes": rows[0]["bytes"],
                "growth_mb_per_rank": [med(r["growth_mb_per_rank"][i] for r in rows)
                                       for i in range(len(rows[0]["growth_mb_per_rank"]))]}

    gather, shares = summary(res["gather"]), summary(res["shares"])
    return {"gather": gather, "shares": shares, "time_ratio_shares_over_gather": shares["seconds"] / gather["seconds"],
            "max_rank_growth_ratio_shares_over_gather":
                max(shares["growth_mb_per_rank"]) / max(gather["growth_mb_per_rank"]), "raw": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/llama-125m.yaml", help="its model: and data.vocab_size are used")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="training steps per run of the async measurement")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--init", choices=["meta", "full"], default="meta",
                    help="meta: the training loop's sharded build; full: the whole model on each rank first")
    ap.add_argument("--build-only", action="store_true", help="report rank 0's build peak RSS and stop")
    ap.add_argument("--export", action="store_true", help="measure the Hugging Face export instead of the saves")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    args.workdir = str(workdir)
    out = workdir / "results.json"
    mp.spawn(_worker, args=(args.world, args, str(out)), nprocs=args.world, join=True)
    if args.build_only:
        return
    res = json.loads(out.read_text())
    med = statistics.median
    meta = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k not in ("workdir", "port")),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__}
    if args.export:
        report = {**meta, **_export_report(res)}
        print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2))
        (workdir / "report.json").write_text(json.dumps(report, indent=2))
        return

    def summary(name: str) -> dict:
        rows = res[name]
        return {"seconds": med(r["seconds"] for r in rows), "peak_rss_mb": med(r["peak_rss_mb"] for r in rows),
                "rss_before_mb": med(r["rss_before_mb"] for r in rows),
                "rss_untrimmed_mb": med(r["rss_untrimmed_mb"] for r in rows), "bytes": rows[0]["bytes"]}

    old, new = summary("old"), summary("dcp")
    lost_sync, lost_async = med(res["lost_sync"]), med(res["lost_async"])
    report = {
        **meta, "rank0_build": res["build"], "old": old, "dcp": new,
        "save_time_ratio_dcp_over_old": new["seconds"] / old["seconds"],
        "rank0_peak_rss_ratio_dcp_over_old": new["peak_rss_mb"] / old["peak_rss_mb"],
        "rank0_rss_growth_mb": {"old": old["peak_rss_mb"] - old["rss_before_mb"],
                                "dcp": new["peak_rss_mb"] - new["rss_before_mb"]},
        "train_run_seconds_no_checkpoint": med(res["run_none"]),
        "lost_per_checkpoint_s": {"sync": lost_sync, "async": lost_async},
        "lost_ratio_async_over_sync": lost_async / lost_sync if lost_sync > 0 else float("nan"),
        "blocked_per_checkpoint_s": {"sync": med(res["blocked_sync"]), "async": med(res["blocked_async"])},
        "blocked_ratio_async_over_sync": med(res["blocked_async"]) / med(res["blocked_sync"]),
        "raw": res,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2))
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {workdir / 'report.json'}")


if __name__ == "__main__":
    main()
