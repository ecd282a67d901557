"""Tests for qbook.granularity: parameter shapes, grouping and min/max against naive loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbook.granularity import PerChannel, PerGroup, PerTensor, minmax, qparam_count


def naive_minmax(x: torch.Tensor, granularity: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every group by an explicit loop over the parameter grid."""
    if isinstance(granularity, PerTensor):
        return torch.tensor(min(x.flatten().tolist())), torch.tensor(max(x.flatten().tolist()))
    axis = granularity.axis % x.ndim  # type: ignore[attr-defined]
    size = granularity.group_size if isinstance(granularity, PerGroup) else x.shape[axis]
    shape = [n // size if d == axis else n for d, n in enumerate(x.shape)]
    if isinstance(granularity, PerChannel):
        shape = [n if d == axis else 1 for d, n in enumerate(x.shape)]
    lo, hi = torch.empty(shape), torch.empty(shape)
    for index in itertools.product(*(range(n) for n in shape)):
        if isinstance(granularity, PerChannel):
            block = x.select(axis, index[axis])
        else:
            sl = [slice(i, i + 1) for i in index]
            sl[axis] = slice(index[axis] * size, (index[axis] + 1) * size)
            block = x[tuple(sl)]
        values = block.flatten().tolist()
        lo[index], hi[index] = min(values), max(values)
    return lo, hi


# ---------------------------------------------------------------------------------------------------------
# Parameter shapes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "granularity", "expected"),
    [
        ((7,), PerTensor(), ()),
        ((2, 3, 4, 5), PerTensor(), ()),
        ((7,), PerChannel(0), (7,)),
        ((7,), PerChannel(-1), (7,)),
        ((3, 4), PerChannel(0), (3, 1)),
        ((3, 4), PerChannel(1), (1, 4)),
        ((3, 4), PerChannel(-1), (1, 4)),
        ((3, 4), PerChannel(-2), (3, 1)),
        ((2, 3, 4), PerChannel(1), (1, 3, 1)),
        ((8, 3, 5, 5), PerChannel(0), (8, 1, 1, 1)),  # a conv weight (C_out, C_in, kH, kW)
        ((8, 3, 5, 5), PerChannel(-3), (1, 3, 1, 1)),
        ((8,), PerGroup(0, 4), (2,)),
        ((8,), PerGroup(-1, 2), (4,)),
        ((3, 8), PerGroup(1, 4), (3, 2)),
        ((3, 8), PerGroup(-1, 8), (3, 1)),
        ((8, 3), PerGroup(0, 2), (4, 3)),
        ((8, 3), PerGroup(-2, 1), (8, 3)),
        ((2, 6, 4), PerGroup(1, 3), (2, 2, 4)),
        ((2, 3, 4, 6), PerGroup(-1, 2), (2, 3, 4, 3)),
        ((2, 4, 4, 6), PerGroup(-3, 2), (2, 2, 4, 6)),
    ],
)
def test_param_shape(shape: tuple[int, ...], granularity: object, expected: tuple[int, ...]) -> None:
    assert granularity.param_shape(shape) == expected  # type: ignore[attr-defined]
    assert granularity.param_shape(torch.Size(shape)) == expected  # type: ignore[attr-defined]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert granularity.groups(x).shape[0] == qparam_count(shape, granularity)  # type: ignore[arg-type,attr-defined]
    lo, hi = minmax(x, granularity)  # type: ignore[arg-type]
    assert tuple(lo.shape) == tuple(hi.shape) == expected


def test_qparam_count_for_a_weight() -> None:
    assert qparam_count((4096, 11008), PerTensor()) == 1
    assert qparam_count((4096, 11008), PerChannel(0)) == 4096
    assert qparam_count((4096, 11008), PerGroup(1, 128)) == 4096 * 86
    assert qparam_count(torch.Size([384, 1536]), PerGroup(1, 32)) == 384 * 48


# ---------------------------------------------------------------------------------------------------------
# minmax and groups against naive loops
# ---------------------------------------------------------------------------------------------------------


@st.composite
def tensor_and_granularity(draw: st.DrawFn) -> tuple[torch.Tensor, object]:
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    axis = draw(st.integers(-ndim, ndim - 1))
    if kind == "tensor":
        granularity: object = PerTensor()
    elif kind == "channel":
        granularity = PerChannel(axis)
    else:
        group_size = draw(st.integers(1, 4))
        shape[axis] *= group_size  # make the axis a multiple of the group size
        granularity = PerGroup(axis, group_size)
    seed = draw(st.integers(0, 2**16))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)), granularity


@settings(max_examples=80, deadline=None)
@given(case=tensor_and_granularity())
def test_minmax_matches_naive_loop(case: tuple[torch.Tensor, object]) -> None:
    x, granularity = case
    lo, hi = minmax(x, granularity)  # type: ignore[arg-type]
    ref_lo, ref_hi = naive_minmax(x, granularity)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@settings(max_examples=80, deadline=None)
@given(case=tensor_and_granularity())
def test_expand_broadcasts_each_group_value_over_its_group(case: tuple[torch.Tensor, object]) -> None:
    """expand(param) then indexing element i gives the parameter of i's group."""
    x, granularity = case
    shape = granularity.param_shape(x.shape)  # type: ignore[attr-defined]
    param = torch.arange(float(qparam_count(x.shape, granularity))).reshape(shape)  # type: ignore[arg-type]
    expanded = granularity.expand(param, x.shape)  # type: ignore[attr-defined]
    full = torch.broadcast_to(expanded, x.shape)
    size = granularity.group_size if isinstance(granularity, PerGroup) else 1
    for index in itertools.product(*(range(n) for n in x.shape)):
        if isinstance(granularity, PerTensor):
            owner: tuple[int, ...] = ()
        elif isinstance(granularity, PerChannel):
            axis = granularity.axis % x.ndim
            owner = tuple(i if d == axis else 0 for d, i in enumerate(index))
        else:
            axis = granularity.axis % x.ndim  # type: ignore[attr-defined]
            owner = tuple(i // size if d == axis else i for d, i in enumerate(index))
        assert full[index] == param[owner]


def test_per_group_expand_then_slice() -> None:
    g = PerGroup(axis=1, group_size=3)
    param = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (2, 6 // 3)
    expanded = g.expand(param, (2, 6))
    assert expanded.shape == (2, 6)
    for n in range(2):
        for j in range(2):
            assert torch.equal(expanded[n, 3 * j : 3 * j + 3], param[n, j].expand(3))


def test_groups_rows_are_the_groups() -> None:
    x = torch.arange(24.0).reshape(2, 12)
    rows = PerGroup(axis=1, group_size=4).groups(x)
    assert torch.equal(rows, torch.stack([x[n, 4 * j : 4 * j + 4] for n in range(2) for j in range(3)]))
    rows = PerChannel(axis=1).groups(x)
    assert torch.equal(rows, x.T)
    assert torch.equal(PerTensor().groups(x), x.reshape(1, 24))


def test_per_channel_on_activations_is_per_token() -> None:
    """(tokens, features) with PerChannel(0): one range per row, i.e. per token."""
    x = torch.tensor([[0.1, -0.2, 0.3], [10.0, -50.0, 20.0]])
    lo, hi = minmax(x, PerChannel(0))
    assert lo.flatten().tolist() == pytest.approx([-0.2, -50.0])
    assert hi.flatten().tolist() == pytest.approx([0.3, 20.0])


# ---------------------------------------------------------------------------------------------------------
# Per-group quantization equals quantizing each group alone
# ---------------------------------------------------------------------------------------------------------

affine = pytest.importorskip("qbook.affine")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("axis", "group_size"), [(1, 4), (-1, 8), (0, 3)])
def test_per_group_quantize_equals_each_group_alone(symmetric: bool, axis: int, group_size: int) -> None:
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, 24)
    spec = affine.QuantSpec(bits=4, signed=symmetric, narrow_range=symmetric, symmetric=symmetric)
    granularity = PerGroup(axis, group_size)
    t = affine.QTensor.from_float(w, spec, granularity=granularity)
    assert t.scale.shape == granularity.param_shape(w.shape)
    moved = w.movedim(axis, -1)  # (rows, L): groups run along the last dimension
    q_moved = t.q.movedim(axis, -1)
    scale_moved, zp_moved = t.scale.movedim(axis, -1), t.zero_point.movedim(axis, -1)
    for r in range(moved.shape[0]):
        for j in range(moved.shape[1] // group_size):
            block = moved[r, j * group_size : (j + 1) * group_size]
            alone = affine.QTensor.from_float(block, spec)  # per-tensor on the group by itself
            assert torch.equal(q_moved[r, j * group_size : (j + 1) * group_size], alone.q)
            assert torch.equal(scale_moved[r, j], alone.scale)
            assert torch.equal(zp_moved[r, j], alone.zero_point)


def test_per_group_quantize_with_the_functions() -> None:
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    g = PerGroup(1, 8)
    lo, hi = minmax(w, g)
    scale, zero_point = affine.calc_qparams(lo, hi, -8, 7)
    q = affine.quantize(w, scale, zero_point, -8, 7, granularity=g)
    for n in range(4):
        for j in range(2):
            block = w[n, 8 * j : 8 * j + 8]
            s, z = affine.calc_qparams(block.min(), block.max(), -8, 7)
            assert torch.equal(q[n, 8 * j : 8 * j + 8], affine.quantize(block, s, z, -8, 7))
    x_hat = affine.dequantize(q, scale, zero_point, granularity=g)
    assert (x_hat - w).abs().le(g.expand(scale, w.shape) / 2 + 1e-7).all()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_group_size_must_divide_the_axis() -> None:
    with pytest.raises(ValueError, match="group_size 5 does not divide the length 12 of axis 1"):
        PerGroup(1, 5).param_shape((3, 12))
    with pytest.raises(ValueError, match="does not divide"):
        PerGroup(-1, 5).groups(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="does not divide"):
        minmax(torch.zeros(3, 12), PerGroup(0, 2))


@pytest.mark.parametrize("granularity", [PerChannel(2), PerChannel(-3), PerGroup(2, 1), PerGroup(-3, 1)])
def test_axis_out_of_range(granularity: object) -> None:
    with pytest.raises(ValueError, match="out of range for a tensor with 2 dimensions"):
        granularity.param_shape((4, 4))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="out of range"):
        minmax(torch.zeros(4, 4), granularity)  # type: ignore[arg-type]


@pytest.mark.parametrize("axis", [1.0, "0", True, None])
def test_axis_must_be_int(axis: object) -> None:
    with pytest.raises(TypeError, match="axis must be an int"):
        PerChannel(axis)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="axis must be an int"):
        PerGroup(axis, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("group_size", "error"), [(0, ValueError), (-4, ValueError), (2.0, TypeError),
                                                   (True, TypeError), ("128", TypeError)])
def test_bad_group_size(group_size: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="group_size"):
        PerGroup(1, group_size)  # type: ignore[arg-type]


def test_wrong_param_shape() -> None:
    with pytest.raises(ValueError, match=r"per-group parameter has shape \(3, 2\), expected \(3, 3\)"):
        PerGroup(1, 4).expand(torch.ones(3, 2), (3, 12))
    with pytest.raises(ValueError, match=r"per-channel parameter has shape \(4,\), expected \(3, 1\)"):
        PerChannel(0).expand(torch.ones(4), (3, 12))
    with pytest.raises(ValueError, match="per-channel parameter has shape"):
        PerChannel(0).expand(torch.ones(1, 12), (3, 12))
    with pytest.raises(ValueError, match="per-tensor parameter must hold one value"):
        PerTensor().expand(torch.ones(3), (3, 12))


def test_accepted_param_forms() -> None:
    c = PerChannel(0)
    assert c.expand(torch.ones(3), (3, 12)).shape == (3, 1)  # torch's 1-D per-channel form
    assert c.expand(torch.ones(3, 1), (3, 12)).shape == (3, 1)
    assert c.expand(torch.tensor(2.0), (3, 12)).shape == ()
    assert PerChannel(1).expand(torch.ones(12), (3, 12)).shape == (1, 12)
    assert PerTensor().expand(torch.ones(1, 1), (3, 12)).shape == (1, 1)
    assert PerGroup(1, 4).expand(torch.tensor(2.0), (3, 12)).shape == ()


def test_minmax_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        minmax(torch.zeros(0, 4), PerTensor())


# --- PerBlock: 2-D blocks (chapter 12, DeepSeek-V3's 128 x 128 weight blocks) -------------------------------
def test_per_block_shapes_groups_and_expand():
    from qbook.granularity import PerBlock, rows_to_params

    x = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    g = PerBlock((3, 4))
    assert g.param_shape(x.shape) == (2, 2) and qparam_count(x.shape, g) == 4
    groups = g.groups(x)  # (4, 12), in param order
    for i, j in itertools.product(range(2), range(2)):
        assert torch.equal(groups[2 * i + j], x[3 * i:3 * (i + 1), 4 * j:4 * (j + 1)].flatten())
    lo, hi = minmax(x, g)
    assert torch.equal(hi, torch.tensor([[19.0, 23.0], [43.0, 47.0]])) and torch.equal(lo, hi - 19)
    assert torch.equal(rows_to_params(groups.amax(1), g, x.shape), hi)
    expanded = g.expand(hi, x.shape)
    assert expanded.shape == x.shape and expanded[2, 3] == 19 and expanded[3, 4] == 47
    assert PerBlock((1, 8)).param_shape(x.shape) == (6, 1)  # per row


def test_per_block_bad_input():
    from qbook.granularity import PerBlock

    with pytest.raises(TypeError, match="pair of ints"):
        PerBlock(128)
    with pytest.raises(TypeError, match="pair of ints"):
        PerBlock((128.0, 128))
    with pytest.raises(ValueError, match="positive"):
        PerBlock((0, 128))
    with pytest.raises(ValueError, match="does not divide the shape"):
        PerBlock((128, 128)).param_shape((128, 48))
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        PerBlock((2, 2)).groups(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="per-block parameter has shape"):
        PerBlock((2, 2)).expand(torch.ones(3), (4, 4))
