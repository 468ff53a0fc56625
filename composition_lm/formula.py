"""Formulas as token sequences: the two codecs the language models write in.

Parsing and the canonical :class:`~evaluation.composition.Formula` live in
:mod:`evaluation.composition` (re-exported here); this module turns a formula into tokens and back.

``expanded`` (Dong et al. 2023)
    Each element repeated by its count, elements in canonical order (ascending electronegativity):
    ``SrTiO3 -> Sr Ti O O O``. Length = atoms in the reduced formula.
``compact`` (ours)
    Every element followed by an explicit count token, ``SrTiO3 -> Sr 1 Ti 1 O 3``. Length = 2 x
    elements, so it stays short for large cells; the explicit ``1`` keeps the grammar strictly
    alternating (element, count), which is easy to learn and to decode unambiguously.

Both are lossless on reduced formulas: ``decode(encode(f)) == f`` (tested on every formula in the
Materials Project corpus). Decoding is lenient about element order (it re-canonicalises) but strict
about grammar: it raises :class:`FormulaError` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from evaluation.composition import ATOMIC_NUMBER, Formula, FormulaError, parse_formula, try_parse_formula

__all__ = [
    "CODECS",
    "CompactCodec",
    "ExpandedCodec",
    "Formula",
    "FormulaCodec",
    "FormulaError",
    "get_codec",
    "parse_formula",
    "try_parse_formula",
]


class FormulaCodec(Protocol):
    name: str

    def encode(self, formula: Formula) -> list[str]: ...

    def decode(self, tokens: Sequence[str]) -> Formula: ...

    def length(self, formula: Formula) -> int: ...


class ExpandedCodec:
    """``Sr Ti O O O``: each element repeated by its count."""

    name = "expanded"

    def encode(self, formula: Formula) -> list[str]:
        return [sym for sym, n in formula.counts for _ in range(n)]

    def decode(self, tokens: Sequence[str]) -> Formula:
        counts: dict[str, int] = {}
        for tok in tokens:
            if tok not in ATOMIC_NUMBER:
                raise FormulaError(f"not an element token: {tok!r}")
            counts[tok] = counts.get(tok, 0) + 1
        return Formula.from_counts(counts)

    def length(self, formula: Formula) -> int:
        return formula.n_atoms


class CompactCodec:
    """``Sr 1 Ti 1 O 3``: element then count, every count explicit."""

    name = "compact"

    def __init__(self, max_count: int = 200):
        self.max_count = max_count

    def encode(self, formula: Formula) -> list[str]:
        out = []
        for sym, n in formula.counts:
            if n > self.max_count:
                raise FormulaError(f"count {n} of {sym} exceeds the largest count token {self.max_count}")
            out += [sym, str(n)]
        return out

    def decode(self, tokens: Sequence[str]) -> Formula:
        if len(tokens) % 2:
            raise FormulaError("odd number of tokens: an element lacks its count")
        counts: dict[str, int] = {}
        for sym, num in zip(tokens[::2], tokens[1::2]):
            if sym not in ATOMIC_NUMBER:
                raise FormulaError(f"expected an element, got {sym!r}")
            if not num.isdigit() or int(num) < 1:
                raise FormulaError(f"expected a count after {sym}, got {num!r}")
            if sym in counts:
                raise FormulaError(f"element {sym} appears twice")
            counts[sym] = int(num)
        return Formula.from_counts(counts)

    def length(self, formula: Formula) -> int:
        return 2 * formula.n_elements


CODECS = {"expanded": ExpandedCodec, "compact": CompactCodec}


def get_codec(name: str, **kwargs) -> FormulaCodec:
    try:
        return CODECS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None
