"""A torch Dataset over (relative path, label) lists that skips undecodable images instead of crashing.

Skipping works across DataLoader worker processes: a bad file makes `__getitem__` return a
`BadImage` marker, `collate_skip_bad` drops the markers and records their paths on the `Batch`
(which still unpacks as `images, labels`), and `SkipTracker` gathers them in the main process and
emits ONE warning naming every skipped file, with a count, when the loop ends.

Only files that were undecodable from the start are skipped: a listed file that no longer exists (or,
given the time the files were listed, one changed since) raises `ImagesChangedError` instead; a run does
not score a set on fewer images than it holds because its files vanished under it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, default_collate

from clipconv.data.images import ImageDecodeError, load_rgb

__all__ = [
    "Sample",
    "BadImage",
    "Batch",
    "ImageListDataset",
    "collate_skip_bad",
    "SkipTracker",
    "report_skipped",
    "ImagesChangedError",
    "changed_since",
]

Sample = tuple[str, int]  # (path relative to the data root, run-class label)
ON_ERROR = ("skip", "raise")


class BadImage(NamedTuple):
    """Placeholder returned for an undecodable file; dropped by `collate_skip_bad`."""

    path: str
    reason: str


class Batch(tuple):
    """`(images, labels)` that also carries `.skipped`: the paths of dropped undecodable files."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, skipped: Sequence[str] = ()):
        batch = super().__new__(cls, (images, labels))
        batch.skipped = tuple(skipped)
        return batch

    def __reduce__(self):
        return (Batch, (self[0], self[1], self.skipped))

    def pin_memory(self) -> "Batch":
        return Batch(self[0].pin_memory(), self[1].pin_memory(), self.skipped)


class ImageListDataset(Dataset):
    """Images `root / path` with integer labels, decoded as RGB and passed through `transform`.

    on_error="skip": an undecodable file yields a `BadImage` (use `collate_skip_bad`);
    on_error="raise": it raises `ImageDecodeError` naming the file (the CLIs' `--strict`).
    `draft_size` enables reduced-size JPEG decoding (see `load_rgb`).
    """

    def __init__(
        self,
        root: Union[str, Path],
        samples: Sequence[Sample],
        transform: Optional[Callable] = None,
        on_error: str = "skip",
        draft_size: Optional[int] = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform
        self.on_error = on_error
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        rel_path, label = self.samples[index]
        path = self.root / rel_path
        try:
            image = load_rgb(path, self.draft_size)
        except ImageDecodeError as err:
            if self.on_error == "raise":
                raise
            return BadImage(str(path), str(err))
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def collate_skip_bad(items: Sequence) -> Batch:
    """Collate `(image, label)` items into a `Batch`, dropping `BadImage` markers (paths kept)."""
    good = [item for item in items if not isinstance(item, BadImage)]
    skipped = [item.path for item in items if isinstance(item, BadImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = default_collate(good)
    return Batch(images, labels, skipped)


class ImagesChangedError(ValueError):
    """Listed images that vanished or were rewritten while a run read them (one line: how many, the first)."""

    def __init__(self, paths: Sequence[str], what: str, total: Optional[int] = None) -> None:
        self.paths, self.what, self.total = list(paths), what, total
        of = f" of its {total}" if total is not None else ""
        super().__init__(f"{what}: {len(self.paths)}{of} images vanished or changed while the run read them "
                         f"(first: '{self.paths[0]}'), so it is not scored on the rest; keep the data and "
                         "$CLIPCONV_CACHE (which holds the demo world and extracted samples) unchanged while a run "
                         "reads them, then run again")


def changed_since(paths: Iterable[str], since: Optional[float] = None) -> list[str]:
    """The `paths` (files, or `<shard>#<key>` samples: their shard) that no longer exist, or, given `since`
    (`time.time()` when they were listed), whose status changed after it (st_ctime: any write moves it)."""
    changed = []
    for path in paths:
        file = path if os.path.lexists(path) or "#" not in path else path.partition("#")[0]
        try:
            stat = os.stat(file)
        except OSError:
            changed.append(path)
            continue
        if since is not None and stat.st_ctime > since:
            changed.append(path)
    return changed


def report_skipped(paths: Iterable[str], what: str = "images", since: Optional[float] = None,
                   warn: bool = True) -> None:
    """Emit ONE warning naming every skipped file and their count (nothing when there are none); raise
    `ImagesChangedError` instead when some of them vanished or changed (`changed_since(paths, since)`)."""
    paths = list(paths)
    changed = changed_since(paths, since)
    if changed:
        raise ImagesChangedError(changed, what)
    if paths and warn:
        listing = "\n  ".join(paths)
        warnings.warn(
            f"skipped {len(paths)} undecodable file(s) while reading {what}:\n  {listing}",
            stacklevel=2,
        )


@dataclass
class SkipTracker:
    """Iterate a DataLoader built with `collate_skip_bad`: yields non-empty batches, warns once at the end."""

    loader: Iterable
    what: str = "images"
    since: Optional[float] = None  # when the images were listed (`report_skipped`)

    def __post_init__(self) -> None:
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        for batch in self.loader:
            self.skipped.extend(getattr(batch, "skipped", ()))
            if len(batch[1]):
                yield batch
        report_skipped(self.skipped, self.what, self.since)

    def __len__(self) -> int:
        return len(self.loader)
