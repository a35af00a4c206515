"""`QuantizedState`: one optimizer moment stored block-wise quantized, as a tensor subclass.

A subclass (rather than a dataclass in the state dict) because then the optimizer state is
made of tensors only: `torch.save(..., weights_only=True)`, `Optimizer.load_state_dict`'s
device moves, deepcopy and DTensor wrapping (FSDP2) all work on it, and
`__tensor_flatten__` tells every tool which plain tensors hold the bytes.

Fields: `codes` ([n_blocks, block * bits / 8] uint8, or [n_blocks, block] float8_e4m3fn),
`scale` ([n_blocks, 1] float32), `book` (the codec's code values, float32; absent for fp8);
attribute `codec` (a name in `codes.CODECS`). The logical shape is the parameter's and the
logical dtype is float32 (what the update computes in), whatever the parameter's dtype.
"""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from lowbit.optim.codes import (
    StateCodec,
    decode,
    encode,
    get_codec,
    n_blocks,
    table_tensor,
    to_blocks,
)
from lowbit.tensors.base import LowbitTensor

aten = torch.ops.aten

def is_dtensor(t: torch.Tensor) -> bool:
    """isinstance(t, DTensor) without importing torch.distributed.tensor (seconds on a busy
    machine): a DTensor can only exist once that module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


_SHARED: dict[tuple[str, str, str], torch.Tensor] = {}


def _shared(what: str, codec: StateCodec, device: torch.device | str) -> torch.Tensor | None:
    if codec.kind != "codebook":
        return None
    key = (what, codec.name, str(torch.device(device)))
    if key not in _SHARED:
        make = codec.book_tensor if what == "book" else lambda d: table_tensor(codec, d)
        _SHARED[key] = make(device)
    return _SHARED[key]


def shared_book(codec: StateCodec, device: torch.device | str) -> torch.Tensor | None:
    """One code-book tensor per (codec, device), shared by every state that uses it."""
    return _shared("book", codec, device)


def shared_table(codec: StateCodec, device: torch.device | str) -> torch.Tensor | None:
    """The encoder's lookup table (`codes.nearest_code`) per (codec, device); not stored in
    states: it is derived from the code book."""
    return _shared("table", codec, device)


class QuantizedState(LowbitTensor):
    tensor_fields = ("codes", "scale", "book")
    optional_fields = ("book",)
    attr_fields = ("codec",)

    @property
    def spec(self) -> StateCodec:
        return get_codec(self.codec)

    @classmethod
    def zeros(
        cls, shape: torch.Size | tuple, codec: str, device: torch.device | str
    ) -> QuantizedState:
        spec = get_codec(codec)
        numel = 1
        for s in shape:
            numel *= s
        nb = n_blocks(numel, spec.block)
        book = shared_book(spec, torch.device(device))
        if spec.kind == "fp8":
            codes = torch.zeros(nb, spec.block, dtype=torch.float8_e4m3fn, device=device)
        else:
            codes = torch.zeros(nb, spec.block * spec.bits // 8, dtype=torch.uint8, device=device)
        # A zero scale decodes every code to exactly 0, whatever the code book.
        scale = torch.zeros(nb, 1, dtype=torch.float32, device=device)
        return cls(shape=tuple(shape), dtype=torch.float32, codes=codes, scale=scale,
                   book=book, codec=codec)

    @classmethod
    def from_float(cls, x: torch.Tensor, codec: str) -> QuantizedState:
        spec = get_codec(codec)
        book = shared_book(spec, x.device)
        table = shared_table(spec, x.device)
        codes, scale = encode(to_blocks(x, spec.block), spec, book, table)
        return cls(shape=x.shape, dtype=torch.float32, codes=codes, scale=scale, book=book,
                   codec=codec)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = decode(self.codes, self.scale, self.spec, self.book).reshape(-1)
        return flat[: self.numel()].view(self.shape).to(dtype or torch.float32)


@QuantizedState.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """Device moves only: `Optimizer.load_state_dict` casts every state to the parameter's
    dtype, but a quantized moment always decodes to float32, so a dtype is ignored."""
    self, device = args[0], kwargs.get("device")
    if device is None:
        return self
    return self.map_tensors(lambda t: t.to(device=device))


@QuantizedState.implements(aten.view.default)
def _view(func, args, kwargs):
    """Same-shape views (DTensor.from_local takes one); the codes do not know other shapes."""
    self, shape = args[0], args[1]
    if tuple(shape) not in (tuple(self.shape), (-1,) if self.dim() == 1 else None):
        raise NotImplementedError(f"QuantizedState cannot be viewed as {tuple(shape)}")
    return return_and_correct_aliasing(func, args, kwargs, self.map_tensors(lambda t: t))
