"""Dynamic int8 quantization: per-token int8 activations times int8 weights, int32 accumulation.

``quantize_per_token_int8`` reads each row of x once (amax and quantize from registers).
``int8_dynamic_mm`` then runs an int8 ``tl.dot`` GEMM whose epilogue applies both scales, the
bias and the cast, so the int32 product never goes to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .weight_only import (
    TUNER,
    GemmCfg,
    gemm_candidates,
    launch_kernel,
    m_bucket,
    splitk_reduce,
    store_tile,
)

# Longest row quantized in one pass (the row is held in registers).
_MAX_ROW = 32768


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """One row per program: scale = max(amax|x|, 1e-12) / 127, q = rne(x / scale) in [-127, 127]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # IEEE divisions (not Triton's default approximate one) keep the result bit-exact with torch.
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)
    v = tl.math.div_rn(x, scale)
    # Adding and removing 1.5 * 2**23 rounds |v| < 2**22 to the nearest integer, ties to even.
    v = (v + 12582912.0) - 12582912.0
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    tl.store(q_ptr + row * K + offs, v.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], fp32 scale [M, 1]) with symmetric per-row scales."""
    m, k = x.shape
    block = triton.next_power_of_2(k)
    assert block <= _MAX_ROW, f"rows longer than {_MAX_ROW} are not supported"
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        warps = max(1, min(16, block // 256))
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK=block, num_warps=warps)
    return q, scale


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr,
    M, N, ITERS, stride_am, stride_bn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
):
    """out = (a @ b^T as int32) * a_scale * b_scale^T (+ bias), a [M, K] and b [N, K] int8."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows
    pid_n = (pid % (GROUP_M * num_n)) // rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BM, BN), tl.int32)
    it0 = pid_k * ITERS
    for step in range(ITERS):
        it = it0 + step
        a = tl.load(a_ptrs + it * BK, mask=mmask[:, None], other=0)
        b = tl.load(b_ptrs + it * BK, mask=nmask[:, None], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)

    a_scale = tl.load(as_ptr + offs_m, mask=mmask, other=0.0)
    b_scale = tl.load(bs_ptr + offs_n, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    store_tile(out_ptr, bias_ptr, y, offs_m, offs_n, mmask, nmask, M, N, pid_k, HAS_BIAS, PARTIAL)


# Candidates by M bucket; int8 tensor cores take 32-deep k steps, so BK >= 64 throughout.
_INT8_TILES = {
    16: (GemmCfg(16, 64, 256, 4, 4), GemmCfg(16, 128, 128, 4, 4)),
    64: (GemmCfg(64, 64, 256, 4, 4), GemmCfg(64, 128, 128, 4, 4)),
    256: (GemmCfg(64, 128, 128, 4, 4), GemmCfg(128, 128, 128, 8, 4)),
    1 << 62: (GemmCfg(128, 256, 128, 8, 3), GemmCfg(128, 256, 128, 8, 4),
              GemmCfg(256, 128, 128, 8, 3), GemmCfg(256, 128, 128, 8, 4),
              GemmCfg(128, 128, 128, 8, 4)),
}


def _int8_mm_launch(cfg: GemmCfg, compile_only: bool, xq, x_scale, qdata, w_scale, bias,
                    out) -> None:
    (m, k), n = xq.shape, qdata.shape[0]
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), cfg.split)
    launch_kernel(
        _int8_gemm_kernel, grid, compile_only,
        xq, qdata, x_scale, w_scale, bias if bias is not None else out, dest,
        m, n, k // cfg.bk // cfg.split, xq.stride(0), qdata.stride(0),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8,
        HAS_BIAS=bias is not None, PARTIAL=cfg.split > 1,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


def int8_dynamic_mm(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize x per token to int8, then (xq @ qdata^T) * x_scale * w_scale^T (+ bias).

    qdata is int8 [N, K], w_scale fp32 [N, 1]; the result has x's dtype.
    """
    m, k = x.shape
    n = qdata.shape[0]
    assert k % 32 == 0 and qdata.shape[1] == k and w_scale.numel() == n, (x.shape, qdata.shape)
    xq, x_scale = quantize_per_token_int8(x)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    qdata = qdata.contiguous()
    w_scale = w_scale.contiguous().to(torch.float32)
    key = ("int8_dynamic", x.dtype, m_bucket(m), n, k)
    TUNER.run(key, gemm_candidates(_INT8_TILES, x, n, k, k, 64),
              lambda c, co: _int8_mm_launch(c, co, xq, x_scale, qdata, w_scale, bias, out),
              x.device)
    return out


@triton.jit
def _quantize_rows_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr,
                              PER_ROW: tl.constexpr, FAKE: tl.constexpr):
    """One row per program. e4m3 codes of x / scale, saturated to +-448, rounded to nearest.

    PER_ROW: scale = max(amax|x|, 1e-12) / 448, stored per row; else the scale is read from
    s_ptr[0]. FAKE writes the rounded activations back in x's dtype (q * scale) instead of
    the codes: the small-M path feeds them to the fp8 weight-only GEMV.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
    else:
        scale = tl.load(s_ptr)
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    q = v.to(tl.float8e4nv)
    if FAKE:
        tl.store(q_ptr + row * K + offs, (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(q_ptr + row * K + offs, q, mask=mask)
        if PER_ROW:
            tl.store(s_ptr + row, scale)


def quantize_fp8_rows(x: torch.Tensor, per_row: bool,
                      fake: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], fp32 scales [M, 1] or [1, 1]) in one pass over x.

    With fake=True the first result is instead q * scale in x's dtype (same rounding).
    """
    m, k = x.shape
    block = triton.next_power_of_2(k)
    assert block <= _MAX_ROW, f"rows longer than {_MAX_ROW} are not supported"
    x = x if x.stride(1) == 1 else x.contiguous()
    if per_row:
        scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    else:
        scale = (x.abs().amax().float() / 448.0).clamp(min=1e-12).reshape(1, 1)
    q = torch.empty((m, k), device=x.device, dtype=x.dtype if fake else torch.float8_e4m3fn)
    if m:
        warps = max(1, min(16, block // 256))
        _quantize_rows_fp8_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK=block,
                                        PER_ROW=per_row, FAKE=fake, num_warps=warps)
    return q, scale
