r"""Floating-point storage formats, from FP32 down to FP4 (Chapter 2).

A binary floating-point number stores three bit fields: a sign bit ``s``, an ``E``-bit exponent field ``e``
and an ``M``-bit mantissa (fraction) field ``f``. With the exponent bias ``b`` (IEEE 754: ``b = 2^(E-1) - 1``,
127 for FP32) the value is

.. math::

    x = (-1)^s \cdot 2^{e - b} \cdot (1 + f / 2^M)   \qquad e \ge 1 \text{ (normal: implicit 1)}   (2.1)

    x = (-1)^s \cdot 2^{1 - b} \cdot (0 + f / 2^M)   \qquad e = 0 \text{ (zero, subnormals)}  (2.2)

and the all-ones exponent field is reserved for ±inf and NaN in the IEEE formats. The formats differ only in
``E``, ``M`` and in what they do with the special patterns, so one :class:`FloatFormat` describes them
all and one algorithm rounds float32 values to any of them, working on the float32 bit pattern with integer
arithmetic: :func:`round_to_format_reference` is that algorithm as chapter 2 teaches it, and
:func:`round_to_format` computes the same bits faster.

>>> round_to_format(torch.tensor([0.1, 1000.0]), FP8_E4M3)
tensor([1.0156e-01, 4.4800e+02])
>>> model_size(13e9, 16)
26000000000
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ALL",
    "BF16",
    "FP4_E2M1",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "FloatFormat",
    "compose",
    "decode",
    "decompose",
    "encode",
    "finite_values",
    "model_size",
    "round_to_format",
    "round_to_format_reference",
    "ulp",
]

NanStyle = Literal["ieee", "all_ones", "none"]

# float32 layout: 1 sign bit, 8 exponent bits (bias 127), 23 mantissa bits.
_F32_MANT = 23
_F32_BIAS = 127
_F32_INF = 0x7F800000
_F32_QNAN = 0x7FC00000
_SIGN = torch.iinfo(torch.int32).min  # 0x80000000 as an int32


def _f32_bits(value: float) -> int:
    """The float32 bit pattern of a Python float that float32 represents exactly."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits`` E, ``mantissa_bits`` M (Chapter 2).

    Values follow (2.1) and (2.2). The special values are described by three flags:

    * ``has_inf``: the all-ones exponent with a zero mantissa is ±inf (IEEE 754, FP8 E5M2).
    * ``nan``: ``"ieee"`` -- the all-ones exponent with a nonzero mantissa is NaN (so the whole top exponent
      field is reserved); ``"all_ones"`` -- only ``S.1111.111`` (all exponent and mantissa bits set) is NaN,
      the rest of the top binade holds ordinary numbers (FP8 E4M3, ``float8_e4m3fn``); ``"none"`` -- no NaN
      (the MX formats FP6 and FP4).
    * ``saturate``: finite values beyond ``max`` (and, without an inf, ±inf) round to ±``max`` instead of
      ±inf/NaN.

    The format's values must all be exact float32 numbers: ``1 <= E <= 8``, ``0 <= M <= 23`` and a bias that
    keeps the exponents inside float32's range.

    >>> fmt = FloatFormat("FP16", exponent_bits=5, mantissa_bits=10)
    >>> fmt.bias, fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.epsilon
    (15, 65504.0, 6.103515625e-05, 5.960464477539063e-08, 0.0009765625)
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    has_inf: bool = True
    nan: NanStyle = "ieee"
    saturate: bool = False
    torch_dtype: torch.dtype | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        E, M = self.exponent_bits, self.mantissa_bits
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        if isinstance(E, bool) or not isinstance(E, int) or not 1 <= E <= 8:
            raise ValueError(f"exponent_bits must be an integer in [1, 8] (float32 has 8), got {E!r}")
        if isinstance(M, bool) or not isinstance(M, int) or not 0 <= M <= 23:
            raise ValueError(f"mantissa_bits must be an integer in [0, 23] (float32 has 23), got {M!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (E - 1) - 1)
        if isinstance(self.bias, bool) or not isinstance(self.bias, numbers.Integral):
            raise TypeError(f"bias must be an integer, got {self.bias!r}")
        object.__setattr__(self, "bias", int(self.bias))
        for name in ("has_inf", "saturate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.nan not in ("ieee", "all_ones", "none"):
            raise ValueError(f"nan must be 'ieee', 'all_ones' or 'none', got {self.nan!r}")
        if self.has_inf and self.nan != "ieee":
            raise ValueError(f"has_inf=True needs nan='ieee' (inf is an IEEE pattern), got {self.nan!r}")
        if self.nan == "ieee" and not self.has_inf:
            raise ValueError("nan='ieee' reserves the top exponent for inf and NaN, so has_inf must be True")
        if self.nan == "ieee" and (M == 0 or E == 1):
            raise ValueError(f"nan='ieee' needs mantissa_bits >= 1 and exponent_bits >= 2, got E{E}M{M}")
        if self.nan == "none" and not self.saturate:
            raise ValueError("a format without inf and NaN must saturate: set saturate=True")
        if not -126 <= self.emin or not self.emax <= 127:
            raise ValueError(
                f"bias={self.bias!r} puts the exponents [{self.emin}, {self.emax}] "
                "outside float32's [-126, 127]"
            )
        if self.max_mantissa < 0 or (self.max_exponent_field == 0 and M == 0):
            raise ValueError(f"{self.name}: the special values leave no finite nonzero number")

    # --- the top of the range -------------------------------------------------------------------------
    @property
    def max_exponent_field(self) -> int:
        """Largest exponent field that holds finite numbers (IEEE formats reserve the all-ones field)."""
        top = 2**self.exponent_bits - 1
        if self.nan == "ieee" or (self.nan == "all_ones" and self.mantissa_bits == 0):
            return top - 1
        return top

    @property
    def max_mantissa(self) -> int:
        """Largest mantissa field in the top finite binade (E4M3 reserves ``111`` there for NaN)."""
        reserved = self.nan == "all_ones" and self.max_exponent_field == 2**self.exponent_bits - 1
        return 2**self.mantissa_bits - 1 - int(reserved)

    @property
    def emax(self) -> int:
        """Largest unbiased exponent of a finite number."""
        return self.max_exponent_field - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number, ``1 - bias``."""
        return 1 - self.bias

    # --- derived numbers --------------------------------------------------------------------------------
    @property
    def total_bits(self) -> int:
        """``1 + E + M``."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max(self) -> float:
        """Largest finite value, ``2^emax * (1 + max_mantissa / 2^M)``."""
        return math.ldexp(1 + self.max_mantissa / 2**self.mantissa_bits, self.emax)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2^(1 - bias)``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value, ``2^(1 - bias - M)`` (a subnormal when ``M >= 1``)."""
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Machine epsilon ``2^-M``: the gap between 1 and the next larger value."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits, ``(M + 1) * log10(2)``."""
        return (self.mantissa_bits + 1) * math.log10(2)

    @property
    def dynamic_range(self) -> float:
        """Decades spanned by the positive finite values, ``log10(max / min_subnormal)``."""
        return math.log10(self.max / self.min_subnormal)

    @property
    def max_bits(self) -> int:
        """The float32 bit pattern of ``max``."""
        return _f32_bits(self.max)

    @property
    def is_float32(self) -> bool:
        """True when the format is float32 itself (rounding is then the identity)."""
        return (self.exponent_bits, self.mantissa_bits, self.bias, self.nan, self.saturate) == (
            8, 23, 127, "ieee", False)


FP32 = FloatFormat("FP32", 8, 23, torch_dtype=torch.float32)
FP16 = FloatFormat("FP16", 5, 10, torch_dtype=torch.float16)
BF16 = FloatFormat("BF16", 8, 7, torch_dtype=torch.bfloat16)
#: OCP FP8 E4M3 (``torch.float8_e4m3fn``): no inf, NaN only at S.1111.111, max 448. Overflow saturates to
#: ±448, as PyTorch's own cast does (the OCP spec's saturating mode).
FP8_E4M3 = FloatFormat("FP8_E4M3", 4, 3, has_inf=False, nan="all_ones", saturate=True,
                       torch_dtype=torch.float8_e4m3fn)
#: OCP FP8 E5M2 (``torch.float8_e5m2``): IEEE-like, with inf and NaN, max 57344.
FP8_E5M2 = FloatFormat("FP8_E5M2", 5, 2, torch_dtype=torch.float8_e5m2)
#: OCP Microscaling (MX) v1.0 element formats: no inf, no NaN, out-of-range values saturate.
FP6_E3M2 = FloatFormat("FP6_E3M2", 3, 2, has_inf=False, nan="none", saturate=True)
FP6_E2M3 = FloatFormat("FP6_E2M3", 2, 3, has_inf=False, nan="none", saturate=True)
FP4_E2M1 = FloatFormat("FP4_E2M1", 2, 1, has_inf=False, nan="none", saturate=True)

ALL: tuple[FloatFormat, ...] = (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1)


# --- helpers ------------------------------------------------------------------------------------------
def _as_float32(x: Tensor | float, fn: str) -> Tensor:
    """float32 view of the input; other float dtypes are converted (exact for fp16/bf16/fp8)."""
    if isinstance(x, Tensor) and x.dtype == torch.float32:
        return x
    if not isinstance(x, Tensor):
        try:
            return torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{fn} expects a floating-point tensor or number, got {x!r} ({err})") from None
    if not torch.is_floating_point(x):
        raise TypeError(f"{fn} expects a floating-point tensor, got dtype {x.dtype}")
    return x.to(torch.float32)


def _pow2(k: Tensor) -> Tensor:
    """``2^k`` as float32, built from its bit pattern (``-149 <= k <= 127``)."""
    bits = torch.where(k >= -126, (k + _F32_BIAS) << _F32_MANT, torch.ones_like(k) << (k + 149).clamp(min=0))
    return bits.to(torch.int32).view(torch.float32)


def _with_sign(magnitude_bits: Tensor, x_bits32: Tensor) -> Tensor:
    """Attach the sign bit of ``x_bits32`` (int32) to nonnegative ``magnitude_bits`` (int64) -> float32."""
    return (magnitude_bits.to(torch.int32) | (x_bits32 & _SIGN)).view(torch.float32)


def _check_format(fmt: object, fn: str) -> FloatFormat:
    if not isinstance(fmt, FloatFormat):
        raise TypeError(
            f"{fn} expects a FloatFormat such as qbook.formats.FP16 (names are not accepted), got {fmt!r}"
        )
    return fmt


def _nan_mask(x: Tensor) -> Tensor | None:
    """Where ``x`` is NaN, or None when it has none (read off one sum: NaN makes it NaN, so may inf - inf)."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return None
    nan = torch.isnan(x)
    return nan if bool(nan.any()) else None


# --- rounding -----------------------------------------------------------------------------------------
def round_to_format(x: Tensor | float, fmt: FloatFormat) -> Tensor:
    """Round float32 values to the nearest value of ``fmt``, ties to even; returns float32 (Chapter 2).

    The same numbers as :func:`round_to_format_reference`, the bit-level algorithm that chapter 2 teaches,
    computed faster: with PyTorch's own cast ``x.to(dtype).float()`` for FP16, BF16 and FP8_E5M2 (equal to
    the reference bit for bit on every float32 input, except that the sign and payload of a NaN output are
    torch's), and for every other format with a few int32 operations on the float32 bit pattern in
    cache-sized chunks (equal to the reference bit for bit, NaN included). For FP16, BF16, FP8_E4M3 and
    FP8_E5M2 the result is torch's cast, bit for bit (NaN payloads aside; FP8_E4M3 with a torch whose cast
    saturates overflow to ±448, as FP8_E4M3 says: older releases gave NaN). ``fmt`` must be a
    :class:`FloatFormat` (a name such as ``"FP16"`` is a ``TypeError``); NaN input is a ``ValueError`` for
    formats without NaN. Inputs in another float dtype are converted to float32 first (so float64 is rounded
    twice); integer tensors raise ``TypeError``.

    >>> round_to_format(torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-11, 70000.0, 1e-8]), FP16)
    tensor([1.0000, 1.0020,    inf, 0.0000])
    >>> round_to_format(torch.tensor([2.4, 2.5, 5.0, 100.0, -0.2]), FP4_E2M1)
    tensor([2., 2., 4., 6., -0.])
    """
    fmt = _check_format(fmt, "round_to_format")
    x = _as_float32(x, "round_to_format")
    if fmt.is_float32:
        return x.clone()
    dtype = _TORCH_CASTS.get(_fields(fmt))
    if dtype is not None:
        return x.to(dtype).to(torch.float32)
    return _round_exact(x, fmt)


def round_to_format_reference(x: Tensor | float, fmt: FloatFormat) -> Tensor:
    """:func:`round_to_format` by the bit-level algorithm of chapter 2 (core: ``_round_to_format_reference``).

    Slower than :func:`round_to_format`, and equal to it bit for bit (NaN outputs: the canonical quiet NaN
    with the input's sign). NaN input is a ``ValueError`` for formats without NaN.

    >>> round_to_format_reference(torch.tensor([0.1, 1000.0]), FP8_E4M3)
    tensor([1.0156e-01, 4.4800e+02])
    """
    fmt = _check_format(fmt, "round_to_format_reference")
    x = _as_float32(x, "round_to_format_reference")
    if fmt.nan == "none" and bool(torch.isnan(x).any()):
        raise ValueError(f"{fmt.name} has no NaN encoding, but the input contains NaN")
    return x.clone() if fmt.is_float32 else _round_to_format_reference(x, fmt)


def _round_to_format_reference(x: Tensor, fmt: FloatFormat) -> Tensor:
    r"""Round float32 ``x`` to the nearest value of ``fmt``, ties to even, by integer arithmetic on its bits.

    A finite ``x`` has the significand ``sig = 1.f`` (as the 24-bit integer ``2^23 + f``; ``f`` alone for
    float32 subnormals) and the exponent ``e_x``, so ``x = sig * 2^(e_x - 23)``. Near ``x`` the values of
    ``fmt`` are spaced

    .. math:: \mathrm{ulp} = 2^{t}, \quad t = \max(e_x, e_{min}) - M          \qquad (2.3)

    so rounding drops ``shift = t - (e_x - 23)`` low bits of ``sig``: keep ``q = sig >> shift`` and add one
    when the dropped bits exceed half of ``2^shift``, or equal it and ``q`` is odd (ties to even). The rounded
    magnitude is ``q * 2^t``; a carry out of the binade moves it to the next exponent. Below ``e_min`` the
    spacing stops shrinking: these are the subnormals. Then, per format: a result above ``max`` becomes
    ±inf (IEEE), NaN (E4M3 without saturation) or ±max (saturating formats); ±inf maps to ±inf, or ±max
    when saturating without inf; NaN stays NaN.
    """
    x32 = x.view(torch.int32)
    mag = x32.to(torch.int64) & 0x7FFFFFFF
    is_nan = mag > _F32_INF
    is_inf = mag == _F32_INF

    field_ = mag >> _F32_MANT  # biased float32 exponent field
    sig = (mag & 0x7FFFFF) | ((field_ > 0).to(torch.int64) << _F32_MANT)  # 1.f as an integer
    e_x = field_.clamp(min=1) - _F32_BIAS  # float32 subnormals share the exponent of the first binade
    t = e_x.clamp(min=fmt.emin) - fmt.mantissa_bits  # (2.3): log2 of the target spacing
    shift = (t - (e_x - _F32_MANT)).clamp(max=25)  # beyond 25 bits sig < half: rounds to 0 anyway
    one = torch.ones_like(shift)
    q = sig >> shift
    rem = sig & ((one << shift) - 1)
    half = (one << shift) >> 1
    round_up = (rem > half) | ((rem == half) & (shift > 0) & ((q & 1) == 1))
    q = q + round_up.to(torch.int64)
    # q * 2^t as float32 bits: within a binade the bit pattern is linear, and one carry crosses into the next.
    base = (field_ - 1).clamp(min=0) << _F32_MANT
    out = torch.where(q == 0, torch.zeros_like(q), base + (q << shift))

    overflow = out > fmt.max_bits
    max_bits = torch.full_like(out, fmt.max_bits)
    if fmt.saturate:
        out = torch.where(overflow, max_bits, out)
    else:
        out = torch.where(overflow, torch.full_like(out, _F32_INF if fmt.has_inf else _F32_QNAN), out)
    inf_to = _F32_INF if fmt.has_inf else (fmt.max_bits if fmt.saturate else _F32_QNAN)
    out = torch.where(is_inf, torch.full_like(out, inf_to), out)
    out = torch.where(is_nan, torch.full_like(out, _F32_QNAN), out)
    return _with_sign(out, x32)


def _fields(fmt: FloatFormat) -> tuple:
    """What defines a format's values (not its name)."""
    return (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.has_inf, fmt.nan, fmt.saturate)


#: Formats whose torch cast is fast and equals the reference. FP8_E4M3's cast is a slow scalar loop on CPU
#: (and saturates only in recent torch releases): it takes the int32 path.
_TORCH_CASTS = {
    _fields(FP16): torch.float16,
    _fields(BF16): torch.bfloat16,
    _fields(FP8_E5M2): torch.float8_e5m2,
}


_CHUNK = 1 << 19  # elements per chunk: few op calls, and three 2 MiB int32 buffers instead of full-size ones


def _round_exact(x: Tensor, fmt: FloatFormat) -> Tensor:
    """The reference rounding, bit for bit and NaN included; int32 arithmetic where the format allows."""
    if fmt.emin - fmt.mantissa_bits + _F32_MANT > 127:  # no float32 constant for the subnormal step below
        nan = _nan_mask(x)
        if nan is not None and fmt.nan == "none":
            raise ValueError(f"{fmt.name} has no NaN encoding, but the input contains NaN")
        return _round_to_format_reference(x, fmt)
    flat = x.reshape(-1).view(torch.int32)
    out = torch.empty(flat.shape, dtype=torch.int32, device=x.device)
    buffers = [torch.empty(min(_CHUNK, flat.numel()), dtype=torch.int32, device=x.device) for _ in range(3)]
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        nan = _nan_mask(part.view(torch.float32))
        if nan is not None and fmt.nan == "none":
            raise ValueError(f"{fmt.name} has no NaN encoding, but the input contains NaN")
        _round_int32(part, fmt, nan, out[start:start + _CHUNK], *(b[: part.numel()] for b in buffers))
    return out.view(torch.float32).reshape(x.shape)


def _round_int32(
    x: Tensor, fmt: FloatFormat, nan: Tensor | None, out: Tensor, mag: Tensor, bits: Tensor, tmp: Tensor
) -> Tensor:
    """Round-to-nearest-even on float32 bit patterns ``x`` (int32) into ``out`` (int32), in int32 buffers.

    Normal results: drop ``s = 23 - M`` mantissa bits by adding ``2^(s-1) - 1`` plus the last kept bit
    and masking (a carry moves into the exponent). Results below ``2^emin`` (subnormals of ``fmt``) are
    spaced ``2^(emin - M)``: adding and subtracting ``C = 2^(emin - M + 23)`` in float32 rounds them to that
    step, ties to even, in hardware. Then overflow, ±inf and NaN as the format says, and the sign of ``x``.
    Selections use masks of all ones (``v >> 31`` of a negative int32) rather than ``torch.where``, a
    branchy loop on CPU.
    """
    M = fmt.mantissa_bits
    s = _F32_MANT - M
    torch.bitwise_and(x, 0x7FFFFFFF, out=mag)  # |x| as bits
    if nan is not None:
        mag.clamp_(max=_F32_INF)  # keep NaN patterns from overflowing below; they are restored at the end
    if s and M:
        torch.bitwise_right_shift(mag, s, out=bits).bitwise_and_(1)  # the last kept mantissa bit
    else:
        bits.fill_(1 if s else 0)  # M = 0: the last kept bit is the implicit 1; s = 0: nothing to drop
    if s:
        bits.add_((1 << (s - 1)) - 1).add_(mag).bitwise_and_(~((1 << s) - 1))
    else:
        bits.add_(mag)
    step = math.ldexp(1.0, fmt.emin - M + _F32_MANT)
    small = torch.add(mag.view(torch.float32), step, out=tmp.view(torch.float32)).sub_(step).view(torch.int32)
    small.bitwise_xor_(bits)  # bits ^ (|x| rounded to the subnormal step)
    torch.sub(mag, _f32_bits(fmt.min_normal), out=out).bitwise_right_shift_(31)  # all ones where |x| < 2^emin
    bits.bitwise_xor_(small.bitwise_and_(out))  # the subnormal result there, the normal one elsewhere
    if fmt.saturate:
        bits.clamp_(max=fmt.max_bits)  # finite overflow and inf saturate
        if fmt.has_inf:
            bits.copy_(torch.where(mag == _F32_INF, _F32_INF, bits))
    else:  # beyond max: inf, or NaN (E4M3-like formats); both patterns exceed every finite one
        overflow = torch.neg(bits, out=tmp).add_(fmt.max_bits).bitwise_right_shift_(31)  # all ones past max
        torch.maximum(bits, overflow.bitwise_and_(_F32_INF if fmt.has_inf else _F32_QNAN), out=bits)
    if nan is not None:
        bits.copy_(torch.where(nan, _F32_QNAN, bits))
    torch.bitwise_and(x, _SIGN, out=out)
    return out.bitwise_or_(bits)


# --- bit fields ---------------------------------------------------------------------------------------
def decompose(x: Tensor | float, fmt: FloatFormat) -> tuple[Tensor, Tensor, Tensor]:
    """The stored fields ``(sign, exponent, mantissa)`` of ``round_to_format(x, fmt)`` (Chapter 2).

    Inverts (2.1)/(2.2): ``exponent`` is the *biased* field ``e`` (0 for zero and subnormals) and ``mantissa``
    the ``M``-bit field ``f``, all as int32 tensors. ±inf gives the all-ones exponent and ``f = 0``; NaN the
    format's canonical NaN (IEEE: top mantissa bit set; E4M3: all ones) with the input's sign, except that
    FP32 keeps the input's NaN payload.

    >>> [int(v) for v in decompose(torch.tensor(-6.5), FP32)]    # -6.5 = -1.625 * 2^2
    [1, 129, 5242880]
    >>> [int(v) for v in decompose(torch.tensor(0.25), FP8_E4M3)]   # 0.25 = 1.0 * 2^(5 - 7)
    [0, 5, 0]
    """
    fmt = _check_format(fmt, "decompose")
    x = _as_float32(x, "decompose")
    return _decompose(x if fmt.is_float32 else _round_exact(x, fmt), fmt)


def _decompose(y: Tensor, fmt: FloatFormat) -> tuple[Tensor, Tensor, Tensor]:
    """Fields ``(sign, exponent, mantissa)`` of float32 values ``y`` of ``fmt``: (2.1)/(2.2) backwards."""
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    bits = y.view(torch.int32).to(torch.int64)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    field_ = mag >> _F32_MANT  # float32's biased exponent
    frac = mag & 0x7FFFFF
    sig = frac | ((field_ > 0).to(torch.int64) << _F32_MANT)  # 1.f as an integer
    e_x = field_.clamp(min=1) - _F32_BIAS
    normal = (field_ > 0) & (e_x >= fmt.emin)
    exponent = torch.where(normal, e_x + fmt.bias, torch.zeros_like(e_x))  # (2.1): e = e_x + bias
    sub_shift = ((fmt.emin - M) - (e_x - _F32_MANT)).clamp(min=0, max=31)  # (2.2): f = |y| / 2^(emin - M)
    mantissa = torch.where(normal, frac >> (_F32_MANT - M), sig >> sub_shift)
    is_inf, is_nan = mag == _F32_INF, mag > _F32_INF
    exponent = torch.where(is_inf | is_nan, torch.full_like(exponent, 2**E - 1), exponent)
    nan_mantissa = frac >> (_F32_MANT - M) if fmt.nan == "ieee" else torch.full_like(frac, 2**M - 1)
    mantissa = torch.where(is_inf, torch.zeros_like(mantissa), mantissa)
    mantissa = torch.where(is_nan, nan_mantissa, mantissa)
    return sign.to(torch.int32), exponent.to(torch.int32), mantissa.to(torch.int32)


_FIELD_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_field(name: str, value: Tensor | int, upper: int) -> Tensor:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= upper:
        raise ValueError(f"{name} field must lie in [0, {upper}], got {value}")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise TypeError(f"{name} must be an integer tensor or int, got {value!r} ({err})") from None
    if t.dtype not in _FIELD_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    t = t.to(torch.int64)
    bad = (t < 0) | (t > upper)
    if bool(bad.any()):
        raise ValueError(f"{name} field must lie in [0, {upper}], got {int(t[bad].flatten()[0])}")
    return t


def compose(sign: Tensor | int, exponent: Tensor | int, mantissa: Tensor | int, fmt: FloatFormat) -> Tensor:
    """The float32 value of the bit fields ``(sign, exponent, mantissa)`` of ``fmt``: (2.1)/(2.2) (Chapter 2).

    Fields broadcast against each other; a field outside ``[0, 2^bits - 1]`` raises ``ValueError``. The
    reserved patterns decode to ±inf and NaN as ``fmt`` defines them.

    >>> compose(0, 127, 0, FP32), compose(1, 129, 2**22 + 2**20, FP32)
    (tensor(1.), tensor(-6.5000))
    >>> compose(0, 15, 6, FP8_E4M3), compose(0, 15, 7, FP8_E4M3)
    (tensor(448.), tensor(nan))
    """
    fmt = _check_format(fmt, "compose")
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    s = _check_field("sign", sign, 1)
    e = _check_field("exponent", exponent, 2**E - 1)
    f = _check_field("mantissa", mantissa, 2**M - 1)
    try:
        s, e, f = torch.broadcast_tensors(s, e, f)
    except RuntimeError:
        shapes = ", ".join(str(tuple(t.shape)) for t in (s, e, f))
        raise ValueError(f"sign, exponent and mantissa must broadcast, got shapes {shapes}") from None
    normal_bits = ((e - fmt.bias + _F32_BIAS).clamp(min=1) << _F32_MANT) | (f << (_F32_MANT - M))
    normal = normal_bits.to(torch.int32).view(torch.float32)
    subnormal = f.to(torch.float32) * _pow2(torch.tensor(fmt.emin - M))  # exact: f < 2^24 times 2^k
    value = torch.where(e == 0, subnormal, normal)
    top = e == 2**E - 1
    special = (_F32_INF | (f << (_F32_MANT - M))).to(torch.int32).view(torch.float32)  # inf; NaN, payload f
    if fmt.nan == "ieee":
        value = torch.where(top, special, value)
    elif fmt.nan == "all_ones":
        value = torch.where(top & (f == 2**M - 1), special, value)
    return torch.where(s == 1, -value, value)


def encode(x: Tensor | float, fmt: FloatFormat) -> Tensor:
    """The ``total_bits``-bit code ``s << (E + M) | e << M | f`` of ``round_to_format(x, fmt)``, as int64.

    >>> hex(int(encode(torch.tensor(1.0), FP32))), hex(int(encode(torch.tensor(-2.0), FP16)))
    ('0x3f800000', '0xc000')
    """
    s, e, f = (t.to(torch.int64) for t in decompose(x, fmt))
    return (s << (fmt.exponent_bits + fmt.mantissa_bits)) | (e << fmt.mantissa_bits) | f


def decode(code: Tensor | int, fmt: FloatFormat) -> Tensor:
    """The float32 value of a ``total_bits``-bit code of ``fmt`` (inverse of :func:`encode`).

    >>> decode(0x3F800000, FP32), decode(0x7E, FP8_E4M3), decode(0b0111, FP4_E2M1)
    (tensor(1.), tensor(448.), tensor(6.))
    """
    fmt = _check_format(fmt, "decode")
    c = _check_field("code", code, 2**fmt.total_bits - 1)
    M = fmt.mantissa_bits
    return compose(c >> (fmt.total_bits - 1), (c >> M) & (2**fmt.exponent_bits - 1), c & (2**M - 1), fmt)


def ulp(x: Tensor | float, fmt: FloatFormat) -> Tensor:
    """Spacing of ``fmt``'s values at ``round_to_format(x, fmt)``: ``2^(max(e, 1) - bias - M)`` (Chapter 2).

    This is the gap from ``|round(x)|`` to the next larger value; NaN for ±inf and NaN. In range,
    ``|x - round(x)| <= ulp(x) / 2``.

    >>> ulp(torch.tensor([1.0, 1000.0, 0.0]), FP16)
    tensor([9.7656e-04, 5.0000e-01, 5.9605e-08])
    """
    fmt = _check_format(fmt, "ulp")
    x = _as_float32(x, "ulp")
    y = x if fmt.is_float32 else _round_exact(x, fmt)
    _, e, _ = _decompose(y, fmt)
    spacing = _pow2(e.to(torch.int64).clamp(min=1) - fmt.bias - fmt.mantissa_bits)
    return torch.where(torch.isfinite(y), spacing, torch.tensor(math.nan))


def finite_values(fmt: FloatFormat) -> Tensor:
    """All finite values of a format of at most 16 bits, ascending, as float32 (+0 and -0 once).

    >>> finite_values(FP4_E2M1).tolist()
    [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    fmt = _check_format(fmt, "finite_values")
    if fmt.total_bits > 16:
        raise ValueError(f"finite_values enumerates formats of <= 16 bits, {fmt.name} has {fmt.total_bits}")
    values = decode(torch.arange(2**fmt.total_bits), fmt)
    values = values[torch.isfinite(values)]
    return torch.unique(values)  # sorted; -0.0 == 0.0 so zero appears once


# --- model size ---------------------------------------------------------------------------------------
def model_size(
    n_params: int | float, bits: int | float, *, group_size: int | None = None, scale_bits: int = 16
) -> int:
    r"""Bytes to store ``n_params`` weights of ``bits`` bits each (Chapters 1 and 2).

    .. math:: \text{bytes} = \lceil n \cdot b / 8 \rceil                                \qquad (1.1)

    With ``group_size = g`` every group of ``g`` weights also stores one scale of ``scale_bits`` bits (default
    an fp16 scale), the real footprint of group-wise INT4:
    ``bytes = ceil((n * b + ceil(n / g) * scale_bits) / 8)``. Computed exactly (no float rounding).

    >>> model_size(13e9, 32), model_size(13e9, 4)
    (52000000000, 6500000000)
    >>> model_size(13e9, 4, group_size=128)    # + one fp16 scale per 128 weights
    6703125000
    """
    exact = {}
    for name, value in (("n_params", n_params), ("bits", bits)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        exact[name] = Fraction(int(value)) if isinstance(value, numbers.Integral) else Fraction(float(value))
    if group_size is not None:
        for name, value in (("group_size", group_size), ("scale_bits", scale_bits)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        group_size, scale_bits = int(group_size), int(scale_bits)
    return _model_size(exact["n_params"], exact["bits"], group_size, scale_bits)


def _model_size(n_params: Fraction, bits: Fraction, group_size: int | None, scale_bits: int) -> int:
    """(1.1) without argument checks, in exact rational arithmetic: weights, plus one scale per group."""
    total_bits = n_params * bits
    if group_size is not None:
        total_bits += math.ceil(n_params / group_size) * scale_bits
    return math.ceil(total_bits / 8)
