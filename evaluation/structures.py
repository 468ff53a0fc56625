"""CDVAE's structure-generation metrics, for any generator's crystal structures.

Follows the protocol of CDVAE (Xie et al. 2022; ``scripts/compute_metrics.py`` and ``scripts/eval_utils.py``
of txie-93/cdvae) so that numbers are comparable with the papers that use it:

``struct_validity``
    Share of generated samples whose interatomic distances (pymatgen ``distance_matrix``, off-diagonal)
    are all >= 0.5 Å and whose cell volume is >= 0.1 Å³ (:func:`structure_validity`).
``comp_validity``
    Share whose composition passes :func:`evaluation.validity.check_formula` with ``protocol="cdvae"``
    (single elements and all-metal compositions are valid, as in CDVAE).
``validity``
    Both, *and* (when fingerprints are computed) a structure fingerprint could be computed: CDVAE
    marks a crystal whose CrystalNN fingerprint raises as invalid.
``cov_recall`` / ``cov_precision``
    Fingerprints: the CrystalNN site fingerprint (matminer ``CrystalNNFingerprint.from_preset("ops")``)
    averaged over sites, and the Magpie composition fingerprint (``ElementProperty.from_preset("magpie")``
    with ``impute_nan=False``, as in the matminer CDVAE used) standardised with CDVAE's constants, NaN
    set to 0 afterwards. Exactly as CDVAE's ``compute_cov``: *every* generated sample with fingerprints
    takes part (invalid ones included; a sample without fingerprints is dropped), Euclidean distances to
    every reference structure are taken separately for the two fingerprints, and

    * COV-R = share of reference structures whose nearest generated structure fingerprint is within the
      structure cut-off **and** whose nearest generated composition fingerprint (not necessarily of the
      same sample) is within the composition cut-off;
    * COV-P = number of generated samples with a reference structure fingerprint within the structure
      cut-off and a reference composition fingerprint within the composition cut-off, divided by the
      number of *all* generated samples (unreadable, invalid and fingerprint-less ones included).

    The ``amsd_*`` / ``amcd_*`` values are CDVAE's mean minimum structure / composition distances.
``wdist_density`` / ``wdist_num_elems``
    1-D Wasserstein distances of the density (g/cm³) and of the number of distinct elements between the
    *valid* generated samples and all reference structures (CDVAE draws 1,000 of the valid samples at
    random; here all valid samples are used).

Differences from CDVAE, all at the edges: ``None`` samples (unreadable output) count as invalid and in
the COV-P denominator; fingerprints are not attempted for a cell of volume < 0.1 Å³ (CrystalNN can
exhaust memory on such cells; CDVAE counts them invalid anyway, and they stay in the COV-P denominator);
reference structures whose fingerprint fails are left out of COV (CDVAE would crash) and counted in
``n_reference_fingerprint_failed``.

Fingerprints are computed in worker processes (spawn) and those of the reference set are cached in a
``.npz`` file keyed by a hash of the structures (lattice, species and coordinates) and of the matminer
and pymatgen versions (:func:`reference_fingerprints`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.io import atomic_path, json_safe, write_json, write_text
from evaluation.metrics import wasserstein_1d
from evaluation.report import save_figure
from evaluation.validity import check_formula

__all__ = [
    "CDVAE_PUBLISHED",
    "COV_CUTOFFS",
    "Fingerprints",
    "composition_fingerprint",
    "composition_validity",
    "compute_fingerprints",
    "coverage",
    "evaluate_structures",
    "fingerprint_key",
    "load_compscaler",
    "DEFAULT_COMPSCALER",
    "reference_fingerprints",
    "scale_composition_fingerprints",
    "structure_fingerprint",
    "structure_report_markdown",
    "structure_validity",
    "write_structure_report",
]

#: CDVAE's COV cut-offs per dataset: (structure fingerprint distance, composition fingerprint distance).
COV_CUTOFFS: dict[str, tuple[float, float]] = {"mp20": (0.4, 10.0), "perov5": (0.2, 4.0), "carbon24": (0.2, 4.0)}

#: CDVAE's own generation results (Xie et al. 2022, Table 3), as fractions / distances.
CDVAE_PUBLISHED: dict[str, dict[str, float]] = {
    "perov5": {"struct_validity": 1.0, "comp_validity": 0.9859, "cov_recall": 0.9945, "cov_precision": 0.9846,
               "wdist_density": 0.126, "wdist_num_elems": 0.063},
    "mp20": {"struct_validity": 1.0, "comp_validity": 0.8670, "cov_recall": 0.9915, "cov_precision": 0.9949,
             "wdist_density": 0.687, "wdist_num_elems": 1.432},
}

STRUCT_FP_SIZE = 61  # CrystalNNFingerprint "ops" preset
COMP_FP_SIZE = 132  # Magpie ElementProperty
MIN_VOLUME = 0.1  # Å^3, CDVAE's volume floor
FINGERPRINT_VERSION = 1  # bump when the fingerprint computation changes: invalidates caches

# ------------------------------------------------------------------------------------------- validity


def structure_validity(structure, cutoff: float = 0.5) -> tuple[bool, str]:
    """CDVAE's structural validity: every interatomic distance >= ``cutoff`` Å and volume >= 0.1 Å³.

    Returns ``(valid, reason)``; ``reason`` is empty when valid. ``None`` (an unreadable sample) is invalid.
    """
    if structure is None:
        return False, "unreadable structure"
    try:
        volume = float(structure.volume)
    except Exception as e:  # a degenerate lattice
        return False, f"no volume ({type(e).__name__}: {e})"
    if not math.isfinite(volume) or volume < MIN_VOLUME:
        return False, f"volume {volume:.3g} Å³ < {MIN_VOLUME} Å³"
    if len(structure) == 0:
        return False, "no atoms"
    # CDVAE pads the diagonal, so a one-atom cell is never checked against its own periodic images
    if len(structure) > 1:
        dist = np.array(structure.distance_matrix, dtype=float)
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        if not dist[i, j] >= cutoff:  # also catches NaN
            return False, f"atoms {min(i, j)} and {max(i, j)} are {dist[i, j]:.2f} Å apart (< {cutoff} Å)"
    return True, ""


def composition_validity(structure) -> tuple[bool, str]:
    """CDVAE's composition validity (SMACT charge neutrality + Pauling test, :mod:`evaluation.validity`
    protocol ``cdvae``) of a structure's composition; oxidation-state decorations are ignored.
    Returns ``(valid, reason)``."""
    if structure is None:
        return False, "unreadable structure"
    try:
        amounts = structure.composition.element_composition.get_el_amt_dict()
    except Exception as e:  # dummy species and the like
        return False, f"composition not readable ({type(e).__name__}: {e})"
    return amounts_validity(amounts)


def amounts_validity(amounts: dict[str, float]) -> tuple[bool, str]:
    """CDVAE's composition validity (protocol ``cdvae``) of ``{element symbol: amount}``; ``(valid, reason)``."""
    if not amounts:
        return False, "no atoms"
    text = " ".join(f"{el}{amt:.6f}" for el, amt in amounts.items())
    r = check_formula(text, protocol="cdvae")
    return r.valid, r.reason


# --------------------------------------------------------------------------------------- fingerprints


@functools.cache
def _featurizers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from matminer.featurizers.composition.composite import ElementProperty
        from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

        return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie", impute_nan=False)


def structure_fingerprint(structure) -> np.ndarray:
    """CrystalNN "ops" site fingerprints averaged over sites (61 values). May raise, as CrystalNN can."""
    crystal_nn, _ = _featurizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = [crystal_nn.featurize(structure, i) for i in range(len(structure))]
    return np.asarray(sites, dtype=float).mean(axis=0)


def composition_fingerprint(structure_or_composition) -> np.ndarray:
    """Magpie composition fingerprint (132 values, unscaled; NaN where Magpie lacks data)."""
    _, magpie = _featurizers()
    comp = getattr(structure_or_composition, "composition", structure_or_composition)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(magpie.featurize(comp.element_composition), dtype=float)


@dataclass
class Fingerprints:
    """Fingerprints of N structures. Rows where ``ok`` is false are NaN; ``error`` says why."""

    struct: np.ndarray  # [N, 61]
    comp: np.ndarray  # [N, 132], unscaled
    ok: np.ndarray  # [N] bool
    error: list[str]
    seconds_struct: np.ndarray  # [N] per-structure compute time (0 where not attempted)
    seconds_comp: np.ndarray  # [N]

    def __len__(self) -> int:
        return len(self.ok)

    @classmethod
    def empty(cls, n: int) -> Fingerprints:
        return cls(np.full((n, STRUCT_FP_SIZE), np.nan), np.full((n, COMP_FP_SIZE), np.nan), np.zeros(n, bool),
                   [""] * n, np.zeros(n), np.zeros(n))

    def speeds(self) -> dict:
        """Mean seconds per structure (over those attempted) of each fingerprint."""
        attempted = self.seconds_struct > 0
        n = int(attempted.sum())
        return {"n": n,
                "struct_s_per_structure": float(self.seconds_struct[attempted].mean()) if n else None,
                "comp_s_per_structure": float(self.seconds_comp[self.seconds_comp > 0].mean())
                if (self.seconds_comp > 0).any() else None}


def _fingerprint_one(structure) -> tuple[np.ndarray | None, np.ndarray | None, str, float, float]:
    """(struct fp, comp fp, error, seconds struct, seconds comp) of one structure; never raises."""
    if structure is None:
        return None, None, "unreadable structure", 0.0, 0.0
    try:
        volume = float(structure.volume)
    except Exception as e:
        return None, None, f"no volume ({type(e).__name__})", 0.0, 0.0
    if not math.isfinite(volume) or volume < MIN_VOLUME or len(structure) == 0:
        return None, None, f"not attempted: volume {volume:.3g} Å³ or no atoms", 0.0, 0.0
    t0 = time.perf_counter()
    try:
        sfp = structure_fingerprint(structure)
    except Exception as e:  # CrystalNN raises on odd environments: CDVAE marks the crystal, goes on
        return None, None, f"CrystalNN fingerprint failed ({type(e).__name__}: {e})"[:300], \
            time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    try:
        cfp = composition_fingerprint(structure)
    except Exception as e:
        return None, None, f"Magpie fingerprint failed ({type(e).__name__}: {e})"[:300], t1 - t0, \
            time.perf_counter() - t1
    t2 = time.perf_counter()
    if sfp.shape != (STRUCT_FP_SIZE,) or cfp.shape != (COMP_FP_SIZE,):
        return None, None, f"unexpected fingerprint sizes {sfp.shape}, {cfp.shape}", t1 - t0, t2 - t1
    return sfp, cfp, "", max(t1 - t0, 1e-9), max(t2 - t1, 1e-9)


def _fingerprint_chunk(structures: list) -> list:
    warnings.simplefilter("ignore")
    return [_fingerprint_one(s) for s in structures]


def compute_fingerprints(structures: Sequence, workers: int = 1, progress: bool = False,
                         desc: str = "fingerprints", chunk_size: int = 8) -> Fingerprints:
    """Structure and composition fingerprints of every entry (``None`` entries are marked failed).

    ``workers`` > 1 spreads the work over that many spawned processes; a failing structure is marked,
    never fatal."""
    from tqdm.auto import tqdm

    n = len(structures)
    out = Fingerprints.empty(n)
    chunks = [list(structures[i:i + chunk_size]) for i in range(0, n, chunk_size)]
    bar = tqdm(total=n, desc=desc, unit="structure", disable=not progress)
    try:
        if workers > 1 and len(chunks) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
                parts = pool.map(_fingerprint_chunk, chunks)
                results = []
                for part in parts:
                    results.extend(part)
                    bar.update(len(part))
        else:
            results = []
            for chunk in chunks:
                results.extend(_fingerprint_chunk(chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
    for i, (sfp, cfp, err, ts, tc) in enumerate(results):
        out.seconds_struct[i], out.seconds_comp[i] = ts, tc
        if sfp is None:
            out.error[i] = err
        else:
            out.struct[i], out.comp[i], out.ok[i] = sfp, cfp, True
    return out


def fingerprint_key(structures: Sequence) -> str:
    """SHA-256 of the structures' content (lattice, species, fractional coordinates, in order) and of the
    fingerprint code's version (ours, matminer's, pymatgen's)."""
    import importlib.metadata as md

    h = hashlib.sha256()
    versions = []
    for pkg in ("matminer", "pymatgen"):
        try:
            versions.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:  # pragma: no cover
            versions.append(f"{pkg}=?")
    h.update(f"fingerprints v{FINGERPRINT_VERSION};{';'.join(versions)};n={len(structures)}\n".encode())
    for s in structures:
        if s is None:
            h.update(b"None\n")
            continue
        h.update(np.ascontiguousarray(s.lattice.matrix, dtype="<f8").tobytes())
        h.update(("|".join(site.species_string for site in s) + "\n").encode())
        h.update(np.ascontiguousarray(s.frac_coords, dtype="<f8").tobytes())
    return h.hexdigest()


def _save_fingerprints(path: Path, fps: Fingerprints, key: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, key=np.array(key), struct=fps.struct, comp=fps.comp, ok=fps.ok,
                            error=np.array(fps.error, dtype=str), seconds_struct=fps.seconds_struct,
                            seconds_comp=fps.seconds_comp)


def _load_fingerprints(path: Path, key: str) -> Fingerprints | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            fps = Fingerprints(z["struct"], z["comp"], z["ok"].astype(bool), [str(e) for e in z["error"]],
                               z["seconds_struct"], z["seconds_comp"])
    except (OSError, KeyError, ValueError):  # missing, truncated or foreign file: recompute
        return None
    if fps.struct.shape != (len(fps.ok), STRUCT_FP_SIZE) or fps.comp.shape != (len(fps.ok), COMP_FP_SIZE):
        return None
    return fps


def reference_fingerprints(structures: Sequence, cache_dir: str | Path | None = None, workers: int = 1,
                           progress: bool = False) -> tuple[Fingerprints, dict]:
    """Fingerprints of the reference set, read from / written to ``cache_dir`` when given.

    The cache file is ``cache_dir/fingerprints-<first 24 hex digits of fingerprint_key>.npz`` (no
    pickles). Returns the fingerprints and ``{"cache_file", "cache_hit", "key"}``."""
    key = fingerprint_key(structures)
    info: dict = {"key": key, "cache_file": None, "cache_hit": False}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"fingerprints-{key[:24]}.npz"
        info["cache_file"] = str(path)
        if path.is_file():
            fps = _load_fingerprints(path, key)
            if fps is not None and len(fps) == len(structures):
                info["cache_hit"] = True
                return fps, info
    fps = compute_fingerprints(structures, workers=workers, progress=progress, desc="reference fingerprints")
    if path is not None:
        _save_fingerprints(path, fps, key)
    return fps, info


#: CDVAE's 132 Magpie means / standard deviations (MIT), shipped in the package by scripts/make_compscaler.py
DEFAULT_COMPSCALER = Path(__file__).resolve().parent / "data" / "cdvae_compscaler.json"


def load_compscaler(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CDVAE's Magpie standardisation constants from a JSON file with ``CompScalerMeans`` and
    ``CompScalerStds`` (132 numbers each)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no composition-scaler file at {path} (CDVAE's CompScalerMeans/CompScalerStds "
                                "as JSON, e.g. ../shared/data/cdvae_compscaler.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        means = np.asarray(data["CompScalerMeans"], dtype=float)
        stds = np.asarray(data["CompScalerStds"], dtype=float)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected JSON with CompScalerMeans and CompScalerStds lists ({e})") from e
    if means.shape != (COMP_FP_SIZE,) or stds.shape != (COMP_FP_SIZE,):
        raise ValueError(f"{path}: expected {COMP_FP_SIZE} means and stds, got {means.shape} and {stds.shape}")
    return means, stds


def scale_composition_fingerprints(comp: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """CDVAE's ``CompScaler.transform``: ``(x - mean) / std``, NaN replaced by 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.asarray(comp, dtype=float) - means) / stds
    return np.where(np.isnan(z), 0.0, z)


# ------------------------------------------------------------------------------------------ coverage


def coverage(gen_struct: np.ndarray, gen_comp: np.ndarray, ref_struct: np.ndarray, ref_comp: np.ndarray,
             struct_cutoff: float, comp_cutoff: float, n_generated: int | None = None,
             chunk: int = 1024) -> dict:
    """CDVAE's ``compute_cov`` on fingerprints (composition ones already scaled; rows without
    fingerprints already removed). ``n_generated`` is the COV-P denominator (default: the rows given);
    CDVAE uses the number of generated samples *before* dropping those without fingerprints.
    Distances are computed in chunks, so 10,000 x 9,046 needs no 1.4 GB matrices."""
    from scipy.spatial.distance import cdist

    gen_struct, gen_comp = np.asarray(gen_struct, float), np.asarray(gen_comp, float)
    ref_struct, ref_comp = np.asarray(ref_struct, float), np.asarray(ref_comp, float)
    n_gen, n_ref = len(gen_struct), len(ref_struct)
    if n_ref == 0:
        raise ValueError("coverage needs at least one reference structure with fingerprints")
    if n_generated is None:
        n_generated = n_gen
    if n_gen == 0:
        return {"cov_recall": 0.0, "cov_recall_struct": 0.0, "cov_recall_comp": 0.0, "cov_precision": 0.0,
                "amsd_recall": None, "amsd_precision": None,
                "amcd_recall": None, "amcd_precision": None}
    struct_prec, comp_prec = np.empty(n_gen), np.empty(n_gen)
    struct_rec, comp_rec = np.full(n_ref, np.inf), np.full(n_ref, np.inf)
    for a in range(0, n_gen, chunk):
        ds = cdist(gen_struct[a:a + chunk], ref_struct)
        dc = cdist(gen_comp[a:a + chunk], ref_comp)
        struct_prec[a:a + chunk], comp_prec[a:a + chunk] = ds.min(axis=1), dc.min(axis=1)
        struct_rec = np.minimum(struct_rec, ds.min(axis=0))
        comp_rec = np.minimum(comp_rec, dc.min(axis=0))
    recall_hit = (struct_rec <= struct_cutoff) & (comp_rec <= comp_cutoff)
    precision_hit = (struct_prec <= struct_cutoff) & (comp_prec <= comp_cutoff)
    return {
        "cov_recall": float(recall_hit.mean()),
        # which cut-off a missed reference fails: each criterion alone (CDVAE's COV-R needs both at once,
        # possibly from different samples, so it is at most the smaller of the two)
        "cov_recall_struct": float((struct_rec <= struct_cutoff).mean()),
        "cov_recall_comp": float((comp_rec <= comp_cutoff).mean()),
        "cov_precision": float(precision_hit.sum() / n_generated) if n_generated else 0.0,
        "amsd_recall": float(struct_rec.mean()), "amsd_precision": float(struct_prec.mean()),
        "amcd_recall": float(comp_rec.mean()), "amcd_precision": float(comp_prec.mean()),
    }


# ---------------------------------------------------------------------------------------- evaluation


def reconstruction_match(originals: Sequence, reconstructions: Sequence, stol: float = 0.5, angle_tol: float = 10.0,
                         ltol: float = 0.3) -> dict:
    """CDVAE's reconstruction metrics: the share of ``reconstructions`` that ``StructureMatcher`` (CDVAE's
    tolerances) matches to their ``originals``, and the mean normalised RMS displacement of the matches."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(stol=stol, angle_tol=angle_tol, ltol=ltol)
    rms = []
    for a, b in zip(originals, reconstructions):
        try:
            r = matcher.get_rms_dist(a, b) if b is not None else None
        except Exception:  # noqa: BLE001 - pymatgen fails on degenerate cells; such a pair is a miss
            r = None
        if r is not None:
            rms.append(r[0])
    n = len(originals)
    return {"n": n, "match_rate": len(rms) / n if n else 0.0, "rms": float(np.mean(rms)) if rms else None}


def _num_elements(structure) -> int:
    return len(structure.composition.element_composition.elements)


def _histograms(gen_density, ref_density, gen_nelem, ref_nelem) -> dict:
    both = np.concatenate([np.asarray(gen_density, float), np.asarray(ref_density, float)])
    both = both[np.isfinite(both)]
    if both.size:
        hi = float(np.percentile(both, 99.5)) if both.size > 20 else float(both.max())
        edges = np.linspace(0.0, max(hi, 1e-6) * 1.02, 51)
    else:
        edges = np.linspace(0.0, 1.0, 51)

    def dens(v):
        v = np.clip(np.asarray(v, float), edges[0], edges[-1])
        c, _ = np.histogram(v, bins=edges)
        return (c / max(len(v), 1)).round(6).tolist()

    def counts(v):
        c = Counter(int(x) for x in v)
        n = sum(c.values()) or 1
        return {str(k): round(c[k] / n, 6) for k in sorted(c)}

    return {"density": {"bin_edges": edges.round(4).tolist(), "generated": dens(gen_density),
                        "reference": dens(ref_density)},
            "num_elems": {"generated": counts(gen_nelem), "reference": counts(ref_nelem)}}


def evaluate_structures(
    generated: Sequence,
    reference: Sequence,
    dataset: str | None = "mp20",
    cutoffs: tuple[float, float] | None = None,
    compscaler: str | Path | None = None,
    workers: int = 1,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    coverage_metrics: bool = True,
    max_examples: int = 20,
) -> dict:
    """CDVAE's generation metrics of ``generated`` (pymatgen Structures; ``None`` = an unreadable sample,
    counted as invalid) against ``reference`` (the test split). See the module docstring.

    ``cutoffs`` = (structure, composition) COV cut-offs; default ``COV_CUTOFFS[dataset]``. ``compscaler``
    is the JSON file of CDVAE's Magpie constants for COV (default: the copy shipped in the package,
    :data:`DEFAULT_COMPSCALER`; ``coverage_metrics=False`` skips the
    fingerprints altogether: no COV, and ``validity`` then ignores fingerprint failures). ``cache_dir``
    caches the reference fingerprints. Fractions are in [0, 1].
    """
    t_start = time.perf_counter()
    generated, reference = list(generated), list(reference)
    if not generated:
        raise ValueError("no generated structures to evaluate")
    if not reference or any(s is None for s in reference):
        raise ValueError("the reference set must hold at least one structure and no None entries")
    if cutoffs is None:
        if dataset not in COV_CUTOFFS:
            raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(COV_CUTOFFS)} or give cutoffs")
        cutoffs = COV_CUTOFFS[dataset]
    struct_cut, comp_cut = (float(c) for c in cutoffs)
    scaler = None
    if coverage_metrics:
        scaler = load_compscaler(DEFAULT_COMPSCALER if compscaler is None else compscaler)

    n = len(generated)
    t0 = time.perf_counter()
    sv = [structure_validity(s) for s in generated]
    cv = [composition_validity(s) for s in generated]
    t_validity = time.perf_counter() - t0
    struct_ok = np.array([v for v, _ in sv], dtype=bool)
    comp_ok = np.array([v for v, _ in cv], dtype=bool)
    valid = struct_ok & comp_ok

    out: dict = {
        "dataset": dataset,
        "n_generated": n,
        "n_unreadable": sum(s is None for s in generated),
        "n_reference": len(reference),
        "struct_validity": float(struct_ok.mean()),
        "comp_validity": float(comp_ok.mean()),
    }
    timing: dict = {"validity_s": t_validity}
    cov: dict = {}
    gen_fps = ref_fps = None
    if coverage_metrics:
        t0 = time.perf_counter()
        ref_fps, cache_info = reference_fingerprints(reference, cache_dir, workers=workers, progress=progress)
        timing["reference_fingerprints_s"] = time.perf_counter() - t0
        timing["reference_fingerprints_cached"] = cache_info["cache_hit"]
        timing["cache_file"] = cache_info["cache_file"]
        t0 = time.perf_counter()
        gen_fps = compute_fingerprints(generated, workers=workers, progress=progress, desc="generated fingerprints")
        timing["generated_fingerprints_s"] = time.perf_counter() - t0
        timing["generated_fingerprint_speed"] = gen_fps.speeds()
        timing["reference_fingerprint_speed"] = ref_fps.speeds()
        valid &= gen_fps.ok  # CDVAE: a crystal without a fingerprint is invalid
        means, stds = scaler
        t0 = time.perf_counter()
        cov = coverage(gen_fps.struct[gen_fps.ok], scale_composition_fingerprints(gen_fps.comp[gen_fps.ok], means, stds),
                       ref_fps.struct[ref_fps.ok], scale_composition_fingerprints(ref_fps.comp[ref_fps.ok], means, stds),
                       struct_cut, comp_cut, n_generated=n)
        timing["coverage_s"] = time.perf_counter() - t0
    out["validity"] = float(valid.mean())
    out["n_valid"] = int(valid.sum())
    out["validity_includes_fingerprints"] = bool(coverage_metrics)
    out["cov_recall"] = cov.get("cov_recall")
    out["cov_precision"] = cov.get("cov_precision")

    valid_structs = [s for s, ok in zip(generated, valid) if ok]
    gen_density = [float(s.density) for s in valid_structs]
    ref_density = [float(s.density) for s in reference]
    gen_nelem = [_num_elements(s) for s in valid_structs]
    ref_nelem = [_num_elements(s) for s in reference]
    out["wdist_density"] = wasserstein_1d(gen_density, ref_density)
    out["wdist_num_elems"] = wasserstein_1d(gen_nelem, ref_nelem)
    out["cutoffs"] = {"struct": struct_cut, "comp": comp_cut}
    for k in ("cov_recall_struct", "cov_recall_comp", "amsd_recall", "amsd_precision", "amcd_recall",
              "amcd_precision"):
        out[k] = cov.get(k)
    if coverage_metrics:
        out["n_generated_fingerprint_failed"] = int((~gen_fps.ok).sum())
        out["n_reference_fingerprint_failed"] = int((~ref_fps.ok).sum())
        out["n_reference_used_for_coverage"] = int(ref_fps.ok.sum())
    reasons: Counter = Counter()
    examples = []
    for i in range(n):
        why = []
        if generated[i] is None:
            why.append("unreadable: the generator's output could not be read")
        elif not sv[i][0]:
            why.append("structure: " + sv[i][1])
        if generated[i] is not None and not cv[i][0]:
            why.append("composition: " + cv[i][1])
        if gen_fps is not None and not gen_fps.ok[i] and generated[i] is not None:
            why.append("fingerprint: " + gen_fps.error[i])
        for w in why:
            reasons[w.split(":")[0] + ": " + _reason_kind(w.split(": ", 1)[1])] += 1
        if why and len(examples) < max_examples:
            formula = generated[i].composition.reduced_formula if generated[i] is not None else ""
            examples.append({"index": i, "formula": formula, "reason": "; ".join(why)})
    out["invalid_reasons"] = dict(reasons.most_common())
    out["invalid_examples"] = examples
    out["histograms"] = _histograms(gen_density, ref_density, gen_nelem, ref_nelem)
    preset = COV_CUTOFFS.get(dataset or "")
    out["published"] = CDVAE_PUBLISHED.get(dataset) if preset and (struct_cut, comp_cut) == preset else None
    timing["total_s"] = time.perf_counter() - t_start
    out["timing"] = timing
    return json_safe(out)


def _reason_kind(reason: str) -> str:
    """A reason without its numbers, for counting (e.g. "atoms i and j are ... apart")."""
    if " are " in reason and "apart" in reason:
        return "atoms closer than the cut-off"
    if reason.startswith("volume"):
        return "volume below 0.1 Å³"
    return reason.split(" (")[0]


# -------------------------------------------------------------------------------------------- report

_ROWS = (  # key, label, percent?
    ("struct_validity", "structure validity (%)", True),
    ("comp_validity", "composition validity (%)", True),
    ("validity", "validity, both (%)", True),
    ("cov_recall", "COV-R (%)", True),
    ("cov_recall_struct", "COV-R, structure cut-off alone (%)", True),
    ("cov_recall_comp", "COV-R, composition cut-off alone (%)", True),
    ("cov_precision", "COV-P (%)", True),
    ("wdist_density", "Wasserstein density (g/cm³)", False),
    ("wdist_num_elems", "Wasserstein #elements", False),
)


def _cell(v, percent: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if percent else f"{v:.4f}"


def structure_report_markdown(metrics: dict, title: str = "Structure-generation metrics",
                              sources: dict | None = None) -> str:
    """The Markdown report: sources, the metrics table (with CDVAE's published row when known), details."""
    parts = [f"# {title}", ""]
    if sources:
        parts += [f"- **{k}**: `{v}`" for k, v in sources.items() if v not in (None, "")] + [""]
    published = metrics.get("published")
    head = "| metric | this run |" + (" CDVAE (paper) |" if published else "")
    parts += [head, "|---|---:|" + ("---:|" if published else "")]
    for key, label, pct in _ROWS:
        row = f"| {label} | {_cell(metrics.get(key), pct)} |"
        if published:
            row += f" {_cell(published.get(key), pct)} |"
        parts.append(row)
    cut = metrics.get("cutoffs", {})
    parts += [
        "",
        (f"{metrics.get('n_generated')} generated samples ({metrics.get('n_unreadable', 0)} unreadable, "
         f"{metrics.get('n_valid')} valid) against {metrics.get('n_reference')} reference structures; dataset "
         f"`{metrics.get('dataset')}`, COV cut-offs: structure {cut.get('struct')}, composition {cut.get('comp')}."),
    ]
    if metrics.get("cov_recall") is None:
        parts.append("COV-R / COV-P were not computed (no fingerprints).")
    else:
        parts.append(f"Fingerprint failures: {metrics.get('n_generated_fingerprint_failed', 0)} generated, "
                     f"{metrics.get('n_reference_fingerprint_failed', 0)} reference. Mean minimum distances: "
                     f"structure {_cell(metrics.get('amsd_recall'), False)} (recall) / "
                     f"{_cell(metrics.get('amsd_precision'), False)} (precision), composition "
                     f"{_cell(metrics.get('amcd_recall'), False)} / {_cell(metrics.get('amcd_precision'), False)}.")
    if published:
        parts.append("CDVAE (paper): Xie et al. 2022, Table 3.")
    reasons = metrics.get("invalid_reasons") or {}
    if reasons:
        parts += ["", "| why invalid | samples |", "|---|---:|"]
        parts += [f"| {k} | {v} |" for k, v in reasons.items()]
    t = metrics.get("timing", {})
    speed = t.get("generated_fingerprint_speed") or {}
    if t:
        line = f"Time: {t.get('total_s', 0):.1f} s in all"
        if "reference_fingerprints_s" in t:
            line += (f"; reference fingerprints {t['reference_fingerprints_s']:.1f} s"
                     f"{' (from cache)' if t.get('reference_fingerprints_cached') else ''}")
        if speed.get("struct_s_per_structure") is not None:
            line += (f"; per generated structure: CrystalNN {speed['struct_s_per_structure']:.3f} s, "
                     f"Magpie {speed['comp_s_per_structure']:.4f} s")
        parts += ["", line + "."]
    parts += ["", ("Definitions: `evaluation/structures.py` (CDVAE's protocol). Plots: `density.png`, "
                   "`num_elements.png`."), ""]
    return "\n".join(parts)


def _plot(metrics: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics.get("histograms") or {}
    written = []
    d = hist.get("density")
    if d:
        edges = np.asarray(d["bin_edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(centers, d["reference"], width=width, alpha=0.5, label="reference")
        ax.step(centers, d["generated"], where="mid", color="C3", label="generated (valid)")
        ax.set_xlabel("density (g/cm³)")
        ax.set_ylabel("fraction of structures")
        ax.set_title(f"Wasserstein distance {_cell(metrics.get('wdist_density'), False)}", fontsize=9)
        ax.legend()
        written.append(save_figure(fig, out_dir / "density.png"))
    e = hist.get("num_elems")
    if e:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, off in (("generated", -0.2), ("reference", 0.2)):
            h = e.get(name) or {}
            ax.bar([int(k) + off for k in h], list(h.values()), width=0.4,
                   label="generated (valid)" if name == "generated" else name)
        ticks = sorted({int(k) for h in e.values() for k in (h or {})})
        if ticks:
            ax.set_xticks(ticks)
        ax.set_xlabel("distinct elements per structure")
        ax.set_ylabel("fraction of structures")
        ax.set_title(f"Wasserstein distance {_cell(metrics.get('wdist_num_elems'), False)}", fontsize=9)
        ax.legend()
        written.append(save_figure(fig, out_dir / "num_elements.png"))
    return written


def write_structure_report(metrics: dict, out_dir: str | Path, title: str = "Structure-generation metrics",
                           sources: dict | None = None, plots: bool = True) -> list[str]:
    """Write ``metrics.json``, ``report.md`` and (optionally) ``density.png`` and ``num_elements.png``,
    each atomically; return the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", json_safe({"sources": sources or {}, **metrics}))
    write_text(out_dir / "report.md", structure_report_markdown(metrics, title, sources))
    files = ["metrics.json", "report.md"]
    if plots:
        files += _plot(metrics, out_dir)
    return files


def infer_dataset(path: Path) -> str | None:
    """The CDVAE dataset a path names (``perov5``, ``carbon24``, ``mp20``), if any."""
    text = str(path).lower().replace("-", "_")
    for hint, dataset in (("perov", "perov5"), ("carbon", "carbon24"), ("mp_20", "mp20"), ("mp20", "mp20")):
        if hint in text:
            return dataset
    return None
