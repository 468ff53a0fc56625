"""Reading and writing crystal structure files: the one home of every structure reader and writer.

Readers
    :func:`read_structures` reads a structure collection (a CDVAE-style CSV(.gz) with a ``cif`` column, a
    CIF/POSCAR file, pymatgen JSON, extxyz, or a folder of these) as :class:`Record` s;
    :func:`read_generated_structures` reads generated structures (a generator's output folder, a CSV with a
    ``cif`` column, a zip of CIFs, or anything :func:`read_structures` reads), keeping an unreadable entry
    as ``None`` so that it counts as invalid.
Writers
    :func:`write_outputs` writes the output rows (:class:`Row`) of ``structure``, ``cdvae sample`` and
    ``compare`` as ``structures.csv``, ``structures_cif.zip`` (one CIF per structure) and
    ``structures.extxyz`` (the CSV's columns in each frame's info), each to a temporary file then renamed.
"""

from __future__ import annotations

import gzip
import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.io import atomic_path, write_csv

__all__ = ["COLUMNS", "GENERATOR_OUTPUTS", "Record", "Row", "cif_name", "read_generated_structures",
           "read_structures", "structure_from_cif", "write_outputs"]


@dataclass
class Record:
    """One structure read from a collection."""

    id: str
    structure: object  # pymatgen Structure
    tags: str = ""
    e_above_hull: float = float("nan")


# ------------------------------------------------------------------------------------------- readers
def structure_from_cif(text: str):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen reports rounded coordinates in every MP CIF
        return Structure.from_str(text, fmt="cif")


def _read_csv(path: Path) -> Iterator[Record]:
    import pandas as pd

    df = pd.read_csv(path)
    if "cif" not in df.columns:
        raise ValueError(f"{path}: a structure CSV needs a 'cif' column (columns: {', '.join(map(str, df.columns))})")
    ids = df["material_id"].astype(str) if "material_id" in df.columns else df.index.astype(str)
    tags = df["split_tags"].fillna("").astype(str) if "split_tags" in df.columns else [""] * len(df)
    ehull = df["e_above_hull"] if "e_above_hull" in df.columns else [float("nan")] * len(df)
    for i, cif, t, e in zip(ids, df["cif"], tags, ehull):
        try:
            structure = structure_from_cif(cif)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: row {i}: unreadable CIF ({err})") from err
        yield Record(str(i), structure, t, float(e) if e == e else float("nan"))


def _read_json(path: Path) -> Iterator[Record]:
    from pymatgen.core import Structure

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    items = data.items() if isinstance(data, dict) and "lattice" not in data else enumerate(
        data if isinstance(data, list) else [data])
    stem = path.name.removesuffix(".gz").removesuffix(".json")
    for key, d in items:
        try:
            structure = Structure.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: entry {key!r} is not a pymatgen Structure dict ({type(e).__name__}: {e})") from e
        yield Record(f"{stem}:{key}", structure)


def _read_extxyz(path: Path) -> Iterator[Record]:
    from ase.io import iread
    from pymatgen.io.ase import AseAtomsAdaptor

    for i, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
        yield Record(str(atoms.info.get("id", f"{path.stem}:{i}")), AseAtomsAdaptor.get_structure(atoms))


_FILE_PATTERNS = ("*.cif", "*.vasp", "POSCAR*", "CONTCAR*", "*.json", "*.json.gz", "*.extxyz", "*.xyz")


def _read_file(path: Path) -> Iterator[Record]:
    from pymatgen.core import Structure

    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        yield from _read_csv(path)
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json(path)
    elif name.endswith((".extxyz", ".xyz")):
        yield from _read_extxyz(path)
    elif name.endswith(".cif"):
        yield Record(path.stem, structure_from_cif(path.read_text()))
    elif name.endswith(".vasp") or name.startswith(("poscar", "contcar")):
        yield Record(path.stem if name.endswith(".vasp") else path.parent.name + "/" + path.name,
                     Structure.from_file(path))
    else:
        raise ValueError(f"{path}: unknown structure format (expected CSV with a cif column, CIF, POSCAR, "
                         "pymatgen JSON or extxyz)")


def read_structures(source: str | Path) -> Iterator[Record]:
    """Structures from a CDVAE-style CSV(.gz) with a ``cif`` column (``material_id``, ``split_tags`` and
    ``e_above_hull`` used when present), a CIF/POSCAR file, a pymatgen JSON file (one Structure dict,
    a list of them or an id -> dict mapping), an extxyz file, or a folder of any of these."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no structure collection at {path}")
    if path.is_dir():
        stores = {d.parent for d in path.rglob("store.safetensors")}  # a store saved inside the source
        files = sorted({f for pattern in _FILE_PATTERNS for f in path.rglob(pattern)
                        if f.is_file() and not any(d in f.parents for d in stores)})
        if not files:
            raise ValueError(f"{path}: no CIF, POSCAR, JSON or extxyz files found")
        for f in files:
            yield from _read_file(f)
    else:
        yield from _read_file(path)


GENERATOR_OUTPUTS = ("structures.extxyz", "structures_cif.zip")  # what write_outputs writes, best source first


def _read_cif_csv(path: Path) -> list:
    """Structures of a CSV(.gz) with a ``cif`` column; an empty or unreadable CIF becomes None (invalid)."""
    import pandas as pd

    df = pd.read_csv(path)
    if "cif" not in df.columns:
        raise ValueError(f"{path}: a structure CSV needs a 'cif' column (columns: {', '.join(map(str, df.columns))})")
    out = []
    for cif in df["cif"]:
        try:
            out.append(structure_from_cif(cif) if isinstance(cif, str) and cif.strip() else None)
        except Exception:  # any parser error: the sample is unreadable, hence invalid
            out.append(None)
    return out


def _read_cif_zip(path: Path) -> list:
    """Structures of every ``*.cif`` member of a zip, by name; an unreadable CIF becomes None (invalid)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a readable zip file ({e})") from e
    with zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".cif"))
        if not names:
            raise ValueError(f"{path}: the zip holds no .cif files")
        out = []
        for name in names:
            try:
                out.append(structure_from_cif(zf.read(name).decode("utf-8", errors="replace")))
            except Exception:
                out.append(None)
    return out


def read_generated_structures(path: str | Path) -> tuple[list, str]:
    """(structures, None for unreadable ones; the file actually read) of a generator output folder, a CSV
    with a cif column, a zip of CIFs, or anything :func:`read_structures` reads."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no generated structures at {path}")
    if path.is_dir():
        outputs = [path / name for name in GENERATOR_OUTPUTS if (path / name).is_file()]
        if outputs:  # a generator's output folder: one source only (extxyz first: exact coordinates)
            return read_generated_structures(outputs[0])
        return [r.structure for r in read_structures(path)], str(path)
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return _read_cif_csv(path), str(path)
    if name.endswith(".zip"):
        return _read_cif_zip(path), str(path)
    try:
        return [r.structure for r in read_structures(path)], str(path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # ase / pymatgen parser errors
        raise ValueError(f"{path}: could not read structures ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------- writers
COLUMNS = ["index", "formula", "rank", "template_id", "template_formula", "template_spacegroup", "similarity",
           "n_sites", "volume", "energy_per_atom", "formation_energy_per_atom", "status", "reason"]


@dataclass
class Row:
    """One output row: a structure predicted from a template, sampled by CDVAE or relaxed, with where it
    came from (``status`` and ``reason`` say what happened; ``structure`` is a pymatgen ``Structure``, or
    None for a formula that yielded none). :class:`structure.StructurePredictor` returns these."""

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


def write_outputs(rows: list[Row], out_dir: str | Path) -> dict[str, Path]:
    """``structures.csv``, ``structures_cif.zip`` and ``structures.extxyz`` in ``out_dir``."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "structures.csv", "cif_zip": out / "structures_cif.zip", "extxyz": out / "structures.extxyz"}
    write_csv(paths["csv"], COLUMNS, (r.values() for r in rows))
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
