"""``raypath`` command line: run a lineage, inspect it, and price it.

    raypath run configs/quickstart.yaml [--set train.max_lr=1e-3 ...]
    raypath prepare configs/quickstart.yaml
    raypath status runs/quickstart
    raypath cost runs/quickstart
    raypath cost --tokens 1e9 1e9 1e9 1e9 --fraction 0.2
    raypath sweep configs/quickstart.yaml --version v2 [--set sweep.num_samples=8 ...]
    raypath release runs/quickstart --version v2 [--pick TRIAL|BRANCH|rN|best]
    raypath export runs/quickstart v2 --out models/quickstart-v2 [--dtype bf16] [--force]
    raypath law fit runs/quickstart [--version v2]
    raypath law predict runs/quickstart --version v2 --shape cosine --fraction 0.2 [--plot p.png]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from raypath.config import BranchConfig, ConfigChangedError, ConfigError, load_config
from raypath.console import setup_logging
from raypath.data import DataError
from raypath.mirror import in_store_terms
from raypath.sources import first_line
from raypath.storage import RunFileError

log = logging.getLogger("raypath")
#: The branch fraction `cost --tokens` prices a plan at unless --fraction says: a run's default.
COST_FRACTION = BranchConfig.fraction


def cmd_run(args: argparse.Namespace) -> int:
    from raypath.report import format_releases, write_report
    from raypath.run import run

    cfg = load_config(args.config, args.set)
    lineage = run(cfg)
    paths = write_report(lineage)
    print(format_releases(lineage))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from raypath.report import format_versions
    from raypath.run import prepare_run

    print(format_versions(prepare_run(load_config(args.config, args.set))))
    return 0


def _open_run(args: argparse.Namespace, curves: bool = False):
    """The run directory of a command, a local path or a URI (its records pulled into
    ``--local-dir``; with ``curves``, its curves too)."""
    from raypath.mirror import CURVES, RECORDS, RunDir

    return RunDir.open(args.run_dir, args.local_dir, reads=CURVES if curves else RECORDS)


def cmd_status(args: argparse.Namespace) -> int:
    from raypath.lineage import Lineage
    from raypath.report import format_status

    print(format_status(Lineage.load(_open_run(args))))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from raypath.cost import format_costs, format_measured, lineage_costs, paradigm_costs, planned_tokens
    from raypath.lineage import Lineage

    if args.run_dir and args.tokens:  # a plan priced next to a run read as the run's own
        raise ConfigError("cost: give a RUN_DIR (its planned and measured tokens) or --tokens T1 T2 ... "
                          "(a plan's), not both")
    if args.run_dir and (args.fraction is not None or args.replay is not None):
        # a run is priced at the fraction and replay it trained with: a flag here would go unread
        raise ConfigError("cost: --fraction and --replay price a --tokens plan; a RUN_DIR is priced at its own "
                          "branch.fraction and data.replay_ratio")
    if args.run_dir:
        lineage = Lineage.load(_open_run(args))
        fraction = lineage.config["branch"]["fraction"]
        replay = lineage.config["data"]["replay_ratio"]
        print("planned (from the versions' new tokens, seq_len a block as training counts them):")
        print(format_costs(paradigm_costs(planned_tokens(lineage), fraction, replay)))
        measured = lineage_costs(lineage)
        if measured:
            print("\nmeasured (tokens this run trained; 'with search' adds every branch a sweep trained):")
            print(format_measured(measured))
        return 0
    if not args.tokens:
        raise ConfigError("cost: give a RUN_DIR or --tokens T1 T2 ... (new tokens per version)")
    fraction = COST_FRACTION if args.fraction is None else args.fraction
    print(format_costs(paradigm_costs(args.tokens, fraction, args.replay or 0.0)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from raypath.config import load_config
    from raypath.sweep import run_and_print, with_cli

    # --name/--pin as given, not through YAML: a trial id like 01234567 must stay a string.
    return run_and_print(with_cli(load_config(args.config, args.set), args.name, args.pin), args.version)


def cmd_release(args: argparse.Namespace) -> int:
    from raypath.lineage import Lineage, resolve_version
    from raypath.releases import Releaser, format_release, version_objective

    rd = _open_run(args)
    # --pick beside a run or sweep decides in turn with them (Releaser.deciding)
    lineage = Lineage.load(rd)
    names = [v.name for v in lineage.versions()]
    version = names[resolve_version(names, args.version)]
    objective = version_objective(lineage, version)
    releaser = Releaser(lineage)
    releaser.sync(version)
    if args.pick:
        entry = releaser.pick(version, args.pick, objective)
        _tag_release(lineage, entry)
        print(f"live release of {version}: {entry.id} ({entry.branch}): {entry.path}\n")
    print(format_release(lineage, version, objective))
    return 0


def _tag_release(lineage, entry) -> None:
    """Tag a picked release in the run's experiment tracking, as a run or sweep tags theirs."""
    from raypath.config import config_from_dict
    from raypath.tracking import open_lineage, record_release

    try:
        record_release(open_lineage(config_from_dict(lineage.config), lineage.rd.path), entry, lineage.rd)
    except ConfigError as e:  # the release stands: tracking is its echo (an old config, a server down)
        log.warning("%s is live, but not tagged in experiment tracking: %s", entry.id, e)


def cmd_export(args: argparse.Namespace) -> int:
    from raypath.export import export

    print(export(args.run_dir, args.source, args.out, args.dtype, args.force, args.local_dir).summary())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from raypath.compare import comparison_table, format_comparison, run_comparison

    cfg = load_config(args.config, args.set + (["compare.paper_baselines=true"] if args.paper_baselines else []))
    paths = run_comparison(cfg)
    print(format_comparison(comparison_table(Path(paths["table"]).parents[1])))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _fit_law(args: argparse.Namespace, command: str, reuse: bool = False):
    """``law fit`` and ``law predict``: the run directory, its lineage, the version and the
    fits (saved and published to the run directory); with ``reuse``, the saved fit where it was
    made with the same options on the same curves (:func:`raypath.lawfit.saved_fits`)."""
    from raypath import lawfit
    from raypath.lineage import Lineage

    rd = _open_run(args, curves=True)
    lineage = Lineage.load(rd)
    try:
        version = lawfit.version_name(lineage, args.version)
        lawfit.main_entry(lineage, version)  # a listed version not trained yet: say so, not "split v3"
        options = {"law": args.law, "lam": args.lam, "shifts": args.shifts, "huber_delta": args.huber_delta}
        # predict from the fit `law fit` saved when it still holds: the same numbers, in seconds
        fits = lawfit.saved_fits(rd.path, lineage, version, **options) if reuse else None
        if fits is not None:
            log.info("%s: the fit saved in %s/%s/fit-%s.json (same options, same curves)", command, rd.uri,
                     lawfit.LAW_DIR, version)
            return rd, lineage, version, fits
        fits = lawfit.fit_run(rd.path, version, **options)
    except ValueError as e:
        raise ConfigError(f"{command}: {e}") from None
    rd.publish(rd / lawfit.LAW_DIR)
    return rd, lineage, version, fits


def cmd_law_fit(args: argparse.Namespace) -> int:
    from raypath import lawfit
    from raypath.report import format_fits

    rd, lineage, version, fits = _fit_law(args, "law fit")
    print(format_fits(fits, lineage, version))
    if not fits:
        raise ConfigError(f"law fit: no split of {version} has the {lawfit.MIN_POINTS} observed points a fit needs "
                          f"(validation losses every train.eval_every steps, in {rd.uri}/curves/)")
    print(f"fit: {rd.uri}/{lawfit.LAW_DIR}/fit-{version}.json")
    return 0


def cmd_law_predict(args: argparse.Namespace) -> int:
    import dataclasses

    from raypath import lawfit
    from raypath.config import BranchConfig, SweepConfig
    from raypath.report import plot_prediction

    if args.plot:
        _check_output_file("law predict: --plot", Path(args.plot), "pred.png")
    rd, lineage, version, fits = _fit_law(args, "law predict", reuse=True)
    # Unset options: the run's configured release branch and objective (sweep.weights, what its
    # releases are scored by); the config's defaults where the run recorded none.
    run_branch = {**dataclasses.asdict(BranchConfig()), **(lineage.config.get("branch") or {})}
    given = {k: getattr(args, k) for k in ("shape", "fraction", "min_lr_ratio", "power")}
    b = {k: run_branch[k] if v is None else v for k, v in given.items()}
    run_weights = (lineage.config.get("sweep") or {}).get("weights") or SweepConfig().weights
    try:
        weights = {k: float(run_weights.get(k, 0.0)) if v is None else v
                   for k, v in (("old", args.w_old), ("new", args.w_new))}
        p = lawfit.predict_branch(fits, lineage, version, b["shape"], b["fraction"], b["min_lr_ratio"],
                                  b["power"], weights=weights, fork_step=args.fork_step)
        # a NaN objective is no prediction: say which split lacks a law, as a sweep's guide does
        lawfit.check_fitted(fits, lineage, version, weights, run_dir=rd.path)
    except ValueError as e:
        raise ConfigError(f"law predict: {e}") from None
    print(f"{version}: branch {p['shape']} (power {p['power']:g}, min_lr_ratio {p['min_lr_ratio']:g}) from step "
          f"{p['fork_step']} for {p['branch_steps']} steps (fraction {p['fraction_actual']:.3f})")
    for split, loss in p["predicted"].items():
        # both from the law: a measured main path would differ from it by the fit's own error
        print(f"  val/{split}: predicted {loss:.4f} (main path at the same step, also predicted: "
              f"{p['main'][split]:.4f})")
    print(f"  objective ({', '.join(f'{s} {w:.3g}' for s, w in p['weights'].items())}): {p['objective']:.4f}")
    if args.plot:
        print(f"plot: {plot_prediction(rd.path, lineage, fits, version, p, args.plot)}")
    return 0


def _check_output_file(what: str, path: Path, example: str) -> None:
    """Refuse an output file path that cannot be written (an existing directory, a parent that
    is a file) before any work: a fit takes minutes, and its file is saved before the plot."""
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a directory; expected a file path such as {path / example}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is a file, not a directory")


_NO_AUTO = object()


def _number_in(lo: float, hi: float, lo_closed: bool = False, hi_closed: bool = False, auto=_NO_AUTO):
    """An argparse type: a number in the interval from ``lo`` to ``hi`` (open ends unless
    closed), or ``auto`` (returned as ``auto``'s value) where one is given."""
    interval = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
    what = ("" if auto is _NO_AUTO else "'auto' or ") + f"a number in {interval}"

    def parse(value: str):
        if auto is not _NO_AUTO and value == "auto":
            return auto
        try:
            number = float(value)
        except ValueError:
            number = math.nan  # fails every comparison below
        if not ((lo <= number if lo_closed else lo < number) and (number <= hi if hi_closed else number < hi)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number
    return parse


_lam = _number_in(0.0, 1.0, auto="auto")
_huber_delta = _number_in(0.0, math.inf, auto=None)
_fraction = _number_in(0.0, 1.0, hi_closed=True)
_weight = _number_in(0.0, math.inf, lo_closed=True)
_positive = _number_in(0.0, math.inf)


def _run_dir_arg(parser, **kwargs) -> None:
    parser.add_argument("run_dir", help="run directory: a path, or a URI such as s3://bucket/runs/x", **kwargs)
    parser.add_argument("--local-dir", help="where a remote run directory is mirrored "
                                            "(default ~/.cache/raypath/<scheme>/<bucket>/<prefix>)")


def _law_options(parser) -> None:
    parser.add_argument("--law", default="auto", choices=["auto", "CPTLaw", "AnnealingLaw"])
    parser.add_argument("--lambda", dest="lam", type=_lam, default="auto",
                        help="momentum decay of the annealing area, one for every split: auto (chosen "
                             "by leave-one-branch-out) or a value such as 0.999")
    parser.add_argument("--shifts", default="auto", choices=["auto", "single", "multi"],
                        help="an old split's later data switches: one shift term each (multi), only the "
                             "first (single), or chosen on held-out branches (auto: a law that halves "
                             "single's error, else the lowest BIC of those they cannot tell apart)")
    parser.add_argument("--huber-delta", type=_huber_delta, default=None,
                        help="Huber threshold on log residuals: auto (1.345 noise standard deviations of "
                             "each split, at least 1e-3) or a value such as 1e-3 (the published fit)")


def _add_law(sub) -> None:
    law = sub.add_parser("law", help="fit the CPT scaling law to a run and predict branches")
    lsub = law.add_subparsers(dest="law_command", required=True)
    f = lsub.add_parser("fit", help="fit per validation split; print R^2, MAPE, parameters")
    _run_dir_arg(f)
    f.add_argument("--version", help="version being released (default: the latest trained)")
    _law_options(f)
    f.set_defaults(fn=cmd_law_fit)
    pr = lsub.add_parser("predict", help="predicted final val losses of a branch")
    _run_dir_arg(pr)
    pr.add_argument("--version", help="version to branch (default: the latest trained)")
    pr.add_argument("--shape", choices=["cosine", "linear", "1-sqrt", "exponential", "polynomial"],
                    help="decay shape (default: the run's branch.shape)")
    # one or the other: with both, --fork-step won and the --fraction given was silently ignored
    where = pr.add_mutually_exclusive_group()
    where.add_argument("--fraction", type=_fraction,
                       help="share of the version's steps the branch re-trains, in (0, 1] (default: branch.fraction)")
    where.add_argument("--fork-step", type=int, help="fork at this global step instead of --fraction")
    pr.add_argument("--min-lr-ratio", type=_number_in(0.0, 1.0, lo_closed=True),
                    help="final LR over the peak, in [0, 1) (default: branch.min_lr_ratio)")
    pr.add_argument("--power", type=_positive, help="power of polynomial/exponential (default: branch.power)")
    pr.add_argument("--w-old", type=_weight,
                    help="objective weight of the older splits, >= 0 (default: the run's sweep.weights)")
    pr.add_argument("--w-new", type=_weight,
                    help="objective weight of the version's own split, >= 0 (default: the run's sweep.weights)")
    _law_options(pr)
    pr.add_argument("--plot", metavar="OUT.png", help="draw predicted vs observed curves per split")
    pr.set_defaults(fn=cmd_law_predict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypath", description="Learning-rate path switching on Ray.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print Ray's own output (same as RAYPATH_LOG_LEVEL=DEBUG)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and release every version of the corpus (resumes)")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_lr=1e-3")
    r.set_defaults(fn=cmd_run)

    pp = sub.add_parser("prepare", help="validate, deduplicate and tokenize new versions only, training nothing")
    pp.add_argument("config")
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set data.tokenize_actors=16")
    pp.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("status", help="print a run's lineage as tables")
    _run_dir_arg(s)
    s.set_defaults(fn=cmd_status)

    cmp_ = sub.add_parser("compare", help="train PTFS, CPT and path switching on the same data and compare")
    cmp_.add_argument("config")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set 'compare.replay_ratios=[0.25]'")
    cmp_.add_argument("--paper-baselines", action="store_true",
                      help="also train cosine PTFS/CPT baselines (arXiv 2410.04103's setting), as their own rows")
    cmp_.set_defaults(fn=cmd_compare)

    c = sub.add_parser("cost", help="tokens trained by PTFS, CPT and path switching")
    _run_dir_arg(c, nargs="?")
    c.add_argument("--tokens", type=_positive, nargs="+", help="new tokens per version (> 0)")
    c.add_argument("--fraction", type=_number_in(0.0, 1.0),
                   help=f"branch fraction of a --tokens plan, in (0, 1) (default {COST_FRACTION})")
    c.add_argument("--replay", type=_number_in(0.0, 1.0, lo_closed=True),
                   help="replay ratio of a --tokens plan, in [0, 1) (default 0)")
    c.set_defaults(fn=cmd_cost)

    w = sub.add_parser("sweep", help="search branch length/shape of one version on Ray Tune + Optuna (resumes)")
    w.add_argument("config", help="run config; its optional `sweep:` section sets the search")
    w.add_argument("--version", required=True, help="version to search, by name (v2) or number (2)")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set sweep.num_samples=8 --set train.num_workers=1")
    w.add_argument("--name", help="sweep name (default: sweep.name); the same name resumes that sweep")
    w.add_argument("--pin", help="release this trial id instead of the best one")
    w.set_defaults(fn=cmd_sweep)

    rel = sub.add_parser("release", help="list a version's release candidates and history; re-release or roll back")
    _run_dir_arg(rel)
    rel.add_argument("--version", required=True, help="version, by name (v2) or number (2)")
    rel.add_argument("--pick", help="rN: roll back to that release; a trial id or branch name: release it "
                                    "(pinned: automatic decisions keep it); best: release the best candidate")
    rel.set_defaults(fn=cmd_release)

    ex = sub.add_parser("export", help="write a release or main-path checkpoint as a Hugging Face model directory")
    _run_dir_arg(ex)
    ex.add_argument("source", help="v2 (the live release), v2/r1 (a release), main-v2 (the main path at the "
                                   "end of v2) or a checkpoint directory (ray/<segment>/step_N)")
    ex.add_argument("--out", required=True, help="directory to write (atomically; its parent is created)")
    ex.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as stored)")
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")
    ex.set_defaults(fn=cmd_export)
    _add_law(sub)
    _verbose_after_the_command(p)
    return p


def _verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``raypath run CONFIG --verbose`` as well as ``raypath --verbose run CONFIG``: users append
    it to the command that failed. Unset unless given there, so the leading one still counts."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="also print Ray's own output")
                _verbose_after_the_command(command)


#: Bad input: the message names the file or field and what was expected; exit code 2.
INPUT_ERRORS = (ConfigError, DataError, RunFileError, FileNotFoundError)


def _save_traceback() -> Path:
    """Write the current exception's traceback to a new log file; returns its path."""
    logs = Path(tempfile.gettempdir()) / "raypath-logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=time.strftime("error-%Y%m%d-%H%M%S-"), suffix=".log", dir=logs)
    with os.fdopen(fd, "w") as f:
        f.write(f"raypath {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return Path(path)


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected
    return ray is not None and ray.is_initialized()


def _stop_ray() -> None:
    """Disconnect from Ray (a local cluster raypath started ends with it), ignoring what it says
    on the way: the run is being left anyway."""
    with contextlib.suppress(Exception):
        if _ray_connected():
            sys.modules["ray"].shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    caller_has_ray = _ray_connected()  # a notebook's or a test's cluster is not ours to stop
    try:
        return args.fn(args)
    except INPUT_ERRORS as e:
        # a setting the run directory disagrees with: name the file it came from, as load_config does
        source = f"{args.config}: " if isinstance(e, ConfigChangedError) and getattr(args, "config", None) else ""
        print(f"raypath: error: {source}{in_store_terms(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing is lost, and the user should hear so
        if not caller_has_ray:
            _stop_ray()  # before the message: Train workers' last lines would otherwise follow it
        print("raypath: interrupted; what finished is kept (checkpoints, releases, the lineage): "
              "the same command resumes", file=sys.stderr)
        return 128 + 2  # what a shell reports for SIGINT
    except BrokenPipeError:  # `raypath status RUN | head`: the reader left, as it may
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush at exit
        return 128 + 13  # what a process killed by SIGPIPE returns, as git does under head
    except Exception as e:  # noqa: BLE001 -- a bug or an environment failure: one line, the traceback in a file
        if args.verbose:
            traceback.print_exc()
        print(f"raypath: error: unexpected {type(e).__name__}: {first_line(e)} "
              f"(traceback in {_save_traceback()}; --verbose prints it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
