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


@pytest.mark.parametrize(("va", "vb"), [(-128, -128), (-128, 127), (127, -128), (127, 127)])
def test_cpu_extremes_at_k_max(va: int, vb: int) -> None:
    a = torch.full((2, K_MAX), va, dtype=torch.int8)
    b = torch.full((K_MAX, 3), vb, dtype=torch.int8)
    expected = torch.full((2, 3), va * vb * K_MAX, dtype=torch.int32)
    assert torch.equal(int8_matmul(a, b, backend="torch"), expected)


def test_cpu_overflow_beyond_k_max_raises() -> None:
    a = torch.full((1, K_MAX + 1), -128, dtype=torch.int8)
    with pytest.raises(OverflowError, match="int32"):
        int8_matmul(a, a.T, backend="torch")


def test_cpu_path_uses_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU backend="torch" is torch._int_mm plus the epilogue (issue 9), not a float64 GEMM."""
    from qbook.intmath import _int_mm_on_cpu

    assert _int_mm_on_cpu()
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: calls.append(x.shape) or int_mm(x, y))
    a, b = _operands(3, 5, 2)
    int8_matmul(a, b, backend="torch")
    int8_matmul(a, b, 0.5, 0.25, backend="auto")
    assert calls == [(3, 5), (3, 5)]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_epilogue_is_the_float32_composition(
    out_dtype: torch.dtype, per_channel: bool, with_bias: bool
) -> None:
    """(10.2) in float32, in the kernel's order: acc * a_scale, then * b_scale, then + bias, then the cast."""
    M, K, N = 17, 300, 9
    a, b = _operands(M, K, N, seed=7)
    gen = torch.Generator().manual_seed(8)
    a_scale = torch.rand(M, generator=gen) / 100 + 1e-4 if per_channel else 0.0123
    b_scale = torch.rand(N, generator=gen) / 100 + 1e-4 if per_channel else 0.0456
    bias = torch.randn(N, generator=gen) if with_bias else None
    y = int8_matmul(a, b, a_scale, b_scale, bias, out_dtype=out_dtype, backend="torch")
    acc = (a.long() @ b.long()).float()
    expected = acc * torch.as_tensor(a_scale, dtype=torch.float32).reshape(-1, 1)
    expected = expected * torch.as_tensor(b_scale, dtype=torch.float32).reshape(1, -1)
    if bias is not None:
        expected = expected + bias
    assert torch.equal(y, expected.to(out_dtype))


def test_cpu_requantize_is_the_float32_composition() -> None:
    M, K, N = 5, 64, 7
    a, b = _operands(M, K, N, seed=9)
    a_scale, b_scale, bias = torch.full((M,), 0.02), torch.linspace(0.01, 0.03, N), torch.linspace(-1, 1, N)
    q = int8_matmul(a, b, a_scale, b_scale, bias, backend="torch", out_scale=0.37, out_zero_point=-3)
    y = (a.long() @ b.long()).float() * a_scale[:, None] * b_scale[None, :] + bias
    expected = (torch.round(y / torch.tensor(0.37)) - 3).clamp(-128, 127).to(torch.int8)
    assert q.dtype == torch.int8 and torch.equal(q, expected)


def test_cpu_path_on_every_layout() -> None:
    """Size-1 dimensions with odd strides (which torch 2.13's CPU _int_mm misreads) give the exact product."""
    for M, K, N in ((1, 1, 2), (3, 1, 2), (1, 2, 1), (2, 3, 1), (1, 8, 1)):
        a, b = _operands(M, K, N, seed=M * 100 + K * 10 + N)
        for x in (a, a.T.clone(memory_format=torch.contiguous_format).T):
            for y in (b, b.T.clone(memory_format=torch.contiguous_format).T):  # K = 1: (1, N), strides (1, 1)
                assert torch.equal(int8_matmul(x, y, backend="torch"), (x.long() @ y.long()).int())


def test_cpu_path_with_broadcast_and_overlapping_operands() -> None:
    base = torch.arange(64 * 64 + 64).remainder(256).sub(128).to(torch.int8)
    a = base.as_strided((64, 64), (24, 1))  # rows overlap
    b = base[:40].reshape(1, 40).expand(64, 40)  # strides (0, 1)
    assert torch.equal(int8_matmul(a, b, backend="torch"), (a.long() @ b.long()).int())
