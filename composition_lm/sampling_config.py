"""The formula samplers' settings as one typed object, saved with the model.

:class:`SamplingConfig` holds every setting a formula model is sampled with: the reverse process (steps, the
Diffusion-BERT draw, the Diffusion-LM chain), the constraints enforced inside the sampler, the validity guard and
property targets with guidance. A model folder may carry one as ``sampling_config.json`` beside ``config.json``
(:meth:`FormulaGenerator.save_pretrained` writes it); it gives that model's defaults, and each call overrides what
it names::

    gen = FormulaGenerator.from_pretrained("diffusion-bert")
    gen.sampling_config                       # the model's defaults
    table = gen.generate(1000, seed=0, require=["Li"], temperature=0.9)   # overrides for this call
    gen.sampling_config = gen.sampling_config.replace(steps=64)          # new defaults, saved with the model

The command line's ``sample`` (and ``discover``) options are made from these fields
(``composition_lm.cli.options.add_settings_arguments``), and ``--config FILE`` reads one back, so a run's
``run_config.json`` reproduces it. The module imports neither torch nor transformers: ``--help`` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evaluation.settings import SAMPLING_CONFIG_NAME, Settings, comma_list, setting

__all__ = ["SAMPLING_CONFIG_NAME", "VALIDITY_CHOICES", "SamplingConfig", "element_list"]

#: ``--validity`` choices: a protocol of :mod:`evaluation.validity` enforced while sampling, or none
VALIDITY_CHOICES = ("cdvae", "smact", "none")


def element_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``"Li,Fe, O"`` or ``["Li", "Fe", "O"]`` -> ``["Li", "Fe", "O"]``; None or empty -> None."""
    if value is None:
        return None
    items = comma_list(value) if isinstance(value, str) else [str(s).strip() for s in value if str(s).strip()]
    return items or None


@dataclass
class SamplingConfig(Settings):
    """How a formula model is sampled. ``None`` in ``steps``, ``method``, ``clamp`` and ``noise_scale`` means "the
    model's own" (Diffusion-BERT: 32 steps; Diffusion-LM: its config's chain). Diffusion-BERT reads ``temperature``,
    ``top_k``, ``top_p`` and ``condition``; Diffusion-LM reads ``method``, ``clamp`` and ``noise_scale``; the rest
    applies to both (:func:`composition_lm.sampling.generate` says which combinations it refuses)."""

    kind = "sampling setting"

    # the reverse process
    steps: int | None = setting(None, "denoising steps (default: 32 for diffusion-bert, chosen by measurement in "
                                "benchmarks/diffusion_bert.md; the model's own for diffusion-lm)", range="positive_int",
                                group="sampler")
    method: str | None = setting(None, "diffusion-lm: reverse process (default: the model's)",
                                 choices=("ddpm", "ddim"), group="sampler")
    clamp: bool | None = setting(None, "diffusion-lm: snap each predicted x0 to the nearest allowed token embedding "
                                 "(default: the model's)", action="optional", group="sampler")
    noise_scale: float | None = setting(None, "diffusion-lm: multiply the reverse-process noise by this factor in "
                                        "[0, 1]; below 1 samples nearer the modes, like a temperature (default: the "
                                        "model's)", range="unit_interval", group="sampler")
    batch_size: int = setting(1000, "samples denoised together", range="positive_int", group="sampler")
    temperature: float = setting(1.0, "diffusion-bert: softmax temperature", range="positive_float", group="sampler")
    top_k: int | None = setting(None, "diffusion-bert: draw only from the K most likely tokens", range="positive_int",
                                group="sampler")
    top_p: float | None = setting(None, "diffusion-bert: draw only from the smallest set with probability >= P",
                                  range="probability", group="sampler")
    min_p: float | None = setting(None, "diffusion-bert: draw only tokens whose probability is at least P times the "
                                  "most likely token's (min-p sampling, Nguyen et al. 2024)", range="probability",
                                  group="sampler")
    dtype: str = setting("auto", "denoiser precision: auto = bfloat16 where the hardware runs it fast (AMX/AVX512-BF16 "
                         "CPUs, recent GPUs), else float32", choices=("auto", "float32", "bfloat16"), group="sampler")
    # constraints, enforced inside the sampler
    elements: list[str] | None = setting(None, "only these elements, e.g. Li,Mn,O", action="list",
                                         group="constraints")
    require: list[str] | None = setting(None, "every sample contains these, e.g. Li", action="list",
                                        group="constraints")
    exclude: list[str] | None = setting(None, "never these, e.g. Pb,Cd", action="list", group="constraints")
    max_elements: int | None = setting(None, "at most this many distinct elements", range="positive_int",
                                       group="constraints")
    # conditions
    condition: str | None = setting("auto", "start token of a validity-conditioned model: valid, invalid or none "
                                     "(unconditional); auto = valid for such a model, none otherwise",
                                     choices=("auto", "valid", "invalid", None), nullable=True, group="conditions")
    targets: list[str] | None = setting(None, "property window for a property-conditioned model (train "
                                        "--condition-on), either bound open, e.g. --target band_gap=1.0:3.0 --target "
                                        "e_above_hull=:0.05; repeatable", flag="--target", action="append",
                                        metavar="NAME=LO:HI", group="conditions")
    guidance: float | None = setting(None, "classifier-free guidance towards --condition or --target: Diffusion-BERT "
                                     "draws tokens from p(x|c)^GAMMA p(x)^(1-GAMMA), Diffusion-LM predicts x0_uncond "
                                     "+ GAMMA (x0_cond - x0_uncond) (two denoiser passes per step; 1 = plain "
                                     "conditional sampling)", range="non_negative_float", metavar="GAMMA",
                                     group="conditions")
    # validity, enforced inside the sampler (composition_lm.valid_sampling)
    validity: str = setting("cdvae", "every sample passes this protocol, enforced while sampling: the token that "
                            "would complete a row invalid is re-drawn among those that make it valid, and a row still "
                            "failing is re-noised and denoised again (cdvae: CDVAE's smact_validity rule; smact: "
                            "SMACT's defaults; none: raw samples)", choices=VALIDITY_CHOICES, group="validity")
    validity_rounds: int = setting(10, "repair budget: rounds of re-noising a failing row; rows still failing after "
                                   "it are kept and flagged", range="non_negative_int", group="validity")
    validity_t: float = setting(1.0, "re-noising level of a failing row in (0, 1]: the share of its tokens re-masked "
                                "(diffusion-bert) or the chain time its embeddings are re-noised to (diffusion-lm); "
                                "later rounds rise to 1, a whole-row re-draw (1 measured best in "
                                "benchmarks/validity_sampling.md)", range="probability", group="validity")
    validity_keep_elements: bool = setting(True, "accept a repaired row whatever its number of elements (by default "
                                           "it keeps the sample's own number, so that enforcing validity does not "
                                           "shift the #elements distribution)", flag="--validity-any-elements",
                                           action="store_false", group="validity")
    validity_exact: bool = setting(True, "do not re-draw the last revealed token of a row that would end invalid "
                                   "among the tokens that make it valid (exact decoding, on by default with "
                                   "--validity: it leaves few rows to the costlier re-noising repair)",
                                   flag="--no-exact-decoding", action="store_false", group="validity")

    def __post_init__(self) -> None:
        self.elements = element_list(self.elements)
        self.require = element_list(self.require)
        self.exclude = element_list(self.exclude)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [str(t) for t in self.targets] if self.targets else None
        if self.condition == "none":
            self.condition = None
        super().__post_init__()
