"""Seeds that make random augmentation independent of workers, batching and ranks (a leaf module)."""
from __future__ import annotations

import torch

__all__ = ["item_seed", "seed_item"]


def item_seed(round_seed: int, index: int) -> int:
    """The torch seed set before transforming item `index` of a round (independent of workers and batching)."""
    return (int(round_seed) * 1_000_003 + int(index)) % (2**63 - 1)


def seed_item(round_seed: int, index: int) -> None:
    """Seed torch's CPU generator (what the CPU-side transforms draw from) for item `index` of a round.

    Not `torch.manual_seed`: that also (lazily) seeds every CUDA/XPU device, and without CUDA each call
    formats a stack trace to queue it (~1 ms per item); the CPU draws are the same."""
    torch.default_generator.manual_seed(item_seed(round_seed, index))
