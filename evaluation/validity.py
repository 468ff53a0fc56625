"""SMACT chemical validity: charge neutrality and the Pauling electronegativity test.

Two protocols (``protocol=`` everywhere):

``cdvae``
    The rule of CDVAE's ``smact_validity`` (Xie et al. 2022; used by most crystal-generation
    papers): a single element or an all-metal composition (SMACT's ``metals`` list) is valid;
    otherwise the stoichiometry is reduced by its gcd and some assignment of oxidation states from
    *every* state SMACT lists (``Element.oxidation_states_smact14``, the full table CDVAE's SMACT
    version called ``oxidation_states``) must sum to zero and pass the Pauling test (every cation
    less electronegative than every anion). CDVAE's SMACT raised ``TypeError`` when a cation-anion
    pair involved an element without electronegativity, and CDVAE counted that as a pass; we keep
    that behaviour exactly, order of pair checks included.
``smact``
    Agrees with ``smact.screening.smact_validity`` of the installed SMACT (4.x) at its defaults:
    ICSD24 oxidation states filtered with consensus 3, no zero state; an element without
    electronegativity fails the Pauling test.

Both answer with a :class:`ValidityResult` carrying the flags and, when invalid, a short reason.

Algorithm. Rather than enumerating every oxidation-state combination (exponential in the number of
elements), we use that the Pauling test holds iff some electronegativity cut separates cations
(below) from anions (above). For each cut, each element's states are restricted to the allowed sign
and charge neutrality becomes a subset-sum over ``count * state``, solved with a set of reachable
sums. This is exact and agrees with the brute force (tests check both, and agreement with SMACT on
thousands of real formulas). Compositions with an element lacking electronegativity (Pm, Rn, Lr)
take :func:`_unknown_eneg_search`, exact up to a documented enumeration limit.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from evaluation.composition import ATOMIC_NUMBER, Formula, FormulaError, parse_formula

__all__ = ["PROTOCOLS", "ValidityResult", "check_formula", "check_formulas", "protocols_of", "validate"]

PROTOCOLS = ("cdvae", "smact")


@dataclass(frozen=True, slots=True)
class ValidityResult:
    """Outcome for one formula.

    ``charge_neutral``: some oxidation-state assignment sums to zero (Pauling ignored).
    ``electronegativity_ok``: some charge-neutral assignment also passes the Pauling test.
    ``valid``: the protocol's verdict (also true for single elements and all-metal compositions).
    ``reason``: empty when valid; otherwise why not. ``rule`` names what made it valid.
    """

    formula: str
    valid: bool
    charge_neutral: bool
    electronegativity_ok: bool
    reason: str = ""
    rule: str = ""


@dataclass(frozen=True)
class _Tables:
    states: dict[str, tuple[int, ...]]  # element -> oxidation states (missing: none known)
    eneg: dict[str, float | None]
    metals: frozenset[str]
    none_eneg_passes: bool  # cdvae: a cation-anion pair with unknown eneg raises -> pass


@functools.cache
def _tables(protocol: str) -> _Tables:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import smact
        from smact.utils.oxidation import ICSD24OxStatesFilter

        from evaluation.composition import ELEMENTS

        elements = {}
        for sym in ELEMENTS:
            try:
                elements[sym] = smact.Element(sym)
            except (NameError, KeyError, ValueError):  # pragma: no cover - SMACT knows Z <= 103
                continue
        eneg = {s: e.pauling_eneg for s, e in elements.items()}
        if protocol == "cdvae":
            states = {s: tuple(e.oxidation_states_smact14) for s, e in elements.items() if e.oxidation_states_smact14}
        else:
            table = ICSD24OxStatesFilter().filter(consensus=3, include_zero=False, commonality="low")
            states = {
                str(row["element"]): tuple(int(x) for x in str(row["oxidation_state"]).split())
                for _, row in table.iterrows()
            }
            states = {s: v for s, v in states.items() if v}
        return _Tables(states, eneg, frozenset(smact.metals), none_eneg_passes=(protocol == "cdvae"))


def _neutral_reachable(options: Sequence[Sequence[int]]) -> bool:
    """Is 0 a sum of one value from each option list?"""
    sums = {0}
    for opts in options:
        sums = {s + o for s in sums for o in opts}
        if not sums:
            return False
    return 0 in sums


def _pauling_pairs(ox: Sequence[int], en: Sequence[float | None], none_passes: bool) -> bool:
    """SMACT's pairwise Pauling test, with the unknown-electronegativity semantics of the protocol."""
    for (o1, e1), (o2, e2) in itertools.combinations(zip(ox, en), 2):
        if none_passes:  # old SMACT: None only matters when compared, and then raises -> pass
            if (o1 > 0 and o2 < 0) or (o1 < 0 and o2 > 0):
                if e1 is None or e2 is None:
                    return True
                if (o1 > 0 and e1 >= e2) or (o1 < 0 and e1 <= e2):
                    return False
        else:  # SMACT 4: any unknown electronegativity fails
            if e1 is None or e2 is None or (o1 > 0 and o2 < 0 and e1 >= e2) or (o1 < 0 and o2 > 0 and e1 <= e2):
                return False
    return True


def _brute_force(counts, states, enegs, none_passes) -> tuple[bool, bool]:
    neutral = pauling = False
    for ox in itertools.product(*states):
        if sum(c * o for c, o in zip(counts, ox)) == 0:
            neutral = True
            if _pauling_pairs(ox, enegs, none_passes):
                return True, True
    return neutral, pauling


def _cut_search(counts, states, enegs) -> tuple[bool, bool]:
    """Exact search: some electronegativity cut separates cations (below) from anions (above).

    Elements whose electronegativity is ``None`` are left unconstrained (callers decide what that
    means for their protocol).
    """
    options = [[c * o for o in st] for c, st in zip(counts, states)]
    if not _neutral_reachable(options):
        return False, False
    known = sorted({e for e in enegs if e is not None})
    for cut in [-math.inf, *known]:
        # elements at or below the cut may be cations (or zero), above it anions (or zero)
        restricted = []
        for c, st, e in zip(counts, states, enegs):
            allowed = [c * o for o in st if e is None or (o >= 0 if e <= cut else o <= 0)]
            if not allowed:
                break
            restricted.append(allowed)
        else:
            if _neutral_reachable(restricted):
                return True, True
    return True, False


#: largest number of oxidation-state combinations enumerated for the order-dependent CDVAE case
BRUTE_FORCE_LIMIT = 200_000


def _unknown_eneg_search(counts, states, enegs, none_passes) -> tuple[bool, bool]:
    """Elements without electronegativity present (rare: Pm, Rn, Lr in SMACT's table).

    SMACT 4 fails the Pauling test whenever such an element is present (with two or more
    elements). CDVAE's outcome depends on the order of pair checks (atomic number): we first try
    the cases that decide it cheaply (no neutral combination at all; or a cut over the known
    electronegativities, which passes whatever the unknown ones do), then enumerate the remaining
    combinations in CDVAE's order, up to ``BRUTE_FORCE_LIMIT`` (beyond it: reported as failing).
    """
    neutral, cut_ok = _cut_search(counts, states, enegs)
    if not neutral:
        return False, False
    if not none_passes:
        return True, False
    if cut_ok:
        return True, True
    if math.prod(len(s) for s in states) > BRUTE_FORCE_LIMIT:
        return True, False
    return _brute_force(counts, states, enegs, none_passes)


def _check(formula: Formula, protocol: str) -> ValidityResult:
    t = _tables(protocol)
    syms = formula.elements
    counts = [n for _, n in formula.counts]  # already gcd-reduced
    name = str(formula)
    missing = [s for s in syms if s not in t.states]
    if missing:
        neutral = pauling = False
    else:
        states = [t.states[s] for s in syms]
        enegs = [t.eneg.get(s) for s in syms]
        if any(e is None for e in enegs):
            # the outcome then depends on the order of pair checks: CDVAE's is by atomic number
            order = sorted(range(len(syms)), key=lambda i: ATOMIC_NUMBER[syms[i]])
            neutral, pauling = _unknown_eneg_search([counts[i] for i in order], [states[i] for i in order],
                                                    [enegs[i] for i in order], t.none_eneg_passes)
        else:
            neutral, pauling = _cut_search(counts, states, enegs)
    if len(syms) == 1:
        return ValidityResult(name, True, neutral, pauling, rule="single element")
    if all(s in t.metals for s in syms):
        return ValidityResult(name, True, neutral, pauling, rule="all-metal composition")
    if missing:
        reason = f"element without oxidation states: {', '.join(missing)}"
    elif not neutral:
        reason = "no charge-neutral combination"
    elif not pauling:
        no_en = [s for s in syms if t.eneg.get(s) is None]
        reason = "electronegativity order violated"
        if no_en and not t.none_eneg_passes:
            reason += f" (no electronegativity for {', '.join(no_en)})"
    else:
        return ValidityResult(name, True, True, True, rule="charge-neutral, Pauling test passed")
    return ValidityResult(name, False, neutral, pauling, reason=reason)


def check_formula(formula: Formula | str, protocol: str = "cdvae") -> ValidityResult:
    """Validity of one formula (a :class:`Formula` or any string :func:`parse_formula` reads).

    An unparseable string gives an invalid result whose reason says why; it never raises.
    """
    if isinstance(formula, str):
        try:
            formula = parse_formula(formula)
        except FormulaError as err:
            return ValidityResult(formula, False, False, False, reason=f"unparseable: {err}")
    return check_formulas([formula], protocol)[0]


def _check_chunk(args: tuple[list[Formula], str]) -> list[ValidityResult]:
    chunk, protocol = args
    return [_check(f, protocol) for f in chunk]


def check_formulas(
    formulas: Iterable[Formula | str],
    protocol: str = "cdvae",
    workers: int | None = None,
    parallel_threshold: int = 20_000,
) -> list[ValidityResult]:
    """Validity of many formulas, one result per input, in order.

    Each distinct reduced formula is checked once. With more than ``parallel_threshold`` distinct
    formulas the work is spread over ``workers`` processes (default: all cores).
    """
    _tables(protocol)  # fail fast on a bad protocol
    items = list(formulas)
    parsed: list[Formula | ValidityResult] = []
    for item in items:
        if isinstance(item, str):
            try:
                item = parse_formula(item)
            except FormulaError as err:
                item = ValidityResult(item, False, False, False, reason=f"unparseable: {err}")
        parsed.append(item)
    unique = list(dict.fromkeys(f for f in parsed if isinstance(f, Formula)))
    todo = [f for f in unique if (f, protocol) not in _memo]
    workers = workers or os.cpu_count() or 1
    if len(todo) > parallel_threshold and workers > 1:
        size = math.ceil(len(todo) / (workers * 4))
        chunks = [(todo[i : i + size], protocol) for i in range(0, len(todo), size)]
        with ProcessPoolExecutor(workers) as pool:
            results = [r for part in pool.map(_check_chunk, chunks) for r in part]
    else:
        results = [_check(f, protocol) for f in todo]
    for f, r in zip(todo, results):
        _memo[(f, protocol)] = r
    return [_memo[(f, protocol)] if isinstance(f, Formula) else f for f in parsed]


_memo: dict[tuple[Formula, str], ValidityResult] = {}


def protocols_of(choice: str | Sequence[str]) -> tuple[str, ...]:
    """``"both"`` -> ``("cdvae", "smact")``; a protocol name -> itself; a sequence of names -> a tuple."""
    names = PROTOCOLS if choice == "both" else (choice,) if isinstance(choice, str) else tuple(choice)
    for name in names:
        _tables(name)  # a clear error on an unknown name
    return names


def validate(formulas: Sequence[str], protocol: str | Sequence[str] = "both", workers: int | None = None,
             errors: Sequence[str | None] | None = None):
    """The validity of every formula, with the reason for each failure, as a ``pandas.DataFrame``.

    One row per input, in order: ``input``, ``reduced_formula`` (empty when unparseable), ``parse_error``,
    then per protocol ``valid_<p>``, ``charge_neutral_<p>``, ``electronegativity_ok_<p>``, ``reason_<p>``.
    ``protocol`` is ``"cdvae"``, ``"smact"``, ``"both"`` or a list. ``errors[i]``, when given and not empty,
    marks input ``i`` as failed before parsing (e.g. a malformed file row) with that reason.

    >>> from evaluation import validate
    >>> table = validate(["NaCl", "NaCl2", "Xx"], protocol="cdvae")
    >>> table["valid_cdvae"].tolist()
    [True, False, False]
    >>> table.loc[1, "reason_cdvae"]
    'no charge-neutral combination'
    """
    import pandas as pd

    from evaluation.composition import try_parse_formula

    protocols = protocols_of(protocol)
    texts = list(formulas)
    errors = list(errors) if errors is not None else [None] * len(texts)
    if len(errors) != len(texts):
        raise ValueError(f"{len(errors)} errors for {len(texts)} formulas")
    parsed: list[tuple[Formula | None, str]] = []
    for text, err in zip(texts, errors):
        if err:
            parsed.append((None, err))
        else:
            parsed.append(try_parse_formula(text) if text.strip() else (None, "empty"))
    ok = [f for f, _ in parsed if f is not None]
    verdicts = {p: iter(check_formulas(ok, p, workers=workers)) for p in protocols}
    columns = ["input", "reduced_formula", "parse_error"]
    for p in protocols:
        columns += [f"valid_{p}", f"charge_neutral_{p}", f"electronegativity_ok_{p}", f"reason_{p}"]
    rows = []
    for text, (f, err) in zip(texts, parsed):
        row = [text, str(f) if f else "", err]
        for p in protocols:
            if f is None:
                row += [False, False, False, f"unparseable: {err}"]
            else:
                r = next(verdicts[p])
                row += [r.valid, r.charge_neutral, r.electronegativity_ok, r.reason]
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
