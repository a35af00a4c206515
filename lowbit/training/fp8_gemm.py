"""Dynamic fp8 casts and the scaled fp8 GEMM of training: `torch._scaled_mm` on CUDA, an exact
emulation elsewhere.

A cast scales along the GEMM's contraction dim: a ``[M, K]`` operand contracted over K gets
per-row scales ``[M, 1]`` (rowwise) or one ``[1, 1]`` scale (tensorwise); contracted over M it
gets ``[1, K]``. The rounding is the one codec of `lowbit.formats.fp8`, so the CPU emulation,
the CUDA path and inference quantization agree on every fp8 value. Everything is tensor math
on the device: no `.item()`, so a training step never waits on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.fp8 import choose_fp8_scale, quantize_fp8

# The fp8 training linear's op (lowbit.training.float8_linear), by a versioned name: the on-disk
# AOTAutograd cache keys on dynamo's graph, where the op shows by name only (torch 2.11-2.13
# hash neither its Python body nor its backward formula). Bump the version whenever either
# changes, or graphs compiled by an older lowbit are reused (seen: a cached backward calling
# an op that the newer lowbit no longer had).
TRAIN_MM_OP = "lowbit::float8_train_mm_v2"

# cuBLASLt's fp8 GEMM needs the contraction dim and the output's column count to be multiples
# of 16 (`torch._scaled_mm` checks this).
FP8_GEMM_ALIGN = 16


def cast_fp8(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, power_of_2: bool, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 data shaped like x, float32 dequant scale) for a 2-D x contracted along `axis`.

    ``x ~= data * scale``; the scale is amax / fp8_max of each row along `axis` (rowwise) or of
    the whole tensor, optionally rounded up to a power of 2.
    """
    rows, cols = x.shape
    if not rowwise:
        block = (rows, cols)
    elif axis == 1:
        block = (1, cols)
    else:
        block = (rows, 1)
    scale = choose_fp8_scale(x, block, dtype, power_of_2)
    return quantize_fp8(x, scale, block, dtype), scale


def scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) for fp8 a [M, K], b [K, N]; scales [M, 1] / [1, N] or
    [1, 1] each. Any strides are accepted; the CUDA path rearranges them as cuBLASLt needs.

    Plain tensor code (shape, stride and device checks are static under tracing), so inside a
    compiled backward it becomes one `aten._scaled_mm` extern call: no Python on the host per
    GEMM, which held FSDP2 steps back when each GEMM was an opaque custom op (~100 us each)."""
    if a.is_cuda:
        return _cuda_scaled_mm(a, a_scale, b, b_scale, out_dtype, use_fast_accum)
    return emulated_scaled_mm(a, a_scale, b, b_scale, out_dtype)


def emulated_scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fp8 GEMM on any device: decode exactly to float32, multiply and accumulate in
    float32 (as the tensor cores do, minus their fast-accumulation shortcuts), cast the result."""
    return ((a.float() * a_scale) @ (b.float() * b_scale)).to(out_dtype)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 and t.stride(0) == t.shape[1] else t.contiguous()


def _pad_inner(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad fp8 data along dim to a multiple: zeros add nothing to the dot products.
    Padded as bytes, since fp8 +0 is the byte 0 and pad has no fp8 kernel."""
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    pad = (0, extra) if dim == 1 else (0, 0, 0, extra)
    return F.pad(t.view(torch.uint8), pad).view(t.dtype)


def _cuda_scaled_mm(a, a_scale, b, b_scale, out_dtype, use_fast_accum):
    # The contraction dim may be the token count (grad-weight GEMM), which nobody aligned.
    a, b = _pad_inner(a, 1, FP8_GEMM_ALIGN), _pad_inner(b, 0, FP8_GEMM_ALIGN)
    # cuBLASLt wants the first operand row-major and the second column-major.
    a, b = _row_major(a), _row_major(b.t()).t()
    rowwise = a_scale.numel() > 1 or b_scale.numel() > 1
    # Rowwise-scaled fp8 GEMMs only write bfloat16.
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(
        a,
        b,
        scale_a=a_scale.contiguous(),
        scale_b=b_scale.contiguous(),
        out_dtype=mm_dtype,
        use_fast_accum=use_fast_accum,
    )
    return out.to(out_dtype)
