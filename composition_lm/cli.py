"""The ``composition-gen`` console script: one command, one sub-command per job.

This module sits on top of the three packages and is the only one allowed to import all of them.
Heavy imports happen inside each sub-command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections import Counter
from pathlib import Path

PROTOCOL_CHOICES = ("cdvae", "smact", "both")


def _protocols(choice: str) -> tuple[str, ...]:
    return ("cdvae", "smact") if choice == "both" else (choice,)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``PATH@SPLIT`` -> (PATH, SPLIT); a path that exists as written is taken whole."""
    if "@" in spec and not Path(spec).exists():
        path, split = spec.rsplit("@", 1)
        return path, split
    return spec, None


def _load_spec(spec: str, column: str | None = None) -> tuple[str, list[str]]:
    from composition_lm.data import load_corpus

    path, split = _split_spec(spec)
    ds, report = load_corpus(path, column=column, split=split, dedupe=True)
    name = Path(path).name.split(".")[0] + (f"@{split}" if split else "")
    print(f"  {name}: {report.n_kept} distinct formulas", file=sys.stderr)
    return name, ds["formula"]


# --------------------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from composition_lm.data import iter_rows
    from evaluation.composition import try_parse_formula
    from evaluation.io import atomic_path
    from evaluation.validity import check_formulas

    protocols = _protocols(args.protocol)
    t0 = time.perf_counter()
    rows = []
    for where, raw, payload in iter_rows(args.file, args.column):
        text = payload[0] if isinstance(payload, tuple) else payload
        if text.startswith("!"):
            rows.append((where, raw, None, text[1:]))
            continue
        f, err = try_parse_formula(text) if text.strip() else (None, "empty")
        rows.append((where, raw, f, err))
    if not rows:
        print(f"error: {args.file} holds no entries", file=sys.stderr)
        return 2
    parsed = [r[2] for r in rows if r[2] is not None]
    results = {p: iter(check_formulas(parsed, p, workers=args.workers)) for p in protocols}
    header = ["where", "input", "reduced_formula", "parse_error"]
    for p in protocols:
        header += [f"valid_{p}", f"charge_neutral_{p}", f"electronegativity_ok_{p}", f"reason_{p}"]
    stats = {p: Counter() for p in protocols}
    reasons = {p: Counter() for p in protocols}
    out_rows = []
    for where, raw, f, err in rows:
        line = [where, raw, str(f) if f else "", err]
        for p in protocols:
            if f is None:
                line += [False, False, False, f"unparseable: {err}"]
                reasons[p]["unparseable"] += 1
                continue
            r = next(results[p])
            line += [r.valid, r.charge_neutral, r.electronegativity_ok, r.reason]
            stats[p]["valid"] += r.valid
            if not r.valid:
                reasons[p][r.reason.split(":")[0]] += 1
        out_rows.append(line)

    def dump(fh):
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(out_rows)

    if args.output:
        with atomic_path(args.output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            dump(fh)
    else:
        dump(sys.stdout)
    dt = time.perf_counter() - t0
    n = len(rows)
    err = sys.stderr
    print(f"{n} entries, {len(parsed)} parsed, {len(set(parsed))} distinct formulas ({dt:.1f} s)", file=err)
    for p in protocols:
        print(f"  {p:6s} valid: {stats[p]['valid']}/{n} = {stats[p]['valid'] / n:.3f}", file=err)
        for reason, k in reasons[p].most_common(4):
            print(f"         {k:7d}  {reason}", file=err)
    if args.output:
        print(f"wrote {args.output}", file=err)
    return 0


# --------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from composition_lm.data import iter_rows
    from evaluation.metrics import formula_set_metrics
    from evaluation.report import write_report

    samples = []
    for _, _, payload in iter_rows(args.generated, args.column):
        text = payload[0] if isinstance(payload, tuple) else payload
        samples.append("" if text.startswith("!") else text)
    if not samples:
        print(f"error: {args.generated} holds no samples", file=sys.stderr)
        return 2
    print(f"{len(samples)} generated samples from {args.generated}", file=sys.stderr)
    train = _load_spec(args.train, args.train_column)[1] if args.train else None
    heldout = dict(_load_spec(s, args.train_column) for s in args.heldout or [])
    if args.reference:
        reference = _load_spec(args.reference, args.train_column)[1]
        ref_name = args.reference
    elif heldout:
        ref_name, reference = next(iter(heldout.items()))
    else:
        ref_name, reference = None, None
    metrics = formula_set_metrics(samples, train, heldout, reference, _protocols(args.protocol))
    sources = {"generated": str(args.generated), "train": args.train, "heldout": args.heldout, "reference": ref_name}
    files = write_report(metrics, args.output, title=args.title or f"Metrics of {Path(args.generated).name}",
                         sources=sources, plots=not args.no_plots)
    from evaluation.report import metrics_table

    print(metrics_table({Path(args.generated).name: metrics}))
    print(f"wrote {', '.join(files)} to {args.output}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composition-gen",
        description="Propose inorganic compositions with diffusion language models, check their chemistry, "
        "and score generated sets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("--workers", type=int, default=None, help="processes for large files (default: all cores)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:  # CorpusError, FormulaError, bad protocol, ...
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
