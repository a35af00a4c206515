"""`quantize_(model, config)`: swap chosen weights for lowbit tensors, all or nothing.

Selection is by a filter function or a per-module rule map (exact FQN or regex -> config).
Every selected weight is quantized first; only when all succeed are they assigned, so a
failure (NaN weights, a bad config) leaves the model exactly as it was. Layers that cannot
take the config are skipped by name with the reason, reported in the returned summary and
in one warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.progress import progress
from lowbit.quantize.configs import QuantConfig
from lowbit.quantize.handlers import quantize_weight
from lowbit.tensors import LowbitTensor, UnsupportedWeight

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module, fqn: str) -> bool:
    """The default filter: every nn.Linear."""
    return isinstance(module, nn.Linear)


def is_conv2d(module: nn.Module, fqn: str) -> bool:
    """Every nn.Conv2d (pass as `filter_fn`; its kernel is quantized per output channel)."""
    return isinstance(module, nn.Conv2d)


@dataclass(frozen=True)
class ModuleConfigs:
    """Per-module configs: keys are exact FQNs or ``"re:<pattern>"`` (full match).

    An exact FQN wins over patterns; patterns are tried in order; ``None`` as a value keeps
    the module in full precision. Modules no rule matches get `default` if they pass
    `default_filter` (nn.Linear by default).
    """

    rules: dict[str, QuantConfig | None] = field(default_factory=dict)
    default: QuantConfig | None = None
    default_filter: FilterFn = is_linear

    def __post_init__(self) -> None:
        for key in self.rules:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ValueError(f"bad pattern {key!r}: {e}") from None

    def config_for(self, module: nn.Module, fqn: str) -> tuple[bool, QuantConfig | None]:
        """(matched, config); matched=False means no rule and no default applies."""
        if fqn in self.rules:
            return True, self.rules[fqn]
        for key, cfg in self.rules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return True, cfg
        if self.default is not None and self.default_filter(module, fqn):
            return True, self.default
        return False, None


@dataclass
class QuantizeSummary:
    """What `quantize_` did: formats per module, skips with reasons, bytes before/after."""

    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [
            f"quantized {len(self.quantized)} modules, skipped {len(self.skipped)}; "
            f"weights {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _plan(model: nn.Module, config, filter_fn) -> list[tuple[str, nn.Module, QuantConfig]]:
    if isinstance(config, ModuleConfigs):
        rules = config
    elif isinstance(config, QuantConfig):
        rules = ModuleConfigs(default=config, default_filter=filter_fn or is_linear)
    else:
        raise TypeError(f"config must be a QuantConfig or ModuleConfigs, got {type(config)}")
    plan = []
    for fqn, module in model.named_modules():
        matched, cfg = rules.config_for(module, fqn)
        if matched and cfg is not None:
            plan.append((fqn, module, cfg))
    return plan


def _why_not(module: nn.Module, cfg: QuantConfig) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "module has no weight tensor"
    if isinstance(weight, LowbitTensor):
        return f"already quantized ({type(weight).__name__})"
    if weight.dim() == 4 and not isinstance(module, nn.Conv2d):
        return f"4-D weights are quantized only as nn.Conv2d kernels, not {type(module).__name__}"
    if cfg.dynamic_activations and not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(cfg).__name__} quantizes activations, which needs an nn.Linear or Conv2d"
    return None


def _follow_ties(model, new_weights, assignments, summary) -> None:
    """A weight shared with unselected modules (tied embeddings) is replaced there too,
    so the tie, and the memory saving, survive."""
    chosen = {id(m) for m, _ in assignments}
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if id(module) not in chosen and weight is not None and id(weight) in new_weights:
            assignments.append((module, weight))
            summary.quantized[fqn] = f"tied: {repr(new_weights[id(weight)].data)}"


def quantize_(
    model: nn.Module,
    config: QuantConfig | ModuleConfigs,
    filter_fn: FilterFn | None = None,
    *,
    calibration: Iterable | None = None,
    show_progress: bool = True,
) -> QuantizeSummary:
    """Quantize `model` in place; returns a QuantizeSummary. See the module docstring.

    `calibration` (batches of token ids, or of model kwargs) feeds calibrated configs such as
    GPTQ/AWQ/SmoothQuant, which then run block by block (`lowbit.quantize.calibration`)."""
    plan = _plan(model, config, filter_fn)
    # Imported here: the calibration package builds on this module.
    from lowbit.quantize.calibration import calibrate, needs_calibration

    if calibration is not None or needs_calibration(plan):
        return calibrate(model, plan, calibration, show_progress)
    summary = QuantizeSummary()
    new_weights: dict[int, nn.Parameter] = {}  # id(old weight) -> new weight: keeps ties
    assignments: list[tuple[nn.Module, torch.Tensor]] = []
    for fqn, module, cfg in progress(plan, "quantize", len(plan), show_progress):
        reason = _why_not(module, cfg)
        weight = getattr(module, "weight", None)
        if reason is None and id(weight) not in new_weights:
            try:
                q = quantize_weight(cfg, weight)
            except UnsupportedWeight as e:
                reason = str(e)
            except ValueError as e:
                raise ValueError(f"cannot quantize {fqn or '<root>'}: {e}") from None
            else:
                new_weights[id(weight)] = nn.Parameter(q, requires_grad=False)
                summary.bytes_before += weight.numel() * weight.element_size()
                summary.bytes_after += q.nbytes_stored()
        if reason is not None:
            summary.skipped[fqn] = reason
            continue
        assignments.append((module, weight))
        summary.quantized[fqn] = repr(new_weights[id(weight)].data)
    _follow_ties(model, new_weights, assignments, summary)
    for module, weight in assignments:
        module.weight = new_weights[id(weight)]
    if summary.skipped:
        names = ", ".join(f"{n} ({r})" for n, r in summary.skipped.items())
        warnings.warn(f"quantize_ skipped {len(summary.skipped)} modules: {names}", stacklevel=2)
    return summary
