"""prepare -> train -> convert.

`prepare(model, config)` picks layers exactly as `quantize_(model, config)` would (same
filter, same per-module rules, same skips, same tied-weight following) and swaps them for
fake-quantized layers. `convert(model)` swaps them back to stock layers whose weights are
the tensors `quantize_` would produce from the trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.qat.fake_quantizers import FakeQuantizer, fake_quantizer_for
from lowbit.qat.modules import (
    QAT_MODULES,
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    LoRA,
    plain_module,
)
from lowbit.quantize.api import FilterFn, ModuleConfigs, QuantizeSummary, is_linear
from lowbit.quantize.configs import QuantConfig
from lowbit.tensors import LowbitTensor, UnsupportedWeight


@dataclass
class PrepareSummary:
    """What `prepare` did: the config per wrapped module and skips with their reasons."""

    prepared: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"prepared {len(self.prepared)} modules for QAT, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _rules(config: QuantConfig | ModuleConfigs, filter_fn: FilterFn | None) -> ModuleConfigs:
    if isinstance(config, ModuleConfigs):
        return config
    if isinstance(config, QuantConfig):
        return ModuleConfigs(default=config, default_filter=filter_fn or is_linear)
    raise TypeError(f"config must be a QuantConfig or ModuleConfigs, got {type(config).__name__}")


def _why_not(module: nn.Module, cfg: QuantConfig) -> str | None:
    """Why QAT cannot wrap this module (quantize_'s reasons plus what the wrappers support)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "module has no weight tensor"
    if isinstance(weight, LowbitTensor):
        return f"already quantized ({type(weight).__name__})"
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return f"QAT wraps nn.Linear and nn.Embedding only, not {type(module).__name__}"
    if cfg.dynamic_activations and not isinstance(module, nn.Linear):
        return f"{type(cfg).__name__} quantizes activations, which needs an nn.Linear"
    if isinstance(module, nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        return "quantized embeddings support plain lookups only"
    return None


def _check_not_prepared(model: nn.Module) -> None:
    for fqn, module in model.named_modules():
        if isinstance(module, QAT_MODULES):
            raise ValueError(
                f"model is already prepared for QAT ({type(module).__name__} at "
                f"{fqn or '<root>'!r}); call lowbit.qat.convert(model) or start from the float "
                "model instead of preparing twice"
            )


def _wrap(module, quantizer, start_step, lora_rank, lora_alpha) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return FakeQuantizedEmbedding(module, quantizer, start_step)
    lora = None
    if lora_rank:
        w = module.weight
        lora = LoRA(module.out_features, module.in_features, lora_rank, lora_alpha, w)
        w.requires_grad_(False)
    return FakeQuantizedLinear(module, quantizer, start_step, lora)


def prepare(
    model: nn.Module,
    config: QuantConfig | ModuleConfigs,
    filter_fn: FilterFn | None = None,
    *,
    learn_ranges: bool = False,
    start_step: int = 0,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
) -> PrepareSummary:
    """Swap the layers `quantize_(model, config, filter_fn)` would quantize for fake-quantized
    ones, in place.

    learn_ranges: train the weight scales (LSQ) instead of recomputing them from the weight
        every step; integer configs only.
    start_step: keep fake-quant off until `set_step(model, step)` reaches this step (train
        in float first, then adapt to quantization).
    lora_rank: freeze base weights of linears and train rank-`lora_rank` adapters through
        the quantizer (`lora_alpha` defaults to the rank, i.e. scaling 1).
    """
    rules = _rules(config, filter_fn)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    _check_not_prepared(model)
    lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
    summary = PrepareSummary()
    quantizers: dict[int, FakeQuantizer] = {}  # id(weight) -> quantizer; keeps ties tied
    swaps: list[tuple[str, nn.Module, FakeQuantizer]] = []
    for fqn, module in model.named_modules():
        matched, cfg = rules.config_for(module, fqn)
        if not matched or cfg is None:
            continue
        quantizer = fake_quantizer_for(cfg)  # TypeError for configs QAT cannot emulate
        reason = _why_not(module, cfg)
        weight = getattr(module, "weight", None)
        if reason is None and id(weight) not in quantizers:
            try:
                # The handler's own checks decide skips, so prepare and quantize_ agree.
                with torch.no_grad():
                    quantizer.to_quantized(weight)
            except UnsupportedWeight as e:
                reason = str(e)
            except ValueError as e:
                raise ValueError(f"cannot prepare {fqn or '<root>'}: {e}") from None
            else:
                if learn_ranges:
                    quantizer.init_ranges(weight)
                quantizers[id(weight)] = quantizer
        if reason is not None:
            summary.skipped[fqn] = reason
            continue
        swaps.append((fqn, module, quantizers[id(weight)]))
        summary.prepared[fqn] = repr(cfg)
    chosen = {id(m) for _, m, _ in swaps}
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if id(module) not in chosen and weight is not None and id(weight) in quantizers:
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                raise ValueError(f"{fqn} shares a prepared weight but is not Linear/Embedding")
            swaps.append((fqn, module, quantizers[id(weight)]))
            summary.prepared[fqn] = "tied"
    if not swaps:
        raise ValueError(f"prepare found no module to fake-quantize; {summary}")
    if lora_rank:
        _check_lora(swaps)
    for fqn, module, quantizer in swaps:
        if fqn == "":
            raise ValueError("prepare swaps submodules; wrap a bare layer in nn.Sequential")
        model.set_submodule(fqn, _wrap(module, quantizer, start_step, lora_rank, lora_alpha))
    return summary


def _check_lora(swaps) -> None:
    counts: dict[int, int] = {}
    for _, module, _ in swaps:
        counts[id(module.weight)] = counts.get(id(module.weight), 0) + 1
    for fqn, module, _ in swaps:
        if counts[id(module.weight)] > 1:
            raise ValueError(f"LoRA on the tied weight of {fqn!r} is not supported; exclude it")


def _qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, QAT_MODULES)]


def set_step(model: nn.Module, step: int) -> None:
    """Tell the model the training step: layers turn fake-quant on at their `start_step`."""
    for _, module in _qat_modules(model):
        module.fake_quant_enabled = step >= module.start_step


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> None:
    """Force fake-quant on or off in every prepared layer (e.g. to compare float vs QAT)."""
    for _, module in _qat_modules(model):
        module.fake_quant_enabled = enabled


def convert(model: nn.Module) -> QuantizeSummary:
    """Replace every fake-quantized layer by its stock layer holding the quantized weight
    (LoRA merged first). All weights are quantized before any layer is swapped."""
    modules = _qat_modules(model)
    if not modules:
        raise ValueError(
            "convert found no QAT-prepared layers; call lowbit.qat.prepare(model, config) "
            "and train before converting (use lowbit.quantize_ for post-training quantization)"
        )
    summary = QuantizeSummary()
    new_weights: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for fqn, module in modules:
            key = id(module.weight)
            if key not in new_weights:
                w = module.merged_weight().detach()
                q = module.fake_quant.to_quantized(w)
                new_weights[key] = nn.Parameter(q, requires_grad=False)
                summary.bytes_before += w.numel() * w.element_size()
                summary.bytes_after += q.nbytes_stored()
            summary.quantized[fqn] = repr(new_weights[key].data)
    for fqn, module in modules:
        model.set_submodule(fqn, plain_module(module, new_weights[id(module.weight)]))
    return summary
