"""Convpass_CLIP: adapters in the frozen image encoder + a text-initialized linear head, trained end to end.

The scale s of the adapter branch was searched over {0.01, 0.1, 1, 10, 100} in the paper, with no
published value for CLIP. Several `scales` are trained one after another from the same initialization
and the best is chosen on the validation split drawn from train (never a test set); with one scale
and no validation split the last epoch is kept, as in the paper.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch

from ..adapters import add_adapters, set_adapter_scale
from ..checkpoint import save_trainable
from ..engine import TrainConfig, Trainer
from ..head import ImageClassifier, text_head
from ..config import non_negative, positive
from .base import FitContext, Method, MethodConfig, option, register_method

__all__ = ["ConvpassCLIP", "ConvpassConfig", "DEFAULT_SCALE"]

# Adam's step size does not depend on the gradient's scale, so with the paper's lr of 1e-5 the adapter
# weights move by ~1e-5 per step whatever s is; s then sets how far the branch can move the residual
# stream. s = 10 is the middle of the paper's grid; use --scale with several values and --val-shots to search.
DEFAULT_SCALE = 10.0


@dataclass
class ConvpassConfig(MethodConfig):
    """Adapter and training options of Convpass_CLIP (defaults: the paper's protocol, Table 3)."""

    scales: tuple[float, ...] = option((DEFAULT_SCALE,), check=positive, aliases=("--scale",),
                                       help="adapter scale s; several values are each trained and the best is "
                                            "chosen on the validation split (see README)")
    dim: int = option(8, check=positive, help="bottleneck width h")
    placement: Optional[Literal["attn+mlp", "attn", "mlp"]] = option(
        None, choices=(None, "attn+mlp", "attn", "mlp"), help="sub-blocks with an adapter (default: the variant's)")
    sequential: bool = option(False, help="adapters after the sub-blocks (Seq-)")
    kernel_size: Literal[1, 3] = option(3, choices=(1, 3), help="adapter convolution kernel")
    conv_init: Literal["identity", "xavier"] = option("identity", choices=("identity", "xavier"),
                                                      help="initialization of the adapter convolution")
    dropout: float = option(0.1, check=non_negative, help="dropout inside the adapter")
    epochs: int = option(TrainConfig.epochs, check=positive, help="training epochs")
    batch_size: int = option(TrainConfig.batch_size, check=positive, help="images per training batch")
    lr: float = option(TrainConfig.lr, check=positive, help="AdamW learning rate")
    weight_decay: float = option(TrainConfig.weight_decay, check=non_negative, aliases=("--wd",), help="AdamW weight decay")
    warmup_epochs: float = option(TrainConfig.warmup_epochs, check=non_negative, help="linear warm-up epochs before the cosine decay")
    grad_checkpointing: bool = option(TrainConfig.grad_checkpointing, help="recompute trunk activations in backward (less memory, ~2x slower)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", choices=("auto", "fp32", "bf16", "fp16"), cli=False, help="training autocast (auto: the run's)")

    def __post_init__(self) -> None:
        if isinstance(self.scales, (int, float)):
            self.scales = (float(self.scales),)
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales:
            raise ValueError("give at least one adapter scale")
        super().__post_init__()


class ConvpassCLIP(Method):
    """Adapters (Convpass by default) + text-initialized head; only those train."""

    frozen_image_encoder = False
    config_class = ConvpassConfig
    adapter_method = "convpass"

    def __init__(
        self,
        scales: Union[float, Sequence[float]] = DEFAULT_SCALE,
        dim: int = 8,
        placement: Optional[str] = None,
        sequential: bool = False,
        kernel_size: int = 3,
        conv_init: str = "identity",
        dropout: float = 0.1,
        train: Union[TrainConfig, dict, None] = None,
        eval_batch_size: int = 128,
        resume: bool = False,
        **train_options: Any,
    ) -> None:
        self.scales = [float(scales)] if isinstance(scales, (int, float)) else [float(s) for s in scales]
        if not self.scales:
            raise ValueError("give at least one adapter scale")
        self.adapter_options = dict(method=self.adapter_method, dim=dim, placement=placement, sequential=sequential,
                                    kernel_size=kernel_size, conv_init=conv_init, dropout=dropout)
        cfg = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        for key, value in train_options.items():
            if not hasattr(cfg, key):
                raise TypeError(f"unknown option '{key}' for method '{self.name}'")
            setattr(cfg, key, value)
        self.train_config = cfg
        self.eval_batch_size = eval_batch_size
        self.resume = resume
        self.classifier: Optional[ImageClassifier] = None
        self.chosen: dict[str, Any] = {}

    # ----- setup -------------------------------------------------------------------------------
    def build(self, ctx: FitContext, scale: Optional[float] = None) -> ImageClassifier:
        """Inject adapters into the backbone's image encoder and attach the text-initialized head."""
        backbone = ctx.backbone
        for param in backbone.model.parameters():
            param.requires_grad_(False)
        head = text_head(backbone.model, backbone.tokenizer, list(ctx.classnames), list(ctx.templates), ctx.device)
        head.requires_grad_(True)
        # A private copy: the shared backbone stays plain for the frozen-encoder methods and their feature cache.
        visual = copy.deepcopy(backbone.model.visual)
        with torch.random.fork_rng(devices=[]):  # adapter initialization depends on the run's seed only
            torch.manual_seed(ctx.seed)
            add_adapters(visual, scale=self.scales[0] if scale is None else scale, **self.adapter_options)
        self.classifier = ImageClassifier(visual, head, backbone.logit_scale).to(ctx.device)
        return self.classifier

    def metadata(self, ctx: FitContext, scale: float) -> dict[str, Any]:
        """What a checkpoint of this method must match to be loaded (see clipconv.checkpoint)."""
        return {
            "backbone": ctx.backbone.describe(),
            "adapter": {**self.adapter_options, "scale": scale},
            "classes": {"count": len(ctx.classnames), "hash": ctx.class_hash},
            "method": self.name,
            "source": ctx.backbone.source(),
            "class_ids": list(ctx.class_ids),
        }

    # ----- fit ---------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> dict[str, Any]:
        from ..evaluate import collect_logits, image_loader
        from ..metrics import topk_accuracy

        cfg = dataclasses.replace(self.train_config, seed=ctx.seed, workers=ctx.workers)
        eval_batch_size = ctx.eval_batch_size
        classifier = self.classifier or self.build(ctx)
        initial = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
        backbone = ctx.backbone
        batches = math.ceil(len(ctx.train) / cfg.batch_size)

        def make_loader(generator: torch.Generator):
            return image_loader(ctx.data_root, ctx.train, backbone.train_transform, cfg.batch_size, cfg.workers,
                                shuffle=True, generator=generator)

        def validate() -> float:
            logits, labels = collect_logits(classifier, ctx.data_root, ctx.val, backbone.eval_transform, ctx.device,
                                            eval_batch_size, cfg.workers, desc="val")
            return topk_accuracy(logits, labels)["top1"]

        runs = []
        best_tensors, best = None, None
        for scale in self.scales:
            with torch.no_grad():
                for name, param in classifier.named_parameters():
                    if param.requires_grad:
                        param.copy_(initial[name])
            set_adapter_scale(classifier.visual, scale)
            run_dir = None
            if ctx.output_dir is not None:
                run_dir = Path(ctx.output_dir) / (f"scale_{scale:g}" if len(self.scales) > 1 else ".")
            ctx.log(f"training {self.name} with scale s={scale:g}: {len(ctx.train)} images, {batches} batches/epoch")
            trainer = Trainer(classifier, make_loader, batches, cfg, ctx.device, run_dir,
                              validate=validate if ctx.val else None, log=ctx.log)
            state_file = run_dir / "train_state.pt" if run_dir is not None else None
            if (self.resume or ctx.resume) and state_file is not None and state_file.is_file():
                trainer.load_state(state_file)
                ctx.log(f"resumed from {state_file} after epoch {trainer.epoch}")
            trainer.fit()
            picked = trainer.restore_best()
            record = {"scale": scale, "epochs": cfg.epochs, "final_loss": trainer.history[-1]["loss"],
                      "best_epoch": picked["epoch"] if picked else cfg.epochs,
                      "val_top1": picked["val_top1"] if picked else None, "history": trainer.history}
            runs.append(record)
            if run_dir is not None and len(self.scales) > 1:
                save_trainable(classifier, run_dir / "adapter.safetensors", self.metadata(ctx, scale))
            score = record["val_top1"] if record["val_top1"] is not None else -math.inf
            if best is None or score > best["score"]:
                best = {"score": score, "scale": scale, "record": record}
                best_tensors = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, param in classifier.named_parameters():
                if param.requires_grad:
                    param.copy_(best_tensors[name])
        set_adapter_scale(classifier.visual, best["scale"])
        classifier.eval()
        self.chosen = {"scale": best["scale"], "best_epoch": best["record"]["best_epoch"],
                       "val_top1": best["record"]["val_top1"],
                       "selected_on": "validation split from train" if ctx.val else "last epoch (no validation split)"}
        if ctx.output_dir is not None:
            save_trainable(classifier, Path(ctx.output_dir) / "adapter.safetensors", self.metadata(ctx, best["scale"]))
        return {"chosen": self.chosen, "runs": runs}

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("call fit() (or build()) before logits()")
        self.classifier.eval()
        return self.classifier(images)

    def summary(self) -> dict[str, Any]:
        return {"adapter": self.adapter_options, "train": self.train_config.to_dict(), **self.chosen}


def load_classifier(path: Union[str, Path], backbone: Any) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild a trained classifier from an adapter checkpoint on top of a (matching) backbone.

    The adapter configuration and class count come from the checkpoint's metadata; the backbone must be
    the one it was trained on (same weights hash and QuickGELU flag), else CheckpointMismatchError.
    """
    from ..checkpoint import CheckpointMismatchError, load_trainable, read_metadata

    meta = read_metadata(path)
    if meta.get("backbone") != backbone.describe():
        raise CheckpointMismatchError(
            f"checkpoint '{path}' was trained on backbone {meta.get('backbone')}, not on {backbone.describe()}; "
            f"pass the same --model/--pretrained (it was made with {meta.get('source')})"
        )
    options = {k: v for k, v in meta["adapter"].items() if k != "scale"}
    for param in backbone.model.parameters():
        param.requires_grad_(False)
    visual = copy.deepcopy(backbone.model.visual)
    add_adapters(visual, scale=meta["adapter"]["scale"], **options)
    count = int(meta["classes"]["count"])
    head = torch.nn.Linear(int(backbone.model.visual.output_dim), count).to(backbone.device)
    classifier = ImageClassifier(visual, head, backbone.logit_scale).to(backbone.device)
    load_trainable(classifier, path, expected={"backbone": backbone.describe(), "adapter": meta["adapter"]})
    classifier.eval()
    return classifier, meta


@register_method("convpass")
class Convpass(ConvpassCLIP):
    """Convpass parallel to attention and MLP (the paper's main model)."""

    adapter_method = "convpass"


@register_method("convpass_attn")
class ConvpassAttn(ConvpassCLIP):
    """Convpass beside attention only (Table 5 ablation)."""

    adapter_method = "convpass_attn"


@register_method("convpass_share")
class ConvpassShare(ConvpassCLIP):
    """Convpass with shared 1×1 projections and depthwise 3×3 (§3.3); use dim=32."""

    adapter_method = "convpass_share"
