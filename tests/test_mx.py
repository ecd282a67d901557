"""qbook.mx against the OCP MX v1.0 specification, NVIDIA's NVFP4 recipe and torch's own dtypes.

The references here are derived from the published definitions, not from qbook: element values are enumerated
from the bit-field formulas of the OCP specifications (no rounding code), rounding is a search for the nearest
value in float64 with ties to the even code, the shared exponent comes from ``math.frexp``/``np.frexp``, and
FP8 / E8M0 conversions use torch's own casts (``torch.float8_e4m3fn``, ``float8_e5m2``, ``float8_e8m0fnu``).
A cross-check against torchao's MX emulation lives in ``benchmarks/check_mx_torchao.py`` (torchao is not a
dependency of the project).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbook import mx
from qbook.formats import BF16, FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, FP16

FLOAT_ELEMENTS = (FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1)

# --- the reference, from the specifications -----------------------------------------------------------------
#: (E, M, bias, codes that are not finite numbers) of each element format: OFP8 E4M3 reserves S.1111.111 for
#: NaN, E5M2 the exponent field 31 (inf, NaN); the MX FP6/FP4 formats have no special values.
SPEC = {
    "FP8_E4M3": (4, 3, 7, {0x7F}),
    "FP8_E5M2": (5, 2, 15, {0x7C, 0x7D, 0x7E, 0x7F}),
    "FP6_E3M2": (3, 2, 3, set()),
    "FP6_E2M3": (2, 3, 1, set()),
    "FP4_E2M1": (2, 1, 1, set()),
}
#: emax_elem of the MX specification's Table 1 (exponent of the largest normal number).
EMAX = {"FP8_E4M3": 8, "FP8_E5M2": 15, "FP6_E3M2": 4, "FP6_E2M3": 2, "FP4_E2M1": 2, "INT8": 0}


def spec_magnitudes(name: str) -> np.ndarray:
    """Values of the non-negative codes 0, 1, ... (ascending) by the bit-field formulas, finite ones only."""
    E, M, bias, special = SPEC[name]
    values = []
    for code in range(2 ** (E + M)):
        if code in special:
            continue
        e, f = code >> M, code & (2**M - 1)
        values.append(f / 2**M * 2.0 ** (1 - bias) if e == 0 else (1 + f / 2**M) * 2.0 ** (e - bias))
    return np.array(values)


def ref_round(v: np.ndarray, name: str) -> np.ndarray:
    """Nearest element value (float64), ties to the even code, after clamping to ±max."""
    if name == "INT8":
        return np.clip(np.rint(v * 64), -127, 127) / 64 + 0.0  # np.rint: half to even; an integer has no -0
    mags = spec_magnitudes(name)
    a = np.minimum(np.abs(v), mags[-1])
    hi = np.clip(np.searchsorted(mags, a), 1, len(mags) - 1)
    lo = hi - 1
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.copysign(mags[pick], v)


def ref_quantize_mx(x: torch.Tensor, name: str, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 of the MX spec (section 6.3) on the last axis: (element values, E8M0 codes), in float64."""
    blocks = x.double().numpy().reshape(-1, block_size)
    amax = np.abs(blocks).max(axis=1)
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(np.where(np.isfinite(amax), amax, 1.0))  # amax = m * 2^e, 0.5 <= m < 1
    shared = np.where(amax > 0, e - 1 - EMAX[name], -127).clip(-127, 127)
    code = np.where(np.isfinite(amax), shared + 127, 255).astype(np.uint8)
    X = np.ldexp(1.0, shared)[:, None]
    v = np.where(code[:, None] == 255, 0.0, blocks / X)
    return ref_round(v, name).reshape(x.shape), code.reshape(*x.shape[:-1], -1)


def values_of(codes: torch.Tensor, element) -> torch.Tensor:
    return mx._element_values(codes, element)


def structured_sample(n_rows: int = 1024, seed: int = 0) -> torch.Tensor:
    """(n_rows, 1024) float32: random blocks over 2^-149 .. 2^127 plus blocks of zeros, ties, saturation,
    float32 subnormals, single spikes, ±inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, 1024, dtype=torch.float64, generator=g)
    magnitude = torch.exp2(torch.randint(-140, 120, (n_rows, 32), generator=g).double())  # one per block
    x *= magnitude.repeat_interleave(32, dim=1)
    x = x.float()
    blocks = x.view(-1, 32)  # (n_rows * 32, 32)
    k = blocks.shape[0] // 16
    blocks[0:k] = 0.0  # blocks of zeros (and signed zeros)
    blocks[k:2 * k, ::2] = -0.0
    # ties and saturation: multiples of 1/16 up to 16, times a power of two (midpoints of every element grid)
    grid = torch.randint(-256, 257, (k, 32), generator=g).float() / 16
    blocks[2 * k:3 * k] = grid * torch.exp2(torch.randint(-20, 20, (k, 1), generator=g).float())
    blocks[3 * k:4 * k] *= 2.0**-130  # float32 subnormals (shared exponent clamped at -127)
    spikes = torch.zeros(k, 32)
    spikes[torch.arange(k), torch.randint(0, 32, (k,), generator=g)] = 3.0 * 2.0**100
    blocks[4 * k:5 * k] = spikes
    blocks[5 * k, 3], blocks[5 * k + 1, 0], blocks[5 * k + 2, 31] = math.inf, -math.inf, math.nan
    blocks[5 * k + 3, :] = torch.finfo(torch.float32).max  # the largest float32: shared exponent 127 - emax
    return x


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    return structured_sample()  # 2^20 values


# --- bit-exactness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", mx.ELEMENTS, ids=lambda e: e.name)
def test_quantize_mx_matches_the_spec_reference(sample, element) -> None:
    rows = sample if element in (FP4_E2M1, FP8_E4M3) else sample[:256]  # 2^20 values (MXFP4, MXFP8), or 2^18
    codes, scales = mx.quantize_mx(rows, element)
    ref_values, ref_scales = ref_quantize_mx(rows, element.name)
    assert torch.equal(scales, torch.from_numpy(ref_scales))
    got = values_of(codes, element).double().numpy()
    assert np.array_equal(got, ref_values) and np.array_equal(np.signbit(got), np.signbit(ref_values))
    x_hat = mx.dequantize_mx(codes, scales, element)
    X = np.ldexp(1.0, ref_scales.astype(np.int64) - 127)
    expected = np.where(np.repeat(ref_scales == 255, 32, -1), np.nan, ref_values * np.repeat(X, 32, -1))
    assert np.array_equal(x_hat.double().numpy(), expected, equal_nan=True)  # exact: P * 2^k fits float32


def test_sample_covers_the_special_cases(sample) -> None:
    codes, scales = mx.quantize_mx(sample, FP4_E2M1)
    values = values_of(codes, FP4_E2M1)
    assert (scales == 255).sum() == 3 and (scales == 0).sum() > 1000  # inf/NaN blocks; clamped tiny blocks
    assert (scales == 127 + 127 - 2).any()  # float32 max: floor(log2) = 127, minus emax 2
    assert (values.abs() == 6).sum() > 10_000 and (values.abs() == 0.5).sum() > 10_000  # saturated, subnormal
    assert (torch.signbit(values) & (values == 0)).sum() > 1000  # signed zeros keep their sign


def test_e8m0_is_torch_float8_e8m0fnu(sample) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ours, theirs = mx.e8m0_to_float(codes), codes.view(torch.float8_e8m0fnu).float()
    assert torch.equal(ours[:255].view(torch.int32), theirs[:255].view(torch.int32))
    assert ours[255].isnan() and theirs[255].isnan()
    assert torch.equal(mx.e8m0_to_float(codes.view(torch.float8_e8m0fnu)).nan_to_num(), ours.nan_to_num())
    _, scales = mx.quantize_mx(sample, FP8_E4M3)
    finite = scales != 255
    X = mx.e8m0_to_float(scales)[finite]
    assert torch.equal(X.to(torch.float8_e8m0fnu).view(torch.uint8), scales[finite])  # torch encodes 2^k so


@pytest.mark.parametrize("element", (FP8_E4M3, FP8_E5M2), ids=lambda e: e.name)
def test_fp8_elements_are_torch_casts(sample, element) -> None:
    rows = sample[:512]
    codes, scales = mx.quantize_mx(rows, element)
    X = mx.e8m0_to_float(scales).repeat_interleave(32, dim=-1)
    scaled = torch.where(X.isnan(), 0.0, rows / X).clamp(-element.max, element.max)
    assert codes.dtype == element.torch_dtype
    assert torch.equal(codes.view(torch.uint8), scaled.to(element.torch_dtype).view(torch.uint8))


def test_fp4_codes_and_packing_are_float4_e2m1fn_x2() -> None:
    # The E2M1 code table of the OCP MX spec (sign bit 3, exponent bits 2-1, mantissa bit 0) ...
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    assert values_of(codes, FP4_E2M1).tolist() == table + [-v for v in table]
    # ... packed two per byte, element 2i in the low nibble: the layout of torch.float4_e2m1fn_x2 (PyTorch's
    # helper torch.testing._internal.common_quantized.pack_uint4 is `data[1::2] << 4 | data[::2]`).
    packed = mx.pack_codes(codes, FP4_E2M1)
    assert packed.tolist() == [(2 * i + 1) << 4 | 2 * i for i in range(8)]
    x2 = packed.view(torch.float4_e2m1fn_x2)
    assert x2.dtype.itemsize == 1 and torch.equal(mx.unpack_codes(x2, FP4_E2M1, 16), codes)


@pytest.mark.parametrize("element", (FP6_E3M2, FP6_E2M3, mx.INT8, FP8_E4M3), ids=lambda e: e.name)
def test_pack_codes_round_trip(element) -> None:
    codes, _ = mx.quantize_mx(torch.randn(3, 64, dtype=torch.float64).float(), element)
    packed = mx.pack_codes(codes, element)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * element.total_bits // 8
    assert torch.equal(mx.unpack_codes(packed, element, 64).view(torch.uint8), codes.view(torch.uint8))


def test_bits_per_element() -> None:
    assert mx.MXFP4.bits_per_element == 4.25 and mx.NVFP4.bits_per_element == 4.5
    assert [f.bits_per_element for f in (mx.MXFP8_E4M3, mx.MXFP6_E2M3, mx.MXINT8)] == [8.25, 6.25, 8.25]


# --- NVFP4 --------------------------------------------------------------------------------------------------
def ref_nvfp4(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, np.float32]:
    """NVIDIA's recipe in numpy float32 (Transformer Engine's order of operations), E4M3 by torch's cast."""
    f32 = np.float32
    blocks = x.numpy().reshape(-1, 16)
    amax = f32(np.abs(blocks).max())
    s_enc = f32(1.0) if amax == 0 else f32(np.minimum(f32(2688.0) / amax, np.finfo(f32).max))
    s_dec = f32(1.0) / s_enc
    amax_b = np.abs(blocks).max(axis=1)
    S_b = torch.from_numpy((amax_b * (s_enc * f32(1.0 / 6.0))).astype(f32)).to(torch.float8_e4m3fn)
    with np.errstate(divide="ignore"):
        rcp = np.minimum(f32(1.0) / (S_b.float().numpy() * s_dec), np.finfo(f32).max)
    scaled = (blocks * rcp[:, None]).astype(f32)
    values = ref_round(scaled.astype(np.float64), "FP4_E2M1").reshape(x.shape)
    return values, S_b.reshape(*x.shape[:-1], -1), s_dec


def test_nvfp4_matches_the_recipe() -> None:
    g = torch.Generator().manual_seed(1)
    magnitude = torch.exp2(torch.randint(-12, 4, (256, 64), generator=g).double()).repeat_interleave(16, 1)
    x = (torch.randn(256, 1024, dtype=torch.float64, generator=g) * magnitude).float()
    x[0, :16] = 0.0  # a zero block: scale 0, codes 0
    x[1, :16] = 1e-30  # a block far below the tensor's amax: its E4M3 scale underflows to 0
    codes, S_b, s_dec = mx.quantize_nvfp4(x)
    ref_values, ref_S_b, ref_s_dec = ref_nvfp4(x)
    assert s_dec.dtype == torch.float32 and float(s_dec) == ref_s_dec
    assert torch.equal(S_b.view(torch.uint8), ref_S_b.view(torch.uint8))
    assert np.array_equal(values_of(codes, FP4_E2M1).double().numpy(), ref_values)
    x_hat = mx.dequantize_nvfp4(codes, S_b, s_dec)
    expected = (torch.from_numpy(ref_values).float().view(-1, 16) * ref_S_b.float().view(-1, 1)) * s_dec
    assert torch.equal(x_hat, expected.view(x.shape)) and not x_hat[:2, :16].any()
    assert bool((S_b.float() <= 448).all()) and bool((S_b.float() == 448).any())


def test_nvfp4_uses_a_given_tensor_amax() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 100.0] * 4)
    codes, S_b, s_dec = mx.quantize_nvfp4(x, tensor_amax=3.0)  # calibrated on smaller data: 100 saturates
    assert float(s_dec) == np.float32(1) / np.float32(np.float32(2688) / np.float32(3))
    assert S_b.float().item() == 448 and mx.dequantize_nvfp4(codes, S_b, s_dec).max() < 4


# --- FP8 with FP32 scales -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [None, (1, 256), (1, 128), (128, 128)])
@pytest.mark.parametrize("element", (FP8_E4M3, FP8_E5M2), ids=lambda e: e.name)
def test_quantize_fp8_matches_a_per_block_loop(block, element) -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(256, 256, dtype=torch.float64, generator=g) * 10).float()
    x[:128, :128] = 0.0
    codes, scales = mx.quantize_fp8(x, element, block)
    bm, bn = block or x.shape
    for i in range(0, 256, bm):
        for j in range(0, 256, bn):
            tile = x[i:i + bm, j:j + bn]
            scale = tile.abs().max() / element.max
            scale = scale if scale > 0 else torch.tensor(1.0)
            got = scales if block is None else scales[i // bm, j // bn]
            assert got.item() == scale.item()
            expected = (tile / scale).to(element.torch_dtype)
            assert torch.equal(codes[i:i + bm, j:j + bn].view(torch.uint8), expected.view(torch.uint8))
    x_hat = mx.dequantize_fp8(codes, scales, block)
    assert (x_hat - x).abs().max() <= x.abs().max() * 2.0**-element.mantissa_bits


# --- invariants ---------------------------------------------------------------------------------------------
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite32, min_size=8, max_size=8), st.sampled_from(mx.ELEMENTS))
def test_mx_error_bound_and_idempotence(values, element) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    codes, scales = mx.quantize_mx(x, element, block_size=8)
    x_hat = mx.dequantize_mx(codes, scales, element)
    X = mx.e8m0_to_float(scales).double()
    amax = x.abs().max().double()
    if amax > 0 and scales.item() not in (0, 254):  # X not clamped: amax / X lies in [2^emax, 2^(emax + 1))
        assert 2.0**element.emax <= amax / X < 2.0 ** (element.emax + 1)
    step = (X * 2.0 ** (element.emax - (element.mantissa_bits if element is not mx.INT8 else 6))).item()
    inside = x.abs().double() <= element.max * X
    assert ((x.double() - x_hat.double()).abs()[inside] <= step / 2 + 1e-300).all()  # half a top-binade step
    assert (x_hat.double().abs()[~inside] == element.max * X).all()  # saturated
    again = mx.quantize_mx(x_hat, element, block_size=8)
    assert torch.equal(again[1], scales) and torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=32, max_size=32))
def test_nvfp4_error_is_within_half_a_step_of_its_block(values) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    codes, S_b, s_dec = mx.quantize_nvfp4(x)
    x_hat = mx.dequantize_nvfp4(codes, S_b, s_dec)
    block_scale = (S_b.double() * s_dec.double()).repeat_interleave(16)  # the grid: E2M1 values times this
    inside = x.double().abs() <= 6 * block_scale
    error = (x.double() - x_hat.double()).abs()
    rounding = x_hat.double().abs() * 2.0**-23  # of the float32 product
    assert (error[inside] <= (block_scale + rounding)[inside]).all()  # half the top step (2) of E2M1
    assert (values_of(codes, FP4_E2M1).abs()[~inside] == 6).all()  # saturated


def test_axis_is_a_transpose() -> None:
    x = torch.randn(64, 8, dtype=torch.float64).float()
    codes, scales = mx.quantize_mx(x, FP6_E2M3, block_size=32, axis=0)
    codes_t, scales_t = mx.quantize_mx(x.T.contiguous(), FP6_E2M3, block_size=32)
    assert torch.equal(codes, codes_t.T) and torch.equal(scales, scales_t.T) and scales.shape == (2, 8)
    assert torch.equal(mx.dequantize_mx(codes, scales, FP6_E2M3, axis=0),
                       mx.dequantize_mx(codes_t, scales_t, FP6_E2M3).T)
    c, s, t = mx.quantize_nvfp4(x, axis=0)
    assert torch.equal(mx.dequantize_nvfp4(c, s, t, axis=0), mx.fake_quantize_blocks(x.T, mx.NVFP4).T)


@pytest.mark.parametrize("fmt", [mx.MXFP8_E4M3, mx.MXFP6_E3M2, mx.MXFP4, mx.MXINT8, mx.NVFP4], ids=str)
def test_fake_quantize_blocks_is_the_round_trip(sample, fmt) -> None:
    if fmt is mx.NVFP4:
        x = torch.randn(512, 64, dtype=torch.float64).float()
        x[:16] = 0.0
        round_trip = mx.dequantize_nvfp4(*mx.quantize_nvfp4(x, axis=0), axis=0)
        assert torch.equal(mx.fake_quantize_blocks(x, fmt, axis=0), round_trip)
        return
    x = sample[::16]  # every kind of block, the inf and NaN ones (row 320) included
    round_trip = mx.dequantize_mx(*mx.quantize_mx(x, fmt.element, fmt.block_size), fmt.element)
    fake = mx.fake_quantize_blocks(x, fmt)
    assert torch.equal(fake.nan_to_num(), round_trip.nan_to_num()) and fake.isnan().sum() == 96


def test_nan_blocks_decode_to_nan_only_in_their_block() -> None:
    x = torch.ones(2, 32)
    x[0, 5] = math.nan
    codes, scales = mx.quantize_mx(x, FP4_E2M1)
    x_hat = mx.dequantize_mx(codes, scales, FP4_E2M1)
    assert scales.flatten().tolist() == [255, 125] and x_hat[0].isnan().all() and (x_hat[1] == 1).all()
    assert not codes[0].any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 70), st.integers(-3, 2), st.sampled_from(mx.ELEMENTS))
def test_any_block_size_either_works_or_says_why(rows, length, axis, element) -> None:
    x = torch.randn(rows, length, dtype=torch.float64).float()
    for block_size in (1, 2, 16, 32, 0, -4):
        if not -2 <= axis < 2 or block_size < 1 or x.shape[axis] % block_size:
            with pytest.raises(ValueError, match="axis|block_size"):
                mx.quantize_mx(x, element, block_size=block_size, axis=axis)
            continue
        codes, scales = mx.quantize_mx(x, element, block_size=block_size, axis=axis)
        assert codes.shape == x.shape and scales.shape[axis] == x.shape[axis] // block_size
        assert mx.dequantize_mx(codes, scales, element, axis=axis).shape == x.shape


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors() -> None:
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="block_size 32 does not divide the length 48"):
        mx.quantize_mx(x, FP4_E2M1)
    with pytest.raises(ValueError, match="FP16 is not an MX element format"):
        mx.quantize_mx(x, FP16, block_size=16)
    with pytest.raises(ValueError, match="BF16 is not an MX element format"):
        mx.dequantize_mx(torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), BF16)
    with pytest.raises(TypeError, match="MX element format"):
        mx.quantize_mx(x, "FP4_E2M1", block_size=16)
    with pytest.raises(TypeError, match="floating-point tensor"):
        mx.quantize_mx(torch.ones(32, dtype=torch.int32), FP4_E2M1)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        mx.quantize_mx(x, FP4_E2M1, block_size=16, axis=2)
    with pytest.raises(ValueError, match="block_size must be positive"):
        mx.quantize_mx(x, FP4_E2M1, block_size=0)
    with pytest.raises(ValueError, match="contains NaN"):
        mx.quantize_nvfp4(torch.tensor([math.nan] * 16))
    with pytest.raises(ValueError, match="contains ±inf"):
        mx.quantize_fp8(torch.tensor([math.inf, 1.0]))
    with pytest.raises(ValueError, match="block_size 16 does not divide the length 24"):
        mx.quantize_nvfp4(torch.randn(8, 24))
    with pytest.raises(ValueError, match="block \\(128, 128\\) does not divide the shape"):
        mx.quantize_fp8(torch.randn(128, 48), block=(128, 128))
    with pytest.raises(ValueError, match="supports FP8_E4M3 and FP8_E5M2"):
        mx.quantize_fp8(x, FP4_E2M1)
    codes, scales = mx.quantize_mx(x, FP4_E2M1, block_size=16)
    with pytest.raises(ValueError, match="do not fit codes"):
        mx.dequantize_mx(codes, torch.cat([scales, scales[:, :2]], dim=1), FP4_E2M1)  # 5 blocks in 48
    with pytest.raises(ValueError, match="do not fit codes"):
        mx.dequantize_mx(codes, scales[:2], FP4_E2M1)
    with pytest.raises(TypeError, match="codes must be a torch.uint8"):
        mx.dequantize_mx(codes.to(torch.int8), scales, FP4_E2M1)
    with pytest.raises(ValueError, match="codes must lie in"):
        mx.dequantize_mx(codes | 0x10, scales, FP4_E2M1)
    with pytest.raises(TypeError, match="BlockFormat"):
        mx.fake_quantize_blocks(x, FP4_E2M1)
