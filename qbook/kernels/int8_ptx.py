"""Chapter 10's kernels compiled without a GPU: their PTX, and the registers and spills that ptxas reports.

Triton's compiler needs only a target description, ``GPUTarget("cuda", arch, 32)``, and the ``ptxas`` shipped
with Triton; no driver and no device. Each kernel is specialised as it would be launched for the layers of a
transformer: ``A`` row-major, ``B`` K-major (the transpose of an ``(N, K)`` weight), ``C`` row-major, per-row
and per-column scales and a bias, pointers 16-byte aligned and M, N, K and the row strides multiples of 16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.cache import get_cache_manager
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .int8_decode import _int8_decode_kernel, decode_configs
from .int8_hopper import WARP_SPECIALIZE, _int8_matmul_tma_kernel, hopper_configs
from .int8_triton import TileConfig, _int8_matmul_kernel, int8_configs

__all__ = ["ARCHS", "EPILOGUES", "KERNEL_NAMES", "compile_kernel", "configs", "ptx", "resource_usage"]

ARCHS = (80, 86, 89, 90)
EPILOGUES = ("int32", "dequantize", "requantize")
#: ``"gemm"`` is the GEMM kernel an ``sm_<arch>`` GPU runs for large aligned shapes (the TMA kernel on Hopper,
#: the portable one before); ``"decode"`` the M <= 16 kernel; ``"portable"`` and ``"tma"`` name one kernel.
KERNEL_NAMES = ("gemm", "decode", "portable", "tma")
_KERNELS = {"portable": _int8_matmul_kernel, "tma": _int8_matmul_tma_kernel, "decode": _int8_decode_kernel}
_POINTER_TYPES = {"a_ptr": "*i8", "b_ptr": "*i8", "w_ptr": "*i8", "a_scale_ptr": "*fp32",
                  "b_scale_ptr": "*fp32", "bias_ptr": "*fp32", "workspace_ptr": "*i32"}  # fmt: skip
_DEFAULT_OUT = {"int32": torch.int32, "dequantize": torch.float32, "requantize": torch.int8}
_OUT_TYPES = {torch.int32: "*i32", torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
              torch.int8: "*i8"}  # fmt: skip
_UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_cn", "stride_a_scale", "stride_b_scale")
_ALIGNED = ("M", "N", "K", "stride_am", "stride_bn", "stride_wn", "stride_cm")


def _resolve(arch: int, kernel: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS} (compute capability x 10), got {arch!r}")
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"kernel must be one of {KERNEL_NAMES}, got {kernel!r}")
    if kernel == "tma" and arch < 90:
        raise ValueError(f"the TMA kernel needs Hopper (arch 90), got arch {arch}")
    return ("tma" if arch >= 90 else "portable") if kernel == "gemm" else kernel


def configs(arch: int, kernel: str) -> tuple[TileConfig, ...]:
    """The autotuning candidates of ``kernel`` on ``sm_<arch>``; decode ones with ``BLOCK_M`` 16 (M 9 to 16).

    >>> configs(90, "gemm")[0].BLOCK_N, configs(80, "decode")[0].BLOCK_M
    (256, 16)
    """
    name = _resolve(arch, kernel)
    if name == "tma":
        return hopper_configs()
    if name == "decode":
        return tuple(dataclasses.replace(c, BLOCK_M=16) for c in decode_configs(arch))
    return int8_configs(arch)


def compile_kernel(
    arch: int, kernel: str = "gemm", epilogue: str = "dequantize", config: TileConfig | None = None,
    out_dtype: torch.dtype | None = None,
) -> triton.compiler.CompiledKernel:  # fmt: skip
    """Compile ``kernel`` for ``sm_<arch>`` (``sm_90a`` for Hopper) with ``epilogue`` and a tile ``config``.

    ``config`` defaults to the kernel's first autotuning candidate (``BLOCK_M = 8`` tokens for decode, i.e.
    M = 1); ``out_dtype`` to float32 for ``"dequantize"``. The result is Triton's compiled kernel, with
    ``.asm["ptx"]``, ``.asm["cubin"]`` and ``.metadata``; Triton caches it on disk.
    """
    name = _resolve(arch, kernel)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if config is None:
        config = configs(arch, name)[0]
        config = dataclasses.replace(config, BLOCK_M=8) if name == "decode" else config
    out_dtype = out_dtype or _DEFAULT_OUT[epilogue]
    fn = _compilable(_KERNELS[name])
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": True, "INDEX_64": False,
             "WARP_SPECIALIZE": WARP_SPECIALIZE}
    signature, constexprs = {}, {**flags, **config.meta}
    for arg in fn.arg_names:
        if arg in constexprs or arg in _UNIT_STRIDES:
            signature[arg] = "constexpr"
            constexprs.setdefault(arg, 1)
        elif arg == "c_ptr":
            signature[arg] = _OUT_TYPES[out_dtype]
        else:
            signature[arg] = _POINTER_TYPES.get(arg, "fp32" if arg == "out_scale" else "i32")
    constexprs = {arg: value for arg, value in constexprs.items() if arg in fn.arg_names}
    # Divisibility by 16, as Triton infers it at launch for such shapes: 16-byte vector loads and stores.
    aligned = [arg for arg in fn.arg_names if signature[arg].startswith("*") or arg in _ALIGNED]
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
    # ptxas's report of a fresh compilation is kept with the kernel (resource_usage reads it); a cached
    # kernel is not assembled again, and prints nothing.
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception:
            sys.stdout.write(log.getvalue())
            raise
    if "Used" in log.getvalue():
        _store_usage(compiled, log.getvalue())
    return compiled


@functools.cache
def _compilable(kernel: JITFunction | InterpretedFunction) -> JITFunction:
    """``kernel`` for the compiler, also where ``TRITON_INTERPRET=1`` made it or its helpers interpreted:
    a ``JITFunction`` of the kernel's code, run with a copy of its module's globals in which every
    interpreted function is a ``JITFunction`` again (the mirror of ``int8_triton.interpreted``)."""
    fn = kernel.fn
    env = {name: JITFunction(value.fn) if isinstance(value, InterpretedFunction) else value
           for name, value in fn.__globals__.items()}  # fmt: skip
    return JITFunction(types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__))


@functools.cache
def ptx(arch: int = 90, epilogue: str = "dequantize", kernel: str = "gemm") -> str:
    """PTX of chapter 10's ``kernel`` (``"gemm"`` or ``"decode"``) with ``epilogue``, for ``sm_<arch>``.

    >>> text = ptx(80)
    >>> "mma.sync.aligned.m16n8k32.row.col" in text and ".s8.s8" in text
    True
    """
    return compile_kernel(arch, kernel, epilogue).asm["ptx"]


def resource_usage(compiled: triton.compiler.CompiledKernel) -> dict[str, int]:
    """What ``ptxas -v`` reports for a compiled kernel: registers per thread, stack frame and spilled bytes.

    It is the report of the ptxas run inside Triton's compilation, kept next to the kernel in Triton's cache
    by :func:`compile_kernel`; for a kernel compiled elsewhere ptxas runs again, with Triton's options.
    """
    cached = get_cache_manager(compiled.hash).get_file(_USAGE_FILE)
    if cached is not None:
        return json.loads(Path(cached).read_text())
    arch = sm_arch_from_capability(compiled.metadata.target.arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(compiled.asm["ptx"])
        ptxas = get_ptxas(compiled.metadata.target.arch).path
        command = [ptxas, "-lineinfo", "--fmad=false", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                   str(src), "-o", str(src.with_suffix(".o"))]  # fmt: skip
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return _store_usage(compiled, log)


_USAGE_FILE = "qbook_resource_usage.json"


def _store_usage(compiled: triton.compiler.CompiledKernel, log: str) -> dict[str, int]:
    """Parse ptxas's ``-v`` report and keep it in Triton's cache, next to the kernel."""
    usage = {"registers": int(re.search(r"Used (\d+) registers", log).group(1))}
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    usage.update(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, frame.groups()), strict=True))
    get_cache_manager(compiled.hash).put(json.dumps(usage), _USAGE_FILE, binary=False)
    return usage
