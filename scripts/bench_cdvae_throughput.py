"""CDVAE training throughput on this CPU: seconds per optimisation step (forward + backward + AdamW) of
the training loss on real batches, per setting, min/median/max over repeats, and the ratio of each
setting's median to the baseline's (measured in the same run).

    python scripts/bench_cdvae_throughput.py --dataset mp20 --repeats 3 --steps 8

Settings: baseline (batch 128, 1 thread, fp32, graphs searched every step), graph cache (the encoder's
graphs computed once), 2 threads, batch 64 / 256, bf16 autocast, torch.compile of the decoder. Two
1-thread processes side by side (what `accelerate launch --num_processes 2` does on 2 cores) are
measured as two copies of the baseline run at once. Appends one JSON line per setting to
benchmarks/cdvae_throughput.jsonl; `python scripts/bench_cdvae_levers.py report` tabulates them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import cpu  # noqa: E402

from evaluation.io import append_jsonl  # noqa: E402

OUT = ROOT / "benchmarks" / "cdvae_throughput.jsonl"
DATA = {"perov5": ("perov_5", "val", "cdvae-perov5"), "mp20": ("mp_20", "train", "cdvae-mp20")}
SETTINGS = {  # name: (batch size, threads, bf16, graph cache, compile)
    "baseline": (128, 1, False, False, False),
    "graph cache": (128, 1, False, True, False),
    "graph cache + 2 threads": (128, 2, False, True, False),
    "graph cache + batch 64": (64, 1, False, True, False),
    "graph cache + batch 256": (256, 1, False, True, False),
    "graph cache + bf16 autocast": (128, 1, True, True, False),
    "graph cache + torch.compile": (128, 1, False, True, True),
}


def measure(dataset: str, setting: str, steps: int, repeats: int) -> dict:
    import torch

    from evaluation.training_loop import epoch_batch
    from structure.cdvae.model import CDVAE
    from structure.cdvae.train import CDVAETrainingArguments, load_splits

    batch_size, threads, bf16, cache, compiled = SETTINGS[setting]
    torch.set_num_threads(threads)
    folder, split, model_name = DATA[dataset]
    args = CDVAETrainingArguments(data=str(ROOT.parent / "shared/data/structures" / folder), output_dir="unused",
                                  train_split=split, val_split=None, cache_dir=str(ROOT / "runs/cdvae/cache"),
                                  progress=False)
    train_set = load_splits(args)[0]
    model = CDVAE.from_pretrained(model_name).train()
    t = time.perf_counter()
    if cache:
        train_set.cache_graphs(model.config.cutoff, model.config.max_neighbors)
    cache_seconds = time.perf_counter() - t
    if compiled:
        model.decoder = torch.compile(model.decoder, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(s: int) -> None:
        batch = train_set.batch(epoch_batch(len(train_set), batch_size, 0, s))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.losses(batch, torch.Generator().manual_seed(s))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for s in range(2):  # warm-up (and compilation)
        step(s)
    warmup = time.perf_counter() - t
    per_step = []
    for r in range(repeats):
        t = time.perf_counter()
        for s in range(steps):
            step(2 + r * steps + s)
        per_step.append((time.perf_counter() - t) / steps)
    med = statistics.median(per_step)
    return {"dataset": dataset, "setting": setting, "batch_size": batch_size, "threads": threads, "processes": 1,
            "bf16": bf16, "graph_cache": cache, "compile": compiled, "step_s": {"min": min(per_step), "median": med,
                                                                             "max": max(per_step)},
            "crystals_per_s": batch_size / med, "epoch_s": len(train_set) / batch_size * med,
            "warmup_s": warmup, "cache_s": cache_seconds, "n_train": len(train_set)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATA), default="mp20")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure one setting and print it (a child process)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.dataset, args.one, args.steps, args.repeats)))
        return 0

    def child(setting: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--dataset", args.dataset, "--steps", str(args.steps),
                                 "--repeats", str(args.repeats), "--one", setting], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(SETTINGS[setting][1])})

    rows, base = [], None
    for setting in args.settings.split(","):
        row = json.loads(child(setting).communicate()[0].strip().splitlines()[-1])
        rows.append(row)
        if setting == "baseline":
            base = row["epoch_s"]
    # two 1-thread processes side by side: each gets half the batches of an epoch
    pair = [child("graph cache") for _ in range(2)]
    both = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in pair]
    med = statistics.median([b["step_s"]["median"] for b in both])
    rows.append({**both[0], "setting": "graph cache + 2 processes x 1 thread", "processes": 2,
                 "step_s": {"min": min(b["step_s"]["min"] for b in both), "median": med,
                            "max": max(b["step_s"]["max"] for b in both)},
                 "crystals_per_s": 2 * both[0]["batch_size"] / med,
                 "epoch_s": both[0]["n_train"] / both[0]["batch_size"] * med / 2})
    for row in rows:
        row["ratio"] = base / row["epoch_s"] if base else float("nan")  # epochs per second against the baseline
        row["cpu"] = cpu()
        row["command"] = "python scripts/bench_cdvae_throughput.py " + " ".join(sys.argv[1:])
        append_jsonl(OUT, row)
        print(json.dumps({k: row[k] for k in ("setting", "step_s", "epoch_s", "ratio")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
