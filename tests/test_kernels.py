"""Tests of qbook.kernels: the three Triton int8 kernels (in Triton's CPU interpreter), their PTX and ptxas
resource usage (compiled for GPUs this machine does not have), the dispatcher and the torch backend.

References are independent of the code under test: int64 ``torch.matmul`` for the integer product, float64
arithmetic for the dequantized output, and NumPy's ``rint`` (round half to even) for requantization.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbook.kernels as kernels
from qbook.kernels import K_MAX, int8_matmul
from qbook.kernels.layout import is_k_major, prepack_weight
from qbook.kernels.torch_backend import exact_int8_matmul, int_mm_allowed

triton = pytest.importorskip("triton", reason="the Triton kernels need the gpu extra")
from qbook.kernels import int8_decode, int8_hopper, int8_ptx, int8_triton  # noqa: E402

U = 2.0**-24  # float32 unit roundoff
KERNELS = ("portable", "tma", "decode")


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on the CPU, in Triton's NumPy interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rand_int8(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def reference_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long()).int()


def run(kernel: str, a: torch.Tensor, b: torch.Tensor, *scales, out_dtype=None, **requant) -> torch.Tensor:
    """One kernel, forced, with the public function's argument checks and epilogue."""
    M, N = a.shape[0], b.shape[1]
    a_scale, b_scale, bias = (*scales, None, None, None)[:3]
    epilogue = kernels._make_epilogue(M, N, a.device, a_scale, b_scale, bias, out_dtype,
                                      requant.get("out_scale"), requant.get("out_zero_point", 0))  # fmt: skip
    return int8_triton.launch(a, b, epilogue, kernel=kernel)


# -- the kernels, in the interpreter: the int32 product --------------------------------------------------

SHAPES = {  # (M, N, K): below, at and above the interpreter's 32-wide tiles; the TMA kernel needs K % 16 == 0
    "portable": [(1, 1, 1), (7, 33, 257), (17, 1, 7), (33, 257, 1), (100, 7, 33), (70, 40, 100)],
    "tma": [(1, 4, 16), (17, 48, 48), (33, 100, 16), (100, 64, 80), (45, 36, 272)],
    "decode": [(1, 1, 1), (1, 257, 100), (8, 33, 1), (9, 7, 257), (16, 100, 17), (5, 200, 300)],
}


@pytest.mark.parametrize(("kernel", "M", "N", "K"), [(k, *s) for k, shapes in SHAPES.items() for s in shapes])
def test_kernel_int32_equals_exact_product(interpret, kernel, M, N, K):
    a, w = rand_int8(M, K, seed=M), rand_int8(N, K, seed=N + 1)
    assert torch.equal(run(kernel, a, w.T), reference_acc(a, w.T))


@pytest.mark.parametrize("kernel", ["portable", "decode"])
def test_kernel_b_row_major(interpret, kernel):
    # B given (K, N) row-major, not as the transpose of a weight: the kernels read any strides.
    a, b = rand_int8(13, 70, seed=1), rand_int8(70, 45, seed=2)
    assert not is_k_major(b)
    assert torch.equal(run(kernel, a, b), reference_acc(a, b))


def test_kernel_strided_operands(interpret):
    # A as a column slice (row stride 90), B as the transpose of an (N, K) weight: column-major.
    a = rand_int8(40, 90, seed=1)[:, 5:75]
    w = rand_int8(23, 70, seed=2)
    assert torch.equal(run("portable", a, w.T), reference_acc(a, w.T))
    assert torch.equal(run("decode", a[:16], w.T), reference_acc(a[:16], w.T))


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 70), N=st.integers(1, 70), K=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_int8_matmul_triton_property(M, N, K, seed):
    # Through the public function: the dispatcher picks decode, TMA or portable as it would on an H100.
    a, w = rand_int8(M, K, seed=seed), rand_int8(N, K, seed=seed + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        acc = int8_matmul(a, w.T, backend="triton")
    assert torch.equal(acc, reference_acc(a, w.T))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("va", "vb"), [(-128, -128), (127, 127), (-128, 127)])
def test_kernel_extremes(interpret, kernel, va, vb):
    M, N, K = 3, 8, 1008
    a = torch.full((M, K), va, dtype=torch.int8)
    w = torch.full((N, K), vb, dtype=torch.int8)
    assert torch.equal(run(kernel, a, w.T), torch.full((M, N), K * va * vb, dtype=torch.int32))


def test_kernel_64_bit_offsets(interpret, monkeypatch):
    # The INDEX_64 variant (taken when a matrix spans 2**31 elements) computes the same products.
    monkeypatch.setattr(int8_triton, "needs_int64", lambda *matrices: True)
    a, w = rand_int8(20, 50, seed=3), rand_int8(37, 50, seed=4)
    for kernel in ("portable", "decode"):
        assert torch.equal(run(kernel, a[: 9 if kernel == "decode" else 20], w.T),
                           reference_acc(a[: 9 if kernel == "decode" else 20], w.T))  # fmt: skip


# -- split-K in the decode kernel --------------------------------------------------------------------------


def test_split_k_rule():
    assert int8_decode.split_k(32, 16, 132) == 8  # N = K = 4096 with 128 x 256 tiles on an H100
    assert int8_decode.split_k(2 * 132, 64, 132) == 1  # enough tiles already
    for tiles in (1, 3, 32, 100):
        for steps in (1, 2, 7, 16, 64):
            split = int8_decode.split_k(tiles, steps, 132)
            assert split & (split - 1) == 0  # a power of two
            assert split == 1 or (steps >= 2 * split and tiles * split // 2 < 2 * 132)


@pytest.mark.parametrize("epilogue", ["int32", "dequantize", "requantize"])
@pytest.mark.parametrize("k_major", [True, False])
def test_decode_split_k_is_exact_and_leaves_zeros(interpret, epilogue, k_major):
    M, N, K = 3, 40, 400  # 2 tiles of 32 on 4 "SMs": K is split 4 ways
    tiles, steps = -(-N // 32), -(-K // 32)
    assert int8_decode.split_k(tiles, steps, int8_decode.INTERPRETER_SMS) == 4
    a, w = rand_int8(M, K, seed=5), rand_int8(N, K, seed=6)
    b = w.T if k_major else w.T.contiguous()
    scales = () if epilogue == "int32" else (torch.rand(M) * 0.01, torch.rand(N) * 0.01, torch.randn(N))
    requant = {"out_scale": 0.5, "out_zero_point": 3} if epilogue == "requantize" else {}
    out = run("decode", a, b, *scales, **requant)
    expected = int8_matmul(a, b, *scales, backend="torch", **requant)
    assert torch.equal(out, expected)
    workspace = int8_decode._WORKSPACES[(a.device, 0)]
    assert not workspace.any()  # the last program of every tile put zeros back


# -- the kernels, in the interpreter: the epilogues -------------------------------------------------------


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
EPILOGUE_SHAPES = {"portable": (37, 45, 70), "tma": (37, 48, 80), "decode": (11, 45, 300)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_dequantize(interpret, kernel, out_dtype):
    M, N, K = EPILOGUE_SHAPES[kernel]
    a, w = rand_int8(M, K, seed=3), rand_int8(N, K, seed=4)
    a_scale, b_scale, bias = epilogue_inputs(M, N, True, True, seed=5)
    out = run(kernel, a, w.T, a_scale, b_scale, bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    p = reference_acc(a, w.T).double() * as64(a_scale, M)[:, None] * as64(b_scale, N)[None, :]
    ref = p + bias.double()
    bound = 5 * U * (p.abs() + bias.double().abs()) + EXTRA_REL[out_dtype] * ref.abs() * (1 + 6 * U)
    bound += 2.0**-25
    assert ((out.double() - ref).abs() <= bound).all()
    if out_dtype != torch.bfloat16:  # same float32 operations in the same order: bit-identical backends
        torch_out = int8_matmul(a, w.T, a_scale, b_scale, bias, out_dtype=out_dtype, backend="torch")
        assert torch.equal(out, torch_out)


@pytest.mark.parametrize(("per_row", "per_col", "with_bias"), [(False, True, False), (True, False, True),
                                                               (False, False, False)])  # fmt: skip
def test_dequantize_scale_layouts(interpret, per_row, per_col, with_bias):
    M, N, K = 37, 45, 70
    a, b = rand_int8(M, K, seed=3), rand_int8(K, N, seed=4)
    a_scale, b_scale, bias = epilogue_inputs(M, N, per_row, per_col, seed=5)
    bias = bias if with_bias else None
    out = int8_matmul(a, b, a_scale, b_scale, bias, backend="triton")
    assert torch.equal(out, int8_matmul(a, b, a_scale, b_scale, bias, backend="torch"))


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("out_scale", "out_zero_point"), [(0.05, 0), (0.2, -128), (1.7, 127), (0.013, 9)])
def test_kernel_requantize(interpret, kernel, out_scale, out_zero_point):
    M, N, K = {"portable": (33, 40, 50), "tma": (33, 48, 48), "decode": (13, 40, 50)}[kernel]
    a, w = rand_int8(M, K, seed=6), rand_int8(N, K, seed=7)
    a_scale, b_scale, bias = epilogue_inputs(M, N, True, True, seed=8)
    q = run(kernel, a, w.T, a_scale, b_scale, bias, out_scale=out_scale, out_zero_point=out_zero_point)
    ref = reference_requantize(reference_acc(a, w.T), a_scale, b_scale, bias, out_scale, out_zero_point)
    assert q.dtype == torch.int8
    assert torch.equal(q, ref)
    assert 0 < (q == -128).sum() + (q == 127).sum() < q.numel()  # the clamp is exercised, not everywhere
    torch_q = int8_matmul(a, w.T, a_scale, b_scale, bias, backend="torch", out_scale=out_scale,
                          out_zero_point=out_zero_point)  # fmt: skip
    assert torch.equal(torch_q, ref)


def test_kernel_requantize_ties_round_to_even(interpret):
    # Scales 1 and out_scale 2: y / out_scale = acc / 2 is a tie (x.5) exactly when acc is odd.
    acc_values = torch.arange(-9, 10, dtype=torch.int8)  # (19,)
    a = acc_values.reshape(-1, 1)  # (19, 1): K = 1, so acc = a
    b = torch.ones((1, 1), dtype=torch.int8)
    expected = torch.tensor([-4, -4, -4, -3, -2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4]).to(torch.int8)
    for kernel in ("portable", "decode"):
        rows = a if kernel == "portable" else a[:16]
        q = run(kernel, rows, b, 1.0, 1.0, out_scale=2.0).reshape(-1)
        assert torch.equal(q, expected[: len(rows)])


# -- choosing a kernel -------------------------------------------------------------------------------------


def test_choose_kernel():
    w = torch.zeros((64, 48), dtype=torch.int8)  # an nn.Linear weight (N, K)
    a, c = torch.zeros((32, 48), dtype=torch.int8), torch.zeros((32, 64), dtype=torch.int32)
    assert int8_triton.choose_kernel(a, w.T, c, 90) == "tma"
    assert int8_triton.choose_kernel(a, w.T, c, 80) == "portable"
    assert int8_triton.choose_kernel(a[:16], w.T, c[:16], 90) == "decode"
    assert int8_triton.choose_kernel(a, w.T.contiguous(), c, 90) == "portable"  # B not K-major
    assert int8_triton.choose_kernel(a, prepack_weight(w.T.contiguous()), c, 90) == "tma"
    odd = torch.zeros((32, 40), dtype=torch.int8)  # K = 40: rows of A are not 16-byte aligned
    assert int8_triton.choose_kernel(odd, torch.zeros((64, 40), dtype=torch.int8).T, c, 90) == "portable"
    assert not int8_hopper.tma_compatible(a, w.T, torch.zeros((32, 63)))  # C rows of 252 bytes


def test_prepack_weight():
    b = rand_int8(7, 5, seed=9)  # (K, N) row-major
    p = prepack_weight(b)
    assert torch.equal(p, b) and is_k_major(p) and p.stride() == (1, 7)
    assert prepack_weight(p) is p


def test_needs_int64_and_auto_keeps_large_outputs_on_triton(monkeypatch):
    small = torch.empty((4, 4), dtype=torch.int8, device="meta")
    assert not int8_triton.needs_int64(small, small)
    vocab = torch.empty((16384, 152064), dtype=torch.float16, device="meta")  # 2.49e9 logits
    assert int8_triton.needs_int64(small, vocab)
    # backend="auto" sends such a product to the kernel (64-bit offsets), not to the torch path.
    monkeypatch.setattr(kernels, "_triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = types.SimpleNamespace(is_cuda=True, shape=(16384, 4096))
    assert kernels._choose_backend("auto", a, types.SimpleNamespace(shape=(4096, 152064))) == "triton"
    long_k = types.SimpleNamespace(is_cuda=True, shape=(1, K_MAX + 1))
    assert kernels._choose_backend("auto", long_k, None) == "torch"


def test_triton_backend_accepts_int64_offsets(interpret):
    # A (2, 3) view whose rows lie 2**31 elements apart: the kernels compute such offsets in 64 bits.
    a = torch.empty_strided((2, 3), (2**31, 1), dtype=torch.int8, device="meta")
    b = torch.empty((3, 2), dtype=torch.int8, device="meta")
    assert kernels._choose_backend("triton", a, b) == "triton" and int8_triton.needs_int64(a, b)


# -- PTX and ptxas, for GPUs this machine does not have -----------------------------------------------------


def mma_lines(text: str, opcode: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(opcode)]


def test_ptx_sm80_gemm_uses_int8_mma_sync():
    lines = mma_lines(kernels.ptx(80), "mma.sync")
    assert lines and all("m16n8k32" in line and ".s32.s8.s8.s32" in line for line in lines)


def test_ptx_sm90_gemm_is_persistent_tma_and_warp_specialised():
    text = kernels.ptx(90)
    assert ".target sm_90a" in text
    assert "cp.async.bulk.tensor" in text and "cp.async.cg" not in text  # operands by TMA only
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+\d+", text)  # consumers get more registers
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+\d+", text)  # the producer gives them up
    lines = mma_lines(text, "wgmma.mma_async")
    assert lines and all(".s32.s8.s8" in line for line in lines)
    assert int8_ptx.compile_kernel(90).metadata.num_warps == 12  # producer + two consumer warpgroups


def test_ptx_int32_wgmma_is_waited_for_every_k_step():
    # What Triton's pipeliner does with an int32 accumulator (WGMMAPipeline.cpp, dotCanBeProperlyAsync): each
    # K step's wgmma group is followed by wgmma.wait_group 0, in the portable kernel and in the TMA kernel.
    for kernel in ("portable", "gemm"):
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", kernels.ptx(90, "int32", kernel))
        assert waits and set(waits) == {"0"}


def test_ptx_decode_swaps_operands_into_narrow_wgmma():
    m8 = mma_lines(kernels.ptx(90, kernel="decode"), "wgmma.mma_async")  # M = 1: 8 token columns
    assert m8 and all("m64n8k32.s32.s8.s8" in line for line in m8)
    config16 = int8_ptx.configs(90, "decode")[0]  # 9 <= M <= 16
    m16 = mma_lines(int8_ptx.compile_kernel(90, "decode", config=config16).asm["ptx"], "wgmma.mma_async")
    assert m16 and all("m64n16k32.s32.s8.s8" in line for line in m16)
    text = kernels.ptx(90, kernel="decode")
    assert "createpolicy.fractional.L2::evict_first" in text and "L2::cache_hint" in text  # weights stream
    for arch in (80, 90):  # (Triton 3.9 drops the eviction hint from its sm_80 cp.async)
        assert "atom.global.gpu.acq_rel.add" in kernels.ptx(arch, kernel="decode")  # the split-K counter


def test_ptx_requantize_epilogue_is_in_the_kernel():
    for arch, kernel in ((80, "gemm"), (90, "gemm"), (90, "decode")):
        text = kernels.ptx(arch, epilogue="requantize", kernel=kernel)
        assert "div.rn.f32" in text  # IEEE division by out_scale
        assert "0f4B400000" in text  # 1.5 * 2**23, the round-half-to-even constant


def test_ptx_errors():
    with pytest.raises(ValueError, match="arch"):
        kernels.ptx(70)
    with pytest.raises(ValueError, match="epilogue"):
        kernels.ptx(80, epilogue="gelu")
    with pytest.raises(ValueError, match="kernel"):
        kernels.ptx(80, kernel="gemv")
    with pytest.raises(ValueError, match="Hopper"):
        kernels.ptx(80, kernel="tma")


SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # the most one block may use: A100, H100
SPILL_CASES = [(80, "portable"), (80, "decode"), (90, "tma"), (90, "portable"), (90, "decode")]


@pytest.mark.parametrize(("arch", "kernel"), SPILL_CASES)
def test_no_configuration_spills_registers(arch, kernel):
    # Every autotuning candidate, with the float16-dequantizing epilogue the benchmark times; the first also
    # with the other epilogues (those kernels.ptx shows). ptxas reports registers and spilled bytes.
    others = [("int32", None), ("dequantize", None), ("requantize", None)]
    for i, config in enumerate(int8_ptx.configs(arch, kernel)):
        cases = [("dequantize", torch.float16)] + (others if i == 0 else [])
        for epilogue, out_dtype in cases:
            compiled = int8_ptx.compile_kernel(arch, kernel, epilogue, config, out_dtype)
            usage = int8_ptx.resource_usage(compiled)
            where = f"{kernel} {config} {epilogue} on sm_{arch}: {usage}"
            assert usage["spill_stores"] == usage["spill_loads"] == usage["stack_frame"] == 0, where
            assert usage["registers"] <= 255 and compiled.metadata.shared <= SHARED_BYTES[arch], where


# -- autotuning configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [80, 90])
def test_configs_fit_the_architecture(arch):
    for kernel in ("gemm", "portable", "decode"):
        configs = int8_ptx.configs(arch, kernel)
        assert len(set(configs)) == len(configs) >= 3
        for c in configs:
            assert c.BLOCK_K % 32 == 0 and c.BLOCK_M % 8 == 0 and c.BLOCK_N % 16 == 0
            assert c.num_warps in (4, 8) and 2 <= c.num_stages <= 5
            assert c.num_stages * (c.BLOCK_M + c.BLOCK_N) * c.BLOCK_K <= SHARED_BYTES[arch]
    assert kernels.int8_configs(arch) == int8_triton.int8_configs(arch)
    assert any(c.BLOCK_M <= 32 for c in int8_triton.int8_configs(arch))  # skinny M


def test_prune_keeps_short_tiles_for_small_m():
    configs = [c.to_triton() for c in int8_triton.int8_configs(80)]
    kept = int8_triton._prune_for_m(configs, {"M": 17})
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 for c in kept)
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


@pytest.mark.parametrize(("M", "N", "K"), [*SHAPES["portable"], *SHAPES["decode"], (64, 64, 64)])
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


def test_launch_refuses_unknown_kernel(interpret):
    a = rand_int8(2, 2, seed=19)
    with pytest.raises(ValueError, match="kernel must be one of"):
        run("gemv", a, a)
    with pytest.raises(ValueError, match="M <= 16"):
        run("decode", rand_int8(17, 2, seed=20), a)


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
