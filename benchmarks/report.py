"""Regenerate benchmarks/RESULTS.md from results/*.json (one table per benchmark).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def _conditions(c: dict) -> str:
    keys = ["date", "gpu", "torch", "triton", "cuda", "torchao", "model", "layers", "prompt",
            "new_tokens", "compile", "fused_projections", "programmatic_dependent_launch",
            "machine", "world_size"]
    return "; ".join(f"{k}: {c[k]}" for k in keys if c.get(k) is not None)


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def decode_section(data: dict) -> list[str]:
    rows = data["rows"]
    timed = any("host_ms_per_step" in r for r in rows)  # a --profile run: where a step goes
    extra = " GPU kernel ms/step | host ms/step |" if timed else ""
    out = ["## End-to-end decode", "", _conditions(data["conditions"]), "",
           data["conditions"].get("note", ""), "",
           "| config | batch | tokens/s (per sequence) | vs bf16 | ms/step | peak GiB | "
           "weights GiB | logits SQNR vs bf16 (dB) |" + extra,
           "|---|---|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | - | error: {r['error'][:80]} | | | | | |")
            continue
        cells = (f" {_fmt(r.get('gpu_kernel_ms_per_step'))} | {_fmt(r.get('host_ms_per_step'))} |"
                 if timed else "")
        out.append(
            f"| {r['config']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
            f"{_fmt(r.get('speedup_vs_bf16'))}x | {r['ms_per_step']:.2f} | "
            f"{r['peak_mem_gib']:.1f} | {_fmt(r.get('weights_gib'))} | "
            f"{_fmt(r['logits_sqnr_vs_bf16_db'], 1)} |" + cells
        )
    return out


def ops_section(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if "error" not in r]
    out = ["## Per-op quantized linear (inside CUDA graphs)", "", _conditions(data["conditions"]),
           "", "Time in microseconds; in brackets: weight TB/s for M <= 64, TFLOP/s above; "
           "`xN` = speedup vs bf16 `F.linear` in the same run.", ""]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows):
        out += [f"### K={k}, N={n}", "", "| M | " + " | ".join(configs) + " |",
                "|---" * (len(configs) + 1) + "|"]
        for m in sorted({r["M"] for r in rows if r["K"] == k and r["N"] == n}):
            cells = []
            for c in configs:
                r = next((r for r in rows if (r["K"], r["N"], r["M"], r["config"]) ==
                          (k, n, m, c)), None)
                if r is None:
                    cells.append("-")
                    continue
                rate = f"{r['tbps_weight']:.2f} TB/s" if m <= 64 else f"{r['tflops']:.0f} TF/s"
                cells.append(f"{r['us']:.1f} ({rate}) x{_fmt(r['speedup_vs_bf16'])}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    errors = [r for r in data["rows"] if "error" in r]
    if errors:
        out.append("Errors: " + "; ".join(
            f"{r['config']} K={r['K']} N={r['N']} M={r['M']}: {r['error'][:80]}" for r in errors))
    return out


def accuracy_section(data: dict) -> list[str]:
    out = ["## Accuracy: SmolLM2-135M-Instruct, held-out perplexity", "",
           _conditions(data["conditions"]), "", data.get("note", ""), "",
           "| config | size MiB | wiki ppl | vs fp32 | layers quantized/skipped |",
           "|---|---|---|---|---|"]
    base = data["rows"][0]["ppl"]
    for r in data["rows"]:
        out.append(f"| {r['name']} | {r['size_mib']:.1f} | {r['ppl']:.3f} | "
                   f"{100 * (r['ppl'] / base - 1):+.2f}% | {r['quantized']}/{r['skipped']} |")
    return out


SECTIONS = {"decode": decode_section, "ops": ops_section, "accuracy": accuracy_section}

# Other results files render as one plain table of their rows' scalar fields.
TITLES = {
    "calibration": "Calibration (GPTQ, AWQ, HQQ, SmoothQuant): SmolLM2-135M held-out perplexity",
    "accuracy_mx": "MX and NVFP4: SmolLM2-135M held-out perplexity",
    "accuracy_sparse": "2:4 sparsity: SmolLM2-135M held-out perplexity",
    "accuracy_efficientnet": "EfficientNet-Lite0: top-1 agreement with fp32 on real photos",
    "qat_smollm2": "QAT: SmolLM2-135M fine-tune, held-out perplexity",
    "sparse_train_smollm2": "2:4 sparse training: SmolLM2-135M MLP linears, held-out perplexity "
                            "(CPU)",
    "sparse_train_smollm2_400": "2:4 sparse training, 400 steps (CPU)",
    "bench_mx": "MX / NVFP4 weight-only decode per op (GPU: card in the conditions)",
    "sparse_ops": "2:4 sparse linear per op (GPU: card in the conditions)",
    "sparse_ops_h200": "2:4 sparse linear per op on the H200, small M and M=1024",
    "sparse_ops_large_m": "2:4 sparse linear per op at large M, cuSPARSELt path (GPU: card in "
                          "the conditions)",
    "sparse_ops_large_m_session12": "2:4 sparse linear per op at M=1024 and 4096, all four "
                                    "shapes (GPU: card in the conditions)",
    "cslt_layouts": "cuSPARSELt output layouts, microseconds (GPU: card in the conditions)",
    "fp8_training_32layers": "fp8 training throughput, all 32 layers of Llama-3-8B (GPU: card "
                             "in the conditions)",
    "fp8_training_32layers_b2": "fp8 training throughput, all 32 layers of Llama-3-8B, batch 2 "
                                "x 4096 tokens (GPU: card in the conditions)",
    "fp8_training": "fp8 training throughput, 8 layers (GPU: card in the conditions)",
    "fp8_convergence": "fp8 training convergence on real text (GPU: card in the conditions)",
    "fsdp_fp8_32layers": "FSDP2 training throughput per GPU, 32 layers, bf16 vs fp8 all-gather "
                         "(GPU: card and world_size in the conditions)",
    "fsdp_fp8": "FSDP2 training throughput per GPU, 8 layers, session 5's code (before the "
                "batched shard casts and the host-sync fix)",
    "gemm_sweep": "Weight-only tl.dot GEMM: a wide tile grid vs the shipped tiles (GPU)",
    "host_overhead": "Host time of one compiled decode call, GPU work removed (CPU)",
    "fp8_host_overhead": "Compiled fp8 training step per linear, tiny shapes: host-side cost by "
                         "code version (CPU)",
    "train_mx": "Emulated MXFP8 training vs bf16 on real text (GPU: card in the conditions)",
    "optim_speed": "Low-bit AdamW step time (GPU: card in the conditions)",
    "optim_convergence": "Low-bit AdamW convergence on real text (~100M params, GPU)",
    "converge_optim_cpu": "Low-bit AdamW convergence on real text (0.9M params, CPU)",
}
_HIDDEN = {"spec", "timing", "weight_bytes"}


def generic_section(title: str, data: dict) -> list[str]:
    rows = data.get("rows") or data.get("runs") or data.get("results") or []
    if isinstance(rows, dict):  # {name: {field: value}}
        rows = [{"row": name, **fields} for name, fields in rows.items()]
    cols = list(dict.fromkeys(
        k for r in rows for k, v in r.items()
        if k not in _HIDDEN and (v is None or isinstance(v, (str, int, float, bool)))))
    out = [f"## {title}", "", _conditions(data.get("conditions", {})), ""]
    if data.get("note"):
        out += [data["note"], ""]
    out += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def main() -> None:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`. "
             "Every number comes from a run recorded there, with its conditions; baselines "
             "(bf16, torchao) were measured in the same run.", ""]
    for name, section in SECTIONS.items():
        # one section per file: name.json, or name_<part>.json for runs split across calls
        paths = sorted(RESULTS.glob(f"{name}.json")) + sorted(RESULTS.glob(f"{name}_*.json"))
        for path in (p for p in paths if p.stem not in TITLES):
            lines += section(json.loads(path.read_text())) + [f"(from `{path.name}`)", ""]
    for stem, title in TITLES.items():
        for path in sorted(RESULTS.glob(f"{stem}.json")):
            lines += generic_section(title, json.loads(path.read_text()))
            lines += [f"(from `{path.name}`)", ""]
            if path.with_suffix(".png").exists():
                lines += [f"![{title}](results/{path.stem}.png)", ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
