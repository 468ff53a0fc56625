"""CDVAE's composition samplers, type updates, element-count table and Con-CDVAE property conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.conditioning import PropertyBins
from structure.cdvae.data import crystals_from_structures, element_count_table
from structure.cdvae.model import CDVAE, CDVAEConfig
from structure.cdvae.sampling_config import CDVAESamplingConfig
from structure.cdvae.sampling import langevin, langevin_schedule, sample, sample_composition

SHARED = Path(__file__).resolve().parents[2] / "shared"
PEROV = SHARED / "data" / "structures" / "perov_5"


def tiny_config(**kw) -> CDVAEConfig:
    base = dict(hidden=16, latent=8, encoder_layers=2, decoder_layers=2, rbf=8, cutoff=5.0, max_neighbors=12,
                max_atoms=8, noise_levels=10)
    return CDVAEConfig(**{**base, **kw})


def tiny_cdvae(**kw) -> CDVAE:
    """An untrained tiny CDVAE sampled with a short schedule (4 levels x 2 steps) by default."""
    return CDVAE(tiny_config(**kw), CDVAESamplingConfig(levels=4, steps=2))


def _n_elements(types: torch.Tensor, num_atoms: list[int]) -> list[int]:
    out, s = [], 0
    for n in num_atoms:
        out.append(len(set(types[s:s + n].tolist())))
        s += n
    return out


def test_k_first_draws_the_number_of_elements_from_the_table():
    # a diffuse composition head (ten elements equally likely) but a table that says "always 2 elements"
    probs = torch.zeros(200, 100)
    probs[:, 10:20] = 0.1
    table = [[0.0, 0.0, 1.0]] * 9
    num = torch.full((200,), 6)
    g = torch.Generator().manual_seed(0)
    k_first = sample_composition(probs, num, g, "k-first", table)
    assert set(_n_elements(k_first, [6] * 200)) == {2}
    # CDVAE's rounding spreads the same six atoms over many more elements
    rounded = sample_composition(probs, num, torch.Generator().manual_seed(0), "round")
    assert sum(_n_elements(rounded, [6] * 200)) / 200 > 4


def test_k_first_shares_atoms_in_proportion_with_one_each():
    probs = torch.zeros(1, 100)
    probs[0, [37, 21, 7]] = torch.tensor([0.2, 0.2, 0.6])  # SrTiO3-like
    table = [[0.0, 0.0, 0.0, 1.0]] * 6
    types = sample_composition(probs, torch.tensor([5]), torch.Generator().manual_seed(0), "k-first", table)
    assert sorted(types.tolist()) == [8, 8, 8, 22, 38]
    # k larger than the atoms available is cut to N: every atom then a different element
    one_each = sample_composition(probs, torch.tensor([2]), torch.Generator().manual_seed(1), "k-first",
                                  [[0.0, 0.0, 0.0, 1.0]] * 6)
    assert len(set(one_each.tolist())) == 2


def test_k_first_without_a_table_and_unknown_methods_are_clear_errors():
    probs = torch.full((1, 100), 0.01)
    with pytest.raises(ValueError, match="element_counts"):
        sample_composition(probs, torch.tensor([3]), torch.Generator(), "k-first", [])
    with pytest.raises(ValueError, match="round, per-atom, k-first"):
        sample_composition(probs, torch.tensor([3]), torch.Generator(), "nearest")


def test_per_atom_draws_each_atom_from_p():
    probs = torch.zeros(1, 100)
    probs[0, [0, 1]] = torch.tensor([0.9, 0.1])
    types = sample_composition(probs, torch.tensor([4000]), torch.Generator().manual_seed(0), "per-atom")
    assert abs((types == 1).float().mean().item() - 0.9) < 0.02


def test_element_count_table_rows_are_shares_per_size():
    from pymatgen.core import Lattice, Structure

    lat = Lattice.cubic(4.0)
    nacl = Structure(lat, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    na2 = Structure(lat, ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    bto = Structure(lat, ["Ba", "Ti", "O", "O", "O"], [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    table = element_count_table(crystals_from_structures([nacl, na2, nacl, bto]), max_atoms=5)
    assert len(table) == 6 and table[2][:3] == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert table[5][3] == 1.0
    assert table[3] == [0.0, 0.25, 0.5, 0.25]  # no 3-atom crystal: the share over all of them


@pytest.mark.parametrize("update", ["element-set", "fixed"])
def test_type_updates_keep_the_starting_elements(update):
    torch.manual_seed(0)
    model = tiny_cdvae(element_counts=[[0.0, 0.3, 0.7]] * 9).eval()
    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    sched = langevin_schedule(model, levels=3, steps=1)
    start = langevin(model, z, torch.Generator().manual_seed(1), [], composition="k-first")  # no step: the draw
    out = langevin(model, z, torch.Generator().manual_seed(1), sched, composition="k-first", type_update=update)
    for a, b in zip(start, out):
        if update == "fixed":
            assert torch.equal(a.types, b.types)
        else:
            assert set(b.types.tolist()) <= set(a.types.tolist())
    free = langevin(model, z, torch.Generator().manual_seed(1), sched, composition="k-first", type_update="free")
    assert any(not set(b.types.tolist()) <= set(a.types.tolist()) for a, b in zip(start, free))


# ------------------------------------------------------------------------------ Con-CDVAE conditions
def _bins() -> list[PropertyBins]:
    return [PropertyBins.from_values("heat", torch.linspace(-2, 2, 101).tolist(), 4)]


def test_added_conditioning_starts_as_the_unconditional_model():
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    before = sample(model, 4, seed=2)
    model.add_property_conditioning(_bins())
    assert [c["name"] for c in model.config.property_conditions] == ["heat"]
    after = sample(model, 4, seed=2)
    for a, b in zip(before, after):
        assert torch.equal(a.frac, b.frac) and torch.equal(a.types, b.types)
    # asking for a target works and, untrained, gives the unconditional prior's crystals' shapes
    asked = sample(model, 4, seed=2, targets=["heat=1:"], guidance=2.0)
    assert len(asked) == 4


def test_conditioning_changes_the_latent_prior_and_the_decoder_after_training_steps():
    from structure.cdvae.data import crystals_from_structures as pack
    from tests.test_cdvae import rock_salt, triclinic

    torch.manual_seed(0)
    model = tiny_cdvae(property_dropout=0.0)
    model.add_property_conditioning(_bins())
    crystals = pack([triclinic(), rock_salt()])
    crystals.conditions = torch.tensor([[1], [4]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        loss = model.losses(crystals.batch([0, 1]), torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cond = torch.tensor([[1], [4], [0]])
    emb = model.condition_embedding(cond)
    mu, logvar = model.prior(cond, emb, 3)
    assert mu[0].abs().sum() > 0 and not torch.allclose(mu[0], mu[1])
    assert torch.equal(mu[2], torch.zeros_like(mu[2])) and torch.equal(logvar[2], torch.zeros_like(logvar[2]))
    z = torch.zeros(3, 8)
    zc = model.conditioned_latent(z, emb)
    assert not torch.allclose(zc[0], zc[1]) and torch.equal(zc[2], z[2])


def test_targets_need_a_conditioned_model_and_known_names():
    model = tiny_cdvae().eval()
    with pytest.raises(ValueError, match="not property-conditioned"):
        sample(model, 2, targets=["band_gap=1:3"])
    model.add_property_conditioning(_bins())
    with pytest.raises(ValueError, match="its properties: heat"):
        sample(model, 2, targets=["band_gap=1:3"])


def test_conditioned_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = tiny_cdvae()
    model.add_property_conditioning(_bins(), encoding="continuous")
    with torch.no_grad():
        model.condition_latent.weight.normal_()
    model.save_pretrained(tmp_path / "m")
    again = CDVAE.from_pretrained(tmp_path / "m")
    assert again.config.property_encoding == "continuous"
    a = sample(model.eval(), 3, seed=1, targets=["heat=:0"])
    b = sample(again, 3, seed=1, targets=["heat=:0"])
    assert all(torch.equal(x.frac, y.frac) for x, y in zip(a, b))


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_cli_trains_a_conditioned_model_and_samples_a_target(tmp_path, capsys):
    import pandas as pd

    from composition_lm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    pd.read_csv(PEROV / "val.csv.gz", nrows=24).to_csv(data / "val.csv", index=False)
    common = ["--data", str(data), "--train-split", "val", "--val-split", "none", "--hidden", "16", "--latent", "8",
              "--encoder-layers", "1", "--decoder-layers", "1", "--cutoff", "5", "--batch-size", "8",
              "--warmup-steps", "1", "--eval-every", "3", "--save-every", "3", "--no-progress"]
    assert main(["cdvae", "train", *common, "--max-steps", "3", "--condition-on", "heat_ref", "--condition-bins", "4",
                 "-o", str(tmp_path / "run")]) == 0
    model = CDVAE.from_pretrained(tmp_path / "run" / "model")
    assert model.config.property_conditions[0]["name"] == "heat_ref"
    assert len(model.config.atomic_volumes) == 100 and max(model.config.atomic_volumes) > 0  # fitted in training
    patterns = model.config.stoichiometry_counts  # counted in training over the 24 perovskites
    assert set(patterns) <= {"2,1,1,1", "3,1,1", "1,1,1,1,1", "2,2,1", "3,2"}
    assert sum(patterns.values()) == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "s"
    assert main(["cdvae", "sample", "--model", str(tmp_path / "run" / "model"), "-n", "3", "--levels", "2",
                 "--steps", "1", "--target", "heat_ref=:0", "--guidance", "2", "--composition", "k-first",
                 "--type-update", "element-set", "--volume-weight", "1", "--resample-invalid", "3",
                 "--min-element-share", "0.01", "--min-pattern-share", "0.01", "--latent-temperature", "0.9",
                 "--no-progress",
                 "-o", str(out)]) == 0
    assert len(pd.read_csv(out / "structures.csv")) == 3
    assert "crystals again for an invalid composition" in capsys.readouterr().out  # 3 training steps: few valid
    assert main(["cdvae", "train", *common, "--max-steps", "3", "--condition-on", "nonsense",
                 "-o", str(tmp_path / "r2")]) != 0
    assert "no numeric column nonsense; numeric columns: material_id, heat_all, heat_ref" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- throughput
def test_cached_graphs_give_the_encoder_the_same_edges_and_outputs():
    from pymatgen.core import Lattice, Structure

    from structure.cdvae.data import lattice_matrix, periodic_edges
    from tests.test_cdvae import rock_salt, triclinic

    thin = Structure(Lattice.from_parameters(2.1, 9.0, 11.0, 90, 90, 120), ["Li", "F"], [[0, 0, 0], [0.5, 0.4, 0.3]])
    crystals = crystals_from_structures([triclinic(), rock_salt(), thin, rock_salt(primitive=False)])
    crystals.cache_graphs(5.0, 12, chunk=3)
    rows = torch.tensor([3, 0, 2])
    b = crystals.batch(rows)
    (src, dst), off = b.edges
    (src2, dst2), off2 = periodic_edges(b.frac, lattice_matrix(b.lengths, b.angles), b.num_atoms, 5.0, 12)
    as_set = lambda s, d, o: sorted(zip(s.tolist(), d.tolist(), map(tuple, o.tolist())))  # noqa: E731
    assert as_set(src, dst, off) == as_set(src2, dst2, off2)
    torch.manual_seed(0)
    model = tiny_cdvae(max_atoms=8).eval()
    lat = lattice_matrix(b.lengths, b.angles)
    cached = model.encoder(b.types, b.frac, lat, b.num_atoms, b.batch, b.edges)
    fresh = model.encoder(b.types, b.frac, lat, b.num_atoms, b.batch)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(cached, fresh))


def test_k_first_counts_stay_positive_and_sum_to_n():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 100, generator=g) * 3, -1)
    num = torch.randint(1, 21, (300,), generator=g)
    table = [[0.0] + [1 / 8] * 8] * 21
    types = sample_composition(probs, num, g, "k-first", table)
    assert len(types) == int(num.sum()) and types.min() >= 1


# ------------------------------------------------------------------------------------- PaiNN encoder
def test_painn_encoder_is_invariant_and_sees_angles():
    from pymatgen.core import Lattice, Structure

    from structure.cdvae.data import lattice_matrix
    from tests.test_cdvae import random_rotation, triclinic

    torch.manual_seed(0)
    model = tiny_cdvae(encoder_type="painn").eval()
    c = crystals_from_structures([triclinic()])
    b = c.batch([0])
    lat = lattice_matrix(b.lengths, b.angles)
    mu, _ = model.encoder(b.types, b.frac, lat, b.num_atoms, b.batch)
    rot = random_rotation(3)
    shifted = (b.frac + torch.tensor([0.31, 0.27, 0.9])) % 1.0
    mu2, _ = model.encoder(b.types, shifted, lat @ rot.T, b.num_atoms, b.batch)
    assert torch.allclose(mu, mu2, atol=1e-4)
    # a trimer bent and straight within the cutoff of the two O-H bonds only (H-H >= 1.41 A): the same
    # distances, a different angle, which only the PaiNN encoder tells apart
    def trimer(angle_deg):
        import math
        x = math.cos(math.radians(angle_deg))
        y = math.sin(math.radians(angle_deg))
        return Structure(Lattice.cubic(20.0), ["O", "H", "H"], [[10, 10, 10], [11, 10, 10], [10 + x, 10 + y, 10]],
                         coords_are_cartesian=True)
    for kind, sees in (("painn", True), ("schnet", False)):
        model = tiny_cdvae(encoder_type=kind, cutoff=1.2).eval()
        mus = []
        for angle in (90.0, 180.0):
            b = crystals_from_structures([trimer(angle)]).batch([0])
            mus.append(model.encoder(b.types, b.frac, lattice_matrix(b.lengths, b.angles), b.num_atoms, b.batch)[0])
        assert torch.allclose(mus[0], mus[1], atol=1e-5) != sees, kind
    with pytest.raises(ValueError, match="schnet, painn"):
        tiny_cdvae(encoder_type="dimenet")


def test_reconstruction_match_counts_matches_and_misses():
    from evaluation.structures import reconstruction_match
    from tests.test_cdvae import rock_salt, triclinic

    m = reconstruction_match([rock_salt(), rock_salt(), triclinic()], [rock_salt(5.7), triclinic(), None])
    assert m["n"] == 3 and m["match_rate"] == pytest.approx(1 / 3) and m["rms"] is not None


def test_reconstruct_keeps_the_atom_counts():
    from structure.cdvae.sampling import reconstruct
    from tests.test_cdvae import rock_salt, triclinic

    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    crystals = crystals_from_structures([triclinic(), rock_salt(), triclinic()])
    out = reconstruct(model, crystals, seed=0, batch_size=2, levels=2, steps=1)
    assert [len(c.types) for c in out] == crystals.num_atoms.tolist()


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_two_processes_train_through_accelerate(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): each process takes half of the
    global batch and the prepared model synchronises the gradients."""
    import json
    import os
    import subprocess
    import sys

    import pandas as pd

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    pd.read_csv(PEROV / "val.csv.gz", nrows=32).to_csv(data / "val.csv", index=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "composition_lm.cli", "cdvae", "train", "--data", str(data), "--train-split", "val",
           "--val-split", "none", "--hidden", "16", "--latent", "8", "--encoder-layers", "1", "--decoder-layers", "1",
           "--cutoff", "5", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2",
           "--save-every", "2", "--no-progress", "-o", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4
    assert CDVAE.from_pretrained(tmp_path / "run" / "model").config.trained["steps"] == 4


def test_composition_temperature_sharpens_the_draw():
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    with torch.no_grad():  # a composition head that spreads its mass over many elements
        model.composition_head[-1].weight.normal_(0, 0.3)
    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))

    def mean_elements(t):
        out = langevin(model, z, torch.Generator().manual_seed(1), [], composition="round", composition_temperature=t)
        return sum(len(set(c.types.tolist())) for c in out) / len(out)

    assert mean_elements(0.05) < mean_elements(1.0)
    with pytest.raises(ValueError, match="composition temperature must be a number > 0"):
        langevin(model, z, torch.Generator(), [], composition_temperature=0.0)


def test_composition_redraws_raise_validity_and_keep_k():
    from structure.cdvae.sampling import composition_is_valid

    assert composition_is_valid(torch.tensor([10, 16]))  # NaCl (indices are Z - 1)
    assert not composition_is_valid(torch.tensor([10, 16, 16]))  # NaCl2
    probs = torch.zeros(100, 100)
    probs[:, [2, 10, 11, 18, 7, 8, 16, 15]] = 1 / 8  # Li Na Mg K O F Cl S
    num = torch.full((100,), 6)
    table = [[0.0, 0.0, 0.0, 1.0]] * 9

    def share_valid(retries):
        types = sample_composition(probs, num, torch.Generator().manual_seed(0), "k-first", table, retries=retries)
        crystals = types.view(100, 6) - 1
        assert all(len(set(c.tolist())) == 3 for c in crystals)  # k stays 3
        return sum(composition_is_valid(c) for c in crystals) / 100

    assert share_valid(20) > share_valid(0) + 0.2


def test_training_drops_all_properties_of_a_crystal_at_the_dropout_rate(monkeypatch):
    """Unconditional sampling uses the N(0, I) prior, which only crystals with no property given train."""
    import structure.cdvae.model as model_module

    seen = []
    original = CDVAE.prior

    def spy(self, conditions, embedding, n):
        seen.append(conditions.clone())
        return original(self, conditions, embedding, n)

    monkeypatch.setattr(model_module.CDVAE, "prior", spy)
    from tests.test_cdvae import rock_salt

    torch.manual_seed(0)
    model = tiny_cdvae(property_dropout=0.2)
    bins = [PropertyBins.from_values(n, torch.linspace(-2, 2, 101).tolist(), 4) for n in ("a", "b", "c")]
    model.add_property_conditioning(bins)
    crystals = crystals_from_structures([rock_salt()] * 400)
    crystals.conditions = torch.tensor([[1, 2, 3]] * 400)
    model.losses(crystals.batch(list(range(400))), torch.Generator().manual_seed(0))
    none_given = (seen[0] == 0).all(-1).float().mean().item()
    assert 0.13 < none_given < 0.3  # about 0.2 + 0.8 * 0.2**3, not 0.2**3 = 0.008


def test_a_compiled_decoder_samples_the_same_crystals():
    """CDVAE.compile_decoder (``cdvae sample --compile``) is a speed lever only: same seed, same crystals."""
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    eager = sample(model, 4, seed=3, levels=3, steps=1)
    compiled = sample(model.compile_decoder(), 4, seed=3, levels=3, steps=1)
    assert [c.types.tolist() for c in eager] == [c.types.tolist() for c in compiled]
    for a, b in zip(eager, compiled):
        # fractional coordinates wrap at 1: compare on the circle
        d = (a.frac - b.frac + 0.5) % 1.0 - 0.5
        assert d.abs().max() < 1e-4


def test_atomic_volume_table_recovers_additive_volumes():
    from pymatgen.core import Lattice, Structure

    from structure.cdvae.data import atomic_volume_table, composition_volume

    # cells whose volumes are exactly 10 Å³ per Na and 25 Å³ per Cl: the fit gives both back
    def cell(species, volume):
        sites = [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]][:len(species)]
        return Structure(Lattice.cubic(volume ** (1 / 3)), species, sites)

    crystals = crystals_from_structures([cell(["Na", "Cl"], 35.0), cell(["Na", "Na"], 20.0),
                                         cell(["Cl", "Cl", "Na"], 60.0)])
    table = atomic_volume_table(crystals)
    assert len(table) == 100
    assert table[10] == pytest.approx(10.0, rel=1e-3) and table[16] == pytest.approx(25.0, rel=1e-3)
    assert table[25] == pytest.approx(17.5, rel=1e-3)  # Fe, never seen: the median of the fitted ones
    types = torch.tensor([11, 17, 17, 26])
    assert composition_volume(types, torch.tensor([0, 0, 1, 1]), 2, table).tolist() == \
        pytest.approx([35.0, 42.5], rel=1e-3)


def test_volume_weight_blends_the_cell_toward_the_composition_volume():
    from structure.cdvae.data import composition_volume, lattice_matrix

    table = [15.0] * 100
    torch.manual_seed(0)
    model = tiny_cdvae(element_counts=[[0.0, 0.3, 0.7]] * 9, atomic_volumes=table).eval()
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))

    def volumes(weight):
        out = langevin(model, z, torch.Generator().manual_seed(1), [], composition="k-first", volume_weight=weight)
        lengths, angles = torch.stack([c.lengths for c in out]), torch.stack([c.angles for c in out])
        return torch.linalg.det(lattice_matrix(lengths, angles)).abs(), angles, [len(c.types) for c in out]

    v0, a0, n = volumes(0.0)
    v1, a1, _ = volumes(1.0)
    vh, _, _ = volumes(0.5)
    target = 15.0 * torch.tensor(n, dtype=torch.float)
    assert torch.allclose(v1, target, rtol=1e-4)  # weight 1: exactly the composition's volume
    assert torch.allclose(vh, (v0 * target).sqrt(), rtol=1e-4)  # 0.5: the geometric mean
    assert not torch.allclose(v0, target, rtol=1e-2)  # 0: the lattice head's own cell
    assert torch.equal(a0, a1)  # only the scale changes
    assert composition_volume(torch.tensor([1, 2]), torch.tensor([0, 0]), 1, table).item() == 30.0


def test_volume_weight_errors_are_clear():
    with pytest.raises(ValueError, match="atomic_volumes"):
        tiny_cdvae().eval().sample(2, levels=2, steps=1, volume_weight=0.5)
    with pytest.raises(ValueError, match="volume weight must be in"):
        tiny_cdvae(atomic_volumes=[10.0] * 100).sample(2, levels=2, steps=1, volume_weight=1.5)
    model = tiny_cdvae(element_counts=[[0.0, 0.3, 0.7]] * 9).eval()
    with pytest.raises(ValueError, match="atomic_volumes"):
        model.sample(2, levels=2, steps=1, volume_weight=1.0)


def test_resample_invalid_decodes_invalid_crystals_again_and_keeps_valid_ones():
    from structure.cdvae.sampling import invalid_compositions

    torch.manual_seed(0)
    model = tiny_cdvae().eval()  # untrained: most compositions fail charge neutrality
    kw = dict(seed=3, levels=3, steps=1, composition="per-atom", type_update="fixed", batch_size=25)
    plain_stats, again_stats = {}, {}
    plain = sample(model, 60, stats=plain_stats, **kw)
    again = sample(model, 60, resample_invalid=4, stats=again_stats, **kw)
    bad_plain, bad_again = invalid_compositions(plain), invalid_compositions(again)
    assert plain_stats == {"decoded": 60, "resampled": 0, "still_invalid": len(bad_plain)}
    assert len(bad_plain) >= 10
    assert again_stats["resampled"] >= len(bad_plain)
    assert again_stats["decoded"] == 60 + again_stats["resampled"]
    assert again_stats["still_invalid"] == len(bad_again) < len(bad_plain)
    for i, c in enumerate(plain):  # a crystal valid at the first decode is carried through unchanged
        if i not in bad_plain:  # (all batches are decoded before any crystal again: batch_size 25 here)
            assert torch.equal(again[i].types, c.types) and torch.equal(again[i].frac, c.frac)
    redone = sample(model, 60, resample_invalid=4, **kw)  # the same seed, the same crystals
    assert all(torch.equal(a.frac, b.frac) for a, b in zip(again, redone))
    with pytest.raises(ValueError, match="resample invalid"):
        sample(model, 4, resample_invalid=-1, **kw)


def test_natom_sampler_argmax_takes_the_mode_and_sample_draws_from_the_softmax():
    model = tiny_cdvae().eval()
    last = model.natom_head[-1]
    with torch.no_grad():  # the head says 2 atoms with probability 0.6, 3 with 0.4, whatever z
        last.weight.zero_()
        last.bias.fill_(-30.0)
        last.bias[2], last.bias[3] = torch.log(torch.tensor(0.6)), torch.log(torch.tensor(0.4))
    kw = dict(seed=0, levels=2, steps=1, composition="per-atom", type_update="fixed")
    mode = [len(c.types) for c in sample(model, 400, **kw)]
    drawn = [len(c.types) for c in sample(model, 400, natom_sampler="sample", **kw)]
    assert set(mode) == {2}
    assert set(drawn) == {2, 3} and abs(drawn.count(3) / 400 - 0.4) < 0.07
    model.sampling_config = model.sampling_config.replace(natom_sampler="sample")  # the model's default
    assert [len(c.types) for c in sample(model, 400, **kw)] == drawn
    with pytest.raises(ValueError, match="natom sampler"):
        sample(model, 2, natom_sampler="median", **kw)


def test_impossible_cell_angles_are_pulled_toward_right_angles_and_others_kept():
    from structure.cdvae.data import cell_volume, valid_cell_angles, volume_factor

    angles = torch.tensor([[150.0, 150.0, 150.0],  # no cell: the three angles sum past 360°
                           [60.0, 60.0, 150.0],  # no cell: γ > α + β
                           [90.0, 100.0, 120.0],  # a monoclinic-like cell, kept
                           [float("nan"), 90.0, 90.0]])
    assert volume_factor(angles[:2]).max() == 0
    fixed = valid_cell_angles(angles)
    assert (volume_factor(fixed) >= 0.2).all() and torch.isfinite(fixed).all()
    assert torch.equal(fixed[2], angles[2])
    assert (fixed[0] < 150).all() and (fixed[0] > 90).all()  # pulled toward 90°, not replaced outright
    lengths = torch.full((4, 3), 5.0)
    assert (cell_volume(lengths, fixed) > 0.2 * 125 - 1e-3).all()
    # the lattice head's output goes through it: a head asking for 150/150/150 gives a cell with a volume
    model = tiny_cdvae().eval()
    with torch.no_grad():
        model.lattice_head[-1].weight.zero_()
        model.lattice_head[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e4, 1e4, 1e4]))
    crystals = sample(model, 3, levels=2, steps=1, composition="per-atom", type_update="fixed")
    assert all(c.structure().volume > 1.0 for c in crystals)


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_several_training_splits_are_joined(tmp_path):
    import pandas as pd

    from structure.cdvae.train import CDVAETrainingArguments, load_splits

    rows = pd.read_csv(PEROV / "val.csv.gz", nrows=30)
    rows[:12].to_csv(tmp_path / "a.csv", index=False)
    rows[12:30].to_csv(tmp_path / "b.csv", index=False)
    rows[:5].to_csv(tmp_path / "v.csv", index=False)

    def split(train, val):
        args = CDVAETrainingArguments(data=str(tmp_path), output_dir=str(tmp_path / "out"), train_split=train,
                                      val_split=val, val_fraction=0.1, progress=False, condition_on=["heat_ref"])
        return load_splits(args)

    train, val, note = split("a,b", "v")
    assert len(train) == 30 and len(val) == 5 and note.startswith("train a.csv + b.csv (30)")
    assert train.ids == rows["material_id"].astype(str).tolist()
    assert train.properties.shape == (30, 1)
    assert int(train.num_atoms.sum()) == len(train.frac) == 150
    assert train.structure(29).composition == split("b", "v")[0].structure(17).composition
    train, val, note = split("a,b", "b")  # the validation split among the training ones: a share is held out
    assert (len(train), len(val)) == (27, 3) and "a.csv + b.csv: 27 for training, 3 held out" in note
    with pytest.raises(FileNotFoundError, match="no c.csv"):
        split("a,c", "v")


def test_invalid_compositions_counts_a_rare_number_of_elements_only_when_asked():
    from structure.cdvae.sampling import Crystal, invalid_compositions

    def crystal(*z):
        return Crystal(torch.rand(len(z), 3), torch.tensor(z), torch.ones(3) * 4, torch.ones(3) * 90)

    # element_counts[N][k]: 2-atom crystals are binaries 99.5 % of the time, single-element 0.5 %
    table = [[0.0], [0.0, 1.0], [0.0, 0.005, 0.995]]
    nacl, na2, cl3, nacl_cl = crystal(11, 17), crystal(11, 11), crystal(17, 17, 17), crystal(11, 17, 17)
    crystals = [nacl, na2, cl3, nacl_cl]
    assert invalid_compositions(crystals) == [3]  # CDVAE's validity alone: Na Cl2 is not charge neutral
    # 3-atom crystals never occur in the table (share 0): rare at any share; the 2-atom unary's 0.5 % is not
    # rarer than 0.1 % but is rarer than 1 %
    assert invalid_compositions(crystals, table, 0.001) == [2, 3]
    assert invalid_compositions(crystals, table, 0.01) == [1, 2, 3]
    with pytest.raises(ValueError, match="element_counts"):
        invalid_compositions(crystals, [], 0.01)


def test_min_element_share_decodes_rare_element_counts_again():
    from structure.cdvae.sampling import invalid_compositions

    torch.manual_seed(0)
    # 3-atom crystals: single-element ones never occur in "training", binaries 20 %, ternaries 80 %
    table = [[0.0, 1.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 0.2, 0.8]] * 6
    model = tiny_cdvae(element_counts=table).eval()
    kw = dict(seed=1, levels=3, steps=1, composition="per-atom", type_update="fixed", batch_size=30)
    plain = sample(model, 60, **kw)
    stats: dict = {}
    again = sample(model, 60, resample_invalid=6, min_element_share=0.5, stats=stats, **kw)
    rare_plain = invalid_compositions(plain, table, 0.5)
    assert len(rare_plain) > len(invalid_compositions(plain))  # the share check adds crystals to decode again
    assert stats["resampled"] >= len(rare_plain)
    assert stats["still_invalid"] == len(invalid_compositions(again, table, 0.5)) < len(rare_plain)
    for i, c in enumerate(plain):  # a crystal that passes both checks at the first decode is kept
        if i not in rare_plain:
            assert torch.equal(again[i].types, c.types)
    with pytest.raises(ValueError, match="min element share"):
        sample(model, 4, resample_invalid=1, min_element_share=1.0, **kw)
    with pytest.raises(ValueError, match="element_counts"):
        sample(tiny_cdvae().eval(), 4, resample_invalid=1, min_element_share=0.1, **kw)


def test_stoichiometry_key_and_table():
    from pymatgen.core import Lattice, Structure

    from structure.cdvae.data import stoichiometry_key, stoichiometry_table

    assert stoichiometry_key([8, 22, 8, 56, 8]) == "3,1,1"  # BaTiO3
    assert stoichiometry_key([82, 7, 82, 7, 8]) == "2,2,1"  # Pb2N2O: which elements is left out
    lat = Lattice.cubic(4.0)
    nacl = Structure(lat, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    kbr = Structure(lat, ["K", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    bto = Structure(lat, ["Ba", "Ti", "O", "O", "O"], [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    table = stoichiometry_table(crystals_from_structures([nacl, bto, kbr, nacl]))
    assert table == {"1,1": 0.75, "3,1,1": 0.25} and list(table) == ["1,1", "3,1,1"]  # commonest first


def test_invalid_compositions_counts_a_rare_stoichiometry_pattern_only_when_asked():
    from structure.cdvae.sampling import Crystal, invalid_compositions

    def crystal(*z):
        return Crystal(torch.rand(len(z), 3), torch.tensor(z), torch.ones(3) * 4, torch.ones(3) * 90)

    # Perov-5-like shares: A B X2 Y 57 %, A B X3 28 %, A2 X2 Y 0.8 %; 1,1 and 2,1 never seen
    patterns = {"2,1,1,1": 0.57, "3,1,1": 0.28, "2,2,1": 0.008}
    srtio3 = crystal(38, 22, 8, 8, 8)  # 3,1,1
    ti2n2o = crystal(22, 22, 7, 7, 8)  # 2,2,1, charge neutral (Ti4+ N3- O2-)
    kf = crystal(19, 9)  # 1,1
    nacl2 = crystal(11, 17, 17)  # 2,1, not charge neutral
    crystals = [srtio3, ti2n2o, kf, nacl2]
    assert invalid_compositions(crystals) == [3]  # CDVAE's validity alone
    assert invalid_compositions(crystals, stoichiometry_counts=patterns) == [3]  # a share of 0: never asked
    # patterns absent from the table (share 0) are rare at any share; 2,2,1 (0.8 %) is not rarer than 0.5 %
    # but is rarer than 1 %
    assert invalid_compositions(crystals, stoichiometry_counts=patterns, min_pattern_share=0.005) == [2, 3]
    assert invalid_compositions(crystals, stoichiometry_counts=patterns, min_pattern_share=0.01) == [1, 2, 3]
    with pytest.raises(ValueError, match="stoichiometry_counts"):
        invalid_compositions(crystals, min_pattern_share=0.01)


def test_min_pattern_share_decodes_rare_stoichiometries_again(monkeypatch):
    from structure.cdvae.data import stoichiometry_key
    from structure.cdvae.sampling import invalid_compositions

    torch.manual_seed(0)
    patterns = {"2,1": 0.5, "1,1,1": 0.5}  # "training" has only these two 3-atom patterns
    model = tiny_cdvae(stoichiometry_counts=patterns).eval()
    kw = dict(seed=1, levels=3, steps=1, composition="per-atom", type_update="fixed", batch_size=30)
    plain = sample(model, 60, **kw)
    stats: dict = {}
    again = sample(model, 60, resample_invalid=6, min_pattern_share=0.1, stats=stats, **kw)
    rare_plain = invalid_compositions(plain, stoichiometry_counts=patterns, min_pattern_share=0.1)
    assert len(rare_plain) > len(invalid_compositions(plain))  # the pattern check adds crystals to decode again
    assert stats["resampled"] >= len(rare_plain)
    still = invalid_compositions(again, stoichiometry_counts=patterns, min_pattern_share=0.1)
    assert stats["still_invalid"] == len(still) < len(rare_plain)
    def unseen(crystals) -> int:
        return sum(stoichiometry_key(c.types.tolist()) not in patterns for c in crystals)

    assert unseen(again) < unseen(plain)
    for i, c in enumerate(plain):  # a crystal that passes every check at the first decode is kept
        if i not in rare_plain:
            assert torch.equal(again[i].types, c.types)
    model.sampling_config = model.sampling_config.replace(min_pattern_share=0.1)  # the model's value: the default
    assert [c.types.tolist() for c in sample(model, 60, resample_invalid=6, **kw)] == [
        c.types.tolist() for c in again]
    with pytest.raises(ValueError, match="min pattern share"):
        sample(model, 4, resample_invalid=1, min_pattern_share=1.0, **kw)

    def no_decoding(*a, **k):
        raise AssertionError("decoded before the missing table was reported")

    monkeypatch.setattr("structure.cdvae.sampling.langevin", no_decoding)
    with pytest.raises(ValueError, match="stoichiometry_counts"):  # before any decoding
        sample(tiny_cdvae().eval(), 4, resample_invalid=1, min_pattern_share=0.1, **kw)


def test_symmetrize_moves_near_symmetric_atoms_onto_the_symmetric_cell():
    import numpy as np

    from structure.cdvae.sampling import symmetrize_structure
    from tests.test_cdvae import rock_salt, triclinic

    shaken = rock_salt(primitive=False).copy()  # the 8-atom conventional cell, every atom moved up to 0.03 Å
    rng = np.random.default_rng(0)
    for i in range(len(shaken)):
        shaken.translate_sites([i], rng.uniform(-0.03, 0.03, 3), frac_coords=False)
    assert shaken.get_space_group_info(symprec=0.001)[1] != 225
    out = symmetrize_structure(shaken, 0.2)
    assert out.get_space_group_info(symprec=0.001)[1] == 225  # Fm-3m again, exactly
    assert len(out) == 2 and out.composition.reduced_formula == "NaCl"  # its primitive cell
    assert out.volume == pytest.approx(shaken.volume / 4, rel=0.02)
    assert symmetrize_structure(shaken, 0.0) is shaken  # 0: as decoded
    assert symmetrize_structure(shaken, 0.01).get_space_group_info(symprec=0.001)[1] != 225  # below the shake
    odd = triclinic()
    assert symmetrize_structure(odd, 0.1).composition.reduced_composition == odd.composition.reduced_composition
    with pytest.raises(ValueError, match="tolerance"):
        symmetrize_structure(odd, -0.1)
    model = tiny_cdvae().eval()
    plain = model.sample(4, seed=0, levels=2, steps=1)
    sym = model.sample(4, seed=0, levels=2, steps=1, symmetrize=0.5)
    assert all(s.composition.reduced_composition == p.composition.reduced_composition for s, p in zip(sym, plain))


def test_snap_cell_angles_sets_near_special_angles_exactly():
    from structure.cdvae.data import volume_factor
    from structure.cdvae.sampling import snap_cell_angles

    angles = torch.tensor([[88.0, 93.5, 118.0], [61.0, 70.0, 95.5], [119.0, 121.0, 118.5]])
    out = snap_cell_angles(angles, 5.0)
    assert out[0].tolist() == [90.0, 90.0, 120.0]
    assert out[1].tolist() == [60.0, 70.0, 95.5]  # 70 and 95.5 are more than 5 degrees from any special angle
    # (120, 120, 120) makes no cell: pulled toward 90 degrees until it does
    assert bool((volume_factor(out[2:]) > 0).all()) and not torch.equal(out[2], torch.tensor([120.0] * 3))
    assert torch.equal(snap_cell_angles(angles, 0.0), angles)  # 0: the head's angles
    assert snap_cell_angles(angles, 1.0)[0].tolist() == angles[0].tolist()  # none within 1 degree
    with pytest.raises(ValueError, match="between 0 and 15"):
        snap_cell_angles(angles, 16.0)


def test_sampling_with_snapped_angles_places_atoms_in_the_snapped_cell():
    from structure.cdvae.sampling import SPECIAL_ANGLES

    model = tiny_cdvae().eval()
    kw = dict(seed=0, levels=2, steps=1)
    plain = model.sample(6, **kw)
    snapped = model.sample(6, snap_angles=15.0, **kw)
    special = torch.tensor(SPECIAL_ANGLES)
    near = 0
    for p, s in zip(plain, snapped):
        assert len(p) == len(s) and p.composition == s.composition  # the same latents and compositions
        for a_plain, a_snap in zip(p.lattice.angles, s.lattice.angles):
            gap = float((special - a_plain).abs().min())
            if gap <= 15.0:
                near += 1
                assert float((special - a_snap).abs().min()) < 1e-3
            else:
                assert a_snap == pytest.approx(a_plain, abs=1e-3)
    assert near > 0  # the untrained head's angles do come near 90
    model.sampling_config = model.sampling_config.replace(snap_angles=15.0)  # the model's value is the default
    assert [s.lattice.angles for s in model.sample(6, **kw)] == [s.lattice.angles for s in snapped]
    with pytest.raises(ValueError, match="between 0 and 15"):
        model.sample(2, snap_angles=-1.0, **kw)
