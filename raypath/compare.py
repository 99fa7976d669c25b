"""Does path switching pay? PTFS vs CPT vs path switching on the same data.

Trains the same versions three ways, on the same model config, the same
prepared blocks and the same peak LR (arXiv 2410.04103, figure 1):

* **PTFS**: release k is trained from scratch on all data so far (a seeded
  permutation of the new blocks of versions 1..k), warmup + decay to the floor.
* **CPT**: release k continues from release k-1 (weights and optimizer) on
  version k's stream (with its replay), re-warming from the previous floor to
  the peak, then decaying to the floor. CPT's release 1 *is* PTFS's release 1.
* **Path switching**: the lineage itself (:func:`raypath.run.run`): main path +
  one decay branch per version.

Shape-matched by default: PTFS and CPT decay with the branch config's shape, power
and floor, so a gap measures the paradigm, not which decay shape anneals better.
The paper's setting (cosine baselines against the configured branch) is
``compare.paper_baselines``: its own rows, never the headline. Path switching also
runs at each ``compare.replay_ratios`` (a whole lineage each, on the run's
tokenizer, under ``compare/replay-R/``), so what replay buys against forgetting is
measured next to what it costs. Losses come on val and on the held-out test splits;
the gaps are on test, which no selection read.

Results land in the lineage (:meth:`raypath.lineage.Lineage.baselines`) and in
``RUN_DIR/compare/`` as CSV + text + PNG (LR paths of the three paradigms and the
released models' test losses per version).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pandas as pd

from raypath.config import Config
from raypath.cost import lineage_costs
from raypath.data import union_stream
from raypath.lineage import Lineage
from raypath.run import RunContext, prepare
from raypath.run import run as run_lineage
from raypath.schedules import Decay, Window, decay_from
from raypath.segment import Segment, final_checkpoint, fit_segment
from raypath.storage import atomic_write_bytes, new_figure, save_figure, writer_lock

log = logging.getLogger(__name__)

PARADIGMS = ("ptfs", "cpt", "path_switching")
MATCHED, PAPER = "matched", "paper"


def baseline_decays(cfg: Config) -> dict[str, Decay]:
    """The decays PTFS and CPT are trained with, by setting: ``matched`` (the branch's shape,
    power and floor) always, ``paper`` (cosine to the branch's floor) when asked for and
    different (a cosine branch's matched baselines are the paper's)."""
    b = cfg.branch
    out = {MATCHED: b.decay()}
    if cfg.compare.paper_baselines:
        if b.shape == "cosine":  # power does not shape a cosine
            log.info("compare: the branch decays with a cosine to its floor already: the paper's "
                     "baselines are the headline PTFS and CPT rows")
        else:
            out[PAPER] = Decay("cosine", b.min_lr_ratio)
    return out


def _tag(decay: Decay) -> str:
    """Segment-name suffix of a baseline decay; cosine keeps the plain names (``ptfs-v2``)."""
    if decay.shape == "cosine":
        return ""
    return f"-{decay.shape}" + (f"{decay.power:g}" if decay.shape in ("polynomial", "exponential") else "")


def window(ctx: RunContext, decay: Decay, steps: int, start_step: int = 0, warmup_from: float = 0.0) -> Window:
    """A baseline's LR: the main path's warmup and peak, then ``decay`` to its floor."""
    t = ctx.cfg.train
    return Window(t.max_lr, t.warmup_steps, steps, start_step, decay.min_lr_ratio, warmup_from,
                  decay.shape, decay.power)


def ptfs_segment(ctx: RunContext, k: int, decay: Decay) -> Segment:
    """Release k from scratch on all data of versions 1..k."""
    version = ctx.versions[k]
    stream = union_stream(ctx.versions, k, ctx.run_dir / "data" / f"ptfs-{version['name']}" / "stream",
                          ctx.cfg.data.seed, ctx.rd)
    steps = stream["stream_rows"] // ctx.cfg.train.global_batch_size
    name = f"ptfs-{version['name']}{_tag(decay)}"
    return Segment(**ctx.segment_fields(name), kind="ptfs", version=f"ptfs-{version['name']}",
                   stream_path=stream["stream_path"], start_step=0, end_step=steps,
                   schedule=window(ctx, decay, steps), **ctx.eval_fields(k),
                   stream_limit=steps * ctx.cfg.train.global_batch_size)


def cpt_segment(ctx: RunContext, k: int, prev: dict, decay: Decay) -> Segment:
    """Release k continued from release k-1 on version k's stream (re-warm + decay)."""
    version = ctx.versions[k]
    steps = version["stream_rows"] // ctx.cfg.train.global_batch_size
    floor = decay.min_lr_ratio * ctx.cfg.train.max_lr
    return Segment(**ctx.segment_fields(f"cpt-{version['name']}{_tag(decay)}"), kind="cpt", version=version["name"],
                   stream_path=version["stream_path"], start_step=prev["end_step"],
                   end_step=prev["end_step"] + steps,
                   schedule=window(ctx, decay, steps, prev["end_step"], warmup_from=floor),
                   init_checkpoint=prev["checkpoint"], **ctx.eval_fields(k),
                   stream_limit=steps * ctx.cfg.train.global_batch_size)


def _entry(seg: Segment, version: str, setting: str, decay: Decay) -> dict:
    final = final_checkpoint(seg)
    return {"version": version, "setting": setting, "decay": dataclasses.asdict(decay), "segment": seg.name,
            "start_step": seg.start_step, "end_step": seg.end_step, "checkpoint": final.path,
            "curve": seg.curves_path, "tokens_trained": final.tokens_trained,
            "val": final.split("val"), "test": final.split("test")}


def _done(lineage: Lineage, paradigm: str, version: str, decay: Decay) -> dict | None:
    want = dataclasses.asdict(decay)
    return next((e for e in lineage.baselines(paradigm) if e["version"] == version and e["decay"] == want), None)


def _train_baselines(lineage: Lineage, ctx: RunContext, setting: str, decay: Decay) -> None:
    """PTFS and CPT releases of every version with one decay (resumable)."""
    cpt_prev = None
    for k, version in enumerate(ctx.versions):
        name = version["name"]
        ptfs = _done(lineage, "ptfs", name, decay)
        if ptfs is None:
            seg = ptfs_segment(ctx, k, decay)
            fit_segment(seg)
            ptfs = _entry(seg, name, setting, decay)
            lineage.record_baseline("ptfs", ptfs)
        cpt = _done(lineage, "cpt", name, decay)
        if cpt is None:
            if cpt_prev is None:
                cpt = {**ptfs, "reused_from": "ptfs"}  # release 1 is the same run either way
            else:
                seg = cpt_segment(ctx, k, cpt_prev, decay)
                fit_segment(seg)
                cpt = _entry(seg, name, setting, decay)
            lineage.record_baseline("cpt", cpt)
        cpt_prev = cpt


def replay_dir(run_dir: str | Path, ratio: float) -> Path:
    """Where path switching at replay ``ratio`` lies in the (local) run directory ``run_dir``."""
    return Path(run_dir) / "compare" / f"replay-{ratio:g}"


def replay_config(cfg: Config, ctx: RunContext, ratio: float) -> Config:
    """Path switching at another replay ratio: the same run on the run's own tokenizer (same
    tokens, same val and test blocks), in its own run directory inside the run's; for a remote
    run, its mirror inside the run's mirror."""
    sub = f"compare/replay-{ratio:g}"
    data = dataclasses.replace(cfg.data, replay_ratio=ratio, tokenizer=ctx.tokenizer_dir)
    if ctx.rd.mirror is None:
        return dataclasses.replace(cfg, name=f"{cfg.name}-replay{ratio:g}", run_dir=str(ctx.run_dir / sub), data=data)
    cluster = dataclasses.replace(cfg.cluster, local_dir=str(ctx.run_dir / sub))
    return dataclasses.replace(cfg, name=f"{cfg.name}-replay{ratio:g}", run_dir=f"{ctx.rd.uri}/{sub}",
                               data=data, cluster=cluster)


def replay_ratios(cfg: Config) -> list[float]:
    return sorted({r for r in cfg.compare.replay_ratios if not math.isclose(r, cfg.data.replay_ratio)})


def run_comparison(cfg: Config) -> dict[str, str]:
    """Train every row of the comparison (resumable), then write the table and plots."""
    lineage = run_lineage(cfg)  # path switching, and the prepared versions
    with writer_lock(lineage.rd, "compare"):  # its baselines and replay runs go into the lineage
        return _compare(cfg, lineage)


def _compare(cfg: Config, lineage: Lineage) -> dict[str, str]:
    """:func:`run_comparison` once the lineage is trained, holding its run directory's writer lock."""
    ctx = prepare(cfg)
    decays = baseline_decays(cfg)
    # the headline rows first, then replay, then the paper's rows: an interrupted comparison
    # has the most informative rows already
    _train_baselines(lineage, ctx, MATCHED, decays[MATCHED])
    for ratio in replay_ratios(cfg):
        log.info("compare: path switching with replay ratio %g", ratio)
        run_lineage(replay_config(cfg, ctx, ratio))
        lineage.record_replay_run(f"{ratio:g}", str(replay_dir(ctx.run_dir, ratio)))
    if PAPER in decays:
        log.info("compare: PTFS and CPT with the paper's cosine decay")
        _train_baselines(lineage, ctx, PAPER, decays[PAPER])
    paths = write_comparison(ctx.run_dir, lineage)
    for path in paths.values():
        ctx.rd.publish(path)
    return paths


# ---------------------------------------------------------------- results

def _mean(d: dict) -> float:
    return sum(d.values()) / len(d) if d else float("nan")


def _losses(version: str, val: dict, test: dict) -> dict:
    return {"val_own": val.get(f"val/{version}", float("nan")), "test_own": test.get(f"test/{version}", float("nan")),
            "val_mean": _mean(val), "test_mean": _mean(test)}


def _decay_text(d: dict) -> str:
    power = f"^{d['power']:g}" if d["shape"] in ("polynomial", "exponential") else ""
    return f"{d['shape']}{power}->{d['min_lr_ratio']:g}"


def _baseline_rows(lineage: Lineage, settings: dict[str, dict], versions: list[str]) -> dict[tuple[str, str], list[dict]]:
    """Per (paradigm, setting): one row per version in order, with cumulative tokens."""
    out = {}
    for paradigm in ("ptfs", "cpt"):
        for setting, decay in settings.items():
            cum, rows = 0, []
            entries = sorted((e for e in lineage.baselines(paradigm) if e["decay"] == decay),
                             key=lambda e: versions.index(e["version"]))
            for e in entries:
                cum += e["tokens_trained"]  # CPT's release 1 reuses PTFS's run and counts its tokens
                rows.append({"version": e["version"], "decay": _decay_text(e["decay"]), "tokens_cumulative": cum,
                             **_losses(e["version"], e["val"], e.get("test", {}))})
            out[(paradigm, setting)] = rows
    return out


def _path_switching_rows(lineage: Lineage, which: str = "configured") -> list[dict]:
    """One row per version of a lineage's path switching: its configured branches (``configured``,
    the shape-matched row) or its live releases (``released``, with the search they cost)."""
    costs = {c["version"]: c for c in lineage_costs(lineage)}
    rows, cum, cum_search = [], 0, 0
    for name in lineage.version_names():
        main, release = lineage.main(name), lineage.release(name)
        branch = lineage.branch(f"branch-{name}" if which == "configured" else (release.branch if release else ""))
        if main is None or branch is None or not branch.done or name not in costs:
            break
        cum += main.tokens + branch.tokens_trained
        cum_search += main.tokens + costs[name]["search_branch_tokens"]
        metrics = branch.metrics
        rows.append({"version": name, "decay": _decay_text(branch.decay), "tokens_cumulative": cum,
                     "tokens_cumulative_with_search": cum_search,
                     **_losses(name, {k: x for k, x in metrics.items() if k.startswith("val/")},
                               {k: x for k, x in metrics.items() if k.startswith("test/")})})
    return rows


def _released_differs(lineage: Lineage) -> bool:
    return any(r.branch != f"branch-{r.version}" for r in lineage.releases())


#: The columns of :func:`comparison_table`, in order.
COMPARISON_COLUMNS = ["version", "paradigm", "decay", "val_own", "test_own", "val_mean", "test_mean",
                      "tokens_cumulative", "cost_ratio", "cost_ratio_with_search", "gap_test_own", "gap_val_own"]


def comparison_table(run_dir: str | Path) -> pd.DataFrame:
    """One row per (version, paradigm): own-split and mean losses on val and test, cumulative
    tokens, cost over PTFS's (release only and with search), and the gap to PTFS on test.

    ``paradigm`` names the row: ``PTFS``, ``CPT``, ``PS`` (configured branches, shape-matched),
    ``PS released`` (when a sweep's trial is a live release), ``PS replay R``, and with
    ``compare.paper_baselines`` ``PTFS cosine (paper)`` / ``CPT cosine (paper)``. Rows start at
    the first version with a PTFS baseline: before ``raypath compare`` there are none, and the
    table is empty with its columns (:data:`COMPARISON_COLUMNS`).
    """
    lineage = Lineage.load(run_dir)
    cfg_branch = lineage.config["branch"]
    matched = dataclasses.asdict(decay_from(cfg_branch))
    settings = {MATCHED: matched}
    paper = dataclasses.asdict(Decay("cosine", cfg_branch["min_lr_ratio"]))
    if any(e["decay"] == paper for e in lineage.baselines("ptfs")) and paper != matched:
        settings[PAPER] = paper
    base = _baseline_rows(lineage, settings, lineage.version_names())
    groups: list[tuple[str, list[dict]]] = [("PTFS", base[("ptfs", MATCHED)]), ("CPT", base[("cpt", MATCHED)]),
                                            ("PS", _path_switching_rows(lineage))]
    if _released_differs(lineage):
        groups.append(("PS released", _path_switching_rows(lineage, "released")))
    for ratio, path in sorted(lineage.replay_runs().items(), key=lambda kv: float(kv[0])):
        if (Path(path) / "lineage.json").is_file():
            groups.append((f"PS replay {ratio}", _path_switching_rows(Lineage.load(path))))
    if PAPER in settings:
        groups += [("PTFS cosine (paper)", base[("ptfs", PAPER)]), ("CPT cosine (paper)", base[("cpt", PAPER)])]
    ptfs = {r["version"]: r for r in base[("ptfs", MATCHED)]}
    rows = []
    for v in lineage.version_names():
        if v not in ptfs:
            break
        for label, group in groups:
            r = next((r for r in group if r["version"] == v), None)
            if r is None:
                continue
            ref = ptfs[v]
            rows.append({"version": v, "paradigm": label, "decay": r["decay"],
                         **{k: r[k] for k in ("val_own", "test_own", "val_mean", "test_mean")},
                         "tokens_cumulative": r["tokens_cumulative"],
                         "cost_ratio": r["tokens_cumulative"] / ref["tokens_cumulative"],
                         "cost_ratio_with_search": r.get("tokens_cumulative_with_search", r["tokens_cumulative"])
                         / ref["tokens_cumulative"],
                         "gap_test_own": r["test_own"] - ref["test_own"],
                         "gap_val_own": r["val_own"] - ref["val_own"]})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def format_comparison(df: pd.DataFrame) -> str:
    """The table as aligned text: versions in blocks, the headline (shape-matched) rows first."""
    from raypath.report import _delta, _loss, _text_table

    headers = ["version", "paradigm", "decay", "val own", "test own", "val mean", "test mean", "cost/PTFS",
               "+search", "gap test own"]
    cells = [[r["version"], r["paradigm"], r["decay"], _loss(r["val_own"]), _loss(r["test_own"]),
              _loss(r["val_mean"]), _loss(r["test_mean"]), f"{r['cost_ratio']:.3f}",
              f"{r['cost_ratio_with_search']:.3f}", _delta(r["gap_test_own"])] for _, r in df.iterrows()]
    note = ("losses on each version's own split and the mean over the splits seen; gap = paradigm - PTFS "
            "on the held-out test split; cost = cumulative tokens / PTFS's, release only and with search")
    return note + "\n" + _text_table(headers, cells, "lll")


def _lr_paths(run_dir: Path, lineage: Lineage) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Per paradigm, its headline segments' curves in training order (x = tokens that paradigm trained)."""
    from raypath.report import read_curve

    def curve(seg_name: str) -> pd.DataFrame:
        return read_curve(run_dir / "curves" / f"{seg_name}.jsonl")

    matched = dataclasses.asdict(decay_from(lineage.config["branch"]))
    paths: dict[str, list[tuple[str, pd.DataFrame]]] = {p: [] for p in PARADIGMS}
    offset = 0
    for e in (e for e in lineage.baselines("ptfs") if e["decay"] == matched):
        df = curve(e["segment"]).assign(x=lambda d: d["tokens"] + offset)
        paths["ptfs"].append((e["version"], df))
        offset = int(df["x"].max()) if len(df) else offset
    for e in (e for e in lineage.baselines("cpt") if e["decay"] == matched):
        paths["cpt"].append((e["version"], curve(e["segment"]).assign(x=lambda d: d["tokens"])))
    for m in lineage.main_path():
        paths["path_switching"].append((m.version, curve(m.segment).assign(x=lambda d: d["tokens"])))
        br = lineage.branch(f"branch-{m.version}")
        if br:
            paths["path_switching"].append((f"{m.version} branch", curve(br.name).assign(
                x=lambda d: d["tokens"])))
    return paths


def plot_comparison(run_dir: Path, lineage: Lineage, df: pd.DataFrame, out_png: Path) -> None:
    fig = new_figure((10, 12))
    axes = fig.subplots(4, 1, gridspec_kw={"height_ratios": [1, 1, 1, 1.6]})
    for ax in axes[1:3]:  # one token axis: PTFS's re-training shows as its length
        ax.sharex(axes[0])
    titles = {"ptfs": "PTFS: from scratch on all data, per release (x: its tokens, cumulative)",
              "cpt": "CPT: continue from the last release, re-warm + decay (x: its tokens)",
              "path_switching": "Path switching: constant main path + decay branches "
                                "(x: main-path tokens; each branch's come on top)"}
    for ax, (paradigm, segments) in zip(axes, _lr_paths(run_dir, lineage).items()):
        for label, seg in segments:
            if len(seg):
                ax.plot(seg["x"], seg["lr"], lw=1.6, label=label)
        ax.set_title(titles[paradigm], fontsize=9)
        ax.set_ylabel("LR")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=4, loc="lower left")
    axes[2].set_xlabel("tokens")
    ax = axes[3]
    labels = list(dict.fromkeys(df["paradigm"]))
    versions = list(dict.fromkeys(df["version"]))
    metric = "test_own" if df["test_own"].notna().any() else "val_own"
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        sub = df[df["paradigm"] == label].set_index("version").reindex(versions)
        ax.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(versions))], sub[metric], width,
               label=label, hatch="//" if "paper" in label else None)
    ax.set_xticks(range(len(versions)), versions)
    ax.set_ylabel(f"{metric.replace('_', ' on ')} split")
    ax.set_ylim(float(df[metric].min()) * 0.95, None)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"released models per version ({metric.split('_')[0]} loss on the version's own split)",
                 fontsize=10)
    fig.suptitle(f"{lineage.name or 'raypath'}: PTFS vs CPT vs path switching (shape-matched)")
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110, tight=False)


def write_comparison(run_dir: str | Path, lineage: Lineage) -> dict[str, str]:
    out = Path(run_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    df = comparison_table(run_dir)
    atomic_write_bytes(out / "comparison.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(out / "comparison.txt", (format_comparison(df) + "\n").encode())
    plot_comparison(Path(run_dir), lineage, df, out / "comparison.png")
    return {"table": str(out / "comparison.csv"), "text": str(out / "comparison.txt"),
            "plot": str(out / "comparison.png")}
