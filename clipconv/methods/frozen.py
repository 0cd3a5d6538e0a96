"""Shared pieces of the methods whose image encoder stays frozen (they score cached features)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from clipconv.head import class_embeddings
from clipconv.methods.base import FitContext, Method
from clipconv.runtime.jsontypes import JSONObject

__all__ = ["FrozenEncoderMethod", "text_classifier", "require_features", "templates_summary"]


def text_classifier(ctx: FitContext, templates: Sequence[str]) -> torch.Tensor:
    """L2-normalized prompt-ensemble class embeddings (C, embed_dim), fp32, on ctx.device."""
    backbone = ctx.backbone
    return class_embeddings(backbone.model, backbone.tokenizer, list(ctx.classnames), templates,
                            device=ctx.device).float()


def templates_summary(name: str, templates: Sequence[str]) -> JSONObject:
    """How a method's summary records the template set it used: its name and its size."""
    return {"template_set": name, "templates": len(templates)}


def require_features(ctx: FitContext):
    """The FeatureStore of the fit context; a clear error when it is missing."""
    if ctx.features is None:
        raise ValueError("this method reads frozen image features: pass FitContext(features=FeatureStore(backbone, ...))")
    return ctx.features


class FrozenEncoderMethod(Method):
    """Base for frozen-encoder methods: `logits(images)` encodes with the frozen backbone, then scores."""

    frozen_image_encoder = True
    _backbone: Optional[object] = None

    def _bind(self, ctx: FitContext) -> None:
        self._backbone = ctx.backbone
        self._device = ctx.device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self._backbone is None:
            raise RuntimeError(f"method '{self.name}' must be fitted before logits()")
        model = self._backbone.model
        dtype = next(model.visual.parameters()).dtype
        feats = model.encode_image(images.to(self._device, dtype=dtype)).float()
        return self.logits_from_features(feats)
