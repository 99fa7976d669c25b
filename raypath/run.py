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

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from raypath.branches import BranchRunner, release_branch
from raypath.cluster import init_ray
from raypath.config import Config, ConfigError
from raypath.console import RunProgress
from raypath.corpus import build_embedded_corpus
from raypath.data import PrepareSpec, discover_versions, prepare_versions
from raypath.lineage import Lineage
from raypath.mainpath import run_main_version
from raypath.mirror import Mirror, fetch, publish, run_location
from raypath.storage import atomic_write_bytes, read_json
from raypath.tokenizer import iter_texts, load_tokenizer, train_tokenizer
from raypath.tracking import TrackingSpec, open_lineage, record_release

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every segment of a run shares: config, paths, tokenizer ids, versions.

    run_dir: the local run directory (for a remote ``cfg.run_dir``, its mirror).
    mirror: the remote run directory behind ``run_dir``; None for a local run.
    tracking: the lineage's experiment tracking, opened on the driver when the
        context is built (so a sweep's trials share one MLflow parent run).
    """

    cfg: Config
    run_dir: Path
    tokenizer_dir: str
    vocab_size: int
    eos_id: int
    pad_id: int | None
    versions: list[dict]
    mirror: Mirror | None = None
    tracking: TrackingSpec | None = None

    def __post_init__(self):
        if self.tracking is None:
            self.tracking = open_lineage(self.cfg, self.run_dir)

    def storage(self, name: str) -> str:
        return str(self.run_dir / "ray" / name)

    def val_paths(self, k: int) -> dict[str, str]:
        """Validation splits of every version seen up to version ``k``."""
        return {v["name"]: v["val_path"] for v in self.versions[: k + 1]}

    def segment_fields(self, name: str) -> dict:
        return dict(name=name, model=self.cfg.model, train=self.cfg.train, vocab_size=self.vocab_size,
                    eos_id=self.eos_id, pad_id=self.pad_id, seq_len=self.cfg.data.seq_len,
                    storage=self.storage(name), curves_path=str(self.run_dir / "curves" / f"{name}.jsonl"),
                    mirror=self.mirror, tracking=self.tracking)


def _corpus_dir(cfg: Config, run_dir: Path) -> Path:
    if cfg.data.corpus == "embedded":
        return build_embedded_corpus(run_dir / "corpus", max_docs_per_version=cfg.data.max_docs_per_version,
                                     seed=cfg.data.seed)
    return Path(cfg.data.corpus)


#: What :func:`prepare` writes under the run directory (published to a remote one).
PREPARED = ("config.yaml", "corpus", "tokenizer", "data")


def _open_run_dir(cfg: Config) -> tuple[Path, Mirror | None]:
    """The local run directory; for a remote one, its mirror filled with the remote state."""
    run_dir, mirror = run_location(cfg.run_dir, cfg.cluster.local_dir, cfg.cluster.storage_endpoint)
    if mirror is not None:
        mirror.pull_run()
        _check_mirror_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, mirror


def _check_mirror_path(run_dir: Path) -> None:
    # The lineage and data manifest hold absolute mirror paths: resuming in a
    # different local directory would point them at files that are not there.
    lineage = run_dir / "lineage.json"
    recorded = (read_json(lineage).get("storage") or {}).get("local_dir") if lineage.is_file() else None
    if recorded not in (None, str(run_dir)):
        raise ConfigError(f"cluster.local_dir: this run's mirror was {recorded!r}, now {str(run_dir)!r}; "
                          f"set cluster.local_dir={recorded} to resume it")


def prepare(cfg: Config) -> RunContext:
    """Corpus -> tokenizer -> tokenized versions (idempotent). Needs Ray for tokenization."""
    run_dir, mirror = _open_run_dir(cfg)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    sources = discover_versions(_corpus_dir(cfg, run_dir), cfg.data.versions)
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
        tok_dir = str(Path(cfg.data.tokenizer).resolve())
    else:
        tok_dir = str(run_dir / "tokenizer")
        tok = train_tokenizer(iter_texts(sources[0].train_files, cfg.data.text_column),
                              cfg.data.vocab_size, tok_dir)
    spec = PrepareSpec(data_dir=str(run_dir / "data"), tokenizer_dir=tok_dir, seq_len=cfg.data.seq_len,
                       text_column=cfg.data.text_column, val_blocks=cfg.data.val_blocks,
                       replay_ratio=cfg.data.replay_ratio, seed=cfg.data.seed,
                       actors=cfg.data.tokenize_actors, min_blocks=cfg.train.global_batch_size,
                       on_bad_input=cfg.data.on_bad_input, max_doc_chars=cfg.data.max_doc_chars)
    versions = prepare_versions(sources, spec)
    for name in PREPARED:
        publish(mirror, run_dir / name)
    return RunContext(cfg, run_dir, tok_dir, len(tok), tok.eos_token_id, tok.pad_token_id, versions, mirror)


def _record_branch(lineage: Lineage, ctx: RunContext, entry: dict) -> None:
    # The branch's driver ran as a task on some node: refresh this node's copy of its curve.
    fetch(ctx.mirror, entry["curve"], missing_ok=True)
    lineage.record_branch(entry)
    k = next(i for i, v in enumerate(ctx.versions) if v["name"] == entry["version"])
    lineage.record_release({
        "version": entry["version"], "version_index": k, "path": entry["release"],
        "branch": entry["name"], "tokens_total": entry["tokens_total"],
        "val": {key: v for key, v in entry["metrics"].items() if key.startswith("val/")},
    })
    record_release(ctx.tracking, lineage.release(entry["version"]))
    log.info("released %s from %s: %s", entry["version"], entry["name"], entry["metrics"])


def run(cfg: Config) -> Lineage:
    """Train every version of the corpus along the main path and release each one."""
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    ctx = prepare(cfg)
    lineage = Lineage.open(ctx.run_dir, cfg.name, cfg.to_dict(), ctx.mirror)
    lineage.data["tokenizer"] = {"path": ctx.tokenizer_dir, "vocab_size": ctx.vocab_size, "eos_id": ctx.eos_id}
    if ctx.mirror is not None:
        lineage.data["storage"] = {"run_dir": ctx.mirror.remote, "local_dir": ctx.mirror.local}
    lineage.set_versions(ctx.versions)

    runner = BranchRunner(cfg.branch.parallel)
    progress = RunProgress(cfg.name, ctx.versions, cfg.train.global_batch_size, cfg.branch.fraction)
    index = {v["name"]: k for k, v in enumerate(ctx.versions)}

    def released(entry: dict) -> None:
        _record_branch(lineage, ctx, entry)
        progress.branch_done(index[entry["version"]])

    prev = None
    for k, version in enumerate(ctx.versions):
        main = lineage.main(version["name"])
        trained_here = main is None
        if trained_here:
            log.info(progress.line(k, f"main-{version['name']}"))
            main = run_main_version(ctx, k, prev)
            lineage.record_main(main)
        progress.main_done(k, here=trained_here)
        if lineage.release(version["name"]) is None:
            log.info(progress.line(k, f"branch-{version['name']}"))
            runner.submit(release_branch(ctx, k, main))
        else:
            progress.branch_done(k, here=False)
        for entry in runner.finished():
            released(entry)
        prev = main
    for entry in runner.finished(wait=True):
        released(entry)
    log.info(progress.line(len(ctx.versions) - 1, "done"))
    return lineage


def write_run_report(cfg: Config, lineage: Lineage) -> dict[str, str]:
    """``RUN_DIR/report/`` (plot, CSV, markdown) of a run, published to a remote run directory."""
    from raypath.report import REPORT_DIR, write_report

    if lineage.mirror is None:
        return write_report(cfg.run_dir)
    paths = write_report(lineage.path.parent)
    publish(lineage.mirror, lineage.path.parent / REPORT_DIR)
    return paths
