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

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch

from qbook.granularity import Granularity, PerChannel, PerGroup, PerTensor, minmax

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
    qmin, qmax = _check_range(qmin, qmax)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise AssertionError("unreachable: _check_range limits the range to int32")


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
# Argument checks: each names the offending value
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
    if isinstance(x, float):
        return torch.tensor(x, dtype=torch.float32)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    return x.to(torch.float32)


def _check_x(x: object) -> torch.Tensor:
    x = _check_float(x, "x")
    nan = torch.isnan(x)
    if nan.any():
        index = _index(nan)
        raise ValueError(
            f"x contains {int(nan.sum())} NaN value(s), the first at index {index}; NaN has no integer code"
        )
    return x


def _scale_values(scale: object, device: torch.device) -> torch.Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (torch.Tensor, int, float)):
        raise TypeError(f"scale must be a float tensor or number, got {scale!r}")
    scale = torch.as_tensor(scale, device=device).to(torch.float32)
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        raise ValueError(f"scale must be positive and finite, got {_first(scale, bad)}")
    return scale


def _zero_point_values(
    zero_point: object, device: torch.device, qrange: tuple[int, int] | None
) -> torch.Tensor:
    if isinstance(zero_point, bool) or not isinstance(zero_point, (torch.Tensor, int, float)):
        raise TypeError(f"zero_point must be an integer tensor or int, got {zero_point!r}")
    zero_point = torch.as_tensor(zero_point, device=device)
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise TypeError(f"zero_point must be an integer tensor or int, got dtype {zero_point.dtype}")
    if zero_point.is_floating_point():
        bad = ~torch.isfinite(zero_point) | (zero_point != zero_point.round())
        if bad.any():
            raise ValueError(f"zero_point must hold integers, got {_first(zero_point, bad)}")
    if qrange is not None:
        bad = (zero_point < qrange[0]) | (zero_point > qrange[1])
        if bad.any():
            raise ValueError(
                f"zero_point must lie in [qmin, qmax] = [{qrange[0]}, {qrange[1]}], "
                f"got {_first(zero_point, bad)}"
            )
    return zero_point.to(torch.float64)  # exact for every int32 zero point


def _check_broadcast(param: torch.Tensor, shape: torch.Size, name: str) -> None:
    try:
        ok = torch.broadcast_shapes(param.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(param.shape)} does not broadcast to the data's shape {tuple(shape)}; "
            "per-channel parameters need the data's rank, e.g. (C, 1) for axis 0 of a 2-D tensor"
        )


def _check_param_shape(param: torch.Tensor, granularity: Granularity, shape: torch.Size, name: str) -> None:
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup)):
        raise TypeError(f"granularity must be PerTensor, PerChannel or PerGroup, got {granularity!r}")
    expected = granularity.param_shape(shape)
    if param.numel() != 1 and tuple(param.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(param.shape)}, expected {expected} for {granularity} "
            f"on data of shape {tuple(shape)}"
        )


def _params(
    scale: TensorLike,
    zero_point: TensorLike,
    shape: torch.Size,
    device: torch.device,
    granularity: Granularity | None,
    qrange: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float32 ``scale`` and float64 ``zero_point``, expanded by ``granularity`` to broadcast."""
    scale = _scale_values(scale, device)
    zero_point = _zero_point_values(zero_point, device, qrange)
    if granularity is not None:
        _check_param_shape(scale, granularity, shape, "scale")
        _check_param_shape(zero_point, granularity, shape, "zero_point")
        scale, zero_point = granularity.expand(scale, shape), granularity.expand(zero_point, shape)
    _check_broadcast(scale, shape, "scale")
    _check_broadcast(zero_point, shape, "zero_point")
    return scale, zero_point


# --------------------------------------------------------------------------------------------------------
# The three verbs
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
      signed grid and ``(qmin + qmax + 1) // 2`` for an unsigned one.

    ``scale`` is floored at float32 eps (an all-zero tensor still gets a usable grid). Elementwise over
    tensors: per-channel minima and maxima give per-channel parameters. Computed in float32 like
    ``torch.ao.quantization.MinMaxObserver``, which it matches for int8/uint8.

    >>> calc_qparams(-1.0, 2.0, qmin=-128, qmax=127)
    (tensor(0.0118), tensor(-43, dtype=torch.int32))
    >>> calc_qparams(-1.0, 2.0, qmin=-127, qmax=127, symmetric=True)
    (tensor(0.0157), tensor(0, dtype=torch.int32))
    """
    qmin, qmax = _check_range(qmin, qmax)
    xmin, xmax = _check_float(_as_float(xmin), "xmin"), _check_float(_as_float(xmax), "xmax")
    for name, value in (("xmin", xmin), ("xmax", xmax)):
        bad = ~torch.isfinite(value)
        if bad.any():
            raise ValueError(f"{name} must be finite, got {_first(value, bad)}")
    xmin, xmax = torch.broadcast_tensors(xmin, xmax)
    bad = xmin > xmax
    if bad.any():
        index = _index(bad)
        lo, hi = xmin[index].item(), xmax[index].item()
        raise ValueError(f"xmin must not exceed xmax, got xmin={lo!r} > xmax={hi!r}")
    xmin, xmax = xmin.clamp(max=0.0), xmax.clamp(min=0.0)  # widen to include 0
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / (float(qmax - qmin) / 2)
    else:
        scale = (xmax - xmin) / float(qmax - qmin)
    scale = scale.clamp(min=_FLOAT32_EPS)
    if symmetric:
        zero_point = torch.full_like(scale, 0 if qmin < 0 else (qmin + qmax + 1) // 2)
    else:
        zero_point = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero_point.to(torch.int32)


def _as_float(value: TensorLike) -> TensorLike:
    """Python ints (and integer tensors) as range endpoints are fine: they are values, not codes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        return value.to(torch.float32)
    return value


def _exact_dtype(largest: int) -> torch.dtype:
    """float32 when every integer up to ``largest`` in magnitude is a float32 (2^24), else float64."""
    return torch.float32 if largest <= 2**24 else torch.float64


def _codes(
    x: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    qrange: tuple[int, int],
    granularity: Granularity | None,
) -> torch.Tensor:
    """``round(x / scale) + zero_point`` before the clamp: exact for every code of the grid."""
    x = _check_x(x)
    scale, zero_point = _params(scale, zero_point, x.shape, x.device, granularity, qrange)
    work = _exact_dtype(max(-qrange[0], qrange[1]))
    return torch.round(x / scale).to(work) + zero_point.to(work)  # float32 division, ties to even


def quantize(
    x: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    qmin: int,
    qmax: int,
    *,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Quantize (量化) ``x`` onto the integer grid ``[qmin, qmax]`` — equation (3.1), chapter 3.

    ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``

    with a true float32 division and round-half-to-even (the ONNX ``QuantizeLinear`` definition). ``scale``
    and ``zero_point`` broadcast against ``x`` (per-channel: shape ``(C, 1)`` etc.); with ``granularity``
    they have its ``param_shape`` and are expanded (per-group). ±inf saturate to ``qmin``/``qmax``; NaN is a
    ``ValueError``. The result has the smallest integer dtype holding the grid (:func:`dtype_for_range`).

    >>> import torch
    >>> quantize(torch.tensor([-1.25, 0.25, 0.75, 100.0]), 0.5, 3, qmin=-128, qmax=127)  # ties to even
    tensor([  1,   3,   5, 127], dtype=torch.int8)
    """
    qmin, qmax = _check_range(qmin, qmax)
    codes = _codes(x, scale, zero_point, (qmin, qmax), granularity)
    return codes.clamp(qmin, qmax).to(dtype_for_range(qmin, qmax))


def dequantize(
    q: torch.Tensor,
    scale: TensorLike,
    zero_point: TensorLike,
    *,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Dequantize (反量化) integer codes back to float32 — equation (3.2), chapter 3.

    ``x_hat = (q - zero_point) * scale``

    ``q - zero_point`` is exact for codes below 2^24 in magnitude (rounded once to float32 beyond), then one
    float32 multiplication. ``scale``/``zero_point`` as in :func:`quantize`.

    >>> import torch
    >>> dequantize(torch.tensor([0, 3, 5, 93], dtype=torch.int8), 0.1, 3)
    tensor([-0.3000,  0.0000,  0.2000,  9.0000])
    """
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must be an integer tensor (the output of quantize), got {got}")
    scale, zero_point = _params(scale, zero_point, q.shape, q.device, granularity)
    largest = max(torch.iinfo(q.dtype).max, int(zero_point.abs().max()) if zero_point.numel() else 0)
    work = _exact_dtype(largest)  # q and zero_point exact in it, so q - zero_point is rounded once
    return (q.to(work) - zero_point.to(work)).to(torch.float32) * scale


class _FakeQuantize(torch.autograd.Function):
    """Forward ``dequantize(quantize(x))``; backward the clipped straight-through estimator (chapter 8)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, granularity):  # type: ignore[override]
        codes = _codes(x.detach(), scale, zero_point, (qmin, qmax), granularity)
        ctx.save_for_backward((codes >= qmin) & (codes <= qmax))  # where the STE passes the gradient
        q = codes.clamp(qmin, qmax).to(dtype_for_range(qmin, qmax))
        return dequantize(q, scale, zero_point, granularity=granularity).to(x.dtype)  # (3.2) after (3.1)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None, None


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
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, granularity)


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
        _params(self.scale, self.zero_point, self.q.shape, self.q.device, self.granularity)

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
