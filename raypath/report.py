"""Human-facing views of a run: tables for the terminal and a lineage plot.

Everything here reads the lineage record (``lineage.json``) and the per-segment
loss curves (``curves/<segment>.jsonl``) and nothing else, so it works on a run
that is still going, on one that crashed half way, and on a copied run
directory (recorded absolute paths may point elsewhere: curves are looked up
under the run directory first).

The ``raypath law`` views -- the fitted laws as text (:func:`format_fits`) and a predicted
branch against the observed curves (:func:`plot_prediction`) -- read the fits of
:mod:`raypath.lawfit` next to the same records.

The releases table answers the product question: how good is each released
version compared with the never-annealed main path at the same boundary, and
what has the whole lineage cost so far relative to pre-training from scratch
(PTFS) at every release.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from raypath.cost import lineage_costs
from raypath.lineage import Branch, Lineage, MainEntry, Release
from raypath.storage import atomic_write_bytes, new_figure, read_jsonl, save_figure

if TYPE_CHECKING:
    from raypath.law import FitResult
    from raypath.mirror import RunDir

REPORT_DIR = "report"
#: Plot size in inches and resolution: 1320 x 900 pixels, readable when embedded in a README.
FIGSIZE = (11.0, 7.5)
DPI = 120
CURVES_DIR = "curves"
_MISSING = "-"


# --------------------------------------------------------------------------- curves

def read_curve(path: str | os.PathLike) -> pd.DataFrame:
    """One curve as a frame, one row per step, sorted.

    A resumed segment re-logs the steps after its last checkpoint, so the file
    can hold a step twice; the later record is the one the surviving run
    produced, hence ``keep="last"``. A missing file (segment not started yet)
    is an empty frame so callers need no special case.
    """
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    records = [r for r in read_jsonl(path) if "event" not in r]  # (re)start markers are not metrics
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = pd.DataFrame.from_records(records)
    df = df.drop_duplicates(subset="step", keep="last").sort_values("step", kind="stable")
    return df.reset_index(drop=True)


def find_curve(run_dir: Path | None, segment: str, recorded: str | None) -> Path:
    """Where a segment's curve is: the run directory's copy first (a record held with the
    absolute paths of where the run was keeps stale ones), a sweep trial's under the run
    directory's ``sweeps/<version>/<sweep>/curves/``, then the recorded path."""
    candidates = []
    if run_dir is not None:
        candidates.append(run_dir / CURVES_DIR / f"{segment}.jsonl")
        parts = Path(recorded).parts if recorded else ()
        if "sweeps" in parts:
            candidates.append(run_dir.joinpath(*parts[parts.index("sweeps"):]))
    if recorded:
        candidates.append(Path(recorded))
    return next((c for c in candidates if c.is_file()), candidates[0] if candidates else Path(f"{segment}.jsonl"))


def _concat_curves(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates(subset="step", keep="last").sort_values("step").reset_index(drop=True)


# --------------------------------------------------------------------------- lineage helpers

def _val_splits(entries: Iterable[dict]) -> list[str]:
    """``val/<version>`` keys in first-seen order (versions are added in order)."""
    seen: list[str] = []
    for metrics in entries:
        for key in metrics:
            if key.startswith("val/") and key not in seen:
                seen.append(key)
    return seen


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


# --------------------------------------------------------------------------- releases table

def releases_table(lineage: Lineage | dict) -> pd.DataFrame:
    """One row per released version: its losses, the main path's, and the cost so far.

    ``val/own`` is the release's loss on its own version's split and
    ``main val/own`` the main path's loss on that split at the same boundary
    (the checkpoint the branch's decay competes with); ``delta`` is release
    minus main, negative when the decay helped. ``test/own`` is the release's loss
    on the version's held-out test split, which no selection read (NaN for
    versions prepared without one). The cost ratio comes release only and with
    every branch a sweep trained.
    """
    lineage = Lineage.of(lineage)
    releases = lineage.releases()
    splits = _val_splits(r.val for r in releases)
    costs = {row["version"]: row for row in lineage_costs(lineage)}
    rows = [_release_row(r, lineage.main(r.version), costs.get(r.version, {}), splits) for r in releases]
    columns = ["version", "branch", *splits, "val/own", "main val/own", "delta", "test/own",
               "tokens_total", "tokens_cumulative", "path_switching_ratio", "with_search_ratio"]
    return pd.DataFrame(rows, columns=columns)


def _release_row(r: Release, main: MainEntry | None, cost: dict, splits: list[str]) -> dict:
    own = f"val/{r.version}"
    release_own = _nan(r.val.get(own))
    main_own = _nan(main.metrics.get(own) if main else None)
    return {
        "version": r.version,
        "branch": r.branch,
        **{s: _nan(r.val.get(s)) for s in splits},
        "val/own": release_own,
        "main val/own": main_own,
        "delta": release_own - main_own,
        "test/own": _nan((r.test or {}).get(f"test/{r.version}")),
        "tokens_total": r.tokens_total,
        "tokens_cumulative": cost.get("path_switching_cumulative"),
        "path_switching_ratio": cost.get("path_switching_ratio", float("nan")),
        "with_search_ratio": cost.get("with_search_ratio", float("nan")),
    }


# --------------------------------------------------------------------------- formatting

def si(n: Any) -> str:
    """Token counts at a glance: 52736 -> 52.7k, 1.2e6 -> 1.2M."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return _MISSING
    n = float(n)
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.1f}{suffix}"
    return f"{n:.0f}"


def _loss(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return _MISSING
    return f"{float(x):.3f}"


def _delta(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return _MISSING
    return f"{float(x):+.3f}"


def _plain(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return _MISSING
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> str:
    """Aligned plain text; ``align`` has one ``l``/``r`` per column (missing ones: ``r``, numbers)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    align = align.ljust(len(headers), "r")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _section(title: str, body: str) -> str:
    return f"{title}\n{body}"


def _release_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells shared by the text and markdown tables (ratio: 3 decimals)."""
    fmt = {"tokens_total": si, "tokens_cumulative": si, "path_switching_ratio": _loss, "with_search_ratio": _loss,
           "delta": _delta, "version": _plain, "branch": _plain}
    headers = {"tokens_total": "tokens", "tokens_cumulative": "run tokens", "path_switching_ratio": "PS/PTFS",
               "with_search_ratio": "+search"}
    cols = list(df.columns)
    cells = [[fmt.get(c, _loss)(row[c]) for c in cols] for _, row in df.iterrows()]
    return [headers.get(c, c) for c in cols], cells


def format_releases(lineage: Lineage | dict) -> str:
    """The releases table as aligned text, for the terminal after a run."""
    lineage = Lineage.of(lineage)
    title = f"releases of {lineage.name or '?'} (val losses; delta = release - main path at the boundary)"
    df = releases_table(lineage)
    if df.empty:
        return _section(title, "(no releases yet)")
    headers, cells = _release_cells(df)
    return _section(title, _text_table(headers, cells, "ll"))


def releases_markdown(lineage: Lineage | dict) -> str:
    """The releases table as a GitHub markdown table, ready to paste into a README."""
    df = releases_table(lineage)
    if df.empty:
        return "_No releases yet._\n"
    headers, cells = _release_cells(df)
    align = ["---" if i < 2 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- status

def _config_summary(cfg: dict) -> list[str]:
    """The knobs that decide what a curve means: model size, batch, LR, branch recipe."""
    m, d, t, b = (cfg.get(k, {}) or {} for k in ("model", "data", "train", "branch"))
    g = lambda sec, key: _plain(sec.get(key))  # noqa: E731 - local shorthand
    return [
        f"model: hidden {g(m, 'hidden_size')}, layers {g(m, 'num_layers')}, heads {g(m, 'num_heads')}"
        f" (kv {g(m, 'num_kv_heads')}), ffn {g(m, 'intermediate_size')}"
        + (f", from {m['path']}" if m.get("path") else ""),
        f"data: seq_len {g(d, 'seq_len')}, replay ratio {g(d, 'replay_ratio')}, val blocks {g(d, 'val_blocks')}, "
        f"dedup {g(d, 'dedup')}",
        f"train: global batch {g(t, 'global_batch_size')} (micro {g(t, 'micro_batch_size')}),"
        f" max_lr {g(t, 'max_lr')}, warmup {g(t, 'warmup_steps')} steps, workers {g(t, 'num_workers')}",
        f"branch: fraction {g(b, 'fraction')}, shape {g(b, 'shape')}, min_lr_ratio {g(b, 'min_lr_ratio')},"
        f" power {g(b, 'power')}",
    ]


def format_versions(lineage: Lineage) -> str:
    """The versions table of :func:`format_status` (what ``raypath prepare`` prints), with a note per
    version whose held-out documents an earlier version trained (``data.dedup`` found them), and
    per version with MinHash candidates the similarity check kept."""
    rows = [[v.name, _plain(v.extra.get("docs")), _plain((v.extra.get("dedup") or {}).get("dropped")),
             _plain(v.new_blocks), si(v.new_tokens), _plain(v.replay_blocks), _plain(v.val_blocks)]
            for v in lineage.versions()]
    if not rows:
        return _section("versions", "(none prepared yet)")
    dedups = [(v.name, v.extra.get("dedup") or {}) for v in lineage.versions()]
    notes = [f"{name}: {d['held_out_trained']} of its {d.get('held_out_docs', '?')} val/test documents were "
             f"trained by an earlier version: its held-out losses read better than its novelty warrants"
             for name, d in dedups if d.get("held_out_trained")]
    notes += [f"{name}: {d['near_kept']} train documents shared a MinHash band with an earlier one and were kept "
              f"(similarity below data.minhash_threshold)" for name, d in dedups if d.get("near_kept")]
    return _section("versions", "\n".join([_text_table(
        ["version", "docs", "duplicates", "new blocks", "new tokens", "replay blocks", "val blocks"], rows), *notes]))


def _checkpoint_name(main: MainEntry) -> str:
    end = (main.checkpoints or {}).get("end")
    if not end:
        return _MISSING
    p = Path(end)
    return f"{p.parent.name}/{p.name}"


def _interrupted_at(lineage: Lineage, name: str) -> int | None:
    """The step of the newest complete checkpoint of a main segment the lineage has no entry
    for: a run stopped in the middle of it, and a re-run resumes there."""
    from raypath import checkpoint as ckpt  # (torch: only for a run with a pending version)

    if lineage.run_dir is None:
        return None
    for d in reversed(ckpt.step_dirs(lineage.run_dir / "ray" / f"main-{name}", lineage.rd)):
        try:
            ckpt.verify(d, lineage.rd, deep=False)
            return ckpt.step_of(d)
        except (ckpt.CheckpointError, FileNotFoundError):
            continue
    return None


def _main_section(lineage: Lineage) -> str:
    branched = {b.version for b in lineage.branches()}
    rows = []
    first_pending = True
    for name in lineage.version_names():
        m = lineage.main(name)
        if m is None:
            # Only the first pending version can have been started: the main path runs in order.
            step = _interrupted_at(lineage, name) if first_pending else None
            first_pending = False
            status = "pending" if step is None else f"interrupted at step {step}; a re-run resumes"
            rows.append([name, _MISSING, _MISSING, _MISSING, _MISSING, _MISSING, status])
            continue
        rows.append([
            name, f"{m.start_step}->{m.end_step}", _plain(m.fork_step), si(m.tokens_end),
            _loss(m.metrics.get(f"val/{name}")), _checkpoint_name(m),
            (m.status or "done") + ("" if name in branched else ", no branch yet"),
        ])
    if not rows:
        return _section("main path", "(not started)")
    return _section("main path (val on the version's own split at its boundary)", _text_table(
        ["version", "steps", "fork", "tokens", "val/own", "checkpoint", "status"], rows, "lrrrrll"))


def _decay_text(decay: dict) -> str:
    return (f"{decay.get('shape', '?')} min {_plain(decay.get('min_lr_ratio'))}"
            f" pow {_plain(decay.get('power'))}")


def _branches_section(lineage: Lineage) -> str:
    branches = lineage.branches(done=False)  # with its status column, an unfinished branch shows as such
    if not branches:
        return _section("branches", "(none finished yet)")
    splits = _val_splits(b.metrics for b in branches)
    rows = [[b.name, _plain(b.fork_step), _plain(b.steps), _decay_text(b.decay),
             *(_loss(b.metrics.get(s)) for s in splits), _plain(b.status)]
            for b in branches]
    headers = ["branch", "fork", "steps", "decay", *splits, "status"]
    align = "lrrl" + "r" * len(splits) + "l"
    return _section("branches (final val losses)", _text_table(headers, rows, align))


def _sweeps_section(lineage: Lineage) -> str:
    """Each branch search from the lineage's summaries (its trials stay in the sweep's own
    ``results.json``: status reads none of them)."""
    sweeps = lineage.sweep_summaries()
    if not sweeps:
        return _section("sweeps", "(none)")
    rows = [[s.name, s.version, _plain(s.extra.get("n_trials")) + (f" ({s.extra['n_pruned']} pruned)" if
                                                                    s.extra.get("n_pruned") else ""),
             "yes" if s.complete else "no (re-run resumes it)",
             _plain(s.best), _plain(s.released), si(s.search_tokens)] for s in sweeps]
    headers = ["sweep", "version", "trials", "complete", "best trial", "released trial", "search tokens"]
    return _section("sweeps (raypath sweep; trials in sweeps/VERSION/NAME/results.json)",
                    _text_table(headers, rows, "llrlllr"))


def _live_section(lineage: Lineage) -> str:
    """Per version: the live release (rN), why it was released, and how many candidates it beat."""
    from raypath.releases import format_standing

    return _section("live releases (decided over every measured branch of the version)",
                    format_standing(lineage) or "(none yet)")


def format_status(lineage: Lineage | dict) -> str:
    """What ``raypath status RUN_DIR`` prints: config, versions, main path, branches, sweeps, releases."""
    lineage = Lineage.of(lineage)
    header = [f"run: {lineage.name or '?'}" + (f" (updated {lineage.updated})" if lineage.updated else "")]
    header += ["  " + line for line in _config_summary(lineage.config)]
    parts = ["\n".join(header), format_versions(lineage), _main_section(lineage),
             _branches_section(lineage), _sweeps_section(lineage), _live_section(lineage), format_releases(lineage)]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- plot

def _tokens_at_step(main: MainEntry, step: int) -> float:
    """Tokens are linear in steps within a main segment (fixed global batch)."""
    s0, s1 = main.start_step, main.end_step
    t0, t1 = main.tokens_start, main.tokens_end
    if s1 == s0:
        return float(t1)
    return t0 + (step - s0) * (t1 - t0) / (s1 - s0)


def _main_curve(run_dir: Path, lineage: Lineage) -> pd.DataFrame:
    """All main-path segments as one curve, including a segment still running (no entry yet)."""
    frames = []
    for name in lineage.version_names():
        m = lineage.main(name)
        segment = (m.segment if m else "") or f"main-{name}"
        frames.append(read_curve(find_curve(run_dir, segment, m.curve if m else None)))
    return _concat_curves(frames)


def _branch_curve(run_dir: Path, lineage: Lineage, branch: Branch, main_curve: pd.DataFrame) -> pd.DataFrame:
    """A branch's curve starting at its fork point on the main path, so it visibly forks off."""
    curve = read_curve(find_curve(run_dir, branch.name, branch.curve))
    main = lineage.main(branch.version)
    if curve.empty or main is None or "tokens" not in main_curve or main_curve.empty:
        return curve
    fork_tokens = _tokens_at_step(main, branch.fork_step)
    fork = {"step": branch.fork_step, "tokens": fork_tokens,
            "loss": float(np.interp(fork_tokens, main_curve["tokens"], main_curve["loss"])),
            "lr": float(np.interp(fork_tokens, main_curve["tokens"], main_curve["lr"]))}
    return pd.concat([pd.DataFrame([fork]), curve], ignore_index=True)


def _draw_boundaries(axes, lineage: Lineage) -> None:
    """A dashed line at each version's boundary, and its name over the line: past
    ``LABELLED_BOUNDARIES`` versions the names would overlap, so every k-th is named,
    counting back from the latest (the one a reader looks for)."""
    from matplotlib.transforms import blended_transform_factory

    mains = [m for m in map(lineage.main, lineage.version_names()) if m is not None]
    every = -(-len(mains) // LABELLED_BOUNDARIES)
    trans = blended_transform_factory(axes[0].transData, axes[0].transAxes)
    for i, m in enumerate(mains):
        for ax in axes:
            ax.axvline(m.tokens_end, color="0.55", linestyle="--", linewidth=0.9 if every == 1 else 0.5, zorder=0)
        if (len(mains) - 1 - i) % every == 0:
            axes[0].text(m.tokens_end, 0.985, f" {m.version} ", transform=trans, ha="right", va="top",
                         fontsize=9, color="0.3",
                         bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def _draw_val_markers(ax, lineage: Lineage, colors: dict[str, Any]) -> None:
    """Release loss (star) vs the main path's (circle) on the version's own split."""
    for r in lineage.releases():
        own = f"val/{r.version}"
        main = lineage.main(r.version)
        x = r.tokens_total or (main.tokens_end if main else None)
        if x is None:
            continue
        rel = r.val.get(own)
        base = main.metrics.get(own) if main else None
        if base is not None:
            # Hollow and above the star: both stay visible when the two losses are close.
            ax.plot([x], [base], marker="o", mfc="none", mec="black", mew=1.3, ms=9, ls="none", zorder=7)
        if rel is not None:
            ax.plot([x], [rel], marker="*", color=colors.get(r.branch, "black"), mec="black",
                    mew=0.6, ms=12, ls="none", zorder=6)


def _legend_proxies() -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], marker="*", color="0.4", mec="black", mew=0.6, ms=12, ls="none",
                   label="release val (own split)"),
            Line2D([], [], marker="o", mfc="none", mec="black", mew=1.3, ms=9, ls="none",
                   label="main val at boundary (own split)")]


def _token_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: si(x) if x else "0")


#: A legend entry per branch fits the figure's height up to this many branches; past it the
#: branches are coloured by version on a colour bar. Boundary names: at most this many too.
LEGEND_BRANCHES = 12
LABELLED_BOUNDARIES = 12


def _branch_colors(lineage: Lineage, branches: list[Branch]) -> tuple[dict[str, Any], Any]:
    """A colour per branch and, past ``LEGEND_BRANCHES``, the colour bar that reads them.

    A few branches get distinct colours and a legend entry each. A run of many versions
    colours them by version along one sequential map (ten cycling colours would repeat
    every ten versions, and 180 legend entries leave the figure), so a branch's colour says
    which version it released, and its release star shares it."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if len(branches) <= LEGEND_BRANCHES:
        cmap = matplotlib.colormaps["tab10"]
        return {b.name: cmap(i % 10) for i, b in enumerate(branches)}, None
    index = {v: i for i, v in enumerate(lineage.version_names())}
    scale = ScalarMappable(Normalize(0, max(len(index) - 1, 1)), matplotlib.colormaps["viridis"])
    return {b.name: scale.to_rgba(index.get(b.version, 0)) for b in branches}, scale


def _version_colorbar(fig, ax, scale, lineage: Lineage) -> None:
    """The versions' colour bar, under the legend to the right of the loss axes."""
    names = lineage.version_names()
    ticks = sorted(range(len(names) - 1, -1, -max(1, -(-len(names) // 8))))  # the latest always named
    bar = fig.colorbar(scale, cax=ax.inset_axes((1.04, 0.0, 0.03, 0.62)), ticks=ticks)
    bar.ax.set_yticklabels([names[i] for i in ticks], fontsize=8)
    bar.set_label("branches: version", fontsize=8.5)


def lineage_figure(run_dir: str | os.PathLike, lineage: Lineage | dict):
    """The figure of :func:`plot_lineage`, unsaved (a notebook shows it as it is)."""
    lineage = Lineage.of(lineage)
    run_dir = Path(run_dir)
    main_curve = _main_curve(run_dir, lineage)
    branches = lineage.branches(done=False)  # a branch still training is drawn as far as it got
    colors, scale = _branch_colors(lineage, branches)

    fig = new_figure(FIGSIZE)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    if not main_curve.empty and "loss" in main_curve:
        # Thin and on top: where a branch tracks the main path both lines stay visible.
        ax_loss.plot(main_curve["tokens"], main_curve["loss"], color="black", lw=0.9, zorder=4,
                     label="main path (train)")
        ax_lr.plot(main_curve["tokens"], main_curve["lr"], color="black", lw=1.0, zorder=4, label="main path")
    for b in branches:
        curve = _branch_curve(run_dir, lineage, b, main_curve)
        if curve.empty or "loss" not in curve:
            continue
        label = b.name if scale is None else "_nolegend_"
        ax_loss.plot(curve["tokens"], curve["loss"], color=colors[b.name], lw=2.2, zorder=3, label=label)
        ax_lr.plot(curve["tokens"], curve["lr"], color=colors[b.name], lw=2.2, zorder=3, label=label)
    _draw_val_markers(ax_loss, lineage, colors)
    _draw_boundaries((ax_loss, ax_lr), lineage)

    ax_loss.set_ylabel("loss (train: window mean)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens trained along the path")
    ax_lr.xaxis.set_major_formatter(_token_formatter())
    ax_lr.set_ylim(bottom=0)
    for ax in (ax_loss, ax_lr):
        ax.grid(True, alpha=0.25)
    handles, _ = ax_loss.get_legend_handles_labels()
    ax_loss.legend(handles=handles + _legend_proxies(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=8.5, frameon=False)
    if scale is not None:
        _version_colorbar(fig, ax_loss, scale, lineage)
    fig.suptitle(f"{lineage.name or 'run'}: main path and release branches")
    fig.tight_layout()
    return fig


def plot_lineage(run_dir: str | os.PathLike, lineage: Lineage | dict, out_png: str | os.PathLike) -> Path:
    """Loss and LR of the main path with every branch forking off it, against tokens.

    Tokens (not steps) on x because they are cumulative along each path, so
    a branch starts exactly where its fork checkpoint sits on the main path
    and ends at the same boundary as the main segment it competes with.
    """
    return save_figure(lineage_figure(run_dir, lineage), out_png, DPI, tight=False)


# --------------------------------------------------------------------------- the scaling law (raypath law)

def format_fits(fits_record: Mapping[str, FitResult], lineage: Lineage | Mapping, version: str) -> str:
    """``raypath law fit`` output: per split, its data switches, points, R^2, MAPE,
    parameters, degenerate ones, and the held-out errors the law was chosen by."""
    from raypath.law import OUTLIER_K
    from raypath.lawfit import boundaries, entry_step, splits_for

    lineage = Lineage.of(lineage)
    lines = [f"law fits for releasing {version} (per validation split)"]
    for split in splits_for(lineage, version):
        fit = fits_record.get(split)
        role = "new" if split == version else "old"
        if fit is None:
            lines.append(f"  {split} ({role}): not fitted (too few observed points)")
            continue
        params = ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items())
        # a split trained on from step 0 (the first version's new split) has no switch
        at = [str(b) for b in boundaries(lineage, split, version) if b > 0]
        switches = f"data switches at steps {', '.join(at)}" if at else "no data switch"
        if entry := entry_step(lineage, split, version):
            switches += f"; its data entered at step {entry}"
        lines.append(f"  {split} ({role}, {switches}): {fit.law}, "
                     f"n={fit.n_points}, R^2={fit.r2:.4f} (noise ceiling {fit.r2_ceiling:.4f}), "
                     f"MAPE={fit.mape:.3f}%, lambda={fit.lam:g}, "
                     f"Huber delta={fit.delta:.2g}")
        if fit.held_out:
            lines.append("      held-out error (a law halving the first's wins; else the lowest BIC of those the "
                         "held-out branches cannot tell apart): "
                         + ", ".join(f"{k} {v:.3g}" for k, v in fit.held_out.items()))
        if fit.outliers:
            listed = ", ".join(f"{o['curve']} step {o['step']} {100 * o['residual']:+.1f}%" for o in fit.outliers[:5])
            more = f" and {len(fit.outliers) - 5} more" if len(fit.outliers) > 5 else ""
            lines.append(f"      outliers (beyond {OUTLIER_K:g} noise sd): {len(fit.outliers)} points carry "
                         f"{100 * fit.outlier_share:.0f}% of the squared error: {listed}{more}")
        lines.append(f"      params: {params}")
        lines.append(f"      degenerate: {', '.join(fit.degenerate) if fit.degenerate else 'none'}")
        if fit.optimizer_status == 1:
            lines.append(f"      optimizer: stopped at the iteration limit ({fit.optimizer}): "
                         "may be short of its optimum")
    return "\n".join(lines)


def _curve_colors(observed: Mapping[str, list]) -> dict[str, Any]:
    """One colour per branch over every split's panel: a split sees only the branches trained
    since its data entered, so colouring each panel in its own order gave one branch two colours."""
    import matplotlib

    names = dict.fromkeys(c.name for curves in observed.values() for c in curves if c.name != "main")
    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def plot_prediction(run_dir: str | os.PathLike, lineage: Lineage | Mapping, fits: Mapping[str, FitResult], version: str,
                    prediction: Mapping, out_png: str | os.PathLike) -> Path:
    """Per split: observed main-path and branch val curves of ``version``, and the law's
    predicted curve for the branch in ``prediction`` (plus the fitted main path)."""
    from raypath.lawfit import branch_history, lineage_schedule, main_entry, main_lrs, split_curves, split_phases
    from raypath.schedules import decay_from

    lineage = Lineage.of(lineage)
    splits = list(fits)
    fig = new_figure((9.0, 3.2 * len(splits)))
    axes = fig.subplots(len(splits), 1, squeeze=False)
    start = int(main_entry(lineage, version).start_step)
    sched = lineage_schedule(lineage)
    decay = decay_from(prediction)
    fork, end = prediction["fork_step"], prediction["end_step"]
    observed = split_curves(lineage, splits, version, run_dir=run_dir)
    colors = _curve_colors(observed)
    for ax, split in zip(axes[:, 0], splits):
        phases = split_phases(lineage, split, version)
        curves = observed[split]
        for c in curves:
            if c.name == "main":
                ax.plot(c.steps + 1, c.losses, "o-", color="black", ms=3, lw=0.8, label="main path (observed)")
            else:
                ax.plot(c.steps + 1, c.losses, "o-", color=colors[c.name], ms=3, lw=1.2,
                        label=f"{c.name} (observed)")
        grid = np.arange(max(start, 1), end + 1)
        main_pred = fits[split].predict(main_lrs(sched, end), grid - 1, **phases)
        ax.plot(grid, main_pred, "--", color="0.5", lw=1.0, label="main path (law)")
        bgrid = np.arange(fork, end + 1)
        pred = fits[split].predict(branch_history(sched, fork, end - fork, decay, n=end), np.maximum(bgrid - 1, 0),
                                   **phases)
        ax.plot(bgrid, pred, "-", color="crimson", lw=2.0,
                label=f"predicted {decay.shape} f={prediction['fraction_actual']:.2f} (law)")
        ax.plot([end], [prediction["predicted"][split]], "*", color="crimson", ms=12)
        ax.set_title(f"val/{split}: {fits[split].law} R^2 {fits[split].r2:.3f}, MAPE {fits[split].mape:.2f}%",
                     fontsize=10)
        ax.set_xlim(start - 0.05 * (end - start), end + 2)
        ax.set_ylabel("val loss")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7.5, loc="upper right")
    axes[-1, 0].set_xlabel("global step")
    fig.suptitle(f"{lineage.name or 'run'} {version}: predicted branch vs observed curves")
    fig.tight_layout()
    out = Path(out_png)
    save_figure(fig, out)
    return out


# --------------------------------------------------------------------------- report

def write_report(run: "Lineage | RunDir | str | os.PathLike") -> dict[str, str]:
    """Plot, CSV and markdown of a run under ``RUN_DIR/report``; returns their paths.

    run: its lineage, or its run directory: a path, or a URI (``s3://...``), whose report is
        written in its local mirror (the default one, unless ``run`` is a
        :class:`~raypath.mirror.RunDir` opened with another) and uploaded to ``RUN_DIR/report``
        there, as ``raypath run`` does."""
    lineage = run if isinstance(run, Lineage) else Lineage.load(run)
    run_dir = lineage.rd.path
    out = run_dir / REPORT_DIR
    plot = plot_lineage(run_dir, lineage, out / "lineage.png")
    buf = io.StringIO()
    releases_table(lineage).to_csv(buf, index=False)
    table = out / "releases.csv"
    atomic_write_bytes(table, buf.getvalue().encode())
    markdown = out / "releases.md"
    live = _live_section(lineage).split("\n", 1)[1]
    atomic_write_bytes(markdown, (releases_markdown(lineage) + "\nLive releases (decided over every measured "
                                  "branch of the version):\n\n" + "".join(f"- {line}\n" for line in
                                                                          live.splitlines())).encode())
    lineage.rd.publish(out)
    return {"plot": str(plot), "table": str(table), "markdown": str(markdown)}
