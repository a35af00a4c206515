"""The Triton fused step (run under TRITON_INTERPRET on CPU, see conftest) against the plain
PyTorch step: same codes, scales and parameters, for every codec, both Adam variants, float32
and bfloat16 parameters, padded last blocks and float32-state (small) parameters."""

import pytest
import torch
from torch import nn

from lowbit.optim import Adam4bit, AdamFp8, AdamW4bit, AdamW8bit, AdamWFp8, QuantizedState

# A padded last block (1000 * 7 is no multiple of 128 or 256), a multi-program weight, and a
# small vector that keeps float32 moments (below min_quantize_numel).
SHAPES = [(1000, 7), (64, 300), (40,)]


def _pair(cls, dtype, **kw):
    torch.manual_seed(0)
    fused = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    plain = [nn.Parameter(p.detach().clone()) for p in fused]
    return (fused, cls(fused, lr=1e-2, weight_decay=0.1, fused=True, **kw),
            plain, cls(plain, lr=1e-2, weight_decay=0.1, fused=False, **kw))


def _steps(fused, opt_f, plain, opt_p, n):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for a, b in zip(fused, plain):
            a.grad = torch.randn(a.shape, generator=gen).to(a.dtype)
            b.grad = a.grad.clone()
        opt_f.step()
        opt_p.step()


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit, AdamWFp8, Adam4bit, AdamFp8])
def test_fused_kernel_matches_reference_float32(cls):
    fused, opt_f, plain, opt_p = _pair(cls, torch.float32)
    _steps(fused, opt_f, plain, opt_p, 3)
    for a, b in zip(fused, plain):
        sa, sb = opt_f.state[a], opt_p.state[b]
        assert sa["step"].item() == sb["step"].item() == 3
        # The kernel repeats the reference's float32 operations in its order, correctly
        # rounded. torch's vectorized CPU sqrt is not (about 1% of results are 1 ulp off), so
        # each step's update (of size ~lr) may differ by an ulp or two, which accumulates over
        # the 3 steps; and through Adam's L2 term (g + wd * p) that can move a value across a
        # code boundary next step: rare.
        update_ulps = 3 * 2 * 1e-2 * 2.0**-23
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=update_ulps)
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = sa[key], sb[key]
            if isinstance(x, QuantizedState):
                same = x.codes.view(torch.uint8) == y.codes.view(torch.uint8)
                assert same.float().mean() > 0.999
                torch.testing.assert_close(x.scale, y.scale, rtol=2.4e-7, atol=0)
                if cls.decoupled:  # states never see p: identical codes and scales
                    assert bool(same.all()) and torch.equal(x.scale, y.scale)
            else:
                torch.testing.assert_close(x, y, rtol=2.4e-7, atol=0)


def test_fused_kernel_bfloat16_params():
    fused, opt_f, plain, opt_p = _pair(AdamW8bit, torch.bfloat16)
    _steps(fused, opt_f, plain, opt_p, 2)
    for a, b in zip(fused, plain):
        assert a.dtype == torch.bfloat16
        # float32 updates at most 2 ulps apart (see above) round to the same bfloat16 except
        # at a rounding tie: at most one bfloat16 ulp (2^-8 relative) on a rare value.
        assert (a != b).float().mean() < 1e-3
        torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-8, atol=0)


def test_fused_stochastic_rounding_is_unbiased():
    """Stochastic rounding draws other random bits than the reference, so check its law: each
    value lands on one of the two bfloat16 neighbours of the float32 update, and the mean
    error over many values vanishes (round-to-nearest would keep a bias of the update)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.full((8192,), 1.0, dtype=torch.bfloat16))
    opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0, fused=True, bf16_stochastic_round=True)
    p.grad = torch.ones_like(p)
    opt.step()
    # Step 1 of Adam moves every value by lr * g / (|g| + eps) ~ 1e-4, far below bf16's
    # spacing at 1.0 (2^-7 below it): RNE would leave all values at 1.0.
    exact = 1.0 - 1e-4
    lo, hi = 1.0 - 2.0**-8, 1.0
    vals = p.detach().float()
    assert bool(((vals == lo) | (vals == hi)).all())
    frac_down = (vals == lo).float().mean().item()
    expected = (hi - exact) / (hi - lo)  # probability of rounding down
    # Binomial(8192, ~0.026): standard deviation ~0.0018; 5 sigma.
    assert abs(frac_down - expected) < 0.009


def test_fused_true_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="needs CUDA"):
        AdamW8bit([p], fused=True).step()
    assert torch.equal(p.detach(), before)


def test_unaligned_parameter_takes_the_plain_path():
    """A parameter viewed at an odd offset cannot take the kernel's vector loads: it is
    updated by the reference path, with the same result."""
    torch.manual_seed(0)
    base = torch.randn(8193)
    odd = nn.Parameter(base[1:].view(64, 128))  # 4-byte offset: not 16-byte aligned
    ref = nn.Parameter(odd.detach().clone())
    assert odd.data_ptr() % 16 != 0
    opt_odd = AdamW8bit([odd], lr=1e-2, fused=True)
    opt_ref = AdamW8bit([ref], lr=1e-2, fused=False)
    for _ in range(2):
        odd.grad = torch.randn_like(odd)
        ref.grad = odd.grad.clone()
        opt_odd.step()
        opt_ref.step()
    assert torch.equal(odd.detach(), ref.detach())


def test_fused_kernel_64bit_offsets(monkeypatch):
    """Parameters of 2^31 elements or more switch the kernel to int64 offsets; forced here on
    small ones, the step must not change."""
    from lowbit.kernels.triton import adam as kernel

    monkeypatch.setattr(kernel, "_INT32_LIMIT", 0)
    fused, opt_f, plain, opt_p = _pair(AdamW8bit, torch.float32)
    _steps(fused, opt_f, plain, opt_p, 2)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=2 * 2 * 1e-2 * 2.0**-23)
        sa, sb = opt_f.state[a]["exp_avg"], opt_p.state[b]["exp_avg"]
        if isinstance(sa, QuantizedState):
            assert torch.equal(sa.codes, sb.codes) and torch.equal(sa.scale, sb.scale)
