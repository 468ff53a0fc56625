"""How well each potential predicts the energy above the hull of compounds no potential trained on: the WBM
calibration set (``../shared/data/structures/wbm_calibration.csv.gz``; measure and choose, never train).

    python scripts/bench_stability_wbm.py run --potential chgnet --mode static --n 1000
    python scripts/bench_stability_wbm.py run --potential chgnet --mode relaxed --n 5000
    python scripts/bench_stability_wbm.py run --potential sevennet-l3i5 --mode static --on chgnet --n 1000
    python scripts/bench_stability_wbm.py report --committee chgnet+sevennet-0 ...
    python scripts/bench_stability_wbm.py cost --n 40 --repeats 3 --scheme chgnet --scheme chgnet>sevennet-l3i5

``run`` computes the energies of one potential in one mode and appends them to
``runs/stability_wbm/<potential>__<mode>.jsonl`` as they come (a rerun resumes; a kill loses at most one chunk):
``static`` = the WBM structure as given (DFT-relaxed), ``relaxed`` = relaxed with the project's loop (FIRE, cell
and positions, fmax 0.05, at most 500 steps), ``static --on A`` = a single point on the structures potential A
relaxed (the second stage of a two-stage scheme). Structures are taken in one fixed order (a permutation drawn
with ``--seed``, default 0), so a row of 1,000 is the first 1,000 of the row of 5,000.

``report`` scores every journal through the project's own stability code: formation energy against the shipped
elemental ground states relaxed with the same potential (:class:`structure.relax.ElementalReferences`), the
potential's energy-scale correction (:func:`structure.stability.resolve_correction`), E_hull on the hull of
``mp_formulas.csv`` (lowest formation energy per reduced formula, elements at 0: the hull WBM's
``e_above_mp_hull`` is measured against, on MP's legacy correction scheme, so each MP2020-scale prediction is moved
onto it: :func:`truth_hull`; the oracle row checks that the labels come back), and writes
``benchmarks/stability_wbm.{md,json}``: MAE and RMSE of E_hull (not clipped), precision, recall, F1 and DAF at 0
and 0.1 eV/atom, structures left unscored with reasons, CPU-seconds per structure. ``--committee A+B`` adds the
mean of the rows' E_hull (on the structures both scored), with their spread as the uncertainty; a two-stage row
is the ``static --on`` journal.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import command_line, cpu  # noqa: E402

from evaluation.io import append_jsonl, write_json, write_text  # noqa: E402

RUNS = ROOT / "runs" / "stability_wbm"
THRESHOLDS = (0.0, 0.1)


def wbm(shared: Path, seed: int):
    """The calibration table in the benchmark's fixed order."""
    import pandas as pd

    table = pd.read_csv(shared / "data/structures/wbm_calibration.csv.gz")
    order = np.random.default_rng(seed).permutation(len(table))
    return table.iloc[order].reset_index(drop=True)


def journal_path(potential: str, mode: str, on: str | None) -> Path:
    name = Path(potential).name if Path(potential).exists() else potential
    tag = f"{mode}@{Path(on).name if on and Path(on).exists() else on}" if on else mode
    return RUNS / f"{name}__{tag}.jsonl"


def read_journal(path: Path) -> dict[int, dict]:
    from structure.discovery import read_journal as read

    return {r["i"]: r for r in read(path)}


def structures_of(table, idx: list[int], on: str | None):
    """The structures to evaluate: WBM's own, or those potential ``on`` relaxed (``None`` where it failed)."""
    from pymatgen.core import Structure

    from structure.io import structure_from_cif

    if on is None:
        return [structure_from_cif(table["cif"][i]) for i in idx]
    relaxed = read_journal(journal_path(on, "relaxed", None))
    missing = [i for i in idx if i not in relaxed]
    if missing:
        raise SystemExit(f"{len(missing)} of these structures are not relaxed by {on} yet: run `run --potential {on} "
                         f"--mode relaxed --n {max(idx) + 1}` first")
    return [Structure.from_dict(relaxed[i]["structure"]) if relaxed[i].get("structure") else None for i in idx]


def cmd_run(args) -> int:
    import torch

    from structure.relax import relax_many

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    table = wbm(args.shared, args.seed)
    path = journal_path(args.potential, args.mode, args.on)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_journal(path)
    todo = [i for i in range(min(args.n, len(table))) if i not in done]
    print(f"{path.name}: {len(done)} in the journal, {len(todo)} to go", flush=True)
    max_steps = args.max_steps if args.mode == "relaxed" else 0  # 0: a single point, as Relaxer.energies
    t0 = time.perf_counter()
    for start in range(0, len(todo), args.chunk):
        chunk = todo[start:start + args.chunk]
        structures = structures_of(table, chunk, args.on)
        ok = [k for k, s in enumerate(structures) if s is not None]
        c0 = time.process_time()
        results = relax_many([structures[k] for k in ok], args.potential, progress=False, workers=1,
                             max_steps=max_steps, time_limit=args.time_limit)
        cpu_each = (time.process_time() - c0) / max(len(ok), 1)
        by_k = dict(zip(ok, results))
        for k, i in enumerate(chunk):
            r = by_k.get(k)
            if r is None:
                rec = {"i": i, "energy_per_atom": None, "status": "failed", "reason": f"{args.on} relaxation failed",
                       "cpu_s": 0.0}
            else:
                rec = {"i": i, "energy_per_atom": r.energy_per_atom if math.isfinite(r.energy_per_atom) else None,
                       "status": r.status, "reason": r.reason, "steps": r.steps, "cpu_s": cpu_each,
                       "formula": structures[k].composition.reduced_formula}
                if args.mode == "relaxed" and r.structure is not None:
                    rec["structure"] = r.structure.as_dict()
            append_jsonl(path, rec)
        print(f"  {start + len(chunk)}/{len(todo)} in {time.perf_counter() - t0:.0f} s "
              f"({cpu_each:.2f} CPU-s/structure)", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- report


def metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """Regression and classification figures on the scored structures (``pred`` finite)."""
    ok = np.isfinite(pred)
    p, t = pred[ok], true[ok]
    out = {"n": int(len(pred)), "n_scored": int(ok.sum())}
    if not ok.any():
        return out
    err = p - t
    out.update(mae=float(np.abs(err).mean()), rmse=float(np.sqrt((err ** 2).mean())),
               mae_se=float(np.abs(err).std(ddof=1) / math.sqrt(len(err))) if len(err) > 1 else None)
    rng = np.random.default_rng(0)
    boot = [rng.integers(0, len(p), len(p)) for _ in range(200)]  # bootstrap resamples for the F1's standard error
    for thr in THRESHOLDS:
        ps, ts = p <= thr + 1e-9, t <= thr + 1e-9
        prec, rec, f1 = _prf(ps, ts)
        prevalence = ts.mean()
        out[f"stable_{thr:g}"] = {"precision": prec, "recall": rec, "f1": f1,
                                  "f1_se": float(np.std([_prf(ps[b], ts[b])[2] for b in boot], ddof=1)),
                                  "daf": prec / prevalence if prevalence else None,
                                  "n_true": int(ts.sum()), "n_pred": int(ps.sum())}
    return out


def _prf(ps: np.ndarray, ts: np.ndarray) -> tuple[float, float, float]:
    tp = int((ps & ts).sum())
    prec = tp / ps.sum() if ps.sum() else 0.0
    rec = tp / ts.sum() if ts.sum() else 0.0
    return prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def _references(potential: str):
    from structure.relax import ElementalReferences

    return ElementalReferences(potential, cache_path=RUNS / "elemental_references.json")


def e_hull_row(table, journal: dict[int, dict], potential: str, n: int, hull) -> tuple[np.ndarray, list[str], dict]:
    """E_hull of the first ``n`` structures from one journal (NaN with a reason where not placed)."""
    from pymatgen.core import Composition, Structure

    from structure.io import structure_from_cif
    from structure.potentials import get_potential
    from scripts.make_reference_hull import to_mp2020
    from structure.stability import correction_per_atom, resolve_correction

    pot = get_potential(potential)
    correction = resolve_correction(pot, "auto")
    refs = _references(potential)
    pred, reasons, cpu_s = np.full(n, np.nan), [""] * n, []
    for i in range(n):
        rec = journal.get(i)
        if rec is None:
            reasons[i] = "not computed"
            continue
        cpu_s.append(rec.get("cpu_s", 0.0))
        if rec["energy_per_atom"] is None or rec["status"] == "failed":
            reasons[i] = f"failed: {rec['reason'].split(':')[0]}"
            continue
        s = Structure.from_dict(rec["structure"]) if rec.get("structure") else structure_from_cif(table["cif"][i])
        try:
            e_form = refs.formation_energy_per_atom(s.composition, rec["energy_per_atom"])
        except ValueError as err:
            reasons[i] = f"no formation energy: {str(err)[:80]}"
            continue
        e_form += correction_per_atom(s, rec["energy_per_atom"], correction)[0]  # on MP2020's scale
        e_form = to_mp2020([table["formula"][i]], [e_form], hull.offsets, inverse=True)[0]  # on the labels'
        h = hull.e_above_hull(Composition(table["formula"][i]), e_form)
        pred[i] = h.e_hull_per_atom
        if not math.isfinite(pred[i]):
            reasons[i] = h.reason or "not on the hull"
    extra = {"cpu_s_per_structure": float(np.mean(cpu_s)) if cpu_s else None, "correction": correction,
             "energy_scale": pot.energy_scale}
    return pred, reasons, extra


def truth_hull(shared: Path):
    """The hull WBM's ``e_above_mp_hull`` is measured against: ``mp_formulas.csv``'s formation energies with every
    element at 0 (its elemental rows carry no formation energy). That is MP's legacy correction scheme (no Br, I,
    Se, Te or Sb anion correction, another sulfide one: each potential's residual on the MP2020 scale regresses on
    those elements' fractions with MP2020's values), so a prediction is moved onto it with the offsets the shipped
    hull uses the other way (:func:`scripts.make_reference_hull.legacy_offsets`, in ``hull.offsets``)."""
    import pandas as pd
    from pymatgen.core import Composition

    from evaluation.hull import ReferenceHull
    from scripts.make_reference_hull import _union_table, _with_elements, legacy_offsets

    df = pd.read_csv(shared / "data/formulas/mp_formulas.csv")
    cols = ["material_id", "reduced_formula", "formation_energy_per_atom"]
    offsets = legacy_offsets(_with_elements(_union_table(shared / "data/structures/mp_union.csv.gz"))[cols],
                             _with_elements(df.copy())[cols])
    df = df[df["formation_energy_per_atom"].notna()]
    elements = sorted({el.symbol for f in df["reduced_formula"].unique() for el in Composition(f).elements})
    hull = ReferenceHull(df["reduced_formula"].tolist() + elements,
                         df["formation_energy_per_atom"].tolist() + [0.0] * len(elements),
                         df["material_id"].tolist() + [f"element-{e}" for e in elements], source="mp_formulas.csv")
    hull.offsets = offsets
    return hull


def cmd_report(args) -> int:
    warnings.simplefilter("ignore")
    table = wbm(args.shared, args.seed)
    true_all = table["e_above_mp_hull"].to_numpy(float)
    hull = truth_hull(args.shared)
    rows, preds = {}, {}

    def add(name: str, pred: np.ndarray, reasons: list[str], extra: dict) -> None:
        m = metrics(pred, true_all[:len(pred)])
        unscored: dict[str, int] = {}
        for p, why in zip(pred, reasons):
            if not math.isfinite(p):
                unscored[why or "not placed"] = unscored.get(why or "not placed", 0) + 1
        rows[name] = {**m, **extra, "unscored": unscored}
        preds[name] = pred
        print(name, json.dumps({k: v for k, v in rows[name].items() if k not in ("unscored",)}), flush=True)

    oracle = np.array([hull.e_above_hull(f, e).e_hull_per_atom for f, e in
                       zip(table["formula"], table["formation_energy_per_atom"])])
    add("oracle: WBM's DFT formation energy on the same hull", oracle, [""] * len(oracle),
        {"cpu_s_per_structure": None})
    for path in sorted(RUNS.glob("*__*.jsonl")):
        potential, tag = path.stem.split("__")
        journal = read_journal(path)
        n = max([i for i in journal if i < len(table)], default=-1) + 1
        n = (n // 1000) * 1000 if n >= 1000 else n
        if n < args.min_n:
            print(f"skipping {path.name}: {n} structures (< {args.min_n})")
            continue
        pred, reasons, extra = e_hull_row(table, journal, args.potentials.get(potential, potential), n, hull)
        name = f"{potential}, {tag.replace('static@', 'single point on the structures relaxed by ')}"
        if tag.startswith("static@"):  # a two-stage row costs the first stage's relaxation too
            first = read_journal(journal_path(tag.split("@", 1)[1], "relaxed", None))
            extra["cpu_s_per_structure"] += float(np.mean([first[i].get("cpu_s", 0.0) for i in range(n) if i in first]))
        add(name, pred, reasons, {**extra, "potential": potential, "mode": tag})
    modes = sorted({name.split(", ", 1)[1] for name in rows if ", " in name and not name.startswith("oracle")})
    for spec in args.committee:
        for mode in modes:
            names = [f"{p}, {mode}" for p in spec.split("+")]
            if not all(nm in rows for nm in names):
                continue
            n = min(len(preds[nm]) for nm in names)
            stack = np.stack([preds[nm][:n] for nm in names])
            mean = stack.mean(axis=0)
            reasons = ["a member did not score it" if not math.isfinite(x) else "" for x in mean]
            cost = sum(rows[nm]["cpu_s_per_structure"] or 0 for nm in names)
            if mode.startswith("single point on"):  # the members share one relaxation: count it once
                first = rows[f"{mode.rsplit(' ', 1)[1]}, relaxed"]["cpu_s_per_structure"] or 0
                cost -= (len(names) - 1) * first
            add(f"committee {spec}, {mode} (mean; spread = e_hull_std)", mean, reasons,
                {"cpu_s_per_structure": cost, "e_hull_std_median": float(np.nanmedian(stack.std(axis=0))),
                 "members": names})
    meta = {"command": command_line(__file__), "cpu": cpu(), "machine": platform.platform(), "seed": args.seed,
            "hull": "mp_formulas.csv: lowest formation energy per reduced formula, elements at 0 (MP's legacy scale)",
            "legacy_offsets": hull.offsets}
    write_json(ROOT / "benchmarks" / "stability_wbm.json", {"meta": meta, "rows": rows})
    write_text(ROOT / "benchmarks" / "stability_wbm.md", render(rows, meta))
    print("wrote benchmarks/stability_wbm.md")
    return 0


def render(rows: dict, meta: dict) -> str:
    lines = ["# Stability out of distribution: predicted vs DFT energy above the MP hull (WBM)", "",
             "Structures of `../shared/data/structures/wbm_calibration.csv.gz` (WBM, Wang et al. 2021: "
             "substitution-generated, DFT-relaxed, none in MP, so no potential trained on them), in one fixed "
             f"order (seed {meta['seed']}); a row of N is the first N. Truth: `e_above_mp_hull`. Prediction: the "
             "project's own stability stage (formation energy against the shipped MP elemental ground states "
             "relaxed with the same potential, the potential's energy-scale correction), then moved from MP2020's "
             "scale onto that of the labels and placed on their hull (`mp_formulas.csv`): WBM's labels carry MP's "
             "legacy corrections, without the Br, I, Se, Te and Sb anion ones (every potential's MP2020-scale "
             "residual regressed on those elements' fractions with MP2020's values), so the per-element offsets the "
             "shipped hull is built with (`scripts/make_reference_hull.py`) are taken off again; the oracle row "
             "shows the labels come back exactly. "
             "MAE and RMSE are not clipped (WBM compounds can lie below MP's hull). Stable: "
             "E_hull <= threshold; DAF = precision / share truly stable; the F1's standard error is from 200 bootstrap "
             "resamples. CPU-s: process CPU seconds per structure on one thread, a two-stage row including its first "
             "stage and a committee its members (their relaxation once), as the journals recorded them while other "
             "jobs shared the 2 cores: for speed use `benchmarks/stability_wbm_cost.md`, measured in one run against "
             f"M3GNet ({meta['cpu']}).", "",
             f"Command: `{meta['command']}` (energies from `run`, see the script's docstring).", "",
             "| energies | N scored | MAE (eV/atom) ± s.e. | RMSE | P / R / F1 ± s.e. / DAF at ≤ 0 | "
             "P / R / F1 / DAF at ≤ 0.1 | "
             "CPU-s / structure |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "mae" not in r:
            continue
        a, b = r["stable_0"], r["stable_0.1"]
        cpu_s = "" if r.get("cpu_s_per_structure") is None else f"{r['cpu_s_per_structure']:.2f}"
        lines.append(f"| {name} | {r['n_scored']}/{r['n']} | {r['mae']:.4f} ± {r['mae_se']:.4f} | {r['rmse']:.4f} | "
                     f"{a['precision']:.3f} / {a['recall']:.3f} / {a['f1']:.3f} ± {a['f1_se']:.3f} / {a['daf']:.2f} | "
                     f"{b['precision']:.3f} / {b['recall']:.3f} / {b['f1']:.3f} / {b['daf']:.2f} | {cpu_s} |")
    from structure.potentials import DEFAULT_JUDGES, DEFAULT_POTENTIAL

    default = f"{' + '.join(DEFAULT_JUDGES)}, single point on the structures relaxed by {DEFAULT_POTENTIAL}"
    if default in rows and "mae" in rows[default]:
        r = rows[default]
        a = r["stable_0"]
        lines += ["", "**The default** (`stability` and `discover` without `--potential`): "
                  f"{DEFAULT_POTENTIAL} relaxes, "
                  f"{' + '.join(DEFAULT_JUDGES)} judges, row `{default}`, on {r['n_scored']} structures. Targets: "
                  f"F1 at E_hull <= 0 >= 0.75: {a['f1']:.3f} ± {a['f1_se']:.3f} "
                  f"{'met' if a['f1'] >= 0.75 else 'missed'}; precision >= 0.70: {a['precision']:.3f} "
                  f"{'met' if a['precision'] >= 0.70 else 'missed'}; MAE <= 0.05 eV/atom: {r['mae']:.4f} ± "
                  f"{r['mae_se']:.4f} {'met' if r['mae'] <= 0.05 else 'missed'}; cost <= 3x M3GNet's relaxation: "
                  "see `benchmarks/stability_wbm_cost.md`."]
    lines += ["", "Unscored structures and why:", ""]
    for name, r in rows.items():
        for why, k in r.get("unscored", {}).items():
            lines.append(f"- {name}: {k} × {why}")
    return "\n".join(lines) + "\n"


def cmd_cost(args) -> int:
    """CPU-seconds per structure of each scheme on the same WBM structures in one process, against M3GNet's
    relaxation in the same run (the cost budget's baseline): min / median / max over ``--repeats``."""
    import torch

    from structure.io import structure_from_cif
    from structure.potentials import get_potential
    from structure.relax import relax_many

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    table = wbm(args.shared, args.seed)
    structures = [structure_from_cif(table["cif"][i]) for i in range(args.n)]
    schemes = {"m3gnet relaxed (baseline)": (args.m3gnet, None)}
    for spec in args.scheme:
        relaxer, _, judge = spec.partition(">")
        schemes[f"{relaxer} relaxed" + (f" + {judge} single point" if judge else "")] = (relaxer, judge or None)
    for relaxer, judge in schemes.values():  # load every model before any timing
        get_potential(relaxer)
        if judge:
            get_potential(judge)
    seconds: dict[str, list[float]] = {name: [] for name in schemes}
    for r in range(args.repeats):
        for name, (relaxer, judge) in schemes.items():
            c0 = time.process_time()
            results = relax_many(structures, relaxer, progress=False, time_limit=600)
            if judge:
                relax_many([x.structure for x in results if x.structure is not None], judge, max_steps=0,
                           progress=False)
            seconds[name].append((time.process_time() - c0) / len(structures))
            print(f"repeat {r}: {name}: {seconds[name][-1]:.3f} CPU-s/structure", flush=True)
    base = seconds["m3gnet relaxed (baseline)"]
    rows = {name: {"cpu_s": sorted(v), "ratio": sorted(x / b for x, b in zip(v, base))} for name, v in seconds.items()}
    meta = {"command": command_line(__file__), "cpu": cpu(), "n": args.n, "repeats": args.repeats}
    write_json(ROOT / "benchmarks" / "stability_wbm_cost.json", {"meta": meta, "rows": rows})
    lines = ["# CPU cost of the stability schemes (WBM structures)", "",
             f"The first {args.n} structures of the WBM calibration order, each scheme in turn in one process on one "
             f"thread, {args.repeats} repeats; CPU: {meta['cpu']}. Command: `{meta['command']}`. Elemental references "
             "were relaxed and cached before timing (a one-off per potential).", "",
             "| scheme | CPU-s / structure (min / median / max) | × M3GNet relaxation, same repeat "
             "(min / median / max) |",
             "|---|---:|---:|"]
    for name, r in rows.items():
        c, q = r["cpu_s"], r["ratio"]
        lines.append(f"| {name} | {c[0]:.3f} / {c[len(c) // 2]:.3f} / {c[-1]:.3f} | "
                     f"{q[0]:.2f} / {q[len(q) // 2]:.2f} / {q[-1]:.2f} |")
    write_text(ROOT / "benchmarks" / "stability_wbm_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--seed", type=int, default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compute one potential's energies into its journal")
    r.add_argument("--potential", required=True, help="registered name or matgl folder")
    r.add_argument("--mode", choices=("static", "relaxed"), required=True)
    r.add_argument("--on", help="static only: single points on the structures this potential relaxed")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--chunk", type=int, default=50)
    r.add_argument("--max-steps", type=int, default=500)
    r.add_argument("--time-limit", type=float, default=600)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("cost", help="CPU-s per structure of schemes against M3GNet relaxation, same run")
    c.add_argument("--n", type=int, default=40)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--m3gnet", default=str(ROOT.parent / "shared/models/matgl/M3GNet-MP-2021.2.8-PES"))
    c.add_argument("--scheme", action="append", default=[], metavar="RELAXER[>JUDGE]",
                   help="e.g. chgnet>sevennet-l3i5 (repeatable)")
    c.set_defaults(func=cmd_cost)
    p = sub.add_parser("report", help="score every journal and write benchmarks/stability_wbm.{md,json}")
    p.add_argument("--committee", action="append", default=[], metavar="A+B[+C]")
    p.add_argument("--min-n", type=int, default=1000, help="rows with fewer structures are left out")
    p.add_argument("--potential-path", action="append", default=[], metavar="NAME=PATH",
                   help="where a journal's potential loads from (e.g. M3GNet-MP-2021.2.8-PES=../shared/...)")
    p.set_defaults(func=cmd_report)
    args = ap.parse_args()
    if args.cmd == "report":
        args.potentials = dict(x.split("=", 1) for x in args.potential_path)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
