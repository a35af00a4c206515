"""lowbit: low-precision formats, quantization and kernels for PyTorch.

    import lowbit
    summary = lowbit.quantize_(model, lowbit.Int4WeightOnly(group_size=128))
    lowbit.save_quantized(model, "model.safetensors")
"""

from lowbit.formats import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken
from lowbit.integrations import (
    CheckpointError,
    load_quantized,
    register_tensor_class,
    save_quantized,
)
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    ModuleConfigs,
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
    QuantizeSummary,
    quantize_,
)
from lowbit.sparsity import Sparse24, Sparse24Weight, sparsify_  # also registers it for checkpoints
from lowbit.tensors import Float8Weight, IntWeight
from lowbit.tensors.mx_weight import MXWeight, NVFP4Weight
from lowbit.training import convert_to_float8_training

# MX/NVFP4 weights may sit in checkpoints (integrations lists only the core classes itself).
register_tensor_class(MXWeight)
register_tensor_class(NVFP4Weight)

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
    "MXDynamicActivationMXWeight",
    "MXWeight",
    "MXWeightOnly",
    "ModuleConfigs",
    "NVFP4DynamicActivationNVFP4Weight",
    "NVFP4Weight",
    "NVFP4WeightOnly",
    "PerAxis",
    "PerBlock",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "PerToken",
    "QuantizeSummary",
    "Sparse24",
    "Sparse24Weight",
    "convert_to_float8_training",
    "load_quantized",
    "quantize_",
    "save_quantized",
    "sparsify_",
]
