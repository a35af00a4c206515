"""Triton GPU kernels for quantized linear layers.

All functions take x [M, K] and weights [N, K] (nn.Linear layout) and return x.dtype [M, N].
The int4 layout is the library's default (low nibble = even k); no repacking is needed.
"""

from .dynamic import int8_dynamic_mm, quantize_fp8_rows, quantize_per_token_int8
from .weight_only import fp8_weight_only_mm, int4_weight_only_mm, int8_weight_only_mm

__all__ = [
    "fp8_weight_only_mm",
    "int4_weight_only_mm",
    "int8_dynamic_mm",
    "int8_weight_only_mm",
    "quantize_fp8_rows",
    "quantize_per_token_int8",
]
