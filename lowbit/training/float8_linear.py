"""`Float8TrainingLinear`: an nn.Linear whose forward, grad-input and grad-weight GEMMs run in fp8.

The weight stays a plain high-precision Parameter (the optimizer's master copy, under the same
state_dict key); each step casts it, the input and the output gradient to fp8 with fresh
dynamic scales. A module is swapped rather than the weight alone because the backward changes
too: autograd has to see the fp8 grad GEMMs.

No Python autograd.Function: torch 2.11's dynamo traced the earlier one's backward through a
fallback (taken because the CUDA GEMM wrapper reads strides) that gave all-zero compiled
gradients. Instead the matmul is the op `lowbit::float8_train_mm_v2` (`fp8_gemm.TRAIN_MM_OP`,
versioned: see there) with its formula registered by `torch.library.register_autograd`.
Dynamo sees the forward casts and one `float8_train_mm` call. The op is a
`torch.library.triton_op`, not an opaque `custom_op`: AOT autograd traces its body (plain
tensor code around `fp8_gemm.scaled_mm`) and the registered backward (casts of the gradient
and two GEMMs) with make_fx, the path every aten op's derivative takes. So the compiled step
calls `aten._scaled_mm` directly, with no Python per GEMM (an opaque op cost ~100-150 us of
host time per call, which held back FSDP2 steps and small models). The casts stay plain
tensor code on both sides, so inductor fuses them. The recipe crosses the op boundary as
primitive arguments (bool, dtype), which op schemas take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.training import fp8_gemm
from lowbit.training.fp8_gemm import TRAIN_MM_OP, cast_fp8
from lowbit.training.fsdp import Float8GatheredWeight
from lowbit.training.recipes import Float8TrainingRecipe, as_recipe


@torch.library.triton_op(TRAIN_MM_OP, mutates_args=())
def float8_train_mm(
    x: Tensor,
    weight: Tensor,
    xq: Tensor,
    xs: Tensor,
    wq: Tensor,
    ws: Tensor,
    rowwise: bool,
    grad_dtype: torch.dtype,
    power_of_2: bool,
    grad_weight_hp: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """y = (xq * xs) @ (wq * ws)^T: the fp8 forward GEMM of x [M, K] and W [N, K].

    xq, wq and their scales are the forward casts of x and W (made by the caller, where
    torch.compile can fuse them). x and W are inputs so that autograd routes their gradients
    through the formula registered below; the rest of the recipe (grad_dtype, power_of_2,
    grad_weight_hp) is here because that formula needs it.
    """
    # Fast (lower-precision) accumulation only in the forward, as is usual for fp8 training:
    # gradients accumulate over the token dim, where it would hurt most.
    # Autocast would run the emulated GEMM in bfloat16: the op fixes its own precision.
    with torch.autocast(x.device.type, enabled=False):
        return fp8_gemm.scaled_mm(xq, xs, wq.t(), ws.t(), out_dtype, True)


@float8_train_mm.register_fake
def _(x, weight, xq, xs, wq, ws, rowwise, grad_dtype, power_of_2, grad_weight_hp, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, xq, xs, wq, ws, rowwise, grad_dtype, power_of_2, grad_weight_hp, _ = inputs
    if rowwise:
        # Backward scales along the other axis, so it re-casts from high precision.
        ctx.save_for_backward(x, weight)
    else:
        # One scale per tensor serves both axes: keep the 1-byte casts. (Saving transposed
        # copies made in the forward instead was measured: same step time, +10 GiB peak on
        # 32 Llama-3-8B layers.)
        ctx.save_for_backward(xq, xs, wq, ws)
    ctx.recipe_args = (rowwise, xq.dtype, grad_dtype, power_of_2, grad_weight_hp)
    ctx.dtypes = (x.dtype, weight.dtype)


def _gemm_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a row-major, b column-major: the layouts cuBLASLt's fp8 GEMM takes. Made here, in traced
    code, so inductor fuses each transpose into the cast that produces the operand; inside the
    opaque GEMM op the same fix-up would be an extra strided copy per operand (about a sixth of
    a tensorwise step on an H200 before this)."""
    return a.contiguous(), b.t().contiguous().t()


def _backward(ctx, grad_y):
    """grad_x, grad_w in fp8 (see recipes.py). Plain tensor code: AOT autograd traces it,
    GEMMs included, into the compiled backward."""
    rowwise, fwd_dtype, grad_dtype, pow2, gw_hp = ctx.recipe_args
    x_dtype, w_dtype = ctx.dtypes
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x = grad_w = None
    # The gradient GEMM of grad_weight_hp must not drop to an autocast dtype.
    with torch.autocast(grad_y.device.type, enabled=False):
        gq, gs = cast_fp8(grad_y, grad_dtype, rowwise, pow2, axis=1)
        if not rowwise:
            xq, xs, wq, ws = ctx.saved_tensors
            if need_x:
                a, b = _gemm_operands(gq, wq)
                grad_x = fp8_gemm.scaled_mm(a, gs, b, ws, x_dtype)
            if need_w:
                a, b = _gemm_operands(gq.t(), xq)
                grad_w = fp8_gemm.scaled_mm(a, gs, b, xs, w_dtype)
        else:
            x, weight = ctx.saved_tensors
            if need_x:
                wq, ws = cast_fp8(weight, fwd_dtype, True, pow2, axis=0)
                a, b = _gemm_operands(gq, wq)
                grad_x = fp8_gemm.scaled_mm(a, gs, b, ws, x_dtype)
            if need_w and gw_hp:
                grad_w = (grad_y.t() @ x.to(grad_y.dtype)).to(w_dtype)
            elif need_w:
                gq0, gs0 = cast_fp8(grad_y, grad_dtype, True, pow2, axis=0)
                xq0, xs0 = cast_fp8(x, fwd_dtype, True, pow2, axis=0)
                a, b = _gemm_operands(gq0.t(), xq0)
                grad_w = fp8_gemm.scaled_mm(a, gs0.t(), b, xs0, w_dtype)
    return (grad_x, grad_w) + (None,) * 9


float8_train_mm.register_autograd(_backward, setup_context=_setup_context)


def float8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    recipe: str | Float8TrainingRecipe,
) -> torch.Tensor:
    """F.linear with fp8 GEMMs in forward and backward; x [..., K], weight [N, K].

    Under autocast the GEMMs write the autocast dtype, as F.linear would; otherwise x and
    weight must share a floating dtype.
    """
    recipe = as_recipe(recipe)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
    elif x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    else:
        out_dtype = x.dtype
    in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {in_features}")
    x2d = x.reshape(-1, in_features)
    # The casts are not differentiable: gradients reach x and W through float8_train_mm.
    xq, xs = cast_fp8(x2d.detach(), recipe.forward_dtype, recipe.rowwise,
                      recipe.power_of_2_scales, axis=1)
    if isinstance(weight, Float8GatheredWeight):  # cast before FSDP2's all-gather
        if recipe.rowwise:
            raise ValueError("an fp8-all-gathered weight has one scale per tensor; the "
                             f"{recipe.name} recipe needs per-row scales")
        wq, ws = weight._data, weight._scale
    else:
        wq, ws = cast_fp8(weight.detach(), recipe.forward_dtype, recipe.rowwise,
                          recipe.power_of_2_scales, axis=1)
    # Autocast does not touch custom op inputs, and the op disables it for its own math.
    y = float8_train_mm(x2d, weight, xq, xs, wq, ws, recipe.rowwise, recipe.grad_dtype,
                        recipe.power_of_2_scales, recipe.grad_weight_high_precision, out_dtype)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(out_dtype)


def plain_linear(linear: nn.Linear) -> nn.Linear:
    """A plain nn.Linear holding `linear`'s own Parameters (what training linears convert
    back to): built on the meta device, so nothing is allocated or copied."""
    with torch.device("meta"):
        plain = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
    plain.weight = linear.weight
    plain.bias = linear.bias
    plain.train(linear.training)
    return plain


class Float8TrainingLinear(nn.Linear):
    """nn.Linear trained with fp8 GEMMs; same parameters, same state_dict keys.

    `eval_fp8` picks the eval-mode forward: fp8 like training (what the trained model saw) or
    plain high precision. `to_linear()` gives back a plain nn.Linear sharing the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        recipe: str | Float8TrainingRecipe = "tensorwise",
        eval_fp8: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = as_recipe(recipe)
        self.eval_fp8 = eval_fp8

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: str | Float8TrainingRecipe = "tensorwise",
        eval_fp8: bool = True,
    ) -> Float8TrainingLinear:
        """Wrap `linear`'s own Parameter objects, so optimizers and ties that hold them keep
        working."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                      recipe=recipe, eval_fp8=eval_fp8)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the same Parameters (for export and inference)."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.eval_fp8:
            return F.linear(x, self.weight, self.bias)
        return float8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, eval_fp8={self.eval_fp8}"
