"""Host time of a compiled fp8 training step, per linear: what each fp8 linear costs before
any kernel runs. Small models and FSDP2 steps are bound by it (an 88M-parameter model trained
slower in fp8 than in bf16 on the H200).

A stack of tiny Float8TrainingLinear layers (dim 64, 16 tokens, bf16) is compiled whole with
inductor on the CPU, so the kernels' own time is small next to the Python and dispatch work
around them; forward + backward is timed. Rows from several code versions (run the script in
a worktree of each, `--label` naming it, `--merge` appending) go to one results file.

    python benchmarks/bench_fp8_host.py --label "this commit" [--merge]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, conditions, write_result  # noqa: E402

from lowbit.training import convert_to_float8_training  # noqa: E402

RECIPES = ["bf16", "tensorwise", "rowwise"]


def us_per_linear(recipe: str, layers: int, steps: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(layers)])
    model = model.to(torch.bfloat16)
    if recipe != "bf16":
        convert_to_float8_training(model, recipe)
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(5):  # compile forward and backward
        step(x).float().sum().backward()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            step(x).float().sum().backward()
        times.append((time.perf_counter() - t) / steps / layers * 1e6)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True, help="names the code version in the rows")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--merge", action="store_true", help="append to the existing results")
    p.add_argument("--out", default="fp8_host_overhead")
    opts = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    if opts.merge and (RESULTS / f"{opts.out}.json").exists():
        rows = json.loads((RESULTS / f"{opts.out}.json").read_text())["rows"]
    for recipe in RECIPES:
        us = us_per_linear(recipe, opts.layers, opts.steps)
        rows.append({"code": opts.label, "recipe": recipe, "us_per_linear_fwd_bwd": us})
        print(rows[-1], flush=True)
    cond = conditions() | {"machine": "CPU, 1 thread", "layers": opts.layers,
                           "linear": "64x64, 16 tokens, bf16", "compile": "inductor, fullgraph",
                           "timing": "median of 5 rounds"}
    print(f"wrote {write_result(opts.out, {'conditions': cond, 'rows': rows})}")


if __name__ == "__main__":
    main()
