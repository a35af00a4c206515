"""View a tensor as a grid of blocks so one reduction computes every block's statistic.

A tensor of shape (s0, s1, ...) with block size (b0, b1, ...) is reshaped to
(s0/b0, b0, s1/b1, b1, ...); reducing the odd dims gives one value per block, with no
Python loop over blocks.
"""

from __future__ import annotations

import torch

from lowbit.formats.granularity import check_divisible


def to_blocks(x: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    if len(block) != x.dim():
        raise ValueError(f"block size {block} does not match a {x.dim()}-D tensor")
    reason = check_divisible(tuple(x.shape), block)
    if reason:
        raise ValueError(f"cannot cut shape {tuple(x.shape)} into blocks {block}: {reason}")
    shape: list[int] = []
    for size, b in zip(x.shape, block):
        shape += [size // b, b]
    return x.reshape(shape)


def block_dims(ndim: int) -> tuple[int, ...]:
    """The dims of a `to_blocks` view that run inside a block."""
    return tuple(range(1, 2 * ndim, 2))


def expand_params(p: torch.Tensor) -> torch.Tensor:
    """Per-block params (n0, n1, ...) -> (n0, 1, n1, 1, ...), broadcastable to a blocks view."""
    return p.reshape([d for n in p.shape for d in (n, 1)])


def block_amax(x: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """Max |x| per block, in float32, shape (s0/b0, s1/b1, ...)."""
    return to_blocks(x.float(), block).abs().amax(dim=block_dims(x.dim()))


def block_min_max(x: torch.Tensor, block: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    xb = to_blocks(x.float(), block)
    dims = block_dims(x.dim())
    return xb.amin(dim=dims), xb.amax(dim=dims)


def apply_blockwise(x: torch.Tensor, block: tuple[int, ...], fn, *params: torch.Tensor):
    """fn(x_blocks, *expanded_params) reshaped back to x's shape."""
    xb = to_blocks(x, block)
    return fn(xb, *(None if p is None else expand_params(p) for p in params)).reshape(x.shape)
