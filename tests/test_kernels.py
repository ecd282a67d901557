"""Tests of qbook.kernels: the Triton int8 GEMM (in Triton's CPU interpreter), its PTX, and the dispatcher.

References are independent of the code under test: int64 ``torch.matmul`` for the integer product, float64
arithmetic for the dequantized output, and NumPy's ``rint`` (round half to even) for requantization.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbook.kernels as kernels
from qbook.kernels import K_MAX, int8_matmul
from qbook.kernels.torch_backend import exact_int8_matmul, int_mm_allowed

triton = pytest.importorskip("triton", reason="the Triton kernel needs the gpu extra")
from qbook.kernels import int8_triton  # noqa: E402

U = 2.0**-24  # float32 unit roundoff


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on the CPU, in Triton's NumPy interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rand_int8(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def reference_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long()).int()


# -- the kernel, in the interpreter: the int32 product --------------------------------------------------

ODD_SHAPES = [  # (M, N, K): below, at and above the interpreter's 32-wide tiles, and decode rows (M <= 16)
    (1, 1, 1),
    (1, 257, 100),
    (7, 33, 257),
    (16, 100, 17),
    (17, 1, 7),
    (33, 257, 1),
    (100, 7, 33),
    (257, 17, 100),
]


@pytest.mark.parametrize(("M", "N", "K"), ODD_SHAPES)
def test_kernel_int32_equals_exact_product(interpret, M, N, K):
    a, b = rand_int8(M, K, seed=M), rand_int8(K, N, seed=N + 1)
    assert torch.equal(int8_matmul(a, b, backend="triton"), reference_acc(a, b))


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 70), N=st.integers(1, 70), K=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_kernel_int32_property(M, N, K, seed):
    a, b = rand_int8(M, K, seed=seed), rand_int8(K, N, seed=seed + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        acc = int8_matmul(a, b, backend="triton")
    assert torch.equal(acc, reference_acc(a, b))


@pytest.mark.parametrize(("va", "vb"), [(-128, -128), (127, 127), (-128, 127), (127, -128)])
def test_kernel_extremes(interpret, va, vb):
    M, N, K = 3, 5, 1000
    a = torch.full((M, K), va, dtype=torch.int8)
    b = torch.full((K, N), vb, dtype=torch.int8)
    acc = int8_matmul(a, b, backend="triton")
    assert torch.equal(acc, torch.full((M, N), K * va * vb, dtype=torch.int32))


def test_kernel_strided_operands(interpret):
    # A as a column slice (row stride 90), B as the transpose of an (N, K) weight: column-major.
    a = rand_int8(40, 90, seed=1)[:, 5:75]
    w = rand_int8(23, 70, seed=2)
    assert torch.equal(int8_matmul(a, w.T, backend="triton"), reference_acc(a, w.T))


# -- the kernel, in the interpreter: the epilogues -------------------------------------------------------


def epilogue_inputs(M: int, N: int, per_row: bool, per_col: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    a_scale = torch.rand(M, generator=g) * 0.02 + 0.001 if per_row else 0.0078125
    b_scale = torch.rand(N, generator=g) * 0.02 + 0.001 if per_col else torch.tensor(0.003)
    bias = torch.randn(N, generator=g)
    return a_scale, b_scale, bias


def as64(scale, length: int) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32).double().reshape(-1).expand(length)


# Bounds of |out - reference| (reference in float64 from the same float32 scales and bias), elementwise,
# with p = acc * a_scale * b_scale: int32 -> float32 and two products cost 3 roundings of p, the bias
# addition one of the sum, so float32 is within 5u (|p| + |bias|). float16 adds half an ulp, 2**-11
# relative (2**-25 absolute below its normal range). bfloat16 adds one ulp, 2**-7 relative: Triton's
# interpreter truncates float32 to bfloat16 (a GPU rounds to nearest even, half of that).
EXTRA_REL = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("per_row", "per_col", "with_bias"), [(True, True, True), (False, True, False),
                                                               (True, False, True), (False, False, False)])
def test_kernel_dequantize(interpret, out_dtype, per_row, per_col, with_bias):
    M, N, K = 37, 45, 70
    a, b = rand_int8(M, K, seed=3), rand_int8(K, N, seed=4)
    a_scale, b_scale, bias = epilogue_inputs(M, N, per_row, per_col, seed=5)
    bias = bias if with_bias else None
    out = int8_matmul(a, b, a_scale, b_scale, bias, out_dtype=out_dtype, backend="triton")
    assert out.dtype == out_dtype and out.shape == (M, N)
    p = reference_acc(a, b).double() * as64(a_scale, M)[:, None] * as64(b_scale, N)[None, :]
    bias64 = torch.zeros(N, dtype=torch.float64) if bias is None else bias.double()
    ref = p + bias64
    bound = 5 * U * (p.abs() + bias64.abs()) + EXTRA_REL[out_dtype] * ref.abs() * (1 + 6 * U) + 2.0**-25
    assert ((out.double() - ref).abs() <= bound).all()
    if out_dtype != torch.bfloat16:  # same float32 operations in the same order: bit-identical backends
        torch_out = int8_matmul(a, b, a_scale, b_scale, bias, out_dtype=out_dtype, backend="torch")
        assert torch.equal(out, torch_out)


def reference_requantize(acc, a_scale, b_scale, bias, out_scale, out_zero_point):
    """(10.3) in NumPy: float32 y as in (10.2), IEEE division, np.rint (half to even), clamp."""
    M, N = acc.shape
    sa = np.broadcast_to(np.asarray(a_scale, dtype=np.float32).reshape(-1, 1), (M, 1))
    sb = np.broadcast_to(np.asarray(b_scale, dtype=np.float32).reshape(1, -1), (1, N))
    y = acc.numpy().astype(np.float32) * sa * sb
    if bias is not None:
        y = y + bias.numpy().astype(np.float32)[None, :]
    q = np.rint(y / np.float32(out_scale)) + out_zero_point
    return torch.from_numpy(np.clip(q, -128, 127).astype(np.int8))


@pytest.mark.parametrize(("out_scale", "out_zero_point"), [(0.05, 0), (0.2, -128), (1.7, 127), (0.013, 9)])
def test_kernel_requantize(interpret, out_scale, out_zero_point):
    M, N, K = 33, 40, 50
    a, b = rand_int8(M, K, seed=6), rand_int8(K, N, seed=7)
    a_scale, b_scale, bias = epilogue_inputs(M, N, True, True, seed=8)
    q = int8_matmul(a, b, a_scale, b_scale, bias, backend="triton", out_scale=out_scale,
                    out_zero_point=out_zero_point)
    ref = reference_requantize(reference_acc(a, b), a_scale, b_scale, bias, out_scale, out_zero_point)
    assert q.dtype == torch.int8
    assert torch.equal(q, ref)
    assert 0 < (q == -128).sum() + (q == 127).sum() < q.numel()  # the clamp is exercised, not everywhere
    torch_q = int8_matmul(a, b, a_scale, b_scale, bias, backend="torch", out_scale=out_scale,
                          out_zero_point=out_zero_point)
    assert torch.equal(torch_q, ref)


def test_kernel_requantize_ties_round_to_even(interpret):
    # Scales 1 and out_scale 2: y / out_scale = acc / 2 is a tie (x.5) exactly when acc is odd.
    acc_values = torch.arange(-9, 10, dtype=torch.int8)  # (19,)
    a = acc_values.reshape(-1, 1)  # (19, 1): K = 1, so acc = a
    b = torch.ones((1, 1), dtype=torch.int8)
    q = int8_matmul(a, b, 1.0, 1.0, backend="triton", out_scale=2.0).reshape(-1)
    expected = torch.tensor(
        [-4, -4, -4, -3, -2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4],
        dtype=torch.int8,
    )
    assert torch.equal(q, expected)


# -- PTX, compiled for GPUs this machine does not have ---------------------------------------------------


def mma_lines(text: str, opcode: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(opcode)]


def test_ptx_sm80_uses_int8_mma_sync():
    lines = mma_lines(kernels.ptx(80), "mma.sync")
    assert lines and all("s8.s8" in line and ".s32" in line for line in lines)
    assert all("m16n8k32" in line for line in lines)


def test_ptx_sm90_uses_int8_wgmma():
    text = kernels.ptx(90)
    assert ".target sm_90a" in text
    lines = mma_lines(text, "wgmma.mma_async")
    assert lines and all(".s32.s8.s8" in line for line in lines)


def test_ptx_requantize_epilogue_is_in_the_kernel():
    text = kernels.ptx(80, epilogue="requantize")
    assert "div.rn.f32" in text  # IEEE division by out_scale
    assert "0f4B400000" in text  # 1.5 * 2**23, the round-half-to-even constant
    assert mma_lines(text, "mma.sync")


def test_ptx_errors():
    with pytest.raises(ValueError, match="arch"):
        kernels.ptx(70)
    with pytest.raises(ValueError, match="epilogue"):
        kernels.ptx(80, epilogue="gelu")


# -- autotuning configurations ---------------------------------------------------------------------------

SMEM_BYTES = {80: 164 * 1024, 90: 228 * 1024}


@pytest.mark.parametrize("arch", [80, 90])
def test_configs_fit_the_architecture(arch):
    configs = int8_triton.int8_configs(arch)
    assert len(set(configs)) == len(configs) >= 6
    for c in configs:
        assert c.BLOCK_K % 32 == 0 and c.BLOCK_M % 16 == 0 and c.BLOCK_N % 16 == 0
        assert c.num_warps in (4, 8) and 3 <= c.num_stages <= 5
        assert c.num_stages * (c.BLOCK_M + c.BLOCK_N) * c.BLOCK_K <= SMEM_BYTES[arch]
    assert any(c.BLOCK_M >= 128 and c.BLOCK_N >= 128 for c in configs)
    assert any(c.BLOCK_M == 16 for c in configs)  # decode rows


def test_prune_keeps_decode_tiles_for_small_m():
    configs = [c.to_triton() for c in int8_triton.int8_configs(90)]
    kept = int8_triton._prune_for_m(configs, {"M": 1})
    assert kept and all(c.kwargs["BLOCK_M"] == 16 for c in kept)
    assert int8_triton._prune_for_m(configs, {"M": 4096}) == configs


@pytest.mark.parametrize(("num_pid_m", "num_pid_n", "group_m"), [(8, 8, 1), (8, 8, 4), (9, 5, 4), (3, 7, 8)])
def test_tile_order_is_a_grouped_bijection(num_pid_m, num_pid_n, group_m):
    order = int8_triton.tile_order(num_pid_m, num_pid_n, group_m)
    assert sorted(order) == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]
    band = min(group_m, num_pid_m)
    first = order[: band * num_pid_n]  # the first band of GROUP_M tile rows is finished first
    assert {m for m, _ in first} == set(range(band))
    assert [n for _, n in first] == sorted(n for _, n in first)  # walked column by column
    if group_m == 1:
        assert order == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]


# -- the torch backend and the dispatcher ----------------------------------------------------------------


@pytest.mark.parametrize(("M", "N", "K"), [*ODD_SHAPES, (64, 64, 64)])
def test_torch_backend_equals_exact_product(M, N, K):
    a, b = rand_int8(M, K, seed=11), rand_int8(K, N, seed=12)
    for backend in ("torch", "auto"):
        assert torch.equal(int8_matmul(a, b, backend=backend), reference_acc(a, b))


def test_torch_backend_overflow_is_checked():
    a = torch.full((1, K_MAX + 1), -128, dtype=torch.int8)
    with pytest.raises(OverflowError, match="2147483648"):
        int8_matmul(a, a.T, backend="torch")
    b = a.T.clone()
    b[0, 0] = 0  # one term less: fits exactly
    assert int8_matmul(a, b, backend="torch").item() == 2**31 - 128 * 128
    with pytest.raises(OverflowError, match="K_MAX"):
        int8_matmul(a, b, backend="triton")


def test_exact_int8_matmul_and_int_mm_rules():
    a, b = rand_int8(5, 300, seed=13), rand_int8(300, 3, seed=14)
    assert torch.equal(exact_int8_matmul(a, b), reference_acc(a, b))
    cuda = torch.device("cuda")
    assert int_mm_allowed(17, 8, 8, cuda) and not int_mm_allowed(16, 8, 8, cuda)
    assert not int_mm_allowed(32, 8, 12, cuda) and not int_mm_allowed(32, 12, 8, cuda)
    assert not int_mm_allowed(32, 8, 8, torch.device("cpu"))


def test_epilogue_accepts_scale_shapes():
    M, N, K = 4, 3, 5
    a, b = rand_int8(M, K, seed=15), rand_int8(K, N, seed=16)
    sa, sb = torch.rand(M) + 0.5, torch.rand(N) + 0.5
    expected = int8_matmul(a, b, sa, sb)
    assert torch.equal(int8_matmul(a, b, sa.reshape(M, 1), sb.reshape(1, N)), expected)
    sb16 = sb.half()  # a float16 scale is accepted and used in float32
    assert torch.equal(int8_matmul(a, b, sa.double(), sb16), int8_matmul(a, b, sa, sb16.float()))
    assert torch.equal(int8_matmul(a, b, 0.5, torch.tensor([0.25])), int8_matmul(a, b, 0.5, 0.25))


def test_triton_backend_missing_extra(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_available", lambda: False)
    a = rand_int8(2, 2, seed=17)
    with pytest.raises(ImportError, match=r"qbook\[gpu\]"):
        int8_matmul(a, a, backend="triton")
    with pytest.raises(ImportError, match=r"qbook\[gpu\]"):
        kernels.ptx(90)
    assert torch.equal(int8_matmul(a, a), reference_acc(a, a))  # auto still works


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = rand_int8(2, 2, seed=18)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        int8_matmul(a, a, backend="triton")


def test_triton_backend_refuses_int32_offset_overflow(interpret):
    # A (2, 3) view whose rows lie 2**31 elements apart: the kernel's int32 offsets would wrap.
    a = torch.empty_strided((2, 3), (2**31, 1), dtype=torch.int8, device="meta")
    b = torch.empty((3, 2), dtype=torch.int8, device="meta")
    with pytest.raises(ValueError, match="2\\*\\*31"):
        int8_matmul(a, b, backend="triton")


A = rand_int8(4, 6, seed=19)
B = rand_int8(6, 3, seed=20)
META = torch.zeros((6, 3), dtype=torch.int8, device="meta")

BAD_INPUTS = [  # (kwargs, exception, message fragment)
    ({"a": A.float()}, TypeError, "torch.int8"),
    ({"b": B.int()}, TypeError, "torch.int8"),
    ({"a": A.tolist()}, TypeError, "torch.Tensor"),
    ({"a": A.reshape(-1)}, ValueError, "2-D"),
    ({"b": B.reshape(1, 6, 3)}, ValueError, "2-D"),
    ({"a": A[:, :0], "b": B[:0]}, ValueError, ">= 1"),
    ({"b": B[:5]}, ValueError, "inner dimensions"),
    ({"b": META}, ValueError, "one device"),
    ({"backend": "cublas"}, ValueError, "backend"),
    ({"a_scale": 0.1}, ValueError, "together"),
    ({"bias": torch.zeros(3)}, ValueError, "need a_scale"),
    ({"out_dtype": torch.float16}, ValueError, "int32"),
    ({"a_scale": torch.ones(3), "b_scale": 1.0}, ValueError, "a_scale must have shape"),
    ({"a_scale": torch.ones(1, 4), "b_scale": 1.0}, ValueError, "a_scale must have shape"),
    ({"a_scale": 1.0, "b_scale": torch.ones(4)}, ValueError, "b_scale must have shape"),
    ({"a_scale": 1.0, "b_scale": torch.ones(3, 1)}, ValueError, "b_scale must have shape"),
    ({"a_scale": 1.0, "b_scale": torch.ones(3, dtype=torch.int32)}, TypeError, "floating-point"),
    ({"a_scale": 1.0, "b_scale": "1"}, TypeError, "b_scale must be a number"),
    ({"a_scale": torch.ones(4, device="meta"), "b_scale": 1.0}, ValueError, "must be on cpu"),
    ({"a_scale": 1.0, "b_scale": 1.0, "bias": torch.ones(1)}, ValueError, "N = 3"),
    ({"a_scale": 1.0, "b_scale": 1.0, "bias": torch.ones(4)}, ValueError, "bias must have shape"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_dtype": torch.int32}, ValueError, "out_dtype"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": 0.0}, ValueError, "positive"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": 1e-50}, ValueError, "positive"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": "0.1"}, TypeError, "out_scale"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": 0.1, "out_dtype": torch.float32}, ValueError, "int8"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": 0.1, "out_zero_point": 128}, ValueError, "[-128, 127]"),
    ({"a_scale": 1.0, "b_scale": 1.0, "out_scale": 0.1, "out_zero_point": 1.5}, TypeError, "out_zero_point"),
    ({"out_scale": 0.1}, ValueError, "need a_scale"),
]


@pytest.mark.parametrize(("kwargs", "error", "fragment"), BAD_INPUTS)
def test_bad_inputs_raise(kwargs, error, fragment):
    args = {"a": A, "b": B, **kwargs}
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        int8_matmul(**args)
