"""A sampled formula table on disk: ``formulas.csv`` and ``run_config.json``."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["save_samples"]


def save_samples(gen, table, out_dir: str | Path, run: dict, started: float, sampled: float) -> dict:
    """Write ``table`` (from :meth:`FormulaGenerator.generate`) as ``out_dir/formulas.csv`` and
    ``out_dir/run_config.json``: ``run`` (what the caller records, e.g. the command), the model, the settings the
    table was sampled with (``table.attrs["sampling"]``: n, seed and every sampling setting, so the file reproduces
    the run), what the validity guard cost, the machine and the summary. ``started`` / ``sampled``:
    ``time.perf_counter()`` at the start and after sampling. Returns the summary."""
    import platform

    import torch

    from composition_lm.generator import write_formulas
    from evaluation.io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_formulas(table, out_dir / "formulas.csv")
    elapsed = time.perf_counter() - started
    summary = {**gen.summary(table), "seconds": elapsed, "seconds_sampling": sampled - started}
    summary["formulas_per_s"] = summary["n_samples"] / elapsed
    summary["valid_novel_unique_per_s"] = summary["valid_novel_unique_cdvae"] / elapsed
    from composition_lm.sampling import resolve_dtype

    # what `dtype: auto` became on this machine: bfloat16 where the CPU runs it fast (AVX512-BF16/AMX), else float32;
    # the same seed draws other formulas in the other precision
    ran = resolve_dtype(table.attrs["sampling"].get("dtype", "auto"), next(gen.model.parameters()).device)
    config = {**run, "model": str(gen.path), "model_type": gen.model_type, **table.attrs["sampling"],
              "dtype_used": "bfloat16" if ran == torch.bfloat16 else "float32",
              "validity_repair": table.attrs["validity"], "torch": torch.__version__, "machine": platform.platform(),
              "threads": torch.get_num_threads(), "summary": summary}
    write_json(out_dir / "run_config.json", config)
    return summary
