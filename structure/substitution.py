"""Element substitution into a template structure.

A query and a template with the same ratio key have the same multiset of reduced counts. Elements are
matched within each group of equal reduced count (the only sites they can occupy with the right
stoichiometry): the assignment that minimises the summed :func:`~structure.descriptors.element_dissimilarity`
(electronegativity, row, group, atomic and ionic radius, each scaled by its spread over the table),
solved exactly with the Hungarian algorithm.

The substituted cell is then rescaled isotropically to an estimated volume: the template's volume times
``sum(n_i r_i^3)`` of the new elements over the same sum for the template's elements, with r the atomic
radius of :mod:`structure.descriptors`' table -- a crude but monotone estimate that a relaxation refines.
"""

from __future__ import annotations

import numpy as np
from pymatgen.core import Composition, Structure

from structure.descriptors import PROPERTIES, element_dissimilarity, element_properties, reduced_counts


def assign_elements(query: Composition | str, template: Composition | str) -> dict[str, str]:
    """Template element -> query element, within groups of equal reduced count (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    q, t = reduced_counts(query), reduced_counts(template)
    if sorted(q.values()) != sorted(t.values()):
        raise ValueError(f"{Composition(query).reduced_formula} and {Composition(template).reduced_formula} "
                         "have different stoichiometric ratios")
    mapping: dict[str, str] = {}
    for count in sorted(set(q.values())):
        qs = sorted(s for s, c in q.items() if c == count)
        ts = sorted(s for s, c in t.items() if c == count)
        cost = np.array([[element_dissimilarity(a, b) for b in qs] for a in ts])
        rows, cols = linear_sum_assignment(cost)
        mapping.update({ts[r]: qs[c] for r, c in zip(rows, cols)})
    return mapping


def _radius_volume(structure: Structure) -> float:
    r = PROPERTIES.index("atomic_radius")
    return float(sum(element_properties(site.specie.symbol)[r] ** 3 for site in structure))


def substitute(template: Structure, query: Composition | str, scale_volume: bool = True) -> Structure:
    """A copy of ``template`` with its elements replaced by the query's (:func:`assign_elements`) and,
    if ``scale_volume``, its cell rescaled to the estimated volume. The result's reduced composition is
    the query's."""
    out = template.copy()
    out.remove_oxidation_states()  # substitution works on elements
    mapping = assign_elements(query, out.composition)
    out.replace_species(mapping)
    if scale_volume:
        out.scale_lattice(template.volume * _radius_volume(out) / _radius_volume(template))
    return out
