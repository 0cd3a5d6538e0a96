"""clipconv.runtime.io: file modes follow the umask, failed writes name the file and leave nothing, damaged run
files are reported (never used)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import resource

import pytest
import torch

from clipconv.runtime.io import (
    DamagedFileError, OutputWriteError, atomic_path, load_torch, read_json, save_torch, write_json, write_text
)


@pytest.fixture()
def umask():
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path, umask):
    umask(0o022)
    assert _mode(write_text(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(save_torch(tmp_path / "s.pt", {"x": torch.zeros(2)})) == 0o644
    umask(0o027)
    assert _mode(write_json(tmp_path / "b.json", {"x": 1})) == 0o640
    umask(0o002)
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"1")
    assert _mode(tmp_path / "c.bin") == 0o664
    from safetensors.torch import save_file  # replaces the temp file with a 0600 one of its own

    umask(0o022)
    with atomic_path(tmp_path / "d.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "d.safetensors") == 0o644


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"finished": True})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OutputWriteError) as caught:
        write_json(target, {"finished": False})
    message = str(caught.value)
    assert f"'{target}'" in message and "No space left" in message and "free some disk space" in message
    assert "\n" not in message and not message.startswith("[Errno")
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _no_temp_files(tmp_path)
    assert json.loads(target.read_text()) == {"finished": True}  # the finished file is untouched


def test_failing_torch_save_becomes_an_output_write_error(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OutputWriteError, match="could not write .*state.pt"):
        save_torch(tmp_path / "state.pt", {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_an_output_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputWriteError, match=f"could not write '{blocker}/out.json'"):
        write_json(blocker / "out.json", {})


def test_real_file_size_limit(tmp_path):
    """A real RLIMIT_FSIZE, lowered in this process for the two writes (Python ignores SIGXFSZ, so writes fail
    with EFBIG instead of killing); only the soft limit moves, so it can be restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    messages = []
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        for name, write in (("big.txt", lambda p: write_text(p, "x" * 300_000)),
                            ("big.pt", lambda p: save_torch(p, {"x": torch.zeros(100_000)}))):
            try:
                write(tmp_path / name)
            except OutputWriteError as err:
                messages.append(str(err))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert len(messages) == 2
    for line, name in zip(messages, ("big.txt", "big.pt")):
        assert f"could not write '{tmp_path / name}'" in line and "ulimit -f" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b'{"method": "frozen", "shots": ', b"\x80\x81 binary"])
def test_damaged_json_is_reported_with_the_file_name(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError, match=f"'{path}' is damaged.*start a new run"):
        read_json(path)
    assert issubclass(DamagedFileError, ValueError)  # the CLIs turn it into one line and exit 2


def test_damaged_training_state_is_reported_with_the_file_name(tmp_path):
    path = tmp_path / "train_state.pt"
    path.write_bytes(b"")
    with pytest.raises(DamagedFileError, match=f"'{path}' is damaged: empty; delete it to restart"):
        load_torch(path)
    torch.save({"x": torch.zeros(1000)}, path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DamagedFileError, match="truncated or corrupted.*delete it to restart the run from scratch"):
        load_torch(path)
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "missing.pt")


def test_cli_handler_turns_write_errors_into_one_line(tmp_path, capsys):
    from clipconv.app.cli.common import EXIT_BAD_INPUT, bad_input_errors

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as caught, bad_input_errors():
        write_json(blocker / "out.json", {})
    assert caught.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not write") and "Traceback" not in err


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path):
    from clipconv.runtime.io import remove_stale_temps, write_text

    final = write_text(tmp_path / "train_state.pt", "good")
    stale = tmp_path / ".train_state.pt.ab12cd.tmp"
    stale.write_text("half")
    other = tmp_path / ".metrics.json.ab12cd.tmp"
    other.write_text("not ours")
    assert remove_stale_temps(final) == [stale]
    assert not stale.exists() and other.exists() and final.read_text() == "good"
