"""Swap a model's linears for fp8 training linears, and back.

`convert_to_float8_training` never converts silently wrong: a linear the fp8 GEMM cannot take
(feature counts not multiples of 16, a non-float or quantized weight) stays as it is, and the
returned summary names it with the reason. Parameters are reused, not copied, so optimizers
built before the conversion, tied weights and state_dict keys are unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.training.float8_linear import Float8TrainingLinear
from lowbit.training.fp8_gemm import FP8_GEMM_ALIGN
from lowbit.training.recipes import Float8TrainingRecipe, as_recipe

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass
class Float8TrainingSummary:
    """What a conversion did: converted modules (name -> recipe) and skipped ones (-> reason)."""

    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linears, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def why_not_fp8(linear: nn.Linear) -> str | None:
    """The reason `linear` cannot train with fp8 GEMMs, or None."""
    if isinstance(linear, Float8TrainingLinear):
        return "already a Float8TrainingLinear"
    weight = linear.weight
    if type(weight.data) is not torch.Tensor:
        return f"weight is a {type(weight.data).__name__}, not a plain tensor"
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {weight.dtype} is not float32/bfloat16/float16"
    bad = {
        name: size
        for name, size in (("in_features", linear.in_features), ("out_features",
                                                                   linear.out_features))
        if size % FP8_GEMM_ALIGN
    }
    if bad:
        sizes = ", ".join(f"{name}={size}" for name, size in bad.items())
        return f"fp8 GEMMs need in/out features divisible by {FP8_GEMM_ALIGN} ({sizes})"
    return None


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def swap_linears(
    model: nn.Module,
    module_filter: ModuleFilter | None,
    why_not: Callable[[nn.Linear], str | None],
    make: Callable[[nn.Linear], nn.Module],
    what: str,
) -> tuple[list[str], dict[str, str]]:
    """Replace each chosen nn.Linear that `why_not` accepts with `make(linear)`, in place.

    Returns (converted names, skipped name -> reason); the skips also go to one warning that
    names `what` (the training mode). Shared by the fp8 and MX conversions."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)}")
    if isinstance(model, nn.Linear):
        raise TypeError("convert the module that holds the linear (the root cannot be swapped)")
    swaps, skipped = [], {}
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module_filter is not None and not module_filter(module, fqn):
            continue
        reason = why_not(module)
        if reason is not None:
            skipped[fqn] = reason
            continue
        swaps.append((fqn, make(module)))
    for fqn, new in swaps:
        _set_child(model, fqn, new)
    if skipped:
        names = ", ".join(f"{n} ({r})" for n, r in skipped.items())
        warnings.warn(f"{what} skipped {len(skipped)} linears: {names}", stacklevel=3)
    return [fqn for fqn, _ in swaps], skipped


def convert_to_float8_training(
    model: nn.Module,
    recipe: str | Float8TrainingRecipe = "tensorwise",
    module_filter: ModuleFilter | None = None,
    *,
    eval_fp8: bool = True,
) -> Float8TrainingSummary:
    """Make the chosen nn.Linear layers of `model` train with fp8 GEMMs, in place.

    recipe: "tensorwise", "rowwise", "rowwise_with_gw_hp" or a Float8TrainingRecipe.
    module_filter(module, fqn) -> bool picks among the nn.Linear modules (default: all).
    eval_fp8: eval-mode forward in fp8 (True) or in the weight's precision (False).
    Returns a summary; skipped layers are also reported in one warning.
    """
    recipe = as_recipe(recipe)
    converted, skipped = swap_linears(
        model, module_filter, why_not_fp8,
        lambda linear: Float8TrainingLinear.from_linear(linear, recipe, eval_fp8),
        "float8 training",
    )
    return Float8TrainingSummary(dict.fromkeys(converted, recipe.name), skipped)


def convert_to_linear(model: nn.Module) -> list[str]:
    """Turn every Float8TrainingLinear in `model` back into a plain nn.Linear sharing the same
    parameters (for export, inference quantization or saving); returns the names swapped."""
    swaps = [(fqn, m.to_linear()) for fqn, m in model.named_modules()
             if isinstance(m, Float8TrainingLinear)]
    if any(fqn == "" for fqn, _ in swaps):
        raise TypeError("the root module is a Float8TrainingLinear: call its to_linear()")
    for fqn, new in swaps:
        _set_child(model, fqn, new)
    return [fqn for fqn, _ in swaps]
