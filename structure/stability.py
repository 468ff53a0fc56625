"""Thermodynamic stability of structures: potential energy -> formation energy -> energy above the convex hull.

:class:`StabilityScorer` relaxes each structure (or evaluates it as given, ``relax=False``) with an interatomic
potential (:mod:`structure.potentials`; default :data:`~structure.potentials.DEFAULT_POTENTIAL`) through
:class:`structure.Relaxer`, turns the energy into a formation energy per atom against the shipped elemental
ground states relaxed with the same potential, puts it on the Materials Project scale and places it on the hull
of a :class:`evaluation.hull.ReferenceHull` (default: the shipped MP table).

The energy scale (``correction``):

``auto`` (default)
    What the potential needs (:attr:`structure.potentials.Potential.correction`): ``mp2020`` for a model trained
    on MP's uncorrected energies (M3GNet, SevenNet), ``none`` for one whose training energies already carry
    the corrections (CHGNet). A potential on another scale (MatPES) is refused against an MP hull.
``mp2020``
    The potential learnt MP's *uncorrected* energies (GGA, and GGA+U for oxides and fluorides of Co, Cr, Fe,
    Mn, Mo, Ni, V, W), while the reference hull holds MP's *corrected* formation energies. As Matbench
    Discovery does, each structure becomes a ``ComputedStructureEntry`` with the parameters MP would have run
    it with (``run_type`` GGA+U with MP's U values for those compositions, else GGA), and pymatgen's
    ``MaterialsProject2020Compatibility`` adds its anion and GGA/GGA+U mixing corrections. A composition the
    scheme rejects keeps its uncorrected energy and says so in ``reason``.
``none``
    The potential's formation energy as it is, against the DFT hull.

``benchmarks/stability_wbm.md`` measures each potential on WBM structures no potential trained on
(``scripts/bench_stability.py --set wbm``); ``benchmarks/stability.md`` on MP-20 test structures.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.hull import ReferenceHull

__all__ = ["CORRECTIONS", "STABILITY_COLUMNS", "Screening", "StabilityRecord", "StabilityScorer",
           "correction_per_atom", "mp2020_correction"]

CORRECTIONS = ("auto", "mp2020", "none")
STABILITY_COLUMNS = ["index", "formula", "energy_per_atom", "e_form_per_atom", "e_hull_per_atom", "e_hull_std",
                     "hull_lower_bound", "decomposition", "status", "reason"]


@dataclass
class StabilityRecord:
    """One structure's stability: ``status`` is the relaxation's (``converged``, ``not_converged``,
    ``failed``) or ``static`` (energy of the structure as given); ``e_hull_per_atom`` is NaN, with the
    ``reason``, when the structure could not be placed on the hull. With several judges (a committee or a
    two-stage scheme) ``e_form_per_atom`` and ``e_hull_per_atom`` are their mean and ``e_hull_std`` their
    spread (population standard deviation); ``energy_per_atom`` stays the relaxing potential's."""

    index: int
    formula: str
    energy_per_atom: float = math.nan
    e_form_per_atom: float = math.nan
    e_hull_per_atom: float = math.nan
    e_hull_std: float = math.nan  # spread of the judges' E_hull (NaN with one judge)
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


#: ``discover``'s screening (eV/atom above its stability threshold, steps), chosen in benchmarks/funnel_speed.md
DEFAULT_STOP_MARGIN, DEFAULT_JUDGE_MARGIN, DEFAULT_STOP_AFTER = 0.5, 0.2, 50
#: ``discover``'s other defaults from benchmarks/funnel_speed.md: no structure for a formula the composition property
#: predictor puts above this E_hull (eV/atom), and at most this many relaxation steps per structure. Together with
#: the screening they kept 32 of the 33 SUN candidates of 500 steps without the skip, on 200 formulas, at 0.68x the
#: CPU time.
DEFAULT_SKIP_ABOVE, DEFAULT_DISCOVER_MAX_STEPS = 0.15, 200


@dataclass(frozen=True)
class Screening:
    """Shortcuts that spend less on structures that cannot come out stable (``benchmarks/funnel_speed.md``
    measures what each saves and loses). Both bounds are on E_hull by the *relaxing* potential's own energy
    (eV/atom); None turns a shortcut off, and the default :class:`Screening()` turns both off.

    ``stop_above``: a relaxation whose structure still lies above this after ``stop_after`` steps stops there
    (status ``not_converged``, ``reason`` says so, and its E_hull, an upper estimate, is the relaxing potential's).
    ``judge_below``: the judges (two-stage or committee scoring) score only the structures whose relaxed E_hull is
    at most this; the others keep the relaxing potential's E_hull and say so.
    """

    stop_above: float | None = None
    stop_after: int = DEFAULT_STOP_AFTER
    judge_below: float | None = None

    def __post_init__(self) -> None:
        if self.stop_after < 0:
            raise ValueError(f"stop_after must be at least 0, got {self.stop_after}")

    @classmethod
    def of(cls, screening: Screening | dict | None) -> Screening:
        """``screening`` as a :class:`Screening` (a dict of its fields, or None for no shortcuts)."""
        if screening is None:
            return cls()
        return screening if isinstance(screening, cls) else cls(**dict(screening))

    @classmethod
    def for_threshold(cls, e_hull_max: float, stop_margin: float | None = DEFAULT_STOP_MARGIN,
                      judge_margin: float | None = DEFAULT_JUDGE_MARGIN,
                      stop_after: int = DEFAULT_STOP_AFTER) -> Screening:
        """Bounds a ``margin`` above a stability threshold (None: that shortcut off); the defaults are the
        margins ``discover`` uses, chosen in ``benchmarks/funnel_speed.md``."""
        return cls(stop_above=None if stop_margin is None else e_hull_max + stop_margin, stop_after=stop_after,
                   judge_below=None if judge_margin is None else e_hull_max + judge_margin)

    def as_dict(self) -> dict:
        return {"stop_above": self.stop_above, "stop_after": self.stop_after, "judge_below": self.judge_below}


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
    """What puts a potential's formation energy on the reference hull's scale under the energy scale
    ``correction`` (``mp2020`` or ``none``; resolve ``auto`` with :func:`resolve_correction` first):
    :func:`mp2020_correction` for ``mp2020``, ``(0.0, "")`` for ``none``. The one definition
    :class:`StabilityScorer`, ``compare`` and the stability benchmark share."""
    if correction not in ("mp2020", "none"):
        raise ValueError(f"correction must be mp2020 or none here, got {correction!r}")
    return mp2020_correction(structure, energy_per_atom) if correction == "mp2020" else (0.0, "")


def resolve_correction(potential, correction: str = "auto", mp_hull: bool = True) -> str:
    """``mp2020`` or ``none`` for a :class:`~structure.potentials.Potential` and a ``correction`` choice
    (:data:`CORRECTIONS`). ``ValueError`` for a potential whose energies are not on MP's scale placed on an MP
    hull (``mp_hull``); against a hull of the user's own (computed with that potential) it gets ``none``."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if potential.energy_scale not in ("mp-uncorrected", "mp-corrected"):
        if not mp_hull:
            return "none" if correction == "auto" else correction
        raise ValueError(f"potential {potential.name!r} was trained on the {potential.energy_scale} energy scale, not "
                         "the Materials Project's: its formation energies cannot be placed on the MP reference hull. "
                         "Use an MP-trained potential (chgnet, sevennet-0, m3gnet), or a reference hull of competing "
                         "phases computed with this same potential (--reference)")
    return potential.correction if correction == "auto" else correction


_COMPAT = None


def _compatibility():
    global _COMPAT
    if _COMPAT is None:
        from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

        _COMPAT = MaterialsProject2020Compatibility(check_potcar=False)
    return _COMPAT


class StabilityScorer:
    """Energy above the hull of structures (see the module docstring).

    ``potential``: a :class:`~structure.potentials.Potential`, a registered name, a matgl folder or hub name,
    or None for the default (installed with the package). ``judges``: potentials whose single points on the
    relaxed structures give E_hull (one: a two-stage scheme; several: a committee, mean and spread); None: the
    relaxing potential's own energy, or, when ``potential`` is None too, the default scheme
    (:data:`~structure.potentials.DEFAULT_POTENTIAL` judged by :data:`~structure.potentials.DEFAULT_JUDGES`).
    ``settings``: a :class:`~structure.relax.RelaxSettings` (or a dict of its fields). ``reference``: a
    :class:`~evaluation.hull.ReferenceHull`, a table path (CSV of formula + formation_energy_per_atom, or a JSON
    list of pymatgen entries) or None for the shipped MP table.
    ``references``: the template store (object or folder) whose single-element structures are checked against
    the shipped elemental ground states. ``relax``: relax first (cell + positions) or evaluate the structures as
    given. ``correction``: ``auto`` (what the potential needs), ``mp2020`` or ``none``. ``screening``: a
    :class:`Screening` (or a dict of its fields): early stop of hopeless relaxations, judges only for plausible
    structures (default: neither).

    >>> from pymatgen.core import Lattice, Structure
    >>> from structure.stability import StabilityScorer
    >>> scorer = StabilityScorer()  # doctest: +SKIP
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> record = scorer.score([nacl])[0]  # doctest: +SKIP
    >>> record.status, record.decomposition  # doctest: +SKIP
    ('converged', '1 NaCl')
    """

    def __init__(self, potential=None, settings=None, reference=None, relax: bool = True, references=None,
                 cache_dir: str | Path | None = None, correction: str = "auto", judges=None, screening=None):
        from structure.pipeline import DEFAULT_TEMPLATES, Relaxer
        from structure.relax import RelaxSettings

        settings = RelaxSettings.of(dict(settings) if isinstance(settings, tuple) else settings)
        self.screening = Screening.of(dict(screening) if isinstance(screening, tuple) else screening)
        self.hull = reference if isinstance(reference, ReferenceHull) else ReferenceHull.load(reference)
        self.relaxer = Relaxer(potential, settings=settings, references=references, cache_dir=cache_dir)
        self.potential = self.relaxer.potential
        mp_hull = reference is None or self.hull is ReferenceHull.default()
        self.correction = resolve_correction(self.potential, correction, mp_hull=mp_hull)
        self.relax_first = relax
        # judges: the potentials whose energies of the relaxed structure are averaged (default: the relaxing one;
        # with neither a potential nor judges given, the default two-stage scheme)
        if potential is None and judges is None:
            from structure.potentials import DEFAULT_JUDGES

            judges = list(DEFAULT_JUDGES) or None
        self.judges = [self.relaxer]
        if judges:
            from structure.potentials import get_potential

            self.judges = [self.relaxer if get_potential(j) is self.potential else
                           Relaxer(j, settings=settings, references=references, cache_dir=cache_dir) for j in judges]
        self.judge_corrections = [resolve_correction(j.potential, correction, mp_hull=mp_hull) for j in self.judges]
        hull_file = None if isinstance(reference, ReferenceHull) and reference is ReferenceHull.default() else (
            reference.source if isinstance(reference, ReferenceHull) else reference)
        store_path = getattr(references, "path", references)
        if store_path is not None and Path(store_path).resolve() == DEFAULT_TEMPLATES.resolve():
            store_path = None
        self._settings = {"potential": self.potential.spec, "settings": tuple(sorted(settings.as_dict().items())),
                          "reference": None if hull_file is None else str(hull_file), "relax": relax,
                          "references": None if store_path is None else str(store_path),
                          "cache_dir": None if cache_dir is None else str(cache_dir), "correction": correction,
                          "judges": None if judges is None else tuple(j.potential.spec for j in self.judges),
                          "screening": tuple(sorted(self.screening.as_dict().items()))}

    def describe(self) -> str:
        """One line for reports: which potential relaxed and which judged, on which energy scale."""
        how = "relaxed" if self.relax_first else "as given"
        if self.judges == [self.relaxer]:
            return f"{self.potential.name} ({self.potential.energy_scale}; correction {self.correction}; {how})"
        names = " + ".join(f"{j.potential.name} ({c})" for j, c in zip(self.judges, self.judge_corrections))
        kind = "committee mean" if len(self.judges) > 1 else "single point"
        return f"{how} with {self.potential.name}, judged by {kind} of {names}"

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
        inputs = [structures[i] for i in todo]
        if not self.relax_first:
            evaluated = self.relaxer.energies(inputs, workers=workers, progress=progress)
        elif self.screening.stop_above is not None:
            ceilings = [self._ceiling(structures[i], exclude[i]) for i in todo]
            evaluated = self.relaxer.relax(inputs, workers=workers, progress=progress, ceilings=ceilings,
                                           stop_after=self.screening.stop_after)
        else:
            evaluated = self.relaxer.relax(inputs, workers=workers, progress=progress)
        results = dict(zip(todo, evaluated))
        judged = self._judge_energies(structures, results, exclude, workers)
        return [self._record(i, structures[i], results.get(i), exclude[i], *judged.get(i, ([], "")))
                for i in range(len(structures))]

    def score_rows(self, rows, workers: int = 1, progress: bool = False) -> list[StabilityRecord]:
        """Score every output row that holds a structure (template predictions, CDVAE samples) and put the
        relaxation into the row as :meth:`Relaxer.relax_rows` does (relaxed structure, energy and formation energy
        by the relaxing potential, status, reason). One record per such row, in order, indexed as the row."""
        todo = [r for r in rows if r.structure is not None]
        records = self.score([r.structure for r in todo], workers=workers, progress=progress)
        for row, rec in zip(todo, records):
            if self.relax_first:
                self.relaxer.update_row(row, rec)
            rec.index = row.index
        return records

    @staticmethod
    def _e_form(judge, correction: str, structure, energy_per_atom: float) -> tuple[float, float, str]:
        """(formation energy per atom on the hull's scale, the correction in it, a note on the correction) by one
        potential's energy; ValueError where its elemental references lack an element."""
        e_form = judge.formation_energy_per_atom(structure.composition, energy_per_atom)
        corr, why = correction_per_atom(structure, energy_per_atom, correction)
        return e_form + corr, corr, why

    def _relaxer_e_hull(self, structure, energy_per_atom: float, exclude=()) -> float:
        """E_hull by the relaxing potential's own energy (NaN where it cannot be placed)."""
        try:
            e_form = self._e_form(self.relaxer, self.correction, structure, energy_per_atom)[0]
        except ValueError:
            return math.nan
        return self.hull.e_above_hull(structure.composition, e_form, exclude=exclude).e_hull_per_atom

    def _ceiling(self, structure, exclude=()) -> float | None:
        """The relaxing potential's energy per atom at which ``structure`` lies ``screening.stop_above`` above the
        hull (None where it cannot be placed): E <= ceiling  <=>  E_hull <= stop_above."""
        if structure is None:
            return None
        try:
            mu = self.relaxer.formation_energy_per_atom(structure.composition, 0.0)  # -sum_el x_el E_el
        except ValueError:
            return None
        corr = correction_per_atom(structure, 0.0, self.correction)[0]
        hull_form = -self.hull.e_above_hull(structure.composition, 0.0, exclude=exclude).e_hull_per_atom
        ceiling = self.screening.stop_above + hull_form - mu - corr
        return float(ceiling) if math.isfinite(ceiling) else None

    def _judge_energies(self, structures, results: dict, exclude: list, workers: int) -> dict[int, tuple[list, str]]:
        """``index -> ([(judge, correction, energy per atom or None), ...], note)`` on each relaxed (or given)
        structure: every judge's, the relaxing potential's own energy where it is a judge; a structure that the
        screening leaves unjudged (stopped early, or relaxed E_hull above ``judge_below``) gets the relaxing
        potential's energy alone and a note saying why."""
        usable = [i for i, r in results.items() if r.status != "failed"]
        out: dict[int, tuple[list, str]] = {}
        judged = []
        solo = self.judges == [self.relaxer]
        bound = self.screening.judge_below
        for i in usable:
            r = results[i]
            final = r.structure if self.relax_first else structures[i]
            if solo:
                judged.append(i)
            elif r.stopped_early:
                out[i] = ([(self.relaxer, self.correction, r.energy_per_atom)],
                          f"not judged (stopped early): E_hull by {self.potential.name}")
            elif bound is not None and not self._relaxer_e_hull(final, r.energy_per_atom, exclude[i]) <= bound:
                out[i] = ([(self.relaxer, self.correction, r.energy_per_atom)],
                          f"not judged: E_hull by {self.potential.name} above the screening bound {bound:g} eV/atom")
            else:
                judged.append(i)
        final = [results[i].structure if self.relax_first else structures[i] for i in judged]
        for i in judged:
            out[i] = ([], "")
        for judge, correction in zip(self.judges, self.judge_corrections):
            if judge is self.relaxer:
                energies = [results[i].energy_per_atom for i in judged]
            else:
                energies = [r.energy_per_atom if r.status != "failed" else None
                            for r in judge.energies(final, workers=workers)] if judged else []
            for i, e in zip(judged, energies):
                out[i][0].append((judge, correction, e))
        return out

    def _record(self, index: int, structure, result, exclude, scored: list, note: str = "") -> StabilityRecord:
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
        notes = [x for x in (rec.reason, note) if x]
        comp = rec.structure.composition
        e_forms, corrections = [], []
        for judge, correction, energy in scored:
            who = "" if len(scored) == 1 else f"{judge.potential.name}: "
            if energy is None or not math.isfinite(energy):
                notes.append(f"{who}no energy")
                continue
            try:
                e_form, corr, why = self._e_form(judge, correction, rec.structure, energy)
            except ValueError as err:
                notes.append(f"{who}no formation energy: {err}")
                continue
            if why:
                notes.append(f"{who}{why}")
            notes += [f"{who}{n}" for n in judge.references.notes(comp)]
            e_forms.append(e_form)
            corrections.append(corr)
        if len(e_forms) < len(scored):  # a committee member that cannot judge leaves the row unplaced
            rec.reason = "; ".join(notes)
            return rec
        rec.correction_per_atom = sum(corrections) / len(corrections)
        rec.e_form_per_atom = sum(e_forms) / len(e_forms)
        hull = self.hull.e_above_hull(comp, rec.e_form_per_atom, exclude=exclude)
        rec.e_hull_per_atom, rec.decomposition = hull.e_hull_per_atom, hull.decomposition
        if len(e_forms) > 1:  # the judges' own E_hull only for a committee's spread
            values = [self.hull.e_above_hull(comp, e, exclude=exclude).e_hull_per_atom for e in e_forms]
            mean = sum(values) / len(values)
            rec.e_hull_std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
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
