"""Activation-aware weight quantization (AWQ; Lin et al., 2024) — chapter 11.

Round to nearest (RTN) minimises each weight's own error and ignores the input. AWQ looks at the layer's
output error ``||X W^T - X Ŵ^T||²`` instead: input channels that carry large activations make their weights
*salient*, so it scales those columns up before rounding (their relative rounding error shrinks) and
divides the input by the same factor. For per-input-channel scales ``s`` the layer is unchanged in float,

``W x = (W diag(s)) (diag(s)^-1 x)``

and only ``Q(W diag(s))`` is stored. AWQ chooses ``s = s_x^alpha`` from the mean magnitude ``s_x`` of each
input channel on calibration data, with ``alpha`` from a grid search over ``[0, 1)`` (20 points; ``alpha = 0``
is RTN itself) that minimises the output error of the layer, or of the layers sharing its input.

API (everything a chapter or a benchmark needs)

* :func:`rtn` — the weight exactly as :class:`qbook.nn.WeightOnlyLinear` stores it (dequantized);
* :func:`awq_scales`, :func:`search_scales` (-> :class:`ScaleSearch`) — the math, on GPTQ's objective
  (:func:`qbook.gptq.output_error`);
* :class:`ScaleGroup`, :func:`find_groups`, :func:`bert_groups` — which layers share an input and where
  ``1/s`` can go (the model's graph, which a module tree does not show);
* :func:`apply_scales` — the equivalence transform: a float model computing the same function, plus a record
  of :class:`Fold` (what was scaled, where the inverse went); :class:`ScaledInput` and
  :class:`ScaledActivation` are the two modules it may insert;
* :func:`transform` — calibrate, search and apply: ``(float model, folds)``;
* :func:`quantize_model` — ``transform`` then RTN: covered ``nn.Linear`` become ``WeightOnlyLinear``
  (what ``qbook.ptq.quantize_weights(..., method="awq")`` calls);
* :func:`salient_channels`, :func:`quantize_keeping` — AWQ's "1% salient channels" experiment.

Where ``1/s`` goes (``ScaleGroup.how``), for a BERT-style post-LayerNorm encoder such as MiniLM:

* ``"layernorm"`` — into the LayerNorm's weight and bias, free at run time. Valid only when the LayerNorm's
  output feeds nothing but the scaled layers (pre-LN transformers: LN -> Q, K, V; LN -> FC1). In BERT the
  LayerNorm output also feeds the residual connection, so this is **not** used for MiniLM;
* ``"linear"`` — into the rows (and bias) of the previous linear layer when the map between them is linear per
  channel: BERT's value projection -> attention output dense (the context is a softmax-weighted sum of values,
  so dividing value channel ``j`` by ``s_j`` divides context channel ``j`` by ``s_j``); free at run time;
* ``"activation"`` — into the activation function in front of the layer: ``GELU(h) / s`` by a
  :class:`ScaledActivation` (AutoAWQ's ``ScaledActivation``; BERT's intermediate GELU -> output dense); one
  division per element at run time;
* ``"input"`` — an explicit :class:`ScaledInput` that divides the layer's input (BERT's Q/K/V and intermediate
  dense: their input LayerNorm also feeds the residual). One division per element at run time; the layer's
  name then holds the wrapper and its ``.linear`` the weight.

The search runs on the original model's captured inputs: the folds of different groups commute (column scaling
of a layer and row scaling of the same layer), so every search sees the inputs its layer will see.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qbook import gptq
from qbook.affine import QuantSpec
from qbook.outliers import capture_activations

__all__ = [
    "ALPHAS",
    "Fold",
    "ScaleGroup",
    "ScaleSearch",
    "ScaledActivation",
    "ScaledInput",
    "apply_scales",
    "awq_scales",
    "bert_groups",
    "find_groups",
    "quantize_keeping",
    "quantize_model",
    "rtn",
    "salient_channels",
    "search_scales",
    "transform",
]

#: AWQ's grid for the exponent: ``alpha = 0, 0.05, ..., 0.95`` (20 points; ``alpha = 0`` is RTN).
ALPHAS: tuple[float, ...] = tuple(i / 20 for i in range(20))

_HOWS = ("layernorm", "linear", "activation", "input")


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a tensor of dtype {t.dtype} and shape {tuple(t.shape)}"
    return type(t).__name__


def _check_finite(t: object, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a {ndim}-D floating-point tensor, got {_describe(t)}")
    if t.ndim != ndim or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D tensor, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"{name} {tuple(t.shape)} contains {int(bad.sum())} NaN or infinite value(s)")
    return t


def _check_weight_spec(bits: object, group_size: object, spec: object) -> tuple[QuantSpec, int | None]:
    """The grid :class:`qbook.nn.WeightOnlyLinear` would use: symmetric narrow-range ``bits`` by default."""
    if spec is None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
        spec = QuantSpec(bits, True, narrow_range=True, symmetric=True)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or None, got {spec!r}")
    if spec.bits != bits:
        raise ValueError(f"bits={bits!r} but spec has {spec.bits} bits")
    if spec.bits > 8:
        raise ValueError(f"weight-only quantization stores 2..8-bit codes, got a {spec.bits}-bit spec")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(f"group_size must be a positive int or None (per channel), got {group_size!r}")
    return spec, group_size


def _check_alphas(alphas: object) -> tuple[float, ...]:
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas must be a sequence of numbers in [0, 1], got {alphas!r}")
    alphas = tuple(alphas)
    if not alphas:
        raise ValueError("alphas is empty; AWQ needs at least one exponent to try (e.g. qbook.awq.ALPHAS)")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"every alpha must be a number in [0, 1], got {a!r} in {alphas!r:.80}")
    return tuple(float(a) for a in alphas)


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


# --------------------------------------------------------------------------------------------------------
# The math: RTN as WeightOnlyLinear stores it, AWQ's scales and their search
# --------------------------------------------------------------------------------------------------------


def rtn(
    weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, spec: QuantSpec | None = None
) -> torch.Tensor:
    """Round to nearest: ``Ŵ = s_w (round(W / s_w) - z_w)`` with one scale per group of ``group_size`` inputs
    (``None``: per output channel), exactly as :class:`qbook.nn.WeightOnlyLinear` stores ``weight`` ``(N, K)``
    (symmetric narrow range by default; ``K`` padded with zeros to whole groups) — chapters 6, 7 and 11. The
    dequantized weight of :func:`qbook.gptq.rtn`, which wants ``group_size`` to divide ``K``.

    >>> import torch
    >>> rtn(torch.tensor([[0.1, -0.7, 0.35, 0.2]]), bits=3, group_size=None)
    tensor([[ 0.0000, -0.7000,  0.4667,  0.2333]])
    """
    weight = _check_finite(weight, "weight", 2)
    spec, group_size = _check_weight_spec(bits, group_size, spec)
    return _rtn(weight.float(), spec, group_size)


def _rtn(weight: torch.Tensor, spec: QuantSpec, group_size: int | None) -> torch.Tensor:
    """The math of :func:`rtn`: :func:`qbook.gptq.rtn` on the weight padded to whole groups."""
    K = weight.shape[1]
    g = K if group_size is None else group_size
    padded = F.pad(weight, (0, -(-K // g) * g - K))  # (N, Kp): zeros up to whole groups
    return gptq.rtn(padded, spec.bits, g, spec=spec).weight[:, :K]  # (N, K)


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scales ``s = s_x^alpha`` (Lin et al., 2024) — chapter 11:

    ``s_j = max(s_x,j^alpha, 1e-4) / sqrt(max_k s_k * min_k s_k)``

    where ``s_x,j`` is the mean ``|x|`` of input channel ``j`` on calibration data. The normalisation (from
    the reference implementation) centres ``s`` around 1 on a log scale; it does not change the rounding,
    because RTN with absmax scales is equivariant to a common factor. ``alpha = 0`` gives ``s = 1`` (RTN).

    >>> import torch
    >>> awq_scales(torch.tensor([4.0, 1.0, 0.25]), 0.5)
    tensor([2.0000, 1.0000, 0.5000])
    """
    act_mean = _check_finite(act_mean, "act_mean", 1)
    if (act_mean < 0).any():
        raise ValueError(
            f"act_mean must be non-negative (a mean |x| per channel), got min {act_mean.min().item()}"
        )
    _check_alphas([alpha])
    return _awq_scales(act_mean.float(), float(alpha))


def _awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """The math of :func:`awq_scales`: a power of the activation magnitudes, centred on 1."""
    s = (act_mean**alpha).clamp(min=1e-4)  # (K,)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class ScaleSearch:
    """The result of :func:`search_scales`: the chosen ``alpha`` and ``scale`` ``(K,)``, and the relative
    output error (:func:`qbook.gptq.output_error`) for every ``alpha`` tried (``alpha = 0`` is RTN)."""

    alpha: float
    scale: torch.Tensor
    alphas: tuple[float, ...]
    errors: tuple[float, ...]

    @property
    def error(self) -> float:
        """The smallest error, that of the chosen ``alpha``."""
        return min(self.errors)


def search_scales(
    x: torch.Tensor,
    weights: torch.Tensor | Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    alphas: Sequence[float] = ALPHAS,
) -> ScaleSearch:
    """AWQ's grid search (Lin et al., 2024) for the layers ``weights`` (each ``(N_i, K)``) that read the
    inputs ``x`` ``(T, K)`` — chapter 11:

    ``alpha* = argmin_alpha  sum_i ||X W_i^T - (X diag(s)^-1) Q(W_i diag(s))^T||²  /  sum_i ||X W_i^T||²``

    with ``s = awq_scales(mean_t |x_t|, alpha)`` and ``Q`` = :func:`rtn` at ``bits``/``group_size``: GPTQ's
    objective (:func:`qbook.gptq.output_error` with ``relative=True``), computed from ``X`` directly (cheaper
    than through ``H = 2 X^T X`` while there are fewer tokens than inputs; float32). Ties go to the first
    ``alpha`` of ``alphas``; with ``0.0`` among them the result is never worse than RTN on ``x``.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8) * torch.tensor([20.0, 1, 1, 1, 1, 1, 1, 1])   # one loud channel
    >>> found = search_scales(x, torch.randn(4, 8), bits=3, group_size=None)
    >>> found.alpha > 0, found.error < found.errors[0]
    (True, True)
    """
    x = _check_finite(x, "x", 2)
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not weights:
        raise ValueError("weights is empty; pass the weight(s) (N, K) that read x")
    for i, w in enumerate(weights):
        _check_finite(w, f"weights[{i}]", 2)
        if w.shape[1] != x.shape[1]:
            raise ValueError(
                f"weights[{i}] has shape {tuple(w.shape)}; x has K = {x.shape[1]} input channels"
            )
    spec, group_size = _check_weight_spec(bits, group_size, spec)
    alphas = _check_alphas(alphas)
    x, weight = x.float(), torch.cat([w.detach().float() for w in weights])
    energy = float((x @ weight.T).square().sum())  # ||X W^T||², as _search_scales computes it
    if energy == 0:
        raise ValueError(
            "the layers' output X W^T is zero on x (x or the weights are all zero): the relative output "
            "error ||X (Ŵ - W)^T||² / ||X W^T||² that AWQ minimises is undefined"
        )
    if not math.isfinite(energy):
        raise ValueError(
            f"||X W^T||² overflows float32 (max |x| = {float(x.abs().max()):.3g}, max |W| = "
            f"{float(weight.abs().max()):.3g}); rescale x or the weights"
        )
    found = _search_scales(x, weight, spec, group_size, alphas)
    bad = [a for a, e in zip(found.alphas, found.errors, strict=True) if not math.isfinite(e)]
    if bad:
        raise ValueError(
            f"the output error is not finite for alpha in {bad} (float32 overflow of the scaled weight, max "
            f"|x| = {float(x.abs().max()):.3g}); rescale x or try smaller alphas"
        )
    return found


def _search_scales(
    x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec, group_size: int | None, alphas: tuple[float, ...]
) -> ScaleSearch:
    """The math of :func:`search_scales`: try each ``alpha``, keep the one with the smallest output error.
    ``weight`` stacks the rows of every layer that reads ``x`` (RTN works row by row: stacking is exact)."""
    act_mean = x.abs().mean(dim=0)  # (K,): s_x
    energy = float((x @ weight.T).square().sum())  # ||X W^T||²
    errors = []
    for alpha in alphas:
        s = _awq_scales(act_mean, alpha)  # (K,)
        weight_hat = _rtn(weight * s, spec, group_size) / s  # Q(W diag(s)) diag(s)^-1: the layer on X
        errors.append(float((x @ (weight_hat - weight).T).square().sum()) / energy)  # ||X (Ŵ - W)^T||² / ...
    best = min(range(len(alphas)), key=errors.__getitem__)
    return ScaleSearch(alphas[best], _awq_scales(act_mean, alphas[best]), alphas, tuple(errors))


# --------------------------------------------------------------------------------------------------------
# The salient-channel experiment
# --------------------------------------------------------------------------------------------------------


def salient_channels(act_absmax: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Indices of the ``max(1, round(fraction * K))`` input channels with the largest activation magnitude
    (``act_absmax`` ``(K,)``, e.g. mean or max ``|x|`` per channel), largest first — AWQ's observation that
    keeping 1% of the weights in high precision, chosen by *activation*, recovers most of RTN's loss
    (Lin et al., 2024, Table 1). Chapter 11 compares them with a random 1% (``torch.randperm(K)[:k]``).

    >>> import torch
    >>> salient_channels(torch.tensor([0.1, 5.0, 0.3, 2.0]), 0.5).tolist()
    [1, 3]
    """
    act_absmax = _check_finite(act_absmax, "act_absmax", 1)
    fraction = _check_fraction(fraction)
    return _salient_channels(act_absmax, fraction)


def _salient_channels(act_absmax: torch.Tensor, fraction: float) -> torch.Tensor:
    """The math of :func:`salient_channels`: the top ``k`` channels by activation magnitude."""
    k = max(1, round(fraction * act_absmax.numel()))
    return act_absmax.topk(k).indices


def quantize_keeping(
    weight: torch.Tensor,
    keep: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    keep_bits: int | None = None,
) -> torch.Tensor:
    """RTN on ``weight`` ``(N, K)`` except the input columns ``keep`` (indices), which stay in float
    (``keep_bits=None``, the paper's FP16) or get their own ``keep_bits``-bit RTN per output channel (8) —
    the mixed-precision layer of AWQ's salient-channel experiment. The kept columns are zeroed before the
    group scales of the rest are chosen (a mixed-precision kernel stores them apart, so they do not stretch
    their group's grid).

    >>> import torch
    >>> w = torch.tensor([[0.1, -0.7, 0.35, 0.2]])
    >>> quantize_keeping(w, torch.tensor([1]), bits=3, group_size=None)   # -0.7 kept, the rest finer
    tensor([[ 0.1167, -0.7000,  0.3500,  0.2333]])
    """
    weight = _check_finite(weight, "weight", 2)
    if not isinstance(keep, torch.Tensor) or keep.is_floating_point() or keep.is_complex() or keep.ndim != 1:
        raise TypeError(f"keep must be a 1-D integer tensor of column indices, got {_describe(keep)}")
    K = weight.shape[1]
    if keep.dtype == torch.bool or ((keep < 0) | (keep >= K)).any():
        raise ValueError(f"keep must hold column indices in [0, {K}), got {keep.tolist()!r:.80}")
    spec, group_size = _check_weight_spec(bits, group_size, spec)
    keep_spec = None if keep_bits is None else _check_weight_spec(keep_bits, None, None)[0]
    return _quantize_keeping(weight.float(), keep, spec, group_size, keep_spec)


def _quantize_keeping(
    weight: torch.Tensor,
    keep: torch.Tensor,
    spec: QuantSpec,
    group_size: int | None,
    keep_spec: QuantSpec | None,
) -> torch.Tensor:
    """The math of :func:`quantize_keeping`: round the rest; keep the salient columns, or round them apart."""
    rest = weight.clone()
    rest[:, keep] = 0.0
    weight_hat = _rtn(rest, spec, group_size)  # (N, K)
    kept = weight[:, keep]  # (N, k)
    weight_hat[:, keep] = kept if keep_spec is None else _rtn(kept, keep_spec, None)
    return weight_hat


# --------------------------------------------------------------------------------------------------------
# The equivalence transform: scale the weights, put 1/s where the graph allows
# --------------------------------------------------------------------------------------------------------


class ScaledInput(nn.Module):
    """``linear(x / scale)``: the explicit division of AWQ's ``how="input"`` (and of SmoothQuant without a
    foldable LayerNorm); ``linear`` holds ``W diag(scale)``, so the pair computes ``W x``."""

    def __init__(self, linear: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x / self.scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"divides its {self.scale.numel()} input channels by AWQ's scales"


class ScaledActivation(nn.Module):
    """``act(x) / scale``: an elementwise activation (GELU) that also applies ``1/s`` for the layer it feeds
    (AutoAWQ's ``ScaledActivation``; AWQ's ``how="activation"``)."""

    def __init__(self, act: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"divides its {self.scale.numel()} outputs by AWQ's scales"


@dataclass(frozen=True)
class ScaleGroup:
    """Layers that read one input, and where the inverse of their common transform can go.

    ``linears``: names of the ``nn.Linear`` layers (same ``in_features``); ``how``: one of ``"layernorm"``,
    ``"linear"``, ``"activation"`` (then ``prev`` names the module producing their input) or ``"input"``
    (``prev`` is ``None``: an explicit :class:`ScaledInput` per layer). See the module docstring.
    """

    linears: tuple[str, ...]
    how: str = "input"
    prev: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.linears, str) or not isinstance(self.linears, tuple) or not self.linears:
            raise TypeError(f"linears must be a non-empty tuple of layer names, got {self.linears!r}")
        if self.how not in _HOWS:
            raise ValueError(f"how must be one of {_HOWS}, got {self.how!r}")
        if (self.prev is None) != (self.how == "input"):
            wanted = "None" if self.how == "input" else "the name of the module producing the input"
            raise ValueError(f"how={self.how!r} needs prev {wanted}, got {self.prev!r}")


@dataclass(frozen=True)
class Fold:
    """One equivalence transform ``W x = (W T)(T^-1 x)``, as applied to a model — chapters 5 and 11.

    ``linears``: the layers (names in the transformed model) whose weights became ``W T``; ``into``: the
    module(s) that apply ``T^-1`` to their input; ``how``: ``"layernorm"``, ``"linear"``, ``"activation"``,
    ``"input"`` (AWQ: ``T = diag(transform)``, the scales ``s``) or ``"hadamard"`` (:mod:`qbook.rotation`:
    ``T = diag(transform) H^T``, ``transform`` the random signs); ``alpha``: AWQ's exponent, if searched.
    """

    linears: tuple[str, ...]
    into: tuple[str, ...]
    how: str
    transform: torch.Tensor
    alpha: float | None = None


def bert_groups(model: nn.Module, prefix: str = "") -> list[ScaleGroup]:
    """The :class:`ScaleGroup` of every BERT-style layer (``attention.self.query/key/value``,
    ``attention.output.dense``, ``intermediate.dense`` + ``intermediate_act_fn``, ``output.dense``) in
    ``model``, found by attribute names (Hugging Face's BERT, hence MiniLM). Post-LayerNorm: Q/K/V and the
    intermediate dense read a LayerNorm that also feeds the residual, so they get ``how="input"``; the
    attention output dense folds into the value projection, the output dense into the GELU."""
    groups = []
    for name, m in model.named_modules(prefix=prefix):
        if not all(hasattr(m, a) for a in ("attention", "intermediate", "output")):
            continue
        p = f"{name}." if name else ""
        attention = f"{p}attention"
        groups += [
            ScaleGroup(tuple(f"{attention}.self.{n}" for n in ("query", "key", "value")), "input"),
            ScaleGroup((f"{attention}.output.dense",), "linear", f"{attention}.self.value"),
            ScaleGroup((f"{p}intermediate.dense",), "input"),
            ScaleGroup((f"{p}output.dense",), "activation", f"{p}intermediate.intermediate_act_fn"),
        ]
    return groups


def find_groups(model: nn.Module, skip: Iterable[str] = (), *, explicit: bool = True) -> list[ScaleGroup]:
    """AWQ's default grouping: :func:`bert_groups` for BERT-style layers, and every other ``nn.Linear`` alone
    with an explicit :class:`ScaledInput` (always valid). Layers in ``skip`` are left out (a folded group
    keeps them: their weight must absorb ``s`` too, but they are not quantized). ``explicit=False``: only the
    groups whose ``1/s`` folds into a neighbour (``"layernorm"``, ``"linear"``), or into an activation; the
    other layers get no scales (plain RTN in :func:`quantize_model`) and no extra work at run time."""
    if not isinstance(explicit, bool):
        raise TypeError(f"explicit must be a bool, got {explicit!r}")
    skip = set([skip] if isinstance(skip, str) else skip)
    groups = []
    for g in bert_groups(model):
        kept = tuple(n for n in g.linears if n not in skip)
        if g.how == "input" and kept:
            groups.append(ScaleGroup(kept, "input"))
        elif kept:
            groups.append(g)
    covered = {n for g in groups for n in g.linears} | skip
    groups += [
        ScaleGroup((name,))
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name not in covered
    ]
    return groups if explicit else [g for g in groups if g.how != "input"]


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no layer {name!r}") from None


def _linear(model: nn.Module, name: str) -> nn.Linear:
    m = _module(model, name)
    if not isinstance(m, nn.Linear):
        raise TypeError(f"layer {name!r} must be an nn.Linear, got {type(m).__name__}")
    return m


def _check_groups(model: nn.Module, groups: object) -> list[ScaleGroup]:
    if isinstance(groups, ScaleGroup) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a sequence of ScaleGroup, got {type(groups).__name__}")
    seen: set[str] = set()
    for g in groups:
        if not isinstance(g, ScaleGroup):
            raise TypeError(f"groups must hold ScaleGroup, got {type(g).__name__}")
        ks = {_linear(model, n).in_features for n in g.linears}
        if len(ks) != 1:
            raise ValueError(f"the layers {g.linears} share an input but have in_features {sorted(ks)}")
        twice = seen & set(g.linears)
        if twice:
            raise ValueError(f"layer(s) {sorted(twice)} appear in two groups")
        seen |= set(g.linears)
        (k,) = ks
        if g.how == "layernorm":
            ln = _module(model, g.prev)
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None or tuple(ln.normalized_shape) != (k,):
                raise ValueError(f"{g.prev!r} must be an affine nn.LayerNorm over {k} features, got {ln!r}")
        elif g.how == "linear":
            prev = _linear(model, g.prev)
            if prev.out_features != k:
                raise ValueError(
                    f"{g.prev!r} has {prev.out_features} outputs but {g.linears} read {k} inputs"
                )
        elif g.how == "activation":
            _module(model, g.prev)
    return list(groups)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def _apply_scales(model: nn.Module, groups: list[ScaleGroup], scales: list[torch.Tensor]) -> list[Fold]:
    """The math of :func:`apply_scales`: ``W <- W diag(s)`` and ``1/s`` into the previous operation."""
    for g, s in zip(groups, scales, strict=True):  # first the weights (a layer may be in two groups) ...
        for name in g.linears:
            _linear(model, name).weight.mul_(s)  # W diag(s): column j times s_j
        if g.how == "layernorm":
            ln = model.get_submodule(g.prev)
            ln.weight.div_(s)
            if ln.bias is not None:
                ln.bias.div_(s)
        elif g.how == "linear":
            prev = _linear(model, g.prev)
            prev.weight.div_(s[:, None])  # row j over s_j: its output channel j is divided by s_j
            if prev.bias is not None:
                prev.bias.div_(s)
    folds = []
    for g, s in zip(groups, scales, strict=True):  # ... then the modules that divide at run time
        if g.how == "activation":
            _set_submodule(model, g.prev, ScaledActivation(model.get_submodule(g.prev), s))
        elif g.how == "input":
            for name in g.linears:
                _set_submodule(model, name, ScaledInput(model.get_submodule(name), s))
            folds.append(Fold(tuple(f"{n}.linear" for n in g.linears), g.linears, "input", s))
            continue
        folds.append(Fold(g.linears, (g.prev,), g.how, s))
    return folds


def apply_scales(
    model: nn.Module,
    groups: Sequence[ScaleGroup],
    scales: Sequence[torch.Tensor],
    *,
    inplace: bool = False,
) -> tuple[nn.Module, list[Fold]]:
    """The equivalence transform ``W x = (W diag(s))(x / s)`` for every group: each layer's weight becomes
    ``W diag(s)`` and ``1/s`` goes where ``group.how`` says (module docstring), so the float model computes
    the same function (up to float rounding). Returns ``(model, folds)``: a copy (``inplace=False``) and one
    :class:`Fold` per group.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> nn = torch.nn
    >>> model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    >>> groups = [ScaleGroup(("1",), "layernorm", "0"), ScaleGroup(("3",), "activation", "2")]
    >>> s = [torch.tensor([1.0, 2, 4, 8]), torch.tensor([3.0, 1, 0.5])]
    >>> scaled, folds = apply_scales(model, groups, s)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(scaled(x), model(x), atol=1e-6), [f.how for f in folds]
    (True, ['layernorm', 'activation'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups = _check_groups(model, groups)
    if isinstance(scales, torch.Tensor) or not isinstance(scales, Sequence) or len(scales) != len(groups):
        raise ValueError(
            f"scales must be a sequence of one tensor per group ({len(groups)}), got {_describe(scales)}"
        )
    checked = []
    for g, s in zip(groups, scales, strict=True):
        k = _linear(model, g.linears[0]).in_features
        s = _check_finite(s, f"the scales of {g.linears}", 1)
        if s.shape != (k,) or (s <= 0).any():
            raise ValueError(
                f"the scales of {g.linears} must be positive with shape ({k},), got {tuple(s.shape)}"
            )
        checked.append(s.detach().float())
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    model = model if inplace else copy.deepcopy(model)
    return model, _apply_scales(model, groups, checked)


# --------------------------------------------------------------------------------------------------------
# Calibrate, search, apply, quantize
# --------------------------------------------------------------------------------------------------------


def _run_batches(
    model: nn.Module, batches: object, run: Callable[[nn.Module, object], object] | None
) -> None:
    """Run calibration data as :func:`qbook.ptq.calibrate` does (tensor, tuple, dict; or ``run``)."""
    with torch.no_grad():
        if callable(batches) and not isinstance(batches, nn.Module):
            try:
                batches()
            except Exception as e:
                raise ValueError(f"the calibration callable failed ({type(e).__name__}: {e})") from e
            return
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
            raise TypeError(f"batches must be an iterable of batches or a callable, got {_describe(batches)}")
        for i, batch in enumerate(batches):
            if run is not None:
                call = functools.partial(run, model, batch)
            elif isinstance(batch, torch.Tensor) or isinstance(batch, Mapping):
                call = functools.partial(model, batch)
            elif isinstance(batch, (tuple, list)):
                call = functools.partial(model, *batch)
            else:
                raise TypeError(
                    f"a batch must be a tensor, a tuple or a dict (or pass run=), got {_describe(batch)}"
                )
            try:
                call()
            except Exception as e:
                raise ValueError(
                    f"calibration batch {i} could not run through the model ({type(e).__name__}: {e}); the "
                    "batches must be the model's inputs (or pass run=)"
                ) from e


def _capture(model: nn.Module, names: set[str], batches: object, run: object) -> dict[str, torch.Tensor]:
    """Inputs ``(T, K)`` of the named layers over the calibration data: chapter 5's
    :func:`~qbook.outliers.capture_activations`, the batches run as :func:`qbook.ptq.calibrate` runs them."""
    if not names:
        return {}
    return capture_activations(
        model, lambda: _run_batches(model, batches, run), lambda name, _: name in names, stat="inputs"
    )


def transform(
    model: nn.Module,
    batches: Iterable[object] | Callable[[], object],
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    skip: Iterable[str] = (),
    groups: Sequence[ScaleGroup] | None = None,
    alphas: Sequence[float] = ALPHAS,
    run: Callable[[nn.Module, object], object] | None = None,
) -> tuple[nn.Module, list[Fold]]:
    """AWQ's float half: capture each group's input on ``batches`` (a tensor, tuple or dict per batch, as
    :func:`qbook.ptq.calibrate` takes them, or ``run(model, batch)``, or a callable that runs ``model``),
    :func:`search_scales` for the layers not in ``skip``, :func:`apply_scales`. Returns a transformed copy
    (same function in float) and its folds (``Fold.alpha``: the exponent found). Groups whose input the data
    never reach (a layer that never runs) get no scales and no fold (unlike :func:`qbook.gptq.quantize_model`,
    which refuses such layers); if the data reach no layer at all, a ``ValueError``. A layer used at several
    places (one module reachable under several names) is refused: it is scaled in place and wrapped by name.
    ``groups``: :func:`find_groups`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec, group_size = _check_weight_spec(bits, group_size, spec)
    alphas = _check_alphas(alphas)
    skip = set([skip] if isinstance(skip, str) else skip)
    unknown = sorted(skip - {n for n, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"skip names layers the model does not have: {unknown[:5]}")
    groups = _check_groups(model, find_groups(model, skip) if groups is None else groups)
    gptq._check_unshared(  # changed in place or replaced by name: a module used at two places would break
        model,
        [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
        + [n for g in groups for n in g.linears]
        + [g.prev for g in groups if g.how in ("layernorm", "linear")],
    )
    inputs = _capture(model, {g.linears[0] for g in groups}, batches, run)
    if groups and not inputs:
        raise ValueError(
            "AWQ needs calibration data, but no layer saw any input while the batches ran (empty batches?); "
            "pass batches=[...] of the model's inputs"
        )
    found, searches = [], []
    for g in groups:
        quantized = [n for n in g.linears if n not in skip]
        if g.linears[0] not in inputs or not quantized:
            continue
        weights = [_linear(model, n).weight for n in quantized]
        try:
            search = search_scales(
                inputs[g.linears[0]], weights, spec.bits, group_size, spec=spec, alphas=alphas
            )
        except (TypeError, ValueError) as e:
            raise type(e)(f"layers {g.linears}: {e}") from e
        found.append(g)
        searches.append(search)
    model, folds = apply_scales(model, found, [s.scale for s in searches])
    folds = [
        Fold(f.linears, f.into, f.how, f.transform, s.alpha) for f, s in zip(folds, searches, strict=True)
    ]
    return model, folds


def quantize_model(
    model: nn.Module,
    batches: Iterable[object] | Callable[[], object],
    bits: int = 4,
    group_size: int | None = 128,
    *,
    spec: QuantSpec | None = None,
    skip: Iterable[str] = (),
    groups: Sequence[ScaleGroup] | None = None,
    alphas: Sequence[float] = ALPHAS,
    run: Callable[[nn.Module, object], object] | None = None,
) -> nn.Module:
    """AWQ weight-only quantization (Lin et al., 2024) — chapter 11: :func:`transform`, then every covered
    ``nn.Linear`` (all of them but ``skip``) becomes a :class:`qbook.nn.WeightOnlyLinear` holding
    ``Q(W diag(s))`` (``bits``, ``group_size``, ``spec`` as in ``WeightOnlyLinear.from_float``). A layer
    scaled with ``how="input"`` sits inside a :class:`ScaledInput` (its name holds the wrapper, ``.linear``
    the quantized weight). Returns a copy; ``qbook.ptq.quantize_weights(..., method="awq")`` calls this.
    A layer that the calibration data never reach gets no scales: plain RTN.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> q = quantize_model(model, [torch.randn(32, 8)], bits=4, group_size=None)
    >>> [type(m).__name__ for m in q]
    ['ScaledInput', 'GELU', 'ScaledInput']
    >>> type(q[0].linear).__name__
    'WeightOnlyLinear'
    """
    from qbook.nn import WeightOnlyLinear  # chapter 7's module

    transformed, _ = transform(
        model, batches, bits, group_size, spec=spec, skip=skip, groups=groups, alphas=alphas, run=run
    )
    spec, group_size = _check_weight_spec(bits, group_size, spec)
    skip = set([skip] if isinstance(skip, str) else skip)
    for name, m in list(transformed.named_modules()):
        original = (
            name.removesuffix(".linear") if isinstance(_parent(transformed, name), ScaledInput) else name
        )
        if type(m) is nn.Linear and original not in skip:
            _set_submodule(
                transformed, name, WeightOnlyLinear.from_float(m, bits=bits, group_size=group_size, spec=spec)
            )
    return transformed.eval()


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent_name, dot, _ = name.rpartition(".")
    return model.get_submodule(parent_name) if dot else None
