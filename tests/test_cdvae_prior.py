"""The latent prior of unconditional CDVAE sampling: N(0, I) or a Gaussian mixture fitted to the
training crystals' posterior means (structure.cdvae.prior, `composition-gen cdvae fit-prior`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from structure.cdvae.model import CDVAE, CDVAEConfig
from structure.cdvae.sampling_config import CDVAESamplingConfig
from structure.cdvae.prior import GaussianMixturePrior, fit_gaussian_mixture

PEROV = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures" / "perov_5"


def tiny_model(**kw) -> CDVAE:
    torch.manual_seed(0)
    return CDVAE(CDVAEConfig(hidden=16, latent=4, encoder_layers=1, decoder_layers=1, rbf=8, cutoff=5.0,
                             max_neighbors=12, max_atoms=8, noise_levels=6, **kw),
                 CDVAESamplingConfig(levels=2, steps=1)).eval()


def two_clusters(n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    a = torch.randn((3 * n // 4, 4), generator=g) * 0.1 + torch.tensor([5.0, 0, 0, 0])
    b = torch.randn((n // 4, 4), generator=g) * 0.1 - torch.tensor([0, 5.0, 0, 0])
    return torch.cat([a, b])


def test_a_fitted_mixture_recovers_the_clusters_and_samples_reproducibly():
    prior = fit_gaussian_mixture(two_clusters(), components=2, seed=0)
    order = prior.weights.argsort(descending=True)
    assert prior.weights[order].tolist() == pytest.approx([0.75, 0.25], abs=0.01)
    assert prior.means[order[0], 0].item() == pytest.approx(5.0, abs=0.05)
    assert prior.means[order[1], 1].item() == pytest.approx(-5.0, abs=0.05)
    z = prior.sample(2000, torch.Generator().manual_seed(0))
    assert (z[:, 0] > 2.5).float().mean().item() == pytest.approx(0.75, abs=0.04)
    assert z.std(0)[2].item() == pytest.approx(0.1, abs=0.02)  # each component keeps its own spread
    assert torch.equal(z, prior.sample(2000, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="too few"):
        fit_gaussian_mixture(two_clusters()[:3], components=2)


def test_the_prior_travels_with_the_model_and_is_the_sampling_default(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="no fitted latent prior"):
        model.draw_latents(3, torch.Generator(), "gmm")
    model.set_latent_prior(fit_gaussian_mixture(two_clusters(), components=2))
    assert (model.sampling_config.prior, model.config.latent_prior_components) == ("gmm", 2)
    loaded = CDVAE.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert torch.equal(loaded.latent_prior.means, model.latent_prior.means)
    z = loaded.draw_latents(500, torch.Generator().manual_seed(0))
    assert ((z[:, 0] > 2.5) | (z[:, 1] < -2.5)).all()  # every latent from one of the two clusters
    standard = loaded.draw_latents(500, torch.Generator().manual_seed(0), "standard")
    assert abs(standard.mean().item()) < 0.1
    # sampling draws its unconditional latents there: the same seed and prior give the same crystals
    a = loaded.sample(2, seed=0)
    assert [s.composition for s in a] == [s.composition for s in loaded.sample(2, seed=0)]
    with pytest.raises(ValueError, match="prior must be one of standard, gmm"):
        loaded.sample(2, prior="vamp")
    with pytest.raises(ValueError, match="no fitted latent prior"):
        model.set_latent_prior(None) or model.sample(2, prior="gmm")
    assert isinstance(GaussianMixturePrior(3, 4).sample(5, torch.Generator()), torch.Tensor)


@pytest.mark.skipif(not PEROV.exists(), reason="needs ../shared")
def test_cli_fits_a_prior_and_samples_from_it(tmp_path, capsys):
    import pandas as pd

    from composition_lm.cli import main

    data = tmp_path / "val.csv"
    pd.read_csv(PEROV / "val.csv.gz", nrows=40).to_csv(data, index=False)
    tiny_model().save_pretrained(tmp_path / "m")
    assert main(["cdvae", "fit-prior", "--model", str(tmp_path / "m"), "--data", str(data), "--components", "3",
                 "--cache", str(tmp_path / "cache"), "--no-progress", "-o", str(tmp_path / "g")]) == 0
    assert "fitted a 3-component prior to 40 crystals" in capsys.readouterr().out
    fitted = CDVAE.from_pretrained(tmp_path / "g")
    assert fitted.config.trained["latent_prior"]["crystals"] == 40
    assert fitted.latent_prior.components == 3
    for prior in ("gmm", "standard"):
        out = tmp_path / prior
        assert main(["cdvae", "sample", "--model", str(tmp_path / "g"), "-n", "2", "--prior", prior,
                     "--no-progress", "-o", str(out)]) == 0
        assert len(pd.read_csv(out / "structures.csv")) == 2
    assert main(["cdvae", "sample", "--model", str(tmp_path / "m"), "-n", "2", "--prior", "gmm", "--no-progress",
                 "-o", str(tmp_path / "x")]) != 0
    assert "no fitted latent prior" in capsys.readouterr().err


def test_latent_temperature_scales_the_noise_of_either_prior_about_its_centre():
    model = tiny_model()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    z1 = model.draw_latents(500, g(), "standard", 1.0)
    assert torch.allclose(model.draw_latents(500, g(), "standard", 0.5), 0.5 * z1)
    assert torch.equal(model.draw_latents(500, g(), "standard"), z1)  # the config's default is 1
    model.sampling_config = model.sampling_config.replace(latent_temperature=0.25)  # the model's: the default
    assert torch.allclose(model.draw_latents(500, g(), "standard"), 0.25 * z1)
    prior = fit_gaussian_mixture(two_clusters(), components=2, seed=0)
    model.set_latent_prior(prior)
    far, near = model.draw_latents(2000, g(), "gmm", 1.0), model.draw_latents(2000, g(), "gmm", 0.5)
    assert (near[:, 0] > 2.5).float().mean() == (far[:, 0] > 2.5).float().mean()  # the same components drawn
    assert near.std(0)[2].item() == pytest.approx(0.5 * far.std(0)[2].item(), rel=1e-4)  # half the spread
    with pytest.raises(ValueError, match="latent temperature"):
        model.draw_latents(2, g(), "standard", 0.0)
    with pytest.raises(ValueError, match="latent temperature"):
        model.sample(2, levels=2, steps=1, latent_temperature=-1.0)
    crystals = model.sample(3, seed=0, levels=2, steps=1, latent_temperature=0.5)
    assert len(crystals) == 3
