"""QAT inside the usual training machinery: torch.compile, activation checkpointing, bf16
autocast and FSDP2 (2 CPU processes over gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit import qat
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "cfg, kw",
    [
        (Int8DynamicActivationInt4Weight(group_size=32), {}),
        (Int8DynamicActivationInt8Weight(), {}),
        (Int4WeightOnly(group_size=32), {"learn_ranges": True}),
    ],
    ids=["8da4w", "int8dyn", "int4-learned"],
)
def test_compile_matches_eager(cfg, kw):
    """fullgraph: the fake quantizers and STE functions trace without graph breaks.
    aot_eager runs dynamo + AOTAutograd (what inductor consumes) without a C++ build."""
    model = _mlp()
    qat.prepare(model, cfg, **kw)
    x = torch.randn(8, 64)
    want_out, want_grads = _grads(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got_out, got_grads = _grads(compiled, x)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_activation_checkpointing_same_gradients():
    model = _mlp()
    qat.prepare(model, Int8DynamicActivationInt4Weight(group_size=32))
    x = torch.randn(8, 64)
    want_out, want_grads = _grads(model, x)

    class Checkpointed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    got_out, got_grads = _grads(Checkpointed(model), x)
    assert torch.equal(got_out, want_out)
    for a, b in zip(got_grads, want_grads):
        # Recomputation runs the same deterministic fake-quant: identical gradients.
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cfg",
    [Int8DynamicActivationInt4Weight(group_size=32), Int8DynamicActivationInt8Weight(),
     Float8DynamicActivationFloat8Weight()],
    ids=["8da4w", "int8dyn", "fp8dyn"],
)
def test_bf16_autocast(cfg):
    model = _mlp()
    qat.prepare(model, cfg)
    x = torch.randn(8, 64)
    ref_out, _ = _grads(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps 8 significant bits: a relative error of a few 2^-8 on the output.
    rel = (out.float() - ref_out).norm() / ref_out.norm()
    assert rel < 0.03, rel


STEPS = 3


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=gen) for _ in range(STEPS)]


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x in batches:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _prepared(seed=0):
    model = _mlp(seed)
    qat.prepare(model, Int8DynamicActivationInt4Weight(group_size=32), learn_ranges=True)
    return model


def _fsdp_worker(rank: int, init_file: str, out_file: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    # A forked child must not enter the parent's OpenMP pool (earlier tests in this process
    # used it): libgomp is not fork-safe and a parallel region can hang.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = _prepared()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model[0].weight, DTensor)
        assert isinstance(model[0].fake_quant.scale, DTensor)
        # Each rank trains on its half of every batch; FSDP averages the gradients.
        _train(model, [x.chunk(2)[rank] for x in _batches()])
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_fsdp2_matches_single_process(tmp_path):
    out = tmp_path / "out.pt"
    # fork: the children reuse the parent's imported torch (spawn re-imports it: seconds).
    mp.start_processes(
        _fsdp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, start_method="fork"
    )
    sharded = torch.load(out, weights_only=True)
    model = _prepared()
    _train(model, _batches())
    for name, p in model.named_parameters():
        # FSDP all-gathers the full weight, so fake-quant sees the same blocks; the halves'
        # mean gradient equals the full batch's up to fp32 summation order.
        torch.testing.assert_close(p.detach(), sharded[name], rtol=1e-4, atol=1e-5)
