"""Property conditions for the formula models (issue 18): property values as conditioning input.

The pieces every conditioned generator shares (targets, bins, encodings) live in
:mod:`evaluation.conditioning` and are re-exported here; this module adds what is particular to the
formula models: reading a formula corpus's properties and the embedding mixin of their denoisers.

Each conditioning property is cut into quantile bins of the training values (:class:`PropertyBins`, which
also keeps each bin's share and quantiles of the values); with the default encoding a formula's condition
is one id per property: ``0`` for "not given" (unknown label, condition dropout, or unconditional sampling)
and ``1 .. n_bins`` for the bin of its value. Bins are chosen from the data, so each holds about the same
number of training formulas, and they travel with the model's config (``save_pretrained`` keeps them).

A request is a :class:`Target`, ``name=lo:hi`` with either side open (``band_gap=1.0:3.0``,
``e_above_hull=:0.05``, ``band_gap=3:``); :meth:`PropertyBins.window_bins` says which bins a window asks for,
and :func:`condition_ids` draws, per sample, one of them with the probability of its share of the training
values, so a window is asked for as the training data fill it (a point mass such as E_hull = 0, a bin of its
own, holds far more than its neighbours: drawn uniformly, the bins of ``e_above_hull=:0.05`` asked for the
on-hull bin a quarter of the time instead of its 66 %).

:func:`corpus_properties` reads the numeric columns of a corpus per reduced formula (the ground state, as
:func:`evaluation.properties.formula_properties` defines it).

Two encodings (``property_encoding`` in the config; ``train --condition-encoding``):

* ``bins`` (the default): a formula's condition is one bin id per property, embedded by a table whose row 0
  is fixed at zero;
* ``continuous``: the property's rank in the training distribution, ``u`` in [0, 1] (the randomised
  probability integral transform: a value shared by many formulas, such as band gap 0, gets ``u`` drawn
  across its whole share, so ``u`` is uniform), embedded by a small network of Fourier features of ``u``
  (:class:`ContinuousCondition`); ``NaN`` means "not given" and embeds to zero. A window asks for ``u`` drawn
  uniformly between the ranks of its bounds, i.e. the training distribution restricted to the window.

Both formula models take conditions the same way (:class:`PropertyConditioned`): one embedding per
property, "not given" embedding to zero, the sum over properties added to what the denoiser already adds for the step
(Diffusion-BERT: every token embedding; Diffusion-LM: the time embedding). While training,
:func:`drop_conditions` sets each property to "not given" with probability ``property_dropout``, so one
model samples both conditionally and unconditionally (classifier-free guidance needs both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from evaluation.conditioning import (ENCODINGS, ContinuousCondition, PropertyBins, Target, condition_ids,
                                     condition_module, condition_values, drop_conditions, embed_conditions,
                                     null_conditions, parse_target, sample_conditions, training_conditions)

__all__ = ["ENCODINGS", "ContinuousCondition", "PropertyBins", "PropertyConditioned", "Target", "condition_ids",
           "condition_values", "corpus_properties", "drop_conditions", "null_conditions", "parse_target",
           "sample_conditions", "training_conditions"]


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


class PropertyConditioned:
    """Mixin of a formula denoiser with ``property_embeddings`` (an ``nn.ModuleList``, one module per property of
    ``config.property_conditions``: a table with row 0 fixed at zero, or a :class:`ContinuousCondition`); the
    model calls :meth:`init_property_embeddings` in its ``__init__`` and adds :meth:`condition_embedding`
    where it adds its time embedding."""

    def init_property_embeddings(self, width: int) -> None:
        self.property_embeddings = nn.ModuleList(
            condition_module(b.n_bins + 1, width, self.config.property_encoding) for b in self.config.property_bins())

    def condition_embedding(self, conditions: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, width]``: the sum of each property's embedding of its condition (``conditions``: ``[B, P]``
        bin ids or ranks), or None for an unconditional call or a model without conditions."""
        return embed_conditions(self.property_embeddings, conditions)

    @torch.no_grad()
    def add_property_conditioning(self, bins: Sequence[PropertyBins], encoding: str = "bins") -> None:
        """Extend a model with property conditions to fine-tune it (``train --init-from ... --condition-on``);
        the new embeddings start at zero output, so the extended model first behaves exactly like the
        original one."""
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown condition encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
        if self.config.property_conditions:
            if [b.name for b in bins] != [c["name"] for c in self.config.property_conditions] or (
                    encoding != self.config.property_encoding):
                raise ValueError("this model is already conditioned on other properties or encoding: "
                                 f"{[c['name'] for c in self.config.property_conditions]} "
                                 f"({self.config.property_encoding})")
            return
        ref = next(self.parameters())
        self.property_embeddings = nn.ModuleList(
            condition_module(b.n_bins + 1, self.config.hidden_size, encoding).to(ref) for b in bins)
        for module in self.property_embeddings:
            last = module if isinstance(module, nn.Embedding) else module.net[-1]
            last.weight.zero_()
            if getattr(last, "bias", None) is not None:
                last.bias.zero_()
        self.config.property_conditions = [b.as_dict() for b in bins]
        self.config.property_encoding = encoding
