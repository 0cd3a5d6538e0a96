"""Image files: which names count as images, listing folders, robust RGB decoding."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "is_image_name",
    "is_hidden",
    "list_images",
    "list_subdirs",
    "load_rgb",
    "is_decodable",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

PathLike = Union[str, Path]


class ImageDecodeError(OSError):
    """An image file that cannot be decoded (truncated, corrupt, empty or not an image)."""


def is_hidden(name: str) -> bool:
    """Dot-files such as `.DS_Store` or macOS `._foo` resource forks."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension is an image type (case-insensitive)."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: PathLike) -> list[str]:
    """Sorted names of the image files directly inside `folder` (symlinks followed)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())


def list_subdirs(folder: PathLike) -> list[str]:
    """Sorted names of the visible sub-folders of `folder` (symlinked folders included)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not is_hidden(e.name) and e.is_dir())


def load_rgb(path: PathLike, draft_size: Optional[int] = None) -> Image.Image:
    """Decode an image as 3-channel RGB (CMYK, greyscale, RGBA, palette, PNG-named-.JPEG all work).

    `draft_size` lets JPEGs decode at a reduced DCT scale whose both sides stay >= `draft_size`
    (use it only when the transform downsizes to at least that size anyway). Any failure raises
    `ImageDecodeError` naming the file.
    """
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "empty file" if _is_empty(path) else f"{type(err).__name__}: {err}"
        raise ImageDecodeError(f"cannot decode image '{path}' ({reason})") from err


def _is_empty(path: PathLike) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def is_decodable(path: PathLike) -> bool:
    """Cheap full check: decode the file (JPEGs at 1/8 scale, which still reads every byte)."""
    try:
        load_rgb(path, draft_size=1)
    except ImageDecodeError:
        return False
    return True
