"""2:4 semi-structured sparse weights, optionally with int4 / int8 kept values.

Stored fields for a logical [N, K] weight (layout: `lowbit.kernels.sparse_ops`):
- values: the kept values, [N, K/2] in the model dtype (bits == 0), or their codes exactly as
  `IntWeight` stores a [N, K/2] matrix: int8 [N, K/2] (bits 8, symmetric) or packed uint8
  [N, K/4] (bits 4); a logical group of g columns holds g/2 kept values, so scales are the
  usual [N, K/g] over logical K and the codes come from `IntWeight.from_float` on the kept
  values (zeros that 2:4 pruning made do not widen the ranges);
- meta: uint8 [N, ceil(K/8)], the two kept positions of every group of 4 columns;
- scale, zero: [N, K/g] or None.
The tensor is compact in memory and on disk (its fields are what checkpoints store) and runs
F.linear through `lowbit::sparse24_linear` / `lowbit::sparse24_intx_linear`.
"""

from __future__ import annotations

import torch

from lowbit.formats import PerGroup
from lowbit.kernels import sparse_ops
from lowbit.tensors.base import LowbitTensor
from lowbit.tensors.int_weight import IntWeight
from lowbit.tensors.linear import register_linear_ops
from lowbit.tensors.validation import UnsupportedWeight, check_weight

VALUE_BITS = (0, 4, 8)


class Sparse24Weight(LowbitTensor):
    tensor_fields = ("values", "meta", "scale", "zero")
    optional_fields = ("scale", "zero")
    attr_fields = ("bits", "transposed")

    @property
    def dtype_following_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Float kept values follow `.to(dtype)` like scales do; integer codes never change."""
        return ("values",) if self.bits == 0 else ("scale", "zero")

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None, bits: int = 0,
                   group_size: int = 128, mapping: str = "asymmetric",
                   zero: str = "int") -> Sparse24Weight:
        """Compress w [N, K] under a 2:4 `mask` (bool, exactly 2 of every 4 columns kept).

        Without a mask, w must already be 2:4 (at most 2 nonzeros per group of 4); anything
        else raises ValueError naming the first offending group. bits=4/8 quantizes the kept
        values with IntWeight's numerics (`group_size` counts logical columns)."""
        if bits not in VALUE_BITS:
            raise ValueError(f"bits must be one of {VALUE_BITS} (0: keep w's dtype), got {bits}")
        check_weight(w)
        n, k = w.shape
        if k % 4:
            raise UnsupportedWeight(f"2:4 sparsity needs in_features divisible by 4, got {k}")
        if mask is None:
            mask = _mask_of_24_weight(w)
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(w.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        values, meta = sparse_ops.compress(w, mask)
        if bits == 0:
            return cls(shape=w.shape, dtype=w.dtype, values=values, meta=meta, scale=None,
                       zero=None, bits=0, transposed=False)
        if group_size % 4 or k % group_size:
            raise UnsupportedWeight(f"group_size {group_size} must be a multiple of 4 that "
                                    f"divides in_features {k}")
        mapping = "symmetric" if bits == 8 else mapping
        q = IntWeight.from_float(values, bits, PerGroup(group_size // 2), mapping, zero)
        return cls(shape=w.shape, dtype=w.dtype, values=q.qdata, meta=meta, scale=q.scale,
                   zero=q.zero, bits=bits, transposed=False)

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    def kept(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kept values [N, K/2], dequantized."""
        dtype = dtype or self.dtype
        if self.bits == 0:
            return self.values.to(dtype)
        return sparse_ops.kept_values(self.values, self.scale, self.zero, self.bits, dtype)

    def mask(self) -> torch.Tensor:
        """The bool [N, K] mask of kept positions."""
        n, k = self.shape[::-1] if self.transposed else self.shape
        pos = sparse_ops.unpack_meta(self.meta, k)
        m = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=self.meta.device)
        return m.scatter_(-1, pos, True).reshape(n, k)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        k = self.in_features
        w = sparse_ops.expand(self.kept(dtype), self.meta, k)
        return w.t() if self.transposed else w

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        rows = self.with_fields(
            shape=(flat.numel(), self.shape[1]), values=self.values[flat], meta=self.meta[flat],
            scale=None if self.scale is None else self.scale[flat],
            zero=None if self.zero is None else self.zero[flat],
        )
        return rows.dequantize(dtype).reshape(*index.shape, self.shape[1])

    def slice_rows(self, start: int, end: int) -> Sparse24Weight:
        def rows(t):
            return None if t is None else t[start:end]

        return self.with_fields(
            shape=(end - start, self.shape[1]), values=rows(self.values), meta=rows(self.meta),
            scale=rows(self.scale), zero=rows(self.zero),
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.bits == 0:
            return sparse_ops.sparse24_linear(x, self.values, self.meta, bias)
        return sparse_ops.sparse24_intx_linear(
            x, self.values, self.meta, self.scale, self.zero, bias, self.bits
        )


def _mask_of_24_weight(w: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask of a weight that is already 2:4 (groups with fewer than 2 nonzeros keep
    their nonzeros plus the first zero positions); ValueError for any group with 3 or 4."""
    n, k = w.shape
    nonzero = (w != 0).reshape(n, k // 4, 4)
    counts = nonzero.sum(-1)
    bad = counts > 2
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"weight is not 2:4 sparse: {int(bad.sum())} groups of 4 columns hold more than 2 "
            f"nonzeros (first: row {row}, columns {4 * grp}..{4 * grp + 3} hold "
            f"{int(counts[row, grp])}); prune it first (lowbit.sparsity.mask_24) or pass a mask"
        )
    pos = torch.arange(4, device=w.device)
    key = nonzero.to(torch.int64) * 8 + (3 - pos)
    keep = key.topk(2, dim=-1).indices
    return torch.zeros_like(nonzero).scatter_(-1, keep, True).reshape(n, k)


register_linear_ops(Sparse24Weight)
