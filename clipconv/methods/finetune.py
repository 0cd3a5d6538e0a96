"""AdapterTuning: adapters in the frozen image encoder + a text-initialized linear head, trained end to end
(the paper's Convpass_CLIP, for any registered adapter kind).

The scale s of the adapter branch was searched over {0.01, 0.1, 1, 10, 100} in the paper, with no
published value for CLIP. Several `scales` are trained one after another from the same initialization
and the best is chosen on the validation split drawn from train (never a test set); with one scale
and no validation split the last epoch is kept, as in the paper.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, TypedDict, Union

import torch

from clipconv.adapters import (
    ADAPTERS, AdapterConfig, ConvpassConfig, add_adapters, get_adapter, make_config, set_adapter_scale
)
from clipconv.backbone import Backbone
from clipconv.checkpoint import CheckpointMismatchError, load_trainable, read_metadata, save_trainable
from clipconv.config import non_negative, positive
from clipconv.data import image_dataset
from clipconv.data.decoded import DecodedImageDataset, decoded_images, decoded_resized
from clipconv.data.draft import draft_for, needed_short_side
from clipconv.data.sharded import train_loader
from clipconv.data.tensorize import split_transform
from clipconv.evaluation import ImageBatches, collect_logits, logits_of_batches
from clipconv.head import ImageClassifier, text_head
from clipconv.methods.base import METHODS, FitContext, Method, config_from, option, register_method
from clipconv.methods.robust import ROBUST_PRESET, ROBUST_RECIPE, RobustOptions
from clipconv.metrics import topk_accuracy
from clipconv.params import ParamSpec, count_elements, meta_copy
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.ranks import is_distributed
from clipconv.training import AnchoredClassifierTask, TrainConfig, Trainer

__all__ = ["AdapterTuning", "loader_workers", "AdapterTuningConfig", "tuning_config", "load_classifier",
           "load_endpoints", "DEFAULT_SCALE", "DEMO_RECIPE", "ADAPTER_METHOD_PREFIX", "adapter_method_name",
           "AdapterKindMethod", "FIT_IDENTITY_KEYS"]

# The checkpoint metadata two fits of one method (different seeds) must share to be averaged together.
FIT_IDENTITY_KEYS = ("method", "adapter", "backbone", "class_ids")

# Adam's step size does not depend on the gradient's scale, so with the paper's lr of 1e-5 the adapter
# weights move by ~1e-5 per step whatever s is; s then sets how far the branch can move the residual
# stream. s = 10 is the middle of the paper's grid; use --scale with several values and --val-shots to search.
DEFAULT_SCALE = 10.0
_TRAIN = TrainConfig()

# The demo preset (`--preset demo`, `--demo`): the miniature benchmark's recipe, chosen for the shipped mini CLIP.
# The paper's Convpass_CLIP settings (h = 8, lr 1e-5, 50 epochs, crop scale 0.08–1) are tuned for a 768-wide
# ViT-B/16 on 224-px ImageNet photos; the mini CLIP is 128 wide and sees 48-px images whose objects an 8 %-area
# crop often cuts away (its crop scale is the demo run setting, clipconv.mini_clip.MINI_CLIP_CROP_SCALE).
# Picked by validation top-1 on 16 images per class from the mini world's *train* pool, disjoint from the 16
# shots (`train_imagenet_fs.py --demo --shots 16 --val-shots 16 --epochs 30 --lr L --dim H --crop-scale C`):
#   lr 1e-5, h 8, crop 0.08 (paper): 53.5 (zero-shot level); lr 3e-3, h 8, crop 0.9: 57.0;
#   lr 3e-3, h 32, crop 0.5: 64.3; lr 3e-3, h 32, crop 0.9: 65.0 (chosen).
# s = 1: at lr 1e-2, s = 10 collapsed to chance. 30 epochs of 8 steps (512 images, batch 64).
#: the demo training recipe every adapter-tuning method shares (its architecture keeps the kind's defaults)
DEMO_RECIPE: Mapping[str, object] = {"lr": 3e-3, "epochs": 30}


@dataclass
class AdapterTuningConfig(RobustOptions):
    """Training options (defaults: the paper's Convpass_CLIP protocol, Table 3) and the robustness-keeping ones
    (`RobustOptions`, off by default). `tuning_config(KindConfig)` adds the adapter kind's own options (all but
    `scale`, which `scales` replaces); with its kind named, the kind's own rules (the placement it implies, options
    it refuses) are checked on construction too."""

    #: the adapter kind whose options this config holds (set by `tuning_config`)
    adapter_kind: ClassVar[Optional[str]] = None

    scales: tuple[float, ...] = option((DEFAULT_SCALE,), check=positive, aliases=("--scale",),
                                       help="adapter scale(s) s; several are each trained and the best is chosen on the "
                                      "validation split (--val-shots)")
    epochs: int = option(_TRAIN.epochs, check=positive, help="training epochs (the paper's 50)")
    batch_size: int = option(_TRAIN.batch_size, check=positive, help="images per step (the paper's 64)")
    lr: float = option(_TRAIN.lr, check=positive, help="AdamW learning rate (the paper's 1e-5)")
    weight_decay: float = option(_TRAIN.weight_decay, check=non_negative, aliases=("--wd",), help="AdamW weight decay (the paper's 0)")
    warmup_epochs: float = option(_TRAIN.warmup_epochs, check=non_negative, help="linear warm-up before the cosine decay, in epochs")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", choices=("auto", "fp32", "bf16", "fp16"), cli=False,
        help="training autocast (auto: the run's --precision)")
    grad_checkpointing: bool = option(_TRAIN.grad_checkpointing,
                                      help="recompute trunk activations in backward (less memory, slower)")
    eval_every: int = option(_TRAIN.eval_every, check=positive, help="validate every N epochs (with a validation split)")
    compile: bool = option(_TRAIN.compile,
                           help="torch.compile the classifier for training (worth it on CUDA after a one-off compile "
                                "of about a minute; needs a C++ compiler on CPU); results equal within float rounding")
    resume: bool = option(False, help="continue from train_state.pt in the output directory (bit-identical)")
    # Zero-shot-anchored training (project issue 11); the defaults are the paper's plain fine-tuning.
    head: Literal["train", "frozen"] = option(
        "train", choices=("train", "frozen"),
        help="train: the text-initialized head trains with the adapters (the paper); frozen: the head stays the "
             "zero-shot text head and only the adapters train (the frozen/zero-shot-classifier practice of LP-FT, "
             "Kumar et al., ICLR 2022, and FLYP, Goyal et al., CVPR 2023)")
    head_lr_scale: float = option(1.0, check=positive,
                                  help="learning-rate multiplier of the head (its own AdamW param group); "
                                       "1 = one lr for all (the paper)")
    l2sp: float = option(0.0, check=non_negative,
                         help="L2-SP weight a: adds a/2·||θ − θ₀||² over head + adapters toward their "
                              "initialization (Li, Grandvalet & Davoudi, ICML 2018); 0 = off (the paper)")
    def __post_init__(self) -> None:
        if isinstance(self.scales, (int, float)) and not isinstance(self.scales, bool):
            self.scales = (self.scales,)  # one scale given as a number
        if isinstance(self.scales, (list, tuple)) and not self.scales:
            raise ValueError("give at least one adapter scale")
        super().__post_init__()  # type checks; the scales become a tuple of floats
        if self.head == "frozen" and self.head_lr_scale != 1.0:  # it would silently do nothing
            raise ValueError(f"--head frozen trains no head, so --head-lr-scale {self.head_lr_scale:g} (option "
                             "head_lr_scale) has nothing to scale; drop --head-lr-scale or use --head train")
        kind, _, last = self.weight_average.partition(":")
        if kind.strip().lower() == "swa" and float(last) > self.epochs:
            raise ValueError(f"weight_average {self.weight_average} averages more epochs than the {self.epochs} "
                             "trained")
        if self.adapter_kind is not None:  # now, not when the method is built after the run's files are written
            for scale in self.scales:
                make_config(self.adapter_kind, scale=scale, **self.adapter_options())

    def adapter_options(self) -> dict[str, object]:
        """The adapter kind's options held in this config."""
        names = {f.name for f in dataclasses.fields(self)} - {f.name for f in dataclasses.fields(AdapterTuningConfig)}
        return {name: getattr(self, name) for name in sorted(names)}

    def train_config(self, ctx: FitContext) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, precision=self.precision,
                           grad_checkpointing=self.grad_checkpointing, seed=ctx.seed, workers=ctx.workers,
                           eval_every=self.eval_every, l2sp=self.l2sp, compile=self.compile,
                           weight_average=self.weight_average, anchor_logits=self.anchor_logits,
                           anchor_features=self.anchor_features,
                           lr_scales=(("head.", self.head_lr_scale),) if self.head_lr_scale != 1.0 else ())


def tuning_config(adapter_config: type[AdapterConfig], default_scales: Optional[tuple[float, ...]] = None,
                  kind: Optional[str] = None) -> type[AdapterTuningConfig]:
    """AdapterTuningConfig extended with the fields of an adapter kind's config (its `scale` excepted), their
    checks included. `scales` defaults to `default_scales`, else to the kind's own default scale (AdaptFormer's
    0.1, ...). With `kind` (its registered name) the kind's own rules are checked on construction."""
    hints = typing.get_type_hints(adapter_config)  # resolved types: the new class lives in another module
    fields = []
    for f in dataclasses.fields(adapter_config):
        if f.name != "scale":
            fields.append((f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                             metadata=f.metadata)))
        elif not getattr(adapter_config, "scaled", True):  # bitfit, vpt_deep: no branch to scale, s = 1 only
            fields.append(("scales", tuple[float, ...], option((1.0,), check=positive, aliases=("--scale",),
                                                               help="this adapter kind has no branch to scale: 1 only")))
        else:
            scales = default_scales or (float(f.default),)
            base = next(b for b in dataclasses.fields(AdapterTuningConfig) if b.name == "scales")
            fields.append(("scales", tuple[float, ...], dataclasses.field(default=tuple(scales), metadata=base.metadata)))
    name = adapter_config.__name__.replace("Config", "") + "TuningConfig"
    config = dataclasses.make_dataclass(name, fields, bases=(AdapterTuningConfig,))
    config.__module__ = __name__
    config.adapter_kind = kind
    return config


class ChosenScale(TypedDict, total=False):
    """The scale a fit kept (the best on the validation split) and how it did."""
    scale: float
    best_epoch: float
    val_top1: Optional[float]
    selected_on: str


class AdapterTuning(Method):
    """Adapters of kind `adapter_kind` + text-initialized head; only those train."""

    frozen_image_encoder = False
    data_parallel = True  # trains with DistributedDataParallel under torchrun (batch_size split across ranks)
    wise_start_is_zero_shot = True  # zero-initialized adapters and the text head (VPT-deep's prompts are not)
    adapter_kind: ClassVar[str] = "convpass"
    #: default adapter scale(s); None: the kind's own default scale
    default_scales: ClassVar[Optional[tuple[float, ...]]] = (DEFAULT_SCALE,)
    config_class: ClassVar[type[AdapterTuningConfig]] = tuning_config(ConvpassConfig, (DEFAULT_SCALE,), "convpass")
    presets: ClassVar[Mapping[str, Mapping[str, object]]] = {"paper": {}, "demo": DEMO_RECIPE, ROBUST_PRESET: ROBUST_RECIPE}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" not in cls.__dict__:  # the options of the subclass's own adapter kind
            cls.config_class = tuning_config(get_adapter(cls.adapter_kind).config, cls.default_scales,
                                             cls.adapter_kind)
        if "label" not in cls.__dict__:  # the kind's label
            cls.label = get_adapter(cls.adapter_kind).label

    def __init__(self, config: Optional[AdapterTuningConfig] = None, *, of_kind: Optional["AdapterKindMethod"] = None,
                 **options: object) -> None:
        if of_kind is not None:  # `adapter:<kind>`: this kind and its options, convpass's recipe (AdapterKindMethod)
            self.name, self.label, self.adapter_kind = of_kind.name, of_kind.label, of_kind.kind
            self.config_class = of_kind.config_class
        self.config = config = config_from(self.config_class, config, options)
        self.scales = list(config.scales)
        # Validated now (unknown or bad adapter options fail before any training).
        self.adapter_config = make_config(self.adapter_kind, scale=self.scales[0], **config.adapter_options())
        self.classifier: Optional[ImageClassifier] = None
        self.chosen: ChosenScale = {}
        self._endpoints: Optional[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = None

    def adapter_metadata(self, scale: float) -> JSONObject:
        """The adapter kind and its options, as stored in checkpoints (see `load_classifier`)."""
        return {"kind": self.adapter_kind, **dataclasses.replace(self.adapter_config, scale=scale).to_dict()}

    # ----- setup -------------------------------------------------------------------------------
    def build(self, ctx: FitContext, scale: Optional[float] = None,
              head: Optional[torch.nn.Linear] = None) -> ImageClassifier:
        """Inject adapters into the backbone's image encoder and attach the text-initialized head (a copy of
        `head` when given: the scale benchmark builds one 1,000-class head for every adapter kind)."""
        backbone = ctx.backbone
        for param in backbone.model.parameters():
            param.requires_grad_(False)
        head = copy.deepcopy(head) if head is not None else text_head(
            backbone.model, backbone.tokenizer, list(ctx.classnames), list(ctx.templates), ctx.device)
        head.requires_grad_(True)
        # A private copy: the shared backbone stays plain for the frozen-encoder methods and their feature cache.
        visual = copy.deepcopy(backbone.model.visual)
        config = dataclasses.replace(self.adapter_config, scale=self.scales[0] if scale is None else scale)
        _seeded_adapters(visual, self.adapter_kind, ctx.seed, config)
        visual.set_grad_checkpointing(self.config.grad_checkpointing)
        self.classifier = ImageClassifier(visual, head, backbone.logit_scale).to(ctx.device)
        return self.classifier

    def metadata(self, ctx: FitContext, scale: float) -> JSONObject:
        """What a checkpoint of this method must match to be loaded (see clipconv.checkpoint)."""
        return {
            "backbone": ctx.backbone.describe(),
            "adapter": self.adapter_metadata(scale),
            "classes": {"count": len(ctx.classnames), "hash": ctx.class_hash},
            "method": self.name,
            "source": ctx.backbone.source(),
            "class_ids": list(ctx.class_ids),
            # the starting point θ₀ (text head, seeded adapter init), rebuilt by `load_endpoints` for WiSE-FT
            "init": {"seed": ctx.seed, "templates": list(ctx.templates)},
            # how the saved weights were trained beyond the recipe: zero-shot anchors, weight averaging
            "training": self.robustness(),
        }

    def robustness(self) -> JSONObject:
        """The robustness-keeping settings of the training (anchors and weight averaging)."""
        return self.config.robustness()

    # ----- fit ---------------------------------------------------------------------------------
    @staticmethod
    def decoded_splits(ctx: FitContext):
        """(train, val) images decoded once for all epochs, or None for each without `ctx.decoded_cache`.

        Train images are kept at >= the side every random resized crop needs (bit-exact below it); validation
        images after the evaluation transform's deterministic Resize (so validation sees the same pixels), within
        `decoded_resized`'s size budget."""
        if not ctx.decoded_cache:
            return None, None

        folder = None if ctx.decoded_cache is True else ctx.decoded_cache
        train = decoded_images(ctx.data_root, ctx.train, needed_short_side(ctx.backbone.train_transform),
                               cache_dir=folder, workers=ctx.workers)
        val = None
        if ctx.val and not is_distributed():  # (validation is sharded under torchrun)
            val = decoded_resized(ctx.data_root, ctx.val, ctx.backbone.eval_transform,
                                  draft_for(ctx.draft, ctx.backbone.eval_transform, False), folder, ctx.workers)
        ctx.log(f"decoded images: {len(train)} train ({train.nbytes / 2**20:.1f} MB"
                f"{', from the cache' if train.from_disk else ''})"
                + (f", {len(val)} val ({val.nbytes / 2**20:.1f} MB)" if val is not None else ""))
        return train, val

    def fit(self, ctx: FitContext) -> JSONObject:

        cfg = self.config.train_config(ctx)
        classifier = self.classifier or self.build(ctx)
        initial = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
        backbone = ctx.backbone
        batches = math.ceil(len(ctx.train) / cfg.batch_size)

        decoded, decoded_val = self.decoded_splits(ctx)
        train_draft = draft_for(ctx.draft, backbone.train_transform, training=True)
        pin = torch.device(ctx.device).type == "cuda"

        train_item, train_collate = split_transform(backbone.train_transform)  # ToTensor + Normalize per batch

        def make_loader(generator: torch.Generator):  # the global batches; this rank's slices under torchrun
            if decoded is not None:
                dataset = DecodedImageDataset(decoded, ctx.data_root, ctx.train, train_item, "skip")
            else:
                dataset = image_dataset(ctx.data_root, ctx.train, train_item, on_error="skip", draft_size=train_draft)
            return train_loader(dataset, cfg.batch_size, loader_workers(ctx, decoded), generator,
                                what=str(ctx.data_root), pin_memory=pin, collate=train_collate)

        val_draft = draft_for(ctx.draft, backbone.eval_transform, training=False)
        # one process: the validation images are decoded and transformed once and kept for every epoch's pick
        val_batches = None if is_distributed() or not ctx.val else ImageBatches(
            ctx.data_root, ctx.val, backbone.eval_transform, ctx.eval_batch_size, loader_workers(ctx, decoded_val),
            draft_size=val_draft, decoded=decoded_val)

        def validate() -> float:
            if val_batches is not None:
                logits, labels = logits_of_batches(classifier, val_batches, ctx.device)
            else:
                logits, labels = collect_logits(classifier, ctx.data_root, ctx.val, backbone.eval_transform,
                                                ctx.device, ctx.eval_batch_size, ctx.workers, desc="val",
                                                decoded=decoded_val, draft_size=val_draft)
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
            frozen_head = self.config.head == "frozen"
            classifier.head.requires_grad_(not frozen_head)  # a frozen head gets no gradient and no optimizer slot
            try:
                if self.config.anchored:  # the original encoder is frozen and untouched: the zero-shot model
                    task = AnchoredClassifierTask(classifier, make_loader, batches, backbone.model.visual,
                                                  cfg.anchor_logits, cfg.anchor_features, cfg.l2sp,
                                                  validate if ctx.val else None, torch.device(ctx.device))
                    trainer = Trainer(task, cfg, ctx.device, run_dir, ctx.log)
                else:
                    trainer = Trainer.classifier(classifier, make_loader, batches, cfg, ctx.device, run_dir,
                                                 validate=validate if ctx.val else None, log=ctx.log)
                trainer.resume_if_saved(self.config.resume or ctx.resume)
                trainer.fit()
                picked = trainer.restore_best()
            finally:
                classifier.head.requires_grad_(True)  # saved with the adapters, so checkpoints stay loadable
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
        self._endpoints = (initial, best_tensors)  # θ₀ (text head, zero adapters) and θ₁, for clipconv.wise
        self.chosen = {"scale": best["scale"], "best_epoch": best["record"]["best_epoch"],
                       "val_top1": best["record"]["val_top1"],
                       "selected_on": "validation split from train" if ctx.val else "last epoch (no validation split)",
                       "weight_average": self.config.weight_average}
        if ctx.output_dir is not None:
            save_trainable(classifier, Path(ctx.output_dir) / "adapter.safetensors", self.metadata(ctx, best["scale"]))
        return {"chosen": self.chosen, "runs": runs}

    # ----- weight-space interpolation (clipconv.wise) ---------------------------------------------
    def interpolation_endpoints(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(θ₀, θ₁) over head + adapters: θ₀ = text head and zero-initialized adapters (zero-shot CLIP),
        θ₁ = the trained (chosen) weights. The chosen scale s stays; at θ₀ the branch is zero whatever s.
        For `vpt_deep` (not identity at init) θ₀ is VPT at initialization, not zero-shot CLIP; for `bitfit`
        θ₀ holds the original biases (zero-shot CLIP)."""
        if self._endpoints is None:
            raise RuntimeError(f"fit '{self.name}' before interpolating")
        return self._endpoints

    @torch.no_grad()
    def load_interpolated(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.classifier.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)
        self.classifier.eval()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("call fit() (or build()) before logits()")
        self.classifier.eval()
        return self.classifier(images)

    def trainable_count(self, spec: ParamSpec) -> int:
        """The adapters this method injects into `spec.model`'s image encoder (built on a meta copy) + the
        text-initialized head C·(embed_dim + 1) unless the head is frozen."""
        visual = meta_copy(spec.model.visual)
        for param in visual.parameters():
            param.requires_grad_(False)
        adapters = count_elements(add_adapters(visual, self.adapter_kind, self.adapter_config).parameters())
        head = 0 if self.config.head == "frozen" else spec.classes * (spec.embed_dim + 1)
        return adapters + head

    def check_backbone(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        """The adapters must fit the image encoder (its grid, attention modules, patch size): injected into a
        meta-device copy, so nothing is computed."""
        visual = meta_copy(backbone.model.visual)
        try:
            add_adapters(visual, self.adapter_kind, self.adapter_config)
        except ValueError as err:
            raise ValueError(f"method '{self.name}': {err}") from None

    def summary(self) -> JSONObject:
        return {"adapter": self.adapter_metadata(self.chosen.get("scale", self.scales[0])),
                "train": self.config.to_dict(), **self.chosen}


def load_classifier(path: Union[str, Path], backbone: Backbone) -> tuple[ImageClassifier, JSONObject]:
    """Rebuild a trained classifier from an adapter checkpoint on top of a (matching) backbone.

    The adapter configuration and class count come from the checkpoint's metadata; the backbone must be
    the one it was trained on (same weights hash and QuickGELU flag), else CheckpointMismatchError.
    """

    meta = read_metadata(path)
    if meta.get("backbone") != backbone.describe():
        raise CheckpointMismatchError(
            f"checkpoint '{path}' was trained on backbone {meta.get('backbone')}, not on {backbone.describe()}; "
            f"pass the same --model/--pretrained (it was made with {meta.get('source')})"
        )
    options = dict(meta["adapter"])
    kind = options.pop("kind")
    get_adapter(kind)  # an unknown kind fails with the list of known ones
    for param in backbone.model.parameters():
        param.requires_grad_(False)
    visual = copy.deepcopy(backbone.model.visual)
    add_adapters(visual, kind, **options)
    count = int(meta["classes"]["count"])
    head = torch.nn.Linear(int(backbone.model.visual.output_dim), count).to(backbone.device)
    classifier = ImageClassifier(visual, head, backbone.logit_scale).to(backbone.device)
    load_trainable(classifier, path, expected={"backbone": backbone.describe(), "adapter": meta["adapter"]})
    classifier.eval()
    return classifier, meta


def loader_workers(ctx: FitContext, decoded: object) -> int:
    """Data-loading worker processes for images already decoded in memory: none on a CPU device (its cores run
    torch's intra-op threads; worker processes would compete with them for the same cores, and each epoch's
    loader forks new ones), else `ctx.workers`. Results do not depend on it (augmentation is seeded per item)."""
    return 0 if decoded is not None and torch.device(ctx.device).type == "cpu" else ctx.workers


def _seeded_adapters(visual: torch.nn.Module, kind: str, seed: int, config: Optional[AdapterConfig] = None,
                     **options: object) -> None:
    """Inject `kind` adapters initialized from `seed` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_adapters(visual, kind, config, **options)


def load_endpoints(path: Union[str, Path], backbone: Backbone, classnames: list[str]
                   ) -> tuple[ImageClassifier, dict[str, torch.Tensor], dict[str, torch.Tensor], JSONObject]:
    """(classifier at θ₁, θ₀, θ₁, metadata) of an adapter checkpoint, for WiSE-FT (clipconv.wise).

    θ₁ is the checkpoint; θ₀ is rebuilt as training started: the text head of `classnames` with the recorded
    templates and the adapters initialized from the recorded seed (the run directory keeps θ₀ implicitly).
    Raises ValueError when the checkpoint has no such record or θ₀ does not match its tensors.
    """
    classifier, meta = load_classifier(path, backbone)
    init = meta.get("init")
    if not isinstance(init, dict) or "seed" not in init or not init.get("templates"):
        raise ValueError(f"checkpoint '{path}' does not record its starting point (seed, templates): it was written "
                         "before weight-space interpolation was supported; train it again to use --wise")
    if len(classnames) != classifier.head.out_features:
        raise ValueError(f"checkpoint '{path}' has {classifier.head.out_features} classes, not {len(classnames)}")
    options = dict(meta["adapter"])
    kind = options.pop("kind")
    visual = copy.deepcopy(backbone.model.visual)
    _seeded_adapters(visual, kind, int(init["seed"]), **options)
    head = text_head(backbone.model, backbone.tokenizer, list(classnames), list(init["templates"]), backbone.device)
    start = ImageClassifier(visual, head, backbone.logit_scale).to(backbone.device)
    names = [n for n, p in classifier.named_parameters() if p.requires_grad]
    initial = dict(start.named_parameters())
    missing = [n for n in names if n not in initial or initial[n].shape != dict(classifier.named_parameters())[n].shape]
    if missing:
        raise ValueError(f"checkpoint '{path}': the rebuilt starting point lacks or reshapes {missing[:3]}")
    theta0 = {n: initial[n].detach().clone() for n in names}
    theta1 = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
    return classifier, theta0, theta1, meta


@register_method("convpass")
class ConvpassTuning(AdapterTuning):
    """Convpass parallel to attention and MLP (the paper's main model, Convpass_CLIP)."""

    adapter_kind = "convpass"
    presets = {"paper": {}, "demo": {"dim": 32, **DEMO_RECIPE, "scales": (1.0,)}, ROBUST_PRESET: ROBUST_RECIPE}
    default = True
    table2_order = 7
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 74.23, "imagenet_v2": 66.61, "imagenet_sketch": 49.10, "imagenet_a": 49.27,
                 "imagenet_r": 78.17}


@register_method("convpass_attn")
class ConvpassAttnTuning(AdapterTuning):
    """Convpass beside attention only (Table 5 ablation)."""

    adapter_kind = "convpass_attn"


@register_method("convpass_share")
class ConvpassShareTuning(AdapterTuning):
    """Convpass with shared 1×1 projections and depthwise 3×3 (§3.3); use dim=32."""

    adapter_kind = "convpass_share"


# ----- the PETL zoo: one method per adapter kind, default scale = the kind's own ------------------------
@register_method("adaptformer")
class AdaptFormerTuning(AdapterTuning):
    """AdaptFormer (Chen et al., NeurIPS 2022): bottleneck 64 beside the MLP, s = 0.1; convpass's training."""

    adapter_kind = "adaptformer"
    default_scales = None


@register_method("adapter")
class BottleneckAdapterTuning(AdapterTuning):
    """Sequential bottleneck Adapter (Pfeiffer placement after the MLP, h = 8; `--variant houlsby` adds
    one after attention); convpass's training."""

    adapter_kind = "adapter"
    default_scales = None


@register_method("lora")
class LoRATuning(AdapterTuning):
    """LoRA on the image encoder's attention (PEFT defaults: q, v, r = 8, alpha 8) + the text-initialized
    head; convpass's training."""

    adapter_kind = "lora"
    default_scales = None


@register_method("bitfit")
class BitFitTuning(AdapterTuning):
    """BitFit: the image encoder's biases + the text-initialized head train; convpass's training."""

    adapter_kind = "bitfit"
    default_scales = None


@register_method("vpt_deep")
class VPTDeepTuning(AdapterTuning):
    """VPT-deep: prompt tokens at every layer of the image encoder + the text-initialized head; convpass's
    training."""

    adapter_kind = "vpt_deep"
    default_scales = None
    wise_start_is_zero_shot = False  # θ(0) is VPT at initialization


#: `adapter:<kind>` names every registered adapter kind as a method with convpass's training recipe
ADAPTER_METHOD_PREFIX = "adapter:"


def adapter_method_name(kind: str) -> str:
    return ADAPTER_METHOD_PREFIX + kind


@dataclass(frozen=True)
class AdapterKindMethod:
    """The method `adapter:<kind>`: `AdapterTuning` of adapter kind `kind` (an instance attribute, no class per
    kind), resolved by the method registry for every registered kind. Read like a method class: the class
    attributes of the kind's own method when it has one (`adapter:convpass` trains like `convpass`, with the
    same options and defaults), else AdapterTuning's with the kind's options and its own default scale; but its
    own name, its label ("LoRA (adapter:lora)"), no default-Table-2 row, no published numbers, not the default."""

    kind: str
    config_class: type[AdapterTuningConfig] = dataclasses.field(init=False, compare=False, repr=False)
    #: what the named method declares for its own row only
    table2_order: ClassVar[Optional[int]] = None
    published: ClassVar[Mapping[str, float]] = {}
    default: ClassVar[bool] = False

    def __post_init__(self) -> None:
        config_class = self.base.config_class if self.base is not AdapterTuning else \
            tuning_config(get_adapter(self.kind).config, kind=self.kind)
        object.__setattr__(self, "config_class", config_class)

    @property
    def base(self) -> type[AdapterTuning]:
        """The kind's own method class (registered under the kind's name), else AdapterTuning."""
        own = METHODS.get(self.kind)
        if isinstance(own, type) and issubclass(own, AdapterTuning) and own.adapter_kind == self.kind:
            return own
        return AdapterTuning

    @property
    def name(self) -> str:
        return adapter_method_name(self.kind)

    @property
    def adapter_kind(self) -> str:
        return self.kind

    @property
    def label(self) -> str:
        return f"{get_adapter(self.kind).label} ({self.name})"

    def __call__(self, config: Optional[AdapterTuningConfig] = None, **options: object) -> AdapterTuning:
        return self.base(config, of_kind=self, **options)

    def __getattr__(self, attribute: str) -> Any:  # the base method class's attributes, whatever their types
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.base, attribute)


METHODS.resolver(ADAPTER_METHOD_PREFIX, AdapterKindMethod, lambda: list(ADAPTERS))
