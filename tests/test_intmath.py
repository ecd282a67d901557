"""Tests of qbook.intmath against independent references: Python integers and the published C++ code."""

from __future__ import annotations

import inspect
import itertools
import math
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbook import intmath
from qbook.intmath import (
    INT32_MAX,
    INT32_MIN,
    accumulate,
    accumulate_steps,
    accumulator_bits,
    dequantize_acc,
    int_matmul,
    int_matmul_expanded,
    max_safe_k,
    multiply_by_quantized_multiplier,
    product_bits,
    quantize_bias,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    requantize_float,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    zero_point_terms,
)

# --------------------------------------------------------------------------------------------------------
# References: Python integers mimicking the C++ int32/int64 semantics of gemmlowp and TFLite
# --------------------------------------------------------------------------------------------------------


def wrap32(x: int) -> int:
    """static_cast<int32_t> of an integer: two's-complement wrap-around."""
    return (x + 2**31) % 2**32 - 2**31


def cpp_div(n: int, d: int) -> int:
    """C++ integer division: truncation toward zero."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def ref_srdhm(a: int, b: int) -> int:
    overflow = a == b and a == INT32_MIN
    ab_64 = a * b
    nudge = (1 << 30) if ab_64 >= 0 else (1 - (1 << 30))
    ab_x2_high32 = wrap32(cpp_div(ab_64 + nudge, 1 << 31))
    return INT32_MAX if overflow else ab_x2_high32


def ref_rdbpot(x: int, exponent: int) -> int:
    assert 0 <= exponent <= 31
    mask = wrap32((1 << exponent) - 1)
    remainder = wrap32(x & mask)  # Python's & on negative ints is two's complement with infinite sign bits
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return wrap32((x >> exponent) + (1 if remainder > threshold else 0))


def ref_mbqm(x: int, quantized_multiplier: int, shift: int) -> int:
    left_shift = shift if shift > 0 else 0
    right_shift = 0 if shift > 0 else -shift
    return ref_rdbpot(ref_srdhm(wrap32(x * (1 << left_shift)), quantized_multiplier), right_shift)


def ref_mbqm_single(x: int, quantized_multiplier: int, shift: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier built with TFLITE_SINGLE_ROUNDING."""
    assert quantized_multiplier >= 0 and -31 <= shift <= 30
    total_shift = 31 - shift
    round_ = 1 << (total_shift - 1)
    result = (x * quantized_multiplier + round_) >> total_shift  # int64 arithmetic shift
    assert INT32_MIN <= result <= INT32_MAX
    return result


def ref_quantize_multiplier(m: float) -> tuple[int, int]:
    if m == 0:
        return 0, 0
    q, shift = math.frexp(m)
    exact = Fraction(q) * 2**31
    q_fixed = math.floor(exact + Fraction(1, 2))  # std::round: half away from zero (q > 0)
    assert q_fixed <= 2**31
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def ref_matmul(a: torch.Tensor, b: torch.Tensor, za: object = 0, zb: object = 0) -> list[list[int]]:
    """sum_k (a_ik - za_i)(b_kj - zb_j) in Python integers."""
    M, K = a.shape
    N = b.shape[1]
    al, bl = a.tolist(), b.tolist()
    zal = torch.as_tensor(za).reshape(-1).tolist()
    zbl = torch.as_tensor(zb).reshape(-1).tolist()
    zai = [zal[i % len(zal)] for i in range(M)]
    zbj = [zbl[j % len(zbl)] for j in range(N)]
    return [
        [sum((al[i][k] - zai[i]) * (bl[k][j] - zbj[j]) for k in range(K)) for j in range(N)] for i in range(M)
    ]


EDGE32 = [INT32_MIN, INT32_MIN + 1, -(2**30) - 1, -(2**30), -(2**30) + 1, -2, -1, 0, 1, 2,
          2**30 - 1, 2**30, 2**30 + 1, INT32_MAX - 1, INT32_MAX]  # fmt: skip


def _randint(
    gen: torch.Generator, lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------------------------------------
# int_matmul and the zero-point expansion (chapter 4)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        (torch.int8, -128, 127),
        (torch.uint8, 0, 255),
        (torch.int16, -32768, 32767),
        (torch.int32, -(10**6), 10**6),
    ],
)
def test_int_matmul_equals_python_integers(dtype: torch.dtype, lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for M, K, N in [(1, 1, 1), (3, 17, 5), (8, 64, 4)]:
        a = _randint(gen, lo, hi, (M, K), dtype)
        b = _randint(gen, lo, hi, (K, N), dtype)
        za = int(_randint(gen, lo, hi, (), torch.int64))
        zb_col = _randint(gen, lo, hi, (N,), torch.int64)
        za_row = _randint(gen, lo, hi, (M, 1), torch.int64)
        for zero_points in [
            (0, 0),
            (za, 0),
            (0, zb_col),
            (za_row, zb_col),
            (za_row.flatten(), zb_col[None, :]),
        ]:
            expected = ref_matmul(a, b, *zero_points)
            try:
                got = int_matmul(a, b, *zero_points)
            except OverflowError:
                assert any(not INT32_MIN <= v <= INT32_MAX for row in expected for v in row)
                continue
            assert got.dtype == torch.int32
            assert torch.equal(got, torch.tensor(expected, dtype=torch.int32))
            assert torch.equal(int_matmul_expanded(a, b, *zero_points), got)


def test_int_matmul_extreme_values() -> None:
    a = torch.full((3, 100), -128, dtype=torch.int8)
    b = torch.full((100, 4), -128, dtype=torch.int8)
    assert torch.equal(int_matmul(a, b), torch.full((3, 4), 100 * 16384, dtype=torch.int32))
    a8 = torch.tensor([[0, 255, 255, 0]], dtype=torch.uint8)
    b8 = torch.tensor([[255], [255], [0], [0]], dtype=torch.uint8)
    expected = torch.tensor(ref_matmul(a8, b8, 128, 255), dtype=torch.int32)
    assert torch.equal(int_matmul(a8, b8, a_zero_point=128, b_zero_point=255), expected)
    assert expected.item() == (-128) * 0 + 127 * 0 + 127 * (-255) + (-128) * (-255)


def test_int_matmul_at_the_int32_limit() -> None:
    K = max_safe_k(8, 8, 32)
    assert K == 131071 == (2**31 - 1) // 16384
    a = torch.full((1, K + 1), -128, dtype=torch.int8)  # (1, K + 1)
    assert int_matmul(a[:, :K], a[:, :K].T).item() == K * 16384 == 2147467264
    with pytest.raises(OverflowError, match="2147483648"):
        int_matmul(a, a.T)  # (K + 1) * 16384 = 2^31
    # the most negative products: -128 * 127 = -16256 overflow only beyond 2^31 // 16256 = 132104
    k_neg = 2**31 // 16256
    b = torch.full((k_neg + 1, 1), 127, dtype=torch.int8)
    a = torch.full((1, k_neg + 1), -128, dtype=torch.int8)
    assert int_matmul(a[:, :k_neg], b[:k_neg]).item() == -16256 * k_neg
    with pytest.raises(OverflowError, match="does not fit int32"):
        int_matmul(a, b)


def test_int_matmul_overflow_from_zero_points() -> None:
    a = torch.full((2, 40000), -128, dtype=torch.int8)
    b = torch.full((40000, 3), 127, dtype=torch.int8)
    assert int_matmul(a, b).min().item() == -16256 * 40000
    with pytest.raises(OverflowError, match=r"index \(0, 0\)"):
        int_matmul(a, b, a_zero_point=127, b_zero_point=-128)  # 40000 * (-255 * 255)
    with pytest.raises(OverflowError):
        int_matmul_expanded(a, b, a_zero_point=127, b_zero_point=-128)


def test_int_matmul_exact_when_int64_partial_sums_would_overflow() -> None:
    a = torch.tensor([[INT32_MAX, INT32_MAX, 5]], dtype=torch.int32)
    b = torch.tensor([[INT32_MAX], [-INT32_MAX], [7]], dtype=torch.int32)
    assert int_matmul(a, b).item() == 35
    with pytest.raises(OverflowError):
        int_matmul(a[:, :1], b[:1])
    with pytest.raises(OverflowError, match="int64"):
        zero_point_terms(a, b)
    huge = torch.tensor([[INT32_MIN, INT32_MIN]], dtype=torch.int32)
    with pytest.raises(OverflowError, match="int64"):
        int_matmul(huge, huge.T, a_zero_point=INT32_MAX, b_zero_point=INT32_MAX)


def test_zero_point_terms_separate_offline_and_runtime_parts() -> None:
    gen = torch.Generator().manual_seed(1)
    b = _randint(gen, -127, 127, (32, 6), torch.int8)  # weights (K, N)
    zb = _randint(gen, -5, 5, (6,), torch.int64)
    for seed in range(3):
        a = _randint(torch.Generator().manual_seed(seed), 0, 255, (4, 32), torch.uint8)  # activations (M, K)
        terms = zero_point_terms(a, b, a_zero_point=128, b_zero_point=zb)
        assert terms.b_col_sums.shape == (1, 6) and terms.a_row_sums.shape == (4, 1) and terms.k == 32
        assert torch.equal(terms.b_col_sums, b.long().sum(0, keepdim=True))  # depends on the weights only
        assert torch.equal(terms.a_row_sums, a.long().sum(1, keepdim=True))
        assert torch.equal(terms.ab, torch.tensor(ref_matmul(a, b)))
        assert torch.equal(terms.combine().to(torch.int32), int_matmul(a, b, 128, zb))


@settings(max_examples=60, deadline=None)
@given(
    M=st.integers(1, 5),
    K=st.integers(1, 40),
    N=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    signed=st.booleans(),
)
def test_expanded_equals_direct(M: int, K: int, N: int, seed: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    lo, hi, dtype = (-128, 127, torch.int8) if signed else (0, 255, torch.uint8)
    a, b = _randint(gen, lo, hi, (M, K), dtype), _randint(gen, lo, hi, (K, N), dtype)
    za, zb = _randint(gen, lo, hi, (M,), torch.int64), _randint(gen, lo, hi, (1, N), torch.int64)
    direct = int_matmul(a, b, za, zb)
    assert torch.equal(int_matmul_expanded(a, b, za, zb), direct)
    assert torch.equal(direct, torch.tensor(ref_matmul(a, b, za, zb), dtype=torch.int32))


def test_int_matmul_empty_inner_dimension() -> None:
    empty = int_matmul(torch.zeros(2, 0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8), 5, 7)
    assert torch.equal(empty, torch.zeros(2, 3, dtype=torch.int32))  # an empty sum is 0


def test_int_matmul_bad_input() -> None:
    a = torch.zeros(2, 3, dtype=torch.int8)
    b = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="float32"):
        int_matmul(a.float(), b)
    with pytest.raises(TypeError, match="float64"):
        int_matmul(a, b.double())
    with pytest.raises(TypeError):
        int_matmul(a.bool(), b)
    with pytest.raises(TypeError):
        int_matmul(a.tolist(), b)
    with pytest.raises(ValueError, match="inner dimensions"):
        int_matmul(a, b.T)
    with pytest.raises(ValueError, match="matrices"):
        int_matmul(a[0], b)
    with pytest.raises(ValueError, match=r"per-row of a"):
        int_matmul(a, b, a_zero_point=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"per-row of a"):
        int_matmul(a, b, a_zero_point=torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"per-column of b"):
        int_matmul(a, b, b_zero_point=torch.zeros(4, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="a_zero_point"):
        int_matmul(a, b, a_zero_point=torch.tensor(0.5))
    with pytest.raises(TypeError, match="b_zero_point"):
        int_matmul(a, b, b_zero_point=1.0)
    with pytest.raises(TypeError):
        int_matmul(a, b, a_zero_point=True)
    with pytest.raises(ValueError, match="int32"):
        int_matmul(a, b, a_zero_point=2**31)
    with pytest.raises(ValueError, match="int32"):
        int_matmul(a.long() + 2**40, b)


def test_cpu_path_does_not_import_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("triton", "qbook.kernels"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of these now raises ImportError
    a = torch.ones(2, 3, dtype=torch.int8)
    assert int_matmul(a, a.T).tolist() == [[3, 3], [3, 3]]
    assert int_matmul_expanded(a, a.T, a_zero_point=1).tolist() == [[0, 0], [0, 0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int_matmul_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    a = _randint(gen, -128, 127, (33, 257), torch.int8)
    b = _randint(gen, -128, 127, (257, 65), torch.int8)
    expected = int_matmul(a, b)
    got = int_matmul(a.cuda(), b.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), expected)
    got_zp = int_matmul(a.cuda(), b.cuda(), a_zero_point=3, b_zero_point=-2)
    assert got_zp.is_cuda and torch.equal(got_zp.cpu(), int_matmul(a, b, 3, -2))


# --------------------------------------------------------------------------------------------------------
# Accumulator width (chapter 9)
# --------------------------------------------------------------------------------------------------------


def _brute_bits(values: list[int]) -> int:
    n = 1
    while not all(-(2 ** (n - 1)) <= v <= 2 ** (n - 1) - 1 for v in (min(values), max(values))):
        n += 1
    return n


@pytest.mark.parametrize(
    ("a_bits", "b_bits", "signed"), [(8, 8, True), (4, 8, True), (4, 4, True), (8, 8, False)]
)
def test_bits_against_enumeration(a_bits: int, b_bits: int, signed: bool) -> None:
    def values(n: int) -> np.ndarray:
        return np.arange(-(2 ** (n - 1)), 2 ** (n - 1)) if signed else np.arange(0, 2**n)

    products = np.outer(values(a_bits), values(b_bits))
    lo, hi = int(products.min()), int(products.max())
    assert product_bits(a_bits, b_bits, signed=signed) == _brute_bits([lo, hi])
    for k in [1, 2, 3, 100, 4096, 131071, 131072]:
        assert accumulator_bits(a_bits, b_bits, k, signed=signed) == _brute_bits([k * lo, k * hi])
    for acc_bits in [16, 24, 32]:
        k = max_safe_k(a_bits, b_bits, acc_bits, signed=signed)
        assert accumulator_bits(a_bits, b_bits, k, signed=signed) <= acc_bits if k else True
        assert accumulator_bits(a_bits, b_bits, k + 1, signed=signed) > acc_bits


def test_bits_headline_values() -> None:
    assert product_bits(8, 8) == 16  # (-128)^2 = 16384 > 2^14 - 1
    assert accumulator_bits(8, 8, 131071) == 32 and accumulator_bits(8, 8, 131072) == 33
    assert max_safe_k(8, 8, 32) == 131071 and max_safe_k(8, 8, 16) == 1
    assert max_safe_k(16, 16, 32) == 1  # (-32768)^2 = 2^30 fits int32, two of them do not
    assert max_safe_k(8, 8, 32, signed=False) == (2**31 - 1) // 255**2 == 33025


def test_bad_bits() -> None:
    with pytest.raises(ValueError, match="a_bits"):
        product_bits(1, 8)
    with pytest.raises(ValueError, match="b_bits"):
        product_bits(8, 33)
    with pytest.raises(ValueError, match="k"):
        accumulator_bits(8, 8, 0)
    with pytest.raises(ValueError, match="acc_bits"):
        max_safe_k(8, 8, 65)


def test_accumulate_wrap_and_saturate_against_loops() -> None:
    gen = torch.Generator().manual_seed(3)
    a = _randint(gen, -128, 127, (50, 512), torch.int8)
    b = _randint(gen, -128, 127, (50, 512), torch.int8)
    exact = (a.long() * b.long()).sum(-1)
    wrapped = accumulate(a, b, acc_bits=16, mode="wrap")
    saturated_steps = accumulate_steps(a, b, acc_bits=16, mode="saturate")
    assert saturated_steps.shape == (50, 512)
    for i in range(50):
        assert wrapped[i].item() == ((int(exact[i]) + 2**15) % 2**16) - 2**15
        acc = 0
        for k in range(512):
            acc = min(max(acc + int(a[i, k]) * int(b[i, k]), -(2**15)), 2**15 - 1)
            assert saturated_steps[i, k].item() == acc
    assert torch.equal(accumulate(a, b, acc_bits=32), exact)
    assert (wrapped != exact).float().mean() > 0.5  # int16 is far too narrow for K = 512


def test_accumulate_bad_input() -> None:
    a = torch.ones(4, dtype=torch.int8)
    with pytest.raises(ValueError, match="mode"):
        accumulate(a, a, mode="clip")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        accumulate(a.float(), a)
    with pytest.raises(ValueError, match="K >= 1"):
        accumulate(a[:0], a[:0])
    with pytest.raises(ValueError, match="acc_bits"):
        accumulate(a, a, acc_bits=40)


# --------------------------------------------------------------------------------------------------------
# Fixed-point requantization (chapter 9): bit-exact to the published definitions
# --------------------------------------------------------------------------------------------------------


def test_srdhm_edge_pairs() -> None:
    gen = torch.Generator().manual_seed(4)
    values = EDGE32 + _randint(gen, INT32_MIN, INT32_MAX, (20,), torch.int64).tolist()
    a = torch.tensor(values, dtype=torch.int32)[:, None]
    b = torch.tensor(values, dtype=torch.int32)[None, :]
    got = saturating_rounding_doubling_high_mul(a, b)
    expected = torch.tensor([[ref_srdhm(x, y) for y in values] for x in values], dtype=torch.int32)
    assert torch.equal(got, expected)
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN).item() == INT32_MAX


def test_rdbpot_edges_and_ties() -> None:
    values = list(EDGE32)
    for e in range(1, 31):
        half = 1 << (e - 1)
        ties = [
            3 * (1 << e) + half,
            -3 * (1 << e) - half,
            half,
            -half,
            half - 1,
            -half + 1,
        ]  # ties, near ties
        values += [v for v in ties if INT32_MIN <= v <= INT32_MAX]
    x = torch.tensor(values, dtype=torch.int64)[:, None]
    exponents = torch.arange(32)[None, :]
    got = rounding_divide_by_pot(x, exponents)
    expected = torch.tensor([[ref_rdbpot(v, e) for e in range(32)] for v in values], dtype=torch.int32)
    assert torch.equal(got, expected)
    for bad in (-1, 32):
        with pytest.raises(ValueError, match="exponent"):
            rounding_divide_by_pot(x, bad)


def test_mbqm_random_and_edge_inputs() -> None:
    gen = torch.Generator().manual_seed(5)
    multipliers = [0, 1, 2**30, 2**30 + 1, INT32_MAX - 1, INT32_MAX] + _randint(
        gen, 2**30, INT32_MAX, (6,), torch.int64
    ).tolist()
    for shift in [-31, -30, -17, -8, -1, 0, 1, 7, 29, 30]:
        limit = INT32_MAX >> max(shift, 0)
        acc = EDGE32 if shift <= 0 else [-limit - 1, -limit, -1, 0, 1, limit]
        acc = acc + _randint(gen, -limit - 1, limit, (40,), torch.int64).tolist()
        acc_t = torch.tensor(acc, dtype=torch.int32)[:, None]  # (A, 1)
        got = multiply_by_quantized_multiplier(acc_t, torch.tensor(multipliers)[None, :], shift)  # (A, Mu)
        expected = torch.tensor(
            [[ref_mbqm(x, m, shift) for m in multipliers] for x in acc], dtype=torch.int32
        )
        assert torch.equal(got, expected), shift


def test_mbqm_single_rounding() -> None:
    gen = torch.Generator().manual_seed(9)
    multipliers = [0, 1, 2**30, INT32_MAX] + _randint(gen, 2**30, INT32_MAX, (6,), torch.int64).tolist()
    for shift in [-31, -20, -7, -1, 0, 1, 5, 30]:
        limit = INT32_MAX >> max(shift + 1, 0)  # keep the result inside int32
        acc = [-limit, -1, 0, 1, limit] + _randint(gen, -limit, limit, (40,), torch.int64).tolist()
        if shift <= 0:
            acc += EDGE32
        acc_t = torch.tensor(acc, dtype=torch.int32)[:, None]  # (A, 1)
        got = multiply_by_quantized_multiplier(
            acc_t, torch.tensor(multipliers)[None, :], shift, rounding="single"
        )
        expected = [[ref_mbqm_single(x, m, shift) for m in multipliers] for x in acc]
        assert got.tolist() == expected, shift
    with pytest.raises(OverflowError, match="int32"):
        multiply_by_quantized_multiplier(torch.tensor([INT32_MAX]), INT32_MAX, 30, rounding="single")
    with pytest.raises(ValueError, match="rounding"):
        multiply_by_quantized_multiplier(torch.tensor([1]), 2**30, 0, rounding="nearest")  # type: ignore[arg-type]
    multiplier, shift = quantize_multiplier(0.3)
    double = requantize(torch.tensor([11]), multiplier, shift, 0)
    single = requantize(torch.tensor([11]), multiplier, shift, 0, rounding="single")
    assert (double.item(), single.item()) == (4, 3)  # 0.3 * 11 = 3.3


def test_mbqm_per_channel_equals_per_column_scalars() -> None:
    gen = torch.Generator().manual_seed(6)
    acc = _randint(gen, -(2**20), 2**20, (16, 5), torch.int32)  # (M, N)
    multiplier, shift = quantize_multipliers(
        torch.tensor([0.3, 0.01, 0.0007, 1.7, 2.0**-20], dtype=torch.float64)
    )
    got = multiply_by_quantized_multiplier(acc, multiplier, shift)
    for j in range(5):
        column = multiply_by_quantized_multiplier(acc[:, j], int(multiplier[j]), int(shift[j]))
        assert torch.equal(got[:, j], column)
        assert got[:, j].tolist() == [ref_mbqm(int(x), int(multiplier[j]), int(shift[j])) for x in acc[:, j]]


def test_mbqm_left_shift_overflow_raises() -> None:
    multiplier, shift = quantize_multiplier(3.0)  # shift = 2
    assert shift == 2
    assert multiply_by_quantized_multiplier(torch.tensor([2**28]), multiplier, shift).item() == 3 * 2**28
    with pytest.raises(OverflowError, match="left_shift"):
        multiply_by_quantized_multiplier(torch.tensor([2**29]), multiplier, shift)


def test_mbqm_bad_input() -> None:
    acc = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(TypeError):
        multiply_by_quantized_multiplier(acc.float(), 2**30, 0)
    with pytest.raises(TypeError):
        multiply_by_quantized_multiplier([1, 2], 2**30, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiplier"):
        multiply_by_quantized_multiplier(acc, -1, 0)
    with pytest.raises(ValueError, match="multiplier"):
        multiply_by_quantized_multiplier(acc, 2**31, 0)
    with pytest.raises(TypeError, match="multiplier"):
        multiply_by_quantized_multiplier(acc, 0.5, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift"):
        multiply_by_quantized_multiplier(acc, 2**30, 31)
    with pytest.raises(ValueError, match="shift"):
        multiply_by_quantized_multiplier(acc, 2**30, torch.tensor([0, -32, 0]))
    with pytest.raises(ValueError, match="acc"):
        multiply_by_quantized_multiplier(torch.tensor([2**31]), 2**30, 0)


@pytest.mark.parametrize(
    "m",
    [
        1.0,
        0.5,
        0.1,
        1 / 3,
        0.75,
        1e-3,
        2.0**-31,
        2.0**-32,
        2.0**-33,
        1e-12,
        3.0,
        1234.5,
        1 - 2**-53,
        1 - 2**-40,
    ],
)
def test_quantize_multiplier_against_reference(m: float) -> None:
    multiplier, shift = quantize_multiplier(m)
    assert (multiplier, shift) == ref_quantize_multiplier(m)
    assert isinstance(multiplier, int) and isinstance(shift, int)
    if multiplier:
        assert 2**30 <= multiplier <= INT32_MAX
        assert abs(Fraction(multiplier) * Fraction(2) ** (shift - 31) - Fraction(m)) <= Fraction(m) * 2**-31


def test_quantize_multipliers_equals_scalar_function() -> None:
    gen = torch.Generator().manual_seed(10)
    edges = [0.0, 1.0, 1 - 2**-53, 0.5, 3.0, 2.0**-31, 2.0**-32, 2.0**-33, 1e300, 5e-324, 0.1, 1 / 3]
    m = torch.cat(
        [
            2.0 ** (80 * torch.rand(5000, generator=gen, dtype=torch.float64) - 60),
            torch.tensor(edges, dtype=torch.float64),
        ]
    )
    multiplier, shift = quantize_multipliers(m.reshape(-1, 2))  # any shape
    assert multiplier.shape == shift.shape == (2506, 2)
    expected = [quantize_multiplier(v) for v in m.tolist()]
    assert list(zip(multiplier.flatten().tolist(), shift.flatten().tolist(), strict=True)) == expected
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            quantize_multipliers(torch.tensor([0.5, bad], dtype=torch.float64))


def test_quantize_multiplier_edge_cases() -> None:
    assert quantize_multiplier(1.0) == (2**30, 1)
    assert quantize_multiplier(1 - 2**-53) == (2**30, 1)  # rounds up to 2^31: halved, shift + 1
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-32) == (2**30, -31)
    assert quantize_multiplier(2.0**-33) == (0, 0)  # shift -32 < -31: flushed to zero
    assert quantize_multiplier(torch.tensor(0.5)) == (2**30, 0)
    for bad in (-0.1, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            quantize_multiplier(bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError):
            quantize_multiplier(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        quantize_multipliers(torch.tensor([1, 2]))


@settings(max_examples=300, deadline=None)
@given(
    log2_m=st.floats(-24, 1.9, allow_nan=False),
    acc=st.integers(INT32_MIN, INT32_MAX),
)
def test_requantization_within_one_lsb(log2_m: float, acc: int) -> None:
    m = 2.0**log2_m
    multiplier, shift = quantize_multiplier(m)
    acc = max(min(acc, INT32_MAX >> max(shift, 0)), -(2**31 >> max(shift, 0)))
    got = multiply_by_quantized_multiplier(torch.tensor([acc]), multiplier, shift).item()
    assert got == ref_mbqm(acc, multiplier, shift)
    exact = Fraction(acc) * Fraction(m)
    assert abs(got - exact) < 1  # within one LSB of the real product: floor or ceil of acc * m
    if abs(exact) < 2**30:
        single = multiply_by_quantized_multiplier(
            torch.tensor([acc]), multiplier, shift, rounding="single"
        ).item()
        assert abs(single - exact) <= Fraction(1, 2) + abs(exact) * Fraction(1, 2**31)  # one rounding only
    if abs(exact) < 2**20:
        assert abs(got - exact) <= Fraction(1, 2) + Fraction(1, 2) ** max(-shift, 0) / 2 + Fraction(1, 2**10)


def test_requantize_clamps_adds_zero_point_and_picks_dtype() -> None:
    gen = torch.Generator().manual_seed(7)
    acc = _randint(gen, -(2**16), 2**16, (1000,), torch.int32)
    multiplier, shift = quantize_multiplier(0.0021)
    y = [ref_mbqm(int(x), multiplier, shift) for x in acc]
    q = requantize(acc, multiplier, shift, out_zero_point=-7)
    assert q.dtype == torch.int8
    assert q.tolist() == [min(max(v - 7, -128), 127) for v in y]
    q_u8 = requantize(acc, multiplier, shift, out_zero_point=128, qmin=0, qmax=255)
    assert q_u8.dtype == torch.uint8
    assert q_u8.tolist() == [min(max(v + 128, 0), 255) for v in y]
    assert requantize(acc, multiplier, shift, 0, qmin=-1000, qmax=1000).dtype == torch.int16
    with pytest.raises(ValueError, match="out_zero_point"):
        requantize(acc, multiplier, shift, out_zero_point=200)
    with pytest.raises(ValueError, match="qmin"):
        requantize(acc, multiplier, shift, 0, qmin=5, qmax=4)
    with pytest.raises(TypeError):
        requantize(acc.float(), multiplier, shift, 0)


def test_requantize_float_is_the_float32_epilogue() -> None:
    gen = torch.Generator().manual_seed(8)
    acc = _randint(gen, -(2**20), 2**20, (2000,), torch.int32)
    m = 0.000123
    expected = np.clip(np.round(acc.numpy().astype(np.float32) * np.float32(m)) + 3, -128, 127)
    got = requantize_float(acc, m, out_zero_point=3)
    assert got.dtype == torch.int8 and got.tolist() == expected.astype(np.int64).tolist()
    multiplier, shift = quantize_multiplier(m)
    fixed = requantize(acc, multiplier, shift, out_zero_point=3)
    assert (fixed.long() - got.long()).abs().max() <= 1
    with pytest.raises(ValueError, match="m"):
        requantize_float(acc, -0.5, 0)
    with pytest.raises(TypeError):
        requantize_float(acc.float(), 0.5, 0)


# --------------------------------------------------------------------------------------------------------
# Bias and dequantization (chapter 9)
# --------------------------------------------------------------------------------------------------------


def test_quantize_bias_against_python() -> None:
    bias = torch.tensor([0.5, -0.25, 1e-4, 0.0, 3.3], dtype=torch.float32)
    w_scale = torch.tensor([0.01, 0.005, 0.02, 0.1, 0.003])
    a_scale = 0.021
    q = quantize_bias(bias, a_scale, w_scale)
    assert q.dtype == torch.int32
    expected = [round(float(b) / (a_scale * float(w))) for b, w in zip(bias, w_scale, strict=True)]
    assert q.tolist() == expected  # Python's round is half to even, as torch.round
    back = dequantize_acc(q, a_scale, w_scale)
    assert back.dtype == torch.float32
    assert torch.all((back - bias).abs() <= a_scale * w_scale / 2 * (1 + 1e-5))
    assert quantize_bias(torch.tensor([0.3]), 0.1, 0.2).item() == 15


def test_dequantize_acc() -> None:
    acc = torch.tensor([[7, -3], [2**24 + 1, 0]], dtype=torch.int32)
    got = dequantize_acc(acc, torch.tensor(0.5), torch.tensor([0.25, 2.0]))
    assert torch.equal(got, acc.float() * torch.tensor([0.125, 1.0]))


def test_bias_and_dequantize_bad_input() -> None:
    with pytest.raises(TypeError):
        quantize_bias(torch.tensor([1, 2]), 0.1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        quantize_bias(torch.tensor([float("nan")]), 0.1, 0.1)
    with pytest.raises(ValueError, match="a_scale"):
        quantize_bias(torch.tensor([1.0]), 0.0, 0.1)
    with pytest.raises(ValueError, match="w_scale"):
        quantize_bias(torch.tensor([1.0]), 0.1, torch.tensor([0.1, -1.0]))
    with pytest.raises(OverflowError, match="int32"):
        quantize_bias(torch.tensor([1.0]), 1e-6, 1e-6)
    with pytest.raises(TypeError):
        dequantize_acc(torch.tensor([1.0]), 0.1, 0.1)
    with pytest.raises(TypeError):
        dequantize_acc(torch.tensor([1]), "0.1", 0.1)


# --------------------------------------------------------------------------------------------------------
# Regression tests (issue 8, section 5): shape mismatches name the shapes, never a raw RuntimeError
# --------------------------------------------------------------------------------------------------------


def _z(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: multiply_by_quantized_multiplier(_z(3, 4), torch.full((3,), 2**30), 0),
         r"acc \(3, 4\), multiplier \(3,\), shift \(\)"),
        (lambda: multiply_by_quantized_multiplier(_z(3), 2**30, _z(5)), r"shift \(5,\)"),
        (lambda: requantize(_z(2, 4), 2**30, 0, _z(3)), r"out_zero_point \(3,\)"),
        (lambda: quantize_bias(torch.zeros(3), 0.1, torch.ones(4)),
         r"bias \(3,\), a_scale \(\), w_scale \(4,\)"),
        (lambda: quantize_bias(torch.zeros(3), torch.ones(2), torch.ones(3)), r"a_scale \(2,\)"),
        (lambda: accumulate(_z(3, dtype=torch.int8), _z(4, dtype=torch.int8)), r"a \(3,\), b \(4,\)"),
        (lambda: accumulate_steps(_z(3, 2, dtype=torch.int8), _z(4, 2, dtype=torch.int8)),
         r"a \(3, 2\), b \(4, 2\)"),
        (lambda: dequantize_acc(_z(2, 4), 0.1, torch.ones(3)), r"acc \(2, 4\)"),
        (lambda: requantize_float(_z(2, 4), torch.ones(3), 0), r"m \(3,\)"),
        (lambda: saturating_rounding_doubling_high_mul(_z(3), _z(4)), r"a \(3,\), b \(4,\)"),
        (lambda: rounding_divide_by_pot(_z(3), _z(4)), r"x \(3,\), exponent \(4,\)"),
        (lambda: int_matmul(_z(2, 3, dtype=torch.int8), _z(3, 4, dtype=torch.int8), _z(3)),
         r"got shape \(3,\)"),
        (lambda: int_matmul(_z(2, 3, dtype=torch.int8), _z(4, 4, dtype=torch.int8)), r"\(2, 3\).*\(4, 4\)"),
        (lambda: zero_point_terms(_z(2, 3, dtype=torch.int8), _z(3, 4, dtype=torch.int8), 0, _z(3)),
         r"got shape \(3,\)"),
    ],
)  # fmt: skip
def test_shape_mismatch_is_a_value_error_naming_the_shapes(call: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        call()  # type: ignore[operator]


def test_dtype_mismatch_is_a_type_error() -> None:
    acc = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="multiplier"):
        multiply_by_quantized_multiplier(acc, torch.tensor([0.5]), 0)
    with pytest.raises(TypeError, match="a must be an integer"):
        accumulate(torch.zeros(3), torch.zeros(3, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint16"):
        int_matmul(torch.zeros(2, 3, dtype=torch.uint16), torch.zeros(3, 4, dtype=torch.int8))


def test_numpy_integers_are_integers() -> None:
    a = torch.tensor([[1, 2]], dtype=torch.int8)
    b = torch.tensor([[3], [4]], dtype=torch.int8)
    assert int_matmul(a, b, np.int64(1), np.int32(-1)).item() == (1 - 1) * (3 + 1) + (2 - 1) * (4 + 1)
    assert multiply_by_quantized_multiplier(torch.tensor([1000]), np.int64(2**30), np.int8(0)).item() == 500


# --------------------------------------------------------------------------------------------------------
# The cores the chapters show (issue 8, section 4): math only, no argument checks
# --------------------------------------------------------------------------------------------------------

SHOWN_CORES = [
    intmath.int_matmul_reference,
    intmath._zero_point_terms,
    intmath.ZeroPointTerms.combine,
    intmath._dequantize_acc,
    intmath._accumulate_steps,
    intmath._max_safe_k,
    intmath._quantize_bias,
    intmath._quantize_multiplier,
    intmath._mbqm,
    intmath._rdbpot,
    intmath._srdhm,
]


@pytest.mark.parametrize("core", SHOWN_CORES, ids=lambda f: f.__qualname__)
def test_shown_cores_hold_no_argument_checks(core: object) -> None:
    source = inspect.getsource(core)  # type: ignore[arg-type]
    assert "raise" not in source and "_check" not in source


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_int_matmul_equals_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127) if dtype == torch.int8 else (-3000, 3000)
    a, b = _randint(gen, lo, hi, (5, 33), dtype), _randint(gen, lo, hi, (33, 7), dtype)
    za, zb = _randint(gen, lo, hi, (5, 1), torch.int64), _randint(gen, lo, hi, (1, 7), torch.int64)
    for a_zp, b_zp in ((0, 0), (3, -2), (za, zb), (za, 0), (0, zb)):
        expected = intmath.int_matmul_reference(a, b, a_zp, b_zp)
        assert expected.dtype == torch.int64
        assert torch.equal(int_matmul(a, b, a_zp, b_zp), expected.to(torch.int32))


# --------------------------------------------------------------------------------------------------------
# The fast path through torch._int_mm (issue 9) equals the reference
# --------------------------------------------------------------------------------------------------------

ZERO_POINT_KINDS = ["zero", "small", "per-channel", "large", "huge"]


def _zero_points(kind: str, M: int, N: int, gen: torch.Generator) -> tuple[object, object]:
    if kind == "zero":
        return 0, 0
    if kind == "small":
        return 5, -3
    if kind == "per-channel":
        return _randint(gen, -200, 255, (M,), torch.int32), _randint(gen, -128, 255, (1, N), torch.int64)
    if kind == "large":  # past the int32 bound of the corrections: the int64 tier
        return 2**20 + 1, -(2**19)
    return torch.tensor(INT32_MAX), INT32_MIN  # results out of int32 (OverflowError) unless K is tiny


@pytest.mark.parametrize("a_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("b_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("kind", ZERO_POINT_KINDS)
def test_int_mm_path_equals_the_reference(a_dtype: torch.dtype, b_dtype: torch.dtype, kind: str) -> None:
    gen = torch.Generator().manual_seed(len(kind))
    for M, K, N in ((1, 1, 1), (1, 384, 5), (7, 33, 65), (33, 5, 3)):
        lo_a, hi_a = (0, 255) if a_dtype == torch.uint8 else (-128, 127)
        lo_b, hi_b = (0, 255) if b_dtype == torch.uint8 else (-128, 127)
        a, b = _randint(gen, lo_a, hi_a, (M, K), a_dtype), _randint(gen, lo_b, hi_b, (K, N), b_dtype)
        za, zb = _zero_points(kind, M, N, gen)
        exact = ref_matmul(a, b, za, zb) if kind == "huge" else intmath.int_matmul_reference(
            a, b, torch.as_tensor(za).reshape(-1, 1), torch.as_tensor(zb).reshape(1, -1)).tolist()
        if all(INT32_MIN <= v <= INT32_MAX for row in exact for v in row):
            assert torch.equal(int_matmul(a, b, za, zb), torch.tensor(exact, dtype=torch.int32))
        else:
            with pytest.raises(OverflowError):
                int_matmul(a, b, za, zb)


def test_int_mm_path_is_taken_and_the_fallback_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    a = _randint(gen, 0, 255, (9, 40), torch.uint8)
    b = _randint(gen, -128, 127, (40, 6), torch.int8)
    calls = []
    int_mm = torch._int_mm

    def spy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((x.dtype, tuple(x.shape), tuple(y.shape)))
        return int_mm(x, y)

    assert intmath._int_mm_on_cpu()  # probed before the spy goes in
    monkeypatch.setattr(torch, "_int_mm", spy)
    fast = [int_matmul(a, b, za, zb) for za, zb in ((0, 0), (128, 0), (3, 0), (128, 7), (3, 7))]
    # uint8 a is shifted by 128: only za = 128 needs no column sums of b (no extra row of ones); zb != 0
    # needs the row sums of a, a product with a column of ones
    i8, ab, ab_sums, row_sums = torch.int8, ((9, 40), (40, 6)), ((10, 40), (40, 6)), ((9, 40), (40, 1))
    assert calls == [(i8, *ab_sums), (i8, *ab), (i8, *ab_sums), (i8, *ab), (i8, *row_sums), (i8, *ab_sums),
                     (i8, *row_sums)]  # fmt: skip
    monkeypatch.setattr(intmath, "_int_mm_cpu", False)  # a torch without the CPU kernel
    slow = [int_matmul(a, b, za, zb) for za, zb in ((0, 0), (128, 0), (3, 0), (128, 7), (3, 7))]
    assert len(calls) == 7 and all(torch.equal(x, y) for x, y in zip(fast, slow, strict=True))


def test_int_mm_path_overflow_bound_is_exact() -> None:
    """K (128 + |za|)(128 + |zb|) decides int32 or int64 corrections; both give the exact answer or raise."""
    a_col = torch.full((2, 33000), -128, dtype=torch.int8)
    b_col = torch.full((33000, 3), 127, dtype=torch.int8)
    assert 33000 * 255 * 256 > INT32_MAX  # the int64 tier ...
    got = int_matmul(a_col, b_col, a_zero_point=127, b_zero_point=-128)
    assert torch.equal(got, torch.full((2, 3), 33000 * -255 * 255, dtype=torch.int32))  # ... and it fits
    assert 16000 * 255 * 256 <= INT32_MAX  # the int32 tier, no check needed
    got = int_matmul(a_col[:, :16000], b_col[:16000], a_zero_point=127, b_zero_point=-128)
    assert torch.equal(got, torch.full((2, 3), 16000 * -255 * 255, dtype=torch.int32))
    with pytest.raises(OverflowError, match="does not fit int32"):
        int_matmul(torch.cat([a_col, a_col], 1), torch.cat([b_col, b_col]), 127, -128)


def test_int_mm_path_on_every_layout() -> None:
    """torch 2.13's CPU _int_mm misreads size-1 dimensions with odd strides (a (1, N) matrix with strides
    (1, 1), the transpose of a column); int_matmul hands it canonical strides and stays exact."""
    gen = torch.Generator().manual_seed(12)
    for M, K, N in itertools.product([1, 2, 3], [1, 2, 5], [1, 2, 3]):
        a = _randint(gen, -128, 127, (M, K), torch.int8)
        w = _randint(gen, -128, 127, (N, K), torch.int8)  # (N, K): used as w.T, as nn.Linear does
        a_t = a.T.clone(memory_format=torch.contiguous_format).T  # column-major; odd strides if M or K is 1
        for x in (a, a_t, a.as_strided((M, K), (K if M > 1 else 7, 1 if K > 1 else 3))):
            for y in (w.T, w.T.contiguous(), w.T.clone(memory_format=torch.contiguous_format)):
                for za, zb in ((0, 0), (3, 0), (0, -2), (3, -2)):
                    expected = intmath.int_matmul_reference(x, y, za, zb).to(torch.int32)
                    assert torch.equal(int_matmul(x, y, za, zb), expected), (M, K, N, x.stride(), y.stride())


def test_int_mm_path_with_broadcast_and_overlapping_operands() -> None:
    """Zero strides (expand) and overlapping rows, which _int_mm itself gets wrong, are copied first."""
    gen = torch.Generator().manual_seed(13)
    base = _randint(gen, -128, 127, (64 * 64 + 64,), torch.int8)
    a = base.as_strided((64, 64), (24, 1))  # rows overlap
    b = base[:40].reshape(1, 40).expand(64, 40)  # (64, 40) with strides (0, 1)
    for za, zb in ((0, 0), (3, -2)):
        expected = intmath.int_matmul_reference(a, b, za, zb).to(torch.int32)
        assert torch.equal(int_matmul(a, b, za, zb), expected)
