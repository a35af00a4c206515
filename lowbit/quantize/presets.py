"""Short, stable names for the main configs (the CLI, the demo and benchmarks use them)."""

from __future__ import annotations

import difflib

from lowbit.formats import PerGroup, PerRow, PerTensor
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
)
from lowbit.quantize.mx_configs import (
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
)

PRESETS: dict[str, QuantConfig] = {
    "int8": Int8WeightOnly(),
    "int8-dynamic": Int8DynamicActivationInt8Weight(),
    "int4-g128": Int4WeightOnly(group_size=128),
    "int4-g64": Int4WeightOnly(group_size=64),
    "int4-g64-float-zero": Int4WeightOnly(group_size=64, zero="float"),
    "int3-g64": IntxWeightOnly(3, PerGroup(64), "asymmetric", "int"),
    "int2-g32": IntxWeightOnly(2, PerGroup(32), "asymmetric", "float"),
    "fp8": Float8WeightOnly(),
    "fp8-dynamic": Float8DynamicActivationFloat8Weight(PerRow()),
    "fp8-dynamic-tensorwise": Float8DynamicActivationFloat8Weight(PerTensor()),
    "int8-dynamic-int4-g32": Int8DynamicActivationInt4Weight(group_size=32),
    "mxfp8": MXWeightOnly("fp8_e4m3"),
    "mxfp6": MXWeightOnly("fp6_e2m3"),
    "mxfp4": MXWeightOnly("fp4_e2m1"),
    "nvfp4": NVFP4WeightOnly(),
    "mxfp8-dynamic": MXDynamicActivationMXWeight("fp8_e4m3"),
    "nvfp4-dynamic": NVFP4DynamicActivationNVFP4Weight(),
}


def preset(name: str) -> QuantConfig:
    """The config called `name`; a typo gets the closest valid name."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config {name!r}.{hint} Valid: {', '.join(PRESETS)}")
