"""Quantized modules that compute in integers (量化模块) — chapter 7.

One family of modules, each built from a float module by ``from_float`` and each reporting its true size
(:attr:`QuantModule.nbytes`: the bytes of its state dict, which is what :func:`qbook.ptq.save` writes):

=========================  ================================================================================
module                     what it stores and computes
=========================  ================================================================================
:class:`QuantLinear`       int8 weight ``(N, K)`` (symmetric, one scale per output channel); input quantized
                           per token at run time (dynamic) or per tensor with a calibrated range (static);
                           int32 accumulation ``acc = q_x @ q_w^T`` (:func:`qbook.int_matmul`, (4.4));
                           output dequantized to float, or requantized to int8 (static, chapter 9)
:class:`QuantConv2d`       the same for a convolution: im2col (unfold) + the integer matmul, exact int32
:class:`WeightOnlyLinear`  int8 or packed int2..int7 weights (per channel or per group of ``g`` inputs),
                           dequantized on the fly; the matmul stays float
:class:`WeightOnlyConv2d`  the same for a convolution
=========================  ================================================================================

The equations, with ``x ≈ s_x (q_x - z_x)`` and ``W ≈ s_w q_w`` (``s_w`` per output channel ``n``):

* (7.1) static: ``y_mn = s_x s_w[n] (acc_mn + b_q[n])`` with ``acc = sum_k (q_x[m,k] - z_x) q_w[n,k]`` and the
  bias in int32, ``b_q = round(b / (s_x s_w))`` (chapter 9's :func:`qbook.intmath.quantize_bias`);
* (7.2) dynamic: ``y_mn = s_x[m] s_w[n] acc_mn + b[n]`` with one symmetric scale per token
  ``s_x[m] = max_k |x_mk| / 127``. The bias stays float: its integer form would need the scale
  ``s_x[m] s_w[n]``, which changes with every token, so it would have to be re-quantized per token (``M N``
  divisions and a second rounding) only to be dequantized again a moment later; adding the float bias after
  the dequantization is exact to float32 and costs one addition (torch.ao's dynamic Linear does the same);
* (7.3) int8 output (static): ``q_y = clamp(z_y + round(M_n (acc + b_q)), -128, 127)`` with
  ``M_n = s_x s_w[n] / s_y`` as a fixed-point multiplier (:func:`qbook.intmath.requantize`, (9.3)-(9.5)), so
  the next layer starts from integers.

>>> import torch
>>> torch.manual_seed(0) and None
>>> layer = QuantLinear.from_float(torch.nn.Linear(384, 1536))
>>> layer
QuantLinear(384→1536, W8 per-channel sym, A8 per-token dyn)
>>> layer.weight.dtype, layer.nbytes          # 384 * 1536 int8 + 1536 float32 scales + 1536 float32 biases
(torch.int8, 602112)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, calc_qparams, dequantize, quantize
from qbook.granularity import PerChannel, PerGroup, minmax
from qbook.intmath import _blas_layout, int_matmul, quantize_bias, quantize_multipliers, requantize
from qbook.kernels import int8_matmul
from qbook.packing import pack, unpack

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "WeightOnlyConv2d",
    "WeightOnlyLinear",
    "quantize_per_token",
]

Activation = Literal["dynamic", "static"]
Output = Literal["float", "int8"]

_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _check_spec(spec: object, name: str, bits: tuple[int, ...] = (8,)) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name} must be a QuantSpec, got {spec!r}")
    if spec.bits not in bits:
        raise ValueError(f"{name} must be a {' or '.join(map(str, bits))}-bit grid, got {spec}")
    return spec


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_float_input(x: object, who: str, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} takes a tensor {what}, got {type(x).__name__}")


def _check_float_module(module: object, cls: type, who: str) -> None:
    if not isinstance(module, cls):
        raise TypeError(f"{who}.from_float takes an nn.{cls.__name__}, got {type(module).__name__}")
    if not module.weight.is_floating_point():
        raise TypeError(f"{who}.from_float needs a floating-point weight, got {module.weight.dtype}")
    if not bool(torch.isfinite(module.weight).all()):
        raise ValueError(f"{who}.from_float: the weight holds NaN or infinite values")


def _check_qparams(scale: object, zero_point: object, spec: QuantSpec, what: str) -> tuple[float, int]:
    """A per-tensor (scale, zero point) as Python numbers: scale > 0 and finite in float32, zero point on
    the grid."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{what} scale must be one number (per tensor), got shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(zero_point, torch.Tensor):
        if zero_point.numel() != 1 or zero_point.is_floating_point():
            raise ValueError(f"{what} zero point must be one integer, got {zero_point!r}")
        zero_point = int(zero_point.item())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{what} scale must be a positive number, got {scale!r}")
    scale32 = torch.tensor(float(scale), dtype=torch.float32).item()
    if not (math.isfinite(scale32) and scale32 > 0):
        raise ValueError(f"{what} scale must be positive and finite in float32, got {scale!r}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int):
        raise TypeError(f"{what} zero point must be an int, got {zero_point!r}")
    if not spec.qmin <= zero_point <= spec.qmax:
        raise ValueError(f"{what} zero point must lie in [{spec.qmin}, {spec.qmax}], got {zero_point}")
    return scale32, zero_point


def _spec_name(spec: QuantSpec) -> str:
    return "sym" if spec.symmetric else "asym"


# --------------------------------------------------------------------------------------------------------
# The math cores: per-token quantization, the weight, the integer matmul with its epilogues
# --------------------------------------------------------------------------------------------------------


def quantize_per_token(
    x: torch.Tensor, spec: QuantSpec = INT8_SYMMETRIC
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization of the rows (tokens) of ``x`` (M, K): ``(q, scale)`` with ``q`` int8 (M, K) and
    ``scale`` float32 (M, 1) — the run-time step of (7.2).

    Symmetric ``spec`` (default ``[-127, 127]``): ``scale_m = max_k |x_mk| / ((qmax - qmin) / 2)``,
    ``q = clamp(round(x / scale), qmin, qmax)`` — exactly :func:`qbook.calc_qparams` and
    :func:`qbook.quantize`
    on the per-row range. Raises ``ValueError`` if ``x`` holds NaN or ±inf (a scale must be finite).

    >>> q, scale = quantize_per_token(torch.tensor([[0.5, -1.0], [2.0, 0.1]]))
    >>> q
    tensor([[  64, -127],
            [ 127,    6]], dtype=torch.int8)
    >>> scale.flatten()
    tensor([0.0079, 0.0157])
    """
    _check_spec(spec, "spec")
    if not spec.symmetric:
        raise ValueError(f"quantize_per_token quantizes symmetrically, got {spec}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError(f"x must be a 2-D floating-point tensor (M, K), got {x!r:.60}")
    q, scale = _quantize_per_token(x.float(), spec.qmin, spec.qmax)
    _check_finite_scale(scale, x)
    return q, scale


def _quantize_per_token(x: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3.4) per row, then (3.1): the row's absolute maximum gives its scale; ``round(x / scale)`` in float32.

    On a narrow grid (``qmin = -qmax``) the clamp of (3.1) can be skipped: ``|x| <= amax`` and
    ``scale = fl(amax / qmax)`` give ``|x / scale| <= qmax (1 + 2^-23) < qmax + 1/2``, which rounds to at most
    ``qmax`` (and a scale floored at eps means ``|x| < qmax eps``)."""
    amax = x.abs().amax(dim=1, keepdim=True)  # (M, 1): max_k |x_mk|
    scale = amax.div_((qmax - qmin) / 2).clamp_(min=_EPS)  # (M, 1), as calc_qparams(symmetric=True)
    codes = torch.div(x, scale).round_()  # (M, K), true division, ties to even
    if qmin != -qmax:
        codes.clamp_(qmin, qmax)
    return codes.to(torch.int8), scale


def _check_finite_scale(scale: torch.Tensor, x: torch.Tensor, where: str = "") -> None:
    if not bool(torch.isfinite(scale).all()):  # NaN or inf in x made the scale NaN or inf
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(
            f"{where}the input holds {nan} NaN and {inf} infinite value(s); it cannot be quantized"
        )


def _quantize_weight(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline, per output channel (rows of ``w`` (N, K)), symmetric: ``(q_w int8 (N, K), s_w (N,))``.

    ``scale`` (N,): given per-channel scales (e.g. the ones a QAT model trained with) instead of the rows'
    absolute maxima."""
    granularity = PerChannel(0)
    if scale is None:
        scale, _ = calc_qparams(*minmax(w, granularity), spec.qmin, spec.qmax, symmetric=True)  # (N, 1)
    scale = scale.reshape(-1, 1)  # (N, 1)
    q = quantize(w, scale, 0, spec.qmin, spec.qmax, granularity=granularity)
    return q.to(torch.int8), scale.reshape(-1)


def _dequantize_epilogue(
    acc: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """(7.2): ``acc * s_x[:, None] * s_w[None, :] (+ b)`` in float32 into ``out``, in the order of operations
    of ``kernels.int8_matmul`` (so the two agree bit for bit). ``out`` may be ``acc``'s own memory."""
    y = out.copy_(acc).mul_(a_scale).mul_(w_scale)  # (M, N) float32
    return y if bias is None else y.add_(bias)


def _rows_per_chunk(n: int) -> int:
    """Rows of (7.2) done at once on the CPU: a chunk's accumulators ``(rows, N)`` take at most ~1.5 MiB, so
    they are still in the cache when the epilogue reads them (64 to 256 rows)."""
    return max(64, min(256, 1 << max(0, (393_216 // max(n, 1)).bit_length() - 1)))


def _dynamic_cpu(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    qmin: int,
    qmax: int,
    who: str,
) -> torch.Tensor:
    """(7.2) on the CPU for rows ``x`` (M, K) float32, a chunk of rows at a time (:func:`_rows_per_chunk`):
    quantize each token, ``torch._int_mm``, the epilogue written straight into the output."""
    weight_t = _blas_layout(weight_t)  # strides CPU _int_mm reads right (a (1, N) transpose is misread)
    M, N = x.shape[0], weight_t.shape[1]
    y = torch.empty(M, N, dtype=torch.float32)
    acc = y.view(torch.int32)  # the int32 accumulators live where their float32 outputs will be
    step = _rows_per_chunk(N)
    if 0 < M <= step:  # one chunk (the usual case): no slicing
        q, a_scale = _quantize_per_token(x, qmin, qmax)  # (M, K) int8, (M, 1)
        torch._int_mm(q, weight_t, out=acc)  # (M, N) int32
        _dequantize_epilogue(acc, a_scale, w_scale, bias, y)  # in place, element by element
        scales = [a_scale]
    else:
        scales = []
        for start in range(0, M, step):
            rows = slice(start, start + step)
            q, a_scale = _quantize_per_token(x[rows], qmin, qmax)
            torch._int_mm(q, weight_t, out=acc[rows])
            _dequantize_epilogue(acc[rows], a_scale, w_scale, bias, y[rows])
            scales.append(a_scale)
    largest = scales[0].max() if len(scales) == 1 else torch.cat(scales).max() if scales else 0.0
    if not float(largest) < math.inf:  # NaN or inf in x made a scale NaN or inf: the rows are garbage
        _check_finite_scale(torch.cat(scales), x, f"{who}: ")
    return y


def _probe_int_mm() -> bool:
    from qbook.intmath import _int_mm_on_cpu

    return _int_mm_on_cpu()


_INT_MM_CPU = _probe_int_mm()


# --------------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------------


class QuantModule(nn.Module, ABC):
    """Base of qbook's quantized modules: ``nbytes`` (true size), ``scheme`` (a short description) and
    ``init_args`` (what :func:`qbook.ptq.load` needs to rebuild an empty module before loading its state)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(lambda module, keys: module._derive())

    @property
    def nbytes(self) -> int:
        """Bytes of the state dict: integer codes, scales, zero points and bias, as stored and saved."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    @abstractmethod
    def scheme(self) -> str:
        """A short description of the quantization scheme, as ``repr`` shows it."""

    @property
    @abstractmethod
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild an empty module of this shape and scheme."""

    def _derive(self) -> None:
        """Recompute the run-time constants (non-persistent buffers) from the stored ones."""


#: Bit widths of the integer modules' grids. Codes of 2..8 bits are stored as int8 (uint8 for an unsigned
#: activation grid); the accumulation is the same exact int32 :func:`qbook.int_matmul`, whose bound
#: ``K (qmax_x - qmin_x) max|q_w| <= K * 255 * 128 < 2^31`` holds for ``K <= 65 793`` at 8 bits (and for
#: larger ``K`` at fewer bits); beyond it ``int_matmul`` raises ``OverflowError`` rather than wrap around.
_INTEGER_BITS = (2, 3, 4, 5, 6, 7, 8)


def _check_weight_scale(scale: object, out_features: int) -> torch.Tensor:
    """Given per-output-channel weight scales: ``out_features`` positive finite numbers, as float32 (N,)."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"weight_scale must be a floating-point tensor (N,), got {scale!r:.60}")
    if scale.numel() != out_features:
        raise ValueError(
            f"weight_scale must hold one scale per output channel ({out_features}), got shape "
            f"{tuple(scale.shape)}"
        )
    scale = scale.detach().float().reshape(-1)
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"weight_scale must be positive and finite, got {scale.tolist()!r:.80}")
    return scale


class _IntegerMatmul(QuantModule):
    """What :class:`QuantLinear` and :class:`QuantConv2d` share: weight, scales, bias and the epilogues."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        activation: Activation,
        act_spec: QuantSpec | None,
        output: Output,
        weight_spec: QuantSpec,
    ) -> None:
        super().__init__()
        _check_choice(activation, "activation", ("dynamic", "static"))
        _check_choice(output, "output", ("float", "int8"))
        weight_spec = _check_spec(weight_spec, "weight_spec", _INTEGER_BITS)
        if not weight_spec.symmetric or not weight_spec.signed:
            raise ValueError(
                f"the weight grid must be signed and symmetric (zero point 0), got {weight_spec}"
            )
        if act_spec is None:
            act_spec = INT8_SYMMETRIC if activation == "dynamic" else INT8
        act_spec = _check_spec(act_spec, "act_spec", _INTEGER_BITS)
        if activation == "dynamic" and not act_spec.symmetric:
            raise ValueError(f"dynamic activations are quantized symmetrically per token, got {act_spec}")
        if output == "int8" and activation == "dynamic":
            raise ValueError(
                "output='int8' needs static activations: the next layer's input scale must be fixed"
            )
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.act_spec, self.output, self.weight_spec = (
            activation,
            act_spec,
            output,
            weight_spec,
        )
        self._fast = (
            activation == "dynamic" and act_spec.qmin == -127 and act_spec.qmax == 127 and _INT_MM_CPU
        )
        self.register_buffer("weight_scale", torch.ones(out_features))
        bias_dtype = torch.int32 if activation == "static" else torch.float32
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        if activation == "static":
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
            self.register_buffer("acc_scale", torch.ones(out_features), persistent=False)
        if output == "int8":
            self.register_buffer("output_scale", torch.tensor(1.0))
            self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))
            self.register_buffer(
                "output_multiplier", torch.zeros(out_features, dtype=torch.int64), persistent=False
            )
            self.register_buffer(
                "output_shift", torch.zeros(out_features, dtype=torch.int64), persistent=False
            )

    def _set_from_float(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_qparams: Any,
        output_qparams: Any,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        if weight_scale is not None:
            weight_scale = _check_weight_scale(weight_scale, self.out_features).to(weight.device)
        q, w_scale = _quantize_weight(
            weight.detach().float().reshape(self.out_features, -1), self.weight_spec, weight_scale
        )
        self.weight.copy_(q.reshape(self.weight.shape))
        self.weight_scale.copy_(w_scale)
        if self.activation == "static":
            if input_qparams is None:
                raise ValueError(
                    "static activations need input_qparams=(scale, zero_point) (from calibration)"
                )
            s_x, z_x = _check_qparams(*input_qparams, self.act_spec, "input")
            self.input_scale.fill_(s_x)
            self.input_zero_point.fill_(z_x)
            if bias is not None:
                self.bias.copy_(
                    quantize_bias(bias.detach().float(), s_x, w_scale)
                )  # (9.6): int32, scale s_x s_w
        elif input_qparams is not None:
            raise ValueError("input_qparams are for static activations; dynamic ones are computed per token")
        elif bias is not None:
            self.bias.copy_(bias.detach().float())
        if self.output == "int8":
            if output_qparams is None:
                raise ValueError(
                    "output='int8' needs output_qparams=(scale, zero_point) of the next layer's input"
                )
            s_y, z_y = _check_qparams(*output_qparams, INT8, "output")
            self.output_scale.fill_(s_y)
            self.output_zero_point.fill_(z_y)
        elif output_qparams is not None:
            raise ValueError("output_qparams need output='int8'")
        self._derive()

    def _derive(self) -> None:
        if self.activation == "static":  # the scale of the int32 accumulator: float32(s_x * s_w), once
            self.acc_scale.copy_((self.input_scale.double() * self.weight_scale.double()).float())
        if self.output == "int8":  # (9.4): M_n = s_x s_w[n] / s_y as multiplier * 2^(shift - 31)
            m = self.input_scale.double() * self.weight_scale.double() / self.output_scale.double()
            multiplier, shift = quantize_multipliers(m)
            self.output_multiplier.copy_(multiplier)
            self.output_shift.copy_(shift)

    @property
    def scheme(self) -> str:
        weights = f"W{self.weight_spec.bits} per-channel {_spec_name(self.weight_spec)}"
        if self.activation == "dynamic":
            acts = f"A{self.act_spec.bits} per-{self._token} dyn"
        else:
            acts = f"A{self.act_spec.bits} per-tensor static {_spec_name(self.act_spec)}"
        return f"{weights}, {acts}" + (", out int8" if self.output == "int8" else "")

    _token = "token"

    @property
    def init_args(self) -> dict[str, Any]:
        spec = self.act_spec
        return {
            "bias": self.bias is not None,
            "activation": self.activation,
            "act_spec": [spec.bits, spec.signed, spec.narrow_range, spec.symmetric],
            "output": self.output,
            "weight_spec": [
                self.weight_spec.bits,
                self.weight_spec.signed,
                self.weight_spec.narrow_range,
                True,
            ],
        }

    def _check_codes(self, x: torch.Tensor) -> None:
        if x.dtype != self.act_spec.dtype:
            raise TypeError(
                f"{type(self).__name__} takes float inputs, or (static) integer codes of dtype "
                f"{self.act_spec.dtype} on its input grid; got {x.dtype}"
            )
        if self.activation != "static":
            raise TypeError(
                f"{type(self).__name__} with dynamic activations takes float inputs, got {x.dtype}"
            )

    def _quantize_static(self, x: torch.Tensor) -> torch.Tensor:
        """(3.1) with the calibrated per-tensor input parameters."""
        spec = self.act_spec
        return quantize(x.float(), self.input_scale, self.input_zero_point, spec.qmin, spec.qmax)

    def _matmul(self, rows: torch.Tensor, quantized: bool) -> torch.Tensor:
        """The integer core on rows (M, K): quantize (unless ``quantized``), accumulate, epilogue. Integer
        arithmetic has no gradient: the input is detached."""
        rows = rows.detach()
        weight_t = self.weight.view(self.out_features, -1).t()  # (K, N) int8
        if self.activation == "dynamic":  # (7.2)
            qmin, qmax = self.act_spec.qmin, self.act_spec.qmax
            if rows.is_cpu and _INT_MM_CPU:
                return _dynamic_cpu(
                    rows.float(), weight_t, self.weight_scale, self.bias, qmin, qmax, type(self).__name__
                )
            q, a_scale = _quantize_per_token(rows.float(), qmin, qmax)
            _check_finite_scale(a_scale, rows, f"{type(self).__name__}: ")
            return int8_matmul(
                q, weight_t, a_scale, self.weight_scale, self.bias
            )  # chapter 10's kernel on a GPU
        q = rows if quantized else self._quantize_static(rows)
        acc = int_matmul(q, weight_t, a_zero_point=int(self.input_zero_point))  # (4.4), (M, N) int32
        if self.bias is not None:
            acc = acc.add_(self.bias)  # (7.1): the int32 bias is in the accumulator's units
        if self.output == "int8":  # (7.3), integers only
            return requantize(acc, self.output_multiplier, self.output_shift, int(self.output_zero_point))
        return acc.to(torch.float32).mul_(self.acc_scale)


class QuantLinear(_IntegerMatmul):
    """An ``nn.Linear`` with int8 weights and integer matmul — (7.1)-(7.3), chapter 7.

    State: ``weight`` int8 (N, K), ``weight_scale`` float32 (N,), ``bias`` (int32 with scale ``s_x s_w`` for
    static activations, float32 for dynamic ones, see (7.2)), and for static activations ``input_scale``,
    ``input_zero_point`` (and ``output_scale``, ``output_zero_point`` with ``output="int8"``).

    ``forward(x)`` takes float ``x`` (..., K) and returns float32 (..., N) — or, with ``output="int8"``, the
    int8 codes of the output on the grid ``(output_scale, output_zero_point)``. Static layers also accept
    integer codes (``act_spec.dtype``) already on their input grid (e.g. the int8 output of the layer before).

    Grids of 2..8 bits (``weight_spec``, ``act_spec``; e.g. W4A4 from :func:`qbook.qat.convert`) store their
    codes in int8 (uint8 for unsigned activations) and accumulate exactly as the 8-bit ones do.

    Build one with :meth:`from_float`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        activation: Activation = "dynamic",
        act_spec: QuantSpec | None = None,
        output: Output = "float",
        weight_spec: QuantSpec = INT8_SYMMETRIC,
    ) -> None:
        super().__init__(in_features, out_features, bias, activation, act_spec, output, weight_spec)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        activation: Activation = "dynamic",
        act_spec: QuantSpec | None = None,
        input_qparams: tuple[Any, Any] | None = None,
        output: Output = "float",
        output_qparams: tuple[Any, Any] | None = None,
        weight_spec: QuantSpec = INT8_SYMMETRIC,
        weight_scale: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize ``linear``: the weight per output channel (symmetric, ``weight_spec``), the bias as in
        (7.1) or (7.2).

        ``activation="static"`` needs ``input_qparams=(scale, zero_point)`` of the input grid ``act_spec``
        (default int8 affine), e.g. ``observer.qparams()`` after calibration; ``output="int8"`` needs
        ``output_qparams``. ``weight_scale`` (N,): use these per-channel weight scales (e.g. a QAT model's,
        :func:`qbook.qat.convert`) instead of the rows' absolute maxima. The float module is not modified.
        """
        _check_float_module(linear, nn.Linear, cls.__name__)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            activation=activation,
            act_spec=act_spec,
            output=output,
            weight_spec=weight_spec,
        ).to(linear.weight.device)
        module._set_from_float(linear.weight, linear.bias, input_qparams, output_qparams, weight_scale)
        return module

    @property
    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **super().init_args}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self._fast
            and type(x) is torch.Tensor
            and x.dtype == torch.float32
            and x.ndim
            and x.shape[-1] == self.in_features
            and x.is_cpu
        ):  # dynamic int8 on the CPU: the short path
            rows = x.detach().reshape(-1, self.in_features)  # (M, K)
            y = _dynamic_cpu(rows, self.weight.t(), self.weight_scale, self.bias, -127, 127, "QuantLinear")
            return y.view(*x.shape[:-1], self.out_features)
        _check_float_input(x, type(self).__name__, f"(..., {self.in_features})")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs (..., {self.in_features}), got {tuple(x.shape)}"
            )
        quantized = not x.is_floating_point()
        if quantized:
            self._check_codes(x)
        rows = x.reshape(-1, self.in_features)  # (M, K): every token is a row
        y = self._matmul(rows, quantized)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self.scheme}"


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


class _ConvGeometry:
    """Kernel size, stride, padding and dilation of a 2-D convolution, and its im2col (unfold)."""

    def _set_geometry(self, kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> None:
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")

    @classmethod
    def _conv_args(cls, conv: nn.Conv2d) -> tuple[Any, ...]:
        """The checked float ``conv``'s shape as this class's positional constructor arguments."""
        _check_float_module(conv, nn.Conv2d, cls.__name__)
        cls._check_conv(conv, cls.__name__)
        return (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
        )

    @staticmethod
    def _check_conv(conv: nn.Conv2d, who: str) -> None:
        if conv.groups != 1:
            raise ValueError(f"{who} supports groups=1 only, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{who} supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"{who} needs numeric padding, got padding={conv.padding!r}")

    def _geometry_args(self) -> dict[str, Any]:
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _unfold(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """im2col: (B, C, H, W) -> rows (B * L, C * kh * kw), one row per output position."""
        if pad_value != 0.0:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (B, K, L)
        else:
            cols = F.unfold(
                x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride
            )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * L, K)


class QuantConv2d(_ConvGeometry, _IntegerMatmul):
    """An ``nn.Conv2d`` (groups 1, zero padding) with int8 weights and an exact int32 integer matmul.

    The convolution is an im2col (unfold) followed by the matmul of :class:`QuantLinear`: each output
    position is a row ``(C * kh * kw,)`` of the input, and the weight ``(O, C, kh, kw)`` a matrix ``(O, K)``.
    Zero padding is exact: 0 is on every grid (it quantizes to the zero point). Dynamic activations take one
    scale per output position (a row of the unfolded input). Inputs ``(B, C, H, W)``.
    """

    _token = "position"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        *,
        activation: Activation = "dynamic",
        act_spec: QuantSpec | None = None,
        output: Output = "float",
        weight_spec: QuantSpec = INT8_SYMMETRIC,
    ) -> None:
        self._set_geometry(kernel_size, stride, padding, dilation)
        kh, kw = self.kernel_size
        _IntegerMatmul.__init__(
            self, in_channels * kh * kw, out_channels, bias, activation, act_spec, output, weight_spec
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw, dtype=torch.int8))

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        activation: Activation = "dynamic",
        act_spec: QuantSpec | None = None,
        input_qparams: tuple[Any, Any] | None = None,
        output: Output = "float",
        output_qparams: tuple[Any, Any] | None = None,
        weight_spec: QuantSpec = INT8_SYMMETRIC,
        weight_scale: torch.Tensor | None = None,
    ) -> QuantConv2d:
        """Quantize ``conv`` as :meth:`QuantLinear.from_float` does (weight per output channel)."""
        module = cls(
            *cls._conv_args(conv),
            activation=activation,
            act_spec=act_spec,
            output=output,
            weight_spec=weight_spec,
        ).to(conv.weight.device)
        module._set_from_float(conv.weight, conv.bias, input_qparams, output_qparams, weight_scale)
        return module

    @property
    def init_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            **self._geometry_args(),
            **super().init_args,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_input(x, type(self).__name__, "(B, C, H, W)")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects inputs (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        B, _, H, W = x.shape
        Ho, Wo = self._out_size(H, W)
        quantized = not x.is_floating_point()
        if quantized:  # integer codes: pad with the zero point (the code of 0.0), unfold in float (exact)
            self._check_codes(x)
            rows = self._unfold(x.float(), float(self.input_zero_point)).to(x.dtype)
        elif self.activation == "static":  # quantize once per pixel, then unfold the codes
            q = self._quantize_static(x)
            rows = self._unfold(q.float(), float(self.input_zero_point)).to(q.dtype)
            quantized = True
        else:
            rows = self._unfold(x.float())
        y = self._matmul(rows, quantized)  # (B * L, O)
        return y.reshape(B, Ho * Wo, self.out_channels).transpose(1, 2).reshape(B, self.out_channels, Ho, Wo)

    def extra_repr(self) -> str:
        k = "×".join(map(str, self.kernel_size))
        geometry = f"{self.in_channels}→{self.out_channels}, {k}"
        if self.stride != (1, 1):
            geometry += f", stride={self.stride}"
        if self.padding != (0, 0):
            geometry += f", padding={self.padding}"
        return f"{geometry}, {self.scheme}"


# --------------------------------------------------------------------------------------------------------
# Weight-only quantization
# --------------------------------------------------------------------------------------------------------


class _WeightOnly(QuantModule):
    """Weights stored as ``bits``-bit codes (packed below 8 bits) with a float32 scale per output channel or
    per group of ``group_size`` inputs; dequantized on every call, the matmul itself float."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int | None,
        spec: QuantSpec | None,
    ) -> None:
        super().__init__()
        if spec is None:
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
            spec = QuantSpec(bits, True, narrow_range=True, symmetric=True)
        _check_spec(spec, "spec", tuple(range(2, 9)))
        if spec.bits != bits:
            raise ValueError(f"bits={bits} but spec has {spec.bits} bits")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(f"group_size must be a positive int or None (per channel), got {group_size!r}")
        self.in_features, self.out_features, self.bits, self.group_size, self.spec = (
            in_features,
            out_features,
            bits,
            group_size,
            spec,
        )
        g = in_features if group_size is None else group_size
        self.padded_features = -(-in_features // g) * g  # K rounded up to whole groups (zero codes beyond K)
        groups = self.padded_features // g
        codes_per_row = self.padded_features if bits == 8 else -(-self.padded_features * bits // 8)
        self.register_buffer(
            "weight", torch.zeros(out_features, codes_per_row, dtype=spec.dtype if bits == 8 else torch.uint8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        zero_dtype = spec.dtype
        self.register_buffer(
            "weight_zero_point",
            None if spec.symmetric and spec.signed else torch.zeros(out_features, groups, dtype=zero_dtype),
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def _granularity(self) -> PerGroup:
        return PerGroup(axis=1, group_size=self.group_size or self.padded_features)

    def _set_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float().reshape(self.out_features, -1)  # (N, K)
        w = F.pad(w, (0, self.padded_features - self.in_features))  # (N, Kp): zeros in the padding
        spec, granularity = self.spec, self._granularity
        scale, zero_point = calc_qparams(
            *minmax(w, granularity), spec.qmin, spec.qmax, symmetric=spec.symmetric
        )
        q = quantize(w, scale, zero_point, spec.qmin, spec.qmax, granularity=granularity)  # (N, Kp)
        self.weight.copy_(q if self.bits == 8 else pack(q, self.bits, signed=spec.signed))
        self.weight_scale.copy_(scale)
        if self.weight_zero_point is not None:
            self.weight_zero_point.copy_(zero_point)
        if bias is not None:
            self.bias.copy_(bias.detach().float())

    def _set_codes(
        self, codes: object, scale: object, zero_point: object, bias: torch.Tensor | None, who: str
    ) -> None:
        """Store given codes ``(N, K)`` with their ``scale``/``zero_point`` ``(N, groups)``; ``K`` is padded
        with the zero point (the code of 0), as :meth:`_set_from_float` pads it."""
        spec, N, K = self.spec, self.out_features, self.in_features
        groups = self.weight_scale.shape[1]
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"{who}: codes must be an integer tensor ({N}, {K}), got {codes!r:.60}")
        if tuple(codes.shape) != (N, K):
            raise ValueError(f"{who}: codes must have shape ({N}, {K}), got {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < spec.qmin or hi > spec.qmax:
            raise ValueError(f"{who}: codes must lie in [{spec.qmin}, {spec.qmax}], got [{lo}, {hi}]")
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() \
                or tuple(scale.shape) != (N, groups):
            got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"{who}: scale must be a float tensor ({N}, {groups}), got {got}")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"{who}: scale must be positive and finite")
        if zero_point is None:
            zero_point = torch.zeros(N, groups, dtype=torch.int32)
        if not isinstance(zero_point, torch.Tensor) or zero_point.is_floating_point() \
                or tuple(zero_point.shape) != (N, groups):
            got = tuple(zero_point.shape) if isinstance(zero_point, torch.Tensor) else type(zero_point)
            raise ValueError(f"{who}: zero_point must be an integer tensor ({N}, {groups}) or None: {got}")
        if self.weight_zero_point is None and bool(zero_point.ne(0).any()):
            raise ValueError(f"{who}: the symmetric signed grid {spec} has zero point 0, got nonzero ones")
        if int(zero_point.min()) < spec.qmin or int(zero_point.max()) > spec.qmax:
            raise ValueError(f"{who}: zero_point must lie in [{spec.qmin}, {spec.qmax}]")
        padding = zero_point[:, -1:].expand(N, self.padded_features - K)  # (N, Kp - K): the code of 0
        q = torch.cat([codes.to(spec.dtype), padding.to(spec.dtype)], dim=1)  # (N, Kp)
        self.weight.copy_(q if self.bits == 8 else pack(q, self.bits, signed=spec.signed))
        self.weight_scale.copy_(scale)
        if self.weight_zero_point is not None:
            self.weight_zero_point.copy_(zero_point)
        if bias is not None:
            self.bias.copy_(bias.detach().float())

    def codes(self) -> torch.Tensor:
        """The integer codes ``(N, K)`` (unpacked)."""
        q = (
            self.weight
            if self.bits == 8
            else unpack(self.weight, self.bits, self.padded_features, signed=self.spec.signed)
        )
        return q[:, : self.in_features]

    def dequantized_weight(self) -> torch.Tensor:
        """``s_w (q_w - z_w)`` (3.2), float32 ``(N, K)``: what the float matmul uses."""
        q = (
            self.weight
            if self.bits == 8
            else unpack(self.weight, self.bits, self.padded_features, signed=self.spec.signed)
        )
        zero_point = 0 if self.weight_zero_point is None else self.weight_zero_point
        w = dequantize(q, self.weight_scale, zero_point, granularity=self._granularity)
        return w[:, : self.in_features]

    @property
    def scheme(self) -> str:
        where = "per-channel" if self.group_size is None else f"per-group g={self.group_size}"
        packed = "" if self.bits == 8 else " packed"
        return f"W{self.bits}{packed} {where} {_spec_name(self.spec)}, A float"

    @property
    def init_args(self) -> dict[str, Any]:
        s = self.spec
        return {
            "bias": self.bias is not None,
            "bits": self.bits,
            "group_size": self.group_size,
            "spec": [s.bits, s.signed, s.narrow_range, s.symmetric],
        }


class WeightOnlyLinear(_WeightOnly):
    """An ``nn.Linear`` whose weight is stored in ``bits`` bits (int8, or packed int2..int7 through
    :func:`qbook.packing.pack`), per output channel (``group_size=None``) or per group of ``group_size``
    consecutive inputs (``K`` is padded with zero codes to a multiple of ``group_size``). Symmetric by default
    (``[-(2^(b-1) - 1), 2^(b-1) - 1]``); pass an affine ``spec`` to store zero points too. The forward pass
    dequantizes the weight and runs a float matmul: it saves memory, not arithmetic. ``nbytes`` counts the
    packed codes, the float32 scales (and zero points) and the float32 bias.

    >>> layer = WeightOnlyLinear.from_float(torch.nn.Linear(256, 64), bits=4, group_size=128)
    >>> layer
    WeightOnlyLinear(256→64, W4 packed per-group g=128 sym, A float)
    >>> layer.nbytes        # 64 * 128 bytes of int4 codes + 64 * 2 float32 scales + 64 float32 biases
    8960
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: int | None = None,
        spec: QuantSpec | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, bits, group_size, spec)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, bits: int = 8, group_size: int | None = None, spec: QuantSpec | None = None
    ) -> WeightOnlyLinear:
        """Quantize the weight of ``linear`` (round to nearest); the float module is not modified."""
        _check_float_module(linear, nn.Linear, cls.__name__)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            group_size=group_size,
            spec=spec,
        ).to(linear.weight.device)
        module._set_from_float(linear.weight, linear.bias)
        return module

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None = None,
        *,
        bits: int = 8,
        group_size: int | None = None,
        spec: QuantSpec | None = None,
    ) -> WeightOnlyLinear:
        """Store codes chosen elsewhere (GPTQ's, :mod:`qbook.gptq`, chapter 11) instead of rounding the weight
        of ``linear`` to nearest: ``codes`` ``(N, K)`` on the grid ``spec``, ``scale`` and ``zero_point``
        ``(N, groups)`` (``groups = ceil(K / group_size)``, 1 per channel; ``zero_point`` ``None`` or 0 for
        the default symmetric grid). ``linear`` gives the shape and the bias. ``dequantized_weight()`` is then
        ``dequantize(codes, scale, zero_point, granularity=PerGroup(1, group_size))``, exactly.

        >>> lin = torch.nn.Linear(4, 2)
        >>> codes = torch.tensor([[1, -7, 7, 4], [0, 1, 2, 3]], dtype=torch.int8)
        >>> layer = WeightOnlyLinear.from_quantized(lin, codes, torch.tensor([[0.1], [0.5]]), bits=4)
        >>> layer.dequantized_weight()
        tensor([[ 0.1000, -0.7000,  0.7000,  0.4000],
                [ 0.0000,  0.5000,  1.0000,  1.5000]])
        """
        _check_float_module(linear, nn.Linear, cls.__name__)
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            group_size=group_size,
            spec=spec,
        ).to(linear.weight.device)
        module._set_codes(codes, scale, zero_point, linear.bias, f"{cls.__name__}.from_quantized")
        return module

    @property
    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **super().init_args}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} takes a floating-point tensor, got {x!r:.60}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs (..., {self.in_features}), got {tuple(x.shape)}"
            )
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self.scheme}"


class WeightOnlyConv2d(_ConvGeometry, _WeightOnly):
    """An ``nn.Conv2d`` (groups 1, zero padding) with weights stored as :class:`WeightOnlyLinear` stores them
    (the weight ``(O, C, kh, kw)`` seen as ``(O, C * kh * kw)``), dequantized on the fly for a float
    convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: int | None = None,
        spec: QuantSpec | None = None,
    ) -> None:
        self._set_geometry(kernel_size, stride, padding, dilation)
        kh, kw = self.kernel_size
        _WeightOnly.__init__(self, in_channels * kh * kw, out_channels, bias, bits, group_size, spec)
        self.in_channels, self.out_channels = in_channels, out_channels

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, *, bits: int = 8, group_size: int | None = None, spec: QuantSpec | None = None
    ) -> WeightOnlyConv2d:
        module = cls(
            *cls._conv_args(conv),
            bits=bits,
            group_size=group_size,
            spec=spec,
        ).to(conv.weight.device)
        module._set_from_float(conv.weight, conv.bias)
        return module

    @property
    def init_args(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            **self._geometry_args(),
            **super().init_args,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} takes a floating-point tensor, got {x!r:.60}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects inputs (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        w = self.dequantized_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        k = "×".join(map(str, self.kernel_size))
        return f"{self.in_channels}→{self.out_channels}, {k}, {self.scheme}"


#: Every quantized module class, by name (for :func:`qbook.ptq.load`).
MODULES: dict[str, type[QuantModule]] = {
    cls.__name__: cls for cls in (QuantLinear, QuantConv2d, WeightOnlyLinear, WeightOnlyConv2d)
}
