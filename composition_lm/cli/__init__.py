"""The ``composition-gen`` console script: one command, one sub-command per job, each a thin wrapper that
parses its options, calls the Python API and prints.

One module per command group, each owning its argparse block:

* :mod:`~composition_lm.cli.formulas`: ``validate``, ``evaluate``
* :mod:`~composition_lm.cli.lm`: ``train``, ``sample``
* :mod:`~composition_lm.cli.structures`: ``templates``, ``structure``, ``evaluate-structures``
* :mod:`~composition_lm.cli.discovery`: ``stability``, ``discover``
* :mod:`~composition_lm.cli.potentials`: ``potentials``
* :mod:`~composition_lm.cli.cdvae`: ``cdvae train|export|sample``
* :mod:`~composition_lm.cli.compare`: ``compare``
* :mod:`~composition_lm.cli.learn`: ``learn``
* :mod:`~composition_lm.cli.options`: what several commands share (checked numeric types, relaxation options)

This package sits on top of the three packages and is the only place allowed to import all of them.
Heavy imports happen inside each command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from composition_lm.cli import cdvae, compare, discovery, formulas, learn, lm, potentials, structures

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composition-gen",
        description="Propose inorganic compositions with diffusion language models, check their chemistry, "
        "turn them into crystal structures, and score generated sets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formulas.add_parsers(sub)
    structures.add_evaluate_parser(sub)
    lm.add_parsers(sub)
    structures.add_parsers(sub)
    discovery.add_parsers(sub)
    cdvae.add_parsers(sub)
    compare.add_parsers(sub)
    learn.add_parsers(sub)
    potentials.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a bad input, with the reason on standard error; a usage
    error exits through argparse with code 2)."""
    try:
        args = build_parser().parse_args(argv)
        args._argv = argv
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # CorpusError, FormulaError, bad protocol, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
