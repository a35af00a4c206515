"""2:4 sparse training: MLP linears whose weight is pruned to 2:4 on every step.

The mask is recomputed from |W| in every forward, so it follows the weights as they train.
Forward and the input gradient use the pruned weight (y = x Ws^T, dx = dy Ws), exactly what
a 2:4 inference weight computes; the weight gradient dW = dy^T x is dense (straight-through),
so pruned weights keep learning and can win their place back. `decay` adds SR-STE's term
decay * (1 - mask) * W to it, which pulls pruned weights toward zero and steadies the mask.

The matmuls are dense on masked weights on every device: torch's semi-structured kernels
(cuSPARSELt) ran at 0.4x-0.9x of dense bf16 on the H100 at training sizes and the CUTLASS
path refuses SM90 (../shared/GPU.md), and each step would also pay a compression.
`finalize_sparse_training_` turns the trained linears into `Sparse24Weight` for inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.sparsity.api import Sparse24, sparse_weight
from lowbit.sparsity.masks import mask_24


class _Sparse24Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, decay: float):
        mask = mask_24(weight.detach().abs(), check_finite=False)  # no host sync in the step
        w_sparse = weight * mask
        ctx.save_for_backward(x, w_sparse, mask if decay else None, weight if decay else None)
        ctx.decay = decay
        ctx.has_bias = bias is not None
        return F.linear(x, w_sparse, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_sparse, mask, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_sparse
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
            if ctx.decay:
                grad_w = grad_w + ctx.decay * (~mask) * weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    decay: float = 0.0) -> torch.Tensor:
    """F.linear with `weight` pruned to 2:4 by magnitude (see the module docstring)."""
    return _Sparse24Linear.apply(x, weight, bias, decay)


class SparseTrainingLinear(nn.Linear):
    """An nn.Linear (same parameters and state_dict keys) trained with a 2:4 weight."""

    sparse_decay: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.weight, self.bias, self.sparse_decay)


MLP_PATTERN = r".*(mlp|feed_forward|ffn)\..*"


def mlp_linears(module: nn.Module, fqn: str) -> bool:
    """The default filter: nn.Linear layers inside an MLP block (by name: mlp, feed_forward,
    ffn), as in Llama-style models."""
    return type(module) is nn.Linear and re.fullmatch(MLP_PATTERN, fqn) is not None


def sparse_training_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] = mlp_linears,
                     decay: float = 0.0) -> list[str]:
    """Make the chosen linears train with 2:4 weights, in place; returns their names.
    Raises ValueError (and changes nothing) if a chosen linear's in_features is not
    divisible by 4."""
    chosen = [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn)]
    bad = [f"{fqn} (in_features {m.in_features})" for fqn, m in chosen if m.in_features % 4]
    if bad:
        raise ValueError(f"2:4 sparse training needs in_features divisible by 4: {bad[:5]}")
    for _, m in chosen:
        m.__class__ = SparseTrainingLinear
        m.sparse_decay = decay
    return [fqn for fqn, _ in chosen]


def finalize_sparse_training_(model: nn.Module, bits: int = 0, group_size: int = 128) -> list[str]:
    """Turn every SparseTrainingLinear back into an nn.Linear holding its 2:4 weight as a
    Sparse24Weight (same magnitude mask as training used); returns their names."""
    config = Sparse24("magnitude", bits, group_size)
    done = []
    for fqn, m in model.named_modules():
        if isinstance(m, SparseTrainingLinear):
            w = sparse_weight(config, m.weight)
            m.__class__ = nn.Linear
            del m.sparse_decay
            m.weight = nn.Parameter(w, requires_grad=False)
            done.append(fqn)
    return done
