"""Sequence codecs (composition_lm.formula) and the formula tokenizer (composition_lm.tokenizer)."""

from __future__ import annotations

import pytest

from composition_lm.formula import CODECS, CompactCodec, ExpandedCodec, FormulaError, get_codec, parse_formula
from composition_lm.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    count_token_ids,
    decode_ids,
    element_token_ids,
    encode_formulas,
)
from evaluation.composition import ELEMENTS


# ------------------------------------------------------------------------------------------ codecs
def test_codec_registry():
    assert set(CODECS) == {"expanded", "compact"}
    assert isinstance(get_codec("expanded"), ExpandedCodec)
    assert isinstance(get_codec("compact"), CompactCodec)
    assert get_codec("compact", max_count=7).max_count == 7
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("nope")


def test_encode_srtio3():
    f = parse_formula("SrTiO3")
    assert get_codec("expanded").encode(f) == ["Sr", "Ti", "O", "O", "O"]
    assert get_codec("compact").encode(f) == ["Sr", "1", "Ti", "1", "O", "3"]


def test_encode_uses_canonical_order_and_reduced_counts():
    f = parse_formula("O6Fe4")  # -> Fe2O3
    assert get_codec("expanded").encode(f) == ["Fe", "Fe", "O", "O", "O"]
    assert get_codec("compact").encode(f) == ["Fe", "2", "O", "3"]


def test_lengths():
    f = parse_formula("K4(Fe(CN)6)")  # K4FeC6N6: 4 elements, 17 atoms
    for name in CODECS:
        codec = get_codec(name)
        assert codec.length(f) == len(codec.encode(f))
    assert get_codec("expanded").length(f) == 17
    assert get_codec("compact").length(f) == 8


def test_decode_is_lenient_about_order():
    assert str(get_codec("expanded").decode(["O", "Ti", "O", "Sr", "O"])) == "SrTiO3"
    assert str(get_codec("compact").decode(["O", "3", "Sr", "1", "Ti", "1"])) == "SrTiO3"
    # decoding reduces by the gcd as well
    assert str(get_codec("compact").decode(["Na", "2", "Cl", "2"])) == "NaCl"


@pytest.mark.parametrize(
    ("tokens", "reason"),
    [
        (["Sr", "1", "Ti"], "odd number of tokens"),
        (["Sr", "1", "Sr", "2"], "element Sr appears twice"),
        (["1", "Sr"], "expected an element"),
        (["Xx", "1"], "expected an element"),
        (["Sr", "Ti"], "expected a count after Sr"),
        (["Sr", "0"], "expected a count"),
        (["Sr", "-1"], "expected a count"),
        (["Sr", "1.5"], "expected a count"),
        ([], "empty"),
    ],
)
def test_compact_decode_errors(tokens, reason):
    with pytest.raises(FormulaError, match=reason):
        get_codec("compact").decode(tokens)


@pytest.mark.parametrize(
    ("tokens", "reason"),
    [
        (["Sr", "Ti", "3"], "not an element token: '3'"),
        (["Sr", "Xx"], "not an element token: 'Xx'"),
        (["Sr", "[EOS]"], "not an element token"),
        ([], "empty"),
    ],
)
def test_expanded_decode_errors(tokens, reason):
    with pytest.raises(FormulaError, match=reason):
        get_codec("expanded").decode(tokens)


def test_compact_encode_rejects_counts_beyond_max():
    codec = get_codec("compact", max_count=10)
    assert codec.encode(parse_formula("Fe10O")) == ["Fe", "10", "O", "1"]
    with pytest.raises(FormulaError, match="exceeds"):
        codec.encode(parse_formula("Fe11O"))


@pytest.mark.parametrize("name", ["expanded", "compact"])
def test_codecs_lossless_on_every_mp_formula(name, mp_reduced_formulas):
    codec = get_codec(name)
    failures = []
    for text in mp_reduced_formulas:
        f = parse_formula(text)
        try:
            toks = codec.encode(f)
            ok = codec.decode(toks) == f and len(toks) == codec.length(f)
        except FormulaError as err:
            ok, toks = False, str(err)
        if not ok:
            failures.append((text, toks))
    assert not failures, failures[:10]


# --------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_vocabulary_layout(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 5 + 103 + 200
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert vocab[tok] == i
    assert element_token_ids(tokenizer) == {sym: 5 + i for i, sym in enumerate(ELEMENTS)}
    assert count_token_ids(tokenizer) == {n: 107 + n for n in range(1, 201)}
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (3, 4)
    # deterministic
    assert build_tokenizer().get_vocab() == vocab
    assert len(build_tokenizer(max_count=10).get_vocab()) == 5 + 103 + 10


def test_encode_text_wraps_bos_eos(tokenizer):
    ids = tokenizer("Sr Ti O O O")["input_ids"]
    sr, ti, o = (5 + ELEMENTS.index(s) for s in ("Sr", "Ti", "O"))
    assert ids == [tokenizer.bos_token_id, sr, ti, o, o, o, tokenizer.eos_token_id]
    assert ids == [2, 42, 26, 12, 12, 12, 3]  # Sr Z=38, Ti Z=22, O Z=8 -> id = Z + 4
    compact = tokenizer("Sr 1 Ti 1 O 3")["input_ids"]
    assert compact == [2, sr, 108, ti, 108, o, 110, 3]
    # an unknown word maps to [UNK]
    assert tokenizer("Xx Sr")["input_ids"] == [2, tokenizer.unk_token_id, sr, 3]


FORMULAS = ["SrTiO3", "K4(Fe(CN)6)", "Ba(PRh)2", "Lr2O3", "H", "Fe2O3"]


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_save_and_reload(tokenizer, tmp_path, loader):
    import transformers

    tokenizer.save_pretrained(tmp_path)
    reloaded = getattr(transformers, loader).from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for attr in ("pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tokenizer, attr), attr
    for attr in ("pad_token", "mask_token", "bos_token", "eos_token", "unk_token"):
        assert getattr(reloaded, attr) == getattr(tokenizer, attr), attr
    for text in FORMULAS:
        f = parse_formula(text)
        for name in CODECS:
            s = " ".join(get_codec(name).encode(f))
            assert reloaded(s)["input_ids"] == tokenizer(s)["input_ids"], (text, name)
    assert reloaded.model_max_length == tokenizer.model_max_length


def test_encode_formulas_matches_tokenizer_and_skips_long(tokenizer):
    codec = get_codec("expanded")
    formulas = [parse_formula(t) for t in ("NaCl", "Al2O3", "SrTiO3", "KBr")]
    # max_length 6 leaves room for 4 tokens between [BOS] and [EOS]: Al2O3 (5) and SrTiO3 (5) are too long
    ids, skipped = encode_formulas(tokenizer, codec, formulas, max_length=6)
    assert skipped == [1, 2]
    assert len(ids) == 2
    assert ids[0] == tokenizer("Na Cl")["input_ids"]
    assert ids[1] == tokenizer("K Br")["input_ids"]
    assert all(len(x) <= 6 for x in ids)
    # exactly at the limit is kept (5 atoms + 2 = 7)
    ids, skipped = encode_formulas(tokenizer, codec, formulas, max_length=7)
    assert skipped == []
    assert ids[2] == tokenizer("Sr Ti O O O")["input_ids"]


def test_encode_formulas_default_length_and_count_vocab():
    tok = build_tokenizer(max_count=5, model_max_length=8)
    expanded, compact = get_codec("expanded"), get_codec("compact")
    formulas = [parse_formula(t) for t in ("Fe2O3", "Fe6O", "Mg3(PO4)2")]
    # expanded: 5, 7, 13 atoms; with [BOS]/[EOS] the default limit of 8 keeps only Fe2O3
    ids, skipped = encode_formulas(tok, expanded, formulas)
    assert skipped == [1, 2]
    assert ids == [tok("Fe Fe O O O")["input_ids"]]
    # compact: Fe6O needs the count token "6", absent from a max_count=5 vocabulary; Mg3P2O8 needs "8"
    ids, skipped = encode_formulas(tok, compact, formulas)
    assert skipped == [1, 2]
    assert ids == [tok("Fe 2 O 3")["input_ids"]]


def test_decode_ids_roundtrip(tokenizer):
    f = parse_formula("Ba(PRh)2")
    for name in CODECS:
        codec = get_codec(name)
        ids = tokenizer(" ".join(codec.encode(f)))["input_ids"]
        padded = [*ids, tokenizer.pad_token_id, tokenizer.pad_token_id]
        assert codec.decode(decode_ids(tokenizer, padded)) == f
    # stops at the first [EOS], drops pads and masks
    ba, o = 5 + ELEMENTS.index("Ba"), 5 + ELEMENTS.index("O")
    assert decode_ids(tokenizer, [2, ba, 1, 0, o, 3, o, o]) == ["Ba", "O"]
