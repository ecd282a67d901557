"""Speed of qbook's primitives against the peer a user would otherwise call (appendix "qbook's speed").

Each :class:`Row` pairs a qbook call with its peer on the same inputs. :func:`compare` times both in one
process, interleaved (qbook, peer, qbook, peer, ... so that the machine's noise hits both alike), after a
warm-up, and reports the speed ratio ``peer time / qbook time`` of every round: above 1 qbook is faster. The
rows are built by :func:`cpu_rows`; ``benchmarks/bench_cpu.py`` runs them all and writes the results with
their provenance.

This measures, it does not test: timings depend on the machine and on what else runs on it. Nothing here is
called by the unit tests with a threshold.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Row", "Result", "compare", "cpu_rows", "provenance", "geomean", "write_record"]


@dataclass(frozen=True)
class Row:
    """One comparison: ``qbook()`` against ``peer()``, which compute the same thing on the same inputs.

    ``target`` is the speed ratio (peer time / qbook time) the row must reach, or None to report only.
    ``work`` is the number of bytes of input each call processes, for a throughput figure (0: none).
    """

    name: str
    peer_name: str
    qbook: Callable[[], object]
    peer: Callable[[], object]
    target: float | None = None
    work: int = 0
    group: str = ""


@dataclass
class Result:
    """Times (seconds per call) of both sides in every round, and the round-by-round speed ratios."""

    row: Row
    qbook_s: list[float] = field(default_factory=list)
    peer_s: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [p / q for q, p in zip(self.qbook_s, self.peer_s, strict=True)]

    def summary(self) -> dict[str, object]:
        r = self.ratios
        out: dict[str, object] = {
            "name": self.row.name,
            "group": self.row.group,
            "peer": self.row.peer_name,
            "target": self.row.target,
            "ratio_min": min(r),
            "ratio_median": statistics.median(r),
            "ratio_max": max(r),
            "qbook_us_median": 1e6 * statistics.median(self.qbook_s),
            "peer_us_median": 1e6 * statistics.median(self.peer_s),
            "rounds": len(r),
        }
        if self.row.target is not None:
            out["met"] = statistics.median(r) >= self.row.target
        if self.row.work:
            out["qbook_MB_per_s"] = self.row.work / statistics.median(self.qbook_s) / 1e6
        return out


Clock = Callable[[], float]


def _per_call(fn: Callable[[], object], reps: int, clock: Clock = time.perf_counter) -> float:
    start = clock()
    for _ in range(reps):
        fn()
    return (clock() - start) / reps


def _reps(fn: Callable[[], object], budget_s: float, clock: Clock = time.perf_counter) -> int:
    """How many calls fill about ``budget_s`` seconds (at least 1)."""
    once = _per_call(fn, 1, clock)
    return max(1, min(10_000, int(budget_s / max(once, 1e-7))))


def compare(
    rows: Iterable[Row],
    rounds: int = 11,
    budget_s: float = 0.02,
    warmup: int = 2,
    clock: Clock = time.perf_counter,
) -> list[Result]:
    """Time every row's qbook and peer calls, interleaved round by round; see the module docstring.

    ``clock`` is wall time by default; ``time.thread_time`` (the calling thread's CPU time) is steadier on a
    busy machine but only meaningful with one torch thread.
    """
    rows = list(rows)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for row in rows:
        for _ in range(warmup):
            row.qbook()
            row.peer()
    reps = [(_reps(r.qbook, budget_s, clock), _reps(r.peer, budget_s, clock)) for r in rows]
    results = [Result(r) for r in rows]
    for _ in range(rounds):
        for result, (nq, np_) in zip(results, reps, strict=True):
            result.qbook_s.append(_per_call(result.row.qbook, nq, clock))
            result.peer_s.append(_per_call(result.row.peer, np_, clock))
    return results


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _cpu() -> dict[str, object]:
    info: dict[str, object] = {"machine": platform.machine(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(
                    f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c"))
                )
                break
        info["logical_cpus"] = text.count("processor\t:")
    except OSError:
        pass
    return info


def provenance() -> dict[str, object]:
    """What produced a measurement: CPU, library versions, torch's kernels and threads, the time."""
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("ml_dtypes", "torchao"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu": _cpu(),
        "versions": versions,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write a benchmark's record (provenance and results) to ``path`` as indented JSON, creating the folder;
    return the path. Every script in ``benchmarks/`` writes its results this way.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = write_record({"ratio": 1.5}, Path(d) / "results" / "x.json")
    ...     json.loads(path.read_text())
    {'ratio': 1.5}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def _quiet(fn: Callable[..., object], *args: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# --- The rows -----------------------------------------------------------------------------------------------


def _affine_rows(n: int, torchao: bool = True) -> list[Row]:
    import qbook
    from qbook.granularity import PerChannel, minmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    s, z = 0.02, 3
    q = qbook.quantize(x, s, z, -128, 127)
    with warnings.catch_warnings():  # torch deprecates its quantized tensors; they remain the fused peer
        warnings.simplefilter("ignore")
        qt = torch.quantize_per_tensor(x, s, z, torch.qint8)
    rows = [
        Row(
            "quantize",
            "torch composition",
            lambda: qbook.quantize(x, s, z, -128, 127),
            lambda: torch.clamp(torch.round(x / s) + z, -128, 127).to(torch.int8),
            1.0,
            4 * n,
            "affine",
        ),
        Row(
            "quantize",
            "torch.quantize_per_tensor (fused C++)",
            lambda: qbook.quantize(x, s, z, -128, 127),
            lambda: _quiet(torch.quantize_per_tensor, x, s, z, torch.qint8),
            None,
            4 * n,
            "affine",
        ),
        Row(
            "dequantize",
            "torch composition",
            lambda: qbook.dequantize(q, s, z),
            lambda: (q.to(torch.float32) - z) * s,
            1.0,
            n,
            "affine",
        ),
        Row(
            "dequantize",
            "QTensor.dequantize (fused C++)",
            lambda: qbook.dequantize(q, s, z),
            qt.dequantize,
            None,
            n,
            "affine",
        ),
    ]
    xg = x.clone().requires_grad_(True)

    def fq_qbook() -> None:
        qbook.fake_quantize(xg, s, z, -128, 127).sum().backward()

    def fq_composition() -> None:
        y = torch.clamp(torch.round(xg / s) + z, -128, 127)
        inside = (y > -128) & (y < 127)
        ((xg + ((y - z) * s - xg).detach()) * inside).sum().backward()

    def fq_fused() -> None:
        torch.fake_quantize_per_tensor_affine(xg, s, z, -128, 127).sum().backward()

    rows += [
        Row(
            "fake_quantize fwd+bwd",
            "torch composition (clipped STE)",
            fq_qbook,
            fq_composition,
            1.0,
            4 * n,
            "affine",
        ),
        Row(
            "fake_quantize fwd+bwd",
            "torch.fake_quantize_per_tensor_affine (fused C++)",
            fq_qbook,
            fq_fused,
            None,
            4 * n,
            "affine",
        ),
    ]
    w = torch.randn(4096, 1024, generator=g)
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)

    def qparams_composition() -> object:
        lo0, hi0 = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
        scale = torch.clamp((hi0 - lo0) / 255, min=torch.finfo(torch.float32).eps)
        return scale, torch.clamp(-128 - torch.round(lo0 / scale), -128, 127).to(torch.int32)

    rows.append(
        Row(
            "calc_qparams (4096 channels)",
            "torch composition",
            lambda: qbook.calc_qparams(lo, hi, -128, 127),
            qparams_composition,
            1.0,
            0,
            "affine",
        )
    )
    if not torchao:
        return rows
    try:
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            dequantize_affine,
            quantize_affine,
        )
    except ImportError:
        return rows
    st, zt = torch.tensor([s]), torch.tensor([z], dtype=torch.int32)
    block = (n,)
    rows += [
        Row(
            "quantize",
            "torchao quantize_affine",
            lambda: qbook.quantize(x, s, z, -128, 127),
            lambda: quantize_affine(x, block, st, zt, torch.int8, -128, 127),
            1.0,
            4 * n,
            "affine",
        ),
        Row(
            "dequantize",
            "torchao dequantize_affine",
            lambda: qbook.dequantize(q, s, z),
            lambda: dequantize_affine(q, block, st, zt, torch.int8, -128, 127),
            1.0,
            n,
            "affine",
        ),
        Row(
            "minmax + calc_qparams (4096 channels)",
            "torchao choose_qparams_affine",
            lambda: qbook.calc_qparams(*minmax(w, PerChannel(0)), -128, 127),
            lambda: choose_qparams_affine(w, MappingType.ASYMMETRIC, (1, 1024), torch.int8, -128, 127),
            1.0,
            4 * w.numel(),
            "affine",
        ),
    ]
    return rows


def _format_rows(n: int) -> list[Row]:
    from qbook import formats

    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 3
    rows = []
    for fmt, dtype in (
        (formats.FP16, torch.float16),
        (formats.BF16, torch.bfloat16),
        (formats.FP8_E4M3, torch.float8_e4m3fn),
        (formats.FP8_E5M2, torch.float8_e5m2),
    ):
        rows.append(
            Row(
                f"round_to_format {fmt.name}",
                f"x.to({dtype}).float()",
                lambda fmt=fmt: formats.round_to_format(x, fmt),
                lambda dtype=dtype: x.to(dtype).float(),
                0.8,
                4 * n,
                "formats",
            )
        )
    try:
        import ml_dtypes
    except ImportError:
        return rows
    xn = x.numpy()
    for fmt, np_dtype in (
        (formats.FP6_E3M2, ml_dtypes.float6_e3m2fn),
        (formats.FP6_E2M3, ml_dtypes.float6_e2m3fn),
        (formats.FP4_E2M1, ml_dtypes.float4_e2m1fn),
    ):
        rows.append(
            Row(
                f"round_to_format {fmt.name}",
                f"ml_dtypes {np_dtype.__name__}",
                lambda fmt=fmt: formats.round_to_format(x, fmt),
                lambda np_dtype=np_dtype: torch.from_numpy(xn.astype(np_dtype).astype("float32")),
                1.0,
                4 * n,
                "formats",
            )
        )
    return rows


#: (K, N) of MiniLM's linear layers and the token counts of the matmul rows.
MINILM_KN = ((384, 384), (384, 1536), (1536, 384))
TOKENS = (1, 128)


def _matmul_rows() -> list[Row]:
    import qbook
    from qbook import kernels

    g = torch.Generator().manual_seed(2)
    rows = []
    for M in TOKENS:
        for K, N in MINILM_KN:
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
            shape = f"M={M} K={K} N={N}"
            a_scale, b_scale = torch.rand(M) + 0.5, torch.rand(N) + 0.5

            def epilogue(a=a, b=b, a_scale=a_scale, b_scale=b_scale) -> torch.Tensor:
                return torch._int_mm(a, b).to(torch.float32) * a_scale[:, None] * b_scale[None, :]

            rows += [
                Row(
                    f"int_matmul {shape}",
                    "torch._int_mm",
                    lambda a=a, b=b: qbook.int_matmul(a, b),
                    lambda a=a, b=b: torch._int_mm(a, b),
                    0.8,
                    0,
                    "int_matmul",
                ),
                Row(
                    f"int_matmul zero points {shape}",
                    "torch._int_mm",
                    lambda a=a, b=b: qbook.int_matmul(a, b, a_zero_point=3, b_zero_point=-2),
                    lambda a=a, b=b: torch._int_mm(a, b),
                    0.6,
                    0,
                    "int_matmul_zp",
                ),
                Row(
                    f"int8_matmul torch {shape}",
                    "torch._int_mm",
                    lambda a=a, b=b: kernels.int8_matmul(a, b, backend="torch"),
                    lambda a=a, b=b: torch._int_mm(a, b),
                    0.8,
                    0,
                    "int8_matmul",
                ),
                Row(
                    f"int8_matmul dequantize {shape}",
                    "torch._int_mm + epilogue",
                    lambda a=a, b=b, sa=a_scale, sb=b_scale: kernels.int8_matmul(
                        a, b, sa, sb, backend="torch"
                    ),
                    epilogue,
                    0.8,
                    0,
                    "int8_matmul_dequant",
                ),
            ]
    return rows


def _packing_rows(n: int) -> list[Row]:
    from qbook import packing

    g = torch.Generator().manual_seed(3)
    rows = []
    for bits in (4, 2):
        per = 8 // bits
        codes = torch.randint(0, 2**bits, (n // 1024, 1024), dtype=torch.uint8, generator=g)
        packed = packing.pack(codes, bits, signed=False)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)

        def peer_pack(codes=codes, shifts=shifts, per=per) -> torch.Tensor:
            c = codes.view(codes.shape[0], -1, per) << shifts  # (R, L // per, per)
            out = c[..., 0].clone()
            for i in range(1, per):
                out |= c[..., i]
            return out

        def peer_unpack(packed=packed, shifts=shifts, bits=bits) -> torch.Tensor:
            return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)

        rows += [
            Row(
                f"pack int{bits}",
                "torch uint8 bit operations",
                lambda c=codes, b=bits: packing.pack(c, b, signed=False),
                peer_pack,
                0.8,
                codes.numel(),
                "packing",
            ),
            Row(
                f"unpack int{bits}",
                "torch uint8 bit operations",
                lambda p=packed, b=bits: packing.unpack(p, b, 1024, signed=False),
                peer_unpack,
                0.8,
                packed.numel(),
                "packing",
            ),
        ]
    codes3 = torch.randint(0, 8, (n // 1024, 1024), dtype=torch.uint8, generator=g)
    rows.append(
        Row(
            "pack int3",
            "torch uint8 bit operations (int4 layout, for scale)",
            lambda: packing.pack(codes3, 3, signed=False),
            lambda: packing.pack(codes3, 4, signed=False),
            None,
            codes3.numel(),
            "packing",
        )
    )
    return rows


def _observer_rows(n: int) -> list[Row]:
    from torch.ao.quantization import observer as ao

    from qbook import observers
    from qbook.granularity import PerChannel

    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    w = x.view(1024, -1)
    ours_mm, ao_mm = observers.MinMaxObserver(), ao.MinMaxObserver()
    ours_ma, ao_ma = observers.MovingAverageObserver(), ao.MovingAverageMinMaxObserver()
    ours_pc, ao_pc = (
        observers.MinMaxObserver(granularity=PerChannel(0)),
        ao.PerChannelMinMaxObserver(ch_axis=0),
    )
    ao_hist = ao.HistogramObserver()
    rows = [
        Row(
            "MinMaxObserver update",
            "torch.ao MinMaxObserver",
            lambda: ours_mm(x),
            lambda: ao_mm(x),
            0.8,
            4 * n,
            "observers",
        ),
        Row(
            "MovingAverageObserver update",
            "torch.ao MovingAverageMinMaxObserver",
            lambda: ours_ma(x),
            lambda: ao_ma(x),
            0.8,
            4 * n,
            "observers",
        ),
        Row(
            "MinMaxObserver per-channel update",
            "torch.ao PerChannelMinMaxObserver",
            lambda: ours_pc(w),
            lambda: ao_pc(w),
            None,
            4 * n,
            "observers",
        ),
    ]
    for cls in (observers.PercentileObserver, observers.MSEObserver, observers.L2HistogramObserver):
        ours = cls()
        rows.append(
            Row(
                f"{cls.__name__} update",
                "torch.ao HistogramObserver",
                lambda o=ours: o(x),
                lambda: ao_hist(x),
                0.8,
                4 * n,
                "observers",
            )
        )
    return rows


def cpu_rows(n: int = 1 << 20, groups: Iterable[str] | None = None, *, torchao: bool = True) -> list[Row]:
    """Every CPU comparison of issue 9's table, on ``n``-element inputs; ``groups`` picks some of them, and
    ``torchao=False`` leaves out the torchao peers (torchao is optional and slow to import)."""
    if n < 1024 or n % 1024:
        raise ValueError(f"n must be a positive multiple of 1024, got {n!r}")
    rows = _affine_rows(n, torchao) + _format_rows(n) + _matmul_rows() + _packing_rows(n) + _observer_rows(n)
    if groups is not None:
        wanted = set(groups)
        rows = [r for r in rows if r.group in wanted]
    return rows
