"""Training CDVAE on a folder of CDVAE-style CSVs, with the formula models' conventions: ``accelerate``,
linear warm-up + cosine decay, EMA weights, crash-safe checkpoints and an exact ``--resume`` (the data
order of epoch e comes from ``seed + e``, the noise of step s from ``(seed, s)``), ``log.jsonl``, and a
final export (EMA weights, safetensors + ``config.json``, training arguments, metrics, model card).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.checkpoints import EMA, warmup_cosine
from evaluation.conditioning import PropertyBins, training_conditions
from evaluation.io import write_json, write_text
from evaluation.training_loop import LoopSettings, epoch_batch, open_run, resume_from, run_training
from structure.cdvae.data import (Crystals, atomic_volume_table, element_count_table, lattice_statistics, load_crystals,
                                  load_properties, stoichiometry_table)
from structure.cdvae.model import CDVAE, CDVAEConfig
from structure.cdvae.sampling_config import CDVAESamplingConfig


@dataclass
class CDVAETrainingArguments:
    data: str  # folder with <split>.csv(.gz) files
    output_dir: str
    train_split: str = "train"  # or several joined by commas ("train,val"): their crystals together
    val_split: str | None = "val"  # None, a missing file or one of the training splits: hold out val_fraction of them
    val_fraction: float = 0.05
    cache_dir: str | None = None  # default: <output_dir>/cache
    init_from: str | None = None  # fine-tune a model folder
    # Con-CDVAE: numeric CSV columns to condition on (added to an --init-from model that lacks them)
    condition_on: list[str] | None = None
    condition_bins: int = 8
    condition_encoding: str = "bins"
    property_dropout: float = 0.1
    # model (ignored with init_from)
    hidden: int = 128
    latent: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 4
    encoder_type: str = "schnet"
    cutoff: float = 7.0
    max_neighbors: int = 20
    beta: float = 0.01
    # optimisation
    cache_graphs: bool = True  # compute the training crystals' graphs once for the encoder
    compile: bool = False  # torch.compile the decoder (its forward; the weights' names do not change)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    max_steps: int = 20000
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # bookkeeping
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    resume: bool = False
    stop_at_step: int | None = None
    progress: bool = True


def split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".csv.gz", ".csv"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def load_splits(args: CDVAETrainingArguments) -> tuple[Crystals, Crystals, str]:
    """Training and validation crystals, and a sentence saying where each came from."""
    folder = Path(args.data)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: --data must be a folder of <split>.csv(.gz) files")
    cache = args.cache_dir or str(Path(args.output_dir) / "cache")
    names = [n.strip() for n in args.train_split.split(",") if n.strip()]
    train_files = [split_file(folder, n) for n in names]
    if not names or None in train_files:
        found = sorted(p.name for p in folder.glob("*.csv*"))
        missing = ", ".join(f"{n}.csv(.gz)" for n, f in zip(names, train_files) if f is None) or "a split name"
        raise FileNotFoundError(f"{folder}: no {missing} (found: {', '.join(found) or 'nothing'})")
    train = Crystals.concat([_with_properties(load_crystals(f, cache, progress=args.progress), f, args.condition_on)
                             for f in train_files])
    train_name = " + ".join(f.name for f in train_files)
    val_file = split_file(folder, args.val_split) if args.val_split else None
    if val_file is not None and val_file not in train_files:
        val = _with_properties(load_crystals(val_file, cache, progress=args.progress), val_file, args.condition_on)
        return train, val, f"train {train_name} ({len(train)}), validation {val_file.name}"
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, int(round(args.val_fraction * len(train))))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val]), \
        f"{train_name}: {len(train) - n_val} for training, {n_val} held out for validation (seed {args.seed})"


def _with_properties(crystals: Crystals, path: Path, names: list[str] | None) -> Crystals:
    """``crystals`` with the raw values of the numeric CSV columns ``names`` (none asked: unchanged)."""
    if names:
        rows = load_properties(path, names)
        crystals.properties = torch.tensor([[r[n] for n in names] for r in rows], dtype=torch.float64)
    return crystals


def attach_conditions(model: CDVAE, *sets: Crystals, seed: int = 0) -> None:
    """Encode each set's raw properties as the model's conditions (bin ids or ranks)."""
    bins = model.config.property_bins()
    for crystals in sets:
        if bins and crystals.properties is not None:
            rows = [dict(zip([b.name for b in bins], r)) for r in crystals.properties.tolist()]
            crystals.conditions = training_conditions(bins, rows, model.config.property_encoding, seed)


@torch.no_grad()
def validation_losses(model: CDVAE, val: Crystals, seed: int, batch_size: int = 256) -> dict[str, float]:
    """Mean losses on the validation crystals with fixed noise (comparable between evaluations)."""
    model.eval()
    g = torch.Generator().manual_seed(seed + 12345)
    totals: dict[str, float] = {}
    for start in range(0, len(val), batch_size):
        rows = range(start, min(start + batch_size, len(val)))
        losses = model.losses(val.batch(list(rows)), g)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(rows)
    return {k: v / len(val) for k, v in totals.items()}


def _batch_note(batch_size: int, processes: int) -> str:
    """The batch as the card states it: with N processes each step sees ``batch_size * N`` crystals."""
    return str(batch_size) if processes == 1 else f"{batch_size * processes} ({processes} processes x {batch_size})"


def _model_card(args: CDVAETrainingArguments, model: CDVAE, metrics: dict, n_params: int) -> str:
    ev = metrics.get("final_eval", {})
    cfg, sampling = model.config, model.sampling_config
    return "\n".join([
        "# CDVAE model", "",
        f"- data: {metrics.get('data', args.data)}",
        f"- {n_params:,} parameters: hidden {cfg.hidden}, latent {cfg.latent}, encoder {cfg.encoder_layers} layers, "
        f"decoder {cfg.decoder_layers} layers, cutoff {cfg.cutoff} Å, {cfg.max_neighbors} neighbours, "
        f"max {cfg.max_atoms} atoms",
        f"- {metrics.get('steps')} steps, batch {_batch_note(args.batch_size, metrics.get('num_processes', 1))}, "
        f"lr {args.lr}, EMA {args.ema_decay}, seed {args.seed}, "
        f"{metrics.get('train_seconds', 0) / 60:.1f} min on {metrics.get('hardware', '?')}",
        "- validation losses (EMA weights): " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
        f"- sampling defaults (sampling_config.json): {sampling.levels} noise levels x {sampling.steps} Langevin steps, "
        f"step size {sampling.step_lr}",
        "", f"Command: `{metrics.get('command', '')}`", "",
    ])


def _build_model(args: CDVAETrainingArguments, train_set: Crystals) -> CDVAE:
    model = CDVAE.from_pretrained(args.init_from) if args.init_from else _new_model(args, train_set)
    if args.condition_on:
        values = train_set.properties.numpy()
        bins = [PropertyBins.from_values(name, values[:, j], args.condition_bins)
                for j, name in enumerate(args.condition_on)]
        model.add_property_conditioning(bins, args.condition_encoding, args.property_dropout)
    return model


def _new_model(args: CDVAETrainingArguments, train_set: Crystals) -> CDVAE:
    stats = lattice_statistics(train_set)
    return CDVAE(CDVAEConfig(hidden=args.hidden, latent=args.latent, encoder_layers=args.encoder_layers,
                             decoder_layers=args.decoder_layers,
                             encoder_type=args.encoder_type, cutoff=args.cutoff, max_neighbors=args.max_neighbors,
                             beta=args.beta, max_atoms=int(train_set.num_atoms.max()),
                             lattice_mean=stats["mean"], lattice_std=stats["std"],
                             element_counts=element_count_table(train_set),
                             stoichiometry_counts=stoichiometry_table(train_set),
                             atomic_volumes=atomic_volume_table(train_set)))


def export_checkpoint(ckpt: str | Path, export: str | Path) -> Path:
    """A training checkpoint's EMA weights as a model folder (to sample from a run mid-way)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if "model_config" in state:  # one written before sampling_config.json keeps the sampler settings in it
        sampling, model_config = CDVAESamplingConfig.from_legacy(state["model_config"])
        model = CDVAE(CDVAEConfig.from_dict(model_config), sampling)
    else:  # checkpoints written before the config was stored: rebuild it from the training data
        args = CDVAETrainingArguments(**{**state["args"], "progress": False})
        model = _build_model(args, load_splits(args)[0])
    shadow = load_file(str(ckpt / "ema.safetensors"))
    missing, unexpected = model.load_state_dict(shadow, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: EMA weights do not match the model ({missing[:3]} {unexpected[:3]})")
    model.config.trained = {"checkpoint": str(ckpt), "steps": state["step"], "data": state["args"].get("data")}
    return model.save_pretrained(export)


def train(args: CDVAETrainingArguments, command: str = "") -> Path:
    """Train (or fine-tune, or resume) CDVAE; returns the exported model folder (or, when stopped early
    with ``stop_at_step``, the last checkpoint)."""
    out = Path(args.output_dir)
    accelerator, ckpt = open_run(out, args.resume, args.seed)
    main = accelerator.is_main_process
    train_set, val_set, data_note = load_splits(args)
    if main:
        print(data_note)
    model = _build_model(args, train_set)
    attach_conditions(model, train_set, val_set, seed=args.seed)
    if args.cache_graphs:
        train_set.cache_graphs(model.config.cutoff, model.config.max_neighbors)
    if args.compile:
        model.compile_decoder()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup_steps, args.max_steps, args.min_lr_ratio))
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    ema = EMA(raw, args.ema_decay)
    start = resume_from(accelerator, ckpt, sched, ema)

    world, rank = accelerator.num_processes, accelerator.process_index

    def step_loss(step: int, micro: int):
        """CDVAE's losses on the seeded batch of ``step``, noise seeded by (seed, step). With N processes
        (``accelerate launch``) the global batch holds ``batch_size * N`` crystals and process ``r`` takes
        rows ``r::N`` with its own noise; the call goes through the prepared model, which averages the
        gradients across processes."""
        rows = epoch_batch(len(train_set), args.batch_size * world, args.seed, step)[rank::world]
        seed = args.seed * 1_000_003 + step
        losses = model(train_set.batch(rows), torch.Generator().manual_seed(seed if world == 1 else seed * world + rank))
        return losses["loss"], {k: float(v.detach()) for k, v in losses.items() if k != "loss"}

    def evaluate() -> dict:
        with ema.applied(raw):
            return validation_losses(raw, val_set, args.seed)

    state = run_training(
        accelerator, model, opt, sched, ema, LoopSettings.of(args), start, out, step_loss, evaluate=evaluate,
        checkpoint_extra=lambda: {"args": dataclasses.asdict(args), "model_config": raw.config.to_dict()},
        desc="train cdvae", postfix=lambda rec: {"loss": f"{rec['loss']:.3f}", "coord": f"{rec['coord']:.3f}"})
    if state.stopped_early:
        return out / "checkpoints" / f"step-{state.last_step}"
    export = out / "model"
    if main:
        last_eval = state.last_eval
        with ema.applied(raw):
            if not last_eval:
                last_eval = validation_losses(raw, val_set, args.seed)
            earlier = raw.config.trained if args.init_from else {}
            raw.config.trained = {"data": data_note, "steps": args.max_steps, "seed": args.seed, "command": command}
            if args.init_from:  # a segment continuing an exported model: keep the chain's total
                raw.config.trained.update(init_from=args.init_from, init_steps=earlier.get("total_steps",
                                                                                         earlier.get("steps", 0)))
                raw.config.trained["total_steps"] = raw.config.trained["init_steps"] + args.max_steps
            raw.save_pretrained(export)
        metrics = {"data": data_note, "steps": args.max_steps, "n_params": n_params, "final_eval": last_eval,
                   "train_seconds": state.seconds, "command": command, "num_processes": world,
                   "hardware": f"{torch.get_num_threads()} CPU threads" if accelerator.device.type == "cpu"
                   else torch.cuda.get_device_name()}
        write_json(export / "training_args.json", dataclasses.asdict(args))
        write_json(export / "metrics.json", metrics)
        write_text(export / "README.md", _model_card(args, raw, metrics, n_params))
    return export
