"""resolve_device: devices this machine lacks and garbage strings are one clear ValueError, not a crash later."""
from __future__ import annotations

import pytest
import torch

from clipconv.backbone import resolve_device


def test_auto_and_cpu():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_missing_cuda_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"^--device {name}: no CUDA device is available here .*use --device cpu or auto$"):
        resolve_device(name)


def test_cuda_index_beyond_the_machines_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 2 CUDA device\(s\) \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:3")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="--device mps: Apple's MPS backend is not available here"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["garbage", "cuda:x", "gpu", "", "meta", "cuda:-1"])
def test_garbage_is_rejected(name):
    with pytest.raises(ValueError, match=f"--device {name}: not a device name; use auto, cpu, cuda"):
        resolve_device(name)


def test_cli_reports_a_missing_device_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from clipconv.app.cli import zero_shot

    with pytest.raises(SystemExit) as caught:
        zero_shot.main(["--demo", "--device", "cuda", "--output-dir", "/nonexistent/never-written"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error: --device cuda: no CUDA device is available here" in err and "Traceback" not in err
