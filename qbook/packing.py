"""Sub-byte storage (低比特存储): int4, int3, int2 codes packed into bytes, and their true size — chapter 6.

PyTorch has no 4-bit integer dtype that computes, so a quantized int4 weight lives in an ``int8`` tensor and
wastes half of every byte. :func:`pack` removes the waste. Along the last dimension it writes the codes as
one little-endian **bit stream**: code ``i`` occupies bits ``[bits * i, bits * (i + 1))``, the first code in
the lowest bits of the first byte (the order of ONNX's ``INT4``, ``INT2`` and 6-bit float types)::

    bits = 4:   byte i = (q[2i+1] & 0xF) << 4 | (q[2i] & 0xF)                 [1, 2] -> 0x21
                bit   7 6 5 4 | 3 2 1 0
                      q[2i+1] | q[2i]

    bits = 2:   byte i = q[4i+3] << 6 | q[4i+2] << 4 | q[4i+1] << 2 | q[4i]   (each & 0b11)

    bits = 3:   eight codes in three bytes; q[2] straddles bytes 0 and 1, q[5] bytes 1 and 2
                byte 0: q2[1:0] q1 q0 | byte 1: q5[0] q4 q3 q2[2] | byte 2: q7 q6 q5[2:1]

A row of ``L`` codes takes ``ceil(L * bits / 8)`` bytes; unused bits of the last byte are zero, and
:func:`unpack` needs ``L`` back to know where the row ends. Signed codes are stored in two's complement
within their field (-1 -> ``0xF`` for int4), unsigned codes as they are; :func:`unpack` sign-extends or
not, so it must be told which. ``bits = 8`` is the identity on the bytes (int8 reinterpreted as uint8).

:func:`pack_reference` and :func:`unpack_reference` compute the layout the way the text explains it
(int64 blocks of ``lcm(bits, 8)`` bits); :func:`pack` and :func:`unpack` check their arguments and give the
same bytes.

:func:`storage_bytes` and :func:`bits_per_weight` count what a quantized weight really costs: the packed
codes plus one scale (and optionally one zero point) per group of :mod:`qbook.granularity`,

    bits/weight = bits + (scale_bits + zero_point_bits) / (weights per scale)               (6.1)

e.g. int4 with an fp16 scale per group of 128: 4 + 16/128 = 4.125.

>>> import torch
>>> q = torch.tensor([1, 2, -1, -8, 7], dtype=torch.int8)     # five int4 codes
>>> p = pack(q, bits=4)
>>> [hex(b) for b in p.tolist()]                              # 0x21, then 0x8F (-8 high, -1 low), then 0x07
['0x21', '0x8f', '0x7']
>>> unpack(p, bits=4, length=5, signed=True)
tensor([ 1,  2, -1, -8,  7], dtype=torch.int8)
"""

from __future__ import annotations

import math
import sys

import torch

from qbook.granularity import Granularity, PerChannel, PerGroup, PerTensor, qparam_count

__all__ = ["BITS", "bits_per_weight", "code_range", "pack", "packed_length", "storage_bytes", "unpack"]

#: Code widths that :func:`pack` supports.
BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: object) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if bits not in BITS:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def _check_length(length: object) -> int:
    if not isinstance(length, int) or isinstance(length, bool):
        raise TypeError(f"length must be an int, got {length!r}")
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    return length


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-wide field: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]``
    unsigned.

    >>> code_range(4, signed=True), code_range(4, signed=False), code_range(3, signed=True)
    ((-8, 7), (0, 15), (-4, 3))
    """
    _check_bits(bits)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def packed_length(length: int, bits: int) -> int:
    """Bytes that :func:`pack` uses for a last dimension of ``length`` codes: ``ceil(length * bits / 8)``.

    >>> packed_length(5, 4), packed_length(5, 2), packed_length(8, 3), packed_length(5, 8)
    (3, 2, 3, 5)
    """
    return -(-_check_length(length) * _check_bits(bits) // 8)


def _block(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of the smallest whole block: ``lcm(bits, 8)`` bits, e.g. 8 int3 codes in 3 bytes."""
    block_bits = math.lcm(bits, 8)
    return block_bits // bits, block_bits // 8


def pack(q: torch.Tensor, bits: int, *, signed: bool | None = None) -> torch.Tensor:
    """Pack integer codes into a ``uint8`` bit stream along the last dimension — chapter 6.

    Bit ``t`` of code ``q[..., i]`` (``mod 2^bits``, i.e. two's complement for negative codes) becomes bit
    ``bits * i + t`` of the row's stream, and byte ``k`` holds stream bits ``[8k, 8k + 8)``. For ``bits`` that
    divide 8 this is ``byte[..., i] = sum_j (q[..., n*i + j] mod 2^bits) * 2^(bits * j)`` with
    ``n = 8 / bits``. A last dimension of length ``L`` gives ``ceil(L * bits / 8)`` bytes.

    ``signed`` defaults to the signedness of ``q``'s dtype (``uint8`` unsigned, ``int8``/``int16``/``int32``/
    ``int64`` signed); pass it to pack, say, unsigned codes held in an ``int32`` tensor. A code outside
    :func:`code_range` is a ``ValueError``; a float or bool tensor a ``TypeError``.

    >>> import torch
    >>> pack(torch.tensor([[1, 2], [3, 4]], dtype=torch.int8), bits=4)   # (2, 2) -> (2, 1)
    tensor([[33],
            [67]], dtype=torch.uint8)
    >>> pack(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), bits=2)       # 0b11_10_01_00
    tensor([228], dtype=torch.uint8)
    >>> pack(torch.tensor([-1, 0, 0, 0, 0, 0, 0, -4]), bits=3)            # 8 codes, 3 bytes: 0x07 0x00 0x80
    tensor([  7,   0, 128], dtype=torch.uint8)
    """
    bits = _check_bits(bits)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be an integer torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must hold integer codes, got dtype {q.dtype}; quantize it first")
    if q.ndim == 0:
        raise ValueError("q must have at least one dimension to pack along; got a 0-d tensor")
    if signed is None:
        signed = q.dtype.is_signed
    elif not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool or None, got {signed!r}")
    _check_codes(q, bits, signed)
    return _pack(q, bits)


def pack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` as the book explains it, in int64 blocks of ``lcm(bits, 8)`` bits; no argument checks.

    Each block of codes becomes one integer ``sum_j (q_j mod 2^bits) * 2^(bits * j)``, cut into bytes. The
    public :func:`pack` checks its arguments first and equals this bit for bit.
    """
    per_block, bytes_per_block = _block(bits)  # e.g. 8 int3 codes in 3 bytes
    length = q.shape[-1]
    fields = q.to(torch.int64) & (2**bits - 1)  # two's complement in the low `bits` bits
    fields = torch.nn.functional.pad(fields, (0, -length % per_block))
    n_blocks = -(-length // per_block)
    fields = fields.reshape(*q.shape[:-1], n_blocks, per_block)  # (..., blocks, codes per block)
    shifts = torch.arange(per_block, device=q.device) * bits
    stream = (fields << shifts).sum(dim=-1, keepdim=True)  # (..., blocks, 1): disjoint fields, sum == or
    byte_shifts = torch.arange(bytes_per_block, device=q.device) * 8
    packed = ((stream >> byte_shifts) & 0xFF).to(torch.uint8)  # (..., blocks, bytes per block)
    packed = packed.flatten(-2)  # (..., bytes in whole blocks)
    return packed[..., : -(-length * bits // 8)].contiguous()  # (..., ceil(L * bits / 8))


def _check_codes(q: torch.Tensor, bits: int, signed: bool) -> None:
    """Every code in :func:`code_range`, compared as integers (a bound like 255 never wraps to q's dtype)."""
    if q.numel() == 0:
        return
    qmin, qmax = code_range(bits, signed)
    low, high = (int(v) for v in torch.aminmax(q))
    if qmin <= low and high <= qmax:
        return
    wide = q.to(torch.int64)
    index = tuple(int(i) for i in ((wide < qmin) | (wide > qmax)).nonzero()[0])
    kind = "signed" if signed else "unsigned"
    other_min, other_max = code_range(bits, not signed)
    fits_other = other_min <= low and high <= other_max
    hint = f"; pass signed={not signed} for {'un' * signed}signed codes" if fits_other else ""
    raise ValueError(
        f"code {q[index].item()} at index {index} is outside [{qmin}, {qmax}], the range of {kind} "
        f"{bits}-bit codes{hint}"
    )


def unpack(packed: torch.Tensor, bits: int, length: int, *, signed: bool) -> torch.Tensor:
    """Undo :func:`pack`: ``length`` codes per last-dimension row, as int8 (signed) or uint8 — chapter 6.

    Code ``i`` is stream bits ``[bits * i, bits * (i + 1))``, sign-extended when ``signed`` (a field
    ``f >= 2^(bits-1)`` stands for ``f - 2^bits``). ``packed`` must be ``uint8`` with
    ``ceil(length * bits / 8)`` bytes in its last dimension, and the stream bits after the last code must be
    zero (a wrong ``length`` that happens to need as many bytes is caught this way).

    >>> import torch
    >>> unpack(torch.tensor([0x21, 0xF7], dtype=torch.uint8), bits=4, length=4, signed=True)
    tensor([ 1,  2,  7, -1], dtype=torch.int8)
    >>> unpack(torch.tensor([0x21, 0xF7], dtype=torch.uint8), bits=4, length=4, signed=False)
    tensor([ 1,  2,  7, 15], dtype=torch.uint8)
    """
    bits = _check_bits(bits)
    length = _check_length(length)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a torch.uint8 tensor (the output of pack), got {got}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one dimension; got a 0-d tensor")
    n_bytes = packed_length(length, bits)
    if packed.shape[-1] != n_bytes:
        raise ValueError(
            f"length {length} at {bits} bits needs {n_bytes} bytes in the last dimension, "
            f"but packed has {packed.shape[-1]} (shape {tuple(packed.shape)})"
        )
    _check_padding(packed, bits, length)
    return _unpack(packed, bits, length, signed)


def _check_padding(packed: torch.Tensor, bits: int, length: int) -> None:
    """The stream bits after the last code (the high bits of each row's last byte) must be zero."""
    used = length * bits - 8 * (packed.shape[-1] - 1)  # bits of the last byte that hold codes, 1..8
    if packed.shape[-1] and used < 8 and bool((packed[..., -1] >> used).any()):
        raise ValueError(
            f"the stream bits after code {length} are not zero: packed holds more than {length} codes "
            "per row; pass the length that was packed"
        )


def unpack_reference(packed: torch.Tensor, bits: int, length: int, *, signed: bool) -> torch.Tensor:
    """:func:`unpack` as the book explains it, in int64 blocks, without argument checks."""
    per_block, bytes_per_block = _block(bits)
    n_bytes = packed.shape[-1]
    data = torch.nn.functional.pad(packed.to(torch.int64), (0, -n_bytes % bytes_per_block))
    n_blocks = -(-n_bytes // bytes_per_block)
    data = data.reshape(*packed.shape[:-1], n_blocks, bytes_per_block)  # (..., blocks, bytes per block)
    byte_shifts = torch.arange(bytes_per_block, device=packed.device) * 8
    stream = (data << byte_shifts).sum(dim=-1, keepdim=True)  # (..., blocks, 1)
    shifts = torch.arange(per_block, device=packed.device) * bits
    fields = (stream >> shifts) & (2**bits - 1)  # (..., blocks, codes per block)
    fields = fields.flatten(-2)[..., :length]  # (..., L)
    if signed:
        fields = fields - ((fields >> (bits - 1)) << bits)  # sign extension: f - 2^bits if the top bit is set
        return fields.to(torch.int8)
    return fields.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# The fast path: the same bytes as pack_reference / unpack_reference, computed in wide "lanes" (SWAR)
# ---------------------------------------------------------------------------------------------------------
#
# A lane is a group of codes, one per byte, read as one wider integer: 8 / bits codes (int16 for int4,
# int32 for int2, int64 for int1) when bits divides 8, else 8 codes in an int64 (8 int3 codes -> 3 bytes).
# Packing merges neighbouring fields in log2(codes per lane) steps: step l joins pairs of sub-lanes of
# ``sub = 8 * 2^(l-1)`` bits, each holding ``w = bits * 2^(l-1)`` data bits, by moving the upper one down by
# ``sub - w`` bits. After the last step the lane's low ``8 * bits`` bits are the stream of its codes
# (little-endian, so byte order is stream order). Unpacking runs the steps backwards. Every step is a few
# whole-tensor integer operations, with no int64 temporaries per code and no Python loop over codes. Only
# little-endian hosts take this path.

_LANE_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # codes per lane -> lane dtype


def _repeat(pattern: int, period: int, width: int) -> int:
    """``pattern`` repeated every ``period`` bits across a ``width``-bit integer."""
    return sum(pattern << (period * i) for i in range(width // period))


def _lane_codes(bits: int) -> int:
    return 8 // bits if 8 % bits == 0 else 8


def _steps(bits: int) -> list[tuple[int, int, int]]:
    """``(shift, low_mask, high_mask)`` of each merge step: the data kept in place and the data moved."""
    lane_bits = 8 * _lane_codes(bits)
    steps = []
    sub, w = 8, bits
    while sub < lane_bits:
        low = _repeat(2**w - 1, 2 * sub, lane_bits)  # data of the lower sub-lane of each pair
        high = _repeat((2**w - 1) << w, 2 * sub, lane_bits)  # where the upper sub-lane's data lands
        steps.append((sub - w, low, high))
        sub, w = 2 * sub, 2 * w
    return steps


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_reference` on checked codes, in lanes; bit for bit the same bytes."""
    *lead, length = q.shape
    n_bytes = -(-length * bits // 8)
    if q.numel() == 0 or sys.byteorder != "little":
        return pack_reference(q, bits)
    if q.dtype == torch.int8:
        u = q.view(torch.uint8)  # two's complement bytes
    elif q.dtype == torch.uint8:
        u = q
    else:
        u = q.to(torch.uint8)  # the low byte, modulo 256
    if bits == 8:
        return u.clone(memory_format=torch.contiguous_format) if u.data_ptr() == q.data_ptr() else u
    per_lane = _lane_codes(bits)
    pad = -length % per_lane
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # zero codes fill the last lane
    elif not u.is_contiguous() or u.storage_offset() % per_lane:
        u = u.clone(memory_format=torch.contiguous_format)
    x = u.view(_LANE_DTYPES[per_lane]) & _repeat(2**bits - 1, 8, 8 * per_lane)  # (..., lanes): fields only
    steps = _steps(bits)
    for step, (shift, low, high) in enumerate(steps, start=1):
        if 2 * bits <= 8:  # the moved data never lands on data still in place: one or, one mask
            x |= x >> shift
            if step < len(steps):  # after the last step only bytes that are kept hold data
                x &= low | high
        else:
            moved = (x >> shift) & high
            x &= low
            x |= moved
    if 8 % bits == 0:
        out = x.to(torch.uint8)  # (..., bytes): one byte per lane
    else:
        lanes = x.shape[-1]
        out = x.view(torch.uint8).reshape(*lead, lanes, 8)[..., :bits].reshape(*lead, lanes * bits)
    return out[..., :n_bytes].contiguous() if pad else out


def _unpack(packed: torch.Tensor, bits: int, length: int, signed: bool) -> torch.Tensor:
    """:func:`unpack_reference` on checked bytes, in lanes; bit for bit the same codes."""
    *lead, n_bytes = packed.shape
    if packed.numel() == 0 or length == 0 or sys.byteorder != "little":
        return unpack_reference(packed, bits, length, signed=signed)
    if bits == 8:
        return (packed.view(torch.int8) if signed else packed).clone(memory_format=torch.contiguous_format)
    per_lane = _lane_codes(bits)
    if 8 % bits == 0:
        x = packed.to(_LANE_DTYPES[per_lane])  # (..., lanes): each byte in its own lane
    else:
        lanes = -(-n_bytes // bits)  # a lane's ``bits`` bytes hold 8 codes
        blocks = torch.zeros(*lead, lanes, 8, dtype=torch.uint8, device=packed.device)  # (..., lanes, 8)
        stream = torch.nn.functional.pad(packed, (0, lanes * bits - n_bytes))  # (..., lanes * bits)
        blocks[..., :bits] = stream.reshape(*lead, lanes, bits)
        x = blocks.view(torch.int64).reshape(*lead, lanes)
    for shift, low, high in reversed(_steps(bits)):
        upper = high << shift  # where the upper sub-lane's data goes back to
        if 2 * bits <= 8:
            x |= x << shift
            x &= low | upper
        else:
            moved = (x << shift) & upper
            x &= low
            x |= moved
    codes = x.view(torch.uint8).reshape(*lead, -1)  # (..., lanes * codes per lane), unsigned fields
    if signed:
        half = 2 ** (bits - 1)
        codes ^= half
        codes -= half  # f - 2^bits when the top bit is set, in uint8 arithmetic
        codes = codes.view(torch.int8)
    return codes[..., :length].contiguous()


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}")
    if len(shape) == 0 or any(n < 1 for n in shape):
        raise ValueError(f"shape must have at least one dimension and positive sizes, got {shape}")
    return shape


def _check_param_bits(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def storage_bytes(
    shape: tuple[int, ...] | torch.Size,
    bits: int,
    granularity: Granularity | None = None,
    *,
    scale_bits: int = 16,
    zero_point_bits: int = 0,
) -> int:
    """True size in bytes of a ``bits``-bit quantized tensor of ``shape`` with its parameters — chapter 6.

    ``bytes = prod(shape[:-1]) * ceil(shape[-1] * bits / 8) + ceil(P * scale_bits / 8)
    + ceil(P * zero_point_bits / 8)``

    with ``P = qparam_count(shape, granularity)`` scales (and as many zero points). The codes are packed
    along the last dimension by :func:`pack` (each row padded to whole bytes); the parameters are stored
    densely. ``zero_point_bits = 0`` means symmetric quantization (no zero point stored); asymmetric
    schemes store it in ``bits`` bits (it lies on the grid) or as fp16. ``granularity`` defaults to
    per-tensor.

    >>> storage_bytes((4096, 4096), 4, PerGroup(axis=1, group_size=128))   # 8 MiB of codes + 256 KiB scales
    8650752
    >>> storage_bytes((3, 5), 4, PerChannel(0), scale_bits=32, zero_point_bits=8)   # 3*3 + 12 + 3
    24
    """
    shape = _check_shape(shape)
    bits = _check_bits(bits)
    granularity = PerTensor() if granularity is None else granularity
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        raise TypeError(f"granularity must be PerTensor, PerChannel or PerGroup, got {granularity!r}")
    scale_bits = _check_param_bits(scale_bits, "scale_bits")
    zero_point_bits = _check_param_bits(zero_point_bits, "zero_point_bits")
    qparam_count(shape, granularity)  # checks that the granularity fits the shape
    return _storage_bytes(shape, bits, granularity, scale_bits, zero_point_bits)


def _storage_bytes(
    shape: tuple[int, ...], bits: int, granularity: Granularity, scale_bits: int, zero_point_bits: int
) -> int:
    """Packed codes (whole bytes per row) plus ``P`` scales and ``P`` zero points, stored densely."""
    n_params = qparam_count(shape, granularity)  # P: one per tensor, channel or group
    codes = math.prod(shape[:-1]) * -(-shape[-1] * bits // 8)  # rows * ceil(L * bits / 8)
    return codes + -(-n_params * scale_bits // 8) + -(-n_params * zero_point_bits // 8)


def bits_per_weight(
    shape: tuple[int, ...] | torch.Size,
    bits: int,
    granularity: Granularity | None = None,
    *,
    scale_bits: int = 16,
    zero_point_bits: int = 0,
) -> float:
    """Average storage per element in bits, parameters included: ``8 * storage_bytes(...) / numel`` — (6.1).

    For shapes whose rows fill whole bytes this is ``bits + (scale_bits + zero_point_bits) * P / numel``.

    >>> w = (4096, 4096)
    >>> bits_per_weight(w, 4, PerGroup(1, 128))                        # fp16 scale: 4 + 16/128
    4.125
    >>> bits_per_weight(w, 4, PerGroup(1, 128), zero_point_bits=4)     # + int4 zero point: 4 + 20/128
    4.15625
    >>> bits_per_weight(w, 4, PerGroup(1, 128), zero_point_bits=16)    # + fp16 zero point: 4 + 32/128
    4.25
    >>> bits_per_weight(w, 3, PerChannel(0))                           # int3, one fp16 scale per row
    3.00390625
    """
    shape = _check_shape(shape)
    return 8 * storage_bytes(shape, bits, granularity, scale_bits=scale_bits,
                             zero_point_bits=zero_point_bits) / math.prod(shape)
