"""Chapter 11's full-model numbers: RTN, GPTQ, AWQ and rotations on all 36 linears of all-MiniLM-L6-v2.

    python benchmarks/bench_beyond_rtn.py              # everything: ~10 minutes of CPU time on one core
    python benchmarks/bench_beyond_rtn.py --quick      # the weight settings only

For each weight setting (int4 g128, int3 per channel, int3 g128) and each method (RTN, GPTQ, AWQ,
rotation + RTN, rotation + GPTQ) it records

* the **layer output error** (11.3) of every encoder linear, ``‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖²`` (bias excluded), on
  the float model's inputs of the 256 evaluation sentences, each layer quantized on its own from the float
  model's inputs of the 128 calibration sentences (:func:`layer_weights`: chapter 11's compositions);
* the **whole model**, every encoder linear quantized by ``qbook.ptq.quantize_weights`` (GPTQ sequentially,
  AWQ with its folds, rotations by ``qbook.rotation.rotate_linears``): cosine of the sentence embeddings to
  the float model's and top-1/top-5 retrieval agreement (``qbook.models.embedding_agreement``), and the **true
  bits per weight** (codes, scales and unfolded AWQ scales; not the bias);

then, with simulated activations (``qbook.outliers.quantize_linears``: static per-tensor min/max inputs,
symmetric per-channel weights), W4A4, W8A4 and W8A8 without and with rotation (activation kurtosis and SQNR,
embeddings); the salient-channel experiment (1 % of the input channels kept in float: the largest mean
activations or a random 1 %); GPTQ against the number of calibration sentences; and the seconds per layer of
each method (interleaved rounds, min/median/max). Everything goes, with the provenance of the machine and the
qbook commit, to ``benchmarks/results/beyond_rtn_<date>.json``, which chapter 11 reads and checks live.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qbook import awq, bench, gptq, ptq, rotation
from qbook.affine import INT8, INT8_SYMMETRIC, QuantSpec, fake_quantize, sqnr_db
from qbook.data import sentences
from qbook.granularity import PerChannel
from qbook.models import embed, embedding_agreement, load_minilm
from qbook.nn import WeightOnlyLinear
from qbook.outliers import LinearQuantConfig, capture_activations, quantize_linears

RESULTS = Path(__file__).resolve().parent / "results"

#: (name, bits, group_size): the weight settings of chapter 11.
SETTINGS = (("int4 g128", 4, 128), ("int3 per channel", 3, None), ("int3 g128", 3, 128))
METHODS = ("rtn", "gptq", "awq", "rotation + rtn", "rotation + gptq")
INT4_SYMMETRIC = QuantSpec(4, True, narrow_range=True, symmetric=True)
INT4_AFFINE = QuantSpec(4, True)
#: (name, weight grid, activation grid) of the simulated weight-and-activation runs.
ACTIVATION_SETTINGS = (
    ("W4A4", INT4_SYMMETRIC, INT4_AFFINE),
    ("W8A4", INT8_SYMMETRIC, INT4_AFFINE),
    ("W8A8", INT8_SYMMETRIC, INT8),
)


def is_encoder_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".encoder." in f".{name}."


def corpus() -> tuple[list[str], list[str]]:
    """Calibration and evaluation sentences: chapter 7's split."""
    text = sentences()
    return text[:128], text[128:384]


def layer_weights(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, torch.Tensor]:
    """``Ŵ`` ``(N, K)`` of each method for one layer from its calibration inputs ``x`` ``(tokens, K)``, in the
    layer's own input space (``X Ŵᵀ`` is what the quantized layer computes), composed as chapter 11 shows."""
    out = {}
    for method in methods:
        if method == "rtn":
            out[method] = gptq.rtn(weight, bits, group_size).weight
        elif method == "gptq":
            out[method] = gptq.gptq(weight, gptq.hessian(x), bits, group_size).weight
        elif method == "awq":
            s = awq.search_scales(x, weight, bits, group_size).scale
            out[method] = awq.rtn(weight * s, bits, group_size) / s  # Q(W diag(s)) diag(s)^-1 (11.7)
        elif method.startswith("rotation + "):
            out[method] = rotated_weight(weight, x, bits, group_size, method.removeprefix("rotation + "))
        else:
            raise ValueError(f"unknown method {method!r}")
    return out


def rotated_weight(
    weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, then: str
) -> torch.Tensor:
    """``Q(W Rᵀ) R`` (11.9) for the orthonormal Hadamard ``R``: the rotated layer seen from the inputs."""
    R = rotation.hadamard(weight.shape[1])  # (K, K), orthonormal
    w_rot, x_rot = weight @ R.T, x @ R.T  # W Rᵀ and X Rᵀ: the same outputs
    if then == "rtn":
        return gptq.rtn(w_rot, bits, group_size).weight @ R
    return gptq.gptq(w_rot, gptq.hessian(x_rot), bits, group_size).weight @ R


def quantize_model(
    model: nn.Module, method: str, bits: int, group_size: int | None, calibration: list[str]
) -> nn.Module:
    """Every encoder linear of ``model`` quantized by ``method`` (a copy), calibrated on ``calibration``
    (GPTQ sequentially: each layer from the inputs it gets with the layers before it quantized)."""
    if method.startswith("rotation + "):
        model, _ = rotation.rotate_linears(model, is_encoder_linear)
        method = method.removeprefix("rotation + ")
    skip = [n for n, m in model.named_modules() if type(m) is nn.Linear and not is_encoder_linear(n, m)]
    if method == "rtn":
        return ptq.quantize_weights(model, bits=bits, group_size=group_size, skip=skip)
    return ptq.quantize_weights(
        model,
        bits=bits,
        group_size=group_size,
        method=method,
        batches=[calibration],
        skip=skip,
        run=lambda m, b: embed(m, b),
    )


def bits_per_weight(model: nn.Module) -> float:
    """True bits per weight of the quantized linears: the bytes of their codes, scales and zero points (not
    the bias), plus AWQ's input scales where they could not be folded, per weight."""
    total_bytes, weights = 0, 0
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear):
            weights += module.in_features * module.out_features
            total_bytes += module.nbytes - (0 if module.bias is None else module.bias.numel() * 4)
        elif isinstance(module, (awq.ScaledInput, awq.ScaledActivation)):
            total_bytes += module.scale.numel() * module.scale.element_size()
    return 8 * total_bytes / weights


def weight_results(
    model, calibration, evaluation, reference, x_cal, H_eval, methods, whole_model=True
) -> dict:
    """Layer output errors (11.3) of every method on every encoder linear; the whole model's embeddings."""
    out: dict[str, dict] = {"layer_error": {}, "model": {}}
    for setting, bits, group_size in SETTINGS:
        errors: dict[str, dict[str, float]] = {method: {} for method in methods}
        for name, x in x_cal.items():
            W = model.get_submodule(name).weight.detach()
            for method, W_hat in layer_weights(W, x, bits, group_size, methods).items():
                errors[method][name] = gptq.output_error(W, W_hat, H_eval[name], relative=True)
        out["layer_error"][setting] = errors
        out["model"][setting] = {}
        for method in methods:
            median = statistics.median(errors[method].values())
            line = f"{setting:18s} {method:16s} median layer error {median:.5f}"
            if whole_model:
                quantized = quantize_model(model, method, bits, group_size, calibration)
                agreement = embedding_agreement(reference, embed(quantized, evaluation))
                out["model"][setting][method] = {**agreement, "bits_per_weight": bits_per_weight(quantized)}
                line += f"  cosine {agreement['cosine_mean']:.4f}  top1 {agreement['top1']:.3f}"
                line += f"  bits/weight {out['model'][setting][method]['bits_per_weight']:.4f}"
            print(line, flush=True)
    return out


def activation_results(model, calibration, evaluation, reference) -> dict:
    """W4A4 / W8A4 / W8A8 simulated, without and with rotation."""
    models = {"none": model, "rotation": rotation.rotate_linears(model, is_encoder_linear)[0]}
    out: dict[str, dict] = {"kurtosis": {}, "float_max_abs_diff": {}, "runs": {}}
    for label, m in models.items():
        x = capture_activations(m, lambda m=m: embed(m, calibration[:32]), stat="inputs")
        out["kurtosis"][label] = {
            name: float(rotation.kurtosis(v)) for name, v in x.items() if ".encoder." in f".{name}."
        }
        out["float_max_abs_diff"][label] = float((embed(m, evaluation) - reference).abs().max())
    for setting, weight, activation in ACTIVATION_SETTINGS:
        for label, m in models.items():
            work = copy.deepcopy(m)
            config = LinearQuantConfig(weight=weight, weight_granularity=PerChannel(0), activation=activation)
            layers = quantize_linears(work, config, is_encoder_linear)
            inputs = capture_activations(work, lambda w=work: embed(w, calibration[:32]), stat="inputs")
            for layer in layers.values():
                layer.freeze()
            act_sqnr = {
                name: sqnr_db(
                    inputs[name],
                    fake_quantize(
                        inputs[name], layer.scale, layer.zero_point, activation.qmin, activation.qmax
                    ),
                )
                for name, layer in layers.items()
            }
            agreement = embedding_agreement(reference, embed(work, evaluation))
            out["runs"][f"{setting}, {label}"] = {**agreement, "activation_sqnr_db": act_sqnr}
            print(
                f"{setting} rotation={label:8s} cosine {agreement['cosine_mean']:.4f} top1 "
                f"{agreement['top1']:.3f} median activation SQNR "
                f"{statistics.median(act_sqnr.values()):.2f} dB",
                flush=True,
            )
    return out


def salient_results(
    model, calibration, evaluation, reference, x_cal, H_eval, bits=3, group_size=None
) -> dict:
    """AWQ's observation: keep 1 % of each layer's input channels in float, those of largest mean |x| or a
    random 1 % (seeded), the rest RTN at int3 per channel; per-layer errors (11.3) and the whole model."""
    generator = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}
    for how in ("none", "largest", "random"):
        work = copy.deepcopy(model)
        errors = {}
        for name, x in x_cal.items():
            linear = work.get_submodule(name)
            W, K = linear.weight.detach(), linear.in_features
            k = max(1, round(0.01 * K))
            keep = {
                "none": torch.empty(0, dtype=torch.long),
                "largest": awq.salient_channels(x.abs().mean(dim=0), 0.01),
                "random": torch.randperm(K, generator=generator)[:k],
            }[how]
            W_hat = (
                awq.quantize_keeping(W, keep, bits, group_size)
                if len(keep)
                else gptq.rtn(W, bits, group_size).weight
            )
            errors[name] = gptq.output_error(W, W_hat, H_eval[name], relative=True)
            with torch.no_grad():
                linear.weight.copy_(W_hat)  # simulated: the float layer holds the mixed-precision weight
        agreement = embedding_agreement(reference, embed(work, evaluation))
        out[how] = {**agreement, "layer_error": errors}
        print(
            f"keep 1 % of the input channels in float ({how:7s}): median layer error "
            f"{statistics.median(errors.values()):.5f}, cosine {agreement['cosine_mean']:.4f}",
            flush=True,
        )
    return out


def calibration_size_results(
    model, calibration, H_eval, sizes=(1, 4, 16, 64, 128), bits=3, group_size=None
) -> dict:
    """GPTQ (int3 per channel) from the first n calibration sentences: median and max layer error (11.3)."""
    out = {}
    for n in sizes:
        x = capture_activations(
            model, lambda n=n: embed(model, calibration[:n]), is_encoder_linear, stat="inputs"
        )
        errors = []
        for name, xn in x.items():
            W = model.get_submodule(name).weight.detach()
            errors.append(
                gptq.output_error(
                    W, gptq.gptq(W, gptq.hessian(xn), bits, group_size).weight, H_eval[name], relative=True
                )
            )
        tokens = next(iter(x.values())).shape[0]
        out[str(n)] = {
            "tokens": tokens,
            "median_layer_error": statistics.median(errors),
            "max_layer_error": max(errors),
        }
        print(
            f"GPTQ int3 per channel, {n:3d} calibration sentences ({tokens:5d} tokens): median layer error "
            f"{statistics.median(errors):.5f}",
            flush=True,
        )
    return out


def timing_results(model, x_cal, rounds: int, bits=4, group_size=128) -> dict:
    """Seconds to quantize one layer of each of MiniLM's three shapes by each method (int4 g128), interleaved
    round after round with RTN (``qbook.bench.compare``): min / median / max over the rounds. With one torch
    thread the clock is the thread's CPU time (steady on a machine shared with other jobs), else wall time."""
    shapes = {}
    for name, x in x_cal.items():
        W = model.get_submodule(name).weight.detach()
        shapes.setdefault(f"{W.shape[1]}->{W.shape[0]}", (W, x))

    def quantizer(method: str, W: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
        return lambda: layer_weights(W, x, bits, group_size, (method,))

    rows = [
        bench.Row(f"{method}, {shape}", "rtn", quantizer(method, W, x), quantizer("rtn", W, x))
        for method in METHODS[1:]
        for shape, (W, x) in shapes.items()
    ]
    out = {}
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for r in bench.compare(rows, rounds=rounds, budget_s=0.0, warmup=1, clock=clock):
        out[r.row.name] = {
            "seconds_min": min(r.qbook_s),
            "seconds_median": statistics.median(r.qbook_s),
            "seconds_max": max(r.qbook_s),
            "rtn_seconds_median": statistics.median(r.peer_s),
            "rounds": len(r.qbook_s),
        }
        t = out[r.row.name]
        print(
            f"{r.row.name:28s} {t['seconds_median']:.4f} s per layer (min {t['seconds_min']:.4f}, max "
            f"{t['seconds_max']:.4f}); rtn {t['rtn_seconds_median']:.5f} s",
            flush=True,
        )
    return out


def _commit() -> str:
    """The git commit of the checkout, with ``+dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "qbook"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--no-model", action="store_true", help="layer errors only, no whole-model runs")
    parser.add_argument("--quick", action="store_true", help="weights only: no activations, salient, timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    model = load_minilm()
    calibration, evaluation = corpus()
    reference = embed(model, evaluation)
    x_cal = capture_activations(model, lambda: embed(model, calibration), is_encoder_linear, stat="inputs")
    x_eval = capture_activations(model, lambda: embed(model, evaluation), is_encoder_linear, stat="inputs")
    H_eval = {name: gptq.hessian(x) for name, x in x_eval.items()}
    evaluation_tokens = next(iter(x_eval.values())).shape[0]
    del x_eval
    methods = tuple(m for m in METHODS if m in args.methods)
    record: dict[str, object] = {
        "provenance": {
            **bench.provenance(),
            "qbook_commit": _commit(),
            "timing_clock": "thread CPU time" if args.threads == 1 else "wall",
        },
        "command": " ".join(
            ["python", "benchmarks/bench_beyond_rtn.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "setup": {
            "model": "all-MiniLM-L6-v2 (qbook.models.load_minilm)",
            "calibration_sentences": len(calibration),
            "calibration_tokens": next(iter(x_cal.values())).shape[0],
            "evaluation_sentences": len(evaluation),
            "evaluation_tokens": evaluation_tokens,
            "layers": list(x_cal),
            "settings": [{"name": s, "bits": b, "group_size": g} for s, b, g in SETTINGS],
            "methods": list(methods),
            "layer_error": "||X W^T - X W_hat^T||^2 / ||X W^T||^2 (11.3) on the float model's inputs of the "
            "evaluation sentences; each layer quantized alone from the float model's calibration inputs",
        },
    }
    record["weights"] = weight_results(
        model, calibration, evaluation, reference, x_cal, H_eval, methods, whole_model=not args.no_model
    )
    if not args.quick:
        record["activations"] = activation_results(model, calibration, evaluation, reference)
        record["salient"] = salient_results(model, calibration, evaluation, reference, x_cal, H_eval)
        record["calibration_size"] = calibration_size_results(model, calibration, H_eval)
        record["timing"] = timing_results(model, x_cal, args.rounds)
    record["elapsed_s"] = time.perf_counter() - start
    out = args.out or RESULTS / f"beyond_rtn_{time.strftime('%Y-%m-%d')}.json"
    bench.write_record(record, out)
    print(f"\nwritten {out} ({record['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
