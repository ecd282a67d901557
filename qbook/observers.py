"""Observers (观察器): choosing the quantization range from calibration data (校准) — chapter 5.

An observer watches batches of a tensor (weights once, activations over a calibration set) and turns what it
saw into a range ``[xmin, xmax]`` and then, through :func:`qbook.affine.calc_qparams`, into a ``scale`` and
``zero_point``. The methods differ only in how they choose the range:

=============================  =============================================================================
observer                       range
=============================  =============================================================================
:class:`MinMaxObserver`        the extremes seen, ``[min x, max x]``
:class:`MovingAverageObserver` an exponential moving average of each batch's extremes (torch.ao semantics)
:class:`PercentileObserver`    the ``100 - p`` and ``p`` percentiles, e.g. ``p = 99.99``
:class:`MSEObserver`           ``alpha * [min x, max x]`` with ``alpha`` minimising the quantization MSE
:class:`EntropyObserver`       the threshold minimising KL(P || Q) of TensorRT (Migacz, 2017)
:class:`L2HistogramObserver`   a two-sided search minimising rounding + clipping error (torch.ao's idea)
=============================  =============================================================================

All of them work per tensor, per channel or per group (a :mod:`qbook.granularity` object: the data is seen as
``(G, n)`` rows by ``granularity.groups(x)`` and every statistic is kept per row), for any
:class:`~qbook.affine.QuantSpec` (bit width, signed or not, symmetric or affine). They stream: each batch
updates a summary of fixed size, so a calibration set larger than memory is fine. The histogram-based ones
share :class:`StreamingHistogram`.

>>> import torch
>>> obs = MinMaxObserver()                        # int8, affine, per tensor
>>> _ = obs(torch.tensor([-1.0, 0.5])); _ = obs(torch.tensor([2.0]))
>>> obs.range()
(tensor(-1.), tensor(2.))
>>> obs.qparams()
(tensor(0.0118), tensor(-43, dtype=torch.int32))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import torch

from qbook.affine import INT8, QuantSpec, calc_qparams, dequantize, quantize
from qbook.granularity import Granularity, PerChannel, PerGroup, PerTensor, rows_to_params

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "L2HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "StreamingHistogram",
    "kl_divergence",
]


# --------------------------------------------------------------------------------------------------------
# The streaming histogram
# --------------------------------------------------------------------------------------------------------


class StreamingHistogram:
    """One histogram of ``bins`` equal bins per row, over a range that grows as data arrives.

    The first batch sets each row's range to its ``[min, max]`` (or ``[origin, max]`` when ``origin`` is
    given, e.g. 0 for a histogram of ``|x|``), bins being half-open ``[edge_j, edge_j+1)`` as in numpy. When
    a later batch falls outside, the range doubles — to the
    left if the data is below, else to the right — and neighbouring bins merge in pairs, until the data fits.
    Merging aligned pairs is exact: the counts equal those of a histogram built in one pass on the final
    edges, so no re-binning error accumulates however many batches stream through. The range ends at most
    about twice as wide as the data needs (each bin at most twice as wide as an ideal one).

    The exact per-row minimum and maximum are kept alongside. ``counts`` is ``(G, bins)`` int64, ``lo`` and
    ``width`` are ``(G,)`` float64: bin ``j`` of row ``g`` is ``[lo + j * width, lo + (j + 1) * width)``.

    >>> import torch
    >>> h = StreamingHistogram(bins=4)
    >>> h.update(torch.tensor([[0.0, 0.5, 1.5, 2.5, 4.0]]))      # range [0, 4], width 1
    >>> h.counts.tolist()
    [[2, 1, 1, 1]]
    >>> h.update(torch.tensor([[7.5]]))                           # doubles to [0, 8], width 2
    >>> h.counts.tolist(), round(h.width.item(), 6)
    ([[3, 2, 0, 1]], 2.0)
    """

    def __init__(self, bins: int = 2048, origin: float | None = None) -> None:
        _check_bins(bins)
        if origin is not None and (
            isinstance(origin, bool) or not isinstance(origin, (int, float)) or not math.isfinite(origin)
        ):
            raise ValueError(f"origin must be None or a finite number, got {origin!r}")
        self.bins = bins
        self.origin = origin
        self.counts: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows ``(G, n)`` (one histogram per row) to the counts."""
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
            raise TypeError(f"update takes a floating-point tensor (G, n), got {_describe(rows)}")
        if rows.ndim != 2 or 0 in rows.shape:
            raise ValueError(f"update takes rows (G, n) with G, n >= 1, got shape {tuple(rows.shape)}")
        if self.counts is not None and rows.shape[0] != self.counts.shape[0]:
            raise ValueError(f"expected {self.counts.shape[0]} rows (groups), got {rows.shape[0]}")
        rows = rows.detach()
        row_min, row_max = rows.amin(dim=1), rows.amax(dim=1)
        if not bool((row_min.isfinite() & row_max.isfinite()).all()):
            raise ValueError(f"update got {_count_nonfinite(rows)}; the data must be finite")
        self._add(rows, row_min.to(torch.float64), row_max.to(torch.float64))

    def _add(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        """:meth:`update` for checked, finite rows ``(G, n)`` whose float64 extremes are already known."""
        if self.counts is None:
            self._start(row_min, row_max)
        self._grow(row_min, row_max)
        self.min = torch.minimum(self.min, row_min)
        self.max = torch.maximum(self.max, row_max)
        self.counts += self._bin(rows)

    def _bin_reference(self, rows: torch.Tensor) -> torch.Tensor:
        """Counts ``(G, B)`` of ``rows`` on the current edges: bin ``floor((x - lo) / width)``, in float64."""
        G, B = self.counts.shape
        bins = ((rows.to(torch.float64) - self.lo[:, None]) / self.width[:, None]).floor()  # (G, n)
        index = bins.clamp(0, B - 1).long()
        index += torch.arange(G, device=rows.device)[:, None] * B  # flat index into (G, B)
        return torch.bincount(index.flatten(), minlength=G * B).reshape(G, B)

    def _bin(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`_bin_reference`, bit for bit, in column chunks: no full-size float64 or index tensor.

        The data lies in ``[lo, lo + B * width)``, so ``(x - lo) / width`` is ``>= 0`` (truncation is the
        floor) and, after rounding, at most ``B``: the spare bin ``B`` of each row is folded into bin
        ``B - 1``, which is what the reference's clamp does.
        """
        G, B = self.counts.shape
        n = rows.shape[1]
        step = min(n, max(1, max(_CHUNK, G * (B + 1)) // G))  # columns per chunk
        lo, width = self.lo[:, None], self.width[:, None]
        index_dtype = torch.int32 if G * (B + 1) < 2**31 else torch.int64  # bincount reads int32 faster
        offsets = torch.arange(G, dtype=index_dtype, device=rows.device)[:, None] * (B + 1)  # (G, 1)
        work = torch.empty(G, step, dtype=torch.float64, device=rows.device)
        counts = torch.zeros(G * (B + 1), dtype=torch.int64, device=rows.device)
        for start in range(0, n, step):
            part = rows[:, start : start + step]
            t = work[:, : part.shape[1]]
            t.copy_(part).sub_(lo).div_(width).clamp_(0, B)  # (G, c): the bin, before truncation
            index = t.to(index_dtype)
            if G > 1:
                index += offsets
            counts += torch.bincount(index.flatten(), minlength=G * (B + 1))
        counts = counts.reshape(G, B + 1)
        counts[:, B - 1] += counts[:, B]
        return counts[:, :B]

    def _start(self, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        lo = row_min if self.origin is None else row_min.clamp(max=self.origin)
        span = row_max - lo
        tiny = (lo.abs() * 2.0**-20).clamp(min=2.0**-60)  # a constant first batch still gets a range
        self.lo = lo
        # bins are half-open [edge_j, edge_j+1): widen a hair so that the maximum lies inside the last one
        self.width = torch.where(span > 0, span, tiny) * (1 + 2.0**-30) / self.bins
        self.counts = torch.zeros(row_min.shape[0], self.bins, dtype=torch.int64, device=row_min.device)
        self.min, self.max = row_min.clone(), row_max.clone()

    def _grow(self, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        G, B = self.counts.shape
        while True:
            below = row_min < self.lo
            above = row_max >= self.lo + self.width * B
            grow = below | above
            if not grow.any():
                return
            merged = self.counts.reshape(G, B // 2, 2).sum(dim=2)  # (G, B // 2): pairs of bins
            empty = torch.zeros_like(merged)
            down, up = torch.cat([empty, merged], dim=1), torch.cat([merged, empty], dim=1)  # (G, B)
            self.counts = torch.where(grow[:, None], torch.where(below[:, None], down, up), self.counts)
            self.lo = torch.where(below, self.lo - self.width * B, self.lo)
            self.width = torch.where(grow, 2 * self.width, self.width)

    def _require_data(self) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("the StreamingHistogram has seen no data yet; call update(rows) first")
        return self.counts

    @property
    def total(self) -> torch.Tensor:
        """Number of values seen per row, ``(G,)``."""
        return self._require_data().sum(dim=1)

    def centers(self) -> torch.Tensor:
        """Bin centres ``(G, bins)``, float64."""
        self._require_data()
        j = torch.arange(self.bins, dtype=torch.float64, device=self.lo.device)
        return self.lo[:, None] + (j + 0.5) * self.width[:, None]

    def order_statistic(self, k: torch.Tensor) -> torch.Tensor:
        """Estimate of the ``k``-th smallest value (0-based, ``(G,)`` integers) of each row.

        The value lies in the bin where the cumulative count passes ``k``; within the bin the values are
        taken as evenly spread. The estimate is therefore within one bin width of the truth, and exact for
        ``k = 0`` (the minimum) and ``k = n - 1`` (the maximum).
        """
        counts = self._require_data()
        integer = isinstance(k, torch.Tensor) and not (k.is_floating_point() or k.is_complex())
        if not integer or k.dtype == torch.bool:
            raise TypeError(f"k must be an integer tensor (G,), got {_describe(k)}")
        if k.shape != (counts.shape[0],):
            raise ValueError(f"k must have shape ({counts.shape[0]},), a rank per row, got {tuple(k.shape)}")
        cum = self.counts.cumsum(dim=1)  # (G, B)
        b = torch.searchsorted(cum, k[:, None].to(cum.dtype), right=True).clamp(max=self.bins - 1)  # (G, 1)
        in_bin = self.counts.gather(1, b).squeeze(1).to(torch.float64)
        before = (cum.gather(1, b).squeeze(1) - self.counts.gather(1, b).squeeze(1)).to(torch.float64)
        inside = (k.to(torch.float64) - before + 0.5) / in_bin.clamp(min=1)
        value = self.lo + (b.squeeze(1).to(torch.float64) + inside) * self.width
        value = torch.where(k <= 0, self.min, torch.where(k >= self.total - 1, self.max, value))
        return torch.minimum(torch.maximum(value, self.min), self.max)

    def percentile(self, p: float) -> torch.Tensor:
        """``numpy.percentile(row, p)`` (linear interpolation between order statistics), within one bin."""
        self._require_data()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ValueError(f"p must be a number in [0, 100], got {p!r}")
        rank = (p / 100.0) * (self.total - 1).to(torch.float64)  # (G,)
        k0 = rank.floor().long()
        k1 = torch.minimum(k0 + 1, self.total - 1)
        v0, v1 = self.order_statistic(k0), self.order_statistic(k1)
        return v0 + (rank - k0) * (v1 - v0)


# --------------------------------------------------------------------------------------------------------
# The common base
# --------------------------------------------------------------------------------------------------------


_FLOAT32_MAX = torch.finfo(torch.float32).max


_CHUNK = 2**16  # elements per chunk when binning: the float64 work stays in the cache


def _count_nonfinite(x: torch.Tensor) -> str:
    """Describe the non-finite values of ``x`` (a slow path, run only once they are known to exist)."""
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    return f"{nan} NaN and {inf} infinite value(s) in a batch of shape {tuple(x.shape)}"


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


@dataclass(frozen=True, eq=False, kw_only=True)
class Observer(ABC):
    """Base of all observers (chapter 5): ``observe(x)`` (or ``obs(x)``), then ``range()`` and ``qparams()``.

    The configuration (``spec``: the integer grid; ``granularity``: who shares a scale) is frozen; the
    running statistics live in a private mutable state. ``range()`` returns ``(xmin, xmax)`` and
    ``qparams()`` returns ``calc_qparams(xmin, xmax, spec.qmin, spec.qmax, spec.symmetric)``, both shaped
    ``granularity.param_shape(x.shape)`` so they broadcast against the data. Every batch must have the same
    parameter shape (per tensor any shape; per channel the same number of channels in the same place).
    """

    spec: QuantSpec = INT8
    granularity: Granularity = field(default_factory=PerTensor)
    _state: SimpleNamespace = field(default_factory=SimpleNamespace, init=False, repr=False)

    name: ClassVar[str] = "observer"

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {self.spec!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise TypeError(
                f"granularity must be PerTensor, PerChannel or PerGroup, got {self.granularity!r}"
            )
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self._state.__dict__.clear()
        self._state.shape = None  # the first batch's shape (for the parameter shape)
        self._state.batches = 0

    @property
    def batches(self) -> int:
        """Number of batches observed since construction or :meth:`reset`."""
        return self._state.batches

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Update the statistics with the batch ``x``; returns ``x`` unchanged (it can sit in a forward)."""
        rows = self._rows(x)
        row_min, row_max = self._extremes(x, rows)
        self._update(rows, row_min, row_max)
        if self._state.shape is None:
            self._state.shape = tuple(x.shape)
        self._state.batches += 1
        self._state.cached = None
        return x

    __call__ = observe

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xmin, xmax)``, float32, each of shape ``granularity.param_shape(x.shape)``."""
        if self._state.batches == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data yet; call observe(x) first")
        if self._state.cached is None:
            xmin, xmax = self._range_rows()  # (G,) each
            shape = self._state.shape
            self._state.cached = tuple(
                rows_to_params(v.to(torch.float32), self.granularity, shape) for v in (xmin, xmax)
            )
        return self._state.cached

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the observed range: ``calc_qparams`` of chapter 3."""
        xmin, xmax = self.range()
        return calc_qparams(xmin, xmax, self.spec.qmin, self.spec.qmax, symmetric=self.spec.symmetric)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as float32 rows ``(G, n)``, after the checks that need no pass over the data."""
        who = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{who} observes floating-point tensors, got {_describe(x)}")
        if x.numel() == 0:
            raise ValueError(f"{who} got an empty batch of shape {tuple(x.shape)}")
        first = self._state.shape
        if first is not None and self.granularity.param_shape(x.shape) != self.granularity.param_shape(first):
            raise ValueError(
                f"{who} with {self.granularity} first saw shape {tuple(first)} and now {tuple(x.shape)}: "
                f"the parameter shape changed from {self.granularity.param_shape(first)} to "
                f"{self.granularity.param_shape(x.shape)}"
            )
        return self.granularity.groups(x.detach().to(torch.float32))  # (G, n)

    def _extremes(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(min, max)``; NaN and inf propagate into them, so they also check finiteness."""
        row_min, row_max = rows.amin(dim=1), rows.amax(dim=1)  # two vectorized passes beat aminmax(dim)
        if not bool((row_min.isfinite() & row_max.isfinite()).all()):
            who = type(self).__name__
            if bool(torch.isfinite(x).all()):  # finite float64 data beyond float32's range
                raise ValueError(
                    f"{who} got values up to {x.abs().max().item():.4g} in magnitude in a batch of shape "
                    f"{tuple(x.shape)}: beyond float32's range ({_FLOAT32_MAX:.4g}), in which observers work"
                )
            raise ValueError(f"{who} got {_count_nonfinite(x)}; calibration data must be finite")
        return row_min, row_max

    @abstractmethod
    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        """Fold one batch, as rows ``(G, n)`` of its quantization groups with their extremes ``(G,)``, into
        the running statistics."""

    @abstractmethod
    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xmin, xmax)`` per group, each ``(G,)``, from the running statistics."""


# --------------------------------------------------------------------------------------------------------
# Min/max and its moving average
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class MinMaxObserver(Observer):
    """The range is the extremes seen: ``xmin = min over all batches of min x`` (likewise ``xmax``).

    With the default affine int8 grid this reproduces ``torch.ao.quantization.MinMaxObserver``.

    >>> import torch
    >>> from qbook.granularity import PerChannel
    >>> obs = MinMaxObserver(granularity=PerChannel(axis=0))
    >>> _ = obs(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    >>> [v.flatten().tolist() for v in obs.range()]
    [[-2.0, 3.0], [1.0, 4.0]]
    """

    name: ClassVar[str] = "min/max"

    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        if self._state.batches == 0:
            self._state.min, self._state.max = row_min, row_max
        else:
            self._state.min = torch.minimum(self._state.min, row_min)
            self._state.max = torch.maximum(self._state.max, row_max)

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state.min, self._state.max


@dataclass(frozen=True, eq=False, kw_only=True)
class MovingAverageObserver(Observer):
    """An exponential moving average of the batch extremes, as in torch.ao's
    ``MovingAverageMinMaxObserver``: the first batch sets the range, then for each batch

    ``xmin <- xmin + c * (min x - xmin)``,  ``xmax <- xmax + c * (max x - xmax)``

    with ``c = averaging_constant`` (0.01). A single outlier batch moves the range by only ``c`` of its
    excess, which is why QAT uses it.

    >>> import torch
    >>> obs = MovingAverageObserver(averaging_constant=0.5)
    >>> for x in ([0.0, 1.0], [0.0, 3.0]): _ = obs(torch.tensor(x))
    >>> obs.range()[1]
    tensor(2.)
    """

    averaging_constant: float = 0.01
    name: ClassVar[str] = "moving average"

    def __post_init__(self) -> None:
        c = self.averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {c!r}")
        super().__post_init__()

    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        if self._state.batches == 0:
            self._state.min, self._state.max = row_min, row_max
        else:
            c = self.averaging_constant
            self._state.min = self._state.min + c * (row_min - self._state.min)
            self._state.max = self._state.max + c * (row_max - self._state.max)

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._state.min, self._state.max


# --------------------------------------------------------------------------------------------------------
# Histogram observers
# --------------------------------------------------------------------------------------------------------


def _check_bins(bins: object) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins % 2:
        raise ValueError(f"bins must be an even int >= 2 (bins merge in pairs), got {bins!r}")


@dataclass(frozen=True, eq=False, kw_only=True)
class _HistogramObserver(Observer):
    bins: int = 2048

    def __post_init__(self) -> None:
        _check_bins(self.bins)
        super().__post_init__()

    def reset(self) -> None:
        super().reset()
        self._state.hist = StreamingHistogram(self.bins)

    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        self._state.hist._add(rows, row_min.to(torch.float64), row_max.to(torch.float64))


@dataclass(frozen=True, eq=False, kw_only=True)
class PercentileObserver(_HistogramObserver):
    """The range is ``[P_(100 - p), P_p]``: the ``100 - p`` and ``p`` percentiles of everything observed.

    Percentiles are read off a :class:`StreamingHistogram` (``bins`` per row), so they match
    ``numpy.percentile`` of the concatenated batches to within one bin width. ``p = 100`` is min/max. With a
    symmetric grid, ``calc_qparams`` then uses the larger magnitude of the two.

    >>> import torch
    >>> obs = PercentileObserver(percentile=99.0)
    >>> _ = obs(torch.cat([torch.linspace(-1, 1, 999), torch.tensor([50.0])]))
    >>> [round(v.item(), 2) for v in obs.range()]
    [-0.98, 0.98]
    """

    percentile: float = 99.99
    name: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p!r}")
        super().__post_init__()

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self._state.hist
        lo, hi = hist.percentile(100.0 - self.percentile), hist.percentile(self.percentile)
        return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _histogram_mse(hist: StreamingHistogram, alphas: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantization MSE ``(C, G)`` of the ranges ``alpha * [min x, max x]`` for each of the ``C`` ``alphas``,
    each bin's count placed at its centre: ``sum_j n_j (c_j - Q(c_j))^2 / n``."""
    xmin = alphas[:, None] * hist.min[None, :]  # (C, G)
    xmax = alphas[:, None] * hist.max[None, :]
    scale, zero_point = calc_qparams(xmin, xmax, spec.qmin, spec.qmax, symmetric=spec.symmetric)
    scale, zero_point = scale[:, :, None], zero_point[:, :, None]  # (C, G, 1)
    centers = hist.centers().clamp(-_FLOAT32_MAX, _FLOAT32_MAX)  # bins past float32's range are empty
    centers = centers.to(torch.float32).expand(alphas.numel(), -1, -1)  # (C, G, B)
    q = quantize(centers, scale, zero_point, spec.qmin, spec.qmax)  # (C, G, B)
    error = (centers - dequantize(q, scale, zero_point)).to(torch.float64) ** 2
    error = torch.where(hist.counts > 0, error, 0.0)  # an empty bin costs 0, even where a level overflows
    return (hist.counts * error).sum(dim=2) / hist.total


@dataclass(frozen=True, eq=False, kw_only=True)
class MSEObserver(_HistogramObserver):
    """The range ``alpha * [min x, max x]`` with the ``alpha`` in ``{1/grid, 2/grid, ..., 1}`` that minimises
    the expected quantization MSE computed from the histogram,

    ``MSE(alpha) = (1/n) sum_j n_j (c_j - Q_alpha(c_j))^2``

    where ``n_j`` and ``c_j`` are the count and centre of bin ``j`` and ``Q_alpha`` is quantize-dequantize
    with the parameters of the shrunk range. It counts rounding error inside the range and clipping error
    outside; ``alpha = 1`` (min/max) is a candidate, so the result is never worse than min/max by this
    measure. (For uniform data the optimum is not the full range but the one whose outermost levels sit half
    a step inside it; see the tests and chapter 5's exercises.)

    >>> import torch
    >>> from qbook.affine import QuantSpec
    >>> x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    >>> obs = MSEObserver(spec=QuantSpec(4, symmetric=True)); _ = obs(x)
    >>> round(obs.range()[1].item(), 2), round(x.max().item(), 2)   # 4 bits: clip a Gaussian near 2.5 sigma
    (2.56, 4.56)
    """

    grid: int = 100
    name: ClassVar[str] = "MSE"

    def __post_init__(self) -> None:
        _check_positive_int(self.grid, "grid")
        super().__post_init__()

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self._state.hist
        alphas = self.alphas()  # (C,), from 1 down: among equal errors argmin keeps the widest range
        G, B = hist.counts.shape
        chunk = max(1, 2**21 // (G * B))
        error = torch.cat([_histogram_mse(hist, part, self.spec) for part in alphas.split(chunk)])  # (C, G)
        best = error.argmin(dim=0)  # (G,)
        self._state.error = error.gather(0, best[None]).squeeze(0)
        return alphas[best] * hist.min, alphas[best] * hist.max

    def alphas(self) -> torch.Tensor:
        """The candidate shrink factors ``1, (grid - 1) / grid, ..., 1 / grid``, float64."""
        return torch.arange(self.grid, 0, -1, dtype=torch.float64) / self.grid


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """``[0, v0, v0 + v1, ...]`` along the last dimension: sums over ``[a, b)`` become ``P[b] - P[a]``."""
    return torch.nn.functional.pad(values.cumsum(dim=-1), (1, 0))


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp(min=1e-300)), torch.zeros_like(x))


def kl_divergence(counts: torch.Tensor, stops: torch.Tensor, levels: int) -> torch.Tensor:
    """TensorRT's calibration objective (Migacz, 2017) for each candidate ``stop`` and row of ``counts``.

    ``counts`` ``(G, B)`` is a histogram of ``|x|`` starting at 0; for a candidate threshold at the upper edge
    of bin ``i - 1`` (``i = stop``):

    1. reference ``P = counts[:i]`` with the outliers ``sum(counts[i:])`` added to its last bin;
    2. quantized ``Q``: ``counts[:i]`` merged into ``levels`` groups of ``i // levels`` bins (the last group
       takes the remainder), each group's sum spread evenly over its bins where ``P`` is non-zero;
    3. ``KL(P || Q) = sum_j p_j log(p_j / q_j)`` after normalising both to sum 1 (``inf`` where ``Q`` has
       zero mass under ``P``: such a threshold is never chosen).

    Since ``q_j`` is constant over the non-zero bins of a group, the sum needs only per-group totals, read
    from prefix sums: with ``N_P = sum p``, ``N_Q = sum q``, group sums ``S_g`` of ``counts[:i]``, group
    masses ``P_g`` of ``P`` and non-zero counts ``z_g``,

    ``KL = (sum_j p_j log p_j - sum_g P_g log(S_g / z_g)) / N_P - log N_P + log N_Q``,

    ``O(levels)`` work per candidate instead of ``O(i)``. Returns ``(C, G)`` for the ``C`` candidate stops
    (each ``levels <= stop <= B``).

    >>> import torch
    >>> counts = torch.tensor([[4, 4, 2, 2, 0, 1]])
    >>> kl_divergence(counts, torch.tensor([2, 6]), levels=2).flatten()
    tensor([0.0759, 0.0467], dtype=torch.float64)
    """
    counts, stops = _check_kl(counts, stops, levels)
    G, B = counts.shape
    C = stops.numel()
    counts = counts.to(torch.float64)
    sum_c, sum_nz = _prefix(counts), _prefix((counts > 0).double())  # (G, B + 1)
    sum_clogc = _prefix(_xlogx(counts))
    total = sum_c[:, -1]  # (G,)
    k = torch.arange(levels + 1, device=counts.device)
    edges = torch.minimum(k[None, :] * (stops // levels)[:, None], stops[:, None])  # (C, L+1)
    edges[:, -1] = stops  # the last group takes the remainder

    def at(prefix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # prefix (G, B+1), index (C, ...)
        flat = index.reshape(C, -1)
        return prefix[None].expand(C, G, B + 1).gather(2, flat[:, None, :].expand(C, G, flat.shape[1]))

    S = at(sum_c, edges).diff(dim=2)  # (C, G, L): group sums of counts[:i]
    z = at(sum_nz, edges).diff(dim=2)  # non-zero bins per group
    c_last = at(torch.nn.functional.pad(counts, (1, 0)), stops[:, None]).squeeze(2)  # (C, G) = counts[i-1]
    inside = at(sum_c, stops[:, None]).squeeze(2)  # (C, G) = N_Q
    outliers = total[None, :] - inside
    z_last = z[:, :, -1] + ((c_last == 0) & (outliers > 0)).double()
    z = torch.cat([z[:, :, :-1], z_last[:, :, None]], dim=2)
    P = torch.cat([S[:, :, :-1], (S[:, :, -1] + outliers)[:, :, None]], dim=2)  # group masses of p
    plogp = at(sum_clogc, stops[:, None] - 1).squeeze(2) + _xlogx(c_last + outliers)  # sum_j p_j log p_j
    starved = ((P > 0) & (S == 0)).any(dim=2)  # Q has no mass where P has
    log_q = torch.log(S.clamp(min=1e-300) / z.clamp(min=1))  # log of q_j in each group (unnormalised)
    plogq = torch.where(P > 0, P * log_q, torch.zeros_like(P)).sum(dim=2)
    kl = (plogp - plogq) / total - torch.log(total) + torch.log(inside.clamp(min=1e-300))
    return torch.where(starved, torch.full_like(kl, math.inf), kl.clamp(min=0.0))


def _check_kl(counts: object, stops: object, levels: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(counts, torch.Tensor) or counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts must be a real number tensor (G, B), got {_describe(counts)}")
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"counts must be 2-D (G, B) with G, B >= 1, got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("counts must be finite and non-negative (a histogram)")
    _check_positive_int(levels, "levels")
    stops = torch.as_tensor(stops, device=counts.device)
    if stops.is_floating_point() or stops.is_complex() or stops.dtype == torch.bool:
        raise TypeError(f"stops must be integers, got {_describe(stops)}")
    stops = stops.to(torch.int64).flatten()
    B = counts.shape[1]
    if stops.numel() == 0:
        raise ValueError("stops is empty; give at least one stop (candidate threshold)")
    if ((stops < levels) | (stops > B)).any():
        raise ValueError(f"every stop must lie in [levels, bins] = [{levels}, {B}], got {stops.tolist()}")
    return counts, stops


@dataclass(frozen=True, eq=False, kw_only=True)
class EntropyObserver(Observer):
    """Entropy (KL-divergence) calibration of TensorRT (Migacz, 2017): a histogram of ``|x|`` with ``bins``
    bins, every candidate threshold ``T = i * width`` for ``i = levels, levels + stride, ..., bins``, and the
    ``T`` minimising :func:`kl_divergence` with ``levels = (qmax - qmin + 1) // 2`` (128 for int8, as in the
    paper). The range is ``[max(min x, -T), min(max x, T)]``.

    The threshold ``i = bins`` (no clipping) is always a candidate, so the chosen one never has a larger
    divergence than min/max.

    >>> import torch
    >>> x = torch.cat([torch.randn(20_000, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0])])
    >>> obs = EntropyObserver(); _ = obs(x)
    >>> 2 < obs.range()[1].item() < 10
    True
    """

    bins: int = 2048
    stride: int = 1
    name: ClassVar[str] = "entropy"

    def __post_init__(self) -> None:
        _check_bins(self.bins)
        _check_positive_int(self.stride, "stride")
        levels = (self.spec.qmax - self.spec.qmin + 1) // 2
        if levels > self.bins:
            raise ValueError(f"bins ({self.bins}) must be at least the {levels} levels of {self.spec}")
        super().__post_init__()

    @property
    def levels(self) -> int:
        return (self.spec.qmax - self.spec.qmin + 1) // 2

    def reset(self) -> None:
        super().reset()
        self._state.hist = StreamingHistogram(self.bins, origin=0.0)

    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        magnitude = rows.abs()
        abs_min, abs_max = magnitude.amin(dim=1), magnitude.amax(dim=1)
        self._state.hist._add(magnitude, abs_min.to(torch.float64), abs_max.to(torch.float64))
        if self._state.batches == 0:
            self._state.min, self._state.max = row_min, row_max
        else:
            self._state.min = torch.minimum(self._state.min, row_min)
            self._state.max = torch.maximum(self._state.max, row_max)

    def candidates(self) -> torch.Tensor:
        """The candidate stops ``i`` (threshold ``i * width``), always including ``bins``."""
        stops = list(range(self.levels, self.bins + 1, self.stride))
        if stops[-1] != self.bins:
            stops.append(self.bins)
        return torch.tensor(stops)

    def divergences(self) -> torch.Tensor:
        """:func:`kl_divergence` of every candidate, ``(C, G)``, computed in chunks of bounded memory."""
        hist = self._state.hist
        stops = self.candidates()
        G = hist.counts.shape[0]
        chunk = max(1, 2**20 // (G * (self.levels + 1)))  # kl_divergence works on (C, G, levels + 1)
        return torch.cat([kl_divergence(hist.counts, part, self.levels) for part in stops.split(chunk)])

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self._state.hist
        kl = self.divergences()  # (C, G)
        best = kl.argmin(dim=0)  # (G,): the first (smallest) threshold among equals
        threshold = (self.candidates()[best].to(torch.float64) * hist.width).to(torch.float32)
        xmin = torch.maximum(self._state.min, -threshold)
        xmax = torch.minimum(self._state.max, threshold)
        return xmin, xmax


def _l2_error(
    hist: StreamingHistogram, xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Expected squared error per value, ``(K, G)``, of quantizing each row's data to the grid of each of the
    ``K`` candidate ranges ``[xmin, xmax]`` (each ``(K, G)``).

    A value inside the grid's limits ``[(qmin - zero_point) * scale, (qmax - zero_point) * scale]`` costs the
    uniform rounding noise ``scale^2 / 12``; a bin of centre ``c`` beyond a limit costs
    ``(c - limit)^2 + width^2 / 12`` per value. The clipped sums ``sum_j n_j (c_j - limit)^2`` expand into
    prefix sums of ``n_j``, ``n_j c_j`` and ``n_j c_j^2``, so each candidate costs ``O(1)`` per row.
    """
    scale, zero_point = calc_qparams(xmin.float(), xmax.float(), spec.qmin, spec.qmax, spec.symmetric)
    scale, zero_point = scale.to(torch.float64), zero_point.to(torch.float64)
    lower = (spec.qmin - zero_point) * scale  # (K, G): the lowest and highest levels of the grid
    upper = (spec.qmax - zero_point) * scale
    n = hist.counts.to(torch.float64)
    c = hist.centers()
    K, (G, B) = lower.shape[0], n.shape
    sums = [_prefix(n * c**p)[None].expand(K, G, B + 1) for p in (0, 1, 2)]  # (K, G, B+1) each
    lo, w = hist.lo[None, :], hist.width[None, :]
    below = torch.ceil((lower - lo) / w - 0.5).clamp(0, B).long()  # bins with centre < lower
    inside = (torch.floor((upper - lo) / w - 0.5) + 1).clamp(0, B).long()  # bins with centre <= upper
    inside = torch.maximum(inside, below)

    def head(index: torch.Tensor) -> list[torch.Tensor]:  # sums over bins [0, index)
        return [s.gather(2, index[:, :, None]).squeeze(2) for s in sums]

    n_lo, s1_lo, s2_lo = head(below)
    n_in, s1_in, s2_in = head(inside)
    n_all, s1_all, s2_all = (s[:, :, -1] for s in sums)
    n_hi, s1_hi, s2_hi = n_all - n_in, s1_all - s1_in, s2_all - s2_in
    clip_lo = lower**2 * n_lo - 2 * lower * s1_lo + s2_lo  # sum over clipped-low bins of n (lower - c)^2
    clip_hi = upper**2 * n_hi - 2 * upper * s1_hi + s2_hi
    rounding = (n_in - n_lo) * scale**2 / 12
    bin_spread = (n_lo + n_hi) * w**2 / 12
    return (clip_lo.clamp(min=0) + clip_hi.clamp(min=0) + rounding + bin_spread) / n_all


@dataclass(frozen=True, eq=False, kw_only=True)
class L2HistogramObserver(_HistogramObserver):
    """The range minimising the L2 quantization error, rounding and clipping together (the idea of torch.ao's
    ``HistogramObserver``, implemented independently as an exhaustive search).

    With ``delta = (max x - min x) / steps``, the candidates are every ``[min x + k delta, max x - l delta]``
    with ``k + l < steps`` (a symmetric grid: every ``[-t, t]``, ``t = amax (1 - l / steps)``), and each one's
    error is estimated from the histogram by :func:`_l2_error` (rounding noise ``scale^2 / 12`` inside the
    grid, squared distance to the limit outside). The untrimmed range is a candidate, so the result is never
    worse than min/max by this measure.

    >>> import torch
    >>> from qbook.affine import QuantSpec
    >>> x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    >>> obs = L2HistogramObserver(spec=QuantSpec(4, symmetric=True)); _ = obs(x)
    >>> round(obs.range()[1].item(), 2)                 # 4 bits: clip a Gaussian near 2.5 sigma
    2.57
    """

    steps: int = 128
    name: ClassVar[str] = "L2 histogram"

    def __post_init__(self) -> None:
        _check_positive_int(self.steps, "steps")
        super().__post_init__()

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate ranges ``(xmin, xmax)``, each ``(K, G)``; the first is the untrimmed range."""
        hist = self._state.hist
        lo, hi = hist.min[None, :], hist.max[None, :]  # (1, G)
        steps = torch.arange(self.steps, dtype=torch.float64)
        if self.spec.symmetric:
            amax = torch.maximum(-lo, hi)
            t = amax * (1 - steps[:, None] / self.steps)  # (K, G)
            return -t, t
        k, l = torch.meshgrid(steps, steps, indexing="ij")
        keep = (k + l) < self.steps
        k, l = k[keep][:, None], l[keep][:, None]  # (K, 1)
        delta = (hi - lo) / self.steps
        return lo + k * delta, hi - l * delta

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self._state.hist
        xmin, xmax = self.candidates()
        G, B = hist.counts.shape
        chunk = max(1, 2**22 // (G * (B + 1)))
        parts = zip(xmin.split(chunk), xmax.split(chunk), strict=True)
        error = torch.cat([_l2_error(hist, a, b, self.spec) for a, b in parts])  # (K, G)
        best = error.argmin(dim=0)[None]  # (1, G): the first minimum, the widest range among equals
        self._state.error = error.gather(0, best).squeeze(0)
        return xmin.gather(0, best).squeeze(0), xmax.gather(0, best).squeeze(0)


#: The observers by short name, for tables and loops (``OBSERVERS["percentile"](percentile=99.9)``).
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "l2": L2HistogramObserver,
}
