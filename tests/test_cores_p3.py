"""The math cores that chapter 5 shows with ``inspect.getsource`` carry no argument checks (issue 8, §4)."""

from __future__ import annotations

import inspect

import pytest

from qbook import models, observers, outliers

SHOWN_CORES = [
    observers.StreamingHistogram._grow,
    observers._histogram_mse,
    models._embedding_agreement,
    outliers._llm_int8_matmul,
    outliers._outlier_channels,
    outliers._outlier_columns,
    outliers._vectorwise_matmul,
    outliers._smooth_scales,
]


@pytest.mark.parametrize("core", SHOWN_CORES, ids=lambda f: f.__qualname__)
def test_shown_core_has_no_argument_checks(core):
    source = inspect.getsource(core)
    for word in ("raise ", "assert ", "isinstance(", "_check"):
        assert word not in source, f"{core.__qualname__} contains {word!r}"
