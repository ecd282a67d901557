"""Tests for qbook.outliers: LLM.int8() decomposition, SmoothQuant, activation capture, FakeQuantLinear."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, fake_quantize
from qbook.granularity import PerChannel
from qbook.observers import MinMaxObserver, PercentileObserver
from qbook.outliers import (
    FakeQuantLinear,
    LinearQuantConfig,
    capture_activations,
    llm_int8_matmul,
    outlier_channels,
    outlier_columns,
    quantize_linears,
    restore_linears,
    smooth_layernorm_linears,
    smooth_linear,
    smooth_scales,
    vectorwise_matmul,
)

VECTORWISE = LinearQuantConfig(
    weight=INT8_SYMMETRIC, weight_granularity=PerChannel(0), activation=INT8_SYMMETRIC, dynamic=True
)


def with_outliers(M: int = 16, K: int = 32, N: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 25.0  # two outlier features, as in a transformer's hidden states
    x[:, 17] *= 12.0
    w = torch.randn(N, K, generator=g) * 0.1
    return x, w


# ---------------------------------------------------------------------------------------------------------
# Vector-wise int8 and the decomposition
# ---------------------------------------------------------------------------------------------------------


def reference_vectorwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The paper's definition written out: row-wise absmax/127 scales, round, int64 matmul, rescale."""
    c_x = x.abs().amax(dim=1, keepdim=True) / 127  # (M, 1)
    c_w = w.abs().amax(dim=1, keepdim=True) / 127  # (N, 1)
    q_x = torch.round(x / c_x).clamp(-127, 127).long()
    q_w = torch.round(w / c_w).clamp(-127, 127).long()
    return (q_x @ q_w.T).float() * c_x * c_w.T


def test_vectorwise_integer_path_matches_definition():
    x, w = with_outliers()
    torch.testing.assert_close(vectorwise_matmul(x, w), reference_vectorwise(x, w), rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 40), N=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_integer_and_simulated_paths_agree(M, K, N, seed):
    x, w = with_outliers(M, max(K, 18), N, seed)
    exact = vectorwise_matmul(x, w)
    simulated = vectorwise_matmul(x, w, simulate=True)
    torch.testing.assert_close(simulated, exact, rtol=1e-5, atol=1e-5)
    for threshold in (0.5, 6.0, math.inf):
        torch.testing.assert_close(
            llm_int8_matmul(x, w, threshold, simulate=True),
            llm_int8_matmul(x, w, threshold),
            rtol=1e-5,
            atol=1e-5,
        )


def test_threshold_inf_is_the_plain_int8_path():
    x, w = with_outliers()
    assert torch.equal(llm_int8_matmul(x, w, math.inf), vectorwise_matmul(x, w))


def test_threshold_zero_is_the_float_matmul():
    x, w = with_outliers()
    torch.testing.assert_close(llm_int8_matmul(x, w, 0.0), x @ w.T, rtol=1e-6, atol=1e-6)


def test_decomposition_equals_float_part_plus_int8_part():
    x, w = with_outliers()
    cols = outlier_columns(x, 6.0)
    assert cols.nonzero().flatten().tolist() == [3, 17]
    expected = x[:, cols] @ w[:, cols].T + reference_vectorwise(x[:, ~cols], w[:, ~cols])
    torch.testing.assert_close(llm_int8_matmul(x, w, 6.0), expected, rtol=1e-6, atol=1e-6)


def test_decomposition_helps_with_outliers():
    x, w = with_outliers(M=64, K=256, N=32)
    exact = x @ w.T
    error_int8 = (vectorwise_matmul(x, w) - exact).pow(2).mean()
    error_mixed = (llm_int8_matmul(x, w, 6.0) - exact).pow(2).mean()
    assert error_mixed < error_int8 / 4


def test_outlier_channels_rules():
    absmax = torch.tensor([1.0, 1.2, 0.9, 6.5, 1.1, 0.01])
    assert outlier_channels(absmax).tolist() == [False, False, False, True, False, False]
    small = torch.tensor([0.01, 0.012, 0.011, 0.3])  # far above the median, below 6
    assert outlier_channels(small).tolist() == [False, False, False, True]
    assert outlier_channels(small, ratio=math.inf).tolist() == [False] * 4


# ---------------------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------------------


def test_smooth_scales_formula():
    act = torch.tensor([16.0, 1.0, 0.0])
    w1 = torch.tensor([[1.0, -4.0, 2.0]])
    w2 = torch.tensor([[-9.0, 1.0, 0.5]])
    s = smooth_scales(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([16.0**0.5 / 9.0**0.5, 1.0 / 4.0**0.5, 1e-5**0.5 / 2.0**0.5])
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(smooth_scales(act, w1, alpha=1.0), act.clamp(min=1e-5))
    torch.testing.assert_close(smooth_scales(act, w1, alpha=0.0), 1 / w1.abs()[0])


def test_smoothing_preserves_the_product_and_equalises_ranges():
    x, w = with_outliers(M=64)
    act_absmax = x.abs().amax(dim=0)
    s = smooth_scales(act_absmax, w, alpha=0.5)
    x_s, w_s = x / s, w * s
    torch.testing.assert_close(x_s @ w_s.T, x @ w.T, rtol=1e-5, atol=1e-5)
    # alpha = 0.5: both smoothed ranges equal sqrt(max|X_j| max|W_j|) in every channel
    torch.testing.assert_close(x_s.abs().amax(dim=0), w_s.abs().amax(dim=0), rtol=1e-5, atol=0)
    assert x_s.abs().amax() < x.abs().amax() / 5


def test_smooth_linear_in_place():
    linear = nn.Linear(3, 2)
    before = linear.weight.detach().clone()
    s = torch.tensor([2.0, 0.5, 1.0])
    smooth_linear(linear, s)
    torch.testing.assert_close(linear.weight.detach(), before * s)


def test_smooth_layernorm_linears_preserves_the_function():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(8) + 0.5)
        ln.bias.copy_(torch.randn(8))
    q, k, v = (nn.Linear(8, 4) for _ in range(3))
    x = torch.randn(10, 8) * torch.tensor([1.0, 40.0, 1, 1, 1, 1, 1, 1])
    before = [lin(ln(x)) for lin in (q, k, v)]
    act_absmax = ln(x).abs().amax(dim=0).detach()
    s = smooth_layernorm_linears(ln, [q, k, v], act_absmax)
    for lin, ref in zip((q, k, v), before, strict=True):
        torch.testing.assert_close(lin(ln(x)), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, smooth_scales(act_absmax, [q.weight / s, k.weight / s, v.weight / s]))


# ---------------------------------------------------------------------------------------------------------
# Activation capture
# ---------------------------------------------------------------------------------------------------------


def toy_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))


def test_capture_absmax_and_inputs():
    model = toy_model()
    data = [torch.randn(2, 5, 4), torch.randn(3, 4)]
    absmax = capture_activations(model, data)
    inputs = capture_activations(model, data, stat="inputs")
    assert set(absmax) == {"0", "2"}
    assert inputs["0"].shape == (13, 4)
    torch.testing.assert_close(inputs["0"], torch.cat([data[0].reshape(-1, 4), data[1]]))
    torch.testing.assert_close(absmax["0"], inputs["0"].abs().amax(dim=0))
    hidden = model[1](model[0](inputs["0"]))
    torch.testing.assert_close(inputs["2"], hidden)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_capture_with_observer_factory_and_callable():
    model = toy_model()
    x = torch.randn(7, 4)
    observers = capture_activations(model, lambda: model(x), lambda n, m: n == "0", stat=MinMaxObserver)
    assert list(observers) == ["0"]
    assert observers["0"].range() == (x.min(), x.max())


def test_capture_removes_hooks_on_error():
    model = toy_model()
    with pytest.raises(RuntimeError):
        capture_activations(model, [torch.randn(2, 5)])  # wrong width
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# FakeQuantLinear and the module surgery
# ---------------------------------------------------------------------------------------------------------


def test_calibrating_layer_computes_in_float():
    linear = nn.Linear(6, 3)
    layer = FakeQuantLinear(linear, LinearQuantConfig(smooth_alpha=0.5), smooth=torch.rand(6) + 0.5)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-6)
    assert layer.observer.batches == 1


def test_static_w8a8_matches_manual_fake_quantization():
    linear = nn.Linear(6, 3)
    x = torch.randn(20, 6)
    layer = FakeQuantLinear(linear, LinearQuantConfig())
    layer(x)
    layer.freeze()
    obs = MinMaxObserver(spec=INT8)
    obs(x)
    w_scale = linear.weight.abs().max() / 127
    w_hat = fake_quantize(linear.weight.detach(), w_scale, 0, -127, 127)
    expected = nn.functional.linear(fake_quantize(x, *obs.qparams(), -128, 127), w_hat, linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_weight_only_and_float_configs():
    linear = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    float_layer = FakeQuantLinear(linear, LinearQuantConfig(weight=None, activation=None))
    float_layer.freeze()
    torch.testing.assert_close(float_layer(x), linear(x))
    weights_only = LinearQuantConfig(activation=None, weight_granularity=PerChannel(0))
    per_channel = FakeQuantLinear(linear, weights_only)
    w_scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    w_hat = fake_quantize(linear.weight.detach(), w_scale, 0, -127, 127)
    torch.testing.assert_close(per_channel(x), nn.functional.linear(x, w_hat, linear.bias))


def test_dynamic_layer_is_llm_int8_and_counts_routed_features():
    linear = nn.Linear(32, 8)
    x, _ = with_outliers(M=12)
    layer = FakeQuantLinear(linear, dataclass_replace(VECTORWISE, threshold=6.0))
    layer.freeze()
    out = layer(x.reshape(3, 4, 32))
    expected = llm_int8_matmul(x, linear.weight.detach(), 6.0) + linear.bias
    torch.testing.assert_close(out.reshape(12, 8), expected, rtol=1e-5, atol=1e-5)
    assert (layer.routed, layer.seen) == (2, 32)


def dataclass_replace(config: LinearQuantConfig, **changes) -> LinearQuantConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_quantize_and_restore_round_trip():
    model = toy_model()
    x = torch.randn(9, 4)
    before = model(x)
    config = LinearQuantConfig(observer=functools.partial(PercentileObserver, percentile=99.0))
    layers = quantize_linears(model, config, module_filter=lambda name, m: name == "2")
    assert list(layers) == ["2"] and isinstance(model[2], FakeQuantLinear) and isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), before)  # calibrating: float
    layers["2"].freeze()
    assert not torch.allclose(model(x), before, rtol=0, atol=1e-7)  # quantized now
    restore_linears(model)
    assert isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), before)


def test_repr_names_the_observer():
    config = LinearQuantConfig(observer=functools.partial(PercentileObserver))
    layer = FakeQuantLinear(nn.Linear(2, 3), config)
    assert "inputs=PercentileObserver" in repr(layer)
    assert "inputs=dynamic per-token" in repr(FakeQuantLinear(nn.Linear(2, 3), VECTORWISE))


def test_smoothquant_layers_need_statistics():
    model = toy_model()
    with pytest.raises(ValueError, match="needs act_absmax for every layer"):
        quantize_linears(model, LinearQuantConfig(smooth_alpha=0.5))
    absmax = capture_activations(model, [torch.randn(8, 4)])
    layers = quantize_linears(model, LinearQuantConfig(smooth_alpha=0.5), act_absmax=absmax)
    torch.testing.assert_close(layers["0"].smooth, smooth_scales(absmax["0"], model[0].linear.weight, 0.5))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: llm_int8_matmul(torch.ones(2, 3), torch.ones(4, 2)), ValueError, "same K"),
        (
            lambda: llm_int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(4, 3)),
            TypeError,
            "x must be",
        ),
        (lambda: llm_int8_matmul(torch.full((1, 2), math.nan), torch.ones(1, 2)), ValueError, "NaN"),
        (
            lambda: llm_int8_matmul(torch.ones(1, 2), torch.ones(1, 2), -1.0),
            ValueError,
            "threshold must be >= 0",
        ),
        (lambda: outlier_columns(torch.ones(1, 2), math.nan), ValueError, "threshold must be a number"),
        (lambda: outlier_columns(torch.ones(1, 2), "6"), ValueError, "threshold must be a number"),
        (lambda: outlier_channels(torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
        (lambda: outlier_channels(torch.ones(2, 2)), ValueError, "1-D tensor"),
        (lambda: outlier_channels(torch.ones(2, dtype=torch.int32)), TypeError, "1-D floating-point"),
        (
            lambda: smooth_scales(torch.ones(3), torch.ones(2, 3), alpha=1.5),
            ValueError,
            r"alpha must be in \[0, 1\]",
        ),
        (lambda: smooth_scales(torch.ones(3), torch.ones(2, 4)), ValueError, "K = 3"),
        (lambda: smooth_scales(torch.ones(3), []), ValueError, "weights is empty"),
        (lambda: smooth_linear(nn.Linear(3, 2), torch.ones(2)), ValueError, r"shape \(3,\)"),
        (lambda: smooth_linear(nn.Linear(2, 2), torch.tensor([1.0, 0.0])), ValueError, "positive"),
        (lambda: smooth_layernorm_linears(nn.Identity(), [], torch.ones(2)), TypeError, "nn.LayerNorm"),
        (lambda: FakeQuantLinear(nn.Conv1d(1, 1, 1), LinearQuantConfig()), TypeError, "wraps an nn.Linear"),
        (
            lambda: FakeQuantLinear(nn.Linear(2, 2), VECTORWISE).observe(torch.ones(2)),
            RuntimeError,
            "no observer",
        ),
        (lambda: capture_activations(toy_model(), [], lambda n, m: False), ValueError, "selected no module"),
        (lambda: capture_activations(toy_model(), [], stat="max"), ValueError, "stat must be"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": "int8"}, TypeError, "weight must be a QuantSpec or None"),
        ({"activation": 8}, TypeError, "activation must be a QuantSpec or None"),
        ({"weight_granularity": "tensor"}, TypeError, "weight_granularity"),
        ({"observer": "minmax"}, TypeError, "observer must be"),
        ({"dynamic": True}, ValueError, "vector-wise scheme"),
        ({"threshold": 6.0}, ValueError, "needs dynamic=True"),
        ({"smooth_alpha": 2.0}, ValueError, "smooth_alpha must be in"),
        (
            {"weight": QuantSpec(4), "activation": None, "threshold": -2.0},
            ValueError,
            "threshold must be >= 0",
        ),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        LinearQuantConfig(**kwargs)


# FakeQuantLinear.to_integer: the simulation becomes chapter 7's integer module

PER_CHANNEL_W8A8 = LinearQuantConfig(weight_granularity=PerChannel(0))


def test_to_integer_static_matches_the_simulation_and_an_independent_integer_computation() -> None:
    import qbook.nn
    from qbook import int_matmul, quantize

    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = FakeQuantLinear(linear, PER_CHANNEL_W8A8)
    x = torch.randn(32, 16, dtype=torch.float64).float()
    layer(x)  # calibrate
    layer.freeze()
    integer = layer.to_integer()
    assert isinstance(integer, qbook.nn.QuantLinear) and "static" in repr(integer)
    simulated, exact = layer(x), integer(x)
    # the same products (exact int32 sums vs float sums of dequantized values); the integer module also
    # rounds the bias to its int32 grid of step s_x s_w[n] (chapter 9): at most half a step apart
    bound = integer.acc_scale / 2 + 1e-5 * simulated.abs() + 1e-6
    assert ((exact - simulated).abs() <= bound).all()
    # and the integer module is what quantize + int_matmul + one dequantization give by hand
    q = quantize(x, layer.scale, layer.zero_point, INT8.qmin, INT8.qmax)
    acc = int_matmul(q, integer.weight.T, a_zero_point=int(layer.zero_point))
    by_hand = (acc + integer.bias).float() * integer.acc_scale
    assert torch.equal(exact, by_hand)


def test_to_integer_dynamic_is_per_token() -> None:
    layer = FakeQuantLinear(nn.Linear(8, 4), VECTORWISE)
    integer = layer.to_integer()
    assert "per-token dyn" in repr(integer)
    x = torch.randn(5, 8, dtype=torch.float64).float()
    assert torch.allclose(integer(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FakeQuantLinear(nn.Linear(4, 2), LinearQuantConfig()), "per output channel"),  # per-tensor W
        (lambda: FakeQuantLinear(nn.Linear(4, 2), PER_CHANNEL_W8A8), "freeze"),  # not calibrated
        (
            lambda: FakeQuantLinear(nn.Linear(4, 2), dataclass_replace(VECTORWISE, threshold=6.0)),
            "decomposition",
        ),
        (lambda: FakeQuantLinear(nn.Linear(4, 2), PER_CHANNEL_W8A8, smooth=torch.ones(4)), "SmoothQuant"),
        (lambda: FakeQuantLinear(nn.Linear(4, 2), LinearQuantConfig(activation=None,
                                                                    weight_granularity=PerChannel(0))),
         "WeightOnlyLinear"),
    ],
)
def test_to_integer_refuses_schemes_the_integer_module_lacks(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make().to_integer()
