"""The Diffusion-BERT model shipped inside the package: loads with no arguments and writes chemistry."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from composition_lm.cli import main
from composition_lm.models import PRETRAINED_DIR, SHIPPED, load_model
from composition_lm.sampling import generate
from evaluation.validity import check_formulas

SHIPPED_DIR = PRETRAINED_DIR / SHIPPED["diffusion-bert"]


def _load_shipped(folder, *name):
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"the shipped model is missing from {folder}")
    torch.set_num_threads(1)
    return load_model(*name)


def _check_shipped_folder(loaded, folder, model_type: str) -> None:
    """Loaded from the package folder, at most 20 MB, with a model card and its training formulas."""
    assert loaded.path.resolve() == folder.resolve()
    assert loaded.model_type == model_type
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    assert size_mb <= 20, f"shipped model is {size_mb:.1f} MB"
    card = (folder / "README.md").read_text()
    assert "mp_formulas.csv" in card and "Training command" in card
    assert len(loaded.training_formulas()) > 50_000


@pytest.fixture(scope="module")
def shipped():
    return _load_shipped(SHIPPED_DIR)  # no argument: the shipped default


def test_default_is_the_shipped_model(shipped):
    _check_shipped_folder(shipped, SHIPPED_DIR, "diffusion-bert")


def test_shipped_model_writes_valid_formulas(shipped):
    samples = generate(shipped, 300, steps=16, seed=0, progress=False, validity="none")
    formulas = [f for _, f, _ in samples if f is not None]
    assert len(formulas) == 300  # every sample parses
    valid = sum(r.valid for r in check_formulas(formulas, "cdvae")) / 300
    assert valid >= 0.7, valid  # a barely trained model scores far lower (0.30 after 30 steps on expt_gap)
    assert len(set(formulas)) >= 280


def test_sample_cli_without_model(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "-n", "40", "--seed", "3", "--steps", "8", "-o", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "formulas.csv")))
    assert len(rows) == 40
    assert {r["is_novel"] for r in rows if r["parse_ok"] == "True"} <= {"True", "False"}
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model_type"] == "diffusion-bert" and cfg["summary"]["n_samples"] == 40


# ------------------------------------------------------------------------------ shipped Diffusion-LM
LM_DIR = PRETRAINED_DIR / SHIPPED["diffusion-lm"]


@pytest.fixture(scope="module")
def shipped_lm():
    return _load_shipped(LM_DIR, "diffusion-lm")


def test_shipped_diffusion_lm_loads_by_name(shipped_lm):
    _check_shipped_folder(shipped_lm, LM_DIR, "diffusion-lm")
    cfg = shipped_lm.config
    assert cfg.embedding_dim == 16 and cfg.schedule == "sqrt" and cfg.diffusion_steps == 2000
    assert 1 <= cfg.sampling_steps <= cfg.diffusion_steps


def test_shipped_diffusion_lm_writes_valid_formulas(shipped_lm):
    samples = generate(shipped_lm, 200, steps=20, seed=0, progress=False, validity="none")
    formulas = [f for _, f, _ in samples if f is not None]
    assert len(formulas) == 200
    valid = sum(r.valid for r in check_formulas(formulas, "cdvae")) / 200
    assert valid >= 0.6, valid
    # an untrained Diffusion-LM rounds nearly everything to one element: "valid", but never unique
    assert len(set(formulas)) >= 180
    assert sum(f.n_elements >= 2 for f in formulas) >= 150


def test_sample_cli_diffusion_lm_by_name(tmp_path):
    out = tmp_path / "lm"
    assert main(["sample", "--model", "diffusion-lm", "-n", "20", "--seed", "1", "--steps", "10", "--require", "O",
                 "-o", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "formulas.csv")))
    assert len(rows) == 20 and all("O" in r["sample"].split() for r in rows)
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model_type"] == "diffusion-lm" and cfg["steps"] == 10


# ------------------------------------------------------------------------------ the closed loop's model
STABLE_DIR = PRETRAINED_DIR / SHIPPED["diffusion-bert-stable"]


def test_the_loop_model_ships_with_a_card_naming_its_oracle_rounds_and_labels(tmp_path):
    stable = _load_shipped(STABLE_DIR, "diffusion-bert-stable")
    assert stable.path.resolve() == STABLE_DIR.resolve() and stable.model_type == "diffusion-bert"
    assert sum(f.stat().st_size for f in STABLE_DIR.iterdir()) / 1e6 <= 20
    card = (STABLE_DIR / "README.md").read_text()
    for words in ("## The oracle", "chgnet", "sevennet-l3i5", "## The labels", "| 0 | diffusion-bert |",
                  "| 2 | round-1/model |", "the starting model's"):
        assert words in card, words
    # it learned from the loop: its training formulas are MP's and the loop's own finds
    assert len(stable.training_formulas()) > len(load_model("diffusion-bert").training_formulas())
    out = tmp_path / "s"
    assert main(["sample", "--model", "diffusion-bert-stable", "-n", "20", "--seed", "0", "-o", str(out),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "formulas.csv")))
    assert len(rows) == 20 and all(r["valid_cdvae"] == "True" for r in rows)
