"""Fuzzing P1's public API (affine, formats, granularity, roofline) with hypothesis (issue 8, section 5).

Whatever the arguments, a public function either returns or raises ``ValueError``, ``TypeError`` or
``OverflowError`` (never ``RuntimeError``, ``IndexError``, ...); quantization never returns a code outside
``[qmin, qmax]``; and no input tensor is modified in place.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbook import affine, formats, granularity, roofline

ALLOWED = (ValueError, TypeError, OverflowError)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 127.5, 1e-45, 1e-38, 3e38, -3e38, 1e30, math.inf, -math.inf, math.nan]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


@st.composite
def tensors(draw, dtypes=DTYPES, max_dims: int = 3) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=max_dims)))
    dtype = draw(st.sampled_from(dtypes))
    n = math.prod(shape)
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-1e6, 1e6, width=32),
                                     st.integers(-300, 300)), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return t.to(dtype)
    t = torch.nan_to_num(t, nan=0.0, posinf=200, neginf=-200).clamp(-(2**40), 2**40)
    return t.to(torch.int64).to(dtype)


scalars = st.one_of(st.sampled_from(SPECIAL), st.integers(-(2**70), 2**70),
                    st.sampled_from([True, None, "1", [1.0]]), st.floats(allow_nan=True, allow_infinity=True))
bounds = st.one_of(st.integers(-(2**33), 2**33),
                   st.sampled_from([-128, 127, 0, 255, -8, 7, -(2**31), 2**31 - 1]),
                   st.sampled_from([1.0, None, True, "3"]), tensors(max_dims=1))
granularities = st.one_of(st.none(), st.just(granularity.PerTensor()),
                          st.builds(granularity.PerChannel, st.integers(-4, 4)),
                          st.builds(granularity.PerGroup, st.integers(-4, 4), st.integers(1, 5)),
                          st.sampled_from(["per-tensor", 3]))
values = st.one_of(tensors(), scalars)


def snapshot(*args):
    return [(a, a.clone()) for a in args if isinstance(a, torch.Tensor)]


def unchanged(saved) -> bool:
    """Bit for bit (NaN payloads included)."""
    return all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in saved)


def call(fn, *args, **kwargs):
    saved = snapshot(*args, *kwargs.values())
    try:
        out = fn(*args, **kwargs)
    except ALLOWED:
        out = None
    assert unchanged(saved), f"{fn.__name__} modified an input"
    return out


def in_grid(q, qmin, qmax) -> bool:
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (qmin, qmax)):
        return True
    return q.numel() == 0 or (int(q.min()) >= qmin and int(q.max()) <= qmax)


@SETTINGS
@given(x=values, scale=values, zero_point=values, qmin=bounds, qmax=bounds, gran=granularities)
def test_quantize_family(x, scale, zero_point, qmin, qmax, gran):
    q = call(affine.quantize, x, scale, zero_point, qmin, qmax, granularity=gran)
    if q is not None:
        assert in_grid(q, qmin, qmax)
        call(affine.dequantize, q, scale, zero_point, granularity=gran)
    call(affine.fake_quantize, x, scale, zero_point, qmin, qmax, granularity=gran)
    call(affine.dequantize, x, scale, zero_point, granularity=gran)


@SETTINGS
@given(x=tensors(dtypes=[torch.float32]), qmin=st.integers(-(2**31), 2**31 - 2), width=st.integers(1, 2**32),
       scale=st.one_of(st.floats(1e-30, 1e30), tensors(dtypes=[torch.float32], max_dims=1)),
       zero_point=st.one_of(st.integers(-(2**31), 2**31 - 1),
                            tensors(dtypes=[torch.int32, torch.int8], max_dims=1)))
def test_codes_never_leave_the_grid(x, qmin, width, scale, zero_point):
    qmax = min(qmin + width, 2**31 - 1)
    q = call(affine.quantize, x, scale, zero_point, qmin, qmax)
    if q is not None:
        assert in_grid(q, qmin, qmax)


@SETTINGS
@given(xmin=values, xmax=values, qmin=bounds, qmax=bounds, symmetric=st.sampled_from([False, True, 1, None]))
def test_calc_qparams(xmin, xmax, qmin, qmax, symmetric):
    out = call(affine.calc_qparams, xmin, xmax, qmin, qmax, symmetric=symmetric)
    if out is not None:
        scale, zero_point = out
        assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
        assert in_grid(zero_point, qmin, qmax)


@SETTINGS
@given(x=tensors(dtypes=[torch.float32, torch.float64, torch.int8]),
       bits=st.sampled_from([2, 4, 8, 16, 1, 17, 8.0]), signed=st.sampled_from([True, False, 1]),
       gran=granularities)
def test_qtensor(x, bits, signed, gran):
    try:
        spec = affine.QuantSpec(bits, signed)
    except ALLOWED:
        return
    t = call(affine.QTensor.from_float, x, spec, gran)
    if t is not None:
        assert in_grid(t.q, spec.qmin, spec.qmax)
        call(t.dequantize)
        try:
            t.to_torch()
        except (*ALLOWED, RuntimeError):  # RuntimeError: a torch without quantized tensors (documented)
            pass


@SETTINGS
@given(x=values, y=values)
def test_sqnr_db(x, y):
    call(affine.sqnr_db, x, y)


fmts = st.one_of(st.sampled_from(formats.ALL), st.sampled_from(["FP16", None, 8]))


@SETTINGS
@given(x=values, fmt=fmts)
def test_format_rounding(x, fmt):
    for fn in (formats.round_to_format, formats.round_to_format_reference, formats.decompose, formats.encode,
               formats.ulp):
        call(fn, x, fmt)
    call(formats.finite_values, fmt)


@SETTINGS
@given(s=values, e=values, m=values, fmt=fmts)
def test_compose_and_decode(s, e, m, fmt):
    call(formats.compose, s, e, m, fmt)
    call(formats.decode, e, fmt)


@SETTINGS
@given(name=st.sampled_from(["x", 3]), E=st.one_of(st.integers(-1, 10), st.just(2.0)),
       M=st.one_of(st.integers(-1, 25), st.just(True)), bias=st.one_of(st.none(), st.integers(-300, 300),
                                                                         st.just(3.5)),
       has_inf=st.sampled_from([True, False, 0]), nan=st.sampled_from(["ieee", "all_ones", "none", "x"]),
       saturate=st.booleans(), x=tensors(dtypes=[torch.float32]))
def test_float_format(name, E, M, bias, has_inf, nan, saturate, x):
    try:
        fmt = formats.FloatFormat(name, E, M, bias=bias, has_inf=has_inf, nan=nan, saturate=saturate)
    except ALLOWED:
        return
    y = call(formats.round_to_format, x, fmt)
    if y is not None and fmt.total_bits <= 12:
        held = formats.decode(torch.arange(2**fmt.total_bits), fmt)
        ok = torch.isin(y.view(torch.int32), held.view(torch.int32)) | torch.isnan(y)
        assert bool(ok.all())


@SETTINGS
@given(n=scalars, bits=scalars, group=st.one_of(st.none(), scalars), scale_bits=scalars)
def test_model_size(n, bits, group, scale_bits):
    call(formats.model_size, n, bits, group_size=group, scale_bits=scale_bits)


@SETTINGS
@given(x=tensors(), gran=granularities, param=tensors(max_dims=3))
def test_granularity(x, gran, param):
    call(granularity.minmax, x, gran)
    if isinstance(gran, (granularity.PerTensor, granularity.PerChannel, granularity.PerGroup)):
        call(gran.param_shape, x.shape)
        call(gran.groups, x)
        call(gran.expand, param, x.shape)
        call(granularity.qparam_count, x.shape, gran)
        call(granularity.rows_to_params, param.reshape(-1), gran, x.shape)


@SETTINGS
@given(a=scalars, b=scalars, c=scalars, d=scalars)
def test_roofline(a, b, c, d):
    call(roofline.matmul_flops, a, b, c)
    call(roofline.matmul_bytes, a, b, c, d, d, d)
    call(roofline.arithmetic_intensity, a, b)
    call(roofline.decode_time, a, roofline.H100_SXM)
    call(roofline.attainable, roofline.H100_SXM, a, "fp16")
    call(roofline.attainable, roofline.H100_SXM, 1.0, a)
    call(roofline.ridge_point, roofline.H100_SXM, a)
    call(roofline.Device, "x", {"fp16": a}, b, "src")


@pytest.mark.parametrize("symmetric", [False, True])
def test_calc_qparams_does_not_modify_its_inputs(symmetric):
    xmin, xmax = torch.tensor([-1.0, 0.5, -3e38]), torch.tensor([2.0, 0.75, 3e38])
    before = xmin.clone(), xmax.clone()
    affine.calc_qparams(xmin, xmax, -128, 127, symmetric=symmetric)
    assert torch.equal(xmin, before[0]) and torch.equal(xmax, before[1])
