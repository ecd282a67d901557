"""Tests for qbook.roofline against values derived by hand from the definitions (Chapter 1)."""

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qbook import roofline
from qbook.roofline import (
    A100_SXM_80GB,
    H100_SXM,
    TEBI,
    TERA,
    Device,
    arithmetic_intensity,
    attainable,
    decode_time,
    matmul_bytes,
    matmul_flops,
    ridge_point,
)

DEVICES = [H100_SXM, A100_SXM_80GB]


def test_units():
    assert TERA == 1_000_000_000_000
    assert TEBI == 1_099_511_627_776
    assert roofline.GIGA == 1_000_000_000
    assert roofline.GIBI == 1_073_741_824
    assert round(TEBI / TERA - 1, 4) == 0.0995


def test_datasheet_numbers_are_the_dense_halves_of_the_sparse_ones():
    # H100 SXM5 datasheet (with sparsity): TF32 989, FP16/BF16 1979, FP8/INT8 3958 T(FL)OPS.
    sparse_h100 = {"tf32": 989, "fp16": 1979, "bf16": 1979, "fp8": 3958, "int8": 3958}
    for dtype, sparse in sparse_h100.items():
        assert H100_SXM.peak_ops(dtype) / TERA == pytest.approx(sparse / 2, abs=0.5)
    # A100 80GB SXM datasheet (with sparsity): TF32 312, FP16/BF16 624, INT8 1248, INT4 2496.
    sparse_a100 = {"tf32": 312, "fp16": 624, "bf16": 624, "int8": 1248, "int4": 2496}
    for dtype, sparse in sparse_a100.items():
        assert A100_SXM_80GB.peak_ops(dtype) / TERA == sparse / 2
    assert H100_SXM.bandwidth == 3.35e12
    assert A100_SXM_80GB.bandwidth == 2.039e12


def test_a100_fp16_peak_from_its_tensor_cores():
    # 108 SMs x 1024 dense fp16 FMA/clock/SM x 2 ops per FMA x 1.41 GHz boost (Ampere whitepaper).
    derived = 108 * 1024 * 2 * 1.41e9
    assert A100_SXM_80GB.peak_ops("fp16") == pytest.approx(derived, rel=1e-3)


def test_gemm_intensity_4096_cubed_fp16():
    M = N = K = 4096
    flops = matmul_flops(M, N, K)
    n_bytes = matmul_bytes(M, N, K, 16, 16, 16)
    assert flops == 2 * 4096**3
    assert n_bytes == 3 * 4096**2 * 2
    assert arithmetic_intensity(flops, n_bytes) == pytest.approx(4096 / 3, rel=1e-15)


def test_gemv_intensity_tends_to_one_op_per_byte_at_fp16():
    K = N = 8192
    intensity = arithmetic_intensity(matmul_flops(1, N, K), matmul_bytes(1, N, K, 16, 16, 16))
    # exact: 2KN / (2K + 2KN + 2N)
    assert intensity == pytest.approx(K * N / (K + K * N + N), rel=1e-15)
    assert 0.999 < intensity < 1.0


def test_matmul_bytes_against_naive_count():
    M, N, K = 3, 5, 7
    naive = sum(math.ceil(n * b / 8) for n, b in ((M * K, 8), (K * N, 4), (M * N, 32)))
    assert matmul_bytes(M, N, K, 8, 4, 32) == naive == 21 + 18 + 60


def test_matmul_bytes_fractional_bits_are_exact():
    # int4 weights with one fp16 scale per 128 weights: 4 + 16/128 = 4.125 bits per weight.
    K = N = 4096
    expected = K * 2 + math.ceil(Fraction(K * N) * Fraction(33, 8) / 8) + N * 2
    assert matmul_bytes(1, N, K, 16, 4.125, 16) == expected
    assert matmul_bytes(1, N, K, 16, 4.125, 16) == K * 2 + K * N * 4 // 8 + K * N // 128 * 2 + N * 2


@given(M=st.integers(1, 10**6), N=st.integers(1, 10**6), K=st.integers(1, 10**6))
def test_matmul_flops_is_two_mnk(M, N, K):
    assert matmul_flops(M, N, K) == 2 * M * N * K


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_ridge_point_is_peak_over_bandwidth(device):
    for dtype in device.peak:
        ridge = ridge_point(device, dtype)
        assert ridge == device.peak[dtype] / device.bandwidth
        assert attainable(device, ridge, dtype) == pytest.approx(device.peak[dtype], rel=1e-12)


def test_ridge_points_by_hand():
    assert ridge_point(H100_SXM, "fp16") == pytest.approx(989.4 / 3.35)  # 295.3 FLOP/byte
    assert ridge_point(A100_SXM_80GB, "fp16") == pytest.approx(312 / 2.039)  # 153.0 FLOP/byte


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
@given(i1=st.floats(1e-3, 1e6), i2=st.floats(1e-3, 1e6))
def test_attainable_is_monotone_and_capped(device, i1, i2):
    for dtype, peak in device.peak.items():
        lo, hi = sorted((i1, i2))
        assert attainable(device, lo, dtype) <= attainable(device, hi, dtype) <= peak
        assert attainable(device, lo, dtype) == min(peak, lo * device.bandwidth)


def test_attainable_memory_bound_below_ridge():
    assert attainable(H100_SXM, 1.0, "fp16") == 3.35e12
    assert attainable(H100_SXM, 10_000.0, "int8") == 1978.9e12


def test_decode_time_13b_fp16_on_h100():
    t = decode_time(13e9 * 2, H100_SXM)
    assert t == pytest.approx(26e9 / 3.35e12)
    assert 1 / t == pytest.approx(128.85, abs=0.01)  # tokens/s upper bound


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: matmul_flops(0, 1, 1), "M must be a positive int, got 0"),
        (lambda: matmul_flops(1, -3, 1), "N must be a positive int, got -3"),
        (lambda: matmul_bytes(1, 1, 0, 8, 8, 8), "K must be a positive int, got 0"),
        (lambda: matmul_bytes(1, 1, 1, 0, 8, 8), "a_bits must be positive and finite, got 0"),
        (lambda: matmul_bytes(1, 1, 1, 8, -4, 8), "b_bits must be positive and finite, got -4"),
        (lambda: matmul_bytes(1, 1, 1, 8, 8, float("nan")), "out_bits must be positive and finite, got nan"),
        (lambda: arithmetic_intensity(0, 10), "flops must be positive and finite, got 0"),
        (lambda: arithmetic_intensity(10, -1), "n_bytes must be positive and finite, got -1"),
        (lambda: attainable(H100_SXM, -1.0, "fp16"), "intensity must be positive and finite, got -1.0"),
        (lambda: attainable(H100_SXM, 1.0, "int4"), "no peak for dtype 'int4'"),
        (lambda: ridge_point(A100_SXM_80GB, "fp8"), "no peak for dtype 'fp8'"),
        (lambda: decode_time(0, H100_SXM), "weight_bytes must be positive and finite, got 0"),
        (lambda: decode_time(float("inf"), H100_SXM), "weight_bytes must be positive and finite, got inf"),
        (lambda: Device("x", {}, 1.0, "s"), "needs at least one peak"),
        (lambda: Device("x", {"fp16": 0.0}, 1.0, "s"), "peak of 'fp16' on 'x' must be positive, got 0.0"),
        (lambda: Device("x", {"fp16": 1.0}, -2.0, "s"), "bandwidth of 'x' must be positive, got -2.0"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [2.0, True, "4"])
def test_non_int_sizes_raise_type_error(bad):
    with pytest.raises(TypeError, match="M must be an int"):
        matmul_flops(bad, 1, 1)


def test_device_is_frozen():
    with pytest.raises(AttributeError):
        H100_SXM.bandwidth = 1.0
    with pytest.raises(TypeError):
        H100_SXM.peak["fp16"] = 1.0
