"""Per-op 2:4 sparse linears vs dense, on Llama-3-8B shapes, in one run (GPU).

Rows per (shape, M): dense bf16 `F.linear`; lowbit 2:4 bf16 (`Sparse24Weight`); torch's
cuSPARSELt 2:4 (`torch.sparse.to_sparse_semi_structured`, same pruned weight) where it runs;
lowbit dense int4 g128 weight-only; lowbit 2:4 + int4 g128. Each output is first checked
against the fp32 reference on the same (pruned, dequantized) weights (SQNR in dB), then timed
inside a CUDA graph cycling through several weight copies (cold L2). The chosen kernel per
key (GEMV / dot / expand + cuBLAS / cuSPARSELt) is recorded. Writes results/sparse_ops.json.

    python benchmarks/bench_sparse.py [--shapes 4096x14336] [--ms 1,16,4096]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BF16_TFLOPS,
    conditions,
    copy_tbps,
    stored_bytes,
    time_op,
    tuner_classes,
    write_result,
)

from lowbit.kernels.triton import sparse24 as tk  # noqa: E402
from lowbit.quantize import preset, quantize_weight  # noqa: E402
from lowbit.sparsity import Sparse24Weight, magnitude_mask  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 2, 4, 8, 16, 1024, 4096]
# what each row is compared with (same run)
BASELINE = {"2:4 bf16": "bf16", "cusparselt 2:4": "bf16", "2:4+int4-g128": "int4-g128"}


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).mean().item() / noise)


def _copies(nbytes: int) -> int:
    """Enough weight copies that the set is ~3x the 50 MB L2."""
    return int(min(16, max(2, math.ceil(150e6 / nbytes))))


def _cusparselt(weights: list[torch.Tensor]) -> list | str:
    try:
        from torch.sparse import to_sparse_semi_structured

        return [to_sparse_semi_structured(w) for w in weights]
    except Exception as e:  # recorded: the run says why this baseline is missing
        return f"{type(e).__name__}: {str(e)[:200]}"


def bench_shape(k: int, n: int, ms: list[int]) -> list[dict]:
    copies = _copies(k * n // 4)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
             for _ in range(copies)]
    pruned = [w * magnitude_mask(w) for w in dense]
    impls: dict[str, list] = {
        "bf16": dense,
        "2:4 bf16": [Sparse24Weight.from_dense(w, magnitude_mask(w)) for w in dense],
        "int4-g128": [quantize_weight(preset("int4-g128"), w) for w in dense],
        "2:4+int4-g128": [Sparse24Weight.from_dense(w, magnitude_mask(w), 4, 128) for w in dense],
    }
    cslt = _cusparselt(pruned)
    errors = {}
    if isinstance(cslt, str):
        errors["cusparselt 2:4"] = cslt
    else:
        impls["cusparselt 2:4"] = cslt
    refs = {"bf16": dense, "cusparselt 2:4": pruned}
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        times: dict[str, float] = {}
        for name, ws in impls.items():
            inputs = [(xs[i % 2], ws[i]) for i in range(len(ws))]
            row = {"K": k, "N": n, "M": m, "config": name, "weight_bytes": stored_bytes(ws[0])}
            try:
                out = F.linear(*inputs[0])
                w32 = refs[name][0].float() if name in refs else ws[0].dequantize(torch.float32)
                row["sqnr_vs_reference_db"] = _sqnr(xs[0].float() @ w32.t(), out)
                us, row["timing"] = time_op(F.linear, inputs)
            except Exception as e:  # a config that cannot run a shape is recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(f"K={k} N={n} M={m} {name}: ERROR {row['error']}", flush=True)
                continue
            times[name] = us
            flops = 2 * m * n * k
            row.update(us=us, tbps_weight=row["weight_bytes"] / us / 1e6,
                       frac_copy_bw=row["weight_bytes"] / us / 1e6 / copy_tbps(),
                       tflops=flops / us / 1e6, frac_peak=flops / us / 1e6 / BF16_TFLOPS)
            base = BASELINE.get(name)
            if base in times:
                row["baseline"] = base
                row["speedup_vs_baseline"] = times[base] / us
            if isinstance(ws[0], Sparse24Weight):
                key = ("sparse24", 0 if ws[0].bits == 0 else 2, ws[0].bits == 4 and
                       ws[0].zero is not None, torch.bfloat16, tk.m_bucket(m), n, k,
                       k if ws[0].bits == 0 else 128)
                row["kernel"] = str(tk.TUNER.chosen().get(key))
                if key in tk.TUNER.timings:
                    row["tuner_best_by_class"] = tuner_classes(tk.TUNER.timings[key])
            rows.append(row)
            sp = row.get("speedup_vs_baseline")
            print(f"K={k:>5} N={n:>5} M={m:>4} {name:<16} {us:9.2f} us "
                  f"{row['tbps_weight']:6.2f} TB/s {row['tflops']:7.1f} TFLOP/s "
                  f"sqnr {row['sqnr_vs_reference_db']:.1f}"
                  + (f" x{sp:.2f} vs {row['baseline']}" if sp else "")
                  + (f" [{row['kernel']}]" if "kernel" in row else ""), flush=True)
    for name, err in errors.items():
        rows.append({"K": k, "N": n, "config": name, "error": err})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--out", default="sparse_ops")
    args = p.parse_args()
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms)
        torch.cuda.empty_cache()
        # written after every shape, so a run cut short still leaves its numbers
        path = write_result(args.out, {"conditions": conditions(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
