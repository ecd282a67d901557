"""qbook's CPU primitives against their peers (issue 9): speed ratios in one process, and transient memory.

    python benchmarks/bench_cpu.py                 # every row, 1 and 2 threads, ~5 minutes on 2 cores
    python benchmarks/bench_cpu.py --groups affine formats --rounds 5

For each thread count it times every row of ``qbook.bench.cpu_rows`` (qbook and its peer interleaved, round
after round, after a warm-up), prints min/median/max of the speed ratio peer time / qbook time (above 1:
qbook is faster) and writes everything, with the provenance of the machine, to
``benchmarks/results/cpu_<date>.json``.

It also measures the transient memory of quantizing one 4096 x 4096 weight per group of 128 (qbook.quantize
with PerGroup) against the plain torch composition, each in a fresh subprocess (peak resident memory minus
the resident memory before the call; Linux's /proc/self/clear_refs resets the peak first)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qbook import bench

RESULTS = Path(__file__).resolve().parent / "results"

_MEMORY_PROBE = r"""
import sys, torch
torch.set_num_threads(1)
import qbook
from qbook.granularity import PerGroup
w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
# (4096, 32) scales, made without a full-size temporary that would raise the baseline peak
scale = torch.rand(4096, 32, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.01
zero = torch.zeros_like(scale, dtype=torch.int32)
def composition():
    s = scale.repeat_interleave(128, dim=1)
    return torch.clamp(torch.round(w / s), -128, 127).to(torch.int8)
def ours():
    return qbook.quantize(w, scale, zero, -128, 127, granularity=PerGroup(1, 128))
fn = {"composition": composition, "qbook": ours}[sys.argv[1]]
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # kB
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
out = fn()
print((status("VmHWM") - before) / 1024)
"""


def transient_memory_mib(which: str) -> float:
    """Peak resident memory (MiB) added by one per-group quantization of a 4096 x 4096 weight."""
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, which], capture_output=True, text=True, check=True
    )
    return float(run.stdout.strip().splitlines()[-1])


def memory_row(repeats: int = 3) -> dict[str, object]:
    composition = [transient_memory_mib("composition") for _ in range(repeats)]
    ours = [transient_memory_mib("qbook") for _ in range(repeats)]
    ratio = statistics.median(ours) / statistics.median(composition)
    return {
        "name": "per-group quantize 4096x4096 g128, transient memory",
        "qbook_MiB": ours,
        "composition_MiB": composition,
        "ratio_qbook_over_composition": ratio,
        "target": 1.5,
        "met": ratio <= 1.5,
    }


def _print(summary: list[dict[str, object]], threads: int) -> None:
    print(f"\n== {threads} thread(s): speed ratio = peer time / qbook time (min / median / max) ==")
    for s in summary:
        target = "" if s["target"] is None else f"  target {s['target']:.1f} {'ok' if s['met'] else 'MISSED'}"
        tput = f"  {s['qbook_MB_per_s']:.0f} MB/s" if "qbook_MB_per_s" in s else ""
        print(
            f"{s['name']:<44} vs {s['peer']:<46} {s['ratio_min']:6.2f} {s['ratio_median']:6.2f} "
            f"{s['ratio_max']:6.2f}{target}{tput}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument(
        "--groups",
        nargs="+",
        default=None,
        help="affine formats int_matmul int_matmul_zp int8_matmul int8_matmul_dequant packing observers",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    record: dict[str, object] = {"provenance": bench.provenance(), "runs": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        results = bench.compare(bench.cpu_rows(groups=args.groups), rounds=args.rounds)
        summary = [r.summary() for r in results]
        _print(summary, threads)
        record["runs"][str(threads)] = summary
    if not args.no_memory:
        record["memory"] = memory_row()
        m = record["memory"]
        print(
            f"\nper-group quantize memory: qbook {statistics.median(m['qbook_MiB']):.0f} MiB, composition "
            f"{statistics.median(m['composition_MiB']):.0f} MiB, "
            f"ratio {m['ratio_qbook_over_composition']:.2f}"
        )
    out = args.out or RESULTS / f"cpu_{time.strftime('%Y-%m-%d')}.json"
    bench.write_record(record, out)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
