"""Quantized models leave Python: torch.export with dynamic dims, AOTInductor, ExecuTorch.

One tiny Llama carries the three schemes at once (int4 weight-only attention, 8da4w MLP, int8
weight-only output), so each slow compile below covers all of them.

The ExecuTorch tests run only where executorch is importable. executorch 1.5.1 needs
torch 2.14.1, newer than the project venv's, so they run in a venv of their own:
    python -m venv /tmp/etvenv && /tmp/etvenv/bin/pip install torch==2.14.1 executorch==1.5.1 \
        transformers safetensors pytest && /tmp/etvenv/bin/pip install -e . --no-deps
    /tmp/etvenv/bin/python -m pytest tests/integrations/test_export.py -q -k "executorch or pte"
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import sqnr

from lowbit.cli import main
from lowbit.integrations.export import export_quantized, package_aoti, to_executorch
from lowbit.models import ModelArgs, Transformer
from lowbit.quantize import (
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8WeightOnly,
    ModuleConfigs,
    quantize_,
)

LOWBIT_OPS = {
    "lowbit.intx_weight_only_linear.default",  # int4 weight-only
    "lowbit.int8_act_intx_weight_linear.default",  # 8da4w
    "lowbit.int8_weight_only_linear.default",  # int8 weight-only
}
EXAMPLE = (3, 11)  # batch, seq: sizes unlike any model dim, so none gets pinned by accident
SIZES = [(1, 5), (4, 37)]  # two other batch/sequence sizes the exported program must accept

# Eager lowbit and a compiled runtime differ by fp32 reassociation in fused norms, attention
# and matmuls (~1e-7 relative, > 120 dB) and, through that, by 8da4w activations that sit on a
# rounding tie moving one int8 step: 1/255 of their row's range, about -48 dB for that token's
# row, so even if every row flipped the whole output stays above 45 dB. A wrong code, scale,
# zero or group costs as much as int4 quantization itself (~20-25 dB) or more.
MIN_SQNR_DB = 45.0


def _assert_faithful(out: torch.Tensor, eager: torch.Tensor) -> None:
    assert out.shape == eager.shape
    assert sqnr(eager, out) > MIN_SQNR_DB


def _mixed_llama() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_layers=1)).eval()
    rules = ModuleConfigs(
        {
            r"re:.*attention\.w.": Int4WeightOnly(group_size=32),
            r"re:.*feed_forward\.w.": Int8DynamicActivationInt4Weight(group_size=32),
        },
        default=Int8WeightOnly(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the norms are skipped (1-D), as expected
        quantize_(model, rules, show_progress=False)
    return model


@pytest.fixture(scope="module")
def model():
    return _mixed_llama()


@pytest.fixture(scope="module")
def program(model):
    return export_quantized(model, (torch.randint(0, 256, EXAMPLE),))


def _ops(program) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _cases(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = [torch.randint(0, 256, size) for size in SIZES]
    with torch.no_grad():
        return [(t, model(t)) for t in tokens]


def test_export_has_dynamic_dims_and_matches_eager(model, program):
    assert LOWBIT_OPS <= _ops(program)
    tokens = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "tokens")
    assert all(isinstance(d, torch.SymInt) for d in tokens.meta["val"].shape)
    with torch.no_grad():
        for x, eager in _cases(model):
            # Same reference kernels on both sides: identical bits.
            assert torch.equal(program.module()(x), eager)


def test_portable_export_has_only_aten_ops_and_matches_eager(model):
    program = export_quantized(model, (torch.randint(0, 256, EXAMPLE),), portable=True)
    assert not any(op.startswith("lowbit.") for op in _ops(program))
    with torch.no_grad():
        for x, eager in _cases(model):
            # The decomposition is the reference itself, traced: identical bits.
            assert torch.equal(program.module()(x), eager)


def test_bad_inputs_get_clear_errors(model, program, tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        export_quantized(program, (torch.zeros(1, 2, dtype=torch.long),))
    with pytest.raises(TypeError, match="tuple"):
        export_quantized(model, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\.pt2"):
        package_aoti(program, tmp_path / "model.so")
    with pytest.raises(ValueError, match="example_inputs are needed"):
        package_aoti(model, tmp_path / "model.pt2")
    with pytest.raises(ValueError, match="not with an ExportedProgram"):
        package_aoti(program, tmp_path / "model.pt2", example_inputs=(torch.zeros(1, 2),))


@pytest.mark.slow
def test_aoti_package_loads_in_fresh_process(model, program, tmp_path):
    path = package_aoti(program, tmp_path / "llama.pt2")
    cases = _cases(model)
    torch.save([x for x, _ in cases], tmp_path / "inputs.pt")
    script = f"""
import torch
import lowbit  # registers the lowbit ops the package calls
run = torch._inductor.aoti_load_package({str(path)!r})
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
torch.save([run(x) for x in inputs], {str(tmp_path / "outputs.pt")!r})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    for (_, eager), result in zip(cases, torch.load(tmp_path / "outputs.pt"), strict=True):
        _assert_faithful(result, eager)


def test_executorch_pte_matches_eager(model, tmp_path):
    runtime = pytest.importorskip("executorch.runtime", reason="executorch is not installed")
    batch = 2
    path = to_executorch(model, tmp_path / "llama.pte", (torch.randint(0, 256, (batch, 11)),))
    method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
    for seq in (5, 37):  # the batch is fixed in an ExecuTorch program; see executorch_seq_dims
        x = torch.randint(0, 256, (batch, seq))
        with torch.no_grad():
            eager = model(x)
        _assert_faithful(method.execute([x])[0], eager)


def test_cli_export_bad_inputs(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "m.so")]) == 2
    assert ".pt2 (AOTInductor) or .pte (ExecuTorch)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_exports_quantized_folder_to_pte(tmp_path):
    runtime = pytest.importorskip("executorch.runtime", reason="executorch is not installed")
    pytest.importorskip("transformers")
    from hf_folders import tiny_llama_dir

    from lowbit.integrations.model_dir import load_model_dir

    quantized = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir(tmp_path / "tiny")), "--config",
                 "int8-dynamic-int4-g32", "--out", str(quantized)]) == 0
    assert main(["export", str(quantized), "--out", str(tmp_path / "m.pte")]) == 0
    model, _ = load_model_dir(quantized, allow_quantized=True)
    method = runtime.Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward")
    for seq in (3, 29):
        x = torch.randint(0, 256, (1, seq))
        with torch.no_grad():
            eager = model(input_ids=x).logits
        out = method.execute([x])[0]
        _assert_faithful(out, eager)
