"""Export to ONNX (导出 ONNX): chapter 7's integer modules as ONNX operators — chapter 8.

:func:`to_onnx` traces a model with ``torch.fx`` (qbook's quantized modules are leaves), writes one group of
ONNX nodes per traced operation and returns (and optionally saves) the ``onnx.ModelProto``; :func:`run`
executes it in onnxruntime or in ONNX's reference evaluator and returns a torch tensor.

What each module becomes, and why:

=========================================  ===================================================================
qbook module                               ONNX nodes
=========================================  ===================================================================
:class:`~qbook.nn.QuantLinear` (static)    ``QuantizeLinear`` (3.1) → ``MatMulInteger`` (4.4) → ``Add`` int32
                                           bias → ``Cast`` → ``Mul`` by ``float32(s_x s_w)``: (7.1)
:class:`~qbook.nn.QuantConv2d` (static)    the same with ``ConvInteger`` (it pads with the zero point, as
                                           qbook does)
``output="int8"`` (static)                 ``+ b_q`` → (9.5) in int64 operators → ``Clip`` → int8: (7.3)
QuantLinear / QuantConv2d (dynamic)        per-token scale ``ReduceMax(Abs)`` → ``Div`` → ``Max(eps)``;
                                           codes ``Round(Div)`` → ``Cast`` int8 → ``MatMulInteger`` → ``Cast``
                                           → ``Mul`` → ``Mul`` → ``Add``: (7.2). A convolution is unfolded
                                           (im2col, one ``Gather``) first, so every output position gets its
                                           own scale, as in qbook
:class:`~qbook.nn.WeightOnlyLinear`,       ``DequantizeLinear`` of the stored codes (block-wise, opset 21;
:class:`~qbook.nn.WeightOnlyConv2d`        int4 codes stay int4) → float ``MatMul`` / ``Conv`` (QDQ)
=========================================  ===================================================================

plus the float operations of small networks: ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, ReLU (also
ReLU6 and leaky), sigmoid, tanh, max and average pooling, flatten/reshape, ``+ - * /`` (:data:`SUPPORTED`
lists them all).

**Integer operators where they are exact.** ONNX defines ``QuantizeLinear`` as qbook's (3.1) (true division,
round half to even, add the zero point, saturate); ``MatMulInteger`` and ``ConvInteger`` accumulate
``(q_x - z_x) q_w`` in int32 exactly, as :func:`qbook.int_matmul` does. The float epilogue is written in
qbook's order of operations (``Cast(acc + b_q) * acc_scale`` for static, ``((Cast(acc) * s_x) * s_w) + b``
for dynamic), so onnxruntime reproduces qbook's outputs bit for bit — the tests check ``torch.equal``. Only
the weight-only modules and float layers differ, by float rounding, because their matmuls sum in another
order.

``quant_format="qdq"`` writes static layers in the interchange form instead: ``QuantizeLinear →
DequantizeLinear`` around a float ``MatMul`` / ``Conv`` on dequantized weights and bias (:func:`_qdq_static`).
It is (7.1) in exact arithmetic and agrees with qbook to float rounding; a rounding difference that lands on
the next layer's rounding boundary can move a code, so the integer form is the default.

**Graph optimizations off.** onnxruntime's optimizer rewrites quantized graphs: in onnxruntime 1.32 its
basic level turns ``Cast → Mul`` into a ``DequantizeLinear``, its extended level removes ``Relu`` nodes next
to ``QuantizeLinear``, and QDQ groups may become ``QLinear*`` kernels that requantize with their own rounding.
On the tests' models the rewritten graphs still gave qbook's outputs, but nothing promises the order of
operations, so :func:`session_options` disables graph optimizations: the graph runs as exported.

Static layers with ``output="int8"`` (7.3) export their fixed-point requantization (9.5) as int64 integer
operators (``Mul``, ``Div`` that truncates like C++, ``BitwiseAnd``, comparisons), bit-exact to
:func:`qbook.requantize`; the next static layer takes the int8 codes directly (max pooling and reshapes may
sit between them). Refused, with an error that names the module or operation: grids whose codes do not fit
int8/uint8, unsigned dynamic grids, dropout or batch norm in training mode, and every operation outside
:data:`SUPPORTED`.

>>> import tempfile, torch
>>> from qbook.nn import QuantLinear
>>> torch.manual_seed(0) and None
>>> layer = QuantLinear.from_float(torch.nn.Linear(4, 3), activation="static", input_qparams=(0.02, -3))
>>> model = torch.nn.Sequential(layer, torch.nn.ReLU())
>>> x = torch.randn(2, 4, dtype=torch.float64).float()
>>> with tempfile.TemporaryDirectory() as tmp:
...     proto = to_onnx(model, x, f"{tmp}/model.onnx")
...     y = run(f"{tmp}/model.onnx", x)
>>> [node.op_type for node in proto.graph.node]
['QuantizeLinear', 'MatMulInteger', 'Add', 'Cast', 'Mul', 'Relu']
>>> torch.equal(y, model(x))
True
"""

from __future__ import annotations

import inspect
import operator
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from qbook.affine import QuantSpec
from qbook.nn import QuantConv2d, QuantLinear, WeightOnlyConv2d, WeightOnlyLinear

__all__ = ["OPSET", "SUPPORTED", "UnsupportedModelError", "run", "session_options", "to_onnx"]


class UnsupportedModelError(NotImplementedError, ValueError):
    """A module, function or argument :func:`to_onnx` cannot write (outside :data:`SUPPORTED`, or without an
    ONNX equivalent). A ``ValueError`` like every refusal of bad input in qbook, and a ``NotImplementedError``
    because the model itself may be fine: catch either."""

#: The ONNX opset :func:`to_onnx` writes by default: 21 is the first with block-wise ``DequantizeLinear``
#: and int4 tensors (the weight-only modules); the integer operators exist since opset 10.
OPSET = 21

Runtime = Literal["onnxruntime", "reference"]
QuantFormat = Literal["integer", "qdq"]


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qbook.export needs the 'onnx' extra: pip install 'qbook[onnx]'") from e
    return onnx


# --------------------------------------------------------------------------------------------------------
# The graph being written
# --------------------------------------------------------------------------------------------------------

_NP_TO_ONNX = {
    np.dtype(np.float32): 1,  # TensorProto.FLOAT
    np.dtype(np.uint8): 2,
    np.dtype(np.int8): 3,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
}
_FLOAT, _UINT8, _INT8, _INT64 = 1, 2, 3, 7  # TensorProto's numbers (onnx is imported only when used)
_INT4, _UINT4 = 22, 21


@dataclass(frozen=True)
class _Value:
    """A tensor of the ONNX graph: its name, and the shape and dtype the traced example gave it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Graph:
    """Collects nodes and initializers; names every tensor uniquely."""

    def __init__(self, dynamic_batch: bool, quant_format: str = "integer") -> None:
        self.nodes: list[Any] = []
        self.quant_format = quant_format
        self.initializers: list[Any] = []
        self.dynamic_batch = dynamic_batch
        self.scope = "graph"
        self._used: Counter[str] = Counter()

    def name(self, hint: str) -> str:
        base = f"{self.scope}/{hint}"
        self._used[base] += 1
        n = self._used[base]
        return base if n == 1 else f"{base}_{n}"

    def const(self, value: Any, hint: str, onnx_type: int | None = None) -> str:
        """An initializer from an array (its numpy dtype gives the ONNX type unless ``onnx_type``)."""
        helper = _onnx().helper
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        name = self.name(hint)
        if onnx_type in (_INT4, _UINT4):
            tensor = helper.make_tensor(name, onnx_type, array.shape, array.astype(np.int64).ravel().tolist())
        else:
            if array.dtype not in _NP_TO_ONNX:
                raise TypeError(f"cannot store a {array.dtype} constant in the ONNX graph ({hint})")
            tensor = _onnx().numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs: Any) -> str:
        """Append one node with one output; return the output's name."""
        out = self.name(hint or op_type)
        self.nodes.append(_onnx().helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _ints(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


def _reshape(g: _Graph, x: _Value, shape: Sequence[int]) -> str:
    """Reshape to the traced output ``shape``; with a dynamic batch the leading dimension is copied (0)."""
    target = list(shape)
    if g.dynamic_batch:
        if not (shape and x.shape and shape[0] == x.shape[0]):
            raise ValueError(
                f"a reshape from {x.shape} to {tuple(shape)} changes the batch dimension; export with "
                "dynamic_batch=False to fix the batch size"
            )
        target[0] = 0  # ONNX Reshape: 0 copies the input's dimension
    return g.op("Reshape", x.name, g.const(_ints(target), "shape"))


# --------------------------------------------------------------------------------------------------------
# The math cores: chapter 7's integer modules as ONNX nodes
# --------------------------------------------------------------------------------------------------------


def _storage(spec: QuantSpec, who: str) -> tuple[np.dtype, int, int]:
    """The 8-bit type that holds the grid's codes in qbook (``spec.dtype``: int8, or uint8 for unsigned
    grids beyond 127), and its range."""
    if spec.dtype == torch.int8:
        return np.dtype(np.int8), -128, 127
    if spec.dtype == torch.uint8:
        return np.dtype(np.uint8), 0, 255
    raise ValueError(f"{who}: ONNX integer operators take int8 or uint8 codes; the grid {spec} does not fit")


def _quantize_linear(g: _Graph, x: str, scale: float, zero_point: int, spec: QuantSpec, who: str) -> str:
    """(3.1) ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``: ``QuantizeLinear`` divides, rounds half
    to even, adds the zero point and saturates to int8/uint8; a ``Clip`` narrows to ``[qmin, qmax]`` when the
    grid is narrower (narrow range, fewer than 8 bits)."""
    dtype, lo, hi = _storage(spec, who)
    q = g.op("QuantizeLinear", x, g.const(np.float32(scale), "scale"), g.const(dtype.type(zero_point), "zp"))
    if (spec.qmin, spec.qmax) != (lo, hi):
        q = g.op("Clip", q, g.const(dtype.type(spec.qmin), "qmin"), g.const(dtype.type(spec.qmax), "qmax"))
    return q


def _static_epilogue(g: _Graph, acc: str, module: QuantLinear | QuantConv2d, shape: tuple[int, ...]) -> str:
    """(7.1) after the accumulation: ``y = float32(acc + b_q) * float32(s_x s_w)``, the int32 bias added
    before the one float multiplication (``module.acc_scale``), as qbook does; or (7.3) for int8 outputs.
    ``shape`` puts the output channels where the accumulator has them."""
    if module.bias is not None:
        acc = g.op("Add", acc, g.const(module.bias.reshape(shape), "bias_q"))  # int32 + int32
    if module.output == "int8":
        return _requantize(g, acc, module, shape)
    y = g.op("Cast", acc, to=_FLOAT)
    return g.op("Mul", y, g.const(module.acc_scale.reshape(shape), "acc_scale"))


def _requantize(g: _Graph, acc: str, module: QuantLinear | QuantConv2d, shape: tuple[int, ...]) -> str:
    """(7.3) ``q_y = clamp(z_y + MBQM(acc), -128, 127)`` with (9.5), TFLite's fixed-point multiply, in int64
    ONNX operators: ``SaturatingRoundingDoublingHighMul(acc 2^left, M)`` (``Div`` truncates toward zero, as
    C++ does) then ``RoundingDivideByPOT(., right)`` — qbook's :func:`qbook.requantize`, bit for bit."""
    shift = module.output_shift.reshape(shape)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    mask = torch.ones_like(right).bitwise_left_shift(right) - 1  # 2^right - 1

    def c(value: Any, hint: str) -> str:
        return g.const(torch.as_tensor(value, dtype=torch.int64), hint)

    x = g.op(
        "Mul", g.op("Cast", acc, to=_INT64), c(torch.ones_like(left).bitwise_left_shift(left), "two_left")
    )
    ab = g.op("Mul", x, c(module.output_multiplier.reshape(shape), "multiplier"))  # |ab| < 2^62
    nudge = g.op("Where", g.op("GreaterOrEqual", ab, c(0, "zero")), c(2**30, "nudge"), c(1 - 2**30, "nudge"))
    high = g.op("Div", g.op("Add", ab, nudge), c(2**31, "two_31"))  # SaturatingRoundingDoublingHighMul
    remainder = g.op("BitwiseAnd", high, c(mask, "mask"))  # high mod 2^right
    quotient = g.op("Div", g.op("Sub", high, remainder), c(mask + 1, "two_right"))  # floor(high / 2^right)
    threshold = g.op(
        "Add", c(mask >> 1, "half_mask"), g.op("Cast", g.op("Less", high, c(0, "zero")), to=_INT64)
    )
    y = g.op("Add", quotient, g.op("Cast", g.op("Greater", remainder, threshold), to=_INT64))  # RDBPOT
    y = g.op("Add", y, c(int(module.output_zero_point), "output_zp"))
    y = g.op("Clip", y, c(-128, "qmin"), c(127, "qmax"))
    return g.op("Cast", y, to=_INT8)


def _static_linear(g: _Graph, q: str, module: QuantLinear) -> str:
    """(7.1): ``MatMulInteger`` (int32 ``sum_k (q_x - z_x) q_w``) on the codes ``q``, then the epilogue."""
    weight_t = module.weight.t().contiguous()  # (K, N) int8
    zp = g.const(torch.tensor(int(module.input_zero_point), dtype=module.act_spec.dtype), "zp")  # z_x
    acc = g.op("MatMulInteger", q, g.const(weight_t, "weight_t"), zp)  # (..., N) int32
    return _static_epilogue(g, acc, module, (-1,))


def _static_conv(g: _Graph, q: str, module: QuantConv2d) -> str:
    """(7.1) for a convolution: ``ConvInteger`` subtracts the input zero point and pads with it (the code of
    0.0), exactly qbook's im2col + integer matmul."""
    ph, pw = module.padding
    zp = g.const(torch.tensor(int(module.input_zero_point), dtype=module.act_spec.dtype), "zp")
    acc = g.op(
        "ConvInteger",
        q,
        g.const(module.weight, "weight"),  # (O, C, kh, kw) int8
        zp,
        kernel_shape=list(module.kernel_size),
        strides=list(module.stride),
        pads=[ph, pw, ph, pw],
        dilations=list(module.dilation),
    )  # (B, O, Ho, Wo) int32
    return _static_epilogue(g, acc, module, (-1, 1, 1))


def _qdq_static(g: _Graph, q: str, module: QuantLinear | QuantConv2d) -> str:
    """The QDQ form of (7.1): the float operator between ``DequantizeLinear`` nodes,
    ``y = (s_x (q_x - z_x)) * (s_w q_w) + s_x s_w b_q``. It is (7.1) in exact arithmetic; in float32 the sums
    round in another order, so outputs agree with qbook's to float rounding, not bit for bit."""
    zp = g.const(torch.tensor(int(module.input_zero_point), dtype=module.act_spec.dtype), "zp")
    x_hat = g.op("DequantizeLinear", q, g.const(module.input_scale.reshape(()), "scale"), zp)  # (3.2)
    bias = None
    if module.bias is not None:  # int32 codes on the accumulator's grid s_x s_w, one scale per channel
        acc_scale = g.const(module.acc_scale, "acc_scale")
        bias = g.op("DequantizeLinear", g.const(module.bias, "bias_q"), acc_scale, axis=0)
    w_scale = g.const(module.weight_scale, "weight_scale")
    if isinstance(module, QuantConv2d):  # (O, C, kh, kw), one scale per output channel: axis 0
        w = g.op("DequantizeLinear", g.const(module.weight, "weight"), w_scale, axis=0)
        return _conv(g, x_hat, w, bias, module)
    weight_t = module.weight.t().contiguous()  # (K, N) int8, one scale per column: axis 1
    w_t = g.op("DequantizeLinear", g.const(weight_t, "weight_t"), w_scale, axis=1)
    y = g.op("MatMul", x_hat, w_t)
    return y if bias is None else g.op("Add", y, bias)


def _per_token(g: _Graph, rows: str, spec: QuantSpec) -> tuple[str, str]:
    """(7.2)'s run-time step on the last axis: ``s = max(max_k |x_k| / ((qmax - qmin) / 2), eps)``,
    ``q = int8(round(x / s))`` (clamped to ``[qmin, qmax]`` unless the grid is narrow, as in qbook)."""
    amax = g.op("ReduceMax", g.op("Abs", rows), g.const(_ints([-1]), "axes"), keepdims=1)  # (..., 1)
    half_range = np.float32((spec.qmax - spec.qmin) / 2)
    scale = g.op("Div", amax, g.const(half_range, "half_range"))
    scale = g.op("Max", scale, g.const(np.float32(np.finfo(np.float32).eps), "eps"))  # (..., 1)
    codes = g.op("Round", g.op("Div", rows, scale))  # true division, round half to even
    if spec.qmin != -spec.qmax:
        codes = g.op(
            "Clip", codes, g.const(np.float32(spec.qmin), "qmin"), g.const(np.float32(spec.qmax), "qmax")
        )
    return g.op("Cast", codes, to=_INT8), scale  # exact: integral values of the grid


def _dynamic_matmul(g: _Graph, rows: str, module: QuantLinear | QuantConv2d) -> str:
    """(7.2): ``y = ((float32(acc) * s_x) * s_w) + b`` with ``acc = MatMulInteger(q_x, q_w^T)`` — the order of
    qbook's epilogue."""
    q, a_scale = _per_token(g, rows, module.act_spec)
    weight_t = module.weight.reshape(module.out_features, -1).t().contiguous()  # (K, N) int8
    acc = g.op("MatMulInteger", q, g.const(weight_t, "weight_t"))  # (..., N) int32
    y = g.op("Mul", g.op("Cast", acc, to=_FLOAT), a_scale)
    y = g.op("Mul", y, g.const(module.weight_scale, "weight_scale"))
    return y if module.bias is None else g.op("Add", y, g.const(module.bias, "bias"))


def _im2col_indices(h: int, w: int, module: QuantConv2d) -> np.ndarray:
    """For the padded image flattened to ``Hp * Wp`` pixels: the pixel index of kernel tap ``(i, j)`` at
    output position ``(oh, ow)``, shape ``(L, kh * kw)`` — what ``F.unfold`` gathers."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    pw = module.padding[1]
    ho, wo = module._out_size(h, w)
    oh, ow = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")  # (Ho, Wo)
    i, j = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")  # (kh, kw)
    rows = oh.reshape(-1, 1) * sh + i.reshape(1, -1) * dh  # (L, kh * kw)
    cols = ow.reshape(-1, 1) * sw + j.reshape(1, -1) * dw
    return rows * (w + 2 * pw) + cols


def _dynamic_conv(g: _Graph, x: _Value, module: QuantConv2d, out_shape: tuple[int, ...]) -> str:
    """(7.2) for a convolution, one scale per output position: im2col as a ``Gather`` of the padded image,
    then :func:`_dynamic_matmul` on the rows ``(B, L, C kh kw)``."""
    _, c, h, w = x.shape
    ph, pw = module.padding
    index = _im2col_indices(h, w, module)  # (L, kh * kw)
    padded = g.op("Pad", x.name, g.const(_ints([0, 0, ph, pw, 0, 0, ph, pw]), "pads"))
    flat = g.op("Reshape", padded, g.const(_ints([-1, c, (h + 2 * ph) * (w + 2 * pw)]), "shape"))
    cols = g.op("Gather", flat, g.const(index, "im2col"), axis=2)  # (B, C, L, kh * kw)
    cols = g.op("Transpose", cols, perm=[0, 2, 1, 3])  # (B, L, C, kh * kw)
    rows = g.op("Reshape", cols, g.const(_ints([0, index.shape[0], -1]), "shape"))  # (B, L, K)
    y = _dynamic_matmul(g, rows, module)  # (B, L, O)
    y = g.op("Transpose", y, perm=[0, 2, 1])  # (B, O, L)
    return g.op("Reshape", y, g.const(_ints([-1, *out_shape[1:]]), "shape"))  # (B, O, Ho, Wo)


def _dequantized_weight(g: _Graph, module: WeightOnlyLinear | WeightOnlyConv2d) -> str:
    """``s_w (q_w - z_w)`` (3.2) as one ``DequantizeLinear`` with block quantization (opset 21): codes
    ``(N, Kp)`` (int4 stays int4), scales ``(N, Kp / g)``; a ``Slice`` drops the zero codes that pad ``K``."""
    spec, k, kp = module.spec, module.in_features, module.padded_features
    codes = _padded_codes(module)  # (N, Kp)
    if module.bits == 4:
        onnx_type = _INT4 if spec.signed else _UINT4
        dtype = np.dtype(np.int8 if spec.signed else np.uint8)
    else:
        dtype = _storage(spec, type(module).__name__)[0]
        onnx_type = _NP_TO_ONNX[dtype]
    inputs = [
        g.const(codes.numpy().astype(dtype), "weight", onnx_type),
        g.const(module.weight_scale, "scale"),
    ]
    if module.weight_zero_point is not None:
        inputs.append(g.const(module.weight_zero_point.numpy().astype(dtype), "zp", onnx_type))
    w = g.op("DequantizeLinear", *inputs, axis=1, block_size=kp // module.weight_scale.shape[1])  # (N, Kp)
    if kp != k:
        w = g.op(
            "Slice",
            w,
            g.const(_ints([0]), "starts"),
            g.const(_ints([k]), "ends"),
            g.const(_ints([1]), "axes"),
        )
    return w  # (N, K) float32


def _padded_codes(module: WeightOnlyLinear | WeightOnlyConv2d) -> torch.Tensor:
    """The stored codes, unpacked, with the padding of ``K`` to whole groups: ``(N, Kp)``."""
    from qbook.packing import unpack

    if module.bits == 8:
        return module.weight
    return unpack(module.weight, module.bits, module.padded_features, signed=module.spec.signed)


# --------------------------------------------------------------------------------------------------------
# Float operations
# --------------------------------------------------------------------------------------------------------


def _bias(g: _Graph, bias: torch.Tensor | str) -> str:
    return bias if isinstance(bias, str) else g.const(bias.detach().float(), "bias")


def _linear(g: _Graph, x: str, weight_t: str, bias: torch.Tensor | str | None) -> str:
    y = g.op("MatMul", x, weight_t)
    return y if bias is None else g.op("Add", y, _bias(g, bias))


def _conv(g: _Graph, x: str, weight: str, bias: torch.Tensor | str | None, geometry: Any) -> str:
    (ph, pw), inputs = geometry.padding, [x, weight]
    if bias is not None:
        inputs.append(_bias(g, bias))
    return g.op(
        "Conv",
        *inputs,
        kernel_shape=list(geometry.kernel_size),
        strides=list(geometry.stride),
        pads=[ph, pw, ph, pw],
        dilations=list(geometry.dilation),
    )


def _max_pool(
    g: _Graph,
    x: str,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> str:
    from qbook.nn import _pair

    if return_indices:
        raise ValueError("max_pool2d(return_indices=True) is not exported: ONNX returns other indices")
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None or stride == [] else _pair(stride, "stride")
    p, d = _pair(padding, "padding"), _pair(dilation, "dilation")
    return g.op(
        "MaxPool",
        x,
        kernel_shape=list(k),
        strides=list(s),
        pads=[p[0], p[1], p[0], p[1]],
        dilations=list(d),
        ceil_mode=int(bool(ceil_mode)),
    )


def _avg_pool(
    g: _Graph,
    x: str,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Any = None,
) -> str:
    from qbook.nn import _pair

    if divisor_override is not None:
        raise UnsupportedModelError("avg_pool2d(divisor_override=...) has no ONNX equivalent")
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None or stride == [] else _pair(stride, "stride")
    p = _pair(padding, "padding")
    return g.op(
        "AveragePool",
        x,
        kernel_shape=list(k),
        strides=list(s),
        pads=[p[0], p[1], p[0], p[1]],
        ceil_mode=int(bool(ceil_mode)),
        count_include_pad=int(bool(count_include_pad)),
    )


# --------------------------------------------------------------------------------------------------------
# Tracing and dispatch
# --------------------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """qbook's quantization modules are leaves: they are exported whole or refused whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__ in _QBOOK_LEAVES or super().is_leaf_module(m, qualname)


#: Where qbook's quantization modules live (qbook.models' networks are traced through, like any model).
_QBOOK_LEAVES = ("qbook.nn", "qbook.ptq", "qbook.qat", "qbook.outliers", "qbook.observers")


def _module_handler(g: _Graph, module: nn.Module, x: _Value, out: _Value, who: str) -> str:
    if isinstance(module, (QuantLinear, QuantConv2d)):
        conv = isinstance(module, QuantConv2d)
        if module.activation == "static":
            _storage(module.act_spec, who)  # codes that int8/uint8 hold
            if x.dtype == torch.float32:  # (3.1)
                s_x, z_x = float(module.input_scale), int(module.input_zero_point)
                q = _quantize_linear(g, x.name, s_x, z_x, module.act_spec, who)
            elif x.dtype == module.act_spec.dtype:  # codes on the input grid, e.g. an int8 output before
                q = x.name
            else:
                raise TypeError(f"{who} takes float32 inputs or {module.act_spec.dtype} codes, got {x.dtype}")
            if g.quant_format == "qdq":
                if module.output != "float":
                    raise UnsupportedModelError(
                        f"{who} has output='int8': its fixed-point requantization (9.5) has no QDQ form that "
                        "rounds like qbook; export it with quant_format='integer'"
                    )
                return _qdq_static(g, q, module)
            return _static_conv(g, q, module) if conv else _static_linear(g, q, module)
        if x.dtype != torch.float32:
            raise TypeError(f"{who} (dynamic) takes float32 inputs, got {x.dtype}")
        if not module.act_spec.signed:
            raise ValueError(
                f"{who}: dynamic activations on an unsigned grid ({module.act_spec}) are not exported"
            )
        return _dynamic_conv(g, x, module, out.shape) if conv else _dynamic_matmul(g, x.name, module)
    if isinstance(module, WeightOnlyConv2d):
        w = _dequantized_weight(g, module)
        w = g.op(
            "Reshape",
            w,
            g.const(_ints([module.out_channels, module.in_channels, *module.kernel_size]), "shape"),
        )
        return _conv(g, x.name, w, module.bias, module)
    if isinstance(module, WeightOnlyLinear):
        w_t = g.op("Transpose", _dequantized_weight(g, module), perm=[1, 0])  # (K, N)
        return _linear(g, x.name, w_t, module.bias)
    if type(module) is nn.Linear:
        return _linear(
            g, x.name, g.const(module.weight.detach().float().t().contiguous(), "weight_t"), module.bias
        )
    if type(module) is nn.Conv2d:
        _check_conv(module, who)
        return _conv(
            g, x.name, g.const(module.weight.detach().float(), "weight"), module.bias, _Geometry.of(module)
        )
    if type(module) in (nn.BatchNorm2d, nn.Dropout) and module.training:
        raise ValueError(f"{who} ({type(module).__name__}) is in training mode; call model.eval() first")
    if type(module) is nn.BatchNorm2d:
        if module.running_mean is None:
            raise ValueError(f"{who}: BatchNorm2d without running statistics is not exported")
        weight = module.weight if module.affine else torch.ones_like(module.running_mean)
        bias = module.bias if module.affine else torch.zeros_like(module.running_mean)
        tensors = (weight, bias, module.running_mean, module.running_var)
        names = [
            g.const(t.detach().float(), n)
            for t, n in zip(tensors, ("gamma", "beta", "mean", "var"), strict=True)
        ]
        return g.op("BatchNormalization", x.name, *names, epsilon=float(module.eps))
    if type(module) is nn.AvgPool2d:
        if module.divisor_override is not None:
            raise UnsupportedModelError(f"{who}: AvgPool2d(divisor_override=...) has no ONNX equivalent")
        return _avg_pool(
            g,
            x.name,
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
        )
    if type(module) is nn.AdaptiveAvgPool2d:
        if module.output_size not in (1, (1, 1), [1, 1]):
            raise UnsupportedModelError(f"{who}: AdaptiveAvgPool2d is exported for output size 1 only")
        return g.op("GlobalAveragePool", x.name)
    if type(module) is nn.LeakyReLU:
        return g.op("LeakyRelu", x.name, alpha=float(module.negative_slope))
    if type(module) is nn.ReLU6:
        return g.op("Clip", x.name, g.const(np.float32(0), "min"), g.const(np.float32(6), "max"))
    if type(module) is nn.MaxPool2d:
        return _max_pool(
            g,
            x.name,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.ceil_mode,
            module.return_indices,
        )
    if type(module) in (nn.Flatten, nn.Unflatten):
        return _reshape(g, x, out.shape)
    if type(module) in (nn.Identity, nn.Dropout):
        return x.name
    if type(module) in _ACTIVATIONS:
        return g.op(_ACTIVATIONS[type(module)], x.name)
    hint = ""
    if type(module).__module__.startswith("qbook."):
        hint = (
            " (a prepared, QAT or simulated layer: convert the model to qbook.nn's integer modules first, "
            "with qbook.ptq.convert, qbook.qat.convert or FakeQuantLinear.to_integer)"
        )
    raise UnsupportedModelError(
        f"{who}: {type(module).__module__}.{type(module).__name__} is not supported by qbook.export{hint}; "
        f"supported modules: {', '.join(sorted(SUPPORTED['modules']))}"
    )


@dataclass(frozen=True)
class _Geometry:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> _Geometry:
        return cls(*(tuple(getattr(conv, a)) for a in ("kernel_size", "stride", "padding", "dilation")))


def _check_conv(conv: nn.Conv2d, who: str) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModelError(
            f"{who}: only Conv2d with groups=1, numeric zero padding is exported, got groups={conv.groups}, "
            f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )


_ACTIVATIONS: dict[Any, str] = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh"}

_UNARY: dict[Any, str] = {
    target: op
    for op, name in (("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"))
    for target in (getattr(torch, name), getattr(F, name), name)
}
_BINARY: dict[Any, str] = {
    target: op
    for op, name, python in (
        ("Add", "add", "add"),
        ("Sub", "sub", "sub"),
        ("Mul", "mul", "mul"),
        ("Div", "div", "truediv"),
    )
    for target in (getattr(operator, python), getattr(torch, name), name)
}
_RESHAPES = (torch.flatten, torch.reshape, "flatten", "reshape", "view")


def _name_of(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


#: What :func:`to_onnx` exports: module classes and functions/methods by name.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "modules": (
        *(
            f"qbook.nn.{name}"
            for name in ("QuantLinear", "QuantConv2d", "WeightOnlyLinear", "WeightOnlyConv2d")
        ),
        *(
            f"nn.{name}"
            for name in "Linear Conv2d BatchNorm2d MaxPool2d AvgPool2d AdaptiveAvgPool2d Flatten Unflatten "
            "Identity Dropout".split()
        ),
        *(f"nn.{name}" for name in "ReLU ReLU6 LeakyReLU Sigmoid Tanh".split()),
    ),
    "functions": tuple(
        "relu sigmoid tanh add sub mul div max_pool2d avg_pool2d adaptive_avg_pool2d(x, 1) flatten reshape "
        "view".split()
    ),
}


def _function_handler(g: _Graph, node: fx.Node, args: list[Any], kwargs: dict[str, Any], out: _Value) -> str:
    key, who = node.target, f"{node.op} {_name_of(node.target)!r} (node {node.name})"
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}  # F.relu(x, inplace=...): same value
    if key in _UNARY and len(args) == 1 and not kwargs:
        return g.op(_UNARY[key], _operand(g, args[0], who))
    if key in _BINARY and len(args) == 2 and not kwargs:
        a, b = (_operand(g, v, who) for v in args)
        return g.op(_BINARY[key], a, b)
    if key in _RESHAPES and out.dtype == _tensor(args[0], who).dtype:  # not x.view(dtype)
        return _reshape(g, args[0], out.shape)
    pools = {F.max_pool2d: _max_pool, torch.max_pool2d: _max_pool, F.avg_pool2d: _avg_pool}
    if key in pools:
        pool = pools[key]
        params = inspect.signature(pool).bind(g, _tensor(args[0], who).name, *args[1:], **kwargs).arguments
        return pool(**params)
    if key is F.adaptive_avg_pool2d and len(args) == 2 and args[1] in (1, (1, 1), [1, 1]) and not kwargs:
        return g.op("GlobalAveragePool", _tensor(args[0], who).name)
    raise UnsupportedModelError(
        f"{who} is not supported by qbook.export (or not with these arguments: {len(args)} positional, "
        f"keywords {sorted(kwargs)}); supported functions and methods: {', '.join(SUPPORTED['functions'])}"
    )


_SHAPE = _Value("<shape>", (), torch.int64)  # stands for x.shape / x.size() (and an element of it)


def _is_shape(node: fx.Node, values: dict[str, _Value]) -> bool:
    """``x.shape``, ``x.size()`` and Python arithmetic on them (``x.shape[0] * 2``): no tensor comes out."""
    if "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    if node.op == "call_method" and node.target == "size":
        return True
    return node.op == "call_function" and any(
        isinstance(a, fx.Node) and values.get(a.name) is _SHAPE for a in node.args
    )


def _tensor(value: Any, who: str) -> _Value:
    if not isinstance(value, _Value) or value is _SHAPE:
        raise UnsupportedModelError(f"{who}: expected a tensor argument, got {value!r}")
    return value


def _operand(g: _Graph, value: Any, who: str) -> str:
    if value is _SHAPE:
        raise UnsupportedModelError(
            f"{who}: arithmetic with x.shape / x.size() is exported only inside reshapes"
        )
    if isinstance(value, _Value):
        if value.dtype != torch.float32:
            raise TypeError(f"{who}: exported arithmetic is float32, got a {value.dtype} tensor")
        return value.name
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return g.const(np.float32(value), "scalar")
    raise UnsupportedModelError(f"{who}: operands must be tensors or numbers, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def to_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike | None = None,
    *,
    opset: int = OPSET,
    check: bool = True,
    dynamic_batch: bool = True,
    quant_format: QuantFormat = "integer",
) -> Any:
    """Export ``model`` (float32 input ``(B, ...)``, one output) as an ``onnx.ModelProto`` — chapter 8.

    The model is traced with ``torch.fx`` on ``example_input`` (qbook's modules are leaves); each operation
    becomes the nodes of the module docstring's table. ``path`` (optional) is where the model is saved;
    ``opset`` ≥ 21; ``check`` runs ``onnx.checker.check_model`` (with full shape inference);
    ``dynamic_batch`` names the first dimension ``"batch"`` so any batch size runs (shapes other than the
    batch are fixed by ``example_input``). Dropout and batch norm are exported as in eval mode, and refused
    while they are in training mode. An operation outside :data:`SUPPORTED` raises
    :class:`UnsupportedModelError` naming it.

    ``quant_format="integer"`` (default) writes static layers with integer operators, bit-exact to qbook;
    ``"qdq"`` writes them as ``QuantizeLinear → DequantizeLinear → float MatMul/Conv`` with dequantized
    weights and bias (:func:`_qdq_static`), the interchange form other toolchains consume, equal to qbook's
    outputs up to float rounding. Dynamic and weight-only layers are the same in both.

    A dynamic layer (7.2) ``y = s_x[m] s_w[n] acc_mn + b[n]``: the per-token scale and codes, the integer
    matmul, then the epilogue in qbook's order:

    >>> import torch
    >>> from qbook.nn import QuantLinear
    >>> proto = to_onnx(QuantLinear.from_float(torch.nn.Linear(3, 2)), torch.ones(1, 3))
    >>> [node.op_type for node in proto.graph.node]
    ['Abs', 'ReduceMax', 'Div', 'Max', 'Div', 'Round', 'Cast', 'MatMulInteger', 'Cast', 'Mul', 'Mul', 'Add']
    """
    onnx = _onnx()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32:
        raise TypeError(f"example_input must be a float32 tensor, got {_describe(example_input)}")
    if example_input.ndim == 0:
        raise ValueError("example_input must have a batch dimension, got a 0-d tensor")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, an os.PathLike or None, got {path!r}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 21 <= opset <= newest:
        raise ValueError(
            f"opset must be an int in 21..{newest} (21: block-wise DequantizeLinear, int4; {newest}: the "
            f"newest this onnx knows), got {opset!r}"
        )
    if quant_format not in ("integer", "qdq"):
        raise ValueError(f"quant_format must be 'integer' or 'qdq', got {quant_format!r}")
    for name, flag in (("check", check), ("dynamic_batch", dynamic_batch)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    proto = _export(model, example_input, opset, dynamic_batch, quant_format)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


def _export(
    model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool, quant_format: str
) -> Any:
    onnx = _onnx()
    helper = onnx.helper
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):  # fx traces into the root: wrap a lone layer so that it is a leaf
        model = nn.Sequential(OrderedDict(model=model))
    try:
        graph_module = fx.GraphModule(model, tracer.trace(model))
    except Exception as e:  # fx cannot trace data-dependent Python control flow
        raise UnsupportedModelError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    try:
        with torch.no_grad():
            _ShapeProp(graph_module).run(example)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, OverflowError) as e:
        raise type(e)(f"the model fails on example_input: {e}") from e  # its own error; nothing printed
    g = _Graph(dynamic_batch, quant_format)
    values: dict[str, _Value] = {}
    inputs, outputs = [], []
    modules = dict(graph_module.named_modules())

    def value_of(node: fx.Node) -> _Value:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedModelError(
                f"node {node.name} ({_name_of(node.target)}) does not produce one tensor; qbook.export takes "
                "models whose operations map tensors to tensors (x.shape / x.size() only inside reshapes)"
            )
        return _Value(node.name, tuple(meta.shape), meta.dtype)

    def dims(shape: tuple[int, ...]) -> list[Any]:
        return ["batch", *shape[1:]] if dynamic_batch else list(shape)

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if inputs:
                raise UnsupportedModelError("qbook.export takes models with one tensor input")
            v = value_of(node)
            values[node.name] = _Value("input", v.shape, v.dtype)
            inputs.append(helper.make_tensor_value_info("input", _FLOAT, dims(v.shape)))
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise UnsupportedModelError("qbook.export takes models with one tensor output")
            v = values[result.name]
            types = {torch.float32: _FLOAT, torch.int8: _INT8, torch.uint8: _UINT8}
            if v.dtype not in types:
                raise UnsupportedModelError(
                    f"the model's output must be float32 (or int8 codes), got {v.dtype}"
                )
            if any(v.name in n.output for n in g.nodes):  # name the last node's result "output"
                for n in g.nodes:
                    n.input[:] = ["output" if i == v.name else i for i in n.input]
                    n.output[:] = ["output" if o == v.name else o for o in n.output]
            else:  # the input itself (an empty model)
                g.nodes.append(helper.make_node("Identity", [v.name], ["output"], name="output"))
            outputs.append(helper.make_tensor_value_info("output", types[v.dtype], dims(v.shape)))
            continue
        if node.op == "get_attr":
            raise UnsupportedModelError(
                f"node {node.name} reads the tensor attribute {node.target!r} directly; qbook.export takes "
                "parameters inside modules only"
            )
        if _is_shape(node, values):  # x.shape, x.size(), x.shape[0]: reshapes take the traced shape instead
            values[node.name] = _SHAPE
            continue
        out = value_of(node)
        args = [values[a.name] if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: values[a.name] if isinstance(a, fx.Node) else a for k, a in node.kwargs.items()}
        if any(isinstance(a, (list, tuple)) and any(isinstance(b, fx.Node) for b in a) for a in node.args):
            raise UnsupportedModelError(f"node {node.name}: lists of tensors are not exported")
        g.scope = node.name
        if node.op == "call_module":
            who = f"module {node.target!r}"
            if len(args) != 1 or kwargs:
                raise UnsupportedModelError(f"{who} is called with more than one tensor")
            name = _module_handler(g, modules[node.target], _tensor(args[0], who), out, who)
        else:
            name = _function_handler(g, node, args, kwargs, out)
        values[node.name] = _Value(name, out.shape, out.dtype)
    graph = helper.make_graph(g.nodes, type(model).__name__, inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qbook.export"
    )
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime
    return proto


class _ShapeProp(fx.Interpreter):
    """Runs the traced graph on the example and records each tensor's shape and dtype in
    ``node.meta["tensor_meta"]``, as ``torch.fx.passes.shape_prop.ShapeProp`` does — without its printed
    traceback and its wrapper exception when the model fails: the model's own error propagates unchanged."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.extra_traceback = False  # do not append "While executing ..." to the model's error

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def _describe(x: Any) -> str:
    """``a torch.float64 tensor of shape (2, 4)`` or the type's name: never the values."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def session_options() -> Any:
    """The onnxruntime ``SessionOptions`` :func:`run` uses: graph optimizations disabled (so no fusion
    changes the order of the float epilogue), one thread (sums in a fixed order).

    >>> session_options().graph_optimization_level
    <GraphOptimizationLevel.ORT_DISABLE_ALL: 0>
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return options


_ACTIVATION_QUANTIZERS = frozenset({"QuantizeLinear", "MatMulInteger", "ConvInteger"})


def _check_run_input(model: Any, x: Any, runtime: str) -> None:
    """:func:`run`'s checks of ``x`` against the graph: dtype, shape, and the values qbook would refuse."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(
            f"x must be a float32 tensor, got {_describe(x)} (cast with x.float(); run does not cast: see "
            "its docstring)"
        )
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    expected = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    fits = len(expected) == x.ndim and all(
        not isinstance(e, int) or e == n for e, n in zip(expected, x.shape, strict=True)
    )
    if not fits:
        shown = "(" + ", ".join(str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"x must have the graph input's shape {shown}, got {tuple(x.shape)}")
    if not any(node.op_type in _ACTIVATION_QUANTIZERS for node in graph.node):
        return  # float and weight-only operators: NaN and inf propagate, as in torch
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = torch.isnan(x)
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise ValueError(
            f"x contains {int(nan.sum())} NaN value(s), the first at index {first}; NaN has no integer code "
            "(qbook's quantized layers refuse it too)"
        )
    readers = [node.op_type for node in graph.node if graph.input[0].name in node.input]
    static_first = bool(readers) and all(op == "QuantizeLinear" for op in readers)
    if static_first and runtime == "onnxruntime":
        return  # a static first layer: ±inf saturate to qmin / qmax, in qbook and in onnxruntime
    first = tuple(int(i) for i in (~finite).nonzero()[0])
    reason = (
        "the reference evaluator's QuantizeLinear has no defined result for inf (onnxruntime saturates it)"
        if static_first
        else "only a static first layer saturates ±inf; here it reaches a dynamic layer's scale or a float "
        "layer before the first quantizer, where qbook refuses it or the codes are undefined"
    )
    raise ValueError(
        f"x contains {int((~finite).sum())} infinite value(s), the first at index {first}: {reason}"
    )


def run(model: Any, x: torch.Tensor, *, runtime: Runtime = "onnxruntime") -> torch.Tensor:
    """Run an exported model (a ``ModelProto`` or a path) on ``x`` and return the output as a torch tensor.

    ``runtime="onnxruntime"``: an ``InferenceSession`` on the ``CPUExecutionProvider`` with
    :func:`session_options`; ``"reference"``: ``onnx.reference.ReferenceEvaluator`` (ONNX's executable
    specification in numpy: slow, independent of onnxruntime).

    >>> import torch
    >>> proto = to_onnx(torch.nn.ReLU(), torch.zeros(1, 2))
    >>> run(proto, torch.tensor([[-1.0, 2.0]]), runtime="reference")
    tensor([[0., 2.]])

    ``x`` must be a float32 tensor of the graph's input shape (any batch size where the export had
    ``dynamic_batch=True``); other dtypes are refused rather than cast: qbook's quantized layers cast their
    input to float32, but its float and weight-only layers compute in the input's dtype, so a cast here would
    not reproduce every model — cast with ``x.float()`` where that is what you mean. Where the graph quantizes
    activations (``QuantizeLinear`` or an integer matmul), NaN is refused as qbook refuses it ("NaN has no
    integer code"), and so is ±inf — except into onnxruntime when every reader of the input is a
    ``QuantizeLinear`` (a static first layer), where (3.1) saturates ±inf to ``qmin``/``qmax`` in qbook and in
    onnxruntime alike. (A dynamic layer's scale would be inf: qbook raises, ONNX returns NaN; the reference
    evaluator's ``QuantizeLinear`` casts inf to an integer with no defined result.) A graph of float and
    weight-only operators takes any values, as torch does.
    """
    onnx = _onnx()
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no ONNX model at {os.fspath(model)!r}")
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")
    if runtime not in ("onnxruntime", "reference"):
        raise ValueError(f"runtime must be 'onnxruntime' or 'reference', got {runtime!r}")
    _check_run_input(model, x, runtime)
    feeds = {model.graph.input[0].name: x.detach().cpu().contiguous().numpy()}
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(
            model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, feeds)
    elif runtime == "reference":
        from onnx.reference import ReferenceEvaluator

        (y,) = ReferenceEvaluator(model).run(None, feeds)
    return torch.from_numpy(np.asarray(y))
