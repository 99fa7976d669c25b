"""Size of ``lineage.json`` and of the data manifest, and what writing them costs, as a corpus's
file count and a run's sweeps grow.

The lineage is rewritten whole on every record (a main segment, a branch, a sweep trial's
result, a release), the data manifest each time a version lands: whatever they hold per corpus
file is rewritten each time. This builds ``--versions`` data-manifest records shaped as
``raypath.data`` writes them (per version ``--files`` train files with their fingerprint, 2 val
files, ``--chunks`` tokenized chunks per file) in a fresh run directory, lands them one by one
in the data manifest as ``prepare_versions`` does (``data._write_manifest``; a checkout without
it wrote the manifest whole with ``write_json``), records them with ``Lineage.set_versions``,
then saves the lineage ``--saves`` times and loads it once. Reports each file's bytes, the bytes
written to land every version, the median lineage save and the load time, and the pickled size
of the versions a run's context keeps (what a sweep sends to each trial).

With ``--trials T`` every version also gets a finished sweep of ``T`` trials, each with a val and
a test loss per version so far (as ``raypath.sweep`` writes them: its ``results.json``, then
``Lineage.record_sweep``); reports the last sweep's record time and, on a fresh load, the time to
read the last version's release candidates and the law's pool of branches (every sweep's trials).

    python benchmarks/lineage_size.py --files 100000
    python benchmarks/lineage_size.py --files 10 --versions 60 --trials 300
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/lineage_size.py --files 100000
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _fingerprint(path: str, i: int) -> dict:
    return {"path": path, "bytes": 8_000_000 + i, "mtime_ns": 1_764_000_000_000_000_000 + i,
            "sha256": hashlib.sha256(path.encode()).hexdigest()}


def _record(k: int, files: int, chunks: int, root: str) -> dict:
    """A prepared version's data-manifest record (``raypath.data._prepare_one``'s keys)."""
    name = f"v{k + 1}"
    train = [_fingerprint(f"{root}/corpus/{name}/train/part-{i:06d}.jsonl.gz", i) for i in range(files)]
    val = [_fingerprint(f"{root}/corpus/{name}/val/part-{i:06d}.jsonl.gz", i) for i in range(2)]
    return {"name": name, "index": k, "layout": 2, "train_files": train, "val_files": val, "docs": files * 2000,
            "skipped_docs": {}, "skipped_files": [], "new_blocks": files * chunks * 600,
            "new_tokens": files * chunks * 600 * 1025, "dropped_tokens": 0, "dropped_share": 0.0,
            "replay_blocks": 0, "replay_from": {}, "stream_rows": files * chunks * 600, "stream_shards": 64,
            "val_blocks": 512, "test_blocks": 512, "test_from": "val", "new_chunk_rows": [600] * (files * chunks),
            "new_path": f"{root}/data/{name}/new", "stream_path": f"{root}/data/{name}/stream",
            "val_path": f"{root}/data/{name}/val", "test_path": f"{root}/data/{name}/test"}


def _land(path: Path, manifest: dict) -> int:
    """Write the data manifest as preparing a version does; returns the bytes written."""
    from raypath import data
    from raypath.storage import write_json

    def sizes() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.parent.rglob("*.json")}

    before = sizes()
    if hasattr(data, "_write_manifest"):
        data._write_manifest(path, manifest)
    else:
        write_json(path, manifest, root=path.parent.parent)
    return sum(size for p, (size, mtime) in sizes().items() if before.get(p, (None, None))[1] != mtime)


def _sweep(k: int, trials: int, root: Path) -> dict:
    """Version ``k``'s finished sweep record, as ``raypath.sweep`` writes its ``results.json``."""
    name = f"v{k + 1}"
    sweep_dir = root / "sweeps" / name / "s"
    losses = {f"{split}/v{j + 1}": 3.0 + 0.001 * j for j in range(k + 1) for split in ("val", "test")}
    return {"name": "s", "version": name, "version_index": k, "path": str(sweep_dir), "best": "t0",
            "complete": True, "search_tokens": trials * 1_000_000, "trials": [
                {"trial_id": f"t{i}", "name": f"branch-{name}-t{i}", "status": "done", "order": i,
                 "config": {"fork_step": 1000 + i, "branch_steps": 200, "shape": "cosine", "min_lr_ratio": 0.1},
                 "metrics": losses, "objective": 3.0, "test_objective": 3.0, "score": 3.0 + i * 1e-4,
                 "branch_tokens": 1_000_000, "curve": str(sweep_dir / "curves" / f"branch-{name}-t{i}.jsonl"),
                 "export": str(sweep_dir / "exports" / f"branch-{name}-t{i}")} for i in range(trials)]}


def _record_sweeps(lin, versions: int, trials: int, root: Path) -> float:
    """Record every version's sweep; returns the seconds the last record took."""
    from raypath.storage import write_json

    seconds = 0.0
    for k in range(versions):
        record = _sweep(k, trials, root)
        write_json(Path(record["path"]) / "results.json", record, root=root)
        t0 = time.perf_counter()
        lin.record_sweep(record)
        seconds = time.perf_counter() - t0
    return seconds


def _read_trials(root: Path, last: str) -> dict:
    """Seconds to load the lineage and list ``last``'s release candidates, then the law's branches."""
    from raypath.lawfit import lineage_branches
    from raypath.lineage import Lineage
    from raypath.releases import candidates

    t0 = time.perf_counter()
    found = candidates(Lineage.load(root), last)
    t1 = time.perf_counter()
    branches = lineage_branches(Lineage.load(root))
    t2 = time.perf_counter()
    return {"candidates_seconds": t1 - t0, "candidates": len(found), "law_branches_seconds": t2 - t1,
            "law_branches": len(branches)}


def _context_bytes(manifest_path: Path) -> int:
    """Pickled bytes of the versions a run's context holds (``raypath.run.RunContext.versions``,
    which a sweep sends to every trial): the data manifest's records as a run keeps them."""
    import pickle

    from raypath import data

    keep = getattr(data, "run_record", lambda rec: rec)  # a checkout without it kept them whole
    return len(pickle.dumps([keep(r) for r in data.read_manifest(manifest_path)["versions"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="train files per version")
    ap.add_argument("--versions", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=1, help="tokenized chunks per file")
    ap.add_argument("--saves", type=int, default=10)
    ap.add_argument("--trials", type=int, default=0, help="trials of a finished sweep per version")
    args = ap.parse_args()
    from raypath.lineage import Lineage

    with tempfile.TemporaryDirectory(prefix="lineage-bench-") as tmp:
        records = [_record(k, args.files, args.chunks, tmp) for k in range(args.versions)]
        manifest_path = Path(tmp, "data", "manifest.json")
        landed, t0 = 0, time.perf_counter()
        for k in range(args.versions):  # each version lands as soon as it is prepared
            landed += _land(manifest_path, {"seq_len": 1024, "versions": records[: k + 1]})
        land_seconds = time.perf_counter() - t0
        lin = Lineage.open(Path(tmp), "bench", {})
        lin.set_versions(records)
        sweep_record = _record_sweeps(lin, args.versions, args.trials, Path(tmp)) if args.trials else None
        seconds = []
        for _ in range(args.saves):
            t0 = time.perf_counter()
            lin.save()
            seconds.append(time.perf_counter() - t0)
        size = (Path(tmp) / "lineage.json").stat().st_size
        manifest_size = manifest_path.stat().st_size
        t0 = time.perf_counter()
        Lineage.load(Path(tmp))
        load = time.perf_counter() - t0
        if args.trials:
            reads = _read_trials(Path(tmp), records[-1]["name"])
        context = _context_bytes(manifest_path)
    report = {"command": f"python benchmarks/lineage_size.py --files {args.files} --versions {args.versions} "
                         f"--chunks {args.chunks} --saves {args.saves} --trials {args.trials}",
              "raypath": os.environ.get("PYTHONPATH") or "this checkout",
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "corpus_files": args.versions * (args.files + 2), "manifest_bytes": manifest_size,
              "bytes_written_landing_every_version": landed, "landing_seconds": land_seconds,
              "lineage_bytes": size,
              "save_seconds_median": statistics.median(seconds), "load_seconds": load,
              "context_versions_bytes": context}
    if args.trials:
        report.update(sweep_trials=args.versions * args.trials, last_sweep_record_seconds=sweep_record, **reads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
