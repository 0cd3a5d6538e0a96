"""Adapter checkpoints: only the trainable tensors, as safetensors, with metadata that must match.

`trainable_state_dict` is the one definition of "the adapter weights" (adapters + head: every parameter
that requires grad; `add_adapters` leaves exactly the adapters trainable in an encoder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import atomic_path

__all__ = [
    "trainable_state_dict",
    "save_trainable",
    "load_trainable",
    "read_metadata",
    "CheckpointMismatchError",
    "DamagedCheckpointError",
    "METADATA_KEY",
    "CHECKED_FIELDS",
]

METADATA_KEY = "clipconv"
# 2: adapters wrap attn/mlp (keys `...attn.adapter.*`); 1 had `...cp_attn.*` keys and option `method`.
FORMAT_VERSION = 2
# Fields whose mismatch makes a checkpoint unusable for a model; compared before loading any tensor.
CHECKED_FIELDS = ("backbone", "adapter", "classes")


class CheckpointMismatchError(ValueError):
    """The checkpoint was made for another backbone, adapter configuration or class list."""


class DamagedCheckpointError(ValueError):
    """The checkpoint holds tensors that cannot be right (NaN or infinite values)."""


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad (adapters + head), detached, contiguous, on CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str, advice: str) -> None:
    """DamagedCheckpointError naming the first tensor with NaN/inf values."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DamagedCheckpointError(f"{where}: tensor '{name}' has {bad} non-finite value(s) (NaN/inf); {advice}")


def save_trainable(module: nn.Module, path: Union[str, Path], metadata: Optional[Mapping[str, JSON]] = None) -> Path:
    """Save the trainable tensors of `module` as safetensors (atomically) with JSON metadata."""

    tensors = trainable_state_dict(module)
    if not tensors:
        raise ValueError("the module has no trainable parameters to save")
    _check_finite(tensors, f"refusing to write '{path}'", "the trained weights diverged; nothing was written")
    meta = {"format_version": FORMAT_VERSION, **dict(metadata or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def read_metadata(path: Union[str, Path]) -> JSONObject:
    """The clipconv metadata stored in an adapter checkpoint."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types for non-safetensors input
        raise ValueError(f"'{path}' is not a safetensors adapter checkpoint: {err}") from err
    if raw is None:
        raise ValueError(f"'{path}' has no clipconv metadata; it was not written by clipconv.save_trainable")
    meta = json.loads(raw)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint '{path}' has format version {version}, this clipconv reads version {FORMAT_VERSION} "
            "(version 1 predates the adapter-wrapper layout); retrain it with this version"
        )
    return meta


def _differences(found: Mapping[str, JSON], expected: Mapping[str, JSON], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key, "<absent>"), expected.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint has {a!r}, this model has {b!r}")
    return diffs


def load_trainable(
    module: nn.Module,
    path: Union[str, Path],
    expected: Optional[Mapping[str, JSON]] = None,
) -> JSONObject:
    """Load adapter + head tensors into `module`; return the checkpoint's metadata.

    When `expected` metadata is given, the fields in CHECKED_FIELDS (backbone incl. weights and QuickGELU,
    adapter method/options, class list hash) must be equal, otherwise nothing is loaded and
    CheckpointMismatchError says what differs. Tensor names and shapes must match the module's
    trainable parameters exactly.
    """

    meta = read_metadata(path)
    if expected is not None:
        diffs = []
        for field in CHECKED_FIELDS:
            if field in expected:
                diffs += _differences(meta.get(field, {}), expected[field], f"{field}.")
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint '{path}' does not match this model:\n  " + "\n  ".join(diffs)
            )
    tensors = load_file(str(path))
    _check_finite(tensors, f"checkpoint '{path}'", "the file is damaged or was saved from a diverged run — "
                                                    "nothing was loaded; retrain or restore the file")
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    shape_errors = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(params[name].shape)}"
        for name in sorted(set(params) & set(tensors))
        if tensors[name].shape != params[name].shape
    ]
    if missing or unexpected or shape_errors:
        raise CheckpointMismatchError(
            f"checkpoint '{path}' does not fit this model's trainable tensors: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, shapes {shape_errors[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.dtype))
    return meta
