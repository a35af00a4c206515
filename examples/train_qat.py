"""Quantization-aware training: prepare -> train -> convert, against post-training quantization.

    python examples/train_qat.py                  # 2-bit weights, groups of 32, tiny model
    python examples/train_qat.py --bits 4 --pretrain-steps 1000 --qat-steps 300

A small Llama-style model first learns UTF-8 bytes (vocab 256, no tokenizer) of the
Wikipedia training split of lowbit.eval.corpora in float. Then, from those same weights:

- PTQ: `quantize_` right away;
- fine-tune -> PTQ: the QAT run's extra steps in float, then `quantize_` (the control: it
  separates what QAT gains from what the extra training alone gains);
- QAT -> convert: the same extra steps with `lowbit.qat.prepare` (fake quant), then
  `lowbit.qat.convert`.

All are scored on the held-out split, which no training step sees.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from lowbit import IntWeight, IntxWeightOnly, PerGroup, qat, quantize_
from lowbit.eval import byte_tokens, load_text, random_windows
from lowbit.models import ModelArgs, Transformer, init_weights


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train(model, tokens: torch.Tensor, steps: range, args) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in steps:
        # Batches depend only on the step number: the QAT and fine-tune runs see the same data.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = random_windows(tokens, args.batch, args.seq, gen)
        loss = lm_loss(model, batch.to(args.device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, heldout: torch.Tensor) -> float:
    return lm_loss(model.eval(), heldout).item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=2, help="weight bits (symmetric int)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--qat-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    config = IntxWeightOnly(bits=args.bits, granularity=PerGroup(args.group_size))
    tokens = byte_tokens(load_text("wiki", "train"))
    heldout = byte_tokens(load_text("wiki", "heldout"))[: 32 * (args.seq + 1)]
    heldout = heldout.view(32, args.seq + 1).to(args.device)

    # The float model everything starts from (stands in for a pretrained checkpoint).
    base = Transformer(ModelArgs.from_name("tiny", max_seq_len=args.seq)).to(args.device)
    init_weights(base, seed=args.seed)
    train(base, tokens, range(args.pretrain_steps), args)
    extra = range(args.pretrain_steps, args.pretrain_steps + args.qat_steps)

    ptq = copy.deepcopy(base)
    quantize_(ptq, config, show_progress=False)

    finetuned = copy.deepcopy(base).train()
    train(finetuned, tokens, extra, args)
    quantize_(finetuned, config, show_progress=False)

    model = copy.deepcopy(base).train()
    summary = qat.prepare(model, config)  # swaps linears for fake-quantized ones
    print(summary)
    qat_losses = train(model, tokens, extra, args)  # forward sees quantized weights (STE grads)
    fake_quant_loss = heldout_loss(model, heldout)
    qat.convert(model)  # real quantized weights: the same tensors quantize_ would make
    quantized = sum(isinstance(m.weight, IntWeight) for m in model.modules()
                    if isinstance(m, torch.nn.Linear))

    result = {
        "float": heldout_loss(base, heldout),
        "ptq": heldout_loss(ptq, heldout),
        "finetune_ptq": heldout_loss(finetuned, heldout),
        "qat_convert": heldout_loss(model, heldout),
    }
    print(f"held-out loss (nats/byte), {args.bits}-bit weights, groups of {args.group_size}:")
    for name, value in result.items():
        print(f"  {name:13s} {value:.4f}")
    print(f"QAT model before convert (fake quant): {fake_quant_loss:.4f}; "
          f"{quantized} linears hold IntWeight after convert")
    return {**result, "qat_train_losses": qat_losses, "fake_quant_loss": fake_quant_loss,
            "quantized_linears": quantized, "prepared": len(summary.prepared)}


if __name__ == "__main__":
    main()
