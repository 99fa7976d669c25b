"""FSDP ranks on separate "nodes" sharing a run directory in a bucket, for ``tests/test_storage_s3.py``.

Each rank is a process of a real gloo group (``torch.multiprocessing.spawn``) with its own
mirror directory, as on a machine of its own: what it finds on its disk afterwards is exactly
what loading the checkpoint downloaded there. The model is a real transformers Llama sharded
with FSDP2, trained one step with AdamW so the optimizer has moments and step counters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

STEP = 5


def _model(seed: int, sharded: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    optim.step()
    return model, optim


def _full_state(model, optim) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor, whole (collective), by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, optim)
    out = {f"model.{k}": v for k, v in msd.items()}
    out.update({f"optim.{p}.{k}": v for p, s in osd["state"].items() for k, v in s.items()})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in out.items()}


def node(rank: int, world: int, spec: dict) -> None:
    """``spec``: mode (``save`` | ``load`` | ``load-ddp``: full replicas on every rank |
    ``export``: the model as a Hugging Face directory, with the tokenizer at ``tokenizer``),
    remote, endpoint, mirrors (one sub-directory per rank), port, out (where ``expected.pt`` and
    ``rank<N>.json`` go)."""
    from conftest import leave_group

    from raypath import checkpoint as ckpt
    from raypath.mirror import Mirror, RunDir
    from raypath.shards import ShardedSaver, load_into

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mirror = Mirror(spec["remote"], str(Path(spec["mirrors"], f"node{rank}")), spec["endpoint"])
    rd = RunDir(Path(mirror.local), mirror)
    storage = rd / "ray" / "main-v1"
    out = Path(spec["out"])
    result: dict = {}
    if spec["mode"] == "export":  # the model as a Hugging Face directory, each rank its share
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from transformers import LlamaForCausalLM

        from raypath.export import rank_shares, save_from_ranks

        model, optim = _model(seed=0)
        with torch.device("meta"):
            plain = LlamaForCausalLM(model.config)
        save_from_ranks(rd / "exports" / "branch-v1", get_model_state_dict(model), plain, rank_shares(plain, world),
                        rank, rd, spec["tokenizer"], {"version": "v1"})
        full = {k[len("model."):]: v for k, v in _full_state(model, optim).items() if k.startswith("model.")}
        if rank == 0:
            torch.save(full, out / "expected.pt")
        local = Path(mirror.local)
        result["files"] = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    elif spec["mode"] == "save":
        model, optim = _model(seed=0)
        ShardedSaver(rank, False, torch.device("cpu"), rd).save(
            storage / ckpt.step_dir_name(STEP), model, optim, {"step": STEP, "tokens": STEP, "consumed": []})
        full = _full_state(model, optim)
        if rank == 0:
            torch.save(full, out / "expected.pt")
    else:
        replicas = spec["mode"] == "load-ddp"
        model, optim = _model(seed=rank + 1, sharded=not replicas)  # other weights and moments, overwritten
        try:
            d = ckpt.latest_valid(storage, rd)
            restored = ckpt.load(d, rd=rd)
            result["ranged"] = load_into(d, model, optim, rank, world, rd, (0, 1) if replicas else None)
            expected = torch.load(out / "expected.pt", weights_only=True)
            got = _full_state(model, optim)
            result["differ"] = sorted(k for k in expected if not torch.equal(expected[k], got[k]))
            result["step"] = restored["state"]["step"]
        except ckpt.CheckpointError as e:
            result["error"] = str(e)
        local = Path(mirror.local)
        result["files"] = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    leave_group()
