"""GPU check of the Triton kernels: full-size correctness, then timings against bf16 F.linear.

    python benchmarks/kernel_check.py --out kernels.json

Times are medians of CUDA-graph replays, each replay cycling through enough weight copies
(> 2x the L2 size) that weights come from DRAM, as in a real decode step. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels.triton import (  # noqa: E402
    fp8_weight_only_mm,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    quantize_per_token_int8,
)
from lowbit.kernels.triton.weight_only import TUNER  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096]
CHECK_MS = [1, 16, 64, 256]
GROUP = 128
ROTATE_BYTES = 128 << 20  # weight bytes cycled per replay: over 2x the 50 MB L2
KINDS = ("bf16", "int4", "int8", "fp8", "dyn")
START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Weights and references
# ---------------------------------------------------------------------------------------------


def make_weights(kind: str, k: int, n: int) -> tuple:
    """Random quantized weights of one kind: the positional args after x."""
    if kind == "bf16":
        return (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02,)
    if kind == "int4":
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        scale = (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 0.001).bfloat16()
        zero = (torch.rand(n, k // GROUP, device="cuda") * 15).bfloat16()
        return q, scale, zero
    if kind == "int8":
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
        return q, (torch.rand(n, k // GROUP, device="cuda") * 0.01 + 0.001).bfloat16()
    if kind == "fp8":
        q = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return q, torch.rand(n, 1, device="cuda") * 0.01 + 0.001
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    return q, torch.rand(n, 1, device="cuda") * 0.01 + 0.001


FUNCS: dict[str, Callable] = {
    "bf16": F.linear,
    "int4": int4_weight_only_mm,
    "int8": int8_weight_only_mm,
    "fp8": fp8_weight_only_mm,
    "dyn": int8_dynamic_mm,
}


def dequantized(kind: str, w: tuple) -> torch.Tensor:
    """fp32 [N, K] weights the kernel should be multiplying by."""
    if kind == "int4":
        q, scale, zero = w
        codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1).float()
        g = codes.shape[1] // scale.shape[1]
        return (codes - zero.float().repeat_interleave(g, 1)) * scale.float().repeat_interleave(
            g, 1)
    q, scale = w
    return q.float() * scale.float().repeat_interleave(q.shape[1] // scale.shape[1], 1)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 as specified; divides by a tensor because CUDA torch computes `/ 127` (a
    Python scalar) as a multiply by fp32(1/127), 1 ulp off the exact division for some rows."""
    amax = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    x_scale = amax / torch.full_like(amax, 127.0)
    return torch.round(x.float() / x_scale).clamp(-127, 127).to(torch.int8), x_scale


def reference(kind: str, x: torch.Tensor, w: tuple, bias: torch.Tensor) -> torch.Tensor:
    if kind == "dyn":
        xq, x_scale = quantize_reference(x)
        return (xq.double() @ w[0].double().T).float() * x_scale * w[1].T + bias.float()
    return x.float() @ dequantized(kind, w).T + bias.float()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (y.float() - ref).pow(2).sum())).item()


def check_correctness() -> list[dict]:
    """Every kernel against its fp32 reference on (K, N) = (4096, 14336), as the cuda tests do."""
    k, n = 4096, 14336
    rows = []
    for kind in KINDS[1:]:
        w = make_weights(kind, k, n)
        bias = torch.randn(n, device="cuda").bfloat16()
        for m in CHECK_MS:
            x = torch.randn(m, k, device="cuda").bfloat16()
            # A freed NaN block of the output's size is what the caching allocator hands the
            # kernel's output next, so elements the kernel fails to write stay NaN.
            torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            out = FUNCS[kind](x, *w, bias)
            ref = reference(kind, x, w, bias)
            rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            db = sqnr_db(out, ref)
            ok = bool(torch.isfinite(out).all()) and db > 40
            if kind == "dyn":
                xq, xs = quantize_per_token_int8(x)
                rq, rs = quantize_reference(x)
                ok = ok and torch.equal(xq, rq) and torch.equal(xs, rs)
            rows.append(dict(kind=kind, m=m, sqnr_db=round(db, 2), max_rel_err=rel, ok=ok))
            log(f"check {kind:4s} M={m:4d}: SQNR {db:6.2f} dB, max rel err {rel:.2e} "
                f"{'ok' if ok else 'FAIL'}")
    return rows


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def weight_bytes(w: tuple) -> int:
    return w[0].numel() * w[0].element_size()


def time_graph(fn: Callable, x: torch.Tensor, copies: list[tuple], calls: int) -> float:
    """Median microseconds per call over replays of a graph of `calls` calls over the copies."""
    for w in copies[:2]:
        fn(x, *w)  # tune and compile outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(x, *copies[i % len(copies)])
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy TB/s (read + write bytes) of a 1 GiB buffer."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e9


def bench(results: dict, out_path: Path, budget_s: float) -> None:
    for k, n in SHAPES:
        if time.time() - START > budget_s:
            log(f"time budget spent: skipping {k}x{n}")
            continue
        copies = {}
        for kind in KINDS:
            one = make_weights(kind, k, n)
            count = max(2, min(64, math.ceil(ROTATE_BYTES / weight_bytes(one))))
            copies[kind] = [one] + [make_weights(kind, k, n) for _ in range(count - 1)]
        for m in MS:
            x = torch.randn(m, k, device="cuda").bfloat16()
            row = dict(k=k, n=n, m=m)
            for kind in KINDS:
                calls = max(len(copies[kind]), 8 if m >= 1024 else 24)
                us = time_graph(FUNCS[kind], x, copies[kind], calls)
                row[kind] = dict(us=us, tbps=weight_bytes(copies[kind][0]) / us / 1e6,
                                 tflops=2 * m * n * k / us / 1e6)
            for kind in KINDS[1:]:
                row[kind]["speedup"] = row["bf16"]["us"] / row[kind]["us"]
            if m >= 256:  # how much of int8 dynamic is the activation quantization
                row["quant_us"] = time_graph(lambda a: quantize_per_token_int8(a), x, [()], 8)
            results["timings"].append(row)
            log(fmt_row(row))
        del copies
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(results, indent=1, default=str))


def fmt_row(row: dict) -> str:
    bf16 = row["bf16"]
    rate = f"{bf16['tbps']:4.2f}TB/s" if row["m"] <= 64 else f"{bf16['tflops']:5.0f}TF/s"
    cells = [f"{row['k']:5d}x{row['n']:<5d} M={row['m']:<4d} bf16 {bf16['us']:7.1f}us {rate}"]
    for kind in KINDS[1:]:
        r = row[kind]
        rate = f"{r['tbps']:4.2f}TB/s" if row["m"] <= 64 else f"{r['tflops']:5.0f}TF/s"
        cells.append(f"{kind} {r['us']:7.1f}us {rate} x{r['speedup']:.2f}")
    if "quant_us" in row:
        cells.append(f"quant {row['quant_us']:.1f}us")
    return " | ".join(cells)


def summarize(results: dict) -> list[str]:
    rows = {(r["k"], r["n"], r["m"]): r for r in results["timings"]}
    lines = []
    big = rows.get((4096, 14336, 1))
    if big:
        lines.append(f"int4 M=1 4096x14336: {big['int4']['us']:.1f} us (target <= 13.2)")
        lines.append(f"int8 M=1 4096x14336: {big['int8']['us']:.1f} us (target <= 26.4)")
    slower = [f"{k}x{n} M={m} x{r['int4']['speedup']:.2f}" for (k, n, m), r in rows.items()
              if m <= 64 and r["int4"]["speedup"] < 1]
    lines.append("int4 <= bf16 for all M <= 64: " + ("yes" if not slower else ", ".join(slower)))
    for (k, n, m), r in rows.items():
        if m == 4096:
            lines.append(f"dyn M=4096 {k}x{n}: x{r['dyn']['speedup']:.2f} vs bf16 (target 1.3)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--skip-check", action="store_true", help="timings only")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="start no new shape after this many seconds")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, python=platform.python_version(),
                   copy_tbps=copy_bandwidth(), checks=[], timings=[])
    log(f"{results['device']}: copy bandwidth {results['copy_tbps']:.2f} TB/s")
    if not args.skip_check:
        results["checks"] = check_correctness()
    bench(results, args.out, args.budget_s)
    results["summary"] = summarize(results)
    results["tuned"] = {str(key): dict(best=cfg, timings_ms=TUNER.timings.get(key))
                        for key, cfg in TUNER.chosen().items()}
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(fmt_row(r) for r in results["timings"] if r["m"] in (1, 16, 64, 4096)))
    print("\n".join(results["summary"]))
    failed = [c for c in results["checks"] if not c["ok"]]
    print(f"correctness: {len(results['checks']) - len(failed)} ok, {len(failed)} failed")


if __name__ == "__main__":
    main()
