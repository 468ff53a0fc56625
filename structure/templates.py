"""Template store: crystal structures indexed by their ratio key, with composition descriptors.

Build one from any structure collection (:func:`structure.io.read_structures` says which formats), save it as a
folder, load it in seconds::

    store = TemplateStore.build(read_structures("mp_union.csv.gz"), exclude_tags={"mp20_test"})
    store.save("mp_union.db")
    store = TemplateStore.load("mp_union.db")
    rows = store.candidates("SrTiO3")          # every template with ratio key 1-1-3
    s = store.structure(rows[0])               # a pymatgen Structure

A store folder holds ``store.safetensors`` (lattices, atomic numbers and fractional coordinates of all
structures packed in flat arrays, and the descriptor matrix) and ``store.json`` (ids, reduced formulas,
ratio keys, tags, energies above hull, provenance). Nothing is pickled. A ranker
(:mod:`structure.ranking`) trained on the store may sit beside them (``ranker.safetensors`` +
``ranker.json``).

:func:`aflow_store` gives the store of the 288 AFLOW prototypes that pymatgen ships: the default when
a user has no structure collection.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.io import write_json
from structure.descriptors import DESCRIPTOR_SIZE, DESCRIPTOR_VERSION, MAX_ELEMENTS, descriptor, ratio_key
from structure.io import Record

STORE_VERSION = 1


def _aflow_records() -> Iterator[Record]:
    import importlib.resources

    from pymatgen.core import Structure

    ref = importlib.resources.files("pymatgen.analysis.prototypes") / "aflow_prototypes.json.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        entries = json.load(fh)
    seen: dict[str, int] = {}
    for e in entries:
        tags = e["tags"]
        structure = Structure.from_dict(e["snl"])  # the SNL dict carries the structure
        label = f"{tags['aflow']}:{structure.composition.reduced_formula}"  # AFLOW labels alone repeat
        seen[label] = seen.get(label, 0) + 1
        yield Record(label if seen[label] == 1 else f"{label}:{seen[label]}", structure,
                     ";".join(f"{k}={v}" for k, v in tags.items() if v not in (None, "", "None")))


# --------------------------------------------------------------------------------------------- store
@dataclass
class TemplateStore:
    """Structures packed in flat arrays, indexed by ratio key (see the module docstring)."""

    ids: list[str]
    formulas: list[str]
    keys: list[str]
    tags: list[str]
    e_above_hull: np.ndarray
    lattices: np.ndarray  # [N, 3, 3]
    offsets: np.ndarray  # [N + 1] into numbers / frac
    numbers: np.ndarray  # [M] atomic numbers
    frac: np.ndarray  # [M, 3]
    descriptors: np.ndarray  # [N, DESCRIPTOR_SIZE] float32
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    _index: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            groups.setdefault(k, []).append(i)
        self._index = {k: np.array(v, dtype=np.int64) for k, v in groups.items()}

    def __len__(self) -> int:
        return len(self.ids)

    # ---- building
    @classmethod
    def build(cls, records: Iterable[Record], exclude_ids: Iterable[str] = (), exclude_tags: Iterable[str] = (),
              source: str = "", progress: bool = False) -> TemplateStore:
        """Pack ``records``, dropping excluded ids, rows carrying any excluded tag (``;``-separated tags),
        disordered or partially occupied structures and those with more than ``MAX_ELEMENTS`` elements.
        ``meta["skipped"]`` counts each reason."""
        from tqdm.auto import tqdm

        exclude_ids, exclude_tags = set(exclude_ids), set(exclude_tags)
        cols: dict[str, list] = {k: [] for k in ("ids", "formulas", "keys", "tags", "ehull", "lat", "num", "frac", "desc")}
        skipped = {"excluded id": 0, "excluded tag": 0, "disordered": 0, "too many elements": 0}
        for rec in tqdm(records, desc="templates", unit="structure", disable=not progress):
            if rec.id in exclude_ids:
                skipped["excluded id"] += 1
                continue
            if exclude_tags & set(filter(None, rec.tags.split(";"))):
                skipped["excluded tag"] += 1
                continue
            s = rec.structure
            if not s.is_ordered:
                skipped["disordered"] += 1
                continue
            comp = s.composition
            if len(comp.elements) > MAX_ELEMENTS:
                skipped["too many elements"] += 1
                continue
            cols["ids"].append(rec.id)
            cols["formulas"].append(comp.reduced_formula)
            cols["keys"].append(ratio_key(comp))
            cols["tags"].append(rec.tags)
            cols["ehull"].append(rec.e_above_hull)
            cols["lat"].append(s.lattice.matrix)
            cols["num"].append(np.array([site.specie.Z for site in s], dtype=np.int32))
            cols["frac"].append(s.frac_coords)
            cols["desc"].append(descriptor(comp))
        if not cols["ids"]:
            raise ValueError("no structures left to build a template store from")
        sizes = np.array([len(n) for n in cols["num"]], dtype=np.int64)
        meta = {"version": STORE_VERSION, "descriptor_version": DESCRIPTOR_VERSION, "source": source,
                "exclude_tags": sorted(exclude_tags), "n_excluded_ids_given": len(exclude_ids), "skipped": skipped}
        return cls(cols["ids"], cols["formulas"], cols["keys"], cols["tags"], np.array(cols["ehull"], dtype=np.float64),
                   np.stack(cols["lat"]), np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(cols["num"]),
                   np.concatenate(cols["frac"]), np.stack(cols["desc"]), meta)

    # ---- persistence
    def save(self, path: str | Path) -> Path:
        """Write the store folder (into a temporary folder, renamed into place). A ranker already saved in
        an existing folder at ``path`` is kept only if ``self.path`` is that folder."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({"lattices": torch.from_numpy(self.lattices), "offsets": torch.from_numpy(self.offsets),
                       "numbers": torch.from_numpy(self.numbers), "frac": torch.from_numpy(self.frac),
                       "descriptors": torch.from_numpy(self.descriptors),
                       "e_above_hull": torch.from_numpy(self.e_above_hull)}, str(tmp / "store.safetensors"))
            write_json(tmp / "store.json", {"meta": self.meta, "ids": self.ids, "formulas": self.formulas,
                                            "keys": self.keys, "tags": self.tags})
            if self.path is not None and self.path.resolve() == path.resolve():
                for name in ("ranker.safetensors", "ranker.json"):
                    if (path / name).exists():
                        shutil.copy2(path / name, tmp / name)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> TemplateStore:
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / "store.json").is_file() or not (path / "store.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a template store (expected store.json and store.safetensors; "
                                    "build one with `composition-gen templates build`)")
        info = json.loads((path / "store.json").read_text())
        if info["meta"].get("descriptor_version") != DESCRIPTOR_VERSION:
            raise ValueError(f"{path} was built with descriptor version {info['meta'].get('descriptor_version')}; "
                             f"this code uses {DESCRIPTOR_VERSION}: rebuild it")
        t = load_file(str(path / "store.safetensors"))
        if t["descriptors"].shape[1] != DESCRIPTOR_SIZE:
            raise ValueError(f"{path}: descriptor size {t['descriptors'].shape[1]} != {DESCRIPTOR_SIZE}; rebuild it")
        return cls(info["ids"], info["formulas"], info["keys"], info["tags"], t["e_above_hull"], t["lattices"],
                   t["offsets"], t["numbers"], t["frac"], t["descriptors"], info["meta"], path)

    # ---- queries
    def candidates(self, composition) -> np.ndarray:
        """Row numbers of the templates with the same ratio key as ``composition`` (may be empty)."""
        return self.rows_with_key(ratio_key(composition))

    def rows_with_key(self, key: str) -> np.ndarray:
        """Row numbers of the templates with ratio key ``key`` (a copy; may be empty)."""
        return self._index.get(key, np.zeros(0, dtype=np.int64)).copy()

    def structure(self, i: int):
        from pymatgen.core import Lattice, Structure

        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Structure(Lattice(self.lattices[i]), self.numbers[a:b].tolist(), self.frac[a:b])

    def elemental(self, element: str) -> list[int]:
        """Rows of single-element templates of ``element``, lowest energy above hull first (unknown last)."""
        rows = [i for i in self._index.get("1", []) if element_of(self.formulas[i]) == element]
        return sorted(rows, key=lambda i: (np.isnan(self.e_above_hull[i]), self.e_above_hull[i]))

    def ratio_keys(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._index.items()}


def element_of(formula: str) -> str:
    """The element of a single-element reduced formula (pymatgen writes ``O2``, ``Cl2`` for gases)."""
    return "".join(c for c in formula if c.isalpha())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move folder ``tmp`` onto ``path``; an existing ``path`` is moved aside first and removed after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


def aflow_store() -> TemplateStore:
    """The 288 AFLOW prototype structures shipped with pymatgen, as a store (built in about a second)."""
    return TemplateStore.build(_aflow_records(), source="pymatgen aflow_prototypes.json.gz (AFLOW library of "
                               "crystallographic prototypes, Mehl et al. 2017)")
