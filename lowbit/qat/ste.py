"""Straight-through estimators: forward values from the real codec, gradients that can train.

Rounding has a zero gradient almost everywhere, so QAT keeps the quantized *value* in the
forward pass and passes the gradient through as if quantization were the identity (Bengio et
al., 2013). The forward value is the codec's output itself, not ``x + (q - x).detach()``:
that expression rounds twice in floating point and would break the promise that fake-quant
forward numerics equal the converted model's bit for bit.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from lowbit.formats import AffineSpec, dequantize, quantize
from lowbit.formats.blocks import block_dims, to_blocks


class _StraightThrough(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The values of `q` (a quantize -> dequantize of `x`) with the gradient of `x`."""
    return _StraightThrough.apply(x, q.detach())


class _LearnedScale(Function):
    """Affine fake-quant with a trainable scale (LSQ, Esser et al. 2020).

    Forward is the codec's quantize -> dequantize with the given scale and zero. Backward:
    d/dw = 1 inside the code range and 0 where the code was clamped; d/dscale per element is
    (q - zero) - w / scale inside the range and (q - zero) when clamped, summed per block and
    multiplied by LSQ's 1 / sqrt(block elements * qmax) so scale steps stay comparable to
    weight steps.
    """

    @staticmethod
    def forward(ctx, w, scale, zero, spec: AffineSpec, block: tuple[int, ...]):
        codes = quantize(w, scale, zero, spec, block)
        ctx.save_for_backward(w, scale, zero, codes)
        ctx.spec, ctx.block = spec, block
        return dequantize(codes, scale, zero, block, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero, codes = ctx.saved_tensors
        spec, block = ctx.spec, ctx.block
        wb = to_blocks(w.float(), block)
        cb = to_blocks(codes.float(), block)
        gb = to_blocks(grad.float(), block)
        s = scale.float().reshape([d for n in scale.shape for d in (n, 1)])
        z = 0.0 if zero is None else zero.float().reshape(s.shape)
        unclamped = torch.round(wb / s + z)
        inside = (unclamped >= spec.qmin) & (unclamped <= spec.qmax)
        grad_w = (gb * inside).reshape(w.shape).to(w.dtype)
        per_elem = torch.where(inside, (cb - z) - wb / s, cb - z)
        per_block = w.numel() // scale.numel()
        factor = (per_block * spec.qmax) ** -0.5
        grad_s = (gb * per_elem).sum(dim=block_dims(w.dim())) * factor
        return grad_w, grad_s.to(scale.dtype), None, None, None


def learned_scale_fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: AffineSpec,
    block: tuple[int, ...],
) -> torch.Tensor:
    """quantize -> dequantize of `w` with a trainable `scale` (gradients reach both)."""
    return _LearnedScale.apply(w, scale, zero, spec, block)


class _ExactForwardLinear(Function):
    """Output values `y` (computed by a real kernel's reference), gradients of
    ``F.linear(x_fq, w_fq, bias)``: used where the real path is not a float matmul of fake
    quantized operands (int8 x int8 with int32 accumulation, fp8 x fp8)."""

    @staticmethod
    def forward(ctx, x_fq, w_fq, bias, y):
        ctx.save_for_backward(x_fq, w_fq)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x_fq, w_fq = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ w_fq.to(grad.dtype)).to(x_fq.dtype)
        grad_w = (g2.t() @ x_fq.reshape(-1, x_fq.shape[-1]).to(grad.dtype)).to(w_fq.dtype)
        grad_b = None if ctx.bias_dtype is None else g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def exact_forward_linear(
    x_fq: torch.Tensor, w_fq: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
) -> torch.Tensor:
    return _ExactForwardLinear.apply(x_fq, w_fq, bias, y.detach())
