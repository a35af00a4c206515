"""2:4 sparsity accuracy on the real model: SmolLM2-135M held-out perplexity per method.

Runs on the CPU (the model wheel cannot travel to the GPU machine) and writes
benchmarks/results/accuracy_sparse.json: the fp32 model, 2:4 by magnitude, 2:4 by WANDA, and
both with int4 kept values (groups of 64 logical columns, integer zero; SmolLM2's 576 is not a
multiple of 128, and groups of 32 would reproduce its shipped Q4_1 weights, see ASSETS.md).
Every nn.Linear of the decoder is pruned; the lm_head is tied to the embedding and stays dense.
WANDA's input norms come from the Wikipedia *train* split only; perplexity is measured on the
fixed held-out splits of Wikipedia and news (4 windows of 1024 tokens each). The "2:4 down_proj
inputs" rows also prune the inputs of every MLP down projection to 2:4 per token
(`prune_linear_inputs_`), untrained: what activation sparsity costs before any sparse training.

    nice -n 10 python benchmarks/accuracy_sparse.py
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import torch

from lowbit.eval import load_smollm2, load_text, perplexity
from lowbit.sparsity import Sparse24, prune_linear_inputs_, sparsify_

RESULTS = Path(__file__).parent / "results"
WINDOWS = 4
CORPORA = ("wiki", "news")
INPUTS = "2:4 down_proj inputs"
ROWS: list[tuple[str, Sparse24 | None]] = [
    ("fp32 dense", None),
    ("2:4 magnitude", Sparse24("magnitude")),
    ("2:4 WANDA", Sparse24("wanda")),
    ("2:4 magnitude + int4 g64", Sparse24("magnitude", bits=4, group_size=64)),
    ("2:4 WANDA + int4 g64", Sparse24("wanda", bits=4, group_size=64)),
    (f"fp32 dense + {INPUTS}", None),
    (f"2:4 WANDA + {INPUTS}", Sparse24("wanda")),
]


def calibration_batches(tokenizer, windows: int, seq_len: int) -> list[torch.Tensor]:
    """`windows` non-overlapping windows of `seq_len` tokens from the start of wiki/train."""
    text = load_text("wiki", "train")[: 8 * windows * seq_len]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.numel() < windows * seq_len:
        raise ValueError("not enough training text for the calibration windows")
    return list(ids[: windows * seq_len].view(windows, 1, seq_len))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=str(RESULTS / "accuracy_sparse.json"))
    p.add_argument("--only", default="", help="comma-separated row labels (default: all)")
    args = p.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_smollm2(torch.float32)
    texts = {c: load_text(c, "heldout") for c in CORPORA}
    batches = calibration_batches(tokenizer, args.calib_windows, args.seq_len)
    conditions = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": "cpu", "model": "SmolLM2-135M-Instruct (fp32)",
        "eval": f"held-out wiki and news, {WINDOWS} windows x 1024 tokens",
        "wanda_calibration": f"wiki train, {args.calib_windows} x {args.seq_len} tokens",
    }
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for label, cfg in ROWS:
        if only is not None and label not in only:
            continue
        t0 = time.time()
        model = copy.deepcopy(base)
        summary = None
        if cfg is not None:
            calib = batches if cfg.method == "wanda" else None
            summary = sparsify_(model, cfg, calibration=calib)
        pruned_inputs = prune_linear_inputs_(model) if INPUTS in label else []
        row = {"config": label, "spec": None if cfg is None else cfg.to_dict(),
               "sparsified_linears": 0 if summary is None else len(summary.quantized),
               "skipped": {} if summary is None else summary.skipped,
               "input_pruned_linears": len(pruned_inputs)}
        if summary is not None:
            row["linear_mib_before"] = summary.bytes_before / 2**20
            row["linear_mib_after"] = summary.bytes_after / 2**20
        for corpus, text in texts.items():
            r = perplexity(model, tokenizer, text, max_windows=WINDOWS, progress=False)
            row[f"ppl_{corpus}"] = r.ppl
            row[f"tokens_{corpus}"] = r.tokens_scored
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(f"{label:<28} wiki {row['ppl_wiki']:8.3f}  news {row['ppl_news']:8.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
        del model
        # Written after every row: a long CPU run that stops early keeps what it measured.
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
