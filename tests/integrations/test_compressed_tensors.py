"""compressed-tensors export/import: packing checked against the compressed-tensors package,
lowbit -> folder -> lowbit bit-exact, and stock transformers (no lowbit imported) loading it."""

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from hf_folders import tiny_llama_dir  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lowbit.formats import PerGroup, PerRow  # noqa: E402
from lowbit.integrations.compressed_tensors import (  # noqa: E402
    CompressedTensorsError,
    _pack_words,
    load_compressed_tensors,
    save_compressed_tensors,
)
from lowbit.quantize import IntxWeightOnly, quantize_  # noqa: E402
from lowbit.quantize.presets import preset  # noqa: E402

CONFIGS = {
    "w4-g64-sym": IntxWeightOnly(4, PerGroup(64), "symmetric"),
    "w4-channel-sym": IntxWeightOnly(4, PerRow(), "symmetric"),
    "int8": preset("int8"),
    "int8-dynamic": preset("int8-dynamic"),
    "fp8": preset("fp8"),
    "fp8-dynamic": preset("fp8-dynamic"),
    "int4-g64-int-zero": preset("int4-g64"),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_compressed_tensors(bits):
    codes = torch.randint(0, 2**bits, (6, 72), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(_pack_words(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(_pack_words(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


def _quantized(src, cfg):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, cfg, lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head",
                  show_progress=False)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    src = tiny_llama_dir(root / "src")
    ids = torch.randint(0, 256, (2, 10))
    out = {}
    for name, cfg in CONFIGS.items():
        model = _quantized(src, cfg)
        with torch.no_grad():
            ref = model(ids).logits
        out[name] = (save_compressed_tensors(model, root / name, src), ref)
    return ids, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_import_is_bit_exact(exported, name):
    ids, out = exported
    folder, ref = out[name]
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(folder)(ids).logits, ref)


def test_float_zero_is_refused(tmp_path):
    model = _quantized(tiny_llama_dir(tmp_path / "src"), preset("int4-g64-float-zero"))
    with pytest.raises(CompressedTensorsError, match="float zero"):
        save_compressed_tensors(model, tmp_path / "out")


@pytest.mark.slow
def test_stock_transformers_loads_without_lowbit(exported, tmp_path):
    ids, out = exported
    # Asymmetric pack-quantized is left out: transformers 5.24 + compressed-tensors 0.20 build
    # the zero-point parameter unpacked ([N, G]) but the format stores it packed, so stock
    # transformers cannot load such a folder from any producer (compressed-tensors included).
    names = [n for n in CONFIGS if n != "int4-g64-int-zero"]
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r})["ids"]
res = {{}}
for name, folder in {[(n, str(out[n][0])) for n in names]!r}:
    with torch.no_grad():
        res[name] = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
assert not [m for m in sys.modules if m.startswith("lowbit")]
torch.save(res, {str(tmp_path / 'res.pt')!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    for name in names:
        ref, got = out[name][1], res[name]
        if name == "int8-dynamic":
            # Both quantize activations per token to int8, but compressed-tensors fake-quantizes
            # (round(x / s) * s, then a float matmul) while lowbit runs an int8 GEMM: codes can
            # differ by one step where rounding ties, so logits agree to int8 noise, not bits.
            noise = (got - ref).pow(2).mean() / ref.pow(2).mean()
            assert noise < 1e-3, (name, noise)  # > 30 dB SQNR; one int8 step is ~ -48 dB
        else:
            # Weight-only and fp8: both sides decode the same codes and scales.
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
