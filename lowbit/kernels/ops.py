"""The lowbit custom ops: one opaque op per quantized linear, seen whole by compile/export.

Each op has a reference implementation (any device; `reference.py`), a fake implementation
(shapes only, for torch.compile, torch.export and CUDA graphs) and, on CUDA, the kernel that
`cuda.py` picks. Arguments are the packed fields exactly as the tensor subclasses hold them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import reference as ref


def _linear_out(x: Tensor, n: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("lowbit::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ (qdata * scale)^T + bias; int8 codes, scale [N, K // g]."""
    return ref.int8_weight_only_linear(x, qdata, scale, bias)


@torch.library.custom_op("lowbit::intx_weight_only_linear", mutates_args=())
def intx_weight_only_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, bits: int
) -> Tensor:
    """Packed unsigned `bits`-bit codes; w = (q - zero) * scale (zero None: q - 2^(bits-1))."""
    return ref.intx_weight_only_linear(x, qdata, scale, zero, bias, bits)


@torch.library.custom_op("lowbit::fp8_weight_only_linear", mutates_args=())
def fp8_weight_only_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return ref.fp8_weight_only_linear(x, qdata, scale, bias)


@torch.library.custom_op("lowbit::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Per-token symmetric int8 activations, per-row int8 weights, int32 accumulation."""
    return ref.int8_dynamic_linear(x, qdata, scale, bias)


@torch.library.custom_op("lowbit::fp8_dynamic_linear", mutates_args=())
def fp8_dynamic_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None, act_per_row: bool
) -> Tensor:
    """Dynamic e4m3 activations (per row or per tensor) times fp8 weights."""
    return ref.fp8_dynamic_linear(x, qdata, scale, bias, act_per_row)


@torch.library.custom_op("lowbit::int8_act_intx_weight_linear", mutates_args=())
def int8_act_intx_weight_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None, bits: int
) -> Tensor:
    """Per-token asymmetric int8 activations (fake-quantized) times packed intx weights."""
    return ref.int8_act_intx_weight_linear(x, qdata, scale, zero, bias, bits)


@torch.library.custom_op("lowbit::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
    """Attention of one new token per sequence over a static KV cache (positions up to
    input_pos[0]); on CUDA a split-cache Triton kernel, see kernels/triton/decode_attention."""
    return ref.decode_attention(q, k, v, input_pos)


@decode_attention.register_fake
def _fake_decode_attention(q, k, v, input_pos):
    return torch.empty_like(q)


@torch.library.custom_op("lowbit::rope_cache_attention", mutates_args=("k_cache", "v_cache"))
def rope_cache_attention(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    input_pos: Tensor,
) -> Tensor:
    """A decode step's attention from the projections (q [B, 1, H, D], k and v [B, 1, H_kv, D],
    before RoPE): rotates q and k, writes k and v into the caches at input_pos[0] and attends
    over positions 0..input_pos[0]. Returns [B, H, 1, D]. On CUDA one split-cache Triton kernel
    does all three (kernels/triton/decode_attention)."""
    return ref.rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos)


@rope_cache_attention.register_fake
def _fake_rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos):
    batch, _, heads, dim = q.shape
    return q.new_empty((batch, heads, 1, dim))


@int8_weight_only_linear.register_fake
@fp8_weight_only_linear.register_fake
@int8_dynamic_linear.register_fake
def _fake_linear(x, qdata, scale, bias):
    return _linear_out(x, qdata.shape[0])


@intx_weight_only_linear.register_fake
@int8_act_intx_weight_linear.register_fake
def _fake_intx_linear(x, qdata, scale, zero, bias, bits):
    return _linear_out(x, qdata.shape[0])


@fp8_dynamic_linear.register_fake
def _fake_fp8_dynamic(x, qdata, scale, bias, act_per_row):
    return _linear_out(x, qdata.shape[0])


ALL_OPS = (
    int8_weight_only_linear,
    intx_weight_only_linear,
    fp8_weight_only_linear,
    int8_dynamic_linear,
    fp8_dynamic_linear,
    int8_act_intx_weight_linear,
    decode_attention,
    rope_cache_attention,
)
