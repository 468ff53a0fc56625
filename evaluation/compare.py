"""One metric suite for every generator, and the comparison report (``composition-gen compare``).

A *generator* here is a whole path from nothing to crystal structures: a formula language model followed
by template structures, or CDVAE. Each path is given the same budget of ``n`` samples. What it produced
is scored by the same functions as the separate commands, so the report's numbers are those of
``composition-gen evaluate`` (formulas) and ``composition-gen evaluate-structures`` (structures) on the
same files. On top of them this module adds what only a comparison needs:

* structure uniqueness and novelty by ``StructureMatcher`` (:func:`structure_novelty`): a structure is
  novel when no training structure of the same reduced composition matches it; uniqueness counts
  structures that match no earlier generated structure;
* energy statistics of relaxed structures (:func:`energy_summary`): energy and formation energy per atom,
  the fraction with a negative formation energy;
* wall time per valid structure;
* the report: ``report.md``, a self-contained ``report.html`` (tables and embedded PNG plots) and
  ``metrics.json`` (:func:`write_comparison`).

This module imports nothing from ``composition_lm`` or ``structure``: the CLI runs the generators and
hands their outputs here.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from evaluation.io import json_safe, write_json, write_text
from evaluation.report import save_figure

__all__ = ["energy_summary", "structure_novelty", "sun_summary", "unique_novel_flags", "density_histograms", "summary_rows", "comparison_markdown",
           "comparison_html", "write_comparison"]


def unique_novel_flags(structures: Sequence, reference: Callable[[str], Sequence] | Mapping[str, Sequence],
                       matcher=None) -> list[tuple[bool, bool]]:
    """``(unique, novel)`` per structure (None: neither): unique when it matches no earlier structure, novel
    when it is unique and matches no reference structure of the same reduced composition (``reference``: a
    mapping or a callable from reduced formula to structures). ``StructureMatcher`` with pymatgen's defaults
    (ltol 0.2, stol 0.3, angle_tol 5) unless ``matcher`` is given; only equal compositions are compared."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = matcher or StructureMatcher()
    lookup = reference if callable(reference) else (lambda key: reference.get(key, ()))
    seen: dict[str, list] = defaultdict(list)
    flags = []
    for s in structures:
        if s is None:
            flags.append((False, False))
            continue
        key = s.composition.reduced_formula
        if any(matcher.fit(s, other) for other in seen[key]):
            flags.append((False, False))
            continue
        seen[key].append(s)
        flags.append((True, not any(matcher.fit(s, other) for other in lookup(key))))
    return flags


def structure_novelty(structures: Sequence, training: Sequence, matcher=None) -> dict:
    """Uniqueness and novelty of ``structures`` (pymatgen Structures) by ``StructureMatcher``
    (:func:`unique_novel_flags`): ``uniqueness`` = structures matching no earlier one / all; ``novelty`` =
    unique structures matching no training structure of the same composition / unique structures."""
    by_formula: dict[str, list] = defaultdict(list)
    for s in training:
        by_formula[s.composition.reduced_formula].append(s)
    flags = unique_novel_flags(structures, by_formula, matcher)
    n, n_unique, n_novel = len(structures), sum(u for u, _ in flags), sum(v for _, v in flags)
    return {"n": n, "n_unique": n_unique, "uniqueness": n_unique / n if n else None, "n_novel_unique": n_novel,
            "novelty": n_novel / n_unique if n_unique else None}


def sun_summary(e_hull: Sequence, flags: Sequence[tuple[bool, bool]], n_samples: int, seconds: float,
                thresholds: Sequence[float] = (0.0, 0.1), n_elements: Sequence[int] | None = None) -> dict:
    """SUN counts and rates of a generator's structures: ``e_hull[i]`` (eV/atom, NaN when not placed) and
    ``flags[i]`` = (unique, novel) per structure; a structure is SUN at threshold t when E_hull <= t and it is
    unique and novel. Rates are per generated sample (``n_samples``) and per hour of the path's wall time.
    With ``n_elements[i]`` (elements in structure i), ``by_n_elements`` breaks the counts down by it:
    ``{k: {"n_structures", "n_with_e_hull", "<t>": {"n_stable", "n_sun"}}}``."""
    def counts(idx: Sequence[int]) -> dict:
        out = {}
        for t in thresholds:
            stable = [i for i in idx if e_hull[i] == e_hull[i] and e_hull[i] <= t + 1e-12]
            out[f"{t:g}"] = {"n_stable": len(stable), "n_sun": sum(1 for i in stable if all(flags[i]))}
        return out

    every = range(len(e_hull))
    out: dict = {"n_samples": n_samples, "n_with_e_hull": int(sum(1 for e in e_hull if e == e)), "seconds": seconds}
    for t, c in counts(every).items():
        out[t] = {**c, "sun_rate": c["n_sun"] / n_samples if n_samples else None,
                  "sun_per_hour": c["n_sun"] / (seconds / 3600) if seconds else None}
    if n_elements is not None:
        out["by_n_elements"] = {}
        for k in sorted(set(n_elements)):
            idx = [i for i in every if n_elements[i] == k]
            out["by_n_elements"][str(k)] = {"n_structures": len(idx),
                                            "n_with_e_hull": sum(1 for i in idx if e_hull[i] == e_hull[i]),
                                            **counts(idx)}
    return out


def _finite_values(values) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def energy_summary(energy_per_atom: Sequence, formation_energy_per_atom: Sequence, n_structures: int) -> dict:
    """Statistics of relaxed structures' energies (eV/atom); ``None`` entries (not relaxed, failed) are
    left out. ``frac_negative_formation`` is over the structures with a formation energy."""
    e, f = _finite_values(energy_per_atom), _finite_values(formation_energy_per_atom)

    def stats(a):
        if not a.size:
            return None
        return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
                "min": float(a.min()), "max": float(a.max())}

    return {"n_structures": n_structures, "n_with_energy": int(e.size), "n_with_formation_energy": int(f.size),
            "energy_per_atom": stats(e), "formation_energy_per_atom": stats(f),
            "frac_negative_formation": float((f < 0).mean()) if f.size else None,
            "values": {"energy_per_atom": e.round(5).tolist(), "formation_energy_per_atom": f.round(5).tolist()}}


def density_histograms(densities: dict[str, Sequence[float]], bins: int = 40) -> dict:
    """Histograms (fractions) of several sets of densities on common bin edges (0 .. 99.5th percentile)."""
    pooled = np.concatenate([_finite_values(v) for v in densities.values()] or [np.zeros(0)])
    hi = float(np.percentile(pooled, 99.5)) if pooled.size else 1.0
    edges = np.linspace(0.0, max(hi, 1e-6) * 1.02, bins + 1)
    out = {"bin_edges": edges.round(4).tolist()}
    for name, v in densities.items():
        a = np.clip(_finite_values(v), edges[0], edges[-1])
        counts, _ = np.histogram(a, bins=edges)
        out[name] = (counts / max(a.size, 1)).round(6).tolist()
    return out


# ------------------------------------------------------------------------------------------ tables
def _get(d: dict | None, *path):
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return None
        d = d[key]
    return d


#: (label, getter, format) of the summary table; "%" = fraction shown as a percentage
_ROWS: list[tuple[str, tuple, str]] = [
    ("samples (the budget)", ("counts", "samples"), "int"),
    ("structures produced", ("counts", "structures"), "int"),
    ("valid structures (structure + composition + fingerprint)", ("structure_metrics", "n_valid"), "int"),
    ("composition validity of the samples (cdvae protocol)", ("formula_metrics", "validity", "cdvae", "raw"), "%"),
    ("formula uniqueness", ("formula_metrics", "uniqueness"), "%"),
    ("formula novelty (vs training formulas)", ("formula_metrics", "novelty"), "%"),
    ("element JS divergence vs test formulas", ("formula_metrics", "distribution", "element_js"), "f"),
    ("#elements Wasserstein vs test formulas", ("formula_metrics", "distribution", "n_elements_wasserstein"), "f"),
    ("structure validity", ("structure_metrics", "struct_validity"), "%"),
    ("composition validity of the structures", ("structure_metrics", "comp_validity"), "%"),
    ("COV-R", ("structure_metrics", "cov_recall"), "%"),
    ("COV-P", ("structure_metrics", "cov_precision"), "%"),
    ("Wasserstein density", ("structure_metrics", "wdist_density"), "f"),
    ("Wasserstein #elements (structures)", ("structure_metrics", "wdist_num_elems"), "f"),
    ("structure uniqueness (StructureMatcher)", ("structure_novelty", "uniqueness"), "%"),
    ("structure novelty (vs training structures)", ("structure_novelty", "novelty"), "%"),
    ("relaxed with an energy", ("energy", "n_with_energy"), "int"),
    ("mean energy (eV/atom)", ("energy", "energy_per_atom", "mean"), "f"),
    ("mean formation energy (eV/atom)", ("energy", "formation_energy_per_atom", "mean"), "f"),
    ("fraction with formation energy < 0", ("energy", "frac_negative_formation"), "%"),
    ("SUN rate per sample, E_hull <= 0", ("sun", "0", "sun_rate"), "%"),
    ("SUN rate per sample, E_hull <= 0.1 eV/atom", ("sun", "0.1", "sun_rate"), "%"),
    ("SUN per hour of wall time, E_hull <= 0.1", ("sun", "0.1", "sun_per_hour"), "f"),
    ("wall time of the path (s)", ("timing", "generate_s"), "s"),
    ("wall time per valid structure (s)", ("timing", "per_valid_structure_s"), "s3"),
]


def _fmt(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return {"int": lambda x: f"{int(x):,}", "%": lambda x: f"{100 * x:.2f} %", "f": lambda x: f"{x:.4f}",
            "s": lambda x: f"{x:.1f}", "s3": lambda x: f"{x:.3f}"}[kind](v)


def summary_rows(result: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(generator names, [(metric label, formatted values)]) of the summary table; rows that every
    generator lacks (e.g. energies without relaxation) are left out."""
    gens = result["generators"]
    names = list(gens)
    rows = []
    for label, path, kind in _ROWS:
        values = [_get(gens[n], *path) for n in names]
        if all(v is None for v in values):
            continue
        rows.append((label, [_fmt(v, kind) for v in values]))
    sizes = sorted({int(k) for n in names for k in (_get(gens[n], "sun", "by_n_elements") or {})})
    for k in sizes:  # SUN / structures by number of elements
        cells = [(_get(gens[n], "sun", "by_n_elements") or {}).get(str(k)) for n in names]
        rows.append((f"SUN at E_hull <= 0.1 / structures, {k} element{'s' if k > 1 else ''}",
                     ["-" if c is None else f"{c['0.1']['n_sun']} / {c['n_structures']}" for c in cells]))
    return names, rows


def _given_lines(result: dict) -> list[str]:
    return [f"- **{name}** ({g['kind']}, `{g['model']}`): {g['given']}" for name, g in result["generators"].items()]


def comparison_markdown(result: dict, images: Sequence[str] = ()) -> str:
    names, rows = summary_rows(result)
    parts = [f"# {result['title']}", "", result["description"], "", "What each path is given:", ""]
    parts += _given_lines(result) + [""]
    parts += ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    parts += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows]
    parts += ["", *result.get("notes", []), "", f"Command: `{result['command']}`", ""]
    parts += [f"![{Path(i).stem}]({i})" for i in images] + [""]
    return "\n".join(parts)


def comparison_html(result: dict, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the same tables as the Markdown, the plots embedded as data URIs."""
    names, rows = summary_rows(result)
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join("<tr><td>" + esc(label) + "</td>" + "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>"
                   for label, vals in rows)
    given = "".join(f"<li><b>{esc(n)}</b> ({esc(g['kind'])}, <code>{esc(str(g['model']))}</code>): {esc(g['given'])}</li>"
                    for n, g in result["generators"].items())
    notes = "".join(f"<p>{esc(n)}</p>" for n in result.get("notes", []))
    figs = "".join(f'<figure><img alt="{esc(Path(name).stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(data).decode("ascii")}"><figcaption>{esc(Path(name).stem)}</figcaption></figure>'
                   for name, data in images.items())
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}td+td,th+th{text-align:right}"
             "tr:nth-child(even){background:#f6f6f6}figure{display:inline-block;margin:.5em}img{max-width:520px}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(result['title'])}</title>"
            f"<style>{style}</style></head><body><h1>{esc(result['title'])}</h1><p>{esc(result['description'])}</p>"
            f"<p>What each path is given:</p><ul>{given}</ul><table><tr><th>metric</th>{head}</tr>{body}</table>"
            f"{notes}<p>Command: <code>{esc(result['command'])}</code></p>{figs}</body></html>\n")


# ------------------------------------------------------------------------------------------- plots
def _plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = result["generators"]
    written = []
    # element frequencies: the 30 most frequent elements of the test formulas
    ref = next((_get(g, "formula_metrics", "histograms", "element_frequency", "reference") for g in gens.values()
                if _get(g, "formula_metrics", "histograms", "element_frequency", "reference")), None)
    if ref:
        top = sorted(ref, key=ref.get, reverse=True)[:30]
        series = {"test": [ref[e] for e in top]}
        for name, g in gens.items():
            freq = _get(g, "formula_metrics", "histograms", "element_frequency", "generated") or {}
            series[name] = [freq.get(e, 0.0) for e in top]
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / len(series)
        for k, (name, vals) in enumerate(series.items()):
            ax.bar(np.arange(len(top)) + (k - (len(series) - 1) / 2) * width, vals, width=width, label=name)
        ax.set_xticks(range(len(top)), top, fontsize=8)
        ax.set_ylabel("share of formulas containing it (normalised)")
        ax.set_title("element frequencies (30 most frequent in the test formulas)", fontsize=9)
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / "element_frequency.png"))
    # distinct elements per structure (valid structures) vs the test set
    nelem = {name: _get(g, "structure_metrics", "histograms", "num_elems", "generated") for name, g in gens.items()}
    ref_n = next((_get(g, "structure_metrics", "histograms", "num_elems", "reference") for g in gens.values()
                  if _get(g, "structure_metrics", "histograms", "num_elems", "reference")), None)
    if ref_n:
        series = {"test": ref_n, **{k: v for k, v in nelem.items() if v}}
        ticks = sorted({int(x) for h in series.values() for x in h})
        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / len(series)
        for k, (name, h) in enumerate(series.items()):
            ax.bar([t + (k - (len(series) - 1) / 2) * width for t in ticks], [h.get(str(t), 0.0) for t in ticks],
                   width=width, label=name)
        ax.set_xticks(ticks)
        ax.set_xlabel("distinct elements per valid structure")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / "n_elements.png"))
    dens = result.get("density_histograms")
    if dens and len(dens) > 1:
        edges = np.asarray(dens["bin_edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, h in dens.items():
            if name == "bin_edges":
                continue
            if name == "test":
                ax.bar(centers, h, width=np.diff(edges), alpha=0.35, color="grey", label="test")
            else:
                ax.step(centers, h, where="mid", label=name)
        ax.set_xlabel("density (g/cm³) of valid structures")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / "density.png"))
    for key, label, fname in (("energy_per_atom", "energy (eV/atom)", "energy.png"),
                              ("formation_energy_per_atom", "formation energy (eV/atom)", "formation_energy.png")):
        values = {name: _get(g, "energy", "values", key) for name, g in gens.items()}
        values = {k: v for k, v in values.items() if v}
        if not values:
            continue
        pooled = np.concatenate([np.asarray(v) for v in values.values()])
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, v in values.items():
            ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, histtype="step", density=True, label=name)
        if key == "formation_energy_per_atom":
            ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(label + " of relaxed structures")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / fname))
    return written


def write_comparison(result: dict, out_dir: str | Path, plots: bool = True) -> list[str]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` and the PNG plots into ``out_dir``, each
    atomically; returns the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _plots(result, out_dir) if plots else []
    write_json(out_dir / "metrics.json", json_safe(result))
    write_text(out_dir / "report.md", comparison_markdown(result, images))
    write_text(out_dir / "report.html", comparison_html(result, {i: (out_dir / i).read_bytes() for i in images}))
    return ["metrics.json", "report.md", "report.html", *images]

