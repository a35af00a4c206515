"""Granularities: which elements of a tensor share one scale.

Every granularity resolves to a *block size* per dimension for a given shape; the numeric
code in this package only ever sees block sizes, so adding a granularity never touches the
quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass


class Granularity:
    """Base class; subclasses are small frozen dataclasses."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale per index of `axis` (axis 0 of a weight = one scale per output row)."""

    axis: int = 0

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = self.axis % len(shape)
        return tuple(1 if d == axis else s for d, s in enumerate(shape))


def PerRow() -> PerAxis:  # noqa: N802 - reads like the other granularity constructors
    """One scale per row (output channel of a weight, token of an activation)."""
    return PerAxis(0)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """Groups of `group_size` consecutive elements along the last dimension."""

    group_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (len(shape) - 1) + (self.group_size,)


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per token: everything but the last dimension indexes a token."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (len(shape) - 1) + (shape[-1],)


@dataclass(frozen=True)
class PerBlock(Granularity):
    """Rectangular tiles over the trailing dimensions, e.g. (128, 128) for weights."""

    block: tuple[int, ...] = (128, 128)

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        lead = len(shape) - len(self.block)
        if lead < 0:
            raise ValueError(f"block {self.block} has more dims than shape {tuple(shape)}")
        return (1,) * lead + tuple(self.block)


def check_divisible(shape: tuple[int, ...], block: tuple[int, ...]) -> str | None:
    """Why `shape` cannot be cut into `block` tiles, or None when it can."""
    for dim, (size, b) in enumerate(zip(shape, block)):
        if b <= 0 or size % b:
            return f"dim {dim} of size {size} is not divisible by block {b}"
    return None


_REGISTRY: dict[str, type[Granularity]] = {
    cls.__name__: cls for cls in (PerTensor, PerAxis, PerGroup, PerToken, PerBlock)
}


def granularity_to_dict(g: Granularity) -> dict:
    """JSON-ready description; the inverse of `granularity_from_dict`."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(g).items()}
    return {"type": type(g).__name__, **fields}


def granularity_from_dict(d: dict) -> Granularity:
    d = dict(d)
    name = d.pop("type")
    if name not in _REGISTRY:
        raise ValueError(f"unknown granularity {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
