"""Energy above the convex hull, on the formation-energy scale.

A :class:`ReferenceHull` holds reference phases as (reduced formula, formation energy per atom, id). For a
candidate of composition ``c`` and formation energy ``E_f`` (eV/atom), :meth:`ReferenceHull.e_above_hull`
builds pymatgen's ``PhaseDiagram`` of the chemical system of ``c`` from every reference phase whose elements
lie in it, with each element at 0 eV/atom (the formation-energy scale: elements are the zero), and returns
``E_hull = E_f - E_hull_form(c)`` (negative: below the known hull) with the phases it decomposes into.
Diagrams are cached per chemical system. ``exclude`` leaves given reference ids out (to score a known
compound against the hull *without its own entry*).

An element counts as referenced when the table holds an entry of that element alone; a candidate with an
element that has none (a noble gas or Pm in some tables, or an element the table lacks) gets ``NaN`` with the
reason, and every other candidate is still scored.

The default reference (:meth:`ReferenceHull.default`) is the table ``evaluation/data/mp_hull.csv.gz`` that
``scripts/make_reference_hull.py`` derives from the Materials Project formula data in ``../shared``
(Materials Project, CC BY 4.0; see the file's header). MP lists some compositions without a formation energy
(CsF, NaF, KBr, ...); the table gives them an *estimated* one (``source`` starting with ``estimated``), and a
verdict that rests on an estimated phase says so in its ``reason`` (``HullResult.estimated``), since a hull with
a hole in it would put every compound of that chemical system far below it.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_HULL", "ESTIMATED_SOURCE", "HULL_NOTES", "HullResult", "ReferenceHull"]

#: the shipped reference table (Materials Project formation energies, CC BY 4.0)
DEFAULT_HULL = Path(__file__).resolve().parent / "data" / "mp_hull.csv.gz"
#: a reference table's ``source`` of an entry whose energy is an estimate, not a calculation
ESTIMATED_SOURCE = "estimated"
#: how the notes of :meth:`ReferenceHull.e_above_hull` begin (to replace them when a verdict is placed again)
HULL_NOTES = ("E_hull is a lower bound", "the hull here rests on", "no reference for", "unreadable composition",
              "no formation energy")


@dataclass(frozen=True)
class HullResult:
    """Where a candidate stands against the hull of its chemical system.

    ``e_hull_per_atom``: eV/atom above the hull (negative below it; NaN when it cannot be placed);
    ``decomposition``: the reference phases it decomposes into with their fractions, e.g.
    ``"0.5 NaCl + 0.5 Na"`` (the candidate's own formula when it lies on or below the hull);
    ``e_hull_formation``: the hull's formation energy at the candidate's composition; ``reason``: why NaN, or
    why the value is only a ``lower_bound`` (the reference knows a phase of this very composition but holds
    no energy for it, so the true hull there may be lower and the candidate's E_hull higher).
    """

    e_hull_per_atom: float
    decomposition: str = ""
    e_hull_formation: float = math.nan
    reason: str = ""
    lower_bound: bool = False  # the table knows the composition without an energy: the true E_hull may be higher
    estimated: tuple[str, ...] = ()  # the hull phases here whose energies are estimates (named in ``reason``)


def _reduced(formula: str) -> tuple[str, frozenset[str]]:
    from pymatgen.core import Composition

    comp = Composition(formula)
    return comp.reduced_formula, frozenset(el.symbol for el in comp.elements)


class ReferenceHull:
    """Reference phases on the formation-energy scale; ``e_above_hull`` places candidates against them.

    >>> from evaluation.hull import ReferenceHull
    >>> hull = ReferenceHull(["Na", "Cl", "NaCl", "NaCl3"], [0.0, 0.0, -2.0, -0.5])
    >>> r = hull.e_above_hull("NaCl", -1.9)
    >>> round(r.e_hull_per_atom, 3), r.decomposition
    (0.1, '1 NaCl')
    >>> hull.e_above_hull("XeCl", -1.0).reason
    'no reference for Xe'
    """

    def __init__(self, formulas: Sequence[str], e_form_per_atom: Sequence[float], ids: Sequence[str] | None = None,
                 source: str = "", estimated: Iterable[str] = ()):
        if len(formulas) != len(e_form_per_atom):
            raise ValueError(f"{len(formulas)} formulas but {len(e_form_per_atom)} formation energies")
        ids = [str(i) for i in ids] if ids is not None else [f"ref-{i}" for i in range(len(formulas))]
        self.source = source
        self.estimated = set(map(str, estimated))  # ids of entries whose energy is an estimate
        self._by_system: dict[frozenset[str], list[tuple[str, str, float]]] = {}
        self.unpriced: dict[str, list[str]] = {}  # reduced formula -> ids known without an energy
        for formula, e, ident in zip(formulas, e_form_per_atom, ids):
            e = float(e)
            reduced, elements = _reduced(formula)
            if not math.isfinite(e):
                self.unpriced.setdefault(reduced, []).append(ident)
                continue
            self._by_system.setdefault(elements, []).append((ident, reduced, e))
        self.elements = frozenset(next(iter(s)) for s in self._by_system if len(s) == 1)
        priced = {f for entries in self._by_system.values() for _, f, _ in entries}
        self.unpriced = {f: ids for f, ids in self.unpriced.items() if f not in priced}
        measured = {f for entries in self._by_system.values() for i, f, _ in entries if i not in self.estimated}
        self._estimated_only = {f: [i for i in ids if i in self.estimated]
                                for f, ids in self._formula_ids().items() if f not in measured}
        self._cache: dict = {}

    def _formula_ids(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for entries in self._by_system.values():
            for ident, f, _ in entries:
                out.setdefault(f, []).append(ident)
        return out

    def __len__(self) -> int:
        """The number of reference phases with an energy."""
        return sum(len(v) for v in self._by_system.values())

    def formulas(self) -> set[str]:
        """Every reduced formula the reference knows, with or without an energy."""
        return {f for entries in self._by_system.values() for _, f, _ in entries} | set(self.unpriced)

    # ------------------------------------------------------------------------------------ readers
    @classmethod
    def from_csv(cls, path: str | Path) -> ReferenceHull:
        """A CSV(.gz) with a formula column (``reduced_formula``, ``formula`` or ``composition``) and
        ``formation_energy_per_atom`` (eV/atom); ``material_id`` (or ``id``) names the entries. A row without a
        formation energy records a composition known to exist (its E_hull results are then lower bounds); a
        ``source`` starting with ``estimated`` marks an entry whose energy is an estimate."""
        import pandas as pd

        df = pd.read_csv(path, keep_default_na=False, na_values=[""], comment="#")
        col = next((c for c in ("reduced_formula", "formula", "composition") if c in df.columns), None)
        if col is None or "formation_energy_per_atom" not in df.columns:
            raise ValueError(f"{path}: a reference table needs a formula column (reduced_formula, formula or "
                             f"composition) and formation_energy_per_atom (columns: {', '.join(map(str, df.columns))})")
        id_col = next((c for c in ("material_id", "id", "entry_id") if c in df.columns), None)
        ids = df[id_col].astype(str).tolist() if id_col else [f"ref-{i}" for i in range(len(df))]
        estimated = ([i for i, src in zip(ids, df["source"].astype(str)) if src.startswith(ESTIMATED_SOURCE)]
                     if "source" in df.columns else [])
        return cls(df[col].astype(str).tolist(), df["formation_energy_per_atom"].astype(float).tolist(), ids,
                   source=str(path), estimated=estimated)

    @classmethod
    def from_entries_json(cls, path: str | Path) -> ReferenceHull:
        """A JSON list of pymatgen entries (``ComputedEntry``/``ComputedStructureEntry``/``PDEntry`` dicts,
        e.g. ``json.dump([e.as_dict() for e in entries], f)``); their total energies are turned into formation
        energies against the lowest-energy elemental entry of each element in the list."""
        from monty.json import MontyDecoder

        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            entries = MontyDecoder().process_decoded(json.load(fh))
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: expected a JSON list of pymatgen entries")
        mu: dict[str, float] = {}
        for e in entries:
            if len(e.composition.elements) == 1:
                el = e.composition.elements[0].symbol
                mu[el] = min(mu.get(el, math.inf), e.energy_per_atom)
        formulas, energies, ids = [], [], []
        for i, e in enumerate(entries):
            els = [el.symbol for el in e.composition.elements]
            if any(el not in mu for el in els):
                continue
            frac = e.composition.fractional_composition
            formulas.append(e.composition.reduced_formula)
            energies.append(e.energy_per_atom - sum(frac[el] * mu[el] for el in els))
            ids.append(str(getattr(e, "entry_id", None) or f"entry-{i}"))
        return cls(formulas, energies, ids, source=str(path))

    @classmethod
    def load(cls, path: str | Path | None = None) -> ReferenceHull:
        """The shipped Materials Project table (None), a CSV(.gz) or a JSON list of pymatgen entries."""
        if path is None:
            return _default_hull()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference table at {path} (a CSV of formula + formation_energy_per_atom, "
                                    "or a JSON list of pymatgen entries)")
        if path.name.lower().endswith((".json", ".json.gz")):
            return cls.from_entries_json(path)
        return cls.from_csv(path)

    @classmethod
    def default(cls) -> ReferenceHull:
        return _default_hull()

    # ------------------------------------------------------------------------------------ the hull
    def entries(self, elements: Iterable[str], exclude: Iterable[str] = ()) -> list[tuple[str, str, float]]:
        """``(id, reduced formula, formation energy per atom)`` of every reference phase within ``elements``."""
        system = frozenset(elements)
        skip = set(exclude)
        out = []
        for k in range(1, len(system) + 1):
            for subset in itertools.combinations(sorted(system), k):
                out += [e for e in self._by_system.get(frozenset(subset), []) if e[0] not in skip]
        return out

    def phase_diagram(self, elements: Iterable[str], exclude: Iterable[str] = ()):
        """pymatgen ``PhaseDiagram`` of a chemical system on the formation-energy scale (cached)."""
        key = (frozenset(elements), frozenset(exclude))
        if key not in self._cache:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
            from pymatgen.core import Composition

            pd_entries = [PDEntry(Composition(el), 0.0, name=el) for el in sorted(key[0])]
            for ident, formula, e in self.entries(key[0], key[1]):
                comp = Composition(formula)
                pd_entries.append(PDEntry(comp, e * comp.num_atoms, name=formula, attribute=ident))
            if len(self._cache) > 2048:  # keep memory bounded on very long runs
                self._cache.clear()
            self._cache[key] = PhaseDiagram(pd_entries)
        return self._cache[key]

    def e_above_hull(self, composition, e_form_per_atom: float, exclude: Iterable[str] = ()) -> HullResult:
        """``composition`` (formula or pymatgen ``Composition``) with formation energy ``e_form_per_atom``
        against the hull of its chemical system without the reference ids in ``exclude``."""
        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition

        try:
            comp = Composition(composition)
        except Exception as err:  # pymatgen raises several kinds on a bad formula
            return HullResult(math.nan, reason=f"unreadable composition {composition!r} ({err})")
        if e_form_per_atom is None or not math.isfinite(float(e_form_per_atom)):
            return HullResult(math.nan, reason="no formation energy")
        elements = sorted(el.symbol for el in comp.elements)
        missing = [el for el in elements if el not in self.elements]
        if missing:
            return HullResult(math.nan, reason=f"no reference for {', '.join(missing)}")
        pd = self.phase_diagram(elements, exclude)
        entry = PDEntry(comp, float(e_form_per_atom) * comp.num_atoms, name="candidate")
        decomp, e_hull = pd.get_decomp_and_e_above_hull(entry, allow_negative=True)
        e_hull = float(e_hull)
        hull_form = float(e_form_per_atom) - e_hull
        if e_hull <= 1e-12:
            text = f"1 {comp.reduced_formula}"
        else:
            text = " + ".join(f"{amount:.3g} {e.composition.reduced_formula}"
                              for e, amount in sorted(decomp.items(), key=lambda kv: -kv[1]))
        known = self.unpriced.get(comp.reduced_formula) or self._estimated_only.get(comp.reduced_formula)
        if known:
            how = "without an energy" if comp.reduced_formula in self.unpriced else "with an estimated energy only"
            return HullResult(float(e_hull), text, hull_form, lower_bound=True,
                              reason=f"E_hull is a lower bound: the reference knows {comp.reduced_formula} "
                              f"({', '.join(known[:3])}) {how}")
        estimated = tuple(sorted({e.composition.reduced_formula for e in decomp
                                  if getattr(e, "attribute", None) in self.estimated}))
        if estimated:
            return HullResult(float(e_hull), text, hull_form, estimated=estimated,
                              reason=f"the hull here rests on an estimated energy for {', '.join(estimated)} (MP lists "
                              f"{'it' if len(estimated) == 1 else 'them'} without one)")
        return HullResult(float(e_hull), text, hull_form)


@functools.cache
def _default_hull() -> ReferenceHull:
    if not DEFAULT_HULL.is_file():
        raise FileNotFoundError(f"the shipped reference hull is missing at {DEFAULT_HULL} (rebuild it with "
                                "scripts/make_reference_hull.py)")
    return ReferenceHull.from_csv(DEFAULT_HULL)
