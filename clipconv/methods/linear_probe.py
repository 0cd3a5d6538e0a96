"""Linear-probe CLIP as CoOp's `lpclip` runs it: L-BFGS logistic regression on raw frozen image features.

Reference protocol (KaiyangZhou/CoOp lpclip/, whose numbers are the "LP CLIP" rows of the CoOp/CoCoOp
papers and of Convpass's Table 2): scikit-learn `LogisticRegression(solver="lbfgs", max_iter=1000)` on
the RAW image-encoder output (no L2 normalization); the inverse regularization C is chosen on
validation accuracy by
  1. a grid 1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6 — the first best in that order wins (largest C on ties);
  2. `bisection_steps` (8) steps over the range [c/10, 10·c] around it: fit C at both ends, keep the
     better end (ties keep the left, smaller C), and continue on the half of the log10-range on that side
     (left kept: [left, midpoint]; right kept: [midpoint, right]). The C kept at the LAST step is the
     result (not the best C ever tried), as in the reference.

Where we differ on purpose: the validation images come from train (ctx.val, or — when it is empty — a
stratified fold of the K-shot set, `holdout` per class, with the final model refit on the whole K-shot
set), never from a test set (lpclip draws ImageNet's few-shot val from the test set). With one shot per
class nothing can be held out and `default_C` is used.
`normalize=True` fits on L2-normalized features instead (as CLIP_benchmark's probe does); it is a
named option, not the reference, and does not reproduce the published LP numbers.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipconv.config import non_negative, positive
from clipconv.methods.base import PAPER_AND_DEMO, FitContext, MethodConfig, config_from, option, register_method
from clipconv.methods.frozen import FrozenEncoderMethod, require_features
from clipconv.methods.zero_shot import ZeroShot
from clipconv.runtime.jsontypes import JSONObject

__all__ = ["LinearProbe", "LinearProbeConfig", "make_classifier", "search_C", "lpclip_search", "COARSE_GRID"]

#: lpclip's initial C grid, in its order (largest first: np.argmax's first best is the largest C)
COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeConfig(MethodConfig):
    C: Optional[float] = option(None, check=positive, help="fixed inverse regularization strength (skips the search)")
    max_iter: int = option(1000, check=positive, help="L-BFGS iterations (lpclip: 1000)")
    bisection_steps: int = option(8, check=non_negative,
                                  help="refinement steps after the C grid (lpclip: --num_step 8)")
    normalize: bool = option(False, help="fit on L2-normalized features (not the reference: lpclip uses raw "
                                         "features, which reproduce the published LP numbers)")
    holdout: int = option(4, check=positive,
                          help="images per class held out of the K-shot set for the C search when there is "
                               "no validation split (lpclip's val uses 4 per class at 8/16 shots)")
    default_C: float = option(0.316, check=positive,
                              help="C used when nothing can be held out (1 shot, no validation split)")


def make_classifier(C: float, max_iter: int):
    """The scikit-learn model the probe fits (a module-level factory so tests can spy on it)."""
    from sklearn.linear_model import LogisticRegression  # heavy (~1 s); the linear probe only

    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)


def lpclip_search(score: Callable[[float], float], bisection_steps: int = 8,
                  grid: Sequence[float] = COARSE_GRID) -> tuple[float, list[tuple[float, float]]]:
    """lpclip's C search driven by `score(C)` (validation accuracy); returns (C, [(C, score) per call]).

    Grid: the first best in `grid` order. Then each step scores both ends of [left, right] (initially
    [c/10, 10·c]); the better end is kept (ties → left) and the next range is the half of the
    log10-range on the kept side. The result is the end kept at the last step.
    """
    trace: list[tuple[float, float]] = []

    def scored(C: float) -> float:
        value = score(C)
        trace.append((C, value))
        return value

    grid_scores = [scored(C) for C in grid]
    peak = grid[int(np.argmax(grid_scores))]
    chosen = peak
    low, high = math.log10(peak) - 1.0, math.log10(peak) + 1.0
    for _ in range(bisection_steps):
        left_C, right_C = 10.0 ** low, 10.0 ** high
        left, right = scored(left_C), scored(right_C)
        middle = 0.5 * (low + high)
        if left < right:
            chosen, low = right_C, middle
        else:
            chosen, high = left_C, middle
    return chosen, trace


def search_C(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             max_iter: int = 1000, bisection_steps: int = 8) -> tuple[float, dict[float, float]]:
    """lpclip's search with scikit-learn fits on (x_train, y_train) scored on (x_val, y_val);
    returns (C, {C: validation accuracy}). Each distinct C is fitted once (fits are deterministic)."""
    scores: dict[float, float] = {}

    def score(C: float) -> float:
        if C not in scores:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings at extreme C are expected
                model = make_classifier(C, max_iter).fit(x_train, y_train)
            scores[C] = float((model.predict(x_val) == y_val).mean())
        return scores[C]

    chosen, _ = lpclip_search(score, bisection_steps)
    return chosen, scores


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
    wise_start_is_zero_shot = True  # WiSE-FT's zero-shot head as θ₀ (docs/robustness.md)
    """Logistic regression on raw frozen features (lpclip); C searched on validation data from train."""

    config_class = LinearProbeConfig
    presets = PAPER_AND_DEMO
    reference_templates = None  # no text side
    label = "LP CLIP"
    table2_order = 2
    clip_benchmark_task = "linear_probe"  # CLIP_benchmark's few-shot task
    #: the Convpass paper's Table 2 (ViT-B/16 CLIP, 16 shots), top-1 %
    published = {"imagenet": 65.85, "imagenet_v2": 56.26, "imagenet_sketch": 34.77, "imagenet_a": 35.68,
                 "imagenet_r": 58.43}

    def __init__(self, config: Optional[LinearProbeConfig] = None, **options: object) -> None:
        self.config = config_from(LinearProbeConfig, config, options)
        self.chosen_C: Optional[float] = None
        self.search_source = ""
        self.val_accuracy: Optional[float] = None
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        self._fit_ctx: Optional[FitContext] = None  # for the zero-shot endpoint of clipconv.wise
        self._endpoints: Optional[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = None
        self._mixed: Optional[dict[str, torch.Tensor]] = None

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        """The features the classifier sees: raw (reference) or L2-normalized (`normalize=True`)."""
        features = features.float()
        return F.normalize(features, dim=-1) if self.config.normalize else features

    def _numpy(self, features: torch.Tensor) -> np.ndarray:
        return self._prepare(features).numpy().astype(np.float64)

    def fit(self, ctx: FitContext) -> JSONObject:
        cfg = self.config
        self._bind(ctx)
        store = require_features(ctx)
        feats, labels = store.encode(ctx.data_root, ctx.train, desc="linear probe: train", with_labels=True)
        if len(feats) == 0:
            raise ValueError("linear_probe: the training split has no decodable images")
        x, y = self._numpy(feats), labels.numpy()
        if len(np.unique(y)) < 2:
            raise ValueError("linear_probe needs at least two classes in the training split")
        if cfg.C is not None:
            self.chosen_C, self.search_source = float(cfg.C), "given"
        elif len(ctx.val):
            val_feats, val_labels = store.encode(ctx.data_root, ctx.val, desc="linear probe: val", with_labels=True)
            self.chosen_C, scores = search_C(x, y, self._numpy(val_feats), val_labels.numpy(),
                                             cfg.max_iter, cfg.bisection_steps)
            self.val_accuracy, self.search_source = 100.0 * scores[self.chosen_C], "ctx.val"
        else:
            fit_pos, val_pos = _holdout_fold(y.tolist(), cfg.holdout, ctx.seed)
            if not val_pos or len(np.unique(y[fit_pos])) < 2:
                self.chosen_C, self.search_source = cfg.default_C, "default (nothing to hold out)"
                ctx.log(f"linear_probe: no validation images; using default C = {cfg.default_C}")
            else:
                self.chosen_C, scores = search_C(x[fit_pos], y[fit_pos], x[val_pos], y[val_pos],
                                                 cfg.max_iter, cfg.bisection_steps)
                self.val_accuracy = 100.0 * scores[self.chosen_C]
                self.search_source = f"held-out train fold ({len(val_pos)} images)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make_classifier(self.chosen_C, cfg.max_iter).fit(x, y)
        self._store(model, num_classes=len(ctx.classnames))
        self._fit_ctx, self._endpoints, self._mixed = ctx, None, None
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
        if self._mixed is not None:
            return self._mixed_logits(features.to(self.weight.device))
        return self._prepare(features.to(self.weight.device)) @ self.weight.t() + self.bias

    # ----- weight-space interpolation (clipconv.wise) ---------------------------------------------
    # One linear map on [normalize(f), f]: weight_normalized (C, D) acts on L2-normalized features,
    # weight_raw (C, D) on raw features, plus bias. θ₀ is WiSE-FT's zero-shot head (logit scale × text
    # embeddings on normalized features, zero bias), θ₁ the probe (on raw features — the reference — or on
    # normalized ones with normalize=True, where θ(α) is a plain interpolation of one head).
    def interpolation_endpoints(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.weight is None or self._fit_ctx is None:
            raise RuntimeError("fit 'linear_probe' before interpolating")
        if self._endpoints is None:

            zero_shot = ZeroShot()
            zero_shot.fit(self._fit_ctx)  # text side only: the run's (or the reference) zero-shot templates
            text = zero_shot.weights.to(self.weight.device).float()
            zeros = torch.zeros_like(self.weight)
            theta0 = {"weight_normalized": zero_shot.logit_scale * text, "weight_raw": zeros.clone(),
                      "bias": torch.zeros_like(self.bias)}
            trained = (self.weight.clone(), zeros.clone()) if self.config.normalize else (zeros.clone(), self.weight.clone())
            theta1 = {"weight_normalized": trained[0], "weight_raw": trained[1], "bias": self.bias.clone()}
            self._endpoints = (theta0, theta1)
        return self._endpoints

    def load_interpolated(self, state: dict[str, torch.Tensor]) -> None:
        self._mixed = {name: tensor.to(self.weight.device) for name, tensor in state.items()}
        # terms whose weight is all zero are skipped, so θ₁ scores exactly as the fitted probe does
        self._mixed_terms = [name for name in ("weight_normalized", "weight_raw") if bool(self._mixed[name].any())]

    def _mixed_logits(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        inputs = {"weight_normalized": F.normalize(features, dim=-1), "weight_raw": features}
        total = None
        for name in self._mixed_terms:
            term = inputs[name] @ self._mixed[name].t()
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros(len(features), self._mixed["bias"].shape[0], device=features.device)
        return total + self._mixed["bias"]

    def trainable_count(self, spec) -> int:
        """A weight row and a bias per class over the image features: C·(D + 1)."""
        return spec.classes * (spec.embed_dim + 1)

    def summary(self) -> JSONObject:
        out: JSONObject = {"C": self.chosen_C, "C_source": self.search_source,
                          "features": "l2-normalized" if self.config.normalize else "raw"}
        if self.val_accuracy is not None and not math.isnan(self.val_accuracy):
            out["val_top1"] = self.val_accuracy
        return out
