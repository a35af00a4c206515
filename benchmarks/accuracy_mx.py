"""MX / NVFP4 accuracy on the real model: SmolLM2-135M held-out perplexity per format.

Runs on the CPU (the model wheel cannot travel to the GPU machine) and writes
benchmarks/results/accuracy_mx.json: fp32; int8, int4 g64 and fp8 from the same harness as
baselines; MXFP8 / MXFP6 (E2M3, E3M2) / MXFP4 / NVFP4 weight-only; MX x MX and NVFP4 x NVFP4
dynamic. Perplexity on the fixed held-out splits of Wikipedia and news, 4 windows of 1024
tokens each; every nn.Linear is quantized, lm_head included (its tied embedding follows).
torchao's MX/NVFP4 configs are added when torchao is importable and they run here.

    nice -n 10 python benchmarks/accuracy_mx.py               # every row, a few minutes
    nice -n 10 python benchmarks/accuracy_mx.py --only mxfp4 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from lowbit.eval import heldout_ids, load_smollm2, perplexity
from lowbit.quantize import (
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8WeightOnly,
    MXDynamicActivationMXWeight,
    MXWeightOnly,
    NVFP4DynamicActivationNVFP4Weight,
    NVFP4WeightOnly,
    QuantConfig,
    quantize_,
)

RESULTS = Path(__file__).parent / "results"
WINDOWS = 4
CORPORA = ("wiki", "news")

# (label, config); None is the fp32 model.
ROWS: list[tuple[str, QuantConfig | None]] = [
    ("fp32", None),
    ("MXFP8 e4m3 weight-only", MXWeightOnly("fp8_e4m3")),
    ("MXFP6 e2m3 weight-only", MXWeightOnly("fp6_e2m3")),
    ("MXFP4 weight-only", MXWeightOnly("fp4_e2m1")),
    ("NVFP4 weight-only", NVFP4WeightOnly()),
    ("MXFP8 x MXFP8 dynamic", MXDynamicActivationMXWeight("fp8_e4m3")),
    ("MXFP6 x MXFP6 dynamic (e2m3)", MXDynamicActivationMXWeight("fp6_e2m3")),
    ("MXFP4 x MXFP4 dynamic", MXDynamicActivationMXWeight("fp4_e2m1")),
    ("NVFP4 x NVFP4 dynamic", NVFP4DynamicActivationNVFP4Weight()),
    ("int8 weight-only (per channel)", Int8WeightOnly()),
    ("int4 g64 weight-only", Int4WeightOnly(64)),
    ("fp8 e4m3 weight-only (per row)", Float8WeightOnly()),
    ("fp8 dynamic (rowwise)", Float8DynamicActivationFloat8Weight()),
    ("MXFP6 e3m2 weight-only", MXWeightOnly("fp6_e3m2")),
    ("MXFP4 weight-only (rceil scales)", MXWeightOnly("fp4_e2m1", "rceil")),
    ("MXFP4 weight x MXFP8 act dynamic", MXDynamicActivationMXWeight("fp4_e2m1", "fp8_e4m3")),
    ("MXFP8 e5m2 weight-only", MXWeightOnly("fp8_e5m2")),
]


def _torchao_rows() -> list[tuple[str, object]]:
    """torchao's MX/NVFP4 inference configs, if torchao is importable (else none)."""
    try:
        from torchao.prototype.mx_formats import (
            MXDynamicActivationMXWeightConfig,
            NVFP4DynamicActivationNVFP4WeightConfig,
            NVFP4WeightOnlyConfig,
        )
    except ImportError:
        return []
    return [
        ("torchao MXFP8 dynamic", MXDynamicActivationMXWeightConfig(
            activation_dtype=torch.float8_e4m3fn, weight_dtype=torch.float8_e4m3fn)),
        ("torchao MXFP4 dynamic", MXDynamicActivationMXWeightConfig(
            activation_dtype=torch.float4_e2m1fn_x2, weight_dtype=torch.float4_e2m1fn_x2)),
        ("torchao NVFP4 weight-only", NVFP4WeightOnlyConfig()),
        ("torchao NVFP4 dynamic", NVFP4DynamicActivationNVFP4WeightConfig()),
    ]


def _quantize(model, label: str, config) -> tuple[bool, str]:
    if label.startswith("torchao"):
        from torchao.quantization import quantize_ as ao_quantize

        try:
            ao_quantize(model, config)
        except Exception as e:  # report, don't hide: torchao's MX paths may need a GPU
            return False, f"{type(e).__name__}: {str(e)[:160]}"
        return True, ""
    summary = quantize_(model, config, show_progress=False)
    return True, f"{len(summary.quantized)} quantized, {len(summary.skipped)} skipped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of row labels (fp32 always runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_mx.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model, tokenizer = load_smollm2()
    heldout = {c: heldout_ids(tokenizer, c) for c in CORPORA}
    rows = []
    for label, config in ROWS + _torchao_rows():
        if args.only and config is not None and not any(
                o.lower() in label.lower() for o in args.only):
            continue
        q = model if config is None else copy.deepcopy(model)
        start = time.perf_counter()
        ok, what = (True, "") if config is None else _quantize(q, label, config)
        seconds = time.perf_counter() - start
        row = {"config": label, "quantized": what,
               "spec": None if config is None or label.startswith("torchao")
               else config.to_dict()}
        if ok:
            for c, ids in heldout.items():
                row[f"{c}_ppl"] = round(perplexity(q, ids, max_windows=WINDOWS,
                                                   progress=False).ppl, 3)
        row["quantize_seconds"] = round(seconds, 1)
        rows.append(row)
        print(f"{label:<36}{row.get('wiki_ppl', '-'):>9}{row.get('news_ppl', '-'):>9}  {what}",
              flush=True)
        del q
        _write(args.out, rows)
    print(f"wrote {args.out}")


def _write(out: Path, rows: list[dict]) -> None:
    conditions = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"CPU, {torch.get_num_threads()} threads, {platform.machine()}",
        "model": "SmolLM2-135M-Instruct fp32 (lm_head, tied to the embedding, quantized too)",
        "windows": f"{WINDOWS} x 1024 tokens per corpus (held-out splits)",
        "compute": "MX/NVFP4 rows compute by dequantizing (no MX arithmetic on CPU); dynamic "
                   "rows round activations to the format per call, fp32 matmul",
    }
    note = ("Caveat: SmolLM2 shipped as GGUF Q4_1 (groups of 32 with a float zero), so int4 "
            "with groups of 32 would look lossless; int4 uses groups of 64 here. MX blocks are "
            "32 wide with power-of-two scales, which cannot reproduce Q4_1's grid.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"conditions": conditions, "note": note, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
