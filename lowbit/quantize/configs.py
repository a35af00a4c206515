"""Quantization configs: frozen dataclasses with a stable JSON form and a version.

A config says *what* format a weight gets; `handlers.py` says *how* to produce it. The
JSON form ({"type": ..., "version": ..., "fields": {...}}) is what checkpoints store, and
`config_from_dict` refuses unknown types and versions newer than this code knows.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar

from lowbit.formats.granularity import (
    Granularity,
    PerAxis,
    PerGroup,
    PerTensor,
    granularity_from_dict,
    granularity_to_dict,
)

_CONFIGS: dict[str, type[QuantConfig]] = {}


class ConfigError(ValueError):
    """A config that cannot be built or read (unknown name, bad field, too new)."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    VERSION: ClassVar[int] = 1
    # Whether the config also quantizes activations (only linear layers can take it).
    dynamic_activations: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CONFIGS[cls.__name__] = cls

    def to_dict(self) -> dict:
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Granularity):
                v = granularity_to_dict(v)
            elif isinstance(v, QuantConfig):
                v = v.to_dict()
            fields[f.name] = v
        return {"type": type(self).__name__, "version": self.VERSION, "fields": fields}


def config_from_dict(d: dict) -> QuantConfig:
    name, version = d.get("type"), d.get("version", 1)
    if name not in _CONFIGS:
        close = difflib.get_close_matches(str(name), _CONFIGS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config type {name!r}{hint}")
    cls = _CONFIGS[name]
    if version > cls.VERSION:
        raise ConfigError(
            f"{name} version {version} is newer than this lowbit understands "
            f"(max {cls.VERSION}); upgrade lowbit to read it"
        )
    fields = {}
    for key, v in d.get("fields", {}).items():
        if isinstance(v, dict) and "type" in v and "fields" in v:
            v = config_from_dict(v)
        elif isinstance(v, dict) and "type" in v:
            v = granularity_from_dict(v)
        fields[key] = v
    try:
        return cls(**fields)
    except TypeError as e:
        raise ConfigError(f"bad fields for {name}: {e}") from None


def _check_group(group_size: int) -> None:
    if group_size <= 0:
        raise ConfigError(f"group_size must be positive, got {group_size}")


def _check_zero(zero: str) -> None:
    if zero not in ("int", "float"):
        raise ConfigError(f"zero must be 'int' or 'float', got {zero!r}")


@dataclasses.dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """Symmetric int8 weights, per output channel (or per group along K)."""

    granularity: Granularity = PerAxis(0)

    def __post_init__(self) -> None:
        if not isinstance(self.granularity, (PerAxis, PerGroup, PerTensor)):
            raise ConfigError(
                f"Int8WeightOnly takes PerRow/PerGroup/PerTensor, not {self.granularity}"
            )


@dataclasses.dataclass(frozen=True)
class Int8DynamicActivationInt8Weight(QuantConfig):
    """Per-token dynamic int8 activations x per-channel int8 weights (int8 GEMM)."""

    dynamic_activations: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """Asymmetric int4 weights in groups along K; integer zero (AWQ/GPTQ style) or float
    zero (HQQ/GGUF style)."""

    group_size: int = 128
    zero: str = "int"

    def __post_init__(self) -> None:
        _check_group(self.group_size)
        _check_zero(self.zero)


@dataclasses.dataclass(frozen=True)
class IntxWeightOnly(QuantConfig):
    """1..8-bit weights with any granularity and mapping (packed along K)."""

    bits: int = 4
    granularity: Granularity = PerGroup(32)
    mapping: str = "symmetric"
    zero: str = "int"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"bits must be in 1..8, got {self.bits}")
        if self.mapping not in ("symmetric", "asymmetric"):
            raise ConfigError(f"mapping must be symmetric or asymmetric, got {self.mapping!r}")
        if self.mapping == "symmetric" and self.bits < 2:
            raise ConfigError("1-bit weights need mapping='asymmetric'")
        _check_zero(self.zero)


@dataclasses.dataclass(frozen=True)
class Float8WeightOnly(QuantConfig):
    """Float8 weights with per-row float32 scales; activations stay in high precision."""

    fp8_format: str = "e4m3"

    def __post_init__(self) -> None:
        if self.fp8_format not in ("e4m3", "e5m2"):
            raise ConfigError(f"fp8_format must be e4m3 or e5m2, got {self.fp8_format!r}")


@dataclasses.dataclass(frozen=True)
class Float8DynamicActivationFloat8Weight(QuantConfig):
    """Dynamic e4m3 activations x e4m3 weights; PerRow (rowwise) or PerTensor scales."""

    dynamic_activations: ClassVar[bool] = True
    granularity: Granularity = PerAxis(0)

    def __post_init__(self) -> None:
        ok = isinstance(self.granularity, PerTensor) or self.granularity == PerAxis(0)
        if not ok:
            raise ConfigError(
                f"granularity must be PerRow() or PerTensor(), got {self.granularity}"
            )


@dataclasses.dataclass(frozen=True)
class Int8DynamicActivationInt4Weight(QuantConfig):
    """Per-token asymmetric int8 activations x symmetric int4 group weights (ExecuTorch 8da4w)."""

    dynamic_activations: ClassVar[bool] = True
    group_size: int = 32

    def __post_init__(self) -> None:
        _check_group(self.group_size)
