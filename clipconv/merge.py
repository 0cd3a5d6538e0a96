"""Merge for free inference: fold adapters that are linear in existing weights into those weights.

LoRA adds s·(alpha/r)·B·A to a projection weight, DoRA rescales W + s·ΔW row by row, and BitFit trains the
biases in place, so all leave a plain open_clip model with the same outputs and no adapter code at inference
(for CLIP-LoRA: both encoders). Kinds that add a computation of their own — Convpass (a 3×3 conv over the patch
grid between nonlinearities), AdaptFormer and the bottleneck Adapter (ReLU/GELU bottlenecks), VPT (extra
tokens) — cannot be merged and are refused before anything changes.

A wrapper or record can be merged when it has `fold_()` (clipconv/adapters: `LoRALinear`, `LoRAAttention`,
`BitFitBiases`); a kind says so when it registers (`register_adapter(..., mergeable=True)`, listed by
`clipconv.adapters.mergeable_kinds()`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from clipconv.adapters import AdapterRecord, adapted_modules, mergeable_kinds, unwrap_all
from clipconv.runtime.outputs import atomic_path

__all__ = ["mergeable", "merge_adapters", "merged_state_dict", "save_merged"]


def _present(module: nn.Module) -> list[Any]:
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
