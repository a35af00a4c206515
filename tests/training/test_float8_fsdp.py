"""FSDP2 (fully_shard) over fp8 training linears equals the unsharded run, on CPU with gloo,
with weights all-gathered in high precision or (tensorwise) in fp8.

Two processes each train on their own batch. The reference, computed in every process, runs
the same converted model unsharded on both batches and averages the gradients, which is what
data-parallel training means. fp8 casts see the same full weight in both runs, the all-gather
is exact and averaging two gradients is one float32 addition and an exact halving, so the
losses and the parameters after each step must be bit-identical. With the fp8 all-gather the
shards are cast before the gather with the whole weight's scale (amaxes reduced across
processes), which gives the very same fp8 weight: still bit-identical. With the blocks under
activation checkpointing the recomputed forward (fed by the backward's all-gather) must give
the same again.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import leave_spawned_worker
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard

from lowbit.models.llama import ModelArgs, Transformer, init_weights
from lowbit.training import (
    Float8GatheredWeight,
    convert_to_float8_training,
    enable_fp8_all_gather,
    precompute_fp8_scales,
)

WORLD = 2
STEPS = 2
# (recipe, fp8 all-gather, precomputed scales, activation checkpointing of the blocks)
CASES = (("tensorwise", False, False, False), ("rowwise", False, False, False),
         ("tensorwise", True, True, False), ("tensorwise", True, False, False),
         ("tensorwise", True, True, True), ("rowwise", False, False, True))


def _batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 256, (2, 16), generator=gen)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _check_recipe(rank: int, recipe: str, fp8_gather: bool, precompute: bool,
                  ckpt: bool) -> None:
    model = Transformer(ModelArgs.from_name("tiny"))
    init_weights(model, seed=0)
    convert_to_float8_training(model, recipe)
    reference = copy.deepcopy(model)
    if ckpt:  # the recomputed forward sees the weights of the backward's all-gather
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    gathered = []
    if fp8_gather:
        assert enable_fp8_all_gather(model) > 0
        for m in model.modules():
            if hasattr(m, "recipe"):  # record what each fp8 linear's forward receives
                m.register_forward_pre_hook(lambda mod, _: gathered.append(mod.weight))
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    if precompute:
        precompute_fp8_scales(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for step in range(STEPS):
        loss = _loss(model, _batch(rank, step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if precompute:
            precompute_fp8_scales(model)
        ref_losses = []
        for r in range(WORLD):
            ref_loss = _loss(reference, _batch(r, step)) / WORLD
            ref_loss.backward()  # gradients accumulate: their sum is the average
            ref_losses.append(ref_loss * WORLD)
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.equal(loss.detach(), ref_losses[rank].detach()), (recipe, ckpt, step)
    if fp8_gather:  # the layers really received fp8 data from the all-gather
        assert gathered and all(isinstance(w, Float8GatheredWeight) for w in gathered)
        assert all(w._data.dtype == torch.float8_e4m3fn for w in gathered)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.full_tensor(), ref.detach()), (recipe, ckpt, name)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        for case in CASES:
            _check_recipe(rank, *case)
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_fully_shard_matches_unsharded():
    # spawn, not fork: earlier tests (torch.compile) leave threads behind, and forking a
    # process with threads can deadlock the children.
    mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, start_method="spawn")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fused_shard_cast_gives_the_eager_codes(dtype):
    """The compiled shard cast FSDP2 runs on CUDA writes the same fp8 bytes as the eager one,
    saturation included (inputs beyond +/-max after scaling)."""
    from lowbit.formats.fp8 import quantize_fp8
    from lowbit.training.fsdp import cast_shard_to_fp8

    gen = torch.Generator().manual_seed(0)
    hp = (torch.randn(48, 80, generator=gen) * 3).to(torch.bfloat16)
    hp[0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0])
    scale = torch.tensor([[0.0123]])
    fused = cast_shard_to_fp8(hp, scale, dtype, fused=True)
    eager = cast_shard_to_fp8(hp, scale, dtype, fused=False)
    reference = quantize_fp8(hp, scale, tuple(hp.shape), dtype)
    assert torch.equal(fused.view(torch.uint8), eager.view(torch.uint8))
    assert torch.equal(eager.view(torch.uint8), reference.view(torch.uint8))


@pytest.mark.parametrize("fused", [False, True])
def test_precomputed_scales_are_each_weights_amax(fused, monkeypatch):
    """One multi-tensor amax over all shards gives every weight the scale of its own amax, and
    the one-call cast of all shards (compiled or eager) gives each the codes of its own cast."""
    from lowbit.formats.fp8 import fp8_scale_from_amax, quantize_fp8
    from lowbit.training import fsdp
    from lowbit.training.fsdp import Float8AllGatherWeight

    eager_or_fused = fsdp.cast_shards_to_fp8
    monkeypatch.setattr(fsdp, "cast_shards_to_fp8",
                        lambda *args: eager_or_fused(*args, fused=fused))

    model = Transformer(ModelArgs.from_name("tiny")).to(torch.bfloat16)
    init_weights(model, seed=0)
    convert_to_float8_training(model, "tensorwise")
    wrapped = enable_fp8_all_gather(model)
    assert wrapped > 0
    precompute_fp8_scales(model)
    checked = 0
    for p in model.parameters():
        if isinstance(p, Float8AllGatherWeight):
            data, scale, version = p._precomputed
            dtype = p.recipe.forward_dtype
            expected = fp8_scale_from_amax(p._hp.abs().amax().float().reshape(1, 1), dtype)
            assert version == p._hp._version
            assert torch.equal(scale.reshape(1, 1), expected)
            assert scale.data_ptr() % 16 == 0  # cuBLASLt refuses unaligned scale pointers
            codes = quantize_fp8(p._hp, expected, tuple(p._hp.shape), dtype)
            assert torch.equal(data.view(torch.uint8), codes.view(torch.uint8))
            checked += 1
    assert checked == wrapped


def test_precompute_never_indexes_with_host_tensors():
    """Advanced indexing takes an index tensor made on the host; on CUDA its copy to the GPU
    waits for the stream, which stalled every FSDP2 step at the precompute."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    indexing = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}

    class NoAdvancedIndexing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in indexing, f"precompute_fp8_scales indexes with {func}"
            return func(*args, **(kwargs or {}))

    model = Transformer(ModelArgs.from_name("tiny")).to(torch.bfloat16)
    convert_to_float8_training(model, "tensorwise")
    enable_fp8_all_gather(model)
    with NoAdvancedIndexing():
        precompute_fp8_scales(model)


def test_shard_amaxes_handles_empty_shards():
    from lowbit.training.fsdp import shard_amaxes

    shards = [torch.tensor([[1.0, -3.5]], dtype=torch.bfloat16), torch.empty(0, 2),
              torch.tensor([-0.25])]
    assert shard_amaxes(shards).tolist() == [3.5, 0.0, 0.25]


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # torch's aot_eager backend
def test_gathered_fp8_weight_compiles_like_eager():
    """The layer FSDP2 hands a Float8GatheredWeight (fp8 data + scale) gives the same output and
    gradients compiled as eager: the GEMM op is traced through the subclass."""
    from torch import nn

    from lowbit.training import Float8TrainingLinear, cast_fp8

    torch.manual_seed(0)
    lin = Float8TrainingLinear(64, 32, bias=False, recipe="tensorwise")
    data, scale = cast_fp8(lin.weight.detach(), torch.float8_e4m3fn, False, False, axis=1)
    lin.weight = nn.Parameter(Float8GatheredWeight(data, scale, torch.float32))
    x = torch.randn(16, 64, requires_grad=True)
    runs = []
    for fn in (lin, torch.compile(lin, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        y = fn(x)
        y.square().sum().backward()
        runs.append((y.detach(), lin.weight.grad, x.grad))
        lin.weight.grad = x.grad = None
    (y0, gw0, gx0), (y1, gw1, gx1) = runs
    assert gw0 is not None and gw0.abs().sum() > 0
    assert torch.equal(y0, y1) and torch.equal(gw0, gw1) and torch.equal(gx0, gx1)
