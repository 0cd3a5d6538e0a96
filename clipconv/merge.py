"""Merge for free inference: fold adapters that are linear in existing weights into those weights.

LoRA adds s·(alpha/r)·B·A to a projection weight, DoRA rescales W + s·ΔW row by row, and BitFit trains the
biases in place, so all leave a plain open_clip model with the same outputs and no adapter code at inference
(for CLIP-LoRA: both encoders). Kinds that add a computation of their own — Convpass (a 3×3 conv over the patch
grid between nonlinearities), AdaptFormer and the bottleneck Adapter (ReLU/GELU bottlenecks), VPT (extra
tokens) — cannot be merged and are refused before anything changes.

A wrapper or record can be merged when it has `fold_()` (clipconv/adapters: `LoRALinear`, `LoRAAttention`,
`BitFitBiases`); a kind says so when it registers (`register_adapter(..., mergeable=True)`, listed by
`clipconv.adapters.mergeable_kinds()`).

A merged file (scripts/export_merged.py) records the open_clip model it belongs to (`model_metadata`: the model
name, its config as JSON with the QuickGELU setting, the preprocessing), so `load_merged_model` rebuilds it with
plain open_clip and loads the weights strictly — also for a model given as a config JSON (the mini CLIP, a
user's config), which `open_clip.create_model(<name>)` alone does not know in a new process; `load_merged_head`
reads the classification head written beside it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipconv.adapters import AdapterRecord, adapted_modules, mergeable_kinds, unwrap_all
from clipconv.backbone import Backbone
from clipconv.runtime.outputs import atomic_path

__all__ = ["mergeable", "merge_adapters", "merged_state_dict", "save_merged", "model_metadata", "load_merged_model",
           "load_merged_head"]

PathLike = Union[str, Path]


def _present(module: nn.Module) -> list[nn.Module]:
    return [*adapted_modules(module), *(m for m in module.modules() if isinstance(m, AdapterRecord))]


def mergeable(module: nn.Module) -> tuple[bool, list[str]]:
    """(whether every adapter inside `module` can be folded, the kinds that cannot)."""
    blocked = sorted({item.kind or type(item).__name__ for item in _present(module) if not hasattr(item, "fold_")})
    return not blocked, blocked


def merge_adapters(module: nn.Module) -> list[str]:
    """Fold every adapter inside `module` (an encoder, a CLIP model, a classifier) into the weights it changes
    and remove it, in place; return the kinds merged. ValueError, with nothing changed, when `module` has no
    adapters or holds a kind that is not linear in existing weights."""
    present = _present(module)
    if not present:
        raise ValueError(f"{type(module).__name__} has no adapters to merge")
    ok, blocked = mergeable(module)
    if not ok:
        raise ValueError(f"adapter kind(s) {blocked} cannot be merged into the backbone weights (they add their own "
                         f"computation); only {mergeable_kinds()} fold into a plain open_clip model")
    kinds = sorted({item.kind for item in present})
    with torch.no_grad():
        for wrapper in adapted_modules(module):
            wrapper.fold_()
        unwrap_all(module)
        for record in [m for m in module.modules() if isinstance(m, AdapterRecord)]:
            record.fold_()
    return kinds


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `module` with its adapters folded in (a plain open_clip state dict when `module` is an
    open_clip model or encoder); `module` itself is left as it is."""
    merged = copy.deepcopy(module)
    merge_adapters(merged)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in merged.state_dict().items()}


def save_merged(state: Mapping[str, torch.Tensor], path: Union[str, Path],
                metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a state dict as safetensors, atomically; refuses an existing file (never overwrites)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"'{path}' already exists; merged weights are never overwritten — choose another path")
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path


def model_metadata(backbone: Backbone) -> dict[str, str]:
    """What a merged file records to be rebuilt without the config file or clipconv's loader: "model" (the open_clip
    name), "model_config" (its config as JSON, QuickGELU as the backbone ran it) and "preprocess_cfg" (JSON)."""
    config = copy.deepcopy(open_clip.get_model_config(backbone.model_name))
    if config is None:
        raise ValueError(f"open_clip has no config for model '{backbone.model_name}'")
    if backbone.quick_gelu:
        config["quick_gelu"] = True
    return {"model": backbone.model_name, "model_config": json.dumps(config, sort_keys=True),
            "preprocess_cfg": json.dumps(open_clip.get_model_preprocess_cfg(backbone.model), sort_keys=True)}


def _metadata(path: PathLike) -> dict[str, str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"'{path}' does not exist; give a file written by scripts/export_merged.py")
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _registered_name(name: str, config: dict) -> str:
    """An open_clip model name whose config is `config`: `name` when open_clip knows it with that config (or not at
    all: then it is registered under it), else a name derived from the config's hash."""
    known = open_clip.get_model_config(name)
    if known == config:
        return name
    if known is not None:
        name = f"{name}-merged-{hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]}"
    with tempfile.TemporaryDirectory(prefix="clipconv-merged-config-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        open_clip.add_model_config(path)  # read now; open_clip skips the vanished file on later scans
    return name


def load_merged_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The plain open_clip CLIP model of a merged file (scripts/export_merged.py): built from the config the file
    records (a model given as a config JSON included) and loaded strictly; in eval mode. Its tokenizer:
    `open_clip.get_tokenizer(...)` of the same name; its preprocessing: `open_clip.get_model_preprocess_cfg(model)`."""
    meta = _metadata(path)
    if "model_config" not in meta or "model" not in meta:
        raise ValueError(f"'{path}' records no model config (written by an older export_merged.py?); build the model "
                         "with open_clip.create_model and load the file with strict=True")
    name = _registered_name(meta["model"], json.loads(meta["model_config"]))
    preprocess = json.loads(meta["preprocess_cfg"]) if "preprocess_cfg" in meta else None
    model = open_clip.create_model(name, pretrained=None, force_preprocess_cfg=preprocess)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()


def load_merged_head(path: PathLike) -> tuple[nn.Linear, float, list[str]]:
    """(head, logit_scale, class ids) of a merged head file (`<output>.head.safetensors`): logits =
    logit_scale · head(normalize(model.encode_image(x)))."""
    meta = _metadata(path)
    tensors = load_file(str(path))
    weight, bias = tensors["head.weight"], tensors["head.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias}, strict=True)
    return head.eval(), float(meta["logit_scale"]), list(json.loads(meta.get("class_ids", "[]")))
