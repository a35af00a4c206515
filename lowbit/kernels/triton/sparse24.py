"""2:4 sparse linears in Triton: kernels that read only the kept values and the metadata.

Layout: see `lowbit.kernels.sparse_ops` (kept values [N, K/2] in k order, or int8 / packed int4
codes with scales over logical groups; metadata nibbles ``i0 | i1 << 2``, 8 per 32-bit word).
Every kernel loads, per tile of BK logical columns, BK/2 kept values and BK/32 metadata words
per row, decodes the kept positions with shifts and masks, and never touches a zero:

* `_gemv_kernel` (CUDA cores; M <= 16): per group of 4 columns the two kept values meet the
  activation each one belongs to, picked from the 4 activations of the group by two selects
  on bits of the metadata nibble; BM rows of x share every weight load.
* `_dot_kernel` (tensor cores; 1 < M <= 64): the tile is expanded in registers to dense
  [BN, BK] (zeros where pruned) and multiplied with `tl.dot`.
* `_expand_kernel`: writes the dense weight once; for large M, "expand, then the dense cuBLAS
  GEMM" competes with cuSPARSELt (`torch._cslt_sparse_mm` on a compressed copy, its [N, M]
  result transposed by `_transpose_kernel`) and the choice is made per shape by measurement
  (`weight_only.Tuner`), so sparse is never slower than dense plus the (bandwidth-bound)
  expand.

The GEMV and tensor-core kernels launch with programmatic dependent launch where the GPU has
it (`pdl.py`), as the dense weight-only kernels do: in a decode step they are scheduled while
the kernel before them still runs.

At small M a linear is bound by weight bytes: 2.25 instead of 4 bytes per 2 bf16 weights, and
0.375 + scales instead of 0.5 + scales for int4, is where the speed comes from.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl, target
from .pdl import wait_for_inputs
from .weight_only import (
    Tuner,
    _dot,
    _load_params,
    fit_k_block,
    launch_kernel,
    m_bucket,
    matches_reference,
    num_sms,
    param_words,
    split_options,
    splitk_reduce,
    store_tile,
)

FLOAT, INT8, INT4 = 0, 1, 2
_FMT_BY_BITS = {0: FLOAT, 8: INT8, 4: INT4}


# --------------------------------------------------------------------------------------------
# Tile decode
# --------------------------------------------------------------------------------------------


@triton.jit
def _kept_tile(v_ptr, m_ptr, s_ptr, z_ptr, rows64, rmask, k0, g, VROW, MROW, stride_s,
               FMT: tl.constexpr, HAS_ZERO: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr,
               PAIRS: tl.constexpr):
    """Columns [k0, k0 + BK) of BN rows, each [BN, BK / 4]: the kept values v0, v1 (fp32, less
    the zero point but not yet scaled: see `_scaled`), the metadata nibble of each group in the
    low 4 bits of `nib` (i0 | i1 << 2, positions i0 < i1; higher bits are not cleared), and the
    group scales s (unused for float values).

    Metadata word w of a row covers groups 8w..8w+7, group j at bits 4j (low nibble first). For
    int4, byte j of the codes is exactly group j (low nibble = first kept value)."""
    BN: tl.constexpr = rows64.shape[0]
    G: tl.constexpr = BK // 4
    NW: tl.constexpr = BK // 32
    words = tl.load(m_ptr + rows64[:, None] * MROW + (k0 // 32 + tl.arange(0, NW))[None, :],
                    mask=rmask[:, None], other=0)
    nib = tl.reshape(words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :], (BN, G))
    # Codes become floats by OR-ing them into the mantissa of 2**23 (exact), then subtracting
    # 2**23: two integer-unit ops instead of an int-to-float conversion (quarter rate on Hopper).
    if FMT == 2:
        b = tl.load(v_ptr + rows64[:, None] * VROW + (k0 // 4 + tl.arange(0, G))[None, :],
                    mask=rmask[:, None], other=0).to(tl.int32)
        # Symmetric codes are stored offset by 8, which the same subtraction removes.
        base: tl.constexpr = 8388608.0 if HAS_ZERO else 8388616.0
        v0 = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - base
        v1 = (((b >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - base
    else:
        raw = tl.load(v_ptr + rows64[:, None] * VROW + (k0 // 2 + tl.arange(0, 2 * G))[None, :],
                      mask=rmask[:, None], other=0)
        if FMT == 1:
            # The low byte with its sign bit flipped is q + 128; XOR-ing in the exponent of 2**23
            # as well takes one op: (q & 0xFF) ^ 0x4B000080 = bits of 2**23 + 128 + q.
            vals = ((raw.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
            vals -= 8388736.0
        else:
            vals = raw.to(tl.float32)
        v0, v1 = tl.split(tl.reshape(vals, (BN, G, 2)))
    s = v0
    if FMT != 0:
        # NG scale groups in the tile (NG = 1 when a group spans several tiles).
        grp = k0 // g + tl.arange(0, NG)
        s = _load_params(s_ptr + rows64[:, None] * stride_s, grp, rmask[:, None], PAIRS)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BN, NG, G // NG)), (BN, G))
        if HAS_ZERO:
            z = _load_params(z_ptr + rows64[:, None] * stride_s, grp, rmask[:, None], PAIRS)
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BN, NG, G // NG)), (BN, G))
            v0 -= z
            v1 -= z
    return v0, v1, nib, s


@triton.jit
def _scaled(v0, v1, s, FMT: tl.constexpr):
    """Kept values times their group scales (float values as they are)."""
    if FMT != 0:
        v0 = v0 * s
        v1 = v1 * s
    return v0, v1


@triton.jit
def _quads(x):
    """[..., BK] -> the 4 columns of each group: x0..x3, each [..., BK / 4] (register moves)."""
    x = tl.reshape(x, x.shape[:-1] + (x.shape[-1] // 4, 2, 2))
    e, o = tl.split(x)
    x0, x2 = tl.split(e)
    x1, x3 = tl.split(o)
    return x0, x1, x2, x3


@triton.jit
def _dense_tile(v0, v1, nib):
    """[BN, G] kept values and metadata nibbles -> the dense [BN, 4 G] tile (zeros where
    pruned)."""
    BN: tl.constexpr = v0.shape[0]
    BK: tl.constexpr = v0.shape[1] * 4
    i0 = nib & 3
    i1 = (nib >> 2) & 3
    w0 = tl.where(i0 == 0, v0, 0.0)
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0))
    w3 = tl.where(i1 == 3, v1, 0.0)
    # join(join(w0, w2), join(w1, w3))[..., a, b] = w[2a + b]: the reshape puts w_p at 4j + p.
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BN, BK))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gemv_kernel(
    x_ptr, v_ptr, m_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, g, VROW, MROW, stride_s, stride_xm, ITERS,
    FMT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr,
    STAGES: tl.constexpr, PAIRS: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum over kept k of x[m, k] w[n, k]; per group only 2 products per row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    acc = tl.zeros((BM, BN, BK // 4), tl.float32)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # nothing is read or written before the kernels before it finish
    for step in tl.range(0, ITERS, num_stages=STAGES):
        k0 = (it0 + step) * BK
        v0, v1, nib, s = _kept_tile(v_ptr, m_ptr, s_ptr, z_ptr, rows64, rmask, k0, g, VROW, MROW,
                                    stride_s, FMT, HAS_ZERO, BK, NG, PAIRS)
        if BM > 1:  # scale the values once for all rows of x (else the products, below)
            v0, v1 = _scaled(v0, v1, s, FMT)
        x0, x1, x2, x3 = _quads(tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
                                .to(tl.float32))
        x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
        # i0 is 0, 1 or 2 and i1 is 1, 2 or 3 (i0 < i1): each picks among three activations by
        # two bit tests of the nibble, shared by all rows of x.
        xs0 = tl.where(((nib & 2) != 0)[None, :, :], x2,
                       tl.where(((nib & 1) != 0)[None, :, :], x1, x0))
        xs1 = tl.where(((nib & 8) != 0)[None, :, :],
                       tl.where(((nib & 4) != 0)[None, :, :], x3, x2), x1)
        prod = v0[None, :, :] * xs0 + v1[None, :, :] * xs1
        if BM == 1 and FMT != 0:
            acc += prod * s[None, :, :]
        else:
            acc += prod
    y = tl.sum(acc, axis=2)
    store_tile(out_ptr, b_ptr, y, offs_m, rows, mmask, rmask, M, N, pid_k, HAS_BIAS, PARTIAL)


@triton.jit
def _dot_kernel(
    x_ptr, v_ptr, m_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, g, VROW, MROW, stride_s, stride_xm, ITERS,
    FMT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr,
    STAGES: tl.constexpr, DOT_F32: tl.constexpr, SWAP: tl.constexpr, PAIRS: tl.constexpr,
    PDL: tl.constexpr,
):
    """The tile expanded to dense [BN, BK] in registers, rounded to x's dtype, then tl.dot.
    DOT_F32 runs the dot on fp32 copies (fp32 x, and the interpreter, whose bf16 dot is wrong);
    SWAP computes out^T = w x^T, the weight rows on the MMA's wide side (small M)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # nothing is read or written before the kernels before it finish
    for step in tl.range(0, ITERS, num_stages=STAGES):
        k0 = (it0 + step) * BK
        v0, v1, nib, s = _kept_tile(v_ptr, m_ptr, s_ptr, z_ptr, rows64, rmask, k0, g, VROW, MROW,
                                    stride_s, FMT, HAS_ZERO, BK, NG, PAIRS)
        v0, v1 = _scaled(v0, v1, s, FMT)
        w = _dense_tile(v0, v1, nib).to(DTYPE)
        xt = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
        if SWAP:
            acc = _dot(w, tl.trans(xt), acc, DOT_F32)
        else:
            acc = _dot(xt, tl.trans(w), acc, DOT_F32)
    if SWAP:
        acc = tl.trans(acc)
    store_tile(out_ptr, b_ptr, acc, offs_m, rows, mmask, rmask, M, N, pid_k, HAS_BIAS, PARTIAL)


@triton.jit
def _expand_kernel(v_ptr, m_ptr, s_ptr, z_ptr, out_ptr, N, K, g, VROW, MROW, stride_s,
                   FMT: tl.constexpr, HAS_ZERO: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   NG: tl.constexpr, PAIRS: tl.constexpr):
    """One dense [BN, BK] tile of the weight, in out's dtype."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    v0, v1, nib, s = _kept_tile(v_ptr, m_ptr, s_ptr, z_ptr, rows64, rmask, k0, g, VROW, MROW,
                                stride_s, FMT, HAS_ZERO, BK, NG, PAIRS)
    v0, v1 = _scaled(v0, v1, s, FMT)
    w = _dense_tile(v0, v1, nib)
    tl.store(out_ptr + rows64[:, None] * K + k0 + tl.arange(0, BK)[None, :],
             w.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


class SparseCfg(NamedTuple):
    """Kernel ("gemv" or "dot"), block sizes (rows of x, rows of w, logical k), warps, stages,
    K split."""

    kind: str
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1
    swap: bool = False


# GEMV: a warp streams 256-2048 logical columns (256-2048 bytes of bf16 kept values) of a few
# rows per step; its registers hold BM x BN x BK/4 partial sums, so wider M takes narrower
# tiles. The per-step overhead (addresses, shared-memory staging, waits) is paid per thread, so
# the wide-K tiles, which give each thread 4-8 groups of each row, amortize it best.
_GEMV_TILES = {
    1: (SparseCfg("gemv", 1, 8, 512, 2, 3), SparseCfg("gemv", 1, 16, 256, 2, 3),
        SparseCfg("gemv", 1, 8, 256, 1, 3), SparseCfg("gemv", 1, 4, 1024, 4, 2),
        SparseCfg("gemv", 1, 16, 512, 4, 2), SparseCfg("gemv", 1, 8, 2048, 2, 2),
        SparseCfg("gemv", 1, 4, 2048, 2, 3), SparseCfg("gemv", 1, 8, 1024, 2, 3),
        SparseCfg("gemv", 1, 16, 1024, 4, 2)),
    2: (SparseCfg("gemv", 2, 8, 256, 2, 3), SparseCfg("gemv", 2, 16, 256, 4, 2),
        SparseCfg("gemv", 2, 8, 1024, 2, 3)),
    4: (SparseCfg("gemv", 4, 8, 256, 2, 3), SparseCfg("gemv", 4, 8, 256, 4, 2),
        SparseCfg("gemv", 4, 4, 1024, 2, 3), SparseCfg("gemv", 4, 8, 1024, 4, 2)),
    8: (SparseCfg("gemv", 8, 4, 256, 2, 3), SparseCfg("gemv", 8, 8, 128, 2, 3),
        SparseCfg("gemv", 8, 2, 1024, 2, 3), SparseCfg("gemv", 8, 4, 512, 2, 3)),
    16: (SparseCfg("gemv", 16, 4, 128, 2, 3), SparseCfg("gemv", 16, 2, 512, 2, 3),
         SparseCfg("gemv", 16, 4, 512, 4, 2)),
}
_DOT_TILES = (SparseCfg("dot", 16, 64, 128, 4, 4), SparseCfg("dot", 16, 32, 256, 4, 4),
              SparseCfg("dot", 16, 128, 128, 4, 3), SparseCfg("dot", 16, 64, 256, 4, 3),
              SparseCfg("dot", 16, 64, 128, 4, 4, swap=True),
              SparseCfg("dot", 16, 128, 128, 4, 3, swap=True),
              SparseCfg("dot", 16, 64, 256, 4, 3, swap=True))
_DOT_TILES_64 = (SparseCfg("dot", 32, 64, 128, 4, 4), SparseCfg("dot", 64, 64, 128, 4, 3),
                 SparseCfg("dot", 64, 128, 64, 4, 4),
                 SparseCfg("dot", 32, 64, 128, 4, 4, swap=True),
                 SparseCfg("dot", 64, 128, 64, 4, 4, swap=True))
EXPAND_THEN_DENSE = "expand-then-dense"
CUSPARSELT = "cusparselt"
SMALL_M = 64  # at and below: the kernels above; above: expand + cuBLAS vs cuSPARSELt


def _fit(cfg: SparseCfg, k: int, g: int) -> SparseCfg:
    return cfg._replace(bk=fit_k_block(cfg.bk, k, g, 64))


def cusparselt_allowed() -> bool:
    """Whether float 2:4 layers may keep a cuSPARSELt copy of their weight for large M
    (LOWBIT_CUSPARSELT=0: no). The copy is as large as the compact weight, so a bf16 model
    that uses it for its prefill holds about the dense model's bytes again (H200, 32 layers:
    8.8 GiB of 2:4 weights, 17.1 GiB at peak); without it large M runs "expand, then dense",
    slower than dense bf16, and the memory win stays."""
    return os.environ.get("LOWBIT_CUSPARSELT", "1") != "0"


def candidates(x: torch.Tensor, n: int, k: int, g: int, fmt: int) -> list:
    m = x.shape[0]
    cands: list = []
    if m <= 16:
        for cfg in _GEMV_TILES[m_bucket(m)]:
            cfg = _fit(cfg, k, g)
            programs = triton.cdiv(n, cfg.bn) * cfg.warps
            cands += [cfg._replace(split=s)
                      for s in split_options(programs, k // cfg.bk, 8 * num_sms(x))]
    if 1 < m <= SMALL_M:
        for cfg in (_DOT_TILES if m <= 16 else _DOT_TILES_64):
            cfg = _fit(cfg, k, g)
            tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
            cands += [cfg._replace(split=s)
                      for s in split_options(tiles, k // cfg.bk, 2 * num_sms(x))]
    if m > 16:
        cands.append(EXPAND_THEN_DENSE)
    if (m > SMALL_M and fmt == FLOAT and x.dtype in (torch.bfloat16, torch.float16)
            and cusparselt_allowed() and x.is_cuda and cusparselt_runs(x.device.index or 0,
                                                                      x.dtype)):
        cands.append(CUSPARSELT)
    return list(dict.fromkeys(cands))


class _Weights(NamedTuple):
    values: torch.Tensor
    meta_words: torch.Tensor
    scale: torch.Tensor  # as the kernels read them: see weight_only.param_words
    zero: torch.Tensor
    fmt: int
    has_zero: bool
    g: int
    pairs: int


def _kernel_launch(cfg: SparseCfg, compile_only: bool, x: torch.Tensor, w: _Weights,
                   bias: torch.Tensor | None, out: torch.Tensor) -> None:
    (m, k), n = x.shape, out.shape[1]
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    ng = max(1, cfg.bk // w.g)
    iters = k // cfg.bk // cfg.split
    common = (x, w.values, w.meta_words, w.scale, w.zero, bias if bias is not None else out, dest,
              m, n, w.g, w.values.stride(0), w.meta_words.stride(0), w.scale.stride(0),
              x.stride(0), iters)
    meta = dict(FMT=w.fmt, HAS_ZERO=w.has_zero, HAS_BIAS=bias is not None,
                PARTIAL=cfg.split > 1, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, NG=ng,
                STAGES=cfg.stages, PAIRS=w.pairs, num_warps=cfg.warps, **pdl.options(x))
    if cfg.kind == "gemv":
        launch_kernel(_gemv_kernel, (triton.cdiv(n, cfg.bn), cfg.split), compile_only,
                      *common, **meta)
    else:
        grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split)
        dot_f32 = x.dtype == torch.float32 or not target.native(x)
        launch_kernel(_dot_kernel, grid, compile_only, *common, DOT_F32=dot_f32, SWAP=cfg.swap,
                      **meta)
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


def expand_weight(w: _Weights, k: int, dtype: torch.dtype,
                  compile_only: bool = False) -> torch.Tensor:
    """The dense [N, K] weight in `dtype` (same numbers the kernels multiply with)."""
    n = w.values.shape[0]
    bk = fit_k_block(256, k, w.g, 64)
    bn = 32
    out = torch.empty((n, k), device=w.values.device, dtype=dtype)
    grid = (triton.cdiv(n, bn), k // bk)
    launch_kernel(_expand_kernel, grid, compile_only, w.values, w.meta_words, w.scale, w.zero,
                  out, n, k, w.g, w.values.stride(0), w.meta_words.stride(0), w.scale.stride(0),
                  FMT=w.fmt, HAS_ZERO=w.has_zero, BN=bn, BK=bk, NG=max(1, bk // w.g),
                  PAIRS=w.pairs, num_warps=4)
    return out


def _expand_then_dense(compile_only: bool, x, w: _Weights, bias, out) -> None:
    dense = expand_weight(w, x.shape[1], x.dtype, compile_only)
    if compile_only:
        return
    if bias is None:
        torch.mm(x, dense.t(), out=out)
    else:
        torch.addmm(bias.to(x.dtype), x, dense.t(), out=out)


# cuSPARSELt keeps its own compressed copy of a weight; it is built when the tuner first times
# that candidate and dropped again if it loses, so only layers that use it pay the memory. The
# entry holds the kept values, so their address cannot be reused while it lives, and the key
# has their version counters, so an in-place load into the weight invalidates it.
_CSLT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _cslt_key(w: _Weights, dtype: torch.dtype) -> tuple:
    return (w.values.data_ptr(), w.meta_words.data_ptr(), tuple(w.values.shape), dtype,
            w.values._version, w.meta_words._version)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, stride_src, BR: tl.constexpr, BC: tl.constexpr):
    """dst[c, r] = src[r, c]: src [R, >= C] with row stride stride_src, dst [C, R] contiguous.
    A tile is loaded along src rows and stored along dst rows, both coalesced."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tile = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(dst_ptr + cols.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(tile),
             mask=tl.trans(mask))


def transpose_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """out [C, R] = the first C columns of src [R, >= C], transposed (torch's strided copy of the
    transposed view took 4x-20x as long on the H200: results/cslt_layouts.json)."""
    r, c = out.shape[1], out.shape[0]
    assert src.shape[0] == r and src.shape[1] >= c and src.stride(1) == 1 and out.is_contiguous()
    grid = (triton.cdiv(r, 64), triton.cdiv(c, 64))
    _transpose_kernel[grid](src, out, r, c, src.stride(0), BR=64, BC=64, num_warps=4)


def cslt_mm_t(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x [M, K] @ W^T + bias)^T as [N, M'] (M' = M padded to a multiple of 8, cuSPARSELt's
    minimum for 16-bit inputs), W compressed by `torch._cslt_compress`.

    cuSPARSELt computes W @ x^T; asking it for the transposed (row-major [M, N]) result ran
    1.3x-1.5x slower on the H200 than this layout plus `transpose_into`."""
    pad = -x.shape[0] % 8
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    return torch._cslt_sparse_mm(packed, xp.t(), None if bias is None else bias.to(x.dtype))


@functools.cache
def cusparselt_runs(device_index: int, dtype: torch.dtype) -> bool:
    """Whether `cslt_mm_t` runs here and is right (it needs cuSPARSELt and a supported GPU);
    probed once on a small non-square 2:4 matrix with a bias."""
    try:
        dev = torch.device("cuda", device_index)
        w = torch.tensor([1.0, 0.0, 0.0, 1.0], device=dev, dtype=dtype).repeat(192, 32)
        w = w * torch.arange(1, 193, device=dev, dtype=dtype)[:, None]
        x = torch.randn(64, 128, device=dev).to(dtype)
        bias = torch.randn(192, device=dev).to(dtype)
        y = cslt_mm_t(x, torch._cslt_compress(w), bias).t()
        ref = x.float() @ w.float().t() + bias.float()
        return y.shape == ref.shape and bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=1e-1))
    except Exception:  # any failure (no cuSPARSELt, unsupported GPU or dtype) means "no"
        return False


def _cslt_packed(x: torch.Tensor, w: _Weights) -> torch.Tensor:
    key = _cslt_key(w, x.dtype)
    entry = _CSLT_CACHE.get(key)
    if entry is None:
        entry = (torch._cslt_compress(expand_weight(w, x.shape[1], x.dtype)), w.values)
        _CSLT_CACHE[key] = entry
    return entry[0]


def _cusparselt(compile_only: bool, x, w: _Weights, bias, out) -> None:
    if not compile_only:
        transpose_into(cslt_mm_t(x, _cslt_packed(x, w), bias), out)


TUNER = Tuner()
_SETTLED: set = set()  # keys whose choice is made (the cuSPARSELt copy is kept only if it won)


def launch(cand, compile_only: bool, x: torch.Tensor, w: _Weights,
           bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Run (or only compile) one candidate: a SparseCfg, EXPAND_THEN_DENSE or CUSPARSELT."""
    if cand == EXPAND_THEN_DENSE:
        _expand_then_dense(compile_only, x, w, bias, out)
    elif cand == CUSPARSELT:
        _cusparselt(compile_only, x, w, bias, out)
    else:
        _kernel_launch(cand, compile_only, x, w, bias, out)


def pack_weights(values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None,
                 zero: torch.Tensor | None, bits: int, k: int) -> _Weights:
    """The stored fields as the kernels read them (metadata as int32 words)."""
    fmt = _FMT_BY_BITS[bits]
    assert k % 64 == 0 and meta.shape[1] * 8 == k, (k, meta.shape)
    values = values.contiguous()
    if fmt == FLOAT:
        scale = zero = values  # unused pointers
        g = k
    else:
        g = k // scale.shape[1]
        assert g * scale.shape[1] == k and g % 4 == 0, (k, scale.shape)
        scale = scale.contiguous()
    has_zero = zero is not None and fmt == INT4
    zero = zero.contiguous() if has_zero else scale
    pairs = 0
    if fmt != FLOAT:
        scale, zero, pairs = param_words(scale, zero)
    return _Weights(values, meta.contiguous().view(torch.int32), scale, zero, fmt, has_zero, g,
                    pairs)


def _reference_columns(x, values, meta, scale, zero, bias, bits: int,
                       cols: torch.Tensor) -> torch.Tensor:
    """fp32 output columns `cols` of the reference sparse linear (the tuner's check)."""
    from lowbit.kernels import sparse_ops

    b = None if bias is None else bias[cols].float()
    if bits == 0:
        return sparse_ops.sparse24_linear_ref(x.float(), values[cols], meta[cols], b)
    z = None if zero is None else zero[cols]
    return sparse_ops.sparse24_intx_linear_ref(x.float(), values[cols], meta[cols], scale[cols],
                                               z, b, bits)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                scale: torch.Tensor | None, zero: torch.Tensor | None,
                bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] @ expand(kept values, meta)^T (+ bias). `bits` 0: float values [N, K/2];
    8: int8 codes [N, K/2]; 4: packed int4 codes [N, K/4]; scales (and int4 zeros) [N, K/g]."""
    m, k = x.shape
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    w = pack_weights(values, meta, scale, zero, bits, k)
    n = values.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    key = ("sparse24", w.fmt, w.has_zero, x.dtype, m_bucket(m), n, k, w.g)
    first = key not in _SETTLED
    check = functools.partial(matches_reference, out, functools.partial(
        _reference_columns, x, values, meta, scale, zero, bias, bits))
    TUNER.run(key, candidates(x, n, k, w.g, w.fmt),
              lambda c, co: launch(c, co, x, w, bias, out), x.device, check)
    if first:
        _SETTLED.add(key)
        if TUNER.chosen().get(key) != CUSPARSELT:
            _CSLT_CACHE.pop(_cslt_key(w, x.dtype), None)
    return out
