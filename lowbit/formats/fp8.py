"""Float8 scaling (e4m3 / e5m2): amax-based scales, optional power-of-2 scales, saturating casts.

x ~= fp8(x / scale) * scale. Scales are float32. A power-of-2 scale is rounded *up* so that
x / scale never exceeds the format's max, and it makes the rescale exact in any precision.
"""

from __future__ import annotations

import torch

from lowbit.formats.blocks import apply_blockwise, block_amax

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# Keeps all-zero blocks from producing a zero scale (and 0/0 = NaN on decode).
MIN_SCALE = 1e-12


def fp8_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in FP8_DTYPES.values():
            raise ValueError(f"{name} is not a supported float8 dtype")
        return name
    if name not in FP8_DTYPES:
        raise ValueError(f"float8 format must be one of {sorted(FP8_DTYPES)}, got {name!r}")
    return FP8_DTYPES[name]


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def choose_fp8_scale(
    x: torch.Tensor, block_size: tuple[int, ...], dtype: torch.dtype, power_of_2: bool = False
) -> torch.Tensor:
    return fp8_scale_from_amax(block_amax(x, block_size), dtype, power_of_2)


def fp8_scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, power_of_2: bool = False
                        ) -> torch.Tensor:
    """The scale of a block whose absolute max is `amax` (float32; e.g. reduced across
    processes, as FSDP's fp8 all-gather does)."""
    scale = (amax / fp8_max(dtype)).clamp(min=MIN_SCALE)
    if power_of_2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to fp8 clamping to +/-max (a plain cast would give NaN/Inf); NaN stays NaN."""
    m = fp8_max(dtype)
    return x.clamp(-m, m).to(dtype)


def quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    return apply_blockwise(
        x, block_size, lambda xb, s: saturating_cast(xb.float() / s, dtype), scale
    )


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, ...],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return apply_blockwise(q, block_size, lambda qb, s: qb.float() * s, scale).to(out_dtype)
