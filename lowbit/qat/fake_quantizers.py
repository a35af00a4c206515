"""Fake quantizers: one per PTQ config, built from the same codec calls as its handler.

A fake quantizer answers three questions for a layer under QAT:

- `fake_weight(w)`: the weight the converted layer will compute with (codec values,
  straight-through gradient);
- `linear(x, w, bias)`: the converted layer's forward, activation quantization included;
- `to_quantized(w)`: the lowbit tensor `convert` installs, which is exactly
  `quantize_weight(config, w)` (plus the learned scale, when ranges are learned).

Every quantizer here repeats its handler's parameters (`lowbit/quantize/handlers.py`);
tests/qat/test_numerics.py checks each against the handler bit for bit, so they cannot drift.
New configs plug in with `register_fake_quantizer`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import (
    AffineSpec,
    Granularity,
    PerAxis,
    PerGroup,
    PerTensor,
    choose_fp8_scale,
    choose_qparams,
    dequantize,
    dequantize_fp8,
    fp8_dtype,
    pack_bits,
    quantize,
    quantize_fp8,
)
from lowbit.formats.mx import (
    E2M1,
    elem_format,
    mx_fake_quantize,
    mx_quantize,
    nvfp4_fake_quantize,
    nvfp4_quantize,
    pack_elements,
)
from lowbit.kernels import mx_ops
from lowbit.kernels import reference as ref
from lowbit.qat.ste import exact_forward_linear, learned_scale_fake_quantize, straight_through
from lowbit.quantize.configs import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    QuantConfig,
)
from lowbit.quantize.handlers import quantize_weight
from lowbit.quantize.mx_configs import (
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
)
from lowbit.tensors import IntWeight, LowbitTensor


class FakeQuantizer(nn.Module):
    """Emulates one PTQ config during training. An nn.Module so that learned ranges are
    parameters that move, shard and checkpoint with the layer."""

    supports_learned_ranges = False

    def __init__(self, config: QuantConfig) -> None:
        super().__init__()
        self.config = config

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Weight-only default: the real path decodes the weight into x's dtype."""
        return F.linear(x, self.fake_weight(w).to(x.dtype), bias)

    def init_ranges(self, w: torch.Tensor) -> None:
        raise ValueError(f"{type(self.config).__name__} does not support learned ranges")

    def to_quantized(self, w: torch.Tensor) -> LowbitTensor:
        return quantize_weight(self.config, w)

    def extra_repr(self) -> str:
        return repr(self.config)


class AffineFakeQuantizer(FakeQuantizer):
    """Integer weights x ~= (q - zero) * scale, as `IntWeight.from_float` computes them."""

    supports_learned_ranges = True

    def __init__(
        self,
        config: QuantConfig,
        bits: int,
        granularity: Granularity,
        mapping: str = "symmetric",
        zero: str = "int",
    ) -> None:
        super().__init__(config)
        self.spec = AffineSpec(bits, mapping, zero)
        self.granularity = granularity
        # Filled by init_ranges when ranges are learned; None means "recompute every step".
        self.register_parameter("scale", None)
        self.register_buffer("zero", None)

    def _block(self, w: torch.Tensor) -> tuple[int, ...]:
        return self.granularity.block_size(tuple(w.shape))

    def init_ranges(self, w: torch.Tensor) -> None:
        """Start learning from the handler's own qparams. The scale trains in float32; the
        forward (and convert) use it cast to the weight dtype, as the codec stores it."""
        scale, zero = choose_qparams(w.detach(), self.spec, self._block(w), w.dtype)
        self.scale = nn.Parameter(scale.float())
        self.zero = zero

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        block = self._block(w)
        if self.scale is not None:
            scale = self.scale.to(w.dtype)
            return learned_scale_fake_quantize(w, scale, self.zero, self.spec, block)
        wd = w.detach()
        scale, zero = choose_qparams(wd, self.spec, block, w.dtype)
        q = quantize(wd, scale, zero, self.spec, block)
        return straight_through(w, dequantize(q, scale, zero, block, w.dtype))

    def to_quantized(self, w: torch.Tensor) -> LowbitTensor:
        base = quantize_weight(self.config, w)
        if self.scale is None:
            return base
        # Same layout as the handler's tensor, codes from the learned scale.
        scale = self.scale.detach().to(w.dtype)
        codes = quantize(w.detach(), scale, self.zero, self.spec, self._block(w))
        if not isinstance(base, IntWeight):
            raise TypeError(f"learned ranges need an IntWeight handler, got {type(base).__name__}")
        if base.signed_int8:
            qdata = codes.to(torch.int8)
        else:
            qdata = pack_bits((codes - self.spec.qmin).to(torch.uint8), self.spec.bits)
        n = w.shape[0]
        zero = None if self.zero is None else self.zero.expand(n, self.zero.shape[1]).contiguous()
        return base.with_fields(qdata=qdata, scale=scale.expand(n, scale.shape[1]).contiguous(),
                                zero=zero)


class Int8ActIntxWeightFakeQuantizer(AffineFakeQuantizer):
    """8da4w: per-token asymmetric int8 activations (the reference's own fake-quant) x
    symmetric int4 group weights; the real path is a float matmul of the two, so the
    forward here is the same F.linear on the same values."""

    def linear(self, x, w, bias):
        x_fq = straight_through(x, ref.fake_quantize_per_token_int8_asym(x.detach()))
        return F.linear(x_fq, self.fake_weight(w).to(x.dtype), bias)


class Int8DynamicFakeQuantizer(AffineFakeQuantizer):
    """Per-token symmetric int8 activations x per-channel int8 weights. The real path
    accumulates int8 products in int32, so the forward runs that reference on the codec's
    codes and the backward is the float linear of the fake-quantized operands."""

    def linear(self, x, w, bias):
        w_fq = self.fake_weight(w)
        x2d = x.detach().reshape(-1, x.shape[-1])
        xq, xs = ref.quantize_per_token_int8(x2d)
        x_fq = straight_through(x, (xq.float() * xs).to(x.dtype).reshape(x.shape))
        wd = w.detach()
        if self.scale is not None:
            scale = self.scale.detach().to(w.dtype)
            wq = quantize(wd, scale, None, self.spec, self._block(w))
        else:
            scale, _ = choose_qparams(wd, self.spec, self._block(w), w.dtype)
            wq = quantize(wd, scale, None, self.spec, self._block(w))
        y = ref.int8_dynamic_linear(x.detach(), wq.to(torch.int8), scale, bias)
        return exact_forward_linear(x_fq, w_fq, bias, y)


class Float8FakeQuantizer(FakeQuantizer):
    """Float8 weights with float32 scales per row or per tensor (`Float8Weight.from_float`);
    with `act_per_row` set (True / False) activations are dynamic e4m3 too."""

    def __init__(
        self, config: QuantConfig, granularity: Granularity, fp8_format: str,
        act_per_row: bool | None,
    ) -> None:
        super().__init__(config)
        self.granularity = granularity
        self.fp8 = fp8_dtype(fp8_format)
        self.act_per_row = act_per_row

    def _codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        block = self.granularity.block_size(tuple(w.shape))
        scale = choose_fp8_scale(w.detach(), block, self.fp8)
        return quantize_fp8(w.detach(), scale, block, self.fp8), scale, block

    def fake_weight(self, w):
        q, scale, block = self._codes(w)
        return straight_through(w, dequantize_fp8(q, scale, block, w.dtype))

    def linear(self, x, w, bias):
        if self.act_per_row is None:
            return super().linear(x, w, bias)
        q, scale, block = self._codes(w)
        w_fq = straight_through(w, dequantize_fp8(q, scale, block, w.dtype))
        x2d = x.detach().reshape(-1, x.shape[-1])
        xq, xs = ref.quantize_fp8_activation(x2d, self.act_per_row, self.fp8)
        x_fq = straight_through(x, (xq.float() * xs).to(x.dtype).reshape(x.shape))
        rows = scale.expand(w.shape[0], 1).contiguous()
        y = ref.fp8_dynamic_linear(x.detach(), q, rows, bias, self.act_per_row)
        return exact_forward_linear(x_fq, w_fq, bias, y)


FakeQuantizerFactory = Callable[[QuantConfig], FakeQuantizer]
_FAKE_QUANTIZERS: dict[type, FakeQuantizerFactory] = {}


def register_fake_quantizer(
    config_type: type,
) -> Callable[[FakeQuantizerFactory], FakeQuantizerFactory]:
    """Teach QAT a config: `factory(config)` returns its FakeQuantizer. The quantizer must use
    the codec calls of the config's handler so that `convert` matches `quantize_`."""

    def register(factory: FakeQuantizerFactory) -> FakeQuantizerFactory:
        _FAKE_QUANTIZERS[config_type] = factory
        return factory

    return register


def supported_configs() -> list[str]:
    return sorted(t.__name__ for t in _FAKE_QUANTIZERS)


def fake_quantizer_for(config: QuantConfig) -> FakeQuantizer:
    """A fresh fake quantizer for `config`; TypeError when QAT cannot emulate it."""
    factory = _FAKE_QUANTIZERS.get(type(config))
    if factory is None:
        raise TypeError(
            f"QAT cannot emulate {type(config).__name__}: no fake quantizer is registered for "
            f"it (calibrated configs such as GPTQ/AWQ choose weights from data, not from a "
            f"fixed codec). Supported: {', '.join(supported_configs())}"
        )
    return factory(config)


@register_fake_quantizer(Int8WeightOnly)
def _int8_weight_only(c: Int8WeightOnly) -> FakeQuantizer:
    return AffineFakeQuantizer(c, 8, c.granularity)


@register_fake_quantizer(Int8DynamicActivationInt8Weight)
def _int8_dynamic(c: Int8DynamicActivationInt8Weight) -> FakeQuantizer:
    return Int8DynamicFakeQuantizer(c, 8, PerAxis(0))


@register_fake_quantizer(Int4WeightOnly)
def _int4_weight_only(c: Int4WeightOnly) -> FakeQuantizer:
    return AffineFakeQuantizer(c, 4, PerGroup(c.group_size), "asymmetric", c.zero)


@register_fake_quantizer(IntxWeightOnly)
def _intx_weight_only(c: IntxWeightOnly) -> FakeQuantizer:
    return AffineFakeQuantizer(c, c.bits, c.granularity, c.mapping, c.zero)


@register_fake_quantizer(Int8DynamicActivationInt4Weight)
def _int8_act_int4_weight(c: Int8DynamicActivationInt4Weight) -> FakeQuantizer:
    return Int8ActIntxWeightFakeQuantizer(c, 4, PerGroup(c.group_size), "symmetric")


@register_fake_quantizer(Float8WeightOnly)
def _float8_weight_only(c: Float8WeightOnly) -> FakeQuantizer:
    return Float8FakeQuantizer(c, PerAxis(0), c.fp8_format, None)


@register_fake_quantizer(Float8DynamicActivationFloat8Weight)
def _float8_dynamic(c: Float8DynamicActivationFloat8Weight) -> FakeQuantizer:
    per_row = not isinstance(c.granularity, PerTensor)
    return Float8FakeQuantizer(c, c.granularity, "e4m3", per_row)


class CodecFakeQuantizer(FakeQuantizer):
    """Weight-only formats whose codec has a one-call round trip (`formats.mx`): the forward
    uses exactly the values the stored tensor decodes to."""

    def __init__(self, config: QuantConfig, round_trip: Callable[[torch.Tensor], torch.Tensor]
                 ) -> None:
        super().__init__(config)
        self.round_trip = round_trip

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        return straight_through(w, self.round_trip(w.detach()))


@register_fake_quantizer(MXWeightOnly)
def _mx_weight_only(c: MXWeightOnly) -> FakeQuantizer:
    return CodecFakeQuantizer(c, lambda w: mx_fake_quantize(w, c.elem, c.scale_mode))


@register_fake_quantizer(NVFP4WeightOnly)
def _nvfp4_weight_only(c: NVFP4WeightOnly) -> FakeQuantizer:
    return CodecFakeQuantizer(c, nvfp4_fake_quantize)


class DynamicCodecFakeQuantizer(CodecFakeQuantizer):
    """MX x MX and NVFP4 x NVFP4: weights and, per call, activations rounded to the format.

    The forward is `real_linear`: the converted layer's op on the fields its handler stores
    (the op rounds the activations itself), so the two agree bit for bit. The backward is the
    float linear at the fake-quantized operands, activations rounded by the same codec call
    that op makes."""

    def __init__(
        self,
        config: QuantConfig,
        round_trip: Callable[[torch.Tensor], torch.Tensor],
        act_round_trip: Callable[[torch.Tensor], torch.Tensor],
        real_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> None:
        super().__init__(config, round_trip)
        self.act_round_trip = act_round_trip
        self.real_linear = real_linear

    def linear(self, x, w, bias):
        x_fq = straight_through(x, self.act_round_trip(x.detach()))
        y = self.real_linear(x.detach(), w.detach(), None if bias is None else bias.detach())
        return exact_forward_linear(x_fq, self.fake_weight(w), bias, y)


@register_fake_quantizer(MXDynamicActivationMXWeight)
def _mx_dynamic(c: MXDynamicActivationMXWeight) -> FakeQuantizer:
    fmt, act = elem_format(c.elem), c.act_elem or c.elem

    def real_linear(x, w, bias):  # MXWeight.from_float's fields, then MXWeight.linear's op
        codes, scale = mx_quantize(w, fmt, c.scale_mode)
        return mx_ops.mx_dynamic_linear(x, pack_elements(codes, fmt), scale, bias, c.elem, act,
                                        c.scale_mode)

    return DynamicCodecFakeQuantizer(c, lambda w: mx_fake_quantize(w, c.elem, c.scale_mode),
                                     lambda x: mx_fake_quantize(x, act, c.scale_mode),
                                     real_linear)


@register_fake_quantizer(NVFP4DynamicActivationNVFP4Weight)
def _nvfp4_dynamic(c: NVFP4DynamicActivationNVFP4Weight) -> FakeQuantizer:
    def real_linear(x, w, bias):  # NVFP4Weight.from_float's fields, then NVFP4Weight.linear's
        codes, block_scale, tensor_scale = nvfp4_quantize(w)
        return mx_ops.nvfp4_dynamic_linear(x, pack_elements(codes, E2M1), block_scale,
                                           tensor_scale, bias)

    return DynamicCodecFakeQuantizer(c, nvfp4_fake_quantize, nvfp4_fake_quantize, real_linear)
