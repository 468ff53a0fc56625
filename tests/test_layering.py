"""The packages' dependencies point one way: ``evaluation`` imports neither of the others,
``composition_lm`` and ``structure`` may import ``evaluation`` but not each other, and only
``composition_lm/cli.py`` imports all three."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"evaluation": {"composition_lm", "structure"}, "composition_lm": {"structure"},
             "structure": {"composition_lm"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_layering(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == ROOT / "composition_lm" / "cli.py":
            continue
        wrong = _imported_packages(path) & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(wrong))}")
    assert not bad, "\n".join(bad)


def test_the_cli_is_the_one_module_on_top():
    assert {"composition_lm", "structure", "evaluation"} <= _imported_packages(ROOT / "composition_lm" / "cli.py")
