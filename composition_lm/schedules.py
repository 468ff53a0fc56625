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

Gaussian schedules (:class:`GaussianSchedule`, for Diffusion-LM) are discrete, ``T`` steps, and give
``alpha_bar[t]`` for ``t = 0 .. T-1`` (``q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I)``):

* ``sqrt`` (Diffusion-LM, Li et al. 2022): ``alpha_bar(t) = 1 - sqrt(t / T + s)``, ``s = 1e-4`` (normalised
  by its value at 0, as in Diffusion-LM's code, so step k has ``f((k + 1) / T) / f(0)``): a
  large jump of noise at the first steps, so the model spends its capacity where rounding is decided;
* ``cosine`` (Nichol & Dhariwal 2021); ``linear`` (DDPM betas ``1e-4 .. 0.02``, rescaled to ``T``).

Its :meth:`GaussianSchedule.respace` gives the timesteps and betas of a shorter chain (improved
diffusion's respacing); :meth:`GaussianSchedule.step` is one reverse step (DDPM or DDIM) from a
predicted ``x_0``. Training ``T`` and the number of sampling steps are independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MaskingSchedule", "mask_tokens", "token_information", "stratified_uniform", "GaussianSchedule", "GAUSSIAN_SCHEDULES"]

MASKING_SCHEDULES = ("loglinear", "linear", "spindle")


def stratified_uniform(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` training times in [0, 1): one uniform offset plus ``n`` evenly spaced points (MDLM's
    low-discrepancy sampler), so every batch covers the whole time range."""
    u = torch.rand(1, generator=generator, device=device)
    return (u + torch.arange(n, device=device) / n) % 1.0


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


# ------------------------------------------------------------------------------------------------
# Gaussian schedules (Diffusion-LM)
GAUSSIAN_SCHEDULES = ("sqrt", "cosine", "linear")


def _betas_from_alpha_bar(fn, steps: int, max_beta: float = 0.999) -> torch.Tensor:
    t = torch.arange(steps, dtype=torch.float64)
    return (1 - fn((t + 1) / steps) / fn(t / steps)).clamp(max=max_beta)


def gaussian_betas(name: str, steps: int) -> torch.Tensor:
    """``beta_1 .. beta_T`` (float64) of a named schedule."""
    if name == "sqrt":
        return _betas_from_alpha_bar(lambda u: 1 - torch.sqrt(u + 1e-4), steps)
    if name == "cosine":
        return _betas_from_alpha_bar(lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2, steps)
    if name == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    raise ValueError(f"unknown Gaussian schedule {name!r}; choose one of {', '.join(GAUSSIAN_SCHEDULES)}")


class GaussianSchedule:
    """A discrete Gaussian diffusion schedule of ``T`` steps (or a respaced sub-chain of one).

    ``timesteps[k]`` is the original step index of chain step ``k``; ``alpha_bar[k]`` its cumulative
    signal level. Everything is float64 and moved to the data's device and dtype on use.
    """

    def __init__(self, name: str = "sqrt", steps: int = 2000, betas: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None):
        self.name, self.num_train_steps = name, steps
        self.betas = gaussian_betas(name, steps) if betas is None else betas
        self.timesteps = torch.arange(len(self.betas)) if timesteps is None else timesteps
        self.alpha_bar = torch.cumprod(1 - self.betas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    def __len__(self) -> int:
        return len(self.betas)

    @staticmethod
    def _at(values: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[k]`` shaped to broadcast against ``like`` (``[B, ...]``)."""
        v = values.to(like.device)[k.to(like.device)].to(like.dtype)
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of ``q(x_k | x_0)`` given the standard normal ``noise`` (pure function)."""
        ab = self._at(self.alpha_bar, k, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def respace(self, n: int) -> "GaussianSchedule":
        """The ``n``-step chain on evenly spaced original steps (always including the last, and the
        first when ``n > 1``), with betas chosen so that its ``alpha_bar`` equals the original one at
        those steps."""
        if not 1 <= n <= len(self):
            raise ValueError(f"sampling steps must be between 1 and {len(self)}, got {n}")
        keep = torch.unique(torch.linspace(len(self) - 1, 0, n).round().long())  # n = 1: the last step
        ab = self.alpha_bar[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return GaussianSchedule(self.name, self.num_train_steps, betas=1 - ab / prev,
                                timesteps=self.timesteps[keep])

    def step(self, x0_hat: torch.Tensor, k: int, xt: torch.Tensor, generator: torch.Generator | None,
             method: str = "ddpm", eta: float = 0.0, noise_scale: float = 1.0) -> torch.Tensor:
        """``x_{k-1}`` from ``x_k`` and the predicted ``x_0`` (chain index ``k``; ``k = 0`` gives ``x_0``'s
        posterior mean, no noise). ``ddpm``: the posterior ``q(x_{k-1} | x_k, x_0)``; ``ddim``: the DDIM
        update with noise ``eta`` (0 = deterministic). ``noise_scale`` multiplies the standard deviation of
        the added noise (< 1 keeps the chain nearer the modes, like a sampling temperature)."""
        ab, ab_prev = float(self.alpha_bar[k]), float(self.alpha_bar_prev[k])
        if method == "ddpm":
            beta = float(self.betas[k])
            mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0_hat + (
                math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * xt
            var = beta * (1 - ab_prev) / (1 - ab)
        elif method == "ddim":
            eps = (xt - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
            var = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            mean = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - var, 0.0)) * eps
        else:
            raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
        if k == 0 or var <= 0 or noise_scale == 0:
            return mean
        noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        return mean + noise_scale * math.sqrt(var) * noise
