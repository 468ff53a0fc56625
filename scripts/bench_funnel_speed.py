"""SUN candidates per CPU-hour of the discovery funnel: M3GNet (the seed's potential) against the default scheme
(CHGNet relaxes, SevenNet-l3i5 judges), with and without the screening shortcuts, on the same formulas.

    python scripts/bench_funnel_speed.py run [--n 200] [--config NAME ...]   # each config resumes where it stopped
    python scripts/bench_funnel_speed.py report                              # -> benchmarks/funnel_speed.{md,json}
    python scripts/bench_funnel_speed.py traces [--potential P] [--n 20]  # early-stop rules from energy traces
    python scripts/bench_funnel_speed.py snapshot    # journals so far -> benchmarks/funnel_speed_runs/

``run`` samples N formulas once (Diffusion-BERT, seed 0; ``runs/funnel_speed/sample/formulas.csv``), relaxes the
elemental references of every potential once (the per-machine cache, a one-off timed apart), then runs
``composition-gen discover --from`` those formulas for each configuration in a child process on one thread
(``runs/funnel_speed/<config>``), recording the child's CPU seconds in ``benchmarks/funnel_speed.jsonl`` as each
finishes. A configuration stopped part-way resumes from its journal (its CPU then sums the parts).

``report`` adds the cross-check that keeps the comparison honest: every configuration's SUN candidates judged
again by the default's judge (a SevenNet-l3i5 single point on the structure the run relaxed), since a potential
that places too much below the hull also reports more SUN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import EXE, command_line, cpu, restore_file, snapshot_files  # noqa: E402

from evaluation.io import append_jsonl, write_json, write_text  # noqa: E402

RUNS = ROOT / "runs" / "funnel_speed"
LOG = ROOT / "benchmarks" / "funnel_speed.jsonl"
SNAPSHOTS = ROOT / "benchmarks" / "funnel_speed_runs"
M3GNET = ROOT.parent / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
OFF = ["--stop-margin", "off", "--judge-margin", "off"]
#: every configuration starts from these (discover's defaults before this benchmark made the last row its default);
#: a later option overrides an earlier one
BASE = ["--max-steps", "500", "--skip-above", "off"]
#: name -> (discover arguments, what it is)
CONFIGS = {
    "m3gnet": ([*BASE, "--potential", os.path.relpath(M3GNET, ROOT), *OFF],
               "M3GNet relaxes and judges (the seed's funnel)"),
    "default": ([*BASE, *OFF], "CHGNet relaxes, SevenNet-l3i5 judges; no screening"),
    "default+screening": (BASE, "the same with discover's default screening (early stop, judge only plausible)"),
    "default+screening+skip": ([*BASE, "--skip-above", "0.15"], "and no structure for formulas the composition "
                               "model puts above 0.15 eV/atom"),
    "default+screening+skip+steps200": ([*BASE, "--skip-above", "0.15", "--max-steps", "200"],
                                        "and at most 200 relaxation steps (traces: 26 % of M3GNet's steps come after "
                                        "step 200, which move the energy by at most 0.019 eV/atom)"),
    "m3gnet-relax+l3i5+screening": ([*BASE, "--potential", os.path.relpath(M3GNET, ROOT), "--judge", "sevennet-l3i5"],
                              "M3GNet relaxes, SevenNet-l3i5 judges, default screening (WBM: MAE 0.049, F1 0.810; "
                              "M3GNet's weights do not come with the install, so not the default)"),
}


def sample(n: int) -> Path:
    out = RUNS / "sample"
    restore("sample", "formulas.csv")
    if not (out / "formulas.csv").is_file():
        subprocess.run([*EXE, "sample", "-n", str(n), "--seed", "0", "--threads", "1", "--no-progress", "-o", str(out)],
                       check=True, cwd=ROOT)
    return out / "formulas.csv"


def warm_references(formulas: Path) -> dict:
    """Relax each potential's elemental references for the formulas' elements (cached per machine): CPU s each."""
    import pandas as pd
    from pymatgen.core import Composition

    from structure.pipeline import Relaxer
    from structure.potentials import DEFAULT_JUDGES, DEFAULT_POTENTIAL

    warnings.simplefilter("ignore")
    elements = sorted({e.symbol for f in pd.read_csv(formulas)["formula"].dropna() for e in Composition(f)})
    spent = {}
    for pot in (str(M3GNET), DEFAULT_POTENTIAL, *DEFAULT_JUDGES):
        t0 = time.process_time()
        refs = Relaxer(pot).references
        for el in elements:
            try:
                refs.entry(el)
            except ValueError as err:
                print(f"{pot}: {el}: {err}", flush=True)
        spent[Path(pot).name] = time.process_time() - t0
        print(f"references {Path(pot).name}: {spent[Path(pot).name]:.0f} CPU-s ({len(elements)} elements)", flush=True)
    return spent


def snapshot() -> None:
    """Each configuration's journal (and the sampled formulas) gzipped into ``benchmarks/funnel_speed_runs/``, so
    that a run stopped on one machine resumes on another (``run`` restores them where ``runs/`` lacks them)."""
    snapshot_files([RUNS / "sample" / "formulas.csv", *sorted(RUNS.glob("*/journal.jsonl"))], SNAPSHOTS)


def restore(folder: str, name: str) -> None:
    restore_file(RUNS / folder / name, SNAPSHOTS)


def run_config(name: str, formulas: Path) -> dict:
    extra, _ = CONFIGS[name]
    out = RUNS / name
    restore(name, "journal.jsonl")
    if (out / "funnel.json").is_file():
        print(f"{name}: done", flush=True)
        return json.loads((out / "funnel.json").read_text())
    cmd = [*EXE, "discover", "--from", os.path.relpath(formulas, ROOT), "--column", "formula", *extra,
           "--no-progress", "-o", os.path.relpath(out, ROOT)]
    if (out / "journal.jsonl").is_file():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    part = {"config": name, "pid": proc.pid, "command": "composition-gen " + " ".join(cmd[3:]), "cpu": cpu(),
            "when": time.time()}
    cpu_s, last = 0.0, 0.0
    while proc.poll() is None:  # the child's CPU seconds so far, logged as it goes: a kill loses at most a minute
        cpu_s = max(cpu_s, _cpu_seconds(proc.pid))
        if time.perf_counter() - last > 60:
            append_jsonl(LOG, {**part, "part_cpu_s": cpu_s, "part_wall_s": time.perf_counter() - t0, "final": False})
            last = time.perf_counter()
        time.sleep(1.0)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"{name} failed: {err[-2000:]}")
    append_jsonl(LOG, {**part, "part_cpu_s": cpu_s, "part_wall_s": time.perf_counter() - t0, "final": True})
    print(f"{name}: {cpu_s:.0f} CPU-s", flush=True)
    return json.loads((out / "funnel.json").read_text())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc); 0 once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_spent(log: list[dict], name: str) -> tuple[float, int]:
    """A configuration's CPU seconds over all its parts (each part's last record) and the number of parts."""
    parts: dict[int, float] = {}
    for r in log:
        if r.get("config") == name:
            parts[r["pid"]] = r["part_cpu_s"]
    return sum(parts.values()), len(parts)


def cmd_run(args) -> int:
    formulas = sample(args.n)
    if not args.no_warm:
        append_jsonl(LOG, {"references_cpu_s": warm_references(formulas), "cpu": cpu(), "when": time.time()})
    for name in args.config or list(CONFIGS):
        run_config(name, formulas)
    return 0


def rejudge(name: str) -> dict:
    """The run's SUN candidates (at 0.1) scored again by the default judge's single point on its structures."""
    import pandas as pd
    from pymatgen.core import Structure

    from structure.discovery import read_journal
    from structure.potentials import DEFAULT_JUDGES
    from structure.stability import StabilityScorer

    out = RUNS / name
    cands = pd.read_csv(out / "candidates.csv", keep_default_na=False)
    sun = cands[cands["sun"].astype(str) == "True"]
    structures = {(r["index"], r["rank"]): r["structure"] for r in read_journal(out / "journal.jsonl")
                  if r.get("kind") == "structure"}
    picked = [Structure.from_dict(structures[(int(r["index"]), int(r["rank"]))]) for _, r in sun.iterrows()]
    scorer = StabilityScorer(DEFAULT_JUDGES[0], relax=False)
    values = [r.e_hull_per_atom for r in scorer.score(picked)] if picked else []
    return {"n_sun": len(picked), "still_stable_0.1": sum(v <= 0.1 + 1e-12 for v in values),
            "still_stable_0": sum(v <= 1e-12 for v in values)}


def cmd_traces(args) -> int:
    """Energy traces of the first N formulas' top-1 template relaxations, and what each early-stop rule (steps K,
    margin m above 0.1 eV/atom) would have stopped, saved and lost: ``benchmarks/funnel_speed_traces.{json,md}``."""
    import numpy as np
    import pandas as pd
    import torch

    from structure import StructurePredictor
    from structure.batched import relax_batched
    from structure.potentials import get_potential
    from structure.stability import StabilityScorer

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    formulas = pd.read_csv(sample(200))["formula"].dropna().tolist()[:args.n]
    rows = [r for r in StructurePredictor().predict(formulas, top_k=1) if r.structure is not None]
    traces: dict[int, list[float]] = {}
    results = relax_batched([r.structure for r in rows], get_potential(args.potential),
                            on_step=lambda i, step, e: traces.setdefault(i, []).append(e))
    finals = [r.structure if r.status != "failed" else None for r in results]
    scored = StabilityScorer(args.potential, relax=False).score(finals)
    records = [{"formula": row.formula, "steps": res.steps, "status": res.status, "energies": traces.get(i, []),
                "e_hull_final": rec.e_hull_per_atom} for i, (row, res, rec) in enumerate(zip(rows, results, scored))]
    total = sum(len(r["energies"]) - 1 for r in records if r["energies"])
    rules = []
    for k in (25, 50, 100):
        for m in (0.2, 0.3, 0.5, 1.0):
            saved, stopped, lost = 0, 0, []
            for r in records:
                e, h = np.array(r["energies"]), r["e_hull_final"]
                if len(e) == 0 or not np.isfinite(h):
                    continue
                over = [j for j in range(k, len(e)) if h + e[j] - e[-1] > 0.1 + m]
                if over:
                    stopped, saved = stopped + 1, saved + len(e) - 1 - over[0]
                    lost += [r["formula"]] if h <= 0.1 else []
            rules.append({"stop_after": k, "margin": m, "stopped": stopped, "steps_saved": saved, "lost": lost})
    pot = Path(args.potential).name
    write_json(ROOT / "benchmarks" / "funnel_speed_traces.json",
               {"command": command_line(__file__), "potential": pot, "records": records, "rules": rules})
    lines = [f"# Early-stop rules on energy traces ({pot}, first {args.n} formulas' top-1 templates)", "",
             f"Command: `{command_line(__file__)}`; CPU: {cpu()}. {len(records)} relaxations, {total} steps. A rule "
             "stops a relaxation at the first step >= K where its E_hull (the final E_hull plus the energy still to "
             "fall) exceeds 0.1 + m eV/atom; lost: stopped although it ended at E_hull <= 0.1.", "",
             "| K (steps) | margin m | stopped | steps saved | stable lost |", "|---:|---:|---:|---:|---|",
             *[f"| {r['stop_after']} | {r['margin']} | {r['stopped']} | "
               f"{r['steps_saved']} ({r['steps_saved'] / total:.0%}) "
               f"| {', '.join(r['lost']) or 'none'} |" for r in rules], "",
             "Energy still to fall after step K (eV/atom), per structure:", "",
             "| formula | steps | final E_hull | after 25 | after 50 | after 100 |", "|---|---:|---:|---:|---:|---:|",
             *[f"| {r['formula']} | {r['steps']} | {r['e_hull_final']:.3f} | " + " | ".join(
                 f"{max(r['energies'][k:]) - r['energies'][-1]:.3f}" if len(r["energies"]) > k else "0"
                 for k in (25, 50, 100)) + " |" for r in records if r["energies"]]]
    write_text(ROOT / "benchmarks" / "funnel_speed_traces.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def cmd_report(args) -> int:
    warnings.simplefilter("ignore")
    log = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.is_file() else []
    refs = next((r["references_cpu_s"] for r in reversed(log) if "references_cpu_s" in r), {})
    rows = {}
    for name, (extra, what) in CONFIGS.items():
        out = RUNS / name
        if not (out / "funnel.json").is_file():
            continue
        funnel = json.loads((out / "funnel.json").read_text())
        parts = [r for r in log if r.get("config") == name]
        cpu_s, n_parts = cpu_spent(log, name)
        n_sun = funnel["counts"]["sun"]
        n_sun0 = round(funnel["sun_rate"]["0"] * funnel["n_formulas"])
        check = rejudge(name)
        rows[name] = {"what": what, "args": extra, "counts": funnel["counts"], "sun_0.1": n_sun, "sun_0": n_sun0,
                      "cpu_s": cpu_s, "cpu_s_parts": n_parts, "funnel_seconds": funnel["seconds"],
                      "sun_per_cpu_hour": n_sun / (cpu_s / 3600) if cpu_s else None,
                      "rejudged": check, "rejudged_per_cpu_hour": check["still_stable_0.1"] / (cpu_s / 3600)
                      if cpu_s else None, "potential": funnel["potential"], "screening": funnel.get("screening"),
                      "command": parts[-1]["command"] if parts else None}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k not in ("counts",)}), flush=True)
    meta = {"command": command_line(__file__), "cpu": cpu(), "references_cpu_s": refs,
            "n_formulas": next(iter(rows.values()))["counts"]["sampled"] if rows else None}
    write_json(ROOT / "benchmarks" / "funnel_speed.json", {"meta": meta, "rows": rows})
    lines = ["# SUN candidates per CPU-hour of the discovery funnel", "",
             f"The same {meta['n_formulas']} formulas (Diffusion-BERT, seed 0: "
             "`composition-gen sample -n 200 --seed 0`) "
             "through `composition-gen discover --from` under each configuration on this machine, each in a child "
             f"process on one thread; CPU: {meta['cpu']}. CPU-s: the child process's user + system seconds (model "
             "loading, templates, relaxation, judging, novelty). Elemental references were relaxed beforehand, once "
             "per potential (the per-machine cache; one-off CPU-s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in refs.items()) + "). Other jobs shared the machine's 2 cores "
             "(two to three processes at a time), which CPU seconds measure less than wall time does. SUN still "
             "stable: each SUN candidate's structure scored again by a SevenNet-l3i5 single point (the default's "
             "judge; its cost is not counted), so that a potential that places too much below the hull does not "
             "count more SUN. x m3gnet: the ratio to the `m3gnet` row, the seed's funnel. Every row states its "
             "settings in full (500 steps and no skip unless it says otherwise), so a rerun measures the same "
             "configurations; `default+screening+skip+steps200` is `discover`'s default since.", "",
             "Command: `python scripts/bench_funnel_speed.py run`, then `python scripts/bench_funnel_speed.py "
             "report`.", "",
             "| configuration | with structure | relaxed | stable (0.1) | SUN at 0.1 | SUN at 0 | CPU-s "
             "| SUN / CPU-hour (x m3gnet) "
             "| SUN still stable by SevenNet-l3i5 (0.1 / 0) | those / CPU-hour (x m3gnet) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = rows.get("m3gnet")
    for name, r in rows.items():
        c = r["counts"]
        ratio = (f" ({r['sun_per_cpu_hour'] / base['sun_per_cpu_hour']:.2f})" if base else "")
        ratio_checked = (f" ({r['rejudged_per_cpu_hour'] / base['rejudged_per_cpu_hour']:.2f})" if base else "")
        lines.append(f"| {name}: {r['what']} | {c['with_structure']} | {c['relaxed']} | {c['stable']} | "
                     f"{r['sun_0.1']} | {r['sun_0']} | {r['cpu_s']:.0f} | {r['sun_per_cpu_hour']:.1f}{ratio} | "
                     f"{r['rejudged']['still_stable_0.1']} / {r['rejudged']['still_stable_0']} | "
                     f"{r['rejudged_per_cpu_hour']:.1f}{ratio_checked} |")
    write_text(ROOT / "benchmarks" / "funnel_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--config", action="append", choices=list(CONFIGS))
    r.add_argument("--no-warm", action="store_true", help="skip relaxing the elemental references first")
    r.set_defaults(func=cmd_run)
    sub.add_parser("report").set_defaults(func=cmd_report)
    t = sub.add_parser("traces", help="energy traces -> early-stop rules (benchmarks/funnel_speed_traces.md)")
    t.add_argument("--potential", default=os.path.relpath(M3GNET, ROOT))
    t.add_argument("--n", type=int, default=20)
    t.set_defaults(func=cmd_traces)
    sub.add_parser("snapshot", help="journals so far -> benchmarks/funnel_speed_runs/").set_defaults(
        func=lambda _: snapshot() or 0)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
