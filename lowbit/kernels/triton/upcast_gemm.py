"""Weight-only GEMM for small M whose weight tile goes to the tensor cores from registers.

The tl.dot GEMM of weight_only.py decodes 32-bit words with a few PTX instructions each, but
its decoded tile is laid out for the decoder, not for the MMA: every K step writes it to shared
memory, waits on a barrier and reads it back with ldmatrix. At small M that round trip, not the
weight bytes, sets the time (results/gemm_sweep.json: no tile choice closes the gap to bf16).

Here the weight bytes are loaded as stored and only widened with element-wise ops (a nibble
mask or shift, an int or fp8 to float conversion). Triton hoists the MMA operand layout through
such ops (its MMAv3 operand-A hoisting), so the bytes are read from the pipeline's shared-memory
buffer straight into the wgmma register layout and the widened tile never goes back. The tile
is the A operand (out^T = w x^T: the swapped layout), the only one wgmma takes from registers.

The codes enter the MMA as they are (exact in bf16, fp16 and fp32) and scales and zero points
are applied to its output, once per K step (a step never crosses a quantization group), as in
the GEMV: sum_k (c - z) s x = s (sum_k c x - z sum_k x). int4 bytes hold two codes (low nibble
even k, high nibble odd k): the two nibble planes are two dots against the even and odd columns
of x, a permutation of K that moves no data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl, target
from .pdl import wait_for_inputs
from .weight_only import (
    INT4,
    _dot,
    _group_params,
    launch_kernel,
    m_bucket,
    num_sms,
    param_words,
    split_options,
    splitk_reduce,
    store_tile,
)

# bf16 bits 0x4300 | c are the value 128 + c for a code c < 128: widening with an integer
# extension, an OR and a bitcast, all full-rate instructions that Triton can hoist the MMA
# operand layout through (an int-to-float conversion runs at a quarter of the rate). The 128 is
# taken off with the zero point.
_BF16_128 = tl.constexpr(0x4300)


@triton.jit
def _nibbles(codes, XTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """int4 codes (uint8, 0..15) as MMA inputs: 128 + code for bf16 x, the code otherwise."""
    if XTYPE == tl.bfloat16:
        v = (codes.to(tl.int16) | _BF16_128).to(tl.bfloat16, bitcast=True)
        return v.to(tl.float32) if DOT_F32 else v
    return codes.to(tl.float32 if DOT_F32 else XTYPE)


@triton.jit
def _upcast_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, g, ITERS, stride_xm, stride_s,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DOT_F32: tl.constexpr, PAIRS: tl.constexpr,
    ONE_GROUP: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] w[n, k] for a [BM, BN] tile, BK values of k per step."""
    INT4_CODES: tl.constexpr = FMT == 0
    BKB: tl.constexpr = BK // 2 if INT4_CODES else BK  # stored bytes of a row per step
    # The codes widen straight to x's dtype, a single upcast that Triton can hoist the operand
    # layout through; the fp32 dots (fp32 x, the interpreter) take them as fp32.
    XTYPE: tl.constexpr = x_ptr.dtype.element_ty
    WTYPE: tl.constexpr = tl.float32 if DOT_F32 else XTYPE
    CODE_OFFSET: tl.constexpr = 128.0 if INT4_CODES and XTYPE == tl.bfloat16 else 0.0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    nmask = offs_n < N
    mmask = offs_m < M
    row_bytes = K // 2 if INT4_CODES else K
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes + tl.arange(0, BKB)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_s
    z_ptrs = z_ptr + offs_n[:, None] * stride_s
    first = tl.zeros((1,), tl.int32)  # a one-group index vector, for _group_params
    acc = tl.zeros((BN, BM), tl.float32)
    xsum_all = tl.zeros((BM,), tl.float32)
    if ONE_GROUP:  # one scale (and zero) per row: applied once, after the loop
        s_row, z_row = _group_params(s_ptrs, z_ptrs, first, nmask[:, None], PAIRS, INT4_CODES)
    else:  # this step's scales were read a step ahead (Triton does not prefetch them: they
        # do not feed a dot), so their latency hides behind the previous step's dots
        s_next, z_next = _group_params(s_ptrs, z_ptrs, first + (pid_k * ITERS * BK) // g,
                                       nmask[:, None], PAIRS, INT4_CODES)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # the weights and scales above may be read before it, x may not
    for step in range(ITERS):
        it = it0 + step
        if not ONE_GROUP:
            s, z = s_next, z_next
            ahead = first + (tl.minimum(it + 1, it0 + ITERS - 1) * BK) // g
            s_next, z_next = _group_params(s_ptrs, z_ptrs, ahead, nmask[:, None], PAIRS,
                                           INT4_CODES)
        wb = tl.load(w_ptrs + it * BKB, mask=nmask[:, None])  # rows past N are never stored
        xt = tl.load(x_ptrs + it * BK, mask=mmask[:, None], other=0.0)
        part = tl.zeros((BN, BM), tl.float32)
        if INT4_CODES:
            x_even, x_odd = tl.split(tl.reshape(xt, (BM, BK // 2, 2)))
            part = _dot(_nibbles(wb & 15, XTYPE, DOT_F32), tl.trans(x_even), part, DOT_F32)
            part = _dot(_nibbles(wb >> 4, XTYPE, DOT_F32), tl.trans(x_odd), part, DOT_F32)
            xsum = tl.sum(xt.to(tl.float32), axis=1)
        else:
            part = _dot(wb.to(WTYPE), tl.trans(xt), part, DOT_F32)
        if ONE_GROUP:
            acc += part
            if INT4_CODES:
                xsum_all += xsum
        else:
            if INT4_CODES:
                part -= (z + CODE_OFFSET) * xsum[None, :]
            acc += s * part
    if ONE_GROUP:
        if INT4_CODES:
            acc -= (z_row + CODE_OFFSET) * xsum_all[None, :]
        acc *= s_row
    store_tile(out_ptr, b_ptr, tl.trans(acc), offs_m, offs_n, mmask, nmask, M, N, pid_k,
               HAS_BIAS, PARTIAL)


class UpcastCfg(NamedTuple):
    """Block sizes (rows of x, rows of w, k per step), warps, pipeline stages, K split."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1


# Above 64 rows of x the decode-once GEMM tiles and dequantize-then-cuBLAS take over.
UPCAST_MAX_M = 64


def upcast_candidates(x: torch.Tensor, n: int, k: int, g: int,
                      one_group: bool) -> list[UpcastCfg]:
    """Tiles for 1 < M <= 64: wgmma N = the M bucket (at least 16), one or two 64-row weight
    blocks per warp group, K steps of 64 or 128 that stay inside a quantization group; each
    with the K splits that could fill the GPU."""
    m = x.shape[0]
    if not 1 < m <= UPCAST_MAX_M:
        return []
    bm = max(16, m_bucket(m))
    cands = []
    for bk in (128, 64):
        if k % bk or not (one_group or g % bk == 0):
            continue
        for bn in (64, 128):
            tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
            for stages in (3, 4):
                cfg = UpcastCfg(bm, bn, bk, 4, stages)
                cands += [cfg._replace(split=s)
                          for s in split_options(tiles, k // bk, 2 * num_sms(x))]
    return cands


_STORED_DTYPE = {0: torch.uint8, 1: torch.int8, 2: torch.float8_e4m3fn}


def upcast_launch(cfg: UpcastCfg, compile_only: bool, x, words, scale, zero, bias, out,
                  fmt: int, g: int) -> None:
    """Launch one candidate (the signature of weight_only's launches; words viewed back as the
    stored bytes)."""
    (m, k), n = x.shape, out.shape[1]
    qdata = words.view(_STORED_DTYPE[fmt])
    assert qdata.shape[1] == (k // 2 if fmt == INT4 else k), (qdata.shape, k)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    one_group = scale.shape[1] == 1
    scale, zero, pairs = param_words(scale, zero)
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split)
    launch_kernel(
        _upcast_gemm_kernel, grid, compile_only,
        x, qdata, scale, zero, bias if bias is not None else out, dest,
        m, n, k, g, k // cfg.bk // cfg.split, x.stride(0), scale.stride(0),
        FMT=fmt, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, HAS_BIAS=bias is not None,
        PARTIAL=cfg.split > 1, DOT_F32=x.dtype == torch.float32 or not target.native(x),
        PAIRS=pairs, ONE_GROUP=one_group, num_warps=cfg.warps, num_stages=cfg.stages,
        **pdl.options(x),
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)
