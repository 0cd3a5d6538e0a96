"""Offline miniature benchmark: a procedural world in ImageNet's folder layouts and a small CLIP of our own."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from clipconv.demo.defaults import DEMO_RUN_DEFAULTS, DEMO_TRAIN_DEFAULTS
from clipconv.demo.world import DOMAINS, WORLD_CLASSES, ensure_world, generate_world, render

__all__ = ["DEMO_RUN_DEFAULTS", "DEMO_TRAIN_DEFAULTS", "MINI_CLIP_CONFIG", "MINI_CLIP_WEIGHTS", "demo_backbone", "DOMAINS", "WORLD_CLASSES",
           "ensure_world", "generate_world", "render"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
MINI_CLIP_CONFIG: Path = _ASSETS / "mini_clip.json"
MINI_CLIP_WEIGHTS: Path = _ASSETS / "mini_clip.safetensors"


def demo_backbone(device: Union[str, torch.device, None] = None):
    """The shipped miniature CLIP (48 px, 6×6 patch grid) through `load_backbone`."""
    from clipconv.backbone import load_backbone

    if not MINI_CLIP_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the demo checkpoint '{MINI_CLIP_WEIGHTS}' is missing; reinstall clipconv or recreate it with "
            "scripts/pretrain_mini_clip.py (see clipconv/assets/MINI_CLIP.md)"
        )
    return load_backbone(str(MINI_CLIP_CONFIG), pretrained=str(MINI_CLIP_WEIGHTS), device=device,
                         train_crop_scale=(DEMO_RUN_DEFAULTS["crop_scale"], 1.0))
