"""Affine integer quantization for 1..8 bits: x ~= (q - zero) * scale.

Three mappings, named by how the zero point is chosen:

- ``symmetric``: zero = 0, codes in [-(2^(b-1)), 2^(b-1) - 1], scale = amax / (2^(b-1) - 1).
  The most negative code is reachable only by rounding; this keeps +/-amax exact.
- ``asymmetric`` with an integer zero: codes in [0, 2^b - 1]; the range is widened to
  include 0 so that 0.0 is exactly representable (padding, ReLU outputs).
- ``asymmetric`` with a float zero (HQQ, GGUF Q4_1 style): codes in [0, 2^b - 1]; the
  range is exactly [min, max] of the block, zero = -min / scale need not be an integer.

Scales and zeros are computed in float32, cast to `param_dtype`, and quantization uses the
cast values, so quantize(dequantize(q)) == q exactly and every consumer (QAT, kernels,
export) sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.blocks import apply_blockwise, block_amax, block_min_max

MAPPINGS = ("symmetric", "asymmetric")
ZERO_KINDS = ("int", "float")


@dataclass(frozen=True)
class AffineSpec:
    """What a quantizer needs besides the data: bit width and how the zero is chosen."""

    bits: int
    mapping: str = "symmetric"
    zero: str = "int"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        if self.zero not in ZERO_KINDS:
            raise ValueError(f"zero must be one of {ZERO_KINDS}, got {self.zero!r}")
        if self.mapping == "symmetric" and self.bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits; use asymmetric")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def symmetric(self) -> bool:
        return self.mapping == "symmetric"


def _safe_scale(scale: torch.Tensor, param_dtype: torch.dtype) -> torch.Tensor:
    """Replace zero (all-zero block) scales by the smallest normal number: no 0/0 = NaN."""
    tiny = torch.finfo(param_dtype).tiny
    return scale.clamp(min=tiny).to(param_dtype)


def choose_qparams(
    x: torch.Tensor,
    spec: AffineSpec,
    block_size: tuple[int, ...],
    param_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero, None for symmetric) per block, shape (s0/b0, s1/b1, ...)."""
    param_dtype = param_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    if spec.symmetric:
        scale = _safe_scale(block_amax(x, block_size) / spec.qmax, param_dtype)
        return scale, None
    lo, hi = block_min_max(x, block_size)
    levels = spec.qmax - spec.qmin
    if spec.zero == "int":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = _safe_scale((hi - lo) / levels, param_dtype)
        zero = (spec.qmin - torch.round(lo / scale.float())).clamp(spec.qmin, spec.qmax)
        return scale, zero.to(param_dtype)
    raw = (hi - lo) / levels
    # A constant block (hi == lo) gets scale |value| and zero -sign(value): code 0 is exact.
    scale = _safe_scale(torch.where(raw > 0, raw, hi.abs()), param_dtype)
    zero = -lo / scale.float()
    return scale, zero.to(param_dtype)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: AffineSpec,
    block_size: tuple[int, ...],
) -> torch.Tensor:
    """Integer codes (int16, to hold any 1..8-bit range) in [spec.qmin, spec.qmax]."""

    def encode(xb, s, z):
        q = xb.float() / s.float()
        if z is not None:
            q = q + z.float()
        return torch.round(q).clamp(spec.qmin, spec.qmax)

    return apply_blockwise(x, block_size, encode, scale, zero).to(torch.int16)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    block_size: tuple[int, ...],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    def decode(qb, s, z):
        v = qb.float()
        if z is not None:
            v = v - z.float()
        return v * s.float()

    return apply_blockwise(q, block_size, decode, scale, zero).to(out_dtype)


def fake_quantize(
    x: torch.Tensor, spec: AffineSpec, block_size: tuple[int, ...]
) -> torch.Tensor:
    """quantize -> dequantize with fresh qparams, in x's dtype (the QAT and emulation path)."""
    scale, zero = choose_qparams(x, spec, block_size)
    return dequantize(quantize(x, scale, zero, spec, block_size), scale, zero, block_size, x.dtype)
