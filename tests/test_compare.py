"""`composition-gen compare`: the comparison's numbers are those of the separate commands, and its pieces
(structure novelty, energies, report) behave on hand-made inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from evaluation.compare import (comparison_html, density_histograms, energy_summary, structure_novelty, summary_rows,
                                write_comparison)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rocksalt(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    return Structure(Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])


# --------------------------------------------------------------------------------- structure novelty
def test_structure_novelty_matches_same_type_and_tells_new_types_apart():
    training = [rocksalt(5.64)]
    generated = [rocksalt(5.70),  # the training structure, slightly strained: not novel
                 rocksalt(5.66),  # a duplicate of the first: not unique
                 cscl(3.4),  # NaCl in a new structure type: novel
                 rocksalt(5.0, "K", "Br")]  # a composition training never had: novel
    r = structure_novelty(generated, training)
    assert r["n"] == 4 and r["n_unique"] == 3 and r["uniqueness"] == pytest.approx(0.75)
    assert r["n_novel_unique"] == 2 and r["novelty"] == pytest.approx(2 / 3)


def test_structure_novelty_of_nothing():
    r = structure_novelty([], [rocksalt(5.64)])
    assert r["n"] == 0 and r["uniqueness"] is None and r["novelty"] is None


# ---------------------------------------------------------------------------------------- energies
def test_energy_summary_skips_missing_values_and_counts_negative_formation():
    r = energy_summary([-3.0, None, -5.0, float("nan")], [-0.5, None, 0.25, -0.1], n_structures=4)
    assert r["n_with_energy"] == 2 and r["n_with_formation_energy"] == 3
    assert r["energy_per_atom"]["mean"] == pytest.approx(-4.0)
    assert r["frac_negative_formation"] == pytest.approx(2 / 3)
    assert energy_summary([], [], 0)["frac_negative_formation"] is None


def test_sun_summary_counts_stable_unique_novel():
    from evaluation.compare import sun_summary

    e_hull = [-0.1, 0.05, 0.2, float("nan"), 0.0]
    flags = [(True, True), (True, True), (True, True), (True, True), (True, False)]
    r = sun_summary(e_hull, flags, n_samples=10, seconds=3600)
    assert r["n_with_e_hull"] == 4
    assert r["0"]["n_stable"] == 2 and r["0"]["n_sun"] == 1  # the E_hull 0 one is not novel
    assert r["0.1"]["n_sun"] == 2 and r["0.1"]["sun_rate"] == 0.2 and r["0.1"]["sun_per_hour"] == 2
    assert "by_n_elements" not in r
    by = sun_summary(e_hull, flags, n_samples=10, seconds=3600, n_elements=[2, 3, 3, 2, 2])["by_n_elements"]
    assert list(by) == ["2", "3"]
    assert by["2"]["n_structures"] == 3 and by["2"]["n_with_e_hull"] == 2 and by["2"]["0.1"] == {"n_stable": 2,
                                                                                                  "n_sun": 1}
    assert by["3"]["0.1"] == {"n_stable": 1, "n_sun": 1} and by["3"]["0"] == {"n_stable": 0, "n_sun": 0}
    names, rows = summary_rows({"generators": {"g": {"sun": {"by_n_elements": by}}}})
    assert ("SUN at E_hull <= 0.1 / structures, 3 elements", ["1 / 2"]) in rows


def test_density_histograms_share_edges_and_sum_to_one():
    h = density_histograms({"test": [1.0, 2.0, 3.0], "a": [2.5, 2.5], "empty": []}, bins=10)
    assert len(h["bin_edges"]) == 11
    assert sum(h["test"]) == pytest.approx(1.0, abs=1e-5) and sum(h["a"]) == pytest.approx(1.0) and sum(h["empty"]) == 0


# ------------------------------------------------------------------------------------------ report
def _result(with_energy: bool) -> dict:
    gen = {
        "kind": "CDVAE", "model": "m", "given": "something <b>plain</b>",
        "counts": {"samples": 10, "structures": 8},
        "formula_metrics": {"validity": {"cdvae": {"raw": 0.5}}, "uniqueness": 1.0},
        "structure_metrics": {"struct_validity": 0.875, "n_valid": 7},
        "timing": {"generate_s": 7.0, "per_valid_structure_s": 1.0},
    }
    if with_energy:
        gen["energy"] = energy_summary([-1.0, -2.0], [-0.1, 0.2], 2)
    return {"title": "t", "description": "d", "command": "composition-gen compare", "generators": {"g": gen}}


def test_summary_leaves_out_rows_no_generator_has():
    _, rows = summary_rows(_result(with_energy=False))
    labels = [label for label, _ in rows]
    assert "structure validity" in labels and not any("energy" in label for label in labels)
    values = dict(rows)
    assert values["structure validity"] == ["87.50 %"] and values["structures produced"] == ["8"]
    _, rows = summary_rows(_result(with_energy=True))
    assert dict(rows)["fraction with formation energy < 0"] == ["50.00 %"]


def test_report_files_and_self_contained_html(tmp_path):
    files = write_comparison(_result(with_energy=True), tmp_path)
    assert {"metrics.json", "report.md", "report.html", "energy.png", "formation_energy.png"} <= set(files)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # the two energy plots, embedded
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere
    assert "&lt;b&gt;plain&lt;/b&gt;" in page  # text is escaped
    assert json.loads((tmp_path / "metrics.json").read_text())["generators"]["g"]["counts"]["structures"] == 8
    assert "| structure validity | 87.50 % |" in (tmp_path / "report.md").read_text()
    assert "data:image" not in comparison_html(_result(False), {})


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_dir):
    """A tiny MP-20 subset, a 3-step CDVAE, the shipped Diffusion-BERT, and one `compare` run."""
    import pandas as pd

    from composition_lm.cli import main

    root = tmp_path_factory.mktemp("compare")
    data = root / "data"
    data.mkdir()
    mp20 = shared_dir / "data" / "structures" / "mp_20"
    pd.read_csv(mp20 / "train.csv.gz", nrows=60).to_csv(data / "train.csv", index=False)
    pd.read_csv(mp20 / "test.csv.gz", nrows=30).to_csv(data / "test.csv", index=False)
    assert main(["cdvae", "train", "--data", str(data), "--val-split", "none", "--hidden", "16", "--latent", "8",
                 "--encoder-layers", "1", "--decoder-layers", "1", "--cutoff", "5", "--batch-size", "8", "--max-steps",
                 "3", "--warmup-steps", "1", "--eval-every", "3", "--save-every", "3", "--no-progress",
                 "-o", str(root / "run")]) == 0
    out = root / "out"
    argv = ["compare", "--dataset", str(data), "--lm", "diffusion-bert", "--cdvae", str(root / "run" / "model"),
            "-n", "12", "--seed", "1", "--cache", str(root / "fp"), "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    return data, out, json.loads((out / "metrics.json").read_text())


def test_compare_writes_the_report_and_every_generators_outputs(tiny_run):
    _, out, metrics = tiny_run
    assert list(metrics["generators"]) == ["lm-diffusion-bert", "cdvae-run"]
    for name in metrics["generators"]:
        for f in ("structures.csv", "structures_cif.zip", "structures.extxyz"):
            assert (out / name / f).is_file()
    assert (out / "lm-diffusion-bert" / "formulas.csv").is_file()
    for f in ("report.md", "report.html", "element_frequency.png", "density.png"):
        assert (out / f).is_file()
    lm, cdvae = metrics["generators"]["lm-diffusion-bert"], metrics["generators"]["cdvae-run"]
    assert lm["counts"]["samples"] == cdvae["counts"]["samples"] == 12  # the same budget
    assert cdvae["counts"]["structures"] == 12 and lm["counts"]["structures"] <= 12
    # the LM path drops invalid formulas, so every structure it made has a valid composition
    assert lm["structure_metrics"]["comp_validity"] == 1.0
    assert "template structure" in lm["given"] and "prior" in cdvae["given"]
    assert cdvae["timing"]["per_valid_structure_s"] > 0


@pytest.mark.parametrize("name,column", [("lm-diffusion-bert", "formulas.csv"), ("cdvae-run", "structures.csv")])
def test_compare_numbers_equal_the_separate_evaluate_commands(tiny_run, tmp_path, name, column):
    from composition_lm.cli import main

    data, out, metrics = tiny_run
    gen = metrics["generators"][name]
    argv = ["evaluate", str(out / name / column), "--train", str(data / "train.csv"), "--reference",
            str(data / "test.csv"), "--no-plots", "-o", str(tmp_path / "f")]
    assert main(argv + (["--column", "formula"] if column == "structures.csv" else [])) == 0
    formula = json.loads((tmp_path / "f" / "metrics.json").read_text())
    for path in (("validity", "cdvae", "raw"), ("validity", "smact", "raw"), ("uniqueness",), ("novelty",),
                 ("distribution", "element_js"), ("distribution", "n_elements_wasserstein")):
        a, b = gen["formula_metrics"], formula
        for key in path:
            a, b = a[key], b[key]
        assert a == pytest.approx(b), path
    assert main(["evaluate-structures", str(out / name), "--test", str(data / "test.csv"), "--dataset", "mp20",
                 "--cache", str(tmp_path / "fp"), "--no-plots", "--no-progress", "-o", str(tmp_path / "s")]) == 0
    structural = json.loads((tmp_path / "s" / "metrics.json").read_text())
    for key in ("n_generated", "n_valid", "struct_validity", "comp_validity", "cov_recall", "cov_precision",
                "wdist_density", "wdist_num_elems"):
        assert gen["structure_metrics"][key] == pytest.approx(structural[key]), key


def test_compare_same_seed_same_samples(tiny_run, tmp_path):
    from composition_lm.cli import main

    data, out, _ = tiny_run
    again = tmp_path / "again"
    assert main(["compare", "--dataset", str(data), "--cdvae", str(out.parent / "run" / "model"), "-n", "12",
                 "--seed", "1", "--templates", str(out / "templates"), "--no-plots", "--no-progress",
                 "--cache", str(out.parent / "fp"), "-o", str(again)]) == 0
    assert (again / "cdvae-run" / "structures.extxyz").read_text() == (out / "cdvae-run" / "structures.extxyz").read_text()
    assert not (again / "templates").exists()  # the given store was used


def test_compare_bad_input_is_a_clear_error(tmp_path, capsys):
    from composition_lm.cli import main

    assert main(["compare", "--dataset", str(tmp_path), "--cdvae", "cdvae-perov5", "-o", str(tmp_path / "o")]) == 2
    assert "no train.csv(.gz)" in capsys.readouterr().err
    assert main(["compare", "--dataset", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "at least one generator" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_density_histogram_of_the_run_covers_each_generator(tiny_run):
    _, _, metrics = tiny_run
    dens = metrics["density_histograms"]
    assert {"bin_edges", "test", "cdvae-run"} <= set(dens)
    assert sum(dens["test"]) == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(dens["bin_edges"]) > 0)


def test_compare_with_relaxation_reports_energies_from_the_structures_csv(tiny_run, tmp_path):
    import pandas as pd

    from composition_lm.cli import main

    potential = Path(__file__).resolve().parents[2] / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
    if not potential.is_dir():
        pytest.skip("needs the M3GNet weights in ../shared")
    data, out, _ = tiny_run
    dest = tmp_path / "relaxed"
    assert main(["compare", "--dataset", str(data), "--cdvae", str(out.parent / "run" / "model"), "-n", "2",
                 "--seed", "3", "--templates", str(out / "templates"), "--relax", "--potential", str(potential),
                 "--max-steps", "20", "--optimizer", "lbfgs", "--no-coverage", "--no-plots", "--no-progress",
                 "-o", str(dest)]) == 0
    metrics = json.loads((dest / "metrics.json").read_text())["generators"]["cdvae-run"]
    assert metrics["structure_metrics"]["cov_recall"] is None  # --no-coverage: no fingerprints at all
    assert metrics["structure_metrics"]["validity_includes_fingerprints"] is False
    assert not (dest.parent / ".fingerprint_cache").exists()
    energy = metrics["energy"]
    table = pd.read_csv(dest / "cdvae-run" / "structures.csv")
    assert set(table["status"]) <= {"converged", "not_converged", "failed"}
    assert energy["n_with_energy"] == table["energy_per_atom"].notna().sum() > 0
    assert energy["energy_per_atom"]["mean"] == pytest.approx(table["energy_per_atom"].mean(), abs=1e-4)
    # the 60 training structures hold no element alone: the AFLOW prototypes give the references
    assert (dest / "references" / "store.json").is_file()
    sun = json.loads((dest / "metrics.json").read_text())["generators"]["cdvae-run"]["sun"]
    assert sun["n_samples"] == 2 and 0 <= sun["0.1"]["n_sun"] <= sun["0.1"]["n_stable"] <= sun["n_with_e_hull"] <= 2
    assert sun["0"]["n_sun"] <= sun["0.1"]["n_sun"] and sun["0.1"]["sun_rate"] == sun["0.1"]["n_sun"] / 2
