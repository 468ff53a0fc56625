"""Sampling from CDVAE: z ~ N(0, I) → number of atoms, lattice, composition → random coordinates and
types → annealed Langevin dynamics over the noise levels.

The schedule (:func:`langevin_schedule`), the network (:class:`~structure.cdvae.model.CDVAE`) and the
loop (:func:`langevin`) are separate; the settings are one object
(:class:`~structure.cdvae.sampling_config.CDVAESamplingConfig`, the model's ``sampling_config`` unless given), and one
``torch.Generator`` drives every random draw, so the same seed gives the same crystals. This module does not import
the model's module (it only receives a model), so :class:`~structure.cdvae.model.CDVAE` can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from structure.cdvae.data import (MAX_Z, cell_volume, composition_volume, lattice_matrix, sigma_levels,
                                  stoichiometry_key, to_structure, valid_cell_angles)
from structure.cdvae.sampling_config import (COMPOSITION_SAMPLERS, NATOM_SAMPLERS, TYPE_UPDATES,  # noqa: F401
                                             CDVAESamplingConfig)

if TYPE_CHECKING:
    from structure.cdvae.model import CDVAE


@dataclass
class Crystal:
    """One sampled crystal (fractional coordinates, atomic numbers, lengths in Å, angles in degrees)."""

    frac: torch.Tensor
    types: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor

    def structure(self):
        return to_structure(self.frac, self.types, self.lengths, self.angles)


def _settings(model: CDVAE, config: CDVAESamplingConfig | None, overrides: dict) -> CDVAESamplingConfig:
    return (config or model.sampling_config).replace(**overrides)


def langevin_schedule(model: CDVAE, config: CDVAESamplingConfig | None = None,
                      **overrides) -> list[tuple[float, float]]:
    """(sigma, step size) of every Langevin step: ``levels`` geometric noise levels spanning the
    model's training range, ``steps`` steps each, step size ``step_lr * (sigma / sigma_min)^2``."""
    c, cfg = _settings(model, config, overrides), model.config
    sigmas = sigma_levels(cfg.sigma_begin, cfg.sigma_end, c.levels).tolist()
    return [(s, c.step_lr * (s / sigmas[-1]) ** 2) for s in sigmas for _ in range(c.steps)]


def _round_counts(p: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """CDVAE's rule: round ``p * n`` per element, draw the atoms still missing from the leftover
    probability (unshuffled atomic-number indices)."""
    counts = torch.round(p * n).long()
    while counts.sum() > n:  # rounding up too often: drop from the most over-rounded element
        counts[torch.argmax((counts - p * n) * (counts > 0))] -= 1
    types = torch.repeat_interleave(torch.arange(len(p)), counts)
    missing = n - len(types)
    if missing > 0:
        left = (p - counts.float() / n).clamp(min=0) + 1e-12
        types = torch.cat([types, torch.multinomial(left, missing, replacement=True, generator=generator)])
    return types


def _draw_k(n: int, p: torch.Tensor, k_probs: torch.Tensor, generator: torch.Generator) -> int:
    """The number of distinct elements of a crystal of ``n`` atoms: drawn from ``k_probs`` (index = k),
    at most ``n`` and at most the elements ``p`` allows."""
    k = int(torch.multinomial(k_probs, 1, generator=generator)) if k_probs.sum() > 0 else 1
    return max(1, min(k, n, int((p > 0).sum())))


def _k_first_counts(p: torch.Tensor, n: int, k: int, generator: torch.Generator, jitter: bool = False) -> torch.Tensor:
    """k distinct elements drawn with probability ``p`` (without replacement), then the n atoms shared
    among them in proportion to their ``p`` with at least one atom each (largest remainder; with
    ``jitter``, the atoms beyond one each drawn from those proportions instead)."""
    chosen = torch.multinomial(p, k, replacement=False, generator=generator)
    share = p[chosen] / p[chosen].sum() * n
    if jitter:
        extra = torch.multinomial(share, n - k, replacement=True, generator=generator) if n > k else chosen[:0]
        return torch.repeat_interleave(chosen, 1 + torch.bincount(extra, minlength=k))
    counts = share.floor().long().clamp(min=1)
    while counts.sum() > n:  # the minimum of one atom each overshot: take from the most over-served
        counts[torch.argmax((counts - share).masked_fill(counts <= 1, -torch.inf))] -= 1
    while counts.sum() < n:
        counts[torch.argmax(share - counts)] += 1
    return torch.repeat_interleave(chosen, counts)


def composition_is_valid(types: torch.Tensor) -> bool:
    """CDVAE's composition validity (SMACT charge neutrality and Pauling test, protocol ``cdvae``) of
    atom-type indices (atomic number - 1)."""
    from evaluation.composition import ELEMENTS
    from evaluation.structures import amounts_validity

    counts = torch.bincount(types).tolist()
    return amounts_validity({ELEMENTS[z]: c for z, c in enumerate(counts) if c})[0]


def sample_composition(probs: torch.Tensor, num_atoms: torch.Tensor, generator: torch.Generator,
                       method: str = "round", element_counts: list | None = None, retries: int = 0) -> torch.Tensor:
    """Atomic numbers of ``num_atoms[b]`` atoms per crystal from per-crystal element probabilities
    (B, MAX_Z), shuffled within each crystal. ``method``:

    * ``round`` (CDVAE): round ``p * N`` per element, draw the missing atoms from the leftover
      probability;
    * ``per-atom``: every atom drawn independently from ``p``;
    * ``k-first``: the number of distinct elements first, from ``element_counts`` (row N, column k: how
      often crystals of N atoms have k elements in the training data, :func:`element_count_table`),
      then which elements and how many atoms of each (:func:`_k_first_counts`).

    ``retries``: a composition that fails CDVAE's composition validity (:func:`composition_is_valid`) is
    drawn again, up to this many times (k-first keeps its k and jitters the counts), and the last draw is
    kept when none passes: validity enforced inside the sampler, as the formula models do.
    """
    if method not in COMPOSITION_SAMPLERS:
        raise ValueError(f"unknown composition sampler {method!r} (choose from {', '.join(COMPOSITION_SAMPLERS)})")
    if method == "k-first" and not element_counts:
        raise ValueError("the k-first composition sampler needs the model's element_counts table "
                         "(scripts/add_element_counts.py adds it to a model trained without it)")
    table = torch.tensor(element_counts, dtype=torch.float) if method == "k-first" else None
    out = []
    for p, n in zip(probs, num_atoms.tolist()):
        k = _draw_k(n, p, table[min(n, len(table) - 1)], generator) if method == "k-first" else 0
        for attempt in range(retries + 1):
            if method == "round":
                types = _round_counts(p, n, generator)
            elif method == "per-atom":
                types = torch.multinomial(p, n, replacement=True, generator=generator)
            else:
                types = _k_first_counts(p, n, k, generator, jitter=attempt > 0)
            if attempt == retries or composition_is_valid(types):
                break
        out.append(types[torch.randperm(n, generator=generator)] + 1)
    return torch.cat(out)


def blend_volume(lengths: torch.Tensor, angles: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """``lengths`` (B, 3) scaled, angles kept, so that each cell's volume becomes V^(1 - weight) *
    ``target``^weight, V the cell's own volume."""
    return lengths * (target / cell_volume(lengths, angles)).pow(weight / 3.0)[:, None]


#: the cell angles crystals take exactly far more often than any angle near them (MP-20 training split: of the angles
#: of its cells up to 8 atoms, 35 % are 90.0 ± 0.5°, 30 % 60.0 ± 0.5°, 6 % 120.0 ± 0.5°)
SPECIAL_ANGLES = (60.0, 90.0, 120.0)


def snap_cell_angles(angles: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``angles`` (B, 3, degrees) with each angle within ``tolerance`` degrees of 60, 90 or 120° set to it
    (0: unchanged). The lattice head regresses the mean of the cells it cannot tell apart, so it smears the
    exact angles crystals share over a few degrees (MP-20's training cells of up to 8 atoms: 35 % of their angles
    are 90.0 ± 0.5°, of the model's 4 %); snapping before the atoms are placed lets the decoder place
    them in the ideal cell. A triple that then makes no cell is pulled toward 90° (:func:`valid_cell_angles`)."""
    if not 0 <= tolerance <= 15:
        raise ValueError(f"the angle-snapping tolerance must be between 0 and 15 degrees, got {tolerance}")
    if tolerance == 0:
        return angles
    targets = torch.tensor(SPECIAL_ANGLES, dtype=angles.dtype)
    nearest = targets[(angles[..., None] - targets).abs().argmin(-1)]
    return valid_cell_angles(torch.where((angles - nearest).abs() <= tolerance, nearest, angles))


def _guided(conditional: torch.Tensor, unconditional: torch.Tensor | None, guidance: float | None) -> torch.Tensor:
    """Classifier-free guidance: ``u + guidance * (c - u)``; the conditional output alone without it."""
    if unconditional is None or guidance is None:
        return conditional
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def langevin(model: CDVAE, z: torch.Tensor, generator: torch.Generator, schedule: list[tuple[float, float]],
             progress=None, conditions: torch.Tensor | None = None, num_atoms: torch.Tensor | None = None,
             config: CDVAESamplingConfig | None = None, **overrides) -> list[Crystal]:
    """Decode latents ``z`` (B, latent) into crystals by annealed Langevin dynamics over ``schedule``
    (:func:`langevin_schedule`), with the settings of ``config`` (default: the model's) and ``overrides``.

    ``composition`` picks the :func:`sample_composition` method of the starting atom types, drawn from
    the composition head's softmax at ``composition_temperature`` (below 1 it sharpens) and redrawn up to
    ``composition_retries`` times while it fails CDVAE's composition validity;
    ``type_update`` what the decoder's type logits do at each step: ``free`` (CDVAE: every atom takes
    the most likely of all elements), ``element-set`` (the most likely of the elements the crystal
    started with) or ``fixed`` (types stay as drawn; only coordinates move). ``conditions`` (B, P): property
    conditions of a Con-CDVAE model, read by the heads and the decoder through :meth:`CDVAE.conditioned_latent`;
    with ``guidance`` every head and every decoder step is also evaluated without them and the two are combined
    (classifier-free guidance, two decoder passes per step). ``num_atoms``: the crystals' atom counts when known
    (reconstruction), else predicted from ``z`` by the number-of-atoms head: its most likely count
    (``natom_sampler`` ``argmax``, CDVAE) or a count drawn from its softmax (``sample``). ``volume_weight`` w: once
    the composition is drawn, the cell is scaled to the volume V_z^(1 - w) V_c^w, V_z the lattice head's and V_c
    the composition's (:func:`~structure.cdvae.data.composition_volume`); 0 leaves the lattice head's cell as it
    is. ``snap_angles`` (degrees): the head's cell angles within it of 60, 90 or 120° set to it before any atom is
    placed (:func:`snap_cell_angles`)."""
    c, cfg = _settings(model, config, overrides), model.config
    guidance = c.guidance
    embedding = model.condition_embedding(conditions)
    zc = model.conditioned_latent(z, embedding)
    zu = z if (embedding is not None and guidance is not None) else None

    def heads(head):
        return _guided(head(zc), None if zu is None else head(zu), guidance)

    if num_atoms is None:
        logits = heads(model.natom_head)
        num_atoms = (logits.argmax(-1) if c.natom_sampler == "argmax" else
                     torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)).clamp(min=1)
    lengths, angles = model.lattice_from_z(zc, num_atoms)
    if zu is not None:
        lu, au = model.lattice_from_z(zu, num_atoms)
        lengths = _guided(lengths, lu, guidance).clamp(min=1.0)
        angles = valid_cell_angles(_guided(angles, au, guidance).clamp(30.0, 150.0))
    angles = snap_cell_angles(angles, c.snap_angles)
    types = sample_composition((heads(model.composition_head) / c.composition_temperature).softmax(-1), num_atoms,
                               generator, c.composition, cfg.element_counts, c.composition_retries)
    batch = torch.repeat_interleave(torch.arange(len(z)), num_atoms)
    if c.volume_weight > 0:
        if not cfg.atomic_volumes:
            raise ValueError("a volume weight above 0 needs the model's atomic_volumes table "
                             "(scripts/add_element_counts.py adds it to a model trained without it)")
        lengths = blend_volume(lengths, angles, composition_volume(types, batch, len(z), cfg.atomic_volumes),
                               c.volume_weight)
    allowed = torch.zeros(len(z), MAX_Z, dtype=torch.bool)
    allowed[batch, types - 1] = True
    frac = torch.rand((int(num_atoms.sum()), 3), generator=generator)
    lattice = lattice_matrix(lengths, angles)
    inv = torch.linalg.inv(lattice)[batch]
    for sigma, step in schedule:
        sig = torch.full((len(z),), sigma)
        eps, logits = model.decoder(zc, sig, types, frac, lattice, num_atoms, batch)
        if zu is not None:
            eps_u, logits_u = model.decoder(zu, sig, types, frac, lattice, num_atoms, batch)
            eps, logits = _guided(eps, eps_u, guidance), _guided(logits, logits_u, guidance)
        move = step * eps / sigma + (2 * step) ** 0.5 * torch.randn(frac.shape, generator=generator)
        frac = (frac + torch.einsum("nk,nkl->nl", move, inv)) % 1.0
        if c.type_update == "free":
            types = logits.argmax(-1) + 1
        elif c.type_update == "element-set":
            types = logits.masked_fill(~allowed[batch], float("-inf")).argmax(-1) + 1
        if progress is not None:
            progress.update(1)
    first = (torch.cumsum(num_atoms, 0) - num_atoms).tolist()
    return [Crystal(frac[s:s + n], types[s:s + n], lengths[b], angles[b])
            for b, (s, n) in enumerate(zip(first, num_atoms.tolist()))]


def symmetrize_structure(structure, tolerance: float):
    """``structure`` (pymatgen) replaced by its symmetrized primitive standard cell, the symmetry found at
    ``tolerance`` Å (spglib's symprec): atoms within the tolerance of a symmetric arrangement are moved onto it.
    0 returns the structure as it is; so does a failed symmetry search (odd cells), and a cell whose
    symmetrization changes the composition's proportions (not expected, but never worth a silent change)."""
    if tolerance < 0:
        raise ValueError(f"the symmetrize tolerance must be >= 0 Å, got {tolerance}")
    if tolerance == 0:
        return structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        out = SpacegroupAnalyzer(structure, symprec=tolerance).get_primitive_standard_structure()
    except Exception:  # spglib can fail on degenerate cells; the decoded crystal is kept
        return structure
    same = out.composition.reduced_composition == structure.composition.reduced_composition
    return out if same and len(out) > 0 else structure


def invalid_compositions(crystals: list[Crystal], element_counts: list | None = None,
                         min_element_share: float = 0.0, stoichiometry_counts: dict | None = None,
                         min_pattern_share: float = 0.0) -> list[int]:
    """Indices of the crystals whose composition fails CDVAE's composition validity or

    * with ``min_element_share`` > 0, whose number of distinct elements k is rarer than that share among the
      training crystals of its size N (``element_counts[N][k]``,
      :func:`structure.cdvae.data.element_count_table`);
    * with ``min_pattern_share`` > 0, whose stoichiometry pattern (element multiplicities, largest first:
      :func:`structure.cdvae.data.stoichiometry_key`) is rarer than that share among the training crystals
      (``stoichiometry_counts``, :func:`structure.cdvae.data.stoichiometry_table`); a pattern absent from it
      counts 0."""
    for name, share, table_name, table in (("min_element_share", min_element_share, "element_counts", element_counts),
                                           ("min_pattern_share", min_pattern_share, "stoichiometry_counts",
                                            stoichiometry_counts)):
        if share and not table:
            raise ValueError(f"{name} needs the model's {table_name} table "
                             "(scripts/add_element_counts.py adds it to a model trained without it)")

    def rare_count(c: Crystal) -> bool:
        n, k = len(c.types), len(set(c.types.tolist()))
        row = element_counts[n] if n < len(element_counts) else []
        return (row[k] if k < len(row) else 0.0) < min_element_share

    def rare_pattern(c: Crystal) -> bool:
        return stoichiometry_counts.get(stoichiometry_key(c.types.tolist()), 0.0) < min_pattern_share

    return [i for i, c in enumerate(crystals)
            if not composition_is_valid(c.types - 1) or (min_element_share > 0 and rare_count(c))
            or (min_pattern_share > 0 and rare_pattern(c))]


def _latents(model: CDVAE, size: int, generator: torch.Generator, prior: str | None,
             conditions: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``size`` latents: from the conditional prior p(z | condition) given ``conditions``, else from ``prior``;
    the noise scaled by ``temperature``."""
    if conditions is None:
        return model.draw_latents(size, generator, prior, temperature)
    z = torch.randn((size, model.config.latent), generator=generator)
    mu, logvar = model.prior(conditions, model.condition_embedding(conditions), size)
    return mu + temperature * torch.exp(0.5 * logvar) * z


def check_sampling(model: CDVAE, config: CDVAESamplingConfig) -> None:
    """What ``config`` asks of the model, checked before any crystal is decoded: the training tables that
    k-first, the volume weight and the share rules need, a fitted prior for ``gmm``, property conditions for
    targets."""
    cfg = model.config
    needs = [("the k-first composition sampler", config.composition == "k-first", "element_counts",
              cfg.element_counts),
             ("a volume weight above 0", config.volume_weight > 0, "atomic_volumes", cfg.atomic_volumes),
             ("min_element_share", config.min_element_share > 0, "element_counts", cfg.element_counts),
             ("min_pattern_share", config.min_pattern_share > 0, "stoichiometry_counts", cfg.stoichiometry_counts)]
    for what, asked, table_name, table in needs:
        if asked and not table:
            raise ValueError(f"{what} needs the model's {table_name} table "
                             "(scripts/add_element_counts.py adds it to a model trained without it)")
    if config.prior == "gmm" and model.latent_prior is None:
        raise ValueError("this model has no fitted latent prior: run `composition-gen cdvae fit-prior` first, "
                         "or sample with --prior standard")
    if config.targets and not cfg.property_conditions:
        raise ValueError("this CDVAE model is not property-conditioned (train with --condition-on); "
                         f"cannot ask for {', '.join(config.targets)}")


def sample(model: CDVAE, n: int, seed: int = 0, config: CDVAESamplingConfig | None = None, progress: bool = False,
           stats: dict | None = None, **overrides) -> list[Crystal]:
    """``n`` crystals, ``batch_size`` at a time, with the settings of ``config`` (default: the model's) and
    ``overrides``; the same seed gives the same crystals. Unconditional latents come from ``prior``
    (:meth:`CDVAE.draw_latents`); with ``targets`` (property windows, ``name=lo:hi``) of a Con-CDVAE model each
    crystal asks for a bin (or rank) inside each window, drawn with its training share, and its latent comes from
    the conditional prior p(z | condition). ``latent_temperature`` scales the latent noise of either: below 1 the
    latents stay nearer the prior's centre. The decoding settings are :func:`langevin`'s.

    ``resample_invalid`` R: up to R rounds in which every crystal whose decoded composition fails CDVAE's
    composition validity is decoded again from a new latent (with the same property condition); one still invalid
    after R rounds is kept. ``min_element_share`` p counts a crystal as invalid in those rounds also when its number
    of distinct elements is rarer than p among the training crystals of its size; ``min_pattern_share`` q when its
    stoichiometry pattern is rarer than q among the training crystals (:func:`invalid_compositions`). ``stats``, a
    dict, receives ``decoded`` (crystals decoded in all), ``resampled`` (decoded again) and ``still_invalid``."""
    from tqdm.auto import tqdm

    from evaluation.conditioning import parse_target, sample_conditions

    c = _settings(model, config, overrides)
    model.eval()
    check_sampling(model, c)  # what the settings need of the model, before any decoding
    targets = [parse_target(t) for t in (c.targets or [])]
    rounds, batch_size = c.resample_invalid, c.batch_size

    def rejected(crystals: list[Crystal]) -> list[int]:
        return invalid_compositions(crystals, model.config.element_counts, c.min_element_share,
                                    model.config.stoichiometry_counts, c.min_pattern_share)

    generator = torch.Generator().manual_seed(seed)
    schedule = langevin_schedule(model, c)
    counts = {"decoded": 0, "resampled": 0, "still_invalid": 0}

    def decode(conditions: torch.Tensor | None, size: int, bar) -> list[Crystal]:
        z = _latents(model, size, generator, c.prior, conditions, c.latent_temperature)
        counts["decoded"] += size
        return langevin(model, z, generator, schedule, bar, conditions, config=c)

    out: list[Crystal] = []
    conditions: list[torch.Tensor] = []  # per batch, for decoding a crystal again with its own condition
    with tqdm(total=-(-n // batch_size) * len(schedule), desc="Langevin", unit="step", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            batch_conditions = sample_conditions(model.config, targets, size, generator) if targets else None
            out += decode(batch_conditions, size, bar)
            if batch_conditions is not None:
                conditions.append(batch_conditions)
        # every batch is decoded before any crystal is decoded again, so the first decode of a seed is the same
        # whatever the number of rounds
        all_conditions = torch.cat(conditions) if conditions else None
        bad = rejected(out) if rounds or stats is not None else []  # the check only when read
        for _ in range(rounds):
            if not bad:
                break
            bar.total += -(-len(bad) // batch_size) * len(schedule)
            still = []
            for start in range(0, len(bad), batch_size):
                idx = bad[start:start + batch_size]
                again = decode(None if all_conditions is None else all_conditions[idx], len(idx), bar)
                for i, crystal in zip(idx, again):
                    out[i] = crystal
                still += [idx[j] for j in rejected(again)]
            counts["resampled"] += len(bad)
            bad = still
        counts["still_invalid"] = len(bad)
    if stats is not None:
        stats.update(counts)
    return out


@torch.no_grad()
def reconstruct(model: CDVAE, crystals, seed: int = 0, batch_size: int = 250,
                config: CDVAESamplingConfig | None = None, **overrides) -> list[Crystal]:
    """Encode ``crystals`` (:class:`~structure.cdvae.data.Crystals`) and decode their posterior means
    by the same Langevin dynamics as sampling (``config`` and ``overrides`` as in :func:`langevin`), with each
    crystal's true number of atoms (CDVAE's reconstruction task; :func:`evaluation.structures.reconstruction_match`
    scores it)."""
    from structure.cdvae.data import lattice_matrix as lat_of

    c = _settings(model, config, overrides)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    schedule = langevin_schedule(model, c)
    out: list[Crystal] = []
    for start in range(0, len(crystals), batch_size):
        b = crystals.batch(list(range(start, min(start + batch_size, len(crystals)))))
        mu, _ = model.encoder(b.types, b.frac, lat_of(b.lengths, b.angles), b.num_atoms, b.batch)
        out += langevin(model, mu, generator, schedule, None, num_atoms=b.num_atoms, config=c)
    return out


def to_rows(structures: list) -> list:
    """Sampled structures (pymatgen ``Structure`` s, or :class:`Crystal` s) as output rows
    (:class:`structure.io.Row`): formula, site count, volume, status ``generated``, or
    ``invalid_structure`` with the reason (atoms closer than 0.5 Å, or a volume under 0.1 Å³: CDVAE's
    structure-validity rule)."""
    from evaluation.structures import structure_validity
    from structure.io import Row

    rows = []
    for i, s in enumerate(structures):
        s = s.structure() if isinstance(s, Crystal) else s
        ok, reason = structure_validity(s)
        rows.append(Row(i, s.composition.reduced_formula, rank=1, n_sites=len(s), volume=round(s.volume, 4),
                        status="generated" if ok else "invalid_structure", reason=reason, structure=s))
    return rows
