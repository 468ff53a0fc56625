"""Wall time and CPU of `discover --workers 2` on the same formulas with two versions of the code (A/B).

    python scripts/bench_funnel_workers.py run --tree PATH --label NAME [--n 40] [--workers 2] [--repeats 2]
    python scripts/bench_funnel_workers.py report --baseline NAME   # -> benchmarks/funnel_workers.md

``run`` takes the first N formulas of the funnel-speed sample (``runs/funnel_speed/sample/formulas.csv``, Diffusion-BERT
seed 0, restored from ``benchmarks/funnel_speed_runs/``), and runs ``python -m composition_lm.cli discover --from``
them with the code of the git work tree PATH (e.g. a worktree at an older commit), the default stability scheme and
the shipped template store, into a fresh folder per repeat. Each run's wall seconds and CPU seconds (the child and
every worker process it started and waited for) go to ``benchmarks/funnel_workers.jsonl``. Run the versions
alternately on an otherwise idle machine; ``report`` gives min / median / max of each and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import command_line, cpu, restore_file  # noqa: E402

from evaluation.io import append_jsonl, write_text  # noqa: E402

LOG = ROOT / "benchmarks" / "funnel_workers.jsonl"
RUNS = ROOT / "runs" / "funnel_workers"


def _portable(command: str, tree: Path, commit: str) -> str:
    """The command with the work tree named by its commit, not by this machine's path (a reader makes their own
    worktree: git worktree add WORKTREE COMMIT)."""
    return command.replace(str(tree), f"<worktree at {commit}>")


def _formulas(n: int) -> Path:
    sample = ROOT / "runs" / "funnel_speed" / "sample" / "formulas.csv"
    restore_file(sample, ROOT / "benchmarks" / "funnel_speed_runs")
    lines = sample.read_text().splitlines()
    out = RUNS / f"formulas-{n}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[:n + 1]) + "\n")
    return out


def cmd_run(args) -> int:
    formulas = _formulas(args.n)
    tree = args.tree.resolve()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for rep in range(args.repeats):
        out = RUNS / f"{args.label}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "composition_lm.cli", "discover", "--from", str(formulas), "--column", "formula",
               "--workers", str(args.workers), "--no-progress", "-o", str(out)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"{args.label} failed: {proc.stderr[-2000:]}")
        funnel = json.loads((out / "funnel.json").read_text())
        row = {"label": args.label, "commit": commit, "repeat": rep, "n": args.n,
               "workers": args.workers, "wall_s": round(wall, 1),
               "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
               "relaxed": funnel["counts"]["relaxed"], "sun": funnel["counts"]["sun"], "cpu": cpu(),
               "cores": os.cpu_count(), "command": _portable(command_line("bench_funnel_workers.py"), args.tree, commit),
               "when": time.time()}
        append_jsonl(LOG, row)
        print(json.dumps(row), flush=True)
    return 0


def cmd_report(args) -> int:
    rows = [json.loads(line) for line in LOG.read_text().splitlines()]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    base = [r["wall_s"] for r in rows if r["label"] == args.baseline]
    lines = ["# `discover --workers 2`: local worker pool, A/B", "",
             "`python scripts/bench_funnel_workers.py run --tree PATH --label NAME`, then `report --baseline "
             f"{args.baseline}`. CPU: {rows[0]['cpu']}, {rows[0]['cores']} cores, nothing else running. Wall and CPU "
             "seconds of one `discover --workers 2` on the same formulas (default scheme: CHGNet relaxes with "
             "screening, SevenNet-l3i5 judges; shipped template store; elemental references cached beforehand); CPU "
             "includes the worker processes. Ratio: the baseline's median wall over this row's (higher = faster).", "",
             "| label | commit | N formulas | structures | SUN | wall s (min / median / max) | CPU s (min / median / max) "
             "| speed-up vs baseline (median wall) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        wall, cpu_s = [r["wall_s"] for r in mine], [r["cpu_s"] for r in mine]
        ratio = statistics.median(base) / statistics.median(wall) if base else float("nan")
        lines.append(f"| {label} | {mine[0]['commit']} | {mine[0]['n']} | {mine[0]['relaxed']} | {mine[0]['sun']} | "
                     f"{min(wall):.0f} / {statistics.median(wall):.0f} / {max(wall):.0f} | "
                     f"{min(cpu_s):.0f} / {statistics.median(cpu_s):.0f} / {max(cpu_s):.0f} | {ratio:.2f} |")
    write_text(ROOT / "benchmarks" / "funnel_workers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "report"])
    ap.add_argument("--tree", type=Path, default=ROOT)
    ap.add_argument("--label", default="current")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default="before")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report}[args.action](args)


if __name__ == "__main__":
    raise SystemExit(main())
