"""``composition-gen templates build / train-ranker`` and ``composition-gen structure``, run in-process.

The store is built by the CLI itself from a folder of CIFs written here (rock salt, CsCl type, zinc blende,
a perovskite and fluorite), so every stage -- reading, packing, ranking, substitution and the three output
files -- goes through the command line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from composition_lm.cli import main
from structure.io import COLUMNS
from structure.ranking import DEFAULT_RANKER
from structure.templates import TemplateStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ORBITS: dict[tuple, tuple[list[int], np.ndarray]] = {}


def from_spacegroup(spacegroup: str, lattice: Lattice, species: list[str], coords: list[list[float]]) -> Structure:
    """``Structure.from_spacegroup`` with the slow space-group expansion done once per (group, sites)."""
    key = (spacegroup, tuple(map(tuple, coords)))
    if key not in _ORBITS:
        s = Structure.from_spacegroup(spacegroup, lattice, ["H", "He", "Li"][: len(coords)], coords)
        _ORBITS[key] = ([site.specie.Z - 1 for site in s], s.frac_coords)
    which, frac = _ORBITS[key]
    return Structure(lattice, [species[i] for i in which], frac)


HALF, QUARTER, ORIGIN = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0, 0, 0]
TEMPLATES = {  # file stem -> structure
    "NaCl": ("Fm-3m", 5.64, ["Na", "Cl"], [ORIGIN, HALF]),
    "KCl": ("Fm-3m", 6.29, ["K", "Cl"], [ORIGIN, HALF]),
    "MgO": ("Fm-3m", 4.21, ["Mg", "O"], [ORIGIN, HALF]),
    "LiF": ("Fm-3m", 4.03, ["Li", "F"], [ORIGIN, HALF]),
    "CsCl": ("Pm-3m", 4.12, ["Cs", "Cl"], [ORIGIN, HALF]),
    "CsBr": ("Pm-3m", 4.29, ["Cs", "Br"], [ORIGIN, HALF]),
    "TlCl": ("Pm-3m", 3.84, ["Tl", "Cl"], [ORIGIN, HALF]),
    "ZnS": ("F-43m", 5.41, ["Zn", "S"], [ORIGIN, QUARTER]),
    "GaAs": ("F-43m", 5.65, ["Ga", "As"], [ORIGIN, QUARTER]),
    "CdTe": ("F-43m", 6.48, ["Cd", "Te"], [ORIGIN, QUARTER]),
    "CaTiO3": ("Pm-3m", 3.84, ["Ca", "Ti", "O"], [ORIGIN, HALF, [0, 0.5, 0.5]]),
    "CaF2": ("Fm-3m", 5.46, ["Ca", "F"], [ORIGIN, QUARTER]),
}
ROCK_SALT_IDS = {"NaCl", "KCl", "MgO", "LiF"}


def template(stem: str) -> Structure:
    sg, a, species, coords = TEMPLATES[stem]
    return from_spacegroup(sg, Lattice.cubic(a), species, coords)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_formulas(path: Path, formulas: list[str]) -> Path:
    """A formulas.csv shaped like the output of ``composition-gen sample`` (raw sample and formula columns)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "sample", "formula", "parse_ok", "valid_cdvae"])
        for i, f in enumerate(formulas):
            w.writerow([i, " ".join(f), f, bool(f), ""])
    return path


@pytest.fixture(scope="module")
def cif_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifs")
    for stem in TEMPLATES:
        template(stem).to(filename=str(folder / f"{stem}.cif"))
    return folder


@pytest.fixture(scope="module")
def db(cif_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "tiny.db"
    assert main(["templates", "build", str(cif_dir), "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def db_with_ranker(cif_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "ranked.db"
    assert main(["templates", "build", str(cif_dir), "-o", str(out), "--train-ranker", "--epochs", "20",
                 "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------------------------- templates
def test_templates_build_from_a_cif_folder(db):
    store = TemplateStore.load(db)
    assert sorted(store.ids) == sorted(TEMPLATES)
    assert store.ratio_keys() == {"1-1": 10, "1-1-3": 1, "1-2": 1}
    assert sorted(os.listdir(db)) == ["store.json", "store.safetensors"]
    assert os.listdir(db.parent) == [db.name]  # nothing temporary left beside it
    i = store.ids.index("NaCl")
    assert store.formulas[i] == "NaCl" and len(store.structure(i)) == 8


def test_templates_build_then_train_ranker(cif_dir, tmp_path, capsys):
    rows = [("mp-%d" % i, stem, tags) for i, (stem, tags) in enumerate(
        [("NaCl", "train"), ("KCl", "train;mp20_test"), ("MgO", "val"), ("CsCl", "train"), ("CsBr", "mp20_test"),
         ("TlCl", ""), ("ZnS", "train"), ("GaAs", "test"), ("CdTe", "train"), ("LiF", "train")])]
    with open(tmp_path / "coll.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif", "split_tags"])
        for mid, stem, tags in rows:
            w.writerow([mid, (cif_dir / f"{stem}.cif").read_text(), tags])
    (tmp_path / "ids.txt").write_text("mp-0\n\nmp-6\n")
    out = tmp_path / "db"
    assert main(["templates", "build", str(tmp_path / "coll.csv"), "-o", str(out), "--exclude-tag", "mp20_test",
                 "--exclude-tag", "test", "--exclude-ids", str(tmp_path / "ids.txt"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "5 templates" in printed and "train-ranker" in printed
    store = TemplateStore.load(out)
    assert store.ids == ["mp-2", "mp-3", "mp-5", "mp-8", "mp-9"]  # MgO, CsCl, TlCl, CdTe, LiF
    assert store.meta["skipped"]["excluded tag"] == 3 and store.meta["skipped"]["excluded id"] == 2
    assert not (out / "ranker.json").exists()

    assert main(["templates", "train-ranker", str(out), "--epochs", "3", "--seed", "1", "--no-progress"]) == 0
    assert "ranker trained" in capsys.readouterr().out
    info = json.loads((out / "ranker.json").read_text())
    assert info["trained"]["epochs"] == 3 and info["trained"]["seed"] == 1
    assert info["template_features"] and info["loss"] == "listwise" and len(info["properties"]) == 20
    assert sorted(os.listdir(out)) == ["ranker.json", "ranker.safetensors", "store.json", "store.safetensors"]
    assert TemplateStore.load(out).ids == store.ids

    # the CSPML formulation on the basic properties, saved elsewhere; a prototype fold held out and reported
    assert main(["templates", "train-ranker", str(out), "--epochs", "2", "--loss", "pairwise", "--properties", "basic",
                 "--no-template-features", "--holdout-fold", "0", "--ranker-output", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    info = json.loads((tmp_path / "r" / "ranker.json").read_text())
    assert info["loss"] == "pairwise" and len(info["properties"]) == 8 and not info["template_features"]
    assert info["trained"]["n_holdout_prototypes"] >= 0


def test_templates_errors(tmp_path, capsys):
    assert main(["templates", "build", str(tmp_path / "missing"), "-o", str(tmp_path / "db"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "db").exists()
    (tmp_path / "empty").mkdir()
    assert main(["templates", "build", str(tmp_path / "empty"), "-o", str(tmp_path / "db"), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["templates", "train-ranker", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "not a template store" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_templates_build_folder_with_a_non_structure_json(cif_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "CsCl.cif").write_text((cif_dir / "CsCl.cif").read_text())
    (src / "notes.json").write_text('{"comment": "collected in 2024"}')
    code = main(["templates", "build", str(src), "-o", str(tmp_path / "db"), "--no-progress"])
    if code == 2:  # a clean error naming the file ...
        err = capsys.readouterr().err
        assert err.startswith("error:") and "notes.json" in err and not (tmp_path / "db").exists()
    else:  # ... or the file is skipped
        assert code == 0 and TemplateStore.load(tmp_path / "db").ids == ["CsCl"]


# ------------------------------------------------------------------------------------- structure
FORMULAS = ["KBr", "SrTiO3", "NaCl2", "Xx2", "Fe4O6", "CsI", "", "MgAl2O4", "ZnSe"]


@pytest.fixture(scope="module")
def plain_run(db, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    src = _write_formulas(tmp / "formulas.csv", FORMULAS)
    out = tmp / "out"
    code = main(["structure", str(src), "--templates", str(db), "--ranking", "plain", "--top-k", "2", "-o", str(out),
                 "--no-progress"])
    return code, out


def test_structure_csv(plain_run):
    code, out = plain_run
    assert code == 0
    assert sorted(os.listdir(out)) == ["structures.csv", "structures.extxyz", "structures_cif.zip"]
    with open(out / "structures.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    rows = _read_csv(out / "structures.csv")
    by_index: dict[int, list[dict]] = {}
    for r in rows:
        by_index.setdefault(int(r["index"]), []).append(r)
    assert sorted(by_index) == list(range(len(FORMULAS)))  # one or more rows for every input, none lost

    def statuses(i):
        return [r["status"] for r in by_index[i]]

    # KBr, CsI, ZnSe: two ranked structures each from the ten 1-1 templates
    for i, formula in ((0, "KBr"), (5, "CsI"), (8, "ZnSe")):
        assert statuses(i) == ["predicted", "predicted"]
        assert [r["rank"] for r in by_index[i]] == ["1", "2"]
        assert all(r["formula"] == formula and r["reason"] == "" for r in by_index[i])
        sims = [float(r["similarity"]) for r in by_index[i]]
        assert sims[0] >= sims[1]
        assert all(r["template_formula"] in {"NaCl", "KCl", "MgO", "LiF", "CsCl", "CsBr", "TlCl", "ZnS", "GaAs", "CdTe"}
                   for r in by_index[i])
    assert by_index[0][0]["template_id"] in ROCK_SALT_IDS and by_index[0][0]["template_spacegroup"] == "Fm-3m (225)"
    assert by_index[5][0]["template_id"] == "CsBr" and by_index[5][0]["template_spacegroup"] == "Pm-3m (221)"
    assert by_index[8][0]["template_id"] == "ZnS" and by_index[8][0]["template_spacegroup"] == "F-43m (216)"
    assert int(by_index[0][0]["n_sites"]) == 8 and float(by_index[0][0]["volume"]) > 0
    # SrTiO3: only one 1-1-3 template, so one row although --top-k 2
    assert statuses(1) == ["predicted"] and by_index[1][0]["template_id"] == "CaTiO3"
    # no template with the ratio: one row with the reason, the batch goes on
    for i, formula in ((4, "Fe2O3"), (7, "MgAl2O4")):
        (r,) = by_index[i]
        assert (r["formula"], r["status"], r["rank"], r["template_id"]) == (formula, "no_template", "", "")
        assert "stoichiometric" in r["reason"]
    (r,) = by_index[2]
    assert (r["formula"], r["status"]) == ("NaCl2", "skipped") and "validity" in r["reason"]
    for i in (3, 6):
        (r,) = by_index[i]
        assert r["status"] == "unparseable" and r["reason"]
    assert "Xx" in by_index[3][0]["reason"]


def test_structure_cif_zip_and_extxyz(plain_run):
    from ase.io import read as ase_read

    _, out = plain_run
    rows = [r for r in _read_csv(out / "structures.csv") if r["status"] == "predicted"]
    assert len(rows) == 7
    with zipfile.ZipFile(out / "structures_cif.zip") as zf:
        names = zf.namelist()
        assert len(names) == len(rows) == len(set(names))
        for r in rows:
            name = f"{int(r['index']):05d}_{r['formula']}_rank{r['rank']}.cif"
            assert name in names
            s = Structure.from_str(zf.read(name).decode(), fmt="cif")
            assert s.composition.reduced_formula == Composition(r["formula"]).reduced_formula
            assert len(s) == int(r["n_sites"])
            assert s.volume == pytest.approx(float(r["volume"]), rel=1e-3)
    frames = ase_read(str(out / "structures.extxyz"), index=":", format="extxyz")
    assert len(frames) == len(rows)
    for atoms, r in zip(frames, rows):
        assert atoms.info["formula"] == r["formula"]
        assert int(atoms.info["rank"]) == int(r["rank"])
        assert str(atoms.info["template_id"]) == r["template_id"]
        assert Composition(atoms.get_chemical_formula()).reduced_formula == r["formula"]
        assert atoms.get_volume() == pytest.approx(float(r["volume"]), rel=1e-3)


def test_structure_include_invalid(db, tmp_path):
    src = tmp_path / "formulas.txt"
    src.write_text("NaCl2\nKBr\n")  # a plain text file, one formula a line
    assert main(["structure", str(src), "--templates", str(db), "--ranking", "plain", "--top-k", "3", "--no-group-types",
                 "--include-invalid", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "out" / "structures.csv")
    nacl2 = [r for r in rows if r["index"] == "0"]
    assert [(r["status"], r["rank"], r["template_id"]) for r in nacl2] == [("predicted", "1", "CaF2")]
    assert [r["rank"] for r in rows if r["index"] == "1"] == ["1", "2", "3"]
    with zipfile.ZipFile(tmp_path / "out" / "structures_cif.zip") as zf:
        s = Structure.from_str(zf.read("00000_NaCl2_rank1.cif").decode(), fmt="cif")
    assert s.composition.reduced_formula == "NaCl2"


def test_structure_learned_ranking_with_the_stores_ranker(db_with_ranker, tmp_path):
    assert (db_with_ranker / "ranker.json").is_file()
    src = _write_formulas(tmp_path / "formulas.csv", ["NaBr", "CsI", "ZnSe"])
    assert main(["structure", str(src), "--templates", str(db_with_ranker), "--top-k", "3", "--no-group-types",
                 "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "out" / "structures.csv")
    assert len(rows) == 9 and {r["status"] for r in rows} == {"predicted"}
    for f in ("NaBr", "CsI", "ZnSe"):  # ranks follow the similarity
        sims = [float(r["similarity"]) for r in rows if r["formula"] == f]
        assert sims == sorted(sims, reverse=True)
    firsts = {r["formula"]: r["template_id"] for r in rows if r["rank"] == "1"}
    assert firsts["NaBr"] in ROCK_SALT_IDS
    assert firsts["CsI"] in {"CsCl", "CsBr", "TlCl"}
    assert firsts["ZnSe"] in {"ZnS", "GaAs", "CdTe"}


def test_random_ranking_is_seeded(db, tmp_path):
    src = _write_formulas(tmp_path / "formulas.csv", ["KBr", "RbI"])

    def run(name, seed):
        assert main(["structure", str(src), "--templates", str(db), "--ranking", "random", "--seed", str(seed),
                     "--top-k", "10", "-o", str(tmp_path / name), "--no-progress"]) == 0
        return [r["template_id"] for r in _read_csv(tmp_path / name / "structures.csv")]

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert len(a) == 20 and a == b and a != c
    assert sorted(a[:10]) == sorted(c[:10])  # the same ten templates, another order


def test_structure_with_the_shipped_default(tmp_path, capsys):
    learned = (DEFAULT_RANKER / "ranker.json").is_file()
    src = _write_formulas(tmp_path / "formulas.csv", ["KBr", "SrTiO3"])
    args = ["structure", str(src), "--top-k", "1", "-o", str(tmp_path / "out"), "--no-progress"]
    if not learned:  # no shipped ranker yet: the untrained ranking
        args += ["--ranking", "plain"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "no --templates given" in err and "compact Materials Project store" in err
    rows = _read_csv(tmp_path / "out" / "structures.csv")
    assert [(r["formula"], r["rank"], r["status"]) for r in rows] == [("KBr", "1", "predicted"),
                                                                       ("SrTiO3", "1", "predicted")]
    assert rows[0]["template_id"].startswith(("mp-", "mvc-"))  # a Materials Project structure
    with zipfile.ZipFile(tmp_path / "out" / "structures_cif.zip") as zf:
        for r in rows:
            s = Structure.from_str(zf.read(f"{int(r['index']):05d}_{r['formula']}_rank1.cif").decode(), fmt="cif")
            assert s.composition.reduced_formula == r["formula"]


def test_the_shipped_store_and_its_aflow_fallback(monkeypatch, tmp_path):
    import structure.pipeline as pipeline

    shipped = pipeline.default_store()
    assert len(shipped) == 53164 and "CC BY 4.0" in shipped.meta["attribution"]
    assert shipped.meta.get("per_type") is None and len(set(shipped.prototypes)) > 12000
    assert len(shipped.rows_with_key("1")) > 80  # every MP elemental structure: the elemental references
    monkeypatch.setattr(pipeline, "DEFAULT_TEMPLATES", tmp_path / "none")
    assert len(pipeline.default_store()) == 288  # an installation without it falls back to the AFLOW prototypes


@pytest.mark.parametrize("case", ["missing formulas", "top-k 0", "not a store", "missing store", "no ranker",
                                  "no formulas"])
def test_structure_bad_input(case, db, cif_dir, tmp_path, capsys):
    src = _write_formulas(tmp_path / "formulas.csv", ["KBr"])
    out = tmp_path / "out"
    args = {"missing formulas": [str(tmp_path / "nope.csv"), "--templates", str(db)],
            "top-k 0": [str(src), "--templates", str(db), "--top-k", "0"],
            "not a store": [str(src), "--templates", str(cif_dir), "--ranking", "plain"],
            "missing store": [str(src), "--templates", str(tmp_path / "nope.db"), "--ranking", "plain"],
            "no ranker": [str(src), "--templates", str(db), "--ranker", str(tmp_path / "nope")],
            "no formulas": [str(_write_formulas(tmp_path / "empty.csv", [])), "--templates", str(db)]}[case]
    assert main(["structure", *args, "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not out.exists()  # nothing half-written

    out.mkdir()  # earlier results in the output folder are left alone
    (out / "structures.csv").write_text("old\n")
    assert main(["structure", *args, "-o", str(out), "--no-progress"]) == 2
    assert os.listdir(out) == ["structures.csv"] and (out / "structures.csv").read_text() == "old\n"


def test_structure_help_names_the_options():
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(["structure", "--help"])
    assert exc.value.code == 0
    text = buf.getvalue()
    for option in ("--templates", "--ranking", "--top-k", "--include-invalid", "--relax", "--output"):
        assert option in text


def test_structure_groups_templates_by_type_by_default(db_with_ranker, tmp_path):
    src = _write_formulas(tmp_path / "formulas.csv", ["NaBr", "CsI"])
    assert main(["structure", str(src), "--templates", str(db_with_ranker), "--top-k", "5", "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "out" / "structures.csv")
    for f in ("NaBr", "CsI"):
        mine = [r for r in rows if r["formula"] == f]
        assert 1 < len(mine) < 5  # the tiny store holds fewer structure types than templates
        assert len({r["template_spacegroup"] for r in mine}) == len(mine)  # one template per type
        assert [r["rank"] for r in mine] == [str(i) for i in range(1, len(mine) + 1)]
