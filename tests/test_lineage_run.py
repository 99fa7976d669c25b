"""End to end: a tiny 3-version lineage on a local Ray cluster, then resume it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raypath import checkpoint as ckpt
from raypath.cost import lineage_costs
from raypath.data import Consumed, read_blocks, read_manifest, version_files
from raypath.lineage import FORMAT, Lineage
from raypath.report import read_curve
from raypath.schedules import SHAPES, Branch, Decay, MainPath
from raypath.storage import relative_paths


def test_checkpoints_at_every_version_boundary(tiny_run):
    cfg, lin = tiny_run
    assert [m["version"] for m in lin["main_path"]] == ["v1", "v2", "v3"]
    for main in lin["main_path"]:
        for which in ("fork", "end"):
            d = Path(main["checkpoints"][which])
            ckpt.verify(d)  # manifest present, checksums match
            assert {p.name for p in d.iterdir()} >= {"model.pt", "optim.pt", "rng.pt", "state.json", "manifest.json"}
        state = ckpt.load_state(main["checkpoints"]["end"])
        assert state["step"] == main["end_step"]
        assert state["version"] == main["version"]
        assert state["schedule"] == repr(MainPath(cfg.train.max_lr, cfg.train.warmup_steps))  # what check_plan reads
        assert ckpt.load_state(main["checkpoints"]["fork"])["step"] == main["fork_step"]


def test_main_path_is_one_continuous_path(tiny_run):
    cfg, lin = tiny_run
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    prev_end, prev_tokens = 0, 0
    for main, version in zip(lin["main_path"], lin["versions"]):
        assert main["start_step"] == prev_end
        assert main["tokens_start"] == prev_tokens
        steps = main["end_step"] - main["start_step"]
        assert steps == version["stream_rows"] // G  # each version's new data once
        assert main["tokens_end"] - main["tokens_start"] == steps * G * L
        prev_end, prev_tokens = main["end_step"], main["tokens_end"]
        curve = read_curve(main["curve"])
        assert np.allclose(curve["lr"][curve["step"] > cfg.train.warmup_steps], cfg.train.max_lr)


def test_every_row_of_a_version_trained_exactly_once(tiny_run):
    cfg, lin = tiny_run
    G = cfg.train.global_batch_size
    for main, version in zip(lin["main_path"], lin["versions"]):
        consumed = Consumed.from_list(ckpt.load_state(main["checkpoints"]["end"])["consumed"])
        steps = main["end_step"] - main["start_step"]
        # A duplicated row would merge into an existing interval and shrink the count.
        assert len(consumed) == steps * G
        assert consumed.intervals[0][0] >= 0 and consumed.intervals[-1][1] <= version["stream_rows"]


def test_branch_lr_follows_configured_shape(tiny_run):
    cfg, lin = tiny_run
    main = lin["main_path"][1]
    branch = next(b for b in lin["branches"] if b["version"] == "v2")
    assert branch["fork_step"] == main["fork_step"]
    decay = Decay(cfg.branch.shape, cfg.branch.min_lr_ratio, cfg.branch.power)
    sched = Branch(MainPath(cfg.train.max_lr, cfg.train.warmup_steps), main["fork_step"], branch["steps"], decay)
    curve = read_curve(branch["curve"])
    assert len(curve) >= 3
    # A record at step s was reported after training step s-1 at LR schedule(s-1).
    expected = [sched(s - 1) for s in curve["step"]]
    assert np.allclose(curve["lr"], expected, rtol=1e-9)
    # ...and that is not what any other shape would give.
    for other in set(SHAPES) - {cfg.branch.shape}:
        alt = Branch(sched.main, sched.fork_step, sched.steps, Decay(other, cfg.branch.min_lr_ratio))
        assert not np.allclose(curve["lr"], [alt(s - 1) for s in curve["step"]], rtol=1e-3)
    assert curve["lr"].iloc[-1] == pytest.approx(sched(branch["end_step"] - 1))


def test_release_reloads_with_same_loss(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypath.model import block_loss

    cfg, lin = tiny_run
    release = lin["releases"][-1]
    model = AutoModelForCausalLM.from_pretrained(release["path"], local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(release["path"], local_files_only=True)
    assert tok.eos_token_id == lin["tokenizer"]["eos_id"]
    assert set(release["val"]) == {"val/v1", "val/v2", "val/v3"}
    for version in lin["versions"]:
        blocks = torch.from_numpy(read_blocks(version["val_path"])).long()
        with torch.no_grad():
            loss = block_loss(model, blocks).item()  # equal-length blocks: mean == token mean
        assert loss == pytest.approx(release["val"][f"val/{version['name']}"], rel=1e-4)
    card = json.loads(Path(release["path"], "model_card.json").read_text())
    assert card["version"] == "v3" and card["trained_on_versions"] == ["v1", "v2", "v3"]
    assert card["forked_from"] == relative_paths(lin["branches"][-1], cfg.run_dir)["forked_from"]  # no machine path
    assert card["decay"]["shape"] == cfg.branch.shape


def test_lineage_record(tiny_run):
    cfg, lin = tiny_run
    path = Path(cfg.run_dir) / "lineage.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == FORMAT  # paths inside the run directory stored relative to it
    assert on_disk["versions"][0]["val_path"] == "./data/v1/val"
    on_disk = Lineage.load(path.parent).data
    assert on_disk["versions"] == lin["versions"]
    assert [r["version"] for r in on_disk["releases"]] == ["v1", "v2", "v3"]
    manifest = read_manifest(path.parent / "data" / "manifest.json")
    manifest["versions"] = [version_files(v) for v in manifest["versions"]]
    for v, prepared in zip(on_disk["versions"], manifest["versions"], strict=True):
        assert v["new_tokens"] == v["new_blocks"] * (cfg.data.seq_len + 1)
        # The per-file fingerprints are the data manifest's; the lineage, rewritten on every
        # record, counts them.
        assert all(len(f["sha256"]) == 64 for f in prepared["train_files"] + prepared["val_files"])
        assert not {"train_files", "val_files", "new_chunk_rows", "skipped_files"} & set(v)
        assert v["files"] == {"train": len(prepared["train_files"]), "val": len(prepared["val_files"]),
                              "skipped": len(prepared["skipped_files"]), "chunks": len(prepared["new_chunk_rows"])}
        assert v["files"]["train"] > 0 and v["files"]["chunks"] >= v["files"]["train"]
    # What a run (and each sweep trial it sends its context to) keeps of its versions: the counts
    # and the chunk layout a stream pass reads, not every corpus file's fingerprint.
    from raypath.mirror import RunDir
    from raypath.run import prepared as run_context

    ctx = run_context(cfg, RunDir(Path(cfg.run_dir)))
    for v, prepared in zip(ctx.versions, manifest["versions"], strict=True):
        assert not {"train_files", "val_files", "skipped_files"} & set(v)
        assert v["new_chunk_rows"] == prepared["new_chunk_rows"] and v["files"]["train"] == len(prepared["train_files"])
    for b in on_disk["branches"]:
        assert b["status"] == "done"
        assert b["tokens_trained"] == b["steps"] * cfg.train.global_batch_size * cfg.data.seq_len
        assert Path(b["release"], "model.safetensors").is_file()
    assert not list(path.parent.glob(".lineage.json.*"))  # no temp files left behind


def test_cost_matches_hand_computation(tiny_run):
    cfg, lin = tiny_run
    rows = lineage_costs(lin)
    seq_len, batch = lin["config"]["data"]["seq_len"], lin["config"]["train"]["global_batch_size"]
    blocks = np.cumsum([v["new_blocks"] for v in lin["versions"]])  # PTFS k trains versions 1..k's blocks
    ptfs = np.cumsum([b // batch * batch * seq_len for b in blocks]).tolist()  # whole batches, seq_len each
    trained = [m["tokens_end"] - m["tokens_start"] + b["tokens_trained"]
               for m, b in zip(lin["main_path"], sorted(lin["branches"], key=lambda b: b["version"]))]
    m1 = lin["main_path"][0]
    assert ptfs[0] == m1["tokens_end"] - m1["tokens_start"]  # v1's main path is what PTFS trains for v1
    for k, row in enumerate(rows):
        assert row["ptfs_cumulative"] == ptfs[k]
        assert row["path_switching_ratio"] == pytest.approx(sum(trained[: k + 1]) / ptfs[k])


def test_rerun_resumes_and_appends_a_version(tiny_run_copy):
    """Same command again: nothing re-trains; a new version trains only itself."""
    from raypath.run import run

    cfg = tiny_run_copy
    run_dir = Path(cfg.run_dir)
    curves_before = {p.name: p.read_bytes() for p in (run_dir / "curves").iterdir()}
    lin = run(cfg).data
    assert {p.name: p.read_bytes() for p in (run_dir / "curves").iterdir()} == curves_before

    # Crash simulation: version 3's boundary checkpoint and lineage entry are gone,
    # its fork checkpoint survived. The rerun must continue from the fork step.
    main3 = lin["main_path"][-1]
    lineage_path = run_dir / "lineage.json"
    record = json.loads(lineage_path.read_text())
    record["main_path"] = record["main_path"][:-1]
    lineage_path.write_text(json.dumps(record))
    import shutil
    shutil.rmtree(main3["checkpoints"]["end"])
    lin2 = run(cfg).data
    curve = read_curve(main3["curve"])
    raw = [json.loads(line) for line in Path(main3["curve"]).read_text().splitlines()]
    assert lin2["main_path"][-1]["end_step"] == main3["end_step"]
    assert curve["step"].max() == main3["end_step"]
    # the rerun's records come after the fork checkpoint, not from the segment start
    new_records = raw[len(curves_before["main-v3.jsonl"].splitlines()):]
    start = new_records[0]
    assert start["event"] == "start" and start["step"] == main3["fork_step"]
    assert start["checkpoint"] == main3["checkpoints"]["fork"]
    assert min(r["step"] for r in new_records[1:]) > main3["fork_step"]
    consumed = Consumed.from_list(ckpt.load_state(main3["checkpoints"]["end"])["consumed"])
    assert len(consumed) == (main3["end_step"] - main3["start_step"]) * cfg.train.global_batch_size


def test_branch_ingest_is_ordered_in_a_fresh_process(ray_cluster):
    """A branch's trainer is created in a Ray task, whose DataContext is fresh (unordered): the
    segment's ingest options must still keep the stream's order, or the same branch trains on
    a different row order on every run."""
    import ray

    @ray.remote(num_cpus=0)
    def options_in_a_task() -> tuple[bool, bool]:
        from ray.data import DataContext

        from raypath.segment import ordered_ingest

        DataContext._set_current(DataContext())  # as in a task process that built no dataset yet
        fresh = DataContext.get_current().execution_options.preserve_order
        return fresh, ordered_ingest()._resolve_execution_options("train").preserve_order

    fresh, ingest = ray.get(options_in_a_task.remote())
    assert fresh is False  # what Ray Train would use without raypath's options
    assert ingest is True


def test_ray_trains_controller_unpickles_a_segment_without_the_training_loop(ray_cluster, tmp_path):
    """Every segment's Ray Train controller unpickles its trainer (worker entry, segment, dataset
    factory) before it requests the workers: that must not import the training loop, transformers
    with it, ~3 s on the start-up of every main segment, branch and sweep trial
    (``benchmarks/segment_start.py``)."""
    import subprocess
    import sys

    from ray import cloudpickle

    from raypath.config import ModelConfig, TrainConfig
    from raypath.mirror import RunDir
    from raypath.schedules import MainPath
    from raypath.segment import Segment, trainer

    rd = RunDir(tmp_path)
    seg = Segment(name="main-v1", kind="main", version="v1", stream_path=str(tmp_path / "stream.parquet"),
                  start_step=0, end_step=10, schedule=MainPath(1e-3, 0), model=ModelConfig(), train=TrainConfig(),
                  vocab_size=64, eos_id=0, pad_id=None, seq_len=16, storage=str(tmp_path / "ray" / "main-v1"),
                  curves_path=str(tmp_path / "curves" / "main-v1.jsonl"), rd=rd)
    blob = tmp_path / "trainer.pkl"
    blob.write_bytes(cloudpickle.dumps(trainer(seg)))
    probe = ("import sys; from ray import cloudpickle; t = cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(type(t).__name__, t.train_loop_per_worker.__module__, "
             "sorted(m for m in ('raypath.loop', 'raypath.model', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(blob)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split(maxsplit=2) == ["TorchTrainer", "raypath.segment", "[]\n"], out.stdout


def test_a_finished_branch_keeps_its_final_checkpoint_only(tiny_run, tmp_path, capfd):
    """A branch's periodic checkpoints exist to resume it: while it runs it keeps the newest 2, once
    its final one is written they go (each holds the optimizer state: a sweep would keep trials x
    saves of it), and the final one is weights-only. A main segment keeps its own
    (``train.keep_checkpoints=0``: every one, a sweep may fork from any), optimizer state and all."""
    import dataclasses

    from raypath.branches import release_branch
    from raypath.run import prepare
    from raypath.segment import fit_segment

    cfg, lin = tiny_run
    ctx = prepare(cfg)
    seg = release_branch(ctx, 0, Lineage.of(lin).main("v1"))
    seg = dataclasses.replace(seg, storage=str(tmp_path / "ray" / seg.name), export_dir=None, tracking=None,
                              curves_path=str(tmp_path / "curves" / f"{seg.name}.jsonl"),
                              train=dataclasses.replace(seg.train, checkpoint_every=2, eval_every=0))
    assert seg.end_step - seg.start_step > 6  # three periodic checkpoints at least
    fit_segment(seg)
    periodic = list(range(seg.start_step + 2, seg.end_step, 2))
    console = ""
    for _ in range(50):  # Ray streams the workers' lines to this driver
        console += capfd.readouterr().err
        if console.count(f"({seg.name} finished)") + console.count(f"({seg.name} runs:") >= len(periodic):
            break
        time.sleep(0.2)

    def pruned(why: str) -> list[int]:
        return sorted(int(m) for m in re.findall(rf"pruning checkpoint \S*step_(\d+) \({seg.name} {why}", console))

    assert pruned("runs: a branch keeps its newest 2") == periodic[:-2], console[-3000:]
    assert pruned(r"finished\)") == periodic[-2:], console[-3000:]
    left = [p.name for p in ckpt.step_dirs(seg.storage)]
    assert left == [ckpt.step_dir_name(seg.end_step)]
    final = Path(seg.storage) / left[0]
    ckpt.verify(final)
    # nothing trains on from it: its weights only, no AdamW moments
    assert not ckpt.has_optimizer(final) and not (final / "optim.pt").exists()
    starts = [r for r in map(json.loads, Path(seg.curves_path).read_text().splitlines()) if r.get("event") == "start"]
    assert len(starts) == 1
    # the main path it forked from kept every checkpoint, each with its optimizer state
    main = Path(ctx.storage(Lineage.of(lin).main("v1").segment))
    assert seg.start_step in {ckpt.step_of(p) for p in ckpt.step_dirs(main)}
    assert all(ckpt.has_optimizer(p) for p in ckpt.step_dirs(main))

    # Stopped between its final checkpoint and its export: the re-run resumes from the weights-only
    # checkpoint, trains nothing and exports those weights.
    out = tmp_path / "export"
    fit_segment(dataclasses.replace(seg, export_dir=str(out)))
    starts = [r for r in map(json.loads, Path(seg.curves_path).read_text().splitlines()) if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [seg.start_step, seg.end_step]
    from transformers import AutoModelForCausalLM

    weights = ckpt.load(final)["model"]
    exported = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).state_dict()
    assert set(exported) <= set(weights)
    assert all(torch.equal(v, weights[k].to(v.dtype)) for k, v in exported.items())
