"""QAT numerics: fake-quant forward == converted forward, and convert == quantize_, bit for bit.

Every registered config is checked, on Linear and (weight-only configs) Embedding layers, after
a few optimizer steps so the weights differ from their initial values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import qat
from lowbit.formats import PerAxis, PerGroup, PerTensor, mx
from lowbit.kernels import reference as ref
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
    quantize_,
)
from lowbit.tensors import LowbitTensor

CONFIGS = [
    Int8DynamicActivationInt4Weight(group_size=32),
    Int4WeightOnly(group_size=32),
    Int4WeightOnly(group_size=32, zero="float"),
    IntxWeightOnly(bits=2, granularity=PerGroup(16), mapping="asymmetric"),
    IntxWeightOnly(bits=3, granularity=PerTensor()),
    IntxWeightOnly(bits=1, granularity=PerAxis(0), mapping="asymmetric", zero="float"),
    Int8WeightOnly(),
    Int8WeightOnly(granularity=PerGroup(32)),
    Int8DynamicActivationInt8Weight(),
    Float8WeightOnly(),
    Float8WeightOnly(fp8_format="e5m2"),
    Float8DynamicActivationFloat8Weight(),
    Float8DynamicActivationFloat8Weight(granularity=PerTensor()),
    MXWeightOnly("fp4_e2m1"),
    MXWeightOnly("fp6_e2m3", "rceil"),
    MXWeightOnly("fp8_e4m3"),
    NVFP4WeightOnly(),
    MXDynamicActivationMXWeight("fp8_e4m3"),
    MXDynamicActivationMXWeight("fp6_e3m2", scale_mode="rceil"),
    MXDynamicActivationMXWeight("fp4_e2m1", act_elem="fp8_e4m3"),
    NVFP4DynamicActivationNVFP4Weight(),
]
DYNAMIC = {
    "8da4w": CONFIGS[0], "i8dyn": CONFIGS[8], "f8dyn": CONFIGS[11], "mxfp8dyn": CONFIGS[17],
    "mxfp6dyn": CONFIGS[18], "mxfp4w8a": CONFIGS[19], "nvfp4dyn": CONFIGS[20],
}


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(40, 64, dtype=dtype)
        self.fc1 = nn.Linear(64, 64, dtype=dtype)
        self.fc2 = nn.Linear(64, 32, bias=False, dtype=dtype)

    def forward(self, idx):
        return self.fc2(torch.relu(self.fc1(self.emb(idx))))


def _select(cfg):
    # Dynamic-activation configs apply to linears only (as in quantize_); weight-only ones
    # also take the embedding.
    if cfg.dynamic_activations:
        return None
    return lambda m, fqn: isinstance(m, (nn.Linear, nn.Embedding))


def _train_a_bit(model, idx, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(idx).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _assert_same_tensors(a: LowbitTensor, b: LowbitTensor):
    assert type(a) is type(b) and a.attrs() == b.attrs()
    fa, fb = a.inner_tensors(), b.inner_tensors()
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        assert torch.equal(fa[name].view(torch.uint8), fb[name].view(torch.uint8)), name


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c)[:60])
def test_convert_matches_quantize_and_fake_forward(cfg):
    model = Tiny()
    idx = torch.randint(0, 40, (3, 7))
    summary = qat.prepare(model, cfg, _select(cfg))
    assert "fc1" in summary.prepared and "fc2" in summary.prepared
    _train_a_bit(model, idx)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        fake_out = model(idx)
    qat.convert(model)
    assert type(model.fc1) is nn.Linear and type(model.emb) is nn.Embedding

    ptq = Tiny()
    ptq.load_state_dict(trained)
    quantize_(ptq, cfg, _select(cfg), show_progress=False)
    for name in ("emb", "fc1", "fc2"):
        got, want = getattr(model, name).weight, getattr(ptq, name).weight
        assert isinstance(got, LowbitTensor) == isinstance(want, LowbitTensor)
        if isinstance(want, LowbitTensor):
            _assert_same_tensors(got, want)
    with torch.no_grad():
        # Same codec values and the same reference computation: exactly equal, not close.
        assert torch.equal(model(idx), fake_out)
        assert torch.equal(ptq(idx), fake_out)


def _fake_activation(cfg, x):
    if isinstance(cfg, Int8DynamicActivationInt4Weight):
        return ref.fake_quantize_per_token_int8_asym(x)
    if isinstance(cfg, Int8DynamicActivationInt8Weight):
        q, s = ref.quantize_per_token_int8(x)
        return q.float() * s
    if isinstance(cfg, MXDynamicActivationMXWeight):
        return mx.mx_fake_quantize(x, cfg.act_elem or cfg.elem, cfg.scale_mode)
    if isinstance(cfg, NVFP4DynamicActivationNVFP4Weight):
        return mx.nvfp4_fake_quantize(x)
    q, s = ref.quantize_fp8_activation(x, per_row=True)
    return q.float() * s


@pytest.mark.parametrize("cfg", DYNAMIC.values(), ids=DYNAMIC.keys())
def test_gradients_pass_straight_through(cfg):
    """STE: gradients are those of the float linear evaluated at the fake-quantized operands
    (checked against autograd of that float linear)."""
    lin = nn.Linear(64, 32)
    model = nn.Sequential(lin)
    qat.prepare(model, cfg)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 32)
    (model(x) * g).sum().backward()

    xq = _fake_activation(cfg, x.detach()).requires_grad_()
    wq = model[0].fake_quant.fake_weight(lin.weight).detach().requires_grad_()
    (nn.functional.linear(xq, wq, lin.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(x.grad, xq.grad)
    torch.testing.assert_close(lin.weight.grad, wq.grad)
    torch.testing.assert_close(lin.bias.grad, g.sum(0))


def test_tied_embedding_follows_linear():
    """quantize_ replaces a tied embedding's weight too; prepare fake-quantizes it with the
    same quantizer, so the tie survives and convert matches."""
    emb, head = nn.Embedding(40, 64), nn.Linear(64, 40, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    summary = qat.prepare(model, Int8DynamicActivationInt4Weight(group_size=32))
    assert summary.prepared["emb"] == "tied"
    assert model["emb"].weight is model["head"].weight
    assert model["emb"].fake_quant is model["head"].fake_quant
    qat.convert(model)
    assert model["emb"].weight is model["head"].weight
    assert isinstance(model["emb"].weight, LowbitTensor)


def test_learned_ranges_train_and_convert_exactly():
    cfg = Int4WeightOnly(group_size=16)
    model = nn.Sequential(nn.Linear(32, 16))
    qat.prepare(model, cfg, learn_ranges=True)
    scale = model[0].fake_quant.scale
    start = scale.detach().clone()
    x = torch.randn(8, 32)
    target = torch.randn(8, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        (model(x) - target).square().mean().backward()
        assert scale.grad is not None and scale.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    assert not torch.equal(scale.detach(), start)
    with torch.no_grad():
        fake_out = model(x)
    qat.convert(model)
    q = model[0].weight
    torch.testing.assert_close(q.scale, scale.detach().to(q.scale.dtype).expand_as(q.scale),
                               rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(model(x), fake_out)


def test_lsq_scale_gradient_matches_finite_difference_in_expectation():
    """d out / d scale per element is (q - z) - w / s inside the range: check it against
    the analytic derivative of the STE surrogate (q - z) * s with q held fixed."""
    from lowbit.formats import AffineSpec
    from lowbit.qat.ste import learned_scale_fake_quantize

    w = torch.randn(4, 8)
    spec = AffineSpec(4)
    s = (w.abs().amax(dim=1, keepdim=True) / spec.qmax).requires_grad_()
    out = learned_scale_fake_quantize(w, s, None, spec, (1, 8))
    out.sum().backward()
    q = torch.round(w / s.detach())
    expected = ((q - w / s.detach()).sum(dim=1, keepdim=True)) * (8 * spec.qmax) ** -0.5
    torch.testing.assert_close(s.grad, expected)


def test_lora_merges_before_convert():
    cfg = Int8DynamicActivationInt4Weight(group_size=32)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    base = model[0].weight.detach().clone()
    qat.prepare(model, cfg, lora_rank=4, lora_alpha=8)
    assert not model[0].weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"0.lora.a", "0.lora.b", "2.lora.a", "2.lora.b"} <= trainable
    x = torch.randn(6, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model[0].weight, base)  # frozen
    merged = model[0].merged_weight().detach().clone()
    with torch.no_grad():
        fake_out = model(x)
    qat.convert(model)
    with torch.no_grad():
        assert torch.equal(model(x), fake_out)
    ref = nn.Linear(64, 32)
    ref.weight = nn.Parameter(merged)
    quantize_(ref, cfg, show_progress=False)  # root module: weight replaced in place
    _assert_same_tensors(model[0].weight, ref.weight)


def test_delayed_start():
    model = nn.Sequential(nn.Linear(32, 16))
    qat.prepare(model, IntxWeightOnly(bits=2, granularity=PerGroup(16)), start_step=2)
    x = torch.randn(3, 32)
    float_out = nn.functional.linear(x, model[0].weight, model[0].bias)
    for step in range(4):
        qat.set_step(model, step)
        with torch.no_grad():
            same = torch.equal(model(x), float_out)
        assert same == (step < 2), step
    qat.enable_fake_quant(model, False)
    with torch.no_grad():
        assert torch.equal(model(x), float_out)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[17], CONFIGS[20]],
                         ids=["8da4w", "mxfp8dyn", "nvfp4dyn"])
def test_bf16_weights_bit_identical(cfg):
    model = Tiny(torch.bfloat16)
    idx = torch.randint(0, 40, (2, 5))
    qat.prepare(model, cfg)
    with torch.no_grad():
        fake_out = model(idx)
    qat.convert(model)
    with torch.no_grad():
        assert torch.equal(model(idx), fake_out)
