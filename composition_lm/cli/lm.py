"""``composition-gen train`` and ``composition-gen sample``: the formula language models."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from composition_lm.sampling_config import SamplingConfig

from composition_lm.cli.options import (
    add_progress,
    add_settings_arguments,
    command_line,
    config_file_values,
    dataclass_arguments,
    fraction,
    half_open_unit,
    model_for,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_value,
    settings_from_args,
)


# ------------------------------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> int:
    from composition_lm.training import TrainingArguments, train

    targs = dataclass_arguments(TrainingArguments, args, output_dir=str(args.output_dir), corpus=str(args.corpus),
                                train_split=args.train_split or None, val_split=args.val_split or None)
    out = train(targs, command=command_line(args))
    if os.environ.get("RANK", "0") == "0":
        print(f"written to {out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows import save_samples

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    file_values = config_file_values(args)
    args.model = run_value(args, "model", None, file_values)
    gen = FormulaGenerator.from_pretrained(model_for(args))
    config = settings_from_args(args, gen.sampling_config, file_values=file_values)
    n, seed = run_value(args, "n", 1000, file_values), run_value(args, "seed", 0, file_values)
    table = gen.generate(n, seed=seed, config=config, progress=not args.no_progress)
    t_sample = time.perf_counter()
    summary = save_samples(gen, table, args.output, {"command": command_line(args)}, t0, t_sample)
    train_set = gen.training_formulas()
    print(f"{summary['n_samples']} samples from {gen.path.name} ({gen.model_type}) in {summary['seconds']:.1f} s "
          f"= {summary['formulas_per_s']:.0f} formulas/s")
    print(f"  parsed      {summary['n_parsed']}/{summary['n_samples']}")
    print(f"  valid       cdvae {summary['validity_cdvae']:.3f}   smact {summary['validity_smact']:.3f}")
    print(f"  unique      {summary['uniqueness']:.3f}")
    if summary["novelty"] is not None:
        print(f"  novel       {summary['novelty']:.3f} of unique (vs {len(train_set)} training formulas)")
        print(f"  valid+novel+unique  {summary['valid_novel_unique_cdvae']} "
              f"({summary['valid_novel_unique_per_s']:.0f}/s)")
    repair = table.attrs["validity"]
    if config.validity != "none":
        print(f"  sampler     {repair['exact_fixed']} rows made valid by exact decoding; "
              f"{repair['failed_first_pass']} rows failed {config.validity} after the first pass, "
              f"{repair['failing_rows']} still fail after {config.validity_rounds} repair rounds (flagged); "
              f"{repair['extra_denoiser_rows_per_sample']:.2f} extra denoiser rows per sample")
    constraints = {k: getattr(config, k) for k in ("elements", "require", "exclude", "max_elements")
                   if getattr(config, k)}
    if constraints:
        print(f"  constraints {', '.join(f'{k}={v}' for k, v in constraints.items())}")
    print(f"wrote {args.output / 'formulas.csv'} and run_config.json")
    return 0


# ----------------------------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    _add_train_parser(sub)
    _add_sample_parser(sub)


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a formula diffusion model on any formula corpus",
        description="Train a formula model with accelerate (run as-is, or under `accelerate launch "
        "--num_processes N` to scale out; on CPU-only machines accelerate starts several processes through "
        "torchrun: `accelerate launch --multi_gpu --num_processes N`, which falls back to CPU with the gloo "
        "backend). Checkpoints go to OUTPUT_DIR/checkpoints (continue with --resume), "
        "the final model to OUTPUT_DIR/model. Fine-tune with --init-from MODEL.",
    )
    # every dest is a field of composition_lm.training.TrainingArguments (a test checks names and defaults)
    p.add_argument("--model", dest="model_type", default="diffusion-bert", choices=["diffusion-bert", "diffusion-lm"],
                   help="model family: diffusion-bert (masked discrete diffusion) or diffusion-lm (Gaussian "
                   "diffusion over token embeddings) (default: diffusion-bert; ignored with --init-from)")
    p.add_argument("--corpus", type=Path, required=True, help="formula corpus (any format `validate` reads)")
    p.add_argument("--column", help="formula column of a table")
    p.add_argument("--train-split", default="train", help="split to train on ('' for all rows) (default: train)")
    p.add_argument("--val-split", default="val", help="split for validation (default: val)")
    p.add_argument("--val-fraction", **fraction, default=0.05,
                   help="seeded val share when the corpus has no split column (default: 0.05)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--init-from", help="fine-tune from this model (folder, shipped name or hub id)")
    p.add_argument("--negatives", help="formulas the model should move away from (any corpus `validate` reads): each "
                   "step adds --unlikelihood x an unlikelihood loss on a batch of them (diffusion-bert, "
                   "unconditional; e.g. known compounds a fine-tuned model keeps reproducing)")
    p.add_argument("--unlikelihood", **non_negative_float, default=1.0,
                   help="weight of the --negatives term (default: 1.0)")
    p.add_argument("--unlikelihood-max-t", **probability, default=1.0,
                   help="the --negatives term's noise levels are drawn from (0, this]: low values penalise only the "
                   "completions of nearly whole negatives (default: 1.0, all levels)")
    p.add_argument("--dpo", **non_negative_float, default=0.0,
                   help="weight of a preference term (DPO on the ELBO, the --init-from model as its reference): each "
                   "training batch preferred to a batch of --negatives; pass --unlikelihood 0 for DPO alone "
                   "(default: 0, off)")
    p.add_argument("--dpo-beta", **positive_float, default=0.1,
                   help="DPO's beta: how far from the reference the preference may pull (default: 0.1)")
    p.add_argument("--dpo-draws", **positive_int, default=4,
                   help="forward-process draws per sequence for DPO's ELBO estimates (default: 4)")
    p.add_argument("--codec", choices=["expanded", "compact"], default="expanded")
    p.add_argument("--seq-length", **positive_int, default=32,
                   help="tokens per sequence incl. [BOS]/[EOS]; longer formulas are skipped (default: 32)")
    p.add_argument("--hidden-size", **positive_int, default=128)
    p.add_argument("--layers", dest="num_layers", **positive_int, default=4)
    p.add_argument("--heads", dest="num_heads", **positive_int, default=4)
    p.add_argument("--intermediate-size", **positive_int, default=512)
    p.add_argument("--dropout", **half_open_unit, default=0.1)
    p.add_argument("--schedule", choices=["loglinear", "linear", "spindle", "sqrt", "cosine"],
                   help="noise schedule: loglinear (default), linear or spindle for diffusion-bert; sqrt (default), "
                   "cosine or linear for diffusion-lm")
    p.add_argument("--embedding-dim", **positive_int, default=16,
                   help="diffusion-lm: token embedding dimension (default: 16)")
    p.add_argument("--diffusion-steps", **positive_int, default=2000,
                   help="diffusion-lm: training steps T (default: 2000)")
    p.add_argument("--loss-weighting", choices=["elbo", "uniform"], default="elbo", help="diffusion-bert loss weighting")
    p.add_argument("--time-conditioning", action="store_true", help="condition the denoiser on t")
    p.add_argument("--only-valid", choices=["cdvae", "smact"],
                   help="train only on the formulas that pass this validity protocol (the count dropped is reported)")
    p.add_argument("--condition-on", metavar="COLUMNS",
                   help="condition on these numeric corpus columns, e.g. band_gap,e_above_hull "
                   "(binned, or ranked with --condition-encoding continuous; each dropped at random while training so "
                   "the model also samples unconditionally); with --init-from, extends an unconditional model")
    p.add_argument("--condition-bins", type=int, default=8, help="quantile bins per conditioning property (default: 8)")
    p.add_argument("--condition-encoding", choices=["bins", "continuous"], default="bins",
                   help="how a property enters the denoiser: an embedding per quantile bin, or the value's rank in "
                   "the training distribution through a small network (benchmarks/condition_encoding.md compares "
                   "them) (default: bins)")
    p.add_argument("--validity-conditioning", action="store_true",
                   help="start each training formula with [VALID]/[INVALID] (its cdvae validity) so that "
                   "sampling can ask for valid formulas; with --init-from, extends an unconditional model")
    p.add_argument("--batch-size", **positive_int, default=256, help="sequences per process per micro-batch")
    p.add_argument("--grad-accum", **positive_int, default=1)
    p.add_argument("--lr", **positive_float, default=1e-3)
    p.add_argument("--weight-decay", **non_negative_float, default=0.01)
    p.add_argument("--warmup-steps", **non_negative_int, default=500)
    p.add_argument("--max-steps", **positive_int, default=10000)
    p.add_argument("--stop-at-step", **positive_int, help="stop early with a checkpoint (schedule unchanged)")
    p.add_argument("--ema-decay", **half_open_unit, default=0.999)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--eval-every", **non_negative_int, default=500, help="0: never")
    p.add_argument("--eval-samples", **non_negative_int, default=256)
    p.add_argument("--save-every", **non_negative_int, default=500, help="0: only at the end")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    add_progress(p)
    p.set_defaults(func=cmd_train)


def _add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate formulas with a diffusion model (default: the shipped Diffusion-BERT)",
        description="Sample formulas, check them, and write OUTPUT/formulas.csv (raw sample, reduced formula, "
        "parse status, validity and reason under both protocols, novelty vs the model's training formulas) "
        "and OUTPUT/run_config.json. Element constraints are enforced inside the sampler. Each setting's default is "
        "the model's own (its folder's sampling_config.json), then --config FILE, then the options given here.",
    )
    p.add_argument("--model", help="model folder, shipped name (diffusion-bert, diffusion-lm) or hub id "
                   "(default: diffusion-bert); the model's config says which family it is")
    p.add_argument("-n", **positive_int, help="number of samples (default: 1000)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same samples) (default: 0)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="sampling settings from a JSON or YAML file (a run's run_config.json reproduces that run: its "
                   "model, n, seed and settings); options given here override it")
    add_settings_arguments(p, SamplingConfig)
    p.add_argument("--threads", **positive_int, help="torch CPU threads (default: torch's choice)")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, default=Path("samples"), help="output directory (default: samples)")
    p.set_defaults(func=cmd_sample)
