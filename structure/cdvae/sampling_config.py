"""CDVAE's sampler settings as one typed object, saved with the model (CDVAE's ``ld_kwargs``, as one object).

:class:`CDVAESamplingConfig` holds how a CDVAE decodes crystals: the annealed Langevin schedule, how the starting
composition and atom count are drawn, the composition-validity resampling, the cell's volume and angles, the latent
prior and its temperature, symmetrization, and property targets with guidance. A model folder carries it as
``sampling_config.json`` beside ``config.json`` (the network's config); it gives the model's defaults, and each
:meth:`CDVAE.sample` call overrides what it names::

    model = CDVAE.from_pretrained("cdvae-mp20")
    crystals = model.sample(100, seed=0, levels=20)                                  # this call only
    model.sampling_config = model.sampling_config.replace(composition="k-first")      # new defaults ...
    model.save_pretrained("cdvae-mp20-kfirst")                                      # ... saved with the model

``composition-gen cdvae sample`` takes one option per field. No torch here: ``--help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.settings import SAMPLING_CONFIG_NAME, Settings, setting

__all__ = ["SAMPLING_CONFIG_NAME", "COMPOSITION_SAMPLERS", "CDVAESamplingConfig", "LEGACY_CONFIG_KEYS", "NATOM_SAMPLERS", "PRIORS",
           "TYPE_UPDATES"]

COMPOSITION_SAMPLERS = ("round", "per-atom", "k-first")
TYPE_UPDATES = ("free", "element-set", "fixed")
NATOM_SAMPLERS = ("argmax", "sample")
PRIORS = ("standard", "gmm")

#: model configs written before the sampler settings had their own file kept them under these names
LEGACY_CONFIG_KEYS = {"sample_levels": "levels", "sample_steps": "steps", "step_lr": "step_lr",
                      "natom_sampler": "natom_sampler", "composition_sampler": "composition",
                      "type_update": "type_update", "composition_temperature": "composition_temperature",
                      "composition_retries": "composition_retries", "resample_invalid": "resample_invalid",
                      "min_element_share": "min_element_share", "min_pattern_share": "min_pattern_share",
                      "volume_weight": "volume_weight", "latent_prior": "prior",
                      "latent_temperature": "latent_temperature", "symmetrize": "symmetrize",
                      "snap_angles": "snap_angles"}


@dataclass
class CDVAESamplingConfig(Settings):
    """How a CDVAE is sampled (:func:`structure.cdvae.sampling.sample`). The defaults are CDVAE's own rules; the
    shipped models' ``sampling_config.json`` hold the settings measured best for them (their model cards)."""

    kind = "CDVAE sampling setting"

    batch_size: int = setting(500, "crystals decoded together", range="positive_int")
    levels: int = setting(50, "noise levels of the annealed Langevin schedule", range="positive_int")
    steps: int = setting(5, "Langevin steps per noise level", range="positive_int")
    step_lr: float = setting(1e-4, "Langevin step size at the smallest noise", range="positive_float")
    composition: str = setting("round", "how the starting composition is drawn from the composition head: round "
                               "(CDVAE: round p x N per element), per-atom (each atom from p), k-first (the number of "
                               "distinct elements first, from the training data, then the elements)",
                               choices=COMPOSITION_SAMPLERS)
    composition_temperature: float = setting(1.0, "softmax temperature of the composition head when drawing the "
                                             "composition; below 1 fewer, likelier elements", range="positive_float",
                                             metavar="T")
    composition_retries: int = setting(0, "redraw a starting composition that fails CDVAE's composition validity "
                                       "(SMACT charge neutrality, Pauling test) up to R times",
                                       range="non_negative_int", metavar="R")
    natom_sampler: str = setting("argmax", "the number of atoms of each crystal: argmax (CDVAE: the natom head's most "
                                 "likely count) or sample (drawn from the head's softmax, closer to the data's "
                                 "distribution)", choices=NATOM_SAMPLERS)
    resample_invalid: int = setting(0, "up to R rounds in which each crystal whose final composition fails CDVAE's "
                                    "composition validity is decoded again from a new latent; 0 keeps every decoded "
                                    "crystal, as CDVAE does", range="non_negative_int", metavar="R")
    min_element_share: float = setting(0.0, "in those rounds, decode a crystal again also when its number of distinct "
                                       "elements is rarer than P among the training crystals of its size (e.g. 0.01); "
                                       "0 never", range="half_open_unit", metavar="P")
    min_pattern_share: float = setting(0.0, "in those rounds, decode a crystal again also when its stoichiometry "
                                       "pattern (element multiplicities, largest first: Pb2N2O is 2,2,1) is rarer than "
                                       "P among the training crystals (e.g. 0.01); 0 never", range="half_open_unit",
                                       metavar="P")
    type_update: str = setting("free", "what Langevin steps do to atom types: free (CDVAE: the decoder's most likely "
                               "element), element-set (the most likely of the crystal's starting elements), fixed "
                               "(only coordinates move)", choices=TYPE_UPDATES)
    volume_weight: float = setting(0.0, "scale each sampled cell toward the volume of its drawn composition (the sum "
                                   "of per-element volumes fitted to the training crystals): V_lattice^(1-W) x "
                                   "V_composition^W; 0 is CDVAE's lattice head alone, 1 the composition's volume",
                                   range="unit_interval", metavar="W")
    latent_temperature: float = setting(1.0, "scale the latent noise: below 1 the latents stay nearer the prior's "
                                        "centre (fewer odd crystals, less coverage); 1 is the prior itself, as in "
                                        "CDVAE", range="positive_float", metavar="T")
    snap_angles: float = setting(0.0, "set each cell angle the lattice head puts within DEG degrees of 60, 90 or 120 "
                                 "to that angle before the atoms are placed (0 to 15; e.g. 5); 0 keeps the head's "
                                 "angles, as CDVAE does", range="angle_tolerance", metavar="DEG")
    symmetrize: float = setting(0.0, "replace each crystal by its symmetrized primitive standard cell, symmetry found "
                                "at TOL Å (spglib symprec; e.g. 0.1); 0 keeps the decoded cell, as CDVAE does",
                                range="tolerance", metavar="TOL")
    prior: str = setting("standard", "latents of unconditional samples: standard N(0, I) (CDVAE) or gmm, the Gaussian "
                         "mixture fitted by `cdvae fit-prior`", choices=PRIORS)
    targets: list[str] | None = setting(None, "property window for a property-conditioned model (cdvae train "
                                        "--condition-on), either bound open, e.g. --target band_gap=1.0:3.0; "
                                        "repeatable", flag="--target", action="append", metavar="NAME=LO:HI",
                                        group="conditions")
    guidance: float | None = setting(None, "classifier-free guidance towards --target: every head and decoder step is "
                                     "also run without the condition and u + GAMMA (c - u) is used (two decoder "
                                     "passes per step)", range="non_negative_float", metavar="GAMMA",
                                     group="conditions")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [str(t) for t in self.targets] if self.targets else None
        super().__post_init__()

    @classmethod
    def from_legacy(cls, model_config: dict) -> tuple[CDVAESamplingConfig, dict]:
        """Split a model config written before ``sampling_config.json`` existed: (its sampler settings, the rest)."""
        rest = {k: v for k, v in model_config.items() if k not in LEGACY_CONFIG_KEYS}
        found = {LEGACY_CONFIG_KEYS[k]: v for k, v in model_config.items() if k in LEGACY_CONFIG_KEYS}
        return cls(**found), rest
