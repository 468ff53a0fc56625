"""Derive the package's elemental ground-state structures from the Materials Project structures in ../shared.

Writes ``structure/data/elemental_ground_states.json.gz``: for every element of the shipped reference hull, the
single-element structure of ``mp_union.csv.gz`` that lies lowest above MP's hull (``e_above_hull`` from
mp_union, else from ``mp_formulas.csv`` by ``material_id``; on a tie within 1 meV/atom mp_union's own value wins,
since mp_formulas gives 0 to some polymorphs MP places far above the hull, then the fewest atoms),
as a pymatgen CIF with its ``material_id`` and that ``e_above_hull``. Formation energies take each element's
reference energy from this structure relaxed with the potential in use (:mod:`structure.relax`), whatever the
template store, so a store that lacks an element's ground state cannot make every compound of that element look
stable. An element mp_union has no structure of (Pt) gets MP's ground-state prototype built here (fcc, the
lattice constant of mp-126), marked ``constructed``.

    python scripts/make_elemental_references.py [--shared ../shared]
    python scripts/make_elemental_references.py --check chgnet   # -> benchmarks/elemental_references_check.md

``--check POTENTIAL`` measures the table instead of writing it: every single-element structure of mp_union is
relaxed with the potential, as the check of :class:`structure.relax.ElementalReferences` does with a template
store's, and the elements where one lies more than 0.05 eV/atom below the shipped ground state are listed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import atomic_path  # noqa: E402

OUT = ROOT / "structure" / "data" / "elemental_ground_states.json.gz"
ATTRIBUTION = ("Materials Project structures, (c) Materials Project, CC BY 4.0: A. Jain et al., APL Materials 1, "
               "011002 (2013), https://materialsproject.org. Selected by scripts/make_elemental_references.py from "
               "../shared/data/structures/mp_union.csv.gz (MP-20, MPTS-52 and MP-40 splits) with e_above_hull "
               "from ../shared/data/formulas/mp_formulas.csv where mp_union lacks it.")
#: elements mp_union holds no structure of: MP's ground-state prototype (space group, a in Å, MP id)
CONSTRUCTED = {"Pt": ("Fm-3m", 3.977, "mp-126")}
_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+(?:'([^']*)'|\"([^\"]*)\"|(\S+))")


def ground_states(shared: Path) -> list[dict]:
    import pandas as pd
    from pymatgen.core import Composition, Lattice, Structure

    from evaluation.hull import ReferenceHull

    union = pd.read_csv(shared / "data/structures/mp_union.csv.gz", usecols=["material_id", "cif", "e_above_hull"])
    union["composition"] = [Composition(next(g for g in _FORMULA_SUM.search(c).groups() if g)) for c in union["cif"]]
    union = union[[len(c.elements) == 1 for c in union["composition"]]].copy()
    known = pd.read_csv(shared / "data/formulas/mp_formulas.csv", usecols=["material_id", "e_above_hull"])
    known = dict(zip(known["material_id"], known["e_above_hull"]))
    # on a tie, mp_union's own value first: mp_formulas gives 0 to polymorphs MP places far above the hull (all
    # its N entries are 0, mp-754514 among them, which mp_union puts 1.04 eV/atom up)
    union["rank"] = [0 if pd.notna(e) else 1 if pd.notna(known.get(m)) else 2
                     for m, e in zip(union["material_id"], union["e_above_hull"])]
    union["e_above_hull"] = [e if pd.notna(e) else known.get(m) for m, e in zip(union["material_id"],
                                                                                union["e_above_hull"])]
    union["element"] = [c.elements[0].symbol for c in union["composition"]]
    union["n_atoms"] = [int(c.num_atoms) for c in union["composition"]]
    union["e_key"] = union["e_above_hull"].round(3)
    union = union.sort_values(["element", "e_key", "rank", "n_atoms", "material_id"])
    rows = []
    for element, group in union.groupby("element", sort=True):
        best = group.iloc[0]
        e_hull = None if pd.isna(best["e_above_hull"]) else round(float(best["e_above_hull"]), 6)
        source = ("mp_union", "mp_union; e_above_hull from mp_formulas", "mp_union; e_above_hull unknown")[best["rank"]]
        rows.append({"element": element, "material_id": best["material_id"], "e_above_hull": e_hull,
                     "n_atoms": int(best["n_atoms"]), "source": source, "cif": best["cif"]})
    have = {r["element"] for r in rows}
    for element, (group, a, mid) in CONSTRUCTED.items():
        if element in have:
            continue
        s = Structure.from_spacegroup(group, Lattice.cubic(a), [element], [[0, 0, 0]]).get_primitive_structure()
        rows.append({"element": element, "material_id": mid, "e_above_hull": 0.0, "n_atoms": len(s),
                     "source": f"constructed ({group}, a = {a} Å, the prototype of {mid})", "cif": s.to(fmt="cif")})
    hull_elements = ReferenceHull.default().elements
    missing = sorted(set(hull_elements) - {r["element"] for r in rows})
    if missing:
        raise SystemExit(f"no ground state for {', '.join(missing)}: add them to CONSTRUCTED")
    return sorted((r for r in rows if r["element"] in hull_elements), key=lambda r: r["element"])


def check(shared: Path, potential: str) -> int:
    """Relax every mp_union elemental polymorph with ``potential`` against the shipped ground states."""
    import time
    import warnings

    import pandas as pd
    from pymatgen.core import Composition

    from evaluation.io import write_text
    from structure.io import structure_from_cif
    from structure.relax import ElementalReferences, ground_states

    warnings.simplefilter("ignore")
    union = pd.read_csv(shared / "data/structures/mp_union.csv.gz", usecols=["material_id", "cif"])
    polymorphs: dict[str, list] = {}
    for cif in union["cif"]:
        comp = Composition(next(g for g in _FORMULA_SUM.search(cif).groups() if g))
        if len(comp.elements) == 1:
            polymorphs.setdefault(comp.elements[0].symbol, []).append(structure_from_cif(cif))
    refs = ElementalReferences(potential, candidates=lambda el: polymorphs.get(el, []))
    t0 = time.perf_counter()
    lines = [f"# Elemental ground states checked with {potential}", "",
             f"Command: `python scripts/make_elemental_references.py --check {potential}`. Every single-element "
             "structure of mp_union.csv.gz relaxed (FIRE, fmax 0.05, <= 500 steps) beside the shipped ground state; "
             "an element is listed when a polymorph lies more than 0.05 eV/atom below it under this potential.", "",
             "| element | shipped ground state | polymorphs | lowest polymorph - ground state (eV/atom) | note |",
             "|---|---|---:|---:|---|"]
    for el in sorted(ground_states()):
        try:
            entry = refs.entry(el)
        except ValueError as err:
            lines.append(f"| {el} | {ground_states()[el]['material_id']} | {len(polymorphs.get(el, []))} | | {err} |")
            continue
        low = entry["store_min_energy_per_atom"]
        gap = "" if low is None else f"{low - entry['ground_state_energy_per_atom']:+.3f}"
        if entry.get("note"):
            lines.append(f"| {el} | {ground_states()[el]['material_id']} | {entry['n_candidates']} | {gap} | "
                         f"{entry['note']} |")
    lines += ["", f"{len(ground_states())} elements checked in {time.perf_counter() - t0:.0f} s; the others agree."]
    write_text(ROOT / "benchmarks" / "elemental_references_check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--check", metavar="POTENTIAL", help="measure the shipped table with this potential instead")
    args = ap.parse_args()
    if args.check:
        return check(args.shared, args.check)
    rows = ground_states(args.shared)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(OUT) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as fh:
        json.dump({"attribution": ATTRIBUTION, "ground_states": rows}, fh, indent=0)
    above = [f"{r['element']} {r['e_above_hull']:.3f}" for r in rows if (r["e_above_hull"] or 0) > 0.001]
    unknown = [r["element"] for r in rows if r["e_above_hull"] is None]
    fallback = [f"{r['element']} {r['material_id']}" for r in rows if r["source"] != "mp_union"]
    print(f"wrote {OUT.relative_to(ROOT)}: {len(rows)} elements; above MP's hull (eV/atom): {', '.join(above)}; "
          f"e_above_hull unknown: {', '.join(unknown) or 'none'}; not from mp_union's own value: {', '.join(fallback)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
