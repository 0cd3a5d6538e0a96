"""Zero-shot CLIP: a text classifier from class names × prompt templates (Radford et al., 2021)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from ..head import zero_shot_logits
from .base import FitContext, register_method
from .frozen import FrozenEncoderMethod, resolve_templates, text_classifier

__all__ = ["ZeroShot"]


@register_method("zero_shot")
class ZeroShot(FrozenEncoderMethod):
    """logits = logit_scale · normalize(f) · Wᵀ, W = prompt-ensemble class embeddings; nothing is trained.

    `templates`: a set name ("photo", "clip80", "tip"), a template file, a list, or None for ctx.templates.
    """

    def __init__(self, templates: Union[str, Sequence[str], None] = None) -> None:
        self.templates = templates
        self.weights: Optional[torch.Tensor] = None
        self.logit_scale = 100.0
        self._used_templates: list[str] = []

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        self._bind(ctx)
        self._used_templates = resolve_templates(self.templates, ctx)
        self.weights = text_classifier(ctx, self._used_templates)
        self.logit_scale = ctx.backbone.logit_scale
        return self.summary()

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("zero_shot must be fitted before scoring")
        return zero_shot_logits(features.to(self.weights.device), self.weights, self.logit_scale)

    def summary(self) -> dict[str, Any]:
        return {"templates": len(self._used_templates), "logit_scale": self.logit_scale}
