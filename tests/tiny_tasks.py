"""A tiny TrainingTask for trainer tests: cross-entropy of a linear layer (4 → 3) on fixed batches; a run
stopped right after the train state of an epoch was written (`stopped_after_saving`)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipconv.training import BatchLoss, Trainer, TrainingTask


class Killed(Exception):
    """Stands for SIGKILL right after the train state of an epoch was written."""


@contextlib.contextmanager
def stopped_after_saving(epoch: int, error: type[BaseException] = Killed) -> Iterator[None]:
    """Within: every Trainer raises `error` right after it wrote its train state at the end of `epoch` (a
    process killed between epochs; KeyboardInterrupt: Ctrl-C arriving then)."""
    save_state = Trainer.save_state

    def save_then_stop(self: Trainer) -> None:
        save_state(self)
        if self.epoch == epoch:
            raise error

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_state", save_then_stop)
        yield


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
