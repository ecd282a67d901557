"""Benchmark of the chapter 10 int8 GEMM on a CUDA GPU: throughput, time, and the roofline.

Methods, each on the same operands (``A`` (M, K) row-major, the weight ``W`` (N, K) row-major as in
``nn.Linear``, used as ``B = W.T``):

- ``triton_int8``: :func:`qbook.kernels.int8_matmul`, ``backend="triton"``, int32 out;
- ``triton_int8_dequant``: the same kernel with per-row and per-column scales and a bias fused into its
  epilogue, float16 out;
- ``int_mm``: ``torch._int_mm`` (cuBLASLt), int32 out (needs M > 16);
- ``int_mm_then_dequant``: ``int8_matmul(..., backend="torch")``, i.e. ``torch._int_mm`` followed by the
  same dequantization as separate operations, float16 out;
- ``fp16_matmul``, ``bf16_matmul``: ``A @ W.T`` in half precision (cuBLAS).

Shapes: squares 1024 to 8192, and transformer layers: M (tokens) in {1, 16, 128, 2048, 8192} with
(N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)}. Times are medians of ``triton.testing.do_bench``
(CUDA events, L2 flushed between runs; the flush, a large memset, also keeps the GPU busy while Python
launches the next call, so launch overhead stays out of the times). Results go to
``benchmarks/results/int8_matmul_<device>.json`` with provenance (device, driver, CUDA, torch, Triton,
date, git commit), plus a roofline plot (PNG).

Run from the repository root::

    python benchmarks/bench_int8_matmul.py            # everything (about 10 minutes with autotuning)
    python benchmarks/bench_int8_matmul.py --quick    # a few shapes

Without a CUDA GPU the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SQUARE = (1024, 2048, 4096, 8192)
TOKENS = (1, 16, 128, 2048, 8192)
LAYERS = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K)
QUICK_SQUARE = (4096,)
QUICK_TOKENS = (1, 2048)
QUICK_LAYERS = ((4096, 4096),)


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    """(kind, M, N, K) for every measurement."""
    square = QUICK_SQUARE if quick else SQUARE
    tokens, layers = (QUICK_TOKENS, QUICK_LAYERS) if quick else (TOKENS, LAYERS)
    return [("square", n, n, n) for n in square] + [("layer", m, n, k) for n, k in layers for m in tokens]


def run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "device": torch.cuda.get_device_name(0),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "timer": "triton.testing.do_bench, median, L2 flushed between runs",
    }


def device_roofs(name: str, args: argparse.Namespace) -> dict | None:
    """Peak int8/fp16 ops/s and bandwidth: from the command line, else qbook.roofline's datasheet devices."""
    from qbook import roofline

    if args.peak_int8_tops and args.peak_fp16_tflops and args.bandwidth_gbs:
        return {"int8": args.peak_int8_tops * 1e12, "fp16": args.peak_fp16_tflops * 1e12,
                "bandwidth": args.bandwidth_gbs * 1e9, "source": "command line"}  # fmt: skip
    known = {"H100": roofline.H100_SXM, "A100": roofline.A100_SXM_80GB}
    for key, device in known.items():
        if key in name:
            return {"int8": device.peak_ops("int8"), "fp16": device.peak_ops("fp16"),
                    "bandwidth": device.bandwidth, "source": f"{device.name}: {device.source}"}  # fmt: skip
    return None


def operands(M: int, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 ``A`` (M, K) and ``B = W.T`` (K, N) for a weight ``W`` (N, K), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda", generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda", generator=g)
    return a, w.T  # (M, K) row-major, (K, N) column-major


def methods(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor] | None]:
    """The contenders for one shape, as zero-argument callables (None where a method refuses the shape)."""
    from qbook.kernels import int8_matmul
    from qbook.kernels.torch_backend import int_mm_allowed

    (M, K), N = a.shape, b.shape[1]
    w = b.T
    g = torch.Generator(device="cuda").manual_seed(1)
    a_scale = torch.rand(M, device="cuda", generator=g) * 1e-3
    b_scale = torch.rand(N, device="cuda", generator=g) * 1e-3
    bias = torch.randn(N, device="cuda", generator=g)
    a16, w16 = a.half(), w.half()
    abf, wbf = a.bfloat16(), w.bfloat16()
    int_mm = int_mm_allowed(M, N, K, a.device)

    return {
        "triton_int8": lambda: int8_matmul(a, b, backend="triton"),
        "triton_int8_dequant": lambda: int8_matmul(a, b, a_scale, b_scale, bias, torch.float16, "triton"),
        "int_mm": (lambda: torch._int_mm(a, b)) if int_mm else None,
        "int_mm_then_dequant": (
            (lambda: int8_matmul(a, b, a_scale, b_scale, bias, torch.float16, "torch")) if int_mm else None
        ),
        "fp16_matmul": lambda: a16 @ w16.T,
        "bf16_matmul": lambda: abf @ wbf.T,
    }


OUT_BITS = {"triton_int8": 32, "int_mm": 32, "triton_int8_dequant": 16, "int_mm_then_dequant": 16,
            "fp16_matmul": 16, "bf16_matmul": 16}  # fmt: skip
IN_BITS = {"fp16_matmul": 16, "bf16_matmul": 16}


def check(a: torch.Tensor, b: torch.Tensor, fns: dict) -> None:
    """The kernel must equal an exact product (float64 on the GPU) before it is timed."""
    from qbook.kernels.torch_backend import exact_int8_matmul

    if not torch.equal(fns["triton_int8"](), exact_int8_matmul(a, b)):
        shape = (a.shape[0], b.shape[1], a.shape[1])
        raise AssertionError(f"triton_int8 differs from the exact product at (M, N, K) = {shape}")


def best_config(M: int, N: int, K: int, epilogue: str) -> str | None:
    """The configuration the autotuner picked for this shape and epilogue, if it kept one."""
    from qbook.kernels import int8_triton

    major, minor = torch.cuda.get_device_capability()
    tuner = int8_triton._autotuned(10 * major + minor)
    for key, config in getattr(tuner, "cache", {}).items():
        if tuple(key[:4]) == (M, N, K, epilogue):
            return str(config)
    return None


def measure(quick: bool) -> list[dict]:
    from triton.testing import do_bench

    from qbook.roofline import matmul_bytes, matmul_flops

    rows = []
    for kind, M, N, K in shapes(quick):
        a, b = operands(M, N, K)
        fns = methods(a, b)
        check(a, b, fns)
        for name, fn in fns.items():
            row = {"kind": kind, "M": M, "N": N, "K": K, "method": name}
            if fn is None:
                rows.append({**row, "ms": None, "note": "torch._int_mm needs M > 16"})
                continue
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            in_bits = IN_BITS.get(name, 8)
            n_bytes = matmul_bytes(M, N, K, in_bits, in_bits, OUT_BITS[name])
            flops = matmul_flops(M, N, K)
            row.update(ms=ms, tops=flops / (ms * 1e-3) / 1e12, gbs=n_bytes / (ms * 1e-3) / 1e9,
                       intensity=flops / n_bytes)  # fmt: skip
            if name.startswith("triton"):
                row["config"] = best_config(M, N, K, "dequantize" if "dequant" in name else "int32")
            rows.append(row)
            print(f"{kind:6} M={M:5} N={N:5} K={K:5} {name:20} {ms:8.4f} ms {row['tops']:7.1f} TOPS "
                  f"{row['gbs']:7.0f} GB/s", flush=True)  # fmt: skip
        del fns, a, b
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict], roofs: dict | None) -> dict:
    """The ratios chapter 10 discusses, from the measured rows."""
    t = {(r["M"], r["N"], r["K"], r["method"]): r["ms"] for r in rows if r["ms"] is not None}

    def ratio(shape: tuple, slow: str, fast: str) -> float | None:
        return t[(*shape, slow)] / t[(*shape, fast)] if (*shape, slow) in t and (*shape, fast) in t else None

    summary: dict = {"speedup_over_int_mm": {}, "speedup_over_fp16": {}}
    for n in SQUARE:
        summary["speedup_over_int_mm"][str(n)] = ratio((n, n, n), "int_mm", "triton_int8")
        summary["speedup_over_fp16"][str(n)] = ratio((n, n, n), "fp16_matmul", "triton_int8")
    summary["fused_dequant_speedup_2048x4096x4096"] = ratio(
        (2048, 4096, 4096), "int_mm_then_dequant", "triton_int8_dequant"
    )
    if roofs:
        summary["decode_fraction_of_bandwidth"] = {
            f"{r['M']}x{r['N']}x{r['K']}": r["gbs"] * 1e9 / roofs["bandwidth"]
            for r in rows
            if r["method"] == "triton_int8_dequant" and r["M"] <= 16 and r["ms"] is not None
        }
    return summary


def plot(rows: list[dict], roofs: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from qbook import plot as qplot

    fig, ax = qplot.figure(width=7.5, height=4.5)
    x = np.logspace(-0.5, 4, 200)
    for dtype, style in (("int8", "-"), ("fp16", "--")):
        ax.loglog(x, np.minimum(roofs[dtype], x * roofs["bandwidth"]) / 1e12, style, color="0.5", lw=1)
        ax.annotate(f"{dtype} peak", (x[-1], roofs[dtype] / 1e12), ha="right", va="bottom", fontsize=8)
    markers = {"triton_int8": "o", "triton_int8_dequant": "s", "int_mm": "^", "int_mm_then_dequant": "v",
               "fp16_matmul": "x", "bf16_matmul": "+"}  # fmt: skip
    for name, marker in markers.items():
        pts = [(r["intensity"], r["tops"]) for r in rows if r["method"] == name and r["ms"] is not None]
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker, label=name, ms=5, alpha=0.8)
    qplot.finish(fig, ax, xlabel="arithmetic intensity (ops per byte of compulsory traffic)",
                 ylabel="TOPS (10^12 ops/s)", title=title)  # fmt: skip
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--peak-int8-tops", type=float, help="dense int8 peak of this GPU, 10^12 ops/s")
    parser.add_argument("--peak-fp16-tflops", type=float, help="dense fp16 peak of this GPU, 10^12 ops/s")
    parser.add_argument("--bandwidth-gbs", type=float, help="DRAM bandwidth of this GPU, 10^9 bytes/s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU is available: the int8 GEMM benchmark needs one. Nothing was measured.")
        return 0
    info = provenance()
    roofs = device_roofs(info["device"], args)
    rows = measure(args.quick)
    slug = re.sub(r"[^a-z0-9]+", "_", info["device"].lower()).strip("_")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "int8_matmul",
        "quick": args.quick,
        "provenance": info,
        "roofs": roofs,
        "results": rows,
        "summary": summarize(rows, roofs),
    }
    json_path = args.out_dir / f"int8_matmul_{slug}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_path}")
    if roofs:
        png_path = json_path.with_suffix(".png")
        plot(rows, roofs, f"int8 GEMM on {info['device']}", png_path)
        print(f"wrote {png_path}")
    else:
        print("unknown peaks: pass --peak-int8-tops, --peak-fp16-tflops and --bandwidth-gbs for the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
