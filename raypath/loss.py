"""The training loss: next-token cross-entropy from the LM head, three ways.

``train.kernels`` and ``train.loss_chunk_tokens`` pick how the last linear layer
(``hidden @ lm_head.weight.T``) and the cross-entropy are computed:

* ``kernels: none``, ``loss_chunk_tokens > 0`` (the default): :func:`linear_cross_entropy`,
  plain PyTorch. The ``[tokens, vocab]`` logits are never materialised: the
  tokens are taken ``loss_chunk_tokens`` at a time, and each chunk's logits live
  only while its loss and its gradients are computed. As in Liger Kernel's
  fused linear cross-entropy, the gradients of the hidden states and of the
  weight are computed *in the forward pass* (the loss is the graph's last node,
  so they only wait for the scalar ``grad_output``). Recomputing each chunk's
  logits in the backward pass instead (cut-cross-entropy's choice, or
  ``torch.utils.checkpoint`` per chunk) has the same peak: either way the
  backward holds the hidden-state gradient ``[tokens, hidden]``, the weight
  gradient ``[vocab, hidden]`` and one chunk of logits; but it costs one more
  ``tokens x hidden x vocab`` matmul (+1/3 of the head's FLOPs).
* ``kernels: none``, ``loss_chunk_tokens: 0``: the full logits, ``F.cross_entropy``
  on their fp32 copy (transformers' own path; the baseline of the benchmark).
* ``kernels: liger``: Liger Kernel's Triton RMSNorm, SwiGLU and RoPE patched into
  the model, and its fused linear cross-entropy as the loss (CUDA only; the tests
  run the same kernels on CPU in Triton's interpreter, ``tests/liger_interpreted.py``).
  Liger patches transformers' Llama module for the whole process (its RoPE
  function, RMSNorm and MLP classes), so a Llama built later in the same worker
  runs its kernels too; parameters and ``state_dict`` keys are the same either way.

The loss is installed on the model *instance* (:func:`install_loss`), as Liger
does: its ``forward(input_ids=..., targets=...)`` returns the mean loss, so the
head and the loss run inside the forward that DDP, FSDP2 and ``torch.compile``
wrap (under FSDP2 the root's parameters, LM head included, are unsharded there).
Called without ``targets`` the model is the plain transformers model; its
weights and ``state_dict`` keys never change, so checkpoints and releases stay
plain Llama weights.

Under ``train.compile`` (:func:`compile_loss`) the chunked loss compiles one chunk's work
(:func:`_chunk_loss`: its matmuls and one fused kernel for the softmax, the loss and the
logits' gradient) and loops over the chunks in Python, so the bound on memory holds
whatever Inductor's scheduler does, and one graph is compiled instead of one per chunk.

Memory: the chunked loss holds ``chunk x vocab`` logits (fp32, plus a bf16 copy
under autocast) at a time instead of ``tokens x vocab`` several times over
(bf16 logits, their fp32 copy, log-softmax, and their gradients).
"""

from __future__ import annotations

import functools
import importlib.util
import types
from typing import Callable

import torch
import torch.nn.functional as F

from raypath.config import ConfigError, TrainConfig

#: ``train.kernels`` values.
KERNELS = ("none", "liger")
#: Targets equal to this are left out of the loss (``F.cross_entropy``'s default).
IGNORE_INDEX = -100

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for the LM head here, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, inv: torch.Tensor,
                grad_w: torch.Tensor | None):
    """One chunk of :func:`_chunked`: its summed loss and, when ``grad_w`` (the fp32 ``[V, H]``
    sum over the chunks before) is given, the gradient of the mean loss w.r.t. its hidden
    states and ``grad_w`` plus its own part of the weight's. (Not added in place: compiled,
    an input mutated in place costs one more copy of ``grad_w`` per chunk.)

    The unit ``train.compile`` compiles (:func:`compile_loss`): one graph serves every chunk,
    and the Python loop around it keeps a single chunk's logits alive at a time. Compiled
    whole, the loop is unrolled into one graph and Inductor schedules all chunks' kernels
    together, free to keep several chunks' logits alive (and to compile ``tokens / chunk``
    copies of the same code).
    """
    logits = (h @ w.T).float()                      # [C, V]: the only vocab-wide tensors
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, t).squeeze(1)
    loss = ((lse - target) * keep).sum()
    if grad_w is None:
        return loss, None, None
    # d(mean loss)/d logits = (softmax - one_hot(target)) * scale, scale = 1/count (0 on ignored
    # rows): softmax * scale for every logit (one pointwise kernel under compile, in place
    # eagerly), then the target's own entries, (p - 1) * scale, written over it from fp32.
    scale = keep * inv
    g = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None]).to(h.dtype)
    g.scatter_(1, t, ((target - lse).exp() - 1).mul(scale)[:, None].to(g.dtype))
    return loss, g @ w, grad_w + g.T @ h


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
             ignore_index: int, dtype: torch.dtype, grads: bool, chunk_fn: Callable = _chunk_loss):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk`` rows at a time.

    hidden ``[T, H]``, weight ``[V, H]``, targets ``[T]``. With ``grads``, also the
    gradients of the mean loss w.r.t. hidden (``[T, H]``, hidden's dtype) and
    weight (``[V, H]``, accumulated in fp32, returned in weight's dtype).
    Matmuls run in ``dtype`` (bf16 under autocast), softmax and sums in fp32.
    ``chunk_fn``: :func:`_chunk_loss`, or it compiled.
    """
    valid = targets != ignore_index
    count = valid.sum()
    # F.cross_entropy's mean over no valid target is 0/0 = nan; so is this one.
    inv = 1.0 / count.to(torch.float32)
    w = weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    for start in range(0, hidden.size(0), chunk):
        end = min(start + chunk, hidden.size(0))
        keep = valid[start:end]
        t = targets[start:end].masked_fill(~keep, 0)[:, None]
        part, g_h, grad_w = chunk_fn(hidden[start:end].to(dtype), w, t, keep, inv, grad_w)
        loss = loss + part
        if grads:
            grad_h[start:end] = g_h
    return loss * inv, grad_h, (grad_w.to(weight.dtype) if grads else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy whose gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index, dtype, chunk_fn):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit in _chunked
            loss, grad_h, grad_w = _chunked(hidden, weight, targets, chunk, ignore_index, dtype, True, chunk_fn)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is 1/accum in training: one scaling of the stored gradients.
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int = 4096, ignore_index: int = IGNORE_INDEX,
                         chunk_fn: Callable = _chunk_loss) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` (mean over non-ignored targets),
    without ever holding more than ``chunk_tokens`` rows of logits.

    hidden ``[..., H]``, weight ``[V, H]`` (the LM head), targets ``[...]``.
    Under autocast the matmuls run in the autocast dtype, like ``lm_head(hidden)``
    would; the softmax and the loss are fp32. A weight that is a sharded DTensor
    (a module outside FSDP2's unsharded forward) is gathered first, with autograd.
    ``chunk_fn`` computes each chunk: :func:`_chunk_loss`, compiled by :func:`compile_loss`.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    dtype = _compute_dtype(weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_tokens, ignore_index, dtype, chunk_fn)
    with torch.autocast(h.device.type, enabled=False):  # eval: the loss alone, no gradients
        return _chunked(h, weight, t, chunk_tokens, ignore_index, dtype, False, chunk_fn)[0]


def full_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unchunked loss: full logits (autocast dtype), cross-entropy of their fp32 copy."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _liger_loss() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    # Eager under train.compile: the loss is Triton kernels and cuBLAS calls already, and
    # Inductor cannot trace it (torch 2.11's decomposition of the fp32-accumulating
    # ``addmm(out_dtype=...)`` Liger calls on CUDA fails: "unsupported operand type(s) for *:
    # 'torch.dtype' and 'FakeTensor'"). The decoder blocks are still compiled.
    @torch.compiler.disable
    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return flce(weight, hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1))

    return loss


def compile_loss(loss: LossFn) -> LossFn:
    """``loss`` under ``train.compile``. The chunked loss compiles its per-chunk work
    (:func:`_chunk_loss`), the full-logits loss compiles whole; Liger's stays eager."""
    if isinstance(loss, functools.partial) and loss.func is linear_cross_entropy:
        return functools.partial(loss, chunk_fn=torch.compile(_chunk_loss))
    return torch.compile(loss)


def check_kernels(kernels: str, device: torch.device | None = None, use_gpu: bool | None = None) -> None:
    """Raise a :class:`ConfigError` naming ``train.kernels`` unless the setting can run here."""
    if kernels not in KERNELS:
        raise ConfigError(f"train.kernels: must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels != "liger":
        return
    on_cpu = (device is not None and device.type != "cuda") or use_gpu is False
    if on_cpu:
        raise ConfigError("train.kernels: liger runs Triton kernels, which need CUDA: set train.use_gpu=true "
                          "on a CUDA machine, or train.kernels=none (the chunked loss in plain PyTorch)")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.kernels: liger needs the liger-kernel package: pip install 'raypath[liger]' "
                          "(or set train.kernels=none)")


def install_loss(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> None:
    """Make ``model(input_ids=..., targets=...)`` return the configured mean loss.

    Call on the transformers model before wrapping it (DDP, FSDP2, compile).
    ``kernels: liger`` also patches Liger's RMSNorm, SwiGLU and RoPE into it
    (module forwards only: same parameters, same ``state_dict``).
    """
    check_kernels(t.kernels, device)
    if t.kernels == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # The fused linear cross-entropy is called by the loss forward below, not
        # through Liger's patched LlamaForCausalLM.forward: one forward for every
        # setting, and evaluation never materialises logits either.
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False,
                                    model=model)
        loss_fn = _liger_loss()
    elif t.loss_chunk_tokens > 0:
        loss_fn = functools.partial(linear_cross_entropy, chunk_tokens=t.loss_chunk_tokens)
    else:
        loss_fn = full_cross_entropy
    model.raypath_loss = loss_fn
    model.forward = types.MethodType(_loss_forward, model)  # bound: deepcopy rebinds it to the copy


def _loss_forward(self, input_ids=None, targets=None, **kwargs):
    if targets is None:  # generation, logits: the model as transformers wrote it
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    # use_cache=False: training never decodes; a KV cache would only cost memory and time.
    hidden = self.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    return self.raypath_loss(hidden, self.lm_head.weight, targets)


def loss_installed(model: torch.nn.Module) -> bool:
    """Whether :func:`install_loss` ran on ``model`` (seen through DDP and compile wrappers)."""
    while not hasattr(model, "raypath_loss"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return False
        model = inner
    return True
