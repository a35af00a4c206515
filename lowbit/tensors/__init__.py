"""Quantized weight tensors: subclasses that hold packed data and run F.linear with kernels."""

from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.conv import as_conv_weight  # noqa: F401  also registers F.conv2d on them
from lowbit.tensors.float8_weight import Float8Weight
from lowbit.tensors.int_weight import IntWeight
from lowbit.tensors.validation import UnsupportedWeight, check_weight

__all__ = ["Float8Weight", "IntWeight", "LowbitTensor", "UnsupportedWeight", "check_weight"]
