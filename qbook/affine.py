"""Quantize and dequantize (量化与反量化): the affine map between floats and integers — chapter 3.

Three verbs, composed and never duplicated::

    scale, zero_point = calc_qparams(xmin, xmax, qmin, qmax)       # choose the grid        (3.3)/(3.4)
    q = quantize(x, scale, zero_point, qmin, qmax)                   # float -> integer       (3.1)
    x_hat = dequantize(q, scale, zero_point)                         # integer -> float       (3.2)

with the equations of chapter 3

* (3.1) ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to even, float32 true division),
* (3.2) ``x_hat = (q - zero_point) * scale``,
* (3.3) affine (非对称): ``scale = (xmax - xmin) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(xmin / scale), qmin, qmax)``,
* (3.4) symmetric (对称): ``scale = max(|xmin|, |xmax|) / ((qmax - qmin) / 2)``, ``zero_point = 0``.

:func:`fake_quantize` is ``dequantize(quantize(x))`` with the clipped straight-through gradient;
:class:`QuantSpec` names an integer grid and :class:`QTensor` carries integers with their parameters.
Every function accepts ``granularity=`` (:mod:`qbook.granularity`) to say which elements share a scale.

>>> import torch
>>> x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
>>> scale, zero_point = calc_qparams(x.min(), x.max(), qmin=-128, qmax=127)
>>> q = quantize(x, scale, zero_point, -128, 127)
>>> q
tensor([-128,  -43,  -17,  127], dtype=torch.int8)
>>> dequantize(q, scale, zero_point)
tensor([-1.0000,  0.0000,  0.3059,  2.0000])
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct
import warnings
from dataclasses import dataclass, field

import torch

from qbook.formats import FloatFormat, decode, encode, round_to_format
from qbook.granularity import Granularity, PerBlock, PerChannel, PerGroup, PerTensor, minmax

__all__ = [
    "INT4",
    "INT8",
    "INT8_SYMMETRIC",
    "UINT4",
    "UINT8",
    "QTensor",
    "QuantSpec",
    "calc_qparams",
    "dequantize",
    "dtype_for_range",
    "fake_quantize",
    "quantize",
    "torch_quantize_per_tensor",
    "sqnr_db",
]

TensorLike = torch.Tensor | int | float

_FLOAT32_EPS = torch.finfo(torch.float32).eps
_INT32 = torch.iinfo(torch.int32)


# --------------------------------------------------------------------------------------------------------
# The integer grid
# --------------------------------------------------------------------------------------------------------


def dtype_for_range(qmin: int, qmax: int) -> torch.dtype:
    """The smallest standard torch integer dtype holding ``[qmin, qmax]``: int8, uint8, int16 or int32.

    (torch's ``uint16`` supports few operations, so ``[0, 65535]`` is stored as int32.)

    >>> dtype_for_range(-128, 127), dtype_for_range(0, 255), dtype_for_range(0, 65535)
    (torch.int8, torch.uint8, torch.int32)
    """
    return _dtype_for_range(*_check_range(qmin, qmax))


def _dtype_for_range(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int32


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid (chapter 3): ``bits`` wide, signed or unsigned, full or narrow range.

    ============  ==================================  =========================
    signed        full range                          narrow range
    ============  ==================================  =========================
    ``True``      ``[-2^(b-1), 2^(b-1) - 1]``         ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
    ``False``     ``[0, 2^b - 1]``                    ``[0, 2^b - 2]``
    ============  ==================================  =========================

    ``symmetric`` says how :meth:`QTensor.from_float` chooses the parameters ((3.3) or (3.4)).

    >>> s = QuantSpec(bits=8, signed=True, narrow_range=True)
    >>> s.qmin, s.qmax, s.dtype
    (-127, 127, torch.int8)
    >>> QuantSpec(bits=4, signed=False).qmax
    15
    """

    bits: int = 8
    signed: bool = True
    narrow_range: bool = False
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        for name in ("signed", "narrow_range", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer of the grid, e.g. -128 for int8."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest integer of the grid, e.g. 127 for int8."""
        if self.signed:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1 - int(self.narrow_range)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype that stores the grid (:func:`dtype_for_range`)."""
        return dtype_for_range(self.qmin, self.qmax)


INT8 = QuantSpec(8, True)
UINT8 = QuantSpec(8, False)
INT8_SYMMETRIC = QuantSpec(8, True, narrow_range=True, symmetric=True)
INT4 = QuantSpec(4, True)
UINT4 = QuantSpec(4, False)


# --------------------------------------------------------------------------------------------------------
# Argument checks: each names the offending value. Comparisons never cast a bound to the data's dtype.
# --------------------------------------------------------------------------------------------------------


def _index(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first ``True`` of a boolean tensor."""
    return tuple(int(i) for i in bad.nonzero()[0]) if bad.ndim else ()


def _first(t: torch.Tensor, bad: torch.Tensor) -> str:
    """``'value (at index i)'`` for the first element of ``t`` where ``bad`` holds."""
    index = _index(bad)
    return f"{t[index].item()!r}" + (f" (at index {index})" if index else "")


def _int(value: object, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _check_range(qmin: object, qmax: object) -> tuple[int, int]:
    qmin, qmax = _int(qmin, "qmin"), _int(qmax, "qmax")
    if qmin >= qmax:
        raise ValueError(f"qmin must be smaller than qmax, got qmin={qmin}, qmax={qmax}")
    if qmin < _INT32.min or qmax > _INT32.max:
        raise ValueError(f"[qmin, qmax] = [{qmin}, {qmax}] does not fit int32 [{_INT32.min}, {_INT32.max}]")
    return qmin, qmax


def _check_float(x: object, name: str) -> torch.Tensor:
    """``x`` as a float32 tensor; integer tensors are a TypeError (they are already quantized)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x
    if isinstance(x, float):
        return torch.tensor(x, dtype=torch.float32)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    return x.to(torch.float32)


def _float32(value: float) -> float:
    """The Python float nearest to ``value`` in float32 (inf beyond float32's range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _outside(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(t < lo) | (t > hi)`` elementwise, exact for any dtype: compared in int64 or float64, never by
    casting the bounds to ``t``'s dtype (``torch.tensor(5, dtype=torch.int8) > 255`` is True in torch)."""
    wide = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
    return (wide < lo) | (wide > hi)


def _check_scale(scale: object) -> torch.Tensor | float:
    """A positive finite float32 scale: a Python float (float32-rounded) for one value, else a tensor."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 0 and not scale.is_complex():
        if scale.dtype == torch.bool:
            raise TypeError(f"scale must be a float tensor or number, got dtype {scale.dtype}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (torch.Tensor, int, float)):
        got = scale.dtype if isinstance(scale, torch.Tensor) else repr(scale)
        raise TypeError(f"scale must be a float tensor or number, got {got}")
    if not isinstance(scale, torch.Tensor):
        value = _float32(scale)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"scale must be positive and finite, got {scale!r}")
        return value
    if scale.dtype == torch.bool or scale.is_complex():
        raise TypeError(f"scale must be a float tensor or number, got dtype {scale.dtype}")
    scale = scale.to(torch.float32)
    if scale.numel():
        lo, hi = torch.aminmax(scale)  # NaN propagates to both
        if not (lo.item() > 0 and hi.item() < math.inf):
            bad = ~(torch.isfinite(scale) & (scale > 0))
            raise ValueError(f"scale must be positive and finite, got {_first(scale, bad)}")
    return scale


def _check_zero_point(zero_point: object, qrange: tuple[int, int] | None) -> torch.Tensor | int:
    """An integer zero point in ``qrange`` (default: int32): a Python int for one value, else a tensor."""
    lo, hi = qrange if qrange is not None else (_INT32.min, _INT32.max)
    where = "[qmin, qmax]" if qrange is not None else "int32"
    if isinstance(zero_point, torch.Tensor) and zero_point.ndim == 0:
        if zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(f"zero_point must be an integer tensor or int, got dtype {zero_point.dtype}")
        zero_point = zero_point.item()
    if isinstance(zero_point, bool) or not isinstance(zero_point, (torch.Tensor, int, float)):
        raise TypeError(f"zero_point must be an integer tensor or int, got {zero_point!r}")
    if isinstance(zero_point, float):
        if not (math.isfinite(zero_point) and zero_point == round(zero_point)):
            raise ValueError(f"zero_point must hold integers, got {zero_point!r}")
        zero_point = int(zero_point)
    if isinstance(zero_point, int):
        if not lo <= zero_point <= hi:
            raise ValueError(f"zero_point must lie in {where} = [{lo}, {hi}], got {zero_point}")
        return zero_point
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise TypeError(f"zero_point must be an integer tensor or int, got dtype {zero_point.dtype}")
    if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
        bad = ~torch.isfinite(zero_point) | (zero_point != zero_point.round())
        raise ValueError(f"zero_point must hold integers, got {_first(zero_point, bad)}")
    if zero_point.numel():
        zmin, zmax = torch.aminmax(zero_point)
        if zmin.item() < lo or zmax.item() > hi:  # Python numbers: exact, whatever the tensor's dtype
            bad = _outside(zero_point, lo, hi)
            raise ValueError(f"zero_point must lie in {where} = [{lo}, {hi}], got {_first(zero_point, bad)}")
    return zero_point


def _check_broadcast(param: torch.Tensor | float, shape: torch.Size, name: str) -> None:
    if not isinstance(param, torch.Tensor) or param.shape == shape:  # the common case, without the cost below
        return
    try:
        ok = torch.broadcast_shapes(param.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(param.shape)} does not broadcast to the data's shape {tuple(shape)}; "
            "per-channel parameters need the data's rank, e.g. (C, 1) for axis 0 of a 2-D tensor"
        )


def _check_param_shape(param: Param, granularity: Granularity, shape: torch.Size, name: str) -> None:
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup, PerBlock)):
        raise TypeError(
            f"granularity must be PerTensor, PerChannel, PerGroup or PerBlock, got {granularity!r}"
        )
    expected = granularity.param_shape(shape)
    if isinstance(param, torch.Tensor) and param.numel() != 1 and tuple(param.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(param.shape)}, expected {expected} for {granularity} "
            f"on data of shape {tuple(shape)}"
        )


Param = torch.Tensor | float | int


def _params(
    scale: object,
    zero_point: object,
    shape: torch.Size,
    granularity: Granularity | None,
    qrange: tuple[int, int] | None = None,
) -> tuple[Param, Param, tuple[int, ...]]:
    """Checked ``scale`` and ``zero_point`` and the shape to view the data as, so that they broadcast.

    Per-group parameters ``(..., L // g, ...)`` are not repeated: the data is viewed as
    ``(..., L // g, g, ...)`` and the parameters as ``(..., L // g, 1, ...)``.
    """
    scale, zero_point = _check_scale(scale), _check_zero_point(zero_point, qrange)
    view = tuple(shape)
    if granularity is not None:
        _check_param_shape(scale, granularity, shape, "scale")
        _check_param_shape(zero_point, granularity, shape, "zero_point")
        if isinstance(granularity, PerGroup):
            axis = granularity.axis % len(shape)
            g = granularity.group_size
            view = (*shape[:axis], shape[axis] // g, g, *shape[axis + 1:])  # (..., L // g, g, ...)
            scale, zero_point = (  # (..., L // g, 1, ...)
                p.unsqueeze(axis + 1) if isinstance(p, torch.Tensor) and p.numel() != 1 else p
                for p in (scale, zero_point)
            )
        elif isinstance(granularity, PerBlock):
            (M, K), (bm, bn) = shape, granularity.block
            view = (M // bm, bm, K // bn, bn)
            scale, zero_point = (  # (M // bm, 1, K // bn, 1)
                p.reshape(M // bm, 1, K // bn, 1) if isinstance(p, torch.Tensor) and p.numel() != 1 else p
                for p in (scale, zero_point)
            )
    _check_broadcast(scale, torch.Size(view), "scale")
    _check_broadcast(zero_point, torch.Size(view), "zero_point")
    return scale, zero_point, view


def _raise_nan(x: torch.Tensor) -> None:
    nan = torch.isnan(x)
    if nan.any():
        raise ValueError(
            f"x contains {int(nan.sum())} NaN value(s), the first at index {_index(nan)}; "
            "NaN has no integer code"
        )


# --------------------------------------------------------------------------------------------------------
# Large tensors are processed in chunks of rows: the float32 work buffer stays in the CPU's cache
# --------------------------------------------------------------------------------------------------------

_CHUNK = 1 << 19  # elements per chunk: fewer op calls, and the scratch (2 MiB of float32) stays in L2/L3


def _chunks(shape: tuple[int, ...]) -> list:
    """Slices of dim 0 covering about ``_CHUNK`` elements each (``[...]``, all of it, for small tensors)."""
    numel = math.prod(shape)
    if not shape or numel <= _CHUNK or shape[0] < 2:
        return [...]
    rows = max(1, _CHUNK * shape[0] // numel)
    return [slice(i, i + rows) for i in range(0, shape[0], rows)]


def _scratch(view: tuple[int, ...], chunks: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch space for one chunk (for all of it when there is one chunk)."""
    first = chunks[0]
    shape = view if first is ... else (first.stop - first.start, *view[1:])
    return torch.empty(shape, dtype=dtype, device=device)


def _fit(scratch: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The scratch space for ``part`` (the last chunk may be shorter)."""
    return scratch if scratch.shape == part.shape else scratch[: part.shape[0]]


def _part(param: Param, rows: slice, ndim: int) -> Param:
    """The rows of a broadcasting parameter that go with ``data[rows]`` (all of it when it broadcasts)."""
    if rows is not ... and isinstance(param, torch.Tensor) and param.ndim == ndim and param.shape[0] > 1:
        return param[rows]
    return param


def _work_dtype(qmin: int, qmax: int) -> torch.dtype:
    """float32 when every code of the grid is a float32 integer (|code| <= 2^24), else float64."""
    return torch.float32 if max(-qmin, qmax) <= 2**24 else torch.float64


# --------------------------------------------------------------------------------------------------------
# The three verbs: each public function checks its arguments, then calls its math core (_calc_qparams,
# _quantize, _dequantize), which chapter 3 shows.
# --------------------------------------------------------------------------------------------------------


def calc_qparams(
    xmin: TensorLike,
    xmax: TensorLike,
    qmin: int,
    qmax: int,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping ``[xmin, xmax]`` onto ``[qmin, qmax]`` — equations (3.3)/(3.4), chapter 3.

    The range is first widened to contain 0, so that the real number 0 is exactly representable.

    * affine (非对称, (3.3)): ``scale = (xmax - xmin) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(xmin / scale), qmin, qmax)``;
    * symmetric (对称, (3.4)): ``scale = max(-xmin, xmax) / ((qmax - qmin) / 2)``, ``zero_point = 0`` for a
      grid with ``qmin < 0 <= qmax`` and the grid's middle ``(qmin + qmax + 1) // 2`` otherwise (e.g. 128 on
      ``[0, 255]``).

    ``scale`` is floored at float32 eps (an all-zero tensor still gets a usable grid). Elementwise over
    tensors: per-channel minima and maxima give per-channel parameters. The scale is computed in float32 like
    ``torch.ao.quantization.MinMaxObserver``, which it matches for int8/uint8; the zero point in int64, exact
    on every int32 grid. A finite range wider than float32's largest number (``xmax - xmin > 3.4e38``) still
    gets its finite scale; only a scale that float32 cannot hold (possible on a 2-code grid) is a
    ``ValueError``.

    >>> calc_qparams(-1.0, 2.0, qmin=-128, qmax=127)
    (tensor(0.0118), tensor(-43, dtype=torch.int32))
    >>> calc_qparams(-1.0, 2.0, qmin=-127, qmax=127, symmetric=True)
    (tensor(0.0157), tensor(0, dtype=torch.int32))
    """
    qmin, qmax = _check_range(qmin, qmax)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    xmin, xmax = _check_float(_as_float(xmin), "xmin"), _check_float(_as_float(xmax), "xmax")
    if xmin.shape != xmax.shape:
        try:
            xmin, xmax = torch.broadcast_tensors(xmin, xmax)
        except RuntimeError:
            raise ValueError(
                "xmin and xmax must have broadcastable shapes, "
                f"got {tuple(xmin.shape)} and {tuple(xmax.shape)}"
            ) from None
    if xmin.numel() == 0:
        return _calc_qparams(xmin, xmax, qmin, qmax, symmetric)
    width = xmax - xmin  # one reduction flags NaN, inf, xmin > xmax and ranges that overflow float32
    lo, hi = (v.item() for v in torch.aminmax(width))
    if lo >= 0 and hi < math.inf:
        scale, zero_point = _calc_qparams(xmin, xmax, qmin, qmax, symmetric)
    else:
        _check_range_values(xmin, xmax)
        # Finite, but xmax - xmin > 3.4e38: halve those ranges (exact), which halves their scale and keeps
        # their zero point, then double the scale back.
        half = torch.where(torch.isinf(width), 0.5, 1.0)
        scale, zero_point = _calc_qparams(xmin * half, xmax * half, qmin, qmax, symmetric)
        scale = scale / half
    if (qmax - qmin == 1 or hi == math.inf) and not scale.max().item() < math.inf:
        index = _index(torch.isinf(scale))
        raise ValueError(
            f"the range [xmin, xmax] = [{xmin[index].item()!r}, {xmax[index].item()!r}] needs a scale beyond "
            f"float32's largest {torch.finfo(torch.float32).max:.4g} on the grid [{qmin}, {qmax}]"
        )
    if hi > _FLOAT32_MAX / 4:
        scale = _finite_grid(scale, zero_point, qmin, qmax)
    return scale, zero_point


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _finite_grid(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``scale``, lowered where needed so that every code of ``[qmin, qmax]`` dequantizes to a finite float32.

    Only ranges near float32's largest number need it: there the zero point's rounding, or a symmetric grid's
    extra negative code, can put an end level beyond 3.4e38. The cap clips such a range by at most one step.
    """
    reach = torch.maximum(qmax - zero_point.to(torch.float64), zero_point.to(torch.float64) - qmin)
    cap = (_FLOAT32_MAX / reach.clamp(min=1)).to(torch.float32)
    over = cap.to(torch.float64) * reach > _FLOAT32_MAX  # float32 rounding went up: one ulp down
    cap = torch.where(over, torch.nextafter(cap, torch.zeros_like(cap)), cap)
    return torch.minimum(scale, cap)


def _check_range_values(xmin: torch.Tensor, xmax: torch.Tensor) -> None:
    """Raise for non-finite values or ``xmin > xmax``; a finite range that overflows float32 passes."""
    for name, value in (("xmin", xmin), ("xmax", xmax)):
        bad = ~torch.isfinite(value)
        if bad.any():
            raise ValueError(f"{name} must be finite, got {_first(value, bad)}")
    bad = xmin > xmax
    if bad.any():
        index = _index(bad)
        lo, hi = xmin[index].item(), xmax[index].item()
        raise ValueError(f"xmin must not exceed xmax, got xmin={lo!r} > xmax={hi!r}")


def _calc_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equations (3.3)/(3.4): float32 ``scale`` and int32 ``zero_point`` for the range ``[xmin, xmax]``."""
    n = float(qmax - qmin)  # number of steps of the grid
    if symmetric:  # (3.4); max(-xmin, xmax) >= 0 already contains 0
        scale = torch.maximum(-xmin, xmax).div_(n / 2).clamp_(min=_FLOAT32_EPS)
        middle = 0 if qmin < 0 <= qmax else (qmin + qmax + 1) // 2
        return scale, torch.full_like(scale, middle, dtype=torch.int32)
    xmin, xmax = xmin.clamp(max=0.0), xmax.clamp(min=0.0)  # widen to contain 0
    scale = (xmax - xmin).div_(n).clamp_(min=_FLOAT32_EPS)  # (3.3)
    shift = (xmin / scale).round_()  # an integer in [qmin - qmax, 0]
    if max(-qmin, qmax) > 2**24:  # float32 holds every integer only up to 2^24: go exact in int64
        shift = shift.to(torch.int64)
    return scale, (qmin - shift).clamp_(qmin, qmax).to(torch.int32)


def _as_float(value: TensorLike) -> TensorLike:
    """Python ints (and integer tensors) as range endpoints are fine: they are values, not codes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool:
        return value.to(torch.float32)
    return value


def _codes(x: torch.Tensor, scale: Param, zero_point: Param, out: torch.Tensor) -> torch.Tensor:
    """``round(x / scale) + zero_point`` into the float tensor ``out``: (3.1) before the clamp.

    float32 holds every code of a grid up to 2^24 exactly; wider grids pass a float64 ``out``."""
    return torch.div(x, scale, out=out).round_().add_(zero_point)  # true float32 division, ties to even


def _quantize(
    x: torch.Tensor, scale: Param, zero_point: Param, qmin: int, qmax: int, q: torch.Tensor,
    codes: torch.Tensor,
) -> torch.Tensor:
    """Equation (3.1), ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, into the integer ``q``.

    ``codes`` is float scratch space shaped like ``x`` (see :func:`_codes`)."""
    return q.copy_(_codes(x, scale, zero_point, codes).clamp_(qmin, qmax))


def quantize(
    x: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    qmin: int | FloatFormat,
    qmax: int | None = None,
    *,
    granularity: Granularity | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Quantize (量化) ``x`` onto the integer grid ``[qmin, qmax]`` — equation (3.1), chapter 3.

    ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``

    with a true float32 division and round-half-to-even (the ONNX ``QuantizeLinear`` definition). ``scale``
    and ``zero_point`` broadcast against ``x`` (per-channel: shape ``(C, 1)`` etc.); with ``granularity``
    they have its ``param_shape`` (per-group: one value per group, never repeated). ±inf saturate to
    ``qmin``/``qmax``; NaN is a ``ValueError``. The result has the smallest integer dtype holding the grid
    (:func:`dtype_for_range`).

    >>> import torch
    >>> quantize(torch.tensor([-1.25, 0.25, 0.75, 100.0]), 0.5, 3, qmin=-128, qmax=127)  # ties to even
    tensor([  1,   3,   5, 127], dtype=torch.int8)

    **Float grids** (chapter 12): with a :class:`~qbook.formats.FloatFormat` in place of ``qmin`` (and no
    ``qmax``) the grid is the format's values, ``q = round_to_format(x / scale, grid)``, and ``zero_point``
    must be 0. The codes come in the format's torch dtype (``torch.float8_e4m3fn`` for FP8_E4M3, ...) or, for
    formats torch cannot compute with (FP6, FP4), as ``uint8`` bit fields ``s << (E + M) | e << M | f``.
    Following ONNX's ``QuantizeLinear`` (``saturate=1``, its default for every float8 type), values beyond the
    largest finite value saturate to ±max, and so do ±inf (E5M2 too, although it has an inf);
    ``saturate=False`` gives the format's own overflow (±inf for E5M2, NaN for E4M3). NaN stays NaN where the
    format has one and is a ``ValueError`` where it has none. Scales of any granularity, also 2-D
    ``PerBlock`` ones.

    >>> from qbook.formats import FP8_E4M3
    >>> quantize(torch.tensor([0.3, -1000.0]), 0.5, 0, FP8_E4M3).float()    # 0.6 -> 0.625; -2000 -> -448
    tensor([   0.6250, -448.0000])
    """
    if isinstance(qmin, FloatFormat):
        return _quantize_to_float_grid(x, scale, zero_point, qmin, qmax, granularity, saturate)
    qmin, qmax = _check_range(qmin, qmax)
    x = _check_float(x, "x")
    scale, zero_point, view = _params(scale, zero_point, x.shape, granularity, (qmin, qmax))
    data = x.reshape(view)
    q = torch.empty(view, dtype=_dtype_for_range(qmin, qmax), device=x.device)
    chunks = _chunks(view)  # a chunk's float codes stay in the CPU's cache
    codes = _scratch(view, chunks, _work_dtype(qmin, qmax), x.device)
    sums = []  # a NaN in x makes its chunk's sum NaN (so may inf - inf: then look closer)
    for rows in chunks:
        part = data[rows]
        sums.append(part.sum())
        s, z = _part(scale, rows, len(view)), _part(zero_point, rows, len(view))
        _quantize(part, s, z, qmin, qmax, q[rows], _fit(codes, part))
    _check_sums(sums, x)
    return q.reshape(x.shape)


def _float_grid(grid: FloatFormat, qmax: object, saturate: object) -> FloatFormat:
    """The grid with the requested overflow behaviour, after checking the float-grid arguments."""
    if qmax is not None:
        raise TypeError(f"with a FloatFormat as the grid ({grid.name}) pass no qmax, got qmax={qmax!r}")
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {saturate!r}")
    if grid.nan == "none" and not saturate:
        raise ValueError(f"{grid.name} has neither inf nor NaN: out-of-range values can only saturate")
    if grid.torch_dtype is None and grid.total_bits > 8:
        raise ValueError(f"{grid.name} has no torch dtype, and codes of more than 8 bits are not supported")
    if saturate or not grid.saturate:
        return grid
    return dataclasses.replace(grid, saturate=False)  # e.g. FP8_E4M3 without saturation: overflow is NaN


def _check_no_zero_point(zero_point: object) -> None:
    zero_point = _check_zero_point(zero_point, None)
    if bool(torch.as_tensor(zero_point).ne(0).any()):
        raise ValueError(f"a float grid has no zero point: zero_point must be 0, got {zero_point!r}")


def _quantize_float(x: torch.Tensor, scale: Param, grid: FloatFormat, saturate: bool) -> torch.Tensor:
    """Chapter 12's float grid: ``round_to_format(x / scale, grid)``, the grid's values as float32."""
    v = x / scale  # one float32 division
    if saturate:
        v = v.clamp(-grid.max, grid.max)  # ONNX's saturate=1: overflow and ±inf become ±max; NaN stays
    return round_to_format(v, grid)  # round to nearest, ties to even


def _quantize_to_float_grid(
    x: object, scale: object, zero_point: object, grid: FloatFormat, qmax: object,
    granularity: Granularity | None, saturate: object,
) -> torch.Tensor:
    grid = _float_grid(grid, qmax, saturate)
    x = _check_float(x, "x")
    _check_no_zero_point(zero_point)
    scale, _, view = _params(scale, 0, x.shape, granularity)
    values = _quantize_float(x.reshape(view), scale, grid, saturate).reshape(x.shape)
    if grid.torch_dtype is not None:
        return values.to(grid.torch_dtype)  # exact: the values are the format's
    return encode(values, grid).to(torch.uint8)


def _check_sums(sums: list[torch.Tensor], x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN, reading the chunk sums first (a finite total means no NaN)."""
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    if not total.isfinite():
        _raise_nan(x)


def _dequantize(q: torch.Tensor, scale: Param, zero_point: Param, x_hat: torch.Tensor) -> torch.Tensor:
    """Equation (3.2), ``(q - zero_point) * scale``, written into the float32 tensor ``x_hat``.

    ``q - zero_point`` is exact in float32 for codes and zero points below 2^24 in magnitude."""
    return x_hat.copy_(q).sub_(zero_point).mul_(scale)


def dequantize(
    q: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    grid: FloatFormat | None = None,
    *,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Dequantize (反量化) integer codes back to float32 — equation (3.2), chapter 3.

    ``x_hat = (q - zero_point) * scale``

    ``q - zero_point`` is exact for codes below 2^24 in magnitude (rounded once to float32 beyond), then one
    float32 multiplication. ``scale``/``zero_point`` as in :func:`quantize`; ``zero_point`` must fit int32.

    >>> import torch
    >>> dequantize(torch.tensor([0, 3, 5, 93], dtype=torch.int8), 0.1, 3)
    tensor([-0.3000,  0.0000,  0.2000,  9.0000])

    With a float ``grid`` (chapter 12), ``q`` holds that format's codes as :func:`quantize` returns them (its
    torch dtype, or ``uint8`` bit fields) and ``x_hat = q * scale``; ``zero_point`` must be 0.

    >>> from qbook.formats import FP4_E2M1
    >>> dequantize(torch.tensor([0b0111, 0b1001], dtype=torch.uint8), 0.5, 0, FP4_E2M1)   # 6 and -0.5
    tensor([ 3.0000, -0.2500])
    """
    if grid is not None:
        return _dequantize_float_grid(q, scale, zero_point, grid, granularity)
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must be an integer tensor (the output of quantize), got {got}")
    scale, zero_point, view = _params(scale, zero_point, q.shape, granularity)
    largest = max(-torch.iinfo(q.dtype).min, torch.iinfo(q.dtype).max)
    if isinstance(zero_point, torch.Tensor):
        largest = max(largest, int(zero_point.abs().max()) if zero_point.numel() else 0)
    else:
        largest = max(largest, abs(zero_point))
    codes = q.reshape(view)
    x_hat = torch.empty(view, dtype=torch.float32, device=q.device)
    for rows in _chunks(view):
        s, z = _part(scale, rows, len(view)), _part(zero_point, rows, len(view))
        if largest > 2**24:  # subtract in float64 (exact), then round once to float32
            _dequantize(codes[rows].to(torch.float64).sub_(z), s, 0, x_hat[rows])
        else:
            _dequantize(codes[rows], s, z, x_hat[rows])
    return x_hat.reshape(q.shape)


def _dequantize_float_grid(
    q: object, scale: object, zero_point: object, grid: object, granularity: Granularity | None
) -> torch.Tensor:
    if not isinstance(grid, FloatFormat):
        raise TypeError(f"grid must be a FloatFormat such as qbook.formats.FP8_E4M3, got {grid!r}")
    grid = _float_grid(grid, None, grid.saturate)
    expected = grid.torch_dtype or torch.uint8
    if not isinstance(q, torch.Tensor) or q.dtype != expected:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must hold {grid.name} codes as {expected} (the output of quantize), got {got}")
    _check_no_zero_point(zero_point)
    scale, _, view = _params(scale, 0, q.shape, granularity)
    values = q.to(torch.float32) if grid.torch_dtype is not None else decode(q, grid)
    return (values.reshape(view) * scale).reshape(q.shape)  # x_hat = q * scale


class _FakeQuantize(torch.autograd.Function):
    """Forward ``dequantize(quantize(x))``; backward the clipped straight-through estimator (chapter 8).

    The backward pass recomputes the codes from ``x`` instead of keeping a mask from the forward pass: no
    memory is held between the passes, and no boolean tensors are built (slow on CPU)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, view):  # type: ignore[override]
        data = x.detach().to(torch.float32).reshape(view)
        x_hat = torch.empty(view, dtype=torch.float32, device=x.device)
        chunks = _chunks(view)
        work = _work_dtype(qmin, qmax)
        scratch = _scratch(view, chunks, work, x.device)
        sums = []
        for rows in chunks:
            part = data[rows]
            sums.append(part.sum())
            s, z = _part(scale, rows, len(view)), _part(zero_point, rows, len(view))
            codes = _codes(part, s, z, _fit(scratch, part)).clamp_(qmin, qmax)  # (3.1)
            x_hat[rows].copy_(codes.sub_(z)).mul_(s)  # (3.2); q - zero_point is exact in work
        _check_sums(sums, x.detach())
        ctx.save_for_backward(x)
        ctx.params = scale, zero_point, qmin, qmax, view
        return x_hat.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        scale, zero_point, qmin, qmax, view = ctx.params
        data, grad = x.detach().to(torch.float32).reshape(view), grad_output.reshape(view)
        grad_x = torch.empty(view, dtype=grad_output.dtype, device=x.device)
        chunks = _chunks(view)
        work = _work_dtype(qmin, qmax)
        codes_buffer, clamped_buffer = (_scratch(view, chunks, work, x.device) for _ in range(2))
        for rows in chunks:
            part = data[rows]
            s, z = _part(scale, rows, len(view)), _part(zero_point, rows, len(view))
            codes = _codes(part, s, z, _fit(codes_buffer, part))  # round(x / scale) + zero_point
            clamped = torch.clamp(codes, qmin, qmax, out=_fit(clamped_buffer, part))
            inside = codes.sub_(clamped).abs_().clamp_(max=1).neg_().add_(1)  # integers: 1 inside, 0 outside
            torch.mul(grad[rows], inside, out=grad_x[rows])
        return grad_x.reshape(grad_output.shape), None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    qmin: int,
    qmax: int,
    *,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Fake quantization (伪量化): ``x_hat = dequantize(quantize(x))``, still float — chapter 3 (used in 8).

    Forward: equations (3.1) then (3.2), in ``x``'s dtype. Backward: the clipped straight-through
    estimator (STE)

    ``d x_hat / d x = 1 if qmin <= round(x / scale) + zero_point <= qmax else 0``

    so rounding is treated as the identity and clamped elements get no gradient. The gradients with respect
    to ``scale`` and ``zero_point`` are ``None`` (they are treated as constants; learning the scale, as in
    LSQ, is a later chapter's subject).

    >>> import torch
    >>> x = torch.tensor([0.04, 0.26, 20.0], requires_grad=True)
    >>> y = fake_quantize(x, 0.1, 0, qmin=-128, qmax=127)
    >>> y.detach()
    tensor([ 0.0000,  0.3000, 12.7000])
    >>> y.sum().backward(); x.grad
    tensor([1., 1., 0.])
    """
    qmin, qmax = _check_range(qmin, qmax)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    scale, zero_point, view = _params(scale, zero_point, x.shape, granularity, (qmin, qmax))
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, view)


# --------------------------------------------------------------------------------------------------------
# QTensor: integers with their parameters, and PyTorch's own quantized tensors
# --------------------------------------------------------------------------------------------------------

_TORCH_QDTYPES = {(8, True): "qint8", (8, False): "quint8"}


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor: integer codes ``q`` with ``scale``, ``zero_point``, grid ``spec`` and granularity.

    ``scale`` and ``zero_point`` have ``granularity.param_shape(q.shape)``. ``dequantize()`` applies (3.2).
    ``to_torch()``/``from_torch()`` convert to and from PyTorch's quantized tensors (``torch.qint8``,
    ``torch.quint8``), which keep the scale and zero point in the tensor's metadata.

    >>> import torch
    >>> t = QTensor.from_float(torch.tensor([-1.0, 0.0, 2.0]), INT8)
    >>> t.q, t.scale, t.zero_point
    (tensor([-128,  -43,  127], dtype=torch.int8), tensor(0.0118), tensor(-43, dtype=torch.int32))
    >>> t.dequantize()
    tensor([-1.,  0.,  2.])
    >>> t.nbytes          # 3 one-byte codes + a float32 scale + an int32 zero point
    11
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec = INT8
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {self.spec!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup, PerBlock)):
            raise TypeError(f"granularity must be PerTensor, PerChannel, PerGroup or PerBlock, "
                            f"got {self.granularity!r}")
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != self.spec.dtype:
            got = self.q.dtype if isinstance(self.q, torch.Tensor) else type(self.q).__name__
            raise TypeError(f"q must be a {self.spec.dtype} tensor for {self.spec}, got {got}")
        outside = (self.q < self.spec.qmin) | (self.q > self.spec.qmax)
        if outside.any():
            grid = f"[{self.spec.qmin}, {self.spec.qmax}]"
            raise ValueError(f"q holds {_first(self.q, outside)}, outside the grid {grid} of {self.spec}")
        expected = self.granularity.param_shape(self.q.shape)
        for name in ("scale", "zero_point"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{name} must be a tensor of shape {expected} for {self.granularity}, got {got}"
                )
        _params(self.scale, self.zero_point, self.q.shape, self.granularity)

    @classmethod
    def from_float(
        cls,
        x: torch.Tensor,
        spec: QuantSpec = INT8,
        granularity: Granularity | None = None,
        xmin: TensorLike | None = None,
        xmax: TensorLike | None = None,
    ) -> QTensor:
        """Quantize ``x`` with parameters from ``[xmin, xmax]`` (default: the data's min/max per group)."""
        granularity = PerTensor() if granularity is None else granularity
        x = _check_float(x, "x")
        if xmin is None or xmax is None:
            data_min, data_max = minmax(x, granularity)
            xmin = data_min if xmin is None else xmin
            xmax = data_max if xmax is None else xmax
        scale, zero_point = calc_qparams(xmin, xmax, spec.qmin, spec.qmax, symmetric=spec.symmetric)
        shape = granularity.param_shape(x.shape)
        scale, zero_point = scale.expand(shape).contiguous(), zero_point.expand(shape).contiguous()
        q = quantize(x, scale, zero_point, spec.qmin, spec.qmax, granularity=granularity)
        return cls(q, scale, zero_point, spec, granularity)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        """Storage in bytes: codes packed at ``spec.bits`` each, plus a float32 scale and an int32 zero point
        per group."""
        return math.ceil(self.q.numel() * self.spec.bits / 8) + 8 * self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` — equation (3.2)."""
        return dequantize(self.q, self.scale, self.zero_point, granularity=self.granularity)

    def to_torch(self) -> torch.Tensor:
        """This tensor as a PyTorch quantized tensor: ``torch.qint8``/``torch.quint8``, per tensor or channel.

        Only 8-bit grids have a torch counterpart; other specs and per-group granularity raise
        ``ValueError``. torch has deprecated its quantized tensors: the deprecation notice is silenced here
        (converting is the point of this method), and a torch without them raises ``RuntimeError``.
        """
        name = _TORCH_QDTYPES.get((self.spec.bits, self.spec.signed))
        if name is None:
            raise ValueError(
                f"{self.spec} has no torch quantized dtype; only 8-bit grids map to qint8/quint8"
            )
        x = self.dequantize()
        if isinstance(self.granularity, PerTensor):
            args = (x, float(self.scale), int(self.zero_point), getattr(torch, name))
            out = _call_torch("quantize_per_tensor", *args)
        elif isinstance(self.granularity, PerChannel):
            axis = self.granularity.axis % self.q.ndim
            scales = self.scale.reshape(-1).to(torch.float64)  # (C,)
            zero_points = self.zero_point.reshape(-1).to(torch.int64)  # (C,)
            out = _call_torch("quantize_per_channel", x, scales, zero_points, axis, getattr(torch, name))
        else:
            raise ValueError(
                f"torch has no quantized tensor for {self.granularity}; use PerTensor or PerChannel"
            )
        if not torch.equal(out.int_repr(), self.q):
            raise RuntimeError("torch re-quantized the codes differently; conversion aborted")
        return out

    @classmethod
    def from_torch(cls, t: torch.Tensor, spec: QuantSpec | None = None) -> QTensor:
        """A QTensor from a PyTorch quantized tensor, reading scale and zero point from its metadata.

        ``spec`` defaults to the full-range 8-bit grid of ``t.dtype``; pass e.g. :data:`INT8_SYMMETRIC` to
        record how the parameters were chosen. torch stores scales in float64; qbook keeps float32.
        """
        if not isinstance(t, torch.Tensor) or not t.is_quantized:
            raise TypeError(f"expected a torch quantized tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        bits_signed = {torch.qint8: (8, True), torch.quint8: (8, False)}.get(t.dtype)
        if bits_signed is None:
            raise ValueError(f"torch dtype {t.dtype} has no QuantSpec (qint8 and quint8 are supported)")
        spec = QuantSpec(*bits_signed) if spec is None else spec
        if (spec.bits, spec.signed) != bits_signed:
            raise ValueError(f"spec {spec} does not match the torch dtype {t.dtype}")
        scheme = t.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            granularity: Granularity = PerTensor()
            scale = torch.tensor(t.q_scale(), dtype=torch.float32)
            zero_point = torch.tensor(t.q_zero_point(), dtype=torch.int32)
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            granularity = PerChannel(t.q_per_channel_axis())
            shape = granularity.param_shape(t.shape)
            scale = t.q_per_channel_scales().to(torch.float32).reshape(shape)
            zero_point = t.q_per_channel_zero_points().to(torch.int32).reshape(shape)
        else:
            raise ValueError(f"torch qscheme {scheme} has no qbook counterpart")
        return cls(t.int_repr(), scale, zero_point, spec, granularity)


def torch_quantize_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype = torch.qint8
) -> torch.Tensor:
    """PyTorch's own per-tensor quantization of ``x``, as its integer codes (``int_repr``): the peer that
    chapter 3 and appendix A compare :func:`quantize` with. torch's deprecation notice for its quantized
    tensors is silenced (comparing with them is the point); a torch without them raises ``RuntimeError``.

    >>> torch_quantize_per_tensor(torch.tensor([0.5, -1.0]), 0.25, 0).tolist()
    [2, -4]
    """
    x = _check_float(x, "x")
    return _call_torch("quantize_per_tensor", x, float(scale), int(zero_point), dtype).int_repr()


def _call_torch(name: str, *args: object) -> torch.Tensor:
    fn = getattr(torch, name, None)
    if fn is None:
        raise RuntimeError(f"this torch ({torch.__version__}) no longer provides torch.{name}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
        try:
            return fn(*args)
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(f"torch.{name} failed in this torch ({torch.__version__}): {err}") from err


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio (信号量化噪声比) in dB — chapter 3:

    .. math:: \\mathrm{SQNR} = 10 \\log_{10} \\frac{\\sum x^2}{\\sum (x - \\hat x)^2}

    with the sums taken in float64. Each bit of a uniform grid adds about 6.02 dB. An exact ``x_hat`` gives
    ``inf``.

    >>> import torch
    >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([1.1, -0.9])), 3)   # error power 1/100
    20.0
    """
    for name, t in (("x", x), ("x_hat", x_hat)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if x.shape != x_hat.shape or x.numel() == 0:
        raise ValueError(
            f"x and x_hat must have the same non-empty shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    signal = float((x.double() ** 2).sum())
    noise = float(((x.double() - x_hat.double()) ** 2).sum())
    if signal == 0.0:
        raise ValueError("x is all zeros: the SQNR of a zero signal is undefined")
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)
