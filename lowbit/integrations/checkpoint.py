"""Quantized checkpoints as safetensors: plain tensors plus a JSON description, no pickle.

Layout of one file:
- a plain state_dict entry is stored under its own key;
- a lowbit tensor under ``<key>:<field>`` for each inner tensor, and described in the
  ``lowbit`` metadata entry (class, class version, logical shape and dtype, attributes);
- tensors shared by several keys (tied embeddings) are stored once; the others are listed
  as aliases.
Loading builds the tensors from that description (unknown classes and newer versions are
refused before anything is touched) and assigns them into the model, which may live on the
`meta` device: no full-precision copy is ever materialized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.quantize.configs import QuantConfig
from lowbit.tensors import Float8Weight, IntWeight, LowbitTensor

FORMAT_VERSION = 1
TENSOR_CLASSES: dict[str, type[LowbitTensor]] = {c.__name__: c for c in (IntWeight, Float8Weight)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, too new, unknown class or wrong model."""


def register_tensor_class(cls: type[LowbitTensor]) -> type[LowbitTensor]:
    """Allow checkpoints to hold `cls` (new formats call this once)."""
    TENSOR_CLASSES[cls.__name__] = cls
    return cls


def flatten_state(
    state: dict[str, torch.Tensor], config: QuantConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain tensors to store, JSON description) for a state_dict, as `save_quantized` writes
    them; the HF integration stores the same pair through `save_pretrained`.

    Pass a `keep_vars=True` state_dict so tied parameters are recognized and stored once."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, t in state.items():
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        if isinstance(t, LowbitTensor):
            described[key] = {
                "class": type(t).__name__,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "attrs": t.attrs(),
            }
            for field, inner in t.inner_tensors().items():
                tensors[f"{key}:{field}"] = inner.detach().contiguous().cpu()
        else:
            tensors[key] = t.detach().contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "tensors": described,
        "aliases": aliases,
        "config": None if config is None else config.to_dict(),
    }
    return tensors, meta


def save_quantized(
    model: nn.Module, path: str | Path, config: QuantConfig | None = None
) -> Path:
    """Write `model.state_dict()` (quantized or not) to a safetensors file."""
    path = Path(path)
    # keep_vars: tied parameters come back as the same object, so they are stored once.
    tensors, meta = flatten_state(model.state_dict(keep_vars=True), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"lowbit": json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON description of a lowbit checkpoint, validated for version."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lowbit")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} has no lowbit metadata; was it written by save_quantized?")
    return parse_metadata(raw, path)


def parse_metadata(raw: str, path: str | Path) -> dict:
    """Validate the ``lowbit`` JSON entry of a checkpoint (version, classes, dtypes)."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt lowbit metadata ({e})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has lowbit format version {version}; this lowbit reads up to "
            f"{FORMAT_VERSION}. Upgrade lowbit to load it."
        )
    for key, d in meta["tensors"].items():
        if d.get("class") not in TENSOR_CLASSES:
            raise CheckpointError(f"{path}: {key} has unknown tensor class {d.get('class')!r}")
        if d.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: {key} has unsupported dtype {d.get('dtype')!r}")
    return meta


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state_dict stored in `path`, with lowbit tensors rebuilt (aliases included)."""
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    state = build_tensors(raw, meta, path)
    stray = [k for k in raw if ":" in k]
    if stray:
        raise CheckpointError(f"{path}: tensors {stray[:3]} belong to no described lowbit tensor")
    state.update(raw)
    for alias, target in meta["aliases"].items():
        state[alias] = state[target]
    return state


def build_tensors(raw: dict[str, torch.Tensor], meta: dict, path: str | Path) -> dict:
    """Rebuild the described lowbit tensors from their stored fields, popping those from
    `raw` (so what is left is the plain entries)."""
    state: dict[str, torch.Tensor] = {}
    for key, d in meta["tensors"].items():
        cls = TENSOR_CLASSES[d["class"]]
        fields = {n: raw.pop(f"{key}:{n}", None) for n in cls.tensor_fields}
        required = [n for n in cls.tensor_fields if n not in cls.optional_fields]
        missing = [n for n in required if fields[n] is None]
        if missing or set(d["attrs"]) != set(cls.attr_fields):
            raise CheckpointError(f"{path}: {key} is incomplete (missing {missing or 'attrs'})")
        state[key] = cls(shape=tuple(d["shape"]), dtype=_DTYPES[d["dtype"]], **fields, **d["attrs"])
    return state


def load_quantized(
    model: nn.Module, path: str | Path, device: str | torch.device = "cpu", strict: bool = True
) -> nn.Module:
    """Load a checkpoint written by `save_quantized` into `model` (which may be on `meta`).

    Tensors are assigned, not copied, so the model needs no prior quantization. With
    strict=True the keys must match the model's exactly; on any error the model is unchanged.
    """
    state = load_state(path, device)
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - set(state), set(state) - expected
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for key, value in state.items():
        if key not in params and key not in buffers:
            continue
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if key in params:
            requires_grad = params[key].requires_grad and not isinstance(value, LowbitTensor)
            setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))
        else:
            module._buffers[name] = value
    _retie(model, state)
    return model


def _retie(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Keys that name one stored tensor become one Parameter again (tied embeddings)."""
    first_param: dict[int, nn.Parameter] = {}
    for key, value in state.items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters.get(name)
        if param is None:
            continue
        if id(value) in first_param:
            module._parameters[name] = first_param[id(value)]
        else:
            first_param[id(value)] = param
