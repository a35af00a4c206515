"""Train with a low-bit AdamW: state bytes per parameter, exact resume, host offload.

    python examples/train_low_bit_optimizer.py                    # AdamW4bit, tiny model
    python examples/train_low_bit_optimizer.py --optimizer 8bit --steps 200

A small Llama-style model learns UTF-8 bytes of the Wikipedia training split of
lowbit.eval.corpora (vocab 256, no tokenizer). The same run is done with torch.optim.AdamW
(fp32 moments), with the low-bit optimizer uninterrupted, and with the low-bit optimizer
stopped half-way, saved, and resumed into a fresh model and optimizer.
"""

from __future__ import annotations

import argparse
import io

import torch
import torch.nn.functional as F

from lowbit.eval import byte_tokens, load_text, random_windows
from lowbit.models import ModelArgs, Transformer, init_weights
from lowbit.optim import AdamW4bit, AdamW8bit, AdamWFp8, CPUOffloadOptimizer, state_storage_bytes

OPTIMIZERS = {"4bit": AdamW4bit, "8bit": AdamW8bit, "fp8": AdamWFp8}


def make_model(args: argparse.Namespace, seed: int) -> Transformer:
    # dim 128 makes every weight matrix >= 4096 elements, the size from which the low-bit
    # optimizers quantize moments (smaller tensors such as norm gains keep fp32 moments).
    model = Transformer(ModelArgs.from_name(
        "tiny", dim=128, n_heads=8, n_kv_heads=2, ffn_hidden=256, max_seq_len=args.seq))
    init_weights(model, seed=seed)
    return model.to(args.device)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train(model, opt, tokens: torch.Tensor, steps: range, args) -> list[float]:
    losses = []
    for step in steps:
        # The batch depends only on the step number, so a resumed run sees the same data.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = random_windows(tokens, args.batch, args.seq, gen)
        loss = lm_loss(model, batch.to(args.device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="4bit", choices=sorted(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    LowBit = OPTIMIZERS[args.optimizer]
    tokens = byte_tokens(load_text("wiki", "train"))
    heldout = byte_tokens(load_text("wiki", "heldout"))[: 16 * (args.seq + 1)]
    heldout = heldout.view(16, args.seq + 1).to(args.device)
    half = args.steps // 2

    # 1. Baseline: torch.optim.AdamW keeps two fp32 moments, 8 bytes per parameter.
    model = make_model(args, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    fp32_losses = train(model, opt, tokens, range(args.steps), args)
    fp32_bytes = state_storage_bytes(opt) / n_params
    with torch.no_grad():
        fp32_heldout = lm_loss(model, heldout).item()

    # 2. The low-bit optimizer, uninterrupted: a drop-in replacement.
    model = make_model(args, args.seed)
    opt = LowBit(model.parameters(), lr=args.lr)
    full_losses = train(model, opt, tokens, range(args.steps), args)
    low_bytes = state_storage_bytes(opt) / n_params
    with torch.no_grad():
        low_heldout = lm_loss(model, heldout).item()
    final_params = [p.detach().clone() for p in model.parameters()]

    # 3. Stop half-way and save model + optimizer (quantized states load with weights_only).
    model = make_model(args, args.seed)
    opt = LowBit(model.parameters(), lr=args.lr)
    first = train(model, opt, tokens, range(half), args)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    # Resume into a fresh model (other random init: everything must come from the checkpoint).
    model = make_model(args, args.seed + 1)
    model.load_state_dict(ckpt["model"])
    opt = LowBit(model.parameters(), lr=args.lr)
    opt.load_state_dict(ckpt["optimizer"])
    resumed = first + train(model, opt, tokens, range(half, args.steps), args)
    resume_exact = resumed == full_losses and all(
        torch.equal(a, b) for a, b in zip(final_params, model.parameters()))

    # 4. CPUOffloadOptimizer: states and the update live in host memory, any optimizer class.
    model = make_model(args, args.seed)
    opt = CPUOffloadOptimizer(model.parameters(), LowBit, lr=args.lr)
    offload_losses = train(model, opt, tokens, range(half), args)
    offload_diff = max(abs(a - b) for a, b in zip(offload_losses, full_losses))

    name = LowBit.__name__
    print(f"{n_params} parameters; optimizer state bytes/param: torch AdamW {fp32_bytes:.2f}, "
          f"{name} {low_bytes:.3f}")
    print(f"after {args.steps} steps: train loss AdamW {fp32_losses[-1]:.3f}, {name} "
          f"{full_losses[-1]:.3f}; held-out loss AdamW {fp32_heldout:.3f}, {name} "
          f"{low_heldout:.3f}")
    print(f"saved at step {half}, resumed into a fresh model+optimizer: identical losses and "
          f"weights to the uninterrupted run: {resume_exact}")
    print(f"CPUOffloadOptimizer({name}), {half} steps: max |loss diff| vs on-device "
          f"{offload_diff:.2e}")
    return {
        "n_params": n_params, "fp32_bytes_per_param": fp32_bytes,
        "lowbit_bytes_per_param": low_bytes, "fp32_losses": fp32_losses,
        "lowbit_losses": full_losses, "resumed_losses": resumed, "resume_exact": resume_exact,
        "fp32_heldout_loss": fp32_heldout, "lowbit_heldout_loss": low_heldout,
        "offload_losses": offload_losses, "offload_max_loss_diff": offload_diff,
    }


if __name__ == "__main__":
    main()
