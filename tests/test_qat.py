"""Tests for qbook.qat (quantization-aware training, chapter 8) and the low-bit integer modules it makes.

References: the published definitions (the clipped STE; LSQ's gradient, Esser et al. 2020; LSQ+'s offset
gradient, Bhalgat et al. 2020), naive float64 loops, central finite differences of the straight-through
surrogate, torch's own BatchNorm in eval mode, and chapter 7's integer modules.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbook import ptq, qat
from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, calc_qparams, dequantize, fake_quantize, quantize
from qbook.data import digits, randn
from qbook.granularity import PerChannel, PerGroup
from qbook.models import DigitsCNN, train_digits_cnn
from qbook.nn import QuantConv2d, QuantLinear
from qbook.observers import MinMaxObserver

INT4_SYM = QuantSpec(4, True, narrow_range=True, symmetric=True)
INT4 = QuantSpec(4, True)


def codes_float32(x: torch.Tensor, scale: float, zero_point: int) -> np.ndarray:
    """``round_half_even(x / scale) + zero_point`` computed independently, in NumPy float32."""
    v = np.asarray(x.detach().numpy(), dtype=np.float32) / np.float32(scale)
    return np.round(v).astype(np.float64) + zero_point


# --------------------------------------------------------------------------------------------------------
# FakeQuantize: the clipped STE, observing and freezing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [INT8, INT4, QuantSpec(3, False), INT4_SYM])
def test_fake_quantize_ste_mask_is_exactly_the_published_definition(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    x = torch.cat([randn(2000) * 3, torch.tensor([0.0, 1e-3, -1e-3])])
    fq = qat.FakeQuantize(spec)
    fq(x[:50] / 3)  # a narrower range than x: many values fall outside the grid
    fq.freeze()
    s, z = float(fq.scale), int(fq.zero_point)
    # values exactly half a step beyond the ends: round-half-even decides inside or outside
    x = torch.cat([x, torch.tensor([(spec.qmax - z + 0.5) * s, (spec.qmin - z - 0.5) * s])]).requires_grad_()
    y = fq(x)
    y.backward(torch.ones_like(y))
    codes = codes_float32(x, s, z)
    mask = torch.from_numpy(((spec.qmin <= codes) & (codes <= spec.qmax)).astype(np.float32))
    assert torch.equal(x.grad, mask)
    assert 0 < int(mask.sum()) < len(mask)  # both sides are exercised
    assert torch.equal(y.detach(), fake_quantize(x.detach(), s, z, spec.qmin, spec.qmax))


def test_fake_quantize_observes_with_its_observer_then_freezes() -> None:
    fq = qat.FakeQuantize(INT8, observer=MinMaxObserver)
    fq(torch.tensor([-1.0, 2.0]))
    assert torch.equal(fq.scale, calc_qparams(-1.0, 2.0, -128, 127)[0])
    fq(torch.tensor([-3.0, 1.0]))
    scale, zero_point = calc_qparams(-3.0, 2.0, -128, 127)
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point)
    fq.freeze()
    fq(torch.tensor([-100.0, 100.0]))
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point)


def test_fake_quantize_moving_average_and_eval_mode() -> None:
    fq = qat.FakeQuantize()  # moving average, c = 0.01
    fq.eval()
    fq(torch.tensor([0.0, 1.0]))  # the first batch is observed in any mode
    first = fq.scale.clone()
    fq(torch.tensor([0.0, 50.0]))  # eval mode: no more observing
    assert torch.equal(fq.scale, first)
    fq.train()
    fq(torch.tensor([0.0, 3.0]))
    xmax = torch.tensor(1.0) + 0.01 * (torch.tensor(3.0) - 1.0)
    assert torch.equal(fq.scale, calc_qparams(0.0, xmax, -128, 127)[0])


def test_weight_fake_quantize_gives_the_ptq_weight_codes() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 8)
    fq = qat.FakeQuantize(INT4_SYM, PerChannel(0), observer=qat.LatestMinMaxObserver)
    fq(layer.weight * 3)  # a stale range: the latest batch replaces it
    w_hat = fq(layer.weight)
    q = QuantLinear.from_float(layer, weight_spec=INT4_SYM, act_spec=QuantSpec(8, True, True, True))
    reference = q.weight.float() * q.weight_scale[:, None]
    assert torch.equal(w_hat.detach(), reference)
    assert fq.scale.shape == (8, 1)


def test_fake_quantize_state_dict_round_trip_per_channel() -> None:
    fq = qat.FakeQuantize(INT4_SYM, PerChannel(0), observer=qat.LatestMinMaxObserver)
    w = randn(6, 5)
    fq(w)
    other = qat.FakeQuantize(INT4_SYM, PerChannel(0), observer=qat.LatestMinMaxObserver)
    other.load_state_dict(fq.state_dict())
    other.freeze()
    assert torch.equal(other(w), fq(w))


# --------------------------------------------------------------------------------------------------------
# LSQ and LSQ+: forward, the paper's gradients, finite differences of the straight-through surrogate
# --------------------------------------------------------------------------------------------------------


def lsq_reference(x: torch.Tensor, s: float, z: float, qmin: int, qmax: int, w: torch.Tensor):
    """Per-element loop in float64 over the published definitions: ``dL/ds`` and ``dL/dz`` for
    ``L = sum_i w_i x_hat_i`` (before the gradient scale)."""
    codes = codes_float32(x, s, z)
    v = x.double().numpy() / s
    ds = dz = 0.0
    for c, vi, wi in zip(codes, v, w.double().tolist(), strict=True):
        if c < qmin:
            ds, dz = ds + wi * (qmin - z), dz - wi * s
        elif c > qmax:
            ds, dz = ds + wi * (qmax - z), dz - wi * s
        else:
            ds += wi * (np.round(vi) - vi)
    return ds, dz


@pytest.mark.parametrize("spec, z", [(INT4_SYM, 0.0), (INT8, -20.0), (QuantSpec(3, False), 2.0)])
def test_lsq_forward_equals_fake_quantize_and_gradients_match_the_paper(spec: QuantSpec, z: float) -> None:
    torch.manual_seed(1)
    x = (randn(500) * 2).requires_grad_()
    w = randn(500)
    s = torch.tensor(0.37, requires_grad=True)
    zp = torch.tensor(z, requires_grad=True)
    y = qat.lsq_fake_quantize(x, s, zp, spec.qmin, spec.qmax)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), 0.37, int(z), spec.qmin, spec.qmax))
    (y * w).sum().backward()
    g = 1 / math.sqrt(500 * (spec.qmax - z))  # Q_P = qmax - z: the levels above zero
    ds, dz = lsq_reference(x.detach(), 0.37, z, spec.qmin, spec.qmax, w)
    assert s.grad.item() == pytest.approx(ds * g, rel=1e-5, abs=1e-6)
    assert zp.grad.item() == pytest.approx(dz * g, rel=1e-5, abs=1e-6)
    codes = codes_float32(x, 0.37, z)
    inside = torch.from_numpy(((spec.qmin <= codes) & (codes <= spec.qmax)).astype(np.float32))
    assert torch.equal(x.grad, w * inside)


def test_lsq_scale_gradient_against_finite_differences_of_the_ste_surrogate() -> None:
    """Away from the grid's ends, the loss with ``round`` linearised at ``s0`` (the STE: ``round(u) ~
    round(u0) + (u - u0)``) is smooth in ``s``; its central difference is LSQ's gradient (with ``g = 1``). The
    true piecewise loss has derivative ``round(x / s)`` inside: LSQ adds ``-x / s``, the distance to the
    transition that the plain STE ignores."""
    torch.manual_seed(2)
    x, w = randn(300).double() * 2, randn(300).double()
    s0, qmin, qmax = 0.3, -8, 7
    r0, u0 = torch.round(x / s0), x / s0
    inside_0 = (r0 >= qmin + 1) & (r0 <= qmax - 1)
    x, w = x[inside_0 | (r0 < qmin - 1) | (r0 > qmax + 1)], w[inside_0 | (r0 < qmin - 1) | (r0 > qmax + 1)]
    r0, u0 = torch.round(x / s0), x / s0  # no value within a step of an end: the classes are stable

    def surrogate(s: float) -> float:
        codes = (r0 + (x / s - u0)).clamp(qmin, qmax)
        return float((w * s * codes).sum())

    h = 1e-6
    numeric = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    s = torch.tensor(s0, dtype=torch.float32, requires_grad=True)
    qat.lsq_fake_quantize(x.float(), s, torch.tensor(0.0), qmin, qmax, g=1.0).mul(w.float()).sum().backward()
    assert s.grad.item() == pytest.approx(numeric, rel=1e-4)

    def piecewise(s: float) -> float:  # the true loss: round() is constant between transitions
        return float((w * s * torch.round(x / s0).clamp(qmin, qmax)).sum())

    true_slope = (piecewise(s0 + h) - piecewise(s0 - h)) / (2 * h)
    inside = (r0 >= qmin) & (r0 <= qmax)
    assert s.grad.item() - true_slope == pytest.approx(float(-(w * u0 * inside).sum()), rel=1e-4)


def test_lsq_gradient_scale_g() -> None:
    x, w = randn(64) * 3, randn(64)
    grads = []
    for g in (None, 1.0):
        s = torch.tensor(0.5, requires_grad=True)
        qat.lsq_fake_quantize(x, s, torch.tensor(0.0), -2, 1, g=g).mul(w).sum().backward()
        grads.append(s.grad.item())
    assert grads[0] == pytest.approx(grads[1] / math.sqrt(64 * 1), rel=1e-6)


def test_lsq_plus_zero_point_gradient_against_finite_differences() -> None:
    torch.manual_seed(3)
    x, w = randn(400).double() * 2 + 1, randn(400).double()
    s0, z0, qmin, qmax = 0.25, -3.0, -8, 7
    codes = torch.round(x / s0) + z0
    keep = (codes <= qmin - 1) | (codes >= qmax + 1) | ((codes >= qmin + 1) & (codes <= qmax - 1))
    x, w = x[keep], w[keep]

    def surrogate(z: float) -> float:  # z continuous (its rounding passes straight through)
        return float((w * s0 * ((torch.round(x / s0) + z).clamp(qmin, qmax) - z)).sum())

    h = 1e-4
    numeric = (surrogate(z0 + h) - surrogate(z0 - h)) / (2 * h)
    zp = torch.tensor(z0, requires_grad=True)
    s = torch.tensor(s0)
    qat.lsq_fake_quantize(x.float(), s, zp, qmin, qmax, g=1.0).mul(w.float()).sum().backward()
    assert zp.grad.item() == pytest.approx(numeric, rel=1e-4)
    assert numeric != 0


def test_lsq_per_channel_gradients_sum_per_channel() -> None:
    torch.manual_seed(4)
    x, w = randn(3, 40) * 2, randn(3, 40)
    scales = [0.2, 0.5, 0.9]
    s = torch.tensor(scales).reshape(3, 1).requires_grad_()
    qat.lsq_fake_quantize(x, s, torch.zeros(3, 1), -4, 3).mul(w).sum().backward()
    g = 1 / math.sqrt(40 * 3)
    for c in range(3):
        ds, _ = lsq_reference(x[c], scales[c], 0.0, -4, 3, w[c])
        assert s.grad[c, 0].item() == pytest.approx(ds * g, rel=1e-5, abs=1e-6)


def test_learned_scale_module_initialises_learns_and_freezes() -> None:
    x = randn(1000)
    lsq = qat.LearnedScaleFakeQuantize(INT4_SYM)
    lsq(x)
    assert lsq.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    minmax = qat.LearnedScaleFakeQuantize(INT4, init="minmax")
    minmax(x)
    scale, zero_point = calc_qparams(x.min(), x.max(), -8, 7)
    assert torch.equal(minmax.scale.data, scale) and minmax.zero_point.item() == zero_point.item()
    optimizer = torch.optim.SGD(lsq.parameters(), lr=0.1)
    before = lsq.scale.item()
    ((lsq(x) - x) ** 2).sum().backward()
    optimizer.step()
    assert lsq.scale.item() != before
    lsq.freeze()
    optimizer.zero_grad()
    assert not lsq.learning
    out = lsq(x)
    assert not out.requires_grad


def test_lsq_counts_the_levels_above_zero() -> None:
    """``Q_P = qmax - z``: a signed affine grid on non-negative data (``z = qmin``) has the levels of the
    unsigned grid, and LSQ treats the two alike (initial scale, output, gradient scale)."""
    x = randn(300).abs()
    outputs, grads = [], []
    for spec in (QuantSpec(4, False), QuantSpec(4, True)):
        lsq = qat.LearnedScaleFakeQuantize(spec)
        y = lsq(x)
        assert lsq.scale.item() == pytest.approx(2 * x.mean().item() / math.sqrt(15), rel=1e-6)
        assert lsq.zero_point.item() == spec.qmin
        (y * x).sum().backward()
        outputs.append(y.detach())
        grads.append(lsq.scale.grad.item())
    assert torch.equal(outputs[0], outputs[1]) and grads[0] == pytest.approx(grads[1], rel=1e-6)


def test_learned_zero_point_is_a_parameter_and_rounds() -> None:
    lsq = qat.LearnedScaleFakeQuantize(QuantSpec(4, False), learn_zero_point=True)
    x = randn(200).abs()
    lsq(x)
    assert isinstance(lsq.zero_point, nn.Parameter) and lsq.zero_point.item() == 0.0
    with torch.no_grad():
        lsq.zero_point.fill_(2.4)
    expected = fake_quantize(x, lsq.scale.detach(), 2, 0, 15)
    assert torch.equal(lsq(x).detach(), expected)


def test_lsq_per_channel_module_initialises_per_channel() -> None:
    w = randn(4, 3, 3, 3)
    lsq = qat.LearnedScaleFakeQuantize(INT4_SYM, PerChannel(0))
    lsq(w)
    expected = 2 * w.abs().reshape(4, -1).mean(1) / math.sqrt(7)
    assert lsq.scale.shape == (4, 1, 1, 1)
    torch.testing.assert_close(lsq.scale.detach().flatten(), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------
# Batch-norm folding
# --------------------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(x.flatten(1)))


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(randn(n))
            m.running_var.copy_(randn(n).abs() + 0.1)
            m.weight.data.copy_(randn(n))
            m.bias.data.copy_(randn(n))
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batchnorm_matches_the_unfolded_model_in_eval_mode(bias: bool) -> None:
    torch.manual_seed(0)
    model = with_statistics(ConvBN(bias))
    folded = qat.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn1d, nn.Identity)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the caller's model is untouched
    x = randn(8, 3, 4, 4)
    # float32, a few roundings per output: the folded weight differs from W by one product's rounding
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    m64, f64 = copy.deepcopy(model).double(), qat.fold_batchnorm(copy.deepcopy(model).double())
    torch.testing.assert_close(f64(x.double()), m64(x.double()), rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_core_is_the_published_formula() -> None:
    w, b, mean, var, gamma, beta = randn(4, 2, 1, 1), randn(4), randn(4), randn(4).abs(), randn(4), randn(4)
    args = (b.double(), mean.double(), var.double(), 1e-5, gamma.double(), beta.double())
    wf, bf = qat._fold_bn(w.double(), *args)
    for c in range(4):
        k = gamma[c].item() / math.sqrt(var[c].item() + 1e-5)
        assert wf[c].flatten().tolist() == pytest.approx((w[c].double() * k).flatten().tolist(), rel=1e-14)
        assert bf[c].item() == pytest.approx((b[c].item() - mean[c].item()) * k + beta[c].item(), rel=1e-12)


class Unfoldable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is used twice


def test_fold_batchnorm_refuses_what_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match="'bn'.*used elsewhere"):
        qat.fold_batchnorm(Unfoldable().eval())
    after_relu = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)).eval()
    with pytest.raises(ValueError, match="'2'.*not the output"):
        qat.fold_batchnorm(after_relu)
    kept = qat.fold_batchnorm(after_relu, strict=False)
    assert isinstance(kept[2], nn.BatchNorm2d)


def test_fold_batchnorm_refuses_a_model_in_training_mode() -> None:
    model = with_statistics(ConvBN(True)).train()
    model.bn1d.eval()  # only the batch norms still in training mode are named
    x = randn(8, 3, 4, 4)
    # why: in training mode the batch norm uses the batch statistics, which no folded conv reproduces
    folded_anyway = qat.fold_batchnorm(copy.deepcopy(model).eval())
    assert not torch.allclose(folded_anyway(x), copy.deepcopy(model)(x), atol=1e-3)
    with pytest.raises(ValueError, match=r"training mode: 'bn'; call model.eval\(\) first"):
        qat.fold_batchnorm(model)
    with pytest.raises(ValueError, match="training mode"):
        qat.fold_batchnorm(model, inplace=True, strict=False)
    assert isinstance(model.bn, nn.BatchNorm2d) and model.bn.training  # refused before touching the model


# --------------------------------------------------------------------------------------------------------
# The QAT conv-BN module
# --------------------------------------------------------------------------------------------------------


def test_qat_conv_bn_uses_batch_statistics_in_training_and_the_folded_conv_in_eval() -> None:
    torch.manual_seed(0)
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)))
    prepared = qat.prepare_qat(model, ptq.W8A8_STATIC)
    layer = prepared[0]
    assert isinstance(layer, qat.QATConvBn2d) and isinstance(prepared[1], nn.Identity)
    x = randn(16, 3, 5, 5) * 2 + 1
    y = layer(x)  # training: per-channel batch mean beta and variance gamma^2, up to 8-bit quantization
    bn = layer.bn
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), bn.bias.detach(), atol=1e-4, rtol=0)
    var = y.var(dim=(0, 2, 3), unbiased=False)  # gamma^2 var_B / (var_B + eps), var_B of order 1
    torch.testing.assert_close(var, bn.weight.detach() ** 2, rtol=1e-3, atol=1e-4)
    running = bn.running_mean.clone()
    layer(x)
    assert not torch.equal(bn.running_mean, running)  # training mode updates the running statistics
    qat.freeze(prepared)
    running = bn.running_mean.clone()
    y_frozen = layer(x)
    assert torch.equal(bn.running_mean, running)
    w_fold, b_fold = layer.folded()
    assert torch.equal(y_frozen, layer.eval()(x))
    conv = nn.Conv2d(3, 6, 3, padding=1)
    conv.weight.data, conv.bias.data = layer.weight_fake_quant(w_fold).detach(), b_fold.detach()
    # the same up to the bias's rounding to the int32 grid (half a step of s_x s_w)
    torch.testing.assert_close(y_frozen, conv(layer.input_fake_quant(x)), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# prepare_qat -> fit -> freeze -> convert on the digits
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return train_digits_cnn(epochs=3)


class DigitsBN(nn.Module):
    """The digits CNN with a batch norm after each convolution (a stand-in independent of qbook.models)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "config, method", [(ptq.W4A4_STATIC, "fake"), (ptq.W3A3_STATIC, "lsq"), (ptq.W2A8_STATIC, "fake")]
)
def test_convert_agrees_with_the_fake_quantized_model_on_every_test_digit(trained, config, method) -> None:
    x, y = digits("train")
    x_test, _ = digits("test")
    model = qat.prepare_qat(trained, config, method=method)
    history = qat.fit(model, (x, y), epochs=1, lr=1e-3, progress=False)
    qat.freeze(model)
    history += qat.fit(model, (x[:256], y[:256]), epochs=1, lr=1e-3, progress=False)
    assert len(history) == 2 and all(math.isfinite(h) for h in history)
    model.eval()
    integer = qat.convert(model)
    assert isinstance(integer.conv1, QuantConv2d) and isinstance(integer.fc2, QuantLinear)
    assert integer.conv1.weight_spec == config.weight and integer.fc1.act_spec == config.activation
    with torch.no_grad():
        fake, exact = model(x_test), integer(x_test)
    assert torch.equal(fake.argmax(1), exact.argmax(1))  # 100% of the 500 test digits
    # the same logits, but where float rounding moved an activation across a rounding boundary (one code)
    assert float(((exact - fake).abs() > 1e-4).double().mean()) < 0.01
    # the weight codes are the ones the fake-quantized forward used
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer, q = model.get_submodule(name), integer.get_submodule(name)
        w_hat = layer.weight_fake_quant(layer.weight).detach()
        shape = (-1,) + (1,) * (w_hat.ndim - 1)
        assert torch.equal(q.weight.float() * q.weight_scale.reshape(shape), w_hat)


def test_convert_with_batch_norm_folded_during_training() -> None:
    torch.manual_seed(0)
    x, y = digits("train")
    model = qat.prepare_qat(DigitsBN(), ptq.W4A4_STATIC, method="lsq", learn_zero_point=True)
    assert isinstance(model.conv1, qat.QATConvBn2d) and isinstance(model.bn2, nn.Identity)
    qat.fit(model, (x, y), epochs=2, lr=3e-3, progress=False)
    qat.freeze(model)
    qat.fit(model, (x[:256], y[:256]), epochs=1, lr=1e-3, progress=False)
    integer = qat.convert(model.eval())
    x_test, y_test = digits("test")
    with torch.no_grad():
        fake, exact = model(x_test), integer(x_test)
    assert torch.equal(fake.argmax(1), exact.argmax(1))
    assert float((exact.argmax(1) == y_test).double().mean()) > 0.8  # it learned something


def test_prepare_qat_finds_the_batch_norms_of_the_digits_cnn() -> None:
    model = with_statistics(DigitsCNN(batchnorm=True))
    prepared = qat.prepare_qat(model, ptq.W4A4_STATIC, method="lsq")
    assert [type(prepared.get_submodule(n)).__name__ for n in ("conv1", "bn1", "conv2", "bn2", "fc1")] == [
        "QATConvBn2d", "Identity", "QATConvBn2d", "Identity", "QATLinear"
    ]
    folded = qat.fold_batchnorm(model)
    x, _ = digits("calibration")
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    # the LSQ weight scales start from the folded weights (the weight inference uses)
    w_fold = folded.conv2.weight.detach()
    expected = 2 * w_fold.abs().reshape(32, -1).mean(1) / math.sqrt(7)
    torch.testing.assert_close(prepared.conv2.weight_fake_quant.scale.detach().flatten(), expected)


def test_fit_is_deterministic_and_leaves_global_state_alone() -> None:
    x, y = digits("calibration")
    histories = []
    for _ in range(2):
        torch.manual_seed(123)
        model = qat.prepare_qat(DigitsCNN(), ptq.W4A4_STATIC)
        state = torch.random.get_rng_state()
        threads = torch.get_num_threads()
        histories.append(qat.fit(model, (x, y), epochs=2, batch_size=50, seed=7, progress=False))
        assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
        assert model.training
    assert histories[0] == histories[1]


def test_fit_shows_a_progress_bar_only_when_asked(capsys) -> None:
    x, y = digits("calibration")
    model = qat.prepare_qat(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), ptq.W4A4_STATIC)
    qat.fit(model, (x, y), epochs=1, progress=False)
    assert capsys.readouterr().err == ""
    qat.fit(model, [(x[:100], y[:100])], epochs=1, progress=True)
    assert "training" in capsys.readouterr().err


def test_prepare_qat_leaves_the_model_alone_and_skips() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = copy.deepcopy(model.state_dict())
    state = torch.random.get_rng_state()
    prepared = qat.prepare_qat(model, ptq.W4A4_STATIC, skip=["2"], method="lsq")
    assert torch.equal(torch.random.get_rng_state(), state)  # no random initialisation of the copies
    assert isinstance(prepared[0], qat.QATLinear) and type(prepared[2]) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert prepared.training


# --------------------------------------------------------------------------------------------------------
# Low-bit integer modules (qbook.nn) and configs (qbook.ptq)
# --------------------------------------------------------------------------------------------------------


def test_low_bit_configs_and_integer_modules() -> None:
    assert (ptq.W4A4_STATIC.weight.qmin, ptq.W4A4_STATIC.weight.qmax) == (-7, 7)
    assert ptq.W2A8_STATIC.weight.qmax == 1 and ptq.W3A3_STATIC.activation.bits == 3
    for bits in range(2, 9):
        ptq.QuantConfig(QuantSpec(bits, True, True, True), PerChannel(0), QuantSpec(bits, False))
    with pytest.raises(ValueError, match="2..8-bit"):
        ptq.QuantConfig(activation=QuantSpec(12, True))
    torch.manual_seed(0)
    layer = nn.Linear(32, 4)
    q = QuantLinear.from_float(layer, activation="static", act_spec=QuantSpec(4, False),
                               weight_spec=INT4_SYM, input_qparams=(0.1, 3))
    assert q.weight.dtype == torch.int8 and int(q.weight.abs().max()) == 7
    assert repr(q) == "QuantLinear(32→4, W4 per-channel sym, A4 per-tensor static asym)"
    x = randn(5, 32)
    codes = quantize(x, 0.1, 3, 0, 15)
    acc = (codes.long() - 3) @ q.weight.long().T + q.bias.long()  # a naive int64 reference
    assert torch.equal(q(x), acc.float() * q.acc_scale)


def test_low_bit_dynamic_quant_linear_matches_its_definition() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 3)
    spec = QuantSpec(4, True, narrow_range=True, symmetric=True)
    q = QuantLinear.from_float(layer, act_spec=spec, weight_spec=spec)
    x = randn(6, 16)
    s_x = x.abs().amax(dim=1, keepdim=True) / 7  # (7.2) with Q = 7: one scale per token
    q_x = quantize(x, s_x, 0, -7, 7, granularity=PerChannel(0))
    acc = q_x.long() @ q.weight.long().T  # naive int64
    expected = acc.float() * s_x * q.weight_scale + layer.bias.detach()
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-6)
    assert repr(q) == "QuantLinear(16→3, W4 per-channel sym, A4 per-token dyn)"


def test_integer_modules_take_given_weight_scales() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    scale = torch.tensor([0.01, 0.02, 0.05])
    q = QuantConv2d.from_float(conv, weight_scale=scale, weight_spec=INT4_SYM)
    expected = quantize(conv.weight.detach(), scale.reshape(3, 1, 1, 1), 0, -7, 7)
    assert torch.equal(q.weight, expected) and torch.equal(q.weight_scale, scale)
    for bad, err in ((torch.tensor([0.1, 0.2]), ValueError), (torch.tensor([0.1, -1.0, 0.1]), ValueError),
                     ([0.1, 0.2, 0.3], TypeError), (torch.tensor([1, 2, 3]), TypeError)):
        with pytest.raises(err, match="weight_scale"):
            QuantConv2d.from_float(conv, weight_scale=bad)


def test_dequantized_integer_weight_is_the_fake_quantized_weight_lsq() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    prepared = qat.prepare_qat(nn.Sequential(layer), ptq.W4A4_STATIC, method="lsq")
    with torch.no_grad():
        prepared[0].weight_fake_quant.scale.mul_(0.7)  # a learned scale, not the rows' maxima
    prepared(randn(8, 16))
    integer = qat.convert(prepared)
    w_hat = prepared[0].weight_fake_quant(prepared[0].weight).detach()
    assert torch.equal(dequantize(integer[0].weight, integer[0].weight_scale[:, None], 0), w_hat)


# --------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the value
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(9, 16))
def test_fake_quantizers_refuse_wide_grids(bits: int) -> None:
    for cls in (qat.FakeQuantize, qat.LearnedScaleFakeQuantize):
        with pytest.raises(ValueError, match=f"bits={bits}"):
            cls(QuantSpec(bits, True))


@settings(max_examples=30, deadline=None)
@given(bad=st.one_of(st.integers(), st.text(max_size=5), st.just(None), st.floats(allow_nan=False)))
def test_fake_quantizers_refuse_non_specs(bad) -> None:
    if bad is None:
        return  # None is the default granularity, not a spec; spec=None is covered below
    for cls in (qat.FakeQuantize, qat.LearnedScaleFakeQuantize):
        with pytest.raises(TypeError, match="spec must be a QuantSpec"):
            cls(bad)


def test_fake_quantizers_refuse_bad_arguments() -> None:
    with pytest.raises(TypeError, match="spec must be a QuantSpec.*got None"):
        qat.FakeQuantize(None)
    with pytest.raises(TypeError, match="PerGroup"):
        qat.FakeQuantize(INT8, PerGroup(1, 4))
    with pytest.raises(TypeError, match="observer"):
        qat.FakeQuantize(INT8, observer=3)
    with pytest.raises(ValueError, match="symmetric grid"):
        qat.LearnedScaleFakeQuantize(INT8_SYMMETRIC, learn_zero_point=True)
    with pytest.raises(ValueError, match="init must be"):
        qat.LearnedScaleFakeQuantize(init="mse")
    with pytest.raises(TypeError, match="learn_zero_point"):
        qat.LearnedScaleFakeQuantize(learn_zero_point=1)
    with pytest.raises(ValueError, match="FakeQuantize has seen no data"):  # a ValueError, not RuntimeError
        qat.FakeQuantize().freeze()(torch.ones(3))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), where=st.integers(0, 39), value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_fake_quantizers_refuse_non_finite_input(n: int, where: int, value: float) -> None:
    x = randn(n)
    x[where % n] = value
    for fq in (qat.FakeQuantize(), qat.LearnedScaleFakeQuantize()):
        with pytest.raises(ValueError, match="NaN|infinite|finite"):
            fq(x)
    frozen = qat.FakeQuantize()
    frozen(randn(4))
    frozen.freeze()
    if math.isnan(value):
        with pytest.raises(ValueError, match="NaN"):
            frozen(x)
    for bad in (torch.arange(3), [1.0, 2.0], torch.ones(0)):
        with pytest.raises((TypeError, ValueError), match="floating-point|empty"):
            qat.FakeQuantize()(bad)


def test_lsq_fake_quantize_refuses_bad_arguments() -> None:
    x, s, z = randn(4), torch.tensor(0.1), torch.tensor(0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        qat.lsq_fake_quantize(x, torch.tensor(-0.1), z, -8, 7)
    with pytest.raises(ValueError, match="qmin=7, qmax=-8"):
        qat.lsq_fake_quantize(x, s, z, 7, -8)
    with pytest.raises(TypeError, match="qmin and qmax must be ints"):
        qat.lsq_fake_quantize(x, s, z, -8.0, 7)
    with pytest.raises(ValueError, match="does not broadcast"):
        qat.lsq_fake_quantize(x, torch.ones(3), z, -8, 7)
    with pytest.raises(TypeError, match="zero_point must be a floating-point"):
        qat.lsq_fake_quantize(x, s, 0, -8, 7)


def test_workflow_errors_name_the_problem() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="static config"):
        qat.prepare_qat(model, ptq.W8A8_DYNAMIC)
    with pytest.raises(ValueError, match="static config"):
        qat.prepare_qat(model, ptq.W8_WEIGHT_ONLY)
    with pytest.raises(TypeError, match="QuantConfig"):
        qat.prepare_qat(model, "W4A4")
    with pytest.raises(ValueError, match="method must be 'fake' or 'lsq', got 'sgd'"):
        qat.prepare_qat(model, method="sgd")
    with pytest.raises(ValueError, match="learn_zero_point.*lsq"):
        qat.prepare_qat(model, learn_zero_point=True)
    with pytest.raises(ValueError, match="init must be 'lsq' or 'minmax', got 'mse'"):
        qat.prepare_qat(model, method="lsq", init="mse")
    prepared = qat.prepare_qat(model)
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare_qat(prepared)
    with pytest.raises(ValueError, match="seen no data"):
        qat.convert(prepared)
    with pytest.raises(ValueError, match="no QAT layers"):
        qat.convert(model)
    with pytest.raises(ValueError, match="groups=1"):
        qat.prepare_qat(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        qat.fold_batchnorm("model")
    for kw, match in (({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"progress": 1}, "progress"),
                      ({"batch_size": 2.5}, "batch_size"), ({"loss": 3}, "loss")):
        with pytest.raises((TypeError, ValueError), match=match):
            qat.fit(prepared, (torch.ones(2, 4), torch.zeros(2, dtype=torch.long)), **kw)
    with pytest.raises(TypeError, match="data must be"):
        qat.fit(prepared, torch.ones(2, 4))
    with pytest.raises(ValueError, match="quantizer_lr must be a positive number"):
        qat.fit(prepared, (torch.ones(2, 4), torch.zeros(2, dtype=torch.long)), quantizer_lr=0.0)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return qat.prepare_qat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))


def test_fit_refuses_x_and_y_of_different_lengths() -> None:
    x, y = randn(64, 16), torch.arange(64) % 4
    for rows in (10, 100):  # shorter: an IndexError before; longer: trained on the first 64 rows silently
        with pytest.raises(ValueError, match=f"data: x has {rows} rows and y has 64"):
            qat.fit(small_mlp(), (randn(rows, 16), y), progress=False)
    with pytest.raises(ValueError, match=r"data\[1\]: x has 8 rows and y has 7"):
        qat.fit(small_mlp(), [(x[:8], y[:8]), (x[:8], y[:7])], progress=False)


def test_fit_refuses_data_that_is_not_x_y_tensors() -> None:
    x, y = randn(64, 16), torch.arange(64) % 4
    cases = [
        ([x], TypeError, r"a tuple \(x, y\) of two tensors .* got a list of 1 item\(s\) \(Tensor\)"),
        ((x, y, y), TypeError, r"got a tuple of 3 item\(s\)"),
        ([x, y], TypeError, r"got a list of 2 item\(s\) \(Tensor, Tensor\)"),
        ((x.tolist(), y.tolist()), TypeError, r"data: x must be a tensor, got a list of 64 item\(s\)"),
        ((x, y.tolist()), TypeError, r"data: y must be a tensor, got a list of 64 item\(s\)"),
        ([(x, y.tolist())], TypeError, r"data\[0\]: y must be a tensor, got a list"),
        ([x[:8]], TypeError, "a tuple"),
        ([(x, y, y)], TypeError, r"data\[0\] must be an \(x, y\) pair of tensors, got a tuple of 3"),
        ((x.double(), y), TypeError, "x is torch.float64 but the model's parameters are torch.float32"),
        ((x.half(), y), TypeError, "x is torch.float16 but the model's parameters are torch.float32"),
        ((x, y.float()), TypeError, r"cross-entropy.*got a torch.float32 tensor of shape \(64,\)"),
        ((x, y.int()), TypeError, r"cross-entropy.*got a torch.int32 tensor"),
        ((x, torch.tensor(1)), ValueError, "y must have a batch dimension"),
        ({"x": x}, TypeError, "got a dict"),
        ((b for b in [(x, y)]), ValueError, "one-shot generator"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            qat.fit(small_mlp(), data, epochs=2, progress=False)


def test_fit_accepts_what_the_loss_accepts() -> None:
    x, y = randn(64, 16), torch.arange(64) % 4
    probabilities = torch.softmax(randn(64, 4), dim=1)  # cross-entropy's soft labels
    assert len(qat.fit(small_mlp(), (x, probabilities), progress=False)) == 1
    assert len(qat.fit(small_mlp(), (x, y.to(torch.uint8)), progress=False)) == 1

    def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs[:, 0] - targets) ** 2).mean()

    assert len(qat.fit(small_mlp(), (x, y.float()), loss=mse, progress=False)) == 1  # y is the loss's call
    # a DataLoader of batches trains exactly as the same batches in a list
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    assert qat.fit(small_mlp(), loader, epochs=2, progress=False) == qat.fit(
        small_mlp(), batches, epochs=2, progress=False
    )
    assert len(qat.fit(small_mlp(), iter(batches), epochs=1, progress=False)) == 1


def test_lsq_scales_stay_positive_however_large_the_step() -> None:
    x, y = randn(64, 16), torch.arange(64) % 4
    torch.manual_seed(0)
    model = qat.prepare_qat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), method="lsq")
    qat.fit(model, (x, y), epochs=3, lr=100.0, progress=False)  # ended with weight scales near -51 before
    scales = [m.scale.detach() for m in model.modules() if isinstance(m, qat.LearnedScaleFakeQuantize)]
    assert len(scales) == 4 and all(bool((s >= torch.finfo(torch.float32).eps).all()) for s in scales)
    # a hand-written loop: the forward pass projects a negative scale back to eps, gradient unchanged
    lsq = qat.LearnedScaleFakeQuantize(INT4_SYM)
    lsq(randn(32))
    with torch.no_grad():
        lsq.scale.fill_(-0.5)
    v = randn(32).requires_grad_()
    out = lsq(v)
    eps = torch.tensor(torch.finfo(torch.float32).eps, requires_grad=True)
    reference = qat.lsq_fake_quantize(v, eps, torch.tensor(0.0), -7, 7)
    assert float(lsq.scale.detach()) == float(eps.detach()) and torch.equal(out, reference)
    out.sum().backward()
    reference.sum().backward()
    assert torch.equal(lsq.scale.grad, eps.grad) and float(lsq.scale.grad) != 0.0


def test_fit_gives_the_learned_quantizer_parameters_their_own_learning_rate() -> None:
    x, y = digits("calibration")
    torch.manual_seed(0)
    model = qat.prepare_qat(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), ptq.W4A4_STATIC, method="lsq")
    model(x[:8])  # initialise the input scale
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    qat.fit(model, [(x[:50], y[:50])], epochs=1, lr=1e-2, quantizer_lr=1e-9, progress=False)
    for name, p in model.named_parameters():
        moved = float((p.detach() - before[name]).abs().max())
        # Adam's first step moves every parameter by about its learning rate
        assert (moved < 1e-8) if "fake_quant" in name else (moved > 1e-3), name


def test_converted_qat_model_saves_and_loads_exactly(tmp_path, trained) -> None:
    x, _ = digits("calibration")
    model = qat.prepare_qat(trained, ptq.W4A4_STATIC)
    model(x)
    integer = qat.convert(model.eval())
    path = tmp_path / "w4a4.safetensors"
    ptq.save(integer, path)
    loaded = ptq.load(path, DigitsCNN())
    assert torch.equal(loaded(x), integer(x))
    assert repr(loaded.conv2) == repr(integer.conv2)
