"""Write a metrics dictionary as ``metrics.json``, a Markdown summary and PNG plots."""

from __future__ import annotations

from pathlib import Path

from evaluation.io import atomic_path, write_json, write_text

__all__ = ["metrics_markdown", "metrics_table", "save_figure", "write_report"]


def save_figure(fig, path: str | Path) -> str:
    """Lay out ``fig``, write it as a PNG atomically, close it; returns the file name."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.name


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def metrics_table(named: dict[str, dict]) -> str:
    """One Markdown table, a column per metrics dict (e.g. several generators side by side)."""
    names = list(named)
    rows: list[tuple[str, list]] = []

    def row(label, getter):
        vals = []
        for m in named.values():
            try:
                vals.append(getter(m))
            except (KeyError, TypeError):
                vals.append("-")
        rows.append((label, vals))

    row("samples", lambda m: m["n_samples"])
    row("parse rate", lambda m: m["parse_rate"])
    protos = sorted({p for m in named.values() for p in m.get("validity", {})})
    for p in protos:
        row(f"validity ({p}, raw)", lambda m, p=p: m["validity"][p]["raw"])
        row(f"validity ({p}, unique)", lambda m, p=p: m["validity"][p]["unique"])
    row("uniqueness", lambda m: m["uniqueness"])
    row("novelty", lambda m: m["novelty"])
    for p in protos:
        row(f"valid-novel-unique ({p})", lambda m, p=p: m["valid_novel_unique"][p])
    rec = sorted({k for m in named.values() for k in m.get("recovery", {})})
    for k in rec:
        row(f"recovery of {k}", lambda m, k=k: m["recovery"][k]["recovery"])
    row("element JS divergence", lambda m: m["distribution"]["element_js"])
    row("#elements Wasserstein", lambda m: m["distribution"]["n_elements_wasserstein"])
    row("atoms/formula Wasserstein", lambda m: m["distribution"]["n_atoms_wasserstein"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |" for label, vals in rows]
    return "\n".join(lines)


def metrics_markdown(metrics: dict, title: str = "Formula-set metrics", sources: dict | None = None) -> str:
    parts = [f"# {title}", ""]
    if sources:
        parts += [f"- **{k}**: `{v}`" for k, v in sources.items()] + [""]
    parts.append(metrics_table({"value": metrics}))
    parts += ["", "Definitions: see `evaluation/metrics.py`. Plots: `element_frequency.png`, "
              "`n_elements.png`, `n_atoms.png`.", ""]
    return "\n".join(parts)


def _plot(metrics: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    hist = metrics.get("histograms", {})
    for key, xlabel in (("n_elements", "elements per formula"), ("n_atoms", "atoms per reduced formula")):
        if key not in hist:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, h in hist[key].items():
            xs = [int(k) for k in h]
            if key == "n_atoms":
                ax.step(xs, list(h.values()), where="mid", label=name)
            else:
                off = -0.2 if name == "generated" else 0.2
                ax.bar([x + off for x in xs], list(h.values()), width=0.4, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of formulas")
        if key == "n_atoms":
            ax.set_xlim(0, 80)
        ax.legend()
        written.append(save_figure(fig, out_dir / f"{key}.png"))
    ef = hist.get("element_frequency")
    if ef:
        ref = ef.get("reference", ef["generated"])
        top = sorted(ref, key=ref.get, reverse=True)[:50]
        fig, ax = plt.subplots(figsize=(12, 3.8))
        xs = range(len(top))
        ax.bar([x - 0.2 for x in xs], [ef["generated"][e] for e in top], width=0.4, label="generated")
        if "reference" in ef:
            ax.bar([x + 0.2 for x in xs], [ref[e] for e in top], width=0.4, label="reference")
        ax.set_xticks(list(xs), top, fontsize=7)
        ax.set_ylabel("element frequency")
        ax.legend()
        written.append(save_figure(fig, out_dir / "element_frequency.png"))
    return written


def write_report(metrics: dict, out_dir: str | Path, title: str = "Formula-set metrics", sources: dict | None = None,
                 plots: bool = True) -> list[str]:
    """Write ``metrics.json``, ``summary.md`` and (optionally) the plots; return the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"sources": sources or {}, **metrics}
    write_json(out_dir / "metrics.json", payload)
    write_text(out_dir / "summary.md", metrics_markdown(metrics, title, sources))
    files = ["metrics.json", "summary.md"]
    if plots:
        files += _plot(metrics, out_dir)
    return files
