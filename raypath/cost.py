"""Training cost of releasing N versions: PTFS vs CPT vs path switching, in tokens.

With new data ``D_k`` per version, branch fraction ``f`` and replay ratio ``r``
(share of each update's stream taken from older versions, none for version 1):

* PTFS trains release k from scratch on all data so far: ``sum_{j<=k} D_j``.
* CPT trains each release once on its stream: ``S_k = D_k / (1 - r)`` (``D_1`` for k = 1).
* Path switching trains the main path on the same streams plus one branch per
  release re-training the last ``f`` of it with a decaying LR: ``(1 + f) * S_k``.

Ratios are cumulative cost over cumulative PTFS cost: what the whole lineage
has cost so far relative to re-training from scratch at every release.

A run's measured cost comes two ways wherever a sweep searched a version's branch:
*release only* counts the released branch, *with search* every branch trained for
the version (the configured one and every sweep trial, stopped ones up to where
they stopped). The search is real compute; the first figure alone would hide it.
"""

from __future__ import annotations

from typing import Sequence

from raypath.lineage import Lineage, Sweep


def stream_tokens(new_tokens: Sequence[float], replay_ratio: float = 0.0) -> list[float]:
    return [d if k == 0 else d / (1.0 - replay_ratio) for k, d in enumerate(new_tokens)]


def paradigm_costs(new_tokens: Sequence[float], branch_fraction: float,
                   replay_ratio: float = 0.0) -> list[dict[str, float]]:
    """One row per version: per-release and cumulative tokens of each paradigm."""
    if not 0.0 < branch_fraction < 1.0:
        raise ValueError(f"branch_fraction must be in (0, 1), got {branch_fraction}")
    if not 0.0 <= replay_ratio < 1.0:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
    streams = stream_tokens(new_tokens, replay_ratio)
    rows, seen, cum = [], 0.0, {"ptfs": 0.0, "cpt": 0.0, "path_switching": 0.0}
    for k, (d, s) in enumerate(zip(new_tokens, streams)):
        seen += d
        release = {"ptfs": seen, "cpt": s, "path_switching": (1.0 + branch_fraction) * s}
        for key, v in release.items():
            cum[key] += v
        rows.append({
            "version": k + 1, "new_tokens": d,
            **{f"{key}_tokens": v for key, v in release.items()},
            **{f"{key}_cumulative": v for key, v in cum.items()},
            "cpt_ratio": cum["cpt"] / cum["ptfs"],
            "path_switching_ratio": cum["path_switching"] / cum["ptfs"],
        })
    return rows


def branch_tokens(lineage: Lineage | dict, version: str) -> tuple[float, float]:
    """``(release only, with search)`` branch tokens of ``version``.

    Release only: the live release's branch (else the finished configured branch).
    With search: the finished branches that are no sweep trial, plus every trial of every
    sweep of the version (a released trial is counted once, as a trial).
    """
    lineage = Lineage.of(lineage)
    configured = [b for b in lineage.branches(version) if not b.sweep]
    release = lineage.release(version)
    released = release.branch_tokens if release else None
    if released is None:
        released = next((b.tokens_trained for b in configured), 0)
    searched = sum(b.tokens_trained for b in configured) + sum(_search_tokens(lineage, s) for s in
                                                              lineage.sweep_summaries(version))
    return float(released), float(max(searched, released))


def _search_tokens(lineage: Lineage, sweep: Sweep) -> int:
    """Tokens the sweep's trials trained: its trials' where the record holds them, else its
    summary's ``search_tokens`` (done and stopped trials, the only ones with tokens). The summary
    spares ``raypath cost`` reading every sweep's results.json, whose trials each hold a loss
    per version so far: bytes quadratic in the versions, for one number per sweep."""
    if not sweep.trials and "search_tokens" in sweep.to_dict():
        return sweep.search_tokens
    full = sweep if sweep.trials else lineage.sweep(sweep.version, sweep.name)
    return sum(t.branch_tokens or 0 for t in (full.trials if full else []))


def ptfs_tokens(lineage: Lineage, blocks: int) -> float | None:
    """Tokens a from-scratch run trains on ``blocks`` packed blocks, counted as the main path and
    branches count theirs (and as ``raypath compare`` trains PTFS): whole global batches of
    ``seq_len`` predicted tokens per block. None without the config's batch and sequence length."""
    seq_len = lineage.config.get("data", {}).get("seq_len")
    batch = lineage.config.get("train", {}).get("global_batch_size")
    return float(blocks // batch * batch * seq_len) if seq_len and batch and blocks else None


def planned_tokens(lineage: Lineage | dict) -> list[float]:
    """Each version's new tokens as training counts them (``seq_len`` a block), so the planned
    table reads in the measured table's units; a version's ``new_tokens`` are its blocks' stored
    tokens (``seq_len + 1`` each). Without a recorded ``seq_len``, the stored ones."""
    lineage = Lineage.of(lineage)
    seq_len = lineage.config.get("data", {}).get("seq_len")
    return [float(v.new_blocks * seq_len) if seq_len and v.new_blocks else float(v.new_tokens)
            for v in lineage.versions()]


def lineage_costs(lineage: Lineage | dict) -> list[dict[str, float]]:
    """Measured cost of a run: tokens its main path and branches actually trained, release
    only and with every searched branch, over what PTFS would train."""
    lineage = Lineage.of(lineage)
    ptfs_cum = ps_cum = search_cum = seen = 0.0
    blocks = 0
    rows = []
    for v in lineage.versions():
        main = lineage.main(v.name)
        if main is None:
            break  # versions are trained in order; the rest has not run yet
        # A version's new_tokens are its blocks' stored tokens (seq_len + 1 each, inputs and
        # targets overlapping by all but one): not what training one of them counts.
        seen += v.new_tokens
        blocks += v.new_blocks
        released, searched = branch_tokens(lineage, v.name)
        ptfs_cum += ptfs_tokens(lineage, blocks) or seen
        ps_cum += main.tokens + released
        search_cum += main.tokens + searched
        rows.append({"version": v.name, "main_tokens": main.tokens, "branch_tokens": released,
                     "search_branch_tokens": searched, "ptfs_cumulative": ptfs_cum,
                     "path_switching_cumulative": ps_cum, "path_switching_ratio": ps_cum / ptfs_cum,
                     "with_search_cumulative": search_cum, "with_search_ratio": search_cum / ptfs_cum})
    return rows


def format_costs(rows: list[dict[str, float]]) -> str:
    head = f"{'version':>7} {'new':>10} {'PTFS cum':>12} {'CPT cum':>12} {'PS cum':>12} {'CPT/PTFS':>9} {'PS/PTFS':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['version']:>7} {r['new_tokens']:>10.4g} {r['ptfs_cumulative']:>12.4g} "
                     f"{r['cpt_cumulative']:>12.4g} {r['path_switching_cumulative']:>12.4g} "
                     f"{r['cpt_ratio']:>9.3f} {r['path_switching_ratio']:>8.3f}")
    return "\n".join(lines)


def format_measured(rows: list[dict[str, float]]) -> str:
    """:func:`lineage_costs` as ``raypath cost RUN_DIR`` prints it. The ratios are cumulative: a
    version after a swept one still costs its search, so "with search" shows wherever the two
    ratios differ; its ``branches`` only where this version's own sweeps trained more."""
    lines = []
    for r in rows:
        search = ""
        if abs(r["with_search_ratio"] - r["path_switching_ratio"]) > 1e-12:
            own = "" if r["search_branch_tokens"] == r["branch_tokens"] else \
                f"branches {r['search_branch_tokens']:.4g} "
            search = f"; with search: {own}-> {r['with_search_ratio']:.3f}"
        lines.append(f"  {r['version']}: main {r['main_tokens']:.4g} + branch {r['branch_tokens']:.4g}"
                     f" -> path switching / PTFS = {r['path_switching_ratio']:.3f} (release only){search}")
    return "\n".join(lines)
