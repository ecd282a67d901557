"""Fuzz tests of the integer path (qbook.intmath, qbook.packing, qbook.kernels with backend="torch").

Every public function gets arbitrary arguments (tensors of every dtype and small shape, extreme and odd Python
values) mixed with plausible ones. Three properties hold for every call:

* bad input raises only ``ValueError``, ``TypeError`` or ``OverflowError`` (never a raw ``RuntimeError``,
  ``IndexError``, ...);
* inputs are never modified in place;
* a result is exact: equal to a reference computed with Python integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbook import intmath, kernels, packing

ALLOWED = (ValueError, TypeError, OverflowError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
ALL_DTYPES = [*INT_DTYPES, torch.float16, torch.float32, torch.float64, torch.bool, torch.uint16]
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# --------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------


def _edges(lo: int, hi: int) -> st.SearchStrategy[int]:
    special = [v for v in (lo, lo + 1, -1, 0, 1, 2, hi - 1, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(special), st.integers(lo, hi))


def _range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    info = torch.iinfo(dtype)
    return info.min, info.max


@st.composite
def tensors(
    draw: st.DrawFn,
    dtypes: list[torch.dtype] | None = None,
    shape: tuple[int, ...] | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> torch.Tensor:
    """A tensor of one of ``dtypes``; integer values from the edges of the range, floats including NaN/inf."""
    dtype = draw(st.sampled_from(dtypes or ALL_DTYPES))
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape)
    if dtype.is_floating_point:
        values = draw(
            st.lists(
                st.floats(allow_nan=True, allow_infinity=True, width=16 if dtype == torch.float16 else 32),
                min_size=n,
                max_size=n,
            )
        )
        return torch.tensor(values, dtype=dtype).reshape(shape)
    dlo, dhi = _range(dtype)
    lo = dlo if lo is None else max(lo, dlo)
    hi = dhi if hi is None else min(hi, dhi)
    values = draw(st.lists(_edges(lo, hi), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.int64).to(dtype).reshape(shape)


odd = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=2),
    st.lists(st.integers(-3, 3), max_size=3),
    tensors(),
)


def either(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible argument, sometimes anything at all."""
    return st.one_of(plausible, plausible, plausible, odd)


small_int = st.one_of(_edges(-300, 300), _edges(INT32_MIN, INT32_MAX))


def _snapshot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    found = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    return [(x, x.clone()) for x in found]


def _unchanged(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.dtype != after.dtype or before.shape != after.shape:
        return False
    if before.is_floating_point():
        return torch.equal(before.isnan(), after.isnan()) and torch.equal(
            before.nan_to_num(), after.nan_to_num()
        )
    return torch.equal(before, after)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; return its result or None if it raised an allowed exception; check inputs are intact."""
    saved = _snapshot(args, kwargs)
    try:
        result = fn(*args, **kwargs)
    except ALLOWED:
        result = None
    for original, copy in saved:
        assert _unchanged(copy, original), f"{fn.__name__} modified an input in place"
    return result


# --------------------------------------------------------------------------------------------------------
# Python-integer references
# --------------------------------------------------------------------------------------------------------


def _values(z: Any) -> list[int]:
    return torch.as_tensor(z).reshape(-1).tolist()


def ref_matmul(a: torch.Tensor, b: torch.Tensor, za: Any, zb: Any) -> list[list[int]]:
    M, K = a.shape
    N = b.shape[1]
    al, bl, zal, zbl = a.tolist(), b.tolist(), _values(za), _values(zb)
    return [
        [
            sum((al[i][k] - zal[i % len(zal)]) * (bl[k][j] - zbl[j % len(zbl)]) for k in range(K))
            for j in range(N)
        ]
        for i in range(M)
    ]


def wrap32(x: int) -> int:
    return (x + 2**31) % 2**32 - 2**31


def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else (1 - (1 << 30))
    n = ab + nudge
    q = abs(n) // 2**31
    return wrap32(q if n >= 0 else -q)


def ref_rdbpot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return wrap32((x >> exponent) + (1 if (x & mask) > threshold else 0))


def ref_mbqm(x: int, multiplier: int, shift: int, rounding: str) -> int:
    if rounding == "single":
        return (x * multiplier + (1 << (30 - shift))) >> (31 - shift)
    left, right = max(shift, 0), max(-shift, 0)
    return ref_rdbpot(ref_srdhm(x * (1 << left), multiplier), right)


# --------------------------------------------------------------------------------------------------------
# Chapter 4: int_matmul and its expansion
# --------------------------------------------------------------------------------------------------------


@st.composite
def matmul_args(draw: st.DrawFn) -> tuple[Any, Any, Any, Any]:
    M, K, N = draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(0, 4))
    a = draw(either(tensors(INT_DTYPES, (M, K))))
    b = draw(either(tensors(INT_DTYPES, (K, N))))
    zero_point = st.one_of(
        small_int, tensors(INT_DTYPES, (M,)), tensors(INT_DTYPES, (M, 1)), tensors(INT_DTYPES, ())
    )
    za = draw(either(zero_point))
    zb = draw(either(st.one_of(small_int, tensors(INT_DTYPES, (N,)), tensors(INT_DTYPES, (1, N)))))
    return a, b, za, zb


@FUZZ
@given(matmul_args())
def test_int_matmul_fuzz(args: tuple[Any, Any, Any, Any]) -> None:
    a, b, za, zb = args
    result = call(intmath.int_matmul, a, b, za, zb)
    expanded = call(intmath.int_matmul_expanded, a, b, za, zb)
    terms = call(intmath.zero_point_terms, a, b, za, zb)
    if result is None:
        assert expanded is None
        return
    exact = ref_matmul(a, b, za, zb)
    assert result.dtype == torch.int32 and result.tolist() == exact
    assert torch.equal(expanded, result)
    if terms is not None:
        assert terms.combine().tolist() == exact


@FUZZ
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 5), st.data())
def test_int_matmul_valid_inputs_are_exact(M: int, K: int, N: int, data: st.DataObject) -> None:
    """Valid inputs never raise unless the exact result leaves int32, and then OverflowError."""
    a = data.draw(tensors(INT_DTYPES, (M, K), -(2**31), 2**31 - 1))
    b = data.draw(tensors(INT_DTYPES, (K, N), -(2**31), 2**31 - 1))
    za = data.draw(st.one_of(small_int, tensors([torch.int32], (M,))))
    zb = data.draw(st.one_of(small_int, tensors([torch.int32], (1, N))))
    exact = ref_matmul(a, b, za, zb)
    fits = all(INT32_MIN <= v <= INT32_MAX for row in exact for v in row)
    try:
        result = intmath.int_matmul(a, b, za, zb)
    except OverflowError:
        assert not fits
        return
    assert fits and result.tolist() == exact


# --------------------------------------------------------------------------------------------------------
# Chapter 9: bits, accumulation, requantization, bias
# --------------------------------------------------------------------------------------------------------


@FUZZ
@given(
    either(st.integers(1, 40)),
    either(st.integers(1, 40)),
    either(st.integers(1, 70)),
    either(st.integers(0, 10**6)),
    either(st.booleans()),
)
def test_bit_counting_fuzz(a_bits: Any, b_bits: Any, acc_bits: Any, k: Any, signed: Any) -> None:
    for fn, args in (
        (intmath.product_bits, (a_bits, b_bits)),
        (intmath.accumulator_bits, (a_bits, b_bits, k)),
        (intmath.max_safe_k, (a_bits, b_bits, acc_bits)),
    ):
        result = call(fn, *args, signed=signed)
        assert result is None or (isinstance(result, int) and result >= 0)


@FUZZ
@given(st.data())
def test_accumulate_fuzz(data: st.DataObject) -> None:
    K = data.draw(st.integers(0, 6))
    a = data.draw(either(tensors(INT_DTYPES, (2, K))))
    b = data.draw(either(st.one_of(tensors(INT_DTYPES, (2, K)), tensors(INT_DTYPES, (K,)))))
    acc_bits = data.draw(either(st.integers(2, 32)))
    mode = data.draw(either(st.sampled_from(["wrap", "saturate"])))
    steps = call(intmath.accumulate_steps, a, b, acc_bits=acc_bits, mode=mode)
    final = call(intmath.accumulate, a, b, acc_bits=acc_bits, mode=mode)
    if steps is None:
        assert final is None
        return
    half = 2 ** (acc_bits - 1)
    K = steps.shape[-1]
    products = (a.to(torch.int64) * b.to(torch.int64)).reshape(-1, K).tolist()
    for row, got in zip(products, steps.reshape(-1, K).tolist(), strict=True):
        acc = 0
        for k, p in enumerate(row):
            acc = (
                (acc + p + half) % (2 * half) - half if mode == "wrap" else min(max(acc + p, -half), half - 1)
            )
            assert got[k] == acc
    assert torch.equal(final, steps[..., -1])


@FUZZ
@given(st.data())
def test_fixed_point_fuzz(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 4))
    acc = data.draw(either(tensors(INT_DTYPES, (n,))))
    multiplier = data.draw(either(st.one_of(_edges(0, INT32_MAX), tensors(INT_DTYPES, (n,), 0))))
    shift = data.draw(either(st.one_of(_edges(-31, 30), tensors(INT_DTYPES, (n,), -31, 30))))
    rounding = data.draw(either(st.sampled_from(["double", "single"])))
    out_zero_point = data.draw(either(_edges(-128, 127)))
    qmin, qmax = data.draw(either(st.just(-128))), data.draw(either(st.just(127)))
    y = call(intmath.multiply_by_quantized_multiplier, acc, multiplier, shift, rounding)
    if y is not None:
        size = y.numel()
        xs, ms, ss = (
            torch.as_tensor(v).expand(y.shape).reshape(-1).tolist() for v in (acc, multiplier, shift)
        )
        assert y.dtype == torch.int32 and size == len(xs)
        assert y.reshape(-1).tolist() == [
            ref_mbqm(x, m, s, rounding) for x, m, s in zip(xs, ms, ss, strict=True)
        ]
    q = call(intmath.requantize, acc, multiplier, shift, out_zero_point, qmin, qmax, rounding)
    if q is not None:
        assert q.numel() == 0 or (qmin <= int(q.min()) and int(q.max()) <= qmax)  # never outside the grid
        assert y is not None and torch.equal(q.long(), (y.long() + out_zero_point).clamp(qmin, qmax))
    a = data.draw(either(st.one_of(_edges(INT32_MIN, INT32_MAX), tensors(INT_DTYPES, (n,)))))
    high = call(intmath.saturating_rounding_doubling_high_mul, a, multiplier)
    if high is not None:
        pairs = zip(
            *(torch.as_tensor(v).expand(high.shape).reshape(-1).tolist() for v in (a, multiplier)),
            strict=True,
        )
        assert high.reshape(-1).tolist() == [ref_srdhm(x, m) for x, m in pairs]
    exponent = data.draw(either(st.one_of(_edges(0, 31), tensors(INT_DTYPES, (n,), 0, 31))))
    divided = call(intmath.rounding_divide_by_pot, a, exponent)
    if divided is not None:
        pairs = zip(
            *(torch.as_tensor(v).expand(divided.shape).reshape(-1).tolist() for v in (a, exponent)),
            strict=True,
        )
        assert divided.reshape(-1).tolist() == [ref_rdbpot(x, e) for x, e in pairs]


@FUZZ
@given(st.data())
def test_multipliers_fuzz(data: st.DataObject) -> None:
    m = data.draw(either(st.floats(0, 1e3)))
    pair = call(intmath.quantize_multiplier, m)
    if pair is not None:
        multiplier, shift = pair
        assert 0 <= multiplier <= INT32_MAX and -31 <= shift  # TFLite leaves large shifts to the caller
    ms = data.draw(either(tensors([torch.float32, torch.float64], (3,))))
    pairs = call(intmath.quantize_multipliers, ms)
    if pairs is not None:
        for value, mult, shift in zip(
            ms.reshape(-1).tolist(), *(p.reshape(-1).tolist() for p in pairs), strict=True
        ):
            assert (mult, shift) == intmath.quantize_multiplier(value)


@FUZZ
@given(st.data())
def test_bias_and_float_epilogues_fuzz(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 4))
    scale = st.one_of(
        st.floats(1e-6, 10.0), tensors([torch.float32, torch.float64], (n,)), tensors([torch.float32], ())
    )
    bias = data.draw(either(tensors([torch.float32, torch.float64], (n,))))
    a_scale, w_scale = data.draw(either(scale)), data.draw(either(scale))
    q = call(intmath.quantize_bias, bias, a_scale, w_scale)
    if q is not None:
        assert q.dtype == torch.int32
    acc = data.draw(either(tensors(INT_DTYPES, (2, n))))
    y = call(intmath.dequantize_acc, acc, a_scale, w_scale)
    if y is not None:
        assert y.dtype == torch.float32
    out_zero_point = data.draw(either(_edges(-128, 127)))
    r = call(intmath.requantize_float, acc, a_scale, out_zero_point)
    if r is not None:
        assert r.numel() == 0 or (-128 <= int(r.min()) and int(r.max()) <= 127)


# --------------------------------------------------------------------------------------------------------
# Chapter 6: packing
# --------------------------------------------------------------------------------------------------------


def ref_pack(rows: list[list[int]], bits: int) -> list[list[int]]:
    out = []
    for row in rows:
        stream = sum((v % 2**bits) << (bits * i) for i, v in enumerate(row))
        out.append(list(stream.to_bytes(-(-len(row) * bits // 8), "little")))
    return out


@FUZZ
@given(st.data())
def test_pack_fuzz(data: st.DataObject) -> None:
    bits = data.draw(either(st.sampled_from(packing.BITS)))
    signed = data.draw(either(st.one_of(st.booleans(), st.none())))
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    if type(bits) is int and bits in packing.BITS and isinstance(signed, bool):
        lo, hi = packing.code_range(bits, signed)
        codes = tensors(INT_DTYPES, shape, lo, hi)
    else:
        codes = tensors(INT_DTYPES, shape)
    q = data.draw(either(codes))
    packed = call(packing.pack, q, bits, signed=signed)
    if packed is None:
        return
    assert packed.dtype == torch.uint8 and packed.shape == (*q.shape[:-1], -(-q.shape[-1] * bits // 8))
    rows = q.reshape(math.prod(q.shape[:-1]), q.shape[-1]).tolist()
    assert packed.reshape(len(rows), packed.shape[-1]).tolist() == ref_pack(rows, bits)
    kind = q.dtype.is_signed if signed is None else signed
    back = call(packing.unpack, packed, bits, q.shape[-1], signed=kind)
    assert back is not None and back.tolist() == q.tolist()


@FUZZ
@given(st.data())
def test_unpack_fuzz(data: st.DataObject) -> None:
    bits = data.draw(either(st.sampled_from(packing.BITS)))
    length = data.draw(either(st.integers(0, 9)))
    width = -(-length * bits // 8) if type(length) is int and type(bits) is int and bits > 0 else 2
    width = max(0, min(width, 9)) if isinstance(width, int) else 2
    lead = tuple(data.draw(st.lists(st.integers(0, 3), max_size=2)))
    packed = data.draw(either(tensors([torch.uint8], (*lead, width))))
    signed = data.draw(either(st.booleans()))
    codes = call(packing.unpack, packed, bits, length, signed=signed)
    if codes is None:
        return
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == (*lead, length)
    assert torch.equal(packing.pack(codes, bits, signed=signed), packed)  # unpack accepted it: a round trip


@FUZZ
@given(st.data())
def test_sizes_fuzz(data: st.DataObject) -> None:
    from qbook.granularity import PerChannel, PerGroup, PerTensor

    shape = data.draw(either(st.lists(st.integers(1, 300), min_size=1, max_size=3).map(tuple)))
    bits = data.draw(either(st.sampled_from(packing.BITS)))
    granularity = data.draw(either(st.sampled_from([None, PerTensor(), PerChannel(0), PerGroup(-1, 4)])))
    scale_bits = data.draw(either(st.sampled_from([0, 16, 32])))
    zero_point_bits = data.draw(either(st.sampled_from([0, 4, 8])))
    kwargs = dict(scale_bits=scale_bits, zero_point_bits=zero_point_bits)
    size = call(packing.storage_bytes, shape, bits, granularity, **kwargs)
    per_weight = call(packing.bits_per_weight, shape, bits, granularity, **kwargs)
    assert (size is None) == (per_weight is None)
    if size is not None:
        assert per_weight == 8 * size / math.prod(shape)
    for fn, args in (
        (packing.code_range, (bits, data.draw(either(st.booleans())))),
        (packing.packed_length, (data.draw(either(st.integers(0, 99))), bits)),
    ):
        call(fn, *args)


# --------------------------------------------------------------------------------------------------------
# Chapter 10: the torch backend of kernels.int8_matmul
# --------------------------------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_int8_matmul_fuzz(data: st.DataObject) -> None:
    M, K, N = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 5)), data.draw(st.integers(0, 4))
    a = data.draw(either(tensors([torch.int8], (M, K))))
    b = data.draw(either(tensors([torch.int8], (K, N))))
    scale = st.one_of(
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        tensors([torch.float32], (M,)),
        tensors([torch.float32], (N,)),
        tensors([torch.float64], ()),
    )
    a_scale, b_scale = data.draw(either(scale)), data.draw(either(scale))
    bias = data.draw(either(st.one_of(st.none(), tensors([torch.float32], (N,)))))
    out_dtype = data.draw(
        either(st.sampled_from([None, torch.float32, torch.bfloat16, torch.int32, torch.int8]))
    )
    out_scale = data.draw(either(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))))
    out_zero_point = data.draw(either(_edges(-128, 127)))
    backend = data.draw(st.sampled_from(["auto", "torch"]))
    y = call(
        kernels.int8_matmul,
        a,
        b,
        a_scale,
        b_scale,
        bias,
        out_dtype,
        backend,
        out_scale=out_scale,
        out_zero_point=out_zero_point,
    )
    if y is None:
        return
    assert y.shape == (M, N)
    for name, value in (("a_scale", a_scale), ("b_scale", b_scale)):
        if value is not None:
            values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            assert bool(((values > 0) & values.isfinite()).all()), f"{name} {value} was accepted"
    if bias is not None:
        assert bool(bias.float().isfinite().all())
    if a_scale is None:
        assert y.dtype == torch.int32 and y.tolist() == ref_matmul(a, b, 0, 0)
