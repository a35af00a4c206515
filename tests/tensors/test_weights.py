"""Weight tensors: numerics per config (SQNR bounds derived from the format), plumbing ops."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import db, sqnr

from lowbit.formats import PerGroup, PerRow, PerTensor
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
from lowbit.tensors import Float8Weight, IntWeight, UnsupportedWeight

CONFIGS = [
    Int8WeightOnly(),
    Int8WeightOnly(PerGroup(64)),
    Int8DynamicActivationInt8Weight(),
    Int4WeightOnly(group_size=32),
    Int4WeightOnly(group_size=128, zero="float"),
    IntxWeightOnly(bits=2, granularity=PerGroup(32), mapping="asymmetric", zero="float"),
    IntxWeightOnly(bits=3, granularity=PerGroup(64)),
    IntxWeightOnly(bits=5, granularity=PerRow()),
    IntxWeightOnly(bits=1, granularity=PerGroup(32), mapping="asymmetric"),
    Float8WeightOnly(),
    Float8WeightOnly("e5m2"),
    Float8DynamicActivationFloat8Weight(PerRow()),
    Float8DynamicActivationFloat8Weight(PerTensor()),
    Int8DynamicActivationInt4Weight(group_size=32),
]


FP8_BITS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa, min exp


def _fp8_noise(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> float:
    """Round-to-nearest in a binade [2^e, 2^(e+1)) has step 2^(e-m): error^2 ~ step^2 / 12."""
    m, emin = FP8_BITS[dtype]
    e = torch.floor(torch.log2((v / scale).abs().clamp(min=1e-30))).clamp(min=emin)
    return (torch.exp2(e - m) * scale).pow(2).mean().item() / 12


def _predicted_weight_noise(q) -> float:
    """Mean squared weight error the format predicts (integer codes: step^2 / 12)."""
    if isinstance(q, IntWeight):
        return q.scale.float().pow(2).mean().item() / 12
    return _fp8_noise(q.dequantize(torch.float32), q.scale, q.qdata.dtype)


def _predicted_act_noise(cfg, x) -> float:
    """Relative noise power the activation quantizer adds (0 for weight-only configs)."""
    if isinstance(cfg, Int8DynamicActivationInt8Weight):
        noise = (x.abs().amax(-1) / 127).pow(2).mean().item() / 12
    elif isinstance(cfg, Int8DynamicActivationInt4Weight):
        noise = ((x.amax(-1) - x.amin(-1)) / 255).pow(2).mean().item() / 12
    elif isinstance(cfg, Float8DynamicActivationFloat8Weight):
        amax = x.abs().amax(-1, keepdim=True)
        if isinstance(cfg.granularity, PerTensor):
            amax = amax.amax()
        noise = _fp8_noise(x, amax / 448, torch.float8_e4m3fn)
    else:
        return 0.0
    return noise / x.pow(2).mean().item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c)[:60])
def test_linear_sqnr_matches_the_format(cfg):
    w = torch.randn(96, 256)
    x = torch.randn(8, 256)
    q = quantize_weight(cfg, w)
    y = F.linear(x, q)
    ref = F.linear(x, w)
    # Independent errors add: relative noise = weight noise / signal + activation noise.
    rel_noise = _predicted_weight_noise(q) / w.pow(2).mean().item() + _predicted_act_noise(cfg, x)
    predicted = -db(rel_noise)
    # 1.5 dB margin: the estimate's sampling error over 768 outputs is ~0.2 dB.
    assert sqnr(ref, y) >= predicted - 1.5, (sqnr(ref, y), predicted)
    # and not wildly better either (that would mean the predicted model is wrong)
    assert sqnr(ref, y) <= predicted + 6


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c)[:60])
def test_linear_equals_dequantized_reference(cfg):
    """The custom op equals decode-then-matmul (plus the activation quantizer)."""
    w = torch.randn(64, 128)
    x = torch.randn(2, 5, 128)
    q = quantize_weight(cfg, w)
    bias = torch.randn(64)
    y = F.linear(x, q, bias)
    assert y.shape == (2, 5, 64)
    if not cfg.dynamic_activations:
        torch.testing.assert_close(y, F.linear(x, q.dequantize(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [Int8WeightOnly(), Int4WeightOnly(32), Float8WeightOnly()],
                         ids=["int8", "int4", "fp8"])
def test_dtypes(cfg, dtype):
    w = torch.randn(32, 64, dtype=dtype)
    q = quantize_weight(cfg, w)
    assert q.dtype == dtype and q.dequantize().dtype == dtype
    y = F.linear(torch.randn(3, 64, dtype=dtype), q)
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_matmul_forms_agree():
    q = quantize_weight(Int4WeightOnly(32), torch.randn(48, 64))
    x = torch.randn(4, 64)
    b = torch.randn(48)
    y = F.linear(x, q, b)
    torch.testing.assert_close(x @ q.t() + b, y)
    torch.testing.assert_close(torch.addmm(b, x, q.t()), y)
    torch.testing.assert_close(torch.mm(x, q.t()) + b, y)
    torch.testing.assert_close(torch.matmul(x, q.t()) + b, y)
    assert q.t().shape == (64, 48) and q.t().t().shape == (48, 64)
    with pytest.raises(NotImplementedError, match="from the right"):
        torch.mm(torch.randn(2, 48), q)


@pytest.mark.parametrize("cfg", [Int8WeightOnly(), Int4WeightOnly(32), Float8WeightOnly()],
                         ids=["int8", "int4", "fp8"])
def test_embedding_rows_and_slicing(cfg):
    w = torch.randn(40, 64)
    q = quantize_weight(cfg, w)
    full = q.dequantize()
    idx = torch.tensor([[0, 5, 39], [7, 7, 1]])
    assert torch.equal(F.embedding(idx, q), full[idx])
    assert torch.equal(q[3:9].dequantize(), full[3:9])
    assert torch.equal(q.narrow(0, 2, 4).dequantize(), full[2:6])
    with pytest.raises(NotImplementedError, match="rows"):
        q[:, :8]


@pytest.mark.parametrize("cfg", [Int4WeightOnly(32), Float8DynamicActivationFloat8Weight()],
                         ids=["int4", "fp8dyn"])
def test_clone_deepcopy_detach_to_and_pickle(cfg):
    q = quantize_weight(cfg, torch.randn(32, 64))
    x = torch.randn(2, 64)
    y = F.linear(x, q)
    for other in (q.clone(), copy.deepcopy(q), q.detach(), q.to("cpu")):
        assert type(other) is type(q) and torch.equal(F.linear(x, other), y)
    buf = io.BytesIO()
    torch.save({"w": q}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert torch.equal(F.linear(x, loaded), y)
    half = q.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert sqnr(y, F.linear(x.bfloat16(), half).float()) > 20


def test_copy_requires_same_format():
    a = quantize_weight(Int4WeightOnly(32), torch.randn(16, 64))
    b = quantize_weight(Int4WeightOnly(32), torch.randn(16, 64))
    a.copy_(b)
    assert torch.equal(a.dequantize(), b.dequantize())
    with pytest.raises(ValueError, match="format"):
        a.copy_(quantize_weight(Int8WeightOnly(), torch.randn(16, 64)))


def test_storage_is_compact():
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    int4 = quantize_weight(Int4WeightOnly(128), w)
    # 0.5 byte per weight + bf16 scale and zero per 128 weights.
    assert int4.nbytes_stored() == 128 * 256 // 2 + 2 * 2 * 128 * 2
    int3 = quantize_weight(IntxWeightOnly(3, PerGroup(64)), w)
    assert int3.qdata.numel() == 128 * 256 * 3 // 8
    fp8 = quantize_weight(Float8WeightOnly(), w)
    assert fp8.nbytes_stored() == 128 * 256 + 128 * 4


@pytest.mark.parametrize(
    "w,err",
    [
        (torch.randn(64), UnsupportedWeight),
        (torch.randn(2, 32, 64), UnsupportedWeight),
        (torch.randint(0, 5, (32, 64)), UnsupportedWeight),
        (torch.randn(32, 64, dtype=torch.complex64), UnsupportedWeight),
        (torch.randn(32, 48), UnsupportedWeight),
    ],
    ids=["1d", "3d", "int", "complex", "k-not-divisible"],
)
def test_bad_weights_are_refused(w, err):
    with pytest.raises(err):
        quantize_weight(Int4WeightOnly(32), w)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_raise(bad):
    w = torch.randn(16, 64)
    w[3, 7] = bad
    for cfg in (Int4WeightOnly(32), Float8WeightOnly(), Int8WeightOnly()):
        with pytest.raises(ValueError, match="NaN/Inf"):
            quantize_weight(cfg, w)


def test_bad_inputs_to_linear():
    q = quantize_weight(Int8WeightOnly(), torch.randn(16, 64))
    with pytest.raises(ValueError, match="features"):
        F.linear(torch.randn(2, 32), q)
    with pytest.raises(TypeError, match="floating-point"):
        F.linear(torch.ones(2, 64, dtype=torch.int64), q)
    with pytest.raises(RuntimeError, match="meta"):
        F.linear(torch.randn(2, 64, device="meta"), q)


def test_float8_needs_gemm_friendly_shapes_for_dynamic():
    with pytest.raises(UnsupportedWeight, match="16"):
        quantize_weight(Float8DynamicActivationFloat8Weight(), torch.randn(24, 40))
    assert isinstance(quantize_weight(Float8WeightOnly(), torch.randn(24, 40)), Float8Weight)


@pytest.mark.parametrize("cfg", CONFIGS[:2] + CONFIGS[9:10], ids=lambda c: repr(c)[:60])
def test_flatten_is_cached_and_follows_field_changes(cfg):
    """__tensor_flatten__ is cached (dynamo's guards call it on every compiled call); setting a
    field must drop the cache so the metadata never describes old fields."""
    q = quantize_weight(cfg, torch.randn(64, 128))
    names, meta = q.__tensor_flatten__()
    assert q.__tensor_flatten__() == (names, meta)
    assert names == [n for n in type(q).tensor_fields if getattr(q, n) is not None]
    attr = type(q).attr_fields[0]
    setattr(q, attr, "changed")
    assert dict(q.__tensor_flatten__()[1][0])[attr] == "changed"
    inner = {n: getattr(q, n) for n in names}
    back = type(q).__tensor_unflatten__(inner, q.__tensor_flatten__()[1], q.shape, q.stride())
    assert getattr(back, attr) == "changed"
