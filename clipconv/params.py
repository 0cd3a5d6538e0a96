"""Trainable-parameter counts of a method, derived from the model it would train (never hard-coded).

Every method answers `method.trainable_count(ParamSpec(model, classes, shots))`. `reference_model()`
builds open_clip's ViT-B-16 on the meta device (shapes only, no weights, no memory), so Table 2 can
print the ViT-B/16 / ImageNet count of each method next to the count in the model a run actually used.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

__all__ = ["ParamSpec", "REFERENCE_MODEL", "REFERENCE_CLASSES", "reference_model", "meta_copy", "count_elements",
           "reference_spec"]

REFERENCE_MODEL = "ViT-B-16"
REFERENCE_CLASSES = 1000  # ImageNet


@dataclass(frozen=True)
class ParamSpec:
    """What a count depends on: the open_clip CLIP model (may live on the meta device), the number of
    classes and the shots per class (the training images are classes × shots)."""

    model: nn.Module
    classes: int
    shots: int

    @property
    def train_images(self) -> int:
        return self.classes * self.shots

    @property
    def embed_dim(self) -> int:
        """Width of the joint image/text space (the image encoder's output)."""
        return int(self.model.visual.output_dim)

    @property
    def text_width(self) -> int:
        """Width of the text encoder's token embeddings (CoOp's context vectors)."""
        return int(self.model.token_embedding.weight.shape[1])


@functools.lru_cache(maxsize=None)
def reference_model(name: str = REFERENCE_MODEL) -> nn.Module:
    """open_clip's `name` (default ViT-B-16) on the meta device: exact shapes, no weights."""


    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # "no pretrained weights loaded" is the point here
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
    finally:
        logger.setLevel(level)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def reference_spec(shots: int, classes: int = REFERENCE_CLASSES) -> ParamSpec:
    """ViT-B/16 on ImageNet's classes with `shots` per class."""
    return ParamSpec(reference_model(), classes, shots)


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose tensors live on the meta device (the original's are not copied)."""
    memo: dict[int, object] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def count_elements(tensors) -> int:
    """Number of elements over distinct tensors."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[id(tensor)] = tensor.numel()
    return sum(seen.values())
