"""Relax crystal structures with a matgl M3GNet potential and compute formation energies.

Potentials
    :func:`load_potential` takes a local model folder (``model.json``, ``model.pt``, ``state.pt``, e.g.
    ``../shared/models/matgl/M3GNet-MP-2021.2.8-PES``) or a matgl hub name (``M3GNet-MatPES-PBE-v2025.1-PES``
    for matgl's ``materialyze`` Hugging Face org, or an ``owner/name`` repo id). Hub names are handed to
    ``matgl.load_model`` only when the Hub answers within a few seconds; offline, a copy already in matgl's
    download cache is used, and otherwise a ``ValueError`` says so at once. (Offline, ``matgl.load_model``
    itself retries with back-off for about 45 s on a hub name, and about 20 s on a mistyped local path
    while it looks for a "did you mean" suggestion.) A string
    that exists on disk is a folder; a string that cannot be a hub name (absolute, ``./``, ``~``, several
    ``/``) or a :class:`~pathlib.Path` that does not exist raises ``FileNotFoundError``. Loaded potentials
    are cached per process, keyed by the resolved folder or the name (:func:`potential_key`). matgl reads
    the weights with ``torch.load(weights_only=True)``; nothing here unpickles files.

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
    :class:`ElementalReferences` gives each element's energy per atom. It relaxes every candidate
    structure a callable returns for that element (e.g. the elemental polymorphs of a template store) and
    keeps the lowest converged energy per atom. Values are kept in memory and, with ``cache_path``, in a
    JSON file keyed by :func:`potential_key` and element. The file is written atomically and read again
    on construction. ``formation_energy_per_atom`` is ``E/atom - sum_el x_el * E_el``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymatgen.core import Composition, Element, Structure

from evaluation.io import write_json

__all__ = [
    "MAX_VOLUME_FACTOR",
    "MIN_DISTANCE",
    "MIN_VOLUME_PER_ATOM",
    "ElementalReferences",
    "RelaxResult",
    "load_potential",
    "potential_key",
    "relax_many",
    "relax_structure",
]

#: Atoms closer than this (Å, periodic images included) mean overlapping input or an exploded result.
MIN_DISTANCE = 0.5
#: Å^3 per atom below which a cell is too dense to be a solid (the densest of the 53,164 Materials Project
#: template structures has 5.34; diamond 5.67): refused before its neighbour graph is built.
MIN_VOLUME_PER_ATOM = 2.5
#: A relaxation whose cell volume grows or shrinks by more than this factor has exploded.
MAX_VOLUME_FACTOR = 4.0
#: Seconds to wait for the Hugging Face Hub before treating a hub name as unavailable.
HUB_TIMEOUT_S = 3.0

_MODEL_FILES = ("model.json", "model.pt", "state.pt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

Status = Literal["converged", "not_converged", "failed"]


# --------------------------------------------------------------------------------------------- potentials


def potential_key(name_or_path: str | Path) -> str:
    """The string that identifies a potential: the resolved folder if it exists on disk, else the name."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def load_potential(name_or_path: str | Path):
    """Load a matgl ``Potential`` from a local model folder or a matgl hub name (cached per process).

    Raises:
        FileNotFoundError: a local path that does not exist or lacks one of the model files.
        ValueError: the model cannot be loaded, is not a potential, or is a hub name that cannot be
            downloaded (Hub unreachable and not in matgl's cache).
    """
    key = potential_key(name_or_path)
    if not Path(key).exists() and (isinstance(name_or_path, Path) or not _HUB_NAME.match(key)):
        raise FileNotFoundError(
            f"matgl model folder {key!r} does not exist (nor is it a hub name such as "
            "'M3GNet-MatPES-PBE-v2025.1-PES')"
        )
    return _load_potential_cached(key)


@functools.lru_cache(maxsize=None)
def _load_potential_cached(key: str):
    """Load the potential behind a :func:`potential_key` (an existing folder or a hub name)."""
    folder = Path(key)
    if folder.exists():
        return _load_local(folder)
    return _load_hub(key)


def _load_local(folder: Path):
    """Load a local model folder after checking it holds the three matgl model files."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file, not a matgl model folder")
    missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"matgl model folder {folder} lacks {', '.join(missing)}")
    return _matgl_load(str(folder), f"the matgl model in {folder}")


def _load_hub(name: str):
    """Load a hub name: from the Hub when it answers, else from matgl's download cache, else fail fast."""
    if _hub_reachable():
        return _matgl_load(name, f"matgl hub model {name!r}")
    cached = _cached_hub_folder(name)
    if cached is None:
        from huggingface_hub import constants
        from matgl.config import MATGL_CACHE

        raise ValueError(
            f"{name!r} is not a local model folder, the Hugging Face Hub ({constants.ENDPOINT}) cannot be "
            f"reached to download it, and it is not in matgl's cache ({MATGL_CACHE}). Pass a local folder "
            "with model.json, model.pt and state.pt instead."
        )
    return _matgl_load(str(cached), f"matgl hub model {name!r} (cached in {cached})")


def _hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers within ``HUB_TIMEOUT_S`` (False in HF offline mode)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT_S)
    except urllib.error.HTTPError:
        return True  # the server answered, if with an error status
    except (OSError, ValueError):
        return False
    return True


def _cached_hub_folder(name: str) -> Path | None:
    """The folder of a hub model already in matgl's download cache, or None (no network used)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from matgl.config import MATGL_CACHE
    from matgl.utils.io import HF_MATGL_ORG

    repo_id = name if "/" in name else f"{HF_MATGL_ORG}/{name}"
    try:
        files = [
            hf_hub_download(repo_id, fn, cache_dir=str(MATGL_CACHE), local_files_only=True) for fn in _MODEL_FILES
        ]
    except LocalEntryNotFoundError:
        return None
    return Path(files[0]).parent


def _matgl_load(source: str, what: str):
    """``matgl.load_model`` with its errors turned into a ``ValueError`` that names the cause."""
    import matgl
    from matgl.apps.pes import Potential

    try:
        model = matgl.load_model(source)
    except (ValueError, RuntimeError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"could not load {what}: {type(cause).__name__}: {cause}") from err
    if not isinstance(model, Potential):
        raise ValueError(f"{what} is a {type(model).__name__}, not an interatomic potential (matgl Potential)")
    return model


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
    """

    structure: Structure | None
    energy_per_atom: float
    status: Status
    reason: str
    steps: int
    max_force: float
    initial_volume: float
    final_volume: float

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

    Args:
        structure: the input (not modified).
        potential: a loaded matgl ``Potential``, or a folder / hub name for :func:`load_potential`.
        fmax: force threshold in eV/Å.
        max_steps: FIRE step limit.
        relax_cell: relax the cell with the positions (``FrechetCellFilter``); positions only if False.
    """
    if isinstance(potential, str | Path):
        potential = load_potential(potential)
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
        out = Relaxer(potential, optimizer=fire, relax_cell=relax_cell).relax(structure, fmax=fmax, steps=max_steps)
    final: Structure = out["final_structure"]
    energy = out["trajectory"].energies[-1] / len(final)
    forces = np.linalg.norm(fire.target.get_forces(), axis=1)
    return _classify(final, energy, forces, fire.optimizer.converged(), fire.optimizer.nsteps, fmax, initial_volume)


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


# --------------------------------------------------------------------------------------------- many structures

_WORKER: dict[str, Any] = {}


def relax_many(
    structures: Sequence[Structure],
    potential: str | Path,
    fmax: float = 0.05,
    max_steps: int = 500,
    workers: int = 1,
    progress: bool = True,
    optimizer: str = "FIRE",
    batch_size: int = 1,
    time_limit: float | None = None,
) -> list[RelaxResult]:
    """Relax structures in input order, in this process (``workers=1``) or in a spawned pool.

    Every structure goes through :func:`structure.batched.relax_batched` (the same FIRE, filter and
    convergence test as :func:`relax_structure`, whose energies it reproduces to ~1e-5 eV/atom).

    Args:
        structures: inputs; each travels as ``Structure.as_dict()`` (also when ``workers=1``).
        potential: a folder or hub name for :func:`load_potential` (a string, so workers can load it).
        fmax, max_steps: as for :func:`relax_structure`; the cell is relaxed.
        workers: number of processes; each worker is single-threaded (see the module docstring).
        progress: show a tqdm progress bar.
        optimizer: ``"FIRE"`` (matgl's ``Relaxer``), ``"LBFGS"`` or ``"BFGS"`` (:data:`structure.batched.OPTIMIZERS`).
        batch_size: structures per forward pass in each process (1: one by one).
        time_limit: seconds per structure before it stops ``not_converged`` (None: no limit; see
            :func:`structure.batched.relax_batched`).
    """
    from tqdm.auto import tqdm

    from structure.batched import OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = load_potential(potential)  # validates the name here, before any worker starts
    payloads = [s.as_dict() for s in structures]
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit must be positive, got {time_limit}")
    settings = {"fmax": fmax, "max_steps": max_steps, "optimizer": optimizer, "batch_size": batch_size,
                "time_limit": time_limit}
    with tqdm(total=len(payloads), desc="relax", unit="structure", disable=not progress) as bar:
        if workers <= 1 or len(payloads) <= 1:  # a pool is not worth starting for one structure
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # graphs of a few atoms: extra threads only contend (measured 10-40x slower)
            try:
                return _relax_payloads(payloads, loaded, settings, on_result=lambda *_: bar.update())
            finally:
                torch.set_num_threads(threads)
        size = max(1, min(batch_size, math.ceil(len(payloads) / (4 * workers))))  # >= 4 tasks per worker: balance
        chunks = [payloads[i:i + size] for i in range(0, len(payloads), size)]
        task = functools.partial(_worker_relax, settings=settings)
        context = multiprocessing.get_context("spawn")
        with _single_threaded_children():
            pool = context.Pool(min(workers, len(chunks)), initializer=_init_worker,
                                initargs=(potential_key(potential),))
        rows = []
        with pool:
            for part in pool.imap(task, chunks):
                rows += part
                bar.update(len(part))
    return [RelaxResult.from_dict(row) for row in rows]


def _relax_payloads(payloads: list[dict], potential, settings: dict, on_result=None) -> list[RelaxResult]:
    """Relax structures given as ``Structure.as_dict()`` with :func:`structure.batched.relax_batched`."""
    from structure.batched import relax_batched

    structures = [Structure.from_dict(p) for p in payloads]
    return relax_batched(structures, potential, on_result=on_result, **settings)


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


def _worker_relax(payloads: list[dict], settings: dict) -> list[dict[str, Any]]:
    """Pool task: relax a chunk of structure dicts with the worker's potential; the results as dicts."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    return [r.as_dict() for r in _relax_payloads(payloads, _WORKER["potential"], settings)]


# --------------------------------------------------------------------------------------------- references


class ElementalReferences:
    """Elemental reference energies (eV/atom) from relaxed candidate structures, cached in memory and JSON.

    Args:
        potential: folder or hub name of the potential (also the cache key, via :func:`potential_key`).
        candidates: ``element symbol -> structures`` to relax for that element (e.g. its known polymorphs).
        cache_path: JSON file ``{potential_key: {element: {"energy_per_atom": ..., ...}}}``; None for none.
        fmax, max_steps: relaxation settings for the candidates.
    """

    def __init__(
        self,
        potential: str | Path,
        candidates: Callable[[str], Sequence[Structure]],
        cache_path: Path | None = None,
        fmax: float = 0.05,
        max_steps: int = 500,
    ) -> None:
        self.potential = potential
        self.key = potential_key(potential)
        self.candidates = candidates
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.fmax = fmax
        self.max_steps = max_steps
        stored = self._read_cache().get(self.key, {})
        self._energies: dict[str, float] = {el: float(entry["energy_per_atom"]) for el, entry in stored.items()}

    def energy_per_atom(self, element: str) -> float:
        """Lowest converged energy per atom over the element's candidates (relaxed on first use only).

        Raises:
            ValueError: unknown element, no candidates, a candidate of another composition, or none converged.
        """
        symbol = Element(element).symbol
        if symbol not in self._energies:
            self._energies[symbol] = self._compute(symbol)
        return self._energies[symbol]

    def formation_energy_per_atom(self, composition: str | Composition, energy_per_atom: float) -> float:
        """``energy_per_atom - sum_el x_el * E_el`` in eV/atom, ``x_el`` the atomic fractions."""
        comp = Composition(composition)
        if comp.num_atoms <= 0:
            raise ValueError(f"empty composition {composition!r}")
        return energy_per_atom - sum(
            comp.get_atomic_fraction(el) * self.energy_per_atom(el.symbol) for el in comp.elements
        )

    def _compute(self, symbol: str) -> float:
        """Relax the candidates for ``symbol``, keep the lowest converged energy, store it in the cache."""
        structures = list(self.candidates(symbol))
        if not structures:
            raise ValueError(f"no candidate structures for {symbol}: the candidates callable returned none")
        foreign = [s.composition.reduced_formula for s in structures if {e.symbol for e in s.composition} != {symbol}]
        if foreign:
            raise ValueError(f"candidates for {symbol} must contain only {symbol}, got {', '.join(foreign)}")
        results = relax_many(structures, self.potential, fmax=self.fmax, max_steps=self.max_steps, progress=False)
        converged = [r.energy_per_atom for r in results if r.status == "converged"]
        if not converged:
            summary = "; ".join(f"#{i}: {r.status} ({r.reason})" for i, r in enumerate(results))
            raise ValueError(f"none of the {len(results)} candidate structures for {symbol} converged: {summary}")
        energy = min(converged)
        entry = {
            "energy_per_atom": energy,
            "n_candidates": len(results),
            "n_converged": len(converged),
            "fmax": self.fmax,
            "max_steps": self.max_steps,
        }
        self._write_cache(symbol, entry)
        return energy

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
