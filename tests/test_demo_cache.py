"""--demo with a CLIPCONV_CACHE that cannot hold the generated world: one line naming CLIPCONV_CACHE, exit 2."""
from __future__ import annotations

import os

import pytest
from cli_world import refused_line

from clipconv.app.cli import run_table2, train


def _refused(main, argv, capsys) -> str:
    line = refused_line(main, argv, capsys)
    assert "CLIPCONV_CACHE" in line and "writable folder" in line, line
    return line


def _read_only_cache(tmp_path):
    """A folder this process cannot write in: chmod 0555, or (as root, whom permission bits do not stop) a
    path under a file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
    except OSError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o755)
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "cache"


@pytest.mark.parametrize("main", [train.main, run_table2.main], ids=["train", "run_table2"])
def test_demo_with_the_cache_variable_pointing_at_a_file(main, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path / "file"))
    line = _refused(main, ["--demo", "--output-dir", str(tmp_path / "run")], capsys)
    assert str(tmp_path / "file") in line
    assert not (tmp_path / "run").exists()


def test_demo_with_a_read_only_cache(tmp_path, monkeypatch, capsys):
    cache = _read_only_cache(tmp_path)
    monkeypatch.setenv("CLIPCONV_CACHE", str(cache))
    try:
        line = _refused(train.main, ["--demo", "--output-dir", str(tmp_path / "run")], capsys)
    finally:
        os.chmod(tmp_path / "read-only", 0o755)
    named = cache if cache.parent.is_dir() else cache.parent  # the folder, or the file it lies under
    assert f"'{named}'" in line and not (tmp_path / "run").exists()
