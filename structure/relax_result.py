"""The outcome of one relaxation and the checks that decide it, shared by the one-by-one relaxer
(:mod:`structure.relax`) and the batched loop (:mod:`structure.batched`): :class:`RelaxResult`, the geometry checks
on inputs and results (overlapping atoms, implausible density, explosion or collapse) and :func:`_classify`, which
turns a finished optimizer run into a result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pymatgen.core import Structure

__all__ = ["MAX_VOLUME_FACTOR", "MIN_DISTANCE", "MIN_VOLUME_PER_ATOM", "RelaxResult", "Status"]

#: Atoms closer than this (Å, periodic images included) mean overlapping input or an exploded result.
MIN_DISTANCE = 0.5
#: Å^3 per atom below which a cell is too dense to be a solid (the densest of the 53,164 Materials Project
#: template structures has 5.34; diamond 5.67): refused before its neighbour graph is built.
MIN_VOLUME_PER_ATOM = 2.5
#: A relaxation whose cell volume grows or shrinks by more than this factor has exploded.
MAX_VOLUME_FACTOR = 4.0

Status = Literal["converged", "not_converged", "failed"]


# --------------------------------------------------------------------------------------------- results


@dataclass
class RelaxResult:
    """Outcome of one relaxation (see the module docstring for the statuses).

    Attributes:
        structure: relaxed structure; ``None`` when ``status == "failed"``.
        energy_per_atom: final energy in eV/atom; NaN when failed.
        status: ``"converged"``, ``"not_converged"`` or ``"failed"``.
        reason: why it did not converge or failed; ``""`` when converged.
        steps: FIRE steps taken.
        max_force: largest force row (eV/Å) FIRE compared with ``fmax`` at the end; NaN when unknown.
        initial_volume: input cell volume (Å^3).
        final_volume: relaxed cell volume (Å^3); NaN when failed.
        stopped_early: a ``not_converged`` relaxation that an early-stop ceiling ended (``relax_batched``'s
            ``ceilings``): its energy is an upper estimate, the structure not relaxed.
    """

    structure: Structure | None
    energy_per_atom: float
    status: Status
    reason: str
    steps: int
    max_force: float
    initial_volume: float
    final_volume: float
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (the structure as ``Structure.as_dict()``), for pickling and JSON."""
        d = dict(vars(self))
        d["structure"] = None if self.structure is None else self.structure.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RelaxResult:
        """Inverse of :meth:`as_dict`."""
        structure = None if d["structure"] is None else Structure.from_dict(d["structure"])
        return cls(**{**d, "structure": structure})


def _failed(reason: str, initial_volume: float, steps: int = 0) -> RelaxResult:
    """A failed row: no structure, NaN energy, force and final volume."""
    return RelaxResult(None, math.nan, "failed", reason, steps, math.nan, initial_volume, math.nan)


# --------------------------------------------------------------------------------------------- geometry checks


def _min_distance_below(structure: Structure, cutoff: float) -> float:
    """Shortest distance between two atoms (periodic images included) if below ``cutoff``, else inf."""
    centers, points, images, distances = structure.get_neighbor_list(cutoff, exclude_self=False)
    same_atom = (centers == points) & np.all(images == 0, axis=1)
    distances = distances[~same_atom]
    return float(distances.min()) if distances.size else math.inf


def _geometry_problem(structure: Structure) -> str | None:
    """Why a structure cannot be relaxed or trusted (empty, non-finite, degenerate, overlapping, too dense), or None."""
    if len(structure) == 0:
        return "empty structure (no atoms)"
    if not (np.isfinite(structure.lattice.matrix).all() and np.isfinite(structure.cart_coords).all()):
        return "non-finite lattice or coordinates"
    if structure.volume < 1e-3:
        return f"degenerate cell (volume {structure.volume:.3g} Å^3)"
    closest = _min_distance_below(structure, MIN_DISTANCE)
    if closest < MIN_DISTANCE:
        return f"overlapping atoms (min distance {closest:.2f} Å)"
    return _too_dense(structure.volume, len(structure))


def _too_dense(volume: float, n_atoms: int) -> str | None:
    """Why a cell of ``volume`` Å^3 holding ``n_atoms`` is too dense to relax (below ``MIN_VOLUME_PER_ATOM``),
    or None; checked on inputs and results (:func:`_geometry_problem`) and at every batched step."""
    per_atom = volume / n_atoms
    if per_atom < MIN_VOLUME_PER_ATOM:
        return (f"implausibly dense cell ({per_atom:.2f} Å^3/atom < {MIN_VOLUME_PER_ATOM}; the densest Materials "
                "Project structure has 5.3)")
    return None


def _volume_change(initial_volume: float, volume: float) -> str | None:
    """Why a volume that moved from ``initial_volume`` to ``volume`` means an explosion or collapse (outside
    the ``MAX_VOLUME_FACTOR`` band either way), or None."""
    ratio = volume / initial_volume
    if not (1 / MAX_VOLUME_FACTOR <= ratio <= MAX_VOLUME_FACTOR):
        return f"volume changed by a factor {ratio:.3g}"
    return None


def _classify(
    final: Structure,
    energy: float,
    forces: np.ndarray,
    converged: bool,
    steps: int,
    fmax: float,
    initial_volume: float,
) -> RelaxResult:
    """The :class:`RelaxResult` of a finished FIRE run (``forces``: the row norms FIRE compared with ``fmax``);
    shared by the one-by-one and the batched (:mod:`structure.batched`) relaxations."""
    energy = float(energy)  # some calculators (CHGNet) give numpy float32
    if not math.isfinite(energy):
        return _failed("non-finite energy", initial_volume, steps)
    if not np.isfinite(forces).all():
        return _failed("non-finite forces", initial_volume, steps)
    exploded = _explosion(initial_volume, final)
    if exploded is not None:
        return _failed(f"structure exploded: {exploded}", initial_volume, steps)
    max_force = float(forces.max())
    if converged:
        return RelaxResult(final, energy, "converged", "", steps, max_force, initial_volume, final.volume)
    reason = f"not converged after {steps} steps (max force {max_force:.3g} eV/Å > fmax {fmax:g})"
    return RelaxResult(final, energy, "not_converged", reason, steps, max_force, initial_volume, final.volume)


def _explosion(initial_volume: float, final: Structure) -> str | None:
    """What is wrong with a relaxed structure (volume blow-up or collapse, atoms too close), or None."""
    return _volume_change(initial_volume, final.volume) or _geometry_problem(final)
