r"""Scaled and block-scaled floating point (块缩放浮点格式): FP8 with scales, MX formats, NVFP4 — chapter 12.

A float element format alone (chapter 2) has a fixed range: FP4 E2M1 holds ``0, ±0.5, ..., ±6``. A **scale**
moves that grid to the data, as the integer scale of chapter 3 does, and a **block** of elements sharing one
scale (chapter 6's group) lets it follow the data's local magnitude. Three families are in use:

* **FP8 with FP32 scales** (:func:`quantize_fp8`): ``scale = amax / 448`` per tensor, per row, or per 2-D
  block; DeepSeek-V3 trains with E4M3 on ``1 x 128`` activation tiles and ``128 x 128`` weight blocks.
* **OCP Microscaling (MX)** (:func:`quantize_mx`): blocks of 32 elements (FP8, FP6, FP4 or INT8) share an
  8-bit **E8M0** scale, a pure power of two ``X = 2^(code - 127)`` (code 255 is NaN). Following the MX v1.0
  specification (its Algorithm 1, section 6.3), with ``emax_elem`` the exponent of the element format's
  largest normal number,

  .. math::

      \text{shared\_exp} = \lfloor \log_2 \max_i |V_i| \rfloor - \text{emax}_\text{elem}, \qquad
      X = 2^{\text{shared\_exp}}, \qquad P_i = \text{round}(\text{clamp}(V_i / X))          \qquad (12.1)

  rounding to nearest, ties to even, and clamping to the element's largest normal number (saturation).
  The scale exponent is clamped to E8M0's ``[-127, 127]``. A block whose largest magnitude is ±inf or NaN
  has no such exponent: it gets the NaN scale, and the whole block decodes to NaN (E8M0 has no inf), as in
  Microsoft's ``microxcaling`` library that accompanies the specification; its element codes are 0.
* **NVFP4** (:func:`quantize_nvfp4`): FP4 E2M1 elements in blocks of 16 with an FP8 E4M3 block scale and one
  FP32 scale per tensor (NVIDIA, "Pretraining Large Language Models with NVFP4", 2025, and Transformer
  Engine), with ``s_enc = 6 * 448 / amax(x)`` and ``s_dec = 1 / s_enc``:

  .. math::

      S_b = \text{e4m3}\big(\text{amax}_b \cdot (s_\text{enc} / 6)\big), \qquad
      P_i = \text{round}_\text{E2M1}\big(\text{clamp}(x_i \cdot 1/(S_b\, s_\text{dec}))\big), \qquad
      \hat x_i = P_i \cdot S_b \cdot s_\text{dec}                                               \qquad (12.2)

Storage (:class:`BlockFormat`): MXFP4 costs ``4 + 8/32 = 4.25`` bits per element, NVFP4 ``4 + 8/16 = 4.5``
(plus 32 bits per tensor). :func:`pack_codes` stores FP4 codes two per byte, the first in the low nibble:
the layout of ``torch.float4_e2m1fn_x2``. E8M0 scales are ``uint8`` codes, bit for bit
``torch.float8_e8m0fnu``.

Tests: ``tests/test_mx.py`` checks every function bit for bit against a reference written from the published
definitions (element values enumerated from the bit fields, nearest value with ties to the even code, the
shared exponent by ``frexp``; NVIDIA's recipe in float32), against PyTorch's own ``float8_e4m3fn``,
``float8_e5m2`` and ``float8_e8m0fnu`` casts and the ``float4_e2m1fn_x2`` layout;
``benchmarks/check_mx_torchao.py`` compares with torchao's MX and NVFP4 emulation.

>>> codes, scales = quantize_mx(torch.tensor([0.3, -1.0, 2.5, 5.0]), FP4_E2M1, block_size=4)
>>> scales            # floor(log2 5.0) - 2 = 0: X = 2^0, code 127
tensor([127], dtype=torch.uint8)
>>> dequantize_mx(codes, scales, FP4_E2M1)
tensor([ 0.5000, -1.0000,  2.0000,  4.0000])
>>> MXFP4.bits_per_element, NVFP4.bits_per_element
(4.25, 4.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import Tensor

from qbook.affine import dequantize, quantize
from qbook.formats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FloatFormat,
    decode,
    round_to_format,
)
from qbook.granularity import PerBlock, PerTensor, minmax
from qbook.packing import pack, unpack

__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "ELEMENTS",
    "INT8",
    "MXFP4",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXINT8",
    "NVFP4",
    "BlockFormat",
    "IntElement",
    "dequantize_fp8",
    "dequantize_mx",
    "dequantize_nvfp4",
    "e8m0_to_float",
    "fake_quantize_blocks",
    "pack_codes",
    "quantize_fp8",
    "quantize_mx",
    "quantize_nvfp4",
    "unpack_codes",
]

#: E8M0: the code ``c`` (a uint8) is the scale ``2^(c - 127)``; ``255`` is NaN. No sign, no zero, no inf.
E8M0_BIAS = 127
E8M0_NAN = 255
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class IntElement:
    """MXINT8's element: an 8-bit two's-complement integer read with 6 fraction bits (``code / 64``).

    Its largest normal number is ``1.xxx * 2^0`` (``emax = 0``), so ``X`` maps a block's largest magnitude
    into ``[1, 2)``. Codes are clamped to ``[-127, 127]`` (``max = 127/64``), symmetric as in
    ``microxcaling``; the code ``-128`` (``-2.0``) is never produced but decodes.
    """

    name: str = "INT8"
    total_bits: int = 8
    fraction_bits: int = 6

    @property
    def emax(self) -> int:
        return self.total_bits - 2 - self.fraction_bits

    @property
    def max(self) -> float:
        return (2 ** (self.total_bits - 1) - 1) / 2**self.fraction_bits


INT8 = IntElement()
Element = FloatFormat | IntElement
#: The element formats of the OCP MX v1.0 specification.
ELEMENTS: tuple[Element, ...] = (FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1, INT8)


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``element`` values, one ``scale``-typed scale per ``block_size`` elements.

    ``scale="E8M0"`` is an MX format (power-of-two scale); ``scale="E4M3"`` is NVFP4's FP8 block scale, which
    comes with one FP32 scale per tensor (not counted in :attr:`bits_per_element`).
    """

    name: str
    element: Element
    block_size: int
    scale: Literal["E8M0", "E4M3"] = "E8M0"

    @property
    def bits_per_element(self) -> float:
        """``element bits + 8 / block_size``: the true storage per element, scale included (6.1)."""
        return self.element.total_bits + 8 / self.block_size


MXFP8_E4M3 = BlockFormat("MXFP8 (E4M3)", FP8_E4M3, 32)
MXFP8_E5M2 = BlockFormat("MXFP8 (E5M2)", FP8_E5M2, 32)
MXFP6_E3M2 = BlockFormat("MXFP6 (E3M2)", FP6_E3M2, 32)
MXFP6_E2M3 = BlockFormat("MXFP6 (E2M3)", FP6_E2M3, 32)
MXFP4 = BlockFormat("MXFP4", FP4_E2M1, 32)
MXINT8 = BlockFormat("MXINT8", INT8, 32)
NVFP4 = BlockFormat("NVFP4", FP4_E2M1, 16, scale="E4M3")


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------
def _check_x(x: object, fn: str) -> Tensor:
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{fn} expects a floating-point tensor, got {got}")
    if x.ndim == 0:
        raise ValueError(f"{fn} needs at least one dimension to cut into blocks, got a 0-d tensor")
    return x.float()  # bf16/fp16 exactly; float64 rounds to float32 first


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def _check_element(element: object, fn: str) -> Element:
    if not isinstance(element, (FloatFormat, IntElement)):
        raise TypeError(f"{fn} expects an MX element format such as qbook.formats.FP4_E2M1, got {element!r}")
    if element not in ELEMENTS:
        names = ", ".join(e.name for e in ELEMENTS)
        raise ValueError(f"{element.name} is not an MX element format; the OCP MX v1.0 elements are {names}")
    return element


def _check_block_size(block_size: object, length: int, axis: int, shape: tuple[int, ...]) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if length % block_size:
        raise ValueError(
            f"block_size {block_size} does not divide the length {length} of axis {axis} (shape {shape}); "
            f"pad the tensor to a multiple of {block_size} first"
        )
    return block_size


def _check_finite(x: Tensor, fn: str, why: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "±inf"
        raise ValueError(f"{fn}: the input contains {kind}, which {why}")


# --------------------------------------------------------------------------------------------------------
# E8M0 and element codes
# --------------------------------------------------------------------------------------------------------
def e8m0_to_float(scales: Tensor) -> Tensor:
    """The float32 value ``2^(code - 127)`` of E8M0 codes (``uint8``, or a ``torch.float8_e8m0fnu`` view).

    Code 0 is ``2^-127`` (a float32 subnormal), 254 is ``2^127``, 255 is NaN. Equal, bit for bit, to
    ``scales.view(torch.float8_e8m0fnu).float()``.

    >>> e8m0_to_float(torch.tensor([127, 130, 0, 255], dtype=torch.uint8))
    tensor([1.0000e+00, 8.0000e+00, 5.8775e-39,        nan])
    """
    if isinstance(scales, Tensor) and scales.dtype == torch.float8_e8m0fnu:
        scales = scales.view(torch.uint8)
    if not isinstance(scales, Tensor) or scales.dtype != torch.uint8:
        got = f"dtype {scales.dtype}" if isinstance(scales, Tensor) else type(scales).__name__
        raise TypeError(f"E8M0 scales must be a uint8 (or float8_e8m0fnu) tensor, got {got}")
    return _e8m0_to_float(scales)


def _e8m0_to_float(code: Tensor) -> Tensor:
    """``2^(code - 127)`` from float32 bits: the code is the exponent field; 0 is the subnormal ``2^-127``."""
    code = code.to(torch.int32)
    bits = torch.where(code > 0, code << 23, 1 << 22)  # 2^-127 = 0x00400000
    return torch.where(code == E8M0_NAN, math.nan, bits.view(torch.float32))


def _code_dtype(element: Element) -> torch.dtype:
    if isinstance(element, IntElement):
        return torch.int8
    return element.torch_dtype if element.total_bits == 8 else torch.uint8


def _to_codes(p: Tensor, element: Element) -> Tensor:
    """Element values (float32, on the grid) -> codes: ``int8`` for INT8; else the sign bit over the index of
    ``|p|`` among the format's non-negative values (codes ``0, 1, ...`` ascend), viewed as the torch dtype."""
    if isinstance(element, IntElement):
        return (p * 2**element.fraction_bits).to(torch.int8)
    sign = torch.signbit(p).to(torch.uint8) << (element.total_bits - 1)
    code = torch.searchsorted(_magnitudes(element), p.abs().contiguous()).to(torch.uint8) | sign
    return code.view(element.torch_dtype) if element.total_bits == 8 else code


@cache
def _value_table(element: FloatFormat) -> Tensor:
    return decode(torch.arange(2**element.total_bits), element)  # (2^bits,) value of every code


@cache
def _magnitudes(element: FloatFormat) -> Tensor:
    """The finite non-negative values, in code order (ascending): codes ``0 .. n - 1`` with sign bit 0."""
    positive = _value_table(element)[: 2 ** (element.total_bits - 1)]
    return positive[torch.isfinite(positive)].contiguous()


def _element_values(codes: Tensor, element: Element) -> Tensor:
    """Codes -> float32 element values."""
    if isinstance(element, IntElement):
        return codes.float() / 2**element.fraction_bits
    if element.total_bits == 8:
        return codes.float()
    return _value_table(element)[codes.long()]


def _round_element(v: Tensor, element: Element) -> Tensor:
    """Round to the element grid, ties to even, saturating at ±max ("clamping normal numbers")."""
    v = v.clamp(-element.max, element.max)
    if isinstance(element, IntElement):
        step = 2.0**-element.fraction_bits
        return torch.round(v / step) * step  # torch.round: half to even
    return round_to_format(v, element)


# --------------------------------------------------------------------------------------------------------
# MX
# --------------------------------------------------------------------------------------------------------
def quantize_mx(
    x: Tensor, element_format: Element, block_size: int = 32, axis: int = -1
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to an OCP MX format: ``block_size`` consecutive elements along ``axis`` share a scale.

    Returns ``(codes, scales)``. ``codes`` has the shape of ``x``: ``torch.float8_e4m3fn`` /
    ``torch.float8_e5m2`` for FP8 elements, ``uint8`` bit fields (``s << (E + M) | e << M | f``) for FP6 and
    FP4, ``int8`` for INT8. ``scales`` are E8M0 codes (``uint8``) of shape ``x.shape`` with ``axis`` divided
    by ``block_size``. The math is (12.1) (core: ``_quantize_mx``). ``block_size`` must divide the axis.

    >>> codes, scales = quantize_mx(torch.tensor([[1.0, 96.0], [0.0, 0.0]]), FP8_E4M3, block_size=2)
    >>> scales.flatten().tolist()        # 96 = 1.5 * 2^6: shared_exp = 6 - 8 = -2; zeros: the smallest scale
    [125, 0]
    >>> codes.float()                    # 1 / 2^-2 = 4, 96 / 2^-2 = 384
    tensor([[  4., 384.],
            [  0.,   0.]])
    """
    x = _check_x(x, "quantize_mx")
    element = _check_element(element_format, "quantize_mx")
    axis = _check_axis(axis, x.ndim)
    _check_block_size(block_size, x.shape[axis], axis, tuple(x.shape))
    blocks = x.movedim(axis, -1).unflatten(-1, (-1, block_size))  # (..., L // k, k)
    p, scale_codes = _quantize_mx(blocks, element)
    codes = _to_codes(p, element).flatten(-2).movedim(-1, axis)
    return codes, scale_codes.squeeze(-1).movedim(-1, axis)


def _mx_scale_codes(amax: Tensor, emax_elem: int) -> Tensor:
    """E8M0 codes of ``X = 2^(floor(log2 amax) - emax_elem)`` (12.1), clamped to ``[2^-127, 2^127]``."""
    _, e = torch.frexp(amax)  # amax = m * 2^e with 0.5 <= m < 1, so floor(log2 amax) = e - 1
    shared_exp = torch.where(amax > 0, e - 1 - emax_elem, -E8M0_BIAS)  # log2(0) = -inf: the smallest scale
    code = (shared_exp.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isfinite(amax), code, E8M0_NAN)  # ±inf or NaN in the block: NaN scale


def _quantize_mx(blocks: Tensor, element: Element) -> tuple[Tensor, Tensor]:
    """(12.1) on ``blocks`` ``(..., k)``: element values ``(..., k)`` and E8M0 scale codes ``(..., 1)``."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # (..., 1), NaN if the block has a NaN
    scale_codes = _mx_scale_codes(amax, element.emax)
    X = _e8m0_to_float(scale_codes)  # a power of two: V / X is exact
    v = torch.where(scale_codes == E8M0_NAN, 0.0, blocks / X)
    return _round_element(v, element), scale_codes


def dequantize_mx(codes: Tensor, scales: Tensor, element_format: Element, axis: int = -1) -> Tensor:
    """``x_hat = P_i * X`` in float32: the value of MX ``codes`` with their E8M0 ``scales`` (inverse of
    :func:`quantize_mx`; the block size is ``codes.shape[axis] // scales.shape[axis]``). A NaN scale (255)
    makes its whole block NaN.

    >>> codes, scales = torch.tensor([2, 7], dtype=torch.uint8), torch.tensor([130], dtype=torch.uint8)
    >>> dequantize_mx(codes, scales, FP4_E2M1)          # (1.0, 6.0) * 2^3
    tensor([ 8., 48.])
    """
    element = _check_element(element_format, "dequantize_mx")
    if not isinstance(codes, Tensor) or codes.dtype != _code_dtype(element):
        got = f"dtype {codes.dtype}" if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"{element.name} codes must be a {_code_dtype(element)} tensor, got {got}")
    if isinstance(scales, Tensor) and scales.dtype == torch.float8_e8m0fnu:
        scales = scales.view(torch.uint8)
    if not isinstance(scales, Tensor) or scales.dtype != torch.uint8:
        raise TypeError(f"scales must be E8M0 codes in a uint8 tensor, got {scales!r:.60}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dimension")
    axis = _check_axis(axis, codes.ndim)
    if codes.dtype == torch.uint8 and bool((codes >= 2**element.total_bits).any()):
        raise ValueError(f"{element.name} codes must lie in [0, {2**element.total_bits - 1}]")
    n_blocks = scales.shape[axis] if scales.ndim == codes.ndim else 0
    expected = [n if d != axis else n_blocks for d, n in enumerate(codes.shape)]
    if n_blocks == 0 or codes.shape[axis] % n_blocks or list(scales.shape) != expected:
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not fit codes of shape {tuple(codes.shape)}: expected "
            f"the codes' shape with axis {axis} divided by the block size"
        )
    block_size = codes.shape[axis] // scales.shape[axis]
    p = _element_values(codes, element).movedim(axis, -1).unflatten(-1, (-1, block_size))  # (..., L // k, k)
    x_hat = _dequantize_mx(p, scales.movedim(axis, -1).unsqueeze(-1))
    return x_hat.flatten(-2).movedim(-1, axis)


def _dequantize_mx(p: Tensor, scale_codes: Tensor) -> Tensor:
    """``x_hat = P * X``: element values ``(..., k)`` times the block's power of two ``(..., 1)``."""
    return p * _e8m0_to_float(scale_codes)


# --------------------------------------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------------------------------------
def quantize_nvfp4(
    x: Tensor, axis: int = -1, tensor_amax: float | Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` to NVFP4: FP4 E2M1 codes in blocks of 16 along ``axis``, one E4M3 scale per block and
    one FP32 scale per tensor, by (12.2) (core: ``_quantize_nvfp4``).

    Returns ``(codes, block_scales, tensor_scale)``: ``uint8`` FP4 codes shaped like ``x``, ``block_scales``
    as ``torch.float8_e4m3fn`` (``axis`` divided by 16), and the float32 decode scale ``s_dec = 1 / s_enc``
    (0-d). ``tensor_amax`` defaults to ``max |x|`` (pass a calibrated value for static activation scales).
    The input must be finite: neither FP4 nor the per-tensor scale has a NaN or an inf.

    >>> codes, block_scales, tensor_scale = quantize_nvfp4(torch.linspace(-3, 3, 16))
    >>> block_scales.float(), tensor_scale      # amax_b * (s_enc / 6) = 448, the largest E4M3 number
    (tensor([448.]), tensor(0.0011))
    >>> dequantize_nvfp4(codes, block_scales, tensor_scale)[:4]
    tensor([-3.0000, -3.0000, -2.0000, -2.0000])
    """
    x = _check_x(x, "quantize_nvfp4")
    axis = _check_axis(axis, x.ndim)
    _check_block_size(16, x.shape[axis], axis, tuple(x.shape))
    _check_finite(x, "quantize_nvfp4", "FP4 E2M1 and the per-tensor scale cannot represent")
    if tensor_amax is None:
        amax = x.abs().amax() if x.numel() else torch.tensor(0.0)
    else:
        amax = torch.as_tensor(tensor_amax, dtype=torch.float32)
        if amax.numel() != 1 or not bool(torch.isfinite(amax)) or float(amax) < 0:
            raise ValueError(f"tensor_amax must be one finite non-negative number, got {tensor_amax!r}")
        amax = amax.reshape(())
    blocks = x.movedim(axis, -1).unflatten(-1, (-1, 16))  # (..., L // 16, 16)
    p, block_scales, s_dec = _quantize_nvfp4(blocks, amax)
    codes = _to_codes(p, FP4_E2M1).flatten(-2).movedim(-1, axis)
    return codes, block_scales.squeeze(-1).movedim(-1, axis), s_dec


def _nvfp4_tensor_scale(amax: Tensor) -> Tensor:
    """``s_enc = 6 * 448 / amax`` in float32, capped at the float32 maximum; 1 for an all-zero tensor."""
    s_enc = torch.clamp(2688.0 / amax, max=_FLOAT32_MAX)
    return torch.where((amax == 0) | (s_enc == 0), 1.0, s_enc)


def _quantize_nvfp4(blocks: Tensor, amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(12.2) on ``blocks`` ``(..., 16)``: FP4 values, E4M3 block scales ``(..., 1)``, the decode scale."""
    s_enc = _nvfp4_tensor_scale(amax.float())
    s_dec = 1.0 / s_enc
    amax_b = blocks.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    S_b = round_to_format(amax_b * (s_enc * (1.0 / 6.0)), FP8_E4M3)  # the block's decode scale, an E4M3 value
    rcp = torch.clamp(1.0 / (S_b * s_dec), max=_FLOAT32_MAX)  # encode scale 1 / (S_b * s_dec); S_b = 0 -> max
    p = _round_element(blocks * rcp, FP4_E2M1)
    return p, S_b.to(torch.float8_e4m3fn), s_dec


def dequantize_nvfp4(
    codes: Tensor, block_scales: Tensor, tensor_scale: Tensor | float, axis: int = -1
) -> Tensor:
    """``x_hat = P * S_b * s_dec`` (12.2) in float32 (inverse of :func:`quantize_nvfp4`).

    >>> dequantize_nvfp4(torch.tensor([7] * 16, dtype=torch.uint8),
    ...                  torch.tensor([2.0]).to(torch.float8_e4m3fn), 0.5)[:2]     # 6 * 2 * 0.5
    tensor([6., 6.])
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"NVFP4 codes must be a uint8 tensor, got {codes!r:.60}")
    if not isinstance(block_scales, Tensor) or block_scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"block_scales must be a torch.float8_e4m3fn tensor, got {block_scales!r:.60}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dimension")
    axis = _check_axis(axis, codes.ndim)
    if bool((codes > 15).any()):
        raise ValueError("FP4 codes must lie in [0, 15]")
    expected = list(codes.shape)
    expected[axis] = codes.shape[axis] // 16
    if codes.shape[axis] % 16 or list(block_scales.shape) != expected:
        raise ValueError(
            f"block_scales of shape {tuple(block_scales.shape)} do not fit codes of shape "
            f"{tuple(codes.shape)}: expected {tuple(expected)} (one scale per 16 codes along axis {axis})"
        )
    s_dec = torch.as_tensor(tensor_scale, dtype=torch.float32)
    if s_dec.numel() != 1:
        raise ValueError(f"tensor_scale must be one number, got shape {tuple(s_dec.shape)}")
    p = _element_values(codes, FP4_E2M1).movedim(axis, -1).unflatten(-1, (-1, 16))  # (..., L // 16, 16)
    S_b = block_scales.float().movedim(axis, -1).unsqueeze(-1)  # (..., L // 16, 1)
    return _dequantize_nvfp4(p, S_b, s_dec.reshape(())).flatten(-2).movedim(-1, axis)


def _dequantize_nvfp4(p: Tensor, S_b: Tensor, s_dec: Tensor) -> Tensor:
    """``P * S_b * s_dec``: ``P * S_b`` is exact (2 and 4 significant bits), one rounding for ``* s_dec``."""
    return p * S_b * s_dec


# --------------------------------------------------------------------------------------------------------
# FP8 with FP32 scales: per tensor, per row, per 2-D block
# --------------------------------------------------------------------------------------------------------
def quantize_fp8(
    x: Tensor, element_format: FloatFormat = FP8_E4M3, block: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """FP8 codes with FP32 scales ``scale = amax / max`` per tensor (``block=None``) or per 2-D ``block``.

    For a 2-D ``x`` of shape ``(M, K)``: ``block=(1, K)`` is one scale per row (per token, or per output
    channel of a weight), ``(1, 128)`` DeepSeek-V3's activation tiles, ``(128, 128)`` its weight blocks; the
    block must divide the shape (:class:`qbook.granularity.PerBlock`). The codes are
    ``quantize(x, scale, 0, element_format)`` (a float grid, :func:`qbook.affine.quantize`), in the format's
    torch dtype; ``scales`` (float32) has shape ``()`` or ``(M / bm, K / bn)``. An all-zero block gets scale
    1. The input must be finite (the scale comes from its largest magnitude). Core: ``_quantize_fp8``.

    >>> codes, scales = quantize_fp8(torch.tensor([[1.0, -896.0], [0.0, 0.0]]), block=(1, 2))
    >>> scales.flatten().tolist(), codes.float()        # 896 / 448 = 2; the zero row gets scale 1
    ([2.0, 1.0], tensor([[   0.5000, -448.0000],
            [   0.0000,    0.0000]]))
    """
    x = _check_x(x, "quantize_fp8")
    if not isinstance(element_format, FloatFormat):
        raise TypeError(f"quantize_fp8 expects qbook.formats.FP8_E4M3 or FP8_E5M2, got {element_format!r}")
    if element_format not in (FP8_E4M3, FP8_E5M2):
        raise ValueError(f"quantize_fp8 supports FP8_E4M3 and FP8_E5M2, got {element_format.name}")
    _check_finite(x, "quantize_fp8", "has no finite largest magnitude to scale by")
    granularity = _fp8_granularity(block, tuple(x.shape))
    return _quantize_fp8(x, element_format, granularity)


def _fp8_granularity(block: object, shape: tuple[int, ...]) -> PerTensor | PerBlock:
    if block is None:
        return PerTensor()
    if isinstance(block, tuple) and len(block) == 2 and len(shape) != 2:
        raise ValueError(f"a 2-D block needs a 2-D tensor (M, K), got shape {shape}")
    granularity = PerBlock(block)  # checks the block
    granularity.param_shape(shape)  # checks that it divides the shape
    return granularity


def _quantize_fp8(x: Tensor, fmt: FloatFormat, granularity: PerTensor | PerBlock) -> tuple[Tensor, Tensor]:
    """``scale = amax / max`` per block, 1 for an all-zero block; ``codes = round(x / scale)`` in ``fmt``."""
    lo, hi = minmax(x, granularity)  # per-block minimum and maximum, in the scales' shape
    scale = torch.maximum(-lo, hi) / fmt.max
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero block (or one below 448 * 2^-149)
    return quantize(x, scale, 0, fmt, granularity=granularity), scale


def dequantize_fp8(codes: Tensor, scales: Tensor, block: tuple[int, int] | None = None) -> Tensor:
    """``x_hat = codes * scale`` in float32 (inverse of :func:`quantize_fp8`, with the same ``block``)."""
    formats = {torch.float8_e4m3fn: FP8_E4M3, torch.float8_e5m2: FP8_E5M2}
    if not isinstance(codes, Tensor) or codes.dtype not in formats:
        raise TypeError(f"codes must be a float8_e4m3fn or float8_e5m2 tensor, got {codes!r:.60}")
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales must be a float32 tensor, got {scales!r:.60}")
    granularity = _fp8_granularity(block, tuple(codes.shape))
    expected = granularity.param_shape(codes.shape)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales must have shape {expected} for codes {tuple(codes.shape)}, got {tuple(scales.shape)}"
        )
    return dequantize(codes, scales, 0, formats[codes.dtype], granularity=granularity)


# --------------------------------------------------------------------------------------------------------
# Simulation and storage
# --------------------------------------------------------------------------------------------------------
def fake_quantize_blocks(x: Tensor, fmt: BlockFormat, axis: int = -1) -> Tensor:
    """``dequantize(quantize(x))`` in the block format ``fmt`` (MX or NVFP4), blocks along ``axis``: float32.

    The same values as the round trip through codes (a test checks it), computed from the cores without
    encoding and decoding the codes.

    >>> fake_quantize_blocks(torch.tensor([0.3, -1.0, 2.5, 5.0] * 8), MXFP4)[:4]
    tensor([ 0.5000, -1.0000,  2.0000,  4.0000])
    """
    if not isinstance(fmt, BlockFormat):
        raise TypeError(f"fmt must be a BlockFormat such as qbook.mx.MXFP4 or NVFP4, got {fmt!r}")
    x = _check_x(x, "fake_quantize_blocks")
    axis = _check_axis(axis, x.ndim)
    if fmt.scale == "E4M3":
        if fmt.element != FP4_E2M1 or fmt.block_size != 16:
            raise ValueError(f"E4M3 block scales are NVFP4's: FP4_E2M1 in blocks of 16, got {fmt}")
        _check_block_size(16, x.shape[axis], axis, tuple(x.shape))
        _check_finite(x, "fake_quantize_blocks", "FP4 E2M1 and the per-tensor scale cannot represent")
        blocks = x.movedim(axis, -1).unflatten(-1, (-1, 16))  # (..., L // 16, 16)
        amax = x.abs().amax() if x.numel() else torch.tensor(0.0)
        p, S_b, s_dec = _quantize_nvfp4(blocks, amax)
        x_hat = _dequantize_nvfp4(p, S_b.float(), s_dec)
    else:
        element = _check_element(fmt.element, "fake_quantize_blocks")
        _check_block_size(fmt.block_size, x.shape[axis], axis, tuple(x.shape))
        blocks = x.movedim(axis, -1).unflatten(-1, (-1, fmt.block_size))  # (..., L // k, k)
        x_hat = _dequantize_mx(*_quantize_mx(blocks, element))
    return x_hat.flatten(-2).movedim(-1, axis)


def pack_codes(codes: Tensor, element_format: Element) -> Tensor:
    """Element codes packed densely along the last dimension (``uint8``), with :func:`qbook.packing.pack`.

    FP4: two codes per byte, the first in the low nibble, which is the layout of ``torch.float4_e2m1fn_x2``
    (``pack_codes(c, FP4_E2M1).view(torch.float4_e2m1fn_x2)``); FP6: four codes in three bytes; 8-bit codes
    are their bytes.

    >>> pack_codes(torch.tensor([0x1, 0xF], dtype=torch.uint8), FP4_E2M1)
    tensor([241], dtype=torch.uint8)
    """
    element = _check_element(element_format, "pack_codes")
    if not isinstance(codes, Tensor) or codes.dtype != _code_dtype(element):
        raise TypeError(f"{element.name} codes must be a {_code_dtype(element)} tensor, got {codes!r:.60}")
    if element.total_bits == 8:
        return codes.view(torch.uint8)
    return pack(codes, element.total_bits, signed=False)


def unpack_codes(packed: Tensor, element_format: Element, length: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``length`` codes per row of the last dimension."""
    element = _check_element(element_format, "unpack_codes")
    if isinstance(packed, Tensor) and packed.dtype == torch.float4_e2m1fn_x2:
        packed = packed.view(torch.uint8)
    if element.total_bits == 8:
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"packed must be a uint8 tensor, got {packed!r:.60}")
        return packed.view(_code_dtype(element))
    return unpack(packed, element.total_bits, length, signed=False).view(torch.uint8)
