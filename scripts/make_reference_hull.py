"""Derive the package's default reference hull from the Materials Project formula data in ../shared.

Writes ``evaluation/data/mp_hull.csv.gz``: one row per MP entry with a formation energy (``material_id,
reduced_formula, formation_energy_per_atom`` in eV/atom, ``source``), under a header that carries the
attribution; ``evaluation.hull.ReferenceHull`` builds its phase diagrams from it. Entries of
``mp_union.csv.gz`` (MP's MP2020-corrected values, as in MP-20) come first; the entries of
``mp_formulas.csv`` that it lacks fill the hull's gaps, moved onto the MP2020 scale first: mp_formulas holds MP's
legacy corrections (no Br, I, Se, Te or Sb anion correction, another sulfide one), so its Br compounds sat
~0.5 eV per Br atom above mp_union's. :func:`legacy_offsets` fits one offset per element on the 21,196 entries
both price (Br -0.51, I -0.36, Se -0.46, Te -0.39, Sb -0.17, S +0.17 eV per atom of the element; the MP2020
anion corrections are -0.534, -0.379, -0.472, -0.422, -0.192); elements keep 0, as no anion correction
applies to them. An element's entries take their ``e_above_hull``,
which for an element is its formation energy. Compositions MP lists that neither source gives an energy for
(1,628, among them CsF, NaF, RbCl, KBr and CaS) get an *estimated* one (source ``estimated ...``), since a hull
without them puts every compound of their chemical systems far too low (Cs3DyF6 came out 1.8 eV/atom below a
Cs-Dy-F hull that lacked CsF): the shipped composition property predictor's formation energy (MAE 0.091 eV/atom
on MP test formulas), moved onto the MP2020 scale, and capped by what MP says about the composition: at most the
hull of the priced phases plus the composition's MP ``e_above_hull`` (an entry MP puts on the hull cannot lie
above the hull of the others). ``evaluation.hull`` names the estimated phases a candidate's verdict rests on, and
a candidate at such a composition itself keeps its lower-bound flag.
Measured on 1,000 MP-20 test entries with their own DFT formation energies, each without its own entry, against
MP's e_above_hull (the oracle row of benchmarks/stability.md): mp_union alone MAE 0.0072 eV/atom, F1 (stable)
0.816, 196 unscored; mp_formulas alone 0.0125, 0.817; both without the offsets 0.0090, 0.898; both with them
0.0052, F1 0.918 at <= 0 (recall at <= 0.1: 0.966 -> 0.987), none unscored.

    python scripts/make_reference_hull.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import atomic_path  # noqa: E402

ATTRIBUTION = [
    "# Materials Project formation energies per atom (eV/atom), (c) Materials Project, CC BY 4.0:",
    "# A. Jain et al., APL Materials 1, 011002 (2013), https://materialsproject.org.",
    "# Derived by scripts/make_reference_hull.py from ../shared/data/structures/mp_union.csv.gz (MP-20, MPTS-52, MP-40)",
    "# and ../shared/data/formulas/mp_formulas.csv (MP entries as shipped in CompRhys/roost mp-formation.csv, MIT,",
    "# and hackingmaterials/automatminer mp_nostruct.csv, BSD).",
]


_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+(?:'([^']*)'|\"([^\"]*)\"|(\S+))")


def _union_table(path: Path):
    """``material_id, reduced_formula, formation_energy_per_atom, e_above_hull`` of mp_union.csv.gz (the
    formula read from each CIF's ``_chemical_formula_sum``)."""
    import pandas as pd
    from pymatgen.core import Composition

    u = pd.read_csv(path, usecols=["material_id", "cif", "formation_energy_per_atom", "e_above_hull"])
    u["reduced_formula"] = [Composition(next(g for g in _FORMULA_SUM.search(c).groups() if g)).reduced_formula
                            for c in u["cif"]]
    return u.drop(columns="cif")


def _with_elements(df):
    """An element's formation energy per atom is its energy above its own ground state: its e_above_hull."""
    elemental = df["reduced_formula"].str.fullmatch(r"[A-Z][a-z]?\d*") & df["formation_energy_per_atom"].isna()
    df.loc[elemental, "formation_energy_per_atom"] = df.loc[elemental, "e_above_hull"]
    return df[df["formation_energy_per_atom"].notna()]


#: elements whose anion correction differs between MP's legacy scheme (mp_formulas.csv) and MP2020 (mp_union)
SCALE_ELEMENTS = ("Br", "I", "Se", "Te", "Sb", "S", "N", "H", "Cl", "F", "O", "Si")


def legacy_offsets(union, formulas) -> dict[str, float]:
    """Per-element offsets (eV per atom of the element) that put mp_formulas.csv's formation energies (MP's
    legacy correction scheme: no Br, I, Se, Te or Sb anion correction, another sulfide one) on mp_union's MP2020
    scale: least squares of the difference over the entries both price, on the atomic fractions of
    :data:`SCALE_ELEMENTS`. A shift linear in composition leaves every E_hull within one scale unchanged; it
    matters where the two scales meet (this hull's fill-ins; WBM's labels against an MP2020 prediction)."""
    import numpy as np
    from pymatgen.core import Composition

    both = union.merge(formulas, on="material_id", suffixes=("_u", "_f")).dropna(
        subset=["formation_energy_per_atom_u", "formation_energy_per_atom_f"])
    x = np.array([[Composition(f).get_atomic_fraction(e) for e in SCALE_ELEMENTS] for f in both["reduced_formula_f"]])
    d = (both["formation_energy_per_atom_u"] - both["formation_energy_per_atom_f"]).to_numpy(float)
    coef, *_ = np.linalg.lstsq(x, d, rcond=None)
    return {e: round(float(c), 4) for e, c in zip(SCALE_ELEMENTS, coef)}


def to_mp2020(formulas: list[str], energies, offsets: dict[str, float], inverse: bool = False) -> list[float]:
    """Legacy-scale formation energies moved onto the MP2020 scale with :func:`legacy_offsets` (``inverse``: MP2020
    ones moved onto the legacy scale)."""
    from pymatgen.core import Composition

    out = []
    for f, e in zip(formulas, energies):
        comp = Composition(f)
        shift = sum(comp.get_atomic_fraction(el) * c for el, c in offsets.items() if el in comp)
        shift = -shift if inverse else shift
        out.append(float(e) + (shift if len(comp.elements) > 1 else 0.0))  # an element is its own zero
    return out


#: the source of an estimated entry (evaluation.hull.ESTIMATED_SOURCE names the same prefix)
ESTIMATED = "estimated: composition model (MP lists it without an energy)"


def estimate_unpriced(priced, unpriced, offsets: dict[str, float]):
    """Rows (``material_id, reduced_formula, formation_energy_per_atom, source``) for compositions MP lists without
    a formation energy: the shipped composition predictor's estimate on the MP2020 scale, capped at the hull of the
    ``priced`` phases plus the composition's MP e_above_hull (NaN taken as 0)."""
    import pandas as pd

    from evaluation.hull import ReferenceHull
    from evaluation.properties import PropertyPredictor

    names = unpriced["reduced_formula"].tolist()
    legacy = PropertyPredictor.load().predict(names)["formation_energy_per_atom"]
    predicted = to_mp2020(names, legacy, offsets)
    hull = ReferenceHull(priced["reduced_formula"].tolist(), priced["formation_energy_per_atom"].tolist(),
                         priced["material_id"].tolist())
    capped = []
    for f, e, above in zip(names, predicted, unpriced["e_above_hull"].fillna(0.0)):
        ceiling = hull.e_above_hull(f, 0.0).e_hull_formation + float(above)  # hull of the priced phases here
        capped.append(min(e, ceiling) if ceiling == ceiling else e)
    return pd.DataFrame({"material_id": unpriced["material_id"].tolist(), "reduced_formula": names,
                         "formation_energy_per_atom": capped, "source": ESTIMATED})


def main() -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "evaluation" / "data" / "mp_hull.csv.gz")
    args = ap.parse_args()
    cols = ["material_id", "reduced_formula", "formation_energy_per_atom"]
    union = _with_elements(_union_table(args.shared / "data" / "structures" / "mp_union.csv.gz"))[cols]
    formulas = pd.read_csv(args.shared / "data" / "formulas" / "mp_formulas.csv", keep_default_na=False,
                           na_values=[""], dtype={"reduced_formula": str, "material_id": str})
    all_formulas = formulas
    formulas = _with_elements(formulas.copy())[cols]
    offsets = legacy_offsets(union, formulas)
    print("legacy -> MP2020 offsets (eV per atom of the element):", offsets)
    formulas["formation_energy_per_atom"] = to_mp2020(formulas["reduced_formula"], formulas["formation_energy_per_atom"],
                                                      offsets)
    df = pd.concat([union.assign(source="mp_union"),
                    formulas[~formulas["material_id"].isin(union["material_id"])].assign(source="mp_formulas")])
    # compositions MP knows but no source gives an energy for (CsF, KBr, ...): an estimated energy, so that the
    # compounds of their chemical systems are not placed against a hull with a hole in it
    unpriced = (all_formulas[~all_formulas["reduced_formula"].isin(df["reduced_formula"])]
                .sort_values("e_above_hull").drop_duplicates("reduced_formula"))
    df = pd.concat([df, estimate_unpriced(df, unpriced, offsets)])
    df = df.drop_duplicates("material_id").sort_values(["reduced_formula", "formation_energy_per_atom", "material_id"])
    df["formation_energy_per_atom"] = df["formation_energy_per_atom"].map(lambda x: f"{x:.6f}" if x == x else "")
    text = "\n".join(ATTRIBUTION) + "\n" + df.to_csv(index=False, lineterminator="\n")
    with atomic_path(args.output) as tmp, gzip.GzipFile(tmp, "wb", mtime=0) as fh:
        fh.write(text.encode("utf-8"))
    print(f"wrote {len(df)} entries ({(df['source'] == 'mp_union').sum()} from mp_union, "
          f"{(df['source'] == ESTIMATED).sum()} compositions with an estimated energy), "
          f"{df['reduced_formula'].nunique()} reduced formulas to {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
