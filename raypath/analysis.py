"""Read a branch sweep (``raypath sweep``) into pandas and plot what it found.

Everything here reads files of the sweep directory
(``RUN_DIR/sweeps/vK/<name>``) and nothing else, so it works on a sweep that
is still running, on an interrupted one and on a copied run directory:

* ``sweep.json``: the sweep's settings, fork points and objective weights;
* ``trial_<id>/params.json`` and ``result.json``: Tune's record of each trial's
  config and reported results (the last one is the trial's final evaluation);
* ``curves/<segment>.jsonl``: each trial's full curve (train loss every
  ``log_every`` steps, LR, val losses and objective at evaluations);
* ``results.json`` (when the sweep finished): the best trial, and the one it released.

The main path the trials fork from is read from the run directory that holds
the sweep (``RUN_DIR/curves/main-vK.jsonl``), and so is which trial is released
now (``lineage.json``): a release picked, rolled back or replaced since the sweep shows.

A sweep of a remote run directory is named by its URI (``s3://bucket/runs/q/sweeps/v2/sweep``):
each call pulls the files listed above (not its checkpoints, exports or Tune's state) and the run's
``lineage.json`` into the run's local mirror (:func:`local_sweep_dir`), then reads them there. A
call downloads what changed since this process last downloaded it, and of the trials' curves only
those it reads: a notebook re-running its cells on a live sweep fetches the running trials' files.

    trials, curves = load_sweep("runs/quickstart/sweeps/v2/sweep")
    plot_loss_vs_length(trials)
    plot_pareto(trials)
    plot_forks(trials, curves, main_curve("runs/quickstart/sweeps/v2/sweep"))
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from raypath import storage
from raypath.lineage import LINEAGE, RESULTS_JSON, read_sweep_record, sweep_run_dir
from raypath.mirror import PRUNED_JSON, STOPPED_JSON, SWEEP_JSON, RunDir, is_remote
from raypath.report import read_curve, si

#: Config columns of a trial, in display order.
CONFIG_COLUMNS = ["shape", "power", "min_lr_ratio", "replay_ratio", "fraction", "fraction_actual",
                  "fork_step", "branch_steps", "branch_tokens"]
#: Plot size (inches) and resolution, as in :mod:`raypath.report`.
FIGSIZE = (9.0, 5.5)
DPI = 120
#: One colour per decay shape, stable across plots.
SHAPE_COLORS = {"cosine": "tab:blue", "linear": "tab:orange", "1-sqrt": "tab:green",
                "exponential": "tab:red", "polynomial": "tab:purple"}


#: Curves parsed by this process: path -> (the file's size, mtime and inode then, the frame). A
#: notebook re-runs its cells on a live sweep: a call parses again only the curves that changed
#: (the finished trials' never do). Bounded: the least recently read go first.
_CURVES: collections.OrderedDict[Path, tuple[tuple[int, int, int], pd.DataFrame]] = collections.OrderedDict()
_CURVES_KEPT = 20_000


def _curve(path: Path) -> pd.DataFrame:
    """:func:`raypath.report.read_curve`, parsed once per version of the file in this process
    (callers derive new frames from it, never change it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return read_curve(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _CURVES.get(path)
    if hit is None or hit[0] != stamp:
        hit = _CURVES[path] = (stamp, read_curve(path))
    _CURVES.move_to_end(path)
    while len(_CURVES) > _CURVES_KEPT:
        _CURVES.popitem(last=False)
    return hit[1]


def _sweep_record(path: Path) -> dict:
    """``sweep.json`` / ``results.json``, their paths absolute under the run directory's current place."""
    return read_sweep_record(path)


def _last_result(path: Path) -> dict:
    return (storage.last_jsonl(path) or {}) if path.is_file() else {}


def _read_here(rel: str) -> bool:
    """Whether the file ``rel`` of a sweep directory is one this module reads (see the module doc):
    not Tune's own state (experiment and searcher snapshots, a set per start of the sweep)."""
    parts = rel.split("/")
    if len(parts) == 1:
        return parts[0] in (SWEEP_JSON, RESULTS_JSON, STOPPED_JSON, PRUNED_JSON)
    if parts[0].startswith("trial_"):
        return parts[1:] in (["params.json"], ["result.json"], ["error.txt"])
    return parts[0] == "curves"


def local_sweep_dir(sweep_dir: str | os.PathLike, local_dir: str | os.PathLike | None = None,
                    curves: bool = True) -> Path:
    """Where the sweep's files are read: ``sweep_dir`` itself, or for a URI its place in the run's
    local mirror (``local_dir``, default ``~/.cache/raypath/<scheme>/<bucket>/<prefix>`` as for
    ``--local-dir``), its records, curves (``curves``: False for none) and the run's ``lineage.json``
    and main-path curve pulled there first: the records and curves this process downloaded before
    and that have not changed since are not downloaded again. The S3 endpoint is
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
    from raypath.sources import first_line
    from raypath.sweep import SWEEP_REMOTE_ONLY

    if not is_remote(str(sweep_dir)):
        return Path(sweep_dir)
    uri = str(sweep_dir).rstrip("/")
    rd, local = _remote_sweep(uri, local_dir)
    try:
        if rd.mirror.info(local / "sweep.json").type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}: no sweep.json (is it a `raypath sweep` directory?)")
        rd.pull_files(local, exclude=SWEEP_REMOTE_ONLY,
                      only=_read_here if curves else lambda rel: _read_here(rel) and not rel.startswith("curves/"))
        rd.fetch(rd / LINEAGE, missing_ok=True)
        rd.fetch(rd / "curves" / f"main-{local.parent.name}.jsonl", missing_ok=True)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # unreachable endpoint, rejected credentials, no bucket
        raise OSError(f"{uri}: cannot read ({first_line(e)})") from None
    return local


def _remote_sweep(uri: str, local_dir: str | os.PathLike | None = None) -> tuple[RunDir, Path]:
    """The run directory of the sweep ``uri`` (``RUN_DIR/sweeps/<version>/<name>``) and the
    sweep's place in its local mirror."""
    from raypath.mirror import run_location

    parts = uri.rstrip("/").split("/")
    if len(parts) < 7 or parts[-3] != "sweeps":
        raise ValueError(f"{uri}: not a sweep directory (expected RUN_DIR/sweeps/<version>/<name>)")
    rd = RunDir(*run_location("/".join(parts[:-3]), None if local_dir is None else str(local_dir)))
    return rd, rd / "/".join(parts[-3:])


def _no_sweep(path: Path) -> FileNotFoundError:
    """What a path that is not a sweep directory is, with the sweeps below it where there are some."""
    if not path.exists():
        return FileNotFoundError(f"{path}: no such directory (expected RUN_DIR/sweeps/<version>/<name>)")
    found = sorted(p.parent for p in path.glob("**/sweep.json") if len(p.relative_to(path).parts) <= 4)
    if found:
        return FileNotFoundError(f"{path}: no sweep.json; the sweep directories below it: "
                                 + ", ".join(str(p) for p in found))
    return FileNotFoundError(f"{path}: no sweep.json (is it a `raypath sweep` directory?)")


def sweep_info(sweep_dir: str | os.PathLike) -> dict:
    """The sweep's ``sweep.json`` (settings, fork points, weights), plus ``results.json`` if finished."""
    sweep_dir = local_sweep_dir(sweep_dir)
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise _no_sweep(sweep_dir)
    info = _sweep_record(path)
    results = sweep_dir / RESULTS_JSON
    if results.is_file():
        done = _sweep_record(results)
        info.update({k: done.get(k) for k in ("best", "released", "pinned", "complete")})
        info["released_at_sweep"] = info["released"]
        info["released"], info["pinned"] = _live_trial(sweep_dir, info)
    return info


def _live_trial(sweep_dir: Path, info: dict) -> tuple[str | None, bool]:
    """The trial of this sweep that is the version's live release now, and whether it is pinned;
    the sweep's own record where the run's lineage is not there (a sweep directory copied alone)."""
    from raypath.lineage import Lineage

    try:
        live = Lineage.load(sweep_run_dir(sweep_dir)).release(info["version"])
    except (FileNotFoundError, ValueError):
        return info.get("released"), bool(info.get("pinned"))
    if live is None or not live.trial_id or Path(live.sweep or "").name != sweep_dir.resolve().name:
        return None, False
    return live.trial_id, bool(live.pinned)


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(d for d in sweep_dir.glob("trial_*") if d.is_dir())


def load_sweep(sweep_dir: str | os.PathLike,
               curves: bool | Sequence[str] = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial (config + final metrics) and one row per logged step of every trial
    (``curves``: False for none, or the trial ids to read; a curve per trial is what grows with
    the sweep: each trial's final results are read from the end of its ``result.json`` only).

    trials: ``trial_id``, the config columns (:data:`CONFIG_COLUMNS`; ``fraction``
        is what Optuna proposed, ``fraction_actual`` the fork it snapped to),
        the final ``objective``, ``score`` (objective + compute penalty),
        ``val/<version>`` losses, the held-out ``test/<version>`` losses and their
        ``test_objective`` (same weights; reported, never selected on), ``loss``
        (last train-loss window) and ``step`` (of a running trial: its last logged step),
        ``status`` (``done`` when the trial reached the version boundary, ``stopped``
        when the law stopper ended it, ``error`` when Tune recorded its failure, ``running``
        once it reported or logged its curve, else ``pending``), ``best`` /
        ``released`` flags and ``pruned`` (its weights deleted: ``sweep.keep_trials``). Sorted by score.
    curves (the second frame): ``trial_id``, ``step``, ``tokens``, ``branch_tokens`` (tokens since
        the fork), ``lr``, ``loss`` and, at evaluations, ``val/*`` and
        ``objective``; plus ``shape`` and ``fraction_actual`` for grouping.
    """
    # Of a remote sweep, the curves of the trials that are read only (and each unfinished trial's,
    # for how far it got): the curves are what grows with the sweep.
    rd = _remote_sweep(str(sweep_dir))[0] if curves is not True and is_remote(str(sweep_dir)) else None
    sweep_dir = local_sweep_dir(sweep_dir, curves=rd is None)
    info = sweep_info(sweep_dir)
    stopped_path = sweep_dir / STOPPED_JSON
    stopped = storage.read_json(stopped_path) if stopped_path.is_file() else {}
    rows, frames = [], []
    for d in _trial_dirs(sweep_dir):
        trial_id = d.name.removeprefix("trial_")
        curve_path = sweep_dir / "curves" / f"{info['segment_prefix']}{trial_id}.jsonl"
        read = curves is True or trial_id in (curves or ())
        row = _trial_row(d, curve_path, info, trial_id in stopped, rd, read)
        rows.append(row)
        curve = _trial_curve(curve_path, row, info) if read else None
        if curve is not None and len(curve):
            frames.append(curve)
    trials = _trials_frame(rows, info)
    trials["pruned"] = trials["trial_id"].isin(storage.read_json(sweep_dir / PRUNED_JSON).keys()
                                               if (sweep_dir / PRUNED_JSON).is_file() else ())
    steps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["trial_id", "step", "tokens", "branch_tokens", "lr", "loss"])
    return trials, steps


def _trial_row(d: Path, curve_path: Path, info: dict, stopped: bool, rd: RunDir | None, read: bool) -> dict:
    """A trial's config, latest results and status. ``rd``: the remote run directory of a sweep
    whose curves are fetched where they are ``read``, and of an unfinished trial for how far it got."""
    params = storage.read_json(d / "params.json") if (d / "params.json").is_file() else {}
    final = _last_result(d / "result.json")  # the trial's latest report
    done = final.get("step") == info["main_end_step"] and "objective" in final
    if rd is not None and (not done or read):
        rd.fetch(curve_path, missing_ok=True)
    # Trials can report only at their end (eval_every 0): a logged curve is what shows one training.
    started = bool(final) or (curve_path.is_file() and curve_path.stat().st_size > 0)
    if started and not done:  # the curve is logged every log_every steps, Tune hears at evaluations
        logged = (storage.last_jsonl(curve_path) or {}) if curve_path.is_file() else {}
        if logged.get("step", -1) > (final.get("step") if final.get("step") is not None else -1):
            final = {**final, "step": logged["step"], "loss": logged.get("loss", final.get("loss"))}
    return {
        "trial_id": d.name.removeprefix("trial_"), **{c: params.get(c) for c in CONFIG_COLUMNS},
        "objective": final.get("objective") if done else None,
        "score": final.get("score") if done else None,
        "penalty": final.get("penalty"),
        # reported next to the objective; nothing selects on the test splits
        "test_objective": final.get("test_objective") if done else None,
        **{k: v for k, v in final.items() if k.startswith(("val/", "test/"))},
        "loss": final.get("loss"),
        "step": final.get("step"),
        "status": "done" if done else "stopped" if stopped else
        "error" if (d / "error.txt").is_file() else "running" if started else "pending",  # Tune's error file
    }


def _trial_curve(curve_path: Path, row: dict, info: dict) -> pd.DataFrame:
    """A trial's logged steps, with the tokens since its fork and its shape for grouping."""
    curve = _curve(curve_path)
    if not len(curve):
        return curve
    curve = curve.assign(trial_id=row["trial_id"], shape=row["shape"], fraction_actual=row["fraction_actual"])
    fork_tokens = info["tokens_start"] + (int(row["fork_step"]) - info["main_start_step"]) * info["tokens_per_step"]
    curve["branch_tokens"] = curve["tokens"] - fork_tokens
    return curve


def _trials_frame(rows: list[dict], info: dict) -> pd.DataFrame:
    """The trials, numbers typed, the best finished one and the released one flagged, by score."""
    trials = pd.DataFrame(rows)
    if trials.empty:
        trials = pd.DataFrame(columns=["trial_id", *CONFIG_COLUMNS, "objective", "score", "status"])
    for col in ("objective", "test_objective", "score", "penalty", "fraction", "fraction_actual", "power",
                "min_lr_ratio", "replay_ratio", "loss"):
        if col in trials:
            trials[col] = pd.to_numeric(trials[col], errors="coerce")
    done = trials[trials["status"] == "done"]
    best = done.loc[done["score"].idxmin(), "trial_id"] if len(done) else None
    trials["best"] = trials["trial_id"] == best
    trials["released"] = trials["trial_id"] == info.get("released")
    return trials.sort_values(["score", "trial_id"], na_position="last").reset_index(drop=True)


def main_curve(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """The main-path curve of the swept version (what the trials fork from)."""
    sweep_dir = local_sweep_dir(sweep_dir)
    info = sweep_info(sweep_dir)
    local = sweep_run_dir(sweep_dir) / "curves" / f"{info['main_segment']}.jsonl"
    return read_curve(local if local.is_file() or not info.get("main_curve") else info["main_curve"])


def main_objective(sweep_dir: str | os.PathLike) -> float:
    """The objective of the *un-annealed* main path at the version boundary (what decay must beat)."""
    sweep_dir = local_sweep_dir(sweep_dir)
    info = sweep_info(sweep_dir)
    curve = main_curve(sweep_dir)
    weights = info["objective_weights"]
    if curve.empty:
        return float("nan")
    last = curve[curve["step"] == info["main_end_step"]]
    if last.empty or not all(f"val/{v}" in last for v in weights):
        return float("nan")
    return float(sum(w * last[f"val/{v}"].iloc[-1] for v, w in weights.items()))


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated in (``x``, ``y``), both minimised, sorted by ``x``.

    A row is on the front when no other row has ``x`` and ``y`` both <= its own
    with one strictly smaller: e.g. no cheaper branch that is at least as good.
    """
    d = df.dropna(subset=[x, y]).sort_values([x, y], kind="stable")
    keep, best = [], math.inf
    for idx, value in zip(d.index, d[y]):
        if value < best:
            keep.append(idx)
            best = value
    return d.loc[keep]


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib.pyplot as plt

    return plt


def _color(shape: Any) -> str:
    return SHAPE_COLORS.get(str(shape), "0.4")


def _title(ax, trials: pd.DataFrame, what: str) -> None:
    n = len(trials)
    done = int((trials["status"] == "done").sum()) if "status" in trials else n
    ax.set_title(f"{what} ({done}/{n} trials finished)")


def _finish(fig, ax, trials: pd.DataFrame, ylabel: str, what: str):
    """The common end of the one-axis sweep plots: label, grid, legend, title, layout."""
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none while no trial has finished
        ax.legend(fontsize=9, frameon=False)
    _title(ax, trials, what)
    fig.tight_layout()
    return fig


def plot_loss_vs_length(trials: pd.DataFrame, y: str = "objective", x: str = "fraction_actual",
                        reference: float | None = None):
    """Final ``y`` against branch length, one series per decay shape; the best trial starred.

    reference: a horizontal line, e.g. :func:`main_objective` (the main path
        without any decay at the same boundary).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    done = trials.dropna(subset=[x, y])
    for shape, group in done.groupby("shape", sort=True):
        g = group.sort_values(x)
        ax.plot(g[x], g[y], marker="o", ms=7, lw=1.2, alpha=0.9, color=_color(shape), label=shape)
    best = done[done["best"]] if "best" in done else done.iloc[:0]
    if len(best):
        ax.plot(best[x], best[y], marker="o", ms=17, mfc="none", mec="goldenrod", mew=2.5, ls="none",
                zorder=5, label="best")
    if reference is not None and np.isfinite(reference):
        ax.axhline(reference, color="black", lw=1, ls="--", label="main path, no decay")
    ax.set_xlabel("branch length (fraction of the version's stream)" if x.startswith("fraction") else x)
    return _finish(fig, ax, trials, y, f"{y} vs branch length per decay shape")


def plot_pareto(trials: pd.DataFrame, x: str = "branch_tokens", y: str = "objective"):
    """Every trial's ``y`` against its compute ``x``; the Pareto front (cheapest for its loss) joined."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=FIGSIZE)
    done = trials.dropna(subset=[x, y])
    for shape, group in done.groupby("shape", sort=True):
        ax.scatter(group[x], group[y], s=45, color=_color(shape), label=shape, zorder=3, alpha=0.85)
    front = pareto_front(done, x, y)
    if len(front):
        ax.step(front[x], front[y], where="post", color="black", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(front[x], front[y], s=130, facecolors="none", edgecolors="black", lw=1.3, zorder=4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: si(v) if v else "0"))
    ax.set_xlabel("branch tokens" if x == "branch_tokens" else x)
    return _finish(fig, ax, trials, y, f"{y} vs compute: Pareto front")


def plot_forks(trials: pd.DataFrame, curves: pd.DataFrame, main: pd.DataFrame | None = None,
               y: str = "loss"):
    """Each trial's curve forking off the main path: ``y`` (top) and LR (bottom) against tokens."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * 1.3), sharex=True,
                                    gridspec_kw={"height_ratios": [2.2, 1]})
    if main is not None and len(main) and y in main:
        # From before the earliest fork (curves start one log step after it), so branches fork off the line.
        forks = curves["tokens"] - curves["branch_tokens"]
        start = forks.min() - curves["branch_tokens"].max() * 0.3 if len(curves) else None
        m = main if start is None or not np.isfinite(start) else main[main["tokens"] >= start]
        ax.plot(m["tokens"], m[y], color="black", lw=1.0, zorder=4, label="main path")
        ax_lr.plot(m["tokens"], m["lr"], color="black", lw=1.0, zorder=4)
    order = trials["trial_id"].tolist()
    for trial_id, c in sorted(curves.groupby("trial_id"), key=lambda kv: order.index(kv[0])
                              if kv[0] in order else len(order)):
        row = trials[trials["trial_id"] == trial_id]
        shape = row["shape"].iloc[0] if len(row) else None
        is_best = bool(len(row) and row["best"].iloc[0]) if "best" in row else False
        lw, alpha = (2.6, 1.0) if is_best else (1.3, 0.75)
        label = f"{trial_id} {shape}" + (" (best)" if is_best else "")
        if main is not None and len(row) and len(main):
            # Start each branch at its fork on the main path, so it visibly forks off it.
            fork = main[main["step"] == row["fork_step"].iloc[0]]
            c = pd.concat([fork[[k for k in ("step", "tokens", "lr", y) if k in fork]], c], ignore_index=True)
        if y in c:
            cc = c.dropna(subset=[y])
            ax.plot(cc["tokens"], cc[y], color=_color(shape), lw=lw, alpha=alpha, label=label)
        ax_lr.plot(c["tokens"], c["lr"], color=_color(shape), lw=lw, alpha=alpha)
    ax.set_ylabel(f"{y} (train: window mean)" if y == "loss" else y)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens trained along the path")
    ax_lr.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: si(v) if v else "0"))
    ax_lr.set_ylim(bottom=0)
    for a in (ax, ax_lr):
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(ax, trials, "branches forking off the main path")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write one of these plots as a PNG, atomically (:func:`raypath.storage.save_figure`)."""
    return storage.save_figure(fig, path, DPI)


# --------------------------------------------------------------------------- tables

def summary_table(trials: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The trials with the columns a reader compares, best first."""
    columns = list(columns or ["trial_id", "shape", "power", "min_lr_ratio", "fraction", "fraction_actual",
                               "branch_tokens", "objective", "test_objective", "score", "status", "released"])
    return trials[[c for c in columns if c in trials]].reset_index(drop=True)


def markdown_table(trials: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """:func:`summary_table` as a GitHub markdown table (numbers rounded for reading)."""
    df = summary_table(trials, columns)

    def cell(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if col == "branch_tokens":
            return si(v)
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else ""
        if isinstance(v, float):
            return f"{v:.4f}" if col in ("objective", "test_objective", "score") or col.startswith(("val/", "test/")) \
                else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |",
             "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool else "---"
                               for c in df.columns) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in df.columns) + " |")
    return "\n".join(lines) + "\n"
