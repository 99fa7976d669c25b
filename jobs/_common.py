"""What every ``jobs/`` entry point shares: logging and turning user errors into exit code 2.

The scripts run as ``python jobs/<name>.py`` (under ``ray job submit`` or by
hand), so this module is imported as ``_common`` from the script's directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable


class JobError(Exception):
    """A problem the user can fix (bad argument, missing release): message only, no traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one clear line: raypath's ConfigError, DataError and RunFileError (a
    damaged run file: re-submitting cannot fix it), JobError, a missing file.

    ``raypath.data`` (Ray Data, pyarrow) is slow to import: it is only looked up
    if the failed code had imported it, since otherwise no DataError can exist.
    """
    from raypath.config import ConfigError
    from raypath.storage import RunFileError

    errors: list[type[BaseException]] = [ConfigError, RunFileError, JobError, FileNotFoundError]
    if "raypath.data" in sys.modules:
        errors.append(sys.modules["raypath.data"].DataError)
    return tuple(errors)


def config_parser(prog: str, doc: str, config_help: str, set_example: str) -> argparse.ArgumentParser:
    """The options of every job that runs from a config: ``--config``, ``--set`` (repeatable), ``-v``."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help=f"override a config field, e.g. --set {set_example} (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def warn_if_relative(run_dir: str, log: logging.Logger) -> None:
    """Under Ray Jobs the working directory is a temporary copy: a relative run_dir is lost with it."""
    if not Path(run_dir).is_absolute() and "://" not in run_dir:  # a URI (s3://...) is not relative
        log.warning("run_dir %r is relative to the working directory %s; under Ray Jobs that is a "
                    "temporary copy: pass --set run_dir=/shared/absolute/path to keep the run",
                    run_dir, Path.cwd())


def setup_logging(verbose: bool = False) -> None:
    """The CLI's console: raypath's lines; Ray's too with ``--verbose`` (:mod:`raypath.console`)."""
    from raypath.console import setup_logging as setup

    setup(verbose)


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; a user error becomes ``PROG: error: ...`` on stderr and exit code 2."""
    try:
        return body() or 0
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is a user error
        if not isinstance(e, user_errors()):
            raise
        from raypath.mirror import in_store_terms

        print(f"{prog}: error: {in_store_terms(str(e))}", file=sys.stderr, flush=True)
        return 2
