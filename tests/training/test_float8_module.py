"""convert_to_float8_training on a model: swaps, skips, state_dict, eval flag, export back,
activation checkpointing and torch.compile without graph breaks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.models.llama import ModelArgs, Transformer, init_weights
from lowbit.training import (
    Float8TrainingLinear,
    convert_to_float8_training,
    convert_to_linear,
    float8_linear,
)


def _tiny_llama() -> Transformer:
    # dim 64, ffn 128, kv dim 32, vocab 256: every linear is fp8-GEMM aligned.
    model = Transformer(ModelArgs.from_name("tiny"))
    init_weights(model, seed=0)
    return model


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.odd = nn.Linear(64, 24)  # 24 is not a multiple of 16
        self.head = nn.Linear(24, 16, bias=False)  # in_features 24 neither

    def forward(self, x):
        return self.head(torch.relu(self.odd(torch.relu(self.up(x)))))


def test_convert_swaps_keeps_params_and_reports_skips():
    model = _Mixed()
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="skipped 2 linears"):
        summary = convert_to_float8_training(model, "rowwise")
    assert summary.converted == {"up": "rowwise"}
    assert "out_features=24" in summary.skipped["odd"]
    assert "in_features=24" in summary.skipped["head"]
    assert isinstance(model.up, Float8TrainingLinear)
    assert type(model.odd) is nn.Linear
    # Same Parameter objects (optimizers built earlier keep working), same keys.
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert model(torch.randn(5, 32)).shape == (5, 16)


def test_module_filter_and_no_double_conversion():
    model = _tiny_llama()
    summary = convert_to_float8_training(model, "tensorwise", lambda m, fqn: fqn != "output")
    assert len(summary.converted) == 2 * 7 and not summary.skipped
    assert type(model.output) is nn.Linear
    with warnings.catch_warnings(record=True):
        again = convert_to_float8_training(model, "tensorwise")
    assert again.converted == {"output": "tensorwise"}
    assert "already" in again.skipped["layers.0.attention.wq"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="recipe"):
        convert_to_float8_training(_Mixed(), "rowwise_fast")
    with pytest.raises(TypeError, match="root"):
        convert_to_float8_training(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_float8_training(torch.zeros(3))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise_with_gw_hp"])
def test_model_trains_and_matches_functional(recipe):
    model = _tiny_llama()
    reference = _tiny_llama()
    convert_to_float8_training(model, recipe)
    tokens = torch.randint(0, 256, (2, 16))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    # The module is exactly the functional op on its own parameters.
    lin = model.layers[0].feed_forward.w1
    x = torch.randn(3, 64)
    assert torch.equal(lin(x), float8_linear(x, lin.weight, lin.bias, recipe))
    # And close to the high-precision model: fp8 operands give ~25 dB SQNR per GEMM, so
    # logits of a 2-layer model stay within a few percent.
    ref_loss = reference(tokens).logsumexp(-1).mean()
    assert abs(loss.item() - ref_loss.item()) < 0.05 * abs(ref_loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_flag_and_convert_back():
    model = _tiny_llama()
    plain_logits = model(torch.arange(16)[None])
    convert_to_float8_training(model, "rowwise", eval_fp8=False)
    tokens = torch.arange(16)[None]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), plain_logits.detach())  # bf16/fp32 forward by flag
        for m in model.modules():
            if isinstance(m, Float8TrainingLinear):
                m.eval_fp8 = True
        fp8_logits = model(tokens)
    assert not torch.equal(fp8_logits, plain_logits)
    names = convert_to_linear(model)
    assert len(names) == 2 * 7 + 1  # every projection and the output head
    assert not any(isinstance(m, Float8TrainingLinear) for m in model.modules())
    assert type(model.layers[0].attention.wq) is nn.Linear  # what export and quantize_ expect
    with torch.no_grad():
        assert torch.equal(model(tokens), plain_logits)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_activation_checkpointing_gives_same_grads(recipe):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_float8_training(block, recipe)
    x = torch.randn(4, 8, 32, requires_grad=True)
    block(x).square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    recomputed = [p.grad for p in block.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(grads, recomputed))


# aot_eager traces forward and backward exactly as inductor receives them. CPU inductor itself
# is left to tests/training/test_float8_cuda.py: its cold C++ codegen alone takes ~35 s of CPU
# here, more than this suite's budget.
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_compile_fullgraph_grads_equal_eager(recipe):
    # fullgraph=True raises on any graph break. Dynamo sees the forward casts and one
    # lowbit::float8_train_mm_v2 call; AOT autograd traces its body and registered backward
    # (tests/training/test_float8_ops.py checks both graphs and that no op syncs with the host).
    x = torch.randn(2, 8, 32, requires_grad=True)
    lin = Float8TrainingLinear(32, 16, recipe=recipe)
    lin(x).square().sum().backward()
    eager = [lin.weight.grad.clone(), lin.bias.grad.clone(), x.grad.clone()]
    lin.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    torch.compile(lin, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    # Casts are exact, order-independent float32 math (amax, divide, clamp, round), so
    # compiled code gives the same fp8 operands and the same GEMMs: bit-identical gradients.
    assert torch.equal(eager[0], lin.weight.grad)
    assert torch.equal(eager[2], x.grad)
    assert torch.equal(eager[1], lin.bias.grad)
    assert eager[0].abs().sum() > 0


def test_fp8_all_gather_weights_train_like_plain_weights_without_fsdp():
    """Wrapped for FSDP's fp8 all-gather but not sharded: the wrapper behaves as the plain
    weight (same losses and updates, bit for bit), and rowwise layers are left alone."""
    from lowbit.training import Float8AllGatherWeight, enable_fp8_all_gather

    def model(recipe):
        m = Transformer(ModelArgs.from_name("tiny"))
        init_weights(m, seed=0)
        convert_to_float8_training(m, recipe)
        return m

    plain, wrapped = model("tensorwise"), model("tensorwise")
    assert enable_fp8_all_gather(wrapped) > 0
    assert enable_fp8_all_gather(model("rowwise")) == 0
    assert any(isinstance(p.data, Float8AllGatherWeight) for p in wrapped.parameters())
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for m in (plain, wrapped):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            logits = m(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        m.final_loss = loss.detach()
    assert torch.equal(plain.final_loss, wrapped.final_loss)
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        b = b.data._hp if isinstance(b.data, Float8AllGatherWeight) else b
        assert torch.equal(a.detach(), b.detach())


def test_fp8_all_gather_weights_compile_fullgraph():
    """torch.compile (fullgraph) sees through the all-gather wrapper: same output and grads
    as the eager, unwrapped model."""
    from lowbit.training import enable_fp8_all_gather

    models = []
    for wrap in (False, True):
        m = Transformer(ModelArgs.from_name("tiny"))
        init_weights(m, seed=0)
        convert_to_float8_training(m, "tensorwise")
        if wrap:
            enable_fp8_all_gather(m)
            m = torch.compile(m, backend="aot_eager", fullgraph=True)
        models.append(m)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = [m(tokens) for m in models]
    for out in outs:
        out.float().square().mean().backward()
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a.grad, b.grad)
