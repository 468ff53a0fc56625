"""``composition-gen cdvae train|export|sample``: CDVAE, the generator of whole crystals."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from structure.cdvae.sampling_config import CDVAESamplingConfig

from composition_lm.cli.options import (add_progress, add_relax_arguments, add_settings_arguments, command_line,
                                        dataclass_arguments, fraction, half_open_unit, non_negative_float,
                                        non_negative_int, positive_float, positive_int, relaxer, settings_from_args)


def cmd_cdvae_train(args: argparse.Namespace) -> int:
    from structure.cdvae.train import CDVAETrainingArguments, train

    targs = dataclass_arguments(
        CDVAETrainingArguments, args, data=str(args.data), output_dir=str(args.output),
        val_split=None if (args.val_split or "").lower() in ("", "none") else args.val_split,
        cache_dir=str(args.cache) if args.cache else None, init_from=str(args.init_from) if args.init_from else None,
        condition_on=[c.strip() for c in args.condition_on.split(",") if c.strip()] if args.condition_on else None)
    print(f"wrote {train(targs, command=command_line(args))}")
    return 0


def cmd_cdvae_export(args: argparse.Namespace) -> int:
    from structure.cdvae.train import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.output)}")
    return 0


def cmd_cdvae_fit_prior(args: argparse.Namespace) -> int:
    from structure.cdvae import CDVAE
    from structure.cdvae.prior import fit_latent_prior

    model = CDVAE.from_pretrained(args.model)
    record = fit_latent_prior(model, str(args.data), args.components, seed=args.seed,
                              cache_dir=str(args.cache) if args.cache else None, progress=not args.no_progress)
    model.config.trained["latent_prior"]["command"] = command_line(args)
    print(f"fitted a {record['components']}-component prior to {record['crystals']} crystals; "
          f"wrote {model.save_pretrained(args.output)}")
    return 0


def cmd_cdvae_sample(args: argparse.Namespace) -> int:
    from structure.cdvae import CDVAE
    from structure.cdvae.sampling import to_rows
    from structure.io import write_outputs

    relax = relaxer(args, references=args.templates)
    model = CDVAE.from_pretrained(args.model)
    if args.compile:
        model.compile_decoder()
    stats: dict = {}
    t0 = time.perf_counter()
    config = settings_from_args(args, model.sampling_config)
    structures = model.sample(args.n, seed=args.seed, config=config, progress=not args.no_progress, stats=stats)
    seconds = time.perf_counter() - t0
    if stats["resampled"]:
        print(f"decoded {stats['resampled']} crystals again for an invalid composition (or a rare element count "
              f"or stoichiometry); {stats['still_invalid']} still invalid")
    rows = to_rows(structures)
    if relax is not None:
        relax.relax_rows(rows, workers=args.workers, progress=not args.no_progress)
    paths = write_outputs(rows, args.output)
    status = Counter(r.status for r in rows)
    print(f"{len(rows)} crystals in {seconds:.1f} s ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); "
          f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("cdvae", help="train and sample CDVAE, a generator of whole crystals",
                       description="CDVAE (crystal diffusion VAE): a periodic GNN encoder, property heads and a "
                       "score-network decoder sampled by annealed Langevin dynamics.")
    csub = p.add_subparsers(dest="cdvae_command", metavar="ACTION", required=True)
    _add_train_parser(csub)
    e = csub.add_parser("export", help="a training checkpoint's EMA weights as a model folder",
                        description="Export OUTPUT/checkpoints/step-N of a (possibly unfinished) run as a model "
                        "folder that `cdvae sample --model` reads.")
    e.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    e.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    e.set_defaults(func=cmd_cdvae_export)
    f = csub.add_parser("fit-prior", help="fit a Gaussian-mixture latent prior to a model's training crystals",
                        description="Encode a crystal set (the model's training split) and fit a Gaussian mixture "
                        "to the posterior means (ex-post density estimation, Ghosh et al. 2020); the model written "
                        "to OUTPUT samples its unconditional latents from the mixture instead of N(0, I) (--prior "
                        "standard still gives the old behaviour). benchmarks/cdvae_levers.md measures the effect.")
    f.add_argument("--model", required=True, help="model folder or shipped name")
    f.add_argument("--data", type=Path, required=True, metavar="CSV",
                   help="CDVAE-style CSV of crystals (a `cif` column): the model's training split")
    f.add_argument("--components", **positive_int, default=20, help="mixture components (default: 20)")
    f.add_argument("--seed", type=int, default=0, help="seed of the k-means start (default: 0)")
    f.add_argument("--cache", type=Path, metavar="DIR", help="parsed-crystal cache")
    add_progress(f)
    f.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    f.set_defaults(func=cmd_cdvae_fit_prior)
    _add_sample_parser(csub)


def _add_sample_parser(csub) -> None:
    s = csub.add_parser("sample", help="sample crystals; writes structures.csv, structures_cif.zip, structures.extxyz",
                        description="Draw N latents from the prior, decode the number of atoms, lattice and "
                        "composition, then run annealed Langevin dynamics over the noise levels. Same outputs as "
                        "`composition-gen structure`; --relax relaxes them. Each sampler setting's default is the "
                        "model's own (its folder's sampling_config.json); the options given here override it.")
    s.add_argument("--model", default="cdvae-perov5",
                   help="model folder, or a shipped name: cdvae-perov5 (default) or cdvae-mp20 (Materials Project crystals of "
                   "up to 20 atoms; a short training run, see its model card)")
    s.add_argument("-n", **positive_int, default=100, help="number of crystals (default: 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same crystals)")
    add_settings_arguments(s, CDVAESamplingConfig)
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder: ~15 s to compile, then each Langevin step ~1.5-1.8x faster on "
                   "CPU (worth it from a few hundred crystals; needs a C compiler)")
    add_relax_arguments(s)
    s.add_argument("--templates", type=Path, metavar="DB",
                   help="template store for elemental reference structures (default: the shipped compact MP store)")
    add_progress(s)
    s.add_argument("-o", "--output", type=Path, default=Path("cdvae_samples"), help="output directory")
    s.set_defaults(func=cmd_cdvae_sample)


def _add_train_parser(csub) -> None:
    t = csub.add_parser("train", help="train (or fine-tune, or resume) CDVAE on CDVAE-style CSVs",
                        description="Train on DATA/<train-split>.csv(.gz) (a `cif` column per crystal), validate on "
                        "DATA/<val-split>.csv(.gz) or, with --val-split none, on a held-out part of the training "
                        "split. Checkpoints go to OUTPUT/checkpoints (continue with --resume); the final model "
                        "(EMA weights, safetensors + config.json, model card) to OUTPUT/model.")
    # every dest is a field of structure.cdvae.train.CDVAETrainingArguments (a test checks names and defaults)
    t.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of <split>.csv(.gz) files")
    t.add_argument("--train-split", default="train",
                   help="training split, or several joined by commas (train,val: both together; a --val-split among "
                   "them then holds out --val-fraction of the union instead) (default: train)")
    t.add_argument("--val-split", default="val", help="validation split, or 'none' to hold out --val-fraction")
    t.add_argument("--val-fraction", **fraction, default=0.05)
    t.add_argument("--cache", type=Path, metavar="DIR", help="parsed-crystal cache (default: OUTPUT/cache)")
    t.add_argument("--init-from", type=Path, metavar="MODEL", help="fine-tune this CDVAE model folder")
    t.add_argument("--condition-on", metavar="COLUMNS",
                   help="Con-CDVAE: condition the latent prior and the decoder on these numeric CSV columns, e.g. "
                   "formation_energy_per_atom,band_gap,e_above_hull (MP-20) or heat_ref (Perov-5); each is dropped "
                   "at random while training (--property-dropout) so the model also samples unconditionally; with "
                   "--init-from, extends an unconditional model")
    t.add_argument("--condition-bins", **positive_int, default=8, help="quantile bins per property (default: 8)")
    t.add_argument("--condition-encoding", choices=["bins", "continuous"], default="bins",
                   help="a property as one embedding per quantile bin, or as its rank in the training values "
                   "(default: bins)")
    t.add_argument("--property-dropout", **half_open_unit, default=0.1,
                   help="probability of dropping each property's condition while training (default: 0.1)")
    t.add_argument("--hidden", **positive_int, default=128)
    t.add_argument("--latent", **positive_int, default=128)
    t.add_argument("--encoder-layers", **positive_int, default=3)
    t.add_argument("--decoder-layers", **positive_int, default=4)
    t.add_argument("--encoder-type", choices=["schnet", "painn"], default="schnet",
                   help="schnet: distances only (default); painn: equivariant vector features that also see bond "
                   "angles (CDVAE used DimeNet++ for the same reason)")
    t.add_argument("--cutoff", **positive_float, default=7.0, help="neighbour cutoff in Å (default: 7)")
    t.add_argument("--max-neighbors", **positive_int, default=20)
    t.add_argument("--beta", **non_negative_float, default=0.01, help="KL weight (default: 0.01)")
    t.add_argument("--batch-size", **positive_int, default=128)
    t.add_argument("--no-graph-cache", dest="cache_graphs", action="store_false",
                   help="let the encoder search for the training crystals' neighbours every step instead of once "
                   "(slower; benchmarks/cdvae_levers.md)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder (1.57x the training steps per second on the CPU of "
                   "benchmarks/cdvae_levers.md; the first steps compile for a minute)")
    t.add_argument("--lr", **positive_float, default=1e-3)
    t.add_argument("--max-steps", **positive_int, default=20000)
    t.add_argument("--warmup-steps", **non_negative_int, default=200)
    t.add_argument("--ema-decay", **half_open_unit, default=0.999)
    t.add_argument("--eval-every", **non_negative_int, default=500)
    t.add_argument("--save-every", **non_negative_int, default=500)
    t.add_argument("--stop-at-step", **positive_int, help="stop early with a checkpoint, schedule unchanged")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT")
    t.add_argument("--seed", type=int, default=0)
    add_progress(t)
    t.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    t.set_defaults(func=cmd_cdvae_train)
