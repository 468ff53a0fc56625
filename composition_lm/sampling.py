"""Sampling formulas from a masked-diffusion model, with element constraints inside the sampler.

The reverse process (MDLM's ancestral sampler) starts from ``[BOS] [MASK] ... [MASK]`` and over ``K``
steps from ``t = 1`` to ``0`` unmasks each still-masked position with probability
``(alpha(s) - alpha(t)) / (1 - alpha(t))``, drawing its token from the denoiser's prediction.
Unmasked tokens are never changed. A time-agnostic denoiser gives the same prediction for the same
input, so when no token changed in a step the previous prediction is reused (MDLM's cache).

Constraints (:mod:`composition_lm.constraints`) are logit masks, applied while sampling, never filters afterwards.

Every sampler takes a ``torch.Generator``; the same generator state gives the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from composition_lm.conditions import null_conditions, sample_conditions
from composition_lm.constraints import ConstraintError, Constraints, LogitRules  # noqa: F401 (re-exported)
from composition_lm.decoding import decode_samples
from composition_lm.models import is_gaussian
from composition_lm.sampling_config import SamplingConfig
from composition_lm.schedulers import GaussianDiffusionScheduler, MaskedDiffusionScheduler
from composition_lm.schedules import MaskingSchedule
from composition_lm.tokenizer import BOS, MASK
from composition_lm.valid_sampling import (
    ExactDecoder,
    RepairStats,
    RowValidator,
    ValiditySettings,
    renoise_gaussian,
    renoise_masked,
    repair,
)
from evaluation.composition import Formula

__all__ = ["ConstraintError", "Constraints", "GaussianDenoiser", "LogitRules", "MaskedDenoiser", "decode_samples",
           "denoise_gaussian", "denoise_masked", "generate", "sample_gaussian_diffusion", "sample_masked_diffusion"]


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                   min_p: float | None = None) -> torch.Tensor:
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bfloat16 where the hardware runs it fast (CUDA with bf16, CPUs with oneDNN bf16 such
    as AVX512-BF16/AMX), else float32. Returns the autocast dtype, or None for plain float32."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context when ``dtype`` is None (plain float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class MaskedDenoiser:
    """``p(x_0 | x_t)`` of a masked-diffusion denoiser as the sampler uses it: the rules' static mask, optional
    classifier-free ``guidance``, then ``temperature`` / ``top_k`` / ``top_p``. It never puts probability on
    ``[MASK]`` (the static mask excludes it). ``counter[0]`` (if given) grows by the rows it evaluates.

    ``guidance`` (Schiff et al. 2024; rows start with a condition token): the same rows are also run with
    ``[BOS]`` at position 0 (unconditional) in one batched pass, and tokens are drawn from
    ``p(x | c)^gamma * p(x)^(1 - gamma)``, renormalised (``gamma = 1``: plain conditional sampling). Property
    ``conditions`` (``[B, P]``) are the condition c; the unconditional pass sets them to "not given"
    (:func:`~composition_lm.conditions.null_conditions`)."""

    def __init__(self, model, rules: LogitRules, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, guidance: float | None = None, autocast_dtype: torch.dtype | None = None,
                 counter: list[int] | None = None, min_p: float | None = None):
        self.model, self.temperature, self.top_k, self.top_p, self.min_p = model, temperature, top_k, top_p, min_p
        self.guided = guidance is not None and guidance != 1.0
        self.guidance, self.autocast_dtype, self.counter = guidance, autocast_dtype, counter
        self.time_conditioning = getattr(getattr(model, "config", None), "time_conditioning", False)
        self.static = rules.static.to(next(model.parameters()).device)

    def __call__(self, inputs: torch.Tensor, t: float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, V]`` token probabilities for rows ``inputs`` at time ``t``."""
        device = inputs.device
        if self.guided:  # the same rows without their condition (start token, properties), in the same pass
            plain = inputs.clone()
            plain[:, 0] = BOS
            inputs = torch.cat([inputs, plain])
            cond = torch.cat([cond, null_conditions(cond)]) if cond is not None else None
        if self.counter is not None:
            self.counter[0] += len(inputs)
        with _autocast(device, self.autocast_dtype):
            tt = torch.full((len(inputs),), t, device=device) if self.time_conditioning else None
            out = self.model(inputs, tt) if cond is None else self.model(inputs, tt, conditions=cond)
            logits = out.float().masked_fill(~self.static, -torch.inf)
        if self.guided:
            cond_lp, uncond_lp = logits.log_softmax(-1).chunk(2)
            logits = self.guidance * cond_lp + (1 - self.guidance) * uncond_lp
            logits = logits.masked_fill(~self.static, -torch.inf)  # -inf - -inf: keep disallowed tokens out
        return _filter_logits(logits, self.temperature, self.top_k, self.top_p, self.min_p)


@torch.inference_mode()
def denoise_masked(denoiser: MaskedDenoiser, x: torch.Tensor, scheduler: MaskedDiffusionScheduler,
                   generator: torch.Generator, rules: LogitRules, conditions: torch.Tensor | None = None,
                   hooks: Sequence[Callable] = ()) -> torch.Tensor:
    """The reverse process over ``scheduler.timesteps`` on rows ``x`` (``[B, L]`` ids whose masked positions are
    ``[MASK]``): the denoiser predicts, the scheduler's :meth:`~MaskedDiffusionScheduler.step` reveals and draws,
    and each hook ``hook(before, after, probs) -> after`` may amend the step's result (the exact decoder,
    :class:`~composition_lm.valid_sampling.ExactDecoder`). A time-agnostic denoiser is asked again only for rows
    that changed (MDLM's cache); finished rows are not asked at all."""
    n = x.shape[0]

    def predict(rows: torch.Tensor, t: float) -> torch.Tensor:
        return denoiser(x[rows], t, None if conditions is None else conditions[rows])

    probs = predict(torch.arange(n, device=x.device), scheduler.timesteps[0][0])
    last = x.clone()
    for i, (t, s) in enumerate(scheduler.timesteps):
        stale = (torch.ones(n, dtype=torch.bool, device=x.device) if denoiser.time_conditioning
                 else (x != last).any(1))
        stale &= (x == MASK).any(1)  # a finished row needs no prediction
        if i and stale.any():
            rows = stale.nonzero().squeeze(1)
            probs[rows], last[rows] = predict(rows, t), x[rows]
        before = x
        x = scheduler.step(x, probs, t, s, generator, rules)
        for hook in hooks:
            x = hook(before, x, probs)
    return x


def sample_masked_diffusion(model, n: int, steps: int, generator: torch.Generator, rules: LogitRules, *,
                            start_token: int = BOS, conditions: torch.Tensor | None = None,
                            hooks: Sequence[Callable] = (), **denoiser) -> torch.Tensor:
    """``n`` sequences (``[n, L]`` token ids) from a masked-diffusion model in ``steps`` steps of its trained
    schedule. ``start_token`` stands at position 0: ``[BOS]``, or a condition token (``[VALID]``) of a
    validity-conditioned model; ``denoiser``: :class:`MaskedDenoiser`'s settings (temperature, guidance, ...)."""
    device = next(model.parameters()).device
    x = torch.full((n, rules.length), MASK, dtype=torch.long, device=device)
    x[:, 0] = start_token
    config = getattr(model, "config", None)  # a bare denoiser (no config): the default schedule
    scheduler = MaskedDiffusionScheduler(config.masking_schedule() if config is not None else MaskingSchedule())
    scheduler.set_timesteps(steps)
    return denoise_masked(MaskedDenoiser(model, rules, **denoiser), x, scheduler, generator, rules, conditions,
                          hooks)


def _nearest_tokens(x: torch.Tensor, emb: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``-|x - E_v|^2`` for every token ``v`` (``[B, L, V]``); tokens not ``allowed`` ([L, V]) get -inf."""
    x32, e32 = x.float(), emb.float()
    scores = 2 * x32 @ e32.t() - (e32 * e32).sum(-1) - (x32 * x32).sum(-1, keepdim=True)
    return scores if allowed is None else scores.masked_fill(~allowed, -torch.inf)


class GaussianDenoiser:
    """The predicted ``x_0`` of a Diffusion-LM denoiser as the sampler uses it. Property ``conditions`` condition
    each prediction; with ``guidance`` (classifier-free, Ho & Salimans 2022) the unconditional prediction (every
    condition not given) comes from the same batched pass and ``x0_uncond + gamma (x0_cond - x0_uncond)`` is used.
    With ``clamp`` each prediction is snapped to the nearest embedding the rules allow at its position."""

    def __init__(self, model, rules: LogitRules, clamp: bool = False, guidance: float | None = None,
                 autocast_dtype: torch.dtype | None = None, counter: list[int] | None = None):
        self.model, self.clamp, self.guidance, self.autocast_dtype, self.counter = (model, clamp, guidance,
                                                                                   autocast_dtype, counter)
        self.emb = model.embedding_matrix.detach()
        self.static = rules.static.to(self.emb.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        n, device = x.shape[0], x.device
        t = t.to(device)
        guided = conditions is not None and self.guidance is not None and self.guidance != 1.0
        if self.counter is not None:
            self.counter[0] += 2 * n if guided else n
        with _autocast(device, self.autocast_dtype):
            if guided:
                both = self.model(torch.cat([x, x]), t.expand(2 * n),
                                  conditions=torch.cat([conditions, null_conditions(conditions)])).float()
                cond, uncond = both[:n], both[n:]
                x0 = uncond + self.guidance * (cond - uncond)
            elif conditions is not None:
                x0 = self.model(x, t.expand(n), conditions=conditions).float()
            else:
                x0 = self.model(x, t.expand(n)).float()
        return self.emb[_nearest_tokens(x0, self.emb, self.static).argmax(-1)] if self.clamp else x0


@torch.inference_mode()
def denoise_gaussian(denoiser: GaussianDenoiser, x: torch.Tensor, scheduler: GaussianDiffusionScheduler,
                     generator: torch.Generator, rules: LogitRules, conditions: torch.Tensor | None = None,
                     exact: ExactDecoder | None = None) -> torch.Tensor:
    """Token ids (``[B, L]``) from ``x`` (``[B, L, D]``): the reverse chain over ``scheduler.timesteps`` down to
    ``x_0``, rounded to the nearest tokens the rules allow (left to right, so that ``require``/``max_elements``
    hold). ``exact`` (an :class:`~composition_lm.valid_sampling.ExactDecoder`) then rounds the last content
    position(s) of each invalid row to the nearest token that makes it valid."""
    n = x.shape[0]
    for k in scheduler.timesteps:
        x = scheduler.step(denoiser(x, scheduler.model_time(k), conditions), k, x, generator)
    ids = torch.full((n, rules.length), MASK, dtype=torch.long, device=x.device)
    ids[:, 0] = BOS
    choose = torch.ones_like(ids, dtype=torch.bool)
    choose[:, 0] = False
    scores = _nearest_tokens(x, denoiser.emb, denoiser.static)
    out = rules.assign(ids, scores, choose, generator, greedy=True)
    return out if exact is None else exact(ids, out, scores, greedy=True)


def sample_gaussian_diffusion(model, n: int, steps: int, generator: torch.Generator, rules: LogitRules, *,
                              method: str = "ddpm", noise_scale: float = 1.0, conditions: torch.Tensor | None = None,
                              exact: ExactDecoder | None = None, **denoiser) -> torch.Tensor:
    """``n`` sequences (``[n, L]`` token ids) from a Diffusion-LM model: a respaced ``steps``-step DDPM/DDIM chain
    from ``N(0, I)`` with the reverse-process noise scaled by ``noise_scale``, rounded to tokens
    (:func:`denoise_gaussian`); ``denoiser``: :class:`GaussianDenoiser`'s settings (clamp, guidance, ...)."""
    device = next(model.parameters()).device
    cfg = model.config
    scheduler = GaussianDiffusionScheduler(cfg.gaussian_schedule(), method, noise_scale)
    scheduler.set_timesteps(steps)
    x = torch.randn((n, rules.length, cfg.embedding_dim), generator=generator, device=device)
    return denoise_gaussian(GaussianDenoiser(model, rules, **denoiser), x, scheduler, generator, rules, conditions,
                            exact)


#: the exact decoder's generator is seeded with the run's seed plus this
EXACT_SEED_OFFSET = 7919


def resolve_sampling_settings(cfg, steps: int | None = None, method: str | None = None,
                              clamp: bool | None = None, noise_scale: float | None = None) -> dict:
    """The sampling settings a run uses: what was asked, else the model's defaults (Diffusion-BERT:
    32 steps; Diffusion-LM: its config's ``sampling_steps`` (at most T), ``sampling_method``, ``clamp``,
    ``noise_scale``)."""
    if is_gaussian(cfg):
        if noise_scale is not None and not 0 <= noise_scale <= 1:
            raise ValueError(f"noise scale must lie in [0, 1], got {noise_scale}")
        return {"steps": steps or min(cfg.sampling_steps, cfg.diffusion_steps),
                "method": method or cfg.sampling_method, "clamp": cfg.clamp if clamp is None else clamp,
                "noise_scale": getattr(cfg, "noise_scale", 1.0) if noise_scale is None else noise_scale}
    return {"steps": steps or 32, "method": None, "clamp": None, "noise_scale": None}


def _check_family(cfg, config: SamplingConfig, targets: list) -> str | None:
    """The settings a model family refuses, as a ValueError; returns the resolved validity condition."""
    condition = config.condition
    if is_gaussian(cfg):
        if condition not in ("auto", None):
            raise ValueError("Diffusion-LM models take no validity condition")
        if config.temperature != 1.0 or config.top_k or config.top_p is not None or config.min_p is not None:
            raise ValueError("temperature, top-k, top-p and min-p apply to Diffusion-BERT; a Diffusion-LM samples through "
                             "its reverse process (tune --steps, --method, --clamp, --noise-scale)")
        if config.guidance is not None and not targets:
            raise ValueError("guidance needs property targets to guide towards (--target NAME=LO:HI)")
        return None
    if config.method is not None or config.clamp is not None or config.noise_scale is not None:
        raise ValueError("--method, --clamp and --noise-scale apply to Diffusion-LM models, not to Diffusion-BERT")
    if condition == "auto":
        condition = "valid" if getattr(cfg, "validity_conditioning", False) else None
    if config.guidance is not None and condition is None and not targets:
        raise ValueError("guidance needs a condition to guide towards: a validity-conditioned model sampled "
                         "with condition valid or invalid, or property targets")
    return condition


def generate(loaded, n: int, seed: int = 0, config: SamplingConfig | None = None, progress: bool = True,
             stats: RepairStats | None = None, **overrides) -> list[tuple[str, Formula | None, str]]:
    """``n`` formulas from a model, in batches: ``(raw text, formula or None, parse error)`` per sample.
    ``loaded`` is a :class:`composition_lm.models.LoadedModel` or the model itself (anything with ``.config`` and
    parameters); ``config`` (:class:`~composition_lm.sampling_config.SamplingConfig`, default: its defaults) with
    ``overrides`` (its field names) says how.

    Both model families: Diffusion-BERT (masked diffusion, :class:`MaskedDiffusionScheduler` under the schedule it
    trained with) and Diffusion-LM (:class:`GaussianDiffusionScheduler`). One ``torch.Generator`` seeded with
    ``seed`` drives every batch, so the same arguments give the same samples. A validity protocol
    (``config.validity``) makes the sampler decode each row's last revealed token exactly
    (:class:`~composition_lm.valid_sampling.ExactDecoder`, a step hook) and re-noise and re-denoise every row that
    still fails, at most ``validity_rounds`` times (:func:`~composition_lm.valid_sampling.repair`); ``stats``
    receives what that cost. ``targets`` (property windows of a property-conditioned model): each sample is
    conditioned on a bin (or rank) drawn within each window (:func:`~composition_lm.conditions.sample_conditions`).
    """
    from tqdm.auto import tqdm

    config = (config or SamplingConfig()).replace(**overrides)
    run = _SamplingRun(getattr(loaded, "model", loaded), config, n, seed)
    batches = []
    with tqdm(total=n, desc="sample", unit="formula", disable=not progress) as bar:
        for start in range(0, n, config.batch_size):
            k = min(config.batch_size, n - start)
            batches.append(run.first_pass(start, k))
            bar.update(k)
    ids = torch.cat(batches)
    run_stats = RepairStats(samples=n)
    if run.guard:  # one repair loop over every batch's failing rows: few, so pooled into full batches
        ids, _, _, run_stats = repair(ids, run.validator, run.redo, run.guard.rounds, run.guard.keep_elements)
    run_stats.denoiser_rows_first_pass = run.calls[0]
    if stats is not None:
        stats.add(run_stats)
        if run.exact is not None:
            stats.exact_fixed += run.exact.stats["fixed"]
            stats.exact_candidates += run.exact.stats["candidates"]
    return decode_samples(ids, run.cfg.codec, run.cfg.max_count)


class _SamplingRun:
    """The pieces of one :func:`generate` call, built once: the constraint rules, the scheduler of the model's
    family, a denoiser for the first pass and one for repairs (each counting its rows), the validity guard and its
    exact decoder (a step hook), and the run's ``torch.Generator``."""

    def __init__(self, model, config: SamplingConfig, n: int, seed: int):
        from composition_lm.conditions import parse_target

        self.model, self.config, self.cfg = model, config, model.config
        cfg = self.cfg
        self.gaussian = is_gaussian(cfg)
        targets = [parse_target(t) for t in config.targets or []]
        condition = _check_family(cfg, config, targets)
        self.steps, method, clamp, noise_scale = resolve_sampling_settings(cfg, config.steps, config.method,
                                                                           config.clamp, config.noise_scale).values()
        constraints = Constraints(elements=config.elements, require=config.require or [],
                                  exclude=config.exclude or [], max_elements=config.max_elements)
        self.rules = rules = LogitRules(constraints, cfg.codec, cfg.seq_length, cfg.vocab_size, cfg.max_count)
        self.device = device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.conditions = sample_conditions(cfg, targets, n, self.generator).to(device) if targets else None
        autocast_dtype = resolve_dtype(config.dtype, device)
        guard = ValiditySettings(config.validity, config.validity_rounds, config.validity_t,
                                 config.validity_keep_elements, config.validity_exact)
        self.guard = guard if guard.active else None
        self.validator = RowValidator(guard.protocol, cfg.codec, cfg.max_count) if self.guard else None
        # the exact decoder draws from a generator of its own: rows it leaves alone are the raw samples
        self.exact = (ExactDecoder(self.validator, rules,
                                   torch.Generator(device=device).manual_seed(seed + EXACT_SEED_OFFSET),
                                   keep_elements=guard.keep_elements) if self.guard and guard.exact else None)
        self.calls, self.repair_calls = [0], [0]
        if self.gaussian:
            self.scheduler = GaussianDiffusionScheduler(cfg.gaussian_schedule(), method, noise_scale)
            self.scheduler.set_timesteps(self.steps)
            self.first = GaussianDenoiser(model, rules, clamp, config.guidance, autocast_dtype, self.calls)
            self.again = GaussianDenoiser(model, rules, clamp, config.guidance, autocast_dtype, self.repair_calls)
        else:
            self.scheduler = MaskedDiffusionScheduler(cfg.masking_schedule())
            options = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                           min_p=config.min_p, guidance=config.guidance, autocast_dtype=autocast_dtype)
            self.first = MaskedDenoiser(model, rules, counter=self.calls, **options)
            self.again = MaskedDenoiser(model, rules, counter=self.repair_calls, **options)
            self.start_token = cfg.start_token_id(condition)
        self.hooks = () if self.exact is None else (self.exact,)

    def denoise(self, x: torch.Tensor, denoiser, cond: torch.Tensor | None, t: float = 1.0) -> torch.Tensor:
        """Rows ``x`` (all noise or masks, or re-noised to level ``t``) denoised to token ids."""
        if self.gaussian:
            return denoise_gaussian(denoiser, x, self.scheduler, self.generator, self.rules, cond, self.exact)
        self.scheduler.set_timesteps(max(1, math.ceil(self.steps * t)), t_start=t)
        return denoise_masked(denoiser, x, self.scheduler, self.generator, self.rules, cond, self.hooks)

    def first_pass(self, start: int, k: int) -> torch.Tensor:
        """Samples ``start .. start + k`` of the run, from pure noise (or all masks)."""
        cond = None if self.conditions is None else self.conditions[start:start + k]
        if self.gaussian:
            x = torch.randn((k, self.rules.length, self.cfg.embedding_dim), generator=self.generator,
                            device=self.device)
        else:
            x = torch.full((k, self.rules.length), MASK, dtype=torch.long, device=self.device)
            x[:, 0] = self.start_token
        return self.denoise(x, self.first, cond)

    def redo(self, rows: torch.Tensor, round_: int, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Failing rows (at positions ``index`` of the run) re-noised to the round's level and denoised
        again (``batch_size`` rows at a time); also the denoiser evaluations."""
        self.repair_calls[0] = 0
        t = self.guard.level(round_)
        done = []
        size = self.config.batch_size
        for part, where in zip(rows.split(size), index.split(size)):
            cond = None if self.conditions is None else self.conditions[where]
            if self.gaussian:
                xk, k = renoise_gaussian(self.scheduler.schedule, self.model.embedding_matrix.detach()[part], t,
                                         self.generator)
                self.scheduler.start_from(k)
                done.append(self.denoise(xk, self.again, cond))
            else:
                done.append(self.denoise(renoise_masked(part, t, self.generator), self.again, cond, t))
        if self.gaussian:
            self.scheduler.set_timesteps(self.steps)
        return torch.cat(done), self.repair_calls[0]
