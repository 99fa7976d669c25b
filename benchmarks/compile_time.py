"""What ``train.compile`` costs at start-up, and what it buys per step: the whole model
traced as one graph (``torch.compile(model)``) against raypath's per-block compile
(:func:`raypath.model.compile_blocks`: one graph shared by every decoder block, plus the loss).

Each (mode, cache) run is a fresh process building the config's model and loss
(``install_loss``), timing its first optimizer step (trace + compile + run) and the mean
of the next ``--steps`` steps, on synthetic tokens. ``cold`` starts with an empty Inductor
cache directory; ``warm`` runs again with the cache the cold run of the same mode left
(as every segment and sweep trial after the first on a node does). Trace and compile
time grow with the number of graphs' ops: with the whole model, with its layer count.

    python benchmarks/compile_time.py --config configs/quickstart.yaml --set model.num_layers=12
    python benchmarks/compile_time.py --config configs/llama-125m.yaml --device cuda
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


def _run(path: str, overrides: list[str], device: str, mode: str, steps: int, cache_dir: str,
         backend: str = "inductor") -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch._inductor reads it
    if backend != "inductor":  # this process only: compile_blocks calls torch.compile
        torch.compile = functools.partial(torch.compile, backend=backend)
    from raypath.config import load_config
    from raypath.loss import install_loss
    from raypath.model import block_loss, build_model, compile_blocks

    cfg = load_config(path, overrides)
    t, dev = cfg.train, torch.device(device)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.data.vocab_size, 0)
    install_loss(model, t, dev)
    model.to(dev)
    fwd = torch.compile(model) if mode == "model" else model
    if mode == "blocks":
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.max_lr, fused=dev.type == "cuda")
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if t.precision == "bf16" else contextlib.nullcontext
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
    return {"mode": mode, "first_step_s": t1 - t0, "step_ms": (t2 - t1) / steps * 1e3,
            "first_loss": first_loss, "last_loss": last_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="steps timed after the first")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend; aot_eager measures tracing alone (no code generation)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    results = []
    ctx = multiprocessing.get_context("spawn")  # a fresh process: nothing traced or cached in memory
    for mode in ("model", "blocks"):
        with tempfile.TemporaryDirectory(prefix=f"inductor-{mode}-") as cache:
            for cache_state in ("cold", "warm"):
                with ctx.Pool(1) as pool:
                    r = pool.apply(_run, (args.config, args.set, args.device, mode, args.steps, cache, args.backend))
                r["cache"] = cache_state
                results.append(r)
                print(f"{mode:>6} compile, {cache_state} cache: first step {r['first_step_s']:6.1f} s, "
                      f"then {r['step_ms']:8.1f} ms/step (loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})",
                      flush=True)
    by = {(r["mode"], r["cache"]): r for r in results}
    for cache_state in ("cold", "warm"):
        whole, blocks = by[("model", cache_state)], by[("blocks", cache_state)]
        first = blocks["first_step_s"] / whole["first_step_s"]
        print(f"{cache_state}: per-block / whole-model first step {first:.2f}x, "
              f"step time {blocks['step_ms'] / whole['step_ms']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.set, "device": args.device,
                                              "backend": args.backend, "results": results}, indent=2))


if __name__ == "__main__":
    main()
