"""Add each property bin's training share to a property-conditioned model saved before shares were kept.

`composition_lm.conditions.condition_ids` draws the bins of a requested window with the weight of their
training shares; a config without them falls back to equal weights, which under-asks a point-mass bin such
as E_hull = 0. This recomputes the shares from the training corpus with the model's own edges (checking
that the corpus gives back exactly those edges) and rewrites config.json in place (temporary file +
rename); the weights are untouched.

Run: python scripts/add_bin_shares.py MODEL_DIR --corpus ../shared/data/formulas/mp_formulas.csv [--split train]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from composition_lm.conditions import PropertyBins, corpus_properties
from evaluation.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--column")
    args = ap.parse_args()
    path = args.model / "config.json"
    cfg = json.loads(path.read_text())
    conditions = cfg.get("property_conditions") or []
    if not conditions:
        raise SystemExit(f"{path} has no property conditions")
    names = [c["name"] for c in conditions]
    values = corpus_properties(args.corpus, names, column=args.column, split=args.split)
    for c in conditions:
        v = np.array([row[c["name"]] for row in values.values() if c["name"] in row], dtype=np.float64)
        rebuilt = PropertyBins.from_values(c["name"], v, len(c["edges"]) + 1)
        if not np.allclose(rebuilt.edges, c["edges"]):
            raise SystemExit(f"{c['name']}: the corpus gives edges {rebuilt.edges}, the model has {c['edges']}; "
                             "not the corpus it was trained on")
        c["shares"] = list(rebuilt.shares)
        print(c["name"], " ".join(f"{s:.3f}" for s in rebuilt.shares))
    write_json(path, cfg)


if __name__ == "__main__":
    main()
