"""The next batch loads during the backward pass (clipconv/runtime/ahead.py, Trainer.train_epoch): the same items,
errors raised where the loop asks for the item, and the same random stream as a serial loop."""
from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipconv.runtime import ranks
from clipconv.runtime.ahead import LoadAhead
from clipconv.training import BatchLoss, TrainConfig, Trainer, TrainingTask


def test_items_come_in_order_whether_fetched_ahead_or_not():
    ahead = LoadAhead(range(5))
    got = []
    for index, item in enumerate(ahead):
        got.append(item)
        if index % 2 == 0:
            ahead.fetch()
            ahead.fetch()  # a second fetch while one is under way changes nothing
    assert got == [0, 1, 2, 3, 4]


def test_an_error_of_the_producer_is_raised_by_next_in_the_callers_thread():
    def items():
        yield 1
        raise OSError("image vanished")

    ahead = LoadAhead(items())
    assert next(ahead) == 1
    ahead.fetch()
    with pytest.raises(OSError, match="image vanished"):
        next(ahead)


def test_close_waits_for_the_fetch_under_way():
    release, produced = threading.Event(), []

    def items():
        yield 0
        release.wait(5)
        produced.append(1)
        yield 1

    with LoadAhead(items()) as ahead:
        next(ahead)
        ahead.fetch()
        release.set()
    assert produced == [1]


class NoisyTask(TrainingTask):
    """A linear layer behind dropout whose batches also draw from the global generator without restoring it:
    the results depend on the exact order of every random draw of the loop."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 3))

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def steps_per_epoch(self) -> int:
        return 4

    def batches(self, epoch: int, generator: torch.Generator):
        for _ in range(4):
            yield torch.randn(6, 4), torch.randint(0, 3, (6,))  # the global generator

    def loss(self, batch, forward) -> BatchLoss:
        return BatchLoss(F.cross_entropy(forward(batch[0]), batch[1], reduction="sum"))


@pytest.fixture(autouse=True)
def a_free_core(monkeypatch):
    """The suite runs one torch thread; the trainer loads ahead only when a core is left for it."""
    monkeypatch.setattr(Trainer, "_core_for_loading", lambda self: True)


def test_the_cpu_loads_ahead_only_with_a_core_left_for_it(monkeypatch):
    monkeypatch.undo()
    trainer = Trainer(NoisyTask(), TrainConfig(epochs=1, batch_size=6), torch.device("cpu"), log=lambda line: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert trainer._core_for_loading() is False
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert trainer._core_for_loading() is True


def _trained(monkeypatch: pytest.MonkeyPatch, ahead: bool, **options: object) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        if not ahead:
            patch.setattr(LoadAhead, "fetch", lambda self: None)
        task = NoisyTask()
        Trainer(task, TrainConfig(epochs=2, batch_size=6, lr=0.1, seed=3, **options), torch.device("cpu"),
                log=lambda line: None).fit()
        return {name: tensor.detach().clone() for name, tensor in task.trainable().items()}


@pytest.mark.parametrize("options", [{}, {"seeding": "run"}], ids=["epoch-seeding", "run-seeding"])
def test_loading_ahead_keeps_the_serial_loops_random_stream(monkeypatch, options):
    fetched = []
    original = LoadAhead.fetch
    monkeypatch.setattr(LoadAhead, "fetch", lambda self: (fetched.append(1), original(self))[1])
    ahead = _trained(monkeypatch, ahead=True, **options)
    assert fetched  # the trainer did load ahead
    serial = _trained(monkeypatch, ahead=False, **options)
    assert ahead.keys() == serial.keys()
    assert all(torch.equal(ahead[name], serial[name]) for name in ahead)


@pytest.mark.parametrize("case", ["checkpointing", "torchrun"])
def test_gradient_checkpointing_and_torchrun_load_serially(monkeypatch, case):
    """Checkpointing recomputes forwards (and their random draws) in backward; under torchrun the loader's
    collectives (the skipped-file gather at the end of an epoch) must not run beside DDP's all-reduces."""
    fetched = []
    monkeypatch.setattr(LoadAhead, "fetch", lambda self: fetched.append(1))
    if case == "torchrun":
        monkeypatch.setattr(ranks, "is_distributed", lambda: True)
    task = NoisyTask()
    task.data_parallel = False  # no DDP wrapper in this one process
    Trainer(task, TrainConfig(epochs=1, batch_size=6, grad_checkpointing=case == "checkpointing"),
            torch.device("cpu"), log=lambda line: None).fit()
    assert fetched == []
