"""Post-training quantization of whole networks (训练后量化, PTQ) — chapter 7.

Three workflows, all on a copy of the model unless ``inplace=True`` (the caller's model is never changed
otherwise), all replacing covered modules by the integer modules of :mod:`qbook.nn`:

* **dynamic** (动态量化): :func:`quantize_dynamic` — weights quantized now, activations per token at run time;
  no data needed;
* **static** (静态量化): :func:`prepare` (observers on the inputs of the covered modules) →
  :func:`calibrate` (run unlabeled batches that look like inference data) → :func:`convert` (fixed input
  grids, int32 biases);
* **weight-only**: :func:`quantize_weights` — int8 or packed int4 weights, float activations.

:func:`quantize` runs whichever a :class:`QuantConfig` asks for. :func:`summary` lists what is quantized, what
stayed float and the true bytes; :func:`sensitivity` quantizes one layer at a time to find the layers that
hurt; :func:`save`/:func:`load` write and read a quantized model through safetensors, exactly.

>>> import torch
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> q = quantize_dynamic(model)
>>> q
Sequential(
  (0): QuantLinear(16→32, W8 per-channel sym, A8 per-token dyn)
  (1): ReLU()
  (2): QuantLinear(32→4, W8 per-channel sym, A8 per-token dyn)
)
>>> x = torch.randn(8, 16)
>>> bool((q(x) - model(x)).abs().max() < 0.02)
True
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec
from qbook.granularity import Granularity, PerChannel, PerGroup
from qbook.nn import MODULES, QuantConv2d, QuantLinear, QuantModule, WeightOnlyConv2d, WeightOnlyLinear
from qbook.observers import MinMaxObserver, Observer

__all__ = [
    "PRESETS",
    "W2A8_STATIC",
    "W3A3_STATIC",
    "W4A4_STATIC",
    "W4_G128_WEIGHT_ONLY",
    "W8A8_DYNAMIC",
    "W8A8_STATIC",
    "W8_WEIGHT_ONLY",
    "LayerSensitivity",
    "Observed",
    "QuantConfig",
    "Sensitivity",
    "Summary",
    "calibrate",
    "convert",
    "load",
    "prepare",
    "quantize",
    "quantize_dynamic",
    "quantize_weights",
    "save",
    "sensitivity",
    "summary",
]

#: int4, symmetric, narrow range [-7, 7]: the default 4-bit weight grid.
INT4_SYMMETRIC = QuantSpec(4, True, narrow_range=True, symmetric=True)


# --------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (量化对象) — chapter 7.

    * ``weight`` / ``weight_granularity``: the weight grid and who shares a scale. With activations (W8A8,
      or fewer bits such as W4A4 for chapter 8's QAT) the grid is 2..8-bit signed symmetric, ``PerChannel(0)``
      (one scale per output channel: the integer modules of :mod:`qbook.nn` store per-channel weight scales,
      so ``PerTensor()`` is refused rather than ignored); weight-only configs take 2..8 bits per channel or
      ``PerGroup(1, g)``.
    * ``activation``: the input grid (2..8 bits; codes of fewer than 8 bits are still stored and multiplied
      as int8/uint8), or ``None`` for weight-only quantization.
    * ``dynamic``: quantize inputs at run time, one symmetric scale per token (row); else (static) one
      scale and zero point per tensor from calibration, chosen by ``observer`` (a class or factory from
      :mod:`qbook.observers`, called as ``observer(spec=activation)``).
    * ``name``: how tables print it.
    """

    weight: QuantSpec = INT8_SYMMETRIC
    weight_granularity: Granularity = field(default_factory=lambda: PerChannel(0))
    activation: QuantSpec | None = INT8
    dynamic: bool = False
    observer: Callable[..., Observer] = MinMaxObserver
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantSpec):
            raise TypeError(f"weight must be a QuantSpec, got {self.weight!r}")
        if self.activation is not None and not isinstance(self.activation, QuantSpec):
            raise TypeError(f"activation must be a QuantSpec or None, got {self.activation!r}")
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {self.dynamic!r}")
        if not callable(self.observer):
            raise TypeError(f"observer must be an observer class or factory, got {self.observer!r}")
        g = self.weight_granularity
        if self.activation is None:
            if self.dynamic:
                raise ValueError(
                    "dynamic=True quantizes activations; a weight-only config has activation=None"
                )
            if not (g == PerChannel(0) or (isinstance(g, PerGroup) and g.axis in (1, -1))):
                raise ValueError(
                    f"weight-only granularity must be PerChannel(0) or PerGroup(1, g), got {g!r}"
                )
            if not 2 <= self.weight.bits <= 8:
                raise ValueError(f"weight-only weights take 2..8 bits, got {self.weight}")
            return
        if not (2 <= self.weight.bits <= 8 and 2 <= self.activation.bits <= 8):
            raise ValueError(
                f"integer matmuls take 2..8-bit weights and activations, got {self.weight}, {self.activation}"
            )
        if not (self.weight.symmetric and self.weight.signed):
            raise ValueError(f"the weight grid must be signed and symmetric, got {self.weight}")
        if g != PerChannel(0):
            raise ValueError(
                "weight granularity with activations must be PerChannel(0) (qbook.nn's integer modules keep "
                f"one weight scale per output channel), got {g!r}"
            )
        if self.dynamic and not self.activation.symmetric:
            raise ValueError(f"dynamic activations are symmetric per token, got {self.activation}")

    @property
    def kind(self) -> str:
        """``"dynamic"``, ``"static"`` or ``"weight-only"``."""
        if self.activation is None:
            return "weight-only"
        return "dynamic" if self.dynamic else "static"

    @property
    def group_size(self) -> int | None:
        g = self.weight_granularity
        return g.group_size if isinstance(g, PerGroup) else None

    def __str__(self) -> str:
        return self.name or repr(self)


W8A8_DYNAMIC = QuantConfig(INT8_SYMMETRIC, PerChannel(0), INT8_SYMMETRIC, dynamic=True, name="W8A8 dynamic")
W8A8_STATIC = QuantConfig(INT8_SYMMETRIC, PerChannel(0), INT8, dynamic=False, name="W8A8 static")
#: Low-bit static configs (chapter 8): symmetric narrow-range weights, affine per-tensor activations.
W4A4_STATIC = QuantConfig(INT4_SYMMETRIC, PerChannel(0), QuantSpec(4, True), name="W4A4 static")
W2A8_STATIC = QuantConfig(QuantSpec(2, True, True, True), PerChannel(0), INT8, name="W2A8 static")
W3A3_STATIC = QuantConfig(
    QuantSpec(3, True, True, True), PerChannel(0), QuantSpec(3, True), name="W3A3 static"
)
W8_WEIGHT_ONLY = QuantConfig(INT8_SYMMETRIC, PerChannel(0), None, name="W8 weight-only")
W4_G128_WEIGHT_ONLY = QuantConfig(INT4_SYMMETRIC, PerGroup(1, 128), None, name="W4 g128 weight-only")
PRESETS: tuple[QuantConfig, ...] = (W8A8_DYNAMIC, W8A8_STATIC, W8_WEIGHT_ONLY, W4_G128_WEIGHT_ONLY)


# --------------------------------------------------------------------------------------------------------
# Finding the modules to replace
# --------------------------------------------------------------------------------------------------------

_DEFAULT_MODULES = (nn.Linear,)
_SUPPORTED = (nn.Linear, nn.Conv2d)


def _check_model(model: object, inplace: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    quantized = [name for name, m in model.named_modules() if isinstance(m, (QuantModule, Observed))]
    if quantized:
        what = (
            "prepared (call convert)"
            if any(isinstance(model.get_submodule(n), Observed) for n in quantized)
            else "already quantized"
        )
        raise ValueError(f"the model is {what}: {_names(quantized)}; quantize a float model")
    return model


def _names(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_modules(modules: object) -> tuple[type, ...]:
    if isinstance(modules, type):
        modules = (modules,)
    if not isinstance(modules, (tuple, list)) or not modules or not all(isinstance(m, type) for m in modules):
        raise TypeError(f"modules must be a tuple of module classes, got {modules!r}")
    bad = [m.__name__ for m in modules if m not in _SUPPORTED]
    if bad:
        raise ValueError(f"qbook quantizes nn.Linear and nn.Conv2d, got {bad}")
    return tuple(modules)


def _targets(model: nn.Module, modules: tuple[type, ...], skip: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of a covered type (exactly) not named in ``skip``; all float."""
    skip = set([skip] if isinstance(skip, str) else skip)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"skip names layers the model does not have: {_names(unknown)}")
    found = [(name, m) for name, m in model.named_modules() if type(m) in modules and name not in skip]
    for name, m in found:
        if not m.weight.is_floating_point():
            raise TypeError(f"layer {name!r} has a {m.weight.dtype} weight; PTQ starts from a float model")
    return found


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    return model


def _replace(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    make: Callable[[str, nn.Module], nn.Module],
) -> nn.Module:
    for name, _ in targets:
        module = model.get_submodule(name) if name else model  # the copy's module, not the caller's
        try:
            new = make(name, module)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {name!r}: {e}") from e
        model = _set_submodule(model, name, new)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Dynamic and weight-only quantization
# --------------------------------------------------------------------------------------------------------


def _dynamic_module(module: nn.Module, config: QuantConfig) -> QuantModule:
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    return cls.from_float(module, activation="dynamic", act_spec=config.activation, weight_spec=config.weight)


def quantize_dynamic(
    model: nn.Module,
    config: QuantConfig = W8A8_DYNAMIC,
    *,
    modules: tuple[type, ...] = _DEFAULT_MODULES,
    skip: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Dynamic PTQ (动态量化): every ``modules`` layer (exact type; default ``nn.Linear``) not named in
    ``skip`` becomes a :class:`~qbook.nn.QuantLinear` / :class:`~qbook.nn.QuantConv2d` with int8 weights
    (quantized now) and inputs quantized per token at run time. No data needed.

    Returns a quantized copy in eval mode (``inplace=True``: the model itself, changed). Raises ``ValueError``
    for a static or weight-only ``config`` and for a model that is already quantized or prepared.
    """
    _check_config(config, "dynamic", "quantize_dynamic")
    _check_model(model, inplace)
    targets = _targets(model, _check_modules(modules), skip)
    return _replace(_copy(model, inplace), targets, lambda name, m: _dynamic_module(m, config))


def _check_config(config: object, kind: str, who: str) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.kind != kind:
        hint = {
            "dynamic": "quantize_dynamic",
            "static": "prepare/calibrate/convert",
            "weight-only": "quantize_weights",
        }[config.kind]
        raise ValueError(
            f"{who} needs a {kind} config, got {config} ({config.kind}: use {hint}, or quantize)"
        )
    return config


def quantize_weights(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 128,
    method: str = "rtn",
    batches: Iterable[Any] | None = None,
    *,
    modules: tuple[type, ...] = _DEFAULT_MODULES,
    skip: Iterable[str] = (),
    spec: QuantSpec | None = None,
    inplace: bool = False,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Weight-only PTQ: covered layers become :class:`~qbook.nn.WeightOnlyLinear` (or ``WeightOnlyConv2d``)
    with ``bits``-bit symmetric codes (packed below 8 bits), one scale per group of ``group_size`` inputs
    (``None``: per output channel; a ``K`` that ``group_size`` does not divide is padded with zero codes).

    ``method`` chooses the codes:

    * ``"rtn"``: round to nearest (chapter 7); no data;
    * ``"gptq"``: GPTQ (chapter 11, :func:`qbook.gptq.quantize_model`): second-order rounding from the
      layers' inputs on the calibration ``batches``, layer after layer;
    * ``"awq"``: AWQ (chapter 11, :func:`qbook.awq.quantize_model`): per-input-channel scales from the
      activations on ``batches``, folded into the model, then round to nearest (returns a transformed copy;
      layers whose input is divided explicitly sit inside an ``awq.ScaledInput``).

    ``batches`` are run as :func:`calibrate` runs them (or by ``run(model, batch)``); GPTQ and AWQ quantize
    ``nn.Linear`` only. Returns a copy unless ``inplace=True`` (``rtn`` and ``gptq``).
    """
    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(
            f"method must be 'rtn' (round to nearest), 'gptq' or 'awq' (chapter 11), got {method!r}"
        )
    if method != "rtn":
        return _quantize_weights_with_data(model, bits, group_size, method, batches, modules, skip, spec,
                                           inplace, run)
    if batches is not None or run is not None:
        raise ValueError("method='rtn' needs no data; batches are for chapter 11's methods")
    _check_model(model, inplace)
    targets = _targets(model, _check_modules(modules), skip)

    def make(name: str, module: nn.Module) -> QuantModule:
        cls = WeightOnlyLinear if isinstance(module, nn.Linear) else WeightOnlyConv2d
        return cls.from_float(module, bits=bits, group_size=group_size, spec=spec)

    return _replace(_copy(model, inplace), targets, make)


def _quantize_weights_with_data(
    model: nn.Module,
    bits: int,
    group_size: int | None,
    method: str,
    batches: Iterable[Any] | None,
    modules: tuple[type, ...],
    skip: Iterable[str],
    spec: QuantSpec | None,
    inplace: bool,
    run: Callable[[nn.Module, Any], Any] | None,
) -> nn.Module:
    """:func:`quantize_weights` with ``method="gptq"`` or ``"awq"`` (chapter 11)."""
    if batches is None:
        raise ValueError(
            f"method={method!r} needs calibration data (chapter 11): pass batches=[...] of inputs, as for "
            "calibrate(); method='rtn' needs none"
        )
    _check_model(model, inplace)
    if _check_modules(modules) != (nn.Linear,):
        raise ValueError(f"method={method!r} quantizes nn.Linear layers only, got modules={modules!r}")
    if method == "gptq":
        from qbook import gptq

        return gptq.quantize_model(
            model, batches, bits, group_size, spec=spec, skip=skip, run=run, inplace=inplace
        )
    if inplace:
        raise ValueError("method='awq' returns a transformed copy of the model; inplace=True is unsupported")
    from qbook import awq

    return awq.quantize_model(model, batches, bits, group_size, spec=spec, skip=skip, run=run)


# --------------------------------------------------------------------------------------------------------
# Static quantization: prepare -> calibrate -> convert
# --------------------------------------------------------------------------------------------------------


class Observed(nn.Module):
    """A float module whose inputs an observer watches (what :func:`prepare` inserts). It computes exactly
    like the module; :func:`convert` replaces it by the integer module."""

    def __init__(self, module: nn.Module, observer: Observer, name: str, config: QuantConfig) -> None:
        super().__init__()
        self.module = module
        self.observer = observer
        self.layer_name = name
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        try:
            self.observer.observe(x)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {self.layer_name!r}: {e}") from e
        return self.module(x)

    def _check(self, x: object) -> None:
        m = self.module
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"layer {self.layer_name!r} takes floating-point inputs, got {got}")
        if isinstance(m, nn.Linear) and (x.ndim == 0 or x.shape[-1] != m.in_features):
            raise ValueError(
                f"layer {self.layer_name!r} expects inputs (..., {m.in_features}), got shape {tuple(x.shape)}"
            )
        if isinstance(m, nn.Conv2d) and (x.ndim != 4 or x.shape[1] != m.in_channels):
            raise ValueError(
                f"layer {self.layer_name!r} expects inputs (B, {m.in_channels}, H, W), got shape "
                f"{tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        observer = getattr(self.config.observer, "func", self.config.observer)
        return f"observer={getattr(observer, '__name__', observer)}, batches={self.observer.batches}"


def prepare(
    model: nn.Module,
    config: QuantConfig = W8A8_STATIC,
    *,
    modules: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    skip: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Static PTQ, step 1: wrap every covered layer in an :class:`Observed` that records its inputs with
    ``config.observer``. Returns a copy in eval mode (``inplace=True``: the model itself)."""
    _check_config(config, "static", "prepare")
    _check_model(model, inplace)
    targets = _targets(model, _check_modules(modules), skip)
    return _replace(
        _copy(model, inplace),
        targets,
        lambda name, m: Observed(m, config.observer(spec=config.activation), name, config),
    )


def _observed(model: nn.Module, who: str) -> list[Observed]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, Observed)]
    if not found:
        quantized = any(isinstance(m, QuantModule) for m in model.modules())
        raise ValueError(
            f"{who} needs a model from prepare(); this one is "
            + ("already converted" if quantized else "not prepared (no observers)")
        )
    return found


def _run(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any] | None) -> Any:
    if run is not None:
        return run(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(batch)
    raise TypeError(
        f"a batch must be a tensor, a tuple of model arguments or a dict (or pass run=), got "
        f"{type(batch).__name__}"
    )


def _progress(batches: Iterable[Any], progress: bool | None, what: str) -> Iterable[Any]:
    if progress is None:
        progress = isinstance(batches, Sequence) and len(batches) > 10
    if not progress:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=what, leave=False)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    progress: bool | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Static PTQ, step 2 (校准): run ``batches`` of unlabeled inputs through a prepared model, under
    ``torch.no_grad()``, so its observers see them. Returns ``model`` (its observers updated).

    A batch is a tensor (``model(batch)``), a tuple (``model(*batch)``) or a dict (``model(batch)``, as a
    sentence-transformers model takes it); or pass ``run(model, batch)``. ``progress``: a tqdm bar (``None``:
    when there are more than 10 batches; ``False`` in notebooks). No batches at all is a ``ValueError``
    naming the layers left without statistics, as is a NaN (with its layer).
    """
    observed = _observed(model, "calibrate")
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of batches (e.g. a list of tensors), not one tensor")
    count = 0
    with torch.no_grad():
        for batch in _progress(batches, progress, "calibrating"):
            _run(model, batch, run)
            count += 1
    if count == 0:
        raise ValueError(
            "calibrate got no batches; layers without statistics: "
            + _names([m.layer_name for m in observed if m.observer.batches == 0])
        )
    return model


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Static PTQ, step 3: every :class:`Observed` layer becomes a :class:`~qbook.nn.QuantLinear` /
    :class:`~qbook.nn.QuantConv2d` with its calibrated per-tensor input grid and an int32 bias. Outputs are
    dequantized to float (the next operator may be float: ReLU, LayerNorm, softmax).

    Raises ``ValueError`` naming the layers whose observers saw no data. Returns a copy unless ``inplace``.
    """
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    _observed(model, "convert")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Observed)]
    empty = [n for n, m in found if m.observer.batches == 0]
    if empty:
        raise ValueError(
            f"convert before calibrate: layers without statistics: {_names(empty)}; run "
            "calibrate(model, batches) with batches that reach them"
        )

    def make(name: str, observed: nn.Module) -> QuantModule:
        m, config = observed.module, observed.config
        cls = QuantLinear if isinstance(m, nn.Linear) else QuantConv2d
        return cls.from_float(
            m,
            activation="static",
            act_spec=config.activation,
            weight_spec=config.weight,
            input_qparams=observed.observer.qparams(),
        )

    return _replace(_copy(model, inplace), found, make)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any] | None = None,
    *,
    modules: tuple[type, ...] | None = None,
    skip: Iterable[str] = (),
    progress: bool | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Any config in one call: dynamic (:func:`quantize_dynamic`), static (:func:`prepare`, :func:`calibrate`
    on ``batches``, :func:`convert`) or weight-only (:func:`quantize_weights`, round to nearest). ``modules``
    defaults to each function's default."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    kw: dict[str, Any] = {"skip": skip, "inplace": inplace}
    if modules is not None:
        kw["modules"] = modules
    if config.kind == "dynamic":
        return quantize_dynamic(model, config, **kw)
    if config.kind == "weight-only":
        return quantize_weights(model, config.weight.bits, config.group_size, spec=config.weight, **kw)
    if batches is None:
        raise ValueError(f"{config} is static: it needs calibration batches")
    prepared = prepare(model, config, **kw)
    calibrate(prepared, batches, progress=progress, run=run)
    return convert(prepared, inplace=True)


# --------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.data_ptr() - t.untyped_storage().data_ptr())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class SummaryRow:
    name: str
    kind: str
    scheme: str
    nbytes: int
    quantized: bool


@dataclass(frozen=True)
class Summary:
    """What :func:`summary` returns; ``str()`` is a table: one row per module that holds tensors."""

    rows: tuple[SummaryRow, ...]

    @property
    def quantized(self) -> list[str]:
        return [r.name for r in self.rows if r.quantized]

    @property
    def float_layers(self) -> list[str]:
        """Modules that kept float parameters (not covered by the config, or skipped)."""
        return [r.name for r in self.rows if not r.quantized]

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.quantized)

    @property
    def float_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if not r.quantized)

    @property
    def total_bytes(self) -> int:
        """The whole state dict's bytes (what :func:`save` writes, headers aside)."""
        return self.quantized_bytes + self.float_bytes

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        kinds = max([len(r.kind) for r in self.rows] + [6])
        lines = [f"{'layer':<{width}}  {'module':<{kinds}}  {'scheme':<44}  {'bytes':>11}"]
        lines += [f"{r.name:<{width}}  {r.kind:<{kinds}}  {r.scheme:<44}  {r.nbytes:>11,}" for r in self.rows]
        lines.append(
            f"quantized: {len(self.quantized)} layers, {self.quantized_bytes:,} bytes; "
            f"float: {len(self.float_layers)} modules, {self.float_bytes:,} bytes; "
            f"total {self.total_bytes:,} bytes"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def summary(model: nn.Module) -> Summary:
    """Every module that holds tensors: quantized (scheme, true bytes) or float (dtype, bytes).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> print(summary(quantize_dynamic(model)))
    layer  module       scheme                                              bytes
    0      QuantLinear  W8 per-channel sym, A8 per-token dyn                   96
    1      LayerNorm    float32                                                64
    quantized: 1 layers, 96 bytes; float: 1 modules, 64 bytes; total 160 bytes
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rows = []
    inside: list[str] = []  # names of quantized/observed modules: their children are theirs
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, QuantModule):
            inside.append(name)
            rows.append(SummaryRow(name, type(m).__name__, m.scheme, m.nbytes, True))
            continue
        if isinstance(m, Observed):
            inside.append(name)
            scheme = f"observing ({m.extra_repr()})"
            rows.append(
                SummaryRow(
                    name,
                    type(m.module).__name__,
                    scheme,
                    _tensor_bytes(m.module.state_dict().values()),
                    False,
                )
            )
            continue
        own = list(m.named_parameters(recurse=False)) + [
            (n, b) for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set
        ]
        if own:
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for _, t in own})
            rows.append(
                SummaryRow(name, type(m).__name__, ", ".join(dtypes), _tensor_bytes(t for _, t in own), False)
            )
    return Summary(tuple(rows))


# --------------------------------------------------------------------------------------------------------
# Sensitivity: one layer at a time
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    layer_sqnr_db: float  # the layer's own output, quantized vs float, on the same (float) inputs
    model_sqnr_db: float  # the model's output with only this layer quantized vs the float model
    metric: float | None  # metric(model) with only this layer quantized


@dataclass(frozen=True)
class Sensitivity:
    """What :func:`sensitivity` returns: the float model's ``baseline`` metric and one row per layer."""

    config: QuantConfig
    baseline: float | None
    rows: tuple[LayerSensitivity, ...]

    def worst(self, k: int = 5, by: str = "model_sqnr_db") -> list[str]:
        """The ``k`` layers that hurt most: lowest SQNR, or lowest ``metric`` (``by="metric"``)."""
        if by not in ("model_sqnr_db", "layer_sqnr_db", "metric"):
            raise ValueError(f"by must be 'model_sqnr_db', 'layer_sqnr_db' or 'metric', got {by!r}")
        return [r.name for r in sorted(self.rows, key=lambda r: getattr(r, by))[:k]]

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        head = f"{'layer':<{width}}  {'layer SQNR dB':>13}  {'model SQNR dB':>13}  {'metric':>9}"
        lines = [
            f"{self.config}, one layer at a time; float metric: "
            + ("-" if self.baseline is None else f"{self.baseline:.4f}"),
            head,
        ]
        for r in self.rows:
            metric = "-" if r.metric is None else f"{r.metric:.4f}"
            lines.append(
                f"{r.name:<{width}}  {r.layer_sqnr_db:>13.2f}  {r.model_sqnr_db:>13.2f}  {metric:>9}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor to compare in a model's output: itself, the first of a tuple, or a dict's
    ``"sentence_embedding"`` (else its first tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "sentence_embedding" in out:
            return out["sentence_embedding"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
    raise TypeError(f"cannot find a float tensor in the model's output of type {type(out).__name__}")


def _sqnr(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    metric: Callable[[nn.Module], float] | None = None,
    config: QuantConfig = W8A8_DYNAMIC,
    *,
    modules: tuple[type, ...] | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = False,
) -> Sensitivity:
    """Quantize one covered layer at a time with ``config`` (all others float) and measure, per layer:

    * ``layer_sqnr_db``: SQNR of the layer's output against the float layer on the same inputs, over
      ``batches``;
    * ``model_sqnr_db``: SQNR of the model's output (:func:`_output_tensor`) against the float model's;
    * ``metric``: ``metric(model)`` with that one layer quantized (e.g. test accuracy), if given.

    Static configs are calibrated on ``batches``. The caller's model is not changed.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_model(model, False)
    batches = list(batches)
    if not batches:
        raise ValueError("sensitivity needs at least one batch")
    work = copy.deepcopy(model).eval()
    covered = _check_modules(modules or (_DEFAULT_MODULES if config.kind != "static" else _SUPPORTED))
    names = [name for name, _ in _targets(work, covered, ())]
    with torch.no_grad():
        reference = [_output_tensor(_run(work, b, run)).detach().double() for b in batches]
    with torch.no_grad():
        baseline = None if metric is None else float(metric(work))
    rows = []
    for name in _progress(names, progress, "sensitivity"):
        original = work.get_submodule(name)
        single = (
            quantize(
                _Single(original),
                config,
                [None],
                modules=(type(original),),
                inplace=False,
                progress=False,
                run=_calibrate_single(work, name, batches, run),
            )
            if config.kind == "static"
            else quantize(_Single(original), config, modules=(type(original),))
        )
        quantized = single.layer
        energy = [0.0, 0.0]

        def hook(
            module: nn.Module,
            args: tuple,
            out: torch.Tensor,
            original: nn.Module = original,
            energy: list = energy,
        ) -> None:
            ref = original(*args).double()
            energy[0] += float((ref**2).sum())
            energy[1] += float(((ref - out.double()) ** 2).sum())

        handle = quantized.register_forward_hook(hook)
        _set_submodule(work, name, quantized)
        try:
            signal = noise = 0.0
            with torch.no_grad():
                for b, ref in zip(batches, reference, strict=True):
                    out = _output_tensor(_run(work, b, run)).double()
                    signal += float((ref**2).sum())
                    noise += float(((ref - out) ** 2).sum())
            handle.remove()
            with torch.no_grad():
                value = None if metric is None else float(metric(work))
        finally:
            handle.remove()
            _set_submodule(work, name, original)
        rows.append(LayerSensitivity(name, _sqnr(*energy), _sqnr(signal, noise), value))
    return Sensitivity(config, baseline, tuple(rows))


class _Single(nn.Module):
    """One layer as a model of its own (so the quantize functions can replace it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _calibrate_single(
    work: nn.Module, name: str, batches: list[Any], run: Callable[[nn.Module, Any], Any] | None
) -> Callable[[nn.Module, Any], None]:
    """A ``run`` for :func:`calibrate` that feeds the prepared single layer the inputs that layer ``name``
    sees when ``batches`` go through the float model ``work``."""

    def calibrate_one(prepared: nn.Module, _: Any) -> None:
        observed = prepared.layer

        def feed(module: nn.Module, args: tuple) -> None:
            observed(*args)

        handle = work.get_submodule(name).register_forward_pre_hook(feed)
        try:
            for b in batches:
                _run(work, b, run)
        finally:
            handle.remove()

    return calibrate_one


# --------------------------------------------------------------------------------------------------------
# Save and load (safetensors)
# --------------------------------------------------------------------------------------------------------

_METADATA_KEY = "qbook.modules"


def save(model: nn.Module, path: str | os.PathLike) -> int:
    """Write a quantized (or float) model's state dict to ``path`` with safetensors: integer codes as
    integers, scales as float32 — exactly. Which layers are quantized, and how, goes into the file's metadata
    so :func:`load` can rebuild them. Returns the file's size in bytes (the tensors' bytes plus a small
    JSON header)."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    observed = [n for n, m in model.named_modules() if isinstance(m, Observed)]
    if observed:
        raise ValueError(f"the model is prepared, not converted ({_names(observed)}); call convert first")
    layers = {
        name: {"class": type(m).__name__, "args": m.init_args}
        for name, m in model.named_modules()
        if isinstance(m, QuantModule)
    }
    save_model(model, os.fspath(path), metadata={_METADATA_KEY: json.dumps(layers)})
    return os.path.getsize(path)


def _spec(value: Any) -> Any:
    return QuantSpec(*value) if isinstance(value, list) and len(value) == 4 else value


def _same_shape(original: nn.Module, module: QuantModule) -> bool:
    """Whether the float layer ``original`` is the one ``module`` was made from (type and shape)."""
    if isinstance(module, (QuantLinear, WeightOnlyLinear)):
        return type(original) is nn.Linear and (original.in_features, original.out_features) == (
            module.in_features,
            module.out_features,
        )
    return (
        type(original) is nn.Conv2d
        and (original.in_channels, original.out_channels) == (module.in_channels, module.out_channels)
        and tuple(original.kernel_size) == module.kernel_size
    )


def load(path: str | os.PathLike, model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Read a file written by :func:`save` into the architecture ``model`` (the float model, e.g. freshly
    constructed or loaded): the layers recorded as quantized are rebuilt empty and every tensor is loaded,
    strictly (a missing or unexpected key, or a shape mismatch, is an error). Returns a copy unless
    ``inplace``."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    _check_model(model, inplace)
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    layers = json.loads(metadata.get(_METADATA_KEY, "{}"))
    result = _copy(model, inplace)
    for name, entry in layers.items():
        cls = MODULES.get(entry["class"])
        if cls is None:
            raise ValueError(f"{path}: layer {name!r} has unknown class {entry['class']!r}")
        try:
            original = result.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} does not exist in the given model") from None
        module = cls(**{k: _spec(v) for k, v in entry["args"].items()})
        if not _same_shape(original, module):
            raise ValueError(f"{path}: layer {name!r}: the file holds {module!r}, the model has {original!r}")
        result = _set_submodule(result, name, module)
    load_model(result, os.fspath(path), strict=True)
    return result.eval()
