"""Property conditioning of Diffusion-BERT (issue 18): targets, bins, a tiny conditional model on a
synthetic corpus whose property is a known function of the formula, guidance, save/load, errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from composition_lm.cli import main as cli
from composition_lm.conditions import PropertyBins, Target, condition_ids, corpus_properties, parse_target
from composition_lm.generator import FormulaGenerator
from composition_lm.training import TrainingArguments, train
from evaluation.composition import parse_formula

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ targets, bins
def test_parse_target_reads_windows_and_rejects_nonsense():
    assert parse_target("band_gap=1.0:3.0") == Target("band_gap", 1.0, 3.0)
    assert parse_target("e_above_hull=:0.05") == Target("e_above_hull", -math.inf, 0.05)
    assert parse_target("band_gap=3:") == Target("band_gap", 3.0, math.inf)
    assert str(parse_target("e_above_hull=:0.05")) == "e_above_hull=:0.05"
    for bad in ("band_gap", "band_gap=1", "=1:2", "band_gap=a:2", "band_gap=:", "band_gap=3:1"):
        with pytest.raises(ValueError, match="target"):
            parse_target(bad)


def test_bins_hold_equal_shares_and_answer_windows():
    values = np.linspace(0, 8, 801)
    bins = PropertyBins.from_values("gap", values, n_bins=4)
    assert bins.n_bins == 4 and bins.edges == pytest.approx((2.0, 4.0, 6.0))
    assert bins.bin_of([0.5, 2.0, 7.9, float("nan")]).tolist() == [1, 2, 4, 0]
    assert bins.window_bins(Target("gap", 2.0, 6.0)) == [2, 3]  # bins lying inside the window
    assert bins.window_bins(Target("gap", 2.5, 3.0)) == [2]  # narrower than a bin: the one it overlaps
    assert bins.window_bins(Target("gap", 6.0, math.inf)) == [4]
    metals = PropertyBins.from_values("gap", [0.0] * 60 + list(np.linspace(0.1, 5, 40)), n_bins=8)
    assert metals.n_bins == 8 and metals.bin_of([0.0, 1e-9]).tolist() == [1, 2]  # the point mass alone
    assert metals.window_bins(Target("gap", -math.inf, 0.0)) == [1]
    assert len(set(metals.bin_of(np.linspace(0.1, 5, 40)).tolist())) == 7  # the rest split evenly
    ids = condition_ids([bins, metals], [Target("gap", 2.0, 6.0)], 1000, torch.Generator().manual_seed(0))
    assert set(ids[:, 0].tolist()) == {2, 3} and (ids[:, 1] == 0).all()
    with pytest.raises(ValueError, match="not conditioned on 'gapp'"):
        condition_ids([bins], [Target("gapp", 1, 2)], 4, torch.Generator())


def test_a_window_is_asked_for_as_the_training_data_fill_it():
    """A point-mass bin (E_hull = 0 for 46 % of MP) is drawn with its training share within a window, not as
    one bin among equals; shares survive as_dict -> config -> property_bins."""
    from composition_lm.config import FormulaBertConfig

    values = [0.0] * 500 + list(np.linspace(0.001, 0.3, 500))
    bins = PropertyBins.from_values("e_above_hull", values, n_bins=6)
    assert bins.shares[0] == pytest.approx(0.5) and sum(bins.shares) == pytest.approx(1.0)
    window = Target("e_above_hull", -math.inf, bins.edges[2])  # the point mass and the next two bins
    assert bins.window_bins(window) == [1, 2, 3]
    ids = condition_ids([bins], [window], 20000, torch.Generator().manual_seed(0))[:, 0]
    assert (ids == 1).float().mean().item() == pytest.approx(0.5 / (0.5 + 0.1 + 0.1), abs=0.02)
    cfg = FormulaBertConfig(property_conditions=[bins.as_dict()])
    assert cfg.property_bins() == [bins]
    legacy = PropertyBins("e_above_hull", bins.edges)  # a model saved before shares: equal weights
    ids = condition_ids([legacy], [window], 20000, torch.Generator().manual_seed(0))[:, 0]
    assert (ids == 1).float().mean().item() == pytest.approx(1 / 3, abs=0.02)


def test_corpus_properties_take_the_ground_state_and_name_missing_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("formula,gap,e_above_hull,split\nTiO2,1.8,0.05,train\nTi2O4,3.0,0.0,train\nNaCl,5,0,val\n")
    assert corpus_properties(str(path), ["gap"], split="train") == {"TiO2": {"gap": 3.0}}
    with pytest.raises(ValueError, match="no numeric column band_gap; numeric columns: gap, e_above_hull"):
        corpus_properties(str(path), ["band_gap"])


# ------------------------------------------------------------------- a tiny conditional model
def _oxygen_fraction(formula: str) -> float:
    f = parse_formula(formula)
    return dict(f.counts).get("O", 0) / f.n_atoms


def _train_tiny(tmp_path_factory, mp_reduced_formulas, name: str, **kw) -> FormulaGenerator:
    """A tiny model (2 layers, width 48, 400 steps) conditioned on the oxygen fraction of 4,000 MP formulas
    (a known function of the formula); ``kw``: the model family and encoding options."""
    formulas = [f for f in random.Random(0).sample(mp_reduced_formulas, 4000) if parse_formula(f).n_atoms <= 10]
    out = tmp_path_factory.mktemp(name)
    corpus = out / "corpus.csv"
    corpus.write_text("formula,o_fraction\n" + "".join(f"{f},{_oxygen_fraction(f)}\n" for f in formulas))
    export = train(TrainingArguments(output_dir=str(out / "run"), corpus=str(corpus), train_split=None,
                                     val_split=None, seq_length=12, hidden_size=48, num_layers=2, num_heads=2,
                                     intermediate_size=96, batch_size=64, warmup_steps=20, lr=3e-3, max_steps=400,
                                     eval_every=0, save_every=0, log_every=100, progress=False, dropout=0.0,
                                     ema_decay=0.95, condition_on="o_fraction", **kw))
    return FormulaGenerator.from_pretrained(export)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, mp_reduced_formulas):
    """A tiny Diffusion-BERT, 4 bins."""
    return _train_tiny(tmp_path_factory, mp_reduced_formulas, "conditional", condition_bins=4)


def _hit_rate(table, lo: float) -> float:
    return float(np.mean([_oxygen_fraction(f) >= lo for f in table["formula"] if f]))


def test_asking_for_oxygen_moves_the_hit_rate(conditional):
    bins = conditional.loaded.model.config.property_bins()
    assert [b.name for b in bins] == ["o_fraction"] and bins[0].n_bins >= 3  # kept through save/load
    high = bins[0].edges[-1]
    plain = conditional.generate(300, seed=0, validity="none")
    asked = conditional.generate(300, seed=0, validity="none", targets=f"o_fraction={high}:")
    assert _hit_rate(asked, high) > _hit_rate(plain, high) + 0.15, (_hit_rate(asked, high), _hit_rate(plain, high))
    none = conditional.generate(300, seed=0, validity="none", targets="o_fraction=:0.0")
    assert _hit_rate(none, 1e-9) < _hit_rate(plain, 1e-9)  # and for no oxygen at all
    assert asked.attrs["sampling"]["targets"] == [f"o_fraction={high:g}:"]


def test_guidance_one_is_plain_conditional_and_guidance_sharpens(conditional):
    a = conditional.generate(60, seed=1, validity="none", targets="o_fraction=0.5:")
    b = conditional.generate(60, seed=1, validity="none", targets="o_fraction=0.5:", guidance=1.0)
    assert a["sample"].tolist() == b["sample"].tolist()
    valid = conditional.generate(60, seed=1, targets="o_fraction=0.5:", guidance=2.0)  # with validity on
    assert valid["valid_cdvae"].all()


def test_condition_errors_are_clear(conditional, tmp_path):
    with pytest.raises(ValueError, match="not conditioned on 'band_gap'; its properties: o_fraction"):
        conditional.generate(4, targets="band_gap=1:3")
    with pytest.raises(ValueError, match="NAME=LO:HI"):
        conditional.generate(4, targets="o_fraction")
    plain = FormulaGenerator.from_pretrained("diffusion-bert")
    with pytest.raises(ValueError, match="its properties: none"):
        plain.generate(4, targets="band_gap=1:3")
    assert cli(["sample", "-n", "4", "--target", "band_gap=3:1", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_sample_with_a_target_uses_the_shipped_conditional_model(tmp_path):
    import json

    assert cli(["sample", "-n", "30", "--seed", "0", "--target", "band_gap=3:", "--no-progress",
                "-o", str(tmp_path / "s")]) == 0
    run = json.loads((tmp_path / "s/run_config.json").read_text())
    assert run["model"].endswith("diffusion-bert-mp-props") and run["targets"] == ["band_gap=3:"]
    assert run["summary"]["validity_cdvae"] == 1.0


def test_shipped_conditional_model_answers_a_band_gap_window():
    from evaluation.properties import PropertyPredictor

    gen = FormulaGenerator.from_pretrained("diffusion-bert-props")
    judge = PropertyPredictor.load()

    def wide_gap(table) -> float:
        return float(np.mean(judge.predict([f for f in table["formula"] if f])["band_gap"] >= 3.0))

    plain = gen.generate(300, seed=0)
    asked = gen.generate(300, seed=0, targets="band_gap=3:")
    assert wide_gap(asked) > 2 * wide_gap(plain)  # benchmarks/conditioning.md: 4.4x at N = 5,000


# ------------------------------------------------------------------- the same for Diffusion-LM
@pytest.fixture(scope="module")
def conditional_lm(tmp_path_factory, mp_reduced_formulas):
    """A tiny Diffusion-LM on the same corpus, 4 bins."""
    return _train_tiny(tmp_path_factory, mp_reduced_formulas, "conditional-lm", model_type="diffusion-lm",
                       condition_bins=4, diffusion_steps=200)


def test_diffusion_lm_asked_for_oxygen_moves_the_hit_rate(conditional_lm):
    bins = conditional_lm.loaded.model.config.property_bins()
    assert conditional_lm.model_type == "diffusion-lm" and [b.name for b in bins] == ["o_fraction"]
    high = bins[0].edges[-1]
    plain = conditional_lm.generate(200, seed=0, steps=50, validity="none")
    asked = conditional_lm.generate(200, seed=0, steps=50, validity="none", targets=f"o_fraction={high}:")
    assert _hit_rate(asked, high) > _hit_rate(plain, high) + 0.3, (_hit_rate(asked, high), _hit_rate(plain, high))
    guided = conditional_lm.generate(200, seed=0, steps=50, validity="none", targets=f"o_fraction={high}:",
                                     guidance=2.0)
    assert _hit_rate(guided, high) >= _hit_rate(asked, high)
    none = conditional_lm.generate(200, seed=0, steps=50, validity="none", targets="o_fraction=:0.0")
    assert _hit_rate(none, 1e-9) < _hit_rate(plain, 1e-9) - 0.2
    valid = conditional_lm.generate(40, seed=1, steps=50, targets=f"o_fraction={high}:", guidance=2.0)
    assert valid["valid_cdvae"].all()  # validity enforcement keeps each repaired row's condition


def test_diffusion_lm_guidance_one_is_plain_conditional(conditional_lm):
    a = conditional_lm.generate(40, seed=2, steps=20, validity="none", targets="o_fraction=0.3:")
    b = conditional_lm.generate(40, seed=2, steps=20, validity="none", targets="o_fraction=0.3:", guidance=1.0)
    assert a["sample"].tolist() == b["sample"].tolist()
    with pytest.raises(ValueError, match="guidance needs property targets"):
        conditional_lm.generate(4, guidance=2.0)


def test_unconditional_diffusion_lm_extends_into_a_conditional_one(conditional_lm):
    """add_property_conditioning starts the new embeddings at zero: the extended model predicts exactly as
    its parent, with or without conditions (so --init-from fine-tuning starts from the parent)."""
    from composition_lm.diffusion_lm import DiffusionLMConfig, DiffusionLMModel

    torch.manual_seed(0)
    cfg = DiffusionLMConfig(seq_length=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, diffusion_steps=50)
    model = DiffusionLMModel(cfg).eval()
    x, t = torch.randn(3, 12, cfg.embedding_dim), torch.tensor([1, 20, 49])
    before = model(x, t)
    model.add_property_conditioning(conditional_lm.loaded.model.config.property_bins())
    assert model.config.property_conditions[0]["name"] == "o_fraction"
    assert torch.allclose(model(x, t, conditions=torch.tensor([[1], [2], [4]])), before)
    with pytest.raises(ValueError, match="already conditioned"):
        model.add_property_conditioning([PropertyBins("gap", (1.0,))])


# ------------------------------------------------------------------- the continuous encoding
def test_ranks_spread_a_point_mass_and_windows_ask_for_its_share():
    from composition_lm.conditions import condition_values, drop_conditions, null_conditions, training_conditions

    values = [0.0] * 400 + list(np.linspace(0.1, 5.0, 600))
    bins = PropertyBins.from_values("band_gap", values, n_bins=8)
    assert bins.rank([0.0], "left")[0] == 0.0 and bins.rank([0.0], "right")[0] == pytest.approx(0.4, abs=0.011)
    assert bins.rank([5.0])[0] == 1.0 and bins.rank([99.0])[0] == 1.0 and np.isnan(bins.rank([np.nan])[0])
    u = training_conditions([bins], [{"band_gap": v} for v in values] + [{}], "continuous", seed=0)[:, 0]
    assert torch.isnan(u[-1]) and abs(float(u[:-1].mean()) - 0.5) < 0.03  # uniform over the training set
    assert float((u[:400] <= 0.41).float().mean()) == 1.0  # the metals fill their whole share of ranks
    asked = condition_values([bins], [Target("band_gap", -math.inf, 0.0)], 2000, torch.Generator().manual_seed(0))
    assert float(asked.max()) <= 0.41 and float(asked.min()) >= 0.0
    wide = condition_values([bins], [Target("band_gap", 3.0, math.inf)], 2000, torch.Generator().manual_seed(0))
    assert float(wide.min()) >= float(bins.rank([3.0], "left")[0]) - 1e-6
    assert torch.isnan(null_conditions(wide)).all() and (null_conditions(torch.ones(2, 1, dtype=torch.long)) == 0).all()
    dropped = drop_conditions(wide, 0.5, torch.Generator().manual_seed(0))
    assert 0.4 < float(torch.isnan(dropped).float().mean()) < 0.6


@pytest.fixture(scope="module")
def continuous(tmp_path_factory, mp_reduced_formulas):
    """A tiny Diffusion-BERT on the same corpus, continuous encoding."""
    return _train_tiny(tmp_path_factory, mp_reduced_formulas, "continuous", condition_encoding="continuous")


def test_continuous_encoding_moves_the_hit_rate_and_survives_save_load(continuous):
    cfg = continuous.loaded.model.config
    assert cfg.property_encoding == "continuous" and len(cfg.property_bins()[0].quantiles) == 101
    plain = continuous.generate(300, seed=0, validity="none")
    asked = continuous.generate(300, seed=0, validity="none", targets="o_fraction=0.6:")
    assert _hit_rate(asked, 0.6) > _hit_rate(plain, 0.6) + 0.3, (_hit_rate(asked, 0.6), _hit_rate(plain, 0.6))
    a = continuous.generate(40, seed=3, validity="none", targets="o_fraction=0.5:")
    b = continuous.generate(40, seed=3, validity="none", targets="o_fraction=0.5:", guidance=1.0)
    assert a["sample"].tolist() == b["sample"].tolist()
    guided = continuous.generate(40, seed=3, targets="o_fraction=0.5:", guidance=2.0)
    assert guided["valid_cdvae"].all()


def test_a_continuous_extension_starts_as_its_parent(continuous):
    from composition_lm.diffusion_bert import DiffusionBertConfig, DiffusionBertModel

    torch.manual_seed(0)
    model = DiffusionBertModel(DiffusionBertConfig(seq_length=12, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).eval()
    x = torch.randint(5, 40, (3, 12))
    before = model(x)
    model.add_property_conditioning(continuous.loaded.model.config.property_bins(), "continuous")
    assert torch.allclose(model(x, conditions=torch.tensor([[0.1], [0.9], [float("nan")]])), before)
    with pytest.raises(ValueError, match="already conditioned"):
        model.add_property_conditioning(continuous.loaded.model.config.property_bins(), "bins")
    with pytest.raises(ValueError, match="unknown condition encoding"):
        DiffusionBertModel(model.config).add_property_conditioning([], "splines")


def test_shipped_conditional_diffusion_lm_answers_a_band_gap_window():
    from evaluation.properties import PropertyPredictor

    gen = FormulaGenerator.from_pretrained("diffusion-lm-props")
    cfg = gen.loaded.model.config
    assert gen.model_type == "diffusion-lm" and [b.name for b in cfg.property_bins()] == [
        "band_gap", "e_above_hull", "formation_energy_per_atom"]
    assert all(b.shares is not None for b in cfg.property_bins())
    judge = PropertyPredictor.load()

    def wide_gap(table) -> float:
        return float(np.mean(judge.predict([f for f in table["formula"] if f])["band_gap"] >= 3.0))

    plain = gen.generate(300, seed=0, validity="none")
    asked = gen.generate(300, seed=0, validity="none", targets="band_gap=3:")
    assert wide_gap(asked) > 2 * wide_gap(plain), (wide_gap(asked), wide_gap(plain))  # 3.2x at N = 2,000
