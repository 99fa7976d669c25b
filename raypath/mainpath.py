"""The main path: warmup once, then constant max LR, one segment per version.

Version k's segment starts from version k-1's boundary checkpoint and trains
every row of version k's stream once. It checkpoints at the fork point of k's
release branch (before the last ``branch.fraction`` of the stream) and at the
version boundary, which is where version k+1 (and any later update) continues.
"""

from __future__ import annotations

from pathlib import Path

from raypath import checkpoint as ckpt
from raypath.lineage import MainEntry
from raypath.schedules import main_schedule
from raypath.segment import Segment, final_checkpoint, fit_segment


def fork_step(start_step: int, end_step: int, fraction: float) -> int:
    """First step of a branch re-training the last ``fraction`` of a version (>= 1 step)."""
    steps = end_step - start_step
    return end_step - min(max(1, round(fraction * steps)), steps)


def main_fork_step(start_step: int, end_step: int, fraction: float) -> int:
    """The fork point a main segment checkpoints: after its own first step, since its start is
    the previous segment's checkpoint (a version trains >= 2 steps: ``min_blocks``)."""
    return max(fork_step(start_step, end_step, fraction), start_step + 1)


def main_steps(cfg, start_step: int, stream_rows: int) -> tuple[int, tuple[int, int]]:
    """A version's main segment from ``start_step`` on its ``stream_rows`` (``cfg``: the run's
    :class:`raypath.config.Config`): its end step and the steps it must save (fork point, end)."""
    end_step = start_step + stream_rows // cfg.train.global_batch_size
    return end_step, (main_fork_step(start_step, end_step, cfg.branch.fraction), end_step)


def main_segment(ctx, k: int, prev: MainEntry | None) -> Segment:
    version = ctx.versions[k]
    start_step = prev.end_step if prev else 0
    end_step, save_steps = main_steps(ctx.cfg, start_step, version["stream_rows"])
    steps = end_step - start_step
    name = f"main-{version['name']}"
    return Segment(
        **ctx.segment_fields(name),
        kind="main",
        version=version["name"],
        stream_path=version["stream_path"],
        start_step=start_step,
        end_step=end_step,
        schedule=main_schedule(ctx.cfg.train),
        init_checkpoint=prev.checkpoints["end"] if prev else None,
        save_steps=save_steps,
        **ctx.eval_fields(k),
        stream_limit=steps * ctx.cfg.train.global_batch_size,
    )


def run_main_version(ctx, k: int, prev: MainEntry | None) -> MainEntry:
    """Train (or resume) version k's main segment; return its lineage entry."""
    seg = main_segment(ctx, k, prev)
    fit_segment(seg)
    fork = main_fork_step(seg.start_step, seg.end_step, ctx.cfg.branch.fraction)
    fork_path = str(Path(seg.storage) / ckpt.step_dir_name(fork))
    ckpt.verify(fork_path, ctx.rd, deep=False)  # complete; the branch that forks from it hashes what it loads
    end = final_checkpoint(seg)
    return MainEntry(
        version=seg.version, segment=seg.name, start_step=seg.start_step, end_step=seg.end_step,
        fork_step=fork, fork_fraction=ctx.cfg.branch.fraction,
        tokens_start=end.tokens_start, tokens_end=end.tokens_end,
        max_lr=ctx.cfg.train.max_lr, warmup_steps=ctx.cfg.train.warmup_steps,
        checkpoints={"fork": fork_path, "end": end.path}, curve=seg.curves_path, metrics=end.metrics,
    )
