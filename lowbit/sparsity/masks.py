"""2:4 masks: keep the 2 highest-scoring weights of every group of 4 input columns.

Magnitude scores |W|; WANDA (Sun et al., 2023) scores |W_ij| * ||X_j||_2, the weight times the
L2 norm of its input channel over calibration tokens, so a small weight on a loud channel
outranks a larger one on a quiet channel. Groups run along K (the input dim of an
[out, in] weight), as the sparse tensor cores and `Sparse24Weight` want.
"""

from __future__ import annotations

import torch


def mask_24(scores: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Bool mask of scores' shape keeping the 2 largest of every 4 along the last dim.

    Ties keep the earlier column (a stable sort), so equal scores give the same mask on every
    run and device. `check_finite=False` skips the NaN/Inf check, a host sync: sparse training
    recomputes masks in every step, where a NaN shows in the loss anyway."""
    *lead, k = scores.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the last dim divisible by 4, got {k}")
    if check_finite and scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("2:4 mask scores contain NaN/Inf")
    groups = scores.reshape(-1, k // 4, 4)
    order = groups.sort(dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return mask.reshape(*lead, k)


def magnitude_mask(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask by |W|."""
    return mask_24(weight.detach().abs())


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """2:4 mask by |W| * ||X_j||: `input_norm` [K] is the L2 norm of each input channel."""
    k = weight.shape[-1]
    if input_norm.shape != (k,):
        raise ValueError(f"input_norm must have shape ({k},), got {tuple(input_norm.shape)}")
    return mask_24(weight.detach().abs().float() * input_norm.float().to(weight.device))


def is_24(mask: torch.Tensor) -> bool:
    """Whether every group of 4 along the last dim keeps exactly 2."""
    k = mask.shape[-1]
    return k % 4 == 0 and bool((mask.reshape(-1, k // 4, 4).sum(-1) == 2).all())
