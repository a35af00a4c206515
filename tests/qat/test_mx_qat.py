"""QAT for dynamic MX configs inside torch.compile: the fake quantizer (the real op on the
codec's fields, STE gradients) traces without graph breaks and matches eager exactly.

NVFP4 is not here: its per-tensor scale checks the tensor is finite on the host, which
dynamo cannot trace (see `lowbit.formats.mx.nvfp4_tensor_scale`)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import qat
from lowbit.quantize import MXDynamicActivationMXWeight


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_mx_dynamic_compiles_fullgraph():
    # One config (compiling costs most of this file's time): different weight and activation
    # element types and the rceil scale rule, so every codec argument is traced.
    cfg = MXDynamicActivationMXWeight("fp4_e2m1", act_elem="fp8_e4m3", scale_mode="rceil")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    qat.prepare(model, cfg)
    x = torch.randn(8, 64)
    want_out, want_grads = _grads(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got_out, got_grads = _grads(compiled, x)
    # The forward is the same custom op on the same codes: equal, not close.
    assert torch.equal(got_out, want_out)
    for a, b in zip(got_grads, want_grads):
        # aot_eager runs the same backward ops; allow only reassociation-level differences.
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in got_grads)
