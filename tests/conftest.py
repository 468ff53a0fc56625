"""Shared fixtures for the composition-gen test suite."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest

#: The project's shared data folder, a sibling of the repository checkout (read-only, never copied).
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path of the shared data folder; skips the test when it is not there."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR} (data-dependent test)")
    return SHARED_DIR


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file missing: {path}")
    return path


@pytest.fixture(scope="session")
def mp_csv(shared_dir) -> Path:
    return _require(shared_dir / "data" / "formulas" / "mp_formulas.csv")


@functools.cache
def _mp_frame(path: str):
    import pandas as pd

    # keep_default_na=False: a formula such as "NaN" (sodium nitride) must stay a string
    return pd.read_csv(path, keep_default_na=False, dtype=str)


@pytest.fixture(scope="session")
def mp_frame(mp_csv):
    """The Materials Project formula table as a pandas DataFrame (all columns as strings)."""
    return _mp_frame(str(mp_csv))


@pytest.fixture(scope="session")
def mp_reduced_formulas(mp_frame) -> list[str]:
    """Every distinct ``reduced_formula`` of mp_formulas.csv, sorted (deterministic order)."""
    return sorted({f for f in mp_frame["reduced_formula"] if f})


@pytest.fixture(autouse=True)
def _quiet_warnings():
    # pymatgen / smact emit many harmless warnings (missing data for some elements)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: far faster than two contending threads on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
