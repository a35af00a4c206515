"""Integer weights: int8 (signed, unpacked) and 1..7-bit (or asymmetric 8-bit) packed codes.

Stored fields for a logical [N, K] weight with groups of g along K:
- qdata: int8 [N, K] when bits == 8 and symmetric, else uint8 [N, K * bits / 8] holding
  unsigned codes packed by `lowbit.formats.packing` (symmetric codes offset by 2^(bits-1));
- scale: [N, K // g] in the model's float dtype; zero: same shape or None (symmetric).
Per-tensor and per-channel scales are stored as [N, 1] so every kernel sees one layout.
`act_quant` says what happens to activations: "none" (weight-only), "int8_per_token"
(dynamic symmetric int8, needs int8 per-channel weights) or "int8_per_token_asym" (the
int8-activation / intx-weight scheme ExecuTorch runs).
"""

from __future__ import annotations

import torch

from lowbit.formats import AffineSpec, Granularity, choose_qparams, pack_bits, quantize
from lowbit.kernels import ops
from lowbit.kernels import reference as ref
from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.linear import register_linear_ops
from lowbit.tensors.validation import UnsupportedWeight, check_weight

ACT_QUANTS = ("none", "int8_per_token", "int8_per_token_asym")


def _scale_rows(p: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tensor params [1, G] -> [N, G], so the stored layout is always per row."""
    return p.expand(n, p.shape[1]).contiguous() if p.shape[0] != n else p


class IntWeight(LowbitTensor):
    tensor_fields = ("qdata", "scale", "zero")
    optional_fields = ("zero",)
    attr_fields = ("bits", "act_quant", "transposed")
    dtype_following_fields = ("scale", "zero")

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        bits: int,
        granularity: Granularity,
        mapping: str = "symmetric",
        zero: str = "int",
        act_quant: str = "none",
    ) -> IntWeight:
        spec = AffineSpec(bits, mapping, zero)
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
        block = granularity.block_size(tuple(w.shape)) if w.dim() == 2 else None
        check_weight(w, block)
        n, k = w.shape
        signed_int8 = bits == 8 and spec.symmetric
        if not signed_int8 and (k * bits) % 8:
            raise UnsupportedWeight(f"in_features {k} cannot be packed at {bits} bits")
        if act_quant == "int8_per_token" and not (signed_int8 and block[1] == k):
            raise UnsupportedWeight("dynamic int8 activations need int8 per-channel weights")
        scale, zp = choose_qparams(w, spec, block, w.dtype)
        codes = quantize(w, scale, zp, spec, block)
        if signed_int8:
            qdata = codes.to(torch.int8)
        else:
            qdata = pack_bits((codes - spec.qmin).to(torch.uint8), bits)
        scale = _scale_rows(scale, n)
        zp = None if zp is None else _scale_rows(zp, n)
        return cls(
            shape=w.shape, dtype=w.dtype, qdata=qdata, scale=scale, zero=zp, bits=bits,
            act_quant=act_quant, transposed=False,
        )

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def signed_int8(self) -> bool:
        return self.qdata.dtype == torch.int8

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.signed_int8:
            w = ref.int8_weight(self.qdata, self.scale, dtype)
        else:
            w = ref.intx_weight(self.qdata, self.scale, self.zero, self.bits, dtype)
        # A conv kernel is stored as its flattened matrix; reshape gives back its 4-D shape.
        return w.t() if self.transposed else w.reshape(self.shape)

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` (any shape) of the weight, decoded: the embedding lookup."""
        flat = index.reshape(-1)
        rows = self.with_fields(
            shape=(flat.numel(), self.shape[1]),
            qdata=self.qdata[flat], scale=self.scale[flat],
            zero=None if self.zero is None else self.zero[flat],
        )
        return rows.dequantize(dtype).reshape(*index.shape, self.shape[1])

    def slice_rows(self, start: int, end: int) -> IntWeight:
        zero = None if self.zero is None else self.zero[start:end]
        return self.with_fields(
            shape=(end - start, self.shape[1]), qdata=self.qdata[start:end],
            scale=self.scale[start:end], zero=zero,
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_quant == "int8_per_token":
            return ops.int8_dynamic_linear(x, self.qdata, self.scale, bias)
        if self.act_quant == "int8_per_token_asym":
            return ops.int8_act_intx_weight_linear(
                x, self.qdata, self.scale, self.zero, bias, self.bits
            )
        if self.signed_int8:
            return ops.int8_weight_only_linear(x, self.qdata, self.scale, bias)
        return ops.intx_weight_only_linear(x, self.qdata, self.scale, self.zero, bias, self.bits)


register_linear_ops(IntWeight)
