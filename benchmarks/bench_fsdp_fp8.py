"""Data-parallel training throughput under FSDP2 (`fully_shard`): tokens/s per GPU, step time
and peak memory of bf16 against fp8 training linears, with the weights all-gathered in bf16 or
(tensorwise) in fp8.

The model is bench_fp8_training.py's: Llama-style at Llama-3-8B layer dimensions, random
bf16 weights, every block linear converted, output head bf16, each block compiled, fused AdamW,
batch 1 per GPU at seq 4096, so the numbers sit next to its single-GPU table. Each block is
sharded on its own, then the root. `tensorwise+fp8ag` wraps the fp8 weights with
`enable_fp8_all_gather` before sharding and calls `precompute_fp8_scales` after every optimizer
step; the check after timing records what the first block's linears received from the
all-gather (fp8 data proves the 1-byte gather). Rank 0 writes results/fsdp_fp8.json.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_fp8.py --layers 8 --seq 4096
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_fsdp_fp8.py --device cpu --steps 2

`--device cpu` is a smoke run (gloo, tiny dims, fp8 emulated, no compile) for machines without
GPUs; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8_training import not_output, train_step, write_profile  # noqa: E402
from common import conditions, write_result  # noqa: E402

from lowbit.models import ModelArgs, Transformer, init_weights  # noqa: E402
from lowbit.training import (  # noqa: E402
    Float8GatheredWeight,
    convert_to_float8_training,
    enable_fp8_all_gather,
    precompute_fp8_scales,
)

VARIANTS = ["bf16", "tensorwise", "tensorwise+fp8ag", "rowwise"]
FP8_AG = "+fp8ag"


def build(variant: str, args: ModelArgs, device: str, backend: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    # Every rank builds the same full model (same seed); fully_shard keeps each rank's slice.
    model = model.to_empty(device=device).to(torch.bfloat16)
    init_weights(model, seed=0)
    recipe = variant.removesuffix(FP8_AG)
    if recipe != "bf16":
        convert_to_float8_training(model, recipe, not_output)
    if variant.endswith(FP8_AG) and enable_fp8_all_gather(model) == 0:
        raise RuntimeError("no weight was wrapped for the fp8 all-gather")
    # bf16 weights as in the single-GPU benchmark: gathers and gradient reduce-scatters in bf16.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for i, block in enumerate(model.layers):
        if backend != "none":
            # Compile inside the FSDP wrapper: its hooks (all-gather, reshard) stay eager.
            block = model.layers[i] = torch.compile(block, backend=backend, fullgraph=True)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def fsdp_train_step(model, opt, tokens) -> torch.Tensor:
    loss = train_step(model, opt, tokens)
    precompute_fp8_scales(model)  # one all-reduce for all scales; a no-op without fp8ag
    return loss


def gathered_dtypes(model: Transformer) -> list[str]:
    """dtypes of the first block's linear weights as FSDP2's all-gather hands them over."""
    block = model.layers[0]
    block.unshard()
    weights = [m.weight for m in block.modules() if isinstance(m, nn.Linear)]
    found = {w._data.dtype if isinstance(w, Float8GatheredWeight) else w.dtype for w in weights}
    block.reshard()
    return sorted(str(d).removeprefix("torch.") for d in found)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def run(variant: str, args: ModelArgs, opts) -> dict:
    device = opts.device
    torch._dynamo.reset()
    model = build(variant, args, device, opts.compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())  # each rank its own data
    batches = [torch.randint(0, args.vocab_size, (opts.batch, opts.seq + 1), device=device,
                             generator=gen) for _ in range(4)]
    precompute_fp8_scales(model)
    sync(device)
    t0 = time.perf_counter()
    first_loss = fsdp_train_step(model, opt, batches[0]).item()
    for i in range(1, opts.warmup):
        fsdp_train_step(model, opt, batches[i % 4])
    sync(device)
    compile_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for i in range(opts.steps):
        loss = fsdp_train_step(model, opt, batches[i % 4])
    sync(device)
    seconds = (time.perf_counter() - t0) / opts.steps
    peak = torch.tensor([torch.cuda.max_memory_allocated() if device == "cuda" else 0],
                        dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if opts.profile and dist.get_rank() == 0:  # the other ranks keep stepping alongside
        write_profile(f"fsdp_{variant}", partial(fsdp_train_step, model, opt), batches,
                      host=True)
    elif opts.profile:
        for i in range(2):
            fsdp_train_step(model, opt, batches[i % 4])
    gathered = gathered_dtypes(model)
    if variant.endswith(FP8_AG) and not all(d.startswith("float8") for d in gathered):
        raise RuntimeError(f"fp8 all-gather variant gathered {gathered}")
    row = {
        "variant": variant,
        "tokens_per_s_per_gpu": opts.batch * opts.seq / seconds,
        "step_ms": seconds * 1000,
        "peak_mem_gib": peak.item() / 2**30 if device == "cuda" else None,
        "gathered": ",".join(gathered),
        "first_loss": first_loss,
        "last_loss": loss.item(),
        "compile_and_warmup_s": compile_s,
    }
    del model, opt, batches, loss
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--layers", type=int, help="default 8 (cuda), 2 (cpu)")
    p.add_argument("--seq", type=int, help="default 4096 (cuda), 64 (cpu)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="fsdp_fp8")
    p.add_argument("--profile", action="store_true",
                   help="rank 0 also writes a host + kernel time table per variant")
    p.add_argument("--compile", choices=["inductor", "aot_eager", "none"],
                   help="per-block torch.compile backend; default inductor (cuda), none (cpu)")
    opts = p.parse_args()
    cuda = opts.device == "cuda"
    opts.layers = opts.layers or (8 if cuda else 2)
    opts.seq = opts.seq or (4096 if cuda else 64)
    opts.compile = opts.compile or ("inductor" if cuda else "none")
    chosen = set(opts.variants.split(","))
    if chosen - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(chosen - set(VARIANTS))}; pick from {VARIANTS}")
    variants = [v for v in VARIANTS if v in chosen]  # bf16 first: the baseline of every row
    if cuda:
        args = ModelArgs.from_name("llama3-8b", n_layers=opts.layers, max_seq_len=opts.seq)
    else:
        args = ModelArgs(dim=256, n_layers=opts.layers, n_heads=4, n_kv_heads=2,
                         vocab_size=1024, ffn_hidden=512, max_seq_len=opts.seq)
    # First-step compile runs on every rank at once; 10 min covers it and ends a hung rank.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    rows, base = [], None
    for variant in variants:
        try:
            row = run(variant, args, opts)
        except Exception as e:  # a failure on every rank (compile, recipe) keeps the others
            row = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if variant == "bf16" and "error" not in row:
            base = row
        if base and "error" not in row:
            row["speedup_vs_bf16"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
    if rank == 0:
        cond = conditions() | {"world_size": dist.get_world_size(), "device": opts.device,
                               "backend": dist.get_backend()}
        shapes = {"layers": opts.layers, "seq": opts.seq, "batch_per_gpu": opts.batch,
                  "dim": args.dim, "ffn_hidden": args.ffn_hidden, "n_heads": args.n_heads,
                  "n_kv_heads": args.n_kv_heads, "vocab": args.vocab_size,
                  "steps": opts.steps, "warmup": opts.warmup, "compile": opts.compile,
                  "optimizer": "AdamW fused", "params": "bf16, FSDP2 per block + root",
                  "fp8 layers": "all block linears; output head bf16"}
        path = write_result(opts.out, {"conditions": cond, "shapes": shapes, "rows": rows})
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
