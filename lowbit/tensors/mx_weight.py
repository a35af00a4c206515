"""MX (MXFP8 / MXFP6 / MXFP4) and NVFP4 weights, stored packed.

Stored fields for a logical [N, K] weight:
- `MXWeight`: qdata uint8 [N, K * bits / 8] (element codes packed by
  `lowbit.formats.mx.pack_elements`: FP4 two per byte low nibble first, FP6 four in three
  bytes, FP8 one per byte); scale uint8 [N, K / 32], E8M0 codes (byte-identical to
  torch.float8_e8m0fnu, kept as uint8 so every safetensors reader and kernel takes it).
- `NVFP4Weight`: qdata uint8 [N, K / 2] (E2M1, two per byte); block_scale float8_e4m3fn
  [N, K / 16]; tensor_scale float32 [1].
`act_quant` says what happens to activations: "none" (weight-only) or the element type they
are rounded to per call (MX: an MX element name; NVFP4: "nvfp4").
"""

from __future__ import annotations

import torch

from lowbit.formats import mx
from lowbit.kernels import mx_ops
from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.linear import register_linear_ops
from lowbit.tensors.validation import UnsupportedWeight, check_weight


class MXWeight(LowbitTensor):
    tensor_fields = ("qdata", "scale")
    attr_fields = ("elem", "act_quant", "act_scale_mode", "transposed")

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        elem: str = "fp4_e2m1",
        scale_mode: str = "floor",
        act_quant: str = "none",
    ) -> MXWeight:
        """Quantize [N, K] (K a multiple of 32) to MX. `scale_mode` is used for the weight and,
        with dynamic activations, for them too (see `lowbit.formats.mx`)."""
        fmt = mx.elem_format(elem)
        if act_quant != "none":
            mx.elem_format(act_quant)
        if scale_mode not in mx.SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {mx.SCALE_MODES}, got {scale_mode!r}")
        check_weight(w, (1, mx.MX_BLOCK) if w.dim() == 2 else None)
        codes, scale = mx.mx_quantize(w, fmt, scale_mode)
        return cls(
            shape=w.shape, dtype=w.dtype, qdata=mx.pack_elements(codes, fmt), scale=scale,
            elem=elem, act_quant=act_quant, act_scale_mode=scale_mode, transposed=False,
        )

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = mx_ops.mx_weight(self.qdata, self.scale, self.elem, dtype or self.dtype)
        return w.t() if self.transposed else w

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        w = mx_ops.mx_weight(self.qdata[flat], self.scale[flat], self.elem, dtype)
        return w.reshape(*index.shape, self.shape[1])

    def slice_rows(self, start: int, end: int) -> MXWeight:
        return self.with_fields(
            shape=(end - start, self.shape[1]), qdata=self.qdata[start:end],
            scale=self.scale[start:end],
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_quant == "none":
            return mx_ops.mx_weight_only_linear(x, self.qdata, self.scale, bias, self.elem)
        return mx_ops.mx_dynamic_linear(
            x, self.qdata, self.scale, bias, self.elem, self.act_quant, self.act_scale_mode
        )


class NVFP4Weight(LowbitTensor):
    tensor_fields = ("qdata", "block_scale", "tensor_scale")
    attr_fields = ("act_quant", "transposed")

    @classmethod
    def from_float(cls, w: torch.Tensor, act_quant: str = "none") -> NVFP4Weight:
        """Quantize [N, K] (K a multiple of 16) to NVFP4 with a per-tensor amax scale."""
        if act_quant not in ("none", "nvfp4"):
            raise ValueError(f"act_quant must be 'none' or 'nvfp4', got {act_quant!r}")
        check_weight(w, (1, mx.NVFP4_BLOCK) if w.dim() == 2 else None)
        codes, block_scale, tensor_scale = mx.nvfp4_quantize(w)
        return cls(
            shape=w.shape, dtype=w.dtype, qdata=mx.pack_elements(codes, mx.E2M1),
            block_scale=block_scale, tensor_scale=tensor_scale.to(w.device), act_quant=act_quant,
            transposed=False,
        )

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = mx_ops.nvfp4_weight(self.qdata, self.block_scale, self.tensor_scale,
                                dtype or self.dtype)
        return w.t() if self.transposed else w

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        w = mx_ops.nvfp4_weight(self.qdata[flat], self.block_scale[flat], self.tensor_scale,
                                dtype)
        return w.reshape(*index.shape, self.shape[1])

    def slice_rows(self, start: int, end: int) -> NVFP4Weight:
        return self.with_fields(
            shape=(end - start, self.shape[1]), qdata=self.qdata[start:end],
            block_scale=self.block_scale[start:end],
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_quant == "none":
            return mx_ops.nvfp4_weight_only_linear(
                x, self.qdata, self.block_scale, self.tensor_scale, bias)
        return mx_ops.nvfp4_dynamic_linear(
            x, self.qdata, self.block_scale, self.tensor_scale, bias)


register_linear_ops(MXWeight)
register_linear_ops(NVFP4Weight)

__all__ = ["MXWeight", "NVFP4Weight", "UnsupportedWeight"]
