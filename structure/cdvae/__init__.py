"""CDVAE (Xie et al. 2022), a crystal diffusion VAE: the generator of whole crystals.

    from structure.cdvae import CDVAE

    model = CDVAE.from_pretrained("cdvae-perov5")     # a shipped name or a model folder
    structures = model.sample(100, seed=0)             # pymatgen Structures

``model`` (network, save/load), ``sampling`` (schedule, Langevin loop), ``data`` (crystal graphs) and
``train`` (training on CDVAE-style CSVs) hold the pieces; ``CDVAE`` is imported on first use.
"""

from __future__ import annotations

__all__ = ["CDVAE", "CDVAEConfig"]


def __getattr__(name: str):
    if name in __all__:
        from structure.cdvae import model

        return getattr(model, name)
    raise AttributeError(f"module 'structure.cdvae' has no attribute {name!r}")
