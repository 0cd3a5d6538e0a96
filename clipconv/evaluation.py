"""The robustness suite: score one method on ImageNet val, -V2, -Sketch, -A and -R."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, Union

import torch

from clipconv.data import image_dataset
from clipconv.data.decoded import DecodedImageDataset, decoded_resized
from clipconv.data.draft import draft_for
from clipconv.data.folder import ImagesChangedError, SkipTracker
from clipconv.data.sharded import report_skipped_everywhere
from clipconv.data.tensorize import split_transform
from clipconv.metrics import mean_per_class_recall, per_class_top1, topk_accuracy
from clipconv.runtime import ranks
from clipconv.runtime.progress import progress

if TYPE_CHECKING:
    from clipconv.data import EvalSplit
    from clipconv.features import FeatureStore

__all__ = ["collect_logits", "evaluate_method", "image_loader", "Scorer", "ImageBatches", "logits_of_batches"]


class Scorer(Protocol):
    """What the evaluation suite scores: a fitted method (or a loaded classifier wrapped as one).
    Frozen-image-encoder scorers also provide `logits_from_features(features)`."""

    frozen_image_encoder: bool

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...


def image_loader(root: Path, samples: Sequence, transform: Callable, batch_size: int, workers: int,
                 shuffle: bool = False, generator: Optional[torch.Generator] = None, strict: bool = False,
                 draft_size: Optional[int] = None, decoded=None, pin_memory: bool = False,
                 since: Optional[float] = None):
    """Batches of (images, labels) over (path, label) samples; undecodable images are skipped with one
    warning at the end (an error naming the file when `strict`), vanished ones (or, given `since`, when they
    were listed, ones changed after it) raise ImagesChangedError. `draft_size`: decode JPEGs at a reduced
    DCT scale keeping both sides >= it (clipconv.data.draft); `decoded`: read the images from these
    `DecodedImages` (clipconv.data.decoded) instead of the files; `pin_memory`: for CUDA copies."""

    on_error = "raise" if strict else "skip"
    item_transform, collate = split_transform(transform)  # ToTensor + Normalize once per batch
    if decoded is not None:
        dataset = DecodedImageDataset(decoded, root, list(samples), item_transform, on_error)
    else:
        dataset = image_dataset(root, list(samples), item_transform, on_error=on_error, draft_size=draft_size)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        shuffle, generator = False, None  # streamed webdataset shards: read in order, once
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
        generator=generator, drop_last=False, pin_memory=pin_memory, persistent_workers=workers > 0,
    )
    return SkipTracker(loader, what=str(root), since=since)


@torch.no_grad()
def collect_logits(
    score: Callable[[torch.Tensor], torch.Tensor],
    root: Path,
    samples: Sequence,
    transform: Callable,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "",
    strict: bool = False,
    draft_size: Optional[int] = None,
    decoded=None,
    since: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `score(images)` over a sample list; returns (logits, labels) on CPU, in sample order (`draft_size`,
    `decoded`, `since`: see `image_loader`). Under torchrun each rank scores a contiguous run of whole batches and every
    rank gets all of them (clipconv.runtime.ranks), bit-identical to one process."""

    device = torch.device(device)
    if decoded is not None and ranks.is_distributed():
        raise ValueError("decoded images cannot be sharded across processes; pass decoded=None under torchrun")
    loader = image_loader(root, ranks.shard(list(samples), batch_size), transform, batch_size, workers,
                          strict=strict, draft_size=draft_size, decoded=decoded, pin_memory=device.type == "cuda",
                          since=since)
    all_logits, all_labels = [], []
    for images, labels in progress(loader, desc=desc or "eval", unit="batch"):
        all_logits.append(score(images.to(device, non_blocking=True)).float().cpu())
        all_labels.append(labels)
    report_skipped_everywhere(loader.skipped, True, loader.what)
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, 0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    return ranks.gather_rows(logits, labels)


class ImageBatches:
    """The (images, labels) batches of a sample list under a deterministic transform, loaded once and kept
    (e.g. the validation split scored after every epoch: decoded and transformed once, not once per epoch),
    unless they take more than `budget_bytes`: then they are loaded again on every call. One process only."""

    def __init__(self, root: Path, samples: Sequence, transform: Callable, batch_size: int, workers: int = 0,
                 draft_size: Optional[int] = None, decoded=None, budget_bytes: int = 512 * 2**20) -> None:
        if ranks.is_distributed():
            raise ValueError("ImageBatches serves one process; use collect_logits under torchrun")
        self.root, self.samples, self.transform = root, list(samples), transform
        self.batch_size, self.workers, self.draft_size, self.decoded = batch_size, workers, draft_size, decoded
        self.budget_bytes = budget_bytes
        self._kept: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def __iter__(self):
        if self._kept is not None:
            yield from self._kept
            return
        loader = image_loader(self.root, self.samples, self.transform, self.batch_size, self.workers,
                              draft_size=self.draft_size, decoded=self.decoded)
        kept: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = []
        size = 0
        for images, labels in loader:  # (undecodable files are skipped with one warning, by the loader)
            size += images.numel() * images.element_size()
            if kept is not None and size <= self.budget_bytes:
                kept.append((images, labels))
            else:
                kept = None
            yield images, labels
        self._kept = kept


def logits_of_batches(score: Callable[[torch.Tensor], torch.Tensor], batches: ImageBatches, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`score(images)` over `batches` in inference mode: (logits, labels) on CPU, as `collect_logits` gives."""
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for images, labels in batches:
            all_logits.append(score(images.to(device, non_blocking=True)).float().cpu())
            all_labels.append(labels)
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, 0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    return logits, labels


def _set_logits(method: Scorer, split: "EvalSplit", data_root: Path, device: torch.device,
                features: Optional["FeatureStore"], eval_transform: Optional[Callable], batch_size: int,
                workers: int, strict: bool, draft_size: Optional[int], decoded_dir: Union[str, Path, None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one evaluation set: from cached features for frozen-image-encoder methods, else from
    the images (decoded once into `decoded_dir` when the set is small enough: `decoded_resized`);
    ImagesChangedError when images listed with the set vanished or changed since."""
    if getattr(method, "frozen_image_encoder", False) and features is not None:
        feats, labels = features.encode(data_root, split.samples, desc=split.display_name, with_labels=True,
                                        since=split.listed_at)
        logits = torch.cat([method.logits_from_features(chunk.to(device)).float().cpu()
                            for chunk in feats.split(4096)]) if len(feats) else torch.empty(0, 0)
        return logits, labels
    if eval_transform is None:
        raise ValueError("evaluate_method needs eval_transform for methods that read images")
    decoded = None
    if decoded_dir is not None and not ranks.is_distributed():  # (under torchrun each rank reads its shard)
        decoded = decoded_resized(data_root, split.samples, eval_transform, draft_size, decoded_dir, workers)
    return collect_logits(method.logits, data_root, split.samples, eval_transform, device, batch_size, workers,
                          desc=split.display_name, strict=strict, draft_size=draft_size, decoded=decoded,
                          since=split.listed_at)


def evaluate_method(
    method: Scorer,
    splits: Sequence["EvalSplit"],
    data_root: Path,
    device: torch.device,
    features: Optional["FeatureStore"] = None,
    eval_transform: Optional[Callable] = None,
    batch_size: int = 64,
    workers: int = 0,
    log: Callable[[str], None] = print,
    strict: bool = False,
    on_logits: Optional[Callable[[str, torch.Tensor, torch.Tensor], None]] = None,
    draft: str = "off",
    decoded_dir: Union[str, Path, None] = None,
) -> dict[str, dict[str, float]]:
    """{set name: {"top1", "top5", "n", "classes", "mean_per_class_recall", "per_class"}} for each evaluation
    split (sample paths relative to `data_root`; "classes": how many classes the argmax is over, fewer for a
    restricted -A/-R set; "mean_per_class_recall": sklearn's balanced accuracy in %, over the classes with
    images; "per_class": the top-1 of each of those classes, None for one without images).
    `on_logits(set name, logits, labels)` receives each set's scores (e.g. to save them).

    Frozen-image-encoder methods score features from `features` (a FeatureStore, so each set is encoded
    once per backbone); the others see preprocessed images, JPEGs decoded at a reduced DCT scale when
    `draft` is "eval" or "all" (clipconv.data.draft). With `decoded_dir` (a decoded-image cache folder) a
    set within clipconv.data.decoded.RESIZED_BUDGET is decoded once, after the transform's Resize, and later
    runs read its entry (`decoded_resized`; the same scores as from the files); larger sets stream from their
    files. -A/-R splits carry a `subset` of class indices and are scored with the argmax restricted to them.
    """

    draft_size = draft_for(draft, eval_transform, training=False)
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        try:
            logits, labels = _set_logits(method, split, data_root, device, features, eval_transform, batch_size,
                                         workers, strict, draft_size, decoded_dir)
        except ImagesChangedError as err:  # named by the set, counted against what it holds
            raise ImagesChangedError(err.paths, split.name, len(split.samples)) from None
        if split.samples and not len(labels):
            raise ValueError(f"{split.name}: none of its {len(split.samples)} images could be decoded, so it "
                             f"cannot be scored; check it with scripts/check_data.py --verify")
        classes = split.num_classes or (len(split.subset) if split.subset is not None else
                                        int(logits.shape[1]) if logits.numel() else 0)
        results[split.name] = {**topk_accuracy(logits, labels, subset=split.subset), "classes": classes,
                               "mean_per_class_recall": mean_per_class_recall(logits, labels, subset=split.subset),
                               "per_class": per_class_top1(logits, labels, classes, subset=split.subset)}
        if on_logits is not None:
            on_logits(split.name, logits, labels)
        log(f"{split.display_name}: top-1 {results[split.name]['top1']:.2f}% on {results[split.name]['n']} images "
            f"over {classes} classes")
    return results
