"""Add the element-count table (``element_counts``), the stoichiometry-pattern table (``stoichiometry_counts``)
and the per-element volume table (``atomic_volumes``) to a CDVAE model trained before models kept them.

The ``k-first`` composition sampler (`structure.cdvae.sampling.sample_composition`) draws a crystal's
number of distinct elements from the share of training crystals of the same size with that many
elements; ``min_pattern_share`` decodes again a crystal whose stoichiometry pattern is rare among the
training crystals; a volume weight above 0 scales the sampled cell toward the drawn composition's volume, the
sum of ``atomic_volumes`` over its atoms. Models trained now store the three tables; this rebuilds them for
an older model from the training split its own ``training_args.json`` names (the same held-out rows are
left out, so the tables cover exactly the crystals it was trained on) and rewrites config.json in place
(temporary file + rename); the weights are untouched.

Run: python scripts/add_element_counts.py structure/pretrained/cdvae-perov5 [--cache runs/cdvae/cache]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import write_json  # noqa: E402
from structure.cdvae.data import atomic_volume_table, element_count_table, stoichiometry_table  # noqa: E402
from structure.cdvae.train import CDVAETrainingArguments, load_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--cache", default=str(ROOT / "runs/cdvae/cache"), help="parsed-crystal cache")
    args = ap.parse_args()
    path = args.model / "config.json"
    cfg = json.loads(path.read_text())
    targs = json.loads((args.model / "training_args.json").read_text())
    targs.update(cache_dir=args.cache, progress=False)
    train_set, _, note = load_splits(CDVAETrainingArguments(**targs))
    cfg["element_counts"] = element_count_table(train_set, cfg["max_atoms"])
    cfg["stoichiometry_counts"] = stoichiometry_table(train_set)
    cfg["atomic_volumes"] = atomic_volume_table(train_set)
    write_json(path, cfg)
    print(f"{path}: element_counts, stoichiometry_counts and atomic_volumes from {note}")


if __name__ == "__main__":
    main()
