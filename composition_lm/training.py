"""One training loop for every formula model, on `accelerate`.

Features: gradient accumulation, mixed precision, linear warm-up then cosine decay, EMA weights,
periodic validation (loss + validity of a small sample), checkpoints with ``save_state`` and an exact
``resume``, and a final export with ``save_pretrained`` (safetensors + config + tokenizer + training
arguments + metrics + training formulas + model card). Logs go to ``log.jsonl``.

Exact resume: the data order of epoch ``e`` is a permutation drawn from ``seed + e`` and the diffusion
noise of step ``s`` from ``seed, s``, so a run restarted from a checkpoint sees the same batches and
the same noise as one that never stopped (tested).

Multi-process (``accelerate launch --num_processes N``; on a CPU-only machine accelerate starts
several processes only through torchrun, ``accelerate launch --multi_gpu --num_processes N``, which then
trains on CPU with the gloo backend, or through MPI with ``--cpu --mpirun_hostfile``): each optimizer
step takes ``batch_size`` sequences per process per micro-batch; process ``r`` takes rows ``r::N`` of
the global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composition_lm.diffusion_bert import preference_loss
from composition_lm.formula import get_codec
from composition_lm.models import is_gaussian, model_classes
from composition_lm.tokenizer import PAD, build_tokenizer, encode_formulas, vocabulary_size
from evaluation.checkpoints import EMA, warmup_cosine
from evaluation.composition import parse_formula
from evaluation.io import atomic_path, write_json, write_text
from evaluation.settings import SAMPLING_CONFIG_NAME
from evaluation.training_loop import LoopSettings, epoch_batch, open_run, resume_from, run_training

__all__ = ["TrainingArguments", "train", "EMA"]


@dataclass
class TrainingArguments:
    output_dir: str
    corpus: str
    model_type: str = "diffusion-bert"
    column: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    val_fraction: float = 0.05  # seeded split when the corpus has no split column
    dedupe: bool = True  # drop repeated formulas; False keeps them (a repeated formula weighs more: composition-gen learn)
    init_from: str | None = None
    # formulas to move away from (any corpus `validate` reads; diffusion-bert, unconditional): each step adds
    # `unlikelihood` x the unlikelihood loss of a batch of them (composition-gen learn: known formulas it sampled)
    negatives: str | None = None
    unlikelihood: float = 1.0
    unlikelihood_max_t: float = 1.0  # the negatives' noise levels: (0, max_t]; low = only their completions
    # and/or `dpo` x a preference loss (DPO on the ELBO, the --init-from model as reference): a training batch
    # preferred to a batch of negatives, `dpo_beta` its temperature, `dpo_draws` forward-process draws per sequence
    dpo: float = 0.0
    dpo_beta: float = 0.1
    dpo_draws: int = 4
    # model (ignored with init_from, which brings its own)
    codec: str = "expanded"
    seq_length: int = 32
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    dropout: float = 0.1
    schedule: str | None = None  # default: loglinear (diffusion-bert), sqrt (diffusion-lm)
    loss_weighting: str = "elbo"
    time_conditioning: bool = False
    validity_conditioning: bool = False  # [VALID]/[INVALID] start tokens from the cdvae validity of each formula
    only_valid: str | None = None  # train only on formulas valid under this protocol (cdvae or smact)
    condition_on: str | None = None  # comma-separated numeric corpus columns to condition on
    condition_bins: int = 8  # quantile bins per conditioning property
    condition_encoding: str = "bins"  # bins (an embedding per bin) or continuous (the value's training rank)
    embedding_dim: int = 16  # diffusion-lm: dimension of the token embeddings the diffusion runs in
    diffusion_steps: int = 2000  # diffusion-lm: training T
    # optimisation
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    max_steps: int = 10000
    min_lr_ratio: float = 0.05
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    # bookkeeping
    eval_every: int = 500
    eval_samples: int = 256
    eval_steps: int | None = None  # sampling steps of the validation sample (default: the model's)
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    resume: bool = False
    stop_at_step: int | None = None  # stop early (with a checkpoint) without changing the schedule
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _lr_lambda(args: TrainingArguments):
    return warmup_cosine(args.warmup_steps, args.max_steps, args.min_lr_ratio)


def _encode(formulas: list[str], codec, tokenizer, seq_length: int,
            validity_conditioning: bool = False, kept: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """``[N, seq_length]`` token ids of the formulas that fit, and how many were skipped. With
    ``validity_conditioning`` the start token is ``[VALID]``/``[INVALID]`` (cdvae protocol). ``kept``, if
    given, receives the positions of the formulas that were encoded."""
    parsed = [parse_formula(f) for f in formulas]
    ids, skipped = encode_formulas(tokenizer, codec, parsed, seq_length)
    if kept is not None:
        gone = set(skipped)
        kept.extend(i for i in range(len(parsed)) if i not in gone)
    out = torch.full((len(ids), seq_length), PAD, dtype=torch.long)
    for i, seq in enumerate(ids):
        out[i, : len(seq)] = torch.tensor(seq)
    if validity_conditioning and len(ids):
        from evaluation.validity import check_formulas

        skip = set(skipped)
        kept = [f for i, f in enumerate(parsed) if i not in skip]
        valid = torch.tensor([r.valid for r in check_formulas(kept, "cdvae")])
        vocab = tokenizer.get_vocab()
        out[:, 0] = torch.where(valid, vocab["[VALID]"], vocab["[INVALID]"])
    return out, len(skipped)


def _property_conditions(args: TrainingArguments, parent=None) -> tuple[list, dict]:
    """``(bins, {reduced formula: {property: value}})`` for ``--condition-on`` (bins from the parent model
    when it already has them, else quantiles of the training split); ``([], {})`` without it."""
    if not args.condition_on:
        return [], {}
    from composition_lm.conditions import PropertyBins, corpus_properties

    names = [n.strip() for n in args.condition_on.split(",") if n.strip()]
    values = corpus_properties(args.corpus, names, column=args.column, split=args.train_split)
    have = parent.config.property_bins() if parent is not None and parent.config.property_conditions else None
    if have:
        if [b.name for b in have] != names:
            raise ValueError(f"--init-from model is conditioned on {[b.name for b in have]}, not {names}")
        return have, values
    return [PropertyBins.from_values(n, [v[n] for v in values.values()], args.condition_bins) for n in names], values


def _condition_ids(bins: list, values: dict, formulas: list[str], encoding: str, seed: int) -> torch.Tensor:
    """``[len(formulas), len(bins)]`` conditions of each formula's values (not given where unknown)."""
    from composition_lm.conditions import training_conditions

    return training_conditions(bins, [values.get(str(parse_formula(f)), {}) for f in formulas], encoding, seed)


def _config_from_args(args: TrainingArguments, token_info: list[float] | None = None, bins: list | None = None):
    cfg_cls, _, _ = model_classes(args.model_type)
    extra = {"token_info": token_info} if token_info is not None else {}
    if bins:
        extra["property_conditions"] = [b.as_dict() for b in bins]
        extra["property_encoding"] = args.condition_encoding
    if args.model_type == "diffusion-lm":
        if args.validity_conditioning:
            raise ValueError("--validity-conditioning is a diffusion-bert option")
        extra.update(embedding_dim=args.embedding_dim, diffusion_steps=args.diffusion_steps)
    else:
        extra.update(loss_weighting=args.loss_weighting, time_conditioning=args.time_conditioning)
        if args.validity_conditioning:
            extra.update(validity_conditioning=True, vocab_size=vocabulary_size(condition_tokens=True))
    if args.schedule:
        extra["schedule"] = args.schedule
    return cfg_cls(
        seq_length=args.seq_length,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        codec=args.codec,
        **extra,
        **args.extra,
    )


def _build_model(args: TrainingArguments, train_ids: torch.Tensor, vocab_size: int, parent=None,
                 bins: list | None = None):
    """A fresh model from ``args``, or ``parent`` (the loaded ``--init-from`` model) to fine-tune;
    ``bins``: property conditions to give it (an unconditional parent is extended with them)."""
    _, model_cls, loss_fn = model_classes(args.model_type)
    if parent is not None:
        if parent.model_type != args.model_type:
            raise ValueError(f"--init-from is a {parent.model_type} model, not {args.model_type}")
        if bins:
            parent.model.add_property_conditioning(bins, args.condition_encoding)
        return parent.model.train(), loss_fn
    token_info = None
    if args.schedule == "spindle":
        from composition_lm.schedules import token_information

        token_info = token_information(train_ids.tolist(), vocab_size)
    return model_cls(_config_from_args(args, token_info, bins)), loss_fn


def export_checkpoint(ckpt: str | Path, export: str | Path) -> Path:
    """Export a training checkpoint (EMA weights) as a model folder, e.g. to compare runs mid-way."""
    from safetensors.torch import load_file

    from composition_lm.data import load_corpus

    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    args = TrainingArguments(**state["args"])
    if args.init_from or args.schedule == "spindle":
        raise ValueError("export_checkpoint supports runs trained from scratch with a non-spindle schedule")
    _, model_cls, _ = model_classes(args.model_type)
    model = model_cls(_config_from_args(args))
    shadow = load_file(str(ckpt / "ema.safetensors"))
    missing, unexpected = model.load_state_dict(shadow, strict=False)
    if unexpected or any(model.state_dict()[k].is_floating_point() for k in missing):
        raise ValueError(f"{ckpt}: EMA weights do not match the model ({missing[:3]} {unexpected[:3]})")
    ema = EMA(model, state["ema_decay"])
    train_ds, _ = load_corpus(args.corpus, column=args.column, split=args.train_split,
                              val_fraction=args.val_fraction, seed=args.seed)
    metrics = {"exported_from": str(ckpt), "step": state["step"], "n_train": len(train_ds)}
    tokenizer = build_tokenizer(model_max_length=args.seq_length, condition_tokens=args.validity_conditioning)
    export_model(model, ema, tokenizer, train_ds["formula"], args, metrics, Path(export),
                 sum(p.numel() for p in model.parameters()))
    return Path(export)


def _model_card(args: TrainingArguments, cfg, metrics: dict, n_params: int) -> str:
    lines = [
        f"# composition-gen {args.model_type} formula model",
        "",
        f"- corpus: `{args.corpus}` (split `{args.train_split}`), {metrics.get('n_train', '?')} distinct formulas",
        f"- codec: `{cfg.codec}`, sequence length {cfg.seq_length}; {n_params / 1e6:.2f} M parameters "
        f"({cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden)",
        (f"- Gaussian diffusion over {cfg.embedding_dim}-dim token embeddings, schedule `{cfg.schedule}`, "
         f"T = {cfg.diffusion_steps}; end-to-end loss; sampling defaults: {cfg.sampling_steps} "
         f"{cfg.sampling_method.upper()} steps, clamping {'on' if cfg.clamp else 'off'}, noise scale "
         f"{getattr(cfg, 'noise_scale', 1.0)}"
         if is_gaussian(cfg) else
         f"- schedule `{getattr(cfg, 'schedule', '?')}`, loss weighting `{getattr(cfg, 'loss_weighting', '?')}`")
        + (f"; validity-conditioned (cdvae protocol, condition dropout {cfg.condition_dropout}): samples start "
           "with `[VALID]` unless asked otherwise" if getattr(cfg, "validity_conditioning", False) else ""),
        f"- {args.max_steps} steps, batch {args.batch_size} x {args.grad_accum} accumulation x "
        f"{metrics.get('num_processes', 1)} processes, lr {args.lr}, EMA {args.ema_decay}, seed {args.seed}",
        f"- training time {metrics.get('train_seconds', 0) / 60:.1f} min on {metrics.get('hardware', '?')}",
        *([f"- trained only on the formulas valid under the `{args.only_valid}` protocol "
           f"({metrics.get('n_invalid_dropped', '?')} dropped); novelty is still judged against every corpus formula"]
          if args.only_valid else []),
        "",
        "Final validation (EMA weights):",
        "",
        "```json",
        json.dumps(metrics.get("final_eval", {}), indent=2),
        "```",
        "",
        "Training command:",
        "",
        "```",
        metrics.get("command", ""),
        "```",
        "",
    ]
    return "\n".join(lines)


def train(args: TrainingArguments, command: str = "") -> Path:
    """Train (or fine-tune, or resume) a formula model; returns the exported model folder."""
    from composition_lm.data import load_corpus

    out = Path(args.output_dir)
    accelerator, ckpt = open_run(out, args.resume, args.seed, args.mixed_precision)
    main = accelerator.is_main_process

    # ---- data
    train_ds, train_report = load_corpus(args.corpus, column=args.column, split=args.train_split,
                                         val_fraction=args.val_fraction, seed=args.seed, dedupe=args.dedupe)
    try:
        val_ds, _ = load_corpus(args.corpus, column=args.column, split=args.val_split,
                                val_fraction=args.val_fraction, seed=args.seed)
        val_formulas = val_ds["formula"]
    except ValueError:
        val_formulas = []
    if main:
        print(train_report.summary())
    tokenizer = build_tokenizer(model_max_length=args.seq_length, condition_tokens=args.validity_conditioning)
    parent = None
    if args.init_from:
        from composition_lm.models import load_model

        parent = load_model(args.init_from)
        # the parent's codec, length and tokenizer are what this run trains with
        args.codec, args.seq_length = parent.config.codec, parent.config.seq_length
        tokenizer = parent.tokenizer
        if getattr(parent.config, "validity_conditioning", False):
            args.validity_conditioning = True
        elif args.validity_conditioning:
            parent.model.add_validity_conditioning()
            tokenizer = build_tokenizer(max_count=parent.config.max_count, model_max_length=args.seq_length,
                                        condition_tokens=True)
    codec = get_codec(args.codec)
    train_formulas = train_ds["formula"]
    n_invalid_dropped = 0
    if args.only_valid:
        from evaluation.validity import check_formulas

        verdicts = check_formulas([parse_formula(f) for f in train_formulas], args.only_valid)
        kept = [f for f, r in zip(train_formulas, verdicts) if r.valid]
        n_invalid_dropped = len(train_formulas) - len(kept)
        train_formulas = kept
        if main:
            print(f"--only-valid {args.only_valid}: dropped {n_invalid_dropped} invalid training formulas, kept {len(kept)}")
    bins, values = _property_conditions(args, parent)
    kept: list[int] = []
    train_ids, n_skip = _encode(train_formulas, codec, tokenizer, args.seq_length, args.validity_conditioning, kept)
    train_cond = (_condition_ids(bins, values, [train_formulas[i] for i in kept], args.condition_encoding, args.seed)
                  if bins else None)
    if main and bins:
        given = torch.isfinite(train_cond) if train_cond.is_floating_point() else train_cond > 0
        known = given.float().mean(0).tolist()
        how = "rank" if args.condition_encoding == "continuous" else "{} bins"
        print("conditioning on " + ", ".join(f"{b.name} ({how.format(b.n_bins)}, {k:.0%} of formulas labelled)"
                                             for b, k in zip(bins, known)))
    val_ids, _ = (_encode(val_formulas[:4096], codec, tokenizer, args.seq_length, args.validity_conditioning)
                  if val_formulas else (None, 0))
    if main and n_skip:
        print(f"skipped {n_skip} formulas longer than {args.seq_length} tokens ({args.codec} codec)")
    if len(train_ids) == 0:
        raise ValueError("no training formula fits the sequence length")

    neg_ids = None
    if args.negatives:
        if (is_gaussian(parent.config) if parent is not None else args.model_type == "diffusion-lm") or bins:
            raise ValueError("--negatives needs an unconditional diffusion-bert model")
        neg_ds, _ = load_corpus(args.negatives, split=None, seed=args.seed)
        neg_ids, _ = _encode(list(neg_ds["formula"]), codec, tokenizer, args.seq_length, args.validity_conditioning)
        if len(neg_ids) == 0:
            raise ValueError(f"no formula of --negatives {args.negatives} fits the sequence length")
        if main:
            print(f"{len(neg_ids)} negative formulas: unlikelihood weight {args.unlikelihood}"
                  + (f", DPO weight {args.dpo} (beta {args.dpo_beta})" if args.dpo else ""))
    if args.dpo and (neg_ids is None or parent is None):
        raise ValueError("--dpo needs --negatives and --init-from (the model it starts from is its reference)")
    # DPO's reference: the starting model as it was, frozen (fine-tuning changes parent.model in place)
    reference = (copy.deepcopy(parent.model).eval().requires_grad_(False).to(accelerator.device) if args.dpo
                 else None)

    # ---- model, optimiser
    model, loss_fn = _build_model(args, train_ids, len(tokenizer.get_vocab()), parent, bins)
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args))
    model, opt = accelerator.prepare(model, opt)
    raw_model = accelerator.unwrap_model(model)
    ema = EMA(raw_model, args.ema_decay)
    start_step = resume_from(accelerator, ckpt, sched, ema)

    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device

    def step_loss(step: int, micro: int):
        """Loss of micro-batch ``micro`` of ``step``: rows ``rank::world`` of the seeded global batch, noise
        seeded by (seed, step, micro, rank)."""
        idx = epoch_batch(len(train_ids), args.batch_size * world, args.seed, step * args.grad_accum + micro)
        g = torch.Generator(device=device).manual_seed(((args.seed * 1_000_003 + step) * 97 + micro) * world + rank)
        rows = idx[rank::world]
        if train_cond is not None:
            return loss_fn(model, raw_model.config, train_ids[rows].to(device), g,
                           conditions=train_cond[rows].to(device))
        loss, stats = loss_fn(model, raw_model.config, train_ids[rows].to(device), g)
        if neg_ids is not None:
            # a batch of negatives of its own seeded order and noise (the same batch size, drawn with repetition
            # across epochs when there are fewer negatives than that)
            n_neg = min(args.batch_size * world, len(neg_ids))
            neg = epoch_batch(len(neg_ids), n_neg, args.seed + 1, step * args.grad_accum + micro)[rank::world]
            if args.unlikelihood:
                unlikely, _ = loss_fn(model, raw_model.config, neg_ids[neg].to(device), g, unlikely=True,
                                      max_t=args.unlikelihood_max_t)
                loss = loss + args.unlikelihood * unlikely
                stats = {**stats, "unlikelihood": float(unlikely.detach())}
            if args.dpo:
                pairs = min(len(rows), len(neg))
                pref, pref_stats = preference_loss(model, reference, raw_model.config,
                                                   train_ids[rows[:pairs]].to(device), neg_ids[neg[:pairs]].to(device),
                                                   g, beta=args.dpo_beta, draws=args.dpo_draws)
                loss = loss + args.dpo * pref
                stats = {**stats, "dpo": float(pref.detach()), **pref_stats}
        return loss, stats

    state = run_training(
        accelerator, model, opt, sched, ema, LoopSettings.of(args), start_step, out, step_loss,
        evaluate=lambda: evaluate_model(raw_model, ema, loss_fn, val_ids, args, device),
        checkpoint_extra=lambda: {"args": dataclasses.asdict(args)})
    if state.stopped_early:
        accelerator.end_training()
        return out / "checkpoints" / f"step-{state.last_step}"
    export = out / "model"
    if main:
        metrics = {
            "n_train": len(train_formulas),  # after --only-valid
            "n_train_encoded": len(train_ids),
            "n_skipped_too_long": n_skip,
            "n_invalid_dropped": n_invalid_dropped,
            "n_params": n_params,
            "num_processes": world,
            "train_seconds": state.seconds,
            "hardware": f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(),
            "final_eval": state.last_eval,
            "command": command,
        }
        # novelty is judged against every known formula of the training corpus (also those --only-valid
        # dropped: they are known compounds) and, for a fine-tuned model, its parent's list
        seen = set(train_ds["formula"]) | ((parent.training_formulas() or set()) if parent is not None else set())
        export_model(raw_model, ema, tokenizer, seen, args, metrics, export, n_params,
                     parent_path=getattr(parent, "path", None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export


def evaluate_model(raw_model, ema: EMA, loss_fn, val_ids, args: TrainingArguments, device) -> dict:
    """Validation loss (fixed noise) and cdvae validity of a small sample, with the EMA weights."""
    from composition_lm.sampling import generate
    from evaluation.metrics import formula_set_metrics

    raw_model.eval()
    out = {}
    with ema.applied(raw_model):
        if val_ids is not None and len(val_ids):
            g = torch.Generator(device=device).manual_seed(12345)
            losses = [float(loss_fn(raw_model, raw_model.config, val_ids[i : i + 512].to(device), g)[0])
                      for i in range(0, len(val_ids), 512)]
            out["val_loss"] = sum(losses) / len(losses)
        if args.eval_samples:
            dec = generate(raw_model, args.eval_samples, steps=args.eval_steps, batch_size=args.eval_samples,
                           seed=0, progress=False, dtype="float32", validity="none")
            m = formula_set_metrics([str(f) if f is not None else "" for _, f, _ in dec], protocols=("cdvae",))
            out["sample_parse_rate"] = m["parse_rate"]
            out["sample_validity_cdvae"] = m["validity"]["cdvae"]["raw"]
            out["sample_uniqueness"] = m["uniqueness"]
    raw_model.train()
    return out


def export_model(raw_model, ema: EMA, tokenizer, train_formulas, args, metrics: dict, export: Path, n_params: int,
                 parent_path: Path | None = None) -> None:
    """``save_pretrained`` with the EMA weights, plus tokenizer, formulas, arguments, metrics, card; a fine-tuned
    model keeps its parent's sampling settings (``sampling_config.json``)."""
    tmp = export.with_name(f".{export.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with ema.applied(raw_model):
        raw_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with atomic_path(tmp / "training_formulas.txt.gz") as p, gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(sorted(set(train_formulas))) + "\n")
    write_json(tmp / "training_args.json", dataclasses.asdict(args))
    write_json(tmp / "metrics.json", metrics)
    write_text(tmp / "README.md", _model_card(args, raw_model.config, metrics, n_params))
    inherited = Path(parent_path) / SAMPLING_CONFIG_NAME if parent_path is not None else None
    if inherited is not None and inherited.is_file() and not (tmp / SAMPLING_CONFIG_NAME).exists():
        shutil.copyfile(inherited, tmp / SAMPLING_CONFIG_NAME)
    if export.exists():
        shutil.rmtree(export)
    tmp.rename(export)
