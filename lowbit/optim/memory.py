"""Measure what optimizer states really occupy: bytes of the storages behind them.

Walks every tensor in `optimizer.state` down to plain tensors (through DTensor and tensor
subclasses such as `QuantizedState`) and sums the sizes of the distinct storages, so a shared
code book counts once, padding counts, and nothing is inferred from formats.
"""

from __future__ import annotations

import torch

from lowbit.optim.state import is_dtensor


def _plain_tensors(t: torch.Tensor):
    if is_dtensor(t):
        yield from _plain_tensors(t.to_local())
    elif type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _plain_tensors(getattr(t, n))
    else:
        yield t


def state_storage_bytes(optimizer: torch.optim.Optimizer, include_step: bool = False) -> int:
    """Bytes of distinct storages held by `optimizer.state` (this process's shards only).

    `include_step` counts the scalar step counters too (4 to 8 bytes per parameter tensor,
    not per element)."""
    seen: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or (key == "step" and not include_step):
                continue
            for t in _plain_tensors(value):
                storage = t.untyped_storage()
                seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
