"""OCP Microscaling (MX v1.0) and NVFP4: element codecs, block scales and packing.

An MX block is 32 consecutive elements along the last dim sharing one E8M0 scale (a bare
power of two, code = exponent + 127, 0xFF = NaN). Elements are tiny floats: FP8 E4M3/E5M2,
FP6 E2M3/E3M2, FP4 E2M1. NVFP4 is E2M1 elements in blocks of 16 with an E4M3 scale per block
and one float32 scale per tensor.

Codes are uint8 holding the element's bits right-aligned (sign at bit ebits + mbits). Encoding
rounds to nearest, ties to even, and saturates to +/-max (the spec's "clamp normal numbers");
only FP8 has NaN (and E5M2 Inf) codes. Everything is computed exactly: element codes come from
integer arithmetic on the input's bits (`_magnitude_codes`), block exponents from frexp, and
dividing by a power of two never rounds.

Scale choice (spec section 6.3, "floor"): shared_exp = floor(log2(amax)) - emax_elem, where
emax_elem is the exponent of the element type's largest normal; values of up to 2x the element
max then saturate. "rceil" (the variant NVIDIA's MXFP8 recipe uses) takes the smallest power of
two with amax / scale <= max, so nothing saturates. An all-zero block gets the smallest scale
(code 0); a block holding NaN or Inf gets the NaN scale, which decodes the whole block to NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.formats.packing import pack_bits, unpack_bits

MX_BLOCK = 32
NVFP4_BLOCK = 16
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_MODES = ("floor", "rceil")


@dataclass(frozen=True)
class ElemFormat:
    """A small IEEE-like float: sign, `ebits` exponent bits, `mbits` mantissa bits, `bias`.

    `special` says what the top codes mean: "none" (all codes finite: FP6, FP4),
    "nan_max" (only S.1111.111 is NaN: E4M3) or "ieee" (top exponent is Inf/NaN: E5M2).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    special: str

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share it)."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        top = (1 << (self.ebits + self.mbits)) - 1
        if self.special == "nan_max":
            return top - 1
        if self.special == "ieee":
            return top - (1 << self.mbits)
        return top

    @property
    def emax(self) -> int:
        """Exponent of the largest normal (the spec's emax_elem)."""
        return (self.max_code >> self.mbits) - self.bias

    @property
    def max(self) -> float:
        frac = self.max_code & ((1 << self.mbits) - 1)
        return (1 + frac / 2**self.mbits) * 2.0**self.emax


E4M3 = ElemFormat("e4m3", 4, 3, 7, "nan_max")
E5M2 = ElemFormat("e5m2", 5, 2, 15, "ieee")
E2M3 = ElemFormat("e2m3", 2, 3, 1, "none")
E3M2 = ElemFormat("e3m2", 3, 2, 3, "none")
E2M1 = ElemFormat("e2m1", 2, 1, 1, "none")
ELEM_FORMATS = {f.name: f for f in (E4M3, E5M2, E2M3, E3M2, E2M1)}
# The names MX configs use for each element type.
MX_ELEMENTS = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2, "fp6_e2m3": E2M3, "fp6_e3m2": E3M2,
               "fp4_e2m1": E2M1}


def elem_format(name: str | ElemFormat) -> ElemFormat:
    if isinstance(name, ElemFormat):
        return name
    fmt = MX_ELEMENTS.get(name) or ELEM_FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"element type must be one of {sorted(MX_ELEMENTS)}, got {name!r}")
    return fmt


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed exactly in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2.0^e for integer e in the normal range of `dtype`, built from the exponent bits (exact
    on every device, unlike pow/exp2 implementations)."""
    e = e.to(torch.int64)
    if dtype == torch.float64:
        return ((e.clamp(-1022, 1023) + 1023) << 52).view(torch.float64)
    return ((e.clamp(-126, 127) + 127).to(torch.int32) << 23).view(torch.float32)


# ---- elements --------------------------------------------------------------------------------


@functools.cache
def _code_table(fmt: ElemFormat) -> torch.Tensor:
    """float32 value of every code 0 .. 2^bits - 1."""
    values = []
    for code in range(1 << fmt.bits):
        sign = -1.0 if code >> (fmt.ebits + fmt.mbits) else 1.0
        mag = code & ((1 << (fmt.ebits + fmt.mbits)) - 1)
        e, m = mag >> fmt.mbits, mag & ((1 << fmt.mbits) - 1)
        if mag > fmt.max_code:
            top_nan = fmt.special == "nan_max" or m != 0
            values.append(float("nan") if top_nan else sign * float("inf"))
        elif e == 0:
            values.append(sign * m * 2.0 ** (fmt.emin - fmt.mbits))
        else:
            values.append(sign * (1 + m / 2**fmt.mbits) * 2.0 ** (e - fmt.bias))
    return torch.tensor(values, dtype=torch.float32)


@functools.cache
def _device_table(fmt: ElemFormat, device: torch.device) -> torch.Tensor:
    """The code table, copied to each device once (no host-to-device copy per call, so decode
    can be captured in CUDA graphs)."""
    return _code_table(fmt).to(device)


def decode_elements(codes: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """uint8 codes -> float32 values (a table lookup: every code has one value; index_select
    is far faster than fancy indexing on CPUs)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"element codes must be uint8, got {codes.dtype}")
    table = _device_table(fmt, codes.device)
    return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


# The rounding below is integer arithmetic on the float's bits. Selects are masks (all ones
# or zeros, from an arithmetic shift of a difference), not torch.where, which is several times
# slower on CPUs; updates are in place, as fresh full-size buffers cost more than the
# arithmetic there.


def _bits_layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int, int]:
    """(integer dtype of the same width, its top bit, mantissa bits, exponent bias)."""
    if dtype == torch.float64:
        return torch.int64, 63, 52, 1023
    return torch.int32, 31, 23, 127


def _magnitude_codes(mag_bits: torch.Tensor, dtype: torch.dtype, fmt: ElemFormat
                     ) -> torch.Tensor:
    """Magnitude codes of |v| (given as its bits) rounded to nearest, ties to even, saturated
    at the largest finite code (Inf included; NaN gives max too, callers replace it).

    Below 2^emin the grid is one quantum q = 2^(emin - mbits): adding 2^mant * q (its ulp is q)
    makes the float adder round |v| / q to an integer, ties to even, which then sits in the
    sum's low bits ("linear"). From 2^emin up, rounding |v|'s own mantissa to mbits bits on
    the integer (ties to the even result; a carry rolls into the exponent, the next binade)
    and rebasing the exponent gives the code ("normal"). |v| below 2^emin is lifted to 2^emin
    first, whose code 2^mbits bounds the linear code there; above it the linear code is never
    smaller (the grid is never finer than q). So min(linear, normal) is the code everywhere.
    """
    int_dtype, _, mant, bias = _bits_layout(dtype)
    magic_exp = fmt.emin - fmt.mbits + mant
    linear = (mag_bits.view(dtype) + 2.0**magic_exp).view(int_dtype)
    linear -= (magic_exp + bias) << mant
    shift = mant - fmt.mbits
    normal = mag_bits.clamp(min=(fmt.emin + bias) << mant)
    odd = (normal >> shift).bitwise_and_(1)
    normal += (1 << (shift - 1)) - 1 - ((bias - fmt.bias) << mant)  # < 0 first: no overflow
    normal += odd
    normal >>= shift
    return torch.minimum(linear, normal, out=normal).clamp_(max=fmt.max_code)


def _from_bits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """v in its work dtype -> (its bits, |v|'s bits, top bit, the bits of +Inf)."""
    int_dtype, top_bit, mant, _ = _bits_layout(v.dtype)
    bits = v.view(int_dtype)
    inf_bits = ((1 << (top_bit - mant)) - 1) << mant
    return bits, bits & ((1 << top_bit) - 1), top_bit, inf_bits


def round_to_elements(v: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """Round (already scaled) values to the nearest element value, ties to even, saturating.

    NaN stays NaN; +/-Inf becomes Inf for E5M2 and saturates to +/-max otherwise. Values
    are rebuilt from the codes `encode_elements` picks: subnormal ones as code * q, normal
    ones from their bit fields.
    """
    v = v.to(_work_dtype(v))
    bits, mag_bits, top_bit, inf_bits = _from_bits(v)
    int_dtype, _, mant, bias = _bits_layout(v.dtype)
    code = _magnitude_codes(mag_bits, v.dtype, fmt)
    normal = torch.sub(code, 1 << fmt.mbits).bitwise_right_shift_(top_bit).bitwise_not_()
    out = code.to(v.dtype).mul_(2.0 ** (fmt.emin - fmt.mbits)).view(int_dtype)  # code * q
    code <<= mant - fmt.mbits  # normal codes: move the fields into place, rebase the exponent
    code += (bias - fmt.bias) << mant
    out ^= code.bitwise_xor_(out).bitwise_and_(normal)  # select code where normal
    # Inputs that stay themselves (up to sign): NaN, and for E5M2 Inf too.
    keep_from = inf_bits if fmt.special == "ieee" else inf_bits + 1
    keep = torch.sub(keep_from - 1, mag_bits).bitwise_right_shift_(top_bit)
    out ^= mag_bits.bitwise_xor_(out).bitwise_and_(keep)  # select |v| where keep
    out |= bits & ~((1 << top_bit) - 1)  # the sign
    return out.view(v.dtype)


def encode_elements(v: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """Values -> uint8 codes: round to nearest even, saturating (see `round_to_elements`).

    NaN gets the format's NaN code (all ones, no sign), or 0 for formats without one (the
    block's NaN scale carries it). -0.0 keeps its sign bit.
    """
    v = v.to(_work_dtype(v))
    bits, mag_bits, top_bit, inf_bits = _from_bits(v)
    code = _magnitude_codes(mag_bits, v.dtype, fmt)
    if fmt.special == "ieee":  # Inf (and NaN, replaced below) -> the Inf code, max + 1
        code -= (inf_bits - 1 - mag_bits) >> top_bit
    sign_pos = fmt.ebits + fmt.mbits
    code |= (bits >> (top_bit - sign_pos)).bitwise_and_(1 << sign_pos)
    is_nan = mag_bits.neg_().add_(inf_bits).bitwise_right_shift_(top_bit)  # all ones at NaN
    nan_code = 0 if fmt.special == "none" else (1 << sign_pos) - 1  # FP8: all ones, no sign
    code ^= (code ^ nan_code).bitwise_and_(is_nan)
    return code.to(torch.uint8)


# ---- E8M0 scales -----------------------------------------------------------------------------


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8, or torch.float8_e8m0fnu) -> float32 2^(code - 127); 0xFF -> NaN.

    Built from the bits (code << 23; code 0 is the subnormal 2^-127), so it is exact.
    """
    if codes.dtype != torch.uint8:
        if str(codes.dtype) != "torch.float8_e8m0fnu":
            raise TypeError(f"E8M0 scales must be uint8 or float8_e8m0fnu, got {codes.dtype}")
        codes = codes.view(torch.uint8)
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 1 << 22), c << 23)
    return torch.where(c == E8M0_NAN, torch.nan, bits.view(torch.float32))


def as_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """View uint8 codes as torch.float8_e8m0fnu where this torch has it (else unchanged)."""
    dtype = getattr(torch, "float8_e8m0fnu", None)
    return codes.view(dtype) if dtype is not None else codes


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(a)) for finite a > 0 (subnormals included), as int32."""
    return torch.frexp(a)[1] - 1


def choose_e8m0_scale(amax: torch.Tensor, fmt: ElemFormat, mode: str = "floor") -> torch.Tensor:
    """Block max |x| -> E8M0 scale codes (uint8), per the module docstring."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    # float64: max * 2^exp below stays exact even where it underflows float32.
    amax = amax.to(torch.float64)
    pos = amax > 0
    safe = torch.where(pos & amax.isfinite(), amax, torch.ones_like(amax))
    exp = _floor_log2(safe) - fmt.emax
    if mode == "rceil":
        # Smallest e with max * 2^e >= amax: floor's exponent, or one more (products exact).
        fits = fmt.max * _pow2(exp, torch.float64) >= safe
        exp = torch.where(fits, exp, exp + 1)
    code = (exp + E8M0_BIAS).clamp(0, 254)
    code = torch.where(pos, code, torch.zeros_like(code))
    code = torch.where(amax.isfinite(), code, torch.full_like(code, E8M0_NAN))
    return code.to(torch.uint8)


# ---- blocks ----------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(
            f"last dim of shape {tuple(x.shape)} must be a multiple of the block size {block}"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _block_amax(xb: torch.Tensor) -> torch.Tensor:
    """max |x| per block; NaN if the block holds a NaN (torch's max reductions propagate it)."""
    return xb.abs().amax(-1)


def mx_quantize(
    x: torch.Tensor, elem: str | ElemFormat, mode: str = "floor", block: int = MX_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (element codes uint8 [..., K], E8M0 scale codes uint8 [..., K / block])."""
    fmt = elem_format(elem)
    xb = _blocks(x.to(_work_dtype(x)), block)
    scale = choose_e8m0_scale(_block_amax(xb), fmt, mode)
    s = e8m0_to_float(scale).to(xb.dtype)
    s = torch.where(s.isnan(), torch.ones_like(s), s)  # NaN blocks: the scale says it all
    codes = encode_elements(xb / s[..., None], fmt)
    return codes.reshape(x.shape), scale


def mx_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, elem: str | ElemFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `mx_quantize`: value * 2^(scale - 127); a NaN scale makes its block NaN."""
    fmt = elem_format(elem)
    block = codes.shape[-1] // scale.shape[-1]
    v = _blocks(decode_elements(codes, fmt), block) * e8m0_to_float(scale)[..., None]
    return v.reshape(codes.shape).to(dtype)


def mx_fake_quantize(x: torch.Tensor, elem: str | ElemFormat, mode: str = "floor") -> torch.Tensor:
    """x rounded to MX and back, in x's dtype (the emulation training and activations use).

    Equals mx_dequantize(*mx_quantize(x)) without storing codes: rounding on the scaled grid,
    then rescaling, is what encode + decode compute."""
    fmt = elem_format(elem)
    xb = _blocks(x.to(_work_dtype(x)), MX_BLOCK)
    s = e8m0_to_float(choose_e8m0_scale(_block_amax(xb), fmt, mode)).to(xb.dtype)[..., None]
    safe = torch.where(s.isnan(), torch.ones_like(s), s)
    return round_to_elements(xb / safe, fmt).mul_(s).reshape(x.shape).to(x.dtype)


# ---- NVFP4 -----------------------------------------------------------------------------------

NVFP4_SCALE_MAX = E4M3.max * E2M1.max  # 448 * 6: the largest value a block can represent


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """float32 per-tensor scale: amax / (448 * 6), so the largest block scale is E4M3's max.

    An all-zero tensor gets 1.0 (any positive value decodes it to zeros)."""
    amax = x.detach().abs().amax().float()
    if not bool(torch.isfinite(amax)):
        raise ValueError("NVFP4 needs a finite tensor (found NaN or Inf)")
    return torch.where(amax > 0, amax / NVFP4_SCALE_MAX, torch.ones_like(amax)).reshape(1)


def nvfp4_quantize(
    x: torch.Tensor, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E2M1 codes uint8 [..., K], E4M3 block scales [..., K / 16] as
    float8_e4m3fn, float32 tensor scale [1]).

    block scale = e4m3(amax_block / 6 / tensor_scale) (nearest-even, saturating); elements =
    e2m1(x / (block scale * tensor_scale)). A block whose scale rounds to 0 stores zeros.
    """
    ts = nvfp4_tensor_scale(x) if tensor_scale is None else tensor_scale.float().reshape(1)
    xb = _blocks(x.float(), NVFP4_BLOCK)
    raw = xb.abs().amax(-1) / E2M1.max / ts
    block_scale = round_to_elements(raw, E4M3)
    denom = block_scale * ts
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    scaled = torch.where(denom[..., None] > 0, xb / safe[..., None], torch.zeros_like(xb))
    codes = encode_elements(scaled, E2M1).reshape(x.shape)
    return codes, block_scale.to(torch.float8_e4m3fn), ts


def nvfp4_dequantize(
    codes: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    v = _blocks(decode_elements(codes, E2M1), NVFP4_BLOCK)
    s = block_scale.float()[..., None] * tensor_scale.float()
    return (v * s).reshape(codes.shape).to(dtype)


def nvfp4_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    codes, bs, ts = nvfp4_quantize(x)
    return nvfp4_dequantize(codes, bs, ts, x.dtype)


# ---- packing ---------------------------------------------------------------------------------


def pack_elements(codes: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """FP4: two codes per byte, low nibble first; FP6: four codes in three bytes (bit stream,
    little-endian: code i at bits 6i..6i+5); FP8: one byte each."""
    return pack_bits(codes, fmt.bits)


def unpack_elements(packed: torch.Tensor, fmt: ElemFormat, n: int | None = None) -> torch.Tensor:
    return unpack_bits(packed, fmt.bits, n)


def as_float4_x2(packed: torch.Tensor) -> torch.Tensor:
    """View packed FP4 bytes as torch.float4_e2m1fn_x2 where this torch has it."""
    dtype = getattr(torch, "float4_e2m1fn_x2", None)
    return packed.view(dtype) if dtype is not None else packed
