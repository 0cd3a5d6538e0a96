"""CoOp (Zhou et al., IJCV 2022): learnable prompt context in front of CLIP's frozen text encoder.

Defaults are the reference's ImageNet / ViT-B/16 settings: 16 context vectors shared across classes,
class token at the end, random init N(0, 0.02²); SGD lr 0.002, momentum 0.9, weight decay 5e-4,
50 epochs, batch 32, one constant warm-up epoch at 1e-5 then a cosine per epoch whose count restarts
after the warm-up (Dassl's WARMUP_RECOUNT=True: epoch e ≥ 1, 0-indexed, runs at
0.002·½(1 + cos(π·(e − 1)/50)), so epoch 1 runs at 0.002). An init phrase sets the context length to
its word count, as the reference does. (The CoCoOp paper's domain-generalization runs use
`n_ctx=4, init_phrase="a photo of a"`.) Every option with its source: `CoOpConfig`.

Image side: the image encoder is frozen, so image features come from the FeatureStore. Instead of
re-encoding freshly augmented images every epoch (50 passes over the K-shot set), `views` augmented
views of the train set are encoded once (the backbone's protocol train transform: random resized crop
scale 0.08–1 + flip; each view cached under its own seed) and epoch e uses view e mod `views`.
`views=0` trains on un-augmented (eval-transform) features. Each step runs the text encoder over all
classes (C prompts); `class_chunk` splits that pass and recomputes it in the backward (checkpointing)
to bound memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipconv.backbone import Backbone
from clipconv.config import non_negative, positive, probability
from clipconv.methods.base import FitContext, MethodConfig, config_from, option, register_method
from clipconv.methods.frozen import FrozenEncoderMethod, require_features
from clipconv.methods.prompt_learner import (
    FrozenTextEncoder, PromptLearner, check_prompt_length, frozen_parameters, phrase_context_length, warmup_cosine_lr
)
from clipconv.runtime.jsontypes import JSONObject
from clipconv.training import BatchLoss, Forward, ImageBatch, TrainConfig, Trainer, TrainingTask

__all__ = ["CoOp", "CoOpConfig"]


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = option(16, check=positive,
                        help="context vectors (configs/trainers/CoOp: N_CTX 16 for ImageNet ViT-B/16); "
                             "ignored when init_phrase is given")
    init_phrase: Optional[str] = option(None, help="initialize the context from this phrase; its word count sets "
                                                   "n_ctx (reference: CTX_INIT, empty = random init)")
    class_specific: bool = option(False, help="one context per class (reference CSC False)")
    epochs: int = option(50, check=positive, help="epochs (reference vit_b16 ImageNet config: MAX_EPOCH 50)")
    lr: float = option(0.002, check=positive, help="SGD learning rate (reference: 0.002)")
    batch_size: int = option(32, check=positive, help="train batch size (reference: 32)")
    momentum: float = option(0.9, check=probability, help="SGD momentum (Dassl default 0.9)")
    weight_decay: float = option(5e-4, check=non_negative, help="SGD weight decay (Dassl default 5e-4)")
    warmup_epochs: int = option(1, check=non_negative, help="constant warm-up epochs (reference: WARMUP_EPOCH 1)")
    warmup_lr: float = option(1e-5, check=non_negative, help="warm-up learning rate (reference: WARMUP_CONS_LR 1e-5)")
    warmup_recount: bool = option(True, help="restart the cosine count after the warm-up (Dassl WARMUP_RECOUNT, "
                                             "True in the reference)")
    views: int = option(10, check=non_negative,
                        help="augmented views of the train set encoded once and cycled over epochs (ours: "
                             "the reference re-augments every epoch; 0 = un-augmented features)")
    init_std: float = option(0.02, check=non_negative, help="std of the random context init (reference: 0.02)")
    class_chunk: Optional[int] = option(None, check=positive,
                                        help="classes per text-encoder pass, recomputed in the backward "
                                             "(bounds memory; None = all classes at once)")


class _PromptTask(TrainingTask[ImageBatch]):
    """CoOp/CoCoOp's batches (epoch e: train view e mod views, shuffled) and loss: cross-entropy of the
    method's `batch_logits` on cached image features."""

    def __init__(self, method: "CoOp", views: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.method, self.views, self.device, self.name = method, views, device, method.name

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.method.named_trainable()

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.views[0][0]) / self.method.config.batch_size)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[ImageBatch]:
        feats, labels = self.views[(epoch - 1) % len(self.views)]
        order = torch.randperm(len(feats), generator=generator)
        size = self.method.config.batch_size
        for start in range(0, len(order), size):
            index = order[start:start + size]
            yield feats[index].to(self.device), labels[index].to(self.device)

    def loss(self, batch: ImageBatch, forward: Forward) -> BatchLoss:
        feats, labels = batch
        return BatchLoss(F.cross_entropy(self.method.batch_logits(feats), labels, reduction="sum"))


@register_method("coop")
class CoOp(FrozenEncoderMethod):
    """Prompt learning with a static context. See the module docstring for options and defaults."""

    config_class = CoOpConfig
    #: the demo: 4 context tokens from "a photo of a" (CoCoOp's domain-generalization CoOp; 16 do not fit the
    #: mini CLIP's 16-token context)
    presets = {"paper": {}, "demo": {"n_ctx": 4, "init_phrase": "a photo of a"}}
    reference_templates = None  # learnt prompts, no templates
    label = "CoOp"
    table2_order = 3
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 71.51, "imagenet_v2": 64.20, "imagenet_sketch": 47.99, "imagenet_a": 49.71,
                 "imagenet_r": 75.21}

    def __init__(self, config: Optional[CoOpConfig] = None, **options: object) -> None:
        self.config = config_from(self.config_class, config, options)
        self.learner: Optional[PromptLearner] = None
        self.text_encoder: Optional[FrozenTextEncoder] = None
        self.logit_scale = 100.0
        self.history: list[dict[str, float]] = []
        self.val_top1: Optional[float] = None
        self._text_features: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ model pieces
    def setup(self, ctx: FitContext) -> None:
        """Build the prompt learner (and anything else trainable) for ctx's backbone and classes."""
        self._bind(ctx)
        model = ctx.backbone.model
        torch.manual_seed(ctx.seed)
        cfg = self.config
        self.learner = PromptLearner(model, ctx.backbone.tokenizer, list(ctx.classnames), cfg.n_ctx,
                                     cfg.init_phrase, cfg.class_specific, cfg.init_std).to(ctx.device)
        self.text_encoder = FrozenTextEncoder(model)
        self.logit_scale = ctx.backbone.logit_scale

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.learner.ctx]

    def class_text_features(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text features (C, embed_dim) of the current prompts, chunked over classes."""
        total = self.learner.num_classes
        chunk = self.config.class_chunk or total
        pieces = []
        for start in range(0, total, chunk):
            classes = slice(start, min(start + chunk, total))
            if torch.is_grad_enabled() and chunk < total:
                pieces.append(checkpoint(self._encode_classes, shift, classes, use_reentrant=False))
            else:
                pieces.append(self._encode_classes(shift, classes))
        return F.normalize(torch.cat(pieces), dim=-1)

    def _encode_classes(self, shift: Optional[torch.Tensor], classes: slice) -> torch.Tensor:
        return self.text_encoder(self.learner(shift, classes), self.learner.tokens[classes])

    def batch_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of raw image features under the current (differentiable) prompts."""
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.class_text_features().t()

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.batch_logits(features), labels)

    # ------------------------------------------------------------------ training
    def _train_views(self, ctx: FitContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        store, views = require_features(ctx), self.config.views
        if views == 0:
            return [store.encode(ctx.data_root, ctx.train, desc=f"{self.name}: train", with_labels=True)]
        return [store.encode(ctx.data_root, ctx.train, transform="train", seed=ctx.seed * 10_000 + 100 + view,
                             desc=f"{self.name}: train view {view + 1}/{views}", with_labels=True)
                for view in range(min(views, self.config.epochs))]

    def epoch_lr(self, epoch: int) -> float:
        """Learning rate of 0-indexed `epoch` (Dassl's constant warm-up + cosine, see `warmup_cosine_lr`)."""
        cfg = self.config
        return warmup_cosine_lr(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.warmup_recount)

    def train_config(self, ctx: FitContext) -> TrainConfig:
        """The reference's optimization: SGD, Dassl's constant warm-up then cosine, per epoch."""
        cfg = self.config
        return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="sgd",
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule="epoch_warmup_cosine",
                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                           warmup_recount=cfg.warmup_recount, seed=ctx.seed, workers=ctx.workers, seeding="run")

    def fit(self, ctx: FitContext) -> JSONObject:
        self.setup(ctx)
        views = self._train_views(ctx)
        if len(views[0][0]) == 0:
            raise ValueError(f"{self.name}: the training split has no decodable images")
        theta0 = {name: p.detach().clone() for name, p in self.named_trainable().items()}
        trainer = Trainer(_PromptTask(self, views, ctx.device), self.train_config(ctx), ctx.device, ctx.output_dir,
                          log=ctx.log)
        trainer.resume_if_saved(ctx.resume)
        with frozen_parameters(ctx.backbone.model):
            self.history = trainer.fit()
        self._endpoints = (theta0, {name: p.detach().clone() for name, p in self.named_trainable().items()})
        self._finish(ctx)
        return self.summary()

    # ----- weight-space interpolation (clipconv.wise) ---------------------------------------------
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trained tensors by name (CoOp: the context vectors)."""
        return {"ctx": self.learner.ctx}

    def interpolation_endpoints(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ₀ = the context as initialized at fit start (a phrase's embeddings with `init_phrase`; with the
        reference random init a random prompt, NOT zero-shot CLIP), θ₁ = the trained context."""
        endpoints = getattr(self, "_endpoints", None)
        if endpoints is None:
            raise RuntimeError(f"fit '{self.name}' before interpolating")
        return endpoints

    def load_interpolated(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainable()
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self._refresh_scoring()

    def _refresh_scoring(self) -> None:
        """Recompute what scoring caches from the prompts (CoOp: the class text features)."""
        with torch.no_grad():
            self._text_features = self.class_text_features()

    def _finish(self, ctx: FitContext) -> None:
        """Freeze the learnt prompts for scoring and report validation accuracy (no selection on it)."""
        with torch.no_grad():
            self._text_features = self.class_text_features()
        if len(ctx.val):
            feats, labels = ctx.features.encode(ctx.data_root, ctx.val, desc=f"{self.name}: val", with_labels=True)
            with torch.no_grad():
                predictions = self.logits_from_features(feats.to(ctx.device)).argmax(-1).cpu()
            self.val_top1 = 100.0 * float((predictions == labels).float().mean()) if len(labels) else None

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self._text_features is None:
            raise RuntimeError(f"{self.name} must be fitted before scoring")
        feats = F.normalize(features.float().to(self._text_features.device), dim=-1)
        return self.logit_scale * feats @ self._text_features.t()

    def check_backbone(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        """Every class's prompt (context + class name) must fit the text encoder's context length."""
        try:
            check_prompt_length(backbone.model, backbone.tokenizer, classnames, self.config.n_ctx,
                                self.config.init_phrase)
        except ValueError as err:
            raise ValueError(f"method '{self.name}': {err}") from None

    def trainable_count(self, spec) -> int:
        """The context vectors: M·width (M from the init phrase's word count when given), × C when class-specific."""

        cfg = self.config
        n_ctx = phrase_context_length(cfg.init_phrase) if cfg.init_phrase else cfg.n_ctx
        return n_ctx * spec.text_width * (spec.classes if cfg.class_specific else 1)

    def summary(self) -> JSONObject:
        cfg = self.config
        out: JSONObject = {"n_ctx": self.learner.n_ctx if self.learner else cfg.n_ctx,
                          "init_phrase": cfg.init_phrase, "class_specific": cfg.class_specific,
                          "epochs": cfg.epochs, "views": cfg.views}
        if self.history:
            out["final_train_loss"] = self.history[-1]["loss"]
        if self.val_top1 is not None:
            out["val_top1"] = self.val_top1
        return out
