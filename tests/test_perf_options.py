"""Training-speed options: each builds and trains a step through the loop's own code.

``build_training`` / ``train_step`` are what ``train_segment`` runs on every
worker, so these tests exercise the real path, on CPU; GPU-only options are
skipped without CUDA. Plus config validation of the new fields, the FLOPs/MFU
formula against a hand count, and one small Ray run: an FSDP segment on 2 CPU
workers (gloo) whose checkpoint a 1-worker DDP segment resumes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raypath import checkpoint as ckpt
from raypath.config import ConfigError, ModelConfig, TrainConfig, load_config
from raypath.loop import build_training, train_step
from raypath.model import build_model
from raypath.perf import PEAK_FLOPS, device_peak_flops, flops_per_token, lookup_peak_flops, matmul_params, mfu, ratio
from raypath.report import read_curve
from raypath.schedules import MainPath
from raypath.segment import Segment

ROOT = Path(__file__).resolve().parents[1]


def _script(argv: list[str], cwd: Path) -> None:
    """Run a benchmark script; on failure the assertion shows its stderr (CI keeps nothing else)."""
    import subprocess

    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(argv[1:3])} exited {res.returncode}:\n{res.stderr[-4000:]}"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
VOCAB, SEQ = 384, 32


def _segment(model: dict | None = None, **train) -> Segment:
    m = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    max_position_embeddings=64, **(model or {}))
    t = TrainConfig(global_batch_size=4, micro_batch_size=2, **train)
    return Segment(name="t", kind="main", version="v1", stream_path="", start_step=0, end_step=1,
                   schedule=MainPath(1e-3, 0), model=m, train=t, vocab_size=VOCAB, eos_id=0, pad_id=None,
                   seq_len=SEQ, storage="", curves_path="")


def _one_step(seg: Segment, device: str = "cpu", restored: dict | None = None):
    torch.manual_seed(0)
    tr = build_training(seg, torch.device(device), restored, world=1)
    before = [p.detach().cpu().clone() for p in tr.raw_model.parameters()]  # .cpu(): on CUDA too
    blocks = torch.randint(1, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    loss = train_step(tr, [blocks, blocks], accum=2, lr=1e-3, grad_clip=1.0)
    assert torch.isfinite(loss) and 4.0 < loss.item() < 8.0  # ~ln(384) at init
    changed = sum(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, tr.raw_model.parameters()))
    assert changed == len(before)
    return tr, loss.item()


@pytest.mark.parametrize("option", [
    {},
    {"loss_chunk_tokens": 0},
    {"loss_chunk_tokens": 7},
    {"precision": "bf16"},
    {"activation_checkpointing": True},
    {"model": {"attn_implementation": "eager"}},
    {"grad_clip": 0.0},
])
def test_option_trains_a_step_on_cpu(option):
    seg = _segment(option.pop("model", None), **option)
    tr, _ = _one_step(seg)
    if seg.train.precision == "bf16":
        assert all(p.dtype == torch.float32 for p in tr.raw_model.parameters())  # fp32 master weights
    if seg.train.activation_checkpointing:
        assert getattr(tr.raw_model, "is_activation_checkpointing", None) or tr.raw_model.is_gradient_checkpointing
    assert tr.raw_model.config._attn_implementation == seg.model.attn_implementation


def test_precision_changes_numerics_not_results():
    _, fp32 = _one_step(_segment())
    _, bf16 = _one_step(_segment(precision="bf16"))
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.05


@contextlib.contextmanager
def _compiled_with(backend):
    """``torch.compile`` with another backend while the loop compiles. Inductor on CPU
    compiles C++: slow on a loaded 2-core machine, so "aot_eager" (or a graph-capturing
    backend) stands in for it (the same wrapping and graph capture; only code generation
    differs), after the pre-grad passes Inductor would run (``train.compile``'s linear
    fusion). The GPU runs use inductor."""
    import torch._dynamo

    from raypath.model import with_pre_grad_passes

    orig = torch.compile
    torch.compile = lambda fn, **kw: orig(fn, backend=with_pre_grad_passes(backend), **kw)
    try:
        yield
    finally:
        torch.compile = orig
        torch._dynamo.reset()


@pytest.mark.parametrize("option", [{}, {"activation_checkpointing": True}, {"precision": "bf16"}])
def test_compile_builds_and_trains_a_step(option):
    import copy

    with _compiled_with("aot_eager"):
        tr, loss = _one_step(_segment(compile=True, **option))
    assert loss == pytest.approx(_one_step(_segment(**option))[1], abs=1e-5)  # compiled or not: the same step
    blocks = tr.raw_model.model.layers
    assert all(hasattr(b.forward, "__func__") and b.forward.__func__ is blocks[0].forward.__func__ for b in blocks)
    assert blocks[0].forward.__func__ is not type(blocks[0]).forward  # compiled, one function for all blocks
    norm = tr.raw_model.model.norm
    assert norm.forward.__func__ is not type(norm).forward and norm.forward.__self__ is norm  # the final norm too
    twin = copy.deepcopy(tr.raw_model)
    assert twin.model.layers[1].forward.__self__ is twin.model.layers[1]  # a copy runs its own weights
    assert twin.model.norm.forward.__self__ is twin.model.norm
    plain = build_training(_segment(), torch.device("cpu"), world=1)
    assert set(tr.raw_model.state_dict()) == set(plain.raw_model.state_dict())  # checkpoint keys unchanged


def test_compile_under_fsdp_trains_the_same_step(gloo_group):
    """FSDP2 shards each block and the root; the compiled block, final-norm and loss-chunk
    forwards run inside its unshard/reshard hooks: the same step as FSDP uncompiled."""
    from torch.distributed.tensor import DTensor

    with _compiled_with("aot_eager"):
        tr, loss = _one_step(_segment(parallel="fsdp", compile=True))
    assert all(isinstance(p, DTensor) for p in tr.raw_model.parameters())
    assert tr.raw_model.model.norm.forward.__func__ is not type(tr.raw_model.model.norm).forward
    assert loss == pytest.approx(_one_step(_segment(parallel="fsdp"))[1], abs=1e-5)


def test_compiled_blocks_leave_the_mask_to_sdpa_and_rope_outside_and_fuse_projections():
    """Traced as a whole, a transformers Llama builds a full [batch, 1, seq, seq] mask for
    sdpa (it cannot rule out packed position ids while tracing), and SDPA then computes the
    masked upper triangle too: 2x the attention time on an H200; Inductor also recomputes
    RoPE's sin/cos inside every layer's kernel. Compiled per block, as train.compile does,
    the blocks share one graph whose SDPA call is causal without a mask and holds no
    sin/cos, whose q/k/v (GQA: 2 + 1 + 1 heads' rows) and gate/up projections are one
    matmul each, and the loss, gradients and logits are plain transformers' (with a padding
    mask too)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    seg = _segment(compile=True)
    blocks = torch.randint(1, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    pad = torch.ones_like(inputs)
    pad[0, :5] = 0
    with _compiled_with(capture):
        torch.manual_seed(0)
        tr = build_training(seg, torch.device("cpu"), world=1)
        loss = tr.model(input_ids=inputs, targets=targets)
        padded = tr.model(input_ids=inputs, attention_mask=pad).logits
    reference = build_model(seg.model, VOCAB, 0)  # plain transformers sdpa, same weights, eager
    reference.load_state_dict(tr.raw_model.state_dict())
    calls = [n for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    causal = [n for n in calls if n.kwargs.get("attn_mask") is None and len(n.args) <= 3]
    assert causal and all(n.kwargs.get("is_causal") is True for n in causal), [n.format_node() for n in calls]
    assert len(graphs) <= 5, "one graph for all blocks (+ the final norm, the loss, the padded call's)"
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not ops & {"cos", "sin", str(torch.cos), str(torch.sin)}, "RoPE's cos/sin were traced into a graph"
    block = graphs[0].graph  # the first block's, shared by the others
    matmuls = [n for n in block.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    fused = sorted(len(n.args[1].args[0]) for n in matmuls if isinstance(n.args[1], torch.fx.Node)
                   and n.args[1].op == "call_function" and n.args[1].target is torch.cat)
    assert (len(matmuls), fused) == (4, [2, 3]), [n.format_node() for n in matmuls]  # qkv, o, gate+up, down
    ref_logits = reference(input_ids=inputs).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(tr.raw_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(padded, reference(input_ids=inputs, attention_mask=pad).logits)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_compiled_blocks_fuse_the_projections_of_other_architectures(arch):
    """A pretrained start (``model.path``) may be another architecture: Qwen2's q/k/v carry
    biases (fused with them), Mistral's do not; the compiled step equals the eager one."""
    import copy

    import transformers

    from raypath.model import compile_blocks

    config = getattr(transformers, f"{arch}Config")(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    eager = getattr(transformers, f"{arch}ForCausalLM")(config)
    model, graphs = copy.deepcopy(eager), []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    blocks = torch.randint(1, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    with _compiled_with(capture):
        compile_blocks(model)
        loss = model(input_ids=blocks[:, :-1], labels=blocks[:, 1:], use_cache=False).loss
    matmuls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    biased = [len(n.args) > 2 and n.args[2] is not None for n in matmuls]
    assert len(matmuls) == 4 and biased == [arch == "Qwen2", False, False, False]  # qkv (+ biases), o, gate+up, down
    expected = eager(input_ids=blocks[:, :-1], labels=blocks[:, 1:], use_cache=False).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


class _Projections(torch.nn.Module):
    """Linears in the shapes the fusion must tell apart: two with biases and two without
    reading ``x`` (weights fetched as the graph goes, ``get_attr`` after the first linear),
    one reading another input, one whose weight is computed."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, rows in (("wq", 8), ("wk", 4), ("wg", 6), ("wu", 6), ("wo", 5), ("ws", 8)):
            setattr(self, name, torch.nn.Parameter(torch.randn(rows, 8, generator=g)))
        self.bq, self.bk = (torch.nn.Parameter(torch.randn(n, generator=g)) for n in (8, 4))

    def forward(self, x, y):
        F = torch.nn.functional
        q = F.linear(x, self.wq, self.bq)
        gate = torch.relu(F.linear(x, self.wg))
        k = F.linear(x, self.wk, self.bk)
        up = F.linear(x, self.wu)
        computed = F.linear(x, self.ws * 2)  # not a graph input: left alone
        return q.sum() + (gate * up).sum() + k.sum() + F.linear(y, self.wo).sum() + computed.sum()


def test_linear_fusion_groups_linears_by_input_and_bias_and_keeps_the_results():
    from torch.fx.passes.shape_prop import ShapeProp

    from raypath.model import FuseSharedInputLinears

    module = _Projections()
    gm = torch.fx.symbolic_trace(module)
    x, y = torch.randn(3, 5, 8), torch.randn(3, 8)
    ShapeProp(gm).propagate(x, y)
    FuseSharedInputLinears()(gm.graph)
    gm.recompile()
    gm.graph.lint()
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FuseSharedInputLinears.LINEAR]
    shapes = sorted((len(n.args[1].args[0]) if n.args[1].target is torch.cat else 1,
                     len(n.args) > 2 and n.args[2] is not None) for n in matmuls)
    assert shapes == [(1, False), (1, False), (2, False), (2, True)]  # wo, ws*2, wg+wu, wq+wk with bq+bk
    expected = module(x, y)
    expected.backward()
    want = {k: p.grad.clone() for k, p in module.named_parameters()}
    module.zero_grad()
    got = gm(x, y)
    got.backward()
    torch.testing.assert_close(got, expected)
    for k, p in module.named_parameters():
        torch.testing.assert_close(p.grad, want[k], msg=k)


def test_fsdp_trains_a_step_and_checkpoints_in_the_ddp_format(gloo_group, tmp_path):
    from torch.distributed.tensor import DTensor

    seg = _segment(parallel="fsdp")
    tr, _ = _one_step(seg)
    assert tr.parallel == "fsdp" and all(isinstance(p, DTensor) for p in tr.raw_model.parameters())
    model_sd, optim_sd = tr.state_dicts()
    ckpt.save(tmp_path / "c", model_sd, optim_sd, {"step": 1})
    restored = ckpt.load(tmp_path / "c")
    plain = build_training(_segment(), torch.device("cpu"), world=1)  # no process group use: plain module
    assert set(restored["model"]) == set(plain.raw_model.state_dict())
    assert all(isinstance(k, int) for k in restored["optim"]["state"])  # torch's index-keyed format
    # DDP (plain) resumes the FSDP checkpoint: same weights, same Adam moments.
    plain = build_training(replace(seg, train=replace(seg.train, parallel="ddp")), torch.device("cpu"),
                           restored, world=1)
    for (n, p), (_, q) in zip(plain.raw_model.named_parameters(), tr.raw_model.named_parameters()):
        assert torch.equal(p, q.full_tensor()), n
    # ... and FSDP resumes it too (optimizer state re-sharded).
    again = build_training(seg, torch.device("cpu"), restored, world=1)
    s0 = again.optim.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(s0.full_tensor() if isinstance(s0, DTensor) else s0, restored["optim"]["state"][0]["exp_avg"])


def test_a_resumed_optimizer_takes_the_configs_weight_decay_and_betas_and_keeps_its_moments(tmp_path):
    seg = _segment(weight_decay=0.1, betas=(0.9, 0.95))
    tr, _ = _one_step(seg)
    ckpt.save(tmp_path / "c", *tr.state_dicts(), {"step": 1})
    changed = replace(seg, train=replace(seg.train, weight_decay=0.0, betas=(0.8, 0.99)))
    again = build_training(changed, torch.device("cpu"), ckpt.load(tmp_path / "c"), world=1)
    assert [(g["weight_decay"], tuple(g["betas"])) for g in again.optim.param_groups] == [
        (0.0, (0.8, 0.99)), (0.0, (0.8, 0.99))]
    assert torch.equal(again.optim.state_dict()["state"][0]["exp_avg"], tr.optim.state_dict()["state"][0]["exp_avg"])


@CUDA
@pytest.mark.parametrize("option", [{"precision": "bf16"}, {"precision": "bf16", "compile": True},
                                    {"precision": "bf16", "model": {"attn_implementation": "flash_attention_2"}}])
def test_gpu_option_trains_a_step(option):
    if option.get("model", {}).get("attn_implementation") == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    seg = _segment(option.pop("model", None), use_gpu=True, **option)
    tr, _ = _one_step(seg, "cuda")
    assert any(g.get("fused") for g in tr.optim.param_groups)


@CUDA
@pytest.mark.parametrize("kernels, chunk, compile", [("none", 4096, False), ("none", 0, False), ("none", 7, False),
                                                     ("liger", 4096, False), ("none", 4096, True),
                                                     ("liger", 4096, True)])
def test_gpu_loss_kernels_train_a_step_and_match(kernels, chunk, compile):
    """Each loss setting trains a bf16 step on CUDA, eager and under torch.compile (which then
    traces Liger's autograd functions and Triton kernels); its first loss matches the unchunked one."""
    if kernels == "liger":
        pytest.importorskip("liger_kernel", reason="train.kernels=liger needs the liger extra")
    seg = _segment(use_gpu=True, precision="bf16", kernels=kernels, loss_chunk_tokens=chunk, compile=compile)
    tr, loss = _one_step(seg, "cuda")
    _, full = _one_step(_segment(use_gpu=True, precision="bf16", loss_chunk_tokens=0), "cuda")
    assert loss == pytest.approx(full, rel=2e-2)  # bf16 matmuls; Liger's kernels round differently
    plain = build_training(_segment(), torch.device("cpu"), world=1)
    assert set(tr.raw_model.state_dict()) == set(plain.raw_model.state_dict())  # plain Llama weights


@pytest.mark.parametrize("override, field", [
    ("train.precision=fp16", "train.precision"),
    ("train.parallel=zero3", "train.parallel"),
    ("train.compile=maybe", "train.compile"),
    ("train.activation_checkpointing=1", "train.activation_checkpointing"),
    ("train.peak_flops=0", "train.peak_flops"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("model.attn_implementation=flash_attention_2", "model.attn_implementation"),  # needs CUDA
])
def test_bad_values_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_flops_per_token_by_hand():
    # hidden 768, 12 layers, 12 heads (MHA), SwiGLU 2048, vocab 32000, seq 1024.
    d, L, inter, V, S = 768, 12, 2048, 32000, 1024
    per_layer = 4 * d * d + 3 * d * inter + 2 * d          # q,k,v,o + gate,up,down + 2 RMSNorms
    n = L * per_layer + d + V * d                       # + final norm + LM head (tied)
    assert n == 12 * (2_359_296 + 4_718_592 + 1_536) + 768 + 24_576_000 == 109_529_856
    expected = 6 * n + 12 * L * d * S                   # PaLM: 6N + 12 L H Q T
    m = ModelConfig(hidden_size=d, num_layers=L, num_heads=12, num_kv_heads=12, intermediate_size=inter)
    cfg = type("C", (), {**vars(m), "vocab_size": V})()
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, S) == expected == 657_179_136 + 113_246_208
    # The same from the transformers config the loop uses; GQA shrinks k/v.
    from raypath.model import build_model, num_params

    tiny = build_model(_segment().model, VOCAB, 0)
    assert matmul_params(tiny.config) == num_params(tiny)  # tied: every parameter is in a matmul
    gqa = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert matmul_params(tiny.config) == 2 * gqa + 32 + VOCAB * 32


@pytest.mark.parametrize("name, params", [("llama-125m", 109_529_856), ("llama-350m", 341_099_520)])
def test_gpu_configs_load_with_the_chunked_loss(name, params):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    t = cfg.train
    assert t.kernels == "none" and t.loss_chunk_tokens > 0 and t.precision == "bf16" and t.compile
    m = type("C", (), {**vars(cfg.model), "vocab_size": cfg.data.vocab_size})()
    assert matmul_params(m) == params


def test_mfu_and_peak_table():
    assert mfu(1000.0, 6e9, 1e15) == pytest.approx(0.006)
    assert mfu(1000.0, 6e9, None) is None
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lookup_peak_flops("NVIDIA H200") == 989e12
    assert lookup_peak_flops("NVIDIA H200 NVL") == 835e12  # not the SXM H200's peak
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert lookup_peak_flops("NVIDIA L4") == 121e12
    assert lookup_peak_flops("NVIDIA L40S") == 362e12
    assert lookup_peak_flops("some cpu") is None
    assert all(v > 0 for _, v in PEAK_FLOPS)
    assert device_peak_flops(torch.device("cpu")) is None          # CPU: no MFU ...
    assert device_peak_flops(torch.device("cpu"), 2e11) == 2e11    # ... unless train.peak_flops is set
    # benchmark ratios: a CPU step's memory can measure 0 bytes; its ratio is unknown, not a crash
    assert ratio(3.0, 2.0) == 1.5 and ratio(0.0, 2.0) == 0.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, None) is None


@pytest.mark.slow  # minutes on a loaded 2-core machine (data prep + 2 Ray Train runs)
def test_fsdp_segment_on_two_ray_workers_then_ddp_resumes(ray_cluster, tmp_path):
    """A 2-worker FSDP main segment (gloo) checkpoints; a 1-worker DDP segment continues from it."""
    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "data.versions=[v1]", "train.parallel=fsdp", "train.peak_flops=1e11",
        "train.log_every=1"])
    ctx = prepare(cfg)
    seg = main_segment(ctx, 0, None)
    seg = replace(seg, end_step=min(seg.end_step, 4), save_steps=(), stream_limit=min(seg.end_step, 4) * 8,
                  val_paths=dict(list(seg.val_paths.items())[:1]))
    fit_segment(seg)
    end = Path(seg.storage) / ckpt.step_dir_name(seg.end_step)
    state = ckpt.load(end)
    assert state["state"]["step"] == seg.end_step
    rows = read_curve(seg.curves_path).to_dict("records")  # metrics only, not (re)start events
    assert rows[-1]["world_size"] == 2 and "val/v1" in rows[-1]
    for r in rows:
        assert r["tokens_per_s_per_worker"] == pytest.approx(r["tokens_per_s"] / 2)
        assert 0 < r["mfu"] < 1 and 0 <= r["data_wait_share"] <= 1
        assert r["peak_memory_gb"] > 0.05  # the worker process's peak RSS on CPU

    ddp = replace(seg, name="cont", storage=str(tmp_path / "ray" / "cont"), curves_path=str(tmp_path / "cont.jsonl"),
                  init_checkpoint=str(end), start_step=seg.end_step, end_step=seg.end_step + 2,
                  stream_limit=(seg.end_step + 2) * 8, train=replace(seg.train, parallel="ddp", num_workers=1))
    fit_segment(ddp)
    assert ckpt.load_state(Path(ddp.storage) / ckpt.step_dir_name(ddp.end_step))["step"] == ddp.end_step

    # The fresh FSDP model is DDP's: each rank materialises its shards from the same seed (with
    # seed + rank, rank 1's halves differed). Step 1's loss is the init's loss on the same rows.
    fresh = replace(seg, name="fresh", storage=str(tmp_path / "ray" / "fresh"),
                    curves_path=str(tmp_path / "fresh.jsonl"), end_step=1, stream_limit=8, val_paths={},
                    train=replace(seg.train, parallel="ddp", num_workers=1))
    fit_segment(fresh)
    assert read_curve(fresh.curves_path)["loss"].iloc[0] == pytest.approx(rows[0]["loss"], rel=1e-5)


@pytest.mark.slow
def test_an_fsdp_branch_ends_weights_only_and_its_rerun_exports_those_weights(ray_cluster, tmp_path):
    """Two FSDP workers: a branch's final checkpoint holds the model's shards only (no
    ``__<rank>_1.distcp``); re-run, the branch resumes from it, trains nothing, and each rank
    exports its share of those weights."""
    from transformers import AutoModelForCausalLM

    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment
    from raypath.shards import load_model_weights

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "data.versions=[v1]", "train.parallel=fsdp", "train.eval_every=0"])
    ctx = prepare(cfg)
    seg = main_segment(ctx, 0, None)
    seg = replace(seg, end_step=3, save_steps=(), stream_limit=3 * 8, val_paths=dict(list(seg.val_paths.items())[:1]))
    fit_segment(seg)
    fork = Path(seg.storage) / ckpt.step_dir_name(3)
    assert ckpt.has_optimizer(fork)
    branch = replace(seg, name="branch-v1", kind="branch", storage=str(tmp_path / "ray" / "branch-v1"),
                     curves_path=str(tmp_path / "branch.jsonl"), init_checkpoint=str(fork), start_step=3,
                     end_step=5, stream_limit=5 * 8)
    fit_segment(branch)
    final = Path(branch.storage) / ckpt.step_dir_name(5)
    assert [p.name for p in ckpt.step_dirs(branch.storage)] == [final.name]
    assert not ckpt.has_optimizer(final)
    assert sorted(p.name for p in (final / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    out = tmp_path / "export"
    fit_segment(replace(branch, export_dir=str(out), tokenizer_dir=ctx.tokenizer_dir))
    starts = [r["step"] for r in map(json.loads, Path(branch.curves_path).read_text().splitlines())
              if r.get("event") == "start"]
    assert starts == [3, 5]  # the re-run trained nothing
    want = build_model(seg.model, seg.vocab_size, seg.eos_id, seg.pad_id, seg.seq_len)
    load_model_weights(final, want)
    got = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).state_dict()
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.items())


@CUDA
def test_main_segment_on_a_gpu_worker_then_resumes(ray_cluster, tmp_path):
    """The whole main path on one GPU: Ray Data batches stay on the host (their ``idx`` is
    read with ``.numpy()``), tokens go to the GPU; the checkpoint resumes on the GPU."""
    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "data.versions=[v1]", "train.use_gpu=true", "train.num_workers=1",
        "train.precision=bf16", "train.log_every=2"])
    seg = main_segment(prepare(cfg), 0, None)
    seg = replace(seg, end_step=4, save_steps=(), stream_limit=4 * 8, val_paths=dict(list(seg.val_paths.items())[:1]))
    fit_segment(seg)
    end = Path(seg.storage) / ckpt.step_dir_name(4)
    assert ckpt.load_state(end)["step"] == 4
    rows = read_curve(seg.curves_path).to_dict("records")
    assert rows[-1]["step"] == 4 and "val/v1" in rows[-1]
    assert all(0 < r["mfu"] < 1 for r in rows)  # a GPU peak was found: the worker trained on CUDA
    assert all(0 < r["peak_memory_gb"] < 10 for r in rows)  # allocated GPU memory of the tiny model

    cont = replace(seg, name="cont", storage=str(tmp_path / "ray" / "cont"), curves_path=str(tmp_path / "cont.jsonl"),
                   init_checkpoint=str(end), start_step=4, end_step=6, stream_limit=6 * 8)
    fit_segment(cont)
    assert ckpt.load_state(Path(cont.storage) / ckpt.step_dir_name(6))["step"] == 6


def test_throughput_benchmark_profiles_where_a_step_goes(tmp_path):
    """``train_throughput.py --profile``: the plain loop's step time split by kind, on CPU."""
    import json
    import sys

    out = tmp_path / "tt.json"
    _script([sys.executable, "benchmarks/train_throughput.py", "--config", "configs/tiny.yaml",
             "--data", "synthetic", "--kernels", "chunked,full", "--repeats", "1", "--steps", "6",
             "--profile", "2", "--out", str(out)], cwd=ROOT)
    settings = json.loads(out.read_text())[0]["settings"]
    for name, s in settings.items():
        prof = s["plain_profile"]
        assert prof["steps"] == 2 and 0 < prof["busy_ms"] <= 1.5 * prof["step_ms"], name
        assert sum(prof["kinds_ms"].values()) == pytest.approx(prof["busy_ms"])
        assert prof["kinds_ms"]["matmul"] > 0 and prof["kinds_ms"]["attention"] > 0
        ms = [k["ms"] for k in prof["top"]]
        assert ms == sorted(ms, reverse=True) and len(ms) == 15
    # The kinds tell the losses apart: the chunked loss is one autograd op, the full one log-softmax + NLL.
    assert any("LinearCrossEntropy" in k["name"] for k in settings["chunked"]["plain_profile"]["top"])
    assert settings["full"]["plain_profile"]["kinds_ms"]["loss"] > 0


def test_compile_time_benchmark_compares_whole_model_and_per_block(tmp_path):
    """``benchmarks/compile_time.py`` (tracing only: aot_eager): six fresh processes, the same
    losses whichever way the model is compiled (whole, per block, per block unfused)."""
    import json
    import sys

    out = tmp_path / "ct.json"
    _script([sys.executable, "benchmarks/compile_time.py", "--config", "configs/tiny.yaml", "--steps", "2",
             "--modes", "model,blocks,unfused", "--backend", "aot_eager", "--out", str(out)], cwd=ROOT)
    runs = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["cache"]) for r in runs] == [(m, c) for m in ("model", "blocks", "unfused")
                                                        for c in ("cold", "warm")]
    assert all(r["first_step_s"] > 0 and r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in runs)
    for key in ("first_loss", "last_loss"):  # same math: the compile changes how, not what
        assert max(r[key] for r in runs) - min(r[key] for r in runs) < 1e-4, key


def test_compile_time_benchmark_runs_the_loss_every_way_with_the_same_result(tmp_path):
    """``benchmarks/compile_time.py --part loss`` (tracing only: aot_eager): the chunked loss eager,
    compiled whole and compiled per chunk, each in a fresh process, on the config's shapes;
    the loss and gradients are the same whichever way it runs."""
    import json
    import sys

    out = tmp_path / "lc.json"
    _script([sys.executable, "benchmarks/compile_time.py", "--part", "loss", "--config", "configs/tiny.yaml",
             "--steps", "2", "--set", "train.loss_chunk_tokens=100", "--tokens", "1000",
             "--backend", "aot_eager", "--out", str(out)], cwd=ROOT)
    runs = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in runs] == ["eager", "whole", "chunk"]
    assert all(r["tokens"] == 1000 and r["chunk"] == 100 and r["first_call_s"] > 0 and r["step_ms"] > 0 for r in runs)
    for key in ("loss", "grad_hidden_norm", "grad_weight_norm"):
        assert max(r[key] for r in runs) == pytest.approx(min(r[key] for r in runs), rel=1e-5), key


@pytest.mark.parametrize("chunk, compile", [(0, False), (7, True)])
def test_step_ceiling_times_every_matmul_of_a_step(tmp_path, chunk, compile):
    """``benchmarks/step_ceiling.py`` times the step's matmuls (compiled: q/k/v and gate/up
    fused); their FLOPs are the formula's 6N either way."""
    import json
    import sys

    out = tmp_path / "ceiling.json"
    _script([sys.executable, "benchmarks/step_ceiling.py", "--config", "configs/tiny.yaml",
             "--set", f"train.loss_chunk_tokens={chunk}", "--set", f"train.compile={str(compile).lower()}",
             "--out", str(out)], cwd=ROOT)
    s = json.loads(out.read_text())[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    m, t = cfg.model, cfg.train
    accum, tokens = t.global_batch_size // t.micro_batch_size, t.micro_batch_size * cfg.data.seq_len
    assert s["tokens_per_step"] == tokens * accum
    per_step = {x["name"]: x["per_step"] for x in s["matmuls"]}
    names = ("qkv", "o", "gate+up", "down") if compile else ("q", "k", "v", "o", "gate", "up", "down")
    assert set(per_step) - {"lm_head", "lm_head tail"} == set(names)
    assert all(per_step[n] == m.num_layers * accum for n in names)
    # The LM head over the loss's chunks: 64 tokens = 9 chunks of 7 + a tail of 1.
    assert per_step["lm_head"] == (tokens // chunk if chunk else 1) * accum
    assert ("lm_head tail" in per_step) == bool(chunk and tokens % chunk)
    norms = m.num_layers * 2 * m.hidden_size + m.hidden_size  # counted in N, not matmuls
    cfg_n = type("C", (), {**vars(m), "vocab_size": cfg.data.vocab_size})()
    assert s["matmul_flops"] == 6 * (matmul_params(cfg_n) - norms) * tokens * accum
    assert all(x["ms_per_step"] > 0 and x["tflops"] > 0 for x in s["matmuls"])
    assert s["matmul_ms"] == pytest.approx(sum(x["ms_per_step"] for x in s["matmuls"]))
    attn = s["attention_ms"]
    assert attn["default"] > 0 and attn["flash"] > 0 and attn["math"] > 0  # the CPU's backends
    assert s["ceiling_ms"] == pytest.approx(s["matmul_ms"] + attn["default"])
    assert s["mfu_ceiling"] is None  # no peak FLOP/s for a CPU


def _benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_throughput_benchmark_trains_on_the_device_it_is_given(device):
    """The GPU configs set ``train.use_gpu: true``; with ``--device cpu`` the raypath run's Ray Train
    worker would wait for a GPU forever, so the benchmark's overrides follow ``--device``."""
    import argparse

    args = argparse.Namespace(set=["train.log_every=5"], device=device)
    overrides = _benchmark("train_throughput").run_overrides("configs/llama-125m.yaml", args)
    cfg = load_config(ROOT / "configs" / "llama-125m.yaml", overrides)
    assert cfg.train.use_gpu is (device == "cuda") and cfg.train.log_every == 5 and cfg.train.eval_every == 0


def test_throughput_benchmark_refuses_workers_the_cluster_cannot_hold(ray_cluster):
    """llama-125m's worker takes 8 CPUs; on a cluster that cannot hold them and Ray Data's reads,
    Ray Train would wait without a word: the benchmark names the field before preparing data."""
    import argparse

    args = argparse.Namespace(set=[], device="cpu", data="stream", steps=None, local_cluster=True)
    with pytest.raises(ConfigError, match=r"train\.cpus_per_worker"):
        _benchmark("train_throughput").bench_config(str(ROOT / "configs" / "llama-125m.yaml"), args, ["chunked"])


def test_device_check_script_ends_its_stages_within_the_budget(tmp_path):
    """``gpu_check.sh`` runs inside one device call that is stopped at 600 s, which then writes
    nothing more: a stage that would outlast ``BUDGET_S`` is stopped by the script's own timeout
    (and says so), and a later stage with too little time left is skipped."""
    import os
    import subprocess
    import time

    if list((ROOT / ".whl").glob("*.whl")):
        pytest.skip(".whl/ holds wheels: the script would install them first")
    python = tmp_path / "python"  # a stage that would run for a minute: 40 s allowed, 24 left
    python.write_text("#!/bin/sh\nsleep 60\n")
    python.chmod(0o755)
    env = {**os.environ, "PY": str(python), "OUT": str(tmp_path / "out"), "BUDGET_S": "24", "STAGE_TIMEOUT_S": "40"}
    t0 = time.monotonic()
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "ceiling", "tests"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=45)
    assert time.monotonic() - t0 < 38 and res.returncode == 124, res.stdout + res.stderr
    log = (tmp_path / "out" / "check.log").read_text()
    assert "ceiling TIMED OUT" in log and "tests SKIPPED" in log, log
