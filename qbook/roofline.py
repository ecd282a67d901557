"""The roofline model: when is a kernel limited by arithmetic, when by memory (Chapter 1).

A kernel that performs ``flops`` operations and moves ``bytes`` bytes between memory and the chip has the
arithmetic intensity (1.3) ``I = flops / bytes``. On a device with peak compute ``P`` (ops/s) and memory
bandwidth ``B`` (bytes/s) it can attain at most (1.4) ``min(P, I * B)`` ops/s: below the ridge point
``I* = P / B`` the kernel is memory-bound, above it compute-bound.

Units follow SI and IEC 80000-13: ``TERA = 10**12`` (the T of TFLOPS, TOPS and TB/s) and ``TEBI = 2**40``.
One multiply-accumulate counts as two operations, as in every vendor datasheet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

__all__ = [
    "A100_SXM_80GB",
    "GIBI",
    "GIGA",
    "H100_SXM",
    "TEBI",
    "TERA",
    "Device",
    "arithmetic_intensity",
    "attainable",
    "decode_time",
    "matmul_bytes",
    "matmul_flops",
    "ridge_point",
]

GIGA: int = 10**9  #: SI giga (G), as in GB and GB/s
GIBI: int = 2**30  #: IEC gibi (Gi), as in GiB
TERA: int = 10**12  #: SI tera (T), as in TFLOPS, TOPS and TB/s
TEBI: int = 2**40  #: IEC tebi (Ti), as in TiB; 2**40 / 10**12 = 1.0995


@dataclass(frozen=True)
class Device:
    """An accelerator as the roofline sees it: peak ops/s per data type and memory bandwidth in bytes/s.

    ``peak`` maps a data type name (``"fp16"``, ``"int8"``, ...) to dense peak operations per second,
    counting a multiply-accumulate as 2 operations; ``bandwidth`` is the DRAM bandwidth in bytes/s;
    ``source`` says where the numbers come from.

    >>> gpu = Device("toy", {"fp16": 100 * TERA}, bandwidth=1e12, source="made up")
    >>> gpu.peak_ops("fp16") / TERA
    100.0
    """

    name: str
    peak: Mapping[str, float] = field(hash=False)
    bandwidth: float
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak", MappingProxyType(dict(self.peak)))  # read-only, like the rest
        if not self.peak:
            raise ValueError(f"device {self.name!r} needs at least one peak, got {self.peak!r}")
        for dtype, ops in self.peak.items():
            if not ops > 0:
                raise ValueError(f"peak of {dtype!r} on {self.name!r} must be positive, got {ops!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth of {self.name!r} must be positive, got {self.bandwidth!r}")

    def peak_ops(self, dtype: str) -> float:
        """Dense peak operations per second of ``dtype``; ``ValueError`` for a dtype the device lacks."""
        if dtype not in self.peak:
            raise ValueError(f"{self.name} has no peak for dtype {dtype!r}; known: {sorted(self.peak)}")
        return self.peak[dtype]


# Peaks in ops/s (989.4e12 ops/s = 989.4 TFLOPS), bandwidths in bytes/s (3.35e12 B/s = 3.35 TB/s).

#: NVIDIA H100 SXM5 80GB, dense Tensor Core peaks (the datasheet's sparsity figures halved).
H100_SXM = Device(
    name="NVIDIA H100 SXM5",
    peak={
        "fp32": 66.9e12,  # non-tensor
        "tf32": 494.7e12,
        "fp16": 989.4e12,
        "bf16": 989.4e12,
        "fp8": 1978.9e12,
        "int8": 1978.9e12,
    },
    bandwidth=3.35e12,  # HBM3
    source="NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper (dense, no sparsity)",
)

#: NVIDIA A100 SXM4 80GB, dense Tensor Core peaks (the datasheet's sparsity figures halved).
A100_SXM_80GB = Device(
    name="NVIDIA A100 SXM4 80GB",
    peak={
        "fp32": 19.5e12,  # non-tensor
        "tf32": 156e12,
        "fp16": 312e12,
        "bf16": 312e12,
        "int8": 624e12,
        "int4": 1248e12,
    },
    bandwidth=2.039e12,  # HBM2e
    source="NVIDIA A100 Tensor Core GPU datasheet (dense, no sparsity)",
)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive(name: str, value: float) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


def arithmetic_intensity(flops: float, n_bytes: float) -> float:
    r"""Operations per byte moved (1.3): :math:`I = \text{flops} / \text{bytes}` (Chapter 1).

    >>> arithmetic_intensity(2 * 4096**3, 3 * 4096**2 * 2)  # a 4096^3 fp16 GEMM
    1365.3333333333333
    """
    return _positive("flops", flops) / _positive("n_bytes", n_bytes)


def matmul_flops(M: int, N: int, K: int) -> int:
    """Operations of ``C = A @ B`` with ``A`` (M, K) and ``B`` (K, N): :math:`2MNK` (Chapter 1).

    Each of the :math:`MN` outputs needs :math:`K` multiply-accumulates, each counted as 2 operations.

    >>> matmul_flops(1, 4096, 4096)  # one token through a 4096 x 4096 linear layer
    33554432
    """
    return _matmul_flops(_positive_int("M", M), _positive_int("N", N), _positive_int("K", K))


def _matmul_flops(M: int, N: int, K: int) -> int:
    """``2MNK`` without argument checks: ``M * N`` outputs of ``K`` multiply-accumulates, 2 ops each."""
    return 2 * M * N * K


def matmul_bytes(M: int, N: int, K: int, a_bits: float, b_bits: float, out_bits: float) -> int:
    r"""Bytes moved by ``C = A @ B`` if each operand is read once and ``C`` written once (Chapter 1).

    .. math:: \text{bytes} = \lceil MK\,b_A/8 \rceil + \lceil KN\,b_B/8 \rceil + \lceil MN\,b_C/8 \rceil

    This is the compulsory traffic, a lower bound reached when the on-chip caches hold every tile that is
    reused. ``b_bits`` may be fractional, e.g. 4.125 bits for int4 weights with one fp16 scale per 128.

    >>> matmul_bytes(4096, 4096, 4096, 16, 16, 16) == 3 * 4096**2 * 2
    True
    >>> matmul_bytes(1, 4096, 4096, 16, 4, 16)  # batch-1 decode, int4 weights
    8404992
    """
    M, N, K = _positive_int("M", M), _positive_int("N", N), _positive_int("K", K)
    a_bits, b_bits, out_bits = (_positive(name, b) for name, b in
                                (("a_bits", a_bits), ("b_bits", b_bits), ("out_bits", out_bits)))
    return _matmul_bytes(M, N, K, a_bits, b_bits, out_bits)


def _matmul_bytes(M: int, N: int, K: int, a_bits: float, b_bits: float, out_bits: float) -> int:
    """Compulsory traffic of ``C = A @ B`` without argument checks, exact (bits as fractions)."""
    return sum(math.ceil(n * Fraction(bits) / 8) for n, bits in
               ((M * K, a_bits), (K * N, b_bits), (M * N, out_bits)))


def attainable(device: Device, intensity: float, dtype: str) -> float:
    r"""Attainable ops/s at arithmetic intensity ``I`` (1.4): :math:`\min(P, I \cdot B)` (Chapter 1).

    >>> attainable(H100_SXM, 1.0, "fp16") / TERA  # a GEMV reads ~1 byte per operation
    3.35
    >>> attainable(H100_SXM, 1000.0, "fp16") / TERA  # a large GEMM hits the compute roof
    989.4
    """
    return _attainable(device, _positive("intensity", intensity), dtype)


def _attainable(device: Device, intensity: float, dtype: str) -> float:
    """(1.4) without argument checks: the lower of the compute roof and the memory roof."""
    return min(device.peak_ops(dtype), intensity * device.bandwidth)


def ridge_point(device: Device, dtype: str) -> float:
    """Intensity where the two roofs meet (1.5): :math:`I^* = P / B` ops/byte (Chapter 1).

    >>> round(ridge_point(H100_SXM, "fp16"), 1)
    295.3
    """
    return device.peak_ops(dtype) / device.bandwidth


def decode_time(weight_bytes: float, device: Device) -> float:
    r"""Seconds to stream ``weight_bytes`` from memory once (1.6): :math:`t = \text{bytes} / B` (Chapter 1).

    Batch-1 autoregressive decoding reads every weight once per generated token, so this is a lower
    bound on the time per token, and ``1 / t`` an upper bound on tokens per second.

    >>> round(decode_time(26 * GIGA, H100_SXM) * 1e3, 2)  # 13B parameters at fp16, in ms
    7.76
    """
    return _decode_time(_positive("weight_bytes", weight_bytes), device)


def _decode_time(weight_bytes: float, device: Device) -> float:
    """(1.6) without argument checks: every weight byte crosses the memory bus once per token."""
    return weight_bytes / device.bandwidth
