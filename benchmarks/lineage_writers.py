"""What a ``lineage.json`` save costs now that several processes write one lineage (``raypath run``
and sweeps beside it), and that none of their entries is lost.

``--writers`` processes each record ``--saves`` branches into one lineage at the same moment, in a
local run directory and in one in a bucket (a moto S3 server on loopback; each writer with its own
mirror, as drivers on different machines). A save holds the lineage's lock (in a bucket, also a
lease object in the store, :class:`raypath.storage._StoreLease`, which waits
``LEASE_SETTLE_S`` before it may enter) and merges into the latest saved copy. Reports per layout
the wall time per save (one writer: the save's own cost; several: their saves take turns), the
moto requests per save (a round without saves taken off), and the entries kept of those recorded.

    python benchmarks/lineage_writers.py --writers 1,3 --saves 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import requests_in, start  # noqa: E402

WRITER = """
import sys, time
from raypath.lineage import Lineage
from raypath.mirror import RunDir
run_dir, local, endpoint, me, n, at = sys.argv[1:7]
rd = RunDir.open(run_dir, local or None, endpoint or None, create=True)
lin = Lineage.load(rd)
while time.time() < float(at):
    time.sleep(0.002)
t = time.perf_counter()
for i in range(int(n)):
    lin.record_branch({"name": f"{me}-{i}", "version": "v1", "status": "done"})
print(time.perf_counter() - t)
"""


def _round(run_dir: str, mirrors: Path | None, endpoint: str, writers: int, saves: int) -> dict:
    from raypath.lineage import Lineage
    from raypath.mirror import RunDir

    def opened(name: str) -> RunDir:
        if mirrors is None:
            return RunDir.open(run_dir, create=True)
        return RunDir.open(run_dir, str(mirrors / name), endpoint, create=True)

    Lineage.open(opened("setup"), "bench", {}).record_main({"version": "v1", "start_step": 0, "end_step": 1})
    at = time.time() + 3 + writers  # every writer started and has read the lineage
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, run_dir, str(mirrors / f"w{k}") if mirrors else "",
                               endpoint if mirrors else "", f"w{k}", str(saves), str(at)],
                              stdout=subprocess.PIPE, text=True) for k in range(writers)]
    took = [float(p.communicate(timeout=600)[0]) for p in procs]
    kept = len(Lineage.load(opened("check")).branches())
    return {"writers": writers, "saves_each": saves, "wall_s": round(max(took), 3),
            "s_per_save": round(max(took) / max(writers * saves, 1), 4), "kept": kept, "recorded": writers * saves}


def _requests(log: Path, run) -> int:
    """Requests moto logged while ``run()`` ran."""
    before = len(log.read_text().splitlines())
    run()
    time.sleep(0.5)  # the log's last lines
    return sum(1 for _ in requests_in(log.read_text().splitlines()[before:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", default="1,3", help="comma-separated counts of writers at once")
    ap.add_argument("--saves", type=int, default=10, help="saves per writer")
    args = ap.parse_args()
    counts = [int(c) for c in args.writers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lineage-writers-"))
    log = tmp / "moto.log"
    endpoint, moto = start(log)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
    out = {"command": " ".join(["python", "benchmarks/lineage_writers.py", *sys.argv[1:]]),
           "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
           "local": [], "bucket": []}
    try:
        for n in counts:
            out["local"].append(_round(str(tmp / f"local-{n}"), None, endpoint, n, args.saves))
            # requests of the saves alone: those of a round without saves (starts, setup, check) taken off
            base = _requests(log, lambda: _round(f"s3://bench/base-{n}", tmp / f"base-{n}", endpoint, n, 0))
            row = {}
            requests = _requests(log, lambda: row.update(_round(f"s3://bench/run-{n}", tmp / f"mirrors-{n}",
                                                                 endpoint, n, args.saves)))
            row["requests_per_save"] = round((requests - base) / (n * args.saves), 1)
            out["bucket"].append(row)
    finally:
        moto.kill()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
