"""Constraints enforced inside the formula samplers: which elements, which must appear, how many.

Constraints (:class:`Constraints`) are logit masks, applied while sampling, never filters afterwards:

* ``elements`` (only these), ``exclude``: a static mask over element tokens;
* grammar: position 1 is never ``[EOS]``; a sequence ends at its first ``[EOS]`` or ``[PAD]`` and
  everything after it is ``[PAD]``; the compact codec alternates element and count positions, ends
  only at element positions and never repeats an element;
* ``require`` and ``max_elements``: positions decided in a step are assigned left to right so
  that the still-undecided slots before the end can always hold every missing required element, and
  an element that would exceed ``max_elements`` is masked.

The rules (:class:`LogitRules`) are used by the schedulers' steps and by the exact decoder; nothing is filtered after
sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from composition_lm.tokenizer import BOS, COUNT_OFFSET, ELEMENT_OFFSET, EOS, MASK, PAD
from composition_lm.valid_sampling import element_presence
from evaluation.composition import ATOMIC_NUMBER, ELEMENTS

__all__ = ["ConstraintError", "Constraints", "LogitRules"]


class ConstraintError(ValueError):
    """Constraints that no sample can satisfy (e.g. an unknown element, or require beyond max)."""


@dataclass
class Constraints:
    elements: list[str] | None = None  # only these elements
    require: list[str] = field(default_factory=list)  # every sample contains each of these
    exclude: list[str] = field(default_factory=list)  # never these
    max_elements: int | None = None  # at most this many distinct elements

    @property
    def active(self) -> bool:
        return bool(self.elements or self.require or self.exclude or self.max_elements)

    def as_dict(self) -> dict:
        return {"elements": self.elements, "require": self.require, "exclude": self.exclude,
                "max_elements": self.max_elements}


def _element_id(sym: str) -> int:
    return ELEMENT_OFFSET + ATOMIC_NUMBER[sym] - 1


class LogitRules:
    """Which token may stand at which position: a static ``[L, V]`` mask plus per-step rules."""

    def __init__(self, constraints: Constraints, codec: str, seq_length: int, vocab_size: int, max_count: int):
        c = constraints
        for name in [*(c.elements or []), *c.require, *c.exclude]:
            if name not in ATOMIC_NUMBER:
                raise ConstraintError(f"unknown element {name!r} (elements are symbols H..Lr, e.g. Li,Mn,O)")
        allowed_elements = set(c.elements) if c.elements else set(ELEMENTS)
        allowed_elements -= set(c.exclude)
        bad_req = [e for e in c.require if e not in allowed_elements]
        if bad_req:
            raise ConstraintError(f"required element(s) {', '.join(bad_req)} are excluded or not in --elements")
        if not allowed_elements:
            raise ConstraintError("no element is allowed by --elements/--exclude")
        if c.max_elements is not None and c.max_elements < max(1, len(set(c.require))):
            raise ConstraintError(f"--max-elements {c.max_elements} is below the {len(set(c.require))} required elements")
        self.compact = codec == "compact"
        width = 2 if self.compact else 1
        if len(set(c.require)) * width + 1 > seq_length - 1:
            raise ConstraintError(f"{len(set(c.require))} required elements do not fit in sequences of length {seq_length}")
        self.length, self.vocab = seq_length, vocab_size
        self.max_elements = c.max_elements
        self.element_ids = torch.tensor([_element_id(e) for e in ELEMENTS])
        self.required = torch.zeros(len(ELEMENTS), dtype=torch.bool)
        for e in c.require:
            self.required[ATOMIC_NUMBER[e] - 1] = True

        ok_el = torch.zeros(vocab_size, dtype=torch.bool)
        ok_el[[_element_id(e) for e in allowed_elements]] = True
        counts = torch.zeros(vocab_size, dtype=torch.bool)
        counts[COUNT_OFFSET + 1 : COUNT_OFFSET + max_count + 1] = True
        static = torch.zeros(seq_length, vocab_size, dtype=torch.bool)
        static[0, BOS] = True
        # compact: the k-th element sits at j = 2k - 1 and needs its count at j + 1
        last_element = seq_length - 1 if not self.compact else seq_length - 2
        if self.compact:  # compact never repeats an element: at most this many element slots
            cap = len(allowed_elements) if c.max_elements is None else min(c.max_elements, len(allowed_elements))
            last_element = min(last_element, 2 * cap - 1)
        self.slot_positions = torch.tensor(
            [1 <= j <= last_element and (not self.compact or j % 2 == 1) for j in range(seq_length)]
        )
        for j in range(1, seq_length):
            if not self.compact:
                static[j] = ok_el
                static[j, [EOS, PAD]] = j >= 2
            elif j % 2 == 1:  # element position (or the end)
                static[j] = ok_el & torch.tensor(j <= last_element)
                static[j, EOS] = 3 <= j <= last_element + 2
                static[j, PAD] = j >= 3
            else:  # count position
                static[j] = counts
                static[j, PAD] = True
        self.static = static
        self.last_end = last_element + 1 if self.compact else seq_length - 1
        self.dynamic = bool(c.require or c.max_elements or self.compact)

    # ----------------------------------------------------------------------------------------------
    def elements_ok(self, present: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: finished rows, given by the elements they hold (``[B, E]``,
        :func:`~composition_lm.valid_sampling.live_element_presence`), that hold every required element
        and at most ``max_elements`` distinct ones."""
        ok = ~(self.required.to(present.device)[None] & ~present).any(1)
        if self.max_elements is not None:
            ok &= present.sum(1) <= self.max_elements
        return ok

    @staticmethod
    def _draw(scores: torch.Tensor, allowed: torch.Tensor, generator, greedy: bool) -> torch.Tensor:
        """One token per row among ``allowed``: drawn from probabilities ``scores`` (uniform over the
        allowed ones if they all have probability 0) or, with ``greedy``, the highest score."""
        if greedy:
            return scores.masked_fill(~allowed, -torch.inf).argmax(-1)
        p = scores * allowed
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, allowed.to(p.dtype))
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def assign(self, x: torch.Tensor, probs: torch.Tensor, choose: torch.Tensor, generator,
               greedy: bool = False) -> torch.Tensor:
        """Draw tokens for positions ``choose`` ([B, L] bool) from ``probs`` ([B, L, V]) under the rules;
        with ``greedy``, ``probs`` may be any scores and the best allowed token is taken."""
        static = self.static.to(probs.device)
        if not self.dynamic:
            rows, cols = choose.nonzero(as_tuple=True)
            if rows.numel() == 0:
                return x
            x = x.clone()
            x[rows, cols] = self._draw(probs[rows, cols], static[cols], generator, greedy)
            return self._tidy_ends(x)
        x = x.clone()
        b, length = x.shape
        dev = x.device
        pos = torch.arange(length, device=dev)
        el_ids = self.element_ids.to(dev)
        required = self.required.to(dev)
        decided = x != MASK
        ended = decided & ((x == EOS) | (x == PAD))
        end = torch.where(ended, pos, torch.full_like(pos, length)).min(1).values  # first decided end, or L
        slot_pos = self.slot_positions.to(dev)
        for j in range(1, length):
            rows = choose[:, j].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e, dec, xr = end[rows], decided[rows], x[rows]
            # only elements before the end count; elements before j decide whether [EOS] may go here
            before_end = dec & (pos[None] < e[:, None])
            pr = element_presence(torch.where(before_end, xr, torch.full_like(xr, PAD)))

            def end_fits(p: int) -> torch.Tensor:
                """Could the sequence end at ``p``: do the required elements missing before ``p`` fit
                in the undecided slots before it?"""
                before = dec & (pos[None] < p)
                have = element_presence(torch.where(before, xr, torch.full_like(xr, PAD)))
                free = (~dec & slot_pos[None] & (pos[None] < p)).sum(1)
                return (required[None] & ~have).sum(1) <= free

            missing = required[None] & ~pr
            n_missing = missing.sum(1)
            # undecided slots after j and before the end that could still take a required element
            free_after = (~dec & slot_pos[None] & (pos[None] > j) & (pos[None] < e[:, None])).sum(1)
            eos_ok = end_fits(j)
            allowed = static[j][None].repeat(rows.numel(), 1)
            after_end = j > e
            # [EOS] (or [PAD], which also ends a sequence) may stand here if this is a legal end position
            # and the required elements still fit before it; an earlier end may replace a later one
            end_ok = static[j, EOS] & ~after_end & eos_ok
            allowed[:, EOS] = end_ok
            allowed[:, PAD] = after_end | end_ok | (j > self.last_end)
            if self.compact and j % 2 == 0:
                # [PAD] at a count position ends the sequence at the element position before it,
                # which must then be free to become the end (it is set to [PAD] below)
                prev_ok = (xr[:, j - 1] == MASK) & static[j - 1, EOS] & end_fits(j - 1)
                allowed[:, PAD] |= prev_ok & ~after_end
            el_ok = allowed[:, el_ids] & ~after_end[:, None]
            if self.compact:
                el_ok &= ~pr
            el_ok &= missing | (free_after >= n_missing)[:, None]
            if self.max_elements is not None:
                el_ok &= pr | missing | ((pr.sum(1) + n_missing + 1) <= self.max_elements)[:, None]
            allowed[:, el_ids] = el_ok
            if self.compact and j % 2 == 0:  # count position: a count, or [PAD] after the end
                allowed[:, COUNT_OFFSET + 1 :] &= ~after_end[:, None]
            if not bool(allowed.any(-1).all()):  # pragma: no cover - the invariant makes this unreachable
                raise RuntimeError("constraint bookkeeping left a position with no allowed token")
            tok = self._draw(probs[rows, j], allowed, generator, greedy)
            x[rows, j] = tok
            decided[rows, j] = True
            is_end = (tok == EOS) | (tok == PAD)
            end[rows] = torch.where(is_end, torch.minimum(end[rows], torch.full_like(tok, j)), end[rows])
            if self.compact and j % 2 == 0:
                pull = rows[(tok == PAD) & (x[rows, j - 1] == MASK)]
                x[pull, j - 1] = PAD
                decided[pull, j - 1] = True
                end[pull] = torch.minimum(end[pull], torch.full_like(end[pull], j - 1))
        return x

    @staticmethod
    def _tidy_ends(x: torch.Tensor) -> torch.Tensor:
        """Tokens after the first decided [EOS]/[PAD] become [PAD] (fast path only)."""
        ended = (x == EOS) | (x == PAD)
        after = (ended.cumsum(1) - ended.long()) > 0
        return torch.where(after & (x != MASK), torch.full_like(x, PAD), x)
