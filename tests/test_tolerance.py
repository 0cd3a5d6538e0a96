"""The tolerance helper itself: a few hundred ulps of the largest |value|, scaling with magnitude."""
from __future__ import annotations

import pytest
import torch
from tolerance import EPS32, assert_close_scaled, differs_beyond_tolerance, scaled_tolerance


def test_tolerance_scales_with_the_largest_value():
    assert scaled_tolerance(torch.tensor([1.0, -4.0]), torch.tensor([2.0])) == 256 * EPS32 * 4.0
    assert scaled_tolerance(torch.zeros(3)) == 0.0  # zeros must match exactly


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_passes_within_and_fails_beyond_the_scaled_tolerance(magnitude):
    expected = torch.tensor([magnitude, -magnitude / 2])
    assert_close_scaled(expected + 100 * EPS32 * magnitude, expected)
    assert not differs_beyond_tolerance(expected + 100 * EPS32 * magnitude, expected)
    with pytest.raises(AssertionError, match="ulps"):
        assert_close_scaled(expected + 1000 * EPS32 * magnitude, expected)
    assert differs_beyond_tolerance(expected + 1000 * EPS32 * magnitude, expected)


def test_explicit_scale_and_shape_mismatch():
    assert_close_scaled(torch.tensor([1e-3]), torch.tensor([1e-3 + 1e-5]), scale=torch.tensor([100.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_close_scaled(torch.zeros(2), torch.zeros(3))
