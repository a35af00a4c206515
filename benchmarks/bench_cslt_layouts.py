"""cuSPARSELt output layouts at large M: which way of getting a contiguous [M, N] is fastest.

Backs the choice in `lowbit.kernels.triton.sparse24.cslt_linear`. Rows per shape and M, all in
one process, timed inside CUDA graphs (`common.time_cuda_graph`) on the same pruned weight:
dense bf16 `F.linear`; cuSPARSELt writing [N, M] (a transposed view, no copy); the same plus
torch's copy to a contiguous [M, N], or plus lowbit's `transpose_into` (what lowbit runs);
cuSPARSELt asked for the transposed result; and the copy variant with the algorithm picked by
`torch._cslt_sparse_mm_search`. Writes
results/cslt_layouts.json.

    python benchmarks/bench_cslt_layouts.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import conditions, time_cuda_graph, write_result  # noqa: E402

from lowbit.kernels.triton.sparse24 import transpose_into  # noqa: E402
from lowbit.sparsity import magnitude_mask  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1024, 4096]


def bench(k: int, n: int, m: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w = w * magnitude_mask(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    packed = torch._cslt_compress(w)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    alg = torch._cslt_sparse_mm_search(packed, x.t())
    variants = {
        "dense bf16": lambda: torch.nn.functional.linear(x, w),
        "cslt [N,M] view": lambda: torch._cslt_sparse_mm(packed, x.t()),
        "cslt + copy": lambda: out.copy_(torch._cslt_sparse_mm(packed, x.t()).t()),
        "cslt + transpose_into": lambda: transpose_into(torch._cslt_sparse_mm(packed, x.t()),
                                                         out),
        "cslt transpose_result": lambda: torch._cslt_sparse_mm(packed, x.t(),
                                                               transpose_result=True),
        "cslt searched alg + copy": lambda: out.copy_(
            torch._cslt_sparse_mm(packed, x.t(), alg_id=alg).t()),
    }
    row = {"K": k, "N": n, "M": m, "searched_alg": alg}
    for name, fn in variants.items():
        row[name] = time_cuda_graph(fn, [()])
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="cslt_layouts")
    args = p.parse_args()
    rows = [bench(k, n, m) for k, n in SHAPES for m in MS]
    print("wrote", write_result(args.out, {"conditions": conditions(), "unit": "us",
                                           "rows": rows}))


if __name__ == "__main__":
    main()
