"""Interatomic potentials as plugins: one :class:`Potential` object per model, whatever its package.

Every relaxation and energy in the toolkit goes through a :class:`Potential`: a name, an ASE calculator factory,
the energy scale its training data set, and (for matgl models) a batched forward pass. One relaxation loop
(:mod:`structure.batched`: ASE optimizers, ``FrechetCellFilter``) serves them all.

Names (:data:`POTENTIALS`; ``composition-gen potentials`` lists them, with whether each is installed)

``chgnet``
    CHGNet 0.3.0 (Deng et al. 2023; BSD-3), weights inside the ``chgnet`` wheel. Trained on MPtrj's energies
    *with* MP2020 corrections (its NaCl is 0.28 eV/atom below M3GNet's and SevenNet's, half MP2020's Cl
    correction; Matbench Discovery applies none to it), so no correction is added: scale ``mp-corrected``.
``sevennet-0`` / ``sevennet-l3i5``
    SevenNet-0 (11 Jul 2024) and SevenNet-l3i5 (Park et al. 2024), weights inside the ``sevenn`` wheel (a core
    dependency: SevenNet-l3i5 judges the default scheme), whose licence file (MIT, (c) 2024 Yutack Park) covers
    the package and the checkpoints it carries. Trained on MPtrj's *uncorrected* energies: scale
    ``mp-uncorrected`` (MP2020 corrections are added, as Matbench Discovery does).
``nequix-mp-1``
    Nequix MP-1 (Koker et al. 2025; MIT code, CC BY 4.0 weights) on JAX's CPU backend (its PyTorch backend
    imports JAX too, and its kernels need a GPU), optional: ``pip install "composition-gen[nequix]"``. Its
    weights are in the atomicarchitects/nequix repository, not in the wheel, and nequix downloads them on first
    use; here they are read from nequix's cache (``~/.cache/nequix/models/nequix-mp-1.nqx``, or the path in
    :data:`NEQUIX_WEIGHTS`) and never downloaded, so a missing file is a clear error. Its relaxed NaCl lies
    where SevenNet's does (-3.385 eV/atom, CHGNet's -3.668): scale ``mp-uncorrected``. The first structure of
    each size costs a JIT compilation (about 17 CPU-s on a 2-core AVX2 EPYC).
``m3gnet``
    M3GNet-MP-2021.2.8 (Chen & Ong 2022; BSD-3) through matgl: scale ``mp-uncorrected``. Its weights do not
    come with matgl's wheel: the name loads them from matgl's download cache or hub, and a local folder
    (``--potential ../shared/models/matgl/M3GNet-MP-2021.2.8-PES``) works offline.

Any other string is a matgl model folder (``model.json``, ``model.pt``, ``state.pt``) or a matgl hub name
(:func:`load_matgl`); its scale is ``matpes-pbe`` when the name or its README says MatPES, else
``mp-uncorrected``. From Python, :meth:`Potential.from_calculator` wraps a user's own ASE ``Calculator``
with the scale the user states.

Energy scales
    ``mp-uncorrected`` and ``mp-corrected`` both sit on Materials Project's GGA/GGA+U scale, the first before
    and the second after the MP2020 corrections; :attr:`Potential.correction` says which correction
    :mod:`structure.stability` adds (``mp2020`` or ``none``). ``matpes-pbe`` (MatPES, r2SCAN or plain PBE
    data) is another scale: :class:`structure.stability.StabilityScorer` refuses it against the MP hull.

Safety: every checkpoint is read with ``torch.load(weights_only=True)``. SevenNet's checkpoints hold numpy
arrays in their config, so its loader allows numpy's array and dtype reconstructors and nothing else; no file
is unpickled with arbitrary globals.

Loaded models are cached per process by :attr:`Potential.key`; a :class:`Potential` made from a name or
path is rebuilt in worker processes from that name (:meth:`Potential.spec`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_JUDGES", "DEFAULT_POTENTIAL", "ENERGY_SCALES", "POTENTIALS", "MissingExtraError", "Potential",
           "PotentialSpec", "get_potential", "load_matgl", "potential_key"]

#: Energy scales a potential can sit on (see the module docstring).
ENERGY_SCALES = ("mp-uncorrected", "mp-corrected", "matpes-pbe")
#: Seconds to wait for the Hugging Face Hub before treating a matgl hub name as unavailable.
HUB_TIMEOUT_S = 3.0
_MODEL_FILES = ("model.json", "model.pt", "state.pt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class MissingExtraError(ImportError, ValueError):
    """A registered potential whose package is not installed; the message names the pip extra. A ``ValueError``
    too, so the console script reports it in one line."""


@dataclass(frozen=True)
class PotentialSpec:
    """A registered name: what it is, which package (pip extra) carries its weights, its energy scale, and the
    published Matbench Discovery figures (WBM unique prototypes) for the record."""

    name: str
    description: str
    package: str  # the importable module that must be installed
    extra: str  # pip install "composition-gen[EXTRA]"; "" when a core dependency brings it
    energy_scale: str
    licence: str
    published: str
    loader: Callable[[], Callable[[], object]]  # returns a calculator factory (the model loaded once)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


# --------------------------------------------------------------------------------------------- loaders


def _chgnet_factory():
    """CHGNet 0.3.0 from the checkpoint inside the ``chgnet`` wheel, read with ``weights_only=True``."""
    import torch
    from chgnet.model.dynamics import CHGNetCalculator
    from chgnet.model.model import CHGNet

    import chgnet

    path = Path(chgnet.__file__).parent / "pretrained" / "0.3.0" / "chgnet_0.3.0_e29f68s314m37.pth.tar"
    if not path.is_file():
        raise FileNotFoundError(f"the chgnet package has no CHGNet 0.3.0 checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet.from_dict(state["model"], version="0.3.0")
    model.eval()

    def factory():
        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its device for every calculator
            return CHGNetCalculator(model=model, use_device="cpu", stress_weight=1 / 160.21766208)

    return factory


_SEVENNET_CHECKPOINTS = {"sevennet-0": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
                         "sevennet-l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth"}


def _numpy_globals() -> list:
    """The numpy reconstructors a SevenNet checkpoint's config needs (arrays, dtypes, scalars), for
    ``torch.serialization.safe_globals``: data types only, nothing that runs code."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [(core._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            (core.scalar, "numpy.core.multiarray.scalar"), *[type(np.dtype(c)) for c in "fdilqbBh?"]]


def _sevennet_factory(name: str):
    """A SevenNet checkpoint inside the ``sevenn`` wheel, read with ``weights_only=True``."""
    import torch
    from sevenn import checkpoint as sevenn_checkpoint
    from sevenn.calculator import SevenNetCalculator

    import sevenn

    path = Path(sevenn.__file__).parent / "pretrained_potentials" / _SEVENNET_CHECKPOINTS[name]
    if not path.is_file():
        raise FileNotFoundError(f"the sevenn package has no {name} checkpoint at {path}")

    def safe_load(file, weights_only=True, map_location="cpu"):  # sevenn asks for weights_only=False
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)

    original = sevenn_checkpoint.torch_load
    sevenn_checkpoint.torch_load = safe_load
    try:
        cp = sevenn_checkpoint.SevenNetCheckpoint(str(path))
        model = cp.build_model()
        config = cp.config
    finally:
        sevenn_checkpoint.torch_load = original
    model.set_is_batch_data(False)
    model.eval()

    def factory():
        with warnings.catch_warnings():  # "no tensor product accelerator": CPU-only here, said once per structure
            warnings.filterwarnings("ignore", message="No tensor product accelerator")
            return SevenNetCalculator(model=model, file_type="model_instance", device="cpu", sevennet_config=config)

    return factory


#: Where the ``nequix-*`` names read their weights (nequix's own download cache); a ``.nqx`` file per name.
NEQUIX_WEIGHTS = Path("~/.cache/nequix/models")
_NEQUIX_SOURCE = "https://github.com/atomicarchitects/nequix/tree/main/models"


def _nequix_factory(name: str):
    """A Nequix model on JAX's CPU backend from ``NEQUIX_WEIGHTS/<name>.nqx`` (a JSON line and equinox arrays:
    nothing is unpickled), loaded once; each structure gets a shallow copy of the calculator sharing the model."""
    import copy

    from nequix.calculator import NequixCalculator

    path = NEQUIX_WEIGHTS.expanduser() / f"{name}.nqx"
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no weights at {path}; nothing is downloaded here: fetch {name}.nqx from "
                                f"{_NEQUIX_SOURCE} (CC BY 4.0) and put it there")
    with contextlib.redirect_stdout(io.StringIO()):
        calc = NequixCalculator(model_path=str(path), backend="jax", use_kernel=False)

    def factory():
        fresh = copy.copy(calc)
        fresh.results, fresh.atoms = {}, None
        return fresh

    return factory


def _m3gnet_factory(source: str):
    def load():
        model = load_matgl(source)
        return _matgl_calculator_factory(model)

    return load


def _matgl_calculator_factory(model):
    def factory():
        from matgl.ext.ase import PESCalculator

        return PESCalculator(model, stress_unit="eV/A3")

    factory.matgl_model = model
    return factory


#: The registered names (see the module docstring); Matbench Discovery figures are F1 / MAE (eV/atom) on WBM.
POTENTIALS: dict[str, PotentialSpec] = {
    "chgnet": PotentialSpec("chgnet", "CHGNet 0.3.0 (MPtrj)", "chgnet", "", "mp-corrected", "BSD-3-Clause",
                            "F1 0.613, MAE 0.063", _chgnet_factory),
    "sevennet-0": PotentialSpec("sevennet-0", "SevenNet-0, 11 Jul 2024 (MPtrj)", "sevenn", "",
                                "mp-uncorrected", "MIT", "F1 0.724, MAE 0.048",
                                functools.partial(_sevennet_factory, "sevennet-0")),
    "sevennet-l3i5": PotentialSpec("sevennet-l3i5", "SevenNet-l3i5 (MPtrj)", "sevenn", "",
                                   "mp-uncorrected", "MIT", "F1 0.760, MAE 0.044",
                                   functools.partial(_sevennet_factory, "sevennet-l3i5")),
    "nequix-mp-1": PotentialSpec("nequix-mp-1", "Nequix MP-1 (MPtrj) on JAX (weights from nequix's cache, not "
                                 "downloaded)", "nequix", "nequix", "mp-uncorrected", "MIT / CC BY 4.0",
                                 "F1 0.751", functools.partial(_nequix_factory, "nequix-mp-1")),
    "m3gnet": PotentialSpec("m3gnet", "M3GNet-MP-2021.2.8 via matgl (weights from matgl's cache or hub, or pass "
                            "the model folder)", "matgl", "", "mp-uncorrected", "BSD-3-Clause",
                            "F1 0.569, MAE 0.075", _m3gnet_factory("M3GNet-MP-2021.2.8-PES")),
}
#: What relaxes without ``--potential``: installed with the package (benchmarks/stability_wbm.md).
DEFAULT_POTENTIAL = "chgnet"
#: What judges the relaxed structures in ``stability`` and ``discover`` when neither ``--potential`` nor ``--judge``
#: is given: a single point of a stronger model on CHGNet's relaxed structure (two-stage; chosen on the WBM
#: calibration within the cost budget, benchmarks/stability_wbm.md).
DEFAULT_JUDGES = ("sevennet-l3i5",)


# --------------------------------------------------------------------------------------------- the object


class Potential:
    """A loaded interatomic potential: ``calculator()`` gives a fresh ASE calculator on the shared model.

    Build one with :func:`get_potential` (a name, a matgl folder or hub name) or :meth:`from_calculator`.

    >>> from structure.potentials import get_potential
    >>> pot = get_potential("chgnet")  # doctest: +SKIP
    >>> pot.name, pot.energy_scale, pot.correction  # doctest: +SKIP
    ('chgnet', 'mp-corrected', 'none')
    """

    def __init__(self, name: str, key: str, energy_scale: str, factory: Callable[[], object],
                 matgl_model=None, spec: str | None = None):
        if energy_scale not in ENERGY_SCALES:
            raise ValueError(f"energy_scale must be one of {', '.join(ENERGY_SCALES)}, got {energy_scale!r}")
        self.name, self.key, self.energy_scale = name, key, energy_scale
        self._factory, self.matgl_model, self._spec = factory, matgl_model, spec

    def __repr__(self) -> str:
        return f"Potential({self.name!r}, energy_scale={self.energy_scale!r})"

    @property
    def correction(self) -> str:
        """``mp2020`` for a potential trained on MP's uncorrected energies, else ``none``."""
        return "mp2020" if self.energy_scale == "mp-uncorrected" else "none"

    @property
    def spec(self) -> str | None:
        """The name or path that rebuilds this potential in another process (None: a user's calculator)."""
        return self._spec

    def calculator(self):
        """A new ASE calculator (each structure in flight gets its own; the model is shared)."""
        return self._factory()

    def evaluate(self, atoms_list: Sequence) -> None:
        """Energy, forces and stress of each ``ase.Atoms`` (each carrying a calculator of this potential),
        left in its calculator's results: one batched forward pass for a matgl model, else one call each."""
        if self.matgl_model is not None and len(atoms_list) > 1:
            _matgl_batch(self.matgl_model, atoms_list)
            return
        for atoms in atoms_list:
            atoms.calc.calculate(atoms, ["energy", "forces", "stress"], _ALL_CHANGES)

    @classmethod
    def from_calculator(cls, calculator, energy_scale: str, name: str = "custom") -> Potential:
        """Wrap a user's ASE ``Calculator`` (shared by every structure: relax in one process, ``workers=1``).
        ``energy_scale``: one of :data:`ENERGY_SCALES` (what its training energies were)."""
        return cls(name, f"calculator:{name}:{id(calculator)}", energy_scale, lambda: calculator)


_ALL_CHANGES = ("positions", "numbers", "cell", "pbc", "initial_charges", "initial_magmoms")


def _matgl_batch(model, atoms_list: Sequence) -> None:
    """One batched matgl forward pass; each structure's energy, forces and stress stored in its calculator."""
    import numpy as np
    import torch
    from ase.stress import full_3x3_to_voigt_6_stress
    from torch_geometric.data import Batch

    graphs, lattices, states = [], [], []
    for atoms in atoms_list:
        graph, lattice, state = atoms.calc._atoms2graph.get_graph(atoms)
        graphs.append(graph)
        lattices.append(torch.as_tensor(lattice).reshape(1, 3, 3))
        states.append(torch.as_tensor(np.asarray(state)).reshape(1, -1))
    batch = Batch.from_data_list(graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        energies, forces, stresses = model(batch, torch.cat(lattices), torch.cat(states))[:3]
    energies = energies.detach().cpu().numpy().reshape(-1)
    forces = forces.detach().cpu().numpy()
    stresses = stresses.detach().cpu().numpy().reshape(len(atoms_list), 3, 3)
    start = 0
    for k, atoms in enumerate(atoms_list):
        n = len(atoms)
        calc = atoms.calc
        calc.atoms = atoms.copy()
        calc.results = {"energy": float(energies[k]), "free_energy": float(energies[k]),
                        "forces": forces[start:start + n].copy(),
                        "stress": full_3x3_to_voigt_6_stress(stresses[k]) * calc.conversion_factor}
        start += n


# --------------------------------------------------------------------------------------------- lookup


def potential_key(name_or_path: str | Path) -> str:
    """The string that identifies a potential: the resolved folder if it exists on disk, else the name."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def get_potential(potential=None) -> Potential:
    """A :class:`Potential` from a registered name (:data:`POTENTIALS`), a matgl model folder or hub name, a
    :class:`Potential` (returned as is) or None (:data:`DEFAULT_POTENTIAL`). Cached per process.

    Raises:
        MissingExtraError: a registered name whose package is not installed (the message names the pip extra).
        FileNotFoundError: a path that does not exist, or a folder without a model's files.
        ValueError: a model that cannot be loaded, or an unknown name that is not a reachable hub model.
    """
    if isinstance(potential, Potential):
        return potential
    if potential is not None and not isinstance(potential, str | Path):
        raise TypeError(f"a potential is a name, a folder or a Potential, got {type(potential).__name__}; wrap an "
                        "ASE calculator with Potential.from_calculator(calc, energy_scale=...)")
    if potential is None:
        potential = DEFAULT_POTENTIAL
    if isinstance(potential, str) and potential.lower() in POTENTIALS:
        return _registered(potential.lower())
    key = potential_key(potential)
    if _neither_folder_nor_hub_name(potential, key):
        raise FileNotFoundError(f"potential {key!r} is neither a registered name ({', '.join(POTENTIALS)}) nor an "
                                "existing matgl model folder")
    return _matgl_potential(key)


def _neither_folder_nor_hub_name(name_or_path: str | Path, key: str) -> bool:
    """A path that does not exist and cannot be a hub name either (absolute, ``./``, several ``/``, a Path)."""
    return not Path(key).exists() and (isinstance(name_or_path, Path) or not _HUB_NAME.match(key))


@functools.lru_cache(maxsize=None)
def _registered(name: str) -> Potential:
    spec = POTENTIALS[name]
    if not spec.installed():
        extra = f'pip install "composition-gen[{spec.extra}]"' if spec.extra else f"pip install {spec.package}"
        raise MissingExtraError(f"potential {name!r} needs the {spec.package!r} package: {extra}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factory = spec.loader()
    return Potential(name, name, spec.energy_scale, factory, getattr(factory, "matgl_model", None), spec=name)


@functools.lru_cache(maxsize=None)
def _matgl_potential(key: str) -> Potential:
    model = load_matgl(key)
    factory = _matgl_calculator_factory(model)
    return Potential(Path(key).name or key, key, _matgl_scale(key), factory, model, spec=key)


def _matgl_scale(key: str) -> str:
    """``matpes-pbe`` for a MatPES model (its name or README says so), else ``mp-uncorrected``."""
    readme = Path(key) / "README.md"
    text = key + (readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else "")
    return "matpes-pbe" if "matpes" in text.lower() else "mp-uncorrected"


# --------------------------------------------------------------------------------------------- matgl


def load_matgl(name_or_path: str | Path):
    """A matgl ``Potential`` from a local model folder or a matgl hub name (cached per process).

    Hub names go to ``matgl.load_model`` only when the Hub answers within ``HUB_TIMEOUT_S``; offline, a copy
    in matgl's download cache is used, and otherwise a ``ValueError`` says so at once (``matgl.load_model``
    itself retries for about 45 s). matgl reads weights with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: a local path that does not exist or lacks one of the model files.
        ValueError: the model cannot be loaded, is not a potential, or is a hub name that cannot be downloaded.
    """
    key = potential_key(name_or_path)
    if _neither_folder_nor_hub_name(name_or_path, key):
        raise FileNotFoundError(f"matgl model folder {key!r} does not exist (nor is it a hub name such as "
                                "'M3GNet-MatPES-PBE-v2025.1-PES')")
    return _load_matgl_cached(key)


@functools.lru_cache(maxsize=None)
def _load_matgl_cached(key: str):
    folder = Path(key)
    if folder.exists():
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is a file, not a matgl model folder")
        missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"matgl model folder {folder} lacks {', '.join(missing)}")
        return _matgl_load(str(folder), f"the matgl model in {folder}")
    if _hub_reachable():
        return _matgl_load(key, f"matgl hub model {key!r}")
    cached = _cached_hub_folder(key)
    if cached is None:
        from huggingface_hub import constants
        from matgl.config import MATGL_CACHE

        raise ValueError(
            f"{key!r} is not a local model folder, the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"to download it, and it is not in matgl's cache ({MATGL_CACHE}). Pass a local folder with model.json, "
            f"model.pt and state.pt, or a potential installed with the package ({', '.join(POTENTIALS)})."
        )
    return _matgl_load(str(cached), f"matgl hub model {key!r} (cached in {cached})")


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
        files = [hf_hub_download(repo_id, fn, cache_dir=str(MATGL_CACHE), local_files_only=True)
                 for fn in _MODEL_FILES]
    except LocalEntryNotFoundError:
        return None
    return Path(files[0]).parent


def _matgl_load(source: str, what: str):
    """``matgl.load_model`` with its errors turned into a ``ValueError`` that names the cause."""
    import matgl
    from matgl.apps.pes import Potential as MatglPotential

    try:
        model = matgl.load_model(source)
    except (ValueError, RuntimeError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"could not load {what}: {type(cause).__name__}: {cause}") from err
    if not isinstance(model, MatglPotential):
        raise ValueError(f"{what} is a {type(model).__name__}, not an interatomic potential (matgl Potential)")
    return model
