"""Tests for qbook.nn: each integer module against an independent computation (qbook's primitives, int_matmul,
the dequantization written out by hand) exactly, and against the float module within its rounding-error
bound."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import qbook
from qbook.affine import INT8, INT8_SYMMETRIC, UINT8, QuantSpec
from qbook.granularity import PerGroup
from qbook.intmath import dequantize_acc, int_matmul, quantize_bias, quantize_multipliers, requantize
from qbook.kernels import int8_matmul
from qbook.nn import (
    QuantConv2d,
    QuantLinear,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    _rows_per_chunk,
    quantize_per_token,
)
from qbook.packing import unpack


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()


def linear(K: int, N: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(randn(N, K, seed=seed, scale=K**-0.5))
        if bias:
            layer.bias.copy_(randn(N, seed=seed + 1, scale=0.1))
    return layer


def weight_by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel with qbook's primitives: (q_w (N, K), s_w (N, 1))."""
    s_w, z_w = qbook.calc_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), -127, 127, symmetric=True)
    return qbook.quantize(w, s_w, z_w, -127, 127), s_w


def dynamic_by_hand(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """(7.2) from qbook's primitives: per-token calc_qparams + quantize, int_matmul, dequantize by hand."""
    q_w, s_w = weight_by_hand(layer.weight.detach())
    s_x, z_x = qbook.calc_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), -127, 127, symmetric=True)
    q_x = qbook.quantize(x, s_x, z_x, -127, 127)
    acc = int_matmul(q_x, q_w.T)  # (M, N) int32
    y = acc.float() * s_x * s_w.reshape(-1)
    return y if layer.bias is None else y + layer.bias.detach()


def rounding_bound(x: torch.Tensor, w: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``|x W^T - x_hat W_hat^T| <= (s_x / 2) sum_k |w| + (s_w / 2) sum_k |x_hat|`` per output (+ slack)."""
    x_hat_abs = x.abs() + s_x / 2
    bound = (s_x / 2) * w.abs().sum(1) + (s_w.reshape(1, -1) / 2) * x_hat_abs.sum(1, keepdim=True)
    return bound * 1.001 + 1e-5


# --------------------------------------------------------------------------------------------------------
# QuantLinear, dynamic
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M, K, N", [(1, 16, 8), (5, 96, 1000), (300, 64, 40), (700, 32, 1536), (0, 8, 4)])
def test_dynamic_linear_equals_the_computation_by_hand(M: int, K: int, N: int) -> None:
    layer = linear(K, N)
    x = randn(M, K, seed=3, scale=2.0)
    q = QuantLinear.from_float(layer)
    assert torch.equal(q(x), dynamic_by_hand(layer, x))


def test_dynamic_linear_equals_int8_matmul_and_keeps_leading_dims() -> None:
    layer = linear(48, 24)
    x = randn(2, 7, 48, seed=1)
    q = QuantLinear.from_float(layer)
    q_x, s_x = quantize_per_token(x.reshape(-1, 48))
    expected = int8_matmul(q_x, q.weight.T, s_x, q.weight_scale, q.bias)
    assert torch.equal(q(x), expected.reshape(2, 7, 24))


def test_dynamic_linear_is_within_the_rounding_bound_of_the_float_layer() -> None:
    layer = linear(384, 96, seed=4)
    x = randn(64, 384, seed=5)
    x[:, 7] *= 30  # an outlier feature
    q = QuantLinear.from_float(layer)
    s_x = x.abs().amax(1, keepdim=True) / 127
    error = (q(x) - layer(x)).abs()
    assert bool((error <= rounding_bound(x, layer.weight.detach(), s_x, q.weight_scale)).all())


def test_dynamic_linear_without_bias_and_full_range_grid() -> None:
    layer = linear(32, 8, bias=False)
    x = randn(10, 32)
    full = QuantSpec(8, True, symmetric=True)  # [-128, 127]: the clamp matters
    q = QuantLinear.from_float(layer, act_spec=full)
    s_x, z = qbook.calc_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), -128, 127, symmetric=True)
    q_x = qbook.quantize(x, s_x, z, -128, 127)
    q_w, s_w = weight_by_hand(layer.weight.detach())
    assert torch.equal(q(x), int_matmul(q_x, q_w.T).float() * s_x * s_w.reshape(-1))
    assert q.bias is None


def test_chunked_rows_give_the_same_result_as_one_chunk() -> None:
    assert [_rows_per_chunk(n) for n in (10, 384, 1536, 4096, 10**6)] == [256, 256, 256, 64, 64]
    layer = linear(16, 1536)
    x = randn(3 * 256 + 5, 16)
    q = QuantLinear.from_float(layer)
    rows = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(q(x), rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False).filter(lambda v: abs(v) < 8e37), min_size=1, max_size=9))
def test_quantize_per_token_equals_calc_qparams_and_quantize(row: list[float]) -> None:
    """The clamp that the narrow grid skips never matters: the same codes as qbook.quantize, which clamps.
    (Beyond |x| = 8.5e37 calc_qparams lowers the scale so that 127 * scale stays a finite float32.)"""
    x = torch.tensor([row, [v / 3 for v in row]], dtype=torch.float32)
    q, scale = quantize_per_token(x)
    s, z = qbook.calc_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), -127, 127, symmetric=True)
    assert torch.equal(scale, s)
    assert torch.equal(q, qbook.quantize(x, s, z, -127, 127))


def test_quantize_per_token_extremes() -> None:
    amax = torch.tensor(3.0)
    x = torch.stack([amax, -amax, torch.nextafter(amax, torch.tensor(0.0)), torch.tensor(0.0)]).reshape(1, -1)
    q, _ = quantize_per_token(x)
    assert q.tolist() == [[127, -127, 127, 0]]
    q, scale = quantize_per_token(torch.zeros(2, 3))  # all-zero tokens: scale eps, codes 0
    assert not q.any() and torch.equal(scale, torch.full((2, 1), torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_inputs_raise(bad: float) -> None:
    x = randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_float(linear(8, 4))(x)
    with pytest.raises(ValueError, match="NaN"):
        quantize_per_token(x)


# --------------------------------------------------------------------------------------------------------
# QuantLinear, static
# --------------------------------------------------------------------------------------------------------


def static_layer(K: int = 64, N: int = 32, spec: QuantSpec = INT8, output: str = "float", seed: int = 0):
    layer = linear(K, N, seed=seed)
    calib = randn(256, K, seed=seed + 7) + 0.5  # asymmetric data: the zero point matters
    s_x, z_x = qbook.calc_qparams(calib.min(), calib.max(), spec.qmin, spec.qmax)
    out = None
    if output == "int8":
        y = layer(calib).detach()
        out = qbook.calc_qparams(y.min(), y.max(), -128, 127)
    q = QuantLinear.from_float(
        layer, activation="static", act_spec=spec, input_qparams=(s_x, z_x), output=output, output_qparams=out
    )
    return layer, q, calib, s_x, z_x, out


@pytest.mark.parametrize("spec", [INT8, UINT8])
def test_static_linear_equals_the_computation_by_hand(spec: QuantSpec) -> None:
    layer, q, calib, s_x, z_x, _ = static_layer(spec=spec)
    x = randn(40, 64, seed=11) + 0.5
    q_w, s_w = weight_by_hand(layer.weight.detach())
    q_x = qbook.quantize(x, s_x, z_x, spec.qmin, spec.qmax)
    acc = int_matmul(q_x, q_w.T, a_zero_point=z_x)  # (4.4)
    b_q = quantize_bias(layer.bias.detach(), s_x, s_w.reshape(-1))  # (9.6)
    assert torch.equal(q.bias, b_q) and q.bias.dtype == torch.int32
    expected = dequantize_acc(acc + b_q, s_x, s_w.reshape(-1))
    assert torch.equal(q(x), expected)
    assert torch.equal(q(q_x), expected)  # integer codes on the input grid skip the quantization


def test_static_linear_is_within_the_rounding_bound_of_the_float_layer() -> None:
    layer, q, calib, s_x, _, _ = static_layer()
    x = calib[:50]  # inside the calibrated range: no clipping
    bound = rounding_bound(x, layer.weight.detach(), s_x, q.weight_scale)
    bound += s_x * q.weight_scale / 2  # the int32 bias rounds too
    assert bool(((q(x) - layer(x)).abs() <= bound).all())


def test_static_linear_requantizes_to_int8() -> None:
    layer, q, calib, s_x, z_x, (s_y, z_y) = static_layer(output="int8")
    x = calib[:30]
    out = q(x)
    assert out.dtype == torch.int8
    q_w, s_w = weight_by_hand(layer.weight.detach())
    acc = int_matmul(qbook.quantize(x, s_x, z_x, -128, 127), q_w.T, a_zero_point=z_x)
    acc += quantize_bias(layer.bias.detach(), s_x, s_w.reshape(-1))
    multiplier, shift = quantize_multipliers(s_x.double() * s_w.reshape(-1).double() / s_y.double())
    assert torch.equal(out, requantize(acc, multiplier, shift, int(z_y)))  # (9.3)-(9.5)
    by_float = torch.round(layer(x) / s_y) + z_y
    assert (out.float() - by_float.clamp(-128, 127)).abs().max() <= 2  # rounding of x, w, bias and (9.5)


def test_int8_output_feeds_the_next_static_layer() -> None:
    first, q1, calib, _, _, out_qparams = static_layer(K=64, N=32, output="int8")
    second = linear(32, 8, seed=5)
    q2 = QuantLinear.from_float(second, activation="static", input_qparams=out_qparams)
    codes = q1(calib[:20])
    expected = q2(qbook.dequantize(codes, *out_qparams))  # float in: re-quantized to the same codes
    assert torch.equal(q2(codes), expected)


def test_state_dict_round_trip_recomputes_run_time_constants() -> None:
    _, q, calib, *_ = static_layer(output="int8")
    fresh = QuantLinear(64, 32, activation="static", output="int8")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(calib), q(calib))
    assert set(q.state_dict()) == {
        "weight",
        "weight_scale",
        "bias",
        "input_scale",
        "input_zero_point",
        "output_scale",
        "output_zero_point",
    }


# --------------------------------------------------------------------------------------------------------
# QuantConv2d
# --------------------------------------------------------------------------------------------------------


def conv(C: int = 3, O: int = 8, k: int = 3, seed: int = 0, **kw) -> nn.Conv2d:
    layer = nn.Conv2d(C, O, k, **kw)
    with torch.no_grad():
        layer.weight.copy_(randn(*layer.weight.shape, seed=seed, scale=(C * k * k) ** -0.5))
        layer.bias.copy_(randn(O, seed=seed + 1, scale=0.1))
    return layer


@pytest.mark.parametrize("kw", [{"padding": 1}, {"stride": 2}, {"padding": (2, 1), "dilation": 2}])
def test_static_conv_equals_an_exact_integer_convolution(kw: dict) -> None:
    layer = conv(**kw)
    x = randn(2, 3, 9, 7, seed=2) + 0.3
    s_x, z_x = qbook.calc_qparams(x.min(), x.max(), -128, 127)
    q = QuantConv2d.from_float(layer, activation="static", input_qparams=(s_x, z_x))
    w = layer.weight.detach().reshape(8, -1)
    q_w, s_w = weight_by_hand(w)
    q_x = qbook.quantize(x, s_x, z_x, -128, 127)
    # (q_x - z_x) is zero in the padding, and every float64 partial sum is an exact integer
    acc = F.conv2d((q_x.double() - int(z_x)), q_w.double().reshape(layer.weight.shape), **kw)
    b_q = quantize_bias(layer.bias.detach(), s_x, s_w.reshape(-1))
    acc = acc.to(torch.int32) + b_q.reshape(1, -1, 1, 1)
    expected = acc.float() * (s_x.double() * s_w.double().reshape(1, -1, 1, 1)).float()
    assert torch.equal(q(x), expected)
    assert (q(x) - layer(x)).abs().max() < 0.05


def test_dynamic_conv_equals_the_computation_by_hand() -> None:
    layer = conv(padding=1)
    x = randn(2, 3, 6, 5, seed=4)
    q = QuantConv2d.from_float(layer)
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)  # (B * L, C k k): one row per position
    proxy = nn.Linear(27, 8)
    with torch.no_grad():
        proxy.weight.copy_(layer.weight.reshape(8, -1))
        proxy.bias.copy_(layer.bias)
    expected = dynamic_by_hand(proxy, rows).reshape(2, 30, 8).transpose(1, 2).reshape(2, 8, 6, 5)
    assert torch.equal(q(x), expected)
    assert (q(x) - layer(x)).abs().max() < 0.05


def test_conv_rejects_what_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"expects inputs \(B, 3, H, W\)"):
        QuantConv2d.from_float(conv())(randn(1, 4, 5, 5))


# --------------------------------------------------------------------------------------------------------
# Weight-only
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 32), (4, 48), (3, 16), (2, None)])
def test_weight_only_linear_equals_quantize_dequantize_by_hand(bits: int, group_size: int | None) -> None:
    layer = linear(80, 12, seed=2)
    q = WeightOnlyLinear.from_float(layer, bits=bits, group_size=group_size)
    qmax = 2 ** (bits - 1) - 1
    g = group_size or 80
    padded = -(-80 // g) * g
    w = F.pad(layer.weight.detach(), (0, padded - 80))
    granularity = PerGroup(1, g)
    lo, hi = qbook.granularity.minmax(w, granularity)
    s, z = qbook.calc_qparams(lo, hi, -qmax, qmax, symmetric=True)
    codes = qbook.quantize(w, s, z, -qmax, qmax, granularity=granularity)
    w_hat = qbook.dequantize(codes, s, z, granularity=granularity)[:, :80]
    assert torch.equal(q.codes(), codes[:, :80])
    assert torch.equal(q.dequantized_weight(), w_hat)
    x = randn(9, 80, seed=3)
    assert torch.equal(q(x), F.linear(x, w_hat, layer.bias.detach()))
    codes_bytes = 12 * (padded if bits == 8 else -(-padded * bits // 8))
    assert q.nbytes == codes_bytes + 4 * s.numel() + 4 * 12
    if bits < 8:
        assert q.weight.dtype == torch.uint8
        assert torch.equal(unpack(q.weight, bits, padded, signed=True), codes)
    error = (q(x) - layer(x)).abs()
    bound = (s.max() / 2) * x.abs().sum(1, keepdim=True) * 1.001 + 1e-5
    assert bool((error <= bound).all())


def test_weight_only_affine_stores_zero_points() -> None:
    layer = linear(64, 4)
    q = WeightOnlyLinear.from_float(layer, bits=4, group_size=32, spec=QuantSpec(4, False))
    assert q.weight_zero_point.shape == (4, 2)
    assert (q.dequantized_weight() - layer.weight).abs().max() < 0.05


def test_weight_only_conv() -> None:
    layer = conv(C=4, O=6, padding=1)
    q = WeightOnlyConv2d.from_float(layer, bits=4, group_size=16)  # K = 36 padded to 48
    x = randn(2, 4, 5, 5)
    w_hat = q.dequantized_weight().reshape(layer.weight.shape)
    assert torch.equal(q(x), F.conv2d(x, w_hat, layer.bias.detach(), padding=1))
    assert repr(q) == "WeightOnlyConv2d(4→6, 3×3, W4 packed per-group g=16 sym, A float)"


# --------------------------------------------------------------------------------------------------------
# The family: repr, size, no side effects, bad input
# --------------------------------------------------------------------------------------------------------


def test_reprs_show_the_scheme() -> None:
    assert repr(QuantLinear.from_float(nn.Linear(384, 1536))) == (
        "QuantLinear(384→1536, W8 per-channel sym, A8 per-token dyn)"
    )
    _, q, *_ = static_layer(output="int8")
    assert repr(q) == "QuantLinear(64→32, W8 per-channel sym, A8 per-tensor static asym, out int8)"
    assert repr(QuantConv2d.from_float(nn.Conv2d(16, 32, 3, padding=1))) == (
        "QuantConv2d(16→32, 3×3, padding=(1, 1), W8 per-channel sym, A8 per-position dyn)"
    )
    assert repr(WeightOnlyLinear.from_float(nn.Linear(256, 64), bits=4, group_size=128)) == (
        "WeightOnlyLinear(256→64, W4 packed per-group g=128 sym, A float)"
    )


def test_nbytes_is_the_state_dict() -> None:
    q = QuantLinear.from_float(nn.Linear(384, 1536))
    assert q.nbytes == 384 * 1536 + 4 * 1536 + 4 * 1536
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32


def test_from_float_leaves_the_float_module_alone() -> None:
    layer = linear(16, 8)
    before = copy.deepcopy(layer.state_dict())
    QuantLinear.from_float(layer)
    WeightOnlyLinear.from_float(layer, bits=4, group_size=8)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_gradients_do_not_flow_through_integer_layers() -> None:
    x = randn(3, 16).requires_grad_()
    y = QuantLinear.from_float(linear(16, 4))(x)
    assert not y.requires_grad


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40).filter(lambda k: k != 16), st.sampled_from(["dynamic", "static"]))
def test_wrong_feature_count_is_a_value_error(k: int, activation: str) -> None:
    qparams = (0.1, 0) if activation == "static" else None
    q = QuantLinear.from_float(linear(16, 4), activation=activation, input_qparams=qparams)
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 16\)"):
        q(torch.zeros(2, k))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]))
def test_integer_inputs_off_the_input_grid_are_type_errors(dtype: torch.dtype) -> None:
    q = QuantLinear.from_float(linear(16, 4), activation="static", input_qparams=(0.1, 0))
    with pytest.raises(TypeError, match="codes of dtype torch.int8"):
        q(torch.zeros(2, 16, dtype=dtype))
    with pytest.raises(TypeError, match="dynamic activations takes float inputs"):
        QuantLinear.from_float(linear(16, 4))(torch.zeros(2, 16, dtype=torch.int8))


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(allow_nan=True), st.just(0.0), st.floats(max_value=0.0)), st.integers(-300, 300))
def test_bad_input_qparams_are_rejected(scale: float, zero_point: int) -> None:
    ok_scale = scale > 0 and torch.tensor(scale, dtype=torch.float32).item() not in (0.0, float("inf"))
    if ok_scale and -128 <= zero_point <= 127:
        return
    with pytest.raises((ValueError, TypeError)):
        QuantLinear.from_float(linear(4, 2), activation="static", input_qparams=(scale, zero_point))


def test_configuration_errors() -> None:
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="floating-point weight"):
        QuantLinear.from_float(_int_linear())
    with pytest.raises(ValueError, match="input_qparams"):
        QuantLinear.from_float(nn.Linear(4, 2), activation="static")
    with pytest.raises(ValueError, match="static activations"):
        QuantLinear.from_float(nn.Linear(4, 2), output="int8")
    with pytest.raises(ValueError, match="symmetrically"):
        QuantLinear.from_float(nn.Linear(4, 2), act_spec=INT8)
    with pytest.raises(ValueError, match="signed and symmetric"):
        QuantLinear.from_float(nn.Linear(4, 2), weight_spec=INT8)
    with pytest.raises(ValueError, match="activation must be one of"):
        QuantLinear.from_float(nn.Linear(4, 2), activation="weekly")
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        WeightOnlyLinear.from_float(nn.Linear(4, 2), bits=9)
    with pytest.raises(ValueError, match="group_size"):
        WeightOnlyLinear.from_float(nn.Linear(4, 2), group_size=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer = nn.Linear(4, 2)
        with torch.no_grad():
            layer.weight[0, 0] = float("nan")
        QuantLinear.from_float(layer)
    assert QuantLinear.from_float(nn.Linear(4, 2), weight_spec=INT8_SYMMETRIC).weight_spec == INT8_SYMMETRIC


def _int_linear() -> nn.Module:
    layer = nn.Linear(4, 2)
    layer.weight = nn.Parameter(torch.zeros(2, 4, dtype=torch.int32), requires_grad=False)
    return layer


@pytest.mark.parametrize("N", [1, 2, 5])
def test_one_input_feature_or_channel(N: int) -> None:
    """K = 1: the transposed weight (1, N) has strides (1, 1), which CPU ``torch._int_mm`` misreads (garbage
    output, found by the export tests); the modules hand it canonical strides. With one input per output the
    dynamic codes are exact (x and w each map to ±127), so the result is the float layer's within rounding."""
    torch.manual_seed(0)
    x = qbook.data.randn(4, 1) * 10
    linear = nn.Linear(1, N)
    assert torch.allclose(QuantLinear.from_float(linear)(x), linear(x), rtol=1e-5, atol=1e-5)
    conv, images = nn.Conv2d(1, N, 1), qbook.data.randn(2, 1, 3, 3)
    assert torch.allclose(QuantConv2d.from_float(conv)(images), conv(images), rtol=1e-5, atol=1e-5)
