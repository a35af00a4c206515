"""Which variant a kernel compiles: the GPU's native instructions or the interpreter's twins.

Some kernels have two bodies: inline PTX (the weight decoders, e4m3 conversions) and bf16
tensor-core dots on a GPU, and portable equivalents for the Triton interpreter, which runs CPU
tensors and gets bf16 dots wrong. `native(t)` chooses from the device of t. The sm_90 compile
check (tests/kernels/sm90_compile.py) replaces it, so that on a machine without a GPU it
compiles the variants a GPU run would.
"""

from __future__ import annotations

import torch


def native(t: torch.Tensor) -> bool:
    """Whether kernels for tensors like t use the native (GPU) variant."""
    return t.device.type == "cuda"
