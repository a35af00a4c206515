"""Per-op benchmark: quantized linears vs bf16 F.linear and torchao, on Llama-3-8B shapes.

Each (shape, M, config) is first checked against the reference op (SQNR in dB, computed from
the same quantized weights in float32), then timed inside a CUDA graph cycling through
several weight copies. Writes results/ops.json.

    python benchmarks/bench_ops.py [--shapes 4096x14336] [--ms 1,16] [--configs int4-g128]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BF16_TFLOPS,
    FP8_TFLOPS,
    INT8_TOPS,
    conditions,
    copy_tbps,
    stored_bytes,
    time_op,
    torchao_configs,
    tuner_classes,
    write_result,
)

from lowbit.kernels import reference as ref  # noqa: E402
from lowbit.kernels.cuda import kernel_name  # noqa: E402
from lowbit.kernels.triton.weight_only import TUNER  # noqa: E402
from lowbit.quantize import preset, quantize_weight  # noqa: E402
from lowbit.tensors import Float8Weight  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
CONFIGS = ["int4-g128", "int4-g64", "int8", "fp8", "int8-dynamic", "fp8-dynamic"]
OPS = {
    "int4-g128": "intx_weight_only_linear", "int4-g64": "intx_weight_only_linear",
    "int8": "int8_weight_only_linear", "fp8": "fp8_weight_only_linear",
    "int8-dynamic": "int8_dynamic_linear", "fp8-dynamic": "fp8_dynamic_linear",
}
PEAK = {"int8-dynamic": INT8_TOPS, "fp8-dynamic": FP8_TFLOPS}


def _sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    noise = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(a.double().pow(2).mean().item() / noise)


def _reference_out(q, x: torch.Tensor) -> torch.Tensor:
    """The reference op on the same packed weights, in float32."""
    x32 = x.float()
    if isinstance(q, Float8Weight):
        if q.act_quant == "none":
            return ref.fp8_weight_only_linear(x32, q.qdata, q.scale, None)
        return ref.fp8_dynamic_linear(x32, q.qdata, q.scale, None, q.act_quant == "per_row")
    if q.act_quant == "int8_per_token":
        return ref.int8_dynamic_linear(x32, q.qdata, q.scale, None)
    return F.linear(x32, q.dequantize(torch.float32))


def _copies(bytes_per_copy: int) -> int:
    """Enough weight copies that the set is ~3x the 50 MB L2."""
    return int(min(16, max(2, math.ceil(150e6 / bytes_per_copy))))


def bench_shape(k: int, n: int, ms: list[int], configs: list[str], ao: dict) -> list[dict]:
    rows = []
    bf16_bytes = k * n * 2
    copies = _copies(bf16_bytes // 4)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    impls: dict[str, tuple[list, int, object]] = {"bf16": (weights, bf16_bytes, None)}
    for name in configs:
        qs = [quantize_weight(preset(name), w) for w in weights]
        impls[name] = (qs, stored_bytes(qs[0]), None)
    for name, cfg in ao.items():
        if name not in configs:
            continue
        from torchao.quantization import quantize_ as ao_quantize_

        lins = []
        for w in weights:
            lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao_quantize_(lin, cfg)
            lins.append(lin)
        impls[f"torchao:{name}"] = (lins, stored_bytes(lins[0].weight), None)
    for m in ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        base_us = None
        for name, (ws, nbytes, _) in impls.items():
            inputs = [(xs[i % 2], ws[i]) for i in range(len(ws))]
            if name.startswith("torchao:"):
                def fn(x, lin):
                    return lin(x)
            else:
                def fn(x, w):
                    return F.linear(x, w)
            row = {"K": k, "N": n, "M": m, "config": name, "weight_bytes": nbytes}
            tuned_before = set(TUNER.chosen())
            try:
                out = fn(*inputs[0])
                new_keys = [key for key in TUNER.chosen() if key not in tuned_before]
                if new_keys:  # the launch configs the tuner picked for this op (Triton kernels)
                    row["tuned"] = [str(TUNER.chosen()[key]) for key in new_keys]
                    row["tuner_best_by_class"] = [tuner_classes(TUNER.timings[key])
                                                  for key in new_keys if key in TUNER.timings]
                if name in OPS:
                    row["sqnr_vs_reference_db"] = _sqnr(_reference_out(ws[0], xs[0]), out)
                    bits = 4 if name.startswith("int4") else 8  # int4 configs: with zeros
                    row["kernel"] = kernel_name(OPS[name], xs[0], bits)
                us, row["timing"] = time_op(fn, inputs)
            except Exception as e:  # a config that cannot run a shape is recorded, not hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(f"K={k} N={n} M={m} {name}: ERROR {row['error']}", flush=True)
                continue
            flops = 2 * m * n * k
            row.update(
                us=us,
                tbps_weight=nbytes / us / 1e6,
                frac_copy_bw=nbytes / us / 1e6 / copy_tbps(),
                tflops=flops / us / 1e6,
                frac_peak=flops / us / 1e6 / PEAK.get(name.split(":")[-1], BF16_TFLOPS),
            )
            if name == "bf16":
                base_us = us
            row["speedup_vs_bf16"] = base_us / us if base_us else None
            rows.append(row)
            sq = row.get("sqnr_vs_reference_db")
            print(
                f"K={k:>5} N={n:>5} M={m:>4} {name:<20} {us:9.2f} us "
                f"{row['tbps_weight']:6.2f} TB/s {row['tflops']:7.1f} TFLOP/s "
                f"x{row['speedup_vs_bf16']:.2f}" + (f" sqnr {sq:.1f}" if sq else ""),
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--out", default="ops")
    args = p.parse_args()
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    configs = args.configs.split(",")
    ao = {} if args.no_torchao else torchao_configs()
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms, configs, ao)
        torch.cuda.empty_cache()
        # written after every shape, so a run cut short still leaves its numbers
        path = write_result(args.out, {"conditions": conditions(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
