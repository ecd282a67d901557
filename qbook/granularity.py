"""Granularity (量化粒度; the lecture notes write 量化力度): which elements share a scale — chapter 6.

One mechanism serves every primitive. A granularity is a small frozen dataclass that knows

* :meth:`~PerTensor.param_shape` — the shape of ``scale``/``zero_point`` for data of a given shape,
  chosen so that (per-tensor, per-channel) it broadcasts against the data directly;
* :meth:`~PerTensor.groups` — the data rearranged as ``(G, n)``: one row per quantization group, so that
  ``groups(x).amin(1).reshape(param_shape(x.shape))`` is the per-group minimum;
* :meth:`~PerTensor.expand` — a parameter of ``param_shape`` made broadcastable against the data
  (identity except for per-group, which repeats each group's value ``group_size`` times).

``qbook.quantize``/``dequantize``/``fake_quantize`` accept ``granularity=``; per group they repeat nothing,
viewing the data as ``(..., L // g, g, ...)`` and the parameters as ``(..., L // g, 1, ...)``. The observers
of chapter 5 reduce over :meth:`groups`.

>>> import torch
>>> w = torch.arange(8.0).reshape(2, 4)        # (C, K) = (2, 4)
>>> PerChannel(axis=0).param_shape(w.shape)
(2, 1)
>>> g = PerGroup(axis=1, group_size=2)
>>> g.param_shape(w.shape)                      # (C, K // group_size)
(2, 2)
>>> g.groups(w).amax(1).reshape(g.param_shape(w.shape))
tensor([[1., 3.],
        [5., 7.]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Granularity",
    "PerBlock",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "minmax",
    "qparam_count",
    "rows_to_params",
]


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor (parameter shape ``()``)."""

    def param_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        return ()

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)  # (1, numel)

    def expand(self, param: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        if isinstance(param, torch.Tensor) and param.numel() != 1:
            raise ValueError(
                f"per-tensor parameter must hold one value, got shape {tuple(param.shape)} "
                f"for data of shape {tuple(shape)}"
            )
        return param


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index along ``axis`` (parameter shape e.g. ``(C, 1)`` for axis 0 of 2-D).

    Weights of a linear layer ``(out_features, in_features)`` use ``PerChannel(axis=0)``: one scale per
    output channel, which the integer matmul can apply after accumulation.

    The same class gives *per-token* (逐 token) scales for activations: a ``(tokens, features)`` matrix
    with ``PerChannel(axis=0)`` has one scale per row, i.e. per token; flatten ``(batch, seq, features)`` to
    ``(batch * seq, features)`` first. :meth:`expand` also accepts the 1-D ``(C,)`` form that PyTorch's
    per-channel tensors store, and reshapes it to :meth:`param_shape`.

    >>> PerChannel(axis=0).expand(torch.tensor([1.0, 2.0]), (2, 3)).shape
    torch.Size([2, 1])
    """

    axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"axis must be an int, got {self.axis!r}")

    def param_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        axis = _axis(self.axis, len(shape))
        return tuple(n if d == axis else 1 for d, n in enumerate(shape))

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        axis = _axis(self.axis, x.ndim)
        channels = x.shape[axis]
        per_channel = x.numel() // channels if channels else 0
        return x.movedim(axis, 0).reshape(channels, per_channel)  # (C, numel // C)

    def expand(self, param: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        axis = _axis(self.axis, len(shape))
        if not isinstance(param, torch.Tensor) or param.ndim == 0:
            return param
        expected = self.param_shape(shape)
        if tuple(param.shape) == expected:
            return param
        if param.ndim == 1 and param.shape[0] == shape[axis]:
            return param.reshape(expected)  # (C,) -> e.g. (C, 1)
        raise ValueError(
            f"per-channel parameter has shape {tuple(param.shape)}, expected {expected} or "
            f"({shape[axis]},) for data of shape {tuple(shape)} and {self}"
        )


@dataclass(frozen=True)
class PerGroup:
    """One scale and zero point per block of ``group_size`` consecutive elements along ``axis``.

    For a weight ``(N, K)`` and ``PerGroup(axis=1, group_size=128)`` the parameters have shape
    ``(N, K // 128)``. ``group_size`` must divide the length of ``axis`` (no implicit padding: pad the data
    yourself if you need to).
    """

    axis: int = -1
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"axis must be an int, got {self.axis!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise TypeError(f"group_size must be an int, got {self.group_size!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    def _check(self, shape: tuple[int, ...] | torch.Size) -> int:
        axis = _axis(self.axis, len(shape))
        if shape[axis] % self.group_size != 0:
            raise ValueError(
                f"group_size {self.group_size} does not divide the length {shape[axis]} of axis {self.axis} "
                f"(shape {tuple(shape)}); pad the tensor to a multiple of {self.group_size} first"
            )
        return axis

    def param_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        axis = self._check(shape)
        return tuple(n // self.group_size if d == axis else n for d, n in enumerate(shape))

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        axis = self._check(x.shape)
        moved = x.movedim(axis, -1)  # (..., L)
        return moved.reshape(-1, self.group_size)  # (numel // g, g), groups in param order after movedim

    def expand(self, param: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        axis = self._check(shape)
        if not isinstance(param, torch.Tensor) or param.ndim == 0:
            return param
        if tuple(param.shape) != self.param_shape(shape):
            raise ValueError(
                f"per-group parameter has shape {tuple(param.shape)}, expected {self.param_shape(shape)} "
                f"for data of shape {tuple(shape)} and {self}"
            )
        return param.repeat_interleave(self.group_size, dim=axis)


@dataclass(frozen=True)
class PerBlock:
    """One scale and zero point per 2-D block of ``block = (bm, bn)`` elements of a matrix ``(M, K)``.

    The parameters have shape ``(M // bm, K // bn)``; both sides of the block must divide the matrix (no
    implicit padding). DeepSeek-V3's FP8 recipe (chapter 12) scales weights in ``PerBlock((128, 128))`` blocks
    and activations in ``PerBlock((1, 128))`` tiles. Only 2-D data.

    >>> g = PerBlock((2, 2))
    >>> x = torch.arange(16.0).reshape(4, 4)
    >>> g.param_shape(x.shape)
    (2, 2)
    >>> g.groups(x).amax(1).reshape(g.param_shape(x.shape))      # the largest element of each 2 x 2 block
    tensor([[ 5.,  7.],
            [13., 15.]])
    """

    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        b = self.block
        if (not isinstance(b, tuple) or len(b) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in b)):
            raise TypeError(f"block must be a pair of ints (rows, columns), got {b!r}")
        if min(b) < 1:
            raise ValueError(f"block sides must be positive, got {b}")

    def _check(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int, int]:
        if len(shape) != 2:
            raise ValueError(f"PerBlock needs a 2-D tensor (M, K), got shape {tuple(shape)}")
        (M, K), (bm, bn) = shape, self.block
        if M % bm or K % bn:
            raise ValueError(
                f"block {self.block} does not divide the shape {tuple(shape)}; pad the tensor to multiples "
                f"of {self.block} first"
            )
        return M, K, bm, bn

    def param_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        M, K, bm, bn = self._check(shape)
        return (M // bm, K // bn)

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        M, K, bm, bn = self._check(x.shape)
        blocks = x.reshape(M // bm, bm, K // bn, bn).transpose(1, 2)  # (M // bm, K // bn, bm, bn)
        return blocks.reshape(-1, bm * bn)  # (G, bm * bn), blocks in param order

    def expand(self, param: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        M, K, bm, bn = self._check(shape)
        if not isinstance(param, torch.Tensor) or param.ndim == 0:
            return param
        if tuple(param.shape) != self.param_shape(shape):
            raise ValueError(
                f"per-block parameter has shape {tuple(param.shape)}, expected {self.param_shape(shape)} "
                f"for data of shape {tuple(shape)} and {self}"
            )
        return param.repeat_interleave(bm, dim=0).repeat_interleave(bn, dim=1)


Granularity = PerTensor | PerChannel | PerGroup | PerBlock


def rows_to_params(values: torch.Tensor, granularity: Granularity, shape: torch.Size) -> torch.Tensor:
    """One value per row of ``granularity.groups(x)`` (``(G,)``), laid out in ``param_shape(x.shape)``.

    Per-group ``groups`` moves the grouped axis last before cutting it into rows; this undoes that.

    >>> import torch
    >>> g = PerGroup(axis=0, group_size=2)
    >>> x = torch.arange(12.0).reshape(4, 3)                 # (K, N) = (4, 3): groups of 2 down each column
    >>> rows_to_params(g.groups(x).amax(1), g, x.shape)      # (K // 2, N)
    tensor([[ 3.,  4.,  5.],
            [ 9., 10., 11.]])
    """
    _check_granularity(granularity)
    groups = qparam_count(shape, granularity)
    if not isinstance(values, torch.Tensor) or values.numel() != groups:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"values must hold one number per group, {groups} for {granularity} on shape {tuple(shape)}, "
            f"got {got}"
        )
    if isinstance(granularity, PerGroup):
        axis = _axis(granularity.axis, len(shape))
        moved = list(shape)
        moved.append(moved.pop(axis) // granularity.group_size)
        return values.reshape(moved).movedim(-1, axis)
    return values.reshape(granularity.param_shape(shape))


def minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of ``x``, each of shape ``granularity.param_shape(x.shape)``.

    >>> import torch
    >>> lo, hi = minmax(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), PerChannel(axis=0))
    >>> lo.flatten().tolist(), hi.flatten().tolist()
    ([-2.0, 3.0], [1.0, 4.0])
    """
    _check_granularity(granularity)
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.dtype == torch.bool:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a real-valued tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"cannot take the range of an empty tensor (shape {tuple(x.shape)})")
    rows = granularity.groups(x)  # (G, n)
    return (
        rows_to_params(rows.amin(dim=1), granularity, x.shape),
        rows_to_params(rows.amax(dim=1), granularity, x.shape),
    )


def qparam_count(shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> int:
    """Number of scales (and of zero points) that ``granularity`` needs for data of ``shape``.

    For a weight of shape ``(N, K)``: per-tensor 1, per-channel ``N``, per-group ``N * K / g`` — the overhead
    that :func:`qbook.packing.bits_per_weight` charges to every weight.

    >>> qparam_count((4096, 4096), PerTensor()), qparam_count((4096, 4096), PerChannel(0))
    (1, 4096)
    >>> qparam_count((4096, 4096), PerGroup(axis=1, group_size=128))
    131072
    """
    _check_granularity(granularity)
    return math.prod(granularity.param_shape(tuple(shape)))


def _check_granularity(granularity: object) -> None:
    if not isinstance(granularity, (PerTensor, PerChannel, PerGroup, PerBlock)):
        raise TypeError(
            "granularity must be PerTensor(), PerChannel(axis), PerGroup(axis, size) or PerBlock(block), "
            f"got {granularity!r}"
        )
