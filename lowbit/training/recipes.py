"""Float8 training recipes: how each of a linear's three GEMMs is cast to fp8.

A linear y = x W^T runs three GEMMs per step: the forward (x, W), grad-input (dy, W) and
grad-weight (dy, x). A recipe fixes, for all three, the scaling granularity, the fp8 format of
the forward operands and of the gradient, whether scales are powers of 2, and whether the
grad-weight GEMM stays in high precision. Scales are always dynamic: computed from the tensor
being cast, in the same step, on the device (no host sync).

The named recipes:

- ``tensorwise``: one scale per tensor, e4m3 forward, e5m2 gradients (wider range, the
  gradient's amax is the least predictable). Fastest: one cast per tensor is reused by the
  GEMMs that need it transposed.
- ``rowwise``: one scale per row along the GEMM's contraction dim, e4m3 everywhere,
  power-of-2 scales (exact rescaling, less jitter). Each tensor is cast once per GEMM axis.
- ``rowwise_with_gw_hp``: as ``rowwise`` for forward and grad-input; grad-weight computed in
  the model's dtype, which keeps weight updates accurate when rows have outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GRANULARITIES = ("tensor", "row")
RECIPE_NAMES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@dataclass(frozen=True)
class Float8TrainingRecipe:
    """What a Float8TrainingLinear casts, to which format, at which granularity.

    Frozen and hashable: torch.compile treats it as a constant of the graph.
    """

    name: str
    granularity: str  # "tensor" or "row"
    forward_dtype: torch.dtype = torch.float8_e4m3fn
    grad_dtype: torch.dtype = torch.float8_e4m3fn
    power_of_2_scales: bool = False
    grad_weight_high_precision: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        for field_name in ("forward_dtype", "grad_dtype"):
            if getattr(self, field_name) not in fp8:
                raise ValueError(
                    f"{field_name} must be float8_e4m3fn or float8_e5m2, "
                    f"got {getattr(self, field_name)}"
                )

    @property
    def rowwise(self) -> bool:
        return self.granularity == "row"

    @classmethod
    def from_name(cls, name: str, power_of_2_scales: bool | None = None) -> Float8TrainingRecipe:
        """A named recipe (see the module docstring); power_of_2_scales overrides its default."""
        if name == "tensorwise":
            recipe = cls(name, "tensor", grad_dtype=torch.float8_e5m2)
        elif name == "rowwise":
            recipe = cls(name, "row", power_of_2_scales=True)
        elif name == "rowwise_with_gw_hp":
            recipe = cls(name, "row", power_of_2_scales=True, grad_weight_high_precision=True)
        else:
            raise ValueError(f"unknown float8 training recipe {name!r}; choose one of "
                             f"{RECIPE_NAMES} or pass a Float8TrainingRecipe")
        if power_of_2_scales is not None:
            recipe = replace(recipe, power_of_2_scales=power_of_2_scales)
        return recipe


def as_recipe(recipe: str | Float8TrainingRecipe) -> Float8TrainingRecipe:
    if isinstance(recipe, Float8TrainingRecipe):
        return recipe
    if isinstance(recipe, str):
        return Float8TrainingRecipe.from_name(recipe)
    raise TypeError(f"recipe must be a name or a Float8TrainingRecipe, got {type(recipe)}")
