"""torch.library custom ops for quantized linears, their references and CUDA kernels."""

from lowbit.kernels import cuda as _cuda  # noqa: F401 - registers the CUDA kernels
from lowbit.kernels import ops

__all__ = ["ops"]
