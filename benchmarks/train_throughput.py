"""Is the main path as fast as plain PyTorch, and what does each loss/kernel setting buy?

For every config given and every kernel setting, runs the same model, the same
token blocks, the same batch sizes and the same number of optimizer steps through:

* (a) raypath: a real main-path segment (``raypath.segment.fit_segment``: Ray
  Train worker, Ray Data stream, the loop with its metrics and checkpoints);
  tokens/s and peak memory are read from the segment's metric curve;
* (b) plain: a hand-written PyTorch loop in a fresh process, over the same rows
  of the version's ``stream.parquet`` (read with pyarrow), same AdamW settings,
  precision, compile, gradient accumulation and loss, and as many threads as a
  Ray Train worker gets (Ray sets ``OMP_NUM_THREADS`` to the worker's CPUs;
  checked in a Ray task reserving ``train.cpus_per_worker``).

Kernel settings (``--kernels``; default: all that can run here):

* ``chunked``: ``train.kernels=none`` with the config's ``train.loss_chunk_tokens``
  (the default: the ``[tokens, vocab]`` logits are never materialised);
* ``full``: ``train.kernels=none train.loss_chunk_tokens=0`` (full logits, the baseline);
* ``liger``: ``train.kernels=liger`` (CUDA and the ``liger`` extra only).

Reported for each: tokens/s, MFU (where the device's peak is known) and peak
memory: allocated GPU memory on CUDA, the process's peak RSS on CPU (each run is
a fresh process: the Ray Train worker, the plain loop's subprocess). Both loops
measure steady state: the first ``log_every`` steps (start-up, compile) are
excluded, and so is the time of raypath's checkpoints (the plain loop writes
none). Repeats interleave every (loop, setting) run, since a shared machine's
load drifts; the summary gives medians and the min-max spread, plus per config
the chunked/full ratios of tokens/s and peak memory.

    python benchmarks/train_throughput.py --config configs/quickstart.yaml --repeats 5
    # on a CUDA machine (one GPU): both GPU configs, every setting, bf16, compiled:
    python benchmarks/train_throughput.py --config configs/llama-125m.yaml --config configs/llama-350m.yaml \
        --device cuda --out runs/train_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

#: Kernel setting -> the config overrides that select it.
SETTINGS = {
    "chunked": ["train.kernels=none"],
    "full": ["train.kernels=none", "train.loss_chunk_tokens=0"],
    "liger": ["train.kernels=liger"],
}


def worker_threads(cpus: float) -> int:
    """torch's intra-op threads inside a Ray worker that reserves ``cpus`` CPUs."""
    import ray

    @ray.remote(num_cpus=cpus)
    def probe() -> int:
        return torch.get_num_threads()

    return ray.get(probe.remote())


def _steady(windows: list[tuple[int, float]]) -> float:
    """tokens/s over (tokens, tokens_per_s) windows, the first one excluded."""
    rest = windows[1:] or windows
    return sum(n for n, _ in rest) / sum(n / r for n, r in rest)


def run_raypath(ctx, version: dict, cfg, steps: int, workdir: Path) -> dict:
    """(a): one main-path segment of ``steps`` steps through Ray Train."""
    from raypath.report import read_curve
    from raypath.schedules import MainPath
    from raypath.segment import Segment, fit_segment

    t = cfg.train
    name = f"bench-{time.monotonic_ns()}"
    seg = Segment(**{**ctx.segment_fields(name), "train": t, "storage": str(workdir / "ray" / name),
                     "curves_path": str(workdir / f"{name}.jsonl")},
                  kind="main", version=version["name"], stream_path=version["stream_path"],
                  start_step=0, end_step=steps, schedule=MainPath(t.max_lr, t.warmup_steps),
                  stream_limit=steps * t.global_batch_size)
    t0 = time.perf_counter()
    fit_segment(seg)
    wall = time.perf_counter() - t0
    rows = read_curve(seg.curves_path).to_dict("records")  # metrics only, no (re)start events
    windows = [(r["tokens"] - p["tokens"], r["tokens_per_s"]) for p, r in zip([{"tokens": 0}] + rows, rows)
               if r.get("tokens_per_s") == r.get("tokens_per_s")]  # NaN where a row has none
    shutil.rmtree(seg.storage, ignore_errors=True)
    last = rows[-1]
    return {"tokens_per_s": _steady(windows), "windows": len(windows), "wall_s": wall, "loss": last.get("loss"),
            "mfu": last.get("mfu"), "data_wait_share": last.get("data_wait_share"),
            "peak_memory_gb": max(r.get("peak_memory_gb") or 0.0 for r in rows)}


def _rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_plain(stream_path: str, cfg, vocab: int, eos: int, pad, steps: int, device: str, threads: int,
              profile_steps: int = 0) -> dict:
    """(b): the same steps as a minimal single-process PyTorch loop, with raypath's loss.

    profile_steps: after the timed steps, this many more under ``torch.profiler``: where a
        step's time goes (:func:`_profile`).
    """
    import pyarrow.parquet as pq

    from raypath.loss import install_loss
    from raypath.model import block_loss, build_model, compile_blocks
    from raypath.perf import device_peak_flops, flops_per_token, peak_memory_bytes

    t, seq = cfg.train, cfg.data.seq_len
    torch.set_num_threads(threads)
    torch.manual_seed(t.seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    n = steps * t.global_batch_size
    if stream_path is None:  # --data synthetic: uniform random tokens (speed and memory do not depend on them)
        blocks = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(t.seed))
    else:
        table = pq.read_table(stream_path, columns=["idx", "tokens"]).sort_by("idx")
        col = table.column("tokens").combine_chunks().slice(0, n)
        blocks = torch.from_numpy(col.flatten().to_numpy().reshape(n, -1).astype("int64"))
        del table, col

    model = build_model(cfg.model, vocab, eos, pad, seq)
    install_loss(model, t, dev)  # the setting's loss (chunked / full / Liger), as the raypath worker does
    model.to(dev)
    if t.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=t.max_lr, betas=tuple(t.betas), fused=dev.type == "cuda")
    if t.compile:
        compile_blocks(model)  # as the raypath worker compiles
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if t.precision == "bf16" else contextlib.nullcontext
    micro, accum = t.micro_batch_size, t.global_batch_size // t.micro_batch_size
    model.train()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rss_start = _rss_bytes() if dev.type == "cpu" else None
    windows, t_last, loss_sum = [], time.perf_counter(), torch.zeros((), device=dev)

    def one_step(step: int) -> None:
        nonlocal loss_sum
        lr = t.max_lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.max_lr
        for g in opt.param_groups:
            g["lr"] = lr
        for i in range(accum):
            start = (step * accum + i) * micro % n  # profiled steps past the timed ones reuse the blocks
            x = blocks[start:start + micro].to(dev, non_blocking=True)
            with amp():
                loss = block_loss(model, x) / accum
            loss.backward()
            loss_sum += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for step in range(steps):
        one_step(step)
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            last_loss = loss_sum.item() / ((step + 1) - len(windows) * t.log_every)
            loss_sum.zero_()  # the loop reads its loss at log steps, like raypath
            sync()
            now = time.perf_counter()
            k = (step + 1) - (len(windows) * t.log_every)
            tokens = k * t.global_batch_size * seq
            windows.append((tokens, tokens / (now - t_last)))
            t_last = now
    peak = peak_memory_bytes(dev)
    profiled = _profile(lambda i: one_step(steps + i), profile_steps, dev, sync) if profile_steps else None
    return {"tokens_per_s": _steady(windows), "windows": len(windows), "loss": last_loss, "profile": profiled,
            "peak_memory_gb": peak / 1e9,
            # CPU: how far the training steps pushed RSS above where they started.
            "step_memory_gb": (peak - rss_start) / 1e9 if rss_start is not None else None,
            "flops_per_token": flops_per_token(model.config, seq), "params": sum(p.numel() for p in model.parameters()),
            "peak_flops": device_peak_flops(dev, t.peak_flops),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{threads} threads"}


#: Where a step's time goes, by the names of the kernels (CUDA) or ops (CPU) that spend it;
#: the first kind whose substring a name holds wins, the rest is "other".
#: Inductor names its kernels ``triton_{poi,red,per}_fused_*``; Liger's are named after their op.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "linearcrossentropy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled", ("triton_",)),
    ("liger", ("rms_norm", "swiglu", "rope", "liger")),
    ("elementwise", ("elementwise", "reduce_kernel", "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow",
                     "aten::rsqrt", "aten::mean", "aten::sum", "aten::silu", "aten::neg", "aten::cat")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
)


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def _profile(step, n: int, dev: torch.device, sync) -> dict:
    """Run ``step(0..n-1)`` under ``torch.profiler``; per step: wall time, the time the device
    was busy (CUDA kernels, or the CPU ops' own time on CPU), that time by kind, top kernels.

    Wall minus busy is time the device waited on the host (launches, Python, data).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = dev.type == "cuda"
    sync()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        sync()
        wall = time.perf_counter() - t0
    rows = [(e.key, e.self_device_time_total if on_gpu else e.self_cpu_time_total, e.count)
            for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == on_gpu]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for name, us, _ in rows:
        kinds[_kind(name)] = kinds.get(_kind(name), 0.0) + us / 1e3 / n
    return {"steps": n, "step_ms": wall * 1e3 / n, "busy_ms": sum(kinds.values()),
            "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": name[:100], "kind": _kind(name), "ms": us / 1e3 / n, "calls": c / n}
                    for name, us, c in rows[:15]]}


def run_plain_fresh(*args) -> dict:
    """:func:`run_plain` in a fresh process: its peak memory is this run's alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_plain, args)


def _stats(xs: list[float | None]) -> dict | None:
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def run_overrides(path: str, args) -> list[str]:
    """The overrides of every run of a config: its own run directory (prepared once, reused), eval
    only at the end of the segment, and ``train.use_gpu`` as ``--device`` says: the GPU configs set
    it, and with ``--device cpu`` their Ray Train worker would wait forever for a GPU."""
    return [f"run_dir=runs/bench-{Path(path).stem}", *args.set, "train.eval_every=0",
            f"train.use_gpu={str(args.device == 'cuda').lower()}"]


def bench_config(path: str, args, settings: list[str]) -> dict:
    """Every (repeat, setting, loop) run of one config; the per-setting summary."""
    from raypath.cluster import check_workers_fit
    from raypath.config import load_config
    from raypath.perf import mfu, ratio
    from raypath.run import prepare

    base = run_overrides(path, args)
    cfg = load_config(path, base)
    t = cfg.train
    if t.num_workers != 1:
        cfg = replace(cfg, train=replace(t, num_workers=1, min_workers=0))  # (b) is one process
        t = cfg.train
    if args.data == "stream":
        # Ray Train waits without a word for CPUs the cluster lacks (llama-125m's 8 per worker on a
        # small machine): refused here, naming train.cpus_per_worker, before the data is prepared.
        check_workers_fit(t, args.local_cluster)
    steps = args.steps or 6 * t.log_every
    cfgs = {name: load_config(path, [*base, *SETTINGS[name]]) for name in settings}
    cfgs = {name: replace(c, train=replace(c.train, num_workers=1, min_workers=0)) for name, c in cfgs.items()}
    if args.data == "synthetic":
        return _bench_plain_synthetic(path, args, cfg, cfgs, steps)
    ctx = prepare(cfg)  # idempotent: reuses a prepared run directory
    version = max(ctx.versions, key=lambda v: v["stream_rows"]) if not args.version else \
        next(v for v in ctx.versions if v["name"] == args.version)
    available = version["stream_rows"] // t.global_batch_size
    if not args.steps and available < steps:
        # The embedded corpus caps each version (~1M tokens at seq 1024): fewer, still steady-state steps.
        print(f"{path}: {version['name']} holds {available} steps of data; running {available}, not {steps}",
              flush=True)
        steps = available
    if steps < 2 * t.log_every or version["stream_rows"] < steps * t.global_batch_size:
        raise SystemExit(f"{version['name']} has {version['stream_rows']} blocks, {steps} steps need "
                         f"{steps * t.global_batch_size} (and two log windows, {2 * t.log_every} steps): use fewer "
                         "--steps, a smaller train.log_every, or more data")
    threads = worker_threads(t.cpus_per_worker)

    workdir = Path(tempfile.mkdtemp(prefix="train_throughput-"))
    runs: dict[str, dict[str, list[dict]]] = {name: {"raypath": [], "plain": []} for name in settings}
    errors: dict[str, str] = {}  # a setting that fails is reported, and the others still run
    info: dict = {}
    try:
        for r in range(args.repeats):
            for name in [n for n in settings if n not in errors]:
                try:
                    a = run_raypath(ctx, version, cfgs[name], steps, workdir)
                    b = run_plain_fresh(version["stream_path"], cfgs[name], ctx.vocab_size, ctx.eos_id,
                                        ctx.pad_id, steps, args.device, threads, args.profile if r == 0 else 0)
                except Exception as e:  # noqa: BLE001 - one setting's failure must not lose the others
                    errors[name] = f"{type(e).__name__}: {e}"
                    print(f"{Path(path).stem} {name}: FAILED: {errors[name]}", flush=True)
                    continue
                info = {k: b[k] for k in ("flops_per_token", "params", "peak_flops", "device")}
                runs[name]["raypath"].append(a)
                runs[name]["plain"].append(b)
                fpt, peak = info["flops_per_token"], info["peak_flops"]
                # Printed per run: a stage stopped by its timeout still leaves these numbers in the log.
                print(f"{Path(path).stem} repeat {r + 1}/{args.repeats} {name:>7}: "
                      f"raypath {a['tokens_per_s']:,.0f} tok/s {a['peak_memory_gb']:.2f} GB, "
                      f"plain {b['tokens_per_s']:,.0f} tok/s {b['peak_memory_gb']:.2f} GB, "
                      f"ratio {a['tokens_per_s'] / b['tokens_per_s']:.3f}, MFU "
                      f"{_pct(mfu(a['tokens_per_s'], fpt, peak))}/{_pct(mfu(b['tokens_per_s'], fpt, peak))}",
                      flush=True)
                if b["profile"]:
                    print("\n".join(_profile_lines(name, b["profile"])), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    settings = [n for n in settings if n not in errors]
    if not settings:
        raise SystemExit(f"{path}: every setting failed: {errors}")

    fpt, peak = info["flops_per_token"], info["peak_flops"]
    summary: dict = {
        "config": path, "overrides": args.set, "device": info["device"], "params": info["params"],
        "seq_len": cfg.data.seq_len, "vocab_size": ctx.vocab_size, "global_batch": t.global_batch_size,
        "micro_batch": t.micro_batch_size, "precision": t.precision, "compile": t.compile,
        "loss_chunk_tokens": t.loss_chunk_tokens, "steps": steps, "repeats": args.repeats,
        "worker_threads": threads, "flops_per_token": fpt, "peak_flops": peak, "settings": {}, "errors": errors,
    }
    for name in settings:
        ta = [x["tokens_per_s"] for x in runs[name]["raypath"]]
        tb = [x["tokens_per_s"] for x in runs[name]["plain"]]
        summary["settings"][name] = {
            "raypath_tokens_per_s": _stats(ta), "plain_tokens_per_s": _stats(tb),
            "ratio": _stats([x / y for x, y in zip(ta, tb)]),
            "raypath_mfu": mfu(statistics.median(ta), fpt, peak), "plain_mfu": mfu(statistics.median(tb), fpt, peak),
            "raypath_peak_memory_gb": _stats([x["peak_memory_gb"] for x in runs[name]["raypath"]]),
            "plain_peak_memory_gb": _stats([x["peak_memory_gb"] for x in runs[name]["plain"]]),
            "plain_step_memory_gb": _stats([x["step_memory_gb"] for x in runs[name]["plain"]]),
            "raypath_data_wait_share": statistics.median(x["data_wait_share"] or 0.0 for x in runs[name]["raypath"]),
            "final_loss": {"raypath": _stats([x["loss"] for x in runs[name]["raypath"]]),
                           "plain": _stats([x["loss"] for x in runs[name]["plain"]])},
            "plain_profile": runs[name]["plain"][0]["profile"],
        }
    if "chunked" in settings and "full" in settings:
        # Per repeat, same loop: the chunked loss against the full logits.
        ratios: dict = {}
        for loop in ("raypath", "plain"):
            c, f = runs["chunked"][loop], runs["full"][loop]
            ratios[f"{loop}_tokens_per_s"] = _stats([ratio(x["tokens_per_s"], y["tokens_per_s"]) for x, y in zip(c, f)])
            ratios[f"{loop}_peak_memory"] = _stats([ratio(x["peak_memory_gb"], y["peak_memory_gb"]) for x, y in zip(c, f)])
        if args.device == "cpu":
            c, f = runs["chunked"]["plain"], runs["full"]["plain"]
            ratios["plain_step_memory"] = _stats([ratio(x["step_memory_gb"], y["step_memory_gb"]) for x, y in zip(c, f)])
        summary["chunked_vs_full"] = ratios
    return summary


def _bench_plain_synthetic(path: str, args, cfg, cfgs: dict, steps: int) -> dict:
    """``--data synthetic``: the plain loop alone on random tokens, no Ray, no prepared data.

    For the loss settings' own cost (tokens/s, memory of a training step) where
    a Ray cluster cannot run; threads = ``train.cpus_per_worker``, as Ray would give.
    """
    from raypath.perf import ratio

    t = cfg.train
    threads = max(1, int(t.cpus_per_worker))
    vocab = cfg.data.vocab_size
    runs: dict[str, list[dict]] = {name: [] for name in cfgs}
    for r in range(args.repeats):
        for name, c in cfgs.items():
            b = run_plain_fresh(None, c, vocab, 0, None, steps, args.device, threads, args.profile if r == 0 else 0)
            runs[name].append(b)
            print(f"{Path(path).stem} repeat {r + 1}/{args.repeats} {name:>7}: plain {b['tokens_per_s']:,.0f} tok/s, "
                  f"peak {b['peak_memory_gb']:.3f} GB, step {b['step_memory_gb'] or 0:.3f} GB", flush=True)
    info = runs[next(iter(runs))][0]
    summary: dict = {
        "config": path, "overrides": args.set, "data": "synthetic", "device": info["device"], "params": info["params"],
        "seq_len": cfg.data.seq_len, "vocab_size": vocab, "global_batch": t.global_batch_size,
        "micro_batch": t.micro_batch_size, "precision": t.precision, "compile": t.compile,
        "loss_chunk_tokens": t.loss_chunk_tokens, "steps": steps, "repeats": args.repeats, "worker_threads": threads,
        "settings": {name: {
            "plain_tokens_per_s": _stats([x["tokens_per_s"] for x in rs]),
            "plain_peak_memory_gb": _stats([x["peak_memory_gb"] for x in rs]),
            "plain_step_memory_gb": _stats([x["step_memory_gb"] for x in rs]),
            "final_loss": _stats([x["loss"] for x in rs]), "plain_profile": rs[0]["profile"]}
            for name, rs in runs.items()},
    }
    if "chunked" in runs and "full" in runs:
        c, f = runs["chunked"], runs["full"]
        summary["chunked_vs_full"] = {
            "plain_tokens_per_s": _stats([ratio(x["tokens_per_s"], y["tokens_per_s"]) for x, y in zip(c, f)]),
            "plain_peak_memory": _stats([ratio(x["peak_memory_gb"], y["peak_memory_gb"]) for x, y in zip(c, f)]),
            "plain_step_memory": _stats([ratio(x["step_memory_gb"], y["step_memory_gb"]) for x, y in zip(c, f)])
            if args.device == "cpu" else None,
        }
    return summary


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "-"


def _table(summary: dict) -> str:

    lines = [f"{summary['config']} ({summary['device']}, {summary['params'] / 1e6:.1f}M params):",
             f"  {'setting':>8} {'raypath tok/s':>14} {'plain tok/s':>12} {'ratio':>6} {'MFU r/p':>13} "
             f"{'peak GB r/p':>13}"]
    if summary.get("data") == "synthetic":
        for name, s in summary["settings"].items():
            lines.append(f"  {name:>8} plain {s['plain_tokens_per_s']['median']:,.0f} tok/s, peak "
                         f"{s['plain_peak_memory_gb']['median']:.3f} GB")
    for name, s in ({} if summary.get("data") == "synthetic" else summary["settings"]).items():
        lines.append(f"  {name:>8} {s['raypath_tokens_per_s']['median']:>14,.0f} {s['plain_tokens_per_s']['median']:>12,.0f} "
                     f"{s['ratio']['median']:>6.3f} {_pct(s['raypath_mfu']):>6}/{_pct(s['plain_mfu']):<6} "
                     f"{s['raypath_peak_memory_gb']['median']:>6.2f}/{s['plain_peak_memory_gb']['median']:<6.2f}")
    for name, s in summary["settings"].items():
        lines += _profile_lines(name, s.get("plain_profile"))
    for name, err in summary.get("errors", {}).items():
        lines.append(f"  {name:>8} FAILED: {err.splitlines()[0][:200]}")
    cvf = summary.get("chunked_vs_full")
    if cvf:
        lines.append("  chunked / full: " + ", ".join(f"{k} {v['median']:.3f}" for k, v in cvf.items() if v))
    return "\n".join(lines)


def _profile_lines(name: str, prof: dict | None) -> list[str]:
    if not prof:
        return []
    kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in prof["kinds_ms"].items())
    lines = [f"  {name} plain loop, profiled ({prof['steps']} steps): {prof['step_ms']:.1f} ms/step, device busy "
             f"{prof['busy_ms']:.1f} ms ({prof['busy_ms'] / prof['step_ms']:.0%}): {kinds}"]
    lines += [f"    {k['ms']:7.2f} ms {k['calls']:5.0f}x  {k['kind']:<17} {k['name'][:70]}" for k in prof["top"][:10]]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=None,
                   help="config to benchmark; repeat for several (default: configs/quickstart.yaml)")
    p.add_argument("--set", action="append", default=[], help="config override key.sub=value (every config)")
    p.add_argument("--kernels", default=None,
                   help="comma-separated settings among chunked, full, liger (default: chunked,full and, "
                        "on CUDA with liger-kernel installed, liger)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 6 x log_every, fewer if the stream is shorter)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every (setting, loop) run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--version", default=None, help="version whose stream to train on (default: the largest)")
    p.add_argument("--out", default=None, help="also write the summaries to this JSON file")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile this many more steps of the plain loop (first repeat, each setting): ms per step "
                        "by kind (matmul, attention, compiled, optimizer...), device busy share, top kernels")
    p.add_argument("--data", choices=["stream", "synthetic"], default="stream",
                   help="synthetic: only the plain loop, on random tokens, without Ray or a prepared run "
                        "(the loss settings' own cost where no Ray cluster can run)")
    args = p.parse_args()

    import logging

    from raypath.cluster import init_ray
    from raypath.config import load_config

    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.kernels:
        settings = args.kernels.split(",")
        unknown = [k for k in settings if k not in SETTINGS]
        if unknown:
            raise SystemExit(f"--kernels: unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    else:
        settings = ["chunked", "full"]
        if args.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
            settings.append("liger")
        elif args.device == "cuda":
            print("liger: skipped, liger-kernel is not installed (pip install 'raypath[liger]')", flush=True)
    paths = args.config or ["configs/quickstart.yaml"]
    args.local_cluster = False
    if args.data == "stream":
        cluster = load_config(paths[0], args.set).cluster
        args.local_cluster = init_ray(cluster.address, cluster.num_cpus)
    summaries = [bench_config(path, args, settings) for path in paths]
    print(json.dumps(summaries, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summaries, indent=2))
    target = 0.97 if args.device == "cuda" else 0.95
    for s in summaries:
        print(_table(s))
    print(f"targets: raypath/plain >= {target}; chunked/full tokens/s >= 0.95")


if __name__ == "__main__":
    main()
