"""Adam and AdamW with 8-bit, 4-bit or fp8 moments.

| class | first moment | second moment | block | state bytes / param |
|---|---|---|---|---|
| `AdamW8bit`, `Adam8bit` | dynamic8 | dynamic8_unsigned | 256 | 2 + 8/256 = 2.03 |
| `AdamW4bit`, `Adam4bit` | quantile4 | linear4_unsigned | 128 | 1 + 8/128 = 1.06 |
| `AdamWFp8`, `AdamFp8` | fp8 e4m3 | fp8 e4m3 (never 0) | 256 | 2 + 8/256 = 2.03 |

(`codes.py` documents the code books.) Parameters with fewer than `min_quantize_numel`
elements (norms, biases: a negligible share of bytes, but sensitive) keep float32 moments.

Hyperparameters, param groups, closures and learning-rate schedulers behave as in
`torch.optim.AdamW`; clip gradients with `torch.nn.utils.clip_grad_norm_` before `step()` as
usual. FSDP2 (DTensor) parameters are updated shard by shard: each state is a DTensor
wrapping the local shard's `QuantizedState`, so it shards, saves and loads like the param.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from lowbit.optim.codes import get_codec
from lowbit.optim.functional import adam_step_, state_fields
from lowbit.optim.fused_plan import FusedLaunch, FusedPlan
from lowbit.optim.fused_plan import local as _local
from lowbit.optim.state import QuantizedState, is_dtensor, shared_table

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Blocks of a fused step whose moments are both float32 (small parameters).
_FLOAT32_BLOCK = 1024


class _LowBitAdam(torch.optim.Optimizer):
    m_codec: ClassVar[str]
    v_codec: ClassVar[str]
    decoupled: ClassVar[bool]

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        min_quantize_numel: int = 4096,
        fused: bool | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        """fused: run the update as one Triton kernel per parameter (default: on CUDA
        parameters; True on CPU only under TRITON_INTERPRET=1, for tests).
        bf16_stochastic_round: round bfloat16 parameters stochastically after the fp32 update,
        so small updates are not lost (useful when there is no fp32 master copy)."""
        if weight_decay is None:
            weight_decay = 1e-2 if self.decoupled else 0.0
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"invalid betas {betas}: need two values in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        if min_quantize_numel < 0:
            raise ValueError(f"min_quantize_numel must be >= 0, got {min_quantize_numel}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.min_quantize_numel = min_quantize_numel
        self.fused = fused
        self.bf16_stochastic_round = bf16_stochastic_round
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (got a "
                    f"{p.dtype} parameter of shape {tuple(p.shape)}); view it as real with "
                    "torch.view_as_real"
                )
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters, "
                                 f"got {p.dtype}")

    # ---- state ---------------------------------------------------------------------------
    def _new_moment(self, p: torch.Tensor, codec: str) -> torch.Tensor:
        local = _local(p)
        if local.numel() < self.min_quantize_numel:
            return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        q = QuantizedState.zeros(local.shape, codec, local.device)
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(
                q, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        return q

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        state["exp_avg"] = self._new_moment(p, self.m_codec)
        state["exp_avg_sq"] = self._new_moment(p, self.v_codec)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `Optimizer.load_state_dict`, but states keep their dtype (float32 or quantized):
        the stock loader casts them to each parameter's dtype, which would round fp32 moments
        of bf16 parameters and break resume equality."""
        groups = state_dict["param_groups"]
        super().load_state_dict({"state": {}, "param_groups": groups})
        saved_ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            device = _local(p).device
            self.state[p] = {
                k: (v.to(device=device) if k == "step" else v.to(device=p.device))
                for k, v in saved.items()
            }

    # ---- the step ------------------------------------------------------------------------
    def _use_fused(self, p: torch.Tensor, grad: torch.Tensor) -> bool:
        """The Triton kernel takes contiguous, 16-byte aligned p and grad (a view at an odd
        offset, rare, takes the plain path)."""
        if self.fused is False or not (p.is_contiguous() and grad.is_contiguous()):
            return False
        if HAS_TRITON and (p.is_cuda or self.fused):
            from lowbit.kernels.triton.adam import aligned

            if not (aligned(p) and aligned(grad)):
                return False
        if p.is_cuda:
            return HAS_TRITON
        if self.fused and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{type(self).__name__}(fused=True) runs a Triton kernel: it needs CUDA "
                f"parameters (got {p.device}); use fused=None or False on this device"
            )
        return bool(self.fused)

    @staticmethod
    def _fused_moment(state: torch.Tensor) -> tuple[object, tuple]:
        """(MomentFormat, (codes, scale)) of one moment for the fused kernel."""
        from lowbit.kernels.triton.adam import BOOK4, BOOK8, FLOAT32, FP8, MomentFormat

        if not isinstance(state, QuantizedState):
            return MomentFormat(FLOAT32), (state, None)
        spec = get_codec(state.codec)
        if spec.kind == "fp8":
            return MomentFormat(FP8, spec.positive), (state.codes.view(torch.uint8), state.scale)
        fmt = MomentFormat(BOOK4 if spec.bits == 4 else BOOK8, spec.positive, spec.lut_bits,
                           spec.lut_first_cell, state.book, shared_table(spec, state.device))
        return fmt, (state.codes, state.scale)

    def _build_plan(self, group: dict, work: list) -> FusedPlan:
        """Group the fused parameters into launches (one per device, dtypes, moment formats
        and block: typically two, the quantized and the small ones) with their address
        tables. work: (position in the group, local p, local grad, state)."""
        from lowbit.kernels.triton.adam import FusedParam, address_table

        launches: dict[tuple, tuple] = {}
        for i, local, grad, state in work:
            m_state = _local(state["exp_avg"])
            m_fmt, m = self._fused_moment(m_state)
            v_fmt, v = self._fused_moment(_local(state["exp_avg_sq"]))
            block = (m_state.spec.block if isinstance(m_state, QuantizedState)
                     else _FLOAT32_BLOCK)
            # Formats hold shared code-book tensors: key on their identity.
            key = (local.device, local.dtype, grad.dtype, block,
                   tuple(map(id, m_fmt)), tuple(map(id, v_fmt)))
            entry = launches.setdefault(key, (m_fmt, v_fmt, block, [], []))
            entry[3].append(FusedParam(local.detach(), grad, state["step"], m, v))
            entry[4].append(i)
        params = group["params"]
        states: list[dict | None] = [None] * len(params)
        for i, _, _, state in work:
            states[i] = state
        for i, p in enumerate(params):  # updated elsewhere or empty: still part of the plan
            if p.grad is not None and states[i] is None:
                states[i] = self.state[p]
        return FusedPlan(
            params=list(params), states=states, storages=[_local(p).data_ptr() for p in params],
            steps=[state["step"] for *_, state in work],
            launches=[FusedLaunch(m_fmt, v_fmt, block, fps[0].p.dtype, fps[0].grad.dtype,
                                  fps[0].p.device, address_table(fps), members)
                      for m_fmt, v_fmt, block, fps, members in launches.values()],
        )

    def _run_plan(self, plan: FusedPlan, grads: list, group: dict) -> None:
        """One multi-tensor step increment, then one Triton launch per `FusedLaunch`."""
        from lowbit.kernels.triton.adam import fused_adam_step_

        torch._foreach_add_(plan.steps, 1.0)
        hypers: dict[torch.device, torch.Tensor] = {}
        for launch, launch_grads in zip(plan.launches, grads):
            if launch.device not in hypers:
                hypers[launch.device] = self._hyper(group, launch.device)
            table = launch.table.clone()
            table[1] = torch.tensor([g.data_ptr() for g in launch_grads], dtype=torch.int64)
            seed = None
            if self.bf16_stochastic_round and launch.p_dtype == torch.bfloat16:
                seed = int(torch.randint(0, 2**31 - 1, ()))
            fused_adam_step_(table, hypers[launch.device], launch.m_format, launch.v_format,
                             p_dtype=launch.p_dtype, g_dtype=launch.g_dtype,
                             block=launch.block, decoupled=self.decoupled,
                             stochastic_bf16_seed=seed)

    @staticmethod
    def _hyper(group: dict, device: torch.device) -> torch.Tensor:
        """float32 [lr, beta1, beta2, eps, weight_decay] on the device: read by the update
        from memory, so changing lr never recompiles or syncs."""
        b1, b2 = group["betas"]
        vals = [float(group["lr"]), b1, b2, group["eps"], group["weight_decay"]]
        return torch.tensor(vals, dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self.__dict__.setdefault("_plans", {})  # not pickled with the optimizer
        for group in self.param_groups:
            plan = plans.get(id(group))
            grads = plan.grads(group["params"], self.state) if plan is not None else None
            if grads is not None:
                self._run_plan(plan, grads, group)
            else:
                plans[id(group)] = self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> FusedPlan | None:
        """The full path: initialise states, check every parameter, update those the kernel
        cannot take one by one and the rest through a new plan; returns the plan if it covers
        every updated parameter (then later steps reuse it)."""
        hypers: dict[torch.device, torch.Tensor] = {}
        fused_work, plain = [], 0
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients; use "
                    "torch.optim.SparseAdam or a dense embedding"
                )
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            local, grad = _local(p), _local(p.grad)
            if local.numel() == 0:
                continue
            if state["step"].device != local.device:
                state["step"] = state["step"].to(local.device)
            if self._use_fused(local, grad):
                fused_work.append((i, local, grad, state))
                continue
            plain += 1
            dev = local.device
            if dev not in hypers:
                hypers[dev] = self._hyper(group, dev)
            m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            quantized = isinstance(m, QuantizedState)
            adam_step_(
                local, grad.reshape(-1), state["step"], hypers[dev],
                state_fields(m), state_fields(v),
                m.codec if quantized else None, v.codec if quantized else None,
                self.decoupled, self.bf16_stochastic_round,
            )
        if not fused_work:
            return None
        plan = self._build_plan(group, fused_work)
        grad_at = {i: grad for i, _, grad, _ in fused_work}
        self._run_plan(plan, [[grad_at[i] for i in launch.members] for launch in plan.launches],
                       group)
        return plan if plain == 0 else None


class AdamW8bit(_LowBitAdam):
    """AdamW with 8-bit dynamic-code moments, blocks of 256 (2.03 bytes/param)."""

    m_codec, v_codec, decoupled = "dynamic8", "dynamic8_unsigned", True


class AdamW4bit(_LowBitAdam):
    """AdamW with 4-bit moments (normal-quantile first, linear zero-free second), blocks of 128
    (1.06 bytes/param)."""

    m_codec, v_codec, decoupled = "quantile4", "linear4_unsigned", True


class AdamWFp8(_LowBitAdam):
    """AdamW with float8 e4m3 moments and a scale per 256 values (2.03 bytes/param)."""

    m_codec, v_codec, decoupled = "fp8", "fp8_unsigned", True


class Adam8bit(AdamW8bit):
    """Adam (L2 weight decay added to the gradient) with AdamW8bit's states."""

    decoupled = False


class Adam4bit(AdamW4bit):
    """Adam (L2 weight decay added to the gradient) with AdamW4bit's states."""

    decoupled = False


class AdamFp8(AdamWFp8):
    """Adam (L2 weight decay added to the gradient) with AdamWFp8's states."""

    decoupled = False
