"""Sum-preserving rounding for depthwise int8 kernels: the kernel's DC gain survives.

A depthwise row has 9 or 25 weights that all read one channel. Post-ReLU6 inputs carry a
large, image-dependent mean, so the part of the rounding error that matters most is
sum(W_q - W) * mean(x): a DC error that bias correction removes only for the calibration
mean, not image by image. Rounding each row to nearest and then moving the codes with the
largest rounding remainders one step (as few as make |sum(W_q - W)| <= scale / 2) keeps the
row's sum within half a step, at most one step per weight. Data-free; measured on
EfficientNet-Lite0 with bias correction: logit SQNR 24.7 -> 26.0 dB on the 56 center views.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.tensors import IntWeight
from lowbit.tensors.conv import as_conv_weight


def sum_preserving_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [N, K] and per-row scales [N, 1] whose row sums stay within half a
    step of w's; the scale is RTN's (amax / 127)."""
    w = w.float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    u = w / scale
    codes = u.round()
    frac = u - codes
    moves = frac.sum(1, keepdim=True).round()  # whole steps the row sum is off by
    rank_up = frac.argsort(1, descending=True).argsort(1)
    rank_down = frac.argsort(1).argsort(1)
    codes = codes + (rank_up < moves).float() - (rank_down < -moves).float()
    return codes.clamp(-127, 127).to(torch.int8), scale


def round_depthwise_sum_preserving_(quantized: nn.Module, reference: nn.Module) -> list[str]:
    """Re-round, in place, every depthwise Conv2d whose weight is int8 per channel, from the
    fp weights of `reference` (the model `quantized` was made from). Returns their names."""
    ref_modules = dict(reference.named_modules())
    done = []
    for fqn, module in quantized.named_modules():
        w = getattr(module, "weight", None)
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
        if not (depthwise and isinstance(w, IntWeight) and w.signed_int8 and w.scale.shape[1] == 1):
            continue
        fp = ref_modules[fqn].weight.detach()
        codes, scale = sum_preserving_codes(fp.flatten(1))
        new = w.with_fields(shape=codes.shape, qdata=codes, scale=scale.to(w.scale.dtype))
        module.weight = nn.Parameter(as_conv_weight(new, fp.shape), requires_grad=False)
        done.append(fqn)
    return done
