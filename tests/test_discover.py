"""`composition-gen discover`: the funnel end to end on a tiny run, its outputs, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from composition_lm.cli import main

REPO = Path(__file__).resolve().parents[1]
POTENTIAL = REPO.parent / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"
FORMULAS = ["NaCl", "KCl", "NaBr", "KBr", "NaF", "KF", "NaCl", "Xx2", "NaCl2"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not POTENTIAL.is_dir(), reason="needs the M3GNet weights in ../shared")]


def _argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["discover", "--from", str(src), "--potential", str(POTENTIAL), "--max-steps", "60", "--no-progress",
            "-o", str(out), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run on FORMULAS (its elemental references, cached per machine, serve the other tests)."""
    root = tmp_path_factory.mktemp("discover")
    src = root / "formulas.txt"
    src.write_text("\n".join(FORMULAS) + "\n")
    assert main(_argv(src, root / "out")) == 0
    return src, root / "out"


def test_every_formula_has_a_row_with_its_stage(run):
    _, out = run
    table = pd.read_csv(out / "candidates.csv", keep_default_na=False)
    assert table["index"].tolist() == list(range(len(FORMULAS)))  # top-k 1: one row per formula, in order
    by = {i: r for i, r in table.iterrows()}
    assert by[7]["stage"] == "sampled" and "unparseable" in by[7]["reason"]
    assert by[8]["stage"] == "parsed" and "validity" in by[8]["reason"]
    assert str(by[6]["unique"]) == "False" and by[6]["sun"] in (False, "False")  # NaCl again: not unique
    assert "same structure as sample 0" in by[6]["reason"]  # and not relaxed a second time
    assert by[6]["energy_per_atom"] == by[0]["energy_per_atom"]
    kbr = by[3]  # MP knows KBr, but the reference table holds no energy for it: never counted stable
    assert "lower bound" in kbr["reason"] and str(kbr["stable"]) == "False"
    nacl = by[0]  # known composition, known structure: not novel (it is the AFLOW rock-salt prototype itself)
    assert nacl["decomposition"] and str(nacl["novel_formula"]) == "False"
    assert nacl["e_hull_per_atom"] != ""


def test_funnel_counts_rates_and_report(run):
    _, out = run
    funnel = json.loads((out / "funnel.json").read_text())
    counts = list(funnel["counts"].values())
    assert counts[0] == len(FORMULAS) and counts == sorted(counts, reverse=True)
    sun = pd.read_csv(out / "sun.csv", keep_default_na=False)
    assert funnel["counts"]["sun"] == len(sun)
    # each count is of the samples that passed that check (a stable repeat is not counted unique, a stable
    # unique known structure not novel)
    table = pd.read_csv(out / "candidates.csv", keep_default_na=False)
    best = table[table["best"].astype(str) == "True"]
    flag = {k: best[k].astype(str) == "True" for k in ("stable", "unique", "novel")}
    assert funnel["counts"]["stable"] == flag["stable"].sum()
    assert funnel["counts"]["unique"] == (flag["stable"] & flag["unique"]).sum() < flag["stable"].sum()
    assert funnel["counts"]["novel"] == funnel["counts"]["sun"] < funnel["counts"]["unique"]
    assert funnel["sun_rate"]["0.1"] == pytest.approx(len(sun) / len(FORMULAS))
    assert sun["e_hull_per_atom"].tolist() == sorted(sun["e_hull_per_atom"].tolist())
    with zipfile.ZipFile(out / "sun_cif.zip") as zf:
        assert len(zf.namelist()) == len(sun)
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page
    assert {"templates_s", "relaxation_s"} <= set(funnel["seconds"])


def test_resume_after_a_kill_loses_and_repeats_nothing(run, tmp_path):
    src, done = run
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "composition_lm.cli", *_argv(src, out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "journal.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and '"kind": "structure"' in journal.read_text():
            break
        time.sleep(0.2)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(journal, "a") as fh:  # a kill in the middle of a write leaves a torn last line
        fh.write('{"kind": "structure", "index": 99, "ra')
    assert main(_argv(src, out)) == 2  # an existing run is not overwritten without --resume
    assert main(_argv(src, out, "--resume")) == 0
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    keys = [(r["index"], r["rank"]) for r in records if r["kind"] == "structure"]
    assert len(keys) == len(set(keys)) == 7  # seven valid samples with a template, each scored once
    assert (out / "candidates.csv").read_text() == (done / "candidates.csv").read_text()
    assert (out / "sun.csv").read_text() == (done / "sun.csv").read_text()


def test_discover_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(_argv(empty, tmp_path / "o")) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["discover", "-n", "0", "-o", str(tmp_path / "o")]) == 2
    assert main(["discover", "--stop-margin", "-0.1", "-o", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        main(["discover", "--judge-margin", "tight", "-o", str(tmp_path / "o")])
    assert main(["discover", "--from", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o2")]) == 2


def test_dask_local_cluster_gives_the_same_candidates(run, tmp_path):
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    src, done = run
    out = tmp_path / "out"
    out.mkdir()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main(_argv(src, out, "--scheduler", cluster.scheduler_address)) == 0
    assert (out / "candidates.csv").read_text() == (done / "candidates.csv").read_text()
    keys = [(r["index"], r["rank"]) for r in map(json.loads, (out / "journal.jsonl").read_text().splitlines())
            if r["kind"] == "structure"]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 7


def test_local_worker_processes_give_the_same_candidates_and_journal_each_structure_once(run, tmp_path):
    src, done = run
    out = tmp_path / "out"
    assert main(_argv(src, out, "--workers", "2")) == 0
    assert (out / "candidates.csv").read_text() == (done / "candidates.csv").read_text()
    keys = [(r["index"], r["rank"]) for r in map(json.loads, (out / "journal.jsonl").read_text().splitlines())
            if r["kind"] == "structure"]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 7


def test_rehull_places_a_finished_run_on_a_changed_hull_without_relaxing(run, tmp_path, capsys):
    import shutil

    from evaluation.hull import DEFAULT_HULL

    src, done = run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    assert main(["discover", "--rehull", "-o", str(out)]) == 0  # the same hull: the same outputs
    assert (out / "candidates.csv").read_text() == (done / "candidates.csv").read_text()
    table = pd.read_csv(DEFAULT_HULL, comment="#", keep_default_na=False, na_values=[""])
    nacl = table["reduced_formula"] == "NaCl"
    table.loc[nacl, "formation_energy_per_atom"] -= 1.0  # NaCl's reference 1 eV/atom lower
    changed = tmp_path / "hull.csv"
    table.to_csv(changed, index=False)
    assert main(["discover", "--rehull", "--reference", str(changed), "-o", str(out)]) == 0
    assert "placed on the hull again" in capsys.readouterr().out
    before = pd.read_csv(done / "candidates.csv", keep_default_na=False).set_index("index")
    after = pd.read_csv(out / "candidates.csv", keep_default_na=False).set_index("index")
    assert float(after.loc[0, "e_hull_per_atom"]) == pytest.approx(float(before.loc[0, "e_hull_per_atom"]) + 1.0,
                                                                    abs=1e-6)
    assert after.loc[0, "energy_per_atom"] == before.loc[0, "energy_per_atom"]  # nothing relaxed again
    records = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("rehull") == 2
    assert main(["discover", "--resume", *_argv(src, out)[1:]]) == 0  # a resume keeps the new verdicts
    assert pd.read_csv(out / "candidates.csv", keep_default_na=False).set_index("index").loc[0, "e_hull_per_atom"] \
        == after.loc[0, "e_hull_per_atom"]


def test_resume_refuses_a_journal_written_for_other_formulas(run, tmp_path, capsys):
    import shutil

    src, done = run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(FORMULAS)) + "\n")  # the same formulas in another order
    before = (out / "journal.jsonl").read_text()
    assert main(_argv(other, out, "--resume")) != 0
    assert "does not belong to these formulas" in capsys.readouterr().err
    assert (out / "journal.jsonl").read_text() == before  # nothing written


def test_skip_above_gives_no_structure_to_formulas_the_composition_model_rules_out(tmp_path):
    from evaluation.properties import PropertyPredictor

    src = tmp_path / "formulas.txt"
    src.write_text("NaCl\nKBr\nAsN\n")
    names = ["NaCl", "KBr", "AsN"]
    predicted = dict(zip(names, PropertyPredictor.load().predict(names)["e_above_hull"]))
    bound = (predicted["NaCl"] + predicted["AsN"]) / 2
    assert predicted["NaCl"] < bound < predicted["AsN"]
    assert main(_argv(src, tmp_path / "out", "--skip-above", f"{bound:.6f}")) == 0
    table = pd.read_csv(tmp_path / "out" / "candidates.csv", keep_default_na=False).set_index("formula")
    assert table.loc["AsN", "stage"] == "valid" and table.loc["AsN", "reason"].startswith("skipped: predicted E_hull")
    assert table.loc["NaCl", "energy_per_atom"] != ""  # below the bound: relaxed as usual
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert funnel["screening"]["skip_above"] == pytest.approx(bound, abs=1e-6)


def test_discover_is_one_python_call_that_samples_and_records_its_settings(tmp_path):
    from structure.stability import StabilityScorer

    from composition_lm.workflows import DiscoveryResult, discover

    scorer = StabilityScorer(POTENTIAL, settings={"max_steps": 60}, cache_dir=tmp_path)
    result = discover("diffusion-bert", n=4, seed=0, output=tmp_path / "o", scorer=scorer, require=["Na"],
                      max_elements=2, steps=8)
    assert isinstance(result, DiscoveryResult) and result.counts["sampled"] == 4
    run = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert run["require"] == ["Na"] and run["max_elements"] == 2 and run["steps"] == 8 and run["n"] == 4
    table = result.candidates()
    assert len(table) == 4 and all("Na" in f for f in table["formula"])
    assert set(result.sun()["formula"]) <= set(table["formula"])
    with pytest.raises(FileExistsError, match="resume"):
        discover("diffusion-bert", n=4, output=tmp_path / "o", scorer=scorer)


def test_discover_no_relax_scores_the_template_structures_as_given(tmp_path):
    src = tmp_path / "f.txt"
    src.write_text("NaCl\nKCl\n")
    assert main(_argv(src, tmp_path / "o", "--no-relax")) == 0
    table = pd.read_csv(tmp_path / "o" / "candidates.csv", keep_default_na=False)
    assert set(table["relax_status"]) == {"static"}, table["relax_status"].tolist()


def test_discover_command_samples_with_the_models_settings_and_its_own_options(tmp_path):
    """discover's --top-k (templates per formula) is not the sampler's top-k: the samples keep the model's draw."""
    assert main(["discover", "-n", "4", "--seed", "0", "--top-k", "1", "--require", "Na", "--potential", str(POTENTIAL),
                 "--max-steps", "10", "--no-progress", "-o", str(tmp_path / "o")]) == 0
    run = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert run["top_k"] is None and run["require"] == ["Na"] and run["steps"] == 32


def test_discover_defaults_are_the_configuration_measured_fastest(monkeypatch, tmp_path):
    """benchmarks/funnel_speed.md: screening + skip above 0.15 eV/atom + at most 200 steps; other relaxing
    commands keep 500 steps, and a stated --skip-above off / --max-steps wins."""
    import inspect

    import composition_lm.workflows.discovery as workflow
    from composition_lm.cli import build_parser
    from structure.stability import DEFAULT_DISCOVER_MAX_STEPS, DEFAULT_SKIP_ABOVE

    assert (DEFAULT_SKIP_ABOVE, DEFAULT_DISCOVER_MAX_STEPS) == (0.15, 200)
    args = build_parser().parse_args(["discover", "-o", "x"])
    assert (args.skip_above, args.max_steps) == (DEFAULT_SKIP_ABOVE, DEFAULT_DISCOVER_MAX_STEPS)
    args = build_parser().parse_args(["discover", "--skip-above", "off", "--max-steps", "500", "-o", "x"])
    assert (args.skip_above, args.max_steps) == (None, 500)
    for command in (["stability", "s.csv", "-o", "x"], ["learn", "-o", "x"]):
        assert build_parser().parse_args(command).max_steps == 500
    assert inspect.signature(workflow.discover).parameters["skip_above"].default == DEFAULT_SKIP_ABOVE

    seen = {}

    class Stop(Exception):
        pass

    class Funnel:
        def __init__(self, predictor, scorer, **kwargs):
            seen.update(kwargs, scorer=scorer)
            raise Stop

    import structure.discovery

    monkeypatch.setattr(structure.discovery, "DiscoveryFunnel", Funnel)
    with pytest.raises(Stop):
        workflow.discover(formulas=["NaCl"], output=tmp_path / "run")
    assert seen["skip_above"] == DEFAULT_SKIP_ABOVE
    assert seen["scorer"].relaxer.settings.max_steps == DEFAULT_DISCOVER_MAX_STEPS
