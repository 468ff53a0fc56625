"""Batched relaxation (structure.batched): one forward pass for many structures must give each structure the
answer of matgl's one-by-one Relaxer, keep failures to the structure that failed, and check its arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("m3gnet_legacy")

import numpy as np  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402

from structure import batched  # noqa: E402
from structure.relax import load_potential, relax_many, relax_structure  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "matgl" / "M3GNet-MP-2021.2.8-PES"

if not MODEL_DIR.is_dir():
    pytest.skip(f"shared matgl model missing: {MODEL_DIR}", allow_module_level=True)


def rock_salt(a: float) -> Structure:
    conventional = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return conventional.get_primitive_structure()


def rattled_perovskite(seed: int) -> Structure:
    cubic = Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.95), ["Sr", "Ti", "O"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    rng = np.random.default_rng(seed)
    return Structure(cubic.lattice, cubic.species, cubic.cart_coords + rng.normal(0, 0.05, (len(cubic), 3)),
                     coords_are_cartesian=True)


def overlapping() -> Structure:
    return Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])


@pytest.fixture(scope="module")
def potential():
    return load_potential(MODEL_DIR)


@pytest.fixture(scope="module")
def inputs():
    return [rock_salt(5.4), rattled_perovskite(0), overlapping(), rock_salt(5.9), rattled_perovskite(1)]


@pytest.fixture(scope="module")
def one_by_one(inputs, potential):
    return [relax_structure(s, potential, max_steps=200) for s in inputs]


def test_batch_reproduces_one_by_one_relaxer(inputs, potential, one_by_one):
    done = []
    out = batched.relax_batched(inputs, potential, max_steps=200, batch_size=3, on_result=lambda i, r: done.append(i))
    assert sorted(done) == list(range(len(inputs)))
    assert [r.status for r in out] == [r.status for r in one_by_one]
    assert out[2].status == "failed" and out[2].reason == one_by_one[2].reason
    for a, b in zip(one_by_one, out):
        if a.status != "failed":
            assert b.steps == a.steps  # the same FIRE, step for step
            assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=1e-4)
            assert b.final_volume == pytest.approx(a.final_volume, rel=1e-3)


def test_lbfgs_reaches_the_same_minimum(inputs, potential, one_by_one):
    out = relax_many(inputs, str(MODEL_DIR), max_steps=200, optimizer="LBFGS", batch_size=2, progress=False)
    for a, b in zip(one_by_one, out):
        assert b.status == a.status
        if a.status == "converged":
            assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=0.002)


def test_an_error_in_the_batch_fails_only_its_structure(inputs, potential, one_by_one, monkeypatch):
    real = batched._evaluate

    def evaluate(items, pot):
        if any(item.index == 1 and item.optimizer.nsteps == 2 for item in items):
            raise RuntimeError("boom")
        real(items, pot)

    monkeypatch.setattr(batched, "_evaluate", evaluate)
    out = batched.relax_batched(inputs, potential, max_steps=200, batch_size=5)
    assert out[1].status == "failed" and out[1].reason == "RuntimeError: boom" and out[1].steps == 2
    for k in (0, 3, 4):
        assert out[k].energy_per_atom == pytest.approx(one_by_one[k].energy_per_atom, abs=1e-4)


def test_bad_arguments(potential):
    with pytest.raises(ValueError, match="batch_size"):
        batched.relax_batched([rock_salt(5.6)], potential, batch_size=0)
    with pytest.raises(ValueError, match="unknown optimizer 'SD'"):
        relax_many([rock_salt(5.6)], str(MODEL_DIR), optimizer="SD", progress=False)


def test_time_limit_stops_a_structure_with_its_last_geometry(inputs, potential):
    out = batched.relax_batched(inputs, potential, max_steps=200, batch_size=2, time_limit=1e-9)
    assert out[2].status == "failed"  # the overlapping input never starts
    for k in (0, 1, 3, 4):
        assert out[k].status == "not_converged" and out[k].steps == 0
        assert "stopped by the time limit" in out[k].reason and np.isfinite(out[k].energy_per_atom)
    with pytest.raises(ValueError, match="time_limit"):
        relax_many([rock_salt(5.6)], str(MODEL_DIR), time_limit=0, progress=False)


def test_a_collapsing_cell_is_stopped_mid_relaxation(inputs, potential, one_by_one, monkeypatch):
    real = batched._evaluate

    def evaluate(items, pot):
        for item in items:  # squeeze structure 1 to an eighth of its volume at step 3
            if item.index == 1 and item.optimizer.nsteps == 3:
                item.atoms.set_cell(item.atoms.cell * 0.5, scale_atoms=True)
        real(items, pot)

    monkeypatch.setattr(batched, "_evaluate", evaluate)
    out = batched.relax_batched(inputs, potential, max_steps=200, batch_size=5)
    assert out[1].status == "failed" and out[1].steps == 3
    assert "during relaxation" in out[1].reason and "factor 0.125" in out[1].reason
    for k in (0, 3, 4):
        assert out[k].energy_per_atom == pytest.approx(one_by_one[k].energy_per_atom, abs=1e-4)


def test_an_implausibly_dense_cell_is_refused_before_its_graph_is_built(potential):
    """A substituted template once came out at 0.58 Å^3/atom (H7OF9): hundreds of neighbours per atom, a
    worker at 7 GB. It must fail at once with the reason, and leave the other structures alone."""
    dense = Structure(Lattice.cubic(1.3), ["H", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 1.1 Å^3/atom, 1.13 Å apart
    out = batched.relax_batched([dense, rock_salt(5.6)], potential, max_steps=5, batch_size=2)
    assert out[0].status == "failed" and "implausibly dense cell (1.10 Å^3/atom" in out[0].reason
    assert out[1].status != "failed"
