"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024).

Reference: MaxZanella/CLIP-LoRA (run_utils.py, lora.py, loralib/utils.py, datasets/imagenet.py), whose
defaults are the ones here: LoRA r = 2, alpha = 1, dropout 0.25 on the inputs of q, k, v of every attention
layer of BOTH encoders (`--encoder both --position all --params q k v`); the class weights are the adapted
text encoder's L2-normalized embeddings of "a photo of a {}." (ImageNet's single template), recomputed at
every step; logits = logit_scale · cos; cross-entropy; AdamW lr 2e-4, betas (0.9, 0.999), weight decay 1e-2;
500 × K iterations (K = shots) at batch 32 with a cosine schedule per iteration down to 1e-6
(`CosineAnnealingLR(total_iters, eta_min=1e-6)`); no warm-up; the last iteration is kept (the reference's
validation is switched off). Train augmentation: the run's train transform (the reference: random resized
crop 0.08–1, bicubic, + flip, as the protocol's). The reference trains in fp16 autocast on GPU; here the
run's precision (fp32 on CPU).

Cost: every step runs the text encoder over all C classes (1000 on ImageNet) besides the image batch:
8,000 steps at 16 shots. `iters_per_shot` (reference 500) is the named option for fewer iterations.

With B = 0 (fresh, or the α = 0 end of `interpolation_endpoints`) the model is exactly zero-shot CLIP with
"a photo of a {}.". LoRA is linear: `merged_model()` folds the deltas into a plain open_clip model.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.adapters import add_lora
from clipconv.backbone import Backbone
from clipconv.config import non_negative, positive, probability
from clipconv.data.draft import draft_for
from clipconv.evaluation import image_loader
from clipconv.head import class_embeddings, zero_shot_logits
from clipconv.merge import merge_adapters
from clipconv.methods.base import FitContext, Method, config_from, option, register_method
from clipconv.methods.robust import ROBUST_PRESET, ROBUST_RECIPE, RobustOptions
from clipconv.params import ParamSpec, count_elements, meta_copy
from clipconv.runtime.jsontypes import JSONObject
from clipconv.training import Anchors, BatchLoss, Forward, ImageBatch, Record, TrainConfig, Trainer, TrainingTask

__all__ = ["ClipLoRA", "ClipLoRAConfig", "ENCODERS"]

ENCODERS = ("both", "vision", "text")


@dataclass
class ClipLoRAConfig(RobustOptions):
    """CLIP-LoRA's options, defaults from MaxZanella/CLIP-LoRA (run_utils.py, lora.py), and the robustness-keeping
    ones (`RobustOptions`: zero-shot anchors toward the un-adapted CLIP, weight averaging; off by default)."""

    encoder: str = option("both", choices=ENCODERS, help="encoders with LoRA (reference --encoder both)")
    targets: tuple[str, ...] = option(("q", "k", "v"), help="attention projections with LoRA (reference --params q k v)")
    rank: int = option(2, check=positive, help="LoRA rank r (reference --r 2)")
    alpha: float = option(1.0, check=positive, help="LoRA alpha; updates scaled by alpha/r (reference --alpha 1)")
    dropout: float = option(0.25, check=probability, help="dropout on the LoRA input (reference --dropout_rate 0.25)")
    lr: float = option(2e-4, check=positive, help="AdamW learning rate (reference --lr 2e-4)")
    weight_decay: float = option(1e-2, check=non_negative, aliases=("--wd",), help="AdamW weight decay (reference 1e-2)")
    betas: tuple[float, float] = option((0.9, 0.999), check=probability, help="AdamW betas (reference (0.9, 0.999))")
    min_lr: float = option(1e-6, check=non_negative, help="end of the cosine schedule (reference eta_min 1e-6)")
    iters_per_shot: int = option(500, check=positive,
                                 help="iterations per shot: 500·K in total (reference --n_iters 500); fewer is a "
                                      "deviation from the reference")
    batch_size: int = option(32, check=positive, help="images per step (reference --batch_size 32)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", choices=("auto", "fp32", "bf16", "fp16"), cli=False, help="training autocast (auto: the run's)")

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets.replace(",", " ").split()) if isinstance(self.targets, str) \
            else tuple(self.targets)
        super().__post_init__()  # the types and ranges declared with each option

    def total_iterations(self, shots: int) -> int:
        """500 × K in the reference."""
        return self.iters_per_shot * shots


def cosine_lr(step: int, total: int, base_lr: float, min_lr: float) -> float:
    """The learning rate of 0-indexed `step` under CosineAnnealingLR(T_max=total, eta_min=min_lr)."""
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * step / total)) / 2


def _add_clip_lora(model: nn.Module, cfg: ClipLoRAConfig) -> nn.ModuleList:
    """LoRA on the chosen encoders of an open_clip CLIP model (in place); everything else frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    added = nn.ModuleList()
    if cfg.encoder in ("both", "text"):
        added.extend(add_lora(model.transformer, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout))
    if cfg.encoder in ("both", "vision"):
        added.extend(add_lora(model.visual.transformer, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout))
    for param in added.parameters():
        param.requires_grad_(True)
    return added


class _ClipLoRATask(TrainingTask[ImageBatch]):
    """CLIP-LoRA's batches (the run's train transform, shuffled) and loss: cross-entropy of logit_scale ·
    cos(image, class embedding), the class embeddings re-encoded by the adapted text encoder every step.
    With anchors (`TrainConfig.anchor_logits` / `anchor_features`, `Anchors`) the zero-shot model is the
    un-adapted CLIP (`ctx.backbone.model`, never modified): its image features of the same batch under no_grad
    and its class embeddings of the same prompts, encoded once."""

    name = "clip_lora"

    def __init__(self, method: "ClipLoRA", ctx: FitContext, anchors: Anchors) -> None:
        self.method, self.ctx, self.model, self.anchors = method, ctx, method.model, anchors
        self.draft = draft_for(ctx.draft, ctx.backbone.train_transform, training=True)  # None unless --draft all
        self.frozen = ctx.backbone.model
        self.zs_weights = method.class_weights(self.frozen) if anchors.active else None

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.method.named_trainable()

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.ctx.train) / self.method.config.batch_size)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Optional[ImageBatch]]:
        ctx = self.ctx
        self.anchors.reset()
        return image_loader(ctx.data_root, ctx.train, ctx.backbone.train_transform, self.method.config.batch_size,
                            ctx.workers, shuffle=True, generator=generator, draft_size=self.draft,
                            pin_memory=torch.device(ctx.device).type == "cuda")

    def loss(self, batch: ImageBatch, forward: Forward) -> BatchLoss:
        method, device = self.method, self.ctx.device
        images, labels = batch[0].to(device), batch[1].to(device)
        text = method.train_class_weights()
        image = F.normalize(self.model.encode_image(images).float(), dim=-1)
        logits = method.logit_scale * image @ text.t()
        penalty = None
        if self.zs_weights is not None:
            with torch.no_grad():
                self.frozen.eval()
                zs_image = F.normalize(self.frozen.encode_image(images).float(), dim=-1)
            penalty = self.anchors.penalty(logits, method.logit_scale * zs_image @ self.zs_weights.t(), image, zs_image)
        return BatchLoss(F.cross_entropy(logits, labels, reduction="sum"), int((logits.argmax(-1) == labels).sum()),
                         penalty)

    def epoch_metrics(self) -> Record:
        return self.anchors.metrics(lambda tensor: tensor)  # trains whole in every process: nothing to reduce


@register_method("clip_lora")
class ClipLoRA(Method):
    """LoRA in both CLIP encoders, classes scored by the adapted text encoder (no head)."""

    frozen_image_encoder = False
    config_class = ClipLoRAConfig
    presets = {"paper": {}, "demo": {}, ROBUST_PRESET: ROBUST_RECIPE}
    reference_templates = "photo"
    label = "CLIP-LoRA"
    wise_start_is_zero_shot = True  # B = 0 in both encoders

    def __init__(self, config: Optional[ClipLoRAConfig] = None, **options: object) -> None:
        self.config = config_from(ClipLoRAConfig, config, options)
        self.model: Optional[nn.Module] = None
        self.lora: Optional[nn.ModuleList] = None
        self.weights: Optional[torch.Tensor] = None
        self.logit_scale = 100.0
        self.history: list[dict[str, float]] = []
        self.iterations = 0
        self._endpoints: Optional[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = None
        self._classes: list[str] = []
        self._prompts: list[str] = []
        self._tokens: Optional[torch.Tensor] = None
        self.template_set = ""

    # ----- setup -------------------------------------------------------------------------------
    def build(self, ctx: FitContext) -> nn.Module:
        """A private copy of the backbone's CLIP with LoRA (B = 0) on the chosen encoders; class weights set."""
        self.template_set, self._prompts = self.templates_for(ctx)
        self._classes = list(ctx.classnames)
        self._tokenizer = ctx.backbone.tokenizer
        self.logit_scale = ctx.backbone.logit_scale
        self.model = copy.deepcopy(ctx.backbone.model)
        with torch.random.fork_rng(devices=[]):  # LoRA's A depends on the run's seed only
            torch.manual_seed(ctx.seed)
            self.lora = _add_clip_lora(self.model, self.config)
        self.model.to(ctx.device).eval()
        self._refresh_weights()
        return self.model

    def class_weights(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """L2-normalized (C, embed_dim) text embeddings of the prompts by the (adapted) text encoder, or by
        `model`'s (e.g. the un-adapted CLIP: zero-shot's)."""
        model = self.model if model is None else model
        device = next(model.parameters()).device
        return class_embeddings(model, self._tokenizer, self._classes, self._prompts, device=device).float()

    def train_class_weights(self) -> torch.Tensor:
        """The same, with gradients into the text encoder's LoRA (the reference's per-step re-encoding; with
        several templates their normalized embeddings are averaged and normalized again)."""
        if self._tokens is None:
            prompts = [t.format(name) for name in self._classes for t in self._prompts]
            self._tokens = self._tokenizer(prompts).to(next(self.model.parameters()).device)
        encoded = F.normalize(self.model.encode_text(self._tokens).float(), dim=-1)
        return F.normalize(encoded.view(len(self._classes), len(self._prompts), -1).mean(dim=1), dim=-1)

    @torch.no_grad()
    def _refresh_weights(self) -> None:
        self.model.eval()
        self.weights = self.class_weights()

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ----- fit ---------------------------------------------------------------------------------
    def train_config(self, ctx: FitContext, shots: int) -> TrainConfig:
        """The reference's optimization: AdamW, cosine per iteration to `min_lr` over 500·K iterations."""
        cfg = self.config
        return TrainConfig(steps=cfg.total_iterations(shots), batch_size=cfg.batch_size, lr=cfg.lr,
                           weight_decay=cfg.weight_decay, betas=cfg.betas, fused=False, schedule="cosine_annealing",
                           min_lr=cfg.min_lr, precision=cfg.precision, seed=ctx.seed, workers=ctx.workers,
                           seeding="run", weight_average=cfg.weight_average, anchor_logits=cfg.anchor_logits,
                           anchor_features=cfg.anchor_features)

    def fit(self, ctx: FitContext) -> JSONObject:
        cfg = self.config
        if self.model is None:
            self.build(ctx)
        shots = _shots(ctx.train)
        train = self.train_config(ctx, shots)
        initial = {n: p.detach().clone() for n, p in self.named_trainable().items()}
        torch.manual_seed(ctx.seed)  # LoRA dropout masks and the train augmentation (a resume restores the state)
        task = _ClipLoRATask(self, ctx, Anchors.of(train))
        trainer = Trainer(task, train, ctx.device, ctx.output_dir, log=ctx.log)
        ctx.log(f"clip_lora: {count_elements(trainer.params):,} LoRA parameters, {train.steps} iterations (= "
                f"{cfg.iters_per_shot} × {shots} shots), batch {cfg.batch_size}, {len(self._classes)} classes "
                "re-encoded per step")
        trainer.resume_if_saved(ctx.resume)
        self.history = trainer.fit()
        self.iterations = trainer.step
        self._refresh_weights()
        self._endpoints = (initial, {n: p.detach().clone() for n, p in self.named_trainable().items()})
        return self.summary()

    # ----- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.model is None or self.weights is None:
            raise RuntimeError("call fit() (or build()) before logits()")
        self.model.eval()
        device = self.weights.device
        return zero_shot_logits(self.model.encode_image(images.to(device)), self.weights, self.logit_scale)

    # ----- weight-space interpolation (clipconv.wise) ---------------------------------------------
    def interpolation_endpoints(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(θ₀, θ₁) over the LoRA tensors: θ₀ = initialization (B = 0: zero-shot CLIP), θ₁ = trained."""
        if self._endpoints is None:
            raise RuntimeError(f"fit '{self.name}' before interpolating")
        return self._endpoints

    @torch.no_grad()
    def load_interpolated(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainable()
        for name, tensor in state.items():
            params[name].copy_(tensor)
        self._refresh_weights()

    # ----- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_model(self) -> nn.Module:
        """A plain open_clip model (no adapter code) with every LoRA delta folded into its weights."""
        if self.model is None:
            raise RuntimeError("call fit() (or build()) before merging")

        merged = copy.deepcopy(self.model).eval()
        merge_adapters(merged)  # both encoders' LoRA folded in, wrappers removed
        return merged

    # ----- reporting --------------------------------------------------------------------------
    def check_backbone(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        """LoRA must fit the chosen encoders' attention modules: added to a meta-device copy of the model."""
        try:
            _add_clip_lora(meta_copy(backbone.model), self.config)
        except ValueError as err:
            raise ValueError(f"method '{self.name}': {err}") from None

    def trainable_count(self, spec: ParamSpec) -> int:
        """The LoRA tensors of both encoders (no head: the text encoder scores the classes)."""
        return count_elements(_add_clip_lora(meta_copy(spec.model), self.config).parameters())

    def summary(self) -> JSONObject:
        cfg = self.config
        return {"template_set": self.template_set, "templates": len(self._prompts), "iterations": self.iterations,
                "iters_per_shot": cfg.iters_per_shot, "encoder": cfg.encoder, "rank": cfg.rank, "alpha": cfg.alpha,
                "final_loss": self.history[-1]["loss"] if self.history else None, "epochs": len(self.history),
                **cfg.robustness()}


def _shots(train) -> int:
    """K of a K-shot split: the largest number of images of one class."""
    counts: dict[int, int] = {}
    for _, label in train:
        counts[label] = counts.get(label, 0) + 1
    if not counts:
        raise ValueError("clip_lora needs training images")
    return max(counts.values())
