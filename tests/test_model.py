"""The sharded build: meta device -> FSDP2 shards -> filled one tensor at a time.

Two gloo ranks build the model the way ``train.parallel: fsdp`` does and must hold
exactly the shards of the model :func:`raypath.model.build_model` gives on CPU under
the same seed (fresh init, tied and untied, with a padding row), or of a
``save_pretrained`` directory's weights.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group

from raypath.config import ModelConfig
from raypath.model import build_model, checkpoint_tensors, materialize

VOCAB = 96


def _cfg(tie: bool, path: str = "") -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       max_position_embeddings=64, tie_word_embeddings=tie, path=path)


def _plain(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg, VOCAB, eos_id=0, pad_id=1)


def _sharded(cfg: ModelConfig, weights=None) -> torch.nn.Module:
    from raypath.loop import _shard

    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(cfg, VOCAB, eos_id=0, pad_id=1, weights=False)
    _shard(model)
    materialize(model, torch.device("cpu"), weights)
    return model


def _rank(rank: int, world: int, port: int, pretrained: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mismatches = []
    cases = [(f"fresh tie={tie}", _cfg(tie), None) for tie in (True, False)]
    cases.append(("pretrained", _cfg(False, pretrained), checkpoint_tensors(pretrained)))
    for label, cfg, weights in cases:
        want = _plain(cfg)
        got = _sharded(cfg, weights)
        local = {n: p.to_local().numel() for n, p in got.named_parameters()}
        assert sum(local.values()) < sum(p.numel() for p in want.parameters()), "not sharded"
        for name, p in got.named_parameters():
            if not torch.equal(p.full_tensor(), want.get_parameter(name)):
                mismatches.append(f"{label}: {name}")
        for name, b in got.named_buffers():
            if not torch.equal(b, want.get_buffer(name)):
                mismatches.append(f"{label}: buffer {name}")
        if cfg.tie_word_embeddings:
            assert got.lm_head.weight is got.model.embed_tokens.weight
    if rank == 0:
        torch.save(mismatches, out)
    leave_group()


def test_two_fsdp_ranks_hold_the_shards_of_the_plain_build(tmp_path):
    pretrained = tmp_path / "base"
    torch.manual_seed(7)  # other weights than the seed-0 init: the checkpoint's values must arrive
    build_model(_cfg(False), VOCAB, eos_id=0, pad_id=1).save_pretrained(pretrained)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "mismatches.pt"
    mp.spawn(_rank, args=(2, port, str(pretrained), str(out)), nprocs=2, join=True)
    assert torch.load(out, weights_only=True) == []


def test_a_missing_tensor_is_named_with_its_directory(tmp_path):
    build_model(_cfg(False), VOCAB, eos_id=0).save_pretrained(tmp_path / "base")
    weights = checkpoint_tensors(tmp_path / "base")
    assert "lm_head.weight" in weights and len(weights) == len(dict(_plain(_cfg(False)).named_parameters()))
    with torch.device("meta"):
        bigger = build_model(_cfg(False), VOCAB, eos_id=0, weights=False)
    bigger.extra = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(KeyError, match=r"model.path: .*base has no tensor 'extra.weight'"):
        materialize(bigger, torch.device("cpu"), weights)


@dataclasses.dataclass
class TrainingArguments:
    """What transformers' Trainer pickles whole into ``training_args.bin`` next to the weights (its own
    class needs accelerate, which is not installed): no plain tensors, refused by ``weights_only``."""

    output_dir: str = "out"
    learning_rate: float = 5e-5


@pytest.mark.parametrize("layout", ["sharded safetensors", "pytorch_model.bin"])
def test_only_the_weight_files_are_read_not_what_a_trainer_saved_next_to_them(tmp_path, layout):
    model = _plain(_cfg(False))
    d = tmp_path / "base"
    if layout == "sharded safetensors":
        model.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").is_file()
    else:  # the pre-safetensors format, which from_pretrained still reads
        model.config.save_pretrained(d)
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    torch.save(TrainingArguments(), d / "training_args.bin")
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), d / "optimizer.pt")
    weights = checkpoint_tensors(d)
    want = model.state_dict()
    assert set(weights) == set(want)
    assert all(torch.equal(weights[k], v) for k, v in want.items())


def test_a_directory_without_weights_or_with_a_bad_index_is_named(tmp_path):
    from raypath.config import ConfigError

    _plain(_cfg(False)).config.save_pretrained(tmp_path)
    torch.save(TrainingArguments(), tmp_path / "training_args.bin")
    with pytest.raises(ConfigError, match=rf"model.path: {tmp_path} holds no weights: expected one of model\.safet"):
        checkpoint_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json needs \"weight_map\""):
        checkpoint_tensors(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_no_token_embedding_is_a_padding_row_that_never_trains(tmp_path, tie):
    """transformers makes a config's pad id the embedding's ``padding_idx``: that row is zeroed at
    init and gets no gradient. With ``pad_token = eos_token`` (or a base model's pad id that the
    training tokenizer uses for a real token) a token of every block would never train."""
    torch.manual_seed(0)
    model = build_model(_cfg(tie), VOCAB, eos_id=5, pad_id=5)  # PAD is EOS
    embed = model.get_input_embeddings()
    assert embed.padding_idx is None and model.config.pad_token_id == 5 and model.generation_config.pad_token_id == 5
    assert embed.weight[5].norm() > 0
    ids = torch.tensor([[3, 5, 7, 5, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert embed.weight.grad[5].norm() > 0

    base = tmp_path / "base"  # a base model whose pad id (7) is a real token of the training tokenizer
    pretrained = build_model(_cfg(tie), VOCAB, eos_id=0, pad_id=7)
    pretrained.save_pretrained(base)
    loaded = build_model(_cfg(tie, str(base)), VOCAB, eos_id=0, pad_id=1)
    assert loaded.get_input_embeddings().padding_idx is None and loaded.config.pad_token_id == 1


def test_an_unsharded_meta_build_keeps_its_tied_embeddings(tmp_path):
    cfg = _cfg(True)
    want = _plain(cfg)
    with torch.device("meta"):
        model = build_model(cfg, VOCAB, eos_id=0, pad_id=1, weights=False)
    torch.manual_seed(0)
    materialize(model, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(p, want.get_parameter(n)) for n, p in model.named_parameters())
    want.save_pretrained(tmp_path / "tied")
    with torch.device("meta"):
        again = build_model(cfg, VOCAB, eos_id=0, pad_id=1, weights=False)
    materialize(again, torch.device("cpu"), checkpoint_tensors(str(tmp_path / "tied")))
    assert again.lm_head.weight is again.model.embed_tokens.weight
