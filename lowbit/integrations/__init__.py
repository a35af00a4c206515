"""Where lowbit models go: safetensors checkpoints, HF transformers (`hf`), compressed-tensors
for vLLM (`compressed_tensors`), torch.export / AOTInductor / ExecuTorch (`export`)."""

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
