"""Does path switching pay? PTFS vs CPT vs path switching on the same data.

Trains the same versions three ways, on the same model config, the same
prepared blocks and the same peak LR (arXiv 2410.04103, figure 1):

* **PTFS**: release k is trained from scratch on all data so far (a seeded
  permutation of the new blocks of versions 1..k), warmup + cosine to the floor.
* **CPT**: release k continues from release k-1 (weights and optimizer) on
  version k's stream (with its replay), re-warming from the previous floor to
  the peak, then cosine to the floor. CPT's release 1 *is* PTFS's release 1.
* **Path switching**: the lineage itself (:func:`raypath.run.run`): main path +
  one decay branch per version.

Results land in the lineage (``lineage["compare"]``) and in
``RUN_DIR/compare/`` as CSV + PNG (LR paths of the three paradigms and the
released models' losses per version).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from raypath import checkpoint as ckpt
from raypath.config import Config
from raypath.data import union_stream
from raypath.lineage import Lineage
from raypath.loop import Segment, fit_segment
from raypath.mirror import require_local
from raypath.run import RunContext, prepare
from raypath.run import run as run_lineage
from raypath.schedules import Cosine
from raypath.storage import atomic_write_bytes, save_figure

log = logging.getLogger(__name__)

PARADIGMS = ("ptfs", "cpt", "path_switching")


def _cosine(ctx: RunContext, steps: int, start_step: int = 0, warmup_from: float = 0.0) -> Cosine:
    t, b = ctx.cfg.train, ctx.cfg.branch
    return Cosine(t.max_lr, t.warmup_steps, steps, start_step, b.min_lr_ratio, warmup_from)


def ptfs_segment(ctx: RunContext, k: int) -> Segment:
    """Release k from scratch on all data of versions 1..k."""
    version = ctx.versions[k]
    stream = union_stream(ctx.versions, k, ctx.run_dir / "data" / f"ptfs-{version['name']}" / "stream",
                          ctx.cfg.data.seed, ctx.mirror)
    steps = stream["stream_rows"] // ctx.cfg.train.global_batch_size
    return Segment(**ctx.segment_fields(f"ptfs-{version['name']}"), kind="ptfs", version=f"ptfs-{version['name']}",
                   stream_path=stream["stream_path"], start_step=0, end_step=steps,
                   schedule=_cosine(ctx, steps), val_paths=ctx.val_paths(k),
                   stream_limit=steps * ctx.cfg.train.global_batch_size)


def cpt_segment(ctx: RunContext, k: int, prev: dict) -> Segment:
    """Release k continued from release k-1 on version k's stream (re-warm + cosine)."""
    version = ctx.versions[k]
    steps = version["stream_rows"] // ctx.cfg.train.global_batch_size
    floor = ctx.cfg.branch.min_lr_ratio * ctx.cfg.train.max_lr
    return Segment(**ctx.segment_fields(f"cpt-{version['name']}"), kind="cpt", version=version["name"],
                   stream_path=version["stream_path"], start_step=prev["end_step"],
                   end_step=prev["end_step"] + steps,
                   schedule=_cosine(ctx, steps, prev["end_step"], warmup_from=floor),
                   init_checkpoint=prev["checkpoint"], val_paths=ctx.val_paths(k),
                   stream_limit=steps * ctx.cfg.train.global_batch_size)


def _entry(seg: Segment, version: str, start_tokens: int) -> dict:
    final = Path(seg.storage) / ckpt.step_dir_name(seg.end_step)
    ckpt.verify(final)
    state = ckpt.load_state(final)
    return {"version": version, "segment": seg.name, "start_step": seg.start_step, "end_step": seg.end_step,
            "checkpoint": str(final), "curve": seg.curves_path, "tokens_trained": state["tokens"] - start_tokens,
            "val": {k: v for k, v in state["metrics"].items() if k.startswith("val/")}}


def _record(lineage: Lineage, paradigm: str, entry: dict) -> None:
    results = lineage.data.setdefault("compare", {"ptfs": [], "cpt": []})
    results[paradigm] = [e for e in results[paradigm] if e["version"] != entry["version"]] + [entry]
    lineage.save()


def _done(lineage: Lineage, paradigm: str, version: str) -> dict | None:
    return next((e for e in lineage.data.get("compare", {}).get(paradigm, []) if e["version"] == version), None)


def run_comparison(cfg: Config) -> dict[str, str]:
    """Train all three paradigms (resumable), then write the table and plots."""
    require_local(cfg.run_dir, "compare")
    lineage = run_lineage(cfg)  # path switching, and the prepared versions
    ctx = prepare(cfg)
    cpt_prev = None
    for k, version in enumerate(ctx.versions):
        name = version["name"]
        ptfs = _done(lineage, "ptfs", name)
        if ptfs is None:
            seg = ptfs_segment(ctx, k)
            fit_segment(seg)
            ptfs = _entry(seg, name, 0)
            _record(lineage, "ptfs", ptfs)
        cpt = _done(lineage, "cpt", name)
        if cpt is None:
            if cpt_prev is None:
                cpt = {**ptfs, "reused_from": "ptfs"}  # release 1 is the same run either way
            else:
                seg = cpt_segment(ctx, k, cpt_prev)
                fit_segment(seg)
                cpt = _entry(seg, name, ckpt.load_state(cpt_prev["checkpoint"])["tokens"])
            _record(lineage, "cpt", cpt)
        cpt_prev = cpt
    return write_comparison(ctx.run_dir, lineage.data)


# ---------------------------------------------------------------- results

def comparison_table(lineage: dict) -> pd.DataFrame:
    """One row per version: own-split and mean val loss per paradigm, cumulative tokens, ratios."""
    releases = {r["version"]: r for r in lineage["releases"]}
    branches = {b["version"]: b for b in lineage["branches"] if b.get("status") == "done"}
    mains = {m["version"]: m for m in lineage["main_path"]}
    results = lineage.get("compare", {})
    rows, cum = [], dict.fromkeys(PARADIGMS, 0)
    for v in lineage["versions"]:
        name = v["name"]
        ptfs = next((e for e in results.get("ptfs", []) if e["version"] == name), None)
        cpt = next((e for e in results.get("cpt", []) if e["version"] == name), None)
        if ptfs is None or cpt is None or name not in releases:
            break
        ps_tokens = mains[name]["tokens_end"] - mains[name]["tokens_start"] + branches[name]["tokens_trained"]
        cum["ptfs"] += ptfs["tokens_trained"]
        cum["cpt"] += cpt["tokens_trained"]  # release 1 reuses PTFS's run and counts its tokens
        cum["path_switching"] += ps_tokens
        row = {"version": name}
        for paradigm, val in (("ptfs", ptfs["val"]), ("cpt", cpt["val"]), ("path_switching", releases[name]["val"])):
            row[f"{paradigm}_val_own"] = val[f"val/{name}"]
            row[f"{paradigm}_val_mean"] = sum(val.values()) / len(val)
            row[f"{paradigm}_tokens_cumulative"] = cum[paradigm]
        for paradigm in ("cpt", "path_switching"):
            row[f"{paradigm}_cost_ratio"] = cum[paradigm] / cum["ptfs"]
            row[f"{paradigm}_gap_own"] = row[f"{paradigm}_val_own"] - row["ptfs_val_own"]
        rows.append(row)
    return pd.DataFrame(rows)


def format_comparison(df: pd.DataFrame) -> str:
    head = (f"{'version':>7} | {'val loss on own split':^26} | {'mean val loss (splits seen)':^26} | "
            f"{'cost / PTFS':^13} | {'gap to PTFS':^15}")
    sub = (f"{'':>7} | {'PTFS':>8} {'CPT':>8} {'PS':>8} | {'PTFS':>8} {'CPT':>8} {'PS':>8} | "
           f"{'CPT':>6} {'PS':>6} | {'CPT':>7} {'PS':>7}")
    lines = [head, sub]
    for _, r in df.iterrows():
        lines.append(
            f"{r['version']:>7} | {r['ptfs_val_own']:8.3f} {r['cpt_val_own']:8.3f} {r['path_switching_val_own']:8.3f} | "
            f"{r['ptfs_val_mean']:8.3f} {r['cpt_val_mean']:8.3f} {r['path_switching_val_mean']:8.3f} | "
            f"{r['cpt_cost_ratio']:6.3f} {r['path_switching_cost_ratio']:6.3f} | "
            f"{r['cpt_gap_own']:+7.3f} {r['path_switching_gap_own']:+7.3f}")
    return "\n".join(lines)


def _lr_paths(run_dir: Path, lineage: dict) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Per paradigm, its segments' curves in training order (x = tokens that paradigm trained)."""
    from raypath.report import read_curve

    def curve(seg_name: str) -> pd.DataFrame:
        return read_curve(run_dir / "curves" / f"{seg_name}.jsonl")

    results = lineage.get("compare", {})
    paths: dict[str, list[tuple[str, pd.DataFrame]]] = {p: [] for p in PARADIGMS}
    offset = 0
    for e in results.get("ptfs", []):
        df = curve(e["segment"]).assign(x=lambda d: d["tokens"] + offset)
        paths["ptfs"].append((e["version"], df))
        offset = int(df["x"].max()) if len(df) else offset
    for e in results.get("cpt", []):
        paths["cpt"].append((e["version"], curve(e["segment"]).assign(x=lambda d: d["tokens"])))
    extra = 0
    for m in lineage["main_path"]:
        paths["path_switching"].append((m["version"], curve(m["segment"]).assign(x=lambda d: d["tokens"] + extra)))
        b = next((b for b in lineage["branches"] if b["version"] == m["version"]), None)
        if b:
            paths["path_switching"].append((f"{m['version']} branch", curve(b["name"]).assign(
                x=lambda d: d["tokens"] + extra)))
    return paths


def plot_comparison(run_dir: Path, lineage: dict, df: pd.DataFrame, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), gridspec_kw={"height_ratios": [1, 1, 1, 1.4]})
    titles = {"ptfs": "PTFS: from scratch on all data, per release",
              "cpt": "CPT: continue from the last release, re-warm + cosine",
              "path_switching": "Path switching: constant main path + decay branches"}
    for ax, (paradigm, segments) in zip(axes, _lr_paths(run_dir, lineage).items()):
        for label, seg in segments:
            if len(seg):
                ax.plot(seg["x"], seg["lr"], lw=1.6, label=label)
        ax.set_title(titles[paradigm], fontsize=10)
        ax.set_ylabel("LR")
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("tokens trained by the paradigm (cumulative)")
    ax = axes[3]
    x = range(len(df))
    width = 0.27
    for i, (paradigm, label) in enumerate((("ptfs", "PTFS"), ("cpt", "CPT"), ("path_switching", "path switching"))):
        ax.bar([j + (i - 1) * width for j in x], df[f"{paradigm}_val_own"], width, label=label)
    ax.set_xticks(list(x), df["version"])
    ax.set_ylabel("val loss on the version's own split")
    lo = float(df[[f"{p}_val_own" for p in PARADIGMS]].min().min())
    ax.set_ylim(lo * 0.95, None)
    ax.legend(fontsize=8)
    ax.set_title("released models per version", fontsize=10)
    fig.suptitle(f"{lineage.get('name', 'raypath')}: PTFS vs CPT vs path switching")
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110, tight=False)
    plt.close(fig)


def write_comparison(run_dir: str | Path, lineage: dict) -> dict[str, str]:
    out = Path(run_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    df = comparison_table(lineage)
    atomic_write_bytes(out / "comparison.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(out / "comparison.txt", (format_comparison(df) + "\n").encode())
    plot_comparison(Path(run_dir), lineage, df, out / "comparison.png")
    return {"table": str(out / "comparison.csv"), "text": str(out / "comparison.txt"),
            "plot": str(out / "comparison.png")}
