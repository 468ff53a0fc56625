"""The closed-loop benchmark (issue 37): the loop's rounds, then the starting and the final model judged on seeds the
loop never sampled.

    python scripts/bench_learn.py run [--rounds 3] [--per-round 1000] [--workers 2] [--resume] [learn options]
    python scripts/bench_learn.py eval --model PATH|NAME --label start [--n 1000] [--seed 1000] [--workers 2]
                                       [--learned-from RUN] [--output DIR] [--temperature T]
    python scripts/bench_learn.py probe --model PATH|NAME --label NAME [--n 1000] [--seed 1000] [--learned-from RUN]
                                        [--temperature T]
    python scripts/bench_learn.py variant --label NAME [--round 0] [--set reward_copies=1 --set replay=4 ...]
    python scripts/bench_learn.py snapshot [--out FOLDER]  # the loop (or an eval) so far -> benchmarks/learn_runs/
    python scripts/bench_learn.py report

`run` is `composition-gen learn` into runs/learn/<name> (templates: the mp_union store, as bench_discover; the default
oracle). `eval` runs `discover` with one model on `--n` formulas from seed `--seed` (the loop samples seeds 0 ..
rounds - 1) and appends a row to benchmarks/learn_eval.jsonl; both resume from their journals. `--output` names the
discover folder (default runs/learn/eval-<label>-n<N>-seed<S>; an existing `discover` run of the model there is
finished and scored, not repeated). `--learned-from RUN`: the loop whose labels the model was fine-tuned on; a SUN
formula the loop had already labelled is counted again as `sun_rate_new` without it (a model that repeats its own
earlier finds learns nothing new, though MP does not know them). `probe` is the cheap look between rounds (sampling
only, no relaxation): validity, uniqueness, novelty against MP's train formulas and the loop's labels, the share of
samples that repeat the loop's SUN finds, element JS, and the loop's latest surrogate's stable share, appended to
benchmarks/learn_probe.jsonl (for choosing fine-tuning settings; never a substitute for `eval`). `snapshot` saves the loop folder (`--out`) without its
training checkpoints and report images to benchmarks/learn_runs/, and `run --resume` restores it on a machine that lacks
it, so the loop can span sessions and machines. `variant` fine-tunes
the model that sampled round K of the loop (`--out`) on that round's labels with other `LearnConfig` settings
(`--set NAME=VALUE`) into runs/learn/variants/NAME, then probes it. `report` writes
benchmarks/learn.md: the loop's rounds.csv and every eval row, with the SUN rates' standard errors and the ratio to
the `start` row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import command_line, cpu, ensure_mp_union_store  # noqa: E402

from evaluation.io import write_text  # noqa: E402

EVAL = ROOT / "benchmarks" / "learn_eval.jsonl"
TEMPLATES = ROOT / "runs" / "mp_union.db"


def _shown(path) -> str:
    """A path as a reader can rerun it: relative to the repository when inside it."""
    text = str(path)
    return os.path.relpath(text, ROOT) if os.path.isabs(text) and Path(text).is_relative_to(ROOT) else text


def _sampling(args) -> dict:
    """How eval and probe sample: float32 on every machine (`dtype auto` samples in bfloat16 on CPUs with
    AVX512-BF16/AMX, and the same seed then draws other formulas than the rows measured in float32 on an AVX2-only
    machine), at ``--temperature`` when given."""
    return {"dtype": "float32", **({"temperature": args.temperature} if args.temperature is not None else {})}


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


SNAPSHOTS = ROOT / "benchmarks" / "learn_runs"
#: what a snapshot leaves out: training checkpoints, report images and archives the loop rebuilds
_SKIP = ("/train/", ".png", "report.html", "sun_cif.zip", ".extxyz")


def cmd_snapshot(args) -> int:
    import tarfile

    from evaluation.io import atomic_path

    target = SNAPSHOTS / f"{args.out.name}.tar.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(args.out.rglob("*")):
            name = path.relative_to(args.out.parent).as_posix()
            if path.is_file() and not any(k in "/" + name for k in _SKIP):
                tar.add(path, arcname=name)
    print(f"{target}: {target.stat().st_size / 1e6:.1f} MB")
    return 0


def _restore(out: Path) -> None:
    import tarfile

    source = SNAPSHOTS / f"{out.name}.tar.gz"
    if out.exists() or not source.is_file():
        return
    with tarfile.open(source) as tar:
        tar.extractall(out.parent, filter="data")
    print(f"restored {out} from {source}")


def cmd_run(args) -> int:
    from composition_lm.cli import main as cli

    if args.resume:
        _restore(args.out)

    argv = ["learn", "--model", args.model, "--rounds", str(args.rounds), "--per-round", str(args.per_round),
            "--workers", str(args.workers), "--no-progress", "-o", str(args.out)]
    argv += ["--templates", str(ensure_mp_union_store(args.templates, args.shared))]
    return cli(argv + (["--resume"] if args.resume else []) + args.extra)


def cmd_eval(args) -> int:
    from structure import StructurePredictor

    from composition_lm.workflows import discover
    from evaluation.composition import try_parse_formula
    from evaluation.metrics import element_frequencies, js_divergence
    from structure.io import read_structures

    out = args.output or ROOT / "runs" / "learn" / f"eval-{args.label}-n{args.n}-seed{args.seed}"
    _restore(out)  # a stopped eval snapshotted on another machine (snapshot --out FOLDER)
    t0 = time.process_time()
    from composition_lm.workflows.learn import oracle_scorer

    predictor = StructurePredictor(ensure_mp_union_store(args.templates, args.shared))
    # the loop's oracle, with which the start row was measured: relaxations of up to 500 steps, a structure for
    # every valid formula (discover's defaults now stop at 200 steps and skip formulas above 0.15 eV/atom)
    scorer = oracle_scorer(predictor)
    overrides = _sampling(args)
    result = discover(args.model, args.n, args.seed, out, predictor=predictor, scorer=scorer, skip_above=None,
                      workers=args.workers, resume=(out / "journal.jsonl").exists(), **overrides)
    table = result.candidates()
    per_sample = table.drop_duplicates("index")
    valid = per_sample[~per_sample["stage"].isin(["sampled", "parsed"])]
    distinct = valid.drop_duplicates("formula")
    formulas = [f for f in per_sample["formula"] if isinstance(f, str) and f]
    test = [r.structure.composition.reduced_formula
            for r in read_structures(args.shared / "data/structures/mp_20/test.csv.gz")]
    parsed = [p for p in (try_parse_formula(f)[0] for f in formulas) if p is not None]
    reference = [p for p in (try_parse_formula(f)[0] for f in test) if p is not None]
    sun = result.sun_rate
    seen = _loop_formulas(args.learned_from) if args.learned_from else set()
    sun_table = result.sun()
    new = {t: int(((sun_table["e_hull_per_atom"] <= float(t)) & ~sun_table["formula"].isin(seen)).sum()) / args.n
           for t in ("0.1", "0")}
    row = {"label": args.label, "model": _shown(args.model), "n": args.n, "seed": args.seed,
           "temperature": args.temperature, "dtype": overrides["dtype"], "sun_rate": sun["0.1"], "sun_rate_se": _se(sun["0.1"], args.n), "sun_rate_0": sun["0"],
           "sun_rate_0_se": _se(sun["0"], args.n), "sun_rate_new": new["0.1"], "sun_rate_new_se": _se(new["0.1"], args.n),
           "sun_rate_0_new": new["0"], "learned_from": _shown(args.learned_from or ""),
           "validity": len(valid) / args.n, "uniqueness": len(distinct) / max(len(valid), 1),
           "novelty": float(distinct["novel_formula"].astype(str).eq("True").mean()), "counts": result.counts,
           "element_js_mp20_test": js_divergence(element_frequencies(parsed), element_frequencies(reference)),
           "cpu_s_parent": round(time.process_time() - t0, 1), "command": command_line("scripts/bench_learn.py"),
           "cpu": cpu()}
    with open(EVAL, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


def cmd_probe(args, generator=None) -> int:
    """``generator``: a FormulaGenerator to probe instead of loading ``args.model`` (scripts/learn_experiments.py
    probes sampling-time mixtures of two models this way)."""
    import pandas as pd

    from composition_lm.generator import FormulaGenerator
    from evaluation.composition import try_parse_formula
    from evaluation.hull import ReferenceHull
    from evaluation.metrics import element_frequencies, js_divergence
    from evaluation.properties import PropertyPredictor
    from structure.io import read_structures

    run = args.learned_from or args.out
    files = sorted(Path(run).glob("round-*/labels.csv"))
    labels = pd.concat([pd.read_csv(f, keep_default_na=False) for f in files]) if files else None
    labelled = set(labels["formula"]) - {""} if labels is not None else set()
    found = set(labels.loc[labels["sun"].astype(str) == "True", "formula"]) if labels is not None else set()
    surrogates = sorted(Path(run).glob("round-*/surrogate/config.json"))
    surrogate = PropertyPredictor.load(surrogates[-1].parent) if surrogates else None
    mp_train = FormulaGenerator.from_pretrained("diffusion-bert").training_formulas()
    t0 = time.process_time()
    overrides = _sampling(args)
    generator = generator if generator is not None else FormulaGenerator.from_pretrained(args.model)
    table = generator.generate(args.n, seed=args.seed, **overrides)
    valid = [f for f, ok in zip(table["formula"], table["valid_cdvae"]) if isinstance(f, str) and f and ok]
    distinct = sorted(set(valid))
    new = [f for f in distinct if f not in mp_train and f not in labelled]
    known = (generator.training_formulas() or set()) | ReferenceHull.default().formulas()
    predicted = dict(zip(new, surrogate.predict(new)["e_above_hull"])) if surrogate and new else {}
    test = [r.structure.composition.reduced_formula
            for r in read_structures(args.shared / "data/structures/mp_20/test.csv.gz")]
    parsed = [p for p in (try_parse_formula(f)[0] for f in valid) if p is not None]
    reference = [p for p in (try_parse_formula(f)[0] for f in test) if p is not None]
    row = {"label": args.label, "model": _shown(args.model), "n": args.n, "seed": args.seed,
           "temperature": args.temperature, "dtype": overrides["dtype"], "learned_from": _shown(run),
           "validity": len(valid) / args.n, "uniqueness": len(distinct) / max(len(valid), 1),
           "novelty_mp": sum(f not in mp_train for f in distinct) / max(len(distinct), 1),
           # eval's (discover's) novelty: not among the probed model's own training formulas nor the reference hull's
           "novelty_eval": sum(f not in known for f in distinct) / max(len(distinct), 1),
           "new": len(new) / args.n, "repeats_sun_finds": sum(f in found for f in valid) / args.n,
           "surrogate_stable_new": sum(v <= 0.1 for v in predicted.values()) / args.n,
           "surrogate": surrogates[-1].parent.parent.name if surrogates else "shipped",
           "element_js_mp20_test": js_divergence(element_frequencies(parsed), element_frequencies(reference)),
           "sampling_cpu_s": round(time.process_time() - t0, 1), "cpu": cpu()}
    with open(ROOT / "benchmarks" / "learn_probe.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


def cmd_variant(args) -> int:
    import csv

    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows.learn import LearnConfig, finetune_round

    values = dict(item.split("=", 1) for item in args.set)
    config = LearnConfig()
    typed = {k: (v.lower() == "true") if isinstance(getattr(config, k), bool) else type(getattr(config, k))(v)
             for k, v in values.items()}
    config = config.replace(**typed)
    # --round -1: every round's labels at once, fine-tuning the loop's starting model (one consolidated step)
    rounds = sorted(int(p.parent.name.split("-")[1]) for p in args.out.glob("round-*/labels.csv")) \
        if args.round < 0 else [args.round]
    rows = []
    for k in rounds:
        with open(args.out / f"round-{k}" / "labels.csv", encoding="utf-8") as fh:
            rows += [{**r, **{c: r[c] == "True" for c in ("sun", "unique", "novel")},
                      "e_hull": float(r["e_hull"] or "nan")} for r in csv.DictReader(fh)]
    start = args.model
    if args.round > 0:
        start = str(args.out / json.loads((args.out / f"round-{args.round - 1}" / "done.json").read_text())["model"])
    reference = sorted(FormulaGenerator.from_pretrained(start).training_formulas() or [])
    out = ROOT / "runs" / "learn" / "variants" / args.label
    _restore(out)  # snapshot --out runs/learn/variants/LABEL
    if not (out / "model" / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        finetune_round(Path(start) if Path(start).is_dir() else FormulaGenerator.from_pretrained(start).path, rows,
                       reference, config, out, max(args.round, 0))
    args.model, args.learned_from = str(out / "model"), args.out
    args.label = f"{args.label} ({', '.join(f'{k}={v}' for k, v in values.items()) or 'defaults'})"
    return cmd_probe(args)


def _loop_formulas(run: Path) -> set[str]:
    """Every formula a learning loop labelled (its rounds' labels.csv)."""
    import pandas as pd

    files = sorted(Path(run).glob("round-*/labels.csv"))
    if not files:
        raise SystemExit(f"{run} holds no round labels")
    return set(pd.concat([pd.read_csv(f, keep_default_na=False) for f in files])["formula"]) - {""}


def cmd_report(args) -> int:
    import pandas as pd

    lines = ["# Closed-loop discovery (issue 37)", "",
             "`python scripts/bench_learn.py run|eval|report`; the oracle is the default verdict (CHGNet relaxes with "
             "screening, a SevenNet-l3i5 single point judges); templates from mp_union. SUN: stable (E_hull <= 0.1 "
             "eV/atom, or <= 0), unique, novel, per sampled formula, +/- one binomial standard error.", ""]
    rounds = args.out / "rounds.csv"
    if rounds.is_file():
        lines += ["## The loop's rounds (seeds 0, 1, 2: the loop's own samples)", "",
                  pd.read_csv(rounds).assign(model=lambda t: t["model"].map(_shown)).to_markdown(
                      index=False, floatfmt=".4g"), ""]
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()] if EVAL.is_file() else []
    start = next((r for r in rows if r["label"] == "start"), None)
    if rows:
        lines += ["## Judged on seeds the loop never sampled", "",
                  "SUN new: SUN formulas the loop had not already labelled (the model learned from those). Novelty: "
                  "distinct valid formulas not among the model's training formulas.", "",
                  "| label | model | N | seed | SUN at 0.1 | x start | SUN new at 0.1 | x start | SUN at 0 | "
                  "validity | uniqueness | novelty | element JS vs MP-20 test | sampled in |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            ratio = r["sun_rate"] / start["sun_rate"] if start and start["sun_rate"] else math.nan
            new = r.get("sun_rate_new", r["sun_rate"])
            ratio_new = new / start["sun_rate"] if start and start["sun_rate"] else math.nan
            lines.append(f"| {r['label']} | {r['model']} | {r['n']} | {r['seed']} | {100 * r['sun_rate']:.1f} % "
                         f"± {100 * r['sun_rate_se']:.1f} | {ratio:.2f} | {100 * new:.1f} % ± "
                         f"{100 * _se(new, r['n']):.1f} | {ratio_new:.2f} | {100 * r['sun_rate_0']:.1f} % ± "
                         f"{100 * r['sun_rate_0_se']:.1f} | {r.get('validity', math.nan):.3f} | "
                         f"{r.get('uniqueness', math.nan):.3f} | {r.get('novelty', math.nan):.3f} | "
                         f"{r['element_js_mp20_test']:.4f} | {r.get('dtype', '')} |")
    probes = ROOT / "benchmarks" / "learn_probe.jsonl"
    rows = [json.loads(line) for line in probes.read_text().splitlines()] if probes.is_file() else []
    if rows:
        lines += ["", "## Probes (sampling only: a look for choosing fine-tuning settings, not a measurement of SUN)", "",
                  "`python scripts/bench_learn.py probe|variant ...`: N formulas from seed S; new: distinct valid formulas "
                  "neither in MP's train formulas nor labelled by the loop, per sample; surrogate-stable new: those the "
                  "loop's latest surrogate puts at E_hull <= 0.1 (it learned the same labels the model did, so it "
                  "flatters a fine-tuned model); repeats: samples that are one of the loop's SUN finds.", "",
                  "| label | N | seed | T | validity | uniqueness | novelty vs MP train | novelty as eval | new | "
                  "surrogate-stable new | surrogate | repeats | element JS vs MP-20 test | sampling CPU-s | CPU | "
                  "sampled in |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['n']} | {r['seed']} | {r.get('temperature') or 'model'} | "
                         f"{r['validity']:.3f} | {r['uniqueness']:.3f} | "
                         f"{r['novelty_mp']:.3f} | {r.get('novelty_eval', math.nan):.3f} | {r['new']:.3f} | {r['surrogate_stable_new']:.3f} | "
                         f"{r['surrogate']} | "
                         f"{r['repeats_sun_finds']:.3f} | {r['element_js_mp20_test']:.4f} | {r['sampling_cpu_s']:.0f} | "
                         f"{r.get('cpu', '')} | {r.get('dtype', '')} |")
        lines += _frontier(rows, [json.loads(line) for line in EVAL.read_text().splitlines()] if EVAL.is_file() else [])
    write_text(ROOT / "benchmarks" / "learn.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _frontier(probes: list[dict], evals: list[dict]) -> list[str]:
    """The trade-off every lever moves along: surrogate-stable new formulas per sample against novelty as the eval
    counts it (probe rows that have it), with the eval rows' measured SUN rate and novelty beside them; drawn to
    benchmarks/learn_frontier.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one seed's samples (1000, the eval seed), so that the points compare the same draws
    rows = [r for r in probes if "novelty_eval" in r and r.get("dtype") == "float32" and r["seed"] == 1000]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.scatter([r["novelty_eval"] for r in rows], [r["surrogate_stable_new"] for r in rows], s=18,
               label="probe: surrogate-stable new per sample (1,000 samples of seed 1000, float32)")
    for r in rows:
        ax.annotate(r["label"].split(" (")[0],
                    (r["novelty_eval"], r["surrogate_stable_new"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    done = [r for r in evals if r.get("novelty") is not None and (r["seed"] == 1000 or r["label"] == "start")]
    ax.errorbar([r["novelty"] for r in done], [r["sun_rate"] for r in done], yerr=[r["sun_rate_se"] for r in done],
                fmt="s", color="C3", ms=5, label="eval: SUN rate at 0.1 eV/atom (oracle, 1,000 formulas)")
    for r in done:
        name = r["label"] if r.get("dtype") == "float32" else f"{r['label']} ({r.get('dtype')})"
        ax.annotate(name, (r["novelty"], r["sun_rate"]), fontsize=6, color="C3", xytext=(3, -8),
                    textcoords="offset points")
    start = next((r for r in evals if r["label"] == "start"), None)
    if start:
        ax.axhline(1.5 * start["sun_rate"], ls="--", lw=0.8, color="grey")
    ax.axvline(0.85, ls=":", lw=0.8, color="grey")
    ax.set_xlabel("novelty (distinct valid formulas in neither the model's training formulas nor MP's hull)")
    ax.set_ylabel("per sample")
    ax.set_title("issue 37 targets: SUN >= 1.5x start (dashed), novelty >= 0.85 (dotted)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "learn_frontier.png", dpi=130)
    plt.close(fig)
    return ["", "![trade-off](learn_frontier.png)", "",
            "The trade-off (`learn_frontier.png`): each probe with novelty counted as the eval counts it, against the "
            "surrogate-stable new formulas per sample (the probes sampled in float32); the eval rows (oracle SUN rate "
            "at 0.1 against their novelty) in red, with the precision named where it was not float32. The targets are "
            "the top right corner."]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "eval", "probe", "variant", "snapshot", "report"])
    ap.add_argument("--model", default="diffusion-bert")
    ap.add_argument("--label", default="start")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=1000)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1000, help="eval: first seed the loop never sampled (default 1000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--templates", type=Path, default=TEMPLATES,
                    help="template store (built from mp_union.csv.gz when missing; default: runs/mp_union.db)")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "learn" / "loop")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--round", type=int, default=0,
                    help="variant: the loop's round whose labels to fine-tune on (-1: all rounds' labels at once, "
                    "from --model, the loop's starting model)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="variant: a LearnConfig setting (repeatable)")
    ap.add_argument("--output", type=Path, help="eval: the discover folder (default runs/learn/eval-LABEL-nN-seedS)")
    ap.add_argument("--temperature", type=float, help="eval, probe, variant: sample at this temperature (default: the model's)")
    ap.add_argument("--learned-from", type=Path, metavar="RUN",
                    help="eval: the loop the model learned from (its labelled formulas are not new finds)")
    args, extra = ap.parse_known_args(argv)  # run: any other option goes to `composition-gen learn`
    if extra and args.action != "run":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = [a for a in extra if a != "--"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return {"run": cmd_run, "eval": cmd_eval, "probe": cmd_probe, "variant": cmd_variant, "snapshot": cmd_snapshot,
            "report": cmd_report}[args.action](args)


if __name__ == "__main__":
    raise SystemExit(main())
