"""Per-channel scale migration (SmoothQuant), and finding where such scales can be folded.

SmoothQuant divides input channel j of a linear by s_j and multiplies the weight's column j
by s_j: the product is unchanged, but activation outliers shrink (they are divided) while
weights, which quantize per output channel, absorb them. With
s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), alpha sets how much difficulty moves.

The division must happen for free, inside the op that produces the input: a norm's
elementwise weight, or the output rows of a linear. Which op that is, and which linears read
its output, is found by experiment rather than by module names: scale a candidate's output
channels by random factors and see which linears' inputs scale by exactly those factors;
then apply the real fold to the parameters and check that the stage's output is unchanged.
AWQ uses the same groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.tensors import LowbitTensor

Originals = list[tuple[nn.Module, str, nn.Parameter]]


@dataclass
class ScaleGroup:
    """Linears (`consumers`, in execution order) that all read `producer`'s output.

    `pattern` names the producer and consumers relative to the searched module: the next
    block of a model usually has the same groups, and then only needs them verified."""

    producer_name: str
    producer: nn.Module
    consumers: list[str]
    pattern: tuple[str, tuple[str, ...]]


def smooth_scale(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
                 ) -> torch.Tensor:
    """SmoothQuant's per-channel scales; channels never active keep scale 1."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = x_absmax.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(x_absmax > 0, s.clamp(min=1e-5), torch.ones_like(s))


def fold_width(module: nn.Module) -> int | None:
    """Output channels whose scale can be folded into `module`'s parameters, else None."""
    if isinstance(module, nn.Linear):
        return None if isinstance(module.weight, LowbitTensor) else module.out_features
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    elementwise = (
        isinstance(weight, nn.Parameter) and weight.dim() == 1 and weight.is_floating_point()
    )
    if not elementwise or next(module.children(), None) is not None:
        return None
    if bias is not None and (not isinstance(bias, nn.Parameter) or bias.shape != weight.shape):
        return None
    return weight.numel()


def _replace(module: nn.Module, name: str, value: torch.Tensor, originals: Originals) -> None:
    originals.append((module, name, getattr(module, name)))
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def fold(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> Originals:
    """Divide the producer's output channels by s, multiply the consumers' inputs by s.

    Parameters are replaced, never changed in place; the returned originals undo it."""
    originals: Originals = []
    weight = producer.weight
    s = s.to(weight.device)
    shape = (-1, 1) if isinstance(producer, nn.Linear) else (-1,)
    _replace(producer, "weight", weight.detach() / s.reshape(shape).to(weight.dtype), originals)
    bias = getattr(producer, "bias", None)
    if bias is not None:
        _replace(producer, "bias", bias.detach() / s.to(bias.dtype), originals)
    for c in consumers:
        _replace(c, "weight", c.weight.detach() * s.to(c.weight.dtype), originals)
    return originals


def restore(originals: Originals) -> None:
    for module, name, param in reversed(originals):
        setattr(module, name, param)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 3e-2
    return a.shape == b.shape and bool((a - b).float().norm() <= tol * b.float().norm())


def find_scale_groups(
    root: nn.Module,
    run: Callable[[], torch.Tensor],
    consumers: dict[str, nn.Linear],
    frozen: set[int],
    hint: list[tuple[str, tuple[str, ...]]] | None = None,
    seed: int = 0,
) -> tuple[list[ScaleGroup], list[str]]:
    """Producer -> consumers groups inside `root`, and the consumers' execution order.

    `run` evaluates the stage on one calibration batch and returns its output; parameters
    in `frozen` (tied to modules elsewhere) are never scaled. `hint` (the patterns of the
    previous block's groups) is tried first: if every hinted fold is exact here, the search
    is skipped.
    """
    inputs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def recorder(fqn: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs[fqn] = args[0] if args else kwargs["input"]
            if fqn not in order:
                order.append(fqn)
        return hook

    handles = [m.register_forward_pre_hook(recorder(f), with_kwargs=True)
               for f, m in consumers.items()]
    gen = torch.Generator().manual_seed(seed)
    groups: list[ScaleGroup] = []
    try:
        reference = run()
        reference_inputs = dict(inputs)
        remaining = {f: m for f, m in consumers.items() if f in reference_inputs}
        names = {id(m): n for n, m in root.named_modules()}
        if hint is not None:
            hinted = _groups_from_hint(root, hint, remaining, names, frozen, gen, run, reference)
            if hinted is not None:
                return _in_order(hinted, order), order
        for name, module in root.named_modules():
            if not _foldable(module, frozen):
                continue
            width = fold_width(module)
            candidates = [f for f, m in remaining.items() if m.in_features == width]
            if not candidates:
                continue
            r = torch.rand(width, generator=gen, dtype=torch.float64) * 1.5 + 0.5
            members = _scaled_consumers(module, run, inputs, reference_inputs, candidates, r)
            if members and _fold_is_exact(module, [consumers[f] for f in members], r, run,
                                          reference):
                pattern = (name, tuple(names[id(consumers[f])] for f in members))
                groups.append(ScaleGroup(name, module, members, pattern))
                for f in members:
                    remaining.pop(f)
    finally:
        for h in handles:
            h.remove()
    return _in_order(groups, order), order


def _in_order(groups: list[ScaleGroup], order: list[str]) -> list[ScaleGroup]:
    """Consumers in execution order inside each group."""
    for g in groups:
        g.consumers.sort(key=order.index)
    return groups


def _foldable(module: nn.Module, frozen: set[int]) -> bool:
    params = (getattr(module, "weight", None), getattr(module, "bias", None))
    return fold_width(module) is not None and not any(
        id(p) in frozen for p in params if p is not None
    )


def _groups_from_hint(root, hint, remaining, names, frozen, gen, run, reference
                      ) -> list[ScaleGroup] | None:
    """The hinted groups if each exists here and folds exactly, else None."""
    modules = dict(root.named_modules())
    by_name = {names[id(m)]: f for f, m in remaining.items()}
    groups = []
    for producer_name, consumer_names in hint:
        producer = modules.get(producer_name)
        members = [by_name.get(c) for c in consumer_names]
        if producer is None or None in members or not _foldable(producer, frozen):
            return None
        r = torch.rand(fold_width(producer), generator=gen, dtype=torch.float64) * 1.5 + 0.5
        if not _fold_is_exact(producer, [remaining[f] for f in members], r, run, reference):
            return None
        groups.append(ScaleGroup(producer_name, producer, members,
                                 (producer_name, tuple(consumer_names))))
    return groups


def _scaled_consumers(module, run, inputs, reference_inputs, candidates, r) -> list[str]:
    """Candidates whose input is exactly `module`'s output times r when that output is."""
    def scale_output(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * r.to(out.device, out.dtype)

    handle = module.register_forward_hook(scale_output)
    try:
        inputs.clear()
        run()
    finally:
        handle.remove()
    return [
        f for f in candidates
        if f in inputs and _close(inputs[f], reference_inputs[f] * r.to(inputs[f]))
    ]


def _fold_is_exact(producer, consumers, r, run, reference) -> bool:
    """Apply the fold with scales 1/r for real and check the stage output does not move."""
    originals = fold(producer, consumers, 1 / r)
    try:
        return _close(run(), reference)
    finally:
        restore(originals)
