"""Host time of one compiled decode call, with the GPU work taken out: how much a step costs
before any kernel runs, and how it grows with the number of quantized weights.

The decode step (lowbit.models.decode_one_token) is compiled with backends whose compiled
function returns its first output again: `dynamo` (guards and frame handling only) and `aot`
(plus AOTAutograd's wrappers, which unwrap every tensor-subclass weight). A tiny-dimension
model with the layer count of a real one keeps the compute negligible, so the time per call
is the host overhead a CUDA-graph replay cannot hide. Runs on CPU. Writes
results/host_overhead.json.

    python benchmarks/bench_host_overhead.py --layers 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import conditions, write_result  # noqa: E402

from lowbit.models import ModelArgs, Transformer, decode_one_token, init_weights  # noqa: E402
from lowbit.quantize import preset, quantize_  # noqa: E402


def _first_output_again(gm, example_inputs):
    cache = {}

    def run(*args):
        if "out" not in cache:
            cache["out"] = gm(*args)
        return cache["out"]

    return run


BACKENDS = {
    "dynamo": _first_output_again,
    "aot": aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(_first_output_again(gm, ex))),
}


def per_call_us(model: Transformer, backend, calls: int, skip_guards: bool) -> float:
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend=backend, fullgraph=True)
    token, pos = torch.zeros(1, 1, dtype=torch.long), torch.tensor([3])
    with torch.no_grad():
        for _ in range(3):  # compile (the stance refuses to compile)
            step(model, token, pos)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
            t = time.perf_counter()
            for _ in range(calls):
                step(model, token, pos)
            return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--configs", default="bf16,fp8,int4-g128")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    shape = ModelArgs(dim=256, n_layers=args.layers, n_heads=4, n_kv_heads=2, vocab_size=512,
                      ffn_hidden=512, max_seq_len=64)
    rows = []
    for config in args.configs.split(","):
        model = Transformer(shape).to(torch.bfloat16)
        init_weights(model, seed=0)
        if config != "bf16":
            quantize_(model.eval(), preset(config), show_progress=False)
        model.eval().setup_caches(1, 64, dtype=torch.bfloat16, device="cpu")
        for name, backend in BACKENDS.items():
            for skip in (False, True):
                us = per_call_us(model, backend, args.calls, skip)
                rows.append({"config": config, "backend": name, "skip_guard_eval_unsafe": skip,
                             "us_per_call": us})
                print(rows[-1], flush=True)
    cond = conditions() | {"layers": args.layers, "machine": "CPU",
                           "model": "tiny dims (256), real layer count"}
    print("wrote", write_result("host_overhead", {"conditions": cond, "rows": rows}))


if __name__ == "__main__":
    main()
