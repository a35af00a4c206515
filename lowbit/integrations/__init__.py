"""Where lowbit models go: checkpoints now; HF transformers, export and more to come."""

from lowbit.integrations.checkpoint import (
    CheckpointError,
    load_quantized,
    load_state,
    read_metadata,
    register_tensor_class,
    save_quantized,
)

__all__ = [
    "CheckpointError",
    "load_quantized",
    "load_state",
    "read_metadata",
    "register_tensor_class",
    "save_quantized",
]
