"""``composition-gen learn``: closed-loop discovery, the options of :func:`composition_lm.workflows.learn.learn`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from composition_lm.cli.options import (add_correction_argument, add_progress, add_relax_arguments,
                                        add_settings_arguments, check_potentials, positive_int, quiet_console,
                                        relax_settings, settings_from_args)
from composition_lm.sampling_config import SamplingConfig
from composition_lm.workflows.learn import LearnConfig


def cmd_learn(args: argparse.Namespace) -> int:
    from structure import StructurePredictor
    from structure.stability import Screening, StabilityScorer

    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows.learn import FunnelOracle, learn

    check_potentials(args)
    config = LearnConfig(**{name: getattr(args, name) for name in LearnConfig.names()})
    sampling = settings_from_args(args, FormulaGenerator.from_pretrained(args.model).sampling_config,
                                  groups=("constraints",))
    predictor = StructurePredictor(args.templates)
    scorer = StabilityScorer(args.potential, settings=relax_settings(args), relax=args.relax,
                             references=args.references or predictor.store, correction=args.correction,
                             judges=args.judge, screening=Screening.for_threshold(config.e_hull_max))
    print(f"oracle: the discovery funnel; energies: {scorer.describe()}", file=sys.stderr)
    quiet_console()
    labels = None
    if args.labels is not None:
        import pandas as pd

        labels = pd.read_csv(args.labels)
        if "formula" not in labels and "reduced_formula" in labels:
            labels = labels.rename(columns={"reduced_formula": "formula"})
    rounds = learn(args.model, args.output, config, oracle=FunnelOracle(predictor, scorer, args.top_k, args.workers,
                                                                         args.scheduler),
                   sampling=sampling, resume=args.resume, progress=not args.no_progress, labels=labels,
                   start_from=args.round0_from)
    for r in rounds:
        print(f"round {r['round']}: SUN {100 * r['sun_rate']:.1f} % at {config.e_hull_max:g}, "
              f"{100 * r['sun_rate_0']:.1f} % at 0; novelty {r['novelty']:.3f}, uniqueness {r['uniqueness']:.3f}, "
              f"element JS {r['element_js']:.4f}; surrogate agrees on {100 * r['surrogate_accuracy']:.0f} %; "
              f"{r['cpu_s']:.0f} CPU-s" + (f"; stopped: {r['guard']}" if r["guard"] else ""))
    print(f"wrote rounds.csv and round-*/ (formulas, labels, model) to {args.output}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "learn", help="closed-loop discovery: the formula model learns from its own verified candidates",
        description="Rounds of: sample formulas, judge them with the discovery funnel (template structure, "
        "relaxation, the calibrated E_hull), label them (stable / metastable / unstable / failed; novel against the "
        "model's training formulas and every earlier round), and fine-tune the model on its stable, unique, novel "
        "finds (reward-weighted likelihood with replay of known formulas). Guards stop the loop when the element "
        "distribution drifts or a few chemical systems take over. Writes OUTPUT/rounds.csv and OUTPUT/round-K/ "
        "(formulas.csv, labels.csv, the funnel's files, the fine-tuned model); --resume continues a stopped loop.")
    p.add_argument("--model", default="diffusion-bert", help="the starting formula model (default: diffusion-bert)")
    add_settings_arguments(p, LearnConfig, suppress=False)
    add_settings_arguments(p, SamplingConfig, groups=("constraints",))
    p.add_argument("--labels", type=Path, metavar="CSV",
                   help="--method conditional: known formulas with the model's condition properties, which the loop's "
                   "labels are joined to (e.g. ../shared/data/formulas/mp_formulas.csv)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="template store (default: the MP store shipped in the package; also the novelty reference)")
    p.add_argument("--top-k", **positive_int, default=1, help="template structures per formula (default: 1)")
    add_relax_arguments(p, relax_by_default=True)
    add_correction_argument(p)
    p.add_argument("--scheduler", metavar="ADDRESS", help="relax and score on a Dask cluster (as `discover`)")
    p.add_argument("--round0-from", type=Path, metavar="DIR",
                   help="a `discover` run of the same model, --per-round (its -n) and --seed, judged by the same "
                   "oracle: its verdicts stand in for round 0's instead of relaxing again (refused when its formulas "
                   "are not round 0's samples)")
    p.add_argument("--resume", action="store_true", help="continue the loop in OUTPUT after its last finished round")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_learn)
