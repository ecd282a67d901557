"""qbook.plot: the book's figure style and Markdown tables."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from qbook import plot  # noqa: E402


def test_markdown_table_layout():
    text = plot.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]


def test_markdown_table_keeps_pipes_inside_cells():
    """``|x|`` in a cell must not split it: the rendered table keeps its columns and shows the bars."""
    from markdown_it import MarkdownIt

    text = plot.markdown_table(["layer", "mean |x|"], [["q", "|-2|"]])
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.count("<th>") == 2 and html.count("<td>") == 2
    assert "<th>mean |x|</th>" in html and "<td>|-2|</td>" in html


@pytest.mark.parametrize(
    "header, rows, match",
    [([], [], "at least one column"), (["a", "b"], [[1]], "row 0 has 1 cells, expected 2")],
)
def test_markdown_table_bad_input(header, rows, match):
    with pytest.raises(ValueError, match=match):
        plot.markdown_table(header, rows)


def test_figure_and_finish_label_axes():
    fig, ax = plot.figure()
    ax.plot([0, 1], [0, 1], label="line")
    plot.finish(fig, ax, xlabel="x", ylabel="y", title="t")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("x", "y", "t")
    assert ax.get_legend() is not None
    assert tuple(fig.get_size_inches()) == pytest.approx(plot.STYLE["figure.figsize"])
    plt.close(fig)


def test_figure_rejects_a_non_positive_size():
    with pytest.raises(ValueError, match="width=0"):
        plot.figure(width=0)
