"""qbook.quantize against torch.quantize_per_tensor: what differs, and that nothing else does.

Chapter 3 (section 3.7) and appendix A.2 state it: qbook follows (3.1), the ONNX definition
``round_half_even(fl(x / s)) + z``. PyTorch's CPU kernel multiplies by the float32 reciprocal instead,
``fl(x * fl(1 / s))``, so near a tie it can round the other way with any zero point, 0 included; and its x86
kernel (FBGEMM) adds ``z`` before rounding, which moves exact ties when ``z`` is odd.
"""

from __future__ import annotations

import platform
import warnings

import pytest
import torch

import qbook

QMIN, QMAX = -128, 127
#: PyTorch's x86 builds quantize with FBGEMM, which adds the zero point before rounding.
X86 = platform.machine().lower() in ("x86_64", "amd64")
FBGEMM = X86 and "fbgemm" in torch.backends.quantized.supported_engines


def torch_quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    with warnings.catch_warnings():  # PyTorch marks its quantized tensor functions as deprecated
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(x, scale, zero_point, torch.qint8).int_repr()


def gaussian(n: int, seed: int) -> torch.Tensor:
    """The same samples on every CPU (float32 randn is not: AVX2 and generic kernels draw differently)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_the_reciprocal_moves_exact_ties_with_zero_point_zero():
    s = torch.tensor(61 / 32)  # exact in binary; its reciprocal 32/61 is not, and rounds down
    x = torch.tensor([-97.5, -1.5, 0.5]) * s  # exact products: x / s are exact ties
    assert (x / s).tolist() == [-97.5, -1.5, 0.5]
    assert (1 / s).item() < 32 / 61
    assert qbook.quantize(x, s, 0, QMIN, QMAX).tolist() == [-98, -2, 0]  # round half to even of x / s
    assert torch_quantize(x, s.item(), 0).tolist() == [-97, -1, 0]  # x * fl(1/s) falls short of the tie
    assert (x * (1 / s)).abs().lt((x / s).abs()).all()


@pytest.mark.parametrize("scale", [0.011, 0.0173, 0.05, 2 / 255, 1.90625])
def test_torch_is_round_of_x_times_the_float32_reciprocal(scale):
    s = torch.tensor(scale)
    x = 40 * scale * gaussian(100_000, seed=1)  # about +-160 steps: both ends clamp
    expected = torch.round(x * (1 / s)).clamp(QMIN, QMAX).to(torch.int8)
    assert torch.equal(torch_quantize(x, s.item(), 0), expected)
    ours = torch.round(x / s).clamp(QMIN, QMAX).to(torch.int8)
    assert torch.equal(qbook.quantize(x, s, 0, QMIN, QMAX), ours)


def test_they_differ_only_next_to_ties():
    x = 3 * gaussian(500_000, seed=2)
    differ = 0
    for zero_point in (0, 3, -8):
        for scale in (torch.tensor(0.01 + 0.005 * i) for i in range(8)):
            ours = qbook.quantize(x, scale, zero_point, QMIN, QMAX)
            theirs = torch_quantize(x, scale.item(), zero_point)
            d = ours != theirs
            differ += int(d.sum())
            assert ((ours.int() - theirs.int()).abs() <= 1).all()  # never more than one code
            t = (x / scale)[d]
            # a few float32 rounding errors from a tie k + 1/2
            assert ((t - t.floor() - 0.5).abs() <= 4 * 2**-24 * t.abs()).all()
    assert 0 < differ < 60  # rare, but they exist: about one code in a million


@pytest.mark.skipif(not FBGEMM, reason="without FBGEMM, PyTorch rounds before adding z, like qbook")
def test_fbgemm_adds_an_odd_zero_point_before_rounding():
    t = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    x = t * 0.25  # a power-of-two scale: exact reciprocal, exact ties
    for z in (1, 3, -5):
        assert qbook.quantize(x, torch.tensor(0.25), z, QMIN, QMAX).tolist() == (torch.round(t) + z).tolist()
        assert torch_quantize(x, 0.25, z).tolist() == torch.round(t + z).tolist()
        assert torch_quantize(x, 0.25, z).tolist() != (torch.round(t) + z).tolist()
    for z in (0, 2, -4):  # an even zero point keeps the parity: no difference
        ours = qbook.quantize(x, torch.tensor(0.25), z, QMIN, QMAX)
        assert torch_quantize(x, 0.25, z).tolist() == ours.tolist()


def test_a_power_of_two_scale_has_no_reciprocal_difference():
    x = 3 * gaussian(100_000, seed=3)
    for scale in (0.5, 2.0**-5, 2.0**-9):
        s = torch.tensor(scale)
        assert torch.equal(x * (1 / s), x / s)
        assert torch.equal(torch_quantize(x, scale, 0), qbook.quantize(x, s, 0, QMIN, QMAX))


def test_torch_quantize_per_tensor_is_torch_own_codes_without_warnings() -> None:
    import warnings

    from qbook.affine import torch_quantize_per_tensor

    x = torch.linspace(-3, 3, 101)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = torch_quantize_per_tensor(x, 0.05, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.quantize_per_tensor(x, 0.05, 3, torch.qint8).int_repr()
    assert torch.equal(codes, expected)
    with pytest.raises(TypeError, match="floating-point"):
        torch_quantize_per_tensor(torch.arange(3), 0.05, 3)
