"""Every open_clip ViT model config, shrunk to a tiny size: zero-initialized adapters leave its image
encoder's output unchanged (grid, widths and options come from the model, never assumed)."""
from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from clipconv.adapters import add_adapters

LAYERS, WIDTH, HEAD_WIDTH, EMBED_DIM = 2, 64, 32, 16


def _tiny_vision_configs() -> dict[str, tuple[dict, bool]]:
    """{model name: (shrunk vision cfg, quick_gelu)} for the configs with an open_clip VisionTransformer
    (timm and Hugging Face towers and ModifiedResNets are left out), one per distinct shrunk config."""
    found, seen = {}, set()
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision = dict(cfg.get("vision_cfg", {}))
        if vision.get("timm_model_name") or vision.get("hf_model_name") or not isinstance(vision.get("layers"), int):
            continue
        patch = int(vision["patch_size"])
        vision.update(layers=LAYERS, width=WIDTH, head_width=HEAD_WIDTH, image_size=[2 * patch, 3 * patch])
        if vision.get("attentional_pool"):
            vision.update(attn_pooler_heads=2, attn_pooler_queries=4)
        key = json.dumps([vision, bool(cfg.get("quick_gelu"))], sort_keys=True)
        if key not in seen:
            seen.add(key)
            found[name] = (vision, bool(cfg.get("quick_gelu")))
    return found


CONFIGS = _tiny_vision_configs()


def test_the_model_list_has_vision_transformers():
    assert len(CONFIGS) >= 5 and any(name.startswith("ViT-B-16") for name in CONFIGS)


def _flat(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (tuple, list)) else [output]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_initialized_adapters_leave_every_vit_unchanged(name):
    vision, quick_gelu = CONFIGS[name]
    torch.manual_seed(0)
    visual = _build_vision_tower(EMBED_DIM, CLIPVisionCfg(**vision), quick_gelu=quick_gelu).eval()
    images = torch.randn(2, 3, *visual.image_size, generator=torch.Generator().manual_seed(1))
    if vision.get("patch_dropout", 0) > 0:
        with pytest.raises(ValueError, match="patch dropout"):
            add_adapters(visual, "convpass")
        return
    plain = copy.deepcopy(visual)
    add_adapters(visual, "convpass")
    assert visual.transformer.resblocks[0].attn.adapter.layout.grid == (2, 3)  # from the model: non-square
    with torch.no_grad():
        for got, want in zip(_flat(visual(images)), _flat(plain(images))):
            tol = 256 * torch.finfo(torch.float32).eps * float(want.abs().max())
            assert got.shape == want.shape and float((got - want).abs().max()) <= tol
