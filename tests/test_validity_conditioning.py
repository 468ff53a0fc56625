"""Validity conditioning of Diffusion-BERT: [VALID]/[INVALID] start tokens, extending a trained
model, the labels the training loop writes, and sampling with a condition (tiny models, one thread)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from composition_lm.cli import main
from composition_lm.diffusion_bert import DiffusionBertConfig, DiffusionBertModel, masked_diffusion_loss
from composition_lm.formula import get_codec
from composition_lm.models import load_model
from composition_lm.sampling import Constraints, LogitRules, generate, sample_masked_diffusion
from composition_lm.tokenizer import BOS, build_tokenizer, condition_token_ids
from composition_lm.training import TrainingArguments, _encode, train
from evaluation.composition import parse_formula
from evaluation.validity import check_formulas

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
VALID, INVALID = condition_token_ids()["valid"], condition_token_ids()["invalid"]
# the same element pairs, charge-balanced (valid) and not (invalid), so only the counts tell them apart
GOOD = "NaCl KCl LiF NaF KF LiCl RbCl CsCl NaBr KBr LiBr RbF CsF RbBr CsBr NaI KI LiI".split()
BAD = "NaCl3 KCl4 LiF5 NaF3 KF4 LiCl5 RbCl3 CsCl4 NaBr5 KBr3 LiBr4 RbF5 CsF3 RbBr4 CsBr5 NaI3 KI4 LiI5".split()


def _validity(samples) -> float:
    forms = [f for _, f, _ in samples if f is not None]
    return sum(r.valid for r in check_formulas(forms, "cdvae")) / len(samples)


def test_condition_tokens_extend_the_vocabulary_and_reload(tmp_path):
    plain, cond = build_tokenizer(), build_tokenizer(condition_tokens=True)
    assert len(cond.get_vocab()) == len(plain.get_vocab()) + 2
    assert cond.convert_tokens_to_ids(["[VALID]", "[INVALID]"]) == [VALID, INVALID] == [308, 309]
    assert {k: v for k, v in cond.get_vocab().items() if v < 308} == plain.get_vocab()
    cond.save_pretrained(tmp_path)
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        again = cls.from_pretrained(tmp_path)
        assert again.convert_tokens_to_ids("[INVALID]") == INVALID
        assert again("[VALID] Na Cl")["input_ids"] == [BOS, VALID, *plain("Na Cl")["input_ids"][1:]]


def test_config_rejects_a_vocabulary_without_condition_tokens():
    with pytest.raises(ValueError, match="vocab_size"):
        DiffusionBertConfig(validity_conditioning=True, vocab_size=308)
    cfg = DiffusionBertConfig(**TINY)
    assert cfg.start_token_id(None) == BOS
    with pytest.raises(ValueError, match="validity conditioning"):
        cfg.start_token_id("valid")
    cfg = DiffusionBertConfig(validity_conditioning=True, vocab_size=310, **TINY)
    assert (cfg.start_token_id("valid"), cfg.start_token_id("invalid")) == (VALID, INVALID)
    with pytest.raises(ValueError, match="condition must be"):
        cfg.start_token_id("neutral")


def test_add_validity_conditioning_keeps_the_model_and_never_predicts_condition_tokens(tmp_path):
    torch.manual_seed(0)
    model = DiffusionBertModel(DiffusionBertConfig(seq_length=12, **TINY)).eval()
    x = torch.randint(5, 120, (4, 12))
    x[:, 0] = BOS
    x[:, 5:8] = 1  # [MASK]
    before = model(x)
    model.add_validity_conditioning()
    assert model.config.validity_conditioning and model.config.vocab_size == 310
    after = model(x)
    assert after.shape[-1] == 310
    torch.testing.assert_close(after[..., :308], before)  # with [BOS] the extended model is the old one
    emb = model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(emb[VALID], emb[BOS])
    x[:, 0] = VALID
    logits = model(x)
    assert torch.isneginf(logits[..., [VALID, INVALID]]).all()
    model.add_validity_conditioning()  # idempotent
    assert model.config.vocab_size == 310
    # save -> load gives identical weights (nothing re-initialised on load)
    model.save_pretrained(tmp_path)
    again = DiffusionBertModel.from_pretrained(tmp_path).eval()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_encode_labels_start_tokens_by_cdvae_validity():
    tok = build_tokenizer(model_max_length=16, condition_tokens=True)
    formulas = GOOD[:5] + BAD[:5] + ["Na" * 1 + "Cl20"]  # the last is too long for 16 tokens: skipped
    ids, skipped = _encode(formulas, get_codec("expanded"), tok, 16, validity_conditioning=True)
    assert skipped == 1 and len(ids) == 10
    expected = [r.valid for r in check_formulas([parse_formula(f) for f in formulas[:10]], "cdvae")]
    assert expected == [True] * 5 + [False] * 5
    assert ids[:, 0].tolist() == [VALID if v else INVALID for v in expected]
    plain, _ = _encode(formulas, get_codec("expanded"), tok, 16)
    assert (plain[:, 0] == BOS).all() and torch.equal(plain[:, 1:], ids[:, 1:])


def test_condition_dropout_is_the_unconditional_loss():
    torch.manual_seed(0)
    cfg = DiffusionBertConfig(seq_length=8, validity_conditioning=True, vocab_size=310, condition_dropout=1.0, **TINY)
    model = DiffusionBertModel(cfg).eval()
    x0 = torch.randint(5, 100, (6, 8))
    x0[:, 0] = VALID
    with torch.no_grad():
        dropped, _ = masked_diffusion_loss(model, cfg, x0, torch.Generator().manual_seed(3))
        cfg.condition_dropout = 0.0
        bos = x0.clone()
        bos[:, 0] = BOS
        # the same generator stream: dropout draws first, so skip that draw for the reference
        g = torch.Generator().manual_seed(3)
        torch.rand(6, generator=g)
        plain, _ = masked_diffusion_loss(model, cfg, bos, g)
        kept, _ = masked_diffusion_loss(model, cfg, x0, torch.Generator().manual_seed(3))
    assert float(dropped) == pytest.approx(float(plain), rel=1e-6)
    assert float(kept) != pytest.approx(float(plain), rel=1e-3)


def test_sampler_starts_with_the_condition_token():
    torch.manual_seed(0)
    model = DiffusionBertModel(DiffusionBertConfig(seq_length=10, validity_conditioning=True, vocab_size=310,
                                                   **TINY)).eval()
    rules = LogitRules(Constraints(), "expanded", 10, 310, 200)
    x = sample_masked_diffusion(model, 8, 4, torch.Generator().manual_seed(0), rules, start_token=VALID)
    assert (x[:, 0] == VALID).all() and not (x[:, 1:] >= 308).any()
    plain = DiffusionBertModel(DiffusionBertConfig(seq_length=10, **TINY)).eval()
    with pytest.raises(ValueError, match="validity conditioning"):
        generate(plain, 4, steps=2, progress=False, condition="valid", validity="none")


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """A tiny model trained with validity conditioning on charge-balanced and unbalanced halides."""
    d = tmp_path_factory.mktemp("cond")
    corpus = d / "halides.txt"
    corpus.write_text("\n".join(GOOD + BAD) + "\n")
    args = TrainingArguments(output_dir=str(d / "run"), corpus=str(corpus), train_split=None, val_split=None,
                             hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=32,
                             seq_length=10, warmup_steps=10, lr=3e-3, max_steps=250, dropout=0.0, ema_decay=0.9,
                             eval_every=0, save_every=0, log_every=50, progress=False, validity_conditioning=True)
    return train(args), corpus


def test_training_with_conditioning_steers_validity(conditioned):
    export, _ = conditioned
    loaded = load_model(export)
    assert loaded.config.validity_conditioning and loaded.tokenizer.convert_tokens_to_ids("[VALID]") == VALID
    auto = generate(loaded, 200, steps=8, seed=0, progress=False, validity="none")
    valid = generate(loaded, 200, steps=8, seed=0, progress=False, condition="valid", validity="none")
    invalid = generate(loaded, 200, steps=8, seed=0, progress=False, condition="invalid", validity="none")
    assert auto == valid  # a conditioned model asks for valid formulas unless told otherwise
    good, bad = _validity(valid), _validity(invalid)
    assert good > 0.85 and bad < good - 0.3, (good, bad)
    uncond = _validity(generate(loaded, 200, steps=8, seed=0, progress=False, condition=None, validity="none"))
    assert bad < uncond < good


def test_cli_fine_tune_adds_conditioning_and_sample_records_it(tmp_path, conditioned):
    _, corpus = conditioned
    base = tmp_path / "base"
    tiny = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64"]
    common = ["--corpus", str(corpus), "--train-split", "", "--val-split", "", "--eval-every", "0",
              "--save-every", "0", "--no-progress", "--batch-size", "16", "--warmup-steps", "2"]
    assert main(["train", *common, *tiny, "--output-dir", str(base), "--seq-length", "10", "--max-steps", "5"]) == 0
    assert not load_model(base / "model").config.validity_conditioning
    ft = tmp_path / "ft"
    assert main(["train", *common, "--output-dir", str(ft), "--init-from", str(base / "model"),
                 "--validity-conditioning", "--max-steps", "5"]) == 0
    loaded = load_model(ft / "model")
    assert loaded.config.validity_conditioning and loaded.config.vocab_size == 310
    assert json.loads((ft / "model" / "training_args.json").read_text())["validity_conditioning"] is True
    for cond in ("auto", "none", "invalid"):
        out = tmp_path / f"s-{cond}"
        assert main(["sample", "--model", str(ft / "model"), "-n", "20", "--steps", "4", "--condition", cond,
                     "--no-progress", "-o", str(out)]) == 0
        assert json.loads((out / "run_config.json").read_text())["condition"] == (None if cond == "none" else cond)
    assert main(["sample", "--model", str(base / "model"), "-n", "4", "--condition", "valid", "--no-progress",
                 "-o", str(tmp_path / "bad")]) == 2


def test_only_valid_drops_invalid_training_formulas(tmp_path, conditioned):
    _, corpus = conditioned
    out = tmp_path / "ov"
    assert main(["train", "--corpus", str(corpus), "--train-split", "", "--val-split", "", "--eval-every", "0",
                 "--save-every", "0", "--no-progress", "--batch-size", "8", "--warmup-steps", "2", "--max-steps", "3",
                 "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64",
                 "--seq-length", "10", "--only-valid", "cdvae", "--output-dir", str(out)]) == 0
    loaded = load_model(out / "model")
    # trained on the valid ones; novelty still judged against every formula of the corpus
    assert loaded.training_formulas() == {str(parse_formula(f)) for f in GOOD + BAD}
    assert "protocol" in (out / "model" / "README.md").read_text()
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["n_invalid_dropped"] == len(BAD) and metrics["n_train"] == len(GOOD)
