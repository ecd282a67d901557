"""Chapter 10's decode kernel with its split of K forced: does split-K explain why M = 16 is slower?

Chapter 10 §10.8 found the decode kernel about 3 µs slower at M = 16 than at M = 1 while cuBLASLt was not,
and offered a hypothesis: with ``SPLIT_K`` programs per column tile, every program adds an int32 partial tile
into a workspace with atomics, ``M · N · 4`` bytes per slice, 16 times more at M = 16. This script times the
kernel (float16 epilogue, as ``triton_int8_fp16`` in ``bench_int8_matmul.py``) on the same decode shapes with
the split chosen by :func:`qbook.kernels.int8_decode.split_k` and forced to 1, 2, 4 and 8, each variant
captured in a CUDA graph over rotating weight copies and timed in interleaved passes (the harness of
``bench_int8_matmul.py``). Each forced split is first checked against the exact int32 product. On a GPU::

    python benchmarks/bench_decode_split.py [--out-dir DIR]

Writes ``decode_split_<device>.json``. Without a CUDA GPU it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (1, 8192, 8192), (16, 8192, 8192))  # (M, N, K)
SPLITS = (None, 1, 2, 4, 8)  # None: the kernel's own choice


def measure_shape(
    M: int, N: int, K: int, l2: int, args: argparse.Namespace, rows: list, checks: list
) -> None:
    """Every split variant on one shape: checked against the exact product, then timed in CUDA graphs."""
    import bench_int8_matmul as bench

    from qbook.kernels import int8_decode
    from qbook.kernels.int8_triton import launch
    from qbook.kernels.torch_backend import exact_int8_matmul

    policy = int8_decode.split_k
    copies = max(2, -(-3 * l2 // (N * K)))
    a = bench.rand_int8(M, K, seed=0)
    weights = [bench.rand_int8(N, K, seed=1 + i) for i in range(copies)]
    as_int32, as_fp16 = bench.epilogues(M, N)
    chosen: dict = {}

    def forced(split: int | None) -> callable:
        def rule(tiles: int, k_steps: int, num_sms: int) -> int:
            s = policy(tiles, k_steps, num_sms) if split is None else split
            chosen[split] = (tiles, k_steps, s)
            return s

        return rule

    def variant(split: int | None) -> callable:
        def fn(i: int) -> torch.Tensor:
            int8_decode.split_k = forced(split)
            return launch(a, weights[i].T, as_fp16)

        return fn

    fns = {}
    try:
        for split in SPLITS:
            int8_decode.split_k = forced(split)
            ok = torch.equal(launch(a, weights[0].T, as_int32), exact_int8_matmul(a, weights[0].T))
            checks.append({"M": M, "N": N, "K": K, "split": split, "equal": bool(ok)})
            fns["default" if split is None else f"split_{split}"] = variant(split)
        times = bench.time_graphs(fns, copies, args.passes, args.reps)
    finally:
        int8_decode.split_k = policy
    for name, samples in times.items():
        split = None if name == "default" else int(name.split("_")[1])
        tiles, k_steps, s = chosen[split]
        workspace = 4 * M * N * s if s > 1 else 0  # bytes of int32 partial tiles per slice
        row = {"M": M, "N": N, "K": K, "variant": name, "split": s, "tiles": tiles, "k_steps": k_steps,
               "workspace_bytes": workspace, **bench.summarize_times(samples)}  # fmt: skip
        rows.append(row)
        print(f"M={M:3} N={N:5} K={K:5} {name:8} split={s:2} tiles={tiles:4} "
              f"{row['ms'] * 1e3:8.2f} us (spread {row['spread']:6.1%})", flush=True)  # fmt: skip
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU is available: nothing was measured.")
        return 0
    import bench_int8_matmul as bench
    import triton

    from qbook.bench import write_record

    info = bench.provenance()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows, checks = [], []
    for M, N, K in SHAPES:
        measure_shape(M, N, K, l2, args, rows, checks)
    info["triton"] = triton.__version__
    info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    slug = re.sub(r"[^a-z0-9]+", "_", info["device"].lower()).strip("_")
    timing = ("CUDA graph of calls on rotating weight copies (> 2x L2); graph time / calls; median of reps "
              "per pass; passes interleaved over the variants")
    result = {"benchmark": "decode_split", "provenance": info, "checks": checks, "results": rows,
              "timing": timing}  # fmt: skip
    path = write_record(result, args.out_dir / f"decode_split_{slug}.json")
    print(f"wrote {path}")
    failed = [c for c in checks if not c["equal"]]
    if failed:
        print(f"{len(failed)} checks FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
