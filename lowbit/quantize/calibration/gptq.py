"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The objective is the layer-output error ||W X - Q X||^2 over the calibration inputs X, whose
Hessian is H = X^T X. Columns are processed in blocks: inside a block every column updates
the rest of the block at once, and the columns after the block receive the block's errors in
one matrix product (the "lazy batch" update). With `act_order` the columns with the largest
H diagonal (most active inputs) go first.

Scales stay in the base format's contiguous groups along K: a group's scale and zero are
chosen when the first of its columns is reached, from that group's weights as updated so far,
so act-order needs no column permutation in the stored tensor. With `clip` that choice also
shrinks each row's range where that lowers the group's output error (AWQ's clipping, scored
with the group's block of H); at 3 bits this matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.formats import choose_qparams, dequantize, quantize
from lowbit.quantize.calibration.awq import clip_weight

if TYPE_CHECKING:
    from lowbit.quantize.calibration.api import IntTarget

_MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    codes: torch.Tensor  # int16 [N, K]
    scale: torch.Tensor  # [N, K / g] in the weight dtype
    zero: torch.Tensor | None
    damp: float  # the damping that made H positive definite (may exceed the request)


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows tenfold until
    the factorization succeeds (rank-deficient H from too few tokens)."""
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise ValueError(f"the Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: IntTarget,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip: bool = False,
) -> GPTQResult:
    """Codes and qparams of `weight` [N, K] in `target`'s format, minimizing output error.

    `hessian` is X^T X [K, K] of the calibration inputs (any positive multiple works)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    g = target.group_size(k)
    spec = target.spec
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs never active: any value works, so pin them to zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    perm = perm.to(w.device)
    position = torch.argsort(perm)  # column -> its place in processing order
    w, h = w[:, perm], h[perm][:, perm]
    u, used_damp = inverse_cholesky(h, damp)

    scale = torch.empty(n, k // g, dtype=weight.dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    ready = [False] * (k // g)
    codes = torch.empty(n, k, dtype=torch.int16, device=w.device)
    cols = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        errors = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            grp = col // g
            if not ready[grp]:
                current = _current_group(w, w1, errors, u, position, grp * g, g, i1, i)
                if clip:
                    pos = position[grp * g : grp * g + g]
                    current = clip_weight(current, h[pos][:, pos], target)
                s, z = choose_qparams(current, spec, (1, g), weight.dtype)
                scale[:, grp] = s[:, 0]
                if zero is not None:
                    zero[:, grp] = z[:, 0]
                ready[grp] = True
            s = scale[:, grp : grp + 1]
            z = None if zero is None else zero[:, grp : grp + 1]
            q = quantize(w1[:, i : i + 1], s, z, spec, (1, 1))
            codes[:, col] = q[:, 0]
            err = (w1[:, i] - dequantize(q, s, z, (1, 1))[:, 0]) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return GPTQResult(codes, scale, zero, used_damp)


def _current_group(w, w1, errors, u, position, start, g, i1, i) -> torch.Tensor:
    """Group columns [start, start + g) as updated by every column quantized so far.

    Columns inside the current block are up to date in `w1`; later columns still miss the
    updates of this block's first `i` columns, which are applied here on a copy.
    """
    pos = position[start : start + g]
    i2 = i1 + w1.shape[1]
    current = w[:, pos].clone()
    inside = pos < i2
    if bool(inside.any()):
        current[:, inside] = w1[:, pos[inside] - i1]
    later = ~inside
    if i > 0 and bool(later.any()):
        current[:, later] -= errors[:, :i] @ u[i1 : i1 + i, pos[later]]
    return current
