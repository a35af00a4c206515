"""Train a small Llama-style model with fp8 GEMMs on real text, then export plain linears.

    python examples/train_fp8.py                          # CPU: fp8 GEMMs emulated, tiny model
    python examples/train_fp8.py --recipe rowwise --dim 512 --layers 8 --steps 500   # GPU
    torchrun --nproc-per-node 2 examples/train_fp8.py     # FSDP2, weights all-gathered in fp8

The model reads UTF-8 bytes (vocab 256, so no tokenizer is needed) of the Wikipedia training
split of lowbit.eval.corpora and is scored on its held-out split, which training never sees.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lowbit.eval import byte_tokens, load_text, random_windows
from lowbit.models import ModelArgs, Transformer, init_weights
from lowbit.training import (
    RECIPE_NAMES,
    convert_to_float8_training,
    convert_to_linear,
    enable_fp8_all_gather,
    precompute_fp8_scales,
)


def logits_of(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    # On the GPU: float32 master weights, bf16 activations (the fp8 GEMMs then write bf16).
    with torch.autocast(inputs.device.type, torch.bfloat16, enabled=inputs.is_cuda):
        return model(inputs).float()


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tensorwise", choices=RECIPE_NAMES)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    # Under torchrun every process trains its own batches; FSDP2 shards the weights.
    distributed = "WORLD_SIZE" in os.environ
    device = torch.device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0

    train, heldout = (byte_tokens(load_text("wiki", split)) for split in ("train", "heldout"))
    # Every rank builds the same model from the same seed; fully_shard keeps its slice.
    model = Transformer(ModelArgs.from_name(
        "tiny", dim=args.dim, n_layers=args.layers, n_heads=max(4, args.dim // 64),
        n_kv_heads=2, ffn_hidden=4 * args.dim, max_seq_len=args.seq,
    )).to(device)
    init_weights(model, seed=args.seed)

    # Every block linear trains with fp8 GEMMs; the output head stays in high precision.
    summary = convert_to_float8_training(model, args.recipe, lambda m, fqn: fqn != "output")
    if rank == 0:
        print(summary)
    if distributed and args.recipe == "tensorwise":  # rowwise keeps the bf16/fp32 all-gather
        enable_fp8_all_gather(model)  # weights cross the network in fp8; before fully_shard
    for i, block in enumerate(model.layers):
        if device.type == "cuda":  # inductor fuses the fp8 casts into neighbouring ops
            block = model.layers[i] = torch.compile(block)
        if distributed:
            fully_shard(block)
    if distributed:
        fully_shard(model)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + rank)
    eval_tokens = heldout[: 16 * (args.seq + 1)].view(16, args.seq + 1).to(device)
    losses = []
    for step in range(args.steps):
        tokens = random_windows(train, args.batch, args.seq, gen).to(device)
        loss = lm_loss(logits_of(model, tokens[:, :-1]), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if distributed:
            precompute_fp8_scales(model)  # every weight's fp8 scale in one all-reduce
        losses.append(loss.item())
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  train loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():  # the eval forward still runs fp8 GEMMs
        fp8_logits = logits_of(model, eval_tokens[:, :-1])
    if distributed:
        # Export from one full copy: gather the shards into rank 0's unsharded model.
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.destroy_process_group()
        if rank != 0:
            return {}
        model = Transformer(model.args)
        convert_to_float8_training(model, args.recipe, lambda m, fqn: fqn != "output")
        model.load_state_dict(full)
        model.eval().to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Plain nn.Linear layers holding the very same Parameters: export, PTQ or save them.
    swapped = convert_to_linear(model)
    after = model.state_dict()
    with torch.no_grad():
        plain_logits = logits_of(model, eval_tokens[:, :-1])
    fp8_loss, plain_loss = (lm_loss(x, eval_tokens).item() for x in (fp8_logits, plain_logits))
    same_weights = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before)
    err = (plain_logits - fp8_logits).pow(2).mean()
    sqnr_db = (10 * torch.log10(plain_logits.pow(2).mean() / err)).item()
    print(f"held-out loss: fp8 forward {fp8_loss:.4f}, plain linears {plain_loss:.4f}")
    print(f"converted {len(swapped)} linears back; state_dict unchanged: {same_weights}; "
          f"logits of plain vs fp8 forward: SQNR {sqnr_db:.1f} dB")
    return {
        "train_losses": losses, "fp8_linears": len(summary.converted),
        "heldout_loss_fp8": fp8_loss, "heldout_loss_plain": plain_loss,
        "converted_back": len(swapped), "state_dict_unchanged": same_weights,
        "logits_sqnr_db": sqnr_db,
    }


if __name__ == "__main__":
    main()
