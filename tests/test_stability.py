"""Energy above the hull: hand-computed hulls, leave-own-entry-out, unreferenced elements, the M3GNet scorer and
the `stability` command."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from composition_lm.cli import main
from evaluation.hull import ReferenceHull

POTENTIAL = Path(__file__).resolve().parents[2] / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
needs_potential = pytest.mark.skipif(not POTENTIAL.is_dir(), reason="needs the M3GNet weights in ../shared")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def nacl_hull() -> ReferenceHull:
    """Na-Cl on the formation-energy scale: NaCl at -1.0 and NaCl2 at -0.8 eV/atom are on the hull."""
    return ReferenceHull(["Na", "Cl", "NaCl", "NaCl2"], [0.0, 0.0, -1.0, -0.8], ["na", "cl", "nacl", "nacl2"])


def test_a_compound_on_the_hull_sits_at_zero(nacl_hull):
    r = nacl_hull.e_above_hull("NaCl", -1.0)
    assert r.e_hull_per_atom == pytest.approx(0.0, abs=1e-9) and r.decomposition == "1 NaCl"
    assert r.e_hull_formation == pytest.approx(-1.0)


def test_a_compound_above_the_hull_by_hand(nacl_hull):
    # Na2Cl (x_Cl = 1/3): the hull is the Na-NaCl line, -2/3 eV/atom there; -0.5 is 1/6 above it
    r = nacl_hull.e_above_hull("Na2Cl", -0.5)
    assert r.e_hull_per_atom == pytest.approx(1 / 6)
    assert r.decomposition == "0.667 NaCl + 0.333 Na"


def test_a_compound_below_the_hull_by_hand(nacl_hull):
    # NaCl3 (x_Cl = 3/4): the hull is the NaCl2-Cl line, -0.8 * (1/4) / (1/3) = -0.6 there; -0.7 is 0.1 below
    r = nacl_hull.e_above_hull("NaCl3", -0.7)
    assert r.e_hull_per_atom == pytest.approx(-0.1) and r.e_hull_formation == pytest.approx(-0.6)
    assert r.decomposition == "1 NaCl3"


def test_leave_own_entry_out(nacl_hull):
    assert nacl_hull.e_above_hull("NaCl2", -0.8).e_hull_per_atom == pytest.approx(0.0, abs=1e-9)
    # without its own entry the hull at x = 2/3 is the NaCl-Cl line: -1 + (2/3 - 1/2) / (1/2) = -2/3
    r = nacl_hull.e_above_hull("NaCl2", -0.8, exclude=["nacl2"])
    assert r.e_hull_per_atom == pytest.approx(-0.8 + 2 / 3) and r.e_hull_formation == pytest.approx(-2 / 3)


def test_unreferenced_element_is_nan_with_a_reason_and_others_still_score(nacl_hull):
    r = nacl_hull.e_above_hull("NaXe", -0.1)
    assert math.isnan(r.e_hull_per_atom) and r.reason == "no reference for Xe"
    assert nacl_hull.e_above_hull("Qq2", -0.1).reason == "no reference for Qq"
    assert "unreadable" in nacl_hull.e_above_hull("Na((", -0.1).reason
    assert nacl_hull.e_above_hull("NaCl", float("nan")).reason == "no formation energy"
    assert nacl_hull.e_above_hull("Na", 0.05).e_hull_per_atom == pytest.approx(0.05)


def test_reference_tables_read_from_csv_and_pymatgen_entries(tmp_path, nacl_hull):
    from pymatgen.entries.computed_entries import ComputedEntry

    csv = tmp_path / "ref.csv"
    csv.write_text("# a comment line\nmaterial_id,formula,formation_energy_per_atom\na,Na,0\nb,Cl2,0\nc,NaCl,-1.0\n"
                   "d,NaCl2,-0.8\ne,Na3Cl,\n")
    hull = ReferenceHull.load(csv)
    assert len(hull) == 4 and hull.e_above_hull("Na2Cl", -0.5).e_hull_per_atom == pytest.approx(1 / 6)
    # total energies: Na -1.3, Cl -1.8 eV/atom; NaCl at -1.0 eV/atom formation energy
    entries = [ComputedEntry("Na", -1.3), ComputedEntry("Cl2", -3.6), ComputedEntry("NaCl", 2 * (-1.55 - 1.0))]
    path = tmp_path / "entries.json"
    path.write_text(json.dumps([e.as_dict() for e in entries]))
    hull = ReferenceHull.load(path)
    assert hull.e_above_hull("NaCl", -0.9).e_hull_per_atom == pytest.approx(0.1)
    with pytest.raises(FileNotFoundError):
        ReferenceHull.load(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("formula,energy\nNaCl,-1\n")
    with pytest.raises(ValueError, match="formation_energy_per_atom"):
        ReferenceHull.load(bad)


def test_a_verdict_that_rests_on_an_estimated_phase_says_so(tmp_path):
    csv = tmp_path / "ref.csv"
    csv.write_text("material_id,formula,formation_energy_per_atom,source\na,Na,0,mp\nb,Cl,0,mp\n"
                   "c,NaCl,-1.0,estimated: composition model\nd,NaCl2,-0.8,mp\n")
    hull = ReferenceHull.load(csv)
    rests = hull.e_above_hull("Na2Cl", -0.5)  # decomposes into Na + NaCl, and NaCl's energy is an estimate
    assert rests.estimated == ("NaCl",) and "estimated energy for NaCl" in rests.reason and not rests.lower_bound
    own = hull.e_above_hull("NaCl", -1.2)  # the estimated composition itself: its verdict is only a lower bound
    assert own.lower_bound and "estimated energy only" in own.reason
    apart = hull.e_above_hull("NaCl3", -0.5)  # NaCl2 + Cl: measured phases only
    assert apart.estimated == () and apart.reason == ""


def test_the_shipped_table_estimates_what_mp_lists_without_an_energy():
    hull = ReferenceHull.default()
    table = pd.read_csv(hull.source, comment="#", keep_default_na=False, na_values=[""])
    csf = table[table["reduced_formula"] == "CsF"]
    assert csf["source"].str.startswith("estimated").all()  # MP lists CsF without a formation energy
    assert -3.3 < csf["formation_energy_per_atom"].min() < -2.4
    assert table["formation_energy_per_atom"].notna().all()
    # Cs3DyF6 at -3.59 eV/atom came out 1.8 eV/atom below a Cs-Dy-F hull without CsF
    r = hull.e_above_hull("Cs3DyF6", -3.59)
    assert r.e_hull_per_atom > -0.6 and "CsF" in r.estimated


def test_the_shipped_table_puts_mp_ground_states_on_the_hull():
    hull = ReferenceHull.default()
    assert len(hull) > 90_000 and {"Na", "Cl", "O", "Fe", "Xe"} <= hull.elements
    table = pd.read_csv(hull.source, comment="#", keep_default_na=False, na_values=[""])
    nacl = table[table["reduced_formula"] == "NaCl"].sort_values("formation_energy_per_atom").iloc[0]
    assert nacl["formation_energy_per_atom"] == pytest.approx(-2.11, abs=0.02)  # MP2020-corrected value
    r = hull.e_above_hull("NaCl", nacl["formation_energy_per_atom"])
    assert r.e_hull_per_atom == pytest.approx(0.0, abs=1e-6)
    assert hull.e_above_hull("NaCl", nacl["formation_energy_per_atom"], exclude=[nacl["material_id"]]).e_hull_per_atom < -0.3
    import gzip

    with gzip.open(hull.source, "rt", encoding="utf-8") as fh:
        assert "CC BY 4.0" in fh.readline()


def test_mp2020_correction_is_applied_as_mp_would():
    from structure.stability import mp2020_correction

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    c, why = mp2020_correction(nacl, -3.37)
    assert why == "" and c == pytest.approx(-0.614 / 2, abs=0.01)  # MP2020 chloride correction per Cl atom
    fe2o3 = Structure.from_spacegroup("R-3c", Lattice.hexagonal(5.03, 13.7), ["Fe", "O"], [[0, 0, 0.355], [0.306, 0, 0.25]])
    c, why = mp2020_correction(fe2o3, -6.6)
    assert why == "" and c < -1.0  # oxide correction plus the GGA/GGA+U mixing correction for Fe
    na = Structure(Lattice.cubic(4.2), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert mp2020_correction(na, -1.3) == (0.0, "")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refs")


@needs_potential
def test_scorer_relaxed_static_and_failures_in_input_order(references):
    from structure.stability import StabilityScorer

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlap = Structure(Lattice.cubic(3), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    scorer = StabilityScorer(POTENTIAL, settings={"max_steps": 300}, cache_dir=references)
    assert scorer.correction == "mp2020"  # M3GNet learnt MP's uncorrected energies
    records = scorer.score([nacl, overlap, None])
    assert [r.index for r in records] == [0, 1, 2]
    ok, bad, missing = records
    assert ok.status == "converged" and ok.decomposition == "1 NaCl" and ok.correction_per_atom < 0
    assert -2.3 < ok.e_form_per_atom < -1.9  # MP: -2.11 eV/atom
    assert abs(ok.e_hull_per_atom) < 0.15 and ok.reason == ""
    assert bad.status == "failed" and "overlapping" in bad.reason and math.isnan(bad.e_hull_per_atom)
    assert missing.status == "failed" and missing.reason == "unreadable structure"
    static = StabilityScorer(POTENTIAL, settings={"max_steps": 300}, relax=False, cache_dir=references,
                             correction="none")
    r = static.score([nacl])[0]
    assert r.status == "static" and r.correction_per_atom == 0.0
    assert r.e_form_per_atom == pytest.approx(ok.e_form_per_atom - ok.correction_per_atom, abs=0.02)


@needs_potential
def test_score_rows_relaxes_output_rows_in_place_and_indexes_records_as_the_rows(references):
    from structure.io import Row
    from structure.stability import StabilityScorer

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlap = Structure(Lattice.cubic(3), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    rows = [Row(7, "NaCl", structure=nacl.copy()), Row(8, "Xx", status="unparseable"),
            Row(9, "NaCl", structure=overlap)]
    records = StabilityScorer(POTENTIAL, settings={"max_steps": 300}, cache_dir=references).score_rows(rows)
    assert [r.index for r in records] == [7, 9]  # one record per row with a structure, numbered as the row
    ok, bad = records
    assert rows[0].status == ok.status == "converged" and rows[0].volume != pytest.approx(nacl.volume, abs=0.5)
    assert rows[0].energy_per_atom == pytest.approx(ok.energy_per_atom, abs=1e-5)
    # the row keeps the potential's own formation energy; the record's is on the hull's (corrected) scale
    assert rows[0].formation_energy_per_atom == pytest.approx(ok.e_form_per_atom - ok.correction_per_atom, abs=1e-4)
    assert rows[1].status == "unparseable" and rows[2].status == bad.status == "failed"
    assert rows[2].structure is overlap and rows[2].energy_per_atom is None


@needs_potential
def test_stability_command_writes_one_row_per_input(references, tmp_path, capsys):
    from pymatgen.io.cif import CifWriter

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    xe = Structure(Lattice.cubic(4.0), ["Na", "Xe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as zf:
        zf.writestr("0.cif", str(CifWriter(nacl)))
        zf.writestr("1.cif", "not a cif")
        zf.writestr("2.cif", str(CifWriter(xe)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "elemental_references.json").write_text((references / "elemental_references.json").read_text())
    ref = tmp_path / "ref.csv"  # Xe has no reference here
    ref.write_text("formula,formation_energy_per_atom\nNa,0\nCl,0\nNaCl,-2.11\n")
    assert main(["stability", str(tmp_path / "in.zip"), "--potential", str(POTENTIAL), "--reference", str(ref),
                 "--max-steps", "60", "--no-progress", "-o", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "stability.csv", keep_default_na=False)
    assert table.columns.tolist() == ["index", "formula", "energy_per_atom", "e_form_per_atom", "e_hull_per_atom",
                                      "e_hull_std", "hull_lower_bound", "decomposition", "status", "reason"]
    assert (table["e_hull_std"] == "").all()  # one judge: no spread
    assert table["index"].tolist() == [0, 1, 2]
    assert table.loc[0, "decomposition"] == "1 NaCl" and table.loc[0, "status"] in ("converged", "not_converged")
    assert table.loc[1, "status"] == "failed" and table.loc[1, "e_hull_per_atom"] == ""
    assert table.loc[2, "e_hull_per_atom"] == "" and "no reference for Xe" in table.loc[2, "reason"]
    assert "3 structures" in capsys.readouterr().out


def test_stability_command_bad_input_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w"):
        pass
    assert main(["stability", str(empty), "--potential", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["stability", str(tmp_path / "missing"), "--reference", str(tmp_path / "none.csv"), "-o",
                 str(tmp_path / "o")]) == 2
    assert "no reference table" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
