"""Real text for the book's experiments, taken from what ships with Python — chapters 5 and 6.

Calibrating and evaluating a quantized sentence encoder needs sentences that nobody wrote for the purpose.
Every Python installation carries hundreds of them: the first sentence of the docstring of each public
function and class of the standard library ("Return the arc cosine (measured in radians) of x."). They are
real English written by many authors, short, varied in vocabulary, and available offline.

:func:`sentences` collects them from a fixed list of pure-Python, platform-independent modules
(:data:`SOURCE_MODULES`), keeps the ones that look like a sentence (:func:`is_sentence`), drops duplicates and
returns them in a fixed order (sorted by the SHA-256 of the text, which mixes the modules; the order of one
sentence does not depend on which others are present).

The sentences are collected in a fresh interpreter (``python -I -S``), so that nothing imported into the
calling process can change them (torch, for one, replaces ``inspect.getfile`` with its own function). They
depend on the Python version, since docstrings change between releases: the book is executed with CPython
3.11.7, which gives 592 sentences; another version gives a similar but not identical list.

>>> s = sentences(3)
>>> len(s), all(is_sentence(t) for t in s)
(3, True)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["SOURCE_MODULES", "is_sentence", "randn", "sentences"]

#: Standard-library modules whose public functions and classes supply the sentences: pure Python or with
#: documentation that does not depend on the platform (no ``os``, ``socket``, ``ssl``, ``asyncio``).
SOURCE_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email",
    "email.message", "enum", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "graphlib",
    "gzip", "heapq", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "logging.handlers", "mailbox", "math", "mimetypes", "numbers", "operator",
    "optparse", "pathlib", "pickle", "pprint", "queue", "random", "re", "reprlib", "sched", "shlex", "shutil",
    "smtplib", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip

MIN_WORDS = 6
MAX_WORDS = 40
_ALLOWED = re.compile(r"[A-Za-z0-9 ,;:'\"()\-/.]+")  # plain prose: no code, no markup, no symbols
_ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc)\b")
_FIRST_SENTENCE = re.compile(r"(.+?\.)(?:\s|$)")  # up to the first full stop followed by a space or the end


def randn(*shape: int) -> torch.Tensor:
    """Standard normal float32 samples that are the same on every CPU.

    PyTorch's float32 ``randn`` takes a vectorised code path on CPUs with AVX2 and a scalar one elsewhere,
    which draw different samples from the same seed; its float64 ``randn`` does not. So the samples are
    drawn in float64 (from torch's global generator) and rounded to float32.

    >>> import torch
    >>> _ = torch.manual_seed(0); a = randn(3, 2)
    >>> _ = torch.manual_seed(0); torch.equal(a, torch.randn(3, 2, dtype=torch.float64).float())
    True
    """
    import torch

    return torch.randn(*shape, dtype=torch.float64).float()


def is_sentence(text: str) -> bool:
    """Whether ``text`` passes the corpus filter: a capital first letter, a final ``.``, 6–40 words,
    only letters, digits, spaces and ``,;:'"()-/.``, and no abbreviation (``e.g``, ``i.e``, ``etc``) whose
    full stop could have cut the sentence short.

    >>> is_sentence("Return the arc cosine (measured in radians) of x.")
    True
    >>> is_sentence("Return x.")  # too short
    False
    >>> is_sentence("return the arc cosine (measured in radians) of x.")  # no capital
    False
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return (
        bool(text)
        and text[0].isupper()
        and text.endswith(".")
        and MIN_WORDS <= len(text.split()) <= MAX_WORDS
        and _ALLOWED.fullmatch(text) is not None
        and _ABBREVIATION.search(text) is None
    )


def _first_sentence(doc: str) -> str | None:
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())  # first paragraph, one line
    match = _FIRST_SENTENCE.match(paragraph)
    return match.group(1) if match else None


def _module_sentences(name: str) -> list[str]:
    module = importlib.import_module(name)
    found = []
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        doc = obj.__doc__
        first = _first_sentence(doc) if isinstance(doc, str) else None
        if first is not None and is_sentence(first):
            found.append(first)
    return found


def _collect() -> list[str]:
    unique = {s for name in SOURCE_MODULES for s in _module_sentences(name)}
    return sorted(unique, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """The sentences, collected in a fresh interpreter (``python -I -S``: no site-packages, no startup
    hooks): libraries imported into this process may patch standard-library functions (torch replaces
    ``inspect.getfile``), which must not change the corpus."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", __file__], capture_output=True, text=True, check=True, timeout=120
    )
    return tuple(json.loads(done.stdout))


def sentences(n: int | None = None) -> list[str]:
    """The first ``n`` sentences of the corpus (all of them when ``n`` is ``None``), in a fixed order.

    Raises ``ValueError`` if ``n`` is negative or larger than the corpus.

    >>> len(sentences()) >= 500
    True
    >>> sentences(2) == sentences()[:2]
    True
    """
    corpus = _corpus()
    if n is None:
        return list(corpus)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, got {n!r}")
    if not 0 <= n <= len(corpus):
        raise ValueError(f"n must be between 0 and {len(corpus)} (the corpus size), got {n}")
    return list(corpus[:n])


if __name__ == "__main__":  # run by _corpus() in a fresh interpreter
    print(json.dumps(_collect()))


# --------------------------------------------------------------------------------------------------------
# Handwritten digits (scikit-learn's copy of the UCI optical digits test set) — chapter 7
# --------------------------------------------------------------------------------------------------------

#: Sizes of the fixed split of the 1,797 digits: training, calibration (unlabeled use) and test images.
DIGITS_SPLITS: dict[str, int] = {"train": 1097, "calibration": 200, "test": 500}

__all__ += ["DIGITS_SPLITS", "digits"]


def digits(split: str = "train", *, integer: bool = False) -> tuple:
    """The 8 x 8 handwritten digits of scikit-learn (1,797 images, 10 classes), in a fixed split — chapter 7.

    Returns ``(x, y)``: ``x`` of shape ``(n, 1, 8, 8)`` and the labels ``y`` (int64, ``(n,)``). Each pixel is
    an integer 0..16 (the count of set pixels in a 4 x 4 block of the original 32 x 32 bitmap): with
    ``integer=True`` ``x`` holds them as ``torch.uint8``; by default as float32 ``pixel / 16`` in [0, 1] —
    exact, so the float input is already on the grid ``scale = 1/16``, ``zero_point = 0`` (17 levels).

    ``split`` is ``"train"`` (1,097 images), ``"calibration"`` (200) or ``"test"`` (500): a permutation drawn
    once with NumPy's ``default_rng(0)``, the same on every machine. The data ships with scikit-learn;
    nothing is downloaded.

    >>> x, y = digits("calibration")
    >>> tuple(x.shape), x.dtype, float(x.max()), tuple(y.shape)
    ((200, 1, 8, 8), torch.float32, 1.0, (200,))
    >>> digits("test", integer=True)[0].dtype
    torch.uint8
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {tuple(DIGITS_SPLITS)}, got {split!r}")
    if not isinstance(integer, bool):
        raise TypeError(f"integer must be a bool, got {integer!r}")
    import torch

    pixels, labels = _digits()
    order = _digits_order(len(labels))
    start = 0
    for name, size in DIGITS_SPLITS.items():
        if name == split:
            break
        start += size
    index = torch.from_numpy(order[start : start + DIGITS_SPLITS[split]])
    x = torch.from_numpy(pixels)[index].unsqueeze(1)  # (n, 1, 8, 8) uint8
    y = torch.from_numpy(labels)[index]
    return (x if integer else x.float() / 16), y


@functools.lru_cache(maxsize=1)
def _digits() -> tuple:
    """All 1,797 images as uint8 ``(1797, 8, 8)`` and their int64 labels (read once)."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qbook.data.digits needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    return data.images.astype(np.uint8), data.target.astype(np.int64)


def _digits_order(n: int):
    import numpy as np

    return np.random.default_rng(0).permutation(n)
