"""CSPML-style structure prediction: ratio-matched templates, ranked, substituted.

For a query composition: take every template with the same ratio key (:meth:`TemplateStore.candidates`),
score them (``learned``: the store's :class:`~structure.ranking.CompositionRanker`; ``plain``: the
untrained descriptor distance; ``random``: a seeded random order, the baseline), and turn the best
``top_k`` into structures of the query by element substitution and volume scaling
(:func:`~structure.substitution.substitute`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition

from structure.descriptors import descriptor
from structure.ranking import CompositionRanker, plain_distance_scores
from structure.substitution import substitute
from structure.templates import TemplateStore

RANKINGS = ("learned", "plain", "random")


@dataclass
class Prediction:
    formula: str  # the query's reduced formula
    rank: int  # 1 = best
    template_row: int
    template_id: str
    template_formula: str
    similarity: float  # ranker probability (learned), negative distance (plain) or a random number
    structure: object  # pymatgen Structure with the query's composition


def rank_templates(store: TemplateStore, composition: Composition | str, ranking: str = "learned",
                   ranker: CompositionRanker | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, scores)`` of the ratio-matched templates, best first (empty arrays when none match)."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    rows = store.candidates(composition)
    if len(rows) == 0:
        return rows, np.zeros(0)
    if ranking == "random":  # seeded per formula, so formulas sharing a ratio key get different orders
        comp = Composition(composition) if isinstance(composition, str) else composition
        scores = np.random.default_rng([seed, zlib.crc32(comp.reduced_formula.encode())]).random(len(rows))
    else:
        query = descriptor(composition)
        if ranking == "plain":
            scores = plain_distance_scores(query, store.descriptors[rows])
        else:
            if ranker is None:
                raise ValueError("the learned ranking needs a ranker (train one with `composition-gen templates "
                                 "train-ranker`, or use ranking='plain')")
            scores = ranker.scores(query, store.descriptors[rows])
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]


def predict(store: TemplateStore, composition: Composition | str, top_k: int = 5, ranking: str = "learned",
            ranker: CompositionRanker | None = None, seed: int = 0, scale_volume: bool = True) -> list[Prediction]:
    """Up to ``top_k`` predicted structures of ``composition`` (fewer when fewer templates match; none
    when no template has its ratio key)."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    rows, scores = rank_templates(store, comp, ranking, ranker, seed)
    out = []
    for rank, (row, score) in enumerate(zip(rows[:top_k], scores[:top_k]), start=1):
        s = substitute(store.structure(int(row)), comp, scale_volume=scale_volume)
        out.append(Prediction(comp.reduced_formula, rank, int(row), store.ids[row], store.formulas[row], float(score) + 0.0, s))
    return out
