"""The Triton int8 GEMM of chapter 10: int32 accumulation on tensor cores, dequantization in the epilogue.

The algorithm, in the notation of the book. ``C = A @ B`` with ``A`` int8 (M, K) and ``B`` int8 (K, N) is cut
into tiles of ``BLOCK_M x BLOCK_N``; one program (a CUDA thread block) owns one tile of ``C``. It walks K in
steps of ``BLOCK_K``, loading a ``(BLOCK_M, BLOCK_K)`` slab of ``A`` and a ``(BLOCK_K, BLOCK_N)`` slab of
``B`` and adding their product into an int32 accumulator ``acc`` that never leaves registers (10.1)::

    acc[m, n] = sum_k A[m, k] * B[k, n]                                      (10.1)

When the loop ends, the epilogue turns ``acc`` into the output while it is still in registers::

    int32:       C = acc
    dequantize:  C = acc * a_scale[m] * b_scale[n] (+ bias[n])               (10.2)
    requantize:  C = clamp(round_half_even(y / out_scale) + out_zero_point, -128, 127), y of (10.2)  (10.3)

Fusing (10.2) here saves writing the int32 ``(M, N)`` matrix to memory and reading it back for a separate
scaling kernel: 8 bytes per output element that the unfused pipeline moves through DRAM.

This module needs Triton. :func:`qbook.kernels.int8_matmul` is the checked public entry point; the
functions here assume their inputs have been validated. The kernel calls Triton builtins only, no
``@triton.jit`` helpers such as ``tl.cdiv``: Triton's CPU interpreter then runs it whether or not
``TRITON_INTERPRET=1`` was set when Triton was imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import interpreting

if TYPE_CHECKING:
    from . import Epilogue

__all__ = ["INTERPRETER_CONFIG", "TileConfig", "int8_configs", "launch", "ptx", "tile_order"]


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
    if EPILOGUE == "int32":
        out = acc
    else:
        # (10.2): one scale per row of A, one per column of B (stride 0 reads the same scalar everywhere).
        a_scale = tl.load(a_scale_ptr + offs_m * stride_a_scale)  # (BLOCK_M,)
        b_scale = tl.load(b_scale_ptr + offs_n * stride_b_scale)  # (BLOCK_N,)
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

    Shared memory per program is ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K`` bytes for int8 tiles.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @property
    def meta(self) -> dict[str, int]:
        """The kernel's tile meta-parameters (the constexpr arguments)."""
        params = asdict(self)
        del params["num_warps"], params["num_stages"]
        return params

    def to_triton(self) -> triton.Config:
        return triton.Config(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)


#: The interpreter runs each program in Python with NumPy: few, mid-sized tiles are fastest, and these are
#: still small enough that the test shapes cover several tiles, a partial last tile and the K tail.
INTERPRETER_CONFIG = TileConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)

# Decode and other skinny shapes (M <= 64): tall-thin tiles with a long K step. With N = 4096 these give
# 64 to 128 programs, enough to keep every SM streaming weights.
_SKINNY = (
    TileConfig(16, 64, 256, num_warps=4, num_stages=4),
    TileConfig(16, 32, 256, num_warps=4, num_stages=4),
    TileConfig(32, 64, 128, num_warps=4, num_stages=4),
    TileConfig(64, 64, 128, num_warps=4, num_stages=4),
)


def int8_configs(arch: int) -> tuple[TileConfig, ...]:
    """Autotuning candidates for the int8 GEMM on NVIDIA compute capability ``arch`` (80 Ampere, 90 Hopper).

    An int8 tensor-core instruction consumes 32 values of K (``mma.m16n8k32``, ``wgmma.m64nNk32``), so
    ``BLOCK_K`` is a multiple of 32. Ampere has 164 KB of shared memory per SM: three or four stages of
    ``(BLOCK_M + BLOCK_N) * BLOCK_K`` bytes fit for 128-256 wide tiles with ``BLOCK_K = 64``. Hopper has
    228 KB and issues ``wgmma`` per warpgroup of 4 warps on ``BLOCK_M >= 64``, so its large tiles use 8 warps
    (two warpgroups) and ``BLOCK_K = 128``. The first entry is the large-square workhorse; chapter 10
    compiles it to PTX.

    >>> int8_configs(90)[0]
    TileConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    >>> all(c.BLOCK_K % 32 == 0 for c in int8_configs(80))
    True
    """
    if arch >= 90:
        square = (
            TileConfig(128, 256, 128, num_warps=8, num_stages=3),
            TileConfig(256, 128, 128, num_warps=8, num_stages=3),
            TileConfig(128, 128, 128, num_warps=8, num_stages=4),
            TileConfig(128, 256, 64, num_warps=8, num_stages=4),
            TileConfig(64, 256, 128, num_warps=4, num_stages=4),
            TileConfig(128, 128, 64, num_warps=4, num_stages=5),
        )
    else:
        square = (
            TileConfig(128, 256, 64, num_warps=8, num_stages=3),
            TileConfig(256, 128, 64, num_warps=8, num_stages=3),
            TileConfig(128, 128, 64, num_warps=4, num_stages=4),
            TileConfig(128, 128, 128, num_warps=8, num_stages=3),
            TileConfig(64, 128, 128, num_warps=4, num_stages=4),
            TileConfig(128, 64, 64, num_warps=4, num_stages=5),
        )
    return square + _SKINNY


def _prune_for_m(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than twice M rounded up to a power of two (mostly padding); 16 always stays."""
    limit = max(16, 2 * triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit]


@functools.cache
def _autotuned(arch: int) -> Callable:
    return triton.autotune(
        configs=[c.to_triton() for c in int8_configs(arch)],
        key=["M", "N", "K", "EPILOGUE", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_for_m},
    )(_int8_matmul_kernel)


@functools.cache
def _interpreted() -> InterpretedFunction:
    kernel = _int8_matmul_kernel
    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


def launch(a: torch.Tensor, b: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
    """Allocate ``C`` and launch the kernel: autotuned on a GPU, :data:`INTERPRETER_CONFIG` when interpreting.

    ``a`` int8 (M, K) and ``b`` int8 (K, N) on one device, ``epilogue`` as built by
    :func:`qbook.kernels.int8_matmul`; any strides.
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=epilogue.out_dtype, device=a.device)
    a_scale, b_scale = epilogue.a_scale, epilogue.b_scale
    args = (
        a, b, c, a_scale, b_scale, epilogue.bias,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        int(a_scale is not None and a_scale.numel() > 1), int(b_scale is not None and b_scale.numel() > 1),
        epilogue.out_scale, epilogue.out_zero_point,
    )  # fmt: skip
    options = {"EPILOGUE": epilogue.kind, "HAS_BIAS": epilogue.bias is not None}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreting():
        _interpreted()[grid](*args, **options, **INTERPRETER_CONFIG.meta)
    else:
        major, minor = torch.cuda.get_device_capability(a.device)
        with torch.cuda.device(a.device):
            _autotuned(10 * major + minor)[grid](*args, **options, enable_fp_fusion=False)
    return c


# Argument types for compiling without a GPU. The unit strides (A row-major, B column-major as the transpose
# of an (N, K) nn.Linear weight, C row-major) are constants, as Triton specialises them when it launches.
_SIGNATURE = {
    "a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": None, "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
    "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
    "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "constexpr", "stride_bn": "i32",
    "stride_cm": "i32", "stride_cn": "constexpr",
    "stride_a_scale": "constexpr", "stride_b_scale": "constexpr",
    "out_scale": "fp32", "out_zero_point": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
}  # fmt: skip
_OUT_TYPES = {"int32": "*i32", "dequantize": "*fp32", "requantize": "*i8"}
_SUPPORTED_ARCHS = (80, 86, 89, 90)


@functools.cache
def ptx(arch: int = 90, epilogue: str = "dequantize") -> str:
    """PTX of the int8 matmul kernel compiled for ``sm_<arch>`` (``sm_90a`` for Hopper), without a GPU.

    Triton's compiler needs only a target description, ``GPUTarget("cuda", arch, 32)``, and the ``ptxas``
    shipped with Triton; no driver and no device. The kernel is specialised as it would be launched on
    that architecture: the first tile of :func:`int8_configs` (``arch``), per-row and per-column scales,
    ``A`` row-major and ``B`` column-major (the transpose of an ``(N, K)`` weight), M, N, K and the leading
    strides multiples of 16, as for the layers of a transformer.

    >>> text = ptx(80)
    >>> "mma.sync.aligned.m16n8k32.row.col" in text and ".s8.s8" in text
    True
    """
    if arch not in _SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {_SUPPORTED_ARCHS} (compute capability x 10), got {arch!r}")
    if epilogue not in _OUT_TYPES:
        raise ValueError(f"epilogue must be one of {tuple(_OUT_TYPES)}, got {epilogue!r}")
    config = int8_configs(arch)[0]
    kernel = _int8_matmul_kernel
    kernel = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    signature = {**_SIGNATURE, "c_ptr": _OUT_TYPES[epilogue]}
    constexprs = {
        "stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "stride_a_scale": 1, "stride_b_scale": 1,
        "EPILOGUE": epilogue, "HAS_BIAS": True, **config.meta,
    }  # fmt: skip
    # Divisibility by 16 (pointers 16-byte aligned, M, N, K and leading strides multiples of 16), as Triton
    # infers it at launch for such shapes: it lets the K loop use 16-byte asynchronous copies (cp.async).
    aligned = ("a_ptr", "b_ptr", "c_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr", "M", "N", "K",
               "stride_am", "stride_bn", "stride_cm")  # fmt: skip
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["ptx"]
