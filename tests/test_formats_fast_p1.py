"""The fast ``round_to_format`` equals the bit-level ``round_to_format_reference`` bit for bit (issue 9).

Inputs: every float16 and bfloat16 bit pattern and the midpoints between neighbours (as float32), a strided
sweep over all 2^32 float32 patterns, random patterns, each format's own grid with its ties, and the special
values (±0, ±inf, NaN with payloads, float32 subnormals, the overflow thresholds). The int32 path must agree
with the reference on every bit, NaN included; the torch casts (FP16, BF16, FP8_E5M2) on every bit of every
non-NaN output, and give NaN for NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from qbook import formats
from qbook.formats import (
    ALL,
    BF16,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FloatFormat,
    decode,
    round_to_format,
    round_to_format_reference,
)

CAST_FORMATS = {FP16.name, BF16.name, FP8_E5M2.name}
CUSTOM = [
    dataclasses.replace(FP8_E4M3, name="E4M3_nonsat", saturate=False),
    dataclasses.replace(FP8_E5M2, name="E5M2_sat", saturate=True),
    FloatFormat("E3M0", 3, 0, has_inf=False, nan="none", saturate=True),
    FloatFormat("E8M0", 8, 0, has_inf=False, nan="all_ones", saturate=True),
    FloatFormat("E5M23", 5, 23, has_inf=False, nan="none", saturate=True),
    FloatFormat("E8M23_sat", 8, 23, saturate=True),
    FloatFormat("E1M2", 1, 2, has_inf=False, nan="none", saturate=True),
    FloatFormat("E4M3_b2", 4, 3, bias=2, has_inf=False, nan="all_ones", saturate=True),
    FloatFormat("E3M2_ieee", 3, 2),
    # the int32 path has no float32 constant for its subnormal step here: the reference runs
    FloatFormat("E2M0_b-120", 2, 0, bias=-120, has_inf=False, nan="none", saturate=True),
]
FORMATS = [f for f in ALL if not f.is_float32] + CUSTOM


def bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    bits = bits.to(torch.int64)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def with_midpoints(values: torch.Tensor) -> torch.Tensor:
    """Finite values, the exact midpoints between neighbours, both ±1 float32 ULP, with both signs."""
    v = torch.unique(values[torch.isfinite(values)].double())
    pts = torch.cat([v, (v[1:] + v[:-1]) / 2]).float()
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    pts = torch.cat([pts, torch.nextafter(pts, up), torch.nextafter(pts, down)])
    return torch.cat([pts, -pts])


@functools.cache
def structured_inputs() -> torch.Tensor:
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    half, bf16 = patterns.view(torch.float16).float(), patterns.view(torch.bfloat16).float()
    nan_bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF800001, 0x7FA12345])
    return torch.cat([
        half, with_midpoints(half), bf16, with_midpoints(bf16),
        bits_to_f32(torch.arange(0, 2**32, 32749)),  # every exponent and sign
        bits_to_f32(torch.randint(0, 2**32, (50_000,), generator=torch.Generator().manual_seed(0))),
        bits_to_f32(torch.arange(0, 2**24, 4093)),  # float32 subnormals and the first binades
        torch.tensor([0.0, -0.0, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, -1e-45]),
        bits_to_f32(nan_bits),
    ])


def assert_bits_equal(fast: torch.Tensor, ref: torch.Tensor, nan_bits_too: bool) -> None:
    assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape
    same = fast.view(torch.int32) == ref.view(torch.int32)
    if not nan_bits_too:
        same |= torch.isnan(fast) & torch.isnan(ref)
    if not bool(same.all()):
        bad = (~same).nonzero().flatten()[:5]
        raise AssertionError(
            f"{int((~same).sum())} differ, e.g. fast {fast[bad].tolist()} ref {ref[bad].tolist()}"
        )


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fast_equals_reference_bit_for_bit(fmt):
    x = structured_inputs()
    if fmt.total_bits <= 16:
        x = torch.cat([x, with_midpoints(decode(torch.arange(2**fmt.total_bits), fmt))])
    if fmt.nan == "none":
        x = x[~torch.isnan(x)]
    nan_bits_too = fmt.name not in CAST_FORMATS
    assert_bits_equal(round_to_format(x, fmt), round_to_format_reference(x, fmt), nan_bits_too)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.name not in CAST_FORMATS and f.name != "E2M0_b-120"],
                         ids=lambda f: f.name)
def test_int32_path_is_used_and_keeps_the_shape(fmt, monkeypatch):
    def forbidden(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(formats, "_round_to_format_reference", forbidden)
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1)).transpose(0, 2)  # not contiguous
    y = round_to_format(x, fmt)
    assert y.shape == x.shape and y.dtype == torch.float32


def test_chunks_nan_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(formats, "_CHUNK", 64)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 10
    expected = round_to_format_reference(x, FP8_E4M3)
    assert_bits_equal(round_to_format(x, FP8_E4M3), expected, True)
    x[777] = -math.nan
    y = round_to_format(x, FP8_E4M3)
    assert_bits_equal(y, round_to_format_reference(x, FP8_E4M3), True)
    assert torch.isnan(y[777]) and y[777].view(torch.int32) < 0  # the input's sign
    with pytest.raises(ValueError, match="FP4_E2M1 has no NaN"):
        round_to_format(x, FP4_E2M1)
    with pytest.raises(ValueError, match="FP4_E2M1 has no NaN"):
        round_to_format_reference(x, FP4_E2M1)


def test_inputs_are_not_modified_and_other_dtypes_convert():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 100
    x[7] = math.nan
    before = x.clone()
    for fmt in FORMATS:
        if fmt.nan != "none":
            round_to_format(x, fmt)
            round_to_format_reference(x, fmt)
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))
    h = x[8:].half()
    for fmt in FORMATS:
        assert torch.equal(round_to_format(h, fmt), round_to_format(h.float(), fmt))
