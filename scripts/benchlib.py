"""Pieces shared by the formula-model benchmarks (`bench_diffusion_bert.py`, `bench_diffusion_lm.py`):
timing the whole `sample` command, scoring with `evaluate`, the target table, the step-curve plot and
the benchmark section of a model card."""

from __future__ import annotations

import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.io import atomic_path, write_text  # noqa: E402
from evaluation.report import save_figure  # noqa: E402

EXE = [sys.executable, "-m", "composition_lm.cli"]


def run(cmd: list[str]) -> float:
    """Run a command quietly; its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _spread(values: list[float]) -> dict:
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


def time_sample_command(model: str, n: int, repeats: int, tmp: Path) -> dict:
    """``composition-gen sample --model MODEL -n N --seed 0``, ``repeats`` times (model load included):
    seconds, formulas/s and valid-novel-unique formulas/s. The first run's output stays in ``tmp/run0``."""
    times, vnu = [], []
    for r in range(repeats):
        out = tmp / f"run{r}"
        cmd = [*EXE, "sample", "--model", model, "-n", str(n), "--seed", "0", "-o", str(out), "--no-progress"]
        times.append(run(cmd))
        vnu.append(json.loads((out / "run_config.json").read_text())["summary"]["valid_novel_unique_cdvae"])
        print(f"sample run {r}: {times[-1]:.1f} s", flush=True)
    return {"seconds": times, "formulas_per_s": _spread([n / t for t in times]),
            "valid_novel_unique_per_s": _spread([v / t for v, t in zip(vnu, times)]),
            "sample_command": "composition-gen " + shlex.join(cmd[3:])}


def snapshot_files(files: list[Path], dest_dir: Path) -> list[Path]:
    """Gzip each run file (journals, sampled formulas) into ``dest_dir`` as ``<its folder>.<its name>.gz``, so a run
    stopped on one machine resumes on another (:func:`restore_file` puts them back)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        dest = dest_dir / f"{src.parent.name}.{src.name}.gz"
        with open(src, "rb") as fh, atomic_path(dest) as tmp:
            tmp.write_bytes(gzip.compress(fh.read(), mtime=0))
        print(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB", flush=True)
        out.append(dest)
    return out


def restore_file(dest: Path, dest_dir: Path) -> bool:
    """Put a file that :func:`snapshot_files` saved back at ``dest`` when ``dest`` is missing; True if it did."""
    src = dest_dir / f"{dest.parent.name}.{dest.name}.gz"
    if not src.is_file() or dest.is_file():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(gzip.decompress(src.read_bytes()))
    print(f"restored {dest} from {src}", flush=True)
    return True


def cpu() -> str:
    """The CPU as ``lscpu`` names it, with the flags that change matrix throughput (AVX2, AVX512-BF16, AMX)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    return f"{model} ({', '.join(f for f in flags if f.startswith(('avx512_bf16', 'amx_bf16', 'avx2')))})"


def command_line(script: str) -> str:
    """How this benchmark was run: ``python scripts/NAME ARGS``."""
    return "python scripts/" + Path(script).name + " " + shlex.join(sys.argv[1:])


def bench_meta(script: str, n: int, model: str, **extra) -> dict:
    """The ``meta`` block of a benchmark's JSON: machine, cores, sample count, model, extras, command."""
    return {"machine": platform.platform(), "cpu_count": os.cpu_count(), "n": n, "model": model, **extra,
            "command": command_line(script)}


def measure_shipped(model: str, n: int, repeats: int, corpus: Path, report: Path, title: str,
                    tmp: Path) -> tuple[dict, dict]:
    """Time the sample command (:func:`time_sample_command`), score its first run with `evaluate` into
    ``report`` and keep those samples there as ``formulas.csv``: ``(speed, metrics)``."""
    speed = time_sample_command(model, n, repeats, tmp)
    metrics = evaluate(tmp / "run0/formulas.csv", corpus, report, title)
    with atomic_path(report / "formulas.csv") as t:
        t.write_bytes((tmp / "run0/formulas.csv").read_bytes())
    return speed, metrics


def evaluate(formulas_csv: Path, corpus: Path, report: Path, title: str) -> dict:
    """`composition-gen evaluate` against mp_formulas.csv train (novelty), val (distributions), test."""
    run([*EXE, "evaluate", str(formulas_csv), "--column", "formula", "--train", f"{corpus}@train",
         "--heldout", f"{corpus}@val", "--heldout", f"{corpus}@test", "-o", str(report), "--title", title])
    return json.loads((report / "metrics.json").read_text())


def targets(metrics: dict, formulas_per_s: float, spec: dict) -> dict:
    """The issue's targets, met or not, from ``evaluate`` metrics and the measured speed."""
    flat = {
        "validity_cdvae_raw": metrics["validity"]["cdvae"]["raw"], "uniqueness": metrics["uniqueness"],
        "novelty": metrics["novelty"], "element_js": metrics["distribution"]["element_js"],
        "n_elements_wasserstein": metrics["distribution"]["n_elements_wasserstein"], "formulas_per_s": formulas_per_s,
    }
    return {k: {"value": v, "target": f"{spec[k][0]} {spec[k][1]}",
                "met": v >= spec[k][1] if spec[k][0] == ">=" else v <= spec[k][1]} for k, v in flat.items()}


def target_lines(results: dict) -> list[str]:
    lines = ["| metric | value | target | met |", "|---|---:|---:|:-:|"]
    for k, v in results["targets"].items():
        lines.append(f"| {k} | {v['value']:.4f} | {v['target']} | {'yes' if v['met'] else 'NO'} |")
    return lines


def speed_lines(sp: dict) -> list[str]:
    f, vnu = sp["formulas_per_s"], sp["valid_novel_unique_per_s"]
    return [
        "## Speed (whole `sample` command, model load included)", "",
        f"`{sp['sample_command']}`: {len(sp['seconds'])} runs, {', '.join(f'{t:.1f}' for t in sp['seconds'])} s"
        + (f" (re-measured on its own with `{sp['remeasured_by']}`)." if "remeasured_by" in sp else "."), "",
        "| | min | median | max |", "|---|---:|---:|---:|",
        f"| formulas/s | {f['min']:.0f} | {f['median']:.0f} | {f['max']:.0f} |",
        f"| valid-novel-unique formulas/s | {vnu['min']:.0f} | {vnu['median']:.0f} | {vnu['max']:.0f} |",
    ]


def plot_steps(curves: dict[str, list[dict]], path: Path, log_base: int = 10) -> None:
    """Validity, novelty and formulas/s against sampling steps, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, rows in curves.items():
        xs = [r["steps"] for r in rows]
        for ax, key, label in zip(axes, ["validity_cdvae_raw", "novelty", "formulas_per_s_sampling"],
                                  ["validity (cdvae, raw)", "novelty", "formulas/s (sampling only)"]):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=name)
            ax.set_xscale("log", base=log_base)
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(label)
    axes[0].legend()
    save_figure(fig, path)


def update_card(model_dir: Path, results: dict, markdown_name: str) -> None:
    """Replace the ``## Benchmark`` section of a model's README.md card with these figures."""
    card = model_dir / "README.md"
    text = card.read_text().split("\n## Benchmark")[0].rstrip() + "\n"
    sp = results["speed"]["formulas_per_s"]
    text += "\n## Benchmark\n\n" + f"`{results['meta']['command']}` ({results['meta']['cpu_count']}-core CPU); " \
        "10,000 samples, seed 0, default settings, scored by `composition-gen evaluate` against mp_formulas.csv " \
        "(train: novelty; val: distributions; test: recovery).\n\n| metric | value | target |\n|---|---:|---:|\n"
    text += "".join(f"| {k} | {v['value']:.4f} | {v['target']} |\n" for k, v in results["targets"].items())
    q = results["quality"]["ours"]
    text += f"| recovery of test formulas | {q['recovery']['mp_formulas@test']['recovery']:.4f} | reported |\n"
    text += f"\nformulas/s (whole command): min {sp['min']:.0f}, median {sp['median']:.0f}, max {sp['max']:.0f}. " \
        f"Full tables: `benchmarks/{markdown_name}` in the repository.\n"
    write_text(card, text)


def ensure_mp_union_store(store: Path, shared: Path) -> Path:
    """The mp_union template store the discovery benchmarks are measured with, built from
    ``shared/data/structures/mp_union.csv.gz`` when ``store`` does not hold one yet (a fresh machine)."""
    if not (store / "store.json").is_file():
        from composition_lm.cli import main as cli

        assert cli(["templates", "build", str(shared / "data/structures/mp_union.csv.gz"), "-o", str(store),
                    "--no-progress"]) == 0
    return store
