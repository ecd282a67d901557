"""The nbval tolerance plugin: exact text between numbers, each number within the declared tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nbval_tolerance import cell_tolerance, close, relax, split_numbers, within_tolerance

TESTS = Path(__file__).resolve().parent


def test_split_numbers_finds_python_numpy_and_torch_numbers() -> None:
    pieces, numbers = split_numbers("cos 0.9376, SQNR -12.5 dB, 1.5e-05, tensor([3, nan, -inf]) fp16")
    assert numbers[:4] == [0.9376, -12.5, 1.5e-05, 3.0]
    assert str(numbers[4]) == "nan" and numbers[5] == float("-inf") and len(numbers) == 6
    # digits inside names (fp16) stay text
    assert pieces == ["cos ", ", SQNR ", " dB, ", ", tensor([", ", ", ", ", "]) fp16"]


@pytest.mark.parametrize(
    ("ref", "test", "rtol", "atol", "ok"),
    [
        ("mean cosine 0.9376", "mean cosine 0.9370", 1e-3, 0.0, True),
        ("mean cosine 0.9376", "mean cosine 0.9370", 1e-4, 0.0, False),
        ("mean cosine 0.9376", "mean cosine 0.9376", 0.0, 0.0, True),
        ("mean cosine 0.9376", "mean sine 0.9376", 1.0 - 1e-9, 0.0, False),  # the text must match exactly
        ("error 0.0", "error 1e-08", 0.0, 1e-7, True),
        ("error 0.0", "error 1e-06", 0.0, 1e-7, False),
        ("[1, 2]", "[1, 2, 3]", 0.5, 0.0, False),  # a different count of numbers
        ("x nan", "x nan", 0.0, 0.0, True),
        ("x nan", "x 1.0", 0.9, 0.0, False),
        ("x inf", "x 1e308", 0.9, 0.0, False),
        ("537,984 outputs", "537,985 outputs", 0.0, 0.0, False),
    ],
)
def test_within_tolerance(ref: str, test: str, rtol: float, atol: float, ok: bool) -> None:
    assert within_tolerance(ref, test, rtol, atol) is ok


def test_close_is_symmetric_in_nan_and_strict_in_inf() -> None:
    assert close(float("nan"), float("nan"), 0, 0)
    assert not close(1.0, float("nan"), 1, 1)
    assert close(float("inf"), float("inf"), 0, 0) and not close(float("inf"), float("-inf"), 1, 1)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, None),
        ({"qbook": {"rtol": 1e-4}}, (1e-4, 0.0)),
        ({"qbook": {"atol": 2e-6, "rtol": 0}}, (0.0, 2e-6)),
    ],
)
def test_cell_tolerance_reads_the_metadata(metadata: dict, expected: tuple | None) -> None:
    assert cell_tolerance(metadata) == expected


BAD_SPECS = [{}, {"rtol": -1e-3}, {"rtol": "1e-3"}, {"rtol": 1.5}, {"tol": 1e-3}, [1e-3], {"atol": True}]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_cell_tolerance_rejects_bad_metadata(spec: object) -> None:
    with pytest.raises(ValueError, match="qbook"):
        cell_tolerance({"qbook": spec})


def test_relax_replaces_only_what_the_tolerance_allows() -> None:
    ref = [
        {"output_type": "stream", "name": "stdout", "text": "cos 0.9376\n"},
        {"output_type": "execute_result", "data": {"text/plain": "tensor(2.5000)", "text/markdown": "| 1 |"}},
    ]
    test = [
        {"output_type": "stream", "name": "stdout", "text": "cos 0.9370\n"},
        {"output_type": "execute_result", "data": {"text/plain": "tensor(2.7000)", "text/markdown": "| 1 |"}},
    ]
    glued = "application/papermill.record/text/plain"
    ref.append({"output_type": "display_data", "data": {glued: "0.9376"}})
    test.append({"output_type": "display_data", "data": {glued: "0.9371"}})
    relax(test, ref, 1e-3, 0.0)
    assert test[2]["data"][glued] == "0.9376"  # a glued value
    assert test[0]["text"] == "cos 0.9376\n"  # within 1e-3: now equal to the reference
    assert test[1]["data"]["text/plain"] == "tensor(2.7000)"  # 8% off: left for nbval to report


def _notebook(path: Path, printed: str, committed: str, metadata: dict) -> None:
    cell = {
        "cell_type": "code",
        "execution_count": 1,
        "metadata": metadata,
        "source": f"print({printed!r})",
        "outputs": [{"output_type": "stream", "name": "stdout", "text": committed + "\n"}],
    }
    nb = {
        "cells": [cell],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb), encoding="utf-8")


@pytest.mark.parametrize(
    ("metadata", "passes"),
    [({}, False), ({"qbook": {"rtol": 1e-3}}, True), ({"qbook": {"rtol": 1e-5}}, False)],
)
def test_nbval_runs_with_the_plugin(tmp_path: Path, metadata: dict, passes: bool) -> None:
    """End to end: nbval executes a notebook whose committed output differs in the 4th digit."""
    _notebook(tmp_path / "nb.ipynb", "cosine 0.9370", "cosine 0.9376", metadata)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "nbval_tolerance", "-p", "no:cacheprovider",
         "--nbval", "--nbval-current-env", "-q", "nb.ipynb", "--rootdir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert (run.returncode == 0) is passes, run.stdout[-2000:] + run.stderr[-2000:]
