"""Formula-set metrics (evaluation.metrics) on tiny sets with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.composition import ELEMENTS, parse_formula
from evaluation.metrics import element_frequencies, formula_set_metrics, js_divergence, wasserstein_1d

SAMPLES = ["NaCl", "NaCl", "KCl", "Xx", "NaCl2"]
TRAIN = ["NaCl"]
HELDOUT = {"h": ["KCl", "LiF", "NaCl"]}


@pytest.fixture(scope="module")
def metrics():
    return formula_set_metrics(SAMPLES, TRAIN, HELDOUT)


def test_counts(metrics):
    assert metrics["n_samples"] == 5
    assert metrics["n_parsed"] == 4  # "Xx" does not parse
    assert metrics["parse_rate"] == pytest.approx(4 / 5)
    assert metrics["n_unique"] == 3  # NaCl, KCl, NaCl2
    assert metrics["uniqueness"] == pytest.approx(3 / 5)


def test_novelty(metrics):
    assert metrics["n_train_formulas"] == 1
    assert metrics["n_novel_unique"] == 2  # KCl, NaCl2
    assert metrics["novelty"] == pytest.approx(2 / 3)


def test_recovery(metrics):
    # held-out formulas not in training: KCl, LiF; generated: KCl
    rec = metrics["recovery"]["h"]
    assert rec["n_heldout_not_in_train"] == 2
    assert rec["n_recovered"] == 1
    assert rec["recovery"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("protocol", ["cdvae", "smact"])
def test_validity(metrics, protocol):
    # valid samples: NaCl, NaCl, KCl (NaCl2 is not charge neutral, Xx does not parse)
    v = metrics["validity"][protocol]
    assert v["raw"] == pytest.approx(3 / 5)
    assert v["unique"] == pytest.approx(2 / 3)
    assert metrics["valid_novel_unique"][protocol] == 1  # KCl


def test_no_train_no_heldout():
    m = formula_set_metrics(["NaCl", "KCl"], protocols=("cdvae",))
    assert "novelty" not in m and "recovery" not in m
    assert set(m["validity"]) == {"cdvae"}
    assert m["validity"]["cdvae"]["raw"] == 1.0
    assert m["histograms"]["n_elements"]["generated"] == {"2": 1.0}


def test_empty_and_all_bad_samples():
    m = formula_set_metrics([], ["NaCl"], protocols=("cdvae",))
    assert m["n_samples"] == 0 and m["uniqueness"] == 0.0 and m["novelty"] == 0.0
    m = formula_set_metrics(["Xx", ""], ["NaCl"], protocols=("cdvae",))
    assert m["n_parsed"] == 0 and m["parse_rate"] == 0.0
    assert m["validity"]["cdvae"] == {"raw": 0.0, "unique": 0.0}


def test_everything_novel_with_empty_train():
    m = formula_set_metrics(["NaCl", "KCl"], [], {"h": ["NaCl", "LiF"]}, protocols=("cdvae",))
    assert m["novelty"] == 1.0
    assert m["recovery"]["h"]["recovery"] == pytest.approx(1 / 2)


def test_spellings_are_canonicalised():
    m = formula_set_metrics(["Na2Cl2", "Cl Na", "NaCl"], ["ClNa"], protocols=("cdvae",))
    assert m["n_unique"] == 1 and m["novelty"] == 0.0


# ---------------------------------------------------------------------------------- distributions
def test_js_divergence_bounds():
    p = np.array([0.2, 0.3, 0.5, 0.0])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(p, 3 * p) == pytest.approx(0.0, abs=1e-12)  # normalised first
    assert js_divergence([1, 0, 0], [0, 1, 1]) == pytest.approx(1.0)
    # two coins: p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    # JS = 1/2 log2(4/3) + 1/2 (1/2 log2(2/3) + 1/2 log2 2)
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(js_divergence([0.5, 0.5], [1, 0]))


def test_wasserstein():
    assert wasserstein_1d([2, 2], [3, 3]) == pytest.approx(1.0)
    assert wasserstein_1d([1, 2, 3], [1, 2, 3]) == pytest.approx(0.0)
    assert wasserstein_1d([0], [1, 3]) == pytest.approx(2.0)  # |0-1| / 2 + |0-3| / 2
    assert math.isnan(wasserstein_1d([], [1]))


def test_element_frequencies():
    freqs = element_frequencies([parse_formula("NaCl"), parse_formula("KCl")])
    assert freqs.shape == (len(ELEMENTS),)
    assert freqs.sum() == pytest.approx(1.0)
    idx = {s: ELEMENTS.index(s) for s in ("Na", "K", "Cl")}
    assert freqs[idx["Cl"]] == pytest.approx(0.5)
    assert freqs[idx["Na"]] == pytest.approx(0.25) and freqs[idx["K"]] == pytest.approx(0.25)
    assert element_frequencies([]).sum() == 0


def test_distribution_identical_reference():
    samples = ["NaCl", "KBr", "SrTiO3", "Fe2O3"]
    m = formula_set_metrics(samples, reference=list(reversed(samples)), protocols=("cdvae",))
    d = m["distribution"]
    assert d["n_reference"] == 4
    assert d["element_js"] == pytest.approx(0.0, abs=1e-12)
    assert d["n_elements_wasserstein"] == pytest.approx(0.0)
    assert d["n_atoms_wasserstein"] == pytest.approx(0.0)


def test_distribution_hand_computed():
    # generated: NaCl, KCl -> Cl 2/4, Na 1/4, K 1/4; 2 elements, 2 atoms each
    # reference: CaF2, MgCl2 -> Ca, F, Mg, Cl 1/4 each; 2 elements, 3 atoms each
    m = formula_set_metrics(["NaCl", "KCl"], reference=["CaF2", "MgCl2"], protocols=("cdvae",))
    d = m["distribution"]
    # m = (Cl 3/8, Na K Ca F Mg 1/8 each)
    kl_p = 0.5 * math.log2(0.5 / 0.375) + 2 * 0.25 * math.log2(0.25 / 0.125)
    kl_q = 0.25 * math.log2(0.25 / 0.375) + 3 * 0.25 * math.log2(0.25 / 0.125)
    assert d["element_js"] == pytest.approx(0.5 * kl_p + 0.5 * kl_q)
    from scipy.spatial.distance import jensenshannon

    p = element_frequencies([parse_formula("NaCl"), parse_formula("KCl")])
    q = element_frequencies([parse_formula("CaF2"), parse_formula("MgCl2")])
    assert d["element_js"] == pytest.approx(jensenshannon(p, q, base=2) ** 2)
    assert d["n_elements_wasserstein"] == pytest.approx(0.0)
    assert d["n_atoms_wasserstein"] == pytest.approx(1.0)
    h = m["histograms"]
    assert h["n_atoms"] == {"generated": {"2": 1.0}, "reference": {"3": 1.0}}
    assert h["element_frequency"]["generated"]["Cl"] == pytest.approx(0.5)
    assert h["element_frequency"]["reference"]["F"] == pytest.approx(0.25)


def test_distribution_disjoint_elements_and_duplicates():
    # duplicates in the samples count (generator distribution), the reference is deduplicated
    m = formula_set_metrics(["NaCl", "NaCl", "KCl"], reference=["LiF", "LiF", "MgO"], protocols=("cdvae",))
    d = m["distribution"]
    assert d["n_reference"] == 2
    assert d["element_js"] == pytest.approx(1.0)
    assert m["histograms"]["n_elements"]["generated"] == {"2": 1.0}
