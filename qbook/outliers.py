"""Outliers (异常值) in activations, and two fixes from the literature — chapter 5.

A few input features of a transformer's linear layers carry values far larger than the rest. With one scale
per tensor, those few stretch the grid for everyone (the notes: 异常值会导致量化误差增大). This module
provides what chapter 5 needs to see and fix that on a real model:

* :func:`capture_activations` — forward hooks that record the inputs of chosen modules (all of them, their
  per-channel ``max |x|``, or through an observer), streaming over a calibration set;
* :func:`outlier_channels` — which input channels are outliers (``max |x| > 6`` or ``> 20x`` the median);
* :func:`vectorwise_matmul` and :func:`llm_int8_matmul` — LLM.int8()'s vector-wise quantization and
  mixed-precision decomposition (Dettmers et al., 2022), with real integer arithmetic or simulated;
* :func:`smooth_scales`, :func:`smooth_linear`, :func:`smooth_layernorm_linears` — SmoothQuant's migration
  of the activation difficulty into the weights (Xiao et al., 2023);
* :class:`FakeQuantLinear` and :func:`quantize_linears` — module surgery that simulates a quantized
  ``nn.Linear`` (weights and inputs fake-quantized), with the fixes as options; :func:`restore_linears`
  undoes it. The real quantized layer is chapter 7's :class:`qbook.nn.QuantLinear` (int8 weights, integer
  matmul); :meth:`FakeQuantLinear.to_integer` turns a calibrated simulation into it where the scheme allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, calc_qparams, dequantize, fake_quantize, quantize
from qbook.granularity import Granularity, PerChannel, PerGroup, PerTensor, minmax
from qbook.intmath import int_matmul
from qbook.observers import MinMaxObserver, Observer

__all__ = [
    "LLM_INT8",
    "W8A8",
    "LinearQuantConfig",
    "FakeQuantLinear",
    "capture_activations",
    "llm_int8_matmul",
    "outlier_channels",
    "outlier_columns",
    "quantize_linears",
    "restore_linears",
    "smooth_layernorm_linears",
    "smooth_linear",
    "smooth_scales",
    "vectorwise_matmul",
]


# --------------------------------------------------------------------------------------------------------
# Looking at activations
# --------------------------------------------------------------------------------------------------------


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_fits_float32(t: torch.Tensor, name: str) -> None:
    """Scales are float32: values beyond its range (finite in float64) would become infinite."""
    if t.dtype == torch.float64 and t.numel() and t.abs().amax() > _FLOAT32_MAX:
        raise ValueError(
            f"{name} has values up to {t.abs().amax().item():.4g} in magnitude, beyond float32's range "
            f"({_FLOAT32_MAX:.4g}) in which qbook computes scales"
        )


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a tensor of dtype {t.dtype} and shape {tuple(t.shape)}"
    return type(t).__name__


def _is_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, FakeQuantLinear))


def _run(model: nn.Module, inputs: Callable[[], Any] | Iterable[Any]) -> None:
    if callable(inputs):
        inputs()
        return
    with torch.inference_mode():
        for batch in inputs:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)


def capture_activations(
    model: nn.Module,
    inputs: Callable[[], Any] | Iterable[Any],
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    *,
    stat: str | Callable[[], Observer] = "absmax",
) -> dict[str, Any]:
    """Record the inputs of the modules of ``model`` that ``module_filter(name, module)`` selects (default:
    every ``nn.Linear``) while ``inputs`` runs — chapter 5.

    ``inputs`` is either a callable that runs the model itself (e.g. ``lambda: embed(model, sentences)``)
    or an iterable of batches, each passed as ``model(batch)`` (``model(*batch)`` for a tuple,
    ``model(**batch)`` for a dict). Each module's input is seen as ``(tokens, K)`` rows (all leading
    dimensions flattened), and per module the result is, by ``stat``:

    * ``"absmax"``: the per-input-channel ``max |x|`` ``(K,)`` over everything seen (streaming);
    * ``"inputs"``: all the rows, concatenated, ``(tokens, K)``;
    * a zero-argument factory of an :class:`~qbook.observers.Observer`: one observer per module that has
      observed every batch (streaming).

    Hooks are removed afterwards, also when the forward raises.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> stats = capture_activations(model, [torch.tensor([[1.0, -5.0]]), torch.tensor([[-2.0, 0.5]])])
    >>> list(stats), stats["0"].tolist()
    (['0', '2'], [2.0, 5.0])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module_filter = _is_linear if module_filter is None else module_filter
    if not (stat in ("absmax", "inputs") or (callable(stat) and not isinstance(stat, str))):
        raise ValueError(f"stat must be 'absmax', 'inputs' or an observer factory, got {stat!r}")
    results: dict[str, Any] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
            if stat == "absmax":
                absmax = rows.abs().amax(dim=0)
                results[name] = absmax if name not in results else torch.maximum(results[name], absmax)
            elif stat == "inputs":
                results.setdefault(name, []).append(rows.clone())
            else:
                if name not in results:
                    results[name] = stat()
                results[name].observe(rows)

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name))
        for name, module in model.named_modules()
        if name and module_filter(name, module)
    ]
    if not handles:
        raise ValueError("module_filter selected no module of the model; nothing to capture")
    try:
        _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if stat == "inputs":
        return {name: torch.cat(parts) for name, parts in results.items()}
    return results


def outlier_channels(absmax: torch.Tensor, threshold: float = 6.0, ratio: float = 20.0) -> torch.Tensor:
    """Boolean mask ``(K,)`` of the outlier channels: ``max |x_j| > threshold`` or ``> ratio * median_j``.

    ``absmax`` is the per-channel ``max |x|`` (from :func:`capture_activations`). 6.0 is LLM.int8()'s
    outlier threshold (Dettmers et al., 2022); the ratio test catches channels that stand out in layers
    whose typical scale is far from 1.

    >>> import torch
    >>> outlier_channels(torch.tensor([0.5, 0.4, 7.0, 0.6, 0.3])).tolist()
    [False, False, True, False, False]
    """
    absmax = _check_absmax(absmax, "absmax")
    for name, value in (("threshold", threshold), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    return _outlier_channels(absmax, threshold, ratio)


def _outlier_channels(absmax: torch.Tensor, threshold: float, ratio: float) -> torch.Tensor:
    """The math of :func:`outlier_channels`: a fixed threshold, or far above the typical channel."""
    median = absmax.median()
    return (absmax > threshold) | (absmax > ratio * median)


def _check_absmax(absmax: object, name: str) -> torch.Tensor:
    if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point():
        raise TypeError(f"{name} must be a 1-D floating-point tensor (K,), got {_describe(absmax)}")
    if absmax.ndim != 1 or absmax.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor (K,), got shape {tuple(absmax.shape)}")
    bad = ~torch.isfinite(absmax) | (absmax < 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and non-negative, got {absmax[bad][0].item()!r}")
    _check_fits_float32(absmax, name)
    return absmax


# --------------------------------------------------------------------------------------------------------
# LLM.int8(): vector-wise quantization and mixed-precision decomposition
# --------------------------------------------------------------------------------------------------------


def _check_matmul(x: object, weight: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got x {x.dtype} and weight {weight.dtype}")
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1] or 0 in (*x.shape, *weight.shape):
        raise ValueError(
            "need x (M, K) and weight (N, K) with the same K >= 1 and M, N >= 1, got "
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    for name, t in (("x", x), ("weight", weight)):
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(f"{name} {tuple(t.shape)} contains {int(bad.sum())} NaN or infinite value(s)")
        _check_fits_float32(t, name)
    return x, weight


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask ``(K,)`` of the columns (input features) of ``x`` ``(M, K)`` with any ``|x| > threshold``.

    >>> import torch
    >>> outlier_columns(torch.tensor([[0.1, 7.0, -0.2], [0.3, 0.2, -6.5]]), 6.0).tolist()
    [False, True, True]
    """
    _check_threshold(threshold)
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be a real number tensor (M, K), got {_describe(x)}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    return _outlier_columns(x, threshold)


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (inf for no decomposition), got {threshold!r}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")


def _outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The math of :func:`outlier_columns`: a column is an outlier if any of its values is."""
    return (x.abs() > threshold).any(dim=0)


def vectorwise_matmul(x: torch.Tensor, weight: torch.Tensor, *, simulate: bool = False) -> torch.Tensor:
    """``x @ weight.T`` in int8 with LLM.int8()'s vector-wise quantization (Dettmers et al., 2022), ch. 5.

    Each row (token) of ``x`` ``(M, K)`` gets its own scale ``c_x = max_k |x_ik| / 127``, each row (output
    channel) of ``weight`` ``(N, K)`` its own ``c_w = max_k |w_jk| / 127`` (the symmetric grid [-127, 127]);
    then

    ``out_ij = c_x,i * c_w,j * sum_k q_x,ik q_w,jk``

    where the sum is exact integer arithmetic (``qbook.intmath.int_matmul``, int32), dequantized in float32
    and returned in ``x``'s dtype. With ``simulate=True``
    the same quantized values are multiplied in float (fake quantization), which is what large-model
    experiments use for speed; the two agree to float rounding.

    >>> import torch
    >>> x = torch.tensor([[1.0, -2.0], [0.5, 0.25]]); w = torch.tensor([[3.0, 1.0]])
    >>> vectorwise_matmul(x, w), x @ w.T     # 1.0 -> 63.5 steps of 2/127 -> 64: the rounding error shows
    (tensor([[1.0394],
            [1.7500]]), tensor([[1.0000],
            [1.7500]]))
    """
    x, weight = _check_matmul(x, weight)
    return _vectorwise_matmul(x, weight, simulate)


def _vectorwise_matmul(x: torch.Tensor, weight: torch.Tensor, simulate: bool) -> torch.Tensor:
    """The math of :func:`vectorwise_matmul`: one symmetric int8 scale per row of ``x`` and of ``weight``."""
    spec, rows = INT8_SYMMETRIC, PerChannel(axis=0)
    x_scale, x_zero = calc_qparams(*minmax(x, rows), spec.qmin, spec.qmax, symmetric=True)  # (M, 1)
    w_scale, w_zero = calc_qparams(*minmax(weight, rows), spec.qmin, spec.qmax, symmetric=True)  # (N, 1)
    if simulate:
        x_hat = fake_quantize(x, x_scale, x_zero, spec.qmin, spec.qmax)
        w_hat = fake_quantize(weight, w_scale, w_zero, spec.qmin, spec.qmax)
        return x_hat @ w_hat.T
    q_x = quantize(x, x_scale, x_zero, spec.qmin, spec.qmax)  # (M, K) int8
    q_w = quantize(weight, w_scale, w_zero, spec.qmin, spec.qmax)  # (N, K) int8
    acc = int_matmul(q_x, q_w.T)  # (M, N) int32, exact
    out = acc.to(torch.float32) * x_scale * w_scale.T  # dequantize with the outer product of the scales
    return out.to(x.dtype)


def llm_int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0, *, simulate: bool = False
) -> torch.Tensor:
    """LLM.int8()'s mixed-precision decomposition (Dettmers et al., 2022) — chapter 5.

    The columns ``O`` of ``x`` ``(M, K)`` holding any ``|x| > threshold`` (:func:`outlier_columns`; 6.0 in
    the paper) are multiplied in floating point, the others in int8 with vector-wise scales
    (:func:`vectorwise_matmul`):

    ``out = x[:, O] @ weight[:, O].T  +  vectorwise_matmul(x[:, ~O], weight[:, ~O])``

    The paper runs the outlier part in fp16; here it stays in ``x``'s dtype. ``threshold=inf`` is the
    plain int8 path; ``threshold=0`` sends every non-zero column to the float path.

    >>> import torch
    >>> x = torch.tensor([[0.1, 20.0], [-0.3, 0.2]]); w = torch.tensor([[1.0, 1.0]])
    >>> llm_int8_matmul(x, w), x @ w.T          # column 1 (20.0) goes through the float path
    (tensor([[20.1000],
            [-0.1000]]), tensor([[20.1000],
            [-0.1000]]))
    """
    x, weight = _check_matmul(x, weight)
    _check_threshold(threshold)
    return _llm_int8_matmul(x, weight, threshold, simulate)


def _llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float, simulate: bool) -> torch.Tensor:
    """The math of :func:`llm_int8_matmul`: outlier columns in float, the rest in vector-wise int8."""
    outliers = _outlier_columns(x, threshold)  # (K,)
    out = x.new_zeros(x.shape[0], weight.shape[0])  # (M, N)
    if outliers.any():
        out += x[:, outliers] @ weight[:, outliers].T
    if not outliers.all():
        out += _vectorwise_matmul(x[:, ~outliers], weight[:, ~outliers], simulate)
    return out


# --------------------------------------------------------------------------------------------------------
# SmoothQuant: migrate the difficulty from activations to weights
# --------------------------------------------------------------------------------------------------------


def smooth_scales(
    act_absmax: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant's per-input-channel smoothing factors (Xiao et al., 2023, eq. 4) — chapter 5:

    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``

    where ``max|X_j|`` is the calibration ``max |x|`` of input channel ``j`` and ``max|W_j|`` the largest
    ``|w|`` in column ``j`` of the weight(s) ``(N, K)`` that read this input (several weights, e.g. the Q, K
    and V projections, share one ``s``). Then ``(X diag(s)^-1)(diag(s) W^T) = X W^T`` exactly, and the
    smoothed channel ranges become ``max|X_j|^(1 - alpha) max|W_j|^(1 - alpha)`` for activations and
    ``max|X_j|^alpha max|W_j|^alpha`` for weights: ``alpha = 0.5`` balances them. Both maxima are floored at
    1e-5 as in the reference implementation.

    >>> import torch
    >>> smooth_scales(torch.tensor([16.0, 1.0]), torch.tensor([[1.0, 4.0]]))
    tensor([4.0000, 0.5000])
    """
    act_absmax = _check_absmax(act_absmax, "act_absmax")
    if not isinstance(weights, (torch.Tensor, Sequence)) or isinstance(weights, str):
        got = type(weights).__name__
        raise TypeError(f"weights must be a tensor (N, K) or a sequence of them, got {got}")
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not weights:
        raise ValueError("weights is empty; pass the weight(s) (N, K) that read these activations")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating-point tensor (N, K), got {_describe(w)}")
        if w.ndim != 2 or w.shape[1] != act_absmax.shape[0] or w.shape[0] == 0:
            raise ValueError(
                f"weights[{i}] must be (N, K) with N >= 1 and K = {act_absmax.shape[0]}, got {tuple(w.shape)}"
            )
        bad = ~torch.isfinite(w)
        if bad.any():
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"weights[{i}] {tuple(w.shape)} has {int(bad.sum())} non-finite value(s), e.g. "
                f"{w[row, col].item()} at [{row}, {col}]; SmoothQuant needs finite weights"
            )
        _check_fits_float32(w.detach(), f"weights[{i}]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return _smooth_scales(act_absmax, weights, alpha)


def _smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """The math of :func:`smooth_scales`: eq. 4 of SmoothQuant, one ``s_j`` per input channel."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()  # (K,)
    return act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)


def _check_scales(s: object, k: int) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise TypeError(f"smoothing scales must be a floating-point tensor ({k},), got {_describe(s)}")
    if s.shape != (k,):
        raise ValueError(f"smoothing scales must have shape ({k},), got {tuple(s.shape)}")
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(f"smoothing scales must be positive and finite, got {s[j].item()!r} at index {j}")
    return s


def _check_linear(linear: object, name: str = "linear") -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(linear).__name__}")
    return linear


@torch.no_grad()
def smooth_linear(linear: nn.Linear, s: torch.Tensor) -> None:
    """Fold ``s`` into a linear layer's weight in place: ``W'[:, j] = W[:, j] * s_j``. Its input must then be
    divided by ``s`` (by the preceding LayerNorm, :func:`smooth_layernorm_linears`, or explicitly).

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False); _ = lin.weight.data.copy_(torch.tensor([[1.0, 4.0]]))
    >>> smooth_linear(lin, torch.tensor([4.0, 0.5])); lin.weight.data
    tensor([[4., 2.]])
    """
    s = _check_scales(s, _check_linear(linear).in_features)
    linear.weight.mul_(s.to(linear.weight.dtype))


@torch.no_grad()
def smooth_layernorm_linears(
    layernorm: nn.LayerNorm, linears: Sequence[nn.Linear], act_absmax: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant for a LayerNorm feeding linear layers (pre-LN transformers: LN -> Q, K, V or LN -> FC1):
    one ``s`` for all of them (:func:`smooth_scales`), ``1/s`` folded into the LayerNorm's weight and bias,
    ``s`` into each linear's weight. The function computed is unchanged, at no runtime cost. Returns ``s``.

    Only valid when the LayerNorm's output feeds nothing else: in a post-LN model (BERT, MiniLM) it also
    feeds the residual connection, which would see ``x / s`` — there the input of each linear is divided
    instead (:class:`FakeQuantLinear` with ``smooth_alpha``).

    >>> import torch
    >>> _ = torch.manual_seed(0); ln, fc = torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)
    >>> x = torch.randn(3, 4) * torch.tensor([1.0, 30.0, 1.0, 1.0])
    >>> before = fc(ln(x))
    >>> s = smooth_layernorm_linears(ln, [fc], ln(x).abs().amax(0))
    >>> torch.allclose(fc(ln(x)), before, atol=1e-6)
    True
    """
    if not isinstance(layernorm, nn.LayerNorm) or layernorm.weight is None:
        raise TypeError(f"layernorm must be an nn.LayerNorm with an affine weight, got {layernorm!r}")
    if isinstance(linears, nn.Module) or not isinstance(linears, Sequence):
        raise TypeError(f"linears must be a sequence of nn.Linear, got {type(linears).__name__}")
    for i, lin in enumerate(linears):
        _check_linear(lin, f"linears[{i}]")
    s = smooth_scales(act_absmax, [lin.weight for lin in linears], alpha)
    if layernorm.weight.shape != s.shape:
        raise ValueError(
            f"the LayerNorm's weight has shape {tuple(layernorm.weight.shape)} but the linears read "
            f"{s.shape[0]} features"
        )
    layernorm.weight.div_(s)
    if layernorm.bias is not None:
        layernorm.bias.div_(s)
    for lin in linears:
        smooth_linear(lin, s)
    return s


# --------------------------------------------------------------------------------------------------------
# A simulated quantized linear layer and the module surgery
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearQuantConfig:
    """How :class:`FakeQuantLinear` quantizes (simulated: fake quantization in float).

    * ``weight``/``weight_granularity``: the weight grid, e.g. int8 symmetric per tensor (``PerTensor()``)
      or per output channel (``PerChannel(0)``); ``None`` keeps float weights (activation-only);
    * ``activation``: the input grid; ``None`` leaves inputs in float (weight-only quantization);
    * ``observer``: factory of the observer that calibrates the static per-tensor input range, called as
      ``observer(spec=activation)``; e.g. ``functools.partial(PercentileObserver, percentile=99.99)``;
    * ``dynamic``: LLM.int8()'s vector-wise quantization instead of a calibrated static range: per-token
      input scales computed on the fly and per-output-channel weight scales, both symmetric int8
      (``weight=INT8_SYMMETRIC``, ``weight_granularity=PerChannel(0)``, ``activation=INT8_SYMMETRIC``);
    * ``threshold``: with ``dynamic``, LLM.int8()'s decomposition threshold (``inf``: none);
    * ``smooth_alpha``: SmoothQuant's migration strength; needs calibration ``max |x|`` per channel when the
      layers are wrapped (:func:`quantize_linears` ``act_absmax=``).
    """

    weight: QuantSpec | None = INT8_SYMMETRIC
    weight_granularity: Granularity = field(default_factory=PerTensor)
    activation: QuantSpec | None = INT8
    observer: Callable[..., Observer] = MinMaxObserver
    dynamic: bool = False
    threshold: float = math.inf
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.weight is not None and not isinstance(self.weight, QuantSpec):
            raise TypeError(f"weight must be a QuantSpec or None, got {self.weight!r}")
        if self.activation is not None and not isinstance(self.activation, QuantSpec):
            raise TypeError(f"activation must be a QuantSpec or None, got {self.activation!r}")
        if not callable(self.observer):
            raise TypeError(f"observer must be an observer class or factory, got {self.observer!r}")
        if not isinstance(self.weight_granularity, (PerTensor, PerChannel, PerGroup)):
            raise TypeError(f"weight_granularity must be a granularity, got {self.weight_granularity!r}")
        vectorwise = (INT8_SYMMETRIC, PerChannel(0), INT8_SYMMETRIC)
        if self.dynamic and (self.weight, self.weight_granularity, self.activation) != vectorwise:
            raise ValueError(
                "dynamic=True is LLM.int8()'s vector-wise scheme: it needs weight=INT8_SYMMETRIC, "
                "weight_granularity=PerChannel(0) and activation=INT8_SYMMETRIC, got "
                f"{self.weight}, {self.weight_granularity}, {self.activation}"
            )
        _check_threshold(self.threshold)
        if self.threshold != math.inf and not self.dynamic:
            raise ValueError(f"threshold={self.threshold} (decomposition) needs dynamic=True (per-token)")
        alpha = self.smooth_alpha
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
        if alpha is not None and not (number and 0 <= alpha <= 1):
            raise ValueError(f"smooth_alpha must be in [0, 1] or None, got {alpha!r}")


#: W8A8 per tensor: int8 symmetric weights, int8 affine inputs with a static min/max range.
W8A8 = LinearQuantConfig()

#: LLM.int8() (Dettmers et al., 2022): vector-wise int8 and the decomposition at threshold 6.0.
LLM_INT8 = LinearQuantConfig(
    weight=INT8_SYMMETRIC,
    weight_granularity=PerChannel(0),
    activation=INT8_SYMMETRIC,
    dynamic=True,
    threshold=6.0,
)


class FakeQuantLinear(nn.Module):
    """A simulated quantized ``nn.Linear`` for experiments on real models — chapter 5 (and 7).

    Two phases. While ``calibrating`` (after construction) the layer computes in float exactly like the
    wrapped linear (divided and re-multiplied by the smoothing ``s`` if any) and its observer watches the
    inputs; :meth:`freeze` then fixes the input ``scale``/``zero_point``. Frozen, it computes

    ``y = fake_quantize(x / s) @ fake_quantize(W diag(s))^T + b``

    with the static per-tensor input parameters, or with ``config.dynamic`` LLM.int8()'s per-token scales
    and decomposition (:func:`llm_int8_matmul`, simulated). ``routed`` counts the input features sent to the
    float path (over all calls), ``seen`` all features.
    """

    def __init__(self, linear: nn.Linear, config: LinearQuantConfig, smooth: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FakeQuantLinear wraps an nn.Linear, got {type(linear).__name__}")
        if not isinstance(config, LinearQuantConfig):
            raise TypeError(f"config must be a LinearQuantConfig, got {type(config).__name__}")
        if smooth is not None and not isinstance(smooth, torch.Tensor):
            got = type(smooth).__name__
            raise TypeError(f"smooth must be a tensor ({linear.in_features},) or None, got {got}")
        self.linear = linear
        self.config = config
        weight = linear.weight.detach().float()
        if smooth is not None:
            smooth = _check_scales(smooth.detach().float(), linear.in_features)
            weight = weight * smooth  # (N, K): W diag(s)
        self.register_buffer("smooth", smooth)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_hat", weight if config.weight is None else self._quantize_weight(weight))
        self.observer = None if config.activation is None or config.dynamic else config.observer(
            spec=config.activation
        )
        self.calibrating = self.observer is not None
        self.scale: torch.Tensor | None = None
        self.zero_point: torch.Tensor | None = None
        self.routed = 0
        self.seen = 0

    def _quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        spec, granularity = self.config.weight, self.config.weight_granularity
        w_scale, w_zero = calc_qparams(*minmax(weight, granularity), spec.qmin, spec.qmax, spec.symmetric)
        q = quantize(weight, w_scale, w_zero, spec.qmin, spec.qmax, granularity=granularity)
        return dequantize(q, w_scale, w_zero, granularity=granularity)

    def observe(self, x: torch.Tensor) -> None:
        """Feed an input batch ``(..., K)`` (e.g. captured earlier) to the observer, after smoothing."""
        if self.observer is None:
            raise RuntimeError("this FakeQuantLinear has no observer (dynamic or float activations)")
        self.observer.observe(self._smoothed(self._check_input(x).detach().float()))

    def _check_input(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"FakeQuantLinear takes a floating-point tensor (..., K), got {_describe(x)}")
        if x.ndim == 0 or x.shape[-1] != self.linear.in_features:
            raise ValueError(
                f"FakeQuantLinear expects inputs (..., {self.linear.in_features}), got shape {tuple(x.shape)}"
            )
        return x

    def freeze(self) -> None:
        """End calibration: fix the static input parameters from the observer."""
        if self.observer is not None:
            self.scale, self.zero_point = self.observer.qparams()
        self.calibrating = False

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.smooth is None else x / self.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._smoothed(self._check_input(x).float())
        bias = self.linear.bias
        if self.calibrating:
            self.observer.observe(x)
            return nn.functional.linear(x, self.weight, bias)
        spec = self.config.activation
        if spec is None:
            return nn.functional.linear(x, self.weight_hat, bias)
        if self.config.dynamic:
            rows = x.reshape(-1, x.shape[-1])  # (tokens, K)
            routed = outlier_columns(rows, self.config.threshold)
            self.routed += int(routed.sum())
            self.seen += routed.numel()
            out = llm_int8_matmul(rows, self.weight, self.config.threshold, simulate=True)
            out = out.reshape(*x.shape[:-1], -1)
            return out if bias is None else out + bias
        x_hat = fake_quantize(x, self.scale, self.zero_point, spec.qmin, spec.qmax)
        return nn.functional.linear(x_hat, self.weight_hat, bias)

    def to_integer(self) -> Any:
        """This calibrated simulation as chapter 7's integer :class:`qbook.nn.QuantLinear`.

        The simulation computes ``fake_quantize(x) @ fake_quantize(W)^T + b``; the integer module computes the
        same products exactly in int32 and dequantizes once, so the two agree up to float rounding. Only the
        schemes that module implements convert: int8 symmetric weights per output channel, with static
        per-tensor inputs (after :meth:`freeze`) or dynamic per-token inputs without LLM.int8()'s
        decomposition. SmoothQuant's division of the input belongs in the previous operation
        (:func:`smooth_layernorm_linears`), so a layer that divides its own input has no integer form here.
        """
        from qbook.nn import QuantLinear  # chapter 7's module family

        c = self.config
        if self.smooth is not None:
            raise ValueError(
                "this FakeQuantLinear divides its own input by SmoothQuant's scales; fold them into the "
                "previous operation (smooth_layernorm_linears) before converting to integers"
            )
        if c.weight != INT8_SYMMETRIC or c.weight_granularity != PerChannel(0):
            raise ValueError(
                "qbook.nn.QuantLinear keeps int8 symmetric weights per output channel; this layer quantizes "
                f"its weights with {c.weight} {c.weight_granularity}"
            )
        if c.activation is None:
            raise ValueError("weights only: use qbook.nn.WeightOnlyLinear.from_float for this scheme")
        if c.dynamic:
            if c.threshold != math.inf:
                raise ValueError(
                    f"LLM.int8()'s decomposition (threshold={c.threshold}) keeps outlier features in float; "
                    "qbook.nn.QuantLinear has no float path"
                )
            return QuantLinear.from_float(self.linear, activation="dynamic")
        if self.calibrating or self.scale is None:
            raise ValueError("calibrate the layer and call freeze() before converting it to integers")
        return QuantLinear.from_float(
            self.linear,
            activation="static",
            act_spec=c.activation,
            input_qparams=(self.scale, self.zero_point),
        )

    def extra_repr(self) -> str:
        c = self.config
        observer = getattr(c.observer, "func", c.observer)  # functools.partial -> the observer class
        act = "float" if c.activation is None else ("dynamic per-token" if c.dynamic else observer.__name__)
        return f"in={self.linear.in_features}, out={self.linear.out_features}, inputs={act}"


def quantize_linears(
    model: nn.Module,
    config: LinearQuantConfig,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    act_absmax: dict[str, torch.Tensor] | None = None,
) -> dict[str, FakeQuantLinear]:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``module_filter(name, module)`` selects
    (default: all) by a :class:`FakeQuantLinear` with ``config``; returns them by name. With
    ``config.smooth_alpha``, ``act_absmax[name]`` (from :func:`capture_activations`) gives each layer's
    SmoothQuant scales. Undo with :func:`restore_linears`.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> layers = quantize_linears(model, LinearQuantConfig())
    >>> _ = model(torch.randn(8, 4)); layers["0"].freeze()      # calibrate, then quantize
    >>> type(model[0]).__name__, type(restore_linears(model)[0]).__name__
    ('FakeQuantLinear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LinearQuantConfig):
        raise TypeError(f"config must be a LinearQuantConfig, got {type(config).__name__}")
    module_filter = (lambda name, module: True) if module_filter is None else module_filter
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module_filter(name, module)
    ]
    if config.smooth_alpha is not None:
        missing = [name for name, _ in targets if act_absmax is None or name not in act_absmax]
        if missing:
            raise ValueError(f"smooth_alpha needs act_absmax for every layer; missing {missing[:3]}")
    wrapped = {}
    for name, linear in targets:
        smooth = None
        if config.smooth_alpha is not None:
            try:
                smooth = smooth_scales(act_absmax[name], linear.weight, config.smooth_alpha)
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {name!r}: {e}") from e
        wrapped[name] = FakeQuantLinear(linear, config, smooth)
        _set_submodule(model, name, wrapped[name])
    return wrapped


def restore_linears(model: nn.Module) -> nn.Module:
    """Put back the original ``nn.Linear`` of every :class:`FakeQuantLinear` in ``model`` (in place)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            _set_submodule(model, name, module.linear)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
