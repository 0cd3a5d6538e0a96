"""load_backbone: config JSON models, local weight files, QuickGELU, offline errors, bad arguments."""
from __future__ import annotations

import pytest
import torch

from clipconv.backbone import WeightsUnavailableError, load_backbone


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["pt", "state_dict_wrapped", "safetensors"])
def test_local_checkpoint_file_loads_exact_weights(tmp_path, tiny_config, tiny_backbone, fmt):
    from safetensors.torch import save_file

    state = tiny_backbone.model.state_dict()
    path = tmp_path / f"weights.{ 'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "pt":
        torch.save(state, path)
    elif fmt == "state_dict_wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_backbone(str(tiny_config), pretrained=str(path), device="cpu")
    assert loaded.weights_id.startswith("sha256:")
    with torch.no_grad():
        expected = tiny_backbone.model.encode_image(_images())
        got = loaded.model.encode_image(_images())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torchscript_archive_is_recognised(tmp_path, tiny_config, tiny_backbone):
    """OpenAI's .pt files are TorchScript archives; they load through torch.jit, with QuickGELU."""
    from clipconv.backbone import _is_torchscript_archive

    model = tiny_backbone.model.eval()
    traced = torch.jit.trace(model, (_images(), tiny_backbone.tokenizer(["a", "b"])), check_trace=False, strict=False)
    path = tmp_path / "openai-style.pt"
    torch.jit.save(traced, str(path))
    assert _is_torchscript_archive(path)
    loaded = load_backbone(str(tiny_config), pretrained=str(path), device="cpu")
    assert loaded.quick_gelu
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_random_init_and_description(tiny_config):
    backbone = load_backbone(str(tiny_config), pretrained="none", device="cpu")
    assert backbone.describe() == {"model": tiny_config.stem, "weights_id": "random-init:seed0", "quick_gelu": False}
    assert backbone.source() == {"model": str(tiny_config.resolve()), "pretrained": "none", "quick_gelu": False}
    assert backbone.model.visual.grid_size == (4, 4)
    assert backbone.eval_transform is not None and backbone.tokenizer(["x"]).shape[-1] == 16


def test_random_init_is_reproducible_and_leaves_the_global_rng_alone(tiny_config):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_backbone(str(tiny_config), pretrained=None, device="cpu").model.state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = load_backbone(str(tiny_config), pretrained=None, device="cpu").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_openai_tag_gets_quick_gelu_and_offline_error_is_actionable(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("ViT-B-16", pretrained="openai", device="cpu")
    message = str(info.value)
    assert "--pretrained /path/to/weights" in message and "openai" in message and "--demo" in message


def test_failed_download_is_reported_with_the_local_file_hint(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    import open_clip.factory

    def no_network(*args, **kwargs):
        raise RuntimeError("Failed to download: connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    with pytest.raises(WeightsUnavailableError, match="pass the file"):
        load_backbone("ViT-B-16", pretrained="openai", device="cpu")


def test_quick_gelu_for_openai_tag_is_resolved_from_the_tag(monkeypatch):
    """The flag passed to open_clip is QuickGELU for 'openai' (open_clip itself only warns)."""
    import open_clip

    seen = {}

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr("clipconv.backbone._hf_cached_file", lambda cfg: "/nonexistent/cached.bin")
    with pytest.raises(Exception):
        load_backbone("ViT-B-16", pretrained="openai", device="cpu")
    assert seen["force_quick_gelu"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "ViT-Q-99"}, "unknown model 'ViT-Q-99'"),
        ({"model": "missing-config.json"}, "does not exist"),
        ({"pretrained": "not-a-tag-or-file"}, "neither an existing file nor an open_clip tag"),
        ({"precision": "fp8"}, "precision must be one of"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    args = {"model": "ViT-B-16", "pretrained": None, "device": "cpu", **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_backbone(**args)


def test_weights_for_another_architecture_are_refused(tmp_path, tiny_config):
    from conftest import write_tiny_config

    other = write_tiny_config(tmp_path, name="tiny-wide", vision_cfg={"width": 64, "head_width": 16})
    wide = load_backbone(str(other), pretrained=None, device="cpu")
    path = tmp_path / "wide.pt"
    torch.save(wide.model.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit model"):
        load_backbone(str(tiny_config), pretrained=str(path), device="cpu")


def test_patch_dropout_models_are_refused(tmp_path):
    from conftest import write_tiny_config

    cfg = write_tiny_config(tmp_path, name="tiny-pd", vision_cfg={"patch_dropout": 0.5})
    with pytest.raises(ValueError, match="patch dropout"):
        load_backbone(str(cfg), pretrained=None, device="cpu")


def test_bf16_precision_casts_weights(tiny_config):
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu", precision="bf16")
    assert backbone.model.visual.conv1.weight.dtype == torch.bfloat16
