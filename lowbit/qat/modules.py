"""The layers `prepare` swaps in: nn.Linear / nn.Embedding subclasses that fake-quantize.

They keep the original `weight` and `bias` Parameter objects (so optimizers built before
`prepare`, tied weights and state_dict keys keep working) and add a `fake_quant` child that
holds the quantizer (and its learned ranges, if any). A module swap is needed here, unlike
PTQ, because QAT changes what autograd does, which a plain float weight cannot carry.

LoRA + QAT: the base weight is frozen and the layer computes with
``fake_quant(weight + B @ A * alpha / rank)``, i.e. the adapters are trained *through* the
quantizer. `convert` merges them with the same expression and quantizes the result, so what
was trained is exactly what is deployed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qat.fake_quantizers import FakeQuantizer


class LoRA(nn.Module):
    """Low-rank update B @ A * (alpha / rank); B starts at zero so training starts from the
    pretrained layer."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.b = nn.Parameter(torch.zeros(out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a) * self.scaling


class _FakeQuantMixin:
    """What both layer kinds share: the switch (delayed start) and the weight under QAT."""

    weight: nn.Parameter
    fake_quant: FakeQuantizer
    lora: LoRA | None

    def _init_qat(self, quantizer: FakeQuantizer, start_step: int, lora: LoRA | None) -> None:
        self.fake_quant = quantizer
        self.lora = lora
        self.start_step = start_step
        # A Python bool: torch.compile guards on it and recompiles once when it flips.
        self.fake_quant_enabled = start_step == 0

    def merged_weight(self) -> torch.Tensor:
        """The float weight the layer trains: base weight plus the LoRA update, if any."""
        if self.lora is None:
            return self.weight
        return self.weight + self.lora.delta()

    def qat_repr(self) -> str:
        lora = "" if self.lora is None else f", lora_rank={self.lora.a.shape[0]}"
        return f"enabled={self.fake_quant_enabled}, start_step={self.start_step}{lora}"


class FakeQuantizedLinear(_FakeQuantMixin, nn.Linear):
    """An nn.Linear whose forward is the forward of the layer `convert` will produce."""

    def __init__(self, linear: nn.Linear, quantizer: FakeQuantizer, start_step: int = 0,
                 lora: LoRA | None = None) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._init_qat(quantizer, start_step, lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merged_weight()
        if not self.fake_quant_enabled:
            return F.linear(x, w, self.bias)
        return self.fake_quant.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.qat_repr()}"


class FakeQuantizedEmbedding(_FakeQuantMixin, nn.Embedding):
    """An nn.Embedding that looks rows up in the fake-quantized table (plain lookups only,
    as quantized embeddings support)."""

    def __init__(self, emb: nn.Embedding, quantizer: FakeQuantizer, start_step: int = 0) -> None:
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(emb, name))
        self.weight = emb.weight
        self._init_qat(quantizer, start_step, None)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.fake_quant_enabled:
            w = self.fake_quant.fake_weight(w)
        return F.embedding(index, w, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.qat_repr()}"


QAT_MODULES = (FakeQuantizedLinear, FakeQuantizedEmbedding)


def plain_module(module: nn.Module, weight: nn.Parameter) -> nn.Module:
    """The stock module `convert` puts back: same class as before `prepare`, new weight."""
    if isinstance(module, FakeQuantizedLinear):
        out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device="meta")
        out.bias = module.bias
    else:
        out = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                           device="meta")
    out.weight = weight
    return out
