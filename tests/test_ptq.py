"""Tests for qbook.ptq (the PTQ workflows, summary, sensitivity, save/load) and the digits data and CNN."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbook import ptq
from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec
from qbook.data import DIGITS_SPLITS, digits
from qbook.granularity import PerChannel, PerGroup, PerTensor
from qbook.models import DigitsCNN, digits_accuracy, train_digits_cnn
from qbook.nn import QuantConv2d, QuantLinear, WeightOnlyConv2d, WeightOnlyLinear
from qbook.observers import MinMaxObserver, PercentileObserver

BOTH = (nn.Linear, nn.Conv2d)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def batches(n: int = 4, seed: int = 1, shape: tuple[int, ...] = (8, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def cnn() -> DigitsCNN:
    return train_digits_cnn(seed=0)


# --------------------------------------------------------------------------------------------------------
# QuantConfig
# --------------------------------------------------------------------------------------------------------


def test_presets() -> None:
    assert [c.kind for c in ptq.PRESETS] == ["dynamic", "static", "weight-only", "weight-only"]
    assert [str(c) for c in ptq.PRESETS] == [
        "W8A8 dynamic",
        "W8A8 static",
        "W8 weight-only",
        "W4 g128 weight-only",
    ]
    assert ptq.W4_G128_WEIGHT_ONLY.group_size == 128 and ptq.W8_WEIGHT_ONLY.group_size is None
    assert (ptq.W4_G128_WEIGHT_ONLY.weight.qmin, ptq.W4_G128_WEIGHT_ONLY.weight.qmax) == (-7, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ptq.W8A8_STATIC.dynamic = True


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"activation": INT8, "dynamic": True}, "symmetric per token"),
        ({"activation": None, "dynamic": True}, "weight-only"),
        ({"weight": INT8}, "signed and symmetric"),
        ({"weight_granularity": PerGroup(1, 32)}, "PerChannel"),
        ({"activation": QuantSpec(16, True)}, "2..8-bit"),
        ({"activation": None, "weight_granularity": PerChannel(1)}, "PerGroup"),
    ],
)
def test_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ptq.QuantConfig(**kw)


def test_config_type_errors() -> None:
    with pytest.raises(TypeError):
        ptq.QuantConfig(weight="int8")
    with pytest.raises(TypeError):
        ptq.QuantConfig(observer=3)
    with pytest.raises(ValueError, match="PerChannel"):  # refused, not silently ignored
        ptq.QuantConfig(weight_granularity=PerTensor())


# --------------------------------------------------------------------------------------------------------
# Dynamic and weight-only
# --------------------------------------------------------------------------------------------------------


def test_quantize_dynamic_replaces_linears_and_leaves_the_model_alone() -> None:
    model = mlp()
    before = copy.deepcopy(model)
    q = ptq.quantize_dynamic(model)
    assert same_state(model, before) and all(type(m) is not QuantLinear for m in model.modules())
    assert [type(m).__name__ for m in q] == ["QuantLinear", "ReLU", "QuantLinear", "LayerNorm", "QuantLinear"]
    assert not q.training
    x = batches(1)[0]
    layers = [QuantLinear.from_float(model[i]) for i in (0, 2, 4)]
    with torch.no_grad():
        expected = layers[2](model[3](layers[1](model[1](layers[0](x)))))
    assert torch.equal(q(x), expected)
    assert (q(x) - model(x)).abs().max() < 0.05


def test_quantize_dynamic_inplace_skip_and_modules() -> None:
    model = mlp()
    q = ptq.quantize_dynamic(model, skip=["4"])
    assert type(q[4]) is nn.Linear and ptq.summary(q).float_layers == ["3", "4"]
    same = ptq.quantize_dynamic(model, inplace=True)
    assert same is model and type(model[0]) is QuantLinear
    cnn = DigitsCNN()
    assert type(ptq.quantize_dynamic(cnn).conv1) is nn.Conv2d
    assert type(ptq.quantize_dynamic(cnn, modules=BOTH).conv1) is QuantConv2d


def test_quantize_weights() -> None:
    model = mlp()
    q = ptq.quantize_weights(model, bits=4, group_size=8)
    assert all(type(q[i]) is WeightOnlyLinear and q[i].bits == 4 for i in (0, 2, 4))
    assert type(ptq.quantize_weights(DigitsCNN(), modules=BOTH).conv2) is WeightOnlyConv2d
    for method in ("gptq", "awq"):
        with pytest.raises(ValueError, match="needs calibration data"):
            ptq.quantize_weights(model, method=method)
    with pytest.raises(ValueError, match="method must be"):
        ptq.quantize_weights(model, method="nearest")
    with pytest.raises(ValueError, match="needs no data"):
        ptq.quantize_weights(model, batches=batches())


def test_wrong_config_for_the_workflow() -> None:
    with pytest.raises(ValueError, match="needs a dynamic config"):
        ptq.quantize_dynamic(mlp(), ptq.W8A8_STATIC)
    with pytest.raises(ValueError, match="needs a static config"):
        ptq.prepare(mlp(), ptq.W8A8_DYNAMIC)
    with pytest.raises(ValueError, match="calibration batches"):
        ptq.quantize(mlp(), ptq.W8A8_STATIC)


# --------------------------------------------------------------------------------------------------------
# Static: prepare -> calibrate -> convert
# --------------------------------------------------------------------------------------------------------


def test_static_workflow_matches_the_layer_built_by_hand() -> None:
    model = mlp()
    prepared = ptq.prepare(model)
    assert [type(m).__name__ for m in prepared] == ["Observed", "ReLU", "Observed", "LayerNorm", "Observed"]
    data = batches()
    assert ptq.calibrate(prepared, data, progress=False) is prepared
    q = ptq.convert(prepared)
    assert type(prepared[0]) is ptq.Observed  # convert copies
    observer = MinMaxObserver()
    for b in data:
        observer(b)
    by_hand = QuantLinear.from_float(model[0], activation="static", input_qparams=observer.qparams())
    x = batches(1, seed=9)[0]
    assert torch.equal(q[0](x), by_hand(x))
    assert (q(x) - model(x)).abs().max() < 0.1
    assert ptq.summary(q).quantized == ["0", "2", "4"]


def test_static_workflow_with_another_observer_and_one_call() -> None:
    config = dataclasses.replace(
        ptq.W8A8_STATIC,
        observer=functools.partial(PercentileObserver, percentile=99.0),
        name="W8A8 static p99",
    )
    q = ptq.quantize(mlp(), config, batches())
    assert type(q[0]) is QuantLinear and q[0].activation == "static"


def test_convert_before_calibrate_names_the_layers() -> None:
    with pytest.raises(ValueError, match=r"without statistics: '0', '2', '4'"):
        ptq.convert(ptq.prepare(mlp()))
    with pytest.raises(ValueError, match=r"no batches; layers without statistics: '0', '2', '4'"):
        ptq.calibrate(ptq.prepare(mlp()), [])


def test_layers_that_calibration_does_not_reach_are_named() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    prepared = ptq.prepare(TwoHeads())
    ptq.calibrate(prepared, batches(shape=(2, 4)))
    with pytest.raises(ValueError, match=r"without statistics: 'b'"):
        ptq.convert(prepared)


def test_calibration_errors_name_the_layer() -> None:
    prepared = ptq.prepare(mlp())
    bad = batches(1)[0]
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0': MinMaxObserver got 1 NaN"):
        ptq.calibrate(prepared, [bad])
    with pytest.raises(ValueError, match=r"layer '0' expects inputs \(\.\.\., 16\), got shape \(8, 12\)"):
        ptq.calibrate(ptq.prepare(mlp()), [torch.zeros(8, 12)])
    with pytest.raises(TypeError, match="not one tensor"):
        ptq.calibrate(ptq.prepare(mlp()), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="not prepared"):
        ptq.calibrate(mlp(), batches())
    with pytest.raises(ValueError, match="already converted"):
        ptq.convert(ptq.quantize_dynamic(mlp()))


def test_already_quantized_or_prepared_models_are_refused() -> None:
    q = ptq.quantize_dynamic(mlp())
    for call in (ptq.quantize_dynamic, ptq.prepare, ptq.quantize_weights):
        with pytest.raises(ValueError, match="already quantized"):
            call(q)
    with pytest.raises(ValueError, match="prepared"):
        ptq.quantize_dynamic(ptq.prepare(mlp()))


def test_non_float_models_are_refused() -> None:
    model = mlp()
    model[0].weight = nn.Parameter(torch.zeros(32, 16, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="layer '0' has a torch.int32 weight"):
        ptq.quantize_dynamic(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ptq.quantize_dynamic("model")
    with pytest.raises(ValueError, match="does not have"):
        ptq.quantize_dynamic(mlp(), skip=["nope"])
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d"):
        ptq.quantize_dynamic(mlp(), modules=(nn.LayerNorm,))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40).filter(lambda k: k != 16), st.integers(1, 5))
def test_calibration_shape_mismatch_is_a_value_error(k: int, rows: int) -> None:
    prepared = ptq.prepare(mlp())
    with pytest.raises(ValueError, match="layer '0' expects inputs"):
        ptq.calibrate(prepared, [torch.zeros(rows, k)])


def test_calibrate_with_run() -> None:
    prepared = ptq.prepare(mlp())
    seen = []
    ptq.calibrate(
        prepared, list(range(12)), progress=False, run=lambda m, i: seen.append(m(batches(1, seed=i)[0]))
    )
    assert len(seen) == 12 and prepared[0].observer.batches == 12


# --------------------------------------------------------------------------------------------------------
# Summary, sensitivity, save/load
# --------------------------------------------------------------------------------------------------------


def test_summary_lists_float_modules_and_true_bytes() -> None:
    model = mlp()
    q = ptq.quantize_dynamic(model, skip=["4"])
    s = ptq.summary(q)
    text = str(s)
    assert "0      QuantLinear  W8 per-channel sym, A8 per-token dyn" in text
    assert "3      LayerNorm    float32" in text
    assert s.float_layers == ["3", "4"]
    state_bytes = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert s.total_bytes == state_bytes
    assert s.quantized_bytes == (16 * 32 + 8 * 32) + (32 * 32 + 8 * 32)
    assert text.splitlines()[-1] == (
        f"quantized: 2 layers, {s.quantized_bytes:,} bytes; float: 2 modules, "
        f"{s.float_bytes:,} bytes; total {s.total_bytes:,} bytes"
    )
    assert "observing" in str(ptq.summary(ptq.prepare(mlp())))


def test_sensitivity_one_layer_at_a_time() -> None:
    model = mlp()
    x = batches(1, seed=5)[0]
    result = ptq.sensitivity(model, batches(), metric=lambda m: float(m(x).abs().mean()))
    assert [r.name for r in result.rows] == ["0", "2", "4"]
    assert all(20 < r.layer_sqnr_db < 80 and 20 < r.model_sqnr_db < 80 for r in result.rows)
    with torch.no_grad():
        assert result.baseline == pytest.approx(float(model(x).abs().mean()))
    last = result.rows[-1]
    assert last.layer_sqnr_db == pytest.approx(last.model_sqnr_db)  # the last layer's output is the model's
    assert sorted(result.worst(3)) == ["0", "2", "4"] and len(result.worst(1, by="metric")) == 1
    assert "one layer at a time" in str(result)
    static = ptq.sensitivity(model, batches(), config=ptq.W8A8_STATIC)
    assert all(r.metric is None for r in static.rows) and same_state(model, mlp())


def safetensors_header(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("config", ptq.PRESETS, ids=str)
def test_save_load_round_trip_is_exact(config: ptq.QuantConfig, cnn: DigitsCNN, tmp_path) -> None:
    q = ptq.quantize(cnn, config, [digits("calibration")[0]], modules=BOTH)
    path = str(tmp_path / "q.safetensors")
    size = ptq.save(q, path)
    assert size == os.path.getsize(path) == safetensors_header(path) + ptq.summary(q).total_bytes
    loaded = ptq.load(path, DigitsCNN())
    assert same_state(loaded, q)
    x = digits("test")[0]
    assert torch.equal(loaded(x), q(x))
    assert repr(loaded) == repr(q)


def test_save_load_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="call convert first"):
        ptq.save(ptq.prepare(mlp()), tmp_path / "x.safetensors")
    path = tmp_path / "m.safetensors"
    ptq.save(ptq.quantize_dynamic(mlp()), path)
    with pytest.raises(ValueError, match="does not exist"):
        ptq.load(path, nn.Sequential(nn.Linear(16, 32)))
    with pytest.raises(
        ValueError, match=r"layer '0': the file holds QuantLinear\(16→32, .*the model has Linear"
    ):
        ptq.load(
            path,
            nn.Sequential(
                nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 32), nn.LayerNorm(32), nn.Linear(32, 4)
            ),
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layers = json.loads(f.metadata()["qbook.modules"])
    assert layers["0"]["class"] == "QuantLinear"


# --------------------------------------------------------------------------------------------------------
# Digits and the CNN
# --------------------------------------------------------------------------------------------------------


def test_digits_split() -> None:
    parts = {name: digits(name) for name in DIGITS_SPLITS}
    assert {n: len(y) for n, (_, y) in parts.items()} == DIGITS_SPLITS
    x, _ = parts["train"]
    assert (
        x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and float(x.min()) == 0 and float(x.max()) == 1
    )
    pixels, y = digits("test", integer=True)
    assert pixels.dtype == torch.uint8 and int(pixels.max()) == 16
    assert torch.equal(pixels.float() / 16, parts["test"][0]) and torch.equal(y, parts["test"][1])
    rows = torch.cat([p[0].reshape(len(p[0]), -1) for p in parts.values()])
    assert len(rows) == 1797
    with pytest.raises(ValueError, match="split must be"):
        digits("validation")


def test_cnn_trains_deterministically_and_well(cnn: DigitsCNN) -> None:
    state = torch.get_rng_state()
    again = train_digits_cnn(seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert same_state(again, cnn)
    assert sum(p.numel() for p in cnn.parameters()) == 38_282
    assert digits_accuracy(cnn, *digits("test")) > 0.97
    assert not same_state(train_digits_cnn(seed=1, epochs=1), cnn)
    with pytest.raises(ValueError, match="epochs"):
        train_digits_cnn(epochs=0)


def test_ptq_keeps_the_cnn_accurate(cnn: DigitsCNN) -> None:
    x, y = digits("test")
    calibration = [digits("calibration")[0]]
    fp32 = digits_accuracy(cnn, x, y)
    for config in ptq.PRESETS:
        q = ptq.quantize(cnn, config, calibration, modules=BOTH)
        drop = 0.004 if config.weight.bits == 8 else 0.05  # 2 of 500 test images; int4 loses more
        assert abs(digits_accuracy(q, x, y) - fp32) <= drop, config


def test_qbook_exposes_the_modules() -> None:
    import qbook.nn
    import qbook.ptq

    assert qbook.ptq is ptq and qbook.nn.QuantLinear is QuantLinear
    assert INT8_SYMMETRIC.qmax == 127
