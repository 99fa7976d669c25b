"""``train.kernels: liger`` on CPU, Liger's real Triton kernels run by Triton's interpreter.

Run as a script (``python tests/liger_interpreted.py``) by
``tests/test_loss.py::test_liger_kernels_in_tritons_interpreter_match_the_chunked_loss``:
``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` runs, and the shims
below must not leak into the test session. Prints one JSON object of measurements;
the test asserts on them.

Two shims close gaps of the interpreter (not of Liger, whose kernels compile on CUDA):

* a Python ``float`` kernel argument stays a ``float`` in the interpreter, where
  compiled Triton passes an fp32 scalar, so Liger's ``eps.to(tl.float32)`` fails:
  floats are wrapped as fp32 scalars, as the compiler does;
* libdevice's ``rsqrt`` (an extern) has no interpreted implementation: RMSNorm's
  kernel gets ``1 / sqrt(x)``.

``raypath.loss.check_kernels`` refuses liger on CPU (rightly: compiled kernels need
CUDA); here it is bypassed so that the rest of raypath's liger path runs as is.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
_cvt = interp._implicit_cvt


def _implicit_cvt(arg):
    if isinstance(arg, float):
        return tl.tensor(interp.TensorHandle(np.array([arg], np.float32), tl.float32), tl.float32)
    return _cvt(arg)


@triton.jit
def _rsqrt(x):
    return 1.0 / tl.sqrt(x)


LAUNCHED: set[str] = set()
_run = interp.GridExecutor.__call__


def _record(self, *args, **kwargs):
    LAUNCHED.add(self.fn.__name__)
    return _run(self, *args, **kwargs)


interp._implicit_cvt = _implicit_cvt
interp.GridExecutor.__call__ = _record

import liger_kernel.ops.rms_norm  # noqa: E402

liger_kernel.ops.rms_norm.rsqrt = _rsqrt

import raypath.loss  # noqa: E402
from raypath.loss import loss_installed  # noqa: E402

raypath.loss.check_kernels = lambda *a, **k: None

import test_loss as tl_  # noqa: E402  (the tiny model, blocks and segments of tests/test_loss.py)


def _reference(tie: bool, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The chunked loss's numbers, computed before Liger patches transformers' Llama module
    (it replaces its RoPE function and RMSNorm/MLP classes process-wide, not only the model's)."""
    plain = tl_._model(tie)
    chunked = tl_._installed(tl_._model(tie), loss_chunk_tokens=7)
    with torch.no_grad():
        logits = plain(input_ids=x, use_cache=False).logits
        eval_loss = chunked(input_ids=x, targets=y).item()
    loss = chunked(input_ids=x, targets=y)
    loss.backward()
    return {"state": {k: v.clone() for k, v in plain.state_dict().items()}, "logits": logits,
            "eval_loss": eval_loss, "loss": loss.item(), "grads": dict(chunked.named_parameters())}


def _grad_error(model: torch.nn.Module, ref: dict) -> float:
    """Largest |grad - ref grad| over every parameter, relative to that parameter's largest |ref grad|."""
    return max(((p.grad - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
               for n, p in model.named_parameters())


def main() -> dict:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    blocks = tl_._blocks()
    x, y = blocks[:, :-1], blocks[:, 1:]
    refs = {tie: _reference(tie, x, y) for tie in (True, False)}
    # Two optimizer steps through the loop's own build (install_loss, AdamW, clipping, accumulation):
    # the second step's loss is the first update's result (each step costs ~10 s interpreted).
    _, chunked_step2 = tl_._step(tl_._segment(loss_chunk_tokens=7), steps=2)

    out: dict = {}
    for tie, ref in refs.items():
        liger = tl_._installed(tl_._model(tie), kernels="liger")
        with torch.no_grad():
            logits = (liger(input_ids=x).logits - ref["logits"]).abs().max().item()
            eval_loss = liger(input_ids=x, targets=y).item()
        LAUNCHED.clear()
        loss = liger(input_ids=x, targets=y)
        loss.backward()
        state = liger.state_dict()
        out[f"tie={tie}"] = {
            "kernels": sorted(LAUNCHED),
            "plain_class": type(liger) is LlamaForCausalLM,
            "same_state": state.keys() == ref["state"].keys()
            and all(torch.equal(state[k], v) for k, v in ref["state"].items()),
            "loss": [loss.item(), ref["loss"]],
            "eval_loss": [eval_loss, ref["eval_loss"]],
            "logits_error": logits,
            "grad_error": _grad_error(liger, ref["grads"]),
        }

    LAUNCHED.clear()
    tr, liger_step2 = tl_._step(tl_._segment(kernels="liger"), steps=2)
    out["step_kernels"] = sorted(LAUNCHED)
    out["step2_loss"] = {"liger": liger_step2, "chunked": chunked_step2}
    with tempfile.TemporaryDirectory() as d:
        tr.raw_model.save_pretrained(d, safe_serialization=True)
        loaded, info = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, output_loading_info=True)
    out["reloaded_key_mismatches"] = {k: sorted(v) for k, v in info.items() if v}
    out["reloaded_has_loss"] = loss_installed(loaded)
    with torch.no_grad():
        diff = loaded(input_ids=x).logits - tr.raw_model(input_ids=x).logits
    out["reloaded_logits_error"] = diff.abs().max().item()
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
