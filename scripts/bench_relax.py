"""Relaxation throughput against matgl's own `Relaxer`, one process, measured in the same run.

Run: python scripts/bench_relax.py [--n 32] [--n-templates 24] [--repeats 3] [--seed 0]
         [--configs fire:w1,fire:w1:b16,fire:w2:b16,lbfgs:w1:b16,lbfgs:w2:b16]

Two structure sets, both fixed by the seed:
  rattled    mp_20 test structures with seeded Gaussian displacements (near a minimum: few steps each);
  templates  the funnel's real input: top-1 template structures (shipped compact store) for formulas that the
             shipped Diffusion-BERT samples with the seed (far from a minimum: many steps each).
The baseline is `structure.relax.relax_structure` called one structure at a time in this process: it runs
`matgl.ext.ase.Relaxer` (ASE FIRE on a FrechetCellFilter) with one torch thread. Each repeat times the baseline
and then every configuration of `structure.relax.relax_many` (`optimizer:wWORKERS:bBATCH`) on the same set, so
every speed-up is a ratio within one repeat; the table gives min / median / max over repeats. Wall time covers
the whole call, pool start-up included. Energies are compared with the baseline's per structure: median, 90th
percentile and largest |ΔE| (meV/atom) over structures relaxed in both, and how many ended lower / higher by more
than 2 meV/atom. Writes benchmarks/relax.json and benchmarks/relax.md (or under --out); each finished timing is
appended to relax_log.jsonl there as it ends.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import command_line, cpu  # noqa: E402

from evaluation.io import write_json, write_text  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_POTENTIAL = SHARED / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
DEFAULT_DATA = SHARED / "data" / "structures" / "mp_20" / "test.csv.gz"
STATUSES = ("converged", "not_converged", "failed")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="rattled mp_20 test structures (default 32; 0 to skip)")
    ap.add_argument("--n-templates", type=int, default=24,
                    help="template structures of sampled formulas (default 24; 0 to skip)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of every configuration (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsets, rattling and sampling (default 0)")
    ap.add_argument("--configs", default="fire:w1,fire:w1:b16,fire:w2:b16,lbfgs:w1:b16,lbfgs:w2:b16",
                    help="relax_many configurations OPTIMIZER[:wWORKERS][:bBATCH], comma-separated")
    ap.add_argument("--potential", default=str(DEFAULT_POTENTIAL), help="matgl model folder or hub name")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a `cif` column (mp_20 test)")
    ap.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default 0.05)")
    ap.add_argument("--max-steps", type=int, default=500, help="optimizer step limit (default 500)")
    ap.add_argument("--rattle", type=float, default=0.05, help="std of the atomic displacements, Å (default 0.05)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="output folder (default benchmarks/)")
    return ap.parse_args()


def parse_config(text: str) -> dict:
    """``lbfgs:w2:b16`` -> optimizer LBFGS, 2 workers, batch 16 (defaults: 1 worker, batch 1)."""
    parts = text.strip().split(":")
    config = {"name": text.strip(), "optimizer": parts[0].upper(), "workers": 1, "batch_size": 1}
    for part in parts[1:]:
        key = {"w": "workers", "b": "batch_size"}.get(part[:1])
        if key is None or not part[1:].isdigit():
            raise SystemExit(f"bad configuration part {part!r} in {text!r} (use wN or bN)")
        config[key] = int(part[1:])
    return config


def rattled_set(path: Path, n: int, seed: int, rattle: float) -> tuple[list, list[str]]:
    """``n`` structures picked with ``seed`` (in file order), rattled with the same seed; and their ids."""
    import numpy as np
    import pandas as pd
    from pymatgen.core import Structure

    frame = pd.read_csv(path, usecols=["material_id", "cif"])
    rng = np.random.default_rng(seed)
    rows = frame.iloc[np.sort(rng.choice(len(frame), size=min(n, len(frame)), replace=False))]
    structures = []
    for cif in rows["cif"]:
        s = Structure.from_str(cif, fmt="cif")
        moved = s.cart_coords + rng.normal(0.0, rattle, size=(len(s), 3))
        structures.append(Structure(s.lattice, s.species, moved, coords_are_cartesian=True))
    return structures, rows["material_id"].tolist()


def template_set(n: int, seed: int) -> tuple[list, list[str]]:
    """Top-1 template structures (shipped store) of the first ``n`` formulas with one, sampled from the
    shipped Diffusion-BERT with ``seed``."""
    from composition_lm import FormulaGenerator
    from structure import StructurePredictor

    formulas = list(FormulaGenerator.from_pretrained("diffusion-bert").generate(3 * n, seed=seed)["formula"])
    rows = [r for r in StructurePredictor().predict(formulas, top_k=1) if r.structure is not None][:n]
    return [r.structure for r in rows], [f"{r.formula} <- {r.template_id}" for r in rows]


def timed(label: str, fn, log: Path) -> tuple[float, list]:
    start = time.perf_counter()
    results = fn()
    wall = time.perf_counter() - start
    with log.open("a") as fh:  # appended as it ends: a killed run keeps what it measured
        fh.write(json.dumps({"label": label, "wall_s": wall, "load_1min": os.getloadavg()[0]}) + "\n")
    print(f"{label}: {wall:.1f} s", flush=True)
    return wall, results


def energy_agreement(base: list, other: list) -> dict:
    """|ΔE| (meV/atom) between two result lists over structures relaxed (not failed) in both."""
    import numpy as np

    pairs = [(a.energy_per_atom, b.energy_per_atom) for a, b in zip(base, other)
             if "failed" not in (a.status, b.status)]
    if not pairs:
        return {"n": 0}
    d = 1000 * (np.array([b for _, b in pairs]) - np.array([a for a, _ in pairs]))
    return {"n": len(pairs), "median_abs_meV": round(float(np.median(np.abs(d))), 3),
            "p90_abs_meV": round(float(np.percentile(np.abs(d), 90)), 2),
            "max_abs_meV": round(float(np.abs(d).max()), 2),
            "lower_by_2meV": int((d < -2).sum()), "higher_by_2meV": int((d > 2).sum())}


def run_set(name: str, structures: list, configs: list[dict], args: argparse.Namespace, log: Path) -> dict:
    import torch

    from structure.relax import load_potential, relax_many, relax_structure

    potential = load_potential(args.potential)

    def baseline() -> list:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [relax_structure(s, potential, fmax=args.fmax, max_steps=args.max_steps) for s in structures]
        finally:
            torch.set_num_threads(threads)

    walls: dict[str, list[float]] = collections.defaultdict(list)
    ratios: dict[str, list[float]] = collections.defaultdict(list)
    results: dict[str, list] = {}
    for repeat in range(args.repeats):
        base_wall, results["relaxer"] = timed(f"{name} repeat {repeat} matgl Relaxer", baseline, log)
        walls["relaxer"].append(base_wall)
        for c in configs:
            wall, results[c["name"]] = timed(
                f"{name} repeat {repeat} {c['name']}",
                lambda c=c: relax_many(structures, args.potential, fmax=args.fmax, max_steps=args.max_steps,
                                       workers=c["workers"], optimizer=c["optimizer"], batch_size=c["batch_size"],
                                       progress=False), log)
            walls[c["name"]].append(wall)
            ratios[c["name"]].append(base_wall / wall)
    rows = []
    for label in ["relaxer", *[c["name"] for c in configs]]:
        res = results[label]
        counts = collections.Counter(r.status for r in res)
        rows.append({
            "config": label,
            "wall_s": spread(walls[label]),
            "structures_per_min_median": round(60 * len(structures) / sorted(walls[label])[len(walls[label]) // 2], 1),
            "speedup": spread(ratios[label]) if label in ratios else None,
            "steps": sum(r.steps for r in res),
            "statuses": {s: counts.get(s, 0) for s in STATUSES},
            "energy_vs_relaxer": energy_agreement(results["relaxer"], res),
        })
    return {"n": len(structures), "atoms": sum(len(s) for s in structures), "rows": rows}


def spread(values: list[float]) -> dict:
    v = sorted(values)
    return {"min": round(v[0], 2), "median": round(v[len(v) // 2], 2), "max": round(v[-1], 2)}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Relaxation throughput against matgl's `Relaxer`",
        "",
        f"Command: `{report['command']}`",
        "",
        f"CPU: {report['cpu']}; {report['cpus']} usable cores. fmax {s['fmax']} eV/Å, at most {s['max_steps']} steps, "
        f"cell and positions relaxed (FrechetCellFilter), potential `{s['potential']}`. Baseline `relaxer`: "
        "`matgl.ext.ase.Relaxer` (FIRE) one structure at a time in one process with one torch thread. "
        "`OPT:wW:bB` = `relax_many(optimizer=OPT, workers=W, batch_size=B)`; workers are single-threaded processes "
        "and their start-up is inside the wall time. Speed-up = baseline wall / configuration wall in the same "
        f"repeat, min / median / max over {s['repeats']} repeats. |ΔE| against the baseline's energy per structure.",
    ]
    for name, block in report["sets"].items():
        lines += ["", f"## {name}: {block['n']} structures, {block['atoms']} atoms", "",
                  "| configuration | wall s (median) | structures/min | speed-up min / median / max | steps | "
                  "converged / not / failed | median / p90 / max abs dE (meV/atom) | lower / higher by > 2 meV |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in block["rows"]:
            sp, e, st = row["speedup"], row["energy_vs_relaxer"], row["statuses"]
            speed = "1 (baseline)" if sp is None else f"{sp['min']:.2f} / **{sp['median']:.2f}** / {sp['max']:.2f}"
            lines.append(
                f"| {row['config']} | {row['wall_s']['median']} | {row['structures_per_min_median']} | {speed} | "
                f"{row['steps']} | {st['converged']} / {st['not_converged']} / {st['failed']} | "
                f"{e.get('median_abs_meV')} / {e.get('p90_abs_meV')} / {e.get('max_abs_meV')} | "
                f"{e.get('lower_by_2meV')} / {e.get('higher_by_2meV')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    from structure.relax import load_potential

    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "relax_log.jsonl"
    load_potential(args.potential)  # loaded (and cached) before any timing
    sets = {}
    if args.n > 0:
        structures, ids = rattled_set(args.data, args.n, args.seed, args.rattle)
        sets["rattled"] = (structures, ids)
    if args.n_templates > 0:
        sets["templates"] = template_set(args.n_templates, args.seed)
    report = {
        "command": command_line(__file__),
        "cpu": cpu(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "settings": {"fmax": args.fmax, "max_steps": args.max_steps, "repeats": args.repeats, "seed": args.seed,
                     "rattle_A": args.rattle, "potential": os.path.relpath(args.potential, ROOT),
                     "ids": {name: ids for name, (_, ids) in sets.items()}},
        "sets": {},
    }
    for name, (structures, _) in sets.items():
        report["sets"][name] = run_set(name, structures, configs, args, log)
        write_json(args.out / "relax.json", report)
        write_text(args.out / "relax.md", markdown(report))
    print(f"wrote {args.out / 'relax.json'} and {args.out / 'relax.md'}")


if __name__ == "__main__":
    main()
