"""Template store: crystal structures indexed by their ratio key, with composition descriptors.

Build one from any structure collection (:func:`structure.io.read_structures` says which formats), save it as a
folder, load it in seconds::

    store = TemplateStore.build(read_structures("mp_union.csv.gz"), exclude_tags={"mp20_test"})
    store.save("mp_union.db")
    store = TemplateStore.load("mp_union.db")
    rows = store.candidates("SrTiO3")          # every template with ratio key 1-1-3
    s = store.structure(rows[0])               # a pymatgen Structure

A store folder holds ``store.safetensors`` (lattices, atomic numbers and fractional coordinates of all
structures packed in flat arrays, energies above hull, space group numbers and Wyckoff-site counts) and
``store.json`` (ids, reduced formulas, ratio keys, tags, prototype labels, provenance). Nothing is
pickled. Composition descriptors are computed when the store is loaded (a pure function of the formula,
about a second for 44k structures), so a store outlives descriptor changes.

Each structure carries a **prototype label** (:func:`prototype_label`): anonymised formula, space group
(spglib, ``symprec`` 0.1) and the Wyckoff letters of each element's sites, e.g. ``ABC3_221_b_a_d`` for
a cubic perovskite: the anonymised structure type, computed once at build time. Rankings group
templates by it and the ranker's labels and its prototype-held-out check come from it. A ranker
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
from structure.descriptors import MAX_ELEMENTS, descriptors_of, ratio_key
from structure.io import Record

STORE_VERSION = 2
FIXED_POINT = 65536  # fractional coordinates of a compact store: uint16 steps of 1 / FIXED_POINT
SYMPREC = 0.1  # spglib tolerance of the prototype labels


def prototype_label(structure) -> tuple[str, int, int]:
    """``(label, space group number, number of Wyckoff sites)`` of an ordered structure (see the module
    docstring). The elements' Wyckoff strings are ordered by (reduced amount, string), so the label does
    not depend on which elements occupy the sites. A cell spglib cannot analyse gets space group 0 and
    a label from its site count."""
    import warnings

    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    comp = structure.composition
    anon = comp.anonymized_formula
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sga = SpacegroupAnalyzer(structure, symprec=SYMPREC)
            sym = sga.get_symmetrized_structure()
            number = int(sga.get_space_group_number())
    except Exception:  # spglib fails on a few odd cells
        return f"{anon}_0_{len(structure)}", 0, len(structure)
    per_element: dict[str, list[str]] = {}
    for sites, wyckoff in zip(sym.equivalent_sites, sym.wyckoff_symbols):
        per_element.setdefault(sites[0].specie.symbol, []).append(wyckoff[-1])
    amounts = comp.reduced_composition
    parts = sorted((amounts[el], "".join(sorted(w))) for el, w in per_element.items())
    return f"{anon}_{number}_" + "_".join(w for _, w in parts), number, len(sym.wyckoff_symbols)


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
    prototypes: list[str]  # prototype_label of each structure
    e_above_hull: np.ndarray
    spacegroups: np.ndarray  # [N] space group numbers (0: spglib failed)
    n_wyckoff: np.ndarray  # [N] symmetrically distinct sites
    lattices: np.ndarray  # [N, 3, 3]
    offsets: np.ndarray  # [N + 1] into numbers / frac
    numbers: np.ndarray  # [M] atomic numbers
    frac: np.ndarray  # [M, 3]
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    descriptors: np.ndarray = field(default=None, repr=False)  # [N, DESCRIPTOR_SIZE] float32, computed
    prototype_counts: np.ndarray = field(default=None, repr=False)  # [N] how often each row's prototype occurs
    _index: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            groups.setdefault(k, []).append(i)
        self._index = {k: np.array(v, dtype=np.int64) for k, v in groups.items()}
        if self.descriptors is None:
            self.descriptors = descriptors_of(self.formulas)
        self.prototype_ids = np.unique(np.asarray(self.prototypes, dtype=object), return_inverse=True)[1].astype(np.int64)
        if self.prototype_counts is None:  # a subset (e.g. the compact store) keeps its source store's counts
            self.prototype_counts = np.bincount(self.prototype_ids)[self.prototype_ids]

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
        cols: dict[str, list] = {k: [] for k in ("ids", "formulas", "keys", "tags", "proto", "ehull", "sg", "wyck",
                                                 "lat", "num", "frac")}
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
            label, number, n_wyckoff = prototype_label(s)
            cols["proto"].append(label)
            cols["ehull"].append(rec.e_above_hull)
            cols["sg"].append(number)
            cols["wyck"].append(n_wyckoff)
            cols["lat"].append(s.lattice.matrix)
            cols["num"].append(np.array([site.specie.Z for site in s], dtype=np.int32))
            cols["frac"].append(s.frac_coords)
        if not cols["ids"]:
            raise ValueError("no structures left to build a template store from")
        sizes = np.array([len(n) for n in cols["num"]], dtype=np.int64)
        meta = {"version": STORE_VERSION, "symprec": SYMPREC, "source": source,
                "exclude_tags": sorted(exclude_tags), "n_excluded_ids_given": len(exclude_ids), "skipped": skipped}
        return cls(cols["ids"], cols["formulas"], cols["keys"], cols["tags"], cols["proto"],
                   np.array(cols["ehull"], dtype=np.float64), np.array(cols["sg"], dtype=np.int64),
                   np.array(cols["wyck"], dtype=np.int64), np.stack(cols["lat"]),
                   np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(cols["num"]), np.concatenate(cols["frac"]), meta)

    def subset(self, rows) -> TemplateStore:
        """A new (unsaved) store of ``rows``, in the given order. It keeps this store's prototype counts, so
        a compact store of representatives tells a ranker how common each prototype is in its source."""
        rows = np.asarray(rows, dtype=np.int64)
        sizes = self.offsets[rows + 1] - self.offsets[rows]
        atoms = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in rows]) if len(rows) else np.zeros(0, int)
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return TemplateStore(pick(self.ids), pick(self.formulas), pick(self.keys), pick(self.tags), pick(self.prototypes),
                             self.e_above_hull[rows], self.spacegroups[rows], self.n_wyckoff[rows], self.lattices[rows],
                             np.concatenate([[0], np.cumsum(sizes)]), self.numbers[atoms], self.frac[atoms],
                             dict(self.meta), descriptors=self.descriptors[rows],
                             prototype_counts=self.prototype_counts[rows])

    # ---- persistence
    def save(self, path: str | Path, compact: bool = False) -> Path:
        """Write the store folder (into a temporary folder, renamed into place). A ranker already saved in
        an existing folder at ``path`` is kept only if ``self.path`` is that folder. ``compact`` stores
        fractional coordinates as 16-bit fixed point (wrapped into [0, 1), steps of 1/65536: under 0.001 Å
        in a 50 Å cell), lattices as float32 and atomic numbers as bytes: a third of the size, for the
        store shipped in the package."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        arrays = {"lattices": self.lattices, "numbers": self.numbers, "frac": self.frac, "offsets": self.offsets,
                  "e_above_hull": self.e_above_hull, "spacegroups": self.spacegroups, "n_wyckoff": self.n_wyckoff,
                  "prototype_counts": np.asarray(self.prototype_counts, dtype=np.int64)}
        if compact:
            frac = np.round(np.mod(self.frac, 1.0) * FIXED_POINT).astype(np.int64) % FIXED_POINT
            arrays.update({"lattices": self.lattices.astype(np.float32), "numbers": self.numbers.astype(np.uint8),
                           "frac": frac.astype(np.uint16), "offsets": self.offsets.astype(np.int32),
                           "e_above_hull": self.e_above_hull.astype(np.float32),
                           "spacegroups": self.spacegroups.astype(np.uint8), "n_wyckoff": self.n_wyckoff.astype(np.int16),
                           "prototype_counts": arrays["prototype_counts"].astype(np.int32)})
        try:
            save_file(arrays, str(tmp / "store.safetensors"))
            write_json(tmp / "store.json", {"meta": self.meta, "ids": self.ids, "formulas": self.formulas,
                                            "keys": self.keys, "tags": self.tags, "prototypes": self.prototypes})
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
        if info["meta"].get("version") != STORE_VERSION:
            raise ValueError(f"{path} is a version {info['meta'].get('version')} template store; this code reads version "
                             f"{STORE_VERSION} (with prototype labels): rebuild it with `composition-gen templates build`")
        t = load_file(str(path / "store.safetensors"))
        if t["frac"].dtype == np.uint16:  # a compact store (see save)
            t["frac"] = t["frac"].astype(np.float64) / FIXED_POINT
        for name, dtype in (("lattices", np.float64), ("numbers", np.int32), ("offsets", np.int64),
                            ("e_above_hull", np.float64), ("spacegroups", np.int64), ("n_wyckoff", np.int64)):
            t[name] = t[name].astype(dtype, copy=False)
        if "prototype_counts" in t:
            t["prototype_counts"] = t["prototype_counts"].astype(np.int64, copy=False)
        return cls(info["ids"], info["formulas"], info["keys"], info["tags"], info["prototypes"], t["e_above_hull"],
                   t["spacegroups"], t["n_wyckoff"], t["lattices"], t["offsets"], t["numbers"], t["frac"],
                   info["meta"], path, prototype_counts=t.get("prototype_counts"))

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
