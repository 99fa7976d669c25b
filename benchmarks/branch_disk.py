"""What a finished branch leaves on disk: its checkpoints, one per ``train.checkpoint_every`` steps.

A sweep runs many branches of a version (one per trial), each a Ray Train run that checkpoints
periodically so a lost worker costs little; every checkpoint holds the model and the optimizer
state (~3x the fp32 weights). A finished branch is read only through its final checkpoint (its
record, the release, the export), so the disk a sweep keeps grows with trials x the checkpoints
each kept, and with what the final one holds (nothing trains on from it: its weights suffice).

This trains the tiny config's v1 main path with a wider model (``--hidden``, ``--layers``), then
``--branches`` release branches of v1 one after another, each checkpointing every
``--every`` steps, and reports per branch the checkpoints it wrote, the bytes its storage held at
most while it ran (sampled every 0.2 s), and the bytes and checkpoint directories left once it
finished.

    python benchmarks/branch_disk.py --branches 4 --every 2
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/branch_disk.py --branches 4 --every 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


class DiskSampler:
    """The bytes under ``dirs``, sampled every ``every`` seconds in a thread: the peak and the last."""

    def __init__(self, dirs: list[Path], every: float = 0.2):
        self.dirs, self.every, self.peak = dirs, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for d in self.dirs:
            try:
                total += _bytes(d) if d.exists() else 0
            except FileNotFoundError:  # a file deleted while counted
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _context(run_dir: str, hidden: int, layers: int, *overrides: str):
    """The tiny config's v1, one worker, with a model of ``hidden`` x ``layers`` (and ``overrides``): prepared."""
    from raypath.cluster import init_ray
    from raypath.config import load_config
    from raypath.run import prepare

    init_ray(num_cpus=8)
    return prepare(load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", "data.versions=[v1]", "train.num_workers=1", "train.eval_every=0",
        f"model.hidden_size={hidden}", f"model.intermediate_size={4 * hidden}", f"model.num_layers={layers}",
        "model.num_heads=4", "model.num_kv_heads=2", *overrides]))


def _branch(ctx, main_v1, b: int, every: int) -> dict:
    """Branch ``b`` of v1, checkpointing every ``every`` steps, run to its end: what it left."""
    from raypath import checkpoint as ckpt
    from raypath.branches import release_branch
    from raypath.segment import fit_segment

    seg = release_branch(ctx, 0, main_v1)
    name = f"{seg.name}-{b}"
    seg = dataclasses.replace(seg, name=name, storage=str(ctx.rd.path / "ray" / name), export_dir=None,
                              curves_path=str(ctx.rd.path / "curves" / f"{name}.jsonl"),
                              train=dataclasses.replace(seg.train, checkpoint_every=every))
    storage = Path(seg.storage)
    with DiskSampler([storage]) as disk:
        fit_segment(seg)
    steps = seg.end_step - seg.start_step
    row = {"branch": name, "steps": steps, "saves": len(range(every, steps, every)) + 1,
           "kept": len(ckpt.step_dirs(storage)), "bytes_kept": _bytes(storage), "peak_bytes": disk.peak,
           "final_bytes": _bytes(storage / ckpt.step_dir_name(seg.end_step))}
    print(f"{name}: {steps} steps, {row['saves']} checkpoints written, {row['kept']} kept, "
          f"{row['bytes_kept'] / 1e6:.1f} MB (peak while it ran {disk.peak / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    return row


def model_args(ap: argparse.ArgumentParser) -> None:
    """The wider tiny model's flags and ``--out``, shared with ``sweep_disk.py``."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", help="also write the results here as JSON")


def trained_v1(run_dir: str, args: argparse.Namespace, *overrides: str):
    """(context, main-path entry) of the tiny config's v1 trained with the wider model, recorded in its lineage."""
    from raypath.lineage import Lineage
    from raypath.mainpath import run_main_version

    ctx = _context(run_dir, args.hidden, args.layers, *overrides)
    lineage = Lineage.open(ctx.run_dir, ctx.cfg.name, ctx.cfg.to_dict())
    lineage.set_versions(ctx.versions)
    main_v1 = run_main_version(ctx, 0, None)
    lineage.record_main(main_v1)
    return ctx, main_v1


def emit(args: argparse.Namespace, out: dict) -> None:
    """Print the results as JSON (and write them to ``--out``), with the date and machine."""
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "python": sys.version.split()[0], **out}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--every", type=int, default=2, help="train.checkpoint_every of the branches")
    model_args(ap)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ctx, main_v1 = trained_v1(f"{tmp}/run", args)
        rows = [_branch(ctx, main_v1, b, args.every) for b in range(args.branches)]
        out = {"every": args.every, "checkpoint_bytes": _bytes(Path(main_v1.checkpoints["end"])),
               "branches": rows, "bytes_kept": sum(r["bytes_kept"] for r in rows)}
    emit(args, out)


if __name__ == "__main__":
    main()
