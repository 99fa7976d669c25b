"""Checkpoints are complete-or-absent: torn or corrupted ones are detected and skipped."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import leave_group

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
    # mapped, not copied: a node's workers loading the checkpoint share its pages
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert {str(d / "model.pt"), str(d / "optim.pt")} <= set(maps.read_text().split())
    # A pickle that is not plain tensors/containers must be refused by weights_only loading.
    (d / "model.pt").unlink()
    torch.save({"evil": logging.getLogger("x")}, d / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(d)
    import hashlib
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["model.pt"] = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.pt: holds objects other than tensors.*weights_only"):
        ckpt.load(d)  # named by file, as every other checkpoint error (torch's own message names none)


def test_a_finished_segments_final_checkpoint_is_read_hashing_only_its_state(tmp_path):
    """Its records read ``state.json``: only that is hashed (a sweep's end reads every trial's), every
    file must be there, and whatever loads the weights or optimizer state still finds rot."""
    from types import SimpleNamespace

    from raypath.mirror import LOCAL
    from raypath.segment import final_checkpoint

    model = torch.nn.Linear(4, 2)
    d = ckpt.save(tmp_path / ckpt.step_dir_name(8), model.state_dict(), torch.optim.AdamW(model.parameters())
                  .state_dict(), {"step": 8, "tokens": 80, "metrics": {"val/v1": 3.5}})
    seg = SimpleNamespace(storage=str(tmp_path), end_step=8, rd=LOCAL, init_checkpoint=None)
    data = bytearray((d / "model.pt").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # bit rot in what the record does not read
    (d / "model.pt").write_bytes(bytes(data))
    final = final_checkpoint(seg)
    assert (final.path, final.metrics, final.tokens_trained) == (str(d), {"val/v1": 3.5}, 80)
    with pytest.raises(ckpt.ChecksumError, match=r"model\.pt does not match its checksum"):
        ckpt.load(d)
    (d / "state.json").write_text((d / "state.json").read_text().replace("3.5", "2.5"))
    with pytest.raises(ckpt.ChecksumError, match=r"state\.json does not match"):
        final_checkpoint(seg)
    (d / "optim.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="optim.pt missing"):
        final_checkpoint(seg)


def test_a_checkpoint_fetched_just_now_loads_without_a_second_hash(tmp_path):
    """A worker resuming its segment's own checkpoint hashed it to choose it (``latest_valid``); its
    load need not hash it again. Any other load hashes what it reads."""
    d = _save(tmp_path, 5)
    assert ckpt.latest_valid(tmp_path) == d
    data = bytearray((d / "optim.pt").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])  # rot after the choice
    (d / "optim.pt").write_bytes(bytes(data))
    assert ckpt.load(d, fetched=True)["state"]["step"] == 5
    with pytest.raises(ckpt.ChecksumError, match=r"optim\.pt does not match its checksum"):
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


def test_the_controller_reads_a_checkpoints_state_and_a_worker_that_finds_it_corrupted_restarts_both(tmp_path, caplog):
    """The controller's dataset factory needs the data position only: it takes the newest complete
    checkpoint without hashing its weights. A worker hashes what it loads; finding that checkpoint
    corrupted, it quarantines it and fails the attempt, so that the restart chooses again on both
    sides: never a dataset from one checkpoint's position and weights from another's."""
    from types import SimpleNamespace

    from raypath.mirror import LOCAL
    from raypath.segment import resume_point

    for step in (10, 20):
        _save(tmp_path, step)
    rot = tmp_path / ckpt.step_dir_name(20)
    data = bytearray((rot / "model.pt").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    (rot / "model.pt").write_bytes(bytes(data))
    seg = SimpleNamespace(name="main-v1", version="v1", storage=str(tmp_path), start_step=0, end_step=30, rd=LOCAL,
                          init_checkpoint=None)
    controller = resume_point(seg, hashed=False)
    assert controller == (str(rot), ckpt.load_state(rot)) and controller[1]["consumed"] == [[0, 20]]
    with pytest.raises(ckpt.CheckpointError, match=rf"{rot}, the newest complete checkpoint of main-v1, failed this "
                                                   "worker's checks"):
        resume_point(seg)
    assert f"quarantining checkpoint {rot}: {rot}: model.pt does not match its checksum" in caplog.text
    good = str(tmp_path / ckpt.step_dir_name(10))
    assert resume_point(seg, hashed=False)[0] == resume_point(seg)[0] == good


def test_hashing_a_checkpoint_says_how_far_it_got_while_it_lasts(tmp_path, monkeypatch, caplog):
    """A resume or an export hashes the whole checkpoint first (minutes for billions of parameters):
    progress lines in bytes, both layouts, for each way one is verified."""
    from raypath import console

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)  # a line at every file but the last
    caplog.set_level(logging.INFO, logger="raypath.checkpoint")
    full = _save(tmp_path, 5)
    sharded, _, _ = _save_sharded(tmp_path, 6)
    files = ckpt.sharded_files(sharded)
    size = lambda d, names: sum((d / n).stat().st_size for n in names)  # noqa: E731
    for d, verify, total in ((full, lambda: ckpt.verify(full), size(full, ckpt.FILES)),
                             (full, lambda: ckpt.fetch(full, model_only=True), size(full, ckpt.MODEL_FILES)),
                             (sharded, lambda: ckpt.verify(sharded, deep=True), size(sharded, files)),
                             (sharded, lambda: ckpt.verify_files(sharded, files), size(sharded, files))):
        caplog.clear()
        verify()
        lines = [r.getMessage() for r in caplog.records]
        assert lines and all(line.startswith(f"verifying the checksums of {d}: ") and "ETA" in line and
                             f" of {console.amount(total, 'B')} (" in line for line in lines), (lines, total)


def test_latest_valid_of_missing_dir_is_none(tmp_path):
    assert ckpt.latest_valid(tmp_path / "nope") is None


def test_stale_ray_snapshot_is_dropped_only_when_stale(tmp_path):
    _save(tmp_path, 10)
    snap = tmp_path / ckpt.RAY_SNAPSHOT
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_00000010"}]}))
    assert not ckpt.drop_stale_ray_snapshot(tmp_path) and snap.exists()
    weights = tmp_path / "step_00000010" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"rotten!!")  # complete: nothing hashed here
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


# ---------------------------------------------------------------- sharded (DCP) layout

def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save_sharded(root, step, asynchronous=False, mutate_after_start=False):
    from raypath.shards import ShardedSaver

    model, opt = _trained()
    saver = ShardedSaver(0, asynchronous, torch.device("cpu"))
    d = root / ckpt.step_dir_name(step)
    saver.save(d, model, opt, {"step": step, "tokens": step, "consumed": [[0, step]]})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    if mutate_after_start:  # training goes on while the async save writes
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    assert saver.wait() == (d if asynchronous else None)
    return d, expected, opt


@pytest.mark.parametrize("asynchronous", [False, True])
def test_sharded_roundtrip_into_a_fresh_model(tmp_path, asynchronous):
    from raypath.shards import load_into

    d, expected, opt = _save_sharded(tmp_path, 7, asynchronous, mutate_after_start=asynchronous)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == "sharded"
    assert {"state.json", "rng.pt", "shards/.metadata"} <= set(manifest["files"])
    assert any(f.endswith(".distcp") for f in manifest["files"])
    assert ckpt.latest_valid(tmp_path) == d and ckpt.is_sharded(d)
    restored = ckpt.load(d)
    assert restored["sharded"] == d and restored["state"]["step"] == 7
    model, fresh_opt = _trained(seed=1)  # other weights, other optimizer moments
    load_into(d, model, fresh_opt, rank=0, world=1)
    for k, v in model.state_dict().items():  # the state when the save started, not after the mutation
        assert torch.equal(v, expected[k]), k
    saved_moments = [s["exp_avg"] for s in opt.state_dict()["state"].values()]
    loaded_moments = [s["exp_avg"] for s in fresh_opt.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, loaded_moments))


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_a_weights_only_checkpoint_verifies_loads_its_weights_and_refuses_to_train_on(tmp_path, layout):
    """A finished branch's final checkpoint holds no optimizer state (a third of the bytes): it
    verifies and loads its weights, a missing weights file is still torn, and a segment with steps
    left to train from it is refused by name."""
    from types import SimpleNamespace

    from raypath.mirror import LOCAL
    from raypath.segment import resume_point
    from raypath.shards import ShardedSaver, load_into

    model, opt = _trained()
    d = tmp_path / "ray" / ckpt.step_dir_name(9)
    state = {"step": 9, "tokens": 90, "consumed": [[0, 9]]}
    if layout == "full":
        ckpt.save(d, model.state_dict(), None, state)
        assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.pt", "rng.pt", "state.json"]
    else:
        ShardedSaver(0, False, torch.device("cpu")).save(d, model, None, state)
        assert sorted(p.name for p in (d / "shards").iterdir()) == [".metadata", "__0_0.distcp"]
    assert not ckpt.has_optimizer(d)
    ckpt.verify(d, deep=True)
    assert ckpt.latest_valid(d.parent) == d
    fresh, fresh_opt = _trained(seed=1)
    restored = ckpt.load(d)
    if layout == "full":
        assert restored["optim"] is None
        fresh.load_state_dict(restored["model"])
    else:
        load_into(d, fresh, fresh_opt, rank=0, world=1)
        assert all(torch.equal(a, b) for a, b in zip(fresh_opt.state_dict()["state"][0].values(),
                                                      _trained(seed=1)[1].state_dict()["state"][0].values()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())

    finished = SimpleNamespace(name="branch-v1", version="v1", storage=str(d.parent), end_step=9, rd=LOCAL,
                               init_checkpoint=None)
    assert resume_point(finished) == (str(d), state)  # nothing left to train: its export may still be due
    longer = SimpleNamespace(**{**vars(finished), "end_step": 12})
    with pytest.raises(ckpt.CheckpointError, match=rf"{d}: a weights-only checkpoint .* branch-v1 cannot train "
                                                   r"on from its step 9 to 12"):
        resume_point(longer)
    forked = SimpleNamespace(**{**vars(longer), "storage": str(tmp_path / "other"), "init_checkpoint": str(d)})
    with pytest.raises(ckpt.CheckpointError, match="holds no optimizer state"):
        resume_point(forked)

    weights = d / "model.pt" if layout == "full" else d / "shards" / "__0_0.distcp"
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.verify(d)


def test_reading_a_sharded_checkpoints_weights_in_one_process_prints_no_torch_warning(tmp_path):
    """`raypath export` of an FSDP checkpoint printed torch's "torch.distributed is disabled ...
    assuming the intent is to load in a single process" warning: the intent raypath states itself."""
    import warnings

    from raypath.shards import load_model_weights

    d, expected, _ = _save_sharded(tmp_path, 5)
    model, _ = _trained(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_weights(d, model)
    assert not [str(w.message) for w in caught if "torch.distributed" in str(w.message)]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_loading_a_checkpoints_weights_in_one_process_says_how_far_it_got(tmp_path, monkeypatch, caplog):
    """An export reads the model's weights after hashing them: lines in bytes (a sharded
    checkpoint's model items, a full one's model.pt), with the rate and an ETA, as the hashing has."""
    from torch.distributed.checkpoint import FileSystemReader

    from raypath import console
    from raypath.shards import load_model_weights

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)  # a line at every read but the last
    caplog.set_level(logging.INFO, logger="raypath.shards")
    sharded, expected, _ = _save_sharded(tmp_path, 5)
    stored = FileSystemReader(sharded / ckpt.SHARDS).read_metadata().storage_data
    total = sum(info.length for index, info in stored.items() if index.fqn.startswith("model."))
    assert total < sum(info.length for info in stored.values())  # not the optimizer's
    trained, opt = _trained(seed=2)
    full = ckpt.save(tmp_path / "full" / ckpt.step_dir_name(3), trained.state_dict(), opt.state_dict(),
                     {"step": 3, "tokens": 30, "consumed": [[0, 3]]})
    for d, want, size, reads in ((sharded, expected, total, len(expected) - 1),
                                 (full, trained.state_dict(), (full / "model.pt").stat().st_size, None)):
        model, _ = _trained(seed=1)
        caplog.clear()
        load_model_weights(d, model)
        lines = [r.getMessage() for r in caplog.records if r.name == "raypath.shards"]
        assert lines and len(lines) == (reads or len(lines))  # a sharded one: a line per item but the last
        assert all(line.startswith(f"loading the model weights of {d}: ") and "ETA" in line and
                   f" of {console.amount(size, 'B')} (" in line for line in lines), (lines, size)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_sharded_checkpoint_of_another_shape_fails_to_load_as_an_ordinary_error(tmp_path):
    # DCP's CheckpointException is a BaseException: it passed every `except Exception` on the way
    # out of a training worker.
    from raypath.shards import load_into

    d, _, _ = _save_sharded(tmp_path, 3)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))
    with pytest.raises(Exception, match="(?i)size mismatch.*model.0.weight") as info:
        load_into(d, wider, torch.optim.AdamW(wider.parameters()), rank=0, world=1)
    assert isinstance(info.value, (RuntimeError, ValueError))
    assert ckpt.latest_valid(tmp_path) == d  # the checkpoint is fine: not quarantined


def test_torn_sharded_checkpoint_is_skipped_and_corrupt_one_quarantined(tmp_path, caplog):
    from raypath.shards import load_into

    good, _, _ = _save_sharded(tmp_path, 10)
    torn, _, _ = _save_sharded(tmp_path, 20)
    (torn / "manifest.json").unlink()  # a rank died before the manifest was written
    shard = next((torn / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    truncated, _, _ = _save_sharded(tmp_path, 30)
    shard = next((truncated / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])  # manifest there, a shard short: torn too
    with caplog.at_level(logging.WARNING, logger="raypath.checkpoint"):
        assert ckpt.latest_valid(tmp_path) == good
    assert "step_00000020: no manifest.json" in caplog.text and "(torn)" in caplog.text

    rot, _, _ = _save_sharded(tmp_path, 40)
    shard = next((rot / "shards").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits: only the hash sees it
    shard.write_bytes(bytes(data))
    assert ckpt.latest_valid(tmp_path) == rot  # cheap check passes; the loading ranks hash
    model, opt = _trained(seed=1)
    with pytest.raises(ckpt.CheckpointError, match="does not match its checksum"):
        load_into(rot, model, opt, rank=0, world=1)
    assert (rot / "manifest.json.corrupt").is_file()
    assert ckpt.latest_valid(tmp_path) == good  # the restart after the failure skips it


def test_a_sharded_checkpoint_saved_again_at_a_step_replaces_the_buckets_copy_whole(s3, tmp_path):
    """Step 5 was saved, then quarantined (or torn); the resumed run saves step 5 again with other
    weights. The new files have the old ones' sizes, which an upload skips: unless the old copy is
    deleted from the bucket first, another node gets the new manifest over the old shards."""
    from conftest import bucket

    from raypath.mirror import Mirror, RunDir
    from raypath.shards import ShardedSaver, load_into

    remote = f"s3://{bucket(s3, 'resave')}/run"
    rd = RunDir(tmp_path / "node-a", Mirror(remote, str(tmp_path / "node-a"), s3.endpoint))
    d = rd / "ray" / "main-v1" / ckpt.step_dir_name(5)
    saver = ShardedSaver(0, False, torch.device("cpu"), rd)
    for seed in (0, 1):
        model, opt = _trained(seed)
        saver.save(d, model, opt, {"step": 5, "tokens": 5, "consumed": [[0, 5]]})
        if seed == 0:
            ckpt.quarantine(d, "bit rot", rd)
    other = RunDir(tmp_path / "node-b", Mirror(remote, str(tmp_path / "node-b"), s3.endpoint))
    d_other = ckpt.fetch(other / "ray" / "main-v1" / ckpt.step_dir_name(5), other)
    assert ckpt.verify_files(d_other, ckpt.sharded_files(d_other), other) is None
    loaded, loaded_opt = _trained(seed=2)
    load_into(d_other, loaded, loaded_opt, rank=0, world=1, rd=other)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_malformed_sharded_manifest_is_a_torn_checkpoint(tmp_path):
    good = _save(tmp_path, 4)
    bad = tmp_path / ckpt.step_dir_name(8)
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "sharded"}))  # valid JSON, no "files"
    assert ckpt.latest_valid(tmp_path) == good  # skipped, not a KeyError that stops the resume
    with pytest.raises(ckpt.CheckpointError, match='step_00000008: manifest.json of a sharded checkpoint needs'):
        ckpt.verify(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "sharded", "files": {"rng.pt": {"sha256": "0"}}}))
    with pytest.raises(ckpt.CheckpointError, match="needs"):
        ckpt.verify(bad)


def test_prune_counts_only_complete_checkpoints_and_drops_superseded_torn_ones(tmp_path):
    for step in (30, 33):
        _save(tmp_path, step)
    (_save(tmp_path, 31) / "manifest.json").unlink()  # torn, older than a complete one
    in_flight = tmp_path / ckpt.step_dir_name(37)  # a crash mid-save (a time-based one, after a resume at 33)
    (in_flight / "shards").mkdir(parents=True)
    deleted = ckpt.prune(tmp_path, keep=1, protected=set())
    assert sorted(d.name for d in deleted) == ["step_00000030", "step_00000031"]
    assert ckpt.latest_valid(tmp_path).name == "step_00000033"  # the torn one did not displace it
    assert in_flight.is_dir()  # newer than every complete one: the save of that step rewrites it


def test_a_corrupted_checkpoint_latest_valid_skipped_does_not_count_for_prune(tmp_path):
    """Resumed from 40 past a bit-rotted 60, the run saves 50: with keep_checkpoints=1 prune must keep
    50, not count 60 (every file present) as the newest and delete what the run goes on from."""
    _save(tmp_path, 40)
    corrupt = _save(tmp_path, 60)
    data = bytearray((corrupt / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash sees it
    (corrupt / "model.pt").write_bytes(bytes(data))
    assert ckpt.latest_valid(tmp_path).name == "step_00000040"
    _save(tmp_path, 50)
    assert [d.name for d in ckpt.prune(tmp_path, keep=1, protected=set())] == ["step_00000040"]
    assert ckpt.latest_valid(tmp_path).name == "step_00000050"
    assert (corrupt / "manifest.json.corrupt").is_file()  # quarantined, as a load does
    assert corrupt.is_dir()  # newer than every good one: the run's own save of step 60 rewrites it
    _save(tmp_path, 70)
    assert sorted(d.name for d in ckpt.prune(tmp_path, keep=1, protected=set())) == [
        "step_00000050", "step_00000060"]


def test_prune_keeps_newest_periodic_and_every_protected_step(tmp_path):
    for step in (4, 8, 12, 16, 20, 24):
        _save(tmp_path, step)
    deleted = ckpt.prune(tmp_path, keep=2, protected={8, 12})
    assert sorted(d.name for d in deleted) == ["step_00000004", "step_00000016"]
    assert sorted(d.name for d in tmp_path.glob("step_*")) == [
        "step_00000008", "step_00000012", "step_00000020", "step_00000024"]
    assert ckpt.prune(tmp_path, keep=0, protected=set()) == []  # 0 = keep all



def test_a_step_named_entry_that_is_no_checkpoint_is_passed_over(tmp_path):
    """A checkpoint copied aside by hand (``step_N.bak``) or a note next to them is not one of the
    segment's checkpoints: resuming, pruning and listing fork points skip it instead of failing."""
    import shutil

    from raypath.lineage import MainEntry
    from raypath.sweep import fork_points

    for step in (10, 20, 30):
        _save(tmp_path, step)
    shutil.copytree(tmp_path / "step_00000010", tmp_path / "step_00000010.bak")
    (tmp_path / "step_notes.txt").write_text("why 20 was kept")
    assert [d.name for d in ckpt.step_dirs(tmp_path)] == ["step_00000010", "step_00000020", "step_00000030"]
    assert ckpt.latest_valid(tmp_path).name == "step_00000030"
    assert [d.name for d in ckpt.prune(tmp_path, keep=1, protected={20})] == ["step_00000010"]
    assert (tmp_path / "step_00000010.bak").is_dir()
    main = MainEntry(version="v1", segment="main-v1", start_step=0, end_step=40)
    assert [f["step"] for f in fork_points(main, tmp_path)] == [20, 30]

def _rng_rank(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from raypath.shards import ShardedSaver, gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    torch.rand(7)  # the generators have moved on since the seed
    model, opt = _trained()
    torch.manual_seed(200 + rank)
    rngs = gather(ckpt.rng_state())  # collective, as in the training loop
    if rank == 0:
        ckpt.save(f"{root}/full", {}, {}, {"step": 1}, rngs)
    ShardedSaver(rank, False, torch.device("cpu")).save(f"{root}/sharded", model, opt, {"step": 1})
    want = torch.rand(5)  # what an uninterrupted run draws next
    results = {}
    for name in ("full", "sharded"):
        dist.barrier()
        torch.manual_seed(999)  # a restarted worker, seeded afresh
        assert ckpt.restore_rng(ckpt.read_tensors(f"{root}/{name}/rng.pt"), rank)
        results[name] = torch.equal(torch.rand(5), want)
    torch.save({"results": results, "draw": want}, f"{root}/rank{rank}.pt")
    leave_group()


def test_every_rank_resumes_its_own_random_generators(tmp_path):
    # Dropout (a pretrained GPT-2 has 0.1) draws from each rank's generators: rank 0's state
    # restored on every rank would repeat one mask on all of them.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rng_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(o["results"] == {"full": True, "sharded": True} for o in out), out
    assert not torch.equal(out[0]["draw"], out[1]["draw"])
    legacy = {"torch": torch.get_rng_state()}  # a checkpoint from before: rank 0's CPU state only
    assert ckpt.restore_rng(legacy, 0) and not ckpt.restore_rng(legacy, 1)
    assert not ckpt.restore_rng(ckpt.read_tensors(tmp_path / "full" / "rng.pt"), 2)  # a grown world


def _per_node_rank(rank: int, world: int, port: int, root: str) -> None:
    """Ranks 0 and 1 on node 0, rank 2 on node 1."""
    import json
    import threading

    import torch.distributed as dist
    from conftest import leave_group

    from raypath.shards import on_each_node

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    node = (0, rank) if rank < 2 else (1, 0)

    def ready(fail_on: int | None = None, lock: bool = False):
        with open(f"{root}/calls-node{node[0]}.txt", "a") as f:
            f.write(f"rank {rank}\n")
        if node[0] == fail_on:
            err = ckpt.CheckpointError(f"{root}/step_00000010: model.pt does not match its manifest")
            if lock:
                err.lock = threading.RLock()  # unpicklable, as torch.compile's errors can be
            raise err
        return f"ready on node {node[0]}"

    out = {"value": on_each_node(ready, node)}
    for name, fail_on, lock in (("node1_fails", 1, False), ("unpicklable", 0, True)):
        try:
            on_each_node(lambda: ready(fail_on, lock), node)
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    Path(f"{root}/rank{rank}.json").write_text(json.dumps(out))
    leave_group()


def test_a_nodes_first_worker_readies_what_its_others_wait_for_and_a_failure_reaches_all(tmp_path):
    """A checkpoint a node's workers load alike (every DDP worker loads all of a full one) is
    readied once a node: downloaded, hashed. A failure on one node fails every worker, which
    would otherwise go on alone into the next collective and hang."""
    import json

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_per_node_rank, args=(3, port, str(tmp_path)), nprocs=3, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [o["value"] for o in out] == ["ready on node 0", "ready on node 0", "ready on node 1"]
    # three calls each time, on the first worker of each node only
    assert (tmp_path / "calls-node0.txt").read_text() == "rank 0\n" * 3
    assert (tmp_path / "calls-node1.txt").read_text() == "rank 2\n" * 3
    corrupt = f"CheckpointError: {tmp_path}/step_00000010: model.pt does not match its manifest"
    assert [o["node1_fails"] for o in out] == [corrupt] * 3
    assert out[0]["unpicklable"] == corrupt  # its own, as raised
    assert out[1]["unpicklable"] == out[2]["unpicklable"] == f"RuntimeError: {corrupt}"


def _segment(tmp_path, name: str, init: str | None = None):
    from raypath.config import ModelConfig, TrainConfig
    from raypath.schedules import main_schedule
    from raypath.segment import Segment

    return Segment(name=name, kind=name.split("-")[0], version="v2", stream_path=str(tmp_path / "stream"),
                   start_step=10, end_step=30, schedule=main_schedule(TrainConfig()), model=ModelConfig(),
                   train=TrainConfig(), vocab_size=64, eos_id=0, pad_id=None, seq_len=8,
                   storage=str(tmp_path / "ray" / name), curves_path=str(tmp_path / f"{name}.jsonl"),
                   init_checkpoint=init)


def test_a_segment_resumed_from_its_own_checkpoint_says_where_and_how_far(tmp_path):
    """A re-run after Ctrl-C or a killed driver continued from the segment's checkpoint with no
    word on the console; the start from the previous segment's checkpoint stays silent."""
    from raypath.segment import resume_note, resume_point

    def save(storage, step, segment):
        model = torch.nn.Linear(4, 2)
        return ckpt.save(tmp_path / "ray" / storage / ckpt.step_dir_name(step), model.state_dict(), {},
                         {"step": step, "tokens": step, "segment": segment, "version": "v2", "consumed": []})

    boundary = save("main-v1", 10, "main-v1")
    main = _segment(tmp_path, "main-v2", init=str(boundary))
    assert resume_note(main, *resume_point(main)) is None  # a version's first start
    assert resume_note(_segment(tmp_path, "main-v1"), None, {"step": 0}) is None  # a run's first start
    save("main-v2", 14, "main-v2")
    save("main-v2", 18, "main-v2")
    note = resume_note(main, *resume_point(main))
    assert note == (f"[main-v2] resuming from {tmp_path / 'ray' / 'main-v2' / 'step_00000018'}: step 18, "
                    "8 of its 20 steps already trained")
    branch = _segment(tmp_path, "branch-v2", init=str(tmp_path / "ray" / "main-v2" / "step_00000018"))
    assert resume_note(branch, *resume_point(branch)) is None  # forked from the main path: a start


def test_a_segment_whose_newest_checkpoint_has_a_torn_state_resumes_from_the_one_before(tmp_path, caplog):
    """The driver's plan check read the newest checkpoint's state.json unhashed: one truncated there
    refused the run ("restore it from a backup") although the workers skip it and resume."""
    from raypath.segment import check_plan, resume_point

    for step in (14, 18):
        model = torch.nn.Linear(4, 2)
        newest = ckpt.save(tmp_path / "ray" / "main-v2" / ckpt.step_dir_name(step), model.state_dict(), {},
                           {"step": step, "tokens": step, "segment": "main-v2", "version": "v2", "consumed": []})
    state = newest / "state.json"
    state.write_bytes(state.read_bytes()[:10])
    main = _segment(tmp_path, "main-v2")
    with caplog.at_level(logging.WARNING, logger="raypath.checkpoint"):
        check_plan(main)
    assert "step_00000018: state.json does not match its checksum" in caplog.text
    assert resume_point(main)[0].endswith("step_00000014")
