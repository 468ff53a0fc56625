"""Bins or a continuous embedding for property conditions (issue 18: "choose by measurement").

A property that is a known function of the formula, the oxygen fraction of its atoms, so every sample's
true value is exact (no predictor in between). 4,000 MP formulas (at most 10 atoms, seed 0) label a corpus;
for each model family and encoding a tiny model (2 layers, width 48) trains 400 steps on it with
`--condition-on o_fraction` (`--condition-encoding bins` with 4 or 8 bins, or `continuous`), for two
training seeds. Each model then samples 500 formulas (seed 0, raw: no validity enforcement) unconditionally
and for each window, and the hit rate is the share of parsed samples whose oxygen fraction lies in the window.

Results are appended to benchmarks/condition_encoding.jsonl as they finish (a rerun skips them); the report
is benchmarks/condition_encoding.md.

Run: python scripts/bench_condition_encoding.py
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from benchlib import ROOT, cpu

from evaluation.io import write_text

WINDOWS = ["o_fraction=0.6:", "o_fraction=0.4:0.5", "o_fraction=0.2:0.4", "o_fraction=:0"]
ENCODINGS = [("bins", 4), ("bins", 8), ("continuous", 8)]
FAMILIES = ["diffusion-bert", "diffusion-lm"]
SEEDS = [0, 1]
N = 500


def oxygen_fraction(formula: str) -> float:
    from evaluation.composition import parse_formula

    f = parse_formula(formula)
    return dict(f.counts).get("O", 0) / f.n_atoms


def corpus(path: Path, shared: Path) -> None:
    import pandas as pd

    from evaluation.composition import parse_formula

    table = pd.read_csv(shared / "data/formulas/mp_formulas.csv", keep_default_na=False, dtype=str)
    formulas = sorted({f for f in table["reduced_formula"] if f})
    picked = [f for f in random.Random(0).sample(formulas, 4000) if parse_formula(f).n_atoms <= 10]
    path.write_text("formula,o_fraction\n" + "".join(f"{f},{oxygen_fraction(f)}\n" for f in picked))


def measure(family: str, encoding: str, n_bins: int, seed: int, data: Path, tmp: Path) -> dict:
    from composition_lm.conditions import parse_target
    from composition_lm.generator import FormulaGenerator
    from composition_lm.training import TrainingArguments, train

    extra = {"diffusion_steps": 200} if family == "diffusion-lm" else {}
    t0 = time.perf_counter()
    export = train(TrainingArguments(
        output_dir=str(tmp / f"{family}-{encoding}{n_bins}-{seed}"), corpus=str(data), model_type=family,
        train_split=None, val_split=None, seq_length=12, hidden_size=48, num_layers=2, num_heads=2,
        intermediate_size=96, batch_size=64, warmup_steps=20, lr=3e-3, max_steps=400, eval_every=0, save_every=0,
        log_every=400, progress=False, dropout=0.0, ema_decay=0.95, seed=seed, condition_on="o_fraction",
        condition_bins=n_bins, condition_encoding=encoding, **extra))
    train_s = time.perf_counter() - t0
    gen = FormulaGenerator.from_pretrained(export)
    steps = 50 if family == "diffusion-lm" else None
    rec = {"family": family, "encoding": encoding, "bins": n_bins, "seed": seed, "train_s": train_s, "hits": {}}
    for window in [None, *WINDOWS]:
        table = gen.generate(N, seed=0, steps=steps, validity="none", targets=window)
        values = np.array([oxygen_fraction(f) for f in table["formula"] if f])
        rec["hits"][window or "unconditional"] = {
            w: float(parse_target(w).contains(values).mean()) for w in WINDOWS}
        rec["hits"][window or "unconditional"]["uniqueness"] = float(table["formula"].nunique() / N)
    return rec


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    log = ROOT / "benchmarks/condition_encoding.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    have = {(r["family"], r["encoding"], r["bins"], r["seed"]) for r in done}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "o_fraction.csv"
        corpus(data, args.shared)
        for family in FAMILIES:
            for encoding, n_bins in ENCODINGS:
                for seed in SEEDS:
                    if (family, encoding, n_bins, seed) in have:
                        continue
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        rec = measure(family, encoding, n_bins, seed, data, Path(tmp))
                    print(json.dumps(rec), flush=True)
                    with log.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    done.append(rec)
    report(done)


def report(records: list[dict]) -> None:
    lines = ["# Property conditions: bins or a continuous embedding (issue 18)", "",
             f"`python scripts/bench_condition_encoding.py`; CPU {cpu()}, one thread. A tiny model per family and "
             f"encoding (2 layers, width 48, 400 steps) conditioned on the oxygen fraction of a 4,000-formula MP "
             f"corpus, a property known exactly for every sample; {N} raw samples (seed 0) per row. Hit rate: share "
             "of parsed samples inside the window, mean over the training seeds "
             f"({', '.join(map(str, SEEDS))}) with their range; ratio: over the same model's unconditional "
             "hit rate for that window.", "",
             "| family | encoding | window | hit rate (range) | unconditional | ratio | uniqueness |",
             "|---|---|---|---:|---:|---:|---:|"]
    for family in FAMILIES:
        for encoding, n_bins in ENCODINGS:
            recs = [r for r in records if (r["family"], r["encoding"], r["bins"]) == (family, encoding, n_bins)]
            if not recs:
                continue
            label = f"bins ({n_bins})" if encoding == "bins" else "continuous"
            for w in WINDOWS:
                hit = [r["hits"][w][w] for r in recs]
                base = [r["hits"]["unconditional"][w] for r in recs]
                uniq = np.mean([r["hits"][w]["uniqueness"] for r in recs])
                ratio = np.mean(hit) / np.mean(base) if np.mean(base) else float("inf")
                lines.append(f"| {family} | {label} | {w} | {np.mean(hit):.3f} ({min(hit):.3f}–{max(hit):.3f}) | "
                             f"{np.mean(base):.3f} | {ratio:.2f} | {uniq:.3f} |")
    write_text(ROOT / "benchmarks/condition_encoding.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
