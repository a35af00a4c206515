"""Low-precision training: fp8 training linears, their recipes and FSDP2 support.

    from lowbit.training import convert_to_float8_training
    summary = convert_to_float8_training(model, "rowwise", lambda m, fqn: fqn != "output")
"""

from lowbit.training.convert import (
    Float8TrainingSummary,
    convert_to_float8_training,
    convert_to_linear,
    why_not_fp8,
)
from lowbit.training.float8_linear import Float8TrainingLinear, float8_linear
from lowbit.training.fp8_gemm import cast_fp8, emulated_scaled_mm, scaled_mm
from lowbit.training.fsdp import (
    Float8AllGatherWeight,
    Float8GatheredWeight,
    enable_fp8_all_gather,
    precompute_fp8_scales,
)
from lowbit.training.recipes import RECIPE_NAMES, Float8TrainingRecipe

__all__ = [
    "RECIPE_NAMES",
    "Float8AllGatherWeight",
    "Float8GatheredWeight",
    "Float8TrainingLinear",
    "Float8TrainingRecipe",
    "Float8TrainingSummary",
    "cast_fp8",
    "convert_to_float8_training",
    "convert_to_linear",
    "emulated_scaled_mm",
    "enable_fp8_all_gather",
    "float8_linear",
    "precompute_fp8_scales",
    "scaled_mm",
    "why_not_fp8",
]
