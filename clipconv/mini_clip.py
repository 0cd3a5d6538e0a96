"""The shipped miniature CLIP (48 px, 6×6 patch grid) that runs the offline miniature benchmark (`--demo`)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from clipconv.backbone import Backbone, load_backbone

__all__ = ["MINI_CLIP_CONFIG", "MINI_CLIP_WEIGHTS", "MINI_CLIP_CROP_SCALE", "demo_backbone"]

_ASSETS = Path(__file__).resolve().parent / "assets"
MINI_CLIP_CONFIG: Path = _ASSETS / "mini_clip.json"
MINI_CLIP_WEIGHTS: Path = _ASSETS / "mini_clip.safetensors"
#: smallest area fraction of the demo's train crop (48-px objects that an 8 %-area crop often cuts away)
MINI_CLIP_CROP_SCALE = 0.9


def demo_backbone(device: Union[str, torch.device, None] = None) -> Backbone:
    """The shipped miniature CLIP through `load_backbone`, with the demo's train crop scale."""
    if not MINI_CLIP_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the demo checkpoint '{MINI_CLIP_WEIGHTS}' is missing; reinstall clipconv or recreate it with "
            "scripts/pretrain_mini_clip.py (see clipconv/assets/MINI_CLIP.md)"
        )
    return load_backbone(str(MINI_CLIP_CONFIG), pretrained=str(MINI_CLIP_WEIGHTS), device=device,
                         train_crop_scale=(MINI_CLIP_CROP_SCALE, 1.0))
