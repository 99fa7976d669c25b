"""The chunked loss (``train.loss_chunk_tokens``) eager, and under ``torch.compile`` two ways:
``whole`` compiles the loss function (the Python loop over chunks is unrolled into one
graph, ``tokens / chunk`` copies of the same code) and ``chunk`` is what ``train.compile``
does (:func:`raypath.loss.compile_loss`: one graph for one chunk's work, called once per
chunk).

Each mode runs in a fresh process with an empty Inductor cache, on the config's LM-head
shape (hidden size, vocab, one micro-batch of tokens, its chunk size and precision) with
random hidden states: the first
forward + backward (trace, compile, run), then the mean of ``--steps`` more, the peak
memory over those steps above what was in use before them (allocated GPU memory on CUDA,
resident set on CPU), the Inductor kernels the compiled modes generated, and the loss and
gradient norms (the same in every mode, to rounding). Memory per step grows with
``chunk x vocab`` (the logits of one chunk), not with the tokens.

    python benchmarks/loss_compile.py --config configs/llama-125m.yaml --device cuda
    python benchmarks/loss_compile.py --config configs/llama-125m.yaml --set model.hidden_size=384 \\
        --set train.precision=fp32 --set train.loss_chunk_tokens=2048 --tokens 16384
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch

MODES = ("eager", "whole", "chunk")


def _run(path: str, overrides: list[str], device: str, mode: str, tokens: int | None, steps: int,
         backend: str, cache_dir: str) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch._inductor reads it
    from torch._inductor import metrics

    if backend != "inductor":  # this process only: compile_loss calls torch.compile
        torch.compile = functools.partial(torch.compile, backend=backend)
    from raypath.config import load_config
    from raypath.loss import compile_loss, linear_cross_entropy
    from raypath.perf import peak_memory_bytes, reset_peak_memory

    cfg = load_config(path, overrides)
    t, dev = cfg.train, torch.device(device)
    n = tokens or t.micro_batch_size * cfg.data.seq_len
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, cfg.model.hidden_size, generator=g).to(dev).requires_grad_()
    weight = (torch.randn(cfg.data.vocab_size, cfg.model.hidden_size, generator=g) * 0.02).to(dev).requires_grad_()
    targets = torch.randint(0, cfg.data.vocab_size, (n,), generator=g).to(dev)
    loss_fn = functools.partial(linear_cross_entropy, chunk_tokens=t.loss_chunk_tokens)
    loss_fn = {"eager": loss_fn, "whole": torch.compile(loss_fn), "chunk": compile_loss(loss_fn)}[mode]
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if t.precision == "bf16" else contextlib.nullcontext

    def step() -> float:
        hidden.grad = weight.grad = None
        with amp():
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss.item()  # .item(): the step has finished on the device too

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
    step_s = (time.perf_counter() - t1) / steps
    return {"mode": mode, "tokens": n, "chunk": t.loss_chunk_tokens, "first_call_s": first, "step_ms": step_s * 1e3,
            "step_memory_gb": (peak_memory_bytes(dev) - base) / 1e9,
            "inductor_kernels": kernels, "loss": loss, "grad_hidden_norm": hidden.grad.float().norm().item(),
            "grad_weight_norm": weight.grad.float().norm().item()}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama-125m.yaml")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default: one micro-batch)")
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend; aot_eager checks the graphs' results alone (no code generation)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")  # a fresh process: nothing compiled or cached in memory
    results = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"inductor-{mode}-") as cache, ctx.Pool(1) as pool:
            r = pool.apply(_run, (args.config, args.set, args.device, mode, args.tokens, args.steps,
                                  args.backend, cache))
        results.append(r)
        print(f"{mode:>5}: first call {r['first_call_s']:6.1f} s, {r['step_ms']:8.1f} ms/step, "
              f"step memory {r['step_memory_gb']:.3f} GB, {r['inductor_kernels']} kernels, loss {r['loss']:.6f}, "
              f"|grad h| {r['grad_hidden_norm']:.6g}, |grad w| {r['grad_weight_norm']:.6g}", flush=True)
    by = {r["mode"]: r for r in results}
    if "whole" in by and "chunk" in by:
        w, c = by["whole"], by["chunk"]
        print(f"chunk / whole: first call {c['first_call_s'] / w['first_call_s']:.2f}x, "
              f"step {c['step_ms'] / w['step_ms']:.2f}x, step memory {c['step_memory_gb'] / w['step_memory_gb']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.set, "device": args.device,
                                              "backend": args.backend, "results": results}, indent=2))


if __name__ == "__main__":
    main()
