"""Quantization-aware training (量化感知训练, QAT) — chapter 8.

Training sees the quantization error: weights and input activations pass through *fake quantizers* (伪量化:
``x_hat = dequantize(quantize(x))``, still float) in the forward pass, and the backward pass goes around the
rounding with the straight-through estimator (直通估计器, STE). After training, :func:`convert` turns the
model into chapter 7's integer modules, with exactly the codes the fake-quantized forward used.

API
---
* :class:`FakeQuantize` ``(spec=INT8, granularity=PerTensor(), *, observer=None)``: an observer (chapter 5)
  sets ``scale``/``zero_point`` from the batches while it observes (training mode), then
  :func:`qbook.fake_quantize` (the clipped STE); :meth:`FakeQuantize.freeze` keeps the parameters.
* :class:`LearnedScaleFakeQuantize` ``(spec=INT8, granularity=PerTensor(), *, learn_zero_point=False,
  init="lsq")``: LSQ (Esser et al., 2020): the scale is an ``nn.Parameter`` with the paper's gradient,
  scaled by ``g = 1 / sqrt(N Q_P)``; ``learn_zero_point=True`` learns the zero point too (LSQ+).
  The math cores :func:`_lsq_forward` and :func:`_lsq_grads` are what chapter 8 shows.
* :func:`prepare_qat` ``(model, config=W8A8_STATIC, *, method="fake" | "lsq", ...)``: every ``nn.Linear`` /
  ``nn.Conv2d`` becomes :class:`QATLinear` / :class:`QATConv2d` (weights per output channel on
  ``config.weight``, inputs per tensor on ``config.activation``); a conv followed by a batch norm becomes one
  :class:`QATConvBn2d` that fake-quantizes the *folded* weight.
* :func:`fit` ``(model, data, *, epochs, lr, ...)``: a seeded, one-thread training loop with a tqdm bar;
  returns the loss per epoch. :func:`freeze` ``(model)``: stop observing and freeze batch-norm statistics.
* :func:`convert` ``(model)``: the QAT model as :class:`qbook.nn.QuantLinear` / :class:`qbook.nn.QuantConv2d`
  (static per-tensor inputs, the fake quantizers' own scales and zero points).
* :func:`fold_batchnorm` ``(model)``: inference-time batch-norm folding (conv + BN → one conv), core
  :func:`_fold_bn`.

>>> import torch
>>> from qbook.ptq import W4A4_STATIC
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> qat_model = prepare_qat(model, W4A4_STATIC)
>>> qat_model[0]
QATLinear(
  8→16, weight: W4 per-channel sym (latest min/max), input: A4 per-tensor affine (moving average)
  (weight_fake_quant): FakeQuantize(int4 sym, PerChannel(axis=0), latest min/max, observing)
  (input_fake_quant): FakeQuantize(int4 affine, PerTensor(), moving average, observing)
)
>>> from qbook.data import randn
>>> x = randn(32, 8)
>>> _ = qat_model(x)                       # training mode: the fake quantizers observe
>>> q = convert(freeze(qat_model).eval())
>>> q[0]
QuantLinear(8→16, W4 per-channel sym, A4 per-tensor static asym)
>>> bool((q(x) - qat_model(x)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qbook.affine import INT8, QuantSpec, calc_qparams, fake_quantize
from qbook.granularity import Granularity, PerChannel, PerTensor, rows_to_params
from qbook.intmath import _quantize_bias
from qbook.nn import QuantConv2d, QuantLinear, QuantModule
from qbook.observers import MinMaxObserver, MovingAverageObserver, Observer
from qbook.ptq import (
    W8A8_STATIC,
    Observed,
    QuantConfig,
    _check_config,
    _check_modules,
    _names,
    _set_submodule,
    _targets,
)

__all__ = [
    "FakeQuantize",
    "LatestMinMaxObserver",
    "LearnedScaleFakeQuantize",
    "QATConv2d",
    "QATConvBn2d",
    "QATLinear",
    "convert",
    "fit",
    "fold_batchnorm",
    "freeze",
    "lsq_fake_quantize",
    "prepare_qat",
]

_EPS = torch.finfo(torch.float32).eps


def _check_spec(spec: object) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec such as qbook.affine.INT8, got {spec!r}")
    if spec.bits > 8:
        raise ValueError(f"QAT grids take 2..8 bits (they become qbook.nn's integer modules), got {spec}")
    return spec


def _check_granularity(granularity: object) -> Granularity:
    if granularity is None:
        return PerTensor()
    if not isinstance(granularity, (PerTensor, PerChannel)):
        raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {granularity!r}")
    return granularity


def _check_input(x: object, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{who} takes a floating-point tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"{who} got an empty tensor of shape {tuple(x.shape)}")
    return x


def _grid_text(spec: QuantSpec) -> str:
    return f"{'int' if spec.signed else 'uint'}{spec.bits} {'sym' if spec.symmetric else 'affine'}"


# --------------------------------------------------------------------------------------------------------
# Fake quantization with an observer
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class LatestMinMaxObserver(MinMaxObserver):
    """The range of the latest batch only: what a QAT weight quantizer wants (the weight changes every step,
    and its grid should be the one PTQ would give the current weight)."""

    name = "latest min/max"

    def _update(self, rows: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor) -> None:
        self._state.min, self._state.max = row_min, row_max


class _Quantizer(nn.Module):
    """What both fake quantizers share: the grid, the granularity, ``freeze`` and resizable state."""

    def __init__(self, spec: QuantSpec, granularity: Granularity | None) -> None:
        super().__init__()
        self.spec = _check_spec(spec)
        self.granularity = _check_granularity(granularity)
        self.register_buffer("initialized", torch.tensor(False))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ("scale", "zero_point"):  # per-channel shapes are known only after the first batch
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape:
                current.data = torch.empty_like(incoming, dtype=current.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise ValueError(
                f"{type(self).__name__} has seen no data: run a batch through it (in training mode) first"
            )


class FakeQuantize(_Quantizer):
    """Fake quantization (伪量化) whose grid an observer chooses — chapter 8.

    While observing (``observing`` is true and the module is in training mode, like batch norm's running
    statistics; the very first batch is observed in any mode), each batch updates ``observer`` and
    ``scale, zero_point = observer.qparams()`` (:func:`qbook.calc_qparams`). The output is

    ``x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``

    (:func:`qbook.fake_quantize`), whose backward pass is the clipped STE: ``d x_hat / d x = 1`` where
    ``qmin <= round(x / scale) + zero_point <= qmax``, else 0. :meth:`freeze` stops observing and keeps the
    parameters. ``observer``: a class or factory from :mod:`qbook.observers`, called as
    ``observer(spec=spec, granularity=granularity)``; default :class:`~qbook.observers.MovingAverageObserver`
    (torch.ao's choice for QAT activations). Weights use :class:`LatestMinMaxObserver`.

    >>> fq = FakeQuantize()
    >>> fq(torch.tensor([-1.0, 0.0, 2.0]))
    tensor([-1.,  0.,  2.])
    >>> fq.freeze()(torch.tensor([0.3, 5.0]))      # frozen grid: 2.0 is its largest value
    tensor([0.3059, 2.0000])
    >>> fq
    FakeQuantize(int8 affine, PerTensor(), moving average, frozen, scale=0.0117647, zero_point=-43)
    """

    def __init__(
        self,
        spec: QuantSpec = INT8,
        granularity: Granularity | None = None,
        *,
        observer: Callable[..., Observer] | None = None,
    ) -> None:
        super().__init__(spec, granularity)
        factory = MovingAverageObserver if observer is None else observer
        if not callable(factory):
            raise TypeError(f"observer must be an observer class or factory, got {observer!r}")
        self.observer = factory(spec=self.spec, granularity=self.granularity)
        if not isinstance(self.observer, Observer):
            raise TypeError(
                f"observer must make a qbook.observers.Observer, got {type(self.observer).__name__}"
            )
        self.observing = True
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def freeze(self) -> FakeQuantize:
        """Stop observing: ``scale`` and ``zero_point`` stay as they are. Returns ``self``."""
        self.observing = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, type(self).__name__)
        if self.observing and (self.training or not bool(self.initialized)):
            self.observer.observe(x.detach())  # ValueError for NaN or inf
            scale, zero_point = self.observer.qparams()
            self.scale.data, self.zero_point.data = scale.to(x.device), zero_point.to(x.device)
            self.initialized.fill_(True)
        self._require_initialized()
        spec = self.spec
        return fake_quantize(
            x, self.scale, self.zero_point, spec.qmin, spec.qmax, granularity=self.granularity
        )

    def extra_repr(self) -> str:
        state = "observing" if self.observing else "frozen"
        text = f"{_grid_text(self.spec)}, {self.granularity}, {self.observer.name}, {state}"
        if bool(self.initialized) and self.scale.numel() == 1:
            text += f", scale={self.scale.item():.6g}, zero_point={int(self.zero_point)}"
        return text


# --------------------------------------------------------------------------------------------------------
# LSQ: the scale (and LSQ+'s zero point) learned by gradient descent
# --------------------------------------------------------------------------------------------------------


def _lsq_forward(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """LSQ's forward pass, ``x_hat = s (clamp(round(x / s) + z, qmin, qmax) - z)``:
    :func:`qbook.fake_quantize`'s arithmetic (true float32 division, ties to even), with ``s`` and ``z``
    tensors that can receive gradients."""
    q = torch.round(x / scale).add_(zero_point).clamp_(qmin, qmax)
    return (q - zero_point) * scale


def _lsq_grads(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial derivatives of LSQ's x_hat (Esser et al., 2020; LSQ+ for ``z``), times ``grad``:

    * ``d x_hat / d x = 1`` inside the grid (``qmin <= round(x / s) + z <= qmax``), 0 outside (the STE);
    * ``d x_hat / d s = round(x / s) - x / s`` inside, ``qmin - z`` below, ``qmax - z`` above;
    * ``d x_hat / d z = 0`` inside, ``-s`` outside (``z`` rounds with an STE).

    The caller sums the last two over each scale's elements and multiplies them by ``g``."""
    v = x / scale
    r = torch.round(v)
    codes = r + zero_point
    below, above = codes < qmin, codes > qmax
    inside = ~(below | above)
    d_scale = torch.where(below, qmin - zero_point, torch.where(above, qmax - zero_point, r - v))
    d_zero = torch.where(inside, torch.zeros_like(v), -scale)
    return grad * inside, grad * d_scale, grad * d_zero


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to a parameter's shape."""
    return t.sum().reshape(shape) if len(shape) == 0 else t.sum_to_size(shape)


class _LSQ(torch.autograd.Function):
    """Forward :func:`_lsq_forward`; backward :func:`_lsq_grads`, gradient scale ``g`` on ``s`` and ``z``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, g):  # type: ignore[override]
        x32 = x.detach().float()
        z = torch.round(zero_point.detach())
        ctx.save_for_backward(x32, scale.detach(), z)
        ctx.params = qmin, qmax, g
        return _lsq_forward(x32, scale.detach(), z, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, z = ctx.saved_tensors
        qmin, qmax, g = ctx.params
        grad_x, grad_s, grad_z = _lsq_grads(grad.float(), x, scale, z, qmin, qmax)
        return (
            grad_x.to(grad.dtype),
            _sum_to(grad_s * g, scale.shape),  # g: a number, or one per scale (broadcasts against x)
            _sum_to(grad_z * g, z.shape),
            None,
            None,
            None,
        )


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    g: float | None = None,
) -> torch.Tensor:
    """LSQ fake quantization (Esser et al., 2020) — chapter 8: forward ``x_hat = s (clamp(round(x / s) + z,
    qmin, qmax) - z)``, backward :func:`_lsq_grads` for ``x``, ``s`` and ``z`` (``z`` is rounded in the
    forward pass), the gradients of ``s`` and ``z`` multiplied by ``g = 1 / sqrt(N Q_P)`` (default), ``N`` =
    elements per scale, ``Q_P = qmax - z`` the levels above zero. ``scale`` and ``zero_point`` broadcast
    against ``x`` (per channel: ``(C, 1, ...)``).

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> x_hat = lsq_fake_quantize(torch.tensor([0.3, 0.9, 9.0]), s, torch.tensor(0.0), -8, 7, g=1.0)
    >>> x_hat.detach()
    tensor([0.5000, 1.0000, 3.5000])
    >>> x_hat.sum().backward(); s.grad       # (1 - 0.6) + (2 - 1.8) + 7
    tensor(7.6000)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (a parameter), got {t!r:.60}")
        try:
            if torch.broadcast_shapes(t.shape, x.shape) != x.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to x's {tuple(x.shape)}"
            ) from None
    if (
        isinstance(qmin, bool)
        or isinstance(qmax, bool)
        or not (isinstance(qmin, int) and isinstance(qmax, int))
    ):
        raise TypeError(f"qmin and qmax must be ints, got {qmin!r}, {qmax!r}")
    if not qmin < qmax or qmax < 1:
        raise ValueError(f"need qmin < qmax and qmax >= 1, got qmin={qmin}, qmax={qmax}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"scale must be positive and finite, got {scale.detach().flatten()[:4].tolist()}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"x contains {int(torch.isnan(x).sum())} NaN value(s); NaN has no integer code")
    if g is None:  # (shape of the scale / zero point): one g per scale
        n = x.numel() / max(scale.numel(), zero_point.numel())
        g = 1.0 / (n * _positive_levels(torch.round(zero_point.detach()), qmax)).sqrt()
    else:
        g = float(g)
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, g)


def _positive_levels(zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """LSQ's ``Q_P``, the grid's levels above zero: ``qmax - z`` (``qmax`` on a signed symmetric grid,
    ``2^b - 1`` on an unsigned one with ``z = 0``, as in the paper), at least 1."""
    return (qmax - zero_point).clamp(min=1.0)


def _lsq_init(
    x: torch.Tensor, spec: QuantSpec, granularity: Granularity, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(scale, zero_point)`` from a first batch ``x``, per group of ``granularity``.

    ``init="lsq"``: the paper's ``s = 2 mean|x| / sqrt(Q_P)``, ``Q_P = qmax - z`` the grid's levels above zero
    (:func:`_positive_levels`); ``"minmax"``: :func:`qbook.calc_qparams` of the range. An affine grid's zero
    point puts the range's lower end ``min(min x, 0)`` at ``qmin`` as (3.3); a symmetric grid's is the one
    :func:`qbook.calc_qparams` gives (0 when signed)."""
    rows = granularity.groups(x)  # (G, n)
    xmin, xmax = (rows_to_params(v, granularity, x.shape) for v in (rows.amin(1), rows.amax(1)))
    scale, zero_point = calc_qparams(xmin, xmax, spec.qmin, spec.qmax, symmetric=spec.symmetric)
    if init == "lsq":
        mean_abs = rows_to_params(rows.abs().mean(1), granularity, x.shape)
        scale = (2 * mean_abs / _positive_levels(zero_point.float(), spec.qmax).sqrt()).clamp(min=_EPS)
        if not spec.symmetric:
            zero_point = (spec.qmin - torch.round(xmin.clamp(max=0) / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.float()


class LearnedScaleFakeQuantize(_Quantizer):
    """Learned step size quantization, LSQ (Esser et al., 2020) — chapter 8.

    ``scale`` is an ``nn.Parameter`` (one per tensor, or per channel with ``PerChannel(axis)``), trained with
    the rest of the network through :func:`lsq_fake_quantize`: forward ``x_hat = s (clamp(round(x / s) + z,
    qmin, qmax) - z)``, the paper's gradient ``d x_hat / d s`` (:func:`_lsq_grads`) scaled by ``g = 1 / sqrt(N
    Q_P)`` with ``N`` the elements per scale in the batch it sees and ``Q_P = qmax - z`` the grid's levels
    above zero. It is initialised from the first batch: ``init="lsq"`` (default) as in the paper, ``2 mean|x|
    / sqrt(Q_P)``; ``init="minmax"`` from the range, as :class:`FakeQuantize` would. The zero point is the
    grid's own (0 on a signed symmetric grid; an affine grid's puts ``min(min x, 0)`` at ``qmin`` at
    initialisation) and stays fixed, unless ``learn_zero_point=True`` (LSQ+, Bhalgat et al., 2020): then it is
    a parameter too, rounded in the forward pass, with gradient ``-s`` outside the grid and 0 inside (affine
    grids only; LSQ+ initialises both from the range, which is ``init="minmax"``). :meth:`freeze` stops
    learning (``requires_grad=False``).

    The scale stays positive by projection, a clamp at float32 eps (as torch.ao's ``_LearnableFakeQuantize``
    does; not ``|s|``, which would flip a negative step's sign): :meth:`project` clamps ``scale >= eps`` (and
    a learned zero point into ``[qmin, qmax]``) in place before every forward pass, and :func:`fit` after
    every optimizer step, so no forward pass and no :func:`fit` leaves a non-positive scale. The clamp is not
    part of the graph: the gradient is LSQ's, unchanged (projected gradient descent).

    >>> w = torch.linspace(-1.0, 1.0, 101)
    >>> lsq = LearnedScaleFakeQuantize(QuantSpec(4, True, narrow_range=True, symmetric=True))
    >>> x_hat = lsq(w)                            # the first batch initialises the scale
    >>> round(lsq.scale.item(), 4), round(2 * w.abs().mean().item() / 7 ** 0.5, 4)
    (0.3817, 0.3817)
    >>> x_hat.sum().backward(); lsq.scale.grad.shape
    torch.Size([])
    """

    def __init__(
        self,
        spec: QuantSpec = INT8,
        granularity: Granularity | None = None,
        *,
        learn_zero_point: bool = False,
        init: str = "lsq",
    ) -> None:
        super().__init__(spec, granularity)
        if not isinstance(learn_zero_point, bool):
            raise TypeError(f"learn_zero_point must be a bool, got {learn_zero_point!r}")
        if learn_zero_point and self.spec.symmetric:
            raise ValueError(
                f"a symmetric grid has a fixed zero point; learn_zero_point needs an affine one, "
                f"got {self.spec}"
            )
        if init not in ("lsq", "minmax"):
            raise ValueError(f"init must be 'lsq' or 'minmax', got {init!r}")
        self.init, self.learn_zero_point = init, learn_zero_point
        self.scale = nn.Parameter(torch.tensor(1.0))
        if learn_zero_point:
            self.zero_point = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("zero_point", torch.tensor(0.0))

    def initialize(self, x: torch.Tensor) -> LearnedScaleFakeQuantize:
        """Set the scale (and zero point) from ``x`` as ``init`` says; the parameters keep their identity, so
        an optimizer built before still updates them. Returns ``self``."""
        x = _check_input(x, type(self).__name__)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type(self).__name__} cannot initialise its scale from NaN or infinite values")
        scale, zero_point = _lsq_init(x.detach().float(), self.spec, self.granularity, self.init)
        self.scale.data, self.zero_point.data = scale.to(x.device), zero_point.to(x.device)
        self.initialized.fill_(True)
        return self

    def freeze(self) -> LearnedScaleFakeQuantize:
        """Stop learning: the scale (and zero point) no longer get gradients. Returns ``self``."""
        for p in self.parameters(recurse=False):
            p.requires_grad_(False)
        return self

    @property
    def learning(self) -> bool:
        return self.scale.requires_grad

    @torch.no_grad()
    def project(self) -> LearnedScaleFakeQuantize:
        """Clamp the parameters in place to where they are meaningful after an optimizer step: ``scale >=
        float32 eps``, ``qmin <= zero_point <= qmax``. :meth:`forward` and :func:`fit` call it. Returns
        ``self``."""
        self.scale.clamp_(min=_EPS)
        self.zero_point.clamp_(self.spec.qmin, self.spec.qmax)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, type(self).__name__)
        if not bool(self.initialized):
            self.initialize(x)
        spec = self.project().spec
        return lsq_fake_quantize(x, self.scale, self.zero_point, spec.qmin, spec.qmax)

    def extra_repr(self) -> str:
        state = "learning" if self.learning else "frozen"
        zero = ", LSQ+ zero point" if self.learn_zero_point else ""
        text = f"{_grid_text(self.spec)}, {self.granularity}, init={self.init}{zero}, {state}"
        if bool(self.initialized) and self.scale.numel() == 1:
            text += f", scale={self.scale.item():.6g}, zero_point={int(torch.round(self.zero_point))}"
        return text


# --------------------------------------------------------------------------------------------------------
# Batch-norm folding
# --------------------------------------------------------------------------------------------------------


def _fold_bn(
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-norm folding: a batch norm after a conv (or linear), folded into it, per output channel ``c``:

    ``W'_c = W_c gamma_c / sqrt(var_c + eps)``,
    ``b'_c = (b_c - mean_c) gamma_c / sqrt(var_c + eps) + beta_c``."""
    factor = gamma / torch.sqrt(var + eps)  # (C_out,)
    w = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))  # (C_out, 1, ...) against (C_out, C_in, ...)
    return w, (bias - mean) * factor + beta


def _bn_terms(bn: nn.Module, conv: nn.Module) -> tuple[torch.Tensor, ...]:
    """``(bias, mean, var, eps, gamma, beta)`` of a conv/linear followed by ``bn`` (absent terms as 0 / 1)."""
    zeros = torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else zeros
    gamma = bn.weight if bn.weight is not None else torch.ones_like(zeros)
    beta = bn.bias if bn.bias is not None else zeros
    return bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta


_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def _conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(pairs, refused)``: ``(conv, bn)`` names where a batch norm takes the output of a conv (Linear) and
    nothing else does, found by tracing the model with ``torch.fx``; ``refused`` maps the other batch norms
    to the reason they cannot be folded."""
    bns = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]
    if not bns:
        return [], {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many kinds; say why and what to do
        raise ValueError(
            "cannot trace the model with torch.fx to find conv → batch-norm pairs "
            f"({type(e).__name__}: {e}); "
            "fold by hand with qbook.qat._fold_bn"
        ) from e
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, refused = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in bns:
            continue
        bn, prev = modules[node.target], node.args[0] if node.args else None
        conv = (
            modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        )
        if conv is None or (type(conv), type(bn)) not in _PAIRS:
            refused[node.target] = (
                "its input is not the output of an nn.Conv2d (BatchNorm2d) or nn.Linear (1d)"
            )
        elif len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1:
            refused[node.target] = (
                f"{prev.target!r}'s output is used elsewhere too, or a module is called twice"
            )
        elif bn.running_mean is None:
            refused[node.target] = "it keeps no running statistics (track_running_stats=False)"
        else:
            pairs.append((prev.target, node.target))
    refused.update({n: "the traced forward never calls it" for n in bns if calls[n] == 0})
    return pairs, refused


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, strict: bool = True) -> nn.Module:
    """Fold every batch norm that directly follows an ``nn.Conv2d`` (``BatchNorm2d``) or ``nn.Linear``
    (``BatchNorm1d``) into it, for inference — chapter 8: the conv gets ``W' = W gamma / sqrt(var +
    eps)`` and ``b' = (b - mean) gamma / sqrt(var + eps) + beta`` (running statistics), the batch norm becomes
    ``nn.Identity``. The pairs are found by ``torch.fx`` tracing: the batch norm's input must be the conv's
    output and nothing else may use it. Other batch norms are a ``ValueError`` naming them and why
    (``strict``) or are left as they are (``strict=False``). The model must be in eval mode (a ``ValueError``
    names the batch norms in training mode, as torch.ao's fusion refuses them): in training mode a batch norm
    normalises with the batch statistics, which no folded conv can reproduce. Returns a copy in eval mode
    unless ``inplace``.

    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> from qbook.data import randn
    >>> _ = model(randn(8, 1, 5, 5))                       # training mode: running statistics move
    >>> folded = fold_batchnorm(model.eval())
    >>> folded
    Sequential(
      (0): Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1))
      (1): Identity()
      (2): ReLU()
    )
    >>> x = randn(2, 1, 5, 5)
    >>> bool((folded(x) - model(x)).abs().max() < 1e-5)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("inplace", inplace), ("strict", strict)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    training = [n for n, m in model.named_modules() if type(m) in bn_types and m.training]
    if training:
        raise ValueError(
            f"fold_batchnorm folds the running statistics, which batch norms use only in eval mode; "
            f"these are in training mode: {_names(training)}; call model.eval() first"
        )
    pairs, refused = _conv_bn_pairs(model)
    if strict and refused:
        reasons = "; ".join(f"{n!r}: {why}" for n, why in refused.items())
        raise ValueError(f"cannot fold these batch norms ({reasons}); pass strict=False to leave them")
    model = model if inplace else copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        with torch.no_grad():
            w, b = _fold_bn(conv.weight, *_bn_terms(bn, conv))
            conv.weight.copy_(w)
            conv.bias = nn.Parameter(b.detach().clone())
        model = _set_submodule(model, bn_name, nn.Identity())
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# QAT modules: the float layer with fake-quantized weight, input and bias
# --------------------------------------------------------------------------------------------------------


def _fake_quantize_bias(
    bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """The bias on the accumulator's grid, as the integer module stores it ((7.1), (9.6): int32 with scale
    ``s_x s_w``), passed straight through in the backward pass."""
    s_x, s_w = input_scale.detach().reshape(()), weight_scale.detach().reshape(-1)  # (), (N,)
    b_hat = (_quantize_bias(bias.detach(), s_x, s_w) * (s_x.double() * s_w.double())).to(bias.dtype)
    return bias + (b_hat - bias).detach()


class _QATLayer:
    """What the QAT layers share: an input and a weight fake quantizer, the fake-quantized bias."""

    weight_fake_quant: nn.Module
    input_fake_quant: nn.Module

    def _fake_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None
        return _fake_quantize_bias(bias, self.input_fake_quant.scale, self.weight_fake_quant.scale)

    def _describe(self) -> str:
        w, x = self.weight_fake_quant, self.input_fake_quant
        return f"weight: {_quantizer_text(w, 'W')}, input: {_quantizer_text(x, 'A')}"


def _quantizer_text(fq: nn.Module, prefix: str) -> str:
    where = "per-tensor" if isinstance(fq.granularity, PerTensor) else "per-channel"
    how = fq.observer.name if isinstance(fq, FakeQuantize) else "LSQ+" if fq.learn_zero_point else "LSQ"
    kind = "sym" if fq.spec.symmetric else "affine"
    return f"{prefix}{fq.spec.bits} {where} {kind} ({how})"


class QATLinear(nn.Linear, _QATLayer):
    """An ``nn.Linear`` trained with fake quantization (chapter 8):
    ``y = fq_x(x) @ fq_w(W)^T + b_hat``, with ``b_hat`` the bias on the int32 grid ``s_x s_w`` that
    :class:`qbook.nn.QuantLinear` will store. :func:`prepare_qat` makes them; :func:`convert` turns them into
    :class:`qbook.nn.QuantLinear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_fake_quant: nn.Module,
        input_fake_quant: nn.Module,
        device: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device)
        self.weight_fake_quant, self.input_fake_quant = weight_fake_quant, input_fake_quant

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_fake_quant: nn.Module, input_fake_quant: nn.Module
    ) -> QATLinear:
        """Wrap ``linear``'s own parameters (no copy) with the two fake quantizers."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_fake_quant=weight_fake_quant,
            input_fake_quant=input_fake_quant,
            device="meta",
        )
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (float) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.detach().clone())
        linear.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.input_fake_quant(x)
        return F.linear(x_hat, self.weight_fake_quant(self.weight), self._fake_bias(self.bias))

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self._describe()}"


def _conv_copy(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` shaped like ``conv`` holding copies of ``weight`` and ``bias``."""
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias is not None,
        conv.padding_mode,
        device="meta",
    )
    out.weight = nn.Parameter(weight.detach().clone())
    out.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    return out


class QATConv2d(nn.Conv2d, _QATLayer):
    """An ``nn.Conv2d`` trained with fake quantization, as :class:`QATLinear` (weight per output channel)."""

    def __init__(
        self, *args: Any, weight_fake_quant: nn.Module, input_fake_quant: nn.Module, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.weight_fake_quant, self.input_fake_quant = weight_fake_quant, input_fake_quant

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_fake_quant: nn.Module, input_fake_quant: nn.Module
    ) -> QATConv2d:
        """Wrap ``conv``'s own parameters (no copy) with the two fake quantizers."""
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            weight_fake_quant=weight_fake_quant,
            input_fake_quant=input_fake_quant,
            device="meta",
        )
        module.weight, module.bias = conv.weight, conv.bias
        return module

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this layer's (float) weight and bias."""
        return _conv_copy(self, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.input_fake_quant(x)
        return self._conv_forward(x_hat, self.weight_fake_quant(self.weight), self._fake_bias(self.bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._describe()}"


class QATConvBn2d(nn.Module, _QATLayer):
    """A conv followed by a batch norm, trained as the one folded conv that inference will run — chapter 8
    (Jacob et al., 2018; Krishnamoorthi, 2018).

    The weight that is fake-quantized is always the folded one, ``W' = W gamma / sqrt(running_var + eps)``
    (:func:`_fold_bn`), so training sees the weight inference uses. In training mode the output still uses
    the *batch* statistics (and updates the running ones), by the correction of Krishnamoorthi (2018) as
    torch.ao implements it: the conv with the folded quantized weight is divided by the per-channel factor
    ``gamma / sqrt(running_var + eps)``, the conv bias added, and the batch norm applied in training mode:

    ``y = BN_batch(conv(x_hat, fq(W')) sqrt(running_var + eps) / gamma + b)``.

    In eval mode, or after :meth:`freeze_bn`, it is the folded conv with running statistics,
    ``y = conv(x_hat, fq(W')) + b_hat'`` with the folded bias on the int32 grid: the codes and the bias that
    :func:`convert` gives the integer module (the two differ only in float rounding).
    """

    def __init__(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_fake_quant: nn.Module, input_fake_quant: nn.Module
    ) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.weight_fake_quant, self.input_fake_quant = weight_fake_quant, input_fake_quant
        self.bn_frozen = False

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded ``(weight, bias)`` with the running statistics (:func:`_fold_bn`)."""
        return _fold_bn(self.conv.weight, *_bn_terms(self.bn, self.conv))

    def freeze_bn(self) -> QATConvBn2d:
        """Use (and keep) the running statistics from now on, also in training mode. Returns ``self``."""
        self.bn_frozen = True
        return self

    def to_float(self) -> nn.Conv2d:
        """The folded conv as a plain ``nn.Conv2d`` (what :func:`fold_batchnorm` would give)."""
        return _conv_copy(self.conv, *self.folded())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.input_fake_quant(x)
        weight, bias = self.folded()
        w_hat = self.weight_fake_quant(weight)
        if self.training and not self.bn_frozen:
            return self._batch_statistics(x_hat, w_hat)
        return self.conv._conv_forward(x_hat, w_hat, self._fake_bias(bias))

    def _batch_statistics(self, x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        """Training with batch statistics from the weight folded with the running ones (see the class)."""
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        factor = (gamma / torch.sqrt(bn.running_var + bn.eps)).reshape(1, -1, 1, 1)  # (1, C_out, 1, 1)
        y = self.conv._conv_forward(x_hat, w_hat, None) / factor
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        return bn(y)

    def extra_repr(self) -> str:
        return f"{self._describe()}, batch norm {'frozen' if self.bn_frozen else 'batch statistics'}"


_QAT_LAYERS = (QATLinear, QATConv2d, QATConvBn2d)
_QUANTIZERS = (FakeQuantize, LearnedScaleFakeQuantize)


# --------------------------------------------------------------------------------------------------------
# prepare_qat -> fit -> freeze -> convert
# --------------------------------------------------------------------------------------------------------


def _check_float_model(model: object, inplace: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    done = [n for n, m in model.named_modules() if isinstance(m, (*_QAT_LAYERS, QuantModule, Observed))]
    if done:
        raise ValueError(
            f"the model is already prepared or quantized: {_names(done)}; start from a float model"
        )
    return model


def _check_conv(conv: nn.Module) -> None:
    if isinstance(conv, nn.Conv2d) and (
        conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
    ):
        raise ValueError(
            "QAT convs become qbook.nn.QuantConv2d: groups=1, padding_mode='zeros' and numeric padding "
            "only, got "
            f"groups={conv.groups}, padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
        )


def prepare_qat(
    model: nn.Module,
    config: QuantConfig = W8A8_STATIC,
    *,
    method: str = "fake",
    modules: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    skip: Iterable[str] = (),
    observer: Callable[..., Observer] | None = None,
    learn_zero_point: bool = False,
    init: str = "lsq",
    inplace: bool = False,
) -> nn.Module:
    """Make a float model ready for quantization-aware training — chapter 8.

    Every ``modules`` layer (exact type) not named in ``skip`` becomes a :class:`QATLinear` /
    :class:`QATConv2d`: its weight fake-quantized per output channel on ``config.weight`` (a static
    :class:`~qbook.ptq.QuantConfig`, 2..8 bits, e.g. :data:`qbook.ptq.W4A4_STATIC`), its input per tensor on
    ``config.activation``, its bias on the int32 grid. A ``Conv2d`` whose output goes only into a
    ``BatchNorm2d`` becomes one :class:`QATConvBn2d` (the batch norm is replaced by ``nn.Identity``); other
    batch norms stay float.

    ``method="fake"``: :class:`FakeQuantize` — weights on the current weight's range
    (:class:`LatestMinMaxObserver`, as PTQ would choose), inputs on a moving average of the batch ranges
    (``observer``, default :class:`~qbook.observers.MovingAverageObserver`; ``config.observer`` is PTQ's
    calibration observer and is not used). ``method="lsq"``: :class:`LearnedScaleFakeQuantize` — weight scales
    initialised now from the (folded) weights, input scales from the first batch, both as ``init`` says
    (``"lsq"``: the paper's ``2 mean|x| / sqrt(Q_P)``; ``"minmax"``: the range); ``learn_zero_point=True``
    learns affine input zero points (LSQ+).

    Returns a copy in training mode (``inplace=True``: the model itself).
    """
    _check_config(config, "static", "prepare_qat")
    if method not in ("fake", "lsq"):
        raise ValueError(f"method must be 'fake' or 'lsq', got {method!r}")
    if not isinstance(learn_zero_point, bool):
        raise TypeError(f"learn_zero_point must be a bool, got {learn_zero_point!r}")
    if learn_zero_point and method != "lsq":
        raise ValueError("learn_zero_point=True is LSQ+: it needs method='lsq'")
    if init not in ("lsq", "minmax"):
        raise ValueError(f"init must be 'lsq' or 'minmax', got {init!r}")
    if observer is not None and (method != "fake" or not callable(observer)):
        raise ValueError(
            f"observer (a qbook.observers class or factory) is for method='fake', got {observer!r}"
        )
    _check_spec(config.weight)
    _check_spec(config.activation)
    _check_float_model(model, inplace)
    targets = _targets(model, _check_modules(modules), skip)
    for name, m in targets:
        try:
            _check_conv(m)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    pairs, _ = _conv_bn_pairs(model)
    bn_after = {conv: bn for conv, bn in pairs if type(model.get_submodule(conv)) is nn.Conv2d}
    model = model if inplace else copy.deepcopy(model)

    def weight_quantizer(weight: torch.Tensor) -> nn.Module:
        if method == "fake":
            return FakeQuantize(config.weight, PerChannel(0), observer=LatestMinMaxObserver)
        return LearnedScaleFakeQuantize(config.weight, PerChannel(0), init=init).initialize(weight.detach())

    def input_quantizer() -> nn.Module:
        if method == "fake":
            return FakeQuantize(config.activation, PerTensor(), observer=observer)
        return LearnedScaleFakeQuantize(
            config.activation, PerTensor(), learn_zero_point=learn_zero_point, init=init
        )

    for name, _ in targets:
        m = model.get_submodule(name) if name else model
        if name in bn_after:
            bn = model.get_submodule(bn_after[name])
            weight, _ = _fold_bn(m.weight, *_bn_terms(bn, m))
            new: nn.Module = QATConvBn2d(m, bn, weight_quantizer(weight), input_quantizer())
            model = _set_submodule(model, bn_after[name], nn.Identity())
        else:
            cls = QATLinear if isinstance(m, nn.Linear) else QATConv2d
            new = cls.from_float(m, weight_quantizer(m.weight), input_quantizer())
        model = _set_submodule(model, name, new)
    return model.train()


def freeze(model: nn.Module, *, observers: bool = True, batchnorm: bool = True) -> nn.Module:
    """Freeze a QAT model (in place; returns it): every fake quantizer stops observing or learning
    (``observers``) and every :class:`QATConvBn2d` switches to its running statistics (``batchnorm``). The
    usual recipe freezes both for the last epoch(s), so training ends on the exact model :func:`convert`
    makes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("observers", observers), ("batchnorm", batchnorm)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    for m in model.modules():
        if observers and isinstance(m, _QUANTIZERS):
            m.freeze()
        if batchnorm and isinstance(m, QATConvBn2d):
            m.freeze_bn()
    return model


def _input_qparams(fq: nn.Module) -> tuple[torch.Tensor, int]:
    return fq.scale.detach().reshape(()), int(torch.round(fq.zero_point.detach()))


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A QAT model (from :func:`prepare_qat`, trained) as chapter 7's integer modules — chapter 8.

    Each QAT layer becomes a :class:`qbook.nn.QuantLinear` / :class:`qbook.nn.QuantConv2d` with static
    activations: the input grid is the input fake quantizer's ``(scale, zero_point)``, the weight codes are
    ``quantize(W, s_w)`` with the weight fake quantizer's own scales (for a :class:`QATConvBn2d`, of the
    folded weight), i.e. exactly the codes the fake-quantized forward used in eval mode, and the bias is
    int32 on ``s_x s_w``. The converted model therefore computes, in integers, what the QAT model computes
    in eval mode. Returns a copy in eval mode unless ``inplace``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _QAT_LAYERS)]
    if not found:
        raise ValueError("convert needs a model from qbook.qat.prepare_qat; this one has no QAT layers")
    empty = [
        n
        for n, m in found
        if not (bool(m.weight_fake_quant.initialized) and bool(m.input_fake_quant.initialized))
    ]
    if empty:
        raise ValueError(
            f"layers whose fake quantizers have seen no data: {_names(empty)}; train (or run a "
            "batch through) the model first"
        )
    model = model if inplace else copy.deepcopy(model)
    for name, m in found:
        w_fq, x_fq = m.weight_fake_quant, m.input_fake_quant
        float_module = m.to_float()
        cls = QuantLinear if isinstance(float_module, nn.Linear) else QuantConv2d
        try:
            new = cls.from_float(
                float_module,
                activation="static",
                act_spec=x_fq.spec,
                weight_spec=w_fq.spec,
                input_qparams=_input_qparams(x_fq),
                weight_scale=w_fq.scale.detach(),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise type(e)(f"layer {name!r}: {e}") from e
        model = _set_submodule(model, name, new)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _what(obj: object) -> str:
    """A short description of a ``data`` item for an error message."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        kinds = ", ".join(type(t).__name__ for t in obj[:3]) + (", ..." if len(obj) > 3 else "")
        return f"a {type(obj).__name__} of {len(obj)} item(s) ({kinds})"
    return f"a {type(obj).__name__}"


def _is_batch(data: object) -> bool:
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    return pair and all(isinstance(t, torch.Tensor) for t in data)


def _is_pair(data: object) -> bool:
    return isinstance(data, tuple) and _is_batch(data)


@dataclass(frozen=True)
class _DataCheck:
    """What :func:`fit` requires of each ``(x, y)``: ``x_dtype`` the model's floating dtype (``None``: any),
    ``class_indices`` whether ``y`` goes to the default loss (cross-entropy)."""

    x_dtype: torch.dtype | None
    class_indices: bool

    def pair(self, x: object, y: object, where: str) -> None:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{where}: {name} must be a tensor, got {_what(t)} (convert it with torch.as_tensor)"
                )
            if t.ndim == 0:
                raise ValueError(f"{where}: {name} must have a batch dimension, got a 0-d tensor")
        if len(x) != len(y):
            raise ValueError(
                f"{where}: x has {len(x)} rows and y has {len(y)}; they must be equal (one target per row)"
            )
        if x.is_floating_point() and self.x_dtype is not None and x.dtype != self.x_dtype:
            raise TypeError(
                f"{where}: x is {x.dtype} but the model's parameters are {self.x_dtype}; pass "
                f"x.to({self.x_dtype})"
            )
        if self.class_indices and not (
            y.dtype in (torch.long, torch.uint8) or (y.is_floating_point() and y.ndim >= 2)
        ):
            raise TypeError(
                f"{where}: the default loss (cross-entropy) takes y as class indices (torch.long) or as "
                f"class probabilities (floating point, shaped like the outputs), got {_what(y)}; pass "
                "y.long(), or your own loss"
            )

    def batch(self, batch: object, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{where} must be an (x, y) pair of tensors, got {_what(batch)}")
        self.pair(*batch, where)
        return batch[0], batch[1]


def _check_data(data: object, epochs: int, check: _DataCheck) -> None:
    """Refuse ``data`` that is not ``(x, y)`` tensors or an iterable of ``(x, y)`` batches, before training.
    Batches of a sequence are all checked here; those of another iterable (a ``DataLoader``) as they come."""
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be (x, y) tensors or an iterable of (x, y) batches, got {_what(data)}"
        )
    tensors = isinstance(data, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in data)
    if isinstance(data, tuple) and len(data) == 2 and (tensors or not any(_is_batch(b) for b in data)):
        check.pair(*data, "data")  # (x, y): TypeError if either is not a tensor
    elif tensors:
        raise TypeError(
            "data must be a tuple (x, y) of two tensors or a sequence of (x, y) batches, got "
            f"{_what(data)}"
        )
    elif isinstance(data, Iterator) and epochs > 1:
        raise ValueError(
            f"data is a one-shot {type(data).__name__}: it would give no batches after the first of "
            f"{epochs} epochs; pass a list of batches or a DataLoader"
        )
    elif isinstance(data, Sequence):
        for i, batch in enumerate(data):
            check.batch(batch, f"data[{i}]")


def _batches(
    data: Any, batch_size: int, order: torch.Generator, check: _DataCheck
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if _is_pair(data):
        x, y = data
        for index in torch.randperm(len(y), generator=order).split(batch_size):
            yield x[index], y[index]
    else:
        for i, batch in enumerate(data):
            yield check.batch(batch, f"batch {i} of data")


def _adam(model: nn.Module, lr: float, quantizer_lr: float | None) -> torch.optim.Adam:
    """Adam over the model's parameters; LSQ's scales and zero points in a group of their own."""
    learned = [p for m in model.modules() if isinstance(m, LearnedScaleFakeQuantize)
               for p in m.parameters(recurse=False)]
    ids = {id(p) for p in learned}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if learned:
        groups.append({"params": learned, "lr": lr if quantizer_lr is None else quantizer_lr})
    return torch.optim.Adam(groups, lr=lr)


def fit(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[Any, Any]],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    quantizer_lr: float | None = None,
    batch_size: int = 128,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` (a QAT model, or any model); returns the mean training loss of each epoch — chapter 8.

    ``data``: ``(x, y)`` tensors with as many rows, cut each epoch into shuffled mini-batches of
    ``batch_size`` (the order drawn from ``seed``), or an iterable of ``(x, y)`` batches used as given (a
    list, a ``DataLoader``); a floating ``x`` must have the model's dtype, and with the default ``loss`` ``y``
    holds class indices (``torch.long``) or class probabilities. ``optimizer``: default Adam with ``lr``
    over every parameter, LSQ's scales and zero points with ``quantizer_lr`` (default ``lr``: Adam divides by
    the gradient's size, so LSQ's gradient scale ``g`` does not set their step, the learning rate does: a
    weight scale of 0.01 moves by up to ``lr`` per step; after every step
    :meth:`LearnedScaleFakeQuantize.project` clamps the scales at float32 eps). Deterministic like
    :func:`qbook.models.train_digits_cnn`: one thread (restored afterwards), seeded, the caller's random state
    untouched. ``progress``: a tqdm bar over the epochs with the running loss. The model is left in the mode
    it had.

    >>> torch.manual_seed(0) and None
    >>> model = prepare_qat(nn.Sequential(nn.Linear(4, 3)), method="lsq")
    >>> from qbook.data import randn
    >>> x, y = randn(64, 4), torch.randint(0, 3, (64,))
    >>> history = fit(model, (x, y), epochs=3, lr=1e-2, batch_size=16, progress=False)
    >>> len(history), history[-1] < history[0]
    (3, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if quantizer_lr is not None:
        if optimizer is not None:
            raise ValueError("quantizer_lr is for the default optimizer; give yours its parameter groups")
        if isinstance(quantizer_lr, bool) or not isinstance(quantizer_lr, (int, float)) or not (
            math.isfinite(quantizer_lr) and quantizer_lr > 0
        ):
            raise ValueError(f"quantizer_lr must be a positive number or None, got {quantizer_lr!r}")
    if not callable(loss):
        raise TypeError(f"loss must be callable (outputs, targets) -> tensor, got {loss!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    check = _DataCheck(next(iter(dtypes)) if len(dtypes) == 1 else None, loss is F.cross_entropy)
    _check_data(data, epochs, check)
    from tqdm import tqdm

    was_training, threads = model.training, torch.get_num_threads()
    history: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)  # small models: one thread is fast, and the sums' order is fixed
            torch.manual_seed(seed)
            order = torch.Generator().manual_seed(seed)
            optimizer = optimizer or _adam(model, lr, quantizer_lr)
            learned = [m for m in model.modules() if isinstance(m, LearnedScaleFakeQuantize)]
            model.train()
            bar = tqdm(range(epochs), desc="training", disable=not progress, leave=False)
            for epoch in bar:
                total, count = 0.0, 0
                for x, y in _batches(data, batch_size, order, check):
                    value = loss(model(x), y)
                    optimizer.zero_grad()
                    value.backward()
                    optimizer.step()
                    for lsq in learned:  # keep the learned scales positive (projected gradient descent)
                        lsq.project()
                    total, count = total + float(value.detach()) * len(y), count + len(y)
                if count == 0:
                    raise ValueError("data gave no batches")
                history.append(total / count)
                if not math.isfinite(history[-1]):
                    raise ValueError(f"the loss is {history[-1]} in epoch {epoch + 1}; lower lr")
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return history
