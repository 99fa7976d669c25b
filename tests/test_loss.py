"""The training loss (raypath.loss): the chunked linear + cross-entropy against the
plain transformers logits + ``F.cross_entropy``, on the Llama model, on CPU.

Loss and every gradient (LM head, base-model parameters, the hidden states) must
match the unchunked loss within fp32 tolerance, for chunk sizes that do and do not
divide the token count, with ignored targets, under bf16 autocast, torch.compile,
DDP and FSDP2; the full ``[tokens, vocab]`` logits must never exist; weights stay
plain Llama. Plus ``train.kernels``' error paths (Liger needs CUDA and its extra).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import operator
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raypath.config import ConfigError, ModelConfig, TrainConfig, load_config
from raypath.loop import build_training, train_step
from raypath.loss import (
    IGNORE_INDEX,
    compile_loss,
    full_cross_entropy,
    install_loss,
    linear_cross_entropy,
    loss_installed,
)
from raypath.model import block_loss, build_model
from raypath.schedules import MainPath
from raypath.segment import Segment

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 384, 32, 3          # 3 x 32 = 96 tokens per micro-batch
CPU = torch.device("cpu")


def _model(tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    return build_model(cfg, VOCAB, eos_id=0)


def _blocks(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """What block_loss computed before the loss module: full logits, fp32 copy, F.cross_entropy."""
    logits = model(input_ids=blocks[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), blocks[:, 1:].reshape(-1))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _installed(model: torch.nn.Module, **train) -> torch.nn.Module:
    install_loss(model, TrainConfig(**train), CPU)
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 32, 96, 1000])  # 96 tokens: 7 and 1000 do not divide them
def test_chunked_loss_and_gradients_match_the_full_logits(chunk, tie):
    ref = _model(tie)
    model = _installed(copy.deepcopy(ref), loss_chunk_tokens=chunk)
    blocks = _blocks()
    expected = _reference(ref, blocks)
    (expected / 2).backward()              # a grad_output other than 1, as with accumulation
    loss = block_loss(model, blocks)
    (loss / 2).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    want, got = _grads(ref), _grads(model)
    assert set(want) == set(got)
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    for name in (head, "model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert want[name].abs().max() > 0, name  # a gradient that can be wrong
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [5, 64])
def test_hidden_state_gradient_and_ignored_targets(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=True)
    targets = torch.randint(0, 300, (2, 50))
    targets[0, ::3] = IGNORE_INDEX
    targets[1, 40:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad(loss * 0.3, (hidden, weight))
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    eh, ew = torch.autograd.grad(expected * 0.3, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, eh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-7)
    assert gh[0, ::3].abs().max() == 0 and gh[1, 40:].abs().max() == 0  # ignored rows get no gradient
    # No valid target at all: nan, like F.cross_entropy's 0/0 mean.
    none = torch.full_like(targets, IGNORE_INDEX)
    assert torch.isnan(linear_cross_entropy(hidden, weight, none, chunk))
    assert torch.isnan(F.cross_entropy(logits.reshape(-1, 300), none.reshape(-1)))


def test_bf16_autocast_matches_the_full_logits_loss():
    ref = _model()
    chunked = _installed(copy.deepcopy(ref), loss_chunk_tokens=7)
    full = _installed(copy.deepcopy(ref), loss_chunk_tokens=0)
    blocks = _blocks()
    losses = []
    for m in (ref, chunked, full):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _reference(m, blocks) if m is ref else block_loss(m, blocks)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-3) and losses[2] == pytest.approx(losses[0], rel=1e-6)
    want = _grads(ref)
    for name, g in _grads(chunked).items():  # bf16 matmuls: bf16 tolerance
        torch.testing.assert_close(g, want[name], rtol=0.05, atol=0.02 * want[name].abs().max().item(), msg=name)


def test_eval_without_grad_and_logits_without_targets():
    ref = _model()
    model = _installed(copy.deepcopy(ref), loss_chunk_tokens=10)
    blocks = _blocks()
    with torch.no_grad():
        assert block_loss(model, blocks).item() == pytest.approx(_reference(ref, blocks).item(), rel=1e-6)
        # Without targets the model is the plain transformers model (generation, export).
        out = model(input_ids=blocks[:, :-1], use_cache=False)
        torch.testing.assert_close(out.logits, ref(input_ids=blocks[:, :-1], use_cache=False).logits)
    assert loss_installed(model) and not loss_installed(ref)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("chunk, bf16", [(16, False), (16, True), (0, False)])
def test_full_logits_are_never_materialised(chunk, bf16):
    model = _installed(_model(), loss_chunk_tokens=chunk)
    tokens = BATCH * SEQ
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with _LargestTensor() as seen:
        with amp:
            loss = block_loss(model, _blocks())
        loss.backward()
    if chunk:
        assert seen.numel <= max(chunk * VOCAB, VOCAB * 32)  # one chunk of logits, or the head's weight
    else:
        assert seen.numel >= tokens * VOCAB  # the baseline does hold them: the probe can fail


def test_compiled_chunked_loss_matches_eager():
    import torch._dynamo

    ref = _model()
    model = _installed(copy.deepcopy(ref), loss_chunk_tokens=7)
    blocks = _blocks()
    _reference(ref, blocks).backward()
    try:
        loss = block_loss(torch.compile(model, backend="aot_eager"), blocks)
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert loss.item() == pytest.approx(_reference(ref, blocks).item(), rel=1e-5)
    want = _grads(ref)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_loss_is_one_graph_for_every_chunk(monkeypatch):
    """Under train.compile (raypath.loss.compile_loss) the chunked loss compiles one chunk's
    work, not the unrolled loop: one graph with the three matmuls of one chunk, called once
    per chunk (a Python loop: one chunk's logits alive at a time), whatever the number of
    chunks; same loss and gradients as eager."""
    import torch._dynamo

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    orig = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: orig(fn, backend=capture, **kw))
    ref = _installed(_model(), loss_chunk_tokens=8)   # 96 tokens: 12 chunks
    model = copy.deepcopy(ref)
    model.raypath_loss = compile_loss(model.raypath_loss)
    blocks = _blocks()
    try:
        (block_loss(ref, blocks) / 2).backward()
        loss = block_loss(model, blocks)
        (loss / 2).backward()
        with torch.no_grad():
            evaluated = block_loss(model, blocks)
    finally:
        torch._dynamo.reset()
    assert loss.item() == pytest.approx(block_loss(ref, blocks).item(), rel=1e-6)
    assert evaluated.item() == pytest.approx(loss.item(), rel=1e-6)
    want = _grads(ref)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)
    matmuls = [sum(n.op == "call_function" and n.target in (operator.matmul, torch.matmul) for n in gm.graph.nodes)
               for gm in graphs]
    assert len(graphs) == 2 and sorted(matmuls) == [1, 3], matmuls  # training (3 matmuls), evaluation (1)


def _segment(**train) -> Segment:
    m = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    max_position_embeddings=64)
    t = TrainConfig(global_batch_size=2 * BATCH, micro_batch_size=BATCH, **train)
    return Segment(name="t", kind="main", version="v1", stream_path="", start_step=0, end_step=1,
                   schedule=MainPath(1e-3, 0), model=m, train=t, vocab_size=VOCAB, eos_id=0, pad_id=None,
                   seq_len=SEQ, storage="", curves_path="")


def _step(seg: Segment, steps: int = 1):
    torch.manual_seed(0)
    tr = build_training(seg, CPU, world=1)
    losses = [train_step(tr, [_blocks(2 * i + 1), _blocks(2 * i + 2)], accum=2, lr=1e-3, grad_clip=1.0).item()
              for i in range(steps)]
    return tr, losses[-1]


def test_training_steps_chunked_equal_unchunked():
    # Not the weights after an AdamW step: its first update is ~lr * sign(grad), so gradients
    # of ~1e-9 that differ in rounding move a weight by +-lr. The next loss is what matters.
    for steps in (1, 3):
        _, a = _step(_segment(loss_chunk_tokens=7), steps)
        _, b = _step(_segment(loss_chunk_tokens=0), steps)
        assert a == pytest.approx(b, rel=1e-5), steps


def test_ddp_and_fsdp2_gradients_match_the_full_logits(gloo_group):
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    ref = _model()
    blocks = _blocks()
    _reference(ref, blocks).backward()
    want = _grads(ref)

    ddp_raw = _installed(copy.deepcopy(_model()), loss_chunk_tokens=7)
    block_loss(DistributedDataParallel(ddp_raw), blocks).backward()
    for name, g in _grads(ddp_raw).items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=f"ddp {name}")

    # FSDP2 through the loop's own build: the LM head runs inside the root's forward, unsharded.
    torch.manual_seed(0)  # the same initial weights as ref
    tr = build_training(_segment(parallel="fsdp", loss_chunk_tokens=7), CPU, world=1)
    for name, p in tr.raw_model.named_parameters():
        assert torch.equal(p.full_tensor(), ref.get_parameter(name)), name
    assert tr.parallel == "fsdp" and isinstance(tr.raw_model.lm_head.weight, DTensor)
    loss = block_loss(tr.model, blocks)
    loss.backward()
    assert loss.item() == pytest.approx(_reference(ref, blocks).item(), rel=1e-6)
    for name, p in tr.raw_model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), want[name], rtol=1e-4, atol=1e-6, msg=f"fsdp {name}")


def test_a_sharded_dtensor_weight_is_gathered(gloo_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(90, 16)
    targets = torch.randint(0, 90, (40,))
    sharded = distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Shard(0)]).requires_grad_()
    loss = linear_cross_entropy(hidden, sharded, targets, 9)
    loss.backward()
    w = weight.clone().requires_grad_()
    expected = F.cross_entropy(hidden @ w.T, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sharded.grad.full_tensor(), w.grad, rtol=1e-5, atol=1e-7)


def test_weights_stay_plain_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tr, _ = _step(_segment())
    raw = tr.raw_model
    assert type(raw) is LlamaForCausalLM and set(raw.state_dict()) == set(_model().state_dict())
    raw.save_pretrained(tmp_path / "m", safe_serialization=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert not loss_installed(plain)
    x = _blocks()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, raw(input_ids=x).logits)


# ------------------------------------------------------------ train.kernels

def test_liger_on_cpu_is_rejected_before_training():
    with pytest.raises(ConfigError, match=r"train\.kernels: liger .*CUDA"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.kernels=liger"])
    # The worker checks its device too (a config built without load_config).
    with pytest.raises(ConfigError, match=r"train\.kernels: liger .*CUDA"):
        build_training(_segment(kernels="liger", use_gpu=True), CPU, world=1)


def test_liger_without_the_extra_is_rejected_naming_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel"
                        else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"train\.kernels: liger needs the liger-kernel package: "
                                          r"pip install 'raypath\[liger\]'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.kernels=liger", "train.use_gpu=true"])


#: Liger's Triton kernels that ``train.kernels: liger`` runs: RMSNorm, SwiGLU and RoPE (forward
#: and backward) and the fused linear cross-entropy's.
LIGER_KERNELS = {"_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_swiglu_forward_kernel",
                 "_swiglu_backward_kernel", "_triton_rope", "liger_cross_entropy_kernel"}


def test_liger_kernels_in_tritons_interpreter_match_the_chunked_loss():
    """raypath's liger path with Liger's real Triton kernels, run on CPU by Triton's interpreter
    (tests/liger_interpreted.py, in its own process): which kernels ran, loss, gradients,
    evaluation, logits, two training steps and the saved weights against the chunked loss."""
    pytest.importorskip("liger_kernel", reason="the dev extra installs liger-kernel and triton")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "liger_interpreted.py")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for tie in (True, False):
        r = got[f"tie={tie}"]
        assert LIGER_KERNELS <= set(r["kernels"]), (tie, r["kernels"])
        assert r["plain_class"] and r["same_state"], tie
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5), tie
        assert r["eval_loss"][0] == pytest.approx(r["eval_loss"][1], rel=1e-5), tie
        assert r["grad_error"] < 1e-4 and r["logits_error"] < 1e-4, (tie, r)
    assert LIGER_KERNELS <= set(got["step_kernels"]), got["step_kernels"]
    a, b = got["step2_loss"]["liger"], got["step2_loss"]["chunked"]
    assert a == pytest.approx(b, rel=1e-4)
    assert got["reloaded_key_mismatches"] == {} and not got["reloaded_has_loss"]
    assert got["reloaded_logits_error"] < 1e-5


@pytest.mark.parametrize("override, field", [
    ("train.kernels=triton", "train.kernels"),
    ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
    ("train.loss_chunk_tokens=1.5", "train.loss_chunk_tokens"),
])
def test_bad_loss_settings_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_defaults_are_the_chunked_loss():
    t = load_config(ROOT / "configs" / "tiny.yaml").train
    assert t.kernels == "none" and t.loss_chunk_tokens > 0
    tr = build_training(replace(_segment(), train=t), CPU, world=1)
    assert loss_installed(tr.model)
    assert tr.raw_model.raypath_loss.func is linear_cross_entropy
    assert build_training(_segment(loss_chunk_tokens=0), CPU, world=1).raw_model.raypath_loss is full_cross_entropy
