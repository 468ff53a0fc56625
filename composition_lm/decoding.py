"""Token ids back to formulas: one home for reading a sampled row (the samplers and the validity guard both do)."""

from __future__ import annotations

from composition_lm.formula import Formula, FormulaError, get_codec
from composition_lm.tokenizer import COUNT_OFFSET, ELEMENT_OFFSET, EOS, MASK, PAD
from evaluation.composition import ELEMENTS

__all__ = ["decode_samples"]


def decode_samples(ids, codec_name: str, max_count: int = 200) -> list[tuple[str, Formula | None, str]]:
    """Token ids (a ``[B, L]`` tensor or nested lists) -> ``(raw text, formula or None, error)`` per sequence."""
    codec = get_codec(codec_name, max_count=max_count) if codec_name == "compact" else get_codec(codec_name)
    out = []
    n_el = len(ELEMENTS)
    for row in ids.tolist() if hasattr(ids, "tolist") else ids:
        toks = []
        for i in row[1:]:
            if i in (EOS, PAD):  # a sequence ends at its first [EOS] or [PAD]
                break
            if i == MASK:
                continue
            if ELEMENT_OFFSET <= i < ELEMENT_OFFSET + n_el:
                toks.append(ELEMENTS[i - ELEMENT_OFFSET])
            elif i > COUNT_OFFSET:
                toks.append(str(i - COUNT_OFFSET))
            else:
                toks.append("[UNK]")
        raw = " ".join(toks)
        try:
            out.append((raw, codec.decode(toks), ""))
        except FormulaError as err:
            out.append((raw, None, str(err)))
    return out
