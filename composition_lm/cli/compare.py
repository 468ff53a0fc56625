"""``composition-gen compare``: formula LM + templates against CDVAE on one dataset, with one metric suite: the
options of :func:`composition_lm.workflows.compare.compare`, which holds the logic, and its summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from composition_lm.cli.options import (add_correction_argument, add_progress, add_relax_arguments, command_line,
                                        positive_int, quiet_console, relax_settings)


def cmd_compare(args: argparse.Namespace) -> int:
    from evaluation.compare import summary_rows

    from composition_lm.workflows.compare import CompareOptions, RelaxOptions, compare

    relax = (RelaxOptions(potential=args.potential, judges=args.judge, correction=args.correction,
                          settings=relax_settings(args), reference=args.reference) if args.relax else None)
    if relax is not None:
        quiet_console()
    result = compare(CompareOptions(
        dataset=args.dataset, output=args.output, lms=args.lm or [], cdvae=args.cdvae, n=args.n, seed=args.seed,
        train_split=args.train_split, test_split=args.test_split, templates=args.templates, relax=relax,
        references=args.references, cov_dataset=args.cov_dataset, compscaler=args.compscaler, cache=args.cache,
        coverage=not args.no_coverage, plots=not args.no_plots, workers=args.workers, progress=not args.no_progress,
        command=command_line(args)))
    names, rows = summary_rows(result)
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{n:>18}" for n in names))
    for label, vals in rows:
        print(f"{label:{width}}  " + "  ".join(f"{v:>18}" for v in vals))
    print(f"wrote {', '.join(result['paths'])} and each generator's outputs to {args.output}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare formula-LM + templates against CDVAE on one dataset, with one metric suite",
        description="Run every generator with the same budget of N samples: each --lm samples formulas, drops "
        "invalid ones and takes a template structure from the dataset's training split; --cdvae samples whole "
        "crystals; --relax relaxes both with an interatomic potential (--potential). Score them all with the "
        "metrics of `evaluate` and "
        "`evaluate-structures` against the test split, plus structure uniqueness/novelty, energies and wall time "
        "per valid structure. Writes OUTPUT/report.md, a self-contained report.html, metrics.json, plots and "
        "each generator's outputs (OUTPUT/<generator>/structures.csv, structures_cif.zip, structures.extxyz).")
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR",
                   help="folder of CDVAE-style <split>.csv(.gz) files with a cif column (e.g. ../shared/data/structures/mp_20)")
    p.add_argument("--train-split", default="train",
                   help="split that gives the templates and the novelty reference (default: train; Perov-5: val)")
    p.add_argument("--test-split", default="test", help="split the metrics compare against (default: test)")
    p.add_argument("--lm", action="append", metavar="MODEL",
                   help="formula language model: folder, shipped name (diffusion-bert, diffusion-lm) or hub id; repeatable")
    p.add_argument("--cdvae", metavar="MODEL", help="CDVAE model folder or shipped name (cdvae-perov5, cdvae-mp20)")
    p.add_argument("-n", **positive_int, default=1000, help="samples per generator (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator (default: 0)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="a template store built from the training split (default: build one into OUTPUT/templates, "
                   "or reuse it when there)")
    add_relax_arguments(p)
    add_correction_argument(p)
    p.add_argument("--reference", type=Path, metavar="TABLE",
                   help="with --relax: reference hull for E_hull and the SUN rate (default: the shipped MP table)")
    p.add_argument("--cov-dataset", choices=["mp20", "perov5", "carbon24"],
                   help="COV cut-offs to use (default: guessed from the --dataset path, else mp20)")
    p.add_argument("--compscaler", type=Path, help="CDVAE's Magpie constants (default: the copy shipped in the package)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="fingerprint cache of the test structures (default: .fingerprint_cache beside OUTPUT)")
    p.add_argument("--no-coverage", action="store_true",
                   help="skip the CrystalNN / Magpie fingerprints: no COV-R / COV-P (their test-set fingerprints cost "
                   "about 0.05-0.5 s per structure on first use), everything else as usual")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (the HTML then has tables only)")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_compare)
