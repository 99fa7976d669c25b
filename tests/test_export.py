"""``raypath export``: releases and main-path checkpoints (full and sharded) of a run directory
to a Hugging Face directory with a model card, atomically.

Most tests use a small run directory built here without Ray: a local BPE, tiny Llama models,
checkpoints written by raypath's own writers and a lineage whose releases are made by the real
:class:`~raypath.releases.Releaser`. The last test exports from the session's real tiny lineage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypath import checkpoint as ckpt
from raypath import export as ex
from raypath.cli import main
from raypath.config import Config, ModelConfig
from raypath.export import ExportError, export
from raypath.lineage import Lineage
from raypath.releases import Releaser, version_objective
from raypath.storage import write_json

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32,
                    max_position_embeddings=32)
TEXT = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
        "class Point:\n    x: int = 0\n    y: int = 0\n", "import os, sys\nprint(sys.argv)\n"] * 20
DECAY = {"shape": "cosine", "min_lr_ratio": 0.1, "power": 2.0}


def _model(tok, seed: int):
    from raypath.model import build_model

    torch.manual_seed(seed)
    return build_model(MODEL, len(tok), tok.eos_token_id, tok.pad_token_id)


def _state(segment: str, version: str, step: int, tokens: int, v1: float, v2: float | None = None) -> dict:
    metrics = {"step": step, "tokens": tokens, "loss": 5.0, "val/v1": v1, "test/v1": v1 + 0.1}
    if v2 is not None:
        metrics |= {"val/v2": v2, "test/v2": v2 + 0.1}
    return {"step": step, "tokens": tokens, "segment": segment, "version": version, "consumed": [], "lr": 3e-3,
            "metrics": metrics}


def _main_entry(run: Path, version: str, start: int, end: int, state: dict) -> dict:
    return {"version": version, "segment": f"main-{version}", "start_step": start, "end_step": end,
            "fork_step": end - 2, "tokens_start": start * 64, "tokens_end": state["tokens"], "max_lr": 3e-3,
            "warmup_steps": 2, "checkpoints": {"end": str(run / "ray" / f"main-{version}" / ckpt.step_dir_name(end))},
            "metrics": state["metrics"], "status": "done"}


def _branch(run: Path, lin: Lineage, tok, name: str, seed: int, v1: float, v2: float) -> None:
    """A finished branch of v2 with an exported model and card, as a branch segment leaves it."""
    export_dir = run / "exports" / name
    ex.save_model_dir(export_dir, _model(tok, seed), run / "tokenizer")
    write_json(export_dir / "model_card.json", {"run": "tiny-export", "version": "v2", "branch": name,
                                                "fork_step": 14, "branch_steps": 2, "decay": DECAY, "max_lr": 3e-3,
                                                "trained_on_versions": ["v1", "v2"]})
    metrics = {"val/v1": v1, "val/v2": v2, "test/v1": v1 + 0.2, "test/v2": v2 + 0.2, "loss": 4.0}
    lin.record_branch({"name": name, "version": "v2", "fork_step": 14, "end_step": 16, "steps": 2, "decay": DECAY,
                       "metrics": metrics, "tokens_trained": 128, "tokens_total": 1024, "export": str(export_dir),
                       "status": "done"})
    Releaser(lin).decide("v2", version_objective(lin.data, "v2"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """v1: full main-path checkpoint, no release; v2: sharded main-path checkpoint, releases r1 and r2 (live)."""
    from raypath.shards import ShardedSaver
    from raypath.tokenizer import train_tokenizer

    run = tmp_path_factory.mktemp("export") / "run"
    tok = train_tokenizer(iter(TEXT), 300, run / "tokenizer")
    lin = Lineage.open(run, "tiny-export", Config(name="tiny-export", run_dir=str(run), model=MODEL).to_dict())
    lin.data["tokenizer"] = {"path": str(run / "tokenizer"), "vocab_size": len(tok), "eos_id": tok.eos_token_id}
    lin.set_versions([{"name": "v1"}, {"name": "v2"}])

    s1 = _state("main-v1", "v1", 8, 512, 5.5)
    m1 = _model(tok, 1)
    ckpt.save(run / "ray" / "main-v1" / ckpt.step_dir_name(8), m1.state_dict(), {}, s1)
    lin.record_main(_main_entry(run, "v1", 0, 8, s1))

    s2 = _state("main-v2", "v2", 16, 1024, 5.2, 5.1)
    m2 = _model(tok, 2)
    saver = ShardedSaver(0, False, torch.device("cpu"))
    saver.save(run / "ray" / "main-v2" / ckpt.step_dir_name(16), m2, torch.optim.AdamW(m2.parameters()), s2)
    lin.record_main(_main_entry(run, "v2", 8, 16, s2))

    _branch(run, lin, tok, "branch-v2", 3, 5.0, 4.9)  # r1
    _branch(run, lin, tok, "branch-v2-b", 4, 4.9, 4.8)  # r2: a better objective, goes live
    return run


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint_weights(run: Path, version: str, seed: int) -> dict[str, torch.Tensor]:
    from raypath.tokenizer import load_tokenizer

    return _weights(_model(load_tokenizer(run / "tokenizer"), seed))


def _load(out: Path):
    return AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)


def _assert_same(model, expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else []


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("tie", [True, False])
def test_a_training_export_written_rank_by_rank_is_what_save_pretrained_writes(run, tmp_path, tie, world):
    """What a segment's export writes (``loop._export``): each rank its share of the weights,
    rank 0 the configs, tokenizer and index. Replicated tensors (one worker, DDP) need no
    collective, so the ranks run here one after the other; FSDP's DTensors take the slow
    ``test_sharded_resume_across_world_sizes_and_ddp_fsdp``."""
    from safetensors import safe_open

    from raypath.model import build_model
    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer")
    cfg = dataclasses.replace(MODEL, tie_word_embeddings=tie)
    torch.manual_seed(5)
    trained = build_model(cfg, len(tok), tok.eos_token_id, tok.pad_token_id)
    ex.save_model_dir(tmp_path / "reference", trained, run / "tokenizer")
    with torch.device("meta"):
        plain = build_model(cfg, len(tok), tok.eos_token_id, tok.pad_token_id, weights=False)
    shares, out = ex.rank_shares(plain, world), tmp_path / "ranks"
    out.mkdir()
    written = {}
    for rank in range(world):
        written |= ex.write_share(out, trained.state_dict(), shares, rank)
    ex.save_model_dir(out, plain, run / "tokenizer", weights=False)
    ex.write_index(out, shares, written, plain.num_parameters())

    files = sorted(written)
    assert len(files) == world and (out / ex.INDEX).is_file() == (world > 1), files
    sizes = [n for _, n in sorted(written.items())]
    largest = max(t.numel() * 4 for t in trained.state_dict().values())
    assert max(sizes) <= sum(sizes) / world + largest, f"unbalanced shares {sizes}"
    reference = dict.fromkeys(safe_open(str(tmp_path / "reference" / "model.safetensors"), "pt").keys())
    got = {}
    for f in files:
        with safe_open(str(out / f), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            got |= dict.fromkeys(sf.keys(), f)
    assert set(got) == set(reference) and ("lm_head.weight" in got) != tie
    if world > 1:
        assert json.loads((out / ex.INDEX).read_text())["weight_map"] == got
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "reference" / name).read_text()), name
    loaded = _load(out)
    _assert_same(loaded, _weights(trained))
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trained.eval()(x).logits)


def test_live_release_exports_with_tokenizer_and_model_card(run, tmp_path):
    out = tmp_path / "models" / "v2"
    result = export(run, "v2", out)
    assert result.source.facts.label == "v2/r2" and result.out == out
    assert _siblings(out) == ["v2"], "temp sibling left behind"
    _assert_same(_load(out), _weights(_load(run / "exports" / "branch-v2-b")))
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"
    assert (out / "model_card.json").is_file()  # the release's own facts travel with it

    card = ModelCard.load(out / "README.md")
    facts = card.data.raypath
    assert facts["run"] == "tiny-export" and facts["version"] == "v2" and facts["kind"] == "release"
    assert facts["tokens_total"] == 1024 and facts["trained_on"] == ["v1", "v2"]
    assert facts["branch"] == {"name": "branch-v2-b", "fork_step": 14, "steps": 2, "shape": "cosine",
                               "power": 2.0, "min_lr_ratio": 0.1, "max_lr": 3e-3,
                               "floor_lr": pytest.approx(3e-4)}
    assert facts["val"] == {"val/v1": 4.9, "val/v2": 4.8}
    assert facts["test"] == {"test/v1": pytest.approx(5.1), "test/v2": pytest.approx(5.0)}
    assert facts["release"]["id"] == "r2" and facts["release"]["live"] is True
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    results = {(r.metric_name, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert results[("val/v2", "validation")] == 4.8 and results[("test/v2", "test")] == pytest.approx(5.0)
    for text in ("| version | v2 |", "| tokens trained (cumulative) | 1,024 |", "| fork step | 14 |",
                 "| decay shape | cosine |", "| v2 | 4.8 | 5 |", "the live release"):
        assert text in card.text, text


def test_a_named_release_in_bf16(run, tmp_path):
    out = tmp_path / "v2-r1"
    result = export(run, "v2/r1", out, dtype="bf16")
    assert result.dtype == torch.bfloat16 and "bfloat16" in result.summary()
    _assert_same(_load(out), _weights(_load(run / "exports" / "branch-v2")), torch.bfloat16)
    facts = ModelCard.load(out / "README.md").data.raypath
    assert facts["release"] == {"id": "r1", "reason": "configured", "live": False,
                                "released": facts["release"]["released"]}
    assert facts["branch"]["name"] == "branch-v2"


@pytest.mark.parametrize("source,seed,layout", [("main-v1", 1, "full"), ("main-v2", 2, "sharded")])
def test_a_checkpoint_in_a_bucket_exports_from_its_models_files_alone(run, s3, tmp_path, monkeypatch, source, seed,
                                                                       layout):
    """The optimizer state (twice the model) is neither downloaded nor hashed by an export."""
    import pickle

    from conftest import bucket

    from raypath.mirror import Mirror

    remote = f"s3://{bucket(s3, f'export-{layout}')}/run"
    Mirror(remote, str(run.resolve()), s3.endpoint).push(run)
    # A run that continued a base model (model.path) has its tokenizer next to its weights.
    with s3.fs.open_output_stream(f"{remote[5:]}/tokenizer/model.safetensors") as f:
        f.write(b"w" * 1000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    mirror, out = tmp_path / "mirror", tmp_path / source
    export(remote, source, out, local_dir=str(mirror))
    _assert_same(_load(out), _checkpoint_weights(run, source, seed))
    tokenizer = mirror / "tokenizer"
    assert (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "model.safetensors").exists()
    d = Path("ray", source, ckpt.step_dir_name(8 if source == "main-v1" else 16))
    got = {p.relative_to(mirror / d).as_posix() for p in (mirror / d).rglob("*") if p.is_file()}
    if layout == "full":
        assert "model.pt" in got and "optim.pt" not in got, got
        return
    stored = pickle.loads((mirror / d / "shards" / ".metadata").read_bytes()).storage_data
    held: dict[str, set[str]] = {}
    for index, info in stored.items():
        held.setdefault(f"shards/{info.relative_path}", set()).add(index.fqn.split(".", 1)[0])
    assert {f for f, kinds in held.items() if "optim" in kinds}  # the bucket holds optimizer state ...
    downloaded = {f for f in got if f.endswith(".distcp")}
    assert downloaded and all(held[f] == {"model"} for f in downloaded), (downloaded, held)  # ... none came down


@pytest.mark.parametrize("source,seed,layout", [("main-v1", 1, "full"), ("main-v2", 2, "sharded")])
def test_main_path_checkpoints_full_and_sharded(run, tmp_path, source, seed, layout):
    d = run / "ray" / source / ckpt.step_dir_name(8 if source == "main-v1" else 16)
    assert ckpt.is_sharded(d) == (layout == "sharded")
    out = tmp_path / source
    result = export(run, source, out, dtype="fp16" if layout == "full" else None)
    dtype = torch.float16 if layout == "full" else torch.float32  # as stored: fp32 master weights
    _assert_same(_load(out), _checkpoint_weights(run, source, seed), dtype)
    assert result.source.checkpoint == d
    card = ModelCard.load(out / "README.md")
    facts = card.data.raypath
    assert facts["kind"] == "main path" and facts["version"] == source[5:] and "branch" not in facts
    assert facts["tokens_total"] == (512 if source == "main-v1" else 1024)
    assert facts["val"]["val/v1"] == (5.5 if source == "main-v1" else 5.2)
    assert "never annealed" in card.text and "not a release" in card.text
    assert (out / "tokenizer.json").is_file() and not (out / "model_card.json").exists()


def test_a_checkpoint_directory_absolute_or_relative_to_the_run(run, tmp_path):
    rel = f"ray/main-v2/{ckpt.step_dir_name(16)}"
    a = export(run, rel, tmp_path / "a")
    b = export(run, str(run / rel), tmp_path / "b")
    assert a.source.checkpoint == b.source.checkpoint == run / rel
    facts = ModelCard.load(tmp_path / "a" / "README.md").data.raypath
    assert facts["kind"] == "checkpoint" and facts["step"] == 16 and facts["val"]["val/v2"] == 5.1
    _assert_same(_load(tmp_path / "b"), _checkpoint_weights(run, "main-v2", 2))


def test_a_relative_checkpoint_is_the_runs_and_another_runs_is_refused(run, tmp_path, monkeypatch):
    rel = f"ray/main-v2/{ckpt.step_dir_name(16)}"
    other = tmp_path / "other"  # another run's checkpoint at the same relative path, under the working directory
    s, m = _state("main-v9", "v9", 16, 1024, 4.0), torch.nn.Linear(2, 2)
    ckpt.save(other / rel, m.state_dict(), {}, s)
    monkeypatch.chdir(other)
    assert export(run, rel, tmp_path / "a").source.checkpoint == run / rel
    with pytest.raises(ExportError, match=r"a checkpoint of segment main-v9, which .* does not have .*outside"):
        export(run, str(other / rel), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_force_replaces_only_a_model_directory(run, tmp_path):
    out = tmp_path / "v2"
    export(run, "v2", out)
    with pytest.raises(ExportError, match="already exists"):
        export(run, "v2/r1", out)
    assert ModelCard.load(out / "README.md").data.raypath["release"]["id"] == "r2"  # untouched
    export(run, "v2/r1", out, force=True)
    assert ModelCard.load(out / "README.md").data.raypath["release"]["id"] == "r1"
    assert _siblings(out) == ["v2"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a model directory"):
        export(run, "v2", other, force=True)
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match=r"todo.txt is a file, not a directory"):
        export(run, "v2", other / "todo.txt" / "model")
    for bad in (run / "exported", run.parent, run / "releases" / "v2" / "r1"):
        with pytest.raises(ExportError, match="overlaps"):
            export(run, "v2", bad, force=True)
    assert (run / "releases" / "v2" / "r1" / "config.json").is_file()


@pytest.mark.parametrize("source,message", [
    ("v9", "v9: not a version, release, main-path checkpoint or checkpoint directory of"),
    ("v1", "v1 has no release yet in"),
    ("v2/r7", "v2 has no release r7 in"),
    ("main-v3", "main-v3: not a version"),
    ("ray/main-v1", "no manifest.json (checkpoint incomplete or torn) (a checkpoint is a step directory"),
])
def test_a_bad_source_names_the_run_and_what_exists(run, tmp_path, source, message):
    out = tmp_path / "out" / "model"
    with pytest.raises(ExportError) as e:
        export(run, source, out)
    assert message in str(e.value)
    if source != "ray/main-v1":
        assert str(run) in str(e.value)
        assert "versions: v1, v2; releases: v2/r1,r2*; main-path checkpoints: main-v1, main-v2" in str(e.value)
    assert not out.exists() and _siblings(out) == []


def _another_model(kind: str) -> torch.nn.Module:
    from raypath.model import build_model

    if kind == "full":
        return torch.nn.Module()
    if kind == "sharded, other tensors":
        return torch.nn.Linear(2, 2)
    return build_model(dataclasses.replace(MODEL, hidden_size=8, intermediate_size=16), 300, 0)


@pytest.mark.parametrize("kind,why", [
    ("full", "Error"),
    ("sharded, other tensors", "Missing key in checkpoint state_dict: model.model.embed_tokens.weight"),
    ("sharded, other sizes", "Size mismatch"),
])
def test_a_checkpoint_of_another_model_is_refused(run, tmp_path, kind, why):
    """DCP wraps a sharded checkpoint's mismatches in its CheckpointException, a BaseException that
    passes every ``except Exception``: the user must still get the ExportError, not a traceback."""
    from raypath.shards import ShardedSaver

    # a copy of the run's main-v1 (outside the run directory: the run's segment makes it the run's)
    d, state, model = tmp_path / ckpt.step_dir_name(1), _state("main-v1", "v1", 1, 64, 6.0), _another_model(kind)
    if kind == "full":
        ckpt.save(d, {"w": torch.zeros(2)}, {}, state)
    else:
        ShardedSaver(0, False, torch.device("cpu")).save(d, model, torch.optim.AdamW(model.parameters()), state)
    with pytest.raises(ExportError, match=rf"its weights do not fit the run's model \({why}"):
        export(run, str(d), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_verification_leaves_out_as_it_was(run, tmp_path, monkeypatch):
    out = tmp_path / "v2"
    export(run, "v2", out)
    before = sorted(p.name for p in out.iterdir())

    def broken(directory, model, progress=None):
        raise ExportError("the exported model does not load back (simulated)")

    monkeypatch.setattr(ex, "verify", broken)
    with pytest.raises(ExportError, match="does not load back"):
        export(run, "main-v1", out, force=True)
    assert ModelCard.load(out / "README.md").data.raypath["kind"] == "release"
    assert sorted(p.name for p in out.iterdir()) == before and _siblings(out) == ["v2"]
    with pytest.raises(ExportError):
        export(run, "main-v1", tmp_path / "new")
    assert not (tmp_path / "new").exists() and _siblings(out) == ["v2"]


def test_a_failed_swap_of_the_directories_leaves_out_as_it_was(run, tmp_path, monkeypatch):
    out = tmp_path / "v2"
    export(run, "v2", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.replace, []

    def second_rename_fails(src, dst):  # out moved aside, then the new one cannot move in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "injected I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="injected"):
        export(run, "main-v1", out, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _siblings(out) == ["v2"]


def test_a_copied_run_directory_exports_its_own_files(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)  # the lineage still names the original's paths
    result = export(copy, "v2", tmp_path / "v2")
    assert result.source.model_dir == copy / "releases" / "v2" / "r2"
    assert export(copy, "main-v2", tmp_path / "m").source.checkpoint.is_relative_to(copy)


def test_cli_export(run, tmp_path, capsys):
    out = tmp_path / "v2"
    assert main(["export", str(run), "v2", "--out", str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr()
    line = printed.out.strip()
    assert line.startswith("exported v2/r2 (release of v2, branch branch-v2-b, val/v2 4.8000)")
    assert line.endswith("bfloat16]") and "Loading weights" not in printed.err  # one line, no bars
    assert main(["export", str(run), "v2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raypath: error: ") and "already exists" in err and len(err.splitlines()) == 1
    assert main(["export", "s3://bucket/runs/x", "v2", "--out", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err  # no such bucket here: named, one line, nothing written
    assert "run_dir: cannot read s3://bucket/runs/x" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s3").exists()


def test_an_export_says_which_step_it_is_in_while_it_lasts(run, tmp_path, monkeypatch, caplog):
    """Loading, writing and checking a model each read or write all of it (minutes for billions
    of parameters): loading and writing run inside a heartbeat (a line every PROGRESS_EVERY_S while
    it lasts, tested in test_console), in that order, the model written inside the writing one;
    the check, tensor by tensor, says how many of the model's bytes it compared, the rate and an ETA."""
    import contextlib
    import logging

    from raypath import console
    from raypath import export as export_module

    steps, heartbeat = [], export_module.heartbeat

    @contextlib.contextmanager
    def recorded(logger, what, *done):
        with heartbeat(logger, what, *done):
            yield
        steps.append((what, sorted(p.name for p in tmp_path.glob(".v2*/*")), done[0]() if done else None))

    monkeypatch.setattr(export_module, "heartbeat", recorded)
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)  # the check: a line at every tensor but the last
    caplog.set_level(logging.INFO, logger="raypath.export")
    result = export(run, "v2", tmp_path / "v2")
    assert [what for what, *_ in steps] == [f"exporting v2: loading {run / 'releases' / 'v2' / 'r2'}",
                                           f"exporting v2: writing {tmp_path / 'v2'}"]
    assert steps[0][1] == [] and "model.safetensors" in steps[1][1]
    # the writing step's lines say how much reached the directory: here all of it, and more (the tokenizer)
    unit = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    (a, ua, b, ub), = re.findall(r"^([0-9.]+) (k?M?G?B) of ~([0-9.]+) (k?M?G?B) written$", steps[1][2])
    assert float(a) * unit[ua] > float(b) * unit[ub] > 0 and steps[0][2] is None
    checks = [r.getMessage() for r in caplog.records if "checking what was written" in r.getMessage()]
    weights = console.amount(result.parameters * 4, "B")  # fp32
    assert len(checks) > 3 and all(
        re.fullmatch(rf"exporting v2: checking what was written against the model: [0-9.]+ k?M?B of {weights} "
                     r"\([0-9]+%\), .*/s, ETA .*", line) for line in checks), (checks, weights)


def test_every_exported_file_is_readable_by_other_users(run, tmp_path):
    out = tmp_path / "v2"
    export(run, "v2", out)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("out", ["s3://bucket/models/v2", "gs://bucket/models/v2", "s4://bucket/models/v2"])
def test_an_out_in_a_bucket_is_refused_not_written_to_a_local_directory_named_after_it(run, tmp_path, monkeypatch,
                                                                                       capsys, out):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "v2", "--out", out]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"raypath: error: --out {out}: expected a local directory")
    assert not any(tmp_path.iterdir())  # no ./s3:/bucket/models/v2


def test_jobs_export_wrapper(run, tmp_path):
    out = tmp_path / "exported" / "v2"
    cmd = [sys.executable, str(ROOT / "jobs" / "export.py"), "--run-dir", str(run), "--version", "v2",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exported v2/r2" in res.stdout and (out / "model.safetensors").is_file()
    missing = subprocess.run([*cmd[:-4], "--version", "v9", "--out", str(tmp_path / "v9")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert missing.returncode == 2 and "v9" in missing.stderr and "Traceback" not in missing.stderr


def test_export_from_the_real_tiny_lineage(tiny_run, tmp_path):
    """The session's finished 3-version lineage (Ray): the live release and a main-path boundary."""
    cfg, lin = tiny_run
    release = next(r for r in lin["releases"] if r["version"] == "v3")
    out = tmp_path / "v3"
    export(cfg.run_dir, "v3", out, dtype="bf16")
    assert next(_load(out).parameters()).dtype == torch.bfloat16
    facts = ModelCard.load(out / "README.md").data.raypath
    branch = next(b for b in lin["branches"] if b["name"] == release["branch"])
    assert facts["run"] == "tiny" and facts["version"] == "v3" and facts["tokens_total"] == release["tokens_total"]
    assert facts["branch"]["fork_step"] == branch["fork_step"] and facts["branch"]["steps"] == branch["steps"]
    assert facts["branch"]["shape"] == "cosine" and facts["branch"]["min_lr_ratio"] == 0.1
    assert facts["val"] == pytest.approx(release["val"]) and facts["test"] == pytest.approx(release["test"])
    assert set(facts["val"]) == {"val/v1", "val/v2", "val/v3"}

    main_v2 = next(m for m in lin["main_path"] if m["version"] == "v2")
    result = export(cfg.run_dir, "main-v2", tmp_path / "main-v2")
    assert str(result.source.checkpoint) == main_v2["checkpoints"]["end"]
    facts = ModelCard.load(tmp_path / "main-v2" / "README.md").data.raypath
    assert facts["tokens_total"] == main_v2["tokens_end"] and facts["step"] == main_v2["end_step"]
    assert facts["val"]["val/v2"] == pytest.approx(main_v2["metrics"]["val/v2"])
    model = _load(tmp_path / "main-v2")
    state = ckpt.read_tensors(Path(main_v2["checkpoints"]["end"]) / "model.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_an_exported_config_names_the_tokenizers_bos(run, tmp_path):
    """A base model's BOS id (here 5) is another token of the training tokenizer: the configs
    written next to that tokenizer name its BOS, as they name its EOS and PAD."""
    import json

    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer")
    model = _model(tok, 0)
    model.config.bos_token_id = model.generation_config.bos_token_id = 5
    assert tok.bos_token_id not in (None, 5)
    ex.save_model_dir(tmp_path / "out", model, run / "tokenizer")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "out" / name).read_text())["bos_token_id"] == tok.bos_token_id, name


def test_verification_compares_every_written_tensor_without_loading_a_second_model(run, tmp_path, monkeypatch):
    """``verify`` reads the written safetensors one tensor at a time against the model (an export
    holds one model; loading the written one too doubled its memory): a changed or missing tensor
    fails it; a tied tensor written once (lm_head = embeddings) does not."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "v2"
    export(run, "v2", out)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)

    def second_model(*args, **kwargs):
        raise AssertionError("verify loaded a second copy of the model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", second_model)
    ex.verify(out, model)
    tensors = load_file(str(out / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    changed = dict(tensors, **{name: tensors[name] + 1e-3})
    save_file(changed, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=f"{name} differs"):
        ex.verify(out, model)
    save_file({k: v for k, v in tensors.items() if k != name}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        ex.verify(out, model)
    tied = AutoModelForCausalLM.from_config(model.config.__class__(**{**model.config.to_dict(),
                                                                      "tie_word_embeddings": True}))
    tied_dir = tmp_path / "tied"
    tied.save_pretrained(tied_dir)
    for f in out.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy(f, tied_dir / f.name)
    ex.verify(tied_dir, tied)
