"""Composition descriptors for ranking structure templates (CSPML-style).

A query formula and a template share their *ratio key* (sorted reduced stoichiometric counts, e.g.
``1-1-3`` for ABX3), so their elements can be lined up site group by site group. The descriptor of a
composition is two blocks, both built from one per-element property table (pymatgen's element data):

* **aligned block** -- the elements ordered by (reduced count, Pauling electronegativity, Z), at most
  :data:`MAX_ELEMENTS` slots, each slot holding the element's properties (zeros beyond the last element).
  Two compositions with the same ratio key put chemically corresponding elements in the same slot, so
  ``|d_query - d_template|`` says how far each site's element is from the template's.
* **statistics block** -- the atom-fraction-weighted mean, minimum, maximum and standard deviation
  of each property over the composition (Magpie-style), for what the alignment cannot see.

:data:`PROPERTIES` lists the properties (the per-element table lives in :mod:`evaluation.element_data`,
which the composition property predictor shares). The first eight (:data:`BASIC_PROPERTIES`, from pymatgen):
Pauling electronegativity, periodic row, group, atomic radius (Å), Mendeleev number, atomic number,
the mean ionic radius over common oxidation states (Å) and the number of valence electrons as the group
implies. Then twelve from the Magpie element table that matminer ships (Ward et al. 2016; the element
properties CSPML's XenonPy descriptors also draw on): melting point, covalent radius, s/p/d/f valence
electrons, unfilled valence states, ground-state volume per atom, band gap and magnetic moment of the
elemental solid, the element's space group number, and first ionisation energy. Missing values (e.g.
the electronegativity of He) are filled with the property's mean over the elements that have it.
:func:`property_columns` gives the descriptor columns of any subset of properties, so a ranker can be
trained on the basic eight alone (the comparison of ``benchmarks/csp.md``).

Descriptors are a pure function of the reduced composition: template stores compute them when loaded
(:func:`descriptors_of`, cached per formula) instead of storing them.

The ranker (:mod:`structure.ranking`) learns which of these differences matter; the same table also
gives the element dissimilarity used for substitution (:func:`element_dissimilarity`).
"""

from __future__ import annotations

import math

import numpy as np
from pymatgen.core import Composition, Element

from evaluation.element_data import (  # noqa: F401
    BASIC_PROPERTIES,
    MAGPIE_PROPERTIES,
    N_PROPS,
    PROPERTIES,
    element_properties,
    property_scale,
    property_table,
)

MAX_ELEMENTS = 8
STATS = ("mean", "min", "max", "std")
DESCRIPTOR_SIZE = MAX_ELEMENTS * N_PROPS + len(STATS) * N_PROPS
DESCRIPTOR_VERSION = 2


def property_columns(properties=PROPERTIES) -> np.ndarray:
    """Descriptor columns (aligned slots and statistics) that belong to ``properties``."""
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"unknown descriptor properties {sorted(unknown)}; known: {', '.join(PROPERTIES)}")
    pick = [PROPERTIES.index(p) for p in properties]
    blocks = MAX_ELEMENTS + len(STATS)
    return np.array([b * N_PROPS + p for b in range(blocks) for p in pick], dtype=np.int64)


def descriptors_of(formulas) -> np.ndarray:
    """``[len(formulas), DESCRIPTOR_SIZE]`` float32 descriptors, each distinct formula computed once."""
    cache: dict[str, np.ndarray] = {}
    out = np.zeros((len(formulas), DESCRIPTOR_SIZE), dtype=np.float32)
    for i, f in enumerate(formulas):
        if f not in cache:
            cache[f] = descriptor(f)
        out[i] = cache[f]
    return out


def reduced_counts(composition: Composition | str) -> dict[str, int]:
    """Element -> integer amount divided by the greatest common divisor (``O2`` -> ``{"O": 1}``, unlike
    pymatgen's reduced formula, which keeps diatomic gases as ``O2``)."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    amounts = {el.symbol: comp[el] for el in comp.elements}
    if not amounts:
        raise ValueError("empty composition")
    if any(abs(a - round(a)) > 1e-6 for a in amounts.values()):
        raise ValueError(f"{comp.formula} has non-integer amounts (a disordered composition)")
    ints = {s: int(round(a)) for s, a in amounts.items()}
    g = math.gcd(*ints.values())
    return {s: a // g for s, a in ints.items()}


def ratio_key(composition: Composition | str) -> str:
    """Sorted reduced stoichiometric counts: ``ratio_key("SrTiO3") == "1-1-3"``."""
    return "-".join(str(c) for c in sorted(reduced_counts(composition).values()))


def ordered_elements(composition: Composition | str) -> list[tuple[str, int]]:
    """``(symbol, reduced count)`` ordered by (count, electronegativity, Z): the slot order of the
    aligned block."""
    rows = list(reduced_counts(composition).items())
    return sorted(rows, key=lambda r: (r[1], element_properties(r[0])[0], Element(r[0]).Z))


def descriptor(composition: Composition | str) -> np.ndarray:
    """The ``DESCRIPTOR_SIZE`` float32 vector of a composition (see the module docstring)."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    rows = ordered_elements(comp)
    if len(rows) > MAX_ELEMENTS:
        raise ValueError(f"{comp.reduced_formula} has {len(rows)} elements; descriptors support at most {MAX_ELEMENTS}")
    props = np.stack([element_properties(s) for s, _ in rows])
    counts = np.array([c for _, c in rows], dtype=np.float64)
    w = counts / counts.sum()
    aligned = np.zeros((MAX_ELEMENTS, N_PROPS))
    aligned[: len(rows)] = props
    mean = w @ props
    std = np.sqrt(w @ (props - mean) ** 2)
    stats = np.concatenate([mean, props.min(0), props.max(0), std])
    return np.concatenate([aligned.ravel(), stats]).astype(np.float32)


def element_dissimilarity(a: str, b: str) -> float:
    """Distance between two elements for substitution: the L1 distance of electronegativity, row, group,
    atomic radius and mean ionic radius, each divided by its spread over the periodic table."""
    pick = [PROPERTIES.index(p) for p in ("electronegativity", "row", "group", "atomic_radius", "ionic_radius")]
    scale = property_scale()[pick]
    return float(np.abs(element_properties(a)[pick] - element_properties(b)[pick]).dot(1 / scale))
