"""The one training loop of the project: the formula models and CDVAE both train through :func:`run_training`.

A trainer supplies what is model-specific as functions, and this module does the rest the same way for
every model (it lives in the bottom layer, so ``composition_lm`` and ``structure`` share it without
importing each other):

* :func:`open_run`: an ``accelerate`` ``Accelerator``, the seed, and the resume guard (``--resume`` takes
  the latest complete checkpoint; a folder that already holds checkpoints is refused without it);
* :func:`epoch_batch`: the seeded data order (epoch ``e`` is a permutation drawn from ``seed + e``), so
  a resumed run sees exactly the batches of one that never stopped;
* :func:`run_training`: the step body (micro-batches with gradient accumulation, clipping, optimizer and
  scheduler steps, EMA update), then the log / evaluation / checkpoint cadence, and the early stop of
  ``stop_at_step`` (schedule unchanged). The trainer's ``loss_fn(step, micro)`` draws its own noise from
  ``(seed, step, micro)``, which with the data order makes resuming exact.

Nothing here knows what a formula or a crystal is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.checkpoints import EMA, latest_checkpoint, load_checkpoint, save_checkpoint
from evaluation.io import append_jsonl

__all__ = ["LoopSettings", "LoopState", "open_run", "epoch_batch", "run_training"]


@dataclass
class LoopSettings:
    """The cadence and optimisation settings every trainer's arguments carry under these names."""

    max_steps: int
    seed: int = 0
    grad_accum: int = 1
    clip_grad: float = 1.0
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    stop_at_step: int | None = None
    progress: bool = True

    @classmethod
    def of(cls, args) -> LoopSettings:
        """The settings read off a trainer's argument dataclass (fields it lacks keep their defaults)."""
        import dataclasses

        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    @property
    def last_step(self) -> int:
        return min(self.max_steps, self.stop_at_step or self.max_steps)


@dataclass
class LoopState:
    """What a finished (or stopped) loop hands back to its trainer."""

    last_step: int
    stopped_early: bool
    last_eval: dict
    seconds: float


def open_run(out: str | Path, resume: bool, seed: int, mixed_precision: str = "no"):
    """``(accelerator, checkpoint or None)`` for a run writing to ``out``.

    Raises ``FileExistsError`` when ``out`` already holds checkpoints and ``resume`` is false."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(out)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(seed)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None and accelerator.is_main_process:
        print(f"no checkpoint under {out}/checkpoints: starting from scratch")
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or choose a new --output-dir")
    return accelerator, ckpt


def resume_from(accelerator, ckpt: Path | None, sched, ema: EMA) -> int:
    """The step to start at: 0, or the step of ``ckpt`` after restoring it."""
    if ckpt is None:
        return 0
    step = int(load_checkpoint(accelerator, ckpt, sched, ema)["step"])
    if accelerator.is_main_process:
        print(f"resumed from {ckpt} at step {step}")
    return step


def epoch_batch(n_items: int, batch_size: int, seed: int, index: int) -> torch.Tensor:
    """Item indices of global batch ``index``: epoch ``index // (n_items // batch_size)`` is a permutation
    drawn from ``seed``, so the order depends on nothing but these numbers."""
    per_epoch = max(1, n_items // batch_size)
    epoch, k = divmod(index, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def run_training(
    accelerator,
    model,
    opt,
    sched,
    ema: EMA,
    settings: LoopSettings,
    start_step: int,
    out: str | Path,
    loss_fn: Callable[[int, int], tuple[torch.Tensor, dict[str, float]]],
    evaluate: Callable[[], dict] | None = None,
    checkpoint_extra: Callable[[], dict] | None = None,
    desc: str = "train",
    postfix: Callable[[dict], dict] | None = None,
) -> LoopState:
    """Train ``model`` (as prepared by ``accelerator``) from ``start_step`` to ``settings.last_step``.

    ``loss_fn(step, micro)`` returns ``(loss, stats)`` for micro-batch ``micro`` of ``step`` (stats are
    floats, averaged over the micro-batches and logged); ``evaluate()`` runs on the main process every
    ``eval_every`` steps and at ``max_steps`` (EMA weights are the trainer's to apply); ``checkpoint_extra()``
    adds JSON to each checkpoint's ``trainer_state.json``. Logs go to ``out/log.jsonl``."""
    from tqdm.auto import tqdm

    out = Path(out)
    raw = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    s = settings
    last = s.last_step
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    t0 = time.perf_counter()
    last_eval: dict = {}
    bar = tqdm(total=s.max_steps, initial=start_step, disable=not (main and s.progress), desc=desc)
    for step in range(start_step, last):
        model.train()
        stats_acc = {"loss": 0.0}
        for micro in range(s.grad_accum):
            sync = micro == s.grad_accum - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx, accelerator.autocast():
                loss, stats = loss_fn(step, micro)
                accelerator.backward(loss / s.grad_accum)
            stats_acc["loss"] += float(loss.detach()) / s.grad_accum
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v / s.grad_accum
        if s.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), s.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(raw, step)
        bar.update(1)
        done = step + 1
        if main and (done % s.log_every == 0 or done in (last, s.max_steps)):
            rec = {"step": done, "lr": sched.get_last_lr()[0], **stats_acc, "elapsed_s": time.perf_counter() - t0}
            bar.set_postfix(**(postfix(rec) if postfix else {"loss": f"{rec['loss']:.3f}"}))
            append_jsonl(log_path, rec)
        if main and evaluate is not None and s.eval_every and (done % s.eval_every == 0 or done == s.max_steps):
            last_eval = evaluate()
            append_jsonl(log_path, {"step": done, "eval": last_eval})
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if (s.save_every and done % s.save_every == 0) or done == last:
            save_checkpoint(accelerator, out, done, sched, ema, checkpoint_extra() if checkpoint_extra else {},
                            s.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    stopped = last < s.max_steps
    if stopped and main:
        print(f"stopped at step {last} of {s.max_steps}; continue with --resume")
    return LoopState(last, stopped, last_eval, time.perf_counter() - t0)
