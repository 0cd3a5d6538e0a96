"""How small a JPEG may be decoded for a given model transform (libjpeg's DCT scaling via PIL's `draft`).

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size for a fraction of the work (PIL:
`Image.draft("RGB", (d, d))` picks the largest of those scales whose both sides stay >= d). That is
only harmless when the transform shrinks the image to at most the decoded size anyway, so the draft
size is derived from the transform's first geometric step:

* `Resize(s)` (the evaluation transform: shorter side to s, then CenterCrop(s)): the shorter side
  must stay >= s, so d = s (for Resize((h, w)): max(h, w)).
* `RandomResizedCrop(S, scale=(a, b), ratio=(r0, r1))` (training): a crop covers a fraction >= a of
  the image area A with aspect r in [r0, r1], so its shorter side is >= sqrt(A · a · min(r0, 1/r1)),
  and A >= (shorter side)². The crop keeps >= S source pixels per output pixel row/column iff the
  image's shorter side d >= S / sqrt(a · min(r0, 1/r1)); at the protocol's S=224, a=0.08,
  ratio (3/4, 4/3) that is d >= 915, i.e. a 500×375 ImageNet image is never drafted for training.

Anything else (an unknown step before the first geometric one, Resize with max_size) gives None:
decode at full size.
"""
from __future__ import annotations

import math
import types
from typing import Callable, Optional, Sequence, Union

from torchvision import transforms as T

__all__ = ["needed_short_side", "DRAFT_MODES", "draft_for", "leading_resize"]

#: RuntimeConfig.draft: which loaders decode JPEGs at a reduced DCT scale
DRAFT_MODES = ("eval", "all", "off")


def _size(value: Union[int, Sequence[int]]) -> int:
    return int(value) if isinstance(value, int) else int(max(value))


def _pixelwise(step: object) -> bool:
    """Steps that do not change the geometry and may precede the resize (RGB conversion)."""
    if isinstance(step, (types.FunctionType, types.MethodType)):
        return "rgb" in step.__name__.lower()
    return type(step).__name__ in ("MaybeConvertMode",)


def needed_short_side(transform: Optional[Callable]) -> Optional[int]:
    """The smallest shorter image side `transform` can take without upsampling what it keeps, or None
    when the transform is not understood (then images must be decoded at full size)."""

    steps = list(getattr(transform, "transforms", [transform]))
    for step in steps:
        if isinstance(step, T.RandomResizedCrop):
            low_scale = float(step.scale[0])
            worst_aspect = min(float(step.ratio[0]), 1.0 / float(step.ratio[1]))
            if low_scale <= 0 or worst_aspect <= 0:
                return None
            return int(math.ceil(_size(step.size) / math.sqrt(low_scale * worst_aspect)))
        if isinstance(step, T.Resize):
            if getattr(step, "max_size", None) is not None:
                return None
            return _size(step.size)
        if not _pixelwise(step):
            return None
    return None


def draft_for(mode: str, transform: Optional[Callable], training: bool) -> Optional[int]:
    """The `draft_size` for a loader of `transform` under RuntimeConfig.draft `mode` ("eval": evaluation
    loaders only, "all": training too, "off": never)."""
    if mode not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {list(DRAFT_MODES)}, got {mode!r}")
    if mode == "off" or (training and mode == "eval"):
        return None
    return needed_short_side(transform)


def leading_resize(transform: Optional[Callable]) -> Optional[Callable]:
    """The transform's first geometric step when it is a deterministic `Resize` (the evaluation transform's),
    else None. Images cached after it pass the transform unchanged: torchvision's resize returns an image
    that already has the output size as it is."""

    for step in list(getattr(transform, "transforms", [transform])):
        if isinstance(step, T.Resize):
            return step
        if not _pixelwise(step):
            return None
    return None
