"""The custom ops: registered schemas, fake impls and reference agreement (opcheck)."""

import pytest
import torch

from lowbit.formats import PerGroup
from lowbit.kernels import ops
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    quantize_weight,
)


def _args(cfg, x, bias):
    q = quantize_weight(cfg, torch.randn(32, 64))
    if isinstance(cfg, (Float8WeightOnly,)):
        return ops.fp8_weight_only_linear, (x, q.qdata, q.scale, bias)
    if isinstance(cfg, Float8DynamicActivationFloat8Weight):
        return ops.fp8_dynamic_linear, (x, q.qdata, q.scale, bias, True)
    if isinstance(cfg, Int8DynamicActivationInt8Weight):
        return ops.int8_dynamic_linear, (x, q.qdata, q.scale, bias)
    if isinstance(cfg, Int8WeightOnly):
        return ops.int8_weight_only_linear, (x, q.qdata, q.scale, bias)
    if isinstance(cfg, Int8DynamicActivationInt4Weight):
        return ops.int8_act_intx_weight_linear, (x, q.qdata, q.scale, q.zero, bias, 4)
    return ops.intx_weight_only_linear, (x, q.qdata, q.scale, q.zero, bias, q.bits)


@pytest.mark.parametrize(
    "cfg",
    [
        Int8WeightOnly(),
        Int8DynamicActivationInt8Weight(),
        Int4WeightOnly(32),
        IntxWeightOnly(3, PerGroup(32)),
        Float8WeightOnly(),
        Float8DynamicActivationFloat8Weight(),
        Int8DynamicActivationInt4Weight(32),
    ],
    ids=lambda c: type(c).__name__,
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(cfg, with_bias):
    x = torch.randn(3, 64)
    bias = torch.randn(32) if with_bias else None
    op, args = _args(cfg, x, bias)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if args[1].dtype == torch.float8_e4m3fn:
        # torch's schema checker multiplies inputs to detect mutation, which float8 cannot do
        # on CPU; the other checks still cover float8 ops.
        utils = utils[1:]
    torch.library.opcheck(op, args, test_utils=utils)


def test_all_ops_are_registered_under_lowbit():
    names = {op._qualname for op in ops.ALL_OPS}
    for name in names:
        ns, _, op = name.partition("::")
        assert ns == "lowbit" and hasattr(torch.ops.lowbit, op)


def test_decode_attention_op():
    """Schema, fake impl and reference agree; the reference equals attention with the mask the
    model's cache path builds."""
    q = torch.randn(2, 1, 8, 16).transpose(1, 2)
    k, v = torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    input_pos = torch.tensor([9])
    torch.library.opcheck(ops.decode_attention, (q, k, v, input_pos))
    out = ops.decode_attention(q, k, v, input_pos)
    for head in range(8):
        kv = head // 4
        scores = torch.einsum("bd,bsd->bs", q[:, head, 0], k[:, kv]) / 4.0  # sqrt(16)
        scores[:, 10:] = float("-inf")
        want = torch.einsum("bs,bsd->bd", scores.softmax(-1), v[:, kv])
        torch.testing.assert_close(out[:, head, 0], want, rtol=1e-5, atol=1e-5)


def test_rope_cache_attention_op():
    """Schema (the caches are declared mutated), fake impl and reference; the reference is
    RoPE, the cache write and `decode_attention` in sequence."""
    from lowbit.models.llama import apply_rope, rope_tables

    q, k, v = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cos, sin = rope_tables(torch.tensor([9]), 16, 10000.0)
    k_cache, v_cache = torch.randn(3, 2, 24, 16), torch.randn(3, 2, 24, 16)
    input_pos = torch.tensor([9])
    torch.library.opcheck(ops.rope_cache_attention,
                          (q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), input_pos))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.rope_cache_attention(q, k, v, cos, sin, kc, vc, input_pos)
    rk = apply_rope(k, cos, sin).transpose(1, 2)
    assert torch.equal(kc[:2, :, 9:10], rk) and torch.equal(vc[:2, :, 9:10], v.transpose(1, 2))
    kc_before = k_cache.clone()
    kc_before[:2, :, 9:10] = rk
    assert torch.equal(kc, kc_before)  # nothing else written, the third row untouched
    want = ops.decode_attention(apply_rope(q, cos, sin).transpose(1, 2), kc[:2], vc[:2],
                                input_pos)
    torch.testing.assert_close(out, want)
