"""Run configuration: one YAML file, one dataclass per component.

Every field is documented where it is declared. ``load_config`` rejects unknown
keys and bad values *before* anything trains, with a message that names the
file and the dotted field (``quickstart.yaml: branch.shape: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlparse

import yaml

from raypath.schedules import SHAPES, Decay
from raypath.sources import URI_SCHEMES, is_uri

#: ``train.precision`` values.
PRECISIONS = ("fp32", "bf16")
#: ``train.parallel`` values.
PARALLEL = ("ddp", "fsdp")
#: ``sweep.guide`` values.
GUIDES = ("law", "none")
#: ``tracking.backend`` values.
TRACKING_BACKENDS = ("tensorboard", "mlflow", "none")
DEDUP_MODES = ("none", "exact", "minhash")  # data.dedup (raypath.dedup)
#: ``model.attn_implementation`` values (transformers' names).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


class ConfigChangedError(ConfigError):
    """A config value differs from what the run directory was trained with. The check sees the
    loaded config only: the CLI names the config file in front of the message."""


@dataclass
class ModelConfig:
    """A Llama-family causal LM built from a transformers config (or a local checkpoint).

    path: ``save_pretrained`` directory to start from: a local path, or a URI on
        any pyarrow filesystem (``s3://``, ``gs://``, ``file://``), downloaded once
        into ``RUN_DIR/base_model`` and checked by sha256. When set, the architecture
        is the model's own: every field below but ``attn_implementation`` is ignored
        (sizes, ``max_position_embeddings``, ``tie_word_embeddings``, ``rope_theta``);
        the weights load as fp32 master weights whatever dtype they were saved in, and
        the tokenizer defaults to the model's own.
    hidden_size: model width.
    num_layers: decoder blocks.
    num_heads: attention heads; must divide ``hidden_size`` into an even head size.
    num_kv_heads: key/value heads (GQA); must divide ``num_heads``.
    intermediate_size: SwiGLU MLP width.
    max_position_embeddings: longest sequence the model accepts; must be >= data.seq_len.
    tie_word_embeddings: share input embedding and LM head (saves params on small models).
    rope_theta: RoPE base.
    attn_implementation: transformers attention kernel: ``sdpa`` (PyTorch
        scaled-dot-product attention; flash/memory-efficient kernels on GPU),
        ``eager`` (plain matmuls, for debugging) or ``flash_attention_2``
        (needs CUDA, bf16 and the ``flash-attn`` package).
    """

    path: str | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    """Versioned corpus and its tokenization.

    corpus: ``embedded`` (the default corpus built from the Python standard
        library, no download) or a directory -- a local path or a URI on any pyarrow
        filesystem (``s3://bucket/corpus``) -- with one sub-directory per version,
        each holding ``train/`` and ``val/`` files (``.jsonl``, ``.jsonl.gz``,
        ``.parquet``, or the ``.arrow`` files of a Hugging Face ``datasets`` ``save_to_disk``).
    versions: which version sub-directories to use, in order; empty = all, sorted by name
        with numbers compared as numbers (``v2`` before ``v10``).
    max_docs_per_version: cap on documents per version (embedded corpus only; for tiny runs).
    text_column: column holding the document text.
    seq_len: tokens per training sequence (blocks hold ``seq_len + 1`` tokens).
    tokenizer: local tokenizer directory; empty = model.path's own tokenizer when
        model.path is set, else train a byte-level BPE on version 1.
    vocab_size: vocabulary size of the tokenizer trained on version 1.
    tokenizer_max_chars: characters of version 1's train text the tokenizer is trained
        on (its first documents, in file order); bounds that step on a large version.
    val_blocks: fixed evaluation budget per version split, in sequences. Sweeps, the
        law and release decisions read these splits.
    test_blocks: held-out test split per version, in sequences, that no selection
        reads: evaluated at the end of every segment and reported next to val.
        Taken from the version's ``test/`` folder when it has one, else from its val
        files' blocks right after the val split's. None = ``val_blocks``; 0 = none.
    replay_ratio: fraction of each version's stream drawn from older versions, in [0, 1).
    tokenize_actors: Ray Data actors that tokenize in parallel.
    seed: seed of stream order and replay sampling.
    on_bad_input: ``error`` stops at the first bad file or document with its
        name (and line); ``skip`` drops it, logs it and counts it in the manifest.
    max_doc_chars: longest document accepted, in characters; 0 = no limit.
    dedup: ``exact`` drops, before tokenizing, each train document whose text is one
        an earlier version trained, one of this or an earlier version's val/test documents,
        or repeated earlier in this version (counted per version in the data manifest, with
        the val/test documents an earlier version trained, which stay and are warned about);
        ``minhash`` drops near-duplicates of those by MinHash LSH (below); ``none`` trains
        every document. Fixed for a lineage.
    minhash_bands, minhash_rows: with ``dedup: minhash``, a document's MinHash values are
        ``bands`` x ``rows``, hashed per band; two documents whose word-shingle Jaccard
        similarity is s share a band, and the later one is a candidate duplicate, with
        probability 1 - (1 - s^rows)^bands (14 x 8: 0.4% at s = 0.5, 50% at 0.72, 94% at 0.8).
    minhash_shingle: words per shingle (lowercased text split on whitespace).
    minhash_threshold: a candidate is dropped when its similarity to the document it shares
        a band with, estimated from their other bands' MinHash values, is at least this
        (each hash row then carries 2 bits a value: bands x rows / 4 bytes, 28 at 14 x 8);
        0 drops every candidate (a shared paragraph can be enough).
    """

    corpus: str = "embedded"
    versions: list[str] = field(default_factory=list)
    max_docs_per_version: int | None = None
    text_column: str = "text"
    seq_len: int = 128
    tokenizer: str | None = None
    vocab_size: int = 4096
    tokenizer_max_chars: int = 200_000_000
    val_blocks: int = 32
    test_blocks: int | None = None
    replay_ratio: float = 0.0
    tokenize_actors: int = 1
    seed: int = 0
    on_bad_input: str = "error"
    max_doc_chars: int = 1_000_000
    dedup: str = "none"
    minhash_bands: int = 14
    minhash_rows: int = 8
    minhash_shingle: int = 5
    minhash_threshold: float = 0.7


@dataclass
class TrainConfig:
    """The main path's optimisation; branches reuse it with their own decaying LR.

    num_workers: Ray Train workers (DDP ranks); the maximum when elastic.
    min_workers: elastic lower bound; 0 = fixed at ``num_workers``. On resize or
        failure Ray restarts the worker group from the latest checkpoint; the
        global batch stays fixed (accumulation adapts), so steps keep their meaning.
    max_failures: worker-group restarts tolerated per segment (Ray's FailureConfig);
        -1 = unlimited. Each restart resumes from the newest valid checkpoint.
    elastic_resize_interval_s: how often an elastic group checks whether it can
        grow (Ray's ``elastic_resize_monitor_interval_s``).
    use_gpu: one GPU per worker, NCCL; otherwise CPU and gloo.
    cpus_per_worker: CPUs each worker reserves.
    global_batch_size: sequences per optimizer step, fixed whatever the world size.
    micro_batch_size: sequences per forward pass per worker; gradient accumulation
        is ``global_batch_size / (micro_batch_size * num_workers)``.
    max_lr: the main path's constant LR after warmup (the branches' peak).
    warmup_steps: linear warmup at the very start of the main path (once).
    weight_decay: AdamW decoupled weight decay on matrices (not norms/biases).
    betas: AdamW betas.
    grad_clip: max global gradient norm; 0 disables clipping.
    log_every: steps between progress reports (loss, lr, tokens/s, ETA).
    eval_every: steps between validation passes; 0 = only at segment ends.
    checkpoint_every: steps between extra checkpoints for fault tolerance;
        0 = only at fork points and version boundaries (and by time, below).
    checkpoint_every_minutes: also checkpoint once this much wall time has passed
        since the last checkpoint (checked every ``log_every`` steps), so a lost
        worker costs at most this much training; 0 = off.
    keep_checkpoints: keep only the newest N complete periodic checkpoints of a
        segment (step- or time-based); fork points and version boundaries are never
        pruned, torn ones (a crash mid-save) go once a newer one is complete.
        0 = keep all (a sweep can then fork from any of them). A running branch keeps
        at most the newest 2 (nothing forks from it), and its final checkpoint only once
        it finishes (the others were there to resume it), which holds its weights, not
        the optimizer state (nothing trains on from it); a sweep trial the law stopped
        keeps none (its curve stays).
    async_checkpoint: write checkpoints with DCP's asynchronous save: the state is
        copied to host memory and written by a background thread while training
        goes on; the checkpoint counts once its manifest is written. Implies the
        sharded layout (also under ddp).
    seed: model init and dropout seed.
    precision: ``fp32`` or ``bf16``. bf16 is autocast mixed precision (bf16
        matmuls, fp32 master weights and optimizer state, loss in fp32): the
        GPU setting. On CPU it runs too (CPU autocast), but is usually slower
        than fp32 unless the CPU has bf16 units (AMX).
    compile: ``torch.compile`` each decoder block and the loss (first steps pay the compile;
        the blocks share one graph, :func:`raypath.model.compile_blocks`, in which q/k/v and
        gate/up run as one matmul each; the chunked loss compiles one chunk's work,
        :func:`raypath.loss.compile_loss`).
    activation_checkpointing: recompute each decoder block's activations in the
        backward pass (transformers' gradient checkpointing): ~1/3 more compute
        for much less activation memory.
    parallel: ``ddp`` (replicated model, all-reduced gradients) or ``fsdp``
        (FSDP2 ``fully_shard``: parameters, gradients and optimizer state
        sharded across workers, per decoder block; for models that do not fit
        one GPU). Under fsdp the model is built on the meta device, sharded,
        then filled one tensor at a time (fresh init with the same values as
        ddp's, a base model's files, or a checkpoint): no rank ever holds the
        whole model. Every rank saves its own shards
        (``torch.distributed.checkpoint``), and a branch's exported model is
        written by every rank, each its share of the weights: nothing gathers the
        full state. Under ddp rank 0 saves the full state.
        Either resumes the other, at any world size.
    peak_flops: peak FLOP/s of one device for MFU; empty = looked up from the
        GPU's name (bf16 dense tensor-core peak, :data:`raypath.perf.PEAK_FLOPS`).
        CPUs have no entry: MFU is only reported on CPU when this is set.
    kernels: ``none`` (plain PyTorch) or ``liger``: Liger Kernel's Triton RMSNorm,
        SwiGLU, RoPE and fused linear cross-entropy (CUDA only; the ``liger``
        extra, ``pip install 'raypath[liger]'``). Weights stay plain Llama either way.
        Liger patches transformers' Llama module for the whole worker process, so a
        Llama built later there runs its kernels too.
    loss_chunk_tokens: with ``kernels: none``, the loss takes the LM head and the
        cross-entropy this many tokens at a time and never materialises the full
        ``[tokens, vocab]`` logits (:mod:`raypath.loss`); 0 = full logits (the
        unchunked baseline). Ignored by ``liger``, whose fused loss chunks by itself.
    """

    num_workers: int = 1
    min_workers: int = 0
    max_failures: int = 3
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    global_batch_size: int = 16
    micro_batch_size: int = 8
    max_lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 0
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 0
    async_checkpoint: bool = False
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"
    peak_flops: float | None = None
    kernels: str = "none"
    loss_chunk_tokens: int = 4096


@dataclass
class BranchConfig:
    """How each released version is finished.

    fraction: share of the version's new data the branch re-trains with a
        decaying LR, in (0, 1); the fork is the main-path checkpoint before it.
    shape: decay shape, one of cosine, linear, 1-sqrt, exponential, polynomial.
    min_lr_ratio: final LR / max LR, in [0, 1); the branch's last step trains at it,
        whatever the shape and length (a branch forked inside the warmup at an LR
        still below it holds that LR: a branch never rises).
    power: exponent of ``polynomial`` / e-foldings of ``exponential``.
    parallel: run version k's branch while the main path trains version k+1.
    """

    fraction: float = 0.2
    shape: str = "1-sqrt"
    min_lr_ratio: float = 0.0
    power: float = 2.0
    parallel: bool = True

    def decay(self) -> Decay:
        return Decay(self.shape, self.min_lr_ratio, self.power)


@dataclass
class SweepConfig:
    """The ``sweep:`` section: what one branch search (``raypath sweep``) explores.

    name: sweep name; its directory is ``RUN_DIR/sweeps/<version>/<name>``. Re-running
        with the same name resumes that sweep; a new name starts a new one.
    num_samples: trials (branches) to run.
    max_concurrent: trials running at once; 0 = derive from the cluster's resources
        (CPUs / (train.num_workers x train.cpus_per_worker + 1 for the trial's data
        pipeline), and GPUs / train.num_workers when train.use_gpu), capped by num_samples.
        Fixed when the sweep starts: a resumed sweep keeps it.
    seed: seed of Optuna's TPE sampler (same seed, same proposals).
    startup_trials: trials TPE samples at random before it models the results;
        0 = ``min(10, max(max_concurrent, num_samples // 2))``.
    fraction: [lo, hi] range of the branch length as a fraction of the version's
        stream (its steps); each proposal is snapped to the nearest main-path
        checkpoint (``train.checkpoint_every`` gives more of them).
    shapes: decay shapes to try (cosine, linear, 1-sqrt, exponential, polynomial).
    power: [lo, hi] range of the power of ``polynomial`` / e-foldings of ``exponential``.
    min_lr_ratio: [lo, hi] range of the final LR / max LR, within [0, 1).
    replay_ratios: share of a branch's rows drawn from older versions, one value per
        choice; empty = the stream's own ``data.replay_ratio``. A branch keeps its
        length (the rows the main path had left after the fork); another ratio swaps
        that many of them for seeded samples of older versions (or of the version's
        own blocks, when below the stream's ratio).
    weights: ``{old, new}`` weights of the objective ``w_old * mean(val loss of the
        versions before K) + w_new * val loss of version K`` (normalised to sum to 1;
        a key left out weighs 0; for the first version the objective is its own val loss).
    token_budget: hard cap on a branch's tokens; longer branches are never proposed
        (fork points beyond it are excluded). Empty = no cap.
    compute_penalty: ``score = objective + compute_penalty * branch tokens / version
        tokens``: trades loss for compute; 0 = loss only.
    pin: trial id (or branch name) of this sweep to release instead of the best trial; one that
        names no trial the sweep has started is refused before any trial trains.
    keep_trials: finished trials that keep their weights (final checkpoint and exported
        model): the best N by score, plus the pinned one; the others' are deleted as soon
        as N better ones have finished (records, metrics and curves stay; such a trial can
        no longer be released), and a trial that ends behind N finished ones exports
        nothing. Bounds a sweep's disk at about N + max_concurrent branches
        instead of one per trial. 0 = keep every trial's. Not fixed when the sweep
        starts: a re-run with a smaller N deletes down to it.
    guide: ``law`` = the continual-pre-training law (fitted on the lineage's curves,
        refitted after every finished trial, in the background while Tune starts and
        stops trials (trials finishing during a refit are fitted together by the
        next); each split's law form and lambda are
        chosen again once the finished trials have doubled, after trial 1, 2, 4, 8,
        ...) ranks a dense grid of candidates by predicted score (objective plus
        the compute penalty, what Optuna and the release compare) and
        Optuna evaluates the best ``guide_points`` of them first; trials whose
        forecast final score cannot beat the best finished one are stopped. If
        a split the objective weighs has too few points for a law, plain TPE.
        Before a branch of the version has finished, a decay is taken to gain
        what it did in the nearest earlier phase; before any branch at all,
        nothing is enqueued (the stopping stays).
        ``none`` = plain TPE.
    guide_points: predicted-best candidates enqueued before TPE samples;
        0 = ``min(4, num_samples // 2)``.
    guide_sweeps: the law also fits the finished trials of earlier sweeps (up to
        this version); false = only the main path and the configured release
        branches (``branch``; not sweep winners released in their place), e.g.
        to compare a guided sweep with an unguided one run before it on equal terms
        (``benchmarks/law_accuracy.py``). Its own trials are always fitted.
    stop_margin: relative margin of the law stopper: a trial stops when its
        forecast score is worse than the best finished one by more than this;
        0 = never stop a trial early. (1%: in the law benchmark a 0.5% margin
        stopped one trial that would have finished 0.2% from the best.)
    stop_min_progress: share of a branch that must be trained before it can be stopped.
    """

    name: str = "sweep"
    num_samples: int = 8
    max_concurrent: int = 0
    seed: int = 0
    startup_trials: int = 0
    fraction: tuple[float, float] = (0.05, 0.4)
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    power: tuple[float, float] = (1.0, 4.0)
    min_lr_ratio: tuple[float, float] = (0.0, 0.1)
    replay_ratios: list[float] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=lambda: {"old": 0.5, "new": 0.5})
    token_budget: float | None = None
    compute_penalty: float = 0.0
    pin: str | None = None
    keep_trials: int = 0
    guide: str = "law"
    guide_points: int = 0
    guide_sweeps: bool = True
    stop_margin: float = 0.01
    stop_min_progress: float = 0.25


@dataclass
class ClusterConfig:
    """Where Ray runs.

    address: Ray cluster address; empty = ``RAY_ADDRESS`` if set, else start a local cluster.
    num_cpus: logical CPUs of a local cluster; empty = max(8, 2 x cores), so Ray
        Data tasks still get CPU slots while train workers hold theirs.
    local_dir: local mirror of a remote ``run_dir`` (``s3://...``): the driver
        and every node keep the files they work on here, at this same absolute
        path (so it must be creatable on every node); empty =
        ``~/.cache/raypath/<scheme>/<bucket>/<prefix>``. Resume a run with the
        local_dir it started with (checked). Unused for a local ``run_dir``.
    storage_endpoint: S3 endpoint URL of a remote ``run_dir`` for S3-compatible
        stores (MinIO, Ceph, moto), e.g. ``http://10.0.0.5:9000``; empty = the
        driver's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS.
        Credentials come from each node's environment (``AWS_ACCESS_KEY_ID``,
        ...), profile or instance role, never from the config.
    """

    address: str | None = None
    num_cpus: int | None = None
    local_dir: str | None = None
    storage_endpoint: str | None = None


@dataclass
class TrackingConfig:
    """Where rank 0 logs metrics, besides the run's ``curves/*.jsonl``.

    Logged at every log step and evaluation: loss, lr, tokens/s, MFU, data wait
    and every ``val/*`` loss; the resolved config as parameters; version,
    segment kind and fork step as tags.

    backend: ``tensorboard`` (event files under ``RUN_DIR/tb/<segment>/``; needs
        the ``tensorboard`` extra), ``mlflow`` (needs the ``mlflow`` extra) or ``none``.
    mlflow_uri: MLflow tracking URI (``http://host:5000``, ``databricks``,
        ``sqlite:///path.db``); empty = the driver's ``MLFLOW_TRACKING_URI``, else
        ``sqlite:///RUN_DIR/mlflow.db``, its artifacts in ``RUN_DIR/mlartifacts/`` (one machine;
        a cluster, or a run directory in a bucket, needs a tracking server). One parent
        run per lineage, one child run per main-path segment, branch and sweep trial; a
        resumed segment's re-trained steps appear twice in MLflow's metric history (it
        cannot delete points; curves and TensorBoard keep the surviving attempt's).
    experiment: MLflow experiment name; empty = the run's ``name``.
    """

    backend: str = "tensorboard"
    mlflow_uri: str | None = None
    experiment: str | None = None


@dataclass
class CompareConfig:
    """The ``compare:`` section: what ``raypath compare`` trains next to the lineage.

    paper_baselines: also train PTFS and CPT with a cosine decay to the branch's floor,
        arXiv 2410.04103's setting, shown as their own rows (none when the branch is cosine
        already: the headline rows are the paper's then). The headline baselines
        always decay with the branch's shape, power and floor (shape-matched), so the
        comparison measures the paradigm, not the decay shape.
    replay_ratios: also run path switching with each of these ``data.replay_ratio``
        values (a whole lineage each, under ``RUN_DIR/compare/replay-R/``), so the
        forgetting trade-off is measured; the run's own ratio is always there.
    """

    paper_baselines: bool = False
    replay_ratios: list[float] = field(default_factory=lambda: [0.05, 0.25])


@dataclass
class Config:
    """A whole lineage run.

    name: run name (used in logs and model cards).
    run_dir: where everything of the run lives: data, checkpoints, lineage, releases.
    """

    name: str = "raypath"
    run_dir: str = "runs/raypath"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be ints or bools (``on:``)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if isinstance(unknown[0], bool):
            hint = "YAML reads a bare on/off/yes/no key as true/false: quote it; " + hint
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field "
                          f"({hint}known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Type checking from the dataclass hints: YAML gives ints for floats, lists for tuples."""
    members = get_args(hint) if isinstance(hint, types.UnionType) else ()
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{path}: must be set (expected {_type_name(hint)})")
    if members:  # ``X | None`` with a value: check it as an X
        hint = next(m for m in members if m is not type(None))
    origin, args = get_origin(hint), get_args(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # no field means anything by inf or nan
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a pair of finite numbers like [0.9, 0.95], got {value!r}")
        return tuple(_coerce(v, float, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if args[0] is str:  # names: YAML may read v1 as a string but 2024 as an int
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{path}: expected a list of names, got {value!r}")
            return [str(v) for v in value]
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # e.g. --set a=1 --set a.b=2
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {dotted!r}: {where} is {node!r}, not a section")
    node[leaf] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping: YAML keeps the last silently, so a
    second ``train:`` section replaced the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                    f"the second would replace the first", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {at}not valid YAML ({getattr(e, 'problem', None) or e})") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate it."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{source}: is a directory, not a config file (commands that read a run take "
                              f"its directory as RUN_DIR: raypath status RUN_DIR)")
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: cannot read the config file ({e})") from None
        raw = _yaml(text, source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        _set_dotted(raw, key.strip(), _yaml(value, f"override {item!r}"))
    try:
        cfg = _build(Config, raw, "")
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _check(ok: bool, field_path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_path}: {message}")


def validate(cfg: Config) -> None:
    """Everything that can be checked without touching data or Ray, section by section."""
    for name in ("name", "run_dir"):  # "" would be the working directory
        _check(bool(getattr(cfg, name).strip()), name, "must not be empty")
    _validate_places(cfg)
    _validate_data(cfg.data)
    _validate_model(cfg.model, cfg.data, cfg.train)
    _validate_train(cfg.train)
    _validate_branch(cfg.branch)
    _validate_sweep(cfg.sweep)
    for r in cfg.compare.replay_ratios:
        _check(0.0 <= r < 1.0, "compare.replay_ratios", f"each must be in [0, 1), got {r}")
    for name, seed in (("data.seed", cfg.data.seed), ("train.seed", cfg.train.seed), ("sweep.seed", cfg.sweep.seed)):
        # numpy's and Optuna's generators take [0, 2**32) (torch's a little more): out of range,
        # a worker or a sweep failed late, after the sweep had written its settings
        _check(0 <= seed < 2**32, name, f"must be in [0, 2**32), got {seed}")
    _check(cfg.tracking.backend in TRACKING_BACKENDS, "tracking.backend",
           f"must be one of {', '.join(TRACKING_BACKENDS)}, got {cfg.tracking.backend!r}")


def _validate_places(cfg: Config) -> None:
    """The run directory, corpus and base model's URIs, the store's endpoint, the cluster."""
    places = (("run_dir", cfg.run_dir), ("data.corpus", cfg.data.corpus), ("model.path", cfg.model.path or ""))
    for name, value in places:
        u = urlparse(value)  # raypath joins file names onto these; a query would end up inside them
        _check(not (is_uri(value) and (u.query or u.fragment)), name,
               f"{value!r}: a URI with a query or fragment ('?', '#') is not supported; an S3-compatible "
               f"store's endpoint goes in cluster.storage_endpoint")
        _check(not is_uri(value) or u.scheme in URI_SCHEMES, name,
               f"{value!r}: no pyarrow filesystem reads {u.scheme}:// URIs (use one of "
               f"{', '.join(s + '://' for s in URI_SCHEMES)}; s3a:// and s3n:// are s3://)")
    endpoint = cfg.cluster.storage_endpoint
    _check(not endpoint or endpoint.startswith(("http://", "https://")), "cluster.storage_endpoint",
           f"must be an http:// or https:// URL, got {endpoint!r}")
    _check(cfg.cluster.num_cpus is None or cfg.cluster.num_cpus >= 1, "cluster.num_cpus",
           f"must be >= 1 or empty (auto), got {cfg.cluster.num_cpus}")


def _validate_data(d: DataConfig) -> None:
    _check(bool(d.corpus.strip()), "data.corpus", "must not be empty (a directory, a URI or 'embedded')")
    _check(d.max_docs_per_version is None or d.max_docs_per_version >= 2, "data.max_docs_per_version",
           f"must be >= 2 (train and held-out documents) or empty, got {d.max_docs_per_version}")
    _check(d.tokenizer_max_chars >= 1, "data.tokenizer_max_chars", f"must be >= 1, got {d.tokenizer_max_chars}")
    _check(d.dedup in DEDUP_MODES, "data.dedup", f"must be one of {', '.join(DEDUP_MODES)}, got {d.dedup!r}")
    for name in ("minhash_bands", "minhash_rows", "minhash_shingle"):
        _check(1 <= getattr(d, name) <= 1024, f"data.{name}", f"must be in [1, 1024], got {getattr(d, name)}")
    _check(0 <= d.minhash_threshold <= 1, "data.minhash_threshold", f"must be in [0, 1], got {d.minhash_threshold}")
    if d.dedup == "minhash" and d.minhash_threshold:  # the estimate leaves the shared band out
        _check(d.minhash_bands >= 2, "data.minhash_bands", f"must be >= 2 with a minhash_threshold (the similarity "
               f"is estimated from the bands not shared), got {d.minhash_bands}; or set minhash_threshold: 0")
        _check(d.minhash_bands * d.minhash_rows <= 4096, "data.minhash_rows",
               f"bands x rows must be <= 4096 with a minhash_threshold (each hash row carries a sketch of "
               f"bands x rows / 4 bytes), got {d.minhash_bands * d.minhash_rows}")
    if d.corpus != "embedded" and not is_uri(d.corpus):  # a remote corpus is listed when preparing
        _check(Path(d.corpus).is_dir(), "data.corpus",
               f"{d.corpus!r} is a file, not a corpus directory (one sub-directory per version)"
               if Path(d.corpus).exists() else f"corpus directory {d.corpus!r} does not exist (or use 'embedded')")
    if d.tokenizer:
        _check(Path(d.tokenizer, "tokenizer.json").is_file(), "data.tokenizer",
               f"{d.tokenizer!r} is not a tokenizer directory (no tokenizer.json)")
    repeated = sorted({v for v in d.versions if d.versions.count(v) > 1})
    _check(not repeated, "data.versions", f"names each version once; repeated: {', '.join(repeated)}")
    _check(d.seq_len >= 8, "data.seq_len", f"must be >= 8, got {d.seq_len}")
    _check(d.vocab_size > 258, "data.vocab_size", f"must be > 258 (bytes + specials), got {d.vocab_size}")
    _check(d.val_blocks >= 1, "data.val_blocks", f"must be >= 1, got {d.val_blocks}")
    _check(d.test_blocks is None or d.test_blocks >= 0, "data.test_blocks",
           f"must be >= 0 (0 = no test split), got {d.test_blocks}")
    _check(0.0 <= d.replay_ratio < 1.0, "data.replay_ratio", f"must be in [0, 1), got {d.replay_ratio}")
    _check(d.tokenize_actors >= 1, "data.tokenize_actors", "must be >= 1")
    _check(d.on_bad_input in ("error", "skip"), "data.on_bad_input",
           f"must be 'error' or 'skip', got {d.on_bad_input!r}")
    _check(d.max_doc_chars >= 0, "data.max_doc_chars", f"must be >= 0 (0 = no limit), got {d.max_doc_chars}")


def _validate_model(m: ModelConfig, d: DataConfig, t: TrainConfig) -> None:
    if m.path and "://" in m.path:
        pass  # a URI: listed and downloaded by raypath.pretrained before anything trains
    elif m.path:
        _check(Path(m.path, "config.json").is_file(), "model.path",
               f"{m.path!r} is not a save_pretrained directory (no config.json)")
        # The tokenizer defaults to the model's own: without one the run failed after starting Ray.
        _check(bool(d.tokenizer) or Path(m.path, "tokenizer.json").is_file(), "model.path",
               f"{m.path!r} has no tokenizer.json (the tokenizer defaults to the model's own): save the "
               f"tokenizer next to the model, or set data.tokenizer")
    else:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            _check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
        _check(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
        _check(d.seq_len <= m.max_position_embeddings, "model.max_position_embeddings",
               f"model accepts {m.max_position_embeddings} positions but data.seq_len is {d.seq_len}")
        _check(m.hidden_size % m.num_heads == 0, "model.num_heads",
               f"must divide hidden_size {m.hidden_size}, got {m.num_heads}")
        _check(m.hidden_size // m.num_heads % 2 == 0, "model.num_heads",
               f"head size hidden_size / num_heads = {m.hidden_size // m.num_heads} must be even "
               f"(rotary embeddings turn pairs of dimensions)")
        _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
               f"must divide num_heads {m.num_heads}, got {m.num_kv_heads}")
    _check(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {m.attn_implementation!r}")
    if m.attn_implementation == "flash_attention_2":
        _check(t.use_gpu, "model.attn_implementation", "flash_attention_2 needs CUDA: set train.use_gpu=true "
               "(or use sdpa, which picks flash kernels on GPU by itself)")
        _check(t.precision == "bf16", "model.attn_implementation",
               "flash_attention_2 needs half precision: set train.precision=bf16")


def _validate_train(t: TrainConfig) -> None:
    _check(t.num_workers >= 1, "train.num_workers", f"must be >= 1, got {t.num_workers}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _check(t.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {t.global_batch_size}")
    _check(0 <= t.min_workers <= t.num_workers, "train.min_workers",
           f"must be in [0, num_workers={t.num_workers}], got {t.min_workers}")
    _check(t.max_failures >= -1, "train.max_failures", f"must be >= -1, got {t.max_failures}")
    for world in range(t.min_workers or t.num_workers, t.num_workers + 1):
        per_step = t.micro_batch_size * world
        _check(t.global_batch_size % per_step == 0, "train.global_batch_size",
               f"{t.global_batch_size} is not a multiple of micro_batch_size x num_workers = {per_step}"
               + (f" (at {world} workers of the elastic range)" if t.min_workers else ""))
    _check(t.max_lr > 0, "train.max_lr", f"must be > 0, got {t.max_lr}")
    _check(all(0.0 <= x < 1.0 for x in t.betas), "train.betas", f"each must be in [0, 1), got {list(t.betas)}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = no clipping), got {t.grad_clip}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = at segment ends only), got {t.eval_every}")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {t.cpus_per_worker}")
    _check(t.elastic_resize_interval_s > 0, "train.elastic_resize_interval_s",
           f"must be > 0 (seconds), got {t.elastic_resize_interval_s}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0 (0 = off), got {t.checkpoint_every}")
    _check(t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes",
           f"must be >= 0 (0 = off), got {t.checkpoint_every_minutes}")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints",
           f"must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    _check(t.precision in PRECISIONS, "train.precision",
           f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _check(t.parallel in PARALLEL, "train.parallel", f"must be one of {', '.join(PARALLEL)}, got {t.parallel!r}")
    _check(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops",
           f"must be > 0 (FLOP/s per device) or empty, got {t.peak_flops}")
    _check(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens",
           f"must be >= 0 (0 = full logits), got {t.loss_chunk_tokens}")
    from raypath.loss import check_kernels  # raises a ConfigError naming train.kernels

    check_kernels(t.kernels, use_gpu=t.use_gpu)


def _validate_branch(b: BranchConfig) -> None:
    _check(b.shape in SHAPES, "branch.shape", f"{b.shape!r} is not one of {', '.join(SHAPES)}")
    _check(0.0 < b.fraction < 1.0, "branch.fraction", f"must be in (0, 1), got {b.fraction}")
    _check(0.0 <= b.min_lr_ratio < 1.0, "branch.min_lr_ratio", f"must be in [0, 1), got {b.min_lr_ratio}")
    _check(b.power > 0, "branch.power", f"must be > 0, got {b.power}")


def _validate_sweep(sc: SweepConfig) -> None:
    def check(ok: bool, name: str, msg: str) -> None:
        _check(ok, f"sweep.{name}", msg)

    check(bool(sc.name) and "/" not in sc.name and sc.name not in (".", ".."), "name",
          f"must be a plain directory name, got {sc.name!r}")
    check(sc.num_samples >= 1, "num_samples", f"must be >= 1, got {sc.num_samples}")
    check(sc.max_concurrent >= 0, "max_concurrent", f"must be >= 0 (0 = from resources), got {sc.max_concurrent}")
    check(sc.startup_trials >= 0, "startup_trials", f"must be >= 0 (0 = auto), got {sc.startup_trials}")
    for name in ("fraction", "power", "min_lr_ratio"):
        lo, hi = getattr(sc, name)
        check(lo <= hi, name, f"lo {lo} is above hi {hi}")
    check(0.0 < sc.fraction[0] and sc.fraction[1] <= 1.0, "fraction", f"must lie in (0, 1], got {list(sc.fraction)}")
    bad = [s for s in sc.shapes if s not in SHAPES]
    check(bool(sc.shapes) and not bad, "shapes",
          f"{bad[0] if bad else '(empty)'!r} is not one of {', '.join(SHAPES)}")
    check(len(set(sc.shapes)) == len(sc.shapes), "shapes", f"duplicates in {sc.shapes}")
    check(sc.power[0] > 0, "power", f"must be > 0, got {list(sc.power)}")
    check(0.0 <= sc.min_lr_ratio[0] and sc.min_lr_ratio[1] < 1.0, "min_lr_ratio",
          f"must lie in [0, 1), got {list(sc.min_lr_ratio)}")
    check(all(0.0 <= r < 1.0 for r in sc.replay_ratios), "replay_ratios",
          f"each must be in [0, 1), got {sc.replay_ratios}")
    # Optuna's categorical choice: a repeated ratio would be drawn twice as often
    check(len(set(sc.replay_ratios)) == len(sc.replay_ratios), "replay_ratios", f"duplicates in {sc.replay_ratios}")
    check(sc.pin is None or bool(sc.pin.strip()), "pin", "must name a trial of the sweep (its id or branch name), "
          "got an empty string")
    check(sc.keep_trials >= 0, "keep_trials", f"must be >= 0 (0 = keep every trial's weights), got {sc.keep_trials}")
    check(not set(sc.weights) - {"old", "new"}, "weights", f"keys must be old and new, got {sorted(sc.weights)}")
    check(all(v >= 0 for v in sc.weights.values()) and sum(sc.weights.values()) > 0, "weights",
          f"must be >= 0 and not all 0, got {sc.weights}")
    check(sc.token_budget is None or sc.token_budget > 0, "token_budget", f"must be > 0, got {sc.token_budget}")
    check(sc.compute_penalty >= 0, "compute_penalty", f"must be >= 0, got {sc.compute_penalty}")
    check(sc.guide in GUIDES, "guide", f"must be one of {', '.join(GUIDES)}, got {sc.guide!r}")
    check(sc.guide_points >= 0, "guide_points", f"must be >= 0 (0 = auto), got {sc.guide_points}")
    check(sc.stop_margin >= 0, "stop_margin", f"must be >= 0 (0 = never stop early), got {sc.stop_margin}")
    check(0.0 <= sc.stop_min_progress < 1.0, "stop_min_progress", f"must be in [0, 1), got {sc.stop_min_progress}")
