"""Relaxation throughput of `structure.relax.relax_many`: structures/minute with 1 and 2 worker processes.

Run: python scripts/bench_relax.py [--n 20] [--seed 0] [--workers-list 1,2]
A fixed, seeded subset of mp_20 test structures, each rattled (seeded Gaussian displacements) so FIRE has
work to do, is relaxed once per worker count in the same run. Wall time covers the whole `relax_many`
call, so for worker counts > 1 it includes starting the spawned pool (importing torch and matgl and
loading the potential in every worker). The potential is loaded in this process before any timing.
Writes benchmarks/relax_workers.json and benchmarks/relax_workers.md (or under --out).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json, write_text  # noqa: E402

DEFAULT_POTENTIAL = ROOT.parent / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "structures" / "mp_20" / "test.csv.gz"
STATUSES = ("converged", "not_converged", "failed")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="structures in the subset (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subset and of the rattling (default 0)")
    ap.add_argument("--potential", default=str(DEFAULT_POTENTIAL), help="matgl model folder or hub name")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a `cif` column (mp_20 test)")
    ap.add_argument("--workers-list", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default 0.05)")
    ap.add_argument("--max-steps", type=int, default=300, help="FIRE step limit (default 300)")
    ap.add_argument("--rattle", type=float, default=0.05, help="std of the atomic displacements, Å (default 0.05)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="output folder (default benchmarks/)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args()


def load_subset(path: Path, n: int, seed: int, rattle: float) -> tuple[list, list[str]]:
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


def machine_info() -> dict:
    import matgl
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "matgl": matgl.__version__,
        "torch_threads_main_process_default": torch.get_num_threads(),  # relax_many itself relaxes with 1
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def time_workers(structures: list, args: argparse.Namespace, workers: int) -> tuple[dict, list]:
    """One timed `relax_many` call; its summary row and the results."""
    from structure.relax import relax_many

    load = os.getloadavg()[0]
    start = time.perf_counter()
    results = relax_many(
        structures, args.potential, fmax=args.fmax, max_steps=args.max_steps, workers=workers,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - start
    counts = collections.Counter(r.status for r in results)
    row = {
        "workers": workers,
        "wall_s": round(wall, 2),
        "structures_per_min": round(60 * len(structures) / wall, 2),
        "statuses": {s: counts.get(s, 0) for s in STATUSES},
        "fire_steps": sum(r.steps for r in results),
        "load_average_1min_before": round(load, 2),
    }
    print(f"workers={workers}: {wall:.1f} s, {row['structures_per_min']} structures/min, {row['statuses']}", flush=True)
    return row, results


def max_energy_difference(a: list, b: list) -> float | None:
    """Largest |ΔE/atom| between two runs over structures relaxed (not failed) in both; None if none."""
    diffs = [abs(x.energy_per_atom - y.energy_per_atom) for x, y in zip(a, b) if "failed" not in (x.status, y.status)]
    return max(diffs) if diffs else None


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Relaxation throughput: `relax_many` with 1 vs 2 workers",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{s['n']} mp_20 test structures (seed {s['seed']}, rattled σ = {s['rattle_A']} Å), FIRE with cell "
        f"relaxation, fmax {s['fmax']} eV/Å, at most {s['max_steps']} steps, potential `{s['potential']}`. "
        "Wall time is the whole `relax_many` call; with workers > 1 it includes starting the spawned pool (imports "
        "and one potential load per worker). Workers run single-threaded (torch, OpenMP, BLAS) and so does the "
        "relaxation in the main process (workers = 1, one torch thread), so the speed-up is parallelism alone.",
        "",
        "| workers | wall (s) | structures/min | converged | not converged | failed | speed-up vs 1 worker |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["runs"]:
        st = row["statuses"]
        speedup = row.get("speedup_vs_1_worker")
        lines.append(
            f"| {row['workers']} | {row['wall_s']} | {row['structures_per_min']} | {st['converged']} | "
            f"{st['not_converged']} | {st['failed']} | {'' if speedup is None else speedup} |"
        )
    diff = report["max_energy_diff_eV_per_atom"]
    lines += ["", f"Largest energy difference between worker counts: {diff} eV/atom.", "", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    from structure.relax import load_potential

    worker_counts = [int(w) for w in args.workers_list.split(",")]
    structures, ids = load_subset(args.data, args.n, args.seed, args.rattle)
    load_potential(args.potential)  # loaded (and cached) before any timing
    runs, results = [], []
    for workers in worker_counts:
        row, res = time_workers(structures, args, workers)
        runs.append(row)
        results.append(res)
    base = next((r["wall_s"] for r in runs if r["workers"] == 1), None)
    for row in runs:
        row["speedup_vs_1_worker"] = None if base is None else round(base / row["wall_s"], 2)
    diffs = [max_energy_difference(results[0], res) for res in results[1:]]
    report = {
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "settings": {
            "n": len(structures), "seed": args.seed, "rattle_A": args.rattle, "fmax": args.fmax,
            "max_steps": args.max_steps, "potential": args.potential, "data": str(args.data), "material_ids": ids,
        },
        "runs": runs,
        "max_energy_diff_eV_per_atom": max((d for d in diffs if d is not None), default=None),
        "machine": machine_info(),
    }
    write_json(args.out / "relax_workers.json", report)
    write_text(args.out / "relax_workers.md", markdown(report))
    print(f"wrote {args.out / 'relax_workers.json'} and {args.out / 'relax_workers.md'}")


if __name__ == "__main__":
    main()
