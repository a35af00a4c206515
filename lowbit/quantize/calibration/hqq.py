"""HQQ: half-quadratic optimization of the zero point, with no calibration data.

Round-to-nearest takes the zero from the group's min and max. HQQ fits it instead to an l_p
error (p <= 1, which tolerates a few large residuals): it splits the residual into a sparse
part E (the l_p proximal step) and the rest, and moves the zero so that the rest averages
out; each group keeps the iterate with the smallest l_p error. Every step is elementwise and
closed form, so a whole model takes seconds.

The start matters more than the steps: the objective has many local minima (one per way the
grid can sit among the weights), and the iteration settles in the one nearest its start. It
starts from the integer-zero grid (the range widened to include 0, the zero rounded), which
puts a level on 0.0 where the weights are densest, and then lets the zero go fractional. On
SmolLM2-135M int4 g64 (210 decoder linears, benchmarks/accuracy_calibration.py) starting
from the float-zero min/max grid instead gave held-out Wikipedia perplexity 23.42, no better
than integer-zero round-to-nearest (23.40).

Residuals are measured in quantization steps (w / scale), so `beta` means the same for any
weight magnitude (the paper's beta is in weight units). With beta <= 1 the shrinkage never
fires for in-range weights and each step is the least-squares zero for the current codes;
larger beta lets E absorb outliers. The scale stays the range's: fitting it too (alternating
least squares on scale and zero) lowered the weight error but raised perplexity, as did
narrower ranges (they clip the large weights that matter most).
"""

from __future__ import annotations

import torch

from lowbit.formats import AffineSpec, choose_qparams, quantize
from lowbit.quantize.calibration.api import HQQ, IntTarget, int_target
from lowbit.quantize.handlers import register_handler
from lowbit.tensors import IntWeight

# Groups per step: keeps the working set of a large weight (an lm_head) in cache.
_GROUP_CHUNK = 16384
# A group whose zero moved less than this (in quantization steps) has converged.
_TOL = 1e-3


def _optimize_zero(u: torch.Tensor, zero: torch.Tensor, target: IntTarget, config: HQQ
                   ) -> torch.Tensor:
    """Zeros [M, 1] minimizing the l_p error of groups u = w / scale [M, g].

    With r = u + zero - q the residual, the sparse part E is the l_p proximal step of r and
    the zero that fits the rest is mean(q - u + E) = zero + mean(E - r). Converged groups
    drop out, so later steps cost little."""
    spec, p, beta = target.spec, config.lp_norm, config.beta
    best_zero = zero.clone()
    best_err = torch.full_like(zero, float("inf"))
    active = torch.arange(u.shape[0], device=u.device)
    for _ in range(config.iters):
        shifted = u + zero
        r = shifted - torch.round(shifted).clamp_(spec.qmin, spec.qmax)
        mag = r.abs()
        mag_p1 = mag.clamp(min=1e-6).pow_(p - 1)
        err = (mag_p1 * mag).mean(-1, keepdim=True)  # mean |r|^p
        better = err < best_err[active]
        best_err[active] = torch.where(better, err, best_err[active])
        best_zero[active] = torch.where(better, zero, best_zero[active])
        shrunk = torch.relu(mag - mag_p1 / beta).copysign_(r)  # E
        step = (shrunk - r).mean(-1, keepdim=True)
        moving = step[:, 0].abs() > _TOL
        if not bool(moving.any()):
            break
        active, u, zero = active[moving], u[moving], (zero + step)[moving]
        beta *= config.kappa
    return best_zero


def hqq_quantize(w: torch.Tensor, target: IntTarget, config: HQQ) -> IntWeight:
    """`w` [N, K] in `target`'s format with HQQ-optimized zeros."""
    target.check(w)
    n, k = w.shape
    g = target.group_size(k)
    block = (1, g)
    start = AffineSpec(target.spec.bits, target.spec.mapping, "int")
    scale, zero = choose_qparams(w, start, block, w.dtype)
    u = (w.float().reshape(n, k // g, g) / scale.float()[..., None]).reshape(-1, g)
    z0 = zero.float().reshape(-1, 1)
    zeros = [
        _optimize_zero(u[i : i + _GROUP_CHUNK], z0[i : i + _GROUP_CHUNK], target, config)
        for i in range(0, u.shape[0], _GROUP_CHUNK)
    ]
    # Encode with the zeros as stored (weight dtype): the codes match what the decoder sees.
    zero = torch.cat(zeros).reshape(n, k // g).to(w.dtype)
    codes = quantize(w, scale, zero, target.spec, block)
    return target.pack(w, codes, scale, zero)


@register_handler(HQQ)
def _hqq_handler(config: HQQ, w: torch.Tensor) -> IntWeight:
    return hqq_quantize(w, int_target(config.base), config)
