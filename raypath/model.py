"""The model: a Llama-family causal LM built from a transformers config.

No hub access ever: either a config built from :class:`raypath.config.ModelConfig`
or a local ``save_pretrained`` directory (``local_files_only=True``).
"""

from __future__ import annotations

import operator
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from raypath.config import ConfigError, ModelConfig
from raypath.loss import compile_loss, loss_installed
from raypath.pretrained import WEIGHT_NAMES, weight_files


def llama_config(cfg: ModelConfig, vocab_size: int, eos_id: int) -> LlamaConfig:
    # No pad_token_id here: transformers would make it the embedding's padding_idx, whose row is
    # zeroed at init and never trained (set afterwards by _use_special_ids).
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        attn_implementation=cfg.attn_implementation,
    )


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int | None = None,
                seq_len: int | None = None, weights: bool = True) -> PreTrainedModel:
    """A fresh model from the config, or the local checkpoint at ``cfg.path``.

    A checkpoint loads in fp32 whatever dtype it was saved in: these are the
    master weights (bf16 is autocast only, ``train.precision``).
    weights: load ``cfg.path``'s weights; False builds its architecture only,
        for a caller that loads a training checkpoint over them anyway.
    """
    if cfg.path:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, local_files_only=True, attn_implementation=cfg.attn_implementation, dtype=torch.float32)
        else:
            config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation,
                                                     dtype=torch.float32)
        model.float()  # a safety net: some architectures keep buffers/params in their saved dtype
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.path: {cfg.path} has vocab_size {model.config.vocab_size}, "
                              f"the tokenizer needs {vocab_size}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if seq_len and limit and seq_len > limit:
            raise ConfigError(f"model.path: {cfg.path} accepts {limit} positions, data.seq_len is {seq_len}")
    else:
        model = LlamaForCausalLM(llama_config(cfg, vocab_size, eos_id))
    _use_special_ids(model, eos_id, pad_id)
    return model


def _use_special_ids(model: PreTrainedModel, eos_id: int, pad_id: int | None) -> None:
    """Make a pretrained model's EOS/PAD ids the training tokenizer's (``data.tokenizer`` may not
    be the base model's): documents are packed EOS-separated, and the released config and
    generation config must stop ``generate()`` where training ended documents. A list of EOS
    ids (instruct models) that holds the tokenizer's is kept.

    No embedding row is a padding row (``padding_idx``, which transformers takes from a config's
    pad id): packed blocks hold no padding, and a pad id that is also EOS (``pad_token =
    eos_token``), or a base model's pad id that the training tokenizer uses for a real token,
    would leave that token's input embedding untrained."""
    model.get_input_embeddings().padding_idx = None
    for conf in (model.config, getattr(model, "generation_config", None)):
        if conf is None:
            continue
        eos = getattr(conf, "eos_token_id", None)
        if not (isinstance(eos, list) and eos_id in eos):
            conf.eos_token_id = eos_id
        if pad_id is not None:
            conf.pad_token_id = pad_id


def compile_blocks(model: PreTrainedModel, fuse_linears: bool = True) -> None:
    """``torch.compile`` every decoder block's forward, the final norm's and the training loss, in place:
    torchtitan's per-block compile, what ``train.compile`` does.

    Why per block rather than the whole model:

    * Start-up. The blocks share their code, so one graph serves them all. The first
      step of a 12-layer model on CPU (``benchmarks/compile_time.py``, docs/benchmarks.md):
      19.1 s against 35.4 s with a cold Inductor cache, 3.4 s against 10.4 s with a warm one
      (every segment and sweep trial after the first on a node).
    * The step. Traced whole, transformers (5.x, torch < 2.14) cannot rule out packed
      position ids, so it builds a ``[batch, 1, seq, seq]`` mask and SDPA runs with
      ``attn_mask``, computing the masked upper triangle too (on an H200, llama-125m:
      attention 18.6 ms of a 68 ms step, against 8.9 ms for causal attention alone); and
      Inductor fuses RoPE's ``sin``/``cos`` into every layer's kernel, recomputing them
      per query and key element (4.7 ms). Outside the blocks the mask is built eagerly
      (``None``: SDPA's ``is_causal``) and cos/sin once per forward.

    fuse_linears: inside the compiled blocks, the projections that read the same input
        (q/k/v, gate/up) run as one matmul each (:class:`FuseSharedInputLinears`).

    The forward is rebound on each block (``deepcopy`` binds it to the copy); parameters,
    ``state_dict`` keys and the hooks around a module's call (DDP, FSDP2, activation
    checkpointing) stay as they are. The final norm's forward is compiled the same way; the
    embedding and rotary table run eagerly.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.compile: {type(model).__name__} has no model.layers to compile")
    compiled: dict = {}
    options = {"pre_grad_custom_pass": FuseSharedInputLinears()} if fuse_linears else None

    def compile_forward(module: torch.nn.Module) -> None:
        # The forward the module runs now: Liger (train.kernels) binds its RMSNorm's on the instance.
        fn = getattr(module.forward, "__func__", type(module).forward)
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, options=options)
        module.forward = types.MethodType(compiled[fn], module)

    for block in layers:
        compile_forward(block)
    if isinstance(getattr(model.model, "norm", None), torch.nn.Module):
        # Eager, the final RMSNorm is ~8 kernels over [tokens, hidden] in fp32, forward and backward.
        compile_forward(model.model.norm)
    if hasattr(model, "raypath_loss"):  # raypath.loss.install_loss's
        model.raypath_loss = compile_loss(model.raypath_loss)


class FuseSharedInputLinears(CustomGraphPass):
    """Inductor pre-grad pass: ``linear`` calls that read the same input become one matmul.

    A Llama block's q/k/v projections all read the normed hidden states, as do the MLP's
    gate and up projections. Three ``[tokens, hidden] x [hidden, hidden]`` matmuls are
    narrow for a GPU (on an H200 the 768-wide ones of llama-125m run at 443 TFLOP/s, the
    2048-wide MLP ones at 612); fused, they are one ``[hidden, q + k + v]`` matmul forward,
    and backward one input-gradient matmul (no sum of three) and one weight-gradient
    matmul, as Megatron's ``linear_qkv`` and nanoGPT's ``c_attn`` are. Here the weights
    stay separate parameters, concatenated inside the graph on every call (``hidden x
    (q + k + v)``: small next to the activations), so ``state_dict`` keys, checkpoints,
    FSDP sharding and the optimizer see the model transformers built. Pre-grad, so
    autograd derives the fused backward. Linears with and without a bias, or with weights
    of different dtypes, are grouped apart; a weight the graph computes (rather than
    receives) is left alone.
    """

    LINEAR = (torch._C._nn.linear, F.linear)

    def __call__(self, graph: torch.fx.Graph) -> None:
        order = {node: i for i, node in enumerate(graph.nodes)}
        groups: dict[tuple, list] = {}
        for node in graph.nodes:
            args = self._linear_args(node)
            if args is not None:  # one group per input, bias or not, and weight dtype (cat would promote)
                dtype = getattr(args[1].meta.get("example_value", args[1].meta.get("tensor_meta")), "dtype", None)
                groups.setdefault((args[0], args[2] is None, dtype), []).append((node, args))
        for group in groups.values():
            if len(group) > 1 and all(self._rows(args[1]) for _, args in group):
                self._fuse(graph, group, order)

    def uuid(self) -> bytes:  # Inductor's FX-graph cache key: this file's code
        return get_hash_for_files((__file__,))

    @classmethod
    def _linear_args(cls, node: torch.fx.Node) -> tuple | None:
        """(input, weight, bias) of a ``linear`` whose weight and bias are graph inputs, else None."""
        if node.op != "call_function" or node.target not in cls.LINEAR:
            return None
        args = tuple(node.args[i] if i < len(node.args) else node.kwargs.get(name)
                     for i, name in enumerate(("input", "weight", "bias")))
        params = [a for a in args[1:] if a is not None]
        if not all(isinstance(a, torch.fx.Node) and a.op in ("placeholder", "get_attr") for a in params):
            return None
        return args

    @staticmethod
    def _rows(weight: torch.fx.Node) -> int | None:
        """A weight's output features, from the shape Dynamo (or ``ShapeProp``) recorded."""
        value = weight.meta.get("example_value", weight.meta.get("tensor_meta"))
        return None if value is None else value.shape[0]

    def _fuse(self, graph: torch.fx.Graph, group: list, order: dict) -> None:
        first, (x, _, bias) = group[0]
        params = [p for _, args in group for p in args[1:] if p is not None]
        for p in params:  # a parameter fetched after the first linear (get_attr) moves up to it
            if p.op == "get_attr" and order[p] > order[first]:
                first.prepend(p)
                order[p] = order[first] - 0.5
        with graph.inserting_before(first):
            weight = graph.call_function(torch.cat, ([args[1] for _, args in group],), {"dim": 0})
            if bias is not None:
                bias = graph.call_function(torch.cat, ([args[2] for _, args in group],), {"dim": 0})
            fused = graph.call_function(torch._C._nn.linear, (x, weight, bias))
            parts = graph.call_function(torch.split, (fused, [self._rows(args[1]) for _, args in group]),
                                        {"dim": -1})
            outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
        # Replaced only now: erasing a node while inserting before it would misplace the rest.
        for (node, _), out in zip(group, outputs):
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)


def with_pre_grad_passes(backend: str | Callable) -> Callable:
    """A ``torch.compile`` backend that runs the pre-grad passes Inductor would run with the
    compile's ``options`` (:class:`FuseSharedInputLinears`) before ``backend``: for tracing-only
    runs (``aot_eager``, a graph capture) that should see the graphs Inductor compiles."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_fn(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None):
        passes = (options or {}).get("pre_grad_custom_pass") or ()
        for graph_pass in passes if isinstance(passes, (list, tuple)) else (passes,):
            graph_pass(gm.graph)
        gm.recompile()
        return lookup_backend(backend)(gm, example_inputs)

    return compile_fn


def block_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``[batch, seq_len + 1]`` token blocks.

    Through the loss :func:`raypath.loss.install_loss` put on the model (chunked,
    full or Liger's, per ``train``), else from the model's full logits.
    """
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    if loss_installed(model):
        return model(input_ids=inputs, targets=targets)
    # use_cache=False: training never decodes; a KV cache would only cost memory and time.
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- Building a sharded model without ever holding it whole -----------------------------------
#
# Under FSDP every rank used to build the full fp32 model on the host and then shard it: at 8B
# parameters that is 32 GB per rank, 256 GB on an 8-GPU node, before the first step. Instead the
# model is built on the meta device, sharded, and given storage one tensor at a time: a rank's
# transient memory is the largest single tensor (the embedding), not the model.


def materialize(model: torch.nn.Module, device: torch.device,
                weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Give a meta-device model (sharded or not) real storage on ``device``, one tensor at a time.

    weights: full tensors by state-dict key (a training checkpoint or a ``save_pretrained``
        directory, :func:`checkpoint_tensors`); None initialises the model afresh with exactly
        the values :func:`build_model` gives on CPU under the same seed, by replaying the random
        draws of its construction (see :func:`_replay_init`).
    Non-persistent buffers (rotary frequencies) are always recomputed as transformers does.
    """
    model.to_empty(device=device)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()  # to_empty gives each module a new parameter: unsharded, tied ones part
    owner = _parameter_owners(model)

    def write(module: torch.nn.Module, values: torch.nn.Module, params: bool = True) -> None:
        for name, value in values._parameters.items():
            # A tied weight is written by its first owner only: its other owners drew values
            # (the random stream must advance as on CPU) that tying then discarded.
            if params and value is not None and owner[id(module._parameters[name])] == (id(module), name):
                _copy_full(module._parameters[name], value)
        for name, value in values._buffers.items():
            if value is not None:
                _copy_full(module._buffers[name], value)

    with torch.no_grad():
        if weights is None:
            _replay_init(model, write)
            return
        for module in model.modules():  # buffers only: no random draws needed
            if any(b is not None for b in module._buffers.values()):  # rotary frequencies
                stand_in = _stand_in(module)
                _hf_owner(model, module)._init_weights(stand_in)
                write(module, stand_in, params=False)
        for key, param in model.named_parameters():
            if key not in weights:
                raise KeyError(f"{getattr(weights, 'name', 'checkpoint')} has no tensor {key!r}")
            _copy_full(param, weights[key])


def _replay_init(model: torch.nn.Module, write: Callable) -> None:
    """Fresh values, equal to a CPU build's: its random draws, replayed per module in its order.

    A transformers model draws twice: torch's ``reset_parameters`` as each built-in module is
    constructed, then at the end of each ``PreTrainedModel.__init__`` its ``post_init`` re-draws
    every module of its subtree not initialised yet (transformers' ``smart_apply``, post-order).
    Each draw goes into a full-size CPU stand-in of one module, which is then copied (sharded)
    into the model. ``tests/test_loss.py`` pins equality with :func:`build_model`.
    """
    from transformers import PreTrainedModel

    initialised: set[int] = set()

    def post_init(owner: PreTrainedModel, module: torch.nn.Module) -> None:
        for child in module.children():
            post_init(child if isinstance(child, PreTrainedModel) else owner, child)
        if id(module) not in initialised and _owns_tensors(module):
            initialised.add(id(module))
            stand_in = _stand_in(module)
            owner._init_weights(stand_in)
            write(module, stand_in)

    def construct(module: torch.nn.Module) -> None:
        for child in module.children():
            construct(child)
        if type(module).__module__.startswith("torch.nn.modules") and hasattr(module, "reset_parameters"):
            stand_in = _stand_in(module)
            stand_in.reset_parameters()
            write(module, stand_in)
        if isinstance(module, PreTrainedModel):
            post_init(module, module)

    construct(model)


def _owns_tensors(module: torch.nn.Module) -> bool:
    return any(v is not None for v in (*module._parameters.values(), *module._buffers.values()))


def _stand_in(module: torch.nn.Module) -> torch.nn.Module:
    """A childless CPU copy of ``module`` whose own parameters and buffers are full-size and empty."""
    # Not copy.copy: FSDP's wrapper classes re-run __init__ from __new__.
    stand_in = object.__new__(type(module))
    stand_in.__dict__ = dict(module.__dict__)
    stand_in._parameters = {k: None if v is None else torch.nn.Parameter(torch.empty(v.shape, dtype=v.dtype),
                                                                          requires_grad=False)
                            for k, v in module._parameters.items()}
    stand_in._buffers = {k: None if v is None else torch.empty(v.shape, dtype=v.dtype)
                         for k, v in module._buffers.items()}
    stand_in._modules = {}
    return stand_in


def _hf_owner(model: torch.nn.Module, module: torch.nn.Module) -> PreTrainedModel:
    """The innermost ``PreTrainedModel`` holding ``module``: whose ``_init_weights`` applies."""
    found = model
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and any(m is module for m in sub.modules()):
            found = sub
    return found


def _parameter_owners(model: torch.nn.Module) -> dict[int, tuple[int, str]]:
    """id(parameter) -> (id(module), name) of its first owner in module order (tied weights share one)."""
    owners: dict[int, tuple[int, str]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), (id(module), name))
    return owners


def _copy_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``dst``, or into this rank's shard of it when ``dst`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):  # src_data_rank=None: every rank slices its own shard, no traffic
        full = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(full)


class checkpoint_tensors(Mapping):
    """The tensors of a ``save_pretrained`` directory, read lazily one at a time, in fp32 or saved dtype.

    Only its weight files are read, the ones ``from_pretrained`` would read
    (:func:`raypath.pretrained.weight_files`). safetensors files are read per tensor;
    ``.bin`` files are memory-mapped (``weights_only=True``), so nothing is resident
    before it is copied into a shard.
    """

    def __init__(self, directory: str | Path):
        self.name = f"model.path: {directory}"
        self._where: dict[str, Callable[[], torch.Tensor]] = {}
        files = weight_files(directory)
        if not files:
            raise ConfigError(f"{self.name} holds no weights: expected one of {', '.join(WEIGHT_NAMES)}")
        for f in files:
            if f.suffix == ".safetensors":
                self._index_safetensors(f)
                continue
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            for key, value in state.items():
                self._where[key] = lambda value=value: value

    def _index_safetensors(self, f: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            keys = list(handle.keys())
        for key in keys:
            self._where[key] = lambda f=f, key=key: _safetensor(f, key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensor(f: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as handle:
        return handle.get_tensor(key)
