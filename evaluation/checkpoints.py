"""Training-run plumbing shared by every model of the project: EMA weights, the warm-up + cosine
learning-rate schedule, and crash-safe ``accelerate`` checkpoints.

It lives in the bottom layer of the package graph (``evaluation`` imports neither ``composition_lm`` nor
``structure``) so that the formula models and CDVAE train with the same conventions without importing
each other.

A checkpoint is a folder ``<out>/checkpoints/step-N`` holding ``accelerator.save_state`` output (model
as safetensors, optimizer, RNG), ``ema.safetensors`` and ``trainer_state.json`` (step, EMA decay,
scheduler state and whatever the trainer adds). It is written to a temporary folder renamed into place,
so an interrupted run never leaves half a checkpoint; loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

from evaluation.io import write_json

__all__ = ["EMA", "warmup_cosine", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]


class EMA:
    """Exponential moving average of a model's floating-point parameters (checkpointable)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up of the decay, as in common EMA helpers
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily load the EMA weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict({**model.state_dict(), **{k: v.to(backup[k].dtype) for k, v in self.shadow.items()}})
        try:
            yield model
        finally:
            model.load_state_dict({**model.state_dict(), **backup})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1 - min_lr_ratio) * cos

    return f


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((Path(out) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, out: Path, step: int, sched, ema: EMA, extra: dict, keep: int) -> None:
    """Write ``<out>/checkpoints/step-<step>`` (see the module docstring) and keep the newest ``keep``."""
    from safetensors.torch import save_file

    ckpt_root = Path(out) / "checkpoints"
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank writes its RNG state into tmp: all must finish before the rename
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        write_json(tmp / "trainer_state.json", {"step": step, "ema_decay": ema.decay, "scheduler": sched_state, **extra})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # a checkpoint folder appears only once complete
        old = sorted((p for p in ckpt_root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for p in old[: -keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt: Path, sched, ema: EMA) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``trainer_state.json``.
    Tensors load with ``weights_only=True``; the rest is JSON/safetensors."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    for name in ("trainer_state.json", "ema.safetensors", "model.safetensors"):
        if not (ckpt / name).exists():
            raise FileNotFoundError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    try:
        accelerator.load_state(str(ckpt), load_kwargs={"weights_only": True})
        state = json.loads((ckpt / "trainer_state.json").read_text())
        ema.load_state_dict({"decay": state["ema_decay"], "shadow": load_file(str(ckpt / "ema.safetensors"))})
    except Exception as err:
        raise ValueError(f"checkpoint {ckpt} cannot be loaded ({type(err).__name__}: {err})") from err
    sched.load_state_dict({**sched.state_dict(), **state["scheduler"]})
    return state
