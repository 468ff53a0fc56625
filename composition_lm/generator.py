"""`FormulaGenerator`: the Python front door to the formula models (what ``composition-gen sample`` runs).

A generator holds a loaded model (Diffusion-BERT or Diffusion-LM: its ``config.json`` says which) and its
tokenizer; :meth:`FormulaGenerator.generate` samples formulas with the element constraints enforced inside
the sampler and returns them as a ``pandas.DataFrame`` with the columns of ``formulas.csv``::

    from composition_lm import FormulaGenerator

    gen = FormulaGenerator.from_pretrained("diffusion-bert")    # shipped name, model folder or hub id
    table = gen.generate(1000, seed=0, require=["Li"], max_elements=4)
    gen.summary(table)                                          # validity, uniqueness, novelty
"""

from __future__ import annotations

import shutil
from pathlib import Path

from composition_lm.models import LoadedModel, load_model
from composition_lm.sampling_config import SAMPLING_CONFIG_NAME, SamplingConfig

__all__ = ["FORMULA_COLUMNS", "FormulaGenerator", "write_formulas"]

#: the columns of ``formulas.csv`` and of :meth:`FormulaGenerator.generate`'s table
FORMULA_COLUMNS = ["index", "sample", "formula", "parse_ok", "parse_error", "n_elements", "n_atoms",
                   "valid_cdvae", "reason_cdvae", "valid_smact", "reason_smact", "is_novel"]
#: files of a model folder that travel with it besides the weights, config and tokenizer
_MODEL_FILES = ("training_formulas.txt.gz", "training_args.json", "metrics.json", "README.md")


class FormulaGenerator:
    """A formula model ready to sample: Diffusion-BERT (masked discrete diffusion) or Diffusion-LM
    (Gaussian diffusion over token embeddings).

    >>> from composition_lm import FormulaGenerator
    >>> gen = FormulaGenerator.from_pretrained("diffusion-bert")
    >>> table = gen.generate(8, seed=0, require=["Li"], max_elements=3)
    >>> len(table), all("Li" in f for f in table["formula"])
    (8, True)
    >>> list(table.columns[:3])
    ['index', 'sample', 'formula']
    """

    def __init__(self, loaded: LoadedModel, sampling_config: SamplingConfig | None = None):
        self.loaded = loaded
        saved = loaded.path / SAMPLING_CONFIG_NAME
        #: the model's sampling defaults (its folder's ``sampling_config.json``, else the built-in ones); each
        #: :meth:`generate` call overrides what it names, and :meth:`save_pretrained` saves them with the model
        self.sampling_config = sampling_config or (SamplingConfig.load(saved) if saved.is_file() else SamplingConfig())

    # ------------------------------------------------------------------------------ loading, saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, device: str = "cpu") -> FormulaGenerator:
        """A model folder, a shipped name (``diffusion-bert``, the default, or ``diffusion-lm``) or a hub
        repository id; ``ModelLoadError`` (a ``ValueError``) says what is wrong with a bad one."""
        return cls(load_model(name_or_path, device=device))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model as a folder that :meth:`from_pretrained` reads: safetensors weights, config,
        tokenizer, sampling defaults (``sampling_config.json``), and the files that came with it (training formulas for novelty, arguments, metrics,
        model card). Written beside ``path`` and renamed into place."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise ValueError(f"{path} is the folder this model was loaded from")
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        self.sampling_config.save(tmp / SAMPLING_CONFIG_NAME)
        for name in _MODEL_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, tmp / name)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    # ----------------------------------------------------------------------------------- properties
    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def config(self):
        return self.loaded.config

    @property
    def path(self) -> Path:
        """The folder the model was loaded from."""
        return self.loaded.path

    @property
    def model_type(self) -> str:
        """``diffusion-bert`` or ``diffusion-lm``."""
        return self.loaded.model_type

    def training_formulas(self) -> set[str] | None:
        """The reduced formulas the model was trained on (novelty is judged against them), if stored."""
        return self.loaded.training_formulas()

    # ------------------------------------------------------------------------------------- sampling
    def generate(self, n: int, seed: int = 0, config: SamplingConfig | None = None, progress: bool = False,
                 **overrides):
        """``n`` formulas as a ``pandas.DataFrame`` with the columns of ``formulas.csv``
        (:data:`FORMULA_COLUMNS`): the raw sample, its reduced formula, parse status, element and atom
        counts, validity and reason under both protocols, and ``is_novel`` against the training formulas.

        How: ``config`` (a :class:`~composition_lm.sampling_config.SamplingConfig`; default: this model's
        :attr:`sampling_config`) with ``overrides`` (any of its fields, e.g. ``require=["Li"]``,
        ``max_elements=4``, ``temperature=0.9``, ``targets=["band_gap=1:3"]``, ``validity="none"``). Element
        constraints and the validity protocol are enforced inside the sampler; a row that still fails the protocol
        after the repair budget is kept, flagged by its ``valid_<protocol>`` column and counted in
        ``table.attrs["validity"]``. One ``torch.Generator`` seeded with ``seed`` drives everything: the same
        arguments give the same table. ``table.attrs["sampling"]`` records ``n``, ``seed`` and every setting used
        (the model's own steps and chain filled in), so it reproduces the run."""
        import pandas as pd

        from composition_lm.sampling import generate
        from composition_lm.valid_sampling import RepairStats
        from evaluation.validity import check_formulas

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        config = (config or self.sampling_config).replace(**overrides)
        stats = RepairStats()
        samples = generate(self.loaded, n, seed=seed, config=config, progress=progress, stats=stats)
        formulas = [f for _, f, _ in samples if f is not None]
        verdicts = {p: dict(zip(formulas, check_formulas(formulas, p))) for p in ("cdvae", "smact")}
        train = self.training_formulas()
        rows = []
        for i, (raw, f, err) in enumerate(samples):
            if f is None:
                failed = f"unparseable: {err}"
                rows.append([i, raw, "", False, err, None, None, False, failed, False, failed, None])
                continue
            c, s = verdicts["cdvae"][f], verdicts["smact"][f]
            novel = None if train is None else str(f) not in train
            rows.append([i, raw, str(f), True, "", f.n_elements, f.n_atoms, c.valid, c.reason, s.valid, s.reason,
                         novel])
        table = pd.DataFrame(rows, columns=FORMULA_COLUMNS)
        table = table.astype({"n_elements": "Int64", "n_atoms": "Int64", "is_novel": "boolean"})
        table.attrs["sampling"] = {"n": n, "seed": seed, **self.resolved(config).to_dict()}
        table.attrs["validity"] = stats.as_dict()
        if config.validity != "none":
            failing = int((~table[f"valid_{config.validity}"]).sum())
            table.attrs["validity"]["failing_rows"] = failing
            if failing:
                import warnings

                warnings.warn(f"{failing} of {n} samples still fail the {config.validity} protocol after "
                              f"{config.validity_rounds} repair rounds; they are kept and flagged "
                              f"(valid_{config.validity} is False)", stacklevel=2)
        return table

    def resolved(self, config: SamplingConfig | None = None) -> SamplingConfig:
        """``config`` (default: :attr:`sampling_config`) with the model's own steps (and, for Diffusion-LM, chain
        method, clamping and noise scale) filled in where it leaves them to the model."""
        from composition_lm.sampling import resolve_sampling_settings

        config = config or self.sampling_config
        return config.replace(**resolve_sampling_settings(self.config, config.steps, config.method, config.clamp,
                                                          config.noise_scale))

    def summary(self, table) -> dict:
        """Counts and fractions of a :meth:`generate` table: parsed, distinct, validity under both
        protocols, uniqueness, novelty among distinct formulas (None when the model stores no training
        formulas) and the number of valid (cdvae), novel, distinct formulas. Computed by
        :func:`evaluation.metrics.formula_set_metrics`, the definition ``evaluate`` uses."""
        from evaluation.metrics import formula_set_metrics

        train = self.training_formulas()
        m = formula_set_metrics(table["formula"].tolist(), train, protocols=("cdvae", "smact"), train_canonical=True)
        has_novelty = bool(train) and m["n_unique"] > 0
        return {
            "n_samples": m["n_samples"], "n_parsed": m["n_parsed"], "n_unique": m["n_unique"],
            "validity_cdvae": m["validity"]["cdvae"]["raw"], "validity_smact": m["validity"]["smact"]["raw"],
            "uniqueness": m["uniqueness"], "novelty": m["novelty"] if has_novelty else None,
            "valid_novel_unique_cdvae": m["valid_novel_unique"]["cdvae"] if train is not None else 0,
        }


def write_formulas(table, path: str | Path) -> Path:
    """Write a :meth:`FormulaGenerator.generate` table as ``formulas.csv`` (missing values as empty cells),
    to a temporary file renamed into place."""
    from evaluation.io import write_csv

    write_csv(path, list(table.columns), table.itertuples(index=False, name=None))
    return Path(path)

