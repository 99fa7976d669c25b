"""What a sweep of a run directory in a bucket uploads as its trials finish.

The sweep's driver uploads the sweep directory after every finished trial
(``raypath.sweep._uploader``), so that a driver lost mid-sweep resumes on another machine.
This builds a sweep directory trial by trial, as a sweep leaves it, against a moto S3 server on
loopback: per trial Tune's ``trial_<id>/`` (``params.json``, ``result.json``, ``progress.csv``)
and the experiment state, the trial's curve (``curves/<segment>.jsonl``), its exported model
(``exports/<segment>/``: weights, config, a ``--tokenizer-kb`` tokenizer.json; uploaded by the
trial's rank 0) and its checkpoints (``branches/<segment>/``: ``--ckpt-objects`` objects,
written straight to the bucket by Ray Train); then runs the driver's upload callback. Counts,
from moto's request log, the requests of those callbacks by kind (objects uploaded, listing
pages) and the bytes they uploaded, for the first and the last tenth of the trials.

    python benchmarks/sweep_upload.py --trials 200
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/sweep_upload.py --trials 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import requests_in, start  # noqa: E402


def _requests(lines: list[str]) -> dict:
    out = {"put": 0, "list": 0, "head": 0, "get": 0}
    for method, _, query in requests_in(lines):
        if method in ("PUT", "POST"):
            out["put"] += 1
        elif method == "GET" and ("list-type" in query or "delimiter" in query or "prefix=" in query):
            out["list"] += 1
        elif method == "HEAD":
            out["head"] += 1
        elif method == "GET":
            out["get"] += 1
    return out


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size // 2).hex().encode()[:size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--curve-kb", type=int, default=40, help="a trial's curve")
    ap.add_argument("--tokenizer-kb", type=int, default=500, help="an exported model's tokenizer.json")
    ap.add_argument("--ckpt-objects", type=int, default=20, help="a trial's checkpoint objects in the bucket")
    args = ap.parse_args()
    import pyarrow.fs as pafs

    from raypath import mirror as mirror_module
    from raypath import sweep
    from raypath.mirror import RunDir, run_location

    with tempfile.TemporaryDirectory(prefix="sweep-upload-") as tmp:
        log = Path(tmp, "moto.log")
        endpoint, moto = start(log)
        try:
            fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
            fs.create_dir("bench")
            local, mirror = run_location("s3://bench/run", str(Path(tmp, "mirror")), endpoint)
            rd = RunDir(local, mirror)
            sweep_dir = local / "sweeps" / "v2" / "sweep"
            callback = sweep._uploader(SimpleNamespace(ctx=SimpleNamespace(rd=rd), sweep_dir=sweep_dir))
            _write(sweep_dir / "sweep.json", 2_000)
            _write(sweep_dir / "optuna.journal", 0)
            per_trial, uploaded = [], []
            seconds = 0.0
            for i in range(args.trials):
                tid, seg = f"{i:08x}", f"branch-v2-{i:08x}"
                trial = sweep_dir / f"trial_{tid}"
                _write(trial / "params.json", 300)
                _write(trial / "result.json", 20 * 400)
                _write(trial / "progress.csv", 20 * 300)
                _write(sweep_dir / f"experiment_state-{0:04d}.json", 2_000 + 1_000 * i)
                with open(sweep_dir / "optuna.journal", "a") as f:
                    f.write("x" * 500 + "\n")
                _write(sweep_dir / "curves" / f"{seg}.jsonl", args.curve_kb * 1000)
                rd.publish(sweep_dir / "curves" / f"{seg}.jsonl")  # the trial's rank 0
                export = sweep_dir / "exports" / seg
                _write(export / "model.safetensors", 100_000)
                _write(export / "config.json", 700)
                _write(export / "tokenizer.json", args.tokenizer_kb * 1000)
                _write(export / "model_card.json", 1_500)
                rd.publish(export)  # the trial's rank 0
                for j in range(args.ckpt_objects):  # Ray Train, straight to the bucket
                    with fs.open_output_stream(f"bench/run/sweeps/v2/sweep/branches/{seg}/obj_{j:04d}") as f:
                        f.write(b"x" * 64)
                sent = []
                real_upload = mirror_module._upload

                def counting(local, *a, _real=real_upload, _sent=sent):
                    _sent.append(os.path.getsize(local))
                    return _real(local, *a)

                mirror_module._upload = counting
                time.sleep(0.2)  # moto's log lines of the trial's own uploads land
                first = len(log.read_text().splitlines())
                t0 = time.perf_counter()
                callback.on_trial_complete(i, [], None)
                seconds += time.perf_counter() - t0
                time.sleep(0.2)
                per_trial.append(_requests(log.read_text().splitlines()[first:]))
                mirror_module._upload = real_upload
                uploaded.append(sum(sent))
        finally:
            moto.kill()
    tenth = max(args.trials // 10, 1)

    def summary(rows: list[dict], sent: list[int]) -> dict:
        n = len(rows)
        return {**{k: sum(r[k] for r in rows) / n for k in rows[0]}, "bytes": sum(sent) / n}

    report = {"command": f"python benchmarks/sweep_upload.py --trials {args.trials} --curve-kb {args.curve_kb} "
                         f"--tokenizer-kb {args.tokenizer_kb} --ckpt-objects {args.ckpt_objects}",
              "raypath": os.environ.get("PYTHONPATH") or "this checkout",
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "per_callback_first_tenth": summary(per_trial[:tenth], uploaded[:tenth]),
              "per_callback_last_tenth": summary(per_trial[-tenth:], uploaded[-tenth:]),
              "total": {**{k: sum(r[k] for r in per_trial) for k in per_trial[0]}, "bytes": sum(uploaded),
                        "seconds": seconds}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
