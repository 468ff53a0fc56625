"""Fine-tuning experiments on the closed loop's round 2 that `bench_learn.py variant` cannot express with
`LearnConfig` settings alone (issue 37). Each continues the model that sampled round 2 (the round-1 model) with
the settings of the shipped `diffusion-bert-stable` (`replay_from=novel`, 4 copies, 300 steps) plus one change,
into runs/learn/variants/LABEL; then `python scripts/bench_learn.py probe --model runs/learn/variants/LABEL/model
--label ... --learned-from runs/learn/loop` looks at it.

    python scripts/learn_experiments.py surrogate-positives --label sp8k-0.1-c1 [--samples 8000] [--sample-seed 500]
        # + the round-1 model's novel samples that the round-2 surrogate puts at E_hull <= 0.1, as SUN positives
        # (one copy each, and the oracle's SUN formulas one copy each too)
    python scripts/learn_experiments.py wide-negatives --label ulwide0.3 [--unlikelihood 0.3]
        # unlikelihood on the round's known samples + the known formulas among --samples round-1 samples
    python scripts/learn_experiments.py unstable-negatives --label ulunstable0.3 [--with-known]
        # unlikelihood on the samples the oracle put above 0.1 eV/atom in rounds 0-2 (and the round's known ones)

    python scripts/learn_experiments.py autoguide --model runs/learn/variants/novel-r2/model --gamma 1.5 --label ...
        # no training: sample log p = gamma log p_model + (1 - gamma) log p_start (autoguidance, Karras et al. 2024;
        # contrastive decoding, Li et al. 2023: the loop's model guided away from the one it started from), probed

The extra samples come from seed --sample-seed (500: the loop sampled seeds 0-2, the evaluation starts at 1000).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOOP = ROOT / "runs" / "learn" / "loop"


def _labels(k: int) -> list[dict]:
    with open(LOOP / f"round-{k}" / "labels.csv", encoding="utf-8") as fh:
        return [{**r, **{c: r[c] == "True" for c in ("sun", "unique", "novel")}, "e_hull": float(r["e_hull"] or "nan")}
                for r in csv.DictReader(fh)]


def _extra_samples(model: Path, n: int, seed: int) -> list[str]:
    """Distinct valid formulas among ``n`` samples of ``model`` from ``seed`` (cached under runs/learn/variants)."""
    import pandas as pd

    from composition_lm.generator import FormulaGenerator

    cache = ROOT / "runs" / "learn" / "variants" / f"round-1-samples-n{n}-seed{seed}.csv"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        FormulaGenerator.from_pretrained(model).generate(n, seed=seed).to_csv(cache, index=False)
    table = pd.read_csv(cache, keep_default_na=False)
    return sorted({f for f, ok in zip(table["formula"], table["valid_cdvae"]) if f and str(ok) == "True"})


def _mixture(a, b, gamma: float):
    """A denoiser whose log-probabilities are ``gamma * log p_a + (1 - gamma) * log p_b`` (both renormalised first;
    tokens both rule out stay out)."""
    import torch
    from torch import nn

    class Mixture(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.gamma, self.config = a.eval(), b.eval(), gamma, a.config

        def forward(self, x, t=None, **kw):
            la = self.a(x, t, **kw).float().log_softmax(-1)
            lb = self.b(x, t, **kw).float().log_softmax(-1)
            return torch.nan_to_num(self.gamma * la + (1 - self.gamma) * lb, nan=-torch.inf)

    return Mixture()


def autoguide(args) -> int:
    import scripts.bench_learn as bench
    from composition_lm.generator import FormulaGenerator
    from composition_lm.models import load_model

    generator = FormulaGenerator.from_pretrained(args.model)
    generator.loaded.model = _mixture(generator.loaded.model, load_model(args.start).model, args.gamma)
    probe = bench.parse_args(["probe", "--model", args.model, "--label", args.label, "--learned-from", str(LOOP)])
    return bench.cmd_probe(probe, generator=generator)


def main(argv=None) -> int:
    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows.learn import LearnConfig, finetune_round
    from evaluation.hull import ReferenceHull
    from evaluation.properties import PropertyPredictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["surrogate-positives", "wide-negatives", "unstable-negatives", "autoguide"])
    ap.add_argument("--model", help="autoguide: the model to guide")
    ap.add_argument("--start", default="diffusion-bert", help="autoguide: the model it is guided away from")
    ap.add_argument("--gamma", type=float, default=1.5, help="autoguide: 1 is the model alone")
    ap.add_argument("--label", required=True)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--sample-seed", type=int, default=500)
    ap.add_argument("--threshold", type=float, default=0.1, help="surrogate-positives: E_hull cut (eV/atom)")
    ap.add_argument("--unlikelihood", type=float, default=0.3)
    ap.add_argument("--with-known", action="store_true", help="unstable-negatives: the round's known samples too")
    args = ap.parse_args(argv)
    if args.experiment == "autoguide":
        return autoguide(args)

    start = LOOP / json.loads((LOOP / "round-1" / "done.json").read_text())["model"]
    rows = _labels(2)
    config = LearnConfig(replay_from="novel")
    if args.experiment == "surrogate-positives":
        labelled = {r["formula"] for k in (0, 1, 2) for r in _labels(k)}
        known = (FormulaGenerator.from_pretrained(start).training_formulas() or set()) | labelled \
            | ReferenceHull.default().formulas()
        new = [f for f in _extra_samples(start, args.samples, args.sample_seed) if f not in known]
        predicted = PropertyPredictor.load(LOOP / "round-2" / "surrogate").predict(new)["e_above_hull"]
        positives = [f for f, e in zip(new, predicted) if e <= args.threshold]
        print(f"{len(new)} new formulas, {len(positives)} at surrogate E_hull <= {args.threshold}")
        rows += [{"round": 2, "formula": f, "label": "surrogate", "sun": True, "novel": True, "unique": True,
                  "e_hull": math.nan} for f in positives]
        config = config.replace(reward_copies=1)
    elif args.experiment == "wide-negatives":
        known = (FormulaGenerator.from_pretrained(start).training_formulas() or set()) | ReferenceHull.default().formulas()
        extra = [f for f in _extra_samples(start, args.samples, args.sample_seed) if f in known]
        print(f"{len(extra)} known formulas among {args.samples} round-1 samples")
        # finetune_round takes the valid rows that are not novel as negatives (and never replays them)
        rows += [{"round": 2, "formula": f, "label": "unlabelled", "sun": False, "novel": False, "unique": True,
                  "e_hull": math.nan} for f in extra]
        config = config.replace(unlikelihood=args.unlikelihood)
    else:
        unstable = {r["formula"] for k in (0, 1, 2) for r in _labels(k) if r["label"] == "unstable"}
        for r in rows:
            if not r["novel"] and not args.with_known:
                r["label"] = "failed"  # the round's known samples: neither negatives nor replayed
            if r["formula"] in unstable:
                r["novel"] = False  # a negative (and not replayed)
        present = {r["formula"] for r in rows}
        rows += [{"round": 0, "formula": f, "label": "unstable", "sun": False, "novel": False, "unique": True,
                  "e_hull": math.nan} for f in sorted(unstable - present)]
        config = config.replace(unlikelihood=args.unlikelihood)
    out = ROOT / "runs" / "learn" / "variants" / args.label
    out.mkdir(parents=True, exist_ok=True)
    model = finetune_round(start, rows, [], config, out, 2)
    print(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
