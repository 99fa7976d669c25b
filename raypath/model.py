"""The model: a Llama-family causal LM built from a transformers config.

No hub access ever: either a config built from :class:`raypath.config.ModelConfig`
or a local ``save_pretrained`` directory (``local_files_only=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from raypath.config import ConfigError, ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int | None) -> LlamaConfig:
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
        pad_token_id=pad_id,
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
        return model
    return LlamaForCausalLM(llama_config(cfg, vocab_size, eos_id, pad_id))


def block_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``[batch, seq_len + 1]`` token blocks.

    Through the loss :func:`raypath.loss.install_loss` put on the model (chunked,
    full or Liger's, per ``train``), else from the model's full logits.
    """
    from raypath.loss import loss_installed

    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    if loss_installed(model):
        return model(input_ids=inputs, targets=targets)
    # use_cache=False: training never decodes; a KV cache would only cost memory and time.
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
