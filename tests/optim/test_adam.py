"""Low-bit Adam(W): one step vs a float64 reference, torch.optim parity, resume, memory,
stochastic rounding, CPU offload and bad input."""

import io

import pytest
import torch
from torch import nn

from lowbit.optim import (
    Adam4bit,
    Adam8bit,
    AdamFp8,
    AdamW4bit,
    AdamW8bit,
    AdamWFp8,
    CPUOffloadOptimizer,
    QuantizedState,
    state_storage_bytes,
)

ADAMW = [AdamW8bit, AdamW4bit, AdamWFp8]
ALL = ADAMW + [Adam8bit, Adam4bit, AdamFp8]


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # 64x128 weights are quantized (>= 4096 elements); biases and the 16x8 head keep fp32.
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)
    ).to(dtype)


def _train(model, opt, steps, seed=1, sched=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen).to(next(model.parameters()).dtype)
        loss = model(x).float().square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("cls", ALL)
def test_one_step_matches_float64_reference(cls):
    """From given (quantized) moments at step 5, one step equals Adam(W) in float64 on the
    decoded moments, and the new moments are stored as their nearest codes."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    p = nn.Parameter(torch.randn(96, 128))
    opt = cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m0 = QuantizedState.from_float(torch.randn(96, 128) * 0.1, cls.m_codec)
    v0 = QuantizedState.from_float(torch.rand(96, 128) * 0.01, cls.v_codec)
    opt.state[p].update(step=torch.tensor(5.0), exp_avg=m0, exp_avg_sq=v0)
    g = torch.randn(96, 128)
    p64, g64 = p.detach().double(), g.double()
    m = b1 * m0.dequantize().double() + (1 - b1) * g64
    if cls.decoupled:
        p64 = p64 * (1 - lr * wd)
        m_in = g64
    else:
        m_in = g64 + wd * p64
        m = b1 * m0.dequantize().double() + (1 - b1) * m_in
    v = b2 * v0.dequantize().double() + (1 - b2) * m_in.square()
    bc1, bc2 = 1 - b1**6, 1 - b2**6
    ref = p64 - lr / bc1 * m / (v.sqrt() / bc2**0.5 + eps)
    p.grad = g
    opt.step()
    # fp32 arithmetic on O(1) values: a few ulps (2^-23 relative) of |p| and of the update.
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-6)
    assert opt.state[p]["step"].item() == 6
    for key, exact in (("exp_avg", m), ("exp_avg_sq", v)):
        stored = opt.state[p][key]
        want = QuantizedState.from_float(exact.float(), stored.codec).dequantize()
        # The same nearest-code rounding. fp32 vs fp64 inputs move block scales by an ulp
        # (rtol 1e-6) and may flip an element that sits on a rounding boundary (rare).
        close = torch.isclose(stored.dequantize(), want, rtol=1e-6, atol=0)
        mismatch = 1 - close.float().mean().item()
        assert mismatch < 1e-3


@pytest.mark.parametrize("cls", ADAMW)
def test_first_step_matches_torch_adamw_with_groups_and_clipping(cls):
    """Step 1 decodes all-zero moments exactly, so it must equal torch.optim.AdamW (group
    hyperparameters, decoupled decay and clipped gradients included)."""
    model, ref_model = _mlp(), _mlp()
    groups = lambda m: [  # noqa: E731
        {"params": [m[0].weight, m[2].weight], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [m[0].bias, m[2].bias, m[4].weight, m[4].bias], "lr": 1e-3},
    ]
    opt = cls(groups(model), lr=5e-3, weight_decay=0.0)
    ref = torch.optim.AdamW(groups(ref_model), lr=5e-3, weight_decay=0.0)
    _train(model, opt, 1)
    _train(ref_model, ref, 1)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [Adam8bit, Adam4bit])
def test_first_step_matches_torch_adam_l2_decay(cls):
    model, ref_model = _mlp(), _mlp()
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.05)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    _train(model, opt, 1)
    _train(ref_model, ref, 1)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        # Where grad ~ -wd * p the sum cancels and its last bits (torch may fuse the add)
        # decide m / sqrt(v); allow 1e-4 of lr there.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lr_scheduler_drives_decoupled_decay():
    """With zero gradients the moments stay exactly 0, so each step only multiplies p by
    (1 - lr_k * wd): the scheduler's lr must be the one used."""
    p = nn.Parameter(torch.ones(64, 128))
    opt = AdamW4bit([p], lr=0.1, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = 1.0
    for k in range(4):
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
        expected *= 1 - 0.1 * 0.5**k * 0.5
    torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", ADAMW)
def test_resume_gives_the_same_trajectory(cls):
    """Save after 3 steps, reload into fresh objects, 3 more steps: bit-identical to 6
    uninterrupted steps. bf16 params check that fp32 moments are not cast on load."""
    model = _mlp(torch.bfloat16)
    opt = cls(model.parameters(), lr=1e-2, bf16_stochastic_round=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    _train(model, opt, 3, seed=1, sched=sched)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        buf,
    )
    _train(model, opt, 3, seed=2, sched=sched)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _mlp(torch.bfloat16)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (1 + s))
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.state[resumed[0].bias]["exp_avg"].dtype == torch.float32
    _train(resumed, opt2, 3, seed=2, sched=sched2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls, limit", [(AdamW8bit, 2.1), (AdamWFp8, 2.1), (AdamW4bit, 1.1)])
def test_state_bytes_per_parameter(cls, limit):
    """Measured from the storages the states hold (issue 8 targets: 8-bit <= 2.1, 4-bit <=
    1.1; fp32 AdamW holds 8). Codes: 1 or 0.5 byte per moment; scales: 4 bytes per block
    of 256 or 128; small fp32 tensors (the 1024 biases) add the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 512))
    n = sum(p.numel() for p in model.parameters())
    for opt in (cls(model.parameters()), torch.optim.AdamW(model.parameters())):
        model(torch.randn(2, 1024)).sum().backward()
        opt.step()
        per_param = state_storage_bytes(opt) / n
        if isinstance(opt, torch.optim.AdamW):
            assert per_param == 8.0
        else:
            assert per_param <= limit


def test_bf16_stochastic_rounding_keeps_tiny_updates_in_expectation():
    """Step 1 moves every element by exactly -lr (m_hat / sqrt(v_hat) = sign(g) = 1). From
    1.0 a step of 1e-3 is below half a bf16 ulp (2^-8 under 1.0), so round-to-nearest loses
    it; stochastic rounding goes down with probability 1e-3 / 2^-8 and keeps the mean."""
    n, lr = 100_000, 1e-3
    for sr in (False, True):
        p = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = AdamW8bit([p], lr=lr, weight_decay=0.0, bf16_stochastic_round=sr)
        p.grad = torch.ones_like(p)
        opt.step()
        mean = p.detach().double().mean().item()
        if not sr:
            assert mean == 1.0
        else:
            # Per element the result is 1 or 1 - 2^-8; std of the mean = 2^-8 sqrt(q(1-q)/n).
            q = lr / 2**-8
            sigma = 2**-8 * (q * (1 - q) / n) ** 0.5
            assert abs(mean - (1 - lr)) < 5 * sigma


@pytest.mark.parametrize("base", [torch.optim.AdamW, AdamW4bit])
def test_cpu_offload_matches_the_base_optimizer(base):
    model, ref_model = _mlp(), _mlp()
    opt = CPUOffloadOptimizer(model.parameters(), base, lr=1e-2)
    ref = base(ref_model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    _train(ref_model, ref, 3)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    sd = opt.state_dict()
    opt2 = CPUOffloadOptimizer(model.parameters(), base, lr=1e-2)
    opt2.load_state_dict(sd)
    assert set(opt2.optimizer.state_dict()["state"]) == set(sd["state"])


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(100, 64, sparse=True)
    opt = AdamW8bit(emb.parameters(), min_quantize_numel=0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


def test_complex_and_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="complex parameters"):
        AdamW4bit([nn.Parameter(torch.randn(8, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="learning rate"):
        AdamW4bit([nn.Parameter(torch.randn(8))], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW4bit([nn.Parameter(torch.randn(8))], betas=(0.9, 1.0))
