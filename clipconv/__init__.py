"""clipconv: few-shot adaptation of CLIP with Convpass adapters, and shifted-ImageNet evaluation.

The library (this package) is what a user imports to adapt and evaluate a CLIP; the application that runs
experiments (sessions, run folders, Table 2, reports, command line) is `clipconv.app`, built on top of it.
Public names are imported on first use (PEP 562) so that `import clipconv` stays cheap."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "clipconv.backbone",
    "load_backbone": "clipconv.backbone",
    "add_adapters": "clipconv.adapters",
    "Convpass": "clipconv.adapters",
    "text_head": "clipconv.head",
    "class_embeddings": "clipconv.head",
    "ImageClassifier": "clipconv.head",
    "trainable_state_dict": "clipconv.checkpoint",
    "save_trainable": "clipconv.checkpoint",
    "load_trainable": "clipconv.checkpoint",
    "open_family": "clipconv.data.family",
    "build_method": "clipconv.methods",
    "interpolate": "clipconv.wise",
    "wise_sweep": "clipconv.wise",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import public names lazily so `import clipconv` stays cheap."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipconv' has no attribute '{name}'")
