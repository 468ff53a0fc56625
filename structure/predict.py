"""CSPML-style structure prediction: ratio-matched templates, ranked, substituted.

For a query composition: take every template with the same ratio key (:meth:`TemplateStore.candidates`),
score them (``learned``: the store's :class:`~structure.ranking.CompositionRanker`; ``plain``: the
untrained descriptor distance; ``random``: a seeded random order, the baseline), and turn the best
``top_k`` into structures of the query by element substitution and volume scaling
(:func:`~structure.substitution.substitute`). By default the best templates are first collapsed into
structure types (their prototype labels), each type scored by the pooled similarity of its templates (:func:`group_by_type`):
a type that several close templates share beats a lone slightly closer template, and the ``top_k``
predictions are ``top_k`` different types.
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
            scores = ranker.rank(store, query, rows)
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]


def predict(store: TemplateStore, composition: Composition | str, top_k: int = 5, ranking: str = "learned",
            ranker: CompositionRanker | None = None, seed: int = 0, scale_volume: bool = True,
            group_types: bool = True, pool: int = 20) -> list[Prediction]:
    """Up to ``top_k`` predicted structures of ``composition`` (fewer when fewer templates match; none
    when no template has its ratio key). With ``group_types`` (not for the random ranking) the ``pool``
    best templates are collapsed into structure types first (:func:`group_by_type`): one prediction per
    type, types ranked by the pooled similarity of their templates."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    rows, scores = rank_templates(store, comp, ranking, ranker, seed)
    if group_types and ranking != "random" and len(rows) > 1:
        rows, scores = group_by_type(store, rows, scores, pool=pool)
    out = []
    for rank, (row, score) in enumerate(zip(rows[:top_k], scores[:top_k]), start=1):
        s = substitute(store.structure(int(row)), comp, scale_volume=scale_volume)
        out.append(Prediction(comp.reduced_formula, rank, int(row), store.ids[row], store.formulas[row], float(score) + 0.0, s))
    return out


def group_by_type(store: TemplateStore, rows: np.ndarray, scores: np.ndarray, pool: int = 20,
                  temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Collapse the ``pool`` best templates into structure types and rank the types.

    Templates are grouped by their prototype label (:func:`structure.templates.prototype_label`, computed
    when the store was built); a group scores ``T * logsumexp(scores / T)`` over its members, so a type
    that several close templates share outranks a lone slightly closer one. Returns ``(representative
    rows, group scores)``, best first: one template per type (its best-scored member), then the templates
    beyond the pool in their order.
    """
    head = min(pool, len(rows))
    if head == 0:
        return rows, scores
    labels = store.prototype_ids[rows[:head]]
    types, first = np.unique(labels, return_index=True)
    agg = np.array([temperature * np.logaddexp.reduce(scores[:head][labels == t].astype(np.float64) / temperature)
                    for t in types])
    order = np.lexsort((first, -agg))  # best pooled score first; ties: the type met first
    return np.concatenate([rows[first[order]], rows[pool:]]), np.concatenate([agg[order], scores[pool:]])


def rerank_by_energy(energies) -> list[int]:
    """Positions of candidates ordered by energy per atom, lowest first (physics re-ranking of relaxed
    template structures). Candidates without a finite energy (not relaxed, relaxation failed) are kept,
    after every relaxed one, in their original order: nothing is dropped."""
    finite = [i for i, e in enumerate(energies) if e is not None and np.isfinite(e)]
    rest = [i for i, e in enumerate(energies) if e is None or not np.isfinite(e)]
    return sorted(finite, key=lambda i: (energies[i], i)) + rest
