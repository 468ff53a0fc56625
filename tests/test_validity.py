"""SMACT chemical validity (evaluation.validity), checked against hand reasoning, SMACT itself and an
independent brute-force re-implementation of CDVAE's ``smact_validity``."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from concurrent.futures import ProcessPoolExecutor

import pytest

import evaluation.validity as validity
from evaluation.composition import ATOMIC_NUMBER, Formula, parse_formula
from evaluation.validity import PROTOCOLS, ValidityResult, check_formula, check_formulas

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import smact
    from smact.screening import smact_validity


def _el(sym: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smact.Element(sym)


# ------------------------------------------------------------- independent reference (CDVAE's rule)
def cdvae_reference(counts: dict[str, int]) -> tuple[bool, bool, bool]:
    """CDVAE's ``smact_validity`` re-implemented from its source (txie-93/cdvae, scripts/eval_utils.py).

    Elements in atomic-number order (CDVAE's ``get_composition`` sorts atom types), counts divided by
    their gcd, oxidation states from SMACT's 2014 table (the ``oxidation_states`` of the SMACT version
    CDVAE used), the old pairwise Pauling test in which comparing ``None`` raises ``TypeError`` and
    CDVAE counts that as a pass. Returns ``(valid, charge_neutral, pauling_ok)``.
    """
    syms = sorted(counts, key=ATOMIC_NUMBER.__getitem__)
    elems = [_el(s) for s in syms]
    enegs = [e.pauling_eneg for e in elems]
    ox_combos = [e.oxidation_states_smact14 or [] for e in elems]
    g = math.gcd(*counts.values())
    count = [counts[s] // g for s in syms]
    neutral = pauling = False
    for ox_states in itertools.product(*ox_combos):
        if sum(o * c for o, c in zip(ox_states, count)) != 0:
            continue
        neutral = True
        try:
            ok = True
            for (ox1, en1), (ox2, en2) in itertools.combinations(zip(ox_states, enegs), 2):
                if ox1 > 0 and ox2 < 0 and en1 >= en2:
                    ok = False
                    break
                elif ox1 < 0 and ox2 > 0 and en1 <= en2:
                    ok = False
                    break
        except TypeError:  # None compared with a float: "no electronegativity data, assume it is okay"
            ok = True
        if ok:
            pauling = True
            break
    valid = len(syms) == 1 or all(s in smact.metals for s in syms) or pauling
    return valid, neutral, pauling


# ------------------------------------------------------------------------------- known cdvae cases
def test_nacl_valid():
    r = check_formula("NaCl")
    assert isinstance(r, ValidityResult)
    assert r.valid and r.charge_neutral and r.electronegativity_ok
    assert r.reason == "" and r.rule
    assert r.formula == "NaCl"


def test_nacl2_not_charge_neutral():
    # Na has odd states only (+-1), 2 x Cl is even: the sum is odd, never 0
    assert set(_el("Na").oxidation_states_smact14) <= {-1, 1}
    r = check_formula("NaCl2")
    assert not r.valid and not r.charge_neutral and not r.electronegativity_ok
    assert r.reason == "no charge-neutral combination"


@pytest.mark.parametrize("text", ["CuZn", "Fe3Al", "AuCu3", "Ti6Al4V"])
def test_all_metal_alloys_valid(text):
    assert all(s in smact.metals for s in parse_formula(text).elements)
    r = check_formula(text)
    assert r.valid and r.reason == ""
    assert "metal" in r.rule


@pytest.mark.parametrize("text", ["Si", "O2", "Fe", "He", "Na4"])
def test_single_element_valid(text):
    r = check_formula(text)
    assert r.valid and "single" in r.rule


@pytest.mark.parametrize(("text", "noble"), [("XeF2", "Xe"), ("KrF2", "Kr"), ("XeF4", "Xe"), ("XeO3", "Xe")])
def test_noble_gas_compounds(text, noble):
    f = parse_formula(text)
    other, = (s for s in f.elements if s != noble)
    n_noble, n_other = f.as_dict()[noble], f.as_dict()[other]
    el_n, el_o = _el(noble), _el(other)
    # expectation from SMACT's data: some positive state of the noble gas balanced by a negative state
    # of the partner, with the noble gas (cation) less electronegative than the partner (anion)
    expected = any(
        a > 0 > b and a * n_noble + b * n_other == 0 and el_n.pauling_eneg < el_o.pauling_eneg
        for a in el_n.oxidation_states_smact14
        for b in el_o.oxidation_states_smact14
    )
    assert expected  # XeF2: Xe+2 (2.6) / F-1 (3.98); KrF2: Kr+2 (3.0) / F-1; XeO3: Xe+6 / O-2
    r = check_formula(text)
    assert r.valid is expected
    assert r.valid == cdvae_reference(f.as_dict())[0]


@pytest.mark.parametrize("text", ["HeO", "NeF2", "ArCl"])
def test_element_without_oxidation_states(text):
    noble = next(s for s in parse_formula(text).elements if s in ("He", "Ne", "Ar"))
    assert not _el(noble).oxidation_states_smact14
    for protocol in PROTOCOLS:
        r = check_formula(text, protocol)
        assert not r.valid and not r.charge_neutral
        assert "oxidation states" in r.reason and noble in r.reason


def test_pauling_only_failure():
    """H2Cl: 2h + c = 0 with h in {-1, +1} forces c = -+2; Cl has +2 but not -2, so the only
    neutral assignment is H-1 / Cl+2, a cation (Cl, 3.16) more electronegative than the anion
    (H, 2.20): charge neutral but the Pauling test fails."""
    h, cl = _el("H"), _el("Cl")
    neutral = [(a, b) for a in h.oxidation_states_smact14 for b in cl.oxidation_states_smact14 if 2 * a + b == 0]
    assert neutral == [(-1, 2)]
    assert cl.pauling_eneg > h.pauling_eneg
    r = check_formula("H2Cl")
    assert r.charge_neutral and not r.electronegativity_ok and not r.valid
    assert r.reason == "electronegativity order violated"
    assert cdvae_reference({"H": 2, "Cl": 1}) == (False, True, False)


def test_reduced_counts_are_used():
    assert check_formula("Na2Cl2") == check_formula("NaCl")
    assert check_formula(parse_formula("Fe2O3")).valid  # Fe+3 / O-2


def test_unparseable():
    r = check_formula("Xx2O")
    assert not r.valid and r.reason.startswith("unparseable")
    assert "Xx" in r.reason
    assert r.formula == "Xx2O"


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol"):
        check_formulas(["NaCl"], protocol="nope")


def test_none_electronegativity_pair_order_follows_cdvae():
    """Na3PmH (Pm: SMACT has no Pauling electronegativity). 3 na + pm + h = 0 with na, h in {-1, 1},
    pm in {2, 3} has one solution: Na-1, Pm+2, H+1. CDVAE checks pairs in atomic-number order
    (H, Na, Pm): the first pair H+1 / Na-1 already fails (H 2.20 >= Na 0.93) before any pair with Pm
    is compared, so CDVAE calls it invalid. A pair order that reaches (Na, Pm) first would raise
    TypeError instead and count it as a pass."""
    assert _el("Pm").pauling_eneg is None
    assert "Pm" not in smact.metals
    assert cdvae_reference({"Na": 3, "Pm": 1, "H": 1}) == (False, True, False)
    r = check_formula("Na3PmH", "cdvae")
    assert r.charge_neutral
    assert r.valid is False, "cdvae protocol must check Pauling pairs in CDVAE's (atomic-number) order"


# ----------------------------------------------------------------------------- agreement with smact
@pytest.fixture(scope="module")
def mp_sample_3000(mp_reduced_formulas):
    return random.Random(0).sample(mp_reduced_formulas, 3000)


def test_smact_protocol_agrees_with_smact(mp_sample_3000):
    results = check_formulas(mp_sample_3000, "smact")
    assert len(results) == 3000
    disagree = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text, r in zip(mp_sample_3000, results):
            if r.valid != smact_validity(text):
                disagree.append((text, r.valid, r.reason))
    assert not disagree, disagree[:20]
    n_valid = sum(r.valid for r in results)
    assert 0 < n_valid < 3000  # the sample exercises both verdicts


@pytest.mark.parametrize("text", ["NaCl", "NaCl2", "H2Cl", "Fe2O3", "CuZn", "XeF2", "HeO", "LiFePO4", "Si", "ArCl"])
def test_smact_protocol_handpicked(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_formula(text, "smact").valid == smact_validity(text)


def test_cdvae_protocol_matches_bruteforce(mp_reduced_formulas):
    pool = [
        f
        for f in (parse_formula(t) for t in random.Random(1).sample(mp_reduced_formulas, 2500))
        if f.n_elements > 1 and not all(s in smact.metals for s in f.elements)
    ]
    sample = pool[:1500]
    assert len(sample) == 1500
    results = check_formulas(sample, "cdvae")
    disagree = []
    for f, r in zip(sample, results):
        valid, neutral, pauling = cdvae_reference(f.as_dict())
        if (r.valid, r.charge_neutral, r.electronegativity_ok) != (valid, neutral, pauling):
            disagree.append((str(f), (r.valid, r.charge_neutral, r.electronegativity_ok), (valid, neutral, pauling)))
    assert not disagree, disagree[:20]
    assert 0 < sum(r.valid for r in results) < 1500


def test_cdvae_protocol_matches_bruteforce_without_electronegativity(mp_reduced_formulas):
    """Every MP formula holding an element without SMACT electronegativity (He Ne Ar Pm Rn Lr): the
    code takes its brute-force path there, where the CDVAE pair-order semantics matter."""
    no_eneg = {s for s in ATOMIC_NUMBER if _el(s).pauling_eneg is None}
    assert {"He", "Ne", "Ar", "Pm"} <= no_eneg
    formulas = [f for f in map(parse_formula, mp_reduced_formulas) if no_eneg & set(f.elements)]
    assert len(formulas) > 100
    results = check_formulas(formulas, "cdvae")
    disagree = [
        (str(f), r.valid) for f, r in zip(formulas, results) if r.valid != cdvae_reference(f.as_dict())[0]
    ]
    assert not disagree, disagree


def test_cdvae_handmade_multielement_agreement():
    """Small synthetic ternaries over common ions: the cut-search shortcut agrees with brute force."""
    els = ["Li", "Na", "Mg", "Al", "Fe", "Cu", "H", "B", "C", "N", "O", "F", "S", "Cl", "Se", "I"]
    rng = random.Random(7)
    formulas = set()
    while len(formulas) < 400:
        syms = rng.sample(els, rng.choice([2, 3, 4]))
        formulas.add(Formula.from_counts({s: rng.randint(1, 6) for s in syms}))
    formulas = sorted(formulas, key=str)
    for f, r in zip(formulas, check_formulas(formulas, "cdvae")):
        assert (r.valid, r.charge_neutral, r.electronegativity_ok) == cdvae_reference(f.as_dict()), str(f)


# ------------------------------------------------------------------------------------ check_formulas
def test_check_formulas_order_duplicates_and_unparseable():
    inputs = ["KCl", "Xx", "NaCl2", parse_formula("NaCl"), "", "Cl K", "Ca(OH"]
    results = check_formulas(inputs, "cdvae")
    assert len(results) == len(inputs)
    assert [r.formula for r in results] == ["KCl", "Xx", "NaCl2", "NaCl", "", "KCl", "Ca(OH"]
    assert [r.valid for r in results] == [True, False, False, True, False, True, False]
    for i in (1, 4, 6):
        assert results[i].reason.startswith("unparseable")
    assert results[0] == results[5]
    assert check_formulas([], "cdvae") == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_parallel_equals_serial(protocol, monkeypatch):
    els = ["Li", "Na", "K", "Mg", "Ca", "Sr", "Ti", "Fe", "Cu", "Zn", "Pm", "H", "B", "C", "N", "O", "F", "S", "Cl"]
    rng = random.Random(5)
    sample = []
    for _ in range(400):
        syms = rng.sample(els, rng.choice([2, 3, 4]))
        sample.append("".join(f"{s}{rng.randint(1, 5)}" for s in syms))
    sample += ["Xx", "NaCl2", "CuZn"]
    # fresh memo so that both runs really compute (the module memoises results)
    monkeypatch.setattr(validity, "_memo", {})
    serial = check_formulas(sample, protocol, workers=1)

    pools = []

    class CountingPool(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(validity, "_memo", {})
    monkeypatch.setattr(validity, "ProcessPoolExecutor", CountingPool)
    parallel = check_formulas(sample, protocol, workers=2, parallel_threshold=10)
    assert pools == [(2,)], "the process pool was not used"
    assert parallel == serial
    assert len(parallel) == len(sample) and 0 < sum(r.valid for r in parallel) < len(sample)
    assert [r.formula for r in parallel[-3:]] == ["Xx", "NaCl2", "ZnCu"]  # Zn 1.65 < Cu 1.90
