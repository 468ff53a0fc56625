"""Discovery in one call: formulas sampled by a formula model, through the funnel, to SUN candidates.

:func:`discover` samples ``n`` formulas with a :class:`~composition_lm.FormulaGenerator` (validity and constraints
enforced inside the sampler), saves them (``formulas.csv``, ``run_config.json``), and runs
:class:`structure.discovery.DiscoveryFunnel`: a template structure per formula, relaxation and the stability verdict
of a :class:`structure.stability.StabilityScorer`, uniqueness and novelty. Every result is journalled as it
finishes, so ``resume=True`` finishes a stopped run with nothing lost or repeated::

    from composition_lm.workflows import discover

    result = discover("diffusion-bert", n=100, seed=0, output="runs/discover", require=["Li"])
    result.counts, result.sun_rate["0.1"]
    result.sun()            # the SUN candidates (sun.csv) as a DataFrame

``composition-gen discover`` is this call behind its options.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from structure.stability import DEFAULT_SKIP_ABOVE

__all__ = ["DiscoveryResult", "discover", "rehull"]


@dataclass
class DiscoveryResult:
    """What a discovery run wrote to ``output``: ``summary`` is ``funnel.json`` (counts per stage, SUN rates at
    the threshold and at 0, seconds per stage, the stability scheme)."""

    output: Path
    summary: dict

    @property
    def counts(self) -> dict:
        return self.summary["counts"]

    @property
    def sun_rate(self) -> dict:
        """SUN candidates per formula, keyed by the E_hull threshold as text (``"0.1"``, ``"0"``)."""
        return self.summary["sun_rate"]

    def candidates(self):
        """``candidates.csv`` (every structure with its E_hull, uniqueness and novelty) as a DataFrame."""
        import pandas as pd

        return pd.read_csv(self.output / "candidates.csv")

    def sun(self):
        """``sun.csv`` (the stable, unique, novel candidates) as a DataFrame."""
        import pandas as pd

        return pd.read_csv(self.output / "sun.csv")


def _sampled(generator, n: int, seed: int, output: Path, resume: bool, sampling, progress: bool, run: dict,
             overrides: dict) -> tuple[list[str], set[str] | None, dict]:
    """The formulas to screen (sampled now, or read back from ``output`` on resume), the formulas known to the
    generator, and the seconds sampling took."""
    from composition_lm.data import read_samples
    from composition_lm.generator import FormulaGenerator
    from composition_lm.workflows.samples import save_samples

    sampled = output / "formulas.csv"
    if resume and sampled.is_file():  # the same samples as before the stop
        before = json.loads((output / "run_config.json").read_text())
        known = FormulaGenerator.from_pretrained(before["model"]).training_formulas()
        return read_samples(sampled), known, {"sampling_s": before["summary"]["seconds"]}
    t0 = time.perf_counter()
    gen = generator if isinstance(generator, FormulaGenerator) else FormulaGenerator.from_pretrained(generator)
    table = gen.generate(n, seed=seed, config=sampling, progress=progress, **overrides)
    summary = save_samples(gen, table, output, run, t0, time.perf_counter())
    return table["formula"].tolist(), gen.training_formulas(), {"sampling_s": summary["seconds"]}


def discover(generator=None, n: int = 1000, seed: int = 0, output: str | Path = "discover", *,
             formulas: Sequence[str] | None = None, sampling=None, predictor=None, scorer=None,
             e_hull_max: float = 0.1, top_k: int = 1, skip_above: float | None = DEFAULT_SKIP_ABOVE, resume: bool = False,
             workers: int = 1, scheduler=None, progress: bool = False, run: dict | None = None,
             **sampling_overrides) -> DiscoveryResult:
    """Sample ``n`` formulas with ``generator`` (a :class:`~composition_lm.FormulaGenerator`, a model folder or
    shipped name; default: the shipped Diffusion-BERT) and run the discovery funnel into ``output``.

    ``formulas``: screen these instead of sampling. ``sampling`` (a
    :class:`~composition_lm.sampling_config.SamplingConfig`, default: the model's) with ``sampling_overrides`` (its
    fields: ``require=["Li"]``, ``targets=["band_gap=1:3"]``, ...) says how to sample. ``predictor``: a
    :class:`structure.StructurePredictor` (default: the shipped compact MP template store, also the novelty
    reference); ``scorer``: a :class:`structure.stability.StabilityScorer` (default: the calibrated default, CHGNet
    relaxation judged by a SevenNet-l3i5 single point, at most ``DEFAULT_DISCOVER_MAX_STEPS`` (200) steps, with the
    screening of :meth:`structure.stability.Screening.for_threshold`). ``e_hull_max``: the stability threshold
    (eV/atom); ``top_k`` templates per formula; ``skip_above``: no structure for formulas the composition property
    predictor puts above this E_hull (default 0.15; None: a structure for every valid formula; the defaults are
    the configuration measured in ``benchmarks/funnel_speed.md``). ``workers`` relaxation processes, or a Dask ``scheduler``. ``run``: extra entries for
    ``run_config.json`` (the CLI records its command line). With ``resume`` a stopped run in ``output`` is
    finished from its journal; without it a folder holding a run is an error."""
    from structure import StructurePredictor
    from structure.discovery import DiscoveryFunnel
    from structure.relax import RelaxSettings
    from structure.stability import DEFAULT_DISCOVER_MAX_STEPS, Screening, StabilityScorer

    output = Path(output)
    if (output / "journal.jsonl").exists() and not resume:
        raise FileExistsError(f"{output} holds a discovery run: pass resume=True (--resume) to finish it, or choose "
                              "a new output folder")
    if formulas is not None and not formulas:
        raise ValueError("no formulas to screen")
    predictor = predictor if predictor is not None else StructurePredictor()
    if scorer is None:
        scorer = StabilityScorer(references=predictor.store, screening=Screening.for_threshold(e_hull_max),
                                 settings=RelaxSettings(max_steps=DEFAULT_DISCOVER_MAX_STEPS))
    if formulas is not None:
        known, seconds = None, {}
    else:
        formulas, known, seconds = _sampled(generator, n, seed, output, resume, sampling, progress, dict(run or {}),
                                            sampling_overrides)
    funnel = DiscoveryFunnel(predictor, scorer, known_formulas=known, top_k=top_k, e_hull_max=e_hull_max,
                             skip_above=skip_above)
    summary = funnel.run(formulas, output, resume=resume, workers=workers, progress=progress, seconds=seconds,
                         scheduler=scheduler)
    return DiscoveryResult(output, summary)


def rehull(output: str | Path, predictor=None, reference=None) -> DiscoveryResult:
    """Place a finished discovery run in ``output`` on the reference hull again (``reference``: a table path or a
    :class:`evaluation.hull.ReferenceHull`; default: the shipped one), from the formation energies in its journal,
    after the reference table changed; nothing is relaxed. ``predictor``: the run's template store (the novelty
    reference; default: the shipped one). The run's threshold and ``top_k`` are kept."""
    from structure import StructurePredictor
    from structure.discovery import DiscoveryFunnel

    from evaluation.hull import ReferenceHull

    output = Path(output)
    summary = json.loads((output / "funnel.json").read_text()) if (output / "funnel.json").is_file() else {}
    hull = reference if isinstance(reference, ReferenceHull) else ReferenceHull.load(reference)
    funnel = DiscoveryFunnel(predictor if predictor is not None else StructurePredictor(), None, hull=hull,
                             top_k=summary.get("top_k", 1), e_hull_max=summary.get("e_hull_max", 0.1))
    return DiscoveryResult(output, funnel.rehull(output))
