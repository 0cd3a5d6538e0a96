"""Linear-probe CLIP: L-BFGS logistic regression on L2-normalized frozen features (CLIP §3.2; CoOp's lpclip).

The inverse regularization strength C is chosen on a validation split drawn from train, never on a
test set: a coarse grid 1e6, 1e4, …, 1e-6 followed by `bisection_steps` refinements in log10 space
(each step tries the midpoints on both sides of the current best and halves the step). When
ctx.val is empty a stratified fold of the K-shot train set (`holdout` per class, at least one image
left for training) is held out for the search only; the final model is refit on all of ctx.train.
With one shot per class nothing can be held out and `default_C` is used.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import FitContext, register_method
from .frozen import FrozenEncoderMethod, require_features

__all__ = ["LinearProbe", "make_classifier", "search_C"]

COARSE_EXPONENTS = (6, 4, 2, 0, -2, -4, -6)


def make_classifier(C: float, max_iter: int):
    """The scikit-learn model the probe fits (a module-level factory so tests can spy on it)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x) == y).mean())


def search_C(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             max_iter: int = 1000, bisection_steps: int = 8,
             coarse: Sequence[int] = COARSE_EXPONENTS) -> tuple[float, dict[float, float]]:
    """Best C by validation accuracy (ties → stronger regularization); returns (C, {C: accuracy})."""
    scores: dict[float, float] = {}

    def score(exponent: float) -> float:
        C = 10.0 ** exponent
        if C not in scores:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings at extreme C are expected
                model = make_classifier(C, max_iter).fit(x_train, y_train)
            scores[C] = _accuracy(model, x_val, y_val)
        return scores[C]

    ordered = sorted(coarse)  # ascending exponent: ties keep the smallest C
    best = max(ordered, key=lambda e: (score(e), -e))
    step = (max(ordered) - min(ordered)) / max(len(ordered) - 1, 1) / 2
    for _ in range(bisection_steps):
        candidates = [best - step, best, best + step]
        best = max(candidates, key=lambda e: (score(e), -e))
        step /= 2
    return 10.0 ** best, scores


def _holdout_fold(labels: Sequence[int], holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, val) positions: up to `holdout` per class to val, always ≥ 1 left to train."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[int(label)].append(position)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(by_class):
        positions = list(rng.permutation(by_class[label]))
        take = min(holdout, len(positions) - 1)
        val += positions[:take]
        train += positions[take:]
    return sorted(train), sorted(val)


@register_method("linear_probe")
class LinearProbe(FrozenEncoderMethod):
    """Logistic regression on normalized features; C searched on validation data from train.

    Options: `C` (fixed, skips the search), `max_iter`, `bisection_steps` (8 as in CoOp; fewer is
    cheaper), `holdout` (per-class images held out when ctx.val is empty), `default_C`.
    """

    def __init__(self, C: Optional[float] = None, max_iter: int = 1000, bisection_steps: int = 8,
                 holdout: int = 4, default_C: float = 0.316) -> None:
        self.C = C
        self.max_iter = max_iter
        self.bisection_steps = bisection_steps
        self.holdout = holdout
        self.default_C = default_C
        self.chosen_C: Optional[float] = None
        self.search_source = ""
        self.val_accuracy: Optional[float] = None
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    @staticmethod
    def _numpy(features: torch.Tensor) -> np.ndarray:
        return F.normalize(features.float(), dim=-1).numpy().astype(np.float64)

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        self._bind(ctx)
        store = require_features(ctx)
        feats, labels = store.encode(ctx.data_root, ctx.train, desc="linear probe: train", with_labels=True)
        if len(feats) == 0:
            raise ValueError("linear_probe: the training split has no decodable images")
        x, y = self._numpy(feats), labels.numpy()
        if len(np.unique(y)) < 2:
            raise ValueError("linear_probe needs at least two classes in the training split")
        if self.C is not None:
            self.chosen_C, self.search_source = float(self.C), "given"
        elif len(ctx.val):
            val_feats, val_labels = store.encode(ctx.data_root, ctx.val, desc="linear probe: val", with_labels=True)
            self.chosen_C, scores = search_C(x, y, self._numpy(val_feats), val_labels.numpy(),
                                             self.max_iter, self.bisection_steps)
            self.val_accuracy, self.search_source = 100.0 * scores[self.chosen_C], "ctx.val"
        else:
            fit_pos, val_pos = _holdout_fold(y.tolist(), self.holdout, ctx.seed)
            if not val_pos or len(np.unique(y[fit_pos])) < 2:
                self.chosen_C, self.search_source = self.default_C, "default (nothing to hold out)"
                ctx.log(f"linear_probe: no validation images; using default C = {self.default_C}")
            else:
                self.chosen_C, scores = search_C(x[fit_pos], y[fit_pos], x[val_pos], y[val_pos],
                                                 self.max_iter, self.bisection_steps)
                self.val_accuracy = 100.0 * scores[self.chosen_C]
                self.search_source = f"held-out train fold ({len(val_pos)} images)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make_classifier(self.chosen_C, self.max_iter).fit(x, y)
        self._store(model, num_classes=len(ctx.classnames))
        ctx.log(f"linear_probe: C = {self.chosen_C:.4g} ({self.search_source})")
        return self.summary()

    def _store(self, model, num_classes: int) -> None:
        """Copy sklearn's decision function into a (C, D) weight and bias over all run classes."""
        coef, intercept, classes = model.coef_, model.intercept_, model.classes_
        if len(classes) == 2:  # binary: sklearn keeps one row scoring class 1 against class 0
            coef = np.stack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        weight = torch.zeros(num_classes, coef.shape[1], dtype=torch.float32)
        bias = torch.full((num_classes,), -1e4, dtype=torch.float32)  # classes never seen cannot win
        index = torch.as_tensor(classes.astype(np.int64))
        weight[index] = torch.as_tensor(coef, dtype=torch.float32)
        bias[index] = torch.as_tensor(intercept, dtype=torch.float32)
        self.weight, self.bias = weight.to(self._device), bias.to(self._device)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("linear_probe must be fitted before scoring")
        return F.normalize(features.float().to(self.weight.device), dim=-1) @ self.weight.t() + self.bias

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"C": self.chosen_C, "C_source": self.search_source}
        if self.val_accuracy is not None and not math.isnan(self.val_accuracy):
            out["val_top1"] = self.val_accuracy
        return out
