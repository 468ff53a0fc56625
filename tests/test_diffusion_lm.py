"""Diffusion-LM: Gaussian schedules, the forward process q(x_t | x_0), the reverse step, rounding, the
end-to-end loss, save/load, the respaced sampler (against a hand-written DDPM loop), constraints and
the CLI (composition_lm.schedules / diffusion_lm / sampling / training / models / cli).

Everything here uses tiny models (hidden 32, 1 layer, T = 50 diffusion steps), a hand-written
40-formula corpus and one torch thread: the tests must stay fast on a small, busy machine.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from composition_lm.cli import main
from composition_lm.diffusion_lm import DiffusionLMConfig, DiffusionLMModel, gaussian_diffusion_loss
from composition_lm.models import LoadedModel, load_model
from composition_lm.sampling import (
    Constraints,
    LogitRules,
    _nearest_tokens,
    decode_samples,
    generate,
    resolve_sampling_settings,
    sample_gaussian_diffusion,
)
from composition_lm.schedules import GAUSSIAN_SCHEDULES, GaussianSchedule, gaussian_betas
from composition_lm.tokenizer import BOS, COUNT_OFFSET, ELEMENT_OFFSET, EOS, MASK, PAD, build_tokenizer
from evaluation.composition import ATOMIC_NUMBER, parse_formula
from constraint_cases import CASES, _check_all, _constraint_params

CORPUS = """NaCl KCl LiF MgO CaO SrTiO3 BaTiO3 Fe2O3 Al2O3 LiCl NaF KBr CsCl ZnO ZnS TiO2 SiO2 SnO2 MnO2
LiMnO2 LiFePO4 LiCoO2 NaBr KF RbCl SrO BaO CuO NiO CoO FeO Cr2O3 V2O5 CaTiO3 MgAl2O4 LiNbO3 KNbO3 CaF2
MgF2 BaF2""".split()
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
SEQ = {"expanded": 16, "compact": 12}
T_TINY = 50  # diffusion steps of the tiny models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _el(sym: str) -> int:
    return ELEMENT_OFFSET + ATOMIC_NUMBER[sym] - 1


def _count(c: int) -> int:
    return COUNT_OFFSET + c


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return path


def _tiny_model(codec="expanded", seed=0, **kw) -> DiffusionLMModel:
    torch.manual_seed(seed)
    kw.setdefault("diffusion_steps", T_TINY)
    cfg = DiffusionLMConfig(seq_length=SEQ[codec], codec=codec, **TINY, **kw)
    return DiffusionLMModel(cfg).eval()


def _loaded(model, path=None) -> LoadedModel:
    return LoadedModel(model, build_tokenizer(model_max_length=model.config.seq_length), path, "diffusion-lm")


def _train_args(out, corpus, **kw):
    from composition_lm.training import TrainingArguments

    base = dict(output_dir=str(out), corpus=str(corpus), model_type="diffusion-lm", train_split=None, val_split=None,
                hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=16, warmup_steps=10,
                lr=3e-3, eval_every=0, save_every=0, log_every=1, progress=False, dropout=0.0, ema_decay=0.9,
                diffusion_steps=T_TINY)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    """An expanded-codec Diffusion-LM trained for 200 steps (log every step, one validation at 100
    and at the end, with 10 sampling steps); returns the run folder."""
    from composition_lm.training import train

    out = tmp_path_factory.mktemp("lm-expanded")
    export = train(_train_args(out, corpus_file, codec="expanded", seq_length=SEQ["expanded"], max_steps=200,
                               eval_every=100, eval_samples=16, eval_steps=10))
    assert export == out / "model"
    return out


@pytest.fixture(scope="module")
def trained_compact(tmp_path_factory, corpus_file):
    from composition_lm.training import train

    out = tmp_path_factory.mktemp("lm-compact")
    train(_train_args(out, corpus_file, codec="compact", seq_length=SEQ["compact"], max_steps=100, log_every=50))
    return out


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("name", GAUSSIAN_SCHEDULES)
def test_gaussian_schedule_endpoints_monotone_betas(name):
    s = GaussianSchedule(name, 2000)
    assert len(s) == 2000 and s.betas.dtype == torch.float64
    ab = s.alpha_bar
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must decrease strictly"
    assert float(ab[0]) > 0.98 and float(ab[0]) <= 1.0
    assert 0 < float(ab[-1]) < 1e-3
    assert bool(((s.betas > 0) & (s.betas <= 0.999)).all())
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - gaussian_betas(name, 2000), 0), rtol=0, atol=0)
    assert torch.equal(s.timesteps, torch.arange(2000))
    assert float(s.alpha_bar_prev[0]) == 1.0 and torch.equal(s.alpha_bar_prev[1:], ab[:-1])


def test_sqrt_and_cosine_schedules_follow_their_formulas():
    T = 2000
    # improved-diffusion's betas_for_alpha_bar convention (as Diffusion-LM):
    # alpha_bar[k] = f((k + 1) / T) / f(0), f(u) = 1 - sqrt(u + 1e-4), so alpha_bar[k] ~ 1 - sqrt((k+1)/T + 1e-4)
    # up to the normalisation f(0) = 0.99; the last beta is clipped at 0.999 (f(1) < 0).
    s = GaussianSchedule("sqrt", T)
    f0 = 1 - math.sqrt(1e-4)
    for k in (0, 1, 9, 99, 999, 1998):
        expected = (1 - math.sqrt((k + 1) / T + 1e-4)) / f0
        assert float(s.alpha_bar[k]) == pytest.approx(expected, rel=1e-9), k
        assert float(s.alpha_bar[k]) == pytest.approx(1 - math.sqrt((k + 1) / T + 1e-4), rel=0.011), k
    assert float(s.betas[-1]) == 0.999
    assert float(s.alpha_bar[-1]) == pytest.approx(float(s.alpha_bar[-2]) * 0.001, rel=1e-9)

    c = GaussianSchedule("cosine", T)

    def fc(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for k in (0, 9, 999, 1990):
        assert float(c.alpha_bar[k]) == pytest.approx(fc((k + 1) / T) / fc(0), rel=1e-9), k
    lin = gaussian_betas("linear", T)
    assert float(lin[0]) == pytest.approx(0.5e-4) and float(lin[-1]) == pytest.approx(0.01)


def test_unknown_gaussian_schedule_and_bad_config():
    with pytest.raises(ValueError, match="unknown Gaussian schedule 'loglinear'"):
        GaussianSchedule("loglinear", 100)
    with pytest.raises(ValueError, match="unknown Gaussian schedule"):
        gaussian_betas("nope", 10)
    with pytest.raises(ValueError, match="unknown Gaussian schedule"):
        DiffusionLMConfig(schedule="spindle", **TINY)
    with pytest.raises(ValueError, match="sampling_method"):
        DiffusionLMConfig(sampling_method="euler", **TINY)


@pytest.mark.parametrize("name", GAUSSIAN_SCHEDULES)
def test_respace(name):
    T = 2000
    s = GaussianSchedule(name, T)
    for n in (2, 3, 10, 37, 200, 1999, T):
        r = s.respace(n)
        assert len(r) == n and len(r.timesteps) == n, n
        assert int(r.timesteps[0]) == 0 and int(r.timesteps[-1]) == T - 1, n
        assert bool((r.timesteps[1:] > r.timesteps[:-1]).all()), n
        # the respaced chain has the original signal level at its timesteps
        torch.testing.assert_close(r.alpha_bar, s.alpha_bar[r.timesteps], rtol=1e-10, atol=1e-15)
        assert bool(((r.betas > 0) & (r.betas < 1)).all()), n
        assert r.num_train_steps == T and r.name == name
    full = s.respace(T)
    assert torch.equal(full.timesteps, torch.arange(T))
    torch.testing.assert_close(full.betas, s.betas, rtol=0, atol=1e-12)
    # respacing a respaced chain keeps original step indices
    rr = s.respace(100).respace(10)
    assert int(rr.timesteps[0]) == 0 and int(rr.timesteps[-1]) == T - 1
    torch.testing.assert_close(rr.alpha_bar, s.alpha_bar[rr.timesteps], rtol=1e-10, atol=1e-15)
    for bad in (0, -1, T + 1):
        with pytest.raises(ValueError, match="sampling steps must be between 1 and 2000"):
            s.respace(bad)


# ----------------------------------------------------------------------------------- forward process
def test_add_noise_matches_q_xt_given_x0():
    s = GaussianSchedule("sqrt", 2000)
    g = torch.Generator().manual_seed(0)
    d, n = 8, 20000
    x0 = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0], dtype=torch.float64)
    for k in (0, 50, 500, 1500, 1999):
        noise = torch.randn(n, d, generator=g, dtype=torch.float64)
        xt = s.add_noise(x0.expand(n, d), torch.full((n,), k), noise)
        ab = float(s.alpha_bar[k])
        var = 1 - ab
        se_mean = math.sqrt(var / n)
        se_var = var * math.sqrt(2 / (n - 1))
        mean, v = xt.mean(0), xt.var(0)
        assert bool(((mean - math.sqrt(ab) * x0).abs() < 5 * se_mean).all()), (k, mean, math.sqrt(ab) * x0)
        assert bool(((v - var).abs() < 5 * se_var).all()), (k, v, var)
    # per-row steps, exactly the documented formula, and the inputs untouched
    k = torch.tensor([0, 10, 1000, 1999])
    x0b = torch.randn(4, 3, 5, generator=g)
    nz = torch.randn(4, 3, 5, generator=g)
    before = x0b.clone()
    out = s.add_noise(x0b, k, nz)
    assert out.dtype == torch.float32 and out.shape == x0b.shape
    assert torch.equal(x0b, before)
    ab = s.alpha_bar[k].float()[:, None, None]
    torch.testing.assert_close(out, ab.sqrt() * x0b + (1 - ab).sqrt() * nz)


# ------------------------------------------------------------------------------------- reverse step
def _xt(schedule, k, x0, eps):
    ab = float(schedule.alpha_bar[k])
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps


@pytest.mark.parametrize("respaced", [False, True])
def test_ddim_eta0_deterministic_and_exact(respaced):
    s = GaussianSchedule("sqrt", 200)
    s = s.respace(20) if respaced else s
    g0 = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 6, 4, generator=g0, dtype=torch.float64)
    eps = torch.randn(3, 6, 4, generator=g0, dtype=torch.float64)
    for k in (len(s) - 1, len(s) // 2, 1):
        xt = _xt(s, k, x0, eps)
        ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        state = ga.get_state()
        a = s.step(x0, k, xt, ga, "ddim", eta=0.0)
        b = s.step(x0, k, xt, gb, "ddim", eta=0.0)
        assert torch.equal(a, b) and torch.equal(ga.get_state(), state), "DDIM eta=0 must not draw noise"
        # a perfect x0 prediction moves x_t exactly along its own noise direction
        ab_prev = float(s.alpha_bar_prev[k])
        torch.testing.assert_close(a, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps, rtol=1e-9, atol=1e-9)
    # chain index 0: alpha_bar_prev is 1, so the step returns the predicted x0 itself
    assert float(s.alpha_bar_prev[0]) == 1.0
    xt = _xt(s, 0, x0, eps)
    x0_hat = x0 + 0.1
    assert torch.equal(s.step(x0_hat, 0, xt, None, "ddim"), x0_hat)


def test_ddpm_step_noise_and_k0():
    s = GaussianSchedule("sqrt", 200).respace(25)
    g0 = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 5, 4, generator=g0)
    xt = torch.randn(2, 5, 4, generator=g0)
    # k = 0: the posterior mean, which is x0_hat (alpha_bar_prev = 1), and no noise drawn
    ga = torch.Generator().manual_seed(3)
    state = ga.get_state()
    out0 = s.step(x0, 0, xt, ga, "ddpm")
    assert torch.equal(ga.get_state(), state)
    assert torch.equal(out0, s.step(x0, 0, xt, torch.Generator().manual_seed(4), "ddpm"))
    torch.testing.assert_close(out0, x0, rtol=1e-6, atol=1e-6)
    # k > 0: noise is drawn from the generator, reproducibly
    a = s.step(x0, 5, xt, torch.Generator().manual_seed(3), "ddpm")
    b = s.step(x0, 5, xt, torch.Generator().manual_seed(3), "ddpm")
    c = s.step(x0, 5, xt, torch.Generator().manual_seed(4), "ddpm")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.dtype == torch.float32
    with pytest.raises(ValueError, match="method must be 'ddpm' or 'ddim'"):
        s.step(x0, 5, xt, None, "euler")
    with pytest.raises(ValueError, match="method must be 'ddpm' or 'ddim'"):
        s.step(x0, 0, xt, None, "euler")


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_noise_scale_multiplies_the_step_noise(method, eta):
    s = GaussianSchedule("sqrt", 200).respace(25)
    g0 = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(3, 6, 4, generator=g0), torch.randn(3, 6, 4, generator=g0)
    mean = s.step(x0, 9, xt, torch.Generator().manual_seed(2), method, eta=eta, noise_scale=0.0)
    full = s.step(x0, 9, xt, torch.Generator().manual_seed(2), method, eta=eta)
    assert torch.equal(full, s.step(x0, 9, xt, torch.Generator().manual_seed(2), method, eta=eta, noise_scale=1.0))
    half = s.step(x0, 9, xt, torch.Generator().manual_seed(2), method, eta=eta, noise_scale=0.5)
    assert not torch.allclose(full, mean)  # the step does draw noise
    torch.testing.assert_close(half - mean, 0.5 * (full - mean))  # same draw, half the standard deviation
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    s.step(x0, 9, xt, g, method, eta=eta, noise_scale=0.0)
    assert torch.equal(g.get_state(), state)  # scale 0 draws nothing


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_reverse_step_preserves_marginals(method, eta):
    """With the true x0: x_k ~ q(x_k | x0) then one reverse step gives x_{k-1} ~ q(x_{k-1} | x0)."""
    s = GaussianSchedule("sqrt", 2000).respace(40)
    g = torch.Generator().manual_seed(5)
    n, d = 20000, 4
    x0 = torch.tensor([-1.5, 0.0, 0.7, 2.0], dtype=torch.float64).expand(n, d)
    for k in (39, 20, 3):
        xt = _xt(s, k, x0, torch.randn(n, d, generator=g, dtype=torch.float64))
        prev = s.step(x0, k, xt, g, method, eta=eta)
        ab_prev = float(s.alpha_bar_prev[k])
        var = 1 - ab_prev
        assert bool(((prev.mean(0) - math.sqrt(ab_prev) * x0[0]).abs() < 5 * math.sqrt(var / n)).all()), k
        assert bool(((prev.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()), (k, prev.var(0), var)


# ------------------------------------------------------------------------------------------ rounding
def test_nearest_tokens_recover_clean_embeddings():
    model = _tiny_model()
    emb = model.embedding_matrix.detach()
    ids = torch.arange(emb.shape[0]).reshape(4, 77)
    scores = _nearest_tokens(emb[ids], emb)
    assert scores.shape == (4, 77, emb.shape[0])
    assert torch.equal(scores.argmax(-1), ids)
    # the score is minus the squared distance
    x = torch.randn(2, 3, emb.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_nearest_tokens(x, emb), -torch.cdist(x, emb[None].expand(2, -1, -1)) ** 2,
                               rtol=1e-4, atol=1e-3)
    allowed = torch.zeros(3, emb.shape[0], dtype=torch.bool)
    allowed[:, 5:10] = True
    masked = _nearest_tokens(x, emb, allowed)
    assert bool(torch.isneginf(masked[..., :5]).all()) and bool(torch.isfinite(masked[..., 5:10]).all())


@pytest.mark.parametrize("codec,seq,constraints", [
    ("expanded", [BOS, _el("Na"), _el("Cl"), EOS], Constraints()),
    ("expanded", [BOS, _el("Li"), _el("Fe"), _el("P"), _el("O"), _el("O"), EOS],
     Constraints(require=["Li"], max_elements=4)),
    ("compact", [BOS, _el("Na"), _count(1), _el("Cl"), _count(1), EOS], Constraints()),
    ("compact", [BOS, _el("Ba"), _count(1), _el("Ti"), _count(1), _el("O"), _count(3), EOS],
     Constraints(elements=["Ba", "Ti", "O", "Sr"], require=["O"])),
])
def test_greedy_rounding_of_clean_embeddings_gives_back_the_sequence(codec, seq, constraints):
    model = _tiny_model(codec)
    L = SEQ[codec]
    seq = torch.tensor(seq + [PAD] * (L - len(seq)))[None]
    emb = model.embedding_matrix.detach()
    rules = LogitRules(constraints, codec, L, model.config.vocab_size, model.config.max_count)
    ids = torch.full((1, L), MASK)
    ids[:, 0] = BOS
    choose = torch.ones_like(ids, dtype=torch.bool)
    choose[:, 0] = False
    out = rules.assign(ids, _nearest_tokens(emb[seq], emb, rules.static), choose, None, greedy=True)
    assert torch.equal(out, seq)
    # and slightly perturbed embeddings still round to it
    noisy = emb[seq] + 0.05 * torch.randn(emb[seq].shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rules.assign(ids, _nearest_tokens(noisy, emb, rules.static), choose, None, greedy=True), seq)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_finite_deterministic_and_stats():
    model = _tiny_model()
    x0 = torch.full((10, SEQ["expanded"]), PAD)
    x0[:, 0], x0[:, 1], x0[:, 2], x0[:, 3] = BOS, _el("Na"), _el("Cl"), EOS
    x0[5:, 3], x0[5:, 4] = _el("O"), EOS
    loss, stats = gaussian_diffusion_loss(model, model.config, x0, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss) > 0
    assert set(stats) == {"mse", "rounding_nll", "prior"}
    assert all(math.isfinite(v) and v >= 0 for v in stats.values())
    assert float(loss) == pytest.approx(stats["mse"] + stats["rounding_nll"] + stats["prior"], rel=1e-5)
    loss2, stats2 = gaussian_diffusion_loss(model, model.config, x0, torch.Generator().manual_seed(0))
    assert float(loss) == float(loss2) and stats == stats2
    loss3, _ = gaussian_diffusion_loss(model, model.config, x0, torch.Generator().manual_seed(1))
    assert float(loss3) != float(loss)
    # end to end: the embeddings (and the rounding bias) get gradients
    loss.backward()
    for p in (model.word_embedding.weight, model.lm_bias, model.output_proj[-1].weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    assert model.training_loss(x0, torch.Generator().manual_seed(0))[0].item() == pytest.approx(float(loss))


def test_loss_randomness_comes_from_the_generator_and_t_is_stratified():
    model = _tiny_model()
    b, L, d, T = 10, SEQ["expanded"], model.config.embedding_dim, model.config.diffusion_steps
    x0 = torch.full((b, L), PAD)
    x0[:, :4] = torch.tensor([BOS, _el("K"), _el("F"), EOS])
    seen = {}

    def spy(**kw):
        seen.update(kw)
        return model(**kw)

    gaussian_diffusion_loss(spy, model.config, x0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    torch.rand(1, generator=g)
    assert torch.equal(seen["noise"], torch.randn(b, L, d, generator=g))
    assert torch.equal(seen["noise0"], torch.randn(b, L, d, generator=g))
    t = seen["t"]
    assert t.dtype == torch.long and bool(((t >= 0) & (t < T)).all())
    # one draw in each of the b strata of [0, T) (T / b = 5 here)
    assert sorted((t // (T // b)).tolist()) == list(range(b))


def test_loss_terms_match_the_documented_objective():
    """Recompute the Diffusion-LM loss from its definition, with t = 0 (target: the clean embeddings)."""
    model = _tiny_model(seed=2)
    b, L, d = 6, SEQ["expanded"], model.config.embedding_dim
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 108, (b, L), generator=g)
    ids[:, 0] = BOS
    t = torch.tensor([0, 0, 1, 10, 25, T_TINY - 1])
    noise, noise0 = torch.randn(b, L, d, generator=g), torch.randn(b, L, d, generator=g)
    with torch.no_grad():
        loss, stats = model(t=t, input_ids=ids, noise=noise, noise0=noise0)
        ab = torch.cumprod(1 - gaussian_betas("sqrt", T_TINY), 0).float()
        E, bias = model.word_embedding.weight, model.lm_bias
        x_mean = E[ids]
        x0 = x_mean + math.sqrt(1 - float(ab[0])) * noise0
        abt = ab[t][:, None, None]
        xt = abt.sqrt() * x0 + (1 - abt).sqrt() * noise
        x0_hat = model(xt, t)
        target = x0.clone()
        target[:2] = x_mean[:2]
        mse = ((x0_hat - target) ** 2).mean((1, 2))
        prior = (float(ab[-1]) * x_mean**2).mean((1, 2))
        nll = F.cross_entropy((x0 @ E.t() + bias).reshape(-1, E.shape[0]), ids.reshape(-1), reduction="none")
        nll = nll.reshape(b, L).mean(1)
    assert stats["mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert stats["prior"] == pytest.approx(float(prior.mean()), rel=1e-5)
    assert stats["rounding_nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert float(loss) == pytest.approx(float((mse + prior + nll).mean()), rel=1e-5)


def test_training_loss_decreases(trained):
    log = _log(trained)
    recs = [r for r in log if "loss" in r]
    assert len(recs) == 200
    losses = [r["loss"] for r in recs]
    assert all(math.isfinite(v) for v in losses)
    assert all({"mse", "rounding_nll", "prior"} <= set(r) for r in recs)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    evals = [r["eval"] for r in log if "eval" in r]
    assert len(evals) == 2
    for ev in evals:
        assert math.isfinite(ev["val_loss"]) and ev["sample_parse_rate"] == 1.0  # expanded always parses


# ------------------------------------------------------------------------------------- save / load
def test_init_and_save_pretrained_roundtrip(tmp_path):
    model = _tiny_model(seed=3, schedule="cosine", sampling_steps=20, sampling_method="ddim", clamp=True,
                        embedding_dim=12)
    w = model.word_embedding.weight
    assert w.shape == (308, 12)
    assert abs(float(w.std()) - 1.0) < 0.05 and abs(float(w.mean())) < 0.05  # Diffusion-LM's unit-scale init
    assert float(model.lm_bias.abs().max()) == 0.0
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "diffusion-lm"
    again = DiffusionLMModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    cfg = again.config
    assert (cfg.schedule, cfg.diffusion_steps, cfg.sampling_steps, cfg.sampling_method, cfg.clamp, cfg.embedding_dim,
            cfg.seq_length, cfg.codec) == ("cosine", T_TINY, 20, "ddim", True, 12, 16, "expanded")
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(again.word_embedding.weight, w) and abs(float(again.word_embedding.weight.std()) - 1) < 0.05
    x = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 20, 49])
    with torch.no_grad():
        assert torch.equal(model(x, t), again(x, t))


def test_respace_one_step_is_the_last_step():
    one = GaussianSchedule("sqrt", 100).respace(1)
    assert one.timesteps.tolist() == [99]
    assert float(one.alpha_bar[0]) == pytest.approx(float(GaussianSchedule("sqrt", 100).alpha_bar[-1]))


def test_loaded_model_computes_the_training_loss(tmp_path):
    model = _tiny_model(seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = DiffusionLMModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    x0 = torch.full((4, SEQ["expanded"]), PAD)
    x0[:, :4] = torch.tensor([BOS, _el("Na"), _el("Cl"), EOS])
    want = gaussian_diffusion_loss(model, model.config, x0, torch.Generator().manual_seed(0))[0]
    got = gaussian_diffusion_loss(again, again.config, x0, torch.Generator().manual_seed(0))[0]
    assert float(got) == float(want)


def test_fine_tune_from_a_trained_diffusion_lm(trained, tmp_path, corpus_file):
    from composition_lm.training import train

    export = train(_train_args(tmp_path / "ft", corpus_file, init_from=str(trained / "model"), max_steps=2))
    assert load_model(export).model_type == "diffusion-lm"


def test_load_model_on_training_export(trained):
    loaded = load_model(trained / "model")
    assert loaded.model_type == "diffusion-lm"
    assert isinstance(loaded.model, DiffusionLMModel) and not loaded.model.training
    cfg = loaded.config
    assert (cfg.codec, cfg.seq_length, cfg.hidden_size, cfg.diffusion_steps, cfg.embedding_dim, cfg.schedule) == (
        "expanded", 16, 32, T_TINY, 16, "sqrt")
    assert loaded.training_formulas() == {str(parse_formula(f)) for f in CORPUS}
    from safetensors.torch import load_file

    stored = load_file(str(trained / "model" / "model.safetensors"))
    sd = loaded.model.state_dict()
    assert "word_embedding.weight" in stored
    for k, v in stored.items():
        assert torch.equal(sd[k], v), k


# ------------------------------------------------------------------------------------------ sampling
def test_generate_same_seed_same_samples_other_seed_differs(trained):
    lm = load_model(trained / "model")
    a = generate(lm, 30, steps=20, seed=11, progress=False, validity="none")
    b = generate(lm, 30, steps=20, seed=11, progress=False, validity="none")
    c = generate(lm, 30, steps=20, seed=12, progress=False, validity="none")
    assert len(a) == 30 and all(f is not None for _, f, _ in a)
    assert [r for r, _, _ in a] == [r for r, _, _ in b]
    assert [r for r, _, _ in a] != [r for r, _, _ in c]
    assert len({r for r, _, _ in a}) > 1
    # batches share one generator, in order: reproducible with any batch size
    d = generate(lm, 30, steps=20, seed=11, batch_size=7, progress=False, validity="none")
    assert [r for r, _, _ in d] == [r for r, _, _ in generate(lm, 30, steps=20, seed=11, batch_size=7, progress=False, validity="none")]
    assert len(d) == 30


def _reference_sampler(model, n, generator, rules, steps=None, method="ddpm", clamp=False):
    """A plain DDPM (or DDIM, eta = 0) loop, then greedy rounding under ``rules``; with ``clamp`` each
    predicted x0 is replaced by the nearest embedding allowed at its position. With ``steps`` = T (default) it runs on the
    original betas; with fewer, on the evenly spaced original steps round(linspace(0, T-1, steps)) with the
    betas 1 - abar[t_k] / abar[t_(k-1)] of that sub-chain."""
    cfg = model.config
    T = cfg.diffusion_steps
    steps = steps or T
    betas = gaussian_betas(cfg.schedule, T)
    ab_full = torch.cumprod(1 - betas, 0)
    if steps == T:
        ts, ab = torch.arange(T), ab_full
    else:
        ts = torch.linspace(0, T - 1, steps).round().long()
        ab = ab_full[ts]
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    x = torch.randn((n, rules.length, cfg.embedding_dim), generator=generator)
    emb = model.embedding_matrix.detach()
    with torch.no_grad():
        for k in reversed(range(steps)):
            x0 = model(x, torch.full((n,), int(ts[k]), dtype=torch.long))
            if clamp:
                d2 = torch.cdist(x0, emb[None].expand(n, -1, -1)) ** 2
                x0 = emb[d2.masked_fill(~rules.static, torch.inf).argmin(-1)]
            beta, a, ap = float(betas[k]), float(ab[k]), float(ab_prev[k])
            if method == "ddim":
                eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
                x = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
                continue
            mean = (math.sqrt(ap) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - ap) / (1 - a)) * x
            if k > 0:
                x = mean + math.sqrt(beta * (1 - ap) / (1 - a)) * torch.randn(x.shape, generator=generator)
            else:
                x = mean
    ids = torch.full((n, rules.length), MASK)
    ids[:, 0] = BOS
    choose = torch.ones_like(ids, dtype=torch.bool)
    choose[:, 0] = False
    return rules.assign(ids, _nearest_tokens(x, emb, rules.static), choose, None, greedy=True)


@pytest.mark.parametrize("which,steps,method,clamp", [
    ("untrained", T_TINY, "ddpm", False), ("trained", T_TINY, "ddpm", False), ("trained", 10, "ddpm", False),
    ("trained", 10, "ddim", False), ("trained", 10, "ddim", True), ("trained", 10, "ddpm", True),
])
def test_sampler_equals_reference_loop(which, steps, method, clamp, trained):
    model = _tiny_model(seed=5) if which == "untrained" else load_model(trained / "model").model
    c = Constraints(elements=["Li", "Fe", "P", "O"]) if clamp else Constraints()
    rules = LogitRules(c, "expanded", 16, 308, 200)
    got = sample_gaussian_diffusion(model, 12, steps, torch.Generator().manual_seed(4), rules, method=method,
                                    clamp=clamp)
    want = _reference_sampler(model, 12, torch.Generator().manual_seed(4), rules, steps, method, clamp)
    assert torch.equal(got, want)
    if which == "trained":
        assert len({tuple(r) for r in got.tolist()}) > 1  # a meaningful comparison


def test_clamp_and_ddim_give_valid_tokens(trained):
    lm = load_model(trained / "model")
    model = lm.model
    for codec_rules in (LogitRules(Constraints(), "expanded", 16, 308, 200),
                        LogitRules(Constraints(elements=["Li", "Fe", "P", "O"]), "expanded", 16, 308, 200)):
        static = codec_rules.static
        for method, clamp in (("ddpm", True), ("ddim", False), ("ddim", True)):
            g = torch.Generator().manual_seed(0)
            ids = sample_gaussian_diffusion(model, 16, 10, g, codec_rules, method=method, clamp=clamp)
            assert ids.shape == (16, 16) and ids.dtype == torch.long
            assert bool(static.gather(1, ids.t()).t().all()), (method, clamp)  # every token allowed where it stands
            again = sample_gaussian_diffusion(model, 16, 10, torch.Generator().manual_seed(0), codec_rules,
                                              method=method, clamp=clamp)
            assert torch.equal(ids, again)
            assert all(f is not None for _, f, _ in decode_samples(ids, "expanded"))
    # DDIM (eta = 0) draws only the starting noise: two generators in the same state agree, and
    # the generator is left where a single randn of the start shape leaves it
    rules = LogitRules(Constraints(), "expanded", 16, 308, 200)
    g = torch.Generator().manual_seed(9)
    sample_gaussian_diffusion(model, 5, 10, g, rules, method="ddim", clamp=False)
    ref = torch.Generator().manual_seed(9)
    torch.randn((5, 16, model.config.embedding_dim), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    # generate() takes the method / clamp overrides and the config defaults
    a = generate(lm, 10, steps=10, seed=0, method="ddim", clamp=True, progress=False, dtype="float32", validity="none")
    assert len(a) == 10 and all(f is not None for _, f, _ in a)


def test_sampler_rejects_more_steps_than_training_steps():
    lm = _loaded(_tiny_model())
    with pytest.raises(ValueError, match="sampling steps must be between 1 and 50"):
        generate(lm, 2, steps=T_TINY + 1, progress=False, validity="none")
    with pytest.raises(ValueError, match="no validity condition"):
        generate(lm, 2, steps=5, condition="valid", progress=False, validity="none")


def test_default_sampling_steps_work_for_a_short_chain():
    lm = _loaded(_tiny_model())
    assert len(generate(lm, 3, progress=False, dtype="float32", validity="none")) == 3


# --------------------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("codec,name", _constraint_params())
def test_constraints_hold_untrained(codec, name):
    c = CASES[name]
    lm = _loaded(_tiny_model(codec, seed=1))
    _check_all(generate(lm, 24, steps=10, seed=0, **c.as_dict(), progress=False, validity="none"), c)
    _check_all(generate(lm, 12, steps=5, seed=1, **c.as_dict(), progress=False, method="ddim", clamp=True, validity="none"), c)


@pytest.mark.parametrize("codec,name", _constraint_params())
def test_constraints_hold_trained(codec, name, trained, trained_compact):
    c = CASES[name]
    lm = load_model((trained if codec == "expanded" else trained_compact) / "model")
    _check_all(generate(lm, 30, steps=20, seed=0, **c.as_dict(), progress=False, validity="none"), c)
    _check_all(generate(lm, 12, steps=10, seed=1, **c.as_dict(), progress=False, clamp=True, validity="none"), c)


# ----------------------------------------------------------------------------------------------- CLI
def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _cli_train_args(corpus, out, *extra):
    return ["train", "--model", "diffusion-lm", "--corpus", str(corpus), "--train-split", "", "--val-split", "",
            "--output-dir", str(out), "--seq-length", "16", "--hidden-size", "32", "--layers", "1", "--heads", "2",
            "--intermediate-size", "64", "--batch-size", "8", "--warmup-steps", "2", "--embedding-dim", "8",
            "--diffusion-steps", "50", "--no-progress", *extra]


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("cli-lm")
    assert main(_cli_train_args(corpus_file, out, "--max-steps", "5", "--eval-every", "0")) == 0
    return out / "model"


def test_cli_train_writes_a_diffusion_lm_model(cli_model):
    cfg = json.loads((cli_model / "config.json").read_text())
    assert cfg["model_type"] == "diffusion-lm"
    assert (cfg["diffusion_steps"], cfg["embedding_dim"], cfg["schedule"], cfg["hidden_size"]) == (50, 8, "sqrt", 32)
    assert json.loads((cli_model / "training_args.json").read_text())["model_type"] == "diffusion-lm"
    assert load_model(cli_model).model_type == "diffusion-lm"


def test_cli_sample_diffusion_lm(cli_model, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(cli_model), "-n", "20", "--steps", "10", "--no-progress",
                 "-o", str(out)]) == 0
    rows = _read_csv(out / "formulas.csv")
    assert len(rows) == 20 and [r["index"] for r in rows] == [str(i) for i in range(20)]
    assert all(r["parse_ok"] == "True" for r in rows)  # expanded codec: element tokens only
    run = json.loads((out / "run_config.json").read_text())
    assert run["model_type"] == "diffusion-lm" and run["steps"] == 10 and run["summary"]["n_samples"] == 20
    # method / clamp flags and constraints through the CLI
    out2 = tmp_path / "s2"
    assert main(["sample", "--model", str(cli_model), "-n", "8", "--steps", "5", "--method", "ddim", "--clamp",
                 "--require", "Li", "--max-elements", "2", "--no-progress", "-o", str(out2)]) == 0
    rows = _read_csv(out2 / "formulas.csv")
    assert len(rows) == 8
    for r in rows:
        els = set(parse_formula(r["formula"]).elements)
        assert "Li" in els and len(els) <= 2, r
    run = json.loads((out2 / "run_config.json").read_text())
    assert (run["method"], run["clamp"]) == ("ddim", True)


def test_cli_sample_bad_options_exit_2(cli_model, tmp_path, capsys):
    capsys.readouterr()
    for extra in (["--condition", "valid"], ["--condition", "invalid"], ["--steps", "51"]):
        bad = tmp_path / "bad"
        assert main(["sample", "--model", str(cli_model), "-n", "4", *extra, "--no-progress", "-o", str(bad)]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err, err
        assert not bad.exists(), extra


def test_cli_train_short_chain_with_default_evaluation(tmp_path, corpus_file):
    out = tmp_path / "run"
    assert main(_cli_train_args(corpus_file, out, "--max-steps", "2", "--eval-samples", "4")) == 0
    assert (out / "model" / "config.json").is_file()


def test_noise_scale_default_comes_from_the_config_and_can_be_overridden(trained, tmp_path):
    lm = load_model(trained / "model")
    assert lm.config.noise_scale == 1.0
    base = [r for r, _, _ in generate(lm, 40, steps=10, seed=2, progress=False, validity="none")]
    assert base == [r for r, _, _ in generate(lm, 40, steps=10, seed=2, progress=False, noise_scale=1.0, validity="none")]
    low = [r for r, _, _ in generate(lm, 40, steps=10, seed=2, progress=False, noise_scale=0.5, validity="none")]
    assert low != base
    lm.config.noise_scale = 0.5  # the config's value is the default
    try:
        assert low == [r for r, _, _ in generate(lm, 40, steps=10, seed=2, progress=False, validity="none")]
        assert resolve_sampling_settings(lm.config)["noise_scale"] == 0.5
        assert resolve_sampling_settings(lm.config, noise_scale=0.8)["noise_scale"] == 0.8
    finally:
        lm.config.noise_scale = 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="noise scale must be in"):
            generate(lm, 2, steps=2, progress=False, noise_scale=bad, validity="none")
        with pytest.raises(ValueError, match="noise_scale must lie in"):
            DiffusionLMConfig(noise_scale=bad)
    cfg = DiffusionLMConfig(noise_scale=0.9, **TINY)
    cfg.save_pretrained(tmp_path)
    assert DiffusionLMConfig.from_pretrained(tmp_path).noise_scale == 0.9


def test_cli_noise_scale_is_recorded_and_validated(cli_model, tmp_path, capsys):
    out = tmp_path / "ns"
    assert main(["sample", "--model", str(cli_model), "-n", "6", "--steps", "5", "--noise-scale", "0.8",
                 "--no-progress", "-o", str(out)]) == 0
    assert json.loads((out / "run_config.json").read_text())["noise_scale"] == 0.8
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["sample", "--model", str(cli_model), "-n", "4", "--noise-scale", "2", "--no-progress",
                 "-o", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "noise scale" in err and "Traceback" not in err, err
    assert not bad.exists()


def test_family_specific_sampling_options_are_refused():
    lm = _tiny_model()
    for kw in ({"temperature": 0.8}, {"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="Diffusion-BERT"):
            generate(lm, 2, steps=2, progress=False, **kw, validity="none")
    from composition_lm.diffusion_bert import DiffusionBertConfig, DiffusionBertModel

    bert = DiffusionBertModel(DiffusionBertConfig(seq_length=12, **TINY)).eval()
    for kw in ({"method": "ddim"}, {"clamp": True}, {"noise_scale": 0.9}):
        with pytest.raises(ValueError, match="Diffusion-LM"):
            generate(bert, 2, steps=2, progress=False, **kw, validity="none")
    assert len(generate(bert, 2, steps=2, progress=False, temperature=0.8, validity="none")) == 2


@pytest.mark.parametrize("codec", ["expanded", "compact"])
def test_validity_inside_the_sampler_both_codecs(codec, trained, trained_compact):
    from composition_lm.valid_sampling import RepairStats
    from evaluation.validity import check_formulas

    lm = load_model((trained if codec == "expanded" else trained_compact) / "model")
    c = Constraints(elements=["Na", "Cl", "K", "Br", "O"], max_elements=2)
    stats = RepairStats()
    for constraints in (Constraints(), c):
        out = generate(lm, 40, steps=10, seed=0, **constraints.as_dict(), progress=False,
                       validity="cdvae", validity_rounds=30, stats=stats)
        formulas = [f for _, f, _ in out]
        assert None not in formulas and all(r.valid for r in check_formulas(formulas, "cdvae"))
        _check_all(out, constraints)
    assert stats.exact_fixed + stats.rows_resampled > 0  # the tiny model needs the sampler's help
