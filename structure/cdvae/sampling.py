"""Sampling from CDVAE: z ~ N(0, I) → number of atoms, lattice, composition → random coordinates and
types → annealed Langevin dynamics over the noise levels.

The schedule (:func:`langevin_schedule`), the network (:class:`~structure.cdvae.model.CDVAE`) and the
loop (:func:`langevin`) are separate; one ``torch.Generator`` drives every random draw, so the same seed
gives the same crystals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structure.cdvae.data import lattice_matrix, to_structure
from structure.cdvae.model import CDVAE, sigma_levels


@dataclass
class Crystal:
    """One sampled crystal (fractional coordinates, atomic numbers, lengths in Å, angles in degrees)."""

    frac: torch.Tensor
    types: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor

    def structure(self):
        return to_structure(self.frac, self.types, self.lengths, self.angles)


def langevin_schedule(model: CDVAE, levels: int | None = None, steps: int | None = None,
                      step_lr: float | None = None) -> list[tuple[float, float]]:
    """(sigma, step size) of every Langevin step: ``levels`` geometric noise levels spanning the
    model's training range, ``steps`` steps each, step size ``step_lr * (sigma / sigma_min)^2``."""
    cfg = model.config
    levels, steps = levels or cfg.sample_levels, steps or cfg.sample_steps
    step_lr = cfg.step_lr if step_lr is None else step_lr
    sigmas = sigma_levels(cfg.sigma_begin, cfg.sigma_end, levels).tolist()
    return [(s, step_lr * (s / sigmas[-1]) ** 2) for s in sigmas for _ in range(steps)]


def sample_composition(probs: torch.Tensor, num_atoms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Atomic numbers of ``num_atoms[b]`` atoms per crystal from per-crystal element probabilities
    (B, MAX_Z): round ``p * N`` for each element, draw the atoms still missing from the leftover
    probability, shuffle (CDVAE's rule)."""
    out = []
    for p, n in zip(probs, num_atoms.tolist()):
        counts = torch.round(p * n).long()
        while counts.sum() > n:  # rounding up too often: drop from the most over-rounded element
            counts[torch.argmax((counts - p * n) * (counts > 0))] -= 1
        types = torch.repeat_interleave(torch.arange(len(p)), counts)
        missing = n - len(types)
        if missing > 0:
            left = (p - counts.float() / n).clamp(min=0) + 1e-12
            types = torch.cat([types, torch.multinomial(left, missing, replacement=True, generator=generator)])
        out.append(types[torch.randperm(n, generator=generator)] + 1)
    return torch.cat(out)


@torch.no_grad()
def langevin(model: CDVAE, z: torch.Tensor, generator: torch.Generator, schedule: list[tuple[float, float]],
             progress=None) -> list[Crystal]:
    """Decode latents ``z`` (B, latent) into crystals by annealed Langevin dynamics."""
    num_atoms = model.natom_head(z).argmax(-1).clamp(min=1)
    lengths, angles = model.lattice_from_z(z, num_atoms)
    types = sample_composition(model.composition_head(z).softmax(-1), num_atoms, generator)
    batch = torch.repeat_interleave(torch.arange(len(z)), num_atoms)
    frac = torch.rand((int(num_atoms.sum()), 3), generator=generator)
    lattice = lattice_matrix(lengths, angles)
    inv = torch.linalg.inv(lattice)[batch]
    for sigma, step in schedule:
        eps, logits = model.decoder(z, torch.full((len(z),), sigma), types, frac, lattice, num_atoms, batch)
        move = step * eps / sigma + (2 * step) ** 0.5 * torch.randn(frac.shape, generator=generator)
        frac, types = (frac + torch.einsum("nk,nkl->nl", move, inv)) % 1.0, logits.argmax(-1) + 1
        if progress is not None:
            progress.update(1)
    first = (torch.cumsum(num_atoms, 0) - num_atoms).tolist()
    return [Crystal(frac[s:s + n], types[s:s + n], lengths[b], angles[b])
            for b, (s, n) in enumerate(zip(first, num_atoms.tolist()))]


def sample(model: CDVAE, n: int, seed: int = 0, batch_size: int = 500, levels: int | None = None,
           steps: int | None = None, step_lr: float | None = None, progress: bool = False) -> list[Crystal]:
    """``n`` crystals from the prior, ``batch_size`` at a time; the same seed gives the same crystals."""
    from tqdm.auto import tqdm

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    schedule = langevin_schedule(model, levels, steps, step_lr)
    out: list[Crystal] = []
    n_batches = -(-n // batch_size)
    with tqdm(total=n_batches * len(schedule), desc="Langevin", unit="step", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            z = torch.randn((min(batch_size, n - start), model.config.latent), generator=generator)
            out += langevin(model, z, generator, schedule, bar)
    return out


def to_rows(structures: list) -> list:
    """Sampled structures (pymatgen ``Structure`` s, or :class:`Crystal` s) as output rows
    (:class:`structure.io.Row`): formula, site count, volume, status ``generated``, or
    ``invalid_structure`` with the reason (atoms closer than 0.5 Å, or a volume under 0.1 Å³: CDVAE's
    structure-validity rule)."""
    from evaluation.structures import structure_validity
    from structure.io import Row

    rows = []
    for i, s in enumerate(structures):
        s = s.structure() if isinstance(s, Crystal) else s
        ok, reason = structure_validity(s)
        rows.append(Row(i, s.composition.reduced_formula, rank=1, n_sites=len(s), volume=round(s.volume, 4),
                        status="generated" if ok else "invalid_structure", reason=reason, structure=s))
    return rows
