"""Is the main path as fast as plain PyTorch? raypath on Ray Train vs a minimal loop.

Runs the same model, the same token blocks, the same batch sizes and the same
number of optimizer steps through:

* (a) raypath: a real main-path segment (``raypath.loop.fit_segment``: Ray
  Train worker, Ray Data stream, the loop with its metrics and checkpoints);
  tokens/s is read from the segment's metric curve;
* (b) plain: one process, a hand-written PyTorch loop over the same rows of
  the version's ``stream.parquet`` (read with pyarrow), same AdamW settings,
  precision, compile and gradient accumulation, and as many threads as a Ray
  Train worker gets (Ray sets ``OMP_NUM_THREADS`` to the worker's CPUs; checked
  in a Ray task reserving ``train.cpus_per_worker``).

Both measure steady state: the first ``log_every`` steps (start-up, compile)
are excluded, and so is the time of raypath's checkpoints (the plain loop
writes none). Repeats interleave (a) and (b), since a shared machine's load
drifts; the summary gives medians and the min-max spread.

    python benchmarks/train_throughput.py --config configs/quickstart.yaml --repeats 5
    # on a CUDA machine (one GPU), the ~125M-parameter Llama at seq 1024, bf16, compiled:
    python benchmarks/train_throughput.py --config configs/llama-125m.yaml --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


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
    from raypath.loop import Segment, fit_segment
    from raypath.report import read_curve
    from raypath.schedules import MainPath

    t = cfg.train
    name = f"bench-{time.monotonic_ns()}"
    seg = Segment(**{**ctx.segment_fields(name), "storage": str(workdir / "ray" / name),
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
    return {"tokens_per_s": _steady(windows), "windows": len(windows), "wall_s": wall,
            "mfu": last.get("mfu"), "data_wait_share": last.get("data_wait_share")}


def run_plain(stream_path: str, cfg, vocab: int, eos: int, pad, steps: int, device: str, threads: int) -> dict:
    """(b): the same steps as a minimal single-process PyTorch loop."""
    import pyarrow.parquet as pq
    import torch.nn.functional as F

    from raypath.model import build_model

    t, seq = cfg.train, cfg.data.seq_len
    torch.set_num_threads(threads)
    torch.manual_seed(t.seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    table = pq.read_table(stream_path, columns=["idx", "tokens"]).sort_by("idx")
    n = steps * t.global_batch_size
    col = table.column("tokens").combine_chunks().slice(0, n)
    blocks = torch.from_numpy(col.flatten().to_numpy().reshape(n, -1).astype("int64"))

    model = build_model(cfg.model, vocab, eos, pad, seq).to(dev)
    if t.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=t.max_lr, betas=tuple(t.betas), fused=dev.type == "cuda")
    fwd = torch.compile(model) if t.compile else model
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if t.precision == "bf16" else contextlib.nullcontext
    micro, accum = t.micro_batch_size, t.global_batch_size // t.micro_batch_size
    model.train()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    windows, t_last, loss_sum = [], time.perf_counter(), torch.zeros((), device=dev)
    for step in range(steps):
        lr = t.max_lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.max_lr
        for g in opt.param_groups:
            g["lr"] = lr
        for i in range(accum):
            start = (step * accum + i) * micro
            x = blocks[start:start + micro].to(dev, non_blocking=True)
            with amp():
                logits = fwd(input_ids=x[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)) / accum
            loss.backward()
            loss_sum += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            loss_sum.item()  # the loop reads its loss at log steps, like raypath
            sync()
            now = time.perf_counter()
            k = (step + 1) - (len(windows) * t.log_every)
            tokens = k * t.global_batch_size * seq
            windows.append((tokens, tokens / (now - t_last)))
            t_last = now
    return {"tokens_per_s": _steady(windows), "windows": len(windows), "model": model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key.sub=value")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: 6 x log_every, fewer if the stream is shorter)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved (a), (b) pairs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--version", default=None, help="version whose stream to train on (default: the largest)")
    args = p.parse_args()

    import logging

    from raypath.cluster import init_ray
    from raypath.config import load_config
    from raypath.perf import device_peak_flops, flops_per_token, mfu
    from raypath.run import prepare

    logging.basicConfig(level=logging.WARNING)
    # Its own run directory (prepared once, reused), eval only at the end of the segment.
    overrides = [f"run_dir=runs/bench-{Path(args.config).stem}", *args.set, "train.eval_every=0"]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        overrides.append("train.use_gpu=true")
    cfg = load_config(args.config, overrides)
    t = cfg.train
    if t.num_workers != 1:
        cfg = replace(cfg, train=replace(t, num_workers=1, min_workers=0))  # (b) is one process
        t = cfg.train
    steps = args.steps or 6 * t.log_every
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    ctx = prepare(cfg)  # idempotent: reuses a prepared run directory
    version = max(ctx.versions, key=lambda v: v["stream_rows"]) if not args.version else \
        next(v for v in ctx.versions if v["name"] == args.version)
    available = version["stream_rows"] // t.global_batch_size
    if not args.steps and available < steps:
        # The embedded corpus caps each version (~1M tokens at seq 1024): fewer, still steady-state steps.
        print(f"{version['name']} holds {available} steps of data; running {available}, not {steps}", flush=True)
        steps = available
    if steps < 2 * t.log_every or version["stream_rows"] < steps * t.global_batch_size:
        raise SystemExit(f"{version['name']} has {version['stream_rows']} blocks, {steps} steps need "
                         f"{steps * t.global_batch_size} (and two log windows, {2 * t.log_every} steps): "
                         "use fewer --steps, a smaller train.log_every, or more data")
    threads = worker_threads(t.cpus_per_worker)

    workdir = Path(tempfile.mkdtemp(prefix="train_throughput-"))
    a_runs, b_runs, fpt, peak, n_params, dev_name = [], [], None, None, None, "cpu"
    try:
        for r in range(args.repeats):
            a = run_raypath(ctx, version, cfg, steps, workdir)
            b = run_plain(version["stream_path"], cfg, ctx.vocab_size, ctx.eos_id, ctx.pad_id, steps,
                          args.device, threads)
            model = b.pop("model")
            if fpt is None:
                fpt = flops_per_token(model.config, cfg.data.seq_len)
                n_params = sum(p.numel() for p in model.parameters())
                dev = next(model.parameters()).device
                peak = device_peak_flops(dev, t.peak_flops)
                dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{threads} threads"
            del model
            a_runs.append(a)
            b_runs.append(b)
            print(f"repeat {r + 1}/{args.repeats}: raypath {a['tokens_per_s']:,.0f} tok/s, "
                  f"plain {b['tokens_per_s']:,.0f} tok/s, ratio {a['tokens_per_s'] / b['tokens_per_s']:.3f}",
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ta = [x["tokens_per_s"] for x in a_runs]
    tb = [x["tokens_per_s"] for x in b_runs]
    ratios = [x / y for x, y in zip(ta, tb)]
    summary = {
        "config": args.config, "overrides": args.set, "device": dev_name, "params": n_params,
        "seq_len": cfg.data.seq_len, "global_batch": t.global_batch_size, "micro_batch": t.micro_batch_size,
        "precision": t.precision, "compile": t.compile, "steps": steps, "repeats": args.repeats,
        "worker_threads": threads, "flops_per_token": fpt,
        "raypath_tokens_per_s": {"median": statistics.median(ta), "min": min(ta), "max": max(ta)},
        "plain_tokens_per_s": {"median": statistics.median(tb), "min": min(tb), "max": max(tb)},
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "raypath_data_wait_share": statistics.median(x["data_wait_share"] or 0.0 for x in a_runs),
        "raypath_mfu": mfu(statistics.median(ta), fpt, peak),
        "plain_mfu": mfu(statistics.median(tb), fpt, peak),
        "peak_flops": peak,
    }
    print(json.dumps(summary, indent=2))
    target = 0.97 if args.device == "cuda" else 0.95
    print(f"raypath / plain = {summary['ratio']['median']:.3f} (median of {args.repeats}; "
          f"spread {summary['ratio']['min']:.3f}-{summary['ratio']['max']:.3f}; target >= {target})"
          + (f"  MFU {summary['raypath_mfu']:.1%}" if summary["raypath_mfu"] is not None else ""))


if __name__ == "__main__":
    main()
