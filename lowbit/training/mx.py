"""Emulated MX training: linears whose three GEMMs see MXFP8 operands (for Hopper and CPUs).

Each GEMM's operands are rounded to MX in blocks of 32 along *that GEMM's contraction dim*, as
an MX tensor-core GEMM requires (OCP MX v1.0 dot product: one scale per 32 products):
  forward      y  = x @ W^T       x blocks along K, W along K
  grad input   dx = dy @ W        dy blocks along N, W along N (so W is re-rounded by column)
  grad weight  dW = dy^T @ x      dy and x blocks along the token dim M
The rounded operands are exact in bf16 (3 mantissa bits, power-of-two scale), so the GEMMs run
in the operands' own dtype with fp32 accumulation: the numbers an MX GEMM would give, at bf16
speed. A block dim that is not a multiple of 32 is zero-padded (zeros change neither the
block's max nor the products). Weights stay plain high-precision Parameters; only modules are
swapped, as in `lowbit.training`'s fp8 conversion, whose call shape this mirrors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import mx
from lowbit.training.convert import swap_linears
from lowbit.training.float8_linear import plain_linear

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class MXTrainingRecipe:
    """Element types for forward operands and output gradients, and the scale rule."""

    name: str = "mxfp8"
    elem: str = "fp8_e4m3"
    grad_elem: str = "fp8_e4m3"
    scale_mode: str = "floor"

    def __post_init__(self) -> None:
        mx.elem_format(self.elem)
        mx.elem_format(self.grad_elem)
        if self.scale_mode not in mx.SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {mx.SCALE_MODES}, "
                             f"got {self.scale_mode!r}")


RECIPES = {
    "mxfp8": MXTrainingRecipe(),
    "mxfp8_rceil": MXTrainingRecipe("mxfp8_rceil", scale_mode="rceil"),
    "mxfp8_e5m2_grads": MXTrainingRecipe("mxfp8_e5m2_grads", grad_elem="fp8_e5m2"),
}


def as_mx_recipe(recipe: str | MXTrainingRecipe) -> MXTrainingRecipe:
    if isinstance(recipe, MXTrainingRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"MX training recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]


def mx_round(t: torch.Tensor, elem: str, mode: str) -> torch.Tensor:
    """t rounded to MX in blocks of 32 along its last dim (zero-padded), in t's dtype."""
    k = t.shape[-1]
    pad = -k % mx.MX_BLOCK
    if pad:
        t = F.pad(t, (0, pad))
    out = mx.mx_fake_quantize(t, elem, mode)
    return out[..., :k] if pad else out


class _MXMatmul(torch.autograd.Function):
    """y = x @ W^T for x [M, K], W [N, K], every GEMM on MX-rounded operands."""

    @staticmethod
    def forward(ctx, x, weight, recipe: MXTrainingRecipe):
        r = recipe
        y = mx_round(x, r.elem, r.scale_mode) @ mx_round(weight, r.elem, r.scale_mode).t()
        ctx.save_for_backward(x, weight)
        ctx.recipe = recipe
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        r: MXTrainingRecipe = ctx.recipe
        grad_x = grad_w = None
        g = grad_out.to(x.dtype)
        if ctx.needs_input_grad[0]:
            w_cols = mx_round(weight.t(), r.elem, r.scale_mode)  # [K, N], blocks along N
            grad_x = mx_round(g, r.grad_elem, r.scale_mode) @ w_cols.t()
        if ctx.needs_input_grad[1]:
            g_t = mx_round(g.t(), r.grad_elem, r.scale_mode)  # [N, M], blocks along M
            x_t = mx_round(x.t(), r.elem, r.scale_mode)  # [K, M]
            grad_w = (g_t @ x_t.t()).to(weight.dtype)
        return grad_x, grad_w, None


def mx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              recipe: str | MXTrainingRecipe = "mxfp8") -> torch.Tensor:
    """F.linear with emulated MX GEMMs in forward and backward; x [..., K], weight [N, K]."""
    recipe = as_mx_recipe(recipe)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    device_type = x.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else x.dtype)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(device_type):
        raise TypeError(f"input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    with torch.autocast(device_type, enabled=False):
        y = _MXMatmul.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype), recipe)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class MXTrainingLinear(nn.Linear):
    """nn.Linear trained with emulated MX GEMMs; same Parameters, same state_dict keys."""

    recipe: MXTrainingRecipe

    @classmethod
    def from_linear(cls, linear: nn.Linear,
                    recipe: str | MXTrainingRecipe = "mxfp8") -> MXTrainingLinear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe = as_mx_recipe(recipe)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mx_linear(x, self.weight, self.bias, self.recipe)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


@dataclass
class MXTrainingSummary:
    """Converted modules (name -> recipe) and skipped ones (name -> reason)."""

    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def why_not_mx(linear: nn.Linear) -> str | None:
    if isinstance(linear, MXTrainingLinear):
        return "already an MXTrainingLinear"
    if type(linear.weight.data) is not torch.Tensor:
        return f"weight is a {type(linear.weight.data).__name__}, not a plain tensor"
    if linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {linear.weight.dtype} is not float32/bfloat16/float16"
    bad = [f"{name}={size}" for name, size in (("in_features", linear.in_features),
                                                ("out_features", linear.out_features))
           if size % mx.MX_BLOCK]
    if bad:  # both are contraction dims of some GEMM (the token count is padded instead)
        return f"MX GEMMs need in/out features divisible by {mx.MX_BLOCK} ({', '.join(bad)})"
    return None


def convert_to_mx_training(
    model: nn.Module,
    recipe: str | MXTrainingRecipe = "mxfp8",
    module_filter: ModuleFilter | None = None,
) -> MXTrainingSummary:
    """Make the chosen nn.Linear layers of `model` train with emulated MX GEMMs, in place.

    module_filter(module, fqn) -> bool picks among the nn.Linear modules (default: all).
    Layers that cannot take MX are left as they are and named, with the reason, in the
    summary and one warning.
    """
    recipe = as_mx_recipe(recipe)
    converted, skipped = swap_linears(
        model, module_filter, why_not_mx,
        lambda linear: MXTrainingLinear.from_linear(linear, recipe), "MX training",
    )
    return MXTrainingSummary(dict.fromkeys(converted, recipe.name), skipped)
