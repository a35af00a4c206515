import pytest
import torch

from lowbit.formats import (
    choose_fp8_scale,
    dequantize_fp8,
    fp8_dtype,
    fp8_max,
    quantize_fp8,
    saturating_cast,
)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_saturating_cast_clamps_and_keeps_nan(name):
    dtype = fp8_dtype(name)
    x = torch.tensor([1e9, -1e9, float("nan"), 1.0])
    y = saturating_cast(x, dtype).float()
    assert y[0] == fp8_max(dtype) and y[1] == -fp8_max(dtype)
    assert torch.isnan(y[2]) and y[3] == 1.0


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [False, True])
def test_rowwise_scale_roundtrip(name, pow2):
    dtype = fp8_dtype(name)
    x = torch.randn(16, 64) * torch.logspace(-3, 3, 16).unsqueeze(1)
    block = (1, 64)
    scale = choose_fp8_scale(x, block, dtype, power_of_2=pow2)
    q = quantize_fp8(x, scale, block, dtype)
    assert q.dtype == dtype
    assert q.float().abs().amax() <= fp8_max(dtype)
    if pow2:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    deq = dequantize_fp8(q, scale, block)
    mantissa = 3 if name == "e4m3" else 2
    # Round-to-nearest with m mantissa bits: relative error <= 2^-(m+1) for normal values.
    rel = ((deq - x).abs() / x.abs().clamp(min=1e-30))
    normal = x.abs() / scale.repeat_interleave(64, 1) >= torch.finfo(dtype).tiny
    assert (rel[normal] <= 2.0 ** -(mantissa + 1) * (1 + 1e-6)).all()
    assert torch.equal(quantize_fp8(deq, scale, block, dtype).float(), q.float())


def test_zero_block_gives_finite_scale():
    scale = choose_fp8_scale(torch.zeros(2, 32), (1, 32), torch.float8_e4m3fn)
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_unknown_fp8_format():
    with pytest.raises(ValueError, match="e4m3"):
        fp8_dtype("e3m4")
