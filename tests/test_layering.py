"""The packages' dependencies point one way: ``evaluation`` imports neither of the others,
``composition_lm`` and ``structure`` may import ``evaluation`` but not each other, and only the layer on top, the
CLI package ``composition_lm/cli/`` and the workflow package ``composition_lm/workflows/``, imports all three."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"evaluation": {"composition_lm", "structure"}, "composition_lm": {"structure"},
             "structure": {"composition_lm"}}
CLI = ROOT / "composition_lm" / "cli"
WORKFLOWS = ROOT / "composition_lm" / "workflows"
TOP = (CLI, WORKFLOWS)  # the layer that composes the three packages


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
        if any(top in path.parents for top in TOP):
            continue
        wrong = _imported_packages(path) & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(wrong))}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("top", TOP, ids=lambda p: p.name)
def test_the_top_layer_composes_the_three_packages(top):
    imported = set().union(*(_imported_packages(p) for p in top.rglob("*.py")))
    assert {"composition_lm", "structure", "evaluation"} <= imported


def test_the_workflows_import_no_cli():
    """The CLI stands on the workflows, never the reverse."""
    bad = [str(p.relative_to(ROOT)) for p in WORKFLOWS.rglob("*.py")
           if any(n.startswith("composition_lm.cli") for n in _imported_modules(p))]
    assert not bad, bad


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_the_cli_is_a_package_of_small_command_modules():
    modules = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in CLI.glob("*.py")}
    assert {"formulas.py", "lm.py", "structures.py", "cdvae.py", "compare.py", "options.py"} <= set(modules)
    assert not (ROOT / "composition_lm" / "cli.py").exists()
    assert max(modules.values()) <= 400, modules


def test_the_bottom_layer_and_the_library_modules_import_no_cli():
    """Only the console script's own package imports the CLI modules (so the API never depends on them)."""
    bad = []
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            if CLI in path.parents:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("composition_lm.cli"):
                    bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad


def test_importing_the_packages_is_light():
    """``import composition_lm, structure, evaluation`` loads no torch, pymatgen or pandas (lazy exports)."""
    import subprocess
    import sys

    code = ("import sys, composition_lm, structure, evaluation, structure.cdvae, composition_lm.workflows; "
            "print(sorted(m for m in ('torch', 'pymatgen', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
