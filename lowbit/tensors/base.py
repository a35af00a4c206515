"""The base of every lowbit tensor: plumbing derived from declared field names.

A subclass declares `tensor_fields` (inner plain tensors; entries listed in
`optional_fields` may be None) and `attr_fields` (hashable Python values: ints, strings,
tuples). From those the base derives `__tensor_flatten__`/`__tensor_unflatten__` (what
torch.compile, export and FSDP2 need), detach/clone/to/_to_copy/copy_, row slicing, repr
and the op-table dispatch. A subclass only writes what is specific to its format: how to
dequantize, how to run `F.linear`, and how to slice its packed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten

OpImpl = Callable[..., Any]


class LowbitTensor(torch.Tensor):
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    attr_fields: ClassVar[tuple[str, ...]] = ()
    # Float inner tensors (scales, zeros) that follow the tensor's dtype on `.to(dtype)`.
    dtype_following_fields: ClassVar[tuple[str, ...]] = ()
    # Per-class op tables, filled with `implements` / `implements_function`.
    _dispatch_table: ClassVar[dict] = {}
    _function_table: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._dispatch_table = dict(getattr(cls, "_dispatch_table", {}))
        cls._function_table = dict(getattr(cls, "_function_table", {}))
        # The classes hold only tensors and plain attributes, so torch.load(weights_only=True)
        # may rebuild them.
        torch.serialization.add_safe_globals([cls])

    @staticmethod
    def __new__(cls, *, shape: torch.Size | tuple, dtype: torch.dtype, **fields: Any):
        first = fields[cls.tensor_fields[0]]
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=first.device, requires_grad=False
        )

    def __init__(self, *, shape: torch.Size | tuple, dtype: torch.dtype, **fields: Any):
        missing = [n for n in self.tensor_fields + self.attr_fields if n not in fields]
        if missing:
            raise TypeError(f"{type(self).__name__} missing fields {missing}")
        for name in self.tensor_fields + self.attr_fields:
            setattr(self, name, fields[name])
        self._mark_static_addresses()

    def _mark_static_addresses(self) -> None:
        """Weights never move, so CUDA graphs (torch.compile "reduce-overhead") may read them in
        place. Without this, the inner tensors of a subclass parameter count as ordinary inputs
        and every graph replay copies them first: measured 2.52 -> 1.48 ms per decode step for
        int4 on an 8-layer Llama-3-8B-sized model (benchmarks/RESULTS.md)."""
        if torch.compiler.is_compiling():
            return
        for t in self.inner_tensors().values():
            if t.is_cuda:
                torch._dynamo.mark_static_address(t, guard=False)

    # ---- field helpers -------------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.tensor_fields + self.attr_fields}

    def inner_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.tensor_fields if getattr(self, n) is not None}

    def attrs(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.attr_fields}

    def with_fields(self, shape=None, dtype=None, **changes: Any) -> LowbitTensor:
        """A new tensor of the same class with some fields replaced."""
        fields = self.fields()
        fields.update(changes)
        return type(self)(
            shape=self.shape if shape is None else shape,
            dtype=self.dtype if dtype is None else dtype,
            **fields,
        )

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor], **kw: Any) -> LowbitTensor:
        new = {n: fn(t) for n, t in self.inner_tensors().items()}
        return self.with_fields(**new, **kw)

    # ---- what subclasses provide -----------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def slice_rows(self, start: int, end: int) -> LowbitTensor:
        """Rows [start, end) of the logical (out_features, in_features) matrix."""
        raise NotImplementedError

    def nbytes_stored(self) -> int:
        """Bytes actually held by the inner tensors (what a checkpoint or the GPU stores)."""
        return sum(t.numel() * t.element_size() for t in self.inner_tensors().values())

    # ---- compile / export / FSDP plumbing ------------------------------------------------
    def _stable_hash_for_caching(self) -> str:
        """Compile-cache key: the format, not the data (inner tensors are graph inputs)."""
        return f"{type(self).__qualname__}:{self.attrs()}:{tuple(self.shape)}:{self.dtype}"

    def __tensor_flatten__(self):
        # Cached: dynamo's metadata guard calls this for every quantized weight on every call
        # of a compiled function (~5 us each uncached: ~1 ms a decode step at 224 weights).
        flat = self.__dict__.get("_flat")
        if flat is None:
            names = tuple(n for n in self.tensor_fields if getattr(self, n) is not None)
            flat = self.__dict__["_flat"] = (names, (tuple(self.attrs().items()), self.dtype))
        return list(flat[0]), flat[1]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.tensor_fields or name in self.attr_fields:
            self.__dict__.pop("_flat", None)  # the flatten cache describes the old fields
        super().__setattr__(name, value)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        attrs, dtype = meta
        fields = {n: inner.get(n) for n in cls.tensor_fields}
        fields.update(dict(attrs))
        return cls(shape=outer_size, dtype=dtype, **fields)

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs().items())
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, {attrs})"
        )

    # ---- dispatch ------------------------------------------------------------------------
    @classmethod
    def implements(cls, *ops: Any) -> Callable[[OpImpl], OpImpl]:
        """Register an aten-level implementation: fn(func, args, kwargs)."""

        def register(fn: OpImpl) -> OpImpl:
            for op in ops:
                cls._dispatch_table[op] = fn
            return fn

        return register

    @classmethod
    def implements_function(cls, *funcs: Any) -> Callable[[OpImpl], OpImpl]:
        """Register a torch-function-level implementation (F.linear): fn(func, args, kwargs)."""

        def register(fn: OpImpl) -> OpImpl:
            for f in funcs:
                cls._function_table[f] = fn
            return fn

        return register

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._function_table.get(func)
        if impl is not None:
            return impl(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._dispatch_table.get(func)
        if impl is None:
            raise NotImplementedError(
                f"{cls.__name__} does not support {func}. Call .dequantize() first if a "
                "full-precision copy is what you want."
            )
        return impl(func, args, kwargs)


@LowbitTensor.implements(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    self = args[0]
    return return_and_correct_aliasing(func, args, kwargs, self.map_tensors(func))


@LowbitTensor.implements(aten.clone.default)
def _clone(func, args, kwargs):
    self = args[0]
    return self.map_tensors(lambda t: t.clone())


@LowbitTensor.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """Device moves move every inner tensor; a dtype change sets the compute/output dtype
    and casts the scale-like fields that follow it (codes are never touched)."""
    self = args[0]
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    new = {}
    for name, t in self.inner_tensors().items():
        if device is not None:
            t = t.to(device=device)
        if dtype is not None and name in self.dtype_following_fields:
            t = t.to(dtype)
        new[name] = t
    return self.with_fields(dtype=dtype, **new)


@LowbitTensor.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if type(dst) is not type(src) or dst.attrs() != src.attrs() or dst.shape != src.shape:
        raise ValueError(
            f"cannot copy {src!r} into {dst!r}: format, attributes and shape must match "
            "(quantize the model with the same config before loading this state_dict)"
        )
    for name, t in dst.inner_tensors().items():
        t.copy_(getattr(src, name))
    return dst


@LowbitTensor.implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    self, dim, start, end, *rest = list(args) + [None] * (5 - len(args))
    step = rest[0] if rest and rest[0] is not None else 1
    n = self.shape[0]
    start = 0 if start is None else max(0, start + n if start < 0 else start)
    end = n if end is None else min(n, end + n if end < 0 else end)
    if dim != 0 or step != 1:
        raise NotImplementedError(
            f"{type(self).__name__} slices only rows (dim 0, step 1); got dim={dim} step={step}"
        )
    return self.slice_rows(start, end)


@LowbitTensor.implements(aten.narrow.default)
def _narrow(func, args, kwargs):
    self, dim, start, length = args
    return _slice(aten.slice.Tensor, (self, dim, start, start + length), {})


@LowbitTensor.implements(aten.is_same_size.default)
def _same_size(func, args, kwargs):
    return args[0].shape == args[1].shape
