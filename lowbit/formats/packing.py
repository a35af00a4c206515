"""Sub-byte packing of unsigned integer codes along the last dimension.

Layout (little-endian bit stream): value i of a row starts at bit i * bits. For 4 bits this
is byte j = v[2j] | v[2j+1] << 4 (low nibble first), the layout the int4 kernels read; for
1 and 2 bits it is 8 or 4 values per byte; for 3, 5, 6 and 7 bits every 8 values fill
`bits` bytes.
"""

from __future__ import annotations

import torch


def values_per_pack(bits: int) -> int:
    """How many values make a whole number of bytes."""
    return 8 // bits if 8 % bits == 0 else 8


def packed_size(n: int, bits: int) -> int:
    return n * bits // 8


def check_packable(n: int, bits: int) -> str | None:
    if not 1 <= bits <= 8:
        return f"bits must be in 1..8, got {bits}"
    per = values_per_pack(bits)
    if n % per:
        return f"last dim {n} must be a multiple of {per} to pack {bits}-bit values"
    return None


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) with last dim n -> uint8 with last dim n * bits / 8."""
    reason = check_packable(codes.shape[-1], bits)
    if reason:
        raise ValueError(reason)
    if bits == 8:
        return codes.to(torch.uint8)
    per = values_per_pack(bits)
    lead = codes.shape[:-1]
    v = codes.to(torch.int32).reshape(*lead, -1, per)
    if 8 % bits == 0:
        shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
        return (v << shifts).sum(-1).to(torch.uint8).reshape(*lead, -1)
    # 8 values of `bits` bits fill one 8 * bits <= 56-bit word: build it, then cut it into
    # bytes (a few whole-tensor ops instead of one per bit).
    word = (v.to(torch.int64) << _shifts(8, bits, codes.device)).sum(-1, keepdim=True)
    out = (word >> _shifts(bits, 8, codes.device)) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 codes with last dim n (default: all that fit)."""
    if bits == 8:
        return packed.to(torch.uint8)
    lead = packed.shape[:-1]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = values_per_pack(bits)
        shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
        out = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, -1)
    else:
        bytes_ = p.to(torch.int64).reshape(*lead, -1, bits)
        word = (bytes_ << _shifts(bits, 8, packed.device)).sum(-1, keepdim=True)
        out = ((word >> _shifts(8, bits, packed.device)) & ((1 << bits) - 1)).reshape(*lead, -1)
    out = out.to(torch.uint8)
    return out if n is None else out[..., :n]


def _shifts(count: int, step: int, device: torch.device) -> torch.Tensor:
    """int64 [0, step, 2 * step, ...] (count of them): bit offsets within a packed word."""
    return torch.arange(count, device=device, dtype=torch.int64) * step
