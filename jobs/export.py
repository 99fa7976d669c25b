"""Copy one released version's model out of a run directory, verified and atomically.

    python jobs/export.py --run-dir /runs/quickstart --version v2 --out /models/quickstart-v2

The source is the ``path`` of version K's live release in the lineage
(``releases/vK/rN``: the branch's ``save_pretrained`` directory, model and tokenizer). It is copied to a
temporary sibling of ``--out``, loaded back with
``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``, and only
then renamed to ``--out``: readers see the old directory or the complete new
one, never a partial copy. No Ray needed.

Exit codes: 0 exported, 2 no such run / version not released yet / --out exists.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _common import JobError, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="the lineage's run directory")
    p.add_argument("--version", required=True, help="version name, e.g. v2")
    p.add_argument("--out", required=True, help="destination directory (created; its parent too)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def find_release(run_dir: Path, version: str) -> tuple[dict, Path]:
    """The release entry of ``version`` and its model directory; JobError if not released."""
    from raypath.lineage import Lineage

    lineage = Lineage.load(run_dir).data
    releases = lineage.get("releases", [])
    entry = next((r for r in releases if r.get("version") == version), None)
    if entry is None:
        known = [v["name"] for v in lineage.get("versions", [])]
        released = [r["version"] for r in releases]
        what = "is not a version of this run" if known and version not in known else "has no release yet"
        raise JobError(f"{version} {what} in {run_dir} (versions: {', '.join(known) or 'none'}; "
                       f"released: {', '.join(released) or 'none'}); run jobs/run_lineage.py "
                       f"and wait for its branch to finish")
    src = Path(entry["path"])
    if not src.is_dir():
        # A copied or moved run directory keeps stale absolute paths: look under it too
        # (releases/vK/rN; an older run released releases/vK itself).
        moved = run_dir / "releases" / version / src.name if src.name != version else run_dir / "releases" / version
        if not moved.is_dir():
            raise JobError(f"{version}: release directory {src} is missing (nor at {moved})")
        src = moved
    return entry, src


def verify(model_dir: Path) -> str:
    """Load the copied model (and tokenizer, when present) from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
        if (model_dir / "tokenizer.json").is_file():
            AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure means a broken export
        raise JobError(f"the copied release does not load ({type(e).__name__}: {e})") from None
    return f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        from raypath.storage import atomic_dir

        run_dir, out = Path(args.run_dir).resolve(), Path(args.out).resolve()
        entry, src = find_release(run_dir, args.version)
        if out.exists() and not args.force:
            raise JobError(f"{out} already exists (use --force to replace it)")
        if out == src or src in out.parents:
            raise JobError(f"--out {out} must lie outside the release directory {src}")
        # atomic_dir: a temp sibling of `out`, renamed over it only if this block succeeds.
        with atomic_dir(out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            summary = verify(tmp)
        val = entry.get("val", {}).get(f"val/{args.version}")
        print(f"exported {args.version} (branch {entry.get('branch')}, "
              f"val/{args.version} {val if val is None else round(val, 4)}): {src} -> {out} [{summary}]")
        return 0

    return run_main("export", body)


if __name__ == "__main__":
    sys.exit(main())
