"""Atomic file writes: a killed run never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

__all__ = ["atomic_path", "write_json", "write_text", "read_json", "save_torch", "load_torch"]


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Union[str, Path], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Union[str, Path], data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Union[str, Path]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_torch(path: Union[str, Path], obj: Any) -> Path:
    """torch.save atomically (for training state: tensors, numbers, strings, RNG states)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers (`weights_only=True`): never runs code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"'{path}' could not be loaded safely (weights_only=True refuses pickled code or objects): {err}"
        ) from err
