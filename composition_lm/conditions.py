"""Property conditions for the formula models (issue 18): binned property values as conditioning input.

Each conditioning property is cut into quantile bins of the training values (:class:`PropertyBins`); a
formula's condition is one id per property: ``0`` for "not given" (unknown label, condition dropout, or
unconditional sampling) and ``1 .. n_bins`` for the bin of its value. Bins are chosen from the data, so
each holds about the same number of training formulas, and they travel with the model's config
(``save_pretrained`` keeps them).

A request is a :class:`Target`, ``name=lo:hi`` with either side open (``band_gap=1.0:3.0``,
``e_above_hull=:0.05``, ``band_gap=3:``); :meth:`PropertyBins.window_bins` says which bins a window asks for,
and :func:`condition_ids` draws, per sample, one of them with the probability of its share of the training
values, so a window is asked for as the training data fill it (a point mass such as E_hull = 0, a bin of its
own, holds far more than its neighbours: drawn uniformly, the bins of ``e_above_hull=:0.05`` asked for the
on-hull bin a quarter of the time instead of its 66 %).

:func:`corpus_properties` reads the numeric columns of a corpus per reduced formula (the ground state, as
:func:`evaluation.properties.formula_properties` defines it).

Both formula models take conditions the same way (:class:`PropertyConditioned`): one embedding table per
property, id 0 fixed at zero, the sum over properties added to what the denoiser already adds for the step
(Diffusion-BERT: every token embedding; Diffusion-LM: the time embedding). While training,
:func:`drop_conditions` sets each property to "not given" with probability ``property_dropout``, so one
model samples both conditionally and unconditionally (classifier-free guidance needs both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["PropertyBins", "PropertyConditioned", "Target", "condition_ids", "corpus_properties", "drop_conditions",
           "parse_target"]


@dataclass(frozen=True)
class Target:
    """A requested window ``lo <= property <= hi`` (either side may be infinite)."""

    name: str
    lo: float = -math.inf
    hi: float = math.inf

    def contains(self, values: np.ndarray) -> np.ndarray:
        return (values >= self.lo) & (values <= self.hi)

    def __str__(self) -> str:
        fmt = lambda v: "" if math.isinf(v) else f"{v:g}"  # noqa: E731
        return f"{self.name}={fmt(self.lo)}:{fmt(self.hi)}"


def parse_target(text: str) -> Target:
    """``"band_gap=1.0:3.0"`` -> ``Target("band_gap", 1.0, 3.0)``; ``"e_above_hull=:0.05"`` is open below.
    Malformed text raises ``ValueError`` saying what is expected."""
    usage = "a target is NAME=LO:HI with either bound left out, e.g. band_gap=1.0:3.0 or e_above_hull=:0.05"
    name, sep, window = text.partition("=")
    name = name.strip()
    if not sep or not name or ":" not in window:
        raise ValueError(f"cannot read target {text!r}: {usage}")
    lo_text, _, hi_text = window.partition(":")
    try:
        lo = float(lo_text) if lo_text.strip() else -math.inf
        hi = float(hi_text) if hi_text.strip() else math.inf
    except ValueError:
        raise ValueError(f"cannot read the bounds of target {text!r}: {usage}") from None
    if math.isnan(lo) or math.isnan(hi) or (math.isinf(lo) and math.isinf(hi)):
        raise ValueError(f"target {text!r} sets no bound: {usage}")
    if lo > hi:
        raise ValueError(f"target {text!r} has its lower bound above its upper bound")
    return Target(name, lo, hi)


@dataclass(frozen=True)
class PropertyBins:
    """Quantile bins of one property: ``edges`` (increasing) cut the line into ``len(edges) + 1`` bins,
    ids ``1 .. n_bins``; id 0 means "not given". ``shares``: each bin's share of the training values (None
    for a model saved before they were kept: then bins are drawn as equally full)."""

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...] | None = None

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    @classmethod
    def from_values(cls, name: str, values: Sequence[float], n_bins: int = 8) -> PropertyBins:
        """Bins holding about equal shares of the finite ``values``. A value that holds at least
        ``1 / n_bins`` of them (band gap 0 for the metals, say) gets a bin of its own, and the rest are
        cut into quantile bins, so a zero-inflated property still has bins among its non-zero values."""
        v = np.asarray(values, dtype=np.float64)
        v = np.sort(v[np.isfinite(v)])
        if len(v) < 2:
            raise ValueError(f"property {name!r} has fewer than 2 numeric values to bin")
        uniq, counts = np.unique(v, return_counts=True)
        masses = uniq[counts >= len(v) / n_bins]
        edges = set()
        for m in masses:
            edges |= {float(m), float(np.nextafter(m, np.inf))}
        rest = v[~np.isin(v, masses)]
        k = n_bins - len(masses)
        if k > 1 and len(rest) > 1:
            edges |= {float(q) for q in np.quantile(rest, np.linspace(0, 1, k + 1)[1:-1])}
        edges = sorted(e for e in edges if v[0] < e <= v[-1])
        if not edges:
            raise ValueError(f"property {name!r} takes a single value; nothing to condition on")
        counts = np.bincount(np.searchsorted(np.asarray(edges), v, side="right"), minlength=len(edges) + 1)
        return cls(name, tuple(edges), tuple(float(c) for c in counts / counts.sum()))

    def bin_of(self, values: Sequence[float]) -> np.ndarray:
        """Bin id of each value (``0`` for NaN); a value on an edge belongs to the bin above it."""
        v = np.asarray(values, dtype=np.float64)
        ids = np.searchsorted(np.asarray(self.edges), v, side="right") + 1
        return np.where(np.isfinite(v), ids, 0)

    def bounds(self, bin_id: int) -> tuple[float, float]:
        e = (-math.inf, *self.edges, math.inf)
        return e[bin_id - 1], e[bin_id]

    def window_bins(self, target: Target) -> list[int]:
        """The bins a window asks for: those lying inside it, or if none does (a window narrower than a
        bin), those it overlaps."""
        inside = [b for b in range(1, self.n_bins + 1)
                  if self.bounds(b)[0] >= target.lo and self.bounds(b)[1] <= target.hi]
        if inside:
            return inside
        return [b for b in range(1, self.n_bins + 1) if self.bounds(b)[0] <= target.hi and self.bounds(b)[1] >= target.lo]

    def weights(self, bin_ids: Sequence[int]) -> np.ndarray:
        """Sampling weights of ``bin_ids`` (their training shares, or equal without them), summing to 1."""
        w = np.ones(len(bin_ids)) if self.shares is None else np.asarray([self.shares[b - 1] for b in bin_ids])
        return w / w.sum() if w.sum() > 0 else np.full(len(bin_ids), 1 / len(bin_ids))

    def as_dict(self) -> dict:
        d = {"name": self.name, "edges": list(self.edges)}
        if self.shares is not None:
            d["shares"] = list(self.shares)
        return d


def condition_ids(bins: Sequence[PropertyBins], targets: Sequence[Target], n: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``[n, len(bins)]`` condition ids for sampling: for each targeted property a bin drawn among
    :meth:`PropertyBins.window_bins` per sample with the weight of its training share
    (:meth:`PropertyBins.weights`), 0 (not given) for the others. An unknown property name raises
    ``ValueError`` listing the model's properties."""
    names = [b.name for b in bins]
    out = torch.zeros(n, len(bins), dtype=torch.long)
    for t in targets:
        if t.name not in names:
            known = ", ".join(names) if names else "none (train with --condition-on)"
            raise ValueError(f"this model is not conditioned on {t.name!r}; its properties: {known}")
        j = names.index(t.name)
        choices = bins[j].window_bins(t)
        weights = torch.as_tensor(bins[j].weights(choices), dtype=torch.float64)
        out[:, j] = torch.tensor(choices)[torch.multinomial(weights, n, replacement=True, generator=generator)]
    return out


def corpus_properties(path: str, names: Sequence[str], column: str | None = None,
                      split: str | None = None) -> dict[str, dict[str, float]]:
    """``{reduced formula: {name: value}}`` from a CSV/TSV/Parquet corpus with a formula column and numeric
    columns ``names`` (rows of ``split`` only, when the corpus has a ``split`` column); each formula's
    values are its ground state's (lowest ``e_above_hull`` where the corpus has it). A missing column
    raises ``ValueError`` naming the numeric columns there are."""
    import pandas as pd

    from evaluation.properties import formula_properties

    p = str(path)
    table = pd.read_parquet(p) if p.endswith(".parquet") else pd.read_csv(p, sep="\t" if p.endswith(".tsv") else ",")
    if split and "split" in table:
        table = table[table["split"] == split]
    formula_column = column or next((c for c in ("reduced_formula", "formula", "composition") if c in table), None)
    if formula_column is None:
        raise ValueError(f"{path} has no formula column (reduced_formula, formula or composition); pass --column")
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    missing = [n for n in names if n not in numeric]
    if missing:
        raise ValueError(f"{path} has no numeric column {', '.join(missing)}; numeric columns: {', '.join(numeric)}")
    return formula_properties(table, list(names), formula_column=formula_column)


def drop_conditions(conditions: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``conditions`` with each entry set to 0 ("not given") independently with probability ``p``."""
    keep = torch.rand(conditions.shape, generator=generator, device=conditions.device) >= p
    return conditions * keep


class PropertyConditioned:
    """Mixin of a formula denoiser with ``property_embeddings`` (an ``nn.ModuleList``, one table per property of
    ``config.property_conditions``, row 0 fixed at zero); the model calls :meth:`init_property_embeddings` in
    its ``__init__`` and adds :meth:`condition_embedding` where it adds its time embedding."""

    def init_property_embeddings(self, width: int) -> None:
        self.property_embeddings = nn.ModuleList(
            nn.Embedding(len(c["edges"]) + 2, width, padding_idx=0) for c in self.config.property_conditions)

    def condition_embedding(self, conditions: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, width]``: the sum of each property's embedding of its bin id (``conditions``: ``[B, P]``), or
        None for an unconditional call or a model without conditions."""
        if conditions is None or not len(self.property_embeddings):
            return None
        return sum(emb(conditions[:, j]) for j, emb in enumerate(self.property_embeddings))

    @torch.no_grad()
    def add_property_conditioning(self, bins: Sequence[PropertyBins]) -> None:
        """Extend a model with property conditions to fine-tune it (``train --init-from ... --condition-on``);
        the new embeddings start at zero, so the extended model first behaves exactly like the original one."""
        if self.config.property_conditions:
            if [b.as_dict() for b in bins] != self.config.property_conditions:
                raise ValueError("this model is already conditioned on other properties or bins: "
                                 f"{[c['name'] for c in self.config.property_conditions]}")
            return
        ref = next(self.parameters())
        width = self.config.hidden_size
        self.property_embeddings = nn.ModuleList(
            nn.Embedding(b.n_bins + 1, width, padding_idx=0).to(ref) for b in bins)
        for emb in self.property_embeddings:
            emb.weight.zero_()
        self.config.property_conditions = [b.as_dict() for b in bins]
