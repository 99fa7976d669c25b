"""What the commands a user runs against a long run directory cost as its versions grow.

Builds a synthetic run directory of ``--versions`` versions without training: the lineage and
curves of ``tests/law_lineage.py`` (losses from a known CPT law; main path, a release branch and
a second branch per version), each version's record, ``--releases`` release ids per version
(``releases/vK/rN`` with ``current.json``), and per version a finished sweep of ``--trials``
trials (its ``results.json`` as ``raypath.sweep`` writes it, each trial with a curve under the
sweep directory). Then runs, each on a freshly loaded :class:`Lineage`,
what a user runs against the run directory, and reports per command its wall and CPU seconds,
the files it opened (every ``open`` of a file under the run directory, counted per path, and
the bytes of the files opened) and the lineage records it read:

status, cost, report (plot + CSV + markdown), release (``raypath release --version`` of the
last version), law fit (``raypath law fit`` of the last version, one lambda, the
single-shift law: the fit's own optimisation is not what is measured here), law fit again (the
same fit once more in the same process, as a law-guided sweep refits after each trial: what the
first one started or read is still there), law refit (the
curves one refit of the last version's law-guided sweep reads after a trial finished: the
lineage's and every sweep's curves plus the sweep's own finished trials, for the last two
splits; its first fit, at the sweep's start, is not measured) and law curves (the observed curves
a fit of the last version holds, every split's, with the peak of the memory they take).

    python benchmarks/long_run.py --versions 10 20 40 --trials 100
    python benchmarks/long_run.py --versions 42 60 --trials 100 --commands law_refit
    # the same through another checkout's raypath (e.g. an older commit's worktree)
    PYTHONPATH=/path/to/checkout python benchmarks/long_run.py --versions 10 20 40
"""

from __future__ import annotations

import argparse
import builtins
import collections
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # law_lineage: the synthetic lineage the law's tests fit

COMMANDS = ("status", "cost", "report", "release", "law_fit", "law_fit_again", "law_refit", "law_curves")


class OpenCounter:
    """Counts the files under ``root`` that ``open`` (and ``Path.open``/``read_text``) opens."""

    def __init__(self, root: Path):
        self.root, self.counts, self.bytes = str(root), collections.Counter(), 0

    @contextlib.contextmanager
    def counting(self):
        real = builtins.open
        io_open = io.open

        def counted(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(self.root):
                self.counts[os.fspath(file)] += 1
                with contextlib.suppress(OSError):
                    self.bytes += os.path.getsize(file)
            return real(file, *args, **kwargs)

        builtins.open = io.open = counted
        try:
            yield self
        finally:
            builtins.open, io.open = real, io_open


def _command(name: str, run_dir: Path, last: str):
    """The call behind command ``name`` (what its CLI does, output discarded)."""
    from raypath import lawfit
    from raypath.lineage import Lineage

    if name == "status":
        from raypath.report import format_status
        return lambda: format_status(Lineage.load(run_dir))
    if name == "cost":
        from raypath.cost import lineage_costs
        return lambda: lineage_costs(Lineage.load(run_dir))
    if name == "report":
        from raypath.report import write_report
        return lambda: write_report(run_dir)
    if name == "release":
        from raypath.releases import Releaser, format_release, version_objective

        def release():
            lin = Lineage.load(run_dir)
            obj = version_objective(lin, last)
            Releaser(lin).sync(last)
            return format_release(lin, last, obj)
        return release
    if name in ("law_fit", "law_fit_again"):
        return lambda: lawfit.fit_run(run_dir, last, lam=0.99, shifts="single")
    if name == "law_refit":
        return _refit(run_dir, last)
    if name == "law_curves":
        import raypath.report  # noqa: F401  (its imports are not the curves' memory)

        def curves():
            lin = Lineage.load(run_dir)
            return lawfit.split_curves(lin, lawfit.splits_for(lin, last), last, run_dir=run_dir)
        return curves
    raise ValueError(name)


def _refit(run_dir: Path, last: str):
    """A refit of ``last``'s law-guided sweep as its guide makes it (the guide's lineage, its
    held curves where this raypath has them), the sweep's start and a first trial already read."""
    import shutil

    from raypath import lawfit
    from raypath.lineage import Lineage

    lin = Lineage.load(run_dir)
    splits = lawfit.splits_for(lin, last)[-2:]
    held = {"records": lawfit.CurveRecords()} if hasattr(lawfit, "CurveRecords") else {}
    trials = []
    rel = lin.branch(f"branch-{last}")
    config = {"fork_step": rel.fork_step, "branch_steps": rel.steps, **rel.decay}

    def add_trial(i: int) -> None:
        curve = run_dir / "sweeps" / last / "guided" / "curves" / f"branch-{last}-g{i}.jsonl"
        curve.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rel.curve, curve)
        trials.append(lawfit.trial_branch(curve.stem, last, config, str(curve)))

    def refit():
        return lawfit.split_curves(lin, splits, last, run_dir=run_dir, extra_branches=trials, **held)

    add_trial(0)
    refit()  # the sweep's first fit
    add_trial(1)
    return refit


def measure(run_dir: Path, versions: int, commands) -> dict:
    """Per command: wall and CPU seconds (the CPU time is what a loaded machine blurs least),
    files opened under the run directory, and lineage records read (``Record.from_dict``)."""
    from raypath import lineage as lineage_mod

    parse, records = lineage_mod.Record.__dict__["from_dict"].__func__, [0]

    def counted(cls, d):
        records[0] += 1
        return parse(cls, d)

    out = {}
    lineage_mod.Record.from_dict = classmethod(counted)
    try:
        for name in commands:
            call = _command(name, run_dir, f"v{versions}")
            counter, records[0] = OpenCounter(run_dir), 0
            traced = name == "law_curves"  # tracing every allocation slows the others down
            if traced:
                tracemalloc.start()
            t0, c0 = time.perf_counter(), time.process_time()
            with counter.counting():
                call()
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            out[name] = {"seconds": round(time.perf_counter() - t0, 3),
                         "cpu_seconds": round(time.process_time() - c0, 3),
                         "opens": sum(counter.counts.values()), "files": len(counter.counts),
                         "bytes": counter.bytes, "records": records[0],
                         **({"peak_mb": round(peak / 1e6, 1)} if traced else {})}
    finally:
        lineage_mod.Record.from_dict = classmethod(parse)
    return out


def over_run_dirs(script: str, args, measure_one) -> None:
    """For each of ``args.versions``: a synthetic run directory of that many versions with
    ``args.trials`` trials per sweep (and ``args.releases`` release ids per version, if given),
    its row ``measure_one(run_dir, versions)``; then the rows, with the command, as JSON."""
    import logging

    from law_lineage import write_run

    logging.disable(logging.WARNING)
    rows = []
    for n in args.versions:
        with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}-") as tmp:
            t0 = time.perf_counter()
            run_dir = write_run(Path(tmp), n, trials=args.trials, releases=getattr(args, "releases", 1))
            built = time.perf_counter() - t0
            rows.append({"versions": n, "build_seconds": round(built, 1),
                         "curve_files": sum(1 for _ in run_dir.rglob("*.jsonl")), **measure_one(run_dir, n)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"command": f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:]),
                      "raypath": os.environ.get("PYTHONPATH") or "this checkout",
                      "date": datetime.date.today().isoformat(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--trials", type=int, default=100, help="trials of each version's sweep")
    ap.add_argument("--releases", type=int, default=2, help="release ids per version")
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    args = ap.parse_args()
    over_run_dirs(__file__, args, lambda run_dir, n: measure(run_dir, n, args.commands))


if __name__ == "__main__":
    main()
