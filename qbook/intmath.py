"""Integer arithmetic of quantized layers — chapters 4 (量化后数据计算) and 9 (越界问题).

This is the run-time integer path: integer tensors in, integer tensors out, no floating point. (The offline
helpers that *choose* integers from floats — :func:`quantize_multiplier`, :func:`quantize_bias` — and the
float epilogues :func:`dequantize_acc` / :func:`requantize_float` are marked as such.) Each public function
checks its arguments and calls a small math core (``_mbqm``, ``_quantize_bias``, ...) that the chapters show.

Chapter 4 — the quantized matmul. With ``x ≈ scale * (q - zero_point)`` for activations ``a`` (M, K) and
weights ``b`` (K, N),

* (4.2) symmetric: ``Y ≈ sa * sb * sum_k qa_ik qb_kj`` — one float multiply after the integer accumulation;
* (4.3) asymmetric: ``Y ≈ sa * sb * acc``, ``acc_ij = sum_k (qa_ik - za)(qb_kj - zb)`` (:func:`int_matmul`;
  :func:`int_matmul_reference` is the int64 version the book reads, :func:`int_matmul` the fast one);
* (4.4) ``acc_ij = sum_k qa_ik qb_kj - zb sum_k qa_ik - za sum_k qb_kj + K za zb`` (:func:`zero_point_terms`).

Chapter 9 — overflow and requantization.

* (9.1) an int8 x int8 product needs 16 bits, a sum of K of them up to ``16 + ceil(log2 K)``
  (:func:`product_bits`, :func:`accumulator_bits`, :func:`accumulate`);
* (9.2) int32 accumulators survive ``K <= (2^31 - 1) // 16384 = 131071`` int8 products (:func:`max_safe_k`);
* (9.3) requantization ``q_out = clamp(zo + round(M * acc), qmin, qmax)`` with ``M = sa * sb / so``;
* (9.4) ``M = M0 * 2^shift``, ``M0 = multiplier / 2^31`` in [0.5, 1) (:func:`quantize_multiplier`);
* (9.5) ``round(M * acc) ≈ RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc * 2^left, multiplier),
  right)`` (:func:`multiply_by_quantized_multiplier`), gemmlowp's fixed-point definitions;
* (9.6) the bias in int32 with scale ``sa * sb`` and zero point 0 (:func:`quantize_bias`).

>>> import torch
>>> a = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
>>> b = torch.tensor([[5, 6], [7, 8]], dtype=torch.uint8)
>>> int_matmul(a, b, a_zero_point=1, b_zero_point=5)
tensor([[ 2,  3],
        [ 6, 11]], dtype=torch.int32)
"""

from __future__ import annotations

import functools
import math
from numbers import Integral, Real
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "ZeroPointTerms",
    "accumulate",
    "accumulate_steps",
    "accumulator_bits",
    "dequantize_acc",
    "int_matmul",
    "int_matmul_expanded",
    "max_safe_k",
    "multiply_by_quantized_multiplier",
    "product_bits",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_multipliers",
    "requantize",
    "requantize_float",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
    "zero_point_terms",
]

INT32_MIN: int = -(2**31)
INT32_MAX: int = 2**31 - 1

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
IntLike = torch.Tensor | int


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_integer_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor (int8, uint8, int16, int32 or int64), got {x.dtype}"
        )
    return x


def _check_int32_values(x: torch.Tensor, name: str) -> None:
    if x.numel() and (int(x.min()) < INT32_MIN or int(x.max()) > INT32_MAX):
        raise ValueError(
            f"{name} must hold int32 values in [{INT32_MIN}, {INT32_MAX}], got values in "
            f"[{int(x.min())}, {int(x.max())}]"
        )


def _int64(x: object, name: str, device: torch.device | None = None) -> torch.Tensor:
    """An int or integer tensor holding int32 values, as an int64 tensor."""
    if isinstance(x, bool) or not isinstance(x, (Integral, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {x!r}")
    if not isinstance(x, torch.Tensor):
        x = int(x)  # a Python or NumPy integer
        if not INT32_MIN <= x <= INT32_MAX:
            raise ValueError(f"{name} must be an int32 value in [{INT32_MIN}, {INT32_MAX}], got {x}")
        return torch.tensor(x, dtype=torch.int64, device=device)
    _check_integer_tensor(x, name)
    _check_int32_values(x, name)
    return x.to(device=device if device is not None else x.device, dtype=torch.int64)


def _broadcast(what: str, **tensors: object) -> torch.Size:
    """The broadcast shape of the named operands, or a ValueError that names every shape."""
    shapes = {name: tuple(x.shape) if isinstance(x, torch.Tensor) else () for name, x in tensors.items()}
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{what}: the shapes do not broadcast: {listed}") from None


def _check_in(x: torch.Tensor, lo: int, hi: int, name: str, what: str) -> None:
    if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        bad = x[(x < lo) | (x > hi)].flatten()[0]
        raise ValueError(f"{name} must be {what} in [{lo}, {hi}], got {int(bad)}")


def _to_int32(acc: torch.Tensor, what: str) -> torch.Tensor:
    """Narrow an exact int64 result to int32, raising OverflowError instead of wrapping."""
    bad = (acc < INT32_MIN) | (acc > INT32_MAX)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise OverflowError(
            f"{what}: the exact result {int(acc[index])} at index {index} does not fit int32 "
            f"[{INT32_MIN}, {INT32_MAX}] ({int(bad.sum())} of {acc.numel()} outputs overflow)"
        )
    return acc.to(torch.int32)


def _absmax(x: torch.Tensor) -> int:
    """``max |x|`` as a Python int (no ``abs`` in the tensor's dtype, where ``|-128|`` wraps in int8)."""
    if x.numel() == 0:
        return 0
    low, high = torch.aminmax(x)
    return max(-int(low), int(high))


# --------------------------------------------------------------------------------------------------------
# Chapter 4: the integer matmul and its zero-point terms
# --------------------------------------------------------------------------------------------------------


def _check_matmul(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    """``(M, K, N)`` of two integer matrices on one device (int64 ones holding int32 values)."""
    if not (isinstance(a, torch.Tensor) and a.dtype in _INTEGER_DTYPES):
        _check_integer_tensor(a, "a")
    if not (isinstance(b, torch.Tensor) and b.dtype in _INTEGER_DTYPES):
        _check_integer_tensor(b, "b")
    if a.ndim != 2 or b.ndim != 2:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"a and b must be matrices (M, K) and (K, N), got shapes {shapes}")
    (M, K), (K_b, N) = a.shape, b.shape
    if K != K_b:
        raise ValueError(
            f"inner dimensions differ: a is {tuple(a.shape)} (M, K) but b is {tuple(b.shape)} (K, N)"
        )
    if not (a.is_cpu and b.is_cpu) and a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if a.dtype is torch.int64:
        _check_int32_values(a, "a")
    if b.dtype is torch.int64:
        _check_int32_values(b, "b")
    return M, K, N


def _zero_point(zero_point: object, n: int, side: Literal["a", "b"]) -> torch.Tensor:
    """A zero point as an int64 CPU tensor of shape () or (M, 1) for ``a`` / (1, N) for ``b``."""
    name = f"{side}_zero_point"
    if isinstance(zero_point, torch.Tensor) and zero_point.is_floating_point():
        raise TypeError(f"{name} must be an integer (or integer tensor), got a {zero_point.dtype} tensor")
    zp = _int64(zero_point, name, device=torch.device("cpu"))
    if zp.numel() == 1:
        return zp.reshape(())
    shape = (n, 1) if side == "a" else (1, n)
    if tuple(zp.shape) not in ((n,), shape):
        what = "per-row of a: (M,) or (M, 1)" if side == "a" else "per-column of b: (N,) or (1, N)"
        raise ValueError(
            f"{name} must be a scalar or {what} = ({n},) or {shape}, got shape {tuple(zp.shape)}"
        )
    return zp.reshape(shape)


def _exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int64 CPU matrices, as int64.

    torch's integer matmul on the CPU accumulates in int64 and wraps silently on overflow; every partial sum
    is bounded by ``K * max|a| * max|b|``, so below 2^63 it is exact. Above (only for extreme int32 inputs)
    the product is taken in Python integers.
    """
    K = a.shape[1]
    if K * _absmax(a) * _absmax(b) < 2**63:
        return a @ b
    exact = np.array(a.tolist(), dtype=object) @ np.array(b.tolist(), dtype=object)  # (M, N) Python ints
    values = [int(v) for v in exact.flat]
    if any(not -(2**63) <= v < 2**63 for v in values):
        raise OverflowError(f"int_matmul: an exact result ({max(values, key=abs)}) does not even fit int64")
    return torch.tensor(values, dtype=torch.int64).reshape(exact.shape)


def _is_zero(zero_point: torch.Tensor) -> bool:
    return not bool(zero_point.any())


def int_matmul(
    a: torch.Tensor, b: torch.Tensor, a_zero_point: IntLike = 0, b_zero_point: IntLike = 0
) -> torch.Tensor:
    """The integer matmul of chapter 4: ``acc_ij = sum_k (a_ik - za)(b_kj - zb)`` (4.3), exactly, as int32.

    ``a`` (M, K) and ``b`` (K, N) are integer tensors (int8, uint8, int16, int32, or int64 holding int32
    values). A zero point is a scalar, per row of ``a`` ((M,) or (M, 1)) or per column of ``b``
    ((N,) or (1, N)). The result is exact; if it does not fit int32 this raises ``OverflowError`` — it
    never wraps around silently (chapter 9). It equals :func:`int_matmul_reference` bit for bit.

    How: int8 and uint8 CPU operands (uint8 shifted by 128 into int8, the shift moved into the zero point)
    go through ``torch._int_mm`` and the zero points through the rank-1 corrections of (4.4)
    (:func:`_int_matmul_int8`). int8 CUDA tensors with zero zero points and ``K <= max_safe_k(8, 8)`` go to
    the Triton kernel ``qbook.kernels.int8_matmul`` of chapter 10. Every other input is computed exactly
    in int64 on the CPU and returned on the input's device.

    >>> import torch
    >>> a = torch.tensor([[-128, 127]], dtype=torch.int8)     # (M, K) = (1, 2)
    >>> b = torch.tensor([[-128], [-128]], dtype=torch.int8)  # (K, N) = (2, 1)
    >>> int_matmul(a, b)                                      # 16384 - 16256
    tensor([[128]], dtype=torch.int32)
    >>> int_matmul(a, b, a_zero_point=torch.tensor([1]), b_zero_point=-128)
    tensor([[0]], dtype=torch.int32)
    """
    M, K, N = _check_matmul(a, b)
    za = _zero_point_value(a_zero_point, M, "a")  # int, or (M, 1) int64
    zb = _zero_point_value(b_zero_point, N, "b")  # int, or (1, N) int64
    if a.is_cpu and a.dtype in _INT8_DTYPES and b.dtype in _INT8_DTYPES and _int_mm_on_cpu():
        acc = _int_matmul_int8(a, b, za, zb, M, K, N)
        if acc is not None:
            return acc
    if isinstance(za, int):
        za = torch.tensor(za, dtype=torch.int64)
    if isinstance(zb, int):
        zb = torch.tensor(zb, dtype=torch.int64)
    if (
        a.is_cuda
        and a.dtype == torch.int8
        and b.dtype == torch.int8
        and _is_zero(za)
        and _is_zero(zb)
        and 1 <= K <= _K_MAX_INT8
        and min(M, N) >= 1
    ):
        from qbook.kernels import int8_matmul

        return int8_matmul(a, b)
    a_centered = a.cpu().to(torch.int64) - za  # (M, K)
    b_centered = b.cpu().to(torch.int64) - zb  # (K, N)
    acc = _exact_matmul(a_centered, b_centered)  # (M, N) int64
    return _to_int32(acc, f"int_matmul (M, K, N) = ({M}, {K}, {N})").to(a.device)


_INT8_DTYPES = (torch.int8, torch.uint8)
#: The largest K at which a sum of int8 x int8 products cannot leave int32: (2^31 - 1) // 128^2 (9.2).
_K_MAX_INT8 = INT32_MAX // (128 * 128)
_int_mm_cpu: bool | None = None


def _int_mm_on_cpu() -> bool:
    """Whether this torch build has ``torch._int_mm`` for CPU tensors (probed once, on a 1 x 1 product)."""
    global _int_mm_cpu
    if _int_mm_cpu is None:
        one = torch.ones(1, 1, dtype=torch.int8)
        try:
            _int_mm_cpu = int(torch._int_mm(one, one)) == 1
        except (AttributeError, NotImplementedError, RuntimeError):
            _int_mm_cpu = False
    return _int_mm_cpu


def _blas_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (R, C) with strides ``torch._int_mm`` reads correctly: (C, 1) or (1, R), else a contiguous copy.

    torch 2.13's CPU ``_int_mm`` misreads matrices with a size-1 dimension whose stride is not the canonical
    one, e.g. a (1, N) operand with strides (1, 1) (the transpose of an (N, 1) column): the result is
    garbage. Such a tensor is contiguous, so the canonical strides address the same elements: a free view.
    """
    R, C = x.shape
    if x.is_contiguous():
        return x if x.stride() == (C, 1) else x.as_strided((R, C), (C, 1))
    if x.t().is_contiguous():  # column-major, R, C >= 2: strides (1, R)
        return x
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _ones_column(K: int) -> torch.Tensor:
    """A (K, 1) int8 column of ones (cached: a GEMV with it gives row sums)."""
    return torch.ones(K, 1, dtype=torch.int8)


def _zero_point_value(zero_point: object, n: int, side: Literal["a", "b"]) -> int | torch.Tensor:
    """A checked zero point: a Python int, or an int64 tensor (M, 1) for ``a`` / (1, N) for ``b``."""
    if type(zero_point) is int and INT32_MIN <= zero_point <= INT32_MAX:
        return zero_point
    zp = _zero_point(zero_point, n, side)
    return int(zp) if zp.ndim == 0 else zp


def _int_matmul_int8(
    a: torch.Tensor,
    b: torch.Tensor,
    a_zero_point: int | torch.Tensor,
    b_zero_point: int | torch.Tensor,
    M: int,
    K: int,
    N: int,
) -> torch.Tensor | None:
    """(4.4) with ``torch._int_mm``: the int8 product, then the zero points as rank-1 corrections.

    ``a`` (M, K) and ``b`` (K, N) are int8 or uint8; a uint8 operand is shifted into int8 (``q - 128``,
    one xor of the top bit) and its zero point by the same 128, which leaves ``q - z`` unchanged. Then

        ``acc = a @ b - zb * (a_row_sums - K * za) - za * b_col_sums``                      (4.4)

    ``_int_mm`` is exact for ``K <= 131071``: every partial sum is at most ``128^2 K < 2^31``. The corrections
    are exact in int32 whenever ``K (128 + |za|)(128 + |zb|) <= 2^31 - 1``, because that bounds the sum of
    the absolute values of all four terms of (4.4) — so no partial result, in any order, leaves int32, and
    the result needs no check. Past that bound they are computed in int64 and the result is checked (the
    same bound, below 2^63, keeps int64 exact). Returns None where neither holds (the caller falls back).
    """
    if K > _K_MAX_INT8 or M == 0 or N == 0 or K == 0:
        return None
    za, zb = a_zero_point, b_zero_point
    if a.dtype == torch.uint8:
        a, za = (a ^ 128).view(torch.int8), za - 128  # q - 128 in int8: flip the top bit
    if b.dtype == torch.uint8:
        b, zb = (b ^ 128).view(torch.int8), zb - 128
    a, b = _blas_layout(a), _blas_layout(b)
    za_nonzero = not isinstance(za, int) or za != 0
    zb_nonzero = not isinstance(zb, int) or zb != 0
    if not (za_nonzero or zb_nonzero):
        return torch._int_mm(a, b)  # (M, N) int32, exact
    bound = K * (128 + (abs(za) if isinstance(za, int) else _absmax(za)))
    bound *= 128 + (abs(zb) if isinstance(zb, int) else _absmax(zb))
    if bound >= 2**63:
        return None
    wide = bound > INT32_MAX  # then the corrections are summed in int64 and the result checked
    if za_nonzero:  # one more row of ones gives the column sums of b in the same pass over b
        ab, b_col_sums = torch._int_mm(torch.constant_pad_nd(a, (0, 0, 0, 1), 1), b).split([M, 1])
    else:
        ab = torch._int_mm(a, b)  # (M, N)
    acc = ab.to(torch.int64) if wide else ab  # ab: a new tensor from _int_mm, updated in place below
    if not isinstance(za, int):
        za = za.to(acc.dtype)
    if zb_nonzero:  # - zb * (sum_k a_ik - K za): the row sums and the constant K za zb in one pass
        a_row_sums = torch._int_mm(a, _ones_column(K))  # (M, 1): a GEMV, faster than a.sum here
        a_terms = (a_row_sums.to(torch.int64) if wide else a_row_sums) - K * za  # (M, 1)
        if isinstance(zb, int):
            acc.sub_(a_terms, alpha=zb)
        else:
            acc.addcmul_(a_terms, zb.to(acc.dtype), value=-1)
    if za_nonzero:  # - za * sum_k b_kj
        if isinstance(za, int):
            acc.sub_(b_col_sums, alpha=za)
        else:
            acc.addcmul_(za, b_col_sums.to(acc.dtype), value=-1)
    if wide:
        return _to_int32(acc, f"int_matmul (M, K, N) = ({M}, {K}, {N})")
    return acc


def int_matmul_reference(
    a: torch.Tensor, b: torch.Tensor, a_zero_point: IntLike = 0, b_zero_point: IntLike = 0
) -> torch.Tensor:
    """(4.3) as the book writes it: subtract the zero points, multiply, sum over k — all in int64.

    The teaching version of :func:`int_matmul`, without its argument checks: ``a`` (M, K) and ``b`` (K, N)
    integer tensors, ``a_zero_point`` an int or (M, 1), ``b_zero_point`` an int or (1, N). The int64 result
    (M, N) is exact while ``K * max|a - za| * max|b - zb| < 2^63``; :func:`int_matmul` returns the same
    values as int32 (a test checks it bit for bit), faster, and refuses results that do not fit int32.

    >>> import torch
    >>> a = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    >>> b = torch.tensor([[5, 6], [7, 8]], dtype=torch.uint8)
    >>> int_matmul_reference(a, b, a_zero_point=1, b_zero_point=5)
    tensor([[ 2,  3],
            [ 6, 11]])
    """
    a_centered = a.to(torch.int64) - a_zero_point  # (M, K): a_ik - za
    b_centered = b.to(torch.int64) - b_zero_point  # (K, N): b_kj - zb
    return a_centered @ b_centered  # (M, N): sum_k (a_ik - za)(b_kj - zb)


class ZeroPointTerms(NamedTuple):
    """The four terms of (4.4) ``acc = ab - zb * a_row_sums - za * b_col_sums + K * za * zb``.

    ============  =========  ==================================================  =====================
    field         shape      value                                               when it is computed
    ============  =========  ==================================================  =====================
    ab            (M, N)     ``sum_k a_ik b_kj``, the raw integer matmul          run time, O(MNK)
    a_row_sums    (M, 1)     ``sum_k a_ik``, depends on the activations           run time, O(MK)
    b_col_sums    (1, N)     ``sum_k b_kj``, depends only on the weights          offline (once)
    a_zero_point  () / (M,1) ``za``                                               calibration
    b_zero_point  () / (1,N) ``zb``                                               offline
    k             int        ``K``; ``K * za * zb`` is a constant                 offline
    ============  =========  ==================================================  =====================
    """

    ab: torch.Tensor
    a_row_sums: torch.Tensor
    b_col_sums: torch.Tensor
    a_zero_point: torch.Tensor
    b_zero_point: torch.Tensor
    k: int

    def combine(self) -> torch.Tensor:
        """``ab - zb * a_row_sums - za * b_col_sums + K * za * zb`` (4.4), int64 of shape (M, N)."""
        return (
            self.ab
            - self.b_zero_point * self.a_row_sums
            - self.a_zero_point * self.b_col_sums
            + self.k * self.a_zero_point * self.b_zero_point
        )


def zero_point_terms(
    a: torch.Tensor, b: torch.Tensor, a_zero_point: IntLike = 0, b_zero_point: IntLike = 0
) -> ZeroPointTerms:
    """Split the asymmetric matmul (4.3) into the four terms of (4.4), in int64 on the CPU.

    ``sum_k (a_ik - za)(b_kj - zb) = sum_k a_ik b_kj - zb sum_k a_ik - za sum_k b_kj + K za zb``:
    the raw matmul, the activation row sums (run time, O(MK)), the weight column sums (offline) and a
    constant. Raises ``OverflowError`` if a term could exceed int64 (only for extreme int32 inputs).

    >>> import torch
    >>> a = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    >>> b = torch.tensor([[5, 6], [7, 8]], dtype=torch.uint8)
    >>> t = zero_point_terms(a, b, a_zero_point=1, b_zero_point=5)
    >>> t.ab.tolist(), t.a_row_sums.flatten().tolist(), t.b_col_sums.flatten().tolist(), t.k
    ([[19, 22], [43, 50]], [3, 7], [12, 14], 2)
    >>> t.combine().tolist()          # equals int_matmul(a, b, 1, 5)
    [[2, 3], [6, 11]]
    """
    M, K, N = _check_matmul(a, b)
    za = _zero_point(a_zero_point, M, "a")  # () or (M, 1)
    zb = _zero_point(b_zero_point, N, "b")  # () or (1, N)
    a64, b64 = a.cpu(), b.cpu()
    amax, bmax, zamax, zbmax = _absmax(a64), _absmax(b64), _absmax(za), _absmax(zb)
    bound = K * (amax * bmax + zbmax * amax + zamax * bmax + zamax * zbmax)
    if bound >= 2**63 and M and N:  # (M, N) terms: none when the result is empty
        raise OverflowError(
            f"zero_point_terms: the terms of (4.4) may reach {bound}, beyond int64; use int_matmul"
        )
    return _zero_point_terms(a64, b64, za, zb)


def _zero_point_terms(
    a: torch.Tensor, b: torch.Tensor, a_zero_point: torch.Tensor, b_zero_point: torch.Tensor
) -> ZeroPointTerms:
    """The four terms of (4.4) in int64: the raw matmul, the row sums of ``a``, the column sums of ``b``."""
    a64 = a.to(torch.int64)  # (M, K)
    b64 = b.to(torch.int64)  # (K, N)
    return ZeroPointTerms(
        ab=a64 @ b64,  # (M, N): run time, the int8 matmul
        a_row_sums=a64.sum(dim=1, keepdim=True),  # (M, 1): run time, O(MK)
        b_col_sums=b64.sum(dim=0, keepdim=True),  # (1, N): offline, the weights only
        a_zero_point=a_zero_point,
        b_zero_point=b_zero_point,
        k=a.shape[1],
    )


def int_matmul_expanded(
    a: torch.Tensor, b: torch.Tensor, a_zero_point: IntLike = 0, b_zero_point: IntLike = 0
) -> torch.Tensor:
    """:func:`int_matmul` computed through the zero-point expansion (4.4); the same int32 result.

    >>> import torch
    >>> a = torch.tensor([[0, 255]], dtype=torch.uint8)
    >>> b = torch.tensor([[3], [-4]], dtype=torch.int8)
    >>> int_matmul_expanded(a, b, a_zero_point=128), int_matmul(a, b, a_zero_point=128)
    (tensor([[-892]], dtype=torch.int32), tensor([[-892]], dtype=torch.int32))
    """
    acc = zero_point_terms(a, b, a_zero_point, b_zero_point).combine()  # (M, N) int64
    return _to_int32(acc, "int_matmul_expanded").to(a.device)


# --------------------------------------------------------------------------------------------------------
# Chapter 9: how wide the accumulator must be
# --------------------------------------------------------------------------------------------------------


def _check_bits(bits: object, name: str, lo: int, hi: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {bits!r}")
    return bits


def _check_operand_bits(a_bits: object, b_bits: object, signed: object) -> None:
    _check_bits(a_bits, "a_bits", 2, 32)
    _check_bits(b_bits, "b_bits", 2, 32)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")


def _product_range(a_bits: int, b_bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest product of an ``a_bits`` and a ``b_bits`` integer (both signed or unsigned)."""
    ranges = [(-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2**n - 1) for n in (a_bits, b_bits)]
    corners = [x * y for x in ranges[0] for y in ranges[1]]
    return min(corners), max(corners)


def _signed_bits(lo: int, hi: int) -> int:
    """Bits of the narrowest two's-complement register holding every integer in [lo, hi]."""
    n = 1
    while not (-(2 ** (n - 1)) <= lo and hi <= 2 ** (n - 1) - 1):
        n += 1
    return n


def product_bits(a_bits: int = 8, b_bits: int = 8, *, signed: bool = True) -> int:
    """Bits of a signed (two's-complement) register that holds every product of two integers (9.1).

    int8 x int8 products lie in [-128 * 127, (-128)^2] = [-16256, 16384]; 16384 > 2^14 - 1 needs 16 bits.
    Unsigned operands (``signed=False``): uint8 x uint8 reach 255^2 = 65025, 17 bits in a signed register.

    >>> product_bits(8, 8), product_bits(4, 4), product_bits(8, 8, signed=False)
    (16, 8, 17)
    """
    _check_operand_bits(a_bits, b_bits, signed)
    return _signed_bits(*_product_range(a_bits, b_bits, signed))


def accumulator_bits(a_bits: int, b_bits: int, k: int, *, signed: bool = True) -> int:
    """Bits of a signed accumulator that holds any sum of ``k`` products in the worst case (9.1).

    The worst case is every product at the same extreme, e.g. ``K * (-128)^2`` for int8.

    >>> accumulator_bits(8, 8, 1), accumulator_bits(8, 8, 2), accumulator_bits(8, 8, 4096)
    (16, 17, 28)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of accumulated products) must be a positive int, got {k!r}")
    _check_operand_bits(a_bits, b_bits, signed)
    lo, hi = _product_range(a_bits, b_bits, signed)
    return _signed_bits(k * lo, k * hi)


def max_safe_k(a_bits: int = 8, b_bits: int = 8, acc_bits: int = 32, *, signed: bool = True) -> int:
    """The largest K for which no sum of K products can overflow a signed ``acc_bits`` accumulator (9.2).

    ``K <= (2^(acc_bits-1) - 1) // max_product`` and ``K <= 2^(acc_bits-1) // |min_product|``; for int8
    with an int32 accumulator the binding case is ``(-128)^2 = 16384``: ``(2^31 - 1) // 16384 = 131071``.
    Returns 0 when a single product does not fit.

    >>> max_safe_k(8, 8, 32), max_safe_k(8, 8, 16), max_safe_k(4, 8, 16)
    (131071, 1, 31)
    """
    _check_operand_bits(a_bits, b_bits, signed)
    _check_bits(acc_bits, "acc_bits", 2, 64)
    return _max_safe_k(a_bits, b_bits, acc_bits, signed)


def _max_safe_k(a_bits: int, b_bits: int, acc_bits: int, signed: bool) -> int:
    """(9.2): how many of the largest (and of the most negative) products the accumulator holds."""
    lo, hi = _product_range(a_bits, b_bits, signed)  # e.g. [-16256, 16384] for int8 x int8
    limits = []
    if hi > 0:
        limits.append((2 ** (acc_bits - 1) - 1) // hi)  # K * hi <= 2^(acc_bits-1) - 1
    if lo < 0:
        limits.append(2 ** (acc_bits - 1) // -lo)  # K * lo >= -2^(acc_bits-1)
    return min(limits)


def _register(x: torch.Tensor, acc_bits: int, mode: str) -> torch.Tensor:
    half = 2 ** (acc_bits - 1)
    if mode == "wrap":
        return torch.remainder(x + half, 2 * half) - half
    return x.clamp(-half, half - 1)


def accumulate_steps(
    a: torch.Tensor, b: torch.Tensor, *, acc_bits: int = 16, mode: Literal["wrap", "saturate"] = "wrap"
) -> torch.Tensor:
    """Every partial sum of ``sum_k a_k b_k`` as an ``acc_bits`` register holds it, in order k = 0, 1, ...

    ``acc_k = R(acc_{k-1} + a_k b_k)`` with ``acc_{-1} = 0`` and the register R either wrapping modulo
    ``2^acc_bits`` (two's complement, ``mode="wrap"``) or clamping to
    ``[-2^(acc_bits-1), 2^(acc_bits-1) - 1]`` (``mode="saturate"``). ``a`` and ``b`` broadcast to
    (..., K); the result is int64 of shape (..., K).
    Products are exact. A wrapped sum depends only on the exact total (it is the total modulo 2^acc_bits);
    a saturated one depends on the order of accumulation.

    >>> import torch
    >>> a = torch.tensor([100, 100, 100], dtype=torch.int8)
    >>> b = torch.tensor([127, 127, 127], dtype=torch.int8)
    >>> accumulate_steps(a, b, acc_bits=16, mode="wrap").tolist()
    [12700, 25400, -27436]
    >>> accumulate_steps(a, b, acc_bits=16, mode="saturate").tolist()
    [12700, 25400, 32767]
    """
    _check_integer_tensor(a, "a")
    _check_integer_tensor(b, "b")
    _check_int32_values(a, "a")
    _check_int32_values(b, "b")
    _check_bits(acc_bits, "acc_bits", 2, 32)
    if mode not in ("wrap", "saturate"):
        raise ValueError(f"mode must be 'wrap' or 'saturate', got {mode!r}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    shape = _broadcast("accumulate: a and b must broadcast to (..., K)", a=a, b=b)
    if len(shape) == 0 or shape[-1] == 0:
        raise ValueError(f"a and b must broadcast to (..., K) with K >= 1, got shape {tuple(shape)}")
    return _accumulate_steps(a, b, acc_bits, mode)


def _accumulate_steps(a: torch.Tensor, b: torch.Tensor, acc_bits: int, mode: str) -> torch.Tensor:
    """``acc_k = R(acc_{k-1} + a_k b_k)``, one product at a time, as the hardware adds them."""
    products = a.to(torch.int64) * b.to(torch.int64)  # (..., K): exact, at most 2^62
    acc = torch.zeros(products.shape[:-1], dtype=torch.int64, device=products.device)  # (...)
    steps = []
    for k in range(products.shape[-1]):
        acc = _register(acc + products[..., k], acc_bits, mode)  # wrap or saturate to acc_bits
        steps.append(acc)
    return torch.stack(steps, dim=-1)  # (..., K)


def accumulate(
    a: torch.Tensor, b: torch.Tensor, *, acc_bits: int = 16, mode: Literal["wrap", "saturate"] = "wrap"
) -> torch.Tensor:
    """The final value of :func:`accumulate_steps`: ``sum_k a_k b_k`` in an ``acc_bits`` register, (...,).

    >>> import torch
    >>> a = torch.full((512,), -128, dtype=torch.int8)
    >>> accumulate(a, a, acc_bits=32).item(), accumulate(a, a, acc_bits=16, mode="saturate").item()
    (8388608, 32767)
    >>> accumulate(a, a, acc_bits=16, mode="wrap").item()        # 512 * 16384 = 2^23 = 0 mod 2^16
    0
    """
    return accumulate_steps(a, b, acc_bits=acc_bits, mode=mode)[..., -1]


# --------------------------------------------------------------------------------------------------------
# Chapter 9: requantization with a fixed-point multiplier (TFLite / gemmlowp)
# --------------------------------------------------------------------------------------------------------


def quantize_multiplier(m: float) -> tuple[int, int]:
    """Offline: a real ``m >= 0`` as ``(multiplier, shift)`` with ``m ≈ multiplier * 2^(shift - 31)`` (9.4).

    TFLite's ``QuantizeMultiplier``: ``m = q * 2^shift`` with ``q`` in [0.5, 1) (``frexp``),
    ``multiplier = round(q * 2^31)`` (half away from zero) in [2^30, 2^31 - 1]; if rounding reaches 2^31 it is
    halved and ``shift`` incremented; ``shift < -31`` (``m`` below about 2^-32) flushes to ``(0, 0)``, and
    ``m = 0`` gives ``(0, 0)``. A positive ``shift`` is a left shift. This function uses floats: it runs
    once, when the model is converted.

    >>> quantize_multiplier(0.5), quantize_multiplier(1.0), quantize_multiplier(0.1)
    ((1073741824, 0), (1073741824, 1), (1717986918, -3))
    """
    if isinstance(m, torch.Tensor) and m.numel() == 1:
        m = m.item()
    if isinstance(m, bool) or not isinstance(m, Real):
        raise TypeError(f"m must be a real number, got {m!r}")
    m = float(m)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"the real multiplier m must be finite and >= 0, got {m!r}")
    return _quantize_multiplier(m)


def _quantize_multiplier(m: float) -> tuple[int, int]:
    """(9.4) for a finite ``m >= 0``: TFLite's ``QuantizeMultiplier``."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)  # m = q * 2^shift, q in [0.5, 1)
    scaled = q * 2**31  # exact: a power-of-two scaling
    multiplier = math.floor(scaled + 0.5)  # round half away from zero (std::round); exact, scaled < 2^31
    if multiplier == 2**31:
        multiplier //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(multiplier), int(shift)


def quantize_multipliers(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline, per channel: :func:`quantize_multiplier` of each element; two int64 tensors of ``m``'s shape.

    Vectorised with ``torch.frexp``; equal element by element to the scalar function.

    >>> import torch
    >>> quantize_multipliers(torch.tensor([0.5, 0.1], dtype=torch.float64))
    (tensor([1073741824, 1717986918]), tensor([ 0, -3]))
    """
    if not isinstance(m, torch.Tensor) or not m.is_floating_point():
        raise TypeError(f"m must be a floating-point tensor, got {m!r}")
    m64 = m.detach().double()
    bad = ~torch.isfinite(m64) | (m64 < 0)
    if bool(bad.any()):
        first = m64[bad].flatten()[0].item()
        raise ValueError(f"the real multipliers m must be finite and >= 0, got {first!r}")
    q, shift = torch.frexp(m64)  # m = q * 2^shift, q in [0.5, 1) (0 for m = 0)
    multiplier = torch.floor(q * 2**31 + 0.5).to(torch.int64)  # half away from zero; exact in float64
    shift = shift.to(torch.int64)
    rounded_up = multiplier == 2**31
    multiplier = torch.where(rounded_up, multiplier // 2, multiplier)
    shift = torch.where(rounded_up, shift + 1, shift)
    flush = (shift < -31) | (multiplier == 0)  # too small for 31 bits, or m = 0
    return torch.where(flush, 0, multiplier), torch.where(flush, 0, shift)


def _srdhm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SaturatingRoundingDoublingHighMul on int64 tensors holding int32 values; int64 result."""
    ab = a * b  # |ab| <= 2^62: exact in int64
    positive, negative = torch.tensor(2**30, device=ab.device), torch.tensor(1 - 2**30, device=ab.device)
    nudge = torch.where(ab >= 0, positive, negative)
    high = torch.div(ab + nudge, 2**31, rounding_mode="trunc")  # C++ integer division truncates toward zero
    overflow = (a == b) & (a == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX, device=ab.device), high)


def _rdbpot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """RoundingDivideByPOT on int64 tensors holding int32 values, ``exponent`` in [0, 31]; int64 result."""
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1  # 2^exponent - 1
    remainder = torch.bitwise_and(x, mask)  # two's-complement low bits, as in int32
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    quotient = torch.bitwise_right_shift(x, exponent)  # arithmetic shift: floor division by 2^exponent
    return quotient + (remainder > threshold).to(torch.int64)


def saturating_rounding_doubling_high_mul(a: IntLike, b: IntLike) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2^31)`` in int32.

    ``ab = a * b`` in 64 bits; ``nudge = 2^30`` if ``ab >= 0`` else ``1 - 2^30``;
    result ``(ab + nudge) / 2^31`` with C++ division (truncation toward zero) — so ties go toward +inf.
    The one overflow, ``a = b = -2^31`` (whose true result is 2^31), saturates to ``2^31 - 1``. Broadcasts.

    >>> saturating_rounding_doubling_high_mul(2**30, 3).item()               # 1.5 rounds to 2
    2
    >>> saturating_rounding_doubling_high_mul(-(2**30), 3).item()            # -1.5 rounds to -1
    -1
    >>> saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN).item()
    2147483647
    """
    device = a.device if isinstance(a, torch.Tensor) else b.device if isinstance(b, torch.Tensor) else None
    _broadcast("saturating_rounding_doubling_high_mul", a=a, b=b)
    return _srdhm(_int64(a, "a", device), _int64(b, "b", device)).to(torch.int32)


def rounding_divide_by_pot(x: IntLike, exponent: IntLike) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``mask = 2^exponent - 1``, ``remainder = x & mask``, ``threshold = (mask >> 1) + (x < 0)``,
    result ``(x >> exponent) + (remainder > threshold)`` with an arithmetic shift; ``exponent`` in [0, 31].

    >>> import torch
    >>> rounding_divide_by_pot(torch.tensor([5, 6, -5, -6, 7]), 2).tolist()   # 1.25 1.5 -1.25 -1.5 1.75
    [1, 2, -1, -2, 2]
    """
    device = x.device if isinstance(x, torch.Tensor) else None
    _broadcast("rounding_divide_by_pot", x=x, exponent=exponent)
    x64 = _int64(x, "x", device)
    e64 = _int64(exponent, "exponent", x64.device)
    _check_in(e64, 0, 31, "exponent", "a right shift")
    return _rdbpot(x64, e64).to(torch.int32)


Rounding = Literal["double", "single"]


def _mbqm_checked(acc: object, multiplier: object, shift: object, rounding: object) -> torch.Tensor:
    """Check the arguments of (9.5), run :func:`_mbqm`, and refuse results TFLite could not form in int32."""
    if isinstance(acc, torch.Tensor) and acc.is_floating_point():
        raise TypeError(f"acc must be an integer (int32) tensor, got {acc.dtype}: requantization is integer")
    if not isinstance(acc, torch.Tensor):
        raise TypeError(f"acc must be an integer tensor, got {type(acc).__name__}")
    if rounding not in ("double", "single"):
        raise ValueError(f"rounding must be 'double' or 'single', got {rounding!r}")
    _broadcast("multiply_by_quantized_multiplier", acc=acc, multiplier=multiplier, shift=shift)
    x = _int64(acc, "acc")
    m = _int64(multiplier, "multiplier", x.device)
    s = _int64(shift, "shift", x.device)
    _check_in(m, 0, INT32_MAX, "multiplier", "a fixed-point multiplier")
    _check_in(s, -31, 30, "shift", "a shift (TFLite's range)")
    if rounding == "double":
        shifted = x * torch.bitwise_left_shift(torch.ones_like(s), s.clamp(min=0))  # acc * 2^left_shift
        bad = (shifted < INT32_MIN) | (shifted > INT32_MAX)
        if bool(bad.any()):
            value = int(shifted[bad].flatten()[0])
            raise OverflowError(
                f"acc * 2^left_shift = {value} does not fit int32; TFLite forms this product in int32, "
                "where overflow is undefined behaviour — keep |acc * m| small or shift <= 0"
            )
    result = _mbqm(x, m, s, rounding)  # type: ignore[arg-type]
    bad = (result < INT32_MIN) | (result > INT32_MAX)  # only single rounding can get here
    if bool(bad.any()):
        value = int(result[bad].flatten()[0])
        raise OverflowError(f"acc * multiplier * 2^(shift - 31) = {value} does not fit int32")
    return result


def _mbqm(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, rounding: Rounding = "double") -> torch.Tensor:
    """(9.5) on int64 tensors holding int32 values: ``x`` = acc, ``m`` = multiplier, ``s`` = shift."""
    if rounding == "single":  # TFLITE_SINGLE_ROUNDING: one rounding, in 64 bits
        total_shift = 31 - s  # in [1, 62]
        half = torch.bitwise_left_shift(torch.ones_like(total_shift), total_shift - 1)
        return torch.bitwise_right_shift(x * m + half, total_shift)  # |x * m| < 2^62: exact in int64
    left = s.clamp(min=0)
    right = (-s).clamp(min=0)
    shifted = x * torch.bitwise_left_shift(torch.ones_like(left), left)  # acc * 2^left_shift, fits int32
    return _rdbpot(_srdhm(shifted, m), right)  # int64 holding int32 values


def multiply_by_quantized_multiplier(
    acc: torch.Tensor, multiplier: IntLike, shift: IntLike, rounding: Rounding = "double"
) -> torch.Tensor:
    """``round(acc * multiplier * 2^(shift - 31))`` with integers only (9.5), TFLite's fixed-point multiply.

    ``rounding="double"`` (TFLite's default, gemmlowp's definitions): ``left = max(shift, 0)``,
    ``right = max(-shift, 0)``,
    ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc * 2^left, multiplier), right)``: two
    roundings, so a fraction of about ``2^-(right + 1)`` of the results is one off ``round(acc * M)``.
    TFLite forms ``acc * 2^left`` in int32; an overflow there raises ``OverflowError`` here.

    ``rounding="single"`` (TFLite built with ``TFLITE_SINGLE_ROUNDING``): one rounding in 64 bits,
    ``(acc * multiplier + 2^(30 - shift)) >> (31 - shift)`` (ties toward +inf).

    ``acc`` holds int32 values; ``multiplier`` in [0, 2^31 - 1] and ``shift`` in [-31, 30] are ints or tensors
    that broadcast against ``acc`` (per-channel requantization: one pair per output column). The int32 result
    is bit-exact to TFLite's ``MultiplyByQuantizedMultiplier``.

    >>> import torch
    >>> multiplier, shift = quantize_multiplier(0.1)
    >>> multiply_by_quantized_multiplier(torch.tensor([1000, -1000, 15, 25]), multiplier, shift)
    tensor([ 100, -100,    2,    3], dtype=torch.int32)
    >>> multiplier, shift = quantize_multiplier(0.3)     # 0.3 * 11 = 3.3: the double rounding gives 4
    >>> acc = torch.tensor([11])
    >>> [multiply_by_quantized_multiplier(acc, multiplier, shift, r).item() for r in ("double", "single")]
    [4, 3]
    """
    return _mbqm_checked(acc, multiplier, shift, rounding).to(torch.int32)


def _check_qrange(qmin: object, qmax: object) -> tuple[int, int]:
    for v, name in ((qmin, "qmin"), (qmax, "qmax")):
        if isinstance(v, bool) or not isinstance(v, int) or not INT32_MIN <= v <= INT32_MAX:
            raise ValueError(f"{name} must be an int32 int, got {v!r}")
    if qmin > qmax:  # type: ignore[operator]
        raise ValueError(f"qmin must not exceed qmax, got qmin={qmin}, qmax={qmax}")
    return qmin, qmax  # type: ignore[return-value]


def _output_dtype(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        if torch.iinfo(dtype).min <= qmin and qmax <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def requantize(
    acc: torch.Tensor,
    multiplier: IntLike,
    shift: IntLike,
    out_zero_point: IntLike,
    qmin: int = -128,
    qmax: int = 127,
    rounding: Rounding = "double",
) -> torch.Tensor:
    """int32 accumulators to the next layer's integers (9.3): ``clamp(zo + MBQM(acc), qmin, qmax)``.

    ``MBQM`` is :func:`multiply_by_quantized_multiplier` (with its ``rounding``); the result has the
    smallest integer dtype holding ``[qmin, qmax]`` (int8 by default); ``out_zero_point`` is in [qmin, qmax].

    >>> import torch
    >>> multiplier, shift = quantize_multiplier(0.05)
    >>> requantize(torch.tensor([-3000, 0, 1000, 5000]), multiplier, shift, out_zero_point=-10)
    tensor([-128,  -10,   40,  127], dtype=torch.int8)
    """
    qmin, qmax = _check_qrange(qmin, qmax)
    _broadcast("requantize", acc=acc, multiplier=multiplier, shift=shift, out_zero_point=out_zero_point)
    y = _mbqm_checked(acc, multiplier, shift, rounding)  # int64 holding int32 values
    zo = _int64(out_zero_point, "out_zero_point", y.device)
    _check_in(zo, qmin, qmax, "out_zero_point", "an output integer")
    return (y + zo).clamp(qmin, qmax).to(_output_dtype(qmin, qmax))


def requantize_float(
    acc: torch.Tensor, m: float | torch.Tensor, out_zero_point: IntLike, qmin: int = -128, qmax: int = 127
) -> torch.Tensor:
    """The float epilogue (9.3) of GPUs: ``clamp(round(float32(acc) * float32(m)) + zo, qmin, qmax)``.

    In float32, rounding half to even — the comparison point for the fixed-point path. ``m`` (scalar or
    per-column tensor) must be finite and positive.

    >>> import torch
    >>> requantize_float(torch.tensor([-3000, 0, 1000, 5000]), 0.05, out_zero_point=-10)
    tensor([-128,  -10,   40,  127], dtype=torch.int8)
    """
    qmin, qmax = _check_qrange(qmin, qmax)
    x = _int64(_check_integer_tensor(acc, "acc"), "acc")
    _broadcast("requantize_float", acc=acc, m=m, out_zero_point=out_zero_point)
    scale = _positive_scale(m, "m", x.device).to(torch.float32)
    zo = _int64(out_zero_point, "out_zero_point", x.device)
    _check_in(zo, qmin, qmax, "out_zero_point", "an output integer")
    y = torch.round(x.to(torch.float32) * scale).to(torch.int64)
    return (y + zo).clamp(qmin, qmax).to(_output_dtype(qmin, qmax))


# --------------------------------------------------------------------------------------------------------
# Chapter 9: the bias and the way back to floats
# --------------------------------------------------------------------------------------------------------


def _positive_scale(scale: object, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a positive float or tensor, got {scale!r}")
    s = torch.as_tensor(scale, dtype=torch.float64, device=device)
    if s.numel() and not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    return s


def quantize_bias(
    bias: torch.Tensor, a_scale: float | torch.Tensor, w_scale: float | torch.Tensor
) -> torch.Tensor:
    """Offline: the bias in int32 with scale ``sa * sw`` and zero point 0 (9.6): ``round(bias / (sa * sw))``.

    With that scale the bias is in the accumulator's units, so it is added to the int32 accumulator before
    requantization. ``w_scale`` may be per output channel (shape (N,)); rounding is half to even in float64.
    Raises ``OverflowError`` if a quantized bias does not fit int32.

    >>> import torch
    >>> quantize_bias(torch.tensor([0.5, -0.25]), a_scale=0.02, w_scale=torch.tensor([0.01, 0.005]))
    tensor([ 2500, -2500], dtype=torch.int32)
    """
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias!r}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"bias must be finite, got {bias[~torch.isfinite(bias)].flatten()[0].item()}")
    _broadcast("quantize_bias", bias=bias, a_scale=a_scale, w_scale=w_scale)
    sa = _positive_scale(a_scale, "a_scale", bias.device)
    sw = _positive_scale(w_scale, "w_scale", bias.device)
    q = _quantize_bias(bias, sa, sw)
    if q.numel() and (float(q.min()) < INT32_MIN or float(q.max()) > INT32_MAX):
        raise OverflowError(
            f"a quantized bias ({float(q.abs().max()):.6g}) does not fit int32: sa * sw is too small"
        )
    return q.to(torch.int32)


def _quantize_bias(bias: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(9.6) in float64: ``round(bias / (sa * sw))``, half to even; integers, not yet narrowed to int32."""
    acc_scale = a_scale.double() * w_scale.double()  # the accumulator's scale, zero point 0
    return torch.round(bias.double() / acc_scale)


def dequantize_acc(
    acc: torch.Tensor, a_scale: float | torch.Tensor, w_scale: float | torch.Tensor
) -> torch.Tensor:
    """int32 accumulators to float32 for a float-only next op (softmax, layernorm, output): ``acc * sa * sw``.

    One multiply per output, in float32 (per-column ``w_scale`` of shape (N,) broadcasts). ``acc`` must
    already include the zero-point corrections (4.4), as :func:`int_matmul` returns it.

    >>> import torch
    >>> dequantize_acc(torch.tensor([[2500, -100]], dtype=torch.int32), 0.02, torch.tensor([0.01, 0.005]))
    tensor([[ 0.5000, -0.0100]])
    """
    x = _check_integer_tensor(acc, "acc")
    _broadcast("dequantize_acc", acc=acc, a_scale=a_scale, w_scale=w_scale)
    sa = _positive_scale(a_scale, "a_scale", x.device)
    sw = _positive_scale(w_scale, "w_scale", x.device)
    return _dequantize_acc(x, sa, sw)


def _dequantize_acc(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``acc * sa * sw``: the scale product once (float64, rounded to float32), then one multiply each."""
    acc_scale = (a_scale.double() * w_scale.double()).to(torch.float32)  # () or (N,)
    return acc.to(torch.float32) * acc_scale  # (M, N) float32
