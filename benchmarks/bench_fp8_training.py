"""Training throughput with fp8 linears: a Llama-style model at Llama-3-8B layer dimensions
(lowbit.models.llama, random weights), seq 4096, each transformer block compiled with
torch.compile, AdamW. bf16, lowbit's three recipes and torchao 0.18's same recipes, one process.

Every linear of the blocks is converted; the output head (dim x vocab) stays bf16 in every
variant, as torchtitan does. Before timing, each variant's first-step loss is compared with
bf16's on the same batch (a broken cast shows as a jump), and lowbit's CUDA fp8 GEMM is checked
against its CPU emulation on fresh inputs. Writes results/fp8_training.json.

    python benchmarks/bench_fp8_training.py --layers 8 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BF16_TFLOPS, RESULTS, conditions, write_result  # noqa: E402

from lowbit.models import ModelArgs, Transformer, fuse_projections_, init_weights  # noqa: E402
from lowbit.training import convert_to_float8_training, float8_linear  # noqa: E402

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]
VARIANTS = ["bf16"] + RECIPES + [f"torchao-{r}" for r in RECIPES]


def not_output(module: torch.nn.Module, fqn: str) -> bool:
    return fqn != "output"


def build(variant: str, args: ModelArgs, fuse: bool = False) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    init_weights(model, seed=0)
    if fuse:
        fuse_projections_(model)
    if variant in RECIPES:
        convert_to_float8_training(model, variant, not_output)
    elif variant.startswith("torchao-"):
        from torchao.float8 import Float8LinearConfig
        from torchao.float8 import convert_to_float8_training as ao_convert

        config = Float8LinearConfig.from_recipe_name(variant.removeprefix("torchao-"))
        ao_convert(model, module_filter_fn=not_output, config=config)
    for i, block in enumerate(model.layers):
        # Per-block compile: one graph serves every layer, so compile time does not grow
        # with depth (the torchtitan recipe).
        model.layers[i] = torch.compile(block, fullgraph=True)
    return model


def train_step(model, opt, tokens) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def step_flops(args: ModelArgs, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step (3x forward): linears incl. the head, causal attention."""
    kv = args.n_kv_heads * args.head_dim
    per_layer = 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.ffn_hidden
    linear = (args.n_layers * per_layer + args.dim * args.vocab_size) * batch * seq
    attention = args.n_layers * 2 * batch * seq * seq * args.dim  # QK^T and PV, causal half
    return 3 * 2 * (linear + attention / 2)


def check_cuda_gemm() -> dict:
    """lowbit's CUDA fp8 linear (cuBLASLt) against the exact CPU emulation, fresh inputs."""
    out = {}
    for recipe in RECIPES:
        x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(384, 512, device="cuda") * 0.02).bfloat16().requires_grad_()
        g = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
        y = float8_linear(x, w, None, recipe)
        y.backward(g)
        xc, wc = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
        yc = float8_linear(xc, wc, None, recipe)
        yc.backward(g.cpu())
        out[recipe] = {
            name: sqnr(ref, got.cpu())
            for name, ref, got in (("y", yc, y), ("grad_x", xc.grad, x.grad),
                                   ("grad_w", wc.grad, w.grad))
        }
        # Same fp8 operands on both sides: only accumulation order and the bf16 output
        # rounding differ, so anything under ~40 dB means a wrong cast or layout.
        bad = {k: v for k, v in out[recipe].items() if v < 40}
        if bad:
            raise RuntimeError(f"CUDA fp8 GEMM disagrees with the emulation ({recipe}): {bad}")
    return out


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (ref.double() - got.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).mean().item() / noise)


def write_profile(name: str, step, batches, host: bool = False) -> None:
    """Kernel time table of two calls of step(batch) (CUDA time, top 40) to
    results/profile_<name>.txt: where a recipe's time goes (GEMMs vs casts vs layout copies).
    `host` adds the CPU-side ops, for a step the host may be holding back."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
    sort_by = "cpu_time_total" if host else "cuda_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_{name}.txt").write_text(table)


def run(variant: str, args: ModelArgs, batch: int, seq: int, steps: int, warmup: int,
        profile: bool = False, fuse: bool = False) -> dict:
    torch._dynamo.reset()
    model = build(variant, args, fuse)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (batch, seq + 1), device="cuda", generator=gen)
               for _ in range(4)]
    t0 = time.perf_counter()
    first_loss = train_step(model, opt, batches[0]).item()
    for i in range(1, warmup):
        train_step(model, opt, batches[i % 4])
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        loss = train_step(model, opt, batches[i % 4])
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / steps
    flops = step_flops(args, batch, seq)
    row = {
        "variant": variant,
        "tokens_per_s": batch * seq / seconds,
        "step_ms": seconds * 1000,
        "model_tflops": flops / seconds / 1e12,
        "frac_bf16_peak": flops / seconds / 1e12 / BF16_TFLOPS,
        "first_loss": first_loss,
        "last_loss": loss.item(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "compile_and_warmup_s": compile_s,
    }
    if profile:
        write_profile(variant, partial(train_step, model, opt), batches)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="fp8_training")
    p.add_argument("--profile", action="store_true", help="also write a kernel-time table")
    p.add_argument("--fuse-projections", action="store_true",
                   help="fuse wq/wk/wv and w1/w3 (lowbit.models.fuse_projections_) in every "
                        "variant's model, torchao's included")
    opts = p.parse_args()
    variants = opts.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    args = ModelArgs.from_name("llama3-8b", n_layers=opts.layers, max_seq_len=opts.seq)
    checks = check_cuda_gemm()
    print("CUDA vs emulated fp8 linear, SQNR dB:", checks, flush=True)
    rows = []
    for variant in variants:
        try:
            row = run(variant, args, opts.batch, opts.seq, opts.steps, opts.warmup, opts.profile,
                      opts.fuse_projections)
        except Exception as e:  # one failing variant (e.g. torchao missing) keeps the others
            row = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    for row in rows:
        if base and "error" not in row:
            row["speedup_vs_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
            # First step, same weights and batch: fp8 rounding moves the loss by far less
            # than 1% at initialization; a broken cast moves it by much more.
            row["first_loss_rel_diff"] = abs(row["first_loss"] / base["first_loss"] - 1)
    for r in RECIPES:
        ours = next((x for x in rows if x["variant"] == r and "error" not in x), None)
        theirs = next((x for x in rows if x["variant"] == f"torchao-{r}" and "error" not in x),
                      None)
        if ours and theirs:
            ours["vs_torchao"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    shapes = {"layers": opts.layers, "seq": opts.seq, "batch": opts.batch, "dim": args.dim,
              "ffn_hidden": args.ffn_hidden, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "vocab": args.vocab_size,
              "steps": opts.steps, "warmup": opts.warmup,
              "compile": "torch.compile per block, fullgraph", "optimizer": "AdamW fused",
              "fp8 layers": "all block linears; output head bf16",
              "fused_projections": opts.fuse_projections}
    path = write_result(opts.out, {"conditions": conditions(), "shapes": shapes,
                                   "gemm_check_sqnr_db": checks, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
