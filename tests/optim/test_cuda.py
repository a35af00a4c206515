"""GPU checks: the Triton fused step against the plain-PyTorch step, memory at full
size, CPU offload with streams."""

import pytest
import torch
from torch import nn

from lowbit.optim import (
    AdamW4bit,
    AdamW8bit,
    AdamWFp8,
    CPUOffloadOptimizer,
    state_storage_bytes,
)

pytestmark = pytest.mark.cuda
SHAPES = [(4096, 1024), (1000, 77), (5000,), (64,)]  # odd sizes: padded last blocks


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit, AdamWFp8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_matches_plain_step(cls, dtype):
    torch.manual_seed(0)
    fused = [nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in SHAPES]
    plain = [nn.Parameter(p.detach().clone()) for p in fused]
    opt_f = cls(fused, lr=1e-2, fused=True)
    opt_p = cls(plain, lr=1e-2, fused=False)
    for _ in range(5):
        for a, b in zip(fused, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_f.step()
        opt_p.step()
    for a, b in zip(fused, plain):
        # Same math in the same order; the kernel's fp32 results may still differ from torch's
        # CUDA ops by an ulp and so flip a rare code on a rounding boundary, which moves that
        # element by at most one code step * lr-scale.
        # A bf16 parameter rounds the fp32 update once more, so a few-ulp fp32 difference can
        # land one bf16 ulp (2^-8 relative) apart: that is the tolerance for bf16.
        tol = 1e-5 if dtype == torch.float32 else 2.0**-8
        close = torch.isclose(a.float(), b.float(), rtol=tol, atol=tol)
        assert close.float().mean() > 0.999
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("cls, limit", [(AdamW8bit, 2.1), (AdamWFp8, 2.1), (AdamW4bit, 1.1)])
def test_state_bytes_full_size(cls, limit):
    p = nn.Parameter(torch.randn(8192, 4096, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = cls([p])
    opt.step()
    assert state_storage_bytes(opt) / p.numel() <= limit


def test_cpu_offload_on_cuda_matches_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    ref = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    ref.load_state_dict(model.state_dict())
    opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3,
                              offload_gradients=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(3):
        x = torch.randn(32, 256, device="cuda")
        for m, o in ((model, opt), (ref, opt_ref)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        # Host (CPU) vs device AdamW arithmetic: float32 rounding only.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
