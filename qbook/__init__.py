"""qbook: neural-network quantization, explained and implemented.

The three verbs of chapter 3 and the integer kernels of chapters 4 and 9 are available at the top level::

    import qbook
    scale, zero_point = qbook.calc_qparams(xmin, xmax, qmin=-128, qmax=127)
    q = qbook.quantize(x, scale, zero_point, -128, 127)
    x_hat = qbook.dequantize(q, scale, zero_point)

Submodules (``qbook.formats``, ``qbook.kernels``, ...) are imported on first use, so ``import qbook`` stays
fast and optional dependencies (Triton, sentence-transformers) are only needed by the parts that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "affine",
    "awq",
    "bench",
    "data",
    "export",
    "formats",
    "gptq",
    "granularity",
    "intmath",
    "kernels",
    "models",
    "mx",
    "nn",
    "observers",
    "outliers",
    "packing",
    "plot",
    "ptq",
    "qat",
    "roofline",
    "rotation",
)

# Top-level names -> the submodule that defines them.
_EXPORTS = {
    "QuantSpec": "affine",
    "QTensor": "affine",
    "calc_qparams": "affine",
    "quantize": "affine",
    "dequantize": "affine",
    "fake_quantize": "affine",
    "PerTensor": "granularity",
    "PerChannel": "granularity",
    "PerGroup": "granularity",
    "int_matmul": "intmath",
    "quantize_multiplier": "intmath",
    "multiply_by_quantized_multiplier": "intmath",
    "requantize": "intmath",
}

__all__ = ["__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qbook' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
