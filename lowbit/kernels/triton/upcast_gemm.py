"""Weight-only int8/fp8 GEMM for small M whose weight tile reaches the tensor cores from registers.

The tl.dot GEMM of weight_only.py decodes 32-bit words with a few PTX instructions each, but
its decoded tile is laid out for the decoder, not for the MMA: every K step writes it to shared
memory, waits on a barrier and reads it back with ldmatrix. Here the weight bytes are loaded as
stored and only widened (an int8 or fp8 to float conversion). Triton hoists the MMA operand
layout through such element-wise ops (its MMAv3 operand-A hoisting), so the bytes go from the
pipeline's shared-memory buffer straight into the wgmma register layout and the widened tile
never goes back. The tile is the A operand (out^T = w x^T: the swapped layout), the only one
wgmma takes from registers. The codes enter the MMA as they are (exact in bf16, fp16 and fp32);
scales are applied to its output: once at the end for one scale per row, so the MMAs form one
accumulator chain that Triton keeps in flight across K steps, else once per K step (a step
never crosses a quantization group), and then every step waits for its MMA, since Triton keeps
wgmma in flight only along an accumulator chain.

The tuner weighs it against the tl.dot tiles. On the H200 it wins for int8 on about half of the
Llama-3-8B (shape, M <= 64) points, by 1.02x-1.11x, and rarely for fp8
(results/ops_small_m_upcast.json). Keeping the one-scale MMAs in flight changed nothing
measurable (results/ops_small_m_upcast_chain.json): the MMA waits are not what bounds it.
It does not take int4: there it lost everywhere, even with the codes widened by bit tricks
(0.63x-0.94x of the tl.dot tiles; results/ops_int4_upcast_magic.json, code in the history at
7f4fa3f). Triton 3.6 also cannot build a better int4 version: its operand-A hoisting stops at
a broadcast (the group scales) or a narrowing conversion (fp32 math to bf16), so scaling the
codes before the MMA sends the tile back through shared memory; the two nibble planes need the
even and odd columns of x, split in registers and stored to shared memory every step, and
Triton then waits for each step's MMA before that buffer is rewritten (docs/decode-speed.md,
section 3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl, target
from .pdl import wait_for_inputs
from .weight_only import (
    FP8,
    INT8,
    _dot,
    _load_params,
    launch_kernel,
    m_bucket,
    num_sms,
    param_words,
    split_options,
    splitk_reduce,
    store_tile,
)


@triton.jit
def _upcast_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, g, ITERS, stride_xm, stride_s,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_F32: tl.constexpr, PAIRS: tl.constexpr, ONE_GROUP: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] w[n, k] for a [BM, BN] tile, BK values of k per step."""
    # The codes widen straight to x's dtype, a single upcast that Triton can hoist the operand
    # layout through; the fp32 dots (fp32 x, the interpreter) take them as fp32.
    WTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    nmask = offs_n < N
    mmask = offs_m < M
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + tl.arange(0, BK)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_s
    first = tl.zeros((1,), tl.int32)  # a one-group index vector, for _load_params
    acc = tl.zeros((BN, BM), tl.float32)
    if ONE_GROUP:  # one scale per row: applied once, after the loop
        s_row = _load_params(s_ptrs, first, nmask[:, None], PAIRS)
    else:  # this step's scales were read a step ahead (Triton does not prefetch them: they
        # do not feed a dot), so their latency hides behind the previous step's dots
        s_next = _load_params(s_ptrs, first + (pid_k * ITERS * BK) // g, nmask[:, None], PAIRS)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # the weights and scales above may be read before it, x may not
    for step in range(ITERS):
        it = it0 + step
        wb = tl.load(w_ptrs + it * BK, mask=nmask[:, None])  # rows past N are never stored
        xt = tl.load(x_ptrs + it * BK, mask=mmask[:, None], other=0.0)
        if ONE_GROUP:
            # One accumulator chain: Triton keeps these MMAs in flight across steps.
            acc = _dot(wb.to(WTYPE), tl.trans(xt), acc, DOT_F32)
        else:
            # Group scales go on each step's own sums, so every step waits for its MMA.
            s = s_next
            ahead = first + (tl.minimum(it + 1, it0 + ITERS - 1) * BK) // g
            s_next = _load_params(s_ptrs, ahead, nmask[:, None], PAIRS)
            part = _dot(wb.to(WTYPE), tl.trans(xt), tl.zeros((BN, BM), tl.float32), DOT_F32)
            acc += s * part
    if ONE_GROUP:
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


def upcast_candidates(x: torch.Tensor, n: int, k: int, g: int, one_group: bool,
                      fmt: int) -> list[UpcastCfg]:
    """Tiles for int8/fp8 at 1 < M <= 64: wgmma N = the M bucket (at least 16), one or two
    64-row weight blocks per warp group, K steps of 64 or 128 that stay inside a quantization
    group; each with the K splits that could fill the GPU."""
    m = x.shape[0]
    if fmt not in (INT8, FP8) or not 1 < m <= UPCAST_MAX_M:
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


_STORED_DTYPE = {INT8: torch.int8, FP8: torch.float8_e4m3fn}


def upcast_launch(cfg: UpcastCfg, compile_only: bool, x, words, scale, zero, bias, out,
                  fmt: int, g: int) -> None:
    """Launch one candidate (the signature of weight_only's launches: words are viewed back as
    the stored bytes; zero is unused, int8 and fp8 have none)."""
    (m, k), n = x.shape, out.shape[1]
    assert fmt in _STORED_DTYPE, f"the upcast GEMM takes int8 and fp8 weights, not format {fmt}"
    qdata = words.view(_STORED_DTYPE[fmt])
    assert qdata.shape[1] == k, (qdata.shape, k)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    one_group = scale.shape[1] == 1
    scale, _, pairs = param_words(scale, scale)
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split)
    launch_kernel(
        _upcast_gemm_kernel, grid, compile_only,
        x, qdata, scale, bias if bias is not None else out, dest,
        m, n, k, g, k // cfg.bk // cfg.split, x.stride(0), scale.stride(0),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, HAS_BIAS=bias is not None, PARTIAL=cfg.split > 1,
        DOT_F32=x.dtype == torch.float32 or not target.native(x), PAIRS=pairs,
        ONE_GROUP=one_group, num_warps=cfg.warps, num_stages=cfg.stages, **pdl.options(x),
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)
