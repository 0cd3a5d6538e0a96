"""Top-k accuracy and mean per-class recall, with the argmax optionally restricted to a class subset (ImageNet-A/-R)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["restrict_to_subset", "topk_accuracy", "per_class_top1", "mean_per_class_recall"]


def restrict_to_subset(
    logits: torch.Tensor, labels: torch.Tensor, subset: Optional[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the `subset` columns (ascending class indices) and relabel to positions in it.

    This is how ImageNet-A/-R are scored: a 1000-way classifier, argmax over their 200 classes only.
    Every label must belong to the subset.
    """
    if subset is None:
        return logits, labels
    index = torch.as_tensor(sorted(subset), dtype=torch.long, device=logits.device)
    position = torch.full((logits.shape[1],), -1, dtype=torch.long, device=logits.device)
    position[index] = torch.arange(len(index), device=logits.device)
    mapped = position[labels.to(logits.device)]
    if (mapped < 0).any():
        raise ValueError("a label lies outside the class subset the set is scored on")
    return logits[:, index], mapped


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), subset: Optional[Sequence[int]] = None
) -> dict[str, float]:
    """{"top1": %, "top5": %, "n": count}; k is capped at the number of classes scored."""
    if labels.numel() == 0:
        return {**{f"top{k}": float("nan") for k in ks}, "n": 0}
    logits, labels = restrict_to_subset(logits, labels, subset)
    n = int(labels.numel())
    out: dict[str, float] = {}
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    for k in ks:
        out[f"top{k}"] = 100.0 * hits[:, :k].any(dim=1).float().mean().item()
    out["n"] = n
    return out


def per_class_top1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   subset: Optional[Sequence[int]] = None) -> list[Optional[float]]:
    """Top-1 (%) of each class scored, in class order (the `subset`'s ascending order for -A/-R): one entry
    per class the argmax is over; None for a class without images in the set."""
    if subset is not None:
        num_classes = len(subset)
    if labels.numel() == 0:
        return [None] * num_classes
    logits, labels = restrict_to_subset(logits, labels, subset)
    hits = (logits.argmax(dim=1) == labels).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hits, minlength=num_classes)
    return [100.0 * c / n if n > 0 else None for c, n in zip(correct.tolist(), counts.tolist())]


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor,
                          subset: Optional[Sequence[int]] = None) -> float:
    """Mean over the classes present in `labels` of each class's recall (top-1 within the class), in %.

    sklearn's `balanced_accuracy_score(labels, argmax)` × 100 (what CLIP_benchmark reports as
    `mean_per_class_recall`): classes without images in the set do not count; the argmax is restricted to
    `subset` like `topk_accuracy`. NaN for an empty set.
    """
    if labels.numel() == 0:
        return float("nan")
    logits, labels = restrict_to_subset(logits, labels, subset)
    hits = (logits.argmax(dim=1) == labels).double()
    counts = torch.bincount(labels).double()
    correct = torch.bincount(labels, weights=hits, minlength=len(counts))
    present = counts > 0
    return 100.0 * (correct[present] / counts[present]).mean().item()
