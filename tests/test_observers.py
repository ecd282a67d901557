"""Tests for qbook.observers against torch.ao, numpy and the published definitions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as tq

from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, fake_quantize
from qbook.granularity import PerChannel, PerGroup, PerTensor
from qbook.observers import (
    OBSERVERS,
    EntropyObserver,
    L2HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    StreamingHistogram,
    kl_divergence,
)


def batches(seed: int = 0, shape: tuple[int, ...] = (64, 6), n: int = 5) -> list[torch.Tensor]:
    """Batches whose range moves around (so streaming summaries must grow in both directions)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + 2 * i) + (i - 2) for i in range(n)]


def quant_mse(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> float:
    return float(((fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax) - x) ** 2).mean())


# ---------------------------------------------------------------------------------------------------------
# min/max and moving average: torch.ao is the reference
# ---------------------------------------------------------------------------------------------------------

TORCH_SCHEMES = [
    (INT8, torch.qint8, False),
    (QuantSpec(8, signed=False), torch.quint8, False),
    (QuantSpec(8, True, symmetric=True), torch.qint8, True),
    (QuantSpec(8, False, symmetric=True), torch.quint8, True),
]


@pytest.mark.parametrize(("spec", "dtype", "symmetric"), TORCH_SCHEMES)
def test_minmax_equals_torch_ao(spec, dtype, symmetric):
    ours = MinMaxObserver(spec=spec)
    ref = tq.MinMaxObserver(
        dtype=dtype, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    )
    for x in batches():
        ours(x)
        ref(x)
    scale, zero_point = ours.qparams()
    ref_scale, ref_zero_point = ref.calculate_qparams()
    assert scale.shape == () and zero_point.shape == ()
    torch.testing.assert_close(scale.reshape(1), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.reshape(1), ref_zero_point.to(torch.int32))


@pytest.mark.parametrize(("spec", "dtype", "symmetric"), TORCH_SCHEMES)
@pytest.mark.parametrize("axis", [0, 1])
def test_minmax_per_channel_equals_torch_ao(spec, dtype, symmetric, axis):
    ours = MinMaxObserver(spec=spec, granularity=PerChannel(axis))
    qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    ref = tq.PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, qscheme=qscheme)
    for x in batches(shape=(8, 6, 3)):
        ours(x)
        ref(x)
    scale, zero_point = ours.qparams()
    ref_scale, ref_zero_point = ref.calculate_qparams()
    assert scale.shape == PerChannel(axis).param_shape((8, 6, 3))
    torch.testing.assert_close(scale.flatten(), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.flatten(), ref_zero_point.to(torch.int32))


@pytest.mark.parametrize(("spec", "dtype", "symmetric"), TORCH_SCHEMES)
def test_moving_average_equals_torch_ao(spec, dtype, symmetric):
    ours = MovingAverageObserver(spec=spec)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    ref = tq.MovingAverageMinMaxObserver(averaging_constant=0.01, dtype=dtype, qscheme=qscheme)
    for x in batches(n=8):
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.range()[0].reshape(1), ref.min_val.reshape(1), rtol=1e-6, atol=1e-7)
    scale, zero_point = ours.qparams()
    ref_scale, ref_zero_point = ref.calculate_qparams()
    torch.testing.assert_close(scale.reshape(1), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.reshape(1), ref_zero_point.to(torch.int32))


def test_moving_average_per_channel_equals_torch_ao():
    ours = MovingAverageObserver(averaging_constant=0.1, granularity=PerChannel(1))
    ref = tq.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.1, ch_axis=1, dtype=torch.qint8)
    for x in batches(n=6):
        ours(x)
        ref(x)
    scale, zero_point = ours.qparams()
    ref_scale, ref_zero_point = ref.calculate_qparams()
    torch.testing.assert_close(scale.flatten(), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero_point.flatten(), ref_zero_point.to(torch.int32))


def test_moving_average_first_batch_sets_the_range():
    obs = MovingAverageObserver()
    obs(torch.tensor([-3.0, 5.0]))
    assert obs.range() == (torch.tensor(-3.0), torch.tensor(5.0))
    obs(torch.tensor([-3.0, 105.0]))
    assert obs.range()[1].item() == pytest.approx(6.0)  # 5 + 0.01 * (105 - 5)


# ---------------------------------------------------------------------------------------------------------
# The streaming histogram and the percentile observer: numpy is the reference
# ---------------------------------------------------------------------------------------------------------


def test_histogram_growth_is_exact():
    hist = StreamingHistogram(bins=64)
    data = batches(seed=1, shape=(1, 500), n=6)
    for x in data:
        hist.update(x)
    lo, width = hist.lo.item(), hist.width.item()
    every = torch.cat(data, dim=1).flatten().double().numpy()
    ref, edges = np.histogram(every, bins=64, range=(lo, lo + 64 * width))
    # Equal up to values lying on an edge (within rounding), e.g. the first batch's minimum, which was the
    # lowest edge before the range doubled downwards: which side of the edge they fall is rounding.
    on_edge = int((np.abs(every[:, None] - edges[None, :]) < 1e-9 * width).sum())
    assert np.abs(hist.counts[0].numpy() - ref).sum() <= 2 * on_edge
    assert on_edge <= 2
    assert hist.total.item() == every.size
    assert lo <= every.min() and every.max() <= lo + 64 * width
    assert hist.min.item() == every.min() and hist.max.item() == every.max()


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy_within_one_bin(p):
    obs = PercentileObserver(percentile=p, bins=512)
    data = batches(seed=2, shape=(4000,), n=4)
    for x in data:
        obs(x)
    every = torch.cat(data).double().numpy()
    lo, hi = obs.range()
    width = obs._state.hist.width.item()
    assert abs(hi.item() - np.percentile(every, p)) <= width
    assert abs(lo.item() - np.percentile(every, 100 - p)) <= width


def test_percentile_100_is_minmax():
    data = batches(seed=3)
    obs, ref = PercentileObserver(percentile=100.0), MinMaxObserver()
    for x in data:
        obs(x)
        ref(x)
    assert obs.range() == ref.range()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_batches=st.integers(1, 4),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    p=st.floats(50.0, 100.0),
)
def test_percentile_property(seed, n_batches, scales, p):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(200, generator=g) * scales[i] + scales[-1 - i] for i in range(n_batches)]
    obs = PercentileObserver(percentile=p, bins=256)
    for x in data:
        obs(x)
    every = torch.cat(data).double().numpy()
    width = obs._state.hist.width.item()
    assert (
        abs(obs.range()[1].item() - np.percentile(every, p)) <= width * (1 + 1e-9) + 1e-6 * abs(every).max()
    )


def test_percentile_per_channel_matches_numpy():
    obs = PercentileObserver(percentile=99.0, granularity=PerChannel(1), bins=256)
    data = batches(seed=4, shape=(300, 5))
    for x in data:
        obs(x)
    every = torch.cat(data).double().numpy()  # (N, 5)
    hi = obs.range()[1].flatten()
    widths = obs._state.hist.width
    for c in range(5):
        assert abs(hi[c].item() - np.percentile(every[:, c], 99.0)) <= widths[c].item()


# ---------------------------------------------------------------------------------------------------------
# MSE, L2 and entropy: their objectives and known optima
# ---------------------------------------------------------------------------------------------------------

HEAVY_TAILED = {
    "laplace": lambda g: torch.distributions.Laplace(0.0, 1.0).sample((20_000,)),
    "student_t": lambda g: torch.distributions.StudentT(3.0).sample((20_000,)),
    "skewed": lambda g: torch.distributions.LogNormal(0.0, 1.0).sample((20_000,)) - 1.0,
}


@pytest.mark.parametrize("dist", sorted(HEAVY_TAILED))
@pytest.mark.parametrize("spec", [INT8, INT8_SYMMETRIC, QuantSpec(4), QuantSpec(4, symmetric=True)])
@pytest.mark.parametrize("observer", [MSEObserver, L2HistogramObserver])
def test_search_observers_beat_minmax_on_heavy_tails(dist, spec, observer):
    torch.manual_seed(0)
    x = HEAVY_TAILED[dist](None)
    searched, minmax = observer(spec=spec), MinMaxObserver(spec=spec)
    searched(x)
    minmax(x)
    assert quant_mse(x, *searched.qparams(), spec) < quant_mse(x, *minmax.qparams(), spec)


def test_mse_observer_uniform_closed_form_unsigned():
    # U[0, 1] on [0, alpha] with 16 levels: MSE = 15 d^3/12 + (1 - alpha)^3 / 3, d = alpha / 15, minimised at
    # alpha = 30 / 31: the top level sits half a step inside the data.
    x = torch.linspace(0.0, 1.0, 200_001)
    obs = MSEObserver(spec=QuantSpec(4, signed=False), grid=31)
    obs(x)
    assert obs.range()[1].item() == pytest.approx(30 / 31, rel=1e-6)


def test_mse_observer_uniform_closed_form_symmetric():
    # U[-1, 1] on the 15 levels k * alpha / 7: minimised at alpha = 14 / 15 (outer cells fully used).
    x = torch.linspace(-1.0, 1.0, 200_001)
    obs = MSEObserver(spec=QuantSpec(4, narrow_range=True, symmetric=True), grid=15)
    obs(x)
    assert obs.range()[1].item() == pytest.approx(14 / 15, rel=1e-6)


def test_mse_observer_error_matches_direct_computation():
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    obs = MSEObserver(spec=QuantSpec(4))
    obs(x)
    direct = quant_mse(x, *obs.qparams(), QuantSpec(4))
    assert obs._state.error.item() == pytest.approx(direct, rel=0.05)


def naive_kl(counts: np.ndarray, stop: int, levels: int) -> float:
    """Migacz (2017) / MXNet's _get_optimal_threshold for one candidate, written as a loop."""
    p = counts[:stop].astype(np.float64).copy()
    p[stop - 1] += counts[stop:].sum()
    sliced = counts[:stop].astype(np.float64)
    size = stop // levels
    q = np.zeros(stop)
    for g in range(levels):
        start, end = g * size, (stop if g == levels - 1 else (g + 1) * size)
        nonzero = p[start:end] > 0
        if nonzero.sum():
            q[start:end][nonzero] = sliced[start:end].sum() / nonzero.sum()
    p, q = p / p.sum(), q / q.sum()
    if ((p > 0) & (q == 0)).any():
        return math.inf
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def test_kl_divergence_matches_naive_definition():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.exponential(20.0, size=(3, 96))).astype(np.int64)  # (G, B), with zeros
    counts[1, 40:60] = 0
    counts[2, -5:] = 0
    counts[2, 70] = 0
    stops = torch.arange(8, 97)
    ours = kl_divergence(torch.from_numpy(counts), stops, levels=8)  # (C, G)
    for c, stop in enumerate(stops.tolist()):
        for g in range(3):
            ref = naive_kl(counts[g], stop, 8)
            if math.isinf(ref):
                assert math.isinf(ours[c, g].item())
            else:
                assert ours[c, g].item() == pytest.approx(ref, abs=1e-10)


def test_kl_divergence_starved_candidate_is_infinite():
    counts = torch.tensor([[5, 5, 0, 0, 0, 3]])  # stop 4: only outliers in the last group
    assert math.isinf(kl_divergence(counts, torch.tensor([4]), levels=2).item())


def test_entropy_observer_picks_the_minimum_kl():
    torch.manual_seed(2)
    x = torch.cat([torch.distributions.Laplace(0.0, 1.0).sample((20_000,)), torch.tensor([60.0])])
    obs = EntropyObserver(spec=INT8_SYMMETRIC, stride=16)
    obs(x)
    kl = obs.divergences()[:, 0]
    best = int(kl.argmin())
    assert kl[best] < kl[-1]  # never worse than the untrimmed range (the last candidate)
    width = obs._state.hist.width.item()
    threshold = obs.candidates()[best].item() * width
    assert obs.range()[1].item() == pytest.approx(threshold, rel=1e-6)
    assert obs.range()[1].item() < x.max().item()
    naive = [naive_kl(obs._state.hist.counts[0].numpy(), s, obs.levels) for s in obs.candidates().tolist()]
    assert obs.candidates()[int(np.argmin(naive))].item() == obs.candidates()[best].item()


def test_entropy_stride_keeps_the_full_range_candidate():
    obs = EntropyObserver(bins=512, stride=100)
    assert obs.candidates().tolist() == [128, 228, 328, 428, 512]


# ---------------------------------------------------------------------------------------------------------
# Granularity: per channel / per group = per tensor on each slice
# ---------------------------------------------------------------------------------------------------------

ALL = [
    MinMaxObserver,
    MovingAverageObserver,
    PercentileObserver,
    MSEObserver,
    EntropyObserver,
    L2HistogramObserver,
]
HISTOGRAM = {PercentileObserver, MSEObserver, EntropyObserver, L2HistogramObserver}


def small(observer, **kwargs):
    """An observer with a 512-bin histogram where it has one (enough for these tests, and faster)."""
    return observer(**kwargs, **({"bins": 512} if observer in HISTOGRAM else {}))


@pytest.mark.parametrize("observer", ALL)
@pytest.mark.parametrize("spec", [INT8, INT8_SYMMETRIC, QuantSpec(4, signed=False)])
def test_per_channel_equals_per_tensor_on_each_channel(observer, spec):
    data = batches(seed=5, shape=(200, 4), n=3)
    per_channel = small(observer, spec=spec, granularity=PerChannel(1))
    for x in data:
        per_channel(x)
    scale, zero_point = per_channel.qparams()
    assert scale.shape == (1, 4)
    for c in range(4):
        alone = small(observer, spec=spec)
        for x in data:
            alone(x[:, c])
        ref_scale, ref_zero_point = alone.qparams()
        torch.testing.assert_close(scale[0, c], ref_scale, rtol=1e-6, atol=0)
        assert zero_point[0, c] == ref_zero_point


@pytest.mark.parametrize("observer", ALL)
def test_per_group_equals_per_tensor_on_each_group(observer):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 8, generator=g) * torch.arange(1.0, 9.0)  # (N, K)
    obs = small(observer, granularity=PerGroup(axis=1, group_size=4))
    obs(x)
    xmin, xmax = obs.range()
    assert xmin.shape == (3, 2)
    for n in range(3):
        for k in range(2):
            alone = small(observer)
            alone(x[n, 4 * k : 4 * k + 4])
            ref_min, ref_max = alone.range()
            torch.testing.assert_close(xmin[n, k], ref_min, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(xmax[n, k], ref_max, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    name=st.sampled_from(sorted(OBSERVERS)),
)
def test_any_bit_width_gives_valid_qparams(bits, signed, symmetric, name):
    if name == "entropy":
        bits = min(bits, 12)  # 2^(bits - 1) levels must fit the 2048 bins
    spec = QuantSpec(bits, signed, symmetric=symmetric)
    obs = OBSERVERS[name](spec=spec)
    for x in batches(seed=bits, n=2):
        obs(x)
    scale, zero_point = obs.qparams()
    xmin, xmax = obs.range()
    assert xmin <= xmax
    assert scale > 0 and spec.qmin <= zero_point <= spec.qmax


# ---------------------------------------------------------------------------------------------------------
# API behaviour and bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("observer", ALL)
def test_observe_returns_input_and_counts_batches(observer):
    obs = observer()
    x = torch.randn(10)
    assert obs(x) is x and obs.observe(x) is x
    assert obs.batches == 2
    obs.reset()
    assert obs.batches == 0
    with pytest.raises(RuntimeError, match=observer.__name__):
        obs.qparams()


@pytest.mark.parametrize("observer", ALL)
def test_config_is_frozen(observer):
    obs = observer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.spec = INT8_SYMMETRIC


@pytest.mark.parametrize("observer", ALL)
def test_qparams_before_data(observer):
    with pytest.raises(RuntimeError, match=f"{observer.__name__} has observed no data"):
        observer().qparams()


@pytest.mark.parametrize("observer", ALL)
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.tensor([]), ValueError, "empty batch"),
        (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
        (torch.tensor([1.0, float("inf")]), ValueError, "infinite"),
        (torch.tensor([1, 2]), TypeError, "floating-point tensors"),
        ([1.0, 2.0], TypeError, "floating-point tensors, got list"),
    ],
)
def test_bad_batches(observer, x, error, match):
    with pytest.raises(error, match=match):
        observer()(x)


@pytest.mark.parametrize("observer", ALL)
def test_shape_change_between_batches(observer):
    obs = observer(granularity=PerChannel(1))
    obs(torch.randn(4, 3))
    obs(torch.randn(7, 3))  # more rows, same channels: fine
    with pytest.raises(ValueError, match=r"parameter shape changed from \(1, 3\) to \(1, 5\)"):
        obs(torch.randn(4, 5))


def test_per_tensor_accepts_any_shape():
    obs = PercentileObserver()
    obs(torch.randn(4, 3))
    obs(torch.randn(10))
    assert obs.range()[0].shape == ()


@pytest.mark.parametrize("p", [0, -1.0, 100.5, float("nan"), "99", True])
def test_bad_percentile(p):
    with pytest.raises(ValueError, match="percentile must be in"):
        PercentileObserver(percentile=p)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PercentileObserver(bins=7), "bins must be an even int"),
        (lambda: MSEObserver(bins=0), "bins must be an even int"),
        (lambda: StreamingHistogram(bins=3), "bins must be an even int"),
        (lambda: MSEObserver(grid=0), "grid must be a positive int"),
        (lambda: L2HistogramObserver(steps=0), "steps must be a positive int"),
        (lambda: EntropyObserver(stride=0), "stride must be a positive int"),
        (lambda: EntropyObserver(bins=64), r"bins \(64\) must be at least the 128 levels"),
        (lambda: MovingAverageObserver(averaging_constant=0.0), r"averaging_constant must be in \(0, 1\]"),
        (lambda: MovingAverageObserver(averaging_constant=1.5), r"averaging_constant must be in \(0, 1\]"),
    ],
)
def test_bad_config_values(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "int8"}, "spec must be a QuantSpec"),
        ({"granularity": 0}, "granularity must be PerTensor, PerChannel or PerGroup"),
    ],
)
def test_bad_config_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MinMaxObserver(**kwargs)


def test_kl_divergence_bad_stops():
    with pytest.raises(ValueError, match=r"every stop must lie in \[levels, bins\] = \[4, 8\]"):
        kl_divergence(torch.ones(1, 8, dtype=torch.int64), torch.tensor([3, 9]), levels=4)


def test_histogram_row_count_change():
    hist = StreamingHistogram(bins=8)
    hist.update(torch.randn(2, 5))
    with pytest.raises(ValueError, match="expected 2 rows"):
        hist.update(torch.randn(3, 5))


def test_constant_first_batch_then_growth():
    obs = PercentileObserver(percentile=50.0, bins=16)
    obs(torch.zeros(10))
    obs(torch.tensor([-1.0, 1.0, 3.0]))
    hist = obs._state.hist
    assert abs(obs.range()[1].item() - 0.0) <= hist.width.item()  # the median is 0
    assert hist.lo.item() <= -1.0 and hist.lo.item() + 16 * hist.width.item() >= 3.0
    assert hist.total.item() == 13


def test_per_tensor_is_default_granularity():
    assert MinMaxObserver().granularity == PerTensor()


def test_the_base_observer_is_abstract():
    from qbook.observers import Observer

    with pytest.raises(TypeError, match="abstract"):
        Observer()
