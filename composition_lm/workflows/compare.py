"""Comparison of generators in one call: formula LM + templates against CDVAE on one dataset, one metric suite.

Every generator runs through the Python API (:class:`composition_lm.FormulaGenerator`,
:class:`structure.StructurePredictor`, :class:`structure.cdvae.CDVAE`, :class:`structure.stability.StabilityScorer`)
and writes the outputs its own command would write; the scores come from the functions behind ``evaluate`` and
``evaluate-structures``. ``composition-gen compare`` is :func:`compare` behind its options::

    from composition_lm.workflows.compare import CompareOptions, compare

    result = compare(CompareOptions(dataset=Path("../shared/data/structures/mp_20"), output=Path("cmp"),
                                    lms=["diffusion-bert"], cdvae="cdvae-mp20", n=100))
    result["generators"]["cdvae-mp20"]["structure_metrics"]["cov_recall"]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.io import shown_path

__all__ = ["CompareOptions", "RelaxOptions", "compare"]


@dataclass
class RelaxOptions:
    """How ``compare --relax`` relaxes and judges: the relaxing ``potential`` (None: the default), the ``judges``,
    the energy-scale ``correction``, the :class:`structure.relax.RelaxSettings` and the reference hull table."""

    potential: str | Path | None = None
    judges: list | None = None
    correction: str = "auto"
    settings: object = None
    reference: Path | None = None


@dataclass
class CompareOptions:
    """What :func:`compare` runs: ``lms`` (formula models, each sampled and given templates) and ``cdvae`` on
    ``dataset`` (a folder of ``<split>.csv(.gz)`` files), ``n`` samples each with ``seed``; ``relax`` (None: no
    relaxation) relaxes and judges both paths; the rest are ``compare``'s options of the same names."""

    dataset: Path
    output: Path
    lms: list[str] = field(default_factory=list)
    cdvae: str | None = None
    n: int = 1000
    seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    templates: Path | None = None
    relax: RelaxOptions | None = None
    references: Path | None = None
    cov_dataset: str | None = None
    compscaler: Path | None = None
    cache: Path | None = None
    coverage: bool = True
    plots: bool = True
    workers: int = 1
    progress: bool = False
    command: str = ""


def _formulas(path: Path) -> list[str]:
    """The distinct formulas of a dataset split (its CIFs' formulas)."""
    from composition_lm.data import load_corpus

    ds, report = load_corpus(str(path), dedupe=True)
    print(f"  {Path(path).name.split('.')[0]}: {report.n_kept} distinct formulas", file=sys.stderr)
    return ds["formula"]


def _generator_name(model: str, prefix: str, taken: dict) -> str:
    """A folder-safe, unique name for a generator: ``lm-diffusion-bert``, ``cdvae-perov5``, ..."""
    stem = Path(str(model).rstrip("/")).name
    if stem == "model":  # a training run's export folder: name it after the run
        stem = Path(str(model).rstrip("/")).parent.name
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    name = name if name.startswith(prefix) else f"{prefix}-{name}"
    taken[name] = taken.get(name, 0) + 1
    return name if taken[name] == 1 else f"{name}-{taken[name]}"


def _reference_store(opts: CompareOptions, store, store_dir: Path, out: Path) -> Path | None:
    """One store of elemental structures for both paths' formation energies: --references, else the
    training store when it holds single-element structures, else the AFLOW prototypes (saved once)."""
    from structure.templates import aflow_store

    if opts.relax is None:
        return None
    if opts.references is not None:
        return opts.references
    if len(store.rows_with_key("1")):
        return store_dir
    refs = out / "references"
    if not (refs / "store.json").is_file():
        aflow_store().save(refs)
    return refs


def _score_generator(gen_dir: Path, samples: list[str], context: dict, opts: CompareOptions) -> dict:
    """The metric suite of one generator's outputs in ``gen_dir`` (see :mod:`evaluation.compare`)."""
    import pandas as pd

    from evaluation.compare import energy_summary, structure_novelty, unique_novel_flags
    from evaluation.metrics import formula_set_metrics
    from evaluation.structures import composition_validity, evaluate_structures, structure_validity
    from structure.io import read_generated_structures

    fm = formula_set_metrics(samples, context["train_formulas"], None, context["test_formulas"], ("cdvae", "smact"))
    structures, _ = read_generated_structures(gen_dir) if (gen_dir / "structures.extxyz").stat().st_size else ([], "")
    readable = [s for s in structures if s is not None]
    out = {"formula_metrics": fm, "counts": {"samples": len(samples), "structures": len(structures)}}
    if structures:
        out["structure_metrics"] = evaluate_structures(
            structures, context["reference"], dataset=context["cov_dataset"], compscaler=context["compscaler"],
            workers=opts.workers, cache_dir=context["cache"], progress=opts.progress,
            coverage_metrics=opts.coverage)
        out["structure_novelty"] = structure_novelty(readable, context["training_structures"])
        if opts.relax is not None:
            out["_flags"] = unique_novel_flags(structures, context["training_by_formula"])
            out["_n_elements"] = [len(s.composition) if s is not None else 0 for s in structures]
        valid = [s for s in readable if structure_validity(s)[0] and composition_validity(s)[0]]
        out["densities"] = [float(s.density) for s in valid]
    if opts.relax is not None:
        table = pd.read_csv(gen_dir / "structures.csv", keep_default_na=False, na_values=[""])
        with_structure = table[table["status"].isin(["converged", "not_converged", "failed"])]
        out["energy"] = energy_summary(with_structure["energy_per_atom"].tolist(),
                                       with_structure["formation_energy_per_atom"].tolist(), len(with_structure))
        out["_e_hull"] = _e_hull(gen_dir / "stability.csv", len(with_structure))
    return out


def _e_hull(stability_csv: Path, n: int) -> list[float]:
    """E_hull (eV/atom; NaN when not placed, or only a lower bound) of each of the ``n`` structures, from the
    ``stability.csv`` the scorer wrote beside them (rows in the order of ``structures.csv``'s structures)."""
    import math

    import pandas as pd

    table = pd.read_csv(stability_csv, keep_default_na=False, na_values=[""])
    if len(table) != n:
        raise ValueError(f"{stability_csv}: {len(table)} rows for {n} structures")
    bound = table["hull_lower_bound"].astype(str).str.lower().isin(["true", "1"])
    return [math.nan if b or not math.isfinite(e) else float(e)
            for e, b in zip(table["e_hull_per_atom"].astype(float), bound)]


def _by_formula(structures) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in structures:
        out.setdefault(s.composition.reduced_formula, []).append(s)
    return out


def _store_source(store_dir: Path) -> str | None:
    """The source a saved template store was built from (None when there is no store)."""
    path = store_dir / "store.json"
    return json.loads(path.read_text())["meta"].get("source") if path.is_file() else None


def _relax_and_score(rows, gen_dir: Path, scorer, opts: CompareOptions) -> None:
    """Relax the rows' structures in place and write their E_hull to ``gen_dir/stability.csv`` (as `stability`
    writes it), when there is a scorer."""
    from structure.stability import write_stability

    if scorer is not None:
        gen_dir.mkdir(parents=True, exist_ok=True)
        write_stability(scorer.score_rows(rows, workers=opts.workers, progress=opts.progress),
                        gen_dir / "stability.csv")


def _run_lm(lm: str, gen_dir: Path, predictor, scorer, opts: CompareOptions) -> dict:
    """Sample ``opts.n`` formulas with ``lm`` and give each its top-1 template structure (relaxed and judged by
    ``scorer`` unless None): ``formulas.csv``, ``run_config.json``, the structure files and ``stability.csv`` in
    ``gen_dir``."""
    from composition_lm.workflows import save_samples
    from composition_lm.generator import FormulaGenerator
    from structure.io import write_outputs

    t0 = time.perf_counter()
    gen = FormulaGenerator.from_pretrained(lm)
    table = gen.generate(opts.n, seed=opts.seed)
    t_sampled = time.perf_counter()
    summary = save_samples(gen, table, gen_dir, {"command": opts.command}, t0, t_sampled)
    t_sample = time.perf_counter() - t0
    rows = predictor.predict(table["formula"].tolist(), top_k=1, seed=opts.seed)
    _relax_and_score(rows, gen_dir, scorer, opts)
    write_outputs(rows, gen_dir)
    elapsed = time.perf_counter() - t0
    print(f"{gen_dir.name}: {opts.n} formulas (cdvae validity {summary['validity_cdvae']:.3f}) -> "
          f"{sum(r.structure is not None for r in rows)} structures in {elapsed:.1f} s", file=sys.stderr)
    return {"model": shown_path(gen.path),
            "timing": {"sample_s": t_sample, "structures_s": elapsed - t_sample, "generate_s": elapsed}}


def _run_cdvae(model_dir: Path, gen_dir: Path, scorer, opts: CompareOptions) -> dict:
    """Sample ``opts.n`` crystals with the CDVAE in ``model_dir`` (relaxed and judged by ``scorer`` unless None)."""
    from structure.cdvae import CDVAE
    from structure.cdvae.sampling import to_rows
    from structure.io import write_outputs

    t0 = time.perf_counter()
    model = CDVAE.from_pretrained(model_dir)
    rows = to_rows(model.sample(opts.n, seed=opts.seed))
    _relax_and_score(rows, gen_dir, scorer, opts)
    write_outputs(rows, gen_dir)
    elapsed = time.perf_counter() - t0
    print(f"{gen_dir.name}: {opts.n} crystals in {elapsed:.1f} s", file=sys.stderr)
    return {"config": model.config, "sampling": model.sampling_config, "timing": {"generate_s": elapsed}}


def _checked_inputs(opts: CompareOptions) -> tuple[dict, Path, Path | None]:
    """The train and test split files, the Magpie constants and the CDVAE folder, every one checked (and every
    potential loaded) before any work, so a bad input fails in seconds."""
    from evaluation.structures import DEFAULT_COMPSCALER
    from structure.cdvae.model import resolve_model
    from structure.cdvae.train import split_file

    if not opts.lms and not opts.cdvae:
        raise ValueError("give at least one generator: --lm MODEL (repeatable) and/or --cdvae MODEL")
    if not opts.dataset.is_dir():
        raise FileNotFoundError(f"--dataset {opts.dataset}: not a folder of <split>.csv(.gz) files")
    files = {}
    for role, split in (("train", opts.train_split), ("test", opts.test_split)):
        files[role] = split_file(opts.dataset, split)
        if files[role] is None:
            found = ", ".join(sorted(p.name for p in opts.dataset.glob("*.csv*"))) or "nothing"
            raise FileNotFoundError(f"{opts.dataset}: no {split}.csv(.gz) for the {role} split (found: {found}); "
                                    f"choose it with --{role}-split")
    compscaler = opts.compscaler or DEFAULT_COMPSCALER
    if not Path(compscaler).is_file():
        raise FileNotFoundError(f"COV-R / COV-P need CDVAE's Magpie constants: no file at {compscaler} (--compscaler)")
    cdvae_dir = resolve_model(opts.cdvae) if opts.cdvae else None
    if opts.relax is not None:
        from structure.potentials import get_potential

        for name in [opts.relax.potential, *(opts.relax.judges or [])]:
            get_potential(name)
    return files, Path(compscaler), cdvae_dir


def compare(opts: CompareOptions) -> dict:
    """Run every generator of ``opts`` and score them (see the module docstring); writes ``metrics.json``,
    ``report.md``, ``report.html``, the plots and each generator's outputs to ``opts.output``, and returns the
    result (``metrics.json``'s content, with ``paths``, the files written)."""
    from composition_lm.data import read_samples
    from evaluation.compare import write_comparison
    from evaluation.structures import infer_dataset
    from structure import StructurePredictor
    from structure.io import read_structures
    from structure.templates import TemplateStore

    files, compscaler, cdvae_dir = _checked_inputs(opts)
    out = opts.output
    out.mkdir(parents=True, exist_ok=True)
    cov_dataset = opts.cov_dataset or infer_dataset(opts.dataset) or "mp20"

    print(f"reading {files['train']} and {files['test']}", file=sys.stderr)
    training = list(read_structures(files["train"]))
    context = {
        "train_formulas": _formulas(files["train"]), "test_formulas": _formulas(files["test"]),
        "reference": [r.structure for r in read_structures(files["test"])],
        "training_structures": [r.structure for r in training], "cov_dataset": cov_dataset,
        "training_by_formula": _by_formula(r.structure for r in training),
        "compscaler": compscaler, "cache": opts.cache or out.resolve().parent / ".fingerprint_cache",
    }
    store_dir = opts.templates or out / "templates"
    if opts.templates is None and _store_source(store_dir) != str(files["train"]):  # none yet, or of other data
        TemplateStore.build(training, source=str(files["train"]), progress=opts.progress).save(store_dir)
    store = TemplateStore.load(store_dir)
    print(f"templates: {len(store)} structures in {store_dir}", file=sys.stderr)
    references = _reference_store(opts, store, store_dir, out)
    scorer, relaxed = None, ""
    if opts.relax is not None:
        from structure.stability import StabilityScorer

        r, settings = opts.relax, opts.relax.settings
        scorer = StabilityScorer(r.potential, settings=settings, reference=r.reference,
                                 references=opts.references or references, cache_dir=opts.output,
                                 correction=r.correction, judges=r.judges)
        relaxed = (f"; E_hull: {scorer.describe()} ({settings.optimizer}, fmax {settings.fmax} eV/Å, at most "
                   f"{settings.max_steps} steps; elemental references: the shipped MP ground states, checked against "
                   f"{opts.references or references}; reference hull: {shown_path(scorer.hull.source)})")

    generators: dict[str, dict] = {}
    taken: dict[str, int] = {}
    if opts.lms:
        predictor = StructurePredictor(store)
    for lm in opts.lms:
        name = _generator_name(lm, "lm", taken)
        gen_dir = out / name
        run = _run_lm(lm, gen_dir, predictor, scorer, opts)
        generators[name] = {
            "kind": "formula LM + templates", "model": run["model"],
            "given": (f"{opts.n} formulas sampled by the language model (seed {opts.seed}); those failing the cdvae "
                      f"validity check are dropped; each other formula gets its top-1 template structure (learned "
                      f"ranking, grouped by structure type) from the {len(store)} known structures of the dataset's "
                      f"`{opts.train_split}` split, with its elements substituted, so it can only re-use known "
                      f"structure types{relaxed}"),
            "timing": run["timing"],
            **_score_generator(gen_dir, read_samples(gen_dir / "formulas.csv"), context, opts),
        }
    if opts.cdvae:
        name = _generator_name(opts.cdvae, "cdvae", taken)
        gen_dir = out / name
        run = _run_cdvae(cdvae_dir, gen_dir, scorer, opts)
        cfg, sampling = run["config"], run["sampling"]
        generators[name] = {
            "kind": "CDVAE", "model": shown_path(cdvae_dir),
            "given": (f"{opts.n} crystals decoded from latents drawn from the prior (seed {opts.seed}) by annealed "
                      f"Langevin dynamics ({sampling.levels} levels x {sampling.steps} steps); the model "
                      f"learnt from: {(cfg.trained or {}).get('data', 'see its model card')}; no template, and no "
                      f"validity filter{relaxed}"),
            "timing": run["timing"],
            **_score_generator(gen_dir, read_samples(gen_dir / "structures.csv", "formula"), context, opts),
        }
    result = _result(opts, generators, context, scorer, store_dir, cov_dataset)
    result["paths"] = write_comparison(result, out, plots=opts.plots)
    return result


def _result(opts: CompareOptions, generators: dict, context: dict, scorer, store_dir: Path, cov_dataset: str) -> dict:
    """``metrics.json``'s content: each generator's scores with its SUN summary and time per valid structure, the
    density histograms, and what was compared how."""
    import platform

    from evaluation.compare import density_histograms, sun_summary

    for g in generators.values():
        n_valid = (g.get("structure_metrics") or {}).get("n_valid") or 0
        g["timing"]["per_valid_structure_s"] = g["timing"]["generate_s"] / n_valid if n_valid else None
        e_hull, flags, n_elements = g.pop("_e_hull", None), g.pop("_flags", None), g.pop("_n_elements", None)
        if e_hull is not None:
            g["sun"] = sun_summary(e_hull, flags or [], opts.n, g["timing"]["generate_s"], n_elements=n_elements)
    densities = {"test": [float(s.density) for s in context["reference"]]}
    densities.update({n: g.pop("densities") for n, g in generators.items() if "densities" in g})
    result = {
        "title": f"Generators compared on {opts.dataset.name}",
        "description": (f"Each path had the same budget of {opts.n} samples (seed {opts.seed}). Formula metrics are "
                        f"those of `composition-gen evaluate` against the `{opts.train_split}` formulas (novelty) "
                        f"and the `{opts.test_split}` formulas (distances); structure metrics those of "
                        f"`composition-gen evaluate-structures` against the {len(context['reference'])} "
                        f"`{opts.test_split}` structures (COV cut-offs of {cov_dataset}), computed on the structures "
                        f"each path produced. Wall times cover generation (and relaxation), not scoring."),
        "notes": [
            "Definitions: composition validity of the samples counts every sample (an unparseable or invalid one "
            "fails); structure metrics count the structures produced, so a path that drops invalid formulas "
            "scores high composition validity on its structures. Structure uniqueness: structures matching no "
            "earlier one (StructureMatcher, pymatgen defaults); novelty: unique structures matching no training "
            "structure of the same composition. Valid = structure + composition valid (+ a fingerprint).",
            *([f"Stability: {scorer.describe()}; each generator's E_hull is in its stability.csv. Elemental "
               "reference energies are relaxed once per element and potential and cached, so the first path to "
               "meet an element pays for it in its wall time."] if scorer is not None else []),
        ],
        "command": opts.command, "dataset": str(opts.dataset), "train_split": opts.train_split,
        "test_split": opts.test_split, "n": opts.n, "seed": opts.seed, "relaxed": opts.relax is not None,
        "stability": scorer.describe() if scorer is not None else None, "machine": platform.platform(),
        "templates": str(store_dir), "generators": generators,
        "density_histograms": density_histograms(densities),
    }
    return result
