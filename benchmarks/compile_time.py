"""What ``train.compile``'s choices cost at start-up and buy per step, two parts:

``--part model`` (default), modes: ``model``, the whole model traced as one graph
(``torch.compile(model)``); ``blocks``, raypath's per-block compile
(:func:`raypath.model.compile_blocks`: one graph shared by every decoder block, plus the
loss), what ``train.compile`` does; ``unfused``, the same without fusing the projections
that share an input (q/k/v, gate/up: :class:`raypath.model.FuseSharedInputLinears`). Each
(mode, cache) run builds the config's model and loss (``install_loss``) and times its first
optimizer step (trace + compile + run) and the mean of the next ``--steps`` steps, on
synthetic tokens (tokens/s and, where the device's peak is known, MFU). ``cold`` starts with
an empty Inductor cache directory; ``warm`` runs again with the cache the cold run of the
same mode left (as every segment and sweep trial after the first on a node does). Trace and
compile time grow with the number of graphs' ops: with the whole model, with its layer count.

``--part loss``: the chunked loss (``train.loss_chunk_tokens``) alone on the config's LM-head
shape (hidden size, vocab, one micro-batch of tokens or ``--tokens``, its chunk size and
precision), random hidden states: ``eager``; ``whole``, ``torch.compile`` of the loss
function (its loop over the chunks unrolled into one graph, ``tokens / chunk`` copies of the
same code); ``chunk``, :func:`raypath.loss.compile_loss`, what ``train.compile`` does (one
graph for one chunk's work, called once per chunk). Each mode starts cold and reports the
first forward + backward, the mean step, the peak memory of the steps above what was in use
before them (allocated GPU memory on CUDA, resident set on CPU; it grows with
``chunk x vocab``, not with the tokens), the Inductor kernels generated, and the loss and
gradient norms (the same in every mode, to rounding).

Every run is a fresh process.

    python benchmarks/compile_time.py --config configs/quickstart.yaml --set model.num_layers=12
    python benchmarks/compile_time.py --config configs/llama-125m.yaml --device cuda --modes blocks,unfused \
        --caches cold
    python benchmarks/compile_time.py --part loss --config configs/llama-125m.yaml --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL_MODES = ("model", "blocks")  # the default; "unfused" on request
LOSS_MODES = ("eager", "whole", "chunk")


def _setup(path: str, overrides: list[str], device: str, cache_dir: str, backend: str):
    """In the fresh process: the Inductor cache and backend, then the config, device and autocast."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch._inductor reads it
    from raypath.config import load_config
    from raypath.model import with_pre_grad_passes

    if backend != "inductor":  # this process only: compile_blocks and compile_loss call torch.compile
        torch.compile = functools.partial(torch.compile, backend=with_pre_grad_passes(backend))

    cfg = load_config(path, overrides)
    dev = torch.device(device)
    bf16 = cfg.train.precision == "bf16"
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return cfg, dev, amp


def _run_model(path: str, overrides: list[str], device: str, mode: str, steps: int, cache_dir: str,
               backend: str) -> dict:
    from raypath.loss import install_loss
    from raypath.model import block_loss, build_model, compile_blocks
    from raypath.perf import device_peak_flops, flops_per_token, mfu

    cfg, dev, amp = _setup(path, overrides, device, cache_dir, backend)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.data.vocab_size, 0)
    install_loss(model, t, dev)
    model.to(dev)
    fwd = torch.compile(model) if mode == "model" else model
    if mode in ("blocks", "unfused"):
        compile_blocks(model, fuse_linears=mode == "blocks")
    opt = torch.optim.AdamW(model.parameters(), lr=t.max_lr, fused=dev.type == "cuda")
    blocks = torch.randint(0, cfg.data.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(1)).to(dev)

    def step() -> float:
        with amp():
            loss = block_loss(fwd, blocks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item(): the step has finished on the device too

    t0 = time.perf_counter()
    first_loss = step()
    t1 = time.perf_counter()
    for _ in range(steps):
        last_loss = step()
    t2 = time.perf_counter()
    tokens_per_s = steps * t.micro_batch_size * cfg.data.seq_len / (t2 - t1)  # trained tokens, as train_throughput
    fpt = flops_per_token(type("C", (), {**vars(cfg.model), "vocab_size": cfg.data.vocab_size})(), cfg.data.seq_len)
    return {"mode": mode, "first_step_s": t1 - t0, "step_ms": (t2 - t1) / steps * 1e3,
            "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, fpt, device_peak_flops(dev, t.peak_flops)),
            "first_loss": first_loss, "last_loss": last_loss}


def _run_loss(path: str, overrides: list[str], device: str, mode: str, steps: int, cache_dir: str,
              backend: str, tokens: int | None) -> dict:
    from torch._inductor import metrics

    from raypath.loss import compile_loss, linear_cross_entropy
    from raypath.perf import peak_memory_bytes, reset_peak_memory

    cfg, dev, amp = _setup(path, overrides, device, cache_dir, backend)
    n, chunk = tokens or cfg.train.micro_batch_size * cfg.data.seq_len, cfg.train.loss_chunk_tokens
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, cfg.model.hidden_size, generator=g).to(dev).requires_grad_()
    weight = (torch.randn(cfg.data.vocab_size, cfg.model.hidden_size, generator=g) * 0.02).to(dev).requires_grad_()
    targets = torch.randint(0, cfg.data.vocab_size, (n,), generator=g).to(dev)
    loss_fn = functools.partial(linear_cross_entropy, chunk_tokens=chunk)
    loss_fn = {"eager": loss_fn, "whole": torch.compile(loss_fn), "chunk": compile_loss(loss_fn)}[mode]

    def step() -> float:
        hidden.grad = weight.grad = None
        with amp():
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss.item()

    metrics.reset()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    kernels = metrics.generated_kernel_count
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss()  # in use now: inputs, grads
    reset_peak_memory(dev)
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    step_ms = (time.perf_counter() - t1) / steps * 1e3
    return {"mode": mode, "tokens": n, "chunk": chunk, "first_call_s": first, "step_ms": step_ms,
            "step_memory_gb": (peak_memory_bytes(dev) - base) / 1e9,
            "inductor_kernels": kernels, "loss": loss, "grad_hidden_norm": hidden.grad.float().norm().item(),
            "grad_weight_norm": weight.grad.float().norm().item()}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _fresh(fn, *args) -> dict:
    """``fn(*args)`` in a fresh process: nothing traced or cached in memory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _model_part(args) -> list[dict]:
    results = []
    caches = args.caches.split(",")
    for mode in (args.modes or ",".join(MODEL_MODES)).split(","):
        with tempfile.TemporaryDirectory(prefix=f"inductor-{mode}-") as cache:
            for cache_state in caches:
                r = _fresh(_run_model, args.config, args.set, args.device, mode, args.steps, cache, args.backend)
                r["cache"] = cache_state
                results.append(r)
                mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
                print(f"{mode:>7} compile, {cache_state} cache: first step {r['first_step_s']:6.1f} s, "
                      f"then {r['step_ms']:8.1f} ms/step = {r['tokens_per_s']:,.0f} tokens/s{mfu} "
                      f"(loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})", flush=True)
    def mean(mode: str, cache_state: str, key: str) -> float:  # over a mode's repeats (--modes blocks,blocks)
        return statistics.mean(r[key] for r in results if (r["mode"], r["cache"]) == (mode, cache_state))

    ran = {(r["mode"], r["cache"]) for r in results}
    for cache_state in caches:
        for a, b, what in (("blocks", "model", "per-block / whole-model"), ("blocks", "unfused", "fused / unfused")):
            if (a, cache_state) in ran and (b, cache_state) in ran:
                print(f"{cache_state}: {what} first step "
                      f"{mean(a, cache_state, 'first_step_s') / mean(b, cache_state, 'first_step_s'):.2f}x, "
                      f"step time {mean(a, cache_state, 'step_ms') / mean(b, cache_state, 'step_ms'):.2f}x")
    return results


def _loss_part(args) -> list[dict]:
    from raypath.perf import ratio

    results = []
    for mode in (args.modes or ",".join(LOSS_MODES)).split(","):
        with tempfile.TemporaryDirectory(prefix=f"inductor-{mode}-") as cache:
            r = _fresh(_run_loss, args.config, args.set, args.device, mode, args.steps, cache, args.backend,
                       args.tokens)
        results.append(r)
        print(f"{mode:>5}: first call {r['first_call_s']:6.1f} s, {r['step_ms']:8.1f} ms/step, "
              f"step memory {r['step_memory_gb']:.3f} GB, {r['inductor_kernels']} kernels, loss {r['loss']:.6f}, "
              f"|grad h| {r['grad_hidden_norm']:.6g}, |grad w| {r['grad_weight_norm']:.6g}", flush=True)
    by = {r["mode"]: r for r in results}
    if "whole" in by and "chunk" in by:
        w, c = by["whole"], by["chunk"]
        print("chunk / whole: " + ", ".join(
            f"{what} " + (f"{r:.2f}x" if (r := ratio(c[key], w[key])) is not None else "n/a (0 measured)")
            for what, key in (("first call", "first_call_s"), ("step", "step_ms"), ("step memory", "step_memory_gb"))))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("model", "loss"), default="model")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="steps timed after the first")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend; aot_eager measures tracing alone (no code generation)")
    p.add_argument("--modes", default=None,
                   help=f"the modes, in order (repeatable); --part model: of model, blocks, unfused (default "
                        f"{','.join(MODEL_MODES)}), --part loss: of {', '.join(LOSS_MODES)} (default all)")
    p.add_argument("--caches", default="cold,warm", choices=("cold", "cold,warm"),
                   help="--part model: a cold run per mode, or a cold then a warm one")
    p.add_argument("--tokens", type=int, default=None, help="--part loss: tokens per step (default: a micro-batch)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    results = _model_part(args) if args.part == "model" else _loss_part(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"part": args.part, "config": args.config, "overrides": args.set,
                                              "device": args.device, "backend": args.backend, "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
