"""Float tolerances derived from the magnitudes compared, never a bare absolute 1e-6.

`scaled_tolerance(a, b)` is `ulps` float32 machine epsilons of the largest |value| in a and b: float
results that differ only by summation order (chunking, batching, BLAS kernels of another CPU) agree to a
few hundred ulps of the largest value involved.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["EPS32", "scaled_tolerance", "assert_close_scaled", "differs_beyond_tolerance"]

EPS32 = float(torch.finfo(torch.float32).eps)


def _max_abs(value: Any) -> float:
    array = np.abs(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64))
    return float(array.max()) if array.size else 0.0


def scaled_tolerance(*values: Any, ulps: float = 256) -> float:
    """`ulps` float32 epsilons of the largest |value| among `values` (tensors, arrays or numbers)."""
    return ulps * EPS32 * max(_max_abs(value) for value in values)


def _float64(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value),
                           dtype=torch.float64)


def assert_close_scaled(actual: Any, expected: Any, ulps: float = 256, scale: Any = None) -> None:
    """Elementwise |actual − expected| ≤ ulps · eps32 · M, M the largest |value| of actual and expected — or
    of `scale` when given (the magnitude of the terms summed into the values, for results that cancel)."""
    actual_t, expected_t = _float64(actual), _float64(expected)
    assert actual_t.shape == expected_t.shape, f"shape {tuple(actual_t.shape)} != {tuple(expected_t.shape)}"
    tolerance = scaled_tolerance(*((actual_t, expected_t) if scale is None else (scale,)), ulps=ulps)
    worst = float((actual_t - expected_t).abs().max()) if actual_t.numel() else 0.0
    assert worst <= tolerance, (f"max |difference| {worst:.3g} exceeds {ulps} float32 ulps of the largest |value| "
                                f"({tolerance:.3g})")


def differs_beyond_tolerance(a: Any, b: Any, ulps: float = 256) -> bool:
    """True when some element of a and b differs by more than `scaled_tolerance(a, b, ulps)`."""
    a_t, b_t = _float64(a), _float64(b)
    return a_t.shape != b_t.shape or float((a_t - b_t).abs().max()) > scaled_tolerance(a_t, b_t, ulps=ulps)
