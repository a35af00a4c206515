"""FSDP2 fp8 all-gather for tensorwise fp8 training: weights cross the network in 1 byte.

With FSDP2 (`fully_shard`) each process keeps a shard of every weight and all-gathers the full
weight before a layer runs. A tensorwise fp8 linear casts that full weight to fp8 right after,
so the shards can be cast first and gathered as fp8: half the all-gather bytes of bf16 (a
quarter of fp32), the same fp8 weight, because the scale comes from the amax of the *whole*
weight (the shards' amaxes reduced with MAX across processes).

- `enable_fp8_all_gather(model)` (before `fully_shard`) wraps each tensorwise
  `Float8TrainingLinear`'s weight in `Float8AllGatherWeight`. It behaves as the plain weight
  (optimizers, state dicts, unsharded use) and carries FSDP2's all-gather extension methods.
- `precompute_fp8_scales(model)` (after each `optimizer.step()`) computes every sharded
  weight's scale in one all-reduce, instead of one small all-reduce per weight inside the
  all-gathers, and casts all the shards in one compiled call; the forward's and the
  backward's all-gathers then send those bytes as they are. Each cast remembers the weight
  version it was made for; a weight changed since is cast afresh inside its all-gather, so a
  missed call costs speed, never correctness.
- After the all-gather the layer sees a `Float8GatheredWeight` (fp8 data + scale) and its
  forward and backward GEMMs use that data directly instead of casting.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from lowbit.formats.fp8 import fp8_scale_from_amax, saturating_cast
from lowbit.training.fp8_gemm import TRAIN_MM_OP
from lowbit.training.recipes import Float8TrainingRecipe

aten = torch.ops.aten
# float32 elements per precomputed scale row: 16 bytes, the alignment cuBLASLt's scales need.
_SCALE_ROW = 4

# Ops that FSDP2 and optimizers apply to a parameter and that must keep the wrapper (sharding
# splits it, pads it into new zeros, views and copies it); anything else computes on the plain
# high-precision tensor and returns plain tensors.
_KEEP_WRAPPER = {
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.as_strided.default, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.new_zeros.default, aten.empty_like.default, aten.clone.default, aten._to_copy.default,
}


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (or FSDP shard) that FSDP2 all-gathers in fp8."""

    _hp: torch.Tensor
    recipe: Float8TrainingRecipe

    @staticmethod
    def __new__(cls, hp: torch.Tensor, recipe: Float8TrainingRecipe) -> Float8AllGatherWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, hp.size(), strides=hp.stride(), storage_offset=hp.storage_offset(),
            dtype=hp.dtype, device=hp.device, requires_grad=hp.requires_grad,
        )

    def __init__(self, hp: torch.Tensor, recipe: Float8TrainingRecipe) -> None:
        self._hp = hp
        self.recipe = recipe
        # (fp8 shard, scale, version of _hp they were made for), set by precompute_fp8_scales.
        self._precomputed: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __repr__(self) -> str:
        return f"Float8AllGatherWeight({self._hp!r}, recipe={self.recipe.name})"

    def __tensor_flatten__(self):
        return ["_hp"], self.recipe

    @staticmethod
    def __tensor_unflatten__(inner, recipe, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_hp"], recipe)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain_args, plain_kwargs = tree_map_only(cls, lambda t: t._hp, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        if func._schema.is_mutable and args and isinstance(args[0], cls):
            return args[0]  # in place: the wrapper itself, as aliasing requires
        if func in _KEEP_WRAPPER:
            recipe = next(a.recipe for a in tree_leaves(args) if isinstance(a, cls))
            return tree_map_only(torch.Tensor, lambda t: cls(t, recipe), out)
        return out

    # ---- FSDP2 all-gather extension -------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This shard cast to fp8 with the whole weight's scale (the all-gather input)."""
        if self._precomputed is not None and self._precomputed[2] == self._hp._version:
            data, scale, _ = self._precomputed
        else:
            scale = self._scale(mesh)
            data = cast_shard_to_fp8(self._hp, scale, self.recipe.forward_dtype)
        # An uneven last shard is padded to the others' rows (zeros are exact in fp8).
        rows = math.ceil(outer_size[0] / mesh.size())
        if data.shape[0] < rows:
            pad = data.new_zeros((rows - data.shape[0], *data.shape[1:]))
            data = torch.cat([data.view(torch.uint8), pad.view(torch.uint8)]).view(data.dtype)
        return (data,), (scale,)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (data,), (scale,) = outputs, metadata
        # Scales are never written in place (each cast makes a new one), so the gathered weight
        # can hold the very tensor: autograd keeps whichever one a pending backward saved.
        if out is not None:
            out._scale = scale  # FSDP refilled the same data buffer
            return None
        return Float8GatheredWeight(data, scale, param_dtype), (data,)

    def _scale(self, mesh) -> torch.Tensor:
        amax = shard_amaxes([self._hp.detach()]).reshape(1, 1)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return fp8_scale_from_amax(amax, self.recipe.forward_dtype, self.recipe.power_of_2_scales)


def _cast_to_fp8(hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return saturating_cast(hp.float() / scale, dtype)


# One kernel (read the shard, write fp8) in place of eager's four passes (float, divide, clamp,
# cast) through fp32 temporaries; inductor's division is IEEE-rounded, so the codes are equal.
_cast_to_fp8_fused = torch.compile(_cast_to_fp8, fullgraph=True)


def cast_shard_to_fp8(hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      fused: bool | None = None) -> torch.Tensor:
    """hp / scale saturated to fp8 (scale: one float32 element). FSDP2 runs this eagerly on a
    weight shard before its all-gather when no precomputed cast is current, so on CUDA it runs
    compiled (`fused` overrides the choice)."""
    use_fused = hp.is_cuda if fused is None else fused
    return (_cast_to_fp8_fused if use_fused else _cast_to_fp8)(hp, scale, dtype)


def _cast_all_to_fp8(hps: list[torch.Tensor], scales: torch.Tensor, index: list[int],
                     dtype: torch.dtype) -> list[torch.Tensor]:
    return [_cast_to_fp8(hp, scales[i, :1], dtype) for hp, i in zip(hps, index)]


# All shards in one compiled call: a compiled call costs tens of microseconds of host time, and
# one per weight per all-gather (forward and backward) left the GPU waiting on the host.
# The shapes never change, so no dynamic-shape kernels.
_cast_all_to_fp8_fused = torch.compile(_cast_all_to_fp8, fullgraph=True, dynamic=False)


def cast_shards_to_fp8(hps: list[torch.Tensor], scales: torch.Tensor, index: list[int],
                       dtype: torch.dtype, fused: bool | None = None) -> list[torch.Tensor]:
    """`cast_shard_to_fp8` of each hps[j] with scales[index[j], 0] (scales [n, k]), in one
    call. Python ints pick the scales: an index tensor would have to come from the host."""
    use_fused = hps[0].is_cuda if fused is None else fused
    return (_cast_all_to_fp8_fused if use_fused else _cast_all_to_fp8)(hps, scales, index, dtype)


class Float8GatheredWeight(torch.Tensor):
    """The all-gathered weight as the layer sees it: fp8 data and its scale, with the shape
    and (high-precision) dtype of the weight. Float8TrainingLinear uses the data directly; any
    other op sees the dequantized weight."""

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=dtype, device=data.device,
        )

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self._data = data
        self._scale = scale

    def __repr__(self) -> str:
        return f"Float8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Float8GatheredWeight(inner["_data"], inner["_scale"], dtype)

    def dequantize(self) -> torch.Tensor:
        return (self._data.float() * self._scale).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name() == TRAIN_MM_OP:
            # The op reads only its pre-cast operands; the weight argument routes gradients.
            return func(*tree_map_only(cls, lambda t: t._data, args), **kwargs)
        if func in (aten.detach.default, aten.alias.default, aten.as_strided.default,
                    aten.view.default):
            (self, *rest) = args
            return cls(func(self._data, *rest, **kwargs), self._scale, self.dtype)
        return func(*tree_map_only(cls, lambda t: t.dequantize(), args),
                    **tree_map_only(cls, lambda t: t.dequantize(), kwargs))


def enable_fp8_all_gather(model: nn.Module) -> int:
    """Wrap the weights of tensorwise Float8TrainingLinear modules so that FSDP2 all-gathers
    them in fp8. Call after `convert_to_float8_training` and before `fully_shard`. Returns how
    many weights were wrapped; rowwise layers are left alone (their scales are per row of the
    GEMM's contraction dim, which a shard along rows cannot cast on its own)."""
    from lowbit.training.float8_linear import Float8TrainingLinear

    wrapped = 0
    for module in model.modules():
        if isinstance(module, Float8TrainingLinear) and not module.recipe.rowwise:
            weight = module.weight
            if not isinstance(weight.data, Float8AllGatherWeight):
                module.weight = nn.Parameter(Float8AllGatherWeight(weight.data, module.recipe),
                                             requires_grad=weight.requires_grad)
                wrapped += 1
    return wrapped


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def shard_amaxes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |x| of each tensor as float32 [len(tensors)], from one multi-tensor launch
    (`_foreach_norm` with ord=inf, exact in any dtype). An empty shard gives 0: FSDP2 leaves a
    process no rows of a weight with fewer rows than processes."""
    filled = [t for t in tensors if t.numel()]
    norms = iter(torch._foreach_norm(filled, math.inf) if filled else ())
    zero = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    # Gathered by stacking, not by indexing with a list: a list index is a host tensor whose
    # copy to the GPU waits for the stream, which stalled every step here.
    return torch.stack([next(norms).float() if t.numel() else zero for t in tensors])


@torch.no_grad()
def precompute_fp8_scales(model: nn.Module) -> None:
    """Every fp8-all-gathered weight's scale from one all-reduce of all their shards' amaxes,
    and every shard cast to fp8 with it (call after `optimizer.step()`; a no-op without such
    weights). The amaxes come from one multi-tensor launch, the scales from one small vector
    op per recipe and the casts from one compiled call per recipe; the fp8 shards (1 byte per
    element of this process's shard) are kept until the weights change."""
    params = [p for p in model.parameters() if isinstance(_local(p), Float8AllGatherWeight)]
    if not params:
        return
    shards = [_local(p) for p in params]
    amax = shard_amaxes([s._hp for s in shards])
    if hasattr(params[0], "device_mesh"):
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=params[0].device_mesh.get_group())
    by_recipe: dict[tuple[torch.dtype, bool], list[int]] = {}
    for i, shard in enumerate(shards):
        key = (shard.recipe.forward_dtype, shard.recipe.power_of_2_scales)
        by_recipe.setdefault(key, []).append(i)
    for (dtype, power_of_2), index in by_recipe.items():
        # Scales for the whole (short) amax vector, then integer picks: views, no host sync.
        # Rows padded to 16 bytes: cuBLASLt refuses a scale pointer that is not 16-byte aligned.
        scales = fp8_scale_from_amax(amax.reshape(-1, 1, 1), dtype, power_of_2)
        scales = F.pad(scales.reshape(-1, 1), (0, _SCALE_ROW - 1))
        datas = cast_shards_to_fp8([shards[i]._hp for i in index], scales, index, dtype)
        for i, data in zip(index, datas):
            shards[i]._precomputed = (data, scales[i, :1].view(1, 1), shards[i]._hp._version)
