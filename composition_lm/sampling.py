"""Sampling formulas from a masked-diffusion model, with element constraints inside the sampler.

The reverse process (MDLM's ancestral sampler) starts from ``[BOS] [MASK] ... [MASK]`` and over ``K``
steps from ``t = 1`` to ``0`` unmasks each still-masked position with probability
``(alpha(s) - alpha(t)) / (1 - alpha(t))``, drawing its token from the denoiser's prediction.
Unmasked tokens are never changed. A time-agnostic denoiser gives the same prediction for the same
input, so when no token changed in a step the previous prediction is reused (MDLM's cache).

Constraints (:class:`Constraints`) are logit masks, applied while sampling, never filters afterwards:

* ``elements`` (only these), ``exclude``: a static mask over element tokens;
* grammar: position 1 is never ``[EOS]``; a sequence ends at its first ``[EOS]`` or ``[PAD]`` and
  everything after it is ``[PAD]``; the compact codec alternates element and count positions, ends
  only at element positions and never repeats an element;
* ``require`` and ``max_elements``: positions decided in a step are assigned left to right so
  that the still-undecided slots before the end can always hold every missing required element, and
  an element that would exceed ``max_elements`` is masked.

Every sampler takes a ``torch.Generator``; the same generator state gives the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from composition_lm.conditions import null_conditions, sample_conditions
from composition_lm.formula import FormulaError, get_codec
from composition_lm.models import is_gaussian
from composition_lm.tokenizer import BOS, COUNT_OFFSET, ELEMENT_OFFSET, EOS, MASK, PAD
from composition_lm.valid_sampling import (
    ExactDecoder,
    RepairStats,
    RowValidator,
    ValiditySettings,
    element_presence,
    renoise_gaussian,
    renoise_masked,
    repair,
)
from evaluation.composition import ATOMIC_NUMBER, ELEMENTS, Formula

__all__ = ["ConstraintError", "Constraints", "LogitRules", "decode_samples", "denoise_gaussian", "denoise_masked",
           "generate", "sample_gaussian_diffusion", "sample_masked_diffusion"]


class ConstraintError(ValueError):
    """Constraints that no sample can satisfy (e.g. an unknown element, or require beyond max)."""


@dataclass
class Constraints:
    elements: list[str] | None = None  # only these elements
    require: list[str] = field(default_factory=list)  # every sample contains each of these
    exclude: list[str] = field(default_factory=list)  # never these
    max_elements: int | None = None  # at most this many distinct elements

    @property
    def active(self) -> bool:
        return bool(self.elements or self.require or self.exclude or self.max_elements)

    def as_dict(self) -> dict:
        return {"elements": self.elements, "require": self.require, "exclude": self.exclude,
                "max_elements": self.max_elements}


def _element_id(sym: str) -> int:
    return ELEMENT_OFFSET + ATOMIC_NUMBER[sym] - 1


class LogitRules:
    """Which token may stand at which position: a static ``[L, V]`` mask plus per-step rules."""

    def __init__(self, constraints: Constraints, codec: str, seq_length: int, vocab_size: int, max_count: int):
        c = constraints
        for name in [*(c.elements or []), *c.require, *c.exclude]:
            if name not in ATOMIC_NUMBER:
                raise ConstraintError(f"unknown element {name!r} (elements are symbols H..Lr, e.g. Li,Mn,O)")
        allowed_elements = set(c.elements) if c.elements else set(ELEMENTS)
        allowed_elements -= set(c.exclude)
        bad_req = [e for e in c.require if e not in allowed_elements]
        if bad_req:
            raise ConstraintError(f"required element(s) {', '.join(bad_req)} are excluded or not in --elements")
        if not allowed_elements:
            raise ConstraintError("no element is allowed by --elements/--exclude")
        if c.max_elements is not None and c.max_elements < max(1, len(set(c.require))):
            raise ConstraintError(f"--max-elements {c.max_elements} is below the {len(set(c.require))} required elements")
        self.compact = codec == "compact"
        width = 2 if self.compact else 1
        if len(set(c.require)) * width + 1 > seq_length - 1:
            raise ConstraintError(f"{len(set(c.require))} required elements do not fit in sequences of length {seq_length}")
        self.length, self.vocab = seq_length, vocab_size
        self.max_elements = c.max_elements
        self.element_ids = torch.tensor([_element_id(e) for e in ELEMENTS])
        self.required = torch.zeros(len(ELEMENTS), dtype=torch.bool)
        for e in c.require:
            self.required[ATOMIC_NUMBER[e] - 1] = True

        ok_el = torch.zeros(vocab_size, dtype=torch.bool)
        ok_el[[_element_id(e) for e in allowed_elements]] = True
        counts = torch.zeros(vocab_size, dtype=torch.bool)
        counts[COUNT_OFFSET + 1 : COUNT_OFFSET + max_count + 1] = True
        static = torch.zeros(seq_length, vocab_size, dtype=torch.bool)
        static[0, BOS] = True
        # compact: the k-th element sits at j = 2k - 1 and needs its count at j + 1
        last_element = seq_length - 1 if not self.compact else seq_length - 2
        if self.compact:  # compact never repeats an element: at most this many element slots
            cap = len(allowed_elements) if c.max_elements is None else min(c.max_elements, len(allowed_elements))
            last_element = min(last_element, 2 * cap - 1)
        self.slot_positions = torch.tensor(
            [1 <= j <= last_element and (not self.compact or j % 2 == 1) for j in range(seq_length)]
        )
        for j in range(1, seq_length):
            if not self.compact:
                static[j] = ok_el
                static[j, [EOS, PAD]] = j >= 2
            elif j % 2 == 1:  # element position (or the end)
                static[j] = ok_el & torch.tensor(j <= last_element)
                static[j, EOS] = 3 <= j <= last_element + 2
                static[j, PAD] = j >= 3
            else:  # count position
                static[j] = counts
                static[j, PAD] = True
        self.static = static
        self.last_end = last_element + 1 if self.compact else seq_length - 1
        self.dynamic = bool(c.require or c.max_elements or self.compact)

    # ----------------------------------------------------------------------------------------------
    def elements_ok(self, present: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: finished rows, given by the elements they hold (``[B, E]``,
        :func:`~composition_lm.valid_sampling.live_element_presence`), that hold every required element
        and at most ``max_elements`` distinct ones."""
        ok = ~(self.required.to(present.device)[None] & ~present).any(1)
        if self.max_elements is not None:
            ok &= present.sum(1) <= self.max_elements
        return ok

    @staticmethod
    def _draw(scores: torch.Tensor, allowed: torch.Tensor, generator, greedy: bool) -> torch.Tensor:
        """One token per row among ``allowed``: drawn from probabilities ``scores`` (uniform over the
        allowed ones if they all have probability 0) or, with ``greedy``, the highest score."""
        if greedy:
            return scores.masked_fill(~allowed, -torch.inf).argmax(-1)
        p = scores * allowed
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, allowed.to(p.dtype))
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def assign(self, x: torch.Tensor, probs: torch.Tensor, choose: torch.Tensor, generator,
               greedy: bool = False) -> torch.Tensor:
        """Draw tokens for positions ``choose`` ([B, L] bool) from ``probs`` ([B, L, V]) under the rules;
        with ``greedy``, ``probs`` may be any scores and the best allowed token is taken."""
        static = self.static.to(probs.device)
        if not self.dynamic:
            rows, cols = choose.nonzero(as_tuple=True)
            if rows.numel() == 0:
                return x
            x = x.clone()
            x[rows, cols] = self._draw(probs[rows, cols], static[cols], generator, greedy)
            return self._tidy_ends(x)
        x = x.clone()
        b, length = x.shape
        dev = x.device
        pos = torch.arange(length, device=dev)
        el_ids = self.element_ids.to(dev)
        required = self.required.to(dev)
        decided = x != MASK
        ended = decided & ((x == EOS) | (x == PAD))
        end = torch.where(ended, pos, torch.full_like(pos, length)).min(1).values  # first decided end, or L
        slot_pos = self.slot_positions.to(dev)
        for j in range(1, length):
            rows = choose[:, j].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e, dec, xr = end[rows], decided[rows], x[rows]
            # only elements before the end count; elements before j decide whether [EOS] may go here
            before_end = dec & (pos[None] < e[:, None])
            pr = element_presence(torch.where(before_end, xr, torch.full_like(xr, PAD)))

            def end_fits(p: int) -> torch.Tensor:
                """Could the sequence end at ``p``: do the required elements missing before ``p`` fit
                in the undecided slots before it?"""
                before = dec & (pos[None] < p)
                have = element_presence(torch.where(before, xr, torch.full_like(xr, PAD)))
                free = (~dec & slot_pos[None] & (pos[None] < p)).sum(1)
                return (required[None] & ~have).sum(1) <= free

            missing = required[None] & ~pr
            n_missing = missing.sum(1)
            # undecided slots after j and before the end that could still take a required element
            free_after = (~dec & slot_pos[None] & (pos[None] > j) & (pos[None] < e[:, None])).sum(1)
            eos_ok = end_fits(j)
            allowed = static[j][None].repeat(rows.numel(), 1)
            after_end = j > e
            # [EOS] (or [PAD], which also ends a sequence) may stand here if this is a legal end position
            # and the required elements still fit before it; an earlier end may replace a later one
            end_ok = static[j, EOS] & ~after_end & eos_ok
            allowed[:, EOS] = end_ok
            allowed[:, PAD] = after_end | end_ok | (j > self.last_end)
            if self.compact and j % 2 == 0:
                # [PAD] at a count position ends the sequence at the element position before it,
                # which must then be free to become the end (it is set to [PAD] below)
                prev_ok = (xr[:, j - 1] == MASK) & static[j - 1, EOS] & end_fits(j - 1)
                allowed[:, PAD] |= prev_ok & ~after_end
            el_ok = allowed[:, el_ids] & ~after_end[:, None]
            if self.compact:
                el_ok &= ~pr
            el_ok &= missing | (free_after >= n_missing)[:, None]
            if self.max_elements is not None:
                el_ok &= pr | missing | ((pr.sum(1) + n_missing + 1) <= self.max_elements)[:, None]
            allowed[:, el_ids] = el_ok
            if self.compact and j % 2 == 0:  # count position: a count, or [PAD] after the end
                allowed[:, COUNT_OFFSET + 1 :] &= ~after_end[:, None]
            if not bool(allowed.any(-1).all()):  # pragma: no cover - the invariant makes this unreachable
                raise RuntimeError("constraint bookkeeping left a position with no allowed token")
            tok = self._draw(probs[rows, j], allowed, generator, greedy)
            x[rows, j] = tok
            decided[rows, j] = True
            is_end = (tok == EOS) | (tok == PAD)
            end[rows] = torch.where(is_end, torch.minimum(end[rows], torch.full_like(tok, j)), end[rows])
            if self.compact and j % 2 == 0:
                pull = rows[(tok == PAD) & (x[rows, j - 1] == MASK)]
                x[pull, j - 1] = PAD
                decided[pull, j - 1] = True
                end[pull] = torch.minimum(end[pull], torch.full_like(end[pull], j - 1))
        return x

    @staticmethod
    def _tidy_ends(x: torch.Tensor) -> torch.Tensor:
        """Tokens after the first decided [EOS]/[PAD] become [PAD] (fast path only)."""
        ended = (x == EOS) | (x == PAD)
        after = (ended.cumsum(1) - ended.long()) > 0
        return torch.where(after & (x != MASK), torch.full_like(x, PAD), x)


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
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


@torch.inference_mode()
def denoise_masked(
    model,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    rules: LogitRules,
    t_start: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    time_conditioning: bool = False,
    autocast_dtype: torch.dtype | None = None,
    counter: list[int] | None = None,
    exact: ExactDecoder | None = None,
    guidance: float | None = None,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reverse process from time ``t_start`` to 0 in ``steps`` steps on rows ``x`` (``[B, L]`` ids
    whose masked positions are ``[MASK]``): each step reveals every masked position with probability
    ``(t - s) / t``; revealed tokens are carried through. ``counter[0]`` (if given) is increased by the
    number of rows the denoiser evaluates. ``exact`` (an :class:`ExactDecoder`) re-draws the last
    revealed token of each row the step completed invalid, among the tokens that make it valid.

    ``guidance`` (classifier-free guidance, Schiff et al. 2024; rows must start with a condition token):
    the denoiser is also run with ``[BOS]`` at position 0 (unconditional) and the tokens are drawn from
    ``p(x | c)^gamma * p(x)^(1 - gamma)``, renormalised (``gamma = 1``: plain conditional sampling, at
    one forward pass). ``conditions`` (``[B, P]`` property conditions of a property-conditioned model) are
    the condition c; the unconditional pass sets them to "not given"
    (:func:`~composition_lm.conditions.null_conditions`)."""
    device = x.device
    n = x.shape[0]
    static = rules.static.to(device)
    guided = guidance is not None and guidance != 1.0

    def predict(rows: torch.Tensor, t: float) -> torch.Tensor:
        inputs = x[rows]
        cond = conditions[rows] if conditions is not None else None
        if guided:  # the same rows without their condition (start token, properties), in the same pass
            plain = inputs.clone()
            plain[:, 0] = BOS
            inputs = torch.cat([inputs, plain])
            cond = torch.cat([cond, null_conditions(cond)]) if cond is not None else None
        if counter is not None:
            counter[0] += len(inputs)
        with _autocast(device, autocast_dtype):
            tt = torch.full((len(inputs),), t, device=device) if time_conditioning else None
            out = model(inputs, tt) if cond is None else model(inputs, tt, conditions=cond)
            logits = out.float().masked_fill(~static, -torch.inf)
        if guided:
            cond, uncond = logits.log_softmax(-1).chunk(2)
            logits = guidance * cond + (1 - guidance) * uncond
            logits = logits.masked_fill(~static, -torch.inf)  # -inf - -inf: keep disallowed tokens out
        return _filter_logits(logits, temperature, top_k, top_p)

    probs = predict(torch.arange(n, device=device), t_start)
    last = x.clone()
    for i in range(steps):
        t, s = t_start * (1 - i / steps), t_start * (1 - (i + 1) / steps)
        # MDLM's cache, per row: a time-agnostic denoiser gives the same answer for an unchanged row
        stale = torch.ones(n, dtype=torch.bool, device=device) if time_conditioning else (x != last).any(1)
        stale &= (x == MASK).any(1)  # a finished row needs no prediction
        if i and stale.any():
            rows = stale.nonzero().squeeze(1)
            probs[rows], last[rows] = predict(rows, t), x[rows]
        # linear marginal alpha(t) = 1 - t: a masked token is revealed now with prob (t - s) / t
        reveal = (x == MASK) & (torch.rand(x.shape, generator=generator, device=device) < (t - s) / t)
        before = x
        x = rules.assign(x, probs, reveal, generator)
        # everything after a row's first [EOS]/[PAD] is [PAD] with certainty: reveal it now, so the
        # denoiser sees the length, and finished rows need no further predictions
        ended = (x == EOS) | (x == PAD)
        x = torch.where(((ended.cumsum(1) - ended.long()) > 0) & (x == MASK), torch.full_like(x, PAD), x)
        if exact is not None:
            x = exact(before, x, probs)
    return x


@torch.inference_mode()
def sample_masked_diffusion(
    model,
    n: int,
    steps: int,
    generator: torch.Generator,
    rules: LogitRules,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    time_conditioning: bool = False,
    autocast_dtype: torch.dtype | None = None,
    start_token: int = BOS,
    counter: list[int] | None = None,
    exact: ExactDecoder | None = None,
    guidance: float | None = None,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` sequences (``[n, L]`` token ids) from a masked-diffusion denoiser in ``steps`` steps.

    ``start_token`` stands at position 0: ``[BOS]``, or a condition token (``[VALID]``) for a
    validity-conditioned model, optionally with classifier-free ``guidance`` (:func:`denoise_masked`)."""
    device = next(model.parameters()).device
    x = torch.full((n, rules.length), MASK, dtype=torch.long, device=device)
    x[:, 0] = start_token
    return denoise_masked(model, x, steps, generator, rules, 1.0, temperature, top_k, top_p, time_conditioning,
                          autocast_dtype, counter, exact, guidance, conditions)


def _nearest_tokens(x: torch.Tensor, emb: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``-|x - E_v|^2`` for every token ``v`` (``[B, L, V]``); tokens not ``allowed`` ([L, V]) get -inf."""
    x32, e32 = x.float(), emb.float()
    scores = 2 * x32 @ e32.t() - (e32 * e32).sum(-1) - (x32 * x32).sum(-1, keepdim=True)
    return scores if allowed is None else scores.masked_fill(~allowed, -torch.inf)


@torch.inference_mode()
def denoise_gaussian(
    model,
    x: torch.Tensor,
    schedule,
    k_start: int,
    generator: torch.Generator,
    rules: LogitRules,
    method: str = "ddpm",
    clamp: bool = False,
    autocast_dtype: torch.dtype | None = None,
    noise_scale: float = 1.0,
    counter: list[int] | None = None,
    exact: ExactDecoder | None = None,
    guidance: float | None = None,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids (``[B, L]``) from ``x`` (``[B, L, D]``, at chain index ``k_start`` of the respaced
    ``schedule``): the reverse chain down to ``x_0``, rounded to the nearest tokens the rules allow.

    ``conditions`` (``[B, P]`` property conditions) condition each prediction of ``x_0``; with ``guidance``
    (classifier-free, Ho & Salimans 2022, on the ``x_0`` prediction) the unconditional prediction (every
    condition not given) comes from the same batched pass and ``x0_uncond + gamma (x0_cond - x0_uncond)`` is used.

    Constraints act twice: clamping snaps each predicted ``x_0`` to the nearest embedding allowed at
    its position, and the final rounding takes the nearest token the rules allow (left to right,
    so that ``require``/``max_elements`` hold). ``exact`` (an :class:`ExactDecoder`) then rounds the
    last content position(s) of each invalid row to the nearest token that makes it valid."""
    device = x.device
    n = x.shape[0]
    emb = model.embedding_matrix.detach()
    static = rules.static.to(device)

    guided = conditions is not None and guidance is not None and guidance != 1.0

    def predict_x0(x: torch.Tensor, k: int) -> torch.Tensor:
        t = schedule.timesteps[k].to(device)
        if counter is not None:
            counter[0] += 2 * n if guided else n
        with _autocast(device, autocast_dtype):
            if guided:
                both = model(torch.cat([x, x]), t.expand(2 * n),
                             conditions=torch.cat([conditions, null_conditions(conditions)])).float()
                cond, uncond = both[:n], both[n:]
                x0 = uncond + guidance * (cond - uncond)
            elif conditions is not None:
                x0 = model(x, t.expand(n), conditions=conditions).float()
            else:
                x0 = model(x, t.expand(n)).float()
        return emb[_nearest_tokens(x0, emb, static).argmax(-1)] if clamp else x0

    for k in reversed(range(k_start + 1)):
        x = schedule.step(predict_x0(x, k), k, x, generator, method, noise_scale=noise_scale)
    ids = torch.full((n, rules.length), MASK, dtype=torch.long, device=device)
    ids[:, 0] = BOS
    choose = torch.ones_like(ids, dtype=torch.bool)
    choose[:, 0] = False
    scores = _nearest_tokens(x, emb, static)
    out = rules.assign(ids, scores, choose, generator, greedy=True)
    return out if exact is None else exact(ids, out, scores, greedy=True)


@torch.inference_mode()
def sample_gaussian_diffusion(
    model,
    n: int,
    steps: int,
    generator: torch.Generator,
    rules: LogitRules,
    method: str = "ddpm",
    clamp: bool = False,
    autocast_dtype: torch.dtype | None = None,
    noise_scale: float = 1.0,
    counter: list[int] | None = None,
    exact: ExactDecoder | None = None,
    guidance: float | None = None,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` sequences (``[n, L]`` token ids) from a Diffusion-LM model: a respaced ``steps``-step
    DDPM/DDIM chain from ``N(0, I)``, with the clamping trick if ``clamp`` and the reverse-process noise
    scaled by ``noise_scale``, rounded to tokens (:func:`denoise_gaussian`, which also takes the property
    ``conditions`` and ``guidance``)."""
    device = next(model.parameters()).device
    cfg = model.config
    schedule = cfg.gaussian_schedule().respace(steps)
    x = torch.randn((n, rules.length, cfg.embedding_dim), generator=generator, device=device)
    return denoise_gaussian(model, x, schedule, len(schedule) - 1, generator, rules, method, clamp, autocast_dtype,
                            noise_scale, counter, exact, guidance, conditions)


def decode_samples(ids: torch.Tensor, codec_name: str, max_count: int = 200) -> list[tuple[str, Formula | None, str]]:
    """Token ids -> ``(raw text, formula or None, error)`` per sequence."""
    codec = get_codec(codec_name, max_count=max_count) if codec_name == "compact" else get_codec(codec_name)
    out = []
    n_el = len(ELEMENTS)
    for row in ids.tolist():
        toks = []
        for i in row[1:]:
            if i in (EOS, PAD):  # a sequence ends at its first [EOS] or [PAD]
                break
            if i == MASK:
                continue
            if ELEMENT_OFFSET <= i < ELEMENT_OFFSET + n_el:
                toks.append(ELEMENTS[i - ELEMENT_OFFSET])
            elif i > COUNT_OFFSET:
                toks.append(str(i - COUNT_OFFSET))
            else:
                toks.append("[UNK]")
        raw = " ".join(toks)
        try:
            out.append((raw, codec.decode(toks), ""))
        except FormulaError as err:
            out.append((raw, None, str(err)))
    return out



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


def generate(
    loaded,
    n: int,
    steps: int | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    constraints: Constraints | None = None,
    progress: bool = True,
    dtype: str = "auto",
    condition: str | None = "auto",
    method: str | None = None,
    clamp: bool | None = None,
    noise_scale: float | None = None,
    validity: ValiditySettings | None = None,
    stats: RepairStats | None = None,
    guidance: float | None = None,
    targets: list | None = None,
) -> list[tuple[str, Formula | None, str]]:
    """``n`` formulas from a model, in batches. ``loaded`` is a :class:`composition_lm.models.LoadedModel`
    or the model itself (anything with ``.config`` and parameters).

    Works for both model families: Diffusion-BERT (masked diffusion; ``steps`` defaults to 32) and
    Diffusion-LM (Gaussian diffusion; ``steps``, ``method``, ``clamp`` and ``noise_scale`` default to the
    values in its config). One ``torch.Generator`` seeded with ``seed`` drives every batch, so the same arguments give the
    same samples. ``condition``: ``"valid"``, ``"invalid"`` or ``None`` (unconditional) for a
    validity-conditioned model; ``"auto"`` is ``"valid"`` for such a model and ``None`` otherwise.
    ``validity`` (:class:`~composition_lm.valid_sampling.ValiditySettings`; None: raw samples) makes the
    sampler decode each row's last revealed token exactly (:class:`~composition_lm.valid_sampling.ExactDecoder`)
    and re-noise and re-denoise every row that still fails the protocol, at most ``validity.rounds``
    times (:func:`~composition_lm.valid_sampling.repair`); ``stats``, if given, receives what that cost.
    ``targets`` (:class:`~composition_lm.conditions.Target` windows of a property-conditioned model of either
    family): each sample is conditioned on a bin (or rank) drawn within each window
    (:func:`~composition_lm.conditions.sample_conditions`). ``guidance``: classifier-free guidance scale towards
    ``condition`` or the targets (:func:`denoise_masked`, :func:`denoise_gaussian`).
    Returns ``(raw text, formula or None, parse error)`` per sample.
    """
    from tqdm.auto import tqdm

    model = getattr(loaded, "model", loaded)
    cfg = model.config
    gaussian = is_gaussian(cfg)
    if gaussian:
        if condition not in ("auto", None):
            raise ValueError("Diffusion-LM models take no validity condition")
        if temperature != 1.0 or top_k or top_p is not None:
            raise ValueError("temperature, top-k and top-p apply to Diffusion-BERT; a Diffusion-LM samples through "
                             "its reverse process (tune --steps, --method, --clamp, --noise-scale)")
    else:
        if method is not None or clamp is not None or noise_scale is not None:
            raise ValueError("--method, --clamp and --noise-scale apply to Diffusion-LM models, not to Diffusion-BERT")
        if condition == "auto":
            condition = "valid" if getattr(cfg, "validity_conditioning", False) else None
        start_token = cfg.start_token_id(condition)
        if guidance is not None and condition is None and not targets:
            raise ValueError("guidance needs a condition to guide towards: a validity-conditioned model sampled "
                             "with condition valid or invalid, or property targets")
    if gaussian and guidance is not None and not targets:
        raise ValueError("guidance needs property targets to guide towards (--target NAME=LO:HI)")
    if guidance is not None and guidance < 0:
        raise ValueError(f"the guidance scale must be >= 0, got {guidance}")
    steps, method, clamp, noise_scale = resolve_sampling_settings(cfg, steps, method, clamp, noise_scale).values()
    rules = LogitRules(constraints or Constraints(), cfg.codec, cfg.seq_length, cfg.vocab_size, cfg.max_count)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    conditions = None
    if targets:
        conditions = sample_conditions(cfg, targets, n, generator).to(device)
    autocast_dtype = resolve_dtype(dtype, device)
    time_conditioning = getattr(cfg, "time_conditioning", False)
    schedule = cfg.gaussian_schedule().respace(steps) if gaussian else None
    guard = validity if validity is not None and validity.active else None
    validator = RowValidator(guard.protocol, cfg.codec, cfg.max_count) if guard else None
    # the exact decoder draws from a generator of its own: rows it leaves alone are the raw samples
    exact = (ExactDecoder(validator, rules, torch.Generator(device=device).manual_seed(seed + EXACT_SEED_OFFSET),
                          keep_elements=guard.keep_elements) if guard and guard.exact else None)

    def redo(rows: torch.Tensor, round_: int, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Failing rows (at positions ``index`` of the run) re-noised to the round's level and denoised
        again (``batch_size`` rows at a time); also the denoiser evaluations."""
        calls = [0]
        t = guard.level(round_)
        done = []
        for part, where in zip(rows.split(batch_size), index.split(batch_size)):
            if gaussian:
                x0 = model.embedding_matrix.detach()[part]
                xk, k = renoise_gaussian(schedule, x0, t, generator)
                done.append(denoise_gaussian(model, xk, schedule, k, generator, rules, method, clamp, autocast_dtype,
                                             noise_scale, calls, exact, guidance,
                                             None if conditions is None else conditions[where]))
            else:
                done.append(denoise_masked(model, renoise_masked(part, t, generator), max(1, math.ceil(steps * t)),
                                           generator, rules, t, temperature, top_k, top_p, time_conditioning,
                                           autocast_dtype, calls, exact, guidance,
                                           None if conditions is None else conditions[where]))
        return torch.cat(done), calls[0]

    batches = []
    calls = [0]
    done = 0
    with tqdm(total=n, desc="sample", unit="formula", disable=not progress) as bar:
        while done < n:
            k = min(batch_size, n - done)
            if gaussian:
                ids = sample_gaussian_diffusion(model, k, steps, generator, rules, method, clamp, autocast_dtype,
                                                noise_scale, calls, exact, guidance,
                                                None if conditions is None else conditions[done:done + k])
            else:
                ids = sample_masked_diffusion(model, k, steps, generator, rules, temperature, top_k, top_p,
                                              time_conditioning=time_conditioning, autocast_dtype=autocast_dtype,
                                              start_token=start_token, counter=calls, exact=exact, guidance=guidance,
                                              conditions=None if conditions is None else conditions[done:done + k])
            batches.append(ids)
            done += k
            bar.update(k)
    ids = torch.cat(batches)
    run_stats = RepairStats(samples=n)
    if guard:  # one repair loop over every batch's failing rows: few, so pooled into full batches
        ids, _, _, run_stats = repair(ids, validator, redo, guard.rounds, guard.keep_elements)
    run_stats.denoiser_rows_first_pass = calls[0]
    if stats is not None:
        stats.add(run_stats)
    out = decode_samples(ids, cfg.codec, cfg.max_count)
    if stats is not None and exact is not None:
        stats.exact_fixed += exact.stats["fixed"]
        stats.exact_candidates += exact.stats["candidates"]
    return out
