"""The Hopper int8 GEMM of chapter 10: persistent, TMA loads and stores, warp-specialised, subtiled epilogue.

The algorithm is that of the portable kernel (``int8_triton``), with four changes for an H100:

1. **Tensor descriptors.** The Tensor Memory Accelerator (TMA) copies a whole ``(BLOCK_M, BLOCK_K)`` tile
   between global and shared memory from one instruction (``cp.async.bulk.tensor``), given a descriptor
   of the matrix (base, shape, strides). It needs 16-byte aligned rows, so ``B`` must be K-major: the
   weight ``W = B.T`` (N, K) row-major, as ``nn.Linear`` stores it. Out-of-bounds parts of a tile read as
   zeros and are not written, so no masks are needed anywhere.
2. **Persistent.** One program per SM, each walking the tiles ``pid, pid + P, pid + 2P, ...`` of ``C`` in the
   grouped order of :func:`qbook.kernels.int8_triton.tile_order`: no launch wave is left half empty, and the
   producer can fetch the next tile's first slabs while the consumers finish the last tile's epilogue.
3. **Warp specialisation.** ``tl.range(..., warp_specialize=True)`` splits the program into a producer
   warpgroup that only issues TMA loads into a ring of ``num_stages`` shared-memory buffers and two consumer
   warpgroups of 4 warps that only issue ``wgmma`` on 64 rows each (``setmaxnreg`` moves registers from the
   producer to the consumers). Triton's software pipeliner does not overlap one K step's int32 ``wgmma``
   with the next (it keeps ``wgmma`` asynchronous only for float32 accumulators and waits for each int32 one
   with ``wgmma.wait_group 0``); here the waiting consumer is one of two, and the loads never wait for it.
4. **Epilogue subtiling.** The ``(BLOCK_M, BLOCK_N)`` accumulator leaves in two halves of ``BLOCK_N / 2``
   columns, each dequantized and stored by TMA on its own: half the staging buffer in shared memory, and
   the first half's store overlaps the second half's arithmetic.
"""

from __future__ import annotations

import contextvars

import torch
import triton
import triton.language as tl

from . import interpreting
from .int8_triton import TUNING_KEY, TileConfig, _epilogue, _prune_for_m, interpreted

__all__ = ["INTERPRETER_CONFIG", "WARP_SPECIALIZE", "hopper_configs", "launch_tma", "tma_compatible"]


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


#: Whether the K loop is warp-specialised. Triton 3.9 compiles it for sm_90a; Triton 3.6 (PyTorch 2.11's)
#: stops in its ``NVGPUWarpSpecialization`` pass on this kernel, so there the loop is software-pipelined by
#: all warps alike (same result; the producer/consumer split is lost). Versions in between were not tried.
WARP_SPECIALIZE = _triton_version() >= (3, 9)


@triton.jit
def _int8_matmul_tma_kernel(
    # Pointers: A (M, K) and the weight W = B.T (N, K), both row-major (K-major), C (M, N) row-major, and the
    # epilogue's per-row / per-column vectors.
    a_ptr, w_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    # Shapes: C (M, N) = A (M, K) @ W.T.
    M, N, K,
    # Row strides in elements; the column strides are 1, as TMA requires.
    stride_am, stride_wn, stride_cm,
    # Epilogue options, as in the portable kernel.
    stride_a_scale, stride_b_scale, out_scale, out_zero_point,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    # Tile meta-parameters (hopper_configs), and whether to split loads and math among warpgroups.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # 1. Descriptors of the three matrices, each with the tile shape that one TMA copy moves.
    HALF_N: tl.constexpr = BLOCK_N // 2
    a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, HALF_N])

    # 2. Persistent loop: program pid computes tiles pid, pid + P, pid + 2P, ... (P programs, one per SM),
    #    each located by the grouped order of the portable kernel's step 1.
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    k_steps = (K + BLOCK_K - 1) // BLOCK_K
    programs_per_group = GROUP_M * num_pid_n
    for tile in range(tl.program_id(axis=0), num_pid_m * num_pid_n, tl.num_programs(axis=0)):
        first_pid_m = (tile // programs_per_group) * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile % programs_per_group) % group_rows
        pid_n = (tile % programs_per_group) // group_rows
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N

        # 3. The K loop (10.1), warp-specialised: producer warps stream tiles in by TMA (zeros past K, M, N),
        #    consumer warpgroups multiply them with wgmma into the int32 accumulator.
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
        for k in tl.range(0, k_steps, warp_specialize=WARP_SPECIALIZE):
            a = a_desc.load([off_m, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            w = w_desc.load([off_n, k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)

        # 4. The epilogue (10.2)-(10.3) in two column halves, each stored by TMA (rows and columns past M and
        #    N are not written). Scale indices wrap around like the portable kernel's, and stay in range.
        offs_m = (off_m + tl.arange(0, BLOCK_M)) % M
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
        for half in tl.static_range(2):
            offs_n = (off_n + half * HALF_N + tl.arange(0, HALF_N)) % N
            out = _epilogue(left if half == 0 else right, offs_m, offs_n, a_scale_ptr, b_scale_ptr,
                            bias_ptr, stride_a_scale, stride_b_scale, out_scale, out_zero_point,
                            EPILOGUE, HAS_BIAS)  # fmt: skip
            c_desc.store([off_m, off_n + half * HALF_N], out.to(c_ptr.dtype.element_ty))


def hopper_configs() -> tuple[TileConfig, ...]:
    """Autotuning candidates of the TMA kernel on Hopper (sm_90a).

    ``num_warps = 4`` is the size of each warpgroup: with warp specialisation a program runs a producer
    warpgroup and one consumer warpgroup per 64 rows of ``BLOCK_M``. Shared memory holds ``num_stages``
    buffers of ``(BLOCK_M + BLOCK_N) * BLOCK_K`` bytes plus the staging tile of the epilogue, within the
    227 KB a Hopper block may use. The first entry is the one chapter 10 compiles.

    >>> hopper_configs()[0]
    TileConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    """
    wide = 4 if WARP_SPECIALIZE else 8  # unsplit, 4 warps would hold a 128 x 256 int32 tile and spill
    return (
        TileConfig(128, 256, 128, num_warps=wide, num_stages=3),
        TileConfig(128, 256, 64, num_warps=wide, num_stages=4),
        TileConfig(128, 128, 128, num_warps=4, num_stages=4),
        TileConfig(64, 128, 128, num_warps=4, num_stages=5),
    )


#: Small tiles for Triton's CPU interpreter (which ignores warps, stages and the TMA hardware), and how many
#: "SMs" the persistent grid has there, so that each program walks several tiles.
INTERPRETER_CONFIG = TileConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_SMS = 3


def tma_compatible(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether TMA can address A, ``W = b.T`` and C: unit column strides and 16-byte aligned rows and bases.

    >>> w = torch.zeros((64, 48), dtype=torch.int8)                        # a weight (N, K)
    >>> a, c = torch.zeros((32, 48), dtype=torch.int8), torch.zeros((32, 64))
    >>> odd_a, odd_w = torch.zeros((32, 40), dtype=torch.int8), torch.zeros((64, 40), dtype=torch.int8)
    >>> tma_compatible(a, w.T, c), tma_compatible(a, w.T.contiguous(), c), tma_compatible(odd_a, odd_w.T, c)
    (True, False, False)
    """
    w = b.T
    for x in (a, w, c):
        if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
            return False
    return True


def _grid(num_sms: int, M: int, N: int) -> callable:
    def grid(meta: dict) -> tuple[int]:
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    return grid


_autotuned = triton.autotune(
    configs=[c.to_triton() for c in hopper_configs()],
    key=TUNING_KEY[:3] + ["EPILOGUE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_for_m},
)(_int8_matmul_tma_kernel)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the descriptors that the kernel builds (``tl.make_tensor_descriptor``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch_tma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, args: tuple, options: dict) -> None:
    """A persistent grid of ``min(SMs, tiles)`` programs: autotuned on a GPU, small when interpreting."""
    (M, K), N = a.shape, b.shape[1]
    w = b.T  # (N, K), row-major
    operands = (a, w, c, *args[:3], M, N, K, a.stride(0), w.stride(0), c.stride(0), *args[3:])
    options = {"EPILOGUE": options["EPILOGUE"], "HAS_BIAS": options["HAS_BIAS"],
               "WARP_SPECIALIZE": WARP_SPECIALIZE}
    if interpreting():
        grid = _grid(INTERPRETER_SMS, M, N)
        interpreted(_int8_matmul_tma_kernel)[grid](*operands, **options, **INTERPRETER_CONFIG.meta)
        return

    def run() -> None:
        # The scratch allocator is set in a copy of the context: the caller's Triton settings stay unchanged.
        triton.set_allocator(_scratch)
        grid = _grid(torch.cuda.get_device_properties(a.device).multi_processor_count, M, N)
        _autotuned[grid](*operands, **options, enable_fp_fusion=False)

    with torch.cuda.device(a.device):
        contextvars.copy_context().run(run)
