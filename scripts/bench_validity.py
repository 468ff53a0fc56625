"""Validator throughput: formulas/s of `check_formulas` vs `smact.screening.smact_validity`.

Run: python scripts/bench_validity.py [--shared ../shared] [--n 20000]
Writes benchmarks/validity.json and benchmarks/validity.md. Every timing is cold (fresh process
state for the cache) and measured in the same run as its baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json, write_text  # noqa: E402


def timed_child(code: str) -> float:
    """Run `code` in a fresh interpreter (cold caches); it prints seconds on its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--n", type=int, default=20000, help="distinct formulas in the timed set")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import pandas as pd

    forms = sorted(set(pd.read_csv(args.shared / "data/formulas/mp_formulas.csv").reduced_formula))
    random.Random(0).shuffle(forms)
    sample = forms[: args.n]
    listfile = ROOT / "benchmarks" / ".bench_formulas.txt"
    listfile.parent.mkdir(exist_ok=True)
    listfile.write_text("\n".join(sample))
    ours = (
        "import time; from evaluation.validity import check_formulas, _tables; "
        "fs=open('{f}').read().split('\\n'); _tables('{p}'); t=time.perf_counter(); "
        "check_formulas(fs, '{p}', workers={w}, parallel_threshold={th}); print(time.perf_counter()-t)"
    )
    ref = (
        "import time, warnings; warnings.filterwarnings('ignore'); from smact.screening import smact_validity; "
        "fs=open('{f}').read().split('\\n'); smact_validity('NaCl'); t=time.perf_counter(); "
        "[smact_validity(x) for x in fs]; print(time.perf_counter()-t)"
    )
    cases = {
        "smact.screening.smact_validity (baseline, 1 process)": ref.format(f=listfile),
        "ours, smact protocol, 1 process": ours.format(f=listfile, p="smact", w=1, th=10**9),
        "ours, smact protocol, 2 processes": ours.format(f=listfile, p="smact", w=2, th=0),
        "ours, cdvae protocol, 1 process": ours.format(f=listfile, p="cdvae", w=1, th=10**9),
        "ours, cdvae protocol, 2 processes": ours.format(f=listfile, p="cdvae", w=2, th=0),
    }
    results = {}
    for name, code in cases.items():
        secs = [timed_child(code) for _ in range(args.repeats)]
        results[name] = {
            "seconds": secs,
            "formulas_per_s_median": len(sample) / sorted(secs)[len(secs) // 2],
        }
        print(f"{name}: {results[name]['formulas_per_s_median']:.0f} formulas/s", flush=True)
    listfile.unlink()
    base = results["smact.screening.smact_validity (baseline, 1 process)"]["formulas_per_s_median"]
    for r in results.values():
        r["speedup_vs_smact"] = r["formulas_per_s_median"] / base
    meta = {
        "n_distinct_formulas": len(sample),
        "source": "distinct reduced formulas of mp_formulas.csv, shuffled with seed 0",
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "command": "python scripts/bench_validity.py",
    }
    write_json(ROOT / "benchmarks/validity.json", {"meta": meta, "results": results})
    lines = ["# Validator throughput", "", f"{len(sample)} distinct MP formulas, cold cache, median of "
             f"{args.repeats} runs, {os.cpu_count()} cores. `{meta['command']}`", "",
             "| implementation | formulas/s | x smact |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['formulas_per_s_median']:.0f} | {v['speedup_vs_smact']:.2f} |" for k, v in results.items()]
    write_text(ROOT / "benchmarks/validity.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
