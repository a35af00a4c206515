"""Attention of one new token per sequence over a static KV cache, split along the cache.

At decode time a grouped-query layer has only batch x KV heads independent problems (8 for
Llama-3-8B at batch 1): a kernel with one program per head keeps 8 SMs busy while the rest
idle, and the step waits on them. Here each (sequence, KV head) is also split along the cache
into chunks of BS positions; every program computes an online-softmax partial result for all
`groups` query heads sharing its KV head (the KV tile is read once for them), and a second
small kernel merges the partials. Only positions up to the query's own (`input_pos`, read on
the device: no host sync, CUDA-graph safe) are read, so the zeros beyond it cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import wait_for_inputs
from .weight_only import num_sms

BS = 64  # cache positions per tile


@triton.jit
def _rotated(x_ptr, cos_ptr, sin_ptr, offs, D: tl.constexpr, mask):
    """RoPE of rows x [R, D] (offs: their element offsets) in fp32, halves (i, i + D/2) rotated:
    x1 cos - x2 sin, then x2 cos + x1 sin, as `lowbit.kernels.reference.rope`."""
    d = tl.arange(0, D)
    half = d % (D // 2)
    first = d < D // 2
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + offs + tl.where(first, D // 2, -(D // 2)), mask=mask,
                      other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + half)
    s = tl.load(sin_ptr + half)
    return tl.where(first, x * c - partner * s, x * c + partner * s)


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr,
    KV_HEADS, SPLITS, CHUNK, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_knb, stride_knh, stride_vnb, stride_vnh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    DOT_F32: tl.constexpr, NEW: tl.constexpr, PDL: tl.constexpr,
):
    """Softmax-weighted sum over cache chunk `split` for the G query heads of one KV head:
    acc [GP, D] (unnormalized), running max m and sum l [GP], into the fp32 workspaces.

    NEW: q is not yet rotated, and the token's own k and v (kn, vn, not rotated either) are not
    in the cache: q is rotated here, the program whose chunk holds the token's position writes
    the rotated k and v there and takes them from registers, the others read only positions
    before it (so nothing is read that this launch writes)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV_HEADS
    h = bh % KV_HEADS
    rows = tl.arange(0, GP)
    d = tl.arange(0, D)
    wait_for_inputs(PDL)
    q_offs = b * stride_qb + (h * G + rows)[:, None] * stride_qh + d[None, :]
    if NEW:
        q = _rotated(q_ptr, cos_ptr, sin_ptr, q_offs, D, (rows < G)[:, None])
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + q_offs, mask=(rows < G)[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    pos = tl.load(pos_ptr)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, pos if NEW else pos + 1)
    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for s0 in range(start, end, BS):
        offs = s0 + tl.arange(0, BS)
        valid = offs < end
        k = tl.load(k_base + offs[:, None] * stride_ks + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + offs[:, None] * stride_vs + d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if NEW:
        if (pos >= start) & (pos < start + CHUNK):
            kn = _rotated(kn_ptr, cos_ptr, sin_ptr, b * stride_knb + h * stride_knh + d, D,
                          d < D).to(k_ptr.dtype.element_ty)
            vn = tl.load(vn_ptr + b * stride_vnb + h * stride_vnh + d)
            tl.store(k_base + pos * stride_ks + d, kn)
            tl.store(v_base + pos * stride_vs + d, vn.to(v_ptr.dtype.element_ty))
            s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * scale
            m_new = tl.maximum(m, s_new)
            p_new = tl.exp(s_new - m_new)
            alpha = tl.exp(m - m_new)
            l = l * alpha + p_new
            if not DOT_F32:
                p_new = p_new.to(v_ptr.dtype.element_ty).to(tl.float32)
            vn32 = vn.to(v_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * alpha[:, None] + p_new[:, None] * vn32[None, :]
            m = m_new
    slot = bh * SPLITS + split
    tl.store(acc_ptr + (slot * GP + rows)[:, None] * D + d[None, :], acc)
    tl.store(ml_ptr + slot * 2 * GP + rows, m)
    tl.store(ml_ptr + slot * 2 * GP + GP + rows, l)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, out_ptr, KV_HEADS, SPLITS, stride_ob, stride_oh,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
                  PDL: tl.constexpr):
    """out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the splits of one KV head
    (an empty split has m = -inf, l = 0 and weighs nothing)."""
    bh = tl.program_id(0)
    b = bh // KV_HEADS
    h = bh % KV_HEADS
    sp = tl.arange(0, SP)
    rows = tl.arange(0, GP)
    d = tl.arange(0, D)
    ml = ml_ptr + bh * SPLITS * 2 * GP
    wait_for_inputs(PDL)
    top = tl.max(tl.load(ml + (sp * 2 * GP)[:, None] + rows[None, :],
                         mask=(sp < SPLITS)[:, None], other=float("-inf")), axis=0)
    total = tl.zeros((GP, D), tl.float32)
    norm = tl.zeros((GP,), tl.float32)
    for split in range(SPLITS):
        w = tl.exp(tl.load(ml + split * 2 * GP + rows) - top)
        norm += tl.load(ml + split * 2 * GP + GP + rows) * w
        total += tl.load(acc_ptr + ((bh * SPLITS + split) * GP + rows)[:, None] * D
                         + d[None, :]) * w[:, None]
    out = total / norm[:, None]
    tl.store(out_ptr + b * stride_ob + (h * G + rows)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None])


def splits_for(batch_heads: int, cache_len: int, sms: int) -> tuple[int, int]:
    """(splits, chunk): enough programs for ~2 per SM, chunks a whole number of tiles."""
    tiles = triton.cdiv(cache_len, BS)
    splits = max(1, min(tiles, triton.cdiv(2 * sms, batch_heads)))
    chunk = triton.cdiv(tiles, splits) * BS
    return triton.cdiv(cache_len, chunk), chunk


def exact_dot(q: torch.Tensor) -> bool:
    """Run the dots in IEEE fp32: for fp32 inputs, and under the interpreter (whose bf16 dot
    is wrong)."""
    return not q.is_cuda or q.dtype == torch.float32


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, D] against the cache k, v [B, H_kv, S, D], positions 0..input_pos[0].

    Returns [B, H, 1, D] in q's dtype; query head j reads KV head j // (H / H_kv)."""
    return _attend(q[:, :, 0], k, v, input_pos, None, torch.empty_like(q))


def rope_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         input_pos: torch.Tensor) -> torch.Tensor:
    """One decode step's attention from the projections: q [B, 1, H, D] and the token's k, v
    [B, 1, H_kv, D], none rotated yet, cos and sin [1, D/2] (fp32). Rotates q and k, writes k
    and v into the caches [B_max, H_kv, S, D] at input_pos[0] and returns the attention over
    positions 0..input_pos[0], [B, H, 1, D]: `decode_attention` plus the RoPE and cache-write
    kernels it replaces."""
    batch, _, heads, dim = q.shape
    out = q.new_empty((batch, heads, 1, dim))
    return _attend(q[:, 0], k_cache, v_cache, input_pos, (k[:, 0], v[:, 0], cos, sin), out)


def _attend(q3: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
            new: tuple | None, out: torch.Tensor) -> torch.Tensor:
    """Launch the partial and merge kernels for q3 [B, H, D] over caches k, v [>= B, ...] into
    out [B, H, 1, D]; `new` = (k_new, v_new, cos, sin) for the fused RoPE and cache write."""
    batch, heads, dim = q3.shape
    kv_heads, cache_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    gp = max(16, triton.next_power_of_2(groups))  # tl.dot takes 16 rows or more
    splits, chunk = splits_for(batch * kv_heads, cache_len, num_sms(q3))
    acc = torch.empty(batch * kv_heads * splits * gp * dim, device=q3.device,
                      dtype=torch.float32)
    ml = torch.empty(batch * kv_heads * splits * 2 * gp, device=q3.device, dtype=torch.float32)
    kn, vn, cos, sin = new if new is not None else (q3, q3, q3, q3)  # unused without NEW
    _partial_kernel[(batch * kv_heads, splits)](
        q3, k, v, input_pos, acc, ml, kn, vn, cos, sin, kv_heads, splits, chunk, dim ** -0.5,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kn.stride(0), kn.stride(1), vn.stride(0),
        vn.stride(1), G=groups, GP=gp, D=dim, BS=BS, DOT_F32=exact_dot(q3), NEW=new is not None,
        num_warps=4, **pdl.options(q3),
    )
    _merge_kernel[(batch * kv_heads,)](
        acc, ml, out, kv_heads, splits, out.stride(0), out.stride(1),
        G=groups, GP=gp, D=dim, SP=triton.next_power_of_2(splits), num_warps=4,
        **pdl.options(q3),
    )
    return out
