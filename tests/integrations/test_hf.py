"""HF transformers: quantize while loading, save_pretrained, reload without re-quantizing."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from hf_folders import smollm2_cut_dir, tiny_llama_dir  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lowbit.integrations.hf import LowbitConfig  # noqa: E402
from lowbit.quantize import quantize_  # noqa: E402
from lowbit.quantize.presets import preset  # noqa: E402
from lowbit.tensors import IntWeight, LowbitTensor  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return smollm2_cut_dir(tmp_path_factory.mktemp("smollm2"))


def _not_lm_head(module, fqn):
    return isinstance(module, torch.nn.Linear) and fqn != "lm_head"


@pytest.mark.slow
def test_smollm2_quantize_on_load_save_reload_generate(smollm2_dir, tmp_path):
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4125, 30, 216]])
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, quantization_config=LowbitConfig("int4-g64"), dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q_proj, IntWeight) and q_proj.bits == 4
    # The tied output embedding stays in full precision (transformers' convention).
    assert not isinstance(model.lm_head.weight, LowbitTensor)
    # Quantizing while loading gives bit-identical weights to lowbit's own quantize_.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(reference, preset("int4-g64"), _not_lm_head, show_progress=False)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, reference(ids).logits)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    w = reloaded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, IntWeight) and torch.equal(w.qdata, q_proj.qdata)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    out = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("name", ["int8", "fp8-dynamic", "int8-dynamic"])
def test_tiny_round_trip_other_configs(tmp_path, name):
    src = tiny_llama_dir(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=LowbitConfig(name))
    assert isinstance(model.model.layers[1].mlp.down_proj.weight, LowbitTensor)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_config_json_round_trip_and_typo():
    cfg = LowbitConfig("int4-g128")
    again = LowbitConfig.from_dict(cfg.to_dict())
    assert again.lowbit_config == preset("int4-g128")
    with pytest.raises(ValueError, match="int4-g128"):
        LowbitConfig("int4-g129")
