"""Seeds that make random augmentation independent of workers, batching and ranks (a leaf module)."""
from __future__ import annotations

__all__ = ["item_seed"]


def item_seed(round_seed: int, index: int) -> int:
    """The torch seed set before transforming item `index` of a round (independent of workers and batching)."""
    return (int(round_seed) * 1_000_003 + int(index)) % (2**63 - 1)
