"""Chemical validity inside the sampler: a validator of token rows and the remasking repair loop.

Element constraints are logit masks (:mod:`composition_lm.sampling`); validity cannot be one, because
it is a property of the whole formula. It is enforced in two steps. While sampling, the token that
completes a row is decoded exactly: if the row fails, that token is drawn again among those that make it
valid. After sampling, as ReMDM (Wang et al. 2025) corrects a masked-diffusion sample, every row that
still fails the chosen protocol (all batches' failing rows pooled) is re-noised to a time ``t`` and
denoised again, a few rounds at most (``t = 1``, the default, re-draws the
failing row whole; ``benchmarks/validity_sampling.md`` measured 0.25, 0.5 and 1, and 1 kept the element
and #elements distributions closest to the raw model's). The pieces:

* :class:`RowValidator` -- a pure function from a batch of token rows to pass/fail and a reason per
  row (the protocol of :mod:`evaluation.validity`, each reduced formula checked once per process);
* :func:`renoise_masked` -- the forward process of the masked sampler applied to a row's content
  (a pure function): each position from 1 to the row's end is masked with probability ``t``;
  :func:`renoise_gaussian` -- the Gaussian forward process ``q(x_k | x_0)`` on the rows' token embeddings;
* :class:`ExactDecoder` -- exact decoding of a row's last revealed token: when a step completes a row
  that fails, one token revealed in that step (the rightmost content token first) is drawn again from
  the denoiser's distribution restricted to the tokens that make the row valid (including [EOS], which
  ends the row there). A row that passed is untouched, so each completed row's last-drawn token follows
  ``p(v | row valid)`` exactly (over the ``top_k`` most probable tokens);
* :func:`repair` -- the loop: validate, re-noise and re-denoise the failing rows, validate again,
  until every row passes or ``rounds`` are spent. Rows are corrected in place; those that still fail
  are returned as they are (the caller flags and counts them), never dropped. With ``t = 1`` a failing
  row is re-drawn whole in place, in the first half of the budget only as a row with its original number
  of elements: the samples keep the model's #elements distribution instead of the valid subset's.

The model-specific "denoise from time t" steps live in :mod:`composition_lm.sampling`
(:func:`~composition_lm.sampling.denoise_masked`, :func:`~composition_lm.sampling.denoise_gaussian`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from composition_lm.decoding import decode_samples
from composition_lm.sampling_config import VALIDITY_CHOICES
from composition_lm.tokenizer import ELEMENT_OFFSET, EOS, MASK, PAD
from evaluation.composition import ELEMENTS

__all__ = ["VALIDITY_CHOICES", "ExactDecoder", "RepairStats", "RowValidator", "ValiditySettings", "element_counts", "element_presence",
           "live_element_presence",
           "renoise_gaussian", "renoise_masked", "repair", "row_ends"]

@dataclass
class ValiditySettings:
    """How the sampler enforces validity: ``protocol`` (``cdvae``, ``smact`` or ``none``), the repair
    budget ``rounds`` and the first round's re-noising level ``t`` (the share of a failing row's content
    re-masked, or the Gaussian chain's time to which its embeddings are re-noised; :meth:`level`).
    With ``keep_elements`` a repaired row is accepted only when it has as many distinct elements as the
    row it replaces (in the first half of the rounds; the second half takes any valid row), so the
    number-of-elements distribution of the samples stays the model's own (valid formulas have more
    elements on average than invalid ones: without it, enforcing validity shifts that distribution;
    ``benchmarks/validity_sampling.md``). With ``exact`` the sampler also decodes each row's last revealed
    token exactly (:class:`ExactDecoder`), which leaves fewer rows to repair."""

    protocol: str = "cdvae"
    rounds: int = 10
    t: float = 1.0
    keep_elements: bool = True  # a repaired row must keep its number of distinct elements
    exact: bool = True  # exact decoding of each completed row's last revealed token (ExactDecoder)

    def __post_init__(self) -> None:
        if self.protocol not in VALIDITY_CHOICES:
            raise ValueError(f"validity must be one of {', '.join(VALIDITY_CHOICES)}, got {self.protocol!r}")
        if self.rounds < 0:
            raise ValueError(f"repair rounds must be >= 0, got {self.rounds}")
        if not 0 < self.t <= 1:
            raise ValueError(f"the re-noising level t must lie in (0, 1], got {self.t}")

    @property
    def active(self) -> bool:
        return self.protocol != "none" and (self.rounds > 0 or self.exact)

    def level(self, round_: int) -> float:
        """The re-noising level of repair round ``round_`` (0-based): ``t`` in the first round, rising
        linearly to 1 (the whole row re-drawn) in the last, so a row whose tokens cannot be balanced by
        a partial correction still gets a fresh draw within the budget."""
        return self.t + (1.0 - self.t) * round_ / max(self.rounds - 1, 1)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepairStats:
    """What the sampler did, summed over batches: samples, denoiser evaluations (rows x forward passes) of
    the first pass, rows that failed after it, rows still failing after the budget, re-denoised rows (a
    row repaired in three rounds counts three times), the denoiser evaluations spent on them and the
    failing rows at the start of each round."""

    samples: int = 0
    denoiser_rows_first_pass: int = 0
    failed_first_pass: int = 0
    failed_after_budget: int = 0
    rows_resampled: int = 0
    denoiser_rows: int = 0
    rounds_used: int = 0
    per_round_failing: list[int] = field(default_factory=list)
    exact_fixed: int = 0  # rows the exact decoder made valid (first pass and repair rounds)
    exact_candidates: int = 0  # candidate rows it validated

    def add(self, other: RepairStats) -> None:
        self.samples += other.samples
        self.denoiser_rows_first_pass += other.denoiser_rows_first_pass
        self.failed_first_pass += other.failed_first_pass
        self.failed_after_budget += other.failed_after_budget
        self.rows_resampled += other.rows_resampled
        self.denoiser_rows += other.denoiser_rows
        self.rounds_used = max(self.rounds_used, other.rounds_used)
        self.exact_fixed += other.exact_fixed
        self.exact_candidates += other.exact_candidates
        for i, k in enumerate(other.per_round_failing):
            if i < len(self.per_round_failing):
                self.per_round_failing[i] += k
            else:
                self.per_round_failing.append(k)

    def as_dict(self) -> dict:
        out = asdict(self)
        n = max(self.samples, 1)
        out["extra_denoiser_rows_per_sample"] = self.denoiser_rows / n
        out["first_pass_denoiser_rows_per_sample"] = self.denoiser_rows_first_pass / n
        return out


class RowValidator:
    """``validator(ids) -> (ok, reasons)``: whether each token row (``[B, L]``) decodes to a formula that
    passes ``protocol``, and why not (``""`` when it passes). A pure function of the rows; the verdict
    on each reduced formula is memoised by :func:`evaluation.validity.check_formulas`."""

    def __init__(self, protocol: str, codec: str, max_count: int = 200):
        from evaluation.validity import protocols_of

        if protocol == "none":
            raise ValueError("a RowValidator needs a protocol (cdvae or smact)")
        protocols_of(protocol)  # a clear error on an unknown name
        self.protocol, self.codec, self.max_count = protocol, codec, max_count

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        from evaluation.validity import check_formulas

        decoded = decode_samples(ids, self.codec, self.max_count)
        formulas = [f for _, f, _ in decoded if f is not None]
        verdicts = iter(check_formulas(formulas, self.protocol, workers=1))
        ok, reasons = [], []
        for _, f, err in decoded:
            if f is None:
                ok.append(False)
                reasons.append(f"unparseable: {err}")
                continue
            v = next(verdicts)
            ok.append(v.valid)
            reasons.append(v.reason)
        return torch.tensor(ok, dtype=torch.bool, device=ids.device), reasons


def element_presence(x: torch.Tensor) -> torch.Tensor:
    """``[B, E]`` bool: which elements occur in the token rows ``x`` (non-element tokens ignored)."""
    n_el = len(ELEMENTS)
    is_el = (x >= ELEMENT_OFFSET) & (x < ELEMENT_OFFSET + n_el)
    idx = torch.where(is_el, x - ELEMENT_OFFSET, torch.full_like(x, n_el))  # non-elements -> spare column
    present = torch.zeros(x.shape[0], n_el + 1, dtype=torch.bool, device=x.device)
    present.scatter_(1, idx, True)
    return present[:, :n_el]


def live_element_presence(ids: torch.Tensor) -> torch.Tensor:
    """``[B, E]`` bool: which elements occur before each row's first [EOS]/[PAD] (either codec)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    live = (pos[None] >= 1) & (pos[None] <= row_ends(ids)[:, None])  # the end itself is no element
    return element_presence(torch.where(live, ids, torch.full_like(ids, PAD)))


def element_counts(ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` number of distinct element tokens before each row's first [EOS]/[PAD] (either codec)."""
    return live_element_presence(ids).sum(1)


def row_ends(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's first [EOS]/[PAD] after position 0, or the last position."""
    length = x.shape[1]
    pos = torch.arange(length, device=x.device)
    ended = ((x == EOS) | (x == PAD)) & (pos[None] >= 1)
    return torch.where(ended, pos, torch.full_like(pos, length - 1)).min(1).values


def renoise_masked(x: torch.Tensor, t: float, generator: torch.Generator) -> torch.Tensor:
    """``x_t`` from finished rows ``x`` (``[B, L]``) under the masked sampler's linear schedule: every
    content position (1 up to the row's first [EOS]/[PAD], inclusive) is masked with probability ``t``,
    at least one per row; when a row's end is masked, the [PAD] tail after it is masked too, so the
    row may also grow. Pure: ``x`` is not modified."""
    length = x.shape[1]
    pos = torch.arange(length, device=x.device)
    end = row_ends(x)
    content = (pos[None] >= 1) & (pos[None] <= end[:, None])
    u = torch.rand(x.shape, generator=generator, device=x.device)
    masked = content & (u < t)
    none = ~masked.any(1)
    if bool(none.any()):  # at least one: the content position with the smallest draw
        first = u.masked_fill(~content, 2.0).argmin(1)
        masked[none.nonzero().squeeze(1), first[none]] = True
    end_masked = masked.gather(1, end[:, None]).squeeze(1)
    masked |= end_masked[:, None] & (pos[None] > end[:, None])
    return torch.where(masked, torch.full_like(x, MASK), x)


def renoise_gaussian(schedule, x0: torch.Tensor, t: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``(x_k, k)``: token embeddings ``x0`` (``[B, L, D]``) re-noised by ``q(x_k | x_0)`` to the chain
    index ``k`` nearest the fraction ``t`` of the (respaced) chain ``schedule``."""
    k = min(len(schedule) - 1, max(0, math.ceil(t * len(schedule)) - 1))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return schedule.add_noise(x0, torch.full((x0.shape[0],), k), noise), k


def repair(ids: torch.Tensor, validator: Callable,
           redo: Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, int]],
           rounds: int, keep_elements: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str], RepairStats]:
    """The repair loop: ``(ids, ok, reasons, stats)`` after re-doing the failing rows of ``ids`` with
    ``redo(rows, round, index) -> (new rows, denoiser evaluations)`` (re-noise and denoise again; ``index``:
    the rows' positions in ``ids``) for at most
    ``rounds`` rounds. Rows that pass are never touched again; rows that still fail stay in place. With
    ``keep_elements``, a re-done row passes only if it also has its original row's number of distinct
    elements, in the first half of the rounds; the second half accepts any valid row."""
    ids = ids.clone()
    want = element_counts(ids) if keep_elements else None
    ok, reasons = validator(ids)
    stats = RepairStats(samples=len(ids), failed_first_pass=int((~ok).sum()))
    for r in range(rounds):
        bad = (~ok).nonzero().squeeze(1)
        if bad.numel() == 0:
            break
        stats.per_round_failing.append(int(bad.numel()))
        new, calls = redo(ids[bad], r, bad)
        ids[bad] = new
        ok_new, why = validator(new)
        if want is not None and r < rounds // 2:  # the second half of the budget takes any valid row
            got = element_counts(new)
            drift = ok_new & (got != want[bad])
            why = [f"valid, but {int(g)} elements where the sample had {int(w)}" if d else y
                   for y, d, g, w in zip(why, drift.tolist(), got, want[bad])]
            ok_new = ok_new & ~drift
        ok[bad] = ok_new
        for i, row in enumerate(bad.tolist()):
            reasons[row] = why[i]
        stats.rows_resampled += int(bad.numel())
        stats.denoiser_rows += calls
        stats.rounds_used = r + 1
    stats.failed_after_budget = int((~ok).sum())
    return ids, ok, reasons, stats


class ExactDecoder:
    """``decoder(before, after, scores, greedy) -> rows``: exact decoding of the token a row
    was completed with.

    ``before`` and ``after`` are the rows (``[B, L]``) before and after a sampler step, ``scores``
    (``[B, L, V]``) the probabilities the step drew from (or, with ``greedy``, any scores whose best
    allowed token was taken). For each row that has no [MASK] after the step and fails the validator,
    the rightmost content token revealed in the step is drawn again among the ``top_k`` highest-scoring
    tokens allowed at its position that make the row valid (an [EOS] there ends the row, the rest
    becomes [PAD]), in proportion to their scores (the best with ``greedy``); if none does, the next
    revealed token to the left is tried, ``positions`` in all. Rows that pass are returned as they
    are, so the re-drawn token follows ``p(v | the row is valid)`` exactly within the top ``top_k``.
    ``rules`` (:class:`~composition_lm.sampling.LogitRules`) supplies the static token mask and the element
    constraints (``require``/``max_elements``) a changed row must still meet. Rows that no single
    re-draw can make valid stay as they are (the repair loop takes them). With ``keep_elements`` a
    re-drawn row must keep its number of distinct elements (re-drawing the last token otherwise turns
    ternaries into quaternaries and tilts the #elements distribution; ``benchmarks/validity_sampling.md``).
    ``stats`` counts the rows
    examined, fixed and the candidate rows validated. ``generator`` drives its draws: a generator of its
    own (seeded from the run's seed), so that the sampler's stream, and with it every row the decoder
    leaves alone, is the same as without it."""

    def __init__(self, validator: RowValidator, rules, generator: torch.Generator, top_k: int = 32,
                 positions: int = 2, keep_elements: bool = True):
        self.validator, self.rules, self.generator = validator, rules, generator
        self.top_k, self.positions, self.keep_elements = top_k, positions, keep_elements
        self.stats = {"completed_failing": 0, "fixed": 0, "candidates": 0}

    def __call__(self, before: torch.Tensor, after: torch.Tensor, scores: torch.Tensor,
                 greedy: bool = False) -> torch.Tensor:
        done = (before == MASK).any(1) & ~(after == MASK).any(1)
        rows = done.nonzero().squeeze(1)
        if rows.numel() == 0:
            return after
        ok, _ = self.validator(after[rows])
        bad = rows[~ok]
        if bad.numel() == 0:
            return after
        self.stats["completed_failing"] += int(bad.numel())
        x = after.clone()
        length = x.shape[1]
        pos = torch.arange(length, device=x.device)
        # content positions (before the row's end) that this step revealed
        revealed = (before[bad] == MASK) & (pos[None] >= 1) & (pos[None] < row_ends(x[bad])[:, None])
        for _ in range(self.positions):
            todo = revealed.any(1)
            if not bool(todo.any()):
                break
            sub = bad[todo]
            j = torch.where(revealed[todo], pos[None], torch.full_like(pos[None], -1)).max(1).values
            cand, weight = self._candidates(x[sub], j, scores[sub, j], greedy)  # [n, K, L], [n, K]
            n, k = weight.shape
            flat = cand.reshape(n * k, length)
            live = weight.reshape(-1) > -torch.inf if greedy else weight.reshape(-1) > 0
            valid = torch.zeros(n * k, dtype=torch.bool, device=x.device)
            idx = live.nonzero().squeeze(1)
            if idx.numel():
                v_ok, _ = self.validator(flat[idx])
                present = live_element_presence(flat[idx])
                v_ok &= self.rules.elements_ok(present)
                if self.keep_elements:
                    v_ok &= present.sum(1) == element_counts(x[sub]).repeat_interleave(k)[idx]
                valid[idx] = v_ok
                self.stats["candidates"] += int(idx.numel())
            valid = valid.reshape(n, k)
            fixed = valid.any(1)
            if bool(fixed.any()):
                w = weight[fixed]
                if greedy:
                    pick = w.masked_fill(~valid[fixed], -torch.inf).argmax(1)
                else:
                    pick = torch.multinomial(w * valid[fixed], 1, generator=self.generator).squeeze(1)
                x[sub[fixed]] = cand[fixed, pick]
                self.stats["fixed"] += int(fixed.sum())
            # fixed rows are done; the others try the next revealed position to the left
            tried = todo.nonzero().squeeze(1)
            still = todo.clone()
            still[tried[fixed]] = False
            revealed[tried, j] = False
            revealed &= still[:, None]
        return x

    def _candidates(self, rows: torch.Tensor, j: torch.Tensor, scores: torch.Tensor,
                    greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[n, K, L]`` with position ``j`` set to each of the ``top_k`` best allowed tokens other
        than the current one ([EOS] ends the row there), and the tokens' scores ``[n, K]`` (-inf/0 for
        empty slots)."""
        n, length = rows.shape
        allowed = self.rules.static.to(rows.device)[j].clone()  # [n, V]
        allowed[:, PAD] = False  # [EOS] stands for ending the row here
        allowed.scatter_(1, rows.gather(1, j[:, None]), False)
        empty = -torch.inf if greedy else 0.0
        s = scores.float().masked_fill(~allowed, empty)
        if not greedy:
            s = s.masked_fill(~torch.isfinite(s), 0.0)
        k = min(self.top_k, s.shape[1])
        weight, tok = s.topk(k, dim=1)
        cand = rows[:, None, :].repeat(1, k, 1)
        cand.scatter_(2, j[:, None, None].expand(n, k, 1), tok[:, :, None])
        pos = torch.arange(length, device=rows.device)
        tail = (tok == EOS)[:, :, None] & (pos[None, None] > j[:, None, None])
        cand = torch.where(tail, torch.full_like(cand, PAD), cand)
        return cand, weight
