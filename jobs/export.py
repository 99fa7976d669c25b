"""Export one released version (or a main-path checkpoint) of a run directory, verified and atomically.

    python jobs/export.py --run-dir /runs/quickstart --version v2 --out /models/quickstart-v2

A thin wrapper around ``raypath export`` (:mod:`raypath.export`): ``--version`` takes what
that command takes -- ``v2`` (the live release), ``v2/r1``, ``main-v2`` or a checkpoint
directory. The model, the run's tokenizer and a Hugging Face model card (README.md) are
written to a temporary sibling of ``--out``, loaded back with
``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``, and only then renamed
to ``--out``: readers see the old directory or the complete new one, never a partial copy.
No Ray needed.

Exit codes: 0 exported, 2 no such run / version not released yet / --out exists.
"""

from __future__ import annotations

import argparse
import sys

from _common import run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="the lineage's run directory: a path, or a URI such as "
                                                    "s3://bucket/runs/x")
    p.add_argument("--local-dir", help="where a remote run directory is mirrored "
                                       "(default ~/.cache/raypath/<scheme>/<bucket>/<prefix>)")
    p.add_argument("--version", required=True,
                   help="what to export: v2 (the live release), v2/r1, main-v2 or a checkpoint directory")
    p.add_argument("--out", required=True, help="destination directory (created; its parent too)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        from raypath.export import export

        print(export(args.run_dir, args.version, args.out, args.dtype, args.force, args.local_dir).summary())
        return 0

    return run_main("export", body)


if __name__ == "__main__":
    sys.exit(main())
