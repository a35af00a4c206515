"""prepare / convert bookkeeping and bad input: clear errors, same layer choice as quantize_."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lowbit import qat
from lowbit.quantize import (
    GPTQ,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    ModuleConfigs,
    MXDynamicActivationMXWeight,
    NVFP4DynamicActivationNVFP4Weight,
    QuantConfig,
    quantize_,
)


def _mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.Linear(48, 8))


def test_convert_without_prepare():
    with pytest.raises(ValueError, match="no QAT-prepared layers.*prepare"):
        qat.convert(_mlp())


def test_prepare_twice():
    model = _mlp()
    qat.prepare(model, Int4WeightOnly(group_size=32))
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(model, Int4WeightOnly(group_size=32))


def test_unsupported_configs():
    @dataclasses.dataclass(frozen=True)
    class Mystery(QuantConfig):
        pass

    with pytest.raises(TypeError, match="QAT cannot emulate Mystery.*Supported: .*Int4WeightOnly"):
        qat.prepare(_mlp(), Mystery())
    # Every PTQ config with a fixed codec is listed, the dynamic MX / NVFP4 ones included.
    with pytest.raises(TypeError, match="Supported: .*MXDynamicActivationMXWeight.*"
                                        "NVFP4DynamicActivationNVFP4Weight"):
        qat.prepare(_mlp(), Mystery())
    with pytest.raises(TypeError, match="QAT cannot emulate GPTQ"):
        qat.prepare(_mlp(), GPTQ(Int4WeightOnly(group_size=32)))
    with pytest.raises(TypeError, match="QuantConfig or ModuleConfigs"):
        qat.prepare(_mlp(), "int4")
    with pytest.raises(ValueError, match="learned ranges"):
        qat.prepare(_mlp(), Float8WeightOnly(), learn_ranges=True)
    with pytest.raises(ValueError, match="start_step"):
        qat.prepare(_mlp(), Int4WeightOnly(group_size=32), start_step=-1)


def test_nothing_to_prepare_is_an_error():
    model = nn.Sequential(nn.Linear(48, 8))  # 48 is not a multiple of 32
    with pytest.raises(ValueError, match="(?s)no module to fake-quantize.*not divisible"):
        qat.prepare(model, Int4WeightOnly(group_size=32))


def test_failed_prepare_leaves_model_unchanged():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="cannot prepare 2: .*NaN"):
        qat.prepare(model, Int4WeightOnly(group_size=32))
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_same_layers_and_skips_as_quantize_():
    cfg = Int8DynamicActivationInt4Weight(group_size=32)
    rules = ModuleConfigs({"0": None, "re:[23]": cfg})
    model, ptq = _mlp(), _mlp()
    summary = qat.prepare(model, rules)
    with pytest.warns(UserWarning, match="skipped"):
        ptq_summary = quantize_(ptq, rules, show_progress=False)
    assert set(summary.prepared) == set(ptq_summary.quantized) == {"2"}
    assert summary.skipped == ptq_summary.skipped == {
        "3": "shape (8, 48) does not fit block (1, 32): dim 1 of size 48 is not divisible by "
        "block 32"
    }
    assert type(model[0]) is nn.Linear and isinstance(model[2], qat.FakeQuantizedLinear)


@pytest.mark.parametrize("cfg", [Int8DynamicActivationInt4Weight(group_size=32),
                                 MXDynamicActivationMXWeight("fp8_e4m3"),
                                 NVFP4DynamicActivationNVFP4Weight()],
                         ids=["8da4w", "mxfp8dyn", "nvfp4dyn"])
def test_dynamic_config_skips_embeddings(cfg):
    model = nn.ModuleDict({"emb": nn.Embedding(10, 32), "fc": nn.Linear(32, 32)})
    summary = qat.prepare(model, cfg, lambda m, fqn: isinstance(m, (nn.Linear, nn.Embedding)))
    assert "needs an nn.Linear" in summary.skipped["emb"]
    assert set(summary.prepared) == {"fc"}


def test_state_dict_keys_and_optimizer_survive():
    """prepare keeps the Parameter objects: an optimizer built before prepare still trains
    them, and the float checkpoint keys are unchanged."""
    model = _mlp()
    keys = set(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    qat.prepare(model, Int4WeightOnly(group_size=16))
    assert set(model.state_dict()) == keys
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    summary = qat.convert(model)
    assert summary.bytes_after < summary.bytes_before
    assert "fake_quant" not in repr(model)
