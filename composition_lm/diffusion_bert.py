"""Diffusion-BERT: absorbing-state (masked) discrete diffusion over formula tokens.

The denoiser is a BERT encoder (``transformers.BertModel``) with a token-prediction head. Following
MDLM (Sahoo et al. 2024) and DiffusionBERT (He et al. 2023):

* the forward process masks tokens (:func:`composition_lm.schedules.mask_tokens`);
* the network predicts the clean token at every position but **never** ``[MASK]`` (nor ``[BOS]`` /
  ``[UNK]``): those logits are ``-inf``; unmasked tokens are carried through by the sampler;
* it is time-agnostic by default (the masked input already tells the noise level); set
  ``time_conditioning=True`` to add a sinusoidal time embedding to the token embeddings;
* the loss is the cross-entropy on masked positions, weighted by MDLM's continuous-time ELBO weight
  (``loss_weighting="elbo"``) or unweighted and averaged over masked tokens (``"uniform"``, as
  DiffusionBERT trained).

Sequences are ``[BOS] tokens [EOS] [PAD] ...`` of fixed length ``seq_length``; ``[EOS]`` and the pads
are part of what the model generates, so it learns the formula's length.

Validity conditioning (``validity_conditioning=True``): the start token is ``[VALID]`` or ``[INVALID]``
instead of ``[BOS]``, set from the training formula's SMACT validity (cdvae protocol). It is never
noised, so the denoiser learns what a valid formula looks like; sampling starts every sequence with
``[VALID]``. With probability ``condition_dropout`` a training sequence keeps ``[BOS]``, so the model
also samples unconditionally. :meth:`DiffusionBertModel.add_validity_conditioning` extends a trained
unconditional model for fine-tuning (the new start tokens begin as copies of ``[BOS]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertPreTrainedModel

from composition_lm.schedules import MaskingSchedule, mask_tokens, stratified_uniform
from composition_lm.conditions import PropertyConditioned, drop_conditions
from composition_lm.config import FormulaBertConfig
from composition_lm.tokenizer import BOS, COUNT_OFFSET, MASK, UNK, condition_token_ids, vocabulary_size

__all__ = ["DiffusionBertConfig", "DiffusionBertModel", "masked_diffusion_loss", "preference_loss"]


class DiffusionBertConfig(FormulaBertConfig):
    """Typed configuration of a Diffusion-BERT formula model (the shared formula BERT config plus the
    masked-diffusion part)."""

    model_type = "diffusion-bert"

    def __init__(
        self,
        schedule: str = "loglinear",
        schedule_eps: float = 1e-3,
        spindle_lambda: float = 0.5,
        token_info: list[float] | None = None,
        time_conditioning: bool = False,
        loss_weighting: str = "elbo",
        validity_conditioning: bool = False,
        condition_dropout: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss_weighting not in ("elbo", "uniform"):
            raise ValueError(f"loss_weighting must be 'elbo' or 'uniform', got {loss_weighting!r}")
        if validity_conditioning and self.vocab_size < vocabulary_size(self.max_count, condition_tokens=True):
            raise ValueError(f"validity conditioning needs the [VALID]/[INVALID] tokens: vocab_size "
                             f"{self.vocab_size} is too small (max_count {self.max_count})")
        self.schedule = schedule
        self.schedule_eps = schedule_eps
        self.spindle_lambda = spindle_lambda
        self.token_info = token_info
        self.time_conditioning = time_conditioning
        self.loss_weighting = loss_weighting
        self.validity_conditioning = validity_conditioning
        self.condition_dropout = condition_dropout
        self.mask_token_id = MASK

    def start_token_id(self, condition: str | None) -> int:
        """Position-0 token: ``[BOS]`` (``condition=None``), ``[VALID]`` or ``[INVALID]``."""
        if condition is None:
            return BOS
        if not self.validity_conditioning:
            raise ValueError(f"condition {condition!r} needs a model trained with validity conditioning; "
                             "this one was not (sample it without a condition)")
        ids = condition_token_ids(self.max_count)
        if condition not in ids:
            raise ValueError(f"condition must be one of {', '.join(ids)} or None, got {condition!r}")
        return ids[condition]

    def masking_schedule(self) -> MaskingSchedule:
        return MaskingSchedule(self.schedule, self.schedule_eps, self.spindle_lambda, self.token_info)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusionBertModel(PropertyConditioned, BertPreTrainedModel):
    """BERT denoiser: ``x_t`` (and optionally ``t``) -> logits over the clean tokens."""

    config_class = DiffusionBertConfig
    base_model_prefix = "diffusion_bert"
    def __init__(self, config: DiffusionBertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        h = config.hidden_size
        self.time_mlp = (
            nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h)) if config.time_conditioning else None
        )
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps),
                                  nn.Linear(h, config.vocab_size))
        self.init_property_embeddings(h)  # one table per conditioning property (composition_lm.conditions)
        self.post_init()

    @property
    def never_predicted(self) -> tuple[int, ...]:
        """Token ids the denoiser never predicts: [MASK], [UNK] and the position-0 tokens ([BOS] and
        any condition tokens, which follow the counts)."""
        cfg = self.config
        return (MASK, BOS, UNK, *range(COUNT_OFFSET + cfg.max_count + 1, cfg.vocab_size))

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor | None = None,
                conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]``; ``conditions`` (``[B, n_properties]``: bin ids, 0 = not given, or ranks,
        NaN = not given) for a property-conditioned model (None: unconditional)."""
        embeds = self.bert.embeddings.word_embeddings(input_ids)
        cond = self.condition_embedding(conditions)
        if cond is not None:
            embeds = embeds + cond[:, None, :].to(embeds.dtype)
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            embeds = embeds + self.time_mlp(timestep_embedding(t, self.config.hidden_size))[:, None, :]
        hidden = self.bert(inputs_embeds=embeds).last_hidden_state
        logits = self.head(hidden).float()
        logits[..., list(self.never_predicted)] = -torch.inf
        return logits

    @torch.no_grad()
    def add_validity_conditioning(self) -> None:
        """Extend a trained unconditional model with ``[VALID]``/``[INVALID]`` start tokens (to fine-tune
        it with validity conditioning). Their embeddings start as copies of ``[BOS]``'s, so the extended
        model first behaves exactly like the original one."""
        cfg = self.config
        if cfg.validity_conditioning:
            return
        new_vocab = vocabulary_size(cfg.max_count, condition_tokens=True)
        old_emb = self.bert.embeddings.word_embeddings
        emb = nn.Embedding(new_vocab, old_emb.embedding_dim, padding_idx=old_emb.padding_idx).to(old_emb.weight)
        emb.weight[: old_emb.num_embeddings] = old_emb.weight
        emb.weight[old_emb.num_embeddings :] = old_emb.weight[BOS]
        self.bert.embeddings.word_embeddings = emb
        old_out = self.head[-1]
        out = nn.Linear(old_out.in_features, new_vocab).to(old_out.weight)
        out.weight.zero_()
        out.bias.zero_()
        out.weight[: old_out.out_features] = old_out.weight
        out.bias[: old_out.out_features] = old_out.bias
        self.head[-1] = out
        cfg.vocab_size = new_vocab
        cfg.validity_conditioning = True

    def training_loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        return masked_diffusion_loss(self, self.config, x0, generator)


def masked_diffusion_loss(
    denoiser, config: DiffusionBertConfig, x0: torch.Tensor, generator: torch.Generator | None = None,
    conditions: torch.Tensor | None = None, unlikely: bool = False, max_t: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """The diffusion loss of a batch of clean sequences ``x0`` (``[B, L]``).

    ``unlikely=True`` turns it into an unlikelihood loss for sequences the model should *not* produce (Welleck et
    al. 2019's token-level unlikelihood, on the same noising and weighting): each masked token costs
    ``-log(1 - p(x0_i | x_t))`` instead of ``-log p(x0_i | x_t)``, so minimising it lowers the probability of
    completing ``x0``, most strongly where little is masked (the ELBO weight grows as ``t`` falls), i.e. where the
    context already spells out that formula. ``max_t < 1`` draws the noise level from ``(0, max_t]`` only (with
    ``unlikely``: only the completions of nearly whole formulas are penalised, not the model's general choices).

    ``denoiser`` is the model as the training loop holds it (possibly wrapped for distributed
    training): it is only called, ``denoiser(x_t, t[, conditions])``. ``conditions`` (``[B, P]`` property
    bin ids or ranks) are dropped to "not given" independently with probability ``property_dropout``, so the
    model also learns to sample without them (classifier-free guidance needs both).
    """
    schedule = config.masking_schedule()
    b, length = x0.shape
    if config.validity_conditioning and config.condition_dropout > 0:
        # classifier-free style: some sequences keep [BOS], so the model also samples unconditionally
        drop = torch.rand(b, generator=generator, device=x0.device) < config.condition_dropout
        x0 = x0.clone()
        x0[:, 0] = torch.where(drop, torch.full_like(x0[:, 0], BOS), x0[:, 0])
    t, xt, masked = _noised(config, x0, generator, max_t)
    if conditions is not None:
        conditions = drop_conditions(conditions, config.property_dropout, generator)
    ce = _token_losses(denoiser, config, x0, t, xt, masked, conditions, unlikely)
    n_masked = masked.sum().clamp_min(1)
    if config.loss_weighting == "elbo":
        loss = (ce * schedule.weight(t)[:, None]).sum() / (b * (length - 1))
    else:
        loss = ce.sum() / n_masked
    return loss, {"masked_ce": float(ce.detach().sum() / n_masked), "mask_fraction": float(masked.float().mean())}


def _noised(config: DiffusionBertConfig, x0: torch.Tensor, generator, max_t: float = 1.0):
    """The forward process on a batch: noise levels ``t`` (low-discrepancy, as in MDLM, kept away from 0, scaled
    into ``(0, max_t]``), the masked sequences ``x_t`` and which positions were masked ([BOS] never is)."""
    t = (stratified_uniform(x0.shape[0], generator, x0.device) * (1 - 1e-3) + 1e-3) * max_t
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, 0] = False
    xt, masked = mask_tokens(x0, t, config.masking_schedule(), config.mask_token_id, generator, maskable)
    return t, xt, masked


def _token_losses(denoiser, config, x0, t, xt, masked, conditions=None, unlikely: bool = False) -> torch.Tensor:
    """``-log p(x0_i | x_t)`` (or, ``unlikely``, ``-log(1 - p)``) at each masked position, 0 elsewhere."""
    args = (xt, t if config.time_conditioning else None) + ((conditions,) if conditions is not None else ())
    logits = denoiser(*args)
    if unlikely:
        p_true = F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
        ce = -torch.log1p(-p_true.clamp(max=1 - 1e-6))
    else:
        ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    return torch.where(masked, ce, torch.zeros_like(ce))


def sequence_nelbo(denoiser, config: DiffusionBertConfig, x0: torch.Tensor, t, xt, masked) -> torch.Tensor:
    """Each sequence's negative ELBO (``[B]``, nats), estimated from one draw of the forward process
    (``_noised``): the ELBO-weighted cross-entropy summed over its masked tokens."""
    ce = _token_losses(denoiser, config, x0, t, xt, masked)
    return (ce * config.masking_schedule().weight(t)[:, None]).sum(-1)


def preference_loss(
    denoiser, reference, config: DiffusionBertConfig, chosen: torch.Tensor, rejected: torch.Tensor,
    generator: torch.Generator | None = None, beta: float = 0.1, draws: int = 4,
) -> tuple[torch.Tensor, dict]:
    """Direct preference optimisation (Rafailov et al. 2023) for the masked denoiser, with its ELBO standing in
    for the log-likelihood it lacks: ``-log sigmoid(beta * [(elbo(w) - elbo_ref(w)) - (elbo(l) - elbo_ref(l))])``
    for pairs of a ``chosen`` (``w``) and a ``rejected`` (``l``) sequence (``[B, L]`` each). ``reference`` (the
    model fine-tuning started from, frozen) anchors it, as DPO's KL term does. The ELBO is a noisy estimate, so,
    as in VRPO (Zhu et al. 2025, LLaDA 1.5), each sequence takes ``draws`` draws of the forward process and the
    denoiser and the reference see the *same* draws (the noise cancels in their difference)."""
    def margin(x0):
        x = x0.repeat_interleave(draws, 0)
        t, xt, masked = _noised(config, x, generator)
        with torch.no_grad():
            ref = sequence_nelbo(reference, config, x, t, xt, masked)
        pol = sequence_nelbo(denoiser, config, x, t, xt, masked)
        return (ref - pol).view(-1, draws).mean(1)  # log-ratio policy / reference, per sequence

    delta = margin(chosen) - margin(rejected)
    loss = -F.logsigmoid(beta * delta).mean()
    return loss, {"preference_margin": float(delta.detach().mean()),
                  "preference_accuracy": float((delta.detach() > 0).float().mean())}
