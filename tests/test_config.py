"""Tests of raypath.config: YAML loading, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raypath.config import (
    BranchConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from raypath.schedules import Decay


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _fails(tmp_path: Path, text: str, field: str, name: str = "bad.yaml", overrides=()) -> str:
    """Load ``text`` from a file; it must fail with a ConfigError naming ``field`` and the file."""
    path = _write(tmp_path, text, name)
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides=list(overrides))
    msg = str(exc.value)
    assert field in msg, msg
    assert name in msg, msg
    return msg


# ---------------------------------------------------------------- loading


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.branch.shape == "1-sqrt"
    assert cfg.branch.fraction == 0.2
    assert cfg.train.max_lr == 3e-3
    assert cfg.data.corpus == "embedded"
    assert cfg.train.betas == (0.9, 0.95)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "# only a comment\n", "c.yaml")) == Config()


def test_file_values_load(tmp_path):
    path = _write(tmp_path, """
name: tiny
run_dir: runs/tiny
model:
  hidden_size: 64
  num_heads: 2
  num_kv_heads: 1
  max_position_embeddings: 64
data:
  seq_len: 64
  versions: [v1, v2]
  replay_ratio: 0.25
train:
  max_lr: 1e-3
  warmup_steps: 0
  global_batch_size: 32
  micro_batch_size: 4
  num_workers: 2
  betas: [0.9, 0.99]
branch:
  fraction: 0.1
  shape: exponential
  power: 3
  min_lr_ratio: 0.05
  parallel: false
""")
    cfg = load_config(path)
    assert cfg.name == "tiny"
    assert cfg.run_dir == "runs/tiny"
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_kv_heads) == (64, 2, 1)
    assert cfg.data.seq_len == 64
    assert cfg.data.versions == ["v1", "v2"]
    assert cfg.data.replay_ratio == 0.25
    # PyYAML reads `1e-3` as a string; the loader still makes it the number 0.001
    assert cfg.train.max_lr == pytest.approx(1e-3, rel=1e-15)
    assert isinstance(cfg.train.max_lr, float)
    assert cfg.train.warmup_steps == 0
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.num_workers) == (32, 4, 2)
    assert cfg.train.betas == (0.9, 0.99)
    assert isinstance(cfg.train.betas, tuple)
    assert cfg.branch.power == 3.0 and isinstance(cfg.branch.power, float)
    assert cfg.branch.parallel is False
    assert cfg.branch.decay() == Decay("exponential", 0.05, 3.0)
    # untouched fields keep their defaults
    assert cfg.model.num_layers == ModelConfig().num_layers
    assert cfg.data.vocab_size == DataConfig().vocab_size


def test_overrides_apply(tmp_path):
    path = _write(tmp_path, "train:\n  max_lr: 0.01\n  warmup_steps: 7\nbranch:\n  shape: linear\n")
    cfg = load_config(path, overrides=["train.max_lr=0.001", "branch.shape=cosine"])
    assert cfg.train.max_lr == 0.001
    assert cfg.branch.shape == "cosine"
    assert cfg.train.warmup_steps == 7  # from the file, not overridden
    assert cfg.branch.fraction == BranchConfig().fraction


def test_overrides_without_a_file_and_new_sections():
    cfg = load_config(overrides=["train.max_lr=0.001", "branch.shape=cosine", "data.versions=[a, b]",
                                 "name=exp1", "branch.parallel=false"])
    assert cfg.train.max_lr == 0.001
    assert cfg.branch.shape == "cosine"
    assert cfg.data.versions == ["a", "b"]
    assert cfg.name == "exp1"
    assert cfg.branch.parallel is False
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps


def test_numbers_in_exponent_form_load_in_pairs_as_in_every_number_field():
    # YAML reads 5e-2 (no dot) as a string; number fields convert it, pairs must too
    cfg = load_config(overrides=["sweep.fraction=[5e-2, 0.4]", "train.betas=[9e-1, 0.95]", "branch.fraction=5e-2"])
    assert cfg.sweep.fraction == (0.05, 0.4) and cfg.train.betas == (0.9, 0.95) and cfg.branch.fraction == 0.05
    with pytest.raises(ConfigError, match=r"train\.betas\[1\]: expected a number, got 'fast'"):
        load_config(overrides=["train.betas=[0.9, fast]"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="train.max_lr"):
        load_config(overrides=["train.max_lr"])


def test_bad_override_names_the_field():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["branch.fraction=1.0"])
    assert "branch.fraction" in str(exc.value)


# ---------------------------------------------------------------- errors name the field


def test_unknown_decay_shape(tmp_path):
    msg = _fails(tmp_path, "branch:\n  shape: cosinus\n", "branch.shape")
    assert "cosinus" in msg


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1", "0.0", "1.0"])
def test_branch_fraction_out_of_range(tmp_path, fraction):
    _fails(tmp_path, f"branch:\n  fraction: {fraction}\n", "branch.fraction")


def test_branch_fraction_inside_range_loads(tmp_path):
    for f in (0.01, 0.5, 0.99):
        assert load_config(_write(tmp_path, f"branch:\n  fraction: {f}\n")).branch.fraction == f


def test_missing_corpus_directory(tmp_path):
    missing = tmp_path / "no-such-corpus"
    msg = _fails(tmp_path, f"data:\n  corpus: {missing}\n", "data.corpus")
    assert str(missing) in msg


def test_existing_corpus_directory_loads(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    assert load_config(_write(tmp_path, f"data:\n  corpus: {corpus}\n")).data.corpus == str(corpus)


def test_sequence_longer_than_the_model_accepts(tmp_path):
    msg = _fails(tmp_path, "model:\n  max_position_embeddings: 128\ndata:\n  seq_len: 256\n",
                 "model.max_position_embeddings")
    assert "256" in msg and "128" in msg
    # equal is fine
    cfg = load_config(_write(tmp_path, "model:\n  max_position_embeddings: 256\ndata:\n  seq_len: 256\n"))
    assert cfg.data.seq_len == 256


def test_unknown_key_typo(tmp_path):
    msg = _fails(tmp_path, "branch:\n  shap: cosine\n", "branch.shap")
    assert "shap" in msg
    assert "unknown" in msg


def test_unknown_top_level_section(tmp_path):
    _fails(tmp_path, "trian:\n  max_lr: 0.001\n", "trian")


@pytest.mark.parametrize("text,field", [
    ("train:\n  max_lr: fast\n", "train.max_lr"),
    ("train:\n  num_workers: 2.5\n", "train.num_workers"),
    ("train:\n  warmup_steps: ten\n", "train.warmup_steps"),
    ("train:\n  use_gpu: maybe\n", "train.use_gpu"),
    ("data:\n  versions: v1\n", "data.versions"),
    ("data:\n  seq_len: true\n", "data.seq_len"),
    ("branch:\n  power: [2]\n", "branch.power"),
    ("data:\n  tokenizer: 5\n", "data.tokenizer"),
    ("train: 5\n", "train"),
], ids=["float-str", "int-float", "int-str", "bool-str", "list-str", "int-bool", "float-list",
        "optional-str-int", "section-int"])
def test_wrong_types(tmp_path, text, field):
    _fails(tmp_path, text, field)


@pytest.mark.parametrize("text,field", [
    ("name: 3\n", "name"),
    ("run_dir: 7\n", "run_dir"),
    ("data:\n  text_column: [a]\n", "data.text_column"),
    ("data:\n  corpus: 5\n", "data.corpus"),
], ids=["name-int", "run_dir-int", "text_column-list", "corpus-int"])
def test_wrong_types_of_plain_str_fields(tmp_path, text, field):
    _fails(tmp_path, text, field)


@pytest.mark.parametrize("betas", ["0.9", "fast", "[0.9]", "[0.9, 0.95, 0.99]"])
def test_wrong_betas(tmp_path, betas):
    _fails(tmp_path, f"train:\n  betas: {betas}\n", "train.betas")


@pytest.mark.parametrize("train", [
    "global_batch_size: 16\n  micro_batch_size: 3\n  num_workers: 1",
    "global_batch_size: 16\n  micro_batch_size: 4\n  num_workers: 3",
    "global_batch_size: 20\n  micro_batch_size: 8\n  num_workers: 1",
])
def test_global_batch_not_divisible(tmp_path, train):
    msg = _fails(tmp_path, f"train:\n  {train}\n", "train.global_batch_size")
    assert "micro_batch_size" in msg


def test_global_batch_divisible_loads(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  global_batch_size: 24\n  micro_batch_size: 4\n  num_workers: 3\n"))
    assert cfg.train.global_batch_size == 24


@pytest.mark.parametrize("train,field", [
    ("micro_batch_size: 0", "train.micro_batch_size"),
    ("micro_batch_size: -8", "train.micro_batch_size"),
    ("global_batch_size: 0", "train.global_batch_size"),
])
def test_batch_sizes_must_be_positive(tmp_path, train, field):
    _fails(tmp_path, f"train:\n  {train}\n", field)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert "nowhere.yaml" in str(exc.value)
    assert "not found" in str(exc.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text,field", [
    ("branch:\n  min_lr_ratio: 1.0\n", "branch.min_lr_ratio"),
    ("branch:\n  power: 0\n", "branch.power"),
    ("data:\n  replay_ratio: 1.0\n", "data.replay_ratio"),
    ("data:\n  seq_len: 4\n", "data.seq_len"),
    ("model:\n  num_heads: 3\n", "model.num_heads"),
    ("model:\n  hidden_size: 24\n  num_heads: 8\n  num_kv_heads: 1\n", "model.num_heads"),  # head size 3: RoPE
    ("sweep:\n  seed: -1\n", "sweep.seed"),  # Optuna refused it after the sweep had recorded its settings
    ("data:\n  seed: -1\n", "data.seed"),
    ("train:\n  seed: 18446744073709551616\n", "train.seed"),
    ("train:\n  max_lr: 1.0e-3\ndata:\n  seed: 1\ntrain:\n  warmup_steps: 3\n",
     "'train' is given twice (lines 1 and 5)"),  # YAML kept the second section alone
    ("model:\n  num_kv_heads: 3\n", "model.num_kv_heads"),
    ("train:\n  num_workers: 0\n", "train.num_workers"),
    ("train:\n  max_lr: 0\n", "train.max_lr"),
    ("train:\n  warmup_steps: -1\n", "train.warmup_steps"),
    # each of these used to load, then crash or misbehave in a worker
    ("train:\n  grad_clip: -1\n", "train.grad_clip"),  # clip_grad_norm_ with -1 flips the gradient
    ("train:\n  betas: [1.5, 0.95]\n", "train.betas"),
    ("train:\n  weight_decay: -0.1\n", "train.weight_decay"),
    ("train:\n  eval_every: -1\n", "train.eval_every"),
    ("train:\n  cpus_per_worker: -1\n", "train.cpus_per_worker"),
    ("train:\n  elastic_resize_interval_s: 0\n", "train.elastic_resize_interval_s"),
    ("model:\n  num_heads: 0\n", "model.num_heads"),  # was a ZeroDivisionError
    ("model:\n  num_kv_heads: 0\n", "model.num_kv_heads"),
    ("model:\n  hidden_size: 0\n", "model.hidden_size"),
    ("model:\n  num_layers: -2\n", "model.num_layers"),
    ("model:\n  intermediate_size: 0\n", "model.intermediate_size"),
    ("model:\n  rope_theta: -1\n", "model.rope_theta"),
    ("data:\n  max_docs_per_version: 1\n", "data.max_docs_per_version"),
    ("data:\n  versions: [v1, v2, v1]\n", "data.versions"),  # v1's second entry read as trained already
    ("data:\n  tokenizer_max_chars: 0\n", "data.tokenizer_max_chars"),
    ("data:\n  dedup: fuzzy\n", "data.dedup"),
    ("data:\n  minhash_bands: 0\n", "data.minhash_bands"),
    ("data:\n  minhash_threshold: 1.5\n", "data.minhash_threshold"),
    ("data:\n  dedup: minhash\n  minhash_bands: 1\n", "data.minhash_bands"),  # nothing left to estimate from
    ("data:\n  dedup: minhash\n  minhash_bands: 100\n  minhash_rows: 100\n", "data.minhash_rows"),
    ("data:\n  corpus: ''\n", "data.corpus"),  # Path('') is the working directory
    ("run_dir: ''\n", "run_dir"),
    ("name: ' '\n", "name"),
    ("cluster:\n  num_cpus: 0\n", "cluster.num_cpus"),
    ("train:\n  max_lr: .inf\n", "train.max_lr"),
    ("branch:\n  power: .nan\n", "branch.power"),
    ("sweep:\n  power: [1, .inf]\n", "sweep.power"),
    ("sweep:\n  weights: {old: .inf, new: 1}\n", "sweep.weights.old"),
    # a query would end up inside every file name joined onto the URI
    ("run_dir: 's3://bucket/runs/a?endpoint_override=localhost:9000'\n", "run_dir"),
    ("data:\n  corpus: 's3://bucket/corpus#v2'\n", "data.corpus"),
    ("model:\n  path: 's3://bucket/base?region=eu-west-1'\n", "model.path"),
])
def test_other_range_checks_name_the_field(tmp_path, text, field):
    _fails(tmp_path, text, field)


def test_a_model_path_without_a_tokenizer_needs_data_tokenizer(tmp_path):
    """The tokenizer defaults to model.path's own: one it lacks failed after Ray had started."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    msg = _fails(tmp_path, f"model:\n  path: {model}\n", "model.path")
    assert "has no tokenizer.json" in msg and "set data.tokenizer" in msg
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert load_config(_write(tmp_path, f"model:\n  path: {model}\ndata:\n  tokenizer: {tok}\n")).model.path


@pytest.mark.parametrize("text,field,hint", [
    ("trian:\n  max_lr: 0.001\n1: x\n", "1", "unknown field"),  # str and int keys: sorted by str
    ("train:\n  on: true\n  warmup: 10\n", "train.True", "quote it"),  # YAML 1.1 reads `on` as true
])
def test_unknown_keys_of_any_yaml_type_are_named(tmp_path, text, field, hint):
    assert hint in _fails(tmp_path, text, field)


# ---------------------------------------------------------------- round trip


def _custom(tmp_path: Path) -> Config:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    return load_config(overrides=[
        "name=rt", f"data.corpus={corpus}", "data.versions=[v2, v1]", "data.max_docs_per_version=50",
        "train.betas=[0.8, 0.9]", "train.max_lr=0.0007", "branch.shape=polynomial", "branch.power=1.5",
        "cluster.num_cpus=12", "cluster.address=auto", "model.rope_theta=500000",
    ])


def test_to_dict_round_trips_through_config_from_dict(tmp_path):
    for cfg in (Config(), _custom(tmp_path)):
        raw = cfg.to_dict()
        assert isinstance(raw, dict) and isinstance(raw["train"], dict)
        back = config_from_dict(raw)
        assert back == cfg
        assert back.to_dict() == raw
        assert isinstance(back.train.betas, tuple)


def test_custom_round_trip_keeps_values(tmp_path):
    back = config_from_dict(_custom(tmp_path).to_dict())
    assert back.name == "rt"
    assert back.data.versions == ["v2", "v1"]
    assert back.data.max_docs_per_version == 50
    assert back.train.betas == (0.8, 0.9)
    assert back.branch.shape == "polynomial" and back.branch.power == 1.5
    assert back.cluster.num_cpus == 12 and back.cluster.address == "auto"
    assert back.model.path is None


def test_to_dict_round_trips_through_yaml(tmp_path):
    # run.py saves cfg.to_dict() with yaml.safe_dump as the run's config.yaml
    cfg = _custom(tmp_path)
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(path) == cfg


def test_config_from_dict_validates():
    raw = Config().to_dict()
    raw["branch"]["fraction"] = 1.5
    with pytest.raises(ConfigError, match="branch.fraction"):
        config_from_dict(raw)
    raw = Config().to_dict()
    raw["branch"]["shap"] = "cosine"
    with pytest.raises(ConfigError, match="shap"):
        config_from_dict(raw)
