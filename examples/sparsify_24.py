"""2:4 sparsity on SmolLM2-135M-Instruct's MLPs: magnitude pruning vs WANDA, dense as baseline.

    python examples/sparsify_24.py                        # all 30 layers, 4 x 1024 tokens
    python examples/sparsify_24.py --bits 4               # int4 kept values (groups of 64)
    python examples/sparsify_24.py --layers 2 --windows 1 --seq-len 256 --calib-windows 4

2:4 keeps 2 of every 4 weights along the input dimension. Magnitude pruning keeps the two
largest |w|; WANDA keeps the two largest |w| * ||x||, with the input channel norms ||x||
measured on calibration text (the Wikipedia *train* split; perplexity uses the held-out one).
A 135M model loses a lot to 2:4 on every MLP (WANDA far less than magnitude; full table in
benchmarks/RESULTS.md); --layers N prunes only the first N layers.
Needs the real model and text offline (see examples/quantize_and_generate.py).
"""

from __future__ import annotations

import argparse
import copy
import re

import torch
from torch import nn

import lowbit
from lowbit.eval import heldout_ids, load_smollm2, load_text, perplexity


def mlp_filter(layers: int | None):
    """Choose the MLP linears (gate/up/down_proj) of the first `layers` decoder layers."""

    def chosen(module: nn.Module, fqn: str) -> bool:
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.\w+", fqn)
        return isinstance(module, nn.Linear) and m is not None and (
            layers is None or int(m.group(1)) < layers)

    return chosen


def calibration_batches(tokenizer, windows: int, seq_len: int) -> list[torch.Tensor]:
    """`windows` batches of `seq_len` tokens from the start of the Wikipedia train split."""
    text = load_text("wiki", "train")[: 8 * windows * seq_len]  # ~4 characters per token
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(ids[: windows * seq_len].view(windows, 1, seq_len))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, help="sparsify the first N layers (default: all)")
    p.add_argument("--bits", type=int, default=0, choices=(0, 4, 8),
                   help="quantize the kept values to int4/int8 (0: keep fp32)")
    p.add_argument("--group-size", type=int, default=64, help="group of the int kept values")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=4, help="held-out windows to score")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    p.add_argument("--calib-windows", type=int, default=16, help="WANDA calibration batches")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration batch")
    args = p.parse_args(argv)

    dense, tokenizer = load_smollm2(torch.float32)
    dense.to(args.device)
    ids = heldout_ids(tokenizer, "wiki")
    batches = calibration_batches(tokenizer, args.calib_windows, args.calib_len)

    def ppl(m: nn.Module) -> float:
        return perplexity(m, ids, seq_len=args.seq_len, max_windows=args.windows,
                          progress=False).ppl

    r = {"ppl_dense": ppl(dense)}
    print(f"{'model':<22}{'wiki ppl':>10}{'linears':>9}{'MiB dense':>11}{'MiB sparse':>12}")
    print(f"{'dense fp32':<22}{r['ppl_dense']:>10.3f}")
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        config = lowbit.Sparse24(method, bits=args.bits, group_size=args.group_size)
        # WANDA runs the dense model once over the batches to get its input norms.
        calibration = batches if method == "wanda" else None
        summary = lowbit.sparsify_(model, config, mlp_filter(args.layers),
                                   calibration=calibration)
        r[f"ppl_{method}"] = ppl(model)
        # Storage of the pruned weights: kept values + 2-bit positions (+ int scales/zeros).
        r["linears"] = len(summary.quantized)
        r["bytes_dense"], r[f"bytes_{method}"] = summary.bytes_before, summary.bytes_after
        label = f"2:4 {method}" + (f" + int{args.bits}" if args.bits else "")
        print(f"{label:<22}{r[f'ppl_{method}']:>10.3f}{r['linears']:>9}"
              f"{summary.bytes_before / 2**20:>11.1f}{summary.bytes_after / 2**20:>12.1f}")
        del model
    return r


if __name__ == "__main__":
    main()
