"""A generated few-shot world for the baseline tests: tiny CLIP, image tree, K-shot split, FeatureStore."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipconv.backbone import Backbone, load_backbone
from clipconv.data import make_image_tree, resolve_run_classes, sample_few_shot, train_samples
from clipconv.features import FeatureStore
from clipconv.methods import FitContext

CLASS_IDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")


@dataclass
class World:
    root: Path
    backbone: Backbone
    store: FeatureStore
    ctx: FitContext
    test_samples: list


def make_world(tmp_path: Path, config: Path, shots: int = 3, val_shots: int = 2, classes: int = 4,
               seed: int = 1) -> World:
    root = make_image_tree(tmp_path / "data", wnids=CLASS_IDS[:classes], train_per_class=shots + val_shots + 1,
                           val_per_class=2, variants=())
    torch.manual_seed(0)
    backbone = load_backbone(str(config), pretrained=None, device="cpu")
    run_classes = resolve_run_classes(root)
    split = sample_few_shot(train_samples(root, run_classes), shots, seed, val_shots=val_shots, root=root)
    store = FeatureStore(backbone, tmp_path / "cache", batch_size=16)
    ctx = FitContext(backbone=backbone, classnames=list(run_classes.names), data_root=root, train=split.train,
                     val=split.val, features=store, seed=seed, log=lambda message: None)
    test = [(f"imagenet/images/val/{cid}/{name}", label) for label, cid in enumerate(run_classes.ids)
            for name in sorted(p.name for p in (root / "imagenet/images/val" / cid).iterdir())]
    return World(root, backbone, store, ctx, test)
