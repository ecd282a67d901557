"""Tests for qbook.data: the standard-library sentence corpus."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qbook import data


def test_corpus_size_and_filter():
    corpus = data.sentences()
    assert len(corpus) >= 500
    if sys.version_info[:3] == (3, 11, 7):  # the interpreter the book is executed with
        assert len(corpus) == 592
    assert len(set(corpus)) == len(corpus)
    for s in corpus:
        words = s.split()
        assert data.MIN_WORDS <= len(words) <= data.MAX_WORDS, s
        assert s[0].isupper() and s.endswith("."), s
        assert "e.g" not in s and "i.e" not in s, s


def test_deterministic_across_processes():
    code = "from qbook.data import sentences; print(repr(sentences(40)))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("0", "1")
    }
    assert len(runs) == 1
    assert runs.pop().strip() == repr(data.sentences(40))


def test_prefix_and_copy():
    first = data.sentences(10)
    assert first == data.sentences()[:10]
    first.append("mutated")
    assert data.sentences(10)[-1] != "mutated"
    assert data.sentences(0) == []


def test_sentences_come_from_docstrings():
    import math

    assert "Return the arc cosine (measured in radians) of x." == math.acos.__doc__.split("\n\n")[0].strip()
    assert "Return the arc cosine (measured in radians) of x." in data.sentences()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Return the arc cosine (measured in radians) of x.", True),
        ("Return x.", False),  # 2 words
        ("return the arc cosine of the value x.", False),  # lower-case start
        ("Return the arc cosine of the value x", False),  # no full stop
        ("Return the arc cosine of x, e.g. the angle.", False),  # abbreviation
        ("Return the value of x == y for both.", False),  # code symbols
        ("Word " * 41 + "end.", False),  # 42 words
        ("", False),
    ],
)
def test_is_sentence(text, ok):
    assert data.is_sentence(text) is ok


@pytest.mark.parametrize("n", [-1, 10**6])
def test_bad_n_value(n):
    with pytest.raises(ValueError, match="between 0 and"):
        data.sentences(n)


@pytest.mark.parametrize("n", [2.0, "3", True])
def test_bad_n_type(n):
    with pytest.raises(TypeError, match="n must be an int"):
        data.sentences(n)


def test_patched_stdlib_does_not_change_the_corpus(monkeypatch):
    import inspect

    before = data.sentences()

    def getfile(obj):  # what torch does to inspect.getfile: a replacement without a docstring
        return "?"

    monkeypatch.setattr(inspect, "getfile", getfile)
    data._corpus.cache_clear()
    try:
        assert data.sentences() == before
        assert "Work out which source or compiled file an object was defined in." in before
    finally:
        data._corpus.cache_clear()


def test_randn_is_float64_drawn_and_rounded() -> None:
    import torch

    from qbook.data import randn

    torch.manual_seed(3)
    a = randn(1000)
    torch.manual_seed(3)
    assert a.dtype == torch.float32 and torch.equal(a, torch.randn(1000, dtype=torch.float64).float())
