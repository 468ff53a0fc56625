"""Score Dong et al. (2023)'s generated formulas with the project's own `evaluate`.

These are the numbers later models must beat. Run: python scripts/bench_baselines.py [--shared ../shared]
Writes benchmarks/baselines/<model>/ (metrics.json, summary.md, plots) and benchmarks/baselines.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from composition_lm.cli import main as cli  # noqa: E402
from evaluation.io import write_text  # noqa: E402
from evaluation.report import metrics_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = ap.parse_args()
    corpus = args.shared / "data/formulas/mp_formulas.csv"
    out = ROOT / "benchmarks/baselines"
    named = {}
    commands = []
    for model in ("DiffusionBERT", "DiffusionLM"):
        gen = args.shared / f"data/formulas/dong2023/generated_formulas_{model}.csv"
        argv = ["evaluate", str(gen), "--train", f"{corpus}@train", "--heldout", f"{corpus}@val",
                "--heldout", f"{corpus}@test", "-o", str(out / model), "--title", f"Dong et al. {model}"]
        assert cli(argv) == 0
        commands.append("composition-gen " + shlex.join(a.replace(str(args.shared), "../shared").replace(str(ROOT) + "/", "") for a in argv))
        named[f"Dong et al. {model}"] = json.loads((out / model / "metrics.json").read_text())
    text = ["# Baselines: Dong et al. (2023) generated formulas", "",
            "Scored against the `train` split of `mp_formulas.csv` (novelty, recovery) with the `val` split as the "
            "distribution reference. Dong et al. trained on their own MP split, so novelty here is relative to ours.",
            "", metrics_table(named), "", "Commands:", "", "```", *commands, "```", ""]
    write_text(ROOT / "benchmarks/baselines.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
