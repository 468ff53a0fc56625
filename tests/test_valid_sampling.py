"""Validity inside the sampler: the row validator, the re-noising functions, the repair loop, and the
shipped models sampling only valid formulas when asked (issue 17)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from composition_lm.cli import main as cli
from composition_lm.generator import FormulaGenerator
from composition_lm.tokenizer import BOS, ELEMENT_OFFSET, EOS, MASK, PAD
from composition_lm.valid_sampling import (RepairStats, RowValidator, ValiditySettings, renoise_masked, repair)
from evaluation.composition import ATOMIC_NUMBER
from evaluation.validity import check_formula

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L = 12


def _row(*symbols: str) -> list[int]:
    ids = [BOS] + [ELEMENT_OFFSET + ATOMIC_NUMBER[s] - 1 for s in symbols] + [EOS]
    return ids + [PAD] * (L - len(ids))


@pytest.fixture(scope="module")
def bert():
    return FormulaGenerator.from_pretrained("diffusion-bert")


@pytest.fixture(scope="module")
def lm():
    return FormulaGenerator.from_pretrained("diffusion-lm")


# ---------------------------------------------------------------------------------------- validator
def test_row_validator_says_why():
    rows = torch.tensor([_row("Na", "Cl"), _row("Na", "Cl", "Cl"), _row("He", "Ne"), _row("Fe")])
    ok, reasons = RowValidator("cdvae", "expanded")(rows)
    assert ok.tolist() == [True, False, False, True]
    assert reasons[0] == "" and reasons[3] == ""
    assert reasons[1] == check_formula("NaCl2", "cdvae").reason == "no charge-neutral combination"
    assert "oxidation states" in reasons[2]
    with pytest.raises(ValueError, match="protocol"):
        RowValidator("none", "expanded")


# ------------------------------------------------------------------------------------ re-noising
def test_renoise_masked_is_pure_and_masks_content_only():
    x = torch.tensor([_row("Li", "Mn", "O", "O"), _row("Na", "Cl"), _row("Fe")] * 50)
    before = x.clone()
    g = torch.Generator().manual_seed(0)
    y = renoise_masked(x, 0.5, g)
    assert torch.equal(x, before)  # pure
    assert (y[:, 0] == BOS).all()
    masked = y == MASK
    assert masked.any(1).all()  # at least one position per row
    unchanged = ~masked
    assert torch.equal(y[unchanged], x[unchanged])  # the rest carried through
    ends = (x == EOS).float().argmax(1)
    pos = torch.arange(L)
    # a masked position beyond the end only where the end itself was masked (the row may grow)
    beyond = masked & (pos[None] > ends[:, None])
    end_masked = masked[torch.arange(len(x)), ends]
    assert not beyond[~end_masked].any()
    assert beyond[end_masked].any()
    share = (masked & (pos[None] <= ends[:, None])).sum() / ((pos[None] >= 1) & (pos[None] <= ends[:, None])).sum()
    assert 0.4 < float(share) < 0.65
    full = renoise_masked(x, 1.0, torch.Generator().manual_seed(0))
    assert (full[:, 1:] == MASK).all()  # t = 1: the whole row is noise again


def test_settings_are_checked():
    with pytest.raises(ValueError, match="validity"):
        ValiditySettings("neutral")
    with pytest.raises(ValueError, match="t must"):
        ValiditySettings(t=0.0)
    assert not ValiditySettings("none").active and not ValiditySettings(rounds=0, exact=False).active
    assert ValiditySettings(rounds=0).active  # exact decoding alone still acts
    levels = [ValiditySettings(rounds=5, t=0.5).level(r) for r in range(5)]
    assert levels == [0.5, 0.625, 0.75, 0.875, 1.0]  # rising to a whole-row re-draw in the last round


# ------------------------------------------------------------------------------------- repair loop
def test_repair_touches_only_failing_rows_and_counts():
    good, bad = _row("Na", "Cl"), _row("Na", "Cl", "Cl")
    ids = torch.tensor([good, bad, good, bad])
    calls = []

    def redo(rows, round_, index):  # turns a row valid on its second re-draw
        assert round_ == len(calls) and index.tolist() == [1, 3]  # the failing rows' positions
        calls.append(len(rows))
        out = rows.clone()
        if len(calls) >= 2:
            out[:] = torch.tensor(_row("K", "Br"))
        return out, 3 * len(rows)

    out, ok, reasons, stats = repair(ids, RowValidator("cdvae", "expanded"), redo, rounds=5)
    assert ok.all() and reasons == [""] * 4
    assert torch.equal(out[0], ids[0]) and torch.equal(out[2], ids[2])
    assert torch.equal(out[1], torch.tensor(_row("K", "Br")))
    assert calls == [2, 2]
    assert (stats.failed_first_pass, stats.failed_after_budget, stats.rows_resampled, stats.denoiser_rows,
            stats.rounds_used, stats.per_round_failing) == (2, 0, 4, 12, 2, [2, 2])


def test_element_counts_and_keep_elements():
    from composition_lm.valid_sampling import element_counts

    ids = torch.tensor([_row("Na", "Cl"), _row("Li", "Mn", "O", "O"), _row("Fe"), [BOS] + [ELEMENT_OFFSET] * (L - 1)])
    assert element_counts(ids).tolist() == [2, 3, 1, 1]
    bad = torch.tensor([_row("Na", "Cl", "Cl")])

    def to_ternary(rows, round_, index=None):  # valid, but with three elements where the sample had two
        return torch.tensor([_row("Li", "Co", "O", "O")] * len(rows)), 0

    _, ok, reasons, stats = repair(bad, RowValidator("cdvae", "expanded"), to_ternary, rounds=1, keep_elements=True)
    assert ok.all()  # a budget of one round has no first half: any valid row
    _, ok, reasons, stats = repair(bad, RowValidator("cdvae", "expanded"), to_ternary, rounds=4, keep_elements=True)
    assert ok.all() and stats.per_round_failing == [1, 1, 1]  # refused in rounds 1-2, taken in round 3
    binary = torch.tensor([_row("K", "Br")])
    _, ok, reasons, stats = repair(bad, RowValidator("cdvae", "expanded"),
                                   lambda rows, r, i: (binary if r == 1 else to_ternary(rows, r)[0], 0), rounds=4,
                                   keep_elements=True)
    assert ok.all() and stats.per_round_failing == [1, 1]
    _, ok, _, _ = repair(bad, RowValidator("cdvae", "expanded"), to_ternary, rounds=2, keep_elements=False)
    assert ok.all()


def test_repair_budget_ends_with_flagged_rows():
    ids = torch.tensor([_row("He", "Ne")] * 3)
    out, ok, reasons, stats = repair(ids, RowValidator("cdvae", "expanded"), lambda r, _, i: (r.clone(), 0), rounds=4)
    assert not ok.any() and all("oxidation states" in r for r in reasons)
    assert stats.failed_after_budget == 3 and stats.rounds_used == 4 and torch.equal(out, ids)
    total = RepairStats()
    total.add(stats)
    total.add(stats)
    assert total.failed_after_budget == 6 and total.per_round_failing == [6, 6, 6, 6]


# ------------------------------------------------------------------------------- shipped models
@pytest.mark.parametrize("protocol", ["cdvae", "smact"])
@pytest.mark.parametrize("which", ["bert", "lm"])
def test_every_sample_passes_when_asked(which, protocol, request):
    gen = request.getfixturevalue(which)
    table = gen.generate(150 if which == "bert" else 60, seed=0, validity=protocol, batch_size=150)
    assert table[f"valid_{protocol}"].all(), table.loc[~table[f"valid_{protocol}"], ["formula", f"reason_{protocol}"]]
    assert table.attrs["validity"]["failing_rows"] == 0
    assert table.attrs["sampling"]["validity"] == protocol


@pytest.mark.parametrize("which", ["bert", "lm"])
def test_valid_samples_keep_element_constraints(which, request):
    gen = request.getfixturevalue(which)
    n = 60 if which == "bert" else 30
    table = gen.generate(n, seed=1, require="Li", max_elements=3, batch_size=n)
    assert table["valid_cdvae"].all()
    assert all("Li" in f for f in table["formula"]) and (table["n_elements"] <= 3).all()
    few = gen.generate(n, seed=2, elements="Na,Cl", batch_size=n)  # few valid formulas exist: NaCl, Na, Cl
    assert few["valid_cdvae"].all()
    assert set(few["formula"]) <= {"NaCl", "Na", "Cl"}


def test_impossible_request_ends_with_flagged_rows(bert):
    with pytest.warns(UserWarning, match="still fail"):
        table = bert.generate(8, seed=0, elements="He,Ne", require="He,Ne", validity_rounds=3)
    assert len(table) == 8 and not table["valid_cdvae"].any()  # kept, flagged, counted
    assert table.attrs["validity"]["failing_rows"] == 8
    assert table.attrs["validity"]["failed_after_budget"] == 8


def test_rows_valid_on_the_first_pass_are_the_raw_samples(bert):
    raw = bert.generate(200, seed=3, validity="none", batch_size=200)
    guarded = bert.generate(200, seed=3, batch_size=200, validity_t=0.5, validity_exact=False)
    first_pass_ok = raw["valid_cdvae"].to_numpy()
    kept = (guarded["n_elements"].to_numpy() == raw["n_elements"].to_numpy())[~first_pass_ok].mean()
    loose = bert.generate(200, seed=3, batch_size=200, validity_t=0.5, validity_keep_elements=False,
                          validity_exact=False)
    kept_loose = (loose["n_elements"].to_numpy() == raw["n_elements"].to_numpy())[~first_pass_ok].mean()
    assert kept > kept_loose + 0.1  # repaired rows keep their number of elements far more often
    assert (guarded["sample"].to_numpy()[first_pass_ok] == raw["sample"].to_numpy()[first_pass_ok]).all()
    assert (guarded["sample"].to_numpy()[~first_pass_ok] != raw["sample"].to_numpy()[~first_pass_ok]).any()
    assert raw.attrs["validity"]["rows_resampled"] == 0
    again = bert.generate(200, seed=3, batch_size=200, validity_t=0.5, validity_exact=False)
    assert again["sample"].tolist() == guarded["sample"].tolist()  # same seed, same samples
    exact = bert.generate(200, seed=3, batch_size=200)  # the default: exact decoding, then repair
    assert (exact["sample"].to_numpy()[first_pass_ok] == raw["sample"].to_numpy()[first_pass_ok]).all()
    assert exact["valid_cdvae"].all() and exact.attrs["validity"]["exact_fixed"] > 0
    # exact decoding leaves fewer rows to the repair loop than there were invalid raw rows
    assert exact.attrs["validity"]["failed_first_pass"] < (~first_pass_ok).sum()


def test_sample_cli_records_validity(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["sample", "-n", "40", "--seed", "0", "--validity", "smact", "--validity-rounds", "20",
                    "--no-progress", "-o", str(tmp_path / "s")]) == 0
    run = json.loads((tmp_path / "s/run_config.json").read_text())
    assert {k: run[k] for k in ("validity", "validity_rounds", "validity_t", "validity_keep_elements",
                                "validity_exact")} == {"validity": "smact", "validity_rounds": 20, "validity_t": 1.0,
                                                       "validity_keep_elements": True, "validity_exact": True}
    assert run["validity_repair"]["failing_rows"] == 0 and run["summary"]["validity_smact"] == 1.0
    assert cli(["sample", "-n", "4", "--seed", "0", "--no-exact-decoding", "--no-progress", "-o", str(tmp_path / "ne")]) == 0
    assert json.loads((tmp_path / "ne/run_config.json").read_text())["validity_exact"] is False
    assert cli(["sample", "-n", "4", "--validity-t", "0", "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------- exact decoding
def _exact(codec="expanded", seed=0, keep_elements=False, **constraints):
    from composition_lm.sampling import Constraints, LogitRules
    from composition_lm.tokenizer import vocabulary_size
    from composition_lm.valid_sampling import ExactDecoder

    rules = LogitRules(Constraints(**constraints), codec, L, vocabulary_size(200), 200)
    return ExactDecoder(RowValidator("cdvae", codec), rules, torch.Generator().manual_seed(seed),
                        keep_elements=keep_elements)


def _el(sym: str) -> int:
    return ELEMENT_OFFSET + ATOMIC_NUMBER[sym] - 1


def _probs(n: int, pos: int, weights: dict[int, float]) -> torch.Tensor:
    from composition_lm.tokenizer import vocabulary_size

    p = torch.zeros(n, L, vocabulary_size(200))
    for tok, w in weights.items():
        p[:, pos, tok] = w
    return p


def test_exact_decoding_draws_the_last_token_among_valid_completions():
    n = 2000
    after = torch.tensor([_row("Na", "Cl", "Cl")] * n)  # NaCl2: fails
    before = after.clone()
    before[:, 3] = MASK  # the step revealed position 3 only
    # p(Cl) = 0.6 (invalid), p([EOS]) = 0.3 (NaCl), p(O) = 0.1 (NaClO, Cl+ below O-2)
    probs = _probs(n, 3, {_el("Cl"): 0.6, EOS: 0.3, _el("O"): 0.1})
    dec = _exact()
    out = dec(before, after, probs)
    assert (out[:, :3] == after[:, :3]).all()  # only the last revealed token changes
    ended = out[:, 3] == EOS
    assert ((out[:, 3] == _el("O")) | ended).all()
    assert (out[ended, 4:] == PAD).all()
    assert abs(float(ended.float().mean()) - 0.75) < 0.04  # p(v | valid): 0.3 / (0.3 + 0.1)
    assert dec.stats["fixed"] == n and dec.stats["completed_failing"] == n
    greedy = _exact()(before, after, probs.log(), greedy=True)  # scores: the best valid one
    assert (greedy[:, 3] == EOS).all()
    kept = _exact(keep_elements=True)(before, after, probs)  # NaClO has three elements where NaCl2 had two
    assert (kept[:, 3] == EOS).all()


def test_exact_decoding_leaves_passing_unfinished_and_old_rows_alone():
    good = torch.tensor([_row("Na", "Cl")])
    bad = torch.tensor([_row("Na", "Cl", "Cl")])
    before_good = good.clone()
    before_good[:, 2] = MASK
    unfinished_before, unfinished = bad.clone(), bad.clone()
    unfinished_before[:, 2] = MASK
    unfinished[:, 1] = MASK  # still has a mask after the step: not complete
    old = bad.clone()  # completed in an earlier step: nothing revealed now
    before = torch.cat([before_good, unfinished_before, old])
    after = torch.cat([good, unfinished, old])
    probs = _probs(3, 2, {EOS: 1.0}) + _probs(3, 1, {EOS: 1.0})
    dec = _exact()
    assert torch.equal(dec(before, after, probs), after)
    assert dec.stats["fixed"] == 0 and dec.stats["completed_failing"] == 0  # the old row is not "completed now"


def test_exact_decoding_keeps_required_elements_and_falls_back_left():
    n = 400
    after = torch.tensor([_row("Na", "Cl", "Cl")] * n)
    before = after.clone()
    before[:, 2:4] = MASK  # positions 2 and 3 revealed in this step
    # position 3 has no valid alternative (Na2Cl); position 2 has [EOS] (Na alone) and O (NaOCl)
    probs = _probs(n, 3, {_el("Cl"): 0.5, _el("Na"): 0.5}) + _probs(n, 2, {_el("Cl"): 0.2, EOS: 0.4, _el("O"): 0.4})
    out = {tuple(r) for r in _exact()(before, after, probs).tolist()}
    assert out == {tuple(_row("Na")), tuple(_row("Na", "O", "Cl"))}  # fell back to position 2
    out = {tuple(r) for r in _exact(require=["Cl"])(before, after, probs).tolist()}
    assert out == {tuple(_row("Na", "O", "Cl"))}  # "Na" alone would drop the required Cl
    blocked = _exact(require=["Cl"], max_elements=2)  # NaOCl would break max_elements
    assert torch.equal(blocked(before, after, probs), after) and blocked.stats["fixed"] == 0


def test_exact_decoding_compact_codec_fixes_the_count():
    from composition_lm.tokenizer import COUNT_OFFSET

    row = [BOS, _el("Na"), COUNT_OFFSET + 1, _el("Cl"), COUNT_OFFSET + 2, EOS] + [PAD] * (L - 6)  # Na1 Cl2
    after = torch.tensor([row] * 20)
    before = after.clone()
    before[:, 4] = MASK
    probs = _probs(20, 4, {COUNT_OFFSET + 2: 0.7, COUNT_OFFSET + 3: 0.2, COUNT_OFFSET + 1: 0.1})
    out = _exact("compact")(before, after, probs)
    assert (out[:, 4] == COUNT_OFFSET + 1).all()  # Na1 Cl1: the only valid count among those with mass


# ------------------------------------------------------------------------- classifier-free guidance
class _TwoMinds(torch.nn.Module):
    """A fake denoiser: at position 1, p(Li) = 0.8 after [VALID] and 0.5 after [BOS]; [EOS] after."""

    def __init__(self, vocab: int, valid_id: int):
        super().__init__()
        self.vocab, self.valid_id = vocab, valid_id
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t=None):
        logits = torch.full((x.shape[0], x.shape[1], self.vocab), -30.0)
        cond = (x[:, 0] == self.valid_id)[:, None]
        logits[:, 1, _el("Li")] = torch.where(cond, torch.tensor(0.8).log(), torch.tensor(0.5).log()).squeeze(1)
        logits[:, 1, _el("Na")] = torch.where(cond, torch.tensor(0.2).log(), torch.tensor(0.5).log()).squeeze(1)
        logits[:, 2, EOS] = 0.0
        return logits


@pytest.mark.parametrize("gamma,p_li", [(1.0, 0.8), (0.0, 0.5), (2.0, 0.64 / 0.5 / (0.64 / 0.5 + 0.04 / 0.5))])
def test_guidance_draws_from_the_tilted_distribution(gamma, p_li):
    from composition_lm.sampling import Constraints, LogitRules, sample_masked_diffusion
    from composition_lm.tokenizer import condition_token_ids, vocabulary_size

    vocab, valid = vocabulary_size(200, condition_tokens=True), condition_token_ids(200)["valid"]
    rules = LogitRules(Constraints(), "expanded", 3, vocab, 200)
    n = 4000
    counter = [0]
    x = sample_masked_diffusion(_TwoMinds(vocab, valid), n, 1, torch.Generator().manual_seed(0), rules,
                                start_token=valid, counter=counter, guidance=gamma)
    share = float((x[:, 1] == _el("Li")).float().mean())
    assert abs(share - p_li) < 0.025, share
    assert (x[:, 2] == EOS).all() and (x[:, 0] == valid).all()
    assert counter[0] == (n if gamma == 1.0 else 2 * n)  # one step: guidance costs a second pass, gamma 1 not


def test_guidance_needs_a_condition(bert):
    with pytest.raises(ValueError, match="guidance needs a condition"):
        bert.generate(4, guidance=2.0)
    assert bert.generate(6, seed=0, guidance=None)["sample"].tolist() == bert.generate(6, seed=0)["sample"].tolist()
