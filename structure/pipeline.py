"""Formulas in, structures out: the batch behind ``composition-gen structure``.

For each formula: parse it, skip it (a row with the reason) if it fails the cdvae validity check unless
invalid formulas are included, predict up to ``top_k`` structures from ratio-matching templates
(:func:`structure.predict.predict`), optionally relax them with M3GNet and compute the formation energy
per atom against elemental references relaxed with the same potential. A formula that cannot be
handled becomes a row with a status and a reason; the batch goes on.

Outputs (:func:`write_outputs`, each written to a temporary file and renamed): ``structures.csv``,
``structures_cif.zip`` (one CIF per structure) and ``structures.extxyz`` (same structures, the CSV's
columns in each frame's info).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.composition import try_parse_formula
from evaluation.io import atomic_path
from evaluation.validity import check_formula
from structure.descriptors import element_dissimilarity
from structure.predict import predict
from structure.substitution import substitute
from structure.templates import element_of

COLUMNS = ["index", "formula", "rank", "template_id", "template_formula", "template_spacegroup", "similarity",
           "n_sites", "volume", "energy_per_atom", "formation_energy_per_atom", "status", "reason"]


@dataclass
class Row:
    index: int
    formula: str
    rank: int | None = None
    template_id: str = ""
    template_formula: str = ""
    template_spacegroup: str = ""
    similarity: float | None = None
    n_sites: int | None = None
    volume: float | None = None
    energy_per_atom: float | None = None
    formation_energy_per_atom: float | None = None
    status: str = ""
    reason: str = ""
    structure: object = field(default=None, repr=False)

    def values(self) -> list:
        return [getattr(self, c) for c in COLUMNS]


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


def relax_rows(rows: list[Row], potential: str, references, fmax: float = 0.05, max_steps: int = 500,
               workers: int = 1, progress: bool = True) -> None:
    """Relax every predicted row in place: structure, volume, energy/atom, formation energy/atom, status
    and reason from :func:`structure.relax.relax_many`."""
    from structure.relax import relax_many

    todo = [r for r in rows if r.structure is not None]
    results = relax_many([r.structure for r in todo], potential, fmax=fmax, max_steps=max_steps, workers=workers,
                         progress=progress)
    for row, res in zip(todo, results):
        row.status, row.reason = res.status, res.reason
        if res.structure is not None and res.status != "failed":
            row.structure = res.structure
            row.volume = round(res.structure.volume, 4)
        if math.isfinite(res.energy_per_atom):
            row.energy_per_atom = round(res.energy_per_atom, 6)
            try:
                row.formation_energy_per_atom = round(
                    references.formation_energy_per_atom(row.structure.composition, res.energy_per_atom), 6)
            except ValueError as e:
                row.reason = (row.reason + "; " if row.reason else "") + f"no formation energy: {e}"


def write_outputs(rows: list[Row], out_dir: str | Path) -> dict[str, Path]:
    """``structures.csv``, ``structures_cif.zip`` and ``structures.extxyz`` in ``out_dir``."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "structures.csv", "cif_zip": out / "structures_cif.zip", "extxyz": out / "structures.extxyz"}
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if v is None else v for v in r.values()])
    with_structure = [r for r in rows if r.structure is not None]
    with atomic_path(paths["cif_zip"]) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for r in with_structure:
            zf.writestr(cif_name(r), str(CifWriter(r.structure)))
    with atomic_path(paths["extxyz"]) as tmp:
        frames = []
        for r in with_structure:
            atoms = AseAtomsAdaptor.get_atoms(r.structure)
            atoms.info.update({c: v for c, v in zip(COLUMNS, r.values()) if v not in (None, "")})
            frames.append(atoms)
        buf = io.StringIO()
        if frames:
            ase_write(buf, frames, format="extxyz")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return paths


def cif_name(row: Row) -> str:
    return f"{row.index:05d}_{row.formula}_rank{row.rank}.cif"
