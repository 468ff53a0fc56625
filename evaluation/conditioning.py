"""Property targets and condition encodings, shared by every conditioned generator (the formula models in
:mod:`composition_lm.conditions`, CDVAE in :mod:`structure.cdvae`): one home, in the bottom layer.

* :class:`Target` / :func:`parse_target`: a requested window ``name=lo:hi`` (either side open);
* :class:`PropertyBins`: quantile bins of a property's training values (with each bin's share and
  quantiles for ranks), which travel in a model's config;
* :func:`condition_ids` / :func:`condition_values`: the conditions of ``n`` samples asking for targets, as
  bin ids (``0`` = not given) or ranks (NaN = not given); :func:`training_conditions` those of training
  rows; :func:`drop_conditions` / :func:`null_conditions` for condition dropout and unconditional calls;
* :func:`condition_module`: the embedding of one property in either encoding (:data:`ENCODINGS`).

How a request is turned into conditions (share-weighted bins, ranks for the continuous encoding) is
described in :mod:`composition_lm.conditions`, where the formula models' benchmarks measure it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["ENCODINGS", "N_QUANTILES", "ContinuousCondition", "PropertyBins", "Target", "condition_ids",
           "condition_module", "condition_values", "drop_conditions", "embed_conditions", "null_conditions",
           "parse_target", "sample_conditions", "training_conditions"]

#: how a property enters a denoiser: one bin id, or the rank of its value (composition_lm.conditions)
ENCODINGS = ("bins", "continuous")
#: quantiles of the training values kept per property (for the continuous encoding's ranks)
N_QUANTILES = 101


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
    for a model saved before they were kept: then bins are drawn as equally full). ``quantiles``:
    :data:`N_QUANTILES` evenly spaced quantiles of the training values, the continuous encoding's ranks."""

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...] | None = None
    quantiles: tuple[float, ...] | None = None

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
        return cls(name, tuple(edges), tuple(float(c) for c in counts / counts.sum()),
                   tuple(float(q) for q in np.quantile(v, np.linspace(0, 1, N_QUANTILES))))

    def rank(self, values: Sequence[float], side: str = "right") -> np.ndarray:
        """The training CDF at ``values`` (``side="right"``: F(v), the share at or below; ``"left"``: F(v-),
        the share strictly below), piecewise linear between the stored quantiles; NaN stays NaN."""
        if self.quantiles is None:
            raise ValueError(f"property {self.name!r} keeps no quantiles (a model saved before the continuous "
                             "encoding); use the bins encoding")
        q = np.asarray(self.quantiles)
        m = len(q) - 1
        v = np.asarray(values, dtype=np.float64)
        i = np.searchsorted(q, v, side=side)
        lo, hi = q[np.clip(i - 1, 0, m)], q[np.clip(i, 0, m)]
        frac = np.where(hi > lo, (v - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0 if side == "left" else 0.0)
        r = np.where(i == 0, 0.0, np.where(i > m, 1.0, (i - 1 + np.clip(frac, 0, 1)) / m))
        return np.where(np.isnan(v), np.nan, r)

    def jittered_rank(self, values: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """Randomised probability integral transform: ``u`` uniform between F(v-) and F(v), so a value shared
        by many formulas spreads over its whole share and ``u`` is uniform over the training set."""
        lo, hi = self.rank(values, "left"), self.rank(values, "right")
        return lo + (hi - lo) * rng.random(len(lo))

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
        return [b for b in range(1, self.n_bins + 1)
                if self.bounds(b)[0] <= target.hi and self.bounds(b)[1] >= target.lo]

    def weights(self, bin_ids: Sequence[int]) -> np.ndarray:
        """Sampling weights of ``bin_ids`` (their training shares, or equal without them), summing to 1."""
        w = np.ones(len(bin_ids)) if self.shares is None else np.asarray([self.shares[b - 1] for b in bin_ids])
        return w / w.sum() if w.sum() > 0 else np.full(len(bin_ids), 1 / len(bin_ids))

    def as_dict(self) -> dict:
        d = {"name": self.name, "edges": list(self.edges)}
        if self.shares is not None:
            d["shares"] = list(self.shares)
        if self.quantiles is not None:
            d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PropertyBins:
        return cls(d["name"], tuple(d["edges"]), tuple(d["shares"]) if d.get("shares") else None,
                   tuple(d["quantiles"]) if d.get("quantiles") else None)


def condition_ids(bins: Sequence[PropertyBins], targets: Sequence[Target], n: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``[n, len(bins)]`` condition ids for sampling: for each targeted property a bin drawn among
    :meth:`PropertyBins.window_bins` per sample with the weight of its training share
    (:meth:`PropertyBins.weights`), 0 (not given) for the others. An unknown property name raises
    ``ValueError`` listing the model's properties."""
    out = torch.zeros(n, len(bins), dtype=torch.long)
    for t in targets:
        j = _property_index(bins, t)
        choices = bins[j].window_bins(t)
        weights = torch.as_tensor(bins[j].weights(choices), dtype=torch.float64)
        out[:, j] = torch.tensor(choices)[torch.multinomial(weights, n, replacement=True, generator=generator)]
    return out


def _property_index(bins: Sequence[PropertyBins], target: Target) -> int:
    names = [b.name for b in bins]
    if target.name not in names:
        known = ", ".join(names) if names else "none (train with --condition-on)"
        raise ValueError(f"this model is not conditioned on {target.name!r}; its properties: {known}")
    return names.index(target.name)


def condition_values(bins: Sequence[PropertyBins], targets: Sequence[Target], n: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``[n, len(bins)]`` continuous conditions for sampling: for each targeted property a rank ``u`` drawn
    uniformly between F(lo-) and F(hi) of its window (the training distribution restricted to the window),
    NaN (not given) for the others."""
    out = torch.full((n, len(bins)), math.nan, dtype=torch.float32)
    for t in targets:
        j = _property_index(bins, t)
        a = float(bins[j].rank([t.lo], "left")[0])
        b = float(bins[j].rank([t.hi], "right")[0])
        out[:, j] = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64).float()
    return out


def sample_conditions(config, targets: Sequence[Target], n: int, generator: torch.Generator) -> torch.Tensor:
    """The conditions of ``n`` samples asking for ``targets``, in the encoding of the model ``config`` (any
    config with ``property_bins()`` and ``property_encoding``)."""
    bins = config.property_bins()
    if config.property_encoding == "continuous":
        return condition_values(bins, targets, n, generator)
    return condition_ids(bins, targets, n, generator)


def training_conditions(bins: Sequence[PropertyBins], rows: Sequence[dict], encoding: str = "bins",
                        seed: int = 0) -> torch.Tensor:
    """``[len(rows), len(bins)]`` conditions of training formulas (``rows``: ``{property: value}`` each, a
    missing property not given): bin ids, or jittered ranks (:meth:`PropertyBins.jittered_rank`, seeded)."""
    cols = [[r.get(b.name, float("nan")) for r in rows] for b in bins]
    if encoding == "continuous":
        rng = np.random.default_rng(seed)
        u = [b.jittered_rank(c, rng) for b, c in zip(bins, cols)]
        return torch.tensor(np.stack(u, 1) if u else np.zeros((len(rows), 0)), dtype=torch.float32)
    ids = [b.bin_of(c) for b, c in zip(bins, cols)]
    return torch.tensor(np.stack(ids, 1) if ids else np.zeros((len(rows), 0)), dtype=torch.long)


def null_conditions(conditions: torch.Tensor) -> torch.Tensor:
    """"Not given" for every entry, in the encoding of ``conditions`` (0 for bin ids, NaN for ranks)."""
    if conditions.is_floating_point():
        return torch.full_like(conditions, math.nan)
    return torch.zeros_like(conditions)


def drop_conditions(conditions: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``conditions`` with each entry set to "not given" independently with probability ``p``."""
    keep = torch.rand(conditions.shape, generator=generator, device=conditions.device) >= p
    return torch.where(keep, conditions, null_conditions(conditions))


class ContinuousCondition(nn.Module):
    """A property rank ``u`` in [0, 1] -> a ``width`` vector: ``u`` and ``sin/cos(pi k u)``, k = 1..8, through
    a two-layer network; NaN ("not given") -> zero."""

    N_FREQ = 8

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * self.N_FREQ + 1, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        given = torch.isfinite(u)
        u = torch.where(given, u, torch.zeros_like(u)).float()[:, None]
        k = math.pi * torch.arange(1, self.N_FREQ + 1, device=u.device, dtype=u.dtype)
        features = torch.cat([u, torch.sin(k * u), torch.cos(k * u)], dim=-1)
        return self.net(features.to(self.net[0].weight.dtype)) * given[:, None].to(self.net[0].weight.dtype)


def embed_conditions(embeddings, conditions: torch.Tensor | None) -> torch.Tensor | None:
    """The sum over properties of each one's embedding (``embeddings[j]``, from :func:`condition_module`) of its
    column of ``conditions`` (``[B, P]`` bin ids or ranks), or None for an unconditional call or no property."""
    if conditions is None or not len(embeddings):
        return None
    return sum(emb(conditions[:, j]) for j, emb in enumerate(embeddings))


def condition_module(n_ids: int, width: int, encoding: str) -> nn.Module:
    """The embedding of one property: a table of ``n_ids`` rows (row 0, "not given", zero) for ``bins``,
    a :class:`ContinuousCondition` for ``continuous``."""
    if encoding == "continuous":
        return ContinuousCondition(width)
    return nn.Embedding(n_ids, width, padding_idx=0)
