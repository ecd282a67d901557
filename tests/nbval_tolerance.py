"""nbval with numeric tolerances: a notebook cell may declare how far its printed numbers may move.

The book's notebooks are its tests (nbval re-runs each cell and compares the output with the committed one).
Integer and bit-exact outputs must match character for character. A float printed from work whose rounding
depends on the CPU (the order of a BLAS reduction, a norm, a model's forward pass) may differ in its last
digits between an AVX-512 and an ARM machine, so such a cell opts in through its metadata::

    "metadata": {"qbook": {"rtol": 1e-4, "atol": 0.0}}

Then the text between numbers must still match exactly, and each number ``t`` of the new output must satisfy
``|t - r| <= atol + rtol * |r|`` against the committed number ``r``. Cells without the key are compared
exactly.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pytest

#: A decimal number as Python, NumPy and torch print it: sign, digits, fraction, exponent; also nan and inf.
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|(?<!\w)[-+]?(?:nan|inf)(?!\w)")

#: The MIME types of rich outputs whose text is compared with the tolerance (streams always are); myst_nb.glue
#: with ``display=False`` stores its value under ``application/papermill.record/<type>``.
TEXT_MIME = tuple(
    prefix + kind
    for prefix in ("", "application/papermill.record/")
    for kind in ("text/plain", "text/markdown", "text/html", "text/latex")
)


def split_numbers(text: str) -> tuple[list[str], list[float]]:
    """``text`` as the pieces between numbers and the numbers (``len(pieces) == len(numbers) + 1``)."""
    pieces, numbers, start = [], [], 0
    for match in NUMBER.finditer(text):
        pieces.append(text[start : match.start()])
        numbers.append(float(match.group()))
        start = match.end()
    pieces.append(text[start:])
    return pieces, numbers


def close(reference: float, test: float, rtol: float, atol: float) -> bool:
    """``|test - reference| <= atol + rtol * |reference|``; NaN matches NaN and an infinity only itself."""
    if math.isnan(reference) or math.isnan(test):
        return math.isnan(reference) and math.isnan(test)
    if math.isinf(reference) or math.isinf(test):
        return reference == test
    return abs(test - reference) <= atol + rtol * abs(reference)


def within_tolerance(reference: str, test: str, rtol: float, atol: float) -> bool:
    """Whether ``test`` equals ``reference`` up to its numbers, each within the tolerance."""
    if reference == test:
        return True
    ref_pieces, ref_numbers = split_numbers(reference)
    test_pieces, test_numbers = split_numbers(test)
    if ref_pieces != test_pieces or len(ref_numbers) != len(test_numbers):
        return False
    return all(close(r, t, rtol, atol) for r, t in zip(ref_numbers, test_numbers, strict=True))


def cell_tolerance(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """The ``(rtol, atol)`` a cell declares under ``metadata["qbook"]``, or None (compare exactly)."""
    spec = metadata.get("qbook")
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not spec or set(spec) - {"rtol", "atol"}:
        raise ValueError(f'cell metadata "qbook" must be a mapping with keys rtol and/or atol, got {spec!r}')
    values = []
    for key in ("rtol", "atol"):
        value = spec.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f'cell metadata "qbook" {key} must be a number in [0, 1), got {value!r}')
        values.append(float(value))
    return values[0], values[1]


def _texts(outputs: list[Mapping[str, Any]]) -> dict[str, list[tuple[Mapping[str, Any], str]]]:
    """Each text field of ``outputs`` grouped by key, in order, with the mapping that holds it."""
    found: dict[str, list[tuple[Mapping[str, Any], str]]] = defaultdict(list)
    for output in outputs:
        if output.get("output_type") == "stream":
            found[f"stream:{output.get('name')}"].append((output, "text"))
            continue
        data = output.get("data", {})
        for key in TEXT_MIME:
            if isinstance(data.get(key), str):
                found[key].append((data, key))
    return found


def relax(test: list[Any], reference: list[Any], rtol: float, atol: float) -> None:
    """Replace, in place, each text of ``test`` that matches its ``reference`` counterpart within tolerance
    by the reference text, so that nbval's exact comparison then passes exactly where the tolerance allows."""
    test_texts, ref_texts = _texts(test), _texts(reference)
    for key, pairs in test_texts.items():
        refs = ref_texts.get(key, [])
        if len(refs) != len(pairs):
            continue  # nbval reports the differing number of outputs itself
        for (holder, field), (ref_holder, ref_field) in zip(pairs, refs, strict=True):
            if within_tolerance(ref_holder[ref_field], holder[field], rtol, atol):
                holder[field] = ref_holder[ref_field]


def _install() -> None:
    from nbval import plugin

    if getattr(plugin.IPyNbCell.compare_outputs, "_qbook_tolerant", False):
        return
    exact = plugin.IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):  # type: ignore[no-untyped-def]
        tolerance = cell_tolerance(self.cell.get("metadata", {}))
        if tolerance is not None:
            relax(test, ref, *tolerance)
        return exact(self, test, ref, skip_compare)

    compare_outputs._qbook_tolerant = True  # type: ignore[attr-defined]
    plugin.IPyNbCell.compare_outputs = compare_outputs


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("nbval"):
        _install()
