"""On the GPU, every config's custom op (whatever kernel cuda.py picks) matches the reference
op on the same packed weights, across the M buckets the kernels switch between."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import reference as ref
from lowbit.quantize import preset, quantize_weight
from lowbit.tensors import Float8Weight

pytestmark = pytest.mark.cuda

PRESETS = ["int8", "int8-dynamic", "int4-g128", "int4-g64", "int4-g64-float-zero", "int3-g64",
           "fp8", "fp8-dynamic", "fp8-dynamic-tensorwise", "int8-dynamic-int4-g32"]


def _sqnr(a, b):
    noise = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(a.double().pow(2).mean().item() / noise)


def _reference(q, x, bias):
    x32, b32 = x.float(), None if bias is None else bias.float()
    if isinstance(q, Float8Weight):
        if q.act_quant == "none":
            return ref.fp8_weight_only_linear(x32, q.qdata, q.scale, b32)
        return ref.fp8_dynamic_linear(x32, q.qdata, q.scale, b32, q.act_quant == "per_row")
    if q.act_quant == "int8_per_token":
        return ref.int8_dynamic_linear(x32, q.qdata, q.scale, b32)
    if q.act_quant == "int8_per_token_asym":
        return ref.int8_act_intx_weight_linear(x32, q.qdata, q.scale.float(),
                                               None if q.zero is None else q.zero.float(), b32,
                                               q.bits)
    return F.linear(x32, q.dequantize(torch.float32), b32)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("m", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_op_matches_reference(name, m, with_bias):
    torch.manual_seed(m)
    k, n = 1024, 768
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    q = quantize_weight(preset(name), w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
    out = F.linear(x, q, bias)
    expected = _reference(q, x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # bf16 output rounding alone limits SQNR to ~50 dB; activation re-quantization on the GPU
    # may move a few codes by one step (scales differ by an ulp), which stays far above 35 dB.
    assert _sqnr(expected, out) > 35, _sqnr(expected, out)


def test_compiled_decode_step_with_cuda_graphs():
    from lowbit.models import ModelArgs, Transformer, init_weights
    from lowbit.quantize import quantize_

    args = ModelArgs.from_name("tiny", dim=256, ffn_hidden=512, n_heads=4, n_kv_heads=2)
    model = Transformer(args).cuda().to(torch.bfloat16)
    init_weights(model, seed=0)
    quantize_(model, preset("int4-g64"), show_progress=False)
    model.setup_caches(2, 32, dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(0, args.vocab_size, (2, 8), device="cuda")
    pos = torch.arange(8, device="cuda")
    token, next_pos = prompt[:, -1:], pos[-1:] + 1
    with torch.no_grad():
        model(prompt, pos)
        eager = model(token, next_pos)
        step = torch.compile(lambda t, p: model(t, p), mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, capture, replay
            compiled = step(token, next_pos).clone()
    # bf16 logits; compiled fusions may round differently by an ulp or two
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
