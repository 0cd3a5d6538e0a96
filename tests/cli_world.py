"""A generated image tree + a tiny CLIP saved as a weights file, for tests that drive the command lines."""
from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_weights(root: Path, tiny_config: Path, seed: int = 7) -> Path:
    """`root/tiny.pt`: tiny-CLIP weights that are not the reproducible random init (so a run that silently
    fell back to random weights would differ)."""
    from clipconv.backbone import load_backbone

    torch.manual_seed(seed)
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = root / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    return weights


def make_cli_world(root: Path, tiny_config: Path) -> dict:
    """{"root", "data", "weights", "config"}: a 6/3 image tree and `save_tiny_weights`."""
    from clipconv.data import make_image_tree

    data = make_image_tree(root / "data", train_per_class=6, val_per_class=3, seed=3)
    return {"root": root, "data": data, "weights": save_tiny_weights(root, tiny_config), "config": tiny_config}
