"""Train (or resume) a lineage on the Ray cluster this job runs in, then report it.

    ray job submit --working-dir . -- \
        python jobs/run_lineage.py --config configs/quickstart.yaml [--set key=value ...]

Every version of the corpus is trained along the never-annealed main path and
released through its decay branch; then ``RUN_DIR/report/`` (plot, CSV,
markdown) is written and the releases table is printed to the job's logs.

Connects to the cluster the job was submitted to: Ray Jobs sets ``RAY_ADDRESS``
for the entry point, and :func:`raypath.run.run` uses it (without it, a local
cluster is started, so the script also runs on a laptop).

With ``--prepare-only`` it validates, deduplicates and tokenizes the versions not
prepared yet and prints the versions table, training nothing: submit it to a CPU
cluster first, then the same command without it to the training cluster, which
finds the versions prepared (the same ``run_dir``).

Resuming and version updates use the same command. Re-submitting it with the
same ``run_dir`` skips finished versions and released branches and continues an
interrupted segment from its latest checkpoint. To release a new version, add
its directory to the corpus (``<corpus>/v4/{train,val}/...``, picked up in name
order unless ``data.versions`` lists them) and submit the same command again:
only the new version is trained and released.

Under Ray Jobs the working directory is a temporary copy of the upload, so give
an absolute ``run_dir`` on storage every node shares (``--set run_dir=/runs/x``);
a relative one is lost with the job.

Exit codes: 0 done, 2 bad config or corpus (one clear line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys

from _common import config_parser, run_main, setup_logging, warn_if_relative

log = logging.getLogger("raypath.jobs.run_lineage")


def build_parser() -> argparse.ArgumentParser:
    p = config_parser("run_lineage", __doc__, "YAML run config, e.g. configs/quickstart.yaml",
                      "run_dir=/runs/quickstart")
    p.add_argument("--prepare-only", action="store_true", help="prepare the new versions, train nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from raypath.config import load_config

        cfg = load_config(args.config, args.overrides)  # before the heavy imports: bad configs fail fast

        from raypath.report import format_releases, format_versions, write_report
        from raypath.run import prepare_run, run

        warn_if_relative(cfg.run_dir, log)
        if args.prepare_only:
            print(format_versions(prepare_run(cfg)), flush=True)
            return 0
        lineage = run(cfg)
        paths = write_report(lineage)
        print(format_releases(lineage), flush=True)
        print(f"run_dir: {lineage.rd.uri}")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0

    return run_main("run_lineage", body)


if __name__ == "__main__":
    sys.exit(main())
