"""Model folders for the integration and CLI tests: a tiny random Llama and a 2-layer cut of
the real SmolLM2-135M (its first two decoder layers, embeddings and final norm)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tiny_llama_dir(path: Path, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def smollm2_cut_dir(path: Path, layers: int = 2) -> Path:
    """SmolLM2's real weights, first `layers` layers; skips when the model is not installed."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.eval import load_smollm2
    from lowbit.eval.corpora import cache_dir

    src = cache_dir() / "smollm2-135m-instruct"
    if not (src / "config.json").exists():
        try:
            load_smollm2()  # converts the GGUF once into the cache folder
        except ModuleNotFoundError as e:
            pytest.skip(str(e))
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)  # GGUF provenance; the safetensors are plain
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keep = [k for k in f.keys()
                if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)]
        tensors = {k: f.get_tensor(k) for k in keep}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path
