"""The ops a quantized weight answers: F.linear, F.embedding, t(), mm, addmm, matmul.

Shared by every weight class: each class provides `linear(x, bias)` (its custom op),
`dequantize_rows(index, dtype)` and `in_features`; this module routes the many ways
PyTorch reaches a weight to those three methods. A transposed weight (after `.t()`) is
what `x @ w.t()` and `torch.addmm(b, x, w.t())` see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.validation import check_linear_input

aten = torch.ops.aten


def _linear(weight: LowbitTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.transposed:
        raise ValueError("F.linear got a transposed quantized weight; pass the [out, in] weight")
    check_linear_input(x, weight, weight.in_features)
    return weight.linear(x, bias)


def _matmul_transposed(x: torch.Tensor, w_t: LowbitTensor, bias=None) -> torch.Tensor:
    """x @ w_t where w_t = w.t() of an [out, in] quantized weight: that is linear(x, w)."""
    if not isinstance(w_t, LowbitTensor) or not w_t.transposed:
        raise NotImplementedError(
            "a quantized weight multiplies only from the right, as x @ w.t() (a linear); "
            "call .dequantize() for other products"
        )
    return _linear(w_t.with_fields(shape=w_t.shape[::-1], transposed=False), x, bias)


def register_linear_ops(cls: type[LowbitTensor]) -> None:
    @cls.implements_function(F.linear)
    def _(func, args, kwargs):
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return _linear(weight, x, bias)

    @cls.implements_function(F.embedding)
    def _(func, args, kwargs):
        index, weight = args[0], args[1]
        extra = [a for a in args[2:] if a not in (None, False, 2.0)]
        if extra or any(v not in (None, False, 2.0) for v in kwargs.values()):
            raise NotImplementedError("quantized embeddings support plain lookups only")
        return weight.dequantize_rows(index, weight.dtype)

    @cls.implements_function(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
    def _(func, args, kwargs):
        return _matmul_transposed(args[0], args[1])

    @cls.implements(aten.t.default)
    def _(func, args, kwargs):
        w = args[0]
        return w.with_fields(shape=w.shape[::-1], transposed=not w.transposed)

    @cls.implements(aten.mm.default)
    def _(func, args, kwargs):
        return _matmul_transposed(args[0], args[1])

    @cls.implements(aten.addmm.default)
    def _(func, args, kwargs):
        bias, x, w_t = args[:3]
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            raise NotImplementedError("addmm with alpha/beta is not supported on quantized weights")
        return _matmul_transposed(x, w_t, bias)

    @cls.implements(aten.linear.default)
    def _(func, args, kwargs):
        return _linear(args[1], args[0], args[2] if len(args) > 2 else None)
