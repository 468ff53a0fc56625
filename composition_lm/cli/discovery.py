"""``composition-gen stability`` (where structures stand against the convex hull) and ``composition-gen discover``
(the whole funnel from sampled formulas to stable, unique, novel candidates)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from composition_lm.cli.options import (DEFAULT_DISCOVER_MAX_STEPS, add_correction_argument, add_progress,
                                        add_relax_arguments, add_settings_arguments, check_potentials, model_for,
                                        quiet_console, relax_settings, settings_from_args)
from composition_lm.sampling_config import SamplingConfig


def cmd_stability(args: argparse.Namespace) -> int:
    from structure.io import read_generated_structures
    from structure.stability import StabilityScorer, write_stability

    from evaluation.hull import ReferenceHull

    check_potentials(args)
    hull = ReferenceHull.load(args.reference)
    structures, source = read_generated_structures(args.structures)
    if not structures:
        raise ValueError(f"{args.structures} holds no structures")
    scorer = StabilityScorer(args.potential, settings=relax_settings(args), reference=hull,
                             relax=args.relax, references=args.references, cache_dir=args.output,
                             correction=args.correction, judges=args.judge)
    print(f"{len(structures)} structures from {source}; energies: {scorer.describe()}; reference hull: "
          f"{scorer.hull.source} ({len(scorer.hull)} entries)", file=sys.stderr)
    t0 = time.perf_counter()
    quiet_console()
    records = scorer.score(structures, workers=args.workers, progress=not args.no_progress)
    args.output.mkdir(parents=True, exist_ok=True)
    path = write_stability(records, args.output / "stability.csv")
    e = [r.e_hull_per_atom for r in records]
    scored = [x for x in e if math.isfinite(x)]
    print(f"{len(records)} structures in {time.perf_counter() - t0:.1f} s: {len(scored)} placed on the hull, "
          f"{sum(x <= 0 for x in scored)} on or below it, {sum(x <= 0.1 for x in scored)} within 0.1 eV/atom, "
          f"{len(records) - len(scored)} not placed (see the reason column); wrote {path}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "stability", help="energy above the convex hull of structures (interatomic potential, MP reference hull)",
        description="Relax each structure with an interatomic potential (--potential; or take it as given with "
        "--no-relax), compute its formation energy against the MP elemental ground states relaxed with the same "
        "potential, put it on the Materials Project scale (MP2020 corrections where the potential needs them, "
        "--correction) and place it on the reference hull of its "
        "chemical system. Writes OUTPUT/stability.csv (index, formula, energy_per_atom, e_form_per_atom, "
        "e_hull_per_atom, decomposition, status, reason), one row per input structure in input order; a "
        "structure that cannot be placed keeps its row with an empty e_hull_per_atom and the reason.")
    p.add_argument("structures", type=Path, metavar="STRUCTURES",
                   help="a `structure` or `cdvae sample` output folder, a CIF zip or folder, an extxyz file, or a CSV "
                   "with a cif column")
    p.add_argument("--reference", type=Path, metavar="TABLE",
                   help="reference phases: a CSV of formula + formation_energy_per_atom (eV/atom), or a JSON list of "
                   "pymatgen entries (default: the Materials Project table shipped in the package, CC BY 4.0)")
    add_correction_argument(p)
    add_relax_arguments(p, relax_by_default=True)
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_stability)
    add_discover_parser(sub)


# --------------------------------------------------------------------------------------- discover
def cmd_discover(args: argparse.Namespace) -> int:
    from structure import StructurePredictor
    from structure.stability import Screening, StabilityScorer

    from composition_lm.cli.options import command_line
    from composition_lm.workflows import discover

    if args.rehull:
        from composition_lm.workflows.discovery import rehull

        result = rehull(args.output, StructurePredictor(args.templates), args.reference)
        key = next(iter(result.sun_rate))
        print(f"placed on the hull again: SUN rate {100 * result.sun_rate[key]:.2f} % at E_hull <= {key} eV/atom, "
              f"{100 * result.sun_rate['0']:.2f} % at <= 0; wrote the outputs again to {args.output}")
        return 0
    if (args.output / "journal.jsonl").exists() and not args.resume:
        raise FileExistsError(f"{args.output} holds a discovery run: pass --resume to finish it, or choose a new -o")
    check_potentials(args)
    if args.templates is None:
        print("no --templates given: using the compact Materials Project store shipped in the package",
              file=sys.stderr)
    formulas = None
    if args.from_file is not None:  # a bad file fails before anything is loaded
        from composition_lm.data import read_samples

        formulas = read_samples(args.from_file, args.column)
        if not formulas:
            raise ValueError(f"{args.from_file} holds no formulas")
    sampling = None
    if formulas is None and not (args.resume and (args.output / "formulas.csv").is_file()):
        from composition_lm.generator import FormulaGenerator

        generator = FormulaGenerator.from_pretrained(model_for(args))
        sampling = settings_from_args(args, generator.sampling_config,  # (discover's --top-k is templates')
                                      groups=("constraints", "validity", "conditions"))
    predictor = StructurePredictor(args.templates)
    screening = Screening.for_threshold(args.e_hull_max, stop_margin=args.stop_margin, stop_after=args.stop_after,
                                        judge_margin=args.judge_margin)
    scorer = StabilityScorer(args.potential, settings=relax_settings(args), reference=args.reference,
                             relax=args.relax, references=args.references or predictor.store,
                             correction=args.correction, judges=args.judge, screening=screening)
    print(f"energies: {scorer.describe()}", file=sys.stderr)
    quiet_console()
    result = discover(generator if sampling is not None else None, args.n, args.seed, args.output,
                      formulas=formulas, sampling=sampling, predictor=predictor, scorer=scorer,
                      e_hull_max=args.e_hull_max, top_k=args.top_k, skip_above=args.skip_above, resume=args.resume,
                      workers=args.workers, scheduler=args.scheduler, progress=not args.no_progress,
                      run={"command": command_line(args)})
    c, key = result.counts, f"{args.e_hull_max:g}"
    print(" -> ".join(f"{k} {v}" for k, v in c.items()))
    print(f"SUN rate {100 * result.sun_rate[key]:.2f} % at E_hull <= {key} eV/atom, "
          f"{100 * result.sun_rate['0']:.2f} % at <= 0; {sum(result.summary['seconds'].values()) / 60:.1f} min; "
          f"wrote candidates.csv, sun.csv, sun_cif.zip, funnel.json, report.md, report.html to {args.output}")
    return 0


def add_screening_arguments(p) -> None:
    """discover's shortcuts past candidates that cannot come out stable (benchmarks/funnel_speed.md)."""
    from composition_lm.cli.options import (DEFAULT_JUDGE_MARGIN, DEFAULT_SKIP_ABOVE, DEFAULT_STOP_AFTER,
                                             DEFAULT_STOP_MARGIN, bound_or_off, non_negative_int)

    p.add_argument("--stop-margin", **bound_or_off, default=DEFAULT_STOP_MARGIN, metavar="E|off",
                   help="early stop: a relaxation whose structure still lies more than E eV/atom above --e-hull-max "
                   "(by the relaxing potential's energy) after --stop-after steps stops there, its E_hull an upper "
                   f"estimate; off: relax every structure to the end (default: {DEFAULT_STOP_MARGIN})")
    p.add_argument("--stop-after", **non_negative_int, default=DEFAULT_STOP_AFTER, metavar="STEPS",
                   help=f"steps before the early-stop test applies (default: {DEFAULT_STOP_AFTER})")
    p.add_argument("--judge-margin", **bound_or_off, default=DEFAULT_JUDGE_MARGIN, metavar="E|off",
                   help="two-stage and committee scoring: the judges score only structures that the relaxing "
                   "potential puts at most E eV/atom above --e-hull-max; the others keep its E_hull; off: judge "
                   f"every structure (default: {DEFAULT_JUDGE_MARGIN})")
    p.add_argument("--skip-above", **bound_or_off, default=DEFAULT_SKIP_ABOVE, metavar="E|off",
                   help="give no structure to a formula whose E_hull by the shipped composition property predictor "
                   "exceeds E eV/atom; off: a structure for every valid formula (default: "
                   f"{DEFAULT_SKIP_ABOVE}, which lost 1 of 33 SUN candidates on 200 formulas: benchmarks/funnel_speed.md)")


def add_discover_parser(sub) -> None:
    from composition_lm.cli.options import non_negative_float, positive_int

    p = sub.add_parser(
        "discover", help="the whole funnel: sample -> validity -> templates -> relaxation -> E_hull -> SUN candidates",
        description="Sample N formulas (or take --from a file), keep the valid ones, give each its top-k template "
        "structures, relax them with an interatomic potential (--potential), place them on the reference hull, "
        "and keep the stable, unique and "
        "novel ones (SUN). Every result is appended to OUTPUT/journal.jsonl as it finishes, so --resume finishes a "
        "stopped run with nothing lost or repeated. Writes candidates.csv, sun.csv, sun_cif.zip, funnel.json, "
        "report.md and report.html.")
    p.add_argument("--model", default=None, help="formula model (default: diffusion-bert)")
    p.add_argument("-n", **positive_int, default=1000, help="formulas to sample (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_settings_arguments(p, SamplingConfig, groups=("constraints", "validity", "conditions"))
    p.add_argument("--from", dest="from_file", type=Path, metavar="FORMULAS",
                   help="screen these formulas instead of sampling (any formula file `validate` reads)")
    p.add_argument("--column", help="formula column of --from")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="template store folder (default: the MP store shipped in the package, all 53,164 structures of "
                   "mp_union.csv.gz); also the novelty reference, so a store of your own should hold the known compounds")
    p.add_argument("--top-k", **positive_int, default=1, help="template structures per formula (default: 1)")
    p.add_argument("--reference", type=Path, metavar="TABLE",
                   help="reference hull table (default: the shipped Materials Project table)")
    add_correction_argument(p)
    p.add_argument("--e-hull-max", **non_negative_float, default=0.1,
                   help="stable: E_hull at most this, eV/atom (default: 0.1; SUN at 0 is reported too)")
    add_relax_arguments(p, relax_by_default=True, max_steps=DEFAULT_DISCOVER_MAX_STEPS)
    add_screening_arguments(p)
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="relax and score on a Dask cluster (tcp://host:8786; e.g. one started by dask-jobqueue on "
                   "SLURM/PBS) instead of local --workers; needs pip install 'dask[distributed]' and paths the "
                   "workers can read")
    p.add_argument("--resume", action="store_true", help="finish the run in OUTPUT from its journal")
    p.add_argument("--rehull", action="store_true",
                   help="place the finished run in OUTPUT on the reference hull again (after the shipped table or "
                   "--reference changed), from the formation energies in its journal: nothing is relaxed; give "
                   "the run's --templates")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_discover)
