"""The Python API a notebook imports: each object works without the CLI, gives what the matching command
writes, and the README's Python section runs as written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from composition_lm.cli import main

REPO = Path(__file__).resolve().parents[1]
POTENTIAL = REPO.parent / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


# ----------------------------------------------------------------------------------- FormulaGenerator
@pytest.fixture(scope="module")
def bert():
    from composition_lm import FormulaGenerator

    return FormulaGenerator.from_pretrained("diffusion-bert")


def test_generate_is_the_table_sample_writes(bert, tmp_path):
    from composition_lm.generator import FORMULA_COLUMNS, write_formulas

    table = bert.generate(40, seed=3, steps=8)
    assert list(table.columns) == FORMULA_COLUMNS and len(table) == 40
    assert table["parse_ok"].dtype == bool and str(table["n_elements"].dtype) == "Int64"
    assert main(["sample", "-n", "40", "--seed", "3", "--steps", "8", "--no-progress", "-o", str(tmp_path)]) == 0
    write_formulas(table, tmp_path / "api.csv")
    assert (tmp_path / "api.csv").read_bytes() == (tmp_path / "formulas.csv").read_bytes()
    summary = json.loads((tmp_path / "run_config.json").read_text())["summary"]
    mine = bert.summary(table)
    assert {k: summary[k] for k in mine} == mine
    assert table.attrs["sampling"]["steps"] == 8 and table.attrs["sampling"]["seed"] == 3


def test_generate_enforces_constraints_and_repeats_with_the_seed(bert):
    a = bert.generate(30, seed=1, steps=8, elements="Li,Fe,P,O,Mn", require=["Li"], max_elements=3)
    b = bert.generate(30, seed=1, steps=8, elements=["Li", "Fe", "P", "O", "Mn"], require="Li", max_elements=3)
    pd.testing.assert_frame_equal(a, b)
    parsed = a[a["parse_ok"]]
    assert len(parsed) > 0
    for f, n in zip(parsed["formula"], parsed["n_elements"]):
        assert "Li" in re.findall(r"[A-Z][a-z]?", f) and n <= 3
        assert set(re.findall(r"[A-Z][a-z]?", f)) <= {"Li", "Fe", "P", "O", "Mn"}
    assert not bert.generate(30, seed=2, steps=8)["sample"].equals(a["sample"])


def test_generator_save_and_reload_samples_the_same(bert, tmp_path):
    from composition_lm import FormulaGenerator

    folder = bert.save_pretrained(tmp_path / "copy")
    again = FormulaGenerator.from_pretrained(folder)
    assert again.model_type == "diffusion-bert" and again.training_formulas() == bert.training_formulas()
    pd.testing.assert_frame_equal(again.generate(16, seed=0, steps=6), bert.generate(16, seed=0, steps=6))
    with pytest.raises(ValueError, match="loaded from"):
        again.save_pretrained(folder)


def test_generator_refuses_bad_requests(bert):
    with pytest.raises(ValueError, match="at least 1"):
        bert.generate(0)
    with pytest.raises(ValueError, match="unknown element"):
        bert.generate(2, elements="Li,Qq")
    with pytest.raises(ValueError, match="Diffusion-LM"):
        bert.generate(2, noise_scale=0.5)
    from composition_lm import FormulaGenerator

    with pytest.raises(ValueError, match="no model"):
        FormulaGenerator.from_pretrained("no-such-model")


def test_diffusion_lm_through_the_same_object():
    from composition_lm import FormulaGenerator

    lm = FormulaGenerator.from_pretrained("diffusion-lm")
    table = lm.generate(12, seed=0, steps=10, exclude="O")
    assert lm.model_type == "diffusion-lm" and len(table) == 12
    assert not any("O" in re.findall(r"[A-Z][a-z]?", f) for f in table["formula"])
    assert table.attrs["sampling"]["method"] == lm.config.sampling_method


# ----------------------------------------------------------------------------------- evaluation
def test_validate_says_why_and_matches_the_command(tmp_path):
    from evaluation import validate

    table = validate(["NaCl", "NaCl2", "Xx2", ""], protocol="both")
    assert table["valid_cdvae"].tolist() == [True, False, False, False]
    assert table.loc[1, "reason_cdvae"] and table.loc[2, "reason_smact"].startswith("unparseable")
    assert table.loc[3, "parse_error"] == "empty"
    src = tmp_path / "f.txt"
    src.write_text("NaCl\nNaCl2\nXx2\n")
    assert main(["validate", str(src), "-o", str(tmp_path / "v.csv")]) == 0
    written = _csv(tmp_path / "v.csv")
    mine = validate(["NaCl", "NaCl2", "Xx2"]).astype(str)
    assert written.drop(columns="where").equals(mine)


def test_evaluate_structures_uses_the_shipped_scaler_by_default(shared_dir):
    from evaluation import evaluate_structures
    from evaluation.structures import DEFAULT_COMPSCALER
    from structure.cdvae import CDVAE
    from structure.io import read_structures

    shipped = json.loads(DEFAULT_COMPSCALER.read_text())
    original = json.loads((shared_dir / "data" / "cdvae_compscaler.json").read_text())
    assert shipped["CompScalerMeans"] == original["CompScalerMeans"] and "MIT" in shipped["attribution"]
    crystals = CDVAE.from_pretrained("cdvae-perov5").sample(4, seed=0, levels=10, steps=2)
    test = [r.structure for r, _ in zip(read_structures(shared_dir / "data/structures/perov_5/test.csv.gz"), range(8))]
    default = evaluate_structures(crystals, test, dataset="perov5")
    explicit = evaluate_structures(crystals, test, dataset="perov5",
                                   compscaler=shared_dir / "data" / "cdvae_compscaler.json")
    assert default["cov_recall"] == explicit["cov_recall"] and default["cov_precision"] == explicit["cov_precision"]


def test_evaluate_structures_runs_from_another_folder(shared_dir, tmp_path, monkeypatch):
    """The default scaler no longer depends on the working directory (it was ../shared relative to it)."""
    assert main(["cdvae", "sample", "-n", "3", "--levels", "5", "--steps", "1", "--no-progress",
                 "-o", str(tmp_path / "s")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate-structures", str(tmp_path / "s"), "--test",
                 str(shared_dir / "data/structures/perov_5/test.csv.gz"), "--limit-test", "5", "--no-plots",
                 "--no-progress", "-o", "ev"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["cov_recall"] is not None


# ----------------------------------------------------------------------------------- structures
def test_structure_predictor_gives_what_the_command_writes(tmp_path):
    from structure import StructurePredictor
    from structure.io import write_outputs

    formulas = ["NaCl", "SrTiO3", "NaCl2", "Xx"]
    rows = StructurePredictor().predict(formulas, top_k=2)
    assert [(r.formula, r.rank) for r in rows[:4]] == [("NaCl", 1), ("NaCl", 2), ("SrTiO3", 1), ("SrTiO3", 2)]
    assert rows[0].structure.composition.reduced_formula == "NaCl" and rows[0].template_id
    assert [r.status for r in rows[4:]] == ["skipped", "unparseable"]
    (tmp_path / "f.txt").write_text("\n".join(formulas) + "\n")
    assert main(["structure", str(tmp_path / "f.txt"), "--top-k", "2", "--no-progress", "-o", str(tmp_path / "cli")]) == 0
    write_outputs(rows, tmp_path / "api")
    for name in ("structures.csv", "structures.extxyz"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    with pytest.raises(ValueError, match="top_k"):
        StructurePredictor().predict(["NaCl"], top_k=0)
    with pytest.raises(ValueError, match="ranking"):
        StructurePredictor(ranking="best")


@pytest.mark.skipif(not POTENTIAL.is_dir(), reason="needs the M3GNet weights in ../shared")
def test_relaxer_relaxes_and_gives_formation_energies(tmp_path):
    from structure import Relaxer, StructurePredictor
    from structure.relax import RelaxSettings

    relaxer = Relaxer(POTENTIAL, settings=RelaxSettings(max_steps=300), cache_dir=tmp_path)
    rows = StructurePredictor().predict(["NaCl"], top_k=1)
    results = relaxer.relax([rows[0].structure])
    assert results[0].status in ("converged", "not_converged") and results[0].energy_per_atom < 0
    relaxer.relax_rows(rows)
    assert rows[0].energy_per_atom == pytest.approx(results[0].energy_per_atom, abs=1e-5)
    assert rows[0].formation_energy_per_atom < 0  # rock-salt NaCl is far below Na + Cl2
    assert (tmp_path / "elemental_references.json").is_file()  # AFLOW references cached in cache_dir
    with pytest.raises(FileNotFoundError):
        Relaxer(tmp_path / "no-potential")
    with pytest.raises(ValueError, match="max_steps"):
        Relaxer(POTENTIAL, settings=RelaxSettings(max_steps=0))


def test_cdvae_from_a_shipped_name_samples_structures(tmp_path):
    from pymatgen.core import Structure

    from structure.cdvae import CDVAE

    model = CDVAE.from_pretrained("cdvae-perov5")
    a, b = model.sample(3, seed=5, levels=5, steps=1), model.sample(3, seed=5, levels=5, steps=1)
    assert len(a) == 3 and all(isinstance(s, Structure) for s in a)
    assert all(x == y for x, y in zip(a, b))
    assert main(["cdvae", "sample", "-n", "3", "--seed", "5", "--levels", "5", "--steps", "1", "--no-progress",
                 "-o", str(tmp_path)]) == 0
    assert _csv(tmp_path / "structures.csv")["formula"].tolist() == [s.composition.reduced_formula for s in a]
    with pytest.raises(ValueError, match="at least 1"):
        model.sample(0)
    with pytest.raises(FileNotFoundError, match="shipped models"):
        CDVAE.from_pretrained("cdvae-nope")


# ----------------------------------------------------------------------------------- the README
def test_readme_python_section_runs_verbatim(shared_dir, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        exec(compile(blocks[0], "README.md#python", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "validity_cdvae" in out and "converged" in out
    assert "'sampled': 3" in out  # one-call discovery ran its funnel


# ----------------------------------------------------------------------------------- CLI checks
@pytest.mark.parametrize("argv", [
    ["sample", "-n", "0"], ["sample", "-n", "-5"], ["sample", "--steps", "0"], ["sample", "--top-p", "1.5"],
    ["sample", "--temperature", "0"], ["sample", "--batch-size", "0"], ["sample", "--max-elements", "0"],
    ["cdvae", "sample", "-n", "0"], ["cdvae", "sample", "--levels", "0"], ["compare", "--dataset", ".", "-n", "0",
                                                                         "-o", "x"],
    ["structure", "f.txt", "--top-k", "0"], ["structure", "f.txt", "--fmax", "-1"],
    ["train", "--corpus", "c.txt", "--output-dir", "o", "--lr", "0"],
    ["train", "--corpus", "c.txt", "--output-dir", "o", "--max-steps", "0"],
    ["cdvae", "train", "--data", ".", "-o", "o", "--batch-size", "0"],
    ["evaluate-structures", "g", "--test", "t", "-o", "o", "--workers", "0"],
    ["validate", "f.txt", "--workers", "0"],
])
def test_numbers_out_of_range_are_a_clear_error_before_any_work(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument ") and "must be" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def _parser_defaults(argv_prefix: list[str]) -> dict:
    from composition_lm.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv_prefix[0]]
    if len(argv_prefix) > 1:
        sub = sub._subparsers._group_actions[0].choices[argv_prefix[1]]
    return {a.dest: a.default for a in sub._actions if a.dest != "help"}


@pytest.mark.parametrize("command,cls_path", [
    (["train"], "composition_lm.training:TrainingArguments"),
    (["cdvae", "train"], "structure.cdvae.train:CDVAETrainingArguments"),
])
def test_training_options_are_the_argument_dataclass_fields(command, cls_path):
    """Each training option maps onto a field of the arguments dataclass by name, with the same default."""
    import dataclasses
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    cli_only = {"no_progress", "output", "cache", "corpus", "output_dir", "data"}
    for dest, default in _parser_defaults(command).items():
        if dest in cli_only:
            continue
        assert dest in fields, f"--{dest} is no field of {name}"
        if default is not None and fields[dest] is not dataclasses.MISSING:
            assert default == fields[dest], (dest, default, fields[dest])
