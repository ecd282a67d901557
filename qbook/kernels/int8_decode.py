"""The decode int8 GEMM of chapter 10: M <= 16 tokens, operands swapped, K split among programs.

Generating text multiplies one token (M = 1), or a few, by every weight matrix: 2 operations per weight
byte, far below any GPU's ridge point, so the kernel's only job is to stream the weights at the memory's
full bandwidth. Three things in the GEMM kernels stand in the way, and this kernel changes them:

1. **Swapped operands.** A tensor-core instruction has a minimum M: 16 rows for ``mma.sync``, 64 for
   ``wgmma``. With the tokens on the M side, 1 of 64 rows does useful work. This kernel computes
   ``C.T = W @ A.T`` instead (``W = B.T``, the (N, K) weight): weight rows fill the instruction's M side and
   the tokens its N side, where ``wgmma`` takes 8 or 16 (``m64n8k32``, ``m64n16k32``).
2. **Split-K.** ``N = 4096`` in tiles of 128 rows is 32 programs, too few to keep 132 SMs loading. When there
   are fewer tiles than about two programs per SM, K is cut into ``SPLIT_K`` slices and each program adds its
   partial int32 tile into a workspace with atomic additions. Integer addition is associative, so the result
   is exact and the same in every order the programs finish in; the program that arrives last (an atomic
   counter per tile) reads the sum, applies the epilogue and stores ``C``, and leaves the workspace zero.
3. **Streaming hint.** Each weight byte is read once: its loads carry ``evict_first`` so they do not push the
   reused activations out of the L2 cache (on Hopper; Triton 3.9 drops the hint from Ampere's ``cp.async``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .int8_triton import TUNING_KEY, TileConfig, _epilogue, interpreted

__all__ = ["INTERPRETER_CONFIG", "decode_configs", "launch_decode", "split_k"]


@triton.jit
def _int8_decode_kernel(
    # Pointers: operands, output, epilogue vectors, and the split-K workspace: an int32 (M, N) matrix of
    # partial sums followed by one arrival counter per tile of N, all zero between launches.
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, workspace_ptr,
    # Shapes: C (M, N) = A (M, K) @ B (K, N), with M <= BLOCK_M.
    M, N, K,
    # Strides, in elements, as in the portable kernel.
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # Epilogue options, as in the portable kernel.
    stride_a_scale, stride_b_scale, out_scale, out_zero_point,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr,
    # Tile meta-parameters: BLOCK_N weight rows, BLOCK_M = 8 or 16 tokens, BLOCK_K per step.
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # 1. Program (pid_n, pid_k) owns BLOCK_N columns of C and the pid_k-th of SPLIT_K slices of the K steps.
    pid_n = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    SPLIT_K = tl.num_programs(axis=1)
    steps_per_split = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K
    k_start = pid_k * steps_per_split * BLOCK_K
    if INDEX_64:
        stride_am, stride_ak = tl.cast(stride_am, tl.int64), tl.cast(stride_ak, tl.int64)
        stride_bk, stride_bn = tl.cast(stride_bk, tl.int64), tl.cast(stride_bn, tl.int64)
        stride_cm, stride_cn = tl.cast(stride_cm, tl.int64), tl.cast(stride_cn, tl.int64)
    rows = tl.arange(0, BLOCK_M)  # tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    k_first = k_start + offs_k
    w_ptrs = b_ptr + offs_n[:, None] * stride_bn + k_first[None, :] * stride_bk  # (BLOCK_N, BLOCK_K)
    x_ptrs = a_ptr + k_first[:, None] * stride_ak + offs_m[None, :] * stride_am  # (BLOCK_K, BLOCK_M)

    # 2. The K loop with swapped operands: acc_t = W @ A.T is the (BLOCK_N, BLOCK_M) tile of C.T (W = B.T is
    #    (N, K), A.T is (K, M)); a slice past K loads only zeros. The weights are read once and evicted first;
    #    the activations are read by every program and stay cached.
    acc_t = tl.full((BLOCK_N, BLOCK_M), 0, dtype=tl.int32)
    for step in range(0, steps_per_split):
        k_remaining = K - k_start - step * BLOCK_K
        w = tl.load(w_ptrs, mask=offs_k[None, :] < k_remaining, other=0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=offs_k[:, None] < k_remaining, other=0)
        acc_t = tl.dot(w, x, acc_t, out_dtype=tl.int32)
        w_ptrs += BLOCK_K * stride_bk
        x_ptrs += BLOCK_K * stride_ak
    acc = tl.trans(acc_t)  # (BLOCK_M, BLOCK_N), rows are tokens again

    # 3. Split-K: add the partial tile into the workspace; the last of the SPLIT_K programs to arrive takes
    #    the sum (and puts zeros back) and goes on to the epilogue. The barrier puts every thread's additions
    #    before the counter's, and the counter's acquire-release ordering hands them to the last program.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    last = pid_k == 0
    if SPLIT_K > 1:
        partial_ptrs = workspace_ptr + rows[:, None] * N + cols[None, :]
        tl.atomic_add(partial_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        count_ptr = workspace_ptr + M * N + pid_n
        last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            zeros = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
            acc = tl.atomic_xchg(partial_ptrs, zeros, mask=mask, sem="relaxed")
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")

    # 4. The epilogue and the store, as in the portable kernel.
    if last:
        out = _epilogue(acc, offs_m, offs_n, a_scale_ptr, b_scale_ptr, bias_ptr, stride_a_scale,
                        stride_b_scale, out_scale, out_zero_point, EPILOGUE, HAS_BIAS)  # fmt: skip
        c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def decode_configs(arch: int) -> tuple[TileConfig, ...]:
    """Autotuning candidates of the decode kernel: ``BLOCK_N`` weight rows and ``BLOCK_K`` per step.

    A memory-bound kernel needs enough bytes in flight per SM (bandwidth x latency: about 3.35 TB/s x 1 us
    over 132 SMs, some 25 KB on an H100), not large tiles: ``num_stages`` buffers of ``BLOCK_N * BLOCK_K``
    weight bytes give 64 to 96 KB. ``BLOCK_M`` is 8 or 16, from M, at launch.

    >>> decode_configs(90)[0]
    TileConfig(BLOCK_M=None, BLOCK_N=128, BLOCK_K=256, GROUP_M=None, num_warps=4, num_stages=3)
    """
    return (
        TileConfig(None, 128, 256, None, num_warps=4, num_stages=3),
        TileConfig(None, 64, 256, None, num_warps=4, num_stages=4),
        TileConfig(None, 128, 128, None, num_warps=4, num_stages=4),
    )


#: Small tiles for the interpreter, and few "SMs", so that small test shapes split K.
INTERPRETER_CONFIG = TileConfig(None, 32, 32, None)
INTERPRETER_SMS = 4


def split_k(num_tiles: int, k_steps: int, num_sms: int) -> int:
    """How many programs share one tile's K steps: doubled while there are fewer than two programs per SM
    and each program keeps at least two steps.

    >>> split_k(num_tiles=32, k_steps=16, num_sms=132), split_k(64, 32, 132), split_k(512, 16, 132)
    (8, 8, 1)
    """
    split = 1
    while num_tiles * split < 2 * num_sms and k_steps >= 4 * split:
        split *= 2
    return split


_WORKSPACES: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # kept alive: a captured CUDA graph may still point at them


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` int32 zeros, one buffer per device and stream; the kernel leaves it zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buffer = _WORKSPACES.get((device, stream))
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _OUTGROWN.append(buffer)
        buffer = torch.zeros(max(numel, 4096), dtype=torch.int32, device=device)
        _WORKSPACES[(device, stream)] = buffer
    return buffer


_autotuned = triton.autotune(configs=[c.to_triton() for c in decode_configs(90)], key=TUNING_KEY)(
    _int8_decode_kernel
)
_autotuned_ampere = triton.autotune(configs=[c.to_triton() for c in decode_configs(80)], key=TUNING_KEY)(
    _int8_decode_kernel
)


def launch_decode(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, args: tuple, options: dict, arch: int
) -> None:
    """A grid of ``(cdiv(N, BLOCK_N), split_k(...))`` programs; autotuned on a GPU, small if interpreting."""
    (M, K), N = a.shape, b.shape[1]
    workspace = _workspace(a.device, M * N + triton.cdiv(N, 32))
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    operands = (a, b, c, *args[:3], workspace, M, N, K, *strides, *args[3:])
    BLOCK_M = 8 if M <= 8 else 16

    def grid_for(num_sms: int) -> callable:
        def grid(meta: dict) -> tuple[int, int]:
            tiles = triton.cdiv(N, meta["BLOCK_N"])
            return tiles, split_k(tiles, triton.cdiv(K, meta["BLOCK_K"]), num_sms)

        return grid

    if interpreting():
        kernel = interpreted(_int8_decode_kernel)
        kernel[grid_for(INTERPRETER_SMS)](*operands, **options, BLOCK_M=BLOCK_M, **INTERPRETER_CONFIG.meta)
        return
    num_sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    kernel = _autotuned if arch >= 90 else _autotuned_ampere
    with torch.cuda.device(a.device):
        kernel[grid_for(num_sms)](*operands, **options, BLOCK_M=BLOCK_M, enable_fp_fusion=False)
