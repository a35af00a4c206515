"""AWQ: activation-aware channel scaling and output-aware clipping for weight-only ints.

A few input channels carry most of the activation magnitude; rounding errors in their weight
columns dominate the output error. Multiplying those columns by s > 1 before quantizing (and
dividing the input by s, folded into the producing op) shrinks their relative rounding
error. s = mean|x|^alpha, with alpha picked from a grid per group of linears that share an
input. Then every (row, group) may shrink its quantization range to trade clipping of rare
large weights for finer steps everywhere else.

Both searches score a candidate weight W' by the exact output error over the calibration
inputs X, tr((W' - W) H (W' - W)^T) with H = X^T X, so no forward pass is rerun; alpha = 0
(no scaling) and shrink 1 (no clipping) are always candidates, so AWQ never scores worse
than round-to-nearest on that error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.formats import fake_quantize

if TYPE_CHECKING:
    from lowbit.quantize.calibration.api import IntTarget


def _fake_quant(w: torch.Tensor, target: IntTarget, dtype: torch.dtype) -> torch.Tensor:
    block = (1, target.group_size(w.shape[1]))
    return fake_quantize(w.to(dtype), target.spec, block).float()


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Squared output error over the calibration inputs caused by a weight change `delta`."""
    return ((delta @ hessian) * delta).sum()


def search_scale(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    x_mean: torch.Tensor,
    target: IntTarget,
    grid: int,
) -> torch.Tensor:
    """Input-channel scales s for linears sharing one input (mean |x| of that input)."""
    ws = [w.detach().float() for w in weights]
    dtype = weights[0].dtype
    if not bool((x_mean > 0).any()):
        return torch.ones_like(x_mean)
    base = x_mean.float().clamp(min=float(x_mean.max()) * 1e-5)
    best_loss, best_s = None, torch.ones_like(base)
    for step in range(grid):
        alpha = step / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(
            output_error(_fake_quant(w * s, target, dtype) / s - w, hessian) for w in ws
        )
        if best_loss is None or loss < best_loss:
            best_loss, best_s = loss, s
    return best_s


def clip_weight(
    weight: torch.Tensor, hessian: torch.Tensor, target: IntTarget, steps: int = 10,
    min_shrink: float = 0.5,
) -> torch.Tensor:
    """`weight` with each (row, group) clamped to the shrunken range that minimizes the
    output error of that group's columns (the diagonal blocks of H)."""
    w = weight.detach().float()
    n, k = w.shape
    g = target.group_size(k)
    groups = k // g
    h_blocks = hessian.reshape(groups, g, groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    wg = w.reshape(n, groups, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best_err = torch.full((n, groups, 1), float("inf"), device=w.device)
    best_ratio = torch.ones_like(best_err)
    for step in range(steps + 1):
        ratio = 1.0 - (1.0 - min_shrink) * step / steps
        clamped = torch.minimum(torch.maximum(wg, lo * ratio), hi * ratio)
        delta = _fake_quant(clamped.reshape(n, k), target, weight.dtype).reshape_as(wg) - wg
        err = torch.einsum("ngk,gkl,ngl->ng", delta, h_blocks, delta)[..., None]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    clipped = torch.minimum(torch.maximum(wg, lo * best_ratio), hi * best_ratio)
    return clipped.reshape(n, k).to(weight.dtype)
