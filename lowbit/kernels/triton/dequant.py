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

from .weight_only import INT4_OFFSET, _decode


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, WORDS, g, stride_s,
    FMT: tl.constexpr, CPW: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, ASM: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    mask = (rows < N)[:, None] & (cols < WORDS)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    words = tl.load(w_ptr + rows64 * WORDS + cols[None, :], mask=mask, other=0)
    codes = _decode(words, FMT, ASM)
    for i in tl.static_range(CPW):
        k = cols[None, :] * CPW + i
        s = tl.load(s_ptr + rows64 * stride_s + k // g, mask=mask, other=0.0).to(tl.float32)
        if FMT == 0:
            z = tl.load(z_ptr + rows64 * stride_s + k // g, mask=mask, other=0.0).to(tl.float32)
            v = (codes[i] - INT4_OFFSET - z) * s
        else:
            v = codes[i] * s
        tl.store(out_ptr + rows64 * K + k, v.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_words(words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: int,
                     cpw: int, k: int, dtype: torch.dtype,
                     compile_only: bool = False) -> torch.Tensor:
    """Packed int32 words [N, K / cpw] -> dense [N, K] of `dtype` (same numbers as the GEMMs)."""
    n, nwords = words.shape
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    bn, bw = 16, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(nwords, bw))
    args = (words, scale, zero, out, n, k, nwords, k // scale.shape[1], scale.stride(0))
    meta = dict(FMT=fmt, CPW=cpw, BN=bn, BW=bw, ASM=words.device.type == "cuda", num_warps=4)
    if compile_only:
        _dequant_kernel.warmup(*args, grid=grid, **meta)
    else:
        _dequant_kernel[grid](*args, **meta)
    return out
