"""Tests of qbook.kernels.int8_matmul with backend="torch": argument checks and the exact CPU path."""

from __future__ import annotations

import math

import pytest
import torch

from qbook.kernels import K_MAX, int8_matmul


def _operands(M: int = 2, K: int = 3, N: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), generator=gen, dtype=torch.int8)
    return a, b


# --------------------------------------------------------------------------------------------------------
# Regression tests (issue 8, section 5): scales and bias that a serious library refuses
# --------------------------------------------------------------------------------------------------------

BAD_SCALES = [math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1e300, 1e-300]


@pytest.mark.parametrize("value", BAD_SCALES)
@pytest.mark.parametrize("which", ["a_scale", "b_scale"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_bad_scale_is_refused(value: float, which: str, as_tensor: bool) -> None:
    """NaN, inf, negative and zero scales (also after the cast to float32: 1e300 -> inf, 1e-300 -> 0)."""
    a, b = _operands()
    n = 2 if which == "a_scale" else 4
    scale: object = torch.tensor([1.0] * (n - 1) + [value], dtype=torch.float64) if as_tensor else value
    scales = {"a_scale": 0.5, "b_scale": 0.25, which: scale}
    index = n - 1 if as_tensor else 0
    message = rf"{which} must be finite and > 0 in float32, got .* at index {index}"
    with pytest.raises(ValueError, match=message):
        int8_matmul(a, b, **scales, backend="torch")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300])
def test_bad_bias_is_refused(value: float) -> None:
    a, b = _operands()
    bias = torch.tensor([0.0, value, 1.0, -2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="bias must be finite in float32, got .* at index 1"):
        int8_matmul(a, b, 0.5, 0.25, bias, backend="torch")


def test_good_scales_and_bias_still_work() -> None:
    a, b = _operands()
    bias = torch.tensor([0.0, -1.0, 1e30, -0.0])
    y = int8_matmul(a, b, torch.tensor([0.5, 2.0]), 0.25, bias, backend="torch")
    expected = (a.long() @ b.long()).float() * torch.tensor([[0.5], [2.0]]) * 0.25 + bias
    assert torch.equal(y, expected)


# --------------------------------------------------------------------------------------------------------
# The CPU path is exact
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("M", "K", "N"), [(1, 1, 1), (1, 384, 384), (3, 7, 5), (17, 64, 9), (32, 1536, 8)])
def test_cpu_int32_product_is_exact(M: int, K: int, N: int) -> None:
    a, b = _operands(M, K, N, seed=M + K + N)
    assert torch.equal(int8_matmul(a, b, backend="torch"), (a.long() @ b.long()).int())


@pytest.mark.parametrize(("va", "vb"), [(-128, -128), (-128, 127), (127, 127)])
def test_cpu_extremes_at_k_max(va: int, vb: int) -> None:
    a = torch.full((2, K_MAX), va, dtype=torch.int8)
    b = torch.full((K_MAX, 3), vb, dtype=torch.int8)
    expected = torch.full((2, 3), va * vb * K_MAX, dtype=torch.int32)
    assert torch.equal(int8_matmul(a, b, backend="torch"), expected)


def test_cpu_overflow_beyond_k_max_raises() -> None:
    a = torch.full((1, K_MAX + 1), -128, dtype=torch.int8)
    with pytest.raises(OverflowError, match="int32"):
        int8_matmul(a, a.T, backend="torch")
