"""Corpus loading (composition_lm.data.load_corpus)."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from composition_lm.data import CorpusError, CorpusReport, iter_rows, load_corpus, read_formula_column
from evaluation.composition import Formula, parse_formula


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- text
BROKEN_TEXT = (
    "NaCl\n"  # line 1: kept
    "\n"  # line 2: empty
    "# a comment line\n"  # line 3: skipped, not counted
    "Xx2O\n"  # line 4: unknown element
    "Ca(OH2\n"  # line 5: unbalanced parenthesis
    "KCl\n"  # line 6: kept
    "Cl Na\n"  # line 7: duplicate of line 1
    "Fe2O3\n"  # line 8: kept
    "CaOH)2\n"  # line 9: unbalanced parenthesis
)


def test_text_file_with_broken_lines(tmp_path):
    ds, report = load_corpus(_write(tmp_path / "corpus.txt", BROKEN_TEXT))
    assert isinstance(report, CorpusReport)
    assert report.n_read == 8  # the comment line is not an entry
    assert report.n_bad == 4
    assert report.n_duplicates == 1
    assert report.n_kept == 3 == len(ds)
    assert ds["formula"] == ["NaCl", "KCl", "Fe2O3"]
    assert ds["raw"] == ["NaCl", "KCl", "Fe2O3"]
    assert ds["line"] == ["line 1", "line 6", "line 8"]
    assert ds["n_elements"] == [2, 2, 2]
    assert ds["n_atoms"] == [2, 2, 5]
    assert set(ds["split"]) == {"all"}
    where = [w for w, _, _ in report.bad_examples]
    assert where == ["line 2", "line 4", "line 5", "line 9"]
    texts = [t for _, t, _ in report.bad_examples]
    assert texts == ["", "Xx2O", "Ca(OH2", "CaOH)2"]
    reasons = [r for _, _, r in report.bad_examples]
    assert reasons[0] == "empty"
    assert "unknown element" in reasons[1] and "Xx" in reasons[1]
    assert "(" in reasons[2] and ("unclosed" in reasons[2] or "unbalanced" in reasons[2])
    assert "unbalanced" in reasons[3]
    assert sum(report.bad_reasons.values()) == 4
    summary = report.summary()
    assert "read 8" in summary and "kept 3" in summary and "bad 4" in summary and "line 4" in summary


def test_bad_examples_are_capped_but_all_counted(tmp_path):
    lines = ["NaCl"] + [f"Qq{i}" for i in range(12)]
    _, report = load_corpus(_write(tmp_path / "c.txt", "\n".join(lines) + "\n"))
    assert report.n_bad == 12
    assert len(report.bad_examples) == 5
    assert [w for w, _, _ in report.bad_examples] == [f"line {i}" for i in range(2, 7)]
    assert "7 more" in report.summary()


def test_gzip_text(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(BROKEN_TEXT)
    ds, report = load_corpus(path)
    assert ds["formula"] == ["NaCl", "KCl", "Fe2O3"]
    assert (report.n_read, report.n_bad, report.n_duplicates) == (8, 4, 1)


def test_unknown_suffix_is_read_as_text(tmp_path):
    ds, _ = load_corpus(_write(tmp_path / "formulas.lst", "SrTiO3\nO3TiSr\nBaTiO3\n"))
    assert ds["formula"] == ["SrTiO3", "BaTiO3"]


# ------------------------------------------------------------------------------------- Dong format
DONG_LINES = (
    "sg : 127 | ele : Rb Cr F | ele_num : 11.0 | oxide : 0 || Rb Rb Rb Cr F F F F F F F .\n"
    "sg : 40 | ele : Mn O F | ele_num : 3.0 | oxide : 1 || Mn O F .\n"
    "sg : 1 | ele : Mn O F | ele_num : 5.0 | oxide : 1 || Mn Mn O F F .\n"
)


def test_dong_prefix_format_handwritten(tmp_path):
    ds, report = load_corpus(_write(tmp_path / "dong.txt", DONG_LINES + "sg : 2 | ele : Mn Qq || Mn Qq .\n"))
    assert report.n_read == 4 and report.n_bad == 1
    expected = [
        Formula.from_counts({"Rb": 3, "Cr": 1, "F": 7}),
        Formula.from_counts({"Mn": 1, "O": 1, "F": 1}),
        Formula.from_counts({"Mn": 2, "O": 1, "F": 2}),
    ]
    assert ds["formula"] == [str(f) for f in expected]
    assert ds["formula"] == ["Rb3CrF7", "MnOF", "Mn2OF2"]  # Rb 0.82 < Cr 1.66 < F; Mn < O 3.44 < F 3.98
    assert ds["raw"][0].startswith("sg : 127")
    assert report.bad_examples[0][0] == "line 4"
    assert "Qq" in report.bad_examples[0][2]


def test_dong_shared_valid_file(shared_dir):
    path = shared_dir / "data" / "formulas" / "dong2023" / "mp_data_src1_valid.txt"
    if not path.exists():
        pytest.skip(f"missing {path}")
    ds, report = load_corpus(path)
    assert report.n_read == 9070
    assert report.n_bad == 0
    assert report.n_kept + report.n_duplicates == 9070
    # independent reading: count the element tokens after "||", reduce by the gcd
    distinct = set()
    for line in path.read_text().splitlines():
        body = line.split("||", 1)[1].split()
        assert body[-1] == "."
        counts = Counter(body[:-1])
        g = math.gcd(*counts.values())
        distinct.add(frozenset((el, n // g) for el, n in counts.items()))
    assert report.n_kept == len(distinct)
    assert {frozenset(parse_formula(f).as_dict().items()) for f in ds["formula"]} == distinct


# ------------------------------------------------------------------------------------------ tables
def test_csv_with_column(tmp_path):
    path = _write(tmp_path / "t.csv", "id,formula,my_formula\n1,KCl,NaCl\n2,KCl,Xx\n3,KCl,Fe4O6\n")
    ds, report = load_corpus(path, column="my_formula")
    assert ds["formula"] == ["NaCl", "Fe2O3"]
    assert ds["line"] == ["row 1", "row 3"]
    assert report.n_bad == 1 and report.bad_examples[0][:2] == ("row 2", "Xx")
    # without column=: the "formula" column is chosen automatically
    ds, report = load_corpus(path)
    assert ds["formula"] == ["KCl"] and report.n_duplicates == 2
    with pytest.raises(CorpusError, match="no column 'nope'"):
        load_corpus(path, column="nope")


def test_csv_without_formula_column(tmp_path):
    with pytest.raises(CorpusError, match="no formula column"):
        load_corpus(_write(tmp_path / "t.csv", "a,b\nNaCl,1\n"))


def test_csv_gz(tmp_path):
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("reduced_formula,x\nNaCl,1\nKBr,2\nQq,3\n")
    ds, report = load_corpus(path)
    assert ds["formula"] == ["NaCl", "KBr"]
    assert report.n_read == 3 and report.n_bad == 1


def test_tsv(tmp_path):
    ds, report = load_corpus(_write(tmp_path / "t.tsv", "id\tcomposition\n1\tNaCl\n2\tSr Ti O O O\n3\tBa(PRh)2\n"))
    assert ds["formula"] == ["NaCl", "SrTiO3", "BaP2Rh2"]
    assert report.n_read == 3


def test_json_lines_and_json_array(tmp_path):
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"comp": "NaCl"}\n{"comp": "LiF"}\n{"comp": "Q"}\n')
    ds, report = load_corpus(jl, column="comp")
    assert ds["formula"] == ["NaCl", "LiF"] and report.n_bad == 1
    arr = tmp_path / "t.json"
    arr.write_text(json.dumps([{"pretty_formula": "Al2O3"}, {"pretty_formula": "O3Al2"}, {"pretty_formula": "MgO"}]))
    ds, report = load_corpus(arr)
    assert ds["formula"] == ["Al2O3", "MgO"] and report.n_duplicates == 1


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"formula": ["NaCl", "Fe2O3", None, "K4(Fe(CN)6)"], "x": [1, 2, 3, 4]}).to_parquet(path)
    ds, report = load_corpus(path)
    assert ds["formula"] == ["NaCl", "Fe2O3", "K4FeC6N6"]
    assert report.n_read == 4 and report.n_bad == 1
    assert report.bad_examples[0][0] == "row 3" and report.bad_examples[0][2] == "empty"


def test_fmt_override(tmp_path):
    ds, _ = load_corpus(_write(tmp_path / "t.dat", "formula\nNaCl\nKBr\n"), fmt="csv")
    assert ds["formula"] == ["NaCl", "KBr"]


def test_csv_keeps_sodium_nitride(tmp_path):
    """"NaN" is sodium nitride, a real formula; a CSV reader must not turn it into a missing value."""
    path = _write(tmp_path / "t.csv", "formula\nNaCl\nNaN\nKCl\n")
    ds, report = load_corpus(path)
    assert report.n_bad == 0, report.summary()
    assert ds["formula"] == ["NaCl", "NaN", "KCl"]


# --------------------------------------------------------------------------------------- CIF (CDVAE)
def _nacl_cif(with_formula_sum: bool) -> str:
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    s = Structure(Lattice.cubic(5.6), ["Na", "Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0], [0, 0.5, 0]])
    cif = str(CifWriter(s))
    if not with_formula_sum:
        cif = "\n".join(line for line in cif.splitlines() if "_chemical_formula_sum" not in line)
    return cif


def test_cif_column(tmp_path):
    cif_sum, cif_sites = _nacl_cif(True), _nacl_cif(False)
    assert "_chemical_formula_sum" in cif_sum and "_chemical_formula_sum" not in cif_sites
    path = tmp_path / "cdvae.csv"
    pd.DataFrame({"material_id": [1, 2, 3], "cif": [cif_sum, cif_sites, "this is not a cif"]}).to_csv(path, index=False)
    ds, report = load_corpus(path, dedupe=False)
    assert report.n_read == 3
    assert ds["formula"] == ["NaCl", "NaCl"]
    assert report.n_bad == 1 and report.bad_examples[0][0] == "row 3"
    assert "CIF" in report.bad_examples[0][2]


def test_cdvae_perov_val_via_cif(shared_dir):
    path = shared_dir / "data" / "structures" / "perov_5" / "val.csv.gz"
    if not path.exists():
        pytest.skip(f"missing {path}")
    ds, report = load_corpus(path, column="cif", dedupe=False)
    assert report.n_read == 3787
    assert report.n_bad == 0 and len(ds) == 3787
    assert ds["formula"][0] == "CdCuN3"
    # independent reference: pymatgen reading the CIFs themselves (a few rows: parsing is slow)
    from pymatgen.core import Structure

    frame = pd.read_csv(path)
    for i in range(0, 3787, 400):
        comp = Structure.from_str(frame["cif"][i], fmt="cif").composition
        counts = {str(el): int(n) for el, n in comp.items()}
        g = math.gcd(*counts.values())
        assert parse_formula(ds["formula"][i]).as_dict() == {el: n // g for el, n in counts.items()}, i
    # and the table's own formula column agrees row by row
    by_column, _ = load_corpus(path, column="formula", dedupe=False)
    assert by_column["formula"] == ds["formula"]


# ------------------------------------------------------------------------------------------- splits
def test_split_column_mp(mp_csv, mp_frame):
    ds, report = load_corpus(mp_csv, split="test")
    test_rows = mp_frame[mp_frame["split"] == "test"]
    assert set(ds["split"]) == {"test"}
    assert report.n_other_split == len(mp_frame) - len(test_rows)
    assert report.n_kept + report.n_duplicates + report.n_bad == len(test_rows)
    assert set(ds["formula"]) == {str(parse_formula(f)) for f in test_rows["formula"]}


def test_split_column_small(tmp_path):
    path = _write(tmp_path / "t.csv", "formula,split\nNaCl,train\nKCl,val\nLiF,test\nKBr,val\n")
    ds, report = load_corpus(path, split="val")
    assert ds["formula"] == ["KCl", "KBr"] and set(ds["split"]) == {"val"}
    assert report.n_other_split == 2
    ds, _ = load_corpus(path)  # no split requested: all rows, split column carried over
    assert ds["split"] == ["train", "val", "test", "val"]


def _synthetic_corpus(tmp_path) -> tuple[Path, list[str]]:
    """~15k distinct binary formulas, each written twice with different spellings."""
    from evaluation.composition import ELEMENTS

    els = ELEMENTS[:40]
    texts, canon = [], []
    for i, a in enumerate(els):
        for b in els[i + 1 :]:
            for na in range(1, 6):
                for nb in range(1, 6):
                    if math.gcd(na, nb) != 1:
                        continue
                    texts.append(f"{a}{na}{b}{nb}")
                    texts.append(f"{b}{2 * nb} {a}{2 * na}")  # same reduced formula, other spelling
                    canon.append(str(Formula.from_counts({a: na, b: nb})))
    path = tmp_path / "synthetic.txt"
    path.write_text("\n".join(texts) + "\n")
    return path, canon


def test_seeded_split(tmp_path):
    path, canon = _synthetic_corpus(tmp_path)
    n = len(set(canon))
    assert n == len(canon) > 10_000
    val, rv = load_corpus(path, split="val", val_fraction=0.1, seed=3)
    train, rt = load_corpus(path, split="train", val_fraction=0.1, seed=3)
    v, t = set(val["formula"]), set(train["formula"])
    assert not v & t  # disjoint by formula
    assert v | t == set(canon)  # together: the whole corpus
    assert len(v) + len(t) == n
    assert rv.n_other_split == 2 * len(t) and rt.n_other_split == 2 * len(v)
    assert rv.n_duplicates == len(v)  # every formula occurs twice
    share = len(v) / n
    assert abs(share - 0.1) < 0.02, share  # binomial sd ~ 0.0025
    assert set(val["split"]) == {"val"} and set(train["split"]) == {"train"}
    # deterministic for a seed, different for another
    again, _ = load_corpus(path, split="val", val_fraction=0.1, seed=3)
    assert again["formula"] == val["formula"]
    other, _ = load_corpus(path, split="val", val_fraction=0.1, seed=4)
    assert set(other["formula"]) != v


def test_seeded_split_puts_spellings_together(tmp_path):
    path, _ = _synthetic_corpus(tmp_path)
    val, _ = load_corpus(path, split="val", val_fraction=0.2, seed=0, dedupe=False)
    counts = Counter(val["formula"])
    assert counts and set(counts.values()) == {2}  # both spellings of a formula in the same split


def test_seeded_split_extremes(tmp_path):
    path = _write(tmp_path / "c.txt", "NaCl\nKCl\nLiF\nMgO\n")
    ds, _ = load_corpus(path, split="train", val_fraction=0.0)
    assert len(ds) == 4
    with pytest.raises(CorpusError):
        load_corpus(path, split="train", val_fraction=1.0)  # nothing left
    ds, _ = load_corpus(path, split="val", val_fraction=1.0)
    assert len(ds) == 4


# ---------------------------------------------------------------------------------- dedupe, filters
def test_dedupe_on_off(tmp_path):
    path = _write(tmp_path / "c.txt", "NaCl\nNa2Cl2\nClNa\nKCl\n")
    ds, report = load_corpus(path)
    assert ds["formula"] == ["NaCl", "KCl"] and ds["raw"] == ["NaCl", "KCl"]
    assert report.n_duplicates == 2
    ds, report = load_corpus(path, dedupe=False)
    assert ds["formula"] == ["NaCl", "NaCl", "NaCl", "KCl"]
    assert ds["raw"] == ["NaCl", "Na2Cl2", "ClNa", "KCl"]
    assert report.n_duplicates == 0
    formulas, rep = read_formula_column(path)
    assert formulas == ["NaCl", "NaCl", "NaCl", "KCl"] and rep.n_kept == 4


def test_filters(tmp_path):
    # NaCl: 2 el / 2 atoms; SrTiO3: 3 / 5; Fe2O3: 2 / 5; K4FeC6N6: 4 / 17
    path = _write(tmp_path / "c.txt", "NaCl\nSrTiO3\nFe2O3\nK4(Fe(CN)6)\n")
    ds, report = load_corpus(path, max_elements=2)
    assert ds["formula"] == ["NaCl", "Fe2O3"] and report.n_filtered == 2
    ds, report = load_corpus(path, max_atoms=5)
    assert ds["formula"] == ["NaCl", "SrTiO3", "Fe2O3"] and report.n_filtered == 1
    ds, report = load_corpus(path, max_elements=3, max_atoms=4)
    assert ds["formula"] == ["NaCl"] and report.n_filtered == 3
    with pytest.raises(CorpusError):
        load_corpus(path, max_atoms=1)


# ----------------------------------------------------------------------------------------- failures
def test_empty_file(tmp_path):
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(_write(tmp_path / "e.txt", ""))
    with pytest.raises(CorpusError):
        load_corpus(_write(tmp_path / "c.txt", "# only a comment\n"))
    with pytest.raises(CorpusError):
        load_corpus(_write(tmp_path / "e.csv", "formula\n"))


def test_all_bad_file(tmp_path):
    with pytest.raises(CorpusError, match="no usable formula") as info:
        load_corpus(_write(tmp_path / "bad.txt", "Xx\n\nQq(\n"))
    assert "line 1" in str(info.value)  # the report summary is part of the message


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="no such file"):
        iter_rows(tmp_path / "nope.csv")
    assert issubclass(CorpusError, ValueError)


def test_iter_rows_payloads(tmp_path):
    rows = list(iter_rows(_write(tmp_path / "t.csv", "formula,split\nNaCl,train\nKCl,val\n")))
    assert rows == [("row 1", "NaCl", ("NaCl", "train")), ("row 2", "KCl", ("KCl", "val"))]
    rows = list(iter_rows(_write(tmp_path / "t.txt", "NaCl\n#c\nKCl\n")))
    assert rows == [("line 1", "NaCl", "NaCl"), ("line 3", "KCl", "KCl")]
