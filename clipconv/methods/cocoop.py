"""CoCoOp (Zhou et al., CVPR 2022): CoOp plus an image-conditioned shift of the prompt context.

Defaults are the reference's: 4 context vectors initialized from "a photo of a"; meta-net
Linear(E → E/16) → ReLU → Linear(E/16 → W) (E the image-embedding size, W the text width; 512 → 32 →
512 for ViT-B/16) whose output is added to every context vector; batch 1, 10 epochs, SGD lr 0.002
(momentum 0.9, wd 5e-4, one warm-up epoch at 1e-5, then cosine restarted after the warm-up: epoch
e ≥ 1, 0-indexed, runs at 0.002·½(1 + cos(π·(e − 1)/10))). Options: `CoCoOpConfig`.

Cost: the prompts depend on the image, so the text encoder runs over ALL C classes for EVERY image,
in training and at test time: B·C text-encoder sequences per batch (ImageNet: 1,000 per image, so
evaluating 50,000 val images means 5·10⁷ text-encoder passes) and activation memory for B·C sequences
in training (users report running out of 16–24 GB GPU memory on ImageNet). `class_chunk` encodes the
classes in chunks — in training with activation checkpointing (the chunk is recomputed in the
backward), so peak memory scales with the chunk instead of C at the price of a second forward —
and `batch_size` / `FitContext.eval_batch_size` bound the images per training / scoring step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.config import positive
from clipconv.methods.base import FitContext, option, register_method
from clipconv.methods.coop import CoOp, CoOpConfig

__all__ = ["CoCoOp", "CoCoOpConfig", "MetaNet"]


@dataclass
class CoCoOpConfig(CoOpConfig):
    """CoOp's options with CoCoOp's reference defaults (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1)."""

    n_ctx: int = option(4, check=positive,
                        help="context vectors (reference: N_CTX 4); ignored when init_phrase is given")
    init_phrase: Optional[str] = option("a photo of a", help="context init phrase; its word count sets n_ctx "
                                                             "(reference: CTX_INIT \"a photo of a\")")
    epochs: int = option(10, check=positive, help="epochs (reference: MAX_EPOCH 10)")
    batch_size: int = option(1, check=positive, help="train batch size (reference: 1)")


class MetaNet(nn.Module):
    """Linear(in → max(1, in/16)) → ReLU → Linear(→ out): a per-image bias for the context vectors."""

    def __init__(self, in_dim: int, out_dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, in_dim // reduction)
        self.linear1 = nn.Linear(in_dim, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


@register_method("cocoop")
class CoCoOp(CoOp):
    """Conditional prompt learning; options in `CoCoOpConfig` (CoOp's, with CoCoOp's defaults)."""

    config_class = CoCoOpConfig
    label = "CoCoOp"
    table2_order = 4
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 71.02, "imagenet_v2": 64.07, "imagenet_sketch": 48.75, "imagenet_a": 50.63,
                 "imagenet_r": 76.18}

    def __init__(self, config: Optional[CoCoOpConfig] = None, **options: object) -> None:
        super().__init__(config, **options)
        self.meta_net: Optional[MetaNet] = None
        self.eval_batch = FitContext.eval_batch_size  # images per scoring chunk: ctx.eval_batch_size once fitted

    def setup(self, ctx: FitContext) -> None:
        super().setup(ctx)
        if ctx.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {ctx.eval_batch_size}")
        self.eval_batch = ctx.eval_batch_size
        embed_dim = int(ctx.backbone.model.text_projection.shape[1]) if isinstance(
            ctx.backbone.model.text_projection, torch.Tensor) else int(ctx.backbone.model.text_projection.out_features)
        self.meta_net = MetaNet(embed_dim, self.learner.width).to(ctx.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.learner.ctx, *self.meta_net.parameters()]

    def trainable_count(self, spec) -> int:
        """The context vectors + the meta-net (embed_dim → embed_dim/16 → text width, with biases)."""
        with torch.device("meta"):
            meta_net = MetaNet(spec.embed_dim, spec.text_width)
        return super().trainable_count(spec) + sum(p.numel() for p in meta_net.parameters())

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Context vectors and meta-net (θ₀: the phrase context and the freshly initialized meta-net)."""
        return {"ctx": self.learner.ctx, **{f"meta_net.{n}": p for n, p in self.meta_net.named_parameters()}}

    def _refresh_scoring(self) -> None:
        pass  # prompts are built per image at scoring time

    def batch_logits(self, features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(features.float(), dim=-1)
        shifts = self.meta_net(image)
        rows = [self.logit_scale * image[i] @ self.class_text_features(shifts[i]).t() for i in range(len(image))]
        return torch.stack(rows)

    def _finish(self, ctx: FitContext) -> None:
        self._text_features = None
        self._fitted = True
        if len(ctx.val):
            feats, labels = ctx.features.encode(ctx.data_root, ctx.val, desc="cocoop: val", with_labels=True)
            predictions = self.logits_from_features(feats.to(ctx.device)).argmax(-1).cpu()
            self.val_top1 = 100.0 * float((predictions == labels).float().mean()) if len(labels) else None

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_fitted", False):
            raise RuntimeError("cocoop must be fitted before scoring")
        features = features.to(self._device)
        return torch.cat([self.batch_logits(chunk) for chunk in features.split(self.eval_batch)]) \
            if len(features) else torch.empty(0, self.learner.num_classes)
