"""Fused Adam(W) steps in Triton: one launch updates many parameters. Each program takes a
slice of one parameter, decodes its blocks of both moments, updates moments and parameter in
registers and re-encodes the moments, so every byte of parameter, gradient and state is read
once and written once. Parameters are found through a table of addresses (one launch, not one
per tensor: launching ~200 kernels cost more host time than their GPU time on an H200).

It computes what `lowbit.optim.functional.adam_step_` (the reference and CPU path) computes,
in the same order of float32 operations (correctly rounded division and square root, bias
corrections from an exact power, the lerp as one fma), so codes agree with the reference
except where a value sits on a rounding boundary. The state layouts are those of
`lowbit.optim.codes`: blocks of `BLOCK` values with one float32 absmax scale each; 8-bit codes
one per byte, 4-bit codes two per byte (low nibble first), fp8 e4m3 as raw bytes. NATIVE
(on the GPU) uses the hardware fp8 conversions and fma; under TRITON_INTERPRET the same
results come from integer arithmetic and float64, so the kernel is tested bit-exact on CPU.

State kinds (constexpr): FLOAT32 (a plain fp32 moment, small parameters), BOOK8, BOOK4 (code
book + the nearest-code cell table of `codes.nearest_code`), FP8.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import target

FLOAT32, BOOK8, BOOK4, FP8 = 0, 1, 2, 3
_E4M3_MAX = tl.constexpr(448.0)
_E4M3_MIN_SUBNORMAL = tl.constexpr(2.0**-9)
_MIN_SCALE = tl.constexpr(1e-30)
# (values, warps) per program. The kernel is bound by instruction latency, not bandwidth
# (Nsight Compute on an H200: 125 registers a thread at 1024 values on 4 warps, 25% occupancy,
# DRAM 27% busy for 8-bit states): one warp per 256 values keeps a block's absmax reduction
# inside the warp and lets 2-3x more warps hide the latency. Chosen by
# benchmarks/bench_optim.py --programs (benchmarks/RESULTS.md): 8-bit step 12.7 -> 10.6 ms.
PROGRAM_SHAPE = (256, 1)
# Offsets are int32 unless a parameter is this large (64-bit address arithmetic costs more).
_INT32_LIMIT = 2**31 - 4096


@triton.jit
def _exact_pow(base, exponent):
    """base ** exponent for a whole-number exponent, in float64 then rounded once to
    float32: what torch's float32 pow returns, so 1 - beta ** step matches the reference."""
    b = base.to(tl.float64)
    r = b * 0.0 + 1.0
    k = exponent.to(tl.int32)
    while k > 0:
        r = tl.where((k & 1) == 1, r * b, r)
        b = b * b
        k = k >> 1
    return r.to(tl.float32)


@triton.jit
def _pow2(e):
    """2.0 ** e for an int32 tensor e in the normal float32 range, built from its bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_encode(y, NATIVE: tl.constexpr):
    """float32 already in [-448, 448] -> e4m3fn bit patterns (uint8), round to nearest even:
    the hardware conversion, or the same in integer arithmetic (the interpreter's is wrong)."""
    if NATIVE:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    mag = tl.abs(y)
    exp = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # below 2^-6 the quantum is fixed: subnormals
    quantum = _pow2(exp - 3)
    # Adding and subtracting 1.5 * 2^23 rounds a float32 below 2^22 to an integer, ties even.
    steps = (mag * _pow2(3 - exp) + 12582912.0) - 12582912.0
    rounded = steps * quantum
    bits = rounded.to(tl.int32, bitcast=True)
    r_exp = ((bits >> 23) & 0xFF) - 127
    normal = ((r_exp + 7) << 3) | ((bits >> 20) & 7)
    sub = (rounded * 512.0).to(tl.int32)
    code = tl.where(r_exp >= -6, normal, sub)
    code = tl.where(rounded == 0.0, 0, code)
    return (code | tl.where(y < 0, 0x80, 0)).to(tl.uint8)


@triton.jit
def _e4m3_decode(code, NATIVE: tl.constexpr):
    if NATIVE:
        return code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    c = code.to(tl.int32)
    exp = (c >> 3) & 15
    man = c & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _load_moment(codes_ptr, scale_ptr, book_ptr, rows, cols, offs, in_range, row_ok,
                 KIND: tl.constexpr, BLOCK: tl.constexpr, NATIVE: tl.constexpr):
    if KIND == 0:
        return tl.load(codes_ptr + offs, mask=in_range, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    in_blocks = row_ok[:, None] & (offs >= 0)
    if KIND == 3:
        return _e4m3_decode(tl.load(codes_ptr + offs, mask=in_blocks, other=0), NATIVE) * scale
    if KIND == 2:
        byte = rows[:, None] * (BLOCK // 2) + cols[None, :] // 2
        packed = tl.load(codes_ptr + byte, mask=in_blocks, other=0)
        code = (packed >> ((cols[None, :] & 1) * 4).to(tl.uint8)) & 0xF
    else:
        code = tl.load(codes_ptr + offs, mask=in_blocks, other=0)
    return tl.load(book_ptr + code.to(tl.int32)) * scale


@triton.jit
def _store_moment(value, codes_ptr, scale_ptr, table_ptr, rows, offs, in_range, row_ok,
                  KIND: tl.constexpr, POSITIVE: tl.constexpr, LUT_BITS: tl.constexpr,
                  LUT_FIRST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                  NATIVE: tl.constexpr):
    if KIND == 0:
        tl.store(codes_ptr + offs, value, mask=in_range)
    else:
        # Padding past the parameter's end encodes as 0, as `codes.to_blocks` pads.
        in_blocks = row_ok[:, None] & (offs >= 0)
        value = tl.where(in_range, value, 0.0)
        amax = tl.max(tl.abs(value), axis=1)
        if KIND == 3:
            scale = tl.maximum(tl.div_rn(amax, _E4M3_MAX), _MIN_SCALE)
            y = value * tl.div_rn(1.0, scale)[:, None]
            low = _E4M3_MIN_SUBNORMAL if POSITIVE else -_E4M3_MAX
            code = _e4m3_encode(tl.minimum(tl.maximum(y, low), _E4M3_MAX), NATIVE)
            tl.store(codes_ptr + offs, code, mask=in_blocks)
        else:
            scale = tl.maximum(amax, _MIN_SCALE)
            y = value * tl.div_rn(1.0, scale)[:, None]
            # codes.nearest_code: sign, exponent and top mantissa bits pick a cell; the table
            # gives the midpoints below it and the one midpoint inside it.
            ncell: tl.constexpr = (128 << LUT_BITS) - LUT_FIRST
            raw = y.to(tl.int32, bitcast=True)
            cell = tl.maximum((raw & 0x7FFFFFFF) >> (23 - LUT_BITS), LUT_FIRST)
            cell = tl.minimum(cell, (128 << LUT_BITS) - 1) - LUT_FIRST
            cell = cell + tl.where(raw < 0, ncell, 0)
            below = tl.load(table_ptr + cell)
            mid = tl.load(table_ptr + 2 * ncell + cell)
            code = (below + tl.where(y > mid, 1.0, 0.0)).to(tl.uint8)
            if KIND == 2:
                lo, hi = tl.split(tl.reshape(code, (ROWS, BLOCK // 2, 2)))
                half = tl.arange(0, BLOCK // 2)
                tl.store(codes_ptr + rows[:, None] * (BLOCK // 2) + half[None, :],
                         lo | (hi << 4), mask=row_ok[:, None] & (half[None, :] < BLOCK // 2))
            else:
                tl.store(codes_ptr + offs, code, mask=in_blocks)
        tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _moment_pointers(addr, T, KIND: tl.constexpr):
    """(codes, scale) pointers of one moment: its address row at addr, the scale's one below."""
    if KIND == 0:
        codes = tl.load(addr).to(tl.pointer_type(tl.float32))
    else:
        codes = tl.load(addr).to(tl.pointer_type(tl.uint8))
    return tl.multiple_of(codes, 16), tl.load(addr + T).to(tl.pointer_type(tl.float32))


@triton.jit
def _adam_step_kernel(
    addr_ptr, numel_ptr, program_ptr, T, P, hyper_ptr,
    m_book, m_table, v_book, v_table, seed,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    M_KIND: tl.constexpr, M_POSITIVE: tl.constexpr, M_LUT_BITS: tl.constexpr,
    M_LUT_FIRST: tl.constexpr,
    V_KIND: tl.constexpr, V_POSITIVE: tl.constexpr, V_LUT_BITS: tl.constexpr,
    V_LUT_FIRST: tl.constexpr,
    DECOUPLED: tl.constexpr, STOCHASTIC_BF16: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, NATIVE: tl.constexpr, WIDE: tl.constexpr,
):
    """One program = ROWS blocks of one of T parameters. program_ptr [2, P]: each program's
    parameter and first block; addr_ptr [7, T]: the addresses of each parameter's p, grad,
    step, m codes, m scale, v codes and v scale."""
    pid = tl.program_id(0)
    t = tl.load(program_ptr + pid)
    first_row = tl.load(program_ptr + P + pid)
    # Every address is a multiple of 16 (the host checks): the hints let loads vectorize.
    p_ptr = tl.multiple_of(tl.load(addr_ptr + t).to(tl.pointer_type(P_DTYPE)), 16)
    g_ptr = tl.multiple_of(tl.load(addr_ptr + T + t).to(tl.pointer_type(G_DTYPE)), 16)
    step_ptr = tl.load(addr_ptr + 2 * T + t).to(tl.pointer_type(tl.float32))
    m_codes, m_scale = _moment_pointers(addr_ptr + 3 * T + t, T, M_KIND)
    v_codes, v_scale = _moment_pointers(addr_ptr + 5 * T + t, T, V_KIND)
    n = tl.load(numel_ptr + t)

    if WIDE:
        rows = first_row.to(tl.int64) + tl.arange(0, ROWS)
    else:
        rows = first_row + tl.arange(0, ROWS)
        n = n.to(tl.int32)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * BLOCK + cols[None, :]
    in_range = offs < n
    row_ok = rows < tl.cdiv(n, BLOCK)

    lr = tl.load(hyper_ptr)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    wd = tl.load(hyper_ptr + 4)
    step = tl.load(step_ptr)
    bc1 = 1.0 - _exact_pow(beta1, step)
    bc2 = 1.0 - _exact_pow(beta2, step)

    p = tl.load(p_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if DECOUPLED:
        p = p * (1.0 - lr * wd)
    else:
        g = g + wd * p
    m = _load_moment(m_codes, m_scale, m_book, rows, cols, offs, in_range, row_ok, M_KIND, BLOCK,
                     NATIVE)
    v = _load_moment(v_codes, v_scale, v_book, rows, cols, offs, in_range, row_ok, V_KIND, BLOCK,
                     NATIVE)
    # torch.lerp(m, g, w) for w < 0.5 is one fused multiply-add, w * (g - m) + m rounded
    # once; where there is no fma instruction (the interpreter) float64 gives the same (the
    # product of two float32 is exact in it).
    if NATIVE:
        m = tl.fma(1.0 - beta1, g - m, m)
    else:
        w1 = (1.0 - beta1).to(tl.float64)
        m = (w1 * (g - m).to(tl.float64) + m.to(tl.float64)).to(tl.float32)
    v = v * beta2 + (1.0 - beta2) * g * g
    # The scalar factors are cast explicitly: the interpreter keeps scalar math in float64.
    inv_root_bc2 = tl.div_rn(1.0, tl.sqrt_rn(bc2)).to(tl.float32)
    step_size = tl.div_rn(lr, bc1).to(tl.float32)
    denom = tl.sqrt_rn(v) * inv_root_bc2 + eps
    p = p - tl.div_rn(step_size * m, denom)
    _store_moment(m, m_codes, m_scale, m_table, rows, offs, in_range, row_ok,
                  M_KIND, M_POSITIVE, M_LUT_BITS, M_LUT_FIRST, ROWS, BLOCK, NATIVE)
    _store_moment(v, v_codes, v_scale, v_table, rows, offs, in_range, row_ok,
                  V_KIND, V_POSITIVE, V_LUT_BITS, V_LUT_FIRST, ROWS, BLOCK, NATIVE)
    if p_ptr.dtype.element_ty == tl.bfloat16:
        # Round in the integer bits, so the final cast only drops zeros (the interpreter's
        # cast truncates): 16 random bits for stochastic rounding (functional.py says why),
        # else half an ulp plus the tie-to-even bit.
        bits = p.to(tl.int32, bitcast=True)
        if STOCHASTIC_BF16:
            bits = bits + (tl.randint(seed + t, offs) & 0xFFFF).to(tl.int32)
        else:
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        p = (bits & -65536).to(tl.float32, bitcast=True)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=in_range)


class FusedParam(NamedTuple):
    """One parameter of a fused step: contiguous p and grad, its step counter (already
    incremented), and each moment's (codes, scale) - or (float32 moment, None)."""

    p: torch.Tensor
    grad: torch.Tensor
    step: torch.Tensor
    m: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]


class MomentFormat(NamedTuple):
    """How a moment is stored: kind (FLOAT32, BOOK8, BOOK4, FP8), whether it is kept positive,
    the cell table's mantissa bits and first cell, and the shared code book and cell table
    (code books; see `lowbit.optim.codes.nearest_code`)."""

    kind: int
    positive: bool = False
    lut_bits: int = 0
    lut_first: int = 0
    book: torch.Tensor | None = None
    table: torch.Tensor | None = None


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def address_table(params: list[FusedParam]) -> torch.Tensor:
    """int64 [8, T] on the host: the addresses of each parameter's p, grad, step, m codes,
    m scale, v codes and v scale, then its numel (the kernel's `addr_ptr` rows and
    `numel_ptr`). Row 1, the gradients, is the only one that changes between steps."""
    return torch.tensor([
        [q.p.data_ptr() for q in params], [q.grad.data_ptr() for q in params],
        [q.step.data_ptr() for q in params],
        [q.m[0].data_ptr() for q in params],
        [q.m[1].data_ptr() if q.m[1] is not None else 0 for q in params],
        [q.v[0].data_ptr() for q in params],
        [q.v[1].data_ptr() if q.v[1] is not None else 0 for q in params],
        [q.p.numel() for q in params],
    ], dtype=torch.int64)


@functools.lru_cache(maxsize=16)
def _program_map(numels: tuple[int, ...], block: int, rows: int,
                 device: torch.device) -> torch.Tensor:
    """int32 [2, programs]: each program's parameter index and first block. Depends only on
    the parameters' sizes, so it is built once per parameter group, not per step."""
    counts = torch.tensor([triton.cdiv(triton.cdiv(n, block), rows) for n in numels])
    param = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    row = (torch.arange(int(counts.sum())) - first[param]) * rows
    return torch.stack([param, row]).to(device=device, dtype=torch.int32)


def aligned(t: torch.Tensor | None) -> bool:
    """Whether the kernel may take t: its address a multiple of 16 bytes (vector loads)."""
    return t is None or t.data_ptr() % 16 == 0


def fused_adam_step_(
    table: torch.Tensor,
    hyper: torch.Tensor,
    m_format: MomentFormat,
    v_format: MomentFormat,
    *,
    p_dtype: torch.dtype,
    g_dtype: torch.dtype,
    block: int,
    decoupled: bool,
    stochastic_bf16_seed: int | None,
) -> None:
    """Update every parameter of an `address_table` (host, int64 [8, T]) and both its
    moments in place, in one launch. A caller that keeps the table between steps only
    rewrites the gradients' row.

    All parameters share one dtype (and their gradients one dtype), the moment formats and the
    device. hyper: float32 [lr, beta1, beta2, eps, weight_decay] on that device. `block` is the
    quantized moments' block (any power of two when both moments are FLOAT32)."""
    device = hyper.device
    values, warps = PROGRAM_SHAPE
    rows = max(1, values // block)
    numels = table[7].tolist()
    programs = _program_map(tuple(numels), block, rows, device)
    if device.type == "cuda":
        # Pinned, so the copy does not wait for the host; the caching host allocator keeps the
        # buffer until the copy is done.
        table = table.pin_memory()
    table = table.to(device, non_blocking=True)
    dummy = hyper  # stands in for the code books of float32 moments (never read)
    _adam_step_kernel[(programs.shape[1],)](
        table[:7], table[7], programs, table.shape[1], programs.shape[1], hyper,
        m_format.book if m_format.book is not None else dummy,
        m_format.table if m_format.table is not None else dummy,
        v_format.book if v_format.book is not None else dummy,
        v_format.table if v_format.table is not None else dummy,
        stochastic_bf16_seed or 0,
        P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype],
        M_KIND=m_format.kind, M_POSITIVE=m_format.positive, M_LUT_BITS=m_format.lut_bits,
        M_LUT_FIRST=m_format.lut_first,
        V_KIND=v_format.kind, V_POSITIVE=v_format.positive, V_LUT_BITS=v_format.lut_bits,
        V_LUT_FIRST=v_format.lut_first,
        DECOUPLED=decoupled, STOCHASTIC_BF16=stochastic_bf16_seed is not None,
        BLOCK=block, ROWS=rows, NATIVE=target.native(hyper), num_warps=warps,
        WIDE=max(numels) >= _INT32_LIMIT,
        # No contraction of a * b + c into fma: the reference rounds each product.
        enable_fp_fusion=False,
    )
