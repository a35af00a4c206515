"""Configs, handlers and the `quantize_` entry point."""

from lowbit.quantize.api import ModuleConfigs, QuantizeSummary, is_linear, quantize_
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
from lowbit.quantize.handlers import quantize_weight, register_handler
from lowbit.quantize.presets import PRESETS, preset

__all__ = [
    "ConfigError",
    "Float8DynamicActivationFloat8Weight",
    "Float8WeightOnly",
    "Int4WeightOnly",
    "Int8DynamicActivationInt4Weight",
    "Int8DynamicActivationInt8Weight",
    "Int8WeightOnly",
    "IntxWeightOnly",
    "ModuleConfigs",
    "PRESETS",
    "QuantConfig",
    "QuantizeSummary",
    "config_from_dict",
    "is_linear",
    "preset",
    "quantize_",
    "quantize_weight",
    "register_handler",
]
