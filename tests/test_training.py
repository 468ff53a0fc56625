"""Training Diffusion-BERT (composition_lm.training) and the `train` / `sample` sub-commands.

Tiny models (hidden 32, 1 layer), a hand-written corpus and a few steps; torch on one thread.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composition_lm.cli import main
from composition_lm.models import load_model
from composition_lm.training import TrainingArguments, train
from evaluation.composition import parse_formula

REPO = Path(__file__).resolve().parents[1]
CORPUS = """NaCl KCl LiF MgO CaO SrTiO3 BaTiO3 Fe2O3 Al2O3 LiCl NaF KBr CsCl ZnO ZnS TiO2 SiO2 SnO2 MnO2
LiMnO2 LiFePO4 LiCoO2 NaBr KF RbCl SrO BaO CuO NiO CoO FeO Cr2O3 V2O5 CaTiO3 MgAl2O4 LiNbO3 KNbO3 CaF2
MgF2 BaF2""".split()
CORPUS2 = "Li2O Na2O K2O LiI NaI KI CsI Li3N GaN AlN InP GaAs".split()
TINY_CLI = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64",
            "--batch-size", "8", "--warmup-steps", "2", "--no-progress"]
SAMPLE_HEADER = ["index", "sample", "formula", "parse_ok", "parse_error", "n_elements", "n_atoms", "valid_cdvae",
                 "reason_cdvae", "valid_smact", "reason_smact", "is_novel"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    a, b = d / "tiny.txt", d / "second.csv"
    a.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    b.write_text("formula\n" + "\n".join(CORPUS2) + "\n", encoding="utf-8")
    return a, b


def _args(out, corpus, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), corpus=str(corpus), train_split=None, val_split=None, hidden_size=32,
                num_layers=1, num_heads=2, intermediate_size=64, batch_size=8, warmup_steps=5, seq_length=16,
                eval_every=0, save_every=0, log_every=1, progress=False)
    base.update(kw)
    return TrainingArguments(**base)


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


# ------------------------------------------------------------------------------------------- resume
def test_resume_is_exact(tmp_path, corpora):
    corpus, _ = corpora
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(max_steps=30, save_every=10, dropout=0.1)  # dropout: the RNG state must be restored too
    train(_args(a, corpus, **common))
    stopped = train(_args(b, corpus, stop_at_step=10, **common))
    assert stopped == b / "checkpoints" / "step-10" and stopped.is_dir()
    assert not (b / "model").exists()
    assert sorted(_losses(b)) == list(range(1, 11))
    train(_args(b, corpus, resume=True, **common))
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == list(range(1, 31)) and sorted(lb) == list(range(1, 31))
    for step in range(1, 31):
        assert la[step]["loss"] == lb[step]["loss"], step
        assert la[step]["lr"] == lb[step]["lr"], step
        assert la[step]["mask_fraction"] == lb[step]["mask_fraction"], step
    # the exported (EMA) weights are identical too
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # keep_checkpoints=2 keeps the last two
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-20", "step-30"]


def test_resume_with_missing_ema_is_a_clear_error(tmp_path, corpora, capsys):
    corpus, _ = corpora
    out = tmp_path / "r"
    train(_args(out, corpus, max_steps=6, stop_at_step=3))
    (out / "checkpoints" / "step-3" / "ema.safetensors").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="ema.safetensors"):
        train(_args(out, corpus, max_steps=6, resume=True))
    capsys.readouterr()
    code = main(["train", "--corpus", str(corpus), "--output-dir", str(out), "--train-split", "", "--val-split", "",
                 "--max-steps", "6", "--resume", "--eval-every", "0", "--seq-length", "16", *TINY_CLI])
    assert code == 2
    err = capsys.readouterr().err
    assert "ema.safetensors" in err and "Traceback" not in err


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, corpora, capsys):
    corpus, _ = corpora
    out = tmp_path / "fresh"
    train(_args(out, corpus, max_steps=3, resume=True))
    assert "starting from scratch" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- CLI train
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, corpora):
    """`composition-gen train` on the tiny corpus (compact codec, 20 steps, eval every 10)."""
    corpus, _ = corpora
    d = tmp_path_factory.mktemp("cli-train")
    code = main(["train", "--corpus", str(corpus), "--output-dir", str(d), "--train-split", "", "--val-split", "",
                 "--codec", "compact", "--seq-length", "12", "--max-steps", "20", "--eval-every", "10",
                 "--eval-samples", "16", "--save-every", "10", *TINY_CLI])
    assert code == 0
    return d


def test_cli_train_writes_model_folder(cli_model, corpora):
    model = cli_model / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_formulas.txt.gz",
                 "training_args.json", "metrics.json", "README.md"):
        assert (model / name).is_file(), name
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "diffusion-bert"
    assert (cfg["codec"], cfg["seq_length"], cfg["hidden_size"], cfg["num_hidden_layers"]) == ("compact", 12, 32, 1)
    args = json.loads((model / "training_args.json").read_text())
    assert args["train_split"] is None and args["val_split"] is None  # '' means all rows
    assert args["max_steps"] == 20
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["n_train"] == len(CORPUS) and metrics["n_train_encoded"] == len(CORPUS)
    assert metrics["num_processes"] == 1
    assert "train" in metrics["command"] and "--max-steps 20" in metrics["command"]
    assert set(metrics["final_eval"]) >= {"val_loss", "sample_parse_rate", "sample_validity_cdvae"}
    with gzip.open(model / "training_formulas.txt.gz", "rt") as fh:
        assert {line.strip() for line in fh if line.strip()} == {str(parse_formula(f)) for f in CORPUS}
    evals = [json.loads(line) for line in (cli_model / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval" in r] == [10, 20]
    assert "compact" in (model / "README.md").read_text()
    assert sorted(p.name for p in (cli_model / "checkpoints").iterdir()) == ["step-10", "step-20"]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_cli_sample_writes_csv_and_run_config(cli_model, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(cli_model / "model"), "-n", "50", "--seed", "1", "-o", str(out),
                 "--no-progress"]) == 0
    table = _read_csv(out / "formulas.csv")
    assert table[0] == SAMPLE_HEADER
    rows = [dict(zip(SAMPLE_HEADER, r)) for r in table[1:]]
    assert len(rows) == 50
    corpus = {str(parse_formula(f)) for f in CORPUS}
    for r in rows:
        if r["parse_ok"] == "True":
            assert r["parse_error"] == ""
            assert r["is_novel"] == str(r["formula"] not in corpus), r
            assert r["valid_cdvae"] in ("True", "False") and r["valid_smact"] in ("True", "False")
        else:
            assert r["parse_ok"] == "False" and r["parse_error"] and r["formula"] == "" and r["is_novel"] == ""
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["summary"]["n_samples"] == 50
    assert cfg["summary"]["n_parsed"] == sum(r["parse_ok"] == "True" for r in rows)
    assert cfg["seed"] == 1 and cfg["model_type"] == "diffusion-bert"
    # same seed, same file
    out2 = tmp_path / "again"
    assert main(["sample", "--model", str(cli_model / "model"), "-n", "50", "--seed", "1", "-o", str(out2),
                 "--no-progress"]) == 0
    assert [r[:3] for r in _read_csv(out2 / "formulas.csv")] == [r[:3] for r in table]


def test_cli_train_refuses_existing_checkpoints(cli_model, corpora, capsys):
    corpus, _ = corpora
    before = (cli_model / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    code = main(["train", "--corpus", str(corpus), "--output-dir", str(cli_model), "--train-split", "",
                 "--val-split", "", "--max-steps", "5", "--eval-every", "0", *TINY_CLI])
    assert code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    assert (cli_model / "model" / "model.safetensors").read_bytes() == before


def test_cli_finetune_keeps_parent_codec(cli_model, corpora, tmp_path):
    _, second = corpora
    out = tmp_path / "ft"
    # no --codec (the parser default is expanded): the parent's compact codec and length must win
    code = main(["train", "--corpus", str(second), "--output-dir", str(out), "--train-split", "", "--val-split", "",
                 "--init-from", str(cli_model / "model"), "--max-steps", "4", "--eval-every", "0", *TINY_CLI])
    assert code == 0
    child = load_model(out / "model")
    assert child.config.codec == "compact" and child.config.seq_length == 12
    assert child.config.hidden_size == 32
    parent = load_model(cli_model / "model")
    # novelty is judged against all the child has seen: its own corpus and its parent's
    assert child.training_formulas() == {str(parse_formula(f)) for f in CORPUS2} | parent.training_formulas()
    assert not {str(parse_formula(f)) for f in CORPUS2} <= parent.training_formulas()
    # the weights moved away from the parent's
    ps, cs = parent.model.state_dict(), child.model.state_dict()
    assert ps.keys() == cs.keys()
    assert any(not torch.equal(ps[k], cs[k]) for k in ps)
    # and the child samples in the compact grammar
    from composition_lm.sampling import generate

    samples = generate(child, 30, steps=6, seed=0, progress=False, validity="none")
    assert all(len(raw.split()) % 2 == 0 for raw, f, _ in samples if f is not None)


def test_cli_train_bad_corpus_exit_2(tmp_path, capsys):
    code = main(["train", "--corpus", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "2", *TINY_CLI])
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- two processes
@pytest.mark.parametrize("family", ["diffusion-bert", "diffusion-lm"])
def test_accelerate_two_processes(tmp_path, corpora, family):
    """Two CPU processes through `accelerate launch`.

    `accelerate launch --cpu --num_processes 2` (accelerate 1.x) uses its simple launcher, which without
    an mpirun hostfile starts ONE process; `--multi_gpu` launches through torchrun, and the training
    code's ``Accelerator(cpu=True)`` (no CUDA visible) then joins a gloo process group.
    """
    corpus, _ = corpora
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", "-m", "composition_lm.cli",
           "train", "--corpus", str(corpus), "--output-dir", str(out), "--train-split", "", "--val-split", "",
           "--max-steps", "6", "--eval-every", "3", "--eval-samples", "8", "--save-every", "3", "--seq-length", "16",
           "--model", family, *(["--diffusion-steps", "20"] if family == "diffusion-lm" else []), *TINY_CLI]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    loaded = load_model(out / "model")
    assert loaded.config.hidden_size == 32 and loaded.model_type == family
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # only the main process logs: the final step (log_every 50) and two evaluations, once each
    assert [r["step"] for r in log if "loss" in r] == [6]
    assert [r["step"] for r in log if "eval" in r] == [3, 6]


def test_spindle_time_conditioned_uniform_roundtrip(tmp_path, corpora):
    """The non-default model options survive export: spindle token_info, time conditioning, weighting."""
    corpus, _ = corpora
    export = train(_args(tmp_path / "sp", corpus, max_steps=5, schedule="spindle", time_conditioning=True,
                         loss_weighting="uniform"))
    loaded = load_model(export)
    cfg = loaded.config
    assert cfg.schedule == "spindle" and cfg.time_conditioning is True and cfg.loss_weighting == "uniform"
    assert len(cfg.token_info) == cfg.vocab_size
    info = cfg.token_info
    assert min(info) == pytest.approx(-0.5) and max(info) == pytest.approx(0.5)
    from composition_lm.tokenizer import PAD

    assert info[PAD] == pytest.approx(-0.5)  # [PAD] fills most positions: the most frequent token
    from composition_lm.sampling import generate

    a = generate(loaded, 20, steps=4, seed=0, progress=False, validity="none")
    assert a == generate(load_model(export), 20, steps=4, seed=0, progress=False, validity="none")
