"""Training batches under torchrun: the single-process global batch and epoch order, one contiguous slice of
every global batch per rank, and augmentation seeded by (epoch seed, item index) whatever rank or worker
reads an item (`train_loader`). In one process it is a plain shuffled DataLoader."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, Union

import torch

from clipconv.data.folder import Batch, SkipTracker, collate_skip_bad, report_skipped
from clipconv.runtime.ranks import IGNORE_LABEL, gather_objects, is_distributed, is_main, rank, shard_bounds, world_size
from clipconv.runtime.seeding import seed_item

__all__ = ["GlobalBatchShards", "SeededTrainItems", "train_loader", "report_skipped_everywhere"]


class GlobalBatchShards(torch.utils.data.Sampler):
    """Batches of (index, padding) keys: the permutation of `sampler` cut into global batches of
    `batch_size` (the last one shorter, never dropped), each yielding rank `index`'s contiguous slice
    (`shard_bounds`). A rank whose slice of a short last batch is empty gets the batch's first item
    as padding (its label becomes IGNORE_LABEL), so every rank takes every step."""

    def __init__(self, sampler: Iterable[int], batch_size: int, ranks: int = 1, index: int = 0) -> None:
        self.sampler, self.batch_size, self.ranks, self.index = sampler, int(batch_size), int(ranks), int(index)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        batch: list[int] = []
        for item in self.sampler:
            batch.append(int(item))
            if len(batch) == self.batch_size:
                yield self._slice(batch)
                batch = []
        if batch:
            yield self._slice(batch)

    def _slice(self, batch: list[int]) -> list[tuple[int, bool]]:
        start, end = shard_bounds(len(batch), self.ranks, self.index)
        return [(i, False) for i in batch[start:end]] or [(batch[0], True)]


class SeededTrainItems(torch.utils.data.Dataset):
    """Item i of `dataset` transformed right after seeding torch's CPU generator with `item_seed(round_seed, i)`
    (the caller's RNG state is restored; device generators are left alone), so its augmentation depends on
    (epoch seed, i) only — not on the rank, worker or batch position that reads it. Keys are (index, padding) pairs (GlobalBatchShards)."""

    def __init__(self, dataset: torch.utils.data.Dataset, round_seed: int) -> None:
        self.dataset, self.round_seed = dataset, int(round_seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, padding = key if isinstance(key, tuple) else (key, False)
        generator = torch.default_generator  # the CPU generator the transforms draw from
        state = generator.get_state()
        try:
            seed_item(self.round_seed, index)
            item = self.dataset[index]
        finally:
            generator.set_state(state)
        if padding and isinstance(item, tuple) and len(item) == 2 and not hasattr(item, "reason"):
            return item[0], IGNORE_LABEL
        return item


def report_skipped_everywhere(own: Sequence[str], reported: bool, what: str) -> None:
    """Under torchrun, rank 0 warns about the undecodable files the other ranks skipped in their shards
    (`own`: this rank's; `reported`: whether rank 0 already warned about its own)."""
    if not is_distributed():
        return
    parts = gather_objects(list(own))
    if is_main():
        report_skipped([path for part in (parts[1:] if reported else parts) for path in part], what)


class _AllBatches:
    """Iterate a loader built with collate_skip_bad yielding every batch, empty ones too (each rank must
    take every step); one warning naming the skipped files at the end."""

    def __init__(self, loader: torch.utils.data.DataLoader, what: str) -> None:
        self.loader, self.what = loader, what

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        skipped: list[str] = []
        for batch in self.loader:
            skipped.extend(getattr(batch, "skipped", ()))
            yield batch
        everywhere = [path for part in gather_objects(skipped) for path in part]  # collective: every rank
        report_skipped(everywhere, self.what, warn=is_main())  # vanished files stop every rank


def train_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, generator: torch.Generator,
                 what: str = "training images", pin_memory: bool = False,
                 collate: Callable[[Sequence], Batch] = collate_skip_bad) -> Union[_AllBatches, SkipTracker]:
    """One epoch of training batches of `dataset` ((image, label) items, BadImage for undecodable files).

    The order is DataLoader(shuffle=True, generator=generator)'s, the augmentation of item i is seeded by
    (generator's seed, i); under torchrun each rank gets its contiguous slice of every global batch
    (batch_size / world size images), empty batches included, so all ranks step together. `collate`: a
    collate_skip_bad that may finish the batch (clipconv.data.tensorize: the dataset's transform split).
    """
    seeded = SeededTrainItems(dataset, generator.initial_seed())
    sampler = torch.utils.data.RandomSampler(seeded, generator=generator)
    loader = torch.utils.data.DataLoader(
        seeded, batch_sampler=GlobalBatchShards(sampler, batch_size, world_size(), rank()),
        num_workers=workers, collate_fn=collate, generator=generator, pin_memory=pin_memory)
    return _AllBatches(loader, what) if is_distributed() else SkipTracker(loader, what=what)
