"""Tests for qbook.rotation: Hadamard matrices against scipy and their orthogonality, the fast transforms
against the matrices, kurtosis against scipy.stats, rotated layers and models exact in float (MiniLM too), and
their composition with chapter 5's simulated W4A4 and chapter 7's weight-only RTN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbook import rotation
from qbook.affine import QuantSpec, fake_quantize
from qbook.data import randn
from qbook.granularity import PerChannel
from qbook.nn import WeightOnlyLinear
from qbook.outliers import LinearQuantConfig, quantize_linears
from qbook.ptq import quantize_weights


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's tests, restored afterwards (a module-level set_grad_enabled(False) would
    leak into every test that runs later in the same process)."""
    with torch.no_grad():
        yield

SUPPORTED = [1, 2, 4, 8, 12, 20, 24, 44, 48, 60, 96, 384, 1536]


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, q))


# --------------------------------------------------------------------------------------------------------
# Hadamard matrices
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(11))
def test_sylvester_equals_scipy(k):
    n = 2**k
    expected = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64) / math.sqrt(n))
    assert torch.equal(rotation.hadamard(n, torch.float64), expected)
    assert torch.equal(rotation.hadamard(n), expected.float())


@pytest.mark.parametrize("n", SUPPORTED)
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = rotation.hadamard(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64), rtol=1e-15)


def test_factors_of_known_sizes():
    assert rotation.hadamard_factors(384) == (12, 32)
    assert rotation.hadamard_factors(1536) == (12, 128)
    assert rotation.hadamard_factors(4096) == (1, 4096)
    assert rotation.hadamard_factors(20) == (20, 1)
    assert rotation.hadamard_factors(44 * 8) == (44, 8)
    assert rotation.hadamard_factors(12) == (12, 1)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000))
def test_factors_are_a_supported_split_or_a_clear_refusal(n):
    try:
        m, p = rotation.hadamard_factors(n)
    except ValueError as e:
        assert f"order {n}" in str(e)
        assert n & (n - 1) != 0  # powers of two are always supported
        splits = [n >> j for j in range(n.bit_length()) if n % (1 << j) == 0]
        assert not any(_prime(m - 1) and (m - 1) % 4 == 3 for m in splits)
        return
    assert m * p == n and p & (p - 1) == 0
    assert m == 1 or rotation._paley_order(m)


@pytest.mark.parametrize("n", [3, 5, 6, 10, 28, 36, 1004, 0, -4, True, 2.0, "8"])
def test_unsupported_sizes_are_refused(n):
    with pytest.raises(ValueError, match="Hadamard|positive int"):
        rotation.hadamard(n)


# --------------------------------------------------------------------------------------------------------
# Fast transforms
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 64, 1024])
def test_fwht_equals_the_matrix(n):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(rotation.fwht(x), x @ rotation.hadamard(n, torch.float64).T, atol=1e-12)
    x32 = x.float()
    assert torch.allclose(rotation.fwht(x32), x32 @ rotation.hadamard(n).T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(rotation.fwht(rotation.fwht(x)), x, atol=1e-12)  # H = H^T = H^-1 for Sylvester


@pytest.mark.parametrize("n", [12, 24, 20, 48, 384, 1536])
def test_hadamard_transform_equals_the_matrix(n):
    torch.manual_seed(n)
    x = torch.randn(4, n, dtype=torch.float64)
    h = rotation.hadamard(n, torch.float64)
    assert torch.allclose(rotation.hadamard_transform(x), x @ h.T, atol=1e-12)
    assert torch.allclose(rotation.hadamard_transform(x) @ h, x, atol=1e-12)  # the inverse is H^T


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.ones(3, 12), "power-of-two"),
        (torch.tensor([1.0, math.nan]), "NaN"),
        (torch.tensor([1.0, math.inf]), "infinite"),
        (torch.ones(4, dtype=torch.int64), "floating-point"),
        (torch.tensor(1.0), "non-empty last axis"),
        (torch.ones(2, 0), "non-empty last axis"),
        ([1.0, 2.0], "floating-point"),
    ],
)
def test_fwht_bad_input(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rotation.fwht(x)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200))
def test_hadamard_transform_refuses_or_is_exact(n):
    x = torch.ones(2, n, dtype=torch.float64)
    if rotation._hadamard_factors(n) is None:
        with pytest.raises(ValueError, match=f"order {n}"):
            rotation.hadamard_transform(x)
    else:
        assert torch.allclose(rotation.hadamard_transform(x), x @ rotation.hadamard(n, torch.float64).T)


# --------------------------------------------------------------------------------------------------------
# Kurtosis
# --------------------------------------------------------------------------------------------------------


def test_kurtosis_equals_scipy_pearson():
    torch.manual_seed(0)
    x = torch.randn(7, 300, dtype=torch.float64) ** 3
    for dim in (None, 0, 1, -1):
        expected = scipy.stats.kurtosis(x.numpy(), axis=dim, fisher=False, bias=True)
        assert np.allclose(rotation.kurtosis(x, dim).numpy(), expected, rtol=1e-10)
    assert float(rotation.kurtosis(torch.randn(200_000, dtype=torch.float64))) == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("dim", [2, -3, 1.0, True])
def test_kurtosis_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        rotation.kurtosis(torch.ones(3, 4), dim)


def test_kurtosis_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        rotation.kurtosis(torch.ones(5, 1), dim=1)


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-1e6, 1e6), n=st.integers(2, 50))
def test_kurtosis_of_constant_data_is_refused(value, n):
    """Zero variance: the kurtosis is 0/0 (it returned NaN); now a clear error, per slice with dim."""
    with pytest.raises(ValueError, match="constant"):
        rotation.kurtosis(torch.full((n,), value))
    x = randn(3, n)
    x[1] = value
    with pytest.raises(ValueError, match="1 slice"):
        rotation.kurtosis(x, dim=1)
    assert torch.isfinite(rotation.kurtosis(x, dim=0)).all()  # every column varies


# --------------------------------------------------------------------------------------------------------
# Rotated layers and models
# --------------------------------------------------------------------------------------------------------


def _linear(k: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    lin.weight.copy_(randn(n, k) * 0.1)
    lin.bias.copy_(randn(n) * 0.1)
    return lin


def _loud(t: int, k: int, loud=(3, 17), factor: float = 40.0, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    gain = torch.ones(k)
    gain[list(loud)] = factor
    return randn(t, k) * gain


@pytest.mark.parametrize("k", [16, 12, 48])
def test_rotated_linear_is_exact_in_float(k):
    lin = _linear(k, 10)
    signs = torch.tensor([1.0, -1.0] * (k // 2))
    rotated = rotation.RotatedLinear.from_float(lin, signs)
    h = rotation.hadamard(k, torch.float64)
    expected = (lin.weight.double() * signs.double()) @ h.T  # W D H^T
    assert torch.allclose(rotated.linear.weight.double(), expected, atol=1e-7)
    x = randn(6, k)
    assert torch.allclose(rotated(x), lin(x), atol=1e-5)
    assert torch.equal(rotated.linear.bias, lin.bias) and rotated.linear is not lin


def test_rotate_linears_seeded_signs_and_filter():
    model = nn.Sequential(_linear(16, 24), nn.GELU(), _linear(24, 12), nn.GELU(), _linear(12, 5))
    a, folds = rotation.rotate_linears(model, seed=3)
    b, _ = rotation.rotate_linears(model, seed=3)
    assert [f.how for f in folds] == ["hadamard"] * 3 and folds[1].into == ("2",)
    assert torch.equal(a[0].signs, b[0].signs) and not bool((a[0].signs == 1).all())
    assert set(a[0].signs.tolist()) == {-1.0, 1.0}
    x = randn(8, 16)
    assert torch.allclose(a(x), model(x), atol=1e-5)
    only_last, folds = rotation.rotate_linears(model, lambda name, m: name == "4")
    assert type(only_last[0]) is nn.Linear and isinstance(only_last[4], rotation.RotatedLinear)
    assert torch.equal(only_last[4].signs, torch.ones(12)) and len(folds) == 1


def test_rotate_linears_refuses_unsupported_sizes():
    model = nn.Sequential(_linear(10, 4))
    with pytest.raises(ValueError, match="'0' reads 10 features"):
        rotation.rotate_linears(model)
    for bad, match in (
        (dict(seed=1.5), "seed"),
        (dict(inplace=1), "inplace"),
        (dict(module_filter=3), "callable"),
    ):
        with pytest.raises(TypeError, match=match):
            rotation.rotate_linears(nn.Sequential(_linear(8, 4)), **bad)


def test_rotate_linears_refuses_shared_layers():
    """One nn.Linear at two places: its weight was rotated in place but only one place rotated its input."""
    lin = _linear(16, 16)
    with pytest.raises(ValueError, match=r"'0' is one module reachable under the names \['0', '2'\]"):
        rotation.rotate_linears(nn.Sequential(lin, nn.ReLU(), lin))


def test_rotation_spreads_outliers():
    """A few loud channels: kurtosis of each token falls to about 3 after the rotation, and max |x| drops."""
    x = _loud(256, 384, loud=(5, 77, 300))
    before = float(rotation.kurtosis(x, dim=-1).median())
    rotated = rotation.hadamard_transform(x)
    after = float(rotation.kurtosis(rotated, dim=-1).median())
    assert before > 30 and after < 4
    assert rotated.abs().max() < 0.5 * x.abs().max()


def _w4a4():
    return LinearQuantConfig(
        weight=QuantSpec(4, True, narrow_range=True, symmetric=True),
        weight_granularity=PerChannel(0),
        activation=QuantSpec(4, True),
    )


def _simulate(model, calibration, x):
    layers = quantize_linears(model, _w4a4())
    model(calibration)
    for layer in layers.values():
        layer.freeze()
    return model(x), layers


def test_rotation_composes_with_simulated_w4a4():
    """Chapter 5's FakeQuantLinear wraps the rotated layer's inner linear: it quantizes H x and W H^T. The
    output equals that computation written out, and is closer to the float output than W4A4 without it."""
    k, loud = 256, (3, 17, 100)
    model = nn.Sequential(_linear(k, 32))
    calibration, x = _loud(512, k, loud, 30.0, seed=1), _loud(64, k, loud, 30.0, seed=2)
    rotated, _ = rotation.rotate_linears(model)
    out, layers = _simulate(rotated, calibration, x)
    assert list(layers) == ["0.linear"]
    fq = layers["0.linear"]
    xr = rotation.hadamard_transform(x)
    w = rotation.RotatedLinear.from_float(model[0]).linear.weight
    w_scale = w.abs().amax(dim=1, keepdim=True) / 7
    w_hat = fake_quantize(w, w_scale, 0, -7, 7)
    expected = fake_quantize(xr, fq.scale, fq.zero_point, -8, 7) @ w_hat.T + model[0].bias
    assert torch.allclose(out, expected, atol=1e-5)
    ref = model(x)
    plain, _ = _simulate(nn.Sequential(_linear(k, 32)), calibration, x)
    error = lambda y: float(((y - ref) ** 2).sum() / (ref**2).sum())  # noqa: E731
    assert error(out) < 0.5 * error(plain)


def test_rotation_composes_with_weight_only_rtn():
    model = nn.Sequential(_linear(48, 16), nn.GELU(), _linear(16, 4))
    rotated, _ = rotation.rotate_linears(model, seed=0)
    q = quantize_weights(rotated, bits=8, group_size=None)
    assert isinstance(q[0], rotation.RotatedLinear) and isinstance(q[0].linear, WeightOnlyLinear)
    x = randn(5, 48)
    assert torch.allclose(q(x), model(x), atol=1e-2)


@pytest.fixture(scope="module")
def minilm():
    from qbook.models import load_minilm

    return load_minilm()


def test_minilm_rotated_embeddings_equal(minilm):
    from qbook.data import sentences
    from qbook.models import embed

    texts = sentences(8)
    rotated, folds = rotation.rotate_linears(minilm, seed=0)
    assert len(folds) == 37  # 6 per layer and the pooler
    ref, out = embed(minilm, texts), embed(rotated, texts)
    assert (out - ref).abs().max() < 1e-5
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99999
