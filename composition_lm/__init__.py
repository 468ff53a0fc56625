"""Formula language models: formulas, tokenizer, corpora, Diffusion-BERT and Diffusion-LM, training,
sampling, and the ``composition-gen`` console script.

The object a notebook needs (loaded on first use, so ``import composition_lm`` is instant)::

    from composition_lm import FormulaGenerator

    gen = FormulaGenerator.from_pretrained("diffusion-bert")   # or "diffusion-lm", a folder, a hub id
    table = gen.generate(1000, seed=0, elements="Li,Fe,P,O")  # a pandas DataFrame, formulas.csv's columns
"""

from __future__ import annotations

__all__ = ["FormulaGenerator"]


def __getattr__(name: str):
    if name == "FormulaGenerator":
        from composition_lm.generator import FormulaGenerator

        return FormulaGenerator
    raise AttributeError(f"module 'composition_lm' has no attribute {name!r}")
