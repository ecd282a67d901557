"""The ``backend="torch"`` path of :func:`qbook.kernels.int8_matmul`: ``torch._int_mm`` (cuBLASLt on CUDA,
oneDNN/fbgemm on the CPU) or an exact fallback, then the epilogue as separate elementwise operations
(chapter 10).

This is also the unfused baseline of the chapter's benchmark: ``torch._int_mm`` writes the int32 product to
memory and the dequantization reads it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qbook.intmath import _blas_layout, _int_mm_on_cpu

if TYPE_CHECKING:
    from . import Epilogue

__all__ = [
    "INT32_MAX", "INT32_MIN", "apply_epilogue", "exact_int8_matmul", "int8_matmul_torch", "int_mm_allowed",
    "int_mm_cpu_allowed",
]  # fmt: skip

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_K_MAX = INT32_MAX // (128 * 128)  # = qbook.kernels.K_MAX: no int8 product of this depth leaves int32


def int_mm_allowed(M: int, N: int, K: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` (cuBLASLt) accepts the shape: CUDA, ``M > 16``, K and N multiples of 8.

    >>> int_mm_allowed(16, 4096, 4096, torch.device("cuda"))
    False
    """
    return device.type == "cuda" and M > 16 and K % 8 == 0 and N % 8 == 0


def int_mm_cpu_allowed(K: int) -> bool:
    """Whether ``torch._int_mm`` gives the exact product of int8 CPU matrices: any M, N >= 1 (checked for
    torch 2.13 on every M, K, N up to 33, on random strides and on the extremes; operands pass through
    ``qbook.intmath._blas_layout`` first), while ``K <= K_MAX = 131071``, where no partial sum can leave
    int32 — and this torch build has the CPU kernel.

    >>> int_mm_cpu_allowed(4096), int_mm_cpu_allowed(131072)
    (True, False)
    """
    return K <= _K_MAX and _int_mm_on_cpu()


def exact_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc = a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), exactly, as int32 (chapter 10).

    ``OverflowError`` when the exact result does not fit int32.

    Computed in float64: every product has ``|a b| <= 2**14`` and every partial sum is an integer below
    ``2**14 K``, exactly representable while ``K < 2**39``, so the result is exact in any summation order
    (and runs on BLAS, on any device).

    >>> a = torch.tensor([[-128, 127]], dtype=torch.int8)
    >>> exact_int8_matmul(a, a.T)
    tensor([[32513]], dtype=torch.int32)
    """
    acc = a.double() @ b.double()  # (M, N), exact integers
    low, high = acc.min().item(), acc.max().item()
    if low < INT32_MIN or high > INT32_MAX:
        bad = low if low < INT32_MIN else high
        raise OverflowError(
            f"the exact int8 product reaches {int(bad)}, outside the int32 range [{INT32_MIN}, {INT32_MAX}]"
        )
    return acc.to(torch.int32)


def apply_epilogue(acc: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
    """(10.2) and (10.3) on an int32 ``acc`` (M, N), in float32, in the kernel's order of operations.

    ``y = acc * a_scale[:, None] * b_scale[None, :] (+ bias)``; then ``y`` cast to ``out_dtype``, or
    ``clamp(round_half_even(y / out_scale) + out_zero_point, -128, 127)`` as int8.
    """
    if epilogue.kind == "int32":
        return acc
    y = acc.to(torch.float32)  # (M, N), a new tensor: the operations below work in place, in this order
    y.mul_(epilogue.a_scale.reshape(-1, 1)).mul_(epilogue.b_scale.reshape(1, -1))
    if epilogue.bias is not None:
        y.add_(epilogue.bias.reshape(1, -1))
    if epilogue.kind == "dequantize":
        return y.to(epilogue.out_dtype)
    # A tensor divisor, not a Python number: CUDA PyTorch divides by a scalar as a multiplication by its
    # reciprocal, which can differ from the IEEE quotient in the last bit.
    out_scale = torch.tensor(epilogue.out_scale, dtype=torch.float32, device=y.device)
    y.div_(out_scale).round_().add_(epilogue.out_zero_point)
    return y.clamp_(-128, 127).to(torch.int8)


def int8_matmul_torch(a: torch.Tensor, b: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
    """``torch._int_mm`` where its shape rules allow and no overflow is possible, else the exact fallback."""
    (M, K), N = a.shape, b.shape[1]
    if a.is_cpu and int_mm_cpu_allowed(K):
        acc = torch._int_mm(_blas_layout(a), _blas_layout(b))
    elif int_mm_allowed(M, N, K, a.device) and K <= _K_MAX:
        # cuBLASLt's int8 GEMM takes only the "TN" layout: A row-major, B column-major (B = W.T of a
        # row-major weight); anything else is refused with CUBLAS_STATUS_NOT_SUPPORTED, so copy into it.
        a = a if a.stride(1) == 1 and a.stride(0) == K else a.contiguous()
        b = b if b.stride(0) == 1 and b.stride(1) == K else b.T.contiguous().T
        acc = torch._int_mm(a, b)
    else:
        acc = exact_int8_matmul(a, b)
    return apply_epilogue(acc, epilogue)
