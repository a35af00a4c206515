import json
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import PerGroup, PerRow, PerTensor
from lowbit.quantize import (
    ConfigError,
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    ModuleConfigs,
    config_from_dict,
    quantize_,
)
from lowbit.tensors import Float8Weight, IntWeight, LowbitTensor

ALL_CONFIGS = [
    Int8WeightOnly(),
    Int8WeightOnly(PerGroup(32)),
    Int8DynamicActivationInt8Weight(),
    Int4WeightOnly(),
    Int4WeightOnly(group_size=64, zero="float"),
    IntxWeightOnly(bits=3, granularity=PerRow(), mapping="asymmetric", zero="float"),
    Float8WeightOnly(),
    Float8DynamicActivationFloat8Weight(PerRow()),
    Float8DynamicActivationFloat8Weight(PerTensor()),
    Int8DynamicActivationInt4Weight(),
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 128)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128, bias=False)
        self.side = nn.Linear(128, 72)
        self.odd = nn.Linear(72, 8)
        self.head = nn.Linear(128, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = self.down(torch.relu(self.up(h)))
        return self.head(h) + self.odd(self.side(h)).sum(-1, keepdim=True)


def _snapshot(model):
    return {k: (type(v), v.clone()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: repr(c)[:60])
def test_config_json_roundtrip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert config_from_dict(d) == cfg


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'Int4WeightOnly'"):
        config_from_dict({"type": "Int4WeightOnyl", "version": 1, "fields": {}})
    with pytest.raises(ConfigError, match="newer"):
        config_from_dict({"type": "Int4WeightOnly", "version": 99, "fields": {}})
    with pytest.raises(ConfigError, match="bad fields"):
        config_from_dict({"type": "Int4WeightOnly", "version": 1, "fields": {"bogus": 1}})
    with pytest.raises(ConfigError):
        Int4WeightOnly(group_size=0)
    with pytest.raises(ConfigError):
        IntxWeightOnly(bits=9)


def test_summary_and_named_skips():
    model = Net()
    with pytest.warns(UserWarning, match="skipped 1 modules: odd"):
        summary = quantize_(model, Int4WeightOnly(group_size=128), show_progress=False)
    assert set(summary.quantized) == {"up", "down", "side", "head", "emb"}
    assert summary.quantized["emb"].startswith("tied")
    assert "not divisible" in summary.skipped["odd"]
    assert isinstance(model.up.weight, IntWeight) and type(model.odd.weight) is nn.Parameter
    assert summary.bytes_after < summary.bytes_before / 3
    # the tie survives: the embedding and the head share one quantized weight
    assert model.head.weight is model.emb.weight
    assert "skipped odd" in str(summary)


def test_filter_fn_and_module_configs():
    model = Net()
    quantize_(model, Int8WeightOnly(), filter_fn=lambda m, fqn: fqn == "up", show_progress=False)
    assert isinstance(model.up.weight, IntWeight)
    assert not isinstance(model.down.weight, LowbitTensor)

    model = Net()
    rules = ModuleConfigs(
        {"down": Float8WeightOnly(), "re:o.*": None, "re:h.*": Int8WeightOnly()},
        default=Int4WeightOnly(group_size=64),
    )
    summary = quantize_(model, rules, show_progress=False)
    assert isinstance(model.down.weight, Float8Weight)
    assert not isinstance(model.odd.weight, LowbitTensor) and "odd" not in summary.skipped
    assert isinstance(model.head.weight, IntWeight) and model.head.weight.bits == 8
    assert model.up.weight.bits == 4
    with pytest.raises(ValueError, match="bad pattern"):
        ModuleConfigs({"re:(": None})


def test_embedding_by_fqn_and_dynamic_config_refuses_embedding():
    model = Net()
    del model.head
    summary = quantize_(model, ModuleConfigs({"emb": IntxWeightOnly(4, PerGroup(32))}),
                        show_progress=False)
    assert summary.quantized.keys() == {"emb"}
    model = Net()
    with pytest.warns(UserWarning):
        summary = quantize_(model, ModuleConfigs({"emb": Int8DynamicActivationInt8Weight()}),
                            show_progress=False)
    assert "nn.Linear" in summary.skipped["emb"]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: repr(c)[:60])
def test_every_config_runs_a_model(cfg):
    model = Net()
    idx = torch.randint(0, 50, (2, 7))
    ref = model(idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, cfg, show_progress=False)
    out = model(idx)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_failed_quantize_leaves_model_unchanged():
    model = Net()
    with torch.no_grad():
        model.down.weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="cannot quantize down: .*NaN"):
        quantize_(model, Int8WeightOnly(), show_progress=False)
    after = model.state_dict()
    for k, (t, v) in before.items():
        assert type(after[k]) is t
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


def test_quantizing_twice_skips_with_reason():
    model = Net()
    quantize_(model, Int8WeightOnly(), show_progress=False)
    with pytest.warns(UserWarning, match="already quantized"):
        summary = quantize_(model, Int4WeightOnly(), show_progress=False)
    assert not summary.quantized


def test_wrong_config_type():
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(Net(), "int4")


def test_top_level_api_exports():
    assert lowbit.quantize_ is quantize_ and lowbit.Int4WeightOnly is Int4WeightOnly
