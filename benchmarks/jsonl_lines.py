"""Reading a jsonl file whose lines span many read blocks: one long line against many short ones.

Times :func:`raypath.sources._lines` (what every jsonl chunk is read with) in one process over
two in-memory files of the same size: ``--mb`` MB as one line (a huge document, a JSON array
saved as one line) and as lines of ~1 KB. Linear reading gives a ratio near 1; copying the
partial line at every read block makes the long line's time grow with its square.

    python benchmarks/jsonl_lines.py --mb 96
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time


def _read_s(data: bytes, repeats: int) -> float:
    from raypath.sources import _lines

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(len(line) for _, line in _lines(io.BytesIO(data)))
        best = min(best, time.perf_counter() - t)
        assert n == len(data)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=96.0, help="size of each file, MB")
    ap.add_argument("--repeats", type=int, default=3, help="the best of this many reads is reported")
    args = ap.parse_args()
    n = int(args.mb * 1e6)
    long = b'{"text": "' + b"x" * (n - 13) + b'"}\n'
    short = (b'{"text": "' + b"x" * 987 + b'"}\n') * (n // 1000)
    long_s, short_s = _read_s(long, args.repeats), _read_s(short, args.repeats)
    print(json.dumps({
        "command": f"python benchmarks/jsonl_lines.py --mb {args.mb:g} --repeats {args.repeats}",
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "bytes": n, "one_line_s": long_s, "short_lines_s": short_s,
        "one_line_over_short_lines": round(long_s / short_s, 3)}, indent=2))


if __name__ == "__main__":
    main()
