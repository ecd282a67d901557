"""Tests for qbook.packing: sub-byte packing against hand-computed bytes, ONNX INT4/INT2 and a naive loop."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbook import packing
from qbook.granularity import PerChannel, PerGroup, PerTensor
from qbook.packing import BITS, bits_per_weight, code_range, pack, packed_length, storage_bytes, unpack

SIGNED_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def naive_pack(values: list[int], bits: int) -> list[int]:
    """The layout by definition: code i at bits [bits * i, bits * (i + 1)) of one little-endian integer."""
    stream = 0
    for i, v in enumerate(values):
        stream |= (v % 2**bits) << (bits * i)  # Python's % is two's complement for negative v
    return list(stream.to_bytes(math.ceil(len(values) * bits / 8), "little"))


def all_codes(bits: int, signed: bool) -> torch.Tensor:
    """Every combination of codes in one byte's positions: shape (2^8, 8 / bits)."""
    qmin, qmax = code_range(bits, signed)
    combos = list(itertools.product(range(qmin, qmax + 1), repeat=8 // bits))
    return torch.tensor(combos, dtype=torch.int8 if signed else torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Byte layout
# ---------------------------------------------------------------------------------------------------------


def test_hand_computed_bytes() -> None:
    assert pack(torch.tensor([1, 2], dtype=torch.int8), 4).tolist() == [0x21]
    assert pack(torch.tensor([-1, 0], dtype=torch.int8), 4).tolist() == [0x0F]
    assert pack(torch.tensor([0, -8], dtype=torch.int8), 4).tolist() == [0x80]
    assert pack(torch.tensor([15, 10], dtype=torch.uint8), 4).tolist() == [0xAF]
    assert pack(torch.tensor([1, 2, 3], dtype=torch.int8), 4).tolist() == [0x21, 0x03]  # padded high nibble
    assert pack(torch.tensor([-1, 0, 1, -2], dtype=torch.int8), 2).tolist() == [0b10_01_00_11]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x81]
    assert pack(torch.tensor([-128, 127], dtype=torch.int8), 8).tolist() == [0x80, 0x7F]
    # int3: 0b011 at bits 0-2, 0b101 (-3) at bits 3-5, 0b111 (-1) at bits 6-8 straddles the two bytes
    assert pack(torch.tensor([3, -3, -1], dtype=torch.int8), 3).tolist() == [0b11_101_011, 0b1]
    # int5: 0b10000 (-16) at bits 0-4, 0b01111 (15) at bits 5-9
    assert pack(torch.tensor([-16, 15], dtype=torch.int8), 5).tolist() == [0b111_10000, 0b01]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_every_combination_in_a_byte(bits: int, signed: bool) -> None:
    q = all_codes(bits, signed)  # (256, 8 / bits): each code in each position, with every neighbour
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    expected = torch.tensor([naive_pack(row, bits) for row in q.tolist()], dtype=torch.uint8)
    assert torch.equal(packed, expected)
    # the combinations enumerate every byte exactly once: packing is a bijection on bytes
    assert sorted(packed.flatten().tolist()) == list(range(256))
    back = unpack(packed, bits, q.shape[-1], signed=signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back, q)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_every_value_in_every_position(bits: int, signed: bool) -> None:
    """Each code at each position of a whole block (lcm(bits, 8) bits), alone and among random neighbours."""
    per_block = math.lcm(bits, 8) // bits
    qmin, qmax = code_range(bits, signed)
    dtype = torch.int8 if signed else torch.uint8
    g = torch.Generator().manual_seed(bits)
    rows = []
    for position in range(per_block):
        for value in range(qmin, qmax + 1):
            random_row = torch.randint(qmin, qmax + 1, (per_block,), generator=g)
            for neighbours in (torch.zeros(per_block), random_row):
                row = neighbours.to(torch.int64)
                row[position] = value
                rows.append(row)
    q = torch.stack(rows).to(dtype)  # (rows, codes per block)
    packed = pack(q, bits)
    assert packed.shape == (len(rows), math.lcm(bits, 8) // 8)
    assert packed.tolist() == [naive_pack(r, bits) for r in q.tolist()]
    assert torch.equal(unpack(packed, bits, per_block, signed=signed), q)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_unpack_every_byte(bits: int, signed: bool) -> None:
    per_byte = 8 // bits
    data = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(256, 1)
    q = unpack(data, bits, per_byte, signed=signed)
    qmin, qmax = code_range(bits, signed)
    for byte, row in zip(range(256), q.tolist(), strict=True):
        fields = [(byte >> (bits * j)) & (2**bits - 1) for j in range(per_byte)]
        if signed:
            fields = [f - 2**bits if f > qmax else f for f in fields]
        assert row == fields
    assert int(q.min()) == qmin and int(q.max()) == qmax
    assert torch.equal(pack(q, bits, signed=signed), data)


def test_bits8_is_the_byte_reinterpretation() -> None:
    q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    assert torch.equal(pack(q, 8), q.view(torch.uint8))
    assert torch.equal(unpack(pack(q, 8), 8, 256, signed=True), q)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_unpack_every_byte_in_every_position(bits: int) -> None:
    """For widths that straddle bytes: every value of every byte of a block decodes to the right bits."""
    per_block, bytes_per_block = math.lcm(bits, 8) // bits, math.lcm(bits, 8) // 8
    for k in range(bytes_per_block):
        data = torch.zeros(256, bytes_per_block, dtype=torch.uint8)
        data[:, k] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        q = unpack(data, bits, per_block, signed=False)
        for byte, row in zip(range(256), q.tolist(), strict=True):
            stream = byte << (8 * k)
            assert row == [(stream >> (bits * i)) & (2**bits - 1) for i in range(per_block)]
        assert torch.equal(pack(q, bits), data)


onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize(
    ("bits", "signed", "onnx_type"),
    [(4, True, "INT4"), (4, False, "UINT4"), (2, True, "INT2"), (2, False, "UINT2")],
)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_matches_onnx_packing(bits: int, signed: bool, onnx_type: str, data: st.DataObject) -> None:
    if not hasattr(onnx.TensorProto, onnx_type):
        pytest.skip(f"this onnx has no {onnx_type}")
    qmin, qmax = code_range(bits, signed)
    values = data.draw(st.lists(st.integers(qmin, qmax), min_size=1, max_size=41))
    tensor = onnx.helper.make_tensor("q", getattr(onnx.TensorProto, onnx_type), [len(values)], values)
    expected = list(tensor.int32_data)  # ONNX packs 1-D tensors the same way: first element in the low bits
    q = torch.tensor(values, dtype=torch.int8 if signed else torch.uint8)
    assert pack(q, bits).tolist() == expected


def test_matches_onnx_6bit_layout() -> None:
    """ONNX packs its 6-bit floats as the same LSB-first stream (the codes are raw bit patterns here)."""
    pack_6bit = getattr(onnx.numpy_helper, "_pack_6bit", None)
    if pack_6bit is None:
        pytest.skip("this onnx has no 6-bit packing")
    codes = torch.randint(0, 64, (4, 11), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    for row in codes:
        assert pack(row, 6).tolist() == pack_6bit(row.numpy()).tolist()


# ---------------------------------------------------------------------------------------------------------
# Shapes, odd lengths, signedness
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", range(0, 10))
def test_odd_lengths_round_trip(bits: int, length: int) -> None:
    qmin, qmax = code_range(bits, True)
    g = torch.Generator().manual_seed(length)
    q = torch.randint(qmin, qmax + 1, (3, length), generator=g).to(torch.int8)
    packed = pack(q, bits)
    assert packed.shape == (3, math.ceil(length * bits / 8)) == (3, packed_length(length, bits))
    assert torch.equal(unpack(packed, bits, length, signed=True), q)
    assert [naive_pack(row, bits) for row in q.tolist()] == packed.tolist()


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_multidim(bits: int, signed: bool, shape: list[int], seed: int) -> None:
    qmin, qmax = code_range(bits, signed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(qmin, qmax + 1, shape, generator=g).to(torch.int8 if signed else torch.uint8)
    packed = pack(q, bits)
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    assert packed.numel() == math.prod(shape[:-1]) * math.ceil(shape[-1] * bits / 8)
    assert torch.equal(unpack(packed, bits, shape[-1], signed=signed), q)
    rows = q.reshape(-1, shape[-1]).tolist()  # packing is row by row along the last dimension
    assert packed.reshape(len(rows), -1).tolist() == [naive_pack(r, bits) for r in rows]


def test_packed_size_of_a_weight_matrix() -> None:
    q = torch.randint(-8, 8, (384, 1536), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack(q, 4)
    assert packed.numel() == 384 * 1536 // 2 == q.numel() * 4 // 8


@pytest.mark.parametrize("dtype", SIGNED_DTYPES)
def test_signedness_from_dtype(dtype: torch.dtype) -> None:
    q = torch.tensor([-8, 7, -1], dtype=dtype)
    assert torch.equal(unpack(pack(q, 4), 4, 3, signed=True), q.to(torch.int8))
    u = torch.tensor([0, 15, 9], dtype=torch.uint8)
    assert torch.equal(unpack(pack(u, 4), 4, 3, signed=False), u)


def test_explicit_signed_for_wide_dtypes() -> None:
    u = torch.tensor([0, 15, 9], dtype=torch.int32)  # unsigned codes in a signed container
    with pytest.raises(ValueError, match="code 15 .*signed=False"):
        pack(u, 4)
    assert pack(u, 4, signed=False).tolist() == [0xF0, 0x09]


def test_pack_does_not_modify_input() -> None:
    q = torch.tensor([-3, 5, 7], dtype=torch.int8)
    before = q.clone()
    pack(q, 4)
    assert torch.equal(q, before)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "signed", "value"),
    [(4, True, 8), (4, True, -9), (4, False, 16), (2, True, -3), (2, False, 4), (1, False, 2),
     (8, False, 256)],
)
def test_out_of_range_codes_name_the_value(bits: int, signed: bool, value: int) -> None:
    q = torch.tensor([0, value, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"code {value} at index \(1,\)"):
        pack(q, bits, signed=signed)


def test_negative_codes_in_uint8_are_impossible_but_large_ones_fail() -> None:
    with pytest.raises(ValueError, match="code 200"):
        pack(torch.tensor([200], dtype=torch.uint8), 4)


@pytest.mark.parametrize("bad", [torch.tensor([1.0]), torch.tensor([True]), [1, 2], torch.tensor([1j])])
def test_pack_rejects_non_integer_input(bad: object) -> None:
    with pytest.raises(TypeError):
        pack(bad, 4)  # type: ignore[arg-type]


def test_pack_rejects_0d() -> None:
    with pytest.raises(ValueError, match="0-d"):
        pack(torch.tensor(1, dtype=torch.int8), 4)


@pytest.mark.parametrize(("bits", "error"), [(9, ValueError), (16, ValueError), (0, ValueError),
                                             ("4", TypeError), (4.0, TypeError), (True, TypeError)])
def test_bad_bits(bits: object, error: type[Exception]) -> None:
    q = torch.tensor([1], dtype=torch.int8)
    with pytest.raises(error, match="bits"):
        pack(q, bits)  # type: ignore[arg-type]
    with pytest.raises(error, match="bits"):
        unpack(torch.tensor([1], dtype=torch.uint8), bits, 1, signed=True)  # type: ignore[arg-type]


def test_pack_rejects_bad_signed() -> None:
    with pytest.raises(TypeError, match="signed"):
        pack(torch.tensor([1], dtype=torch.int8), 4, signed=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [torch.tensor([1], dtype=torch.int8), torch.tensor([1.0]), [1]])
def test_unpack_rejects_non_uint8(bad: object) -> None:
    with pytest.raises(TypeError, match="uint8"):
        unpack(bad, 4, 2, signed=True)  # type: ignore[arg-type]


def test_unpack_checks_length() -> None:
    packed = pack(torch.tensor([1, 2, 3, 4], dtype=torch.int8), 4)  # 2 bytes
    with pytest.raises(ValueError, match="needs 3 bytes"):
        unpack(packed, 4, 5, signed=True)
    with pytest.raises(ValueError, match="needs 1 bytes"):
        unpack(packed, 4, 2, signed=True)
    with pytest.raises(ValueError, match="stream bits after code 3 are not zero"):
        unpack(packed, 4, 3, signed=True)  # the fourth code is 4, not padding
    with pytest.raises(ValueError, match="non-negative"):
        unpack(packed, 4, -1, signed=True)
    with pytest.raises(TypeError, match="length"):
        unpack(packed, 4, 4.0, signed=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="signed"):
        unpack(packed, 4, 4, signed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0-d"):
        unpack(torch.tensor(3, dtype=torch.uint8), 4, 2, signed=True)


# ---------------------------------------------------------------------------------------------------------
# Storage accounting
# ---------------------------------------------------------------------------------------------------------


def test_bits_per_weight_hand_derived() -> None:
    w = (4096, 4096)
    assert bits_per_weight(w, 4, PerGroup(1, 128)) == 4 + 16 / 128 == 4.125
    assert bits_per_weight(w, 4, PerGroup(1, 128), zero_point_bits=4) == 4 + (16 + 4) / 128 == 4.15625
    assert bits_per_weight(w, 4, PerGroup(1, 128), zero_point_bits=16) == 4 + 32 / 128 == 4.25
    assert bits_per_weight(w, 4, PerGroup(1, 32)) == 4.5
    assert bits_per_weight(w, 4, PerGroup(1, 64), scale_bits=32, zero_point_bits=32) == 5.0
    assert bits_per_weight(w, 8, PerChannel(0), scale_bits=32) == 8 + 32 / 4096
    assert bits_per_weight(w, 8, PerTensor(), scale_bits=32, zero_point_bits=32) == 8 + 64 / 4096**2
    assert bits_per_weight(w, 8) == 8 + 16 / 4096**2  # default: per-tensor, fp16 scale, symmetric
    assert bits_per_weight((384, 1536), 4, PerChannel(0)) == 4 + 16 / 1536
    assert bits_per_weight(w, 3, PerGroup(1, 128)) == 3.125
    assert bits_per_weight(w, 3, PerGroup(1, 32), zero_point_bits=3) == 3 + 19 / 32


def test_storage_bytes_hand_derived() -> None:
    assert storage_bytes((4096, 4096), 4, PerGroup(1, 128)) == 4096 * 4096 // 2 + 4096 * 32 * 2
    assert storage_bytes((3, 5), 4, PerTensor(), scale_bits=0) == 9  # rows of 5 codes -> 3 bytes each
    assert bits_per_weight((3, 5), 4, PerTensor(), scale_bits=0) == 8 * 9 / 15
    assert storage_bytes((7,), 4, PerTensor(), scale_bits=32, zero_point_bits=4) == 4 + 4 + 1
    assert storage_bytes(torch.Size([2, 8]), 2, PerChannel(0), scale_bits=16) == 2 * 2 + 2 * 2
    assert storage_bytes((3, 6), 4, PerGroup(0, 3), scale_bits=8, zero_point_bits=4) == 3 * 3 + 6 + 3
    assert storage_bytes((2, 5), 3, PerTensor(), scale_bits=0) == 2 * 2  # 15 bits -> 2 bytes per row


@pytest.mark.parametrize(
    "granularity", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(1, 4), PerGroup(0, 2)]
)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_storage_bytes_equals_real_buffers(granularity: object, bits: int) -> None:
    """The formula agrees with the bytes of real packed codes and fp16 scales / packed zero points."""
    shape = (6, 12)
    q = torch.zeros(shape, dtype=torch.int8)
    n_params = math.prod(granularity.param_shape(shape))  # type: ignore[attr-defined]
    scales = torch.ones(n_params, dtype=torch.float16)
    zero_points = pack(torch.zeros(n_params, dtype=torch.int8), bits)
    real = pack(q, bits).numel() + scales.numel() * scales.element_size() + zero_points.numel()
    assert storage_bytes(shape, bits, granularity, scale_bits=16, zero_point_bits=bits) == real  # type: ignore[arg-type]


def test_storage_errors() -> None:
    with pytest.raises(ValueError, match="group_size 128 does not divide"):
        storage_bytes((4, 100), 4, PerGroup(1, 128))
    with pytest.raises(ValueError, match="shape"):
        storage_bytes((), 4)
    with pytest.raises(ValueError, match="shape"):
        storage_bytes((4, 0), 4)
    with pytest.raises(TypeError, match="shape"):
        storage_bytes([4, 4], 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shape"):
        bits_per_weight((4, 4.0), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        storage_bytes((4, 4), 16)
    with pytest.raises(ValueError, match="scale_bits"):
        storage_bytes((4, 4), 4, scale_bits=-1)
    with pytest.raises(TypeError, match="zero_point_bits"):
        storage_bytes((4, 4), 4, zero_point_bits=4.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="granularity"):
        storage_bytes((4, 4), 4, "per-channel")  # type: ignore[arg-type]


def test_code_range() -> None:
    assert [code_range(b, True) for b in (1, 2, 3, 4, 8)] == [(-1, 0), (-2, 1), (-4, 3), (-8, 7), (-128, 127)]
    assert [code_range(b, False) for b in (1, 2, 3, 4, 8)] == [(0, 1), (0, 3), (0, 7), (0, 15), (0, 255)]
    with pytest.raises(ValueError):
        code_range(9, True)


# ---------------------------------------------------------------------------------------------------------
# Regression tests (issue 8, section 5)
# ---------------------------------------------------------------------------------------------------------


def test_range_check_compares_integers_without_wrapping_to_the_dtype() -> None:
    """255 must not become int8's -1 before comparing: int8 codes 0..127 are valid unsigned 8-bit codes."""
    q = torch.tensor([5, 100, 0, 127], dtype=torch.int8)
    assert pack(q, 8, signed=False).tolist() == [5, 100, 0, 127]
    with pytest.raises(ValueError, match="code -5 at index"):
        pack(torch.tensor([-5, 100], dtype=torch.int8), 8, signed=False)
    assert pack(torch.tensor([255, 0], dtype=torch.int16), 8, signed=False).tolist() == [255, 0]
    assert pack(torch.tensor([15, 7], dtype=torch.int8), 4, signed=False).tolist() == [0x7F]
    with pytest.raises(ValueError, match="code 16"):
        pack(torch.tensor([16, 0], dtype=torch.int8), 4, signed=False)
    with pytest.raises(ValueError, match="code 128"):
        pack(torch.tensor([128, 0], dtype=torch.uint8), 8, signed=True)


@pytest.mark.parametrize("bits", BITS)
def test_empty_leading_dimension(bits: int) -> None:
    q = torch.zeros(0, 5, dtype=torch.int8)
    packed = pack(q, bits)
    assert packed.shape == (0, packed_length(5, bits)) and packed.dtype == torch.uint8
    codes = unpack(packed, bits, 5, signed=True)
    assert codes.shape == (0, 5) and codes.dtype == torch.int8
    assert pack(torch.zeros(2, 0, 3, dtype=torch.uint8), bits).shape == (2, 0, packed_length(3, bits))
    assert unpack(torch.zeros(3, 0, dtype=torch.uint8), bits, 0, signed=False).shape == (3, 0)


def test_code_range_needs_a_bool() -> None:
    with pytest.raises(TypeError, match="signed"):
        code_range(4, torch.tensor([]))  # type: ignore[arg-type]


@pytest.mark.parametrize("core", [packing.pack_reference, packing.unpack_reference, packing._storage_bytes])
def test_shown_cores_hold_no_argument_checks(core: object) -> None:
    source = inspect.getsource(core)  # type: ignore[arg-type]
    assert "raise" not in source and "_check" not in source


# ---------------------------------------------------------------------------------------------------------
# The fast path (issue 9) equals the reference bit for bit
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_fast_equals_reference_on_every_code_and_length(bits: int, signed: bool) -> None:
    """Every code at every position of a lane (8 positions cover both lane layouts), rows of every length up
    to three lanes (odd ones included), from every integer dtype that holds the codes."""
    qmin, qmax = code_range(bits, signed)
    codes = torch.arange(qmin, qmax + 1)  # (2^bits,)
    rows = torch.stack([torch.roll(codes, shift) for shift in range(8)])  # each code at each of 8 positions
    rows = torch.cat([rows, rows.flip(-1)], dim=-1)  # (8, 2^(bits+1))
    rows = rows.repeat(1, 1 + 32 // rows.shape[-1])  # at least 33 codes per row
    dtypes = [torch.int8, torch.int16, torch.int32, torch.int64] if signed else [torch.uint8, torch.int16]
    for dtype in dtypes:
        for length in [*range(1, 26), rows.shape[-1] - 1, rows.shape[-1]]:
            q = rows[:, :length].to(dtype)  # a view: not contiguous when length < the row
            packed = pack(q, bits, signed=signed)
            assert torch.equal(packed, packing.pack_reference(q, bits)), (dtype, length)
            back = unpack(packed, bits, length, signed=signed)
            assert torch.equal(back, packing.unpack_reference(packed, bits, length, signed=signed))
            assert torch.equal(back.long(), q.long())


def test_fast_path_handles_views_offsets_and_leading_dimensions() -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-4, 4, (5, 6, 34), generator=gen, dtype=torch.int8)
    views = [base[1:], base[:, 1:], base[..., 1:], base[..., ::2], base.transpose(0, 2), base[2, 3]]
    for bits in (3, 4, 8):
        for q in views:
            packed = pack(q, bits)
            assert torch.equal(packed, packing.pack_reference(q, bits))
            assert torch.equal(unpack(packed[..., :], bits, q.shape[-1], signed=True), q)
            shifted = torch.cat([packed, packed], dim=-1)[..., packed.shape[-1] :]  # a view at an odd offset
            assert torch.equal(unpack(shifted, bits, q.shape[-1], signed=True), q)


def test_pack_returns_new_memory() -> None:
    q = torch.tensor([1, -2, 3], dtype=torch.int8)
    packed = pack(q, 8)
    packed += 1
    assert q.tolist() == [1, -2, 3]
    codes = unpack(packed, 8, 3, signed=True)
    codes += 1
    assert packed.tolist() == [2, 255, 4]
