"""The ``composition-gen`` console script: one command, one sub-command per job.

This module sits on top of the three packages and is the only one allowed to import all of them.
Heavy imports happen inside each sub-command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path

PROTOCOL_CHOICES = ("cdvae", "smact", "both")


def _protocols(choice: str) -> tuple[str, ...]:
    return ("cdvae", "smact") if choice == "both" else (choice,)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``PATH@SPLIT`` -> (PATH, SPLIT); a path that exists as written is taken whole."""
    if "@" in spec and not Path(spec).exists():
        path, split = spec.rsplit("@", 1)
        return path, split
    return spec, None


def _load_spec(spec: str, column: str | None = None) -> tuple[str, list[str]]:
    from composition_lm.data import load_corpus

    path, split = _split_spec(spec)
    ds, report = load_corpus(path, column=column, split=split, dedupe=True)
    name = Path(path).name.split(".")[0] + (f"@{split}" if split else "")
    print(f"  {name}: {report.n_kept} distinct formulas", file=sys.stderr)
    return name, ds["formula"]


# --------------------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from composition_lm.data import iter_rows
    from evaluation.composition import try_parse_formula
    from evaluation.io import atomic_path
    from evaluation.validity import check_formulas

    protocols = _protocols(args.protocol)
    t0 = time.perf_counter()
    rows = []
    for where, raw, payload in iter_rows(args.file, args.column):
        text = payload[0] if isinstance(payload, tuple) else payload
        if text.startswith("!"):
            rows.append((where, raw, None, text[1:]))
            continue
        f, err = try_parse_formula(text) if text.strip() else (None, "empty")
        rows.append((where, raw, f, err))
    if not rows:
        print(f"error: {args.file} holds no entries", file=sys.stderr)
        return 2
    parsed = [r[2] for r in rows if r[2] is not None]
    results = {p: iter(check_formulas(parsed, p, workers=args.workers)) for p in protocols}
    header = ["where", "input", "reduced_formula", "parse_error"]
    for p in protocols:
        header += [f"valid_{p}", f"charge_neutral_{p}", f"electronegativity_ok_{p}", f"reason_{p}"]
    stats = {p: Counter() for p in protocols}
    reasons = {p: Counter() for p in protocols}
    out_rows = []
    for where, raw, f, err in rows:
        line = [where, raw, str(f) if f else "", err]
        for p in protocols:
            if f is None:
                line += [False, False, False, f"unparseable: {err}"]
                reasons[p]["unparseable"] += 1
                continue
            r = next(results[p])
            line += [r.valid, r.charge_neutral, r.electronegativity_ok, r.reason]
            stats[p]["valid"] += r.valid
            if not r.valid:
                reasons[p][r.reason.split(":")[0]] += 1
        out_rows.append(line)

    def dump(fh):
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(out_rows)

    if args.output:
        with atomic_path(args.output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            dump(fh)
    else:
        dump(sys.stdout)
    dt = time.perf_counter() - t0
    n = len(rows)
    err = sys.stderr
    print(f"{n} entries, {len(parsed)} parsed, {len(set(parsed))} distinct formulas ({dt:.1f} s)", file=err)
    for p in protocols:
        print(f"  {p:6s} valid: {stats[p]['valid']}/{n} = {stats[p]['valid'] / n:.3f}", file=err)
        for reason, k in reasons[p].most_common(4):
            print(f"         {k:7d}  {reason}", file=err)
    if args.output:
        print(f"wrote {args.output}", file=err)
    return 0


# --------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.metrics import formula_set_metrics
    from evaluation.report import write_report

    samples = _read_samples(args.generated, args.column)
    if not samples:
        print(f"error: {args.generated} holds no samples", file=sys.stderr)
        return 2
    print(f"{len(samples)} generated samples from {args.generated}", file=sys.stderr)
    train = _load_spec(args.train, args.train_column)[1] if args.train else None
    heldout = dict(_load_spec(s, args.train_column) for s in args.heldout or [])
    if args.reference:
        reference = _load_spec(args.reference, args.train_column)[1]
        ref_name = args.reference
    elif heldout:
        ref_name, reference = next(iter(heldout.items()))
    else:
        ref_name, reference = None, None
    metrics = formula_set_metrics(samples, train, heldout, reference, _protocols(args.protocol))
    sources = {"generated": str(args.generated), "train": args.train, "heldout": args.heldout, "reference": ref_name}
    files = write_report(metrics, args.output, title=args.title or f"Metrics of {Path(args.generated).name}",
                         sources=sources, plots=not args.no_plots)
    from evaluation.report import metrics_table

    print(metrics_table({Path(args.generated).name: metrics}))
    print(f"wrote {', '.join(files)} to {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- evaluate-structures
_GENERATOR_OUTPUTS = ("structures.extxyz", "structures_cif.zip")  # what `composition-gen structure` writes
_DEFAULT_COMPSCALER = Path("../shared/data/cdvae_compscaler.json")


def _read_structure_csv(path: Path) -> list:
    """Structures of a CSV(.gz) with a ``cif`` column; an empty or unreadable CIF becomes None (invalid)."""
    import pandas as pd

    from structure.templates import structure_from_cif

    df = pd.read_csv(path)
    if "cif" not in df.columns:
        raise ValueError(f"{path}: a structure CSV needs a 'cif' column (columns: {', '.join(map(str, df.columns))})")
    out = []
    for cif in df["cif"]:
        try:
            out.append(structure_from_cif(cif) if isinstance(cif, str) and cif.strip() else None)
        except Exception:  # any parser error: the sample is unreadable, hence invalid
            out.append(None)
    return out


def _read_cif_zip(path: Path) -> list:
    """Structures of every ``*.cif`` member of a zip, by name; an unreadable CIF becomes None (invalid)."""
    import zipfile

    from structure.templates import structure_from_cif

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a readable zip file ({e})") from e
    with zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".cif"))
        if not names:
            raise ValueError(f"{path}: the zip holds no .cif files")
        out = []
        for name in names:
            try:
                out.append(structure_from_cif(zf.read(name).decode("utf-8", errors="replace")))
            except Exception:
                out.append(None)
    return out


def _read_generated_structures(path: Path) -> tuple[list, str]:
    """(structures, None for unreadable ones; the file actually read) of a generator output folder, a CSV
    with a cif column, a zip of CIFs, or anything :func:`structure.templates.read_structures` reads."""
    from structure.templates import read_structures

    if not path.exists():
        raise FileNotFoundError(f"no generated structures at {path}")
    if path.is_dir():
        outputs = [path / name for name in _GENERATOR_OUTPUTS if (path / name).is_file()]
        if outputs:  # a generator's output folder: one source only (extxyz first: exact coordinates)
            return _read_generated_structures(outputs[0])
        return [r.structure for r in read_structures(path)], str(path)
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return _read_structure_csv(path), str(path)
    if name.endswith(".zip"):
        return _read_cif_zip(path), str(path)
    try:
        return [r.structure for r in read_structures(path)], str(path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # ase / pymatgen parser errors
        raise ValueError(f"{path}: could not read structures ({type(e).__name__}: {e})") from e


def _infer_dataset(test: Path) -> str | None:
    text = str(test).lower().replace("-", "_")
    for hint, dataset in (("perov", "perov5"), ("carbon", "carbon24"), ("mp_20", "mp20"), ("mp20", "mp20")):
        if hint in text:
            return dataset
    return None


def cmd_evaluate_structures(args: argparse.Namespace) -> int:
    import itertools

    from evaluation.structures import COV_CUTOFFS, evaluate_structures, write_structure_report
    from structure.templates import read_structures

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.limit_test is not None and args.limit_test < 1:
        raise ValueError("--limit-test must be at least 1")
    dataset = args.dataset or _infer_dataset(args.test) or "mp20"
    if args.dataset is None:
        print(f"dataset: {dataset} (from the --test path; set --dataset to choose)", file=sys.stderr)
    compscaler = args.compscaler
    if not args.no_coverage:
        if compscaler is None:
            if not _DEFAULT_COMPSCALER.is_file():
                raise FileNotFoundError(f"COV-R / COV-P need CDVAE's Magpie scaling constants: pass --compscaler "
                                        f"PATH (not found at the default {_DEFAULT_COMPSCALER}), or --no-coverage")
            compscaler = _DEFAULT_COMPSCALER
        elif not compscaler.is_file():
            raise FileNotFoundError(f"--compscaler: no file at {compscaler}")
    if not args.test.exists():
        raise FileNotFoundError(f"--test: no reference structures at {args.test}")
    generated, source = _read_generated_structures(args.generated)
    if not generated:
        raise ValueError(f"{args.generated} holds no structures")
    reference = [r.structure for r in itertools.islice(read_structures(args.test), args.limit_test)]
    if not reference:
        raise ValueError(f"{args.test} holds no structures")
    n_bad = sum(s is None for s in generated)
    print(f"{len(generated)} generated structures from {source}" + (f" ({n_bad} unreadable)" if n_bad else "")
          + f"; {len(reference)} reference structures from {args.test}", file=sys.stderr)
    cache = None if args.no_cache else (args.cache or args.output.resolve().parent / ".fingerprint_cache")
    metrics = evaluate_structures(generated, reference, dataset=dataset, compscaler=compscaler, workers=args.workers,
                                  cache_dir=cache, progress=not args.no_progress,
                                  coverage_metrics=not args.no_coverage)
    sources = {"generated": source, "test": str(args.test), "limit_test": args.limit_test,
               "compscaler": str(compscaler) if compscaler else None, "fingerprint_cache": str(cache) if cache else None}
    files = write_structure_report(metrics, args.output, title=args.title or f"Structure metrics of "
                                   f"{args.generated.name}", sources=sources, plots=not args.no_plots)

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    cut = COV_CUTOFFS.get(dataset)
    print(f"struct valid {pct(metrics['struct_validity'])}  comp valid {pct(metrics['comp_validity'])}  "
          f"valid {pct(metrics['validity'])}  COV-R {pct(metrics['cov_recall'])}  COV-P {pct(metrics['cov_precision'])}  "
          f"wdist density {num(metrics['wdist_density'])}  wdist #elem {num(metrics['wdist_num_elems'])}"
          + (f"  (cut-offs {cut[0]} / {cut[1]})" if cut else ""))
    print(f"wrote {', '.join(files)} to {args.output}", file=sys.stderr)
    return 0


def _add_evaluate_structures_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate-structures",
        help="score generated crystal structures with CDVAE's metrics: validity, COV-R/COV-P, Wasserstein distances",
        description="CDVAE's generation metrics (Xie et al. 2022) of GENERATED against the test split --test: "
        "structural validity (all distances >= 0.5 Å, volume >= 0.1 Å³), composition validity (SMACT, cdvae "
        "protocol), COV-R / COV-P from CrystalNN and Magpie fingerprints with the dataset's cut-offs, and "
        "Wasserstein distances of density and number of elements (valid samples vs test). Unreadable generated "
        "entries count as invalid. Writes metrics.json, report.md, density.png and num_elements.png to -o DIR.",
    )
    p.add_argument("generated", type=Path, metavar="GENERATED",
                   help="generated structures: a `composition-gen structure` output folder (its structures.extxyz, "
                   "else structures_cif.zip), a CSV(.gz) with a cif column, an extxyz file, a zip of CIFs, a "
                   "CIF/POSCAR/pymatgen-JSON file or a folder of them")
    p.add_argument("--test", type=Path, required=True, metavar="TEST",
                   help="reference structures, e.g. ../shared/data/structures/mp_20/test.csv.gz (any format "
                   "`templates build` reads)")
    p.add_argument("--dataset", choices=["mp20", "perov5", "carbon24"],
                   help="COV cut-offs (structure / composition): mp20 0.4 / 10, perov5 and carbon24 0.2 / 4; also "
                   "picks the published CDVAE row of the report (default: guessed from the --test path, else mp20)")
    p.add_argument("--compscaler", type=Path, metavar="PATH",
                   help="JSON of CDVAE's Magpie means/stds (CompScalerMeans, CompScalerStds), needed for COV "
                   f"(default: {_DEFAULT_COMPSCALER} if it exists)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes computing fingerprints (CrystalNN takes 0.05-1 s per structure) (default: 1)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="folder caching the test set's fingerprints (.npz keyed by a hash of the structures and "
                   "library versions) (default: .fingerprint_cache beside the output folder)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the fingerprint cache")
    p.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test structures (quick runs; "
                   "numbers are then not comparable with published ones)")
    p.add_argument("--no-coverage", action="store_true",
                   help="skip fingerprints and COV-R / COV-P (validity and Wasserstein distances only; fast)")
    p.add_argument("--title", help="title of report.md")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_evaluate_structures)


# ------------------------------------------------------------------------------------------ train
def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded in trained models' cards."""
    import shlex

    argv = getattr(args, "_argv", None)
    return "composition-gen " + shlex.join(sys.argv[1:] if argv is None else argv)


def cmd_train(args: argparse.Namespace) -> int:
    from composition_lm.training import TrainingArguments, train

    targs = TrainingArguments(
        output_dir=str(args.output_dir), corpus=str(args.corpus), model_type=args.model, column=args.column,
        train_split=args.train_split or None, val_split=args.val_split or None, val_fraction=args.val_fraction,
        init_from=args.init_from, codec=args.codec, seq_length=args.seq_length, hidden_size=args.hidden_size,
        num_layers=args.layers, num_heads=args.heads, intermediate_size=args.intermediate_size, dropout=args.dropout,
        schedule=args.schedule, loss_weighting=args.loss_weighting, time_conditioning=args.time_conditioning,
        validity_conditioning=args.validity_conditioning, only_valid=args.only_valid,
        embedding_dim=args.embedding_dim, diffusion_steps=args.diffusion_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, max_steps=args.max_steps, ema_decay=args.ema_decay,
        mixed_precision=args.mixed_precision, seed=args.seed, eval_every=args.eval_every,
        eval_samples=args.eval_samples, save_every=args.save_every, resume=args.resume,
        stop_at_step=args.stop_at_step, progress=not args.no_progress,
    )
    out = train(targs, command=_command_line(args))
    if os.environ.get("RANK", "0") == "0":
        print(f"written to {out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- sample
def _element_list(text: str | None) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()] if text else []


def cmd_sample(args: argparse.Namespace) -> int:
    import json
    import platform

    import torch

    from composition_lm.models import load_model
    from composition_lm.sampling import Constraints, generate, resolve_sampling_settings
    from evaluation.io import atomic_path, write_json
    from evaluation.validity import check_formulas

    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    loaded = load_model(args.model)
    constraints = Constraints(
        elements=_element_list(args.elements) or None, require=_element_list(args.require),
        exclude=_element_list(args.exclude), max_elements=args.max_elements,
    )
    samples = generate(loaded, args.n, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       constraints=constraints, progress=not args.no_progress, dtype=args.dtype,
                       condition=None if args.condition == "none" else args.condition,
                       method=args.method, clamp=args.clamp, noise_scale=args.noise_scale)
    t_sample = time.perf_counter() - t0
    formulas = [f for _, f, _ in samples if f is not None]
    verdicts = {p: dict(zip(formulas, check_formulas(formulas, p))) for p in ("cdvae", "smact")}
    train_set = loaded.training_formulas()
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["index", "sample", "formula", "parse_ok", "parse_error", "n_elements", "n_atoms",
              "valid_cdvae", "reason_cdvae", "valid_smact", "reason_smact", "is_novel"]
    with atomic_path(out_dir / "formulas.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, (raw, f, err) in enumerate(samples):
            if f is None:
                w.writerow([i, raw, "", False, err, "", "", False, f"unparseable: {err}", False, f"unparseable: {err}", ""])
                continue
            c, s = verdicts["cdvae"][f], verdicts["smact"][f]
            novel = "" if train_set is None else str(f) not in train_set
            w.writerow([i, raw, str(f), True, "", f.n_elements, f.n_atoms, c.valid, c.reason, s.valid, s.reason, novel])
    elapsed = time.perf_counter() - t0
    n = len(samples)
    unique = set(formulas)
    n_valid = sum(verdicts["cdvae"][f].valid for f in formulas)
    novel = {f for f in unique if train_set is not None and str(f) not in train_set}
    vnu = sum(verdicts["cdvae"][f].valid for f in novel)
    summary = {
        "n_samples": n, "n_parsed": len(formulas), "n_unique": len(unique),
        "validity_cdvae": n_valid / n, "validity_smact": sum(verdicts["smact"][f].valid for f in formulas) / n,
        "uniqueness": len(unique) / n, "novelty": (len(novel) / len(unique)) if unique and train_set else None,
        "valid_novel_unique_cdvae": vnu, "seconds": elapsed, "seconds_sampling": t_sample,
        "formulas_per_s": n / elapsed, "valid_novel_unique_per_s": vnu / elapsed,
    }
    config = {
        "command": _command_line(args),
        "model": str(loaded.path),
        "model_type": loaded.model_type, "n": args.n, "seed": args.seed,
        **resolve_sampling_settings(loaded.config, args.steps, args.method, args.clamp, args.noise_scale),
        "batch_size": args.batch_size, "dtype": args.dtype, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "condition": args.condition, "constraints": constraints.as_dict(), "torch": torch.__version__, "machine": platform.platform(),
        "threads": torch.get_num_threads(), "summary": summary,
    }
    write_json(out_dir / "run_config.json", config)
    print(f"{n} samples from {loaded.path.name} ({loaded.model_type}) in {elapsed:.1f} s "
          f"= {summary['formulas_per_s']:.0f} formulas/s")
    print(f"  parsed      {len(formulas)}/{n}")
    print(f"  valid       cdvae {summary['validity_cdvae']:.3f}   smact {summary['validity_smact']:.3f}")
    print(f"  unique      {summary['uniqueness']:.3f}")
    if summary["novelty"] is not None:
        print(f"  novel       {summary['novelty']:.3f} of unique (vs {len(train_set)} training formulas)")
        print(f"  valid+novel+unique  {vnu} ({summary['valid_novel_unique_per_s']:.0f}/s)")
    if constraints.active:
        print(f"  constraints {json.dumps(constraints.as_dict())}")
    print(f"wrote {out_dir / 'formulas.csv'} and run_config.json")
    return 0


# ----------------------------------------------------------------------------------- structures
def cmd_templates_build(args: argparse.Namespace) -> int:
    from structure.templates import TemplateStore, read_structures

    exclude_ids: list[str] = []
    if args.exclude_ids:
        exclude_ids = [ln.strip() for ln in Path(args.exclude_ids).read_text().splitlines() if ln.strip()]
    t0 = time.perf_counter()
    store = TemplateStore.build(read_structures(args.source), exclude_ids=exclude_ids, exclude_tags=args.exclude_tag or (),
                                source=str(args.source), progress=not args.no_progress)
    store.save(args.output)
    skipped = ", ".join(f"{n} {why}" for why, n in store.meta["skipped"].items() if n) or "none"
    print(f"{len(store)} templates ({len(store.ratio_keys())} ratio keys) written to {args.output} in "
          f"{time.perf_counter() - t0:.0f} s; skipped: {skipped}")
    if args.train_ranker:
        return _train_ranker(store, args)
    print("next: composition-gen templates train-ranker " + str(args.output))
    return 0


def _train_ranker(store, args: argparse.Namespace) -> int:
    from structure.ranking import train_ranker

    ranker = train_ranker(store, seed=args.seed, epochs=args.epochs, n_queries=args.queries, size=args.shortlist,
                          workers=args.workers, progress=not args.no_progress)
    ranker.save(store.path)
    t = ranker.config.trained
    nan = float("nan")
    print(f"ranker trained on {t['n_queries_train']} labelled queries in {t['seconds']:.0f} s; on "
          f"{t['n_queries_heldout']} held-out queries: top-1 {t.get('heldout_top1', nan):.3f} (plain distance "
          f"{t.get('heldout_top1_plain_distance', nan):.3f}), top-10 {t.get('heldout_top10', nan):.3f} (plain "
          f"{t.get('heldout_top10_plain_distance', nan):.3f}); saved beside the store in {store.path}")
    return 0


def cmd_templates_label(args: argparse.Namespace) -> int:
    from structure.ranking import add_labels, cached_labels
    from structure.templates import TemplateStore

    store = TemplateStore.load(args.store)
    path = add_labels(store, args.queries, size=args.shortlist, seed=args.seed, workers=args.workers,
                      progress=not args.no_progress)
    print(f"labelled {args.queries} queries into {path}; the store now holds {len(cached_labels(store, args.shortlist))} "
          f"distinct labelled queries (shortlist {args.shortlist}); retrain with `composition-gen templates "
          f"train-ranker {args.store}`")
    return 0


def cmd_templates_train_ranker(args: argparse.Namespace) -> int:
    from structure.templates import TemplateStore

    return _train_ranker(TemplateStore.load(args.store), args)


def _read_formula_column(path: Path, column: str | None) -> list[str]:
    from composition_lm.data import iter_rows

    out = []
    for _, _raw, payload in iter_rows(path, column):
        text = payload[0] if isinstance(payload, tuple) else payload
        out.append(text[1:] if text.startswith("!") else text)
    return out


def cmd_structure(args: argparse.Namespace) -> int:
    from structure.pipeline import predict_formulas, write_outputs
    from structure.ranking import DEFAULT_RANKER, CompositionRanker
    from structure.templates import TemplateStore, aflow_store

    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    formulas = _read_formula_column(args.formulas, args.column)
    if not formulas:
        raise ValueError(f"{args.formulas} holds no formulas")
    if args.templates is None:
        print("no --templates given: using the 288 AFLOW prototypes shipped with pymatgen (build a larger store "
              "with `composition-gen templates build`)", file=sys.stderr)
        store = aflow_store()
    else:
        store = TemplateStore.load(args.templates)
    ranker = None
    if args.ranking == "learned":
        own = store.path if store.path is not None and (store.path / "ranker.json").exists() else None
        ranker = CompositionRanker.load(args.ranker or own or DEFAULT_RANKER)
    _check_potential(args)
    rows = predict_formulas(formulas, store, ranker, top_k=args.top_k, ranking=args.ranking,
                            include_invalid=args.include_invalid, seed=args.seed, progress=not args.no_progress,
                            group_types=args.group_types)
    if args.relax:
        _relax(rows, store, args)
    paths = write_outputs(rows, args.output)
    status = Counter(r.status for r in rows)
    n_formulas = len({r.index for r in rows})
    print(f"{n_formulas} formulas -> {sum(r.structure is not None for r in rows)} structures "
          f"({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _add_relax_arguments(p: argparse.ArgumentParser) -> None:
    """The M3GNet relaxation options shared by `structure` and `cdvae sample`."""
    p.add_argument("--relax", action="store_true", help="relax every structure with an M3GNet potential (FIRE, cell + positions)")
    p.add_argument("--potential", default="M3GNet-MP-2021.2.8-PES",
                   help="matgl hub name or local model folder (default: M3GNet-MP-2021.2.8-PES)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold in eV/Å (default: 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="FIRE steps per structure (default: 500)")
    p.add_argument("--workers", type=int, default=1, help="relaxation worker processes (default: 1)")
    p.add_argument("--references", type=Path, metavar="DB",
                   help="template store whose single-element structures give the elemental reference energies for "
                   "formation energies (default: the --templates store, else pymatgen's AFLOW prototypes)")


def _check_potential(args: argparse.Namespace) -> None:
    """With --relax, load the potential before any other work, so that a bad one fails at once."""
    if args.relax:
        from structure.relax import load_potential

        load_potential(args.potential)


def _relax(rows: list, store, args: argparse.Namespace) -> None:
    """Relax rows in place with ``args.potential``; formation energies against elemental references taken
    from the ``--references`` store, else ``store``, else the AFLOW prototypes (``store`` None), relaxed once
    and cached beside that store or the output."""
    from structure.pipeline import elemental_candidates, relax_rows
    from structure.relax import ElementalReferences
    from structure.templates import TemplateStore, aflow_store

    if args.references is not None:
        store = TemplateStore.load(args.references)
    elif store is None:
        store = aflow_store()
    cache = (store.path or args.output) / "elemental_references.json"
    refs = ElementalReferences(args.potential, elemental_candidates(store), cache_path=cache,
                               fmax=args.fmax, max_steps=args.max_steps)
    relax_rows(rows, args.potential, refs, fmax=args.fmax, max_steps=args.max_steps, workers=args.workers,
               progress=not args.no_progress)


# ------------------------------------------------------------------------------------------- cdvae
def cmd_cdvae_train(args: argparse.Namespace) -> int:
    from structure.cdvae.train import CDVAETrainingArguments, train

    fields = {f.name for f in dataclasses.fields(CDVAETrainingArguments)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(data=str(args.data), output_dir=str(args.output), progress=not args.no_progress,
                  val_split=None if (args.val_split or "").lower() in ("", "none") else args.val_split,
                  cache_dir=str(args.cache) if args.cache else None,
                  init_from=str(args.init_from) if args.init_from else None)
    out = train(CDVAETrainingArguments(**values), command=_command_line(args))
    print(f"wrote {out}")
    return 0


def cmd_cdvae_export(args: argparse.Namespace) -> int:
    from structure.cdvae.train import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.output)}")
    return 0


def cmd_cdvae_sample(args: argparse.Namespace) -> int:
    from structure.cdvae.model import CDVAE, resolve_model
    from structure.cdvae.sampling import sample, to_rows
    from structure.pipeline import write_outputs

    if args.n < 1:
        raise ValueError("-n must be at least 1")
    _check_potential(args)
    model = CDVAE.from_pretrained(resolve_model(args.model))
    t0 = time.perf_counter()
    crystals = sample(model, args.n, seed=args.seed, batch_size=args.batch_size, levels=args.levels,
                      steps=args.steps, step_lr=args.step_lr, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    rows = to_rows(crystals)
    if args.relax:
        from structure.templates import TemplateStore

        _relax(rows, TemplateStore.load(args.templates) if args.templates else None, args)
    paths = write_outputs(rows, args.output)
    status = Counter(r.status for r in rows)
    print(f"{len(rows)} crystals in {seconds:.1f} s ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); "
          f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _add_cdvae_parser(sub) -> None:
    p = sub.add_parser("cdvae", help="train and sample CDVAE, a generator of whole crystals",
                       description="CDVAE (crystal diffusion VAE): a periodic GNN encoder, property heads and a "
                       "score-network decoder sampled by annealed Langevin dynamics.")
    csub = p.add_subparsers(dest="cdvae_command", metavar="ACTION", required=True)
    t = csub.add_parser("train", help="train (or fine-tune, or resume) CDVAE on CDVAE-style CSVs",
                        description="Train on DATA/<train-split>.csv(.gz) (a `cif` column per crystal), validate on "
                        "DATA/<val-split>.csv(.gz) or, with --val-split none, on a held-out part of the training "
                        "split. Checkpoints go to OUTPUT/checkpoints (continue with --resume); the final model "
                        "(EMA weights, safetensors + config.json, model card) to OUTPUT/model.")
    t.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of <split>.csv(.gz) files")
    t.add_argument("--train-split", default="train", help="training split (default: train)")
    t.add_argument("--val-split", default="val", help="validation split, or 'none' to hold out --val-fraction")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--cache", type=Path, metavar="DIR", help="parsed-crystal cache (default: OUTPUT/cache)")
    t.add_argument("--init-from", type=Path, metavar="MODEL", help="fine-tune this CDVAE model folder")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--latent", type=int, default=128)
    t.add_argument("--encoder-layers", type=int, default=3)
    t.add_argument("--decoder-layers", type=int, default=4)
    t.add_argument("--cutoff", type=float, default=7.0, help="neighbour cutoff in Å (default: 7)")
    t.add_argument("--max-neighbors", type=int, default=20)
    t.add_argument("--beta", type=float, default=0.01, help="KL weight (default: 0.01)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--max-steps", type=int, default=20000)
    t.add_argument("--warmup-steps", type=int, default=200)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--save-every", type=int, default=500)
    t.add_argument("--stop-at-step", type=int, help="stop early with a checkpoint, schedule unchanged")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    t.set_defaults(func=cmd_cdvae_train, _argv=None)
    e = csub.add_parser("export", help="a training checkpoint's EMA weights as a model folder",
                        description="Export OUTPUT/checkpoints/step-N of a (possibly unfinished) run as a model "
                        "folder that `cdvae sample --model` reads.")
    e.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    e.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    e.set_defaults(func=cmd_cdvae_export)
    s = csub.add_parser("sample", help="sample crystals; writes structures.csv, structures_cif.zip, structures.extxyz",
                        description="Draw N latents from the prior, decode the number of atoms, lattice and "
                        "composition, then run annealed Langevin dynamics over the noise levels. Same outputs as "
                        "`composition-gen structure`; --relax relaxes them with M3GNet.")
    s.add_argument("--model", default="cdvae-perov5",
                   help="model folder, or a shipped name: cdvae-perov5 (default) or cdvae-mp20 (Materials Project crystals of "
                   "up to 20 atoms; a short training run, see its model card)")
    s.add_argument("-n", type=int, default=100, help="number of crystals (default: 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same crystals)")
    s.add_argument("--batch-size", type=int, default=500, help="crystals decoded together (default: 500)")
    s.add_argument("--levels", type=int, help="noise levels of the Langevin schedule (default: the model's)")
    s.add_argument("--steps", type=int, help="Langevin steps per level (default: the model's)")
    s.add_argument("--step-lr", type=float, help="Langevin step size at the smallest noise (default: the model's)")
    _add_relax_arguments(s)
    s.add_argument("--templates", type=Path, metavar="DB",
                   help="template store for elemental reference structures (default: the AFLOW prototypes)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("-o", "--output", type=Path, default=Path("cdvae_samples"), help="output directory")
    s.set_defaults(func=cmd_cdvae_sample)


# ----------------------------------------------------------------------------------------- compare
def _generator_name(model: str, prefix: str, taken: dict) -> str:
    """A folder-safe, unique name for a generator: ``lm-diffusion-bert``, ``cdvae-perov5``, ..."""
    stem = Path(str(model).rstrip("/")).name
    if stem == "model":  # a training run's export folder: name it after the run
        stem = Path(str(model).rstrip("/")).parent.name
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    name = name if name.startswith(prefix) else f"{prefix}-{name}"
    taken[name] = taken.get(name, 0) + 1
    return name if taken[name] == 1 else f"{name}-{taken[name]}"


def _relax_argv(args: argparse.Namespace, references: Path | None) -> list[str]:
    if not args.relax:
        return []
    return ["--relax", "--potential", str(args.potential), "--fmax", str(args.fmax), "--max-steps", str(args.max_steps),
            "--workers", str(args.workers), "--references", str(references)]


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


def _read_samples(path: Path, column: str | None) -> list[str]:
    """The generated strings of a formula file exactly as ``evaluate`` reads them (unparseable rows kept)."""
    from composition_lm.data import iter_rows

    samples = []
    for _, _, payload in iter_rows(path, column):
        text = payload[0] if isinstance(payload, tuple) else payload
        samples.append("" if text.startswith("!") else text)
    return samples


def _score_generator(gen_dir: Path, samples: list[str], context: dict, args: argparse.Namespace) -> dict:
    """The metric suite of one generator's outputs in ``gen_dir`` (see :mod:`evaluation.compare`)."""
    import pandas as pd

    from evaluation.compare import energy_summary, structure_novelty
    from evaluation.metrics import formula_set_metrics
    from evaluation.structures import composition_validity, evaluate_structures, structure_validity

    fm = formula_set_metrics(samples, context["train_formulas"], None, context["test_formulas"], ("cdvae", "smact"))
    structures, _ = _read_generated_structures(gen_dir) if (gen_dir / "structures.extxyz").stat().st_size else ([], "")
    readable = [s for s in structures if s is not None]
    out = {"formula_metrics": fm, "counts": {"samples": len(samples), "structures": len(structures)}}
    if structures:
        out["structure_metrics"] = evaluate_structures(
            structures, context["reference"], dataset=context["cov_dataset"], compscaler=context["compscaler"],
            workers=args.workers, cache_dir=context["cache"], progress=not args.no_progress)
        out["structure_novelty"] = structure_novelty(readable, context["training_structures"])
        valid = [s for s in readable if structure_validity(s)[0] and composition_validity(s)[0]]
        out["densities"] = [float(s.density) for s in valid]
    if args.relax:
        table = pd.read_csv(gen_dir / "structures.csv", keep_default_na=False, na_values=[""])
        with_structure = table[table["status"].isin(["converged", "not_converged", "failed"])]
        out["energy"] = energy_summary(with_structure["energy_per_atom"].tolist(),
                                       with_structure["formation_energy_per_atom"].tolist(), len(with_structure))
    return out


def _store_source(store_dir: Path) -> str | None:
    """The source a saved template store was built from (None when there is no store)."""
    import json

    path = store_dir / "store.json"
    return json.loads(path.read_text())["meta"].get("source") if path.is_file() else None


def cmd_compare(args: argparse.Namespace) -> int:
    import json
    import platform

    from evaluation.compare import density_histograms, summary_rows, write_comparison
    from structure.cdvae.model import resolve_model
    from structure.cdvae.train import _split_file
    from structure.templates import TemplateStore, read_structures

    if args.n < 1:
        raise ValueError("-n must be at least 1")
    if not args.lm and not args.cdvae:
        raise ValueError("give at least one generator: --lm MODEL (repeatable) and/or --cdvae MODEL")
    if not args.dataset.is_dir():
        raise FileNotFoundError(f"--dataset {args.dataset}: not a folder of <split>.csv(.gz) files")
    files = {}
    for role, split in (("train", args.train_split), ("test", args.test_split)):
        files[role] = _split_file(args.dataset, split)
        if files[role] is None:
            found = ", ".join(sorted(p.name for p in args.dataset.glob("*.csv*"))) or "nothing"
            raise FileNotFoundError(f"{args.dataset}: no {split}.csv(.gz) for the {role} split (found: {found}); "
                                    f"choose it with --{role}-split")
    compscaler = args.compscaler or _DEFAULT_COMPSCALER
    if not Path(compscaler).is_file():
        raise FileNotFoundError(f"COV-R / COV-P need CDVAE's Magpie constants: no file at {compscaler} (--compscaler)")
    cdvae_dir = resolve_model(args.cdvae) if args.cdvae else None  # a bad model name fails before any work
    _check_potential(args)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    cov_dataset = args.cov_dataset or _infer_dataset(args.dataset) or "mp20"

    print(f"reading {files['train']} and {files['test']}", file=sys.stderr)
    training = list(read_structures(files["train"]))
    context = {
        "train_formulas": _load_spec(str(files["train"]))[1], "test_formulas": _load_spec(str(files["test"]))[1],
        "reference": [r.structure for r in read_structures(files["test"])],
        "training_structures": [r.structure for r in training], "cov_dataset": cov_dataset,
        "compscaler": compscaler, "cache": args.cache or out.resolve().parent / ".fingerprint_cache",
    }
    store_dir = args.templates or out / "templates"
    if args.templates is None and _store_source(store_dir) != str(files["train"]):  # none yet, or of other data
        TemplateStore.build(training, source=str(files["train"]), progress=not args.no_progress).save(store_dir)
    store = TemplateStore.load(store_dir)
    print(f"templates: {len(store)} structures in {store_dir}", file=sys.stderr)
    references = _reference_store(args, store, store_dir, out)
    relaxed = (f"; relaxed with M3GNet ({args.potential}, FIRE, fmax {args.fmax} eV/Å, at most {args.max_steps} "
               f"steps; elemental references from {references})" if args.relax else "")

    generators: dict[str, dict] = {}
    taken: dict[str, int] = {}
    seed = ["--seed", str(args.seed), "--no-progress"]
    for lm in args.lm or []:
        name = _generator_name(lm, "lm", taken)
        gen_dir = out / name
        t0 = time.perf_counter()
        if main(["sample", "--model", lm, "-n", str(args.n), *seed, "-o", str(gen_dir)]) != 0:
            raise ValueError(f"sampling from --lm {lm} failed")
        t_sample = time.perf_counter() - t0
        if main(["structure", str(gen_dir / "formulas.csv"), "--templates", str(store_dir), "--top-k", "1",
                 *_relax_argv(args, references), *seed, "-o", str(gen_dir)]) != 0:
            raise ValueError(f"template structures for {name} failed")
        elapsed = time.perf_counter() - t0
        run = json.loads((gen_dir / "run_config.json").read_text())
        generators[name] = {
            "kind": "formula LM + templates", "model": run["model"],
            "given": (f"{args.n} formulas sampled by the language model (seed {args.seed}); those failing the cdvae "
                      f"validity check are dropped; each other formula gets its top-1 template structure (learned "
                      f"ranking, grouped by structure type) from the {len(store)} known structures of the dataset's "
                      f"`{args.train_split}` split, with its elements substituted, so it can only re-use known "
                      f"structure types{relaxed}"),
            "timing": {"sample_s": t_sample, "structures_s": elapsed - t_sample, "generate_s": elapsed},
            **_score_generator(gen_dir, _read_samples(gen_dir / "formulas.csv", None), context, args),
        }
    if args.cdvae:
        cfg = json.loads((cdvae_dir / "config.json").read_text())  # its weights are loaded by `cdvae sample`
        name = _generator_name(args.cdvae, "cdvae", taken)
        gen_dir = out / name
        t0 = time.perf_counter()
        if main(["cdvae", "sample", "--model", str(cdvae_dir), "-n", str(args.n), *seed, *_relax_argv(args, references),
                 "-o", str(gen_dir)]) != 0:
            raise ValueError(f"sampling from --cdvae {args.cdvae} failed")
        elapsed = time.perf_counter() - t0
        generators[name] = {
            "kind": "CDVAE", "model": str(cdvae_dir),
            "given": (f"{args.n} crystals decoded from latents drawn from the prior (seed {args.seed}) by annealed "
                      f"Langevin dynamics ({cfg['sample_levels']} levels x {cfg['sample_steps']} steps); the model "
                      f"learnt from: {cfg.get('trained', {}).get('data', 'see its model card')}; no template, and no validity "
                      f"filter{relaxed}"),
            "timing": {"generate_s": elapsed},
            **_score_generator(gen_dir, _read_samples(gen_dir / "structures.csv", "formula"), context, args),
        }
    for g in generators.values():
        n_valid = (g.get("structure_metrics") or {}).get("n_valid") or 0
        g["timing"]["per_valid_structure_s"] = g["timing"]["generate_s"] / n_valid if n_valid else None
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
            *(["Relaxation: elemental reference energies are relaxed once per element and cached in the reference "
               "store, so the first path to meet an element pays for it in its wall time."] if args.relax else []),
        ],
        "command": _command_line(args), "dataset": str(args.dataset), "train_split": args.train_split,
        "test_split": args.test_split, "n": args.n, "seed": args.seed, "relaxed": bool(args.relax),
        "machine": platform.platform(), "templates": str(store_dir), "generators": generators,
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


def _add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare formula-LM + templates against CDVAE on one dataset, with one metric suite",
        description="Run every generator with the same budget of N samples: each --lm samples formulas, drops "
        "invalid ones and takes a template structure from the dataset's training split; --cdvae samples whole "
        "crystals; --relax relaxes both with M3GNet. Score them all with the metrics of `evaluate` and "
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
    p.add_argument("-n", type=int, default=1000, help="samples per generator (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator (default: 0)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="a template store built from the training split (default: build one into OUTPUT/templates, "
                   "or reuse it when there)")
    _add_relax_arguments(p)
    p.add_argument("--cov-dataset", choices=["mp20", "perov5", "carbon24"],
                   help="COV cut-offs to use (default: guessed from the --dataset path, else mp20)")
    p.add_argument("--compscaler", type=Path, help=f"CDVAE's Magpie constants (default: {_DEFAULT_COMPSCALER})")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="fingerprint cache of the test structures (default: .fingerprint_cache beside OUTPUT)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (the HTML then has tables only)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_compare, _argv=None)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composition-gen",
        description="Propose inorganic compositions with diffusion language models, check their chemistry, "
        "and score generated sets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "validate",
        help="check charge neutrality and electronegativity balance of every formula in a file",
        description="SMACT validity of every formula in FILE (text: one per line; CSV/TSV/JSON/parquet with "
        "--column; Dong et al. prefix format; CDVAE CSVs with a cif column; .gz allowed). Writes one row per "
        "input with the reduced formula, the flags and a reason for each failure, and prints a summary.",
    )
    p.add_argument("file", type=Path, help="formula file")
    p.add_argument("--column", help="formula column of a table (default: formula, reduced_formula, ... or cif)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both",
                   help="cdvae: CDVAE's smact_validity rule; smact: smact.screening.smact_validity defaults "
                   "(default: both)")
    p.add_argument("--workers", type=int, default=None, help="processes for large files (default: all cores)")
    p.add_argument("-o", "--output", type=Path, help="output CSV (default: standard output)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "evaluate",
        help="score a generated formula set: validity, uniqueness, novelty, recovery, distribution distances",
        description="Metrics of GENERATED against training and held-out corpora. Corpus arguments take "
        "PATH or PATH@SPLIT (rows whose split column equals SPLIT, e.g. mp_formulas.csv@train). Writes "
        "metrics.json, summary.md and PNG plots to -o DIR.",
    )
    p.add_argument("generated", type=Path, help="generated formulas (any corpus format; unparseable rows count)")
    p.add_argument("--column", help="formula column of GENERATED")
    p.add_argument("--train", help="training corpus, for novelty and recovery (PATH[@SPLIT])")
    p.add_argument("--heldout", action="append", help="held-out corpus for recovery (PATH[@SPLIT]); repeatable")
    p.add_argument("--reference", help="reference set for distribution distances (default: first --heldout)")
    p.add_argument("--train-column", help="formula column of the corpora (default: auto)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both", help="validity protocol(s)")
    p.add_argument("--title", help="title of summary.md")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_evaluate)
    _add_evaluate_structures_parser(sub)

    p = sub.add_parser(
        "train",
        help="train or fine-tune a formula diffusion model on any formula corpus",
        description="Train a formula model with accelerate (run as-is, or under `accelerate launch "
        "--num_processes N` to scale out; on CPU-only machines accelerate starts several processes through "
        "torchrun: `accelerate launch --multi_gpu --num_processes N`, which falls back to CPU with the gloo "
        "backend). Checkpoints go to OUTPUT_DIR/checkpoints (continue with --resume), "
        "the final model to OUTPUT_DIR/model. Fine-tune with --init-from MODEL.",
    )
    p.add_argument("--model", default="diffusion-bert", choices=["diffusion-bert", "diffusion-lm"],
                   help="model family: diffusion-bert (masked discrete diffusion) or diffusion-lm (Gaussian "
                   "diffusion over token embeddings) (default: diffusion-bert; ignored with --init-from)")
    p.add_argument("--corpus", type=Path, required=True, help="formula corpus (any format `validate` reads)")
    p.add_argument("--column", help="formula column of a table")
    p.add_argument("--train-split", default="train", help="split to train on ('' for all rows) (default: train)")
    p.add_argument("--val-split", default="val", help="split for validation (default: val)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="seeded val share when the corpus has no split column")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--init-from", help="fine-tune from this model (folder, shipped name or hub id)")
    p.add_argument("--codec", choices=["expanded", "compact"], default="expanded")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sequence incl. [BOS]/[EOS]; longer formulas are skipped")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--schedule", choices=["loglinear", "linear", "spindle", "sqrt", "cosine"],
                   help="noise schedule: loglinear (default), linear or spindle for diffusion-bert; sqrt (default), "
                   "cosine or linear for diffusion-lm")
    p.add_argument("--embedding-dim", type=int, default=16, help="diffusion-lm: token embedding dimension (default: 16)")
    p.add_argument("--diffusion-steps", type=int, default=2000, help="diffusion-lm: training steps T (default: 2000)")
    p.add_argument("--loss-weighting", choices=["elbo", "uniform"], default="elbo", help="diffusion-bert loss weighting")
    p.add_argument("--time-conditioning", action="store_true", help="condition the denoiser on t")
    p.add_argument("--only-valid", choices=["cdvae", "smact"],
                   help="train only on the formulas that pass this validity protocol (the count dropped is reported)")
    p.add_argument("--validity-conditioning", action="store_true",
                   help="start each training formula with [VALID]/[INVALID] (its cdvae validity) so that "
                   "sampling can ask for valid formulas; with --init-from, extends an unconditional model")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--max-steps", type=int, default=10000)
    p.add_argument("--stop-at-step", type=int, help="stop early with a checkpoint (schedule unchanged)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train, _argv=None)

    p = sub.add_parser(
        "sample",
        help="generate formulas with a diffusion model (default: the shipped Diffusion-BERT)",
        description="Sample formulas, check them, and write OUTPUT/formulas.csv (raw sample, reduced formula, "
        "parse status, validity and reason under both protocols, novelty vs the model's training formulas) "
        "and OUTPUT/run_config.json. Element constraints are enforced inside the sampler.",
    )
    p.add_argument("--model", default=None, help="model folder, shipped name (diffusion-bert, diffusion-lm) or hub id "
                   "(default: diffusion-bert); the model's config says which family it is")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="denoising steps (default: 32 for diffusion-bert, chosen by measurement "
                   "in benchmarks/diffusion_bert.md; the model's own default for diffusion-lm)")
    p.add_argument("--method", choices=["ddpm", "ddim"], help="diffusion-lm: reverse process (default: the model's)")
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="diffusion-lm: snap each predicted x0 to the nearest allowed token embedding (default: the model's)")
    p.add_argument("--noise-scale", type=float, help="diffusion-lm: multiply the reverse-process noise by this "
                   "factor in [0, 1]; below 1 samples nearer the modes, like a temperature (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1000, help="samples denoised together (default: 1000)")
    p.add_argument("--temperature", type=float, default=1.0, help="diffusion-bert: softmax temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, help="diffusion-bert: draw only from the K most likely tokens")
    p.add_argument("--top-p", type=float, help="diffusion-bert: draw only from the smallest set with probability >= P")
    p.add_argument("--elements", help="only these elements, e.g. Li,Mn,O")
    p.add_argument("--require", help="every sample contains these, e.g. Li")
    p.add_argument("--exclude", help="never these, e.g. Pb,Cd")
    p.add_argument("--max-elements", type=int, help="at most this many distinct elements")
    p.add_argument("--condition", choices=["auto", "valid", "invalid", "none"], default="auto",
                   help="start token of a validity-conditioned model: valid, invalid or none (unconditional); "
                   "auto = valid for such a model, none otherwise")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="denoiser precision: auto = bfloat16 where the hardware runs it fast (AMX/AVX512-BF16 "
                   "CPUs, recent GPUs), else float32 (default: auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", type=Path, default=Path("samples"), help="output directory (default: samples)")
    p.set_defaults(func=cmd_sample, _argv=None)

    p = sub.add_parser(
        "templates",
        help="build a template structure store (and its ranker) for `composition-gen structure`",
        description="Template stores: crystal structures indexed by their sorted reduced stoichiometric ratios, "
        "with composition descriptors and a learned ranker.",
    )
    tsub = p.add_subparsers(dest="templates_command", metavar="ACTION", required=True)
    t = tsub.add_parser("build", help="build a store from a structure collection",
                        description="Read SRC (CSV(.gz) with a cif column, a CIF/POSCAR/pymatgen-JSON/extxyz file, or a "
                        "folder of them) and write the store folder DB.")
    t.add_argument("source", type=Path, metavar="SRC")
    t.add_argument("-o", "--output", type=Path, required=True, metavar="DB", help="store folder to write")
    t.add_argument("--exclude-ids", type=Path, metavar="FILE", help="file of ids (one per line) to leave out")
    t.add_argument("--exclude-tag", action="append", metavar="TAG",
                   help="leave out rows whose split_tags contain TAG (e.g. mp20_test); repeatable")
    t.add_argument("--train-ranker", action="store_true", help="also train the ranker (see train-ranker)")
    t.set_defaults(func=cmd_templates_build)
    r = tsub.add_parser("train-ranker", help="train the learned composition-similarity ranker of a store",
                        description="Use store structures as queries: label each one's shortlist of ratio-matching "
                        "templates with StructureMatcher (anonymized), train the ranker on descriptor differences with "
                        "a listwise loss, report held-out hit rates next to the plain distance's, and save "
                        "ranker.safetensors + ranker.json in the store folder. Labels are cached there (ranker_labels*.json); "
                        "every cached batch is used, so add queries with `templates label`.")
    r.add_argument("store", type=Path, metavar="DB")
    r.set_defaults(func=cmd_templates_train_ranker)
    lab = tsub.add_parser("label", help="label more store structures as ranker training queries",
                          description="Draw --queries store structures with --seed, label each one's shortlist with "
                          "StructureMatcher and cache them in the store folder (ranker_labels-seed<S>-n<N>.json). "
                          "train-ranker then trains on every cached batch (each query once).")
    lab.add_argument("store", type=Path, metavar="DB")
    lab.set_defaults(func=cmd_templates_label)
    for q in (t, r, lab):
        q.add_argument("--seed", type=int, default=0,
                       help="seed of the query draw (label) or of the query draw and training (build, train-ranker)")
        q.add_argument("--queries", type=int, default=1500,
                       help="store structures used as training queries; train-ranker labels them only when the store "
                       "holds no cached labels yet (default: 1500)")
        if q is not lab:
            q.add_argument("--epochs", type=int, default=30)
        q.add_argument("--shortlist", type=int, default=50,
                       help="templates per query, nearest by plain distance, labelled by StructureMatcher (default: 50)")
        q.add_argument("--workers", type=int, default=1, help="labelling processes (default: 1)")
        q.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "structure",
        help="predict crystal structures of formulas from templates (CSPML-style), optionally relaxed with M3GNet",
        description="For each formula in FORMULAS (a `composition-gen sample` formulas.csv, any CSV with a formula "
        "column, or a text file with one formula per line), pick the templates with the same stoichiometric "
        "ratios, rank them by learned composition similarity, substitute the elements and scale the cell. Writes "
        "OUTPUT/structures.csv, structures_cif.zip and structures.extxyz. Formulas failing the cdvae validity "
        "check are skipped (a row says so) unless --include-invalid.",
    )
    p.add_argument("formulas", type=Path, metavar="FORMULAS")
    p.add_argument("--column", help="formula column (default: formula)")
    p.add_argument("--templates", type=Path, metavar="DB",
                   help="template store folder (default: pymatgen's 288 AFLOW prototypes)")
    p.add_argument("--ranker", type=Path, help="ranker folder (default: the store's own, else the shipped one)")
    p.add_argument("--ranking", choices=["learned", "plain", "random"], default="learned",
                   help="learned: the ranker; plain: descriptor L1 distance; random: a seeded random order")
    p.add_argument("--top-k", type=int, default=5, help="structures per formula (default: 5)")
    p.add_argument("--group-types", action=argparse.BooleanOptionalAction, default=True,
                   help="collapse the 20 best templates into structure types (StructureMatcher) and rank the types "
                   "by their templates' pooled similarity: top-k distinct types (default: on; not for --ranking random)")
    p.add_argument("--include-invalid", action="store_true", help="also predict formulas that fail the validity check")
    _add_relax_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random ranking")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", type=Path, default=Path("structures"), help="output directory (default: structures)")
    p.set_defaults(func=cmd_structure)
    _add_cdvae_parser(sub)
    _add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "_argv"):
        args._argv = argv
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # CorpusError, FormulaError, bad protocol, ...
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
