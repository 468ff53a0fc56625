"""What raises the validity of Diffusion-BERT samples? One table, same seed and sample count throughout.

Rows: the unconditional model (``--base``) at a few temperatures; a validity-conditioned fine-tune
(``--conditioned``: a model folder, or a training checkpoint's ``model.safetensors`` loaded onto the
base model extended with the condition tokens) asked for valid / invalid / no condition; and a model
fine-tuned on valid formulas only (``--only-valid``). Validity is the cdvae protocol over raw samples;
novelty is against mp_formulas.csv ``train``, element JS against ``val``.

Run:  python scripts/bench_validity_levers.py --base runs/dbert-expanded/model \\
          --conditioned runs/dbert-valid-ft/checkpoints/step-1000/model.safetensors \\
          --only-valid runs/dbert-onlyvalid-ft/model [--n 5000]
Writes benchmarks/diffusion_bert_validity_levers.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json, write_text  # noqa: E402


def _load(spec: str, base: str):
    from composition_lm.models import load_model

    if spec.endswith(".safetensors"):
        from safetensors.torch import load_file

        loaded = load_model(base)
        loaded.model.add_validity_conditioning()
        missing, unexpected = loaded.model.load_state_dict(load_file(spec), strict=False)
        if missing or unexpected:
            raise SystemExit(f"{spec} does not match the extended base model: {missing[:3]} {unexpected[:3]}")
        return loaded
    return load_model(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--conditioned")
    ap.add_argument("--only-valid")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = ap.parse_args()
    from composition_lm.data import load_corpus
    from composition_lm.sampling import generate
    from evaluation.metrics import formula_set_metrics

    corpus = args.shared / "data/formulas/mp_formulas.csv"
    train = set(load_corpus(corpus, split="train")[0]["formula"])
    val = load_corpus(corpus, split="val")[0]["formula"]
    runs = [("unconditional", args.base, {"temperature": t}) for t in (1.0, 0.9, 0.8)]
    if args.conditioned:
        runs += [("validity-conditioned", args.conditioned, {"condition": c}) for c in ("valid", "invalid", None)]
    if args.only_valid:
        runs += [("fine-tuned on valid formulas only", args.only_valid, {})]
    rows = []
    for label, spec, kw in runs:
        samples = generate(_load(spec, args.base), args.n, seed=0, progress=False, validity="none", **kw)
        m = formula_set_metrics([str(f) if f else "" for _, f, _ in samples], train, reference=val,
                                protocols=("cdvae",))
        rows.append({"model": label, "path": spec, "settings": kw, "validity_cdvae_raw": m["validity"]["cdvae"]["raw"],
                     "uniqueness": m["uniqueness"], "novelty": m["novelty"],
                     "element_js": m["distribution"]["element_js"]})
        print(rows[-1], flush=True)
    command = "python scripts/" + Path(__file__).name + " " + shlex.join(sys.argv[1:])
    write_json(ROOT / "benchmarks/diffusion_bert_validity_levers.json", {"command": command, "n": args.n, "rows": rows})
    lines = ["# Raising the validity of Diffusion-BERT samples", "", f"`{command}`; {args.n} samples each, seed 0, "
             "32 steps.", "", "| model | settings | validity (cdvae, raw) | uniqueness | novelty | element JS |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "defaults"
        lines.append(f"| {r['model']} | {settings} | {r['validity_cdvae_raw']:.4f} | {r['uniqueness']:.4f} | "
                     f"{r['novelty']:.4f} | {r['element_js']:.4f} |")
    write_text(ROOT / "benchmarks/diffusion_bert_validity_levers.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
