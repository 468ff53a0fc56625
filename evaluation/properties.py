"""A composition property predictor: the independent judge of what a property-conditioned generator was
asked (issue 18), since a generator cannot judge itself.

* :func:`composition_features` -- Magpie-style statistics of a composition (Ward et al. 2016): for each
  element property of :mod:`evaluation.element_data`, the atom-fraction-weighted mean, the minimum, the
  maximum, the range and the weighted mean absolute deviation, plus the number of elements and the
  p-norms (p = 2, 3, 5, 10) of the atom fractions. A pure function of the reduced formula.
* :class:`PropertyPredictor` -- a small multi-output network on those features (standardised inputs
  and targets, L1 loss, missing labels masked), one head per property. Saved as ``model.safetensors``
  plus ``config.json`` (:meth:`PropertyPredictor.save` / :meth:`PropertyPredictor.load`); nothing is
  unpickled.
* :func:`train_property_predictor` -- fits it on the formulas of a corpus split, keeping the epoch with
  the best validation MAE.
* :func:`fine_tune_property_predictor` -- continues a predictor's training on new labels of some of its properties
  (the closed loop's surrogate: the shipped predictor taught the loop's own verdicts).
* :func:`formula_properties` -- the labels of a corpus per reduced formula (the lowest-``e_above_hull``
  entry of each formula: its ground state), for exact lookup of generated formulas that are known compounds.

``scripts/train_property_predictor.py`` trains the shipped predictor on the Materials Project ``train``
split and reports its MAE on ``test``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.composition import Formula, FormulaError, parse_formula
from evaluation.element_data import PROPERTIES, property_table

__all__ = ["FEATURE_NAMES", "PredictorConfig", "PropertyPredictor", "composition_features",
           "fine_tune_property_predictor", "formula_properties", "train_property_predictor"]

STATISTICS = ("mean", "min", "max", "range", "mean_abs_dev")
NORMS = (2, 3, 5, 10)
FEATURE_NAMES = tuple(f"{s}_{p}" for s in STATISTICS for p in PROPERTIES) + ("n_elements",) + tuple(
    f"fraction_{p}norm" for p in NORMS)
#: properties whose values cannot be negative (predictions are clipped at 0)
NON_NEGATIVE = frozenset({"band_gap", "e_above_hull", "gap_expt"})
#: the shipped predictor (trained by scripts/train_property_predictor.py)
SHIPPED = Path(__file__).resolve().parent / "pretrained" / "property-predictor"


def _features_of(formula: Formula) -> np.ndarray:
    index, table = property_table()
    symbols = [s for s, _ in formula.counts]
    unknown = [s for s in symbols if s not in index]
    if unknown:
        raise FormulaError(f"no element data for {', '.join(unknown)}")
    props = table[[index[s] for s in symbols]]
    counts = np.array([n for _, n in formula.counts], dtype=np.float64)
    w = counts / counts.sum()
    mean = w @ props
    stats = [mean, props.min(0), props.max(0), props.max(0) - props.min(0), w @ np.abs(props - mean)]
    extra = [len(symbols)] + [float((w**p).sum() ** (1 / p)) for p in NORMS]
    return np.concatenate([*stats, extra])


def composition_features(formulas: Sequence[Formula | str]) -> np.ndarray:
    """``[len(formulas), len(FEATURE_NAMES)]`` float32 features; each distinct formula computed once. A
    string that does not parse, or an element without data, raises :class:`FormulaError` naming it."""
    cache: dict[str, np.ndarray] = {}
    out = np.zeros((len(formulas), len(FEATURE_NAMES)), dtype=np.float32)
    for i, f in enumerate(formulas):
        key = str(f)
        if key not in cache:
            cache[key] = _features_of(parse_formula(f) if isinstance(f, str) else f)
        out[i] = cache[key]
    return out


@dataclass
class PredictorConfig:
    """Everything a saved predictor needs besides its weights."""

    properties: list[str]
    hidden_size: int = 256
    num_layers: int = 3
    dropout: float = 0.1
    feature_mean: list[float] = field(default_factory=list)
    feature_std: list[float] = field(default_factory=list)
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # validation / test MAE, filled by the trainer
    feature_names: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))


class PropertyPredictor(torch.nn.Module):
    """``predictor.predict(formulas)`` -> ``{property: np.ndarray}`` from composition features alone."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        dims = [len(config.feature_names)] + [config.hidden_size] * (config.num_layers - 1)
        layers: list[torch.nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.SiLU(), torch.nn.Dropout(config.dropout)]
        layers.append(torch.nn.Linear(dims[-1], len(config.properties)))
        self.net = torch.nn.Sequential(*layers)
        self.register_buffer("x_mean", torch.tensor(config.feature_mean or [0.0] * dims[0]))
        self.register_buffer("x_std", torch.tensor(config.feature_std or [1.0] * dims[0]))
        self.register_buffer("y_mean", torch.tensor(config.target_mean or [0.0] * len(config.properties)))
        self.register_buffer("y_std", torch.tensor(config.target_std or [1.0] * len(config.properties)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised targets from raw features."""
        return self.net((features - self.x_mean) / self.x_std)

    @torch.inference_mode()
    def predict(self, formulas: Sequence[Formula | str], batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Predicted properties of each formula (``{name: [len(formulas)]}``); formulas that do not parse
        give NaN."""
        self.eval()
        ok, rows = [], []
        for i, f in enumerate(formulas):
            try:
                rows.append(composition_features([f])[0])
                ok.append(i)
            except FormulaError:
                continue
        out = np.full((len(formulas), len(self.config.properties)), np.nan)
        if rows:
            x = torch.from_numpy(np.stack(rows))
            y = torch.cat([self(part) for part in x.split(batch_size)]) * self.y_std + self.y_mean
            out[ok] = y.numpy()
        result = {}
        for j, name in enumerate(self.config.properties):
            col = out[:, j]
            result[name] = np.where(np.isnan(col), np.nan, np.maximum(col, 0.0)) if name in NON_NEGATIVE else col
        return result

    def save(self, directory: str | Path) -> Path:
        """``model.safetensors`` + ``config.json`` in ``directory`` (each written to a temporary file and
        renamed into place)."""
        from safetensors.torch import save_file

        from evaluation.io import atomic_path, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(directory / "config.json", asdict(self.config))
        return directory

    @classmethod
    def load(cls, directory: str | Path | None = None) -> PropertyPredictor:
        """A saved predictor (default: the shipped one, trained on Materials Project ``train``)."""
        from safetensors.torch import load_file

        directory = Path(directory) if directory else SHIPPED
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"no property predictor in {directory} (config.json missing)")
        config = PredictorConfig(**json.loads((directory / "config.json").read_text()))
        if tuple(config.feature_names) != FEATURE_NAMES:
            raise ValueError(f"{directory} was trained on other features than this version computes; retrain it")
        model = cls(config)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def formula_properties(table, properties: Sequence[str], formula_column: str = "formula",
                       ground_state_column: str | None = "e_above_hull") -> dict[str, dict[str, float]]:
    """``{reduced formula: {property: value}}`` from a table (a ``pandas.DataFrame``) with one row per
    entry: for each reduced formula the entry with the lowest ``ground_state_column`` (its ground state),
    or the first one without that column. Rows that do not parse are skipped."""
    best: dict[str, tuple[float, dict[str, float]]] = {}
    columns = [table[c].tolist() for c in (formula_column, *properties)]
    order = table[ground_state_column].tolist() if ground_state_column in table else [0.0] * len(table)
    for i, f in enumerate(columns[0]):
        try:
            key = str(parse_formula(str(f)))
        except FormulaError:
            continue
        rank = order[i] if order[i] == order[i] else math.inf  # NaN ranks last
        if key not in best or rank < best[key][0]:
            best[key] = (rank, {p: float(col[i]) for p, col in zip(properties, columns[1:])})
    return {k: v for k, (_, v) in best.items()}


def train_property_predictor(train: dict[str, dict[str, float]], val: dict[str, dict[str, float]],
                             properties: Sequence[str], epochs: int = 60, batch_size: int = 256, lr: float = 2e-3,
                             seed: int = 0, hidden_size: int = 256, num_layers: int = 3,
                             progress: bool = True) -> tuple[PropertyPredictor, list[dict]]:
    """Fit a :class:`PropertyPredictor` on ``train`` (``{formula: {property: value}}``, missing values as
    NaN), keeping the weights of the epoch with the lowest mean validation MAE (in standard deviations).
    Returns the predictor and the per-epoch history (train loss, validation MAE per property)."""
    from tqdm.auto import tqdm

    properties = list(properties)
    torch.manual_seed(seed)

    def arrays(data: dict[str, dict[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        names = list(data)
        x = torch.from_numpy(composition_features(names))
        y = torch.tensor([[data[n].get(p, math.nan) for p in properties] for n in names], dtype=torch.float32)
        return x, y

    x, y = arrays(train)
    xv, yv = arrays(val)
    x_mean, x_std = x.mean(0), x.std(0).clamp_min(1e-6)
    y_mean, y_std = torch.nanmean(y, 0), torch.tensor(
        [float(np.nanstd(y[:, j].numpy())) or 1.0 for j in range(len(properties))])
    config = PredictorConfig(properties, hidden_size, num_layers, feature_mean=x_mean.tolist(),
                             feature_std=x_std.tolist(), target_mean=y_mean.tolist(), target_std=y_std.tolist())
    model = PropertyPredictor(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * math.ceil(len(x) / batch_size))
    gen = torch.Generator().manual_seed(seed)
    yz = (y - y_mean) / y_std
    history, best, best_state = [], math.inf, None
    for epoch in tqdm(range(epochs), desc="train predictor", disable=not progress):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            pred, target = model(x[idx]), yz[idx]
            seen = ~torch.isnan(target)
            loss = (pred - torch.nan_to_num(target)).abs()[seen].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.inference_mode():
            pv = model(xv) * y_std + y_mean
        mae = {p: float(torch.nanmean((pv[:, j] - yv[:, j]).abs())) for j, p in enumerate(properties)}
        score = float(np.mean([mae[p] / float(y_std[j]) for j, p in enumerate(properties)]))
        history.append({"epoch": epoch + 1, "train_loss": total / len(x), "val_mae": mae})
        if score < best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
            config.metrics = {"val_mae": mae, "best_epoch": epoch + 1}
    model.load_state_dict(best_state)
    return model.eval(), history


def fine_tune_property_predictor(predictor: PropertyPredictor, data: dict[str, dict[str, float]], epochs: int = 30,
                                 batch_size: int = 64, lr: float = 5e-4, seed: int = 0) -> PropertyPredictor:
    """A copy of ``predictor`` trained further on ``data`` (``{formula: {property: value}}``; properties not given
    are masked), keeping its feature and target scaling so that what it knew stays on the same scale. Values of a
    non-negative property are clipped at 0 first. The input predictor is left as it was."""
    import copy

    if not data:
        raise ValueError("no labels to fine-tune the property predictor on")
    properties = predictor.config.properties
    unknown = {p for v in data.values() for p in v} - set(properties)
    if unknown:
        raise ValueError(f"the predictor does not predict {sorted(unknown)} (it predicts {properties})")
    torch.manual_seed(seed)
    model = copy.deepcopy(predictor)
    names = list(data)
    x = torch.from_numpy(composition_features(names))
    y = torch.tensor([[data[n].get(p, math.nan) for p in properties] for n in names], dtype=torch.float32)
    for j, p in enumerate(properties):
        if p in NON_NEGATIVE:
            y[:, j] = y[:, j].clamp_min(0.0)
    yz = (y - model.y_mean) / model.y_std
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            target = yz[idx]
            seen = ~torch.isnan(target)
            if not seen.any():
                continue
            loss = (model(x[idx]) - torch.nan_to_num(target)).abs()[seen].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.config = copy.deepcopy(predictor.config)
    model.config.metrics = {**predictor.config.metrics, "fine_tuned_on": len(names), "fine_tune_epochs": epochs}
    return model.eval()
