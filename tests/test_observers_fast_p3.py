"""Fast histogram binning (issue 9) equals the teaching one bit for bit: ``_bin`` == ``_bin_reference``."""

from __future__ import annotations

import pytest
import torch

from qbook import observers
from qbook.observers import StreamingHistogram


def edge_values(hist: StreamingHistogram, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every bin edge ``lo + j * width`` rounded to ``dtype`` and its two neighbours: the hardest inputs."""
    j = torch.arange(hist.bins + 1, dtype=torch.float64)
    edges = (hist.lo[:, None] + j * hist.width[:, None]).to(dtype)  # (G, B + 1)
    inf = torch.full_like(edges, torch.inf)
    up, down = torch.nextafter(edges, inf), torch.nextafter(edges, -inf)  # the neighbours in dtype
    values = torch.cat([edges, up, down], dim=1)
    high = (hist.lo + hist.width * hist.bins)[:, None]
    inside = (values.double() >= hist.lo[:, None]) & (values.double() < high)
    return torch.where(inside, values, hist.min[:, None].to(dtype))  # keep the rows' ranges unchanged


def assert_fast_equals_reference(hist: StreamingHistogram, rows: torch.Tensor) -> None:
    fast, reference = hist._bin(rows), hist._bin_reference(rows)
    assert fast.dtype == reference.dtype == torch.int64
    assert torch.equal(fast, reference)
    assert int(fast.sum()) == rows.numel()


@pytest.mark.parametrize("bins", [2, 8, 2048])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_bin_fast_equals_reference_on_edges(bins, G, dtype):
    g = torch.Generator().manual_seed(bins + G)
    hist = StreamingHistogram(bins)
    first = (torch.randn(G, 1000, generator=g) * torch.logspace(-3, 3, G)[:, None]).to(dtype)
    hist.update(first)
    hist.update((first.double() * 3 + 1).to(dtype))  # grown: lo and width no longer simple
    assert_fast_equals_reference(hist, first)
    assert_fast_equals_reference(hist, edge_values(hist, dtype))


def test_bin_fast_equals_reference_across_chunks():
    g = torch.Generator().manual_seed(0)
    hist = StreamingHistogram(64)
    rows = torch.randn(1, 3 * observers._CHUNK + 17, generator=g)  # several chunks and a ragged last one
    hist.update(rows)
    assert_fast_equals_reference(hist, rows)
    many = torch.randn(700, 300, generator=g)  # G * (B + 1) > one chunk: per-row offsets over wide counts
    hist = StreamingHistogram(128)
    hist.update(many)
    assert_fast_equals_reference(hist, many)


@pytest.mark.parametrize(
    "values",
    [
        [3.0] * 5,  # constant: a tiny width
        [0.0] * 4,
        [1e-45, 3e-45, -1e-45],  # subnormals
        [-3.4e38, 3.4e38],  # the widest finite float32 range
        [1.0, 1.0 + 2**-23, 1.0 + 2**-22],  # adjacent floats
    ],
)
def test_bin_fast_equals_reference_on_degenerate_ranges(values):
    rows = torch.tensor([values])
    hist = StreamingHistogram(2048)
    hist.update(rows)
    assert_fast_equals_reference(hist, rows)
    assert_fast_equals_reference(hist, edge_values(hist))


def test_streaming_counts_equal_reference_streaming():
    """A whole stream of updates (growth in both directions) gives the counts of the reference binning."""
    g = torch.Generator().manual_seed(1)
    fast, slow = StreamingHistogram(256), StreamingHistogram(256)
    slow._bin = slow._bin_reference  # the teaching implementation drives the second one
    for i in range(6):
        batch = torch.randn(2, 5000, generator=g) * (1 + 3 * i) + (-1) ** i * 4 * i
        fast.update(batch)
        slow.update(batch)
    for name in ("counts", "lo", "width", "min", "max"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
