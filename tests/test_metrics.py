"""Top-k accuracy and the -A/-R subset restriction."""
from __future__ import annotations

import math

import pytest
import torch

from clipconv.metrics import restrict_to_subset, topk_accuracy


def test_subset_restriction_changes_the_argmax():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 3.0, 9.0, 1.0]])
    labels = torch.tensor([2, 1])
    assert topk_accuracy(logits, labels, ks=(1,))["top1"] == 0.0
    # scored over classes {1, 2}: row 0 → class 2 (2 > 1), row 1 → class 2 (label 1, wrong)
    assert topk_accuracy(logits, labels, ks=(1,), subset=[2, 1])["top1"] == 50.0
    sub_logits, sub_labels = restrict_to_subset(logits, labels, [2, 1])
    assert sub_logits.shape == (2, 2) and sub_labels.tolist() == [1, 0]


def test_labels_outside_the_subset_are_an_error():
    with pytest.raises(ValueError, match="outside the class subset"):
        restrict_to_subset(torch.zeros(1, 3), torch.tensor([0]), [1, 2])


def test_top5_is_capped_at_the_class_count_and_empty_sets_give_nan():
    result = topk_accuracy(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]))
    assert result == {"top1": 0.0, "top5": 100.0, "n": 1}
    empty = topk_accuracy(torch.empty(0, 0), torch.empty(0, dtype=torch.long), subset=[0, 1])
    assert empty["n"] == 0 and math.isnan(empty["top1"])


def test_mean_per_class_recall_is_sklearns_balanced_accuracy_over_present_classes():
    from sklearn.metrics import balanced_accuracy_score

    from clipconv.metrics import mean_per_class_recall

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(60, 7, generator=generator)
    labels = torch.tensor([0] * 30 + [2] * 20 + [5] * 7 + [6] * 3)  # imbalanced; classes 1, 3, 4 have no images
    logits[:25, 0] += 3.0  # class 0: mostly right, the small classes mostly wrong: recall ≠ accuracy
    expected = 100.0 * balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    got = mean_per_class_recall(logits, labels)
    accuracy = topk_accuracy(logits, labels)["top1"]
    assert abs(got - expected) <= 256 * torch.finfo(torch.float32).eps * 100.0
    assert abs(got - accuracy) > 1.0  # a different number from top-1 on an imbalanced set
    # restricted to a subset (ImageNet-A/-R): sklearn on the argmax over those columns
    subset = [0, 2, 5, 6]
    restricted = logits[:, subset].argmax(1)
    expected = 100.0 * balanced_accuracy_score(labels.numpy(), torch.tensor(subset)[restricted].numpy())
    assert abs(mean_per_class_recall(logits, labels, subset) - expected) <= 256 * torch.finfo(torch.float32).eps * 100.0
    assert math.isnan(mean_per_class_recall(torch.empty(0, 7), torch.empty(0, dtype=torch.long)))
