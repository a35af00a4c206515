"""Weight decode to a dense [N, K] matrix, for large M where cuBLAS on the decoded weight wins.

At prefill sizes a GEMM is compute bound, so decoding the weight once per call (one pass over
the packed bytes, one write of x.dtype) and running the dense tensor-core GEMM beats
dequantizing inside every output tile. The weight-only entry points offer this as one more
tuner candidate, so the choice per shape is made by measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import target
from .weight_only import INT4_OFFSET, _dequant_tile, fit_k_block


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, WORDS, g, stride_s,
    FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr,
    WPG: tl.constexpr, ASM: tl.constexpr,
):
    """One [BN, BK] tile: NG groups (or one slice of a group) of WPG words per row."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    word0 = k0 // (BK // (NG * WPG))
    offs_w = (word0 + tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :])
    words = tl.load(w_ptr + rows64[:, None, None] * WORDS + offs_w[None, :, :],
                    mask=rmask[:, None, None], other=0)
    grp = k0 // g + tl.arange(0, NG)
    s = tl.load(s_ptr + rows64[:, None] * stride_s + grp[None, :], mask=rmask[:, None],
                other=0.0).to(tl.float32)
    zs = s
    if FMT == 0:
        z = tl.load(z_ptr + rows64[:, None] * stride_s + grp[None, :], mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        zs = (z + INT4_OFFSET) * s
    tile = _dequant_tile(words, s, zs, FMT, ASM, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * K + k0 + tl.arange(0, BK)[None, :], tile,
             mask=rmask[:, None])


def dequantize_words(words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: int,
                     cpw: int, k: int, dtype: torch.dtype,
                     compile_only: bool = False) -> torch.Tensor:
    """Packed int32 words [N, K / cpw] -> dense [N, K] of `dtype` (same numbers as the GEMMs)."""
    n, nwords = words.shape
    g = k // scale.shape[1]
    bk = fit_k_block(256, k, g, cpw)
    ng = max(1, bk // g)
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    bn = 32
    grid = (triton.cdiv(n, bn), k // bk)
    args = (words, scale, zero, out, n, k, nwords, g, scale.stride(0))
    meta = dict(FMT=fmt, BN=bn, BK=bk, NG=ng, WPG=min(g, bk) // cpw,
                ASM=target.native(words), num_warps=4)
    if compile_only:
        _dequant_kernel.warmup(*args, grid=grid, **meta)
    else:
        _dequant_kernel[grid](*args, **meta)
    return out
