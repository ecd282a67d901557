"""Chapter 10's kernels on a real CUDA GPU (skipped without one; CI has none).

Every kernel the dispatcher can choose (TMA on Hopper, portable, decode with split-K), every epilogue, both
layouts of B and awkward shapes: the Triton result must equal the torch path bit for bit (int32 against an
exact product, float and int8 epilogues against the same float32 operations done by torch). Run on a GPU
machine with ``python -m pytest -q tests/test_kernels_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from qbook.kernels import int8_matmul, int8_triton
from qbook.kernels.torch_backend import exact_int8_matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [  # (M, N, K): decode (M <= 16), the M = 16/17 boundary, unaligned K and N, tiles that do not divide
    (1, 1, 1), (1, 8, 16), (1, 4096, 4096), (2, 77, 1001), (7, 520, 776), (16, 4096, 4096), (16, 50000, 64),
    (17, 64, 64), (17, 520, 776), (33, 1, 4096), (64, 128, 128), (129, 77, 1001), (300, 512, 768),
    (300, 520, 776), (1000, 24, 40), (256, 256, 8192), (2048, 4096, 4096),
]  # fmt: skip
EPILOGUES = {
    "int32": {},
    "fp32": {"out_dtype": torch.float32},
    "fp16": {"out_dtype": torch.float16},
    "bf16": {"out_dtype": torch.bfloat16},
    "int8": {"out_scale": 0.05, "out_zero_point": -3},
}


def _int8(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g).cuda()


def _vectors(M: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a_scale = (torch.rand(M, generator=g, dtype=torch.float64) * 0.02 + 1e-3).float()
    b_scale = (torch.rand(N, generator=g, dtype=torch.float64) * 0.02 + 1e-3).float()
    bias = torch.randn(N, generator=g, dtype=torch.float64).float()
    return a_scale.cuda(), b_scale.cuda(), bias.cuda()


def _kernel(a: torch.Tensor, b: torch.Tensor) -> str:
    c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.int32, device="cuda")
    major, minor = torch.cuda.get_device_capability()
    return int8_triton.choose_kernel(a, b, c, 10 * major + minor)


@pytest.mark.parametrize("k_major", [True, False], ids=["B=W.T", "B row-major"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_every_epilogue_equals_the_torch_path(shape: tuple[int, int, int], k_major: bool) -> None:
    M, N, K = shape
    a, w = _int8(M, K, seed=M + 7), _int8(N, K, seed=N + 8)
    b = w.T if k_major else w.T.contiguous()
    exact = exact_int8_matmul(a, b)
    assert torch.equal(int8_matmul(a, b, backend="triton"), exact), _kernel(a, b)
    a_scale, b_scale, bias = _vectors(M, N, seed=3)
    for name, kwargs in EPILOGUES.items():
        if name == "int32":
            continue
        out = int8_matmul(a, b, a_scale, b_scale, bias, backend="triton", **kwargs)
        expected = int8_matmul(a, b, a_scale, b_scale, bias, backend="torch", **kwargs)
        assert out.dtype == expected.dtype and torch.equal(out, expected), (name, _kernel(a, b))


def test_scalar_scales_no_bias_and_strided_a() -> None:
    a_big, w = _int8(600, 2048, seed=1), _int8(512, 1024, seed=2)
    a = a_big[::2, ::2]  # (300, 1024), strided in both dimensions: the dispatcher must cope
    out = int8_matmul(a, w.T, 0.01, 0.02, out_dtype=torch.float16, backend="triton")
    assert torch.equal(out, int8_matmul(a, w.T, 0.01, 0.02, out_dtype=torch.float16, backend="torch"))


def test_split_k_is_deterministic() -> None:
    a, w = _int8(1, 8192, seed=5), _int8(8192, 8192, seed=6)
    first = int8_matmul(a, w.T, backend="triton")
    assert _kernel(a, w.T) == "decode"
    assert all(torch.equal(first, int8_matmul(a, w.T, backend="triton")) for _ in range(5))
    assert torch.equal(first, exact_int8_matmul(a, w.T))


def test_cuda_graph_capture_and_replay() -> None:
    for M in (1, 300):
        a, w = _int8(M, 1024, seed=M), _int8(512, 1024, seed=9)
        a_scale, b_scale, bias = _vectors(M, 512, seed=4)
        expected = int8_matmul(a, w.T, a_scale, b_scale, bias, backend="triton")  # warm-up: autotuning
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = int8_matmul(a, w.T, a_scale, b_scale, bias, backend="triton")
        a.copy_(_int8(M, 1024, seed=M + 100))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, int8_matmul(a, w.T, a_scale, b_scale, bias, backend="torch"))
        assert not torch.equal(out, expected)


def test_bad_cuda_scales_are_refused() -> None:
    a, w = _int8(32, 64, seed=1), _int8(64, 64, seed=2)
    bad = torch.full((32,), float("nan"), device="cuda")
    with pytest.raises(ValueError, match="scale"):
        int8_matmul(a, w.T, bad, 1.0, backend="triton")
