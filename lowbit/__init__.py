"""lowbit: low-precision formats, quantization and kernels for PyTorch.

    import lowbit
    summary = lowbit.quantize_(model, lowbit.Int4WeightOnly(group_size=128))
    lowbit.save_quantized(model, "model.safetensors")
"""

from lowbit.formats import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken
from lowbit.integrations import CheckpointError, load_quantized, save_quantized
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    ModuleConfigs,
    QuantizeSummary,
    quantize_,
)
from lowbit.tensors import Float8Weight, IntWeight

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Float8DynamicActivationFloat8Weight",
    "Float8Weight",
    "Float8WeightOnly",
    "Int4WeightOnly",
    "Int8DynamicActivationInt4Weight",
    "Int8DynamicActivationInt8Weight",
    "Int8WeightOnly",
    "IntWeight",
    "IntxWeightOnly",
    "ModuleConfigs",
    "PerAxis",
    "PerBlock",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "PerToken",
    "QuantizeSummary",
    "load_quantized",
    "quantize_",
    "save_quantized",
]
