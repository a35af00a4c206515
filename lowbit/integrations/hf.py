"""HF transformers: a `quantization_config` that quantizes while loading, and reloads saved folders.

Importing this module registers the ``"lowbit"`` quantization method with transformers
through its public extension points (`register_quantization_config`, `register_quantizer`):

    from lowbit.integrations.hf import LowbitConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig("int4-g64"))
    model.save_pretrained(out)                      # safetensors + config.json
    model = AutoModelForCausalLM.from_pretrained(out)  # quantized again, no re-quantization

Quantize-on-load: transformers streams each checkpoint tensor through `get_quantize_ops()`,
so every nn.Linear weight is quantized as it arrives and no full-precision copy of the whole
model is held. A saved folder stores each lowbit tensor's fields as ``<key>:<field>`` plus a
``lowbit`` JSON entry, exactly as `save_quantized` does; reloading rebuilds them from that
description before transformers loads the plain tensors.

The output embedding (and anything tied to it) stays in full precision by default, the
transformers convention; pass `modules_to_not_convert=[]` to quantize it too. Needs
transformers >= 5 (its loading engine is what offers per-tensor quantize ops).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lowbit.integrations.checkpoint import (
    TENSOR_CLASSES,
    build_tensors,
    flatten_state,
    parse_metadata,
)
from lowbit.quantize.configs import QuantConfig, config_from_dict
from lowbit.quantize.handlers import quantize_weight
from lowbit.quantize.presets import preset
from lowbit.tensors import LowbitTensor, UnsupportedWeight

try:
    import transformers
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # transformers missing, or older than the loading engine this uses
    raise ModuleNotFoundError(
        "lowbit's transformers integration needs transformers >= 5 "
        f"(`pip install 'lowbit[hf]'`): {e}"
    ) from e

QUANT_METHOD = "lowbit"


def _resolve(config: str | dict | QuantConfig) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    raise TypeError(f"config must be a preset name, a config dict or a QuantConfig, not {config!r}")


class LowbitConfig(QuantizationConfigMixin):
    """The `quantization_config` for lowbit: a preset name (``"int4-g64"``), a lowbit
    `QuantConfig`, or its JSON dict. `config.json` stores the JSON dict, so a saved folder
    records exactly which format each weight has."""

    def __init__(
        self,
        config: str | dict | QuantConfig = "int8",
        modules_to_not_convert: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.config = _resolve(config).to_dict()
        self.modules_to_not_convert = modules_to_not_convert

    @property
    def lowbit_config(self) -> QuantConfig:
        return config_from_dict(self.config)


def _skipped_by(name: str, patterns: list[str]) -> bool:
    """A module named by `patterns`: an exact name, a dotted prefix, or a suffix."""
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in patterns)


class _QuantizeOnLoad(ConversionOps):
    """Quantizes one checkpoint tensor as transformers loads it."""

    def __init__(self, quantizer: LowbitHfQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        dtype = self.quantizer.dtype
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        try:
            q = quantize_weight(self.quantizer.quantization_config.lowbit_config, value)
        except UnsupportedWeight as e:
            self.quantizer.skipped[full_layer_name] = str(e)
            return {full_layer_name: value}
        except ValueError as e:
            raise ValueError(f"cannot quantize {full_layer_name}: {e}") from None
        return {full_layer_name: nn.Parameter(q, requires_grad=False)}


class _Deserialize(ConversionOps):
    """Rebuilds one stored lowbit weight from its ``weight:<field>`` entries."""

    def __init__(self, quantizer: LowbitHfQuantizer) -> None:
        self.hf_quantizer = quantizer  # the name tells transformers not to cast the fields

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        description = self.hf_quantizer.description["tensors"].get(full_layer_name)
        if description is None:
            raise ValueError(f"{full_layer_name} has stored fields but no lowbit description")
        raw = {}
        for pattern, value in input_dict.items():
            field = pattern.rpartition(":")[2]
            raw[f"{full_layer_name}:{field}"] = value[0] if isinstance(value, list) else value
        meta = {"tensors": {full_layer_name: description}}
        q = build_tensors(raw, meta, full_layer_name)[full_layer_name]
        return {full_layer_name: nn.Parameter(q, requires_grad=False)}


class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of lowbit: which weights to quantize, how to save and reload them."""

    requires_calibration = False

    def __init__(self, quantization_config: LowbitConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None
        self.skipped: dict[str, str] = {}
        self.modules_to_not_convert: list[str] = []
        self.description: dict = {}

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        if self.pre_quantized:
            self.description = _read_description(checkpoint_files or [])
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return (
            isinstance(module, nn.Linear)
            and tensor_name == "weight"
            and not _skipped_by(module_name, self.modules_to_not_convert)
        )

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """A stored lowbit weight arrives as ``weight:<field>`` entries (see checkpoint.py)."""
        if not self.pre_quantized:
            return {}
        fields = sorted({f for cls in TENSOR_CLASSES.values() for f in cls.tensor_fields})
        return {"weight": [f"weight:{f}" for f in fields]}

    def get_load_operations(self) -> dict:
        return {"deserialize": _Deserialize}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.skipped:
            names = ", ".join(f"{n} ({r})" for n, r in self.skipped.items())
            warnings.warn(f"lowbit kept {len(self.skipped)} weights in full precision: {names}",
                          stacklevel=2)
        return model

    def get_state_dict_and_metadata(self, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta = flatten_state(
            model.state_dict(keep_vars=True), self.quantization_config.lowbit_config
        )
        return tensors, {"lowbit": json.dumps(meta)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _read_description(checkpoint_files: list[str]) -> dict:
    """The validated ``lowbit`` JSON entry of a saved folder (every shard carries the same)."""
    files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            entry = (f.metadata() or {}).get("lowbit")
        if entry is not None:
            return parse_metadata(entry, path)
    where = Path(files[0]).parent if files else "the folder"
    raise ValueError(f"{where} says it is lowbit-quantized (config.json) but holds no "
                     "safetensors file with a lowbit description")


def is_lowbit_quantized(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a lowbit tensor."""
    return any(isinstance(p, LowbitTensor) for p in model.parameters())


def attach_config(model: nn.Module, config: QuantConfig,
                  modules_to_not_convert: list[str] | None = None) -> None:
    """Mark a model that lowbit's `quantize_` already quantized (for example with calibration)
    so that `save_pretrained` writes a folder `from_pretrained` reloads."""
    hf_config = LowbitConfig(config, modules_to_not_convert)
    model.config.quantization_config = hf_config
    model.hf_quantizer = LowbitHfQuantizer(hf_config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LowbitConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "attach_config", "is_lowbit_quantized",
           "transformers"]
