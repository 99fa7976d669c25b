"""What the console shows: raypath's own lines, Ray's chatter only when asked for.

At the default level the driver prints raypath's progress, releases, warnings and
errors, and nothing of Ray's internals (controller polling, Ray Data execution
plans, checkpoint/report notices, raylet warnings, Tune's experiment banner, Ray's
deprecation warnings): those stay in Ray's log directory
(``/tmp/ray/session_latest/logs``), where they always are. Ray's C++ core writes a
few lines straight to the process's stderr (e.g. ``core_worker.cc`` notices about
Ray Data's actors); no Python filter reaches them.
``raypath --verbose`` or ``RAYPATH_LOG_LEVEL=DEBUG`` prints everything.

How: every Ray worker process of the job tags raypath's log lines
(:func:`setup_worker_logging`, installed as the job's ``worker_process_setup_hook``),
and the driver forwards only tagged lines of the worker output Ray streams to it
(:func:`quiet_ray`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

LEVEL_ENV = "RAYPATH_LOG_LEVEL"
#: Every raypath log line, on the driver and in workers, starts like this.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
#: A line written with :data:`FORMAT` by a ``raypath`` logger.
OWN_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) raypath[.:]")
#: Loggers of Ray's libraries whose console output is muted on the driver by default.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")


def level() -> int:
    """The raypath log level: ``RAYPATH_LOG_LEVEL`` (DEBUG, INFO, WARNING ...), INFO by default."""
    name = os.environ.get(LEVEL_ENV, "INFO").upper()
    value = logging.getLevelName(name)
    return value if isinstance(value, int) else logging.INFO


def verbose() -> bool:
    return level() <= logging.DEBUG


def setup_logging(verbose_flag: bool = False) -> None:
    """Driver logging; ``verbose_flag`` (``--verbose``) is ``RAYPATH_LOG_LEVEL=DEBUG``.

    The level goes into the environment so Ray workers of a local cluster, which
    inherit it, log at the same level.
    """
    if verbose_flag:
        os.environ[LEVEL_ENV] = "DEBUG"
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, format=FORMAT, datefmt=DATEFMT)
    logging.getLogger("raypath").setLevel(level())


def setup_worker_logging() -> None:
    """``worker_process_setup_hook``: raypath's loggers write tagged lines to stderr.

    Runs in every Ray worker process of the job before any task. Ray Train and
    Tune reconfigure the root logger in their workers; a handler of our own on
    the ``raypath`` logger (not propagated) keeps our format whatever they do.
    """
    logger = logging.getLogger("raypath")
    logger.setLevel(level())
    if not any(getattr(h, "raypath", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler.raypath = True
        logger.addHandler(handler)
    logger.propagate = False


class _NoAuthNotice(logging.Filter):
    raypath = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_ray() -> None:
    """Print only raypath's lines of the worker output Ray streams to this driver.

    Call before ``ray.init`` (its start-up lines and the log printer it installs
    are then filtered too); after it works as well. A no-op when verbose. Ray's
    own driver-side loggers keep writing their log files; their console handlers
    drop below WARNING.
    """
    if verbose():
        return
    # Tune's default console output prints its experiment banner and a TensorBoard hint (to
    # Ray's artifacts, not RUN_DIR/tb) at every verbosity; the classic one is silent at 0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not sys.stderr.isatty():  # no colour codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # raypath turns Ray Data's progress bars off on purpose, and the deprecations are Ray's own.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray 2.60 announces that the local cluster it starts uses token authentication (on
    # loopback here: nothing to act on). The warning that it is *off* stays.
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(getattr(f, "raypath", False) for f in auth.filters):
        auth.addFilter(_NoAuthNotice())
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
    # Ray streams worker stdout/stderr (and raylet messages) to the driver through
    # ray._private.worker.print_to_stdstream: wrap it with a filter. Pinned Ray
    # version (pyproject.toml); tests/test_console.py fails if this stops working.
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if getattr(ray_worker.print_to_stdstream, "raypath", False):
        return

    def own_lines_only(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if OWN_LINE.match(line)]
        if lines:
            # Printed without Ray's de-duplication, which folds lines that differ only
            # in their numbers: it would hide most progress lines.
            ray_worker.print_worker_logs({**data, "lines": lines}, sys.stderr if data.get("is_err") else sys.stdout,
                                         ignore_prefix)

    own_lines_only.raypath = True
    # Raylet messages call it by name, and ray.init binds its log printer to it.
    ray_worker.print_to_stdstream = own_lines_only
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(own_lines_only, ignore_prefix=ignore_prefix))


class RunProgress:
    """The whole-run line: version k of N, the segment, and the ETA to the end of the run.

    Work is counted in optimizer steps: every version's main-path steps plus its
    release branch's. The rate is what this process trained so far: segments finished by an
    earlier run, and the steps a resumed segment had trained before, count as done, not as speed.
    """

    def __init__(self, name: str, versions: list[dict], global_batch_size: int, branch_fraction: float,
                 rd=None):
        self.name = name
        self.n = len(versions)
        self.main_steps = [v["stream_rows"] // global_batch_size for v in versions]
        from raypath.mainpath import main_fork_step  # (torch: the console stays light for the workers' hook)

        self.branch_steps = [s - main_fork_step(0, s, branch_fraction) for s in self.main_steps]
        self.total = sum(self.main_steps) + sum(self.branch_steps)
        self.done = 0
        self.done_here = 0
        self.resumed = 0  # steps the segment now resumed had trained before this process started
        self.rd = rd
        self.t0, self.started = time.perf_counter(), time.time()

    def main_done(self, k: int, curve: str | None = None) -> None:
        """Version k's main segment is done; ``curve``: its curve, when this process trained it."""
        self.done += self.main_steps[k]
        self.done_here += self.trained_here(curve)
        self.resumed = 0

    def branch_done(self, k: int, curve: str | None = None) -> None:
        self.done += self.branch_steps[k]
        self.done_here += self.trained_here(curve)

    def trained_here(self, curve: str | None) -> int:
        """The steps a segment trained since this process started: from the first attempt that
        started since (its ``start`` event's step, the checkpoint it resumed) to its last step."""
        from raypath.storage import read_jsonl

        path = self.rd.fetch(curve, missing_ok=True) if curve and self.rd is not None else curve
        if not path or not Path(path).is_file():
            return 0
        records = read_jsonl(path)  # grows with the segment's log steps; read once per segment
        starts = [r["step"] for r in records if r.get("event") == "start" and r.get("time", 0) >= self.started]
        last = max((r["step"] for r in records if "event" not in r and "step" in r), default=None)
        return max(last - starts[0], 0) if starts and last is not None else 0

    def resume(self, steps: int) -> None:
        """The main segment about to start had trained ``steps`` before (its newest checkpoint): done,
        but not this process's pace."""
        self.resumed = max(steps, 0)

    def eta_s(self) -> float:
        rate = self.done_here / max(time.perf_counter() - self.t0, 1e-9)
        return (self.total - self.done - self.resumed) / rate if rate > 0 else float("inf")

    def line(self, k: int, segment: str) -> str:
        eta = fmt_eta(self.eta_s()) if self.done < self.total else "0m00s"
        share = (self.done + self.resumed) / max(self.total, 1)
        return (f"run {self.name}: version {k + 1} of {self.n} ({segment}), "
                f"{share:.0%} of the run's steps done, ETA to end of run {eta}")


def fmt_eta(seconds: float) -> str:
    """``1h02m`` / ``3m05s``; ``?`` while the pace is unknown."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


#: How often a long step of the driver logs its progress: preparing versions (validating,
#: tokenizing, shuffling), a base model's download or hashing, weights to or from a bucket, a
#: law fit, an export's load, write and check.
PROGRESS_EVERY_S = 30.0


class Progress:
    """A long driver step's progress line, at most every :data:`PROGRESS_EVERY_S`: how much of
    ``total`` is done (in ``unit``: ``B`` for bytes, else a count of it), the rate, the ETA, and
    running totals of other counters with their rates::

        progress = Progress(log, "tokenizing v2, v3", total_bytes, "B")
        progress.add(chunk_bytes, tokens=chunk_tokens)
        # tokenizing v2, v3: 1.2 GB of 9.6 GB (12%), 4.1 MB/s, 1G tokens (3.4M/s), ETA 34m10s
    """

    def __init__(self, logger: logging.Logger, what: str, total: float, unit: str):
        import threading

        self.log, self.what, self.total, self.unit = logger, what, total, unit
        self.done = 0.0
        self.counts: dict[str, float] = {}
        self.t0 = self.last = time.perf_counter()
        self.lock = threading.Lock()  # threads copying or hashing files add to one line

    def add(self, n: float, **counts: float) -> None:
        with self.lock:
            self.done += n
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + v
            now = time.perf_counter()
            if now - self.last < PROGRESS_EVERY_S or self.done >= self.total:
                return
            self.last = now
            line = self.line(now)
        self.log.info("%s", line)

    def get(self, refs: list) -> list:
        """``ray.get(refs)`` (in their order), each finished task counted as 1 done as it finishes."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        out: list = [None] * len(refs)
        pending = list(refs)
        while pending:  # each wait is linear in the tasks still pending, once a progress interval
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=max(PROGRESS_EVERY_S, 0.05))
            for ref, value in zip(ready, ray.get(ready)):
                out[index[ref]] = value
            self.add(len(ready))
        return out

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = fmt_eta((self.total - self.done) / rate) if rate > 0 else "?"
        others = "".join(f", {amount(v)} {k} ({amount(v / elapsed)}/s)" for k, v in self.counts.items())
        done = (f"{amount(self.done, 'B')} of {amount(self.total, 'B')}" if self.unit == "B"
                else f"{amount(self.done)} of {amount(self.total, self.unit)}")
        return (f"{self.what}: {done} ({self.done / max(self.total, 1e-9):.0%}), "
                f"{amount(rate, self.unit)}/s{others}, ETA {eta}")


@contextlib.contextmanager
def heartbeat(logger: logging.Logger, what: str, done: Callable[[], str] | None = None) -> Iterator[None]:
    """Around a long step whose progress cannot be counted from inside (a library call:
    ``save_pretrained``, ``from_pretrained``): ``what: 1m30s so far`` every :data:`PROGRESS_EVERY_S`
    until it ends; ``done``, polled at each line, says how far it got from outside (``4.2 GB of
    ~16 GB written, 1m30s so far``)."""
    import threading

    stop, t0 = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not stop.wait(max(PROGRESS_EVERY_S, 0.001)):
            far = f"{done()}, " if done is not None else ""
            logger.info("%s: %s%s so far", what, far, fmt_eta(time.perf_counter() - t0))

    thread = threading.Thread(target=beat, name="raypath-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def amount(n: float, unit: str = "") -> str:
    """``1.2 GB``, ``340 files``, ``3.4M``: SI prefixes, three significant figures."""
    scale, prefix = next((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
                         if abs(n) >= s * 0.9995 or s == 1.0)
    v = n / scale
    num = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{num} {prefix}B" if unit == "B" else f"{num}{prefix} {unit}".rstrip()
