"""GPU kernels for quantized inference (chapter 10): an int8 GEMM in Triton with a fused epilogue.

::

    from qbook.kernels import int8_matmul, ptx
    acc = int8_matmul(a, b)                            # exact int32 product of int8 a (M, K) and b (K, N)
    y = int8_matmul(a, b, a_scale, b_scale, bias)      # acc * a_scale[:, None] * b_scale[None, :] + bias
    q = int8_matmul(a, b, a_scale, b_scale, out_scale=0.05, out_zero_point=3)   # requantized to int8
    print(ptx(90))                                     # the kernel's PTX for Hopper, no GPU needed

The Triton kernel runs on CUDA tensors, or on the CPU in Triton's interpreter when the environment variable
``TRITON_INTERPRET=1`` is set. Triton is an optional dependency (``pip install "qbook[gpu]"``): without it,
``backend="torch"`` and ``backend="auto"`` still work.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from .torch_backend import INT32_MAX, int8_matmul_torch

__all__ = ["BACKENDS", "K_MAX", "Epilogue", "int8_configs", "int8_matmul", "interpreting", "ptx"]

#: The largest K for which no int8 inputs can overflow an int32 accumulator:
#: ``|acc| <= 128 * 128 * K``, and ``128 * 128 * 131071 = 2147467264 <= 2**31 - 1``, while K = 131072 admits
#: all-(-128) operands whose product is exactly ``2**31``.
K_MAX = INT32_MAX // (128 * 128)

BACKENDS = ("auto", "triton", "torch")
_FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16)
_GPU_EXTRA = 'Triton is needed for the int8 kernel: pip install "qbook[gpu]" (or pip install triton)'


@dataclass(frozen=True, eq=False)
class Epilogue:
    """What the kernel does with the int32 tile ``acc`` once the K loop is done (chapter 10, (10.2)-(10.3)).

    ``kind`` is ``"int32"`` (store ``acc``), ``"dequantize"`` (store ``acc * a_scale * b_scale + bias`` in
    ``out_dtype``) or ``"requantize"`` (store the int8 ``clamp(round_half_even(y / out_scale) +
    out_zero_point, -128, 127)``). Scales and bias are float32 vectors on the operands' device: ``a_scale``
    of length 1 or M, ``b_scale`` and ``bias`` of length 1 (scales only) or N.
    """

    kind: str
    out_dtype: torch.dtype
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    out_scale: float = 1.0
    out_zero_point: int = 0


_INT32_EPILOGUE = Epilogue("int32", torch.int32)


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    if (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype is torch.int8
        and b.dtype is torch.int8
        and a.ndim == 2
        and b.ndim == 2
    ):  # the common case, checked with as few operations as possible
        (M, K), (K_b, N) = a.shape, b.shape
        if M and K and N and K == K_b and ((a.is_cpu and b.is_cpu) or a.device == b.device):
            return M, N, K
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.int8:
            raise TypeError(f"{name} must have dtype torch.int8, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} must have every dimension >= 1, got shape {tuple(x.shape)}")
    (M, K), (K_b, N) = a.shape, b.shape
    if K != K_b:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)} and b is {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got a on {a.device} and b on {b.device}")
    return M, N, K


def _as_vector(value: object, name: str, length: int, axis: int, device: torch.device) -> torch.Tensor:
    """A scale or bias as a float32 vector of 1 or ``length`` entries; ``axis`` 0 accepts (length, 1) too.

    Scales must be finite and > 0 in float32 (a zero scale maps every output to 0, so it is refused, as NaN,
    inf and negative scales are); a bias must be finite in float32.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like the operands, got {value.device}")
        shape = value.shape
        matrix = (length, 1) if axis == 0 else (1, length)
        if not (len(shape) == 0 or shape == (1,) or shape == (length,) or shape == matrix):
            allowed = [(), (1,), (length,), matrix]
            raise ValueError(f"{name} must have shape in {allowed}, got {tuple(shape)}")
        vector = value.reshape(-1)
        if vector.dtype is not torch.float32:
            vector = vector.to(torch.float32)
        vector = vector.contiguous()
        if vector.is_cuda and torch.cuda.is_current_stream_capturing():
            return vector  # a CUDA graph being captured cannot read values back to the host: no value check
        low, high = torch.aminmax(vector)  # NaN propagates into both
        _check_values(vector, name, value, low.item(), high.item())
        return vector
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        host = torch.tensor([float(value)], dtype=torch.float32)  # checked on the host: no device read-back
        cast = host.item()
        _check_values(host, name, value, cast, cast)
        return host.to(device)
    raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(value).__name__}")


def _check_values(vector: torch.Tensor, name: str, given: object, low: float, high: float) -> None:
    """Scales finite and > 0, a bias finite, both after the cast to float32 that the kernel computes in."""
    is_scale = name != "bias"
    if (low > 0 or not is_scale) and -math.inf < low and high < math.inf:
        return
    good = torch.isfinite(vector) & (vector > 0) if is_scale else torch.isfinite(vector)
    index = int((~good).nonzero()[0, 0])
    original = float(given) if not isinstance(given, torch.Tensor) else given.reshape(-1)[index].item()
    cast = vector[index].item()
    what = "finite and > 0" if is_scale else "finite"
    raise ValueError(
        f"{name} must be {what} in float32, got {original!r} at index {index}"
        + (f" (float32: {cast!r})" if repr(cast) != repr(original) else "")
    )


def _make_epilogue(
    M: int, N: int, device: torch.device, a_scale: object, b_scale: object, bias: object,
    out_dtype: torch.dtype | None, out_scale: object, out_zero_point: object,
) -> Epilogue:  # fmt: skip
    if (a_scale is None) != (b_scale is None):
        raise ValueError("a_scale and b_scale must be given together (both None for the raw int32 product)")
    if a_scale is None:
        if bias is not None or out_scale is not None:
            raise ValueError("bias and out_scale need a_scale and b_scale: they act on y (10.2)")
        if out_dtype not in (None, torch.int32):
            raise ValueError(f"without scales the output is the int32 product, got out_dtype={out_dtype}")
        return _INT32_EPILOGUE
    scales = {
        "a_scale": _as_vector(a_scale, "a_scale", M, 0, device),
        "b_scale": _as_vector(b_scale, "b_scale", N, 1, device),
        "bias": None if bias is None else _as_vector(bias, "bias", N, 1, device),
    }
    if scales["bias"] is not None and scales["bias"].numel() != N:
        raise ValueError(f"bias must have N = {N} entries, got {scales['bias'].numel()}")
    if out_scale is None:
        if out_dtype is None:
            out_dtype = torch.float32
        if out_dtype not in _FLOAT_OUT:
            raise ValueError(f"out_dtype must be one of {_FLOAT_OUT} when dequantizing, got {out_dtype}")
        return Epilogue("dequantize", out_dtype, **scales)
    if out_dtype not in (None, torch.int8):
        raise ValueError(f"requantizing (out_scale given) produces int8, got out_dtype={out_dtype}")
    if isinstance(out_scale, torch.Tensor) and out_scale.numel() == 1:
        out_scale = out_scale.item()
    if isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)):
        raise TypeError(f"out_scale must be a positive number, got {out_scale!r}")
    scale32 = torch.tensor(out_scale, dtype=torch.float32).item()  # the float32 value both backends divide by
    if not 0 < scale32 < float("inf"):
        raise ValueError(f"out_scale must be positive and finite in float32, got {out_scale!r}")
    if isinstance(out_zero_point, bool) or not isinstance(out_zero_point, int):
        raise TypeError(f"out_zero_point must be an int, got {out_zero_point!r}")
    if not -128 <= out_zero_point <= 127:
        raise ValueError(f"out_zero_point must lie in [-128, 127], got {out_zero_point}")
    return Epilogue("requantize", torch.int8, **scales, out_scale=scale32, out_zero_point=out_zero_point)


def interpreting() -> bool:
    """True when the environment sets ``TRITON_INTERPRET=1``: Triton kernels then run on the CPU, in NumPy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # about 0.2 ms: looked up once per process


def _triton_available() -> bool:
    return _triton_installed()


def _choose_backend(backend: str, a: torch.Tensor, b: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from_env = _triton_available() and interpreting()
    K = a.shape[1]
    if backend == "auto":
        # Every shape runs on the kernels (with 64-bit offsets where a matrix spans 2**31 elements or more);
        # only K > K_MAX, where int32 could overflow, takes the exact torch path, which checks the result.
        return "triton" if a.is_cuda and K <= K_MAX and _triton_available() and not from_env else "torch"
    if backend == "torch":
        return backend
    if not _triton_available():
        raise ImportError(_GPU_EXTRA)
    if K > K_MAX:
        raise OverflowError(
            f"K = {K} exceeds K_MAX = {K_MAX}: int8 products could overflow the kernel's int32 accumulator; "
            f"backend='torch' computes such products exactly and checks them"
        )
    if not (a.is_cuda or from_env):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, or on the CPU with the environment variable "
            f"TRITON_INTERPRET=1; got tensors on {a.device}"
        )
    return backend


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | float | None = None,
    b_scale: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    *,
    out_scale: torch.Tensor | float | None = None,
    out_zero_point: int = 0,
) -> torch.Tensor:
    """int8 GEMM with int32 accumulation and an optional fused epilogue (chapter 10, (10.1)-(10.3)).

    ``a`` int8 (M, K), ``b`` int8 (K, N), any M, N, K >= 1 and any strides. Returns

    - no scales: ``acc = a @ b`` (10.1), exactly, as int32;
    - ``a_scale`` (scalar, (M,) or (M, 1)) and ``b_scale`` (scalar, (N,) or (1, N)), optional ``bias`` (N,):
      ``acc * a_scale[:, None] * b_scale[None, :] + bias`` (10.2), computed in float32 and returned in
      ``out_dtype`` (float32 by default; float16 and bfloat16 round to nearest even);
    - also ``out_scale`` (and ``out_zero_point``): the int8
      ``clamp(round_half_even(y / out_scale) + out_zero_point, -128, 127)`` of that ``y`` (10.3).

    Scales must be finite and > 0 after the cast to float32 and a bias finite: NaN, inf, negative and zero
    scales raise ``ValueError`` (a zero scale would silently map every output to the bias).

    ``backend="triton"`` runs the Triton kernel with the epilogue fused (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``); ``"torch"`` runs ``torch._int_mm`` where it accepts the shape (on the CPU any
    shape with ``K <= K_MAX``; on CUDA, cuBLASLt's M > 16 and K, N multiples of 8) and an exact float64
    product elsewhere, then the epilogue as separate operations; ``"auto"`` takes the kernel on CUDA and the
    torch path otherwise. Both backends give bit-identical results, since the epilogue uses the same float32
    operations in the same order (except that Triton's CPU interpreter truncates float32 to bfloat16 where a
    GPU rounds to nearest).

    Overflow: ``|acc| <= 128 * 128 * K`` fits int32 whenever ``K <= K_MAX = 131071``. For larger K the
    kernel raises ``OverflowError``; the torch path computes exactly and raises only if the result does
    not fit.

    >>> a = torch.tensor([[1, -2, 3], [127, -128, 0]], dtype=torch.int8)      # (M, K) = (2, 3)
    >>> b = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.int8)          # (K, N) = (3, 2)
    >>> int8_matmul(a, b)
    tensor([[   4,    1],
            [ 127, -128]], dtype=torch.int32)
    >>> int8_matmul(a, b, a_scale=torch.tensor([0.5, 0.25]), b_scale=0.5)
    tensor([[  1.0000,   0.2500],
            [ 15.8750, -16.0000]])
    >>> int8_matmul(a, b, 0.5, 0.5, out_scale=0.5, out_zero_point=-1)  # y / out_scale: [[2, .5], [63.5, -64]]
    tensor([[  1,  -1],
            [ 63, -65]], dtype=torch.int8)
    """
    M, N, K = _check_operands(a, b)
    epilogue = _make_epilogue(M, N, a.device, a_scale, b_scale, bias, out_dtype, out_scale, out_zero_point)
    if _choose_backend(backend, a, b) == "triton":
        from .int8_triton import launch

        return launch(a, b, epilogue)
    return int8_matmul_torch(a, b, epilogue)


def ptx(arch: int = 90, epilogue: str = "dequantize", kernel: str = "gemm") -> str:
    """PTX of chapter 10's int8 kernels for ``sm_<arch>``, compiled without a GPU.

    ``arch`` is the compute capability times ten (80, 86, 89, or 90, compiled as ``sm_90a``).
    ``kernel="gemm"`` is the GEMM that GPU runs on large aligned shapes: before Hopper the portable kernel
    (``mma.sync ... .s8.s8``), on Hopper the persistent kernel with TMA copies (``cp.async.bulk.tensor``) and
    warp specialisation (``setmaxnreg``) around ``wgmma.mma_async ... .s8.s8``. ``kernel="decode"`` is the
    kernel for M <= 16 tokens, with swapped operands (``wgmma ... m64n8k32`` on Hopper). ``"portable"`` and
    ``"tma"`` name a kernel directly. ``epilogue`` is ``"int32"``, ``"dequantize"`` (float32 out, with
    bias) or ``"requantize"``. Results are cached. Needs Triton.

    >>> "wgmma.mma_async" in ptx(90)
    True
    """
    if not _triton_available():
        raise ImportError(_GPU_EXTRA)
    from .int8_ptx import ptx as _ptx

    return _ptx(arch, epilogue, kernel)


def int8_configs(arch: int) -> tuple:
    """The autotuner's tile configurations for compute capability ``arch`` (chapter 10).

    >>> len(int8_configs(80)) >= 5
    True
    """
    if not _triton_available():
        raise ImportError(_GPU_EXTRA)
    from .int8_triton import int8_configs as _configs

    return _configs(arch)
