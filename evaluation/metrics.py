"""Metrics of a generated formula set against a training corpus, held-out sets and a reference.

Definitions (``samples`` = every generated string, unparseable ones included):

* ``parse_rate`` = parsed samples / samples.
* ``validity[protocol].raw`` = valid samples / samples (an unparseable sample is invalid);
  ``validity[protocol].unique`` = valid / distinct reduced formulas.
* ``uniqueness`` = distinct reduced formulas / samples.
* ``novelty`` = distinct formulas absent from the training formulas / distinct formulas.
* ``valid_novel_unique[protocol]`` = distinct formulas that are valid and novel (a count).
* ``recovery[name]`` = of a held-out set's formulas that are not in training, the fraction generated.
* Distribution distances vs the reference set (its distinct formulas) use the *parsed samples*
  (duplicates kept: they are the generator's distribution):
  ``element_js`` = Jensen-Shannon divergence (base 2, in [0, 1]) between the element frequency
  distributions, where an element's frequency is the share of formulas containing it, normalised
  over elements; ``n_elements_wasserstein`` and ``n_atoms_wasserstein`` = 1-D Wasserstein distances
  of the number of elements and of atoms per reduced formula.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from evaluation.composition import ELEMENTS, Formula, try_parse_formula
from evaluation.validity import PROTOCOLS, check_formulas

__all__ = ["element_frequencies", "js_divergence", "wasserstein_1d", "formula_set_metrics"]


def _parse_all(texts: Iterable[str]) -> list[Formula | None]:
    return [try_parse_formula(t)[0] if t else None for t in texts]


def _formula_set(texts: Iterable[str]) -> set[str]:
    return {str(f) for f in _parse_all(texts) if f is not None}


def element_frequencies(formulas: Iterable[Formula]) -> np.ndarray:
    """Share of formulas containing each element (index Z-1), normalised to sum to 1."""
    counts = Counter(sym for f in formulas for sym in f.elements)
    vec = np.array([counts.get(sym, 0) for sym in ELEMENTS], dtype=float)
    total = vec.sum()
    return vec / total if total else vec


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def wasserstein_1d(u: Sequence[float], v: Sequence[float]) -> float:
    from scipy.stats import wasserstein_distance

    if len(u) == 0 or len(v) == 0:
        return float("nan")
    return float(wasserstein_distance(u, v))


def _histogram(values: Iterable[int]) -> dict[str, float]:
    c = Counter(values)
    n = sum(c.values()) or 1
    return {str(k): c[k] / n for k in sorted(c)}


def formula_set_metrics(
    samples: Sequence[str],
    train: Iterable[str] | None = None,
    heldout: Mapping[str, Iterable[str]] | None = None,
    reference: Iterable[str] | None = None,
    protocols: Sequence[str] = PROTOCOLS,
    train_canonical: bool = False,
) -> dict:
    """All metrics of ``samples`` (raw strings). See the module docstring for definitions.

    ``train_canonical``: ``train`` already holds canonical reduced formulas (such as a model's stored
    training formulas), so they are used as they are instead of being parsed again.

    >>> from evaluation import formula_set_metrics
    >>> m = formula_set_metrics(["NaCl", "NaCl", "KCl", "Xx"], train=["NaCl"])
    >>> m["uniqueness"], m["novelty"]
    (0.5, 0.5)
    >>> validity = m["validity"]
    >>> validity["cdvae"].get("raw")
    0.75
    """
    parsed = _parse_all(samples)
    ok = [f for f in parsed if f is not None]
    unique = list(dict.fromkeys(ok))
    n = len(samples)
    out: dict = {
        "n_samples": n,
        "n_parsed": len(ok),
        "parse_rate": len(ok) / n if n else 0.0,
        "n_unique": len(unique),
        "uniqueness": len(unique) / n if n else 0.0,
        "validity": {},
    }
    train_set = None if train is None else set(train) if train_canonical else _formula_set(train)
    novel = [f for f in unique if str(f) not in train_set] if train_set is not None else None
    if novel is not None:
        out["n_train_formulas"] = len(train_set)
        out["n_novel_unique"] = len(novel)
        out["novelty"] = len(novel) / len(unique) if unique else 0.0
        out["valid_novel_unique"] = {}
    for proto in protocols:
        verdict = {f: r.valid for f, r in zip(unique, check_formulas(unique, proto))}
        n_valid_raw = sum(verdict[f] for f in ok)
        out["validity"][proto] = {
            "raw": n_valid_raw / n if n else 0.0,
            "unique": sum(verdict.values()) / len(unique) if unique else 0.0,
        }
        if novel is not None:
            out["valid_novel_unique"][proto] = sum(verdict[f] for f in novel)
    if heldout:
        generated = {str(f) for f in unique}
        out["recovery"] = {}
        for name, texts in heldout.items():
            target = _formula_set(texts) - (train_set or set())
            hit = len(target & generated)
            out["recovery"][name] = {
                "n_heldout_not_in_train": len(target),
                "n_recovered": hit,
                "recovery": hit / len(target) if target else 0.0,
            }
    if reference is not None:
        ref = list(dict.fromkeys(f for f in _parse_all(reference) if f is not None))
        out["distribution"] = {
            "n_reference": len(ref),
            "element_js": js_divergence(element_frequencies(ok), element_frequencies(ref)) if ok and ref else 1.0,
            "n_elements_wasserstein": wasserstein_1d([f.n_elements for f in ok], [f.n_elements for f in ref]),
            "n_atoms_wasserstein": wasserstein_1d([f.n_atoms for f in ok], [f.n_atoms for f in ref]),
        }
        out["histograms"] = {
            "n_elements": {"generated": _histogram(f.n_elements for f in ok), "reference": _histogram(f.n_elements for f in ref)},
            "n_atoms": {"generated": _histogram(f.n_atoms for f in ok), "reference": _histogram(f.n_atoms for f in ref)},
            "element_frequency": {
                "generated": dict(zip(ELEMENTS, element_frequencies(ok).round(6).tolist())),
                "reference": dict(zip(ELEMENTS, element_frequencies(ref).round(6).tolist())),
            },
        }
    elif ok:
        out["histograms"] = {"n_elements": {"generated": _histogram(f.n_elements for f in ok)},
                             "n_atoms": {"generated": _histogram(f.n_atoms for f in ok)}}
    return out
