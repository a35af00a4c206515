"""Custom ops for MX and NVFP4 linears: reference (any device), fake impl, CUDA choice.

Arguments are the fields the weight classes store (`lowbit.tensors.mx_weight`): packed
element codes uint8 [N, K * bits / 8]; MX scales as E8M0 codes uint8 [N, K / 32]; NVFP4
block scales float8_e4m3fn [N, K / 16] and a float32 tensor scale [1]. Hopper and CPUs have
no MX arithmetic, so every op computes by dequantizing (weights, and for the dynamic ops the
activations too, rounded to the format and back) and running the matmul in x's dtype. On
CUDA, weight-only ops at M <= 16 run the Triton decode kernels that read the packed bytes
(`lowbit.kernels.triton.mx_weight_only`: a GEMV at M = 1, a tl.dot GEMM at M = 2..16).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.formats import mx

HAS_TRITON = importlib.util.find_spec("triton") is not None
# At and below this many rows the weight-only kernel streams packed bytes; above it a GEMM on
# the decoded weight is compute-bound and cuBLAS wins.
TRITON_MAX_M = 16


# ---- references ----------------------------------------------------------------------------


def mx_weight(qdata: Tensor, scale: Tensor, elem: str, dtype: torch.dtype) -> Tensor:
    """Packed MX weight -> dense [N, K] in `dtype`."""
    fmt = mx.elem_format(elem)
    k = qdata.shape[1] * 8 // fmt.bits
    return mx.mx_dequantize(mx.unpack_elements(qdata, fmt, k), scale, fmt, dtype)


def nvfp4_weight(qdata: Tensor, block_scale: Tensor, tensor_scale: Tensor,
                 dtype: torch.dtype) -> Tensor:
    codes = mx.unpack_elements(qdata, mx.E2M1, qdata.shape[1] * 2)
    return mx.nvfp4_dequantize(codes, block_scale, tensor_scale, dtype)


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def ref_mx_weight_only_linear(x, qdata, scale, bias, elem):
    return F.linear(x, mx_weight(qdata, scale, elem, x.dtype), bias)


def ref_nvfp4_weight_only_linear(x, qdata, block_scale, tensor_scale, bias):
    return F.linear(x, nvfp4_weight(qdata, block_scale, tensor_scale, x.dtype), bias)


def ref_mx_dynamic_linear(x, qdata, scale, bias, elem, act_elem, act_scale_mode):
    """Activations rounded to MX (blocks of 32 along K, per token), weights decoded, then
    a float32 matmul: the numbers an MX x MX tensor-core GEMM with fp32 accumulation gives."""
    xq = mx.mx_fake_quantize(x.float(), act_elem, act_scale_mode)
    y = F.linear(xq, mx_weight(qdata, scale, elem, torch.float32))
    return _add_bias(y, bias).to(x.dtype)


def ref_nvfp4_dynamic_linear(x, qdata, block_scale, tensor_scale, bias):
    """Activations rounded to NVFP4 with their own per-tensor scale (amax of this call)."""
    xq = mx.nvfp4_fake_quantize(x.float())
    y = F.linear(xq, nvfp4_weight(qdata, block_scale, tensor_scale, torch.float32))
    return _add_bias(y, bias).to(x.dtype)


# ---- custom ops --------------------------------------------------------------------------


@torch.library.custom_op("lowbit::mx_weight_only_linear", mutates_args=())
def mx_weight_only_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None,
                          elem: str) -> Tensor:
    """y = x @ dequant(qdata, scale)^T + bias; packed `elem` codes, E8M0 scales per 32."""
    return ref_mx_weight_only_linear(x, qdata, scale, bias, elem)


@torch.library.custom_op("lowbit::nvfp4_weight_only_linear", mutates_args=())
def nvfp4_weight_only_linear(x: Tensor, qdata: Tensor, block_scale: Tensor,
                             tensor_scale: Tensor, bias: Tensor | None) -> Tensor:
    return ref_nvfp4_weight_only_linear(x, qdata, block_scale, tensor_scale, bias)


@torch.library.custom_op("lowbit::mx_dynamic_linear", mutates_args=())
def mx_dynamic_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None, elem: str,
                      act_elem: str, act_scale_mode: str) -> Tensor:
    return ref_mx_dynamic_linear(x, qdata, scale, bias, elem, act_elem, act_scale_mode)


@torch.library.custom_op("lowbit::nvfp4_dynamic_linear", mutates_args=())
def nvfp4_dynamic_linear(x: Tensor, qdata: Tensor, block_scale: Tensor, tensor_scale: Tensor,
                         bias: Tensor | None) -> Tensor:
    return ref_nvfp4_dynamic_linear(x, qdata, block_scale, tensor_scale, bias)


def _out(x: Tensor, n: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], n)


@mx_weight_only_linear.register_fake
def _(x, qdata, scale, bias, elem):
    return _out(x, qdata.shape[0])


@nvfp4_weight_only_linear.register_fake
def _(x, qdata, block_scale, tensor_scale, bias):
    return _out(x, qdata.shape[0])


@mx_dynamic_linear.register_fake
def _(x, qdata, scale, bias, elem, act_elem, act_scale_mode):
    return _out(x, qdata.shape[0])


@nvfp4_dynamic_linear.register_fake
def _(x, qdata, block_scale, tensor_scale, bias):
    return _out(x, qdata.shape[0])


ALL_OPS = (mx_weight_only_linear, nvfp4_weight_only_linear, mx_dynamic_linear,
           nvfp4_dynamic_linear)


# ---- CUDA ----------------------------------------------------------------------------------


def uses_triton(x: Tensor) -> bool:
    """Whether a weight-only call with this input runs the Triton decode kernel (which steps
    through K in whole 32-wide blocks, so NVFP4 layers with K % 32 == 16 take the reference)."""
    return (x.is_cuda and HAS_TRITON and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-1] % mx.MX_BLOCK == 0
            and x.reshape(-1, x.shape[-1]).shape[0] <= TRITON_MAX_M)


@mx_weight_only_linear.register_kernel("cuda")
def _(x, qdata, scale, bias, elem):
    if not uses_triton(x):
        return ref_mx_weight_only_linear(x, qdata, scale, bias, elem)
    from lowbit.kernels.triton.mx_weight_only import mx_weight_only_mm

    y = mx_weight_only_mm(x.reshape(-1, x.shape[-1]), qdata, scale, bias, elem)
    return y.reshape(*x.shape[:-1], qdata.shape[0])


@nvfp4_weight_only_linear.register_kernel("cuda")
def _(x, qdata, block_scale, tensor_scale, bias):
    if not uses_triton(x):
        return ref_nvfp4_weight_only_linear(x, qdata, block_scale, tensor_scale, bias)
    from lowbit.kernels.triton.mx_weight_only import nvfp4_weight_only_mm

    y = nvfp4_weight_only_mm(x.reshape(-1, x.shape[-1]), qdata, block_scale, tensor_scale, bias)
    return y.reshape(*x.shape[:-1], qdata.shape[0])
