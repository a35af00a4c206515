"""safetensors checkpoints for every format: round trips, meta-device loads, bad files."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit import CheckpointError, load_quantized, save_quantized
from lowbit.formats import PerGroup
from lowbit.integrations import read_metadata
from lowbit.integrations.checkpoint import FORMAT_VERSION
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    config_from_dict,
    quantize_,
)

CONFIGS = [
    Int8WeightOnly(),
    Int8DynamicActivationInt8Weight(),
    Int4WeightOnly(group_size=32),
    Int4WeightOnly(group_size=64, zero="float"),
    IntxWeightOnly(bits=3, granularity=PerGroup(32)),
    IntxWeightOnly(bits=6, granularity=PerGroup(32), mapping="asymmetric", zero="float"),
    Float8WeightOnly(),
    Float8WeightOnly("e5m2"),
    Float8DynamicActivationFloat8Weight(),
    Int8DynamicActivationInt4Weight(group_size=32),
]


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Embedding(40, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64),
        nn.Linear(64, 40, bias=False),
    )
    net[4].weight = net[0].weight  # tied, like many LMs
    return net.to(torch.bfloat16)


def _quantized(cfg):
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(net, cfg, show_progress=False)
    return net


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: repr(c)[:50])
def test_roundtrip_into_meta_model(cfg, tmp_path):
    net = _quantized(cfg)
    idx = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        ref = net(idx)
    path = save_quantized(net, tmp_path / "m.safetensors", cfg)
    assert config_from_dict(read_metadata(path)["config"]) == cfg
    with torch.device("meta"):
        fresh = _net()
    load_quantized(fresh, path)
    assert fresh[4].weight is fresh[0].weight
    with torch.no_grad():
        assert torch.equal(fresh(idx), ref)
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert type(a) is type(b), k
        if hasattr(a, "inner_tensors"):
            for name, t in a.inner_tensors().items():
                assert torch.equal(t, getattr(b, name)), (k, name)


def test_file_holds_packed_bytes_only(tmp_path):
    net = _quantized(Int4WeightOnly(group_size=32))
    path = save_quantized(net, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("1.weight:qdata").dtype == torch.uint8
    assert "1.weight" not in keys and "1.weight:scale" in keys
    assert "4.weight:qdata" not in keys  # the tied copy is stored once


def _rewrite_meta(path, fn):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lowbit"])
    fn(meta)
    save_file(tensors, str(path), metadata={"lowbit": json.dumps(meta)})


def _expect_refusal(path, match):
    with torch.device("meta"):
        fresh = _net()
    before = {k: (type(v), v.shape) for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_quantized(fresh, path)
    assert {k: (type(v), v.shape) for k, v in fresh.state_dict().items()} == before


def test_future_version_is_refused(tmp_path):
    path = save_quantized(_quantized(Int8WeightOnly()), tmp_path / "m.safetensors")
    _rewrite_meta(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    _expect_refusal(path, "Upgrade lowbit")


def test_unknown_class_is_refused(tmp_path):
    path = save_quantized(_quantized(Int8WeightOnly()), tmp_path / "m.safetensors")
    _rewrite_meta(path, lambda m: m["tensors"]["1.weight"].update({"class": "os.system"}))
    _expect_refusal(path, "unknown tensor class")


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    path = save_quantized(_quantized(Int8WeightOnly()), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_refusal(path, "cannot read|not a readable")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    _expect_refusal(garbage, "not a readable")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    _expect_refusal(plain, "no lowbit metadata")


def test_wrong_model_is_refused(tmp_path):
    path = save_quantized(_quantized(Int8WeightOnly()), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(CheckpointError, match="does not match"):
        load_quantized(other, path)


def test_load_state_dict_into_quantized_model(tmp_path):
    """The stock path works too: quantize the same way, then load_state_dict copies."""
    src = _quantized(Int4WeightOnly(group_size=32))
    dst = _net()
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(dst, Int4WeightOnly(group_size=32), show_progress=False)
    dst.load_state_dict(src.state_dict())
    idx = torch.randint(0, 40, (1, 4))
    with torch.no_grad():
        assert torch.equal(dst(idx), src(idx))
