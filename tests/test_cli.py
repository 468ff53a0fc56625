"""The composition-gen command line (composition_lm.cli), run in-process through ``main``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from composition_lm.cli import main
from evaluation.metrics import formula_set_metrics

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------- validate
VALIDATE_INPUT = ["NaCl", "Xx2O", "", "NaCl2", "Cl Na", "H2Cl", "ZnCu"]


def test_validate_writes_one_row_per_line(tmp_path, capsys):
    src = _write(tmp_path / "in.txt", "\n".join(VALIDATE_INPUT) + "\n")
    out = tmp_path / "out" / "validity.csv"
    assert main(["validate", str(src), "-o", str(out)]) == 0
    rows = _read_csv(out)
    assert len(rows) == len(VALIDATE_INPUT)
    expected_cols = {"where", "input", "reduced_formula", "parse_error"}
    for p in ("cdvae", "smact"):
        expected_cols |= {f"valid_{p}", f"charge_neutral_{p}", f"electronegativity_ok_{p}", f"reason_{p}"}
    assert set(rows[0]) == expected_cols
    assert [r["where"] for r in rows] == [f"line {i}" for i in range(1, 8)]
    assert [r["input"] for r in rows] == VALIDATE_INPUT
    assert [r["reduced_formula"] for r in rows] == ["NaCl", "", "", "NaCl2", "NaCl", "H2Cl", "ZnCu"]
    # cdvae verdicts by hand: NaCl yes; Xx2O unparseable; empty; NaCl2 odd charge; H2Cl Pauling; alloy
    assert [r["valid_cdvae"] for r in rows] == ["True", "False", "False", "False", "True", "False", "True"]
    assert "unknown element" in rows[1]["parse_error"]
    assert rows[1]["reason_cdvae"].startswith("unparseable") and rows[1]["reason_smact"].startswith("unparseable")
    assert rows[2]["parse_error"] == "empty"
    assert rows[3]["reason_cdvae"] == "no charge-neutral combination"
    assert rows[3]["charge_neutral_cdvae"] == "False"
    assert rows[5]["reason_cdvae"] == "electronegativity order violated"
    assert rows[5]["charge_neutral_cdvae"] == "True" and rows[5]["electronegativity_ok_cdvae"] == "False"
    assert rows[0]["reason_cdvae"] == "" and rows[0]["parse_error"] == ""
    # smact column agrees with SMACT itself on the parseable rows
    from smact.screening import smact_validity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in rows:
            if r["reduced_formula"]:
                assert r["valid_smact"] == str(smact_validity(r["reduced_formula"])), r
    err = capsys.readouterr().err
    assert "7 entries" in err and "wrote" in err


def test_validate_to_stdout_single_protocol_table(tmp_path, capsys):
    src = _write(tmp_path / "in.csv", "id,comp\n1,Fe2O3\n2,Qq\n3,CuZn\n")
    assert main(["validate", str(src), "--column", "comp", "--protocol", "cdvae"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["where"] for r in rows] == ["row 1", "row 2", "row 3"]
    assert [r["valid_cdvae"] for r in rows] == ["True", "False", "True"]
    assert not any(k.endswith("_smact") for k in rows[0])


def test_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_validate_empty_file(tmp_path, capsys):
    assert main(["validate", str(_write(tmp_path / "e.txt", ""))]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------- evaluate
GENERATED = ["NaCl", "NaCl", "KCl", "Xx", "NaCl2", "LiF", "SrTiO3", "O3TiSr"]
TRAIN = ["NaCl", "Na2Cl2", "SrTiO3"]
HELDOUT = ["KCl", "LiF", "MgO", "NaCl"]


@pytest.fixture()
def eval_inputs(tmp_path):
    gen = _write(tmp_path / "gen.txt", "\n".join(GENERATED) + "\n")
    train = _write(tmp_path / "train.csv", "formula\n" + "\n".join(TRAIN) + "\n")
    held = _write(tmp_path / "held.txt", "\n".join(HELDOUT) + "\n")
    return gen, train, held


def test_evaluate_writes_report(tmp_path, eval_inputs, capsys):
    gen, train, held = eval_inputs
    out = tmp_path / "report"
    assert main(["evaluate", str(gen), "--train", str(train), "--heldout", str(held), "-o", str(out)]) == 0
    written = json.loads((out / "metrics.json").read_text())
    sources = written.pop("sources")
    assert sources["generated"] == str(gen) and sources["train"] == str(train)
    # the same numbers as the library on the same inputs (reference = the first held-out set)
    expected = formula_set_metrics(GENERATED, TRAIN, {"held": HELDOUT}, HELDOUT)
    assert written == json.loads(json.dumps(expected))
    # and by hand: 8 samples, 7 parsed, distinct NaCl KCl NaCl2 LiF SrTiO3
    assert written["n_samples"] == 8 and written["n_parsed"] == 7 and written["n_unique"] == 5
    assert written["novelty"] == pytest.approx(3 / 5)  # KCl, NaCl2, LiF
    assert written["recovery"]["held"]["recovery"] == pytest.approx(2 / 3)  # KCl, LiF of KCl LiF MgO
    assert written["validity"]["cdvae"]["raw"] == pytest.approx(6 / 8)  # all but Xx and NaCl2
    summary = (out / "summary.md").read_text()
    assert "| metric |" in summary and "novelty" in summary and "recovery of held" in summary
    for name in ("element_frequency.png", "n_elements.png", "n_atoms.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind
    assert "| metric |" in capsys.readouterr().out


def test_evaluate_no_plots_and_split_spec(tmp_path, capsys):
    gen = _write(tmp_path / "gen.txt", "NaCl\nKCl\nLiF\n")
    corpus = _write(tmp_path / "mp.csv", "formula,split\nNaCl,train\nKCl,test\nLiF,test\nMgO,val\n")
    out = tmp_path / "r"
    code = main(["evaluate", str(gen), "--train", f"{corpus}@train", "--heldout", f"{corpus}@test",
                 "--protocol", "cdvae", "--no-plots", "-o", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["validity"]) == {"cdvae"}
    assert m["novelty"] == pytest.approx(2 / 3)
    assert m["recovery"] == {"mp@test": {"n_heldout_not_in_train": 2, "n_recovered": 2, "recovery": 1.0}}
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("which", ["generated", "train", "heldout"])
def test_evaluate_missing_input(tmp_path, eval_inputs, capsys, which):
    gen, train, held = eval_inputs
    paths = {"generated": gen, "train": train, "heldout": held}
    paths[which] = tmp_path / "does_not_exist.txt"
    argv = ["evaluate", str(paths["generated"]), "--train", str(paths["train"]),
            "--heldout", str(paths["heldout"]), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "does_not_exist" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------- help
def test_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "composition_lm.cli", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "validate" in proc.stdout and "evaluate" in proc.stdout


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["validate", "x.txt", "--protocol", "nope"])
    assert info.value.code == 2
