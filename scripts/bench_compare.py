"""The committed comparison reports: `composition-gen compare` on Perov-5 or MP-20 with N = 1,000.

    python scripts/bench_compare.py --dataset perov5 --relax
    python scripts/bench_compare.py --dataset mp20
    python scripts/bench_compare.py --dataset mp20 --relax --no-coverage --workers 2 --out-name compare_mp20_sun

Runs the compare command into runs/compare/<dataset> (the generators' structures, the template store and
the fingerprint cache stay there: they are derived from ../shared and not committed) and copies the report
(report.md, report.html, metrics.json, PNG plots) to benchmarks/compare_<dataset>/, with the command that
regenerated it and the whole command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import EXE, command_line  # noqa: E402

from evaluation.io import atomic_path, write_json, write_text  # noqa: E402

DATASETS = {  # folder under data/structures, split the templates come from, shipped CDVAE
    "perov5": ("perov_5", "val", "cdvae-perov5"),
    "mp20": ("mp_20", "train", "cdvae-mp20"),
}
REPORT_FILES = ("report.md", "report.html", "metrics.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm", action="append", help="formula models (default: diffusion-bert and diffusion-lm)")
    ap.add_argument("--cdvae", help="CDVAE model (default: the dataset's shipped one)")
    ap.add_argument("--relax", action="store_true", help="relax both paths (with --potential)")
    ap.add_argument("--potential", default=None,
                    help="compare's --potential (default: the package's default potential; the seed benchmarks used "
                    "../shared/models/matgl/M3GNet-MP-2021.2.8-PES)")
    ap.add_argument("--relax-max-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1, help="relaxation and fingerprint processes (default: 1)")
    ap.add_argument("--no-coverage", action="store_true", help="skip COV-R / COV-P (no fingerprints)")
    ap.add_argument("--optimizer", default="FIRE", help="relaxation optimizer (default: FIRE)")
    ap.add_argument("--out-name", help="folder under benchmarks/ (default: compare_<dataset>)")
    args = ap.parse_args()

    folder, train_split, cdvae = DATASETS[args.dataset]
    work = ROOT / "runs" / "compare" / (args.out_name or args.dataset)

    def rel(path: Path) -> str:  # the command runs in ROOT: relative paths keep the committed report portable
        return os.path.relpath(path, ROOT)

    cmd = ["compare", "--dataset", rel(args.shared / "data/structures" / folder), "--train-split", train_split]
    for lm in args.lm or ["diffusion-bert", "diffusion-lm"]:
        cmd += ["--lm", lm]
    cmd += ["--cdvae", args.cdvae or cdvae, "-n", str(args.n), "--seed", str(args.seed), "--workers", str(args.workers),
            "--cache", rel(ROOT / "runs/cdvae/fingerprints"), "--no-progress", "-o", rel(work)]
    if args.relax:
        cmd += ["--relax", "--max-steps", str(args.relax_max_steps), "--optimizer", args.optimizer]
        if args.potential:
            cmd += ["--potential", rel(Path(args.potential)) if Path(args.potential).exists() else args.potential]
    if args.no_coverage:
        cmd.append("--no-coverage")
    print("composition-gen " + shlex.join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run([*EXE, *cmd], check=True, cwd=ROOT)
    seconds = time.perf_counter() - t

    dest = ROOT / "benchmarks" / (args.out_name or f"compare_{args.dataset}")
    dest.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((work / "metrics.json").read_text())
    names = [*REPORT_FILES, *sorted(p.name for p in work.glob("*.png"))]
    for name in names:
        if name == "metrics.json":
            metrics["benchmark"] = {"command": command_line(__file__), "seconds_whole_command": seconds}
            write_json(dest / name, metrics)
        elif name == "report.md":
            text = (work / name).read_text()
            write_text(dest / name, text + f"\nRegenerate this folder: `{command_line(__file__)}` "
                       f"(whole compare command: {seconds:.0f} s on this machine).\n")
        else:
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(work / name, tmp)
    print(f"wrote {', '.join(names)} to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
