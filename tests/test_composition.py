"""Formula parsing and the canonical form (evaluation.composition)."""

from __future__ import annotations

import math
import re
import warnings

import pytest

from evaluation.composition import (
    ELEMENTS,
    Formula,
    FormulaError,
    element_sort_key,
    parse_formula,
    try_parse_formula,
)


# ----------------------------------------------------------------------------------- accepted input
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SrTiO3", {"Sr": 1, "Ti": 1, "O": 3}),
        ("Ba(PRh)2", {"Ba": 1, "P": 2, "Rh": 2}),
        ("Ti1 O2", {"Ti": 1, "O": 2}),
        ("  TiO2  ", {"Ti": 1, "O": 2}),
        # 0.2222 * 9 = 1.9998 ~ 2 and 0.5556 * 9 = 5.0004 ~ 5; no smaller multiplier works
        ("O0.5556Pr0.2222Pt0.2222", {"Pr": 2, "Pt": 2, "O": 5}),
        ("Na0.5Cl0.5", {"Na": 1, "Cl": 1}),
        ("Fe0.5O", {"Fe": 1, "O": 2}),
        ("Sr Ti O O O", {"Sr": 1, "Ti": 1, "O": 3}),
        ("O O Ti", {"Ti": 1, "O": 2}),
        # K4 [Fe (CN)6]: 4 K, 1 Fe, 6 C, 6 N
        ("K4(Fe(CN)6)", {"K": 4, "Fe": 1, "C": 6, "N": 6}),
        ("K4[Fe(CN)6]", {"K": 4, "Fe": 1, "C": 6, "N": 6}),
        ("(Fe(CN)6)2K8", {"K": 4, "Fe": 1, "C": 6, "N": 6}),
        ("Ca[OH]2", {"Ca": 1, "O": 2, "H": 2}),
        ("Ca{OH}2", {"Ca": 1, "O": 2, "H": 2}),
        ("Mg3(PO4)2", {"Mg": 3, "P": 2, "O": 8}),
        ("(NH4)2SO4", {"N": 2, "H": 8, "S": 1, "O": 4}),
        ("NaClNa", {"Na": 2, "Cl": 1}),  # a repeated element is summed
        ("Na2Cl2", {"Na": 1, "Cl": 1}),  # gcd reduction
        ("Fe4O6", {"Fe": 2, "O": 3}),
        ("H2", {"H": 1}),
        ("Si", {"Si": 1}),
        ("Lr2O3", {"Lr": 2, "O": 3}),  # Z = 103, the last accepted element
    ],
)
def test_parse_counts(text, expected):
    f = parse_formula(text)
    assert f.as_dict() == expected
    assert f.n_elements == len(expected)
    assert f.n_atoms == sum(expected.values())
    assert set(f.elements) == set(expected)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("SrTiO3", "SrTiO3"),
        ("O3TiSr", "SrTiO3"),  # Sr 0.95 < Ti 1.54 < O 3.44
        ("O O O Ti Sr", "SrTiO3"),
        ("Na2Cl2", "NaCl"),
        ("ClNa", "NaCl"),
        ("OH2", "H2O"),  # H 2.20 < O 3.44
        ("K4(Fe(CN)6)", "K4FeC6N6"),  # K 0.82 < Fe 1.83 < C 2.55 < N 3.04
        ("Ba(PRh)2", "BaP2Rh2"),  # Ba 0.89 < P 2.19 < Rh 2.28
        ("O0.5556Pr0.2222Pt0.2222", "Pr2Pt2O5"),  # Pr 1.13 < Pt 2.28 < O 3.44
        ("Ca(OH)2", "CaH2O2"),
        ("HeNa", "NaHe"),  # no electronegativity: last
        ("ArHeNe", "HeNeAr"),  # all unknown: by atomic number
        ("SeC", "CSe"),  # tie at 2.55: by atomic number (C 6 < Se 34)
        ("RbK", "KRb"),  # tie at 0.82
        ("PtRh", "RhPt"),  # tie at 2.28
    ],
)
def test_canonical_string(text, canonical):
    assert str(parse_formula(text)) == canonical


def test_canonical_form_is_a_fixed_point():
    for text in ("SrTiO3", "K4(Fe(CN)6)", "O0.5556Pr0.2222Pt0.2222", "Sr Ti O O O", "ArHeNe"):
        f = parse_formula(text)
        assert parse_formula(str(f)) == f
        assert Formula.from_counts(f.as_dict()) == f


def test_element_order_follows_pymatgen_electronegativity():
    from pymatgen.core.periodic_table import Element

    def x(sym):
        v = float(Element(sym).X)
        return math.inf if math.isnan(v) else v

    expected = sorted(ELEMENTS, key=lambda s: (x(s), Element(s).Z))
    assert sorted(ELEMENTS, key=element_sort_key) == expected
    f = Formula.from_counts({s: 1 for s in ELEMENTS})
    assert list(f.elements) == expected


def test_from_counts_reduces_and_orders():
    f = Formula.from_counts({"O": 6, "Fe": 4})
    assert f.counts == (("Fe", 2), ("O", 3))
    assert Formula.from_counts([("O", 2), ("Fe", 2), ("O", 4)]).counts == (("Fe", 1), ("O", 3))
    with pytest.raises(FormulaError, match="unknown element"):
        Formula.from_counts({"Xx": 1})
    with pytest.raises(FormulaError, match="positive integer"):
        Formula.from_counts({"Na": 0})
    with pytest.raises(FormulaError, match="positive integer"):
        Formula.from_counts({"Na": 1.5})
    with pytest.raises(FormulaError, match="empty"):
        Formula.from_counts({})


def test_formula_is_hashable_and_comparable():
    assert parse_formula("NaCl") == parse_formula("Cl Na")
    assert len({parse_formula("NaCl"), parse_formula("Na2Cl2"), parse_formula("KCl")}) == 2


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Xx2O", r"unknown element 'Xx'"),
        ("NaXy", r"unknown element 'Xy'"),
        ("Rf", r"unknown element 'Rf'"),  # Z = 104 is out of range
        ("D2O", r"unknown element 'D'"),
        ("Ca(OH2", r"unclosed '\('"),
        ("Ca[OH2", r"unclosed '\['"),
        ("CaOH)2", r"unbalanced '\)'"),
        ("Ca(OH]2", r"unbalanced '\]'"),
        ("", r"empty formula"),
        ("   ", r"empty formula"),
        ("()", r"no elements"),
        ("Na0Cl", r"count must be positive"),
        ("Na0.0Cl", r"count must be positive"),
        ("2NaCl", r"does not follow"),
        ("Na2 3Cl", r"does not follow"),
        ("nacl", r"unexpected character"),
        ("NaCl-", r"unexpected character '-'"),
        ("Fe0.001O", r"fractional counts"),  # needs a multiplier of 1000
        ("Bi0.002Te0.003Pb0.999Se0.999", r"fractional counts"),
        ("Na0.004Cl", r"fractional counts"),  # 0.004 * 100 rounds to 0
    ],
)
def test_parse_errors_carry_a_reason(text, reason):
    with pytest.raises(FormulaError, match=reason):
        parse_formula(text)
    f, err = try_parse_formula(text)
    assert f is None
    assert re.search(reason, err)


def test_formula_error_is_a_value_error_and_non_strings_are_rejected():
    assert issubclass(FormulaError, ValueError)
    with pytest.raises(FormulaError, match="not a string"):
        parse_formula(None)  # type: ignore[arg-type]
    with pytest.raises(FormulaError):
        parse_formula(12)  # type: ignore[arg-type]


def test_try_parse_success():
    f, err = try_parse_formula("Na2Cl2")
    assert err == ""
    assert str(f) == "NaCl"


def test_tolerance_and_max_denominator_are_honoured():
    # 1/3 and 2/3 need a multiplier of 3
    assert parse_formula("Fe0.3333O0.6667").as_dict() == {"Fe": 1, "O": 2}
    with pytest.raises(FormulaError):
        parse_formula("Fe0.3333O0.6667", max_denominator=2)
    # 0.98 is 0.02 away from 1: rejected at the default tolerance, accepted at 0.05
    with pytest.raises(FormulaError):
        parse_formula("Na0.98Cl", max_denominator=1)
    assert parse_formula("Na0.98Cl", tol=0.05, max_denominator=1).as_dict() == {"Na": 1, "Cl": 1}


# ------------------------------------------------------------------------- cross-check vs pymatgen
def _pymatgen_reduced(text: str) -> dict[str, int]:
    from pymatgen.core import Composition

    counts = {str(el): int(n) for el, n in Composition(text).reduced_composition.items()}
    # pymatgen keeps some diatomics / peroxides unreduced (H2, O2, Li2O2, ...): divide by the gcd
    g = math.gcd(*counts.values())
    return {el: n // g for el, n in counts.items()}


@pytest.mark.parametrize("text", ["K4(Fe(CN)6)", "Ba(PRh)2", "Ca[OH]2", "Mg3(PO4)2", "Sr Ti O O O"])
def test_matches_pymatgen_on_handpicked(text):
    assert parse_formula(text).as_dict() == _pymatgen_reduced(text)


def test_matches_pymatgen_on_every_mp_formula(mp_reduced_formulas):
    """Every distinct reduced formula of the Materials Project table parses like pymatgen reads it."""
    from pymatgen.core import Composition

    assert len(mp_reduced_formulas) > 80_000
    mismatches = []
    order_mismatches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in mp_reduced_formulas:
            f = parse_formula(text)
            if f.as_dict() != _pymatgen_reduced(text):
                mismatches.append(text)
                continue
            # idempotent canonical form
            if parse_formula(str(f)) != f:
                mismatches.append(f"{text} (not a fixed point)")
            # where pymatgen's order is unambiguous (all electronegativities known and distinct), the
            # element order must be the one of pymatgen's Composition.formula
            xs = [element_sort_key(s)[0] for s in f.elements]
            if math.inf not in xs and len(set(xs)) == len(xs):
                order = re.findall(r"[A-Z][a-z]?", Composition(text).formula)
                if order != list(f.elements):
                    order_mismatches.append(text)
    assert not mismatches, mismatches[:20]
    assert not order_mismatches, order_mismatches[:20]
