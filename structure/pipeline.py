"""Formulas in, structures out: :class:`StructurePredictor` and :class:`Relaxer`, the objects behind
``composition-gen structure`` (and the relaxation of ``cdvae sample`` and ``compare``).

For each formula: parse it, skip it (a row with the reason) if it fails the cdvae validity check unless
invalid formulas are included, predict up to ``top_k`` structures from ratio-matching templates
(:func:`structure.predict.predict`), optionally relax them with an interatomic potential and compute the formation
energy per atom against elemental references relaxed with the same potential. A formula that cannot be
handled becomes a row with a status and a reason; the batch goes on.

The rows are written by :func:`structure.io.write_outputs`.
"""

from __future__ import annotations

import functools

import math
import warnings
from pathlib import Path

from evaluation.composition import try_parse_formula
from evaluation.validity import check_formula
from structure.descriptors import element_dissimilarity
from structure.io import Row
from structure.predict import predict
from structure.substitution import substitute
from structure.templates import TemplateStore, aflow_store, element_of

__all__ = ["Relaxer", "StructurePredictor", "elemental_candidates", "predict_formulas"]


def _spacegroup(structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        return f"{sga.get_space_group_symbol()} ({sga.get_space_group_number()})"
    except Exception:  # symmetry search can fail on odd cells; the column is informative only
        return ""


def elemental_candidates(store, max_candidates: int = 3):
    """``element -> structures`` for reference energies: the store's structures of that element (lowest
    energy above hull first), else the element substituted into the elemental templates of its most
    similar elements."""

    def candidates(element: str) -> list:
        rows = store.elemental(element)[:max_candidates]
        if rows:
            return [store.structure(i) for i in rows]
        others = sorted({element_of(store.formulas[i]) for i in store.rows_with_key("1")},
                        key=lambda e: element_dissimilarity(e, element))
        structs = [store.structure(store.elemental(e)[0]) for e in others[:max_candidates]]
        return [substitute(s, element) for s in structs]

    return candidates


def predict_formulas(formulas: list[str], store, ranker, top_k: int = 5, ranking: str = "learned",
                     include_invalid: bool = False, seed: int = 0, progress: bool = True,
                     group_types: bool = True) -> list[Row]:
    """Rows of predicted (unrelaxed) structures, ``status`` "predicted", or one row per formula that
    yields none (``unparseable``, ``skipped``, ``no_template``, ``failed``)."""
    from tqdm.auto import tqdm

    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, text in enumerate(tqdm(formulas, desc="structures", unit="formula", disable=not progress)):
            f, err = try_parse_formula(text)
            if f is None:
                rows.append(Row(i, text, status="unparseable", reason=err))
                continue
            formula = str(f)
            if not include_invalid:
                verdict = check_formula(f, "cdvae")
                if not verdict.valid:
                    rows.append(Row(i, formula, status="skipped",
                                    reason=f"fails the cdvae validity check ({verdict.reason}); use --include-invalid"))
                    continue
            try:
                preds = predict(store, formula, top_k=top_k, ranking=ranking, ranker=ranker, seed=seed,
                                group_types=group_types)
            except ValueError as e:
                rows.append(Row(i, formula, status="failed", reason=str(e)))
                continue
            if not preds:
                rows.append(Row(i, formula, status="no_template",
                                reason="no template with the same stoichiometric ratios"))
                continue
            for p in preds:
                rows.append(Row(i, formula, p.rank, p.template_id, p.template_formula,
                                _spacegroup(store.structure(p.template_row)), round(p.similarity, 6), len(p.structure),
                                round(p.structure.volume, 4), status="predicted", structure=p.structure))
    return rows


#: where reference energies for the shipped template store are kept between runs (relaxed once per potential)
USER_CACHE = Path.home() / ".cache" / "composition-gen"
#: the compact Materials Project template store shipped in the package (scripts/make_default_templates.py)
DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "pretrained" / "templates-mp"


def default_store() -> TemplateStore:
    """The shipped compact MP store, else (an installation without it) pymatgen's AFLOW prototypes; loaded once
    per process (several seconds) and shared, read-only."""
    return _load_default(DEFAULT_TEMPLATES)


@functools.lru_cache(maxsize=2)
def _load_default(folder: Path) -> TemplateStore:
    if (folder / "store.json").is_file():
        return TemplateStore.load(folder)
    return aflow_store()


def _shipped(store: TemplateStore) -> bool:
    return store.path is not None and DEFAULT_TEMPLATES.resolve() == Path(store.path).resolve()


def _as_store(templates) -> TemplateStore:
    if templates is None:
        return default_store()
    if isinstance(templates, TemplateStore):
        return templates
    return TemplateStore.load(templates)


class StructurePredictor:
    """Crystal structures of formulas from templates, CSPML-style: the templates with the formula's
    stoichiometric ratios, ranked by learned composition similarity (grouped by structure type), with the
    elements substituted and the cell scaled.

    ``templates``: a :class:`~structure.templates.TemplateStore`, a store folder (``composition-gen templates
    build``), or None for the compact Materials Project store shipped in the package (pymatgen's 288 AFLOW
    prototypes in an installation without it). ``ranker``: a ranker folder for the
    ``learned`` ranking (default: the store's own, else the shipped one). ``ranking``: ``learned``, ``plain``
    (descriptor distance) or ``random`` (the baseline).

    >>> from structure import StructurePredictor
    >>> predictions = StructurePredictor().predict(["NaCl", "SrTiO3"], top_k=2)
    >>> list((p.formula, p.rank) for p in predictions)
    [('NaCl', 1), ('NaCl', 2), ('SrTiO3', 1), ('SrTiO3', 2)]
    >>> predictions[0].structure.composition.reduced_formula
    'NaCl'
    """

    def __init__(self, templates=None, ranker=None, ranking: str = "learned", group_types: bool = True):
        from structure.predict import RANKINGS
        from structure.ranking import DEFAULT_RANKER, CompositionRanker

        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
        self.store = _as_store(templates)
        self.ranking, self.group_types = ranking, group_types
        self.ranker = None
        if ranking == "learned":
            own = self.store.path if self.store.path is not None and (self.store.path / "ranker.json").exists() else None
            self.ranker = CompositionRanker.load(ranker or own or DEFAULT_RANKER)

    def predict(self, formulas, top_k: int = 5, include_invalid: bool = False, seed: int = 0,
                progress: bool = False) -> list[Row]:
        """Up to ``top_k`` structures per formula, as :class:`~structure.io.Row` s (``formula``, ``rank``,
        ``template_id``, ``similarity``, ..., ``structure``), in input order. A formula that yields none
        (unparseable, failing the cdvae validity check unless ``include_invalid``, no template with its
        ratios) gets one row whose ``status`` and ``reason`` say why."""
        if isinstance(formulas, str):
            formulas = [formulas]
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return predict_formulas(list(formulas), self.store, self.ranker, top_k=top_k, ranking=self.ranking,
                                include_invalid=include_invalid, seed=seed, progress=progress,
                                group_types=self.group_types)


class Relaxer:
    """Relaxation with an interatomic potential (ASE optimizer on cell and positions), and formation energies
    against elemental references relaxed with the same potential.

    ``potential``: a :class:`~structure.potentials.Potential`, a registered name (``chgnet``, ``sevennet-0``,
    ``m3gnet``, ...), a matgl model folder or hub name, or None for
    :data:`~structure.potentials.DEFAULT_POTENTIAL`, installed with the package. ``settings``: a
    :class:`~structure.relax.RelaxSettings` (or a dict of its fields). ``references``: the template store
    (object or folder) whose single-element structures are checked against the shipped elemental ground states
    (:class:`~structure.relax.ElementalReferences`; default: the shipped compact MP store); the references are
    relaxed on first use, with at least 500 steps (a molecular crystal such as Cl2 needs them), and cached in
    ``elemental_references.json`` in that store's folder, else in ``cache_dir``, else (the shipped store) in
    :data:`USER_CACHE`, so that each potential relaxes them once per machine.

    >>> from pymatgen.core import Lattice, Structure
    >>> from structure import Relaxer
    >>> relaxer = Relaxer("chgnet")  # doctest: +SKIP
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> result = relaxer.relax([nacl])[0]  # doctest: +SKIP
    >>> result.status, round(result.energy_per_atom, 1)  # doctest: +SKIP
    ('converged', -3.7)
    """

    def __init__(self, potential=None, settings=None, references=None, cache_dir: str | Path | None = None):
        from structure.relax import RelaxSettings, load_potential

        self.settings = RelaxSettings.of(settings)
        self.potential = load_potential(potential)  # a bad potential fails here, before any other work
        self._references, self._cache_dir = references, cache_dir
        self._elemental = None

    @property
    def references(self):
        """The :class:`~structure.relax.ElementalReferences` (built on first use)."""
        if self._elemental is None:
            from structure.relax import ElementalReferences

            store = _as_store(self._references)
            if store.path is not None and not _shipped(store):
                folder = Path(store.path)
            elif self._cache_dir is not None:
                folder = Path(self._cache_dir)
            else:  # never write into the package; a user's own calculator (no spec) is not cached across runs
                folder = USER_CACHE / "references" / (store.path.name if store.path else "aflow") \
                    if self.potential.spec is not None else None
            cache = folder / "elemental_references.json" if folder is not None else None
            self._elemental = ElementalReferences(self.potential, elemental_candidates(store), cache_path=cache,
                                                  fmax=self.settings.fmax, max_steps=max(self.settings.max_steps, 500))
        return self._elemental

    def relax(self, structures, workers: int = 1, progress: bool = False, ceilings=None,
              stop_after: int = 50) -> list:
        """One :class:`~structure.relax.RelaxResult` per structure (``structure``, ``energy_per_atom``,
        ``status``, ``reason``, ...), in input order; a structure that cannot be relaxed gives a ``failed``
        result, never an exception. ``workers`` > 1 relaxes in that many processes. ``ceilings`` and
        ``stop_after``: early stop of hopeless relaxations (:func:`structure.batched.relax_batched`)."""
        from structure.relax import relax_many

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        return relax_many(list(structures), self.potential, workers=workers, progress=progress,
                          ceilings=ceilings, stop_after=stop_after, **self.settings.as_dict())

    def energies(self, structures, workers: int = 1, progress: bool = False) -> list:
        """The energy of each structure as given (no relaxation; status ``not_converged`` with 0 steps, or
        ``failed`` for a structure that cannot be evaluated), as :class:`~structure.relax.RelaxResult` s."""
        from structure.relax import relax_many

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        return relax_many(list(structures), self.potential, fmax=self.settings.fmax, max_steps=0, workers=workers,
                          progress=progress, batch_size=self.settings.batch_size)

    def formation_energy_per_atom(self, composition, energy_per_atom: float) -> float:
        """eV/atom against the elemental references (``ValueError`` when an element has none)."""
        return self.references.formation_energy_per_atom(composition, energy_per_atom)

    def relax_rows(self, rows: list[Row], workers: int = 1, progress: bool = False) -> list[Row]:
        """Relax every row that holds a structure, in place: structure, volume, energy/atom, formation
        energy/atom, status and reason (the rows of :meth:`StructurePredictor.predict` or CDVAE samples)."""
        todo = [r for r in rows if r.structure is not None]
        results = self.relax([r.structure for r in todo], workers=workers, progress=progress)
        for row, res in zip(todo, results):
            self.update_row(row, res)
        return rows

    def update_row(self, row: Row, result) -> Row:
        """Put a relaxation's outcome (a :class:`~structure.relax.RelaxResult` or anything with its status,
        reason, structure and energy_per_atom) into ``row``: the relaxed structure, its volume, energy/atom and
        formation energy/atom by this potential (elemental references' notes added to the reason)."""
        row.status, row.reason = result.status, result.reason
        if result.structure is not None and result.status != "failed":
            row.structure = result.structure
            row.volume = round(result.structure.volume, 4)
        energy = result.energy_per_atom
        if energy is not None and math.isfinite(energy):
            row.energy_per_atom = round(energy, 6)
            try:
                row.formation_energy_per_atom = round(
                    self.formation_energy_per_atom(row.structure.composition, energy), 6)
                notes = self.references.notes(row.structure.composition)
            except ValueError as e:
                notes = [f"no formation energy: {e}"]
            present = row.reason.split("; ") if row.reason else []  # a judge's record may hold the same notes
            row.reason = "; ".join(present + [n for n in notes if n not in present])
        return row
