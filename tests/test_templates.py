"""Template stores, composition descriptors, element substitution and template ranking (``structure``).

Everything runs on a tiny hand-made store of textbook AB binaries built with
``Structure.from_spacegroup``: rock salt, CsCl type and zinc blende share the ratio key ``1-1``, so the
rankers have three structure types to tell apart; a cubic perovskite and corundum add ``1-1-3`` and
``2-3``. Only the AFLOW-store tests touch pymatgen's shipped prototype file.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from structure.descriptors import (
    DESCRIPTOR_SIZE,
    MAX_ELEMENTS,
    N_PROPS,
    PROPERTIES,
    descriptor,
    element_dissimilarity,
    element_properties,
    ordered_elements,
    property_table,
    ratio_key,
    reduced_counts,
)
from structure.io import Record, read_structures
from structure.predict import predict, rank_templates
from structure.ranking import (
    DEFAULT_RANKER,
    CompositionRanker,
    RankerConfig,
    label_structure_types,
    plain_distance_scores,
    prototype_lists,
    template_features,
    train_ranker,
)
from structure.substitution import assign_elements, substitute
from structure.templates import TemplateStore, aflow_store, prototype_label

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ structures
_ORBITS: dict[tuple, tuple[list[int], np.ndarray]] = {}


def from_spacegroup(spacegroup: str, lattice: Lattice, species: list[str], coords: list[list[float]]) -> Structure:
    """``Structure.from_spacegroup``, with the slow space-group expansion done once per (group, sites): the
    fractional coordinates of the orbits do not depend on the lattice constants."""
    key = (spacegroup, tuple(map(tuple, coords)))
    if key not in _ORBITS:
        placeholders = ["H", "He", "Li", "Be", "B"][: len(coords)]
        s = Structure.from_spacegroup(spacegroup, lattice, placeholders, coords)
        _ORBITS[key] = ([site.specie.Z - 1 for site in s], s.frac_coords)
    which, frac = _ORBITS[key]
    return Structure(lattice, [species[i] for i in which], frac)


def rock_salt(a: str, b: str, x: float) -> Structure:
    return from_spacegroup("Fm-3m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl_type(a: str, b: str, x: float) -> Structure:
    return from_spacegroup("Pm-3m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zinc_blende(a: str, b: str, x: float) -> Structure:
    return from_spacegroup("F-43m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])


def perovskite(a: str, b: str, x: float) -> Structure:
    return from_spacegroup("Pm-3m", Lattice.cubic(x), [a, b, "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])


def corundum(a: str, x: float = 4.76, c: float = 12.99) -> Structure:
    return from_spacegroup("R-3c", Lattice.hexagonal(x, c), [a, "O"], [[0, 0, 0.352], [0.306, 0, 0.25]])


def fluorite(a: str, b: str, x: float) -> Structure:
    return from_spacegroup("Fm-3m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])


ROCK_SALT = [("Na", "Cl", 5.64), ("K", "Cl", 6.29), ("Li", "F", 4.03), ("Mg", "O", 4.21), ("Na", "F", 4.63),
             ("Ca", "O", 4.81), ("K", "Br", 6.60), ("Li", "Cl", 5.13)]
CSCL = [("Cs", "Cl", 4.12), ("Cs", "Br", 4.29), ("Tl", "Cl", 3.84), ("Tl", "Br", 3.98)]
ZINC_BLENDE = [("Zn", "S", 5.41), ("Ga", "As", 5.65), ("Cd", "Te", 6.48), ("In", "P", 5.87)]
TYPE_OF_PREFIX = {"rs": "rock salt", "cscl": "CsCl", "zb": "zinc blende"}


def tiny_records() -> list[Record]:
    """16 AB binaries (8 rock salt, 4 CsCl type, 4 zinc blende), a perovskite and corundum; ids say the type."""
    recs = [Record(f"rs-{a}{b}", rock_salt(a, b, x)) for a, b, x in ROCK_SALT]
    recs += [Record(f"cscl-{a}{b}", cscl_type(a, b, x)) for a, b, x in CSCL]
    recs += [Record(f"zb-{a}{b}", zinc_blende(a, b, x)) for a, b, x in ZINC_BLENDE]
    recs += [Record("pv-CaTiO3", perovskite("Ca", "Ti", 3.84), tags="train"),
             Record("cor-Al2O3", corundum("Al"), tags="train;mp20_test", e_above_hull=0.0)]
    return recs


def type_of(store: TemplateStore, row) -> str:
    return TYPE_OF_PREFIX[store.ids[int(row)].split("-")[0]]


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore.build(tiny_records(), source="tiny test store")


def _same_structure(a: Structure, b: Structure) -> bool:
    return (np.allclose(a.lattice.matrix, b.lattice.matrix)
            and [s.specie.symbol for s in a] == [s.specie.symbol for s in b]
            and np.allclose(a.frac_coords, b.frac_coords))


def _fit_anonymous(a: Structure, b: Structure) -> bool:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StructureMatcher().fit_anonymous(a, b)


# ----------------------------------------------------------------------------------- descriptors
@pytest.mark.parametrize("formula, counts, key", [
    ("SrTiO3", {"Sr": 1, "Ti": 1, "O": 3}, "1-1-3"),
    ("O2", {"O": 1}, "1"),
    ("Fe2O3", {"Fe": 2, "O": 3}, "2-3"),
    ("Fe4O6", {"Fe": 2, "O": 3}, "2-3"),
    ("NaCl", {"Na": 1, "Cl": 1}, "1-1"),
    ("Li2O", {"Li": 2, "O": 1}, "1-2"),
    ("YBa2Cu3O7", {"Y": 1, "Ba": 2, "Cu": 3, "O": 7}, "1-2-3-7"),
    ("Mg12Al24O48", {"Mg": 1, "Al": 2, "O": 4}, "1-2-4"),
])
def test_reduced_counts_and_ratio_key(formula, counts, key):
    assert reduced_counts(formula) == counts
    assert reduced_counts(Composition(formula)) == counts
    assert ratio_key(formula) == key
    assert ratio_key(Composition(formula)) == key


@pytest.mark.parametrize("formula", ["Fe0.5Ni0.5O", "Li0.3CoO2", "Na0.1Cl"])
def test_disordered_composition_raises(formula):
    with pytest.raises(ValueError, match="non-integer"):
        reduced_counts(formula)
    with pytest.raises(ValueError):
        ratio_key(formula)
    with pytest.raises(ValueError):
        descriptor(formula)


def test_descriptor_size_and_reduction():
    d = descriptor("Fe2O3")
    assert d.shape == (DESCRIPTOR_SIZE,) and d.dtype == np.float32
    assert DESCRIPTOR_SIZE == MAX_ELEMENTS * N_PROPS + 4 * N_PROPS
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(d, descriptor("Fe4O6"))
    np.testing.assert_array_equal(d, descriptor(Composition("Fe2O3")))
    np.testing.assert_array_equal(descriptor("SrTiO3"), descriptor("TiSrO3"))  # order of writing is irrelevant
    for other in ("FeO", "Fe3O4", "Al2O3", "Fe2S3"):
        assert not np.array_equal(d, descriptor(other)), other


def test_descriptor_slot_order_follows_count_then_electronegativity():
    assert ordered_elements("SrTiO3") == [("Sr", 1), ("Ti", 1), ("O", 3)]  # X(Sr) 0.95 < X(Ti) 1.54
    assert ordered_elements("TiSrO3") == [("Sr", 1), ("Ti", 1), ("O", 3)]
    assert ordered_elements("Li2O") == [("O", 1), ("Li", 2)]  # the count comes before electronegativity
    assert ordered_elements("NaCl") == [("Na", 1), ("Cl", 1)]
    d = descriptor("SrTiO3")
    slots = d[: MAX_ELEMENTS * N_PROPS].reshape(MAX_ELEMENTS, N_PROPS)
    for slot, symbol in enumerate(["Sr", "Ti", "O"]):
        np.testing.assert_allclose(slots[slot], element_properties(symbol).astype(np.float32))
    assert not slots[3:].any()
    x = PROPERTIES.index("electronegativity")
    assert slots[0, x] < slots[1, x] < slots[2, x]
    # the statistics block: atom-fraction-weighted mean over Sr, Ti, O, O, O
    stats = d[MAX_ELEMENTS * N_PROPS:].reshape(4, N_PROPS)
    props = np.stack([element_properties(s) for s in ("Sr", "Ti", "O", "O", "O")])
    np.testing.assert_allclose(stats[0], props.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats[1], props.min(0), rtol=1e-5)
    np.testing.assert_allclose(stats[2], props.max(0), rtol=1e-5)


def test_too_many_elements_for_a_descriptor():
    with pytest.raises(ValueError, match="at most"):
        descriptor("HLiBeBCNOFNa")


def test_property_table_and_element_dissimilarity():
    index, table = property_table()
    assert table.shape == (103, N_PROPS) and np.isfinite(table).all()
    assert index["H"] == 0 and index["Lr"] == 102
    assert element_dissimilarity("Na", "Na") == 0
    assert element_dissimilarity("Na", "K") == pytest.approx(element_dissimilarity("K", "Na"))
    assert element_dissimilarity("Na", "K") < element_dissimilarity("Na", "Cl")
    assert element_dissimilarity("Cl", "Br") < element_dissimilarity("Cl", "Cs")
    with pytest.raises(ValueError):
        element_properties("Xx")


# ------------------------------------------------------------------------------------------ store
def test_build_packs_every_structure(store):
    recs = tiny_records()
    assert len(store) == len(recs)
    assert store.ids == [r.id for r in recs]
    assert store.ratio_keys() == {"1-1": 16, "1-1-3": 1, "2-3": 1}
    assert store.descriptors.shape == (len(recs), DESCRIPTOR_SIZE) and store.descriptors.dtype == np.float32
    assert store.formulas[store.ids.index("cor-Al2O3")] == "Al2O3"
    assert store.tags[store.ids.index("cor-Al2O3")] == "train;mp20_test"
    assert store.e_above_hull[store.ids.index("cor-Al2O3")] == 0.0 and np.isnan(store.e_above_hull[0])
    for i, rec in enumerate(recs):
        assert _same_structure(store.structure(i), rec.structure), rec.id
        np.testing.assert_array_equal(store.descriptors[i], descriptor(rec.structure.composition))
    assert store.meta["skipped"] == {"excluded id": 0, "excluded tag": 0, "disordered": 0, "too many elements": 0}


def test_prototype_labels_name_the_structure_type(store):
    label = {store.ids[i]: store.prototypes[i] for i in range(len(store))}
    assert label["rs-NaCl"] == "AB_225_a_b" and label["cscl-CsCl"] == "AB_221_a_b"
    assert label["zb-ZnS"] == "AB_216_a_c" and label["pv-CaTiO3"] == "ABC3_221_a_b_c"
    by_type: dict[str, set] = {}
    for i in store.candidates("NaCl"):
        by_type.setdefault(type_of(store, i), set()).add(store.prototypes[i])
    assert all(len(v) == 1 for v in by_type.values()) and len(set().union(*by_type.values())) == 3
    rs = store.ids.index("rs-NaCl")
    assert store.spacegroups[rs] == 225 and store.n_wyckoff[rs] == 2 and store.prototype_counts[rs] == 8
    # the label ignores the cell setting and which elements sit on the sites
    assert prototype_label(rock_salt("K", "Br", 6.6).get_primitive_structure())[0] == label["rs-NaCl"]


def test_subset_keeps_rows_and_structures(store):
    sub = store.subset([17, 0])
    assert sub.ids == ["cor-Al2O3", "rs-NaCl"] and sub.prototypes == [store.prototypes[17], store.prototypes[0]]
    assert _same_structure(sub.structure(0), store.structure(17)) and _same_structure(sub.structure(1), store.structure(0))
    np.testing.assert_array_equal(sub.descriptors[1], store.descriptors[0])
    assert sub.prototype_counts.tolist() == [1, 8]  # the source store's counts: rock salt is common there


def test_candidates_are_exactly_the_ratio_matched_templates(store):
    one_one = {r.id for r in tiny_records() if ratio_key(r.structure.composition) == "1-1"}
    assert len(one_one) == 16
    assert {store.ids[i] for i in store.candidates("RbCl")} == one_one
    assert {store.ids[i] for i in store.candidates(Composition("Rb2Cl2"))} == one_one
    assert [store.ids[i] for i in store.candidates("SrZrO3")] == ["pv-CaTiO3"]
    assert [store.ids[i] for i in store.candidates("Cr4O6")] == ["cor-Al2O3"]
    empty = store.candidates("MgAl2O4")
    assert len(empty) == 0 and empty.dtype == np.int64


def test_save_load_roundtrip(store, tmp_path):
    out = store.save(tmp_path / "db")
    assert out == tmp_path / "db" and sorted(os.listdir(out)) == ["store.json", "store.safetensors"]
    info = json.loads((out / "store.json").read_text())
    assert info["ids"] == store.ids  # plain JSON, nothing pickled
    loaded = TemplateStore.load(tmp_path / "db")
    assert loaded.path == tmp_path / "db"
    assert (loaded.ids, loaded.formulas) == (store.ids, store.formulas)
    assert (loaded.keys, loaded.tags) == (store.keys, store.tags)
    np.testing.assert_array_equal(loaded.descriptors, store.descriptors)
    np.testing.assert_array_equal(loaded.e_above_hull, store.e_above_hull)
    assert loaded.prototypes == store.prototypes
    np.testing.assert_array_equal(loaded.spacegroups, store.spacegroups)
    np.testing.assert_array_equal(loaded.n_wyckoff, store.n_wyckoff)
    assert loaded.ratio_keys() == store.ratio_keys()
    assert loaded.meta["source"] == "tiny test store"
    for i in range(len(store)):
        assert _same_structure(loaded.structure(i), store.structure(i))
    np.testing.assert_array_equal(loaded.candidates("KBr"), store.candidates("KBr"))


def test_compact_save_keeps_structures_within_fixed_point_resolution(store, tmp_path):
    from safetensors.numpy import load_file

    store.save(tmp_path / "full")
    store.save(tmp_path / "compact", compact=True)
    raw = load_file(str(tmp_path / "compact" / "store.safetensors"))
    assert raw["frac"].dtype == np.uint16 and raw["numbers"].dtype == np.uint8 and raw["lattices"].dtype == np.float32
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(tmp_path / "compact") < size(tmp_path / "full")
    back = TemplateStore.load(tmp_path / "compact")
    assert back.ids == store.ids and back.prototypes == store.prototypes
    np.testing.assert_array_equal(back.numbers, store.numbers)
    np.testing.assert_allclose(back.lattices, store.lattices, rtol=1e-6)
    wrapped = np.mod(store.frac, 1.0)
    delta = np.abs(back.frac - wrapped)
    assert np.minimum(delta, 1 - delta).max() <= 0.5 / 65536 + 1e-12
    for i in range(len(store)):
        assert _fit_anonymous(back.structure(i), store.structure(i))


def test_old_store_version_is_a_clear_error(store, tmp_path):
    store.save(tmp_path / "db")
    info = json.loads((tmp_path / "db" / "store.json").read_text())
    info["meta"]["version"] = 1
    (tmp_path / "db" / "store.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="rebuild it"):
        TemplateStore.load(tmp_path / "db")


def test_exclude_ids_and_tags():
    recs = tiny_records()
    recs.append(Record("rs-RbI", rock_salt("Rb", "I", 7.34), tags="a;mp20_test"))
    recs.append(Record("rs-RbF", rock_salt("Rb", "F", 5.65), tags="a;mp20_test_extra"))  # another tag: kept
    built = TemplateStore.build(recs, exclude_ids={"rs-NaCl", "not-there"}, exclude_tags={"mp20_test"})
    assert set(built.ids) == {r.id for r in recs} - {"rs-NaCl", "rs-RbI", "cor-Al2O3"}
    assert built.meta["skipped"]["excluded id"] == 1
    assert built.meta["skipped"]["excluded tag"] == 2
    assert built.meta["exclude_tags"] == ["mp20_test"]
    assert "2-3" not in built.ratio_keys()


def test_disordered_structures_are_skipped():
    mixed = Structure(Lattice.cubic(5.6), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    built = TemplateStore.build([Record("mixed", mixed), Record("nacl", rock_salt("Na", "Cl", 5.64))])
    assert built.ids == ["nacl"] and built.meta["skipped"]["disordered"] == 1
    with pytest.raises(ValueError, match="no structures"):
        TemplateStore.build([Record("mixed", mixed)])


def test_saving_over_a_store_replaces_it_atomically(store, tmp_path, monkeypatch):
    small = TemplateStore.build(tiny_records()[:3])
    store.save(tmp_path / "db")
    small.save(tmp_path / "db")
    assert os.listdir(tmp_path) == ["db"]  # no temporary or moved-aside folder left beside it
    assert TemplateStore.load(tmp_path / "db").ids == small.ids

    # a save that fails half-way leaves the old store intact and nothing beside it
    import structure.templates as templates_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(templates_module, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        store.save(tmp_path / "db")
    assert os.listdir(tmp_path) == ["db"]
    assert TemplateStore.load(tmp_path / "db").ids == small.ids


def test_ranker_beside_the_store_survives_resaving_only_the_same_store(store, tmp_path):
    store.save(tmp_path / "db")
    CompositionRanker(RankerConfig(hidden=8, layers=1)).save(tmp_path / "db")
    loaded = TemplateStore.load(tmp_path / "db")
    loaded.save(tmp_path / "db")  # the store's own folder: its ranker is kept
    assert (tmp_path / "db" / "ranker.json").is_file() and (tmp_path / "db" / "ranker.safetensors").is_file()
    TemplateStore.build(tiny_records()[:3]).save(tmp_path / "db")  # another store: the old ranker goes
    assert sorted(os.listdir(tmp_path / "db")) == ["store.json", "store.safetensors"]


def test_load_rejects_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a template store"):
        TemplateStore.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        TemplateStore.load(tmp_path / "missing")


def _elemental_store() -> TemplateStore:
    o2 = Structure(Lattice.cubic(6.0), ["O", "O"], [[0, 0, 0], [0.2, 0, 0]])  # an O2 molecule in a box
    cu = from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])
    cu_hi = cu.copy()
    cu_hi.scale_lattice(cu.volume * 1.1)
    return TemplateStore.build([Record("o2", o2), Record("cu-hi", cu_hi, e_above_hull=0.3),
                                Record("cu", cu, e_above_hull=0.0), Record("nacl", rock_salt("Na", "Cl", 5.64))])


def test_elemental_templates_lowest_energy_first():
    st = _elemental_store()
    assert [st.ids[i] for i in st.elemental("Cu")] == ["cu", "cu-hi"]
    assert st.elemental("Na") == []


def test_elemental_finds_diatomic_elements():
    st = _elemental_store()
    assert [st.ids[i] for i in st.elemental("O")] == ["o2"]


def test_elemental_candidates_with_diatomic_templates():
    from structure.pipeline import elemental_candidates

    structs = elemental_candidates(_elemental_store())("Ni")  # no Ni template: substituted from Cu (and O)
    assert structs and all(s.composition.reduced_formula == "Ni" for s in structs)


# ----------------------------------------------------------------------------------------- readers
def _write_formats(folder):
    """One structure per format in ``folder``; returns {file name: expected reduced formula}."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor

    folder.mkdir(parents=True, exist_ok=True)
    rock_salt("Na", "Cl", 5.64).to(filename=str(folder / "nacl.cif"))
    (folder / "poscar_dir").mkdir()
    cscl_type("Cs", "Cl", 4.12).to(filename=str(folder / "poscar_dir" / "POSCAR"), fmt="poscar")
    zinc_blende("Zn", "S", 5.41).to(filename=str(folder / "zns.vasp"), fmt="poscar")
    (folder / "one.json").write_text(json.dumps(perovskite("Ca", "Ti", 3.84).as_dict()))
    (folder / "many.json").write_text(json.dumps({"x1": rock_salt("K", "Cl", 6.29).as_dict(),
                                                  "x2": rock_salt("Mg", "O", 4.21).as_dict()}))
    (folder / "list.json").write_text(json.dumps([corundum("Al").as_dict()]))
    frames = [AseAtomsAdaptor.get_atoms(rock_salt("Li", "F", 4.03)),
              AseAtomsAdaptor.get_atoms(cscl_type("Tl", "Br", 3.98))]
    frames[0].info["id"] = "lif-id"
    ase_write(str(folder / "frames.extxyz"), frames, format="extxyz")


def test_read_each_format(tmp_path):
    _write_formats(tmp_path)

    def read(name):
        return [(r.id, r.structure.composition.reduced_formula) for r in read_structures(tmp_path / name)]

    assert read("nacl.cif") == [("nacl", "NaCl")]
    assert read("poscar_dir/POSCAR") == [("poscar_dir/POSCAR", "CsCl")]
    assert read("zns.vasp") == [("zns", "ZnS")]
    assert read("one.json") == [("one:0", "CaTiO3")]
    assert read("many.json") == [("many:x1", "KCl"), ("many:x2", "MgO")]
    assert read("list.json") == [("list:0", "Al2O3")]
    assert read("frames.extxyz") == [("lif-id", "LiF"), ("frames:1", "TlBr")]
    recs = list(read_structures(tmp_path / "nacl.cif"))
    assert _fit_anonymous(recs[0].structure, rock_salt("K", "Br", 6.6)) and len(recs[0].structure) == 8


def test_read_a_folder(tmp_path):
    _write_formats(tmp_path / "coll")
    (tmp_path / "coll" / "notes.txt").write_text("not a structure\n")  # ignored: not a structure file
    recs = list(read_structures(tmp_path / "coll"))
    assert sorted(r.structure.composition.reduced_formula for r in recs) == sorted(
        ["NaCl", "CsCl", "ZnS", "CaTiO3", "KCl", "MgO", "Al2O3", "LiF", "TlBr"])
    built = TemplateStore.build(recs)
    assert built.ratio_keys() == {"1-1": 7, "1-1-3": 1, "2-3": 1}


def test_read_csv_with_cif_column(tmp_path):
    import csv
    import gzip

    from pymatgen.io.cif import CifWriter

    rows = [("mp-1", rock_salt("Na", "Cl", 5.64), "train", 0.0),
            ("mp-2", cscl_type("Cs", "Br", 4.29), "mp20_test;val", 0.05),
            ("mp-3", zinc_blende("Ga", "As", 5.65), "", "")]
    for name, opener in (("s.csv", open), ("s.csv.gz", gzip.open)):
        with opener(tmp_path / name, "wt", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["material_id", "formula", "cif", "split_tags", "e_above_hull"])
            for mid, s, tags, e in rows:
                w.writerow([mid, s.composition.reduced_formula, str(CifWriter(s)), tags, e])
        recs = list(read_structures(tmp_path / name))
        assert [r.id for r in recs] == ["mp-1", "mp-2", "mp-3"]
        assert [r.structure.composition.reduced_formula for r in recs] == ["NaCl", "CsBr", "GaAs"]
        assert [r.tags for r in recs] == ["train", "mp20_test;val", ""]
        assert recs[1].e_above_hull == pytest.approx(0.05) and np.isnan(recs[2].e_above_hull)
    built = TemplateStore.build(read_structures(tmp_path / "s.csv"), exclude_tags={"mp20_test"})
    assert built.ids == ["mp-1", "mp-3"]
    (tmp_path / "nocif.csv").write_text("material_id,formula\nmp-1,NaCl\n")
    with pytest.raises(ValueError, match="cif"):
        list(read_structures(tmp_path / "nocif.csv"))


def test_read_errors(tmp_path):
    (tmp_path / "x.txt").write_text("NaCl\n")
    with pytest.raises(ValueError, match="unknown structure format"):
        list(read_structures(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError):
        list(read_structures(tmp_path / "missing.cif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CIF"):
        list(read_structures(tmp_path / "empty"))


def test_read_a_json_that_is_not_a_structure(tmp_path):
    (tmp_path / "notes.json").write_text('{"comment": "collected in 2024"}')
    with pytest.raises(ValueError):
        list(read_structures(tmp_path / "notes.json"))


# ------------------------------------------------------------------------------------ substitution
@pytest.mark.parametrize("template, query", [
    (rock_salt("Na", "Cl", 5.64), "KBr"),
    (rock_salt("Na", "Cl", 5.64), "CsI"),
    (rock_salt("Mg", "O", 4.21), "Ba2O2"),
    (cscl_type("Cs", "Cl", 4.12), "TlI"),
    (zinc_blende("Zn", "S", 5.41), "CdSe"),
    (perovskite("Ca", "Ti", 3.84), "SrZrO3"),
    (corundum("Al"), "Fe2O3"),
    (corundum("Fe", 5.04, 13.75), "Al2O3"),
    (fluorite("Ca", "F", 5.46), "SrCl2"),
    (fluorite("Ca", "F", 5.46), "K2O"),  # anti-fluorite: the 2-count site swaps roles
])
def test_substitution_gives_the_query_in_the_template_type(template, query):
    before = template.copy()
    out = substitute(template, query)
    assert out.composition.reduced_formula == Composition(query).reduced_formula
    assert len(out) == len(template)
    assert _fit_anonymous(template, out)
    np.testing.assert_allclose(out.frac_coords, template.frac_coords)
    assert _same_structure(template, before)  # the template is not modified


def test_assign_elements_within_equal_count_groups():
    assert assign_elements("SrZrO3", "CaTiO3") == {"Ca": "Sr", "Ti": "Zr", "O": "O"}
    assert assign_elements("ZrSrO3", Composition("CaTiO3")) == {"Ca": "Sr", "Ti": "Zr", "O": "O"}
    assert assign_elements("KBr", "NaCl") == {"Na": "K", "Cl": "Br"}
    assert assign_elements("BrK", "ClNa") == {"Na": "K", "Cl": "Br"}
    assert assign_elements("Al2O3", "Fe2O3") == {"Fe": "Al", "O": "O"}
    assert assign_elements("K2O", "CaF2") == {"Ca": "O", "F": "K"}  # by count, not by the position in the formula
    assert assign_elements("Cr4O6", "Fe2O3") == {"Fe": "Cr", "O": "O"}
    for query, template in (("NaCl", "CaF2"), ("Fe3O4", "Fe2O3"), ("SrTiO3", "NaCl"), ("O2", "NaCl")):
        with pytest.raises(ValueError, match="different stoichiometric ratios"):
            assign_elements(query, template)
    with pytest.raises(ValueError):
        substitute(rock_salt("Na", "Cl", 5.64), "CaF2")


def test_volume_scales_with_the_substituted_atoms():
    nacl = rock_salt("Na", "Cl", 5.64)
    assert substitute(nacl, "CsI").volume > 1.2 * nacl.volume
    assert substitute(nacl, "LiF").volume < 0.8 * nacl.volume
    same = substitute(nacl, "NaCl")
    assert same.volume == pytest.approx(nacl.volume)
    fixed = substitute(nacl, "CsI", scale_volume=False)
    np.testing.assert_allclose(fixed.lattice.matrix, nacl.lattice.matrix)
    scaled = substitute(nacl, "CsI")
    np.testing.assert_allclose(scaled.lattice.angles, nacl.lattice.angles)  # isotropic


def test_substitution_of_an_oxidation_state_decorated_template():
    t = rock_salt("Na", "Cl", 5.64)
    t.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    assert substitute(t, "KBr").composition.reduced_formula == "KBr"


# ----------------------------------------------------------------------------------------- ranking
def test_label_structure_types_separates_the_three_ab_types(store):
    rows = store.candidates("NaCl")
    labels = label_structure_types([store.structure(i) for i in rows])
    assert labels.dtype == np.int64 and labels[0] == 0
    assert len(set(labels.tolist())) == 3
    by_type: dict[str, set] = {}
    for row, label in zip(rows, labels):
        by_type.setdefault(type_of(store, row), set()).add(int(label))
    assert all(len(v) == 1 for v in by_type.values())  # one label per type ...
    assert len(set().union(*by_type.values())) == 3  # ... and a different one for each


def test_prototype_lists(store):
    lists = prototype_lists(store, near=5, far=3, seed=0)
    one_one = set(store.candidates("NaCl").tolist())
    assert {x["query"] for x in lists} == one_one  # only groups with another structure
    for x in lists:
        assert x["query"] not in x["rows"] and set(x["rows"].tolist()) <= one_one and len(x["rows"]) == 8
        assert len(set(x["rows"].tolist())) == 8
        expected = [type_of(store, r) == type_of(store, x["query"]) for r in x["rows"]]
        assert x["labels"].tolist() == expected
        near = plain_distance_scores(store.descriptors[x["query"]], store.descriptors[x["rows"][:5]])
        assert np.all(np.diff(near) <= 0)  # the near part comes nearest first
        rest = set(one_one) - {x["query"]} - set(x["rows"][:5].tolist())
        assert min(-plain_distance_scores(store.descriptors[x["query"]], store.descriptors[sorted(rest)])) >= -near[-1] - 1e-9
    cscl = frozenset({store.prototypes[store.ids.index("cscl-CsCl")]})
    for x in prototype_lists(store, exclude_prototypes=cscl):
        assert not any(type_of(store, r) == "CsCl" for r in x["rows"])


def test_template_features(store):
    f = template_features(store)
    assert f.shape == (len(store), 13) and np.isfinite(f).all()
    rs, cs = store.ids.index("rs-NaCl"), store.ids.index("cscl-CsCl")
    assert f[rs, 0] == pytest.approx(np.log1p(8)) and f[cs, 0] == pytest.approx(np.log1p(4))
    assert f[rs, 1] == pytest.approx(np.log(8 / 16))
    assert f[rs, 6:].sum() == 1 and f[rs, -1] == 1  # cubic


@pytest.fixture(scope="module")
def ranker(store):
    return train_ranker(store, seed=0, epochs=80, heldout_fraction=0.0)


@pytest.mark.parametrize("seed, loss, properties", [(0, "listwise", "all"), (1, "listwise", "all"),
                                                    (0, "pairwise", "all"), (0, "listwise", "basic")])
def test_learned_ranking_puts_the_right_type_first(store, ranker, seed, loss, properties):
    from structure.descriptors import BASIC_PROPERTIES, PROPERTIES

    config = RankerConfig(properties=list(PROPERTIES if properties == "all" else BASIC_PROPERTIES), loss=loss)
    model = ranker if (seed, loss, properties) == (0, "listwise", "all") else train_ranker(
        store, config, seed=seed, epochs=80, heldout_fraction=0.0)
    t = model.config.trained
    assert t["seed"] == seed and t["epochs"] == 80 and t["n_queries_train"] == 16 and model.config.loss == loss
    for query, expected in (("NaBr", "rock salt"), ("RbBr", "rock salt"), ("CsI", "CsCl"), ("ZnSe", "zinc blende")):
        rows, scores = rank_templates(store, query, "learned", model)
        assert len(rows) == 16 and np.all(np.diff(scores) <= 0)
        assert type_of(store, rows[0]) == expected, (seed, query, store.ids[rows[0]])


def test_untrained_ranker_ranks_like_the_plain_distance(store):
    untrained = CompositionRanker(RankerConfig())
    q = descriptor("NaBr")
    rows = np.arange(len(store))
    np.testing.assert_allclose(untrained.rank(store, q, rows), plain_distance_scores(q, store.descriptors),
                               rtol=1e-5, atol=1e-5)


def test_trained_ranker_learns_something(store, ranker):
    q = descriptor("CsI")
    rows = np.arange(len(store))
    assert not np.allclose(ranker.rank(store, q, rows), plain_distance_scores(q, store.descriptors))


def test_ranker_config_is_checked():
    with pytest.raises(ValueError, match="plain distance"):
        RankerConfig(properties=["Z", "row"])
    with pytest.raises(ValueError, match="unknown descriptor properties"):
        RankerConfig(properties=["electronegativity", "row", "group", "atomic_radius", "colour"])
    with pytest.raises(ValueError, match="loss must be"):
        RankerConfig(loss="hinge")


def test_held_out_metrics_are_reported(store):
    t = train_ranker(store, seed=0, epochs=5, heldout_fraction=0.25).config.trained
    assert t["heldout_n"] == 4 and t["n_queries_train"] == 12
    for k in ("heldout_top1", "heldout_top10", "heldout_top1_plain_distance", "heldout_ceiling"):
        assert 0 <= t[k] <= 1
    assert t["heldout_top1"] <= t["heldout_top10"] <= t["heldout_ceiling"]


def test_prototype_held_out_check(store):
    zb = frozenset({store.prototypes[store.ids.index("zb-ZnS")]})
    t = train_ranker(store, seed=0, epochs=5, heldout_fraction=0.0, holdout_prototypes=zb).config.trained
    assert t["n_queries_train"] == 12 and t["heldout_prototypes_n"] == 4  # the zinc blendes, checked apart
    assert 0 <= t["heldout_prototypes_top1"] <= t["heldout_prototypes_top10"] <= 1


def test_ranker_save_load_gives_identical_scores(store, ranker, tmp_path):
    ranker.save(tmp_path / "r")
    assert sorted(os.listdir(tmp_path / "r")) == ["ranker.json", "ranker.safetensors"]
    loaded = CompositionRanker.load(tmp_path / "r")
    assert loaded.config == ranker.config and not loaded.training
    q = descriptor("NaBr")
    rows = np.arange(len(store))
    np.testing.assert_array_equal(loaded.rank(store, q, rows), ranker.rank(store, q, rows))
    with pytest.raises(FileNotFoundError, match="no ranker"):
        CompositionRanker.load(tmp_path / "missing")


def test_train_ranker_needs_both_classes():
    only_rock_salt = TemplateStore.build([Record(f"{a}{b}", rock_salt(a, b, x)) for a, b, x in ROCK_SALT[:4]])
    with pytest.raises(ValueError, match="both a template of its prototype and one of another"):
        train_ranker(only_rock_salt, seed=0, epochs=1)


def test_plain_ranking(store):
    rows, scores = rank_templates(store, "NaBr", "plain")
    assert sorted(rows.tolist()) == sorted(store.candidates("NaBr").tolist())
    assert np.all(np.diff(scores) <= 0) and (scores <= 0).all()
    assert store.ids[rows[0]] == "rs-NaCl"
    assert store.ids[rank_templates(store, "CsI", "plain")[0][0]] == "cscl-CsBr"
    assert type_of(store, rank_templates(store, "ZnSe", "plain")[0][0]) == "zinc blende"
    q = descriptor("NaBr")
    np.testing.assert_allclose(plain_distance_scores(q, q[None]), [0.0])


def test_random_ranking_is_seeded(store):
    a_rows, a_scores = rank_templates(store, "NaBr", "random", seed=3)
    b_rows, b_scores = rank_templates(store, "NaBr", "random", seed=3)
    c_rows, _ = rank_templates(store, "NaBr", "random", seed=4)
    np.testing.assert_array_equal(a_rows, b_rows)
    np.testing.assert_array_equal(a_scores, b_scores)
    assert not np.array_equal(a_rows, c_rows)
    assert sorted(a_rows.tolist()) == sorted(c_rows.tolist()) == sorted(store.candidates("NaBr").tolist())


def test_rank_templates_errors_and_empty(store):
    with pytest.raises(ValueError, match="needs a ranker"):
        rank_templates(store, "NaBr", "learned", None)
    with pytest.raises(ValueError, match="ranking must be one of"):
        rank_templates(store, "NaBr", "best")
    rows, scores = rank_templates(store, "MgAl2O4", "plain")
    assert len(rows) == 0 and len(scores) == 0


def test_predict(store, ranker):
    preds = predict(store, "NaBr", top_k=3, ranking="learned", ranker=ranker, group_types=False)
    assert [p.rank for p in preds] == [1, 2, 3]
    assert [p.similarity for p in preds] == sorted((p.similarity for p in preds), reverse=True)
    for p in preds:
        assert p.formula == "NaBr" and p.structure.composition.reduced_formula == "NaBr"
        assert p.template_id == store.ids[p.template_row] and p.template_formula == store.formulas[p.template_row]
        assert _fit_anonymous(p.structure, store.structure(p.template_row))
    assert type_of(store, preds[0].template_row) == "rock salt"
    one = predict(store, "Sr2Zr2O6", top_k=5, ranking="plain")  # fewer templates than top_k
    assert len(one) == 1 and one[0].formula == "SrZrO3" and one[0].template_id == "pv-CaTiO3"
    assert one[0].structure.composition.reduced_formula == "SrZrO3"
    assert predict(store, "MgAl2O4", ranking="plain") == []


def test_grouping_by_type_gives_distinct_types_ranked_by_pooled_similarity(store, ranker):
    from structure.predict import group_by_type

    rows, scores = rank_templates(store, "NaBr", "learned", ranker)
    grouped, pooled = group_by_type(store, rows, scores, pool=len(rows))
    assert np.all(np.diff(pooled) <= 0) and len(grouped) == 3  # one template per type: its best-scored member
    assert {type_of(store, r) for r in grouped} == {"rock salt", "CsCl", "zinc blende"}
    for r, p in zip(grouped, pooled):
        members = [i for i, row in enumerate(rows) if store.prototypes[row] == store.prototypes[r]]
        assert r == rows[members[0]] and p == pytest.approx(np.logaddexp.reduce(scores[members].astype(np.float64)))
    # every template joins a group, so the pooled score of a type is at least its best member's
    assert pooled[0] >= scores.max() - 1e-9
    assert {type_of(store, r) for r in grouped} >= {"CsCl"}
    # a pool of 1 changes nothing; the templates beyond the pool keep their order
    same, s1 = group_by_type(store, rows, scores, pool=1)
    assert same.tolist() == rows.tolist() and np.allclose(s1, scores)
    preds = predict(store, "NaBr", top_k=10, ranking="learned", ranker=ranker)  # default: grouped
    assert [p.template_row for p in preds] == grouped.tolist() and len(preds) == len(grouped)


def test_same_inputs_give_the_same_order(store, ranker):
    a = [p.template_row for p in predict(store, "NaBr", top_k=10, ranker=ranker)]
    b = [p.template_row for p in predict(TemplateStore.build(tiny_records()), "NaBr", top_k=10, ranker=ranker)]
    assert a == b and len(a) == 3
    rows_1, scores_1 = rank_templates(store, "CsI", "learned", ranker)
    rows_2, scores_2 = rank_templates(store, "CsI", "learned", ranker)
    np.testing.assert_array_equal(rows_1, rows_2)
    np.testing.assert_array_equal(scores_1, scores_2)


def test_energy_reranking_keeps_every_candidate():
    from structure.predict import rerank_by_energy

    assert rerank_by_energy([-3.0, -5.0, -4.0]) == [1, 2, 0]
    # a failed (None) or exploded (nan) relaxation keeps its candidate, after the relaxed ones, in order
    assert rerank_by_energy([None, -1.0, float("nan"), -2.0, -2.0]) == [3, 4, 1, 0, 2]
    assert rerank_by_energy([]) == []


def test_default_ranker_scores_the_tiny_store(store):
    if not (DEFAULT_RANKER / "ranker.json").is_file():
        pytest.skip(f"no shipped ranker at {DEFAULT_RANKER} yet")
    model = CompositionRanker.load(DEFAULT_RANKER)
    rows, scores = rank_templates(store, "NaBr", "learned", model)
    assert len(rows) == 16 and np.all(np.diff(scores) <= 0)


# ------------------------------------------------------------------------------------------- AFLOW
@pytest.fixture(scope="module")
def aflow():
    return aflow_store()


def test_aflow_store(aflow):
    assert len(aflow) == 288
    assert aflow.meta["skipped"] == {"excluded id": 0, "excluded tag": 0, "disordered": 0, "too many elements": 0}
    rows = aflow.candidates("NaCl")
    assert len(rows) > 10 and all(aflow.keys[i] == "1-1" for i in rows)
    assert len(set(aflow.ids)) == len(aflow)  # AFLOW labels repeat; the ids do not
    rock = [i for i in rows if aflow.ids[i] == "AB_cF8_225_a_b:NaCl"]
    assert len(rock) == 1 and aflow.formulas[rock[0]] == "NaCl"
    assert _fit_anonymous(aflow.structure(rock[0]), rock_salt("K", "Br", 6.6))
    assert "aflow=AB_cF8_225_a_b" in aflow.tags[rock[0]]
    assert any(aflow.ids[i] == "AB_cP2_221_b_a:CsCl" for i in rows)
