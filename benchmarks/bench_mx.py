"""MX / NVFP4 weight-only decode per op on H100, next to lowbit's int4 g32 on the same shapes.

Each (shape, M, format) is checked against the reference op on the same packed weights (SQNR in
dB, float32), then timed inside a CUDA graph cycling through enough weight copies to overflow
L2. The target: MXFP4 and NVFP4 at M = 1 within 10% of int4 g32 (same 4 bits per weight; int4
g32 stores a bf16 scale and zero per 32, MXFP4 one byte per 32, NVFP4 one byte per 16). Writes
results/bench_mx.json.

    python benchmarks/bench_mx.py [--shapes 4096x4096] [--ms 1,4,16]
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

from common import conditions, copy_tbps, stored_bytes, time_op, write_result  # noqa: E402

from lowbit.kernels import mx_ops  # noqa: E402
from lowbit.kernels.cuda import kernel_name  # noqa: E402
from lowbit.kernels.triton import mx_weight_only, weight_only  # noqa: E402
from lowbit.quantize import (  # noqa: E402
    Int4WeightOnly,
    MXWeightOnly,
    NVFP4WeightOnly,
    quantize_weight,
)

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N): Llama-3-8B
MS = [1, 4, 16]
CONFIGS = {
    "int4-g32": Int4WeightOnly(32),
    "mxfp4": MXWeightOnly("fp4_e2m1"),
    "nvfp4": NVFP4WeightOnly(),
    "mxfp6-e2m3": MXWeightOnly("fp6_e2m3"),
    "mxfp8-e4m3": MXWeightOnly("fp8_e4m3"),
}


def _sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    noise = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(a.double().pow(2).mean().item() / noise)


def _copies(nbytes: int) -> int:
    """Enough copies that the set is ~3x the 50 MB L2."""
    return int(min(16, max(2, math.ceil(150e6 / nbytes))))


def _path(name: str, x: torch.Tensor) -> str:
    if name == "bf16":
        return "cublas"
    if name.startswith("int4"):
        return kernel_name("intx_weight_only_linear", x, 4, True)
    return "triton-mx-decode" if mx_ops.uses_triton(x) else "reference"


def bench_shape(k: int, n: int, ms: list[int], names: list[str]) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    impls = {"bf16": [w.clone() for _ in range(_copies(w.numel() * 2))]}
    for name in names:
        q = quantize_weight(CONFIGS[name], w)
        impls[name] = [q.clone() for _ in range(_copies(stored_bytes(q)))]
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        base = {}
        for name, ws in impls.items():
            inputs = [(xs[i % 2], ws[i]) for i in range(len(ws))]
            nbytes = stored_bytes(ws[0])
            row = {"K": k, "N": n, "M": m, "config": name, "weight_bytes": nbytes,
                   "kernel": _path(name, xs[0])}
            try:
                out = F.linear(*inputs[0])
                if name != "bf16":
                    expect = F.linear(xs[0].float(), ws[0].dequantize(torch.float32))
                    row["sqnr_vs_reference_db"] = _sqnr(expect, out)
                us, row["timing"] = time_op(F.linear, inputs)
            except Exception as e:  # recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(f"K={k} N={n} M={m} {name}: ERROR {row['error']}", flush=True)
                continue
            base[name] = us
            row.update(us=us, tbps_weight=nbytes / us / 1e6,
                       frac_copy_bw=nbytes / us / 1e6 / copy_tbps())
            if "int4-g32" in base and name != "bf16":
                row["time_vs_int4_g32"] = us / base["int4-g32"]
            rows.append(row)
            rel = row.get("time_vs_int4_g32")
            print(f"K={k:>5} N={n:>5} M={m:>3} {name:<12} {us:8.2f} us "
                  f"{row['tbps_weight']:5.2f} TB/s {row['kernel']:<18}"
                  + (f" x{rel:.3f} of int4-g32" if rel else "")
                  + (f" sqnr {row['sqnr_vs_reference_db']:.1f}" if name != "bf16" else ""),
                  flush=True)
    return rows


def _tuning() -> list[dict]:
    """Per tuner key (MX kernels, and lowbit's int4 for the baseline): the chosen launch config
    and the fastest few candidates' times, so one GPU run shows how close the choices were."""
    out = []
    for name, tuner in (("mx", mx_weight_only.TUNER), ("int4", weight_only.TUNER)):
        for key, timed in tuner.timings.items():
            best = sorted(timed, key=lambda p: p[0])[:5]
            out.append({"tuner": name, "key": [str(v) for v in key],
                        "chosen": str(tuner.chosen().get(key)),
                        "fastest_us": [[round(ms * 1e3, 2), str(c)] for ms, c in best],
                        "candidates": len(timed)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="bench_mx")
    args = p.parse_args()
    torch.manual_seed(0)
    names = args.configs.split(",")
    if names[0] != "int4-g32" and "int4-g32" in names:
        names.remove("int4-g32")
        names.insert(0, "int4-g32")  # the baseline is timed first in every M
    rows = []
    path = None
    for s in args.shapes.split(","):
        k, n = (int(v) for v in s.split("x"))
        rows += bench_shape(k, n, [int(v) for v in args.ms.split(",")], names)
        torch.cuda.empty_cache()
        path = write_result(args.out, {"conditions": conditions(), "rows": rows,
                                       "tuning": _tuning()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
