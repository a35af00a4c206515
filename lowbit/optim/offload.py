"""`CPUOffloadOptimizer`: the optimizer, its states and fp32 parameter copies live on the host.

The accelerator then holds only the model's parameters (and gradients until they are
copied out). Each gradient is copied to pinned host memory on a side stream as soon as
autograd finishes accumulating it (a post-accumulate-grad hook), so the device-to-host
traffic overlaps the rest of the backward pass. `step()` waits for those copies, steps the
host optimizer (any `torch.optim.Optimizer` class: `torch.optim.AdamW`, or a low-bit one to
shrink host memory too), then copies the parameters back asynchronously on the side stream;
the compute stream waits for them before its next use.

With `offload_gradients=True` the device gradient is freed right after its copy, saving one
more parameter-sized buffer on the device; gradients are then not accumulated across
backward passes (call `step()` after every backward).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class CPUOffloadOptimizer:
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        offload_gradients: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        groups = list(params)
        if not groups:
            raise ValueError("CPUOffloadOptimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.offload_gradients = offload_gradients
        self._pairs: list[tuple[torch.Tensor, torch.nn.Parameter]] = []
        self._host_grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._ready: set[int] = set()
        cuda = any(p.is_cuda for g in groups for p in g["params"])
        self._stream = torch.cuda.Stream() if cuda else None
        host_groups = []
        for group in groups:
            host_params = []
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("CPUOffloadOptimizer does not support complex parameters")
                host = torch.nn.Parameter(self._host_like(p).copy_(p.detach()))
                self._host_grads[host] = self._host_like(p)
                self._pairs.append((p, host))
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._make_hook(len(self._pairs) - 1))
                host_params.append(host)
            host_groups.append({**group, "params": host_params})
        self.optimizer = optimizer_class(host_groups, **optimizer_kwargs)

    @staticmethod
    def _host_like(p: torch.Tensor) -> torch.Tensor:
        return torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=p.is_cuda)

    def _make_hook(self, index: int):
        def hook(p: torch.Tensor) -> None:
            _, host = self._pairs[index]
            buf = self._host_grads[host]
            if p.grad.is_sparse:
                raise ValueError("CPUOffloadOptimizer does not support sparse gradients")
            if self._stream is None:
                buf.copy_(p.grad)
            else:
                self._stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._stream):
                    buf.copy_(p.grad, non_blocking=True)
                if self.offload_gradients:
                    p.grad.record_stream(self._stream)
            if self.offload_gradients:
                p.grad = None
            self._ready.add(index)

        return hook

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The host optimizer's groups (give `self.optimizer` to an lr scheduler)."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._stream is not None:
            self._stream.synchronize()
        for i, (_, host) in enumerate(self._pairs):
            host.grad = self._host_grads[host] if i in self._ready else None
        self.optimizer.step()
        if self._stream is None:
            for i in self._ready:
                p, host = self._pairs[i]
                p.copy_(host)
        else:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for i in self._ready:
                    p, host = self._pairs[i]
                    p.copy_(host, non_blocking=True)
            torch.cuda.current_stream().wait_stream(self._stream)
        self._ready.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self._pairs:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the host optimizer's state and refresh the host parameter copies from the
        model (load the model's checkpoint first)."""
        self.optimizer.load_state_dict(state_dict)
        with torch.no_grad():
            for p, host in self._pairs:
                host.copy_(p.detach())
