"""Starting a lineage from a released model: a small Llama and its tokenizer saved in bf16 here,
given as a ``file://`` URI (downloaded into the run, sha256-checked), trained for 2 versions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from raypath.config import ConfigError
from raypath.pretrained import ARCHITECTURE_KEYS
from raypath.storage import sha256_file


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    import argparse

    from raypath.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([Path(argparse.__file__).read_text()[:30000]], 320, out)
    return out


def _save_base(out: Path, tok_dir: Path, extra_rows: int = 8, dtype=torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    # Real releases pad the embedding beyond the tokenizer (e.g. to a multiple of 64).
    config = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_tokenizer_checks_name_the_field(tmp_path, tok_dir):
    from raypath.pretrained import check_tokenizer
    from raypath.tokenizer import load_tokenizer

    small = _save_base(tmp_path / "small", tok_dir, extra_rows=-4)
    with pytest.raises(ConfigError, match=r"^model.path: the tokenizer has \d+ tokens but model.path's embedding"):
        check_tokenizer(str(small), load_tokenizer(small), "model.path")
    ok = _save_base(tmp_path / "ok", tok_dir)
    tok = load_tokenizer(ok)
    tok.eos_token = None
    with pytest.raises(ConfigError, match="^data.tokenizer: the tokenizer defines no EOS token"):
        check_tokenizer(str(ok), tok, "data.tokenizer")
    with pytest.raises(ConfigError, match="^data.seq_len: 128 exceeds model.path's max_position_embeddings 64"):
        check_tokenizer(str(ok), load_tokenizer(ok), "model.path", seq_len=128)
    # a fresh model's data.tokenizer is checked too (it failed inside a tokenizing actor: TypeError)
    with pytest.raises(ConfigError, match="^data.tokenizer: the tokenizer defines no EOS token"):
        check_tokenizer(None, tok, "data.tokenizer")
    check_tokenizer(None, load_tokenizer(ok), "data.tokenizer")


def test_a_base_model_whose_head_transforms_its_logits_is_refused(tmp_path, tok_dir):
    # Granite divides its logits by logits_scaling, Gemma 2 soft-caps them: raypath's loss is the plain product
    from raypath.pretrained import check_tokenizer
    from raypath.tokenizer import load_tokenizer

    base = _save_base(tmp_path / "base", tok_dir)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "granite", "logits_scaling": 8.0}))
    with pytest.raises(ConfigError, match=r"^model.path: a granite model transforms its logits \(logits_scaling=8.0\)"):
        check_tokenizer(str(base), load_tokenizer(base), "model.path")


def test_a_base_model_raypath_cannot_train_is_refused_before_training(ray_cluster, tmp_path, tok_dir):
    """A torn weight file, weights of another shape than config.json's, no weights, or a model not laid
    out as Llama's (GPT-2) failed in every Ray Train worker after the data was prepared (exit 1)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from raypath.pretrained import check_model
    from raypath.run import run
    from raypath.tokenizer import load_tokenizer

    torn = _save_base(tmp_path / "torn", tok_dir)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = tiny_config(tmp_path / "run", f"model.path={torn}", "data.versions=[v1]", "train.num_workers=1")
    with pytest.raises(ConfigError, match=f"^model.path: {weights} is not a readable weight file, torn or damaged"):
        run(cfg)
    assert not (tmp_path / "run" / "ray").exists() and not (tmp_path / "run" / "data").exists()

    other = _save_base(tmp_path / "other", tok_dir)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ConfigError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape \[32, 64\], "
                                          r"but .*config.json builds \[32, 96\]"):
        check_model(str(other))
    (other / "config.json").write_text(json.dumps(config))
    bin_dir = tmp_path / "bin"  # a .bin is read as well: memory-mapped, not loaded
    other.rename(bin_dir)
    torch.save(load_file(bin_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    (bin_dir / "model.safetensors").unlink()
    check_model(str(bin_dir))
    (bin_dir / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match="^model.path: .* holds no weights"):
        check_model(str(bin_dir))

    tok = load_tokenizer(tok_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"a gpt2 model \(GPT2LMHeadModel\) is not laid out as .model.layers"):
        check_model(str(tmp_path / "gpt2"))


def test_uri_is_downloaded_once_and_checked(tmp_path, tok_dir, monkeypatch):
    from raypath.mirror import RunDir
    from raypath.pretrained import BASE_DIR, resolve

    src = _save_base(tmp_path / "base", tok_dir)
    # what a hub repo ships next to the model that from_pretrained never reads
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"x" * 1000)
    (src / "training_args.bin").write_bytes(b"y" * 100)
    run_dir = RunDir(tmp_path / "run")
    first = resolve(f"file://{src}", run_dir)
    assert Path(first.local_dir) == run_dir.path / BASE_DIR
    got = {p.name for p in (run_dir.path / BASE_DIR).iterdir()}
    assert "model.safetensors" in got and "tokenizer.json" in got and not {"original", "training_args.bin"} & got
    assert first.sha256 == {"model.safetensors": sha256_file(src / "model.safetensors")}
    weights = run_dir / BASE_DIR / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve(f"file://{src}", run_dir).sha256 == first.sha256 and weights.stat().st_mtime_ns == stamp
    with weights.open("r+b") as f:  # bit rot in the downloaded copy
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(ConfigError, match="does not match its sha256"):
        resolve(f"file://{src}", run_dir)
    with pytest.raises(ConfigError, match="this run started from"):
        resolve(f"file://{tmp_path / 'other'}", run_dir)
    local = resolve(str(src), RunDir(tmp_path / "run2"))  # a local directory is used in place
    assert local.local_dir == str(src) and local.sha256 == first.sha256
    # recorded absolute: the lineage reads "./x" as relative to the run directory, not the cwd
    monkeypatch.chdir(tmp_path)
    assert resolve("./base", RunDir(tmp_path / "run2")).describe()["path"] == str(src)


def test_a_sharded_model_is_downloaded_and_verified_file_by_file(tmp_path, tok_dir, monkeypatch, caplog):
    """Weight shards are copied and hashed several at a time: each digest is its own file's,
    and a bad shard of the copy is the one named. Each pass logs its progress (an 8B model is
    16 GB: minutes to download, tens of seconds to hash at every run start)."""
    import logging

    from transformers import LlamaForCausalLM

    from raypath import console
    from raypath.mirror import RunDir
    from raypath.pretrained import BASE_DIR, resolve

    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="raypath")

    src = _save_base(tmp_path / "one", tok_dir)
    LlamaForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) >= 3
    want = {n: sha256_file(tmp_path / "base" / n) for n in shards}
    assert len(set(want.values())) == len(shards)
    assert resolve(str(tmp_path / "base"), RunDir(tmp_path / "run")).sha256 == want  # used in place
    assert resolve(f"file://{tmp_path / 'base'}", RunDir(tmp_path / "run")).sha256 == want
    assert resolve(f"file://{tmp_path / 'base'}", RunDir(tmp_path / "run")).sha256 == want  # verified, not copied
    lines = "\n".join(r.getMessage() for r in caplog.records)
    for what in (f"hashing the base model's weights in {tmp_path / 'base'}",
                 f"downloading base model file://{tmp_path / 'base'}",
                 f"verifying the downloaded base model {tmp_path / 'run' / BASE_DIR}"):
        line = f"^{re.escape(what)}: [\\d.]+ kB of [\\d.]+ kB \\(\\d+%\\), .*, ETA "
        assert re.search(line, lines, re.M), (what, lines)
    bad = tmp_path / "run" / BASE_DIR / shards[1]
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=f"{bad}.*does not match its sha256"):
        resolve(f"file://{tmp_path / 'base'}", RunDir(tmp_path / "run"))


def test_only_the_weight_files_are_hashed_not_what_a_trainer_saved_next_to_them(tmp_path, tok_dir):
    """transformers' Trainer leaves ``training_args.bin`` (a pickle) and ``optimizer.pt`` next to the
    weights: they are not the model the lineage says it continued."""
    from raypath.mirror import RunDir
    from raypath.pretrained import resolve

    src = _save_base(tmp_path / "base", tok_dir)
    (src / "training_args.bin").write_bytes(b"a pickled TrainingArguments")
    (src / "optimizer.pt").write_bytes(b"the optimizer state")
    want = {"model.safetensors": sha256_file(src / "model.safetensors")}
    assert resolve(str(src), RunDir(tmp_path / "run")).sha256 == want  # used in place
    assert resolve(f"file://{src}", RunDir(tmp_path / "run")).sha256 == want  # downloaded


def test_a_base_model_changed_in_place_is_refused_not_recorded_anew(tmp_path, tok_dir):
    """A lineage records the weights its main path continued; a directory re-saved with other weights
    under the same model.path rewrote that record on the next run."""
    from transformers import LlamaForCausalLM

    from raypath.config import ConfigChangedError
    from raypath.mirror import RunDir
    from raypath.pretrained import resolve

    src = _save_base(tmp_path / "base", tok_dir)
    recorded = resolve(str(src), RunDir(tmp_path / "run")).describe()
    resolve(str(src), RunDir(tmp_path / "run")).check_kept(recorded)
    resolve(str(src), RunDir(tmp_path / "run")).check_kept(None)  # no base recorded yet
    model = LlamaForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(src)
    with pytest.raises(ConfigChangedError, match=rf"^model.path: {src / 'model.safetensors'} changed since this "
                                                 rf"lineage's main path started from it \(sha256 \w{{12}}\.\.\. "
                                                 rf"recorded, \w{{12}}\.\.\. now\)"):
        resolve(str(src), RunDir(tmp_path / "run")).check_kept(recorded)


def test_an_s3_model_path_uses_the_configured_endpoint(s3, tmp_path, tok_dir):
    from conftest import bucket

    from raypath.mirror import RunDir
    from raypath.pretrained import resolve

    src = _save_base(tmp_path / "base", tok_dir)
    name = bucket(s3, "models")
    for f in src.iterdir():
        with s3.fs.open_output_stream(f"{name}/base/{f.name}") as out:
            out.write(f.read_bytes())
    base = resolve(f"s3://{name}/base", RunDir(tmp_path / "run"), s3.endpoint)  # cluster.storage_endpoint
    assert base.sha256 == {"model.safetensors": sha256_file(src / "model.safetensors")}


def test_a_pretrained_model_takes_the_training_tokenizers_eos_and_pad(tmp_path, tok_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypath.config import ModelConfig
    from raypath.model import build_model
    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)  # data.tokenizer: documents are packed with its EOS
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64, bos_token_id=4,
                                 eos_token_id=5, pad_token_id=6)).save_pretrained(base)
    model = build_model(ModelConfig(path=str(base)), len(tok), tok.eos_token_id, tok.pad_token_id)
    assert (tok.eos_token_id, tok.pad_token_id) != (5, 6)
    for conf in (model.config, model.generation_config):  # what a release's config.json and generate() use
        assert (conf.eos_token_id, conf.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def _first_rows_loss(base_dir: Path, stream_path: str, n: int) -> float:
    from transformers import AutoModelForCausalLM

    from raypath.model import block_loss

    table = pq.read_table(stream_path, columns=["idx", "tokens"])
    col = table.column("tokens").combine_chunks()
    blocks = col.values.to_numpy().reshape(len(col), -1)
    first = blocks[np.argsort(table.column("idx").to_numpy(), kind="stable")[:n]]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return block_loss(model, torch.from_numpy(first).long()).item()


def test_lineage_from_a_pretrained_model(ray_cluster, tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM

    from raypath.run import run
    from raypath.tokenizer import TRAIN_INFO_NAME, is_tokenizer_file, load_tokenizer

    src = _save_base(tmp_path / "base", tok_dir)  # a local directory (a URI's download: resolve's tests)
    cfg = tiny_config(tmp_path / "run", f"model.path={src}", "data.versions=[v1]",
                      "data.max_docs_per_version=4", "train.num_workers=1", "train.log_every=1",
                      "train.eval_every=0", "branch.parallel=false")
    lineage = run(cfg).data
    run_dir = Path(cfg.run_dir)

    base = lineage["model"]["base"]
    assert base["path"] == str(src)
    assert base["weights_sha256"] == {"model.safetensors": sha256_file(src / "model.safetensors")}
    saved = json.loads((src / "config.json").read_text())  # the shape trained, not the config's ignored fields
    assert base["architecture"] == {k: saved[k] for k in ARCHITECTURE_KEYS if k in saved}
    assert base["architecture"]["model_type"] == "llama"
    assert base["architecture"]["vocab_size"] == len(load_tokenizer(src)) + 8  # the padded embedding
    assert lineage["tokenizer"]["path"] == str(src)  # the model's own tokenizer
    assert lineage["tokenizer"]["vocab_size"] == len(load_tokenizer(src)) != cfg.data.vocab_size
    assert not (run_dir / "tokenizer" / TRAIN_INFO_NAME).exists()  # no BPE trained for the run ...
    # ... but copies of what an export reads from outside the run directory: no weights
    assert sorted(p.name for p in (run_dir / "tokenizer").iterdir()) == sorted(
        p.name for p in src.iterdir() if is_tokenizer_file(p.name))
    assert sorted(p.name for p in (run_dir / "base_model").iterdir()) == ["config.json", "generation_config.json"]

    # The weights were really loaded: step 1's loss is the saved model's loss on step 1's rows.
    v1 = lineage["versions"][0]
    curve = [json.loads(line) for line in (run_dir / "curves" / "main-v1.jsonl").read_text().splitlines()]
    first = next(r for r in curve if "loss" in r)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(
        _first_rows_loss(src, v1["stream_path"], cfg.train.global_batch_size), rel=1e-4)

    # fp32 master weights although the model was saved in bf16.
    boundary = torch.load(Path(lineage["main_path"][0]["checkpoints"]["end"]) / "model.pt", weights_only=True)
    assert {t.dtype for t in boundary.values()} == {torch.float32}

    base_config = json.loads((src / "config.json").read_text())
    assert base_config["dtype"] == "bfloat16"
    ignore = {"dtype", "torch_dtype", "transformers_version"}
    assert [r["version"] for r in lineage["releases"]] == ["v1"]
    for release in lineage["releases"]:
        model = AutoModelForCausalLM.from_pretrained(release["path"], dtype="auto")
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        released = json.loads((Path(release["path"]) / "config.json").read_text())
        assert {k: v for k, v in released.items() if k not in ignore} == \
               {k: v for k, v in base_config.items() if k not in ignore}

    # An export of a checkpoint builds the base model's architecture and says what it continued.
    from huggingface_hub import ModelCard

    from raypath.export import export

    branch = lineage["branches"][-1]
    for what in ("main-v1", branch["checkpoint"]):  # ./ray/branch-v1/step_N: relative to the run directory
        out = tmp_path / "exports" / Path(what).parent.name
        exported = export(run_dir, what, out, dtype="bf16")
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        stored = torch.load(exported.source.checkpoint / "model.pt", weights_only=True)
        assert all(torch.equal(t.to(torch.bfloat16), model.state_dict()[k]) for k, t in stored.items())
        assert ModelCard.load(out / "README.md").data.raypath["base_model"] == str(src)

    # Exported where the base model's directory is not: from the run directory's copies.
    src.rename(tmp_path / "elsewhere")
    again = export(run_dir, "main-v1", tmp_path / "moved", dtype="bf16")
    assert again.source.checkpoint.parent.name == "main-v1"
    stored = torch.load(again.source.checkpoint / "model.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moved", dtype="auto")
    assert all(torch.equal(t.to(torch.bfloat16), model.state_dict()[k]) for k, t in stored.items())


def test_a_download_takes_the_shards_the_index_names_and_no_other_weights(tmp_path):
    import pyarrow.fs as pafs

    from raypath.pretrained import _model_files

    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    names = ["config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "pytorch_model.bin", "consolidated.00.pth", "flax_model.msgpack"]
    for n in names:
        (tmp_path / n).write_text(json.dumps(index) if n.endswith("index.json") else "x")
    kept = _model_files(pafs.LocalFileSystem(), {n: str(tmp_path / n) for n in names})
    assert sorted(kept) == sorted(names[:5])
