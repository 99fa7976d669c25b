"""The command line: bad input fails before any training, with the field named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raypath.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,field", [
    ("branch.shape=cosin", "branch.shape"),
    ("branch.fraction=1.0", "branch.fraction"),
    ("data.corpus=/nonexistent/corpus", "data.corpus"),
    ("data.seq_len=512", "model.max_position_embeddings"),
])
def test_run_rejects_bad_config_before_training(override, field, tmp_path, capsys):
    rc = main(["run", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run_dir={tmp_path / 'r'}",
               "--set", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert field in err and "tiny.yaml" in err
    assert not (tmp_path / "r").exists()  # nothing was created, nothing trained


def test_console_script_reports_missing_config(tmp_path):
    exe = Path(sys.executable).with_name("raypath")
    out = subprocess.run([str(exe), "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "nope.yaml" in out.stderr and "not found" in out.stderr


def test_output_piped_into_a_reader_that_left_ends_quietly(tmp_path):
    """`raypath status RUN | head -1`: the reader may close the pipe before raypath has printed."""
    import os

    exe = Path(sys.executable).with_name("raypath")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        out = subprocess.run([str(exe), "cost", "--tokens", "100", "200"], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 141 and out.stderr == "", out.stderr


def test_verbose_may_follow_the_command(capsys):
    args = build_parser().parse_args(["cost", "--tokens", "1", "--verbose"])
    assert args.verbose is True
    assert build_parser().parse_args(["-v", "cost", "--tokens", "1"]).verbose is True
    assert build_parser().parse_args(["law", "fit", "RUN", "-v"]).verbose is True
    assert build_parser().parse_args(["cost", "--tokens", "1"]).verbose is False


def test_cost_table(capsys):
    assert main(["cost", "--tokens", "100", "200", "300", "--fraction", "0.25"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    last = lines[-1].split()
    # PTFS 100+300+600=1000, CPT 600, PS 1.25*600=750 -> ratios 0.6 and 0.75
    assert last[0] == "3" and last[-2:] == ["0.600", "0.750"]


def test_cost_of_a_run_and_of_a_plan_at_once_is_refused(tmp_path, capsys):
    assert main(["cost", str(tmp_path), "--tokens", "1e9", "1e9"]) == 2
    assert "cost: give a RUN_DIR (its planned and measured tokens) or --tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--fraction", "0.5"], ["--replay", "0.05"]])
def test_a_plans_fraction_or_replay_with_a_run_dir_is_refused(tmp_path, flag, capsys):
    """A run is priced at the fraction and replay it trained with: a flag meant to change them
    must not be dropped without a word (the table would show the run's own 0.2 as if it were 0.5)."""
    assert main(["cost", str(tmp_path), *flag]) == 2
    assert "cost: --fraction and --replay price a --tokens plan" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["cost", "--tokens", "1e9", "1e9", "--fraction", "1.5"], "--fraction: expected a number in (0, 1)"),
    (["cost", "--tokens", "1e9", "1e9", "--replay", "1"], "--replay: expected a number in [0, 1)"),
    (["cost", "--tokens", "0", "1e9"], "--tokens: expected a number in (0, inf)"),
    (["law", "predict", "RUN", "--fraction", "0"], "--fraction: expected a number in (0, 1]"),
    (["law", "predict", "RUN", "--w-old", "-1"], "--w-old: expected a number in [0, inf)"),
    (["law", "predict", "RUN", "--lambda", "1.5"], "--lambda: expected 'auto' or a number in (0, 1)"),
    (["law", "predict", "RUN", "--fraction", "0.5", "--fork-step", "200"],
     "--fork-step: not allowed with argument --fraction"),
])
def test_out_of_range_numbers_on_the_command_line_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sweep_of_a_run_that_does_not_exist_fails_before_ray_and_data(tmp_path, capsys):
    run_dir = tmp_path / "no-such-run"
    rc = main(["sweep", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run_dir={run_dir}", "--version", "v2"])
    assert rc == 2 and "run `raypath run` first" in capsys.readouterr().err
    assert not run_dir.exists()  # no corpus built, no tokenizer trained, no Ray started for nothing


def test_run_refuses_a_changed_batch_size_once_the_main_path_has_started(tmp_path, capsys):
    from raypath.config import load_config
    from raypath.lineage import Lineage
    from raypath.mirror import RunDir
    from raypath.run import _main_path_started

    tiny, run_dir = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "r"
    lineage = Lineage.open(run_dir, "tiny", load_config(tiny, [f"run_dir={run_dir}"]).to_dict())
    lineage.set_fact("tokenizer", {})
    (run_dir / "ray" / "main-v1").mkdir(parents=True)  # failed at its first step (a model that cannot run)
    assert not _main_path_started(lineage, RunDir(run_dir))  # trained nothing: the settings may change
    (run_dir / "ray" / "main-v1" / "step_00000008").mkdir()  # checkpointed, then crashed
    argv = ["run", tiny, "--set", f"run_dir={run_dir}", "--set", "train.global_batch_size=16"]
    assert main(argv) == 2  # the checkpoint's step and consumed rows count in batches of 8
    assert "train.global_batch_size: 16 differs from the lineage's 8" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".locks") == ["lineage.json", "ray"]  # none prepared


def test_run_refuses_a_fork_point_moved_behind_a_resumed_segment_before_ray_writing_nothing(tmp_path, capsys):
    """branch.fraction raised while main-v1 had checkpointed past its new fork point: refused only once
    the segment started on Ray, after lineage.json and config.yaml had recorded the refused config."""
    import torch

    from raypath import checkpoint as ckpt
    from raypath.config import load_config
    from raypath.lineage import Lineage

    tiny, run_dir = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "r"
    lineage = Lineage.open(run_dir, "tiny", load_config(tiny, [f"run_dir={run_dir}"]).to_dict())
    lineage.set_versions([{"name": "v1", "index": 0, "stream_rows": 160}])  # 20 steps of 8: the fork at 15
    for step in (10, 15):
        ckpt.save(run_dir / "ray" / "main-v1" / ckpt.step_dir_name(step), torch.nn.Linear(2, 2).state_dict(), {},
                  {"step": step, "tokens": step, "segment": "main-v1", "version": "v1", "consumed": []})
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["run", tiny, "--set", f"run_dir={run_dir}", "--set", "branch.fraction=0.8"]) == 2  # fork at 4
    err = capsys.readouterr().err
    assert "main-v1: " in err and "is past step 4, which this plan checkpoints" in err
    assert "branch.fraction is 0.8, the lineage's last run had 0.25" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "corpus").exists()


def test_run_refuses_a_changed_decay_of_an_unfinished_release_branch_before_ray_writing_nothing(tmp_path, capsys):
    """branch.min_lr_ratio edited while branch-v1 had checkpointed (the run stopped mid-branch): its
    checkpoints decayed to another floor. Refused before Ray, naming the two schedules."""
    import torch

    from raypath import checkpoint as ckpt
    from raypath.branches import branch_schedule
    from raypath.config import load_config
    from raypath.lineage import Lineage, MainEntry

    tiny, run_dir = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "r"
    cfg = load_config(tiny, [f"run_dir={run_dir}"])
    lineage = Lineage.open(run_dir, "tiny", cfg.to_dict())
    lineage.set_versions([{"name": "v1", "index": 0, "stream_rows": 160}])
    main_v1 = MainEntry(version="v1", segment="main-v1", start_step=0, end_step=20, fork_step=15, fork_fraction=0.25)
    lineage.record_main(main_v1)
    trained = branch_schedule(cfg, main_v1, cfg.branch.decay(), 15)
    ckpt.save(run_dir / "ray" / "branch-v1" / ckpt.step_dir_name(18), torch.nn.Linear(2, 2).state_dict(), {},
              {"step": 18, "tokens": 18, "segment": "branch-v1", "version": "v1", "consumed": [],
               "schedule": repr(trained)})
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["run", tiny, "--set", f"run_dir={run_dir}", "--set", "branch.min_lr_ratio=0.5"]) == 2
    err = capsys.readouterr().err
    assert "branch-v1: " in err and f"branch-v1/{ckpt.step_dir_name(18)} was trained under {trained!r}" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "corpus").exists()


def _started_run(run_dir: Path, versions: tuple[str, ...] = (), trained: bool = True) -> None:
    """A run directory whose main path has checkpointed (recorded with configs/tiny.yaml), copied
    from where it trained first; not ``trained``: one that stopped after preparing ``versions``."""
    from raypath.config import load_config
    from raypath.lineage import Lineage

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir.parent / 'copied-from'}"])
    lineage = Lineage.open(run_dir, cfg.name, cfg.to_dict())
    lineage.set_versions([{"name": v, "index": k} for k, v in enumerate(versions)])
    (run_dir / "ray" / "main-v1" / ("step_00000008" if trained else "")).mkdir(parents=True)


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "prepared"])
@pytest.mark.parametrize("override,message", [
    # the tokenizer was trained with 384 tokens: 512 would only be written in the record
    ("data.vocab_size=512", "data.vocab_size: 512 differs from the lineage's 384, which {run_dir} {basis}"),
    ("data.tokenizer_max_chars=1000", "data.tokenizer_max_chars: 1000 differs from the lineage's 200000000"),
    # the versions were tokenized with the run's own tokenizer
    ("data.tokenizer={tmp}/tok", "data.tokenizer: '{tmp}/tok' differs from the lineage's empty"),
    # would rebuild the embedded corpus under the run directory, over the text v1-v3 trained on
    ("data.max_docs_per_version=7", "data.max_docs_per_version: 7 differs from the lineage's 6"),
    # its versions were deduplicated against the index each earlier one left (none was left)
    ("data.dedup=exact", "data.dedup: 'exact' differs from the lineage's 'none'"),
    # the record, its model cards and MLflow experiment keep the name it started with
    ("name=renamed", "name: 'renamed' differs from 'tiny', the name the lineage in {run_dir} started with"),
])
@pytest.mark.parametrize("command", ["run", "prepare"])
def test_run_refuses_a_setting_the_run_directory_was_not_trained_with(override, message, trained, command, tmp_path,
                                                                      capsys):
    """Once the main path has checkpointed, and before (a run stopped in its first segment): the
    versions it prepared were tokenized with the data settings. ``raypath prepare`` checks the same."""
    tiny, run_dir = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "r"
    _started_run(run_dir, ("v1",), trained)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    override = override.format(tmp=tmp_path)
    assert main([command, tiny, "--set", f"run_dir={run_dir}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raypath: error: {tiny}: ")  # the file, then the field
    basis = "was trained with" if trained else "prepared its versions with"
    assert message.format(run_dir=run_dir, tmp=tmp_path, basis=basis) in err
    assert "back to" in err and "new directory" in err
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".locks") == ["lineage.json", "ray"]  # none prepared


def test_fixed_settings_the_run_does_not_read_may_change():
    from raypath.config import ConfigError, load_config
    from raypath.lineage import check_fixed_settings

    recorded = load_config(ROOT / "configs" / "tiny.yaml").to_dict()
    # the tokenizer came with the run; the corpus is the user's (data.seed seeds new versions only)
    recorded["data"].update(tokenizer="/some/tokenizer", corpus="/some/corpus")
    check_fixed_settings({**recorded, "data": {**recorded["data"], "vocab_size": 512, "seed": 1}}, recorded)
    # beside model.path the architecture is the base model's own: the shape fields are ignored
    recorded["model"]["path"] = "/some/model"
    check_fixed_settings({**recorded, "model": {**recorded["model"], "hidden_size": 64, "num_layers": 8}}, recorded)
    with pytest.raises(ConfigError, match="^model.path: '/other/model' differs from the lineage's '/some/model'"):
        check_fixed_settings({**recorded, "model": {**recorded["model"], "path": "/other/model"}}, recorded)
    # the MinHash settings matter to a lineage deduplicated by MinHash only
    check_fixed_settings({**recorded, "data": {**recorded["data"], "minhash_bands": 20}}, recorded)
    recorded["data"]["dedup"] = "minhash"
    with pytest.raises(ConfigError, match="^data.minhash_bands: 20 differs from the lineage's 14"):
        check_fixed_settings({**recorded, "data": {**recorded["data"], "minhash_bands": 20}}, recorded)


def test_run_refuses_a_corpus_without_a_version_the_lineage_has(tmp_path, capsys):
    tiny, run_dir = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "r"
    _started_run(run_dir, ("v1", "v2", "v3"))
    assert main(["run", tiny, "--set", f"run_dir={run_dir}", "--set", "data.versions=[v1,v2]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raypath: error: {tiny}: data.versions: version(s) v3 of the lineage in {run_dir}")
    assert "can only be appended" in err
    # the lineage keeps v3 (v1 and v2 alone would leave main-v3 and its release without a version)
    assert [v["name"] for v in json.loads((run_dir / "lineage.json").read_text())["versions"]] == ["v1", "v2", "v3"]
    assert not (run_dir / "data").exists()


def test_status_of_finished_run(tiny_run, capsys):
    cfg, lin = tiny_run
    assert main(["status", cfg.run_dir]) == 0
    out = capsys.readouterr().out
    for name in ("main-v1", "branch-v3", "v3"):
        assert name in out


def test_status_of_missing_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no lineage record" in capsys.readouterr().err


def test_an_unreachable_ray_address_is_one_error_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # ray.init would retry it for minutes
    rc = main(["run", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run_dir={tmp_path / 'r'}"])
    assert rc == 2 and f"RAY_ADDRESS: cannot reach the Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("address,message", [
    ("http://127.0.0.1:8265", "is a dashboard (job submission) address"),  # what `ray job submit` takes
    ("headnode", "is not host:port, ray://host:port or auto"),
])
def test_a_ray_address_ray_cannot_connect_to_is_named(address, message):
    from raypath.cluster import check_address
    from raypath.config import ConfigError

    with pytest.raises(ConfigError, match=f"cluster.address: .*{re.escape(message)}"):
        check_address(address)
    check_address("auto")  # inside a submitted job: Ray finds the cluster itself


def test_ctrl_c_says_what_is_kept_and_exits_130(ray_cluster, monkeypatch, capsys):
    import ray

    from raypath import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_status", interrupted)
    assert cli.main(["status", "runs/x"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("raypath: interrupted; what finished is kept") and "Traceback" not in err
    # main called with Ray already up (a notebook, these tests) leaves that cluster alone
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 8
