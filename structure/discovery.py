"""The discovery funnel after sampling: formulas -> validity -> template structures -> relaxation ->
formation energy and energy above the hull -> uniqueness and structural novelty -> SUN.

:class:`DiscoveryFunnel` takes formulas (from any generator, or a user's list), so ``structure`` never
imports ``composition_lm``; the ``discover`` command composes it with ``FormulaGenerator``.

A sample (one formula) is **SUN** when its best structure (lowest E_hull among its ``top_k`` templates) is
Stable (``E_hull <= e_hull_max``), Unique (matches no earlier sample's structure) and Novel (matches no
reference structure of the same reduced composition in the template store, ``StructureMatcher`` with
pymatgen's defaults; a composition the reference hull knows but whose structures the store lacks is not
counted novel, since nothing shows it is). Rates are per sample: SUN samples / formulas given.

Runs survive a kill: every structure's result is appended to ``journal.jsonl`` in the output folder as it
finishes (formula-level outcomes too), and ``run(..., resume=True)`` reads the journal back (a torn last
line is dropped), does only what is missing, and writes the same outputs as an uninterrupted run.

Outputs (:meth:`DiscoveryFunnel.run`): ``candidates.csv`` (every formula and structure tried, with the stage
where it left the funnel and why), ``sun.csv`` (SUN samples ranked by E_hull, with their decomposition),
``sun_cif.zip``, ``funnel.json`` (counts and seconds per stage, SUN rates at 0 and ``e_hull_max``), and the
report (``report.md``, self-contained ``report.html``) written by :mod:`evaluation.discovery_report`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.composition import try_parse_formula
from evaluation.io import append_jsonl
from evaluation.validity import check_formula

__all__ = ["CANDIDATE_COLUMNS", "DiscoveryFunnel", "read_journal"]

#: ``stage``: the last stage of :data:`STAGES` the candidate reached (``sun``: it passed them all)
CANDIDATE_COLUMNS = ["index", "formula", "novel_formula", "rank", "template_id", "energy_per_atom", "e_form_per_atom",
                     "e_hull_per_atom", "e_hull_std", "decomposition", "relax_status", "best", "unique", "novel", "stable", "sun",
                     "stage", "reason"]
STAGES = ("sampled", "parsed", "valid", "with_structure", "relaxed", "on_hull", "stable", "unique", "novel", "sun")


def read_journal(path: Path) -> list[dict]:
    """The records of a journal; a torn last line (a kill in the middle of a write) is dropped and cut off
    the file, so that appending goes on cleanly."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, good = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            records.pop()
            break
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return records


@dataclass
class _Task:
    index: int
    formula: str
    rank: int
    template_id: str
    structure: object


class DiscoveryFunnel:
    """Formulas to stable, unique, novel candidates.

    ``predictor``: a :class:`structure.StructurePredictor` (its store is also the novelty reference);
    ``scorer``: a :class:`structure.stability.StabilityScorer`; ``known_formulas``: reduced formulas counted
    as known for the formula-novelty column (e.g. the generator's training formulas); ``top_k`` templates per
    formula; ``e_hull_max`` the stability threshold (eV/atom); ``skip_above``: formulas whose E_hull by the
    shipped composition property predictor (:class:`evaluation.properties.PropertyPredictor`) exceeds this
    (eV/atom) get no structure (None: every valid formula goes on).

    Each distinct (formula, template) structure is relaxed once per run: a formula sampled again takes its
    first sample's result (``reason`` says so), which then counts as not unique.
    """

    def __init__(self, predictor, scorer, known_formulas: set[str] | None = None, top_k: int = 1,
                 e_hull_max: float = 0.1, skip_above: float | None = None, hull=None):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.predictor, self.scorer, self.top_k, self.e_hull_max = predictor, scorer, top_k, e_hull_max
        self.skip_above = skip_above
        self._property_predictor = None
        self.hull = hull if hull is not None else scorer.hull  # (a funnel that only rehulls needs no scorer)
        self.known_compositions = self.hull.formulas()
        self.known = set(known_formulas or ()) | self.known_compositions
        self._reference = None

    def reference_structures(self, formula: str) -> list:
        """The template store's structures of a reduced formula (the novelty reference)."""
        if self._reference is None:
            index: dict[str, list[int]] = {}
            for i, f in enumerate(self.predictor.store.formulas):
                index.setdefault(f, []).append(i)
            self._reference = index
        return [self.predictor.store.structure(i) for i in self._reference.get(formula, ())]

    # ------------------------------------------------------------------------------------------ run
    def run(self, formulas: Sequence[str], out_dir: str | Path, resume: bool = False, workers: int = 1,
            progress: bool = True, chunk: int | None = None, seconds: dict | None = None, scheduler=None) -> dict:
        """Run the funnel on ``formulas`` into ``out_dir`` (see the module docstring); returns ``funnel.json``'s
        content. ``resume``: continue from the journal; without it an existing journal is an error.
        ``seconds``: time spent before the funnel (e.g. ``{"sampling_s": ...}``), reported with its stages.
        ``workers`` > 1: a pool of local processes, each holding the scorer (its potentials loaded once) for every
        structure it is handed, each structure journalled as it finishes
        (:func:`structure.distributed.score_chunks_locally`; a potential wrapped from an ASE calculator, which cannot
        travel, uses the relaxer's own pool per ``chunk`` of structures instead).
        ``scheduler``: a Dask scheduler address, ``Client`` or cluster: relaxation and stability then run on
        its workers (:mod:`structure.distributed`), results streaming into the same journal."""
        from tqdm.auto import tqdm

        out = Path(out_dir)
        journal = out / "journal.jsonl"
        if journal.exists() and not resume:
            raise FileExistsError(f"{out} holds a discovery run (journal.jsonl): pass --resume to finish it, or choose "
                                  "a new output folder")
        out.mkdir(parents=True, exist_ok=True)
        records = read_journal(journal)
        timing = _timing(records, seconds)
        formula_done = {r["index"]: r for r in records if r.get("kind") == "formula"}
        self._check_journal(formula_done, formulas, journal)
        structure_done = {(r["index"], r["rank"]) for r in records if r.get("kind") == "structure"}

        # stage 1-3: parse, validity, template structures (cheap; journalled per formula)
        t0 = time.perf_counter()
        tasks: list[_Task] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predicted = self._predicted_e_hull([f for i, f in enumerate(formulas) if i not in formula_done])
            for i, text in enumerate(tqdm(formulas, desc="templates", unit="formula", disable=not progress)):
                rec = formula_done.get(i)
                if rec is None:
                    rec = self._formula_record(i, text)
                    guess = predicted.get(rec["formula"])
                    if rec["stage"] == "with_structure" and guess is not None:
                        rec["predicted_e_hull"] = guess
                        if self.skip_above is not None and guess > self.skip_above:
                            rec.update(stage="valid", reason=f"skipped: predicted E_hull {guess:.3f} > "
                                                             f"{self.skip_above:g} eV/atom (composition model)")
                    if rec["stage"] == "with_structure":
                        rows = self.predictor.predict([rec["formula"]], top_k=self.top_k)
                        rows = [r for r in rows if r.structure is not None]
                        if not rows:
                            rec.update(stage="valid", reason="no template with the same stoichiometric ratios")
                        rec["templates"] = [[r.rank, r.template_id, r.structure.as_dict()] for r in rows]
                    append_jsonl(journal, rec)
                    records.append(rec)
                for rank, template_id, s in rec.get("templates", []):
                    if (i, rank) not in structure_done:
                        tasks.append(_Task(i, rec["formula"], rank, template_id, s))
        timing["templates_s"] += time.perf_counter() - t0
        append_jsonl(journal, {"kind": "timing", "seconds": {"templates_s": time.perf_counter() - t0}})

        # stage 4-5: relaxation, formation energy, hull (the cost; journalled per structure); each distinct
        # (formula, template) structure once, its repeats taking the first one's result
        t0 = time.perf_counter()
        first: dict[tuple[str, str], _Task] = {}
        repeats: dict[tuple[str, str], list[_Task]] = {}
        for t in tasks:
            key = (t.formula, t.template_id)
            if key in first:
                repeats[key].append(t)
            else:
                first[key], repeats[key] = t, []
        unique_tasks = list(first.values())
        pooled = scheduler is None and workers > 1 and self.scorer.potential.spec is not None
        size = chunk or (1 if pooled else max(4, 4 * workers))
        parts = [unique_tasks[start:start + size] for start in range(0, len(unique_tasks), size)]
        if scheduler is not None or pooled:
            from structure.distributed import score_chunks_locally, score_chunks_on_dask

            structures = [[self._structure(t) for t in part] for part in parts]
            scored = ((parts[k], recs) for k, recs in (
                score_chunks_on_dask(self.scorer, structures, scheduler) if scheduler is not None
                else score_chunks_locally(self.scorer, structures, workers)))
        else:
            scored = ((part, self.scorer.score([self._structure(t) for t in part], workers=workers)) for part in parts)
        with tqdm(total=len(tasks), desc="relax + hull", unit="structure", disable=not progress) as bar:
            for part, recs in scored:
                for task, rec in zip(part, self._records(part, recs)):
                    copies = [{**rec, "index": t.index, "rank": t.rank,
                               "reason": "; ".join(x for x in (f"same structure as sample {task.index}",
                                                               rec["reason"]) if x)}
                              for t in repeats[(task.formula, task.template_id)]]
                    for r in (rec, *copies):
                        append_jsonl(journal, r)
                        records.append(r)
                bar.update(sum(1 + len(repeats[(t.formula, t.template_id)]) for t in part))
                append_jsonl(journal, {"kind": "timing", "seconds": {"relaxation_s": time.perf_counter() - t0}})
                timing["relaxation_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()

        # stage 6: uniqueness, novelty, SUN; outputs
        t0 = time.perf_counter()
        result = self._finish(formulas, records, out, timing)
        result["seconds"]["novelty_s"] = time.perf_counter() - t0
        return result

    def rehull(self, out_dir: str | Path) -> dict:
        """Place a finished run's structures on this funnel's reference hull again, from the formation energies its
        journal holds (after the reference table changed): nothing is relaxed. The journal is rewritten with the
        new E_hull, decomposition and notes (to a temporary file, then renamed) plus a ``rehull`` record, and the
        outputs are written again; returns ``funnel.json``'s content."""
        from evaluation.hull import HULL_NOTES
        from evaluation.io import atomic_path

        out = Path(out_dir)
        journal = out / "journal.jsonl"
        records = read_journal(journal)
        by_formula = {r["index"]: r for r in records if r.get("kind") == "formula"}
        if not by_formula:
            raise ValueError(f"{out} holds no discovery run to place on the hull again (journal.jsonl missing)")
        changed = 0
        for r in records:
            if r.get("kind") != "structure" or r.get("e_form_per_atom") is None:
                continue
            result = self.hull.e_above_hull(r["formula"], r["e_form_per_atom"])
            notes = [x for x in (r.get("reason") or "").split("; ") if x and not x.startswith(HULL_NOTES)]
            new = _num(result.e_hull_per_atom)
            changed += new != r["e_hull_per_atom"]
            r.update(e_hull_per_atom=new, decomposition=result.decomposition, hull_lower_bound=result.lower_bound,
                     reason="; ".join(notes + ([result.reason] if result.reason else [])))
        records.append({"kind": "rehull", "hull": self.hull.source or "the shipped MP table", "changed": changed})
        with atomic_path(journal) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        formulas = [by_formula[i]["formula"] for i in range(max(by_formula) + 1)]
        return self._finish(formulas, records, out, _timing(records, None))

    def _predicted_e_hull(self, formulas: Sequence[str]) -> dict[str, float]:
        """Reduced formula -> E_hull by the shipped composition property predictor (for ``skip_above`` and the
        ``predicted_e_hull`` column); {} when nothing is to be skipped."""
        if self.skip_above is None:
            return {}
        from evaluation.properties import PropertyPredictor

        parsed = {str(f) for f, _ in (try_parse_formula(t) if t and t.strip() else (None, "") for t in formulas)
                  if f is not None}
        if not parsed:
            return {}
        if self._property_predictor is None:
            self._property_predictor = PropertyPredictor.load()
        names = sorted(parsed)
        values = self._property_predictor.predict(names)["e_above_hull"]
        return {n: float(v) for n, v in zip(names, values)}

    @staticmethod
    def _check_journal(formula_done: dict[int, dict], formulas: Sequence[str], journal: Path) -> None:
        """A journal resumes only the formulas it was written for: a record whose formula is not the one at its
        index (another run's journal, or other formulas) is an error, not a silently wrong verdict."""
        for i, rec in sorted(formula_done.items()):
            text = formulas[i] if i < len(formulas) else None
            parsed = try_parse_formula(text)[0] if text and text.strip() else None
            if text is None or rec["formula"] != (str(parsed) if parsed is not None else text):
                raise ValueError(f"{journal} does not belong to these formulas: its sample {i} is "
                                 f"{rec['formula']!r}, the input's is {text!r}")

    def _formula_record(self, i: int, text: str) -> dict:
        f, err = try_parse_formula(text) if text and text.strip() else (None, "empty")
        if f is None:
            return {"kind": "formula", "index": i, "formula": text, "stage": "sampled", "reason": f"unparseable: {err}"}
        formula = str(f)
        rec = {"kind": "formula", "index": i, "formula": formula, "novel_formula": formula not in self.known}
        verdict = check_formula(f, "cdvae")
        if not verdict.valid:
            return {**rec, "stage": "parsed", "reason": f"fails the cdvae validity check ({verdict.reason})"}
        return {**rec, "stage": "with_structure", "reason": ""}

    @staticmethod
    def _structure(task: _Task):
        from pymatgen.core import Structure

        return Structure.from_dict(task.structure) if isinstance(task.structure, dict) else task.structure

    @staticmethod
    def _records(tasks: list[_Task], scored: list) -> list[dict]:
        out = []
        for t, r in zip(tasks, scored):
            out.append({"kind": "structure", "index": t.index, "rank": t.rank, "formula": t.formula,
                        "template_id": t.template_id, "energy_per_atom": _num(r.energy_per_atom),
                        "e_form_per_atom": _num(r.e_form_per_atom), "e_hull_per_atom": _num(r.e_hull_per_atom),
                        "e_hull_std": _num(r.e_hull_std),
                        "decomposition": r.decomposition, "relax_status": r.status, "reason": r.reason,
                        "hull_lower_bound": r.hull_lower_bound,
                        "structure": r.structure.as_dict() if r.structure is not None and r.status != "failed" else None})
        return out

    # --------------------------------------------------------------------------------------- finish
    def _finish(self, formulas: Sequence[str], records: list[dict], out: Path, timing: dict) -> dict:
        from pymatgen.core import Structure

        from evaluation.compare import unique_novel_flags
        from evaluation.discovery_report import write_discovery

        by_formula = {r["index"]: r for r in records if r.get("kind") == "formula"}
        by_structure: dict[int, list[dict]] = {}
        for r in records:
            if r.get("kind") == "structure":
                by_structure.setdefault(r["index"], []).append(r)
        rows = []
        best_structs, best_rows = [], []
        for i in range(len(formulas)):
            f = by_formula[i]
            structs = sorted(by_structure.get(i, []), key=lambda r: r["rank"])
            if not structs:
                rows.append(self._row(f, None, stage=f["stage"], reason=f["reason"]))
                continue
            scored = [s for s in structs if s["e_hull_per_atom"] is not None]
            best = min(scored, key=lambda s: s["e_hull_per_atom"]) if scored else None
            for s in structs:
                row = self._row(f, s, stage="relaxed" if s["relax_status"] != "failed" else "with_structure",
                                reason=s["reason"])
                if s["e_hull_per_atom"] is not None:
                    row["stage"] = "on_hull"
                row["best"] = s is best
                rows.append(row)
                if s is best:
                    best_rows.append(row)
                    best_structs.append(Structure.from_dict(s["structure"]))
        flags = unique_novel_flags(best_structs, self.reference_structures)
        for row, (unique, novel) in zip(best_rows, flags):
            # a composition the reference hull knows, but whose structures the template store lacks, cannot be
            # shown novel: count it as known rather than claim a discovery
            unknown_structure = novel and row["formula"] in self.known_compositions and \
                not self.reference_structures(row["formula"])
            novel = novel and not unknown_structure
            # a lower bound (a known composition the reference holds no energy for) never counts as stable
            stable = row["e_hull_per_atom"] <= self.e_hull_max + 1e-12 and not row["hull_lower_bound"]
            row.update(stable=stable, unique=unique, novel=novel, sun=stable and unique and novel)
            # the last check passed, as for the stages before: a stable duplicate stops at "stable", a stable
            # unique structure that matches a known one at "unique"; passing novelty is being SUN
            row["stage"] = ("sun" if row["sun"] else "unique" if stable and unique else "stable" if stable
                            else "on_hull")
            if not row["sun"]:
                why = ("not novel: a known composition whose structures the template store lacks" if stable and unique
                       and unknown_structure else
                       "not novel: matches a known structure" if stable and unique else
                       "not unique: matches an earlier sample" if stable else
                       "" if row["hull_lower_bound"] else f"E_hull {row['e_hull_per_atom']:.3f} > {self.e_hull_max:g} eV/atom")
                row["reason"] = "; ".join(x for x in (row["reason"], why) if x)
        counts = self._counts(formulas, rows)
        sun_rows = sorted((r for r in rows if r.get("sun")), key=lambda r: r["e_hull_per_atom"])
        sun_at_0 = sum(1 for r in rows if r.get("sun") and r["e_hull_per_atom"] <= 1e-12)
        for r in rows:
            r.pop("hull_lower_bound", None)
        n = len(formulas)
        seconds = {**timing}
        cpu_hours = sum(seconds.values()) / 3600
        if self.scorer is not None:
            potential = self.scorer.describe()
            screening = {**self.scorer.screening.as_dict(), "skip_above": self.skip_above}
        else:  # placed on the hull again (rehull): the run's own scheme
            before = json.loads((out / "funnel.json").read_text()) if (out / "funnel.json").is_file() else {}
            potential, screening = before.get("potential", ""), before.get("screening", {})
        result = {
            "n_formulas": n, "e_hull_max": self.e_hull_max, "top_k": self.top_k, "counts": counts,
            "sun_rate": {f"{self.e_hull_max:g}": len(sun_rows) / n if n else 0.0, "0": sun_at_0 / n if n else 0.0},
            "sun_per_cpu_hour": {f"{self.e_hull_max:g}": len(sun_rows) / cpu_hours if cpu_hours else None,
                                 "0": sun_at_0 / cpu_hours if cpu_hours else None},
            "seconds": seconds, "reference_hull": _hull_name(self.hull), "potential": potential,
            "screening": screening,
            "templates": str(self.predictor.store.path or "pymatgen AFLOW prototypes"),
        }
        write_discovery(out, rows, sun_rows, {r["index"]: s for r, s in zip(best_rows, best_structs)}, result,
                        CANDIDATE_COLUMNS, self.hull)
        return result

    @staticmethod
    def _row(f: dict, s: dict | None, stage: str, reason: str) -> dict:
        row = {c: None for c in CANDIDATE_COLUMNS}
        row.update(index=f["index"], formula=f["formula"], novel_formula=f.get("novel_formula"), stage=stage,
                   reason=reason)
        if s is not None:
            row.update({k: s[k] for k in ("rank", "template_id", "energy_per_atom", "e_form_per_atom",
                                          "e_hull_per_atom", "decomposition", "relax_status")})
            row["e_hull_std"] = s.get("e_hull_std")
            row["hull_lower_bound"] = s.get("hull_lower_bound", False)
        return row

    @staticmethod
    def _counts(formulas, rows) -> dict:
        best = {r["index"]: r for r in rows if r.get("best")}
        first = {}
        for r in rows:
            first.setdefault(r["index"], r)
        reached = {i: (best.get(i) or first[i])["stage"] for i in range(len(formulas))}
        order = {s: k for k, s in enumerate(STAGES)}
        return {stage: sum(order[reached[i]] >= order[stage] for i in reached) for stage in STAGES}


def _hull_name(hull) -> str:
    """The reference hull as a reader can find it again: the shipped table by its place in the package."""
    from evaluation.hull import DEFAULT_HULL

    shipped = Path(hull.source).resolve() == DEFAULT_HULL.resolve() if hull.source else False
    return "evaluation/data/mp_hull.csv.gz (shipped)" if shipped else hull.source


def _timing(records: list[dict], seconds: dict | None) -> dict:
    """Seconds per stage: ``seconds`` (before the funnel) plus the journal's timing records."""
    timing = {**(seconds or {}), "templates_s": 0.0, "relaxation_s": 0.0}
    for rec in records:
        if rec.get("kind") == "timing":
            for k, v in rec["seconds"].items():
                timing[k] = timing.get(k, 0.0) + v
    return timing


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None

