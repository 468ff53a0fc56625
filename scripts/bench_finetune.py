"""Fine-tuning the shipped Diffusion-BERT on a small custom corpus (expt_gap.csv, 4.3 k formulas).

Fine-tunes with `composition-gen train --init-from diffusion-bert` on a seeded 95/5 split of the corpus,
then scores 2,000 samples of the base and the fine-tuned model against the corpus' own held-out split
(element-frequency JS divergence and #elements Wasserstein vs the held-out formulas; novelty vs the
custom training formulas). Fine-tuning should pull the distribution toward the custom corpus.

Run: python scripts/bench_finetune.py [--shared ../shared] [--steps 400]
Writes benchmarks/finetune_expt_gap.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from composition_lm.cli import main as cli  # noqa: E402
from composition_lm.data import load_corpus  # noqa: E402
from composition_lm.models import load_model  # noqa: E402
from composition_lm.sampling import generate  # noqa: E402
from evaluation.io import write_json, write_text  # noqa: E402
from evaluation.metrics import formula_set_metrics  # noqa: E402


def score(model, train, heldout, n: int) -> dict:
    lm = load_model(model)
    samples = generate(lm, n, seed=0, progress=False, validity="none")
    m = formula_set_metrics([str(f) if f else "" for _, f, _ in samples], train, {"heldout": heldout}, heldout)
    return {"validity_cdvae_raw": m["validity"]["cdvae"]["raw"], "uniqueness": m["uniqueness"],
            "novelty_vs_custom_train": m["novelty"], "element_js_vs_heldout": m["distribution"]["element_js"],
            "n_elements_wasserstein_vs_heldout": m["distribution"]["n_elements_wasserstein"],
            "n_atoms_wasserstein_vs_heldout": m["distribution"]["n_atoms_wasserstein"],
            "recovery_of_heldout": m["recovery"]["heldout"]["recovery"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    corpus = args.shared / "data/formulas/expt_gap.csv"
    train = load_corpus(corpus, split="train")[0]["formula"]
    heldout = load_corpus(corpus, split="val")[0]["formula"]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--init-from", "diffusion-bert", "--corpus", str(corpus), "--output-dir", f"{tmp}/ft",
                "--max-steps", str(args.steps), "--warmup-steps", "50", "--lr", "3e-4", "--batch-size", "128",
                "--eval-every", "0", "--save-every", str(args.steps), "--no-progress"]
        t = time.perf_counter()
        assert cli(argv) == 0
        minutes = (time.perf_counter() - t) / 60
        base = score("diffusion-bert", train, heldout, args.n)
        tuned = score(f"{tmp}/ft/model", train, heldout, args.n)
    command = "composition-gen " + shlex.join(a.replace(str(args.shared), "../shared") for a in argv)
    result = {"corpus": "expt_gap.csv", "n_custom_train": len(train), "n_custom_heldout": len(heldout),
              "fine_tune_minutes": minutes, "command": command, "base": base, "fine_tuned": tuned}
    write_json(ROOT / "benchmarks/finetune_expt_gap.json", result)
    rows = "\n".join(f"| {k} | {base[k]:.4f} | {tuned[k]:.4f} |" for k in base)
    write_text(ROOT / "benchmarks/finetune_expt_gap.md", f"""# Fine-tuning on a custom corpus (expt_gap.csv)

`python scripts/bench_finetune.py --steps {args.steps}`: {len(train)} training / {len(heldout)} held-out formulas
(seeded split by formula), fine-tuned for {args.steps} steps in {minutes:.1f} min on this CPU with

```
{command}
```

{args.n} samples each (seed 0, default sampling settings), scored against the custom corpus:

| metric | shipped model | fine-tuned |
|---|---:|---:|
{rows}
""")
    print((ROOT / "benchmarks/finetune_expt_gap.md").read_text())


if __name__ == "__main__":
    main()
