"""Quantized weights as Conv2d kernels: exact against the decoded kernel, selection by
quantize_, per-image activation scales, and clear refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.quantize.api import is_conv2d
from lowbit.tensors.conv import as_conv_weight, conv_kernel, fake_quantize_per_image


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),  # depthwise
        nn.Conv2d(32, 16, 1),  # pointwise
    )


@pytest.mark.parametrize("config", [lowbit.Int8WeightOnly(), lowbit.Float8WeightOnly()])
def test_conv_weight_matches_decoded_kernel(config):
    net = _net()
    q = copy.deepcopy(net)
    summary = lowbit.quantize_(q, config, is_conv2d, show_progress=False)
    assert len(summary.quantized) == 3 and not summary.skipped
    x = torch.randn(2, 8, 12, 12)
    for layer, qlayer in zip(net, q):
        if isinstance(layer, nn.Conv2d):
            w = qlayer.weight
            assert w.shape == layer.weight.shape and w.nbytes_stored() < layer.weight.nbytes
            want = F.conv2d(x, conv_kernel(w, x.dtype), qlayer.bias, qlayer.stride,
                            qlayer.padding, qlayer.dilation, qlayer.groups)
            # The reference path is exactly "decode, then the float conv".
            assert torch.equal(qlayer(x), want)
            x = layer(x)
    ref, out = net(torch.ones(1, 8, 12, 12)), q(torch.ones(1, 8, 12, 12))
    # Per-channel int8 keeps ~40 dB per layer and fp8 e4m3 (3 mantissa bits) ~30 dB; three
    # layers in a row stay above 20 dB on a smooth input.
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1


def test_dynamic_int8_activations_use_one_scale_per_image():
    x = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).reshape(3, 1, 1, 1)
    fq = fake_quantize_per_image(x, "int8_per_token")
    for i in range(3):
        # Symmetric int8 with scale amax/127: error at most half a step of that image.
        step = x[i].abs().max() / 127
        assert (fq[i] - x[i]).abs().max() <= step / 2 + 1e-6
        assert torch.equal(fake_quantize_per_image(x[i : i + 1], "int8_per_token"), fq[i : i + 1])
    net = _net()
    q = copy.deepcopy(net)
    lowbit.quantize_(q, lowbit.Int8DynamicActivationInt8Weight(), is_conv2d, show_progress=False)
    assert all(m.weight.act_quant == "int8_per_token" for m in q if isinstance(m, nn.Conv2d))
    xs = torch.randn(2, 8, 12, 12)
    # Batch-independent: an image gives the same output alone or beside another.
    assert torch.allclose(q(xs)[:1], q(xs[:1]), atol=1e-6)


def test_refusals_are_named():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = lowbit.quantize_(
            model, lowbit.Int8WeightOnly(), lambda m, n: n != "", show_progress=False
        )
    assert "nn.Conv2d kernels" in summary.skipped["0"]
    assert "2-D weight" in summary.skipped["1"]
    assert list(summary.quantized) == ["2"]
    w = lowbit.IntWeight.from_float(torch.randn(4, 36), 8, lowbit.PerRow())
    with pytest.raises(ValueError, match="not the flattened kernel"):
        as_conv_weight(w, (4, 4, 3, 4))
    with pytest.raises(ValueError, match="4-D"):
        F.conv2d(torch.randn(1, 4, 5, 5), w)
