"""Plain-PyTorch implementations of every lowbit op: the CPU path and the test oracle.

Each function takes the packed fields exactly as the tensor subclasses store them and
decodes them with the one codec in `lowbit.formats`, so a kernel that matches these
functions matches the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import (
    AffineSpec,
    choose_qparams,
    dequantize,
    dequantize_fp8,
    fp8_max,
    quantize,
    saturating_cast,
    unpack_bits,
)


def group_block(qshape_k: int, scale: torch.Tensor) -> tuple[int, int]:
    """Block size (1, g) of a [N, K] weight whose scale is [N, K // g]."""
    return (1, qshape_k // scale.shape[1])


def int8_weight(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(qdata, scale, None, group_block(qdata.shape[1], scale), dtype)


def intx_weight(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Unsigned packed codes; with zero=None the codes are symmetric, offset by 2^(bits-1)."""
    k = qdata.shape[1] * 8 // bits
    codes = unpack_bits(qdata, bits, k).to(torch.int16)
    if zero is None:
        codes = codes - 2 ** (bits - 1)
    return dequantize(codes, scale, zero, group_block(k, scale), dtype)


def fp8_weight(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp8(qdata, scale, group_block(qdata.shape[1], scale), dtype)


def int8_weight_only_linear(x, qdata, scale, bias):
    return F.linear(x, int8_weight(qdata, scale, x.dtype), bias)


def intx_weight_only_linear(x, qdata, scale, zero, bias, bits):
    return F.linear(x, intx_weight(qdata, scale, zero, bits, x.dtype), bias)


def fp8_weight_only_linear(x, qdata, scale, bias):
    return F.linear(x, fp8_weight(qdata, scale, x.dtype), bias)


def quantize_per_token_int8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row and their float32 scales [M, 1]."""
    block = (1, x2d.shape[1])
    spec = AffineSpec(8)
    scale, _ = choose_qparams(x2d, spec, block, torch.float32)
    return quantize(x2d, scale, None, spec, block).to(torch.int8), scale


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b. torch._int_mm on CUDA wants more than 16 rows: pad, then slice."""
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
    return torch._int_mm(a, b)[:m] if m else a.new_zeros(0, b.shape[1], dtype=torch.int32)


def int8_dynamic_linear(x, qdata, scale, bias):
    """Per-token int8 activations x per-row int8 weights, int32 accumulation."""
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token_int8(x2d)
    acc = _int8_matmul(xq, qdata.t())
    y = acc.float() * xs * scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


def quantize_fp8_activation(x2d: torch.Tensor, per_row: bool, dtype=torch.float8_e4m3fn):
    """Dynamic fp8 activations: one float32 scale per row, or one for the whole tensor."""
    mag = x2d.float().abs()
    amax = mag.amax(dim=1, keepdim=True) if per_row else mag.amax().reshape(1, 1)
    scale = (amax / fp8_max(dtype)).clamp(min=1e-12)
    return saturating_cast(x2d.float() / scale, dtype), scale


def fp8_dynamic_linear(x, qdata, scale, bias, act_per_row):
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8_activation(x2d, act_per_row, qdata.dtype)
    y = (xq.float() * xs) @ (qdata.float() * scale.float()).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


def fake_quantize_per_token_int8_asym(x: torch.Tensor) -> torch.Tensor:
    """The activation side of the int8-activation/int4-weight scheme (ExecuTorch's 8da4w)."""
    spec = AffineSpec(8, "asymmetric", "int")
    x2d = x.reshape(-1, x.shape[-1]).float()
    block = (1, x2d.shape[1])
    scale, zero = choose_qparams(x2d, spec, block, torch.float32)
    q = quantize(x2d, scale, zero, spec, block)
    return dequantize(q, scale, zero, block, x.dtype).reshape(x.shape)


def int8_act_intx_weight_linear(x, qdata, scale, zero, bias, bits):
    w = intx_weight(qdata, scale, zero, bits, x.dtype)
    return F.linear(fake_quantize_per_token_int8_asym(x), w, bias)


def decode_attention(q, k, v, input_pos):
    """One new token per sequence over a KV cache: q [B, H, 1, D], k and v [B, H_kv, S, D];
    query head j reads KV head j // (H / H_kv) at positions 0..input_pos[0]. The query heads
    of a KV head are folded into its query rows, so K/V are read as they are."""
    batch, heads, _, dim = q.shape
    kv_heads, cache_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    folded = q.reshape(batch, kv_heads, groups, dim)
    seen = torch.arange(cache_len, device=q.device) <= input_pos[0]
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=seen.expand(groups, cache_len))
    return y.reshape(batch, heads, 1, dim)


def rope(x, cos, sin):
    """Rotate x [B, T, H, D] by position in fp32, pairs (i, i + D/2); cos and sin [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos):
    """One decode step's attention from the projections: q [B, 1, H, D], k and v
    [B, 1, H_kv, D] not yet rotated. Rotates q and k, writes k and v into the caches
    [B_max, H_kv, S, D] at input_pos[0], attends over positions 0..input_pos[0]: [B, H, 1, D]."""
    batch = q.shape[0]
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k_cache[:batch].index_copy_(2, input_pos, k.transpose(1, 2))
    v_cache[:batch].index_copy_(2, input_pos, v.transpose(1, 2))
    y = decode_attention(q.transpose(1, 2), k_cache[:batch], v_cache[:batch], input_pos)
    return y.contiguous()
