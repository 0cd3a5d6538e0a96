"""clipconv's cache folder and its entries: `$CLIPCONV_CACHE` (else `~/.cache/clipconv`), checksummed
safetensors entries written atomically (the feature cache, the decoded-image cache)."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import safetensors.torch
import torch

from clipconv.runtime.io import OutputWriteError
from clipconv.runtime.outputs import atomic_path

__all__ = ["cache_root", "cache_dir_problem", "tensor_checksum", "transform_id", "write_cache_entry"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def cache_root() -> Path:
    """`$CLIPCONV_CACHE`, else `~/.cache/clipconv`."""
    base = os.environ.get("CLIPCONV_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "clipconv"


def cache_dir_problem(folder: Union[str, Path]) -> Optional[str]:
    """Why `folder` cannot hold the cache (it, or a parent, is a file; it cannot be created or written), or None.

    Writability is tested by creating (and removing) a temporary file, which also works for root, whom
    permission bits do not stop.
    """
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return f"'{candidate}' is a file, not a folder"
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return f"cannot write in '{folder}' ({err.strerror or err})"
    return None


def tensor_checksum(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors[name]` for `names` (hashed in place)."""
    digest = hashlib.sha256()
    for name in names:
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode("utf-8"))
        if tensor.numel():
            digest.update(memoryview((tensor.to(torch.uint8) if tensor.dtype == torch.bool
                                      else tensor.view(torch.uint8)).numpy()))
    return digest.hexdigest()


def write_cache_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    """Write a cache entry (safetensors, atomically); a failed write is one warning naming `what`: a cache is
    an optimization, the caller still has its tensors."""
    try:
        with atomic_path(path) as tmp:
            try:
                safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
            except Exception as err:  # safetensors reports I/O errors as SafetensorError
                if isinstance(err, OSError):
                    raise
                raise OSError(f"{type(err).__name__}: {err}") from err
    except OutputWriteError as err:
        warnings.warn(f"{what} not saved: {err}", stacklevel=3)


def transform_id(transform: Callable) -> str:
    """A stable text id of a transform: its repr with process-specific memory addresses removed."""
    return _ADDRESS.sub("", repr(transform))
