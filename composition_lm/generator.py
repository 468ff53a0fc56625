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
from collections.abc import Sequence
from pathlib import Path

from composition_lm.models import LoadedModel, load_model

__all__ = ["FORMULA_COLUMNS", "FormulaGenerator", "write_formulas"]

#: the columns of ``formulas.csv`` and of :meth:`FormulaGenerator.generate`'s table
FORMULA_COLUMNS = ["index", "sample", "formula", "parse_ok", "parse_error", "n_elements", "n_atoms",
                   "valid_cdvae", "reason_cdvae", "valid_smact", "reason_smact", "is_novel"]
#: files of a model folder that travel with it besides the weights, config and tokenizer
_MODEL_FILES = ("training_formulas.txt.gz", "training_args.json", "metrics.json", "README.md")


def _elements(value: str | Sequence[str] | None) -> list[str]:
    """``"Li,Mn,O"`` or ``["Li", "Mn", "O"]`` -> a list of symbols (None -> [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [e.strip() for e in items if e and e.strip()]


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

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    # ------------------------------------------------------------------------------ loading, saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, device: str = "cpu") -> FormulaGenerator:
        """A model folder, a shipped name (``diffusion-bert``, the default, or ``diffusion-lm``) or a hub
        repository id; ``ModelLoadError`` (a ``ValueError``) says what is wrong with a bad one."""
        return cls(load_model(name_or_path, device=device))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model as a folder that :meth:`from_pretrained` reads: safetensors weights, config,
        tokenizer, and the files that came with it (training formulas for novelty, arguments, metrics,
        model card). Written beside ``path`` and renamed into place."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise ValueError(f"{path} is the folder this model was loaded from")
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
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

    def sampling_settings(self, steps: int | None = None, method: str | None = None, clamp: bool | None = None,
                          noise_scale: float | None = None) -> dict:
        """The steps (and, for Diffusion-LM, method, clamping and noise scale) a run uses: what is asked,
        else the model's defaults."""
        from composition_lm.sampling import resolve_sampling_settings

        return resolve_sampling_settings(self.config, steps, method, clamp, noise_scale)

    # ------------------------------------------------------------------------------------- sampling
    def generate(self, n: int, seed: int = 0, steps: int | None = None, elements: str | Sequence[str] | None = None,
                 require: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 max_elements: int | None = None, batch_size: int = 1000, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, condition: str | None = "auto",
                 method: str | None = None, clamp: bool | None = None, noise_scale: float | None = None,
                 dtype: str = "auto", validity: str = "cdvae", validity_rounds: int = 10, validity_t: float = 1.0,
                 validity_keep_elements: bool = True, validity_exact: bool = True, guidance: float | None = None,
                 targets: str | Sequence | None = None, progress: bool = False):
        """``n`` formulas as a ``pandas.DataFrame`` with the columns of ``formulas.csv``
        (:data:`FORMULA_COLUMNS`): the raw sample, its reduced formula, parse status, element and atom
        counts, validity and reason under both protocols, and ``is_novel`` against the training formulas.

        ``elements`` (only these), ``require`` (every sample contains these), ``exclude`` and
        ``max_elements`` are enforced inside the sampler. ``targets``: property windows for a
        property-conditioned model of either family (``"band_gap=1:3"`` strings or
        :class:`~composition_lm.conditions.Target`; each sample conditioned on a bin, or rank, inside each
        window), with ``guidance`` (classifier-free guidance scale towards the targets, or towards a validity condition;
        None or 1: plain conditional sampling). Diffusion-BERT takes ``temperature``, ``top_k``,
        ``top_p`` and ``condition`` (``"valid"``, ``"invalid"`` or None for a validity-conditioned model;
        ``"auto"``: valid when the model has the condition); Diffusion-LM takes ``method`` (ddpm/ddim),
        ``clamp`` and ``noise_scale``; ``steps`` and these default to the model's settings. ``dtype``:
        ``auto``, ``float32`` or ``bfloat16``. ``validity`` (``cdvae``, the default, ``smact`` or ``none``)
        is enforced inside the sampler: the last token revealed in a row that would complete it invalid is
        drawn again among the tokens that make it valid (exact decoding; off with ``validity_exact=False``),
        and a row that still fails the protocol is re-noised to ``validity_t`` and denoised again, at most ``validity_rounds`` times, keeping its number of distinct elements
        unless ``validity_keep_elements`` is False (:mod:`composition_lm.valid_sampling`); a row
        that still fails is kept, flagged by its ``valid_<protocol>`` column and counted in
        ``table.attrs["validity"]``; ``none`` gives the raw samples. One ``torch.Generator`` seeded with
        ``seed`` drives everything: the same arguments give the same table. ``table.attrs["sampling"]``
        records every setting used."""
        import pandas as pd

        from composition_lm.sampling import Constraints, generate
        from composition_lm.valid_sampling import RepairStats, ValiditySettings
        from evaluation.validity import check_formulas

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        constraints = Constraints(elements=_elements(elements) or None, require=_elements(require),
                                  exclude=_elements(exclude), max_elements=max_elements)
        from composition_lm.conditions import Target, parse_target

        if isinstance(targets, (str, Target)):
            targets = [targets]
        targets = [t if isinstance(t, Target) else parse_target(t) for t in targets or []]
        guard = ValiditySettings(validity, validity_rounds, validity_t, validity_keep_elements, validity_exact)
        stats = RepairStats()
        samples = generate(self.loaded, n, steps=steps, batch_size=batch_size, seed=seed, temperature=temperature,
                           top_k=top_k, top_p=top_p, constraints=constraints, progress=progress, dtype=dtype,
                           condition=condition, method=method, clamp=clamp, noise_scale=noise_scale,
                           validity=guard, stats=stats, guidance=guidance, targets=targets)
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
        table.attrs["sampling"] = {
            "n": n, "seed": seed, **self.sampling_settings(steps, method, clamp, noise_scale), "batch_size": batch_size,
            "dtype": dtype, "temperature": temperature, "top_k": top_k, "top_p": top_p, "condition": condition, "guidance": guidance,
            "targets": [str(t) for t in targets],
            "constraints": constraints.as_dict(), "validity": guard.as_dict(),
        }
        table.attrs["validity"] = stats.as_dict()
        if guard.protocol != "none":
            failing = int((~table[f"valid_{guard.protocol}"]).sum())
            table.attrs["validity"]["failing_rows"] = failing
            if failing:
                import warnings

                warnings.warn(f"{failing} of {n} samples still fail the {guard.protocol} protocol after "
                              f"{guard.rounds} repair rounds; they are kept and flagged (valid_{guard.protocol} "
                              "is False)", stacklevel=2)
        return table

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

