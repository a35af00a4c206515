"""Reference Llama-style transformer with a static KV cache, used by benchmarks and tests."""

from lowbit.models.graphed import GraphedDecodeStep
from lowbit.models.llama import (
    KVCache,
    ModelArgs,
    Transformer,
    decode_one_token,
    fuse_projections_,
    generate,
    init_weights,
    sample,
)

__all__ = [
    "GraphedDecodeStep",
    "KVCache",
    "ModelArgs",
    "Transformer",
    "decode_one_token",
    "fuse_projections_",
    "generate",
    "init_weights",
    "sample",
]
