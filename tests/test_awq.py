"""Tests for qbook.awq: RTN as WeightOnlyLinear stores it, AWQ's scales and search against a naive
reference, the folds (float output unchanged, on toy models, a small BERT and MiniLM), quantize_model, the
salient-channel helpers, and clear errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbook import awq, gptq
from qbook.affine import QuantSpec
from qbook.data import randn
from qbook.nn import WeightOnlyLinear
from qbook.ptq import quantize_weights


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's tests, restored afterwards (a module-level set_grad_enabled(False) would
    leak into every test that runs later in the same process)."""
    with torch.no_grad():
        yield


def _linear(k: int, n: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.copy_(randn(n, k) * 0.1)
    if bias:
        lin.bias.copy_(randn(n) * 0.1)
    return lin


def _error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return gptq.output_error(w, w_hat, gptq.hessian(x), relative=True)


def _loud_inputs(
    t: int, k: int, seed: int = 0, loud: tuple[int, ...] = (3,), factor: float = 30.0
) -> torch.Tensor:
    torch.manual_seed(seed)
    gain = torch.ones(k)
    gain[list(loud)] = factor
    return randn(t, k) * gain


# --------------------------------------------------------------------------------------------------------
# RTN, scales, search
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, group_size, k, spec",
    [
        (4, 128, 256, None),
        (3, 128, 200, None),  # K padded to whole groups
        (4, None, 96, None),  # per output channel
        (8, 32, 64, None),
        (4, 16, 48, QuantSpec(4, False)),  # affine: zero points
    ],
)
def test_rtn_equals_weight_only_linear(bits, group_size, k, spec):
    lin = _linear(k, 24, seed=bits)
    stored = WeightOnlyLinear.from_float(
        lin, bits=bits, group_size=group_size, spec=spec
    ).dequantized_weight()
    assert torch.equal(awq.rtn(lin.weight, bits, group_size, spec=spec), stored)


def test_awq_scales_formula():
    act_mean = torch.tensor([0.0, 0.5, 2.0, 8.0])
    for alpha in (0.0, 0.3, 0.5, 0.95):
        s = np.maximum(act_mean.double().numpy() ** alpha, 1e-4)
        expected = s / math.sqrt(s.max() * s.min())
        assert np.allclose(awq.awq_scales(act_mean, alpha).numpy(), expected, rtol=1e-6)
    assert torch.equal(awq.awq_scales(act_mean, 0.0), torch.ones(4))


def _naive_search(x, weights, bits, group_size, alphas):
    """AWQ's search written out: per alpha, scale the weights, quantize each with WeightOnlyLinear, run the
    scaled layer on x / s in float64, compare with the float layer's output."""
    x64 = x.double()
    mean = x64.abs().mean(dim=0)
    ys = [x64 @ w.double().T for w in weights]
    errors = []
    for alpha in alphas:
        s = (mean**alpha).clamp(min=1e-4)
        s = (s / torch.sqrt(s.max() * s.min())).float()
        num = den = 0.0
        for w, y in zip(weights, ys, strict=True):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.copy_(w * s)
            w_hat = WeightOnlyLinear.from_float(lin, bits=bits, group_size=group_size).dequantized_weight()
            y_hat = (x / s).double() @ w_hat.double().T
            num += float(((y_hat - y) ** 2).sum())
            den += float((y**2).sum())
        errors.append(num / den)
    return errors


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, None)])
def test_search_scales_matches_naive_reference(bits, group_size):
    x = _loud_inputs(300, 64, loud=(5, 40))
    weights = [_linear(64, 16, seed=1).weight, _linear(64, 8, seed=2).weight]
    alphas = (0.0, 0.25, 0.5, 0.75)
    found = awq.search_scales(x, weights, bits, group_size, alphas=alphas)
    expected = _naive_search(x, weights, bits, group_size, alphas)
    assert np.allclose(found.errors, expected, rtol=1e-4)
    assert found.alpha == alphas[int(np.argmin(expected))]
    assert torch.allclose(found.scale, awq.awq_scales(x.abs().mean(0), found.alpha))
    assert found.error == min(found.errors)


def test_search_beats_rtn_on_loud_channels():
    x = _loud_inputs(512, 128, loud=(1, 17, 90))
    found = awq.search_scales(x, _linear(128, 64).weight, 3, 64)
    assert found.errors[0] == pytest.approx(
        _error(x, _linear(128, 64).weight, awq.rtn(_linear(128, 64).weight, 3, 64)), rel=1e-5
    )
    assert found.alpha > 0 and found.error < 0.8 * found.errors[0]


# --------------------------------------------------------------------------------------------------------
# Salient channels
# --------------------------------------------------------------------------------------------------------


def test_salient_channels_top_k():
    absmax = randn(400).abs()
    keep = awq.salient_channels(absmax, 0.01)
    assert keep.tolist() == sorted(range(400), key=lambda j: -float(absmax[j]))[:4]
    assert awq.salient_channels(absmax, 1e-6).numel() == 1


def test_quantize_keeping():
    w = _linear(256, 32).weight
    keep = torch.tensor([3, 200])
    w_hat = awq.quantize_keeping(w, keep, 4, 128)
    assert torch.equal(w_hat[:, keep], w[:, keep])
    rest = w.clone()
    rest[:, keep] = 0
    others = torch.ones(256, dtype=torch.bool)
    others[keep] = False
    assert torch.equal(w_hat[:, others], awq.rtn(rest, 4, 128)[:, others])
    w8 = awq.quantize_keeping(w, keep, 4, 128, keep_bits=8)
    assert torch.equal(w8[:, others], w_hat[:, others])
    assert torch.equal(w8[:, keep], awq.rtn(w[:, keep], 8, None))
    assert not torch.equal(w8[:, keep], w[:, keep])


def test_salient_by_activation_beats_random():
    """AWQ's observation on data with a few loud channels: keeping 1% chosen by activation helps, a random
    1% hardly does."""
    x = _loud_inputs(512, 512, loud=(7, 100, 333, 401, 480), factor=20.0)
    w = _linear(512, 64).weight
    rtn_error = _error(x, w, awq.rtn(w, 3, 128))
    salient = _error(x, w, awq.quantize_keeping(w, awq.salient_channels(x.abs().mean(0), 0.01), 3, 128))
    torch.manual_seed(0)
    random = _error(x, w, awq.quantize_keeping(w, torch.randperm(512)[:5], 3, 128))
    assert salient < 0.5 * rtn_error
    assert random > 0.8 * rtn_error


# --------------------------------------------------------------------------------------------------------
# Folding: the float function is unchanged
# --------------------------------------------------------------------------------------------------------


class PreLN(nn.Module):
    """A pre-LN block: LN -> (fc_a, fc_b) summed -> GELU -> fc2, then fc3 on fc2's output (a linear chain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.ln.weight.copy_(1 + 0.1 * randn(16))
        self.ln.bias.copy_(0.1 * randn(16))
        self.fc_a, self.fc_b = _linear(16, 32, 1), _linear(16, 32, 2)
        self.act = nn.GELU()
        self.fc2, self.fc3 = _linear(32, 24, 3), _linear(24, 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.fc3(self.fc2(self.act(self.fc_a(h) + self.fc_b(h))))


PRELN_GROUPS = [
    awq.ScaleGroup(("fc_a", "fc_b"), "layernorm", "ln"),
    awq.ScaleGroup(("fc2",), "activation", "act"),
    awq.ScaleGroup(("fc3",), "linear", "fc2"),
]


def _random_scales(ks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.exp(torch.randn(k, generator=g, dtype=torch.float64) * 1.5).float() for k in ks]


def test_apply_scales_every_fold_keeps_the_function():
    model = PreLN()
    x = randn(10, 16) * 3
    scales = _random_scales([16, 32, 24])
    scaled, folds = awq.apply_scales(model, PRELN_GROUPS, scales)
    assert torch.allclose(scaled(x), model(x), rtol=1e-5, atol=1e-5)
    assert [(f.how, f.into) for f in folds] == [
        ("layernorm", ("ln",)),
        ("activation", ("act",)),
        ("linear", ("fc2",)),
    ]
    assert torch.allclose(scaled.fc_a.weight, model.fc_a.weight * scales[0])
    assert torch.allclose(scaled.ln.weight, model.ln.weight / scales[0])
    assert torch.allclose(scaled.fc2.weight, model.fc2.weight * scales[1] / scales[2][:, None])
    assert isinstance(scaled.act, awq.ScaledActivation) and torch.equal(
        model.fc_a.weight, PreLN().fc_a.weight
    )
    explicit, folds = awq.apply_scales(model, [awq.ScaleGroup(("fc_a", "fc_b"))], scales[:1])
    assert isinstance(explicit.fc_a, awq.ScaledInput) and folds[0].linears == ("fc_a.linear", "fc_b.linear")
    assert torch.allclose(explicit(x), model(x), rtol=1e-5, atol=1e-5)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def test_bert_groups_and_float_equivalence():
    bert = _tiny_bert()
    groups = awq.bert_groups(bert)
    assert [g.how for g in groups] == ["input", "linear", "input", "activation"] * 2
    assert groups[1] == awq.ScaleGroup(
        ("encoder.layer.0.attention.output.dense",), "linear", "encoder.layer.0.attention.self.value"
    )
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    ref = bert(input_ids=ids).last_hidden_state
    scaled, _ = awq.apply_scales(bert, groups, _random_scales([32, 32, 32, 64] * 2))
    assert torch.allclose(scaled(input_ids=ids).last_hidden_state, ref, atol=2e-5)


def test_quantize_model_is_transform_then_rtn():
    bert = _tiny_bert()
    batches = [torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    run = lambda m, ids: m(input_ids=ids)  # noqa: E731
    skip = ("encoder.layer.1.attention.self.key",)
    q = awq.quantize_model(bert, batches, 4, 16, skip=skip, run=run)
    transformed, folds = awq.transform(bert, batches, 4, 16, skip=skip, run=run)
    assert all(f.alpha is not None for f in folds) and len(folds) == 8
    assert isinstance(q.get_submodule("encoder.layer.1.attention.self.key"), nn.Linear)
    r = quantize_weights(transformed, 4, 16, skip=("encoder.layer.1.attention.self.key",))
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert len(quantized) == 11 and not any(
        type(m) is nn.Linear for n, m in q.named_modules() if "key" not in n
    )
    for name, m in quantized.items():
        assert torch.equal(m.codes(), r.get_submodule(name).codes()), name
    ids = batches[0]
    assert torch.allclose(q(input_ids=ids).last_hidden_state, r(input_ids=ids).last_hidden_state, atol=1e-5)


def test_transform_skips_unreached_layers():
    model = nn.Sequential(_linear(8, 8), nn.ReLU(), _linear(8, 4))
    _, folds = awq.transform(
        model, [torch.randn(4, 8)], 4, None, groups=[awq.ScaleGroup(("0",)), awq.ScaleGroup(("2",))]
    )
    assert len(folds) == 2
    unused = nn.ModuleDict({"a": _linear(8, 8), "b": _linear(8, 8)})
    unused.forward = lambda x: unused["a"](x)  # b never runs
    _, folds = awq.transform(unused, [torch.randn(4, 8)], 4, None)
    assert [f.into for f in folds] == [("a",)]


@pytest.fixture(scope="module")
def minilm():
    from qbook.models import load_minilm

    return load_minilm()


def test_minilm_awq_folds_keep_embeddings(minilm):
    from qbook.data import sentences
    from qbook.models import embed

    texts = sentences(16)
    groups = awq.find_groups(minilm)
    assert len(groups) == 25  # 4 per layer, and the pooler alone (it runs; the sentence embedding ignores it)
    folded = awq.find_groups(minilm, explicit=False)
    assert [g.how for g in folded] == ["linear", "activation"] * 6
    ks = [minilm.get_submodule(g.linears[0]).in_features for g in groups]
    scaled, folds = awq.apply_scales(minilm, groups, _random_scales(ks))
    ref, out = embed(minilm, texts), embed(scaled, texts)
    assert (out - ref).abs().max() < 1e-5
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99999


def test_minilm_awq_beats_rtn_on_a_real_layer(minilm):
    """The inputs of the first layer's output dense (after GELU), 3-bit g128: AWQ's output error is below
    RTN's."""
    from qbook.data import sentences
    from qbook.models import embed

    layer = minilm[0].model.encoder.layer[0].output.dense
    rows = []
    handle = layer.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, 1536)))
    try:
        embed(minilm, sentences(24))
    finally:
        handle.remove()
    found = awq.search_scales(torch.cat(rows), layer.weight, 3, 128, alphas=(0.0, 0.25, 0.5, 0.75))
    assert found.alpha > 0 and found.error < 0.95 * found.errors[0]


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    alphas=st.one_of(
        st.just(()),
        st.lists(st.floats(allow_nan=True), min_size=1, max_size=4).filter(
            lambda a: any(not 0 <= v <= 1 for v in a)
        ),
        st.just((True,)),
        st.just("0.5"),
        st.just(0.5),
    )
)
def test_bad_alpha_grid(alphas):
    with pytest.raises((ValueError, TypeError), match="alpha"):
        awq.search_scales(randn(8, 4), randn(2, 4), alphas=alphas)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 6),
    bad=st.sampled_from(["nan", "inf", "shape", "int", "1d"]),
)
def test_bad_search_inputs(k, bad):
    x, w = randn(5, k), randn(3, k)
    if bad == "nan":
        x[0, 0] = math.nan
    elif bad == "inf":
        w[0, 0] = math.inf
    elif bad == "shape":
        w = randn(3, k + 1)
    elif bad == "int":
        x = torch.ones(5, k, dtype=torch.int32)
    else:
        x = randn(k)
    with pytest.raises((ValueError, TypeError), match="x|weights"):
        awq.search_scales(x, w, 4, None)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: awq.awq_scales(torch.tensor([1.0, -1.0]), 0.5), "non-negative"),
        (lambda: awq.awq_scales(torch.tensor([1.0, math.nan]), 0.5), "NaN"),
        (lambda: awq.awq_scales(torch.tensor([1.0]), 1.5), "alpha"),
        (lambda: awq.rtn(randn(4, 8), bits=1), "bits"),
        (lambda: awq.rtn(randn(4, 8), group_size=0), "group_size"),
        (lambda: awq.rtn(randn(4, 8), bits=4, spec=QuantSpec(8)), "bits"),
        (lambda: awq.salient_channels(torch.ones(10), 0.0), "fraction"),
        (lambda: awq.salient_channels(torch.ones(10), 1.5), "fraction"),
        (lambda: awq.quantize_keeping(randn(4, 8), torch.tensor([8]), 4, None), "column indices"),
        (lambda: awq.quantize_keeping(randn(4, 8), torch.tensor([0.5]), 4, None), "integer"),
        (lambda: awq.quantize_keeping(randn(4, 8), torch.tensor([1]), 4, None, keep_bits=16), "bits"),
        (lambda: awq.ScaleGroup(("a",), "layernorm"), "prev"),
        (lambda: awq.ScaleGroup(("a",), "magic", "b"), "how"),
        (lambda: awq.ScaleGroup("a"), "tuple"),
        (lambda: awq.apply_scales(PreLN(), PRELN_GROUPS, _random_scales([16, 32])), "one tensor per group"),
        (lambda: awq.apply_scales(PreLN(), PRELN_GROUPS[:1], [torch.ones(15)]), "shape"),
        (lambda: awq.apply_scales(PreLN(), PRELN_GROUPS[:1], [-torch.ones(16)]), "positive"),
        (
            lambda: awq.apply_scales(PreLN(), [awq.ScaleGroup(("fc_a", "fc2"))], [torch.ones(16)]),
            "in_features",
        ),
        (
            lambda: awq.apply_scales(PreLN(), [awq.ScaleGroup(("fc3",), "linear", "fc_a")], [torch.ones(24)]),
            "outputs",
        ),
        (lambda: awq.apply_scales(PreLN(), [awq.ScaleGroup(("nope",))], [torch.ones(16)]), "no layer"),
        (
            lambda: awq.apply_scales(
                PreLN(), [awq.ScaleGroup(("fc_a",), "layernorm", "act")], [torch.ones(16)]
            ),
            "LayerNorm",
        ),
        (lambda: awq.transform(PreLN(), [randn(2, 16)], skip=("nope",)), "skip"),
        (
            lambda: awq.apply_scales(
                PreLN(), [awq.ScaleGroup(("fc2",), "activation", "gelu")], [torch.ones(32)]
            ),
            "gelu",
        ),
        (lambda: awq.transform(PreLN(), randn(2, 16)), "batches"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_no_calibration_data_is_refused():
    """Empty batches reached no layer, and AWQ silently became RTN; now it says so (as GPTQ does)."""
    model = nn.Sequential(_linear(16, 32), nn.ReLU(), _linear(32, 4))
    for run in (awq.transform, awq.quantize_model):
        with pytest.raises(ValueError, match="no layer saw any input"):
            run(model, [], 4, 8)
    with pytest.raises(ValueError, match="no layer saw any input"):
        quantize_weights(model, 4, 8, "awq", [])


def test_shared_layers_are_refused():
    """One module at two places: only one was wrapped, and the in-place scaling changed the other."""
    lin = _linear(16, 16)
    for run in (awq.transform, awq.quantize_model):
        with pytest.raises(ValueError, match=r"'0' is one module reachable under the names \['0', '2'\]"):
            run(nn.Sequential(lin, nn.ReLU(), lin), [randn(8, 16)], 4, 8)
    ln = nn.LayerNorm(16)  # a LayerNorm whose weight the fold would divide, used at two places
    with pytest.raises(ValueError, match=r"\['0', '2'\]"):
        awq.transform(
            nn.Sequential(ln, _linear(16, 16), ln), [randn(8, 16)], 4, None,
            groups=[awq.ScaleGroup(("1",), "layernorm", "0")],
        )


def test_search_refuses_zero_and_overflowing_outputs():
    x, w = randn(32, 16), randn(8, 16)
    with pytest.raises(ValueError, match="zero on x"):
        awq.search_scales(torch.zeros(4, 16), w, 4, 8)
    with pytest.raises(ValueError, match="zero on x"):
        awq.search_scales(x, torch.zeros(8, 16), 4, 8)
    with pytest.raises(ValueError, match="overflows float32"):
        awq.search_scales(x * 1e30, w, 4, 8)  # the error was NaN (inf / inf)
    found = awq.search_scales(x * 1e10, w, 4, 8)  # large but representable: a finite answer
    assert all(math.isfinite(e) for e in found.errors) and found.error <= found.errors[0]


def test_a_batch_the_model_cannot_run_is_named():
    model = nn.Sequential(_linear(16, 4))
    with pytest.raises(ValueError, match="calibration batch 1 could not run through the model") as info:
        awq.transform(model, [randn(4, 16), randn(4, 7)], 4, None)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="calibration callable failed") as info:
        awq.transform(model, lambda m: m(randn(4, 16)), 4, None)  # a callable takes no arguments
    assert isinstance(info.value.__cause__, TypeError)
