"""Regression tests for the package defects of issue 8 §5 in observers, outliers, models and data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qbook.affine import QuantSpec, fake_quantize
from qbook.granularity import PerChannel
from qbook.observers import (
    OBSERVERS,
    L2HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    StreamingHistogram,
    kl_divergence,
)
from qbook.outliers import (
    FakeQuantLinear,
    LinearQuantConfig,
    llm_int8_matmul,
    quantize_linears,
    smooth_layernorm_linears,
    smooth_linear,
    smooth_scales,
    vectorwise_matmul,
)

ALL = list(OBSERVERS.values())
SYMMETRIC = QuantSpec(8, symmetric=True)

# ---------------------------------------------------------------------------------------------------------
# Finite data whose range overflows float32
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("observer", ALL)
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, signed=False), QuantSpec(4), SYMMETRIC])
def test_finite_data_wider_than_float32_gets_usable_parameters(observer, spec):
    """xmax - xmin = 6e38 is not a float32; calc_qparams still gives a finite scale, and so do the observers
    (L2HistogramObserver used to fail with an index error, MSEObserver with an unrelated scale error)."""
    obs = observer(spec=spec)
    x = torch.tensor([-3e38, 3e38, 1.0])
    obs(x)
    scale, zero_point = obs.qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert spec.qmin <= int(zero_point) <= spec.qmax
    xmin, xmax = obs.range()
    assert x.min() <= xmin <= 0.0 <= xmax <= x.max()


@pytest.mark.parametrize("observer", [MSEObserver, L2HistogramObserver])
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4)])
def test_range_search_on_huge_data_stays_finite(observer, spec):
    """Bins past float32's range, and grid levels that overflow it, must not turn the search into NaN."""
    x = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e37,
                   torch.tensor([-3.4e38, 3.4e38])])
    obs = observer(spec=spec)
    obs(x)
    scale, zero_point = obs.qparams()
    assert math.isfinite(obs._state.error.item())
    x_hat = fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    error = ((x_hat.double() - x.double()) ** 2).mean().item()
    assert math.isfinite(error)
    assert error == pytest.approx(obs._state.error.item(), rel=0.05)  # the histogram's estimate


def test_huge_data_per_channel():
    obs = L2HistogramObserver(granularity=PerChannel(0))
    obs(torch.tensor([[1.0, 2.0], [-3e38, 3e38]]))
    scale, _ = obs.qparams()
    assert torch.isfinite(scale).all() and scale.shape == (2, 1)


@pytest.mark.parametrize("observer", ALL)
def test_float64_data_beyond_float32_is_named(observer):
    with pytest.raises(ValueError, match=r"1e\+300 in magnitude.*beyond float32's range"):
        observer()(torch.tensor([1.0, -1e300], dtype=torch.float64))


@pytest.mark.parametrize("observer", ALL)
def test_rejected_batch_leaves_the_observer_unchanged(observer):
    obs = observer()
    with pytest.raises(ValueError, match="1 NaN and 1 infinite"):
        obs(torch.tensor([[1.0, math.nan], [math.inf, 2.0]]))
    assert obs.batches == 0
    obs(torch.tensor([1.0, 2.0, 3.0]))  # the bad batch's shape was not recorded
    assert obs.range()[1].shape == ()


# ---------------------------------------------------------------------------------------------------------
# StreamingHistogram and kl_divergence on bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda h: h.update(torch.ones(3)), ValueError, r"rows \(G, n\).*\(3,\)"),
        (lambda h: h.update(torch.ones(1, 0)), ValueError, r"G, n >= 1"),
        (lambda h: h.update(torch.ones(1, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda h: h.update(torch.tensor([[1.0, math.nan]])), ValueError, "1 NaN"),
        (lambda h: h.update(torch.tensor([[1.0, math.inf]])), ValueError, "1 infinite"),  # it used to hang
        (lambda h: h.percentile(50.0), RuntimeError, "no data yet"),
        (lambda h: h.total, RuntimeError, "no data yet"),
    ],
)
def test_streaming_histogram_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(StreamingHistogram(bins=4))


def test_streaming_histogram_bad_queries():
    h = StreamingHistogram(bins=4)
    h.update(torch.ones(2, 3))
    for p in (-1.0, 100.5, math.nan, "50"):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 100\]"):
            h.percentile(p)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        h.order_statistic(torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        h.order_statistic(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="origin must be None or a finite number"):
        StreamingHistogram(bins=4, origin=math.nan)


@pytest.mark.parametrize(
    ("counts", "stops", "levels", "error", "match"),
    [
        (torch.ones(1, 4), [4], 0, ValueError, "levels must be a positive int"),
        (torch.ones(4), [4], 2, ValueError, r"counts must be 2-D \(G, B\)"),
        (-torch.ones(1, 4), [4], 2, ValueError, "non-negative"),
        (torch.tensor([[1.0, math.nan, 1.0, 1.0]]), [4], 2, ValueError, "finite"),
        (torch.ones(1, 4, dtype=torch.bool), [4], 2, TypeError, "real number tensor"),
        (torch.ones(1, 4), [], 2, ValueError, "at least one stop"),
        (torch.ones(1, 4), [2.5], 2, TypeError, "integers"),
    ],
)
def test_kl_divergence_bad_input(counts, stops, levels, error, match):
    with pytest.raises(error, match=match):
        kl_divergence(counts, torch.tensor(stops) if stops else torch.tensor([], dtype=torch.int64), levels)


# ---------------------------------------------------------------------------------------------------------
# LLM.int8() and SmoothQuant on bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matmul", [llm_int8_matmul, vectorwise_matmul])
def test_matmul_dtype_mismatch_is_a_type_error_naming_the_dtypes(matmul):
    with pytest.raises(TypeError, match=r"x torch.float32 and weight torch.float64"):
        matmul(torch.ones(2, 3), torch.ones(4, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("x", "w"),
    [((2, 3), (4, 2)), ((2, 3, 1), (4, 3)), ((2,), (4, 2)), ((0, 3), (4, 3)), ((2, 0), (4, 0))],
)
def test_matmul_shape_mismatch_is_a_value_error_naming_the_shapes(x, w):
    with pytest.raises(ValueError, match=rf"x {re_shape(x)} and weight {re_shape(w)}"):
        llm_int8_matmul(torch.ones(x), torch.ones(w))


def re_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_matmul_nonfinite_weight_and_float64_overflow():
    with pytest.raises(ValueError, match=r"weight \(1, 2\) contains 1 NaN"):
        llm_int8_matmul(torch.ones(1, 2), torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="beyond float32's range"):
        big = torch.full((1, 2), 1e300, dtype=torch.float64)
        vectorwise_matmul(big, torch.ones(1, 2, dtype=torch.float64))


def test_smooth_scales_nan_weight_names_the_tensor():
    weights = [torch.ones(2, 3), torch.tensor([[1.0, math.nan, 1.0]])]
    expected = r"weights\[1\] \(1, 3\) has 1 non-finite value\(s\), e.g. nan at \[0, 1\]"
    with pytest.raises(ValueError, match=expected):
        smooth_scales(torch.ones(3), weights)


def test_smooth_scales_nan_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[2].weight[0, 1] = math.nan
    config = LinearQuantConfig(smooth_alpha=0.5)
    absmax = {"0": torch.ones(3), "2": torch.ones(2)}
    with pytest.raises(ValueError, match=r"layer '2': weights\[0\] \(1, 2\) has 1 non-finite"):
        quantize_linears(model, config, act_absmax=absmax)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: smooth_scales(torch.ones(3), 5), TypeError, "weights must be a tensor"),
        (lambda: smooth_scales(torch.ones(3), torch.ones(2, 3, dtype=torch.int64)), TypeError, "floating"),
        (lambda: smooth_scales(torch.tensor([1e300, 1.0], dtype=torch.float64), torch.ones(1, 2)), ValueError,
         "beyond float32"),
        (lambda: smooth_linear("fc", torch.ones(3)), TypeError, "torch.nn.Linear, got str"),
        (lambda: smooth_linear(nn.Linear(3, 2), [1.0, 1.0, 1.0]), TypeError, "floating-point tensor"),
        (lambda: smooth_layernorm_linears(nn.LayerNorm(3), [nn.Linear(4, 2)], torch.ones(4)), ValueError,
         r"shape \(3,\) but the linears read 4"),
        (lambda: smooth_layernorm_linears(nn.LayerNorm(3), [nn.ReLU()], torch.ones(3)), TypeError,
         r"linears\[0\]"),
        (lambda: FakeQuantLinear(nn.Linear(3, 2), "W8A8"), TypeError, "LinearQuantConfig"),
        (
            lambda: FakeQuantLinear(nn.Linear(3, 2), LinearQuantConfig(), smooth=[1.0] * 3),
            TypeError,
            "smooth",
        ),
        (lambda: FakeQuantLinear(nn.Linear(3, 2), LinearQuantConfig())(torch.ones(2, 4)), ValueError,
         r"inputs \(\.\.\., 3\), got shape \(2, 4\)"),
        (lambda: quantize_linears("model", LinearQuantConfig()), TypeError, "torch.nn.Module"),
    ],
)
def test_outliers_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------


def test_is_sentence_needs_a_str():
    from qbook.data import is_sentence

    with pytest.raises(TypeError, match="text must be a str, got int"):
        is_sentence(5)


def test_embedding_agreement_shape_errors_are_value_errors():
    from qbook.models import embedding_agreement

    with pytest.raises(ValueError, match=r"ref must be 2-D \(n, d\) with d >= 1, got shape \(4,\)"):
        embedding_agreement(torch.ones(4), torch.ones(4))


def test_minmax_observer_unchanged_by_checks():
    obs = MinMaxObserver()
    obs(torch.tensor([-1.0, 0.5]))
    obs(torch.tensor([2.0]))
    assert [v.item() for v in obs.range()] == [-1.0, 2.0]
