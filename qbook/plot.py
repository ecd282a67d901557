"""Figures and tables for the book: one style, labelled axes, modest PNGs, Markdown tables.

Every chapter draws through these helpers so that all figures look alike::

    from qbook import plot
    fig, ax = plot.figure()            # one axes, book-wide size and style
    ax.plot(x, y, label="fp16")
    plot.finish(fig, ax, xlabel="value", ylabel="spacing", title="ULP of fp16")

In a notebook the figure then renders inline as a PNG; ``plot.finish`` closes nothing, so the
cell's last expression (or ``plt.show()``) displays it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["COLORS", "STYLE", "apply_style", "figure", "finish", "markdown_table", "table"]

#: A colour-blind-safe cycle (Okabe & Ito, 2008), used by every figure of the book.
COLORS: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # green
    "#CC79A7",  # purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: Matplotlib settings shared by all figures.
STYLE: dict[str, object] = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.figsize": (7.0, 3.6),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=list(COLORS)),
    "legend.frameon": False,
    "legend.fontsize": 9,
    "image.cmap": "viridis",
    "svg.hashsalt": "qbook",
}


def apply_style() -> None:
    """Set the book's matplotlib style globally (called by :func:`figure`)."""
    mpl.rcParams.update(STYLE)


def figure(
    nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None, **kwargs
) -> tuple[Figure, Axes | object]:
    """Create a figure in the book's style; returns ``(fig, ax)`` like :func:`matplotlib.pyplot.subplots`.

    ``width``/``height`` are in inches; by default the figure is 7 in wide and 3.6 in tall per row.
    """
    apply_style()
    w = width if width is not None else STYLE["figure.figsize"][0]  # type: ignore[index]
    h = height if height is not None else STYLE["figure.figsize"][1] * max(1, nrows) ** 0.8  # type: ignore[index]
    if w <= 0 or h <= 0:
        raise ValueError(f"figure size must be positive, got width={w!r}, height={h!r}")
    return plt.subplots(nrows, ncols, figsize=(w, h), **kwargs)


def finish(
    fig: Figure,
    axes: Axes | Iterable[Axes],
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    legend: bool | None = None,
) -> Figure:
    """Label the axes (each of ``axes`` when several), add a legend where lines are labelled; return ``fig``.

    A figure with several axes gets ``title`` as its suptitle.
    """
    ax_list = [axes] if isinstance(axes, Axes) else list(axes)
    for ax in ax_list:
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        if ylabel is not None:
            ax.set_ylabel(ylabel)
        handles, _ = ax.get_legend_handles_labels()
        if (legend is None and handles) or legend:
            ax.legend()
    if title is not None:
        if len(ax_list) == 1:
            ax_list[0].set_title(title)
        else:
            fig.suptitle(title)
    return fig


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown (pipe) table from a header and rows of already formatted cells. A ``|`` inside a cell (an
    absolute value, ``|x|``) is escaped, so it cannot split the cell.

    >>> print(markdown_table(["bits", "SQNR (dB)", "max |error|"], [[8, "49.9", 0.002], [4, "25.8", 0.03]]))
    | bits | SQNR (dB) | max \\|error\\| |
    |---|---|---|
    | 8 | 49.9 | 0.002 |
    | 4 | 25.8 | 0.03 |
    """
    header = [_cell(cell) for cell in header]
    if not header:
        raise ValueError("a table needs at least one column")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [_cell(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"row {i} has {len(cells)} cells, expected {len(header)}: {cells!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
    """Display :func:`markdown_table` in a notebook (the book renders it as an HTML table)."""
    from IPython.display import Markdown, display

    display(Markdown(markdown_table(header, rows)))
