"""``composition-gen stability``: where structures stand against the convex hull."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from composition_lm.cli.options import add_progress, add_relax_arguments


def cmd_stability(args: argparse.Namespace) -> int:
    from structure.io import read_generated_structures
    from structure.stability import StabilityScorer, write_stability

    scorer = StabilityScorer(args.potential, reference=args.reference, relax=args.relax, fmax=args.fmax,
                             max_steps=args.max_steps, references=args.references, cache_dir=args.output,
                             correction=args.correction)
    structures, source = read_generated_structures(args.structures)
    if not structures:
        raise ValueError(f"{args.structures} holds no structures")
    print(f"{len(structures)} structures from {source}; reference hull: {scorer.hull.source} "
          f"({len(scorer.hull)} entries)", file=sys.stderr)
    t0 = time.perf_counter()
    records = scorer.score(structures, workers=args.workers, progress=not args.no_progress)
    args.output.mkdir(parents=True, exist_ok=True)
    path = write_stability(records, args.output / "stability.csv")
    e = [r.e_hull_per_atom for r in records]
    scored = [x for x in e if math.isfinite(x)]
    print(f"{len(records)} structures in {time.perf_counter() - t0:.1f} s: {len(scored)} placed on the hull, "
          f"{sum(x <= 0 for x in scored)} on or below it, {sum(x <= 0.1 for x in scored)} within 0.1 eV/atom, "
          f"{len(records) - len(scored)} not placed (see the reason column); wrote {path}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "stability", help="energy above the convex hull of structures (M3GNet energies, MP reference hull)",
        description="Relax each structure with an M3GNet potential (or take it as given with --no-relax), compute "
        "its formation energy against elemental references relaxed with the same potential, put it on the "
        "Materials Project scale (MP2020 corrections, --correction) and place it on the reference hull of its "
        "chemical system. Writes OUTPUT/stability.csv (index, formula, energy_per_atom, e_form_per_atom, "
        "e_hull_per_atom, decomposition, status, reason), one row per input structure in input order; a "
        "structure that cannot be placed keeps its row with an empty e_hull_per_atom and the reason.")
    p.add_argument("structures", type=Path, metavar="STRUCTURES",
                   help="a `structure` or `cdvae sample` output folder, a CIF zip or folder, an extxyz file, or a CSV "
                   "with a cif column")
    p.add_argument("--reference", type=Path, metavar="TABLE",
                   help="reference phases: a CSV of formula + formation_energy_per_atom (eV/atom), or a JSON list of "
                   "pymatgen entries (default: the Materials Project table shipped in the package, CC BY 4.0)")
    p.add_argument("--correction", choices=["mp2020", "none"], default="mp2020",
                   help="mp2020: MP's anion and GGA/GGA+U corrections on the M3GNet energy, as the reference hull "
                   "has them; none: the raw M3GNet formation energy (default: mp2020; benchmarks/stability.md)")
    add_relax_arguments(p, relax_by_default=True)
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_stability)
