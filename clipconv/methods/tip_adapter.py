"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of few-shot features.

logits = logit_scale·f·Wᵀ + α·exp(−β(1 − f·keysᵀ))·values, f the L2-normalized test feature, W the
zero-shot class embeddings, keys the L2-normalized mean of `augment_rounds` augmented features of each
K-shot image (RandomResizedCrop at the model's input size, scale 0.5–1, bicubic, + flip), values one-hot.

α and β start at the reference's ImageNet values (1.17, 1) and are searched on ctx.val (β over
[0.1, 7) in 200 steps, α over [0.1, 3) in 20 steps; `search="small"` uses 20 × 10 for quick runs). The
reference picks them — and Tip-Adapter-F's best epoch — on the test set; here only ctx.val is used.
With an empty ctx.val the initial α/β (and the last epoch) are kept, with a log line saying so.
The text classifier uses the reference's 7 ImageNet templates (the "tip" set) unless the run's
--templates or the `templates` option says otherwise.

Tip-Adapter-F trains the keys only: AdamW lr 1e-3 (eps 1e-4), 20 epochs, batch 256, cosine per
iteration, α/β fixed while training, fresh augmented features every epoch (each epoch's features are
cached under their own seed, so a rerun encodes nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from clipconv.backbone import Backbone, _to_rgb
from clipconv.config import non_negative, positive
from clipconv.methods.base import PAPER_AND_DEMO, FitContext, MethodConfig, config_from, option, register_method
from clipconv.methods.frozen import FrozenEncoderMethod, require_features, templates_summary, text_classifier
from clipconv.runtime.jsontypes import JSONObject
from clipconv.training import BatchLoss, Forward, ImageBatch, TrainConfig, Trainer, TrainingTask

__all__ = ["TipAdapter", "TipAdapterF", "TipAdapterConfig", "TipAdapterFConfig", "tip_logits", "tip_cache_transform",
           "search_grid"]

SEARCH_GRIDS = {"full": ((7.0, 200), (3.0, 20)), "small": ((7.0, 20), (3.0, 10))}


@dataclass
class TipAdapterConfig(MethodConfig):
    alpha: float = option(1.17, check=non_negative,
                          help="initial residual ratio α (Tip-Adapter configs/imagenet.yaml: init_alpha)")
    beta: float = option(1.0, check=non_negative,
                         help="initial sharpness β (Tip-Adapter configs/imagenet.yaml: init_beta)")
    search: str = option("full", choices=(*SEARCH_GRIDS, "none"),
                         help="α/β search on ctx.val: full = the reference grid (β 200 × α 20 steps), small = "
                              "20 × 10 for quick runs, none = keep the initial values")
    augment_rounds: int = option(10, check=positive,
                                 help="augmented passes averaged into the cache keys (reference: augment_epoch 10)")
    templates: Union[str, Sequence[str], None] = option(
        None, help="template set name, file or list; default: the run's --templates, else the reference's "
                   "7 ImageNet templates ('tip')")


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    epochs: int = option(20, check=positive,
                         help="training epochs of the cache keys (configs/imagenet.yaml: train_epoch 20)")
    lr: float = option(1e-3, check=positive,
                       help="AdamW learning rate, cosine per iteration (configs/imagenet.yaml: lr 0.001)")
    batch_size: int = option(256, check=positive, help="training batch size (reference ImageNet loader: 256)")
    eps: float = option(1e-4, check=positive, help="AdamW eps (reference: 1e-4)")


def tip_logits(features: torch.Tensor, class_weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: float, beta: float, logit_scale: float) -> torch.Tensor:
    """Tip-Adapter logits from raw features; `keys` (N_keys, D) are L2-normalized (trained ones as they are),
    `values` (N_keys, C)."""
    f = F.normalize(features.float(), dim=-1)
    affinity = f @ keys.t()
    return logit_scale * f @ class_weights.t() + alpha * torch.exp(-beta * (1.0 - affinity)) @ values


def search_grid(high: float, steps: int) -> list[float]:
    """The reference's grid: 0.1 + i·(high − 0.1)/steps for i in 0..steps−1."""
    return [0.1 + i * (high - 0.1) / steps for i in range(steps)]


def tip_cache_transform(backbone: Backbone, scale: tuple[float, float] = (0.5, 1.0)) -> tuple[Callable, str]:
    """Tip-Adapter's cache augmentation at the model's input size, with a stable id for the feature cache."""


    size = backbone.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    normalize = next(t for t in backbone.eval_transform.transforms if isinstance(t, T.Normalize))
    transform = T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(mean=normalize.mean, std=normalize.std),
    ])
    name = f"tip-cache:rrc{size},scale{scale[0]}-{scale[1]},bicubic,flip,mean{tuple(normalize.mean)},std{tuple(normalize.std)}"
    return transform, name


def best_alpha_beta(val_feats: torch.Tensor, val_labels: torch.Tensor, class_weights: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor, logit_scale: float,
                    betas: Sequence[float], alphas: Sequence[float]) -> tuple[float, float, float]:
    """(α, β, val top-1 %) maximizing validation accuracy; first best wins on ties."""
    f = F.normalize(val_feats.float(), dim=-1)
    clip = logit_scale * f @ class_weights.t()
    affinity = f @ keys.t()
    alpha_t = torch.tensor(list(alphas), dtype=clip.dtype).view(-1, 1, 1)
    best = (-1.0, 0.0, 0.0)
    for beta in betas:
        cache = torch.exp(-beta * (1.0 - affinity)) @ values  # (N, C)
        predictions = (clip.unsqueeze(0) + alpha_t * cache.unsqueeze(0)).argmax(dim=-1)  # (A, N)
        accuracy = (predictions == val_labels.view(1, -1)).float().mean(dim=1)
        index = int(accuracy.argmax())
        if float(accuracy[index]) > best[0]:
            best = (float(accuracy[index]), float(alphas[index]), float(beta))
    return best[1], best[2], 100.0 * best[0]


@register_method("tip_adapter")
class TipAdapter(FrozenEncoderMethod):
    """Training-free Tip-Adapter; options in `TipAdapterConfig`."""

    config_class = TipAdapterConfig
    presets = PAPER_AND_DEMO
    reference_templates = "tip"
    label = "Tip-Adapter"
    table2_order = 5

    def __init__(self, config: Optional[TipAdapterConfig] = None, **options: object) -> None:
        self.config = config_from(self.config_class, config, options)
        self.alpha, self.beta = float(self.config.alpha), float(self.config.beta)
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.class_weights: Optional[torch.Tensor] = None
        self.logit_scale = 100.0
        self.val_top1: Optional[float] = None
        self.search_source = ""
        self.template_set, self._used_templates = "", []

    # --------------------------------------------------------------- building blocks
    def _build_cache(self, ctx: FitContext) -> None:
        store = require_features(ctx)
        self._bind(ctx)
        self.template_set, self._used_templates = self.templates_for(ctx, self.config.templates)
        self.class_weights = text_classifier(ctx, self._used_templates).to(ctx.device)
        self.logit_scale = ctx.backbone.logit_scale
        self._augment, self._augment_name = tip_cache_transform(ctx.backbone)
        feats, labels = store.encode(ctx.data_root, ctx.train, transform=self._augment, rounds=self.config.augment_rounds,
                                     seed=ctx.seed, desc="tip-adapter: cache keys", with_labels=True,
                                     transform_name=self._augment_name)
        if len(feats) == 0:
            raise ValueError("tip_adapter: the training split has no decodable images")
        self.keys = F.normalize(feats, dim=-1).to(ctx.device)
        self.values = F.one_hot(labels, num_classes=len(ctx.classnames)).float().to(ctx.device)

    def _val_features(self, ctx: FitContext) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not len(ctx.val):
            return None
        feats, labels = ctx.features.encode(ctx.data_root, ctx.val, desc="tip-adapter: val", with_labels=True)
        return feats.to(ctx.device), labels.to(ctx.device)

    def _search(self, ctx: FitContext, val: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        search = self.config.search
        if search == "none" or val is None:
            self.search_source = "initial values" + ("" if val is not None else " (ctx.val is empty)")
            if val is None and search != "none":
                ctx.log("tip_adapter: no validation split; keeping the initial alpha/beta")
            return
        (beta_high, beta_steps), (alpha_high, alpha_steps) = SEARCH_GRIDS[search]
        self.alpha, self.beta, self.val_top1 = best_alpha_beta(
            val[0], val[1], self.class_weights, self.keys, self.values, self.logit_scale,
            search_grid(beta_high, beta_steps), search_grid(alpha_high, alpha_steps))
        self.search_source = "ctx.val"
        ctx.log(f"{self.name}: alpha = {self.alpha:.3f}, beta = {self.beta:.3f}, val top-1 {self.val_top1:.2f}%")

    # --------------------------------------------------------------- Method API
    def fit(self, ctx: FitContext) -> JSONObject:
        self._build_cache(ctx)
        self._search(ctx, self._val_features(ctx))
        return self.summary()

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            raise RuntimeError(f"{self.name} must be fitted before scoring")
        return tip_logits(features.to(self.keys.device), self.class_weights, self.keys, self.values,
                          self.alpha, self.beta, self.logit_scale)

    def trainable_count(self, spec) -> int:
        """Training-free: α and β are searched, nothing is trained."""
        return 0

    def summary(self) -> JSONObject:
        out: JSONObject = {"alpha": self.alpha, "beta": self.beta, "alpha_beta_from": self.search_source,
                          "cache_size": 0 if self.keys is None else int(self.keys.shape[0]),
                          **templates_summary(self.template_set, self._used_templates)}
        if self.val_top1 is not None:
            out["val_top1"] = self.val_top1
        return out


class _KeysTask(TrainingTask[ImageBatch]):
    """Tip-Adapter-F's batches (a freshly augmented view of the train set per epoch, shuffled) and loss:
    cross-entropy of the Tip-Adapter logits with the cache keys trained (α, β fixed); validation top-1 on
    ctx.val picks the epoch."""

    name = "tip_adapter_f"

    def __init__(self, method: "TipAdapterF", ctx: FitContext,
                 val: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.method, self.ctx, self.val = method, ctx, val
        self.keys = torch.nn.Parameter(method.keys.clone())

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"keys": self.keys}

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.keys) / self.method.config.batch_size)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[ImageBatch]:
        device = self.ctx.device
        feats, labels = self.method._epoch_features(self.ctx, epoch - 1)
        feats, labels = feats.to(device), labels.to(device)
        order = torch.randperm(len(feats), generator=generator).to(device)
        size = self.method.config.batch_size
        for start in range(0, len(order), size):
            index = order[start:start + size]
            yield feats[index], labels[index]

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        m = self.method
        return tip_logits(feats, m.class_weights, self.keys, m.values, m.alpha, m.beta, m.logit_scale)

    def loss(self, batch: ImageBatch, forward: Forward) -> BatchLoss:
        feats, labels = batch
        return BatchLoss(F.cross_entropy(self._logits(feats), labels, reduction="sum"))

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val is None:
            return None
        return 100.0 * float((self._logits(self.val[0]).argmax(-1) == self.val[1]).float().mean())


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are fine-tuned; options in `TipAdapterFConfig`."""

    config_class = TipAdapterFConfig
    label = "Tip-Adapter-F"
    table2_order = 6
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 73.41, "imagenet_v2": 65.39, "imagenet_sketch": 48.58, "imagenet_a": 49.23,
                 "imagenet_r": 77.54}

    def __init__(self, config: Optional[TipAdapterFConfig] = None, **options: object) -> None:
        super().__init__(config, **options)
        self.best_epoch: Optional[int] = None
        self.history: list[dict[str, float]] = []

    def _epoch_features(self, ctx: FitContext, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One freshly augmented view of the train set per epoch (cached under its own seed)."""
        return ctx.features.encode(ctx.data_root, ctx.train, transform=self._augment, rounds=1,
                                   seed=ctx.seed * 10_000 + 1 + epoch, desc=f"tip-adapter-f: epoch {epoch + 1}",
                                   with_labels=True, transform_name=self._augment_name)

    def train_config(self, ctx: FitContext) -> TrainConfig:
        """The reference's optimization: AdamW (eps 1e-4, torch's default weight decay 0.01), cosine per
        iteration over epochs × iterations."""
        cfg = self.config
        return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, eps=cfg.eps, weight_decay=0.01,
                           fused=False, schedule="cosine_annealing", seed=ctx.seed, workers=ctx.workers,
                           seeding="run")

    def fit(self, ctx: FitContext) -> JSONObject:
        self._build_cache(ctx)
        initial_keys = self.keys.clone()
        task = _KeysTask(self, ctx, self._val_features(ctx))
        trainer = Trainer(task, self.train_config(ctx), ctx.device, ctx.output_dir, log=ctx.log)
        trainer.resume_if_saved(ctx.resume)
        self.history = trainer.fit()
        picked = trainer.restore_best()  # the best validation epoch; the last one without validation
        self.best_epoch = picked["epoch"] if picked else self.config.epochs
        self.keys = task.keys.detach().clone()  # used as trained (the reference does not renormalize them)
        self._endpoints = ({"keys": initial_keys}, {"keys": self.keys.clone()})
        self._search(ctx, task.val)
        return self.summary()

    def trainable_count(self, spec) -> int:
        """The cache keys: one D-dim key per training image (N classes × K shots)."""
        return spec.train_images * spec.embed_dim

    # ----- weight-space interpolation (clipconv.wise) ---------------------------------------------
    def interpolation_endpoints(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ₀ = the untrained cache keys (training-free Tip-Adapter, NOT zero-shot CLIP), θ₁ = the trained
        keys; α and β stay the ones chosen after training."""
        endpoints = getattr(self, "_endpoints", None)
        if endpoints is None:
            raise RuntimeError(f"fit '{self.name}' before interpolating")
        return endpoints

    def load_interpolated(self, state: dict[str, torch.Tensor]) -> None:
        self.keys = state["keys"].to(self.values.device)

    def summary(self) -> JSONObject:
        return {**super().summary(), "best_epoch": self.best_epoch, "epochs": self.config.epochs}
