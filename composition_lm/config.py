"""The configuration both formula models share: a BERT config plus the formula-sequence layout.

:class:`FormulaBertConfig` holds what every formula denoiser needs (sequence length, codec, the count
range of the vocabulary, the BERT sizes, the special-token ids); ``DiffusionBertConfig`` and
``DiffusionLMConfig`` add their diffusion settings on top.
"""

from __future__ import annotations

from transformers import BertConfig

from composition_lm.conditions import ENCODINGS, PropertyBins
from composition_lm.tokenizer import BOS, EOS, PAD, vocabulary_size

__all__ = ["FormulaBertConfig"]


class FormulaBertConfig(BertConfig):
    """A BERT config for fixed-length formula sequences (``[BOS] tokens [EOS] [PAD] ...``)."""

    def __init__(
        self,
        vocab_size: int = vocabulary_size(),
        seq_length: int = 32,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        codec: str = "expanded",
        max_count: int = 200,
        property_conditions: list[dict] | None = None,
        property_dropout: float = 0.1,
        property_encoding: str = "bins",
        **kwargs,
    ):
        kwargs.setdefault("pad_token_id", PAD)
        kwargs.setdefault("bos_token_id", BOS)
        kwargs.setdefault("eos_token_id", EOS)
        kwargs.setdefault("max_position_embeddings", seq_length)
        kwargs.setdefault("type_vocab_size", 1)
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            **kwargs,
        )
        self.seq_length = seq_length
        self.codec = codec
        self.max_count = max_count
        # property conditions (composition_lm.conditions): PropertyBins.as_dict() per property, in input order,
        # the training-time probability of dropping each one to "not given", and how they are encoded
        self.property_conditions = property_conditions or []
        self.property_dropout = property_dropout
        if property_encoding not in ENCODINGS:
            raise ValueError(f"property_encoding must be one of {', '.join(ENCODINGS)}, got {property_encoding!r}")
        self.property_encoding = property_encoding

    def property_bins(self) -> list:
        """The :class:`~composition_lm.conditions.PropertyBins` this model is conditioned on (in order)."""
        return [PropertyBins.from_dict(c) for c in self.property_conditions]
