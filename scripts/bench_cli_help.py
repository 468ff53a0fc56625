"""How long `composition-gen --help` takes, and whether building the parser loads torch (issue 36).

    python scripts/bench_cli_help.py [--repeats 5]   # -> benchmarks/cli_help.md

Each command runs as its own process (interpreter start included), `--repeats` times; min / median / max wall seconds.
The ratio is against `python -c pass` measured in the same run (the interpreter alone), as machines differ.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchlib import ROOT, command_line, cpu  # noqa: E402
from evaluation.io import write_text  # noqa: E402

COMMANDS = [["--help"], ["sample", "--help"], ["discover", "--help"], ["cdvae", "sample", "--help"]]


def _time(argv: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, check=True, cwd=ROOT, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--note", default="", help="a sentence on the conditions (e.g. other jobs on the CPU)")
    args = ap.parse_args(argv)
    base = _time([sys.executable, "-c", "pass"], args.repeats)
    probe = ("import sys; from composition_lm.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers', 'pymatgen') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    lines = ["# `composition-gen --help`: time and imports", "",
             f"`{command_line('scripts/bench_cli_help.py')}`; CPU {cpu()}; {args.repeats} runs each, every run its own "
             "process (interpreter start included); wall seconds min / median / max, and the median as a multiple of "
             "`python -c pass` measured in the same run." + (f" {args.note}" if args.note else ""), "",
             f"Heavy packages loaded by building the parser: {loaded} (issue 36 asks for none; before it, building the "
             "parser imported torch and transformers through the validity sampler: `time composition-gen --help` took 2.9 s on "
             "this machine just before the change).", "",
             "| command | min | median | max | x interpreter start |", "|---|---:|---:|---:|---:|",
             f"| `python -c pass` | {min(base):.3f} | {statistics.median(base):.3f} | {max(base):.3f} | 1.00 |"]
    for cmd in COMMANDS:
        t = _time([sys.executable, "-m", "composition_lm.cli", *cmd], args.repeats)
        lines.append(f"| `composition-gen {' '.join(cmd)}` | {min(t):.3f} | {statistics.median(t):.3f} | {max(t):.3f} | "
                     f"{statistics.median(t) / statistics.median(base):.2f} |")
    write_text(ROOT / "benchmarks" / "cli_help.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
