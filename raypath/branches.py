"""Release branches: fork the main path, decay the LR, evaluate, export.

Branch k starts from the main-path checkpoint taken before the last
``fraction`` of version k's stream and re-trains exactly those rows with a
decaying LR (the checkpoint carries the data position). Branches are
independent of the main path after the fork, so each runs as its own Ray Train
job inside a zero-CPU Ray task while the main path moves on to version k+1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray

from raypath import checkpoint as ckpt
from raypath.lineage import Branch as BranchEntry
from raypath.lineage import MainEntry
from raypath.schedules import Branch, Decay, main_schedule
from raypath.segment import Segment, final_checkpoint, fit_segment
from raypath.storage import relative_paths


def branch_schedule(cfg, main: MainEntry, decay: Decay, fork: int) -> Branch:
    """The LR of a branch of ``main`` (a version's main segment) forking at ``fork``: the main
    path's (``cfg``: the run's :class:`raypath.config.Config`) up to it, then ``decay`` to its end."""
    return Branch(main_schedule(cfg.train), fork, main.end_step - fork, decay)


def branch_segment(ctx, k: int, main: MainEntry, decay: Decay, fork: int, name: str | None = None,
                   export_dir: str | None = None) -> Segment:
    version = ctx.versions[k]
    name = name or f"branch-{version['name']}"
    steps = main.end_step - fork
    fork_ckpt = str(Path(ctx.storage(main.segment)) / ckpt.step_dir_name(fork))
    return Segment(
        **ctx.segment_fields(name),
        kind="branch",
        version=version["name"],
        stream_path=version["stream_path"],
        start_step=fork,
        end_step=main.end_step,
        schedule=branch_schedule(ctx.cfg, main, decay, fork),
        init_checkpoint=fork_ckpt,
        **ctx.eval_fields(k),
        stream_limit=(main.end_step - main.start_step) * ctx.cfg.train.global_batch_size,
        export_dir=export_dir,
        tokenizer_dir=ctx.tokenizer_dir,
        model_card=relative_paths({  # a card travels with the model: no path of this machine
            "run": ctx.cfg.name, "version": version["name"], "branch": name,
            "forked_from": fork_ckpt, "fork_step": fork, "branch_steps": steps,
            "decay": dataclasses.asdict(decay), "max_lr": ctx.cfg.train.max_lr,
            "trained_on_versions": [v["name"] for v in ctx.versions[: k + 1]],
            "seq_len": ctx.cfg.data.seq_len,
        }, ctx.run_dir),
    )


def release_branch(ctx, k: int, main: dict) -> Segment:
    """The configured release branch of version k (exports to ``exports/branch-vK``; the
    release decision, :mod:`raypath.releases`, copies the winner to ``releases/vK/rN``)."""
    b = ctx.cfg.branch
    name = f"branch-{ctx.versions[k]['name']}"
    return branch_segment(ctx, k, main, b.decay(), main.fork_step, name=name,
                          export_dir=str(ctx.run_dir / "exports" / name))


def summarize(seg: Segment) -> BranchEntry:
    """Lineage entry of a finished branch, read back from its final checkpoint."""
    final = final_checkpoint(seg)
    return BranchEntry(
        name=seg.name, version=seg.version, fork_step=seg.start_step, end_step=seg.end_step,
        steps=seg.end_step - seg.start_step, decay=dataclasses.asdict(seg.schedule.decay),
        forked_from=seg.init_checkpoint, checkpoint=final.path, curve=seg.curves_path,
        metrics={k: v for k, v in final.metrics.items() if k.startswith(("val/", "test/")) or k == "loss"},
        tokens_trained=final.tokens_trained, tokens_total=final.tokens_end, export=seg.export_dir,
        extra={"release": seg.export_dir},  # older readers' name for the export
    )


@ray.remote(num_cpus=0)
def _fit_remote(seg: Segment) -> BranchEntry:
    # Zero CPUs: the task only waits on its Train workers; holding a CPU here
    # would starve those workers on small machines.
    fit_segment(seg)
    return summarize(seg)


class BranchRunner:
    """Runs branches in the background (``parallel``) or inline, in submission order."""

    def __init__(self, parallel: bool):
        self.parallel = parallel
        self.pending: dict[ray.ObjectRef, Segment] = {}
        self.inline_done: list[BranchEntry] = []

    def submit(self, seg: Segment) -> None:
        if self.parallel:
            self.pending[_fit_remote.remote(seg)] = seg
        else:
            fit_segment(seg)
            self.inline_done.append(summarize(seg))

    def finished(self, wait: bool = False) -> list[BranchEntry]:
        """Entries of branches that finished since the last call."""
        done, self.inline_done = self.inline_done, []
        refs = list(self.pending)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
            for ref in ready:
                self.pending.pop(ref)
                done.append(ray.get(ref))
        return done
