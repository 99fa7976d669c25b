"""A full checkpoint's save and its verification: what hashing every file costs.

A full (DDP) checkpoint is ``model.pt``, ``optim.pt`` (AdamW's two moments: twice the
weights), ``rng.pt`` and ``state.json``; ``raypath.checkpoint.save`` hashes every file for the
manifest, and every resume and export hashes them again (``verify``). This builds ``--params``
fp32 parameters' worth of weights and AdamW moments (random tensors of the shapes of a
``--layers``-layer model), then times ``save``, ``verify(deep=True)`` and
``raypath.segment.final_checkpoint`` (what recording a finished segment reads of it: a sweep's
end does it once per trial), a worker's resume from it (``latest_valid``, then ``load``), the
Train controller's choice of it for its dataset (``resume_point(seg, hashed=False)``: the data
position) and the driver's check of Ray's checkpoint snapshot naming it
(``drop_stale_ray_snapshot``, at every segment start, for every checkpoint the segment kept)
(median of ``--repeats``; the files stay in the page cache, so the numbers are hashing and
writing, not the disk).

    python benchmarks/checkpoint_hash.py --params 125e6
    PYTHONPATH=/path/to/checkout python benchmarks/checkpoint_hash.py --params 125e6   # another raypath
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def synthetic_state(params: float, layers: int) -> tuple[dict, dict]:
    """``params`` fp32 weights in ``layers`` tensors and their AdamW state (step, two moments)."""
    import torch

    per = int(params) // layers
    model = {f"layers.{i}.weight": torch.randn(per) for i in range(layers)}
    optim = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(per), "exp_avg_sq": torch.rand(per)}
                       for i in range(layers)}, "param_groups": [{"lr": 1e-3, "params": list(range(layers))}]}
    return model, optim


def state_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options of a benchmark on :func:`synthetic_state`'s checkpoint."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--params", type=float, default=125e6)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def main() -> None:
    args = state_parser(__doc__, repeats=3).parse_args()

    from types import SimpleNamespace

    import raypath
    from raypath import checkpoint
    from raypath.mirror import LOCAL
    from raypath.segment import final_checkpoint, resume_point

    model, optim = synthetic_state(args.params, args.layers)
    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-"))
    saves, verifies, finals, resumes, controllers, snapshots = [], [], [], [], [], []
    once = "fetched" in inspect.signature(checkpoint.load).parameters  # else the load hashes it again
    # else the controller's choice is the workers'
    unhashed = {"hashed": False} if "hashed" in inspect.signature(resume_point).parameters else {}
    try:
        for i in range(args.repeats):
            d = root / checkpoint.step_dir_name(i)
            t0 = time.perf_counter()
            checkpoint.save(d, model, optim, {"step": i, "tokens": i, "metrics": {}})
            saves.append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in d.iterdir())
            t0 = time.perf_counter()
            checkpoint.verify(d, deep=True)
            verifies.append(time.perf_counter() - t0)
            seg = SimpleNamespace(name="main-v1", version="v1", storage=str(root), start_step=0, end_step=i,
                                  rd=LOCAL, init_checkpoint=None)
            t0 = time.perf_counter()
            final_checkpoint(seg)
            finals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            resume_point(seg, **unhashed)
            controllers.append(time.perf_counter() - t0)
            (root / checkpoint.RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
                {"checkpoint_dir_name": d.name}]}))
            t0 = time.perf_counter()
            checkpoint.drop_stale_ray_snapshot(root)
            snapshots.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            chosen = checkpoint.latest_valid(root)
            checkpoint.load(chosen, **({"fetched": True} if once else {}))
            resumes.append(time.perf_counter() - t0)
            shutil.rmtree(chosen)  # the next repeat's resume chooses its own
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
                      "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "bytes": size,
                      "save_s": round(statistics.median(saves), 3), "verify_s": round(statistics.median(verifies), 3),
                      "verify_gb_per_s": round(size / 1e9 / statistics.median(verifies), 2),
                      "final_checkpoint_s": round(statistics.median(finals), 4),
                      "resume_s": round(statistics.median(resumes), 3),
                      "controller_s": round(statistics.median(controllers), 4),
                      "snapshot_check_s": round(statistics.median(snapshots), 4)}, indent=1))


if __name__ == "__main__":
    main()
