"""Steering discovery towards stability (issue 18): `composition-gen discover` with property targets against
the same model unconditional, at the same N and seed; SUN rates (E_hull <= 0.1 and <= 0 eV/atom) with their
standard errors, and validity, uniqueness and novelty of the sampled formulas.

Each configuration is one discover run in RUNS/<name> (continued with --resume when it stopped); the report is
benchmarks/steering.md and .json. Runs: the shipped property-conditioned Diffusion-BERT
(`diffusion-bert-props`) unconditional, with `--target e_above_hull=:0.05 --guidance 2`, and with
`--target formation_energy_per_atom=:-2.0 --guidance 2` (the lever the composition-level rows of
benchmarks/conditioning.md rank highest for "novel and predicted stable").

Run: python scripts/bench_steering.py [--n 200] [--seed 0] [--workers 2] [--runs runs/disc]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from benchlib import EXE, ROOT, cpu

from evaluation.io import write_json, write_text

MODEL = "diffusion-bert-props"
CONFIGS = {  # run folder -> extra discover arguments
    "plain": [],
    "ehull": ["--target", "e_above_hull=:0.05", "--guidance", "2"],
    "ef-low": ["--target", "formation_energy_per_atom=:-2.0", "--guidance", "2"],
}


def summary(run: Path) -> dict:
    import pandas as pd

    funnel = json.loads((run / "funnel.json").read_text())
    formulas = pd.read_csv(run / "formulas.csv", keep_default_na=False)
    n = funnel["n_formulas"]
    out = {"n": n, "sun_rate": funnel["sun_rate"], "counts": funnel["counts"],
           "relaxation_s": funnel["seconds"]["relaxation_s"],
           "validity": float(formulas["valid_cdvae"].astype(str).eq("True").mean()),
           "uniqueness": formulas["formula"].nunique() / n,
           "novelty": float(formulas["is_novel"].astype(str).eq("True").mean())}
    out["sun_se"] = {k: math.sqrt(v * (1 - v) / n) for k, v in funnel["sun_rate"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/disc")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = ap.parse_args()
    potential = args.shared / "models/matgl/M3GNet-MP-2021.2.8-PES"
    results = {}
    for name, extra in CONFIGS.items():
        run = args.runs / name
        if not (run / "funnel.json").exists():
            cmd = [*EXE, "discover", "--model", MODEL, "-n", str(args.n), "--seed", str(args.seed), "--workers",
                   str(args.workers), "--potential", str(potential), "--no-progress", *extra, "-o", str(run)]
            subprocess.run(cmd + (["--resume"] if (run / "journal.jsonl").exists() else []), check=True, cwd=ROOT)
        results[name] = {"arguments": " ".join(extra) or "(none)", **summary(run)}
        if results[name]["n"] != args.n:
            sys.exit(f"{run} holds a run of N = {results[name]['n']}, not {args.n}")
    base = results["plain"]
    lines = ["# Steering discovery towards stability (issue 18)", "",
             f"`python scripts/bench_steering.py --n {args.n} --seed {args.seed} --workers {args.workers}`; CPU "
             f"{cpu()}. `composition-gen discover --model {MODEL} -n {args.n} --seed {args.seed}` (validity "
             "enforced, top-1 template, M3GNet relaxation, MP2020-corrected E_hull against the shipped MP hull), "
             "unconditional and with the targets below. SUN: stable (E_hull <= 0.1, or <= 0), unique and novel, "
             "over the N sampled formulas; ± one standard error (binomial). Relaxation seconds are wall time of runs that "
             "shared the CPU with other jobs (and the E_hull run had 1 worker): not a speed comparison.", "",
             "| targets | SUN (E_hull <= 0.1) | × unconditional | SUN (E_hull <= 0) | × unconditional | validity | "
             "uniqueness | novelty | relaxed | relaxation s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        s1, s0 = r["sun_rate"]["0.1"], r["sun_rate"]["0"]
        lines.append(f"| {r['arguments']} | {s1:.3f} ± {r['sun_se']['0.1']:.3f} | {s1 / base['sun_rate']['0.1']:.2f} | "
                     f"{s0:.3f} ± {r['sun_se']['0']:.3f} | {s0 / base['sun_rate']['0']:.2f} | {r['validity']:.3f} | "
                     f"{r['uniqueness']:.3f} | {r['novelty']:.3f} | {r['counts']['relaxed']} | {r['relaxation_s']:.0f} |")
    lines += ["", "Target (issue 18): `--target e_above_hull=:0.05` >= 1.5x the unconditional SUN rate at N = 1,000, "
              "validity, uniqueness and novelty within 2 points."]
    write_text(ROOT / "benchmarks/steering.md", "\n".join(lines) + "\n")
    write_json(ROOT / "benchmarks/steering.json", {"cpu": cpu(), "n": args.n, "seed": args.seed, "runs": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
