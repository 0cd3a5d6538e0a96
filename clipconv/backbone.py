"""Load an open_clip model with its transforms and tokenizer, from a tag, a local file or nothing."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn
from torchvision import transforms as T

from clipconv.runtime.jsontypes import JSONObject

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Backbone", "WeightsUnavailableError", "load_backbone", "resolve_device", "file_sha256", "model_name_of"]

PRECISIONS = ("fp32", "bf16", "fp16")
RANDOM_INIT_SEED = 0  # `pretrained=None` builds the same random weights every time


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights can be neither found locally nor downloaded."""


@dataclass
class Backbone:
    """An open_clip model together with everything needed to feed and describe it."""

    model: nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_name: str
    pretrained: Optional[str]
    quick_gelu: bool
    weights_id: str
    precision: str = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_source: str = ""

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def describe(self) -> JSONObject:
        """What identifies this backbone in checkpoints and caches (a weights file by its hash, not its path)."""
        return {"model": self.model_name, "weights_id": self.weights_id, "quick_gelu": self.quick_gelu}

    def source(self) -> JSONObject:
        """The arguments that rebuild this backbone with `load_backbone` on this machine."""
        return {"model": self.model_source or self.model_name, "pretrained": self.pretrained or "none",
                "quick_gelu": self.quick_gelu}


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`None`/"auto" → CUDA when present, else CPU; "cpu", "cuda", "cuda:N" and "mps" are checked to exist here.

    Anything else, or a device this machine does not have, raises a ValueError that names the `--device`
    value and what to use instead.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: not a device name; use auto, cpu, cuda, cuda:N (N = GPU index) or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA device is available here (torch.cuda.is_available() is "
                             "False); use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1}); "
                             "use one of those, or --device auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {text}: Apple's MPS backend is not available here "
                         "(torch.backends.mps.is_available() is False); use --device cpu or auto")
    return dev


def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (identifies local weights in metadata and cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_name_of(model: str) -> str:
    """The name `model` (an open_clip model name or a model-config JSON) has as a loaded backbone
    (`Backbone.model_name`, what checkpoints record): the JSON's file stem, else the name itself."""
    path = Path(model)
    return path.stem if path.suffix == ".json" else model


def _register_model_config(model: str) -> str:
    """Accept an open_clip model name or a path to a model-config JSON; return the registered name."""

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config '{model}' does not exist")
        with open(path) as handle:
            cfg = json.load(handle)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"model config '{model}' is missing {missing}; it must be an open_clip model config")
        open_clip.add_model_config(path)
        return model_name_of(model)
    if model not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model.lower().split("-")[0] in m.lower()][:8]
        raise ValueError(
            f"unknown model '{model}': give an open_clip model name (e.g. ViT-B-16; close matches: {close}) "
            "or the path of an open_clip model-config JSON"
        )
    return model


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original .pt files are TorchScript zip archives (with a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _hf_cached_file(pretrained_cfg: dict) -> Optional[str]:
    """The tag's weights file from the Hugging Face cache, or None when not cached."""
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        pass
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return None
    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else [
        "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors",
    ]
    for name in names:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _unavailable(model_name: str, tag: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights '{tag}' for model '{model_name}' are not available ({reason}). "
        f"Without network access, download them elsewhere and pass the file: "
        f"--pretrained /path/to/weights (an open_clip state dict, .safetensors, or OpenAI's original .pt), "
        f"or place them in the Hugging Face cache (HF_HOME). For a run without any downloads use --demo."
    )


def load_backbone(
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    device: Union[str, torch.device, None] = None,
    precision: str = "fp32",
    quick_gelu: Optional[bool] = None,
    image_interpolation: Optional[str] = None,
    train_crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Backbone:
    """Build an open_clip model, its train/eval transforms and its tokenizer.

    `model` is an open_clip model name or the path of an open_clip model-config JSON.
    `pretrained` is an open_clip tag (e.g. "openai"), a local checkpoint file (open_clip state dict,
    safetensors, or OpenAI's TorchScript .pt) or None/"none" for random initialization.
    OpenAI weights get QuickGELU automatically; `quick_gelu` overrides the choice.
    `train_crop_scale` is the area range of the train transform's random resized crop.
    `precision` casts the (frozen) weights: "fp32", "bf16" or "fp16".
    """

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    name = _register_model_config(model)
    dev = resolve_device(device)
    tag = None if pretrained in (None, "", "none", "None") else str(pretrained)

    checkpoint: Optional[str] = None
    torchscript = False
    tag_cfg: dict = {}
    if tag is None:
        weights_id = f"random-init:seed{RANDOM_INIT_SEED}"
    elif Path(tag).exists():
        if not Path(tag).is_file():
            raise ValueError(f"--pretrained '{tag}' is a directory; give the weights file inside it")
        checkpoint = tag
        torchscript = _is_torchscript_archive(Path(tag))
        weights_id = "sha256:" + file_sha256(tag)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, tag) or {}
        if not tag_cfg:
            raise ValueError(
                f"--pretrained '{tag}' is neither an existing file nor an open_clip tag for '{name}' "
                f"(tags: {open_clip.list_pretrained_tags_by_model(name)})"
            )
        weights_id = f"{name}:{tag}"
        cached = _hf_cached_file(tag_cfg)
        if cached is not None:
            checkpoint = cached
        elif _offline():
            raise _unavailable(name, tag, "HF_HUB_OFFLINE is set and the Hugging Face cache has no copy")

    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or tag == "openai" or torchscript
    preprocess: dict[str, object] = {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if key in tag_cfg:
            preprocess[key] = tag_cfg[key]
    if image_interpolation:
        preprocess["interpolation"] = image_interpolation

    create_kwargs = dict(force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess or None)
    try:
        if checkpoint is not None and torchscript:
            clip = open_clip.create_model(name, pretrained=None, **create_kwargs)
            state = torch.jit.load(checkpoint, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                state.pop(key, None)
            clip.load_state_dict(state)
        elif checkpoint is not None:
            clip = open_clip.create_model(name, pretrained=checkpoint, **create_kwargs)
        elif tag is None:
            with torch.random.fork_rng(devices=[]):  # reproducible random init, global RNG untouched
                torch.manual_seed(RANDOM_INIT_SEED)
                clip = open_clip.create_model(name, pretrained=None, **create_kwargs)
        else:
            clip = open_clip.create_model(name, pretrained=tag, **create_kwargs)
    except WeightsUnavailableError:
        raise
    except RuntimeError as err:
        if tag is not None and checkpoint is None and ("download" in str(err).lower() or "connect" in str(err).lower()):
            raise _unavailable(name, tag, str(err).splitlines()[0][:200]) from err
        if checkpoint is not None:
            raise ValueError(f"weights file '{checkpoint}' does not fit model '{name}': {str(err)[:500]}") from err
        raise

    patch_dropout = getattr(clip.visual, "patch_dropout", None)
    if patch_dropout is not None and not isinstance(patch_dropout, nn.Identity):
        raise ValueError(
            f"model '{name}' uses patch dropout, which drops tokens and breaks Convpass' patch grid; "
            "set vision_cfg.patch_dropout to 0"
        )

    clip.eval()
    if precision == "bf16":
        clip.to(dtype=torch.bfloat16)
    elif precision == "fp16":
        clip.to(dtype=torch.float16)
    clip.to(dev)

    pp = open_clip.get_model_preprocess_cfg(clip)

    cfg = PreprocessCfg(**pp)
    train_transform = protocol_train_transform(cfg, scale=tuple(train_crop_scale))
    eval_transform = image_transform_v2(cfg, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    return Backbone(
        model=clip,
        train_transform=train_transform,
        eval_transform=eval_transform,
        tokenizer=tokenizer,
        model_name=name,
        pretrained=tag,
        quick_gelu=bool(quick_gelu),
        weights_id=weights_id,
        precision=precision,
        device=dev,
        model_source=str(Path(model).resolve()) if name != model else model,
    )


def protocol_train_transform(cfg: PreprocessCfg, scale: tuple[float, float] = (0.08, 1.0), flip: bool = True
                             ) -> Callable:
    """The paper's train augmentation: random resized crop + horizontal flip, CLIP normalization.

    open_clip's own train transform crops at scale (0.9, 1) without flip; the protocol (CoOp / Convpass)
    uses RandomResizedCrop(scale=(0.08, 1)) + RandomHorizontalFlip, built here explicitly.
    """

    size = cfg.size if isinstance(cfg.size, int) else cfg.size[0]
    interp = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    steps: list[Callable] = [_to_rgb, T.RandomResizedCrop(size, scale=scale, interpolation=interp)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(steps)


def _to_rgb(image: Union[Image.Image, torch.Tensor]) -> Union[Image.Image, torch.Tensor]:
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
