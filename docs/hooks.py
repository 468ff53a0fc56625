"""MkDocs hooks: the pages that are generated from the code, so that they cannot drift from it.

* ``cli.md``: the command reference, every command's ``--help`` as the parser prints it
  (``composition_lm.cli.build_parser``);
* ``benchmarks.md``: after the hand-written summary, an index of every ``benchmarks/*.md`` (its title and first
  line), each file copied into the site as a page of its own (with the images beside it).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
CLI_MARKER = "<!-- cli-reference -->"
INDEX_MARKER = "<!-- benchmark-index -->"


def _subcommands(parser: argparse.ArgumentParser):
    """(name, parser) of every command and sub-command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _subcommands(sub))


def cli_reference() -> str:
    from composition_lm.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help at the terminal width: one width for the page
    parser = build_parser()
    parts = ["## composition-gen", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser):
        parts += [f"## composition-gen {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _first_line(text: str) -> str:
    for line in text.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith(("#", "|", "!", "<")):
            line = re.sub(r"\s+", " ", line)
            return line if len(line) <= 240 else line[:237] + "..."
    return ""


def benchmark_index() -> str:
    rows = ["| benchmark | what it measures (its first line) |", "|---|---|"]
    for path in sorted(BENCHMARKS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip() if text else path.stem
        rows.append(f"| [{path.name}](bench/{path.name}) — {title} | {_first_line(text).replace('|', '/')} |")
    return "\n".join(rows)


def on_files(files, config):
    """Every benchmark report (and the images and report folders beside it) becomes part of the site."""
    for path in sorted(BENCHMARKS.rglob("*")):
        if path.is_file() and path.suffix in (".md", ".png", ".html"):
            rel = path.relative_to(BENCHMARKS).as_posix()
            files.append(File(f"bench/{rel}", src_dir=str(BENCHMARKS.parent), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
            files.get_file_from_path(f"bench/{rel}").abs_src_path = str(path)
    return files


def on_page_markdown(markdown: str, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if INDEX_MARKER in markdown:
        markdown = markdown.replace(INDEX_MARKER, benchmark_index())
    return markdown
