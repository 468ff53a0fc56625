"""Per-element property table shared by the composition descriptors of the structure templates
(:mod:`structure.descriptors`) and the composition property predictor (:mod:`evaluation.properties`).

:data:`PROPERTIES`: the first eight (:data:`BASIC_PROPERTIES`, from pymatgen) are Pauling
electronegativity, periodic row, group, atomic radius (Å), Mendeleev number, atomic number, the mean
ionic radius over common oxidation states (Å) and the number of valence electrons as the group implies;
then twelve from the Magpie element table that matminer ships (Ward et al. 2016): melting point, covalent
radius, s/p/d/f valence electrons, unfilled valence states, ground-state volume per atom, band gap and
magnetic moment of the elemental solid, the element's space group number and first ionisation energy.
Missing values (e.g. the electronegativity of He) are filled with the property's mean over the elements
that have it. Read from installed files only (no network), once per process.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from pymatgen.core import Element

__all__ = ["BASIC_PROPERTIES", "MAGPIE_PROPERTIES", "N_PROPS", "PROPERTIES", "element_properties", "property_scale",
           "property_table"]

BASIC_PROPERTIES = ("electronegativity", "row", "group", "atomic_radius", "mendeleev_no", "Z", "ionic_radius", "valence")
MAGPIE_PROPERTIES = ("MeltingT", "CovalentRadius", "NsValence", "NpValence", "NdValence", "NfValence", "NUnfilled",
                     "GSvolume_pa", "GSbandgap", "GSmagmom", "SpaceGroupNumber", "FirstIonizationEnergy")
PROPERTIES = BASIC_PROPERTIES + MAGPIE_PROPERTIES
N_PROPS = len(PROPERTIES)


def _raw_properties(el: Element) -> list[float]:
    def num(x) -> float:
        try:
            v = float(x)
        except (TypeError, ValueError):
            return math.nan
        return v if math.isfinite(v) else math.nan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about elements without an electronegativity
        radius = num(el.atomic_radius) if el.atomic_radius is not None else num(el.atomic_radius_calculated)
        states = el.common_oxidation_states
        ionic = [num(el.ionic_radii.get(s)) for s in states if s in el.ionic_radii]
        ionic = [r for r in ionic if not math.isnan(r)]
        group = el.group
        valence = group if group <= 2 else (group - 10 if group >= 13 else group)
        basic = [num(el.X), float(el.row), float(group), radius, num(el.mendeleev_no), float(el.Z),
                 float(np.mean(ionic)) if ionic else math.nan, float(valence)]
    magpie = _magpie()
    return basic + [num(magpie[p].get(el.symbol)) for p in MAGPIE_PROPERTIES]


@functools.cache
def _magpie() -> dict:
    """matminer's Magpie element table (read from the files matminer installs; no network)."""
    from matminer.utils.data import MagpieData

    return MagpieData().all_elemental_props


@functools.cache
def property_table() -> tuple[dict[str, int], np.ndarray]:
    """``(symbol -> row, [n_elements, N_PROPS] float64)`` for Z = 1..103, missing values filled with the
    property's mean."""
    symbols = [Element.from_Z(z).symbol for z in range(1, 104)]
    table = np.array([_raw_properties(Element(s)) for s in symbols], dtype=np.float64)
    means = np.nanmean(table, axis=0)
    table = np.where(np.isnan(table), means, table)
    return {s: i for i, s in enumerate(symbols)}, table


@functools.cache
def property_scale() -> np.ndarray:
    """Standard deviation of each property over the elements (to put dissimilarities on one scale)."""
    return property_table()[1].std(axis=0)


def element_properties(symbol: str) -> np.ndarray:
    index, table = property_table()
    if symbol not in index:
        raise ValueError(f"no element data for {symbol!r}")
    return table[index[symbol]]
