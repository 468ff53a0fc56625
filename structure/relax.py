"""Relax crystal structures with an interatomic potential and compute formation energies.

Potentials
    Every function here takes a :class:`structure.potentials.Potential`, or anything
    :func:`structure.potentials.get_potential` turns into one (a registered name such as ``chgnet`` or
    ``sevennet-0``, a matgl model folder or hub name); :func:`load_potential` is that function. Loaded
    potentials are cached per process, keyed by :attr:`Potential.key`.

Relaxation
    :func:`relax_structure` runs ASE's FIRE through ``matgl.ext.ase.Relaxer``. With ``relax_cell=True``
    the cell and positions move together (ASE ``FrechetCellFilter``). FIRE stops when every row of the
    forces it minimises (the atomic forces and, with the cell, the filter's three stress rows) is below
    ``fmax`` (eV/Å), or after ``max_steps`` steps. ``RelaxResult.max_force`` is the largest such row
    norm at the end, i.e. the value compared with ``fmax``. A small factory passed to ``Relaxer`` as its
    optimizer builds that same FIRE and keeps it, which gives the step count and the convergence flag.
    :func:`relax_many` runs the same optimizer, filter and convergence test through
    :func:`structure.batched.relax_batched`, which can put several structures into one forward pass and can
    swap FIRE for LBFGS; :func:`relax_structure` stays the one-by-one reference it is measured against.

Statuses (one :class:`RelaxResult` per structure; never an exception for a bad structure)
    ``converged``      forces below ``fmax``; ``reason`` is ``""``.
    ``not_converged``  still above ``fmax`` after ``max_steps``; energy and structure are reported,
                       and ``reason`` gives the steps and the remaining force.
    ``failed``         ``structure`` is ``None`` and ``energy_per_atom`` NaN, because of one of these:
                       the input is empty, has non-finite coordinates, a degenerate cell, or two atoms
                       (periodic images included) closer than ``MIN_DISTANCE`` = 0.5 Å, or a cell denser
                       than ``MIN_VOLUME_PER_ATOM`` = 2.5 Å^3/atom (under half the densest Materials
                       Project structure, 5.3; such a cell's M3GNet graph has hundreds of neighbours per
                       atom and can take gigabytes and hours: a template scaled for H7OF9 had 0.58); the energy or
                       forces became non-finite; the structure exploded (volume changed by more than
                       ``MAX_VOLUME_FACTOR`` = 4 either way, checked at every step of a batched relaxation,
                       or a geometry problem above at the end);
                       or the relaxation raised (``reason`` is the exception text).

Workers
    :func:`relax_many` keeps input order. With ``workers>1`` each task is a chunk of at most ``batch_size`` structures, small
    enough that every worker gets at least four tasks (uneven relaxations then even out). ``workers=1`` (or a single structure) relaxes in this process
    with one torch thread (restored afterwards): graphs of a few atoms gain nothing from more threads,
    and on a busy 2-core machine default threads were measured 10-40x slower. ``workers>1`` starts a ``multiprocessing`` pool with the ``spawn``
    context; spawn re-imports the caller's main module, so call it from an importable script whose work
    sits under ``if __name__ == "__main__":`` (not from code piped to ``python -``). Each
    worker loads the potential once (pool initializer), calls ``torch.set_num_threads(1)``, and is
    started with ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to 1, so the
    workers do not compete for cores with their own thread pools. Structures go to the workers, and
    results come back, as plain dicts (``Structure.as_dict``). Both paths relax the same round-tripped
    structure, so energies agree between worker counts to float round-off. The potential is loaded in
    the calling process first, so a bad name raises before any worker starts.

Reference energies
    :class:`ElementalReferences` gives each element's energy per atom: its Materials Project ground state
    (shipped, :data:`GROUND_STATES`) relaxed with the potential, whatever the template store; a store's own
    elemental polymorphs are relaxed as a check, and an element whose store polymorph lies well below the
    ground state is reported (:meth:`ElementalReferences.notes`). Values are kept in memory and, with
    ``cache_path``, in a JSON file keyed by the potential's key and element, written atomically and read
    again on construction. ``formation_energy_per_atom`` is ``E/atom - sum_el x_el * E_el``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition, Element, Structure

from evaluation.io import write_json
from structure.batched import OPTIMIZERS, relax_batched
from structure.potentials import Potential, get_potential, potential_key
from structure.relax_result import (MAX_VOLUME_FACTOR, MIN_DISTANCE, MIN_VOLUME_PER_ATOM, RelaxResult, _classify,
                                    _failed, _geometry_problem)

__all__ = [
    "MAX_VOLUME_FACTOR",
    "MIN_DISTANCE",
    "MIN_VOLUME_PER_ATOM",
    "GROUND_STATES",
    "ElementalReferences",
    "RelaxResult",
    "RelaxSettings",
    "load_potential",
    "potential_key",
    "relax_many",
    "relax_structure",
    "ground_states",
]

_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# --------------------------------------------------------------------------------------------- potentials

#: Loads a potential: a registered name, a matgl folder or hub name, or a Potential (see structure.potentials).
load_potential = get_potential


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RelaxSettings:
    """How a relaxation runs, whatever the potential: ``fmax`` (eV/Å), ``max_steps``, ``optimizer`` (``FIRE``,
    ``LBFGS`` or ``BFGS``), ``batch_size`` (structures per forward pass, batched for matgl models) and
    ``time_limit`` (seconds a structure may take before it stops ``not_converged``; None: no limit)."""

    fmax: float = 0.05
    max_steps: int = 500
    optimizer: str = "FIRE"
    batch_size: int = 1
    time_limit: float | None = None

    def __post_init__(self) -> None:
    
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.fmax > 0:
            raise ValueError(f"fmax must be positive, got {self.fmax}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {self.time_limit}")

    @classmethod
    def of(cls, settings: RelaxSettings | dict | None) -> RelaxSettings:
        """``settings`` as a :class:`RelaxSettings` (a dict of its fields, or None for the defaults)."""
        if settings is None:
            return cls()
        return settings if isinstance(settings, cls) else cls(**settings)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# --------------------------------------------------------------------------------------------- relaxation


class _KeptFire:
    """Optimizer factory for ``Relaxer``: builds ASE's FIRE (what ``optimizer="FIRE"`` selects) and keeps it
    with the object it moves, so the step count, convergence and final forces can be read afterwards."""

    def __init__(self) -> None:
        self.optimizer = None
        self.target = None

    def __call__(self, atoms, **kwargs):
        from ase.optimize import FIRE

        self.target = atoms
        self.optimizer = FIRE(atoms, **kwargs)
        return self.optimizer


def relax_structure(
    structure: Structure,
    potential,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
) -> RelaxResult:
    """Relax one structure with FIRE; a problem gives a ``failed`` row, never an exception.

    A matgl potential goes through ``matgl.ext.ase.Relaxer`` (the reference the batched loop is measured
    against); any other potential through :func:`structure.batched.relax_batched` with one structure.

    Args:
        structure: the input (not modified).
        potential: a :class:`~structure.potentials.Potential` or what :func:`load_potential` takes.
        fmax: force threshold in eV/Å.
        max_steps: FIRE step limit.
        relax_cell: relax the cell with the positions (``FrechetCellFilter``); positions only if False.
    """
    potential = load_potential(potential)
    if potential.matgl_model is None:
        return relax_batched([structure], potential, fmax=fmax, max_steps=max_steps, relax_cell=relax_cell)[0]
    initial_volume = float(structure.volume)
    problem = _geometry_problem(structure)
    if problem is not None:
        return _failed(problem, initial_volume)
    fire = _KeptFire()
    try:
        return _run_fire(structure, potential, fire, fmax, max_steps, relax_cell, initial_volume)
    except Exception as err:  # any error inside the relaxation becomes a failed row
        steps = fire.optimizer.nsteps if fire.optimizer is not None else 0
        return _failed(f"{type(err).__name__}: {err}", initial_volume, steps)


def _run_fire(
    structure: Structure,
    potential,
    fire: _KeptFire,
    fmax: float,
    max_steps: int,
    relax_cell: bool,
    initial_volume: float,
) -> RelaxResult:
    """Run ``Relaxer`` with the kept FIRE and classify the outcome."""
    from matgl.ext.ase import Relaxer

    with warnings.catch_warnings():  # matgl's Relaxer still calls the deprecated atoms.set_calculator
        warnings.filterwarnings("ignore", message="Please use atoms.calc", category=FutureWarning)
        out = Relaxer(potential.matgl_model, optimizer=fire, relax_cell=relax_cell).relax(structure, fmax=fmax,
                                                                                           steps=max_steps)
    final: Structure = out["final_structure"]
    energy = out["trajectory"].energies[-1] / len(final)
    forces = np.linalg.norm(fire.target.get_forces(), axis=1)
    return _classify(final, energy, forces, fire.optimizer.converged(), fire.optimizer.nsteps, fmax, initial_volume)


# --------------------------------------------------------------------------------------------- many structures

_WORKER: dict[str, Any] = {}


def relax_many(
    structures: Sequence[Structure],
    potential: str | Path | Potential,
    fmax: float = 0.05,
    max_steps: int = 500,
    workers: int = 1,
    progress: bool = True,
    optimizer: str = "FIRE",
    batch_size: int = 1,
    time_limit: float | None = None,
    ceilings: Sequence[float | None] | None = None,
    stop_after: int = 50,
) -> list[RelaxResult]:
    """Relax structures in input order, in this process (``workers=1``) or in a spawned pool.

    Every structure goes through :func:`structure.batched.relax_batched` (the same FIRE, filter and
    convergence test as :func:`relax_structure`, whose energies it reproduces to ~1e-5 eV/atom).

    Args:
        structures: inputs; each travels as ``Structure.as_dict()`` (also when ``workers=1``).
        potential: a :class:`~structure.potentials.Potential` or what :func:`load_potential` takes; with
            ``workers > 1`` it must come from a name or folder (workers load it again from that).
        fmax, max_steps: as for :func:`relax_structure`; the cell is relaxed.
        workers: number of processes; each worker is single-threaded (see the module docstring).
        progress: show a tqdm progress bar.
        optimizer: ``"FIRE"`` (matgl's ``Relaxer``), ``"LBFGS"`` or ``"BFGS"`` (:data:`structure.batched.OPTIMIZERS`).
        batch_size: structures per forward pass in each process (1: one by one).
        time_limit: seconds per structure before it stops ``not_converged`` (None: no limit; see
            :func:`structure.batched.relax_batched`).
        ceilings, stop_after: early stop of hopeless relaxations (see :func:`structure.batched.relax_batched`).
    """
    from tqdm.auto import tqdm


    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = load_potential(potential)  # validates the name here, before any worker starts
    if workers > 1 and len(structures) > 1 and loaded.spec is None:
        raise ValueError("a potential wrapped from an ASE calculator relaxes in this process only: use workers=1")
    payloads = [s.as_dict() for s in structures]
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit must be positive, got {time_limit}")
    if ceilings is not None and len(ceilings) != len(payloads):
        raise ValueError(f"ceilings must give one value per structure ({len(payloads)}), got {len(ceilings)}")
    ceilings = list(ceilings) if ceilings is not None else [None] * len(payloads)
    settings = {"fmax": fmax, "max_steps": max_steps, "optimizer": optimizer, "batch_size": batch_size,
                "time_limit": time_limit, "stop_after": stop_after}
    with tqdm(total=len(payloads), desc="relax", unit="structure", disable=not progress) as bar:
        if workers <= 1 or len(payloads) <= 1:  # a pool is not worth starting for one structure
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # graphs of a few atoms: extra threads only contend (measured 10-40x slower)
            try:
                return _relax_payloads(payloads, ceilings, loaded, settings, on_result=lambda *_: bar.update())
            finally:
                torch.set_num_threads(threads)
        size = max(1, min(batch_size, math.ceil(len(payloads) / (4 * workers))))  # >= 4 tasks per worker: balance
        chunks = [(payloads[i:i + size], ceilings[i:i + size]) for i in range(0, len(payloads), size)]
        task = functools.partial(_worker_relax, settings=settings)
        context = multiprocessing.get_context("spawn")
        with _single_threaded_children():
            pool = context.Pool(min(workers, len(chunks)), initializer=_init_worker,
                                initargs=(loaded.spec,))
        rows = []
        with pool:
            for part in pool.imap(task, chunks):
                rows += part
                bar.update(len(part))
    return [RelaxResult.from_dict(row) for row in rows]


def _relax_payloads(payloads: list[dict], ceilings: list, potential, settings: dict,
                    on_result=None) -> list[RelaxResult]:
    """Relax structures given as ``Structure.as_dict()`` with :func:`structure.batched.relax_batched`."""

    structures = [Structure.from_dict(p) for p in payloads]
    ceilings = ceilings if any(c is not None for c in ceilings) else None
    return relax_batched(structures, potential, on_result=on_result, ceilings=ceilings, **settings)


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Set the OpenMP / BLAS thread counts to 1 while child processes start; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in _SINGLE_THREAD_ENV}
    os.environ.update(dict.fromkeys(_SINGLE_THREAD_ENV, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _init_worker(key: str) -> None:
    """Pool initializer: one torch thread, the potential loaded once (an error is kept, not raised, so the
    pool does not restart the worker forever; each task then raises it)."""
    import torch

    torch.set_num_threads(1)
    try:
        _WORKER["potential"] = load_potential(key)
    except Exception as err:
        _WORKER["error"] = err


def _worker_relax(chunk: tuple[list[dict], list], settings: dict) -> list[dict[str, Any]]:
    """Pool task: relax a chunk of structure dicts (with their ceilings) with the worker's potential; the
    results as dicts."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    payloads, ceilings = chunk
    return [r.as_dict() for r in _relax_payloads(payloads, ceilings, _WORKER["potential"], settings)]


# --------------------------------------------------------------------------------------------- references


#: The elemental ground states shipped with the package (scripts/make_elemental_references.py; MP, CC BY 4.0).
GROUND_STATES = Path(__file__).resolve().parent / "data" / "elemental_ground_states.json.gz"
#: eV/atom by which a template store's polymorph may lie below the shipped ground state before the element's
#: reference is marked uncertain.
REFERENCE_TOLERANCE = 0.05


@functools.lru_cache(maxsize=1)
def ground_states() -> dict[str, dict[str, Any]]:
    """``element -> {"material_id", "e_above_hull", "source", "structure"}``: MP's elemental ground states."""
    import gzip

    from structure.io import structure_from_cif

    with gzip.open(GROUND_STATES, "rt", encoding="utf-8") as fh:
        rows = json.load(fh)["ground_states"]
    return {r["element"]: {**{k: r[k] for k in ("material_id", "e_above_hull", "source")},
                           "structure": structure_from_cif(r["cif"])} for r in rows}


class ElementalReferences:
    """Elemental reference energies (eV/atom), cached in memory and JSON.

    Each element's reference is its Materials Project ground state shipped with the package
    (:data:`GROUND_STATES`) relaxed with the potential, less MP's ``e_above_hull`` of that polymorph (non-zero
    only where the structure set lacks the true ground state, e.g. Mn: 0.053), whatever the template store.
    ``candidates`` (e.g. a template store's elemental polymorphs) are relaxed too, as a check: when one lies
    more than ``tolerance`` below the ground state under this potential, the element is listed in
    :attr:`uncertain` and :meth:`notes` names it for every composition that holds it. An element without a
    shipped ground state takes the candidates' lowest converged energy, and :meth:`notes` says so.

    Args:
        potential: a :class:`~structure.potentials.Potential` or what :func:`load_potential` takes; its
            :attr:`~structure.potentials.Potential.key` keys the cache.
        candidates: ``element symbol -> structures`` (None: the ground states alone).
        cache_path: JSON file ``{potential key: {element: {"energy_per_atom": ..., ...}}}``; None for none.
        fmax, max_steps: relaxation settings.
    """

    def __init__(
        self,
        potential,
        candidates: Callable[[str], Sequence[Structure]] | None = None,
        cache_path: Path | None = None,
        fmax: float = 0.05,
        max_steps: int = 500,
        tolerance: float = REFERENCE_TOLERANCE,
    ) -> None:
        self.potential = load_potential(potential)
        self.key = self.potential.key
        self.candidates = candidates
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.fmax, self.max_steps, self.tolerance = fmax, max_steps, tolerance
        stored = self._read_cache().get(self.key, {})
        # an entry relaxed with other settings is computed again (and replaces it in the file)
        self._entries: dict[str, dict[str, Any]] = {el: e for el, e in stored.items() if "source" in e and
                                                    e.get("fmax") == fmax and e.get("max_steps") == max_steps}

    @property
    def uncertain(self) -> dict[str, str]:
        """``element -> why`` for the references computed so far that the check did not confirm."""
        return {el: e["note"] for el, e in self._entries.items() if e.get("note")}

    def energy_per_atom(self, element: str) -> float:
        """The element's reference energy per atom (relaxed on first use only).

        Raises:
            ValueError: unknown element, a ground state that does not converge, or (without one) no candidate
                that converges.
        """
        return float(self.entry(element)["energy_per_atom"])

    def entry(self, element: str) -> dict[str, Any]:
        """The cached record of an element's reference: energy, source, the check's result."""
        symbol = Element(element).symbol
        if symbol not in self._entries:
            self._entries[symbol] = self._compute(symbol)
            self._write_cache(symbol, self._entries[symbol])
        return self._entries[symbol]

    def notes(self, composition: str | Composition) -> list[str]:
        """Why the references of a composition's elements are uncertain (empty when none is)."""
        notes = (self.entry(el.symbol).get("note") for el in Composition(composition).elements)
        return [note for note in notes if note]

    def formation_energy_per_atom(self, composition: str | Composition, energy_per_atom: float) -> float:
        """``energy_per_atom - sum_el x_el * E_el`` in eV/atom, ``x_el`` the atomic fractions."""
        comp = Composition(composition)
        if comp.num_atoms <= 0:
            raise ValueError(f"empty composition {composition!r}")
        return energy_per_atom - sum(
            comp.get_atomic_fraction(el) * self.energy_per_atom(el.symbol) for el in comp.elements
        )

    def _relax(self, structures: list[Structure]) -> list[RelaxResult]:
        return relax_many(structures, self.potential, fmax=self.fmax, max_steps=self.max_steps, progress=False)

    def _store_candidates(self, symbol: str) -> list[Structure]:
        structures = list(self.candidates(symbol)) if self.candidates is not None else []
        foreign = [s.composition.reduced_formula for s in structures if {e.symbol for e in s.composition} != {symbol}]
        if foreign:
            raise ValueError(f"candidates for {symbol} must contain only {symbol}, got {', '.join(foreign)}")
        return structures

    def _compute(self, symbol: str) -> dict[str, Any]:
        """Relax the ground state (and the candidates, as the check) for ``symbol``."""
        ground = ground_states().get(symbol)
        candidates = self._store_candidates(symbol)
        results = self._relax(([ground["structure"]] if ground else []) + candidates)
        entry: dict[str, Any] = {"fmax": self.fmax, "max_steps": self.max_steps, "n_candidates": len(candidates)}
        store = results[1:] if ground else results
        converged = [r.energy_per_atom for r in store if r.status == "converged"]
        store_min = min(converged) if converged else None
        entry["store_min_energy_per_atom"] = store_min
        if ground is None:
            if store_min is None:
                summary = "; ".join(f"#{i}: {r.status} ({r.reason})" for i, r in enumerate(results)) or "none given"
                raise ValueError(f"no shipped ground state for {symbol} and no candidate structure converged: "
                                 f"{summary}")
            entry.update(energy_per_atom=store_min, source="template store (no shipped ground state)",
                         note=f"{symbol}: no shipped MP ground state, reference from the template store's lowest "
                              "polymorph")
            return entry
        own = results[0]
        if own.status != "converged":
            raise ValueError(f"the ground state of {symbol} ({ground['material_id']}) did not converge with "
                             f"{self.potential.name}: {own.status} ({own.reason})")
        energy = own.energy_per_atom - (ground["e_above_hull"] or 0.0)
        entry.update(energy_per_atom=energy, ground_state_energy_per_atom=own.energy_per_atom,
                     source=f"MP ground state {ground['material_id']}", note="")
        if store_min is not None and store_min < energy - self.tolerance:
            entry["note"] = (f"{symbol} reference uncertain: a template-store polymorph lies {energy - store_min:.3f} "
                             f"eV/atom below MP's ground state ({ground['material_id']}) under {self.potential.name}")
        return entry

    def _read_cache(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The whole JSON cache file ({} without a file)."""
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            return json.loads(self.cache_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"reference-energy cache {self.cache_path} is not valid JSON: {err}") from err

    def _write_cache(self, symbol: str, entry: dict[str, Any]) -> None:
        """Merge one entry into the file as it is now (other processes may have added some) and rewrite it."""
        if self.cache_path is None:
            return
        data = self._read_cache()
        data.setdefault(self.key, {})[symbol] = entry
        write_json(self.cache_path, data)
