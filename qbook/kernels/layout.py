"""Weight layout for chapter 10's kernels: B stored K-major, as the tensor cores read int8 operands.

An int8 tensor-core instruction reads both operands "K-major": the K values of a row of ``A`` and of a column
of ``B`` lie next to each other in memory. ``nn.Linear`` stores its weight ``W`` as (N, K) row-major, so
``B = W.T`` already is K-major; a ``B`` given row-major (K, N) is transposed through registers inside the
kernel on every call, and on Hopper it cannot use the TMA kernel at all. Prepacking converts it once.
"""

from __future__ import annotations

import torch

__all__ = ["is_k_major", "prepack_weight"]


def is_k_major(b: torch.Tensor) -> bool:
    """Whether the K values of each column of ``b`` (K, N) are contiguous in memory (unit stride along K).

    >>> w = torch.zeros((3, 5), dtype=torch.int8)        # an nn.Linear weight (N, K)
    >>> is_k_major(w.T), is_k_major(w.T.contiguous())
    (True, False)
    """
    return b.stride(0) == 1


def prepack_weight(b: torch.Tensor) -> torch.Tensor:
    """``b`` (K, N) as a K-major view of a contiguous (N, K) copy: the layout the kernels read fastest.

    Call it once per weight and keep the result; a ``b`` that is K-major already is returned as it is.

    >>> b = torch.arange(6, dtype=torch.int8).reshape(2, 3)          # (K, N) = (2, 3), row-major
    >>> p = prepack_weight(b)
    >>> torch.equal(p, b), p.shape, p.stride()
    (True, torch.Size([2, 3]), (1, 2))
    """
    return b if is_k_major(b) else b.T.contiguous().T
