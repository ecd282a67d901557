"""qbook.export: ONNX export of chapter 7's integer modules, checked against qbook itself, onnxruntime and
ONNX's reference evaluator (an independent executable specification)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from qbook import export, ptq
from qbook.affine import INT8, INT8_SYMMETRIC, UINT8, QuantSpec
from qbook.data import digits, randn
from qbook.intmath import int_matmul
from qbook.models import train_digits_cnn
from qbook.nn import QuantConv2d, QuantLinear, WeightOnlyConv2d, WeightOnlyLinear

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def digits_cnn() -> nn.Module:
    return train_digits_cnn(seed=0)


@pytest.fixture(scope="module")
def digits_int8(digits_cnn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The chapter 7 pipeline: the trained digits CNN, static W8A8 (every conv and linear layer),
    calibrated on training images; the test images and qbook's outputs on them."""
    model = digits_cnn
    x_train, _ = digits("train")
    batches = list(x_train[:512].split(128))
    quantized = ptq.quantize(model, ptq.W8A8_STATIC, batches, modules=(nn.Linear, nn.Conv2d))
    x_test, _ = digits("test")
    with torch.no_grad():
        return quantized, x_test, quantized(x_test)


def _with_outputs(proto: onnx.ModelProto, op_type: str) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` that also returns the outputs of every ``op_type`` node (to look inside)."""
    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    names = [n.output[0] for n in extra.graph.node if n.op_type == op_type]
    for name in names:
        extra.graph.output.append(onnx.ValueInfoProto(name=name))
    return extra, names


def _ort_run(proto: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(
        proto.SerializeToString(), export.session_options(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input": x.numpy()})


def _check_exact(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """Export, then onnxruntime and the reference evaluator must equal qbook bit for bit."""
    proto = export.to_onnx(model, x)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(export.run(proto, x), expected)
    assert torch.equal(export.run(proto, x, runtime="reference"), expected)
    return proto


# --------------------------------------------------------------------------------------------------------
# The digits CNN, static W8A8 (chapter 7's PTQ, chapter 8's export)
# --------------------------------------------------------------------------------------------------------


def test_digits_cnn_onnxruntime_equals_qbook(digits_int8, tmp_path):
    model, x, expected = digits_int8
    path = tmp_path / "digits.onnx"
    proto = export.to_onnx(model, x[:8], path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [n.op_type for n in proto.graph.node].count("ConvInteger") == 2
    assert [n.op_type for n in proto.graph.node].count("MatMulInteger") == 2
    y = export.run(path, x)  # the whole test set, a batch size the example did not have
    assert y.shape == expected.shape == (len(x), 10)
    assert torch.equal(y.argmax(1), expected.argmax(1))  # 100 % argmax agreement
    assert torch.equal(y, expected)  # and bit for bit: within one output step, measured 0
    assert torch.equal(export.run(proto, x[:64], runtime="reference"), expected[:64])


def test_digits_cnn_integer_accumulators_equal_int_matmul(digits_int8):
    """Inside the graph: ConvInteger and MatMulInteger give exactly the int32 accumulators (4.4) of
    qbook.int_matmul and (for the convolutions) of torch's float64 convolution of the codes."""
    model, x, _ = digits_int8
    x = x[:8]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
        for name in ("conv1", "conv2", "fc1", "fc2")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    proto, _ = _with_outputs(export.to_onnx(model, x), "ConvInteger")
    proto, names = _with_outputs(proto, "MatMulInteger")
    got = _ort_run(proto, x)[1:]
    for name, acc in zip(("conv1", "conv2", "fc1", "fc2"), got, strict=True):
        layer = getattr(model, name)
        q = layer._quantize_static(inputs[name])
        zp = int(layer.input_zero_point)
        if name.startswith("conv"):  # torch's convolution of q - z_x (zero padded) in float64: exact integers
            codes, weight = (q.double() - zp), layer.weight.double()
            ref = F.conv2d(codes, weight, padding=layer.padding).round().to(torch.int32)
        else:
            ref = int_matmul(q, layer.weight.t(), a_zero_point=zp)
        assert acc.dtype == np.int32
        assert torch.equal(torch.from_numpy(acc), ref), name


# --------------------------------------------------------------------------------------------------------
# Small random layers: every kind of integer module, bit for bit
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act_spec, qparams",
    [
        (INT8, (0.031, -5)),
        (UINT8, (0.02, 131)),
        (INT8_SYMMETRIC, (0.05, 0)),
        (QuantSpec(8, False, True), (0.1, 9)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_static_linear_exact(act_spec, qparams, bias):
    torch.manual_seed(1)
    layer = QuantLinear.from_float(
        nn.Linear(33, 20, bias=bias), activation="static", act_spec=act_spec, input_qparams=qparams
    )
    x = randn(3, 5, 33) * 2  # (B, T, K): every token a row; some values saturate
    ops = [n.op_type for n in _check_exact(layer, x).graph.node]
    assert ops[:2] == ["QuantizeLinear", "Clip" if act_spec.narrow_range else "MatMulInteger"]


def test_quantize_linear_ties_round_half_to_even():
    """QuantizeLinear is qbook's (3.1): x / scale exactly halfway between two codes rounds to the even one."""
    layer = QuantLinear.from_float(nn.Linear(8, 1), activation="static", input_qparams=(0.5, 0))
    x = torch.tensor([[0.25, 0.75, -0.25, -0.75, 1.25, 63.75, -64.25, 1e9]])  # x / s = ±0.5, ±1.5, 2.5, ...
    proto, names = _with_outputs(export.to_onnx(layer, x), "QuantizeLinear")
    q = _ort_run(proto, x)[1]
    assert q.tolist() == [[0, 2, 0, -2, 2, 127, -128, 127]]
    assert torch.equal(torch.from_numpy(q), layer._quantize_static(x))


@settings(max_examples=12, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    static=st.booleans(),
    bias=st.booleans(),
)
def test_conv_exact(kernel, stride, padding, dilation, static, bias):
    """Static (ConvInteger) and dynamic (im2col Gather + per-position scales) convolutions, any geometry."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    kw = {"activation": "static", "input_qparams": (0.03, 4)} if static else {}
    layer = QuantConv2d.from_float(conv, **kw)
    x = randn(2, 3, 7, 8)
    ops = [n.op_type for n in _check_exact(layer, x).graph.node]
    assert ("ConvInteger" in ops) == static and ("MatMulInteger" in ops) != static


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 40),
    n=st.integers(1, 12),
    m=st.integers(1, 6),
    spec=st.sampled_from(
        [INT8, UINT8, INT8_SYMMETRIC, QuantSpec(4, True), QuantSpec(3, False), QuantSpec(2, True)]
    ),
    log_scale=st.floats(-6, 1),
    zp_fraction=st.floats(0, 1),
    bias=st.booleans(),
    dynamic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_exact_property(k, n, m, spec, log_scale, zp_fraction, bias, dynamic, seed):
    """Any shape, grid (2..8 bits, signed or not), scale, zero point: onnxruntime equals qbook bit for bit."""
    torch.manual_seed(seed)
    if dynamic:
        spec = QuantSpec(spec.bits, True, narrow_range=spec.narrow_range, symmetric=True)
        layer = QuantLinear.from_float(nn.Linear(k, n, bias=bias), act_spec=spec)
    else:
        zero_point = round(spec.qmin + zp_fraction * (spec.qmax - spec.qmin))
        layer = QuantLinear.from_float(
            nn.Linear(k, n, bias=bias),
            activation="static",
            act_spec=spec,
            input_qparams=(10.0**log_scale, zero_point),
        )
    x = randn(m, k) * 10.0 ** (log_scale + 1)  # about ten steps wide: rounding, ties and saturation
    proto = export.to_onnx(layer, x)
    with torch.no_grad():
        assert torch.equal(export.run(proto, x), layer(x))


@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 33)])
def test_dynamic_linear_exact(shape):
    torch.manual_seed(3)
    layer = QuantLinear.from_float(nn.Linear(33, 20))
    x = randn(*shape)
    x[0] = 0.0  # an all-zero token: its scale is floored at eps
    x[-1, ..., 3] = 50.0  # an outlier
    proto = _check_exact(layer, x)
    assert "MatMulInteger" in [n.op_type for n in proto.graph.node]


def test_dynamic_full_range_grid_clips():
    """A full-range symmetric grid [-128, 127] needs the clamp of (3.1) (qbook clamps; the export Clips)."""
    torch.manual_seed(4)
    layer = QuantLinear.from_float(nn.Linear(16, 4), act_spec=QuantSpec(8, True, symmetric=True))
    x = randn(5, 16)
    proto = _check_exact(layer, x)
    assert "Clip" in [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize(
    "bits, group_size, spec",
    [
        (8, None, None),
        (4, 16, None),
        (4, None, QuantSpec(4, False)),
        (3, 8, None),
        (2, 16, QuantSpec(2, False)),
    ],
)
def test_weight_only_linear(bits, group_size, spec):
    """DequantizeLinear (block-wise, int4 kept as int4) gives qbook's dequantized weight bit for bit; the
    float matmul afterwards sums in onnxruntime's order (stated tolerance)."""
    torch.manual_seed(5)
    layer = WeightOnlyLinear.from_float(nn.Linear(40, 12), bits=bits, group_size=group_size, spec=spec)
    x = randn(4, 40)
    proto = export.to_onnx(layer, x)
    weight = next(i for i in proto.graph.initializer if i.name.endswith("/weight"))
    assert weight.data_type == (
        (onnx.TensorProto.INT4 if layer.spec.signed else onnx.TensorProto.UINT4)
        if bits == 4
        else (onnx.TensorProto.INT8 if layer.spec.dtype == torch.int8 else onnx.TensorProto.UINT8)
    )  # qbook's code dtype: int8 holds an unsigned 2-bit grid [0, 3]
    extra, names = _with_outputs(proto, "DequantizeLinear")
    y, w = _ort_run(extra, x)
    w = torch.from_numpy(w)[:, :40]
    assert torch.equal(w, layer.dequantized_weight())
    expected = layer(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(export.run(proto, x, runtime="reference"), expected, rtol=1e-5, atol=1e-5)


def test_weight_only_conv():
    torch.manual_seed(6)
    layer = WeightOnlyConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, stride=2), bits=4, group_size=9)
    x = randn(2, 3, 8, 8)
    proto = export.to_onnx(layer, x)
    torch.testing.assert_close(export.run(proto, x), layer(x), rtol=1e-5, atol=1e-5)


class _Mixed(nn.Module):
    """Float layers, functional ops and integer modules together."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.qconv = QuantConv2d.from_float(nn.Conv2d(4, 4, 1), activation="static", input_qparams=(0.05, 0))
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 8)
        self.qfc = QuantLinear.from_float(nn.Linear(8, 3))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.bn(self.conv(x))) * 2.0 - 0.5
        x = F.max_pool2d(self.qconv(x), kernel_size=1) + x
        x = self.flatten(self.pool(F.relu(x)))
        x = torch.tanh(self.drop(self.fc(x))).view(-1, 8) / 3
        return self.qfc(x.reshape(x.shape[0], 8))


def test_mixed_float_and_integer_model(tmp_path):
    torch.manual_seed(7)
    model = _Mixed()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = randn(3, 2, 8, 8)
    path = tmp_path / "mixed.onnx"
    proto = export.to_onnx(model, x, str(path), dynamic_batch=False)
    assert os.path.getsize(path) > 0 and onnx.load(path) == proto
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(export.run(path, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(export.run(proto, x, runtime="reference"), expected, rtol=1e-5, atol=1e-5)


class _Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.leaky, self.relu6 = nn.LeakyReLU(0.1), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu6(self.avg(self.leaky(x) * 4))
        x = F.avg_pool2d(x, 2, ceil_mode=True) + F.adaptive_avg_pool2d(x, 1)
        return self.gap(x).flatten(1)


def test_pooling_and_more_activations():
    x = randn(2, 3, 9, 9)
    proto = export.to_onnx(_Pools(), x)
    assert {"AveragePool", "GlobalAveragePool", "LeakyRelu", "Clip"} <= {n.op_type for n in proto.graph.node}
    expected = _Pools()(x)
    torch.testing.assert_close(export.run(proto, x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(export.run(proto, x, runtime="reference"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="output size 1"):
        export.to_onnx(nn.AdaptiveAvgPool2d(2), x)


def test_dynamic_batch(digits_int8):
    model, x, expected = digits_int8
    proto = export.to_onnx(model, x[:2])
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for n in (1, 7):
        assert torch.equal(export.run(proto, x[:n]), expected[:n])  # rows are independent in qbook too
    torch.manual_seed(11)  # the dynamic convolution's im2col reshapes keep the batch free too
    dynamic = nn.Sequential(QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, stride=2)), nn.Flatten())
    proto = export.to_onnx(dynamic, randn(2, 3, 8, 8))
    for n in (1, 5):
        images = randn(n, 3, 8, 8)
        assert torch.equal(export.run(proto, images), dynamic(images))
    fixed = export.to_onnx(model, x[:2], dynamic_batch=False)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        export.run(fixed, x[:3])


def test_session_options_disable_fusions():
    """With the optimizer on, onnxruntime may fuse the epilogue; run() keeps the graph as exported."""
    options = export.session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@pytest.mark.parametrize("output_scale", [3e-1, 2e-2, 1e-3, 1e-4, 2e-5])
def test_int8_output_requantization_exact(output_scale):
    """(7.3): the fixed-point requantization (9.5) as int64 ONNX operators equals qbook.requantize bit for
    bit, for right shifts (M < 1) and left shifts (M > 1); the next layer takes the int8 codes."""
    torch.manual_seed(9)
    first = QuantLinear.from_float(
        nn.Linear(24, 16, bias=False),
        activation="static",
        input_qparams=(0.02, 3),
        output="int8",
        output_qparams=(output_scale, -4),
    )
    second = QuantConv2d.from_float(
        nn.Conv2d(1, 2, 2),
        activation="static",
        act_spec=INT8,
        input_qparams=(output_scale, -4),
        output="int8",
        output_qparams=(0.05, 1),
    )
    shifts = first.output_shift
    model = nn.Sequential(first, nn.Unflatten(1, (1, 4, 4)), second, nn.Flatten(), nn.Identity()).eval()
    x = randn(6, 24) * (2.0 if output_scale >= 1e-3 else 0.01)  # small inputs where M = s_x s_w / s_y > 1
    with torch.no_grad():
        codes = first(x)
    assert codes.dtype == torch.int8 and len(set(codes.flatten().tolist())) > 5  # not all saturated
    assert (int(shifts.min()) > 0) == (output_scale < 1e-4)  # 2e-5: M > 1, a left shift
    _check_exact(model, x)


def test_qat_converted_low_bit_model_exact(digits_cnn):
    """A QAT model converted to W4A4 integer modules (4-bit codes in int8, Clip to [-8, 7]): exact."""
    from qbook import qat

    x_train, _ = digits("train")
    x_test, _ = digits("test")
    model = qat.prepare_qat(digits_cnn, ptq.W4A4_STATIC)
    model.train()
    with torch.no_grad():
        for batch in x_train[:256].split(64):
            model(batch)
    integer = qat.convert(qat.freeze(model).eval())
    proto = _check_exact(integer, x_test[:100])
    assert "Clip" in [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("act_spec, qparams", [(INT8, (0.03, -5)), (QuantSpec(4, True), (0.2, 1))])
def test_qdq_format_static_layers(conv, act_spec, qparams):
    """quant_format="qdq": QuantizeLinear → DequantizeLinear → float operator with dequantized weights and
    bias; equal to qbook up to float32 rounding of the sums."""
    torch.manual_seed(10)
    float_layer = nn.Conv2d(3, 5, 3, padding=1) if conv else nn.Linear(27, 5)
    layer = (QuantConv2d if conv else QuantLinear).from_float(
        float_layer, activation="static", act_spec=act_spec, input_qparams=qparams
    )
    x = randn(4, 3, 6, 6) if conv else randn(4, 27)
    proto = export.to_onnx(layer, x, quant_format="qdq")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ("Conv" if conv else "MatMul") in ops
    assert not {"ConvInteger", "MatMulInteger"} & set(ops)
    expected = layer(x)
    for runtime in ("onnxruntime", "reference"):
        torch.testing.assert_close(export.run(proto, x, runtime=runtime), expected, rtol=1e-5, atol=1e-5)


def test_qdq_format_digits_cnn(digits_int8):
    """QDQ on the digits CNN: every argmax agrees. Its float sums can land a value on the other side of the
    next layer's rounding boundary, and then an output moves by many steps (0.02 seen on a less trained CNN;
    5.7e-6 here), hence the loose bound; the integer format is exact
    (test_digits_cnn_onnxruntime_equals_qbook)."""
    model, x, expected = digits_int8
    y = export.run(export.to_onnx(model, x[:8], quant_format="qdq"), x)
    assert torch.equal(y.argmax(1), expected.argmax(1))
    torch.testing.assert_close(y, expected, rtol=0, atol=0.05)


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


class _Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class _Branch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class _BatchReshape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)


def test_unsupported_modules_and_ops_are_named():
    x = randn(2, 4)
    with pytest.raises(NotImplementedError, match=r"LayerNorm is not supported.*nn\.Linear"):
        export.to_onnx(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), x)
    with pytest.raises(NotImplementedError, match="softmax.*supported functions"):
        export.to_onnx(_Softmax(), x)
    with pytest.raises(NotImplementedError, match="torch.fx cannot trace"):
        export.to_onnx(_Branch(), x)
    with pytest.raises(ValueError, match=r"LayerNorm is not supported") as refused:  # bad input, as in qbook
        export.to_onnx(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), x)
    assert type(refused.value) is export.UnsupportedModelError
    with pytest.raises(ValueError, match="batch dimension.*dynamic_batch=False"):
        export.to_onnx(_BatchReshape(), x)
    assert export.to_onnx(_BatchReshape(), x, dynamic_batch=False).graph.node[0].op_type == "Reshape"
    with pytest.raises(ValueError, match="training mode"):
        export.to_onnx(nn.Sequential(nn.Linear(4, 4), nn.Dropout()), x)
    with pytest.raises(NotImplementedError, match="groups=1"):
        export.to_onnx(nn.Conv2d(4, 4, 1, groups=2).eval(), randn(1, 4, 3, 3))


def test_unconverted_and_unsupported_layers_are_refused():
    torch.manual_seed(8)
    prepared = ptq.prepare(nn.Sequential(nn.Linear(4, 3)), ptq.W8A8_STATIC)
    with pytest.raises(NotImplementedError, match="Observed.*qbook.ptq.convert"):
        export.to_onnx(prepared, randn(2, 4))
    unsigned_dynamic = QuantLinear.from_float(nn.Linear(4, 3), act_spec=QuantSpec(8, False, symmetric=True))
    with pytest.raises(ValueError, match="unsigned"):
        export.to_onnx(unsigned_dynamic, randn(2, 4))
    int8_out = QuantLinear.from_float(
        nn.Linear(4, 3), activation="static", input_qparams=(0.1, 0), output="int8", output_qparams=(0.1, 0)
    )
    uint8_in = QuantLinear.from_float(
        nn.Linear(3, 2), activation="static", act_spec=UINT8, input_qparams=(0.1, 128)
    )
    with pytest.raises(TypeError, match="codes of dtype torch.uint8.*got torch.int8"):
        export.to_onnx(nn.Sequential(int8_out, uint8_in), randn(2, 4))
    with pytest.raises(NotImplementedError, match="quant_format='integer'"):
        export.to_onnx(int8_out, randn(2, 4), quant_format="qdq")


@FAST
@given(dtype=st.sampled_from([torch.float64, torch.float16, torch.int8, torch.int32, torch.bool]))
def test_example_input_must_be_float32(dtype):
    """The error names the dtype and shape, never the tensor's values."""
    with pytest.raises(TypeError, match=rf"float32 tensor, got a {dtype} tensor of shape \(2, 4\)$"):
        export.to_onnx(nn.Linear(4, 3), torch.zeros(2, 4, dtype=dtype))


@FAST
@given(dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int32]))
def test_run_refuses_other_dtypes_naming_them(dtype):
    """``run`` does not cast (qbook's float and weight-only layers compute in the input's dtype, so a cast
    would not reproduce every model); the error names the dtype, not the values."""
    proto = export.to_onnx(_static_linear_model(), randn(2, 4))
    expected = rf"float32 tensor, got a {dtype} tensor of shape \(2, 4\) \(cast"
    with pytest.raises(TypeError, match=expected) as e:
        export.run(proto, torch.ones(2, 4, dtype=dtype))
    assert "tensor(" not in str(e.value)


def _static_linear_model() -> nn.Module:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(4, 3), activation="static", input_qparams=(0.02, -3))
    return nn.Sequential(layer, nn.ReLU())


def _dynamic_linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(QuantLinear.from_float(nn.Linear(4, 3)), nn.ReLU())


@FAST
@given(
    static=st.booleans(),
    runtime=st.sampled_from(["onnxruntime", "reference"]),
    row=st.integers(0, 2),
    col=st.integers(0, 3),
)
def test_run_refuses_nan_as_qbook_does(static, runtime, row, col):
    """A NaN input: qbook's integer model raises, and so must ``run`` (it used to return finite logits)."""
    model = _static_linear_model() if static else _dynamic_linear_model()
    proto = export.to_onnx(model, randn(3, 4))
    x = randn(3, 4)
    x[row, col] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model(x)
    with pytest.raises(ValueError, match=rf"1 NaN value\(s\), the first at index \({row}, {col}\); NaN has"):
        export.run(proto, x, runtime=runtime)


@FAST
@given(row=st.integers(0, 2), col=st.integers(0, 3), sign=st.sampled_from([1.0, -1.0]))
def test_run_infinity_as_qbook(row, col, sign):
    """±inf into a static first layer saturates to qmin/qmax (3.1) in qbook and in onnxruntime alike: equal
    outputs. Into a dynamic layer qbook raises (the scale would be inf; onnxruntime returns NaN): ``run``
    raises too, and so does the reference evaluator (its QuantizeLinear casts inf to an undefined integer)."""
    x = randn(3, 4)
    x[row, col] = sign * float("inf")
    static = _static_linear_model()
    proto = export.to_onnx(static, randn(3, 4))
    y = export.run(proto, x)
    assert torch.equal(y, static(x)) and bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match=rf"1 infinite value\(s\), the first at index \({row}, {col}\): the"):
        export.run(proto, x, runtime="reference")
    dynamic = _dynamic_linear_model()
    with pytest.raises(ValueError, match="infinite"):
        dynamic(x)
    with pytest.raises(ValueError, match="infinite value.*only a static first layer saturates"):
        export.run(export.to_onnx(dynamic, randn(3, 4)), x)


def test_run_float_graph_propagates_non_finite():
    """Without activation quantization (float and weight-only operators) NaN and inf flow as in torch."""
    model = nn.Sequential(nn.ReLU())
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    y = export.run(export.to_onnx(model, x), x)
    assert torch.equal(y.isnan(), model(x).isnan()) and torch.equal(y.nan_to_num(), model(x).nan_to_num())


def test_run_checks_the_input_shape():
    """A shape the graph does not take is a ValueError naming both shapes, not onnxruntime's InvalidArgument;
    with ``dynamic_batch`` any batch size runs."""
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(1, 2, 3), activation="static", input_qparams=(0.05, 0))
    model = nn.Sequential(conv)
    x = randn(2, 1, 8, 8)
    dynamic, fixed = export.to_onnx(model, x), export.to_onnx(model, x, dynamic_batch=False)
    five = randn(5, 1, 8, 8)
    for runtime in ("onnxruntime", "reference"):
        assert torch.equal(export.run(dynamic, five, runtime=runtime), model(five))
        for bad in ((2, 1, 9, 9), (2, 8, 8), (2, 1, 8, 8, 1)):
            given_shape = ", ".join(map(str, bad))
            with pytest.raises(ValueError, match=rf"shape \(batch, 1, 8, 8\), got \({given_shape}\)$"):
                export.run(dynamic, randn(*bad), runtime=runtime)
        with pytest.raises(ValueError, match=r"shape \(2, 1, 8, 8\), got \(3, 1, 8, 8\)$"):
            export.run(fixed, randn(3, 1, 8, 8), runtime=runtime)


def test_failing_example_input_prints_nothing(capfd):
    """The model's own error, re-raised with context, and nothing on stdout/stderr (torch.fx's ShapeProp used
    to print the whole traceback first)."""
    expected = r"^the model fails on example_input: QuantLinear expects inputs \(\.\.\., 4\), got \(2, 5\)$"
    with pytest.raises(ValueError, match=expected):
        export.to_onnx(_static_linear_model(), randn(2, 5))
    assert capfd.readouterr() == ("", "")


@FAST
@given(
    opset=st.one_of(
        st.integers(-5, 20), st.integers(100, 200), st.floats(21, 30), st.just(True), st.just("21")
    )
)
def test_bad_opset(opset):
    with pytest.raises(ValueError, match="opset"):
        export.to_onnx(nn.Linear(4, 3), randn(2, 4), opset=opset)


def test_bad_arguments():
    x = randn(2, 4)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export.to_onnx(lambda t: t, x)
    with pytest.raises(TypeError, match="path"):
        export.to_onnx(nn.Linear(4, 3), x, 3)
    with pytest.raises(ValueError, match="quant_format"):
        export.to_onnx(nn.Linear(4, 3), x, quant_format="QOperator")
    with pytest.raises(TypeError, match="check"):
        export.to_onnx(nn.Linear(4, 3), x, check="yes")
    with pytest.raises(ValueError, match="batch dimension"):
        export.to_onnx(nn.Linear(4, 3), torch.tensor(1.0))
    proto = export.to_onnx(nn.Linear(4, 3), x)
    with pytest.raises(ValueError, match="runtime"):
        export.run(proto, x, runtime="tensorrt")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        export.run("/nonexistent/model.onnx", x)
    with pytest.raises(TypeError, match="ModelProto"):
        export.run(b"bytes", x)
    with pytest.raises(TypeError, match="float32"):
        export.run(proto, x.double())


class _ShapeMath(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.shape[1]


def test_shape_arithmetic_only_inside_reshapes():
    x = randn(2, 3, 4)
    model = nn.Sequential(nn.Flatten(0, 1))  # merges the batch dimension
    assert export.to_onnx(model, x, dynamic_batch=False).graph.node[0].op_type == "Reshape"
    with pytest.raises(NotImplementedError, match="x.shape"):
        export.to_onnx(_ShapeMath(), x)
