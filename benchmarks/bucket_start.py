"""What a command's start downloads of a run directory in a bucket, command after command on
one machine: its records and curves are pulled into the local mirror at every start.

This writes a run of ``--versions`` versions with a finished sweep of ``--trials`` trials per
version (``tests/law_lineage.py``'s ``write_run``: the records, a curve per segment and trial),
uploads it to a moto S3 server on loopback, and starts ``--starts`` commands one after another,
each a new process on the same mirror (``RunDir.open``, as every command begins). ``--reads``:
``curves`` (a law fit, a report), ``records`` (status, cost, release) or ``driver`` (``raypath
sweep``'s start; ``raypath run``'s pulls the same but the sweeps' curves). ``--bulk K``: K
more objects per version among its token files and per trial among its sweep's checkpoints,
which a start reads nothing of. Per start: files downloaded, their bytes, listing requests
and the entries they returned, wall seconds.

    python benchmarks/bucket_start.py --versions 20 --trials 100 --reads curves
    python benchmarks/bucket_start.py --versions 20 --trials 100 --reads driver --bulk 20 --starts 2
    PYTHONPATH=/path/to/checkout python benchmarks/bucket_start.py ...   # another checkout's raypath
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # law_lineage: a run directory written without training
from moto_s3 import start  # noqa: E402

#: One command's start, in a process of its own: what it downloads, and how long it takes.
START = """
import json, sys, time
from pathlib import Path
from raypath import mirror
mirror.SETTLED_S = 0.0  # the objects are old enough to trust their stamps, as minutes after their writes
got = []
download = mirror.Mirror._download
def counting(self, src, dst, *a):
    download(self, src, dst, *a)
    got.append(Path(dst).stat().st_size)
mirror.Mirror._download = counting
listings, entries = [0], [0]
filesystem = mirror.Mirror.filesystem
class Counting:  # counts listings and their entries (a page holds up to 1,000 on S3), passes all on
    def __init__(self, fs):
        self.fs = fs
    def get_file_info(self, what):
        got = self.fs.get_file_info(what)
        if not isinstance(what, (str, list)):
            listings[0] += 1
            entries[0] += len(got)
        return got
    def __getattr__(self, name):
        return getattr(self.fs, name)
mirror.Mirror.filesystem = lambda self: Counting(filesystem(self))
reads = {"curves": mirror.CURVES, "records": mirror.RECORDS, "driver": None}[sys.argv[4]]
t0 = time.perf_counter()
mirror.RunDir.open(sys.argv[1], sys.argv[2], sys.argv[3], reads=reads)
print(json.dumps({"files": len(got), "bytes": sum(got), "listings": listings[0], "listed": entries[0],
                  "seconds": round(time.perf_counter() - t0, 3)}))
"""


def _bulk(fs, run: Path, k: int, versions: int) -> None:
    """``k`` small objects per version under ``data/<v>/stream/`` and per trial under its sweep's
    ``branches/<trial>/step_00000100/`` (a checkpoint's shards), written straight to the bucket."""
    from raypath.storage import STREAMS, in_threads

    paths = [f"bench/run/data/v{v + 1}/stream/part-{i:05d}.parquet" for v in range(versions) for i in range(k)]
    for sweep in sorted(run.glob("sweeps/*/*")):
        trials = sorted(p.stem for p in (sweep / "curves").glob("*"))
        paths += [f"bench/run/{sweep.relative_to(run).as_posix()}/branches/{t}/step_00000100/shard-{i:03d}.distcp"
                  for t in trials for i in range(k)]

    def put(path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(b"x")

    in_threads(put, paths, STREAMS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--trials", type=int, default=100, help="sweep trials per version")
    ap.add_argument("--reads", choices=("curves", "records", "driver"), default="curves")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--bulk", type=int, default=0, help="objects per version's token files and per trial's checkpoint")
    args = ap.parse_args()

    import pyarrow.fs as pafs
    from law_lineage import write_run

    import raypath
    from raypath.mirror import Mirror

    with tempfile.TemporaryDirectory(prefix="bucket-start-") as tmp:
        endpoint, moto = start(Path(tmp) / "moto.log")
        try:
            pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
            run = write_run(Path(tmp) / "w", args.versions, trials=args.trials)
            Mirror("s3://bench/run", str(run.resolve()), endpoint).push(run)
            _bulk(pafs.S3FileSystem(endpoint_override=endpoint), run, args.bulk, args.versions)
            starts = []
            for _ in range(args.starts):
                out = subprocess.run([sys.executable, "-c", START, "s3://bench/run", str(Path(tmp) / "mirror"),
                                      endpoint, args.reads], capture_output=True, text=True, check=True,
                                     cwd=tmp)  # not a checkout: -c puts the working directory first on sys.path
                starts.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            moto.kill()
    print(json.dumps({"command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
                      "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "starts": starts}, indent=1))


if __name__ == "__main__":
    main()
