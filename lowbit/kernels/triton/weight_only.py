"""Weight-only quantized matmuls in Triton: int4 / int8 / fp8 weights, float activations.

Weights are [N, K] like ``nn.Linear`` and are read as 32-bit words (8 int4 or 4 byte codes
each) in 16-byte vectors. On the GPU each word is decoded by a few inline-PTX instructions:
``prmt`` drops a code byte into the mantissa of a power-of-two float (exact, no int-to-float
conversion, which runs at a quarter rate on Hopper), and fp8 uses the hardware e4m3x2
conversion. The interpreter path computes the same bits with plain shifts and masks.

Two paths, picked by M:
* ``M == 1``: a CUDA-core GEMV. Weight bytes are streamed once; dot products are reduced per
  quantization group and scaled afterwards (one multiply per group, not per weight).
* ``M > 1``: a tiled ``tl.dot`` GEMM that dequantizes the weight tile in registers (for int8
  and fp8 at M <= 64, ``upcast_gemm.py`` offers the tuner a GEMM that widens the stored bytes
  in the MMA's own registers instead).
Both can split K across programs; partial sums then go to an fp32 workspace that a second small
kernel reduces in a fixed order, so results are deterministic and no atomics are needed. Block
sizes, warps, stages and the K split are tuned per (M bucket, shape) by ``Tuner``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.kernels import reference as ref

from . import pdl, target
from .pdl import wait_for_inputs

INT4, INT8, FP8 = 0, 1, 2
_CODES_PER_WORD = {INT4: 8, INT8: 4, FP8: 4}
# launch(config, compile_only): run one candidate, or only compile it.
Launch = Callable[[object, bool], None]


# --------------------------------------------------------------------------------------------
# Launch-config choice
# --------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's device (a fixed stand-in on CPU, where nothing is timed)."""
    return _num_sms(t.device.index or 0) if t.device.type == "cuda" else 132


class Tuner:
    """Remembers, per key, the fastest of a few launch candidates.

    On the first call with a new key, all candidates are compiled in parallel threads (Triton
    releases the GIL in its compiler passes and in ptxas), then each is timed from CUDA graphs
    that alternate an L2-evicting read with the real launch (which writes the real output, so
    the call stays correct); the read alone is timed too and subtracted. That measures cold-L2
    device time without launch gaps, as in a captured decode step. A launch that follows another
    PDL kernel (see pdl.py) can run quite differently: most tiles gain 5-15% there, a few lose
    up to 25% (H200, results/attempts/pdl_chain_tiles.json), so each candidate is also timed
    right after a launch of itself and ranked by the slower of the two (for weights that fit in
    L2 that second launch reads them warm, and the cold time is the slower). Later calls launch
    the winner with no host sync, so they can be captured in CUDA graphs. On CPU (the Triton
    interpreter), with LOWBIT_TRITON_AUTOTUNE=0, or during graph capture (not remembered then)
    the first candidate is used untimed.
    """

    def __init__(self) -> None:
        self._best: dict[Hashable, object] = {}
        self.timings: dict[Hashable, list[tuple[float, object]]] = {}

    def run(self, key: Hashable, candidates: Sequence, launch: Launch,
            device: torch.device, check: Callable[[], bool] | None = None) -> None:
        """Launch the best candidate for key, timing them all on the first call. `check`, if
        given, says whether the output of the launch just made matches the reference; a timed
        candidate that fails it is dropped with a warning."""
        best = self._best.get(key)
        if best is None:
            if (device.type != "cuda" or len(candidates) == 1
                    or os.environ.get("LOWBIT_TRITON_AUTOTUNE") == "0"):
                best = candidates[0]
            elif torch.cuda.is_current_stream_capturing():
                launch(candidates[0], False)
                return
            else:
                self.timings[key] = self._time_all(candidates, launch, device, check)
                best = min(self.timings[key], key=lambda p: p[0])[1]
            self._best[key] = best
        launch(best, False)

    @staticmethod
    def _time_all(candidates: Sequence, launch: Launch, device: torch.device,
                  check: Callable[[], bool] | None) -> list[tuple[float, object]]:
        """(milliseconds, candidate) for each candidate that compiles, fits the GPU and passes
        the check."""
        with ThreadPoolExecutor(min(len(candidates), os.cpu_count() or 1)) as pool:
            for done in [pool.submit(launch, c, True) for c in candidates]:
                done.exception()  # a candidate that cannot compile is skipped below
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        flush = torch.empty(l2_bytes // 2, device=device, dtype=torch.float32)  # 2x L2
        base = _graph_ms([flush.sum])
        timed = []
        for cand in runnable(candidates, launch, check):
            run = functools.partial(launch, cand, False)
            try:
                cold = _graph_ms([flush.sum, run]) - base
                chained = _graph_ms([flush.sum, run, run]) - base - cold
            except RuntimeError:  # not capturable here: keep the candidates that are
                continue
            timed.append((max(cold, chained, 0.0), cand))
        return timed or [(0.0, candidates[0])]

    def chosen(self) -> dict[Hashable, object]:
        """Winners so far (for benchmarks and logs)."""
        return dict(self._best)


def runnable(candidates: Sequence, launch: Launch,
             check: Callable[[], bool] | None = None) -> list:
    """The candidates that launch (each run once, outside any capture, which also loads its
    module) and whose output passes `check`. One that needs more of the GPU than it has is
    dropped quietly; one that fails to compile or gives wrong numbers is dropped with a
    warning: that is a kernel bug which only some tiles reach (silently skipping one once hid
    such a bug until a test launched every tile). If candidates were checked and none passed,
    that is an error, not a reason to run one of them."""
    ok, wrong = [], []
    for cand in candidates:
        try:
            launch(cand, False)
        except triton.runtime.errors.OutOfResources:
            continue
        except triton.CompilationError as e:
            warnings.warn(f"lowbit: Triton launch candidate {cand} does not compile and is "
                          f"skipped by the tuner: {e}", RuntimeWarning, stacklevel=2)
            continue
        if check is not None and not check():
            warnings.warn(f"lowbit: Triton launch candidate {cand} gives wrong results here "
                          "(checked against the reference) and is skipped by the tuner",
                          RuntimeWarning, stacklevel=2)
            wrong.append(cand)
            continue
        ok.append(cand)
    if wrong and not ok:
        raise RuntimeError(f"lowbit: every Triton candidate that ran gave wrong results "
                           f"({wrong}); please report this with the GPU and shapes")
    return ok


def _graph_ms(fns: Sequence[Callable[[], object]], rounds: int = 8) -> float:
    """Median milliseconds per round of fns, replayed from a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            for _ in range(rounds):
                for fn in fns:
                    fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / rounds)
    return sorted(times)[len(times) // 2]


def launch_kernel(kernel, grid: tuple, compile_only: bool, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or only compile it for those arguments."""
    if compile_only:
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def split_options(tiles: int, iters: int, target: int, limit: int = 16) -> list[int]:
    """K splits worth timing: 1, then powers of two that divide the K loop, until the programs
    reach ~target (a split's fp32 partial sums cost traffic, so the tuner weighs each)."""
    splits = [1]
    while (splits[-1] * 2 <= limit and iters % (splits[-1] * 2) == 0
           and tiles * splits[-1] < target):
        splits.append(splits[-1] * 2)
    return splits


def fit_k_block(block: int, k: int, g: int, minimum: int) -> int:
    """Largest power of two <= block that divides K and nests with the group size g."""
    b = 1 << (block.bit_length() - 1)
    while b > minimum and (k % b or (g % b and b % g)):
        b //= 2
    return b


@triton.jit
def store_tile(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, M, N, pid_k,
               HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Write the fp32 tile y [BM, BN] of out [M, N]: into K split pid_k of the fp32 workspace
    (the split-K reduce adds the bias), or with the bias added, in out's dtype."""
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * M * N + out_offs, y, mask=omask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out = sum over splits of ws[s] (+ bias), summed in split order so it is deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    wait_for_inputs(PDL)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Sum the [split, M, N] fp32 workspace into out [M, N], adding bias."""
    mn = out.numel()
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(mn, block),)](
        ws, bias if bias is not None else out, out, mn, out.shape[-1], ws.shape[0],
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl.options(out),
    )


# --------------------------------------------------------------------------------------------
# Decoding packed words
# --------------------------------------------------------------------------------------------


# int4 codes are decoded as 128 + code (exact): callers fold the 128 into the zero point.
INT4_OFFSET = tl.constexpr(128.0)

# prmt copies byte j of the nibble-masked word into bits 16..23 of 128.0f (0x43000000), giving
# 128 + code; sign-flipped int8 bytes go to bits 8..15 of 32768.0f, giving 32768 + q + 128.
_INT4_ASM = tl.constexpr("""{
.reg .b32 lo, hi, m;
and.b32 lo, $8, 0x0F0F0F0F;
shr.u32 hi, $8, 4;
and.b32 hi, hi, 0x0F0F0F0F;
mov.b32 m, 0x43000000;
prmt.b32 $0, lo, m, 0x7054;
prmt.b32 $1, hi, m, 0x7054;
prmt.b32 $2, lo, m, 0x7154;
prmt.b32 $3, hi, m, 0x7154;
prmt.b32 $4, lo, m, 0x7254;
prmt.b32 $5, hi, m, 0x7254;
prmt.b32 $6, lo, m, 0x7354;
prmt.b32 $7, hi, m, 0x7354;
}""")
_INT8_ASM = tl.constexpr("""{
.reg .b32 u, m;
xor.b32 u, $4, 0x80808080;
mov.b32 m, 0x47000000;
prmt.b32 $0, u, m, 0x7604;
prmt.b32 $1, u, m, 0x7614;
prmt.b32 $2, u, m, 0x7624;
prmt.b32 $3, u, m, 0x7634;
}""")
_FP8_ASM = tl.constexpr("""{
.reg .b16 l, h, a, b, c, d;
.reg .b32 p, q;
mov.b32 {l, h}, $4;
cvt.rn.f16x2.e4m3x2 p, l;
cvt.rn.f16x2.e4m3x2 q, h;
mov.b32 {a, b}, p;
mov.b32 {c, d}, q;
cvt.f32.f16 $0, a;
cvt.f32.f16 $1, b;
cvt.f32.f16 $2, c;
cvt.f32.f16 $3, d;
}""")


@triton.jit
def _byte_in_float(word, j: tl.constexpr, pos: tl.constexpr, magic: tl.constexpr):
    """Portable twin of one prmt above: byte j of word placed at bit pos of the float magic."""
    return ((((word >> (8 * j)) & 0xFF) << pos) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _decode(words, FMT: tl.constexpr, ASM: tl.constexpr):
    """Codes of each 32-bit word as fp32, in k order (byte j's low nibble first for int4).

    int4 gives 128 + code (see INT4_OFFSET), int8 the exact q, fp8 the exact e4m3 value. ASM
    selects the inline-PTX decoders (about one instruction per code); the portable path computes
    the same bits with shifts and masks, for the interpreter.
    """
    if FMT == 0:
        if ASM:
            c = tl.inline_asm_elementwise(_INT4_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                                          dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            return (c[0].to(tl.float32, bitcast=True), c[1].to(tl.float32, bitcast=True),
                    c[2].to(tl.float32, bitcast=True), c[3].to(tl.float32, bitcast=True),
                    c[4].to(tl.float32, bitcast=True), c[5].to(tl.float32, bitcast=True),
                    c[6].to(tl.float32, bitcast=True), c[7].to(tl.float32, bitcast=True))
        lo = words & 0x0F0F0F0F
        hi = (words >> 4) & 0x0F0F0F0F
        m: tl.constexpr = 0x43000000
        return (_byte_in_float(lo, 0, 16, m), _byte_in_float(hi, 0, 16, m),
                _byte_in_float(lo, 1, 16, m), _byte_in_float(hi, 1, 16, m),
                _byte_in_float(lo, 2, 16, m), _byte_in_float(hi, 2, 16, m),
                _byte_in_float(lo, 3, 16, m), _byte_in_float(hi, 3, 16, m))
    elif FMT == 1:
        if ASM:
            c = tl.inline_asm_elementwise(_INT8_ASM, "=r,=r,=r,=r,r", [words],
                                          dtype=(tl.int32,) * 4, is_pure=True, pack=1)
            b0 = c[0].to(tl.float32, bitcast=True)
            b1 = c[1].to(tl.float32, bitcast=True)
            b2 = c[2].to(tl.float32, bitcast=True)
            b3 = c[3].to(tl.float32, bitcast=True)
        else:
            u = words ^ -2139062144  # 0x80808080: flipping the sign bit gives q + 128
            m: tl.constexpr = 0x47000000
            b0 = _byte_in_float(u, 0, 8, m)
            b1 = _byte_in_float(u, 1, 8, m)
            b2 = _byte_in_float(u, 2, 8, m)
            b3 = _byte_in_float(u, 3, 8, m)
        return b0 - 32896.0, b1 - 32896.0, b2 - 32896.0, b3 - 32896.0
    else:
        if ASM:
            return tl.inline_asm_elementwise(_FP8_ASM, "=f,=f,=f,=f,r", [words],
                                             dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return (_fp8_bits(words << 24), _fp8_bits(words << 16), _fp8_bits(words << 8),
                _fp8_bits(words))


@triton.jit
def _fp8_bits(top):
    """e4m3 byte in bits 24..31 -> fp32: sign to bit 31, exponent and mantissa to bits 26..20.

    That is the fp32 with the same fields but exponent bias 127 instead of 7; 2**120 fixes it,
    subnormals included. NaN codes (0x7f, 0xff) are not expected in quantized weights.
    """
    bits = (top >> 4) & -2014314496  # 0x87F00000
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2**120


@triton.jit
def _positions(x, CPW: tl.constexpr):
    """Split [..., CPW] along the last axis into CPW tensors (register moves only)."""
    if CPW == 8:
        x = tl.reshape(x, x.shape[:-1] + (2, 2, 2))
        e, o = tl.split(x)
        ee, eo = tl.split(e)
        oe, oo = tl.split(o)
        x0, x4 = tl.split(ee)
        x2, x6 = tl.split(eo)
        x1, x5 = tl.split(oe)
        x3, x7 = tl.split(oo)
        return x0, x1, x2, x3, x4, x5, x6, x7
    else:
        x = tl.reshape(x, x.shape[:-1] + (2, 2))
        e, o = tl.split(x)
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        return x0, x1, x2, x3


@triton.jit
def _load_params(row_ptrs, grp, mask, PAIRS: tl.constexpr):
    """fp32 per-group parameters (scales or zeros) of groups grp [NG] for rows row_ptrs [BN, 1].

    PAIRS = 0 reads them as stored. 2-byte floats are read as the 32-bit words holding two of
    them (PAIRS = 1: bf16, 2: fp16): Triton's pipeliner prefetches (cp.async) only loads of at
    least 4 bytes a thread, and a 2-byte load per row would make every loop step wait a full
    memory latency for its scales.
    """
    if PAIRS == 0:
        vals = tl.load(row_ptrs + grp[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        word = tl.load(row_ptrs + (grp // 2)[None, :], mask=mask, other=0)
        vals = _half_to_f32((word >> ((grp % 2) * 16)[None, :]) & 0xFFFF, PAIRS)
    return vals


@triton.jit
def _half_to_f32(bits, PAIRS: tl.constexpr):
    """The 2-byte float in the low 16 bits of int32 bits (PAIRS 1: bf16, 2: fp16) as fp32."""
    if PAIRS == 1:
        return (bits << 16).to(tl.float32, bitcast=True)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _group_params(s_ptrs, z_ptrs, grp, mask, PAIRS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(scales, zeros) of groups grp as fp32 (zeros = scales when there are none)."""
    s = _load_params(s_ptrs, grp, mask, PAIRS)
    if HAS_ZERO:
        z = _load_params(z_ptrs, grp, mask, PAIRS)
    else:
        z = s
    return s, z


def param_words(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, zero, PAIRS) as the kernels read them: 2-byte floats as int32 pairs when each row
    holds an even number of groups (see _load_params), else unchanged."""
    if scale.element_size() == 2 and scale.shape[1] % 2 == 0 and zero.dtype == scale.dtype:
        pairs = 1 if scale.dtype == torch.bfloat16 else 2
        return scale.view(torch.int32), zero.view(torch.int32), pairs
    return scale, zero, 0


@triton.jit
def _dequant_tile(words, s, zs, FMT: tl.constexpr, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """[BN, NG, WPG] packed words and [BN, NG] group scales -> [BN, K block] weights in k order.

    w = code * s - zs with zs = (zero + INT4_OFFSET) * s for int4; w = code * s otherwise (zs is
    unused). The codes of each word are joined along new minor axes (in registers, no data
    movement) so that the reshape puts code i of word w at k = w * codes_per_word + i.
    """
    BN: tl.constexpr = words.shape[0]
    s = s[:, :, None]
    zs = zs[:, :, None]
    c = _decode(words, FMT, ASM)
    if FMT == 0:
        w = ((c[0] * s - zs).to(DTYPE), (c[1] * s - zs).to(DTYPE), (c[2] * s - zs).to(DTYPE),
             (c[3] * s - zs).to(DTYPE), (c[4] * s - zs).to(DTYPE), (c[5] * s - zs).to(DTYPE),
             (c[6] * s - zs).to(DTYPE), (c[7] * s - zs).to(DTYPE))
        tile = tl.join(tl.join(tl.join(w[0], w[4]), tl.join(w[2], w[6])),
                       tl.join(tl.join(w[1], w[5]), tl.join(w[3], w[7])))
        BK: tl.constexpr = words.shape[1] * words.shape[2] * 8
    else:
        w = ((c[0] * s).to(DTYPE), (c[1] * s).to(DTYPE), (c[2] * s).to(DTYPE),
             (c[3] * s).to(DTYPE))
        tile = tl.join(tl.join(w[0], w[2]), tl.join(w[1], w[3]))
        BK: tl.constexpr = words.shape[1] * words.shape[2] * 4
    return tl.reshape(tile, (BN, BK))


# --------------------------------------------------------------------------------------------
# M == 1: GEMV on CUDA cores
# --------------------------------------------------------------------------------------------


@triton.jit
def _x_offsets(BKW: tl.constexpr, CPW: tl.constexpr):
    """Offsets of the activations of a [BN, BKW] word tile: one thread's 4 words (16 bytes) are
    4 * CPW contiguous values, loaded as such."""
    return (tl.arange(0, BKW // 4)[:, None, None] * (4 * CPW)
            + tl.arange(0, 4)[None, :, None] * CPW + tl.arange(0, CPW)[None, None, :])


@triton.jit
def _gemv_step(words, xv, s, z, FMT: tl.constexpr, ASM: tl.constexpr, NG: tl.constexpr,
               WPG: tl.constexpr):
    """One K step of the GEMV: [BN, BKW] words and their activations xv -> [BN, NG] partial
    sums. Per group: t = sum code * x, then s * (t - z * sum x), so scale and zero cost one FMA
    per group rather than per weight (z includes INT4_OFFSET for int4)."""
    CPW: tl.constexpr = 8 if FMT == 0 else 4
    BN: tl.constexpr = words.shape[0]
    BKW: tl.constexpr = NG * WPG
    xs = _positions(xv, CPW)
    codes = _decode(words, FMT, ASM)
    t = tl.zeros((BN, BKW), tl.float32)
    xsum = tl.zeros((BKW,), tl.float32)
    for i in tl.static_range(CPW):
        xi = tl.reshape(xs[i], (BKW,))
        t += codes[i] * xi[None, :]
        if FMT == 0:
            xsum += xi
    part = tl.sum(tl.reshape(t, (BN, NG, WPG)), axis=2)
    if FMT == 0:
        xsum_g = tl.sum(tl.reshape(xsum, (NG, WPG)), axis=1)
        part -= (z + INT4_OFFSET) * xsum_g[None, :]
    return part * s


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    N, g, WORDS, ITERS, stride_s,
    FMT: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr,
    PAIRS: tl.constexpr, ONE_GROUP: tl.constexpr, PDL: tl.constexpr,
):
    """y[n] = sum_k x[k] w[n, k] for BN rows over ITERS blocks of NG groups x WPG words (see
    `_gemv_step`). Warps split the rows and each warp reads whole 512-byte row segments as
    coalesced 16-byte vectors."""
    CPW: tl.constexpr = 8 if FMT == 0 else 4
    BKW: tl.constexpr = NG * WPG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_j = tl.arange(0, NG)
    # A 2-D [BN, BKW] load (contiguous along K) makes threads span K in 4-word (16-byte) pieces
    # and warps span rows, so each thread keeps BN / num_warps rows that share its activations.
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * WORDS + tl.arange(0, BKW)[None, :]
    x_offs = _x_offsets(BKW, CPW)
    s_ptrs = s_ptr + offs_n[:, None] * stride_s
    z_ptrs = z_ptr + offs_n[:, None] * stride_s
    acc = tl.zeros((BN, NG), tl.float32)
    if ONE_GROUP:  # one scale (and zero) per row: read once, not every step
        s_row, z_row = _group_params(s_ptrs, z_ptrs, offs_j * 0, nmask[:, None], PAIRS, FMT == 0)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # the weights and scales above may be read before it, x may not
    for step in tl.range(0, ITERS, num_stages=STAGES):
        it = it0 + step
        words = tl.load(w_ptrs + it * BKW, mask=nmask[:, None], other=0)
        k0 = it * BKW * CPW
        if ONE_GROUP:
            s, z = s_row, z_row
        else:
            grp = (k0 + offs_j * (WPG * CPW)) // g
            s, z = _group_params(s_ptrs, z_ptrs, grp, nmask[:, None], PAIRS, FMT == 0)
        acc += _gemv_step(words, tl.load(x_ptr + k0 + x_offs).to(tl.float32), s, z, FMT, ASM,
                          NG, WPG)
    y = tl.sum(acc, axis=1)
    if PARTIAL:
        tl.store(out_ptr + pid_k * N + offs_n, y, mask=nmask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemv_rows_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, g, WORDS, ITERS, stride_s, stride_xm,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
    WPG: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, STAGES: tl.constexpr,
    ASM: tl.constexpr, PAIRS: tl.constexpr, ONE_GROUP: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] for up to BM rows of x: ``_gemv_kernel`` with each decoded weight reused BM times.

    At small M a tl.dot tile spends more on dequantizing and feeding the tensor cores than the
    few rows of x give back; here the weight words are streamed and decoded once, as in the GEMV,
    and each code takes BM fused multiply-adds on the CUDA cores. int8 and fp8 only: for int4 it
    never beat tl.dot, and compiled for sm_90 at K = 128..256 its zero-point sums came out wrong
    (right under the interpreter and at full size), so int4 has no such path.
    """
    tl.static_assert(FMT != 0, "the multi-row GEMV takes int8 and fp8 weights")
    CPW: tl.constexpr = 4
    BKW: tl.constexpr = NG * WPG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    offs_j = tl.arange(0, NG)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * WORDS + tl.arange(0, BKW)[None, :]
    x_offs = _x_offsets(BKW, CPW)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None, None] * stride_xm + x_offs[None, :, :, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_s
    acc = tl.zeros((BM, BN, NG), tl.float32)
    if ONE_GROUP:  # one scale per row: read once, not every step
        s_row = _load_params(s_ptrs, offs_j * 0, nmask[:, None], PAIRS)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)  # the weights and scales above may be read before it, x may not
    for step in tl.range(0, ITERS, num_stages=STAGES):
        it = it0 + step
        words = tl.load(w_ptrs + it * BKW, mask=nmask[:, None], other=0)
        k0 = it * BKW * CPW
        if ONE_GROUP:
            s = s_row
        else:
            s = _load_params(s_ptrs, (k0 + offs_j * (WPG * CPW)) // g, nmask[:, None], PAIRS)
        xs = _positions(tl.load(x_ptrs + k0, mask=mmask[:, None, None, None], other=0.0)
                        .to(tl.float32), CPW)
        codes = _decode(words, FMT, ASM)
        t = tl.zeros((BM, BN, BKW), tl.float32)
        for i in tl.static_range(CPW):
            t += codes[i][None, :, :] * tl.reshape(xs[i], (BM, BKW))[:, None, :]
        acc += tl.sum(tl.reshape(t, (BM, BN, NG, WPG)), axis=3) * s[None, :, :]
    y = tl.sum(acc, axis=2)
    store_tile(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, M, N, pid_k, HAS_BIAS, PARTIAL)


class GemvCfg(NamedTuple):
    """Rows per program, words per row per loop step, warps, pipeline stages, K split, and the
    rows of x one program multiplies (bm > 1 runs ``_gemv_rows_kernel``)."""

    bn: int
    bkw: int
    warps: int
    stages: int
    split: int = 1
    bm: int = 1


# One warp reads 128 words (512 bytes) of a row per step; its bn rows per thread share the
# activation loads. Wider steps spread K over several warps of a program (more warps in flight
# without a workspace); many small programs keep the tail of the grid short.
_GEMV_TILES = (
    GemvCfg(8, 128, 1, 3),
    GemvCfg(16, 128, 1, 3),
    GemvCfg(8, 128, 1, 1),
    GemvCfg(4, 128, 1, 4),
    GemvCfg(8, 256, 2, 3),
    GemvCfg(8, 256, 2, 1),
    GemvCfg(4, 256, 2, 3),
    GemvCfg(16, 256, 2, 2),
    GemvCfg(8, 512, 4, 2),
)


# Several rows of x (2 <= M <= 4): each thread keeps BM x 32 activations and BM x BN x 4 word
# sums. The tuner weighs these against tl.dot; on the H200 they win for int8 and fp8 at M = 2
# (7-33% faster) and on the small 4096x1024 layer at M = 4, never for int4 beyond M = 1 (so
# int4 has none), and never at M = 8 or 16 (results/ops_small_m_rows.json), so larger buckets
# have none.
_GEMV_ROWS_TILES = {
    2: (GemvCfg(8, 128, 1, 3, bm=2), GemvCfg(4, 128, 1, 3, bm=2), GemvCfg(8, 256, 2, 3, bm=2),
        GemvCfg(16, 128, 1, 2, bm=2)),
    4: (GemvCfg(4, 128, 1, 3, bm=4), GemvCfg(8, 128, 1, 3, bm=4), GemvCfg(4, 256, 2, 3, bm=4),
        GemvCfg(2, 128, 1, 3, bm=4)),
}


def _gemv_k_block(cfg: GemvCfg, k: int, g: int, cpw: int) -> int:
    return fit_k_block(cfg.bkw * cpw, k, g, cpw)


def _gemv_candidates(x: torch.Tensor, n: int, k: int, g: int, fmt: int) -> list[GemvCfg]:
    """The M == 1 tiles, or those of x's M bucket (none above 4, none for int4), each with its
    K splits."""
    m = x.shape[0]
    cpw = _CODES_PER_WORD[fmt]
    if m > 1 and (fmt == INT4 or m_bucket(m) not in _GEMV_ROWS_TILES):
        return []
    cands = []
    for cfg in _GEMV_TILES if m == 1 else _GEMV_ROWS_TILES[m_bucket(m)]:
        iters = k // _gemv_k_block(cfg, k, g, cpw)
        programs = triton.cdiv(n, cfg.bn) * cfg.warps
        cands += [cfg._replace(split=s) for s in split_options(programs, iters, 8 * num_sms(x))]
    return list(dict.fromkeys(cands))


def _gemv_launch(cfg: GemvCfg, compile_only: bool, x, words, scale, zero, bias, out, fmt: int,
                 g: int) -> None:
    (m, k), n = x.shape, out.shape[1]
    cpw = _CODES_PER_WORD[fmt]
    kb = _gemv_k_block(cfg, k, g, cpw)
    gk = min(g, kb)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    one_group = scale.shape[1] == 1
    scale, zero, pairs = param_words(scale, zero)
    common = (x, words, scale, zero, bias if bias is not None else out, dest)
    meta = dict(FMT=fmt, BN=cfg.bn, NG=kb // gk, WPG=gk // cpw, HAS_BIAS=bias is not None,
                PARTIAL=cfg.split > 1, STAGES=cfg.stages, ASM=target.native(x),
                PAIRS=pairs, ONE_GROUP=one_group, num_warps=cfg.warps, **pdl.options(x))
    grid = (triton.cdiv(n, cfg.bn), cfg.split)
    iters = k // kb // cfg.split
    if cfg.bm == 1:
        assert m == 1, m
        launch_kernel(_gemv_kernel, grid, compile_only, *common,
                      n, g, words.stride(0), iters, scale.stride(0), **meta)
    else:
        assert m <= cfg.bm and fmt != INT4, (m, cfg.bm, fmt)
        launch_kernel(_gemv_rows_kernel, grid, compile_only, *common,
                      m, n, g, words.stride(0), iters, scale.stride(0), x.stride(0),
                      BM=cfg.bm, **meta)
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


# --------------------------------------------------------------------------------------------
# M > 1: tiled GEMM with tl.dot
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b on the tensor cores, or in IEEE fp32 (see DOT_F32 below)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, g, WORDS, ITERS, stride_xm, stride_s,
    FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
    WPG: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    DOT_F32: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr, PAIRS: tl.constexpr,
    ONE_GROUP: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] w[n, k]: weight tiles dequantized in registers, then tl.dot.

    Weights are rounded to x's dtype before the dot, as the tensor cores need; DOT_F32 then runs
    the dot on fp32 copies (exact IEEE fp32 for fp32 x, and the interpreter, whose bf16 dot is
    wrong). SWAP computes out^T = w x^T instead: the weight tile (BN >= 64 rows) takes the
    MMA's wide side and the few rows of x the narrow one, which suits small M.
    """
    CPW: tl.constexpr = 8 if FMT == 0 else 4
    BKW: tl.constexpr = NG * WPG
    BK: tl.constexpr = BKW * CPW
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows
    pid_n = (pid % (GROUP_M * num_n)) // rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    offs_j = tl.arange(0, NG)
    word_off = offs_j[:, None] * WPG + tl.arange(0, WPG)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None, None] * WORDS + word_off[None, :, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_s
    z_ptrs = z_ptr + offs_n[:, None] * stride_s

    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    if ONE_GROUP:  # one scale (and zero) per row: read once, not every step
        s_row, z_row = _group_params(s_ptrs, z_ptrs, offs_j * 0, nmask[:, None], PAIRS, FMT == 0)
    it0 = pid_k * ITERS
    wait_for_inputs(PDL)
    for step in range(ITERS):
        it = it0 + step
        xt = tl.load(x_ptrs + it * BK, mask=mmask[:, None], other=0.0)
        words = tl.load(w_ptrs + it * BKW, mask=nmask[:, None, None], other=0)
        if ONE_GROUP:
            s, z = s_row, z_row
        else:
            grp = (it * BK + offs_j * (WPG * CPW)) // g
            s, z = _group_params(s_ptrs, z_ptrs, grp, nmask[:, None], PAIRS, FMT == 0)
        wt = _dequant_tile(words, s, (z + INT4_OFFSET) * s if FMT == 0 else s, FMT, ASM, DTYPE)
        if SWAP:
            acc = _dot(wt, tl.trans(xt), acc, DOT_F32)
        else:
            acc = _dot(xt, tl.trans(wt), acc, DOT_F32)
    if SWAP:
        acc = tl.trans(acc)

    store_tile(out_ptr, b_ptr, acc, offs_m, offs_n, mmask, nmask, M, N, pid_k, HAS_BIAS, PARTIAL)


class GemmCfg(NamedTuple):
    """Block sizes (rows of x, rows of w, k), warps, pipeline stages, K split."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1
    swap: bool = False


# Candidates by M bucket (upper bound of the bucket). Small M is weight-bandwidth bound: narrow
# tiles, deep pipelines, and K splits when the N tiles alone cannot fill the GPU; swapped tiles
# put the weight rows on the MMA's wide side.
_GEMM_TILES = {
    16: (GemmCfg(16, 64, 128, 4, 4), GemmCfg(16, 32, 256, 4, 4), GemmCfg(16, 128, 128, 4, 3),
         GemmCfg(16, 64, 256, 4, 3), GemmCfg(16, 64, 128, 4, 4, swap=True),
         GemmCfg(16, 128, 128, 4, 3, swap=True), GemmCfg(16, 64, 256, 4, 3, swap=True)),
    32: (GemmCfg(32, 64, 128, 4, 4), GemmCfg(32, 128, 128, 4, 3), GemmCfg(32, 32, 256, 4, 4),
         GemmCfg(32, 64, 128, 4, 4, swap=True), GemmCfg(32, 128, 128, 4, 3, swap=True)),
    64: (GemmCfg(64, 64, 128, 4, 4), GemmCfg(64, 128, 128, 4, 3), GemmCfg(64, 32, 256, 4, 4),
         GemmCfg(64, 64, 128, 4, 4, swap=True), GemmCfg(64, 128, 128, 4, 3, swap=True)),
    256: (GemmCfg(64, 128, 64, 4, 4), GemmCfg(128, 128, 64, 8, 4), GemmCfg(64, 128, 128, 4, 3)),
    1 << 62: (GemmCfg(128, 128, 64, 8, 4), GemmCfg(128, 256, 64, 8, 3),
              GemmCfg(128, 128, 128, 8, 3)),
}
_SPLIT_MAX_M = 64


def m_bucket(m: int) -> int:
    """Autotune key for M: 1, then powers of two (so M = 3 and M = 4 share a choice)."""
    return 1 << max(0, (m - 1).bit_length())


def gemm_candidates(tiles: dict, x: torch.Tensor, n: int, k: int, g: int,
                    min_bk: int) -> list[GemmCfg]:
    """Tiles for x's M bucket, each with and without a K split where splitting could help."""
    m = x.shape[0]
    bucket = next(b for b in sorted(tiles) if m <= b)
    cands = []
    for cfg in tiles[bucket]:
        bk = fit_k_block(cfg.bk, k, g, min_bk)
        cfg = cfg._replace(bk=bk)
        splits = [1]
        if m <= _SPLIT_MAX_M:
            mn_tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
            splits = split_options(mn_tiles, k // bk, 2 * num_sms(x))
        cands += [cfg._replace(split=s) for s in splits]
    return list(dict.fromkeys(cands))


def _gemm_launch(cfg: GemmCfg, compile_only: bool, x, words, scale, zero, bias, out, fmt: int,
                 g: int) -> None:
    (m, k), n = x.shape, out.shape[1]
    cpw = _CODES_PER_WORD[fmt]
    gk = min(g, cfg.bk)
    dest = out if cfg.split == 1 else torch.empty(
        (cfg.split, m, n), device=out.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), cfg.split)
    one_group = scale.shape[1] == 1
    scale, zero, pairs = param_words(scale, zero)
    launch_kernel(
        _gemm_kernel, grid, compile_only,
        x, words, scale, zero, bias if bias is not None else out, dest,
        m, n, g, words.stride(0), k // cfg.bk // cfg.split, x.stride(0), scale.stride(0),
        FMT=fmt, BM=cfg.bm, BN=cfg.bn, NG=cfg.bk // gk, WPG=gk // cpw, GROUP_M=8,
        HAS_BIAS=bias is not None, PARTIAL=cfg.split > 1,
        DOT_F32=x.dtype == torch.float32 or not target.native(x), ASM=target.native(x),
        SWAP=cfg.swap, PAIRS=pairs, ONE_GROUP=one_group, num_warps=cfg.warps,
        num_stages=cfg.stages, **pdl.options(x),
    )
    if cfg.split > 1 and not compile_only:
        splitk_reduce(dest, bias, out)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

TUNER = Tuner()


def _weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None, bias: torch.Tensor | None,
                    fmt: int) -> torch.Tensor:
    m, k = x.shape
    n = qdata.shape[0]
    g = k // scale.shape[1]
    assert k % 32 == 0 and g % 32 == 0 and g * scale.shape[1] == k, (k, scale.shape)
    assert qdata.shape[1] * (2 if fmt == INT4 else 1) == k and scale.shape[0] == n
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    x = x if x.stride(1) == 1 else x.contiguous()
    words = qdata.contiguous().view(torch.int32)
    scale = scale.contiguous()
    zero = scale if zero is None else zero.contiguous()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    check = functools.partial(matches_reference, out, functools.partial(
        _reference_columns, x, qdata, scale, zero, bias, fmt))
    if m == 1:
        key = ("gemv", fmt, x.dtype, n, k, g)
        TUNER.run(key, _gemv_candidates(x, n, k, g, fmt),
                  lambda c, co: _gemv_launch(c, co, x, words, scale, zero, bias, out, fmt, g),
                  x.device, check)
    else:
        key = ("gemm", fmt, x.dtype, m_bucket(m), n, k, g)
        cands: list = gemm_candidates(_GEMM_TILES, x, n, k, g, 32)
        cands += _gemv_candidates(x, n, k, g, fmt)
        cands += upcast_gemm.upcast_candidates(x, n, k, g, scale.shape[1] == 1, fmt)
        if m > _SPLIT_MAX_M:
            cands.append(DEQUANT_THEN_DENSE)

        def launch(c, compile_only):
            if c is DEQUANT_THEN_DENSE:
                _dequant_then_dense(compile_only, x, words, scale, zero, bias, out, fmt)
            elif isinstance(c, GemvCfg):
                _gemv_launch(c, compile_only, x, words, scale, zero, bias, out, fmt, g)
            elif isinstance(c, upcast_gemm.UpcastCfg):
                upcast_gemm.upcast_launch(c, compile_only, x, words, scale, zero, bias, out, fmt,
                                          g)
            else:
                _gemm_launch(c, compile_only, x, words, scale, zero, bias, out, fmt, g)

        TUNER.run(key, cands, launch, x.device, check)
    return out


# A correct kernel differs from the fp32 reference by rounding the weights and the output to
# the activation dtype: ~50 dB in bf16 (tests/kernels), more in fp16 and fp32. A wrong tile
# (a miscompile, a bad mask) gives ~0 dB. 30 dB separates the two with room on both sides.
TUNER_CHECK_MIN_SQNR_DB = 30.0


def matches_reference(out: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor],
                      cols: int = 256) -> bool:
    """Whether out [M, N] matches reference(columns) (the fp32 expected output at those
    columns) on its first and last `cols` columns: the tuner's check of each candidate, run
    once per shape; two slices keep it cheap on huge layers while covering the first tiles and
    the masked last one."""
    n = out.shape[1]
    idx = torch.arange(n, device=out.device)
    if n > 2 * cols:
        idx = torch.cat((idx[:cols], idx[-cols:]))
    expected = reference(idx)
    noise = (out[:, idx].float() - expected).pow(2).sum().item()
    signal = expected.pow(2).sum().item()
    if not math.isfinite(signal):  # NaN or Inf in x: nothing to judge the kernel by
        return True
    if noise == 0:
        return True
    return signal > 0 and 10 * math.log10(signal / noise) >= TUNER_CHECK_MIN_SQNR_DB


def _reference_columns(x, qdata, scale, zero, bias, fmt: int, cols: torch.Tensor) -> torch.Tensor:
    """Output columns `cols` of the op's reference linear, in fp32 (the tuner's check)."""
    xf, b = x.float(), None if bias is None else bias[cols].float()
    if fmt == INT4:
        return ref.intx_weight_only_linear(xf, qdata[cols], scale[cols], zero[cols], b, 4)
    linear = ref.int8_weight_only_linear if fmt == INT8 else ref.fp8_weight_only_linear
    return linear(xf, qdata[cols], scale[cols], b)


# Tuner candidate for large M: decode the weight once, then the dense cuBLAS GEMM.
DEQUANT_THEN_DENSE = "dequant-then-dense"


def _dequant_then_dense(compile_only: bool, x, words, scale, zero, bias, out, fmt: int) -> None:
    from .dequant import dequantize_words

    w = dequantize_words(words, scale, zero, fmt, _CODES_PER_WORD[fmt], x.shape[1], x.dtype,
                         compile_only)
    if compile_only:
        return
    if bias is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(bias.to(x.dtype), x, w.t(), out=out)


def int4_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qdata)^T (+ bias), w[n, k] = (q[n, k] - zero[n, k//g]) * scale[n, k//g].

    qdata is uint8 [N, K // 2]: byte j holds k = 2j in its low nibble and k = 2j + 1 in its high
    nibble, codes 0..15. scale and zero are [N, K // g] in one float dtype.
    """
    return _weight_only_mm(x, qdata, scale, zero, bias, INT4)


def int8_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (qdata * scale[n, k // g])^T (+ bias); qdata int8 [N, K], scale [N, K // g]."""
    return _weight_only_mm(x, qdata, scale, None, bias, INT8)


def fp8_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (float(qdata) * scale[n])^T (+ bias); qdata float8_e4m3fn [N, K], scale [N, 1]."""
    return _weight_only_mm(x, qdata, scale, None, bias, FP8)


# Last, because it builds on the helpers above; imported here once rather than on every call.
from . import upcast_gemm  # noqa: E402
