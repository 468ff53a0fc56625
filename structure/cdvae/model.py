"""CDVAE (Xie et al., ICLR 2022): a crystal diffusion variational autoencoder, in plain PyTorch.

Pieces, each a separate module:

* :class:`Encoder` — a periodic, invariant message-passing network (SchNet-style continuous-filter
  convolutions over Gaussian expansions of interatomic distances, neighbours across periodic
  boundaries) pooled per crystal into the mean and log-variance of the latent ``z``. CDVAE used
  DimeNet++; distances alone make this encoder blind to some angular differences, which the
  benchmark numbers in the model cards measure.
* property heads on ``z`` (:class:`CDVAE`): number of atoms (classification over 1..max_atoms), the
  lattice (lengths / N^(1/3) and angles, standardised, regression), the composition (one distribution
  over elements per crystal).
* :class:`ScoreNetwork` — the decoder: an EGNN-style network on the periodic graph of the noisy crystal,
  conditioned on ``z`` and the noise level. Node features are invariant (atom type, ``z``, log sigma);
  edges carry Gaussian expansions of distances; the coordinate output is a sum over neighbours of unit
  vectors times learned scalars, so it rotates with the crystal, ignores translations and respects
  periodicity (edges come from :func:`~structure.cdvae.data.periodic_edges`). It predicts per-atom
  Cartesian noise directions (the score times sigma) and atom-type logits.

Losses (:meth:`CDVAE.losses`) are CDVAE's: atom count, lattice, composition, coordinate denoising score
matching over geometric noise levels, type denoising, KL; their weights sit in :class:`CDVAEConfig`.
Sampling (annealed Langevin dynamics) is in :mod:`structure.cdvae.sampling`.

One typed config per model; a checkpoint (``model.safetensors`` + ``config.json``) carries it, lattice
statistics included, so sampling needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.conditioning import (ENCODINGS, PropertyBins, condition_module, drop_conditions, embed_conditions,
                                     null_conditions)
from evaluation.io import atomic_path, write_json
from structure.cdvae.prior import GaussianMixturePrior
from structure.cdvae.sampling import sample, symmetrize_structure
from structure.cdvae.sampling_config import SAMPLING_CONFIG_NAME, CDVAESamplingConfig
from structure.cdvae.data import (MAX_Z, edge_vectors, lattice_matrix, lattice_targets, length_scale,
                                  min_image_displacement, periodic_edges, sigma_levels, valid_cell_angles)

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = ("cdvae-mp20", "cdvae-perov5")


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder, or the folder of a shipped model named ``cdvae-mp20`` / ``cdvae-perov5``."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in SHIPPED:
        shipped = PRETRAINED / str(name_or_path)
        if shipped.is_dir():
            return shipped
        raise FileNotFoundError(f"the shipped model {name_or_path} is not in this installation ({shipped})")
    raise FileNotFoundError(f"{name_or_path}: no such model folder (shipped models: {', '.join(SHIPPED)})")


@dataclass
class CDVAEConfig:
    hidden: int = 128
    latent: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 4
    encoder_type: str = "schnet"  # "schnet" (distances) or "painn" (distances and directions: angles)
    rbf: int = 32
    cutoff: float = 7.0
    max_neighbors: int = 20
    max_atoms: int = 20
    # noise levels (geometric, largest first) for coordinates (Å) and atom types, as in CDVAE
    sigma_begin: float = 10.0
    sigma_end: float = 0.01
    noise_levels: int = 50
    type_sigma_begin: float = 5.0
    type_sigma_end: float = 0.01
    # loss weights (CDVAE's defaults)
    cost_natom: float = 1.0
    cost_lattice: float = 10.0
    cost_composition: float = 1.0
    cost_coord: float = 10.0
    cost_type: float = 1.0
    beta: float = 0.01
    # standardisation of the lattice targets (lengths / N^(1/3), angles); set from the training data
    lattice_mean: list[float] = field(default_factory=lambda: [1.0] * 3 + [90.0] * 3)
    lattice_std: list[float] = field(default_factory=lambda: [1.0] * 3 + [10.0] * 3)
    # training-data tables the sampler reads (its settings live in CDVAESamplingConfig, sampling_config.json):
    # element_counts[N][k]: share of training crystals of N atoms with k distinct elements (the k-first
    # composition sampler draws k from it; min_element_share reads it); data.element_count_table
    element_counts: list[list[float]] = field(default_factory=list)
    # stoichiometry_counts[pattern]: share of training crystals with that stoichiometry pattern (element
    # multiplicities, largest first: "2,2,1"; min_pattern_share reads it); data.stoichiometry_table
    stoichiometry_counts: dict[str, float] = field(default_factory=dict)
    # Å³ per atom of each element (data.atomic_volume_table): the composition's volume that volume_weight blends in
    atomic_volumes: list[float] = field(default_factory=list)
    # components of the fitted Gaussian-mixture latent prior (structure.cdvae.prior; 0: none fitted)
    latent_prior_components: int = 0
    # Con-CDVAE property conditioning: PropertyBins of each property (evaluation.conditioning), their
    # encoding, and the probability that training drops a property's condition (classifier-free guidance)
    property_conditions: list[dict] = field(default_factory=list)
    property_encoding: str = "bins"
    property_dropout: float = 0.1
    # free-form provenance (dataset, training run, metrics)
    trained: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def property_bins(self) -> list[PropertyBins]:
        return [PropertyBins.from_dict(c) for c in self.property_conditions]

    @classmethod
    def from_dict(cls, d: dict) -> CDVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CDVAE config keys: {', '.join(unknown)}")
        return cls(**d)


def mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_act:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class GaussianRBF(nn.Module):
    """Distances → Gaussian expansion times a cosine envelope that reaches 0 at the cutoff."""

    def __init__(self, n: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n), persistent=False)
        self.gamma = 0.5 / (cutoff / (n - 1)) ** 2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        env = 0.5 * (torch.cos(math.pi * d / self.cutoff) + 1.0) * (d < self.cutoff)
        # the exponent is capped at 30 so that no value is subnormal (subnormal floats make CPU matrix
        # products ~50x slower); exp(-30) ~ 1e-13 is zero for every practical purpose
        return torch.exp(-(self.gamma * (d[:, None] - self.centers) ** 2).clamp(max=30.0)) * env[:, None]


def _aggregate(messages: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, messages.shape[1], dtype=messages.dtype, device=messages.device).index_add_(0, index, messages)


class _Graph:
    """A batch's periodic graph: edges, vectors, distances."""

    def __init__(self, frac, lattice, num_atoms, batch, cutoff, max_neighbors, edges=None):
        self.edge_index, offsets = edges if edges is not None else periodic_edges(frac, lattice, num_atoms, cutoff,
                                                                                  max_neighbors)
        self.vec = edge_vectors(frac, lattice, batch, self.edge_index, offsets)
        self.dist = self.vec.norm(dim=-1).clamp(min=1e-6)
        self.n = len(frac)


class _CrystalEncoder(nn.Module):
    """What both encoders share: the element embedding, the distance expansion, and the read-out of the
    mean atom features into the latent mean and log-variance."""

    def __init__(self, cfg: CDVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(MAX_Z, cfg.hidden)
        self.rbf = GaussianRBF(cfg.rbf, cfg.cutoff)
        self.readout = mlp([cfg.hidden, cfg.hidden, 2 * cfg.latent])

    def read_out(self, h: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor):
        pooled = _aggregate(h, batch, len(num_atoms)) / num_atoms[:, None].float()
        mu, logvar = self.readout(pooled).chunk(2, dim=-1)
        return mu, logvar


class Encoder(_CrystalEncoder):
    """Periodic SchNet-style encoder → (mu, logvar) per crystal."""

    def __init__(self, cfg: CDVAEConfig):
        super().__init__(cfg)
        h = cfg.hidden
        self.filters = nn.ModuleList(nn.Linear(cfg.rbf, h) for _ in range(cfg.encoder_layers))
        self.inputs = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(cfg.encoder_layers))
        self.updates = nn.ModuleList(mlp([h, h, h]) for _ in range(cfg.encoder_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.encoder_layers))

    def forward(self, types, frac, lattice, num_atoms, batch, edges=None):
        """``edges``: the batch's periodic graph when cached (:class:`~structure.cdvae.data.GraphCache`)."""
        g = _Graph(frac, lattice, num_atoms, batch, self.cfg.cutoff, self.cfg.max_neighbors, edges)
        src, dst = g.edge_index
        rbf = self.rbf(g.dist)
        h = self.embed(types - 1)
        for filt, inp, upd, norm in zip(self.filters, self.inputs, self.updates, self.norms):
            msg = inp(norm(h))[src] * filt(rbf)
            h = h + upd(_aggregate(msg, dst, g.n) / self.cfg.max_neighbors)
        return self.read_out(h, batch, num_atoms)


class PaiNNEncoder(_CrystalEncoder):
    """Periodic PaiNN-style encoder (Schütt et al. 2021) → (mu, logvar) per crystal: each atom carries
    invariant features and equivariant vector features; messages along an edge mix them with the edge's
    direction, so angles between bonds reach the invariant read-out (the SchNet-style :class:`Encoder`
    sees distances only). ``encoder_type="painn"`` in the config."""

    def __init__(self, cfg: CDVAEConfig):
        super().__init__(cfg)
        h = cfg.hidden
        layers = range(cfg.encoder_layers)
        self.messages = nn.ModuleList(mlp([h, h, 3 * h]) for _ in layers)
        self.filters = nn.ModuleList(nn.Linear(cfg.rbf, 3 * h) for _ in layers)
        self.mix = nn.ModuleList(nn.Linear(h, 2 * h, bias=False) for _ in layers)
        self.updates = nn.ModuleList(mlp([2 * h, h, 3 * h]) for _ in layers)
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in layers)

    def forward(self, types, frac, lattice, num_atoms, batch, edges=None):
        g = _Graph(frac, lattice, num_atoms, batch, self.cfg.cutoff, self.cfg.max_neighbors, edges)
        src, dst = g.edge_index
        h = self.cfg.hidden
        rbf = self.rbf(g.dist)
        unit = (g.vec / g.dist[:, None])[:, :, None]  # (E, 3, 1)
        s = self.embed(types - 1)
        v = torch.zeros(g.n, 3, h, dtype=s.dtype, device=s.device)
        scale = 1.0 / self.cfg.max_neighbors
        for message, filt, mix, update, norm in zip(self.messages, self.filters, self.mix, self.updates, self.norms):
            # message: invariant and vector parts from the source atom, gated by the edge's distance
            x = message(norm(s))[src] * filt(rbf)
            ds, dvv, dvs = x.split(h, dim=-1)
            s = s + _aggregate(ds, dst, g.n) * scale
            dv = v[src] * dvv[:, None, :] + unit * dvs[:, None, :]
            v = v + _aggregate(dv.reshape(len(src), 3 * h), dst, g.n).reshape(g.n, 3, h) * scale
            # update: rotate-invariant products of the vector channels feed the invariant ones
            uv, vv = mix(v).split(h, dim=-1)
            a = update(torch.cat([s, torch.sqrt((vv ** 2).sum(1) + 1e-8)], -1))
            avv, asv, ass = a.split(h, dim=-1)
            v = v + avv[:, None, :] * uv
            s = s + asv * (uv * vv).sum(1) + ass
        return self.read_out(s, batch, num_atoms)


class ScoreNetwork(nn.Module):
    """EGNN-style periodic decoder: (z, sigma, noisy crystal) → per-atom Cartesian noise estimate
    (rotation-equivariant) and atom-type logits (invariant)."""

    def __init__(self, cfg: CDVAEConfig):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.embed = nn.Embedding(MAX_Z, h)
        self.cond = mlp([cfg.latent + 16, h, h])
        self.rbf = GaussianRBF(cfg.rbf, cfg.cutoff)
        # edge messages silu(A h_i + B h_j + C rbf_ij) * (D rbf_ij): A and B act on nodes, so no dense
        # layer runs per edge (edges outnumber atoms 20 to 1)
        self.targets = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.decoder_layers))
        self.sources = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(cfg.decoder_layers))
        self.radial = nn.ModuleList(nn.Linear(cfg.rbf, 2 * h, bias=False) for _ in range(cfg.decoder_layers))
        self.nodes = nn.ModuleList(mlp([2 * h, h, h]) for _ in range(cfg.decoder_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.decoder_layers))
        self.coord = nn.Linear(h, 1, bias=False)
        self.types = mlp([h, h, MAX_Z])

    @staticmethod
    def noise_features(sigma: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(8, device=sigma.device, dtype=sigma.dtype)
        x = torch.log(sigma)[:, None] * torch.exp(-freqs * math.log(2.0))[None] * 2.0
        return torch.cat([torch.sin(x), torch.cos(x)], -1)

    def forward(self, z, sigma, types, frac, lattice, num_atoms, batch):
        g = _Graph(frac, lattice, num_atoms, batch, self.cfg.cutoff, self.cfg.max_neighbors)
        src, dst = g.edge_index
        rbf = self.rbf(g.dist)
        h = self.embed(types - 1) + self.cond(torch.cat([z, self.noise_features(sigma)], -1))[batch]
        msg = None
        for tgt, srcl, radial, node, norm in zip(self.targets, self.sources, self.radial, self.nodes, self.norms):
            hn = norm(h)
            pre, gate = radial(rbf).chunk(2, dim=-1)
            msg = F.silu(tgt(hn)[dst] + srcl(hn)[src] + pre) * gate
            h = h + node(torch.cat([hn, _aggregate(msg, dst, g.n) / self.cfg.max_neighbors], -1))
        unit = g.vec / g.dist[:, None]
        eps = _aggregate(unit * self.coord(msg), dst, g.n)
        return eps, self.types(h)


ENCODERS = {"schnet": Encoder, "painn": PaiNNEncoder}


class CDVAE(nn.Module):
    """Encoder + property heads + score-network decoder; see the module docstring."""

    def __init__(self, config: CDVAEConfig | None = None, sampling_config: CDVAESamplingConfig | None = None):
        super().__init__()
        self.config = cfg = config or CDVAEConfig()
        h = cfg.hidden
        if cfg.encoder_type not in ENCODERS:
            raise ValueError(f"unknown encoder_type {cfg.encoder_type!r}; choose from {', '.join(ENCODERS)}")
        self.encoder = ENCODERS[cfg.encoder_type](cfg)
        self.decoder = ScoreNetwork(cfg)
        self.natom_head = mlp([cfg.latent, h, h, cfg.max_atoms + 1])
        self.lattice_head = mlp([cfg.latent, h, h, 6])
        self.composition_head = mlp([cfg.latent, h, h, MAX_Z])
        self.register_buffer("sigmas", sigma_levels(cfg.sigma_begin, cfg.sigma_end, cfg.noise_levels), persistent=False)
        self.register_buffer("type_sigmas", sigma_levels(cfg.type_sigma_begin, cfg.type_sigma_end, cfg.noise_levels),
                             persistent=False)
        self.register_buffer("lattice_mean", torch.tensor(cfg.lattice_mean), persistent=False)
        self.register_buffer("lattice_std", torch.tensor(cfg.lattice_std), persistent=False)
        self._init_conditioning(cfg.property_bins(), cfg.property_encoding, zero=False)
        self.latent_prior = (GaussianMixturePrior(cfg.latent_prior_components, cfg.latent)
                             if cfg.latent_prior_components else None)
        #: how this model is sampled by default (``sampling_config.json``); :meth:`sample` overrides per call
        self.sampling_config = sampling_config or CDVAESamplingConfig()

    def set_latent_prior(self, prior: GaussianMixturePrior | None) -> None:
        """Install a fitted Gaussian-mixture prior (:func:`structure.cdvae.prior.fit_gaussian_mixture`) and
        make it the sampling default, or, with ``None``, return to N(0, I)."""
        if prior is not None and prior.means.shape[1] != self.config.latent:
            raise ValueError(f"the prior is {prior.means.shape[1]}-dimensional, the latent space {self.config.latent}")
        self.latent_prior = prior
        self.sampling_config = self.sampling_config.replace(prior="standard" if prior is None else "gmm")
        self.config.latent_prior_components = 0 if prior is None else prior.components

    def draw_latents(self, n: int, generator: torch.Generator, prior: str | None = None,
                     temperature: float | None = None) -> torch.Tensor:
        """``n`` latents for unconditional sampling from ``prior`` (default: the sampling config's): ``standard``
        N(0, I) or ``gmm``, the fitted mixture; their noise scaled by ``temperature`` (default: the sampling
        config's ``latent_temperature``)."""
        settings = self.sampling_config.replace(**{k: v for k, v in (("prior", prior),
                                                                     ("latent_temperature", temperature))
                                                   if v is not None})
        prior, temperature = settings.prior, settings.latent_temperature
        if prior == "standard":
            return temperature * torch.randn((n, self.config.latent), generator=generator)
        if self.latent_prior is None:
            raise ValueError("this model has no fitted latent prior: run `composition-gen cdvae fit-prior` first, "
                             "or sample with --prior standard")
        return self.latent_prior.sample(n, generator, temperature)

    # ------------------------------------------------------------------------ Con-CDVAE conditions
    def _init_conditioning(self, bins: list[PropertyBins], encoding: str, zero: bool) -> None:
        """One embedding per property (``hidden`` wide; "not given" embeds to zero), their sum mapped
        into the latent space (added to ``z`` before the heads and the decoder) and a prior network
        (the condition's mean and log-variance of ``z``). ``zero``: start the latent map and the prior's
        last layer at zero (the embeddings keep their random start, or no gradient would reach either), so
        a model extended for fine-tuning first behaves exactly like the unconditional original."""
        cfg = self.config
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown condition encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
        self.property_embeddings = nn.ModuleList(condition_module(b.n_bins + 1, cfg.hidden, encoding) for b in bins)
        self.condition_latent = nn.Linear(cfg.hidden, cfg.latent, bias=False) if bins else None
        self.prior_network = mlp([cfg.hidden, cfg.hidden, 2 * cfg.latent]) if bins else None
        if bins and zero:
            with torch.no_grad():
                self.condition_latent.weight.zero_()
                self.prior_network[-1].weight.zero_()
                self.prior_network[-1].bias.zero_()

    def add_property_conditioning(self, bins: list[PropertyBins], encoding: str = "bins",
                                  dropout: float | None = None) -> None:
        """Extend an unconditional model with property conditions to fine-tune it (``cdvae train
        --init-from MODEL --condition-on ...``); the new layers start at zero output."""
        if self.config.property_conditions:
            if [b.name for b in bins] != [c["name"] for c in self.config.property_conditions]:
                raise ValueError("this model is already conditioned on "
                                 f"{[c['name'] for c in self.config.property_conditions]}")
            return
        self.config.property_conditions = [b.as_dict() for b in bins]
        self.config.property_encoding = encoding
        if dropout is not None:
            self.config.property_dropout = dropout
        self._init_conditioning(bins, encoding, zero=True)
        self.to(self.lattice_mean.device)

    def condition_embedding(self, conditions: torch.Tensor | None) -> torch.Tensor | None:
        """``(B, hidden)``: the sum of the properties' embeddings of ``conditions`` (``(B, P)`` bin ids or
        ranks), or None for an unconditional call or a model without conditions."""
        return embed_conditions(self.property_embeddings, conditions)

    def prior(self, conditions: torch.Tensor | None, embedding: torch.Tensor | None,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the latent prior p(z | condition): N(0, I) for crystals with no
        property given (or an unconditional call), the prior network's output otherwise."""
        zeros = torch.zeros(n, self.config.latent, device=self.lattice_mean.device)
        if embedding is None:
            return zeros, zeros
        given = torch.isfinite(conditions) if conditions.is_floating_point() else conditions != 0
        mu, logvar = (self.prior_network(embedding) * given.any(-1, keepdim=True).to(embedding.dtype)).chunk(2, dim=-1)
        return mu, logvar

    def conditioned_latent(self, z: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """The latent the heads and the decoder read: ``z`` plus the condition mapped into latent space."""
        return z if embedding is None else z + self.condition_latent(embedding)

    def compile_decoder(self) -> CDVAE:
        """``torch.compile`` the score network (shapes vary with the batch's atoms and edges, so dynamic);
        the weights' names do not change. The first steps pay for the compilation (~15 s on a CPU), after
        which each decoder pass is ~1.5-1.8x faster on CPU: worth it for training and for samples of a few
        hundred crystals or more. Needs a C compiler. Returns the model."""
        self.decoder.compile(dynamic=True)
        return self

    # ------------------------------------------------------------------------------------ heads
    def lattice_from_z(self, z: torch.Tensor, num_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted lengths (Å) and angles (degrees; clamped to 30..150, and a triple that makes no cell
        pulled toward 90°: :func:`~structure.cdvae.data.valid_cell_angles`) for crystals of ``num_atoms``."""
        raw = self.lattice_head(z) * self.lattice_std + self.lattice_mean
        lengths = (raw[:, :3] * length_scale(num_atoms)[:, None]).clamp(min=1.0)
        return lengths, valid_cell_angles(raw[:, 3:].clamp(30.0, 150.0))

    # ----------------------------------------------------------------------------------- losses
    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses (:meth:`losses`): calling the model, as a ``DistributedDataParallel``
        wrapper does, synchronises gradients across processes."""
        return self.losses(batch, generator)

    def losses(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """CDVAE's training losses on a batch (``collate`` output); ``loss`` is their weighted sum."""
        cfg = self.config
        dev = batch.frac.device
        n_crystals = len(batch.num_atoms)
        lat = lattice_matrix(batch.lengths, batch.angles)
        cached = getattr(batch, "edges", None)  # the crystals' own graphs, when the training set cached them
        mu, logvar = self.encoder(batch.types, batch.frac, lat, batch.num_atoms, batch.batch, cached)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=dev)
        conditions = batch.conditions if getattr(batch, "conditions", None) is not None else None
        if conditions is not None and len(self.property_embeddings):
            conditions = drop_conditions(conditions, cfg.property_dropout, generator)
            # and every property of a crystal at once with the same probability: with independent drops
            # alone, three properties leave the N(0, I) prior of unconditional sampling 0.1 % of the
            # crystals (the mp20-cond run of benchmarks/cdvae_conditioning.md sampled worse unconditionally)
            all_dropped = torch.rand(len(conditions), generator=generator, device=dev) < cfg.property_dropout
            conditions = torch.where(all_dropped[:, None], null_conditions(conditions), conditions)
        embedding = self.condition_embedding(conditions)
        prior_mu, prior_logvar = self.prior(conditions, embedding, n_crystals)
        z = self.conditioned_latent(z, embedding)

        natom = F.cross_entropy(self.natom_head(z), batch.num_atoms.clamp(max=cfg.max_atoms))
        target_lat = lattice_targets(batch.lengths, batch.angles, batch.num_atoms)
        lattice = F.mse_loss(self.lattice_head(z), (target_lat - self.lattice_mean) / self.lattice_std)
        comp_logits = self.composition_head(z)
        composition = F.cross_entropy(comp_logits[batch.batch], batch.types - 1)

        level = torch.randint(cfg.noise_levels, (n_crystals,), generator=generator, device=dev)
        sigma, type_sigma = self.sigmas[level], self.type_sigmas[level]
        # types: mix the true one-hot with the predicted composition, weight type_sigma; sample
        probs = F.one_hot(batch.types - 1, MAX_Z).float() + \
            comp_logits.detach().softmax(-1)[batch.batch] * type_sigma[batch.batch, None]
        noisy_types = torch.multinomial(probs, 1, generator=generator).squeeze(1) + 1
        # coordinates: Cartesian Gaussian noise of scale sigma, wrapped back into the cell
        noise = torch.randn(batch.frac.shape, generator=generator, device=dev) * sigma[batch.batch, None]
        noisy_frac = batch.frac + torch.einsum("nk,nkl->nl", noise, torch.linalg.inv(lat)[batch.batch])
        noisy_frac = noisy_frac - torch.floor(noisy_frac)
        eps, type_logits = self.decoder(z, sigma, noisy_types, noisy_frac, lat, batch.num_atoms, batch.batch)
        target = min_image_displacement(noisy_frac, batch.frac, lat, batch.batch) / sigma[batch.batch, None]
        coord = 0.5 * ((eps - target) ** 2).sum(-1).mean()
        types = F.cross_entropy(type_logits, batch.types - 1)
        # KL(q(z | crystal) || p(z | condition)); p = N(0, I) without a condition (CDVAE's KL)
        kld = (0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp()
                      - 1).sum(-1)).mean()
        loss = (cfg.cost_natom * natom + cfg.cost_lattice * lattice + cfg.cost_composition * composition
                + cfg.cost_coord * coord + cfg.cost_type * types + cfg.beta * kld)
        return {"loss": loss, "natom": natom, "lattice": lattice, "composition": composition, "coord": coord,
                "type": types, "kld": kld}

    # --------------------------------------------------------------------------------- save/load
    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        write_json(folder / "config.json", {"model_type": "cdvae", **self.config.to_dict()})
        self.sampling_config.save(folder / SAMPLING_CONFIG_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> CDVAE:
        """A saved model: a folder (``config.json`` + ``model.safetensors``) or a shipped name
        (``cdvae-perov5``, ``cdvae-mp20``). Only safetensors and JSON are read; nothing is unpickled."""
        from safetensors.torch import load_file

        folder = resolve_model(name_or_path)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder}: not a CDVAE model folder (needs config.json and model.safetensors)")
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.pop("model_type", "cdvae") != "cdvae":
            raise ValueError(f"{folder}: config.json is not a CDVAE config")
        legacy, cfg = CDVAESamplingConfig.from_legacy(cfg)  # a folder written before sampling_config.json
        saved = folder / SAMPLING_CONFIG_NAME
        model = cls(CDVAEConfig.from_dict(cfg), CDVAESamplingConfig.load(saved) if saved.is_file() else legacy)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()

    def sample(self, n: int, seed: int = 0, config: CDVAESamplingConfig | None = None, progress: bool = False,
               stats: dict | None = None, **overrides) -> list:
        """``n`` crystals as pymatgen ``Structure`` s: latents from the prior (or, with ``targets``, from the
        conditional prior of a property-conditioned model), decoded by annealed Langevin dynamics
        (:func:`structure.cdvae.sampling.sample`), each symmetrized when ``symmetrize`` > 0. How: ``config``
        (:class:`~structure.cdvae.sampling_config.CDVAESamplingConfig`; default: :attr:`sampling_config`) with
        ``overrides`` (its fields: ``levels``, ``composition``, ``targets``, ``guidance``, ...). ``stats``
        receives how many crystals were decoded again. The same seed gives the same crystals.

        >>> from structure.cdvae import CDVAE
        >>> crystals = CDVAE.from_pretrained("cdvae-perov5").sample(2, seed=0, levels=5, steps=1)
        >>> len(crystals), type(crystals[0]).__name__
        (2, 'Structure')
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        config = (config or self.sampling_config).replace(**overrides)
        crystals = sample(self, n, seed=seed, config=config, progress=progress, stats=stats)
        return [symmetrize_structure(c.structure(), config.symmetrize) for c in crystals]

