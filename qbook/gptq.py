"""Beyond round to nearest (1): GPTQ, second-order rounding of a layer's weights — chapter 11.

Round to nearest (RTN) minimises each weight's own error and ignores what the layer computes. GPTQ
(Frantar et al., 2023; the lineage: Optimal Brain Surgeon, Hassibi & Stork 1993; Optimal Brain Compression,
Frantar & Alistarh 2022) minimises the layer's **output** error on calibration inputs ``X`` ``(tokens, K)``:

    min_Ŵ ‖X Wᵀ − X Ŵᵀ‖²  =  ½ Σ_n (w_n − ŵ_n)ᵀ H (w_n − ŵ_n),     H = 2 XᵀX  (K × K)            (11.1)

one row ``w_n`` of ``W`` ``(N, K)`` at a time, all rows sharing ``H``. It quantizes the columns one by one,
and after rounding column ``q`` it moves the columns not yet quantized to absorb the error (the OBS update)::

    w ← w − (w_q − ŵ_q) / [H⁻¹]_qq · H⁻¹_{:,q},   then column q leaves H⁻¹ (Gaussian elimination)  (11.2)

The fast form takes the rows of the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), which are
exactly the eliminated inverses of (11.2) scaled by ``1/√[H⁻¹]_qq``: ``err = (w_q − ŵ_q) / U_qq``,
``w_{q:} −= err · U_{q,q:}`` (11.3), applied lazily in blocks of ``block_size`` columns (one matrix
product per block instead of one per column).

Details, stated once:

* ``H`` is accumulated (:func:`hessian`) and used in **float64**, and the weight is updated in float64: on a
  CPU this costs little and makes the Cholesky factorisations robust and the comparison with the slow
  reference exact. (The reference implementation keeps a running mean of ``2xxᵀ`` in float32; the factor
  ``1/tokens`` cancels in (11.2), and the damping below is relative.)
* damping: ``H += λ I`` with ``λ = damp · mean(diag H)`` (``damp = 0.01``); a **dead** input (``H_kk = 0``,
  never nonzero in the calibration data) gets ``H_kk = 1`` and its weight column is set to 0 first, as in the
  reference implementation (its value cannot change the calibration output, and 0 narrows its group's grid).
  An all-zero ``H`` (no calibration rows, or all inputs zero) carries no information and is refused.
* grids: ``qbook.calc_qparams`` on the group's minimum and maximum, the codes by ``qbook.quantize``, any
  :class:`~qbook.affine.QuantSpec` (symmetric or affine). Per group of ``g`` consecutive inputs
  (``PerGroup(axis=1, group_size=g)``, scales ``(N, K // g)``) or per output channel (``group_size=None``,
  scales ``(N, 1)``). Without act-order a group's grid is chosen from the weights as they stand when
  GPTQ reaches its first column (after the error feedback of the earlier groups), as in the paper; blocks
  are rounded up to whole groups so that those weights are up to date. Per channel, and with act-order,
  the grids come from the weight before any update (the reference implementations' ``static_groups``), so
  that the groups stay consecutive in the original column order and chapter 7's
  :class:`~qbook.nn.WeightOnlyLinear` stores them as it stores RTN's. (The reference implementation takes
  per-channel grids before zeroing dead columns; here after.)
* act-order: columns processed in order of decreasing ``H_kk`` (the inputs with the most energy first).
* GPTQ is greedy (each column rounded once, to nearest after the feedback), and (11.2) assumes an unbounded
  grid, while the feedback can push a weight past the grid's ends, where it is clipped. So on tiny layers it
  can end above RTN (seen with 3-bit affine grids and ``N = 6`` rows); on layers of realistic size the error
  sums over many rows and it stays below (the tests sweep ``32 × 64`` layers; all 36 MiniLM linears).
* the column loop runs on one thread (thousands of small operations; restored afterwards).

API (all weights ``(N, K)`` as ``nn.Linear`` stores them):

* :func:`hessian` ``(x) -> H``: ``2 XᵀX`` in float64, ``x`` ``(..., K)``; sum it over batches;
* :func:`gptq` ``(weight, H, bits=4, group_size=128, *, spec=None, act_order=False, damp=0.01,
  block_size=128) -> QuantizedWeight`` (codes, scale, zero_point, dequantized weight); the math core
  :func:`_gptq`;
* :func:`gptq_reference`: the same from (11.2) with the explicit inverse, column by column (slow);
* :func:`rtn` ``(weight, bits=4, group_size=128, *, spec=None) -> QuantizedWeight``: round to nearest, as
  :meth:`~qbook.nn.WeightOnlyLinear.from_float` does;
* :func:`best_rounding` ``(weight, x, bits=4, *, spec=None, search="updown") -> QuantizedWeight``: the exact
  optimum of (11.1) on RTN's per-channel grid by exhaustive search (tiny layers only): AdaRound's point
  (Nagel et al., 2020) that rounding to nearest is not optimal for the layer's output;
* :func:`output_error` ``(weight, weight_hat, H, *, relative=False) -> float``: (11.1) from ``H``;
* :func:`quantize_linear` ``(linear, x, bits=4, group_size=128, *, spec=None, act_order=False, damp=0.01,
  block_size=128) -> WeightOnlyLinear``: GPTQ on one layer from its captured inputs ``x`` ``(..., K)``;
* :func:`quantize_model` ``(model, batches, bits=4, group_size=128, *, spec=None, skip=(), act_order=False,
  damp=0.01, block_size=128, sequential=True, run=None, inplace=False) -> nn.Module``: every ``nn.Linear``
  becomes a :class:`~qbook.nn.WeightOnlyLinear` holding GPTQ's codes; :func:`qbook.ptq.quantize_weights`
  with ``method="gptq"`` calls it.

The default grid is :class:`~qbook.nn.WeightOnlyLinear`'s: symmetric, narrow range (``[-7, 7]`` at 4 bits).

>>> import torch
>>> from qbook.data import randn
>>> _ = torch.manual_seed(0)
>>> x = randn(256, 16) @ randn(16, 16)            # correlated inputs (tokens, K)
>>> w = randn(8, 16)                               # (N, K)
>>> H = hessian(x)
>>> g, r = gptq(w, H, bits=3, group_size=None), rtn(w, bits=3, group_size=None)
>>> g.codes.dtype, g.codes.shape, g.scale.shape
(torch.int8, torch.Size([8, 16]), torch.Size([8, 1]))
>>> output_error(w, g.weight, H) < output_error(w, r.weight, H)
True
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qbook.affine import QuantSpec, calc_qparams, dequantize, quantize
from qbook.granularity import PerGroup, minmax

__all__ = [
    "QuantizedWeight",
    "best_rounding",
    "gptq",
    "gptq_reference",
    "hessian",
    "output_error",
    "quantize_linear",
    "quantize_model",
    "rtn",
]


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight ``(N, K)`` on a grid: integer ``codes`` ``(N, K)`` (``spec.dtype``), float32 ``scale`` and
    int32 ``zero_point`` ``(N, K // g)`` (``(N, 1)`` per channel), and ``weight``, the dequantized float32
    ``(N, K)`` (``dequantize(codes, scale, zero_point, granularity=self.granularity)``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    weight: torch.Tensor
    spec: QuantSpec
    group_size: int | None

    @property
    def granularity(self) -> PerGroup:
        """``PerGroup(axis=1, group_size=g)``, with ``g = K`` per channel."""
        return PerGroup(axis=1, group_size=self.group_size or self.codes.shape[1])


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _weight_spec(bits: object, spec: object) -> QuantSpec:
    """The grid: ``spec``, or WeightOnlyLinear's default symmetric narrow grid of ``bits`` bits."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if spec is None:
        return QuantSpec(bits, True, narrow_range=True, symmetric=True)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or None, got {spec!r}")
    if spec.bits != bits:
        raise ValueError(f"bits={bits} but spec has {spec.bits} bits")
    return spec


def _check_weight(weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a floating-point tensor (N, K), got {got}")
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty 2-D tensor (N, K), got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds NaN or infinite values")
    return weight.detach()


def _check_group_size(group_size: object, K: int) -> int:
    """``g`` (``K`` for per channel); it must divide ``K``."""
    if group_size is None:
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None (per channel), got {group_size!r}")
    if K % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the weight's K = {K} inputs; pad the weight (and H) "
            f"to a multiple of {group_size} with zeros (quantize_model does)"
        )
    return group_size


def _check_hessian(H: object, K: int) -> torch.Tensor:
    if not isinstance(H, torch.Tensor) or not H.is_floating_point():
        got = H.dtype if isinstance(H, torch.Tensor) else type(H).__name__
        raise TypeError(f"H must be a floating-point tensor (K, K) (e.g. hessian(x)), got {got}")
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H must be ({K}, {K}) for a weight of K = {K} inputs, got {tuple(H.shape)}")
    H = H.detach().to(torch.float64)
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H holds NaN or infinite values")
    if bool((H.diagonal() < 0).any()):
        k = int((H.diagonal() < 0).nonzero()[0])
        raise ValueError(f"H must be a second moment 2 XᵀX, but H[{k}, {k}] = {H[k, k].item():.4g} < 0")
    if not torch.allclose(H, H.T, rtol=1e-6, atol=1e-9 * float(H.abs().max())):
        raise ValueError("H must be symmetric (a second moment 2 XᵀX)")
    return H


def _check_damp(damp: object) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    return float(damp)


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _prepare(
    weight: object, H: object, bits: object, group_size: object, spec: object, act_order: object, damp: object
) -> tuple[torch.Tensor, torch.Tensor, QuantSpec, int, torch.Tensor, bool]:
    """Checked arguments of :func:`gptq` / :func:`gptq_reference`: ``W`` (dead columns zeroed) and the damped
    ``H`` in float64, the grid, ``g``, the column order and whether the grids are static."""
    W = _check_weight(weight).to(torch.float64)
    N, K = W.shape
    spec = _weight_spec(bits, spec)
    g = _check_group_size(group_size, K)
    H = _check_hessian(H, K)
    if not bool(H.any()):
        raise ValueError(
            "H is all zero: the calibration inputs carry no information (no rows, or every input 0), and "
            "GPTQ would treat every input as dead and zero the whole weight; pass real inputs"
        )
    act_order, damp = _check_bool(act_order, "act_order"), _check_damp(damp)
    W, H = _dampen(W, H, damp)
    if not bool(torch.linalg.cholesky_ex(H).info == 0):
        raise ValueError(
            f"H is not positive definite after damping (damp={damp}): it is not a second moment 2 XᵀX of "
            "real inputs; compute it with hessian(x), or raise damp"
        )
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K)
    return W, H, spec, g, order, act_order or g == K


def _dampen(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (``H_kk = 0``): ``H_kk = 1`` and weight column 0; then ``H += damp · mean(diag H) · I``."""
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    return W, H


def _check_unshared(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse a layer of ``names`` that is one module reachable under several names (used at several places):
    the layers are replaced by name, so only one of its places would change."""
    aliases: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    for name in names:
        found = aliases[id(model.get_submodule(name))]
        if len(found) > 1:
            raise ValueError(
                f"layer {name!r} is one module reachable under the names {found}: it would be replaced at "
                f"{name!r} only; give each place its own copy (copy.deepcopy) or skip {name!r}"
            )


def _grid(w: torch.Tensor, spec: QuantSpec, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``calc_qparams`` on the min and max of each group of ``g`` consecutive columns: ``(N, K // g)``."""
    return calc_qparams(
        *minmax(w.float(), PerGroup(axis=1, group_size=g)), spec.qmin, spec.qmax, symmetric=spec.symmetric
    )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one thread (restored after): GPTQ's loop is thousands of small operations, for which a thread
    pool costs more than it gains (50x on a busy 2-core machine); one thread also fixes the order of sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _result(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
            group_size: int | None) -> QuantizedWeight:
    g = PerGroup(axis=1, group_size=group_size or codes.shape[1])
    weight = dequantize(codes, scale, zero_point, granularity=g)  # (N, K) float32
    return QuantizedWeight(codes, scale, zero_point, weight, spec, group_size)


# --------------------------------------------------------------------------------------------------------
# The second moment and the layer's output error
# --------------------------------------------------------------------------------------------------------


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 XᵀX`` ``(K, K)`` in float64 for inputs ``x`` ``(..., K)`` (leading dimensions flattened into
    ``tokens``): the Hessian of (11.1), the layer's squared output error, with respect to one row of the
    weight — chapter 11. Sum it over calibration batches.

    >>> hessian(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    tensor([[ 2.,  4.],
            [ 4., 10.]], dtype=torch.float64)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor (..., K), got {got}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dimension K >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values")
    return _hessian(x)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    X = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, K)
    return 2 * X.T @ X


def output_error(
    weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor, *, relative: bool = False
) -> float:
    """The layer's squared output error (11.1), ``‖X Wᵀ − X Ŵᵀ‖² = ½ Σ_n Δw_nᵀ H Δw_n`` with ``H = 2 XᵀX``
    (:func:`hessian`), in float64 — chapter 11. ``relative=True`` divides by ``‖X Wᵀ‖²`` (a relative MSE).

    >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    >>> w, w_hat = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.5]])
    >>> output_error(w, w_hat, hessian(x)), float(((x @ w.T - x @ w_hat.T) ** 2).sum())
    (1.25, 1.25)
    """
    weight = _check_weight(weight)
    what = _check_weight(weight_hat)
    if what.shape != weight.shape:
        raise ValueError(f"weight_hat must have the shape {tuple(weight.shape)}, got {tuple(what.shape)}")
    H = _check_hessian(H, weight.shape[1])
    _check_bool(relative, "relative")
    return _output_error(weight.double(), what.double(), H, relative)


def _output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, relative: bool) -> float:
    D = W - W_hat  # (N, K)
    error = 0.5 * float(((D @ H) * D).sum())
    return error / (0.5 * float(((W @ H) * W).sum())) if relative else error


# --------------------------------------------------------------------------------------------------------
# GPTQ: the fast form (Cholesky, lazy blocks) and the slow reference (explicit inverse, column by column)
# --------------------------------------------------------------------------------------------------------


def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ (Frantar et al., 2023) for one weight ``(N, K)`` and ``H = 2 XᵀX`` ``(K, K)`` — chapter 11.

    Quantizes the columns in order (by decreasing ``H_kk`` with ``act_order``), each by round to nearest
    on its group's grid, and feeds the error forward to the columns not yet quantized: with ``H⁻¹ = UᵀU``
    (``U`` upper triangular), ``err = (w_q − ŵ_q) / U_qq`` and ``w_{q:} −= err U_{q,q:}`` (11.3), which
    minimises the layer's output error (11.1) column by column. ``H`` is damped (``+ damp · mean(diag H) I``);
    the module docstring states the details (dead inputs, where the grids come from, float64).

    ``bits`` 2..8 on the grid ``spec`` (default: symmetric narrow, ``[-7, 7]`` at 4 bits); one scale per
    group of ``group_size`` consecutive inputs (it must divide ``K``), or per output channel (``None``).
    ``block_size`` changes only the speed (it is rounded up to whole groups). Returns a
    :class:`QuantizedWeight`; :meth:`qbook.nn.WeightOnlyLinear.from_quantized` stores it.

    >>> _ = torch.manual_seed(0)
    >>> x, w = torch.randn(64, 8, dtype=torch.float64).float(), torch.randn(4, 8, dtype=torch.float64).float()
    >>> q = gptq(w, hessian(x), bits=4, group_size=4)
    >>> q.codes.shape, q.scale.shape, bool(q.codes.abs().max() <= 7)
    (torch.Size([4, 8]), torch.Size([4, 2]), True)
    """
    W, H, spec, g, order, static = _prepare(weight, H, bits, group_size, spec, act_order, damp)
    block_size = _check_block_size(block_size)
    if not static:
        block_size = -(-block_size // g) * g  # whole groups per block
    with _one_thread():
        grids = _grid(W, spec, g) if static else None
        codes, scale, zero_point = _gptq(W, H, spec, g, order, block_size, grids)
    return _result(codes, scale, zero_point, spec, group_size)


def _gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    g: int,
    order: torch.Tensor,
    block_size: int,
    grids: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's loop (11.3). ``W`` ``(N, K)`` and damped ``H`` ``(K, K)`` in float64; columns in ``order``;
    ``grids`` = (scale, zero_point) ``(N, K // g)`` fixed in advance, or ``None``: each group's grid from the
    updated weights when its first column comes (then ``order`` is the identity, blocks hold whole groups)."""
    N, K = W.shape
    W = W[:, order]  # (N, K) in processing order (a copy)
    H = H[order][:, order]
    Hinv = torch.cholesky_solve(torch.eye(K, dtype=H.dtype), torch.linalg.cholesky(H))  # H⁻¹ from H = LLᵀ
    U = torch.linalg.cholesky(Hinv, upper=True)  # H⁻¹ = UᵀU, U upper triangular
    codes = torch.empty(N, K, dtype=spec.dtype)
    scale, zero_point = grids if grids is not None else (
        torch.empty(N, K // g, dtype=torch.float32), torch.empty(N, K // g, dtype=torch.int32)
    )
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        E = torch.empty(N, i2 - i1, dtype=W.dtype)  # (N, B): the block's errors, scaled by 1 / U_qq
        for i in range(i1, i2):
            j = int(order[i])  # the column's place in the weight (its group: j // g)
            if grids is None and j % g == 0:  # a new group: its grid from the weights as they stand now
                scale[:, j // g], zero_point[:, j // g] = (p[:, 0] for p in _grid(W[:, i:i + g], spec, g))
            s, z = scale[:, j // g], zero_point[:, j // g]  # (N,)
            q = quantize(W[:, i].float(), s, z, spec.qmin, spec.qmax)  # (N,): round to nearest
            err = (W[:, i] - dequantize(q, s, z).double()) / U[i, i]
            W[:, i:i2] -= err[:, None] * U[i, i:i2]  # feed the error to the rest of the block
            codes[:, j], E[:, i - i1] = q, err
        W[:, i2:] -= E @ U[i1:i2, i2:]  # ... and, lazily, to the columns after it
    return codes, scale, zero_point


def gptq_reference(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    act_order: bool = False,
    damp: float = 0.01,
) -> QuantizedWeight:
    """:func:`gptq` as Optimal Brain Surgeon states it (11.2): slow, for the book and the tests — chapter 11.

    Column by column, with the explicit inverse ``Hinv`` of the damped ``H`` restricted to the columns not yet
    quantized: round column ``q`` to nearest, ``w ← w − (w_q − ŵ_q) / Hinv_qq · Hinv_{q,:}`` on the remaining
    columns, then eliminate ``q``: ``Hinv ← Hinv − Hinv_{:,q} Hinv_{q,:} / Hinv_qq`` (the inverse of ``H``
    without row and column ``q``). No Cholesky, no blocks. Same arguments, grids and result as :func:`gptq`.

    >>> _ = torch.manual_seed(0)
    >>> x, w = torch.randn(64, 8, dtype=torch.float64).float(), torch.randn(4, 8, dtype=torch.float64).float()
    >>> torch.equal(gptq_reference(w, hessian(x), 3, 4).codes, gptq(w, hessian(x), 3, 4).codes)
    True
    """
    W, H, spec, g, order, static = _prepare(weight, H, bits, group_size, spec, act_order, damp)
    N, K = W.shape
    scale, zero_point = _grid(W, spec, g) if static else (
        torch.empty(N, K // g, dtype=torch.float32), torch.empty(N, K // g, dtype=torch.int32)
    )
    with _one_thread():
        codes = _gptq_reference(W, H, spec, g, order, scale, zero_point, static)
    return _result(codes, scale, zero_point, spec, group_size)


def _gptq_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    g: int,
    order: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    static: bool,
) -> torch.Tensor:
    """The OBS loop (11.2) of :func:`gptq_reference`; fills ``scale``/``zero_point`` unless ``static``."""
    N, K = W.shape
    codes = torch.empty(N, K, dtype=spec.dtype)
    Hinv = torch.linalg.inv(H)
    rest = torch.ones(K, dtype=torch.bool)  # columns not yet quantized
    for j in order.tolist():
        if not static and j % g == 0:
            s, z = _grid(W[:, j:j + g], spec, g)
            scale[:, j // g], zero_point[:, j // g] = s[:, 0], z[:, 0]
        s, z = scale[:, j // g], zero_point[:, j // g]
        q = quantize(W[:, j].float(), s, z, spec.qmin, spec.qmax)
        codes[:, j] = q
        d = Hinv[j, j]
        err = W[:, j] - dequantize(q, s, z).double()  # (N,)
        rest[j] = False
        W[:, rest] -= torch.outer(err / d, Hinv[j, rest])  # the OBS update (11.2)
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d  # eliminate column q
        Hinv[j, :], Hinv[:, j] = 0.0, 0.0
    return codes


# --------------------------------------------------------------------------------------------------------
# Round to nearest, and the exact optimum on a tiny layer
# --------------------------------------------------------------------------------------------------------


def rtn(
    weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, spec: QuantSpec | None = None
) -> QuantizedWeight:
    """Round to nearest on the grid of each group (chapter 6's per-group quantization): the codes and scales
    that :meth:`qbook.nn.WeightOnlyLinear.from_float` stores, as a :class:`QuantizedWeight` — chapter 11.

    >>> rtn(torch.tensor([[0.1, -0.7, 0.35, 0.2]]), bits=4, group_size=2).codes
    tensor([[ 1, -7,  7,  4]], dtype=torch.int8)
    """
    w = _check_weight(weight).float()
    spec = _weight_spec(bits, spec)
    g = _check_group_size(group_size, w.shape[1])
    scale, zero_point = _grid(w, spec, g)
    codes = quantize(w, scale, zero_point, spec.qmin, spec.qmax, granularity=PerGroup(axis=1, group_size=g))
    return _result(codes, scale, zero_point, spec, group_size)


_MAX_CANDIDATES = 1 << 16


def best_rounding(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int = 4,
    *,
    spec: QuantSpec | None = None,
    search: str = "updown",
) -> QuantizedWeight:
    """The codes that minimise the layer's output error (11.1) on RTN's per-channel grid, by exhaustive
    search — chapter 11 (the one-layer view of AdaRound, Nagel et al., 2020, and of OBQ).

    ``search="updown"``: each weight rounded down or up (``2^K`` choices per row, AdaRound's space, which
    contains RTN); ``"all"``: every code of the grid (``(qmax − qmin + 1)^K`` per row, the true optimum,
    which also bounds GPTQ). Rows are independent, so the search is per row; at most 65 536 candidates per
    row (tiny layers, ``K`` ≈ 10). ``x`` ``(tokens, K)``.

    >>> x = torch.tensor([[1.0, 1.0, 1.0]])           # the layer outputs w_0 + w_1 + w_2
    >>> w = torch.tensor([[-0.5, -0.1, 1.4]])         # scale 1.4 / 7 = 0.2: w / scale = -2.5, -0.5, 7
    >>> rtn(w, bits=4, group_size=None).codes          # two ties, both up (to even): the output moves a step
    tensor([[-2,  0,  7]], dtype=torch.int8)
    >>> best_rounding(w, x).codes                      # one up, one down: the output is exact
    tensor([[-2, -1,  7]], dtype=torch.int8)
    """
    w = _check_weight(weight).float()
    spec = _weight_spec(bits, spec)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2 \
            or x.shape[1] != w.shape[1]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor (tokens, K) with K = {w.shape[1]}, got {got}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values")
    if search not in ("updown", "all"):
        raise ValueError(f"search must be 'updown' or 'all', got {search!r}")
    per_row = 2 if search == "updown" else spec.qmax - spec.qmin + 1
    if per_row ** w.shape[1] > _MAX_CANDIDATES:
        raise ValueError(
            f"{per_row}^{w.shape[1]} candidates per row exceed {_MAX_CANDIDATES}: the exhaustive search is "
            "for tiny layers (fewer inputs K, or search='updown')"
        )
    scale, zero_point = _grid(w, spec, w.shape[1])  # (N, 1): RTN's per-channel grid
    codes = _best_rounding(w, _hessian(x), scale, zero_point, spec, search)
    return _result(codes, scale, zero_point, spec, None)


def _best_rounding(
    w: torch.Tensor,
    H: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    search: str,
) -> torch.Tensor:
    """Per row: every candidate code vector ``c`` ``(C, K)``, its error ``½ (w − ŵ_c)ᵀ H (w − ŵ_c)``, the
    best one."""
    N, K = w.shape
    codes = torch.empty(N, K, dtype=spec.dtype)
    for n in range(N):
        if search == "updown":  # floor(w / s) + z and one above, clipped to the grid
            down = torch.floor(w[n] / scale[n]) + zero_point[n]  # (K,)
            steps = torch.tensor(list(itertools.product((0.0, 1.0), repeat=K)))  # (2^K, K)
            c = (down + steps).clamp(spec.qmin, spec.qmax)  # (C, K)
        else:
            levels = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
            c = torch.cartesian_prod(*[levels] * K).reshape(-1, K)  # (C, K)
        D = w[n].double() - ((c - zero_point[n]) * scale[n]).double()  # (C, K): w − ŵ, ŵ as dequantize gives
        best = int((0.5 * (D @ H) * D).sum(dim=1).argmin())
        codes[n] = c[best].to(spec.dtype)
    return codes


# --------------------------------------------------------------------------------------------------------
# A whole model: every nn.Linear, in forward order, from its inputs on calibration batches
# --------------------------------------------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    batches: Iterable[Any],
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    skip: Iterable[str] = (),
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    sequential: bool = True,
    run: Callable[[nn.Module, Any], Any] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """GPTQ on every ``nn.Linear`` of ``model`` (except ``skip``): each becomes a
    :class:`~qbook.nn.WeightOnlyLinear` holding GPTQ's codes — chapter 11.

    A batch is run as :func:`qbook.ptq.calibrate` runs it (``model(batch)``, ``model(*batch)`` for a tuple,
    ``model(batch)`` for a dict) or by ``run(model, batch)``; ``batches`` is read once per pass, so it must
    be a sequence (an iterator is read into a list). Each layer's ``H = 2 XᵀX`` is summed over every input it
    sees. ``sequential=True`` (the paper's way): the layers are quantized in the order the forward pass first
    calls them, each from its inputs with the layers before it **already quantized**, so that a layer also
    corrects the errors of earlier ones; one pass over the batches per group of layers that read the very same
    input tensor (e.g. a transformer's query, key and value projections share one ``H``).
    ``sequential=False``: every ``H`` from the float model in one pass (cheaper, layers independent).
    A ``K`` that ``group_size`` does not divide is padded with dead (zero) inputs, as
    :class:`~qbook.nn.WeightOnlyLinear` pads it. Returns a copy unless ``inplace=True``. A layer used at
    several places (one module reachable under several names) is refused, since layers are replaced by name;
    a layer that no batch reaches is refused (skip it); a batch the model cannot run raises a ``ValueError``
    naming the batch.

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> q = quantize_model(model, [torch.randn(64, 16)], bits=4, group_size=8)
    >>> q
    Sequential(
      (0): WeightOnlyLinear(16→32, W4 packed per-group g=8 sym, A float)
      (1): ReLU()
      (2): WeightOnlyLinear(32→4, W4 packed per-group g=8 sym, A float)
    )
    """
    from qbook.ptq import _check_model, _copy, _set_submodule, _targets

    _check_model(model, inplace)
    spec = _weight_spec(bits, spec)
    if group_size is not None:
        _check_group_size(group_size, group_size)
    _check_bool(act_order, "act_order"), _check_damp(damp), _check_block_size(block_size)
    _check_bool(sequential, "sequential")
    if run is not None and not callable(run):
        raise TypeError(f"run must be a callable run(model, batch) or None, got {run!r}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise TypeError("batches must be an iterable of batches (e.g. a list of tensors), not one tensor")
    batches = batches if isinstance(batches, Sequence) else list(batches)
    if len(batches) == 0:
        raise ValueError("quantize_model got no batches; GPTQ needs calibration inputs")
    if run is None:
        for i, batch in enumerate(batches):
            if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
                raise TypeError(
                    f"calibration batch {i} must be a tensor, a tuple of model arguments or a dict (or pass "
                    f"run=), got {type(batch).__name__}"
                )
    model = _copy(model, inplace)
    targets = dict(_targets(model, (nn.Linear,), skip))
    _check_unshared(model, targets)
    if not targets:
        return model.eval()
    options = {"bits": bits, "group_size": group_size, "spec": spec, "act_order": act_order, "damp": damp,
               "block_size": block_size}

    def replace(name: str, H: torch.Tensor) -> None:
        linear = targets.pop(name)
        try:
            new = _quantize_linear(linear, H, options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {name!r}: {e}") from e
        _set_submodule(model, name, new)

    if not sequential:
        for name, H in _capture(model, batches, run, list(targets), None).items():
            replace(name, H)
        return model.eval()
    for first in _capture(model, batches, run, list(targets), None, order_only=True):  # forward order
        if first in targets:
            for name, H in _capture(model, batches, run, list(targets), first).items():
                replace(name, H)
    return model.eval()


def quantize_linear(
    linear: nn.Linear,
    x: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> nn.Module:
    """GPTQ on one ``nn.Linear`` from its inputs ``x`` ``(..., K)`` (e.g. captured by
    :func:`qbook.outliers.capture_activations`): a :class:`~qbook.nn.WeightOnlyLinear` holding GPTQ's codes
    (``K`` padded to whole groups with dead inputs, as the module pads it) — chapter 11. Arguments as
    :func:`gptq`; ``linear`` is not modified.

    >>> _ = torch.manual_seed(0)
    >>> layer = quantize_linear(nn.Linear(16, 4), torch.randn(32, 16), bits=4, group_size=8)
    >>> layer, layer.dequantized_weight().shape
    (WeightOnlyLinear(16→4, W4 packed per-group g=8 sym, A float), torch.Size([4, 16]))
    """
    if type(linear) is not nn.Linear:
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != linear.in_features:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be the layer's inputs (..., {linear.in_features}), got {got}")
    if x.numel() == 0:
        raise ValueError(f"x holds no inputs (shape {tuple(x.shape)}); GPTQ needs calibration data")
    spec = _weight_spec(bits, spec)
    if group_size is not None:
        _check_group_size(group_size, group_size)
    options = {"bits": bits, "group_size": group_size, "spec": spec, "act_order": act_order, "damp": damp,
               "block_size": block_size}
    return _quantize_linear(linear, hessian(x), options)


def _quantize_linear(linear: nn.Linear, H: torch.Tensor, options: dict[str, Any]) -> nn.Module:
    """GPTQ on one ``nn.Linear`` (``K`` padded to whole groups with dead inputs) → ``WeightOnlyLinear``."""
    from qbook.nn import WeightOnlyLinear

    K, g = linear.in_features, options["group_size"]
    pad = 0 if g is None else -K % g
    W = F.pad(linear.weight.detach().float(), (0, pad))  # (N, K + pad)
    H = F.pad(H, (0, pad, 0, pad))  # (K + pad, K + pad): the padding is dead
    q = gptq(W, H, options["bits"], g, spec=options["spec"], act_order=options["act_order"],
             damp=options["damp"], block_size=options["block_size"])
    return WeightOnlyLinear.from_quantized(
        linear, q.codes[:, :K], q.scale, q.zero_point, bits=options["bits"], group_size=g, spec=q.spec
    )


def _capture(
    model: nn.Module,
    batches: Sequence[Any],
    run: Callable[[nn.Module, Any], Any] | None,
    names: list[str],
    first: str | None,
    *,
    order_only: bool = False,
) -> Any:
    """One pass over ``batches`` with forward pre-hooks on the layers ``names``.

    ``order_only``: the names in the order the forward pass first calls them. With ``first`` given: ``H``
    of that layer and of every other layer that was always called on the very same input tensor. With
    neither: ``H`` of every layer."""
    from qbook.ptq import _run

    calls: dict[str, int] = dict.fromkeys(names, 0)
    shared: dict[str, int] = dict.fromkeys(names, 0)
    hessians: dict[str, torch.Tensor] = {}
    seen: list[str] = []
    current: list[torch.Tensor | None] = [None]
    refused: list[str] = []  # a hook's own error (a layer's input), raised as it is

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            calls[name] += 1
            if name not in seen:
                seen.append(name)
            if order_only:
                return
            if first is not None:
                if name == first:
                    current[0] = x
                elif x is not current[0]:
                    return
                shared[name] += 1
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() \
                    or not bool(torch.isfinite(x).all()):
                refused.append(name)
                raise ValueError(f"layer {name!r} got an input that is not a finite float tensor")
            H = _hessian(x)
            hessians[name] = H if name not in hessians else hessians[name].add_(H)

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    _run(model, batch, run)
                except Exception as e:
                    if refused:
                        raise
                    raise ValueError(
                        f"calibration batch {i} could not run through the model ({type(e).__name__}: {e}); "
                        "the batches must be the model's inputs (or pass run=)"
                    ) from e
    finally:
        for handle in handles:
            handle.remove()
    idle = [n for n in names if calls[n] == 0]
    if idle:
        raise ValueError(f"the calibration batches never reached the layers {idle[:5]}; skip them")
    if order_only:
        return seen
    if first is None:
        return hessians
    return {n: H for n, H in hessians.items() if shared[n] == calls[n] == calls[first]}
