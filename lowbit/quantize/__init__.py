"""Configs, handlers and the `quantize_` entry point."""

from lowbit.quantize.api import ModuleConfigs, QuantizeSummary, is_conv2d, is_linear, quantize_
from lowbit.quantize.bias_correction import correct_bias
from lowbit.quantize.calibration import AWQ, GPTQ, HQQ, SmoothQuant
from lowbit.quantize.configs import (
    ConfigError,
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    QuantConfig,
    config_from_dict,
)
from lowbit.quantize.conv_gptq import round_gptq_
from lowbit.quantize.handlers import quantize_weight, register_handler
from lowbit.quantize.mx_configs import (
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
)
from lowbit.quantize.presets import PRESETS, preset

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "SmoothQuant",
    "ConfigError",
    "Float8DynamicActivationFloat8Weight",
    "Float8WeightOnly",
    "Int4WeightOnly",
    "Int8DynamicActivationInt4Weight",
    "Int8DynamicActivationInt8Weight",
    "Int8WeightOnly",
    "IntxWeightOnly",
    "MXDynamicActivationMXWeight",
    "MXWeightOnly",
    "ModuleConfigs",
    "NVFP4DynamicActivationNVFP4Weight",
    "NVFP4WeightOnly",
    "PRESETS",
    "QuantConfig",
    "QuantizeSummary",
    "config_from_dict",
    "correct_bias",
    "round_gptq_",
    "is_conv2d",
    "is_linear",
    "preset",
    "quantize_",
    "quantize_weight",
    "register_handler",
]
