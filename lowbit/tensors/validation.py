"""Checks a weight must pass before it is quantized, with reasons a user can act on."""

from __future__ import annotations

import torch

from lowbit.formats.granularity import check_divisible


class UnsupportedWeight(ValueError):
    """This weight cannot take this format; `quantize_` skips the layer and names the reason."""


def check_weight(w: torch.Tensor, block: tuple[int, ...] | None = None) -> None:
    """Raise UnsupportedWeight for shapes/dtypes the format cannot take, ValueError for NaN/Inf."""
    if w.dim() != 2:
        raise UnsupportedWeight(f"expected a 2-D weight, got {w.dim()}-D shape {tuple(w.shape)}")
    if w.is_complex() or not w.is_floating_point():
        raise UnsupportedWeight(f"expected a floating-point weight, got {w.dtype}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise UnsupportedWeight(f"weights of dtype {w.dtype} are already low precision")
    if block is not None:
        reason = check_divisible(tuple(w.shape), block)
        if reason:
            raise UnsupportedWeight(f"shape {tuple(w.shape)} does not fit block {block}: {reason}")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight contains {bad} NaN/Inf values; refusing to quantize it")


def check_linear_input(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> None:
    """Cheap Python-side checks that give a clear message instead of a kernel error."""
    if x.device != weight.device:
        raise RuntimeError(
            f"input is on {x.device} but the quantized weight is on {weight.device}; "
            "move the model or the input so they match"
        )
    if not x.is_floating_point():
        raise TypeError(f"quantized linear expects a floating-point input, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features in its last dim, the weight expects {in_features}"
        )
