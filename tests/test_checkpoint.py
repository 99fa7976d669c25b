"""Checkpoints are complete-or-absent: torn or corrupted ones are detected and skipped."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from raypath import checkpoint as ckpt


def _save(root, step):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return ckpt.save(root / ckpt.step_dir_name(step), model.state_dict(), opt.state_dict(),
                     {"step": step, "tokens": step * 10, "consumed": [[0, step]]})


def test_roundtrip_loads_tensors_only(tmp_path):
    d = _save(tmp_path, 5)
    out = ckpt.load(d)
    assert out["state"]["step"] == 5
    assert set(out["model"]) == {"weight", "bias"}
    assert "state" in out["optim"] and isinstance(out["rng"]["torch"], torch.Tensor)
    # A pickle that is not plain tensors/containers must be refused by weights_only loading.
    (d / "model.pt").unlink()
    torch.save({"evil": logging.getLogger("x")}, d / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(d)
    import hashlib
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["model.pt"] = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ckpt.load(d)


def test_torn_and_corrupted_checkpoints_are_skipped(tmp_path, caplog):
    _save(tmp_path, 10)
    torn = _save(tmp_path, 20)
    (torn / "manifest.json").unlink()  # crash before the manifest was written
    assert ckpt.latest_valid(tmp_path).name == "step_00000010"
    corrupt = _save(tmp_path, 30)
    data = bytearray((corrupt / "optim.pt").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])  # bit rot
    (corrupt / "optim.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="raypath.checkpoint"):
        assert ckpt.latest_valid(tmp_path).name == "step_00000010"
    assert "step_00000030" in caplog.text and "optim.pt does not match its checksum" in caplog.text
    assert "step_00000020" in caplog.text and "no manifest.json" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        ckpt.verify(torn)


def test_latest_valid_of_missing_dir_is_none(tmp_path):
    assert ckpt.latest_valid(tmp_path / "nope") is None


def test_stale_ray_snapshot_is_dropped_only_when_stale(tmp_path):
    _save(tmp_path, 10)
    snap = tmp_path / ckpt.RAY_SNAPSHOT
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_00000010"}]}))
    assert not ckpt.drop_stale_ray_snapshot(tmp_path) and snap.exists()
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_00000010"},
                                                       {"checkpoint_dir_name": "step_00000099"}]}))
    assert ckpt.drop_stale_ray_snapshot(tmp_path) and not snap.exists()


@pytest.mark.parametrize("shape", ["cosine", "exponential", "1-sqrt"])
def test_optimizer_driven_by_a_branch_schedule_reloads_weights_only(tmp_path, shape):
    # Regression: a numpy-scalar LR from the decay formula was stored in param_groups
    # and the branch checkpoint could not be resumed.
    from raypath.schedules import Branch, Decay, MainPath
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    schedule = Branch(MainPath(1e-3, 2), 10, 20, Decay(shape))
    for group in opt.param_groups:
        group["lr"] = schedule(15)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    d = ckpt.save(tmp_path / "b", model.state_dict(), opt.state_dict(), {"step": 15})
    assert ckpt.load(d)["optim"]["param_groups"][0]["lr"] == pytest.approx(schedule(15))
