"""Relax many structures at once: one forward pass (batched for matgl models) drives an optimizer per structure.

Why
    A matgl forward pass on a cell of a few atoms is dominated by fixed per-call costs (Python, graph
    bookkeeping, small kernels), so relaxing structures one by one leaves most of a CPU idle. Here up to
    ``batch_size`` structures are *in flight* at once: their graphs are joined into one PyG ``Batch``, one
    ``Potential`` call gives every structure's energy, forces and stress, and then each structure's own ASE
    FIRE takes its step. A structure that finishes (converged, out of steps, or failed) leaves the batch
    and the next input takes its place, so the batch stays full until the inputs run out.

Same answers as :func:`structure.relax.relax_structure`
    Each structure gets exactly the optimizer the one-by-one path builds through ``matgl.ext.ase.Relaxer``:
    the structure converted with ``AseAtomsAdaptor``, ASE's ``FrechetCellFilter`` when the cell relaxes,
    ``FIRE`` with its defaults, the same convergence test (every row of the filter's forces below
    ``fmax``) and the same step budget (``max_steps`` calls of ``step()``, as in ``Optimizer.irun``).
    Energies, forces and stress (converted to eV/Å^3 as the ``Relaxer``'s calculator does) are written into
    each structure's calculator, a matgl ``PESCalculator``, as its cached results, so ASE reads them
    without computing again; if anything asks for a property at other positions, that calculator computes
    it itself. Batched and one-by-one forward passes differ only by float summation order, so final
    energies agree to well below a meV/atom (measured in ``scripts/bench_relax.py``).

Other potentials
    The loop is the potential's: :meth:`structure.potentials.Potential.evaluate` batches a matgl model and
    calls any other calculator (CHGNet, SevenNet, a user's own) once per structure, so every potential gets
    the same optimizers, filter, convergence test, time limit and failure handling.

Failure handling is per structure: a bad input, a graph that cannot be built, non-finite energies or
forces, or an explosion gives that structure a ``failed`` :class:`~structure.relax.RelaxResult` with a
reason and the others carry on.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Structure

from structure.potentials import get_potential as load_potential
from structure.relax_result import _classify, _failed, _geometry_problem, _too_dense, _volume_change

__all__ = ["OPTIMIZERS", "relax_batched"]

#: Optimizers by name (ASE classes). ``FIRE`` is what ``matgl.ext.ase.Relaxer`` uses; ``LBFGS`` reaches the
#: same minima (median |ΔE| ~0.1 meV/atom) in about a third fewer force calls (``scripts/bench_relax.py``).
OPTIMIZERS = ("FIRE", "LBFGS", "BFGS")


@dataclass
class _InFlight:
    """One structure being relaxed: its index in the input, ASE objects and bookkeeping."""

    index: int
    atoms: object  # ase.Atoms carrying a PESCalculator
    target: object  # what FIRE moves: the FrechetCellFilter, or the atoms themselves
    optimizer: object  # ase.optimize.FIRE
    initial_volume: float
    converged: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    timed_out: bool = False
    stopped: str | None = None  # why an early stop rule ended it (see ``ceilings``)
    forces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


def relax_batched(
    structures: Sequence[Structure],
    potential,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
    batch_size: int = 1,
    optimizer: str = "FIRE",
    on_result: Callable[[int, object], None] | None = None,
    time_limit: float | None = None,
    ceilings: Sequence[float | None] | None = None,
    stop_after: int = 50,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list:
    """Relax ``structures`` with FIRE, ``batch_size`` of them per forward pass; results in input order.

    Args:
        structures: inputs (not modified).
        potential: a :class:`~structure.potentials.Potential` or what :func:`structure.relax.load_potential` takes.
        fmax, max_steps, relax_cell: as for :func:`structure.relax.relax_structure`.
        batch_size: structures in flight at once (>= 1).
        optimizer: one of :data:`OPTIMIZERS` (ASE's defaults for its parameters).
        on_result: called as ``on_result(index, result)`` when each structure finishes (for progress bars).
        time_limit: seconds a structure may stay in flight; one still running then stops ``not_converged``
            with its last geometry and says so (None: no limit; the check falls between steps, so it cannot
            cut one slow step short). Independently, a structure whose volume leaves the
            ``MAX_VOLUME_FACTOR`` band, or falls below ``MIN_VOLUME_PER_ATOM``, during the relaxation stops
            there as ``failed``: a dense cell's neighbour graph grows with the cube of its density (an input
            at 0.58 Å^3/atom held a discover worker at 7 GB for over 15 minutes), and such a structure
            would fail the final geometry check anyway.
        ceilings: early stop of hopeless relaxations: ``ceilings[i]`` is an energy per atom (eV/atom, None for
            none) above which structure ``i`` is not worth finishing (the screening stage sets it where its
            E_hull would exceed a bound, :class:`structure.stability.Screening`); a structure still above it after
            ``stop_after`` steps stops ``not_converged`` with ``stopped_early`` set and says so.
        on_step: called as ``on_step(index, steps, energy_per_atom)`` after each energy evaluation (the initial
            one is step 0): energy traces, e.g. for choosing an early-stop margin (``scripts/bench_funnel_speed.py``).

    Returns:
        One :class:`~structure.relax.RelaxResult` per input, never an exception for a bad structure.
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if ceilings is not None and len(ceilings) != len(structures):
        raise ValueError(f"ceilings must give one value per structure ({len(structures)}), got {len(ceilings)}")
    potential = load_potential(potential)
    results: list = [None] * len(structures)

    def finish(index: int, result) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    pending = iter(range(len(structures)))
    flight: list[_InFlight] = []
    while True:
        while len(flight) < batch_size:  # refill the batch from the inputs
            index = next(pending, None)
            if index is None:
                break
            structure = structures[index]
            problem = _geometry_problem(structure)
            if problem is not None:
                finish(index, _failed(problem, float(structure.volume)))
                continue
            try:
                item = _start(index, structure, potential, relax_cell, optimizer)
                _evaluate([item], potential)  # the initial forces, as irun computes before its first check
            except Exception as err:  # a structure whose graph or first energy cannot be computed
                finish(index, _failed(f"{type(err).__name__}: {err}", float(structure.volume)))
                continue
            _check(item, fmax)
            _report(item, on_step)
            flight.append(item)
        if not flight:
            break
        if time_limit is not None:
            now = time.monotonic()
            for item in flight:
                item.timed_out = not (item.error or item.converged) and now - item.started > time_limit
        if ceilings is not None:
            for item in flight:
                _stop_if_hopeless(item, ceilings[item.index], stop_after)
        done = [item for item in flight if item.error or item.converged or item.timed_out or item.stopped
                or item.optimizer.nsteps >= max_steps]
        for item in done:
            finish(item.index, _result(item, fmax))
        flight = [item for item in flight if item not in done]
        if not flight:
            continue
        for item in flight:
            item.optimizer.step()
            item.optimizer.nsteps += 1
        try:
            _evaluate(flight, potential)
        except Exception:  # find the culprit: evaluate one by one, so only it fails
            for item in flight:
                try:
                    _evaluate([item], potential)
                except Exception as err:
                    item.error = f"{type(err).__name__}: {err}"
        for item in flight:
            if item.error is None:
                _check(item, fmax)
                _report(item, on_step)
            if item.error is None:
                _guard_volume(item)
    return results


def _report(item: _InFlight, on_step) -> None:
    if on_step is not None and item.error is None:
        on_step(item.index, item.optimizer.nsteps, float(item.atoms.get_potential_energy()) / len(item.atoms))


def _start(index: int, structure: Structure, potential, relax_cell: bool, optimizer: str = "FIRE") -> _InFlight:
    """Atoms with the potential's calculator (as ``Relaxer`` sets it up), the cell filter and the optimizer."""
    import ase.optimize
    from ase.filters import FrechetCellFilter
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor().get_atoms(structure)
    atoms.calc = potential.calculator()
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    dynamics = getattr(ase.optimize, optimizer)(target, logfile=None)
    dynamics.nsteps = 0
    return _InFlight(index, atoms, target, dynamics, float(structure.volume))


def _evaluate(items: list[_InFlight], potential) -> None:
    """One forward pass over ``items``' current geometries (batched for a matgl model); each one's results stay
    in its calculator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        potential.evaluate([item.atoms for item in items])


def _check(item: _InFlight, fmax: float) -> None:
    """Record FIRE's convergence test and the filter's forces, or why the structure must stop."""
    energy = item.atoms.get_potential_energy()
    item.forces = np.asarray(item.target.get_forces())
    if not math.isfinite(energy):
        item.error = "non-finite energy"
    elif not np.isfinite(item.forces).all():
        item.error = "non-finite forces"
    else:
        item.optimizer.fmax = fmax
        item.converged = bool(item.optimizer.converged())


def _stop_if_hopeless(item: _InFlight, ceiling: float | None, stop_after: int) -> None:
    """Mark a structure still above its energy ceiling after ``stop_after`` steps as not worth finishing."""
    if ceiling is None or item.error or item.converged or item.optimizer.nsteps < stop_after:
        return
    energy = item.atoms.get_potential_energy() / len(item.atoms)
    if energy > ceiling:
        item.stopped = (f"stopped early after {item.optimizer.nsteps} steps: {energy:.3f} eV/atom, "
                        f"{energy - ceiling:.3f} above the screening ceiling")


def _guard_volume(item: _InFlight) -> None:
    """Stop a structure whose cell left the ``MAX_VOLUME_FACTOR`` band (collapse or blow-up) or became denser
    than ``MIN_VOLUME_PER_ATOM`` mid-relaxation (the checks :func:`structure.relax._explosion` makes at the end)."""

    volume = item.atoms.get_volume()
    if problem := _volume_change(item.initial_volume, volume):
        item.error = f"structure exploded: {problem} during relaxation (step {item.optimizer.nsteps})"
    elif problem := _too_dense(volume, len(item.atoms)):
        item.error = f"structure collapsed: {problem} during relaxation (step {item.optimizer.nsteps})"


def _result(item: _InFlight, fmax: float):
    """The :class:`RelaxResult` of a finished structure, classified as ``relax_structure`` does."""
    from pymatgen.io.ase import AseAtomsAdaptor


    steps = item.optimizer.nsteps
    if item.error is not None:
        return _failed(item.error, item.initial_volume, steps)
    final = AseAtomsAdaptor.get_structure(item.atoms.copy())  # without the calculator: no float32 magmoms
    energy = item.atoms.get_potential_energy() / len(final)
    result = _classify(final, energy, np.linalg.norm(item.forces, axis=1), item.converged, steps, fmax,
                       item.initial_volume)
    if item.timed_out and result.status == "not_converged":
        result.reason = f"stopped by the time limit after {steps} steps; " + result.reason
    if item.stopped and result.status == "not_converged":
        result.reason, result.stopped_early = item.stopped, True
    return result
