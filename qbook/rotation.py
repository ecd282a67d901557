"""Rotations that spread outliers: Hadamard transforms (QuaRot, SpinQuant, QuIP) — chapter 11.

A few input channels with huge activations force a coarse grid on everyone (chapter 5). An orthogonal matrix
``R`` (``R R^T = I``) changes nothing in float,

``W x = (W R^T)(R x)``

but ``R x`` mixes every channel into every other: an outlier's energy is spread evenly, the distribution of
``R x`` is closer to Gaussian (its kurtosis drops towards 3), and so does that of the rows of ``W R^T``. Both
quantize better (QuIP's "incoherence", Chee et al. 2023; QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al.
2025, which learns ``R``). The normalised Hadamard matrix is the cheap choice: entries ``±1/sqrt(n)``, and
``H x`` costs ``O(n log n)`` additions with the fast Walsh–Hadamard transform.

API

* :func:`hadamard` — the normalised ``n x n`` Hadamard matrix: Sylvester's construction for ``n = 2^k``, and
  ``H_m ⊗ H_{2^k}`` with Paley's ``H_m`` (``m = q + 1`` for a prime ``q ≡ 3 (mod 4)``: 4, 12, 20, 24, 32,
  44, 48, ...) for ``n = m 2^k``, so MiniLM's 384 = 12·32 and 1536 = 12·128 work. :func:`hadamard_factors`
  says how ``n`` splits, or why no Hadamard matrix of order ``n`` is available (e.g. odd ``n``, 28, 36);
* :func:`fwht` — the fast Walsh–Hadamard transform along the last axis (``n = 2^k``), ``x H^T`` in
  ``O(n log n)``; :func:`hadamard_transform` — the same for every supported ``n`` (``fwht`` on the ``2^k``
  factor, a small matmul with ``H_m``);
* :func:`kurtosis` — Pearson's kurtosis ``E[(x - mu)^4] / sigma^4`` (3 for a Gaussian);
* :class:`RotatedLinear` — a linear layer holding ``W D H^T`` that applies ``H D`` (``D``: optional random
  signs, QuaRot's randomised Hadamard) to its input on line;
* :func:`rotate_linears` — the equivalence transform on a model, in the shape of :mod:`qbook.awq`:
  ``(float model, folds)``, one :class:`qbook.awq.Fold` per layer (``how="hadamard"``).

In a post-LayerNorm encoder (BERT, MiniLM) the rotations cannot be folded into neighbouring layers the way
QuaRot folds them into an RMSNorm model (LayerNorm subtracts the mean, which a rotation does not commute
with), so every rotated layer applies ``H`` to its input at run time. A rotated layer's ``.linear`` is a plain
``nn.Linear``: chapter 5's :func:`qbook.outliers.quantize_linears` and chapter 7's
:func:`qbook.ptq.quantize_weights` quantize it like any other, and then quantize the rotated input and weight.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from qbook.awq import Fold
from qbook.gptq import _check_unshared

__all__ = [
    "RotatedLinear",
    "fwht",
    "hadamard",
    "hadamard_factors",
    "hadamard_transform",
    "kurtosis",
    "rotate_linears",
]


# --------------------------------------------------------------------------------------------------------
# Hadamard matrices
# --------------------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_order(m: int) -> bool:
    """Whether Paley's first construction gives a Hadamard matrix of order ``m``: ``m - 1`` prime, 3 mod 4."""
    return _is_prime(m - 1) and (m - 1) % 4 == 3


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m 2^k``: the Paley order ``m`` (1 when ``n`` is a power of two) times the
    largest power of two that leaves one. Raises ``ValueError`` naming the sizes qbook supports otherwise.

    >>> hadamard_factors(1024), hadamard_factors(384), hadamard_factors(1536)
    ((1, 1024), (12, 32), (12, 128))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    factors = _hadamard_factors(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} in qbook: it builds n = m * 2^k with m = 1 (Sylvester) or "
            "m - 1 a prime = 3 (mod 4) (Paley: 4, 12, 20, 24, 32, 44, 48, 60, ...); a Hadamard matrix needs "
            "n = 1, 2 or a multiple of 4, and some such orders (28, 36, 52, ...) need other constructions"
        )
    return factors


def _hadamard_factors(n: int) -> tuple[int, int] | None:
    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(k, -1, -1):  # the largest power of two first
        m = n >> j
        if m == 1 or _paley_order(m):
            return m, 1 << j
    return None


def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's ``±1`` Hadamard matrix of order ``n = 2^k``: ``H_2n = [[H_n, H_n], [H_n, -H_n]]``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h


@functools.lru_cache(maxsize=16)
def _paley(m: int) -> torch.Tensor:
    """Paley's ``±1`` Hadamard matrix of order ``m = q + 1`` (``q`` prime, ``q ≡ 3 mod 4``):
    ``H = I + [[0, 1^T], [-1, Q]]`` with the Jacobsthal matrix ``Q_ij = chi(j - i)``, ``chi`` the quadratic
    character mod ``q`` (``+1`` on non-zero squares, ``-1`` on non-squares, 0 at 0)."""
    q = m - 1
    chi = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(m, dtype=torch.float64) + s


def _small_hadamard(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Hadamard matrix ``H`` of order ``n`` (entries ``±1/sqrt(n)``, ``H H^T = I``) — ch. 11.

    ``H = (H_m ⊗ S_{2^k}) / sqrt(n)`` for ``n = m 2^k`` (:func:`hadamard_factors`): ``S`` is Sylvester's
    matrix (Sylvester, 1867), ``H_m`` Paley's (Paley, 1933; ``H_1 = [1]``). For ``n = 2^k`` it equals
    ``scipy.linalg.hadamard(n) / sqrt(n)``.

    >>> hadamard(4) * 2
    tensor([[ 1.,  1.,  1.,  1.],
            [ 1., -1.,  1., -1.],
            [ 1.,  1., -1., -1.],
            [ 1., -1., -1.,  1.]])
    """
    m, p = hadamard_factors(n)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return (torch.kron(_small_hadamard(m), _sylvester(p)) / math.sqrt(n)).to(dtype)


# --------------------------------------------------------------------------------------------------------
# Fast transforms
# --------------------------------------------------------------------------------------------------------


def _check_signal(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor (..., n), got {got}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis (..., n), got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(f"{name} {tuple(x.shape)} contains {int(bad.sum())} NaN or infinite value(s)")
    return x


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The fast Walsh–Hadamard transform along the last axis, normalised: ``x H^T`` with ``H = hadamard(n)``
    (``H x`` for each vector ``x``), in ``log2(n)`` passes of ``n`` additions (butterflies). ``n`` must be a
    power of two; :func:`hadamard_transform` takes the other supported sizes.

    >>> import torch
    >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0])), fwht(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    (tensor([0.5000, 0.5000, 0.5000, 0.5000]), tensor([2., 0., 0., 0.]))
    """
    x = _check_signal(x)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(
            f"fwht needs a power-of-two length, got {n} (shape {tuple(x.shape)}); hadamard_transform "
            "also takes n = m * 2^k (hadamard_factors)"
        )
    return _fwht(x)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """The math of :func:`fwht`: butterflies ``(a, b) -> (a + b, a - b)`` at strides ``1, 2, 4, ..., n/2``."""
    *lead, n = x.shape
    h = 1
    while h < n:
        pairs = x.reshape(
            *lead, n // (2 * h), 2, h
        )  # (..., n / 2h, 2, h): a = pairs[..., 0, :], b = [..., 1, :]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x / math.sqrt(n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x H^T`` along the last axis (``H x`` for each vector ``x``), for every ``n`` that :func:`hadamard`
    supports — chapter 11.

    ``H_n = H_m ⊗ H_p1 ⊗ H_p2 ⊗ ...`` (Sylvester's ``H_2^k`` is itself a Kronecker power), so ``x`` seen as
    ``(..., m, p1, p2, ...)`` is transformed by one small dense matmul per axis: ``O(n (m + p1 + p2 + ...))``
    work in a few BLAS calls, faster in PyTorch than :func:`fwht`'s ``log2 n`` passes of elementwise ops.
    Factors ``p_i`` are powers of two up to 128.

    >>> import torch
    >>> x = torch.arange(12.0)
    >>> torch.allclose(hadamard_transform(x), hadamard(12) @ x, atol=1e-5)
    True
    """
    x = _check_signal(x)
    hadamard_factors(x.shape[-1])
    return _hadamard_transform(x)


@functools.lru_cache(maxsize=64)
def _kronecker_factors(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Normalised ``H_m, H_p1, H_p2, ...`` whose Kronecker product is :func:`hadamard` ``(n)``."""
    m, p = _hadamard_factors(n)
    factors = [_paley(m)] if m > 1 else []
    while p > 1 or not factors:
        f = min(p, 128)
        factors.append(_sylvester(f))
        p //= f
    return tuple((h / math.sqrt(h.shape[0])).to(dtype) for h in factors)


def _hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """The math of :func:`hadamard_transform`: ``(A ⊗ B) vec(X) = vec(A X B^T)``, one factor per axis."""
    *lead, n = x.shape
    factors = _kronecker_factors(n, x.dtype)
    y = x.reshape(-1, *(h.shape[0] for h in factors))  # (batch, m, p1, p2, ...)
    for axis, h in enumerate(factors, start=1):
        y = (y.movedim(axis, -1) @ h.T).movedim(-1, axis)  # H_f along this axis
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------------------------------------
# Kurtosis
# --------------------------------------------------------------------------------------------------------


def kurtosis(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Pearson's kurtosis ``E[(x - mu)^4] / (E[(x - mu)^2])^2`` over all of ``x`` or along ``dim``, in float64
    (biased moments: ``scipy.stats.kurtosis(x, fisher=False, bias=True)``). 3 for a Gaussian, 1.8 for a
    uniform distribution; a few outliers among many small values make it large. Constant data (zero
    variance, where it would be 0/0) raise a ``ValueError``.

    >>> import torch
    >>> kurtosis(torch.tensor([-1.0, 1.0])), kurtosis(torch.tensor([0.0] * 9 + [10.0]))   # one outlier
    (tensor(1., dtype=torch.float64), tensor(8.1111, dtype=torch.float64))
    """
    x = _check_signal(x)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
            raise ValueError(f"dim must be None or an axis of x (shape {tuple(x.shape)}), got {dim!r}")
        x = x.movedim(dim, -1)
    if (x.numel() if dim is None else x.shape[-1]) < 2:
        raise ValueError(f"kurtosis needs at least 2 values per reduction, got shape {tuple(x.shape)}")
    constant = x.amax(dim=-1) == x.amin(dim=-1) if dim is not None else x.amax() == x.amin()
    if bool(constant.any()):
        where = "x is" if dim is None else f"{int(constant.sum())} slice(s) along dim {dim} are"
        raise ValueError(f"{where} constant (zero variance): kurtosis E[(x - mu)^4] / sigma^4 is 0/0")
    return _kurtosis(x.double(), None if dim is None else -1)


def _kurtosis(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The math of :func:`kurtosis`: the fourth central moment over the squared second."""
    centred = x - x.mean(dim=dim, keepdim=dim is not None)
    m2 = centred.square().mean(dim=dim)
    m4 = centred.square().square().mean(dim=dim)
    return m4 / m2.square()


# --------------------------------------------------------------------------------------------------------
# Rotating layers
# --------------------------------------------------------------------------------------------------------


class RotatedLinear(nn.Module):
    """A linear layer on a rotated input: ``linear(H (d ⊙ x))`` — chapter 11.

    ``linear`` holds ``W D H^T`` (``D = diag(signs)``, ``H`` = :func:`hadamard`), so the module computes
    ``W D H^T H D x = W x``; :meth:`from_float` builds it from a float ``nn.Linear``. The rotation is
    applied on line with :func:`hadamard_transform`; ``linear`` may be replaced by a quantized or simulated
    layer (it then sees rotated inputs and holds rotated weights).

    >>> import torch
    >>> _ = torch.manual_seed(0); lin = torch.nn.Linear(8, 3); x = torch.randn(2, 8)
    >>> torch.allclose(RotatedLinear.from_float(lin)(x), lin(x), atol=1e-6)
    True
    """

    def __init__(self, linear: nn.Module, signs: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("signs", signs.detach().float().clone())

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, signs: torch.Tensor | None = None) -> RotatedLinear:
        """Rotate a copy of ``linear``'s input space: weight ``W D H^T`` (computed in float64); ``signs``
        ``(K,)`` of ``±1`` (default all ones: the plain Hadamard matrix)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RotatedLinear.from_float takes an nn.Linear, got {type(linear).__name__}")
        k = linear.in_features
        hadamard_factors(k)
        if signs is None:
            signs = torch.ones(k)
        if not isinstance(signs, torch.Tensor) or signs.shape != (k,) or not bool((signs.abs() == 1).all()):
            raise ValueError(f"signs must be a tensor ({k},) of +1 and -1, got {signs!r:.80}")
        return cls(_rotate_weight(copy.deepcopy(linear), signs), signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_hadamard_transform(x * self.signs.to(x.dtype)))

    def extra_repr(self) -> str:
        m, p = _hadamard_factors(self.signs.numel())
        random = "" if bool((self.signs == 1).all()) else ", random signs"
        return f"online Hadamard of order {self.signs.numel()} = {m}·{p}{random}"


@torch.no_grad()
def _rotate_weight(linear: nn.Linear, signs: torch.Tensor) -> nn.Linear:
    """``W <- W D H^T`` in place (in float64), ``D = diag(signs)``: each row ``r`` becomes ``(r ⊙ d) H^T``."""
    w = linear.weight.double() * signs.double()  # (N, K): W D
    linear.weight.copy_(_hadamard_transform(w))
    return linear


def _is_linear(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear


def rotate_linears(
    model: nn.Module,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    *,
    seed: int | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, list[Fold]]:
    """Rotate the input space of every ``nn.Linear`` of ``model`` that ``module_filter(name, module)`` selects
    (default: all): each becomes a :class:`RotatedLinear` (weight ``W D H^T``, input ``H D x``), so the float
    model computes the same function up to float rounding. ``seed``: random signs ``D`` per layer
    (QuaRot's randomised Hadamard), drawn from a generator seeded with it (the same on every CPU); ``None``:
    ``D = I``. Returns ``(model, folds)``: a copy (``inplace=False``) and one :class:`qbook.awq.Fold` per
    layer (``how="hadamard"``, ``transform`` = the signs).

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> rotated, folds = rotate_linears(model, seed=0)
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(rotated(x), model(x), atol=1e-6), [f.linears for f in folds]
    (True, [('0.linear',), ('2.linear',)])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if module_filter is not None and not callable(module_filter):
        raise TypeError(f"module_filter must be a callable (name, module) -> bool, got {module_filter!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    module_filter = _is_linear if module_filter is None else module_filter
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and n and module_filter(n, m)]
    _check_unshared(model, targets)  # rotated in place and wrapped by name: a shared layer would break
    for name in targets:
        k = model.get_submodule(name).in_features
        if _hadamard_factors(k) is None:
            raise ValueError(
                f"layer {name!r} reads {k} features, and qbook has no Hadamard matrix of order {k} "
                "(hadamard_factors); leave it out with module_filter"
            )
    model = model if inplace else copy.deepcopy(model)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return model, _rotate_linears(model, targets, generator)


def _rotate_linears(model: nn.Module, names: list[str], generator: torch.Generator | None) -> list[Fold]:
    """The math of :func:`rotate_linears`: one :class:`RotatedLinear` per layer, random signs if asked."""
    folds = []
    for name in names:
        linear = model.get_submodule(name)
        k = linear.in_features
        signs = (
            torch.ones(k) if generator is None else torch.randint(0, 2, (k,), generator=generator) * 2.0 - 1
        )
        rotated = RotatedLinear(_rotate_weight(linear, signs), signs)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, rotated)
        folds.append(Fold((f"{name}.linear",), (name,), "hadamard", rotated.signs))
    return folds
