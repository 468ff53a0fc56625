"""Crystal structures of generated formulas: templates, element substitution, relaxation with pluggable
interatomic potentials (CHGNet by default; SevenNet, M3GNet, any matgl model or ASE calculator), stability, CDVAE.

The objects a notebook needs (loaded on first use, so ``import structure`` is instant)::

    from structure import StructurePredictor, Relaxer, get_potential

    rows = StructurePredictor("mp_union.db").predict(["LiFePO4"], top_k=5)   # template structures
    results = Relaxer("chgnet").relax([r.structure for r in rows])           # or get_potential("sevennet-0")

``structure.cdvae.CDVAE`` generates whole crystals; ``structure.io`` reads and writes structure files.
"""

from __future__ import annotations

import importlib

__all__ = ["Potential", "RelaxSettings", "Relaxer", "StructurePredictor", "TemplateStore", "get_potential",
           "read_structures", "write_outputs"]

_HOMES = {
    "StructurePredictor": "structure.pipeline",
    "Relaxer": "structure.pipeline",
    "Potential": "structure.potentials",
    "get_potential": "structure.potentials",
    "RelaxSettings": "structure.relax",
    "TemplateStore": "structure.templates",
    "read_structures": "structure.io",
    "write_outputs": "structure.io",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'structure' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
