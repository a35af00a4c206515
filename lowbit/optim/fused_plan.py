"""The fused step's host-side bookkeeping, kept per param group between steps.

Preparing ~200 parameters for the Triton launch (eligibility checks, moment formats, address
tables) took ~3 ms of Python per step, as long as the update itself of a 1B-parameter model
on an H200. Only the gradients' addresses change from step to step, so a `FusedPlan` keeps
the rest, and `grads()` confirms in one cheap pass that nothing it depends on has changed
(same parameters and states, same storage, gradients that the kernel can take); if anything
did, the optimizer takes its full path again and builds a new plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.optim.state import is_dtensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a DTensor holds on this rank (t itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class FusedLaunch:
    """One kernel launch: parameters sharing device, dtypes, moment formats and block.
    `table` is the kernel's host address table with the gradient row left to fill."""

    m_format: object
    v_format: object
    block: int
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    device: torch.device
    table: torch.Tensor
    members: list[int]  # positions in the group's parameter list


@dataclass
class FusedPlan:
    params: list[torch.Tensor]  # the group's parameters, in order
    states: list[dict | None]  # their state dicts (None: no gradient at build time)
    storages: list[int]  # their local data_ptr
    steps: list[torch.Tensor]  # step counters of the updated parameters
    launches: list[FusedLaunch]

    def grads(self, params: list[torch.Tensor], state: dict) -> list | None:
        """Each launch's local gradients, or None if the plan no longer applies."""
        if len(params) != len(self.params):
            return None
        for p, planned, st, ptr in zip(params, self.params, self.states, self.storages):
            if p is not planned or (p.grad is None) != (st is None):
                return None
            if st is not None and (state.get(p) is not st or local(p).data_ptr() != ptr):
                return None
        out = []
        for launch in self.launches:
            grads = [local(params[i].grad) for i in launch.members]
            for g in grads:
                if (g.dtype != launch.g_dtype or g.device != launch.device or g.is_sparse
                        or not g.is_contiguous() or g.data_ptr() % 16):
                    return None
            out.append(grads)
        return out
