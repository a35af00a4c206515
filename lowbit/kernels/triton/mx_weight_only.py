"""Weight-only MX / NVFP4 matmuls in Triton for M = 1..16: packed codes in, decoded in registers.

Hopper has no MX tensor-core instructions, so at decode sizes the fastest path is the one the
int4 kernels take (`weight_only.py`, whose tuner, split-K reduction, launch helpers and GEMM tile
table this module reuses): stream the packed bytes once and decode on the fly.
* ``M == 1``: a CUDA-core GEMV laid out exactly like the int4 one: 32-bit words loaded as
  16-byte vectors, one warp per 512-byte row segment, products reduced per scale block and
  scaled afterwards (one multiply per block, not per weight), optional K split.
* ``2 <= M <= 16``: a ``tl.dot`` GEMM on weight tiles decoded and scaled in registers.

Decoding is exact and needs no table:
* FP4 E2M1 ``s e e m`` is turned into the FP8 E4M3 byte ``s 0 0 e e m 0 0`` (value * 2^-6,
  subnormal included) for a whole word of 8 codes with a few shifts and masks, then the
  hardware e4m3x2 conversion of the fp8 path decodes 2 codes per instruction.
* FP8 E4M3 uses that conversion directly. E5M2 and the FP6 types are bit placements into an
  fp16 (``sign << 15 | magnitude << (10 - mbits)``, value * 2^-(15 - bias)), converted to fp32
  by the exact f16 -> f32 instruction, so fp32 denormals (and flush-to-zero) never occur.
* The constant 2^X those placements remove (X <= 14) is folded into the block scale: E8M0
  code c gives 2^(c - 127 + X) straight from its bits, exact for c <= 254 - X and saturating
  to inf above (scales beyond 2^113, far outside any real weight); 0xFF is NaN as the spec
  says. NVFP4's E4M3 block scales go through the fp16 placement too; the float32 tensor scale
  multiplies the sums.
E4M3 NaN codes (elements, or NVFP4 block scales) decode as NaN only through the hardware
conversion of the compiled element path; the quantizers never produce them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.formats import mx

from . import target
from .weight_only import (
    _GEMM_TILES,
    _GEMV_TILES,
    GemmCfg,
    GemvCfg,
    Tuner,
    _decode,
    _dot,
    _positions,
    fit_k_block,
    gemm_candidates,
    launch_kernel,
    m_bucket,
    num_sms,
    split_options,
    splitk_reduce,
    store_tile,
)

# Element type ids (constexpr in the kernels).
E2M1, E4M3, E5M2, E2M3, E3M2 = 0, 1, 2, 3, 4
_ELEM_ID = {"e2m1": E2M1, "e4m3": E4M3, "e5m2": E5M2, "e2m3": E2M3, "e3m2": E3M2}
# Codes per unit and 32-bit words per unit: FP4 8 in a word, FP8 4, FP6 16 in three words.
_CODES_PER_UNIT = {E2M1: 8, E4M3: 4, E5M2: 4, E2M3: 16, E3M2: 16}
# log2 of the factor the decoded values are short of (see the module docstring).
_SCALE_SHIFT = {E2M1: 6, E4M3: 0, E5M2: 0, E2M3: 14, E3M2: 12}
_MASK80 = tl.constexpr(-2139062144)  # 0x80808080 as int32: the sign bit of every byte
MAX_M = 16


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@triton.jit
def _f16_place(code, MAGB: tl.constexpr, MBITS: tl.constexpr):
    """Right-aligned sign / MAGB magnitude bits -> fp32 value * 2^-(15 - bias), exactly.

    The magnitude lands in an fp16's exponent and mantissa fields with the mantissa top-aligned,
    so the fp16 is the code with its exponent bias moved to 15 (subnormals included)."""
    mag = (code & ((1 << MAGB) - 1)) << (10 - MBITS)
    sign = ((code >> MAGB) & 1) << 15
    return (mag | sign).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp4_values(w, ASM: tl.constexpr):
    """int32 words of 8 E2M1 codes (low nibble first) -> 8 fp32 tensors, value * 2^-6, k order.

    Each nibble's magnitude moves to bits 2..4 and its sign to bit 7 of a byte: the E4M3 code of
    the same value * 2^-6. Even codes fill one word, odd codes another."""
    lo = ((w << 2) & 0x1C1C1C1C) | ((w << 4) & _MASK80)
    hi = ((w >> 2) & 0x1C1C1C1C) | (w & _MASK80)
    a = _decode(lo, 2, ASM)
    b = _decode(hi, 2, ASM)
    return a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]


@triton.jit
def _fp6_values(w0, w1, w2, MBITS: tl.constexpr):
    """Three int32 words (a little-endian stream of 16 six-bit codes) -> 16 fp32 tensors."""
    a = w0.to(tl.uint32, bitcast=True)
    b = w1.to(tl.uint32, bitcast=True)
    c = w2.to(tl.uint32, bitcast=True)
    return (_f16_place(a, 5, MBITS), _f16_place(a >> 6, 5, MBITS),
            _f16_place(a >> 12, 5, MBITS), _f16_place(a >> 18, 5, MBITS),
            _f16_place(a >> 24, 5, MBITS), _f16_place((a >> 30) | (b << 2), 5, MBITS),
            _f16_place(b >> 4, 5, MBITS), _f16_place(b >> 10, 5, MBITS),
            _f16_place(b >> 16, 5, MBITS), _f16_place(b >> 22, 5, MBITS),
            _f16_place((b >> 28) | (c << 4), 5, MBITS), _f16_place(c >> 2, 5, MBITS),
            _f16_place(c >> 8, 5, MBITS), _f16_place(c >> 14, 5, MBITS),
            _f16_place(c >> 20, 5, MBITS), _f16_place(c >> 26, 5, MBITS))


@triton.jit
def _values(w0, w1, w2, ELEM: tl.constexpr, ASM: tl.constexpr):
    """Decoded codes of one unit (see _CODES_PER_UNIT) as fp32 tensors in k order."""
    if ELEM == 0:
        return _fp4_values(w0, ASM)
    elif ELEM == 1:
        return _decode(w0, 2, ASM)
    elif ELEM == 2:
        return (_f16_place(w0, 7, 2), _f16_place(w0 >> 8, 7, 2), _f16_place(w0 >> 16, 7, 2),
                _f16_place(w0 >> 24, 7, 2))
    elif ELEM == 3:
        return _fp6_values(w0, w1, w2, 3)
    else:
        return _fp6_values(w0, w1, w2, 2)


@triton.jit
def _scale(code, NV: tl.constexpr, SHIFT: tl.constexpr):
    """Block scale codes (int32) -> fp32 scale * 2^SHIFT (SHIFT undoes the decode's factor).

    E8M0: 2^(code - 127 + SHIFT) from its bits (exponent field 0 is 2^-127, the fp32 denormal
    0x00400000), saturating to inf, 0xFF -> NaN. E4M3 (NVFP4): the fp16 placement (value *
    2^-8), times 2^(8 + SHIFT)."""
    if NV:
        return _f16_place(code, 7, 3) * (2.0 ** (8 + SHIFT))
    e = tl.minimum(code + SHIFT, 255)
    s = tl.where(e == 0, 1 << 22, e << 23).to(tl.float32, bitcast=True)
    return tl.where(code == 255, float("nan"), s)


@triton.jit
def _join4(a, b, c, d):
    """4 tensors [...] -> [..., 4] in argument order, as joins (register moves only)."""
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def _join8(a, b, c, d, e, f, g, h):
    return tl.join(_join4(a, c, e, g), _join4(b, d, f, h))


@triton.jit
def _weight_tile(w0, w1, w2, s, ELEM: tl.constexpr, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """[BN, G, UPG] units and [BN, G] block scales -> [BN, BK] weights in DTYPE, k order.

    Joins (register moves only) put code i of unit u of block g at k = (g * UPG + u) * CPU + i.
    """
    CPU: tl.constexpr = 16 if ELEM >= 3 else (8 if ELEM == 0 else 4)
    BN: tl.constexpr = s.shape[0]
    BK: tl.constexpr = s.shape[1] * w0.shape[2] * CPU
    v = _values(w0, w1, w2, ELEM, ASM)
    s = s[:, :, None]
    if CPU == 4:
        t = _join4((v[0] * s).to(DTYPE), (v[1] * s).to(DTYPE), (v[2] * s).to(DTYPE),
                   (v[3] * s).to(DTYPE))
    elif CPU == 8:
        t = _join8((v[0] * s).to(DTYPE), (v[1] * s).to(DTYPE), (v[2] * s).to(DTYPE),
                   (v[3] * s).to(DTYPE), (v[4] * s).to(DTYPE), (v[5] * s).to(DTYPE),
                   (v[6] * s).to(DTYPE), (v[7] * s).to(DTYPE))
    else:
        t = tl.join(
            _join8((v[0] * s).to(DTYPE), (v[2] * s).to(DTYPE), (v[4] * s).to(DTYPE),
                   (v[6] * s).to(DTYPE), (v[8] * s).to(DTYPE), (v[10] * s).to(DTYPE),
                   (v[12] * s).to(DTYPE), (v[14] * s).to(DTYPE)),
            _join8((v[1] * s).to(DTYPE), (v[3] * s).to(DTYPE), (v[5] * s).to(DTYPE),
                   (v[7] * s).to(DTYPE), (v[9] * s).to(DTYPE), (v[11] * s).to(DTYPE),
                   (v[13] * s).to(DTYPE), (v[15] * s).to(DTYPE)))
    return tl.reshape(t, (BN, BK))


@triton.jit
def _unit_words(U: tl.constexpr, WPU: tl.constexpr):
    """Word offset of each of U units. A plain arange when units are single words, so the
    compiler sees contiguous addresses and issues 16-byte loads."""
    if WPU == 1:
        return tl.arange(0, U)
    return WPU * tl.arange(0, U)


# --------------------------------------------------------------------------------------------
# M == 1: GEMV on CUDA cores
# --------------------------------------------------------------------------------------------


@triton.jit
def _mx_gemv_kernel(
    x_ptr, w_ptr, s_ptr, ts_ptr, b_ptr, out_ptr,
    N, WORDS, stride_s, ITERS,
    ELEM: tl.constexpr, NV: tl.constexpr, SHIFT: tl.constexpr, BN: tl.constexpr,
    U: tl.constexpr, UPG: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    STAGES: tl.constexpr, ASM: tl.constexpr,
):
    """y[n] = ts * sum over blocks of scale * sum_k x[k] v[n, k] for BN rows, U units per step.

    FP4 / FP8: the [BN, U] word tile is contiguous along K, so (as in the int4 GEMV) threads span
    K in 16-byte pieces and each thread's activations are shared by its rows. FP6: three
    word-strided loads give the three words of each 16-code unit.
    """
    CPU: tl.constexpr = 16 if ELEM >= 3 else (8 if ELEM == 0 else 4)
    WPU: tl.constexpr = 3 if ELEM >= 3 else 1
    G: tl.constexpr = U // UPG
    BK: tl.constexpr = U * CPU
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * WORDS + _unit_words(U, WPU)[None, :]
    if CPU == 16:
        x_offs = tl.arange(0, U)[:, None] * 16 + tl.arange(0, 16)[None, :]
    else:
        # One thread's 4 words are 4 * CPU contiguous activations: load them as such.
        x_offs = (tl.arange(0, U // 4)[:, None, None] * (4 * CPU)
                  + tl.arange(0, 4)[None, :, None] * CPU + tl.arange(0, CPU)[None, None, :])
    s_ptrs = s_ptr + offs_n[:, None] * stride_s + tl.arange(0, G)[None, :]
    acc = tl.zeros((BN, G), tl.float32)
    it0 = pid_k * ITERS
    for step in tl.range(0, ITERS, num_stages=STAGES):
        it = it0 + step
        wp = w_ptrs + it * (U * WPU)
        w0 = tl.load(wp, mask=nmask[:, None], other=0)
        if WPU == 3:
            w1 = tl.load(wp + 1, mask=nmask[:, None], other=0)
            w2 = tl.load(wp + 2, mask=nmask[:, None], other=0)
        else:
            w1 = w0
            w2 = w0
        code = tl.load(s_ptrs + it * G, mask=nmask[:, None], other=0).to(tl.int32)
        xv = tl.load(x_ptr + it * BK + x_offs).to(tl.float32)
        v = _values(w0, w1, w2, ELEM, ASM)
        t = tl.zeros((BN, U), tl.float32)
        if CPU == 16:
            xe, xo = tl.split(tl.reshape(xv, (U, 8, 2)))
            e = _positions(xe, 8)
            o = _positions(xo, 8)
            for i in tl.static_range(8):
                t += v[2 * i] * e[i][None, :]
                t += v[2 * i + 1] * o[i][None, :]
        else:
            xs = _positions(xv, CPU)
            for i in tl.static_range(CPU):
                t += v[i] * tl.reshape(xs[i], (U,))[None, :]
        part = tl.sum(tl.reshape(t, (BN, G, UPG)), axis=2)
        acc += part * _scale(code, NV, SHIFT)
    y = tl.sum(acc, axis=1)
    if NV:
        y *= tl.load(ts_ptr)
    if PARTIAL:
        tl.store(out_ptr + pid_k * N + offs_n, y, mask=nmask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


def _check_split(k: int, bk: int, split: int) -> None:
    if k % (bk * split):
        raise ValueError(f"K={k} is not a whole number of {split} x {bk}-wide K steps")


def _gemv_units(cfg: GemvCfg, k: int, elem: int) -> int:
    """Units per row per step: the int4 tile's words (FP6: a quarter, 384 bytes for 128)."""
    cpu = _CODES_PER_UNIT[elem]
    units = cfg.bkw // 4 if cpu == 16 else cfg.bkw
    return fit_k_block(units * cpu, k, mx.MX_BLOCK, mx.MX_BLOCK) // cpu


def _gemv_candidates(x: torch.Tensor, n: int, k: int, elem: int) -> list[GemvCfg]:
    cands = []
    for cfg in _GEMV_TILES:
        iters = k // (_gemv_units(cfg, k, elem) * _CODES_PER_UNIT[elem])
        programs = triton.cdiv(n, cfg.bn) * cfg.warps
        cands += [cfg._replace(split=s) for s in split_options(programs, iters, 8 * num_sms(x))]
    return list(dict.fromkeys(cands))


def _gemv_launch(cfg: GemvCfg, compile_only: bool, x, words, scale, ts, bias, out, elem: int,
                 block: int, nv: bool) -> None:
    n, k = out.shape[1], x.shape[1]
    cpu = _CODES_PER_UNIT[elem]
    units = _gemv_units(cfg, k, elem)
    _check_split(k, units * cpu, cfg.split)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, 1, n), device=out.device, dtype=torch.float32)
    launch_kernel(
        _mx_gemv_kernel, (triton.cdiv(n, cfg.bn), cfg.split), compile_only,
        x, words, scale, ts, bias if bias is not None else out, dest,
        n, words.stride(0), scale.stride(0), k // (units * cpu) // cfg.split,
        ELEM=elem, NV=nv, SHIFT=_SCALE_SHIFT[elem], BN=cfg.bn, U=units, UPG=block // cpu,
        HAS_BIAS=bias is not None, PARTIAL=cfg.split > 1, STAGES=cfg.stages,
        ASM=target.native(x), num_warps=cfg.warps,
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


# --------------------------------------------------------------------------------------------
# 2 <= M <= 16: GEMM with tl.dot
# --------------------------------------------------------------------------------------------


@triton.jit
def _mx_gemm_kernel(
    x_ptr, w_ptr, s_ptr, ts_ptr, b_ptr, out_ptr,
    M, N, WORDS, stride_xm, stride_s, ITERS,
    ELEM: tl.constexpr, NV: tl.constexpr, SHIFT: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, G: tl.constexpr, UPG: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr,
):
    """out[m, n] = ts * sum_k x[m, k] w[n, k]: G scale blocks per step decoded, scaled and rounded
    to x's dtype in registers (exact for bf16: elements have <= 3 mantissa bits and MX scales
    are powers of two; NVFP4 tiles leave out the tensor scale), then one tl.dot.

    DOT_F32 runs the dot on fp32 copies (exact IEEE fp32 for fp32 x, and the interpreter, whose
    bf16 dot is wrong); SWAP computes out^T = w x^T (see the weight-only GEMM)."""
    CPU: tl.constexpr = 16 if ELEM >= 3 else (8 if ELEM == 0 else 4)
    WPU: tl.constexpr = 3 if ELEM >= 3 else 1
    BK: tl.constexpr = G * UPG * CPU
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    unit = tl.arange(0, G)[:, None] * UPG + tl.arange(0, UPG)[None, :]
    if WPU == 3:
        unit = 3 * unit
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None, None] * WORDS + unit[None, :, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_s + tl.arange(0, G)[None, :]

    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    it0 = pid_k * ITERS
    for step in range(ITERS):
        it = it0 + step
        xt = tl.load(x_ptrs + it * BK, mask=mmask[:, None], other=0.0)
        wp = w_ptrs + it * (G * UPG * WPU)
        w0 = tl.load(wp, mask=nmask[:, None, None], other=0)
        if WPU == 3:
            w1 = tl.load(wp + 1, mask=nmask[:, None, None], other=0)
            w2 = tl.load(wp + 2, mask=nmask[:, None, None], other=0)
        else:
            w1 = w0
            w2 = w0
        code = tl.load(s_ptrs + it * G, mask=nmask[:, None], other=0).to(tl.int32)
        wt = _weight_tile(w0, w1, w2, _scale(code, NV, SHIFT), ELEM, ASM, DTYPE)
        if SWAP:
            acc = _dot(wt, tl.trans(xt), acc, DOT_F32)
        else:
            acc = _dot(xt, tl.trans(wt), acc, DOT_F32)
    if SWAP:
        acc = tl.trans(acc)
    if NV:
        acc *= tl.load(ts_ptr)
    store_tile(out_ptr, b_ptr, acc, offs_m, offs_n, mmask, nmask, M, N, pid_k, HAS_BIAS, PARTIAL)


def _gemm_launch(cfg: GemmCfg, compile_only: bool, x, words, scale, ts, bias, out, elem: int,
                 block: int, nv: bool) -> None:
    (m, k), n = x.shape, out.shape[1]
    _check_split(k, cfg.bk, cfg.split)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    launch_kernel(
        _mx_gemm_kernel, (triton.cdiv(n, cfg.bn), cfg.split), compile_only,
        x, words, scale, ts, bias if bias is not None else out, dest,
        m, n, words.stride(0), x.stride(0), scale.stride(0), k // cfg.bk // cfg.split,
        ELEM=elem, NV=nv, SHIFT=_SCALE_SHIFT[elem], BM=cfg.bm, BN=cfg.bn, G=cfg.bk // block,
        UPG=block // _CODES_PER_UNIT[elem], HAS_BIAS=bias is not None, PARTIAL=cfg.split > 1,
        DOT_F32=x.dtype == torch.float32 or not target.native(x),
        ASM=target.native(x), SWAP=cfg.swap, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

TUNER = Tuner()


def _run(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
         tensor_scale: torch.Tensor | None, bias: torch.Tensor | None,
         fmt: mx.ElemFormat, block: int, config: GemvCfg | GemmCfg | None = None) -> torch.Tensor:
    """Validate, then run the tuned GEMV (M = 1) or GEMM (M > 1); `config` forces one launch
    configuration (tests use it to reach every path)."""
    m, k = x.shape
    n = qdata.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the MX decode kernel takes 1..{MAX_M} rows, got {m}")
    if k % mx.MX_BLOCK:
        raise ValueError(f"the MX decode kernel needs K a multiple of {mx.MX_BLOCK}, got {k}")
    if scale.shape != (n, k // block) or tuple(qdata.shape) != (n, k * fmt.bits // 8):
        raise ValueError(f"packed weight {tuple(qdata.shape)} / scales {tuple(scale.shape)} do "
                         f"not match K={k} for {fmt.name} in blocks of {block}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"activations must be bf16, fp16 or fp32, got {x.dtype}")
    if qdata.dtype != torch.uint8:
        raise TypeError(f"packed weight codes must be uint8, got {qdata.dtype}")
    elem = _ELEM_ID[fmt.name]
    x = x if x.stride(1) == 1 else x.contiguous()
    words = qdata.contiguous().view(torch.int32)
    scale = scale.contiguous().view(torch.uint8)
    nv = tensor_scale is not None
    ts = tensor_scale.float().contiguous() if nv else scale
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    args = (x, words, scale, ts, bias, out, elem, block, nv)
    if m == 1:
        key = ("gemv", elem, block, x.dtype, n, k)
        cands: list = _gemv_candidates(x, n, k, elem)
        launch = _gemv_launch
    else:
        key = ("gemm", elem, block, x.dtype, m_bucket(m), n, k)
        cands = gemm_candidates(_GEMM_TILES, x, n, k, block, mx.MX_BLOCK)
        launch = _gemm_launch
    if config is not None:
        launch(config, False, *args)
    else:
        TUNER.run(key, cands, lambda c, compile_only: launch(c, compile_only, *args), x.device)
    return out


def mx_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, elem: str) -> torch.Tensor:
    """x [M, K] (M <= 16, K % 32 == 0) @ MX weight^T (+ bias): qdata packed uint8
    [N, K * bits / 8] (`lowbit.formats.mx.pack_elements`), scale E8M0 codes uint8 [N, K / 32]."""
    return _run(x, qdata, scale, None, bias, mx.elem_format(elem), mx.MX_BLOCK)


def nvfp4_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, block_scale: torch.Tensor,
                         tensor_scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (M <= 16, K % 32 == 0) @ NVFP4 weight^T (+ bias): qdata uint8 [N, K / 2],
    block_scale float8_e4m3fn [N, K / 16], tensor_scale float32 [1]."""
    return _run(x, qdata, block_scale, tensor_scale, bias, mx.E2M1, mx.NVFP4_BLOCK)
