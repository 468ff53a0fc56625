"""Chemical validity, metrics and reports: the bottom layer of composition-gen (it imports neither
``composition_lm`` nor ``structure``).

The objects a notebook needs, importable from here (loaded on first use, so ``import evaluation`` is
instant)::

    from evaluation import validate, formula_set_metrics, evaluate_structures

    validate(["NaCl", "NaCl2"])                    # a DataFrame: validity and the reason for each failure
    formula_set_metrics(samples, train=corpus)     # validity, uniqueness, novelty, distances
    evaluate_structures(structures, test_set)      # CDVAE's structure metrics (validity, COV, Wasserstein)
"""

from __future__ import annotations

import importlib

__all__ = ["validate", "check_formula", "check_formulas", "formula_set_metrics", "evaluate_structures",
           "parse_formula"]

_HOMES = {
    "validate": "evaluation.validity",
    "check_formula": "evaluation.validity",
    "check_formulas": "evaluation.validity",
    "formula_set_metrics": "evaluation.metrics",
    "evaluate_structures": "evaluation.structures",
    "parse_formula": "evaluation.composition",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
