"""Sharded (DCP) checkpoints in real Ray Train runs: FSDP on 2 workers with async saves, then
resumed at another world size under DDP, then under FSDP again from that DDP checkpoint.

Each resume is checked exactly: with one worker the first step after a resume trains the
lowest untrained stream rows, so its logged loss must equal the loss that the checkpoint's
weights, loaded here in the test process, give on those rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raypath import checkpoint as ckpt
from raypath.data import Consumed
from raypath.lineage import Lineage
from raypath.mirror import RunDir


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _next_rows(stream_path: str, consumed: list, n: int) -> np.ndarray:
    """The ``n`` lowest-idx stream rows not yet trained: one worker's next step."""
    table = pq.read_table(stream_path, columns=["idx", "tokens"])
    idx = table.column("idx").to_numpy()
    col = table.column("tokens").combine_chunks()
    blocks = col.values.to_numpy().reshape(len(col), -1)
    left = np.ones(len(idx), dtype=bool)
    for a, b in consumed:
        left &= ~((idx >= a) & (idx < b))
    rows = np.flatnonzero(left)[np.argsort(idx[left], kind="stable")][:n]
    return blocks[rows]


def _loss_of_checkpoint(seg, directory, blocks) -> float:
    from raypath.model import block_loss, build_model
    from raypath.shards import load_model_weights

    model = build_model(seg.model, seg.vocab_size, seg.eos_id, seg.pad_id)
    load_model_weights(directory, model)
    with torch.no_grad():
        return block_loss(model, torch.from_numpy(blocks).long()).item()


def _segment(base, tmp_path, name, start, end, init, **train):
    train = {"log_every": 1, "eval_every": 0, "checkpoint_every": 3, **train}
    return dataclasses.replace(
        base, name=name, start_step=start, end_step=end, init_checkpoint=str(init), save_steps=(),
        storage=str(tmp_path / "ray" / name), curves_path=str(tmp_path / "curves" / f"{name}.jsonl"),
        train=dataclasses.replace(base.train, **train))


@pytest.mark.slow
def test_sharded_resume_across_world_sizes_and_ddp_fsdp(tiny_run, tmp_path):
    from raypath.mainpath import main_segment
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg, lin = tiny_run
    G = cfg.train.global_batch_size
    ctx = dataclasses.replace(prepare(cfg), rd=RunDir(tmp_path), tracking=None)  # events under tmp_path too
    v2 = main_segment(ctx, 1, Lineage.of(lin).main("v1"))  # starts from v1's (full, DDP) boundary checkpoint
    s0 = v2.start_step
    base = dataclasses.replace(v2, stream_limit=8 * G)

    # A: FSDP on 2 workers from the DDP checkpoint, saving asynchronously at s0+3 and s0+6, and
    # exporting its model at the end, each rank writing its share of the weights.
    a = dataclasses.replace(_segment(base, tmp_path, "a", s0, s0 + 6, v2.init_checkpoint, parallel="fsdp",
                                     num_workers=2, async_checkpoint=True), export_dir=str(tmp_path / "export-a"),
                            tokenizer_dir=ctx.tokenizer_dir)
    fit_segment(a)
    from transformers import AutoModelForCausalLM

    from raypath.export import model_from_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export-a", local_files_only=True, dtype=torch.float32)
    final = model_from_checkpoint(Path(a.storage) / ckpt.step_dir_name(s0 + 6), a.model, a.tokenizer_dir)
    assert all(torch.equal(p, final.get_parameter(n)) for n, p in exported.named_parameters())
    index = json.loads((tmp_path / "export-a" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{r}-of-00002.safetensors" for r in (1, 2)]
    a_mid = Path(a.storage) / ckpt.step_dir_name(s0 + 3)
    manifest = json.loads((a_mid / "manifest.json").read_text())
    assert manifest["format"] == "sharded"
    shard_sizes = {r: sum(m["size"] for f, m in manifest["files"].items() if f.startswith(f"shards/__{r}_"))
                   for r in (0, 1)}
    total = sum(shard_sizes.values())
    assert all(0.25 * total < s < 0.75 * total for s in shard_sizes.values()), shard_sizes  # each its own half
    assert not (a_mid / "model.pt").exists()

    # B: from A's sharded s0+3 under DDP on 1 worker (FSDP -> DDP, world 2 -> 1). Time-based
    # checkpoints due at every log step, only the newest periodic one kept.
    b = _segment(base, tmp_path, "b", s0 + 3, s0 + 6, a_mid, parallel="ddp", num_workers=1,
                 checkpoint_every=0, checkpoint_every_minutes=1e-6, keep_checkpoints=1)
    fit_segment(b)
    mid_state = ckpt.load_state(a_mid)
    expected = _loss_of_checkpoint(b, a_mid, _next_rows(b.stream_path, mid_state["consumed"], G))
    first = next(r for r in _records(b.curves_path) if "loss" in r)
    assert first["step"] == s0 + 4 and first["loss"] == pytest.approx(expected, rel=1e-4)
    b_end = Path(b.storage) / ckpt.step_dir_name(s0 + 6)
    assert (b_end / "model.pt").is_file()  # DDP keeps the full layout
    # s0+4 and s0+5 were saved by time; s0+4 was pruned; the boundary is never pruned.
    assert sorted(p.name for p in Path(b.storage).glob("step_*")) == [
        ckpt.step_dir_name(s0 + 5), ckpt.step_dir_name(s0 + 6)]

    # C: from B's full s0+6 under FSDP (DDP -> FSDP), to s0+8.
    c = _segment(base, tmp_path, "c", s0 + 6, s0 + 8, b_end, parallel="fsdp", num_workers=1)
    fit_segment(c)
    expected = _loss_of_checkpoint(c, b_end, _next_rows(c.stream_path, ckpt.load_state(b_end)["consumed"], G))
    first = next(r for r in _records(c.curves_path) if "loss" in r)
    assert first["step"] == s0 + 7 and first["loss"] == pytest.approx(expected, rel=1e-4)
    final = ckpt.load_state(Path(c.storage) / ckpt.step_dir_name(s0 + 8))
    assert ckpt.is_sharded(Path(c.storage) / ckpt.step_dir_name(s0 + 8))
    assert Consumed.from_list(final["consumed"]).intervals == [[0, 8 * G]]  # every row once, across all three
