"""Train the shipped composition property predictor (issue 18's independent judge) on the Materials
Project formula corpus and report its error.

Each reduced formula of ``mp_formulas.csv`` carries the labels of its ground state (lowest
``e_above_hull`` entry): formation energy per atom, band gap and energy above the hull. The predictor is
fit on ``train`` (best epoch chosen on ``val``) and scored on ``test`` (mean absolute error, against the
MAE of always predicting the ``train`` mean, and for band gap the accuracy of the 1-3 eV and >= 3 eV windows).

Writes evaluation/pretrained/property-predictor/ (model.safetensors, config.json, README.md) and
benchmarks/property_predictor.{md,json}.

Run: python scripts/train_property_predictor.py [--shared ../shared] [--epochs 60] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from benchlib import ROOT, cpu

from evaluation.io import write_json, write_text
from evaluation.properties import SHIPPED, formula_properties, train_property_predictor

PROPERTIES = ["formation_energy_per_atom", "band_gap", "e_above_hull"]
UNITS = {"formation_energy_per_atom": "eV/atom", "band_gap": "eV", "e_above_hull": "eV/atom"}
WINDOWS = {"band gap 1-3 eV": ("band_gap", 1.0, 3.0), "band gap >= 3 eV": ("band_gap", 3.0, np.inf),
           "e_above_hull <= 0.05": ("e_above_hull", -np.inf, 0.05)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(SHIPPED))
    args = ap.parse_args()
    import pandas as pd

    corpus = f"{args.shared}/data/formulas/mp_formulas.csv"
    table = pd.read_csv(corpus)
    data = {s: formula_properties(table[table["split"] == s], PROPERTIES, formula_column="reduced_formula")
            for s in ("train", "val", "test")}
    model, history = train_property_predictor(data["train"], data["val"], PROPERTIES, epochs=args.epochs,
                                              seed=args.seed)
    test = list(data["test"])
    pred = model.predict(test)
    truth = {p: np.array([data["test"][f][p] for f in test]) for p in PROPERTIES}
    train_mean = {p: float(np.nanmean([v[p] for v in data["train"].values()])) for p in PROPERTIES}
    metrics = {"n": {s: len(d) for s, d in data.items()}, "test_mae": {}, "mean_baseline_mae": {}, "windows": {}}
    for p in PROPERTIES:
        seen = ~np.isnan(truth[p])
        metrics["test_mae"][p] = float(np.abs(pred[p][seen] - truth[p][seen]).mean())
        metrics["mean_baseline_mae"][p] = float(np.abs(train_mean[p] - truth[p][seen]).mean())
    for name, (p, lo, hi) in WINDOWS.items():
        seen = ~np.isnan(truth[p])
        t_in = (truth[p][seen] >= lo) & (truth[p][seen] <= hi)
        p_in = (pred[p][seen] >= lo) & (pred[p][seen] <= hi)
        metrics["windows"][name] = {"share_in_window": float(t_in.mean()), "accuracy": float((t_in == p_in).mean()),
                                    "precision": float((t_in & p_in).sum() / max(p_in.sum(), 1)),
                                    "recall": float((t_in & p_in).sum() / max(t_in.sum(), 1))}
    model.config.metrics.update({"test_mae": metrics["test_mae"], "corpus": "mp_formulas.csv (train/val/test)"})
    out = model.save(args.out)
    command = f"python scripts/train_property_predictor.py --epochs {args.epochs} --seed {args.seed}"
    rows = [f"| {p} ({UNITS[p]}) | {metrics['test_mae'][p]:.3f} | {metrics['mean_baseline_mae'][p]:.3f} |"
            for p in PROPERTIES]
    win = [f"| {name} | {w['share_in_window']:.3f} | {w['accuracy']:.3f} | {w['precision']:.3f} | {w['recall']:.3f} |"
           for name, w in metrics["windows"].items()]
    body = ["| property | MAE on test | MAE of the train mean |", "|---|---:|---:|", *rows, "",
            "| window | share of test in it | accuracy | precision | recall |", "|---|---:|---:|---:|---:|", *win]
    md = ["# Composition property predictor", "",
          f"`{command}`; CPU {cpu()}. Materials Project formulas (`../shared/data/formulas/mp_formulas.csv`), "
          "each reduced formula labelled by its lowest-E_hull entry: "
          f"{metrics['n']['train']} train, {metrics['n']['val']} val (epoch choice, best epoch "
          f"{model.config.metrics['best_epoch']} of {args.epochs}), {metrics['n']['test']} test formulas. "
          "Features: Magpie-style statistics of 20 element properties (`evaluation.properties`); a 3-layer "
          "network with one output per property, L1 loss.", "", *body]
    write_text(ROOT / "benchmarks/property_predictor.md", "\n".join(md) + "\n")
    write_json(ROOT / "benchmarks/property_predictor.json", {"cpu": cpu(), "command": command, **metrics,
                                                             "history": history})
    card = ["# property-predictor", "",
            "Composition-only predictor of formation energy per atom, band gap and energy above the hull, the "
            "independent judge of property-conditioned generation (`evaluation.properties.PropertyPredictor`; "
            "load with `PropertyPredictor.load()`).", "",
            "Training data: Materials Project formulas and labels as distributed in `../shared/data/formulas/"
            "mp_formulas.csv` (CC BY 4.0, see `../shared/README.md`), `train` split; epoch chosen on `val`. "
            f"Reproduce: `{command}`.", "", "## Test error (`benchmarks/property_predictor.md`)", "", *body, "",
            "A composition cannot tell polymorphs apart: the labels are each formula's ground state, so the error "
            "includes what the structure would decide. Use it to judge sets of generated formulas (hit rates), not "
            "single compounds."]
    write_text(out / "README.md", "\n".join(card) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
