"""FIRE relaxation with the local M3GNet potential (structure.relax): the README's NaCl reference, failed and
unconverged rows, worker-count independence, elemental reference energies and potential-loading errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("m3gnet_legacy")

from pymatgen.core import Lattice, Structure  # noqa: E402

from structure.relax import (  # noqa: E402
    ElementalReferences,
    ground_states,
    load_potential,
    potential_key,
    relax_many,
    relax_structure,
)
from structure.relax_result import _explosion  # noqa: E402

#: The original M3GNet universal potential in the shared folder (needs the m3gnet_legacy module).
MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"

if not MODEL_DIR.is_dir():
    pytest.skip(f"shared matgl model missing: {MODEL_DIR}", allow_module_level=True)


def rock_salt(a: float) -> Structure:
    """Primitive (2-atom) NaCl rock salt with conventional lattice parameter ``a``."""
    conventional = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return conventional.get_primitive_structure()


def sodium(lattice: str, a: float) -> Structure:
    """Primitive (1-atom) bcc or fcc sodium with conventional lattice parameter ``a``."""
    group = {"bcc": "Im-3m", "fcc": "Fm-3m"}[lattice]
    return Structure.from_spacegroup(group, Lattice.cubic(a), ["Na"], [[0, 0, 0]]).get_primitive_structure()


def chlorine_dimer() -> Structure:
    """A Cl2 molecule (2.0 Å) in an 8 Å box: images are beyond the 5 Å cutoff of the other molecule's atoms."""
    return Structure(Lattice.cubic(8.0), ["Cl", "Cl"], [[0, 0, 0], [2.0, 0, 0]], coords_are_cartesian=True)


def elemental_candidates(element: str) -> list[Structure]:
    return {"Na": [sodium("bcc", 4.2), sodium("fcc", 5.3)], "Cl": [chlorine_dimer()]}.get(element, [])


@pytest.fixture(scope="module")
def potential():
    return load_potential(MODEL_DIR)


@pytest.fixture(scope="module")
def nacl(potential):
    """NaCl relaxed from a = 5.2 Å with fmax 0.01 (the shared README's reference run)."""
    return relax_structure(rock_salt(5.2), potential, fmax=0.01)


def test_nacl_matches_readme_reference(nacl):
    assert nacl.status == "converged" and nacl.reason == ""
    assert nacl.max_force < 0.01 and nacl.steps > 0
    a = (4 * nacl.structure.volume) ** (1 / 3)  # the primitive cell holds a quarter of the conventional one
    assert a == pytest.approx(5.696, abs=0.02)
    assert nacl.energy_per_atom == pytest.approx(-3.3675, abs=0.005)
    assert nacl.initial_volume == pytest.approx(5.2**3 / 4)
    assert nacl.final_volume == pytest.approx(nacl.structure.volume)


def test_overlapping_atoms_fail_without_exception(potential):
    s = rock_salt(5.2)
    s.append("Na", s[0].coords + [0.31, 0, 0], coords_are_cartesian=True)
    result = relax_structure(s, potential)
    assert result.status == "failed" and result.structure is None
    assert result.reason == "overlapping atoms (min distance 0.31 Å)"
    assert math.isnan(result.energy_per_atom) and result.steps == 0


def test_atom_overlapping_its_own_image_fails(potential):
    tiny = Structure(Lattice.cubic(0.4), ["Na"], [[0, 0, 0]])
    assert relax_structure(tiny, potential).reason == "overlapping atoms (min distance 0.40 Å)"


@pytest.mark.parametrize(
    ("structure", "reason"),
    [
        (Structure(Lattice.cubic(4.0), [], []), "empty structure (no atoms)"),
        (Structure(Lattice.cubic(4.0), ["Na"], [[math.nan, 0, 0]]), "non-finite lattice or coordinates"),
    ],
)
def test_empty_and_nan_structures_fail(potential, structure, reason):
    result = relax_structure(structure, potential)
    assert (result.status, result.reason) == ("failed", reason)


def test_explosion_thresholds():
    start = rock_salt(5.6)
    assert _explosion(start.volume, start) is None
    assert _explosion(start.volume / 4.5, start) == "volume changed by a factor 4.5"
    assert _explosion(start.volume * 4.5, start) == "volume changed by a factor 0.222"
    squeezed = start.copy()
    squeezed.replace(1, "Na", squeezed[0].coords + [0.45, 0, 0], coords_are_cartesian=True)
    assert _explosion(start.volume, squeezed) == "overlapping atoms (min distance 0.45 Å)"


def test_step_limit_gives_not_converged_with_energy(potential):
    result = relax_structure(rock_salt(5.2), potential, max_steps=1)
    assert result.status == "not_converged" and result.steps == 1
    assert "after 1 steps" in result.reason and result.max_force > 0.05
    assert math.isfinite(result.energy_per_atom) and result.structure is not None


def test_worker_count_does_not_change_results():
    structures = [rock_salt(5.6), sodium("bcc", 4.1), rock_salt(5.8)]
    one = relax_many(structures, str(MODEL_DIR), workers=1, progress=False)
    two = relax_many(structures, str(MODEL_DIR), workers=2, progress=False)
    assert [r.status for r in one] == [r.status for r in two] == ["converged"] * 3
    for a, b in zip(one, two):
        assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=1e-6)
        assert b.structure.composition == a.structure.composition
    assert one[1].structure.composition.reduced_formula == "Na"


def test_elemental_references_use_the_shipped_ground_state_and_cache(tmp_path, nacl):
    cache = tmp_path / "refs.json"
    refs = ElementalReferences(str(MODEL_DIR), elemental_candidates, cache_path=cache)
    ground = ground_states()["Na"]
    own = relax_many([ground["structure"]], str(MODEL_DIR), progress=False)[0]
    assert refs.energy_per_atom("Na") == pytest.approx(own.energy_per_atom - ground["e_above_hull"], abs=1e-9)
    stored = json.loads(cache.read_text())[potential_key(MODEL_DIR)]
    assert stored["Na"]["energy_per_atom"] == refs.energy_per_atom("Na")
    assert stored["Na"]["source"] == f"MP ground state {ground['material_id']}"
    assert stored["Na"]["n_candidates"] == 2 and stored["Na"]["note"] == ""  # bcc / fcc Na agree with it
    assert refs.notes("NaCl") == []

    e_form = refs.formation_energy_per_atom("NaCl", nacl.energy_per_atom)
    assert -2.5 < e_form < -1.0  # MP: about -2.0 eV/atom

    def must_not_relax(element: str) -> list[Structure]:
        raise AssertionError(f"candidates asked for {element}: the cache was not used")

    again = ElementalReferences(MODEL_DIR, must_not_relax, cache_path=cache)
    assert again.formation_energy_per_atom("NaCl", nacl.energy_per_atom) == pytest.approx(e_form, abs=1e-12)


def test_a_store_with_a_wrong_polymorph_does_not_move_the_reference():
    """The failure the shipped ground states fix: a store whose only Na structure is a wrong polymorph (here one
    atom in a 10 Å box, which relaxes nowhere: no force, no stress) used to become the reference, making every
    Na compound look up to 0.8 eV/atom too stable."""
    isolated = Structure(Lattice.cubic(10.0), ["Na"], [[0, 0, 0]])
    wrong = relax_many([isolated], str(MODEL_DIR), progress=False)[0]
    refs = ElementalReferences(str(MODEL_DIR), lambda el: [isolated] if el == "Na" else [])
    plain = ElementalReferences(str(MODEL_DIR))
    assert wrong.status == "converged" and refs.entry("Na")["store_min_energy_per_atom"] == wrong.energy_per_atom
    assert refs.energy_per_atom("Na") == pytest.approx(plain.energy_per_atom("Na"), abs=1e-9)
    assert wrong.energy_per_atom > refs.energy_per_atom("Na") + 0.5  # it would have moved it by 0.79 eV/atom
    assert refs.notes("NaCl") == []  # a polymorph above the ground state is not a warning


def test_elemental_references_errors(tmp_path):
    with pytest.raises(ValueError, match="must contain only Cl"):
        ElementalReferences(str(MODEL_DIR), lambda el: [rock_salt(5.6)]).energy_per_atom("Cl")
    overlapping = Structure(Lattice.cubic(3.0), ["Ra", "Ra"], [[0, 0, 0], [0.1, 0, 0]], coords_are_cartesian=True)
    with pytest.raises(ValueError, match="no shipped ground state for Ra and no candidate structure converged.*"
                                         "overlapping"):
        ElementalReferences(str(MODEL_DIR), lambda el: [overlapping],
                            cache_path=tmp_path / "refs.json").energy_per_atom("Ra")
    assert not (tmp_path / "refs.json").exists()


def test_load_potential_is_cached(potential):
    assert load_potential(str(MODEL_DIR) + "/") is potential


def test_load_potential_missing_folder_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        load_potential(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="lacks model.json, model.pt, state.pt"):
        load_potential(tmp_path)


def test_load_potential_unknown_hub_name_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="M3GNet-No-Such-Model-PES"):
        load_potential("M3GNet-No-Such-Model-PES")
    assert time.perf_counter() - start < 20  # matgl alone retries the Hub for ~45 s offline
