"""A tiny TrainingTask for trainer tests: cross-entropy of a linear layer (4 → 3) on fixed batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.training import BatchLoss, TrainingTask


def fixed_batches(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of 5 random 4-d inputs and labels in 0..2 (seed 1)."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=generator), torch.randint(0, 3, (5,), generator=generator))
            for _ in range(count)]


class LinearTask(TrainingTask):
    """Cross-entropy of a linear layer (initialized under seed 0) on fixed batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        torch.manual_seed(0)
        self.model, self._batches = nn.Linear(4, 3), batches

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def steps_per_epoch(self) -> int:
        return len(self._batches)

    def batches(self, epoch: int, generator: torch.Generator):
        return self._batches

    def loss(self, batch, forward) -> BatchLoss:
        return BatchLoss(F.cross_entropy(forward(batch[0]).float(), batch[1], reduction="sum"))
