"""Where the patch grid sits in a token sequence, for adapters that see tokens as an image."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["TokenLayout", "encoder_layout"]


@dataclass(frozen=True)
class TokenLayout:
    """Tokens (B, N, width) = `prefix` tokens, then the H×W patch grid row-major, then `suffix` tokens.

    An open_clip ViT has one prefix token ([cls]) and no suffix. Prompt tokens (VPT) add to `prefix`
    (inserted after [cls]) or to `suffix` (appended); grid-aware adapters treat every non-patch token
    like [cls]. `grid=None` means "a square grid inferred from the token count".
    """

    grid: Optional[tuple[int, int]] = None
    prefix: int = 1
    suffix: int = 0

    def __post_init__(self) -> None:
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) <= 0):
            raise ValueError(f"token grid must be two positive sizes (H, W), got {self.grid}")
        if self.prefix < 0 or self.suffix < 0:
            raise ValueError(f"prefix and suffix token counts must be >= 0, got {self.prefix}, {self.suffix}")

    def grid_for(self, num_tokens: int) -> tuple[int, int]:
        """(H, W) for a sequence of `num_tokens` tokens; ValueError when they do not fit this layout."""
        patches = num_tokens - self.prefix - self.suffix
        if self.grid is not None:
            height, width = self.grid
            if patches != height * width:
                raise ValueError(
                    f"the adapter was built for a {height}×{width} grid ({self.prefix} + {height * width} + "
                    f"{self.suffix} tokens), got {num_tokens} tokens"
                )
            return height, width
        side = math.isqrt(max(patches, 0))
        if patches < 1 or side * side != patches:
            raise ValueError(
                f"expected tokens ({self.prefix} before + a square H×W patch grid + {self.suffix} after), got "
                f"{num_tokens} tokens: {patches} is not a perfect square; give the grid (H, W) for a non-square grid"
            )
        return side, side


def encoder_layout(visual: nn.Module, prompt_tokens: int = 0) -> TokenLayout:
    """The layout of an open_clip VisionTransformer's tokens: [cls], `prompt_tokens` prompts, the grid."""
    grid = getattr(visual, "grid_size", None)
    if grid is not None:
        grid = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(g) for g in grid)
    return TokenLayout(grid=grid, prefix=1 + int(prompt_tokens))
