"""The documentation: the MkDocs site builds in strict mode (its command reference generated from the parsers, its
API pages from the docstrings, every benchmark indexed), and the README stays a first-visit page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_first_visit_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    for page in ("docs/sample.md", "docs/discover.md", "docs/cli.md", "docs/benchmarks.md"):
        assert page in text, f"the README does not point to {page}"
    assert "from composition_lm.workflows import discover" in text  # one-call discovery in the Python tour


def test_mkdocs_builds_strict_with_generated_reference_and_benchmark_index(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("composition-gen sample", "composition-gen discover", "composition-gen cdvae sample"):
        assert command in cli
    assert "--validity-any-elements" in cli and "--snap-angles" in cli  # options made from the config fields
    index = (tmp_path / "site" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    for path in sorted((REPO / "benchmarks").glob("*.md")):
        assert path.name in index, f"{path.name} missing from the benchmark index"
        assert (tmp_path / "site" / "bench" / path.stem / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "SamplingConfig" in api and "CDVAESamplingConfig" in api and "discover" in api
