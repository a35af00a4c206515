"""Transformers model folders for the CLI: load one (plain, lowbit or compressed-tensors) and
save a quantized one, with one-line errors for folders that cannot be used."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.quantize.configs import QuantConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def _quant_method(config: Any) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)


def load_model_dir(path: str | Path, allow_quantized: bool = False) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) from a transformers folder, offline.

    A folder converted from GGUF keeps a ``gguf`` quantization_config although its
    safetensors weights are plain floats; it counts as full precision."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModuleNotFoundError(f"model folders need transformers: "
                                  f"pip install 'lowbit[hf]' ({e})") from None
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    method = _quant_method(config)
    if method == "gguf" and not list(folder.glob("*.gguf")):
        del config.quantization_config
        method = None
    if method is not None and not allow_quantized:
        raise ValueError(f"{folder} is already quantized ({method}); quantize the original "
                         "full-precision folder instead")
    if method == "compressed-tensors":
        from lowbit.integrations.compressed_tensors import load_compressed_tensors

        model = load_compressed_tensors(folder)
    else:
        if method == "lowbit":
            import lowbit.integrations.hf  # noqa: F401 - registers the lowbit quantizer
        kw = {} if method else {"config": config}
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     dtype="auto", **kw)
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def save_model_dir(model: nn.Module, config: QuantConfig, out: str | Path, fmt: str,
                   source_dir: str | Path | None = None) -> Path:
    """Save a model quantized by lowbit as a folder: ``lowbit`` (reloads with transformers
    once `lowbit.integrations.hf` is imported) or ``compressed-tensors`` (stock transformers,
    vLLM). Tokenizer files are copied from `source_dir`."""
    out = Path(out)
    if fmt == "compressed-tensors":
        from lowbit.integrations.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, out, source_dir)
    if fmt != "lowbit":
        raise ValueError(f"format must be lowbit or compressed-tensors, got {fmt!r}")
    from lowbit.integrations.hf import attach_config

    skipped = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _is_lowbit(m.weight)]
    attach_config(model, config, skipped)
    model.save_pretrained(out)
    if source_dir is not None:
        for name in _TOKENIZER_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copy(Path(source_dir) / name, out / name)
    return out


def _is_lowbit(t: Any) -> bool:
    from lowbit.tensors import LowbitTensor

    return isinstance(t, LowbitTensor)
