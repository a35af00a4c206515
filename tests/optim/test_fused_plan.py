"""The fused step's cached plan (lowbit.optim.fused_plan): reused while nothing changes, rebuilt
when a gradient disappears, a parameter's storage or the optimizer's state is replaced, and
never stale: each step must equal the plain PyTorch step (TRITON_INTERPRET on CPU)."""

import pytest
import torch
from torch import nn

from lowbit.optim import AdamW8bit, AdamWFp8

SHAPES = [(64, 70), (40,), (96, 50)]


def _make(cls, fused):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    return ps, cls(ps, lr=1e-2, weight_decay=0.1, fused=fused)


def _grads(params, gen, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen)


def _same(a_params, b_params, steps):
    for a, b in zip(a_params, b_params):
        # Each step's update is ~lr; the kernel's correctly rounded sqrt may differ from
        # torch's CPU sqrt by an ulp, so an update by up to 2 ulps of lr, and the differences
        # add up over the steps taken (see test_fused_kernel.py).
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=steps * 2 * 1e-2 * 2.0**-23)


@pytest.mark.parametrize("cls", [AdamW8bit, AdamWFp8])
def test_plan_is_reused_and_rebuilt_when_needed(cls, monkeypatch):
    fused, opt_f = _make(cls, True)
    plain, opt_p = _make(cls, False)
    builds = []
    real_build = type(opt_f)._build_plan
    monkeypatch.setattr(type(opt_f), "_build_plan",
                        lambda self, *a: builds.append(1) or real_build(self, *a))
    gen_f, gen_p = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    taken = []

    def step(skip=()):
        _grads(fused, gen_f, skip)
        _grads(plain, gen_p, skip)
        opt_f.step()
        opt_p.step()
        taken.append(1)
        _same(fused, plain, len(taken))

    step()
    step()
    step()
    assert len(builds) == 1  # fresh gradient tensors every step, one plan
    step(skip=(1,))  # a gradient disappears: the frozen parameter must not move
    assert len(builds) == 2
    for ps in (fused, plain):  # a parameter's storage is replaced
        ps[2].data = ps[2].data.clone()
    step(skip=(1,))
    assert len(builds) == 3
    opt_f.load_state_dict(opt_f.state_dict())  # new state objects
    step()
    assert len(builds) == 4
    step()
    assert len(builds) == 4


def test_misaligned_gradient_leaves_the_plan():
    """A gradient the kernel cannot take (a view at an odd offset) sends the step down the
    full path, which updates that parameter with the plain code."""
    fused, opt_f = _make(AdamWFp8, True)
    plain, opt_p = _make(AdamWFp8, False)
    gen_f, gen_p = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for steps, odd in enumerate((False, True), start=1):
        for ps, gen in ((fused, gen_f), (plain, gen_p)):
            _grads(ps, gen)
            if odd:
                g = torch.empty(ps[0].numel() + 1)[1:].view(ps[0].shape)
                ps[0].grad = g.copy_(ps[0].grad)
        opt_f.step()
        opt_p.step()
        _same(fused, plain, steps)
    assert opt_f._plans[id(opt_f.param_groups[0])] is None
