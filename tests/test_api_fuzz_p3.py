"""Hypothesis tests over the public API of observers, outliers, models and data (issue 8 §5).

On any input: only ``ValueError``, ``TypeError`` or ``OverflowError`` (or the documented ``RuntimeError`` for
asking an observer before it has seen data); observers never return a zero point outside ``[qmin, qmax]`` or a
scale that is not positive and finite; inputs are never modified in place.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from qbook.affine import QuantSpec
from qbook.data import is_sentence
from qbook.granularity import PerChannel, PerGroup, PerTensor
from qbook.models import embedding_agreement
from qbook.observers import OBSERVERS, StreamingHistogram, kl_divergence
from qbook.outliers import (
    FakeQuantLinear,
    LinearQuantConfig,
    llm_int8_matmul,
    outlier_channels,
    outlier_columns,
    smooth_layernorm_linears,
    smooth_scales,
    vectorwise_matmul,
)

ALLOWED = (ValueError, TypeError, OverflowError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values that break things: zeros, subnormals, the float32 extremes, NaN, inf
SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.7e38, -1.7e38, math.nan, math.inf, -math.inf]
floats32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL))
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
dtypes = st.sampled_from(
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool]
)


@st.composite
def tensors(draw, dims=(0, 1, 2, 3), max_side=6, elements=floats32, dtype=dtypes):
    ndim = draw(st.sampled_from(dims))
    shape = tuple(draw(st.integers(0 if ndim else 1, max_side)) for _ in range(ndim))
    values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    target = draw(dtype)
    if target in (torch.int32, torch.bool):
        return torch.nan_to_num(t, posinf=1.0, neginf=-1.0).clamp(-1e6, 1e6).to(target)
    with torch.no_grad():
        return t.to(target)


specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 16),
    signed=st.booleans(),
    narrow_range=st.booleans(),
    symmetric=st.booleans(),
)
granularities = st.sampled_from([PerTensor(), PerChannel(0), PerChannel(-1), PerGroup(0, 2)])


def fast_observer(cls: type, spec: QuantSpec, granularity, bins: int):
    """The observer with a small histogram (the search cost grows with bins; the logic does not change)."""
    kwargs = {"spec": spec, "granularity": granularity}
    if cls.__name__ in ("PercentileObserver", "MSEObserver", "EntropyObserver", "L2HistogramObserver"):
        kwargs["bins"] = bins
    if cls.__name__ == "L2HistogramObserver":
        kwargs["steps"] = 16
    if cls.__name__ == "MSEObserver":
        kwargs["grid"] = 20
    return cls(**kwargs)


def snapshot(values):
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in values]


def assert_unchanged(before, after):
    for b, a in zip(before, after, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())


FINITE_SPECIAL = [v for v in SPECIAL if math.isfinite(v)]


@st.composite
def observer_batches(draw):
    """Mostly batches an observer accepts (one shape that every granularity can cut, finite values, any float
    dtype); sometimes anything at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(tensors(), min_size=1, max_size=3))
    shape = (draw(st.sampled_from([2, 4])), draw(st.integers(1, 6)))
    elements = st.one_of(finite32, st.sampled_from(FINITE_SPECIAL), st.floats(-4, 4, width=32))
    floats = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    make = st.builds(
        lambda dtype, values: torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype),
        floats,
        st.lists(elements, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
    )
    return draw(st.lists(make, min_size=1, max_size=3))


@pytest.mark.parametrize("cls", list(OBSERVERS.values()), ids=list(OBSERVERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=observer_batches(),
    spec=specs,
    granularity=granularities,
    bins=st.sampled_from([2, 4, 16, 256]),
)
def test_observers_fuzz(cls, batches, spec, granularity, bins):
    try:
        obs = fast_observer(cls, spec, granularity, bins)
    except ALLOWED:
        return
    before = snapshot(batches)
    seen = 0
    for x in batches:
        try:
            assert obs(x) is x
            seen += 1
        except ALLOWED:
            pass
    assert_unchanged(before, batches)
    assert obs.batches == seen
    if seen == 0:
        event("no batch accepted")
        with pytest.raises(RuntimeError, match="observed no data"):
            obs.qparams()
        return
    try:
        scale, zero_point = obs.qparams()
    except ALLOWED as e:
        event(f"qparams raised {type(e).__name__}")
        return
    event("qparams returned")
    xmin, xmax = obs.range()
    assert torch.isfinite(xmin).all() and torch.isfinite(xmax).all() and (xmin <= xmax).all()
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert torch.isfinite(scale).all() and (scale > 0).all(), scale
    assert ((zero_point >= spec.qmin) & (zero_point <= spec.qmax)).all(), (zero_point, spec)


@FUZZ
@given(
    rows=st.lists(tensors(dims=(0, 1, 2, 3)), min_size=1, max_size=3),
    bins=st.sampled_from([2, 4, 64]),
    p=st.one_of(st.floats(allow_nan=True), st.sampled_from([0, 50, 100, 37.5])),
)
def test_streaming_histogram_fuzz(rows, bins, p):
    hist = StreamingHistogram(bins)
    before = snapshot(rows)
    seen = 0
    for r in rows:
        try:
            hist.update(r)
            seen += r.numel()
        except ALLOWED:
            pass
    assert_unchanged(before, rows)
    if hist.counts is None:
        return
    assert int(hist.counts.sum()) == seen and (hist.counts >= 0).all()
    try:
        value = hist.percentile(p)
    except ALLOWED:
        return
    assert ((hist.min <= value) & (value <= hist.max)).all()


@FUZZ
@given(
    counts=tensors(dims=(1, 2, 3), elements=finite32, dtype=st.sampled_from([torch.float32, torch.int32])),
    stops=st.lists(st.integers(-2, 10), max_size=4),
    levels=st.one_of(st.integers(-1, 6), st.just("2")),
)
def test_kl_divergence_fuzz(counts, stops, levels):
    before = snapshot([counts])
    try:
        kl = kl_divergence(counts, torch.tensor(stops, dtype=torch.int64), levels)
    except ALLOWED:
        return
    finally:
        assert_unchanged(before, [counts])
    assert kl.shape == (len(stops), counts.shape[0])
    assert ((kl >= 0) | kl.isnan()).all()  # nan only where a row has no data at all
    assert not (kl.isnan() & (counts.sum(dim=1) > 0)[None, :]).any()


thresholds = st.one_of(st.floats(allow_nan=True), st.sampled_from([0.0, 6.0, math.inf]), st.just("6"))


@st.composite
def matmul_operands(draw):
    """Mostly well-formed ``x (M, K)``, ``weight (N, K)`` of one float dtype; sometimes anything."""
    if draw(st.booleans()):
        return draw(tensors(dims=(1, 2, 3))), draw(tensors(dims=(1, 2, 3)))
    M, N, K = (draw(st.integers(1, 5)) for _ in range(3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    elements = draw(st.sampled_from([floats32, finite32, st.floats(-10, 10, width=32)]))
    x = torch.tensor(draw(st.lists(elements, min_size=M * K, max_size=M * K))).reshape(M, K).to(dtype)
    w = torch.tensor(draw(st.lists(elements, min_size=N * K, max_size=N * K))).reshape(N, K).to(dtype)
    return x, w


@FUZZ
@given(operands=matmul_operands(), threshold=thresholds, simulate=st.booleans())
def test_llm_int8_fuzz(operands, threshold, simulate):
    x, w = operands
    before = snapshot([x, w])
    calls = (lambda: llm_int8_matmul(x, w, threshold, simulate=simulate), lambda: vectorwise_matmul(x, w))
    for call in calls:
        try:
            out = call()
        except ALLOWED:
            continue
        finally:
            assert_unchanged(before, [x, w])
        assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == x.dtype


@FUZZ
@given(x=tensors(dims=(0, 1, 2, 3)), threshold=thresholds, ratio=thresholds)
def test_outlier_masks_fuzz(x, threshold, ratio):
    before = snapshot([x])
    try:
        mask = outlier_columns(x, threshold)
        assert mask.dtype == torch.bool and mask.shape == x.shape[1:]
    except ALLOWED:
        pass
    try:
        mask = outlier_channels(x, threshold, ratio)
        assert mask.dtype == torch.bool and mask.shape == x.shape
    except ALLOWED:
        pass
    assert_unchanged(before, [x])


@FUZZ
@given(
    act=tensors(dims=(0, 1, 2)),
    weights=st.lists(tensors(dims=(1, 2)), min_size=0, max_size=2),
    alpha=st.one_of(st.floats(allow_nan=True), st.sampled_from([0, 0.5, 1])),
)
def test_smooth_scales_fuzz(act, weights, alpha):
    before = snapshot([act, *weights])
    try:
        s = smooth_scales(act, weights, alpha)
    except ALLOWED:
        return
    finally:
        assert_unchanged(before, [act, *weights])
    assert s.shape == act.shape and s.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all(), s


@FUZZ
@given(act=tensors(dims=(1,)), alpha=st.sampled_from([0.0, 0.5, 1.0]))
def test_smooth_layernorm_linears_fuzz(act, alpha):
    ln, fc = nn.LayerNorm(3), nn.Linear(3, 2)
    weights = [ln.weight.detach().clone(), ln.bias.detach().clone(), fc.weight.detach().clone()]
    try:
        s = smooth_layernorm_linears(ln, [fc], act, alpha)
    except ALLOWED:  # nothing may have changed
        assert_unchanged(weights, [ln.weight.detach(), ln.bias.detach(), fc.weight.detach()])
        return
    assert torch.isfinite(s).all() and (s > 0).all()


@FUZZ
@given(x=tensors(), smooth=st.one_of(st.none(), tensors(dims=(1,))))
def test_quant_linear_fuzz(x, smooth):
    try:
        layer = FakeQuantLinear(nn.Linear(3, 2), LinearQuantConfig(), smooth=smooth)
    except ALLOWED:
        return
    before = snapshot([x])
    try:
        out = layer(x)
        layer.freeze()
        out = layer(x)
    except ALLOWED:
        return
    finally:
        assert_unchanged(before, [x])
    assert out.shape == (*x.shape[:-1], 2)


@FUZZ
@given(
    ref=tensors(dims=(1, 2, 3)),
    test=tensors(dims=(1, 2, 3)),
    k=st.one_of(st.integers(-1, 7), st.just(1.5)),
)
def test_embedding_agreement_fuzz(ref, test, k):
    before = snapshot([ref, test])
    try:
        out = embedding_agreement(ref, test, k)
    except ALLOWED:
        return
    finally:
        assert_unchanged(before, [ref, test])
    assert -1 - 1e-6 <= out["cosine_min"] <= out["cosine_mean"] <= 1 + 1e-6
    assert 0 <= out["top1"] <= 1 and 0 <= out[f"top{k}"] <= 1


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.integers(), st.none(), st.binary(max_size=10)))
def test_is_sentence_fuzz(text):
    try:
        result = is_sentence(text)
    except ALLOWED:
        assert not isinstance(text, str)
        return
    assert isinstance(result, bool)
