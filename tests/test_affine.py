"""Tests for qbook.affine (chapter 3) against independent references.

* ONNX's reference ``QuantizeLinear`` (the published definition, run by ``onnx.reference``): bit for bit;
* torch.ao's ``MinMaxObserver``/``PerChannelMinMaxObserver``: the quantization parameters, exactly;
* ``torch.quantize_per_tensor`` and ``torch.fake_quantize_per_*_affine``: exactly, except at .5 ties, which
  torch rounds differently: it multiplies by the reciprocal of the scale (so a near-tie can land on the other
  side) and ``quantize_per_tensor`` adds the zero point before rounding (so with an odd zero point an exact
  tie goes to the other neighbour). The tests check that these one-step tie differences are the only ones;
* hypothesis properties of the round trip; a loop over groups for per-group quantization.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbook
from qbook.affine import (
    INT4,
    INT8,
    INT8_SYMMETRIC,
    UINT8,
    QTensor,
    QuantSpec,
    calc_qparams,
    dequantize,
    dtype_for_range,
    fake_quantize,
    quantize,
)
from qbook.granularity import PerChannel, PerGroup, PerTensor

EPS32 = torch.finfo(torch.float32).eps
TORCH_QTENSOR_DEPRECATION = "ignore:.*quantized tensor creation functions.*:UserWarning"


def spec_cases() -> list[QuantSpec]:
    return [
        QuantSpec(bits, signed, narrow)
        for bits in range(2, 17)
        for signed in (True, False)
        for narrow in (False, True)
    ]


def tie_heavy(scale: float, n: int, seed: int = 0) -> torch.Tensor:
    """``(k + 0.5) * scale`` for random integers k: many exact (or nearly exact) .5 ties of x / scale."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-140, 140, (n,), generator=g).to(torch.float32)
    return (k + 0.5) * scale  # (n,) float32


def near_tie(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Where the exact quotient ``x / scale`` lies within a few float32 roundings of a .5 tie."""
    exact = x.double() / torch.as_tensor(scale).double()  # float64: exact enough
    return ((exact - exact.floor()) - 0.5).abs() <= 4 * EPS32 * exact.abs().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# ONNX QuantizeLinear: the published definition, bit for bit
# ---------------------------------------------------------------------------------------------------------


def onnx_quantize_linear(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, **attrs: int
) -> np.ndarray:
    """One-node ONNX model (opset 21) ``QuantizeLinear(x, scale, zero_point)`` run by onnx.reference."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    zp_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "quantize_linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, scale.shape),
            helper.make_tensor_value_info("zero_point", zp_type, zero_point.shape),
        ],
        [helper.make_tensor_value_info("y", zp_type, x.shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, {"x": x, "scale": scale, "zero_point": zero_point})[0]


ONNX_GRIDS = [
    (torch.int8, np.int8, -128, 127),
    (torch.uint8, np.uint8, 0, 255),
    (torch.int16, np.int16, -32768, 32767),
]


def onnx_inputs(qmin: int, qmax: int, seed: int) -> tuple[torch.Tensor, float]:
    """Random data spanning past the grid, plus exact ties (power-of-two scale) and float32 near-ties."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0**-4
    half = (qmax - qmin) / 2 * scale
    random = (torch.rand(500, generator=g) * 2.4 - 1.2) * half
    return torch.cat([random, tie_heavy(scale, 200, seed), tie_heavy(0.0371, 200, seed)]), scale


@pytest.mark.parametrize(("dtype", "np_dtype", "qmin", "qmax"), ONNX_GRIDS)
def test_quantize_equals_onnx_per_tensor(dtype, np_dtype, qmin, qmax):
    x, _ = onnx_inputs(qmin, qmax, seed=1)
    for scale in (2.0**-4, 0.0371, 0.37):
        zero_point = (qmin + qmax + 1) // 2 - 7
        ours = quantize(x, scale, zero_point, qmin, qmax)
        ref = onnx_quantize_linear(x.numpy(), np.array(scale, np.float32), np.array(zero_point, np_dtype))
        assert ours.dtype == dtype
        assert torch.equal(ours, torch.from_numpy(ref))


def test_onnx_ties_round_half_to_even():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]) * 2.0**-3
    ref = onnx_quantize_linear(x.numpy(), np.array(2.0**-3, np.float32), np.array(0, np.int8))
    ours = quantize(x, 2.0**-3, 0, -128, 127)
    assert ours.tolist() == ref.tolist() == [-2, -2, 0, 0, 2, 2]


@pytest.mark.parametrize(("dtype", "np_dtype", "qmin", "qmax"), ONNX_GRIDS[:2])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_equals_onnx_per_axis(dtype, np_dtype, qmin, qmax, axis):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=g) * 3  # (C0, C1)
    x[0, :4] = tie_heavy(0.05, 4)
    channels = x.shape[axis]
    scale = (torch.rand(channels, generator=g) * 0.05 + 0.01).to(torch.float32)  # (C,)
    scale[0] = 0.05
    zero_point = torch.randint(qmin, qmax + 1, (channels,), generator=g)  # (C,)
    shape = PerChannel(axis).param_shape(x.shape)
    ours = quantize(x, scale.reshape(shape), zero_point.reshape(shape), qmin, qmax)
    ref = onnx_quantize_linear(x.numpy(), scale.numpy(), zero_point.numpy().astype(np_dtype), axis=axis)
    assert torch.equal(ours, torch.from_numpy(ref))
    via_granularity = quantize(
        x, scale.reshape(shape), zero_point.reshape(shape), qmin, qmax, granularity=PerChannel(axis)
    )
    assert torch.equal(via_granularity, ours)


def test_per_group_equals_onnx_blocked():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 12, generator=g)  # (N, K)
    granularity = PerGroup(axis=1, group_size=4)
    xmin, xmax = qbook.granularity.minmax(x, granularity)  # (N, K // 4)
    scale, zero_point = calc_qparams(xmin, xmax, -128, 127)
    ours = quantize(x, scale, zero_point, -128, 127, granularity=granularity)
    ref = onnx_quantize_linear(
        x.numpy(), scale.numpy(), zero_point.numpy().astype(np.int8), axis=1, block_size=4
    )
    assert torch.equal(ours, torch.from_numpy(ref))


# ---------------------------------------------------------------------------------------------------------
# calc_qparams against torch.ao's observers
# ---------------------------------------------------------------------------------------------------------


def observers():
    try:
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    except ImportError as err:  # pragma: no cover - depends on the installed torch
        pytest.skip(f"torch.ao.quantization observers are not available: {err}")
    return MinMaxObserver, PerChannelMinMaxObserver


DATASETS = {
    "gaussian": lambda g: torch.randn(64, 16, generator=g) * 2 + 0.3,
    "all_positive": lambda g: torch.rand(64, 16, generator=g) * 5 + 0.5,
    "all_negative": lambda g: -torch.rand(64, 16, generator=g) * 3 - 0.25,
    "zeros": lambda g: torch.zeros(64, 16),
}


@pytest.mark.parametrize("data", sorted(DATASETS))
@pytest.mark.parametrize(("qdtype", "qmin", "qmax"), [(torch.qint8, -128, 127), (torch.quint8, 0, 255)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_calc_qparams_equals_minmax_observer(data, qdtype, qmin, qmax, symmetric):
    minmax_observer, _ = observers()
    x = DATASETS[data](torch.Generator().manual_seed(4))
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        observer = minmax_observer(dtype=qdtype, qscheme=scheme)
        observer(x)
        ref_scale, ref_zero_point = observer.calculate_qparams()
    scale, zero_point = calc_qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric)
    assert torch.equal(scale, ref_scale.reshape(()))
    assert torch.equal(zero_point.long(), ref_zero_point.reshape(()).long())


@pytest.mark.parametrize("symmetric", [False, True])
def test_calc_qparams_equals_observer_narrow_range(symmetric):
    minmax_observer, _ = observers()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    observer = minmax_observer(dtype=torch.qint8, qscheme=scheme, quant_min=-127, quant_max=127)
    observer(x)
    ref_scale, ref_zero_point = observer.calculate_qparams()
    scale, zero_point = calc_qparams(x.min(), x.max(), -127, 127, symmetric=symmetric)
    assert torch.equal(scale, ref_scale.reshape(()))
    assert int(zero_point) == int(ref_zero_point)
    if symmetric:
        assert torch.equal(scale, x.abs().max() / 127)  # amax / 127 for the narrow range


@pytest.mark.parametrize(("qdtype", "qmin", "qmax"), [(torch.qint8, -128, 127), (torch.quint8, 0, 255)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_calc_qparams_equals_per_channel_observer(qdtype, qmin, qmax, symmetric):
    _, per_channel_observer = observers()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 32, generator=g) * torch.linspace(0.1, 4, 8)[:, None]  # (C, K)
    x[1] = x[1].abs() + 0.1  # an all-positive channel
    x[2] = -x[2].abs() - 0.1  # an all-negative channel
    scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    observer = per_channel_observer(ch_axis=0, dtype=qdtype, qscheme=scheme)
    observer(x)
    ref_scale, ref_zero_point = observer.calculate_qparams()
    xmin, xmax = qbook.granularity.minmax(x, PerChannel(0))  # (C, 1)
    scale, zero_point = calc_qparams(xmin, xmax, qmin, qmax, symmetric=symmetric)
    assert scale.shape == zero_point.shape == (8, 1)
    assert torch.equal(scale.flatten(), ref_scale)
    assert torch.equal(zero_point.flatten().long(), ref_zero_point.long())


def test_calc_qparams_represents_zero_exactly():
    for xmin, xmax in [(-0.7, 3.1), (0.5, 2.0), (-4.0, -1.0), (-1e-3, 1e4)]:
        scale, zero_point = calc_qparams(xmin, xmax, 0, 255)
        q0 = quantize(torch.tensor(0.0), scale, zero_point, 0, 255)
        assert dequantize(q0, scale, zero_point).item() == 0.0


def test_calc_qparams_unsigned_symmetric_zero_point():
    _, zero_point = calc_qparams(-1.0, 1.0, 0, 15, symmetric=True)
    assert int(zero_point) == 8  # (qmin + qmax + 1) // 2


# ---------------------------------------------------------------------------------------------------------
# torch's quantized tensors and fake quantization: equal except for reciprocal-rounded ties
# ---------------------------------------------------------------------------------------------------------


def assert_only_tie_differences(
    ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, scale, step
) -> None:
    """Every difference is exactly one ``step`` and sits where ``x / scale`` is a float32 near-tie."""
    differ = ours != theirs
    expected = torch.as_tensor(step).double().abs().expand_as(x)[differ]
    assert torch.allclose((ours - theirs)[differ].abs().double(), expected)
    assert near_tie(x, scale)[differ].all(), "a difference that is not a rounding tie"


@pytest.mark.filterwarnings(TORCH_QTENSOR_DEPRECATION)
@pytest.mark.parametrize(("qdtype", "qmin", "qmax"), [(torch.qint8, -128, 127), (torch.quint8, 0, 255)])
def test_quantize_matches_torch_quantize_per_tensor(qdtype, qmin, qmax):
    g = torch.Generator().manual_seed(7)
    for scale in (0.0371, 0.1, 2.0**-5):
        zero_point = (qmin + qmax + 1) // 2 + 3
        x = torch.cat([torch.randn(2000, generator=g) * 60 * scale, tie_heavy(scale, 2000)])
        ours = quantize(x, scale, zero_point, qmin, qmax)
        theirs = torch.quantize_per_tensor(x, scale, zero_point, qdtype).int_repr()
        assert_only_tie_differences(ours.int(), theirs.int(), x, scale, 1)


@pytest.mark.parametrize("scale", [0.0371, 0.1, 2.0**-5])
def test_fake_quantize_matches_torch_per_tensor(scale):
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(3000, generator=g) * 100 * scale, tie_heavy(scale, 1000)])
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    zero_point, qmin, qmax = -5, -128, 127
    y_ours = fake_quantize(x_ours, scale, zero_point, qmin, qmax)
    y_torch = torch.fake_quantize_per_tensor_affine(x_torch, scale, zero_point, qmin, qmax)
    weights = torch.randn(x.shape, generator=g)
    (y_ours * weights).sum().backward()
    (y_torch * weights).sum().backward()
    scale32 = torch.tensor(scale, dtype=torch.float32)
    assert_only_tie_differences(y_ours.detach(), y_torch.detach(), x, scale32, scale32)
    assert_only_tie_differences(x_ours.grad, x_torch.grad, x, scale32, weights)
    clipped = (x / scale32).round() + zero_point > qmax
    assert clipped.any() and (x_ours.grad[clipped] == 0).all()


def test_fake_quantize_matches_torch_per_channel():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 200, generator=g) * 3  # (C, K)
    scale = torch.rand(6, generator=g) * 0.05 + 0.005  # (C,)
    zero_point = torch.randint(-20, 20, (6,), generator=g).to(torch.int32)  # (C,)
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = fake_quantize(x_ours, scale[:, None], zero_point[:, None], -128, 127, granularity=PerChannel(0))
    y_torch = torch.fake_quantize_per_channel_affine(x_torch, scale, zero_point, 0, -128, 127)
    y_ours.sum().backward()
    y_torch.sum().backward()
    assert_only_tie_differences(y_ours.detach(), y_torch.detach(), x, scale[:, None], scale[:, None])
    assert_only_tie_differences(x_ours.grad, x_torch.grad, x, scale[:, None], 1.0)
    assert (x_ours.grad == 0).any() and (x_ours.grad == 1).any()


def test_fake_quantize_is_dequantize_of_quantize_and_keeps_dtype():
    x = torch.randn(100, generator=torch.Generator().manual_seed(10))
    expected = dequantize(quantize(x, 0.02, 3, -8, 7), 0.02, 3)
    assert torch.equal(fake_quantize(x, 0.02, 3, -8, 7), expected)
    assert fake_quantize(x.half(), 0.02, 3, -8, 7).dtype == torch.float16


def test_fake_quantize_gradient_boundaries_and_scale_gradient_none():
    scale = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([-1.76, -1.74, 0.3, 1.24, 1.26], requires_grad=True)
    fake_quantize(x, scale, 0, qmin=-3, qmax=2).sum().backward()
    # round(x / 0.5) = -4, -3, 1, 2, 3 -> the two ends fall outside [-3, 2]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert scale.grad is None


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------

specs = st.builds(QuantSpec, st.integers(2, 16), st.booleans(), st.booleans(), st.booleans())
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def ranges_and_data(draw):
    spec = draw(specs)
    a, b = draw(finite), draw(finite)
    xmin, xmax = min(a, b), max(a, b)
    u = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=1, max_size=50)), dtype=torch.float64)
    x = (xmin + u * (xmax - xmin)).to(torch.float32).clamp(xmin, xmax)
    return spec, xmin, xmax, x


@settings(max_examples=150, deadline=None)
@given(ranges_and_data())
def test_round_trip_error_at_most_half_a_step(case):
    spec, xmin, xmax, x = case
    scale, zero_point = calc_qparams(xmin, xmax, spec.qmin, spec.qmax, symmetric=spec.symmetric)
    x_hat = dequantize(quantize(x, scale, zero_point, spec.qmin, spec.qmax), scale, zero_point)
    slack = 1e-5 * scale + 4 * EPS32 * x.abs()  # float32 rounding of the division, product and scale
    assert ((x - x_hat).abs() <= scale / 2 + slack).all()


@settings(max_examples=100, deadline=None)
@given(ranges_and_data())
def test_quantize_monotone_and_idempotent(case):
    spec, xmin, xmax, x = case
    scale, zero_point = calc_qparams(xmin, xmax, spec.qmin, spec.qmax, symmetric=spec.symmetric)
    x = x.sort().values
    q = quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    assert (q[1:].long() >= q[:-1].long()).all()
    again = quantize(dequantize(q, scale, zero_point), scale, zero_point, spec.qmin, spec.qmax)
    assert torch.equal(again, q)


@pytest.mark.parametrize("spec", spec_cases(), ids=str)
def test_grid_of_every_bit_width(spec):
    half = 2 ** (spec.bits - 1)
    expected = {
        (True, False): (-half, half - 1),
        (True, True): (-half + 1, half - 1),
        (False, False): (0, 2 * half - 1),
        (False, True): (0, 2 * half - 2),
    }[(spec.signed, spec.narrow_range)]
    assert (spec.qmin, spec.qmax) == expected
    info = torch.iinfo(spec.dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max
    if spec.bits <= 8:
        assert spec.dtype in (torch.int8, torch.uint8)
    codes = torch.arange(spec.qmin, spec.qmax + 1).to(spec.dtype)  # every code of the grid
    scale, zero_point = calc_qparams(-1.0, 3.0, spec.qmin, spec.qmax, symmetric=spec.symmetric)
    assert torch.equal(quantize(dequantize(codes, scale, zero_point), scale, zero_point, *expected), codes)
    extremes = quantize(torch.tensor([-math.inf, math.inf]), scale, zero_point, spec.qmin, spec.qmax)
    assert extremes.tolist() == [spec.qmin, spec.qmax]


def test_dtype_for_range_and_presets():
    assert dtype_for_range(-128, 127) == torch.int8
    assert dtype_for_range(0, 255) == torch.uint8
    assert dtype_for_range(-129, 127) == torch.int16
    assert dtype_for_range(0, 65535) == torch.int32
    assert dtype_for_range(-(2**31), 2**31 - 1) == torch.int32
    assert (INT8.qmin, INT8.qmax, UINT8.qmin, UINT8.qmax) == (-128, 127, 0, 255)
    assert (INT8_SYMMETRIC.qmin, INT8_SYMMETRIC.qmax, INT8_SYMMETRIC.symmetric) == (-127, 127, True)
    assert (INT4.qmin, INT4.qmax, qbook.affine.UINT4.qmax) == (-8, 7, 15)


def test_int32_grid_saturates_exactly():
    q = quantize(torch.tensor([1e30, -1e30, 3.0]), 1.0, 0, -(2**31), 2**31 - 1)
    assert q.dtype == torch.int32 and q.tolist() == [2**31 - 1, -(2**31), 3]


# ---------------------------------------------------------------------------------------------------------
# Granularity
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_group_equals_quantizing_each_group_alone(axis):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 12, generator=g) * torch.linspace(0.2, 3, 12)  # (8, 12)
    granularity = PerGroup(axis=axis, group_size=4)
    xmin, xmax = qbook.granularity.minmax(x, granularity)
    scale, zero_point = calc_qparams(xmin, xmax, -8, 7)
    q = quantize(x, scale, zero_point, -8, 7, granularity=granularity)
    x_hat = dequantize(q, scale, zero_point, granularity=granularity)
    moved_x, moved_q, moved_hat = (t.movedim(axis, -1) for t in (x, q, x_hat))  # (..., L)
    moved_scale, moved_zp = scale.movedim(axis, -1), zero_point.movedim(axis, -1)  # (..., L // 4)
    for index in np.ndindex(*moved_scale.shape):
        *rest, j = index
        block = (*rest, slice(4 * j, 4 * j + 4))
        s, z = moved_scale[index], moved_zp[index]
        alone_scale, alone_zp = calc_qparams(moved_x[block].min(), moved_x[block].max(), -8, 7)
        assert torch.equal(alone_scale, s) and torch.equal(alone_zp, z)
        assert torch.equal(quantize(moved_x[block], s, z, -8, 7), moved_q[block])
        assert torch.equal(dequantize(moved_q[block], s, z), moved_hat[block])


def test_per_channel_granularity_equals_row_loop():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(12))
    t = QTensor.from_float(x, INT8, PerChannel(0))
    for row in range(5):
        alone = QTensor.from_float(x[row], INT8)
        assert torch.equal(alone.q, t.q[row])
        assert torch.equal(alone.dequantize(), t.dequantize()[row])


# ---------------------------------------------------------------------------------------------------------
# QTensor and PyTorch's quantized tensors
# ---------------------------------------------------------------------------------------------------------


def test_qtensor_from_float_and_nbytes():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(13))
    t = QTensor.from_float(x, INT4, PerGroup(axis=1, group_size=8))
    assert t.shape == (4, 16) and t.scale.shape == (4, 2) and t.q.dtype == torch.int8
    assert t.nbytes == 4 * 16 // 2 + 8 * 8  # packed int4 codes + (float32 scale, int32 zero point) per group
    assert torch.equal(t.dequantize(), dequantize(t.q, t.scale, t.zero_point, granularity=t.granularity))
    fixed = QTensor.from_float(x, UINT8, xmin=-1.0, xmax=1.0)
    assert torch.equal(fixed.scale, calc_qparams(-1.0, 1.0, 0, 255)[0])
    symmetric = QTensor.from_float(x, INT8_SYMMETRIC)
    assert int(symmetric.zero_point) == 0 and torch.equal(symmetric.scale, x.abs().max() / 127)


@pytest.mark.parametrize("spec", [INT8, UINT8, INT8_SYMMETRIC], ids=str)
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerChannel(1)], ids=str)
def test_qtensor_torch_round_trip(spec, granularity):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(14)) + 0.4
    t = QTensor.from_float(x, spec, granularity)
    tq = t.to_torch()
    assert tq.dtype == (torch.qint8 if spec.signed else torch.quint8)
    assert torch.equal(tq.int_repr(), t.q)
    assert torch.equal(tq.dequantize(), t.dequantize())
    if isinstance(granularity, PerTensor):
        assert tq.q_scale() == t.scale.item() and tq.q_zero_point() == t.zero_point.item()
    else:
        assert tq.q_per_channel_axis() == granularity.axis
        assert torch.equal(tq.q_per_channel_scales().float(), t.scale.flatten())
    back = QTensor.from_torch(tq, spec=spec)
    assert all(torch.equal(getattr(back, f), getattr(t, f)) for f in ("q", "scale", "zero_point"))
    assert back.spec == spec and back.granularity == granularity


@pytest.fixture
def torch_warns_always():
    """torch emits its deprecation warnings once per process unless told otherwise."""
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(before)


def test_to_torch_emits_no_warning(torch_warns_always):
    x = torch.randn(10)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)
    if not raw:
        pytest.skip("this torch does not warn about its quantized tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QTensor.from_float(x, INT8).to_torch()
        QTensor.from_float(x.reshape(2, 5), INT8, PerChannel(0)).to_torch()


def test_to_torch_rejects_what_torch_lacks():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits=4"):
        QTensor.from_float(x, INT4).to_torch()
    with pytest.raises(ValueError, match="PerGroup"):
        QTensor.from_float(x, INT8, PerGroup(1, 4)).to_torch()


@pytest.mark.filterwarnings(TORCH_QTENSOR_DEPRECATION)
def test_from_torch_rejects_unsupported():
    with pytest.raises(TypeError, match="torch.float32"):
        QTensor.from_torch(torch.randn(3))
    q32 = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint32)
    with pytest.raises(ValueError, match="qint32"):
        QTensor.from_torch(q32)
    q8 = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="does not match"):
        QTensor.from_torch(q8, spec=UINT8)


def test_to_torch_without_torch_quantized_tensors(monkeypatch):
    monkeypatch.delattr(torch, "quantize_per_tensor")
    with pytest.raises(RuntimeError, match="torch.quantize_per_tensor"):
        QTensor.from_float(torch.randn(3), INT8).to_torch()


# ---------------------------------------------------------------------------------------------------------
# Bad input: each path raises a clear exception naming the value
# ---------------------------------------------------------------------------------------------------------

X = torch.tensor([0.5, -1.0, 2.0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: quantize(X, 0.0, 0, -128, 127), ValueError, r"positive and finite, got 0\.0"),
        (lambda: quantize(X, -0.5, 0, -128, 127), ValueError, r"got -0\.5"),
        (lambda: quantize(X, math.inf, 0, -128, 127), ValueError, "got inf"),
        (lambda: quantize(X, math.nan, 0, -128, 127), ValueError, "got nan"),
        (lambda: quantize(X, torch.tensor([0.1, -0.1, 0.1]), 0, -128, 127), ValueError, r"at index \(1,\)"),
        (lambda: quantize(X, torch.ones(2), 0, -128, 127), ValueError, r"shape \(2,\) does not broadcast"),
        (
            lambda: quantize(X, torch.ones(3, 1), 0, -128, 127),
            ValueError,
            r"shape \(3, 1\) does not broadcast",
        ),
        (lambda: quantize(X, 0.1, 128, -128, 127), ValueError, r"\[-128, 127\], got 128"),
        (lambda: quantize(X, 0.1, -1, 0, 255), ValueError, "got -1"),
        (lambda: quantize(X, 0.1, 0.5, -128, 127), ValueError, "integers, got 0.5"),
        (
            lambda: quantize(X, 0.1, torch.ones(2, dtype=torch.int32), -128, 127),
            ValueError,
            "zero_point of shape",
        ),
        (lambda: quantize(X, 0.1, 0, 5, 5), ValueError, "qmin=5, qmax=5"),
        (lambda: quantize(X, 0.1, 0, 127, -128), ValueError, "qmin=127, qmax=-128"),
        (lambda: quantize(X, 0.1, 0, 0, 2**32), ValueError, "does not fit int32"),
        (lambda: quantize(X, 0.1, 0, -128.0, 127), TypeError, "qmin must be an integer, got -128.0"),
        (
            lambda: quantize(torch.tensor([1.0, math.nan]), 0.1, 0, -128, 127),
            ValueError,
            r"NaN.*index \(1,\)",
        ),
        (lambda: quantize(torch.tensor([1, 2]), 0.1, 0, -128, 127), TypeError, "torch.int64"),
        (lambda: dequantize(X, 0.1, 0), TypeError, "torch.float32"),
        (lambda: dequantize(torch.tensor([1, 2]), 0.0, 0), ValueError, r"got 0\.0"),
        (lambda: fake_quantize(X, -1.0, 0, -128, 127), ValueError, r"got -1\.0"),
        (lambda: fake_quantize(torch.tensor([math.nan]), 0.1, 0, -128, 127), ValueError, "NaN"),
        (lambda: calc_qparams(2.0, 1.0, -128, 127), ValueError, r"xmin=2\.0 > xmax=1\.0"),
        (
            lambda: calc_qparams(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 2.0]), 0, 255),
            ValueError,
            "xmin=3.0",
        ),
        (lambda: calc_qparams(-math.inf, 1.0, -128, 127), ValueError, "xmin must be finite, got -inf"),
        (lambda: calc_qparams(0.0, math.nan, -128, 127), ValueError, "xmax must be finite, got nan"),
        (lambda: calc_qparams(0.0, 1.0, 3, 3), ValueError, "qmin=3, qmax=3"),
        (lambda: QuantSpec(bits=1), ValueError, "2..16, got 1"),
        (lambda: QuantSpec(bits=17), ValueError, "2..16, got 17"),
        (lambda: QuantSpec(bits=8.0), TypeError, "bits must be an int, got 8.0"),
        (lambda: QuantSpec(signed=1), TypeError, "signed must be a bool, got 1"),
        (
            lambda: quantize(torch.ones(4, 6), torch.ones(4), 0, -128, 127, granularity=PerChannel(0)),
            ValueError,
            r"shape \(4,\), expected \(4, 1\)",
        ),
        (
            lambda: quantize(torch.ones(4, 6), torch.ones(4, 2), 0, -128, 127, granularity=PerGroup(1, 4)),
            ValueError,
            "does not divide",
        ),
        (
            lambda: QTensor(torch.tensor([1.0]), torch.tensor(1.0), torch.tensor(0)),
            TypeError,
            "torch.float32",
        ),
        (
            lambda: QTensor(torch.tensor([9], dtype=torch.int8), torch.tensor(1.0), torch.tensor(0), INT4),
            ValueError,
            r"holds 9 \(at index \(0,\)\), outside the grid \[-8, 7\]",
        ),
        (
            lambda: QTensor(torch.tensor([1], dtype=torch.int8), torch.ones(1), torch.tensor(0)),
            ValueError,
            r"scale must be a tensor of shape \(\)",
        ),
        (
            lambda: QTensor(torch.tensor([1], dtype=torch.int8), torch.tensor(-2.0), torch.tensor(0)),
            ValueError,
            r"got -2\.0",
        ),
    ],
)
def test_bad_input_raises_naming_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_infinities_saturate():
    q = quantize(torch.tensor([math.inf, -math.inf, 0.0]), 0.1, 10, 0, 255)
    assert q.tolist() == [255, 0, 10]


def test_sqnr_db_against_the_definition():
    from qbook.affine import sqnr_db

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=gen)
    noise = 0.01 * torch.randn(1000, generator=gen)
    expected = 10 * np.log10(np.sum(x.double().numpy() ** 2) / np.sum(noise.double().numpy() ** 2))
    assert sqnr_db(x, x + noise) == pytest.approx(expected, rel=1e-6)
    assert sqnr_db(x, x) == float("inf")
    # a uniform grid: about 6.02 dB more per bit
    scale8, zp8 = calc_qparams(x.min(), x.max(), -128, 127)
    scale9, zp9 = calc_qparams(x.min(), x.max(), -256, 255)
    x8 = dequantize(quantize(x, scale8, zp8, -128, 127), scale8, zp8)
    x9 = dequantize(quantize(x, scale9, zp9, -256, 255), scale9, zp9)
    assert 5.0 < sqnr_db(x, x9) - sqnr_db(x, x8) < 7.0


@pytest.mark.parametrize(
    "x, x_hat, error, match",
    [
        (torch.zeros(3), torch.ones(3), ValueError, "all zeros"),
        (torch.ones(3), torch.ones(4), ValueError, "same non-empty shape"),
        (torch.ones(0), torch.ones(0), ValueError, "same non-empty shape"),
        (torch.ones(3, dtype=torch.int32), torch.ones(3), TypeError, "x must be a floating-point tensor"),
        (torch.ones(3), [1.0, 1.0, 1.0], TypeError, "x_hat must be a floating-point tensor"),
    ],
)
def test_sqnr_db_bad_input(x, x_hat, error, match):
    from qbook.affine import sqnr_db

    with pytest.raises(error, match=match):
        sqnr_db(x, x_hat)


# ---------------------------------------------------------------------------------------------------------
# Issue 8 regressions
# ---------------------------------------------------------------------------------------------------------


def test_zero_point_is_exact_on_grids_wider_than_2_to_24():
    scale, zero_point = calc_qparams(-512.0, 0.0, -(2**31), 2**31 - 1)
    assert zero_point.item() == 2**31 - 1  # float32 arithmetic wrapped to -2^31
    g = torch.Generator().manual_seed(21)
    xmin = -torch.rand(200, generator=g) * 1000  # (200,)
    xmax = torch.rand(200, generator=g) * 1000
    for qmin, qmax in [(-(2**31), 2**31 - 1), (0, 2**31 - 1), (-(2**30), 2**25), (-(2**24) - 3, 2**24 + 5)]:
        scale, zero_point = calc_qparams(xmin, xmax, qmin, qmax)
        shift = torch.round(xmin / scale).to(torch.int64)  # float32, as (3.3) says; then exact integers
        expected = [min(max(qmin - int(k), qmin), qmax) for k in shift.tolist()]
        assert zero_point.tolist() == expected


def test_range_wider_than_float32_gets_a_finite_scale():
    scale, zero_point = calc_qparams(-3e38, 3e38, -128, 127)
    exact = (float(torch.tensor(3e38)) * 2) / 255  # float64: xmax - xmin is exact there
    assert math.isfinite(scale.item()) and scale.item() == pytest.approx(exact, rel=1e-6)
    assert zero_point.item() == 0  # -128 - round(-127.5): ties to even
    x = torch.tensor([-3e38, 0.0, 3e38])
    assert quantize(x, scale, zero_point, -128, 127).tolist() == [-128, 0, 127]
    # per channel: the other channels get exactly what they get alone
    lo, hi = torch.tensor([-3e38, -1.0, 0.5]), torch.tensor([3e38, 2.0, 0.75])
    scales, zero_points = calc_qparams(lo, hi, -128, 127)
    for i in (1, 2):
        alone = calc_qparams(lo[i], hi[i], -128, 127)
        assert torch.equal(scales[i], alone[0]) and torch.equal(zero_points[i], alone[1])
    assert torch.equal(scales[0], scale)
    sym_scale, _ = calc_qparams(-3e38, 3e38, -127, 127, symmetric=True)
    assert sym_scale.item() == pytest.approx(3e38 / 127, rel=1e-6)


def test_scale_beyond_float32_is_a_value_error():
    with pytest.raises(ValueError, match=r"needs a scale beyond float32's largest.*grid \[0, 1\]"):
        calc_qparams(-3e38, 3e38, 0, 1)
    with pytest.raises(ValueError, match="beyond float32"):
        calc_qparams(0.0, 3e38, 0, 1, symmetric=True)


def test_calc_qparams_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        calc_qparams(torch.zeros(2), torch.ones(3), -128, 127)
    scale, zero_point = calc_qparams(torch.zeros(2, 1), torch.ones(3), -128, 127)  # broadcasting is fine
    assert scale.shape == zero_point.shape == (2, 3)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        calc_qparams(0.0, 1.0, -128, 127, symmetric="yes")


@pytest.mark.parametrize(
    ("qmin", "qmax"), [(-2, -1), (-10, -3), (1, 10), (0, 255), (-128, 127), (-5, 0), (3, 4)]
)
def test_symmetric_zero_point_lies_on_the_grid(qmin, qmax):
    _, zero_point = calc_qparams(0.0, 1.0, qmin, qmax, symmetric=True)
    assert qmin <= zero_point.item() <= qmax
    assert zero_point.item() == (0 if qmin < 0 <= qmax else (qmin + qmax + 1) // 2)


def test_zero_point_range_check_does_not_cast_the_bounds():
    x = torch.tensor([0.5, 1.0, -3.0, 25.0])
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.float32):
        q = quantize(x, 0.1, torch.tensor(5, dtype=dtype), 0, 255)  # 255 does not fit int8
        assert torch.equal(q, quantize(x, 0.1, 5, 0, 255))
        assert torch.equal(dequantize(q, 0.1, torch.tensor(5, dtype=dtype)), dequantize(q, 0.1, 5))
    with pytest.raises(ValueError, match=r"\[200, 300\], got -50"):
        quantize(x, 0.1, torch.tensor(-50, dtype=torch.int8), 200, 300)
    with pytest.raises(ValueError, match=r"got -50 \(at index \(1,\)\)"):
        quantize(x, 0.1, torch.tensor([250, -50, 250, 250], dtype=torch.int16), 200, 300)
    with pytest.raises(ValueError, match="got 200"):
        quantize(x, 0.1, torch.tensor(200, dtype=torch.uint8), -128, 127)
    with pytest.raises(ValueError, match="2147483648"):
        quantize(x, 0.1, torch.tensor([2.0**31] * 4, dtype=torch.float32), -(2**31), 2**31 - 1)
    with pytest.raises(ValueError, match="int32"):
        dequantize(torch.tensor([1], dtype=torch.int8), 0.1, 2**40)


# ---------------------------------------------------------------------------------------------------------
# Fast paths: chunked processing equals the plain composition
# ---------------------------------------------------------------------------------------------------------


def composition(x, scale, zero_point, qmin, qmax):
    """(3.1) and (3.2) written out, float64 where the integers need it; per-group parameters repeated."""
    work = torch.float64 if max(-qmin, qmax) > 2**24 else torch.float32
    codes = torch.round(x / scale).to(work) + torch.as_tensor(zero_point).to(work)
    q = codes.clamp(qmin, qmax)
    x_hat = (q - torch.as_tensor(zero_point).to(work)).to(torch.float32) * scale
    return q.to(torch.int64), x_hat, (codes >= qmin) & (codes <= qmax)


CHUNK_CASES = [
    (PerTensor(), (37, 11)),
    (PerChannel(0), (37, 11)),
    (PerChannel(1), (37, 11)),
    (PerGroup(1, 4), (19, 12)),
    (PerGroup(0, 3), (18, 5)),
    (PerGroup(-1, 5), (3, 7, 10)),
    (None, (1000,)),
]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 17])
@pytest.mark.parametrize(("granularity", "shape"), CHUNK_CASES, ids=str)
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 15), (-(2**31), 2**31 - 1)])
def test_chunked_paths_equal_the_composition(monkeypatch, chunk, granularity, shape, qmin, qmax):
    monkeypatch.setattr(qbook.affine, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(sum(shape) + chunk)
    x = torch.randn(shape, generator=g) * 4
    x.view(-1)[::17] = tie_heavy(0.03, x.numel())[::17] if x.numel() >= 17 else x.view(-1)[::17]
    x.view(-1)[5] = math.inf
    granularity_or_tensor = granularity if granularity is not None else PerTensor()
    xmin, xmax = qbook.granularity.minmax(x.clamp(-50, 50), granularity_or_tensor)
    scale, zero_point = calc_qparams(xmin, xmax, qmin, qmax)
    if isinstance(granularity, PerGroup):
        axis = granularity.axis % x.ndim
        s_full = scale.repeat_interleave(granularity.group_size, dim=axis)
        z_full = zero_point.repeat_interleave(granularity.group_size, dim=axis)
    else:
        s_full, z_full = scale, zero_point
    q_ref, x_hat_ref, inside_ref = composition(x, s_full, z_full, qmin, qmax)
    before = x.clone()
    q = quantize(x, scale, zero_point, qmin, qmax, granularity=granularity)
    assert q.dtype == dtype_for_range(qmin, qmax) and torch.equal(q.to(torch.int64), q_ref)
    assert torch.equal(dequantize(q, scale, zero_point, granularity=granularity), x_hat_ref)
    xg = x.clone().requires_grad_(True)
    y = fake_quantize(xg, scale, zero_point, qmin, qmax, granularity=granularity)
    assert torch.equal(y.detach(), x_hat_ref)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(xg.grad, 3.0 * inside_ref.float())
    assert torch.equal(x, before)


def test_nan_in_a_later_chunk_is_found(monkeypatch):
    monkeypatch.setattr(qbook.affine, "_CHUNK", 10)
    x = torch.randn(20, 10)
    x[17, 3] = math.nan
    x[2, 2], x[2, 3] = math.inf, -math.inf  # inf - inf in an earlier chunk's sum: not a NaN of x
    with pytest.raises(ValueError, match=r"1 NaN value\(s\), the first at index \(17, 3\)"):
        quantize(x, 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match=r"index \(17, 3\)"):
        fake_quantize(x, 0.1, 0, -128, 127)
    x[17, 3] = 1.0
    assert quantize(x, 0.1, 0, -128, 127)[2, 2:4].tolist() == [127, -128]


def test_per_group_quantize_needs_no_repeated_parameters(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("per-group parameters were repeated")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", forbidden)
    x = torch.randn(8, 64)
    granularity = PerGroup(1, 16)
    scale, zero_point = calc_qparams(*qbook.granularity.minmax(x, granularity), -8, 7)
    q = quantize(x, scale, zero_point, -8, 7, granularity=granularity)
    dequantize(q, scale, zero_point, granularity=granularity)
    fake_quantize(x, scale, zero_point, -8, 7, granularity=granularity)


MEMORY_SCRIPT = """
import resource, sys, torch
from qbook.affine import calc_qparams, quantize
from qbook.granularity import PerGroup, minmax
w = torch.randn(4096, 4096)  # (N, K)
g = PerGroup(axis=1, group_size=128)
scale, zero_point = calc_qparams(*minmax(w, g), -8, 7)  # (N, K // 128)
def ours(x, s, z):
    return quantize(x, s, z, -8, 7, granularity=g)
def composition(x, s, z):  # the plain torch composition, parameters as views (N, K // 128, 1)
    x = x.view(x.shape[0], -1, 128)
    return torch.clamp(torch.round(x / s[..., None]) + z[..., None], -8, 7).to(torch.int8)
fn = ours if sys.argv[1] == "ours" else composition
fn(w[:64], scale[:64], zero_point[:64])  # load the code paths first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = fn(w, scale, zero_point)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # KiB
"""


def test_per_group_quantize_needs_less_memory_than_the_composition():
    import os
    import subprocess
    import sys

    pytest.importorskip("resource")  # the peak resident memory of a fresh process (POSIX)
    peak = {}
    for which in ("ours", "composition"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, which], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peak[which] = int(out.stdout.split()[-1])  # above the baseline, the 16 MiB result included
    assert peak["ours"] <= 1.5 * peak["composition"], peak
    if sys.platform.startswith("linux"):  # ru_maxrss in KiB
        assert peak["ours"] <= 24 * 1024, peak  # the int8 result (16 MiB) and a chunk of scratch space


@pytest.mark.parametrize("qmin, qmax", [(-8, 7), (-128, 127), (0, 255), (-127, 127), (0, 15)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lo, hi", [(-3.4e38, 3.4e38), (-3.4e38, 1.0), (0.0, 3.4e38), (-1e38, 3.3e38)])
def test_every_code_dequantizes_to_a_finite_number_near_float32_max(qmin, qmax, symmetric, lo, hi) -> None:
    """Near float32's largest number the zero point's rounding could put an end level beyond 3.4e38."""
    scale, zero_point = calc_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric=symmetric)
    codes = torch.arange(qmin, qmax + 1)
    assert torch.isfinite(dequantize(codes, scale, zero_point)).all()
    assert torch.isfinite(scale) and scale > 0 and qmin <= zero_point <= qmax


# ---------------------------------------------------------------------------------------------------------
# Float grids (chapter 12): quantize/dequantize with a FloatFormat, against ONNX's float8 QuantizeLinear
# ---------------------------------------------------------------------------------------------------------


def float8_inputs(seed: int = 3) -> torch.Tensor:
    """(64, 1024) float32 over many binades, with exact ties of E4M3/E5M2, overflow, ±inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1024, dtype=torch.float64, generator=g)
    x = (x * torch.exp2(torch.randint(-24, 24, (64, 1), generator=g).double())).float()
    x[0] = torch.arange(1024) / 64.0  # every multiple of 1/64 in [0, 16): ties of both formats' grids
    x[1, :4] = torch.tensor([math.inf, -math.inf, math.nan, 1e30])
    return x


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("fmt_name", ["FP8_E4M3", "FP8_E5M2"])
def test_float8_grid_equals_onnx(fmt_name, saturate):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from qbook import formats

    fmt = getattr(formats, fmt_name)
    np_type = {"FP8_E4M3": ml_dtypes.float8_e4m3fn, "FP8_E5M2": ml_dtypes.float8_e5m2}[fmt_name]
    x = float8_inputs()
    cases = [  # (scale, granularity, ONNX attributes): per tensor, per row (axis 0), blocks of 32 on axis 1
        (torch.tensor(0.37), None, {}),
        (torch.rand(64, 1, generator=torch.Generator().manual_seed(4)) + 0.01, PerChannel(0), {"axis": 0}),
        (torch.rand(64, 32, generator=torch.Generator().manual_seed(5)) + 0.01, PerGroup(1, 32),
         {"axis": 1, "block_size": 32}),
    ]
    for scale, granularity, attrs in cases:
        q = quantize(x, scale, 0, fmt, granularity=granularity, saturate=saturate)
        onnx_scale = scale.flatten().numpy() if isinstance(granularity, PerChannel) else scale.numpy()
        zero = np.zeros(onnx_scale.shape, dtype=np_type)
        ref = onnx_quantize_linear(x.numpy(), onnx_scale, zero, saturate=int(saturate), **attrs)
        assert q.dtype == fmt.torch_dtype
        ours, theirs = q.view(torch.uint8).numpy(), ref.view(np.uint8)
        nan = np.isnan(ref.astype(np.float32))
        assert np.array_equal(np.isnan(q.float().numpy()), nan)
        assert np.array_equal(ours[~nan], theirs[~nan])
        x_hat = dequantize(q, scale, 0, fmt, granularity=granularity)
        expected = q.float() * (scale if granularity is None else granularity.expand(scale, x.shape))
        assert torch.equal(x_hat.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("fmt_name", ["FP6_E3M2", "FP6_E2M3", "FP4_E2M1", "FP16", "BF16"])
def test_float_grids_without_float8(fmt_name):
    from qbook import formats

    fmt = getattr(formats, fmt_name)
    x = float8_inputs()[2:]  # finite
    scale = torch.rand(62, 1, generator=torch.Generator().manual_seed(6)) + 0.01
    q = quantize(x, scale, 0, fmt, granularity=PerChannel(0))
    values = formats.round_to_format((x / scale).clamp(-fmt.max, fmt.max), fmt)
    if fmt.torch_dtype is None:
        assert q.dtype == torch.uint8 and torch.equal(q.to(torch.int64), formats.encode(values, fmt))
    else:
        assert q.dtype == fmt.torch_dtype and torch.equal(q.float(), values)
    assert torch.equal(dequantize(q, scale, 0, fmt, granularity=PerChannel(0)), values * scale)


def test_float_grid_per_block_and_mx_agree():
    from qbook import mx
    from qbook.formats import FP4_E2M1, FP8_E4M3
    from qbook.granularity import PerBlock

    x = float8_inputs()[2:, :512]  # finite, (62, 512)
    x = torch.cat([x, x[:2]])  # (64, 512): two rows of (32, 128) blocks
    codes, scales = mx.quantize_fp8(x, FP8_E4M3, block=(32, 128))
    q = quantize(x, scales, 0, FP8_E4M3, granularity=PerBlock((32, 128)))
    assert torch.equal(q.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(dequantize(q, scales, 0, FP8_E4M3, granularity=PerBlock((32, 128))),
                       mx.dequantize_fp8(codes, scales, (32, 128)))
    mx_codes, mx_scales = mx.quantize_mx(x, FP4_E2M1)  # the MX element rounding is the saturating float grid
    X = mx.e8m0_to_float(mx_scales)
    assert torch.equal(quantize(x, X, 0, FP4_E2M1, granularity=PerGroup(1, 32)), mx_codes)


def test_float_grid_bad_input():
    from qbook.formats import FP4_E2M1, FP8_E4M3, FP8_E5M2

    x = torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="pass no qmax"):
        quantize(x, 0.5, 0, FP8_E4M3, 127)
    with pytest.raises(ValueError, match="zero_point must be 0"):
        quantize(x, 0.5, 1, FP8_E4M3)
    with pytest.raises(ValueError, match="neither inf nor NaN"):
        quantize(x, 0.5, 0, FP4_E2M1, saturate=False)
    with pytest.raises(TypeError, match="saturate must be a bool"):
        quantize(x, 0.5, 0, FP8_E4M3, saturate=1)
    with pytest.raises(ValueError, match="no NaN encoding"):
        quantize(torch.tensor([math.nan]), 0.5, 0, FP4_E2M1)
    with pytest.raises(ValueError, match="scale must be positive"):
        quantize(x, 0.0, 0, FP8_E5M2)
    q = quantize(x, 0.5, 0, FP8_E4M3)
    with pytest.raises(TypeError, match="FP8_E5M2 codes as torch.float8_e5m2"):
        dequantize(q, 0.5, 0, FP8_E5M2)
    with pytest.raises(TypeError, match="grid must be a FloatFormat"):
        dequantize(q, 0.5, 0, "FP8_E4M3")
    with pytest.raises(ValueError, match="code field must lie in"):
        dequantize(torch.tensor([16], dtype=torch.uint8), 0.5, 0, FP4_E2M1)
    assert quantize(torch.tensor([math.inf, 1e9]), 1.0, 0, FP8_E5M2).float().tolist() == [57344.0, 57344.0]
    assert quantize(torch.tensor([math.inf, 1e9]), 1.0, 0, FP8_E5M2, saturate=False).float().tolist() == [
        math.inf, math.inf]
    assert quantize(torch.tensor([1e9]), 1.0, 0, FP8_E4M3, saturate=False).float().isnan().all()


@pytest.mark.parametrize("spec", [INT8, INT4])
def test_per_block_integer_grid_equals_the_expanded_scale(spec):
    from qbook.granularity import PerBlock

    x = torch.randn(64, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).float()
    g = PerBlock((16, 64))
    t = QTensor.from_float(x, spec, granularity=g)
    assert t.scale.shape == (4, 4)
    full_scale, full_zero = g.expand(t.scale, x.shape), g.expand(t.zero_point, x.shape)
    assert torch.equal(t.q, quantize(x, full_scale, full_zero, spec.qmin, spec.qmax))
    assert torch.equal(t.dequantize(), dequantize(t.q, full_scale, full_zero))
    for i, j in ((0, 0), (3, 2)):
        block = x[16 * i:16 * (i + 1), 64 * j:64 * (j + 1)]
        expected, _ = calc_qparams(block.min(), block.max(), spec.qmin, spec.qmax)
        assert t.scale[i, j] == expected
