"""Benchmark of chapter 10's int8 kernels on a CUDA GPU: one prepared run, under 5 minutes on an H100.

What it does, in order:

1. **Provenance**: GPU name and variant (PCI device id, VBIOS, power limit), driver, clocks and throttle
   reasons (before and after the run), torch, Triton, CUDA and cuBLASLt versions, git commit, and a SHA-256
   of the kernels' source files.
2. **Checks on the GPU** of every kernel (TMA, portable, decode with and without split-K) and every epilogue:
   int32 against ``torch._int_mm`` or an exact product, float32 / float16 / bfloat16 dequantization and int8
   requantization against ``backend="torch"`` (the same float32 operations in the same order: bit-identical).
3. **A copy-bandwidth ceiling**: a device-to-device copy of 1 GiB, read plus written bytes per second.
4. **Timings**, after a warm-up that also runs the autotuner, in interleaved passes (every method once per
   pass, in a rotated order) whose spread is reported:

   The Triton and torch-path methods run with their epilogue built once: what is timed is the kernels,
   not ``int8_matmul``'s argument checks (which read the scales back to the host).

   - GEMM shapes 8192^3, 4096^3 and (M, N, K) = (2048, 4096, 4096): ``triton_int8`` (int32 out),
     ``triton_int8_fp16`` (per-row and per-column scales and a bias fused, float16 out), ``int_mm``
     (``torch._int_mm``, cuBLASLt), ``int_mm_then_dequant`` (``_int_mm`` and the same dequantization as
     separate operations) and ``fp16_matmul`` (cuBLAS). Each call is timed with CUDA events after a 512 MiB
     write that flushes the L2 cache (and keeps the GPU busy while Python launches the call).
   - Decode shapes M in {1, 16}, N = K in {4096, 8192}: ``triton_int8_fp16``, ``triton_int8``,
     ``int_mm_pad32`` (cuBLASLt needs M > 16: A padded to 32 rows) and ``fp16_matmul``. Each method is
     captured in a CUDA graph of calls on rotating copies of the weights (together more than twice the L2
     cache), so that neither launch overhead nor L2 hits flatter the result; time per call = graph time /
     calls.

Results: ``benchmarks/results/int8_matmul_<device>.json`` (provenance, checks, rows with median time, spread,
T op/s, % of the dense peak, GB/s and % of the copy ceiling, the autotuner's choices, and a summary against
chapter 10's targets) and a roofline plot ``int8_matmul_<device>.png``. Run from the repository root::

    python benchmarks/bench_int8_matmul.py

Without a CUDA GPU the script says so and exits with status 0. It exits with status 1 (after writing the
JSON) if a check on the GPU fails.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEMM_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096), (2048, 4096, 4096))  # (M, N, K)
DECODE_SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (1, 8192, 8192), (16, 8192, 8192))
KERNEL_FILES = ("__init__.py", "int8_triton.py", "int8_hopper.py", "int8_decode.py", "layout.py")
SMI_FIELDS = ("name", "pci.device_id", "vbios_version", "driver_version", "power.limit", "power.draw",
              "temperature.gpu", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "clocks_event_reasons.active", "clocks_throttle_reasons.active", "persistence_mode",
              "mig.mode.current")  # fmt: skip
# Dense peaks of GPUs the roofline module does not list; H200 has the H100 SXM's GH100 chip and clocks.
EXTRA_PEAKS = {"H200": {"int8": 1978.9e12, "fp16": 989.4e12, "bandwidth": 4.8e12,
                        "source": "NVIDIA H200 datasheet (dense, no sparsity)"}}  # fmt: skip


# -- provenance -------------------------------------------------------------------------------------------


def run(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def nvidia_smi() -> dict[str, str | None]:
    """One query per field, so that a field this driver does not know costs only that field."""
    values = {}
    for field in SMI_FIELDS:
        out = run(["nvidia-smi", "-i", str(torch.cuda.current_device()), f"--query-gpu={field}",
                   "--format=csv,noheader"])  # fmt: skip
        values[field] = out.splitlines()[0] if out and "Field" not in out else None
    return values


def cublaslt_version() -> int | None:
    """``cublasLtGetVersion()`` of the cuBLASLt library torch loaded (e.g. 120804 for 12.8.4)."""
    torch._int_mm(torch.zeros((32, 32), dtype=torch.int8, device="cuda"),
                  torch.zeros((32, 32), dtype=torch.int8, device="cuda"))  # loads the library  # fmt: skip
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        return int(lib.cublasLtGetVersion())
    return None


def provenance() -> dict:
    import triton

    from qbook.kernels import int8_hopper

    props = torch.cuda.get_device_properties(0)
    digest = hashlib.sha256()
    for name in KERNEL_FILES:
        digest.update((ROOT / "qbook" / "kernels" / name).read_bytes())
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "device": torch.cuda.get_device_name(0),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_cache_bytes": props.L2_cache_size,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "warp_specialized_tma_kernel": int8_hopper.WARP_SPECIALIZE,
        "cublaslt": cublaslt_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "kernel_source_sha256": digest.hexdigest(),
        "nvidia_smi_before": nvidia_smi(),
    }


def device_roofs(name: str, args: argparse.Namespace) -> dict | None:
    """Dense int8/fp16 peaks and DRAM bandwidth: from the command line, else datasheets of known GPUs."""
    from qbook import roofline

    if args.peak_int8_tops and args.peak_fp16_tflops and args.bandwidth_gbs:
        return {"int8": args.peak_int8_tops * 1e12, "fp16": args.peak_fp16_tflops * 1e12,
                "bandwidth": args.bandwidth_gbs * 1e9, "source": "command line"}  # fmt: skip
    for key, roofs in EXTRA_PEAKS.items():
        if key in name:
            return dict(roofs)
    known = {"H100": roofline.H100_SXM, "A100": roofline.A100_SXM_80GB}
    for key, device in known.items():
        if key in name and "PCIe" not in name:
            return {"int8": device.peak_ops("int8"), "fp16": device.peak_ops("fp16"),
                    "bandwidth": device.bandwidth, "source": f"{device.name}: {device.source}"}  # fmt: skip
    return None


# -- operands and methods -----------------------------------------------------------------------------------


def rand_int8(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda", generator=g)


def epilogue_vectors(M: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    a_scale = torch.rand(M, device="cuda", generator=g) * 1e-3 + 1e-4
    b_scale = torch.rand(N, device="cuda", generator=g) * 1e-3 + 1e-4
    return a_scale, b_scale, torch.randn(N, device="cuda", generator=g)


def epilogues(M: int, N: int) -> tuple:
    """The int32 and the float16-dequantizing epilogue, built (and their arguments checked) once, untimed.

    The timed calls go to the kernels' launcher and to the torch path directly: ``int8_matmul``'s argument
    checks read the scales back to the host, which is not what is measured here and would stop CUDA graph
    capture.
    """
    from qbook.kernels import _make_epilogue

    a_scale, b_scale, bias = epilogue_vectors(M, N, seed=2)
    device = torch.device("cuda", torch.cuda.current_device())
    return (_make_epilogue(M, N, device, None, None, None, None, None, 0),
            _make_epilogue(M, N, device, a_scale, b_scale, bias, torch.float16, None, 0))  # fmt: skip


def gemm_methods(M: int, N: int, K: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The contenders on one GEMM shape: A (M, K) row-major and B = W.T for an (N, K) weight W."""
    from qbook.kernels.int8_triton import launch
    from qbook.kernels.torch_backend import int8_matmul_torch

    a, w = rand_int8(M, K, seed=0), rand_int8(N, K, seed=1)
    b = w.T
    as_int32, as_fp16 = epilogues(M, N)
    a16, w16 = a.half(), w.half()
    return {
        "triton_int8": lambda: launch(a, b, as_int32),
        "triton_int8_fp16": lambda: launch(a, b, as_fp16),
        "int_mm": lambda: torch._int_mm(a, b),
        "int_mm_then_dequant": lambda: int8_matmul_torch(a, b, as_fp16),
        "fp16_matmul": lambda: a16 @ w16.T,
    }


def decode_methods(M: int, N: int, K: int, copies: int) -> dict[str, Callable[[int], torch.Tensor]]:
    """The contenders on one decode shape, each a function of the weight copy ``i`` it reads."""
    from qbook.kernels.int8_triton import launch

    a = rand_int8(M, K, seed=0)
    a32 = torch.zeros((32, K), dtype=torch.int8, device="cuda")
    a32[:M] = a
    weights = [rand_int8(N, K, seed=1 + i) for i in range(copies)]
    halves = [w.half() for w in weights]
    a16 = a.half()
    as_int32, as_fp16 = epilogues(M, N)
    return {
        "triton_int8_fp16": lambda i: launch(a, weights[i].T, as_fp16),
        "triton_int8": lambda i: launch(a, weights[i].T, as_int32),
        "int_mm_pad32": lambda i: torch._int_mm(a32, weights[i].T),
        "fp16_matmul": lambda i: a16 @ halves[i].T,
    }


OUT_BYTES = {"triton_int8": 4, "int_mm": 4, "int_mm_pad32": 4, "triton_int8_fp16": 2,
             "int_mm_then_dequant": 2, "fp16_matmul": 2}  # fmt: skip


def compulsory_bytes(method: str, M: int, N: int, K: int) -> int:
    """Operands read once and the output written once (chapter 1's compulsory traffic)."""
    element = 2 if method == "fp16_matmul" else 1
    rows = 32 if method == "int_mm_pad32" else M
    return element * (rows * K + K * N) + OUT_BYTES[method] * rows * N


# -- timing -------------------------------------------------------------------------------------------------


def interleaved(names: list[str], timed: Callable[[str], float], passes: int) -> dict[str, list[float]]:
    """``passes`` rounds; each round times every method once, starting one further along the list."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for p in range(passes):
        for name in names[p % len(names):] + names[: p % len(names)]:
            times[name].append(timed(name))
    return times


def time_eager(fns: dict[str, Callable[[], torch.Tensor]], passes: int, reps: int) -> dict[str, list[float]]:
    """Each pass: the median of ``reps`` calls, each after an L2 flush, timed between CUDA events (ms).

    The flush is queued before the start event, so the GPU is still busy with it while Python launches the
    call: the launch overhead stays out of the time, as in ``triton.testing.do_bench``.
    """
    flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")  # ~0.15 ms: hides the launch overhead
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(name: str) -> float:
        samples = []
        for _ in range(reps):
            flush.zero_()
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    return interleaved(list(fns), timed, passes)


def time_graphs(fns: dict[str, Callable[[int], torch.Tensor]], copies: int, passes: int,
                reps: int) -> dict[str, list[float]]:  # fmt: skip
    """Each method as one CUDA graph of ``copies`` calls (weight copy i in call i); ms per call."""
    stream = torch.cuda.Stream()
    graphs = {}
    with torch.cuda.stream(stream):
        for name, fn in fns.items():
            for i in range(copies):  # warm-up on the capture stream: autotuning, workspaces, cuBLAS handles
                fn(i)
            stream.synchronize()
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name], stream=stream):
                for i in range(copies):
                    fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(name: str) -> float:
        samples = []
        for _ in range(reps):
            start.record()
            graphs[name].replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / copies)
        return statistics.median(samples)

    return interleaved(list(fns), timed, passes)


def copy_bandwidth(passes: int) -> dict:
    """Bytes read plus written per second by a 1 GiB device-to-device copy: the practical memory ceiling."""
    src = torch.empty(2**30, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(passes):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        rates.append(2 * src.numel() / (start.elapsed_time(end) * 1e-3))
    return {"bytes_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "passes": passes}


def summarize_times(times: list[float]) -> dict:
    ordered = sorted(times)
    median = statistics.median(times)
    return {"ms": median, "ms_min": ordered[0], "ms_max": ordered[-1],
            "spread": (ordered[-1] - ordered[0]) / median, "passes": len(times)}  # fmt: skip


# -- checks on the GPU --------------------------------------------------------------------------------------


def check_case(kernel: str, M: int, N: int, K: int, k_major: bool = True) -> list[dict]:
    """Every epilogue of one kernel on one shape against the torch path (and int32 against _int_mm)."""
    from qbook.kernels import int8_matmul, int8_triton
    from qbook.kernels.torch_backend import exact_int8_matmul

    a, w = rand_int8(M, K, seed=M + 7), rand_int8(N, K, seed=N + 8)
    b = w.T if k_major else w.T.contiguous()
    c = torch.empty((M, N), dtype=torch.int32, device="cuda")
    chosen = int8_triton.choose_kernel(a, b, c, 10 * torch.cuda.get_device_capability()[0]
                                       + torch.cuda.get_device_capability()[1])  # fmt: skip
    a_scale, b_scale, bias = epilogue_vectors(M, N, seed=3)
    reference = torch._int_mm(a, b) if M > 16 and N % 8 == 0 and K % 8 == 0 else exact_int8_matmul(a, b)
    results = []
    cases = [("int32", {}), ("dequantize_fp32", {"out_dtype": torch.float32}),
             ("dequantize_fp16", {"out_dtype": torch.float16}),
             ("dequantize_bf16", {"out_dtype": torch.bfloat16}),
             ("requantize", {"out_scale": 0.05, "out_zero_point": -3})]  # fmt: skip
    for epilogue, kwargs in cases:
        args = () if epilogue == "int32" else (a_scale, b_scale, bias)
        out = int8_matmul(a, b, *args, backend="triton", **kwargs)
        expected = reference if epilogue == "int32" else int8_matmul(a, b, *args, backend="torch", **kwargs)
        again = int8_matmul(a, b, *args, backend="triton", **kwargs)  # split-K: the same in any order
        equal = bool(torch.equal(out, expected)) and bool(torch.equal(out, again))
        worst = (out.double() - expected.double()).abs().max().item()
        results.append({"kernel": chosen, "expected_kernel": kernel, "M": M, "N": N, "K": K,
                        "k_major": k_major, "epilogue": epilogue, "equal": equal,
                        "max_abs_diff": worst})  # fmt: skip
    return results


def checks() -> list[dict]:
    hopper = torch.cuda.get_device_capability()[0] >= 9
    cases = [
        ("tma" if hopper else "portable", 300, 512, 768, True),
        ("portable", 300, 520, 776, False),  # B row-major
        ("portable", 129, 77, 1001, True),  # unaligned K
        ("decode", 1, 4096, 4096, True),  # split-K
        ("decode", 16, 4096, 4096, False),
        ("decode", 5, 50000, 64, True),  # one K step per program, many tiles
    ]
    results = []
    for case in cases:
        results += check_case(*case)
    return results


# -- the run ------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, roofs: dict | None, ceiling: float) -> list[dict]:
    from qbook.roofline import matmul_flops

    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for M, N, K in GEMM_SHAPES + DECODE_SHAPES:
        decode = M <= 16
        if decode:
            copies = max(2, -(-3 * l2 // (N * K)))
            fns = decode_methods(M, N, K, copies)
            times = time_graphs(fns, copies, args.passes, args.reps)
        else:
            fns = gemm_methods(M, N, K)
            for fn in fns.values():  # warm-up, autotuning included
                fn()
            torch.cuda.synchronize()
            if not torch.equal(fns["triton_int8"](), fns["int_mm"]()):
                raise AssertionError(f"triton_int8 differs from torch._int_mm at (M, N, K) = {(M, N, K)}")
            times = time_eager(fns, args.passes, args.reps)
        for name, samples in times.items():
            row = {"kind": "decode" if decode else "gemm", "M": M, "N": N, "K": K, "method": name,
                   **summarize_times(samples)}  # fmt: skip
            seconds = row["ms"] * 1e-3
            row["tops"] = matmul_flops(M, N, K) / seconds / 1e12
            row["gbs"] = compulsory_bytes(name, M, N, K) / seconds / 1e9
            row["fraction_of_copy_bandwidth"] = row["gbs"] * 1e9 / ceiling
            if roofs:
                peak = roofs["fp16" if name == "fp16_matmul" else "int8"]
                row["fraction_of_dense_peak"] = row["tops"] * 1e12 / peak
            rows.append(row)
            print(f"M={M:5} N={N:5} K={K:5} {name:20} {row['ms']:9.4f} ms (spread {row['spread']:6.1%}) "
                  f"{row['tops']:8.1f} T op/s {row['gbs']:7.0f} GB/s", flush=True)  # fmt: skip
        del fns
        torch.cuda.empty_cache()
    return rows


def autotuner_choices() -> dict[str, dict[str, str]]:
    from qbook.kernels import int8_decode, int8_hopper, int8_triton

    major, minor = torch.cuda.get_device_capability()
    decode = int8_decode._autotuned if major >= 9 else int8_decode._autotuned_ampere
    tuners = {"tma": int8_hopper._autotuned, "decode": decode,
              "portable": int8_triton._autotuned(10 * major + minor)}  # fmt: skip
    return {name: {str(key): str(config) for key, config in getattr(t, "cache", {}).items()}
            for name, t in tuners.items()}  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """The ratios and fractions chapter 10 states targets for (H100): measured values and whether met."""
    t = {(r["M"], r["N"], r["K"], r["method"]): r for r in rows}

    def ratio(shape: tuple, slow: str, fast: str) -> float:
        return t[(*shape, slow)]["ms"] / t[(*shape, fast)]["ms"]

    summary = {
        "speedup_over_int_mm_8192": ratio((8192,) * 3, "int_mm", "triton_int8"),
        "speedup_over_fp16_8192": ratio((8192,) * 3, "fp16_matmul", "triton_int8"),
        "speedup_over_int_mm_4096": ratio((4096,) * 3, "int_mm", "triton_int8"),
        "fused_dequant_speedup_2048x4096x4096": ratio((2048, 4096, 4096), "int_mm_then_dequant",
                                                      "triton_int8_fp16"),
        "decode_fraction_of_copy_bandwidth": {
            f"{M}x{N}x{K}": t[(M, N, K, "triton_int8_fp16")]["fraction_of_copy_bandwidth"]
            for M, N, K in DECODE_SHAPES
        },
        "decode_speedup_over_int_mm_pad32": {
            f"{M}x{N}x{K}": ratio((M, N, K), "int_mm_pad32", "triton_int8_fp16") for M, N, K in DECODE_SHAPES
        },
    }
    summary["targets_met"] = {
        "int_mm_ratio_ge_0.9": summary["speedup_over_int_mm_8192"] >= 0.9,
        "fp16_ratio_ge_1.6": summary["speedup_over_fp16_8192"] >= 1.6,
        "fused_dequant_ge_1.15": summary["fused_dequant_speedup_2048x4096x4096"] >= 1.15,
        "decode_ge_0.8_of_copy": min(summary["decode_fraction_of_copy_bandwidth"].values()) >= 0.8,
    }
    return summary


def plot(rows: list[dict], roofs: dict, ceiling: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from qbook import plot as qplot
    from qbook.roofline import matmul_flops

    fig, ax = qplot.figure(width=7.5, height=4.5)
    x = np.logspace(-0.5, 4, 200)
    for dtype, style in (("int8", "-"), ("fp16", "--")):
        ax.loglog(x, np.minimum(roofs[dtype], x * ceiling) / 1e12, style, color="0.5", lw=1)
        ax.annotate(f"{dtype} peak", (x[-1], roofs[dtype] / 1e12), ha="right", va="bottom", fontsize=8)
    markers = {"triton_int8": "o", "triton_int8_fp16": "s", "int_mm": "^", "int_mm_pad32": "^",
               "int_mm_then_dequant": "v", "fp16_matmul": "x"}  # fmt: skip
    for name, marker in markers.items():
        shapes = [(r["M"], r["N"], r["K"], r["tops"]) for r in rows if r["method"] == name]
        pts = [(matmul_flops(M, N, K) / compulsory_bytes(name, M, N, K), tops) for M, N, K, tops in shapes]
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker, label=name, ms=5, alpha=0.8)
    qplot.finish(fig, ax, xlabel="arithmetic intensity (ops per byte of compulsory traffic)",
                 ylabel="T op/s (measured copy bandwidth as the slope)", title=title)  # fmt: skip
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--passes", type=int, default=7, help="interleaved passes over the methods")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per method and pass")
    parser.add_argument("--peak-int8-tops", type=float, help="dense int8 peak of this GPU, 10^12 ops/s")
    parser.add_argument("--peak-fp16-tflops", type=float, help="dense fp16 peak of this GPU, 10^12 ops/s")
    parser.add_argument("--bandwidth-gbs", type=float, help="DRAM bandwidth of this GPU, 10^9 bytes/s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU is available: the int8 GEMM benchmark needs one. Nothing was measured.")
        return 0
    started = time.perf_counter()
    info = provenance()
    roofs = device_roofs(info["device"], args)
    check_results = checks()
    failed = [c for c in check_results if not c["equal"]]
    print(f"GPU checks: {len(check_results) - len(failed)} of {len(check_results)} equal", flush=True)
    ceiling = copy_bandwidth(args.passes)
    print(f"copy bandwidth: {ceiling['bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
    rows = measure(args, roofs, ceiling["bytes_per_s"])
    info["nvidia_smi_after"] = nvidia_smi()
    info["seconds"] = round(time.perf_counter() - started, 1)
    slug = re.sub(r"[^a-z0-9]+", "_", info["device"].lower()).strip("_")
    result = {
        "benchmark": "int8_matmul",
        "provenance": info,
        "roofs": roofs,
        "copy_bandwidth": ceiling,
        "timing": {"passes": args.passes, "reps": args.reps, "gemm": "CUDA events around one call after a "
                   "512 MiB L2 flush; median of reps per pass", "decode": "CUDA graph of calls on rotating "
                   "weight copies (> 2x L2); graph time / calls; median of reps per pass"},  # fmt: skip
        "checks": check_results,
        "results": rows,
        "autotuner": autotuner_choices(),
        "summary": summarize(rows),
    }
    from qbook.bench import write_record

    json_path = write_record(result, args.out_dir / f"int8_matmul_{slug}.json")
    print(f"wrote {json_path} after {info['seconds']} s")
    if roofs:
        png_path = json_path.with_suffix(".png")
        plot(rows, roofs, ceiling["bytes_per_s"], f"int8 GEMM on {info['device']}", png_path)
        print(f"wrote {png_path}")
    print(json.dumps(result["summary"], indent=1))
    if failed:
        print(f"{len(failed)} GPU checks FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
