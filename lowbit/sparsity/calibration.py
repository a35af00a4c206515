"""Input-channel statistics of linears over calibration batches (what WANDA needs).

One forward pass of the dense model with pre-hooks on the chosen linears accumulates, per
input channel, the sum of squares over all tokens; WANDA scores use its square root. Batches
are token-id tensors [B, T] (or [T]) or dicts of model kwargs, as for `quantize_`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.progress import progress


def _run(model: nn.Module, batch) -> None:
    device = next(model.parameters()).device
    if isinstance(batch, dict):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    else:
        ids = torch.as_tensor(batch)
        model((ids.reshape(1, -1) if ids.dim() == 1 else ids).to(device))


@torch.no_grad()
def input_channel_norms(
    model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{name: L2 norm over calibration tokens of each input channel} for `linears`.

    Raises ValueError if a linear saw no token (the data never reaches it)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().pow(2).sum(0).cpu()
            tokens[name] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        batches = list(batches)
        for batch in progress(batches, "wanda calibration", len(batches), show_progress):
            _run(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    unseen = [name for name, count in tokens.items() if count == 0]
    if unseen:
        raise ValueError(f"calibration data never reached {unseen[:5]}; WANDA needs their inputs")
    return {name: s.sqrt().float() for name, s in sums.items()}
