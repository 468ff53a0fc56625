"""Speed levers of the Diffusion-BERT sampler that the validity issue (17) named, measured in process on the
shipped model: batch size, steps, torch threads (one process with 2 threads against two 1-thread processes
side by side), int8 dynamic quantisation of the Linear layers, and whether a row could be cut to its
live length (the denoiser run on [BOS] .. [EOS] only, without the [PAD] tail) without changing the
denoiser's answer. Raw sampling (``--validity none``), seed 0; min/median/max over ``--repeats``.

Writes benchmarks/sampler_levers.{md,json}. Run: python scripts/bench_sampler_levers.py [--n 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings

from benchlib import ROOT, _spread, cpu

from evaluation.io import write_json, write_text


def _time_generate(model, n: int, repeats: int, **kw) -> dict:
    from composition_lm.sampling import generate
    from composition_lm.valid_sampling import RepairStats

    times, rows = [], None
    for _ in range(repeats):
        stats = RepairStats()
        t = time.perf_counter()
        generate(model, n, seed=0, progress=False, validity="cdvae", validity_rounds=0,
                 validity_exact=False, stats=stats, **kw)
        times.append(time.perf_counter() - t)
        rows = stats.denoiser_rows_first_pass / n
    return {**_spread(times), "denoiser_rows_per_sample": rows}


def _one_thread_child(n: int) -> None:
    """Child process of the two-process measurement: 1 thread, n raw samples."""
    import torch

    from composition_lm.models import load_model
    from composition_lm.sampling import generate

    torch.set_num_threads(1)
    generate(load_model("diffusion-bert"), n, seed=0, progress=False, validity="none")


def trimming_agreement(model, tokenizer, shared, n: int = 2000) -> dict:
    """Denoiser answers on half-masked MP `val` formulas with the whole 32-token row against the row cut
    after its [EOS]: mean total-variation distance and argmax agreement at the masked positions."""
    import torch

    from composition_lm.cli.options import load_spec
    from composition_lm.formula import get_codec
    from composition_lm.tokenizer import MASK, PAD, encode_formulas
    from evaluation.composition import parse_formula

    formulas = sorted(load_spec(f"{shared}/data/formulas/mp_formulas.csv@val")[1])[:n]
    length = model.config.seq_length
    ids, _ = encode_formulas(tokenizer, get_codec(model.config.codec), [parse_formula(f) for f in formulas], length)
    x = torch.tensor([r + [PAD] * (length - len(r)) for r in ids])
    lens = torch.tensor([len(r) for r in ids])
    pos = torch.arange(length)
    content = (pos[None] >= 1) & (pos[None] < (lens - 1)[:, None])
    g = torch.Generator().manual_seed(0)
    x = torch.where(content & (torch.rand(x.shape, generator=g) < 0.5), torch.full_like(x, MASK), x)
    tv = agree = count = 0.0
    with torch.inference_mode():
        full = model(x).float().softmax(-1)
        for cut in sorted(set(lens.tolist())):
            rows = (lens == cut).nonzero().squeeze(1)
            short = model(x[rows, :cut]).float().softmax(-1)
            masked = x[rows, :cut] == MASK
            f = full[rows, :cut]
            tv += float((0.5 * (f - short).abs().sum(-1))[masked].sum())
            agree += float((f.argmax(-1) == short.argmax(-1))[masked].sum())
            count += float(masked.sum())
    return {"masked_positions": int(count), "mean_total_variation": tv / count, "argmax_agreement": agree / count}


def live_fraction(model, n: int = 3000) -> float:
    """Share of the tokens the denoiser evaluates while sampling that lie in the row's live part ([BOS] up
    to its first [EOS]/[PAD], or the whole row while no end is decided): the most that cutting rows to
    their live length could save."""
    import torch

    from composition_lm.sampling import generate
    from composition_lm.tokenizer import EOS, PAD

    seen = [0, 0]
    forward = model.forward

    def counting(x, t=None, **kw):
        ended = ((x == EOS) | (x == PAD)) & (torch.arange(x.shape[1], device=x.device)[None] >= 1)
        live = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(ended[:, 0], x.shape[1],
                                                                                      dtype=torch.long))
        seen[0] += int(live.sum())
        seen[1] += x.numel()
        return forward(x, t, **kw)

    model.forward = counting
    try:
        generate(model, n, seed=0, progress=False, validity="none")
    finally:
        del model.forward
    return seen[0] / seen[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _one_thread_child(args.child)
        return
    import torch

    from composition_lm.models import load_model

    warnings.simplefilter("ignore")
    loaded = load_model("diffusion-bert")
    model = loaded.model
    _time_generate(model, 200, 1)  # warm-up
    res: dict = {"cpu": cpu(), "n": args.n, "repeats": args.repeats, "threads_default": torch.get_num_threads()}
    res["batch_size"] = {bs: _time_generate(model, args.n, args.repeats, batch_size=bs) for bs in (250, 1000, 5000)}
    res["steps"] = {k: _time_generate(model, args.n, args.repeats, steps=k) for k in (32, 16, 8)}
    torch.set_num_threads(1)
    res["one_thread"] = _time_generate(model, args.n, args.repeats)
    torch.set_num_threads(res["threads_default"])
    two = []
    for _ in range(args.repeats):  # two 1-thread processes, each half of the samples, side by side
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--child", str(args.n // 2)], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        for p in procs:
            p.wait()
        two.append(time.perf_counter() - t)
    res["two_processes_one_thread"] = {**_spread(two), "note": "includes each process's start and model load"}
    quantised = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    _time_generate(quantised, 200, 1, dtype="float32")
    res["int8_dynamic"] = _time_generate(quantised, args.n, args.repeats, dtype="float32")
    res["bf16_default"] = res["batch_size"][1000]
    res["trimming"] = trimming_agreement(model, loaded.tokenizer, args.shared)
    res["trimming"]["live_token_fraction"] = live_fraction(model)

    def row(label: str, r: dict) -> str:
        return (f"| {label} | {r['min']:.1f} / {r['median']:.1f} / {r['max']:.1f} | "
                f"{r.get('denoiser_rows_per_sample', float('nan')):.2f} |")

    lines = ["# Sampler speed levers (Diffusion-BERT, raw sampling)", "",
             f"`python scripts/bench_sampler_levers.py --n {args.n} --repeats {args.repeats}`; CPU {res['cpu']}; "
             f"{args.n} samples, seed 0, seconds in process (min / median / max over {args.repeats}).", "",
             "| lever | seconds | denoiser rows / sample |", "|---|---:|---:|"]
    lines += [row(f"batch size {bs}", r) for bs, r in res["batch_size"].items()]
    lines += [row(f"{k} steps (batch 1000)", r) for k, r in res["steps"].items()]
    lines += [row(f"1 thread (default {res['threads_default']})", res["one_thread"]),
              row("two 1-thread processes, half each (with start-up and load)", res["two_processes_one_thread"]),
              row("int8 dynamic quantisation (float32 activations)", res["int8_dynamic"]),
              row("bfloat16 autocast (the default here)", res["bf16_default"])]
    t = res["trimming"]
    lines += ["", f"Cutting rows to their live length: {t['live_token_fraction']:.3f} of the tokens the denoiser "
              "evaluates while sampling lie before the row's decided end (the rest is the [PAD] tail), so cutting "
              f"could save at most {1 - t['live_token_fraction']:.0%} of the forward work. On {t['masked_positions']} masked positions of half-masked MP "
              f"`val` formulas the shipped denoiser's answer changes (mean total variation {t['mean_total_variation']:.3f}, "
              f"argmax agreement {t['argmax_agreement']:.3f}): it was trained on whole 32-token rows with the [PAD] "
              "tail visible, so skipping the tail is not exact without retraining with the tail masked out of attention."]
    write_json(ROOT / "benchmarks/sampler_levers.json", res)
    write_text(ROOT / "benchmarks/sampler_levers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
