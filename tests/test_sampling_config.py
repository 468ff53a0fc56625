"""Sampler settings as one typed object: checks, round trips, the model's saved defaults, options derived from the
fields, ``--config`` reproducing a run, the schedulers owning the schedule, and ``--help`` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from composition_lm.sampling_config import SAMPLING_CONFIG_NAME, SamplingConfig


def test_sampling_config_checks_ranges_choices_and_names():
    assert SamplingConfig().validity == "cdvae" and SamplingConfig().steps is None
    with pytest.raises(ValueError, match="top p must be in"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError, match="validity must be one of cdvae, smact, none"):
        SamplingConfig(validity="neutral")
    with pytest.raises(ValueError, match="unknown sampling setting stepz; known: steps"):
        SamplingConfig().replace(stepz=3)
    with pytest.raises(ValueError, match="batch size may not be None"):
        SamplingConfig(batch_size=None)
    c = SamplingConfig(elements="Li, Fe,O", require=["Li"], exclude="", condition="none", targets="band_gap=1:3")
    assert c.elements == ["Li", "Fe", "O"] and c.require == ["Li"] and c.exclude is None
    assert c.condition is None and c.targets == ["band_gap=1:3"]


def test_sampling_config_round_trips_through_json_and_yaml(tmp_path):
    c = SamplingConfig(steps=12, temperature=0.8, require=["Li"], max_elements=4, validity="smact", guidance=2.0)
    assert SamplingConfig.load(c.save(tmp_path / "s.json")) == c
    (tmp_path / "s.yaml").write_text("steps: 12\ntemperature: 0.8\nrequire: [Li]\nmax_elements: 4\n"
                                     "validity: smact\nguidance: 2.0\n")
    assert SamplingConfig.load(tmp_path / "s.yaml") == c
    with pytest.raises(ValueError, match="unknown sampling setting colour"):
        SamplingConfig.from_dict({"colour": "red"})
    assert SamplingConfig.from_dict({"colour": "red", "steps": 3}, strict=False).steps == 3
    (tmp_path / "bad.json").write_text("{steps: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingConfig.load(tmp_path / "bad.json")


def test_the_model_folder_carries_its_sampling_defaults(tmp_path):
    from composition_lm import FormulaGenerator

    gen = FormulaGenerator.from_pretrained("diffusion-bert")
    gen.sampling_config = gen.sampling_config.replace(steps=6, validity="none", require=["O"])
    gen.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / SAMPLING_CONFIG_NAME).read_text())["steps"] == 6
    again = FormulaGenerator.from_pretrained(tmp_path / "m")
    assert again.sampling_config == gen.sampling_config
    table = again.generate(12, seed=1)  # the saved defaults apply
    assert table.attrs["sampling"]["steps"] == 6 and all("O" in f for f in table["formula"] if f)
    over = again.generate(12, seed=1, steps=3, require=None)  # a call overrides what it names
    assert over.attrs["sampling"]["steps"] == 3 and over.attrs["sampling"]["require"] is None
    # the recorded settings reproduce the table
    recorded = {k: v for k, v in table.attrs["sampling"].items() if k not in ("n", "seed")}
    replay = FormulaGenerator.from_pretrained("diffusion-bert").generate(12, seed=1, config=SamplingConfig(**recorded))
    assert replay["sample"].tolist() == table["sample"].tolist()


def test_sample_options_come_from_the_config_fields_and_config_file_reproduces_a_run(tmp_path, capsys):
    from composition_lm.cli import build_parser, main

    sample_help = build_parser().parse_args(["sample", "-o", "x"])  # no option given: no setting in the namespace
    assert not any(hasattr(sample_help, name) for name in SamplingConfig.names())
    assert main(["sample", "-n", "16", "--seed", "3", "--steps", "4", "--require", "Li", "--temperature", "0.9",
                 "--validity", "smact", "--no-progress", "-o", str(tmp_path / "a")]) == 0
    run = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert run["steps"] == 4 and run["require"] == ["Li"] and run["validity"] == "smact" and run["n"] == 16
    import torch

    from composition_lm.sampling import resolve_dtype

    # `dtype auto` is recorded as asked and as it ran on this machine (bfloat16 on AVX512-BF16/AMX CPUs)
    ran = resolve_dtype("auto", torch.device("cpu"))
    assert run["dtype"] == "auto" and run["dtype_used"] == ("bfloat16" if ran == torch.bfloat16 else "float32")
    assert main(["sample", "--config", str(tmp_path / "a" / "run_config.json"), "--no-progress",
                 "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "formulas.csv").read_bytes() == (tmp_path / "b" / "formulas.csv").read_bytes()
    # an option given on the command line overrides the file
    assert main(["sample", "--config", str(tmp_path / "a" / "run_config.json"), "--seed", "4", "--no-progress",
                 "-o", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["seed"] == 4
    capsys.readouterr()
    assert main(["sample", "--top-p", "2", "-o", str(tmp_path / "d")]) == 2
    assert "top p must be in (0, 1]" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"temperature": -1}))
    assert main(["sample", "--config", str(tmp_path / "bad.json"), "-o", str(tmp_path / "e")]) == 2
    assert "temperature must be a number > 0" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_help_builds_without_torch_in_well_under_a_second():
    code = ("import sys, time, contextlib, io\n"
            "t = time.perf_counter()\n"
            "from composition_lm.cli import build_parser\n"
            "p = build_parser()\n"
            "for argv in (['--help'], ['sample', '--help'], ['discover', '--help'], ['cdvae', 'sample', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        p.parse_args(argv)\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"], "building the parser imported torch or transformers"
    assert float(out[0]) < 1.0


def test_masked_scheduler_reveals_with_the_trained_schedule():
    from composition_lm.schedulers import MaskedDiffusionScheduler
    from composition_lm.schedules import MaskingSchedule

    vocab = 6
    info = [0.0, 0.0, 0.0, 0.0, -0.5, 0.5]  # token 4 common (little information), token 5 rare
    plain = MaskedDiffusionScheduler(MaskingSchedule("loglinear"))
    plain.set_timesteps(4)
    assert plain.timesteps[0] == (1.0, 0.75) and plain.timesteps[-1][1] == 0.0
    r = plain.token_reveal(0.75, 0.5, vocab, "cpu")
    assert torch.allclose(r, torch.full((vocab,), (0.75 - 0.5) / 0.75), atol=1e-6)  # (t - s) / t for every token
    spindle = MaskedDiffusionScheduler(MaskingSchedule("spindle", token_info=info))
    r = spindle.token_reveal(0.75, 0.5, vocab, "cpu")
    assert r[5] < r[0] < r[4]  # the rare token comes out later in the reverse process, the common one earlier
    assert torch.allclose(spindle.token_reveal(0.25, 0.0, vocab, "cpu"), torch.ones(vocab))  # all revealed at 0

    class Rules:  # draw the one allowed token of each position from probs
        @staticmethod
        def assign(x, probs, choose, generator):
            x = x.clone()
            x[choose] = torch.multinomial(probs[choose], 1, generator=generator).squeeze(1)
            return x

    from composition_lm.tokenizer import MASK

    n, length = 4000, 3
    x = torch.full((n, length), MASK)
    for token in (4, 5):
        probs = torch.zeros(n, length, vocab)
        probs[..., token] = 1.0
        out = spindle.step(x, probs, 0.75, 0.5, torch.Generator().manual_seed(0), Rules)
        share = (out == token).float().mean().item()
        assert share == pytest.approx(r[token].item(), abs=0.02), token


def test_a_spindle_model_is_sampled_with_its_spindle_schedule(monkeypatch):
    from composition_lm import schedulers
    from composition_lm.diffusion_bert import DiffusionBertConfig, DiffusionBertModel
    from composition_lm.sampling import Constraints, LogitRules, sample_masked_diffusion

    cfg = DiffusionBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              seq_length=16, schedule="spindle")
    cfg.token_info = [0.0] * cfg.vocab_size
    model = DiffusionBertModel(cfg).eval()
    seen = []
    original = schedulers.MaskedDiffusionScheduler.token_reveal

    def spy(self, t, s, vocab_size, device):
        seen.append(self.schedule.name)
        return original(self, t, s, vocab_size, device)

    monkeypatch.setattr(schedulers.MaskedDiffusionScheduler, "token_reveal", spy)
    rules = LogitRules(Constraints(), cfg.codec, cfg.seq_length, cfg.vocab_size, cfg.max_count)
    sample_masked_diffusion(model, 4, 3, torch.Generator().manual_seed(0), rules)
    assert seen == ["spindle"] * 3


def test_help_is_quick_in_process():
    from composition_lm.cli import build_parser

    t = time.perf_counter()
    build_parser().format_help()
    assert time.perf_counter() - t < 1.0


def test_cdvae_sampling_settings_travel_with_the_model_and_old_folders_still_load(tmp_path):
    from structure.cdvae import CDVAE
    from structure.cdvae.sampling_config import LEGACY_CONFIG_KEYS, CDVAESamplingConfig

    model = CDVAE.from_pretrained("cdvae-perov5")
    assert model.sampling_config.resample_invalid == 5  # the shipped model's measured settings
    model.sampling_config = model.sampling_config.replace(levels=3, steps=1, composition="per-atom")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert not set(config) & set(LEGACY_CONFIG_KEYS)  # the network's config holds no sampler setting
    again = CDVAE.from_pretrained(tmp_path / "m")
    assert again.sampling_config == model.sampling_config
    a = [s.composition for s in again.sample(3, seed=0)]
    assert a == [s.composition for s in model.sample(3, seed=0)]
    # a folder written before sampling_config.json: its sampler settings are read from config.json
    (tmp_path / "m" / SAMPLING_CONFIG_NAME).unlink()
    config.update({"sample_levels": 3, "sample_steps": 1, "composition_sampler": "per-atom", "resample_invalid": 5,
                   "min_element_share": 0.01, "min_pattern_share": 0.01})
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = CDVAE.from_pretrained(tmp_path / "m")
    assert old.sampling_config == model.sampling_config
    with pytest.raises(ValueError, match="snap angles must be between 0 and 15 degrees"):
        CDVAESamplingConfig(snap_angles=20)


def test_cdvae_sample_options_come_from_the_config_fields(tmp_path, capsys):
    from structure.cdvae.sampling_config import CDVAESamplingConfig

    from composition_lm.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["cdvae"]._subparsers._group_actions[0] \
        .choices["sample"].format_help()
    for name in CDVAESamplingConfig.names():
        flag = "--target" if name == "targets" else "--" + name.replace("_", "-")
        assert flag in help_text, flag
    assert main(["cdvae", "sample", "-n", "2", "--levels", "2", "--steps", "1", "--composition", "per-atom",
                 "--no-progress", "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["cdvae", "sample", "-n", "2", "--snap-angles", "20", "-o", str(tmp_path / "b")]) == 2
    assert "snap angles must be between 0 and 15 degrees" in capsys.readouterr().err


def test_min_p_keeps_tokens_near_the_most_likely_one(tmp_path, capsys):
    """The worked example of issue 36: one new sampling setting, a field plus its use in the sampler."""
    from composition_lm import FormulaGenerator
    from composition_lm.cli import main
    from composition_lm.sampling import _filter_logits

    probs = _filter_logits(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 1.0, None, None, min_p=0.5)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    gen = FormulaGenerator.from_pretrained("diffusion-bert")
    free = gen.generate(60, seed=0, steps=8, validity="none")
    sharp = gen.generate(60, seed=0, steps=8, validity="none", min_p=1.0)  # only the most likely token
    assert sharp["formula"].nunique() < free["formula"].nunique()
    assert main(["sample", "-n", "8", "--steps", "4", "--min-p", "0.1", "--no-progress", "-o", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "run_config.json").read_text())["min_p"] == 0.1
    capsys.readouterr()
    assert main(["sample", "--min-p", "0", "-o", str(tmp_path / "bad")]) == 2
    assert "min p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min-p apply to Diffusion-BERT"):
        FormulaGenerator.from_pretrained("diffusion-lm").generate(4, min_p=0.1)
