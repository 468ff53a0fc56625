"""``composition-gen validate`` and ``composition-gen evaluate``: the chemistry and the metrics of formula sets."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from composition_lm.cli.options import PROTOCOL_CHOICES, load_spec, positive_int, protocols


def cmd_validate(args: argparse.Namespace) -> int:
    from composition_lm.data import entry_text, iter_rows
    from evaluation.io import write_csv
    from evaluation.validity import validate

    chosen = protocols(args.protocol)
    t0 = time.perf_counter()
    where, raws, texts, errors = [], [], [], []
    for w, raw, payload in iter_rows(args.file, args.column):
        text, _, error = entry_text(payload)
        where.append(w)
        raws.append(raw)
        texts.append(text)
        errors.append(error)
    if not texts:
        print(f"error: {args.file} holds no entries", file=sys.stderr)
        return 2
    table = validate(texts, chosen, workers=args.workers, errors=errors)
    table["input"] = raws
    table.insert(0, "where", where)
    write_csv(args.output or sys.stdout, list(table.columns), table.itertuples(index=False, name=None))
    n = len(table)
    parsed = table.loc[table["reduced_formula"] != "", "reduced_formula"]
    err = sys.stderr
    print(f"{n} entries, {len(parsed)} parsed, {parsed.nunique()} distinct formulas ({time.perf_counter() - t0:.1f} s)",
          file=err)
    for p in chosen:
        valid = int(table[f"valid_{p}"].sum())
        print(f"  {p:6s} valid: {valid}/{n} = {valid / n:.3f}", file=err)
        reasons = Counter(r.split(":")[0] for r, ok in zip(table[f"reason_{p}"], table[f"valid_{p}"]) if not ok)
        for reason, k in reasons.most_common(4):
            print(f"         {k:7d}  {reason}", file=err)
    if args.output:
        print(f"wrote {args.output}", file=err)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from composition_lm.data import read_samples
    from evaluation.metrics import formula_set_metrics
    from evaluation.report import metrics_table, write_report

    samples = read_samples(args.generated, args.column)
    if not samples:
        print(f"error: {args.generated} holds no samples", file=sys.stderr)
        return 2
    print(f"{len(samples)} generated samples from {args.generated}", file=sys.stderr)
    train = load_spec(args.train, args.train_column)[1] if args.train else None
    heldout = dict(load_spec(s, args.train_column) for s in args.heldout or [])
    if args.reference:
        reference = load_spec(args.reference, args.train_column)[1]
        ref_name = args.reference
    elif heldout:
        ref_name, reference = next(iter(heldout.items()))
    else:
        ref_name, reference = None, None
    metrics = formula_set_metrics(samples, train, heldout, reference, protocols(args.protocol))
    sources = {"generated": str(args.generated), "train": args.train, "heldout": args.heldout, "reference": ref_name}
    files = write_report(metrics, args.output, title=args.title or f"Metrics of {Path(args.generated).name}",
                         sources=sources, plots=not args.no_plots)
    print(metrics_table({Path(args.generated).name: metrics}))
    print(f"wrote {', '.join(files)} to {args.output}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check charge neutrality and electronegativity balance of every formula in a file",
        description="SMACT validity of every formula in FILE (text: one per line; CSV/TSV/JSON/parquet with "
        "--column; Dong et al. prefix format; CDVAE CSVs with a cif column; .gz allowed). Writes one row per "
        "input with the reduced formula, the flags and a reason for each failure, and prints a summary.",
    )
    p.add_argument("file", type=Path, help="formula file")
    p.add_argument("--column", help="formula column of a table (default: formula, reduced_formula, ... or cif)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both",
                   help="cdvae: CDVAE's smact_validity rule; smact: smact.screening.smact_validity defaults "
                   "(default: both)")
    p.add_argument("--workers", **positive_int, default=None, help="processes for large files (default: all cores)")
    p.add_argument("-o", "--output", type=Path, help="output CSV (default: standard output)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "evaluate",
        help="score a generated formula set: validity, uniqueness, novelty, recovery, distribution distances",
        description="Metrics of GENERATED against training and held-out corpora. Corpus arguments take "
        "PATH or PATH@SPLIT (rows whose split column equals SPLIT, e.g. mp_formulas.csv@train). Writes "
        "metrics.json, summary.md and PNG plots to -o DIR.",
    )
    p.add_argument("generated", type=Path, help="generated formulas (any corpus format; unparseable rows count)")
    p.add_argument("--column", help="formula column of GENERATED")
    p.add_argument("--train", help="training corpus, for novelty and recovery (PATH[@SPLIT])")
    p.add_argument("--heldout", action="append", help="held-out corpus for recovery (PATH[@SPLIT]); repeatable")
    p.add_argument("--reference", help="reference set for distribution distances (default: first --heldout)")
    p.add_argument("--train-column", help="formula column of the corpora (default: auto)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both", help="validity protocol(s)")
    p.add_argument("--title", help="title of summary.md")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_evaluate)
