"""Block-wise codecs for optimizer states: what each stored byte means.

Every state is flattened, padded with zeros to a whole number of blocks and viewed as
`[n_blocks, block]`; each block keeps one float32 scale (its absmax), and each element a code.

Code books (values in [-1, 1] or (0, 1], sorted ascending so `bucketize` rounds to nearest):

- **dynamic, signed** (first moment, 8 bits): 0 and +-magnitudes spread over decades,
  half the magnitudes in [0.1, 1], a quarter in [0.01, 0.1], and so on (Dettmers' dynamic
  tree idea: many levels near the block max where Adam's large moments live, few but still
  some down to 1e-7 of the max). Built by `decade_magnitudes`; with `2^b` codes it has
  `2^(b-1)` positive and `2^(b-1) - 1` negative magnitudes and one zero.
- **normal quantiles, signed** (first moment, 4 bits): 0 and +-7 levels at Gaussian
  quantiles (one of the 16 codes is unused, keeping the book symmetric). On blocks of 128
  Gaussian, Laplace and Student-t(3) values it gives 19.2 / 18.4 / 16.7 dB SQNR against
  15.8 / 14.6 / 13.9 dB for the 4-bit dynamic code and 18.6 / 15.9 / 13.0 dB for linear.
- **dynamic, unsigned, no zero** (second moment, 8 bits): the same decades down to 1e-9 of
  the block max, with no zero. A second moment that decodes to 0 makes `m / (sqrt(v) + eps)`
  explode; rounding tiny values *up* to the smallest code only shrinks their step.
- **linear, unsigned, no zero** (second moment, 4 bits): `(k + 1) / 16`, k = 0..15. With only
  16 levels the decade code cannot cover v's range anyway; Li et al. (2023, "Memory efficient
  optimizers with 4-bit states") found excluding zero is what matters, and linear levels keep
  the large v (which set most steps) accurate.
- **fp8 e4m3** (both moments of AdamWFp8): `x / scale` cast to e4m3 with scale = absmax / 448.
  The second moment is clamped to e4m3's smallest subnormal (2^-9) before the cast, again
  so that it never decodes to 0.

Block sizes: 256 for 8-bit and fp8 (4 bytes of scale per 256 values = 0.016 byte/value),
128 for 4-bit (0.031 byte/value; finer blocks matter more when there are only 16 levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
# Keeps an all-zero block's scale positive, so decoding never divides 0 by 0.
MIN_SCALE = 1e-30


def decade_magnitudes(n: int) -> list[float]:
    """n positive magnitudes in (0, 1], 1.0 included: ceil(n/2) linear steps in (0.1, 1],
    ceil(rest/2) in (0.01, 0.1], ... until n are placed."""
    out: list[float] = []
    remaining, decade = n, 0
    while remaining:
        k = (remaining + 1) // 2
        top = 10.0**-decade
        out += [top * (0.1 + 0.9 * j / k) for j in range(1, k + 1)]
        remaining -= k
        decade += 1
    return sorted(out)


@dataclass(frozen=True)
class StateCodec:
    """How one moment is stored: `kind` is "codebook" or "fp8"; `bits` per code; `block`
    values per scale; `book` the sorted code values (codebook kinds only)."""

    name: str
    kind: str
    bits: int
    block: int
    book: tuple[float, ...] = ()
    positive: bool = False
    lut_bits: int = 0  # mantissa bits of `nearest_code`'s table (set by `_codebook`)
    lut_first_cell: int = 0  # smaller magnitudes share this cell (set by `_codebook`)

    def book_tensor(self, device: torch.device | str) -> torch.Tensor:
        return torch.tensor(self.book, dtype=torch.float32, device=device)

    def code_bytes(self, n_blocks: int) -> int:
        return n_blocks * self.block * self.bits // 8


def _normal_quantiles(k: int) -> tuple[float, ...]:
    """0 and +-k levels at standard-normal quantiles p = 1/2 + 0.485 j / k (j = 1..k), scaled
    so the largest is 1: equal probability mass between levels for Gaussian-like blocks, and
    the outermost level still near a block's absmax."""
    levels = [NormalDist().inv_cdf(0.5 + 0.485 * j / k) for j in range(1, k + 1)]
    pos = [v / levels[-1] for v in levels]
    return tuple([-v for v in reversed(pos)] + [0.0] + pos)


def _signed_dynamic(bits: int) -> tuple[float, ...]:
    half = 2 ** (bits - 1)
    pos = decade_magnitudes(half)
    neg = [-v for v in reversed(decade_magnitudes(half - 1))]
    return tuple(neg + [0.0] + pos)


def table_tensor(codec: StateCodec, device: torch.device | str) -> torch.Tensor:
    return _cell_table(codec.book, codec.lut_bits, codec.lut_first_cell).to(device)


def _cells(bits: int) -> torch.Tensor:
    """Lower edges of the magnitude cells: every float32 in [0, 2) with its mantissa cut to
    `bits` bits (cell c = exponent * 2^bits + top mantissa bits)."""
    c = torch.arange(128 << bits, dtype=torch.int64)
    return (c << (23 - bits)).to(torch.int32).view(torch.float32)


def _cell_table(book: tuple[float, ...], bits: int, first: int = 0) -> torch.Tensor | None:
    """float32 [2, 2 * cells]: per (sign, cell) row 0 = how many midpoints lie below the cell,
    row 1 = the one midpoint inside it (+inf if none). None if a cell holds two midpoints.
    Cells below `first` are left out: `nearest_code` maps their values to cell `first`."""
    mids = (lambda b: (b[1:] + b[:-1]) * 0.5)(torch.tensor(book, dtype=torch.float32))
    low = _cells(bits)[first:]
    high = torch.cat([low[1:], low.new_tensor([2.0])])
    base, mid = [], []
    # Positive cells are [low, high), negative ones (-high, -low]: count the midpoints below
    # (strictly, resp. at or below -high) and find the one inside, if any.
    for below, top, right in ((low, high, False), (-high, -low, True)):
        n_below = torch.bucketize(below, mids, right=right)
        n_upto = torch.bucketize(top, mids, right=not right)
        if (n_upto - n_below).max() > 1:
            return None
        inside = mids[n_below.clamp(max=len(mids) - 1)]
        base.append(n_below.float())
        mid.append(torch.where(n_upto > n_below, inside, torch.inf))
    return torch.stack([torch.cat(base), torch.cat(mid)])


def first_cell(book: tuple[float, ...], bits: int) -> int:
    """The first cell of the binade two below the smallest |midpoint|: no midpoint lies
    between 0 and it, so every smaller magnitude can share it. Dropping the cells below keeps
    the table small enough for a GPU's L1 cache (the 8-bit books reach down to 1e-9 only)."""
    mids = (lambda b: (b[1:] + b[:-1]) * 0.5)(torch.tensor(book, dtype=torch.float64))
    smallest = mids.abs().min().item()
    exponent = max(0, math.floor(math.log2(smallest)) + 127 - 2)  # biased float32 exponent
    return exponent << bits


def lookup_table(codec: StateCodec) -> tuple[int, torch.Tensor]:
    """(mantissa bits, cell table) for a code book: the fewest bits (the smallest table)
    whose cells each hold at most one midpoint."""
    for bits in range(4, 13):
        table = _cell_table(codec.book, bits, first_cell(codec.book, bits))
        if table is not None:
            return bits, table
    raise ValueError(f"code book {codec.name} has midpoints closer than 2^-12 relative")


def nearest_code(y: torch.Tensor, codec: StateCodec, table: torch.Tensor) -> torch.Tensor:
    """Index of the code nearest y in [-1, 1] (float32 holding an integer), the same as
    `bucketize(y, midpoints)`.

    bucketize is a per-element binary search, slow on CPU (~100 ns per value). Instead the
    float's sign, exponent and top mantissa bits pick a cell; the table says how many
    midpoints lie below the cell and which single one lies inside it. Two gathers and one
    comparison, all elementwise, so it also fuses under compile."""
    bits, first = codec.lut_bits, codec.lut_first_cell
    ncell = (128 << bits) - first
    raw = y.view(torch.int32)
    cell = ((raw & 0x7FFFFFFF) >> (23 - bits)).clamp(first, (128 << bits) - 1) - first
    cell = (cell + (raw < 0).int() * ncell).long()
    return table[0].take(cell) + (y > table[1].take(cell)).float()


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten, zero-pad to whole blocks, view as [n_blocks, block] (float32)."""
    flat = x.reshape(-1).float()
    pad = n_blocks(flat.numel(), block) * block - flat.numel()
    return F.pad(flat, (0, pad)).view(-1, block)


def encode(
    xb: torch.Tensor, codec: StateCodec, book: torch.Tensor | None, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_blocks, block] float32 -> (codes, scale [n_blocks, 1] float32).

    Values are scaled by the reciprocal of the block's scale (one division per block, as the
    fused kernel does). Codes: uint8 (two 4-bit codes per byte, low nibble first) or
    float8_e4m3fn. A `positive`
    codec (second moments) never decodes to zero: fp8 clamps to its smallest subnormal, the
    code books have no zero."""
    scale = xb.abs().amax(dim=1, keepdim=True)
    if codec.kind == "fp8":
        scale = (scale / E4M3_MAX).clamp(min=MIN_SCALE)
        y = xb * (1 / scale)
        lo = E4M3_MIN_SUBNORMAL if codec.positive else -E4M3_MAX
        y = y.clamp(lo, E4M3_MAX)
        return y.to(torch.float8_e4m3fn), scale
    scale = scale.clamp(min=MIN_SCALE)
    idx = nearest_code(xb * (1 / scale), codec, table).to(torch.uint8)
    if codec.bits == 4:
        idx = idx[:, 0::2] | (idx[:, 1::2] << 4)
    return idx, scale


def decode(
    codes: torch.Tensor, scale: torch.Tensor, codec: StateCodec, book: torch.Tensor | None
) -> torch.Tensor:
    """Inverse of `encode`: [n_blocks, block] float32."""
    if codec.kind == "fp8":
        return codes.float() * scale
    if codec.bits == 4:
        lo, hi = codes & 0xF, codes >> 4
        codes = torch.stack((lo, hi), dim=-1).view(codes.shape[0], -1)
    return book.take(codes.long()) * scale


def _codebook(
    name: str, bits: int, block: int, book: tuple[float, ...], positive: bool = False
) -> StateCodec:
    codec = StateCodec(name, "codebook", bits, block, book, positive)
    lut_bits = lookup_table(codec)[0]
    return replace(codec, lut_bits=lut_bits, lut_first_cell=first_cell(book, lut_bits))


CODECS: dict[str, StateCodec] = {
    c.name: c
    for c in (
        _codebook("dynamic8", 8, 256, _signed_dynamic(8)),
        _codebook("dynamic8_unsigned", 8, 256, tuple(decade_magnitudes(256)), positive=True),
        _codebook("quantile4", 4, 128, _normal_quantiles(7)),
        _codebook("linear4_unsigned", 4, 128, tuple((k + 1) / 16 for k in range(16)), True),
        StateCodec("fp8", "fp8", 8, 256),
        StateCodec("fp8_unsigned", "fp8", 8, 256, positive=True),
    )
}


def get_codec(name: str) -> StateCodec:
    if name not in CODECS:
        raise ValueError(f"unknown state codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]
