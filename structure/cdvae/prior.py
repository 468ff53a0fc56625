"""The latent prior that unconditional sampling draws from.

A VAE is trained to match each posterior to N(0, I), but with CDVAE's small KL weight (beta = 0.01) the
posteriors of the training crystals do not fill N(0, I): latents drawn from it land partly where the
decoder has seen no crystal. Ex-post density estimation (Ghosh et al., "From variational to deterministic
autoencoders", ICLR 2020) fits a density to the encoder's posterior means after training and samples
from that instead; here a Gaussian mixture with full covariances.

:func:`posterior_means` encodes a crystal set, :func:`fit_gaussian_mixture` fits the mixture (scikit-learn's
EM) and returns a :class:`GaussianMixturePrior`, a module whose parameters are buffers, so they travel in
the model's safetensors. Drawing from it takes the sampler's ``torch.Generator`` (same seed, same latents).
"""

from __future__ import annotations

import torch
from torch import nn

PRIORS = ("standard", "gmm")


class GaussianMixturePrior(nn.Module):
    """``components`` Gaussians over a ``dim``-dimensional latent space: mixture weights (K,), means
    (K, D) and the lower Cholesky factors of the covariances (K, D, D)."""

    def __init__(self, components: int, dim: int):
        super().__init__()
        if components < 1:
            raise ValueError(f"a Gaussian mixture needs at least one component, got {components}")
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("scale_tril", torch.eye(dim).repeat(components, 1, 1))

    @property
    def components(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
        """``n`` latents (n, D): a component by its weight, then its mean plus its Cholesky factor times
        standard normal noise (times ``temperature``: below 1, nearer the component's mean)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, self.means.shape[1]), generator=generator)
        return self.means[k] + temperature * torch.einsum("nij,nj->ni", self.scale_tril[k], eps)


@torch.no_grad()
def posterior_means(model, crystals, batch_size: int = 512, progress: bool = False) -> torch.Tensor:
    """The encoder's posterior means (N, latent) of ``crystals`` (:class:`~structure.cdvae.data.Crystals`)."""
    from tqdm.auto import tqdm

    from structure.cdvae.data import lattice_matrix

    model.eval()
    out = []
    for start in tqdm(range(0, len(crystals), batch_size), desc="encoding", unit="batch", disable=not progress):
        b = crystals.batch(list(range(start, min(start + batch_size, len(crystals)))))
        mu, _ = model.encoder(b.types, b.frac, lattice_matrix(b.lengths, b.angles), b.num_atoms, b.batch)
        out.append(mu)
    return torch.cat(out)


def fit_gaussian_mixture(latents: torch.Tensor, components: int, seed: int = 0,
                         reg_covar: float = 1e-5) -> GaussianMixturePrior:
    """A :class:`GaussianMixturePrior` fitted by EM to ``latents`` (N, D): full covariances, k-means
    start, ``reg_covar`` added to each covariance's diagonal (keeps it positive definite)."""
    from sklearn.mixture import GaussianMixture

    x = latents.detach().double().cpu().numpy()
    if len(x) < 2 * components:
        raise ValueError(f"{len(x)} latents are too few for {components} mixture components")
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=reg_covar, random_state=seed).fit(x)
    prior = GaussianMixturePrior(components, x.shape[1])
    prior.weights.copy_(torch.as_tensor(gmm.weights_ / gmm.weights_.sum()))
    prior.means.copy_(torch.as_tensor(gmm.means_))
    prior.scale_tril.copy_(torch.linalg.cholesky(torch.as_tensor(gmm.covariances_)))
    return prior


def fit_latent_prior(model, data: str, components: int = 20, seed: int = 0, cache_dir: str | None = None,
                     progress: bool = False) -> dict:
    """Fit ``model``'s Gaussian-mixture prior to the posterior means of the crystals in ``data`` (a
    CDVAE-style CSV: its training split), install it as the sampling default and record where it came from
    in ``model.config.trained["latent_prior"]``. Returns that record."""
    from pathlib import Path

    from structure.cdvae.data import load_crystals

    crystals = load_crystals(data, cache_dir, progress=progress)
    latents = posterior_means(model, crystals, progress=progress)
    model.set_latent_prior(fit_gaussian_mixture(latents, components, seed=seed))
    record = {"data": Path(data).name, "crystals": len(crystals), "components": components, "seed": seed}
    model.config.trained = {**model.config.trained, "latent_prior": record}
    return record
