"""ToTensor + Normalize once per batch instead of once per image, bit-identically (`split_transform`).

A torchvision `Compose` ending with `ToTensor` (or open_clip's `MaybeToTensor`) + `Normalize` is split into a
per-item transform that stops at the uint8 CHW pixels (`ToUint8`: PILToTensor's tensor) and a collate function
(`CollateTail`) that stacks them and converts the whole batch at once: to torch's default float dtype, / 255
(ToTensor's conversion), then the transform's own `Normalize` (its mean, std). Every element goes through the
same IEEE operations as in the per-image transform (a conversion, a division, a subtraction, a division, each
correctly rounded), so the batch is bit-identical; only the number of operator calls changes (a few per batch
instead of five per image).

The conversion runs in the loader's collate function: in its worker processes when there are any, on each
rank's own slice under torchrun, after `collate_skip_bad` dropped undecodable images; loaders yield the same
float batches as before (pinned for CUDA as before). An input the split cannot serve exactly (not a PIL image,
or a PIL mode ToTensor does not read as 8-bit pixels: "1", "I", "I;16", "F") is finished per item by the
original steps, and a batch mixing both finishes its uint8 items one by one before stacking. Transforms that do
not end that way keep the per-item path (`collate_skip_bad`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from clipconv.data.folder import BadImage, Batch, collate_skip_bad

__all__ = ["ToUint8", "CollateTail", "SplitTransform", "split_transform"]


def _is_to_tensor(step: object) -> bool:
    """torchvision's ToTensor or open_clip's MaybeToTensor (a ToTensor passing tensors through): both read a
    PIL image with `to_tensor`."""
    return type(step) is T.ToTensor or (isinstance(step, T.ToTensor) and type(step).__name__ == "MaybeToTensor")


class ToUint8:
    """The per-item end of a split transform: a PIL image → its uint8 (C, H, W) pixels; any other input → the
    original `to_tensor` + `normalize` steps applied to it (a finished float tensor)."""

    def __init__(self, to_tensor: Callable, normalize: T.Normalize) -> None:
        self.to_tensor, self.normalize = to_tensor, normalize

    def __call__(self, pic: object) -> torch.Tensor:
        if isinstance(pic, Image.Image):
            pixels = F.pil_to_tensor(pic)
            if pixels.dtype == torch.uint8:  # to_tensor reads these modes as uint8 too, then divides by 255
                return pixels
        return self.normalize(self.to_tensor(pic))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_tensor!r}, {self.normalize!r})"


class CollateTail:
    """`collate_skip_bad`, then ToTensor's float conversion and `normalize` on the stacked uint8 images."""

    def __init__(self, normalize: T.Normalize) -> None:
        self.normalize = normalize

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (one image or a batch) → normalized floats; float images (finished per item, or an empty
        batch) as they are."""
        if images.dtype != torch.uint8:
            return images
        floats = images.to(dtype=torch.get_default_dtype()).div_(255)  # to_tensor's conversion
        return F.normalize(floats, self.normalize.mean, self.normalize.std, inplace=True)

    def __call__(self, items: Sequence) -> Batch:
        good = [item for item in items if not isinstance(item, BadImage)]
        if len({item[0].dtype == torch.uint8 for item in good}) > 1:  # mixed: never stack uint8 with floats
            items = [item if isinstance(item, BadImage) else (self.finish(item[0]), *item[1:]) for item in items]
        batch = collate_skip_bad(items)
        return Batch(self.finish(batch[0]), batch[1], batch.skipped)


class SplitTransform(NamedTuple):
    """What a loader of a transform uses: the per-item transform and the collate function."""

    item: Optional[Callable]
    collate: Callable[[Sequence], Batch]


def split_transform(transform: Optional[Callable]) -> SplitTransform:
    """(per-item transform, collate) for `transform`: split when it is a Compose ending with ToTensor (or
    MaybeToTensor) + Normalize, else (`transform`, `collate_skip_bad`)."""
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else []
    if len(steps) < 2 or not _is_to_tensor(steps[-2]) or type(steps[-1]) is not T.Normalize:
        return SplitTransform(transform, collate_skip_bad)
    return SplitTransform(T.Compose([*steps[:-2], ToUint8(steps[-2], steps[-1])]), CollateTail(steps[-1]))
