"""Config -> quantized weight: one handler per config type.

A handler takes a float weight and returns a lowbit tensor, or raises `UnsupportedWeight`
with the reason the layer is skipped. Calibration algorithms register handlers the same
way, so `quantize_` never needs to know which config it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.formats import PerGroup, PerTensor
from lowbit.formats.granularity import PerAxis
from lowbit.quantize.configs import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    QuantConfig,
)
from lowbit.tensors import Float8Weight, IntWeight, LowbitTensor
from lowbit.tensors.conv import as_conv_weight

Handler = Callable[[QuantConfig, torch.Tensor], LowbitTensor]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return register


def quantize_weight(config: QuantConfig, weight: torch.Tensor) -> LowbitTensor:
    """Quantize one float weight with `config` (no module involved)."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantization handler for {type(config).__name__}")
    if weight.dim() == 4:  # a Conv2d kernel: quantized as its [out, in/groups * kh * kw] matrix
        return as_conv_weight(handler(config, weight.detach().flatten(1)), weight.shape)
    return handler(config, weight.detach())


@register_handler(Int8WeightOnly)
def _int8_weight_only(config: Int8WeightOnly, w: torch.Tensor) -> LowbitTensor:
    return IntWeight.from_float(w, 8, config.granularity)


@register_handler(Int8DynamicActivationInt8Weight)
def _int8_dynamic(config, w):
    return IntWeight.from_float(w, 8, PerAxis(0), act_quant="int8_per_token")


@register_handler(Int4WeightOnly)
def _int4_weight_only(config: Int4WeightOnly, w):
    return IntWeight.from_float(w, 4, PerGroup(config.group_size), "asymmetric", config.zero)


@register_handler(IntxWeightOnly)
def _intx_weight_only(config: IntxWeightOnly, w):
    return IntWeight.from_float(w, config.bits, config.granularity, config.mapping, config.zero)


@register_handler(Float8WeightOnly)
def _float8_weight_only(config: Float8WeightOnly, w):
    return Float8Weight.from_float(w, PerAxis(0), config.fp8_format)


@register_handler(Float8DynamicActivationFloat8Weight)
def _float8_dynamic(config: Float8DynamicActivationFloat8Weight, w):
    per_tensor = isinstance(config.granularity, PerTensor)
    act = "per_tensor" if per_tensor else "per_row"
    return Float8Weight.from_float(w, config.granularity, "e4m3", act_quant=act)


@register_handler(Int8DynamicActivationInt4Weight)
def _int8_act_int4_weight(config: Int8DynamicActivationInt4Weight, w):
    return IntWeight.from_float(
        w, 4, PerGroup(config.group_size), "symmetric", act_quant="int8_per_token_asym"
    )
