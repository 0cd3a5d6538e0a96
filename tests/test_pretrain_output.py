"""Pretraining the mini CLIP never overwrites the shipped checkpoint (or any file) unless told to."""
from __future__ import annotations

from pathlib import Path

import pytest

from clipconv.app.pretrain_mini_clip import DEFAULT_OUTPUT, main, resolve_output
from clipconv.backbone import file_sha256
from clipconv.mini_clip import MINI_CLIP_WEIGHTS


def test_default_output_is_not_the_shipped_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_output(None)
    assert path == DEFAULT_OUTPUT == Path("mini_clip_pretrain/mini_clip.safetensors")
    assert path.resolve() != Path(MINI_CLIP_WEIGHTS).resolve()


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    target = tmp_path / "weights.safetensors"
    assert resolve_output(str(target)) == target  # a new file: fine
    target.write_bytes(b"finished")
    with pytest.raises(ValueError, match=f"--output {target}: the file exists; pass --overwrite"):
        resolve_output(str(target))
    assert resolve_output(str(target), overwrite=True) == target
    with pytest.raises(ValueError, match="is a folder"):
        resolve_output(str(tmp_path), overwrite=True)


@pytest.mark.parametrize("explicit", [True, False])
def test_cli_refuses_before_training(tmp_path, monkeypatch, capsys, explicit):
    """Exit 2 with one line, before any pretraining step (the shipped asset and a default output alike)."""
    monkeypatch.chdir(tmp_path)
    if explicit:
        target, argv = Path(MINI_CLIP_WEIGHTS), ["--output", str(MINI_CLIP_WEIGHTS)]
    else:
        target, argv = DEFAULT_OUTPUT, []
        target.parent.mkdir()
        target.write_bytes(b"an earlier result")
    before = file_sha256(target)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "the file exists; pass --overwrite" in err and "Traceback" not in err
    assert file_sha256(target) == before
