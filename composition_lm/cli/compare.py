"""``composition-gen compare``: formula LM + templates against CDVAE on one dataset, with one metric suite.

Every generator runs through the Python API (:class:`composition_lm.FormulaGenerator`,
:class:`structure.StructurePredictor`, :class:`structure.cdvae.CDVAE`, :class:`structure.Relaxer`) and
writes the outputs its own command would write; the scores come from the functions behind ``evaluate`` and
``evaluate-structures``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from composition_lm.cli.options import (add_correction_argument, add_progress, add_relax_arguments, check_potentials,
                                        command_line, infer_dataset, load_spec, positive_int, quiet_console,
                                        relax_settings)
from evaluation.io import shown_path


def _generator_name(model: str, prefix: str, taken: dict) -> str:
    """A folder-safe, unique name for a generator: ``lm-diffusion-bert``, ``cdvae-perov5``, ..."""
    stem = Path(str(model).rstrip("/")).name
    if stem == "model":  # a training run's export folder: name it after the run
        stem = Path(str(model).rstrip("/")).parent.name
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    name = name if name.startswith(prefix) else f"{prefix}-{name}"
    taken[name] = taken.get(name, 0) + 1
    return name if taken[name] == 1 else f"{name}-{taken[name]}"


def _reference_store(args: argparse.Namespace, store, store_dir: Path, out: Path) -> Path | None:
    """One store of elemental structures for both paths' formation energies: --references, else the
    training store when it holds single-element structures, else the AFLOW prototypes (saved once)."""
    from structure.templates import aflow_store

    if not args.relax:
        return None
    if args.references is not None:
        return args.references
    if len(store.rows_with_key("1")):
        return store_dir
    refs = out / "references"
    if not (refs / "store.json").is_file():
        aflow_store().save(refs)
    return refs


def _score_generator(gen_dir: Path, samples: list[str], context: dict, args: argparse.Namespace) -> dict:
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
            workers=args.workers, cache_dir=context["cache"], progress=not args.no_progress,
            coverage_metrics=not args.no_coverage)
        out["structure_novelty"] = structure_novelty(readable, context["training_structures"])
        if args.relax:
            out["_flags"] = unique_novel_flags(structures, context["training_by_formula"])
            out["_n_elements"] = [len(s.composition) if s is not None else 0 for s in structures]
        valid = [s for s in readable if structure_validity(s)[0] and composition_validity(s)[0]]
        out["densities"] = [float(s.density) for s in valid]
    if args.relax:
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


def _relax_and_score(rows, gen_dir: Path, scorer, args: argparse.Namespace) -> None:
    """Relax the rows' structures in place and write their E_hull to ``gen_dir/stability.csv`` (as `stability`
    writes it), when there is a scorer."""
    from structure.stability import write_stability

    if scorer is not None:
        gen_dir.mkdir(parents=True, exist_ok=True)
        write_stability(scorer.score_rows(rows, workers=args.workers, progress=not args.no_progress),
                        gen_dir / "stability.csv")


def _run_lm(lm: str, gen_dir: Path, predictor, scorer, args: argparse.Namespace) -> dict:
    """Sample ``args.n`` formulas with ``lm`` and give each its top-1 template structure (relaxed and judged by
    ``scorer`` unless None): ``formulas.csv``, ``run_config.json``, the structure files and ``stability.csv`` in
    ``gen_dir``."""
    from composition_lm.workflows import save_samples
    from composition_lm.generator import FormulaGenerator
    from structure.io import write_outputs

    t0 = time.perf_counter()
    gen = FormulaGenerator.from_pretrained(lm)
    table = gen.generate(args.n, seed=args.seed)
    t_sampled = time.perf_counter()
    summary = save_samples(gen, table, gen_dir, {"command": command_line(args)}, t0, t_sampled)
    t_sample = time.perf_counter() - t0
    rows = predictor.predict(table["formula"].tolist(), top_k=1, seed=args.seed)
    _relax_and_score(rows, gen_dir, scorer, args)
    write_outputs(rows, gen_dir)
    elapsed = time.perf_counter() - t0
    print(f"{gen_dir.name}: {args.n} formulas (cdvae validity {summary['validity_cdvae']:.3f}) -> "
          f"{sum(r.structure is not None for r in rows)} structures in {elapsed:.1f} s", file=sys.stderr)
    return {"model": shown_path(gen.path),
            "timing": {"sample_s": t_sample, "structures_s": elapsed - t_sample, "generate_s": elapsed}}


def _run_cdvae(model_dir: Path, gen_dir: Path, scorer, args: argparse.Namespace) -> dict:
    """Sample ``args.n`` crystals with the CDVAE in ``model_dir`` (relaxed and judged by ``scorer`` unless None)."""
    from structure.cdvae import CDVAE
    from structure.cdvae.sampling import to_rows
    from structure.io import write_outputs

    t0 = time.perf_counter()
    model = CDVAE.from_pretrained(model_dir)
    rows = to_rows(model.sample(args.n, seed=args.seed))
    _relax_and_score(rows, gen_dir, scorer, args)
    write_outputs(rows, gen_dir)
    elapsed = time.perf_counter() - t0
    print(f"{gen_dir.name}: {args.n} crystals in {elapsed:.1f} s", file=sys.stderr)
    return {"config": model.config, "sampling": model.sampling_config, "timing": {"generate_s": elapsed}}


def cmd_compare(args: argparse.Namespace) -> int:
    import platform

    from composition_lm.data import read_samples
    from evaluation.compare import density_histograms, summary_rows, sun_summary, write_comparison
    from evaluation.structures import DEFAULT_COMPSCALER
    from structure import StructurePredictor
    from structure.cdvae.model import resolve_model
    from structure.cdvae.train import split_file
    from structure.io import read_structures
    from structure.templates import TemplateStore

    if not args.lm and not args.cdvae:
        raise ValueError("give at least one generator: --lm MODEL (repeatable) and/or --cdvae MODEL")
    if not args.dataset.is_dir():
        raise FileNotFoundError(f"--dataset {args.dataset}: not a folder of <split>.csv(.gz) files")
    files = {}
    for role, split in (("train", args.train_split), ("test", args.test_split)):
        files[role] = split_file(args.dataset, split)
        if files[role] is None:
            found = ", ".join(sorted(p.name for p in args.dataset.glob("*.csv*"))) or "nothing"
            raise FileNotFoundError(f"{args.dataset}: no {split}.csv(.gz) for the {role} split (found: {found}); "
                                    f"choose it with --{role}-split")
    compscaler = args.compscaler or DEFAULT_COMPSCALER
    if not Path(compscaler).is_file():
        raise FileNotFoundError(f"COV-R / COV-P need CDVAE's Magpie constants: no file at {compscaler} (--compscaler)")
    cdvae_dir = resolve_model(args.cdvae) if args.cdvae else None  # a bad model name fails before any work
    if args.relax:
        check_potentials(args)  # a bad potential fails before any work too
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    cov_dataset = args.cov_dataset or infer_dataset(args.dataset) or "mp20"

    print(f"reading {files['train']} and {files['test']}", file=sys.stderr)
    training = list(read_structures(files["train"]))
    context = {
        "train_formulas": load_spec(str(files["train"]))[1], "test_formulas": load_spec(str(files["test"]))[1],
        "reference": [r.structure for r in read_structures(files["test"])],
        "training_structures": [r.structure for r in training], "cov_dataset": cov_dataset,
        "training_by_formula": _by_formula(r.structure for r in training),
        "compscaler": compscaler, "cache": args.cache or out.resolve().parent / ".fingerprint_cache",
    }
    store_dir = args.templates or out / "templates"
    if args.templates is None and _store_source(store_dir) != str(files["train"]):  # none yet, or of other data
        TemplateStore.build(training, source=str(files["train"]), progress=not args.no_progress).save(store_dir)
    store = TemplateStore.load(store_dir)
    print(f"templates: {len(store)} structures in {store_dir}", file=sys.stderr)
    references = _reference_store(args, store, store_dir, out)
    scorer, relaxed = None, ""
    if args.relax:
        from structure.stability import StabilityScorer

        scorer = StabilityScorer(args.potential, settings=relax_settings(args), reference=args.reference,
                                 references=args.references or references, cache_dir=args.output,
                                 correction=args.correction, judges=args.judge)
        quiet_console()
        relaxed = (f"; E_hull: {scorer.describe()} ({args.optimizer}, fmax {args.fmax} eV/Å, at most "
                   f"{args.max_steps} steps; elemental references: the shipped MP ground states, checked against "
                   f"{args.references or references}; reference hull: {shown_path(scorer.hull.source)})")

    generators: dict[str, dict] = {}
    taken: dict[str, int] = {}
    if args.lm:
        predictor = StructurePredictor(store)
    for lm in args.lm or []:
        name = _generator_name(lm, "lm", taken)
        gen_dir = out / name
        run = _run_lm(lm, gen_dir, predictor, scorer, args)
        generators[name] = {
            "kind": "formula LM + templates", "model": run["model"],
            "given": (f"{args.n} formulas sampled by the language model (seed {args.seed}); those failing the cdvae "
                      f"validity check are dropped; each other formula gets its top-1 template structure (learned "
                      f"ranking, grouped by structure type) from the {len(store)} known structures of the dataset's "
                      f"`{args.train_split}` split, with its elements substituted, so it can only re-use known "
                      f"structure types{relaxed}"),
            "timing": run["timing"],
            **_score_generator(gen_dir, read_samples(gen_dir / "formulas.csv"), context, args),
        }
    if args.cdvae:
        name = _generator_name(args.cdvae, "cdvae", taken)
        gen_dir = out / name
        run = _run_cdvae(cdvae_dir, gen_dir, scorer, args)
        cfg, sampling = run["config"], run["sampling"]
        generators[name] = {
            "kind": "CDVAE", "model": shown_path(cdvae_dir),
            "given": (f"{args.n} crystals decoded from latents drawn from the prior (seed {args.seed}) by annealed "
                      f"Langevin dynamics ({sampling.levels} levels x {sampling.steps} steps); the model "
                      f"learnt from: {(cfg.trained or {}).get('data', 'see its model card')}; no template, and no "
                      f"validity filter{relaxed}"),
            "timing": run["timing"],
            **_score_generator(gen_dir, read_samples(gen_dir / "structures.csv", "formula"), context, args),
        }
    for g in generators.values():
        n_valid = (g.get("structure_metrics") or {}).get("n_valid") or 0
        g["timing"]["per_valid_structure_s"] = g["timing"]["generate_s"] / n_valid if n_valid else None
        e_hull, flags, n_elements = g.pop("_e_hull", None), g.pop("_flags", None), g.pop("_n_elements", None)
        if e_hull is not None:
            g["sun"] = sun_summary(e_hull, flags or [], args.n, g["timing"]["generate_s"], n_elements=n_elements)
    densities = {"test": [float(s.density) for s in context["reference"]]}
    densities.update({n: g.pop("densities") for n, g in generators.items() if "densities" in g})
    result = {
        "title": f"Generators compared on {args.dataset.name}",
        "description": (f"Each path had the same budget of {args.n} samples (seed {args.seed}). Formula metrics are "
                        f"those of `composition-gen evaluate` against the `{args.train_split}` formulas (novelty) "
                        f"and the `{args.test_split}` formulas (distances); structure metrics those of "
                        f"`composition-gen evaluate-structures` against the {len(context['reference'])} "
                        f"`{args.test_split}` structures (COV cut-offs of {cov_dataset}), computed on the structures "
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
        "command": command_line(args), "dataset": str(args.dataset), "train_split": args.train_split,
        "test_split": args.test_split, "n": args.n, "seed": args.seed, "relaxed": bool(args.relax),
        "stability": scorer.describe() if scorer is not None else None, "machine": platform.platform(),
        "templates": str(store_dir), "generators": generators,
        "density_histograms": density_histograms(densities),
    }
    paths = write_comparison(result, out, plots=not args.no_plots)
    names, rows = summary_rows(result)
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{n:>18}" for n in names))
    for label, vals in rows:
        print(f"{label:{width}}  " + "  ".join(f"{v:>18}" for v in vals))
    print(f"wrote {', '.join(paths)} and each generator's outputs to {out}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare formula-LM + templates against CDVAE on one dataset, with one metric suite",
        description="Run every generator with the same budget of N samples: each --lm samples formulas, drops "
        "invalid ones and takes a template structure from the dataset's training split; --cdvae samples whole "
        "crystals; --relax relaxes both with an interatomic potential (--potential). Score them all with the "
        "metrics of `evaluate` and "
        "`evaluate-structures` against the test split, plus structure uniqueness/novelty, energies and wall time "
        "per valid structure. Writes OUTPUT/report.md, a self-contained report.html, metrics.json, plots and "
        "each generator's outputs (OUTPUT/<generator>/structures.csv, structures_cif.zip, structures.extxyz).")
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR",
                   help="folder of CDVAE-style <split>.csv(.gz) files with a cif column (e.g. ../shared/data/structures/mp_20)")
    p.add_argument("--train-split", default="train",
                   help="split that gives the templates and the novelty reference (default: train; Perov-5: val)")
    p.add_argument("--test-split", default="test", help="split the metrics compare against (default: test)")
    p.add_argument("--lm", action="append", metavar="MODEL",
                   help="formula language model: folder, shipped name (diffusion-bert, diffusion-lm) or hub id; repeatable")
    p.add_argument("--cdvae", metavar="MODEL", help="CDVAE model folder or shipped name (cdvae-perov5, cdvae-mp20)")
    p.add_argument("-n", **positive_int, default=1000, help="samples per generator (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator (default: 0)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="a template store built from the training split (default: build one into OUTPUT/templates, "
                   "or reuse it when there)")
    add_relax_arguments(p)
    add_correction_argument(p)
    p.add_argument("--reference", type=Path, metavar="TABLE",
                   help="with --relax: reference hull for E_hull and the SUN rate (default: the shipped MP table)")
    p.add_argument("--cov-dataset", choices=["mp20", "perov5", "carbon24"],
                   help="COV cut-offs to use (default: guessed from the --dataset path, else mp20)")
    p.add_argument("--compscaler", type=Path, help="CDVAE's Magpie constants (default: the copy shipped in the package)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="fingerprint cache of the test structures (default: .fingerprint_cache beside OUTPUT)")
    p.add_argument("--no-coverage", action="store_true",
                   help="skip the CrystalNN / Magpie fingerprints: no COV-R / COV-P (their test-set fingerprints cost "
                   "about 0.05-0.5 s per structure on first use), everything else as usual")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (the HTML then has tables only)")
    add_progress(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_compare)
