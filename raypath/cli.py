"""``raypath`` command line: run a lineage, inspect it, and price it.

    raypath run configs/quickstart.yaml [--set train.max_lr=1e-3 ...]
    raypath status runs/quickstart
    raypath cost runs/quickstart
    raypath cost --tokens 1e9 1e9 1e9 1e9 --fraction 0.2
"""

from __future__ import annotations

import argparse
import logging
import sys

from raypath.config import ConfigError, load_config
from raypath.data import DataError

log = logging.getLogger("raypath")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_run(args: argparse.Namespace) -> int:
    from raypath.report import format_releases, write_report
    from raypath.run import run

    cfg = load_config(args.config, args.set)
    lineage = run(cfg)
    paths = write_report(cfg.run_dir)
    print(format_releases(lineage.data))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from raypath.lineage import Lineage
    from raypath.report import format_status

    print(format_status(Lineage.load(args.run_dir).data))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from raypath.cost import format_costs, lineage_costs, paradigm_costs
    from raypath.lineage import Lineage

    if args.run_dir:
        lineage = Lineage.load(args.run_dir).data
        fraction = lineage["config"]["branch"]["fraction"]
        replay = lineage["config"]["data"]["replay_ratio"]
        new_tokens = [v["new_tokens"] for v in lineage["versions"]]
        print("planned (from the versions' new tokens):")
        print(format_costs(paradigm_costs(new_tokens, fraction, replay)))
        measured = lineage_costs(lineage)
        if measured:
            print("\nmeasured (tokens this run trained):")
            for r in measured:
                print(f"  {r['version']}: main {r['main_tokens']:.4g} + branch {r['branch_tokens']:.4g}"
                      f" -> path switching / PTFS = {r['path_switching_ratio']:.3f}")
        return 0
    if not args.tokens:
        raise ConfigError("cost: give a RUN_DIR or --tokens T1 T2 ... (new tokens per version)")
    print(format_costs(paradigm_costs(args.tokens, args.fraction, args.replay)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypath", description="Learning-rate path switching on Ray.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and release every version of the corpus (resumes)")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_lr=1e-3")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="print a run's lineage as tables")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_status)

    c = sub.add_parser("cost", help="tokens trained by PTFS, CPT and path switching")
    c.add_argument("run_dir", nargs="?")
    c.add_argument("--tokens", type=float, nargs="+", help="new tokens per version")
    c.add_argument("--fraction", type=float, default=0.2, help="branch fraction")
    c.add_argument("--replay", type=float, default=0.0, help="replay ratio")
    c.set_defaults(fn=cmd_cost)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"raypath: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
