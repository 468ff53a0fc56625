"""Potentials as plugins (structure.potentials): each registered adapter loads offline from its installed weights
and relaxes NaCl rock salt to its measured energy; a missing extra names the pip extra; a MatPES potential is
refused against the MP hull; a user's own ASE calculator runs through the same relaxation loop; the elemental
reference check marks an element whose store polymorph lies below the shipped ground state."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Lattice, Structure

from structure import potentials
from structure.potentials import MissingExtraError, Potential, get_potential
from structure.relax import ElementalReferences, relax_many

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "matgl"
M3GNET = SHARED / "M3GNet-MP-2021.2.8-PES"
MATPES = SHARED / "M3GNet-MatPES-PBE-v2025.1-PES"

#: NaCl rock salt relaxed from a = 5.2 Å (FIRE, fmax 0.01, cell + positions): eV/atom measured with each
#: potential through this loop (M3GNet's is ../shared/README.md's reference value). CHGNet sits ~0.3 eV/atom
#: lower: its training energies carry MP2020's Cl correction (-0.614 eV per Cl).
NACL_ENERGY = {"chgnet": -3.668, "sevennet-0": -3.384, "sevennet-l3i5": -3.387, "m3gnet": -3.3675,
               "nequix-mp-1": -3.385}


def rock_salt(a: float) -> Structure:
    conventional = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return conventional.get_primitive_structure()


def _source(name: str):
    if name == "m3gnet":
        if not M3GNET.is_dir() or importlib.util.find_spec("m3gnet_legacy") is None:
            pytest.skip("needs the M3GNet weights in ../shared and m3gnet_legacy")
        return M3GNET
    if not potentials.POTENTIALS[name].installed():
        pytest.skip(f"{name} needs {potentials.POTENTIALS[name].package}")
    if name.startswith("nequix") and not (potentials.NEQUIX_WEIGHTS.expanduser() / f"{name}.nqx").is_file():
        pytest.skip(f"{name} needs its weights in {potentials.NEQUIX_WEIGHTS}")
    return name


@pytest.mark.parametrize("name", list(NACL_ENERGY))
def test_each_adapter_relaxes_nacl_to_its_measured_energy(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # weights come with the install, not from a hub
    result = relax_many([rock_salt(5.2)], _source(name), fmax=0.01, progress=False)[0]
    assert result.status == "converged"
    assert result.energy_per_atom == pytest.approx(NACL_ENERGY[name], abs=0.05)
    a = (result.structure.volume * 4) ** (1 / 3)  # conventional lattice parameter
    assert 5.55 < a < 5.80  # PBE: 5.69 Å (experiment 5.64)


def test_energy_scales_decide_the_correction():
    assert potentials.POTENTIALS["chgnet"].energy_scale == "mp-corrected"
    assert potentials.POTENTIALS["sevennet-0"].energy_scale == "mp-uncorrected"
    pot = Potential("x", "x", "mp-uncorrected", lambda: None)
    assert pot.correction == "mp2020"
    assert Potential("y", "y", "mp-corrected", lambda: None).correction == "none"
    with pytest.raises(ValueError, match="energy_scale"):
        Potential("z", "z", "kcal", lambda: None)


def test_the_default_potential_is_installed_and_named_in_the_cli():
    from composition_lm.cli import options

    assert options.DEFAULT_POTENTIAL == potentials.DEFAULT_POTENTIAL
    assert options.DEFAULT_JUDGES == potentials.DEFAULT_JUDGES
    assert set(options.POTENTIAL_NAMES) == set(potentials.POTENTIALS)
    from structure import stability

    assert (options.DEFAULT_STOP_MARGIN, options.DEFAULT_JUDGE_MARGIN, options.DEFAULT_STOP_AFTER) == (
        stability.DEFAULT_STOP_MARGIN, stability.DEFAULT_JUDGE_MARGIN, stability.DEFAULT_STOP_AFTER)
    assert (options.DEFAULT_SKIP_ABOVE, options.DEFAULT_DISCOVER_MAX_STEPS) == (
        stability.DEFAULT_SKIP_ABOVE, stability.DEFAULT_DISCOVER_MAX_STEPS)
    for name in (potentials.DEFAULT_POTENTIAL, *potentials.DEFAULT_JUDGES):  # core dependencies: offline by default
        assert potentials.POTENTIALS[name].installed() and potentials.POTENTIALS[name].extra == ""


def test_a_missing_extra_names_the_pip_extra(monkeypatch):
    spec = potentials.POTENTIALS["sevennet-0"]
    monkeypatch.setitem(potentials.POTENTIALS, "optional-one",
                        potentials.PotentialSpec(**{**vars(spec), "name": "optional-one",
                                                    "package": "no_such_package_here", "extra": "optional"}))
    with pytest.raises(MissingExtraError, match=r"pip install \"composition-gen\[optional\]\""):
        get_potential("optional-one")
    with pytest.raises(ValueError, match="composition-gen\\[optional\\]"):  # the console script reports it in a line
        get_potential("Optional-One")


def test_nequix_without_its_weights_is_a_clear_error_and_nothing_is_downloaded(tmp_path, monkeypatch):
    if not potentials.POTENTIALS["nequix-mp-1"].installed():
        pytest.skip("needs the nequix extra")
    monkeypatch.setattr(potentials, "NEQUIX_WEIGHTS", tmp_path)
    potentials._registered.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"nequix-mp-1\.nqx from https://github.com/atomicarchitects"):
            get_potential("nequix-mp-1")
        assert not list(tmp_path.iterdir())
    finally:
        potentials._registered.cache_clear()


def test_bad_potentials_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="registered name"):
        get_potential("/no/such/potential")
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.pt, state.pt"):
        get_potential(tmp_path)
    with pytest.raises(TypeError, match="from_calculator"):
        get_potential(3.5)


@pytest.mark.skipif(not MATPES.is_dir() or importlib.util.find_spec("m3gnet_legacy") is None,
                    reason="needs the MatPES M3GNet in ../shared")
def test_a_matpes_potential_is_refused_against_the_mp_hull(tmp_path):
    from structure.stability import StabilityScorer

    assert get_potential(MATPES).energy_scale == "matpes-pbe"
    with pytest.raises(ValueError, match="matpes-pbe energy scale.*MP reference hull"):
        StabilityScorer(MATPES)
    own = tmp_path / "own_hull.csv"  # a hull of the user's own, computed with this potential, is accepted
    own.write_text("formula,formation_energy_per_atom\nNa,0\nCl,0\nNaCl,-2.0\n")
    assert StabilityScorer(MATPES, reference=own).correction == "none"


class ToyCalculator(Calculator):
    """No forces; energy per atom -1 eV in a one-atom cell, -0.5 eV otherwise: a one-atom polymorph of any
    element lies 0.5 eV/atom below a larger ground state."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        e = -1.0 * len(self.atoms) if len(self.atoms) == 1 else -0.5 * len(self.atoms)
        self.results = {"energy": e, "free_energy": e, "forces": np.zeros((len(self.atoms), 3)),
                        "stress": np.zeros(6)}


def test_a_users_calculator_runs_through_the_same_loop_and_the_reference_check_marks_rows():
    toy = Potential.from_calculator(ToyCalculator(), energy_scale="mp-corrected", name="toy")
    result = relax_many([rock_salt(5.6)], toy, progress=False)[0]
    assert result.status == "converged" and result.steps == 0 and result.energy_per_atom == -0.5
    with pytest.raises(ValueError, match="workers=1"):
        relax_many([rock_salt(5.6), rock_salt(5.7)], toy, workers=2, progress=False)
    single_n = Structure(Lattice.cubic(6.0), ["N"], [[0, 0, 0]])  # N's shipped ground state (N2 crystal) has 8 atoms
    refs = ElementalReferences(toy, lambda el: [single_n] if el == "N" else [])
    assert refs.energy_per_atom("N") == -0.5  # the ground state's, not the lower store polymorph's
    notes = refs.notes("Li3N")
    assert len(notes) == 1 and "N reference uncertain" in notes[0] and "0.500 eV/atom below" in notes[0]
    assert refs.uncertain == {"N": notes[0]}


class MixedBonus(ToyCalculator):
    """The toy energy, 0.1 eV/atom lower for a cell of several elements: formation energies 0.1 eV/atom apart."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(set(self.atoms.get_chemical_symbols())) > 1:
            self.results["energy"] -= 0.1 * len(self.atoms)
            self.results["free_energy"] = self.results["energy"]


def test_a_committee_averages_its_judges_and_reports_their_spread(tmp_path):
    from structure.stability import StabilityScorer

    a = Potential.from_calculator(ToyCalculator(), energy_scale="mp-corrected", name="a")
    b = Potential.from_calculator(MixedBonus(), energy_scale="mp-corrected", name="b")
    hull = tmp_path / "hull.csv"
    hull.write_text("formula,formation_energy_per_atom\nNa,0\nCl,0\nNaCl,-2.0\n")
    nacl = rock_salt(5.6)
    alone = StabilityScorer(a, reference=hull, cache_dir=tmp_path).score([nacl])[0]
    two_stage = StabilityScorer(a, reference=hull, cache_dir=tmp_path, judges=[b]).score([nacl])[0]
    committee = StabilityScorer(a, reference=hull, cache_dir=tmp_path, judges=[a, b])
    both = committee.score([nacl])[0]
    assert math.isnan(alone.e_hull_std) and math.isnan(two_stage.e_hull_std)
    assert two_stage.e_hull_per_atom == pytest.approx(alone.e_hull_per_atom - 0.1, abs=1e-9)
    assert both.e_hull_per_atom == pytest.approx(alone.e_hull_per_atom - 0.05, abs=1e-9)
    assert both.e_hull_std == pytest.approx(0.05, abs=1e-9)
    assert both.energy_per_atom == alone.energy_per_atom  # the relaxing potential's energy
    assert "committee mean of a (none) + b (none)" in committee.describe()


def test_discover_runs_offline_on_the_default_potential(tmp_path, monkeypatch):
    """No --potential and no network: three formulas through the whole funnel on the installed default."""
    import json
    import socket

    from composition_lm.cli import main

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    src = tmp_path / "formulas.txt"
    src.write_text("NaCl\nKCl\nNaBr\n")
    assert main(["discover", "--from", str(src), "--max-steps", "100", "--no-progress", "-o", str(tmp_path / "o")]) == 0
    funnel = json.loads((tmp_path / "o" / "funnel.json").read_text())
    scheme = f"relaxed with {potentials.DEFAULT_POTENTIAL}, judged by single point of {potentials.DEFAULT_JUDGES[0]}"
    assert funnel["potential"].startswith(scheme)
    assert funnel["counts"]["on_hull"] == 3
    assert scheme in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("bad", ["no-such-potential", "EMPTY_FOLDER", "/no/such/folder"])
def test_a_bad_potential_fails_before_sampling(bad, tmp_path, capsys, monkeypatch):
    from composition_lm.cli import main
    from composition_lm.generator import FormulaGenerator

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the potential was checked")

    monkeypatch.setattr(FormulaGenerator, "from_pretrained", no_sampling)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    bad = str(tmp_path / "empty") if bad == "EMPTY_FOLDER" else bad
    assert main(["discover", "-n", "4", "--potential", bad, "--no-progress", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("lacks model.json" in err or "registered name" in err
                                         or "cannot be reached" in err)
    assert not (tmp_path / "o" / "formulas.csv").exists()
    assert main(["discover", "-n", "4", "--judge", bad, "--no-progress", "-o", str(tmp_path / "o")]) == 2


class Sliding(ToyCalculator):
    """The toy energies with a constant force on the first atom of a compound: its relaxation never converges
    (an element's, for the references, converges at once)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(set(self.atoms.get_chemical_symbols())) > 1:
            self.results["forces"][0, 0] = 0.2


def test_early_stop_ends_a_relaxation_above_its_ceiling_after_stop_after_steps():
    from structure.batched import relax_batched

    sliding = Potential.from_calculator(Sliding(), energy_scale="mp-corrected", name="sliding")
    seen = []
    stopped, kept = relax_batched([rock_salt(5.6), rock_salt(5.6)], sliding, max_steps=20, ceilings=[-0.6, None],
                                  stop_after=5, on_step=lambda *a: seen.append(a))
    assert [s for i, s, _ in seen if i == 0] == list(range(6)) and {e for *_, e in seen} == {-0.5}
    assert stopped.status == "not_converged" and stopped.stopped_early and stopped.steps == 5
    assert stopped.reason.startswith("stopped early after 5 steps: -0.500 eV/atom, 0.100 above")
    assert kept.status == "not_converged" and not kept.stopped_early and kept.steps == 20
    with pytest.raises(ValueError, match="one value per structure"):
        relax_batched([rock_salt(5.6)], sliding, ceilings=[None, None])


def test_screening_stops_hopeless_relaxations_and_judges_only_plausible_structures(tmp_path):
    from structure.stability import Screening, StabilityScorer

    sliding = Potential.from_calculator(Sliding(), energy_scale="mp-corrected", name="sliding")
    judge = Potential.from_calculator(MixedBonus(), energy_scale="mp-corrected", name="b")
    hull = tmp_path / "hull.csv"
    hull.write_text("formula,formation_energy_per_atom\nNa,0\nCl,0\nNaCl,-2.0\n")
    nacl = rock_salt(5.6)
    settings = {"max_steps": 12}

    def scored(screening):
        return StabilityScorer(sliding, settings=settings, reference=hull, cache_dir=tmp_path, judges=[judge],
                               screening=screening).score([nacl])[0]

    full = scored(None)  # no screening: relaxed to max_steps and judged (0.1 eV/atom below the relaxer's energy)
    h = full.e_hull_per_atom + 0.1  # the relaxing potential's own E_hull (its energy does not change)
    assert "not judged" not in full.reason and "stopped early" not in full.reason
    # the ceiling is exactly where the relaxer's E_hull crosses stop_above
    assert "stopped early" not in scored(Screening(stop_above=h + 0.01, stop_after=3)).reason
    early = scored(Screening(stop_above=h - 0.01, stop_after=3))
    assert early.reason.startswith("stopped early after 3 steps") and "not judged (stopped early)" in early.reason
    assert early.e_hull_per_atom == pytest.approx(h, abs=1e-9)  # the relaxer's E_hull, unjudged
    unjudged = scored(Screening(judge_below=h - 0.01))
    assert unjudged.e_hull_per_atom == pytest.approx(h, abs=1e-9) and "not judged: E_hull by sliding" in unjudged.reason
    assert scored(Screening(judge_below=h + 0.01)).e_hull_per_atom == pytest.approx(full.e_hull_per_atom, abs=1e-9)
    assert Screening.for_threshold(0.1, stop_margin=None, judge_margin=0.2) == Screening(judge_below=0.1 + 0.2)


def test_references_for_the_shipped_store_are_cached_per_machine_not_in_the_package(tmp_path, monkeypatch):
    from structure import pipeline
    from structure.pipeline import Relaxer

    monkeypatch.setattr(pipeline, "USER_CACHE", tmp_path / "cache")
    registered = Relaxer(_source("chgnet")).references
    assert registered.cache_path == tmp_path / "cache" / "references" / "templates-mp" / "elemental_references.json"
    toy = Potential.from_calculator(ToyCalculator(), energy_scale="mp-corrected", name="toy")
    assert Relaxer(toy).references.cache_path is None  # a user's calculator has no identity across runs
    assert Relaxer(toy, cache_dir=tmp_path).references.cache_path == tmp_path / "elemental_references.json"
