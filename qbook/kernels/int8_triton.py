"""The Triton int8 GEMMs of chapter 10: int32 accumulation on tensor cores, dequantization in the epilogue.

The algorithm, in the notation of the book. ``C = A @ B`` with ``A`` int8 (M, K) and ``B`` int8 (K, N) is cut
into tiles of ``BLOCK_M x BLOCK_N``; a program (a CUDA thread block) computes a tile of ``C``. It walks K in
steps of ``BLOCK_K``, loading a ``(BLOCK_M, BLOCK_K)`` slab of ``A`` and a ``(BLOCK_K, BLOCK_N)`` slab of
``B`` and adding their product into an int32 accumulator ``acc`` that never leaves registers (10.1)::

    acc[m, n] = sum_k A[m, k] * B[k, n]                                      (10.1)

When the loop ends, the epilogue turns ``acc`` into the output while it is still in registers::

    int32:       C = acc
    dequantize:  C = acc * a_scale[m] * b_scale[n] (+ bias[n])               (10.2)
    requantize:  C = clamp(round_half_even(y / out_scale) + out_zero_point, -128, 127), y of (10.2)  (10.3)

Fusing (10.2) here saves writing the int32 ``(M, N)`` matrix to memory and reading it back for a separate
scaling kernel: 8 bytes per output element that the unfused pipeline moves through DRAM.

Three kernels share the epilogue :func:`_epilogue` and the tile order :func:`tile_order`:

- :func:`_int8_matmul_kernel` (this module), the portable one: pointers and strides, any layout, any GPU
  from Ampere on; loads pipelined by ``cp.async``;
- ``int8_hopper._int8_matmul_tma_kernel``: persistent, TMA loads and stores, warp-specialised (Hopper);
- ``int8_decode._int8_decode_kernel``: for M <= 16 tokens, operands swapped and K split among programs.

:func:`choose_kernel` picks one and :func:`launch` runs it. This module needs Triton;
:func:`qbook.kernels.int8_matmul` is the checked public entry point.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import interpreting

if TYPE_CHECKING:
    from . import Epilogue

__all__ = [
    "INTERPRETER_CONFIG", "KERNELS", "TileConfig", "choose_kernel", "int8_configs", "interpreted", "launch",
    "needs_int64", "tile_order",
]  # fmt: skip

KERNELS = ("portable", "tma", "decode")


@triton.jit
def _epilogue(
    acc, offs_m, offs_n,  # the int32 tile and the rows (of A) and columns (of B) it belongs to
    a_scale_ptr, b_scale_ptr, bias_ptr, stride_a_scale, stride_b_scale, out_scale, out_zero_point,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # What every kernel does with its int32 tile once the K loop is done: nothing ("int32"), (10.2) or (10.3).
    if EPILOGUE == "int32":
        out = acc
    else:
        # (10.2): one scale per row of A, one per column of B (stride 0 reads the same scalar everywhere).
        a_scale = tl.load(a_scale_ptr + offs_m * stride_a_scale)
        b_scale = tl.load(b_scale_ptr + offs_n * stride_b_scale)
        y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n)[None, :]
        if EPILOGUE == "dequantize":
            out = y
        else:
            # (10.3), with an IEEE division as in the reference. Values beyond +-384 clamp to -128 or 127
            # whatever the zero point, so clamping them first keeps |t| < 2**22, where adding and subtracting
            # 1.5 * 2**23 rounds t to an integer, ties to even, exactly.
            t = tl.math.div_rn(y, out_scale)
            t = tl.minimum(tl.maximum(t, -384.0), 384.0)
            t = (t + 12582912.0) - 12582912.0
            q = t.to(tl.int32) + out_zero_point
            out = tl.minimum(tl.maximum(q, -128), 127)
    return out


@triton.jit
def _int8_matmul_kernel(
    # Pointers: the int8 operands, the output, and the epilogue's per-row / per-column vectors.
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    # Shapes: C (M, N) = A (M, K) @ B (K, N).
    M, N, K,
    # Strides, in elements: row m of A starts at a_ptr + m * stride_am, and so on.
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # 1 for a per-row (per-column) scale vector, 0 for a single scale shared by every row (column).
    stride_a_scale, stride_b_scale,
    # Epilogue options: what to do with the int32 tile once the K loop is done.
    out_scale, out_zero_point,
    EPILOGUE: tl.constexpr,  # "int32", "dequantize" or "requantize"
    HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr,  # 64-bit offsets, for a matrix that spans 2**31 elements or more
    # Tile meta-parameters, chosen by the autotuner (int8_configs) or fixed for the interpreter.
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1. Which tile of C does this program own? Programs are numbered pid = 0, 1, 2, ... and start roughly in
    #    that order. Numbering the tiles row by row would stream all of B through the L2 cache once per row of
    #    tiles. Instead, GROUP_M rows of tiles are numbered column by column: consecutive programs share the
    #    same column of B tiles, which stays in L2 while GROUP_M programs use it.
    pid = tl.program_id(axis=0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # tiles along M, the last one partial
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    programs_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)  # the last group may have fewer rows
    pid_in_group = pid % programs_per_group
    pid_m = first_pid_m + pid_in_group % group_rows
    pid_n = pid_in_group // group_rows

    # 2. Row and column indices of the tile. Indices past M (or N) wrap around into range, so the loads of
    #    the K loop need no M or N mask; the rows they compute are thrown away by the masked store at the end.
    #    Offsets are products of indices and strides: int32, unless a matrix is too large for that.
    if INDEX_64:
        stride_am, stride_ak = tl.cast(stride_am, tl.int64), tl.cast(stride_ak, tl.int64)
        stride_bk, stride_bn = tl.cast(stride_bk, tl.int64), tl.cast(stride_bn, tl.int64)
        stride_cm, stride_cn = tl.cast(stride_cm, tl.int64), tl.cast(stride_cn, tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)

    # 3. The K loop (10.1). Each step multiplies an int8 slab of A by one of B on the tensor cores (mma.sync
    #    on Ampere, wgmma on Hopper) and adds the products into the int32 accumulator. The last step may run
    #    past K: the mask loads zeros there, and zeros add nothing to the dot product.
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_remaining = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_remaining, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_remaining, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # 4. The epilogue, on the tile in registers: no int32 matrix ever goes to memory unless asked for.
    out = _epilogue(acc, offs_m, offs_n, a_scale_ptr, b_scale_ptr, bias_ptr, stride_a_scale, stride_b_scale,
                    out_scale, out_zero_point, EPILOGUE, HAS_BIAS)  # fmt: skip

    # 5. Write the tile, masking the rows and columns that lie outside C.
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn  # (BLOCK_M, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def tile_order(num_pid_m: int, num_pid_n: int, GROUP_M: int) -> list[tuple[int, int]]:
    """The tile ``(pid_m, pid_n)`` of ``C`` that program ``pid`` computes, for ``pid = 0, 1, ...``.

    Step 1 of :func:`_int8_matmul_kernel` in plain Python, for figures and tests: tiles are numbered down
    the columns of bands of ``GROUP_M`` tile rows (``GROUP_M = 1`` is plain row-by-row order).

    >>> tile_order(num_pid_m=3, num_pid_n=2, GROUP_M=2)
    [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
    """
    order = []
    programs_per_group = GROUP_M * num_pid_n
    for pid in range(num_pid_m * num_pid_n):
        first_pid_m = (pid // programs_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_in_group = pid % programs_per_group
        order.append((first_pid_m + pid_in_group % group_rows, pid_in_group // group_rows))
    return order


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: the tile meta-parameters and the compiler's warps and pipeline stages.

    Shared memory per program is about ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K`` bytes for int8 tiles.
    The decode kernel leaves ``BLOCK_M`` (the tokens, 8 or 16, set from M at launch) and ``GROUP_M`` at None.
    """

    BLOCK_M: int | None
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int | None = 8
    num_warps: int = 4
    num_stages: int = 3

    @property
    def meta(self) -> dict[str, int]:
        """The kernel's tile meta-parameters (the constexpr arguments)."""
        params = asdict(self)
        del params["num_warps"], params["num_stages"]
        return {name: value for name, value in params.items() if value is not None}

    def to_triton(self) -> triton.Config:
        return triton.Config(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)


#: The interpreter runs each program in Python with NumPy: few, mid-sized tiles are fastest, and these are
#: still small enough that the test shapes cover several tiles, a partial last tile and the K tail.
INTERPRETER_CONFIG = TileConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def int8_configs(arch: int) -> tuple[TileConfig, ...]:
    """Autotuning candidates of the portable kernel on compute capability ``arch`` (80 Ampere, 90 Hopper).

    An int8 tensor-core instruction consumes 32 values of K (``mma.m16n8k32``, ``wgmma.m64nNk32``), so
    ``BLOCK_K`` is a multiple of 32. The int32 accumulator takes ``BLOCK_M * BLOCK_N / (32 * num_warps)``
    registers per thread, and each thread has at most 255: every configuration here leaves room for the
    operand fragments and addresses, and ``ptxas`` compiles each of them without spilling registers (chapter
    10 checks it). The first entry is the large-tile workhorse that chapter 10 compiles to PTX. Hopper runs
    this kernel only where the TMA kernel cannot (unaligned strides); skinny tiles serve M <= 64.

    >>> int8_configs(80)[0]
    TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    >>> all(c.BLOCK_K % 32 == 0 for c in int8_configs(90))
    True
    """
    if arch >= 90:
        large = (
            TileConfig(128, 256, 128, num_warps=8, num_stages=3),
            TileConfig(128, 128, 64, num_warps=4, num_stages=5),
        )
    else:
        large = (
            TileConfig(128, 128, 64, num_warps=8, num_stages=4),
            TileConfig(128, 128, 128, num_warps=8, num_stages=3),
            TileConfig(128, 64, 64, num_warps=4, num_stages=4),
        )
    skinny = (
        TileConfig(64, 128 if arch >= 90 else 64, 128, num_warps=4, num_stages=4),
        TileConfig(32, 64, 128, num_warps=4, num_stages=4),
    )
    return large + skinny


def _prune_for_m(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than twice M rounded up to a power of two (mostly padding); the shortest stays."""
    limit = max(32, 2 * triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit]


#: The autotuner's key: a new shape, a new layout of B (K-major or not) or a new epilogue is tuned anew.
TUNING_KEY = ["M", "N", "K", "stride_bk", "stride_bn", "EPILOGUE", "HAS_BIAS"]


@functools.cache
def _autotuned(arch: int) -> Callable:
    return triton.autotune(
        configs=[c.to_triton() for c in int8_configs(arch)],
        key=TUNING_KEY,
        prune_configs_by={"early_config_prune": _prune_for_m},
    )(_int8_matmul_kernel)


@functools.cache
def interpreted(kernel: JITFunction | InterpretedFunction) -> InterpretedFunction:
    """``kernel`` as Triton's CPU interpreter runs it, the ``@triton.jit`` helpers it calls included.

    Triton makes ``@triton.jit`` functions interpreted ones if ``TRITON_INTERPRET=1`` is set when they are
    defined. Set later, or between the imports of two modules, a kernel is made interpreted here: it runs with
    a copy of its module's globals in which every ``@triton.jit`` function is interpreted too, so that calls
    such as ``_epilogue(...)`` run in Python. (Triton's own helpers such as ``tl.zeros`` stay compiled-only:
    the kernels call builtins such as ``tl.full`` instead.)
    """
    fn = kernel.fn
    env = {name: InterpretedFunction(value.fn) if isinstance(value, JITFunction) else value
           for name, value in fn.__globals__.items()}  # fmt: skip
    clone = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    return InterpretedFunction(clone)


def needs_int64(*matrices: torch.Tensor) -> bool:
    """Whether some element of the matrices lies ``2**31`` or more elements from its matrix's start.

    Then the kernels compute their element offsets in 64 bits (``INDEX_64``), rather than leave the GPU.

    >>> logits = torch.empty((16384, 152064), device="meta")  # 16384 tokens times a 152064-word vocabulary
    >>> needs_int64(torch.empty((2, 3), device="meta")), needs_int64(logits)
    (False, True)
    """
    farthest = max(sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True)) for x in matrices)
    return farthest >= 2**31


def choose_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, arch: int) -> str:
    """Which kernel computes ``c = a @ b`` on ``arch``: ``"decode"``, ``"tma"`` or ``"portable"``.

    Decode shapes (M <= 16) take the decode kernel. On Hopper (``arch >= 90``) the TMA kernel takes the rest
    when TMA can address the matrices (``int8_hopper.tma_compatible``: B K-major as :func:`qbook.kernels.
    layout.prepack_weight` stores it, rows 16-byte aligned). Everything else runs on the portable kernel.

    >>> a, w = torch.zeros((4096, 4096), dtype=torch.int8), torch.zeros((4096, 4096), dtype=torch.int8)
    >>> c = torch.empty((4096, 4096), dtype=torch.int32)
    >>> choose_kernel(a, w.T, c, 90), choose_kernel(a, w, c, 90), choose_kernel(a[:16], w.T, c[:16], 90)
    ('tma', 'portable', 'decode')
    """
    from .int8_hopper import tma_compatible

    if a.shape[0] <= 16:
        return "decode"
    if arch >= 90 and tma_compatible(a, b, c):
        return "tma"
    return "portable"


def launch(a: torch.Tensor, b: torch.Tensor, epilogue: Epilogue, kernel: str | None = None) -> torch.Tensor:
    """Allocate ``C``, pick a kernel (:func:`choose_kernel`, or ``kernel``) and launch it.

    ``a`` int8 (M, K) and ``b`` int8 (K, N) on one device, ``epilogue`` as built by
    :func:`qbook.kernels.int8_matmul`; any strides. On a GPU each kernel is autotuned; in the interpreter it
    runs one small fixed configuration, and ``choose_kernel`` decides as it would on Hopper.
    """
    M, N = a.shape[0], b.shape[1]
    c = torch.empty((M, N), dtype=epilogue.out_dtype, device=a.device)
    arch = 90 if interpreting() else _arch(a.device)
    kernel = _check_kernel(kernel, M) if kernel else choose_kernel(a, b, c, arch)
    a_scale, b_scale = epilogue.a_scale, epilogue.b_scale
    args = (
        a_scale, b_scale, epilogue.bias,
        int(a_scale is not None and a_scale.numel() > 1), int(b_scale is not None and b_scale.numel() > 1),
        epilogue.out_scale, epilogue.out_zero_point,
    )  # fmt: skip
    has_bias, index_64 = epilogue.bias is not None, needs_int64(a, b, c)
    options = {"EPILOGUE": epilogue.kind, "HAS_BIAS": has_bias, "INDEX_64": index_64}
    if kernel == "tma":
        from .int8_hopper import launch_tma

        launch_tma(a, b, c, args, options)
    elif kernel == "decode":
        from .int8_decode import launch_decode

        launch_decode(a, b, c, args, options, arch)
    else:
        _launch_gemm(a, b, c, args, options, arch)
    return c


def _check_kernel(kernel: str, M: int) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "decode" and M > 16:
        raise ValueError(f"the decode kernel takes M <= 16 rows, got M = {M}")
    return kernel


def _launch_gemm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, args: tuple, options: dict, arch: int
) -> None:
    """One program per tile of C: the grid is ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` programs."""
    (M, K), N = a.shape, b.shape[1]
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    operands = (a, b, c, *args[:3], M, N, K, *strides, *args[3:])

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreting():
        interpreted(_int8_matmul_kernel)[grid](*operands, **options, **INTERPRETER_CONFIG.meta)
    else:
        with torch.cuda.device(a.device):
            _autotuned(arch)[grid](*operands, **options, enable_fp_fusion=False)


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
