"""Single- vs multi-shift CPT law on a finished lineage, per validation split.

For releasing the lineage's last version, fits every split with the single-shift law
(``shifts=single``), the multi-shift law (``multi``) and the held-out choice (``auto``) on
the main path and the release branches, at one momentum decay (``--lam``; ``auto`` chooses it
on the single-shift fits). Prints per split and law: R^2, MAPE, and the leave-one-branch-out
final-loss MAPE (each release branch predicted by a fit on the others). Writes nothing to the
run directory.

    python benchmarks/law_shifts.py runs/quickstart --lam 0.99
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

MODES = ("single", "multi", "auto")


def held_out_mape(fit, curves, sign) -> list[float]:
    """Absolute % error of each branch's last loss, predicted by the same law fitted on the rest."""
    from raypath.law import fit_law

    apes = []
    for i, c in enumerate(curves):
        if c.name == "main":
            continue
        rest = [x for j, x in enumerate(curves) if j != i]
        g = fit_law(fit.law, rest, lam=fit.lam, sign=sign, quiet=True)
        last = int(np.argmax(c.steps))
        apes.append(float(abs(g.predict(c)[last] / c.losses[last] - 1) * 100))
    return apes


def compare(run_dir: str, lam) -> dict:
    from raypath import lawfit
    from raypath.lineage import Lineage

    lineage = Lineage.load(run_dir)
    version = lineage.main_path()[-1].version
    fits = {}
    for mode in MODES:
        fits[mode] = lawfit.fit_run(lineage, version, run_dir=run_dir, shifts=mode, lam=lam, save=False,
                                    include_sweeps=False)
        lam = next(iter(fits[mode].values())).lam  # chosen on the single-shift fits: the same for all
    out = {}
    for split in fits["single"]:
        curves = lawfit.curves_from_lineage(lineage, split, version, run_dir=run_dir, include_sweeps=False)
        sign = {"B": -1 if split == version else 1}
        row = {"boundaries": lawfit.boundaries(lineage, split, version)}
        for mode in MODES:
            f = fits[mode][split]
            apes = held_out_mape(f, curves, sign)
            row[mode] = {"law": f.law, "r2": f.r2, "mape": f.mape, "n_points": f.n_points, "lam": f.lam,
                         "held_out_branch_mape": float(np.mean(apes)) if apes else None,
                         "degenerate": f.degenerate, "held_out": f.held_out}
        out[split] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--lam", default="auto", help="momentum decay: auto or a value such as 0.99")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = compare(args.run_dir, args.lam if args.lam == "auto" else float(args.lam))
    print(json.dumps(out, indent=1))
    for split, row in out.items():
        print(f"{split} (switches {row['boundaries']}): " + "; ".join(
            f"{m} {row[m]['law']} R^2 {row[m]['r2']:.4f} MAPE {row[m]['mape']:.2f}% held-out "
            + ("-" if row[m]['held_out_branch_mape'] is None else f"{row[m]['held_out_branch_mape']:.2f}%")
            for m in MODES))
    print(f"seconds: {time.perf_counter() - t0:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
