"""Training-speed accounting: model FLOPs per token, device peak FLOP/s, MFU.

FLOPs per trained token (forward + backward), the PaLM / Chinchilla convention
(Chowdhery et al. 2022, appendix B; Hoffmann et al. 2022, appendix F)::

    flops_per_token = 6 * N + 12 * L * d_attn * S

* ``N``: parameters that take part in a matmul for every token: all decoder
  weights (attention q/k/v/o, SwiGLU gate/up/down, norms) plus the LM head
  (``vocab * hidden``, counted once whether or not it is tied to the input
  embedding). The input-embedding lookup is a gather, not a matmul: excluded.
  Each matmul parameter costs 2 FLOPs forward and 4 backward: ``6 * N``.
* ``12 * L * d_attn * S``: attention scores and the weighted sum of values
  (``QK^T`` and ``AV``, 2 matmuls x 2 FLOPs x ``d_attn`` x ``S`` per token and
  layer, x3 for forward + backward), with ``d_attn = heads * head_dim`` and
  ``S`` the sequence length. As in PaLM it counts the full ``S x S`` score
  matrix, not the causal half, so MFU numbers compare with published ones.

Activation checkpointing re-runs forwards, but MFU counts *model* FLOPs (not
hardware FLOPs): the recompute is overhead, so it lowers MFU, as it should.

``MFU = tokens/s per device * flops_per_token / peak FLOP/s per device``.
"""

from __future__ import annotations

from typing import Any

import torch

#: Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, from the vendors'
#: datasheets, matched against ``torch.cuda.get_device_name()`` (first match
#: wins, so the more specific names come first). ``train.peak_flops`` overrides.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),    # the PCIe card: lower clocks than the SXM H200
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),        # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),        # fp16 (V100 has no bf16)
    ("T4", 65e12),           # fp16
)


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def matmul_params(cfg: Any) -> int:
    """``N`` of the formula for a Llama-family config.

    ``cfg`` is a :class:`raypath.config.ModelConfig` plus ``vocab_size`` attribute,
    or a transformers ``LlamaConfig`` (what a ``model.path`` checkpoint has).
    """
    d = _get(cfg, "hidden_size")
    layers = _get(cfg, "num_hidden_layers", "num_layers")
    heads = _get(cfg, "num_attention_heads", "num_heads")
    kv = _get(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    head_dim = _get(cfg, "head_dim", default=d // heads)
    inter = _get(cfg, "intermediate_size")
    vocab = _get(cfg, "vocab_size")
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2   # q, o + k, v
    mlp = 3 * d * inter                                       # gate, up, down
    norms = 2 * d
    return layers * (attn + mlp + norms) + d + vocab * d      # + final norm + LM head


def flops_per_token(cfg: Any, seq_len: int) -> float:
    """Model FLOPs (forward + backward) per trained token; see the module docstring."""
    d = _get(cfg, "hidden_size")
    layers = _get(cfg, "num_hidden_layers", "num_layers")
    heads = _get(cfg, "num_attention_heads", "num_heads")
    head_dim = _get(cfg, "head_dim", default=d // heads)
    return 6.0 * matmul_params(cfg) + 12.0 * layers * heads * head_dim * seq_len


def lookup_peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else the table for CUDA GPUs, else None (CPU)."""
    if override:
        return float(override)
    if device.type == "cuda" and torch.cuda.is_available():
        return lookup_peak_flops(torch.cuda.get_device_name(device))
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark of this process's memory since it started or since
    :func:`reset_peak_memory`: allocated GPU memory on CUDA (``torch.cuda.max_memory_allocated``),
    else the peak resident set size (Linux's ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory_bytes` afresh from the memory in use now (CUDA; Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (proc(5))
            f.write("5")
    except OSError:
        pass


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is unknown or ``b`` is not positive: a CPU step's memory
    above the resident set it started from can measure 0 bytes (pages already mapped)."""
    return a / b if a is not None and b is not None and b > 0 else None


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None where the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_tok / peak
