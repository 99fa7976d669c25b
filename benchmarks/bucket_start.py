"""What a command's start downloads of a run directory in a bucket, command after command on
one machine: its records and curves are pulled into the local mirror at every start.

This writes a run of ``--versions`` versions with a finished sweep of ``--trials`` trials per
version (``tests/law_lineage.py``'s ``write_run``: the records, a curve per segment and trial),
uploads it to a moto S3 server on loopback, and starts ``--starts`` commands one after another,
each a new process on the same mirror (``RunDir.open``, as every command begins). ``--reads``:
``curves`` (a law fit, a report), ``records`` (status, cost, release) or ``driver`` (``raypath
sweep``'s start; ``raypath run``'s pulls the same but the sweeps' curves). Per start: files
downloaded, their bytes, wall seconds.

    python benchmarks/bucket_start.py --versions 20 --trials 100 --reads curves
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
reads = {"curves": mirror.CURVES, "records": mirror.RECORDS, "driver": None}[sys.argv[4]]
t0 = time.perf_counter()
mirror.RunDir.open(sys.argv[1], sys.argv[2], sys.argv[3], reads=reads)
print(json.dumps({"files": len(got), "bytes": sum(got), "seconds": round(time.perf_counter() - t0, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--trials", type=int, default=100, help="sweep trials per version")
    ap.add_argument("--reads", choices=("curves", "records", "driver"), default="curves")
    ap.add_argument("--starts", type=int, default=3)
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
            starts = []
            for _ in range(args.starts):
                out = subprocess.run([sys.executable, "-c", START, "s3://bench/run", str(Path(tmp) / "mirror"),
                                      endpoint, args.reads], capture_output=True, text=True, check=True)
                starts.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            moto.kill()
    print(json.dumps({"command": " ".join(["python", *sys.argv]), "raypath": str(Path(raypath.__file__).parent),
                      "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "starts": starts}, indent=1))


if __name__ == "__main__":
    main()
