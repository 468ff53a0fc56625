"""Samplers' schedulers: the reverse process of each model family, one step at a time (diffusers' split).

A scheduler owns the time grid and the update rule; the denoiser only predicts, and the sampling loop
(:mod:`composition_lm.sampling`) is a short loop that asks the denoiser and calls :meth:`step`:

* :class:`MaskedDiffusionScheduler` (Diffusion-BERT): ``set_timesteps(steps, t_start)`` lays out times
  ``t_start = t_0 > t_1 > ... > t_steps = 0``; ``step`` reveals each masked position of ``x_t`` with the
  probability the model's *trained* masking schedule gives (MDLM's reverse posterior), draws the revealed tokens
  under the constraint rules, and carries every unmasked token through.
* :class:`GaussianDiffusionScheduler` (Diffusion-LM): the respaced DDPM/DDIM chain of the model's Gaussian
  schedule; ``step`` goes from ``x_k`` to ``x_{k-1}`` given the predicted ``x_0``.

The masked reverse step, for a schedule with keep-probability ``alpha`` (``composition_lm.schedules``): a masked
token at time ``t`` becomes token ``v`` at time ``s < t`` with probability ``p(v) (alpha_v(s) - alpha_v(t)) /
(1 - alpha_v(t))`` and stays masked otherwise (MDLM, Sahoo et al. 2024; per-token alphas as in Shi et al. 2024's
generalised masked diffusion). For ``linear`` and ``loglinear`` the ratio is ``(t - s) / t`` for every token. For
``spindle`` (DiffusionBERT) it depends on the token: the reveal probability of a position is ``sum_v p(v) r_v`` and a
revealed token is drawn from ``p(v) r_v``, so informative tokens come out later, as the model was trained.
"""

from __future__ import annotations

import torch

from composition_lm.tokenizer import EOS, MASK, PAD

__all__ = ["GaussianDiffusionScheduler", "MaskedDiffusionScheduler"]


class MaskedDiffusionScheduler:
    """Reverse steps of masked (absorbing-state) diffusion under a :class:`~composition_lm.schedules.MaskingSchedule`."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.timesteps: list[tuple[float, float]] = []

    def set_timesteps(self, steps: int, t_start: float = 1.0) -> None:
        """``steps`` equal steps from ``t_start`` down to 0: ``self.timesteps`` holds each step's ``(t, s)``."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.timesteps = [(t_start * (1 - i / steps), t_start * (1 - (i + 1) / steps)) for i in range(steps)]

    @property
    def per_token(self) -> bool:
        """Whether the reveal probability depends on the token (``spindle``)."""
        return self.schedule.name == "spindle"

    def token_reveal(self, t: float, s: float, vocab_size: int, device) -> torch.Tensor:
        """``[V]``: the probability that a position masked at ``t`` holding token ``v`` is revealed by ``s``,
        ``(alpha_v(s) - alpha_v(t)) / (1 - alpha_v(t))``."""
        tokens = torch.arange(vocab_size, device=device)[None]
        a_t = self.schedule.token_alpha(torch.tensor([t], device=device), tokens)[0]
        a_s = self.schedule.token_alpha(torch.tensor([s], device=device), tokens)[0]
        return ((a_s - a_t) / (1 - a_t).clamp_min(1e-12)).clamp(0.0, 1.0)

    def step(self, x: torch.Tensor, probs: torch.Tensor, t: float, s: float, generator: torch.Generator,
             rules) -> torch.Tensor:
        """``x_s`` from ``x_t`` (``[B, L]`` ids) and the denoiser's ``probs`` (``[B, L, V]``, each row's
        ``p(x_0)``): masked positions revealed and drawn under ``rules``
        (:class:`~composition_lm.sampling.LogitRules`), revealed tokens carried through, and everything after a
        row's first ``[EOS]``/``[PAD]`` set to ``[PAD]`` (certain, so the denoiser sees the length and finished rows
        need no further predictions)."""
        u = torch.rand(x.shape, generator=generator, device=x.device)
        if self.per_token:
            r = self.token_reveal(t, s, probs.shape[-1], probs.device)
            joint = probs * r  # p(reveal now as v)
            reveal = (x == MASK) & (u < joint.sum(-1) / probs.sum(-1).clamp_min(1e-30))
            probs = joint
        else:  # linear / loglinear: (alpha(s) - alpha(t)) / (1 - alpha(t)) = (t - s) / t for every token
            reveal = (x == MASK) & (u < (t - s) / t)
        x = rules.assign(x, probs, reveal, generator)
        ended = (x == EOS) | (x == PAD)
        return torch.where(((ended.cumsum(1) - ended.long()) > 0) & (x == MASK), torch.full_like(x, PAD), x)


class GaussianDiffusionScheduler:
    """The respaced reverse chain of a :class:`~composition_lm.schedules.GaussianSchedule` (DDPM or DDIM)."""

    def __init__(self, schedule, method: str = "ddpm", noise_scale: float = 1.0):
        self.base, self.method, self.noise_scale = schedule, method, noise_scale
        self.schedule = schedule
        self.timesteps: list[int] = []

    def set_timesteps(self, steps: int, k_start: int | None = None) -> None:
        """A ``steps``-step chain (respaced); ``self.timesteps`` runs from ``k_start`` (default: its last index)
        down to 0."""
        self.schedule = self.base.respace(steps)
        k_start = len(self.schedule) - 1 if k_start is None else k_start
        self.timesteps = list(reversed(range(k_start + 1)))

    def start_from(self, k_start: int) -> None:
        """Run the chain already laid out from index ``k_start`` (a re-noised row) down to 0."""
        self.timesteps = list(reversed(range(k_start + 1)))

    def model_time(self, k: int) -> torch.Tensor:
        """The original (training) step index of chain step ``k``: what the denoiser is conditioned on."""
        return self.schedule.timesteps[k]

    def step(self, x0_hat: torch.Tensor, k: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x_{k-1}`` from ``x_k`` and the predicted ``x_0``."""
        return self.schedule.step(x0_hat, k, x, generator, self.method, noise_scale=self.noise_scale)
