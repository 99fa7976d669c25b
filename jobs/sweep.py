"""Search one version's release branch (length, decay shape, min LR) on the Ray cluster this job runs in.

    ray job submit --working-dir . -- \
        python jobs/sweep.py --config configs/quickstart.yaml --version v2 [--set sweep.num_samples=8 ...]

Forks branches of version K from its main-path checkpoints as Ray Tune trials
(each a Ray Train run), lets Optuna propose them, and releases the best one as
version K (``RUN_DIR/releases/vK``), recording the sweep in the lineage. The
main path of version K must be trained already (``jobs/run_lineage.py``), with
``train.checkpoint_every`` set to give the search several fork points.

Re-submitting the same command resumes an interrupted sweep (finished trials
are not run again). Give an absolute ``run_dir`` on shared storage
(``--set run_dir=/runs/x``): under Ray Jobs the working directory is a
temporary copy.

Exit codes: 0 done and released, 1 sweep not finished (re-submit to resume),
2 bad config or version (one clear line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys

from _common import config_parser, run_main, setup_logging, warn_if_relative

log = logging.getLogger("raypath.jobs.sweep")


def build_parser() -> argparse.ArgumentParser:
    p = config_parser("sweep", __doc__, "YAML run config (its `sweep:` section sets the search)",
                      "sweep.num_samples=8")
    p.add_argument("--version", required=True, help="version to search, e.g. v2")
    p.add_argument("--name", help="sweep name; the same name resumes that sweep")
    p.add_argument("--pin", help="release this trial id instead of the best one")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from raypath.config import load_config
        from raypath.sweep import run_and_print, with_cli

        cfg = with_cli(load_config(args.config, args.overrides), args.name, args.pin)
        warn_if_relative(cfg.run_dir, log)
        return run_and_print(cfg, args.version)

    return run_main("sweep", body)


if __name__ == "__main__":
    sys.exit(main())
