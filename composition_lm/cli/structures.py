"""``composition-gen templates``, ``structure`` and ``evaluate-structures``: formulas to crystal structures, and
the scoring of generated structures."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

from composition_lm.cli.options import add_progress, add_relax_arguments, positive_int, relaxer


# -------------------------------------------------------------------------------------- templates
def cmd_templates_build(args: argparse.Namespace) -> int:
    from structure.io import read_structures
    from structure.templates import TemplateStore

    exclude_ids: list[str] = []
    if args.exclude_ids:
        exclude_ids = [ln.strip() for ln in Path(args.exclude_ids).read_text().splitlines() if ln.strip()]
    t0 = time.perf_counter()
    store = TemplateStore.build(read_structures(args.source), exclude_ids=exclude_ids, exclude_tags=args.exclude_tag or (),
                                source=str(args.source), progress=not args.no_progress)
    store.save(args.output)
    skipped = ", ".join(f"{n} {why}" for why, n in store.meta["skipped"].items() if n) or "none"
    print(f"{len(store)} templates ({len(store.ratio_keys())} ratio keys) written to {args.output} in "
          f"{time.perf_counter() - t0:.0f} s; skipped: {skipped}")
    if args.train_ranker:
        return _train_ranker(store, args)
    print("next: composition-gen templates train-ranker " + str(args.output))
    return 0


def _train_ranker(store, args: argparse.Namespace) -> int:
    from structure.descriptors import BASIC_PROPERTIES, PROPERTIES
    from structure.ranking import RankerConfig, prototype_folds, train_ranker

    config = RankerConfig(properties=list(BASIC_PROPERTIES if args.properties == "basic" else PROPERTIES),
                          template_features=not args.no_template_features, loss=args.loss)
    holdout = prototype_folds(store, 5, args.holdout_fold) if args.holdout_fold is not None else frozenset()
    ranker = train_ranker(store, config, seed=args.seed, epochs=args.epochs, n_queries=args.queries,
                          holdout_prototypes=holdout, progress=not args.no_progress)
    ranker.save(args.ranker_output or store.path)
    t = ranker.config.trained
    nan = float("nan")
    print(f"ranker trained on {t['n_lists_used']} labelled queries ({t['n_pairs']} pairs) in {t['seconds']:.0f} s; on "
          f"{t.get('heldout_n', 0)} held-out queries: top-1 {t.get('heldout_top1', nan):.3f} (plain distance "
          f"{t.get('heldout_top1_plain_distance', nan):.3f}), top-10 {t.get('heldout_top10', nan):.3f} (plain "
          f"{t.get('heldout_top10_plain_distance', nan):.3f})")
    if "heldout_prototypes_n" in t:
        print(f"on {t['heldout_prototypes_n']} queries of {len(holdout)} held-out prototypes: top-1 "
              f"{t['heldout_prototypes_top1']:.3f} (plain {t['heldout_prototypes_top1_plain_distance']:.3f})")
    print(f"saved in {args.ranker_output or store.path}")
    return 0


def cmd_templates_train_ranker(args: argparse.Namespace) -> int:
    from structure.templates import TemplateStore

    return _train_ranker(TemplateStore.load(args.store), args)


# -------------------------------------------------------------------------------------- structure
def cmd_structure(args: argparse.Namespace) -> int:
    from composition_lm.data import read_samples
    from structure import StructurePredictor
    from structure.io import write_outputs

    formulas = read_samples(args.formulas, args.column, keep_errors=True)
    if not formulas:
        raise ValueError(f"{args.formulas} holds no formulas")
    if args.templates is None:
        print("no --templates given: using the compact Materials Project store shipped in the package (build a "
              "larger one with `composition-gen templates build`)", file=sys.stderr)
    predictor = StructurePredictor(args.templates, ranker=args.ranker, ranking=args.ranking,
                                   group_types=args.group_types)
    relax = relaxer(args, references=predictor.store)
    rows = predictor.predict(formulas, top_k=args.top_k, include_invalid=args.include_invalid, seed=args.seed,
                             progress=not args.no_progress)
    if relax is not None:
        relax.relax_rows(rows, workers=args.workers, progress=not args.no_progress)
    paths = write_outputs(rows, args.output)
    status = Counter(r.status for r in rows)
    n_formulas = len({r.index for r in rows})
    print(f"{n_formulas} formulas -> {sum(r.structure is not None for r in rows)} structures "
          f"({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# ---------------------------------------------------------------------------- evaluate-structures
def cmd_evaluate_structures(args: argparse.Namespace) -> int:
    from evaluation.structures import COV_CUTOFFS, DEFAULT_COMPSCALER, evaluate_structures, write_structure_report
    from structure.io import read_generated_structures, read_structures

    from evaluation.structures import infer_dataset

    dataset = args.dataset or infer_dataset(args.test) or "mp20"
    if args.dataset is None:
        print(f"dataset: {dataset} (from the --test path; set --dataset to choose)", file=sys.stderr)
    compscaler = None
    if not args.no_coverage:
        compscaler = args.compscaler or DEFAULT_COMPSCALER
        if not compscaler.is_file():
            raise FileNotFoundError(f"--compscaler: no file at {compscaler}")
    if not args.test.exists():
        raise FileNotFoundError(f"--test: no reference structures at {args.test}")
    generated, source = read_generated_structures(args.generated)
    if not generated:
        raise ValueError(f"{args.generated} holds no structures")
    reference = [r.structure for r in itertools.islice(read_structures(args.test), args.limit_test)]
    if not reference:
        raise ValueError(f"{args.test} holds no structures")
    n_bad = sum(s is None for s in generated)
    print(f"{len(generated)} generated structures from {source}" + (f" ({n_bad} unreadable)" if n_bad else "")
          + f"; {len(reference)} reference structures from {args.test}", file=sys.stderr)
    cache = None if args.no_cache else (args.cache or args.output.resolve().parent / ".fingerprint_cache")
    metrics = evaluate_structures(generated, reference, dataset=dataset, compscaler=compscaler, workers=args.workers,
                                  cache_dir=cache, progress=not args.no_progress,
                                  coverage_metrics=not args.no_coverage)
    sources = {"generated": source, "test": str(args.test), "limit_test": args.limit_test,
               "compscaler": str(compscaler) if compscaler else None, "fingerprint_cache": str(cache) if cache else None}
    files = write_structure_report(metrics, args.output, title=args.title or f"Structure metrics of "
                                   f"{args.generated.name}", sources=sources, plots=not args.no_plots)

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    cut = COV_CUTOFFS.get(dataset)
    print(f"struct valid {pct(metrics['struct_validity'])}  comp valid {pct(metrics['comp_validity'])}  "
          f"valid {pct(metrics['validity'])}  COV-R {pct(metrics['cov_recall'])}  COV-P {pct(metrics['cov_precision'])}  "
          f"wdist density {num(metrics['wdist_density'])}  wdist #elem {num(metrics['wdist_num_elems'])}"
          + (f"  (cut-offs {cut[0]} / {cut[1]})" if cut else ""))
    print(f"wrote {', '.join(files)} to {args.output}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    """``templates`` and ``structure`` (``evaluate-structures`` comes with the evaluation commands)."""
    _add_templates_parser(sub)
    _add_structure_parser(sub)


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate-structures",
        help="score generated crystal structures with CDVAE's metrics: validity, COV-R/COV-P, Wasserstein distances",
        description="CDVAE's generation metrics (Xie et al. 2022) of GENERATED against the test split --test: "
        "structural validity (all distances >= 0.5 Å, volume >= 0.1 Å³), composition validity (SMACT, cdvae "
        "protocol), COV-R / COV-P from CrystalNN and Magpie fingerprints with the dataset's cut-offs, and "
        "Wasserstein distances of density and number of elements (valid samples vs test). Unreadable generated "
        "entries count as invalid. Writes metrics.json, report.md, density.png and num_elements.png to -o DIR.",
    )
    p.add_argument("generated", type=Path, metavar="GENERATED",
                   help="generated structures: a `composition-gen structure` output folder (its structures.extxyz, "
                   "else structures_cif.zip), a CSV(.gz) with a cif column, an extxyz file, a zip of CIFs, a "
                   "CIF/POSCAR/pymatgen-JSON file or a folder of them")
    p.add_argument("--test", type=Path, required=True, metavar="TEST",
                   help="reference structures, e.g. ../shared/data/structures/mp_20/test.csv.gz (any format "
                   "`templates build` reads)")
    p.add_argument("--dataset", choices=["mp20", "perov5", "carbon24"],
                   help="COV cut-offs (structure / composition): mp20 0.4 / 10, perov5 and carbon24 0.2 / 4; also "
                   "picks the published CDVAE row of the report (default: guessed from the --test path, else mp20)")
    p.add_argument("--compscaler", type=Path, metavar="PATH",
                   help="JSON of CDVAE's Magpie means/stds (CompScalerMeans, CompScalerStds), needed for COV "
                   "(default: CDVAE's constants, shipped in the package)")
    p.add_argument("--workers", **positive_int, default=1,
                   help="processes computing fingerprints (CrystalNN takes 0.05-1 s per structure) (default: 1)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="folder caching the test set's fingerprints (.npz keyed by a hash of the structures and "
                   "library versions) (default: .fingerprint_cache beside the output folder)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the fingerprint cache")
    p.add_argument("--limit-test", **positive_int, metavar="N", help="use only the first N test structures (quick "
                   "runs; numbers are then not comparable with published ones)")
    p.add_argument("--no-coverage", action="store_true",
                   help="skip fingerprints and COV-R / COV-P (validity and Wasserstein distances only; fast)")
    p.add_argument("--title", help="title of report.md")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_evaluate_structures)


def _add_templates_parser(sub) -> None:
    p = sub.add_parser(
        "templates",
        help="build a template structure store (and its ranker) for `composition-gen structure`",
        description="Template stores: crystal structures indexed by their sorted reduced stoichiometric ratios, "
        "with composition descriptors and a learned ranker.",
    )
    tsub = p.add_subparsers(dest="templates_command", metavar="ACTION", required=True)
    t = tsub.add_parser("build", help="build a store from a structure collection",
                        description="Read SRC (CSV(.gz) with a cif column, a CIF/POSCAR/pymatgen-JSON/extxyz file, or a "
                        "folder of them) and write the store folder DB.")
    t.add_argument("source", type=Path, metavar="SRC")
    t.add_argument("-o", "--output", type=Path, required=True, metavar="DB", help="store folder to write")
    t.add_argument("--exclude-ids", type=Path, metavar="FILE", help="file of ids (one per line) to leave out")
    t.add_argument("--exclude-tag", action="append", metavar="TAG",
                   help="leave out rows whose split_tags contain TAG (e.g. mp20_test); repeatable")
    t.add_argument("--train-ranker", action="store_true", help="also train the ranker (see train-ranker)")
    t.set_defaults(func=cmd_templates_build)
    r = tsub.add_parser("train-ranker", help="train the learned composition-similarity ranker of a store",
                        description="Use store structures as queries, each against the templates of its ratio group "
                        "(the nearest by plain distance plus random others); a template is a positive when it has the "
                        "query's prototype label (anonymised formula, space group, Wyckoff letters), so labelling costs "
                        "nothing. Train the ranker on descriptor differences and template features, report held-out "
                        "hit rates next to the plain distance's, and save ranker.safetensors + ranker.json in the "
                        "store folder (or --ranker-output).")
    r.add_argument("store", type=Path, metavar="DB")
    r.set_defaults(func=cmd_templates_train_ranker)
    for q in (t, r):
        q.add_argument("--seed", type=int, default=0, help="seed of the query draw and of training (default: 0)")
        q.add_argument("--queries", **positive_int, help="at most this many store structures as queries (default: all)")
        q.add_argument("--epochs", **positive_int, default=10, help="passes over the queries (default: 10)")
        q.add_argument("--loss", choices=("listwise", "pairwise"), default="listwise",
                       help="listwise softmax over each query's list, or CSPML's pairwise classifier (default: listwise)")
        q.add_argument("--properties", choices=("all", "basic"), default="all",
                       help="descriptor properties: all twenty, or the basic eight from pymatgen (default: all)")
        q.add_argument("--no-template-features", action="store_true",
                       help="composition differences only (no prototype frequency, symmetry, E_hull of the template)")
        q.add_argument("--holdout-fold", type=int, choices=range(5), metavar="F",
                       help="leave prototype fold F (of 5, by label hash) out of training and report the ranker on it")
        q.add_argument("--ranker-output", type=Path, metavar="DIR", help="save the ranker here instead of the store folder")
        add_progress(q)


def _add_structure_parser(sub) -> None:
    p = sub.add_parser(
        "structure",
        help="predict crystal structures of formulas from templates (CSPML-style), optionally relaxed with M3GNet",
        description="For each formula in FORMULAS (a `composition-gen sample` formulas.csv, any CSV with a formula "
        "column, or a text file with one formula per line), pick the templates with the same stoichiometric "
        "ratios, rank them by learned composition similarity, substitute the elements and scale the cell. Writes "
        "OUTPUT/structures.csv, structures_cif.zip and structures.extxyz. Formulas failing the cdvae validity "
        "check are skipped (a row says so) unless --include-invalid.",
    )
    p.add_argument("formulas", type=Path, metavar="FORMULAS")
    p.add_argument("--column", help="formula column (default: formula)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="template store folder (default: the compact Materials Project store shipped in the package: "
                   "all 53,164 MP structures of mp_union.csv.gz in 13.5 MB)")
    p.add_argument("--ranker", type=Path, help="ranker folder (default: the store's own, else the shipped one)")
    p.add_argument("--ranking", choices=["learned", "plain", "random"], default="learned",
                   help="learned: the ranker; plain: descriptor L1 distance; random: a seeded random order")
    p.add_argument("--top-k", **positive_int, default=5, help="structures per formula (default: 5)")
    p.add_argument("--group-types", action=argparse.BooleanOptionalAction, default=True,
                   help="collapse the 20 best templates into structure types (StructureMatcher) and rank the types "
                   "by their templates' pooled similarity: top-k distinct types (default: on; not for --ranking random)")
    p.add_argument("--include-invalid", action="store_true", help="also predict formulas that fail the validity check")
    add_relax_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random ranking")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, default=Path("structures"), help="output directory (default: structures)")
    p.set_defaults(func=cmd_structure)
