"""Optimizer step time and state memory on a ~1B-parameter model's parameter shapes.

The parameters have TinyLlama-1.1B's shapes (dim 2048, 22 layers, ffn 5632, 4 KV heads of
64, vocab 32000; 1.10B parameters), random values and random gradients; only
`optimizer.step()` is timed (no forward or backward). In one process: torch.optim.AdamW
(fused=True: the bar, issue 8 asks <= 1.2x of it), lowbit's AdamW8bit / AdamW4bit /
AdamWFp8 (update: one Triton launch per kind of parameter), torchao 0.18's AdamW8bit /
AdamW4bit / AdamWFp8 and bitsandbytes' AdamW8bit when they import. State bytes per parameter
are measured from the storages the optimizer holds (lowbit.optim.state_storage_bytes).
`step_ms_median` syncs after every step (host time counts, as in a loop that reads the loss);
`step_ms_queued` is the mean of back-to-back steps (the GPU's time when the host keeps up).
`--programs 1024x4,512x4` also times lowbit's kernel at these (values, warps)
per program (lowbit.kernels.triton.adam.PROGRAM_SHAPE), as rows `name@VALUESxWARPS`.
Writes results/optim.json.

    python benchmarks/bench_optim.py                       # H100, ~1.1B fp32 params
    python benchmarks/bench_optim.py --device cpu --layers 1 --dim 256 --ffn 512 --vocab 1024
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import conditions, write_result  # noqa: E402

import lowbit.optim as lo  # noqa: E402
from lowbit.kernels.triton import adam as kernel  # noqa: E402


def param_shapes(args: argparse.Namespace) -> list[tuple[int, ...]]:
    kv = args.kv_heads * 64
    per_layer = [
        (args.dim, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, args.dim),
        (args.ffn, args.dim), (args.ffn, args.dim), (args.dim, args.ffn), (args.dim,), (args.dim,),
    ]
    head = [(args.dim,), (args.vocab, args.dim)]
    return [(args.vocab, args.dim)] + per_layer * args.layers + head


def optimizers() -> dict[str, object]:
    """name -> factory(params) or a string saying why it is missing."""
    out: dict[str, object] = {
        "torch-adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "lowbit-adamw8bit": lambda ps: lo.AdamW8bit(ps, lr=1e-4),
        "lowbit-adamw4bit": lambda ps: lo.AdamW4bit(ps, lr=1e-4),
        "lowbit-adamwfp8": lambda ps: lo.AdamWFp8(ps, lr=1e-4),
    }
    try:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit, AdamWFp8
        out["torchao-adamw8bit"] = lambda ps: AdamW8bit(ps, lr=1e-4)
        out["torchao-adamw4bit"] = lambda ps: AdamW4bit(ps, lr=1e-4)
        out["torchao-adamwfp8"] = lambda ps: AdamWFp8(ps, lr=1e-4)
    except ImportError as e:
        out["torchao"] = f"not importable: {e}"
    try:
        import bitsandbytes as bnb

        out["bnb-adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
    except ImportError as e:
        out["bitsandbytes"] = f"not installed: {e}"
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(factory, params, args) -> dict:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    opt = factory(params)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compile and state allocation happen here
        opt.step()
    sync(args.device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        sync(args.device)
        t = time.perf_counter()
        opt.step()
        sync(args.device)
        times.append(time.perf_counter() - t)
    times.sort()
    sync(args.device)
    t = time.perf_counter()
    for _ in range(args.iters):
        opt.step()
    sync(args.device)
    queued = (time.perf_counter() - t) / args.iters
    n = sum(p.numel() for p in params)
    row = {
        "step_ms_median": 1000 * times[len(times) // 2],
        "step_ms_queued": 1000 * queued,
        "step_ms_min": 1000 * times[0],
        "warmup_s": warmup_s,
        "state_bytes_per_param": lo.state_storage_bytes(opt) / n,
    }
    if args.device == "cuda":
        row["allocated_gb_for_state"] = (torch.cuda.memory_allocated() - base) / 1e9
    del opt
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated optimizer names")
    ap.add_argument("--programs", default=None,
                    help="also time lowbit at these VALUESxWARPS per program, e.g. 512x4,1024x8")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    params = []
    for shape in param_shapes(args):
        p = torch.nn.Parameter(torch.randn(shape, device=args.device, dtype=dtype) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    n = sum(p.numel() for p in params)
    print(f"{n / 1e9:.3f}B parameters in {len(params)} tensors, {args.dtype}", flush=True)
    results, missing = {}, {}
    for name, factory in optimizers().items():
        if isinstance(factory, str):
            missing[name] = factory
            print(f"{name}: {factory}")
            continue
        if args.only and name not in args.only.split(","):
            continue
        try:
            results[name] = bench(factory, params, args)
        except Exception as e:  # a third-party optimizer failing must not lose the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, results[name], flush=True)
    for program in (args.programs.split(",") if args.programs else []):
        kernel.PROGRAM_SHAPE = tuple(map(int, program.split("x")))
        for name, factory in optimizers().items():
            if name.startswith("lowbit") and (not args.only or name in args.only.split(",")):
                results[f"{name}@{program}"] = bench(factory, params, args)
                print(f"{name}@{program}", results[f"{name}@{program}"], flush=True)
    base = results.get("torch-adamw-fused", {}).get("step_ms_median")
    for row in results.values():
        if base and "step_ms_median" in row:
            row["vs_torch_fused"] = row["step_ms_median"] / base
    path = write_result("optim", {
        "conditions": conditions(), "args": vars(args), "n_params": n,
        "n_tensors": len(params), "results": results, "missing": missing,
        "note": "step time only (random grads, no forward/backward); lowbit's update is "
                "one Triton launch per step on CUDA; bytes measured from the optimizer's storages",
    })
    print("wrote", path)


if __name__ == "__main__":
    main()
