"""Formula corpora: read any formula collection into a `datasets.Dataset` of canonical formulas.

Formats (chosen by file suffix, ``.gz`` allowed on all of them, or by ``fmt=``):

* ``.txt``: one formula per line; lines holding ``||`` are read in Dong et al.'s prefix format
  (``sg : 12 | ele : Zn Cu P O | ... || Zn Zn Cu P O O O .``: the expanded formula after ``||``).
  Lines starting with ``#`` are comments.
* ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` / ``.parquet``: a table; ``column`` names the formula
  column, else the first of ``formula, reduced_formula, pretty_formula, composition, cif`` present.
  A ``cif`` column (CDVAE-style CSVs) is read through the CIF's ``_chemical_formula_sum``.

Bad entries (unparseable, unknown element, empty) never stop a load: they are skipped, counted in
the :class:`CorpusReport`, and the first few are listed with their line (text) or row (table)
numbers. A corpus with no usable formula raises :class:`CorpusError`.

The returned dataset has columns ``formula`` (canonical reduced formula), ``raw`` (the text as
read), ``line``, ``n_elements``, ``n_atoms`` and ``split`` (from the file's split column, a seeded
split by formula, or ``"all"``).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.composition import Formula, FormulaError, parse_formula

__all__ = ["CorpusError", "CorpusReport", "FORMULA_COLUMNS", "entry_text", "iter_rows", "load_corpus", "read_formula_column",
           "read_samples"]

FORMULA_COLUMNS = ("formula", "reduced_formula", "pretty_formula", "composition", "cif")
_TABLE_FORMATS = {"csv", "tsv", "json", "jsonl", "parquet"}
_CIF_SUM = re.compile(r"_chemical_formula_sum\s+(?:'([^']*)'|\"([^\"]*)\"|(\S+))")


class CorpusError(ValueError):
    """The corpus cannot be used at all (missing, empty, all entries bad, no formula column)."""


@dataclass
class CorpusReport:
    source: str
    n_read: int = 0
    n_bad: int = 0
    n_duplicates: int = 0
    n_filtered: int = 0
    n_other_split: int = 0
    n_kept: int = 0
    bad_examples: list[tuple[str, str, str]] = field(default_factory=list)  # (where, text, reason)
    bad_reasons: dict[str, int] = field(default_factory=dict)

    def add_bad(self, where: str, text: str, reason: str, keep: int = 5) -> None:
        self.n_bad += 1
        kind = reason.split(":")[0].split(" '")[0]
        self.bad_reasons[kind] = self.bad_reasons.get(kind, 0) + 1
        if len(self.bad_examples) < keep:
            self.bad_examples.append((where, text[:80], reason))

    def summary(self) -> str:
        lines = [
            f"{self.source}: read {self.n_read}, kept {self.n_kept}, bad {self.n_bad}, "
            f"duplicates {self.n_duplicates}, filtered {self.n_filtered}, other splits {self.n_other_split}"
        ]
        for where, text, reason in self.bad_examples:
            lines.append(f"  skipped {where}: {text!r} ({reason})")
        if self.n_bad > len(self.bad_examples):
            lines.append(f"  ... and {self.n_bad - len(self.bad_examples)} more bad entries")
        return "\n".join(lines)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1].lstrip(".") if suffixes else "txt"
    if ext in _TABLE_FORMATS:
        return ext
    return "txt"


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def formula_from_cif(cif: str) -> str:
    """The formula a CIF declares (``_chemical_formula_sum``), else the sites' composition."""
    m = _CIF_SUM.search(cif or "")
    if m:
        return next(g for g in m.groups() if g is not None)
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(cif, fmt="cif").composition.formula
    except Exception as err:  # pymatgen raises many kinds on a broken CIF
        raise FormulaError(f"unreadable CIF ({type(err).__name__})") from None


def _read_text(path: Path) -> Iterator[tuple[str, str, str | None]]:
    """(where, raw text, formula text or None for comments) per line."""
    with _open_text(path) as fh:
        for no, line in enumerate(fh, start=1):
            text = line.strip()
            if text.startswith("#"):
                continue
            if "||" in text:  # Dong et al.: "<conditions> || Zn Zn Cu P O O O ."
                body = text.split("||", 1)[1].strip()
                if body.endswith("."):
                    body = body[:-1].strip()
                yield f"line {no}", text, body
            else:
                yield f"line {no}", text, text


def _read_table(path: Path, fmt: str, column: str | None) -> Iterator[tuple[str, str, str | None]]:
    import datasets

    builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    if builder == "csv":
        kwargs["on_bad_lines"] = "warn"
        kwargs["keep_default_na"] = False  # "NaN" is sodium nitride, not a missing value
    bad_lines: list[str] = []
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets.disable_progress_bars()
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **kwargs)
        except Exception as err:
            raise CorpusError(f"{path}: cannot read as {fmt}: {err}") from err
        finally:
            datasets.enable_progress_bars()
        for w in caught:
            bad_lines += re.findall(r"Skipping line (\d+): ([^\n]*)", str(w.message))
        cols = table.column_names
        if column is None:
            column = next((c for c in FORMULA_COLUMNS if c in cols), None)
            if column is None:
                raise CorpusError(f"{path}: no formula column among {cols}; pass column=")
        elif column not in cols:
            raise CorpusError(f"{path}: no column {column!r}; columns are {cols}")
        values = table.data.column(column).to_pylist()
        split_col = table.data.column("split").to_pylist() if "split" in cols else None
        for line_no, msg in bad_lines:
            yield f"line {line_no}", "", f"!malformed row: {msg}"
        for i, value in enumerate(values):
            text = "" if value is None else str(value)
            where = f"row {i + 1}"
            if column == "cif":
                try:
                    text = formula_from_cif(text)
                except FormulaError as err:
                    yield where, "<cif>", f"!{err}"
                    continue
            yield where, text, text if split_col is None else (text, split_col[i])


def iter_rows(path: str | Path, column: str | None = None, fmt: str | None = None):
    """Every entry of a corpus as ``(where, raw text, payload)``, bad ones included.

    ``payload`` is the formula text to parse (a ``(text, split)`` tuple when the file has a split
    column), or a reason prefixed with ``!`` for an entry that already failed while reading.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    fmt = _format_of(path, fmt)
    if fmt == "txt":
        return _read_text(path)
    return _read_table(path, fmt, column)


def entry_text(payload) -> tuple[str, str | None, str | None]:
    """``(formula text, split from the file or None, reading error or None)`` of an :func:`iter_rows`
    payload; an entry that failed while being read has the text ``""`` and its reason as the error."""
    if isinstance(payload, tuple):
        return payload[0], payload[1], None
    if payload.startswith("!"):
        return "", None, payload[1:]
    return payload, None, None


def read_samples(path: str | Path, column: str | None = None, keep_errors: bool = False) -> list[str]:
    """The formula text of every entry, in order, bad ones included (as ``evaluate`` counts them): an entry
    that failed while being read is ``""``, or its reason with ``keep_errors``."""
    out = []
    for _, _, payload in iter_rows(path, column):
        text, _, error = entry_text(payload)
        out.append((error if keep_errors else "") if error is not None else text)
    return out


def _hash_fraction(formula: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{formula}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def load_corpus(
    path: str | Path,
    column: str | None = None,
    fmt: str | None = None,
    split: str | None = None,
    dedupe: bool = True,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_elements: int | None = None,
    max_atoms: int | None = None,
):
    """Load a formula corpus; returns ``(datasets.Dataset, CorpusReport)``.

    ``split`` keeps one split: from the file's ``split`` column when it has one, else a seeded split
    by reduced formula (``val_fraction`` of formulas are ``"val"``, the rest ``"train"``), so a
    formula never lands in both. ``dedupe`` keeps the first occurrence of each reduced formula.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    report = CorpusReport(str(path))
    rows = iter_rows(path, column, fmt)
    out = {k: [] for k in ("formula", "raw", "line", "n_elements", "n_atoms", "split")}
    seen: set[Formula] = set()
    for where, raw, payload in rows:
        report.n_read += 1
        text, file_split, error = entry_text(payload)
        if error is not None:  # already failed while reading
            report.add_bad(where, raw, error)
            continue
        if not text or not text.strip():
            report.add_bad(where, raw, "empty")
            continue
        try:
            f = parse_formula(text)
        except FormulaError as err:
            report.add_bad(where, raw, str(err))
            continue
        name = str(f)
        row_split = (
            str(file_split)
            if file_split is not None
            else ("all" if split is None else ("val" if _hash_fraction(name, seed) < val_fraction else "train"))
        )
        if split is not None and row_split != split:
            report.n_other_split += 1
            continue
        if (max_elements and f.n_elements > max_elements) or (max_atoms and f.n_atoms > max_atoms):
            report.n_filtered += 1
            continue
        if dedupe:
            if f in seen:
                report.n_duplicates += 1
                continue
            seen.add(f)
        for key, value in (
            ("formula", name),
            ("raw", raw),
            ("line", where),
            ("n_elements", f.n_elements),
            ("n_atoms", f.n_atoms),
            ("split", row_split),
        ):
            out[key].append(value)
    report.n_kept = len(out["formula"])
    if report.n_read == 0:
        raise CorpusError(f"{path}: the corpus is empty")
    if report.n_kept == 0:
        raise CorpusError(f"{path}: no usable formula.\n{report.summary()}")
    return datasets.Dataset.from_dict(out), report


def read_formula_column(path: str | Path, column: str | None = None, **kwargs) -> tuple[list[str], CorpusReport]:
    """All rows of a corpus as canonical formulas (no dedupe), plus the report."""
    ds, report = load_corpus(path, column=column, dedupe=False, **kwargs)
    return ds["formula"], report
