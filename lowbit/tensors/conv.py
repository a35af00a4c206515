"""Quantized weights as the kernel of nn.Conv2d: F.conv2d and aten.convolution.

A Conv2d kernel [O, I/groups, kh, kw] is quantized as the matrix [O, I/groups * kh * kw]
(one row per output channel, so "per channel" means what it means for a linear) and keeps
its 4-D logical shape; `as_conv_weight` makes that tensor from the matrix one. The reference
path decodes the kernel and runs the float convolution. Weights that also quantize
activations fake-quantize the conv input with the codec their linear path uses, but with one
scale per image instead of one per token: a per-pixel scale would not factor out of a
convolution's sum over neighbouring pixels, while one scale per image does (an int8 conv
kernel can apply it after accumulation), and it keeps each image's result independent of
what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import AffineSpec, choose_qparams, dequantize, quantize
from lowbit.kernels import reference as ref
from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.float8_weight import Float8Weight
from lowbit.tensors.int_weight import IntWeight
from lowbit.tensors.validation import UnsupportedWeight

aten = torch.ops.aten

# act_quant value of each class -> the integer codec its activations use.
_INT_ACT_SPECS = {
    "int8_per_token": AffineSpec(8),
    "int8_per_token_asym": AffineSpec(8, "asymmetric", "int"),
}
CONV_CLASSES = (IntWeight, Float8Weight)


def as_conv_weight(q: LowbitTensor, shape: torch.Size | tuple[int, ...]) -> LowbitTensor:
    """Give a quantized [O, I/groups * kh * kw] matrix the 4-D shape of a Conv2d kernel."""
    if not isinstance(q, CONV_CLASSES):
        raise UnsupportedWeight(f"{type(q).__name__} has no convolution kernel; use int8 or fp8")
    if len(shape) != 4 or tuple(q.shape) != (shape[0], shape[1] * shape[2] * shape[3]):
        raise ValueError(f"a {tuple(q.shape)} matrix is not the flattened kernel {tuple(shape)}")
    return q.with_fields(shape=torch.Size(shape))


def conv_kernel(weight: LowbitTensor, dtype: torch.dtype) -> torch.Tensor:
    """The decoded [O, I/groups, kh, kw] kernel (formats decode the flattened matrix)."""
    return weight.dequantize(dtype).reshape(weight.shape)


def fake_quantize_per_image(x: torch.Tensor, act_quant: str) -> torch.Tensor:
    """Quantize -> dequantize the conv input with one scale (and zero) per image."""
    flat = x.reshape(x.shape[0], -1)
    if act_quant in _INT_ACT_SPECS:
        spec = _INT_ACT_SPECS[act_quant]
        block = (1, flat.shape[1])
        scale, zero = choose_qparams(flat.float(), spec, block, torch.float32)
        q = quantize(flat, scale, zero, spec, block)
        return dequantize(q, scale, zero, block, x.dtype).reshape(x.shape)
    # Float8Weight's "per_row" / "per_tensor": e4m3 with one scale per image either way.
    q, scale = ref.quantize_fp8_activation(flat, per_row=True)
    return (q.float() * scale).to(x.dtype).reshape(x.shape)


def _check_input(x: torch.Tensor, weight: LowbitTensor) -> None:
    if weight.dim() != 4:
        raise ValueError(
            f"conv2d got a {weight.dim()}-D quantized weight {tuple(weight.shape)}; a Conv2d "
            "kernel is 4-D (quantize the module with quantize_, not the bare matrix)"
        )
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the quantized weight is on {weight.device}")
    if not x.is_floating_point():
        raise TypeError(f"quantized conv2d expects a floating-point input, got {x.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"conv2d expects a 3-D or 4-D input, got shape {tuple(x.shape)}")


def _conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    _check_input(x, weight)
    if weight.act_quant != "none":
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        x = fake_quantize_per_image(batched, weight.act_quant).reshape(x.shape)
    return F.conv2d(x, conv_kernel(weight, x.dtype), bias, stride, padding, dilation, groups)


def register_conv_ops(cls: type[LowbitTensor]) -> None:
    @cls.implements_function(F.conv2d)
    def _(func, args, kwargs):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        bound = {**defaults, **dict(zip(names, args)), **kwargs}
        return _conv2d(*(bound[n] for n in names))

    @cls.implements(aten.convolution.default)
    def _(func, args, kwargs):
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
        if transposed or len(stride) != 2:
            raise NotImplementedError(
                f"{cls.__name__} runs only 2-D, non-transposed convolutions (nn.Conv2d)"
            )
        return _conv2d(x, weight, bias, stride, padding, dilation, groups)


for _cls in CONV_CLASSES:
    register_conv_ops(_cls)
