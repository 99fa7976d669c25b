"""Export a release or a main-path checkpoint of a run directory as a Hugging Face model.

    raypath export RUN_DIR v2 --out models/v2 [--dtype bf16] [--force]

What to export (``source``), by name in the lineage or by path:

* ``vK``: version K's live release (``releases/vK/current``);
* ``vK/rN``: release rN of version K, live or not;
* ``main-vK``: the main path at the end of version K (its boundary checkpoint: never
  annealed, the point later versions continue from; not a release);
* a checkpoint directory of the run (``ray/<segment>/step_N``, absolute or relative
  to the run directory), full or sharded (DCP).

The output directory holds ``save_pretrained`` weights (safetensors), the run's tokenizer
and ``README.md``, a Hugging Face model card (``huggingface_hub.ModelCard``: YAML metadata
with the losses as ``model-index`` results, then markdown) with the lineage facts; a
release also keeps its ``model_card.json``. Nothing is downloaded: the card's template is
in this module.

Atomic: the directory is written to a temporary sibling of ``out``, loaded back (model,
tokenizer, card) and compared tensor by tensor with what was meant to be written, and only
then renamed to ``out``. Readers see the old directory or the complete new one; a failure
leaves ``out`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raypath import checkpoint as ckpt
from raypath.config import ConfigError, ModelConfig
from raypath.console import Progress, amount, heartbeat
from raypath.lineage import Branch, Lineage, MainEntry, Release, ReleaseHistory
from raypath.mirror import LOCAL, RECORDS, RunDir
from raypath.pretrained import BASE_DIR
from raypath.schedules import MainPath
from raypath.sources import is_uri
from raypath.storage import read_json

log = logging.getLogger(__name__)

#: ``--dtype`` values; None (the default) keeps the stored dtype (fp32 master weights for a checkpoint).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CARD = "README.md"
#: raypath's own JSON facts of a release (written by the branch export and the release).
JSON_CARD = "model_card.json"


class ExportError(ConfigError):
    """An export request that cannot be met (unknown version or release, --out in the way).

    A :class:`ConfigError`, so every entry point reports it as one line with exit code 2."""


@dataclass
class Facts:
    """What the model card says about the exported model, from the lineage.

    run: the run's name (``name`` in its config).
    version: the version whose data it ends on.
    kind: ``release``, ``main path`` or ``checkpoint``.
    label: how it was named: ``v2/r1``, ``main-v2``, or the checkpoint directory.
    source: the directory the weights were read from.
    step: the global optimizer step of its weights (None when the lineage does not say).
    tokens_total: tokens trained from the start of the main path, cumulative (the
        main path up to the fork plus the branch, for a release).
    trained_on: the versions whose data it trained on, in order.
    branch: a release's (or branch checkpoint's) branch: name, fork step, steps, decay
        shape, power, floor (``min_lr_ratio`` and the LR it ends at), peak LR; None otherwise.
    lr: how the LR ran, in words, for a main-path checkpoint.
    val, test: ``val/<version>`` and ``test/<version>`` losses the lineage recorded.
    release: a release's id, why it went live, and whether it is the live one.
    base_model: the pretrained model the main path started from (``model.path``), if any.
    """

    run: str
    version: str
    kind: str
    label: str
    source: str
    step: int | None = None
    tokens_total: int | None = None
    trained_on: list[str] = field(default_factory=list)
    branch: dict[str, Any] | None = None
    lr: str | None = None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    release: dict[str, Any] | None = None
    base_model: str | None = None


@dataclass
class Source:
    """Where the weights of an export come from.

    facts: the lineage facts for its card.
    model_dir: a ``save_pretrained`` directory (a release), or None.
    checkpoint: a training checkpoint directory (full or sharded), or None.
    tokenizer_dir: the tokenizer saved next to the model.
    json_card: raypath's ``model_card.json`` to keep (a release's), or None.
    """

    facts: Facts
    model_dir: Path | None = None
    checkpoint: Path | None = None
    tokenizer_dir: Path | None = None
    json_card: Path | None = None

    @property
    def path(self) -> Path:
        return self.model_dir or self.checkpoint


@dataclass
class Exported:
    """What :func:`export` wrote: ``out``, its source, dtype and parameter count."""

    out: Path
    source: Source
    dtype: torch.dtype
    parameters: int

    def summary(self) -> str:
        f = self.source.facts
        what = f"{f.kind} of {f.version}" + (f", branch {f.branch['name']}" if f.branch else "")
        own = f.val.get(f"val/{f.version}")
        val = f", val/{f.version} {own:.4f}" if own is not None else ""
        return f"exported {f.label} ({what}{val}): {self.source.path} -> {self.out} [{self.weights}]"

    @property
    def weights(self) -> str:
        return f"{self.parameters:,} parameters, {str(self.dtype).removeprefix('torch.')}"


# --------------------------------------------------------------------------- the one entry point

def export(run_dir: str | Path, what: str, out: str | Path, dtype: str | None = None,
           force: bool = False, local_dir: str | None = None) -> Exported:
    """Export ``what`` (see the module docstring) of ``run_dir`` to ``out``; atomic, verified.

    run_dir: a path or a URI (``s3://...``): a remote run directory is mirrored in
        ``local_dir`` (default ``~/.cache/raypath/...``), and only the exported source is
        downloaded into it. ``out`` is a local directory (a URI is refused)."""
    from raypath.storage import atomic_dir

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if is_uri(str(out)):  # else Path() makes it the local directory ./s3:/bucket/... and reports success
        raise ExportError(f"--out {out}: expected a local directory (the model directory is written and verified "
                          f"here; copy it to a store afterwards: a run's own releases are in its releases/ already)")
    lineage = Lineage.load(RunDir.open(run_dir, local_dir, reads=RECORDS))
    run_dir, out = lineage.rd.path.resolve(), Path(out).resolve()
    src = resolve(lineage, run_dir, what)
    check_out(out, force, run_dir, src.path)
    # Each step reads or writes the whole model (minutes for billions of parameters): a line
    # every PROGRESS_EVERY_S while it lasts; a small model's export prints only its result.
    with _no_progress_bars():
        with heartbeat(log, f"exporting {what}: loading {src.path}"):
            model = load_model(src, lineage, run_dir)
        if dtype is not None:
            model.to(DTYPES[dtype])
        # atomic_dir: a temp sibling of `out`, renamed over it only if the block succeeds.
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        with atomic_dir(out) as tmp:
            written = lambda: f"{amount(_bytes_under(tmp), 'B')} of ~{amount(weights, 'B')} written"  # noqa: E731
            with heartbeat(log, f"exporting {what}: writing {out}", written):
                save_model_dir(tmp, model, src.tokenizer_dir)
            if src.json_card is not None:
                shutil.copy2(src.json_card, tmp / JSON_CARD)
            result = Exported(out, src, next(model.parameters()).dtype, sum(p.numel() for p in model.parameters()))
            model_card(src.facts, out.name, result.weights).save(tmp / CARD)
            # Compared tensor by tensor: a line with the rate and an ETA while it lasts.
            verify(tmp, model, Progress(log, f"exporting {what}: checking what was written against the model",
                                        weights, "B"))
    return result


def _bytes_under(d: Path) -> int:
    """Bytes of the files under ``d`` so far (a file being written counts what reached it)."""
    total = 0
    for p in d.rglob("*"):
        with contextlib.suppress(OSError):  # renamed or removed between the listing and the stat
            total += p.stat().st_size if p.is_file() else 0
    return total


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a bar per load (two per export): the command prints one line instead."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- what to export

def resolve(lineage: Lineage, run_dir: Path, what: str) -> Source:
    """The source named ``what``: ``vK``, ``vK/rN``, ``main-vK`` or a checkpoint directory."""
    versions = lineage.version_names()
    name, _, rid = what.partition("/")
    if name in versions:
        return release_source(lineage, run_dir, name, rid or None)
    if what.startswith("main-") and what[5:] in versions:
        return main_source(lineage, run_dir, what[5:])
    # Relative to the run directory first, as documented: the same path under the working
    # directory may be another run's.
    if not Path(what).is_absolute() and lineage.rd.children(run_dir / what):  # (a bucket's, maybe)
        return checkpoint_source(lineage, run_dir, run_dir / what)
    if Path(what).is_dir():
        return checkpoint_source(lineage, run_dir, Path(what).resolve(), outside=True)
    raise ExportError(f"{what}: not a version, release, main-path checkpoint or checkpoint directory of "
                      f"{run_dir} ({what_exists(lineage)})")


def what_exists(lineage: Lineage) -> str:
    """What a run directory can export, for error messages: versions, releases (* = live), main path."""
    versions = lineage.version_names()
    releases = []
    for v in versions:
        h = lineage.release_history(v)
        if h and h.releases:
            ids = [r.id + ("*" if r.id == h.current else "") for r in h.releases]
            releases.append(f"{v}/{','.join(ids)}")
    mains = [m.segment for m in lineage.main_path()]
    return (f"versions: {', '.join(versions) or 'none'}; releases: {' '.join(releases) or 'none'}; "
            f"main-path checkpoints: {', '.join(mains) or 'none'}")


def in_run_dir(recorded: str | Path, run_dir: Path, anchor: str) -> Path:
    """A path the lineage recorded, looked up under ``run_dir`` first.

    The lineage keeps absolute paths, so a copied or moved run directory still names the
    old location: the part from the last ``anchor`` component (``releases``, ``ray``,
    ``tokenizer``) on is looked for under ``run_dir``, else the recorded path is used.
    """
    p = Path(recorded)
    if anchor in p.parts:
        i = len(p.parts) - 1 - p.parts[::-1].index(anchor)
        moved = run_dir.joinpath(*p.parts[i:])
        if moved.exists():
            return moved
    return p


def release_source(lineage: Lineage, run_dir: Path, version: str, rid: str | None) -> Source:
    """Version ``version``'s release ``rid`` (None: the live one)."""
    h = lineage.release_history(version) or ReleaseHistory()
    rid = rid or h.current
    entry = h.get(rid)
    if entry is None:
        what = f"has no release {rid}" if rid else "has no release yet"
        raise ExportError(f"{version} {what} in {run_dir} (releases of {version}: {', '.join(h.ids()) or 'none'}; "
                          f"{what_exists(lineage)}); `raypath run` or `raypath sweep` releases a version")
    model_dir = lineage.rd.fetch(in_run_dir(entry.path, run_dir, "releases"), missing_ok=True)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{version}/{rid}: release directory {model_dir} is missing or holds no model")
    card = model_dir / JSON_CARD
    facts = release_facts(lineage, entry, read_json(card) if card.is_file() else {})
    facts.label, facts.source = f"{version}/{rid}", str(model_dir)
    facts.release["live"] = rid == h.current
    tokenizer = model_dir if (model_dir / "tokenizer.json").is_file() else tokenizer_dir(lineage, run_dir)
    return Source(facts, model_dir=model_dir, tokenizer_dir=tokenizer, json_card=card if card.is_file() else None)


def main_source(lineage: Lineage, run_dir: Path, version: str) -> Source:
    """The main path at the end of ``version`` (its boundary checkpoint)."""
    main = lineage.main(version)
    if main is None:
        raise ExportError(f"main-{version}: the main path of {version} has not finished in {run_dir} "
                          f"({what_exists(lineage)})")
    d = _check_checkpoint(in_run_dir(main.checkpoints["end"], run_dir, "ray"), lineage.rd, f"main-{version}")
    facts = main_facts(lineage, main)
    facts.label, facts.source = f"main-{version}", str(d)
    return Source(facts, checkpoint=d, tokenizer_dir=tokenizer_dir(lineage, run_dir))


def checkpoint_source(lineage: Lineage, run_dir: Path, d: Path, outside: bool = False) -> Source:
    """A checkpoint directory; the lineage's main-path or branch entry of its segment adds the facts.

    outside: ``d`` was named by a path that may lie outside the run directory; there it must be
    a copy of one of the run's segments (it is exported with this run's tokenizer and facts).
    """
    d = _check_checkpoint(d, lineage.rd)
    state = ckpt.load_state(d)
    segment, version = state.get("segment", ""), state.get("version", "?")
    main, branch = lineage.main(version), lineage.branch(segment)
    known = (main is not None and main.segment == segment) or branch is not None
    if outside and not d.is_relative_to(run_dir.resolve()) and not known:
        raise ExportError(f"{d}: a checkpoint of segment {segment or '?'}, which {run_dir} does not have (it lies "
                          f"outside the run directory): export it from its own run directory ({what_exists(lineage)})")
    if main is not None and main.segment == segment:
        facts = main_facts(lineage, main)
    else:
        facts = Facts(_run_name(lineage), version, "checkpoint", "", "", trained_on=_versions_to(lineage, version),
                      base_model=_base_model(lineage))
        facts.branch = branch_facts(lineage, branch, {}) if branch else None
    facts.kind, facts.label, facts.source = "checkpoint", str(d), str(d)
    facts.step, facts.tokens_total = state.get("step"), state.get("tokens")
    # The checkpoint's own metrics: the segment's entry holds its last step's only.
    metrics = state.get("metrics") or {}
    facts.val, facts.test = _split(metrics, "val"), _split(metrics, "test")
    return Source(facts, checkpoint=d, tokenizer_dir=tokenizer_dir(lineage, run_dir))


def _check_checkpoint(d: Path, rd: RunDir, label: str | None = None) -> Path:
    """Fail early, before anything is loaded or written: presence and sizes (the load hashes it).
    Returns ``d`` readied on this machine (:func:`raypath.checkpoint.fetch`)."""
    try:
        return ckpt.fetch(d, rd, deep=False, model_only=True)
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        raise ExportError(f"{label}: {e}" if label else
                          f"{e} (a checkpoint is a step directory, ray/<segment>/step_N)") from None


def tokenizer_dir(lineage: Lineage, run_dir: Path) -> Path:
    """The tokenizer the run trained with (its own BPE, ``data.tokenizer`` or the base model's),
    else the run directory's copy of one from outside it (:func:`raypath.run.keep_for_export`); of
    a remote run directory's, its tokenizer files are downloaded (:func:`is_tokenizer_file`)."""
    recorded = lineage.fact("tokenizer").get("path") or run_dir / "tokenizer"
    d = in_run_dir(recorded, run_dir, "tokenizer")
    from raypath.tokenizer import is_tokenizer_file

    for where in (d, run_dir / "tokenizer"):
        if lineage.rd.remote(where):
            for name in filter(is_tokenizer_file, lineage.rd.children(where)):
                lineage.rd.fetch(where / name)
        if (where / "tokenizer.json").is_file():
            return where
    raise ExportError(f"{lineage.path}: the run's tokenizer {d} is missing (no tokenizer.json)")


# --------------------------------------------------------------------------- lineage facts

def _run_name(lineage: Lineage) -> str:
    return lineage.name or lineage.config.get("name", "raypath")


def _versions_to(lineage: Lineage, version: str) -> list[str]:
    names = lineage.version_names()
    return names[: names.index(version) + 1] if version in names else [version]


def _split(metrics: dict, split: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(f"{split}/") and v is not None}


def _base_model(lineage: Lineage) -> str | None:
    return (lineage.fact("model").get("base") or {}).get("path")


def _max_lr(lineage: Lineage) -> float | None:
    return lineage.config.get("train", {}).get("max_lr")


def branch_facts(lineage: Lineage, branch: Branch | None, card: dict, name: str | None = None) -> dict:
    """A branch's shape from its lineage entry, else (no entry) from its export's ``model_card.json``;
    ``name``: the branch's name where the lineage has no entry for it."""
    decay = (branch.decay if branch else None) or card.get("decay") or {}
    max_lr = card.get("max_lr") or _max_lr(lineage)
    floor = decay.get("min_lr_ratio")
    fork = branch.fork_step if branch else card.get("fork_step")
    floor_lr = floor * max_lr if floor is not None and max_lr else None
    warmup = lineage.config.get("train", {}).get("warmup_steps")
    if floor_lr is not None and fork is not None and warmup:  # forked in warmup below the floor: held
        floor_lr = min(floor_lr, MainPath(float(max_lr), int(warmup))(int(fork)))
    return {"name": (branch.name if branch else name) or card.get("branch"), "fork_step": fork,
            "steps": branch.steps if branch else card.get("branch_steps"),
            "shape": decay.get("shape"), "power": decay.get("power"), "min_lr_ratio": floor,
            "max_lr": max_lr, "floor_lr": floor_lr}


def release_facts(lineage: Lineage, entry: Release, card: dict) -> Facts:
    """A release (``release_history``) with its branch's lineage entry and export card."""
    branch = lineage.branch(entry.branch or "")
    metrics = card.get("final_metrics") or {}
    tokens_total = entry.tokens_total if entry.tokens_total is not None else branch.tokens_total if branch else None
    return Facts(
        _run_name(lineage), entry.version, "release", "", "",
        step=branch.end_step if branch and branch.end_step is not None else metrics.get("step"),
        tokens_total=tokens_total,
        trained_on=card.get("trained_on_versions") or _versions_to(lineage, entry.version),
        branch=branch_facts(lineage, branch, card, entry.branch),
        val=_split(entry.val or metrics, "val"), test=_split(entry.test or metrics, "test"),
        release={"id": entry.id, "reason": entry.reason, "released": entry.released},
        base_model=_base_model(lineage))


def main_facts(lineage: Lineage, main: MainEntry) -> Facts:
    """A main-path entry: the version's boundary, trained at the constant peak LR."""
    max_lr = main.max_lr or _max_lr(lineage)
    return Facts(
        _run_name(lineage), main.version, "main path", "", "",
        step=main.end_step, tokens_total=main.tokens_end, trained_on=_versions_to(lineage, main.version),
        lr=f"constant {max_lr:g} after {main.warmup_steps or 0} warmup steps, never annealed" if max_lr else None,
        val=_split(main.metrics or {}, "val"), test=_split(main.metrics or {}, "test"), base_model=_base_model(lineage))


# --------------------------------------------------------------------------- weights

def load_model(src: Source, lineage: Lineage, run_dir: Path):
    """The source's model, in its stored dtype (fp32 master weights for a checkpoint)."""
    from transformers import AutoModelForCausalLM

    if src.model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(str(src.model_dir), local_files_only=True, dtype="auto")
    return model_from_checkpoint(src.checkpoint, model_config(lineage, run_dir), src.tokenizer_dir, lineage.rd)


def model_config(lineage: Lineage, run_dir: Path) -> ModelConfig:
    """The run's ``model`` section, with ``path`` pointing at the local copy of a base model.

    Read field by field rather than validated as a whole config: validation checks the
    corpus and the base model's original location, which an export does not need.
    """
    raw = lineage.config.get("model") or {}
    cfg = ModelConfig(**{f.name: raw[f.name] for f in dataclasses.fields(ModelConfig) if f.name in raw})
    # The saved config records no kernel; users pick theirs at load. sdpa builds anywhere
    # (flash_attention_2 would need CUDA and flash-attn just to write the files).
    cfg = dataclasses.replace(cfg, attn_implementation="sdpa")
    if cfg.path:
        local = (lineage.fact("model").get("base") or {}).get("local_dir") or cfg.path
        d = in_run_dir(local, run_dir, "base_model")
        # The architecture, not the base model's weights: its directory's, else the run's copy of its config.
        for where in (d, run_dir / BASE_DIR):
            if lineage.rd.fetch(where / "config.json", missing_ok=True).is_file():
                return dataclasses.replace(cfg, path=str(where))
        raise ExportError(f"{lineage.path}: the base model {d} (model.path {cfg.path!r}) is missing: "
                          f"its config gives the architecture of the run's checkpoints")
    return cfg


def model_from_checkpoint(directory: str | Path, cfg: ModelConfig, tokenizer: str | Path, rd: RunDir = LOCAL):
    """A plain transformers model with a checkpoint's weights (either layout), as training built it.

    The vocabulary size and EOS/PAD ids come from the tokenizer, like the run's
    (:func:`raypath.run.prepare`); the weights are verified (hashed) and loaded
    ``weights_only`` (:func:`raypath.shards.load_model_weights`).
    """
    from raypath.model import build_model
    from raypath.shards import load_model_weights
    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    model = build_model(cfg, len(tok), tok.eos_token_id, tok.pad_token_id, weights=False)
    try:
        load_model_weights(directory, model, rd)
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    except (RuntimeError, ValueError) as e:  # missing or misshapen tensors: a checkpoint of another model
        raise ExportError(f"{directory}: its weights do not fit the run's model "
                          f"({str(e).strip().splitlines()[0]})") from None
    return model.eval()


def save_model_dir(directory: str | Path, model, tokenizer: str | Path, weights: bool = True) -> None:
    """``save_pretrained`` weights (safetensors) and the tokenizer: what ``raypath export`` writes
    and, with ``weights=False`` (the ranks wrote them, :func:`write_share`), a training export's
    rank 0 (the caller makes it atomic). The configs name the tokenizer's BOS, as training set
    its EOS and PAD (:mod:`raypath.model`): a base model's BOS id may be another token of the
    tokenizer ``data.tokenizer`` gives, and ``generate()`` starts an empty prompt with it."""
    from raypath.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.bos_token_id is not None:
        for conf in (model.config, getattr(model, "generation_config", None)):
            if conf is not None:
                conf.bos_token_id = tok.bos_token_id
    if weights:
        model.save_pretrained(directory, safe_serialization=True)
    else:  # the configs as save_pretrained writes them next to its weights
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(directory)
        if model.can_generate():
            model.generation_config.save_pretrained(directory)
    tok.save_pretrained(directory)
    # safetensors creates its files 0600, the rest are 0644: a release or an export is served
    # or loaded by other users (atomic_file and atomic_dir make run files readable for the same reason).
    for f in Path(directory).iterdir():
        if f.is_file():
            f.chmod(0o644)


# ------------------------------------------------------------ a training export, each rank its share

#: The files of a sharded ``save_pretrained`` directory: weights and the index naming each tensor's file.
INDEX = "model.safetensors.index.json"


def weights_name(i: int, n: int) -> str:
    """The name ``save_pretrained`` gives weight file ``i`` of ``n``."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def rank_shares(model, world: int) -> list[list[str]]:
    """The keys ``save_pretrained`` writes (a tied tensor once, under the name it keeps), in
    state-dict order, cut into at most ``world`` contiguous runs of about equal size: rank r
    writes run r as weight file r. ``model`` may be on the meta device: only shapes are read."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sizes = [(k, t.numel()) for k, t in remove_tied_weights_from_state_dict(model.state_dict(), model).items()]
    total, before = sum(n for _, n in sizes), 0
    shares: list[list[str]] = [[] for _ in range(max(1, min(world, len(sizes))))]
    for key, n in sizes:  # a tensor goes where its middle falls
        shares[min(len(shares) - 1, int((before + n / 2) * len(shares) // max(total, 1)))].append(key)
        before += n
    return [s for s in shares if s]  # a tensor bigger than a share (the embedding) leaves a gap


def write_share(directory: Path, state: Mapping[str, torch.Tensor], shares: list[list[str]],
                rank: int) -> dict[str, int]:
    """Write this rank's weight file of ``shares`` into ``directory``; returns {file: bytes}.

    Collective when ``state`` holds sharded tensors (FSDP's DTensors): every rank goes through
    every key in the same order, since assembling one takes all ranks, and only the rank whose
    share it is keeps a host copy. A rank's host memory is its share, about 1/world of the
    model (gathering to rank 0 would put the whole model there), and its device holds one
    whole tensor at a time. Replicated tensors (DDP, one worker) are read by their owner only.
    """
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    mine = {}
    for i, keys in enumerate(shares):
        for key in keys:
            t = state[key]
            if isinstance(t, DTensor):
                t = t.full_tensor()
            elif i != rank:
                continue
            if i == rank:
                mine[key] = t.detach().to("cpu").contiguous()
    if not mine:
        return {}
    name = weights_name(rank, len(shares))
    save_file(mine, str(directory / name), metadata={"format": "pt"})
    return {name: sum(t.numel() * t.element_size() for t in mine.values())}


def write_index(directory: Path, shares: list[list[str]], written: Mapping[str, int], parameters: int) -> None:
    """The index of a sharded directory (none for one file), as ``save_pretrained`` writes it."""
    if len(shares) == 1:
        return
    weight_map = {k: weights_name(i, len(shares)) for i, keys in enumerate(shares) for k in keys}
    index = {"metadata": {"total_parameters": parameters, "total_size": sum(written.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_from_ranks(final: Path, state: Mapping[str, torch.Tensor], plain, shares: list[list[str]], rank: int,
                    rd: RunDir, tokenizer: str, card: dict) -> None:
    """Collective: a ``save_pretrained`` directory at ``final`` from every rank's share of
    ``state`` (:func:`write_share`); ``plain``: the model on the meta device, for its configs.

    Rank 0 stages the directory (atomic: renamed into place complete) and, once every rank's
    file is written, adds the configs, tokenizer, index and ``model_card.json`` (``card``), then
    publishes them. In a remote run directory each rank uploads its own file first, so the card,
    which marks the export done, reaches the store after the weights; the other ranks write
    theirs apart and drop it once uploaded: their node may not be rank 0's, and its mirror keeps
    no stage of an export it did not finish.
    """
    from raypath import shards
    from raypath.storage import atomic_dir, temp_dir_beside, write_json

    with atomic_dir(final) if rank == 0 else contextlib.nullcontext() as staged:
        stage = Path(shards.gather(str(staged))[0])
        apart = rank != 0 and rd.remote(final)
        with temp_dir_beside(final) if apart else contextlib.nullcontext(stage) as where:
            mine = write_share(where, state, shares, rank)
            for name in mine:
                rd.upload(where / name, final / name)
        written = {k: v for part in shards.gather(mine) for k, v in part.items()}
        if rank == 0:
            save_model_dir(stage, plain, rd.fetch(tokenizer), weights=False)
            write_index(stage, shares, written, plain.num_parameters())
            write_json(stage / JSON_CARD, card)
    if rank == 0:
        rd.publish(final, exclude=tuple(written))


def verify(directory: Path, model, progress: Progress | None = None) -> None:
    """Load the written directory back from local files only -- config, architecture, tokenizer,
    card -- and compare its weights with ``model``'s one tensor at a time: no second copy of the
    model in memory (an export already holds one whole model). ``progress``: in bytes compared."""
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):  # the architecture the config builds, without its weights
            names = set(AutoModelForCausalLM.from_config(config).state_dict())
        AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        ModelCard.load(directory / CARD)
        files = _weight_files(directory)
    except Exception as e:  # noqa: BLE001 - any load failure means a broken export
        raise ExportError(f"the exported model does not load back ({type(e).__name__}: {e})") from None
    expected = model.state_dict()
    written = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            written |= dict.fromkeys(sf.keys(), f)
    # save_pretrained writes a tied tensor (lm_head = embeddings) once
    stored = {expected[k].data_ptr() for k in written if k in expected}
    unwritten = {k for k in set(expected) - set(written) if expected[k].data_ptr() not in stored}
    if set(expected) != names or set(written) - names or unwritten:
        raise ExportError(f"the exported model does not load back: tensors "
                          f"{sorted((set(expected) ^ names) | (set(written) - names) | unwritten)} differ "
                          f"between the written files, the config's architecture and the model")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                got, tensor = sf.get_tensor(name), expected[name]
                if got.dtype != tensor.dtype or not torch.equal(got, tensor.detach().cpu()):
                    raise ExportError(f"the exported model does not load back: {name} differs "
                                      f"({got.dtype} loaded, {tensor.dtype} written)")
                if progress is not None:
                    progress.add(got.numel() * got.element_size())


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (one, or the shards its index names)."""
    index = directory / INDEX
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory}: no model.safetensors")
    return [directory / "model.safetensors"]


def check_out(out: Path, force: bool, run_dir: Path, source: Path) -> None:
    """Refuse an ``out`` that exists (without ``force``), or that replacing would destroy the run."""
    for protected, what in ((run_dir, "the run directory"), (source, "the exported source")):
        if out == protected or out in protected.parents or protected in out.parents:
            raise ExportError(f"--out {out} overlaps {what} {protected}: choose a directory outside it")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a directory")
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} already exists (use --force to replace it)")
    # --force replaces a model directory, never some other directory given by mistake.
    if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file()):
        raise ExportError(f"--force: {out} is not a model directory (no config.json); not replacing it")


# --------------------------------------------------------------------------- the model card

#: The card's markdown, a Jinja template rendered by ``ModelCard.from_template`` (local, no download).
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Lineage

| | |
|---|---|
{% for name, value in lineage_rows -%}
| {{ name }} | {{ value }} |
{% endfor %}
{%- if branch_rows %}
## Release branch

| | |
|---|---|
{% for name, value in branch_rows -%}
| {{ name }} | {{ value }} |
{% endfor %}
{%- endif %}
## Losses

Mean next-token cross-entropy on each version's held-out splits, as the lineage recorded it
(releases are chosen on `val`; `test` is read by no decision).

| version | val | test |
|---|---|---|
{% for name, val, test in loss_rows -%}
| {{ name }} | {{ val }} | {{ test }} |
{% endfor %}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ dirname }}")
model = AutoModelForCausalLM.from_pretrained("{{ dirname }}")
```

Trained by raypath with learning-rate path switching
([Wang et al., arXiv 2410.04103](https://arxiv.org/abs/2410.04103)); written by `raypath export`.
"""


def model_card(facts: Facts, dirname: str, weights: str):
    """A :class:`huggingface_hub.ModelCard` of the exported model: metadata, lineage and losses.

    dirname: the directory's name, for the card's loading snippet.
    weights: what the weights are, e.g. ``bfloat16, 1,234 parameters``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    title = f"{facts.run} {facts.label}" if facts.kind != "checkpoint" else f"{facts.run} {facts.version} checkpoint"
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["raypath", "path-switching", facts.kind.replace(" ", "-")],
                         model_name=f"{facts.run}-{facts.label.replace('/', '-')}"
                         if facts.kind != "checkpoint" else f"{facts.run}-{facts.version}-step{facts.step}",
                         eval_results=_eval_results(facts) or None,
                         raypath=_card_facts(facts))
    return ModelCard.from_template(data, template_str=TEMPLATE, title=title, summary=_summary(facts),
                                   lineage_rows=[*_lineage_rows(facts), ("weights", weights)],
                                   branch_rows=_branch_rows(facts.branch),
                                   loss_rows=_loss_rows(facts), dirname=dirname)


def _card_facts(facts: Facts) -> dict:
    """The facts as YAML metadata (``raypath:``): what a script reads back with ``ModelCard.load``."""
    return {k: v for k, v in dataclasses.asdict(facts).items() if v not in (None, {}, [])}


def _eval_results(facts: Facts) -> list:
    """Each recorded loss as a Hub ``model-index`` result (metric ``loss``, lower is better)."""
    from huggingface_hub import EvalResult

    results = []
    for split, losses in (("validation", facts.val), ("test", facts.test)):
        for key, loss in losses.items():
            results.append(EvalResult(task_type="text-generation", dataset_type=f"{facts.run}-{key.split('/')[1]}",
                                      dataset_name=f"{facts.run} version {key.split('/')[1]}", dataset_split=split,
                                      metric_type="loss", metric_name=key, metric_value=round(loss, 6)))
    return results


def _summary(f: Facts) -> str:
    if f.kind == "release":
        b = f.branch or {}
        live = "the live release" if (f.release or {}).get("live") else "a release (not the live one)"
        return (f"Release {f.label}, {live} of version {f.version} of the raypath run `{f.run}`: the branch "
                f"`{b.get('name')}` forked from the never-annealed main path at step {b.get('fork_step')} and "
                f"decayed the learning rate over {b.get('steps')} steps ({b.get('shape')}, down to "
                f"{_num(b.get('min_lr_ratio'))} × the peak).")
    if f.kind == "main path":
        return (f"The main path of the raypath run `{f.run}` at the end of version {f.version} (step {f.step}): "
                f"its learning rate was never annealed, so this is a checkpoint to continue training from, "
                f"not a release.")
    return f"A training checkpoint of the raypath run `{f.run}`, version {f.version}, step {f.step}."


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _lineage_rows(f: Facts) -> list[tuple[str, str]]:
    rows = [("run", f"`{f.run}`"), ("version", f.version), ("exported", f"{f.kind} `{f.label}`"),
            ("step", _num(f.step)), ("tokens trained (cumulative)", _num(f.tokens_total)),
            ("trained on versions", ", ".join(f.trained_on) or "-")]
    if f.release:
        rows.append(("release", f"{f.release['id']} ({f.release.get('reason')}, released "
                                f"{f.release.get('released') or '-'})"))
    if f.lr:
        rows.append(("learning rate", f.lr))
    if f.base_model:
        rows.append(("continued from", f"`{f.base_model}`"))
    rows.append(("source", f"`{f.source}`"))
    return rows


def _branch_rows(b: dict | None) -> list[tuple[str, str]]:
    if not b:
        return []
    shape = b.get("shape") or "-"
    if shape in ("polynomial", "exponential"):
        shape += f" (power {_num(b.get('power'))})"
    return [("branch", f"`{b.get('name')}`"), ("fork step", _num(b.get("fork_step"))),
            ("steps", _num(b.get("steps"))), ("decay shape", shape),
            ("floor", f"{_num(b.get('min_lr_ratio'))} × peak LR = {_num(b.get('floor_lr'))}"),
            ("peak LR", _num(b.get("max_lr")))]


def _loss_rows(f: Facts) -> list[tuple[str, str, str]]:
    names = sorted({k.split("/", 1)[1] for k in (*f.val, *f.test)},
                   key=lambda n: (f.trained_on.index(n) if n in f.trained_on else len(f.trained_on), n))
    return [(n, _num(f.val.get(f"val/{n}")), _num(f.test.get(f"test/{n}"))) for n in names]
