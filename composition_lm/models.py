"""Finding and loading formula models: a local folder, a model shipped in the package, or a hub name.

A saved model folder holds everything needed to sample (nanoGPT's rule: the checkpoint carries its
own config): ``config.json`` (its ``model_type`` picks the class), ``model.safetensors``, the
tokenizer files, ``training_formulas.txt.gz`` (for novelty), ``training_args.json``,
``metrics.json`` and a ``README.md`` model card. Nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MODEL_TYPES", "ModelLoadError", "LoadedModel", "is_gaussian", "load_model", "resolve_model_path",
           "PRETRAINED_DIR"]

#: model_type -> (module, config class, model class, loss function)
MODEL_TYPES = {
    "diffusion-bert": ("composition_lm.diffusion_bert", "DiffusionBertConfig", "DiffusionBertModel", "masked_diffusion_loss"),
    "diffusion-lm": ("composition_lm.diffusion_lm", "DiffusionLMConfig", "DiffusionLMModel", "gaussian_diffusion_loss"),
}
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
#: short names -> folders shipped in the package
SHIPPED = {"diffusion-bert": "diffusion-bert-mp", "diffusion-lm": "diffusion-lm-mp",
           "diffusion-bert-props": "diffusion-bert-mp-props", "diffusion-lm-props": "diffusion-lm-mp-props",
           "diffusion-bert-stable": "diffusion-bert-stable"}
DEFAULT_MODEL = "diffusion-bert"
#: the shipped model that answers property targets (band_gap, e_above_hull, formation_energy_per_atom)
CONDITIONAL_MODEL = "diffusion-bert-props"


class ModelLoadError(ValueError):
    """A model folder that is missing, incomplete or corrupt."""


def is_gaussian(config) -> bool:
    """Whether a formula model's config is Diffusion-LM's (Gaussian diffusion over token embeddings) rather
    than Diffusion-BERT's (masked diffusion): its ``model_type``, one of :data:`MODEL_TYPES`, says so."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    return model_type == "diffusion-lm"


def model_classes(model_type: str):
    try:
        module, cfg, cls, loss = MODEL_TYPES[model_type]
    except KeyError:
        raise ModelLoadError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}") from None
    mod = importlib.import_module(module)
    return getattr(mod, cfg), getattr(mod, cls), getattr(mod, loss)


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """A folder on disk for ``name_or_path``: local path > shipped short name > hub repository id."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in SHIPPED:
        shipped = PRETRAINED_DIR / SHIPPED[name]
        if not (shipped / "config.json").exists():
            raise ModelLoadError(f"the shipped model {name!r} is not installed at {shipped}")
        return shipped
    if "/" in name and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name))
        except Exception as err:  # offline, unknown repo, ...
            raise ModelLoadError(f"{name!r} is not a local folder and could not be fetched from the hub: {err}") from None
    raise ModelLoadError(f"no model at {name!r} (not a folder; shipped models: {', '.join(SHIPPED)})")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: Path
    model_type: str
    _train: set[str] | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    def training_formulas(self) -> set[str] | None:
        """The reduced formulas the model was trained on (for novelty), if stored."""
        if self._train is None:
            f = self.path / "training_formulas.txt.gz"
            if not f.exists():
                return None
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                self._train = {line.strip() for line in fh if line.strip()}
        return self._train


def load_model(name_or_path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a formula model and its tokenizer; clear :class:`ModelLoadError` on any problem."""
    path = resolve_model_path(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path}: no config.json (is this a saved composition-gen model folder?)")
    try:
        model_type = json.loads(cfg_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ModelLoadError(f"{cfg_file}: unreadable config ({err})") from None
    _, cls, _ = model_classes(model_type)
    if not (path / "model.safetensors").exists():
        raise ModelLoadError(f"{path}: no model.safetensors")
    try:
        model, info = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    except Exception as err:  # safetensors raises its own error types on a corrupt file
        raise ModelLoadError(f"{path}: cannot load the weights ({type(err).__name__}: {err})") from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}{' ...' if len(v) > 4 else ''}"
                           for k, v in problems.items())
        raise ModelLoadError(f"{path}: model.safetensors does not match config.json ({detail})")
    model = model.to(device).eval()
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({err})") from None
    return LoadedModel(model, tokenizer, path, model_type)
