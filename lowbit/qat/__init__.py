"""Quantization-aware training: fake-quant built from the PTQ configs' own codecs.

    summary = lowbit.qat.prepare(model, Int8DynamicActivationInt4Weight(group_size=64))
    ...train as usual (call lowbit.qat.set_step(model, step) when using start_step)...
    lowbit.qat.convert(model)   # == quantize_(model, config) on the trained weights
"""

from lowbit.qat.api import PrepareSummary, convert, enable_fake_quant, prepare, set_step
from lowbit.qat.fake_quantizers import (
    FakeQuantizer,
    fake_quantizer_for,
    register_fake_quantizer,
    supported_configs,
)
from lowbit.qat.modules import FakeQuantizedEmbedding, FakeQuantizedLinear, LoRA
from lowbit.qat.ste import straight_through

__all__ = [
    "FakeQuantizedEmbedding",
    "FakeQuantizedLinear",
    "FakeQuantizer",
    "LoRA",
    "PrepareSummary",
    "convert",
    "enable_fake_quant",
    "fake_quantizer_for",
    "prepare",
    "register_fake_quantizer",
    "set_step",
    "straight_through",
    "supported_configs",
]
