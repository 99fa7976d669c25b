"""Branch search: which branch length and decay shape give the best release for the compute?

``raypath sweep CONFIG --version K`` forks many release branches of version K
from its main-path checkpoints and runs them as a Ray Tune experiment:

* every **trial** is one branch (:func:`raypath.branches.branch_segment`) run as
  its own Ray Train job by a Tune function trainable that holds **0 CPUs** (it
  only waits on its Train workers; holding a CPU would starve them on a small
  machine), its Train reports relayed to Tune by a thread of its own (:class:`_TuneRelay`);
* **Optuna** (TPE, seeded) proposes each trial's branch fraction, decay shape
  (with its power for ``polynomial`` / ``exponential``), ``min_lr_ratio`` and
  replay ratio; the proposed fraction is snapped to the nearest main-path
  checkpoint that exists (both are recorded);
* the objective is the weighted validation loss over the old versions' splits
  and version K's split, plus an optional compute penalty; a hard token budget
  keeps longer branches from being proposed at all;
* the version's release is then decided over every measured branch of version K
  (the configured branch, earlier sweeps' trials, this sweep's): the best trial
  replaces the live release only when it beats it (:mod:`raypath.releases`);
  ``sweep.pin`` releases a trial regardless.

Everything of a sweep lives in ``RUN_DIR/sweeps/vK/<name>/`` (the Tune
experiment directory)::

    sweep.json            settings, fork points, objective weights (written once)
    results.json          one record per trial + best/released (written at the end)
    standing.json         each finished trial's weighted val loss, what `raypath status` needs of them
    optuna.journal        the Optuna study (Optuna's JournalStorage): every proposal and score,
                          as they happen; ``optuna_study(sweep_dir)`` loads it
    trial_<id>/           Tune's trial directory (params.json, result.json, progress.csv)
    pruned.json           the trials whose weights ``sweep.keep_trials`` deleted, with their records
    kept.json             the best ``keep_trials`` finished trials' scores so far (what a trial checks
                          before it exports; rewritten by each run)
    branches/<segment>/   each trial's Ray Train run (its checkpoints: a finished trial's final one,
                          a stopped trial's none, a pruned one's none)
    curves/<segment>.jsonl  each trial's full curve (loss, lr, val losses, objective)
    exports/<segment>/    each trial's exported model; a released one is copied to releases/vK/rN

What a sweep keeps on disk grows with its trials: each finished one's final checkpoint (its
weights) and exported model. ``sweep.keep_trials: N`` deletes them for every finished trial but
the best N by score (and the pinned one) as soon as N better ones have finished, so a sweep holds
about N + ``max_concurrent`` branches' weights at any time; a stopped trial's checkpoints go once
its Train run has ended (:func:`_keeper`). A trial that ends behind N finished ones does not
export its model at all (:func:`beaten`): the sweep would delete it at once.

Re-running the same command resumes an interrupted sweep with
``Tuner.restore``: finished trials are not run again, unfinished ones continue
from their latest branch checkpoint, errored ones are retried.

Sweep settings are the ``sweep:`` section of the run config
(:class:`raypath.config.SweepConfig`), so one YAML serves ``raypath run`` and
``raypath sweep``.

Law guidance (``sweep.guide: law``, the default): before the first trial the
continual-pre-training law is fitted on the lineage's curves
(:class:`raypath.lawguide.LawGuide`), a dense grid of (fraction, shape, power,
min_lr_ratio) is ranked by predicted score (objective + compute penalty, what
Optuna and the release compare), and the best few are Optuna's first trials;
:class:`raypath.lawguide.LawStopper` stops trials whose forecast final score
cannot beat the best finished one, and the law is refitted after every finished
trial (a resumed sweep's, on the trials that finished before, too). If the law
cannot be fitted, or not on every split the objective weighs (too few points),
the sweep says which and runs plain TPE. Before a branch of the version has finished, the
ranking takes a decay's gain from the nearest earlier phase (:func:`raypath.lawguide.decay_prior`);
with no decay seen at all it enqueues no candidates, but still stops and refits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raypath import checkpoint as ckpt
from raypath.cluster import DATA_CPUS
from raypath.config import Config, ConfigError, SweepConfig, validate
from raypath.console import verbose
from raypath.lineage import (
    RESULTS_JSON,
    Branch,
    Lineage,
    MainEntry,
    check_fixed_settings,
    read_sweep_record,
    resolve_version,
    sweep_run_dir,
)
from raypath.mirror import KEPT_JSON, LOCAL, PRUNED_JSON, STOPPED_JSON, SWEEP_JSON, RunDir, run_location
from raypath.releases import STANDING_JSON, Candidate, Objective, Releaser, objective_weights, standing_record
from raypath.schedules import POWER_SHAPES, decay_from
from raypath.storage import RunFileError, absolute_paths, read_json, relative_paths, write_json, writer_lock
from raypath.tracking import lineage_run

log = logging.getLogger(__name__)

#: The metric Optuna minimises: objective + compute penalty.
METRIC = "score"
#: What a trial's Tune actor reserves: no CPU (it only waits on its Train workers,
#: which reserve their own; holding a CPU here starves them on a small machine).
#: Ray cannot place an all-zero bundle ("empty head and zero worker bundles"),
#: so the bundle asks for one byte of memory instead.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}
#: What a sweep of a remote run keeps only in the bucket: its trials' checkpoints (written
#: there by Ray Train) and exported models; the rest (Tune's state, the journal, records,
#: curves) is worked on in the mirror and uploaded after every trial.
SWEEP_REMOTE_ONLY = ("branches", "exports")
#: The sweep this driver's ``Tuner.fit()`` runs (its plan and settings): what :func:`_keeper`'s callback,
#: which Tune restores as pickled when the sweep started, works on now.
_RUNNING: ContextVar[tuple[SweepPlan, SweepConfig] | None] = ContextVar("raypath_running_sweep", default=None)


# --------------------------------------------------------------------------- settings

def with_cli(cfg: Config, name: str | None = None, pin: str | None = None) -> Config:
    """``cfg`` with the sweep's ``--name`` / ``--pin`` from the command line applied (validated)."""
    # an empty --name or --pin is refused by validate, not read as "not given"
    sc = dataclasses.replace(cfg.sweep, name=cfg.sweep.name if name is None else name,
                             pin=cfg.sweep.pin if pin is None else pin)
    out = dataclasses.replace(cfg, sweep=sc)
    try:
        validate(out)
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    return out


# --------------------------------------------------------------------------- planning

def fork_points(main: MainEntry, storage: str | os.PathLike, rd: RunDir = LOCAL) -> list[dict]:
    """Complete main-path checkpoints of one version that a branch can fork from.

    A fork at step ``s`` re-trains the last ``(end - s) / (end - start)`` of the
    version's stream. The version boundary itself (a zero-length branch) is not one.
    Complete: every file there, none hashed (the trial that forks from one hashes what it
    loads); hashing every candidate at each sweep's start cost forks x 12 bytes a parameter.
    """
    start, end = main.start_step, main.end_step
    out = []
    for d in ckpt.step_dirs(storage, rd):
        step = ckpt.step_of(d)
        if not start < step < end:
            continue
        try:
            ckpt.verify(d, rd, deep=False)
        except ckpt.CheckpointError as e:
            log.warning("fork point skipped: %s", e)
            continue
        out.append({"step": step, "fraction": (end - step) / (end - start), "path": str(d)})
    return out


def derive_max_concurrent(train, num_samples: int, resources: dict[str, float]) -> int:
    """Trials that fit at once: each needs its Train workers (and GPUs) plus a CPU for data."""
    per_trial_cpu = train.num_workers * train.cpus_per_worker + DATA_CPUS
    n = int(resources.get("CPU", 0.0) // per_trial_cpu)
    if train.use_gpu:
        n = min(n, int(resources.get("GPU", 0.0) // train.num_workers))
    return max(1, min(n, num_samples))


def choose_forks(forks: list[dict], main: MainEntry, sc: SweepConfig, tokens_per_step: int,
                 version: str = "") -> list[dict]:
    """The fork points proposals snap to: within the token budget, and within
    ``sweep.fraction`` when any is (else the nearest of all, with a warning).
    Logs the choice, and says so clearly when only one fork point is left."""
    allowed = forks
    if sc.token_budget is not None:
        allowed = [f for f in forks if (main.end_step - f["step"]) * tokens_per_step <= sc.token_budget]
        if forks and not allowed:
            raise ConfigError(f"sweep.token_budget: {sc.token_budget:g} tokens is less than the shortest branch "
                              f"{version}'s checkpoints allow "
                              f"({(main.end_step - forks[-1]['step']) * tokens_per_step} tokens)")
    if not allowed:
        raise ConfigError(f"{version}: the main path has no verified checkpoint inside the version to fork "
                          f"from; set train.checkpoint_every and re-train it")
    lo, hi = sc.fraction
    chosen = [f for f in allowed if lo - 1e-9 <= f["fraction"] <= hi + 1e-9]
    if not chosen:
        log.warning("no %s checkpoint within sweep.fraction %s; snapping to the nearest of all %d",
                    version, list(sc.fraction), len(allowed))
        chosen = allowed
    log.info("%s: %d fork points (fraction@step: %s)", version, len(chosen),
             ", ".join(f"{f['fraction']:.3f}@{f['step']}" for f in chosen))
    if len(chosen) == 1:
        log.warning("%s has only one fork point (step %d, fraction %.3f): every trial gets the same branch "
                    "length. Set train.checkpoint_every (e.g. %d) and re-train the main path to search "
                    "branch lengths", version, chosen[0]["step"], chosen[0]["fraction"],
                    max(1, (main.end_step - main.start_step) // 20))
    return chosen


def make_sampler(sc: SweepConfig, max_concurrent: int):
    """Optuna's seeded TPE sampler of a sweep (multivariate over the conditional space).

    The first ``startup_trials`` proposals are seeded random draws, so a sweep
    proposes the same first trials whatever the cluster does.
    """
    import optuna

    startup = sc.startup_trials or min(10, max(max_concurrent, sc.num_samples // 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=sc.seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True)


@dataclass
class SearchSpace:
    """Optuna define-by-run space (picklable: Tune saves it with the searcher's state).

    Suggests ``fraction``, ``shape``, ``power`` (only for polynomial/exponential),
    ``min_lr_ratio`` and ``replay_ratio``, then returns the fork point the
    fraction snaps to as constants (``fork_step``, ``fraction_actual``,
    ``branch_steps``, ``branch_tokens``), so every trial's config records both.
    """

    fraction: tuple[float, float]
    shapes: list[str]
    power: tuple[float, float]
    min_lr_ratio: tuple[float, float]
    replay_ratios: list[float]
    forks: list[dict]
    end_step: int
    tokens_per_step: int

    def snap(self, fraction: float) -> dict:
        # Nearest fraction; on a tie the shorter (cheaper) branch.
        return min(self.forks, key=lambda f: (abs(f["fraction"] - fraction), f["fraction"]))

    def __call__(self, trial) -> dict:
        fraction = trial.suggest_float("fraction", *self.fraction)
        shape = trial.suggest_categorical("shape", self.shapes)
        if shape in POWER_SHAPES:
            trial.suggest_float("power", *self.power)
        trial.suggest_float("min_lr_ratio", *self.min_lr_ratio)
        trial.suggest_categorical("replay_ratio", self.replay_ratios)
        fork = self.snap(fraction)
        steps = self.end_step - fork["step"]
        return {"fork_step": fork["step"], "fraction_actual": fork["fraction"], "branch_steps": steps,
                "branch_tokens": steps * self.tokens_per_step}


@dataclass
class SweepPlan:
    """What every trial needs; built by the driver, shipped to trials with ``tune.with_parameters``."""

    ctx: Any  # raypath.run.RunContext
    k: int
    main: MainEntry
    sweep_dir: str
    weights: dict[str, float]
    compute_penalty: float
    version_tokens: int

    @property
    def version(self) -> str:
        return self.ctx.versions[self.k]["name"]

    @property
    def stream_ratio(self) -> float:
        """Replay ratio the version's stream was prepared with (none for the first version)."""
        return self.ctx.cfg.data.replay_ratio if self.k > 0 else 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.ctx.cfg.train.global_batch_size * self.ctx.cfg.data.seq_len

    def segment_name(self, trial_id: str) -> str:
        return f"branch-{self.version}-{trial_id}"

    def curve_path(self, trial_id: str, sweep_dir: str | os.PathLike | None = None) -> str:
        return str(Path(self.sweep_dir if sweep_dir is None else sweep_dir) / "curves"
                   / f"{self.segment_name(trial_id)}.jsonl")

    def segment(self, trial_id: str, config: dict):
        """The trial's branch segment, with its storage, curve and export under the sweep
        (and, for a replay ratio other than the stream's, its own re-mixed stream)."""
        from raypath.branches import branch_segment

        name = self.segment_name(trial_id)
        root = Path(self.sweep_dir)
        decay = decay_from(config)
        seg = branch_segment(self.ctx, self.k, self.main, decay, int(config["fork_step"]), name=name,
                             export_dir=str(root / "exports" / name))
        ratio = float(config.get("replay_ratio", self.stream_ratio))
        card = {**seg.model_card, "sweep": str(root), "trial_id": trial_id, "objective_weights": self.weights,
                "fraction_proposed": config.get("fraction"), "fraction_actual": config.get("fraction_actual"),
                "replay_ratio": ratio}
        stream = seg.stream_path
        if abs(ratio - self.stream_ratio) > 1e-9:
            mix = self.replay_stream(seg, ratio)
            stream = mix["stream_path"]
            card["replay"] = mix
        skip = functools.partial(beaten, str(root / KEPT_JSON), self.ctx.rd, trial_id,
                                 self.penalty(config["branch_tokens"]))
        return dataclasses.replace(seg, storage=str(root / "branches" / name), curves_path=self.curve_path(trial_id),
                                   stream_path=stream, objective_weights=dict(self.weights),
                                   model_card=relative_paths(card, self.ctx.run_dir), skip_export=skip)

    def replay_stream(self, seg, ratio: float) -> dict:
        """The version's stream with the branch's rows re-mixed to ``ratio`` replay (written once
        per fork and ratio, shared by the trials that draw it)."""
        from raypath.data import replay_variant

        fork = ckpt.load_state(seg.init_checkpoint, seg.rd)
        out = Path(self.ctx.run_dir) / "data" / self.version / "branch-streams" / \
            f"fork{seg.start_step:08d}-replay{ratio:.4f}"
        return replay_variant(self.ctx.versions[self.k], self.ctx.versions[: self.k], fork.get("consumed", []),
                              seg.stream_limit, ratio, self.ctx.cfg.data.seed, out, self.ctx.rd)

    def penalty(self, branch_tokens: float) -> float:
        """The compute penalty of a branch: every score of the sweep (the trials' reports, Optuna's
        value, the records, the law's ranking and stops) adds this, as the release's
        :meth:`raypath.releases.Objective.score` does."""
        return self.compute_penalty * branch_tokens / max(self.version_tokens, 1)

    def branch_penalty(self, branch_steps: int) -> float:
        """:meth:`penalty` of a branch of ``branch_steps`` steps (what the law guide knows of a candidate)."""
        return self.penalty(branch_steps * self.tokens_per_step)


@dataclass(frozen=True)
class SweepPath(os.PathLike):
    """A path of a sweep's files that resolves, at each use, under the sweep directory being run
    (:func:`raypath.study.resuming_dir`; ``started_in`` outside a sweep's ``Tuner.fit()``).

    What Tune pickles with a guided sweep (law guide, stopper, refit callback) comes back from
    ``Tuner.restore`` as pickled when the sweep started (Ray 2.60 writes ``tuner.pkl`` once); a
    run directory moved since must not have them read and write where it was.

    rel: the path under the sweep directory (or under its ``up``-th parent: 3 is the run directory).
    """

    started_in: str
    rel: str = ""
    up: int = 0

    def __fspath__(self) -> str:
        from raypath.study import resuming_dir

        root = Path(resuming_dir() or self.started_in)
        return str((root.parents[self.up - 1] if self.up else root) / self.rel)


# --------------------------------------------------------------------------- the trial

class _TuneRelay:
    """Carries a branch's Train reports into Tune from a thread of the trial's own process.

    Ray's ``TuneReportCallback`` (Ray 2.60) hands them to Tune's main thread, which puts each
    into the one-slot result queue that it alone empties. A report the trial function makes
    itself (its final one below, and the one Tune adds when the function returns) can take that
    slot while the main thread is still forwarding: both puts then wait for ever, and the trial,
    its sweep and the job never end. No pause by the trial closes that window on a loaded
    machine. Here the trial's side is the only one that puts reports in, one at a time and in
    order, and Tune's main thread only takes them out.

    queue: where the Train controller's callback puts each report (a ``ray.util.queue.Queue``
        actor, unbounded: the callback never waits on Tune).
    """

    POLL_S = 0.5  # how soon the relay notices the branch has ended, once its queue is empty

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.done, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, name="raypath-tune-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray import tune
        from ray.util.queue import Empty

        try:
            while True:
                try:
                    item = self.queue.get(timeout=self.POLL_S)
                except Empty:
                    if self.done.is_set() and self.queue.empty():
                        return
                    continue
                tune.report(item)
        except BaseException as e:  # Tune ends the report of a trial it stops with SystemExit
            self.error = e

    def close(self) -> None:
        """Once the branch's Train run has returned (every report is queued): forward the rest."""
        self.done.set()
        self.thread.join()
        self.queue.shutdown()
        if self.error is not None and not isinstance(self.error, SystemExit):
            raise self.error


def _report_callback(queue, extra: dict, penalty: float):
    from ray.train.v2.api.callback import UserCallback
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    class SweepReportCallback(UserCallback):
        """Queues each Train report for Tune (:class:`_TuneRelay`) with the trial's ``score``
        and fork facts, and the checkpoint's path as ``TuneReportCallback`` adds it.

        Every result carries ``score`` (Tune checks the metric on each one):
        ``objective + penalty`` at evaluations, the last known value in
        checkpoint-only reports. A checkpoint-only report before the first evaluation
        (``train.checkpoint_every`` or ``checkpoint_every_minutes`` below ``eval_every``) has
        no score yet and is not passed on: as ``inf`` it made Tune's TensorBoard logger warn
        "NaN or Inf found in input tensor" for each one. The final report is always an
        evaluation, so the score Optuna is told is exact.
        """

        def __init__(self):
            self.last = math.inf

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])  # rank 0's, as Ray Train keeps
            if "objective" in first:
                self.last = float(first["objective"]) + penalty
            elif math.isinf(self.last):
                return
            first.update(extra, score=self.last, penalty=penalty)
            if checkpoint:
                first[CHECKPOINT_PATH_KEY] = checkpoint.path
            queue.put(first)

    return SweepReportCallback()


def _trial(config: dict, plan: SweepPlan) -> None:
    """Tune function trainable: one branch as a Ray Train run (resumes its own checkpoints)."""
    from ray import tune

    from raypath.segment import fit_segment

    trial_id = tune.get_context().get_trial_id()
    pruned = pruned_trials(plan).get(trial_id)
    if pruned is not None:  # finished, and its weights deleted, before Tune recorded it
        log.info("trial %s: finished before (its weights were deleted: sweep.keep_trials); reporting its final "
                 "result", trial_id)
        tune.report(pruned["report"])
        return
    seg = plan.segment(trial_id, config)
    if _finished(seg):
        # Interrupted after its branch finished but before Tune recorded it: the
        # restored trial only reports the result, it trains nothing again.
        log.info("trial %s: branch %s already finished; reporting its final result", trial_id, seg.name)
    else:
        relay = _TuneRelay()
        try:
            fit_segment(seg, callbacks=[_report_callback(relay.queue, _extra(seg, config),
                                                         plan.penalty(config["branch_tokens"]))])
        finally:
            relay.close()
    # The final evaluation again, from the branch's final checkpoint, once every Train report
    # has reached Tune: the last result Tune and Optuna see is the exact final score.
    tune.report({**_final_report(plan, seg, config), "exported": _exported(seg)})


def _extra(seg, config: dict) -> dict:
    """What every report of a trial carries besides its metrics."""
    return {"fork_step": seg.start_step, "branch_steps": seg.end_step - seg.start_step,
            "branch_tokens": int(config["branch_tokens"])}


def _final_report(plan: SweepPlan, seg, config: dict) -> dict:
    """A finished trial's last Tune result, read from its branch's final checkpoint."""
    final = ckpt.load_state(Path(seg.storage) / ckpt.step_dir_name(seg.end_step), seg.rd)["metrics"]
    penalty = plan.penalty(config["branch_tokens"])
    return {**final, **_extra(seg, config), "score": final["objective"] + penalty, "penalty": penalty,
            "final": True, "test_objective": Objective(plan.weights).value(final, "test")}


def _finished(seg) -> bool:
    """The branch reached its end step (complete checkpoint, its ``state.json`` hashed: what the
    trial reads of it) and exported its model, or need not (:func:`beaten`)."""
    final_dir = Path(seg.storage) / ckpt.step_dir_name(seg.end_step)
    try:
        ckpt.verify(final_dir, seg.rd, names=("state.json",))
    except ckpt.CheckpointError:
        return False
    return _exported(seg) or seg.skip_export(ckpt.load_state(final_dir, seg.rd)["metrics"]) is not None


def _exported(seg) -> bool:
    return seg.rd.fetch(Path(seg.export_dir) / "model_card.json", missing_ok=True).is_file()


def beaten(kept_path: str, rd: RunDir, trial_id: str, penalty: float, metrics: dict) -> str | None:
    """Why a trial that ends with the final ``metrics`` need not export its model: ``sweep.keep_trials``
    finished trials (:data:`KEPT_JSON`) score better (ties: the lower id), so the sweep deletes its
    weights as soon as it ends (:func:`keep_best`). None when it may be kept: fewer finished, the
    pinned trial, or no record (a new run of the sweep writes its own). Finished trials only
    accumulate: a trial beaten once stays beaten."""
    try:
        kept = rd.read_json(kept_path)
    except FileNotFoundError:
        return None
    n, best = kept["keep_trials"], [tuple(b) for b in kept["best"]]
    if "objective" not in metrics or trial_id == kept.get("pin") or len(best) < n:
        return None
    score = metrics["objective"] + penalty
    if best[n - 1] >= (score, trial_id):
        return None
    return (f"score {score:.4f}, behind the {n} best finished trials' (the last {best[n - 1][0]:.4f}): "
            f"the sweep keeps only their weights (sweep.keep_trials: {n})")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# --------------------------------------------------------------------------- the sweep

def _settings_record(sc: SweepConfig) -> dict:
    """The settings that define a sweep's search; a resumed sweep must be given the same ones."""
    d = dataclasses.asdict(sc)
    for key in ("pin", "max_concurrent", "name", "keep_trials"):
        d.pop(key)
    return yaml.safe_load(yaml.safe_dump(d))  # tuples -> lists, as in the JSON record


def _start_or_check_record(sweep_dir: Path, record: dict) -> dict:
    """Write ``sweep.json`` for a new sweep; for an existing one check it is the same search
    and return what was recorded (a restored Tuner keeps its original concurrency)."""
    path = sweep_dir / SWEEP_JSON
    if not path.is_file():
        write_json(path, record, root=sweep_run_dir(sweep_dir))
        return record
    old = read_sweep_record(path)
    # a sweep recorded before a setting existed ran with its default
    old["settings"] = {**_settings_record(SweepConfig()), **old.get("settings", {})}
    for key in ("version", "settings", "objective_weights"):
        if old.get(key) != record[key]:
            was, now = old.get(key), record[key]
            if isinstance(was, dict) and isinstance(now, dict):  # name the fields, not two whole dicts
                diff = [f"sweep.{k}: {was.get(k)!r} then, {now.get(k)!r} now" if key == "settings" else
                        f"{k}: {was.get(k)!r} then, {now.get(k)!r} now"
                        for k in sorted(set(was) | set(now), key=str) if was.get(k) != now.get(k)]
                what = f"different {key} ({'; '.join(diff)})"
            else:
                what = f"different {key} ({was} vs now {now})"
            raise ConfigError(f"sweep {sweep_dir.name!r} of {record['version']} was started with {what}; resume it "
                              f"with the same settings or start a new one with --name")
    return old


@dataclass
class Guidance:
    """What the law adds to a new sweep (see the module doc)."""

    points: list[dict]  # Optuna's first trials, best predicted first
    stopper: Any  # raypath.lawguide.LawStopper, or None when sweep.stop_margin is 0
    callback: Any  # refits the law after every finished trial
    fits: dict  # split -> law, R^2, MAPE, degenerate parameters (at the start)


def law_guidance(plan: SweepPlan, sc: SweepConfig, space: SearchSpace) -> Guidance | None:
    """Fit the law on the lineage and derive the sweep's guidance; None (plain TPE, with a
    warning) when the lineage's curves cannot support a fit."""
    from raypath import lawguide

    try:
        guide = lawguide.LawGuide(SweepPath(plan.sweep_dir, up=3), plan.version, weights=plan.weights,
                                  forks=space.forks, include_sweeps=sc.guide_sweeps, penalty=plan.branch_penalty)
        if not guide.fits:
            raise ValueError("no validation split has enough observed points")
        guide.check_objective()
        n = sc.guide_points or max(1, min(4, sc.num_samples // 2))
        try:
            points = guide.points_to_evaluate(n, fraction=sc.fraction, shapes=sc.shapes, power=sc.power,
                                              min_lr_ratio=sc.min_lr_ratio, replay_ratio=space.replay_ratios[0])
        except lawguide.UnidentifiedDecay as e:  # the stopper and the refits still use the law
            log.warning("sweep %s: %s; the first trials are Optuna's own", sc.name, e)
            points = []
    except (ValueError, KeyError, ArithmeticError, RuntimeError, np.linalg.LinAlgError) as e:
        log.warning("sweep %s: the law could not be fitted on %s's curves (%s); running plain TPE "
                    "(set train.eval_every so the main path records more points)", sc.name, plan.version, e)
        return None
    stopper = None
    if sc.stop_margin > 0:
        stopper = lawguide.LawStopper(guide, margin=sc.stop_margin, min_progress=sc.stop_min_progress,
                                      record_path=SweepPath(plan.sweep_dir, STOPPED_JSON))
    callback = lawguide.LawRefitCallback(guide, curve_path=functools.partial(plan.curve_path,
                                                                              sweep_dir=SweepPath(plan.sweep_dir)),
                                         name=plan.segment_name, stopper=stopper)
    fits = {split: {"law": f.law, "r2": f.r2, "mape": f.mape, "degenerate": f.degenerate}
            for split, f in guide.fits.items()}
    log.info("sweep %s: law fitted (%s); first trials: %s", sc.name,
             ", ".join(f"{k} R^2 {v['r2']:.3f}" for k, v in fits.items()), points)
    return Guidance(points, stopper, callback, fits)


def _make_tuner(plan: SweepPlan, sc: SweepConfig, space: SearchSpace, max_concurrent: int, sweep_dir: Path,
                guidance: Guidance | None, restore: bool):
    """The sweep's Tune experiment: a new one (Optuna on the sweep's journal,
    :class:`raypath.study.SweepSearch`), or the interrupted one restored."""
    import optuna
    from ray import tune

    from raypath.study import RetryingLimiter, SweepSearch

    trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), TRIAL_RESOURCES)
    if restore:
        # The restored experiment keeps its searcher, stopper and callbacks as pickled at the start
        # (tuner.pkl): the law's refit callback hands them the trials that finished since, and their
        # paths follow the sweep directory (SweepPath).
        log.info("resuming sweep %s (finished trials are kept, unfinished ones continue)", sweep_dir)
        try:
            return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                      resume_errored=True)
        except (AttributeError, ImportError) as e:  # a pickled raypath class moved or renamed since
            raise RunFileError(f"{sweep_dir / 'tuner.pkl'}: sweep {sweep_dir.name!r} was started by an older raypath "
                               f"whose Tune state this one cannot restore ({e}); its finished trials stay release "
                               f"candidates of {sweep_dir.parent.name}: search on in a new sweep (--name)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = SweepSearch(sweep_dir, space=space, metric=METRIC, mode="min",
                           sampler=make_sampler(sc, max_concurrent), study_name=_study_name(plan, sc),
                           points_to_evaluate=guidance.points if guidance else None)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=RetryingLimiter(searcher, max_concurrent), metric=METRIC, mode="min",
                                    num_samples=sc.num_samples, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname),
        run_config=tune.RunConfig(name=sc.name, storage_path=str(sweep_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=1 if verbose() else 0,
                                  stop=guidance.stopper if guidance else None,
                                  callbacks=[*([guidance.callback] if guidance else []), _keeper(),
                                             *([_uploader(plan)] if plan.ctx.rd.mirror else [])]),
    )


def _uploader(plan: SweepPlan):
    """A Tune callback that uploads a remote run's sweep directory after every trial, so a
    driver lost mid-sweep resumes it on another machine."""
    from ray import tune

    rd, sweep_dir = plan.ctx.rd, plan.sweep_dir

    class UploadSweep(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            # what changed since the last trial (:meth:`raypath.mirror.Mirror.push`); the trials'
            # checkpoints and exports are in the bucket already, written there by their workers
            rd.publish(sweep_dir, exclude=SWEEP_REMOTE_ONLY)

    return UploadSweep()


def _trial_record(plan: SweepPlan, result, stopped: dict, pruned: dict) -> dict:
    """One trial as the sweep records it: ``done`` (branch finished; ``pruned`` when its weights
    were deleted), ``stopped`` (by the law stopper: its forecast and last objective),
    ``incomplete`` (interrupted) or ``error``."""
    metrics = result.metrics or {}
    config = dict(result.config or {})
    trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
    record = {
        "trial_id": trial_id,
        "name": plan.segment_name(trial_id),
        "config": config,
        "trial_dir": result.path,
        "status": "error" if result.error else "done",
        "error": str(result.error).splitlines()[0][:300] if result.error else None,
    }
    if result.error:
        return record
    if not config:  # Tune holds a config only from a trial's first report: interrupted before it
        return {**record, "status": "incomplete", "error": "interrupted before its first report"}
    if trial_id in pruned:
        return {**record, **pruned[trial_id]["record"]}
    seg = plan.segment(trial_id, config)
    try:
        record.update(_finished_fields(plan, seg))
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        if trial_id in stopped:
            return {**record, "status": "stopped", "stopped": stopped[trial_id],
                    "objective_at_stop": metrics.get("objective"), "curve": seg.curves_path,
                    "branch_tokens": (int(metrics["step"]) - seg.start_step) * plan.tokens_per_step
                    if "step" in metrics else None}
        return {**record, "status": "incomplete", "error": str(e)}
    return record


def _finished_fields(plan: SweepPlan, seg) -> dict:
    """What a finished trial's record holds of its branch, read from its final checkpoint."""
    from raypath.branches import summarize

    entry = summarize(seg)
    objective = ckpt.load_state(entry.checkpoint, seg.rd)["metrics"].get("objective")
    return dict(
        branch=entry.to_dict(),
        metrics=entry.metrics,
        objective=objective,
        test_objective=Objective(plan.weights).value(entry.metrics, "test"),  # reported, never selected on
        penalty=plan.penalty(entry.tokens_trained),
        score=None if objective is None else objective + plan.penalty(entry.tokens_trained),
        branch_tokens=entry.tokens_trained,
        curve=seg.curves_path,
        export=seg.export_dir if _exported(seg) else None,  # None: beaten, it was never exported
    )


def _candidate(plan: SweepPlan, trial: dict) -> Candidate:
    branch = Branch.from_dict({**trial["branch"], "sweep": plan.sweep_dir, "trial_id": trial["trial_id"],
                               "objective": trial["objective"], "score": trial["score"]})
    return Candidate(trial["name"], plan.version, f"sweep {Path(plan.sweep_dir).name}", trial["metrics"],
                     trial["export"], trial["branch_tokens"], trial["trial_id"], plan.sweep_dir, branch)


def _release(plan: SweepPlan, lineage, trials: list[dict], pin: str | None) -> dict:
    """The version's release decision over every measured branch, this sweep's trials included
    (or the pinned trial); returns what the sweep records: the decision and the live release."""
    objective = Objective(plan.weights, plan.compute_penalty, plan.version_tokens)
    mine = [_candidate(plan, t) for t in trials if t["status"] == "done" and t.get("score") is not None
            and t.get("export")]  # a pruned or never exported trial has no model to release
    if pin:
        pin = _pick(trials, pin)[0]["trial_id"]
    settled = Releaser(lineage, plan.ctx.tracking).settle(
        plan.version, objective, extra=mine, pin=pin)
    trial_of = {c.name: c.trial_id for c in mine}
    return {"released": trial_of.get(settled.live.branch) if settled.live else None, **settled.record()}


def _pick(trials: list[dict], pin: str | None) -> tuple[dict | None, bool]:
    done = [t for t in trials if t["status"] == "done" and t.get("score") is not None and math.isfinite(t["score"])]
    if pin:
        chosen = next((t for t in trials if pin in (t["trial_id"], t["name"])), None)
        if chosen is None or chosen["status"] != "done":
            known = ", ".join(t["trial_id"] for t in done) or "none"
            raise ConfigError(f"sweep.pin: {pin!r} is not a finished trial of this sweep (finished: {known})")
        return chosen, True
    return (min(done, key=lambda t: t["score"]) if done else None), False


def run_sweep(cfg: Config, version: str | int) -> dict:
    """Run (or resume) the branch search ``cfg.sweep`` of ``version``; release its best trial.

    Returns the sweep record that is also written to ``results.json`` and to the
    lineage's ``sweeps``: settings, the law's guidance, one record per trial (config,
    final metrics, objective, score), the best trial and the released one.
    """
    from raypath.cluster import check_workers_fit, init_ray
    from raypath.run import prepared

    # What can be checked without Ray: the version is trained.
    try:
        lineage = Lineage.load(RunDir.open(cfg.run_dir, cfg.cluster.local_dir, cfg.cluster.storage_endpoint))
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; a sweep searches a branch of a trained version: run `raypath run` first") from None
    _, vname, _ = _trained_main(lineage, lineage.version_names(), version)
    with writer_lock(lineage.rd, f"sweep {vname} {cfg.sweep.name}", f"sweeps/{vname}/{cfg.sweep.name}"):
        ctx = prepared(cfg, lineage.rd, lineage.fact("model").get("base"))
        check_workers_fit(cfg.train, init_ray(cfg.cluster.address, cfg.cluster.num_cpus))
        with lineage_run(ctx.tracking, owner=False):
            return _sweep(cfg, ctx, version)



def _sweep(cfg: Config, ctx, version: str | int) -> dict:
    """:func:`run_sweep` on its prepared run context (``raypath.run.RunContext``)."""
    sc = cfg.sweep
    lineage = Lineage.load(ctx.rd)
    check_fixed_settings(cfg.to_dict(), lineage.config, "branches must fork with the main path's")
    plan = _plan(ctx, lineage, version, sc)
    space = _search_space(plan, sc)
    # Tune's state of an interrupted sweep of a remote run, to resume it here
    ctx.rd.pull_files(plan.sweep_dir, exclude=SWEEP_REMOTE_ONLY)
    _check_pin(plan, sc.pin, lineage)
    record = _open_record(plan, sc, space)
    try:
        results, resumed, interrupted = _run_experiment(plan, sc, space, record)
    finally:
        ctx.rd.publish(plan.sweep_dir, exclude=SWEEP_REMOTE_ONLY)
    stopped = _stopped(plan)
    trials = _trial_records(plan, results, stopped)
    _drop_stopped_checkpoints(plan, trials)
    outcome, settled = _outcome(sc, trials, stopped)
    record.update(resumed=resumed, **outcome)
    if record["best"] is not None and (settled or sc.pin) and not interrupted:
        record.update(_release(plan, lineage, trials, sc.pin))
    _keep_best_records(plan, sc, trials, record.get("released"))
    # The standing first: the lineage's summary (n_trials, best, released) ties it to this record.
    for name, content in ((STANDING_JSON, standing_record(record)), (RESULTS_JSON, record)):
        write_json(Path(plan.sweep_dir) / name, content, root=sweep_run_dir(plan.sweep_dir))
        ctx.rd.publish(Path(plan.sweep_dir) / name)
    lineage.record_sweep(record)
    if interrupted:  # recorded as far as it went; the command ends as interrupted (exit 130)
        raise KeyboardInterrupt
    return record


def _check_pin(plan: SweepPlan, pin: str | None, lineage: Lineage) -> None:
    """Refuse a pin that names no trial the sweep has started, before it trains: the pin is read
    only once every trial has finished, and a new sweep's trial ids are not known before it runs.
    Refuse one whose weights the sweep deleted, unless it was released before (its model is there)."""
    if not pin:
        return
    sweep_dir = Path(plan.sweep_dir)
    trials = sorted(d.name.removeprefix("trial_") for d in sweep_dir.glob("trial_*") if d.is_dir())
    pin = _pin_id(plan, pin)
    released = {b.name for b in lineage.branches(plan.version)}
    if pin in pruned_trials(plan) and plan.segment_name(pin) not in released:
        raise ConfigError(f"sweep.pin (--pin): trial {pin} of sweep {sweep_dir.name!r} kept no weights to release: "
                          f"the sweep deleted them, keeping only its best trials' (sweep.keep_trials)")
    if pin in trials:
        return
    has = f"its trials: {', '.join(trials)}" if trials else "it has no trials yet"
    raise ConfigError(f"sweep.pin (--pin): {pin!r} is not a trial of sweep {sweep_dir.name!r} of {plan.version} "
                      f"({has}); `raypath release RUN_DIR --version {plan.version} --pick TRIAL` releases a trial "
                      f"of any sweep")


def _pin_id(plan: SweepPlan, pin: str | None) -> str | None:
    """The trial id ``sweep.pin`` names (a trial id or its branch name)."""
    return pin and pin.removeprefix(plan.segment_name(""))


def _trained_main(lineage: Lineage, names: list[str], version: str | int) -> tuple[int, str, Any]:
    """(index, name, main-path entry) of ``version`` among the run's ``names``; raises unless trained."""
    k = resolve_version(names, version)
    main = lineage.main(names[k])
    if main is None:
        raise ConfigError(f"--version {names[k]}: its main path is not trained yet; run `raypath run` first")
    return k, names[k], main


def _plan(ctx, lineage, version: str | int, sc: SweepConfig) -> SweepPlan:
    """The sweep of ``version``: its main-path segment, objective and directory."""
    k, vname, main = _trained_main(lineage, [v["name"] for v in ctx.versions], version)
    weights = objective_weights([v["name"] for v in ctx.versions], k, sc.weights)
    sweep_dir = ctx.run_dir / "sweeps" / vname / sc.name
    return SweepPlan(ctx, k, main, str(sweep_dir), weights, sc.compute_penalty,
                     main.tokens)


def _search_space(plan: SweepPlan, sc: SweepConfig) -> SearchSpace:
    """What Optuna searches: the settings' ranges, snapped to the fork points that exist."""
    replay = sc.replay_ratios or [plan.stream_ratio]
    if plan.k == 0 and any(r > 0 for r in replay):
        raise ConfigError(f"sweep.replay_ratios: {replay}, but {plan.version} is the first version: "
                          f"there is no older data to replay")
    forks = fork_points(plan.main, plan.ctx.storage(plan.main.segment), plan.ctx.rd)
    in_range = choose_forks(forks, plan.main, sc, plan.tokens_per_step, plan.version)
    return SearchSpace(sc.fraction, list(sc.shapes), sc.power, sc.min_lr_ratio, replay, in_range,
                       plan.main.end_step, plan.tokens_per_step)


def _open_record(plan: SweepPlan, sc: SweepConfig, space: SearchSpace) -> dict:
    """The sweep's record: written to ``sweep.json`` for a new sweep, checked against it for a
    resumed one (which keeps its recorded concurrency and searcher)."""
    import ray

    from raypath.study import JOURNAL

    main, sweep_dir = plan.main, Path(plan.sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    max_concurrent = sc.max_concurrent or derive_max_concurrent(plan.ctx.cfg.train, sc.num_samples,
                                                                ray.cluster_resources())
    record = {
        "name": sc.name, "version": plan.version, "version_index": plan.k, "path": str(sweep_dir),
        "run_dir": str(plan.ctx.run_dir), "main_segment": main.segment, "main_curve": main.curve,
        "main_start_step": main.start_step, "main_end_step": main.end_step,
        "tokens_start": main.tokens_start, "version_tokens": plan.version_tokens,
        "tokens_per_step": plan.tokens_per_step, "segment_prefix": f"branch-{plan.version}-",
        "settings": _settings_record(sc), "objective_weights": plan.weights,
        "fork_points": [{"step": f["step"], "fraction": f["fraction"]} for f in space.forks],
        "max_concurrent": max_concurrent,
        "searcher": {"kind": "optuna", "sampler": "TPESampler", "seed": sc.seed, "metric": METRIC, "mode": "min",
                     "study_name": _study_name(plan, sc), "storage": JOURNAL},
    }
    recorded = _start_or_check_record(sweep_dir, record)
    record["max_concurrent"] = recorded.get("max_concurrent", max_concurrent)
    record["searcher"] = recorded.get("searcher", record["searcher"])
    record["guide"] = recorded.get("guide", {"kind": "none"})
    log.info("sweep %s of %s: %d trials, %d at once, objective weights %s, compute penalty %g%s", sc.name,
             plan.version, sc.num_samples, record["max_concurrent"], plan.weights, sc.compute_penalty,
             f", token budget {sc.token_budget:g}" if sc.token_budget else "")
    return record


def _study_name(plan: SweepPlan, sc: SweepConfig) -> str:
    return f"{plan.version}-{sc.name}"


def _run_experiment(plan: SweepPlan, sc: SweepConfig, space: SearchSpace, record: dict):
    """Run a new sweep's Tune experiment (guided by the law when it fits: ``record["guide"]``)
    or resume an interrupted one; Tune's results, whether it was resumed, and whether Ctrl-C ended it."""
    from raypath import study

    sweep_dir = Path(plan.sweep_dir)
    restoring = _can_restore(sweep_dir)
    guidance = None
    if not restoring:
        study.discard(sweep_dir)
        # the stops of an attempt Tune kept nothing of: the stopper merges its own into the file
        (sweep_dir / STOPPED_JSON).unlink(missing_ok=True)
        guidance = law_guidance(plan, sc, space) if sc.guide == "law" else None
    # written by this run's keeper, for its keep_trials and pin (either may have changed)
    plan.ctx.rd.remove(sweep_dir / KEPT_JSON)
    if guidance is not None:
        record["guide"] = {"kind": "law", "points": guidance.points, "fits": guidance.fits,
                           "stop_margin": sc.stop_margin, "stop_min_progress": sc.stop_min_progress}
        root = sweep_run_dir(sweep_dir)
        write_json(sweep_dir / SWEEP_JSON, {**read_sweep_record(sweep_dir / SWEEP_JSON), "guide": record["guide"]},
                   root=root)
    tuner = _make_tuner(plan, sc, space, record["max_concurrent"], sweep_dir, guidance, restoring)
    running = _RUNNING.set((plan, sc))
    try:
        with study.resuming(sweep_dir):
            results, interrupted = fit_noting_ctrl_c(tuner)
    finally:
        _RUNNING.reset(running)
    return results, restoring, interrupted


def fit_noting_ctrl_c(tuner) -> tuple[Any, bool]:
    """``tuner.fit()``'s results, and whether Ctrl-C ended it.

    Tune takes the first SIGINT itself: it saves the experiment and returns as if the sweep were
    over (the sweep then exited 0), and only then puts back the handler it replaced, which after
    a whole run it leaves in place (a later Ctrl-C would be swallowed): the handler tells which
    happened, and the caller's is put back either way."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return tuner.fit(), False
    before = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    interrupted = signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, before)
    return results, interrupted


def _trial_records(plan: SweepPlan, results, stopped: dict) -> list[dict]:
    """Every trial as the sweep records it, in trial id order, with the order Optuna proposed it."""
    pruned = pruned_trials(plan)
    trials = sorted((_trial_record(plan, r, stopped, pruned) for r in results), key=lambda t: t["trial_id"])
    order = proposal_order(plan.sweep_dir, trials)
    for t in trials:
        t["order"] = order.get(t["trial_id"])
    return trials


def _drop_stopped_checkpoints(plan: SweepPlan, trials: list[dict]) -> None:
    """Delete the checkpoints of the trials the law stopped: such a trial never resumes (the sweep
    counts it as ended) and has no final checkpoint to release; its curve stays (the law fits it).
    A finished trial keeps its final checkpoint only (:class:`raypath.loop._Checkpoints`)."""
    for t in trials:
        storage = Path(plan.sweep_dir) / "branches" / t["name"]
        if t["status"] == "stopped" and ckpt.step_dirs(storage, plan.ctx.rd):
            log.info("trial %s was stopped by the law: deleting its checkpoints %s", t["trial_id"],
                     plan.ctx.rd.name(storage))
            plan.ctx.rd.remove(storage)


# --------------------------------------------------------------------------- what a sweep keeps

def pruned_trials(plan: SweepPlan) -> dict:
    """The trials whose weights ``sweep.keep_trials`` deleted (:data:`raypath.mirror.PRUNED_JSON`):
    trial id -> its ``record`` (what its final checkpoint gave the sweep's record) and ``report``
    (its final Tune result), so that a re-run records it as it was and a restored Tune never
    trains it again. Read where it is kept (a trial may run on another node than the driver)."""
    path = Path(plan.sweep_dir) / PRUNED_JSON
    try:
        return absolute_paths(plan.ctx.rd.read_json(path), sweep_run_dir(plan.sweep_dir))
    except FileNotFoundError:
        return {}


def _keeper():
    """A Tune callback that, as trials finish, deletes the weights of those beyond the best
    ``sweep.keep_trials`` (:func:`keep_best`), records the best ones' scores for the trials still
    running (:func:`_write_kept`) and deletes the checkpoints of trials the law stopped whose
    Train run has ended.

    Tune restores it as pickled when the sweep started, its class by value: its methods hand
    everything to this module's functions (pickled by reference: a restored sweep runs this
    raypath's code), which work on the sweep this driver runs now (:data:`_RUNNING`: its run
    directory may have moved, its ``keep_trials`` changed)."""
    from ray import tune

    class KeepBest(tune.Callback):
        def __init__(self):
            self.dropped: set[str] = set()  # stopped trials whose checkpoints went

        def on_trial_complete(self, iteration, trials, trial, **info):
            _trial_completed(self.dropped, trials, trial)

    return KeepBest()


def _trial_completed(dropped: set[str], trials: list, trial) -> None:
    """What :func:`_keeper` does as ``trial`` completes; ``dropped``: the stopped trials whose
    checkpoints it deleted before (updated)."""
    from ray.tune.experiment import Trial

    running = _running()
    if running is None:
        return
    plan, sc = running
    finished = [(t.trial_id, dict(t.config), float(t.last_result["score"])) for t in trials
                if (t.last_result or {}).get("final") and _finite(t.last_result.get("score"))]
    keep_best(plan, sc, finished)
    _write_kept(plan, sc, finished)
    stopped = _stopped(plan)
    # a stopped trial's Train workers may still write while Tune stops its actor: only once it is gone
    ended = [{"trial_id": t.trial_id, "name": plan.segment_name(t.trial_id), "status": "stopped"}
             for t in trials if t.trial_id in stopped and t.trial_id not in dropped and t is not trial
             and t.status == Trial.TERMINATED and t.temporary_state.ray_actor is None]
    _drop_stopped_checkpoints(plan, ended)
    dropped.update(t["trial_id"] for t in ended)


def _running() -> tuple[SweepPlan, SweepConfig] | None:
    return _RUNNING.get()  # a module function: cloudpickle pickles a ContextVar in the callback's globals by value


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def keep_best(plan: SweepPlan, sc: SweepConfig, finished: list[tuple[str, dict, float]],
              protect: tuple[str | None, ...] = (), unexported: frozenset[str] = frozenset()) -> list[str]:
    """Delete the final checkpoint and export of every finished trial ``(trial id, config, score)``
    but the best ``sc.keep_trials`` (ties: the lower id), ``sc.pin`` and ``protect``, and of every
    ``unexported`` one (it has no model to release); returns the trials pruned now. Each is first
    recorded in :data:`PRUNED_JSON` (written and uploaded before anything is deleted), so a crash
    in between leaves a trial recorded, never one lost."""
    if not sc.keep_trials and not unexported:
        return []
    pruned = pruned_trials(plan)
    keep = {_pin_id(plan, sc.pin), *protect}
    ranked = sorted(finished, key=lambda t: (t[2], t[0]))
    now = []
    for rank, (trial_id, config, score) in enumerate(ranked, 1):
        kept = not sc.keep_trials or rank <= sc.keep_trials or trial_id in keep
        if trial_id in pruned or (kept and trial_id not in unexported):
            continue
        seg = plan.segment(trial_id, config)
        pruned[trial_id] = {"report": _final_report(plan, seg, config),
                            "record": {**_finished_fields(plan, seg), "export": None, "pruned": True}}
        now.append((trial_id, seg, rank, score))
    if not now:
        return []
    path = Path(plan.sweep_dir) / PRUNED_JSON
    write_json(path, pruned, root=sweep_run_dir(plan.sweep_dir))
    plan.ctx.rd.publish(path)
    for trial_id, seg, rank, score in now:
        log.info("sweep %s: trial %s is number %d by score (%.4f): deleting its weights, the sweep keeps the best "
                 "%d trials' (sweep.keep_trials)%s", sc.name, trial_id, rank, score, sc.keep_trials,
                 "; it exported no model" if trial_id in unexported else "")
        plan.ctx.rd.remove(seg.storage)
        plan.ctx.rd.remove(seg.export_dir)
    return [t[0] for t in now]


def _keep_best_records(plan: SweepPlan, sc: SweepConfig, trials: list[dict], released: str | None) -> None:
    """:func:`keep_best` over the sweep's records at its end (trials a restored sweep finished before,
    a ``keep_trials`` lowered since, one that ended beaten but was not pruned before the driver
    stopped), the released trial kept too; marks the records pruned."""
    done = [t for t in trials if t["status"] == "done" and not t.get("pruned") and _finite(t.get("score"))]
    finished = [(t["trial_id"], t["config"], t["score"]) for t in done]
    unexported = frozenset(t["trial_id"] for t in done if not t.get("export"))
    if keep_best(plan, sc, finished, protect=(released,), unexported=unexported):
        pruned = pruned_trials(plan)
        for t in trials:
            if t["trial_id"] in pruned:
                t.update(pruned[t["trial_id"]]["record"])


def _write_kept(plan: SweepPlan, sc: SweepConfig, finished: list[tuple[str, dict, float]]) -> None:
    """Record the best ``sc.keep_trials`` finished trials' scores for the trials still running
    (:func:`beaten`), once there are that many; uploaded for the workers of a bucket run."""
    best = sorted((score, trial_id) for trial_id, _, score in finished)[: sc.keep_trials]
    if not sc.keep_trials or len(best) < sc.keep_trials:
        return
    path = Path(plan.sweep_dir) / KEPT_JSON
    write_json(path, {"keep_trials": sc.keep_trials, "pin": _pin_id(plan, sc.pin), "best": [list(b) for b in best]})
    plan.ctx.rd.publish(path)


def _stopped(plan: SweepPlan) -> dict:
    """Trial id -> the law stopper's forecast, for the trials it stopped."""
    path = Path(plan.sweep_dir) / STOPPED_JSON
    return read_json(path) if path.is_file() else {}


def _outcome(sc: SweepConfig, trials: list[dict], stopped: dict) -> tuple[dict, bool]:
    """What the sweep's trials add up to (the record's fields), and whether it is settled: every
    trial ran to an end (its last step, or stopped by the law). Errored trials do not block the
    release (the best finished trial wins); a re-run retries them."""
    counts = {status: sum(t["status"] == status for t in trials) for status in ("done", "stopped", "error")}
    errored = [t["trial_id"] for t in trials if t["status"] == "error"]
    settled = len(trials) == sc.num_samples and sum(counts.values()) == len(trials)
    best, _ = _pick(trials, None)
    if not settled:
        log.warning("sweep %s was interrupted: %d of %d trials finished; run the same command again to "
                    "resume it (finished trials are kept)", sc.name, counts["done"] + counts["stopped"],
                    sc.num_samples)
    elif errored:
        log.warning("sweep %s: trials %s failed (see their errors in %s); releasing the best of the %d that "
                    "finished; run the same command again to retry them", sc.name, ", ".join(errored),
                    RESULTS_JSON, counts["done"])
    return {"trials": trials, "complete": counts["done"] + counts["stopped"] == sc.num_samples,
            "search_tokens": sum(t.get("branch_tokens") or 0 for t in trials if t["status"] in ("done", "stopped")),
            "best": best["trial_id"] if best else None, "errored": errored, "stopped": sorted(stopped),
            "released": None, "pinned": False}, settled


def run_and_print(cfg: Config, version: str | int) -> int:
    """``raypath sweep`` and ``jobs/sweep.py``: run the sweep, print its trials and release;
    exit code 0 when every trial settled, 1 when it must be resumed."""
    record = run_sweep(cfg, version)
    print(format_trials(record), flush=True)
    # in a bucket: the URI a notebook's raypath.analysis takes, not this machine's mirror of it
    rd = RunDir(*run_location(cfg.run_dir, cfg.cluster.local_dir, cfg.cluster.storage_endpoint))
    print(f"sweep: {rd.name(record['path'])}")
    if record.get("decision"):
        print(f"release decision: {record['decision']}")
    if record.get("release"):
        source = f"trial {record['released']}" if record.get("released") else "not from this sweep"
        print(f"live release: {record['release']} ({record['live_release']}, {source})")
    return 0 if record["complete"] else 1


def _can_restore(sweep_dir: Path) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(str(sweep_dir))


# --------------------------------------------------------------------------- presentation

def format_trials(record: dict) -> str:
    """The sweep's trials, best first, as aligned text for the terminal."""
    import pandas as pd

    from raypath.report import si

    def num(x: Any, fmt: str = "{:.4f}") -> str:
        return "-" if x is None else fmt.format(x)

    rows = []
    for t in sorted(record["trials"], key=lambda t: (t.get("score") is None, t.get("score") or 0.0)):
        c = t.get("config", {})
        mark = ("*" if t["trial_id"] == record.get("released") else "") + \
               ("b" if t["trial_id"] == record.get("best") else "")
        rows.append([mark, t["trial_id"], c.get("shape", "-"), num(c.get("power"), "{:.2f}"),
                     num(c.get("min_lr_ratio"), "{:.3f}"), num(c.get("fraction"), "{:.3f}"),
                     num(c.get("fraction_actual"), "{:.3f}"), si(t.get("branch_tokens")),
                     num(t.get("objective")), num(t.get("test_objective")), num(t.get("score")), t["status"]])
    head = (f"sweep {record['name']} of {record['version']} ({len(record['trials'])} trials; "
            f"b = best, * = released{', pinned' if record.get('pinned') else ''})")
    table = pd.DataFrame(rows, columns=["", "trial", "shape", "power", "min_lr", "frac", "frac@fork", "tokens",
                                        "objective", "test", "score", "status"]).to_string(index=False)
    return f"{head}\n{table}"


def proposal_order(sweep_dir: str | os.PathLike, trials: list[dict]) -> dict[str, int]:
    """Trial id -> 1-based order in which Optuna proposed it (Tune's trial ids carry none),
    matched on the proposed parameters; {} when the sweep has no Optuna journal."""
    from raypath.study import NoJournalError

    try:
        study = optuna_study(sweep_dir)
    except NoJournalError as e:
        log.warning("%s; the trials' proposal order is not recorded", e)
        return {}
    proposed = [(s.number, s.params) for s in study.get_trials(deepcopy=False) if s.params]  # read once
    order = {}
    for t in trials:
        config = t.get("config") or {}
        match = [n for n, params in proposed if all(config.get(k) == v for k, v in params.items())]
        if match:
            order[t["trial_id"]] = min(match) + 1
    return order


def optuna_study(sweep_dir: str | os.PathLike):
    """The Optuna study behind a sweep, loaded from its journal (``optuna.journal``) for Optuna's
    own tools; a sweep written before the journal raises :class:`raypath.study.NoJournalError`."""
    from raypath.study import load_study

    return load_study(sweep_dir)
