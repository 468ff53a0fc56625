"""Crystals as periodic graphs for CDVAE.

* :func:`load_crystals` reads a CDVAE-style CSV (``cif`` column), brings every structure to CDVAE's
  canonical form (Niggli-reduced cell, lattice rebuilt from its lengths and angles so that the same
  cell always gets the same orientation) and caches the packed arrays as safetensors + JSON, keyed by
  the file's content hash, so the second load takes a fraction of a second.
* :class:`Crystals` holds them; ``crystals[i]`` is a ``torch_geometric`` ``Data`` and
  :func:`collate` batches a list of them.
* :func:`lattice_matrix` turns lengths + angles into row-vector lattices (pymatgen's convention).
* :func:`periodic_edges` finds every neighbour within a cutoff across periodic boundaries (with the
  integer lattice offset of the image), optionally keeping only the nearest ``max_neighbors`` of each
  atom; :func:`edge_vectors` turns those edges into Cartesian vectors ``x_j + offset @ L - x_i``.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.io import atomic_path, write_json

MAX_Z = 100  # elements H..Fm; atom type t is element Z = t + 1


def sigma_levels(begin: float, end: float, n: int) -> torch.Tensor:
    """``n`` geometric noise levels from ``begin`` down to ``end``."""
    return torch.exp(torch.linspace(math.log(begin), math.log(end), n))


CACHE_VERSION = 1
MAX_IMAGES = 3  # at most this many periodic images per direction and side (documented cap)
TIE_TOLERANCE = 1e-3  # Å: neighbours this close to the max_neighbors-th one are kept with it


# ---------------------------------------------------------------------------------------- lattices
def lattice_matrix(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) lengths in Å and (B, 3) angles in degrees → (B, 3, 3) lattices whose rows are the vectors
    a, b, c, oriented as pymatgen's ``Lattice.from_parameters``."""
    a, b, c = lengths.unbind(-1)
    rad = torch.deg2rad(angles)
    cos, sin = torch.cos(rad), torch.sin(rad)
    val = ((cos[:, 0] * cos[:, 1] - cos[:, 2]) / (sin[:, 0] * sin[:, 1])).clamp(-1.0, 1.0)
    gamma_star = torch.arccos(val)
    zero = torch.zeros_like(a)
    va = torch.stack([a * sin[:, 1], zero, a * cos[:, 1]], -1)
    vb = torch.stack([-b * sin[:, 0] * torch.cos(gamma_star), b * sin[:, 0] * torch.sin(gamma_star), b * cos[:, 0]], -1)
    vc = torch.stack([zero, zero, c], -1)
    return torch.stack([va, vb, vc], 1)


MIN_VOLUME_FACTOR = 0.2  # a sampled cell's volume / (a b c) at least this (MP-20's Niggli cells: 0.71 or more)


def volume_factor(angles: torch.Tensor) -> torch.Tensor:
    """(B,) V / (a b c) of cells with (B, 3) angles in degrees: sqrt(1 - cos²α - cos²β - cos²γ + 2 cosα cosβ
    cosγ); 0 where the three angles make no cell (e.g. all three 150°)."""
    ca, cb, cg = torch.cos(torch.deg2rad(angles)).unbind(-1)
    return (1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg).clamp(min=0.0).sqrt()


def valid_cell_angles(angles: torch.Tensor, min_factor: float = MIN_VOLUME_FACTOR) -> torch.Tensor:
    """``angles`` (B, 3, degrees) with each triple that makes no cell, or one flatter than ``min_factor``
    (:func:`volume_factor`), pulled toward 90° (90 + t (angles - 90), the largest t of 1, 1/2, ... 1/64 that
    passes, else 0: right angles); other triples unchanged. A predicted lattice can ask for an impossible
    triple, and a flat cell has no inverse to search neighbours with."""
    out = angles.clone()
    bad = ~(volume_factor(out) >= min_factor)  # NaN angles too
    for t in [0.5 ** k for k in range(1, 7)] + [0.0]:
        if not bad.any():
            break
        trial = 90.0 + t * (angles[bad] - 90.0)
        trial = torch.where(torch.isfinite(trial), trial, torch.full_like(trial, 90.0))
        out[bad] = trial
        bad = ~(volume_factor(out) >= min_factor)
    return out


def cell_volume(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(B,) cell volumes in Å³ of (B, 3) lengths (Å) and angles (degrees)."""
    return torch.linalg.det(lattice_matrix(lengths, angles)).abs()


def lattice_parameters(lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`lattice_matrix` (up to orientation): (B, 3, 3) → lengths, angles (degrees)."""
    lengths = lattice.norm(dim=-1)
    a, b, c = lattice.unbind(1)

    def angle(u, v, nu, nv):
        return torch.rad2deg(torch.arccos(((u * v).sum(-1) / (nu * nv)).clamp(-1.0, 1.0)))

    angles = torch.stack([angle(b, c, lengths[:, 1], lengths[:, 2]), angle(a, c, lengths[:, 0], lengths[:, 2]),
                          angle(a, b, lengths[:, 0], lengths[:, 1])], -1)
    return lengths, angles


# ------------------------------------------------------------------------------------------- edges
def _pairs(num_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair (i, j) of atoms within the same crystal (i == j included): atom indices into
    the flat batch and the crystal of each pair."""
    device = num_atoms.device
    first = torch.cumsum(num_atoms, 0) - num_atoms
    n_pairs = num_atoms * num_atoms
    crystal = torch.repeat_interleave(torch.arange(len(num_atoms), device=device), n_pairs)
    local = torch.arange(int(n_pairs.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n_pairs, 0) - n_pairs, n_pairs)
    n = num_atoms[crystal]
    return first[crystal] + local // n, first[crystal] + local % n, crystal


@torch.no_grad()
def periodic_edges(frac: torch.Tensor, lattice: torch.Tensor, num_atoms: torch.Tensor, cutoff: float,
                   max_neighbors: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours within ``cutoff`` Å under periodic boundary conditions.

    ``frac`` (N, 3) fractional coordinates of all atoms of a batch, ``lattice`` (B, 3, 3), ``num_atoms``
    (B,). Returns ``edge_index`` (2, E) as (source j, target i) and ``offsets`` (E, 3), the integer
    lattice translation of the image of j, so that the vector from i to that image is
    ``x_j + offsets @ L - x_i``. An atom's own images are neighbours; the atom itself is not. With
    ``max_neighbors``, each atom keeps its nearest ones, and every further one within
    :data:`TIE_TOLERANCE` of the last kept (a hard cut through equidistant neighbours would break
    rotation and permutation symmetry). The images searched per
    direction cover the cutoff, capped at :data:`MAX_IMAGES` on each side (cells thinner than
    cutoff / 3 see fewer neighbours than the cutoff allows).
    """
    frac = frac - torch.floor(frac)
    # images needed per direction: cutoff / (spacing of lattice planes) = cutoff * |row of inv(L)^T|, per
    # crystal; crystals needing the same images are searched together (one thin cell no longer makes the
    # whole batch search its many images)
    recip = torch.linalg.inv(lattice).transpose(1, 2).norm(dim=-1)  # (B, 3): 1 / plane spacings
    reach = torch.ceil(cutoff * recip).clamp(max=MAX_IMAGES).long()
    i, j, crystal = _pairs(num_atoms)
    parts = []
    for r in torch.unique(reach, dim=0):
        pairs = (reach[crystal] == r).all(-1).nonzero(as_tuple=True)[0]
        grids = [torch.arange(-int(x), int(x) + 1, device=frac.device, dtype=frac.dtype) for x in r]
        images = torch.cartesian_prod(*grids)  # (I, 3)
        pi, pj, lat = i[pairs], j[pairs], lattice[crystal[pairs]]
        base = torch.einsum("pk,pkl->pl", frac[pj] - frac[pi], lat)  # (P, 3)
        shift = torch.einsum("ik,pkl->pil", images, lat)  # (P, I, 3)
        dist2 = ((base[:, None] + shift) ** 2).sum(-1)  # (P, I)
        self_image = (pi == pj)[:, None] & (images.abs().sum(-1) == 0)[None]
        p, k = ((dist2 < cutoff * cutoff) & ~self_image).nonzero(as_tuple=True)
        parts.append((pj[p], pi[p], images[k], dist2[p, k].sqrt()))
    src, dst, offsets, d = (torch.cat(x) for x in zip(*parts)) if parts else (
        i[:0], i[:0], frac.new_zeros((0, 3)), frac.new_zeros(0))
    if max_neighbors is not None and len(d):
        order = torch.argsort(dst.double() * (2 * cutoff + 1) + d.double())
        src, dst, offsets, d = src[order], dst[order], offsets[order], d[order]
        counts = torch.bincount(dst, minlength=len(frac))
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(dst), device=dst.device) - start[dst]
        # the distance of each atom's max_neighbors-th neighbour; every edge up to it (plus a tolerance)
        # stays, so symmetric ties (an atom's own images at +a and -a) are kept or dropped together
        kth = torch.full((len(frac),), float("inf"), dtype=d.dtype, device=d.device)
        at_k = rank == max_neighbors - 1
        kth[dst[at_k]] = d[at_k]
        sel = d <= kth[dst] + TIE_TOLERANCE
        src, dst, offsets = src[sel], dst[sel], offsets[sel]
    return torch.stack([src, dst]), offsets


def edge_vectors(frac: torch.Tensor, lattice: torch.Tensor, batch: torch.Tensor, edge_index: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
    """Cartesian vectors from each edge's target i to its source image j: ``x_j + offsets @ L - x_i``."""
    src, dst = edge_index
    lat = lattice[batch[dst]]
    return torch.einsum("ek,ekl->el", frac[src] - frac[dst] + offsets, lat)


def min_image_displacement(frac_from: torch.Tensor, frac_to: torch.Tensor, lattice: torch.Tensor,
                           batch: torch.Tensor) -> torch.Tensor:
    """Shortest Cartesian vector from each atom at ``frac_from`` to the images of ``frac_to`` (searched
    over the 27 neighbouring cells after wrapping the fractional difference to [-0.5, 0.5))."""
    diff = frac_to - frac_from
    diff = diff - torch.round(diff)
    images = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0], device=diff.device, dtype=diff.dtype)] * 3)
    lat = lattice[batch]
    cand = torch.einsum("nik,nkl->nil", diff[:, None] + images[None], lat)  # (N, 27, 3)
    best = cand.norm(dim=-1).argmin(1)
    return cand[torch.arange(len(diff), device=diff.device), best]


# ------------------------------------------------------------------------------------------ crystals
@dataclass
class CrystalBatch:
    """A batch of crystals: atoms of all crystals stacked, ``batch`` maps each atom to its crystal."""

    frac: torch.Tensor
    types: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor
    num_atoms: torch.Tensor
    batch: torch.Tensor
    conditions: torch.Tensor | None = None  # (B, P) property conditions (bin ids or ranks), when conditioned
    edges: tuple[torch.Tensor, torch.Tensor] | None = None  # the crystals' own graph, when cached


@dataclass
class GraphCache:
    """Every crystal's periodic graph (:func:`periodic_edges`), computed once: atom indices local to their
    crystal, image offsets, and where each crystal's edges start. The encoder reads clean crystals, whose
    graphs never change; the decoder's noisy ones are rebuilt every step."""

    cutoff: float
    max_neighbors: int | None
    src: torch.Tensor
    dst: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self):
        self.first = torch.cumsum(self.counts, 0) - self.counts

    def gather(self, rows: torch.Tensor, num_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The edges of crystals ``rows`` batched in that order (atoms renumbered as in the batch)."""
        counts = self.counts[rows]
        edges = torch.repeat_interleave(self.first[rows], counts) + torch.arange(int(counts.sum())) - \
            torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        shift = torch.repeat_interleave(torch.cumsum(num_atoms, 0) - num_atoms, counts)
        return torch.stack([self.src[edges] + shift, self.dst[edges] + shift]), self.offsets[edges]


@dataclass
class Crystals:
    """Packed crystals: ``frac`` (N, 3), ``types`` (N,) atomic numbers, ``lengths``/``angles`` (B, 3),
    ``num_atoms`` (B,), ``ids`` and, when the CSV has it, a ``property`` per crystal (NaN if missing)."""

    frac: torch.Tensor
    types: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor
    num_atoms: torch.Tensor
    ids: list[str]
    conditions: torch.Tensor | None = None  # (B, P) property conditions, set by the trainer when conditioned
    properties: torch.Tensor | None = None  # (B, P) raw property values (NaN = missing), when read

    def __post_init__(self):
        self.first = torch.cumsum(self.num_atoms, 0) - self.num_atoms
        self.graphs: GraphCache | None = None

    def cache_graphs(self, cutoff: float, max_neighbors: int | None, chunk: int = 512) -> GraphCache:
        """Compute every crystal's periodic graph once (:class:`GraphCache`); :meth:`batch` then hands
        the batch's edges to the encoder instead of having it search for them every step."""
        src, dst, offsets, counts = [], [], [], []
        for start in range(0, len(self), chunk):
            rows = torch.arange(start, min(start + chunk, len(self)))
            b = self.batch(rows)
            lattice = lattice_matrix(b.lengths, b.angles)
            (s, d), off = periodic_edges(b.frac, lattice, b.num_atoms, cutoff, max_neighbors)
            local = (torch.cumsum(b.num_atoms, 0) - b.num_atoms)[b.batch[d]]
            order = torch.argsort(b.batch[d], stable=True)
            s, d, off = s[order], d[order], off[order]
            src.append(s - local[order])
            dst.append(d - local[order])
            offsets.append(off)
            counts.append(torch.bincount(b.batch[d], minlength=len(rows)))
        self.graphs = GraphCache(cutoff, max_neighbors, torch.cat(src), torch.cat(dst), torch.cat(offsets),
                                 torch.cat(counts))
        return self.graphs

    def __len__(self) -> int:
        return len(self.num_atoms)

    def __getitem__(self, i: int):
        from torch_geometric.data import Data

        s, n = int(self.first[i]), int(self.num_atoms[i])
        return Data(frac=self.frac[s:s + n], types=self.types[s:s + n], lengths=self.lengths[i:i + 1],
                    angles=self.angles[i:i + 1], num_atoms=self.num_atoms[i:i + 1], num_nodes=n)

    def _atoms(self, rows: torch.Tensor) -> torch.Tensor:
        """Indices of the atoms of crystals ``rows``, crystal after crystal."""
        num = self.num_atoms[rows]
        return torch.repeat_interleave(self.first[rows], num) + torch.arange(int(num.sum())) - \
            torch.repeat_interleave(torch.cumsum(num, 0) - num, num)

    def batch(self, rows) -> CrystalBatch:
        """Crystals ``rows`` as one batch (the same fields as :func:`collate` gives, without building
        a ``Data`` object per crystal)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        atoms, num = self._atoms(rows), self.num_atoms[rows]
        return CrystalBatch(self.frac[atoms], self.types[atoms], self.lengths[rows], self.angles[rows], num,
                            torch.repeat_interleave(torch.arange(len(rows)), num),
                            None if self.conditions is None else self.conditions[rows],
                            None if self.graphs is None else self.graphs.gather(rows, num))

    def subset(self, rows) -> Crystals:
        rows = torch.as_tensor(rows, dtype=torch.long)
        atoms = self._atoms(rows)
        return Crystals(self.frac[atoms], self.types[atoms], self.lengths[rows], self.angles[rows],
                        self.num_atoms[rows], [self.ids[int(r)] for r in rows],
                        None if self.conditions is None else self.conditions[rows],
                        None if self.properties is None else self.properties[rows])

    @classmethod
    def concat(cls, parts: list[Crystals]) -> Crystals:
        """One set of the crystals of ``parts``, in order (conditions and properties kept when every part
        has them)."""
        def joined(name):
            values = [getattr(c, name) for c in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return cls(torch.cat([c.frac for c in parts]), torch.cat([c.types for c in parts]),
                   torch.cat([c.lengths for c in parts]), torch.cat([c.angles for c in parts]),
                   torch.cat([c.num_atoms for c in parts]), [i for c in parts for i in c.ids],
                   joined("conditions"), joined("properties"))

    def structure(self, i: int):
        """Crystal ``i`` as a pymatgen ``Structure``."""
        s, n = int(self.first[i]), int(self.num_atoms[i])
        return to_structure(self.frac[s:s + n], self.types[s:s + n], self.lengths[i], self.angles[i])


def collate(items: list):
    """Batch ``Data`` items (``batch.batch`` maps atoms to crystals)."""
    from torch_geometric.data import Batch

    return Batch.from_data_list(items)


def to_structure(frac, types, lengths, angles):
    from pymatgen.core import Lattice, Structure

    lat = Lattice.from_parameters(*[float(x) for x in lengths], *[float(x) for x in angles])
    return Structure(lat, [int(t) for t in types], np.asarray(frac, dtype=float) % 1.0, coords_are_cartesian=False)


def canonical(structure):
    """CDVAE's canonical form: Niggli-reduced cell, lattice rebuilt from its parameters, ordered sites
    only (a disordered site becomes its majority species)."""
    from pymatgen.core import Lattice, Structure

    reduced = structure.get_reduced_structure()
    species = [site.species.elements[int(np.argmax(list(site.species.values())))] if not site.is_ordered else site.specie
               for site in reduced]
    return Structure(Lattice.from_parameters(*reduced.lattice.parameters), species, reduced.frac_coords % 1.0,
                     coords_are_cartesian=False)


def _from_structures(structures: list, ids: list[str]) -> Crystals:
    frac, types, lengths, angles, num = [], [], [], [], []
    for s in structures:
        frac.append(np.asarray(s.frac_coords, dtype=np.float32) % 1.0)
        types.append(np.array([site.specie.Z for site in s], dtype=np.int64))
        lengths.append(s.lattice.abc)
        angles.append(s.lattice.angles)
        num.append(len(s))
    return Crystals(torch.from_numpy(np.concatenate(frac)), torch.from_numpy(np.concatenate(types)),
                    torch.tensor(lengths, dtype=torch.float32), torch.tensor(angles, dtype=torch.float32),
                    torch.tensor(num, dtype=torch.long), list(ids))


def crystals_from_structures(structures: list, ids: list[str] | None = None) -> Crystals:
    """Pack pymatgen structures (brought to :func:`canonical` form)."""
    ids = ids if ids is not None else [str(i) for i in range(len(structures))]
    return _from_structures([canonical(s) for s in structures], ids)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_crystals(path: str | Path, cache_dir: str | Path | None = None, progress: bool = False) -> Crystals:
    """Read a CDVAE-style CSV (``cif`` column, optional ``material_id``) as :class:`Crystals`, using or
    filling a cache in ``cache_dir`` (nothing is cached when it is None)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure CSV")
    key = f"{path.name.split('.')[0]}-{_hash_file(path)}-v{CACHE_VERSION}"
    if cache_dir is not None:
        cache = Path(cache_dir)
        tensors, meta = cache / f"{key}.safetensors", cache / f"{key}.json"
        if tensors.is_file() and meta.is_file():
            t = load_file(str(tensors))
            return Crystals(t["frac"], t["types"], t["lengths"], t["angles"], t["num_atoms"],
                            json.loads(meta.read_text())["ids"])
    import pandas as pd
    from pymatgen.core import Structure
    from tqdm.auto import tqdm

    df = pd.read_csv(path)
    if "cif" not in df.columns:
        raise ValueError(f"{path}: a crystal CSV needs a 'cif' column (columns: {', '.join(map(str, df.columns))})")
    ids = df["material_id"].astype(str).tolist() if "material_id" in df.columns else [str(i) for i in range(len(df))]
    structures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cif in tqdm(df["cif"], desc=f"reading {path.name}", unit="crystal", disable=not progress):
            structures.append(canonical(Structure.from_str(cif, fmt="cif")))
    crystals = _from_structures(structures, ids)
    if cache_dir is not None:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(tensors) as tmp:
            save_file({"frac": crystals.frac, "types": crystals.types, "lengths": crystals.lengths,
                       "angles": crystals.angles, "num_atoms": crystals.num_atoms}, str(tmp))
        write_json(meta, {"source": str(path), "ids": ids, "version": CACHE_VERSION})
    return crystals


def load_properties(path: str | Path, names: list[str]) -> list[dict[str, float]]:
    """Per crystal of a CDVAE-style CSV (in file order, as :func:`load_crystals` packs them), the values of
    the numeric columns ``names`` (NaN where a value is missing). A missing column raises ``ValueError``
    naming the numeric columns the file has."""
    import pandas as pd

    table = pd.read_csv(path, usecols=lambda c: c != "cif")
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    missing = [n for n in names if n not in numeric]
    if missing:
        raise ValueError(f"{path} has no numeric column {', '.join(missing)}; numeric columns: {', '.join(numeric)}")
    return table[list(names)].astype(float).to_dict("records")


def length_scale(num_atoms: torch.Tensor) -> torch.Tensor:
    """CDVAE scales lattice lengths by N^(1/3) before regressing them."""
    return num_atoms.float().pow(1.0 / 3.0)


def lattice_targets(lengths: torch.Tensor, angles: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
    """The six regressed lattice values of each crystal: lengths / N^(1/3), then angles."""
    return torch.cat([lengths / length_scale(num_atoms)[:, None], angles], 1)


def lattice_statistics(crystals: Crystals) -> dict[str, list[float]]:
    """Means and standard deviations of the :func:`lattice_targets` of ``crystals``."""
    target = lattice_targets(crystals.lengths, crystals.angles, crystals.num_atoms)
    return {"mean": target.mean(0).tolist(), "std": target.std(0).clamp(min=1e-3).tolist()}


def element_count_table(crystals: Crystals, max_atoms: int | None = None) -> list[list[float]]:
    """Row N, column k: the share of ``crystals`` with N atoms that have k distinct elements (rows up
    to ``max_atoms``, default the largest crystal; a row with no crystal of that size falls back to the
    share over all crystals)."""
    max_atoms = max_atoms or int(crystals.num_atoms.max())
    counts = torch.zeros(max_atoms + 1, max_atoms + 1)
    for i in range(len(crystals)):
        s, n = int(crystals.first[i]), int(crystals.num_atoms[i])
        k = len(torch.unique(crystals.types[s:s + n]))
        counts[min(n, max_atoms), k] += 1
    overall = counts.sum(0) / counts.sum()
    rows = torch.where(counts.sum(1, keepdim=True) > 0, counts / counts.sum(1, keepdim=True).clamp(min=1), overall)
    width = int((counts.sum(0) > 0).nonzero().max()) + 1
    return [[round(float(x), 6) for x in row[:width]] for row in rows]


def stoichiometry_key(types) -> str:
    """A crystal's stoichiometry pattern: its element multiplicities, largest first, as "2,1,1,1" (CaTiO3 in a
    5-atom cell is "3,1,1"; which elements they are is left out)."""
    counts = Counter(int(t) for t in types)
    return ",".join(str(c) for c in sorted(counts.values(), reverse=True))


def stoichiometry_table(crystals: Crystals) -> dict[str, float]:
    """The share of ``crystals`` with each stoichiometry pattern (:func:`stoichiometry_key`), commonest first."""
    counts = Counter(stoichiometry_key(crystals.types[int(s):int(s) + int(n)].tolist())
                     for s, n in zip(crystals.first, crystals.num_atoms))
    return {k: round(v / len(crystals), 6) for k, v in counts.most_common()}


def atomic_volume_table(crystals: Crystals, max_z: int = 100) -> list[float]:
    """Per-element volumes (Å³ per atom; index Z - 1) such that a crystal's cell volume is about the sum of
    its atoms' volumes: non-negative least squares on the relative error over ``crystals`` (Biltz-style
    volume increments). An element absent from ``crystals`` gets the median of the fitted ones."""
    import numpy as np
    from scipy.optimize import nnls

    counts = np.zeros((len(crystals), max_z))
    rows = torch.repeat_interleave(torch.arange(len(crystals)), crystals.num_atoms).numpy()
    np.add.at(counts, (rows, crystals.types.numpy() - 1), 1.0)
    volume = cell_volume(crystals.lengths, crystals.angles).double().numpy()
    fitted, _ = nnls(counts / volume[:, None], np.ones(len(volume)))
    seen = counts.sum(0) > 0
    fitted[~seen] = np.median(fitted[seen])
    return [round(float(v), 4) for v in fitted]


def composition_volume(types: torch.Tensor, batch: torch.Tensor, n_crystals: int, table: list[float]) -> torch.Tensor:
    """Each crystal's cell volume (Å³) from its atoms alone: the sum of :func:`atomic_volume_table`
    entries over atoms ``types`` (atomic numbers) of crystal ``batch``."""
    per_atom = torch.tensor(table, dtype=torch.float)[types - 1]
    return torch.zeros(n_crystals).index_add_(0, batch, per_atom)


__all__ = ["CrystalBatch", "Crystals", "GraphCache", "atomic_volume_table", "canonical", "cell_volume", "collate",
           "composition_volume", "crystals_from_structures", "edge_vectors", "element_count_table", "lattice_matrix",
           "lattice_parameters", "lattice_statistics", "lattice_targets", "length_scale", "load_crystals",
           "load_properties", "min_image_displacement", "periodic_edges", "stoichiometry_key", "stoichiometry_table",
           "to_structure"]
