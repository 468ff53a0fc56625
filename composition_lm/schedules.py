"""Noise schedules, kept apart from the networks and the samplers (as in diffusers).

Masking (absorbing-state) schedules give ``alpha(t)``: the probability that a token is still
*unmasked* at time ``t`` in [0, 1] (``alpha(0) = 1``, ``alpha(1) ~ 0``), and ``weight(t) =
-alpha'(t) / (1 - alpha(t))``, the continuous-time ELBO weight of MDLM (Sahoo et al. 2024).

* ``linear``: ``alpha(t) = 1 - t`` (MDLM's log-linear noise ``sigma(t) = -log(1 - t)`` gives exactly
  this alpha, so ``loglinear`` is the same curve with the usual ``eps`` clip).
* ``loglinear``: ``alpha(t) = 1 - (1 - eps) t`` (MDLM's default).
* ``spindle`` (DiffusionBERT, He et al. 2023): per-token ``alpha_i(t) = 1 - t - lam sin(pi t) h_i``,
  where ``h_i`` in [-1/2, 1/2] is the token's information content (``-log frequency`` in the training
  corpus, min-max scaled and centred): informative (rare) tokens are masked earlier in the forward
  process and so recovered later in the reverse one. The marginal over tokens is ``1 - t``, which the
  time-agnostic sampler uses.

The forward process :func:`mask_tokens` is a pure function of ``(tokens, t, schedule, generator)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MaskingSchedule", "mask_tokens", "token_information"]

MASKING_SCHEDULES = ("loglinear", "linear", "spindle")


@dataclass
class MaskingSchedule:
    name: str = "loglinear"
    eps: float = 1e-3
    spindle_lambda: float = 0.5
    token_info: list[float] | None = field(default=None, repr=False)  # spindle: h_i per vocab id

    def __post_init__(self):
        if self.name not in MASKING_SCHEDULES:
            raise ValueError(f"unknown masking schedule {self.name!r}; choose one of {', '.join(MASKING_SCHEDULES)}")
        if self.name == "spindle" and self.token_info is None:
            raise ValueError("the spindle schedule needs token_info (see token_information())")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Marginal keep-probability (token-independent), shape of ``t``."""
        if self.name == "loglinear":
            return 1 - (1 - self.eps) * t
        return 1 - t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """MDLM's ELBO weight ``-alpha'(t) / (1 - alpha(t))`` of the marginal schedule."""
        if self.name == "loglinear":
            return (1 - self.eps) / (1 - self.alpha(t)).clamp_min(1e-6)
        return 1 / t.clamp_min(1e-6)

    def token_alpha(self, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Keep-probability of each token, shape ``tokens``; ``t`` has one entry per row."""
        a = self.alpha(t)[:, None].expand(tokens.shape)
        if self.name != "spindle":
            return a
        info = torch.as_tensor(self.token_info, dtype=a.dtype, device=tokens.device)[tokens]
        bump = self.spindle_lambda * torch.sin(math.pi * t)[:, None] * info
        return (a - bump).clamp(0.0, 1.0)


def mask_tokens(
    tokens: torch.Tensor,
    t: torch.Tensor,
    schedule: MaskingSchedule,
    mask_id: int,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``x_t ~ q(x_t | x_0)``: each maskable token is replaced by ``mask_id`` with prob ``1 - alpha``.

    Returns ``(x_t, is_masked)``. ``maskable`` (bool, shape of ``tokens``) excludes positions such as
    ``[BOS]``. Pure: the inputs are not modified.
    """
    keep = schedule.token_alpha(t.to(torch.float32), tokens)
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    is_masked = u >= keep
    if maskable is not None:
        is_masked &= maskable
    return torch.where(is_masked, torch.full_like(tokens, mask_id), tokens), is_masked


def token_information(sequences: list[list[int]], vocab_size: int) -> list[float]:
    """Spindle's ``h_i``: per-token ``-log frequency`` over the corpus, scaled to [-1/2, 1/2].

    Tokens never seen get the largest information.
    """
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for seq in sequences:
        counts += torch.bincount(torch.as_tensor(seq), minlength=vocab_size).double()
    freq = counts / counts.sum()
    seen = freq > 0
    info = torch.empty(vocab_size, dtype=torch.float64)
    info[seen] = -torch.log(freq[seen])
    hi = info[seen].max() if seen.any() else torch.tensor(1.0)
    lo = info[seen].min() if seen.any() else torch.tensor(0.0)
    info[~seen] = hi
    scaled = (info - lo) / (hi - lo).clamp_min(1e-9) - 0.5
    return scaled.tolist()
