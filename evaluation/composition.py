"""Chemical formulas: parse anything a user or a corpus may hold, normalise to one canonical form.

This module is the bottom of the package stack: `evaluation`, `composition_lm` and `structure` all
read formulas through it (the dependency rules forbid `evaluation` and `structure` from importing
`composition_lm`, so parsing lives here and `composition_lm.formula` builds the sequence codecs on
top of it).

Canonical form
--------------
A :class:`Formula` is a *reduced* integer composition (counts divided by their gcd) with elements in
ascending Pauling electronegativity, as pymatgen orders them (`Composition.formula`), ties broken by
atomic number; elements without an electronegativity (He, Ne, Ar) go last. Only elements with
Z <= 103 are accepted. ``str(Formula)`` writes it compactly, e.g. ``SrTiO3``.

Accepted inputs
---------------
``SrTiO3``, ``Ba(PRh)2``, ``Ca[OH]2``, ``Ti1 O2``, the expanded form ``Sr Ti O O O``, and fractional
formulas such as ``O0.5556Pr0.2222Pt0.2222``: the smallest integer multiplier (up to
``max_denominator``) that brings every count within ``tol`` of an integer is used, else the formula
is rejected with a reason.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

__all__ = [
    "ELEMENTS",
    "Formula",
    "FormulaError",
    "electronegativity",
    "element_sort_key",
    "parse_formula",
    "try_parse_formula",
]

#: Element symbols Z = 1 .. 103 (H .. Lr), index = Z - 1.
ELEMENTS: tuple[str, ...] = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br "
    "Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho "
    "Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es "
    "Fm Md No Lr"
).split()
ATOMIC_NUMBER: dict[str, int] = {sym: z for z, sym in enumerate(ELEMENTS, start=1)}


class FormulaError(ValueError):
    """A formula that cannot be parsed; ``str(err)`` is a short human-readable reason."""


@functools.cache
def _electronegativities() -> dict[str, float]:
    # pymatgen's Pauling electronegativities (NaN where unknown); read once, lazily.
    import warnings

    from pymatgen.core.periodic_table import Element

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {sym: float(Element(sym).X) for sym in ELEMENTS}


def electronegativity(symbol: str) -> float:
    """Pauling electronegativity of ``symbol`` as pymatgen gives it (NaN if unknown)."""
    return _electronegativities()[symbol]


def element_sort_key(symbol: str) -> tuple[float, int]:
    """Sort key of the canonical element order: (electronegativity, Z), unknown X last."""
    x = _electronegativities()[symbol]
    return (math.inf if math.isnan(x) else x, ATOMIC_NUMBER[symbol])


@dataclass(frozen=True, slots=True)
class Formula:
    """A reduced integer composition in canonical element order.

    ``counts`` is a tuple of ``(symbol, count)`` pairs; build one with :func:`parse_formula` or
    :meth:`from_counts`, which reduce and order for you.
    """

    counts: tuple[tuple[str, int], ...]

    @classmethod
    def from_counts(cls, counts: dict[str, int | float] | list[tuple[str, int]]) -> Formula:
        items = counts.items() if isinstance(counts, dict) else counts
        merged: dict[str, int] = {}
        for sym, n in items:
            if sym not in ATOMIC_NUMBER:
                raise FormulaError(f"unknown element {sym!r}")
            if n != int(n) or n <= 0:
                raise FormulaError(f"count of {sym} must be a positive integer, got {n}")
            merged[sym] = merged.get(sym, 0) + int(n)
        if not merged:
            raise FormulaError("empty formula")
        g = math.gcd(*merged.values())
        ordered = sorted(merged, key=element_sort_key)
        return cls(tuple((sym, merged[sym] // g) for sym in ordered))

    @property
    def elements(self) -> tuple[str, ...]:
        return tuple(sym for sym, _ in self.counts)

    @property
    def n_elements(self) -> int:
        return len(self.counts)

    @property
    def n_atoms(self) -> int:
        """Atoms in the reduced formula."""
        return sum(n for _, n in self.counts)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __str__(self) -> str:
        return "".join(sym if n == 1 else f"{sym}{n}" for sym, n in self.counts)


_TOKEN = re.compile(r"\s*(?:([A-Z][a-z]?)|(\d+(?:\.\d*)?|\.\d+)|([(\[{])|([)\]}]))")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _parse_counts(text: str) -> dict[str, float]:
    """Recursive-descent parse into (possibly fractional) element counts."""
    stack: list[tuple[dict[str, float], str]] = [({}, "")]
    pos, last = 0, None  # last: what a following number multiplies ("el", sym) or ("group", dict)
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:].lstrip()
            raise FormulaError(f"unexpected character {rest[:1]!r} at position {len(text) - len(rest)}")
        pos = m.end()
        sym, num, opening, closing = m.groups()
        counts = stack[-1][0]
        if sym is not None:
            if sym not in ATOMIC_NUMBER:
                raise FormulaError(f"unknown element {sym!r}")
            counts[sym] = counts.get(sym, 0.0) + 1.0
            last = ("el", sym)
        elif num is not None:
            value = float(num)
            if last is None:
                raise FormulaError(f"number {num} does not follow an element or group")
            if value <= 0:
                raise FormulaError(f"count must be positive, got {num}")
            kind, target = last
            if kind == "el":
                counts[target] += value - 1.0
            else:  # a closed group: scale what it added
                for s, n in target.items():
                    counts[s] = counts.get(s, 0.0) + n * (value - 1.0)
            last = None
        elif opening is not None:
            stack.append(({}, opening))
            last = None
        else:
            if len(stack) == 1 or _CLOSE[stack[-1][1]] != closing:
                raise FormulaError(f"unbalanced {closing!r}")
            group, _ = stack.pop()
            outer = stack[-1][0]
            for s, n in group.items():
                outer[s] = outer.get(s, 0.0) + n
            last = ("group", group)
    if len(stack) != 1:
        raise FormulaError(f"unclosed {stack[-1][1]!r}")
    return stack[0][0]


def _to_integers(counts: dict[str, float], tol: float, max_denominator: int) -> dict[str, int]:
    values = list(counts.values())
    if all(abs(v - round(v)) < 1e-9 for v in values):
        return {s: int(round(v)) for s, v in counts.items()}
    for mult in range(1, max_denominator + 1):
        scaled = [v * mult for v in values]
        if all(abs(x - round(x)) <= tol and round(x) >= 1 for x in scaled):
            return {s: int(round(v * mult)) for s, v in counts.items()}
    raise FormulaError(
        f"fractional counts are not a small-integer ratio (tolerance {tol}, multipliers up to {max_denominator})"
    )


@functools.lru_cache(maxsize=1 << 18)
def parse_formula(text: str, tol: float = 0.01, max_denominator: int = 100) -> Formula:
    """Parse ``text`` into a reduced, canonically ordered :class:`Formula`.

    Raises :class:`FormulaError` with a short reason on anything it cannot read.
    """
    if not isinstance(text, str):
        raise FormulaError(f"not a string: {text!r}")
    if not text.strip():
        raise FormulaError("empty formula")
    counts = _parse_counts(text)
    if not counts:
        raise FormulaError("no elements")
    return Formula.from_counts(_to_integers(counts, tol, max_denominator))


def try_parse_formula(text: str) -> tuple[Formula | None, str]:
    """``(formula, "")`` on success, ``(None, reason)`` on failure; never raises."""
    try:
        return parse_formula(text), ""
    except FormulaError as err:
        return None, str(err)
