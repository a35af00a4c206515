"""compressed-tensors checkpoints: the format vLLM and stock transformers load natively.

Export writes an HF folder (config.json with a ``compressed-tensors`` quantization_config,
model.safetensors, tokenizer) from a transformers model whose Linear weights are lowbit
tensors; import reads such a folder back into lowbit tensors. Only the stored layout changes,
never the numbers: codes and scales are copied bit for bit.

Mapping (per Linear weight; the scheme is read off the lowbit tensor itself, so calibrated
models export the same way):

- IntWeight, 1..8 bits, weight-only -> pack-quantized, W{b}A16, group or channel strategy,
  symmetric or with an integer zero point;
- IntWeight int8 with dynamic int8 per-token activations -> int-quantized, W8A8;
- Float8Weight e4m3, weight-only -> float-quantized, FP8 channel weights;
- Float8Weight e4m3 with dynamic per-row activations -> float-quantized, FP8_DYNAMIC.

Both formats dequantize as ``(q - zero) * scale``. compressed-tensors stores signed codes and
integer zero points, lowbit unsigned codes (offset 2^(bits-1)) and a zero in float: the two
convert exactly when the zero is integer-valued. Float zeros (HQQ / GGUF style), per-tensor
fp8 activation scales and the int8-activation/int4-weight scheme have no exact counterpart
here and are refused with the reason.

Packing: compressed-tensors packs codes (offset to unsigned) as a little-endian bit stream
into int32 words along the input dim, zero points along the output dim: the same bit stream
lowbit packs into bytes, padded to whole words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.formats import pack_bits, unpack_bits
from lowbit.tensors import Float8Weight, IntWeight, LowbitTensor

QUANT_METHOD = "compressed-tensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


class CompressedTensorsError(ValueError):
    """A model or folder that has no exact compressed-tensors counterpart."""


# ---- packing --------------------------------------------------------------------------------
def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 words [R, ceil(C * bits / 32)] (little-endian stream)."""
    rows, cols = codes.shape
    padded = -(-cols // 32) * 32  # a whole number of words, and of lowbit's byte packs
    codes = nn.functional.pad(codes.to(torch.uint8), (0, padded - cols))
    words = pack_bits(codes, bits).contiguous().view(torch.int32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def _unpack_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `_pack_words`: unsigned uint8 codes [R, cols]."""
    return unpack_bits(words.contiguous().view(torch.uint8), bits, cols)


# ---- lowbit -> compressed-tensors -----------------------------------------------------------
def _weight_args(t: LowbitTensor) -> dict[str, Any]:
    k = t.shape[1]
    groups = t.scale.shape[1]
    if isinstance(t, Float8Weight):
        if t.qdata.dtype != torch.float8_e4m3fn:
            raise CompressedTensorsError("compressed-tensors float weights are e4m3 only")
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                "group_size": None, "dynamic": False}
    strategy = "channel" if groups == 1 else "group"
    return {"num_bits": t.bits, "type": "int", "symmetric": t.zero is None,
            "strategy": strategy, "group_size": None if groups == 1 else k // groups,
            "dynamic": False}


def _scheme(t: LowbitTensor) -> tuple[str, dict[str, Any]]:
    """(format, scheme) of one lowbit weight, or CompressedTensorsError with the reason."""
    if t.transposed:
        raise CompressedTensorsError("transposed lowbit weights have no compressed-tensors form")
    if isinstance(t, IntWeight) and t.zero is not None:
        if not torch.equal(t.zero, t.zero.round()):
            raise CompressedTensorsError(
                "float zero points (zero='float', HQQ/GGUF style) have no compressed-tensors "
                "form, which stores integer zero points; use zero='int'"
            )
    act = None
    if t.act_quant == "int8_per_token":
        act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
               "dynamic": True}
    elif t.act_quant == "per_row":
        act = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
               "dynamic": True}
    elif t.act_quant != "none":
        raise CompressedTensorsError(
            f"activation scheme {t.act_quant!r} has no exact compressed-tensors counterpart"
        )
    if isinstance(t, Float8Weight):
        fmt = "float-quantized"
    elif act is not None:
        fmt = "int-quantized"
    else:
        fmt = "pack-quantized"
    return fmt, {"weights": _weight_args(t), "input_activations": act}


def _compress(t: LowbitTensor, fmt: str) -> dict[str, torch.Tensor]:
    """The stored entries (suffixes of the module name) for one weight."""
    if isinstance(t, Float8Weight):
        return {"weight": t.qdata, "weight_scale": t.scale}
    if fmt == "int-quantized":
        return {"weight": t.qdata, "weight_scale": t.scale}
    n, k = t.shape
    if t.signed_int8:
        codes = (t.qdata.to(torch.int16) + 128).to(torch.uint8)
    else:
        codes = unpack_bits(t.qdata, t.bits, k)
    out = {"weight_packed": _pack_words(codes, t.bits), "weight_scale": t.scale,
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if t.zero is not None:
        zero_codes = t.zero.round().to(torch.uint8)
        out["weight_zero_point"] = _pack_words(zero_codes.t(), t.bits).t().contiguous()
    return out


def to_compressed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in compressed-tensors layout, its quantization_config) for a model whose
    Linear weights are lowbit tensors. Every quantized Linear must share one scheme."""
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, tuple[str, dict]] = {}
    unquantized_linears: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, LowbitTensor) and not isinstance(module, nn.Linear):
            raise CompressedTensorsError(
                f"{name} ({type(module).__name__}) holds a quantized weight; compressed-tensors "
                "quantizes Linear layers only (keep tied embeddings in full precision)"
            )
        if isinstance(module, nn.Linear):
            if isinstance(weight, LowbitTensor):
                schemes[name] = _scheme(weight)
            else:
                unquantized_linears.append(name)
    if not schemes:
        raise CompressedTensorsError("the model has no lowbit-quantized Linear layers")
    distinct = {json.dumps(s, sort_keys=True) for s in schemes.values()}
    if len(distinct) > 1:
        raise CompressedTensorsError(
            f"export supports one scheme per model; found {len(distinct)}: {sorted(distinct)}"
        )
    fmt, scheme = next(iter(schemes.values()))
    for key, t in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in schemes and leaf == "weight":
            for suffix, v in _compress(t, fmt).items():
                tensors[f"{module_name}.{suffix}"] = v.detach().contiguous().cpu()
        else:
            tensors[key] = t.detach().contiguous().cpu()
    config = {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], **scheme}},
        "ignore": unquantized_linears,
        "kv_cache_scheme": None,
    }
    return tensors, config


def save_compressed_tensors(model: nn.Module, out_dir: str | Path,
                            tokenizer_dir: str | Path | None = None) -> Path:
    """Write a transformers model quantized by lowbit as a compressed-tensors folder.

    `tokenizer_dir`: copy the tokenizer (and generation config) files from this folder."""
    out = Path(out_dir)
    tensors, qconfig = to_compressed_tensors(model)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    if config.get("tie_word_embeddings"):
        # transformers re-ties the output embedding on load; storing it twice breaks safetensors.
        for key in getattr(model, "_tied_weights_keys", None) or {"lm_head.weight": None}:
            tensors.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


# ---- compressed-tensors -> lowbit -----------------------------------------------------------
def _decompress(entries: dict[str, torch.Tensor], fmt: str, scheme: dict,
                dtype: torch.dtype) -> LowbitTensor:
    w_args, act = scheme["weights"], scheme.get("input_activations")
    act_dynamic_token = bool(act) and act.get("dynamic") is True and act.get("strategy") == "token"
    if act and not act_dynamic_token:
        raise CompressedTensorsError(f"activation scheme {act} is not supported by lowbit")
    scale = entries["weight_scale"]
    if w_args["type"] == "float":
        q = entries["weight"]
        if q.dtype != torch.float8_e4m3fn or w_args.get("strategy") != "channel":
            raise CompressedTensorsError("lowbit reads fp8 e4m3 channel-wise weights only")
        return Float8Weight(shape=q.shape, dtype=dtype, qdata=q, scale=scale.float(),
                            act_quant="per_row" if act else "none", transposed=False)
    bits = int(w_args["num_bits"])
    if fmt == "int-quantized":
        q = entries["weight"]
        if bits != 8 or not w_args.get("symmetric", True) or scale.shape[1] != 1:
            raise CompressedTensorsError("lowbit reads int-quantized int8 channel weights only")
        return IntWeight(shape=q.shape, dtype=dtype, qdata=q.to(torch.int8), scale=scale.to(dtype),
                         zero=None, bits=8, act_quant="int8_per_token" if act else "none",
                         transposed=False)
    if fmt != "pack-quantized" or act:
        raise CompressedTensorsError(f"format {fmt!r} with {scheme} is not supported by lowbit")
    n, k = (int(v) for v in entries["weight_shape"])
    codes = _unpack_words(entries["weight_packed"], bits, k)
    zero = None
    if "weight_zero_point" in entries:
        zp = entries["weight_zero_point"]
        zero = _unpack_words(zp.t(), bits, n).t().to(dtype).contiguous()
    if bits == 8 and zero is None:
        qdata = (codes.to(torch.int16) - 128).to(torch.int8)
    else:
        qdata = pack_bits(codes, bits)
    return IntWeight(shape=(n, k), dtype=dtype, qdata=qdata, scale=scale.to(dtype), zero=zero,
                     bits=bits, act_quant="none", transposed=False)


def load_compressed_tensors(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model from a compressed-tensors folder, its Linear weights rebuilt as
    lowbit tensors (no decompression to full precision)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CompressedTensorsError(f"{folder} is not a compressed-tensors checkpoint")
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
        raise CompressedTensorsError("lowbit reads one config group targeting Linear layers")
    fmt, scheme = groups[0].get("format") or qc["format"], groups[0]
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    del config.quantization_config
    # Parameters on meta (nothing full-precision is built), buffers (rotary tables) real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = sorted(folder.glob("*.safetensors"))
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in raw if k.rpartition(".")[2].startswith("weight_")]:
        module_name, _, leaf = key.rpartition(".")
        by_module.setdefault(module_name, {})[leaf] = raw.pop(key)
    for module_name, entries in by_module.items():
        if module_name + ".weight" in raw:
            entries["weight"] = raw.pop(module_name + ".weight")
        raw[module_name + ".weight"] = _decompress(entries, fmt, scheme, dtype)
    _assign(model, raw, dtype)
    return model.eval()


def _assign(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    expected = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    unexpected = set(state) - expected
    if unexpected:
        raise CompressedTensorsError(f"entries {sorted(unexpected)[:3]} match no model tensor")
    for key, value in state.items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in module._buffers:
            module._buffers[name] = value
            continue
        if value.is_floating_point() and not isinstance(value, LowbitTensor):
            value = value.to(dtype)
        grad = value.is_floating_point() and not isinstance(value, LowbitTensor)
        setattr(module, name, nn.Parameter(value, requires_grad=grad))
    model.tie_weights()
    still_meta = [k for k, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CompressedTensorsError(f"the checkpoint lacks {still_meta[:3]}")
