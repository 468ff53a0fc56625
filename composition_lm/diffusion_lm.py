"""Diffusion-LM: Gaussian diffusion over learned token embeddings, rounded back to tokens.

After Li et al. (2022), as Dong et al. (2023) used it for formulas:

* every token has a learned embedding of small dimension (``embedding_dim``, 16 by default); a
  sequence ``[BOS] tokens [EOS] [PAD] ...`` becomes a ``[L, d]`` array ``x_0``;
* the forward process adds Gaussian noise, ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``
  (:class:`composition_lm.schedules.GaussianSchedule`, Diffusion-LM's ``sqrt`` schedule by default,
  ``T = 2000`` training steps);
* the denoiser, a BERT encoder with a time embedding between two small projections, predicts ``x_0``;
* the loss is Diffusion-LM's end-to-end objective: the MSE of the predicted ``x_0`` (against the
  noiseless embeddings at ``t = 0``), the prior term ``|sqrt(abar_T) x_0|^2``, and the rounding
  cross-entropy ``-log p(w | x_0)`` through a head tied to the embeddings (logits
  ``x . E^T + b``), so that embeddings and denoiser learn together;
* sampling (:func:`composition_lm.sampling.sample_gaussian_diffusion`) runs a respaced DDPM or DDIM
  chain, optionally snapping each predicted ``x_0`` to the nearest allowed embedding (the clamping
  trick), and rounds the result to the nearest allowed token.

Property conditions (``config.property_conditions``, :mod:`composition_lm.conditions`): one embedding per
property (of its bin, or of its rank), added to the time embedding, so every position of every step sees
them; dropped to "not given" with probability ``property_dropout`` while training. Sampling with
classifier-free guidance mixes the two predictions of ``x_0``: ``x0_uncond + gamma (x0_cond - x0_uncond)``.

The network's ``forward`` does one of two things: given ``x_t`` and ``t`` it returns the predicted
``x_0``; given ``input_ids`` (with ``t`` and the two noise draws) it returns the training loss, so a
training step is a single forward call (which distributed training wants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertPreTrainedModel

from composition_lm.conditions import PropertyConditioned, drop_conditions
from composition_lm.config import FormulaBertConfig
from composition_lm.diffusion_bert import timestep_embedding
from composition_lm.schedules import GAUSSIAN_SCHEDULES, GaussianSchedule, stratified_uniform

__all__ = ["DiffusionLMConfig", "DiffusionLMModel", "gaussian_diffusion_loss"]


class DiffusionLMConfig(FormulaBertConfig):
    """Typed configuration of a Diffusion-LM formula model (the shared formula BERT config plus the
    Gaussian-diffusion part)."""

    model_type = "diffusion-lm"

    def __init__(
        self,
        embedding_dim: int = 16,
        schedule: str = "sqrt",
        diffusion_steps: int = 2000,
        sampling_steps: int = 200,
        sampling_method: str = "ddpm",
        clamp: bool = False,
        noise_scale: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if schedule not in GAUSSIAN_SCHEDULES:
            raise ValueError(f"unknown Gaussian schedule {schedule!r}; choose one of {', '.join(GAUSSIAN_SCHEDULES)}")
        if sampling_method not in ("ddpm", "ddim"):
            raise ValueError(f"sampling_method must be 'ddpm' or 'ddim', got {sampling_method!r}")
        if not 0 <= noise_scale <= 1:
            raise ValueError(f"noise_scale must lie in [0, 1], got {noise_scale}")
        self.embedding_dim = embedding_dim
        self.schedule = schedule
        self.diffusion_steps = diffusion_steps
        self.sampling_steps = sampling_steps
        self.sampling_method = sampling_method
        self.clamp = clamp
        self.noise_scale = noise_scale  # scale of the reverse-process noise at sampling (1 = the exact posterior)

    def gaussian_schedule(self) -> GaussianSchedule:
        return GaussianSchedule(self.schedule, self.diffusion_steps)


class DiffusionLMModel(PropertyConditioned, BertPreTrainedModel):
    """Embeddings + BERT denoiser: ``(x_t, t) -> x_0``; with ``input_ids``, the training loss."""

    config_class = DiffusionLMConfig
    base_model_prefix = "diffusion_lm"

    def __init__(self, config: DiffusionLMConfig):
        super().__init__(config)
        h, d = config.hidden_size, config.embedding_dim
        self.word_embedding = nn.Embedding(config.vocab_size, d)  # the space the diffusion runs in
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))  # rounding head, tied to the embeddings
        self.input_proj = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h))
        self.time_mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.SiLU(), nn.Linear(4 * h, h))
        self.bert = BertModel(config, add_pooling_layer=False)
        # BERT reads our projected embeddings (inputs_embeds); its own token table would be unused weight
        self.bert.embeddings.word_embeddings = None
        self.output_proj = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, d))
        self.init_property_embeddings(h)  # added to the time embedding (composition_lm.conditions)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "word_embedding", None):
            init.normal_(module.weight, mean=0.0, std=1.0)  # Diffusion-LM: unit-scale embeddings
        if isinstance(module, DiffusionLMModel):
            init.zeros_(module.lm_bias)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.word_embedding.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Rounding logits ``x . E^T + b`` of embedding vectors ``x`` (``[..., d]``)."""
        return x @ self.word_embedding.weight.t() + self.lm_bias

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted ``x_0`` (``[B, L, d]``) from ``x_t`` at original diffusion steps ``t`` (``[B]``);
        ``conditions``: ``[B, P]`` property conditions of a property-conditioned model (bin ids, 0 = not
        given, or ranks, NaN = not given: :mod:`composition_lm.conditions`)."""
        temb = self.time_mlp(timestep_embedding(t.float() / self.config.diffusion_steps, self.config.hidden_size))
        cond = self.condition_embedding(conditions)
        if cond is not None:
            temb = temb + cond
        hidden = self.bert(inputs_embeds=self.input_proj(xt) + temb[:, None, :].to(xt.dtype)).last_hidden_state
        return self.output_proj(hidden)

    def forward(self, xt: torch.Tensor | None = None, t: torch.Tensor | None = None, *,
                input_ids: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                noise0: torch.Tensor | None = None, conditions: torch.Tensor | None = None):
        if input_ids is None:
            return self.denoise(xt, t, conditions)
        return self._e2e_loss(input_ids, t, noise, noise0, conditions)

    def _e2e_loss(self, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noise0: torch.Tensor,
                  conditions: torch.Tensor | None = None):
        sched = self.config.gaussian_schedule()  # float64 on the CPU; cheap to rebuild
        x_mean = self.word_embedding(ids)  # [B, L, d]
        # x_0 itself is a draw around the embeddings (Diffusion-LM's q(x_0 | w))
        x0 = x_mean + (1 - sched.alpha_bar[0]).sqrt().item() * noise0
        xt = sched.add_noise(x0, t, noise)
        x0_hat = self.denoise(xt, t, conditions)
        target = torch.where((t == 0)[:, None, None], x_mean, x0)
        mse = ((x0_hat - target) ** 2).mean(dim=(1, 2))
        prior = (sched.alpha_bar[-1].sqrt().item() * x_mean).pow(2).mean(dim=(1, 2))
        nll = F.cross_entropy(self.logits(x0).transpose(1, 2).float(), ids, reduction="none").mean(1)
        loss = (mse + prior + nll).mean()
        return loss, {"mse": float(mse.detach().mean()), "rounding_nll": float(nll.detach().mean()),
                      "prior": float(prior.detach().mean())}

    def training_loss(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        return gaussian_diffusion_loss(self, self.config, x0, generator)


def gaussian_diffusion_loss(
    denoiser, config: DiffusionLMConfig, x0: torch.Tensor, generator: torch.Generator | None = None,
    conditions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The end-to-end Diffusion-LM loss of a batch of token sequences ``x0`` (``[B, L]``).

    The randomness (steps ``t``, two standard normal draws, condition dropout) comes from ``generator``;
    ``denoiser`` is the model as the training loop holds it (possibly wrapped): it is called once.
    ``conditions`` (``[B, P]``) are dropped to "not given" with probability ``property_dropout``.
    """
    b, length = x0.shape
    dev = x0.device
    t = (stratified_uniform(b, generator, dev) * config.diffusion_steps).long().clamp_max(config.diffusion_steps - 1)
    shape = (b, length, config.embedding_dim)
    noise = torch.randn(shape, generator=generator, device=dev)
    noise0 = torch.randn(shape, generator=generator, device=dev)
    if conditions is None:
        return denoiser(t=t, input_ids=x0, noise=noise, noise0=noise0)
    return denoiser(t=t, input_ids=x0, noise=noise, noise0=noise0,
                    conditions=drop_conditions(conditions, config.property_dropout, generator))
