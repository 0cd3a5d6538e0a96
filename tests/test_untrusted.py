"""Loading a file never runs code: pickles that would execute are refused everywhere."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import clipconv


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def exploit(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    return path, marker


def test_training_state_loader_refuses_code(exploit):
    from clipconv.runtime.io import load_torch

    path, marker = exploit
    with pytest.raises(ValueError, match="weights_only"):
        load_torch(path)
    assert not marker.exists()


def test_backbone_weights_loader_refuses_code(exploit, tiny_config):
    from clipconv.backbone import load_backbone

    path, marker = exploit
    with pytest.raises(Exception):
        load_backbone(str(tiny_config), pretrained=str(path), device="cpu")
    assert not marker.exists()


def test_resume_refuses_a_poisoned_state_file(exploit, tmp_path):
    from torch import nn

    from clipconv.training import TrainConfig, Trainer

    path, marker = exploit
    trainer = Trainer.classifier(nn.Linear(2, 2), lambda g: [], 1, TrainConfig(epochs=1), torch.device("cpu"), tmp_path)
    with pytest.raises(ValueError, match="could not be loaded safely"):
        trainer.load_state(path)
    assert not marker.exists()


def _unsafe_torch_loads(tree: ast.AST) -> list[int]:
    """Line numbers of torch.load(...) calls without the literal keyword weights_only=True."""
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                lines.append(node.lineno)
    return lines


def test_the_source_check_catches_an_unsafe_call():
    assert _unsafe_torch_loads(ast.parse("torch.load(p)\ntorch.load(p, weights_only=False)")) == [1, 2]
    assert _unsafe_torch_loads(ast.parse("torch.load(p, map_location='cpu', weights_only=True)")) == []


def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(clipconv.__file__).parent
    offenders = [f"{source.relative_to(package)}:{line}"
                 for source in package.rglob("*.py")
                 for line in _unsafe_torch_loads(ast.parse(source.read_text()))]
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
