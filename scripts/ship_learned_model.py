"""Ship a model the closed loop (issue 37) produced as a named model of the package, with its card.

    python scripts/ship_learned_model.py --model runs/learn/variants/novel-r2/model --eval-label novel-r2 \
        [--name diffusion-bert-stable] [--loop runs/learn/loop] [--step "..."]

Copies the model folder's weights, config, tokenizer and training formulas into
composition_lm/pretrained/<name>/ (a temporary folder renamed into place), with the sampling settings of the
model it was fine-tuned from (the shipped Diffusion-BERT's where the folder has none), and writes the card
(README.md) from the loop's own files: the oracle (the rounds' funnel.json), each round's labels and their counts
(labels.csv), rounds.csv, and the start and this model's rows of benchmarks/learn_eval.jsonl. The name must be in
composition_lm.models.SHIPPED for `--model <name>` to find it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json, write_text  # noqa: E402

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_formulas.txt.gz",
         "sampling_config.json")
EVAL = ROOT / "benchmarks" / "learn_eval.jsonl"


def _rel(path) -> str:
    text = str(path)
    return os.path.relpath(text, ROOT) if os.path.isabs(text) and Path(text).is_relative_to(ROOT) else text


def _label_counts(loop: Path) -> list[tuple[int, dict]]:
    import pandas as pd

    out = []
    for f in sorted(loop.glob("round-*/labels.csv"), key=lambda p: int(p.parent.name.split("-")[1])):
        t = pd.read_csv(f, keep_default_na=False)
        counts = t["label"].value_counts().to_dict()
        counts["SUN"] = int((t["sun"].astype(str) == "True").sum())
        out.append((int(f.parent.name.split("-")[1]), counts))
    return out


def _eval_rows(label: str) -> tuple[dict | None, dict | None]:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()] if EVAL.is_file() else []
    start = next((r for r in rows if r["label"] == "start"), None)
    mine = next((r for r in reversed(rows) if r["label"] == label), None)
    return start, mine


def _eval_line(r: dict) -> str:
    return (f"| {r['label']} | {r['model']} | {r['seed']} | {100 * r['sun_rate']:.1f} % ± {100 * r['sun_rate_se']:.1f} "
            f"| {100 * r.get('sun_rate_new', r['sun_rate']):.1f} % | {100 * r['sun_rate_0']:.1f} % ± "
            f"{100 * r['sun_rate_0_se']:.1f} | {r['uniqueness']:.3f} | {r['novelty']:.3f} | "
            f"{r['element_js_mp20_test']:.4f} |")


def card(name: str, model: Path, loop: Path, eval_label: str, step: str, step_command: str = "",
         limits: tuple[str, ...] = ()) -> str:
    import pandas as pd

    funnel = json.loads((loop / "round-0" / "discover" / "funnel.json").read_text())
    cfg = json.loads((loop / "learn_config.json").read_text())
    args = json.loads((model / "training_args.json").read_text())
    rounds = pd.read_csv(loop / "rounds.csv")
    start, mine = _eval_rows(eval_label)
    lines = [f"# {name}: Diffusion-BERT that learned from its own verified candidates", "",
             "The shipped Diffusion-BERT (`diffusion-bert`, trained on Materials Project formulas) after "
             f"{len(rounds)} rounds of `composition-gen learn` (issue 37): each round sampled 1,000 formulas, the "
             "discovery funnel judged them, and the model was fine-tuned by reward-weighted likelihood on the "
             f"round's SUN formulas (stable at E_hull <= {cfg['e_hull_max']:g} eV/atom, unique, novel against MP "
             f"and every earlier round), each repeated {cfg['reward_copies']} times, with {cfg['replay']:g} "
             f"replayed formulas per SUN formula (`--replay-from {cfg['replay_from']}`), {cfg['finetune_steps']} "
             f"steps per round. {step}", "",
             f"`composition-gen discover --model {name}` and `composition-gen sample --model {name}` use it; "
             f"0.89 M parameters, the same architecture, tokenizer and sampler settings as `diffusion-bert`.", "",
             "## The oracle", "",
             f"The discovery funnel of `composition-gen discover` with the package's calibrated verdict: "
             f"{funnel['potential']}; screening " + ", ".join(
                 f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in funnel["screening"].items())
             + " (eV/atom, steps); relaxations of up to 500 steps; "
             f"one template per formula from the `mp_union` store (all 53,164 MP structures of "
             "`../shared/data/structures/mp_union.csv.gz`); E_hull against "
             f"`{funnel['reference_hull']}`. Calibrated on WBM structures no potential trained on: MAE 0.046 "
             "eV/atom, F1 0.79 at E_hull <= 0 (`benchmarks/stability_wbm.md`). From round 1 a composition "
             "surrogate (the shipped property predictor fine-tuned on the loop's labels) kept formulas it put above "
             f"{cfg['surrogate_skip_above']} eV/atom from the oracle (`skipped`, never rewarded).", "",
             "## The labels", "", "| round | sampled with | " + " | ".join(
                 ["stable", "metastable", "unstable", "failed", "skipped", "invalid", "SUN"]) + " |",
             "|---:|---|" + "---:|" * 7]
    for k, counts in _label_counts(loop):
        sampled_with = "diffusion-bert" if k == 0 else f"round-{k - 1}/model"
        lines.append(f"| {k} | {sampled_with} | " + " | ".join(
            str(counts.get(c, 0)) for c in ["stable", "metastable", "unstable", "failed", "skipped", "invalid",
                                            "SUN"]) + " |")
    lines += ["", "Per round (`rounds.csv`; SUN per sample, skipped samples counted as not SUN; novelty against MP's "
              "training formulas and every earlier round; element JS against MP's training formulas):", "",
              "| round | SUN at 0.1 | SUN at 0 | uniqueness | novelty | element JS | skipped | surrogate agreement | "
              "CPU-s (oracle) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rounds.itertuples():
        lines.append(f"| {r.round} | {100 * r.sun_rate:.1f} % | {100 * r.sun_rate_0:.1f} % | {r.uniqueness:.3f} | "
                     f"{r.novelty:.3f} | {r.element_js:.4f} | {r.skipped} | {r.surrogate_accuracy:.2f} | "
                     f"{r.cpu_s:.0f} ({r.oracle_cpu_s:.0f}) |")
    lines += ["", "## Judged on seeds the loop never sampled (`benchmarks/learn.md`)", ""]
    if start and mine:
        ratio = mine["sun_rate"] / start["sun_rate"]
        se = ratio * math.sqrt((mine["sun_rate_se"] / mine["sun_rate"]) ** 2 +
                               (start["sun_rate_se"] / start["sun_rate"]) ** 2)
        lines += ["1,000 formulas per row through the same oracle; SUN new: without the formulas the loop had "
                  "already labelled; novelty: distinct valid formulas that neither MP nor the model's own training "
                  "corpus lists (for this model: MP's training formulas and the loop's fine-tuning corpora).", "",
                  "| row | model | seed | SUN at 0.1 | SUN new at 0.1 | SUN at 0 | uniqueness | novelty | element JS vs "
                  "MP-20 test |", "|---|---|---:|---:|---:|---:|---:|---:|---:|", _eval_line(start), _eval_line(mine),
                  "", f"SUN at 0.1: {ratio:.2f}x ± {se:.2f} the starting model's."]
    else:
        lines.append("Not measured yet: `python scripts/bench_learn.py eval --model "
                     f"composition_lm/pretrained/{name} --label {eval_label} --n 1000 --seed 1000 "
                     "--learned-from runs/learn/loop`.")
    lines += ["", "## Limits", "",
              "- The rewards are one oracle's verdicts: CHGNet relaxations of template structures judged by a "
              "SevenNet-l3i5 single point. The model learns what that oracle calls stable, including its errors "
              "(WBM: precision 0.71 at E_hull <= 0).",
              "- Reward fine-tuning narrows the model: its element distribution drifts from MP's (the loop stops "
              "when element JS exceeds 0.05)" + (
                  f", and its formulas are less often new than `diffusion-bert`'s ({mine['novelty']:.3f} against "
                  f"{start['novelty']:.3f})." if start and mine and mine["novelty"] < start["novelty"] else "."),
              "- Novel here means a composition MP does not list; a novel formula can still be a known compound "
              "outside MP.", *[f"- {x}" for x in limits], "",
              "## Provenance and licences", "",
              f"Fine-tuned from `{_rel(args.get('init_from', ''))}` on `{_rel(args.get('corpus', ''))}`, "
              f"{args.get('max_steps')} steps, batch {args.get('batch_size')}, lr {args.get('lr')}, seed "
              f"{args.get('seed')}. Training formulas: Materials Project (CC BY 4.0, `../shared/README.md`) and the "
              "loop's own samples. The oracle's potentials: CHGNet 0.3.0 (BSD-3-Clause), SevenNet-l3i5 (MIT).", "",
              "Reproduce: `python scripts/bench_learn.py run --rounds 3 --per-round 1000 --workers 2 --resume -- "
              "--round0-from runs/discover/diffusion-bert-n1000-seed0 --replay-from samples --surrogate-skip-above "
              "0.2 --max-steps 500` (round 0 is the 1,000-formula discover benchmark, "
              f"`python scripts/bench_discover.py --n 1000`), then {step_command or 'the last step as above'}, then "
              f"`python scripts/ship_learned_model.py --model {_rel(model)} --eval-label {eval_label}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the model folder to ship")
    ap.add_argument("--name", default="diffusion-bert-stable")
    ap.add_argument("--loop", type=Path, default=ROOT / "runs" / "learn" / "loop")
    ap.add_argument("--eval-label", required=True, help="its row in benchmarks/learn_eval.jsonl")
    ap.add_argument("--step", default="", help="a sentence on how the last fine-tuning step differed, for the card")
    ap.add_argument("--step-command", default="", help="the command of that step, for the card's Reproduce line")
    ap.add_argument("--limit", action="append", default=[], help="a further limit for the card (repeatable)")
    args = ap.parse_args(argv)
    from composition_lm.models import PRETRAINED_DIR, SHIPPED

    if args.name not in SHIPPED:
        ap.error(f"add {args.name!r} to composition_lm.models.SHIPPED first")
    dest = PRETRAINED_DIR / SHIPPED[args.name]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        source = args.model / name
        if not source.is_file() and name == "sampling_config.json":
            source = PRETRAINED_DIR / SHIPPED["diffusion-bert"] / name
        shutil.copyfile(source, tmp / name)
    training = json.loads((args.model / "training_args.json").read_text())
    write_json(tmp / "training_args.json", {k: _rel(v) if isinstance(v, str) else v for k, v in training.items()})
    write_text(tmp / "README.md", card(args.name, args.model, args.loop, args.eval_label, args.step,
                                       args.step_command, tuple(args.limit)))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"wrote {_rel(dest)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
