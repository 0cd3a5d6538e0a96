"""Decoded K-shot training images kept in memory (and on disk), so 50 epochs decode each JPEG once.

`decoded_images(root, samples, short_side)` decodes every sample once (in `workers` processes) into
uint8 RGB arrays. An image whose shorter side exceeds `short_side` is decoded at a reduced DCT scale
(`load_rgb`'s draft) and resized (bicubic, antialiased) to exactly `short_side`; smaller images are kept
bit-exact. Use `short_side = needed_short_side(train_transform)` (915 for RandomResizedCrop(224,
scale=(0.08, 1))): every crop the transform can draw then still holds >= its output size in source
pixels, so the crops' statistics are those of the full image; for ImageNet-sized images (shorter side
< 915) nothing is resized and the batches equal those of the JPEG path exactly. Validation images are
cached after the evaluation transform's own Resize (`prepare=`), which the transform then skips, so
validation scores are exactly those of the files. `decoded_resized` does that for validation and evaluation
sets within a size budget (`RESIZED_BUDGET`, the decoded bytes after the Resize): a set estimated or found to
need more (an ImageNet-sized one) keeps streaming from its files.

On disk, an entry `$CLIPCONV_CACHE/decoded/<40 hex>.safetensors` is keyed like the feature cache: the
data root, a SHA-256 over the ordered (path, label, file size, mtime) list, `short_side`; it stores the
SHA-256 of its tensors, is written atomically (clipconv.runtime.io) by a background thread while training
starts (a reader of the same entry in the process waits for it), and an entry that is unreadable or whose
bytes do not match is reported with a warning and decoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import Dataset
from torchvision import transforms as T

from clipconv.data.draft import leading_resize
from clipconv.data.folder import BadImage, Sample
from clipconv.data.images import ImageDecodeError, load_rgb
from clipconv.data.wds import as_files, is_shard_sample
from clipconv.runtime.cache import cache_dir_problem, cache_root, tensor_checksum, transform_id, write_cache_entry
from clipconv.runtime.ranks import is_main

__all__ = ["DecodedImages", "DecodedImageDataset", "decoded_images", "decoded_resized", "RESIZED_BUDGET",
           "decoded_cache_dir", "decode_key", "ENTRY_SUFFIX", "wait_for_writes"]

FORMAT = 1
ENTRY_SUFFIX = ".safetensors"
_TENSORS = ("pixels", "offsets", "shapes", "ok")
_pending: dict[str, threading.Thread] = {}  # entries being written in the background, by path
_pending_lock = threading.Lock()
#: the largest set `decoded_resized` keeps decoded: its bytes after the evaluation transform's Resize
RESIZED_BUDGET = 512 * 2**20


def decoded_cache_dir() -> Path:
    """`$CLIPCONV_CACHE/decoded`, else `~/.cache/clipconv/decoded`."""

    return cache_root() / "decoded"


@dataclass
class DecodedImages:
    """uint8 RGB images of a sample list, flat in one tensor; `ok[i]` False (with `errors[i]`) for an
    undecodable file."""

    pixels: torch.Tensor  # (sum of h*w*3,) uint8
    offsets: torch.Tensor  # (N + 1,) int64
    shapes: torch.Tensor  # (N, 2) int64: height, width
    ok: torch.Tensor  # (N,) bool
    errors: dict[int, str]
    from_disk: bool = False

    def __len__(self) -> int:
        return len(self.ok)

    def array(self, index: int) -> np.ndarray:
        height, width = (int(v) for v in self.shapes[index])
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.pixels[start:end].numpy().reshape(height, width, 3)

    def image(self, index: int) -> Image.Image:
        """The decoded image (an error naming the file when it was undecodable)."""
        if not bool(self.ok[index]):
            raise ImageDecodeError(self.errors.get(index, "undecodable image"))
        return Image.fromarray(self.array(index))  # (h, w, 3) uint8: RGB

    @property
    def nbytes(self) -> int:
        return int(self.pixels.numel())


class DecodedImageDataset(Dataset):
    """`ImageListDataset` over decoded images: (transform(image), label), or a `BadImage` marker
    (on_error="skip") / `ImageDecodeError` (on_error="raise") for an undecodable file."""

    def __init__(self, decoded: DecodedImages, root: Union[str, Path], samples: Sequence[Sample],
                 transform: Optional[Callable] = None, on_error: str = "skip") -> None:
        if len(decoded) != len(samples):
            raise ValueError(f"{len(decoded)} decoded images for {len(samples)} samples")
        self.decoded, self.root, self.samples = decoded, Path(root), list(samples)
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            image = self.decoded.image(index)
        except ImageDecodeError as err:
            if self.on_error == "raise":
                raise
            return BadImage(str(self.root / self.samples[index][0]), str(err))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]


def _decode_one(path: Path, short_side: Optional[int], prepare: Optional[Callable] = None) -> np.ndarray:
    image = load_rgb(path, draft_size=short_side)
    if prepare is not None:
        image = prepare(image)
    elif short_side is not None and min(image.size) > short_side:
        width, height = image.size
        scale = short_side / min(width, height)
        size = (short_side, max(short_side, round(height * scale))) if width <= height else \
            (max(short_side, round(width * scale)), short_side)
        image = image.resize(size, Image.BICUBIC)  # PIL's resize antialiases when shrinking
    return np.array(image, dtype=np.uint8)  # a writable, contiguous copy


class _Decode(Dataset):
    def __init__(self, root: Path, samples: Sequence[Sample], short_side: Optional[int],
                 prepare: Optional[Callable]) -> None:
        self.root, self.samples, self.short_side, self.prepare = root, samples, short_side, prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            return index, _decode_one(self.root / self.samples[index][0], self.short_side, self.prepare)
        except ImageDecodeError as err:
            return index, str(err)


def _identity(item):
    return item


def decode_key(root: Union[str, Path], samples: Sequence[Sample], short_side: Optional[int],
               prepare: Optional[Callable] = None) -> dict:
    """What identifies a decoded set: root, the ordered samples with their file sizes and mtimes, the size."""
    root = Path(root)
    digest = hashlib.sha256()
    for path, label in samples:
        try:
            stat = os.stat(root / path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\t{int(label)}\t{stamp}\n".encode("utf-8"))
    return {"format": FORMAT, "root": str(root.resolve()), "files": digest.hexdigest(), "n": len(samples),
            "short_side": short_side, "resize": "draft+bicubic" if prepare is None else transform_id(prepare)}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, _TENSORS)


def _entry_path(cache_dir: Path, key: dict) -> Path:
    return cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:40] + ENTRY_SUFFIX)


def _read(path: Path, key: dict) -> Optional[DecodedImages]:
    wait_for_writes(path)
    if not path.is_file():
        return None

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if json.loads(metadata.get("key", "null")) != json.loads(json.dumps(key)):
                return None
            tensors = {name: handle.get_tensor(name) for name in _TENSORS}
        errors = {int(k): v for k, v in json.loads(metadata.get("errors", "{}")).items()}
    except Exception as err:  # a damaged entry is decoded again, never trusted
        warnings.warn(f"decoded-image cache entry '{path}' is unreadable ({err}); decoding the images again",
                      stacklevel=3)
        return None
    if metadata.get("sha256") != _checksum(tensors):
        warnings.warn(f"decoded-image cache entry '{path}' is damaged (its bytes do not match the stored SHA-256); "
                      "decoding the images again", stacklevel=3)
        return None
    return DecodedImages(tensors["pixels"], tensors["offsets"], tensors["shapes"], tensors["ok"], errors, True)


def _write(path: Path, key: dict, decoded: DecodedImages) -> None:
    tensors = {name: getattr(decoded, name).contiguous() for name in _TENSORS}
    metadata = {"key": json.dumps(key), "sha256": _checksum(tensors), "errors": json.dumps(decoded.errors)}
    write_cache_entry(path, tensors, metadata, "decoded-image cache entry")


def _write_in_background(path: Path, key: dict, decoded: DecodedImages) -> None:
    """Hash and write the entry in a thread while training starts (hashing and file writes release the GIL).
    The thread is not a daemon, so the interpreter finishes the write before it exits."""
    thread = threading.Thread(target=_write, args=(path, key, decoded), name=f"clipconv-decoded-cache {path.name}")
    with _pending_lock:
        _pending[str(path)] = thread
    thread.start()


def wait_for_writes(path: Union[str, Path, None] = None) -> None:
    """Wait until the background write of the entry `path` (of every entry when None) has finished."""
    with _pending_lock:
        threads = [t for p, t in _pending.items() if path is None or p == str(path)]
    for thread in threads:
        thread.join()
    with _pending_lock:
        for p in [p for p, t in _pending.items() if not t.is_alive()]:
            del _pending[p]


def _decode_all(root: Path, samples: Sequence[Sample], short_side: Optional[int], workers: int,
                prepare: Optional[Callable], limit: Optional[int] = None) -> Optional[DecodedImages]:
    """Every sample decoded, or None as soon as their pixels exceed `limit` bytes."""
    arrays: list[Optional[np.ndarray]] = [None] * len(samples)
    errors: dict[int, str] = {}
    loader = torch.utils.data.DataLoader(_Decode(root, samples, short_side, prepare), batch_size=None, num_workers=workers,
                                         collate_fn=_identity)
    total = 0
    for index, result in loader:
        if isinstance(result, str):
            errors[index] = result
        else:
            arrays[index] = result
            total += result.size
            if limit is not None and total > limit:
                return None
    sizes = [a.size if a is not None else 0 for a in arrays]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.as_tensor(sizes, dtype=torch.long), 0)
    pixels = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    shapes = torch.zeros(len(samples), 2, dtype=torch.long)
    for index, array in enumerate(arrays):
        if array is not None:
            pixels[int(offsets[index]):int(offsets[index + 1])] = torch.from_numpy(array.reshape(-1))
            shapes[index] = torch.tensor(array.shape[:2])
            arrays[index] = None  # free as we go
    ok = torch.tensor([i not in errors for i in range(len(samples))], dtype=torch.bool)
    return DecodedImages(pixels, offsets, shapes, ok, errors)


def decoded_images(root: Union[str, Path], samples: Sequence[Sample], short_side: Optional[int],
                   cache_dir: Union[str, Path, None] = None, workers: int = 0,
                   prepare: Optional[Callable] = None, limit: Optional[int] = None) -> Optional[DecodedImages]:
    """The decoded images of `samples` (paths relative to `root`), read from the entry under `cache_dir`
    when one matches and is intact, else decoded (and written there). `cache_dir=None`: memory only.

    JPEGs are drafted to keep both sides >= `short_side` (None: full size). Then `prepare` (a deterministic
    PIL → PIL step, e.g. the evaluation transform's leading Resize, which the transform then skips as a
    no-op) is applied, or else an image whose shorter side exceeds `short_side` is resized to it.
    With `limit`, None (nothing kept or written) once the decoded pixels exceed `limit` bytes."""

    root, samples = as_files(root, samples)  # webdataset shard samples: their extracted files
    path = None
    if cache_dir is not None:

        problem = cache_dir_problem(cache_dir)
        if problem is not None:
            warnings.warn(f"decoded-image cache '{cache_dir}' is not usable: {problem}; keeping the images in "
                          "memory only (point CLIPCONV_CACHE at a writable folder)", stacklevel=2)
        else:
            key = decode_key(root, samples, short_side, prepare)
            path = _entry_path(Path(cache_dir), key)
            found = _read(path, key)
            if found is not None and (limit is None or found.nbytes <= limit):
                return found
    decoded = _decode_all(root, samples, short_side, workers, prepare, limit)
    if decoded is not None and path is not None and is_main():  # under torchrun rank 0 writes the entry; the others only use it
        _write_in_background(path, key, decoded)
    return decoded


def _least_bytes(resize: T.Resize, count: int) -> int:
    """A lower bound of the RGB bytes of `count` images after `resize` (0 when its size does not give one)."""
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    if len(size) == 2:
        return count * int(size[0]) * int(size[1]) * 3
    if len(size) == 1 and getattr(resize, "max_size", None) is None:
        return count * int(size[0]) ** 2 * 3  # the shorter side becomes size[0]
    return 0


def decoded_resized(root: Union[str, Path], samples: Sequence[Sample], transform: Optional[Callable],
                    short_side: Optional[int], cache_dir: Union[str, Path, None] = None, workers: int = 0,
                    budget_bytes: int = RESIZED_BUDGET) -> Optional[DecodedImages]:
    """`samples` decoded once after `transform`'s leading Resize (`decoded_images(prepare=...)`; the transform
    then gives exactly the pixels of the files), or None to stream them from the files: when the transform has
    no leading Resize, the samples are webdataset shard samples (read in a stream), or the set takes more than
    `budget_bytes` (its lower bound from the Resize's size, checked before decoding, or its pixels while
    decoding)."""
    resize = leading_resize(transform)
    samples = list(samples)
    if resize is None or not samples or is_shard_sample(samples[0][0]) or \
            _least_bytes(resize, len(samples)) > budget_bytes:
        return None
    return decoded_images(root, samples, short_side, cache_dir=cache_dir, workers=workers, prepare=resize,
                          limit=budget_bytes)
