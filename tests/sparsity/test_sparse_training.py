"""2:4 sparse training: forward/backward of the runtime-pruned linear, and a short run (CPU)."""

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.sparsity import (
    Sparse24Weight,
    SparseTrainingLinear,
    finalize_sparse_training_,
    magnitude_mask,
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


def test_sparse_linear_compiles_without_graph_breaks():
    """The per-step mask has no host sync, so a training step compiles as one graph."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(sparse24_linear, backend=counter, fullgraph=True)(x, w)
    out.sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(out, F.linear(x, w * magnitude_mask(w)), rtol=0, atol=0)
