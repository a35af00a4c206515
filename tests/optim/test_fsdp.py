"""FSDP2 (fully_shard, DTensor parameters) on 2 CPU processes over gloo.

Each rank holds half of every weight; its optimizer states are DTensors wrapping the local
QuantizedState. Every local shard is a whole number of quantization blocks (64x64 = 16
blocks of 256), so the sharded run quantizes exactly the blocks a single process would, and
with the same batch on both ranks the averaged gradient equals the single-process one: the
parameters must match a single-process run. A state_dict round trip must resume exactly.
"""

import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import leave_spawned_worker
from torch import nn

from lowbit.optim import AdamW4bit, QuantizedState

STEPS = 3
# 4-bit: the packed codes are the layout most likely to break under sharding. (8-bit and fp8
# share everything else; one class keeps the two-process test near 10 s.)
CLASSES = (AdamW4bit,)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=gen) for _ in range(STEPS + 1)]


def _step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    torch.set_num_threads(1)  # two ranks share the CI's two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        results = {}
        for cls in CLASSES:
            model = fully_shard(_model(), mesh=mesh)
            opt = cls(model.parameters(), lr=1e-2)
            batches = _batches()
            for x in batches[:STEPS]:
                _step(model, opt, x)
            w = model[0].weight
            m = opt.state[w]["exp_avg"]
            assert isinstance(m, DTensor) and isinstance(m.to_local(), QuantizedState)
            assert m.shape == w.shape and m.placements == w.placements
            # Resume: save model + optimizer, take one more step, reload into fresh objects.
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            _step(model, opt, batches[STEPS])
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=False)
            model2 = fully_shard(_model(), mesh=mesh)
            model2.load_state_dict(ckpt["model"])
            opt2 = cls(model2.parameters(), lr=1e-2)
            opt2.load_state_dict(ckpt["opt"])
            _step(model2, opt2, batches[STEPS])
            for a, b in zip(model.parameters(), model2.parameters()):
                assert torch.equal(a.to_local(), b.to_local()), "resume diverged"
            full = [p.full_tensor() for p in model.parameters()]
            results[cls.__name__] = full
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


def test_fsdp2_matches_single_process_and_resumes(tmp_path):
    out = tmp_path / "out.pt"
    # spawn, not fork: forking after earlier tests started torch's thread pools deadlocks.
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    for cls in CLASSES:
        model = _model()
        opt = cls(model.parameters(), lr=1e-2)
        for x in _batches():
            _step(model, opt, x)
        for a, b in zip(model.parameters(), sharded[cls.__name__]):
            # Same blocks, same gradients up to the gloo average ((g + g) / 2 is exact):
            # only fp32 summation order differs.
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
