"""Emulated MXFP8 training: the three GEMMs' rounding, conversion, and a short CPU training run."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import db, sqnr
from torch import nn

from lowbit.formats import mx
from lowbit.training.mx import (
    MXTrainingLinear,
    MXTrainingRecipe,
    convert_to_mx_training,
    mx_linear,
)


def _q(t, elem="fp8_e4m3"):
    """Round along the last dim, via the codec directly (padding by hand)."""
    k = t.shape[-1]
    pad = -k % 32
    codes, scale = mx.mx_quantize(F.pad(t, (0, pad)), elem)
    return mx.mx_dequantize(codes, scale, elem, t.dtype)[..., :k]


def test_gemms_round_along_their_contraction_dims():
    x = torch.randn(40, 64, requires_grad=True)  # 40 tokens: padded to 64 for grad-weight
    w = torch.randn(96, 64, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    g = torch.randn(40, 96)
    y = mx_linear(x, w, b)
    y.backward(g)
    xd, wd = x.detach(), w.detach()
    torch.testing.assert_close(y, _q(xd) @ _q(wd).t() + b, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _q(g) @ _q(wd.t()).t(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, _q(g.t()) @ _q(xd.t()).t(), rtol=0, atol=0)
    torch.testing.assert_close(b.grad, g.sum(0))
    # Against exact fp32 GEMMs: each operand's rounding is uniform within +/-2^-4 relative
    # (E4M3 keeps 3 mantissa bits), noise (2^-4)^2 / 3 -> 28.9 dB per operand, two operands
    # -> ~25.9 dB; 3.9 dB margin for floor-scale saturation and sampling.
    predicted = -db(2 * 2.0**-8 / 3)
    assert sqnr(xd @ wd.t(), y.detach() - b.detach()) > predicted - 3.9
    assert sqnr(g @ wd, x.grad) > predicted - 3.9
    assert sqnr(g.t() @ xd, w.grad) > predicted - 3.9


def test_bf16_operands_are_exact_and_e5m2_grads():
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    # MXFP8 values times a power of two fit bf16 exactly: rounding in bf16 equals fp32's.
    assert torch.equal(_q(x).float(), _q(x.float()))
    r = MXTrainingRecipe("e5m2 grads", grad_elem="fp8_e5m2")
    xg = x.float().requires_grad_()
    mx_linear(xg, w.float(), None, r).backward(torch.ones(32, 32))
    torch.testing.assert_close(xg.grad, _q(torch.ones(32, 32), "fp8_e5m2") @ _q(w.float().t()).t())


def test_convert_reuses_parameters_and_skips_with_reasons():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10), nn.Linear(10, 64))
    params = [id(p) for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = convert_to_mx_training(model, module_filter=lambda m, fqn: fqn != "3")
    assert summary.converted == {"0": "mxfp8"}
    assert "out_features=10" in summary.skipped["2"]
    assert "3" not in summary.skipped and any("skipped 1" in str(w.message) for w in caught)
    assert isinstance(model[0], MXTrainingLinear) and type(model[2]) is nn.Linear
    assert [id(p) for p in model.parameters()] == params
    assert set(model.state_dict()) == {f"{i}.{n}" for i in (0, 2, 3) for n in ("weight", "bias")}
    assert type(model[0].to_linear()) is nn.Linear
    with pytest.raises(ValueError, match="recipe"):
        convert_to_mx_training(model, "mxfp4")


def test_short_training_run_tracks_fp32():
    """A small MLP regression, 30 Adam steps: MXFP8 loss stays within 5% of fp32's. Rounding
    noise ~26 dB (above) perturbs each step by ~5% of the gradient, which Adam averages out."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    data = torch.randn(512, 32)
    target = teacher(data).detach()
    base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    losses = {}
    for name in ("fp32", "mxfp8"):
        model = copy.deepcopy(base)
        if name == "mxfp8":
            convert_to_mx_training(model)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(30):
            batch = slice((step % 8) * 64, (step % 8 + 1) * 64)
            loss = F.mse_loss(model(data[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = F.mse_loss(model(data), target).item()
    assert losses["fp32"] < 0.5 * F.mse_loss(base(data), target).item()  # it did learn
    assert abs(losses["mxfp8"] - losses["fp32"]) / losses["fp32"] < 0.05, losses
