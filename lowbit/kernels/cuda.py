"""CUDA implementations of the lowbit ops: the one place that picks a kernel per call.

Triton kernels (lowbit.kernels.triton) serve every op they cover; the choice between a
GEMV and a tiled GEMM by M happens inside them. Ops without a Triton kernel run the
reference on the GPU, which is correct but not fast; `kernel_name` says which runs.
"""

from __future__ import annotations

import importlib.util

import torch

from lowbit.kernels import ops
from lowbit.kernels import reference as ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
# At and below this many rows fp8 `_scaled_mm` is slower than streaming the fp8 weight
# through the weight-only GEMV (../shared/GPU.md: 1.23 TB/s at M=1..64).
FP8_SCALED_MM_MIN_M = 64


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _unflat(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _triton():
    from lowbit.kernels.triton import dynamic, weight_only

    return weight_only, dynamic


def kernel_name(op: str, x: torch.Tensor, bits: int = 8, has_zero: bool = True) -> str:
    """Which implementation serves `op` for this input (for benchmarks and reports)."""
    if not (x.is_cuda and HAS_TRITON):
        return "reference"
    if op == "intx_weight_only_linear":
        return "triton" if bits == 4 and has_zero else "reference"
    if op == "fp8_dynamic_linear":
        m = _flat(x).shape[0]
        return "scaled_mm" if m > FP8_SCALED_MM_MIN_M else "triton-fp8-gemv"
    if op == "int8_act_intx_weight_linear":
        return "reference"
    return "triton"


def _register() -> None:
    @ops.int8_weight_only_linear.register_kernel("cuda")
    def _(x, qdata, scale, bias):
        if not HAS_TRITON:
            return ref.int8_weight_only_linear(x, qdata, scale, bias)
        wo, _dyn = _triton()
        return _unflat(wo.int8_weight_only_mm(_flat(x), qdata, scale, bias), x)

    @ops.intx_weight_only_linear.register_kernel("cuda")
    def _(x, qdata, scale, zero, bias, bits):
        if not HAS_TRITON or bits != 4 or zero is None:
            return ref.intx_weight_only_linear(x, qdata, scale, zero, bias, bits)
        wo, _dyn = _triton()
        return _unflat(wo.int4_weight_only_mm(_flat(x), qdata, scale, zero, bias), x)

    @ops.fp8_weight_only_linear.register_kernel("cuda")
    def _(x, qdata, scale, bias):
        if not HAS_TRITON:
            return ref.fp8_weight_only_linear(x, qdata, scale, bias)
        wo, _dyn = _triton()
        return _unflat(wo.fp8_weight_only_mm(_flat(x), qdata, scale, bias), x)

    @ops.int8_dynamic_linear.register_kernel("cuda")
    def _(x, qdata, scale, bias):
        if not HAS_TRITON:
            return ref.int8_dynamic_linear(x, qdata, scale, bias)
        _wo, dyn = _triton()
        return _unflat(dyn.int8_dynamic_mm(_flat(x), qdata, scale, bias), x)

    @ops.fp8_dynamic_linear.register_kernel("cuda")
    def _(x, qdata, scale, bias, act_per_row):
        if not HAS_TRITON:
            return ref.fp8_dynamic_linear(x, qdata, scale, bias, act_per_row)
        wo, dyn = _triton()
        x2d = _flat(x)
        if x2d.shape[0] <= FP8_SCALED_MM_MIN_M:
            # Same numbers as the fp8 GEMM: activations rounded to fp8, fp32 accumulation.
            x_rounded, _ = dyn.quantize_fp8_rows(x2d, act_per_row, fake=True)
            return _unflat(wo.fp8_weight_only_mm(x_rounded, qdata, scale, bias), x)
        xq, xs = dyn.quantize_fp8_rows(x2d, act_per_row)
        if act_per_row:
            scale_b = scale.float().reshape(1, -1)
            out_dtype = torch.bfloat16  # rowwise scaling produces bf16 only
        else:
            xs, scale_b, out_dtype = xs.reshape(()), scale.float()[0, 0], x.dtype
        y = torch._scaled_mm(
            xq, qdata.t(), scale_a=xs, scale_b=scale_b,
            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
        )
        return _unflat(y.to(x.dtype), x)

    @ops.decode_attention.register_kernel("cuda")
    def _(q, k, v, input_pos):
        if not HAS_TRITON or not decode_attention_fits(q, k, v):
            return ref.decode_attention(q, k, v, input_pos)
        from lowbit.kernels.triton.decode_attention import decode_attention

        return decode_attention(q, k, v, input_pos)

    @ops.rope_cache_attention.register_kernel("cuda")
    def _(q, k, v, cos, sin, k_cache, v_cache, input_pos):
        if not HAS_TRITON or not rope_cache_attention_fits(q, k, v, cos, sin, k_cache, v_cache):
            return ref.rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos)
        from lowbit.kernels.triton.decode_attention import rope_cache_attention

        return rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos)


def rope_cache_attention_fits(q, k, v, cos, sin, k_cache, v_cache) -> bool:
    """The fused kernel's layout: `decode_attention_fits` for the caches, the token's k and v
    rows contiguous along the head, one fp32 cos/sin row, and the caches in q's dtype."""
    q4 = q.transpose(1, 2)
    return (decode_attention_fits(q4, k_cache, v_cache) and q.shape[1] == 1
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k.dtype == v.dtype == q.dtype
            and cos.shape == sin.shape == (1, q.shape[-1] // 2) and cos.is_contiguous()
            and sin.is_contiguous() and cos.dtype == sin.dtype == torch.float32)


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton decode attention takes one query per sequence, a power-of-two head size of
    16 or more, and rows contiguous along it."""
    dim = q.shape[-1]
    return (q.shape[2] == 1 and dim >= 16 and dim & (dim - 1) == 0 and q.stride(-1) == 1
            and k.stride(-1) == 1 and v.stride(-1) == 1 and q.dtype == k.dtype == v.dtype)


_register()
