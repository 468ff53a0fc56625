"""Con-CDVAE conditioning benchmark: the hit rate of a requested property window against the same model
sampled unconditionally (same N, seed and schedule), at the validity each reaches.

    python scripts/bench_cdvae_conditioning.py sample --model runs/cdvae/mp20-cond/model --n 1000 \
        --config plain --config "band_gap=1:3" --config "band_gap=1:3@2" --relax 200
    python scripts/bench_cdvae_conditioning.py report

A config is ``plain`` (unconditional) or ``NAME=LO:HI[@GUIDANCE]``. Judges, independent of the generator:

* band gap — the composition property predictor of the conditioning issue
  (`evaluation/pretrained/property-predictor`, test MAE 0.34 eV) on each crystal's composition;
* formation energy — the same predictor on every crystal, and, for the first ``--relax`` crystals that
  pass CDVAE's validity rules, M3GNet: relaxed, then placed on the reference hull by
  `structure.stability.StabilityScorer` (the `stability` command), which gives the relaxed formation
  energy (MP2020 scale) and E_hull;
* validity — CDVAE's structure and composition validity (`evaluation.structures`).

Appends one JSON line per config to benchmarks/cdvae_conditioning.jsonl; `report` writes
benchmarks/cdvae_conditioning.md (hit rates with binomial standard errors and the ratio to `plain`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import cpu  # noqa: E402

from evaluation.io import append_jsonl, write_text  # noqa: E402

JSONL = ROOT / "benchmarks" / "cdvae_conditioning.jsonl"


def parse_config(spec: str) -> tuple[str | None, float | None]:
    if spec == "plain":
        return None, None
    target, _, guidance = spec.partition("@")
    return target, float(guidance) if guidance else None


def _rate(hits: list[bool]) -> dict:
    n = len(hits)
    p = sum(hits) / n if n else float("nan")
    return {"n": n, "rate": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan")}


def judge(structures, targets_of_interest, relax_n: int, potential: Path) -> dict:
    import numpy as np

    from evaluation.conditioning import parse_target
    from evaluation.properties import PropertyPredictor
    from evaluation.structures import composition_validity, structure_validity

    struct_ok = [structure_validity(s)[0] for s in structures]
    comp_ok = [composition_validity(s)[0] for s in structures]
    formulas = [s.composition.reduced_formula for s in structures]
    predicted = PropertyPredictor.load().predict(formulas)
    out = {"struct_validity": float(np.mean(struct_ok)), "comp_validity": float(np.mean(comp_ok)),
           "uniqueness": len(set(formulas)) / len(formulas), "hits": {}}
    valid = [i for i, (a, b) in enumerate(zip(struct_ok, comp_ok)) if a and b]
    relaxed = {}
    if relax_n:
        from structure.stability import StabilityScorer

        todo = valid[:relax_n]
        t = time.perf_counter()
        records = StabilityScorer(potential, settings={"time_limit": 600}).score([structures[i] for i in todo], workers=1)
        out["relax_s"] = time.perf_counter() - t
        relaxed = {i: r for i, r in zip(todo, records)}
        ef = [r.e_form_per_atom for r in records if math.isfinite(r.e_form_per_atom)]
        eh = [r.e_hull_per_atom for r in records if math.isfinite(r.e_hull_per_atom)]
        out["relaxed"] = {"n": len(todo), "with_energy": len(ef), "e_form_mean": float(np.mean(ef)) if ef else None,
                          "e_hull_le_0.1": _rate([x <= 0.1 for x in eh]), "e_hull_le_0": _rate([x <= 0 for x in eh])}
    for spec in targets_of_interest:
        t = parse_target(spec)
        if t.name in predicted:
            values = np.asarray(predicted[t.name])
            out["hits"][f"{spec} (predictor, all)"] = _rate([bool(t.contains(v)) for v in values])
            out["hits"][f"{spec} (predictor, valid)"] = _rate([bool(t.contains(values[i])) for i in valid])
        field = {"formation_energy_per_atom": "e_form_per_atom", "e_above_hull": "e_hull_per_atom"}.get(t.name)
        if field and relaxed:
            vals = [getattr(r, field) for r in relaxed.values()]
            out["hits"][f"{spec} (M3GNet, relaxed valid)"] = _rate([bool(t.contains(v)) for v in vals
                                                                      if math.isfinite(v)])
    return out


def cmd_sample(args) -> None:
    from structure.cdvae import CDVAE

    model = CDVAE.from_pretrained(args.model)
    for spec in args.config:
        target, guidance = parse_config(spec)
        t = time.perf_counter()
        structures = model.sample(args.n, seed=args.seed, targets=[target] if target else None, guidance=guidance,
                                  composition=args.composition, type_update=args.type_update)
        seconds = time.perf_counter() - t
        row = {"model": args.model, "config": spec, "n": args.n, "seed": args.seed, "composition": args.composition,
               "type_update": args.type_update, "sampling_s": round(seconds, 1),
               **judge(structures, args.judge, args.relax, args.shared / "models/matgl/M3GNet-MP-2021.2.8-PES"),
               "cpu": cpu(), "command": "python scripts/bench_cdvae_conditioning.py " + " ".join(sys.argv[1:])}
        append_jsonl(JSONL, row)
        print(json.dumps({k: row[k] for k in ("config", "comp_validity", "hits")}), flush=True)


def cmd_report(args) -> None:
    rows = [json.loads(x) for x in JSONL.read_text().splitlines() if x.strip()] if JSONL.is_file() else []
    lines = ["# Con-CDVAE: property-conditioned crystals", "",
             "Hit rate of each requested window against the same model sampled unconditionally (`plain`), same N, "
             "seed and schedule; ± one binomial standard error. Band gap and (all crystals) formation energy are "
             "judged by the composition property predictor; `M3GNet` rows relax the first valid crystals and read "
             "the formation energy and E_hull of the `stability` scorer (their E_hull shares are stability of those "
             "crystals, not SUN rates: no uniqueness or novelty check). Sampler `model/model`: the model's defaults "
             "(for the MP-20 models, k-first with 20 validity redraws and fixed types). Command per row in "
             "benchmarks/cdvae_conditioning.jsonl; `python scripts/bench_cdvae_conditioning.py report` writes "
             "this.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        plain = next((r for r in group if r["config"] == "plain"), None)
        lines += [f"## `{model}`", "",
                  "| config | sampler | N | struct valid | comp valid | judge | hit rate | × plain |",
                  "|---|---|---:|---:|---:|---|---:|---:|"]
        for r in group:
            if r["config"] == "plain":
                continue
            for judge_name, h in r["hits"].items():
                if not judge_name.startswith(r["config"].partition("@")[0] + " "):
                    continue
                base = plain["hits"].get(judge_name) if plain else None
                ratio = f"{h['rate'] / base['rate']:.2f}×" if base and base["rate"] else "n/a"
                base_txt = f" (plain {100 * base['rate']:.1f} ± {100 * base['se']:.1f})" if base else ""
                lines.append(f"| {r['config']} | {r['composition'] or 'model'}/{r['type_update'] or 'model'} | "
                             f"{h['n']} | {100 * r['struct_validity']:.1f} | {100 * r['comp_validity']:.1f} | "
                             f"{judge_name.partition(' ')[2]} | "
                             f"{100 * h['rate']:.1f} ± {100 * h['se']:.1f}{base_txt} | "
                             f"{ratio} |")
        if plain:
            lines += ["", f"`plain`: struct validity {100 * plain['struct_validity']:.1f} %, comp validity "
                      f"{100 * plain['comp_validity']:.1f} %."]
        relaxed = [r for r in group if r.get("relaxed")]
        if relaxed:
            lines += ["", "| config | relaxed | with energy | mean E_form (eV/atom) | E_hull ≤ 0.1 | E_hull ≤ 0 "
                      "| relax s |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in relaxed:
                x = r["relaxed"]
                lines.append(f"| {r['config']} | {x['n']} | {x['with_energy']} | {x['e_form_mean']:.3f} | "
                             f"{100 * x['e_hull_le_0.1']['rate']:.1f} ± {100 * x['e_hull_le_0.1']['se']:.1f} | "
                             f"{100 * x['e_hull_le_0']['rate']:.1f} ± {100 * x['e_hull_le_0']['se']:.1f} | "
                             f"{r.get('relax_s', 0):.0f} |")
        lines.append("")
    lines += ["CPU: " + "; ".join(sorted({r["cpu"] for r in rows})), ""]
    write_text(ROOT / "benchmarks" / "cdvae_conditioning.md", "\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--model", required=True)
    s.add_argument("--config", action="append", required=True, help="plain or NAME=LO:HI[@GUIDANCE]")
    s.add_argument("--judge", action="append", default=[],
                   help="windows to score every config on (default: each config's own target)")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--relax", type=int, default=0, help="relax this many valid crystals per config with M3GNet")
    s.add_argument("--composition")
    s.add_argument("--type-update")
    s.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "sample" and not args.judge:
        args.judge = sorted({parse_config(c)[0] for c in args.config if c != "plain"})
    cmd_sample(args) if args.cmd == "sample" else cmd_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
