"""CDVAE's structure-generation metrics (``evaluation.structures``) and ``composition-gen evaluate-structures``.

Hand-made structures plus at most 8 Perov-5 test structures from ``../shared``; fingerprints of the
perovskites are computed once per module where a test does not need fresh ones.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

import evaluation.structures as es
from evaluation.structures import (
    COV_CUTOFFS,
    composition_validity,
    compute_fingerprints,
    coverage,
    evaluate_structures,
    reference_fingerprints,
    scale_composition_fingerprints,
    structure_validity,
    write_structure_report,
)

N_PEROV = 8


# ------------------------------------------------------------------------------------------ structures
def fcc_two_site(a: float, species: list[str], second=(0.5, 0.5, 0.5)) -> Structure:
    """Primitive fcc cell with two sites (rock salt for (0.5, 0.5, 0.5), diamond / zinc blende for 0.25)."""
    lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lattice, species, [[0, 0, 0], list(second)])


def rock_salt() -> Structure:
    return fcc_two_site(5.64, ["Na", "Cl"])


def diamond() -> Structure:
    return fcc_two_site(3.567, ["C", "C"], (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def perov_csv(shared_dir) -> Path:
    path = shared_dir / "data" / "structures" / "perov_5" / "test.csv.gz"
    if not path.exists():
        pytest.skip(f"missing {path}")
    return path


@pytest.fixture(scope="module")
def perov_rows(perov_csv):
    import pandas as pd

    return pd.read_csv(perov_csv, nrows=N_PEROV)


@pytest.fixture(scope="module")
def perovs(perov_rows) -> list[Structure]:
    from structure.io import structure_from_cif

    return [structure_from_cif(c) for c in perov_rows["cif"]]


@pytest.fixture(scope="module")
def compscaler(shared_dir) -> Path:
    path = shared_dir / "data" / "cdvae_compscaler.json"
    if not path.exists():
        pytest.skip(f"missing {path}")
    return path


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory) -> Path:
    """A fingerprint cache shared by the module's tests: the perovskites are featurized once."""
    return tmp_path_factory.mktemp("fp_cache")


# --------------------------------------------------------------------------------------------- validity
def test_two_atoms_too_close_are_invalid_with_a_reason():
    s = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])  # 0.30 Å apart
    ok, reason = structure_validity(s)
    assert not ok
    assert "atoms 0 and 1" in reason and "0.30 Å" in reason


def test_close_atoms_across_the_cell_boundary_are_found():
    s = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0.01, 0, 0], [0.97, 0, 0]])  # 0.2 Å through the boundary
    assert not structure_validity(s)[0]
    assert structure_validity(s, cutoff=0.1)[0]


def test_tiny_volume_is_invalid():
    s = Structure(Lattice.cubic(0.4), ["C"], [[0, 0, 0]])  # 0.064 Å^3
    ok, reason = structure_validity(s)
    assert not ok and "volume" in reason


def test_rock_salt_is_valid_and_none_is_not():
    assert structure_validity(rock_salt()) == (True, "")
    assert structure_validity(None)[0] is False
    assert composition_validity(None)[0] is False


def test_composition_validity_follows_cdvae():
    assert composition_validity(rock_salt()) == (True, "")
    # a single element is valid in CDVAE (carbon has no charge-neutral combination of its own)
    assert composition_validity(diamond())[0]
    bad = Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    ok, reason = composition_validity(bad)
    assert not ok and "charge-neutral" in reason
    # oxidation-state decorations are ignored
    decorated = rock_salt()
    decorated.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    assert composition_validity(decorated) == (True, "")


# ------------------------------------------------------------------------------------------- coverage
def test_coverage_takes_separate_minima_and_counts_all_generated_in_precision():
    # 2 generated, 2 reference. Reference 0 has a structurally close generated sample (0) and a
    # compositionally close one (1): CDVAE's recall counts it, although no single sample is close in both.
    gen_s = np.array([[0.0], [5.0]])
    gen_c = np.array([[9.0], [0.0]])
    ref_s = np.array([[0.1], [5.0]])
    ref_c = np.array([[0.0], [0.0]])
    out = coverage(gen_s, gen_c, ref_s, ref_c, struct_cutoff=0.5, comp_cutoff=1.0)
    assert out["cov_recall"] == 1.0
    assert out["cov_recall_struct"] == 1.0 and out["cov_recall_comp"] == 1.0
    assert out["cov_precision"] == 0.5  # sample 0 is compositionally 9 away from every reference
    assert coverage(gen_s, gen_c, ref_s, ref_c, 0.5, 1.0, n_generated=4)["cov_precision"] == 0.25
    assert out["amsd_recall"] == pytest.approx(0.05)
    assert coverage(gen_s[:0], gen_c[:0], ref_s, ref_c, 0.5, 1.0, n_generated=3)["cov_recall"] == 0.0
    # a reference far from every sample in structure only: recall fails on the structure cut-off alone
    far = coverage(gen_s, gen_c, np.array([[2.5]]), np.array([[0.0]]), 0.5, 1.0)
    assert (far["cov_recall"], far["cov_recall_struct"], far["cov_recall_comp"]) == (0.0, 0.0, 1.0)


def test_composition_scaling_replaces_nan_by_zero():
    means, stds = np.array([1.0, 2.0]), np.array([2.0, 4.0])
    z = scale_composition_fingerprints(np.array([[3.0, np.nan]]), means, stds)
    assert z.tolist() == [[1.0, 0.0]]


def test_identical_sets_have_full_coverage_and_zero_distances(perovs, compscaler, ref_cache):
    m = evaluate_structures(perovs, perovs, dataset="perov5", compscaler=compscaler, cache_dir=ref_cache)
    assert m["cov_recall"] == 1.0 and m["cov_precision"] == 1.0
    assert m["struct_validity"] == 1.0 and m["comp_validity"] == 1.0 and m["validity"] == 1.0
    assert m["wdist_density"] == pytest.approx(0.0, abs=1e-12)
    assert m["wdist_num_elems"] == pytest.approx(0.0, abs=1e-12)
    assert m["cutoffs"] == {"struct": 0.2, "comp": 4.0}
    assert m["published"]["comp_validity"] == pytest.approx(0.9859)
    assert m["n_generated"] == N_PEROV and m["n_reference"] == N_PEROV


def test_coverage_drops_for_very_different_structures(perovs, compscaler, ref_cache):
    half = N_PEROV // 2
    mixed = perovs[:half] + [diamond()] * (N_PEROV - half)
    m = evaluate_structures(mixed, perovs, dataset="perov5", compscaler=compscaler, cache_dir=ref_cache)
    assert m["cov_precision"] == pytest.approx(half / N_PEROV)  # carbon is nowhere near a perovskite
    assert m["comp_validity"] == 1.0  # carbon alone is valid (single element)
    only_carbon = evaluate_structures([diamond(), diamond()], perovs, dataset="perov5", compscaler=compscaler,
                                      cache_dir=ref_cache)
    assert only_carbon["cov_recall"] == 0.0 and only_carbon["cov_precision"] == 0.0
    assert only_carbon["wdist_num_elems"] > 1.5  # 1 element vs 3 (or more) in every perovskite


def test_precision_denominator_counts_unreadable_and_invalid_samples(perovs, compscaler, ref_cache):
    crowded = perovs[0].copy()
    crowded.append(crowded[0].specie, crowded[0].coords + np.array([0.2, 0, 0]), coords_are_cartesian=True)
    samples = list(perovs) + [None, crowded]
    m = evaluate_structures(samples, perovs, dataset="perov5", compscaler=compscaler, cache_dir=ref_cache)
    n = N_PEROV + 2
    assert m["n_generated"] == n and m["n_unreadable"] == 1
    assert m["struct_validity"] == pytest.approx(N_PEROV / n)
    assert m["validity"] == pytest.approx(N_PEROV / n)
    assert m["cov_recall"] == 1.0
    # None has no fingerprint, yet stays in the denominator; the crowded perovskite (invalid) still has
    # fingerprints and takes part, as in CDVAE, so the precision is at most (N + 1) / (N + 2)
    assert N_PEROV / n <= m["cov_precision"] <= (N_PEROV + 1) / n
    assert any("unreadable" in k for k in m["invalid_reasons"])
    assert any("closer than the cut-off" in k for k in m["invalid_reasons"])
    assert {e["index"] for e in m["invalid_examples"]} == {N_PEROV, N_PEROV + 1}
    plain = evaluate_structures(list(perovs) + [None], perovs, dataset="perov5", compscaler=compscaler,
                                cache_dir=ref_cache)
    assert plain["cov_precision"] == pytest.approx(N_PEROV / (N_PEROV + 1))


def test_fingerprint_failure_is_marked_not_fatal(perovs, compscaler, ref_cache, monkeypatch):
    real = es.structure_fingerprint

    def flaky(s):
        if len(s) == 2:
            raise ValueError("no neighbours")
        return real(s)

    monkeypatch.setattr(es, "structure_fingerprint", flaky)
    fps = compute_fingerprints([rock_salt(), perovs[0], None])
    assert fps.ok.tolist() == [False, True, False]
    assert "no neighbours" in fps.error[0] and fps.error[2] == "unreadable structure"
    assert np.isnan(fps.struct[0]).all() and np.isfinite(fps.struct[1]).all()
    m = evaluate_structures(list(perovs) + [rock_salt()], perovs, dataset="perov5", compscaler=compscaler,
                            cache_dir=ref_cache)
    assert m["n_generated_fingerprint_failed"] == 1
    assert m["struct_validity"] == 1.0 and m["comp_validity"] == 1.0
    assert m["validity"] == pytest.approx(N_PEROV / (N_PEROV + 1))  # CDVAE: no fingerprint -> invalid


# ------------------------------------------------------------------------------------ wasserstein
def test_wasserstein_of_a_shifted_density_set(perovs):
    stretched = [s.copy() for s in perovs]
    for s in stretched:
        s.scale_lattice(s.volume * 1.2)
    same = evaluate_structures(perovs, perovs, dataset="perov5", coverage_metrics=False)
    assert same["wdist_density"] == 0.0 and same["cov_recall"] is None
    m = evaluate_structures(stretched, perovs, dataset="perov5", coverage_metrics=False)
    dens = np.array([s.density for s in perovs])
    # every density divided by 1.2 keeps the order: W1 = mean(d) * (1 - 1/1.2)
    assert m["wdist_density"] == pytest.approx(dens.mean() * (1 - 1 / 1.2), rel=1e-6)
    assert m["wdist_num_elems"] == 0.0


def test_only_valid_generated_samples_enter_the_wasserstein_distances(perovs):
    too_close = Structure(Lattice.cubic(1.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])  # dense, invalid
    m = evaluate_structures(list(perovs) + [too_close, None], perovs, dataset="perov5", coverage_metrics=False)
    assert m["wdist_density"] == 0.0
    assert m["validity"] == pytest.approx(N_PEROV / (N_PEROV + 2))


def test_unknown_dataset_and_missing_scaler_are_clear_errors(perovs):
    with pytest.raises(ValueError, match="unknown dataset"):
        evaluate_structures(perovs[:1], perovs[:1], dataset="qm9", coverage_metrics=False)
    with pytest.raises(FileNotFoundError, match="composition-scaler"):
        evaluate_structures(perovs[:1], perovs[:1], dataset="perov5", compscaler="/nonexistent/compscaler.json")
    with pytest.raises(FileNotFoundError):
        es.load_compscaler("/nonexistent/compscaler.json")
    m = evaluate_structures(perovs[:1], perovs[:1], dataset=None, cutoffs=(0.3, 5), coverage_metrics=False)
    assert m["cutoffs"] == {"struct": 0.3, "comp": 5.0} and m["published"] is None


# ----------------------------------------------------------------------------------------- cache
def test_reference_fingerprints_are_cached_and_reused(perovs, tmp_path, monkeypatch):
    refs = perovs[:3]
    fps, info = reference_fingerprints(refs, cache_dir=tmp_path)
    assert not info["cache_hit"] and Path(info["cache_file"]).is_file()
    assert fps.ok.all() and fps.struct.shape == (3, es.STRUCT_FP_SIZE) and fps.comp.shape == (3, es.COMP_FP_SIZE)

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(es, "structure_fingerprint", boom)
    monkeypatch.setattr(es, "compute_fingerprints", boom)
    again, info2 = reference_fingerprints([s.copy() for s in refs], cache_dir=tmp_path)
    assert info2["cache_hit"] and info2["cache_file"] == info["cache_file"]
    np.testing.assert_array_equal(again.struct, fps.struct)
    np.testing.assert_array_equal(again.comp, fps.comp)
    # a different structure set has a different key, so it is not served from the cache
    moved = [s.copy() for s in refs]
    moved[0].translate_sites([0], [0.01, 0, 0])
    with pytest.raises(AssertionError, match="recomputed"):
        reference_fingerprints(moved, cache_dir=tmp_path)
    # a corrupt cache file is recomputed, not trusted
    Path(info["cache_file"]).write_bytes(b"not an npz")
    with pytest.raises(AssertionError, match="recomputed"):
        reference_fingerprints(refs, cache_dir=tmp_path)


def test_worker_processes_give_the_same_fingerprints(perovs):
    one = compute_fingerprints(perovs[:4] + [None], workers=1)
    two = compute_fingerprints(perovs[:4] + [None], workers=2, chunk_size=2)
    np.testing.assert_allclose(two.struct[:4], one.struct[:4])
    np.testing.assert_array_equal(two.ok, one.ok)
    assert two.ok.tolist() == [True] * 4 + [False]


# ------------------------------------------------------------------------------------------ report
def test_report_has_the_published_row_and_plots(perovs, tmp_path):
    m = evaluate_structures(perovs, perovs, dataset="perov5", coverage_metrics=False)
    files = write_structure_report(m, tmp_path, title="T", sources={"generated": "x"})
    assert files == ["metrics.json", "report.md", "density.png", "num_elements.png"]
    md = (tmp_path / "report.md").read_text()
    assert "98.59" in md and "CDVAE (paper)" in md and "# T" in md
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["sources"] == {"generated": "x"} and data["cov_recall"] is None
    for png in files[2:]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


# --------------------------------------------------------------------------------------------- CLI
def _write_csv(path: Path, cifs: list[str]) -> Path:
    import pandas as pd

    pd.DataFrame({"material_id": [f"m{i}" for i in range(len(cifs))], "cif": cifs}).to_csv(path, index=False)
    return path


def test_cli_end_to_end(perov_rows, compscaler, tmp_path, capsys):
    from composition_lm.cli import main

    cifs = list(perov_rows["cif"][:5])
    test = _write_csv(tmp_path / "perov_test.csv", cifs)
    generated = _write_csv(tmp_path / "gen.csv", cifs[:4] + ["data_broken\n_cell_length_a 1\n"])
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    rc = main(["evaluate-structures", str(generated), "--test", str(test), "--compscaler", str(compscaler),
               "--cache", str(cache), "--no-progress", "-o", str(out)])
    assert rc == 0
    for name in ("metrics.json", "report.md", "density.png", "num_elements.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "perov5"  # guessed from the test file's name
    assert m["n_generated"] == 5 and m["n_unreadable"] == 1 and m["n_reference"] == 5
    assert m["cov_precision"] == pytest.approx(0.8) and m["struct_validity"] == pytest.approx(0.8)
    assert m["cov_recall"] >= 0.8
    assert list(cache.glob("fingerprints-*.npz"))
    assert "COV-P 80.00%" in capsys.readouterr().out
    # --limit-test and a second run: the reference fingerprints come from the cache
    rc = main(["evaluate-structures", str(generated), "--test", str(test), "--compscaler", str(compscaler),
               "--cache", str(cache), "--no-progress", "--limit-test", "5", "--dataset", "mp20", "-o", str(out)])
    m2 = json.loads((out / "metrics.json").read_text())
    assert rc == 0 and m2["timing"]["reference_fingerprints_cached"] is True
    assert m2["cutoffs"] == {"struct": 0.4, "comp": 10.0} and m2["cov_recall"] == m["cov_recall"]


def test_cli_reads_one_source_of_a_generator_output_folder(perovs, tmp_path):
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    from composition_lm.cli import main
    from structure.io import read_generated_structures

    folder = tmp_path / "gen"
    folder.mkdir()
    three = perovs[:3]
    buf = io.StringIO()
    ase_write(buf, [AseAtomsAdaptor.get_atoms(s) for s in three], format="extxyz")
    (folder / "structures.extxyz").write_text(buf.getvalue())
    with zipfile.ZipFile(folder / "structures_cif.zip", "w") as zf:
        for i, s in enumerate(three):
            zf.writestr(f"{i:05d}.cif", str(CifWriter(s)))
        zf.writestr("00009_bad.cif", "garbage")
    structs, source = read_generated_structures(folder)
    assert len(structs) == 3 and source.endswith("structures.extxyz")
    assert all(s.composition == t.composition for s, t in zip(structs, three))
    (folder / "structures.extxyz").unlink()
    structs, source = read_generated_structures(folder)
    assert source.endswith("structures_cif.zip") and len(structs) == 4 and structs[-1] is None
    # gzip CSV reference, validity-only run
    test = _write_csv(tmp_path / "ref.csv", [str(CifWriter(s)) for s in three])
    with open(test, "rb") as src, gzip.open(tmp_path / "ref.csv.gz", "wb") as dst:
        dst.write(src.read())
    test = tmp_path / "ref.csv.gz"
    out = tmp_path / "out"
    assert main(["evaluate-structures", str(folder), "--test", str(test), "--no-coverage", "--dataset", "perov5",
                 "--no-plots", "--no-progress", "-o", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_generated"] == 4 and m["validity"] == pytest.approx(0.75) and m["cov_recall"] is None
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md"]


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    from composition_lm.cli import main

    monkeypatch.chdir(tmp_path)  # no ../shared from here: the shipped constants serve
    ref = _write_csv(tmp_path / "ref.csv", [str(rock_salt().to(fmt="cif"))])
    assert main(["evaluate-structures", str(tmp_path / "missing"), "--test", str(ref), "--no-coverage",
                 "-o", str(tmp_path / "o")]) == 2
    assert "no generated structures at" in capsys.readouterr().err
    assert main(["evaluate-structures", str(ref), "--test", str(tmp_path / "nope.csv"), "--no-coverage",
                 "-o", str(tmp_path / "o")]) == 2
    assert "--test" in capsys.readouterr().err
    assert main(["evaluate-structures", str(ref), "--test", str(ref), "--compscaler", str(tmp_path / "none.json"),
                 "-o", str(tmp_path / "o")]) == 2
    assert "--compscaler" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["evaluate-structures", str(ref), "--test", str(ref), "--no-plots", "-o", str(tmp_path / "o")]) == 0
    assert "COV-R 100.00%" in capsys.readouterr().out  # the default scaler works from any folder


def test_cutoff_presets_match_cdvae():
    assert COV_CUTOFFS == {"mp20": (0.4, 10), "perov5": (0.2, 4), "carbon24": (0.2, 4)}
