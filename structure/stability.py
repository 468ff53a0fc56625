"""Thermodynamic stability of structures: M3GNet energy -> formation energy -> energy above the convex hull.

:class:`StabilityScorer` relaxes each structure (or evaluates it as given, ``relax=False``) with a matgl
potential through :class:`structure.Relaxer`, turns the energy into a formation energy per atom against
elemental references relaxed with the same potential, puts it on the Materials Project scale and places it
on the hull of a :class:`evaluation.hull.ReferenceHull` (default: the shipped MP table).

The energy scale (``correction``):

``mp2020`` (default)
    M3GNet-MP-2021 learnt MP's *uncorrected* energies (GGA, and GGA+U for oxides and fluorides of Co, Cr, Fe,
    Mn, Mo, Ni, V, W), while the reference hull holds MP's *corrected* formation energies. As Matbench
    Discovery does, each structure becomes a ``ComputedStructureEntry`` with the parameters MP would have run
    it with (``run_type`` GGA+U with MP's U values for those compositions, else GGA), and pymatgen's
    ``MaterialsProject2020Compatibility`` adds its anion and GGA/GGA+U mixing corrections. A composition the
    scheme rejects keeps its uncorrected energy and says so in ``reason``.
``none``
    The M3GNet formation energy as it is, against the DFT hull.

``benchmarks/stability.md`` measures both on MP-20 test structures (``scripts/bench_stability.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.hull import ReferenceHull

__all__ = ["CORRECTIONS", "STABILITY_COLUMNS", "StabilityRecord", "StabilityScorer", "correction_per_atom",
           "mp2020_correction"]

CORRECTIONS = ("mp2020", "none")
STABILITY_COLUMNS = ["index", "formula", "energy_per_atom", "e_form_per_atom", "e_hull_per_atom", "decomposition",
                     "status", "reason"]


@dataclass
class StabilityRecord:
    """One structure's stability: ``status`` is the relaxation's (``converged``, ``not_converged``,
    ``failed``) or ``static`` (energy of the structure as given); ``e_hull_per_atom`` is NaN, with the
    ``reason``, when the structure could not be placed on the hull."""

    index: int
    formula: str
    energy_per_atom: float = math.nan
    e_form_per_atom: float = math.nan
    e_hull_per_atom: float = math.nan
    decomposition: str = ""
    status: str = ""
    reason: str = ""
    correction_per_atom: float = 0.0
    hull_lower_bound: bool = False  # the reference knows this composition without an energy (see HullResult)
    structure: object = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """Plain-dict form (the structure as ``Structure.as_dict()``), to travel between processes."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["structure"] = None if self.structure is None else self.structure.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StabilityRecord:
        from pymatgen.core import Structure

        return cls(**{**d, "structure": None if d["structure"] is None else Structure.from_dict(d["structure"])})

    def values(self) -> list:
        def cell(v):
            return "" if isinstance(v, float) and not math.isfinite(v) else round(v, 6) if isinstance(v, float) else v

        return [cell(getattr(self, c)) for c in STABILITY_COLUMNS]


def _u_values() -> dict[str, float]:
    from pymatgen.io.vasp.sets import MPRelaxSet

    return dict(MPRelaxSet.CONFIG["INCAR"]["LDAUU"]["O"])  # MP uses the same U for oxides and fluorides


def mp2020_correction(structure, energy_per_atom: float) -> tuple[float, str]:
    """``(correction in eV/atom, "")`` that ``MaterialsProject2020Compatibility`` adds to a structure computed
    as MP would have (GGA+U with MP's U values for an oxide or fluoride of a U element, else GGA), or
    ``(0.0, reason)`` when the scheme rejects it."""
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    symbols = {el.symbol for el in structure.composition.elements}
    u = _u_values()
    plus_u = bool(symbols & {"O", "F"}) and bool(symbols & set(u))
    hubbards = {el: (u.get(el, 0.0) if plus_u else 0.0) for el in symbols} if plus_u else {}
    params = {"run_type": "GGA+U" if plus_u else "GGA", "hubbards": hubbards, "is_hubbard": plus_u,
              "potcar_spec": []}
    entry = ComputedStructureEntry(structure, energy_per_atom * len(structure), parameters=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            processed = _compatibility().process_entry(entry)
        except Exception as err:  # pymatgen raises on odd oxidation states etc.
            return 0.0, f"no MP2020 correction ({type(err).__name__}: {err})"
    if processed is None:
        return 0.0, "MP2020 compatibility rejects this composition: uncorrected energy"
    return float(processed.correction_per_atom), ""


def correction_per_atom(structure, energy_per_atom: float, correction: str = "mp2020") -> tuple[float, str]:
    """What puts an M3GNet formation energy on the reference hull's scale under the energy scale
    ``correction`` (:data:`CORRECTIONS`): :func:`mp2020_correction` for ``mp2020``, ``(0.0, "")`` for ``none``.
    The one definition :class:`StabilityScorer`, ``compare`` and the stability benchmark share."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    return mp2020_correction(structure, energy_per_atom) if correction == "mp2020" else (0.0, "")


_COMPAT = None


def _compatibility():
    global _COMPAT
    if _COMPAT is None:
        from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

        _COMPAT = MaterialsProject2020Compatibility(check_potcar=False)
    return _COMPAT


class StabilityScorer:
    """Energy above the hull of structures (see the module docstring).

    ``potential``: matgl hub name or folder. ``reference``: a :class:`~evaluation.hull.ReferenceHull`, a
    table path (CSV of formula + formation_energy_per_atom, or a JSON list of pymatgen entries) or None for
    the shipped MP table. ``references``: the template store (object or folder) whose single-element
    structures give the elemental energies (default: pymatgen's AFLOW prototypes). ``relax``: relax first
    (cell + positions) or evaluate the structures as given. ``optimizer`` and ``batch_size``: as for
    :class:`~structure.Relaxer`.

    >>> from pymatgen.core import Lattice, Structure
    >>> from structure.stability import StabilityScorer
    >>> scorer = StabilityScorer("../shared/models/matgl/M3GNet-MP-2021.2.8-PES")  # doctest: +SKIP
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> record = scorer.score([nacl])[0]  # doctest: +SKIP
    >>> record.status, record.decomposition  # doctest: +SKIP
    ('converged', '1 NaCl')
    """

    def __init__(self, potential: str | Path = "M3GNet-MP-2021.2.8-PES", reference=None, relax: bool = True,
                 fmax: float = 0.05, max_steps: int = 500, references=None, cache_dir: str | Path | None = None,
                 correction: str = "mp2020", optimizer: str = "FIRE", batch_size: int = 1,
                 time_limit: float | None = None):
        from structure.pipeline import Relaxer

        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
        self.hull = reference if isinstance(reference, ReferenceHull) else ReferenceHull.load(reference)
        # references get at least 500 FIRE steps: a molecular crystal such as Cl2 needs them, and a reference
        # that does not converge would leave every compound of its element without a formation energy
        self.relaxer = Relaxer(potential, fmax=fmax, max_steps=max_steps, references=references, cache_dir=cache_dir,
                               reference_max_steps=max(max_steps, 500), optimizer=optimizer, batch_size=batch_size,
                               time_limit=time_limit)
        self.relax_first, self.correction = relax, correction
        hull_file = None if isinstance(reference, ReferenceHull) and reference is ReferenceHull.default() else (
            reference.source if isinstance(reference, ReferenceHull) else reference)
        store_path = getattr(references, "path", references)
        from structure.pipeline import DEFAULT_TEMPLATES

        if store_path is not None and Path(store_path).resolve() == DEFAULT_TEMPLATES.resolve():
            store_path = None
        self._settings = {"potential": str(potential), "reference": None if hull_file is None else str(hull_file),
                          "relax": relax, "fmax": fmax, "max_steps": max_steps,
                          "references": None if store_path is None else str(store_path),
                          "cache_dir": None if cache_dir is None else str(cache_dir), "correction": correction,
                          "optimizer": optimizer, "batch_size": batch_size, "time_limit": time_limit}

    def settings(self) -> dict:
        """The arguments that rebuild this scorer in another process (paths as strings; the shipped hull and
        template store as None): what :mod:`structure.distributed` sends to Dask workers."""
        return dict(self._settings)

    def score(self, structures, exclude=None, workers: int = 1, progress: bool = False) -> list[StabilityRecord]:
        """One :class:`StabilityRecord` per structure, in input order (a ``None`` structure, e.g. an
        unreadable input, gives a failed record). ``exclude[i]``: reference ids left out of structure ``i``'s
        hull (a known compound scored against the hull without its own entry)."""
        structures = list(structures)
        exclude = list(exclude) if exclude is not None else [()] * len(structures)
        todo = [i for i, s in enumerate(structures) if s is not None]
        evaluate = self.relaxer.relax if self.relax_first else self.relaxer.energies
        results = dict(zip(todo, evaluate([structures[i] for i in todo], workers=workers, progress=progress)))
        return [self._record(i, structures[i], results.get(i), exclude[i]) for i in range(len(structures))]

    def _record(self, index: int, structure, result, exclude) -> StabilityRecord:
        if structure is None:
            return StabilityRecord(index, "", status="failed", reason="unreadable structure")
        rec = StabilityRecord(index, structure.composition.reduced_formula, structure=structure)
        rec.status = "static" if not self.relax_first and result.status != "failed" else result.status
        if result.status == "failed":
            rec.reason = result.reason
            return rec
        if self.relax_first:
            rec.structure = result.structure
            if result.status == "not_converged":
                rec.reason = result.reason
        rec.energy_per_atom = result.energy_per_atom
        notes = [rec.reason] if rec.reason else []
        try:
            e_form = self.relaxer.formation_energy_per_atom(rec.structure.composition, result.energy_per_atom)
        except ValueError as err:
            rec.reason = "; ".join([*notes, f"no formation energy: {err}"])
            return rec
        rec.correction_per_atom, why = correction_per_atom(rec.structure, result.energy_per_atom, self.correction)
        if why:
            notes.append(why)
        rec.e_form_per_atom = e_form + rec.correction_per_atom
        hull = self.hull.e_above_hull(rec.structure.composition, rec.e_form_per_atom, exclude=exclude)
        rec.e_hull_per_atom, rec.decomposition = hull.e_hull_per_atom, hull.decomposition
        rec.hull_lower_bound = hull.lower_bound
        if hull.reason:
            notes.append(hull.reason)
        rec.reason = "; ".join(notes)
        return rec


def write_stability(records: list[StabilityRecord], path: str | Path) -> Path:
    """``stability.csv``: :data:`STABILITY_COLUMNS`, one row per record, NaN as an empty cell."""
    from evaluation.io import write_csv

    write_csv(path, STABILITY_COLUMNS, (r.values() for r in records))
    return Path(path)
