"""MX / NVFP4 accuracy on the real model: SmolLM2-135M held-out perplexity per format.

Runs on the CPU (the model wheel cannot travel to the GPU machine) and writes
benchmarks/results/accuracy_mx.json after every row: fp32; int8, int4 g64 and fp8 from the
same harness as baselines; MXFP8 / MXFP6 (E2M3, E3M2) / MXFP4 / NVFP4 weight-only; MX x MX
and NVFP4 x NVFP4 dynamic. Perplexity on the fixed held-out splits of Wikipedia and news, 4
windows of 1024 tokens each; every nn.Linear is quantized, lm_head included (its tied
embedding follows).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/accuracy_mx.py          # lowbit rows
    python benchmarks/accuracy_mx.py --only mxfp4 --out /tmp/x.json
    PYTHONPATH=/tmp/aosite python benchmarks/accuracy_mx.py --torchao     # + torchao rows
    PYTHONPATH=/tmp/aosite python benchmarks/accuracy_mx.py --codec-check # + codec agreement

torchao 0.18's MX/NVFP4 inference configs run in the same process with `--torchao`: each as
it comes, on the fp32 model, and where one refuses fp32 weights, again on a bf16 copy with
its emulated kernel, next to a bf16 baseline. A config that cannot run here is a row with its
error message. torchao replaces lm_head's weight only, so its tied embedding stays fp32.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import time
import warnings
from collections.abc import Callable
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
    ("MXFP8 x MXFP8 dynamic (rceil)", MXDynamicActivationMXWeight("fp8_e4m3",
                                                                  scale_mode="rceil")),
    ("MXFP8 e5m2 weight-only", MXWeightOnly("fp8_e5m2")),
]


def _perplexities(model, heldout: dict, fp32_wiki: float | None) -> dict:
    ppl = {f"{c}_ppl": round(perplexity(model, ids, max_windows=WINDOWS, progress=False).ppl, 3)
           for c, ids in heldout.items()}
    if fp32_wiki is not None:
        ppl["wiki_vs_fp32"] = f"{100 * (ppl['wiki_ppl'] / fp32_wiki - 1):+.1f}%"
    return ppl


def _torchao_rows() -> list[tuple[str, Callable[[], object], torch.dtype]]:
    """(label, make_config, model dtype) for torchao's MX/NVFP4 inference configs."""
    from torchao.prototype.mx_formats import (
        MXDynamicActivationMXWeightConfig,
        NVFP4DynamicActivationNVFP4WeightConfig,
        NVFP4WeightOnlyConfig,
    )
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    def mx(dtype: torch.dtype, **kw) -> Callable[[], object]:
        return lambda: MXDynamicActivationMXWeightConfig(
            activation_dtype=dtype, weight_dtype=dtype, **kw)

    emulated = {"kernel_preference": KernelPreference.EMULATED}
    fp8, fp4 = torch.float8_e4m3fn, torch.float4_e2m1fn_x2
    return [
        ("NVFP4 weight-only", NVFP4WeightOnlyConfig, torch.float32),
        ("NVFP4 x NVFP4 dynamic", NVFP4DynamicActivationNVFP4WeightConfig, torch.float32),
        ("MXFP8 x MXFP8 dynamic", mx(fp8), torch.float32),
        ("MXFP8 x MXFP8 dynamic", mx(fp8), torch.bfloat16),
        ("MXFP8 x MXFP8 dynamic (emulated, rceil)", mx(fp8, **emulated), torch.bfloat16),
        ("MXFP8 x MXFP8 dynamic (emulated, floor)",
         mx(fp8, scaling_mode=ScaleCalculationMode.FLOOR, **emulated), torch.bfloat16),
        ("MXFP4 x MXFP4 dynamic (emulated, rceil)", mx(fp4, **emulated), torch.bfloat16),
    ]


def run_torchao(model, heldout: dict, fp32_wiki: float, out: Path, rows: list[dict]) -> None:
    """torchao rows (after a bf16 baseline for those on a bf16 copy), written after each."""
    import torchao
    from torchao.quantization import quantize_ as ao_quantize_

    library = f"torchao {torchao.__version__}"
    specs = [("bf16 (no quantization)", None, torch.bfloat16), *_torchao_rows()]
    for label, make, dtype in specs:
        q = copy.deepcopy(model).to(dtype)
        row = {"config": label, "library": "-" if make is None else library,
               "model_dtype": str(dtype).removeprefix("torch.")}
        start = time.perf_counter()
        try:
            if make is not None:
                ao_quantize_(q, make())
            row["quantize_seconds"] = round(time.perf_counter() - start, 1)
            row.update(_perplexities(q, heldout, fp32_wiki))
        except Exception as e:  # a config that does not run here is a result too
            message = str(e).splitlines()[0][:200] if str(e) else ""
            row["error"] = f"{type(e).__name__}: {message}"
        rows.append(row)
        print(row, flush=True)
        del q
        _write(out, rows, library)


def codec_check(model) -> dict[str, str]:
    """Round every linear weight of the model with lowbit's codec and with torchao's tensors
    (MXTensor floor / rceil, NVFP4Tensor with the same amax tensor scale) and count the
    elements whose dequantized values differ."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    from lowbit.formats import mx

    def ao_mx(dtype, mode):
        return lambda w: MXTensor.to_mx(w, dtype, block_size=32,
                                        scaling_mode=mode).dequantize(torch.float32)

    def ao_nvfp4(w):
        scale = per_tensor_amax_to_scale(w.abs().amax())
        return NVFP4Tensor.to_nvfp4(w, per_tensor_scale=scale,
                                    is_swizzled_scales=False).dequantize(torch.float32)

    floor, rceil = ScaleCalculationMode.FLOOR, ScaleCalculationMode.RCEIL
    fp8, fp4 = torch.float8_e4m3fn, torch.float4_e2m1fn_x2
    pairs = {
        "MXFP8 e4m3 floor": (lambda w: mx.mx_fake_quantize(w, "fp8_e4m3"), ao_mx(fp8, floor)),
        "MXFP8 e4m3 rceil": (lambda w: mx.mx_fake_quantize(w, "fp8_e4m3", "rceil"),
                             ao_mx(fp8, rceil)),
        "MXFP4 floor": (lambda w: mx.mx_fake_quantize(w, "fp4_e2m1"), ao_mx(fp4, floor)),
        "MXFP4 rceil": (lambda w: mx.mx_fake_quantize(w, "fp4_e2m1", "rceil"), ao_mx(fp4, rceil)),
        "NVFP4": (mx.nvfp4_fake_quantize, ao_nvfp4),
    }
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() for w in weights)
    out = {}
    for name, (ours, theirs) in pairs.items():
        differ = [ours(w) != theirs(w) for w in weights]
        out[name] = f"{sum(int(d.sum()) for d in differ)} of {total} elements differ"
        if name == "NVFP4" and any(d.any() for d in differ):
            out[name] += f"; {_nvfp4_tie_distance(weights, differ)}"
        print(name, out[name], flush=True)
    return out


def _nvfp4_tie_distance(weights: list[torch.Tensor], differ: list[torch.Tensor]) -> str:
    """How close the differing elements sit to an E2M1 rounding midpoint: x / (block scale *
    tensor scale) in float64, relative distance to the nearest midpoint. Within a float32 ulp
    (2^-24 relative) means the two libraries only order the float32 scaling differently."""
    from lowbit.formats import mx

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    worst = 0.0
    for w, d in zip(weights, differ):
        if not d.any():
            continue
        _, block_scale, tensor_scale = mx.nvfp4_quantize(w)
        scale = block_scale.double().repeat_interleave(mx.NVFP4_BLOCK, -1) * tensor_scale.double()
        exact = (w.double() / scale)[d].abs()
        worst = max(worst, float(((exact[:, None] - mids).abs().min(1).values / exact).max()))
    return f"each within {worst:.2g} (relative) of an E2M1 rounding midpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of row labels (fp32 always runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_mx.json")
    parser.add_argument("--torchao", action="store_true",
                        help="also run torchao's MX/NVFP4 configs (needs torchao importable)")
    parser.add_argument("--codec-check", action="store_true",
                        help="only compare lowbit's and torchao's codecs on the model's weights "
                             "and add the counts to --out")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model, tokenizer = load_smollm2()
    if args.codec_check:
        data = json.loads(args.out.read_text())
        agreement = codec_check(model)
        data["codec_agreement_with_torchao"] = agreement
        data["note"] += (" Codec check, lowbit vs torchao's MXTensor / NVFP4Tensor on every "
                         "linear weight (dequantized values): "
                         + "; ".join(f"{k}: {v}" for k, v in agreement.items()) + ".")
        args.out.write_text(json.dumps(data, indent=1))
        return
    heldout = {c: heldout_ids(tokenizer, c) for c in CORPORA}
    rows: list[dict] = []
    fp32_wiki = None
    for label, config in ROWS:
        if args.only and config is not None and not any(
                o.lower() in label.lower() for o in args.only):
            continue
        q = model if config is None else copy.deepcopy(model)
        start = time.perf_counter()
        summary = None if config is None else quantize_(q, config, show_progress=False)
        seconds = time.perf_counter() - start
        row = {"config": label, "library": "lowbit", "model_dtype": "float32",
               "quantized": "" if summary is None else
               f"{len(summary.quantized)} quantized, {len(summary.skipped)} skipped",
               "quantize_seconds": round(seconds, 1),
               "spec": None if config is None else config.to_dict()}
        row.update(_perplexities(q, heldout, fp32_wiki))
        fp32_wiki = fp32_wiki or row["wiki_ppl"]
        rows.append(row)
        print(f"{label:<36}{row['wiki_ppl']:>9}{row['news_ppl']:>9}{seconds:>8.1f}s", flush=True)
        del q
        _write(args.out, rows)  # after every row: a long run that is stopped keeps its rows
    if args.torchao:
        run_torchao(model, heldout, fp32_wiki, args.out, rows)
    print(f"wrote {args.out}")


def _write(out: Path, rows: list[dict], torchao: str | None = None) -> None:
    conditions = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchao": torchao,
        "machine": f"CPU, {torch.get_num_threads()} threads, {platform.machine()} (shared with "
                   "other jobs: quantize_seconds are indicative)",
        "model": "SmolLM2-135M-Instruct fp32 (lm_head, tied to the embedding, quantized too)",
        "windows": f"{WINDOWS} x 1024 tokens per corpus (held-out splits)",
        "compute": "MX/NVFP4 rows compute by dequantizing (no MX arithmetic on CPU); dynamic "
                   "rows round activations to the format per call, fp32 matmul",
    }
    note = (
        f"{WINDOWS} windows of 1024 tokens per corpus from the held-out splits. lowbit rows "
        "quantize every nn.Linear of the fp32 model, lm_head included (its tied embedding "
        "follows); MX/NVFP4 compute by dequantizing, and dynamic rows round activations to "
        "the format per call (fp32 matmul). torchao rows: lm_head's weight is replaced but "
        "its tied embedding stays fp32; bf16 rows run on a bf16 copy of the model (compare "
        "them with the bf16 baseline row). Caveat: SmolLM2 shipped as GGUF Q4_1 (groups of "
        "32 with a float zero), so int4 with groups of 32 would look lossless; int4 uses "
        "groups of 64 here. MX blocks are 32 wide with power-of-two scales, which cannot "
        "reproduce Q4_1's grid."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"conditions": conditions, "note": note, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
