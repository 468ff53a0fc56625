"""evaluation.io: atomic outputs."""

import os
import stat

import pytest

from evaluation.io import append_jsonl, atomic_path, shown_path, write_text


def test_atomic_output_gets_the_mode_a_plain_open_gives(tmp_path):
    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt")


def test_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_append_jsonl(tmp_path):
    append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    append_jsonl(tmp_path / "log.jsonl", {"step": 2})
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_shown_path_is_relative_below_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "repo" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert shown_path(tmp_path / "repo" / "models" / "m") == "models/m"  # absolute in, relative out
    assert shown_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")  # outside: as given
