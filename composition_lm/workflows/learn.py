"""Closed-loop discovery: a formula model learns from its own verified candidates (``composition-gen learn``).

Each round (``RUN/round-K/``):

1. sample ``per_round`` formulas with the current model (validity and constraints enforced in the sampler), seed
   ``seed + K``;
2. the **oracle** judges them: by default the discovery funnel (:func:`composition_lm.workflows.discover`: template
   structure, relaxation, the calibrated stability verdict), in tests a known function of composition;
3. the verdicts become **labels** (``labels.csv``: E_hull, its bin ``stable`` <= 0 < ``metastable`` <= ``e_hull_max``
   < ``unstable``, or ``failed``; novel against the reference formulas *and* every earlier round; unique within the
   round) and one line of ``rounds.csv`` (SUN rates at 0 and ``e_hull_max``, validity, uniqueness, novelty, element
   JS against the reference, the share of the five commonest chemical systems, CPU seconds);
4. the **guards** run: element-distribution drift (JS against ``reference``) and the five commonest chemical systems'
   share are capped; a guard that trips stops the loop, and ``rounds.csv`` says which;
5. the **surrogate** (the shipped composition property predictor, :mod:`evaluation.properties`) predicted each
   formula's E_hull before the oracle judged it; its agreement with the oracle is reported (``rounds.csv``), and it is
   then fine-tuned on every label so far (``round-K/surrogate``). From round 1 it may keep the formulas it puts above
   ``surrogate_skip_above`` away from the oracle (labelled ``skipped``, never SUN): the oracle's cost is the loop's;
6. the model is **fine-tuned** on what it found: ``method="reward"`` is reward-weighted likelihood (each SUN formula
   ``reward_copies`` times in the corpus, with ``replay`` reference formulas per SUN formula against forgetting the
   starting model; Peters & Schaal 2007's RWR with a replay anchor), continued from the current model
   (``init_from``) for ``finetune_steps`` steps; with ``unlikelihood > 0`` the round's known samples (valid, not
   novel) are negatives, an unlikelihood term (Welleck et al. 2019) pushing the model away from formulas that
   cannot count as discoveries. ``method="conditional"`` fine-tunes a model conditioned on
   ``e_above_hull`` on the loop's E_hull labels joined to known ones and samples with the target ``<= e_hull_max``.
   The model is saved in ``round-K/model`` and samples round K + 1; the last round's is the loop's result.

The oracle sees a round's samples in the order they were drawn (a ``FunnelOracle`` round is an ordinary
``discover`` run in ``round-K/discover``), so a ``discover`` run of the same model, count and seed can stand in for
round 0 (``scripts/bench_learn.py run --round0-from``).

A round that finished has ``round-K/done.json``; ``resume=True`` continues after the last one, so a killed loop loses
at most the round it was in and repeats nothing (the same seeds give the same labels).
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.settings import Settings, setting

__all__ = ["FunctionOracle", "FunnelOracle", "LearnConfig", "Verdict", "finetune_round", "learn", "oracle_scorer"]

ROUND_COLUMNS = ["round", "samples", "valid", "unique", "novel", "stable_0", "stable", "sun_0", "sun", "sun_rate_0",
                 "sun_rate", "validity", "uniqueness", "novelty", "element_js", "top5_system_share", "skipped",
                 "surrogate_accuracy", "surrogate_precision", "surrogate_recall", "surrogate_spearman", "cpu_s",
                 "oracle_cpu_s", "guard", "model"]
LABEL_COLUMNS = ["round", "index", "formula", "e_hull", "label", "unique", "novel", "sun", "surrogate_e_hull"]


@dataclass
class LearnConfig(Settings):
    """How the loop runs (:func:`learn`); the command line takes one option per field."""

    kind = "learn setting"

    rounds: int = setting(3, "rounds of sample -> judge -> fine-tune", range="positive_int")
    per_round: int = setting(1000, "formulas sampled per round", range="positive_int")
    e_hull_max: float = setting(0.1, "stable enough to count: E_hull at most this, eV/atom (SUN at 0 is reported too)",
                                range="non_negative_float")
    method: str = setting("reward", "how the model learns from its labels: reward (reward-weighted likelihood with "
                          "replay of reference formulas) or conditional (a model conditioned on e_above_hull is "
                          "fine-tuned on the loop's E_hull labels joined to --labels, and samples with a target "
                          "e_above_hull <= --e-hull-max and --target-guidance)", choices=("reward", "conditional"))
    target_guidance: float = setting(2.0, "conditional: classifier-free guidance towards the stable target",
                                     range="non_negative_float")
    finetune_steps: int = setting(300, "fine-tuning steps per round", range="positive_int")
    lr: float = setting(2e-4, "fine-tuning learning rate", range="positive_float")
    batch_size: int = setting(64, "fine-tuning batch size", range="positive_int")
    reward_copies: int = setting(4, "copies of each SUN formula in a round's fine-tuning corpus", range="positive_int")
    replay: float = setting(4.0, "formulas replayed per SUN formula (keeps the model near where it was)",
                            range="non_negative_float")
    replay_from: str = setting("reference", "what is replayed: reference (the known formulas; pulls towards them), "
                               "samples (the round's own valid samples, so the corpus is the round re-weighted by "
                               "its rewards) or novel (only those of the round's samples that are novel, so known "
                               "formulas get no weight at all)", choices=("reference", "samples", "novel"))
    unlikelihood: float = setting(0.0, "weight of an unlikelihood term on the round's known samples (valid, not "
                                  "novel: MP or an earlier round has them): the model is pushed away from "
                                  "reproducing known formulas, not only towards its SUN ones (0: off; "
                                  "token-level, so it also lowers similar formulas: on the benchmark's last round "
                                  "it bought novelty at the price in stability a higher sampling temperature "
                                  "does, benchmarks/learn.md)",
                                  range="non_negative_float")
    unlikelihood_max_t: float = setting(1.0, "the unlikelihood term's noise levels are drawn from (0, this]: low "
                                        "values penalise only the completions of nearly whole known formulas, "
                                        "not the model's general choices", range="probability")
    dpo: float = setting(0.0, "weight of a preference term (DPO on the ELBO, the round's starting model as "
                         "reference): the round's fine-tuning formulas preferred to its negatives (0: off)",
                         range="non_negative_float")
    dpo_beta: float = setting(0.1, "DPO's beta: how far from the reference the preference may pull",
                              range="positive_float")
    negatives: str = setting("known", "the round's negatives (for unlikelihood and DPO): known (valid samples that "
                             "are not novel) or not-sun (also those the oracle placed above e_hull_max)",
                             choices=("known", "not-sun"))
    max_js: float = setting(0.05, "guard: stop when the element-distribution JS divergence of a round's samples "
                            "against the reference exceeds this", range="unit_interval")
    max_top5_share: float = setting(0.5, "guard: stop when the five commonest chemical systems hold more than this "
                                    "share of a round's samples", range="unit_interval")
    surrogate: bool = setting(True, "fine-tune the shipped composition property predictor on the loop's labels after "
                              "each round and report how often it agrees with the oracle", action="optional")
    surrogate_skip_above: float | None = setting(None, "from round 1, formulas the surrogate puts above this E_hull "
                                                 "(eV/atom) are not sent to the oracle (labelled skipped, never SUN); "
                                                 "default: every formula is judged", range="any_float")
    seed: int = setting(0, "seed of round 0's sampling (round K samples with seed + K) and of the fine-tuning",
                        range="non_negative_int")


@dataclass
class Verdict:
    """The oracle's answer for one formula: ``e_hull`` (eV/atom; NaN: it could not be placed) and whether its
    structure was unique and novel by the oracle's own reference (True where the oracle has none)."""

    formula: str
    e_hull: float
    unique: bool = True
    novel: bool = True


class FunctionOracle:
    """An oracle that is a known function of composition (``e_hull(formula) -> float``): tests and dry runs. An
    empty or unreadable formula gets NaN."""

    def __init__(self, e_hull: Callable[[str], float]):
        self.e_hull = e_hull

    def judge(self, formulas: Sequence[str], out_dir: Path) -> list[Verdict]:
        from evaluation.composition import try_parse_formula

        return [Verdict(f, float(self.e_hull(f)) if f and try_parse_formula(f)[0] is not None else math.nan)
                for f in formulas]


def oracle_scorer(predictor):
    """The loop's stability verdict: the calibrated default with its screening at 0.1 eV/atom and relaxations of up
    to 500 steps (``RelaxSettings()``), not ``discover``'s 200; elemental references from ``predictor``'s store.
    The loop's benchmark judges its start and final models with it too."""
    from structure.stability import Screening, StabilityScorer

    return StabilityScorer(references=predictor.store, screening=Screening.for_threshold(0.1))


class FunnelOracle:
    """The discovery funnel as the oracle: each formula's best structure (lowest E_hull among its ``top_k``
    templates) by :func:`composition_lm.workflows.discover`, with the stability ``scorer`` (default: the calibrated
    default verdict, relaxations of up to 500 steps) and the ``predictor``'s store as the novelty reference;
    ``workers`` processes or a Dask ``scheduler``. Unlike ``discover``'s defaults, every valid formula gets a
    structure (no ``skip_above``: the loop's labels would otherwise be censored by the composition model it is meant
    to improve on; its own surrogate filter is ``LearnConfig.surrogate_skip_above``) and relaxations run to 500
    steps, the oracle the loop's benchmark was measured with. Each round's funnel is journalled in
    ``round-K/discover`` and resumes with the loop."""

    def __init__(self, predictor=None, scorer=None, top_k: int = 1, workers: int = 1, scheduler=None):
        self.predictor, self.scorer, self.top_k = predictor, scorer, top_k
        self.workers, self.scheduler = workers, scheduler

    def judge(self, formulas: Sequence[str], out_dir: Path) -> list[Verdict]:
        """One verdict per formula, in order (``formulas``: a round's samples as drawn; empty ones are not judged)."""
        from structure import StructurePredictor

        from composition_lm.workflows.discovery import discover

        if self.predictor is None:
            self.predictor = StructurePredictor()
        if self.scorer is None:
            self.scorer = oracle_scorer(self.predictor)
        folder = out_dir / "discover"
        result = discover(formulas=list(formulas), output=folder, predictor=self.predictor, scorer=self.scorer,
                          top_k=self.top_k, skip_above=None, workers=self.workers, scheduler=self.scheduler,
                          resume=(folder / "journal.jsonl").exists())
        best: dict[int, Verdict] = {}
        for _, row in result.candidates().iterrows():
            e = float(row["e_hull_per_atom"]) if row["e_hull_per_atom"] == row["e_hull_per_atom"] else math.nan
            # the funnel flags uniqueness and novelty on the structures it placed; elsewhere nothing shows a repeat
            verdict = Verdict(formulas[int(row["index"])], e, str(row.get("unique")) != "False",
                              str(row.get("novel")) != "False")
            old = best.get(int(row["index"]))
            if old is None or (math.isfinite(e) and not (math.isfinite(old.e_hull) and old.e_hull <= e)):
                best[int(row["index"])] = verdict
        return [best.get(i, Verdict(f, math.nan)) for i, f in enumerate(formulas)]


def _system(formula) -> str:
    return "-".join(sorted(formula.elements))


def _label(e_hull: float, e_hull_max: float) -> str:
    if not math.isfinite(e_hull):
        return "failed"
    return "stable" if e_hull <= 0 else "metastable" if e_hull <= e_hull_max else "unstable"


def _round_labels(k: int, table, verdicts: list[Verdict], known: set[str], cfg: LearnConfig,
                  predicted: list[float], skipped: set[int]) -> list[dict]:
    """One label row per sample of round ``k`` (``verdicts`` and ``predicted``, the surrogate's E_hull, in sample
    order; ``skipped``: the samples the surrogate kept from the oracle); ``known``: reference formulas and every
    earlier round's."""
    seen: set[str] = set()
    rows = []
    for i, f in enumerate(table["formula"]):
        base = {"round": k, "index": i, "formula": f or "", "surrogate_e_hull": predicted[i]}
        if not f or not table["valid_cdvae"].iloc[i]:
            rows.append({**base, "e_hull": math.nan, "label": "invalid", "unique": False, "novel": False,
                         "sun": False})
            continue
        v = verdicts[i]
        unique, novel = f not in seen and v.unique, f not in known and v.novel
        seen.add(f)
        label = "skipped" if i in skipped else _label(v.e_hull, cfg.e_hull_max)
        rows.append({**base, "e_hull": v.e_hull, "label": label, "unique": unique, "novel": novel,
                     "sun": unique and novel and label in ("stable", "metastable")})
    return rows


def _agreement(rows: list[dict], e_hull_max: float) -> dict:
    """How often the surrogate's E_hull agreed with the oracle's on the formulas the oracle placed: accuracy,
    precision and recall of "E_hull <= e_hull_max", and the rank correlation (Spearman) of the two."""
    from scipy.stats import spearmanr

    pairs = [(r["surrogate_e_hull"], r["e_hull"]) for r in rows if r["label"] in ("stable", "metastable", "unstable")
             and math.isfinite(r["surrogate_e_hull"])]
    if not pairs:
        return {"surrogate_accuracy": math.nan, "surrogate_precision": math.nan, "surrogate_recall": math.nan,
                "surrogate_spearman": math.nan}
    said = [p <= e_hull_max for p, _ in pairs]
    truth = [o <= e_hull_max for _, o in pairs]
    tp = sum(a and b for a, b in zip(said, truth))
    rho = spearmanr([p for p, _ in pairs], [o for _, o in pairs]).statistic if len(pairs) > 2 else math.nan
    return {"surrogate_accuracy": sum(a == b for a, b in zip(said, truth)) / len(pairs),
            "surrogate_precision": tp / sum(said) if sum(said) else math.nan,
            "surrogate_recall": tp / sum(truth) if sum(truth) else math.nan, "surrogate_spearman": float(rho)}


def _fit_surrogate(surrogate, label_files: list[Path], seed: int, out: Path):
    """The surrogate fine-tuned on every label so far (each formula's lowest E_hull the oracle found, clipped at
    0 as MP's e_above_hull), saved in ``out``."""
    import pandas as pd

    from evaluation.properties import fine_tune_property_predictor

    table = pd.concat([pd.read_csv(f) for f in label_files], ignore_index=True)
    placed = table[table["label"].isin(["stable", "metastable", "unstable"])]
    best = placed.groupby("formula")["e_hull"].min()
    if best.empty:
        return surrogate
    tuned = fine_tune_property_predictor(surrogate, {f: {"e_above_hull": float(e)} for f, e in best.items()},
                                         seed=seed)
    tuned.save(out)
    return tuned


def _start_from(run: Path, target: Path) -> None:
    """Copy a ``discover`` run's journal into round 0's funnel folder (once: a journal already there is kept). A run
    that skipped formulas (``--skip-above``) is refused: they would come out unlabelled, as failures."""
    import shutil

    from structure.discovery import read_journal

    if not (run / "journal.jsonl").is_file():
        raise FileNotFoundError(f"{run} holds no discover run (journal.jsonl missing)")
    if (target / "journal.jsonl").exists():
        return
    skipped = sum(1 for r in read_journal(run / "journal.jsonl")
                  if r.get("kind") == "formula" and str(r.get("reason", "")).startswith("skipped:"))
    if skipped:
        raise ValueError(f"{run} skipped {skipped} formulas by their predicted E_hull (--skip-above), which the loop "
                         "would label as failures: run discover with --skip-above off to start a loop from it")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "journal.jsonl", target / "journal.jsonl.tmp")
    (target / "journal.jsonl.tmp").rename(target / "journal.jsonl")


#: the loop's settings, beside its rounds (written when a loop starts; a resumed loop must ask for the same)
CONFIG_NAME = "learn_config.json"


def _check_config(path: Path, cfg: LearnConfig) -> None:
    """Record ``cfg`` in a new loop folder; in a resumed one, refuse other settings (``rounds`` may grow: a finished
    loop can be continued), which would mix two loops' rounds in one. A loop folder from before the record takes
    the settings it is resumed with."""
    if path.is_file():
        before = LearnConfig.load(path, strict=False)
        changed = {k: (getattr(before, k), getattr(cfg, k)) for k in LearnConfig.names()
                   if k != "rounds" and getattr(before, k) != getattr(cfg, k)}
        if changed:
            raise ValueError(f"{path.parent} is a loop with other settings: " + ", ".join(
                f"{k} {a!r} (asked: {b!r})" for k, (a, b) in changed.items()) + "; resume it with its own settings "
                "or start a new output folder")
    cfg.save(path)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have finished (the funnel's relaxation workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _round_metrics(k: int, rows: list[dict], reference_freq, cfg: LearnConfig) -> dict:
    from evaluation.composition import try_parse_formula
    from evaluation.metrics import element_frequencies, js_divergence

    n = len(rows)
    valid = [r for r in rows if r["label"] != "invalid"]
    skipped = sum(1 for r in rows if r["label"] == "skipped")
    parsed = [p for p in (try_parse_formula(r["formula"])[0] for r in valid) if p is not None]
    systems = Counter(_system(p) for p in parsed)
    stable_0 = sum(1 for r in valid if r["label"] == "stable")
    stable = sum(1 for r in valid if r["label"] in ("stable", "metastable"))
    sun_0 = sum(1 for r in valid if r["sun"] and r["label"] == "stable")
    sun = sum(1 for r in valid if r["sun"])
    unique = sum(1 for r in valid if r["unique"])
    novel = sum(1 for r in valid if r["novel"] and r["unique"])
    js = js_divergence(element_frequencies(parsed), reference_freq) if parsed else math.nan
    top5 = sum(c for _, c in systems.most_common(5)) / n if n else 0.0
    guard = ""
    if math.isfinite(js) and js > cfg.max_js:
        guard = f"element JS {js:.4f} > {cfg.max_js}"
    elif top5 > cfg.max_top5_share:
        guard = f"the five commonest chemical systems hold {top5:.3f} of the samples > {cfg.max_top5_share}"
    return {"round": k, "samples": n, "valid": len(valid), "unique": unique, "novel": novel, "stable_0": stable_0,
            "stable": stable, "sun_0": sun_0, "sun": sun, "sun_rate_0": sun_0 / n, "sun_rate": sun / n,
            "validity": len(valid) / n, "uniqueness": unique / len(valid) if valid else 0.0,
            "novelty": novel / unique if unique else 0.0, "element_js": js, "top5_system_share": top5,
            "skipped": skipped, **_agreement(rows, cfg.e_hull_max), "cpu_s": 0.0, "oracle_cpu_s": 0.0,
            "guard": guard, "model": ""}


def _conditions(model_path: Path) -> list[str]:
    """The properties a model is conditioned on (``[]`` for an unconditional one)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return [c["name"] for c in config.get("property_conditions") or []]


def _conditional_corpus(rows: list[dict], labels, names: list[str], cfg: LearnConfig, k: int, out: Path) -> Path:
    """The conditional method's corpus: every formula the loop placed on the hull, with ``e_above_hull`` its
    measured E_hull (clipped at 0, MP's convention) and its other properties not given, joined to ``labels`` (a
    table of known formulas and their properties), ``replay`` known rows per loop row."""
    import pandas as pd

    mine = pd.DataFrame([{"formula": r["formula"], "e_above_hull": max(r["e_hull"], 0.0)} for r in rows
                         if r["label"] not in ("invalid", "failed") and math.isfinite(r["e_hull"])])
    known = labels[["formula", *names]].sample(n=min(len(labels), round(cfg.replay * max(len(mine), 1))),
                                               random_state=cfg.seed * 1000 + k)
    table = pd.concat([mine.reindex(columns=["formula", *names]), known], ignore_index=True)
    path = out / "finetune.csv"
    table.to_csv(path, index=False)
    return path


def _negatives(rows: list[dict], which: str) -> set[str]:
    """The round's negatives: its valid samples that are known (``which="known"``), or also those the oracle
    placed and did not find stable (``"not-sun"``: labelled unstable; the surrogate's skipped ones have no verdict)."""
    valid = [r for r in rows if r["label"] not in ("invalid", "failed") and r["formula"]]
    return {r["formula"] for r in valid if not r["novel"] or (which == "not-sun" and r["label"] == "unstable")}


def finetune_round(model_path: Path, rows: list[dict], reference: Sequence[str], cfg: LearnConfig, out: Path,
                   k: int = 0, progress: bool = False, labels=None) -> Path:
    """One round's fine-tuning into ``out/model``, continued from ``model_path`` (``rows``: the round's label rows,
    as in ``labels.csv``; ``k``: the round, which seeds the replay and the training). ``reward``: the round's
    SUN formulas, ``reward_copies`` each, plus ``replay`` formulas per SUN formula (``replay_from``: known ones, the
    round's valid samples, or its novel samples), and with ``unlikelihood > 0`` its known samples as negatives
    (``out/negatives.txt``). ``conditional``: the
    model's own property conditions trained on the loop's E_hull labels joined to ``labels``
    (:func:`_conditional_corpus`)."""
    from composition_lm.training import TrainingArguments, train
    from evaluation.io import write_text

    if cfg.method == "conditional":
        names = _conditions(model_path)
        corpus = _conditional_corpus(rows, labels, names, cfg, k, out)
        extra = {"condition_on": ",".join(names), "dedupe": True}
    else:
        winners = [r["formula"] for r in rows if r["sun"]]
        rng = random.Random(cfg.seed * 1000 + k)
        pool = (list(reference) if cfg.replay_from == "reference" else
                [r["formula"] for r in rows if r["label"] not in ("invalid", "failed") and r["formula"]
                 and (cfg.replay_from == "samples" or r["novel"])])
        replay = rng.sample(pool, min(len(pool), round(cfg.replay * len(winners))))
        corpus = out / "finetune.txt"
        write_text(corpus, "\n".join(winners * cfg.reward_copies + replay) + "\n")
        extra = {"dedupe": False}
        rejected = sorted(_negatives(rows, cfg.negatives)) if cfg.unlikelihood > 0 or cfg.dpo > 0 else []
        if rejected:
            negatives = out / "negatives.txt"
            write_text(negatives, "\n".join(rejected) + "\n")
            extra.update(negatives=str(negatives), unlikelihood=cfg.unlikelihood,
                         unlikelihood_max_t=cfg.unlikelihood_max_t, dpo=cfg.dpo, dpo_beta=cfg.dpo_beta)
    args = TrainingArguments(output_dir=str(out / "train"), corpus=str(corpus), init_from=str(model_path),
                             train_split=None, val_split=None, max_steps=cfg.finetune_steps, lr=cfg.lr,
                             batch_size=cfg.batch_size, warmup_steps=min(50, cfg.finetune_steps // 5),
                             eval_every=0, save_every=0, seed=cfg.seed + k, progress=progress, **extra)
    exported = train(args)
    target = out / "model"
    exported.rename(target)
    return target


def learn(model, output: str | Path, config: LearnConfig | None = None, oracle=None,
          reference: Sequence[str] | None = None, sampling=None, resume: bool = False, progress: bool = False,
          labels=None, start_from: str | Path | None = None, **overrides) -> list[dict]:
    """Run the loop (see the module docstring) from ``model`` (a folder or shipped name) into ``output``; returns
    ``rounds.csv``'s rows. ``config`` (:class:`LearnConfig`) with ``overrides``; ``oracle`` (default
    :class:`FunnelOracle`); ``reference``: the known formulas (novelty, the element-distribution guard and the
    replay; default: the model's training formulas); ``sampling``: a
    :class:`~composition_lm.sampling_config.SamplingConfig` (default: the model's); ``labels``: for the conditional
    method, a table (``pandas.DataFrame``) of known formulas (``formula`` column) and the model's condition
    properties, the labels the loop's own are joined to. ``start_from``: a ``discover`` folder of the same model,
    ``per_round`` and ``seed`` (and the same oracle settings) whose journal stands in for round 0's funnel, so its
    relaxations are not repeated; the funnel refuses it when its formulas are not round 0's samples. Without
    ``resume`` a folder holding a loop is an error."""
    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows.samples import save_samples
    from evaluation.composition import try_parse_formula
    from evaluation.io import write_csv, write_json
    from evaluation.metrics import element_frequencies
    from evaluation.properties import PropertyPredictor

    cfg = (config or LearnConfig()).replace(**overrides)
    out = Path(output)
    done = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("round-*/done.json"))
    if done and not resume:
        raise FileExistsError(f"{out} holds a learning loop: pass resume=True (--resume) to continue it")
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out / CONFIG_NAME, cfg)
    oracle = oracle if oracle is not None else FunnelOracle()
    if start_from is not None:
        _start_from(Path(start_from), out / "round-0" / "discover")
    gen = FormulaGenerator.from_pretrained(model)
    if cfg.method == "conditional":
        names = _conditions(gen.path)
        if "e_above_hull" not in names:
            raise ValueError("the conditional method needs a model conditioned on e_above_hull (e.g. "
                             f"diffusion-bert-props); {gen.path.name} is conditioned on {names or 'nothing'}")
        if labels is None or not set(["formula", *names]) <= set(labels.columns):
            raise ValueError(f"the conditional method needs labels: a table with formula and {', '.join(names)}")
        sampling = (sampling or gen.sampling_config).replace(targets=[f"e_above_hull=:{cfg.e_hull_max:g}"],
                                                             guidance=cfg.target_guidance)
    reference = list(reference) if reference is not None else sorted(gen.training_formulas() or [])
    if not reference:
        raise ValueError("learn needs reference formulas (novelty, the drift guard, replay): the model stores no "
                         "training formulas, so pass reference=")
    reference_freq = element_frequencies(p for p in (try_parse_formula(f)[0] for f in reference) if p is not None)
    known = set(reference)
    rows_out: list[dict] = []
    model_path = Path(gen.path)
    surrogate = PropertyPredictor.load() if cfg.surrogate else None
    for k in range(cfg.rounds):
        rdir = out / f"round-{k}"
        if (rdir / "done.json").exists():  # finished before a stop: its labels join what is known
            state = json.loads((rdir / "done.json").read_text())
            rows_out.append(state["metrics"])
            known |= set(state["formulas"])
            model_path = out / state["model"] if state["model"] else model_path  # (relative to the run)
            if surrogate is not None and (rdir / "surrogate" / "config.json").is_file():
                surrogate = PropertyPredictor.load(rdir / "surrogate")
            if state["metrics"]["guard"]:
                break
            continue
        t0, wall = _cpu_seconds(), time.perf_counter()
        gen = FormulaGenerator.from_pretrained(model_path)
        table = gen.generate(cfg.per_round, seed=cfg.seed + k, config=sampling, progress=progress)
        save_samples(gen, table, rdir, {"round": k}, wall, time.perf_counter())
        formulas = [f if isinstance(f, str) else "" for f in table["formula"]]
        predicted = (surrogate.predict([f or "?" for f in formulas])["e_above_hull"].tolist() if surrogate
                     else [math.nan] * len(formulas))
        skipped = set()
        if k and surrogate is not None and cfg.surrogate_skip_above is not None:
            skipped = {i for i, e in enumerate(predicted) if formulas[i] and e > cfg.surrogate_skip_above}
        t_oracle = _cpu_seconds()
        verdicts = oracle.judge([("" if i in skipped else f) for i, f in enumerate(formulas)], rdir)
        oracle_cpu = _cpu_seconds() - t_oracle
        rows = _round_labels(k, table, verdicts, known, cfg, predicted, skipped)
        write_csv(rdir / "labels.csv", LABEL_COLUMNS, ([r[c] for c in LABEL_COLUMNS] for r in rows))
        metrics = _round_metrics(k, rows, reference_freq, cfg)
        if surrogate is not None:
            surrogate = _fit_surrogate(surrogate, [out / f"round-{j}" / "labels.csv" for j in range(k + 1)],
                                       cfg.seed + k, rdir / "surrogate")
        next_model = None
        if not metrics["guard"] and metrics["sun"]:
            next_model = finetune_round(model_path, rows, reference, cfg, rdir, k, progress, labels)
        metrics.update(cpu_s=round(_cpu_seconds() - t0, 1), oracle_cpu_s=round(oracle_cpu, 1),
                       model=str(next_model.relative_to(out)) if next_model else str(model_path))
        proposed = sorted({r["formula"] for r in rows if r["formula"] and r["label"] != "invalid"})
        write_json(rdir / "done.json", {"metrics": metrics, "formulas": proposed,
                                        "model": str(next_model.relative_to(out)) if next_model else ""})
        rows_out.append(metrics)
        write_csv(out / "rounds.csv", ROUND_COLUMNS, ([m.get(c, "") for c in ROUND_COLUMNS] for m in rows_out))
        known |= set(proposed)
        model_path = next_model or model_path
        if metrics["guard"]:
            break
    return rows_out
