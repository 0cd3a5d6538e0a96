"""Zero-shot CLIP: a text classifier from class names × prompt templates (Radford et al., 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from clipconv.head import zero_shot_logits
from clipconv.methods.base import PAPER_AND_DEMO, FitContext, MethodConfig, config_from, option, register_method
from clipconv.methods.frozen import FrozenEncoderMethod, templates_summary, text_classifier
from clipconv.runtime.jsontypes import JSONObject

__all__ = ["ZeroShot", "ZeroShotConfig"]


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: Union[str, Sequence[str], None] = option(
        None, help="template set name (photo, clip80, tip), template file or list; default: the run's --templates, "
                   "else the reference 'photo' (the single \"a photo of a {}.\" of the Convpass/CoOp papers' "
                   "ZS CLIP row, 66.73 on ImageNet; open_clip's 68.34 is the clip80 ensemble)")


@register_method("zero_shot")
class ZeroShot(FrozenEncoderMethod):
    is_zero_shot = True
    """logits = logit_scale · normalize(f) · Wᵀ, W = prompt-ensemble class embeddings; nothing is trained."""

    config_class = ZeroShotConfig
    presets = PAPER_AND_DEMO
    reference_templates = "photo"
    label = "ZS CLIP"
    templates_in_label = True  # single prompt (the paper's 66.73) vs an ensemble (open_clip's 68.34)
    table2_order = 1
    clip_benchmark_task = "zeroshot_classification"
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 66.73, "imagenet_v2": 60.83, "imagenet_sketch": 46.15, "imagenet_a": 47.77,
                 "imagenet_r": 73.96}

    def __init__(self, config: Optional[ZeroShotConfig] = None, **options: object) -> None:
        self.config = config_from(ZeroShotConfig, config, options)
        self.weights: Optional[torch.Tensor] = None
        self.logit_scale = 100.0
        self.template_set, self._used_templates = "", []

    def fit(self, ctx: FitContext) -> JSONObject:
        self._bind(ctx)
        self.template_set, self._used_templates = self.templates_for(ctx, self.config.templates)
        self.weights = text_classifier(ctx, self._used_templates)
        self.logit_scale = ctx.backbone.logit_scale
        return self.summary()

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("zero_shot must be fitted before scoring")
        return zero_shot_logits(features.to(self.weights.device), self.weights, self.logit_scale)

    def trainable_count(self, spec) -> int:
        """Nothing is trained."""
        return 0

    def summary(self) -> JSONObject:
        return {**templates_summary(self.template_set, self._used_templates), "logit_scale": self.logit_scale}
