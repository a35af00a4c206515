"""Numerics on plain tensors: granularities, affine int, float8 and bit packing.

No tensor subclasses and no kernels live here; everything else builds on these functions.
"""

from lowbit.formats.affine import AffineSpec, choose_qparams, dequantize, fake_quantize, quantize
from lowbit.formats.fp8 import (
    FP8_DTYPES,
    choose_fp8_scale,
    dequantize_fp8,
    fp8_dtype,
    fp8_max,
    quantize_fp8,
    saturating_cast,
)
from lowbit.formats.granularity import (
    Granularity,
    PerAxis,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    PerToken,
    granularity_from_dict,
    granularity_to_dict,
)
from lowbit.formats.packing import pack_bits, unpack_bits

__all__ = [
    "FP8_DTYPES",
    "AffineSpec",
    "Granularity",
    "PerAxis",
    "PerBlock",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "PerToken",
    "choose_fp8_scale",
    "choose_qparams",
    "dequantize",
    "dequantize_fp8",
    "fake_quantize",
    "fp8_dtype",
    "fp8_max",
    "granularity_from_dict",
    "granularity_to_dict",
    "pack_bits",
    "quantize",
    "quantize_fp8",
    "saturating_cast",
    "unpack_bits",
]
