"""MX / NVFP4 weights: bit-exact against the codec, custom ops, configs and checkpoints."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import db, sqnr
from torch import nn

from lowbit import load_quantized, save_quantized
from lowbit.formats import mx
from lowbit.kernels import mx_ops
from lowbit.quantize import (
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
    config_from_dict,
    quantize_,
    quantize_weight,
)
from lowbit.quantize.configs import ConfigError
from lowbit.tensors import UnsupportedWeight
from lowbit.tensors.mx_weight import MXWeight, NVFP4Weight

ELEMS = list(mx.MX_ELEMENTS)
CONFIGS = [MXWeightOnly(e) for e in ELEMS] + [
    MXWeightOnly("fp4_e2m1", "rceil"),
    MXDynamicActivationMXWeight("fp8_e4m3"),
    MXDynamicActivationMXWeight("fp4_e2m1", "fp8_e4m3", "rceil"),
    NVFP4WeightOnly(),
    NVFP4DynamicActivationNVFP4Weight(),
]
IDS = [repr(c)[:60] for c in CONFIGS]


def _codec_dequant(cfg, w: torch.Tensor) -> torch.Tensor:
    if isinstance(cfg, (NVFP4WeightOnly, NVFP4DynamicActivationNVFP4Weight)):
        return mx.nvfp4_dequantize(*mx.nvfp4_quantize(w))
    codes, scale = mx.mx_quantize(w, cfg.elem, cfg.scale_mode)
    return mx.mx_dequantize(codes, scale, cfg.elem)


def _error_bound(cfg, w: torch.Tensor) -> torch.Tensor:
    """Per-element worst case the format allows: half a step of the element's binade (scaled
    by its block scale), or the overshoot past max when a floor scale saturates it."""
    if isinstance(cfg, (NVFP4WeightOnly, NVFP4DynamicActivationNVFP4Weight)):
        fmt, block = mx.E2M1, mx.NVFP4_BLOCK
        _, bs, ts = mx.nvfp4_quantize(w)
        s = (bs.float() * ts).repeat_interleave(block, -1)
        # The block scale itself is rounded to E4M3 (3 mantissa bits): values may exceed
        # 6 * scale by that rounding, up to 2^-4 relative.
        over = (w.abs() / s - fmt.max).clamp(min=0) * s
    else:
        fmt = mx.elem_format(cfg.elem)
        _, sc = mx.mx_quantize(w, fmt, cfg.scale_mode)
        s = mx.e8m0_to_float(sc).repeat_interleave(mx.MX_BLOCK, -1)
        over = (w.abs() / s - fmt.max).clamp(min=0) * s
    v = (w.abs() / s).clamp(min=2.0**fmt.emin, max=fmt.max)
    half_step = torch.exp2(torch.floor(torch.log2(v)) - fmt.mbits - 1) * s
    return half_step + over


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_weight_is_the_codec_and_within_format_error(cfg):
    w = torch.randn(64, 128)
    q = quantize_weight(cfg, w)
    deq = q.dequantize(torch.float32)
    assert torch.equal(deq, _codec_dequant(cfg, w))
    assert ((deq - w).abs() <= _error_bound(cfg, w) * (1 + 2**-20)).all()
    # Mean squared error can't exceed the mean of the squared per-element bounds.
    predicted = -db(_error_bound(cfg, w).pow(2).mean().item() / w.pow(2).mean().item())
    assert sqnr(w, deq) >= predicted


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_linear_equals_dequantized_reference(cfg):
    w = torch.randn(48, 64)
    x = torch.randn(2, 3, 64)
    bias = torch.randn(48)
    q = quantize_weight(cfg, w)
    y = F.linear(x, q, bias)
    if cfg.dynamic_activations:
        if isinstance(cfg, MXDynamicActivationMXWeight):
            xq = mx.mx_fake_quantize(x, cfg.act_elem or cfg.elem, cfg.scale_mode)
        else:
            xq = mx.nvfp4_fake_quantize(x)
        expect = F.linear(xq, q.dequantize(), bias)
    else:
        expect = F.linear(x, q.dequantize(), bias)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ q.t() + bias, y)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], NVFP4WeightOnly()], ids=str)
def test_bf16_linear_decodes_exactly(cfg):
    """MX element x E8M0 products (<= 4 significant bits) are exact in bf16, so the bf16
    path sees the same weights; NVFP4's fp32 tensor scale rounds once."""
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    q = quantize_weight(cfg, w)
    assert q.dtype == torch.bfloat16
    exact = q.dequantize(torch.float32)
    got = q.dequantize().float()
    if isinstance(q, MXWeight):
        assert torch.equal(got, exact)
    else:  # one bf16 rounding: relative error <= 2^-8
        assert ((got - exact).abs() <= exact.abs() * 2**-8).all()


def test_storage_is_compact():
    n, k = 64, 256
    w = torch.randn(n, k, dtype=torch.bfloat16)
    bits = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e2m3": 6, "fp6_e3m2": 6, "fp4_e2m1": 4}
    for elem, b in bits.items():
        q = quantize_weight(MXWeightOnly(elem), w)
        assert q.nbytes_stored() == n * k * b // 8 + n * k // 32  # codes + one byte per block
        assert q.scale.dtype == torch.uint8
    nv = quantize_weight(NVFP4WeightOnly(), w)
    assert nv.nbytes_stored() == n * k // 2 + n * k // 16 + 4
    assert nv.block_scale.dtype == torch.float8_e4m3fn


def test_embedding_slicing_and_copies():
    for cfg in (MXWeightOnly("fp6_e3m2"), NVFP4WeightOnly()):
        q = quantize_weight(cfg, torch.randn(40, 64))
        full = q.dequantize()
        idx = torch.tensor([[0, 5, 39], [7, 7, 1]])
        assert torch.equal(F.embedding(idx, q), full[idx])
        assert torch.equal(q[3:9].dequantize(), full[3:9])
        for other in (q.clone(), copy.deepcopy(q), q.detach()):
            assert type(other) is type(q) and torch.equal(other.dequantize(), full)


@pytest.mark.parametrize("op", mx_ops.ALL_OPS, ids=lambda o: o._name)
def test_opcheck(op):
    w = torch.randn(32, 64)
    x = torch.randn(3, 64)
    if "nvfp4" in op._name:
        q = NVFP4Weight.from_float(w)
        args = (x, q.qdata, q.block_scale, q.tensor_scale, None)
    elif "dynamic" in op._name:
        q = MXWeight.from_float(w, "fp8_e4m3")
        args = (x, q.qdata, q.scale, None, "fp8_e4m3", "fp8_e4m3", "floor")
    else:
        q = MXWeight.from_float(w, "fp6_e2m3")
        args = (x, q.qdata, q.scale, None, "fp6_e2m3")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if "nvfp4" in op._name:
        # torch's schema checker multiplies inputs to detect mutation, which the float8 block
        # scales cannot do on CPU; the other checks still cover the op.
        utils = utils[1:]
    torch.library.opcheck(op, args, test_utils=utils)


def test_bad_shapes_and_configs():
    with pytest.raises(UnsupportedWeight, match="block"):
        quantize_weight(MXWeightOnly(), torch.randn(16, 48))
    with pytest.raises(UnsupportedWeight, match="block"):
        quantize_weight(NVFP4WeightOnly(), torch.randn(16, 40))
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_weight(MXWeightOnly(), torch.full((4, 32), math.inf))
    with pytest.raises(ConfigError, match="elem"):
        MXWeightOnly("fp5")
    with pytest.raises(ConfigError, match="scale_mode"):
        MXWeightOnly(scale_mode="ceil")
    with pytest.raises(ValueError, match="features"):
        F.linear(torch.randn(2, 32), quantize_weight(MXWeightOnly(), torch.randn(8, 64)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_config_json_round_trip(cfg):
    assert config_from_dict(cfg.to_dict()) == cfg


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64),
                        nn.Linear(64, 40, bias=False), nn.Linear(64, 24))
    net[4].weight = net[0].weight  # tied
    return net.to(torch.bfloat16)


@pytest.mark.parametrize("cfg", [MXWeightOnly("fp4_e2m1"), MXWeightOnly("fp6_e2m3"),
                                 MXDynamicActivationMXWeight("fp8_e5m2"),
                                 NVFP4DynamicActivationNVFP4Weight()], ids=str)
def test_safetensors_round_trip(cfg, tmp_path):
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = quantize_(net, cfg, show_progress=False)
    assert summary.skipped == {} or all("24" not in r for r in summary.skipped.values())
    x = torch.randint(0, 40, (2, 7))
    y = net[:5](x)
    path = save_quantized(net, tmp_path / "m.safetensors", cfg)
    with torch.device("meta"):
        fresh = _net()
    load_quantized(fresh, path)
    assert type(fresh[1].weight) is type(net[1].weight)
    assert fresh[4].weight is fresh[0].weight
    assert torch.equal(fresh[:5](x), y)
