"""CDVAE levers, measured one at a time: each row samples N crystals from a model with one sampling
setting (composition sampler x type update x schedule) and scores them with CDVAE's metrics against the
test split (`evaluation.structures.evaluate_structures`, the scorer behind `evaluate-structures`).

    python scripts/bench_cdvae_levers.py sample --model cdvae-perov5 --dataset perov5 --n 1000 \
        --setting round/free --setting k-first/element-set
    python scripts/bench_cdvae_levers.py prior --model cdvae-mp20 --dataset mp20 --n 200 \
        --components 0 --components 1 --components 20 --setting k-first+20/fixed
    python scripts/bench_cdvae_levers.py density --model cdvae-mp20 --dataset mp20 --components 0 \
        --components 30 --volume-weight 0 --volume-weight 1
    python scripts/bench_cdvae_levers.py data --dataset perov5 --n 1000 --seeds 3
    python scripts/bench_cdvae_levers.py report

`sample` appends one JSON line per setting to benchmarks/cdvae_levers.jsonl as it goes (a kill loses
only the row in progress); `report` rewrites benchmarks/cdvae_levers.md from every line there, together
with the throughput rows (benchmarks/cdvae_throughput.jsonl, scripts/bench_cdvae_throughput.py) and the
training curves in benchmarks/cdvae_curves.jsonl. `report --curve runs/X/log.jsonl` first copies that run's
validation losses there (replacing an earlier copy of the same log), so a curve outlives the run folder,
which is not committed. A setting is
COMPOSITION[@TEMPERATURE][+REDRAWS]/TYPE-UPDATE[/LEVELSxSTEPS[@STEP_LR]], e.g. ``k-first/fixed/50x2``,
``round@0.5/free``, ``k-first@0.5+20/fixed`` or ``k-first+20/fixed/50x5@3e-4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import bench_meta, cpu  # noqa: E402

from evaluation.io import append_jsonl, write_text  # noqa: E402

DATA = {"perov5": "perov_5", "mp20": "mp_20"}
TRAIN_SPLIT = {"perov5": "val", "mp20": "train"}  # Perov-5's train split is not available here
JSONL = ROOT / "benchmarks" / "cdvae_levers.jsonl"
THROUGHPUT = ROOT / "benchmarks" / "cdvae_throughput.jsonl"
RECONSTRUCTION = ROOT / "benchmarks" / "cdvae_reconstruction.jsonl"
CURVES = ROOT / "benchmarks" / "cdvae_curves.jsonl"
DENSITY = ROOT / "benchmarks" / "cdvae_density.jsonl"
DATA_REFERENCE = ROOT / "benchmarks" / "cdvae_data_reference.jsonl"
KEYS = ["struct_validity", "comp_validity", "cov_recall", "cov_precision", "wdist_density", "wdist_num_elems"]
TARGETS = {  # issue 19 (1,000 samples, seed 0, default schedule)
    "perov5": {"comp_validity": 0.95, "cov_recall": 0.95, "cov_precision": 0.95, "wdist_num_elems": 0.1},
    "mp20": {"comp_validity": 0.86, "cov_recall": 0.90, "cov_precision": 0.95, "wdist_density": 0.7,
             "wdist_num_elems": 0.5},
}


def parse_setting(spec: str) -> dict:
    parts = spec.split("/")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--setting {spec!r}: expected COMPOSITION[@T]/TYPE-UPDATE[/LEVELSxSTEPS]")
    head, _, retries = parts[0].partition("+")
    composition, _, temperature = head.partition("@")
    out = {"composition": composition, "temperature": float(temperature) if temperature else None,
           "retries": int(retries) if retries else None,
           "type_update": parts[1], "levels": None, "steps": None, "step_lr": None}
    if len(parts) == 3:
        schedule, _, step_lr = parts[2].lower().partition("@")
        out["levels"], out["steps"] = (int(x) for x in schedule.split("x"))
        out["step_lr"] = float(step_lr) if step_lr else None
    return out


def element_histogram(structures) -> dict:
    counts = [len(s.composition.elements) for s in structures]
    return {str(k): round(sum(c == k for c in counts) / len(counts), 4) for k in range(1, 7)} | \
        {"7+": round(sum(c >= 7 for c in counts) / len(counts), 4)}


def _split_csv(args, split: str) -> Path:
    """The dataset's ``split`` CSV in ../shared."""
    return args.shared / "data/structures" / DATA[args.dataset] / f"{split}.csv.gz"


def _reference(args) -> list:
    from structure.io import read_structures

    test_csv = _split_csv(args, "test")
    return [r.structure for r in read_structures(test_csv)]


def _load(args):
    import torch

    from structure.cdvae.model import CDVAE, resolve_model

    torch.set_num_threads(args.threads)
    model = CDVAE.from_pretrained(resolve_model(args.model))
    return model.compile_decoder() if args.compile else model


def _measure(model, spec: str, label: str, reference: list, args, volume_weight: float | None = None) -> None:
    """Sample args.n crystals with one setting, score them, append the row (and write them with --save)."""
    import torch

    from evaluation.structures import evaluate_structures
    from structure.cdvae.sampling import to_rows
    from structure.io import write_outputs

    cfg = model.config
    s = parse_setting(spec)
    asked = {"levels": s["levels"], "steps": s["steps"], "step_lr": s["step_lr"], "composition": s["composition"],
             "type_update": s["type_update"], "composition_temperature": s["temperature"],
             "composition_retries": s["retries"], "volume_weight": volume_weight,
             **{k: getattr(args, k, None) for k in ("prior", "resample_invalid", "natom_sampler", "min_element_share",
                                                   "min_pattern_share", "latent_temperature", "symmetrize",
                                                   "snap_angles")}}
    c = model.sampling_config.replace(**{k: v for k, v in asked.items() if v is not None})
    stats: dict = {}
    t = time.perf_counter()
    structures = model.sample(args.n, seed=args.seed, config=c, stats=stats)
    seconds = time.perf_counter() - t
    if args.save:  # the crystals themselves, for a later look at what the metrics miss
        write_outputs(to_rows(structures), args.save / f"{args.dataset}-{label}-{spec}".replace("/", "_"))
    m = evaluate_structures(structures, reference, dataset=args.dataset, workers=args.workers,
                            cache_dir=ROOT / "runs/cdvae/fingerprints")
    row = {"dataset": args.dataset, "model": args.model, "label": label, "n": args.n,
           "seed": args.seed, "composition": s["composition"], "temperature": s["temperature"],
           "retries": s["retries"], "type_update": s["type_update"],
           "schedule": f"{c.levels}x{c.steps}" + (f" lr {s['step_lr']:g}" if s["step_lr"] else ""),
           "seconds_sampling": round(seconds, 1), "threads": torch.get_num_threads(), "compiled": bool(args.compile),
           "prior": c.prior, "prior_components": cfg.latent_prior_components, "volume_weight": c.volume_weight,
           "resample_invalid": c.resample_invalid, "decoded": stats["decoded"], "resampled": stats["resampled"],
           "natom_sampler": c.natom_sampler, "latent_temperature": c.latent_temperature, "symmetrize": c.symmetrize,
           "snap_angles": c.snap_angles, "min_element_share": c.min_element_share,
           "min_pattern_share": c.min_pattern_share,
           **{k: m.get(k) for k in KEYS},
           "cov_recall_struct": m.get("cov_recall_struct"), "cov_recall_comp": m.get("cov_recall_comp"),
           "n_elements": element_histogram(structures),
           **bench_meta("scripts/bench_cdvae_levers.py", args.n, args.model), "cpu": cpu()}
    append_jsonl(JSONL, row)
    print(json.dumps({k: row[k] for k in ("label", "composition", "type_update", "schedule", *KEYS)}), flush=True)


def cmd_sample(args) -> None:
    model, reference = _load(args), _reference(args)
    for spec in args.setting:
        for w in args.volume_weight or [None]:
            _measure(model, spec, args.label or args.model, reference, args, w)


def _training_latents(model, args):
    """The encoder's posterior means of the dataset's training split (what a mixture prior is fitted to)."""
    from structure.cdvae.data import load_crystals
    from structure.cdvae.prior import posterior_means

    train_csv = _split_csv(args, TRAIN_SPLIT[args.dataset])
    return posterior_means(model, load_crystals(train_csv, ROOT / "runs/cdvae/cache"))


def cmd_prior(args) -> None:
    """The latent prior as a lever: fit a Gaussian mixture of K components to the training split's
    posterior means (K = 0: N(0, I); K = 1: one full-covariance Gaussian) and sample with each."""
    from structure.cdvae.prior import fit_gaussian_mixture

    model, reference = _load(args), _reference(args)
    latents = _training_latents(model, args)
    for k in args.components:
        model.set_latent_prior(fit_gaussian_mixture(latents, k, seed=args.seed) if k else None)
        label = f"{args.label or args.model} + " + (f"GMM prior ({k})" if k else "N(0, I) prior")
        for spec in args.setting:
            for w in args.volume_weight or [None]:
                _measure(model, spec, label, reference, args, w)


def cmd_density(args) -> None:
    """The density Wasserstein distance's spread over sampling seeds, per latent prior (--components, as
    in ``prior``) and volume weight. Cheap: a crystal's density is fixed before the first Langevin step
    (the lattice comes from z, the composition is drawn once, types stay fixed; only the coordinates
    move), so each seed decodes N crystals with no Langevin step at all, and scores all of them (the full
    runs' structure validity is above 99 %)."""
    import numpy as np
    import torch

    from evaluation.metrics import wasserstein_1d
    from structure.cdvae.prior import fit_gaussian_mixture
    from structure.cdvae.sampling import langevin

    model = _load(argparse.Namespace(**{**vars(args), "compile": False}))
    ref = [float(s.density) for s in _reference(args)]
    latents = _training_latents(model, args) if any(args.components) else None
    spec = parse_setting(args.setting)
    for k in args.components:
        model.set_latent_prior(fit_gaussian_mixture(latents, k, seed=0) if k else None)
        for w in args.volume_weight or [model.sampling_config.volume_weight]:
            dists = []
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)
                crystals = langevin(model, model.draw_latents(args.n, g), g, [], composition=spec["composition"],
                                    type_update=spec["type_update"], composition_temperature=spec["temperature"],
                                    composition_retries=spec["retries"], volume_weight=w)
                dists.append(wasserstein_1d([float(c.structure().density) for c in crystals], ref))
            row = {"dataset": args.dataset, "model": args.model, "prior": f"GMM ({k})" if k else "N(0, I)",
                   "volume_weight": w, "setting": args.setting, "n": args.n, "seeds": args.seeds,
                   "wdist_density": {"mean": round(float(np.mean(dists)), 4),
                                     "sd": round(float(np.std(dists, ddof=1)), 4),
                                     "min": round(min(dists), 4), "max": round(max(dists), 4)},
                   "command": "python scripts/bench_cdvae_levers.py " + " ".join(sys.argv[1:])}
            append_jsonl(DENSITY, row)
            print(json.dumps(row), flush=True)


def cmd_data(args) -> None:
    """The training split as if it were a generator: N crystals drawn from it at random (without
    replacement; all of it when N is larger) for each seed, scored like a model's samples. What a model
    that reproduces its training distribution exactly would score at that N: the ceiling of COV-R, which
    grows with N, and the floor of the distances."""
    import numpy as np

    from evaluation.structures import evaluate_structures
    from structure.io import read_structures

    reference = _reference(args)
    train_csv = _split_csv(args, TRAIN_SPLIT[args.dataset])
    train = [r.structure for r in read_structures(train_csv)]
    for n in args.n:
        # all of the split is one draw, whatever the seed
        for seed in range(args.first_seed, args.first_seed + (args.seeds if n < len(train) else 1)):
            pick = np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False)
            m = evaluate_structures([train[i] for i in pick], reference, dataset=args.dataset, workers=args.workers,
                                    cache_dir=ROOT / "runs/cdvae/fingerprints")
            row = {"dataset": args.dataset, "split": TRAIN_SPLIT[args.dataset], "n": len(pick), "seed": seed,
                   **{k: m.get(k) for k in KEYS}, "cov_recall_struct": m.get("cov_recall_struct"),
                   "cov_recall_comp": m.get("cov_recall_comp"),
                   **bench_meta("scripts/bench_cdvae_levers.py", len(pick), f"{args.dataset} training split"),
                   "cpu": cpu()}
            append_jsonl(DATA_REFERENCE, row)
            print(json.dumps({k: row[k] for k in ("dataset", "n", "seed", *KEYS)}), flush=True)


def data_reference_table(rows: list[dict]) -> list[str]:
    """Mean ± sd over seeds of each metric, one line per dataset and N."""
    import numpy as np

    lines = ["| data | training split | N | seeds | comp | COV-R | COV-P | density W | #elem W | "
             "COV-R struct / comp alone |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["split"], r["n"]), []).append(r)

    def stat(rs, k, scale):
        v = np.array([r[k] for r in rs], dtype=float) * scale
        fmt = ".1f" if scale == 100 else ".3f"
        return f"{v.mean():{fmt}}" + (f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else "")

    for (ds, split, n), rs in groups.items():
        lines.append(f"| {ds} | {split} | {n} | {len(rs)} | {stat(rs, 'comp_validity', 100)} | "
                     f"{stat(rs, 'cov_recall', 100)} | {stat(rs, 'cov_precision', 100)} | "
                     f"{stat(rs, 'wdist_density', 1)} | {stat(rs, 'wdist_num_elems', 1)} | "
                     f"{stat(rs, 'cov_recall_struct', 100)} / {stat(rs, 'cov_recall_comp', 100)} |")
    return lines


def cmd_reconstruct(args) -> None:
    """CDVAE's reconstruction task on the first N test crystals: encode, decode the posterior mean by the
    model's Langevin schedule with the true atom count, match with StructureMatcher."""
    from evaluation.structures import reconstruction_match
    from structure.cdvae.data import load_crystals
    from structure.cdvae.model import CDVAE, resolve_model
    from structure.cdvae.sampling import reconstruct

    model = CDVAE.from_pretrained(resolve_model(args.model))
    test_csv = _split_csv(args, "test")
    test = load_crystals(test_csv, ROOT / "runs/cdvae/cache")
    test = test.subset(list(range(min(args.n, len(test)))))
    t = time.perf_counter()
    out = reconstruct(model, test, seed=args.seed)
    seconds = time.perf_counter() - t
    m = reconstruction_match([test.structure(i) for i in range(len(test))], [c.structure() for c in out])
    row = {"dataset": args.dataset, "model": args.model, "label": args.label or args.model,
           "encoder": model.config.encoder_type, "steps": model.config.trained.get("total_steps",
                                                                                  model.config.trained.get("steps")),
           **m, "seconds": round(seconds, 1), "cpu": cpu(),
           "command": "python scripts/bench_cdvae_levers.py " + " ".join(sys.argv[1:])}
    append_jsonl(RECONSTRUCTION, row)
    print(json.dumps(row), flush=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _fmt(k: str, v) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if k in KEYS[:4] else f"{v:.3f}"


def _cell(ds: str, k: str, v) -> str:
    target = TARGETS.get(ds, {}).get(k)
    met = v is not None and target is not None and (v >= target if k in KEYS[:4] else v <= target)
    return f"**{_fmt(k, v)}**" if met else _fmt(k, v)


def lever_table(rows: list[dict]) -> list[str]:
    lines = ["| data | model | composition | type update | schedule | N | sampling s | struct | comp | COV-R | COV-P | "
             "density W | #elem W | COV-R struct / comp alone | 1/2/3/4/5/6/7+ elements % |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        hist = "/".join(f"{100 * r['n_elements'][k]:.0f}" for k in ("1", "2", "3", "4", "5", "6", "7+"))
        comp = r["composition"] + (f" T={r['temperature']:g}" if r.get("temperature") else "") + (
            f", {r['retries']} redraws" if r.get("retries") else "")
        alone = (f"{100 * r['cov_recall_struct']:.1f} / {100 * r['cov_recall_comp']:.1f}"
                 if r.get("cov_recall_struct") is not None else "n/a")
        speed = f"{r['seconds_sampling']:.0f}" + (", compiled" if r.get("compiled") else "") + (
            f", {r['threads']} threads" if r.get("threads", 1) > 1 else "")
        if r.get("prior", "standard") != "standard":
            comp += f", {r['prior']} prior"
        if r.get("latent_temperature", 1.0) != 1.0:
            comp += f", latent T={r['latent_temperature']:g}"
        if r.get("snap_angles"):
            comp += f", angles snapped within {r['snap_angles']:g}°"
        if r.get("symmetrize"):
            comp += f", symmetrized at {r['symmetrize']:g} Å"
        if r.get("volume_weight"):
            comp += f", volume w={r['volume_weight']:g}"
        if r.get("natom_sampler", "argmax") != "argmax":
            comp += f", atom count {r['natom_sampler']}"
        if r.get("resample_invalid"):
            rare = f" or element count < {r['min_element_share']:g} of training" if r.get("min_element_share") else ""
            if r.get("min_pattern_share"):
                rare += f" or stoichiometry pattern < {r['min_pattern_share']:g} of training"
            comp += (f", invalid{rare} decoded again (≤{r['resample_invalid']} rounds, "
                     f"{100 * r['resampled'] / r['n']:.1f} % more decodes)")
        label = r["label"] + (f", seed {r['seed']}" if r.get("seed") else "")
        lines.append(f"| {r['dataset']} | {label} | {comp} | {r['type_update']} | {r['schedule']} | "
                     f"{r['n']} | {speed} | "
                     + " | ".join(_cell(r["dataset"], k, r.get(k)) for k in KEYS)
                     + f" | {alone} | {hist} |")
    return lines


def cmd_report(args) -> None:
    rows = _read(JSONL)
    lines = ["# CDVAE levers", "",
             "Every lever measured on its own: crystals sampled from one model with one setting, scored by CDVAE's "
             "metrics against the test split (validity and coverage in %, Wasserstein distances of density and of "
             "the number of distinct elements). Bold: the issue's target met. Command: "
             "`python scripts/bench_cdvae_levers.py sample ...` (each row's full command is in "
             "benchmarks/cdvae_levers.jsonl), then `python scripts/bench_cdvae_levers.py report`.", "",
             "Targets at 1,000 samples, seed 0: Perov-5 comp ≥ 95, COV-R ≥ 95, COV-P ≥ 95, #elem W ≤ 0.1; "
             "MP-20 comp ≥ 86, "
             "COV-R ≥ 90, COV-P ≥ 95, density W ≤ 0.7, #elem W ≤ 0.5. Test split #elements 1/2/3/4/5/6+ %: "
             "Perov-5 0/0/29/57/13/0 (training share), MP-20 1/20/61/17/2/0.2.", "",
             "## Sampling levers", "",
             "CDVAE's own rules are `round` / `free`; for MP-20 their row is benchmarks/cdvae_mp20.md (the same model, "
             "seed and N).", ""] + lever_table(sorted(rows, key=lambda r: r["dataset"] != "perov5"))
    cpus = sorted({r["cpu"] for r in rows})
    lines += ["", "CPU: " + "; ".join(cpus), ""]
    tp = _read(THROUGHPUT)
    if tp:
        lines += ["## Training throughput", "",
                  "| data | setting | batch | threads | processes | s/step min/median/max | crystals/s | "
                  "s/epoch (median) | ratio to baseline |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in tp:
            lines.append(f"| {r['dataset']} | {r['setting']} | {r['batch_size']} | {r['threads']} | {r['processes']} | "
                         f"{r['step_s']['min']:.3f}/{r['step_s']['median']:.3f}/{r['step_s']['max']:.3f} | "
                         f"{r['crystals_per_s']:.0f} | {r['epoch_s']:.0f} | {r['ratio']:.2f}× |")
        lines += ["", "CPU: " + "; ".join(sorted({r["cpu"] for r in tp})), ""]
    recon = _read(RECONSTRUCTION)
    if recon:
        lines += ["## Encoder: reconstruction", "",
                  "CDVAE's reconstruction task on the first N test crystals (posterior mean decoded by the default "
                  "Langevin schedule with the true atom count; StructureMatcher stol 0.5, angle_tol 10, ltol 0.3).", "",
                  "| data | model | encoder | training steps | N | match rate % | RMS |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in recon:
            rms = "n/a" if r["rms"] is None else f"{r['rms']:.4f}"
            lines.append(f"| {r['dataset']} | {r['label']} | {r['encoder']} | {r['steps']} | {r['n']} | "
                         f"{100 * r['match_rate']:.1f} | {rms} |")
        lines.append("")
    dens = _read(DENSITY)
    if dens:
        lines += ["## Density W over sampling seeds", "",
                  "The density Wasserstein distance of N crystals for S sampling seeds, per latent prior and volume "
                  "weight (`python scripts/bench_cdvae_levers.py density ...`): the density is fixed before the first "
                  "Langevin step, so no step is run. A single N = 1,000 row above varies by about this much.", "",
                  "| data | model | prior | volume weight | setting | N | seeds | density W mean ± sd | min / max |",
                  "|---|---|---|---:|---|---:|---:|---|---|"]
        for r in dens:
            d = r["wdist_density"]
            lines.append(f"| {r['dataset']} | {r['model']} | {r['prior']} | {r['volume_weight']:g} | "
                         f"{r['setting']} | {r['n']} | {r['seeds']} | {d['mean']:.3f} ± {d['sd']:.3f} | "
                         f"{d['min']:.3f} / {d['max']:.3f} |")
        lines.append("")
    ref = _read(DATA_REFERENCE)
    if ref:
        lines += ["## What the data itself scores", "",
                  "N crystals drawn at random from the training split, scored against the test split like a model's "
                  "samples (`python scripts/bench_cdvae_levers.py data --dataset D --n N --seeds S`; mean ± sd over "
                  "the seeds): what a model that reproduces its training distribution exactly would score. COV-R "
                  "grows with N; CDVAE's published figures come from 10,000 samples (its scripts/evaluate.py: 20 "
                  "batches of 500), the issue's targets are at 1,000.", ""] + data_reference_table(ref) + [""]
    for log in args.curve:
        _store_curve(Path(log))
    curves = _read(CURVES)
    for run in dict.fromkeys(r["run"] for r in curves):
        lines += _curve_lines(run, [r for r in curves if r["run"] == run])
    write_text(ROOT / "benchmarks" / "cdvae_levers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _store_curve(log: Path) -> None:
    """Copy the validation losses (EMA weights) a training run logged at each evaluation into CURVES."""
    evals = [{"run": str(log), "step": r["step"], **r["eval"]} for r in _read(log) if "eval" in r]
    if not evals:
        raise SystemExit(f"--curve {log}: no evaluation rows (is it a training run's log.jsonl?)")
    kept = [r for r in _read(CURVES) if r["run"] != str(log)]
    write_text(CURVES, "".join(json.dumps(r) + "\n" for r in kept + evals))


def _curve_lines(run: str, evals: list[dict]) -> list[str]:
    keys = [k for k in evals[-1] if k not in ("run", "step")]
    lines = [f"## Training curve: `{run}` (validation losses, EMA weights)", "",
             "| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for r in evals:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="one row per --setting")
    p = sub.add_parser("prior", help="one row per --components K and --setting: a K-component Gaussian mixture "
                       "fitted to the training split's posterior means (0: N(0, I))")
    p.add_argument("--components", type=int, action="append", required=True)
    for q in (s, p):
        q.add_argument("--model", required=True)
        q.add_argument("--label", help="the model's name in the table (default: --model)")
        q.add_argument("--dataset", choices=sorted(DATA), required=True)
        q.add_argument("--setting", action="append", required=True,
                       help="COMPOSITION[@T][+R]/TYPE-UPDATE[/LEVELSxSTEPS[@STEP_LR]]")
        q.add_argument("--n", type=int, default=1000)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--workers", type=int, default=1)
        q.add_argument("--threads", type=int, default=1, help="torch threads while sampling (default: 1)")
        q.add_argument("--compile", action="store_true", help="torch.compile the decoder (CDVAE.compile_decoder)")
        q.add_argument("--volume-weight", type=float, action="append", metavar="W",
                       help="also a row per W: the sampled cell scaled toward its composition's volume "
                       "(CDVAE.sample volume_weight; default: the model's)")
        q.add_argument("--save", type=Path, metavar="DIR", help="also write each setting's crystals under DIR")
        q.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    s.add_argument("--prior", choices=["standard", "gmm"], help="latent prior (default: the model's)")
    s.add_argument("--natom-sampler", choices=["argmax", "sample"], help="atom counts (default: the model's)")
    s.add_argument("--resample-invalid", type=int, metavar="R",
                   help="rounds of decoding again a crystal with an invalid composition (default: the model's)")
    s.add_argument("--latent-temperature", type=float, metavar="T", help="latent noise scale (default: the model's)")
    s.add_argument("--symmetrize", type=float, metavar="TOL", help="symmetrize at TOL Å (default: the model's)")
    s.add_argument("--snap-angles", type=float, metavar="DEG",
                   help="snap cell angles within DEG degrees of 60/90/120 (default: the model's)")
    s.add_argument("--min-element-share", type=float, metavar="P",
                   help="in those rounds also a crystal whose element count is rarer than P (default: the model's)")
    s.add_argument("--min-pattern-share", type=float, metavar="P",
                   help="in those rounds also a crystal whose stoichiometry pattern is rarer than P (default: the "
                   "model's)")
    d = sub.add_parser("density", help="density W over --seeds sampling seeds, per --components K and --volume-weight "
                       "W (no Langevin step: the density is fixed before the first)")
    d.add_argument("--model", required=True)
    d.add_argument("--dataset", choices=sorted(DATA), required=True)
    d.add_argument("--components", type=int, action="append", required=True, help="0: N(0, I); K: a K-component GMM")
    d.add_argument("--volume-weight", type=float, action="append", metavar="W")
    d.add_argument("--setting", default="k-first+20/fixed",
                   help="COMPOSITION[@T][+R]/TYPE-UPDATE (default: %(default)s)")
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--seeds", type=int, default=8)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    t = sub.add_parser("data", help="the training split scored as if it were a generator's samples: N random "
                       "crystals per seed (what a model of the data distribution would score at that N)")
    t.add_argument("--dataset", choices=sorted(DATA), required=True)
    t.add_argument("--n", type=int, action="append", required=True)
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--first-seed", type=int, default=0, help="seeds run from here (default: 0)")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    c = sub.add_parser("reconstruct")
    c.add_argument("--model", required=True)
    c.add_argument("--label")
    c.add_argument("--dataset", choices=sorted(DATA), required=True)
    c.add_argument("--n", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    r = sub.add_parser("report")
    r.add_argument("--curve", action="append", default=[],
                   help="a training run's log.jsonl: store its curve in benchmarks/cdvae_curves.jsonl")
    args = ap.parse_args()
    {"sample": cmd_sample, "prior": cmd_prior, "density": cmd_density, "data": cmd_data,
     "reconstruct": cmd_reconstruct, "report": cmd_report}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
