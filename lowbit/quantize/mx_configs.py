"""MX and NVFP4 configs and their handlers.

Element names: "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1" (MXFP8, MXFP6,
MXFP4). Scale modes: "floor" (OCP MX v1.0) or "rceil" (round the scale up; nothing
saturates). On Hopper and CPUs these compute by dequantizing; see `lowbit.kernels.mx_ops`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lowbit.formats import mx
from lowbit.quantize.configs import ConfigError, QuantConfig
from lowbit.quantize.handlers import register_handler
from lowbit.tensors.mx_weight import MXWeight, NVFP4Weight


def _check_elem(field: str, elem: str) -> None:
    if elem not in mx.MX_ELEMENTS:
        raise ConfigError(f"{field} must be one of {sorted(mx.MX_ELEMENTS)}, got {elem!r}")


def _check_mode(mode: str) -> None:
    if mode not in mx.SCALE_MODES:
        raise ConfigError(f"scale_mode must be one of {mx.SCALE_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class MXWeightOnly(QuantConfig):
    """MX weights (32-element blocks, E8M0 scales); activations stay in high precision."""

    elem: str = "fp4_e2m1"
    scale_mode: str = "floor"

    def __post_init__(self) -> None:
        _check_elem("elem", self.elem)
        _check_mode(self.scale_mode)


@dataclasses.dataclass(frozen=True)
class MXDynamicActivationMXWeight(QuantConfig):
    """MX weights x activations rounded to MX per call (blocks of 32 along K per token).
    `act_elem` None means the weights' element type."""

    dynamic_activations: ClassVar[bool] = True
    elem: str = "fp8_e4m3"
    act_elem: str | None = None
    scale_mode: str = "floor"

    def __post_init__(self) -> None:
        _check_elem("elem", self.elem)
        if self.act_elem is not None:
            _check_elem("act_elem", self.act_elem)
        _check_mode(self.scale_mode)


@dataclasses.dataclass(frozen=True)
class NVFP4WeightOnly(QuantConfig):
    """NVFP4 weights: E2M1 in blocks of 16 with E4M3 scales and a float32 tensor scale."""


@dataclasses.dataclass(frozen=True)
class NVFP4DynamicActivationNVFP4Weight(QuantConfig):
    """NVFP4 weights x activations rounded to NVFP4 per call (their own tensor scale)."""

    dynamic_activations: ClassVar[bool] = True


@register_handler(MXWeightOnly)
def _mx_weight_only(config: MXWeightOnly, w):
    return MXWeight.from_float(w, config.elem, config.scale_mode)


@register_handler(MXDynamicActivationMXWeight)
def _mx_dynamic(config: MXDynamicActivationMXWeight, w):
    act = config.act_elem or config.elem
    return MXWeight.from_float(w, config.elem, config.scale_mode, act_quant=act)


@register_handler(NVFP4WeightOnly)
def _nvfp4_weight_only(config: NVFP4WeightOnly, w):
    return NVFP4Weight.from_float(w)


@register_handler(NVFP4DynamicActivationNVFP4Weight)
def _nvfp4_dynamic(config: NVFP4DynamicActivationNVFP4Weight, w):
    return NVFP4Weight.from_float(w, act_quant="nvfp4")
