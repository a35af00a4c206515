"""One Adam(W) step of one parameter, on plain tensors: decode -> update -> encode.

This is the reference and the CPU path; on CUDA the optimizers run the same arithmetic as
one Triton launch for all parameters (`lowbit.kernels.triton.adam`), which reads each state's
codes and scales once and writes them once. Everything a step needs that may change (lr,
betas, eps, weight decay, the step count) arrives as a tensor, so nothing syncs the host.

Order of operations follows `torch.optim.AdamW` (decoupled decay first, then the moments,
then `p -= lr / bc1 * m / (sqrt(v) * (1 / sqrt(bc2)) + eps)`, one division by a scalar
turned into a multiplication, as the fused kernel does it); `Adam` adds `wd * p` to the gradient.
"""

from __future__ import annotations

import torch

from lowbit.optim.codes import decode, encode, get_codec, to_blocks
from lowbit.optim.state import QuantizedState, shared_table

# One fp32 word = [bf16 | 16 low bits]; adding 16 random bits before truncating rounds up with
# probability equal to the dropped fraction (stochastic rounding; sign-magnitude makes this
# work for negative values too).
_LOW16 = 1 << 16
_HIGH16_MASK = -_LOW16


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding up or down at random in proportion to the remainder, so
    tiny updates survive in expectation instead of being lost to round-to-nearest."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, _LOW16)
    return ((bits + noise) & _HIGH16_MASK).view(torch.float32).to(torch.bfloat16)


def _load(fields: tuple, codec: str | None, numel: int) -> torch.Tensor:
    if codec is None:
        return fields[0].reshape(-1)
    spec = get_codec(codec)
    codes, scale, book, _ = fields
    return decode(codes, scale, spec, book).reshape(-1)[:numel]


def _store(fields: tuple, codec: str | None, value: torch.Tensor) -> None:
    if codec is None:
        fields[0].copy_(value.view(fields[0].shape))
        return
    spec = get_codec(codec)
    codes, scale, book, table = fields
    new_codes, new_scale = encode(to_blocks(value, spec.block), spec, book, table)
    codes.copy_(new_codes)
    scale.copy_(new_scale)


def adam_step_(
    p: torch.Tensor,
    grad: torch.Tensor,
    step: torch.Tensor,
    hyper: torch.Tensor,
    m_fields: tuple,
    v_fields: tuple,
    m_codec: str | None,
    v_codec: str | None,
    decoupled: bool,
    stochastic_round: bool,
) -> None:
    """Update `p`, `step` and both moments in place.

    hyper: float32 [lr, beta1, beta2, eps, weight_decay] on p's device. m_fields/v_fields:
    (codes, scale, book, encoder table) of a quantized moment, or (float32 tensor,) when its
    codec is None.
    """
    lr, beta1, beta2, eps, wd = hyper.unbind()
    step.add_(1)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    n = p.numel()
    pf = p.reshape(-1).float()
    g = grad.reshape(-1).float()
    if decoupled:
        pf = pf * (1 - lr * wd)
    else:
        g = g + wd * pf
    m = _load(m_fields, m_codec, n).lerp(g, 1 - beta1)
    v = _load(v_fields, v_codec, n) * beta2 + (1 - beta2) * g * g
    denom = v.sqrt() * (1 / bc2.sqrt()) + eps
    pf = pf - (lr / bc1) * m / denom
    _store(m_fields, m_codec, m)
    _store(v_fields, v_codec, v)
    if stochastic_round and p.dtype == torch.bfloat16:
        p.copy_(stochastic_round_to_bf16(pf).view(p.shape))
    else:
        p.copy_(pf.view(p.shape))


def state_fields(state: torch.Tensor) -> tuple:
    """The plain tensors `adam_step_` reads for one moment (a QuantizedState or a float32
    tensor)."""
    if isinstance(state, QuantizedState):
        return state.codes, state.scale, state.book, shared_table(state.spec, state.device)
    return (state.view(-1),)
