"""2:4 sparse training: forward/backward of the runtime-pruned linear, and a short run (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.sparsity import (
    InputSparse24Linear,
    Sparse24Weight,
    SparseTrainingLinear,
    finalize_sparse_training_,
    is_24,
    magnitude_mask,
    mask_24,
    mlp_down_projections,
    prune_linear_inputs_,
    sparse24_linear,
    sparse_training_,
)


def test_forward_and_backward_use_the_24_weight():
    x = torch.randn(5, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(5, 16)
    y = sparse24_linear(x, w, b)
    ws = w.detach() * magnitude_mask(w)
    torch.testing.assert_close(y, F.linear(x, ws, b), rtol=0, atol=0)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ ws)  # input gradient through the 2:4 weight
    torch.testing.assert_close(w.grad, gy.t() @ x.detach())  # dense (straight-through) dW
    torch.testing.assert_close(b.grad, gy.sum(0))


def test_input_pruning_has_the_exact_gradient():
    """With prune_input, y = (x * m_x) Ws^T: dx is (dy Ws) * m_x and dW uses the pruned x,
    the gradients of that function (masks held constant), checked against plain autograd."""
    x = torch.randn(2, 3, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    gy = torch.randn(2, 3, 16)
    y = sparse24_linear(x, w, None, prune_input=True)
    x_mask = mask_24(x.detach().abs())
    assert is_24(x_mask)
    x2 = x.detach().clone().requires_grad_(True)
    ws = w.detach() * magnitude_mask(w)
    ref = F.linear(x2 * x_mask, ws)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    assert bool((x.grad[~x_mask] == 0).all())
    pruned_x = (x.detach() * x_mask).reshape(-1, 32)
    torch.testing.assert_close(w.grad, gy.reshape(-1, 16).t() @ pruned_x)


def test_decay_pulls_pruned_weights():
    x = torch.zeros(1, 8)
    w = torch.randn(4, 8, requires_grad=True)
    sparse24_linear(x, w, None, decay=0.5).sum().backward()
    mask = magnitude_mask(w)
    assert torch.equal(w.grad, 0.5 * (~mask) * w.detach())


class MLPModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.mlp(h))


def test_sparse_training_learns_and_finalizes():
    torch.manual_seed(0)
    model = MLPModel()
    names = sparse_training_(model)
    assert names == ["mlp.0", "mlp.2"] and isinstance(model.mlp[0], SparseTrainingLinear)
    assert set(model.state_dict()) == set(MLPModel().state_dict())
    x = torch.randn(256, 16)
    target = torch.randn(4, 16)
    y = x @ target.t()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a linear target is learnable through the dense skip path and 2:4 MLP: the loss must fall
    # by far more than noise (10x from its start)
    assert losses[-1] < losses[0] / 10
    with torch.no_grad():
        before = model(x)
    assert finalize_sparse_training_(model) == ["mlp.0", "mlp.2"]
    assert type(model.mlp[0]) is nn.Linear and isinstance(model.mlp[0].weight, Sparse24Weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_input_pruning_trains_and_survives_finalize():
    torch.manual_seed(0)
    model = MLPModel()
    names = sparse_training_(model, prune_inputs=lambda m, fqn: fqn == "mlp.2")
    assert names == ["mlp.0", "mlp.2"]
    assert model.mlp[2].sparse_prune_input and not model.mlp[0].sparse_prune_input
    x = torch.randn(256, 16)
    y = x @ torch.randn(4, 16).t()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10  # learnable through the skip path, as above
    with torch.no_grad():
        before = model(x)
    finalize_sparse_training_(model)
    assert type(model.mlp[2]) is InputSparse24Linear and type(model.mlp[0]) is nn.Linear
    assert set(model.state_dict()) == set(MLPModel().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_prune_linear_inputs_at_inference():
    model = MLPModel()
    x = torch.randn(7, 16)
    h = model.inp(x)
    act = model.mlp[1](model.mlp[0](h))
    assert prune_linear_inputs_(model, lambda m, fqn: fqn == "mlp.2") == ["mlp.2"]
    assert type(model.mlp[2]) is InputSparse24Linear
    expect = F.linear(act * mask_24(act.abs()), model.mlp[2].weight, model.mlp[2].bias)
    torch.testing.assert_close(model.mlp[2](act), expect, rtol=0, atol=0)
    odd = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_linear_inputs_(odd, lambda m, fqn: True)
    assert type(odd[0]) is nn.Linear  # unchanged


def test_down_projection_filter_names():
    lin = nn.Linear(8, 8)
    assert mlp_down_projections(lin, "model.layers.3.mlp.down_proj")
    assert mlp_down_projections(lin, "layers.0.feed_forward.w2")
    assert not mlp_down_projections(lin, "model.layers.3.mlp.up_proj")
    assert not mlp_down_projections(lin, "model.layers.3.self_attn.o_proj")


@pytest.mark.parametrize("prune_input", [False, True])
def test_sparse_linear_compiles_without_graph_breaks(prune_input):
    """The per-step masks have no host sync, so a training step compiles as one graph."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(sparse24_linear, backend=counter, fullgraph=True)(
        x, w, prune_input=prune_input)
    out.sum().backward()
    assert counter.frame_count == 1
    xs = x * mask_24(x.detach().abs()) if prune_input else x
    torch.testing.assert_close(out, F.linear(xs, w * magnitude_mask(w)), rtol=0, atol=0)
