"""Float8 weights (e4m3 or e5m2) with float32 scales per row or per tensor.

Stored fields for a logical [N, K] weight: qdata float8 [N, K]; scale float32 [N, 1]
(a per-tensor scale is stored repeated per row, so kernels see one layout).
`act_quant`: "none" (weight-only), "per_row" or "per_tensor" dynamic e4m3 activations.
"""

from __future__ import annotations

import torch

from lowbit.formats import PerTensor, choose_fp8_scale, fp8_dtype, quantize_fp8
from lowbit.formats.granularity import Granularity, PerAxis
from lowbit.kernels import ops
from lowbit.kernels import reference as ref
from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.linear import register_linear_ops
from lowbit.tensors.validation import UnsupportedWeight, check_weight

ACT_QUANTS = ("none", "per_row", "per_tensor")


class Float8Weight(LowbitTensor):
    tensor_fields = ("qdata", "scale")
    attr_fields = ("act_quant", "transposed")

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        granularity: Granularity = PerAxis(0),
        fp8_format: str = "e4m3",
        act_quant: str = "none",
        power_of_2: bool = False,
    ) -> Float8Weight:
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
        if not isinstance(granularity, (PerTensor, PerAxis)) or (
            isinstance(granularity, PerAxis) and granularity.axis != 0
        ):
            raise ValueError(f"float8 weights take PerTensor or PerRow scales, got {granularity}")
        check_weight(w)
        dtype = fp8_dtype(fp8_format)
        if act_quant != "none":
            if dtype != torch.float8_e4m3fn:
                raise ValueError("dynamic float8 activations need e4m3 weights")
            if w.shape[0] % 16 or w.shape[1] % 16:
                raise UnsupportedWeight(
                    f"float8 GEMMs need both dims divisible by 16, got {tuple(w.shape)}"
                )
        block = granularity.block_size(tuple(w.shape))
        scale = choose_fp8_scale(w, block, dtype, power_of_2)
        qdata = quantize_fp8(w, scale, block, dtype)
        scale = scale.expand(w.shape[0], 1).contiguous()
        return cls(
            shape=w.shape, dtype=w.dtype, qdata=qdata, scale=scale, act_quant=act_quant,
            transposed=False,
        )

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = ref.fp8_weight(self.qdata, self.scale, dtype or self.dtype)
        # A conv kernel is stored as its flattened matrix; reshape gives back its 4-D shape.
        return w.t() if self.transposed else w.reshape(self.shape)

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        w = ref.fp8_weight(self.qdata[flat], self.scale[flat], dtype)
        return w.reshape(*index.shape, self.shape[1])

    def slice_rows(self, start: int, end: int) -> Float8Weight:
        return self.with_fields(
            shape=(end - start, self.shape[1]), qdata=self.qdata[start:end],
            scale=self.scale[start:end],
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_quant == "none":
            return ops.fp8_weight_only_linear(x, self.qdata, self.scale, bias)
        return ops.fp8_dynamic_linear(
            x, self.qdata, self.scale, bias, self.act_quant == "per_row"
        )


register_linear_ops(Float8Weight)
