"""The discovery benchmark: `composition-gen discover` on N formulas from a shipped formula model, templates from the
whole mp_union store, the package's default potential scheme (or --potential); SUN rates, the funnel, the best candidates, and the rediscovery check.

    python scripts/bench_discover.py [--model diffusion-bert] [--n 1000] [--seed 0] [--workers 2] [--resume]
    python scripts/bench_discover.py --snapshot [--n 1000 ...]   # the run so far -> benchmarks/discover_runs/

The run goes to runs/discover/<model>-n<N>-seed<S> (`--resume` finishes a stopped one, from the snapshot in
benchmarks/discover_runs/ where runs/ lacks it, e.g. on another machine); the report to
benchmarks/discover_<model>.md and .json, with the run's report.html and plots copied beside it.

Rediscovery: generated formulas that belong to MP's held-out `test` split (mp_formulas.csv) are MP compounds
the model never saw. For those with an MP-20 test structure: does the pipeline's structure match MP's
(StructureMatcher, ltol 0.3, stol 0.5, angle_tol 10) and how far is its E_hull from MP's?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import command_line, cpu, ensure_mp_union_store, restore_file, snapshot_files  # noqa: E402

from evaluation.io import write_json, write_text  # noqa: E402

SNAPSHOTS = ROOT / "benchmarks" / "discover_runs"


def rediscovery(out: Path, shared: Path) -> dict:
    import pandas as pd
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    from structure.io import structure_from_cif

    cands = pd.read_csv(out / "candidates.csv", keep_default_na=False, na_values=[""])
    formulas = pd.read_csv(shared / "data/formulas/mp_formulas.csv", keep_default_na=False, na_values=[""])
    test_formulas = set(formulas.loc[formulas["split"] == "test", "reduced_formula"])
    mp20 = pd.read_csv(shared / "data/structures/mp_20/test.csv.gz")
    by_formula = {f: g for f, g in mp20.groupby("pretty_formula")}
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    structures = {(r["index"], r["rank"]): r["structure"] for r in journal if r.get("kind") == "structure"}
    matcher = StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10)
    rows = []
    best = cands[cands["best"] == True]  # noqa: E712
    for _, r in best.iterrows():
        if r["formula"] not in test_formulas:
            continue
        rec = {"formula": r["formula"], "e_hull": r["e_hull_per_atom"], "match": None, "mp_e_hull": None}
        s = structures.get((int(r["index"]), int(r["rank"])))
        if r["formula"] in by_formula and s is not None:
            mine = Structure.from_dict(s)
            group = by_formula[r["formula"]]
            hits = [row for _, row in group.iterrows() if matcher.fit(mine, structure_from_cif(row["cif"]))]
            rec["match"] = bool(hits)
            rec["mp_e_hull"] = float((hits[0] if hits else group.iloc[0])["e_above_hull"])
        rows.append(rec)
    with_structure = [r for r in rows if r["match"] is not None]
    matched = [r for r in with_structure if r["match"]]
    diffs = [abs(max(r["e_hull"], 0) - r["mp_e_hull"]) for r in matched if r["e_hull"] == r["e_hull"]]
    return {"n_test_formulas_generated": len(rows), "n_with_mp20_structure": len(with_structure),
            "n_structure_matched": len(matched),
            "mae_e_hull_matched": sum(diffs) / len(diffs) if diffs else None, "examples": rows[:20]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--model", default="diffusion-bert")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--templates", type=Path, default=ROOT / "runs" / "mp_union.db",
                    help="template store (built from mp_union.csv.gz when missing)")
    ap.add_argument("--potential", default=None, help="discover's --potential (default: the package's default "
                    "scheme; the seed run used ../shared/models/matgl/M3GNet-MP-2021.2.8-PES)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--snapshot", action="store_true", help="save the run's sampled formulas, run config and "
                    "journal so far (gzipped) to benchmarks/discover_runs/ and stop")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path("runs") / "discover" / f"{args.model}-n{args.n}-seed{args.seed}"
    files = [ROOT / out / name for name in ("formulas.csv", "run_config.json", "journal.jsonl")]
    if args.snapshot:
        snapshot_files([p for p in files if p.is_file()], SNAPSHOTS)
        return 0
    if args.resume:
        for path in files:
            restore_file(path, SNAPSHOTS)
    from composition_lm.cli import main as cli

    ensure_mp_union_store(args.templates, args.shared)
    os.chdir(ROOT)  # the command it records names paths relative to the repository, so a reader can rerun it
    argv = ["discover", "--model", args.model, "-n", str(args.n), "--seed", str(args.seed), "--templates",
            os.path.relpath(args.templates, ROOT), *(["--potential", args.potential] if args.potential else []),
            "--workers", str(args.workers), "--no-progress", "-o", str(out),
            # the settings the committed figures were measured with (discover's defaults since: 200 steps, skip 0.15)
            "--max-steps", "500", "--skip-above", "off"]
    t0 = time.perf_counter()
    if cli(argv + (["--resume"] if args.resume else [])) != 0:
        return 1
    wall = time.perf_counter() - t0
    funnel = json.loads((out / "funnel.json").read_text())
    redis = rediscovery(out, args.shared)
    import pandas as pd

    sun = pd.read_csv(out / "sun.csv", keep_default_na=False)
    dest = ROOT / "benchmarks" / f"discover_{args.model}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["report.html", "funnel.json", "sun.csv", *[p.name for p in out.glob("*.png")]]:
        shutil.copyfile(out / name, dest / name)
    meta = {"command": command_line(__file__), "discover": "composition-gen " + " ".join(argv), "cpu": cpu(),
            "machine": platform.platform(), "wall_s_this_call": wall}
    write_json(ROOT / "benchmarks" / f"discover_{args.model}.json", {"meta": meta, "funnel": funnel, "rediscovery": redis})
    key = f"{funnel['e_hull_max']:g}"
    rehulls = (out / "journal.jsonl").read_text().count('"kind": "rehull"')
    lines = [f"# Discovery benchmark: {args.model}, N = {args.n}, seed {args.seed}", "",
             f"Command: `{meta['command']}` (runs `{meta['discover']}`); CPU: {meta['cpu']}.", "",
             f"**SUN per sampled formula: {100 * funnel['sun_rate'][key]:.1f} % at E_hull ≤ {key} eV/atom, "
             f"{100 * funnel['sun_rate']['0']:.1f} % at ≤ 0** (target ≥ 25 % at 0.1); per hour of the funnel's wall "
             f"time ({args.workers} worker processes): {funnel['sun_per_cpu_hour'][key]:.0f} and "
             f"{funnel['sun_per_cpu_hour']['0']:.0f}.", "",
             *([f"Placed on the reference hull again ({rehulls} time(s), `composition-gen discover --rehull`: the "
                "journal's formation energies on the current table, nothing relaxed again) after the table or the funnel's counting changed.",
                ""] if rehulls else []),
             "| stage | samples |", "|---|---:|", *[f"| {k} | {v} |" for k, v in funnel["counts"].items()], "",
             "| stage | seconds |", "|---|---:|", *[f"| {k} | {v:.0f} |" for k, v in funnel["seconds"].items()], "",
             "## The 20 best SUN candidates", "", "| formula | E_hull | E_form | decomposition |", "|---|---:|---:|---|",
             *[f"| {r.formula} | {float(r.e_hull_per_atom):.3f} | {float(r.e_form_per_atom):.3f} | {r.decomposition} |"
               for r in sun.head(20).itertuples()], "",
             "## Rediscovery of held-out MP compounds", "",
             f"{redis['n_test_formulas_generated']} generated formulas belong to MP's held-out test split; "
             f"{redis['n_with_mp20_structure']} have an MP-20 test structure, and the pipeline's structure matches "
             f"MP's for {redis['n_structure_matched']} of them; for those, |E_hull − MP's E_hull| averages "
             + (f"{redis['mae_e_hull_matched']:.3f} eV/atom." if redis["mae_e_hull_matched"] is not None else "n/a."),
             "", "The run's own report (funnel chart, E_hull histogram, hull diagrams): "
             f"[report.html](discover_{args.model}/report.html)."]
    write_text(ROOT / "benchmarks" / f"discover_{args.model}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
