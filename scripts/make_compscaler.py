"""Derive the package's copy of CDVAE's Magpie scaling constants from ../shared.

CDVAE (Xie et al. 2022; txie-93/cdvae, ``cdvae/common/constants.py``, MIT licence) standardises the 132
Magpie composition features with fixed means and standard deviations before its COV-R / COV-P cut-offs.
``evaluate-structures`` and ``compare`` need them for every coverage number, from any working directory,
so the package ships them as ``evaluation/data/cdvae_compscaler.json`` with the attribution inside.

    python scripts/make_compscaler.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json  # noqa: E402
from evaluation.structures import COMP_FP_SIZE  # noqa: E402

ATTRIBUTION = ("CompScalerMeans / CompScalerStds of CDVAE (Xie, Fu, Ganea, Barzilay, Jaakkola, ICLR 2022), "
               "https://github.com/txie-93/cdvae, cdvae/common/constants.py, under the MIT licence of that "
               "repository. Derived by scripts/make_compscaler.py from ../shared/data/cdvae_compscaler.json.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "evaluation" / "data" / "cdvae_compscaler.json")
    args = ap.parse_args()
    data = json.loads((args.shared / "data" / "cdvae_compscaler.json").read_text())
    means, stds = [float(x) for x in data["CompScalerMeans"]], [float(x) for x in data["CompScalerStds"]]
    if len(means) != COMP_FP_SIZE or len(stds) != COMP_FP_SIZE:
        raise SystemExit(f"expected {COMP_FP_SIZE} means and stds, got {len(means)} and {len(stds)}")
    write_json(args.output, {"attribution": ATTRIBUTION, "CompScalerMeans": means, "CompScalerStds": stds})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
