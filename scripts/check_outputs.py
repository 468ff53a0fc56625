"""Fixed-seed outputs of the sampling commands, fingerprinted, to prove that a refactor changes no output.

    python scripts/check_outputs.py record   # before the change -> benchmarks/outputs_fingerprint.json
    python scripts/check_outputs.py check    # after it: every output file compared with the recorded hash

Each case is one `composition-gen` command with a fixed seed, run in-process; every deterministic output file
it writes (formulas.csv, structures.csv / .extxyz, CDVAE's crystals, compare's metrics) is hashed (SHA-256).
Files that carry wall times or paths (run_config.json, report.md) are left out; compare's metrics.json is
hashed with its timing keys removed. `check` exits 1 and names every file that differs. A case whose
behaviour a change alters on purpose is named with `--expect-change CASE` and reported, not failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "outputs_fingerprint.json"
SHARED = ROOT.parent / "shared"

CASES = {
    "sample-bert": ["sample", "--model", "diffusion-bert", "-n", "300", "--seed", "0"],
    "sample-bert-raw": ["sample", "--model", "diffusion-bert", "-n", "200", "--seed", "1", "--validity", "none",
                        "--temperature", "0.9", "--top-p", "0.95", "--steps", "16"],
    "sample-bert-constrained": ["sample", "--model", "diffusion-bert", "-n", "100", "--seed", "2", "--elements",
                                "Li,Mn,Fe,Co,Ni,P,O,F", "--require", "Li", "--max-elements", "4",
                                "--validity", "smact", "--top-k", "20"],
    "sample-lm": ["sample", "--model", "diffusion-lm", "-n", "200", "--seed", "0"],
    "sample-lm-ddim": ["sample", "--model", "diffusion-lm", "-n", "100", "--seed", "3", "--validity", "none",
                       "--method", "ddim", "--steps", "50", "--exclude", "O"],
    "sample-bert-props": ["sample", "--model", "diffusion-bert-props", "-n", "100", "--seed", "4",
                          "--target", "band_gap=1:3", "--guidance", "2"],
    "sample-lm-props": ["sample", "--model", "diffusion-lm-props", "-n", "100", "--seed", "5",
                        "--target", "e_above_hull=:0.05"],
    "structure": ["structure", "{formulas}", "--top-k", "3", "--seed", "0"],
    "cdvae-sample": ["cdvae", "sample", "--model", "cdvae-perov5", "-n", "4", "--seed", "0", "--levels", "10",
                     "--steps", "5"],
    "compare": ["compare", "--dataset", str(SHARED / "data/structures/perov_5"), "--lm", "diffusion-bert",
                "--train-split", "val", "--cdvae", "cdvae-perov5", "-n", "20", "--seed", "0", "--no-coverage", "--no-plots"],
}
HASHED = ("formulas.csv", "structures.csv", "structures.extxyz", "crystals.csv", "crystals.extxyz", "metrics.json",
          "samples.csv", "samples.extxyz")
TIMING_KEYS = ("seconds", "wall", "time", "cpu")


def _timing(key: str) -> bool:
    return key.endswith("_s") or any(t in key.lower() for t in TIMING_KEYS)


def _digest(path: Path, out: Path) -> str:
    if path.name == "metrics.json":  # compare's metrics carry wall times and the output folder: hash the rest
        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if not _timing(k)}
            return [strip(v) for v in x] if isinstance(x, list) else x
        text = path.read_text().replace(str(out), "OUT")
        data = json.dumps(strip(json.loads(text)), sort_keys=True).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def run_cases(names: list[str], work: Path) -> dict[str, dict[str, str]]:
    from composition_lm.cli import main as cli

    formulas = work / "structure-input.csv"
    formulas.write_text("formula\nLiFePO4\nNaCl\nBaTiO3\nMgAl2O4\nCsPbBr3\n")
    result = {}
    for name in names:
        out = work / name
        argv = [a.replace("{formulas}", str(formulas)) for a in CASES[name]] + ["--no-progress", "-o", str(out)]
        print(f"[{name}] composition-gen {' '.join(CASES[name])}", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cli(argv) != 0:
                raise SystemExit(f"case {name} failed")
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.name in HASHED)
        if not files:
            raise SystemExit(f"case {name} wrote none of {', '.join(HASHED)}")
        result[name] = {str(p.relative_to(out)): _digest(p, out) for p in files}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["record", "check"])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (default: all)")
    ap.add_argument("--expect-change", action="append", default=[], choices=sorted(CASES),
                    help="a case this change alters on purpose: reported, not failed")
    args = ap.parse_args(argv)
    names = args.case or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_cases(names, Path(tmp))
    if args.action == "record":
        old = json.loads(OUT.read_text()) if OUT.is_file() else {}
        tmp_path = OUT.with_suffix(".tmp")
        tmp_path.write_text(json.dumps({**old, **got}, indent=1, sort_keys=True) + "\n")
        tmp_path.replace(OUT)
        print(f"recorded {len(got)} cases -> {OUT.relative_to(ROOT)}")
        return 0
    want = json.loads(OUT.read_text())
    failed = 0
    for name, files in got.items():
        diff = sorted(f for f in set(files) | set(want.get(name, {})) if files.get(f) != want.get(name, {}).get(f))
        status = "identical" if not diff else ("changed (expected)" if name in args.expect_change else "CHANGED")
        print(f"{name}: {status}" + (f" ({', '.join(diff)})" if diff else ""))
        failed += bool(diff) and name not in args.expect_change
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
