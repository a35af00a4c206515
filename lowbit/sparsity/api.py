"""`sparsify_(model, config)`: prune chosen linears to 2:4 and store them as Sparse24Weight.

    sparsify_(model, Sparse24())                                   # magnitude, bf16 values
    sparsify_(model, Sparse24("wanda"), calibration=batches)        # WANDA
    sparsify_(model, Sparse24("wanda", bits=4, group_size=64), calibration=batches)

All or nothing, like `quantize_`: every new weight is built before any is assigned; layers
that cannot take 2:4 (in_features not divisible by 4, already quantized) are skipped by name
with the reason. `Sparse24` is a QuantConfig, so it has a JSON form for checkpoints, and
`quantize_(model, Sparse24())` works for the data-free magnitude method.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lowbit.progress import progress
from lowbit.quantize.api import QuantizeSummary
from lowbit.quantize.configs import ConfigError, QuantConfig
from lowbit.quantize.handlers import register_handler
from lowbit.sparsity.calibration import input_channel_norms
from lowbit.sparsity.masks import magnitude_mask, wanda_mask
from lowbit.tensors import LowbitTensor, UnsupportedWeight
from lowbit.tensors.sparse24 import Sparse24Weight

METHODS = ("magnitude", "wanda")


@dataclasses.dataclass(frozen=True)
class Sparse24(QuantConfig):
    """2:4 sparsity chosen by `method`, kept values in the model dtype (bits=0) or quantized
    to int4 (asymmetric, `zero` int or float) / int8 (symmetric) in groups of `group_size`
    logical columns."""

    method: str = "magnitude"
    bits: int = 0
    group_size: int = 128
    zero: str = "int"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (0, 4, 8):
            raise ConfigError(f"bits must be 0 (no quantization), 4 or 8, got {self.bits}")
        if self.group_size <= 0 or self.group_size % 4:
            raise ConfigError(f"group_size must be a positive multiple of 4, got "
                              f"{self.group_size}")
        if self.zero not in ("int", "float"):
            raise ConfigError(f"zero must be 'int' or 'float', got {self.zero!r}")


def sparse_weight(config: Sparse24, weight: torch.Tensor,
                  input_norm: torch.Tensor | None = None) -> Sparse24Weight:
    """One weight pruned (magnitude, or WANDA with `input_norm`) and compressed."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % 4:
        raise UnsupportedWeight(f"2:4 sparsity needs a 2-D weight with in_features divisible "
                                f"by 4, got shape {tuple(w.shape)}")
    if config.method == "wanda":
        if input_norm is None:
            raise ValueError("WANDA needs input activation norms: call sparsify_(model, "
                             "config, calibration=batches)")
        mask = wanda_mask(w, input_norm)
    else:
        mask = magnitude_mask(w)
    return Sparse24Weight.from_dense(w, mask, config.bits, config.group_size, zero=config.zero)


@register_handler(Sparse24)
def _sparse24_handler(config: Sparse24, w: torch.Tensor) -> LowbitTensor:
    return sparse_weight(config, w)


def untied_linears(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """The default filter: nn.Linear layers whose weight no other module shares. A weight tied
    to an embedding (an lm_head) is left dense: pruning it would prune the embedding too."""
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners[id(w)] = owners.get(id(w), 0) + 1

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and owners.get(id(module.weight), 0) == 1

    return keep


def sparsify_(
    model: nn.Module,
    config: Sparse24,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration: Iterable | None = None,
    show_progress: bool = False,
) -> QuantizeSummary:
    """Prune and compress the chosen linears in place; returns a QuantizeSummary."""
    if not isinstance(config, Sparse24):
        raise TypeError(f"sparsify_ takes a Sparse24 config, got {type(config).__name__}")
    keep = filter_fn or untied_linears(model)
    summary = QuantizeSummary()
    plan: dict[str, nn.Module] = {}
    for fqn, module in model.named_modules():
        if not keep(module, fqn):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            summary.skipped[fqn] = "module has no weight tensor"
        elif isinstance(weight, LowbitTensor):
            summary.skipped[fqn] = f"already quantized ({type(weight).__name__})"
        elif weight.dim() != 2 or weight.shape[1] % 4:
            summary.skipped[fqn] = (f"in_features {weight.shape[-1]} is not divisible by 4, "
                                    "which 2:4 sparsity needs")
        else:
            plan[fqn] = module
    norms: dict[str, torch.Tensor] = {}
    if config.method == "wanda":
        if calibration is None:
            raise ValueError("Sparse24('wanda') needs calibration batches (token ids)")
        norms = input_channel_norms(model, plan, calibration, show_progress)
    new: dict[str, Sparse24Weight] = {}
    for fqn, module in progress(list(plan.items()), "sparsify", len(plan), show_progress):
        try:
            new[fqn] = sparse_weight(config, module.weight, norms.get(fqn))
        except UnsupportedWeight as e:
            summary.skipped[fqn] = str(e)
        except ValueError as e:
            raise ValueError(f"cannot sparsify {fqn or '<root>'}: {e}") from None
    for fqn, w in new.items():
        old = plan[fqn].weight
        summary.bytes_before += old.numel() * old.element_size()
        summary.bytes_after += w.nbytes_stored()
        plan[fqn].weight = nn.Parameter(w, requires_grad=False)
        summary.quantized[fqn] = repr(w)
    if summary.skipped:
        names = ", ".join(f"{n} ({r})" for n, r in summary.skipped.items())
        warnings.warn(f"sparsify_ skipped {len(summary.skipped)} modules: {names}", stacklevel=2)
    return summary
