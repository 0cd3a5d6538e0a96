"""Image files: which names count as images, listing folders, robust RGB decoding."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Collection, NamedTuple, Optional, Union

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "is_image_name",
    "is_hidden",
    "list_images",
    "BrokenEntry",
    "describe_broken",
    "list_class_folders",
    "ARCHIVE_EXTENSIONS",
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


ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".zip", ".tar.xz")


class BrokenEntry(NamedTuple):
    """An entry of a split folder that should have been a class folder but cannot be used as one."""

    name: str
    reason: str  # "dangling symlink", "symlink loop", "file, not a folder", ...


def _archive_stem(name: str) -> Optional[str]:
    lower = name.lower()
    for extension in ARCHIVE_EXTENSIONS:
        if lower.endswith(extension):
            return name[: len(name) - len(extension)]
    return None


def list_class_folders(
    folder: PathLike, class_ids: Optional[Collection[str]] = None
) -> tuple[list[str], list[BrokenEntry]]:
    """Sorted class sub-folders of a split folder, and the entries that should have been class folders.

    Broken: a dangling symlink, a symlink loop, an unreadable entry, an archive (`n01440764.tar`, an
    un-extracted class) or a plain file named like one of `class_ids`. Other plain files (README.txt,
    loose images) and hidden entries are neither.
    """
    folders: list[str] = []
    broken: list[BrokenEntry] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                mode = os.stat(entry.path).st_mode  # follows symlinks
            except FileNotFoundError:
                broken.append(BrokenEntry(entry.name, "dangling symlink" if entry.is_symlink() else "vanished"))
                continue
            except OSError as err:
                reason = "symlink loop" if err.errno == errno.ELOOP else f"unreadable ({err.strerror})"
                broken.append(BrokenEntry(entry.name, reason))
                continue
            if stat.S_ISDIR(mode):
                folders.append(entry.name)
            elif is_image_name(entry.name):
                continue  # loose images: counted by the callers that care
            elif _archive_stem(entry.name) is not None:
                broken.append(BrokenEntry(entry.name, "archive, not a folder (extract it)"))
            elif class_ids is not None and entry.name in class_ids:
                broken.append(BrokenEntry(entry.name, "file, not a folder"))
    return sorted(folders), sorted(broken)


def describe_broken(folder: PathLike, broken: list[BrokenEntry], limit: int = 10) -> str:
    """One line naming the unusable entries of `folder` (for warnings and check_data)."""
    shown = ", ".join(f"{b.name} ({b.reason})" for b in broken[:limit])
    more = f", ... ({len(broken) - limit} more)" if len(broken) > limit else ""
    return f"{len(broken)} entr{'y' if len(broken) == 1 else 'ies'} of '{folder}' cannot be used as class folders: {shown}{more}"


def load_rgb(path: PathLike, draft_size: Optional[int] = None) -> Image.Image:
    """Decode an image as 3-channel RGB (CMYK, greyscale, RGBA, palette, PNG-named-.JPEG all work).

    `draft_size` lets JPEGs decode at a reduced DCT scale whose both sides stay >= `draft_size`
    (use it only when the transform downsizes to at least that size anyway). Every failure raises
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
