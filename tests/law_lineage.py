"""A synthetic lineage for the law's tests: ``lineage.json`` and ``curves/*.jsonl`` as a run
writes them, with validation losses drawn from a known multi-shift CPT law.

The losses are computed here with plain numpy, independently of :mod:`raypath.law`'s feature
code, so a fit recovering them checks the law's implementation too. Nothing trains: a
4-version lineage is written in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from raypath.law import areas
from raypath.lawfit import branch_history
from raypath.schedules import Decay, MainPath

MAX_LR = 3e-3
WARMUP = 20
SEGMENT = 200  # steps per version
EVAL_EVERY = 10
LAM = 0.99
#: Law parameters per split role (raw units). B_i: the shift at the split's i-th boundary.
TRUTH = {"L0": 2.0, "A": 1.2, "alpha": 0.45, "C1": 4.0, "C2": 3.0, "E": 8.0, "beta": 0.8}
#: Forward area at which a stability gap peaks (``gaps`` of :func:`write_lineage`): 20 steps at MAX_LR.
GAP_P = 20 * MAX_LR
#: Shift amplitude of an old split at its first, second, third later boundary, and of the new split.
OLD_B = (0.35, 0.25, 0.2)
NEW_B = -0.4
#: Release branch (20%, 1-sqrt to 0) and a second branch per version (40%, cosine to 0.1).
BRANCHES = (("rel", 0.2, Decay("1-sqrt", 0.0, 2.0)), ("alt", 0.4, Decay("cosine", 0.1, 2.0)))


def boundaries(split: int, release: int) -> list[int]:
    """Data switches a split sees when ``release`` (1-based) is released: the new split's own
    start; an old split's end of its version and of every later one before the release."""
    if split == release:
        return [(split - 1) * SEGMENT]
    return [v * SEGMENT for v in range(split, release)]


def true_loss(lrs: np.ndarray, steps: np.ndarray, bounds: list[int], amps: list[float],
              lam: float = LAM, drifts: Sequence[float] = (), gaps: Sequence[float] = (),
              entry: int = 0) -> np.ndarray:
    """``L0 + A*S1^-alpha - C1*S2pt - C2*S2cpt + sum_i B_i*(1-(1+E*S1_i)^-beta) + D_i*S1_i
    + G_i*u_i*exp(1-u_i)``, ``u_i = S1_i/GAP_P``: "pt" before the first boundary, S1_i the
    forward area since the i-th boundary (a boundary at 0 is no switch: the whole history is
    pre-training), D_i from ``drifts`` and G_i from ``gaps`` (0 beyond); with ``entry > 0``
    one more shift term of amplitude :data:`NEW_B` over the forward area since that step
    (the split's own data entering, the term it had as the new split)."""
    p = TRUTH
    s1, s2 = areas(lrs, lam=lam)
    first = bounds[0]
    s2pt = s2[np.minimum(steps, first - 1)] if first > 0 else s2[steps]
    loss = p["L0"] + p["A"] * s1[steps] ** -p["alpha"] - p["C1"] * s2pt - p["C2"] * (s2[steps] - s2pt)
    drifts = list(drifts) + [0.0] * (len(bounds) - len(drifts))
    gaps = list(gaps) + [0.0] * (len(bounds) - len(gaps))
    if entry > 0:  # no drift and no gap of its own: appended after the zips' last boundary
        since = np.where(steps >= entry, s1[steps] - s1[entry - 1], 0.0)
        loss = loss + NEW_B * (1.0 - (1.0 + p["E"] * since) ** -p["beta"])
    for b, amp, drift, gap in zip(bounds, amps, drifts, gaps):
        if 0 < b <= len(lrs):  # a history that ends before the boundary never sees it
            since = np.where(steps >= b, s1[steps] - s1[b - 1], 0.0)
            u = since / GAP_P
            loss = (loss + amp * (1.0 - (1.0 + p["E"] * since) ** -p["beta"]) + drift * since
                    + gap * u * np.exp(1.0 - u))
    return loss


def _amps(split: int, release: int) -> list[float]:
    return [NEW_B] if split == release else list(OLD_B[: release - split])


def write_lineage(root: Path, n_versions: int, *, noise: float = 1e-3, seed: int = 0,
                  shifts: str = "multi", drift: Sequence[float] = (),
                  gap: Sequence[float] = (), entry: bool = False) -> tuple[Path, dict]:
    """Write a synthetic ``n_versions`` lineage under ``root``; returns ``(run_dir, lineage)``.

    shifts: ``multi`` -- every later boundary adds its own shift (the truth the multi-shift law
    describes); ``single`` -- an old split only shifts once, at the end of its own version (the
    truth of the single-shift law). drift: an old split's linear drift ``D_i`` per forward area
    since its i-th boundary (forgetting that grows, or recovers when negative; none by
    default). gap: an old split's stability gap ``G_i`` per boundary (an overshoot peaking
    :data:`GAP_P` of forward area after it; none by default). entry: an old split that
    entered after step 0 keeps the shift term it had as the new split (:data:`NEW_B` since
    its own start); by default its loss follows the power law alone up to its first switch.
    noise: relative Gaussian noise on every observed loss.
    """
    rng = np.random.default_rng(seed)
    run_dir = root / "run"
    (run_dir / "curves").mkdir(parents=True, exist_ok=True)
    main = MainPath(MAX_LR, WARMUP)
    names = [f"v{i}" for i in range(1, n_versions + 1)]
    total = n_versions * SEGMENT
    main_lr = np.full(total, MAX_LR)

    # Every curve is drawn as the last release sees it, so one law describes each split exactly
    # when the lineage is fitted for releasing its last version.
    def losses(lrs, steps, split):
        bounds = boundaries(split, n_versions)
        amps = _amps(split, n_versions)
        drifts = () if split == n_versions else drift[: n_versions - split]
        gaps = () if split == n_versions else gap[: n_versions - split]
        if shifts == "single":
            bounds, amps, drifts, gaps = bounds[:1], amps[:1], drifts[:1], gaps[:1]
        start = (split - 1) * SEGMENT if entry and split < n_versions else 0
        clean = true_loss(lrs, steps, bounds, amps, drifts=drifts, gaps=gaps, entry=start)
        return clean * (1.0 + noise * rng.standard_normal(len(steps)))

    mains, branches = [], []
    for k, name in enumerate(names, 1):
        start, end = (k - 1) * SEGMENT, k * SEGMENT
        rec_steps = np.arange(start + EVAL_EVERY, end + 1, EVAL_EVERY)
        rows = {int(s): {"step": int(s)} for s in rec_steps}
        for split in range(1, k + 1):
            obs = rec_steps[rec_steps > (split - 1) * SEGMENT]
            for s, v in zip(obs, losses(main_lr, obs - 1, split)):
                rows[int(s)][f"val/v{split}"] = float(v)
        _write_curve(run_dir, f"main-{name}", rows.values())
        mains.append({"version": name, "segment": f"main-{name}", "start_step": start, "end_step": end,
                      "max_lr": MAX_LR, "warmup_steps": WARMUP,
                      "curve": str(run_dir / "curves" / f"main-{name}.jsonl")})
        for tag, fraction, decay in BRANCHES:
            steps = int(round(fraction * SEGMENT))
            fork = end - steps
            bname = f"branch-{name}" if tag == "rel" else f"branch-{name}-{tag}"
            lrs = branch_history(main, fork, steps, decay).full()
            rec = np.unique(np.append(np.arange(fork + EVAL_EVERY, end + 1, EVAL_EVERY), end))
            brows = {int(s): {"step": int(s)} for s in rec}
            metrics = {}
            for split in range(1, k + 1):
                vals = losses(lrs, rec - 1, split)
                for s, v in zip(rec, vals):
                    brows[int(s)][f"val/v{split}"] = float(v)
                metrics[f"val/v{split}"] = float(vals[-1])
            _write_curve(run_dir, bname, brows.values())
            branches.append({"name": bname, "version": name, "fork_step": fork, "steps": steps,
                             "decay": {"shape": decay.shape, "min_lr_ratio": decay.min_lr_ratio,
                                       "power": decay.power},
                             "curve": str(run_dir / "curves" / f"{bname}.jsonl"), "status": "done",
                             "metrics": metrics})
    lineage = {"format": 2, "name": "synthetic", "versions": [{"name": n} for n in names], "main_path": mains,
               "branches": branches, "config": {"run_dir": str(run_dir)}}
    (run_dir / "lineage.json").write_text(json.dumps(lineage, indent=1))
    assert total == mains[-1]["end_step"]
    return run_dir, lineage


def _write_curve(run_dir: Path, name: str, rows) -> None:
    lines = [json.dumps(r) for r in rows]
    (run_dir / "curves" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def write_run(root: Path, versions: int, *, trials: int = 0, releases: int = 1) -> Path:
    """A run directory as ``raypath run`` and ``raypath sweep`` leave it after ``versions``
    versions, on :func:`write_lineage`'s lineage: the config, each version's record, curves
    with train loss, LR and tokens, per version ``releases`` release ids (``releases/vK/rN``,
    ``current.json``) and, with ``trials``, a finished sweep (``sweeps/vK/s/results.json`` and
    ``standing.json``,
    every trial a copy of the release branch a little better or worse, with its own curve);
    the lineage in format 3 (the sweeps' summaries). Returns the run directory."""
    from raypath.config import Config
    from raypath.releases import objective_weights
    from raypath.storage import write_json

    try:
        from raypath.releases import STANDING_JSON, standing_record
    except ImportError:  # an older raypath (benchmarks/long_run.py's "before") writes none
        standing_record = None

    run_dir, lin = write_lineage(root, versions)
    tokens_per_step = 16 * 128
    cfg = Config(run_dir=str(run_dir)).to_dict()
    lin["config"] = cfg
    lin["versions"] = [{"name": f"v{k + 1}", "index": k, "new_tokens": 200 * tokens_per_step,
                        "new_blocks": 200 * 16, "stream_rows": 200 * 16, "val_blocks": 64, "test_blocks": 64,
                        "files": {"train": 10, "val": 2}} for k in range(versions)]
    for m in lin["main_path"]:
        m.update(tokens_start=m["start_step"] * tokens_per_step, tokens_end=m["end_step"] * tokens_per_step,
                 fork_step=m["end_step"] - 40, metrics={}, checkpoints={})
    _add_train_columns(run_dir, lin, tokens_per_step)
    for b in lin["branches"]:
        b.update(end_step=b["fork_step"] + b["steps"], tokens_trained=b["steps"] * tokens_per_step,
                 tokens_total=(b["fork_step"] + b["steps"]) * tokens_per_step)
    lin["sweeps"], lin["releases"], lin["release_history"] = [], [], {}
    for k in range(versions):
        name = f"v{k + 1}"
        rel = next(b for b in lin["branches"] if b["name"] == f"branch-{name}")
        sweep = _sweep(run_dir, name, k, trials, rel, tokens_per_step) if trials else None
        if sweep is not None:
            sweep["objective_weights"] = objective_weights([v["name"] for v in lin["versions"]], k,
                                                           cfg["sweep"]["weights"])
            if standing_record is not None:
                write_json(Path(sweep["path"]) / STANDING_JSON, standing_record(sweep), root=run_dir)
            write_json(Path(sweep["path"]) / "results.json", sweep, root=run_dir)
            lin["sweeps"].append({k2: v for k2, v in sweep.items() if k2 != "trials"} | {"n_trials": trials})
        _releases(run_dir, lin, name, k, releases, rel, sweep)
    lin["format"] = 3
    write_json(run_dir / "lineage.json", lin, root=run_dir)
    return run_dir


def _add_train_columns(run_dir: Path, lin: dict, tokens_per_step: int) -> None:
    """The curves of ``law_lineage`` hold val losses only; a run's also log loss, lr, tokens."""
    for entry in lin["main_path"] + lin["branches"]:
        path = Path(entry["curve"])
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.update(loss=3.0 - 1e-4 * r["step"], lr=1e-3, tokens=r["step"] * tokens_per_step)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sweep(run_dir: Path, name: str, k: int, trials: int, rel: dict, tps: int) -> dict:
    """Version ``name``'s finished sweep: every trial a copy of the release branch, a little
    longer or shorter (its curve under the sweep directory), as ``raypath.sweep`` records it."""
    sweep_dir = run_dir / "sweeps" / name / "s"
    (sweep_dir / "curves").mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(rel["curve"]).read_text().splitlines()]
    out = []
    for i in range(trials):
        tid = f"t{i:04d}"
        tname = f"branch-{name}-{tid}"
        scale = 1.0 + 1e-4 * ((i * 37) % 101 - 50)
        curve = sweep_dir / "curves" / f"{tname}.jsonl"
        curve.write_text("".join(json.dumps({key: v * scale if key.startswith("val/") else v
                                             for key, v in r.items()}) + "\n" for r in rows))
        metrics = {key: v * scale for key, v in rel["metrics"].items()}
        metrics.update({key.replace("val/", "test/"): v for key, v in metrics.items()})
        obj = sum(v for key, v in metrics.items() if key.startswith("val/")) / (k + 1)
        out.append({"trial_id": tid, "name": tname, "status": "done",
                    "config": {"fork_step": rel["fork_step"], "branch_steps": rel["steps"], "shape": "1-sqrt",
                               "min_lr_ratio": 0.0, "power": 2.0},
                    "metrics": metrics, "objective": obj, "test_objective": obj, "score": obj,
                    "branch_tokens": rel["steps"] * tps, "curve": str(curve),
                    "export": str(sweep_dir / "exports" / tname), "trial_dir": str(sweep_dir / "ray" / tid)})
    best = min(out, key=lambda t: t["score"])
    return {"name": "s", "version": name, "version_index": k, "path": str(sweep_dir), "best": best["trial_id"],
            "released": best["trial_id"], "complete": True, "search_tokens": trials * rel["steps"] * tps,
            "trials": out}


def _releases(run_dir: Path, lin: dict, name: str, k: int, n: int, rel: dict, sweep: dict | None) -> None:
    """``n`` releases of version ``name``, every second one the sweep's best trial."""
    from raypath.storage import write_json

    vdir = run_dir / "releases" / name
    entries, log = [], []
    best = next((t for t in sweep["trials"] if t["trial_id"] == sweep["best"]), None) if sweep else None
    for j in range(1, n + 1):
        rid = f"r{j}"
        src = best if (best is not None and j % 2 == 0) else None
        branch = src["name"] if src else rel["name"]
        metrics = src["metrics"] if src else rel["metrics"]
        val = {key: v for key, v in metrics.items() if key.startswith("val/")}
        entries.append({"id": rid, "version": name, "version_index": k, "path": str(vdir / rid), "branch": branch,
                        "reason": "sweep best" if src else "configured", "source": "sweep s" if src else "configured",
                        "sweep": sweep["path"] if src else None, "trial_id": src["trial_id"] if src else None,
                        "objective": sum(val.values()) / len(val), "val": val, "test": {},
                        "objective_weights": {}, "branch_tokens": rel["tokens_trained"],
                        "tokens_total": rel["tokens_total"], "candidates": 1, "beat": 0,
                        "replaced": f"r{j - 1}" if j > 1 else None, "released": "2026-12-01T00:00:00+00:00"})
        log.append({"time": "2026-12-01T00:00:00+00:00", "release": rid, "action": "release",
                    "reason": entries[-1]["reason"], "replaced": entries[-1]["replaced"]})
        (vdir / rid).mkdir(parents=True, exist_ok=True)
    live = entries[-1]
    write_json(vdir / "current.json", {"release": live["id"], "pinned": False, "switched": live["released"]})
    os.symlink(live["id"], vdir / "current")
    lin["release_history"][name] = {"current": live["id"], "pinned": False, "releases": entries, "log": log}
    lin["releases"].append({**live, "release": live["id"], "pinned": False})
