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

Optionally a linear also prunes its input to 2:4 (per token, by |x|, along K): the activation
sparsity that suits down projections, whose inputs come out of the MLP's nonlinearity. That
pruning is part of the function, so its gradient is exact: dx = (dy Ws) * mask_x, and dW uses
the pruned input. Such a linear keeps pruning its input after `finalize_sparse_training_`
(`InputSparse24Linear`), so inference computes what training did. Only the numerics are
provided: no kernel here multiplies a 2:4 activation faster than a dense one yet.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.sparsity.api import Sparse24, sparse_weight
from lowbit.sparsity.masks import mask_24


def prune_input_24(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with the 2 smallest |x| of every 4 along the last dim zeroed, the kept mask)."""
    mask = mask_24(x.detach().abs(), check_finite=False)  # no host sync in the step
    return x * mask, mask


class _Sparse24Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, decay: float, prune_input: bool):
        x_mask = None
        if prune_input:
            x, x_mask = prune_input_24(x)
        mask = mask_24(weight.detach().abs(), check_finite=False)
        w_sparse = weight * mask
        ctx.save_for_backward(x, w_sparse, mask if decay else None, weight if decay else None,
                              x_mask)
        ctx.decay = decay
        ctx.has_bias = bias is not None
        return F.linear(x, w_sparse, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_sparse, mask, weight, x_mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_sparse
            if x_mask is not None:
                grad_x = grad_x * x_mask
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
            if ctx.decay:
                grad_w = grad_w + ctx.decay * (~mask) * weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    decay: float = 0.0, prune_input: bool = False) -> torch.Tensor:
    """F.linear with `weight` pruned to 2:4 by magnitude, and with `prune_input` x too (see the
    module docstring)."""
    return _Sparse24Linear.apply(x, weight, bias, decay, prune_input)


class SparseTrainingLinear(nn.Linear):
    """An nn.Linear (same parameters and state_dict keys) trained with a 2:4 weight."""

    sparse_decay: float = 0.0
    sparse_prune_input: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.weight, self.bias, self.sparse_decay,
                               self.sparse_prune_input)


class InputSparse24Linear(nn.Linear):
    """An nn.Linear (same state_dict keys) that prunes its input to 2:4 before the matmul: a
    linear trained with `prune_inputs`, after `finalize_sparse_training_`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(prune_input_24(x)[0], self.weight, self.bias)


MLP_PATTERN = r".*(mlp|feed_forward|ffn)\..*"
DOWN_PROJECTION_PATTERN = r".*(mlp|feed_forward|ffn)\.(down_proj|w2|fc2)"


def mlp_linears(module: nn.Module, fqn: str) -> bool:
    """The default filter: nn.Linear layers inside an MLP block (by name: mlp, feed_forward,
    ffn), as in Llama-style models."""
    return type(module) is nn.Linear and re.fullmatch(MLP_PATTERN, fqn) is not None


def mlp_down_projections(module: nn.Module, fqn: str) -> bool:
    """MLP down projections by name (down_proj, w2, fc2): the linears whose inputs are the
    MLP's activations, for `sparse_training_(prune_inputs=...)`."""
    return re.fullmatch(DOWN_PROJECTION_PATTERN, fqn) is not None


def sparse_training_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] = mlp_linears,
                     decay: float = 0.0,
                     prune_inputs: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Make the chosen linears train with 2:4 weights, in place; returns their names. Those of
    them that `prune_inputs` also picks (e.g. `mlp_down_projections`) prune their inputs to 2:4
    too. Raises ValueError (and changes nothing) if a chosen linear's in_features is not
    divisible by 4."""
    chosen = [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn)]
    bad = [f"{fqn} (in_features {m.in_features})" for fqn, m in chosen if m.in_features % 4]
    if bad:
        raise ValueError(f"2:4 sparse training needs in_features divisible by 4: {bad[:5]}")
    for fqn, m in chosen:
        m.__class__ = SparseTrainingLinear
        m.sparse_decay = decay
        m.sparse_prune_input = prune_inputs is not None and prune_inputs(m, fqn)
    return [fqn for fqn, _ in chosen]


def prune_linear_inputs_(model: nn.Module,
                         filter_fn: Callable[[nn.Module, str], bool] = mlp_down_projections
                         ) -> list[str]:
    """Make the chosen nn.Linear layers (dense or with a lowbit weight) prune their inputs to
    2:4 at inference, in place (`InputSparse24Linear`); returns their names. Raises ValueError
    (and changes nothing) if one's in_features is not divisible by 4."""
    chosen = [(fqn, m) for fqn, m in model.named_modules()
              if type(m) is nn.Linear and filter_fn(m, fqn)]
    bad = [f"{fqn} (in_features {m.in_features})" for fqn, m in chosen if m.in_features % 4]
    if bad:
        raise ValueError(f"2:4 input pruning needs in_features divisible by 4: {bad[:5]}")
    for _, m in chosen:
        m.__class__ = InputSparse24Linear
    return [fqn for fqn, _ in chosen]


def finalize_sparse_training_(model: nn.Module, bits: int = 0, group_size: int = 128) -> list[str]:
    """Turn every SparseTrainingLinear back into an nn.Linear holding its 2:4 weight as a
    Sparse24Weight (same magnitude mask as training used), or an `InputSparse24Linear` where
    training pruned its input; returns their names."""
    config = Sparse24("magnitude", bits, group_size)
    done = []
    for fqn, m in model.named_modules():
        if isinstance(m, SparseTrainingLinear):
            w = sparse_weight(config, m.weight)
            m.__class__ = InputSparse24Linear if m.sparse_prune_input else nn.Linear
            del m.sparse_decay, m.sparse_prune_input
            m.weight = nn.Parameter(w, requires_grad=False)
            done.append(fqn)
    return done
