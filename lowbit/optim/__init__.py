"""Low-bit optimizers: Adam(W) with 8-bit, 4-bit or fp8 block-quantized moments, and a
wrapper that keeps optimizer states (and optionally gradients) in host memory.

    opt = lowbit.optim.AdamW4bit(model.parameters(), lr=1e-4)  # ~1.06 bytes of state / param
"""

from lowbit.optim.adam import Adam4bit, Adam8bit, AdamFp8, AdamW4bit, AdamW8bit, AdamWFp8
from lowbit.optim.codes import CODECS, StateCodec, get_codec
from lowbit.optim.memory import state_storage_bytes
from lowbit.optim.offload import CPUOffloadOptimizer
from lowbit.optim.state import QuantizedState

__all__ = [
    "CODECS",
    "Adam4bit",
    "Adam8bit",
    "AdamFp8",
    "AdamW4bit",
    "AdamW8bit",
    "AdamWFp8",
    "CPUOffloadOptimizer",
    "QuantizedState",
    "StateCodec",
    "get_codec",
    "state_storage_bytes",
]
