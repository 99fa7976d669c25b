"""A whole lineage run: prepare data, train the main path, branch and release each version.

Re-running with the same ``run_dir`` resumes: prepared versions are reused,
finished main-path versions and released branches are skipped, and an
interrupted segment continues from its latest valid checkpoint. Adding a
version to the corpus and re-running trains only what is new.

``run_dir`` may be a URI (``s3://bucket/prefix``): the driver then works in a
local mirror (``cluster.local_dir``), pulls the remote run state into it first
(so a fresh machine resumes) and publishes what it writes; see
:mod:`raypath.mirror`.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from raypath.branches import BranchRunner, branch_schedule, release_branch
from raypath.checkpoint import step_dirs, step_of
from raypath.cluster import branches_fit_beside, check_address, check_workers_fit, init_ray
from raypath.config import Config, ConfigChangedError, ConfigError
from raypath.console import RunProgress
from raypath.corpus import MANIFEST_NAME as CORPUS_MANIFEST
from raypath.corpus import build_embedded_corpus
from raypath.data import (
    DataError,
    PrepareSpec,
    check_prepared,
    discover_versions,
    plan_versions,
    prepare_versions,
    read_manifest,
    run_record,
)
from raypath.dedup import rule_of
from raypath.lineage import Branch as BranchEntry
from raypath.lineage import Lineage, check_fixed_settings
from raypath.mainpath import main_steps, run_main_version
from raypath.mirror import RunDir
from raypath.pretrained import BASE_CONFIG_FILES, BASE_DIR, BaseModel, check_model, check_tokenizer
from raypath.pretrained import resolve as resolve_base_model
from raypath.releases import Releaser, version_objective
from raypath.schedules import main_schedule
from raypath.segment import Plan, check_plan
from raypath.sources import VersionSource, iter_texts
from raypath.storage import atomic_dir, atomic_write_bytes, relative_paths, writer_lock
from raypath.tokenizer import TRAIN_INFO_NAME, is_tokenizer_file, load_tokenizer, train_tokenizer
from raypath.tracking import TrackingSpec, lineage_run, open_lineage

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every segment of a run shares: config, paths, tokenizer ids, versions.

    rd: the run directory (for a remote ``cfg.run_dir``, worked on in its local mirror).
    base_model: ``model.path``'s source and weight sha256s (None when training from scratch);
        ``cfg.model.path`` then names its local copy.
    tracking: the lineage's experiment tracking, opened on the driver when the
        context is built (so a sweep's trials share one MLflow parent run).
    """

    cfg: Config
    rd: RunDir
    tokenizer_dir: str
    vocab_size: int
    eos_id: int
    pad_id: int | None
    versions: list[dict]
    base_model: dict | None = None
    tracking: TrackingSpec | None = None

    def __post_init__(self):
        self.versions = [run_record(v) for v in self.versions]
        if self.tracking is None:
            self.tracking = open_lineage(self.cfg, self.run_dir)

    @property
    def run_dir(self) -> Path:
        """Where the run's files are read and written (a remote run directory's mirror)."""
        return self.rd.path

    def storage(self, name: str) -> str:
        return str(self.run_dir / "ray" / name)

    def val_paths(self, k: int) -> dict[str, str]:
        """Validation splits of every version seen up to version ``k``."""
        return {v["name"]: v["val_path"] for v in self.versions[: k + 1]}

    def test_paths(self, k: int) -> dict[str, str]:
        """Test splits of the versions up to ``k`` that have one (none before test splits existed)."""
        return {v["name"]: v["test_path"] for v in self.versions[: k + 1] if v.get("test_path")}

    def eval_fields(self, k: int) -> dict:
        """A segment of version ``k``'s evaluation splits."""
        return dict(val_paths=self.val_paths(k), test_paths=self.test_paths(k))

    def segment_fields(self, name: str) -> dict:
        return dict(name=name, model=self.cfg.model, train=self.cfg.train, vocab_size=self.vocab_size,
                    eos_id=self.eos_id, pad_id=self.pad_id, seq_len=self.cfg.data.seq_len,
                    storage=self.storage(name), curves_path=str(self.run_dir / "curves" / f"{name}.jsonl"),
                    rd=self.rd, tracking=self.tracking)


def _corpus(cfg: Config, rd: RunDir) -> str:
    """The corpus directory or URI; the embedded default is built under the run directory (and a
    rebuild uploaded whole to a remote one: its parts are otherwise copied by size)."""
    if cfg.data.corpus != "embedded":
        return cfg.data.corpus
    out = rd.path / "corpus"
    before = _read_or_none(out / CORPUS_MANIFEST)
    build_embedded_corpus(out, max_docs_per_version=cfg.data.max_docs_per_version, seed=cfg.data.seed)
    if _read_or_none(out / CORPUS_MANIFEST) != before:
        rd.publish(out, force=True)
    return str(out)


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _endpoint(cfg: Config) -> str | None:
    # Captured on the driver so that tasks on nodes without these variables agree.
    return cfg.cluster.storage_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass
class Located:
    """Where a run reads and writes, found without Ray: the run directory (a remote one's
    mirror filled with the remote state) and the corpus versions."""

    rd: RunDir
    sources: list[VersionSource]


def locate(cfg: Config) -> Located:
    """Open the run directory and discover the corpus layout; a bad one fails here, before Ray."""
    return _discover(cfg, _open_run_dir(cfg))


def _discover(cfg: Config, rd: RunDir) -> Located:
    return Located(rd, discover_versions(_corpus(cfg, rd), cfg.data.versions, _endpoint(cfg)))


def _open_run_dir(cfg: Config) -> RunDir:
    """The run directory, checked writable; a remote one's mirror filled with the remote state
    but the sweeps' curves: training reads a sweep's records only (``raypath sweep`` opens the
    run directory with them first, for its law's fit)."""
    return RunDir.open(cfg.run_dir, cfg.cluster.local_dir, cfg.cluster.storage_endpoint, create=True,
                       sweep_curves=False)


def prepare(cfg: Config, where: Located | None = None, kept_base: dict | None = None) -> RunContext:
    """Corpus -> validated files -> tokenizer -> tokenized versions (idempotent). Needs Ray.

    Every file of a version still to prepare is validated (under ``data.on_bad_input``)
    before anything else reads it, the tokenizer's training included.
    where: :func:`locate` of ``cfg`` when the caller has it already.
    kept_base: the lineage's ``model.base`` record once its main path has started: ``model.path``'s
        weights must still be those (checked before anything is written).
    """
    where = where or locate(cfg)
    rd, run_dir, sources = where.rd, where.rd.path, where.sources
    # Tasks on other nodes pull the run directory's files they read (the embedded corpus here,
    # the tokenizer below) from a remote run directory: upload them before any task starts.
    rd.publish(run_dir / "corpus")
    endpoint = _endpoint(cfg)
    cfg, base, tok_dir = _model_and_tokenizer(cfg, rd, kept_base)
    spec = PrepareSpec(data_dir=str(run_dir / "data"), tokenizer_dir=tok_dir, seq_len=cfg.data.seq_len,
                       text_column=cfg.data.text_column, val_blocks=cfg.data.val_blocks,
                       test_blocks=cfg.data.val_blocks if cfg.data.test_blocks is None else cfg.data.test_blocks,
                       replay_ratio=cfg.data.replay_ratio, seed=cfg.data.seed,
                       actors=cfg.data.tokenize_actors, min_blocks=2 * cfg.train.global_batch_size,
                       on_bad_input=cfg.data.on_bad_input, max_doc_chars=cfg.data.max_doc_chars,
                       dedup=rule_of(cfg.data), rd=rd, endpoint=endpoint)
    plan = plan_versions(sources, spec)
    # Only now: config.yaml is the config of the last run, and one that plan_versions refuses
    # (a trained version reordered, removed or edited) never ran.
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    if not cfg.data.tokenizer and base is None:
        _own_tokenizer(plan.todo, cfg, endpoint, Path(tok_dir), rd)
    rd.publish(Path(tok_dir))
    keep_for_export(base, tok_dir, rd)
    tok = load_tokenizer(tok_dir)
    versions = prepare_versions(sources, spec, plan)
    for name in ("config.yaml", "data"):
        rd.publish(run_dir / name)
    return RunContext(cfg, rd, tok_dir, len(tok), tok.eos_token_id, tok.pad_token_id, versions,
                      base.describe() if base else None)


def prepared(cfg: Config, rd: RunDir, kept_base: dict | None = None) -> RunContext:
    """The run context of the versions prepared so far, for a process that trains beside
    ``raypath run`` (a sweep): it reads the data manifest and the tokenizer and writes none of what
    the run owns (``config.yaml``, the tokenizer, ``data/``, the embedded corpus), nor prepares a
    version the corpus gained since. ``kept_base``: as :func:`prepare`'s."""
    path = rd.path / "data" / "manifest.json"
    if not path.is_file():
        raise DataError(f"{rd.name(path)}: no version is prepared in this run directory; run `raypath run` first")
    versions = read_manifest(path)["versions"]
    cfg, base, tok_dir = _model_and_tokenizer(cfg, rd, kept_base)
    tok = load_tokenizer(rd.fetch(tok_dir))
    return RunContext(cfg, rd, tok_dir, len(tok), tok.eos_token_id, tok.pad_token_id, versions,
                      base.describe() if base else None)


def _model_and_tokenizer(cfg: Config, rd: RunDir, kept_base: dict | None) -> tuple[Config, BaseModel | None, str]:
    """``model.path`` resolved (downloaded the first time; ``cfg`` then names the local copy, which
    workers load) and checked, and the tokenizer directory: ``data.tokenizer``, else the base
    model's, else the run's own (trained by :func:`prepare`)."""
    base = resolve_base_model(cfg.model.path, rd, _endpoint(cfg)) if cfg.model.path else None
    if base is not None:
        base.check_kept(kept_base)
        check_model(base.local_dir)  # here, not in every worker after the data is prepared
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=base.local_dir))
    if not cfg.data.tokenizer and base is None:
        return cfg, None, str(rd.path / "tokenizer")
    tok_dir = str(Path(cfg.data.tokenizer or base.local_dir).resolve())
    if not Path(tok_dir, "tokenizer.json").is_file():
        raise ConfigError(f"model.path: {base.source!r} has no tokenizer.json; set data.tokenizer")
    # before any training or tokenization
    check_tokenizer(base.local_dir if base is not None else None, load_tokenizer(tok_dir),
                    "data.tokenizer" if cfg.data.tokenizer else "model.path", cfg.data.seq_len)
    return cfg, base, tok_dir


def keep_for_export(base: BaseModel | None, tok_dir: str, rd: RunDir) -> None:
    """Copy into the run directory what exporting its checkpoints reads from outside it: the files
    of a tokenizer there (``data.tokenizer``, a local ``model.path``'s) into ``tokenizer/``, and a
    local base model's ``config.json`` and ``generation_config.json`` into ``base_model/``. A
    checkpoint holds weights only: without these, a run exported elsewhere (another machine, a
    mirror of a run in a bucket) could not build its model. Megabytes; a file already the same is
    not copied again."""
    outside = [(Path(tok_dir), rd.path / "tokenizer", is_tokenizer_file)]
    if base is not None:
        outside.append((Path(base.local_dir), rd.path / BASE_DIR, lambda n: n in BASE_CONFIG_FILES))
    for src, dst, wanted in outside:
        if src.resolve() == rd.path.resolve() or rd.path.resolve() in src.resolve().parents:
            continue
        for f in sorted(src.iterdir()):
            copy = dst / f.name
            if f.is_file() and wanted(f.name) and not (copy.is_file() and filecmp.cmp(f, copy, shallow=False)):
                atomic_write_bytes(copy, f.read_bytes())
        rd.publish(dst)


def _own_tokenizer(todo: list[dict], cfg: Config, endpoint: str | None, out: Path, rd: RunDir) -> None:
    """The run's own BPE, trained on version 1's train files. Until version 1 is prepared no token was
    made with it: one a run left before stopping there (too few blocks, a bad val split) was trained on
    what version 1 held then, and is trained again unless its files and settings are still those."""
    first = next((t for t in todo if t["index"] == 0), None)
    if first is None:
        if not (out / "tokenizer.json").is_file():
            raise DataError(f"{out}: tokenizer directory is missing, but the prepared versions were "
                            f"tokenized with it; restore it or use a new run_dir")
        return
    # paths relative to the run directory (the embedded corpus lies in it): a moved run's stay the same
    inputs = relative_paths({"files": [r["fingerprint"] for r in first["train"]], "text_column": cfg.data.text_column,
                             "vocab_size": cfg.data.vocab_size, "max_chars": cfg.data.tokenizer_max_chars}, rd.path)
    info = out / TRAIN_INFO_NAME
    if (out / "tokenizer.json").is_file():
        if info.is_file() and json.loads(info.read_text()).get("trained_on") == inputs:
            return
        log.info("%s: trained on other files or settings of version 1 by a run that prepared no version; "
                 "training it again", out)
    _train_tokenizer([r["path"] for r in first["train"]], cfg, endpoint, out, rd, inputs)


def _train_tokenizer(files: list[str], cfg: Config, endpoint: str | None, out: Path, rd: RunDir,
                     inputs: dict) -> None:
    """Train the BPE on version 1 in a Ray task (its memory grows with the text it reads, at most
    ``data.tokenizer_max_chars``); the driver only writes the few files it returns, with ``inputs``
    (what it was trained on) in its :data:`TRAIN_INFO_NAME`."""
    import ray

    def train(files: list[str]) -> dict[str, bytes]:
        import tempfile

        for f in files:  # the embedded corpus, on a node other than the driver's
            rd.fetch(f, missing_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            texts = iter_texts(files, cfg.data.text_column, endpoint, cfg.data.tokenizer_max_chars)
            train_tokenizer(texts, cfg.data.vocab_size, Path(tmp) / "tok")
            return {p.name: p.read_bytes() for p in (Path(tmp) / "tok").iterdir()}

    saved = ray.get(ray.remote(num_cpus=1)(train).remote(files))
    saved[TRAIN_INFO_NAME] = json.dumps({**json.loads(saved[TRAIN_INFO_NAME]), "trained_on": inputs}).encode()
    with atomic_dir(out) as tmp:
        for name, data in saved.items():
            (tmp / name).write_bytes(data)


def _record_branch(lineage: Lineage, ctx: RunContext, entry: BranchEntry) -> None:
    # The branch's driver ran as a task on some node: refresh this node's copy of its curve.
    ctx.rd.fetch(entry.curve, missing_ok=True)
    lineage.record_branch(entry)
    warn_if_diverged(entry.name, entry.metrics, ctx.vocab_size)
    _decide_release(lineage, ctx, entry.version)


def warn_if_diverged(name: str, metrics: dict, vocab_size: int) -> None:
    """A validation loss above ln(vocab), what a uniform guess scores, means training diverged
    (an LR too high, say): the best branch is still released, but not in silence."""
    worse = {k: v for k, v in metrics.items() if k.startswith("val/") and not float(v) <= math.log(vocab_size)}
    if worse:
        log.warning("%s: %s above ln(vocab_size) = %.2f, the loss of a uniform guess: training diverged "
                    "(train.max_lr too high?)", name, ", ".join(f"{k} {v:.3g}" for k, v in worse.items()),
                    math.log(vocab_size))


def _decide_release(lineage: Lineage, ctx: RunContext, version: str) -> None:
    """Release the best measured branch of ``version`` (the configured one, or a sweep's trial
    if one was measured already), scored with the config's ``sweep.weights``."""
    objective = version_objective(lineage, version, ctx.cfg.sweep.weights, ctx.cfg.sweep.compute_penalty)
    Releaser(lineage, ctx.tracking).settle(version, objective)


def run(cfg: Config) -> Lineage:
    """Train every version of the corpus along the main path and release each one."""
    # What needs no Ray is checked first -- run directory, lineage record, corpus layout --
    # so a bad input there fails in a second, before a cluster starts or anything is written.
    check_address(cfg.cluster.address)
    rd = _open_run_dir(cfg)
    with writer_lock(rd, "run"):
        return _run(cfg, rd)


def prepare_run(cfg: Config) -> Lineage:
    """Validate, deduplicate and tokenize the corpus's versions not prepared yet, and record them in
    the lineage, training nothing: ``raypath prepare``, e.g. on a CPU cluster before the training
    job (whose ``raypath run`` then finds them prepared). Checks what :func:`run` checks first."""
    check_address(cfg.cluster.address)
    rd = _open_run_dir(cfg)
    with writer_lock(rd, "prepare"):
        return _prepared(cfg, rd, train=False)[0]


def _prepared(cfg: Config, rd: RunDir, train: bool = True) -> tuple[Lineage, RunContext]:
    """The lineage with the corpus's versions prepared and recorded, checked against what it
    recorded before; ``train``: the cluster must fit the training workers too."""
    lineage = Lineage.open(rd, cfg.name, cfg.to_dict())
    _check_name(cfg, lineage)
    started = _main_path_started(lineage, rd)
    if started:  # checked against the config recorded before this one
        check_fixed_settings(cfg.to_dict(), Lineage.load(rd).config)
        _check_resumed_plans(cfg, lineage, rd)
    elif lineage.version_names():  # prepared, not trained yet (a run stopped in its first segment)
        check_fixed_settings(cfg.to_dict(), Lineage.load(rd).config, sections=("data",))
    where = _discover(cfg, rd)
    _check_versions_kept(cfg, lineage, where.sources)
    check_prepared(where.sources, rd.path / "data", cfg.data.seq_len, str(rule_of(cfg.data)))
    local = init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    if train:
        check_workers_fit(cfg.train, local)
    ctx = prepare(cfg, where, lineage.fact("model").get("base") if started else None)
    _record_facts(lineage, ctx)
    return lineage, ctx


def _run(cfg: Config, rd: RunDir) -> Lineage:
    """:func:`run` in its opened run directory, holding its writer lock."""
    lineage, ctx = _prepared(cfg, rd)
    runner = BranchRunner(cfg.branch.parallel and branches_fit_beside(cfg.train))
    progress = RunProgress(cfg.name, ctx.versions, cfg.train.global_batch_size, cfg.branch.fraction, ctx.rd)
    index = {v["name"]: k for k, v in enumerate(ctx.versions)}

    def released(entry: BranchEntry) -> None:
        _record_branch(lineage, ctx, entry)
        progress.branch_done(index[entry.version], entry.curve)

    with lineage_run(ctx.tracking):
        _train_versions(lineage, ctx, progress, runner, released)
    return lineage.refresh()  # with what sweeps beside the run recorded meanwhile, for its report


def _check_name(cfg: Config, lineage: Lineage) -> None:
    """A lineage keeps the name it started with: its record, its release model cards and its
    MLflow experiment (``tracking.experiment`` defaults to it) carry it."""
    if lineage.path.is_file() and lineage.name and lineage.name != cfg.name:
        raise ConfigChangedError(
            f"name: {cfg.name!r} differs from {lineage.name!r}, the name the lineage in {cfg.run_dir} "
            f"started with (its record, model cards and MLflow experiment carry it): set name back to "
            f"{lineage.name!r} to go on with this lineage, or set run_dir to a new directory to start another")


def _check_versions_kept(cfg: Config, lineage: Lineage, sources: list[VersionSource]) -> None:
    """Every version the lineage has prepared is still in the corpus: one left out would drop from
    the lineage's versions while its main-path segment and release stay, and no version could be
    appended after it."""
    found = [s.name for s in sources]
    gone = [v for v in lineage.version_names() if v not in found]
    if gone:
        field = "data.versions" if cfg.data.versions else "data.corpus"
        raise ConfigChangedError(
            f"{field}: version(s) {', '.join(gone)} of the lineage in {cfg.run_dir} are not among the "
            f"corpus's versions now ({', '.join(found) or 'none'}; corpus {cfg.data.corpus}); a lineage's "
            f"versions can only be appended: restore them (and list them in data.versions, if it lists "
            f"versions), or set run_dir to a new directory to start another")


def _check_resumed_plans(cfg: Config, lineage: Lineage, rd: RunDir) -> None:
    """The segments a re-run resumes still continue what their checkpoints trained, planned from
    the lineage record as :func:`raypath.mainpath.main_segment` and
    :func:`raypath.branches.release_branch` plan them: the main segment still checkpoints the fork
    point its checkpoints passed, an unfinished release branch still decays as its checkpoints
    did. Refused here, before Ray starts and before the lineage or ``config.yaml`` record a config
    that never ran (a sweep's trials are checked when they start, :func:`raypath.segment.fit_segment`)."""
    recorded = Lineage.load(rd).config.get("branch") or {}
    start = 0
    for version in lineage.versions():
        main = lineage.main(version.name)
        if main is None:
            name, was = f"main-{version.name}", recorded.get("fraction")
            note = (f"branch.fraction is {cfg.branch.fraction}, the lineage's last run had {was}" if was is not None
                    and was != cfg.branch.fraction else "branch.fraction changed?")
            check_plan(Plan(name, str(rd.path / "ray" / name), main_schedule(cfg.train),
                            main_steps(cfg, start, version.stream_rows)[1], rd), note)
            return
        start, name = main.end_step, f"branch-{version.name}"
        if lineage.branch(name) is None and lineage.release(version.name) is None:
            schedule = branch_schedule(cfg, main, cfg.branch.decay(), main.fork_step)
            check_plan(Plan(name, str(rd.path / "ray" / name), schedule, (), rd))


def _checkpointed_steps(ctx: RunContext, segment: str, start_step: int) -> int:
    """Steps a segment starting at ``start_step`` trained before: up to its newest checkpoint (for the
    progress line; not verified, as the workers' resume is)."""
    dirs = step_dirs(ctx.storage(segment), ctx.rd)
    return step_of(dirs[-1]) - start_step if dirs else 0


def _main_path_started(lineage: Lineage, rd: RunDir) -> bool:
    """Whether a main segment has trained (or checkpointed, before a crash) in this run directory.
    A segment that failed before its first checkpoint trained nothing that its settings must keep."""
    ray_dir = rd.path / "ray"
    return bool(lineage.main_path()) or any(n.startswith("main-") and step_dirs(ray_dir / n, rd)
                                            for n in rd.children(ray_dir))


def _record_facts(lineage: Lineage, ctx: RunContext) -> None:
    """What this run trains with: tokenizer, base model, storage, prepared versions (one save)."""
    with lineage.batched():
        lineage.set_fact("tokenizer", {"path": ctx.tokenizer_dir, "vocab_size": ctx.vocab_size,
                                       "eos_id": ctx.eos_id})
        if ctx.base_model:
            lineage.set_fact("model", {**lineage.fact("model"), "base": ctx.base_model})
        if ctx.rd.mirror is not None:
            lineage.set_fact("storage", {"run_dir": ctx.rd.uri})
        lineage.set_versions(ctx.versions)


def finished_note(lineage: Lineage, names: list[str]) -> str | None:
    """What a re-run skips, said once: the versions whose main segment and release are recorded
    (otherwise the first line a resumed run prints is the version it picks up at)."""
    done = [n for n in names if lineage.main(n) is not None and lineage.release(n) is not None]
    if not done:
        return None
    return f"{', '.join(done)} already trained and released (lineage.json): skipped"


def _train_versions(lineage: Lineage, ctx: RunContext, progress: RunProgress, runner: BranchRunner,
                    released) -> None:
    """Each version in order: its main-path segment, then its release branch in the background."""
    note = finished_note(lineage, [v["name"] for v in ctx.versions])
    if note:
        log.info("run %s: %s", ctx.cfg.name, note)
    prev = None
    for k, version in enumerate(ctx.versions):
        main = lineage.main(version["name"])
        trained_here = main is None
        if trained_here:
            progress.resume(_checkpointed_steps(ctx, f"main-{version['name']}", prev.end_step if prev else 0))
            log.info(progress.line(k, f"main-{version['name']}"))
            main = run_main_version(ctx, k, prev)
            lineage.record_main(main)
        progress.main_done(k, main.curve if trained_here else None)
        if lineage.release(version["name"]) is None:
            if lineage.branch(f"branch-{version['name']}") is None:
                log.info(progress.line(k, f"branch-{version['name']}"))
                runner.submit(release_branch(ctx, k, main))
            else:  # the branch finished, the run stopped before releasing it
                _decide_release(lineage, ctx, version["name"])
                progress.branch_done(k)
        else:
            progress.branch_done(k)
        for entry in runner.finished():
            released(entry)
        prev = main
    for entry in runner.finished(wait=True):
        released(entry)
    log.info(progress.line(len(ctx.versions) - 1, "done"))
