"""The outputs of the discovery funnel: ``candidates.csv``, ``sun.csv``, ``sun_cif.zip``, ``funnel.json``,
``report.md`` and a self-contained ``report.html`` (funnel chart, E_hull histogram, hull diagrams of the best
candidates' chemical systems). The funnel itself lives in :mod:`structure.discovery`; this module only
writes what it found."""

from __future__ import annotations

import base64
import html
import io
import math
import zipfile
from pathlib import Path

from evaluation.io import atomic_path, json_safe, write_csv, write_json, write_text

__all__ = ["SUN_COLUMNS", "write_discovery"]

SUN_COLUMNS = ["index", "formula", "e_hull_per_atom", "e_form_per_atom", "energy_per_atom", "decomposition",
               "template_id", "novel_formula"]


def _round(v):
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def _plots(rows: list[dict], result: dict, hull, best: dict, sun_rows: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}

    def keep(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        images[name] = buf.getvalue()

    counts = result["counts"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh(list(counts)[::-1], list(counts.values())[::-1], color="#4c72b0")
    for y, v in enumerate(list(counts.values())[::-1]):
        ax.text(v, y, f" {v}", va="center")
    secs = result["seconds"]
    ax.set_title("funnel (samples reaching each stage); " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in secs.items()))
    ax.set_xlabel("samples")
    keep("funnel.png", fig)
    e = [r["e_hull_per_atom"] for r in rows if r.get("best") and r["e_hull_per_atom"] is not None]
    if e:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.hist([min(max(x, -0.5), 1.5) for x in e], bins=40, color="#55a868")
        ax.axvline(result["e_hull_max"], color="k", ls="--", lw=1)
        ax.set_xlabel("E_hull (eV/atom, clipped to [-0.5, 1.5])")
        ax.set_ylabel("samples")
        keep("e_hull.png", fig)
    from pymatgen.analysis.phase_diagram import PDPlotter

    systems = []
    for r in sun_rows:
        els = tuple(sorted({el.symbol for el in best[r["index"]].composition.elements}))
        if 2 <= len(els) <= 3 and els not in systems:
            systems.append(els)
        if len(systems) == 3:
            break
    for els in systems:
        try:
            pd = hull.phase_diagram(els)
            ax = PDPlotter(pd, backend="matplotlib", show_unstable=0).get_plot()
            keep(f"hull_{'-'.join(els)}.png", ax.get_figure())
        except Exception:  # a plot is a nicety: never lose the run's outputs over it
            continue
    return images


def _markdown(result: dict, sun_rows: list[dict], images) -> str:
    c, rate = result["counts"], result["sun_rate"]
    key = f"{result['e_hull_max']:g}"
    lines = [f"# Discovery: {result['n_formulas']} formulas", "",
             f"SUN (stable, unique, novel) per formula: **{100 * rate[key]:.2f} %** at "
             f"E_hull ≤ {result['e_hull_max']:g} eV/atom, {100 * rate['0']:.2f} % at E_hull ≤ 0 "
             f"({sum(result['seconds'].values()) / 60:.1f} min; energies: {result.get('potential', 'M3GNet')}; "
             f"reference hull {result['reference_hull']}; templates "
             f"{result['templates']}).", "", "| stage | samples |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in c.items()]
    lines += ["", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in result["seconds"].items()]
    lines += ["", "## Best SUN candidates", "", "| formula | E_hull (eV/atom) | E_form (eV/atom) | decomposition |",
              "|---|---:|---:|---|"]
    lines += [f"| {r['formula']} | {r['e_hull_per_atom']:.3f} | {r['e_form_per_atom']:.3f} | {r['decomposition']} |"
              for r in sun_rows[:20]]
    lines += ["", *[f"![{Path(n).stem}]({n})" for n in images]]
    return "\n".join(lines) + "\n"


def _html(markdown_text: str, result: dict, sun_rows: list[dict], images: dict[str, bytes]) -> str:
    esc = html.escape
    c = result["counts"]
    table = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in c.items())
    secs = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f}</td></tr>" for k, v in result["seconds"].items())
    sun = "".join(f"<tr><td>{esc(r['formula'])}</td><td>{r['e_hull_per_atom']:.3f}</td><td>{r['e_form_per_atom']:.3f}"
                  f"</td><td>{esc(r['decomposition'] or '')}</td></tr>" for r in sun_rows[:20])
    figs = "".join(f'<figure><img alt="{esc(Path(n).stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(d).decode("ascii")}"><figcaption>{esc(Path(n).stem)}</figcaption></figure>'
                   for n, d in images.items())
    first = esc(markdown_text.splitlines()[2]).replace("**", "")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "figure{display:inline-block;margin:.5em}img{max-width:520px}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Discovery</title><style>{style}"
            f"</style></head><body><h1>Discovery: {result['n_formulas']} formulas</h1><p>{first}</p>"
            f"<table><tr><th>stage</th><th>samples</th></tr>{table}</table>"
            f"<table><tr><th>stage</th><th>seconds</th></tr>{secs}</table><h2>Best SUN candidates</h2>"
            f"<table><tr><th>formula</th><th>E_hull</th><th>E_form</th><th>decomposition</th></tr>{sun}</table>"
            f"{figs}</body></html>\n")


def write_discovery(out: Path, rows: list[dict], sun_rows: list[dict], best: dict, result: dict, columns: list[str],
                    hull, plots: bool = True) -> list[str]:
    """Write the funnel's outputs to ``out`` (each to a temporary file renamed into place)."""
    from pymatgen.io.cif import CifWriter

    write_csv(out / "candidates.csv", columns, ([_round(r.get(c)) for c in columns] for r in rows))
    write_csv(out / "sun.csv", SUN_COLUMNS, ([_round(r.get(c)) for c in SUN_COLUMNS] for r in sun_rows))
    with atomic_path(out / "sun_cif.zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, r in enumerate(sun_rows, start=1):
            zf.writestr(f"{k:04d}_{r['formula']}_{r['index']:05d}.cif", str(CifWriter(best[r["index"]])))
    write_json(out / "funnel.json", json_safe(result))
    images = _plots(rows, result, hull, best, sun_rows) if plots else {}
    for name, data in images.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    md = _markdown(result, sun_rows, images)
    write_text(out / "report.md", md)
    write_text(out / "report.html", _html(md, result, sun_rows, images))
    return ["candidates.csv", "sun.csv", "sun_cif.zip", "funnel.json", "report.md", "report.html", *images]
