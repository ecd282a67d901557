"""qbook's dynamic int8 QuantLinear against torch.ao's dynamic quantized Linear (fbgemm) and fp32 nn.Linear,
and whole-model MiniLM encoding (issue 10, chapter 7).

    python benchmarks/bench_quant_linear.py                      # 1 and 2 threads, layers and MiniLM
    python benchmarks/bench_quant_linear.py --threads 1 --rounds 7 --no-minilm
    python benchmarks/bench_quant_linear.py --threads 1 --clock cpu   # CPU time: robust on a busy machine

Each row times qbook and its peer on the same input in one process, interleaved round after round after a
warm-up (:func:`qbook.bench.compare`), and reports min / median / max of the speed ratio
peer time / qbook time
(above 1: qbook is faster). Rows:

* layers at MiniLM's shapes (384→384, 384→1536, 1536→384) and M = 1, 32, 128, 512 tokens: qbook's
  ``QuantLinear`` (W8 per channel, A8 per token, ``torch._int_mm``) vs
  ``torch.ao.nn.quantized.dynamic.Linear``
  (fbgemm, A8 per tensor) — target 1.0 at M >= 128 — and vs fp32 ``nn.Linear`` — target 1.5 at M >= 128;
* all-MiniLM-L6-v2 encoding 256 sentences of ``qbook.data.sentences`` with ``qbook.models.embed``:
  ``qbook.ptq.quantize_dynamic`` vs ``torch.ao.quantization.quantize_dynamic`` (target 1.0) and vs fp32
  (target 1.3).

``--clock cpu`` (one thread only) times with the CPU time of the calling thread (``time.thread_time``), which
does not count the time the thread waits while other processes hold the core: on a shared machine it measures
the work, where wall-clock ratios swing with the load.

Results, with the provenance of the machine and its load average before and after, go to
``benchmarks/results/quant_linear_<date>.json``. The numbers depend on the machine and on what else runs
on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from qbook import bench

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (K, N) of MiniLM's linears: attention, FFN up, FFN down
TOKENS = (1, 32, 128, 512)


def _ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated; it is still the peer users call
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def layer_rows() -> list[bench.Row]:
    from qbook.nn import QuantLinear

    rows = []
    g = torch.Generator().manual_seed(0)
    for K, N in SHAPES:
        linear = nn.Linear(K, N).eval()
        with torch.no_grad():
            linear.weight.copy_(torch.randn(N, K, generator=g, dtype=torch.float64).float() / K**0.5)
        qbook_layer = QuantLinear.from_float(linear)
        ao_layer = _ao_dynamic(nn.Sequential(linear))[0]
        for M in TOKENS:
            x = torch.randn(M, K, generator=g, dtype=torch.float64).float()
            error = (qbook_layer(x) - linear(x)).abs().max().item()
            scale = linear(x).abs().max().item()
            assert error <= 0.02 * scale, f"QuantLinear {K}->{N} M={M} is off: {error} vs {scale}"
            name = f"{K}->{N} M={M}"
            big = M >= 128
            rows.append(
                bench.Row(
                    f"{name} vs torch.ao",
                    "torch.ao dynamic Linear (fbgemm)",
                    lambda q=qbook_layer, x=x: q(x),
                    lambda a=ao_layer, x=x: a(x),
                    target=1.0 if big else None,
                    group="layer",
                )
            )
            rows.append(
                bench.Row(
                    f"{name} vs fp32",
                    "nn.Linear fp32",
                    lambda q=qbook_layer, x=x: q(x),
                    lambda f=linear, x=x: f(x),
                    target=1.5 if big else None,
                    group="layer",
                )
            )
    return rows


def minilm_rows(n_sentences: int = 256) -> tuple[list[bench.Row], dict[str, float]]:
    import qbook.ptq
    from qbook.data import sentences
    from qbook.models import embed, embedding_agreement, load_minilm

    text = sentences(n_sentences)
    fp32 = load_minilm()
    ours = qbook.ptq.quantize_dynamic(fp32)
    ao = _ao_dynamic(load_minilm())
    ref = embed(fp32, text)
    agreement = {f"qbook_{k}": v for k, v in embedding_agreement(ref, embed(ours, text)).items()}
    agreement |= {f"torch_ao_{k}": v for k, v in embedding_agreement(ref, embed(ao, text)).items()}
    rows = [
        bench.Row(
            f"MiniLM {n_sentences} sentences vs torch.ao",
            "torch.ao quantize_dynamic",
            lambda: embed(ours, text),
            lambda: embed(ao, text),
            target=1.0,
            group="minilm",
        ),
        bench.Row(
            f"MiniLM {n_sentences} sentences vs fp32",
            "fp32 MiniLM",
            lambda: embed(ours, text),
            lambda: embed(fp32, text),
            target=1.3,
            group="minilm",
        ),
    ]
    return rows, agreement


def _print(summary: list[dict[str, object]], threads: int) -> None:
    print(f"\n== {threads} thread(s): speed ratio = peer time / qbook time (min / median / max) ==")
    for s in summary:
        target = "" if s["target"] is None else f"  target {s['target']:.1f} {'ok' if s['met'] else 'MISSED'}"
        print(
            f"{s['name']:<40} {s['ratio_min']:6.2f} {s['ratio_median']:6.2f} {s['ratio_max']:6.2f}   "
            f"qbook {s['qbook_us_median']:10.0f} us  peer {s['peer_us_median']:10.0f} us{target}"
        )


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--minilm-rounds", type=int, default=5)
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    clock = time.perf_counter
    if args.clock == "cpu":
        if args.threads != [1]:
            parser.error("--clock cpu measures one thread: pass --threads 1")
        clock = time.thread_time

    load_before = os.getloadavg()
    report: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "clock": "time.thread_time" if args.clock == "cpu" else "time.perf_counter",
        "load_before": load_before,
        "runs": [],
    }
    rows = layer_rows()
    model_rows, agreement = ([], {}) if args.no_minilm else minilm_rows()
    report["minilm_agreement"] = agreement
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            results = bench.compare(rows, rounds=args.rounds, budget_s=0.02, clock=clock)
            if model_rows:
                results += bench.compare(
                    model_rows, rounds=args.minilm_rounds, budget_s=0.5, warmup=1, clock=clock
                )
        summary = [r.summary() for r in results]
        _print(summary, threads)
        report["runs"].append({"provenance": bench.provenance(), "rows": summary})
    report["load_after"] = os.getloadavg()
    suffix = "_cpu" if args.clock == "cpu" else ""
    out = args.out or RESULTS / f"quant_linear_{time.strftime('%Y-%m-%d')}{suffix}.json"
    bench.write_record(report, out)
    print(f"\nload average before {load_before}, after {report['load_after']}; wrote {out}")
    return report


if __name__ == "__main__":
    main()
