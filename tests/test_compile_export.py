"""A quantized model compiles without graph breaks, exports, and survives copies/moves."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from lowbit import save_quantized
from lowbit.models import ModelArgs, Transformer
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    quantize_,
)

CONFIGS = [
    Int8WeightOnly(),
    Int8DynamicActivationInt8Weight(),
    Int4WeightOnly(group_size=32),
    Float8WeightOnly(),
    Float8DynamicActivationFloat8Weight(),
    Int8DynamicActivationInt4Weight(group_size=32),
]


def _tiny(cfg):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, cfg, show_progress=False)
    return model


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_compile_fullgraph_matches_eager(cfg):
    model = _tiny(cfg)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        eager = model(tokens)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compile_inductor_int4():
    model = _tiny(Int4WeightOnly(group_size=32))
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        eager = model(tokens)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [Int4WeightOnly(32), Int8DynamicActivationInt8Weight()],
                         ids=["int4", "int8dyn"])
def test_export_runs_and_matches(cfg):
    model = _tiny(cfg)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ep = torch.export.export(model, (tokens,))
        torch.testing.assert_close(ep.module()(tokens), model(tokens))
    assert any("lowbit" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_deepcopy_and_to_give_identical_outputs(cfg):
    model = _tiny(cfg)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
        assert torch.equal(copy.deepcopy(model)(tokens), ref)
        assert torch.equal(model.to("cpu")(tokens), ref)


def test_save_load_in_fresh_process(tmp_path):
    model = _tiny(Int4WeightOnly(group_size=32))
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
    path = save_quantized(model, tmp_path / "m.safetensors")
    torch.save({"tokens": tokens, "ref": ref}, tmp_path / "io.pt")
    script = f"""
import torch
from lowbit import load_quantized
from lowbit.models import ModelArgs, Transformer
with torch.device("meta"):
    model = Transformer(ModelArgs.from_name("tiny"))
load_quantized(model, {str(path)!r})
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
with torch.no_grad():
    assert torch.equal(model.eval()(io["tokens"]), io["ref"])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
