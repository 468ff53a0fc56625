"""CDVAE: periodic graphs, equivariance, losses, sampling, checkpoints, training loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from structure.cdvae.data import (collate, crystals_from_structures, edge_vectors, lattice_matrix, lattice_parameters,
                                  lattice_statistics, load_crystals, min_image_displacement, periodic_edges)
from structure.cdvae.model import CDVAE, CDVAEConfig
from structure.cdvae.sampling_config import CDVAESamplingConfig
from structure.cdvae.sampling import langevin_schedule, sample, sample_composition

SHARED = Path(__file__).resolve().parents[2] / "shared"
PEROV = SHARED / "data" / "structures" / "perov_5"


def rock_salt(a: float = 5.64, primitive: bool = True):
    from pymatgen.core import Lattice, Structure

    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.get_primitive_structure() if primitive else s


def triclinic():
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.from_parameters(3.9, 4.6, 5.3, 78, 101, 95), ["Ti", "O", "O", "Ba"],
                     [[0.1, 0.2, 0.3], [0.6, 0.1, 0.8], [0.35, 0.7, 0.05], [0.8, 0.55, 0.5]])


def tiny_config(**kw) -> CDVAEConfig:
    base = dict(hidden=16, latent=8, encoder_layers=2, decoder_layers=2, rbf=8, cutoff=5.0, max_neighbors=12,
                max_atoms=8, noise_levels=10)
    return CDVAEConfig(**{**base, **kw})


def tiny_cdvae(**kw) -> CDVAE:
    """An untrained tiny CDVAE sampled with a short schedule (4 levels x 2 steps) by default."""
    return CDVAE(tiny_config(**kw), CDVAESamplingConfig(levels=4, steps=2))


def random_rotation(seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.linalg.det(q))


# ---------------------------------------------------------------------------------------- lattices
def test_lattice_matrix_matches_pymatgen_and_inverts():
    from pymatgen.core import Lattice

    c = crystals_from_structures([triclinic()])
    lat = lattice_matrix(c.lengths, c.angles)
    ref = Lattice.from_parameters(*c.lengths[0].tolist(), *c.angles[0].tolist()).matrix
    assert np.allclose(lat[0].numpy(), ref, atol=1e-4)
    assert not np.allclose(c.angles[0].numpy(), 90.0)  # a genuinely oblique cell
    lengths, angles = lattice_parameters(lat)
    assert torch.allclose(lengths, c.lengths, atol=1e-4) and torch.allclose(angles, c.angles, atol=1e-3)


# ------------------------------------------------------------------------------------------- edges
def test_rock_salt_neighbours_cross_the_boundaries():
    c = crystals_from_structures([rock_salt()])  # 2-atom primitive cell: every neighbour is an image
    lat = lattice_matrix(c.lengths, c.angles)
    ei, off = periodic_edges(c.frac, lat, c.num_atoms, cutoff=3.0)
    assert torch.bincount(ei[1]).tolist() == [6, 6]  # six Cl around Na and six Na around Cl at a/2
    assert (ei[0] != ei[1]).all()  # each neighbour is the other species
    assert (off.abs().sum(1) > 0).sum() >= 10  # most of them lie in neighbouring cells
    vec = edge_vectors(c.frac, lat, torch.zeros(2, dtype=torch.long), ei, off)
    assert torch.allclose(vec.norm(dim=1), torch.full((12,), 5.64 / 2), atol=1e-3)
    ei, off = periodic_edges(c.frac, lat, c.num_atoms, cutoff=4.1)  # + 12 same-species images at a/sqrt(2)
    assert torch.bincount(ei[1]).tolist() == [18, 18]


@pytest.mark.parametrize("cutoff", [3.0, 5.5])
def test_neighbour_list_matches_pymatgen_on_a_triclinic_batch(cutoff):
    structures = [triclinic(), rock_salt(primitive=False)]
    c = crystals_from_structures(structures)
    lat = lattice_matrix(c.lengths, c.angles)
    batch = torch.repeat_interleave(torch.arange(2), c.num_atoms)
    ei, off = periodic_edges(c.frac, lat, c.num_atoms, cutoff)
    dist = edge_vectors(c.frac, lat, batch, ei, off).norm(dim=1)
    ours, ref = [], []
    for b, s in enumerate(structures):
        s = c.structure(b)
        centers, _, _, d = s.get_neighbor_list(cutoff)
        ref += sorted(np.round(d, 4).tolist())
        mask = batch[ei[1]] == b
        ours += sorted(np.round(dist[mask].numpy(), 4).tolist())
    assert len(ours) == len(ref) and np.allclose(ours, ref, atol=2e-3)


def test_max_neighbors_keeps_the_nearest():
    c = crystals_from_structures([rock_salt()])
    lat = lattice_matrix(c.lengths, c.angles)
    ei, off = periodic_edges(c.frac, lat, c.num_atoms, cutoff=4.1, max_neighbors=6)
    d = edge_vectors(c.frac, lat, torch.zeros(2, dtype=torch.long), ei, off).norm(dim=1)
    assert torch.bincount(ei[1]).tolist() == [6, 6] and torch.allclose(d, torch.full_like(d, 2.82), atol=1e-2)
    ei, _ = periodic_edges(c.frac, lat, c.num_atoms, cutoff=4.1, max_neighbors=7)  # a cut through a shell
    assert torch.bincount(ei[1]).tolist() == [18, 18]  # keeps the whole equidistant shell


def test_min_image_displacement_wraps():
    lat = lattice_matrix(torch.tensor([[4.0, 4.0, 4.0]]), torch.tensor([[90.0, 90.0, 90.0]]))
    d = min_image_displacement(torch.tensor([[0.95, 0.5, 0.5]]), torch.tensor([[0.05, 0.5, 0.5]]), lat,
                               torch.zeros(1, dtype=torch.long))
    assert torch.allclose(d, torch.tensor([[0.4, 0.0, 0.0]]), atol=1e-5)


def test_fast_batch_equals_torch_geometric_collate():
    c = crystals_from_structures([triclinic(), rock_salt(), rock_salt(primitive=False)])
    fast, slow = c.batch([2, 0]), collate([c[2], c[0]])
    for k in ("frac", "types", "lengths", "angles", "num_atoms", "batch"):
        assert torch.equal(getattr(fast, k), getattr(slow, k)), k


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_load_crystals_caches(tmp_path, monkeypatch):
    import pandas as pd

    src = tmp_path / "tiny.csv"
    pd.read_csv(PEROV / "test.csv.gz", nrows=6).to_csv(src, index=False)
    first = load_crystals(src, tmp_path / "cache")
    assert len(first) == 6 and first.num_atoms.tolist() == [5] * 6
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("re-read the CSV instead of the cache")

    monkeypatch.setattr(pd, "read_csv", boom)
    again = load_crystals(src, tmp_path / "cache")
    assert torch.equal(again.frac, first.frac) and again.ids == first.ids


# -------------------------------------------------------------------------------------- symmetries
def _decoder_inputs(seed: int = 0):
    c = crystals_from_structures([triclinic(), rock_salt()])
    b = c.batch([0, 1])
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    return c, b, z, lattice_matrix(b.lengths, b.angles)


def test_rotation_leaves_invariant_outputs_and_rotates_scores():
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    _, b, z, lat = _decoder_inputs()
    rot = random_rotation(1)
    rotated = lat @ rot.T  # every lattice vector rotated
    with torch.no_grad():
        mu, _ = model.encoder(b.types, b.frac, lat, b.num_atoms, b.batch)
        mu_r, _ = model.encoder(b.types, b.frac, rotated, b.num_atoms, b.batch)
        sigma = torch.tensor([0.5, 0.5])
        eps, logits = model.decoder(z, sigma, b.types, b.frac, lat, b.num_atoms, b.batch)
        eps_r, logits_r = model.decoder(z, sigma, b.types, b.frac, rotated, b.num_atoms, b.batch)
    assert torch.allclose(mu, mu_r, atol=1e-4)
    assert torch.allclose(logits, logits_r, atol=1e-4)
    assert torch.allclose(eps @ rot.T, eps_r, atol=1e-4)
    assert eps.abs().max() > 1e-3  # the check is not vacuous


def test_translation_and_periodic_wrapping_change_nothing():
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    _, b, z, lat = _decoder_inputs()
    shifted = (b.frac + torch.tensor([0.37, -0.81, 1.23])) % 1.0
    with torch.no_grad():
        sigma = torch.tensor([0.2, 2.0])
        eps, _ = model.decoder(z, sigma, b.types, b.frac, lat, b.num_atoms, b.batch)
        eps_s, _ = model.decoder(z, sigma, b.types, shifted, lat, b.num_atoms, b.batch)
    assert torch.allclose(eps, eps_s, atol=1e-4)


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_loss_decreases_on_a_tiny_set(tmp_path):
    import pandas as pd

    src = tmp_path / "tiny.csv"
    pd.read_csv(PEROV / "test.csv.gz", nrows=16).to_csv(src, index=False)
    crystals = load_crystals(src)
    stats = lattice_statistics(crystals)
    torch.manual_seed(0)
    model = tiny_cdvae(lattice_mean=stats["mean"], lattice_std=stats["std"])
    batch = crystals.batch(range(16))

    def fixed_loss():
        with torch.no_grad():
            return float(model.losses(batch, torch.Generator().manual_seed(7))["loss"])

    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        loss = model.losses(batch, torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


def test_losses_are_finite_and_named():
    torch.manual_seed(0)
    model = tiny_cdvae()
    _, b, _, _ = _decoder_inputs()
    out = model.losses(b, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "natom", "lattice", "composition", "coord", "type", "kld"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- sampling
def test_sample_composition_respects_counts():
    probs = torch.zeros(3, 100)
    probs[0, 10] = 1.0  # all Na
    probs[1, [37, 21, 7]] = torch.tensor([0.2, 0.2, 0.6])  # SrTiO3-like
    probs[2, [5, 7]] = torch.tensor([0.5, 0.5])
    types = sample_composition(probs, torch.tensor([4, 5, 3]), torch.Generator().manual_seed(0))
    assert len(types) == 12
    assert types[:4].tolist() == [11] * 4
    assert sorted(types[4:9].tolist()) == [8, 8, 8, 22, 38]
    assert set(types[9:].tolist()) <= {6, 8}


def test_same_seed_same_samples_and_valid_shapes():
    torch.manual_seed(0)
    model = tiny_cdvae().eval()
    a = sample(model, 6, seed=3, batch_size=4)
    b = sample(model, 6, seed=3, batch_size=4)
    c = sample(model, 6, seed=4, batch_size=4)
    assert len(a) == 6
    for x, y in zip(a, b):
        assert torch.equal(x.frac, y.frac) and torch.equal(x.types, y.types)
    assert any(not torch.equal(x.frac, y.frac) for x, y in zip(a, c))
    s = a[0].structure()
    assert 1 <= len(s) <= 8 and (s.frac_coords >= 0).all() and (s.frac_coords < 1).all()


def test_langevin_schedule_levels_steps_and_sizes():
    model = tiny_cdvae(sigma_begin=10.0, sigma_end=0.01)
    sched = langevin_schedule(model, levels=3, steps=2)
    assert len(sched) == 6
    sigmas = [s for s, _ in sched]
    assert math.isclose(sigmas[0], 10.0, rel_tol=1e-5) and math.isclose(sigmas[-1], 0.01, rel_tol=1e-4)
    assert math.isclose(sched[0][1], 1e-4 * (10.0 / 0.01) ** 2, rel_tol=1e-4)


def test_save_load_identity(tmp_path):
    torch.manual_seed(0)
    model = tiny_cdvae(lattice_mean=[2.0] * 3 + [90.0] * 3, lattice_std=[0.3] * 3 + [5.0] * 3).eval()
    model.save_pretrained(tmp_path / "m")
    again = CDVAE.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    a, b = sample(model, 3, seed=1), sample(again, 3, seed=1)
    assert all(torch.equal(x.frac, y.frac) and torch.equal(x.lengths, y.lengths) for x, y in zip(a, b))
    with pytest.raises(FileNotFoundError):
        CDVAE.from_pretrained(tmp_path)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        CDVAEConfig.from_dict({"hidden": 8, "hiden": 9})


# ------------------------------------------------------------------------------------------ training
@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_training_resume_is_exact(tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    from structure.cdvae.train import CDVAETrainingArguments, train

    data = tmp_path / "data"
    data.mkdir()
    pd.read_csv(PEROV / "test.csv.gz", nrows=24).to_csv(data / "train.csv", index=False)
    common = dict(data=str(data), val_split=None, hidden=16, latent=8, encoder_layers=1, decoder_layers=1,
                  cutoff=5.0, max_neighbors=8, batch_size=8, max_steps=6, warmup_steps=2, eval_every=3,
                  save_every=3, log_every=1, progress=False)
    straight = train(CDVAETrainingArguments(output_dir=str(tmp_path / "a"), **common))
    train(CDVAETrainingArguments(output_dir=str(tmp_path / "b"), stop_at_step=3, **common))
    resumed = train(CDVAETrainingArguments(output_dir=str(tmp_path / "b"), resume=True, **common))
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("config.json", "README.md", "metrics.json", "training_args.json"):
        assert (straight / name).is_file()
    model = CDVAE.from_pretrained(straight)
    assert model.config.max_atoms == 5 and model.config.trained["steps"] == 6
    with pytest.raises(FileExistsError):
        train(CDVAETrainingArguments(output_dir=str(tmp_path / "a"), **common))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_cli_train_then_sample_writes_the_structure_outputs(tmp_path):
    import zipfile

    import pandas as pd
    from ase.io import read as ase_read

    from composition_lm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    pd.read_csv(PEROV / "test.csv.gz", nrows=20).to_csv(data / "val.csv", index=False)
    rc = main(["cdvae", "train", "--data", str(data), "--train-split", "val", "--val-split", "none",
               "--hidden", "16", "--latent", "8", "--encoder-layers", "1", "--decoder-layers", "1", "--cutoff", "5",
               "--batch-size", "8", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "3",
               "--save-every", "3", "--no-progress", "-o", str(tmp_path / "run")])
    assert rc == 0
    model = tmp_path / "run" / "model"
    assert "composition-gen cdvae train" in CDVAE.from_pretrained(model).config.trained["command"]
    out = tmp_path / "samples"
    assert main(["cdvae", "sample", "--model", str(model), "-n", "5", "--seed", "1", "--levels", "3", "--steps", "1",
                 "--no-progress", "-o", str(out)]) == 0
    table = pd.read_csv(out / "structures.csv")
    assert len(table) == 5 and set(table["status"]) <= {"generated", "invalid_structure"}
    assert table["n_sites"].between(1, 5).all()  # at most the training set's largest cell
    frames = ase_read(out / "structures.extxyz", index=":")
    with zipfile.ZipFile(out / "structures_cif.zip") as zf:
        assert len(zf.namelist()) == 5
    assert len(frames) == 5
    again = tmp_path / "again"
    main(["cdvae", "sample", "--model", str(model), "-n", "5", "--seed", "1", "--levels", "3", "--steps", "1",
          "--no-progress", "-o", str(again)])
    assert (again / "structures.extxyz").read_text() == (out / "structures.extxyz").read_text()


def test_cli_sample_unknown_model_is_a_clear_error(tmp_path, capsys):
    from composition_lm.cli import main

    assert main(["cdvae", "sample", "--model", str(tmp_path / "nope"), "-n", "2", "-o", str(tmp_path / "o")]) == 2
    assert "no such model folder" in capsys.readouterr().err


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_export_checkpoint_gives_the_ema_weights(tmp_path):
    import pandas as pd

    from structure.cdvae.train import CDVAETrainingArguments, export_checkpoint, train

    data = tmp_path / "data"
    data.mkdir()
    pd.read_csv(PEROV / "test.csv.gz", nrows=16).to_csv(data / "train.csv", index=False)
    args = CDVAETrainingArguments(data=str(data), output_dir=str(tmp_path / "run"), val_split=None, hidden=16, latent=8,
                                  encoder_layers=1, decoder_layers=1, cutoff=5.0, batch_size=8, max_steps=2,
                                  warmup_steps=1, eval_every=0, save_every=2, progress=False)
    final = train(args)
    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "step-2", tmp_path / "exp")
    a, b = CDVAE.from_pretrained(final).state_dict(), CDVAE.from_pretrained(exported).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_perov5_model_loads_and_samples_perovskite_cells():
    from structure.cdvae.model import resolve_model

    model = CDVAE.from_pretrained(resolve_model("cdvae-perov5"))
    assert model.config.max_atoms == 5
    assert model.sampling_config.resample_invalid == 5  # issue 19: an invalid composition is decoded again
    assert model.sampling_config.min_element_share == 0.01  # ... and so is a binary (0.6 % of Perov-5's training crystals)
    patterns = model.config.stoichiometry_counts  # the training crystals' stoichiometry patterns
    assert max(patterns, key=patterns.get) == "2,1,1,1" and patterns["2,2,1"] < 0.01
    assert model.sampling_config.min_pattern_share == 0.01  # ... and a rarer stoichiometry (A2X2Y: 0.8 %), since stop 33
    stats: dict = {}
    crystals = sample(model, 4, seed=0, levels=5, steps=1, stats=stats)
    assert all(len(c.types) == 5 for c in crystals)  # the count head learned Perov-5's five-atom cells
    assert stats["decoded"] == 4 + stats["resampled"]
    with pytest.raises(FileNotFoundError, match="shipped"):
        resolve_model("cdvae-nope")


def test_shipped_mp20_model_loads_and_samples_cells_of_up_to_20_atoms():
    from evaluation.structures import structure_validity
    from structure.cdvae.data import stoichiometry_key
    from structure.cdvae.model import resolve_model
    from structure.cdvae.sampling import SPECIAL_ANGLES

    model = CDVAE.from_pretrained(resolve_model("cdvae-mp20"))
    assert model.config.max_atoms == 20 and model.config.trained["total_steps"] == 14000
    # issue 19's defaults: a 30-component mixture prior and the cell scaled toward the composition's volume
    assert model.sampling_config.prior == "gmm" and model.latent_prior.components == 30
    assert model.sampling_config.volume_weight == 0.75 and len(model.config.atomic_volumes) == 100
    assert model.sampling_config.snap_angles == 5.0  # and the head's cell angles within 5 degrees of 60/90/120 snapped
    # since stop 33 a crystal whose stoichiometry pattern no training crystal has is decoded again (<= 5 rounds)
    assert model.sampling_config.resample_invalid == 5 and model.sampling_config.min_pattern_share == 1e-5
    stats: dict = {}
    crystals = sample(model, 8, seed=0, levels=10, steps=1, stats=stats)
    unseen = [c for c in crystals if stoichiometry_key(c.types.tolist()) not in model.config.stoichiometry_counts]
    assert len(unseen) <= stats["still_invalid"] and stats["decoded"] == 8 + stats["resampled"]
    sizes = [len(c.types) for c in crystals]
    assert all(1 <= n <= 20 for n in sizes) and len(set(sizes)) > 1  # MP-20 cells vary in size
    special = torch.tensor(SPECIAL_ANGLES)
    gaps = [float((special - a).abs().min()) for c in crystals for a in c.angles]
    assert all(g < 1e-4 or g > 5.0 for g in gaps) and any(g < 1e-4 for g in gaps)
    assert sum(structure_validity(c.structure())[0] for c in crystals) >= 4
