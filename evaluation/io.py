"""Small I/O helpers: every output is written to a temporary file and renamed into place."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["append_jsonl", "atomic_path", "csv_cell", "json_safe", "shown_path", "write_csv", "write_json",
           "write_text"]


def shown_path(path: str | Path) -> str:
    """``path`` as a report names it: relative to the working directory when it lies below it, so a committed
    report names no machine's absolute paths; otherwise as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@functools.cache
def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600 files; give the output a plain open()'s mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def csv_cell(value):
    """A table value as the CSV writes it: a missing value (None, or pandas' NA of a nullable column) is an
    empty cell; anything else is written as it is."""
    from pandas import NA

    return "" if value is None or value is NA else value


def write_csv(path_or_file, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV (Python's ``csv`` dialect) of ``rows`` under ``header``: to ``path_or_file`` (written to a
    temporary file and renamed) or to an open text file; missing values become empty cells."""
    import csv

    def dump(fh) -> None:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows([csv_cell(v) for v in row] for row in rows)

    if hasattr(path_or_file, "write"):
        dump(path_or_file)
        return
    with atomic_path(path_or_file) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        dump(fh)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line to a log (a run's ``log.jsonl``): a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def json_safe(x):
    """Nested dicts/lists made JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
