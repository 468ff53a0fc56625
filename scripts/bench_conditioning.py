"""Property-conditioned generation (issue 18): hit rates of requested windows against unconditional
sampling of the same model at the same N and seed, judged independently of the generator.

A formula hits a window when its property lies in it: by the shipped composition property predictor
(`evaluation.properties`, trained on MP train) for every sample, and by exact lookup (the MP ground state,
all splits) for the samples that are known MP compounds. Each row also carries validity, uniqueness and
novelty (`formula_set_metrics`, the `evaluate` definition), and the guidance-scale curve.

Results are appended to benchmarks/conditioning.jsonl as they finish (a rerun skips them); the report is
benchmarks/conditioning.{md,json}, one table per model measured at this N and seed.

`--stability-levers` adds the rows that try other conditions for stability (the on-hull bin alone, a low
formation energy), each scored for E_hull <= 0.05 and, since discover's SUN rate counts only novel formulas,
for "novel and in the window".

Run: python scripts/bench_conditioning.py --model runs/dbert-props/model [--n 5000] [--seed 0] [--stability-levers]
     python scripts/bench_conditioning.py --report-only   (rewrite the report from the .jsonl)
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from benchlib import ROOT, cpu

from evaluation.io import write_json, write_text

WINDOWS = ["band_gap=1.0:3.0", "band_gap=3.0:", "e_above_hull=:0.05"]
GUIDANCE = [None, 2.0, 3.0]
#: other conditions tried for stability (scored for e_above_hull=:0.05)
STABILITY_LEVERS = [("e_above_hull=:0.0", None), ("e_above_hull=:0.0", 2.0),
                    ("formation_energy_per_atom=:-2.0", None), ("formation_energy_per_atom=:-2.0", 2.0)]


def run_one(gen, target: str | None, guidance: float | None, n: int, seed: int, predictor, known: dict,
            corpus: dict) -> dict:
    from composition_lm.conditions import parse_target
    from evaluation.metrics import formula_set_metrics

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = gen.generate(n, seed=seed, targets=[target] if target else None, guidance=guidance)
    seconds = time.perf_counter() - t0
    formulas = [f for f in table["formula"] if f]
    novel = np.array([f not in corpus["train_set"] for f in formulas])
    pred = predictor.predict(formulas)
    m = formula_set_metrics(table["formula"].tolist(), corpus["train"], {"test": corpus["test"]}, corpus["val"],
                            protocols=("cdvae",))
    out = {"target": target, "guidance": guidance, "n": n, "seed": seed, "seconds": seconds,
           "validity_cdvae": m["validity"]["cdvae"]["raw"], "uniqueness": m["uniqueness"], "novelty": m["novelty"],
           "element_js": m["distribution"]["element_js"],
           "n_elements_wasserstein": m["distribution"]["n_elements_wasserstein"],
           "recovery_test": m["recovery"]["test"]["recovery"], "hits": {}}
    for window in WINDOWS:
        t = parse_target(window)
        by_model = t.contains(pred[t.name])
        looked = [known[f][t.name] for f in formulas if f in known and np.isfinite(known[f].get(t.name, np.nan))]
        out["hits"][window] = {"predictor": float(by_model.mean()), "lookup": float(np.mean(t.contains(np.array(looked))))
                               if looked else None, "lookup_n": len(looked),
                               "novel_predictor": float((by_model & novel).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a property-conditioned formula model (either family)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from the .jsonl")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stability-levers", action="store_true", help="also the other stability conditions")
    ap.add_argument("--parent", help="the unconditional model the conditional one was fine-tuned from, sampled "
                    "unconditionally for the 'does it lose anything unconditionally' table (default: its "
                    "training_args.json init_from, if any)")
    args = ap.parse_args()
    log = ROOT / "benchmarks/conditioning.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not args.report_only:
        if not args.model:
            ap.error("--model is required unless --report-only")
        done = measure(args, log, done)
    report(done, args.seed)


def measure(args, log: Path, done: list[dict]) -> list[dict]:
    """Run the rows of ``args.model`` not yet in ``done`` (appending each to ``log``); all records."""
    import pandas as pd

    from composition_lm.cli.options import load_spec
    from composition_lm.generator import FormulaGenerator
    from evaluation.properties import PropertyPredictor, formula_properties

    csv = f"{args.shared}/data/formulas/mp_formulas.csv"
    known = formula_properties(pd.read_csv(csv), ["band_gap", "e_above_hull"], formula_column="reduced_formula")
    corpus = {split: load_spec(f"{csv}@{split}")[1] for split in ("train", "val", "test")}
    corpus["train_set"] = set(corpus["train"])
    predictor = PropertyPredictor.load()
    gen = FormulaGenerator.from_pretrained(args.model)
    trained = Path(args.model) / "training_args.json"
    parent = args.parent or (json.loads(trained.read_text()).get("init_from") if trained.exists() else None)
    have = {(r["target"], r["guidance"], r["n"], r["seed"], r.get("model")) for r in done}
    runs = [(args.model, None, None)] + [(args.model, w, g) for w in WINDOWS for g in GUIDANCE] + (
        [(args.model, t, g) for t, g in STABILITY_LEVERS] if args.stability_levers else []) + (
        [(parent, None, None)] if parent else [])
    for model, target, guidance in runs:
        if (target, guidance, args.n, args.seed, model) in have:
            continue
        sampler = gen if model == args.model else FormulaGenerator.from_pretrained(model)
        rec = {**run_one(sampler, target, guidance, args.n, args.seed, predictor, known, corpus), "model": model}
        print(json.dumps({k: rec[k] for k in ("target", "guidance", "validity_cdvae", "novelty")}), flush=True)
        with log.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        done.append(rec)
    return done


def report(done: list[dict], seed: int) -> None:
    """benchmarks/conditioning.{md,json}: one table per (model, N) with targets, then the unconditional rows."""
    rows = [r for r in done if r["seed"] == seed]
    runs = list(dict.fromkeys((r["model"], r["n"]) for r in rows if r["target"]))
    lines = ["# Property-conditioned generation (issue 18)", "",
             f"`python scripts/bench_conditioning.py --model MODEL --n N --seed {seed} [--stability-levers]`; "
             f"CPU {cpu()}. N samples per row, seed {seed}, validity enforced in the sampler (the "
             "default). Hit rate: share of samples whose property lies in the window, by the shipped composition "
             "predictor (`benchmarks/property_predictor.md`) over all samples, and by MP lookup over the samples "
             "that are known MP compounds (their number in brackets); 'novel hits': samples that are novel and hit "
             "by the predictor. Ratio: predictor hit rate over the unconditional one of the same model, N and seed."]
    for model, n in runs:
        table = _table([r for r in rows if r["model"] == model and r["n"] == n])
        if table:
            lines += ["", f"## {model}, N = {n}", ""] + table
    lines += ["", "## Unconditional sampling: does conditioning cost anything?", "",
              "Each model sampled without targets (element JS against MP val, #elements Wasserstein, recovery of "
              "MP test; `formula_set_metrics`).", "",
              "| model | N | validity | uniqueness | novelty | element JS | #elements W | recovery (test) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["target"] is None and "element_js" in r:
            lines.append(f"| {r['model']} | {r['n']} | {r['validity_cdvae']:.3f} | {r['uniqueness']:.3f} | "
                         f"{r['novelty']:.3f} | {r['element_js']:.4f} | {r['n_elements_wasserstein']:.3f} | "
                         f"{r['recovery_test']:.4f} |")
    lines += ["", "Target: >= 2x the unconditional hit rate for the band-gap windows; validity, uniqueness and "
              "novelty within 2 points of unconditional."]
    write_text(ROOT / "benchmarks/conditioning.md", "\n".join(lines) + "\n")
    write_json(ROOT / "benchmarks/conditioning.json", {"cpu": cpu(), "records": rows})
    print("\n".join(lines))


def _table(rows: list[dict]) -> list[str]:
    """The markdown table of one model's records: per window, the unconditional row and each conditioned one
    (the stability levers under the E_hull window)."""
    base = next((r for r in rows if r["target"] is None), None)
    if base is None:
        return []
    lines = ["| asked | guidance | hit rate (predictor) | ratio to unconditional | novel hits | hit rate (lookup) | "
             "validity | uniqueness | novelty | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for w in WINDOWS:
        b = base["hits"][w]
        lines.append(f"| unconditional, scored for {w} | - | {b['predictor']:.3f} | 1 | {cell(b.get('novel_predictor'))} | "
                     f"{(b['lookup'] or 0):.3f} ({b['lookup_n']}) | {base['validity_cdvae']:.3f} | "
                     f"{base['uniqueness']:.3f} | {base['novelty']:.3f} | {base['seconds']:.1f} |")
        levers = [t for t, _ in STABILITY_LEVERS] if w.startswith("e_above_hull") else []
        for r in rows:
            if r["target"] != w and r["target"] not in levers:
                continue
            h = r["hits"][w]
            ratio = h["predictor"] / b["predictor"] if b["predictor"] else float("inf")
            lines.append(f"| {r['target']} | {r['guidance'] or 1} | {h['predictor']:.3f} | {ratio:.2f} | "
                         f"{cell(h.get('novel_predictor'))} | {(h['lookup'] or 0):.3f} ({h['lookup_n']}) | "
                         f"{r['validity_cdvae']:.3f} | {r['uniqueness']:.3f} | {r['novelty']:.3f} | {r['seconds']:.1f} |")
    return lines


if __name__ == "__main__":
    main()
