"""Shared fixtures: a tiny open_clip config (4×4 patch grid) and a backbone built from it.

The suite runs torch on one thread, and so do the command-line subprocesses it starts (they inherit
OMP_NUM_THREADS): on a busy 2-core machine more threads only contend (one test once stalled for minutes)."""
from __future__ import annotations

import json
import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported here and in every subprocess
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download: fail at once instead of retrying

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_config(directory: Path, name: str = "tiny-clip", **overrides) -> Path:
    """Write an open_clip model-config JSON for a tiny CLIP and return its path."""
    cfg = json.loads(json.dumps(TINY_CONFIG))
    for key, value in overrides.items():
        cfg[key].update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("configs"))


@pytest.fixture()
def tiny_backbone(tiny_config):
    from clipconv.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone(str(tiny_config), pretrained=None, device="cpu")
