"""2:4 semi-structured sparse linears: the metadata codec, references, custom ops, CUDA dispatch.

A 2:4 sparse [N, K] weight keeps exactly 2 values in every group of 4 consecutive columns.
It is stored as
- kept values [N, K/2] in k order (the model dtype, or integer codes: int8 [N, K/2] or int4
  packed two per byte [N, K/4] with per-group scales over logical K, exactly IntWeight's
  numerics applied to the kept values), and
- metadata uint8 [N, ceil(K/8)]: per group a nibble ``i0 | i1 << 2`` holding the two kept
  positions (0..3, i0 < i1), two groups per byte, low nibble first (the same little-endian
  layout as `lowbit.formats.pack_bits` at 4 bits).
That is 2.25 bytes per 4 bf16 weights instead of 8 (1.78x fewer), and with int4 values
0.375 + scales instead of 0.5 + scales per weight: at small M, where a linear streams its
weight once, those bytes are the time.

The references expand to the dense matrix and call F.linear: they are the CPU path and the
oracle the Triton kernels (`lowbit.kernels.triton.sparse24`) are tested against.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats import pack_bits, unpack_bits
from lowbit.kernels import reference as ref

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ---- metadata codec ---------------------------------------------------------------------------


def check_24_shape(k: int) -> None:
    if k % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {k}")


def kept_positions(mask: Tensor) -> Tensor:
    """Bool [N, K] mask with exactly 2 True per group of 4 -> int64 positions [N, K/4, 2],
    ascending within each group. Raises ValueError naming the groups that are not 2:4."""
    n, k = mask.shape
    check_24_shape(k)
    groups = mask.reshape(n, k // 4, 4)
    counts = groups.sum(-1)
    bad = counts != 2
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"mask is not 2:4: {int(bad.sum())} groups of 4 do not keep exactly 2 values "
            f"(first: row {row}, columns {4 * grp}..{4 * grp + 3} keep {int(counts[row, grp])})"
        )
    # Weight each kept position above every dropped one, earlier positions first: the two
    # largest keys are the kept positions in ascending order.
    pos = torch.arange(4, device=mask.device)
    key = groups.to(torch.int64) * 8 + (3 - pos)
    return key.topk(2, dim=-1).indices.sort(dim=-1).values


def pack_meta(positions: Tensor) -> Tensor:
    """Positions [N, K/4, 2] -> metadata uint8 [N, ceil(K/8)] (see the module docstring)."""
    nib = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = F.pad(nib, (0, 1))
    return pack_bits(nib, 4)


def unpack_meta(meta: Tensor, k: int) -> Tensor:
    """Metadata uint8 [N, ceil(K/8)] -> positions int64 [N, K/4, 2]."""
    nib = unpack_bits(meta, 4, k // 4).to(torch.int64)
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def compress(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(kept values [N, K/2] in w's dtype, metadata) of w under a 2:4 mask."""
    n, k = w.shape
    positions = kept_positions(mask)
    values = w.reshape(n, k // 4, 4).gather(-1, positions).reshape(n, k // 2)
    return values, pack_meta(positions)


def expand(values: Tensor, meta: Tensor, k: int) -> Tensor:
    """Kept values [N, K/2] + metadata -> the dense [N, K] matrix (zeros where pruned)."""
    n = values.shape[0]
    positions = unpack_meta(meta, k)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(-1, positions, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def kept_values(qdata: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
                dtype: torch.dtype) -> Tensor:
    """Dequantized kept values [N, K/2]: IntWeight's decode on the compact matrix (a logical
    group of g columns holds g/2 kept values, so the scale layout [N, K/g] carries over)."""
    if bits == 8 and qdata.dtype == torch.int8:
        return ref.int8_weight(qdata, scale, dtype)
    return ref.intx_weight(qdata, scale, zero, bits, dtype)


# ---- references -------------------------------------------------------------------------------


def sparse24_linear_ref(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, expand(values.to(x.dtype), meta, x.shape[-1]), bias)


def sparse24_intx_linear_ref(x, qdata, meta, scale, zero, bias, bits):
    vals = kept_values(qdata, scale, zero, bits, x.dtype)
    return F.linear(x, expand(vals, meta, x.shape[-1]), bias)


# ---- custom ops -------------------------------------------------------------------------------


@torch.library.custom_op("lowbit::sparse24_linear", mutates_args=())
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ expand(values, meta)^T + bias; float kept values [N, K/2]."""
    return sparse24_linear_ref(x, values, meta, bias)


@torch.library.custom_op("lowbit::sparse24_intx_linear", mutates_args=())
def sparse24_intx_linear(
    x: Tensor, qdata: Tensor, meta: Tensor, scale: Tensor, zero: Tensor | None,
    bias: Tensor | None, bits: int,
) -> Tensor:
    """Kept values as int8 codes [N, K/2] or packed int4 codes [N, K/4] with scales [N, K/g]."""
    return sparse24_intx_linear_ref(x, qdata, meta, scale, zero, bias, bits)


@sparse24_linear.register_fake
def _fake(x, values, meta, bias):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@sparse24_intx_linear.register_fake
def _fake_intx(x, qdata, meta, scale, zero, bias, bits):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


ALL_OPS = (sparse24_linear, sparse24_intx_linear)


# ---- CUDA -------------------------------------------------------------------------------------


def kernel_available(k: int, bits: int, qdata: Tensor, scale: Tensor | None = None) -> bool:
    """Whether the Triton kernels take this layout (else the reference runs on the GPU):
    K a multiple of 64 (whole 32-bit metadata words, tiles of at least 64 columns), value
    formats float, int8 symmetric or int4, and scale groups that nest with such tiles."""
    fmt_ok = bits == 0 or bits == 4 or (bits == 8 and qdata.dtype == torch.int8)
    if scale is not None and fmt_ok:
        g = k // scale.shape[1]
        fmt_ok = g * scale.shape[1] == k and (g % 64 == 0 or (g >= 4 and 64 % g == 0))
    return HAS_TRITON and k % 64 == 0 and fmt_ok


def _register_cuda() -> None:
    def flat(x):
        return x.reshape(-1, x.shape[-1])

    @sparse24_linear.register_kernel("cuda")
    def _(x, values, meta, bias):
        if not kernel_available(x.shape[-1], 0, values):
            return sparse24_linear_ref(x, values, meta, bias)
        from lowbit.kernels.triton import sparse24 as tk

        y = tk.sparse24_mm(flat(x), values, meta, None, None, bias, 0)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @sparse24_intx_linear.register_kernel("cuda")
    def _(x, qdata, meta, scale, zero, bias, bits):
        if not kernel_available(x.shape[-1], bits, qdata, scale):
            return sparse24_intx_linear_ref(x, qdata, meta, scale, zero, bias, bits)
        from lowbit.kernels.triton import sparse24 as tk

        y = tk.sparse24_mm(flat(x), qdata, meta, scale, zero, bias, bits)
        return y.reshape(*x.shape[:-1], y.shape[-1])


_register_cuda()
