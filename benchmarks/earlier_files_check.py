"""What a run's start pays to check that earlier versions' files are the ones they were trained on.

Every ``raypath run`` (and ``prepare``) checks each prepared version's corpus files against
their records in the data manifest (``raypath.data._check_unchanged``), after discovery has
listed the corpus (``discover_versions``: one listing per split directory). This writes
``--versions`` versions of ``--files`` small jsonl train files (and 2 val files) to a local
corpus, or with ``--s3`` to a bucket on a local moto server, records each file as preparation
does (``raypath.sources.fingerprint``), then times discovery plus the check of every version,
``--repeats`` times, on a local Ray cluster of ``--cpus`` CPUs, and counts the Ray tasks it
started and (``--s3``) the requests the store saw during the check. The records are written as
preparing writes them (the data manifest, a ``files.json`` per version) and read back as a
run's start reads them (``raypath.data.check_prepared``); one more pass under ``tracemalloc``
gives the peak of the Python memory the check held.

    python benchmarks/earlier_files_check.py --versions 10 --files 1000
    python benchmarks/earlier_files_check.py --versions 10 --files 1000 --s3
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/earlier_files_check.py --versions 10 --files 1000
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _write_corpus(fs, root: str, versions: int, files: int) -> None:
    from raypath.storage import STREAMS, in_threads

    paths = [f"{root}/v{v + 1}/{split}/part-{i:05d}.jsonl" for v in range(versions)
             for split, n in (("train", files), ("val", 2)) for i in range(n)]

    def put(path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"text": f"document of {path}"}).encode() + b"\n")

    for d in sorted({p.rsplit("/", 1)[0] for p in paths}):
        fs.create_dir(d, recursive=True)
    in_threads(put, paths, STREAMS)


def _records(sources, endpoint, run_dir: Path) -> list[dict]:
    from raypath.sources import fingerprint
    from raypath.storage import in_threads

    return [{"name": s.name, "index": k, "val_path": str(run_dir / "data" / s.name / "val"),
             "new_chunk_rows": [600] * len(s.train_files),
             "train_files": in_threads(lambda f: fingerprint(f, endpoint), list(s.train_files)),
             "val_files": in_threads(lambda f: fingerprint(f, endpoint), list(s.val_files))}
            for k, s in enumerate(sources)]


def _check(sources, data_dir: Path, endpoint) -> None:
    """What a run's start does: the manifest checked against the corpus, then the files' stats."""
    from raypath import data
    from raypath.mirror import LOCAL

    if "each" in inspect.signature(data.check_prepared).parameters:
        data.check_prepared(sources, data_dir, 16, each=lambda files, src: data._check_unchanged(
            files, src, endpoint, LOCAL))
    else:  # a checkout that read every version's fingerprints at once
        for rec, src in zip(data.check_prepared(sources, data_dir, 16)["versions"], sources):
            data._check_unchanged(rec, src, endpoint, LOCAL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--files", type=int, default=1000, help="train files a version")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="the local Ray cluster's CPUs")
    ap.add_argument("--s3", action="store_true", help="the corpus in a bucket on a local moto server")
    args = ap.parse_args()

    import pyarrow.fs as pafs
    import ray

    import raypath
    from raypath import data
    from raypath.sources import discover_versions

    tasks = [0]
    remote = ray.remote

    class Counted:  # a remote function whose calls (the check's Ray tasks) are counted
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *a, **kw):
            tasks[0] += 1
            return self.fn.remote(*a, **kw)

    def counting(*a, **kw):
        if a and callable(a[0]):  # ray.remote(fn)
            return Counted(remote(*a, **kw))
        return lambda fn: Counted(remote(*a, **kw)(fn))  # ray.remote(num_cpus=1)(fn)

    ray.remote = counting
    with tempfile.TemporaryDirectory(prefix="earlier-files-") as tmp:
        moto, endpoint, log = None, None, Path(tmp) / "moto.log"
        if args.s3:
            from moto_s3 import requests_in, start

            endpoint, moto = start(log)
            fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
            fs.create_dir("bench")
            root, corpus = "bench/corpus", "s3://bench/corpus"
        else:
            fs, root = pafs.LocalFileSystem(), f"{tmp}/corpus"
            corpus = root
        try:
            _write_corpus(fs, root, args.versions, args.files)
            data_dir = Path(tmp) / "run" / "data"
            data_dir.mkdir(parents=True)
            data._write_manifest(data_dir / "manifest.json", {"seq_len": 16, "versions": _records(
                discover_versions(corpus, endpoint=endpoint), endpoint, data_dir.parent)})
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            runs = []
            for _ in range(args.repeats):
                tasks[0], seen = 0, len(log.read_text().splitlines()) if args.s3 else 0
                t0 = time.perf_counter()
                sources = discover_versions(corpus, endpoint=endpoint)
                listed = time.perf_counter() - t0
                _check(sources, data_dir, endpoint)
                run = {"seconds": time.perf_counter() - t0, "discovery_s": listed, "tasks": tasks[0]}
                if args.s3:
                    got = list(requests_in(log.read_text().splitlines()[seen:]))
                    run["requests"] = len(got)
                    run["heads"] = sum(1 for m, _, _ in got if m == "HEAD")
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
            tracemalloc.start()
            _check(sources, data_dir, endpoint)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            listed_mb = sum(p.stat().st_size for p in data_dir.glob("*/files.json")) / 2**20
        finally:
            ray.shutdown()
            if moto is not None:
                moto.kill()
    print(json.dumps({
        "command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "files": args.versions * (args.files + 2),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_discovery_s": statistics.median(r["discovery_s"] for r in runs),
        "tasks": runs[-1]["tasks"], "check_peak_mb": round(peak / 2**20, 3), "files_json_mb": round(listed_mb, 3),
        **({"requests": runs[-1]["requests"], "heads": runs[-1]["heads"]} if args.s3 else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
