"""Cross-check qbook.mx against torchao's MX and NVFP4 emulation (torchao.prototype.mx_formats), bit for bit.

torchao is not a dependency of qbook (transformers imports it whenever it is installed, which prints into the
notebooks), so this script runs in the benchmark environment, which sees the project's packages::

    /work/main/.venv-bench/bin/python benchmarks/check_mx_torchao.py    # prints a table; exit 1 on a mismatch

Compared: E8M0 scale codes and element codes (FP8 bytes, FP6 codes, packed FP4 bytes) of
``qbook.mx.quantize_mx`` vs ``torchao...mx_tensor.to_mx(..., ScaleCalculationMode.FLOOR)`` (the spec's
``floor(log2(amax)) - emax_elem``), and ``qbook.mx.quantize_nvfp4`` vs
``torchao...nvfp4_tensor.nvfp4_quantize`` with ``per_tensor_scale = amax / (448 * 6)``. Equal codes and scales
mean equal dequantized values. torchao and qbook differ on purpose in three places, which the script counts
apart instead of calling them mismatches:

* a block holding ±inf: qbook gives it the NaN scale (E8M0 has no inf; the spec's shared exponent is not a
  number), torchao a finite scale with saturated elements;
* a block whose shared exponent is -127 (or clamped to it): torchao stores code 0 (2^-127) but divides by
  2^-126 (its ``F32_MIN_NORMAL`` clamp, a Triton workaround), so its elements are half of what the code says;
* NVFP4 blocks whose E4M3 scale would be below 2^-6: torchao clamps it to 2^-6 (``E4M3_EPS``); Transformer
  Engine and qbook keep the subnormal (or zero) scale.

Besides, NVFP4's float32 encode scale is computed in a different order (qbook follows NVIDIA's paper and
Transformer Engine: ``1 / (S_b * (1 / s_enc))``; torchao ``(1 / per_tensor_scale) / S_b``), so a value that
lands exactly on an FP4 midpoint under one order may miss it by one ulp under the other: "op-order ties".
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import warnings

import torch

from qbook import mx
from qbook.formats import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2


def torchao_modules():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import torchao
        from torchao.prototype.mx_formats import constants, nvfp4_tensor
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    return torchao, constants, nvfp4_tensor, ScaleCalculationMode, to_mx


def sample(n_rows: int, seed: int) -> torch.Tensor:
    """(n_rows, 1024) float32, blocks of 32: random over 2^-140 .. 2^120, zeros, grid ties, saturation,
    float32 subnormals, spikes, near-max values, and three blocks with inf, -inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-140, 120, (n_rows, 32), generator=g).double())
    magnitude = magnitude.repeat_interleave(32, 1)  # one power of two per block
    x = (torch.randn(n_rows, 1024, dtype=torch.float64, generator=g) * magnitude).float()
    blocks = x.view(-1, 32)
    k = blocks.shape[0] // 16
    blocks[:k] = 0.0
    blocks[k:2 * k, ::2] = -0.0
    grid = torch.randint(-256, 257, (k, 32), generator=g).float() / 16
    blocks[2 * k:3 * k] = grid * torch.exp2(torch.randint(-20, 20, (k, 1), generator=g).float())
    blocks[3 * k:4 * k] *= 2.0**-130
    blocks[4 * k:5 * k] = torch.randn(k, 32, generator=g) * 2.0**100
    blocks[5 * k:5 * k + 8] = torch.finfo(torch.float32).max * torch.rand(8, 32, generator=g)
    blocks[5 * k + 8, 3], blocks[5 * k + 9, 0], blocks[5 * k + 10, 31] = math.inf, -math.inf, math.nan
    return x


def check_mx(x: torch.Tensor, element, ao_dtype, to_mx, floor_mode) -> dict:
    codes, scales = mx.quantize_mx(x, element)
    ao_scales, ao_data = to_mx(x, ao_dtype, 32, floor_mode)
    ao_scales = ao_scales.view(torch.uint8)
    amax = x.view(*x.shape[:-1], -1, 32).abs().amax(-1)  # (rows, blocks)
    has_inf = torch.isinf(amax)
    clamped = (scales == 0) & (amax > 0)  # shared exponent clamped at -127 (code 0)
    compared = ~has_inf & ~clamped & ~torch.isnan(amax)  # blocks both sides define the same way
    if element == FP4_E2M1:
        ours = mx.pack_codes(codes, element).view(*x.shape[:-1], -1, 16)
        theirs = ao_data.view(torch.uint8).view(*x.shape[:-1], -1, 16)
    else:
        ours = codes.view(torch.uint8).view(*x.shape[:-1], -1, 32)
        theirs = ao_data.view(torch.uint8).view(*x.shape[:-1], -1, 32)
    scale_ok = (scales == ao_scales) | has_inf
    code_ok = (ours == theirs).all(-1) | ~compared
    return {
        "values": x.numel(),
        "blocks": amax.numel(),
        "scale mismatches": int((~scale_ok).sum()),
        "code mismatches": int((~code_ok).sum()),
        "inf blocks (NaN scale here)": int(has_inf.sum()),
        "scale-code-0 blocks (torchao divides by 2^-126)": int(clamped.sum()),
        "of which codes differ": int((clamped & ~(ours == theirs).all(-1)).sum()),
        "NaN blocks (scale 255 both)": int((torch.isnan(amax) & (scales == 255) & (ao_scales == 255)).sum()),
    }


def check_nvfp4(x: torch.Tensor, nvfp4_tensor) -> dict:
    codes, S_b, s_dec = mx.quantize_nvfp4(x)
    amax = x.abs().max()
    per_tensor_scale = nvfp4_tensor.per_tensor_amax_to_scale(amax)
    ao_scales, ao_data = nvfp4_tensor.nvfp4_quantize(x, 16, per_tensor_scale)
    tiny = S_b.float() < 2.0**-6  # torchao clamps these block scales to 2^-6
    scale_ok = (S_b.view(torch.uint8) == ao_scales.view(torch.uint8)) | tiny
    ours = mx.pack_codes(codes, FP4_E2M1).view(*x.shape[:-1], -1, 8)
    code_ok = (ours == ao_data.view(torch.uint8).view(*x.shape[:-1], -1, 8)).all(-1) | tiny | ~scale_ok
    # qbook's scaled values (before rounding to E2M1): which blocks hold an exact midpoint of the E2M1 grid?
    rcp = torch.clamp(1.0 / (S_b.float() * s_dec), max=torch.finfo(torch.float32).max)
    scaled = x.view(*x.shape[:-1], -1, 16) * rcp[..., None]
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    has_tie = torch.isin(scaled.abs(), midpoints).any(-1)
    return {
        "values": x.numel(),
        "blocks": S_b.numel(),
        "scale mismatches": int((~scale_ok).sum()),
        "code mismatches": int((~code_ok & ~has_tie).sum()),
        "op-order ties": int((~code_ok & has_tie).sum()),
        "tiny blocks (torchao clamps to 2^-6)": int(tiny.sum()),
        "tensor scale": f"qbook s_dec {float(s_dec):.9g}, torchao {float(per_tensor_scale):.9g}",
    }


def main() -> int:
    torchao, constants, nvfp4_tensor, mode, to_mx = torchao_modules()
    print(f"torchao {torchao.__version__}, torch {torch.__version__}")
    x = sample(1024, seed=0)  # 2^20 values
    elements = {
        FP8_E4M3: torch.float8_e4m3fn,
        FP8_E5M2: torch.float8_e5m2,
        FP6_E3M2: constants.DTYPE_FP6_E3M2,
        FP6_E2M3: constants.DTYPE_FP6_E2M3,
        FP4_E2M1: torch.float4_e2m1fn_x2,
    }
    failed = False
    for element, ao_dtype in elements.items():
        result = check_mx(x, element, ao_dtype, to_mx, mode.FLOOR)
        failed |= result["scale mismatches"] > 0 or result["code mismatches"] > 0
        print(f"MX {element.name}: {result}")
    g = torch.Generator().manual_seed(1)
    magnitude = torch.exp2(torch.randint(-12, 4, (1024, 64), generator=g).double()).repeat_interleave(16, 1)
    y = (torch.randn(1024, 1024, dtype=torch.float64, generator=g) * magnitude).float()
    y[:64] = y[:64] * 1e-6  # some blocks far below the tensor's largest magnitude
    result = check_nvfp4(y, nvfp4_tensor)
    failed |= result["scale mismatches"] > 0 or result["code mismatches"] > 0
    print(f"NVFP4: {result}")
    print("MISMATCH" if failed else "all compared blocks agree bit for bit")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
