"""2:4 sparse training on the real model: SmolLM2-135M, MLP linears, held-out perplexity.

Does a short fine-tune with `lowbit.sparsity.sparse_training_` win back what one-shot 2:4
pruning loses? Rows (held-out Wikipedia and news, 4 windows of 1024 tokens, the fixed splits
of lowbit.eval.corpora):

- ptq_24_mlp: 2:4 magnitude pruning of every MLP linear (gate, up, down), no training;
- sparse_train: the same layers trained with `sparse_training_` (mask recomputed from |W|
  every step, dense weight gradient), then `finalize_sparse_training_`;
- ptq_24_mlp_act / sparse_train_act: the same, plus the down projections' inputs pruned to 2:4
  per token (`prune_linear_inputs_` / `sparse_training_(prune_inputs=mlp_down_projections)`).

Training is qat_smollm2.py's loop and schedule (random windows of the Wikipedia *train* split,
fixed seed, AdamW, embedding frozen), so its `finetune_fp32` row is the dense control run with
the same batches. CPU only (the model wheel cannot travel to the GPU machine). The recorded run
ran the rows as parallel single-thread processes and merged them:

    python benchmarks/sparse_train_smollm2.py --rows sparse_train --threads 1 --out /tmp/a.json
    python benchmarks/sparse_train_smollm2.py --merge /tmp/a.json /tmp/b.json ...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qat_smollm2 import add_train_args, evaluate, train  # noqa: E402

from lowbit.eval import load_smollm2, load_text  # noqa: E402
from lowbit.sparsity import (  # noqa: E402
    Sparse24,
    finalize_sparse_training_,
    mlp_down_projections,
    mlp_linears,
    prune_linear_inputs_,
    sparse_training_,
    sparsify_,
)

RESULTS = Path(__file__).parent / "results"
ROWS = ("ptq_24_mlp", "sparse_train", "ptq_24_mlp_act", "sparse_train_act")


def build_row(name: str, base, ids: torch.Tensor, args) -> tuple:
    """(model, extra fields) for one row."""
    model = copy.deepcopy(base)
    act = name.endswith("_act")
    if name.startswith("ptq"):
        summary = sparsify_(model, Sparse24("magnitude"), mlp_linears)
        extra = {"pruned_linears": len(summary.quantized)}
    else:
        names = sparse_training_(model, mlp_linears,
                                 prune_inputs=mlp_down_projections if act else None)
        extra = {"pruned_linears": len(names), **train(model, ids, args, name)}
        finalize_sparse_training_(model)
    if act and name.startswith("ptq"):
        extra["input_pruned_linears"] = len(prune_linear_inputs_(model))
    return model, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_train_args(ap, steps=60, seq_len=128, batch=1, lr=1e-4,
                   out=RESULTS / "sparse_train_smollm2.json")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    if args.merge:
        _merge(args.out, args.merge)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tokenizer = load_smollm2()
    ids = torch.tensor(tokenizer(load_text("wiki", "train"), add_special_tokens=False)["input_ids"])
    result: dict = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "pruned": "MLP linears of model.layers.* (gate, up, down: 90), magnitude 2:4",
        "eval": "held-out splits, 4 windows x 1024 tokens per corpus",
        "training": {"loop": "benchmarks/qat_smollm2.py train()", "steps": args.steps,
                     "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                     "seed": args.seed, "data": "random windows of the wiki train split"},
        "conditions": {"torch": torch.__version__, "device": "cpu",
                       "threads": torch.get_num_threads()},
        "rows": {},
    }
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; choose from {ROWS}")
        model, extra = build_row(name, base, ids, args)
        t = time.perf_counter()
        result["rows"][name] = evaluate(model, tokenizer) | extra
        result["rows"][name]["eval_seconds"] = round(time.perf_counter() - t, 1)
        print(name, result["rows"][name], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        del model


def _merge(out: Path, parts: list[Path]) -> None:
    """Combine rows run in separate processes; their settings must be equal."""
    loaded = [json.loads(p.read_text()) for p in parts]
    merged = dict(loaded[0], rows={})
    for part, other in zip(parts, loaded):
        if other["training"] != merged["training"]:
            raise ValueError(f"{part} was run with different settings; not merging")
        merged["rows"].update(other["rows"])
    out.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
