"""Tests for qbook.formats: torch's casts and brute-force enumeration of the formats are the references."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbook import formats
from qbook.formats import (
    ALL,
    BF16,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FloatFormat,
    compose,
    decode,
    decompose,
    encode,
    finite_values,
    model_size,
    round_to_format,
    round_to_format_reference,
    ulp,
)

F32_INF = 0x7F800000


def _torch_e4m3_format() -> FloatFormat:
    """FP8_E4M3 as this torch casts it: recent torch saturates overflow to ±448, older versions give NaN."""
    if torch.isnan(torch.tensor([1e6]).to(torch.float8_e4m3fn).float()).item():
        return dataclasses.replace(FP8_E4M3, saturate=False)
    return FP8_E4M3


TORCH_FORMATS = [FP16, BF16, _torch_e4m3_format(), FP8_E5M2]
MX_FORMATS = [FP6_E3M2, FP6_E2M3, FP4_E2M1]


def bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret integers in [0, 2^32) as float32 bit patterns."""
    bits = bits.to(torch.int64)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality, where any NaN equals any NaN (payloads and NaN signs differ between paths)."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    same = (actual.view(torch.int32) == expected.view(torch.int32)) | (nan_a & nan_e)
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].flatten()
        raise AssertionError(
            f"{int((~same).sum())} mismatches, e.g. got {actual.flatten()[bad].tolist()} "
            f"expected {expected.flatten()[bad].tolist()}"
        )


def torch_cast(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return x.to(fmt.torch_dtype).float()


def next_up_down(x: torch.Tensor) -> torch.Tensor:
    """x together with its float32 neighbours on both sides."""
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    return torch.cat([x, torch.nextafter(x, up), torch.nextafter(x, down)])


def grid_and_midpoints(values: torch.Tensor) -> torch.Tensor:
    """Sorted finite values of a format, their midpoints (ties), both ±1 float32 ULP, with both signs."""
    v = torch.unique(values[torch.isfinite(values)].double())
    mid = ((v[1:] + v[:-1]) / 2).float()  # exact: one more bit than the format has
    assert torch.equal(mid.double(), (v[1:] + v[:-1]) / 2)
    pts = next_up_down(torch.cat([v.float(), mid]))
    return torch.cat([pts, -pts])


def special_inputs() -> torch.Tensor:
    nan_bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF800001])
    return torch.cat([
        torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -1.0]),
        bits_to_f32(torch.tensor([1, 2, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x80000001, 0xFF7FFFFF])),
        bits_to_f32(nan_bits),
    ])


@functools.cache
def every_16_bit_value_and_midpoint(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    return torch.cat([values, grid_and_midpoints(values)])


# --- agreement with torch's casts (the fast function and the bit-level reference) ----------------------
ROUNDERS = [round_to_format, round_to_format_reference]


@pytest.mark.parametrize("rounder", ROUNDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_matches_torch_on_strided_sweep_of_all_float32_patterns(fmt, rounder):
    x = bits_to_f32(torch.arange(0, 2**32, 8191))  # ~524k patterns, every exponent and sign
    assert_same_bits(rounder(x, fmt), torch_cast(x, fmt))


@pytest.mark.parametrize("rounder", ROUNDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_matches_torch_on_random_bit_patterns(fmt, rounder):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**31), 2**31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    assert_same_bits(rounder(x, fmt), torch_cast(x, fmt))


@pytest.mark.parametrize("rounder", ROUNDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16], ids=["fp16-patterns", "bf16-patterns"])
def test_matches_torch_on_every_16_bit_pattern_and_midpoint(fmt, source, rounder):
    x = every_16_bit_value_and_midpoint(source)
    assert_same_bits(rounder(x, fmt), torch_cast(x, fmt))


@pytest.mark.parametrize("rounder", ROUNDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", TORCH_FORMATS[2:], ids=lambda f: f.name)
def test_matches_torch_on_every_fp8_value_and_midpoint(fmt, rounder):
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    x = grid_and_midpoints(values)
    assert_same_bits(rounder(x, fmt), torch_cast(x, fmt))
    assert_same_bits(rounder(values, fmt), values)  # representable values are fixed points


@pytest.mark.parametrize("rounder", ROUNDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_matches_torch_on_edge_cases(fmt, rounder):
    top = torch.tensor([fmt.max], dtype=torch.float64)
    spacing_at_max = 2.0 ** (fmt.emax - fmt.mantissa_bits)
    thresholds = torch.cat([top, top + spacing_at_max / 2, top + spacing_at_max, top * 4]).float()
    tiny = torch.tensor([fmt.min_subnormal, fmt.min_subnormal / 2, fmt.min_subnormal * 1.5, fmt.min_normal,
                         fmt.min_normal - fmt.min_subnormal / 2, fmt.min_normal - fmt.min_subnormal]).float()
    x = torch.cat([special_inputs(), next_up_down(thresholds), next_up_down(tiny)])
    x = torch.cat([x, -x])
    assert_same_bits(rounder(x, fmt), torch_cast(x, fmt))


def test_overflow_thresholds_follow_the_formats_rules():
    # IEEE formats: at max + half an ULP the tie goes to the even neighbour, which is the overflow (inf).
    assert round_to_format(torch.tensor(65519.99), FP16).item() == 65504
    assert round_to_format(torch.tensor(65520.0), FP16).item() == math.inf
    assert round_to_format(torch.tensor(61439.0), FP8_E5M2).item() == 57344
    assert round_to_format(torch.tensor(61440.0), FP8_E5M2).item() == math.inf
    # E4M3: 448 is the largest value; saturating by default, NaN without saturation (ml_dtypes' convention).
    assert round_to_format(torch.tensor([500.0, math.inf]), FP8_E4M3).tolist() == [448, 448]
    nonsat = dataclasses.replace(FP8_E4M3, saturate=False)
    out = round_to_format(torch.tensor([464.0, 464.5, math.inf, -1e9]), nonsat)
    assert out[0].item() == 448 and torch.isnan(out[1:]).all()


def test_float32_format_is_the_identity_and_other_input_dtypes_are_converted():
    x = bits_to_f32(torch.arange(0, 2**32, 65537))
    assert torch.equal(round_to_format(x, FP32).view(torch.int32), x.view(torch.int32))
    h = torch.randn(1000, generator=torch.Generator().manual_seed(1)).half()
    assert torch.equal(round_to_format(h, FP8_E5M2), round_to_format(h.float(), FP8_E5M2))
    # float64 goes through float32 first: 1 + 2^-11 + 2^-40 becomes the exact tie 1 + 2^-11, which rounds to
    # even (1.0) although the float64 value lies above the tie (documented double rounding).
    d = torch.tensor([1.0 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to_format(d, FP16).item() == 1.0
    assert round_to_format(0.1, BF16).item() == torch.tensor(0.1).bfloat16().item()


# --- MX formats against brute-force enumeration -------------------------------------------------------
def spec_values(e_bits: int, m_bits: int) -> list[tuple[float, int]]:
    """(value, mantissa field) of every nonnegative code, straight from the OCP MX v1.0 formula."""
    bias = 2 ** (e_bits - 1) - 1
    out = []
    for e in range(2**e_bits):
        for m in range(2**m_bits):
            if e == 0:
                value = 2.0 ** (1 - bias) * (m / 2**m_bits)
            else:
                value = 2.0 ** (e - bias) * (1 + m / 2**m_bits)
            out.append((value, m))
    return out


def brute_force_round(x: np.ndarray, e_bits: int, m_bits: int) -> np.ndarray:
    """Nearest representable value, ties to the even mantissa field, saturating at ±max."""
    table = spec_values(e_bits, m_bits)
    v = np.array([t[0] for t in table])
    odd = np.array([t[1] % 2 for t in table])
    mag = np.minimum(np.abs(x.astype(np.float64)), v.max())
    dist = np.abs(mag[:, None] - v[None, :])
    best = dist.min(axis=1, keepdims=True)
    candidates = np.where(dist == best, odd[None, :], 2)  # prefer an even mantissa among the nearest
    choice = np.argmin(candidates, axis=1)
    return np.copysign(v[choice], x).astype(np.float32)


@pytest.mark.parametrize("fmt", MX_FORMATS, ids=lambda f: f.name)
def test_mx_formats_match_brute_force_enumeration(fmt):
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    values = torch.tensor([t[0] for t in spec_values(e_bits, m_bits)], dtype=torch.float32)
    rng = np.random.default_rng(0)
    random = rng.uniform(-2 * fmt.max, 2 * fmt.max, 20_000).astype(np.float32)
    wide = (rng.standard_normal(5_000) * np.exp2(rng.integers(-20, 20, 5_000))).astype(np.float32)
    x = torch.cat([grid_and_midpoints(values), torch.from_numpy(random), torch.from_numpy(wide),
                   torch.tensor([0.0, -0.0, 1e30, -1e30, math.inf, -math.inf, 1e-30])])
    expected = torch.from_numpy(brute_force_round(x.numpy(), e_bits, m_bits))
    assert_same_bits(round_to_format(x, fmt), expected)
    assert_same_bits(round_to_format_reference(x, fmt), expected)


def test_known_spec_values():
    assert finite_values(FP4_E2M1)[7:].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert (FP6_E2M3.max, FP6_E3M2.max, FP8_E4M3.max, FP8_E5M2.max) == (7.5, 28, 448, 57344)
    assert (FP6_E2M3.min_subnormal, FP6_E3M2.min_subnormal) == (0.125, 0.0625)
    assert FP16.max == 65504 and FP16.min_subnormal == 2**-24 and FP16.min_normal == 2**-14
    assert BF16.max == pytest.approx(3.3895e38, rel=1e-4)
    assert BF16.max == float(torch.finfo(torch.bfloat16).max)
    assert FP32.max == float(torch.finfo(torch.float32).max)
    assert FP32.epsilon == torch.finfo(torch.float32).eps
    for fmt in [FP16, BF16, FP8_E4M3, FP8_E5M2]:
        info = torch.finfo(fmt.torch_dtype)
        assert (fmt.max, fmt.min_normal, fmt.epsilon) == (info.max, info.smallest_normal, info.eps)
        assert fmt.min_subnormal == float(torch.tensor(fmt.min_subnormal).to(fmt.torch_dtype).float())
        assert torch.tensor(fmt.min_subnormal / 2).to(fmt.torch_dtype).float().item() == 0  # tie to even 0
    assert [f.total_bits for f in ALL] == [32, 16, 16, 8, 8, 6, 6, 4]
    assert [f.bias for f in ALL] == [127, 15, 127, 7, 15, 3, 1, 1]


@pytest.mark.parametrize("fmt", [f for f in ALL if f.total_bits <= 8], ids=lambda f: f.name)
def test_finite_values_against_the_spec_formula(fmt):
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    expected = {v for v, _ in spec_values(e_bits, m_bits) if v <= fmt.max}
    expected |= {-v for v in expected}
    assert finite_values(fmt).double().tolist() == sorted(expected)


# --- bit fields ---------------------------------------------------------------------------------------
def torch_fields(x: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, ...]:
    """Bit fields read off torch's own storage of the cast value."""
    y = x.to(fmt.torch_dtype)
    raw = y.view(torch.uint8) if fmt.total_bits == 8 else y.view(torch.int16)
    code = raw.to(torch.int64) & (2**fmt.total_bits - 1)
    m = fmt.mantissa_bits
    return code >> (fmt.total_bits - 1), (code >> m) & (2**fmt.exponent_bits - 1), code & (2**m - 1)


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_decompose_reads_the_same_fields_as_torch_stores(fmt):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2)) * torch.exp2(
        torch.randint(-30, 30, (50_000,), generator=torch.Generator().manual_seed(3)).float())
    tiny = bits_to_f32(torch.arange(0, 2**24, 997))  # float32 subnormals and the first normal binade
    x = torch.cat([x, special_inputs()[:-5], grid_and_midpoints(finite_values(FP8_E4M3)), tiny, -tiny])
    expected = torch_fields(x, fmt)
    got = decompose(x, fmt)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g.to(torch.int64), e)


@pytest.mark.parametrize("fmt", [f for f in ALL if f.total_bits <= 16], ids=lambda f: f.name)
def test_every_code_round_trips_through_decode_and_encode(fmt):
    codes = torch.arange(2**fmt.total_bits)
    values = decode(codes, fmt)
    finite = torch.isfinite(values)
    assert torch.equal(encode(values[finite], fmt), codes[finite])
    assert torch.equal(compose(*decompose(values[finite], fmt), fmt).view(torch.int32),
                       values[finite].view(torch.int32))
    if fmt.torch_dtype is not None:
        view = torch.int16 if fmt.total_bits == 16 else torch.uint8
        stored = codes.to(torch.int32).to(view).view(fmt.torch_dtype).float()
        assert_same_bits(values, stored)


def test_decompose_and_compose_worked_examples():
    assert [int(t) for t in decompose(torch.tensor(0.15625), FP32)] == [0, 124, 1 << 21]
    assert [int(t) for t in decompose(torch.tensor(-math.inf), FP16)] == [1, 31, 0]
    assert [int(t) for t in decompose(torch.tensor(math.nan), FP16)] == [0, 31, 512]
    assert [int(t) for t in decompose(torch.tensor(math.nan), FP8_E4M3)] == [0, 15, 7]
    assert [int(t) for t in decompose(torch.tensor(2.0**-24), FP16)] == [0, 0, 1]
    assert compose(0, 0, 1, FP16).item() == 2.0**-24 and compose(0, 0, 1, BF16).item() == 2.0**-133
    assert compose(0, 31, 0, FP16).item() == math.inf and math.isnan(compose(1, 31, 3, FP16).item())
    assert decode(0x3F800000, FP32).item() == 1.0 and decode(0x7E, FP8_E4M3).item() == 448
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(compose(*decompose(x, FP32), FP32), x)


def test_ulp_matches_torch_spacing():
    x = torch.tensor([1.0, 2.0, 1000.0, 65472.0, 2.0**-20, 0.0, -3.0])
    h = x.abs().half()
    expected = torch.nextafter(h, torch.tensor(math.inf, dtype=torch.half)).float() - h.float()
    assert torch.equal(ulp(x, FP16), expected)
    assert ulp(torch.tensor(65504.0), FP16).item() == 32  # the spacing of the top binade
    assert ulp(torch.tensor(1.0), BF16).item() == BF16.epsilon == 2**-7
    assert math.isnan(ulp(torch.tensor(math.inf), FP16).item())


# --- properties ---------------------------------------------------------------------------------------
finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
fmts = st.sampled_from(ALL)


@settings(max_examples=200, deadline=None)
@given(x=finite_f32, y=finite_f32, fmt=fmts)
def test_rounding_is_idempotent_monotone_and_odd(x, y, fmt):
    a, b = torch.tensor(x), torch.tensor(y)
    ra, rb = round_to_format(a, fmt), round_to_format(b, fmt)
    assert torch.equal(round_to_format(ra, fmt), ra)
    if x <= y:
        assert ra <= rb
    assert torch.equal(round_to_format(-a, fmt).view(torch.int32), (-ra).view(torch.int32))


@settings(max_examples=200, deadline=None)
@given(x=finite_f32, fmt=fmts)
def test_error_is_at_most_half_an_ulp_in_range(x, fmt):
    if abs(x) > fmt.max:
        return
    r = round_to_format(torch.tensor(x), fmt)
    assert abs(x - r.double().item()) <= ulp(torch.tensor(x), fmt).double().item() / 2
    if abs(x) >= fmt.min_normal:  # relative error of normals <= eps / 2
        assert abs(x - r.double().item()) <= abs(x) * fmt.epsilon / 2


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [lambda x: round_to_format(x, FP16), lambda x: decompose(x, FP8_E4M3),
                                lambda x: encode(x, BF16), lambda x: ulp(x, FP16)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_input_is_a_type_error(fn, dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        fn(torch.ones(3, dtype=dtype))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exponent_bits": 0, "mantissa_bits": 3}, "exponent_bits.*got 0"),
        ({"exponent_bits": 9, "mantissa_bits": 3}, "exponent_bits.*got 9"),
        ({"exponent_bits": 4, "mantissa_bits": -1}, "mantissa_bits.*got -1"),
        ({"exponent_bits": 4, "mantissa_bits": 24}, "mantissa_bits.*got 24"),
        ({"exponent_bits": 8, "mantissa_bits": 7, "bias": 200}, "bias=200"),
        ({"exponent_bits": 4, "mantissa_bits": 3, "nan": "sometimes"}, "sometimes"),
        ({"exponent_bits": 4, "mantissa_bits": 3, "has_inf": True, "nan": "all_ones"}, "all_ones"),
        ({"exponent_bits": 2, "mantissa_bits": 1, "has_inf": False, "nan": "none"}, "saturate=True"),
        ({"exponent_bits": 5, "mantissa_bits": 0}, "mantissa_bits >= 1"),
    ],
)
def test_impossible_float_formats_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FloatFormat("bad", **kwargs)


def test_field_and_code_errors():
    with pytest.raises(ValueError, match="exponent field must lie in \\[0, 31\\], got 32"):
        compose(0, 32, 0, FP16)
    with pytest.raises(ValueError, match="mantissa field must lie in \\[0, 7\\], got 8"):
        compose(0, 1, 8, FP8_E4M3)
    with pytest.raises(ValueError, match="sign field must lie in \\[0, 1\\], got -1"):
        compose(torch.tensor([0, -1]), 1, 0, FP16)
    with pytest.raises(TypeError, match="torch.float32"):
        compose(torch.tensor(0.0), 1, 0, FP16)
    with pytest.raises(ValueError, match="got 256"):
        decode(256, FP8_E5M2)
    with pytest.raises(ValueError, match="FP4_E2M1 has no NaN"):
        round_to_format(torch.tensor([1.0, math.nan]), FP4_E2M1)
    with pytest.raises(ValueError, match="FP32 has 32"):
        finite_values(FP32)


# --- model size ---------------------------------------------------------------------------------------
def test_model_size_of_a_13b_model():
    # The lecture notes' Llama-13B table: 52, 26, 13 and 6.5 GB (decimal gigabytes).
    sizes = [model_size(13e9, b) for b in (32, 16, 8, 4)]
    assert sizes == [52 * 10**9, 26 * 10**9, 13 * 10**9, 6_500_000_000]
    assert model_size(3, 4) == 2 and model_size(1, 1) == 1  # partial bytes round up
    n, g = 13_000_000_000, 128
    assert model_size(n, 4, group_size=g) == (n * 4 + -(-n // g) * 16 + 7) // 8
    assert model_size(n, 4, group_size=g, scale_bits=32) > model_size(n, 4, group_size=g)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 8), {}, "n_params must be positive, got 0"),
        ((-5, 8), {}, "got -5"),
        ((100, 0), {}, "bits must be positive, got 0"),
        ((100, -4), {}, "got -4"),
        ((math.inf, 8), {}, "got inf"),
        ((100, 4), {"group_size": 0}, "group_size.*got 0"),
        ((100, 4), {"group_size": 32, "scale_bits": 0}, "scale_bits.*got 0"),
    ],
)
def test_model_size_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_size(*args, **kwargs)


def test_module_exports():
    assert set(formats.__all__) <= set(dir(formats))
    assert set(ALL) == {FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1}


# --- issue 8 regressions ------------------------------------------------------------------------------
def test_compose_mismatched_shapes_and_dtypes_name_them():
    with pytest.raises(ValueError, match=r"\(2,\), \(3,\), \(\)"):
        compose(torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 0, FP16)
    with pytest.raises(TypeError, match="torch.uint16"):
        compose(torch.zeros(2, dtype=torch.uint16), 1, 0, FP16)
    with pytest.raises(TypeError, match="torch.float64"):
        compose(0, torch.ones(2, dtype=torch.float64), 0, FP16)
    with pytest.raises(ValueError, match=r"\[0, 31\], got 1180591620717411303424"):
        compose(0, 2**70, 0, FP16)
    with pytest.raises(TypeError, match="sign must be an integer"):
        compose(object(), 1, 0, FP16)


@pytest.mark.parametrize("bias", [3.5, 3.0, "7", True, None])
def test_float_format_bias_must_be_an_integer(bias):
    if bias is None:
        assert FloatFormat("x", 4, 3).bias == 7
        return
    with pytest.raises(TypeError, match="bias must be an integer"):
        FloatFormat("x", 4, 3, bias=bias)


def test_float_format_accepts_integer_like_bias():
    fmt = FloatFormat("x", 4, 3, bias=np.int64(6), has_inf=False, nan="all_ones", saturate=True)
    assert type(fmt.bias) is int and fmt.bias == 6
    assert round_to_format(torch.tensor([1000.0]), fmt).item() == fmt.max == 896


def test_degenerate_formats_are_rejected():
    # E1M0 whose only non-zero pattern is NaN: no finite nonzero value to round to (it used to round to 1.0)
    with pytest.raises(ValueError, match="no finite nonzero number"):
        FloatFormat("E1M0", 1, 0, has_inf=False, nan="all_ones", saturate=True)
    with pytest.raises(TypeError, match="has_inf must be a bool"):
        FloatFormat("x", 4, 3, has_inf=1)
    with pytest.raises(ValueError, match="exponent_bits"):
        FloatFormat("x", True, 3)


@st.composite
def float_formats(draw) -> FloatFormat:
    """Any valid small format: E, M, bias, special-value style."""
    E = draw(st.integers(1, 5))
    M = draw(st.integers(0, 4))
    style = draw(st.sampled_from(["ieee", "all_ones", "none", "none"]))
    bias = draw(st.integers(-3, 2 ** (E - 1) + 3))
    kwargs = {"ieee": {}, "all_ones": {"has_inf": False, "nan": "all_ones"},
              "none": {"has_inf": False, "nan": "none", "saturate": True}}[style]
    if style != "none":
        kwargs["saturate"] = draw(st.booleans())
    try:
        return FloatFormat("custom", E, M, bias=bias, **kwargs)
    except ValueError:
        from hypothesis import assume

        assume(False)
        raise


@settings(max_examples=150, deadline=None)
@given(fmt=float_formats(), seed=st.integers(0, 2**16))
def test_every_format_rounds_only_to_values_it_holds(fmt, seed):
    values = decode(torch.arange(2**fmt.total_bits), fmt)  # every value the format can hold
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([grid_and_midpoints(values), torch.randn(2000, generator=g) * fmt.max,
                   torch.tensor([math.inf, -math.inf, 0.0, -0.0, 3e38, 1e-45])])
    y = round_to_format(x, fmt)
    held = torch.isin(y.view(torch.int32), values.view(torch.int32))
    if fmt.nan != "none":
        held |= torch.isnan(y)  # any NaN stands for the format's NaN
    assert bool(held.all()), y[~held][:5]
    assert_same_bits(y, round_to_format_reference(x, fmt))


def test_format_names_are_a_type_error():
    for fn in (round_to_format, round_to_format_reference, decompose, encode, ulp):
        with pytest.raises(TypeError, match="FloatFormat"):
            fn(torch.ones(2), "FP16")
    with pytest.raises(TypeError, match="FloatFormat"):
        compose(0, 1, 0, "FP16")
    with pytest.raises(TypeError, match="FloatFormat"):
        finite_values("FP4_E2M1")


def test_decompose_fp32_keeps_the_nan_payload():
    bits = torch.tensor([0x7F800001, 0xFFC00001 - 2**32, 0x7FA12345, 0x7FC00000]).to(torch.int32)
    sign, exponent, mantissa = decompose(bits.view(torch.float32), FP32)
    assert sign.tolist() == [0, 1, 0, 0] and exponent.tolist() == [255] * 4
    assert mantissa.tolist() == [0x000001, 0x400001, 0x212345, 0x400000]
    assert torch.equal(compose(sign, exponent, mantissa, FP32).view(torch.int32), bits)
    # other formats store their canonical NaN, with the input's sign
    assert [int(t) for t in decompose(-torch.tensor(math.nan), FP16)] == [1, 31, 512]
