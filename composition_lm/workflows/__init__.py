"""Workflows: what composes the three packages into one call (the layer above them, beside the CLI).

* :func:`~composition_lm.workflows.discovery.discover`: sample formulas, give them template structures, relax
  them, place them on the convex hull and keep the stable, unique, novel candidates (:class:`DiscoveryResult`);
* :func:`~composition_lm.workflows.samples.save_samples`: a sampled table written as ``formulas.csv`` and
  ``run_config.json`` (which ``composition-gen sample --config`` reads back).

``composition_lm``'s other modules may not import ``structure`` (tests/test_layering.py); this package and the CLI
may, and every CLI command is argument parsing plus one call here or in the packages::

    from composition_lm.workflows import discover

    result = discover("diffusion-bert", n=100, seed=0, output="runs/discover")
    result.sun_rate["0.1"], result.candidates().head()
"""

from __future__ import annotations

__all__ = ["DiscoveryResult", "discover", "save_samples"]


def __getattr__(name: str):
    if name in ("DiscoveryResult", "discover"):
        from composition_lm.workflows import discovery

        return getattr(discovery, name)
    if name == "save_samples":
        from composition_lm.workflows.samples import save_samples

        return save_samples
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
