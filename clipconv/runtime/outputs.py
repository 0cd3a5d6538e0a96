"""Files a run writes: atomic (clipconv.runtime.io), and under torchrun written by rank 0 alone.

Other ranks get a private scratch path from `atomic_path` (deleted afterwards) and their `write_*` calls
change nothing, so every rank can run the same code.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Union

from clipconv.runtime import io
from clipconv.runtime.ranks import is_main

__all__ = ["atomic_path", "write_text", "write_json", "save_torch", "remove_stale_temps"]


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """`io.atomic_path` on rank 0 (and in one process); a scratch path that is thrown away on other ranks."""
    if is_main():
        with io.atomic_path(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="clipconv-rank-") as scratch:
        yield Path(scratch) / Path(path).name


def write_text(path: Union[str, Path], text: str) -> Path:
    return io.write_text(path, text) if is_main() else Path(path)


def write_json(path: Union[str, Path], data: object) -> Path:
    return io.write_json(path, data) if is_main() else Path(path)


def save_torch(path: Union[str, Path], obj: object) -> Path:
    return io.save_torch(path, obj) if is_main() else Path(path)


def remove_stale_temps(path: Union[str, Path]) -> list[Path]:
    """`io.remove_stale_temps` on rank 0 (which tidies up for every rank)."""
    return io.remove_stale_temps(path) if is_main() else []
