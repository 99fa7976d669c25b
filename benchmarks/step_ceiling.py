"""How fast could this device run a config's training step? Its matmuls and attention, timed alone.

For each config, every matmul of one optimizer step -- each linear layer's forward product
and its two backward products (input and weight gradient), the LM head over the loss's
chunks -- and the attention (SDPA forward + backward, causal, with each backend the device
has) are timed alone, on random inputs of the step's shapes and the config's precision.
Their sum is the time a step cannot go below with these kernels, even if everything
memory-bound (norms, RoPE, SwiGLU, the loss's softmax, the optimizer) and the host were
free. So

    MFU ceiling = flops_per_token x tokens per step / (matmul time + attention time) / peak

is what ``train_throughput.py``'s MFU is to be judged against: the gap between the two is
memory-bound work and host time, which ``train_throughput.py --profile`` splits by kind.
With ``train.kernels: liger`` the LM head is timed over the whole micro-batch (Liger's
fused loss picks its own chunks); with ``train.compile`` the q/k/v and gate/up projections
are timed as the one matmul each that the compiled blocks run (``--set train.compile=false``:
apart, as eager runs them).

    python benchmarks/step_ceiling.py --config configs/llama-125m.yaml --config configs/llama-350m.yaml --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median wall ms of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def linears(m, vocab: int, tokens: int, chunk: int, fused: bool) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per micro-batch) of every ``y = x W^T`` of a micro-batch of ``tokens``.

    The LM head runs over the loss's chunks of ``chunk`` tokens (0: all tokens at once).
    fused: q/k/v and gate/up as one matmul each, as ``train.compile`` runs them
    (:class:`raypath.model.FuseSharedInputLinears`).
    """
    hd = m.hidden_size // m.num_heads
    d, q, kv, inter = m.hidden_size, m.num_heads * hd, m.num_kv_heads * hd, m.intermediate_size
    if fused:
        layer = [("qkv", d, q + 2 * kv), ("o", q, d), ("gate+up", d, 2 * inter), ("down", inter, d)]
    else:
        layer = [("q", d, q), ("k", d, kv), ("v", d, kv), ("o", q, d), ("gate", d, inter), ("up", d, inter),
                 ("down", inter, d)]
    out = [(name, tokens, k, n, m.num_layers) for name, k, n in layer]
    chunk = min(chunk or tokens, tokens)
    out.append(("lm_head", chunk, d, vocab, tokens // chunk))
    if tokens % chunk:
        out.append(("lm_head tail", tokens % chunk, d, vocab, 1))
    return out


def time_linear(M: int, K: int, N: int, dtype, device) -> dict:
    """ms of the forward product and of the two backward ones (input and weight gradient)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, dtype=dtype, device=device, generator=g)
    w = torch.randn(N, K, dtype=dtype, device=device, generator=g)
    dy = torch.randn(M, N, dtype=dtype, device=device, generator=g)
    return {"fwd": time_ms(lambda: torch.mm(x, w.t()), device), "dx": time_ms(lambda: torch.mm(dy, w), device),
            "dw": time_ms(lambda: torch.mm(dy.t(), x), device)}


def attention_backends(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    return {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def time_attention(m, batch: int, seq: int, dtype, device: torch.device) -> dict[str, float | None]:
    """ms of one layer's causal SDPA forward + backward, per backend (None where it cannot run)
    and under ``default``, SDPA's own choice, which training uses."""
    from torch.nn.attention import sdpa_kernel

    hd = m.hidden_size // m.num_heads
    g = torch.Generator(device=device).manual_seed(0)
    # k and v with every head, as transformers' SDPA path repeats the kv heads of GQA.
    q, k, v = (torch.randn(batch, m.num_heads, seq, hd, dtype=dtype, device=device, generator=g,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, m.num_heads, seq, hd, dtype=dtype, device=device, generator=g)

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)  # not .backward(): no .grad accumulation timed

    times: dict[str, float | None] = {"default": time_ms(step, device)}
    for name, backend in attention_backends(device).items():
        try:
            with sdpa_kernel(backend):
                times[name] = time_ms(step, device)
        except RuntimeError:  # this backend does not run these inputs on this device
            times[name] = None
    return times


def ceiling(path: str, overrides: list[str], device: torch.device) -> dict:
    from raypath.config import load_config
    from raypath.perf import device_peak_flops, flops_per_token

    cfg = load_config(path, overrides)
    m, t, seq, vocab = cfg.model, cfg.train, cfg.data.seq_len, cfg.data.vocab_size
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    micro, accum = t.micro_batch_size, t.global_batch_size // t.micro_batch_size
    tokens = micro * seq
    mm, cache = [], {}
    chunk = t.loss_chunk_tokens if t.kernels == "none" else 0
    for name, M, K, N, count in linears(m, vocab, tokens, chunk, fused=t.compile):
        if (M, K, N) not in cache:
            cache[M, K, N] = time_linear(M, K, N, dtype, device)
        ms = cache[M, K, N]
        mm.append({"name": name, "M": M, "K": K, "N": N, "per_step": count * accum,
                   **{f"{k}_ms": v for k, v in ms.items()},
                   "tflops": 3 * 2 * M * K * N / (sum(ms.values()) / 1e3) / 1e12,
                   "ms_per_step": sum(ms.values()) * count * accum})
    attn = time_attention(m, micro, seq, dtype, device)
    attn_step = {k: (v * m.num_layers * accum if v is not None else None) for k, v in attn.items()}
    matmul_ms = sum(x["ms_per_step"] for x in mm)
    step_tokens = tokens * accum
    model_cfg = type("C", (), {**vars(m), "vocab_size": vocab})()
    fpt = flops_per_token(model_cfg, seq)
    peak = device_peak_flops(device, t.peak_flops)
    best_ms = matmul_ms + attn_step["default"]
    return {
        "config": path, "overrides": overrides, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": str(dtype), "tokens_per_step": step_tokens,
        "micro_batch": micro, "accumulation": accum, "seq_len": seq, "fused_projections": t.compile,
        "matmuls": mm, "matmul_ms": matmul_ms,
        "matmul_flops": sum(6 * x["M"] * x["K"] * x["N"] * x["per_step"] for x in mm),
        "attention_ms": attn_step, "flops_per_token": fpt, "peak_flops": peak, "ceiling_ms": best_ms,
        "ceiling_tokens_per_s": step_tokens / (best_ms / 1e3),
        "mfu_ceiling": fpt * step_tokens / (best_ms / 1e3) / peak if peak else None,
    }


def table(s: dict) -> str:
    lines = [f"{s['config']} ({s['device']}, {s['dtype']}, {s['tokens_per_step']:,} tokens per step = "
             f"{s['micro_batch']} x {s['seq_len']} x {s['accumulation']}, projections "
             f"{'fused' if s['fused_projections'] else 'apart'}):",
             f"  {'matmul':<13} {'M x K x N':>22} {'/step':>6} {'TFLOP/s':>8} {'ms/step':>8}"]
    for x in s["matmuls"]:
        lines.append(f"  {x['name']:<13} {x['M']:>8} x{x['K']:>6} x{x['N']:>6} {x['per_step']:>6} "
                     f"{x['tflops']:>8.1f} {x['ms_per_step']:>8.2f}")
    rate = s["matmul_flops"] / (s["matmul_ms"] / 1e3) / 1e12
    lines.append(f"  matmuls: {s['matmul_ms']:.2f} ms per step, {rate:.1f} TFLOP/s")
    lines.append("  attention fwd+bwd per step: " + ", ".join(
        f"{k} {v:.2f} ms" if v is not None else f"{k} -" for k, v in s["attention_ms"].items()))
    mfu = f", MFU ceiling {s['mfu_ceiling']:.1%}" if s["mfu_ceiling"] else ""
    lines.append(f"  ceiling: {s['ceiling_ms']:.2f} ms per step = {s['ceiling_tokens_per_s']:,.0f} tokens/s{mfu} "
                 "(matmuls + default attention; memory-bound work and the host counted free)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="config to measure; repeat for several")
    p.add_argument("--set", action="append", default=[], help="config override key.sub=value (every config)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="also write the summaries to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop sets it
    summaries = [ceiling(path, args.set, device) for path in args.config]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summaries, indent=2))
    for s in summaries:
        print(table(s))


if __name__ == "__main__":
    main()
